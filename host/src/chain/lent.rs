//! Operations on buffers the caller lends (the Python binding's data path): plugins read and write the
//! caller's memory directly, so a chunk crosses no extra copy between the engine and the plugin.
//!
//! - **Put** with the hot cache retaining (`local_cpu: true`) copies into the arena once and goes
//!   the usual write-through way. Without it, every plugin tier reads the caller's buffer at once and
//!   the put completes when the last tier has: `B: Clone` gives each tier its own reference.
//! - **Get** copies hot-cache hits into the caller's buffer, then asks the tiers in order, each for the
//!   keys still missing, straight into the caller's buffers. Nothing is promoted: the caller holds the
//!   bytes.
//! - **Exists** and **remove** walk the tiers asynchronously too.
//!
//! Every operation reports through `on_done` exactly once, on a plugin thread or on the caller's, and
//! only after every plugin has given the caller's buffers back: nothing is reported free while a plugin
//! may still touch it. A plugin that never completes keeps its operation (and buffers) pending until
//! `close` destroys it, which completes everything it holds.

use super::metrics::{add, inc};
use super::tier::Tier;
use super::{Chain, PutOutcome};
use crate::key::ChunkKey;
use crate::plugin::{
    DstBuf, GetItem, GetRequest, PluginBackend, Presence, PutRequest, SrcBuf, Status,
};
use kvhost_plugin_sdk::{abi, ChunkMeta};
use parking_lot::{Condvar, Mutex};
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

/// Keys with a lent-buffer put in flight (LMCache's `exists_in_put_tasks` for those puts), with the
/// number of puts of each.
#[derive(Default)]
pub(crate) struct LentPuts {
    keys: Mutex<HashMap<ChunkKey, u32>>,
    drained: Condvar,
}

impl LentPuts {
    fn begin(&self, keys: &[ChunkKey]) {
        let mut map = self.keys.lock();
        for k in keys {
            *map.entry(k.clone()).or_insert(0) += 1;
        }
    }

    fn end(&self, keys: &[ChunkKey]) {
        let mut map = self.keys.lock();
        for k in keys {
            if let Some(n) = map.get_mut(k) {
                *n -= 1;
                if *n == 0 {
                    map.remove(k);
                }
            }
        }
        if map.is_empty() {
            self.drained.notify_all();
        }
    }

    pub(crate) fn contains(&self, key: &ChunkKey) -> bool {
        self.keys.lock().contains_key(key)
    }

    pub(crate) fn len(&self) -> usize {
        self.keys.lock().len()
    }

    /// Wait until no lent put is in flight; false at the deadline.
    pub(crate) fn wait_empty(&self, deadline: Instant) -> bool {
        let mut map = self.keys.lock();
        while !map.is_empty() {
            if self.drained.wait_until(&mut map, deadline).timed_out() {
                return map.is_empty();
            }
        }
        true
    }

    /// Keys still in flight.
    pub(crate) fn keys(&self) -> Vec<ChunkKey> {
        self.keys.lock().keys().cloned().collect()
    }
}

/// The end of a lent-buffer get.
#[derive(Debug)]
pub struct LentGetDone<B> {
    /// The caller's buffers, in request order; no plugin holds them any more.
    pub bufs: Vec<B>,
    /// Per chunk. `Miss` when no tier has it; a tier's failure is kept only if no later tier has it.
    pub items: Vec<GetItem>,
}

/// Per key of a lent-buffer put: stored, or why not (naming the tier).
pub type LentPutItem = Result<(), String>;

impl Chain {
    /// Whether a put of `key` is in flight on any path (arena write-through or lent buffers).
    pub fn put_in_flight(&self, key: &ChunkKey) -> bool {
        self.inner.inflight.contains(key) || self.inner.lent_puts.contains(key)
    }

    /// Store chunks from the caller's buffers. See the module doc for the two paths. `on_done` gets
    /// one item per key once every tier has finished with the buffers.
    pub fn put_lent<B, F>(
        &self,
        keys: Vec<ChunkKey>,
        bufs: Vec<B>,
        metas: Vec<ChunkMeta>,
        on_done: F,
    ) where
        B: SrcBuf + Clone,
        F: FnOnce(Vec<LentPutItem>) + Send + 'static,
    {
        let n = keys.len();
        if bufs.len() != n || metas.len() != n {
            return on_done(vec![
                Err("keys, buffers and metadata differ in length".into());
                n
            ]);
        }
        let inner = &self.inner;
        if inner.closed.load(Ordering::Acquire) {
            return on_done(vec![Err("the chain is closed".into()); n]);
        }
        if !inner.settings.cache.retain && inner.tiers.is_empty() {
            let why = "the chain keeps nothing: no plugin tier and no hot cache (local_cpu: false)";
            return on_done(vec![Err(why.into()); n]);
        }
        if inner.settings.cache.retain {
            let items = keys
                .iter()
                .zip(&bufs)
                .zip(&metas)
                .map(|((k, b), m)| {
                    let src = b.bytes();
                    match self.put_with(k, src.len(), *m, |dst| inner.hot.copy(dst, src)) {
                        PutOutcome::Stored | PutOutcome::Duplicate => Ok(()),
                        PutOutcome::NoSpace(e) => Err(e.to_string()),
                        PutOutcome::Closed => Err("the chain is closed".into()),
                    }
                })
                .collect();
            return on_done(items);
        }
        let metas: Vec<ChunkMeta> = metas
            .into_iter()
            .zip(&bufs)
            .map(|(m, b)| ChunkMeta {
                length: b.bytes().len() as u64,
                ..m
            })
            .collect();
        let tiers: Vec<(Arc<Tier>, _)> = inner
            .tiers
            .iter()
            .filter(|t| t.breaker.allow())
            .filter_map(|t| t.plugin().map(|p| (t.clone(), p)))
            .collect();
        if tiers.is_empty() {
            let why = if inner.closed.load(std::sync::atomic::Ordering::Acquire) {
                "the chain is closed"
            } else {
                "every tier is skipped: its circuit breaker is open"
            };
            return on_done(vec![Err(why.into()); n]);
        }
        inner.lent_puts.begin(&keys);
        let join = Arc::new(PutJoin {
            chain: self.clone(),
            keys: keys.clone(),
            state: Mutex::new((tiers.len(), vec![Ok(()); n], Some(on_done))),
        });
        for (tier, plugin) in tiers {
            let join = join.clone();
            let request = PutRequest {
                keys: keys.clone(),
                bufs: bufs.clone(),
                metas: metas.clone(),
            };
            let started = Instant::now();
            add(&tier.metrics.puts_in_flight, n as u64);
            // Timed by the tier's breaker, like the chain's own puts.
            let batch_id = tier.breaker.batch_started();
            plugin.put(request, move |done| {
                let m = &tier.metrics;
                m.put_latency.record(started.elapsed());
                m.puts_in_flight.fetch_sub(n as u64, Ordering::Relaxed);
                tier.breaker.batch_done(batch_id);
                let mut failed = Vec::new();
                for (i, status) in done.items.iter().enumerate() {
                    match *status {
                        Status::OK => {
                            inc(&m.puts);
                            add(&m.bytes_in, done.request.bufs[i].bytes().len() as u64);
                        }
                        other => {
                            if other == Status::NO_SPACE {
                                inc(&m.no_space);
                            } else {
                                inc(&m.errors);
                            }
                            if other == Status::NO_RESULT {
                                tier.unreported.log("put", &done.request.keys[i]);
                            }
                            let why = done.error.as_ref().map(|e| format!(": {e}"));
                            failed.push((
                                i,
                                format!("tier `{}`: {other}{}", tier.name, why.unwrap_or_default()),
                            ));
                        }
                    }
                }
                if failed.len() < n {
                    tier.breaker.success();
                } else if !failed.is_empty() {
                    tier.breaker
                        .failure(&format!("lent put of {n} chunk(s): all failed"));
                }
                // The buffers go back before the join can report them free.
                drop(done);
                join.tier_done(failed);
            });
        }
    }

    /// Read chunks into the caller's buffers (see the module doc). A buffer smaller than its chunk gets
    /// `TooSmall`, never a truncated chunk.
    pub fn get_lent<B, F>(&self, keys: Vec<ChunkKey>, bufs: Vec<B>, on_done: F)
    where
        B: DstBuf,
        F: FnOnce(LentGetDone<B>) + Send + 'static,
    {
        let n = keys.len();
        let mut bufs = bufs;
        if bufs.len() != n {
            let why = "keys and buffers differ in length".to_string();
            return on_done(LentGetDone {
                bufs,
                items: vec![GetItem::Failed(Status::INVALID_ARG, why); n],
            });
        }
        let inner = &self.inner;
        let mut items: Vec<Option<GetItem>> = vec![None; n];
        if inner.closed.load(Ordering::Acquire) {
            let why = "the chain is closed".to_string();
            return on_done(LentGetDone {
                bufs,
                items: vec![GetItem::Failed(Status::CANCELED, why); n],
            });
        }
        let started = Instant::now();
        let m = &inner.hot_metrics;
        for (i, key) in keys.iter().enumerate() {
            let Some(h) = inner.hot.get(key).or_else(|| inner.inflight.get(key)) else {
                continue;
            };
            let dst = bufs[i].bytes_mut();
            items[i] = Some(if dst.len() < h.len() {
                GetItem::TooSmall {
                    needed: h.len() as u64,
                }
            } else {
                inner.hot.copy(&mut dst[..h.len()], h.bytes());
                inc(&m.hits);
                add(&m.bytes_out, h.len() as u64);
                GetItem::Hit {
                    len: h.len(),
                    meta: h.meta(),
                }
            });
        }
        if inner.settings.cache.retain {
            let misses = items.iter().filter(|i| i.is_none()).count();
            add(&m.misses, misses as u64);
            m.get_latency.record(started.elapsed());
        }
        let op = GetOp {
            chain: self.clone(),
            keys,
            bufs: bufs.into_iter().map(Some).collect(),
            failures: vec![None; n],
            items,
            on_done,
        };
        op.next_tier(0);
    }

    /// Which keys are stored anywhere in the chain (hot cache, arena puts in flight, then each tier for
    /// the keys not found yet), without blocking in a plugin that has `contains_async`.
    pub fn exists_lent<F>(&self, keys: Vec<ChunkKey>, on_done: F)
    where
        F: FnOnce(Vec<Presence>) + Send + 'static,
    {
        let inner = &self.inner;
        let items: Vec<Option<Presence>> = keys
            .iter()
            .map(|k| {
                // A lent put still in flight is not readable yet: `put_in_flight` says so instead.
                inner
                    .hot
                    .get(k)
                    .or_else(|| inner.inflight.get(k))
                    .map(|h| Presence::Present(h.meta()))
            })
            .collect();
        ExistsOp {
            chain: self.clone(),
            keys,
            items,
            on_done,
        }
        .next_tier(0);
    }

    /// Remove keys from the hot cache and every tier at once; `on_done` gets, per key, whether any
    /// tier held it, once every tier has answered. A write-through put of one of these keys still
    /// queued from the hot cache is waited for first (up to the read timeout), so it cannot bring the
    /// key back; that wait is the only one, and only with a hot cache.
    pub fn remove_lent<F>(&self, keys: Vec<ChunkKey>, on_done: F)
    where
        F: FnOnce(Vec<bool>) + Send + 'static,
    {
        let inner = &self.inner;
        let deadline = Instant::now() + inner.settings.read_timeout;
        for k in &keys {
            if inner.inflight.contains(k) && !inner.inflight.wait_key(k, deadline) {
                tracing::warn!(target: "kvhost::chain", key = %k, "remove: a put of this key is still in flight");
            }
        }
        let removed: Vec<bool> = keys.iter().map(|k| inner.hot.remove(k)).collect();
        let plugins: Vec<_> = inner
            .tiers
            .iter()
            .filter_map(|t| t.plugin().map(|p| (t.clone(), p)))
            .collect();
        if plugins.is_empty() {
            return on_done(removed);
        }
        let join = Arc::new(Mutex::new((plugins.len(), removed, Some(on_done))));
        for (tier, plugin) in plugins {
            let join = join.clone();
            plugin.remove_async(keys.clone(), true, move |done| {
                if let Some(e) = &done.error {
                    inc(&tier.metrics.errors);
                    tracing::warn!(target: "kvhost::chain", tier = %tier.name, "{e}");
                }
                let finished = {
                    let mut j = join.lock();
                    for (i, s) in done.items.iter().enumerate() {
                        j.1[i] |= *s == Status::OK;
                    }
                    j.0 -= 1;
                    (j.0 == 0).then(|| (std::mem::take(&mut j.1), j.2.take()))
                };
                if let Some((removed, Some(f))) = finished {
                    f(removed);
                }
            });
        }
    }
}

/// Joins the tiers of one lent put.
struct PutJoin<F> {
    chain: Chain,
    keys: Vec<ChunkKey>,
    /// Tiers still running, per-key results, and the callback.
    state: Mutex<(usize, Vec<LentPutItem>, Option<F>)>,
}

impl<F: FnOnce(Vec<LentPutItem>)> PutJoin<F> {
    fn tier_done(&self, failed: Vec<(usize, String)>) {
        let finished = {
            let mut s = self.state.lock();
            for (i, why) in failed {
                if s.1[i].is_ok() {
                    s.1[i] = Err(why);
                }
            }
            s.0 -= 1;
            (s.0 == 0).then(|| (std::mem::take(&mut s.1), s.2.take()))
        };
        if let Some((items, Some(f))) = finished {
            self.chain.inner.lent_puts.end(&self.keys);
            f(items);
        }
    }
}

/// The first tier from `t` on that can be read (it keeps data, and close has not released it).
fn readable_tier(chain: &Chain, t: usize) -> Option<(usize, Arc<Tier>, Arc<PluginBackend>)> {
    let tiers = &chain.inner.tiers;
    (t..tiers.len()).find_map(|t| {
        let tier = &tiers[t];
        if tier.has(abi::KVH_CAP_DISCARDS) || !tier.breaker.allow() {
            return None;
        }
        tier.plugin().map(|p| (t, tier.clone(), p))
    })
}

/// A lent get walking the tiers.
struct GetOp<B, F> {
    chain: Chain,
    keys: Vec<ChunkKey>,
    bufs: Vec<Option<B>>,
    /// Final outcome per key; `None` while still missing.
    items: Vec<Option<GetItem>>,
    /// The first tier failure per key, reported only if no later tier has the key.
    failures: Vec<Option<GetItem>>,
    on_done: F,
}

impl<B: DstBuf, F: FnOnce(LentGetDone<B>) + Send + 'static> GetOp<B, F> {
    /// Ask tier `t` (or the first usable one after it) for the keys still missing, or finish.
    fn next_tier(mut self, t: usize) {
        let missing: Vec<usize> = (0..self.keys.len())
            .filter(|&i| self.items[i].is_none())
            .collect();
        let next = readable_tier(&self.chain, t).filter(|_| !missing.is_empty());
        let Some((t, tier, plugin)) = next else {
            return self.finish();
        };
        let request = GetRequest {
            keys: missing.iter().map(|&i| self.keys[i].clone()).collect(),
            bufs: missing
                .iter()
                .map(|&i| self.bufs[i].take().expect("a missing key's buffer is here"))
                .collect(),
        };
        let started = Instant::now();
        plugin.get(request, move |done| {
            let m = &tier.metrics;
            m.get_latency.record(started.elapsed());
            let answered = done.items.iter().any(|i| {
                matches!(
                    i,
                    GetItem::Hit { .. } | GetItem::Miss | GetItem::TooSmall { .. }
                )
            });
            if answered {
                tier.breaker.success();
            } else {
                tier.breaker
                    .failure("lent get: no item of the batch answered");
            }
            let keys = done.request.keys;
            for (((&i, item), buf), key) in missing
                .iter()
                .zip(done.items)
                .zip(done.request.bufs)
                .zip(&keys)
            {
                self.bufs[i] = Some(buf);
                match item {
                    GetItem::Hit { len, .. } => {
                        inc(&m.hits);
                        add(&m.bytes_out, len as u64);
                        self.items[i] = Some(item);
                    }
                    GetItem::Miss => inc(&m.misses),
                    GetItem::TooSmall { .. } => self.items[i] = Some(item),
                    GetItem::Failed(status, why) => {
                        inc(&m.errors);
                        if status == Status::CORRUPT {
                            inc(&m.corrupt);
                        } else if status == Status::NO_RESULT {
                            tier.unreported.log("get", key);
                        }
                        let why = match (&done.error, why.is_empty()) {
                            (Some(e), true) => e.to_string(),
                            _ => format!("tier `{}`: {why}", tier.name),
                        };
                        // A later tier may still have it; the failure stands only if none does.
                        if self.failures[i].is_none() {
                            self.failures[i] = Some(GetItem::Failed(status, why));
                        }
                    }
                }
            }
            self.next_tier(t + 1);
        });
    }

    fn finish(self) {
        let items = self
            .items
            .into_iter()
            .zip(self.failures)
            .map(|(item, failure)| item.or(failure).unwrap_or(GetItem::Miss))
            .collect();
        let bufs = self
            .bufs
            .into_iter()
            .map(|b| b.expect("every buffer is back"))
            .collect();
        (self.on_done)(LentGetDone { bufs, items });
    }
}

/// A lent exists walking the tiers.
struct ExistsOp<F> {
    chain: Chain,
    keys: Vec<ChunkKey>,
    items: Vec<Option<Presence>>,
    on_done: F,
}

impl<F: FnOnce(Vec<Presence>) + Send + 'static> ExistsOp<F> {
    fn next_tier(mut self, t: usize) {
        let missing: Vec<usize> = (0..self.keys.len())
            .filter(|&i| !matches!(self.items[i], Some(Presence::Present(_))))
            .collect();
        let next = readable_tier(&self.chain, t).filter(|_| !missing.is_empty());
        let Some((t, tier, plugin)) = next else {
            let items = self
                .items
                .into_iter()
                .map(|p| p.unwrap_or(Presence::Absent))
                .collect();
            return (self.on_done)(items);
        };
        let keys = missing.iter().map(|&i| self.keys[i].clone()).collect();
        let started = Instant::now();
        plugin.contains_async(keys, false, move |done| {
            tier.metrics.lookup_latency.record(started.elapsed());
            for (&i, p) in missing.iter().zip(done.items) {
                match p {
                    Presence::Present(_) => self.items[i] = Some(p),
                    Presence::Absent => {}
                    Presence::Failed(status, why) => {
                        inc(&tier.metrics.errors);
                        if self.items[i].is_none() {
                            let why = format!("tier `{}`: {status} {why}", tier.name);
                            self.items[i] = Some(Presence::Failed(status, why));
                        }
                    }
                }
            }
            self.next_tier(t + 1);
        });
    }
}
