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

#[cfg(test)]
mod tests {
    use super::super::test_support::{hot_only, key, put};
    use super::*;

    #[test]
    fn stats_count_lookups_and_name_the_hot_tier_first() {
        let chain = hot_only(8 << 20);
        put(&chain, &key(1), 1, 100);
        chain.lookup(&[key(1)], None);
        chain.lookup(&[key(2)], None);
        let s = chain.stats();
        assert_eq!(s.lookups, 2);
        assert_eq!(s.tiers.len(), 1);
        assert_eq!(s.tiers[0].name, HOT_TIER);
        assert_eq!(s.hot.entries, 1);
        assert_eq!(
            (s.puts_in_flight, s.demotions_dropped, s.forced_unpins),
            (0, 0, 0)
        );
    }
}
