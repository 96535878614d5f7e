//! `kvhost serve` under hostile clients, run as the real binary (black box): each test reproduces
//! one defect of issue 13 and checks it through the wire, `/metrics`, the log and the exit status.
//!
//! `KVHOST_SERVE_BIN=/path/to/kvhost` runs these tests against another build (say, an older one, to
//! see them fail); by default they build and use this workspace's binary.

use kvhost::chain::Chain;
use kvhost::config::Config;
use kvhost::serve::client::LmClient;
use kvhost::serve::protocol::{self, Command};
use kvhost::ChunkKey;
use kvhost_plugin_sdk::ChunkMeta;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const MODEL: &str = "model:\n  name: test/model\n  num_layers: 2\n  num_kv_heads: 2\n  head_size: 16\n  dtype: half\n";

fn key(n: u64) -> String {
    format!("test/model@1@0@{n:x}@half")
}

fn meta() -> ChunkMeta {
    ChunkMeta {
        fmt: 1,
        dtype: 1,
        ..ChunkMeta::default()
    }
}

fn free_addr() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

fn binary() -> PathBuf {
    match std::env::var_os("KVHOST_SERVE_BIN") {
        Some(p) => PathBuf::from(p),
        None => crate::cli::binary().clone(),
    }
}

/// A scratch directory for one test, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Scratch {
        let p = std::env::temp_dir().join(format!("kvhost-serve-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Scratch(p)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A `kvhost serve` process with its stderr in a file.
struct Served {
    child: Child,
    lm: SocketAddr,
    metrics: SocketAddr,
    log: PathBuf,
    _dir: Scratch,
}

impl Served {
    /// Start `kvhost serve` on `config` (YAML), optionally under `prlimit --nofile=N:N`.
    fn start(tag: &str, config: &str, nofile: Option<u64>) -> Served {
        let dir = Scratch::new(tag);
        let cfg = dir.0.join("kvhost.yaml");
        std::fs::write(&cfg, config).unwrap();
        let log = dir.0.join("stderr.log");
        let (lm, metrics) = (free_addr(), free_addr());
        let bin = binary();
        let args = [
            "serve".to_string(),
            "--config".into(),
            cfg.display().to_string(),
            "--listen".into(),
            lm.to_string(),
            "--metrics".into(),
            metrics.to_string(),
        ];
        let mut cmd = match nofile {
            Some(n) => {
                let mut c = std::process::Command::new("prlimit");
                c.arg(format!("--nofile={n}:{n}")).arg("--").arg(&bin);
                c
            }
            None => std::process::Command::new(&bin),
        };
        cmd.args(&args)
            .env_remove("LMCACHE_CONFIG_FILE")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", bin.display()));
        let mut s = Served {
            child,
            lm,
            metrics,
            log,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while LmClient::connect(lm).is_err() {
            if let Some(status) = s.child.try_wait().unwrap() {
                panic!("kvhost serve exited with {status}: {}", s.log_text());
            }
            assert!(
                Instant::now() < deadline,
                "kvhost serve did not listen: {}",
                s.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        // The metrics listener starts beside the lm:// one, not before it: wait for it too (under a
        // loaded test run its first answer can take a while).
        while s.scrape().is_none() {
            if let Some(status) = s.child.try_wait().unwrap() {
                panic!("kvhost serve exited with {status}: {}", s.log_text());
            }
            assert!(
                Instant::now() < deadline,
                "/metrics did not answer: {}",
                s.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        s
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `/metrics`, or `None` if it does not answer within 2 s.
    fn scrape(&self) -> Option<String> {
        scrape(self.metrics)
    }

    /// One sample's value from `/metrics`: the first line starting with `prefix`.
    fn metric(&self, prefix: &str) -> f64 {
        let text = self.scrape().expect("/metrics answers");
        metric_value(&text, prefix).unwrap_or_else(|| panic!("no `{prefix}` in:\n{text}"))
    }

    fn sigterm(&self) {
        let ok = std::process::Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -TERM failed");
    }

    /// Wait for the process to exit, at most `limit`; `None` if it is still running then.
    fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return Some(s);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn scrape(addr: SocketAddr) -> Option<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    text.starts_with("HTTP/1.1 200").then_some(text)
}

fn metric_value(text: &str, prefix: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

fn put_header(len: u32, key: &str) -> [u8; protocol::REQUEST_HEADER_LEN] {
    protocol::encode_request(Command::Put, len, 1, 1, [0; 4], key).unwrap()
}

/// Defect 1a: one PUT header that declares 500 MiB and sends nothing emptied the hot cache (the arena
/// block was reserved, evicting, before any body byte came).
#[test]
fn a_500_mib_put_header_with_no_body_evicts_nothing() {
    // A 600 MiB arena (mapped lazily) with 200 MiB stored: room for 400 MiB, so a 500 MiB block
    // would have to evict.
    let config = format!(
        "chunk_size: 16\nmax_local_cpu_size: 0.5859375\nlocal_cpu_prefault: false\n{MODEL}"
    );
    let srv = Served::start("flush", &config, None);
    let mut c = LmClient::connect(srv.lm).unwrap();
    let body = vec![3u8; 1 << 20];
    for i in 0..200 {
        c.put(&key(i), &body, &meta()).unwrap();
    }
    assert!(c.exists(&key(199)).unwrap());
    let count = "lmcache:local_cpu_hot_cache_count{";
    let evictions = "lmcache:local_cpu_evict_count{";
    assert_eq!(srv.metric(count), 200.0);

    let mut bad = TcpStream::connect(srv.lm).unwrap();
    bad.write_all(&put_header(500 << 20, &key(1000))).unwrap();
    // The server has decoded the header once it counts the request; give it time to act on it.
    let deadline = Instant::now() + Duration::from_secs(5);
    while srv.metric("lmcache:num_store_requests{") < 201.0 {
        assert!(Instant::now() < deadline, "the PUT header was not read");
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        srv.metric(evictions),
        0.0,
        "an unfinished PUT evicted entries"
    );
    assert_eq!(
        srv.metric(count),
        200.0,
        "an unfinished PUT evicted entries"
    );

    // An honest 32 MiB PUT meanwhile is stored, without evicting either.
    let big = vec![9u8; 32 << 20];
    c.put(&key(2000), &big, &meta()).unwrap();
    assert!(
        c.exists(&key(2000)).unwrap(),
        "the honest PUT was not stored"
    );
    assert_eq!(srv.metric(count), 201.0);
    assert_eq!(srv.metric(evictions), 0.0);
    assert_eq!(
        srv.metric("kvhost_serve_put_body_bytes_staged{"),
        (500u64 << 20) as f64,
        "the unfinished body is staged outside the hot cache"
    );
    assert!(
        c.exists(&key(0)).unwrap(),
        "the oldest entry is still there"
    );
    drop(bad);
}

/// Defect 1b: a client sending one body byte every few seconds held its request open for as long as
/// it liked (the stall timer restarted on every byte). The request deadline cannot be reset.
#[test]
fn a_one_byte_trickle_is_cut_at_the_request_deadline() {
    let config = format!(
        "chunk_size: 16\nmax_local_cpu_size: 0.05\nlocal_cpu_prefault: false\n{MODEL}\
         serve:\n  request_deadline_secs: 1.5\n  stall_timeout_secs: 1.0\n"
    );
    let srv = Served::start("trickle", &config, None);
    let mut bad = TcpStream::connect(srv.lm).unwrap();
    let mut writer = bad.try_clone().unwrap();
    let started = Instant::now();
    writer.write_all(&put_header(1000, &key(1))).unwrap();
    // One byte every 250 ms (well inside the 1 s stall timeout), for up to 8 s.
    let trickle = std::thread::spawn(move || {
        let until = Instant::now() + Duration::from_secs(8);
        while Instant::now() < until && writer.write_all(&[7]).is_ok() {
            std::thread::sleep(Duration::from_millis(250));
        }
    });
    bad.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut b = [0u8; 16];
    let _ = bad.read(&mut b); // returns when the server closes the connection
    let cut_after = started.elapsed();
    println!("trickle cut after {cut_after:?} (request deadline 1.5 s)");
    assert!(
        cut_after >= Duration::from_millis(1300) && cut_after < Duration::from_secs(4),
        "the trickling request was cut after {cut_after:?}, not at the 1.5 s deadline"
    );
    trickle.join().unwrap();
    assert_eq!(
        srv.metric("kvhost_serve_connections_closed_total{model_name=\"test/model\",worker_id=\"0\",reason=\"deadline\"}"),
        1.0
    );
    let mut good = LmClient::connect(srv.lm).unwrap();
    assert!(good.health().unwrap());
    assert!(!good.exists(&key(1)).unwrap(), "the cut PUT is not stored");
}

fn fs_so() -> PathBuf {
    crate::util::rust_plugin("kvhost_fs")
}

/// Defect 2: SIGTERM did not stop connections that never paused (17 s and 97,511 more PUTs), and a
/// supervisor's SIGKILL then lost the queued write-through puts.
#[test]
fn sigterm_with_two_busy_clients_exits_zero_quickly_and_every_accepted_put_reaches_fs() {
    let store = Scratch::new("sigterm-fs");
    let config = format!(
        "chunk_size: 16\nmax_local_cpu_size: 0.25\nlocal_cpu_prefault: false\n{MODEL}\
         storage_plugins: [fs]\nextra_config:\n  \
         storage_plugin.fs.module_path: \"{}\"\n  storage_plugin.fs.class_name: fs\n  \
         storage_plugin.fs.path: \"{}\"\n  storage_plugin.fs.max_size_gib: 4\n",
        fs_so().display(),
        store.0.display()
    );
    let mut srv = Served::start("sigterm", &config, None);
    let sent: Arc<Mutex<Vec<String>>> = Arc::default();
    let addr = srv.lm;
    let clients: Vec<_> = (0..2u64)
        .map(|t| {
            let sent = sent.clone();
            std::thread::spawn(move || {
                let mut c = LmClient::connect(addr).unwrap();
                let body = vec![t as u8 + 1; 64 << 10];
                for i in 0.. {
                    let k = key(t << 40 | i);
                    if c.put(&k, &body, &meta()).is_err() {
                        break;
                    }
                    sent.lock().unwrap().push(k);
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(1500));
    srv.sigterm();
    let signalled = Instant::now();
    let status = srv.wait_exit(Duration::from_secs(30));
    let took = signalled.elapsed();
    if status.is_none() {
        // Still serving: stop it so the clients (which never pause) end too.
        let _ = srv.child.kill();
    }
    for c in clients {
        c.join().unwrap();
    }
    let log = srv.log_text();
    println!("exit {status:?} {took:?} after SIGTERM; log:\n{log}");
    let status = status.expect("kvhost serve still running 30 s after SIGTERM");
    assert!(status.success(), "exit {status}");
    assert!(
        took < Duration::from_secs(10),
        "took {took:?} after SIGTERM, past a 10 s supervisor timeout"
    );
    assert!(!log.contains("did not reach every plugin"), "{log}");
    let stored = puts_stored(&log).expect("the stop line reports the puts stored");
    let sent = sent.lock().unwrap().clone();
    assert!(
        stored > 0 && stored <= sent.len(),
        "{stored} stored, {} sent",
        sent.len()
    );

    // Every stored PUT is in the fs store: open it again, with an empty hot cache.
    let y = format!(
        "chunk_size: 16\nmax_local_cpu_size: 0.01\nlocal_cpu_prefault: false\n{MODEL}\
         storage_plugins: [fs]\nextra_config:\n  \
         storage_plugin.fs.module_path: \"{}\"\n  storage_plugin.fs.class_name: fs\n  \
         storage_plugin.fs.path: \"{}\"\n  storage_plugin.fs.max_size_gib: 4\n",
        fs_so().display(),
        store.0.display()
    );
    let chain = Chain::from_config(&Config::from_yaml(&y, None).unwrap()).unwrap();
    let found = sent
        .iter()
        .filter(|k| {
            let k = ChunkKey::parse(k).unwrap();
            chain.lookup(std::slice::from_ref(&k), None).hit_chunks == 1
        })
        .count();
    chain.close(Duration::from_secs(5));
    println!(
        "{} PUTs sent, {stored} stored by the server, {found} in fs",
        sent.len()
    );
    assert_eq!(
        found, stored,
        "every PUT the server stored reached the fs plugin"
    );
}

/// N from the stop line's "; N puts stored".
fn puts_stored(log: &str) -> Option<usize> {
    let (_, rest) = log.split_once("); ")?;
    let (n, rest) = rest.split_once(' ')?;
    rest.starts_with("puts stored").then(|| n.parse().ok())?
}

/// Defect 3: after one EMFILE, tiny_http panicked and `/metrics` refused every connection for good.
#[test]
fn metrics_still_answer_after_running_out_of_file_descriptors() {
    let config =
        format!("chunk_size: 16\nmax_local_cpu_size: 0.05\nlocal_cpu_prefault: false\n{MODEL}");
    let srv = Served::start("emfile", &config, Some(64));
    assert!(
        srv.scrape().is_some(),
        "/metrics answers at first: {}",
        srv.log_text()
    );
    // Far more connections than the server has descriptors: accepts fail with EMFILE.
    let hogs: Vec<TcpStream> = (0..150)
        .filter_map(|_| TcpStream::connect_timeout(&srv.metrics, Duration::from_secs(1)).ok())
        .collect();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !srv.log_text().contains("Too many open files") {
        assert!(
            Instant::now() < deadline,
            "the server never ran out of descriptors ({} connections): {}",
            hogs.len(),
            srv.log_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(hogs);
    let deadline = Instant::now() + Duration::from_secs(10);
    let text = loop {
        if let Some(t) = srv.scrape() {
            break t;
        }
        assert!(
            Instant::now() < deadline,
            "/metrics no longer answers after EMFILE: {}",
            srv.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(text.contains("lmcache:num_store_requests"), "{text}");
    assert!(LmClient::connect(srv.lm).unwrap().health().unwrap());
}

/// This process's hard limit on open files.
fn nofile_hard_limit() -> u64 {
    let limits = std::fs::read_to_string("/proc/self/limits").expect("read /proc/self/limits");
    limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(4))
        .and_then(|v| v.parse().ok())
        .unwrap_or(u64::MAX)
}

/// Raise this test process's soft limit on open files to `n` (at most the hard limit).
fn raise_own_nofile(n: u64) {
    let out = std::process::Command::new("prlimit")
        .args([
            "--pid",
            &std::process::id().to_string(),
            &format!("--nofile={n}:{n}"),
        ])
        .output()
        .expect("run prlimit");
    assert!(
        out.status.success(),
        "cannot raise this process's file limit to {n}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Defect 4: one thread per connection and a hard 1,024-connection cap: idle sockets locked honest
/// clients out. Now 10,000 idle connections are held and an honest client is still served.
#[test]
fn ten_thousand_idle_connections_and_an_honest_client_is_served() {
    const IDLE: usize = 10_000;
    // Both sides need a descriptor per connection: this process (the clients) and the server.
    let limit = nofile_hard_limit().min(40_000);
    assert!(
        limit >= IDLE as u64 + 1000,
        "the hard limit on open files ({limit}) is too low for {IDLE} connections"
    );
    raise_own_nofile(limit);
    let config =
        format!("chunk_size: 16\nmax_local_cpu_size: 0.05\nlocal_cpu_prefault: false\n{MODEL}");
    let srv = Served::start("idle", &config, Some(limit));
    let idle: Vec<TcpStream> = (0..IDLE)
        .map(|i| {
            TcpStream::connect(srv.lm)
                .unwrap_or_else(|e| panic!("idle connection {i} of {IDLE}: {e}"))
        })
        .collect();
    let open = "kvhost_serve_connections_open{";
    let deadline = Instant::now() + Duration::from_secs(20);
    while srv.metric(open) < IDLE as f64 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    println!("server holds {} connections", srv.metric(open));
    let mut latencies = Vec::new();
    for i in 0..20 {
        let t = Instant::now();
        let mut c = LmClient::connect(srv.lm).unwrap();
        c.stream()
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let served = c.health().unwrap_or(false);
        latencies.push(t.elapsed());
        assert!(
            served,
            "honest client {i} was not served with {IDLE} idle connections open"
        );
    }
    latencies.sort();
    println!(
        "honest client, connect to reply, with {IDLE} idle connections: median {:?}, max {:?}",
        latencies[latencies.len() / 2],
        latencies[latencies.len() - 1]
    );
    assert!(
        srv.metric(open) >= IDLE as f64,
        "the idle connections were dropped"
    );
    drop(idle);
}

/// Defect 5: raw key text (newlines included) went into the log, so a client could forge log lines,
/// and nothing limited repeated warnings.
#[test]
fn a_key_with_a_newline_yields_one_escaped_log_line_and_floods_are_rate_limited() {
    let config =
        format!("chunk_size: 16\nmax_local_cpu_size: 0.05\nlocal_cpu_prefault: false\n{MODEL}");
    let mut srv = Served::start("inject", &config, None);
    let forged = "bad\nkvhost: FORGED LOG LINE";
    let send_bad = |k: &str| {
        let mut s = TcpStream::connect(srv.lm).unwrap();
        s.write_all(&protocol::encode_request(Command::Get, 0, 1, 1, [0; 4], k).unwrap())
            .unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let _ = s.read(&mut [0u8; 64]); // until the server closes it
    };
    send_bad(forged);
    for i in 0..100 {
        send_bad(&format!("flood-{i}"));
    }
    srv.sigterm();
    let status = srv.wait_exit(Duration::from_secs(15)).expect("exits");
    assert!(status.success());
    let log = srv.log_text();
    let forged_lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("FORGED LOG LINE"))
        .collect();
    assert_eq!(forged_lines.len(), 1, "{log}");
    assert!(
        forged_lines[0].contains("bad request") && forged_lines[0].contains(r"bad\nkvhost: FORGED"),
        "the key is escaped inside the server's own line: {log}"
    );
    let bad_lines = log.lines().filter(|l| l.contains("bad request")).count();
    assert!(
        bad_lines <= 10,
        "{bad_lines} `bad request` lines for 101 bad requests: {log}"
    );
    assert!(
        log.lines()
            .any(|l| l.contains("serve_bad_request") && l.contains("91")),
        "the suppressed count is reported: {log}"
    );
}
