//! The chain (LMCache's `StorageManager`): the hot cache first, then the plugins in config order.
//!
//! - **Put** copies a chunk once, into an arena block, and commits it to the hot cache. With
//!   `write_through` the same block, borrowed, is queued to every plugin tier; it stays referenced until
//!   each has completed. With `write_back` only the hot cache keeps it, and eviction demotes it to the
//!   first tier.
//! - **Get** reads the hot cache, then puts in flight, then each tier in order. A tier hit is read by the
//!   plugin straight into a new arena block, which becomes the promoted hot-cache entry.
//! - **Lookup** is LMCache's tiered prefix walk; pins are held under a lookup id until `unpin` or the pin
//!   timeout.
//! - No lock is held while a plugin runs; a failing plugin costs its own keys, never the call.

pub mod breaker;
mod inflight;
mod lent;
pub mod metrics;
mod tier;
mod unreported;

pub use breaker::{BreakerSettings, BreakerState, BreakerStats};
pub use lent::{LentGetDone, LentPutItem};
pub use metrics::{LatencySummary, TierStats};
pub use tier::{Backpressure, TierSettings};

use crate::cache::{
    CacheConfig, CacheError, CacheSnapshot, ChunkHandle, HotCache, PolicyKind, StagedBlock,
};
use crate::config::Config;
use crate::key::ChunkKey;
use crate::loader::{self, LoadError};
use crate::plugin::{GetItem, GetRequest, PluginBackend, Presence};
use inflight::Inflight;
use kvhost_plugin_sdk::{abi, ChunkMeta};
use metrics::{add, inc};
use parking_lot::{Condvar, Mutex};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tier::{PutJob, Tier};

/// Name of the hot-cache tier, as LMCache calls it.
pub const HOT_TIER: &str = "LocalCPUBackend";

/// Where puts go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WritePolicy {
    /// Every put goes to the hot cache and every tier (LMCache's behaviour).
    WriteThrough,
    /// Puts stay in the hot cache; eviction demotes them to the first tier.
    WriteBack,
}

/// Chain settings (from the config).
#[derive(Clone, Debug)]
pub struct ChainSettings {
    /// Hot-cache settings.
    pub cache: CacheConfig,
    /// Write policy.
    pub write_policy: WritePolicy,
    /// Per-tier queueing.
    pub tier: TierSettings,
    /// How long a get or prefetch waits for a tier.
    pub read_timeout: Duration,
    /// How long a promotion waits for hot-cache room while nothing is evictable (a get whose own
    /// handles fill the cache would otherwise wait for itself).
    pub promotion_wait: Duration,
    /// Lookup pins are released after this long.
    pub pin_timeout: Duration,
    /// How often the pin monitor looks.
    pub pin_check_interval: Duration,
    /// Per-tier circuit breaker.
    pub breaker: BreakerSettings,
}

impl ChainSettings {
    /// Settings from a config.
    pub fn from_config(config: &Config) -> ChainSettings {
        let hot_bytes = crate::config::machine::gib_to_bytes(config.max_local_cpu_size);
        let mut cache = CacheConfig::new(hot_bytes);
        cache.retain = config.local_cpu;
        cache.policy = config.cache_policy.parse().unwrap_or(PolicyKind::Lru);
        cache.arena.explicit_huge_pages = config.local_cpu_use_hugepages;
        cache.arena.prefault = config.local_cpu_prefault;
        ChainSettings {
            cache,
            write_policy: if config.write_policy == "write_back" {
                WritePolicy::WriteBack
            } else {
                WritePolicy::WriteThrough
            },
            tier: TierSettings {
                queue_depth: config.put_queue_depth,
                backpressure: if config.put_backpressure == "drop" {
                    Backpressure::Drop
                } else {
                    Backpressure::Block
                },
                max_batch: config.put_batch_size,
                max_batch_bytes: config.put_batch_bytes,
                max_inflight_batches: config.tier_max_inflight_batches,
                skip_existing: config.skip_existing_in_tiers,
                lookup_timeout: Duration::from_secs_f64(config.blocking_timeout_secs),
            },
            read_timeout: Duration::from_secs_f64(config.blocking_timeout_secs),
            promotion_wait: Duration::from_millis(config.promotion_wait_ms),
            pin_timeout: Duration::from_secs_f64(config.pin_timeout_sec),
            pin_check_interval: Duration::from_secs_f64(config.pin_check_interval_sec),
            breaker: BreakerSettings {
                failures: config.tier_breaker_failures,
                max_inflight_bytes: config.tier_max_inflight_bytes.unwrap_or(if hot_bytes > 0 {
                    hot_bytes / 2
                } else {
                    1 << 30
                }),
                put_deadline: Duration::from_secs_f64(config.tier_put_deadline_secs),
                probe_interval: Duration::from_secs_f64(config.tier_breaker_probe_secs),
            },
        }
    }
}

/// Why the chain could not be built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ChainError {
    /// A plugin failed to load.
    #[error(transparent)]
    Load(#[from] LoadError),
    /// The hot cache could not be created.
    #[error(transparent)]
    Cache(#[from] CacheError),
}

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

/// Where a lookup found the longest cached prefix.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Lookup {
    /// Length of the cached prefix, in chunks.
    pub hit_chunks: usize,
    /// The prefix split by tier, in walk order: `(tier name, keys)`.
    pub by_tier: Vec<(String, Vec<ChunkKey>)>,
}

/// What a prefetch achieved.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PrefetchResult {
    /// Keys asked for.
    pub requested: usize,
    /// Chunks in the hot cache when it finished (the cached prefix).
    pub arrived: usize,
    /// Of those, chunks promoted from plugin tiers.
    pub promoted: usize,
}

/// A prefetch running in the background.
#[derive(Clone)]
pub struct PrefetchHandle {
    shared: Arc<(Mutex<Option<PrefetchResult>>, Condvar)>,
}

impl PrefetchHandle {
    /// The result if finished.
    pub fn poll(&self) -> Option<PrefetchResult> {
        self.shared.0.lock().clone()
    }

    /// Wait up to `timeout` for the result.
    pub fn wait(&self, timeout: Duration) -> Option<PrefetchResult> {
        let deadline = Instant::now() + timeout;
        let mut r = self.shared.0.lock();
        while r.is_none() {
            if self.shared.1.wait_until(&mut r, deadline).timed_out() {
                break;
            }
        }
        r.clone()
    }

    fn finish(&self, result: PrefetchResult) {
        *self.shared.0.lock() = Some(result);
        self.shared.1.notify_all();
    }
}

/// What `close` did.
#[derive(Clone, Debug, Default)]
pub struct CloseReport {
    /// Puts that were still in flight when close began.
    pub in_flight_at_start: usize,
    /// Keys still in flight at the deadline, by name; empty when everything drained.
    pub unfinished: Vec<String>,
    /// Plugins destroyed, in order.
    pub destroyed: Vec<String>,
    /// Plugins whose worker was stuck at the deadline (destroyed anyway, which cancels their work).
    pub stuck: Vec<String>,
}

/// A snapshot of the whole chain's metrics.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct ChainStats {
    /// Hot-cache occupancy.
    #[serde(skip)]
    pub hot: CacheSnapshot,
    /// Per tier, hot cache first.
    pub tiers: Vec<TierStats>,
    /// Lookups served.
    pub lookups: u64,
    /// Lookup pins released by the pin timeout (LMCache's `forced_unpin_count`).
    pub forced_unpins: u64,
    /// Lookups holding pins now.
    pub pinned_lookups: u64,
    /// Puts in flight to tiers now.
    pub puts_in_flight: u64,
    /// Demotions dropped because the first tier's queue was full.
    pub demotions_dropped: u64,
}

struct LookupPins {
    since: Instant,
    hot: Vec<ChunkHandle>,
    tiers: Vec<(usize, Vec<ChunkKey>)>,
}

struct Inner {
    hot: HotCache,
    tiers: Vec<Arc<Tier>>,
    inflight: Arc<Inflight>,
    lent_puts: lent::LentPuts,
    settings: ChainSettings,
    hot_metrics: metrics::TierMetrics,
    pins: Mutex<HashMap<String, LookupPins>>,
    lookups: AtomicU64,
    forced_unpins: AtomicU64,
    demotions_dropped: Arc<AtomicU64>,
    closed: AtomicBool,
    stop: (Mutex<bool>, Condvar),
}

/// The storage chain. Cheap to clone; every method may be called from many threads at once.
#[derive(Clone)]
pub struct Chain {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Chain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Chain")
            .field("tiers", &self.tier_names())
            .finish()
    }
}

impl Chain {
    /// Load the config's plugins and build the chain.
    pub fn from_config(config: &Config) -> Result<Chain, ChainError> {
        let (plugins, _skipped) = loader::load_all(config)?;
        Chain::new(ChainSettings::from_config(config), plugins)
    }

    /// Build a chain over already loaded plugins (in lookup order).
    pub fn new(settings: ChainSettings, plugins: Vec<PluginBackend>) -> Result<Chain, ChainError> {
        let hot = HotCache::new(settings.cache.clone())?;
        let inflight = Arc::new(Inflight::default());
        let tiers: Vec<Arc<Tier>> = plugins
            .into_iter()
            .map(|p| {
                Tier::start(
                    p,
                    settings.tier.clone(),
                    settings.breaker.clone(),
                    inflight.clone(),
                )
            })
            .collect();
        let demotions_dropped = Arc::new(AtomicU64::new(0));
        if settings.write_policy == WritePolicy::WriteBack {
            if let Some(first) = tiers
                .iter()
                .find(|t| !t.has(abi::KVH_CAP_DISCARDS))
                .cloned()
            {
                let (inflight, dropped) = (inflight.clone(), demotions_dropped.clone());
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
        }
        let inner = Arc::new(Inner {
            hot,
            tiers,
            inflight,
            lent_puts: lent::LentPuts::default(),
            settings,
            hot_metrics: metrics::TierMetrics::default(),
            pins: Mutex::new(HashMap::new()),
            lookups: AtomicU64::new(0),
            forced_unpins: AtomicU64::new(0),
            demotions_dropped,
            closed: AtomicBool::new(false),
            stop: (Mutex::new(false), Condvar::new()),
        });
        let weak = Arc::downgrade(&inner);
        std::thread::Builder::new()
            .name("kvhost-pin-monitor".into())
            .spawn(move || pin_monitor(weak))
            .expect("spawn pin monitor");
        if !inner.tiers.is_empty() {
            let weak = Arc::downgrade(&inner);
            std::thread::Builder::new()
                .name("kvhost-breakers".into())
                .spawn(move || breaker_monitor(weak))
                .expect("spawn breaker monitor");
        }
        Ok(Chain { inner })
    }

    /// The hot cache.
    pub fn hot(&self) -> &HotCache {
        &self.inner.hot
    }

    /// The plugin backends in lookup order.
    pub fn plugins(&self) -> Vec<Arc<PluginBackend>> {
        self.inner.tiers.iter().filter_map(|t| t.plugin()).collect()
    }

    /// Tier names, hot cache first.
    pub fn tier_names(&self) -> Vec<String> {
        std::iter::once(HOT_TIER.to_string())
            .chain(self.inner.tiers.iter().map(|t| t.name.clone()))
            .collect()
    }

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
        let answered = done
            .items
            .iter()
            .any(|i| matches!(i, GetItem::Hit { .. } | GetItem::Miss));
        if answered {
            tier.breaker.success();
        } else {
            tier.breaker.failure("get: no item of the batch answered");
        }
        m.get_latency.record(started.elapsed());
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
                        GetItem::Failed(s, _) if *s == crate::plugin::Status::CORRUPT => {
                            inc(&m.corrupt)
                        }
                        GetItem::Failed(s, _) if *s == crate::plugin::Status::NO_RESULT => {
                            unreported::log(&tier.name, "get", key)
                        }
                        _ => {}
                    }
                    tracing::debug!(target: "kvhost::chain", tier = %tier.name, key = %key, "get: {other:?}");
                }
            }
        }
        out
    }

    /// LMCache's tiered prefix walk: how many leading keys are cached, and in which tier. With a
    /// `lookup_id`, the prefix is pinned until [`unpin`](Self::unpin) or the pin timeout.
    ///
    /// Tiers are asked in order, each about the keys left after the prefix found so far. Unlike
    /// LMCache's single pass, the walk starts again from the hot cache after a plugin tier made
    /// progress, so a prefix that alternates between tiers (say an older chunk only in a plugin, the
    /// next one only in the hot cache while its tier write is queued) is found whole.
    pub fn lookup(&self, keys: &[ChunkKey], pin: Option<&str>) -> Lookup {
        let inner = &self.inner;
        inc_u(&inner.lookups);
        let mut result = Lookup::default();
        let mut pins = LookupPins {
            since: Instant::now(),
            hot: Vec::new(),
            tiers: Vec::new(),
        };
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
            let old = inner.pins.lock().insert(id.to_string(), pins);
            if let Some(old) = old {
                self.release_pins(old);
            }
        }
        result
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
        let presence = match plugin.contains_wait(keys, want_pin, timeout) {
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

    fn release_pins(&self, pins: LookupPins) {
        release_pins(&self.inner, pins);
    }

    /// Release the pins of `lookup_id`; returns how many chunks were pinned.
    pub fn unpin(&self, lookup_id: &str) -> usize {
        let pins = self.inner.pins.lock().remove(lookup_id);
        match pins {
            Some(p) => {
                let n = p.hot.len() + p.tiers.iter().map(|(_, k)| k.len()).sum::<usize>();
                self.release_pins(p);
                n
            }
            None => 0,
        }
    }

    /// Load the cached prefix of `keys` into the hot cache in the background.
    pub fn prefetch(&self, keys: Vec<ChunkKey>) -> PrefetchHandle {
        let handle = PrefetchHandle {
            shared: Arc::new((Mutex::new(None), Condvar::new())),
        };
        let chain = self.clone();
        let h = handle.clone();
        let spawned = std::thread::Builder::new()
            .name("kvhost-prefetch".into())
            .spawn(move || {
                let lookup = chain.lookup(&keys, None);
                let prefix = &keys[..lookup.hit_chunks];
                let before = prefix
                    .iter()
                    .filter(|k| chain.inner.hot.contains(k))
                    .count();
                let got = chain.get(prefix);
                let arrived = got.iter().take_while(|h| h.is_some()).count();
                h.finish(PrefetchResult {
                    requested: keys.len(),
                    arrived,
                    promoted: arrived.saturating_sub(before),
                });
            });
        if spawned.is_err() {
            handle.finish(PrefetchResult::default());
        }
        handle
    }

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

    /// A snapshot of every tier's metrics.
    pub fn stats(&self) -> ChainStats {
        let inner = &self.inner;
        let hot = inner.hot.snapshot();
        let mut hot_stats = inner.hot_metrics.stats(HOT_TIER, 0);
        let c = inner.hot.counters();
        hot_stats.evictions = c.evictions.load(Ordering::Relaxed);
        hot_stats.no_space = c.no_space.load(Ordering::Relaxed);
        let mut tiers = vec![hot_stats];
        tiers.extend(inner.tiers.iter().map(|t| {
            let mut s = t.metrics.stats(&t.name, t.queue_depth() as u64);
            s.breaker = Some(t.breaker.stats());
            s
        }));
        ChainStats {
            hot,
            tiers,
            lookups: inner.lookups.load(Ordering::Relaxed),
            forced_unpins: inner.forced_unpins.load(Ordering::Relaxed),
            pinned_lookups: inner.pins.lock().len() as u64,
            puts_in_flight: (inner.inflight.len() + inner.lent_puts.len()) as u64,
            demotions_dropped: inner.demotions_dropped.load(Ordering::Relaxed),
        }
    }

    /// Stop taking puts, drain puts in flight up to `timeout`, then destroy the plugins in reverse
    /// order. Whatever did not finish is named in the report (and cancelled by the plugins' destroy).
    pub fn close(&self, timeout: Duration) -> CloseReport {
        let inner = &self.inner;
        let mut report = CloseReport::default();
        if inner.closed.swap(true, Ordering::AcqRel) {
            return report;
        }
        report.in_flight_at_start = inner.inflight.len() + inner.lent_puts.len();
        let deadline = Instant::now() + timeout;
        inner.hot.set_evict_hook(None);
        for t in &inner.tiers {
            t.close_queue();
        }
        let drained = inner.inflight.wait_empty(deadline);
        // Lent-buffer puts too: their callers have not been told yet whether they are stored.
        if !(drained && inner.lent_puts.wait_empty(deadline)) {
            report.unfinished = inner
                .inflight
                .keys()
                .iter()
                .chain(inner.lent_puts.keys().iter())
                .map(|k| k.to_string())
                .collect();
            report.unfinished.sort();
            report.unfinished.dedup();
            tracing::warn!(
                target: "kvhost::chain",
                "close: {} put(s) still in flight after {timeout:?}: {}",
                report.unfinished.len(),
                report.unfinished.join(", ")
            );
        }
        for t in &inner.tiers {
            t.abandon();
        }
        for t in inner.tiers.iter().rev() {
            if !t.join_finished(Instant::now() + Duration::from_millis(500)) {
                report.stuck.push(t.name.clone());
            }
        }
        let pins: Vec<LookupPins> = inner.pins.lock().drain().map(|(_, p)| p).collect();
        for p in pins {
            release_pins(inner, p);
        }
        {
            let mut stop = inner.stop.0.lock();
            *stop = true;
            inner.stop.1.notify_all();
        }
        // Destroy in reverse order. Each tier's plugin is destroyed when its last reference drops;
        // destroy completes whatever the plugin still holds.
        for t in inner.tiers.iter().rev() {
            report.destroyed.push(t.name.clone());
            t.destroy_plugin();
        }
        let _ = inner.inflight.clear();
        report
    }
}

fn inc_u(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
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

/// Trips breakers whose tier has a put past its deadline, and probes open ones.
fn breaker_monitor(inner: std::sync::Weak<Inner>) {
    loop {
        let Some(strong) = inner.upgrade() else {
            return;
        };
        {
            let mut stop = strong.stop.0.lock();
            if !*stop {
                let _ = strong.stop.1.wait_for(&mut stop, Duration::from_millis(50));
            }
            if *stop || strong.closed.load(Ordering::Acquire) {
                return;
            }
        }
        for tier in &strong.tiers {
            tier.breaker
                .tick(|| probe(tier, strong.settings.read_timeout));
        }
    }
}

/// A breaker's probe: the plugin's `health`, or, without one, a lookup of one key answered in time.
fn probe(tier: &Tier, timeout: Duration) -> Result<String, String> {
    let plugin = tier.plugin().ok_or("the tier is closed")?;
    match plugin.health() {
        Some(Ok(text)) => Ok(format!("health: {text}")),
        Some(Err(e)) => Err(e.to_string()),
        None => {
            let key = ChunkKey::new("kvhost/breaker-probe", 1, 0, 1, "bfloat16")
                .map_err(|e| e.to_string())?;
            plugin
                .contains_wait(&[key], false, timeout)
                .map(|_| "a lookup answered".to_string())
                .map_err(|e| e.to_string())
        }
    }
}

/// Releases lookup pins older than the pin timeout (LMCache's PinMonitor).
fn pin_monitor(inner: std::sync::Weak<Inner>) {
    loop {
        let Some(strong) = inner.upgrade() else {
            return;
        };
        let interval = strong
            .settings
            .pin_check_interval
            .max(Duration::from_millis(10));
        {
            let mut stop = strong.stop.0.lock();
            if *stop {
                return;
            }
            let _ = strong.stop.1.wait_for(&mut stop, interval);
            if *stop {
                return;
            }
        }
        let timeout = strong.settings.pin_timeout;
        let expired: Vec<(String, LookupPins)> = {
            let mut pins = strong.pins.lock();
            let old: Vec<String> = pins
                .iter()
                .filter(|(_, p)| p.since.elapsed() >= timeout)
                .map(|(k, _)| k.clone())
                .collect();
            old.into_iter()
                .filter_map(|k| pins.remove(&k).map(|p| (k, p)))
                .collect()
        };
        for (id, p) in expired {
            strong.forced_unpins.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(target: "kvhost::chain", "lookup `{id}` held its pins past {timeout:?}; released");
            release_pins(&strong, p);
        }
        // Pins of lookups that completed after the chain stopped waiting, should no lookup come by.
        for tier in &strong.tiers {
            if let Some(plugin) = tier.plugin() {
                plugin.release_orphan_pins();
            }
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        if !self.closed.load(Ordering::Acquire) {
            for t in &self.tiers {
                t.close_queue();
                t.abandon();
            }
        }
    }
}
