//! Remove and clear: every tier at once, after waiting for puts of the same keys still in flight.

use super::metrics::inc;
use super::Chain;
use crate::key::ChunkKey;
use kvhost_plugin_sdk::abi;
use std::time::Instant;

impl Chain {
    /// Remove keys from every tier; returns how many were removed from the hot cache. Puts of these keys
    /// still in flight are waited for first (up to the read timeout), so a late tier write cannot bring
    /// a removed key back.
    pub fn remove(&self, keys: &[ChunkKey]) -> usize {
        let deadline = Instant::now() + self.inner.settings.read_timeout;
        for k in keys {
            if !self.inner.inflight.wait_key(k, deadline) {
                tracing::warn!(target: "kvhost::chain", key = %k, "remove: a put of this key is still in flight");
            }
        }
        let removed = keys.iter().filter(|k| self.inner.hot.remove(k)).count();
        // Every tier at once; plugins with `remove_async` are waited for up to the read timeout.
        let (tx, rx) = crossbeam_channel::unbounded();
        let mut asked = 0;
        for (t, tier) in self.inner.tiers.iter().enumerate() {
            let Some(plugin) = tier.plugin() else {
                continue;
            };
            let tx = tx.clone();
            asked += 1;
            plugin.remove_async(keys.to_vec(), true, move |d| {
                let _ = tx.send((t, d));
            });
        }
        let deadline = Instant::now() + self.inner.settings.read_timeout;
        for _ in 0..asked {
            match rx.recv_deadline(deadline) {
                Ok((t, done)) => {
                    if let Some(e) = done.error {
                        let tier = &self.inner.tiers[t];
                        inc(&tier.metrics.errors);
                        tracing::warn!(target: "kvhost::chain", tier = %tier.name, "{e}");
                    }
                }
                Err(_) => {
                    tracing::warn!(
                        target: "kvhost::chain",
                        "remove: a tier did not finish within {:?}; it completes in the background",
                        self.inner.settings.read_timeout
                    );
                    break;
                }
            }
        }
        removed
    }

    /// Remove everything from every tier that can clear; returns the hot-cache entries removed.
    pub fn clear(&self) -> usize {
        let removed = self.inner.hot.clear();
        for tier in &self.inner.tiers {
            if let (true, Some(plugin)) = (tier.has(abi::KVH_CAP_CLEAR), tier.plugin()) {
                if let Err(e) = plugin.clear() {
                    inc(&tier.metrics.errors);
                    tracing::warn!(target: "kvhost::chain", tier = %tier.name, "{e}");
                }
            }
        }
        removed
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::{hot_only, key, keys, put};

    #[test]
    fn remove_counts_only_what_the_hot_cache_held() {
        let chain = hot_only(8 << 20);
        for (i, k) in keys(3).iter().enumerate() {
            put(&chain, k, i as u32, 2000);
        }
        assert_eq!(chain.remove(&[key(0), key(2), key(9)]), 2);
        assert_eq!(
            chain.get(&keys(3)).iter().filter(|h| h.is_some()).count(),
            1
        );
        assert_eq!(chain.remove(&[key(0)]), 0, "a second remove finds nothing");
    }

    #[test]
    fn clear_empties_the_hot_cache_and_frees_its_bytes() {
        let chain = hot_only(8 << 20);
        for (i, k) in keys(5).iter().enumerate() {
            put(&chain, k, i as u32, 10_000);
        }
        assert_eq!(chain.clear(), 5);
        assert_eq!(chain.hot().snapshot().allocated_bytes, 0);
        assert!(chain.get(&keys(5)).iter().all(|h| h.is_none()));
    }
}
