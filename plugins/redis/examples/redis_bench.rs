//! `redis_bench`: put and get throughput of the `redis` plugin, loaded through kvhost's loader, against
//! `redis-benchmark` SET/GET with the same value size and concurrency on the same server, in one run.
//!
//! ```text
//! cargo build --release -p kvhost-plugin-redis --example redis_bench
//! target/release/examples/redis_bench [--sizes-kib 256,2048,32768] [--concurrency 4] [--total-mib 1024]
//!                                     [--reps 3] [--part-mib 4] [--driver threads|events]
//!                                     [--port P (a running server; else one is started)]
//! ```
//!
//! - Concurrency C means C requests in flight on both sides: `redis-benchmark -c C` (no pipelining) and
//!   C single-chunk puts or gets in flight on the plugin (`pool_size = C`), driven one of two ways:
//!   - `threads`: C host threads, each waiting for its request before submitting the next;
//!   - `events`: one host thread submits C requests and each completion submits the next one, from the
//!     plugin's completion thread, as an event-driven host does (and as `redis-benchmark`'s single
//!     event loop does with its C connections).
//! - Both sides cycle over the same number of keys (`-r K`), so the server holds the same bytes.
//! - Each configuration runs `--reps` times, alternating which side goes first; medians are printed.
//! - The plugin splits values over `part_size_mib` (4 MiB by default) into parts written in one
//!   pipeline; the `unsplit` row repeats the largest size with splitting off, to show what splitting
//!   buys against the same server.

use kvhost::config::Config;
use kvhost::plugin::{GetItem, GetRequest, PluginBackend, PutRequest, Status};
use kvhost::ChunkKey;
use kvhost_plugin_sdk::ChunkMeta;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(600);

struct Args {
    sizes: Vec<usize>,
    conc: usize,
    total: usize,
    reps: usize,
    port: Option<u16>,
    part_mib: String,
    events: bool,
}

fn parse_args() -> Args {
    let mut a = Args {
        sizes: vec![256 << 10, 2 << 20, 32 << 20],
        conc: 4,
        total: 1 << 30,
        reps: 3,
        port: None,
        part_mib: "4".to_string(),
        events: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut val = || it.next().unwrap_or_else(|| panic!("{arg} needs a value"));
        match arg.as_str() {
            "--sizes-kib" => {
                a.sizes = val()
                    .split(',')
                    .map(|s| s.trim().parse::<usize>().expect("--sizes-kib N,N") << 10)
                    .collect()
            }
            "--concurrency" => a.conc = val().parse::<usize>().expect("--concurrency N").max(1),
            "--total-mib" => a.total = val().parse::<usize>().expect("--total-mib N") << 20,
            "--reps" => a.reps = val().parse::<usize>().expect("--reps N").max(1),
            "--port" => a.port = Some(val().parse().expect("--port P")),
            "--part-mib" => a.part_mib = val(),
            "--driver" => {
                a.events = match val().as_str() {
                    "threads" => false,
                    "events" => true,
                    other => panic!("--driver threads|events, not `{other}`"),
                }
            }
            "-h" | "--help" => {
                println!("redis_bench [--sizes-kib 256,2048,32768] [--concurrency 4] [--total-mib 1024] [--reps 3] [--part-mib 4] [--port P]");
                std::process::exit(0);
            }
            other => panic!("unknown argument {other}"),
        }
    }
    a
}

/// The plugin's cdylib built with this example (the newer of the two places cargo puts it).
fn redis_so() -> std::path::PathBuf {
    let exe = std::env::current_exe().expect("exe path");
    let profile = exe.parent().and_then(|d| d.parent()).expect("profile dir");
    [
        profile.join("libkvhost_redis.so"),
        profile.join("deps").join("libkvhost_redis.so"),
    ]
    .into_iter()
    .filter_map(|p| Some((std::fs::metadata(&p).ok()?.modified().ok()?, p)))
    .max()
    .map(|(_, p)| p)
    .expect("libkvhost_redis.so: build with `cargo build --release -p kvhost-plugin-redis --example redis_bench`")
}

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_server() -> (Server, u16) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no"])
        .stdout(Stdio::null())
        .spawn()
        .expect("redis-server (apt-get install redis-server)");
    let server = Server(child);
    for _ in 0..200 {
        if redis_cli(port, &["PING"]).contains("PONG") {
            return (server, port);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("redis-server did not start on port {port}");
}

fn redis_cli(port: u16, args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .output()
        .expect("redis-cli");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `redis-benchmark` SET then GET: (set GB/s, get GB/s).
fn redis_benchmark(port: u16, size: usize, n: usize, conc: usize, keys: usize) -> (f64, f64) {
    redis_cli(port, &["FLUSHALL"]);
    let out = Command::new("redis-benchmark")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(["-t", "set,get", "--csv"])
        .args(["-d", &size.to_string(), "-n", &n.to_string()])
        .args(["-c", &conc.to_string(), "-r", &keys.to_string()])
        .output()
        .expect("redis-benchmark");
    let text = String::from_utf8_lossy(&out.stdout);
    let rps = |test: &str| -> f64 {
        text.lines()
            .find(|l| l.starts_with(&format!("\"{test}\"")))
            .and_then(|l| l.split(',').nth(1))
            .and_then(|v| v.trim_matches('"').parse().ok())
            .unwrap_or_else(|| panic!("no {test} figure in redis-benchmark output:\n{text}"))
    };
    (
        rps("SET") * size as f64 / 1e9,
        rps("GET") * size as f64 / 1e9,
    )
}

fn load(port: u16, conc: usize, part_mib: &str) -> PluginBackend {
    let y = format!(
        "chunk_size: 256\nmodel:\n  name: bench/model\n  num_layers: 2\n  num_kv_heads: 2\n  head_size: 16\n  dtype: half\n\
         storage_plugins: [rd]\nextra_config:\n  storage_plugin.rd.module_path: \"{}\"\n  \
         storage_plugin.rd.class_name: redis\n  storage_plugin.rd.url: \"redis://127.0.0.1:{port}\"\n  \
         storage_plugin.rd.pool_size: {conc}\n  storage_plugin.rd.part_size_mib: {part_mib}\n  \
         storage_plugin.rd.command_timeout_ms: 60000\n",
        redis_so().display()
    );
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

/// Keeps `conc` requests in flight until `n` were made: each completion submits the next request from
/// the completion thread. Ends when every slot has returned its buffer.
struct EventDriver {
    plugin: std::sync::Arc<PluginBackend>,
    next: std::sync::atomic::AtomicUsize,
    n: usize,
    size: usize,
    keys: usize,
    returned: crossbeam_channel::Sender<Vec<u8>>,
}

impl EventDriver {
    fn key(&self, i: usize) -> ChunkKey {
        ChunkKey::new("bench/model", 1, 0, (i % self.keys) as i128 + 1, "half").unwrap()
    }

    fn take(&self, buf: Vec<u8>) -> Option<(usize, Vec<u8>)> {
        let i = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if i < self.n {
            return Some((i, buf));
        }
        let _ = self.returned.send(buf);
        None
    }

    fn put_next(self: std::sync::Arc<Self>, buf: Vec<u8>) {
        let Some((i, buf)) = self.take(buf) else {
            return;
        };
        let request = PutRequest {
            keys: vec![self.key(i)],
            bufs: vec![buf],
            metas: vec![meta(self.size)],
        };
        let d = self.clone();
        self.plugin.put(request, move |done| {
            assert!(
                done.items[0] == Status::OK,
                "{:?} {:?}",
                done.items,
                done.error
            );
            d.put_next(done.request.bufs.into_iter().next().unwrap());
        });
    }

    fn get_next(self: std::sync::Arc<Self>, buf: Vec<u8>) {
        let Some((i, buf)) = self.take(buf) else {
            return;
        };
        let request = GetRequest {
            keys: vec![self.key(i)],
            bufs: vec![buf],
        };
        let d = self.clone();
        let size = self.size;
        self.plugin.get(request, move |done| {
            assert!(
                matches!(done.items[0], GetItem::Hit { len, .. } if len == size),
                "{:?}",
                done.items
            );
            d.get_next(done.request.bufs.into_iter().next().unwrap());
        });
    }
}

/// The `events` driver: (put GB/s, get GB/s).
fn plugin_run_events(
    port: u16,
    size: usize,
    n: usize,
    conc: usize,
    keys: usize,
    part_mib: &str,
) -> (f64, f64) {
    redis_cli(port, &["FLUSHALL"]);
    let plugin = std::sync::Arc::new(load(port, conc, part_mib));
    let run = |put: bool, bufs: Vec<Vec<u8>>| {
        let (tx, rx) = crossbeam_channel::unbounded();
        let d = std::sync::Arc::new(EventDriver {
            plugin: plugin.clone(),
            next: std::sync::atomic::AtomicUsize::new(0),
            n,
            size,
            keys,
            returned: tx,
        });
        let started = Instant::now();
        for buf in bufs {
            if put {
                d.clone().put_next(buf);
            } else {
                d.clone().get_next(buf);
            }
        }
        let back: Vec<Vec<u8>> = (0..conc)
            .map(|_| rx.recv_timeout(WAIT).expect("slot"))
            .collect();
        let took = started.elapsed();
        // The last callbacks still hold the driver (and through it the plugin) for a moment: the
        // plugin must not be dropped, i.e. destroyed, from its own completion thread.
        while std::sync::Arc::strong_count(&d) > 1 {
            std::thread::sleep(Duration::from_millis(1));
        }
        (took, back)
    };
    let bufs = (0..conc)
        .map(|t| (0..size).map(|i| (i * 31 + t) as u8).collect())
        .collect();
    let (put, bufs) = run(true, bufs);
    let (get, _) = run(false, bufs);
    let bytes = (n * size) as f64;
    (
        bytes / put.as_secs_f64() / 1e9,
        bytes / get.as_secs_f64() / 1e9,
    )
}

/// `conc` threads, each putting (then, separately timed, getting) its share of `n` single-chunk
/// requests over `keys` keys: (put GB/s, get GB/s).
fn plugin_run(
    port: u16,
    size: usize,
    n: usize,
    conc: usize,
    keys: usize,
    part_mib: &str,
) -> (f64, f64) {
    redis_cli(port, &["FLUSHALL"]);
    let p = load(port, conc, part_mib);
    let per = n / conc;
    let key = |t: usize, i: usize| {
        ChunkKey::new(
            "bench/model",
            1,
            0,
            ((t * per + i) % keys) as i128 + 1,
            "half",
        )
        .unwrap()
    };
    let bufs: Vec<Vec<u8>> = (0..conc)
        .map(|t| (0..size).map(|i| (i * 31 + t) as u8).collect())
        .collect();
    let started = Instant::now();
    let bufs: Vec<Vec<u8>> = std::thread::scope(|s| {
        let handles: Vec<_> = bufs
            .into_iter()
            .enumerate()
            .map(|(t, buf)| {
                let p = &p;
                s.spawn(move || {
                    let mut buf = Some(buf);
                    for i in 0..per {
                        let done = p
                            .put_wait(
                                PutRequest {
                                    keys: vec![key(t, i)],
                                    bufs: vec![buf.take().unwrap()],
                                    metas: vec![meta(size)],
                                },
                                WAIT,
                            )
                            .expect("put");
                        assert!(
                            done.items[0] == Status::OK,
                            "{:?} {:?}",
                            done.items,
                            done.error
                        );
                        buf = done.request.bufs.into_iter().next();
                    }
                    buf.unwrap()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let put = started.elapsed();
    let started = Instant::now();
    std::thread::scope(|s| {
        for (t, buf) in bufs.into_iter().enumerate() {
            let p = &p;
            s.spawn(move || {
                let mut buf = Some(buf);
                for i in 0..per {
                    let done = p
                        .get_wait(
                            GetRequest {
                                keys: vec![key(t, i)],
                                bufs: vec![buf.take().unwrap()],
                            },
                            WAIT,
                        )
                        .expect("get");
                    assert!(
                        matches!(done.items[0], GetItem::Hit { len, .. } if len == size),
                        "{:?}",
                        done.items
                    );
                    buf = done.request.bufs.into_iter().next();
                }
            });
        }
    });
    let get = started.elapsed();
    let bytes = (per * conc * size) as f64;
    (
        bytes / put.as_secs_f64() / 1e9,
        bytes / get.as_secs_f64() / 1e9,
    )
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let a = parse_args();
    let (_server, port) = match a.port {
        Some(p) => (None, p),
        None => {
            let (s, p) = start_server();
            (Some(s), p)
        }
    };
    let version = Command::new("redis-server")
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    println!(
        "redis_bench: {} MiB per run, concurrency {} ({} driver), median of {} runs, server 127.0.0.1:{port} ({version})",
        a.total >> 20,
        a.conc,
        if a.events { "events" } else { "threads" },
        a.reps
    );
    println!(
        "{:<8} {:>8} {:>5} | {:>9} {:>9} {:>6} | {:>9} {:>9} {:>6}",
        "value", "parts", "n", "put GB/s", "SET GB/s", "ratio", "get GB/s", "GET GB/s", "ratio"
    );
    let largest = *a.sizes.iter().max().unwrap_or(&0);
    let mut rows: Vec<(usize, &str)> = a.sizes.iter().map(|&s| (s, a.part_mib.as_str())).collect();
    if largest > 4 << 20 {
        rows.push((largest, "512"));
    }
    for (size, part_mib) in rows {
        let n = (a.total / size).max(a.conc * 4) / a.conc * a.conc;
        // Enough distinct keys that a GET is not served from one hot key, bounded to ~1 GiB resident.
        let keys = ((1usize << 30) / size).clamp(4, 64);
        let (mut pp, mut pg, mut bs, mut bg) = (vec![], vec![], vec![], vec![]);
        for rep in 0..a.reps {
            let mut plugin = || {
                let (p, g) = if a.events {
                    plugin_run_events(port, size, n, a.conc, keys, part_mib)
                } else {
                    plugin_run(port, size, n, a.conc, keys, part_mib)
                };
                pp.push(p);
                pg.push(g);
            };
            let mut bench = || {
                let (s, g) = redis_benchmark(port, size, n, a.conc, keys);
                bs.push(s);
                bg.push(g);
            };
            if rep % 2 == 0 {
                plugin();
                bench();
            } else {
                bench();
                plugin();
            }
        }
        let (pp, pg, bs, bg) = (median(pp), median(pg), median(bs), median(bg));
        let part_bytes = (part_mib.parse::<f64>().unwrap_or(0.0) * (1 << 20) as f64) as usize;
        let split = if size > part_bytes {
            format!("{}x{}KiB", size.div_ceil(part_bytes), part_bytes >> 10)
        } else {
            "unsplit".to_string()
        };
        println!(
            "{:<8} {:>8} {:>5} | {:>9.2} {:>9.2} {:>5.2}x | {:>9.2} {:>9.2} {:>5.2}x",
            format!("{}KiB", size >> 10),
            split,
            n,
            pp,
            bs,
            pp / bs,
            pg,
            bg,
            pg / bg
        );
    }
    redis_cli(port, &["FLUSHALL"]);
}
