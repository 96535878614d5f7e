//! Get: the hot cache, then puts in flight, then each tier in order; a tier hit is read by the plugin
//! straight into a new arena block, which becomes the promoted hot-cache entry.

use super::metrics::{add, inc};
use super::tier::Tier;
use super::Chain;
use crate::cache::{ChunkHandle, StagedBlock};
use crate::key::ChunkKey;
use crate::plugin::{GetItem, GetRequest, Presence, Status};
use kvhost_plugin_sdk::abi;
use std::time::Instant;

impl Chain {
    /// Read chunks: hot cache, then puts in flight, then each tier, promoting tier hits into the hot
    /// cache without an extra copy. `None` for chunks found nowhere.
    pub fn get(&self, keys: &[ChunkKey]) -> Vec<Option<ChunkHandle>> {
        let inner = &self.inner;
        let started = Instant::now();
        let mut out: Vec<Option<ChunkHandle>> = keys
            .iter()
            .map(|k| {
                let h = inner.hot.get(k).or_else(|| inner.inflight.get(k));
                match &h {
                    Some(h) => {
                        inc(&inner.hot_metrics.hits);
                        add(&inner.hot_metrics.bytes_out, h.len() as u64);
                    }
                    None => inc(&inner.hot_metrics.misses),
                }
                h
            })
            .collect();
        inner.hot_metrics.get_latency.record(started.elapsed());
        for tier in &inner.tiers {
            let missing: Vec<usize> = (0..keys.len()).filter(|&i| out[i].is_none()).collect();
            if missing.is_empty() {
                break;
            }
            if tier.has(abi::KVH_CAP_DISCARDS) || !tier.breaker.allow() {
                continue;
            }
            let ks: Vec<ChunkKey> = missing.iter().map(|&i| keys[i].clone()).collect();
            for (slot, handle) in self.read_tier(tier, &ks) {
                out[missing[slot]] = Some(handle);
            }
        }
        out
    }

    /// Read one chunk only if memory holds it (the hot cache or a put in flight). Never calls a plugin,
    /// so an async reactor may call it; `None` means "not in memory", not "absent": fall back to
    /// [`Chain::get`] on a thread that may block.
    pub fn get_in_memory(&self, key: &ChunkKey) -> Option<ChunkHandle> {
        let inner = &self.inner;
        let started = Instant::now();
        let h = inner.hot.get(key).or_else(|| inner.inflight.get(key))?;
        inc(&inner.hot_metrics.hits);
        add(&inner.hot_metrics.bytes_out, h.len() as u64);
        inner.hot_metrics.get_latency.record(started.elapsed());
        Some(h)
    }

    /// Read `keys` from one tier into new arena blocks; returns `(index in keys, promoted handle)`.
    fn read_tier(&self, tier: &Tier, keys: &[ChunkKey]) -> Vec<(usize, ChunkHandle)> {
        let inner = &self.inner;
        let m = &tier.metrics;
        let Some(plugin) = tier.plugin() else {
            return Vec::new();
        };
        let started = Instant::now();
        let presence = match plugin.contains_wait(keys, false, inner.settings.read_timeout) {
            Ok(p) => p,
            Err(e) => {
                inc(&m.errors);
                tier.breaker.failure(&format!("lookup: {e}"));
                tracing::warn!(target: "kvhost::chain", tier = %tier.name, "{e}");
                return Vec::new();
            }
        };
        m.lookup_latency.record(started.elapsed());
        let deadline = Instant::now() + inner.settings.promotion_wait;
        let mut want = Vec::new();
        let mut bufs: Vec<StagedBlock> = Vec::new();
        for (i, p) in presence.iter().enumerate() {
            match p {
                Presence::Present(meta) => match inner.hot.stage(meta.length, Some(deadline)) {
                    Ok(block) => {
                        want.push(i);
                        bufs.push(block);
                    }
                    Err(_) => inc(&inner.hot_metrics.no_space),
                },
                Presence::Absent => inc(&m.misses),
                Presence::Failed(..) => inc(&m.errors),
            }
        }
        if want.is_empty() {
            return Vec::new();
        }
        let request = GetRequest {
            keys: want.iter().map(|&i| keys[i].clone()).collect(),
            bufs,
        };
        let started = Instant::now();
        let done = match plugin.get_wait(request, inner.settings.read_timeout) {
            Ok(d) => d,
            Err(e) => {
                inc(&m.errors);
                tier.breaker.failure(&format!("get: {e}"));
                tracing::warn!(target: "kvhost::chain", tier = %tier.name, "{e}");
                return Vec::new();
            }
        };
        m.get_latency.record(started.elapsed());
        let answered = done
            .items
            .iter()
            .any(|i| matches!(i, GetItem::Hit { .. } | GetItem::Miss));
        if answered {
            tier.breaker.success();
        } else {
            tier.breaker.failure("get: no item of the batch answered");
        }
        let mut out = Vec::new();
        let GetRequest {
            keys: got_keys,
            bufs,
        } = done.request;
        for ((item, block), (key, &i)) in done
            .items
            .into_iter()
            .zip(bufs)
            .zip(got_keys.iter().zip(&want))
        {
            match item {
                GetItem::Hit { len, meta } => {
                    inc(&m.hits);
                    inc(&m.promotions);
                    add(&m.bytes_out, len as u64);
                    out.push((i, inner.hot.commit(block, key, len as u64, meta)));
                }
                GetItem::Miss => inc(&m.misses),
                other => {
                    inc(&m.errors);
                    match &other {
                        GetItem::Failed(s, _) if *s == Status::CORRUPT => inc(&m.corrupt),
                        GetItem::Failed(s, _) if *s == Status::NO_RESULT => {
                            tier.unreported.log("get", key)
                        }
                        _ => {}
                    }
                    tracing::debug!(target: "kvhost::chain", tier = %tier.name, key = %key, "get: {other:?}");
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::{bytes, hot_only, key, put};

    #[test]
    fn a_get_returns_hits_in_order_and_none_for_misses() {
        let chain = hot_only(8 << 20);
        put(&chain, &key(1), 1, 1000);
        put(&chain, &key(3), 3, 3000);
        let got = chain.get(&[key(1), key(2), key(3)]);
        assert_eq!(got[0].as_ref().unwrap().bytes(), &bytes(1, 1000)[..]);
        assert!(got[1].is_none());
        assert_eq!(got[2].as_ref().unwrap().bytes(), &bytes(3, 3000)[..]);
        let hot = &chain.stats().tiers[0];
        assert_eq!((hot.hits, hot.misses, hot.bytes_out), (2, 1, 4000));
    }

    #[test]
    fn an_empty_get_asks_nothing() {
        let chain = hot_only(1 << 20);
        assert!(chain.get(&[]).is_empty());
        assert_eq!(chain.stats().tiers[0].misses, 0);
    }
}
