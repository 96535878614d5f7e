//! The `redis` plugin (plugins/redis) against real `redis-server` processes started here on free
//! loopback ports and stopped by pid: conformance on one server and on a 3-node Redis Cluster, the
//! chain (promotion), parts and manifests, a server restart mid-run, a cluster node restart, and bad
//! configurations.
//!
//! Without `redis-server` on PATH each test is reported *ignored* with the reason (the `has_redis` cfg
//! from tests/build.rs), unless `KVHOST_REQUIRE_REDIS=1` (set by `.ci/test-all`), where it runs and
//! fails.

use crate::util::*;
use kvhost::chain::{Chain, PutOutcome};
use kvhost::config::Config;
use kvhost::plugin::{GetItem, PluginBackend, PutRequest};
use kvhost::ChunkKey;
use kvhost_plugin_sdk::Status;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(60);

/// The redis plugin's cdylib, built by the workspace (a dependency of this package).
fn redis_so() -> String {
    let deps = profile_dir().join("deps").join("libkvhost_redis.so");
    let p = if deps.is_file() {
        deps
    } else {
        profile_dir().join("libkvhost_redis.so")
    };
    p.to_str().unwrap().to_string()
}

/// Whether redis-server can run here. Tests without it are ignored at build time (`has_redis`, see
/// tests/build.rs); a test that runs anyway (`KVHOST_REQUIRE_REDIS=1`, or redis removed since the
/// build) fails here, naming what is missing.
pub fn have_redis(test: &str) -> bool {
    let ok = Command::new("redis-server")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok,
        "redis test `{test}`: redis-server is not installed (apt-get install redis-server); \
         without KVHOST_REQUIRE_REDIS=1 a rebuild marks this test ignored"
    );
    ok
}

fn free_port() -> u16 {
    // Ports are taken from the ephemeral range by binding port 0; the listener is closed right away.
    // Two concurrent tests could be handed the same port only after it is released and reused, which
    // the start-up check below turns into a retry.
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One `redis-server` process on 127.0.0.1, in its own scratch directory; killed (by pid) on drop.
pub struct Server {
    port: u16,
    dir: PathBuf,
    extra: Vec<String>,
    child: Option<Child>,
}

impl Server {
    pub fn start(extra: &[&str]) -> Server {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = profile_dir().join("redis-tests").join(format!(
            "{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mut s = Server {
            port: 0,
            dir,
            extra: extra.iter().map(|s| s.to_string()).collect(),
            child: None,
        };
        for _ in 0..5 {
            s.port = free_port();
            if s.spawn() {
                return s;
            }
        }
        panic!("redis-server did not start (see {})", s.dir.display());
    }

    /// Start the process on `self.port`; false if it did not answer PING.
    fn spawn(&mut self) -> bool {
        let log = std::fs::File::create(self.dir.join("redis.log")).unwrap();
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args([
                "--save",
                "",
                "--appendonly",
                "no",
                "--protected-mode",
                "yes",
            ])
            .args(["--dir", self.dir.to_str().unwrap()])
            .args(&self.extra)
            .stdout(log)
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn redis-server");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Some(Ok(Some(_))) = self.child.as_mut().map(|c| c.try_wait()) {
                self.child = None;
                return false;
            }
            // `-NOAUTH` also means up (a server with `requirepass`).
            if raw(self.port, &["PING"])
                .is_ok_and(|r| r.starts_with("+PONG") || r.starts_with("-NOAUTH"))
            {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.stop();
        false
    }

    fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn url(&self) -> String {
        format!("redis://{}", self.addr())
    }

    /// Kill the process (SIGKILL: an abrupt crash) and reap it.
    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Start it again on the same port.
    fn restart(&mut self) {
        self.stop();
        for _ in 0..50 {
            if self.spawn() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("redis-server did not restart on port {}", self.port);
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Send one command (inline arguments, no spaces inside) and return the raw reply.
fn raw(port: u16, args: &[&str]) -> std::io::Result<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut cmd = format!("*{}\r\n", args.len());
    for a in args {
        cmd.push_str(&format!("${}\r\n{a}\r\n", a.len()));
    }
    s.write_all(cmd.as_bytes())?;
    let mut buf = vec![0u8; 1 << 16];
    let n = s.read(&mut buf)?;
    Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
}

/// A 3-master Redis Cluster (no replicas) made with `redis-cli --cluster create`.
struct Cluster {
    nodes: Vec<Server>,
}

impl Cluster {
    fn start() -> Cluster {
        Cluster::start_with(|_| Vec::new())
    }

    /// Three masters; `extra(i)` adds arguments for node `i`.
    fn start_with(extra: impl Fn(usize) -> Vec<String>) -> Cluster {
        let conf = ["--cluster-enabled", "yes", "--cluster-node-timeout", "2000"];
        let nodes: Vec<Server> = (0..3)
            .map(|i| {
                let more = extra(i);
                let mut args: Vec<&str> = conf.to_vec();
                args.extend(more.iter().map(String::as_str));
                Server::start(&args)
            })
            .collect();
        let addrs: Vec<String> = nodes.iter().map(Server::addr).collect();
        let out = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addrs)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .expect("redis-cli");
        assert!(
            out.status.success(),
            "redis-cli --cluster create: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let c = Cluster { nodes };
        c.wait_ok();
        c
    }

    fn wait_ok(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        for n in &self.nodes {
            loop {
                let info = raw(n.port, &["CLUSTER", "INFO"]).unwrap_or_default();
                if info.contains("cluster_state:ok") {
                    break;
                }
                assert!(Instant::now() < deadline, "cluster not ok: {info}");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }

    fn seeds(&self) -> String {
        self.nodes
            .iter()
            .map(Server::addr)
            .collect::<Vec<_>>()
            .join(",")
    }
}

fn load_single(server: &Server, extra: &[(&str, &str)]) -> Result<PluginBackend, String> {
    let url = server.url();
    let mut o = vec![("url", url.as_str())];
    o.extend_from_slice(extra);
    load("rd", &redis_so(), "redis", &o)
}

fn load_cluster(c: &Cluster, extra: &[(&str, &str)]) -> PluginBackend {
    let seeds = c.seeds();
    let mut o = vec![("cluster_nodes", seeds.as_str())];
    o.extend_from_slice(extra);
    load("rc", &redis_so(), "redis", &o).unwrap_or_else(|e| panic!("{e}"))
}

fn put(p: &PluginBackend, items: &[(ChunkKey, u64, usize)]) -> (Vec<Status>, Option<String>) {
    let request = PutRequest {
        keys: items.iter().map(|(k, _, _)| k.clone()).collect(),
        bufs: items.iter().map(|&(_, s, n)| bytes(s, n)).collect(),
        metas: items.iter().map(|&(_, s, n)| chunk_meta(s, n)).collect(),
    };
    let done = p.put_wait(request, WAIT).expect("put completes");
    (done.items, done.error.map(|e| e.to_string()))
}

fn put_ok(p: &PluginBackend, items: &[(ChunkKey, u64, usize)]) {
    let (st, err) = put(p, items);
    assert!(
        err.is_none() && st.iter().all(|s| *s == Status::OK),
        "put: {st:?} {err:?}"
    );
}

/// Keys in the server whose names contain `needle` (KEYS is fine on a test server).
fn keys_matching(port: u16, needle: &str) -> Vec<String> {
    let reply = raw(port, &["KEYS", &format!("*{needle}*")]).unwrap();
    reply
        .lines()
        .filter(|l| l.contains(needle) && !l.starts_with('$') && !l.starts_with('*'))
        .map(str::to_string)
        .collect()
}

/* ---------------------------------------------------------------------------------------------- */

fn conformance(factory: &kvhost::conformance::Factory<'_>, what: &str) {
    let report = kvhost::conformance::run(factory);
    println!("conformance of redis ({what}):\n{report}");
    assert!(
        report.passed(),
        "redis ({what}) failed conformance:\n{}",
        report.failures().join("\n")
    );
    assert!(report.checks.len() >= 12, "{report}");
}

#[test]
#[cfg_attr(
    not(has_redis),
    ignore = "needs redis-server (apt-get install redis-server)"
)]
fn redis_conforms_on_a_single_server() {
    if !have_redis("conformance single") {
        return;
    }
    let server = Server::start(&[]);
    let url = server.url();
    // Small parts, so the suite's larger chunks take the split path too.
    let factory = || {
        let c = config_for(
            "rd",
            &redis_so(),
            "redis",
            &[("url", url.as_str()), ("part_size_mib", "0.0625")],
        );
        kvhost::loader::load(&c.plugins[0], &c)
    };
    conformance(&factory, "single server");
}

/// A throw-away PKI made with the `openssl` CLI: a CA, a server certificate for 127.0.0.1 and a client
/// certificate, all signed by the CA, plus a second CA that signed nothing here.
struct Pki {
    dir: PathBuf,
}

impl Pki {
    /// A fresh CA and certificates in this run's `pki-<tag>-<pid>` directory (removed on drop).
    fn make(tag: &str) -> Pki {
        let dir = &profile_dir()
            .join("redis-tests")
            .join(format!("pki-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(dir).unwrap();
        let ssl = |args: &[&str]| {
            let out = Command::new("openssl")
                .args(args)
                .current_dir(dir)
                .output()
                .expect("openssl (apt-get install openssl)");
            assert!(
                out.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        for ca in ["ca", "other-ca"] {
            let subj = format!("/CN=kvhost test {ca}");
            let (key, crt) = (format!("{ca}.key"), format!("{ca}.crt"));
            let mut a = vec!["req", "-x509", "-days", "2", "-subj", &subj];
            a.extend_from_slice(&ec);
            a.extend_from_slice(&["-keyout", &key, "-out", &crt]);
            ssl(&a);
        }
        std::fs::write(dir.join("server.ext"), "subjectAltName=IP:127.0.0.1\n").unwrap();
        std::fs::write(dir.join("client.ext"), "extendedKeyUsage=clientAuth\n").unwrap();
        for who in ["server", "client"] {
            let (key, csr, crt, ext) = (
                format!("{who}.key"),
                format!("{who}.csr"),
                format!("{who}.crt"),
                format!("{who}.ext"),
            );
            let subj = format!("/CN=kvhost test {who}");
            let mut a = vec!["req", "-subj", &subj];
            a.extend_from_slice(&ec);
            a.extend_from_slice(&["-keyout", &key, "-out", &csr]);
            ssl(&a);
            ssl(&[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "2",
                "-extfile",
                &ext,
                "-out",
                &crt,
            ]);
        }
        Pki {
            dir: dir.to_path_buf(),
        }
    }

    fn file(&self, name: &str) -> String {
        self.dir.join(name).display().to_string()
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
#[cfg_attr(
    not(has_redis),
    ignore = "needs redis-server (apt-get install redis-server)"
)]
fn redis_conforms_over_tls_with_client_certificates_and_refuses_bad_trust() {
    if !have_redis("tls") {
        return;
    }
    let pki = Pki::make("single");
    let tls_port = free_port();
    let server = Server::start(&[
        "--tls-port",
        &tls_port.to_string(),
        "--tls-cert-file",
        &pki.file("server.crt"),
        "--tls-key-file",
        &pki.file("server.key"),
        "--tls-ca-cert-file",
        &pki.file("ca.crt"),
        "--tls-auth-clients",
        "yes",
    ]);
    let url = format!("rediss://127.0.0.1:{tls_port}");
    let (ca, cert, key_file) = (
        pki.file("ca.crt"),
        pki.file("client.crt"),
        pki.file("client.key"),
    );
    let tls = [
        ("url", url.as_str()),
        ("tls_ca_file", ca.as_str()),
        ("tls_cert_file", cert.as_str()),
        ("tls_key_file", key_file.as_str()),
    ];
    let factory = || {
        let mut o = tls.to_vec();
        o.push(("part_size_mib", "0.0625"));
        let c = config_for("rt", &redis_so(), "redis", &o);
        kvhost::loader::load(&c.plugins[0], &c)
    };
    conformance(&factory, "single server over TLS");
    // The data really went through the TLS port: the plain port sees it too (same server).
    let mut o = tls.to_vec();
    o.push(("key_prefix", "tlsonly:"));
    let p = load("rt", &redis_so(), "redis", &o).unwrap();
    put_ok(&p, &[(key(61), 61, 300_000)]);
    assert_chunk(&p, &key(61), 61, 300_000);
    assert_eq!(keys_matching(server.port, "tlsonly:").len(), 1);
    drop(p);

    let refused = |opts: &[(&str, &str)]| load("rt", &redis_so(), "redis", opts).unwrap_err();
    // No client certificate: the server refuses the handshake.
    let e = refused(&tls[..2]);
    println!("without a client certificate: {e}");
    assert!(e.contains(&format!("127.0.0.1:{tls_port}")), "{e}");
    // A CA that did not sign the server's certificate: the plugin refuses the server.
    let other = pki.file("other-ca.crt");
    let e = refused(&[
        ("url", url.as_str()),
        ("tls_ca_file", other.as_str()),
        ("tls_cert_file", cert.as_str()),
        ("tls_key_file", key_file.as_str()),
    ]);
    assert!(
        e.contains(&format!("127.0.0.1:{tls_port}")) && e.to_lowercase().contains("certificate"),
        "{e}"
    );
    // TLS files without TLS, half a client identity, a missing file.
    let plain = server.url();
    let e = refused(&[("url", plain.as_str()), ("tls_ca_file", ca.as_str())]);
    assert!(e.contains("need TLS"), "{e}");
    let e = refused(&[("url", url.as_str()), ("tls_cert_file", cert.as_str())]);
    assert!(e.contains("give both or neither"), "{e}");
    let e = refused(&[
        ("url", url.as_str()),
        ("tls_ca_file", "/nonexistent/ca.pem"),
    ]);
    assert!(e.contains("tls_ca_file `/nonexistent/ca.pem`"), "{e}");
}

#[test]
#[cfg_attr(
    not(has_redis),
    ignore = "needs redis-server (apt-get install redis-server)"
)]
fn redis_cluster_conforms_over_tls() {
    if !have_redis("tls cluster") {
        return;
    }
    let pki = Pki::make("cluster");
    let tls_ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
    // Plain ports stay open for the test's own probes and `redis-cli --cluster create`; the cluster bus
    // and every connection of the plugin use TLS.
    let cluster = Cluster::start_with(|i| {
        [
            "--tls-port",
            &tls_ports[i].to_string(),
            "--tls-cluster",
            "yes",
            "--tls-cert-file",
            &pki.file("server.crt"),
            "--tls-key-file",
            &pki.file("server.key"),
            "--tls-ca-cert-file",
            &pki.file("ca.crt"),
            "--tls-auth-clients",
            "no",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    });
    let seeds = tls_ports
        .iter()
        .map(|p| format!("127.0.0.1:{p}"))
        .collect::<Vec<_>>()
        .join(",");
    let ca = pki.file("ca.crt");
    let opts = [
        ("cluster_nodes", seeds.as_str()),
        ("tls", "true"),
        ("tls_ca_file", ca.as_str()),
        ("part_size_mib", "0.0625"),
    ];
    let factory = || {
        let c = config_for("rct", &redis_so(), "redis", &opts);
        kvhost::loader::load(&c.plugins[0], &c)
    };
    conformance(&factory, "3-node cluster over TLS");
    let p = load("rct", &redis_so(), "redis", &opts).unwrap();
    let h = p.health().unwrap().unwrap();
    for port in &tls_ports {
        assert!(
            h.contains(&format!("127.0.0.1:{port}")),
            "the slot map names TLS ports: {h}"
        );
    }
    // Without TLS the same seeds do not answer RESP.
    let e = load(
        "rct",
        &redis_so(),
        "redis",
        &[("cluster_nodes", seeds.as_str())],
    )
    .unwrap_err();
    assert!(e.contains(&format!("127.0.0.1:{}", tls_ports[0])), "{e}");
    drop(cluster);
}

#[test]
#[cfg_attr(
    not(has_redis),
    ignore = "needs redis-server (apt-get install redis-server)"
)]
fn redis_conforms_on_a_three_node_cluster() {
    if !have_redis("conformance cluster") {
        return;
    }
    let cluster = Cluster::start();
    let seeds = cluster.seeds();
    let factory = || {
        let c = config_for(
            "rc",
            &redis_so(),
            "redis",
            &[
                ("cluster_nodes", seeds.as_str()),
                ("part_size_mib", "0.0625"),
            ],
        );
        kvhost::loader::load(&c.plugins[0], &c)
    };
    conformance(&factory, "3-node cluster");
    // Keys went to every master (the hash tags spread chunks over slots).
    let p = load_cluster(&cluster, &[]);
    let items: Vec<_> = (0..60).map(|i| (key(50_000 + i), i as u64, 1000)).collect();
    put_ok(&p, &items);
    for n in &cluster.nodes {
        assert!(
            !keys_matching(n.port, "kvhost:").is_empty(),
            "node {} got no keys",
            n.addr()
        );
    }
    let h = p.health().unwrap().unwrap();
    assert_eq!(h.matches(" up ").count(), 3, "{h}");
}

#[test]
#[cfg_attr(
    not(has_redis),
    ignore = "needs redis-server (apt-get install redis-server)"
)]
fn large_chunks_are_split_into_parts_on_one_slot_and_a_missing_part_is_a_miss() {
    if !have_redis("parts") {
        return;
    }
    let cluster = Cluster::start();
    let p = load_cluster(
        &cluster,
        &[("part_size_mib", "0.25"), ("key_prefix", "pt:")],
    );
    // 1 MiB + 1: five parts; 256 KiB exactly: inline; 3 MiB: twelve parts.
    let sizes = [(1 << 20) + 1, 256 << 10, 3 << 20];
    let keys: Vec<ChunkKey> = (0..3).map(|i| key(900 + i)).collect();
    let items: Vec<_> = keys
        .iter()
        .zip(sizes)
        .enumerate()
        .map(|(i, (k, n))| (k.clone(), i as u64, n))
        .collect();
    put_ok(&p, &items);
    for (i, (k, n)) in keys.iter().zip(sizes).enumerate() {
        assert_chunk(&p, k, i as u64, n);
    }
    // Every key of a chunk is on one node: the node holding its manifest holds all its parts.
    let canonical = keys[0].to_string();
    let holder = cluster
        .nodes
        .iter()
        .find(|n| keys_matching(n.port, &format!("m:{canonical}")).len() == 1)
        .expect("manifest of chunk 0 on some node");
    // Part names carry the write's generation: `p<gen>.<i>:<key>`.
    let parts: Vec<String> = (0..5).map(|i| format!(".{i}:{canonical}")).collect();
    for part in &parts {
        assert_eq!(
            keys_matching(holder.port, part).len(),
            1,
            "{part} on {}",
            holder.addr()
        );
    }
    // Delete one part behind the plugin's back: the chunk now reads as a miss, never partial data.
    let victim = keys_matching(holder.port, &parts[3]).remove(0);
    assert!(
        raw(holder.port, &["DEL", &victim])
            .unwrap()
            .starts_with(":1"),
        "DEL {victim}"
    );
    let (item, _) = get_chunks(&p, &keys[..1], sizes[0]).remove(0);
    assert_eq!(item, GetItem::Miss);
    // The others are untouched; remove takes a split chunk's parts with it.
    assert_chunk(&p, &keys[2], 2, sizes[2]);
    assert_eq!(p.remove(&keys[2..], false).unwrap(), vec![Status::OK]);
    assert_absent(&p, &keys[2]);
    let left: usize = cluster
        .nodes
        .iter()
        .map(|n| keys_matching(n.port, &keys[2].to_string()).len())
        .sum();
    assert_eq!(left, 0, "remove left parts behind");
    // A buffer too small for a split chunk says how much is needed.
    put_ok(&p, &items[2..]);
    let (item, _) = get_chunks(&p, &keys[2..], 1 << 20).remove(0);
    assert_eq!(
        item,
        GetItem::TooSmall {
            needed: sizes[2] as u64
        }
    );
    // clear removes exactly this prefix.
    // A key outside the prefix, on whichever node owns its slot.
    assert!(cluster
        .nodes
        .iter()
        .any(|n| raw(n.port, &["SET", "{other}key", "keep"])
            .unwrap()
            .starts_with("+OK")));
    p.clear().unwrap();
    let left: usize = cluster
        .nodes
        .iter()
        .map(|n| keys_matching(n.port, "pt:").len())
        .sum();
    assert_eq!(left, 0);
    let kept: usize = cluster
        .nodes
        .iter()
        .map(|n| keys_matching(n.port, "{other}").len())
        .sum();
    assert_eq!(kept, 1, "clear touched a key outside its prefix");
}

#[test]
#[cfg_attr(
    not(has_redis),
    ignore = "needs redis-server (apt-get install redis-server)"
)]
fn concurrent_writers_and_a_reader_never_see_a_mix_of_parts_and_leave_no_garbage() {
    if !have_redis("overwrite race") {
        return;
    }
    let server = Server::start(&[]);
    // Two plugin instances: two hosts sharing one server and storing the same key.
    let hosts = [
        load_single(&server, &[("part_size_mib", "0.0625"), ("pool_size", "2")]).unwrap(),
        load_single(&server, &[("part_size_mib", "0.0625"), ("pool_size", "2")]).unwrap(),
    ];
    let k = key(77);
    let len = 1 << 20; // sixteen parts
    let version_buf = |v: u64| -> Vec<u8> { (0..len / 8).flat_map(|_| v.to_le_bytes()).collect() };
    let writing = AtomicUsize::new(2);
    let check = |item: GetItem, buf: &[u8]| -> bool {
        match item {
            GetItem::Hit { len: n, meta: m } => {
                assert_eq!(n, len);
                let v = u64::from_le_bytes(buf[..8].try_into().unwrap());
                assert_eq!(m, chunk_meta(v, len), "metadata of another version");
                assert!(
                    buf.chunks(8).all(|w| w == v.to_le_bytes()),
                    "a hit mixed versions (first word {v})"
                );
                true
            }
            GetItem::Miss => false,
            other => panic!("{other:?}"),
        }
    };
    std::thread::scope(|s| {
        for (w, p) in hosts.iter().enumerate() {
            let (k, writing) = (&k, &writing);
            s.spawn(move || {
                for v in 0..25u64 {
                    let v = 1 + v * 2 + w as u64;
                    let done = p
                        .put_wait(
                            PutRequest {
                                keys: vec![k.clone()],
                                bufs: vec![version_buf(v)],
                                metas: vec![chunk_meta(v, len)],
                            },
                            WAIT,
                        )
                        .unwrap();
                    assert_eq!(done.items, vec![Status::OK]);
                }
                writing.fetch_sub(1, Ordering::Release);
            });
        }
        let (mut hits, mut misses) = (0, 0);
        while writing.load(Ordering::Acquire) > 0 {
            let (item, buf) = get_chunks(&hosts[0], std::slice::from_ref(&k), len).remove(0);
            if check(item, &buf) {
                hits += 1
            } else {
                misses += 1
            }
        }
        println!("racing reader: {hits} whole hits, {misses} misses");
        assert!(hits > 0, "the reader never saw a complete chunk");
    });
    // Whichever manifest landed last names a complete set of parts: the chunk reads back whole from
    // both hosts, and the parts of every replaced write are gone.
    for p in &hosts {
        let (item, buf) = get_chunks(p, std::slice::from_ref(&k), len).remove(0);
        assert!(check(item, &buf), "the final chunk is not readable");
    }
    let canonical = k.to_string();
    assert_eq!(
        keys_matching(server.port, &format!(":{canonical}")).len(),
        1 + 16,
        "garbage parts left"
    );
}

/// A one-tier chain config over `server` with a 64 MiB hot cache, `blocking_timeout_secs` and the
/// plugin options `opts`.
fn chain_config(server: &Server, blocking_timeout_secs: &str, opts: &[(&str, &str)]) -> Config {
    let mut y = format!(
        "chunk_size: 16\nmax_local_cpu_size: 0.0625\nlocal_cpu_prefault: false\nblocking_timeout_secs: {blocking_timeout_secs}\n\
         storage_plugins: [rd]\nextra_config:\n  storage_plugin.rd.module_path: \"{}\"\n  \
         storage_plugin.rd.class_name: redis\n  storage_plugin.rd.url: \"{}\"\n",
        redis_so(),
        server.url()
    );
    for (k, v) in opts {
        y.push_str(&format!("  storage_plugin.rd.{k}: {v}\n"));
    }
    Config::from_yaml(&y, None).unwrap_or_else(|e| panic!("{e}\n{y}"))
}

#[test]
#[cfg_attr(
    not(has_redis),
    ignore = "needs redis-server (apt-get install redis-server)"
)]
fn the_chain_promotes_redis_hits_into_the_hot_cache() {
    if !have_redis("chain") {
        return;
    }
    let server = Server::start(&[]);
    let config = chain_config(&server, "10", &[("part_size_mib", "0.5")]);
    let keys: Vec<ChunkKey> = (0..4).map(|i| key(7000 + i)).collect();
    let data: Vec<Vec<u8>> = (0..4)
        .map(|i| bytes(i, 300_000 + i as usize * 250_001))
        .collect();
    {
        let chain = Chain::from_config(&config).unwrap_or_else(|e| panic!("{e}"));
        for (k, d) in keys.iter().zip(&data) {
            let outcome = chain
                .put(std::slice::from_ref(k), &[d], &[chunk_meta(1, d.len())])
                .remove(0);
            assert_eq!(outcome, PutOutcome::Stored);
        }
        wait_drained(&chain);
        assert!(chain.hot().remove(&keys[3]));
        let h = chain.get(&keys[3..]).remove(0).expect("redis has it");
        assert_eq!(h.bytes(), &data[3][..]);
        assert_eq!(h.meta(), chunk_meta(1, data[3].len()));
        let stats = chain.stats();
        let rd = stats
            .tiers
            .iter()
            .find(|t| t.name == "rd")
            .expect("tier rd");
        assert_eq!((rd.promotions, rd.hits), (1, 1), "{rd:?}");
        drop(h);
        assert!(chain.close(Duration::from_secs(10)).unfinished.is_empty());
    }
    // Another host process (a new chain, empty hot cache) shares the data through Redis.
    let chain = Chain::from_config(&config).unwrap();
    assert_eq!(
        chain.lookup(&keys, None).hit_chunks,
        4,
        "prefix found in redis"
    );
    for (i, k) in keys.iter().enumerate() {
        let h = chain
            .get(std::slice::from_ref(k))
            .remove(0)
            .unwrap_or_else(|| panic!("key {i}"));
        assert_eq!(h.bytes(), &data[i][..]);
    }
    chain.close(Duration::from_secs(10));
}

/// Send `signal` (`STOP`, `CONT`) to the server process.
fn signal(server: &Server, signal: &str) {
    let pid = server.child.as_ref().expect("running").id().to_string();
    let ok = Command::new("kill")
        .args([&format!("-{signal}"), &pid])
        .status()
        .expect("kill");
    assert!(ok.success(), "kill -{signal} {pid}");
}

#[test]
#[cfg_attr(
    not(has_redis),
    ignore = "needs redis-server (apt-get install redis-server)"
)]
fn a_stalled_server_never_holds_a_host_thread_past_the_read_timeout() {
    if !have_redis("stall") {
        return;
    }
    let server = Server::start(&[]);
    // The plugin would wait 4 s for a reply; the host waits 0.4 s.
    let config = chain_config(
        &server,
        "0.4",
        &[("command_timeout_ms", "4000"), ("pool_size", "2")],
    );
    let chain = Chain::from_config(&config).unwrap_or_else(|e| panic!("{e}"));
    let (a, b, c) = (key(801), key(802), key(803));
    let data = bytes(8, 100_000);
    for k in [&a, &b, &c] {
        let stored = chain.put(
            std::slice::from_ref(k),
            &[&data],
            &[chunk_meta(8, data.len())],
        );
        assert_eq!(stored, [PutOutcome::Stored]);
    }
    wait_drained(&chain);
    // a and c only in redis; b also in the hot cache.
    assert!(chain.hot().remove(&a) && chain.hot().remove(&c));

    signal(&server, "STOP");
    let t = Instant::now();
    let lookup = chain.lookup(std::slice::from_ref(&a), None);
    let took = t.elapsed();
    assert_eq!(lookup.hit_chunks, 0, "a stalled tier reports nothing");
    assert!(
        took < Duration::from_secs(2),
        "lookup held the host thread {took:?} (the plugin's own timeout is 4 s)"
    );
    let h = chain.get(std::slice::from_ref(&b)).remove(0);
    assert_eq!(h.expect("the hot cache serves").bytes(), &data[..]);
    let t = Instant::now();
    chain.remove(std::slice::from_ref(&c));
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "remove held the host thread {:?}",
        t.elapsed()
    );
    signal(&server, "CONT");

    // The stalled requests finish in the background: the remove lands, a is found again.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let found = chain.lookup(std::slice::from_ref(&a), None).hit_chunks == 1
            && chain.lookup(std::slice::from_ref(&c), None).hit_chunks == 0;
        if found {
            break;
        }
        assert!(Instant::now() < deadline, "redis did not recover");
        std::thread::sleep(Duration::from_millis(100));
    }
    let h = chain.get(std::slice::from_ref(&a)).remove(0);
    assert_eq!(h.expect("a from redis").bytes(), &data[..]);
    assert!(chain.close(Duration::from_secs(10)).unfinished.is_empty());
}

#[test]
#[cfg_attr(
    not(has_redis),
    ignore = "needs redis-server (apt-get install redis-server)"
)]
fn a_server_restart_fails_fast_while_down_keeps_the_host_serving_and_reconnects() {
    if !have_redis("restart") {
        return;
    }
    let mut server = Server::start(&["--appendonly", "yes", "--appendfsync", "always"]);
    let config = chain_config(
        &server,
        "10",
        &[("down_ms", "300"), ("command_timeout_ms", "2000")],
    );
    let chain = Chain::from_config(&config).unwrap_or_else(|e| panic!("{e}"));
    let p = load_single(&server, &[("down_ms", "300")]).unwrap();
    let a = key(1);
    let da = bytes(1, 200_000);
    assert_eq!(
        chain
            .put(std::slice::from_ref(&a), &[&da], &[chunk_meta(1, da.len())])
            .remove(0),
        PutOutcome::Stored
    );
    wait_drained(&chain);
    put_ok(&p, &[(key(2), 2, 70_000)]);

    server.stop();
    // Calls fail, fast, naming the server; nothing is reported as stored.
    let t = Instant::now();
    let (st, err) = put(&p, &[(key(3), 3, 1000)]);
    let first = t.elapsed();
    assert_eq!(st, vec![Status::UNAVAILABLE]);
    let err = err.expect("an error message");
    assert!(err.contains(&server.addr()), "{err}");
    let t = Instant::now();
    for _ in 0..20 {
        let (st, _) = put(&p, &[(key(3), 3, 1000)]);
        assert_eq!(st, vec![Status::UNAVAILABLE]);
        assert_ne!(
            get_chunks_unchecked(&p, &[key(2)], 70_000).0.remove(0).0,
            GetItem::Hit {
                len: 70_000,
                meta: chunk_meta(2, 70_000)
            }
        );
    }
    let twenty = t.elapsed();
    assert!(
        first < Duration::from_secs(2),
        "first failure took {first:?}"
    );
    assert!(
        twenty < Duration::from_secs(2),
        "20 failing round trips took {twenty:?}"
    );
    let e = p
        .contains(&[key(2)], false)
        .expect_err("contains while down");
    assert!(e.to_string().contains(&server.addr()), "{e}");
    let h = p.health().unwrap().expect_err("health while down");
    assert!(h.to_string().contains("down"), "{h}");
    // The host keeps serving from its hot cache.
    let h = chain
        .get(std::slice::from_ref(&a))
        .remove(0)
        .expect("hot cache serves while redis is down");
    assert_eq!(h.bytes(), &da[..]);
    drop(h);

    server.restart();
    // After `down_ms`, the next call reconnects; data written before the crash (AOF) is back.
    std::thread::sleep(Duration::from_millis(400));
    assert_chunk(&p, &key(2), 2, 70_000);
    put_ok(&p, &[(key(3), 3, 1000)]);
    assert_chunk(&p, &key(3), 3, 1000);
    assert!(p.health().unwrap().is_ok());
    // The chain's own plugin instance reconnects too.
    assert!(chain.hot().remove(&a));
    std::thread::sleep(Duration::from_millis(400));
    let _ = chain.lookup(std::slice::from_ref(&a), None); // may still see the down mark
    std::thread::sleep(Duration::from_millis(400));
    let h = chain
        .get(std::slice::from_ref(&a))
        .remove(0)
        .expect("redis serves a after the restart");
    assert_eq!(h.bytes(), &da[..]);
    drop(h);
    chain.close(Duration::from_secs(10));
}

#[test]
#[cfg_attr(
    not(has_redis),
    ignore = "needs redis-server (apt-get install redis-server)"
)]
fn a_cluster_node_restart_fails_its_keys_fast_and_recovers() {
    if !have_redis("cluster restart") {
        return;
    }
    let mut cluster = Cluster::start();
    let p = load_cluster(
        &cluster,
        &[("down_ms", "200"), ("command_timeout_ms", "2000")],
    );
    let items: Vec<_> = (0..30).map(|i| (key(10_000 + i), i as u64, 5000)).collect();
    put_ok(&p, &items);
    let victim = cluster.nodes[1].port;
    let on_victim: Vec<usize> = items
        .iter()
        .enumerate()
        .filter(|(_, (k, _, _))| !keys_matching(victim, &format!("m:{k}")).is_empty())
        .map(|(i, _)| i)
        .collect();
    assert!(!on_victim.is_empty() && on_victim.len() < items.len());
    // Kill one master (no replicas): its keys fail fast; the others' keys keep working.
    cluster.nodes[1].stop();
    let keys: Vec<ChunkKey> = items.iter().map(|(k, _, _)| k.clone()).collect();
    let t = Instant::now();
    let got = get_chunks_unchecked(&p, &keys, 5000).0;
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    for (i, (item, buf)) in got.iter().enumerate() {
        if on_victim.contains(&i) {
            assert!(
                matches!(item, GetItem::Failed(..) | GetItem::Miss),
                "{i}: {item:?}"
            );
        } else {
            assert_eq!(
                *item,
                GetItem::Hit {
                    len: 5000,
                    meta: chunk_meta(i as u64, 5000)
                },
                "{i}"
            );
            assert!(buf[..] == bytes(i as u64, 5000)[..]);
        }
    }
    // It comes back with its nodes.conf (same id and slots); the plugin reconnects.
    cluster.nodes[1].restart();
    cluster.wait_ok();
    std::thread::sleep(Duration::from_millis(300));
    put_ok(&p, &items);
    for &i in &on_victim {
        assert_chunk(&p, &items[i].0, i as u64, 5000);
    }
}

#[test]
#[cfg_attr(
    not(has_redis),
    ignore = "needs redis-server (apt-get install redis-server)"
)]
fn bad_configurations_are_refused_with_clear_errors() {
    if !have_redis("bad config") {
        return;
    }
    // Nothing listens on this port.
    let port = free_port();
    let url = format!("redis://127.0.0.1:{port}");
    let e = load("rd", &redis_so(), "redis", &[("url", &url)]).unwrap_err();
    assert!(
        e.contains(&format!("127.0.0.1:{port}")) && e.contains("refused"),
        "{e}"
    );
    let e = load("rd", &redis_so(), "redis", &[]).unwrap_err();
    assert!(e.contains("`url`") && e.contains("`cluster_nodes`"), "{e}");
    let e = load(
        "rd",
        &redis_so(),
        "redis",
        &[
            ("url", "redis+unix:///tmp/nowhere.sock"),
            ("password", "hunter2"),
        ],
    )
    .unwrap_err();
    assert!(e.contains("unix sockets") && !e.contains("hunter2"), "{e}");
    let e = load(
        "rd",
        &redis_so(),
        "redis",
        &[("url", "redis://h:1"), ("cluster_nodes", "h:2")],
    )
    .unwrap_err();
    assert!(e.contains("not both"), "{e}");
    let e = load(
        "rd",
        &redis_so(),
        "redis",
        &[("url", "redis://h:1"), ("key_prefix", "a{b}")],
    )
    .unwrap_err();
    assert!(e.contains("key_prefix"), "{e}");
    // A password the server does not have: refused at create, the password never printed.
    let server = Server::start(&["--requirepass", "right-pass"]);
    let e = load_single(&server, &[("password", "wrong-pass")]).unwrap_err();
    assert!(
        e.contains(&server.addr()) && !e.contains("wrong-pass"),
        "{e}"
    );
    let p = load_single(&server, &[("password", "right-pass")]).unwrap();
    put_ok(&p, &[(key(5), 5, 10)]);
    assert_chunk(&p, &key(5), 5, 10);
    // A cluster node given as `url`.
    let cluster = Cluster::start();
    let e = load(
        "rd",
        &redis_so(),
        "redis",
        &[("url", &cluster.nodes[0].url())],
    )
    .unwrap_err();
    assert!(e.contains("cluster_nodes"), "{e}");
    // A value that is not a kvhost chunk under a kvhost key reads as a miss, not as data.
    let p = load_single(&server, &[("password", "right-pass"), ("key_prefix", "x:")]).unwrap();
    put_ok(&p, &[(key(6), 6, 100)]);
    let name = {
        let mut s = TcpStream::connect(("127.0.0.1", server.port)).unwrap();
        s.write_all(b"AUTH right-pass\r\nKEYS x:*\r\n").unwrap();
        std::thread::sleep(Duration::from_millis(100));
        let mut buf = vec![0u8; 4096];
        let n = s.read(&mut buf).unwrap();
        let text = String::from_utf8_lossy(&buf[..n]).into_owned();
        text.lines()
            .find(|l| l.starts_with("x:"))
            .unwrap()
            .to_string()
    };
    let mut s = TcpStream::connect(("127.0.0.1", server.port)).unwrap();
    let cmd = format!("*2\r\n$4\r\nAUTH\r\n$10\r\nright-pass\r\n*3\r\n$3\r\nSET\r\n${}\r\n{name}\r\n$80\r\n{}\r\n", name.len(), "z".repeat(80));
    s.write_all(cmd.as_bytes()).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    assert_absent(&p, &key(6));
}
