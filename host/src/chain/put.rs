//! Put: one copy into an arena block, committed to the hot cache; with write-through the same block is
//! queued to every plugin tier, with write-back eviction demotes it to the first tier.

use super::inflight::PutsInFlight;
use super::metrics::{add, inc};
use super::tier::{PutJob, Tier};
use super::{Chain, WritePolicy};
use crate::cache::{CacheError, ChunkHandle, HotCache};
use crate::key::ChunkKey;
use kvhost_plugin_sdk::{abi, ChunkMeta};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// The outcome of putting one chunk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PutOutcome {
    /// Copied into the hot cache (or staged) and queued to the tiers.
    Stored,
    /// Already cached or already being stored; nothing copied.
    Duplicate,
    /// The hot cache had no evictable room: nothing stored (counted).
    NoSpace(CacheError),
    /// The chain is closed.
    Closed,
}

/// Write-back: the hot cache's evictions are queued to the first tier that keeps what it stores
/// (without blocking the evicting thread; a full queue drops the demotion and counts it).
pub(super) fn demote_on_evict(
    hot: &HotCache,
    tiers: &[Arc<Tier>],
    inflight: &Arc<PutsInFlight>,
    dropped: &Arc<AtomicU64>,
) {
    let Some(first) = tiers
        .iter()
        .find(|t| !t.has(abi::KVH_CAP_DISCARDS))
        .cloned()
    else {
        return;
    };
    let (inflight, dropped) = (inflight.clone(), dropped.clone());
    hot.set_evict_hook(Some(Box::new(move |key: ChunkKey, handle: ChunkHandle| {
        if !inflight.begin(&key, &handle, 1) {
            return;
        }
        let meta = handle.meta();
        if !first.submit(
            PutJob {
                key: key.clone(),
                handle,
                meta,
                demotion: true,
            },
            false,
        ) {
            dropped.fetch_add(1, Ordering::Relaxed);
            inflight.done(&key);
        }
    })));
}

impl Chain {
    /// Store one chunk whose bytes `fill` writes into the arena block (exactly `len` bytes). Nothing is
    /// copied when the key is cached or in flight already.
    pub fn put_with(
        &self,
        key: &ChunkKey,
        len: usize,
        meta: ChunkMeta,
        fill: impl FnOnce(&mut [u8]),
    ) -> PutOutcome {
        match self.try_put_with(key, len, meta, |dst| {
            fill(dst);
            Ok::<(), std::convert::Infallible>(())
        }) {
            Ok(outcome) => outcome,
            Err(never) => match never {},
        }
    }

    /// [`put_with`](Self::put_with) with a fill that may fail (say, a socket read): on `Err` nothing is
    /// stored and the block is freed. `fill` is not called for `Duplicate`, `NoSpace` or `Closed`.
    pub fn try_put_with<E>(
        &self,
        key: &ChunkKey,
        len: usize,
        meta: ChunkMeta,
        fill: impl FnOnce(&mut [u8]) -> Result<(), E>,
    ) -> Result<PutOutcome, E> {
        let inner = &self.inner;
        if inner.closed.load(Ordering::Acquire) {
            return Ok(PutOutcome::Closed);
        }
        if (inner.settings.cache.retain && inner.hot.contains(key)) || inner.inflight.contains(key)
        {
            inc(&inner.hot_metrics.put_skipped);
            return Ok(PutOutcome::Duplicate);
        }
        // Write-back may have to wait for demotions to free room; write-through never waits.
        let deadline = match inner.settings.write_policy {
            WritePolicy::WriteBack => Some(Instant::now() + inner.settings.read_timeout),
            WritePolicy::WriteThrough => None,
        };
        let mut staged = match inner.hot.stage(len as u64, deadline) {
            Ok(s) => s,
            Err(e) => {
                inc(&inner.hot_metrics.no_space);
                return Ok(PutOutcome::NoSpace(e));
            }
        };
        let started = Instant::now();
        fill(&mut staged.as_mut_slice()[..len])?;
        let meta = ChunkMeta {
            length: len as u64,
            ..meta
        };
        let handle = inner.hot.commit(staged, key, len as u64, meta);
        inc(&inner.hot_metrics.puts);
        add(&inner.hot_metrics.bytes_in, len as u64);
        inner.hot_metrics.put_latency.record(started.elapsed());
        if inner.settings.write_policy == WritePolicy::WriteThrough && !inner.tiers.is_empty() {
            let n = inner.tiers.len() as u32;
            if inner.inflight.begin(key, &handle, n) {
                for tier in &inner.tiers {
                    let job = PutJob {
                        key: key.clone(),
                        handle: handle.clone(),
                        meta,
                        demotion: false,
                    };
                    if !tier.submit(job, true) {
                        inner.inflight.done(key);
                    }
                }
            }
        }
        Ok(PutOutcome::Stored)
    }

    /// Store chunks, copying each from `data[i]` (put-with-copy). Per chunk outcome.
    pub fn put(&self, keys: &[ChunkKey], data: &[&[u8]], metas: &[ChunkMeta]) -> Vec<PutOutcome> {
        assert!(
            keys.len() == data.len() && keys.len() == metas.len(),
            "keys, data and metas differ in length"
        );
        keys.iter()
            .zip(data)
            .zip(metas)
            .map(|((k, d), m)| self.put_with(k, d.len(), *m, |dst| self.inner.hot.copy(dst, d)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::{bytes, hot_only, key, put};
    use super::*;

    #[test]
    fn a_put_is_stored_once_and_a_repeat_is_a_duplicate() {
        let chain = hot_only(8 << 20);
        assert_eq!(put(&chain, &key(1), 1, 5000), PutOutcome::Stored);
        assert_eq!(put(&chain, &key(1), 2, 5000), PutOutcome::Duplicate);
        let got = chain.get(&[key(1)]);
        assert_eq!(got[0].as_ref().unwrap().bytes(), &bytes(1, 5000)[..]);
        let s = chain.stats();
        assert_eq!((s.tiers[0].puts, s.tiers[0].put_skipped), (1, 1));
        assert_eq!(s.tiers[0].bytes_in, 5000);
    }

    #[test]
    fn a_failing_fill_stores_nothing_and_frees_the_block() {
        let chain = hot_only(8 << 20);
        let r = chain.try_put_with(&key(2), 4096, ChunkMeta::default(), |_| {
            Err("socket closed")
        });
        assert_eq!(r, Err("socket closed"));
        assert!(!chain.hot().contains(&key(2)));
        assert_eq!(chain.hot().snapshot().allocated_bytes, 0);
    }

    #[test]
    fn a_put_into_a_cache_full_of_pinned_chunks_is_no_space() {
        let chain = hot_only(1 << 20);
        let big = put(&chain, &key(3), 3, 4 << 20);
        assert!(matches!(big, PutOutcome::NoSpace(_)), "{big:?}");
        for k in 10..14 {
            assert_eq!(put(&chain, &key(k), k, 256 << 10), PutOutcome::Stored);
        }
        let pinned = chain.lookup(&[key(10), key(11), key(12), key(13)], Some("hold"));
        assert_eq!(pinned.hit_chunks, 4);
        let full = put(&chain, &key(20), 20, 256 << 10);
        assert!(matches!(full, PutOutcome::NoSpace(_)), "{full:?}");
        assert!(chain.stats().tiers[0].no_space >= 1);
        assert_eq!(chain.unpin("hold"), 4);
        assert_eq!(put(&chain, &key(20), 20, 256 << 10), PutOutcome::Stored);
    }

    #[test]
    fn a_put_after_close_is_refused() {
        let chain = hot_only(1 << 20);
        chain.close(std::time::Duration::from_millis(100));
        assert_eq!(put(&chain, &key(4), 4, 100), PutOutcome::Closed);
    }

    #[test]
    fn the_stored_length_overrides_the_callers_metadata() {
        let chain = hot_only(1 << 20);
        let meta = ChunkMeta {
            length: 1,
            ..ChunkMeta::default()
        };
        chain.put_with(&key(5), 300, meta, |dst| dst.fill(7));
        assert_eq!(chain.get(&[key(5)])[0].as_ref().unwrap().meta().length, 300);
    }
}
