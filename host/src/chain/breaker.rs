//! A circuit breaker per plugin tier: a sick tier costs only itself.
//!
//! It trips on `failures` consecutive failed operations (every item failed, or the call timed out), on
//! a put outstanding past the put deadline, and when the arena bytes the tier holds (queued and being
//! stored) would pass its bound. While open, puts and gets skip the tier (counted), so a stuck tier
//! holds at most its bound of hot-cache arena. A probe (the plugin's `health`, or a lookup of one key
//! when it has none) runs every probe interval once the tier has given its bytes back and has no
//! put past its deadline; a passing probe closes it. Both transitions are logged as they happen.

use parking_lot::{Condvar, Mutex};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::time::{Duration, Instant};

/// Breaker settings of one tier.
#[derive(Clone, Debug)]
pub struct BreakerSettings {
    /// Consecutive failed operations that trip it (0: never on failures).
    pub failures: u32,
    /// Arena bytes the tier may hold in puts queued or being stored.
    pub max_inflight_bytes: u64,
    /// A put batch outstanding longer than this trips it.
    pub put_deadline: Duration,
    /// How often an open breaker probes the tier.
    pub probe_interval: Duration,
}

impl Default for BreakerSettings {
    fn default() -> Self {
        BreakerSettings {
            failures: 5,
            max_inflight_bytes: 1 << 30,
            put_deadline: Duration::from_secs(10),
            probe_interval: Duration::from_secs(1),
        }
    }
}

/// The state of a breaker.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum BreakerState {
    /// Traffic flows.
    Closed,
    /// The tier is skipped.
    Open,
}

impl BreakerState {
    /// `closed` or `open`.
    pub fn name(self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::Open => "open",
        }
    }
}

const CLOSED: u8 = 0;
const OPEN: u8 = 1;

struct OpenSpan {
    since: Option<Instant>,
    total: Duration,
    last_probe: Instant,
}

/// One tier's breaker.
pub(crate) struct Breaker {
    tier: String,
    settings: BreakerSettings,
    state: AtomicU8,
    consecutive: AtomicU32,
    inflight_bytes: Mutex<u64>,
    freed: Condvar,
    trips: AtomicU64,
    skipped: AtomicU64,
    span: Mutex<OpenSpan>,
    batches: Mutex<(u64, HashMap<u64, Instant>)>,
}

/// A point-in-time copy of a breaker.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct BreakerStats {
    /// `closed` or `open`.
    pub state: &'static str,
    /// Times it opened.
    pub trips: u64,
    /// Operations (put chunks, get and lookup calls) that skipped the tier while it was open.
    pub skipped: u64,
    /// Seconds it has been open, in total.
    pub open_secs: f64,
    /// Arena bytes the tier holds in puts now.
    pub inflight_bytes: u64,
    /// Its bound.
    pub max_inflight_bytes: u64,
}

impl Breaker {
    pub(crate) fn new(tier: &str, settings: BreakerSettings) -> Breaker {
        Breaker {
            tier: tier.to_string(),
            settings,
            state: AtomicU8::new(CLOSED),
            consecutive: AtomicU32::new(0),
            inflight_bytes: Mutex::new(0),
            freed: Condvar::new(),
            trips: AtomicU64::new(0),
            skipped: AtomicU64::new(0),
            span: Mutex::new(OpenSpan {
                since: None,
                total: Duration::ZERO,
                last_probe: Instant::now(),
            }),
            batches: Mutex::new((0, HashMap::new())),
        }
    }

    /// The state now.
    pub(crate) fn state(&self) -> BreakerState {
        match self.state.load(Ordering::Acquire) {
            CLOSED => BreakerState::Closed,
            _ => BreakerState::Open,
        }
    }

    /// Whether an operation may use the tier; counts it as skipped when not.
    pub(crate) fn allow(&self) -> bool {
        if self.state.load(Ordering::Acquire) == CLOSED {
            return true;
        }
        self.skipped.fetch_add(1, Ordering::Relaxed);
        false
    }

    /// How long a put may wait for room or stay outstanding.
    pub(crate) fn put_deadline(&self) -> Duration {
        self.settings.put_deadline
    }

    /// Reserve `bytes` of in-flight arena for a put. Past the bound, a `block`ing put waits for the
    /// tier to give bytes back, up to the put deadline, and trips the breaker if it does not; a
    /// non-blocking one is refused at once. False when the tier is open or the bytes were refused.
    /// One put is always let through when the tier holds nothing, whatever its size.
    pub(crate) fn reserve(&self, bytes: u64, block: bool) -> bool {
        if !self.allow() {
            return false;
        }
        let bound = self.settings.max_inflight_bytes;
        let deadline = Instant::now() + self.settings.put_deadline;
        let mut held = self.inflight_bytes.lock();
        loop {
            if *held == 0 || *held + bytes <= bound {
                *held += bytes;
                return true;
            }
            if self.state() == BreakerState::Open {
                self.skipped.fetch_add(1, Ordering::Relaxed);
                return false;
            }
            if !block {
                return false;
            }
            if Instant::now() >= deadline {
                let now_held = *held;
                drop(held);
                self.skipped.fetch_add(1, Ordering::Relaxed);
                self.trip(&format!(
                    "it held {now_held} arena bytes in puts for the put deadline ({:.1} s); another \
                     {bytes} would pass tier_max_inflight_bytes {bound}",
                    self.settings.put_deadline.as_secs_f64()
                ));
                return false;
            }
            // Short waits, so a trip by the breaker thread is seen promptly.
            self.freed.wait_for(
                &mut held,
                Duration::from_millis(20).min(deadline - Instant::now()),
            );
        }
    }

    /// Give back bytes reserved by [`reserve`](Self::reserve).
    pub(crate) fn release(&self, bytes: u64) {
        let mut held = self.inflight_bytes.lock();
        *held = held.saturating_sub(bytes);
        drop(held);
        self.freed.notify_all();
    }

    /// A put batch went to the plugin; returns its id for [`batch_done`](Self::batch_done).
    pub(crate) fn batch_started(&self) -> u64 {
        let mut g = self.batches.lock();
        g.0 += 1;
        let id = g.0;
        g.1.insert(id, Instant::now());
        id
    }

    /// A put batch completed.
    pub(crate) fn batch_done(&self, id: u64) {
        self.batches.lock().1.remove(&id);
    }

    /// Age of the oldest outstanding put batch.
    fn oldest_batch(&self) -> Option<Duration> {
        self.batches
            .lock()
            .1
            .values()
            .min()
            .map(|since| since.elapsed())
    }

    /// An operation succeeded (at least one item did).
    pub(crate) fn success(&self) {
        self.consecutive.store(0, Ordering::Relaxed);
    }

    /// An operation failed (every item failed, or the call timed out): `what` says how.
    pub(crate) fn failure(&self, what: &str) {
        let n = self.consecutive.fetch_add(1, Ordering::Relaxed) + 1;
        let limit = self.settings.failures;
        if limit > 0 && n >= limit {
            self.trip(&format!(
                "{n} consecutive failed operations, the last: {what}"
            ));
        }
    }

    /// Open the breaker (once) and say so.
    pub(crate) fn trip(&self, why: &str) {
        if self
            .state
            .compare_exchange(CLOSED, OPEN, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            return;
        }
        self.trips.fetch_add(1, Ordering::Relaxed);
        {
            let mut span = self.span.lock();
            span.since = Some(Instant::now());
            span.last_probe = Instant::now();
        }
        tracing::warn!(
            target: "kvhost::chain",
            tier = %self.tier,
            "circuit breaker OPEN: {why}; puts and gets skip this tier until a probe passes (every {:?})",
            self.settings.probe_interval
        );
    }

    fn close(&self, probe: &str) {
        if self
            .state
            .compare_exchange(OPEN, CLOSED, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            return;
        }
        self.consecutive.store(0, Ordering::Relaxed);
        let open_for = {
            let mut span = self.span.lock();
            let d = span.since.take().map_or(Duration::ZERO, |s| s.elapsed());
            span.total += d;
            d
        };
        tracing::warn!(
            target: "kvhost::chain",
            tier = %self.tier,
            "circuit breaker CLOSED after {:.1} s open: {probe}; skipped {} operation(s) so far",
            open_for.as_secs_f64(),
            self.skipped.load(Ordering::Relaxed)
        );
    }

    /// Periodic check (from the chain's breaker thread): trip on a put past its deadline; when open
    /// and due, probe with `probe` (Ok closes) once the tier holds no bytes and nothing is overdue.
    pub(crate) fn tick(&self, probe: impl FnOnce() -> Result<String, String>) {
        let deadline = self.settings.put_deadline;
        let overdue = self.oldest_batch().filter(|age| *age > deadline);
        if let Some(age) = overdue {
            self.trip(&format!(
                "a put has been outstanding for {:.1} s (put deadline {:.1} s)",
                age.as_secs_f64(),
                deadline.as_secs_f64()
            ));
            return;
        }
        if self.state() != BreakerState::Open {
            return;
        }
        {
            let mut span = self.span.lock();
            if span.last_probe.elapsed() < self.settings.probe_interval {
                return;
            }
            span.last_probe = Instant::now();
        }
        if *self.inflight_bytes.lock() > 0 {
            return;
        }
        match probe() {
            Ok(text) => self.close(&format!("probe passed ({text})")),
            Err(why) => {
                tracing::debug!(target: "kvhost::chain", tier = %self.tier, "breaker probe failed: {why}")
            }
        }
    }

    /// Seconds open so far, counting a span still open.
    pub(crate) fn open_secs(&self) -> f64 {
        let span = self.span.lock();
        (span.total + span.since.map_or(Duration::ZERO, |s| s.elapsed())).as_secs_f64()
    }

    pub(crate) fn stats(&self) -> BreakerStats {
        BreakerStats {
            state: self.state().name(),
            trips: self.trips.load(Ordering::Relaxed),
            skipped: self.skipped.load(Ordering::Relaxed),
            open_secs: self.open_secs(),
            inflight_bytes: *self.inflight_bytes.lock(),
            max_inflight_bytes: self.settings.max_inflight_bytes,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn breaker(failures: u32, bound: u64) -> Breaker {
        Breaker::new(
            "t",
            BreakerSettings {
                failures,
                max_inflight_bytes: bound,
                put_deadline: Duration::from_millis(50),
                probe_interval: Duration::ZERO,
            },
        )
    }

    #[test]
    fn trips_on_consecutive_failures_and_a_success_resets() {
        let b = breaker(3, 100);
        b.failure("x");
        b.failure("x");
        b.success();
        b.failure("x");
        b.failure("x");
        assert_eq!(b.state(), BreakerState::Closed);
        b.failure("x");
        assert_eq!(b.state(), BreakerState::Open);
        assert!(!b.allow());
        assert_eq!(b.stats().skipped, 1);
        assert_eq!(b.stats().trips, 1);
    }

    #[test]
    fn bytes_past_the_bound_trip_and_are_refused() {
        let b = breaker(0, 100);
        assert!(b.reserve(60, false));
        assert!(!b.reserve(60, false), "would hold 120 > 100; not blocking");
        assert_eq!(
            b.state(),
            BreakerState::Closed,
            "a refused non-blocking put does not trip"
        );
        let started = Instant::now();
        assert!(!b.reserve(60, true), "waits for the deadline, then trips");
        assert!(started.elapsed() >= Duration::from_millis(50));
        assert_eq!(b.state(), BreakerState::Open);
        assert_eq!(b.stats().inflight_bytes, 60);
        // The probe waits until the tier gave its bytes back.
        b.tick(|| Ok("fine".into()));
        assert_eq!(b.state(), BreakerState::Open);
        b.release(60);
        b.tick(|| Err("still sick".into()));
        assert_eq!(b.state(), BreakerState::Open);
        b.tick(|| Ok("fine".into()));
        assert_eq!(b.state(), BreakerState::Closed);
        assert!(b.reserve(100, false));
        assert!(!b.reserve(1000, false) && b.state() == BreakerState::Closed);
        b.release(100);
        assert!(b.reserve(1000, false), "one put always fits an empty tier");
    }

    #[test]
    fn an_overdue_put_trips_and_blocks_the_probe() {
        let b = breaker(0, 100);
        let id = b.batch_started();
        b.tick(|| Ok("fine".into()));
        assert_eq!(b.state(), BreakerState::Closed);
        std::thread::sleep(Duration::from_millis(60));
        b.tick(|| Ok("fine".into()));
        assert_eq!(b.state(), BreakerState::Open);
        b.tick(|| Ok("fine".into()));
        assert_eq!(b.state(), BreakerState::Open, "still overdue");
        b.batch_done(id);
        b.tick(|| Ok("fine".into()));
        assert_eq!(b.state(), BreakerState::Closed);
        assert!(b.open_secs() > 0.0);
    }
}
