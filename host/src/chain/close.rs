//! Close: stop taking puts, drain what is in flight up to a deadline, release lookup pins, then destroy
//! the plugins in reverse order.

use super::Chain;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

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

impl Chain {
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
        super::lookup::release_all(inner);
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

#[cfg(test)]
mod tests {
    use super::super::test_support::{hot_only, key, put};
    use super::*;

    #[test]
    fn close_releases_lookup_pins_and_a_second_close_does_nothing() {
        let chain = hot_only(8 << 20);
        put(&chain, &key(1), 1, 1000);
        chain.lookup(&[key(1)], Some("req"));
        assert_eq!(chain.stats().pinned_lookups, 1);
        let report = chain.close(Duration::from_secs(1));
        assert!(
            report.unfinished.is_empty() && report.stuck.is_empty(),
            "{report:?}"
        );
        assert_eq!(report.in_flight_at_start, 0);
        assert_eq!(chain.stats().pinned_lookups, 0, "close released the pins");
        assert_eq!(chain.unpin("req"), 0);
        let again = chain.close(Duration::from_secs(1));
        assert!(again.destroyed.is_empty() && again.in_flight_at_start == 0);
    }

    #[test]
    fn a_closed_chain_still_serves_what_its_hot_cache_holds() {
        let chain = hot_only(8 << 20);
        put(&chain, &key(2), 2, 100);
        chain.close(Duration::from_secs(1));
        assert!(chain.get(&[key(2)])[0].is_some());
    }
}
