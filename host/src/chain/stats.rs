//! A snapshot of the whole chain's metrics.

use super::metrics::TierStats;
use super::{Chain, HOT_TIER};
use crate::cache::CacheSnapshot;
use std::sync::atomic::Ordering;

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

impl Chain {
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
            lookups: inner.pins.lookups.load(Ordering::Relaxed),
            forced_unpins: inner.pins.forced_unpins.load(Ordering::Relaxed),
            pinned_lookups: inner.pins.len() as u64,
            puts_in_flight: (inner.inflight.len() + inner.lent_puts.len()) as u64,
            demotions_dropped: inner.demotions_dropped.load(Ordering::Relaxed),
        }
    }
}
