//! Lookup: LMCache's tiered prefix walk, and the pins it holds under a lookup id until `unpin`, the pin
//! timeout (the pin monitor, LMCache's `PinMonitor`) or close.

use super::metrics::inc;
use super::tier::Tier;
use super::{Chain, Inner, HOT_TIER};
use crate::cache::ChunkHandle;
use crate::key::ChunkKey;
use crate::plugin::{ContainsDone, Presence};
use kvhost_plugin_sdk::abi;
use parking_lot::{Condvar, Mutex};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

/// Where a lookup found the longest cached prefix.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Lookup {
    /// Length of the cached prefix, in chunks.
    pub hit_chunks: usize,
    /// The prefix split by tier, in walk order: `(tier name, keys)`.
    pub by_tier: Vec<(String, Vec<ChunkKey>)>,
}

/// What one lookup pinned: hot-cache handles, and keys per plugin tier (by tier index).
pub(super) struct LookupPins {
    since: Instant,
    hot: Vec<ChunkHandle>,
    tiers: Vec<(usize, Vec<ChunkKey>)>,
}

impl LookupPins {
    fn new() -> LookupPins {
        LookupPins {
            since: Instant::now(),
            hot: Vec::new(),
            tiers: Vec::new(),
        }
    }

    /// Chunks pinned, over every tier.
    fn chunks(&self) -> usize {
        self.hot.len() + self.tiers.iter().map(|(_, k)| k.len()).sum::<usize>()
    }
}

/// Keys a plugin tier pinned for a lookup that completed after the chain stopped waiting. They are
/// unpinned from a host thread (the tier's next lookup, or the pin monitor), never from the plugin's
/// completion thread.
type LatePins = Arc<Mutex<Vec<ChunkKey>>>;

/// The chain's lookup pins by lookup id, the late pins per plugin tier, the lookup counters and the
/// pin monitor's stop flag.
#[derive(Default)]
pub(super) struct PinTable {
    by_lookup: Mutex<HashMap<String, LookupPins>>,
    /// By tier index.
    late: Vec<LatePins>,
    /// Lookups served.
    pub(super) lookups: AtomicU64,
    /// Lookups whose pins the pin timeout released.
    pub(super) forced_unpins: AtomicU64,
    stop: (Mutex<bool>, Condvar),
}

impl PinTable {
    /// A table for a chain with `tiers` plugin tiers.
    pub(super) fn new(tiers: usize) -> PinTable {
        PinTable {
            late: (0..tiers).map(|_| LatePins::default()).collect(),
            ..PinTable::default()
        }
    }

    /// Hold `pins` under `id`; returns the pins `id` held before, which the caller releases.
    fn insert(&self, id: &str, pins: LookupPins) -> Option<LookupPins> {
        self.by_lookup.lock().insert(id.to_string(), pins)
    }

    fn remove(&self, id: &str) -> Option<LookupPins> {
        self.by_lookup.lock().remove(id)
    }

    /// Lookups holding pins now.
    pub(super) fn len(&self) -> usize {
        self.by_lookup.lock().len()
    }

    /// Take the pins held longer than `timeout`.
    fn take_expired(&self, timeout: Duration) -> Vec<(String, LookupPins)> {
        let mut map = self.by_lookup.lock();
        let old: Vec<String> = map
            .iter()
            .filter(|(_, p)| p.since.elapsed() >= timeout)
            .map(|(k, _)| k.clone())
            .collect();
        old.into_iter()
            .filter_map(|k| map.remove(&k).map(|p| (k, p)))
            .collect()
    }

    /// Stop the pin monitor and take every pin still held (close releases them).
    fn stop(&self) -> Vec<LookupPins> {
        {
            let mut stop = self.stop.0.lock();
            *stop = true;
            self.stop.1.notify_all();
        }
        self.by_lookup.lock().drain().map(|(_, p)| p).collect()
    }

    /// Wait up to `interval` for a stop; true when stopped.
    fn wait_stop(&self, interval: Duration) -> bool {
        let mut stop = self.stop.0.lock();
        if !*stop {
            let _ = self.stop.1.wait_for(&mut stop, interval);
        }
        *stop
    }
}

impl Chain {
    /// LMCache's tiered prefix walk: how many leading keys are cached, and in which tier. With a
    /// `lookup_id`, the prefix is pinned until [`unpin`](Self::unpin) or the pin timeout.
    ///
    /// Tiers are asked in order, each about the keys left after the prefix found so far. Unlike
    /// LMCache's single pass, the walk starts again from the hot cache after a plugin tier made
    /// progress, so a prefix that alternates between tiers (say an older chunk only in a plugin, the
    /// next one only in the hot cache while its tier write is queued) is found whole.
    pub fn lookup(&self, keys: &[ChunkKey], pin: Option<&str>) -> Lookup {
        let inner = &self.inner;
        inner.pins.lookups.fetch_add(1, Ordering::Relaxed);
        let mut result = Lookup::default();
        let mut pins = LookupPins::new();
        let mut pos = 0;
        while pos < keys.len() {
            let pass_start = pos;
            let h = self.hot_prefix(&keys[pos..], pin.is_some(), &mut pins.hot);
            if h > 0 {
                result
                    .by_tier
                    .push((HOT_TIER.to_string(), keys[pos..pos + h].to_vec()));
                pos += h;
            }
            if pos == keys.len() {
                break;
            }
            for (t, tier) in inner.tiers.iter().enumerate() {
                let h = self.tier_prefix(t, tier, &keys[pos..], pin.is_some(), &mut pins);
                if h > 0 {
                    result
                        .by_tier
                        .push((tier.name.clone(), keys[pos..pos + h].to_vec()));
                    pos += h;
                    break;
                }
            }
            if pos == pass_start {
                break;
            }
        }
        result.hit_chunks = pos;
        if let Some(id) = pin {
            let old = inner.pins.insert(id, pins);
            if let Some(old) = old {
                self.release_pins(old);
            }
        }
        result
    }

    /// Whether memory holds `key` (the hot cache or a put in flight), counted as a one-key lookup
    /// when it does. Never calls a plugin, so an async reactor may call it; `false` means "not in
    /// memory": fall back to [`Chain::lookup`] on a thread that may block.
    pub fn contains_in_memory(&self, key: &ChunkKey) -> bool {
        let inner = &self.inner;
        let found = inner.hot.contains(key) || inner.inflight.contains(key);
        if found {
            inner.pins.lookups.fetch_add(1, Ordering::Relaxed);
        }
        found
    }

    /// Leading keys in the hot cache (or being stored); with `pin`, their handles go into `held`.
    fn hot_prefix(&self, keys: &[ChunkKey], pin: bool, held: &mut Vec<ChunkHandle>) -> usize {
        let inner = &self.inner;
        let started = Instant::now();
        let h = keys
            .iter()
            .take_while(|k| {
                if pin {
                    match inner.hot.get(k).or_else(|| inner.inflight.get(k)) {
                        Some(h) => {
                            held.push(h);
                            true
                        }
                        None => false,
                    }
                } else {
                    inner.hot.contains(k) || inner.inflight.contains(k)
                }
            })
            .count();
        inner.hot_metrics.lookup_latency.record(started.elapsed());
        h
    }

    /// Leading keys that plugin tier `t` holds; with `pin`, pins them there (extra pins are released).
    fn tier_prefix(
        &self,
        t: usize,
        tier: &Tier,
        keys: &[ChunkKey],
        pin: bool,
        pins: &mut LookupPins,
    ) -> usize {
        if tier.has(abi::KVH_CAP_DISCARDS) || !tier.breaker.allow() {
            return 0;
        }
        let Some(plugin) = tier.plugin() else {
            return 0;
        };
        let started = Instant::now();
        let want_pin = pin && tier.has(abi::KVH_CAP_PIN);
        let timeout = self.inner.settings.read_timeout;
        release_late_pins(&self.inner, t);
        let late = self.inner.pins.late[t].clone();
        let on_late = move |d: ContainsDone| {
            if want_pin && d.error.is_none() {
                let present = d.keys.into_iter().zip(&d.items);
                late.lock().extend(
                    present
                        .filter(|(_, p)| matches!(p, Presence::Present(_)))
                        .map(|(k, _)| k),
                );
            }
        };
        let presence = match plugin.contains_wait_or_late(keys, want_pin, timeout, on_late) {
            Ok(p) => p,
            Err(e) => {
                inc(&tier.metrics.errors);
                tier.breaker.failure(&format!("lookup: {e}"));
                tracing::warn!(target: "kvhost::chain", tier = %tier.name, "{e}");
                return 0;
            }
        };
        tier.metrics.lookup_latency.record(started.elapsed());
        let h = presence
            .iter()
            .take_while(|p| matches!(p, Presence::Present(_)))
            .count();
        if want_pin {
            // Pins beyond the prefix are not wanted: release them now.
            let extra: Vec<ChunkKey> = presence
                .iter()
                .enumerate()
                .skip(h)
                .filter(|(_, p)| matches!(p, Presence::Present(_)))
                .map(|(i, _)| keys[i].clone())
                .collect();
            if !extra.is_empty() {
                let _ = plugin.unpin(&extra);
            }
            if h > 0 {
                pins.tiers.push((t, keys[..h].to_vec()));
            }
        }
        h
    }

    /// Release the pins of `lookup_id`; returns how many chunks were pinned.
    pub fn unpin(&self, lookup_id: &str) -> usize {
        let pins = self.inner.pins.remove(lookup_id);
        match pins {
            Some(p) => {
                let n = p.chunks();
                self.release_pins(p);
                n
            }
            None => 0,
        }
    }

    fn release_pins(&self, pins: LookupPins) {
        release_pins(&self.inner, pins);
    }
}

/// Stop the pin monitor and release every lookup's pins (close).
pub(super) fn release_all(inner: &Inner) {
    for p in inner.pins.stop() {
        release_pins(inner, p);
    }
}

fn release_pins(inner: &Inner, pins: LookupPins) {
    drop(pins.hot);
    for (t, keys) in pins.tiers {
        let Some(plugin) = inner.tiers[t].plugin() else {
            continue;
        };
        if let Err(e) = plugin.unpin(&keys) {
            tracing::warn!(target: "kvhost::chain", tier = %inner.tiers[t].name, "{e}");
        }
    }
}

/// Unpin what tier `t` pinned for lookups that completed after the chain stopped waiting.
fn release_late_pins(inner: &Inner, t: usize) {
    let keys = std::mem::take(&mut *inner.pins.late[t].lock());
    if keys.is_empty() {
        return;
    }
    let tier = &inner.tiers[t];
    let Some(plugin) = tier.plugin() else {
        return;
    };
    if let Err(e) = plugin.unpin(&keys) {
        tracing::warn!(target: "kvhost::chain", tier = %tier.name, "releasing pins of a late lookup: {e}");
    }
}

/// Start the thread that releases pins past the pin timeout. It holds only a weak reference, so it
/// ends when the chain is dropped or closed.
pub(super) fn start_pin_monitor(inner: &Arc<Inner>) {
    let weak = Arc::downgrade(inner);
    std::thread::Builder::new()
        .name("kvhost-pin-monitor".into())
        .spawn(move || pin_monitor(weak))
        .expect("spawn pin monitor");
}

/// Releases lookup pins older than the pin timeout (LMCache's PinMonitor).
///
/// It holds the chain strongly for at most [`MONITOR_SLICE`] at a time: a chain dropped without
/// `close` is freed (its arena unmapped) within that slice, not after a whole check interval.
fn pin_monitor(inner: Weak<Inner>) {
    let mut next_check = Instant::now();
    loop {
        let Some(strong) = inner.upgrade() else {
            return;
        };
        let now = Instant::now();
        if now >= next_check {
            let timeout = strong.settings.pin_timeout;
            for (id, p) in strong.pins.take_expired(timeout) {
                strong.pins.forced_unpins.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(target: "kvhost::chain", "lookup `{id}` held its pins past {timeout:?}; released");
                release_pins(&strong, p);
            }
            // Pins of lookups that completed after the chain stopped waiting, should no lookup come by.
            for t in 0..strong.tiers.len() {
                release_late_pins(&strong, t);
            }
            let interval = strong
                .settings
                .pin_check_interval
                .max(Duration::from_millis(10));
            next_check = Instant::now() + interval;
        }
        let wait = next_check
            .saturating_duration_since(Instant::now())
            .min(MONITOR_SLICE);
        if strong.pins.wait_stop(wait) {
            return;
        }
    }
}

/// The longest the pin monitor holds the chain alive in one wait.
const MONITOR_SLICE: Duration = Duration::from_millis(100);

#[cfg(test)]
mod tests {
    use super::super::test_support::{hot_only, key, keys, put, settings};
    use super::*;

    /// The pin monitor must not keep a dropped chain (and its arena) alive for a whole check interval.
    #[test]
    fn a_chain_dropped_without_close_is_freed_within_the_monitor_slice() {
        let mut s = settings(8 << 20);
        s.pin_check_interval = Duration::from_secs(30);
        let chain = Chain::new(s, Vec::new()).expect("a hot-only chain");
        let weak = Arc::downgrade(&chain.inner);
        drop(chain);
        let deadline = Instant::now() + Duration::from_secs(3);
        while weak.upgrade().is_some() {
            assert!(
                Instant::now() < deadline,
                "the pin monitor kept the chain alive"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn lookup_counts_the_leading_cached_keys_only() {
        let chain = hot_only(8 << 20);
        for k in [0, 1, 3] {
            put(&chain, &key(k), k, 100);
        }
        let l = chain.lookup(&keys(4), None);
        assert_eq!(l.hit_chunks, 2, "key 2 breaks the prefix");
        assert_eq!(l.by_tier, vec![(HOT_TIER.to_string(), keys(2))]);
        assert_eq!(chain.lookup(&[key(9), key(0)], None).hit_chunks, 0);
        assert_eq!(chain.stats().pinned_lookups, 0, "no id, no pins");
    }

    #[test]
    fn a_pinned_prefix_survives_clear_until_unpinned() {
        let chain = hot_only(8 << 20);
        put(&chain, &key(0), 0, 4096);
        put(&chain, &key(1), 1, 4096);
        assert_eq!(chain.lookup(&keys(2), Some("a")).hit_chunks, 2);
        chain.clear();
        assert!(
            chain.hot().snapshot().allocated_bytes > 0,
            "pinned handles keep their blocks"
        );
        assert_eq!(chain.unpin("a"), 2);
        assert_eq!(chain.hot().snapshot().allocated_bytes, 0);
        assert_eq!(chain.unpin("a"), 0, "pins are released once");
    }

    #[test]
    fn a_second_lookup_with_the_same_id_replaces_its_pins() {
        let chain = hot_only(8 << 20);
        put(&chain, &key(0), 0, 100);
        put(&chain, &key(1), 1, 100);
        chain.lookup(&keys(2), Some("x"));
        chain.lookup(&keys(1), Some("x"));
        assert_eq!(chain.stats().pinned_lookups, 1);
        assert_eq!(chain.unpin("x"), 1);
    }

    #[test]
    fn the_pin_monitor_releases_pins_past_the_timeout() {
        let mut s = settings(8 << 20);
        s.pin_timeout = Duration::from_millis(30);
        let chain = Chain::new(s, Vec::new()).unwrap();
        put(&chain, &key(0), 0, 100);
        chain.lookup(&keys(1), Some("slow"));
        let deadline = Instant::now() + Duration::from_secs(5);
        while chain.stats().forced_unpins == 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        let st = chain.stats();
        assert_eq!((st.forced_unpins, st.pinned_lookups), (1, 0));
        assert_eq!(chain.unpin("slow"), 0);
    }

    #[test]
    fn the_pin_table_hands_out_only_expired_pins() {
        let table = PinTable::default();
        table.insert("old", LookupPins::new());
        std::thread::sleep(Duration::from_millis(20));
        table.insert("new", LookupPins::new());
        let expired = table.take_expired(Duration::from_millis(15));
        assert_eq!(expired.len(), 1);
        assert_eq!(expired[0].0, "old");
        assert_eq!(table.len(), 1);
        assert_eq!(table.stop().len(), 1);
        assert!(
            table.wait_stop(Duration::from_secs(5)),
            "stop is seen at once"
        );
    }
}
