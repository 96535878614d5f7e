//! Sick tiers through the `faulty` plugin (issue 13): a hung tier costs at most its bound of hot
//! cache and its circuit breaker opens and closes again; every fault mode gives 0 crashes and 0
//! corrupted bytes returned.

use crate::util::*;
use kvhost::chain::{BreakerStats, Chain, PutOutcome, TierStats};
use kvhost::config::Config;
use kvhost::ChunkKey;
use std::path::PathBuf;
use std::time::{Duration, Instant};

const KIB: usize = 1024;

/// The faulty plugin's cdylib, built by the workspace (a dependency of this package).
pub(crate) fn faulty_so() -> PathBuf {
    crate::util::rust_plugin("kvhost_faulty")
}

/// A chain of the hot cache (`cache_mib`) and one `faulty` tier with `options`, plus top-level YAML.
fn faulty_chain(cache_mib: f64, top: &str, options: &[(&str, &str)]) -> Chain {
    let mut y = format!(
        "chunk_size: 16\nmax_local_cpu_size: {}\nlocal_cpu_prefault: false\nblocking_timeout_secs: 2\n{top}\
         storage_plugins: [sick]\nextra_config:\n  storage_plugin.sick.module_path: {}\n  \
         storage_plugin.sick.class_name: faulty\n",
        cache_mib / 1024.0,
        faulty_so().display()
    );
    for (k, v) in options {
        y += &format!("  storage_plugin.sick.{k}: '{v}'\n");
    }
    let config = Config::from_yaml(&y, None).unwrap_or_else(|e| panic!("{e}\n{y}"));
    Chain::from_config(&config).unwrap_or_else(|e| panic!("{e}\n{y}"))
}

fn sick(chain: &Chain) -> TierStats {
    chain
        .stats()
        .tiers
        .into_iter()
        .nth(1)
        .expect("the faulty tier")
}

fn breaker(chain: &Chain) -> BreakerStats {
    sick(chain).breaker.expect("plugin tiers have a breaker")
}

fn put(chain: &Chain, k: &ChunkKey, data: &[u8]) -> PutOutcome {
    chain
        .put(
            std::slice::from_ref(k),
            &[data],
            &[chunk_meta(1, data.len())],
        )
        .remove(0)
}

fn wait_until(what: &str, limit: Duration, mut ok: impl FnMut() -> bool) -> Duration {
    let started = Instant::now();
    while !ok() {
        assert!(started.elapsed() < limit, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
    started.elapsed()
}

#[test]
fn hung_tier_holds_at_most_its_bound_and_its_breaker_recovers() {
    let bound = 4 << 20;
    let chain = faulty_chain(
        64.0,
        &format!(
            "tier_max_inflight_bytes: {bound}\ntier_put_deadline_secs: 0.5\ntier_breaker_probe_secs: 0.1\n"
        ),
        &[("hang_rate", "1"), ("faults_for_ms", "4000")],
    );
    let data = bytes(7, 256 * KIB);
    let started = Instant::now();
    // 48 MiB of puts into a 64 MiB hot cache with a tier that never completes a put.
    for i in 0..192 {
        let outcome = put(&chain, &key(i), &data);
        assert_eq!(outcome, PutOutcome::Stored, "put {i} while the tier hangs");
        let b = breaker(&chain);
        assert!(
            b.inflight_bytes <= bound,
            "the hung tier holds {} bytes, over its bound {bound}",
            b.inflight_bytes
        );
    }
    let b = breaker(&chain);
    assert_eq!(b.state, "open", "{b:?}");
    assert!(b.trips >= 1 && b.skipped > 0, "{b:?}");
    // The breaker opened within its bound: the put deadline plus a monitor tick.
    let opened_after = started.elapsed().as_secs_f64() - b.open_secs;
    assert!(
        opened_after < 1.5,
        "opened {opened_after:.2} s after the first put"
    );
    assert_eq!(
        chain.stats().tiers[0].no_space,
        0,
        "the hot cache never ran out"
    );

    // The tier recovers when its fault window ends; the hung puts complete, a probe closes the breaker.
    wait_until("breaker closes", Duration::from_secs(10), || {
        breaker(&chain).state == "closed"
    });
    let before = sick(&chain).puts;
    for i in 1000..1008 {
        assert_eq!(put(&chain, &key(i), &data), PutOutcome::Stored);
    }
    wait_drained(&chain);
    assert!(sick(&chain).puts >= before + 8, "puts reach the tier again");
    let report = chain.close(Duration::from_secs(5));
    assert!(report.stuck.is_empty(), "{report:?}");
}

/// Put `n` chunks, then read them back through the tier (the hot cache only stages), checking every
/// byte returned. Returns the chain for the caller's counters.
fn round_trip(options: &[(&str, &str)], n: i128) -> (Chain, usize) {
    let chain = faulty_chain(
        32.0,
        "local_cpu: false\ntier_breaker_failures: 0\ntier_put_deadline_secs: 5\n",
        options,
    );
    let len = 64 * KIB;
    for i in 0..n {
        let _ = put(&chain, &key(i), &bytes(i as u64, len));
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while chain.stats().puts_in_flight > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    let mut hits = 0;
    for i in 0..n {
        if let Some(h) = chain.get(&[key(i)]).remove(0) {
            hits += 1;
            assert!(
                h.bytes() == bytes(i as u64, len).as_slice(),
                "chunk {i}: the chain returned corrupted bytes ({options:?})"
            );
        }
    }
    (chain, hits)
}

/// Run one fault mode: 64 chunks through a tier with `options`; 0 corrupted bytes come back, and the
/// process is still here (a crash would end the test binary). Returns chunks read back and the tier.
fn fault_mode(options: &[(&str, &str)]) -> (usize, TierStats) {
    let (chain, hits) = round_trip(options, 64);
    let s = sick(&chain);
    eprintln!(
        "{options:?}: {hits}/64 read back, {} errors, {} corrupt",
        s.errors, s.corrupt
    );
    chain.close(Duration::from_secs(5));
    (hits, s)
}

#[test]
fn fault_mode_errors() {
    let (hits, s) = fault_mode(&[("error_rate", "0.3")]);
    assert!(s.errors > 0 && hits < 64, "{hits} {s:?}");
}

#[test]
fn fault_mode_latency() {
    let (hits, _) = fault_mode(&[("latency", "exponential"), ("latency_us", "500")]);
    assert_eq!(hits, 64, "latency alone loses nothing");
    let (hits, _) = fault_mode(&[("latency", "uniform"), ("latency_us", "300")]);
    assert_eq!(hits, 64, "latency alone loses nothing");
}

#[test]
fn fault_mode_corruption_is_caught_and_counted() {
    let (hits, s) = fault_mode(&[("corrupt_rate", "0.5")]);
    assert!(s.corrupt > 0, "corruption was caught and counted: {s:?}");
    assert!(hits > 0 && hits < 64, "{hits}");
}

#[test]
fn fault_mode_unreported_items_are_logged_with_tier_op_and_key() {
    let _ = logs();
    let (_, s) = fault_mode(&[("unreported_rate", "0.3")]);
    assert!(s.errors > 0, "{s:?}");
    // Each tier has its own rate limit, so other tests' lying plugins cannot use up this one's.
    let text = logs();
    let line = text
        .lines()
        .find(|l| l.contains("without reporting this item") && l.contains("tier=\"sick\""))
        .unwrap_or_else(|| panic!("no unreported-item line in:\n{text}"));
    assert!(
        line.contains("tier=\"sick\"") && line.contains("key=\"test/model@"),
        "{line}"
    );
    assert!(
        line.contains("op=\"put\"") || line.contains("op=\"get\""),
        "{line}"
    );
}

#[test]
fn fault_mode_hangs_that_end() {
    let (hits, _) = fault_mode(&[("hang_rate", "0.2"), ("faults_for_ms", "300")]);
    assert_eq!(hits, 64, "hung puts complete when the window ends");
}

#[test]
fn fault_mode_worker_panic() {
    let (_, s) = fault_mode(&[("panic_rate", "0.2")]);
    assert!(
        s.errors > 0,
        "the poisoned backend's failures are counted: {s:?}"
    );
}

#[test]
fn bad_fault_options_are_refused_naming_the_option() {
    for (k, v, says) in [
        ("error_rate", "2", "within 0 and 1"),
        (
            "latency",
            "gaussian",
            "expected none, fixed, uniform or exponential",
        ),
        ("hang_rate", "often", "hang_rate"),
    ] {
        let y = format!(
            "chunk_size: 16\nmax_local_cpu_size: 0.01\nlocal_cpu_prefault: false\nstorage_plugins: [sick]\n\
             extra_config:\n  storage_plugin.sick.module_path: {}\n  storage_plugin.sick.class_name: faulty\n  \
             storage_plugin.sick.{k}: {v}\n",
            faulty_so().display()
        );
        let config = Config::from_yaml(&y, None).unwrap();
        let err = Chain::from_config(&config).expect_err(k).to_string();
        assert!(err.contains(k) && err.contains(says), "{k}={v}: {err}");
    }
}

#[test]
fn consecutive_failures_open_the_breaker_and_health_closes_it() {
    let chain = faulty_chain(
        16.0,
        "tier_breaker_failures: 3\ntier_breaker_probe_secs: 0.1\nput_batch_size: 1\n",
        &[("error_rate", "1"), ("faults_for_ms", "1500")],
    );
    let data = bytes(3, 4 * KIB);
    for i in 0..3 {
        assert_eq!(put(&chain, &key(i), &data), PutOutcome::Stored);
        wait_drained(&chain);
    }
    let b = breaker(&chain);
    assert_eq!((b.state, b.trips), ("open", 1), "{b:?}");
    assert_eq!(sick(&chain).errors, 3);
    // Skipped while open: neither stored in the tier nor counted as its error.
    assert_eq!(put(&chain, &key(10), &data), PutOutcome::Stored);
    assert!(chain.get(&[key(99)])[0].is_none());
    let b = breaker(&chain);
    assert!(b.skipped >= 2, "{b:?}");
    assert_eq!(sick(&chain).errors, 3);
    wait_until("health closes the breaker", Duration::from_secs(10), || {
        breaker(&chain).state == "closed"
    });
    assert_eq!(put(&chain, &key(20), &data), PutOutcome::Stored);
    wait_drained(&chain);
    assert_eq!(sick(&chain).puts, 1, "the healed tier stores again");
}
