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
