//! Put: one copy into an arena block, committed to the hot cache; with write-through the same block is
//! queued to every plugin tier, with write-back eviction demotes it to the first tier.

use super::inflight::Inflight;
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
    inflight: &Arc<Inflight>,
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
            .map(|((k, d), m)| self.put_with(k, d.len(), *m, |dst| dst.copy_from_slice(d)))
            .collect()
    }
}
