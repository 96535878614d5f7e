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
