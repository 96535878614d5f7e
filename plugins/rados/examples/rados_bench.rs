//! `rados_bench`: put and get throughput of the `rados` plugin, loaded through kvhost's loader, against
//! `rados bench` (write, then seq) with the same object size and concurrency on the same cluster, in the
//! same run.
//!
//! ```text
//! cargo build --release -p kvhost-plugin-rados --example rados_bench
//! target/release/examples/rados_bench [--conf CEPH.CONF --pool POOL] [--sizes-mib 1,4] [--total-mib 1024]
//!                                     [--concurrency 16] [--batch 8] [--reps 5] [--checksum true,false]
//!                                     [--settle-ms 2000] [--verbose] [--also OTHER/libkvhost_rados.so]
//!                                     [--glibc-daemons]
//! ```
//!
//! Without `--conf` it starts a throw-away one-node memstore cluster with `tests/ceph/one-node-cluster.sh`
//! for each configuration (and stops it after), its daemons on tcmalloc when it is installed (as upstream
//! Ceph builds; `--glibc-daemons` keeps glibc's malloc, see `Cluster::start` for why): memstore's byte
//! counter drifts under heavy write/delete churn (it once underflowed here after some 30 GB, and the OSD
//! then called itself full), and a fresh OSD per configuration also keeps one configuration's memory
//! state out of the next. Each cluster is
//! warmed up first (see below). Like with like:
//! - one object per chunk: the plugin runs with `max_object_bytes` = the chunk size, `rados bench` with
//!   `-b` = the same size; both write `--total-mib` in objects of that size;
//! - the same concurrency: the plugin's `max_in_flight` and `rados bench -t`;
//! - what they check on read: `rados bench seq` compares every object's contents; the plugin checks every
//!   chunk's header, key and sizes, and with `checksum=true` also its data CRC32C (one pass over the
//!   bytes, like rados bench's compare). Both settings run by default (`--checksum true,false`); the
//!   plugin's default is `false`;
//! - the plugin is fed as the chain feeds it: put/get batches of `--batch` chunks, enough of them
//!   outstanding to keep `max_in_flight` operations busy; every get's length and metadata are checked,
//!   and every 8th chunk's bytes compared;
//! - each configuration runs `--reps` times, plugin and `rados bench` alternating which goes first; the
//!   median of each figure is printed (with its min-max spread), and the median of the per-rep ratios
//!   (both sides of a rep run back to back, so that ratio is the least sensitive to whatever else the
//!   machine is doing). Everything is deleted between runs, so memstore does not grow, and the next run
//!   starts `--settle-ms` later.
//!
//! `--also` measures a second build of the plugin (say the one before a change) in the same reps, in its
//! own namespace, the order of the sides rotating from rep to rep: a before/after comparison that one run
//! after the other on a busy machine cannot give.
//!
//! It also prints CPU seconds per GB moved, for the client (this process with librados' threads, or the
//! `rados` process) and for the OSD (when it started the cluster itself): on a small machine the OSD and
//! the client share the cores, so client CPU is taken from the OSD.

use kvhost::config::Config;
use kvhost::plugin::{GetItem, GetRequest, PluginBackend, PutRequest, Status};
use kvhost::ChunkKey;
use kvhost_plugin_sdk::ChunkMeta;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

const MIB: usize = 1 << 20;

struct Args {
    conf: Option<String>,
    pool: String,
    sizes_mib: Vec<usize>,
    total_mib: usize,
    concurrency: usize,
    batch: usize,
    reps: usize,
    checksum: Vec<bool>,
    settle_ms: u64,
    verbose: bool,
    also: Option<PathBuf>,
    glibc_daemons: bool,
}

fn parse_args() -> Args {
    let mut a = Args {
        conf: None,
        pool: "kvcache".to_string(),
        sizes_mib: vec![1, 4],
        total_mib: 1024,
        concurrency: 16,
        batch: 8,
        reps: 5,
        checksum: vec![true, false],
        settle_ms: 2000,
        verbose: false,
        also: None,
        glibc_daemons: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut val = || it.next().unwrap_or_else(|| panic!("{arg} needs a value"));
        match arg.as_str() {
            "--conf" => a.conf = Some(val()),
            "--pool" => a.pool = val(),
            "--sizes-mib" => {
                a.sizes_mib = val()
                    .split(',')
                    .map(|s| s.trim().parse().expect("--sizes-mib N[,N]"))
                    .collect()
            }
            "--total-mib" => a.total_mib = val().parse().expect("--total-mib N"),
            "--concurrency" => {
                a.concurrency = val().parse::<usize>().expect("--concurrency N").max(1)
            }
            "--batch" => a.batch = val().parse::<usize>().expect("--batch N").max(1),
            "--reps" => a.reps = val().parse::<usize>().expect("--reps N").max(1),
            "--checksum" => {
                a.checksum = val()
                    .split(',')
                    .map(|s| s.trim().parse().expect("--checksum true[,false]"))
                    .collect()
            }
            "--settle-ms" => a.settle_ms = val().parse().expect("--settle-ms N"),
            "--verbose" => a.verbose = true,
            "--also" => a.also = Some(PathBuf::from(val())),
            "--glibc-daemons" => a.glibc_daemons = true,
            "-h" | "--help" => {
                println!(
                    "rados_bench [--conf CEPH.CONF --pool POOL] [--sizes-mib 1,4] [--total-mib 1024] \
                     [--concurrency 16] [--batch 8] [--reps 5] [--checksum true,false] [--settle-ms 2000] \
                     [--verbose] [--also OTHER/libkvhost_rados.so] [--glibc-daemons]"
                );
                std::process::exit(0);
            }
            other => panic!("unknown argument {other}"),
        }
    }
    a
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The plugin the workspace build put next to this example: `target/<profile>/plugins/`.
fn plugin_so() -> PathBuf {
    let exe = std::env::current_exe().expect("exe path");
    let profile = exe.parent().and_then(|d| d.parent()).expect("profile dir");
    let so = profile.join("plugins").join("libkvhost_rados.so");
    assert!(
        so.is_file(),
        "{} not found: was librados-dev installed when the workspace was built?",
        so.display()
    );
    so
}

/// A throw-away cluster, stopped on drop.
struct Cluster {
    dir: PathBuf,
    conf: String,
}

impl Cluster {
    fn osd_pid(&self) -> Option<u32> {
        std::fs::read_to_string(self.dir.join("pids/osd.pid"))
            .ok()
            .and_then(|p| p.trim().parse().ok())
    }
}

/// tcmalloc, where distributions install it.
fn tcmalloc() -> Option<PathBuf> {
    [
        "/usr/lib/x86_64-linux-gnu",
        "/usr/lib/aarch64-linux-gnu",
        "/usr/lib64",
        "/usr/lib",
    ]
    .iter()
    .map(|dir| Path::new(dir).join("libtcmalloc.so.4"))
    .find(|so| so.is_file())
}

impl Cluster {
    fn start(pool: &str, n: usize, malloc: Option<&Path>) -> Cluster {
        let dir = std::env::temp_dir().join(format!("kvh-rados-bench-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        // memstore keeps the data in the OSD's RAM; the device size only matters for the full ratio.
        // The daemons (not this process, not the rados CLI) keep what their malloc frees instead of
        // returning it to the kernel: otherwise the OSD page-faults and zeroes its memory again after
        // every deletion, which costs it two to four times more CPU per GB on the next writes and makes
        // the figures depend on which side ran after a cleanup.
        //
        // With tcmalloc when installed (upstream Ceph builds link it; this ceph-osd uses glibc's malloc):
        // with glibc's, memstore's long-lived small allocations fragment the heap, so after rados bench
        // freed its 1 MiB objects the plugin's 1 MiB + 4 KiB heads do not fit the holes and the OSD
        // faults in ~400 MB of fresh memory per GB the plugin writes (measured: 93k-113k faults per GiB
        // against rados bench's 25k-50k), while rados bench's smaller objects reuse the plugin's holes.
        // tcmalloc keeps small and large allocations apart: after warm-up neither side faults.
        let mut script = Command::new(repo_root().join("tests/ceph/one-node-cluster.sh"));
        script.env(
            "GLIBC_TUNABLES",
            "glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=17179869184",
        );
        if let Some(so) = malloc {
            script
                .env("LD_PRELOAD", so)
                .env("TCMALLOC_RELEASE_RATE", "0");
        }
        let out = script
            .arg("start")
            .arg(&dir)
            .args([
                "--pool",
                pool,
                "--memstore-bytes",
                &(64u64 << 30).to_string(),
            ])
            .args([
                "--pg-num",
                "32",
                "--owner-pid",
                &std::process::id().to_string(),
            ])
            .output()
            .expect("run tests/ceph/one-node-cluster.sh");
        assert!(
            out.status.success(),
            "starting a cluster failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let conf = String::from_utf8_lossy(&out.stdout)
            .lines()
            .last()
            .unwrap()
            .trim()
            .to_string();
        // Ballast: 64 MiB that stay stored. memstore's byte counter drifts by a few hundred KiB over
        // gigabytes of writes and deletions; with the store emptied after every run, a drift below zero
        // wraps around, the OSD then reports itself full, and rados bench (which does not set FULL_TRY)
        // waits forever. With the ballast the counter never gets near zero.
        let ballast = dir.join("ballast");
        std::fs::write(&ballast, pattern(99, 4 * MIB)).expect("write the ballast file");
        for i in 0..16 {
            rados(
                &conf,
                pool,
                &[
                    "put",
                    &format!("kvh-bench-ballast-{i}"),
                    ballast.to_str().unwrap(),
                ],
            );
        }
        Cluster { dir, conf }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = Command::new(repo_root().join("tests/ceph/one-node-cluster.sh"))
            .arg("stop")
            .arg(&self.dir)
            .output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn load(so: &Path, conf: &str, pool: &str, options: &[(&str, String)]) -> PluginBackend {
    let mut y = format!(
        "chunk_size: 256\nmodel:\n  name: bench/model\n  num_layers: 2\n  num_kv_heads: 2\n  head_size: 16\n  dtype: half\n\
         storage_plugins: [rados]\nextra_config:\n  storage_plugin.rados.module_path: \"{}\"\n  \
         storage_plugin.rados.class_name: rados\n  storage_plugin.rados.conf: \"{conf}\"\n  \
         storage_plugin.rados.pool: \"{pool}\"\n",
        so.display()
    );
    for (k, v) in options {
        y.push_str(&format!("  storage_plugin.rados.{k}: \"{v}\"\n"));
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

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// CPU seconds (user + system) of this process, every thread.
fn cpu_self() -> f64 {
    rusage(libc::RUSAGE_SELF)
}

/// CPU seconds of the children waited for so far (the `rados bench` runs).
fn cpu_children() -> f64 {
    rusage(libc::RUSAGE_CHILDREN)
}

fn rusage(who: libc::c_int) -> f64 {
    // SAFETY: getrusage writes one rusage into the zeroed struct it is given.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: as above; `u` is a valid, writable rusage.
    unsafe { libc::getrusage(who, &mut u) };
    let t = |v: libc::timeval| v.tv_sec as f64 + v.tv_usec as f64 / 1e6;
    t(u.ru_utime) + t(u.ru_stime)
}

/// CPU seconds of process `pid` (from /proc), or 0 when unknown.
fn cpu_pid(pid: Option<u32>) -> f64 {
    let Some(pid) = pid else { return 0.0 };
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let field = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (field(11) + field(12)) / ticks // utime, stime (fields 14 and 15 of stat)
}

/// Outstanding batches, bounded.
struct Window {
    used: Mutex<usize>,
    freed: Condvar,
}

impl Window {
    fn acquire(&self, max: usize) {
        let mut used = self.used.lock().unwrap();
        while *used >= max {
            used = self.freed.wait(used).unwrap();
        }
        *used += 1;
    }
    fn release(&self) {
        *self.used.lock().unwrap() -= 1;
        self.freed.notify_all();
    }
    fn drain(&self) {
        let mut used = self.used.lock().unwrap();
        while *used > 0 {
            used = self.freed.wait(used).unwrap();
        }
    }
}

/// What one run measured: seconds, client CPU seconds and OSD CPU seconds, for the write and the read.
#[derive(Default, Clone, Copy)]
struct Phase {
    secs: f64,
    client_cpu: f64,
    osd_cpu: f64,
}

/// Puts `n` chunks of `size` bytes, then gets them back.
fn plugin_run(
    p: &PluginBackend,
    a: &Args,
    size: usize,
    n: usize,
    run: usize,
    osd: Option<u32>,
) -> (Phase, Phase) {
    let sources: Vec<Arc<[u8]>> = (0..8).map(|s| Arc::from(pattern(s + 1, size))).collect();
    let keys: Vec<ChunkKey> = (0..n)
        .map(|i| {
            ChunkKey::new(
                "bench/model",
                1,
                0,
                (run * 1_000_000 + i) as i128 + 1,
                "half",
            )
            .unwrap()
        })
        .collect();
    let window = Arc::new(Window {
        used: Mutex::new(0),
        freed: Condvar::new(),
    });
    // Enough batches outstanding that max_in_flight operations are always busy: a batch completes when
    // its last chunk does, so twice as many chunks as operations in flight are submitted at any time.
    let max_batches = (4 * a.concurrency).div_ceil(a.batch).max(2);
    let failures = Arc::new(Mutex::new(Vec::<String>::new()));

    let (cpu0, osd0) = (cpu_self(), cpu_pid(osd));
    let started = Instant::now();
    for (b, chunk) in keys.chunks(a.batch).enumerate() {
        window.acquire(max_batches);
        let request = PutRequest {
            keys: chunk.to_vec(),
            bufs: (0..chunk.len())
                .map(|i| sources[(b * a.batch + i) % sources.len()].clone())
                .collect(),
            metas: vec![meta(size); chunk.len()],
        };
        let (window, failures) = (window.clone(), failures.clone());
        p.put(request, move |done| {
            if done.error.is_some() || done.items.iter().any(|s| *s != Status::OK) {
                failures
                    .lock()
                    .unwrap()
                    .push(format!("put: {:?} {:?}", done.error, done.items));
            }
            drop(done);
            window.release();
        });
    }
    window.drain();
    let put = Phase {
        secs: started.elapsed().as_secs_f64(),
        client_cpu: cpu_self() - cpu0,
        osd_cpu: cpu_pid(osd) - osd0,
    };
    assert!(
        failures.lock().unwrap().is_empty(),
        "{:?}",
        failures.lock().unwrap()
    );

    let buffers: Arc<Mutex<Vec<Vec<u8>>>> = Arc::new(Mutex::new(
        (0..max_batches * a.batch)
            .map(|_| vec![0u8; size])
            .collect(),
    ));
    let (cpu0, osd0) = (cpu_self(), cpu_pid(osd));
    let started = Instant::now();
    for (b, chunk) in keys.chunks(a.batch).enumerate() {
        window.acquire(max_batches);
        let bufs: Vec<Vec<u8>> = {
            let mut pool = buffers.lock().unwrap();
            (0..chunk.len())
                .map(|_| pool.pop().expect("a free buffer"))
                .collect()
        };
        let request = GetRequest {
            keys: chunk.to_vec(),
            bufs,
        };
        let (window, failures, buffers) = (window.clone(), failures.clone(), buffers.clone());
        let sources = sources.clone();
        let batch = a.batch;
        p.get(request, move |done| {
            for (i, item) in done.items.iter().enumerate() {
                let index = b * batch + i;
                match item {
                    GetItem::Hit { len, meta: m } if *len == size && *m == meta(size) => {
                        if index.is_multiple_of(8)
                            && done.request.bufs[i][..] != sources[index % sources.len()][..]
                        {
                            failures
                                .lock()
                                .unwrap()
                                .push(format!("get {index}: wrong bytes"));
                        }
                    }
                    other => failures
                        .lock()
                        .unwrap()
                        .push(format!("get {index}: {other:?}")),
                }
            }
            buffers.lock().unwrap().extend(done.request.bufs);
            window.release();
        });
    }
    window.drain();
    let get = Phase {
        secs: started.elapsed().as_secs_f64(),
        client_cpu: cpu_self() - cpu0,
        osd_cpu: cpu_pid(osd) - osd0,
    };
    assert!(
        failures.lock().unwrap().is_empty(),
        "{:?}",
        failures.lock().unwrap()
    );
    p.clear().expect("clear");
    settle(a.settle_ms);
    (put, get)
}

/// A pause after deleting a run's objects, so that what the OSD does after the deletions is not
/// charged to whichever side runs next.
fn settle(ms: u64) {
    std::thread::sleep(Duration::from_millis(ms));
}

/// Seconds and objects from `rados bench` output ("Total time run", "Total writes/reads made").
fn bench_figures(text: &str, made: &str) -> (f64, usize) {
    let field = |name: &str| -> Option<String> {
        text.lines()
            .find(|l| l.trim_start().starts_with(name))
            .and_then(|l| l.split(':').nth(1))
            .map(|v| v.trim().to_string())
    };
    let seconds: f64 = field("Total time run")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no total time in rados bench output:\n{text}"));
    let objects: usize = field(made)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no `{made}` in rados bench output:\n{text}"));
    (seconds, objects)
}

fn rados(conf: &str, pool: &str, args: &[&str]) -> String {
    // A deadline for every operation, so that a cluster in trouble fails the run instead of hanging it.
    let out = Command::new("timeout")
        .args([
            "900",
            "rados",
            "-c",
            conf,
            "-p",
            pool,
            "--rados_osd_op_timeout",
            "120",
        ])
        .args(args)
        .output()
        .expect("run rados");
    assert!(
        out.status.success(),
        "rados {}: {}\n{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `rados bench write` of `n` objects of `size`, then `seq` over them. The figures are rados bench's own
/// (time run, objects made); the CPU is that of the `rados` process and of the OSD around it.
fn rados_bench_run(
    a: &Args,
    conf: &str,
    size: usize,
    n: usize,
    run: usize,
    osd: Option<u32>,
) -> (Phase, Phase, String) {
    let (pool, c) = (a.pool.as_str(), a.concurrency);
    let name = format!("kvh-bench-{run}");
    let (size_s, n_s, c_s) = (size.to_string(), n.to_string(), c.to_string());
    let (cpu0, osd0) = (cpu_children(), cpu_pid(osd));
    let write = rados(
        conf,
        pool,
        &[
            "bench",
            "600",
            "write",
            "-b",
            &size_s,
            "-t",
            &c_s,
            "--max-objects",
            &n_s,
            "--no-cleanup",
            "--run-name",
            &name,
        ],
    );
    let (ws, wn) = bench_figures(&write, "Total writes made");
    let (cpu1, osd1) = (cpu_children(), cpu_pid(osd));
    let read = rados(
        conf,
        pool,
        &["bench", "600", "seq", "-t", &c_s, "--run-name", &name],
    );
    let (rs, rn) = bench_figures(&read, "Total reads made");
    let (cpu2, osd2) = (cpu_children(), cpu_pid(osd));
    rados(conf, pool, &["cleanup", "--run-name", &name]);
    settle(a.settle_ms);
    assert!(
        wn == n && rn == n,
        "rados bench wrote {wn} and read {rn} of {n} objects"
    );
    (
        Phase {
            secs: ws,
            client_cpu: cpu1 - cpu0,
            osd_cpu: osd1 - osd0,
        },
        Phase {
            secs: rs,
            client_cpu: cpu2 - cpu1,
            osd_cpu: osd2 - osd1,
        },
        format!(
            "rados bench 600 write -b {size} -t {c} --max-objects {n} --no-cleanup; rados bench 600 seq -t {c} \
             ({wn} written, {rn} read)"
        ),
    )
}

fn median(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(f64::total_cmp);
    (v[v.len() / 2], v[0], v[v.len() - 1])
}

/// One side of the comparison: its GB/s per rep and its CPU summed over the reps.
#[derive(Default)]
struct Side {
    put: Vec<f64>,
    get: Vec<f64>,
    put_cpu: Phase,
    get_cpu: Phase,
}

impl Side {
    fn add(&mut self, total: usize, put: Phase, get: Phase) {
        self.put.push(total as f64 / put.secs / 1e9);
        self.get.push(total as f64 / get.secs / 1e9);
        for (sum, p) in [(&mut self.put_cpu, put), (&mut self.get_cpu, get)] {
            sum.secs += p.secs;
            sum.client_cpu += p.client_cpu;
            sum.osd_cpu += p.osd_cpu;
        }
    }
}

fn main() {
    let a = parse_args();
    let daemon_malloc = if a.glibc_daemons { None } else { tcmalloc() };
    let mut builds = vec![("plugin".to_string(), plugin_so())];
    if let Some(also) = &a.also {
        assert!(also.is_file(), "--also {}: no such file", also.display());
        builds.push(("also".to_string(), also.clone()));
    }
    println!(
        "rados_bench: {} MiB per run, concurrency {} (max_in_flight = rados bench -t), put/get batches of {}, \
         median of {} runs; {}; plugin {}{}",
        a.total_mib,
        a.concurrency,
        a.batch,
        a.reps,
        match (&a.conf, &daemon_malloc) {
            (Some(conf), _) => format!("cluster {conf}, pool {}", a.pool),
            (None, Some(so)) => format!(
                "a fresh one-node memstore cluster per configuration, daemons on {}",
                so.display()
            ),
            (None, None) => {
                "a fresh one-node memstore cluster per configuration, daemons on glibc malloc".to_string()
            }
        },
        builds[0].1.display(),
        match builds.get(1) {
            Some((_, so)) => format!("; also {} (the `also` rows), in the same reps", so.display()),
            None => String::new(),
        }
    );
    println!(
        "{:<9} {:>6} {:>5} | {:>9} {:>9} {:>6} | {:>9} {:>9} {:>6}",
        "checksum", "object", "n", "put GB/s", "bench w", "ratio", "get GB/s", "bench r", "ratio"
    );

    let mut worst: Vec<(String, f64, f64)> = Vec::new();
    let mut run = 0;
    let mut clusters = 0;
    for &checksum in &a.checksum {
        for &mib in &a.sizes_mib {
            let cluster = if a.conf.is_none() {
                clusters += 1;
                Some(Cluster::start(&a.pool, clusters, daemon_malloc.as_deref()))
            } else {
                None
            };
            let conf = a
                .conf
                .clone()
                .unwrap_or_else(|| cluster.as_ref().unwrap().conf.clone());
            let osd = cluster.as_ref().and_then(Cluster::osd_pid);
            let size = mib * MIB;
            let n = (a.total_mib / mib).max(1);
            let total = n * size;
            let plugins: Vec<PluginBackend> = builds
                .iter()
                .map(|(label, so)| {
                    load(
                        so,
                        &conf,
                        &a.pool,
                        &[
                            ("namespace", format!("bench-{mib}-{label}")),
                            ("max_object_bytes", size.to_string()),
                            ("max_in_flight", a.concurrency.to_string()),
                            ("op_timeout_s", "60".to_string()),
                            ("checksum", checksum.to_string()),
                        ],
                    )
                })
                .collect();
            // Warm-up, discarded: a fresh memstore OSD spends two to four times more CPU per GB until its
            // heap has grown to the working size (measured here), which would penalise whoever runs first.
            for w in 0..2 {
                let _ = rados_bench_run(&a, &conf, size, n, 900 + w, osd);
                for p in &plugins {
                    let _ = plugin_run(p, &a, size, n, 900 + w, osd);
                }
            }
            // sides[i] for plugins[i]; the last one is rados bench.
            let mut sides: Vec<Side> = (0..=plugins.len()).map(|_| Side::default()).collect();
            let mut cmd = String::new();
            for rep in 0..a.reps {
                run += 1;
                // Every side goes first, second, ... equally often.
                let mut order: Vec<usize> = (0..sides.len()).collect();
                order.rotate_left(rep % sides.len());
                for i in order {
                    let (put, get) = if i < plugins.len() {
                        plugin_run(&plugins[i], &a, size, n, run, osd)
                    } else {
                        let (w, r, c) = rados_bench_run(&a, &conf, size, n, run, osd);
                        cmd = c;
                        (w, r)
                    };
                    if a.verbose {
                        let label = builds.get(i).map_or("bench", |b| b.0.as_str());
                        println!(
                            "  run {run} {label:<6}: put {:.2} GB/s (osd {:.2} s), get {:.2} GB/s (osd {:.2} s)",
                            total as f64 / put.secs / 1e9,
                            put.osd_cpu,
                            total as f64 / get.secs / 1e9,
                            get.osd_cpu
                        );
                    }
                    sides[i].add(total, put, get);
                }
            }
            drop(plugins);
            let bench = sides.pop().expect("the rados bench side");
            let (bw, br) = (median(bench.put.clone()), median(bench.get.clone()));
            let gb = (total * a.reps) as f64 / 1e9;
            let cpu = |p: Phase| {
                if osd.is_some() {
                    format!("{:.2}/{:.2}", p.client_cpu / gb, p.osd_cpu / gb)
                } else {
                    format!("{:.2}/-", p.client_cpu / gb)
                }
            };
            for (side, (label, _)) in sides.iter().zip(&builds) {
                // Each rep runs every side back to back: their ratio cancels slow changes in what else the
                // machine is doing, which a ratio of medians taken over the whole run does not.
                let paired =
                    |a: &[f64], b: &[f64]| median(a.iter().zip(b).map(|(x, y)| x / y).collect());
                let (put_pairs, get_pairs) =
                    (paired(&side.put, &bench.put), paired(&side.get, &bench.get));
                let (pp, pg) = (median(side.put.clone()), median(side.get.clone()));
                let name = if label == "plugin" {
                    checksum.to_string()
                } else {
                    format!("{checksum}/{label}")
                };
                println!(
                    "{:<9} {:>4}Mi {n:>5} | {:>9.2} {:>9.2} {:>5.2}x | {:>9.2} {:>9.2} {:>5.2}x",
                    name,
                    mib,
                    pp.0,
                    bw.0,
                    pp.0 / bw.0,
                    pg.0,
                    br.0,
                    pg.0 / br.0
                );
                println!(
                    "          spread (min-max): put {:.2}-{:.2}, bench w {:.2}-{:.2}, get {:.2}-{:.2}, bench r {:.2}-{:.2}",
                    pp.1, pp.2, bw.1, bw.2, pg.1, pg.2, br.1, br.2
                );
                println!(
                    "          ratio within each rep, median (min-max): put {:.2}x ({:.2}-{:.2}), get {:.2}x ({:.2}-{:.2})",
                    put_pairs.0, put_pairs.1, put_pairs.2, get_pairs.0, get_pairs.1, get_pairs.2
                );
                println!(
                    "          CPU s/GB client/OSD: put {}, bench w {}, get {}, bench r {}",
                    cpu(side.put_cpu),
                    cpu(bench.put_cpu),
                    cpu(side.get_cpu),
                    cpu(bench.get_cpu)
                );
                if label == "plugin" {
                    worst.push((
                        format!("checksum={checksum} {mib} MiB"),
                        pp.0 / bw.0,
                        pg.0 / br.0,
                    ));
                }
            }
            println!("          {cmd}");
        }
    }
    for (what, idx) in [("put", 0), ("get", 1)] {
        let (name, ratio) = worst
            .iter()
            .map(|(n, p, g)| (n.clone(), if idx == 0 { *p } else { *g }))
            .min_by(|x, y| x.1.total_cmp(&y.1))
            .expect("at least one run");
        println!("worst {what} ratio: {ratio:.2}x ({name}); target >= 0.8x");
    }
}
