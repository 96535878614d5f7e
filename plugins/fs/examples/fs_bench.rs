//! `fs_bench`: sequential put and get throughput of the `fs` plugin, loaded through kvhost's loader,
//! against `dd` writing and reading the same bytes on the same filesystem, in the same run.
//!
//! ```text
//! cargo build --release -p kvhost-plugin-fs --example fs_bench
//! target/release/examples/fs_bench [--dir DIR] [--total-mib 1024] [--chunk-mib 4,32] [--reps 3]
//!                                  [--modes buffered,verify,fsync,direct] [--unaligned]
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
//! The plugin does more per chunk than `dd`: one file per chunk (create, write, rename), an XXH3-64
//! checksum of every chunk on put, and one put/get round trip through the host per chunk (one chunk
//! in flight at a time, as `dd` has one write in flight).

use kvhost::config::Config;
use kvhost::plugin::{DstBuf, GetItem, GetRequest, PluginBackend, PutRequest, SrcBuf, Status};
use kvhost::ChunkKey;
use kvhost_plugin_sdk::ChunkMeta;
use std::path::{Path, PathBuf};
use std::process::Command;
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

struct Args {
    dir: PathBuf,
    total_mib: usize,
    chunks_mib: Vec<usize>,
    modes: Vec<String>,
    aligned: bool,
    reps: usize,
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
        reps: 3,
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
            "--reps" => a.reps = val().parse::<usize>().expect("--reps N").max(1),
            "-h" | "--help" => {
                println!(
                    "fs_bench [--dir DIR] [--total-mib N] [--chunk-mib N,N] [--reps N] [--modes buffered,verify,fsync,direct] [--unaligned]"
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

/// Put `n` chunks of `chunk` bytes one at a time (timed, plus `flush` when asked), then get them back
/// one at a time (timed). Returns (put, get) durations.
fn plugin_run(
    so: &Path,
    dir: &Path,
    options: &[(&str, &str)],
    chunk: usize,
    n: usize,
    flush: bool,
    aligned: bool,
) -> (Duration, Duration, String) {
    let _ = std::fs::remove_dir_all(dir);
    let p = load(so, dir, options);
    let mut src = Buf::new(chunk, aligned);
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    for b in src.bytes_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    let keys: Vec<ChunkKey> = (0..n)
        .map(|i| ChunkKey::new("bench/model", 1, 0, i as i128 + 1, "half").unwrap())
        .collect();
    let mut src = Some(src);
    sync();
    let started = Instant::now();
    for k in &keys {
        let done = p
            .put_wait(
                PutRequest {
                    keys: vec![k.clone()],
                    bufs: vec![src.take().unwrap()],
                    metas: vec![meta(chunk)],
                },
                WAIT,
            )
            .expect("put");
        assert!(
            done.error.is_none() && done.items[0] == Status::OK,
            "{:?}",
            done.items
        );
        src = done.request.bufs.into_iter().next();
    }
    if flush {
        p.flush().expect("flush");
    }
    let put = started.elapsed();
    let mut dst = Some(Buf::new(chunk, aligned));
    let started = Instant::now();
    for k in &keys {
        let done = p
            .get_wait(
                GetRequest {
                    keys: vec![k.clone()],
                    bufs: vec![dst.take().unwrap()],
                },
                WAIT,
            )
            .expect("get");
        assert!(
            matches!(done.items[0], GetItem::Hit { len, .. } if len == chunk),
            "{:?}",
            done.items
        );
        dst = done.request.bufs.into_iter().next();
    }
    let get = started.elapsed();
    assert!(
        dst.unwrap().bytes_mut() == src.unwrap().bytes_mut(),
        "read back differs"
    );
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

fn dd(args: &[String]) -> Duration {
    let started = Instant::now();
    let out = Command::new("dd").args(args).output().expect("run dd");
    let d = started.elapsed();
    assert!(
        out.status.success(),
        "dd {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    d
}

fn dd_run(file: &Path, mode: &str, chunk_mib: usize, n: usize) -> (Duration, Duration, String) {
    let f = file.display();
    let mut w = vec![
        "if=/dev/zero".to_string(),
        format!("of={f}"),
        format!("bs={chunk_mib}M"),
        format!("count={n}"),
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
    let _ = std::fs::remove_file(file);
    sync();
    let write = dd(&w);
    let read = dd(&r);
    let _ = std::fs::remove_file(file);
    (
        write,
        read,
        format!("dd {} ; dd {}", w.join(" "), r.join(" ")),
    )
}

fn main() {
    let mut a = parse_args();
    std::fs::create_dir_all(&a.dir).expect("bench dir");
    a.so = a.dir.join("libkvhost_fs.so");
    std::fs::copy(fs_so(), &a.so).expect("copy the plugin");
    println!(
        "fs_bench: {} MiB per run, median of {} runs, in {} ({} host buffers), plugin {} (copied from {})",
        a.total_mib,
        a.reps,
        a.dir.display(),
        if a.aligned {
            "4096-aligned"
        } else {
            "misaligned"
        },
        a.so.display(),
        fs_so().display()
    );
    println!(
        "{:<9} {:>6} {:>5} | {:>10} {:>10} {:>6} | {:>10} {:>10} {:>6} | o_direct",
        "mode", "chunk", "n", "put GB/s", "dd w GB/s", "ratio", "get GB/s", "dd r GB/s", "ratio"
    );
    // Warm-up, discarded: the first large write after a quiet period is often slow.
    dd_run(
        &a.dir.join("warmup.bin"),
        "buffered",
        4,
        (a.total_mib / 4).max(1),
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
        for &c in &a.chunks_mib {
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
                    );
                    pp.push(gbps(total, put));
                    pg.push(gbps(total, get));
                    state = st;
                };
                let mut run_dd = || {
                    let (w, r, c2) =
                        dd_run(&a.dir.join(format!("dd-{mode}-{c}.bin")), dd_mode, c, n);
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
            let (pp, pg, dw, dr) = (stats(pp), stats(pg), stats(dw), stats(dr));
            println!(
                "{mode:<9} {:>4}Mi {n:>5} | {:>10.2} {:>10.2} {:>5.2}x | {:>10.2} {:>10.2} {:>5.2}x | {state}",
                c,
                pp.0,
                dw.0,
                pp.0 / dw.0,
                pg.0,
                dr.0,
                pg.0 / dr.0
            );
            println!(
                "          spread (min-max): put {:.2}-{:.2}, dd w {:.2}-{:.2}, get {:.2}-{:.2}, dd r {:.2}-{:.2}",
                pp.1, pp.2, dw.1, dw.2, pg.1, pg.2, dr.1, dr.2
            );
            println!("          {cmd}");
            let (pp, pg, dw, dr) = (pp.0, pg.0, dw.0, dr.0);
            ratios.push((mode.clone(), c, pp / dw, pg / dr));
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
