//! `kvhost bench --suite micro`: the data path's cost against the machine's own limits, each row
//! measured side by side with its baseline in the same run (interleaved repetitions, medians) and
//! reported as a ratio. The command exits 1 when a judged row misses its target.
//!
//! | row | what | baseline | target |
//! |---|---|---|---|
//! | a | hot-cache put-with-copy / get-with-copy GB/s, 256 KiB to 32 MiB chunks, ≥ 1 GiB rotating set | below 1 MiB: single-thread memcpy; from 1 MiB: the best N-thread copy of the same bytes | ≥ 0.9× |
//! | b | one-key `contains` through the dlopen'd no-op plugin (ABI crossing and marshalling) | the same operation as a direct Rust call | ≤ 250 ns over it |
//! | c | contains and lookup keys/s over 1M keys, 1 thread (2 threads reported) | – | ≥ 10 M/s |
//! | f | put and get without the copy (bookkeeping), ns per op, 1 thread (2 threads reported) | – | ≤ 1 µs |
//! | g | a 1,000-key prefix walk over 1M keys: all hit (judged), miss at 500 (reported) | – | ≤ 30 µs |
//! | d | put GB/s into a full, evicting cache | put GB/s with free space | ≥ 0.8× |
//! | e | get with a tier hit through the C `mem` plugin (promotion) | memcpy | reported |

mod abi;
mod copy;
mod index;
pub mod vs_lmcache;

use crate::cache::{CacheConfig, PolicyKind};
use crate::chain::{Chain, ChainSettings, TierSettings, WritePolicy};
use crate::key::ChunkKey;
use kvhost_plugin_sdk::ChunkMeta;
use memmap2::MmapMut;
use std::time::Duration;

/// One row of the report.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Row {
    /// What was measured.
    pub name: String,
    /// The measurement.
    pub value: f64,
    /// Its unit.
    pub unit: String,
    /// The baseline measured in the same run, if the row has one.
    pub baseline: Option<f64>,
    /// `value / baseline`.
    pub ratio: Option<f64>,
    /// The target, as text.
    pub target: String,
    /// Whether the target is met (`None` for report-only rows).
    pub met: Option<bool>,
}

/// Sizes of a run.
#[derive(Clone, Debug)]
pub struct MicroOptions {
    /// Rotating working set for rows a and d, bytes.
    pub working_set: usize,
    /// Keys for rows c and g.
    pub keys: usize,
    /// Calls for row b.
    pub calls: usize,
    /// Interleaved repetitions (the median of each side is kept).
    pub reps: usize,
    /// The module path of row b's no-op plugin.
    pub noop_module: String,
    /// Which rows to run, by letter (`None`: all).
    pub rows: Option<String>,
}

impl MicroOptions {
    fn wants(&self, row: char) -> bool {
        self.rows.as_ref().is_none_or(|r| r.contains(row))
    }

    /// The full suite.
    pub fn full() -> Self {
        MicroOptions {
            working_set: 1 << 30,
            keys: 1_000_000,
            calls: 2_000_000,
            reps: 5,
            noop_module: "kvhost_noop".into(),
            rows: None,
        }
    }
    /// A fast smoke run (for tests): same code, small sizes, numbers not meaningful.
    pub fn quick() -> Self {
        MicroOptions {
            working_set: 64 << 20,
            keys: 20_000,
            calls: 20_000,
            reps: 3,
            noop_module: "kvhost_noop".into(),
            rows: None,
        }
    }
}

pub(crate) fn mapped(len: usize, fill: u8) -> MmapMut {
    let (mut m, _) = crate::cache::arena::map_anonymous(len, false).expect("map benchmark region");
    m.iter_mut().step_by(4096).for_each(|b| *b = fill);
    m
}

pub(crate) fn gbps(bytes: usize, d: Duration) -> f64 {
    bytes as f64 / d.as_secs_f64() / 1e9
}

/// The median of `xs` (the upper one of an even count).
pub(crate) fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs.get(xs.len() / 2).copied().unwrap_or(0.0)
}

/// `n` distinct keys under model `prefix`.
pub(crate) fn keys(prefix: &str, n: usize) -> Vec<ChunkKey> {
    (0..n)
        .map(|i| {
            ChunkKey::new(prefix, 1, 0, (i as i128) * 0x9E37_79B9 + 1, "bfloat16")
                .expect("valid key")
        })
        .collect()
}

/// A chain with only the hot cache, of `capacity` bytes.
pub(crate) fn hot_only_chain(capacity: usize, prefault: bool) -> Chain {
    let mut cache = CacheConfig::new(capacity as u64);
    cache.policy = PolicyKind::Lru;
    cache.arena.prefault = prefault;
    let settings = ChainSettings {
        cache,
        write_policy: WritePolicy::WriteThrough,
        tier: TierSettings {
            queue_depth: 1024,
            backpressure: crate::chain::Backpressure::Block,
            max_batch: 32,
            max_batch_bytes: 64 << 20,
            max_pending_batches: 4,
            skip_existing: false,
            lookup_timeout: Duration::from_secs(10),
        },
        read_timeout: Duration::from_secs(10),
        promotion_wait: Duration::from_millis(100),
        pin_timeout: Duration::from_secs(300),
        pin_check_interval: Duration::from_secs(30),
        breaker: Default::default(),
    };
    Chain::new(settings, Vec::new()).expect("hot cache")
}

/// Close a benchmark's chain so its arena is unmapped now: the chain's pin monitor keeps a dropped
/// chain alive until its next check (30 s here), and arenas left behind would press on the
/// measurements that follow (and on LMCache's side in `--vs-lmcache`).
pub(crate) fn finish(chain: Chain) {
    chain.close(Duration::from_secs(10));
}

pub(crate) fn meta(len: usize) -> ChunkMeta {
    ChunkMeta {
        length: len as u64,
        fmt: 1,
        dtype: 3,
        ndim: 0,
        shape: [0; 4],
        reserved: 0,
    }
}

pub(crate) fn human(size: usize) -> String {
    if size >= 1 << 20 {
        format!("{} MiB", size >> 20)
    } else {
        format!("{} KiB", size >> 10)
    }
}

/// Run the suite; rows that cannot run are reported as failed (a miss).
pub fn run(opts: MicroOptions, mut progress: impl FnMut(&str)) -> Vec<Row> {
    let mut rows = Vec::new();
    let copies = opts.wants('a') || opts.wants('d') || opts.wants('e');
    let set = if copies { opts.working_set } else { 4096 };
    let src = mapped(set, 0x5a);
    let mut dst = mapped(set, 0);
    for size in [256 << 10, 1 << 20, 4 << 20, 32 << 20] {
        if size > opts.working_set / 4 || !opts.wants('a') {
            continue;
        }
        progress(&format!("a: {}", human(size)));
        rows.extend(copy::row_a(size, &opts, &src, &mut dst));
    }
    if opts.wants('b') {
        progress("b: no-op plugin call");
        rows.push(
            abi::row_b(&opts).unwrap_or_else(|e| failed("b. per-op cost, dlopen'd no-op", &e)),
        );
    }
    if opts.wants('c') {
        progress("c: contains and lookup");
        rows.extend(index::row_c(&opts));
    }
    if opts.wants('f') {
        progress("f: bookkeeping");
        rows.extend(index::row_f(&opts));
    }
    if opts.wants('g') {
        progress("g: 1,000-key prefix walk");
        rows.extend(index::row_g(&opts));
    }
    if opts.wants('d') {
        progress("d: put while evicting");
        rows.push(copy::row_d(&opts, &src));
    }
    if opts.wants('e') {
        progress("e: promotion through mem");
        rows.push(
            copy::row_e(&opts, &src, &mut dst)
                .unwrap_or_else(|e| failed("e. get with a mem-plugin hit", &e)),
        );
    }
    rows
}

pub(crate) fn failed(name: &str, why: &str) -> Row {
    Row {
        name: format!("{name} (FAILED: {why})"),
        value: 0.0,
        unit: String::new(),
        baseline: None,
        ratio: None,
        target: "runs".into(),
        met: Some(false),
    }
}

/// Whether every judged row met its target (rows that failed to run count as misses).
pub fn all_met(rows: &[Row]) -> bool {
    rows.iter().all(|r| r.met != Some(false))
}

/// The rows as a text table.
pub fn table(rows: &[Row]) -> String {
    let mut t = vec![["row", "value", "baseline", "ratio", "target", "met"]
        .map(String::from)
        .to_vec()];
    for r in rows {
        t.push(vec![
            r.name.clone(),
            format!("{:.2} {}", r.value, r.unit),
            r.baseline
                .map_or("-".into(), |b| format!("{b:.2} {}", r.unit)),
            r.ratio.map_or("-".into(), |x| format!("{x:.2}x")),
            r.target.clone(),
            match r.met {
                Some(true) => "yes".into(),
                Some(false) => "NO".into(),
                None => "-".into(),
            },
        ]);
    }
    crate::cli::table::render(&t)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(met: Option<bool>) -> Row {
        Row {
            name: "x".into(),
            value: 1.0,
            unit: "u".into(),
            baseline: None,
            ratio: None,
            target: "t".into(),
            met,
        }
    }

    #[test]
    fn one_miss_or_failure_fails_the_suite_and_report_rows_do_not() {
        assert!(all_met(&[row(Some(true)), row(None)]));
        assert!(!all_met(&[row(Some(true)), row(Some(false)), row(None)]));
        assert!(!all_met(&[failed("b", "cannot load")]));
    }

    #[test]
    fn median_takes_the_middle() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![5.0, 1.0, 9.0, 7.0]), 7.0);
    }
}
