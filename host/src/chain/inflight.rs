//! Puts in flight (LMCache's `exists_in_put_tasks`): keys the chain accepted and has not yet stored in
//! every plugin tier, with a handle to their bytes so a get can be served from them meanwhile.
//!
//! Vocabulary used across the host: a put is *in flight* from the chain accepting it until every tier
//! has stored it; a plugin operation is *pending* from the plugin answering `KVH_PENDING` until its
//! completion arrives (`PluginBackend::pending_ops`); a tier's put batches pending in the plugin are
//! bounded by `max_pending_batches`.

use crate::cache::ChunkHandle;
use crate::key::ChunkKey;
use parking_lot::{Condvar, Mutex};
use std::collections::HashMap;
use std::time::Instant;

/// Keys in flight, each with a handle to its bytes and the number of tiers still storing it.
#[derive(Default)]
pub(crate) struct PutsInFlight {
    map: Mutex<HashMap<ChunkKey, (ChunkHandle, u32)>>,
    drained: Condvar,
}

impl PutsInFlight {
    /// Record `key` as being stored into `tiers` tiers; false if it already is (the put is a duplicate).
    pub(crate) fn begin(&self, key: &ChunkKey, handle: &ChunkHandle, tiers: u32) -> bool {
        let mut map = self.map.lock();
        if map.contains_key(key) {
            return false;
        }
        map.insert(key.clone(), (handle.clone(), tiers));
        true
    }

    /// One tier finished with `key`.
    pub(crate) fn done(&self, key: &ChunkKey) {
        let removed = {
            let mut map = self.map.lock();
            match map.get_mut(key) {
                Some((_, left)) if *left > 1 => {
                    *left -= 1;
                    None
                }
                Some(_) => map.remove(key),
                None => None,
            }
        };
        // Dropping a handle may take the cache's lock: never under ours.
        if removed.is_some() {
            drop(removed);
        }
        self.drained.notify_all();
    }

    /// A handle to the bytes of a key being stored.
    pub(crate) fn get(&self, key: &ChunkKey) -> Option<ChunkHandle> {
        self.map.lock().get(key).map(|(h, _)| h.clone())
    }

    /// Whether `key` is being stored.
    pub(crate) fn contains(&self, key: &ChunkKey) -> bool {
        self.map.lock().contains_key(key)
    }

    /// Keys being stored.
    pub(crate) fn len(&self) -> usize {
        self.map.lock().len()
    }

    /// The keys still being stored.
    pub(crate) fn keys(&self) -> Vec<ChunkKey> {
        self.map.lock().keys().cloned().collect()
    }

    /// Wait until `key` is no longer in flight or `deadline` passes; true if it is not.
    pub(crate) fn wait_key(&self, key: &ChunkKey, deadline: Instant) -> bool {
        let mut map = self.map.lock();
        while map.contains_key(key) {
            if self.drained.wait_until(&mut map, deadline).timed_out() {
                return !map.contains_key(key);
            }
        }
        true
    }

    /// Wait until nothing is in flight or `deadline` passes; true if drained.
    pub(crate) fn wait_empty(&self, deadline: Instant) -> bool {
        let mut map = self.map.lock();
        while !map.is_empty() {
            if self.drained.wait_until(&mut map, deadline).timed_out() {
                return map.is_empty();
            }
        }
        true
    }

    /// Forget everything (after close gave up); handles are dropped outside the lock.
    pub(crate) fn clear(&self) -> Vec<ChunkKey> {
        let drained: Vec<_> = self.map.lock().drain().collect();
        drained.into_iter().map(|(k, _)| k).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::{hot_only, key, put};
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_key_stays_in_flight_until_every_tier_is_done() {
        let chain = hot_only(1 << 20);
        put(&chain, &key(1), 1, 100);
        let handle = chain.hot().get(&key(1)).unwrap();
        let puts = PutsInFlight::default();
        assert!(puts.begin(&key(1), &handle, 2));
        assert!(
            !puts.begin(&key(1), &handle, 2),
            "a second put is a duplicate"
        );
        assert_eq!(puts.get(&key(1)).unwrap().bytes(), handle.bytes());
        puts.done(&key(1));
        assert!(puts.contains(&key(1)), "one tier left");
        puts.done(&key(1));
        assert!(!puts.contains(&key(1)));
        assert_eq!(puts.len(), 0);
        puts.done(&key(1)); // a stray done is harmless
    }

    #[test]
    fn waiters_wake_when_the_last_tier_finishes_or_give_up_at_the_deadline() {
        let chain = hot_only(1 << 20);
        put(&chain, &key(2), 2, 100);
        let handle = chain.hot().get(&key(2)).unwrap();
        let puts = std::sync::Arc::new(PutsInFlight::default());
        puts.begin(&key(2), &handle, 1);
        let soon = Instant::now() + Duration::from_millis(20);
        assert!(
            !puts.wait_key(&key(2), soon),
            "still in flight at the deadline"
        );
        assert!(!puts.wait_empty(Instant::now() + Duration::from_millis(20)));
        let finisher = {
            let puts = puts.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(30));
                puts.done(&key(2));
            })
        };
        assert!(puts.wait_empty(Instant::now() + Duration::from_secs(10)));
        finisher.join().unwrap();
        assert!(puts.wait_key(&key(2), Instant::now()));
    }

    #[test]
    fn clear_forgets_everything_and_names_the_keys() {
        let chain = hot_only(1 << 20);
        put(&chain, &key(3), 3, 100);
        let handle = chain.hot().get(&key(3)).unwrap();
        let puts = PutsInFlight::default();
        puts.begin(&key(3), &handle, 3);
        assert_eq!(puts.keys(), vec![key(3)]);
        assert_eq!(puts.clear(), vec![key(3)]);
        assert_eq!(puts.len(), 0);
    }
}
