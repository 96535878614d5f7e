//! `kvhost bench --suite micro`: the data path's cost against the machine's own limits, each row
//! measured side by side with its baseline in the same run and reported as a ratio.
//!
//! | row | what | baseline | target |
//! |---|---|---|---|
//! | a | hot-cache put-with-copy / get-with-copy GB/s, 256 KiB to 32 MiB chunks, ≥ 1 GiB rotating set | memcpy over a same-sized mapped region | ≥ 0.8× |
//! | b | per-op cost of a dlopen'd no-op plugin | the same no-op linked into the binary | ≤ +5 ns |
//! | c | contains and lookup ops/s over 1M keys, one thread | – | ≥ 5 M/s |
//! | d | put GB/s into a full, evicting cache | put GB/s with free space | ≥ 0.8× |
//! | e | get with a tier hit through the C `mem` plugin (promotion) | memcpy | reported |

use crate::cache::{CacheConfig, PolicyKind};
use crate::chain::{Chain, ChainSettings, TierSettings, WritePolicy};
use crate::config::{Config, PluginSpec};
use crate::key::ChunkKey;
use crate::loader;
use crate::plugin::PutRequest;
use kvhost_plugin_sdk::ChunkMeta;
use memmap2::MmapMut;
use std::hint::black_box;
use std::time::{Duration, Instant};

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
#[derive(Clone, Copy, Debug)]
pub struct MicroOptions {
    /// Rotating working set for rows a and d, bytes.
    pub working_set: usize,
    /// Keys for row c.
    pub keys: usize,
    /// Calls for row b.
    pub calls: usize,
    /// Repetitions (the best of them is kept).
    pub reps: usize,
}

impl MicroOptions {
    /// The full suite.
    pub fn full() -> Self {
        MicroOptions {
            working_set: 1 << 30,
            keys: 1_000_000,
            calls: 2_000_000,
            reps: 3,
        }
    }
    /// A fast smoke run (for tests): same code, small sizes, numbers not meaningful.
    pub fn quick() -> Self {
        MicroOptions {
            working_set: 64 << 20,
            keys: 20_000,
            calls: 20_000,
            reps: 1,
        }
    }
}

fn mapped(len: usize, fill: u8) -> MmapMut {
    let mut m = memmap2::MmapOptions::new()
        .len(len)
        .populate()
        .map_anon()
        .expect("map benchmark region");
    let _ = m.advise(memmap2::Advice::HugePage);
    m.iter_mut().step_by(4096).for_each(|b| *b = fill);
    m
}

fn gbps(bytes: usize, d: Duration) -> f64 {
    bytes as f64 / d.as_secs_f64() / 1e9
}

fn best<T>(reps: usize, mut f: impl FnMut() -> (Duration, T)) -> (Duration, T) {
    let mut out = f();
    for _ in 1..reps {
        let r = f();
        if r.0 < out.0 {
            out = r;
        }
    }
    out
}

fn keys(prefix: &str, n: usize) -> Vec<ChunkKey> {
    (0..n)
        .map(|i| {
            ChunkKey::new(prefix, 1, 0, (i as i128) * 0x9E37_79B9 + 1, "bfloat16")
                .expect("valid key")
        })
        .collect()
}

fn hot_only_chain(capacity: usize, prefault: bool) -> Chain {
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

fn meta(len: usize) -> ChunkMeta {
    ChunkMeta {
        length: len as u64,
        fmt: 1,
        dtype: 3,
        ndim: 0,
        shape: [0; 4],
        reserved: 0,
    }
}

/// Row a: put-with-copy and get-with-copy at one chunk size, against memcpy.
fn row_a(size: usize, opts: &MicroOptions, src: &MmapMut, dst: &mut MmapMut) -> Vec<Row> {
    let n = opts.working_set / size;
    let bytes = n * size;
    let chain = hot_only_chain(bytes + (64 << 20), true);
    let ks = keys(&format!("bench-a-{size}"), n);
    let (memcpy, _) = best(opts.reps, || {
        let t = Instant::now();
        for i in 0..n {
            dst[i * size..(i + 1) * size].copy_from_slice(&src[i * size..(i + 1) * size]);
        }
        (t.elapsed(), black_box(dst[0]))
    });
    let (put, _) = best(opts.reps, || {
        chain.clear();
        let t = Instant::now();
        for (i, k) in ks.iter().enumerate() {
            let chunk = &src[i * size..(i + 1) * size];
            chain.put_with(k, size, meta(size), |d| d.copy_from_slice(chunk));
        }
        (t.elapsed(), ())
    });
    let (get, _) = best(opts.reps, || {
        let t = Instant::now();
        for (i, k) in ks.iter().enumerate() {
            let h = chain.hot().get(k).expect("chunk just put");
            dst[i * size..(i + 1) * size].copy_from_slice(h.bytes());
        }
        (t.elapsed(), black_box(dst[0]))
    });
    let base = gbps(bytes, memcpy);
    let label = human(size);
    let mk = |what: &str, v: f64| Row {
        name: format!(
            "a. hot-cache {what} {label} chunks ({} MiB set)",
            bytes >> 20
        ),
        value: v,
        unit: "GB/s".into(),
        baseline: Some(base),
        ratio: Some(v / base),
        target: ">= 0.8x memcpy".into(),
        met: Some(v / base >= 0.8),
    };
    vec![
        mk("put-with-copy", gbps(bytes, put)),
        mk("get-with-copy", gbps(bytes, get)),
    ]
}

fn human(size: usize) -> String {
    if size >= 1 << 20 {
        format!("{} MiB", size >> 20)
    } else {
        format!("{} KiB", size >> 10)
    }
}

/// Row b: ns per `contains` of one key through the dlopen'd no-op vs the same no-op linked in.
fn row_b(opts: &MicroOptions) -> Result<Row, String> {
    loader::register_builtin("noop", kvhost_noop::entry());
    let config = Config::from_yaml("chunk_size: 256\n", None).map_err(|e| e.to_string())?;
    let spec = |module_path: &str| PluginSpec {
        name: format!("noop-{module_path}"),
        module_path: module_path.to_string(),
        class_name: "noop".into(),
        priority: None,
        position: 0,
        options: Vec::new(),
    };
    let linked = loader::load(&spec(loader::BUILTIN), &config).map_err(|e| e.to_string())?;
    let loaded = loader::load(&spec("kvhost_noop"), &config)
        .map_err(|e| format!("{e} (build the workspace first)"))?;
    let key = keys("bench-b", 1);
    let time = |p: &crate::plugin::PluginBackend| {
        let t = Instant::now();
        for _ in 0..opts.calls {
            black_box(p.contains(black_box(&key), false).ok());
        }
        t.elapsed().as_nanos() as f64 / opts.calls as f64
    };
    // Interleave the two, several rounds, and keep each one's best: noise only ever adds time.
    let (mut a, mut b) = (f64::MAX, f64::MAX);
    for _ in 0..opts.reps.max(3) {
        a = a.min(time(&loaded));
        b = b.min(time(&linked));
    }
    Ok(Row {
        name: "b. per-op cost, dlopen'd no-op plugin (contains of 1 key)".into(),
        value: a,
        unit: "ns/op".into(),
        baseline: Some(b),
        ratio: Some(a / b),
        target: "<= +5 ns over linked-in".into(),
        met: Some(a - b <= 5.0),
    })
}

/// Row c: contains and lookup rates over `opts.keys` cached keys.
fn row_c(opts: &MicroOptions) -> Vec<Row> {
    let n = opts.keys;
    let chain = hot_only_chain(n * 4096 + (16 << 20), false);
    let ks = keys("bench-c", n);
    for k in &ks {
        chain.put_with(k, 1, meta(1), |d| d[0] = 1);
    }
    // A fixed pseudo-random visiting order, so lookups do not walk memory sequentially.
    let mut order: Vec<u32> = (0..n as u32).collect();
    let mut x = 0x2545_F491_4F6C_DD1Du64;
    for i in (1..n).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        order.swap(i, (x % (i as u64 + 1)) as usize);
    }
    let ops = n.max(2_000_000);
    let (contains, hits) = best(opts.reps, || {
        let t = Instant::now();
        let mut hits = 0usize;
        for i in 0..ops {
            hits += usize::from(chain.hot().contains(&ks[order[i % n] as usize]));
        }
        (t.elapsed(), hits)
    });
    assert_eq!(hits, ops, "every key is cached");
    let walk = 16;
    let (lookup, found) = best(opts.reps, || {
        let t = Instant::now();
        let mut found = 0usize;
        let mut i = 0;
        while i + walk <= ops {
            let start = order[(i / walk) % n] as usize % (n - walk);
            found += chain.lookup(&ks[start..start + walk], None).hit_chunks;
            i += walk;
        }
        (t.elapsed(), found)
    });
    let rate = |count: usize, d: Duration| count as f64 / d.as_secs_f64();
    let mk = |name: &str, v: f64| Row {
        name: format!("c. {name} over {n} cached keys, 1 thread"),
        value: v / 1e6,
        unit: "M ops/s".into(),
        baseline: None,
        ratio: None,
        target: ">= 5 M ops/s".into(),
        met: Some(v >= 5e6),
    };
    vec![
        mk("contains", rate(ops, contains)),
        mk("lookup (16-key prefix walks, per key)", rate(found, lookup)),
    ]
}

/// Row d: put throughput into a full cache that must evict, against a cache with free space.
fn row_d(opts: &MicroOptions, src: &MmapMut) -> Row {
    let size = 1 << 20;
    let n = opts.working_set / size;
    let chain = hot_only_chain(n * size, true);
    let ks = keys("bench-d", 2 * n);
    let run = |range: std::ops::Range<usize>| {
        let t = Instant::now();
        for i in range {
            let off = (i % n) * size;
            let chunk = &src[off..off + size];
            chain.put_with(&ks[i], size, meta(size), |d| d.copy_from_slice(chunk));
        }
        t.elapsed()
    };
    let (mut free, mut full) = (Duration::MAX, Duration::MAX);
    for _ in 0..opts.reps {
        chain.clear();
        free = free.min(run(0..n)); // fills the cache exactly
        full = full.min(run(n..2 * n)); // every put evicts one chunk
    }
    let evictions = chain
        .hot()
        .counters()
        .evictions
        .load(std::sync::atomic::Ordering::Relaxed);
    let (a, b) = (gbps(n * size, full), gbps(n * size, free));
    Row {
        name: format!("d. put while full and evicting (1 MiB chunks, {evictions} evictions)"),
        value: a,
        unit: "GB/s".into(),
        baseline: Some(b),
        ratio: Some(a / b),
        target: ">= 0.8x put with free space".into(),
        met: Some(a / b >= 0.8),
    }
}

/// Row e: get with a lower-tier hit through the C `mem` plugin, promoted into the hot cache.
fn row_e(opts: &MicroOptions, src: &MmapMut, dst: &mut MmapMut) -> Result<Row, String> {
    let size = 4 << 20;
    let n = (opts.working_set / 4 / size).max(4);
    let bytes = n * size;
    let config = Config::from_yaml(
        &format!(
            "chunk_size: 256\nstorage_plugins: [mem]\nextra_config:\n  storage_plugin.mem.module_path: kvhost_mem\n  \
             storage_plugin.mem.class_name: mem\n  storage_plugin.mem.capacity_bytes: {}\n",
            bytes * 2
        ),
        None,
    )
    .map_err(|e| e.to_string())?;
    let mem = loader::load(&config.plugins[0], &config)
        .map_err(|e| format!("{e} (build the workspace first)"))?;
    let ks = keys("bench-e", n);
    for (i, k) in ks.iter().enumerate() {
        let chunk = src[i * size..(i + 1) * size].to_vec();
        let d = mem
            .put_wait(
                PutRequest {
                    keys: vec![k.clone()],
                    bufs: vec![chunk],
                    metas: vec![meta(size)],
                },
                Duration::from_secs(30),
            )
            .map_err(|e| e.to_string())?;
        if let Some(e) = d.error {
            return Err(e.to_string());
        }
    }
    let mut settings = ChainSettings::from_config(&config);
    settings.cache = CacheConfig::new((bytes + (64 << 20)) as u64);
    let chain = Chain::new(settings, vec![mem]).map_err(|e| e.to_string())?;
    let (memcpy, _) = best(opts.reps, || {
        let t = Instant::now();
        for i in 0..n {
            dst[i * size..(i + 1) * size].copy_from_slice(&src[i * size..(i + 1) * size]);
        }
        (t.elapsed(), black_box(dst[0]))
    });
    let (promote, promoted) = best(opts.reps, || {
        chain.hot().clear();
        let t = Instant::now();
        let mut ok = 0;
        for k in &ks {
            ok += usize::from(chain.get(std::slice::from_ref(k))[0].is_some());
        }
        (t.elapsed(), ok)
    });
    if promoted != n {
        return Err(format!("only {promoted} of {n} chunks were promoted"));
    }
    let (a, b) = (gbps(bytes, promote), gbps(bytes, memcpy));
    chain.close(Duration::from_secs(10));
    Ok(Row {
        name: "e. get with a mem-plugin hit, promoted (4 MiB chunks)".into(),
        value: a,
        unit: "GB/s".into(),
        baseline: Some(b),
        ratio: Some(a / b),
        target: "report".into(),
        met: None,
    })
}

/// Run the suite; rows that cannot run are reported as errors in their name with value 0.
pub fn run(opts: MicroOptions, mut progress: impl FnMut(&str)) -> Vec<Row> {
    let mut rows = Vec::new();
    let src = mapped(opts.working_set, 0x5a);
    let mut dst = mapped(opts.working_set, 0);
    for size in [256 << 10, 1 << 20, 4 << 20, 32 << 20] {
        if size > opts.working_set / 4 {
            continue;
        }
        progress(&format!("a: {}", human(size)));
        rows.extend(row_a(size, &opts, &src, &mut dst));
    }
    progress("b: no-op plugin call");
    rows.push(row_b(&opts).unwrap_or_else(|e| failed("b. per-op cost, dlopen'd no-op plugin", &e)));
    progress("c: contains and lookup");
    rows.extend(row_c(&opts));
    progress("d: put while evicting");
    rows.push(row_d(&opts, &src));
    progress("e: promotion through mem");
    rows.push(
        row_e(&opts, &src, &mut dst).unwrap_or_else(|e| failed("e. get with a mem-plugin hit", &e)),
    );
    rows
}

fn failed(name: &str, why: &str) -> Row {
    Row {
        name: format!("{name} (FAILED: {why})"),
        value: 0.0,
        unit: String::new(),
        baseline: None,
        ratio: None,
        target: String::new(),
        met: Some(false),
    }
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
