//! Per-tier metrics. Counters are atomics; latencies go into HDR histograms (microseconds) behind a
//! lock taken once per completed operation.

use hdrhistogram::Histogram;
use parking_lot::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// A latency histogram in microseconds (1 µs to 1 h, 3 significant digits).
#[derive(Debug)]
pub struct Latency(Mutex<Histogram<u64>>);

impl Default for Latency {
    fn default() -> Self {
        Latency(Mutex::new(
            Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid histogram bounds"),
        ))
    }
}

impl Latency {
    /// Record one operation.
    pub fn record(&self, d: Duration) {
        let us = (d.as_micros() as u64).clamp(1, 3_600_000_000);
        let _ = self.0.lock().record(us);
    }

    /// Summary: count, p50, p99, max (µs).
    pub fn summary(&self) -> LatencySummary {
        let h = self.0.lock();
        LatencySummary {
            count: h.len(),
            p50_us: h.value_at_quantile(0.5),
            p99_us: h.value_at_quantile(0.99),
            max_us: h.max(),
            mean_us: h.mean(),
        }
    }

    /// A copy of the histogram (for exporters).
    pub fn histogram(&self) -> Histogram<u64> {
        self.0.lock().clone()
    }
}

/// Latency quantiles.
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize)]
pub struct LatencySummary {
    /// Operations recorded.
    pub count: u64,
    /// Median, µs.
    pub p50_us: u64,
    /// 99th percentile, µs.
    pub p99_us: u64,
    /// Maximum, µs.
    pub max_us: u64,
    /// Mean, µs.
    pub mean_us: f64,
}

/// Counters of one tier (plugin) of the chain.
#[derive(Debug, Default)]
pub struct TierMetrics {
    /// Keys found by get.
    pub hits: AtomicU64,
    /// Keys looked for by get and not found.
    pub misses: AtomicU64,
    /// Bytes stored into the tier.
    pub bytes_in: AtomicU64,
    /// Bytes read from the tier (promotions).
    pub bytes_out: AtomicU64,
    /// Chunks stored.
    pub puts: AtomicU64,
    /// Chunks skipped because the tier already held them.
    pub put_skipped: AtomicU64,
    /// Chunks dropped because the tier's queue was full (backpressure `drop`).
    pub put_dropped: AtomicU64,
    /// Chunks the tier refused for lack of space.
    pub no_space: AtomicU64,
    /// Item or call errors.
    pub errors: AtomicU64,
    /// Get items the plugin reported `CORRUPT` (its integrity check failed; the bytes were not used).
    pub corrupt: AtomicU64,
    /// Chunks promoted from this tier into the hot cache.
    pub promotions: AtomicU64,
    /// Chunks demoted into this tier by write-back eviction.
    pub demotions: AtomicU64,
    /// Chunks queued or being stored right now (gauge).
    pub puts_in_flight: AtomicU64,
    /// Put batch latency.
    pub put_latency: Latency,
    /// Get batch latency.
    pub get_latency: Latency,
    /// Lookup (contains) latency.
    pub lookup_latency: Latency,
}

/// Add one to a counter.
pub(crate) fn inc(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// Add `n` to a counter.
pub(crate) fn add(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

/// Read a counter.
pub(crate) fn get(c: &AtomicU64) -> u64 {
    c.load(Ordering::Relaxed)
}

/// A point-in-time copy of one tier's metrics.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct TierStats {
    /// Tier name (`LocalCPUBackend` or the plugin's configured name).
    pub name: String,
    /// Get hits.
    pub hits: u64,
    /// Get misses.
    pub misses: u64,
    /// Bytes stored.
    pub bytes_in: u64,
    /// Bytes read.
    pub bytes_out: u64,
    /// Chunks stored.
    pub puts: u64,
    /// Chunks skipped (already present).
    pub put_skipped: u64,
    /// Chunks dropped by backpressure.
    pub put_dropped: u64,
    /// No-space refusals.
    pub no_space: u64,
    /// Errors.
    pub errors: u64,
    /// Get items reported `CORRUPT` by the plugin (not used).
    pub corrupt: u64,
    /// The tier's circuit breaker (plugin tiers only).
    pub breaker: Option<super::breaker::BreakerStats>,
    /// Evictions: the hot cache's own, or what a plugin tier reports through `stats` (0 without it).
    pub evictions: u64,
    /// Promotions out of this tier.
    pub promotions: u64,
    /// Demotions into this tier.
    pub demotions: u64,
    /// Queue depth right now.
    pub queue_depth: u64,
    /// Puts in flight right now.
    pub puts_in_flight: u64,
    /// Put latency.
    pub put_latency: LatencySummary,
    /// Get latency.
    pub get_latency: LatencySummary,
    /// Lookup latency.
    pub lookup_latency: LatencySummary,
    /// The plugin's own counters and gauges (ABI 1.3 `stats`), when asked for; empty otherwise.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub plugin: Vec<crate::plugin::PluginStat>,
}

impl TierMetrics {
    /// Copy the counters.
    pub fn stats(&self, name: &str, queue_depth: u64) -> TierStats {
        TierStats {
            name: name.to_string(),
            hits: get(&self.hits),
            misses: get(&self.misses),
            bytes_in: get(&self.bytes_in),
            bytes_out: get(&self.bytes_out),
            puts: get(&self.puts),
            put_skipped: get(&self.put_skipped),
            put_dropped: get(&self.put_dropped),
            no_space: get(&self.no_space),
            errors: get(&self.errors),
            corrupt: get(&self.corrupt),
            breaker: None,
            evictions: 0,
            promotions: get(&self.promotions),
            demotions: get(&self.demotions),
            queue_depth,
            puts_in_flight: get(&self.puts_in_flight),
            put_latency: self.put_latency.summary(),
            get_latency: self.get_latency.summary(),
            lookup_latency: self.lookup_latency.summary(),
            plugin: Vec::new(),
        }
    }
}
