//! The allocation-free prefix walk: what an inference engine asks once per request on its critical
//! path ("how many leading chunks can I load?"), answered without building the per-tier breakdown of
//! [`Chain::lookup`].

use super::Chain;
use crate::key::ChunkKey;
use std::sync::atomic::Ordering;
use std::time::Instant;

impl Chain {
    /// How many leading keys of `keys` are stored anywhere in the chain: the same answer as
    /// `lookup(keys, None).hit_chunks`. Nothing is allocated while the hot cache (or a put in flight)
    /// holds the prefix; the plugin tiers are asked only about the keys after it.
    pub fn prefix_len(&self, keys: &[ChunkKey]) -> usize {
        let inner = &self.inner;
        let started = Instant::now();
        let mut pos = inner.hot.prefix_hits(keys);
        // A put still on its way to the tiers is readable from its arena block.
        while pos < keys.len() && inner.inflight.contains(&keys[pos]) {
            pos += 1;
            pos += inner.hot.prefix_hits(&keys[pos..]);
        }
        inner.hot_metrics.lookup_latency.record(started.elapsed());
        if pos == keys.len() || inner.tiers.is_empty() {
            inner.pins.lookups.fetch_add(1, Ordering::Relaxed);
            return pos;
        }
        pos + self.lookup(&keys[pos..], None).hit_chunks
    }
}
