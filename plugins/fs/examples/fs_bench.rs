//! `fs_bench`: sequential put and get throughput of the `fs` plugin, loaded through kvhost's loader,
//! against `dd` writing and reading the same bytes on the same filesystem, in the same run.
//!
//! ```text
//! cargo build --release -p kvhost-plugin-fs --example fs_bench
//! target/release/examples/fs_bench [--dir DIR] [--total-mib 1024] [--chunk-mib 4,32] [--reps 5]
//!                                  [--modes buffered,verify,fsync,direct] [--jobs 1,2]
//!                                  [--batched | --pipelined] [--unaligned] [--io-threads N]
//! ```
//!
//! Modes compare like with like:
//! - `buffered`: plugin `fsync=none`, buffered I/O, vs `dd bs=C` (no sync). Both end in the page cache,
//!   and both reads are served from it (nothing is dropped between write and read).
//! - `verify`: as `buffered`, with `verify_reads=always` (every get recomputes the data checksum; by
//!   default only a chunk's first read after start-up does, so the other modes do not).
//! - `fsync`: plugin `fsync=none` plus one `flush()` after the last put (inside the timed write), vs
//!   `dd conv=fsync`. Reads as in `buffered`.
//! - `direct`: plugin `o_direct=true`, vs `dd oflag=direct` / `dd iflag=direct`: device throughput,
//!   no page cache on either side.
//!
//! Every timed write starts after a `sync`, so write-back left by the previous run does not throttle
//! it. Each configuration runs `--reps` times, plugin and dd alternating which goes first; the median
//! of each figure is printed. The plugin is copied into the bench directory first, so a concurrent
//! rebuild of the workspace cannot swap the library mid-run.
//!
//! Concurrency (`--jobs J`, default 1): the plugin runs with `io_threads=max(J, 2)` (2 is its default;
//! `--io-threads N` overrides it; with 2 or more, one large chunk is read by several threads at once),
//! and J host threads each
//! put (then get) their 1/J of the chunks, one request of one chunk in flight per thread; the other
//! side runs J `dd` processes at once, each writing (then reading) its own file of 1/J of the bytes,
//! like `fio --numjobs=J --ioengine=psync`. With J=1 that is one put/get round trip through the host
//! per chunk against one `dd`, one write in flight on each side. The J chunks in flight can come
//! differently: `--batched`, one host thread sends one request of J chunks at a time (as the chain's
//! tier batches puts); `--pipelined`, one host thread keeps J one-chunk requests in flight.
//!
//! The plugin does more per chunk than `dd`: one file per chunk (write into a pre-created temporary
//! file, rename), an XXH3-64 checksum of every chunk on put, and a round trip through the host and
//! the plugin's I/O threads per request.

use kvhost::config::Config;
use kvhost::plugin::{DstBuf, GetItem, GetRequest, PluginBackend, PutRequest, SrcBuf, Status};
use kvhost::ChunkKey;
use kvhost_plugin_sdk::ChunkMeta;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const MIB: usize = 1 << 20;
const WAIT: Duration = Duration::from_secs(600);

/// A buffer at a 4096-aligned address (as the host's arena blocks are), or deliberately misaligned.
struct Buf {
    raw: Vec<u8>,
    off: usize,
    len: usize,
}

impl Buf {
    fn new(len: usize, aligned: bool) -> Buf {
        let raw = vec![0u8; len + 8192];
        let base = (4096 - raw.as_ptr() as usize % 4096) % 4096;
        let off = if aligned { base } else { base + 64 };
        Buf { raw, off, len }
    }
}

impl SrcBuf for Buf {
    fn bytes(&self) -> &[u8] {
        &self.raw[self.off..self.off + self.len]
    }
}

impl DstBuf for Buf {
    fn bytes_mut(&mut self) -> &mut [u8] {
        &mut self.raw[self.off..self.off + self.len]
    }
}

/// How the J chunks in flight reach the plugin.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Style {
    /// J host threads, each with one one-chunk request in flight.
    Streams,
    /// One host thread, one request of J chunks in flight.
    Batched,
    /// One host thread, J one-chunk requests in flight.
    Pipelined,
}

struct Args {
    dir: PathBuf,
    total_mib: usize,
    chunks_mib: Vec<usize>,
    modes: Vec<String>,
    aligned: bool,
    reps: usize,
    jobs: Vec<usize>,
    io_threads: Option<usize>,
    style: Style,
    so: PathBuf,
}

fn parse_args() -> Args {
    let mut a = Args {
        dir: std::env::temp_dir().join(format!("kvhost-fs-bench-{}", std::process::id())),
        total_mib: 1024,
        chunks_mib: vec![4, 32],
        modes: ["buffered", "verify", "fsync", "direct"]
            .map(String::from)
            .to_vec(),
        aligned: true,
        reps: 5,
        jobs: vec![1],
        io_threads: None,
        style: Style::Streams,
        so: PathBuf::new(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut val = || it.next().unwrap_or_else(|| panic!("{arg} needs a value"));
        match arg.as_str() {
            "--dir" => a.dir = PathBuf::from(val()),
            "--total-mib" => a.total_mib = val().parse().expect("--total-mib N"),
            "--chunk-mib" => {
                a.chunks_mib = val()
                    .split(',')
                    .map(|s| s.trim().parse().expect("--chunk-mib N[,N]"))
                    .collect()
            }
            "--modes" => a.modes = val().split(',').map(|s| s.trim().to_string()).collect(),
            "--unaligned" => a.aligned = false,
            "--batched" => a.style = Style::Batched,
            "--pipelined" => a.style = Style::Pipelined,
            "--reps" => a.reps = val().parse::<usize>().expect("--reps N").max(1),
            "--jobs" => {
                a.jobs = val()
                    .split(',')
                    .map(|s| s.trim().parse::<usize>().expect("--jobs N[,N]").max(1))
                    .collect()
            }
            "--io-threads" => a.io_threads = Some(val().parse().expect("--io-threads N")),
            "-h" | "--help" => {
                println!(
                    "fs_bench [--dir DIR] [--total-mib N] [--chunk-mib N,N] [--reps N] [--modes buffered,verify,fsync,direct] [--jobs N,N] [--batched | --pipelined] [--unaligned] [--io-threads N]"
                );
                std::process::exit(0);
            }
            other => panic!("unknown argument {other}"),
        }
    }
    a
}

/// The fs plugin's cdylib built with this example: the newer of `target/<profile>/libkvhost_fs.so`
/// and `target/<profile>/deps/libkvhost_fs.so` (building only the example refreshes the latter).
fn fs_so() -> PathBuf {
    let exe = std::env::current_exe().expect("exe path");
    let profile = exe.parent().and_then(|d| d.parent()).expect("profile dir");
    [
        profile.join("libkvhost_fs.so"),
        profile.join("deps").join("libkvhost_fs.so"),
    ]
    .into_iter()
    .filter_map(|p| Some((std::fs::metadata(&p).ok()?.modified().ok()?, p)))
    .max()
    .map(|(_, p)| p)
    .unwrap_or_else(|| {
        panic!(
            "libkvhost_fs.so not found under {}; build with `cargo build --release -p kvhost-plugin-fs --example fs_bench`",
            profile.display()
        )
    })
}

fn load(so: &Path, dir: &Path, options: &[(&str, &str)]) -> PluginBackend {
    let mut y = format!(
        "chunk_size: 256\nmodel:\n  name: bench/model\n  num_layers: 2\n  num_kv_heads: 2\n  head_size: 16\n  dtype: half\n\
         storage_plugins: [fs]\nextra_config:\n  storage_plugin.fs.module_path: \"{}\"\n  \
         storage_plugin.fs.class_name: fs\n  storage_plugin.fs.path: \"{}\"\n  storage_plugin.fs.max_size_gib: 64\n",
        so.display(),
        dir.display()
    );
    for (k, v) in options {
        y.push_str(&format!("  storage_plugin.fs.{k}: \"{v}\"\n"));
    }
    let config = Config::from_yaml(&y, None).unwrap_or_else(|e| panic!("{e}\n{y}"));
    kvhost::loader::load(&config.plugins[0], &config).unwrap_or_else(|e| panic!("{e}"))
}

fn meta(len: usize) -> ChunkMeta {
    ChunkMeta {
        length: len as u64,
        fmt: 1,
        dtype: 3,
        ndim: 1,
        shape: [len as i32, 0, 0, 0],
        reserved: 0,
    }
}

fn gbps(bytes: usize, d: Duration) -> f64 {
    bytes as f64 / d.as_secs_f64() / 1e9
}

/// Put `n` chunks of `chunk` bytes with `jobs` chunks in flight, as `style` says (timed, plus `flush`
/// when asked), then get them back the same way (timed). Returns (put, get) durations.
#[allow(clippy::too_many_arguments)]
fn plugin_run(
    so: &Path,
    dir: &Path,
    options: &[(&str, &str)],
    chunk: usize,
    n: usize,
    flush: bool,
    aligned: bool,
    jobs: usize,
    io_threads: usize,
    style: Style,
) -> (Duration, Duration, String) {
    let _ = std::fs::remove_dir_all(dir);
    let threads = io_threads.to_string();
    let mut options = options.to_vec();
    options.push(("io_threads", &threads));
    let p = load(so, dir, &options);
    let mut src = Buf::new(chunk, aligned);
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    for b in src.bytes_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    let expected = src.bytes().to_vec();
    let keys: Vec<ChunkKey> = (0..n)
        .map(|i| ChunkKey::new("bench/model", 1, 0, i as i128 + 1, "half").unwrap())
        .collect();
    // Every put of a job stores the same bytes from its own buffer.
    let mut srcs: Vec<Buf> = (1..jobs)
        .map(|_| {
            let mut b = Buf::new(chunk, aligned);
            b.bytes_mut().copy_from_slice(&expected);
            b
        })
        .collect();
    srcs.push(src);
    if style == Style::Batched {
        let (put, get) = batched_run(&p, &keys, srcs, &expected, chunk, aligned, flush);
        return finish_run(p, dir, put, get);
    }
    if style == Style::Streams {
        let (put, get) = streams_run(&p, &keys, srcs, &expected, chunk, aligned, flush);
        return finish_run(p, dir, put, get);
    }
    sync();
    let started = Instant::now();
    let (tx, rx) = crossbeam_channel::unbounded();
    let mut next = 0;
    let mut in_flight = 0;
    let put_next = |buf: Buf, next: &mut usize| {
        let tx = tx.clone();
        let req = PutRequest {
            keys: vec![keys[*next].clone()],
            bufs: vec![buf],
            metas: vec![meta(chunk)],
        };
        *next += 1;
        p.put(req, move |d| {
            let _ = tx.send(d);
        });
    };
    for buf in srcs {
        if next < n {
            put_next(buf, &mut next);
            in_flight += 1;
        }
    }
    while in_flight > 0 {
        let done = rx.recv_timeout(WAIT).expect("put completion");
        assert!(
            done.error.is_none() && done.items[0] == Status::OK,
            "{:?}",
            done.items
        );
        in_flight -= 1;
        let buf = done.request.bufs.into_iter().next().unwrap();
        if next < n {
            put_next(buf, &mut next);
            in_flight += 1;
        }
    }
    if flush {
        p.flush().expect("flush");
    }
    let put = started.elapsed();
    let (tx, rx) = crossbeam_channel::unbounded();
    let started = Instant::now();
    let mut next = 0;
    let get_next = |buf: Buf, next: &mut usize| {
        let tx = tx.clone();
        let req = GetRequest {
            keys: vec![keys[*next].clone()],
            bufs: vec![buf],
        };
        *next += 1;
        p.get(req, move |d| {
            let _ = tx.send(d);
        });
    };
    for _ in 0..jobs.min(n) {
        get_next(Buf::new(chunk, aligned), &mut next);
        in_flight += 1;
    }
    let mut last = None;
    while in_flight > 0 {
        let done = rx.recv_timeout(WAIT).expect("get completion");
        assert!(
            matches!(done.items[0], GetItem::Hit { len, .. } if len == chunk),
            "{:?}",
            done.items
        );
        in_flight -= 1;
        let buf = done.request.bufs.into_iter().next().unwrap();
        if next < n {
            get_next(buf, &mut next);
            in_flight += 1;
        } else {
            last = Some(buf);
        }
    }
    let get = started.elapsed();
    assert!(
        last.unwrap().bytes_mut() == &expected[..],
        "read back differs"
    );
    finish_run(p, dir, put, get)
}

/// `plugin_run` with one host thread per buffer in `srcs`, each putting (then getting) its share of
/// `keys` one chunk at a time.
fn streams_run(
    p: &PluginBackend,
    keys: &[ChunkKey],
    srcs: Vec<Buf>,
    expected: &[u8],
    chunk: usize,
    aligned: bool,
    flush: bool,
) -> (Duration, Duration) {
    let jobs = srcs.len();
    let share = keys.len().div_ceil(jobs);
    sync();
    let started = Instant::now();
    std::thread::scope(|s| {
        for (ks, src) in keys.chunks(share).zip(srcs) {
            s.spawn(move || {
                let mut src = Some(src);
                for k in ks {
                    let req = PutRequest {
                        keys: vec![k.clone()],
                        bufs: vec![src.take().unwrap()],
                        metas: vec![meta(chunk)],
                    };
                    let done = p.put_wait(req, WAIT).expect("put");
                    assert!(
                        done.error.is_none() && done.items[0] == Status::OK,
                        "{:?}",
                        done.items
                    );
                    src = done.request.bufs.into_iter().next();
                }
            });
        }
    });
    if flush {
        p.flush().expect("flush");
    }
    let put = started.elapsed();
    let started = Instant::now();
    std::thread::scope(|s| {
        for ks in keys.chunks(share) {
            s.spawn(move || {
                let mut dst = Some(Buf::new(chunk, aligned));
                for k in ks {
                    let req = GetRequest {
                        keys: vec![k.clone()],
                        bufs: vec![dst.take().unwrap()],
                    };
                    let done = p.get_wait(req, WAIT).expect("get");
                    assert!(
                        matches!(done.items[0], GetItem::Hit { len, .. } if len == chunk),
                        "{:?}",
                        done.items
                    );
                    dst = done.request.bufs.into_iter().next();
                }
                assert!(dst.unwrap().bytes_mut() == expected, "read back differs");
            });
        }
    });
    (put, started.elapsed())
}

/// `plugin_run` with requests of `srcs.len()` chunks, one request in flight.
fn batched_run(
    p: &PluginBackend,
    keys: &[ChunkKey],
    mut bufs: Vec<Buf>,
    expected: &[u8],
    chunk: usize,
    aligned: bool,
    flush: bool,
) -> (Duration, Duration) {
    let per = bufs.len();
    sync();
    let started = Instant::now();
    for group in keys.chunks(per) {
        let req = PutRequest {
            keys: group.to_vec(),
            bufs: bufs.drain(..group.len()).collect(),
            metas: vec![meta(chunk); group.len()],
        };
        let done = p.put_wait(req, WAIT).expect("put");
        assert!(
            done.error.is_none() && done.items.iter().all(|s| *s == Status::OK),
            "{:?}",
            done.items
        );
        bufs.extend(done.request.bufs);
    }
    if flush {
        p.flush().expect("flush");
    }
    let put = started.elapsed();
    let mut dsts: Vec<Buf> = (0..per).map(|_| Buf::new(chunk, aligned)).collect();
    let started = Instant::now();
    for group in keys.chunks(per) {
        let req = GetRequest {
            keys: group.to_vec(),
            bufs: dsts.drain(..group.len()).collect(),
        };
        let done = p.get_wait(req, WAIT).expect("get");
        assert!(
            done.items
                .iter()
                .all(|i| matches!(i, GetItem::Hit { len, .. } if *len == chunk)),
            "{:?}",
            done.items
        );
        dsts.extend(done.request.bufs);
    }
    let get = started.elapsed();
    assert!(
        dsts.iter_mut().all(|d| d.bytes_mut() == expected),
        "read back differs"
    );
    (put, get)
}

/// The o_direct state the plugin reports, after dropping it and its directory.
fn finish_run(
    p: PluginBackend,
    dir: &Path,
    put: Duration,
    get: Duration,
) -> (Duration, Duration, String) {
    let health = p.health().expect("health").expect("healthy");
    let state = health
        .split("o_direct=")
        .nth(1)
        .and_then(|s| s.split(',').next())
        .unwrap_or("?")
        .to_string();
    drop(p);
    let _ = std::fs::remove_dir_all(dir);
    (put, get, state)
}

/// Write back every dirty page (drops nothing from the cache).
fn sync() {
    let _ = Command::new("sync").status();
}

/// Median, min and max.
fn stats(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(f64::total_cmp);
    (v[v.len() / 2], v[0], v[v.len() - 1])
}

/// Run `dd` once per argument list, all at once; the time until the last one ends.
fn dd(runs: &[Vec<String>]) -> Duration {
    let started = Instant::now();
    let children: Vec<_> = runs
        .iter()
        .map(|args| {
            let child = Command::new("dd")
                .args(args)
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .expect("run dd");
            (args, child)
        })
        .collect();
    for (args, child) in children {
        let out = child.wait_with_output().expect("wait for dd");
        assert!(
            out.status.success(),
            "dd {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    started.elapsed()
}

/// `jobs` dd processes at once, each writing `n / jobs` blocks of `chunk_mib` MiB to its own file,
/// then each reading its file back. Returns (write, read) durations and the commands.
fn dd_run(
    base: &Path,
    mode: &str,
    chunk_mib: usize,
    n: usize,
    jobs: usize,
) -> (Duration, Duration, String) {
    let files: Vec<PathBuf> = (0..jobs)
        .map(|j| base.with_extension(format!("{j}.bin")))
        .collect();
    let mut writes = Vec::new();
    let mut reads = Vec::new();
    for (j, file) in files.iter().enumerate() {
        let count = n / jobs + usize::from(j < n % jobs);
        let f = file.display();
        let mut w = vec![
            "if=/dev/zero".to_string(),
            format!("of={f}"),
            format!("bs={chunk_mib}M"),
            format!("count={count}"),
        ];
        let mut r = vec![
            format!("if={f}"),
            "of=/dev/null".to_string(),
            format!("bs={chunk_mib}M"),
        ];
        match mode {
            "fsync" => w.push("conv=fsync".into()),
            "direct" => {
                w.push("oflag=direct".into());
                r.push("iflag=direct".into());
            }
            _ => {}
        }
        writes.push(w);
        reads.push(r);
    }
    for f in &files {
        let _ = std::fs::remove_file(f);
    }
    sync();
    let write = dd(&writes);
    let read = dd(&reads);
    for f in &files {
        let _ = std::fs::remove_file(f);
    }
    let cmd = format!(
        "{}dd {} ; dd {}",
        if jobs > 1 {
            format!("{jobs} at once: ")
        } else {
            String::new()
        },
        writes[0].join(" "),
        reads[0].join(" ")
    );
    (write, read, cmd)
}

fn main() {
    let mut a = parse_args();
    std::fs::create_dir_all(&a.dir).expect("bench dir");
    a.so = a.dir.join("libkvhost_fs.so");
    std::fs::copy(fs_so(), &a.so).expect("copy the plugin");
    println!(
        "fs_bench: {} MiB per run, median of {} runs, in {} ({} host buffers), plugin io_threads {}, plugin {} (copied from {})",
        a.total_mib,
        a.reps,
        a.dir.display(),
        if a.aligned {
            "4096-aligned"
        } else {
            "misaligned"
        },
        a.io_threads
            .map_or("max(jobs, 2)".to_string(), |n| n.to_string()),
        a.so.display(),
        fs_so().display()
    );
    println!(
        "{:<9} {:>6} {:>5} {:>4} | {:>10} {:>10} {:>6} | {:>10} {:>10} {:>6} | o_direct",
        "mode",
        "chunk",
        "n",
        "jobs",
        "put GB/s",
        "dd w GB/s",
        "ratio",
        "get GB/s",
        "dd r GB/s",
        "ratio"
    );
    // Warm-up, discarded: the first large write after a quiet period is often slow.
    dd_run(
        &a.dir.join("warmup"),
        "buffered",
        4,
        (a.total_mib / 4).max(1),
        1,
    );
    let mut ratios = Vec::new();
    for mode in &a.modes {
        let (options, flush, dd_mode): (Vec<(&str, &str)>, bool, &str) = match mode.as_str() {
            "buffered" => (
                vec![("fsync", "none"), ("o_direct", "false")],
                false,
                "buffered",
            ),
            "verify" => (
                vec![
                    ("fsync", "none"),
                    ("o_direct", "false"),
                    ("verify_reads", "always"),
                ],
                false,
                "buffered",
            ),
            "fsync" => (
                vec![("fsync", "none"), ("o_direct", "false")],
                true,
                "fsync",
            ),
            "direct" => (
                vec![("fsync", "none"), ("o_direct", "true")],
                false,
                "direct",
            ),
            other => panic!("unknown mode {other}"),
        };
        for (&c, &jobs) in a
            .chunks_mib
            .iter()
            .flat_map(|c| a.jobs.iter().map(move |j| (c, j)))
        {
            let chunk = c * MIB;
            let n = (a.total_mib / c).max(1);
            let total = n * chunk;
            let (mut pp, mut pg, mut dw, mut dr) = (vec![], vec![], vec![], vec![]);
            let (mut state, mut cmd) = (String::new(), String::new());
            for rep in 0..a.reps {
                let mut run_plugin = || {
                    let (put, get, st) = plugin_run(
                        &a.so,
                        &a.dir.join(format!("plugin-{mode}-{c}")),
                        &options,
                        chunk,
                        n,
                        flush,
                        a.aligned,
                        jobs,
                        a.io_threads.unwrap_or(jobs.max(2)),
                        a.style,
                    );
                    pp.push(gbps(total, put));
                    pg.push(gbps(total, get));
                    state = st;
                };
                let mut run_dd = || {
                    let (w, r, c2) =
                        dd_run(&a.dir.join(format!("dd-{mode}-{c}")), dd_mode, c, n, jobs);
                    dw.push(gbps(total, w));
                    dr.push(gbps(total, r));
                    cmd = c2;
                };
                if rep % 2 == 0 {
                    run_plugin();
                    run_dd();
                } else {
                    run_dd();
                    run_plugin();
                }
            }
            // Ratio of each rep's plugin run to its dd run (run next to it).
            let pair = |p: &[f64], d: &[f64]| stats(p.iter().zip(d).map(|(p, d)| p / d).collect());
            let (put_pair, get_pair) = (pair(&pp, &dw), pair(&pg, &dr));
            let (pp, pg, dw, dr) = (stats(pp), stats(pg), stats(dw), stats(dr));
            println!(
                "{mode:<9} {:>4}Mi {n:>5} {jobs:>4} | {:>10.2} {:>10.2} {:>5.2}x | {:>10.2} {:>10.2} {:>5.2}x | {state}",
                c,
                pp.0,
                dw.0,
                pp.0 / dw.0,
                pg.0,
                dr.0,
                pg.0 / dr.0
            );
            println!(
                "          spread (min-max): put {:.2}-{:.2}, dd w {:.2}-{:.2}, get {:.2}-{:.2}, dd r {:.2}-{:.2}; \
                 per-rep ratio put {:.2}-{:.2}, get {:.2}-{:.2}",
                pp.1, pp.2, dw.1, dw.2, pg.1, pg.2, dr.1, dr.2, put_pair.1, put_pair.2, get_pair.1, get_pair.2
            );
            println!("          {cmd}");
            let (pp, pg, dw, dr) = (pp.0, pg.0, dw.0, dr.0);
            ratios.push((format!("{mode} x{jobs}"), c, pp / dw, pg / dr));
            match a.style {
                _ if jobs == 1 => {}
                Style::Streams => {
                    println!("          plugin: {jobs} host threads, one chunk each in flight")
                }
                Style::Batched => println!(
                    "          plugin: one host thread, one request of {jobs} chunks at a time"
                ),
                Style::Pipelined => println!(
                    "          plugin: one host thread, {jobs} one-chunk requests in flight"
                ),
            }
        }
    }
    let _ = std::fs::remove_dir_all(&a.dir);
    for (what, idx) in [("put", 0), ("get", 1)] {
        let worst = ratios
            .iter()
            .min_by(|x, y| {
                let (a, b) = if idx == 0 { (x.2, y.2) } else { (x.3, y.3) };
                a.total_cmp(&b)
            })
            .expect("at least one run");
        let r = if idx == 0 { worst.2 } else { worst.3 };
        println!(
            "worst {what} ratio: {r:.2}x ({} {} MiB); target >= 0.8x",
            worst.0, worst.1
        );
    }
}
