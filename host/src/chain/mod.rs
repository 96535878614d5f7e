//! The chain (LMCache's `StorageManager`): the hot cache first, then the plugins in config order.
//!
//! - **Put** ([`put`](put)) copies a chunk once, into an arena block, and commits it to the hot cache.
//!   With `write_through` the same block, borrowed, is queued to every plugin tier; it stays
//!   referenced until each has completed. With `write_back` only the hot cache keeps it, and eviction
//!   demotes it to the first tier.
//! - **Get** ([`get`](get)) reads the hot cache, then puts in flight, then each tier in order. A tier
//!   hit is read by the plugin straight into a new arena block, which becomes the promoted hot-cache
//!   entry.
//! - **Lookup** ([`lookup`](lookup)) is LMCache's tiered prefix walk; pins are held under a lookup id
//!   until `unpin` or the pin timeout.
//! - **Prefetch**, **remove**, **close** and **stats** each have their own file; [`lent`](lent) holds
//!   the operations on caller-lent buffers.
//! - No lock is held while a plugin runs; a failing plugin costs its own keys, never the call.

mod arena_bufs;
pub mod breaker;
mod breaker_probe;
mod close;
mod get;
mod inflight;
mod lent;
mod lookup;
pub mod metrics;
mod plugin_stats;
mod prefetch;
mod prefix;
mod put;
mod remove;
mod settings;
mod stats;
mod tier;
mod unreported;

pub use breaker::{BreakerSettings, BreakerState, BreakerStats};
pub use close::CloseReport;
pub use lent::{LentGetDone, LentPutItem};
pub use lookup::Lookup;
pub use metrics::{LatencySummary, TierStats};
pub use plugin_stats::TierPluginStats;
pub use prefetch::{PrefetchHandle, PrefetchResult};
pub use put::PutOutcome;
pub use settings::{ChainSettings, WritePolicy};
pub use stats::ChainStats;
pub use tier::{Backpressure, TierSettings};

use crate::cache::{CacheError, HotCache};
use crate::config::Config;
use crate::loader::{self, LoadError};
use crate::plugin::PluginBackend;
use inflight::PutsInFlight;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use tier::Tier;

/// Name of the hot-cache tier, as LMCache calls it.
pub const HOT_TIER: &str = "LocalCPUBackend";

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

/// What every clone of a chain shares.
struct Inner {
    hot: HotCache,
    tiers: Vec<Arc<Tier>>,
    inflight: Arc<PutsInFlight>,
    lent_puts: lent::LentPuts,
    settings: ChainSettings,
    hot_metrics: metrics::TierMetrics,
    pins: lookup::PinTable,
    prefetch: prefetch::PrefetchPool,
    demotions_dropped: Arc<AtomicU64>,
    closed: AtomicBool,
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
        let inflight = Arc::new(PutsInFlight::default());
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
        let pins = lookup::PinTable::new(tiers.len());
        if settings.write_policy == WritePolicy::WriteBack {
            put::demote_on_evict(&hot, &tiers, &inflight, &demotions_dropped);
        }
        let inner = Arc::new(Inner {
            hot,
            tiers,
            inflight,
            lent_puts: lent::LentPuts::default(),
            settings,
            hot_metrics: metrics::TierMetrics::default(),
            pins,
            prefetch: prefetch::PrefetchPool::default(),
            demotions_dropped,
            closed: AtomicBool::new(false),
        });
        lookup::start_pin_monitor(&inner);
        breaker_probe::start_monitor(&inner);
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

#[cfg(test)]
pub(crate) mod test_support;
