//! The Ceph RADOS plugin (`plugins/rados`, C on librados) against real one-node Ceph clusters started by
//! `tests/ceph/one-node-cluster.sh` (one monitor, one memstore OSD, cephx, 127.0.0.1 only).
//!
//! Most tests share one cluster (started by the first test that needs it, stopped when the last one
//! holding it is done) and keep apart by RADOS namespace. The tests that stop the OSD or fill the store
//! start their own. Every cluster is stopped by a Drop guard, and by the script's watchdog should this
//! process die without unwinding.
//!
//! Without Ceph (ceph-mon, ceph-osd, ceph-common, uuid-runtime) or without the plugin (librados-dev
//! missing at build time) every test here is reported *ignored* with the reason (the `has_ceph` cfg
//! from tests/build.rs), unless `KVHOST_REQUIRE_CEPH=1` (set by `.ci/test-all`): then they run and fail.

use crate::util::*;
use kvhost::chain::{Chain, PutOutcome};
use kvhost::config::Config;
use kvhost::plugin::{GetItem, PluginBackend, Presence, PutRequest};
use kvhost::ChunkKey;
use kvhost_plugin_sdk::Status;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

pub const MODULE: &str = "kvhost_rados";
pub const CLASS: &str = "rados";
/// The pool every test uses; the shared cluster also has OTHER_POOL (for the cephx caps test).
pub const POOL: &str = "kvcache";
const OTHER_POOL: &str = "other";
const WAIT: Duration = Duration::from_secs(60);
const MIB: usize = 1 << 20;

/* ---------------------------------------------------------------------------------------------- */
/* Prerequisites and clusters                                                                     */
/* ---------------------------------------------------------------------------------------------- */

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn script() -> PathBuf {
    repo_root().join("tests/ceph/one-node-cluster.sh")
}

fn on_path(tool: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false)
}

/// The plugin built by the workspace build (absent when librados-dev was missing at build time).
pub fn plugin_library() -> PathBuf {
    plugins_dir().join("libkvhost_rados.so")
}

/// Why the Ceph tests cannot run on this machine, if they cannot.
fn missing_prerequisite() -> Option<String> {
    for tool in [
        "ceph-mon",
        "ceph-osd",
        "ceph",
        "rados",
        "monmaptool",
        "ceph-authtool",
        "uuidgen",
    ] {
        if !on_path(tool) {
            return Some(format!(
                "{tool} not installed (apt-get install ceph-mon ceph-osd ceph-common uuid-runtime)"
            ));
        }
    }
    if !plugin_library().is_file() {
        return Some(format!(
            "{} was not built: librados-dev was missing when the workspace was built",
            plugin_library().display()
        ));
    }
    None
}

/// Whether a Ceph test can run. Tests without Ceph are ignored at build time (`has_ceph`, see
/// tests/build.rs); a test that runs anyway (`KVHOST_REQUIRE_CEPH=1`, or Ceph removed since the build)
/// fails here with the reason.
pub fn ceph_available(test: &str) -> bool {
    if let Some(why) = missing_prerequisite() {
        panic!(
            "{test}: Ceph is not usable: {why}; without KVHOST_REQUIRE_CEPH=1 a rebuild marks this \
             test ignored"
        );
    }
    true
}

/// A cluster started by the script; stopped (only the pids the script started) when dropped.
pub struct Cluster {
    dir: PathBuf,
    conf: String,
}

static CLUSTERS: AtomicUsize = AtomicUsize::new(0);

impl Cluster {
    /// Starts a cluster with `args` (`--pool`, `--memstore-bytes`, ...). Panics with the script's output
    /// when it fails.
    pub fn start(name: &str, args: &[&str]) -> Cluster {
        let dir = std::env::temp_dir().join(format!(
            "kvh-ceph-{name}-{}-{}",
            std::process::id(),
            CLUSTERS.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        let started = Instant::now();
        let out = Command::new(script())
            .arg("start")
            .arg(&dir)
            .args(args)
            .args(["--owner-pid", &std::process::id().to_string()])
            .stdin(Stdio::null())
            .output()
            .expect("run tests/ceph/one-node-cluster.sh");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let cluster = Cluster {
            dir: dir.clone(),
            conf: stdout.lines().last().unwrap_or_default().trim().to_string(),
        };
        assert!(
            out.status.success() && cluster.conf.ends_with("ceph.conf"),
            "starting a one-node cluster in {} failed ({}):\n{stdout}\n{}",
            dir.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        eprintln!(
            "rados tests: cluster {} up in {:.1} s",
            dir.display(),
            started.elapsed().as_secs_f64()
        );
        cluster
    }

    pub fn conf(&self) -> &str {
        &self.conf
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn script(&self, command: &str) {
        let out = Command::new(script())
            .arg(command)
            .arg(&self.dir)
            .stdin(Stdio::null())
            .output()
            .expect("run tests/ceph/one-node-cluster.sh");
        assert!(
            out.status.success(),
            "one-node-cluster.sh {command} {} failed:\n{}{}",
            self.dir.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Stops the OSD gracefully (memstore saves what it holds).
    pub fn stop_osd(&self) {
        self.script("stop-osd");
    }

    /// Starts the OSD again and waits until every pool serves I/O.
    pub fn start_osd(&self) {
        self.script("start-osd");
    }

    /// Runs a CLI tool against this cluster (with a timeout), returning its output.
    fn cli(&self, tool: &str, args: &[&str], stdin: Option<&[u8]>) -> Output {
        let mut child = Command::new("timeout")
            .args(["30", tool, "-c", &self.conf])
            .args(args)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("running {tool}: {e}"));
        if let Some(data) = stdin {
            use std::io::Write;
            child.stdin.take().unwrap().write_all(data).unwrap();
        }
        child.wait_with_output().unwrap()
    }

    /// `rados -c CONF -p POOL -N ns ARGS`, which must succeed; its stdout.
    pub fn rados(&self, ns: &str, args: &[&str]) -> Vec<u8> {
        self.rados_stdin(ns, args, None)
    }

    fn rados_stdin(&self, ns: &str, args: &[&str], stdin: Option<&[u8]>) -> Vec<u8> {
        let mut all = vec!["-p", POOL, "-N", ns];
        all.extend_from_slice(args);
        let out = self.cli("rados", &all, stdin);
        assert!(
            out.status.success(),
            "rados {}: {}\n{}",
            all.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    }

    /// Object names in namespace `ns` of POOL, sorted.
    pub fn objects(&self, ns: &str) -> Vec<String> {
        let mut names: Vec<String> = String::from_utf8(self.rados(ns, &["ls"]))
            .unwrap()
            .lines()
            .map(str::to_string)
            .collect();
        names.sort();
        names
    }

    fn ceph(&self, args: &[&str]) -> String {
        let out = self.cli("ceph", args, None);
        assert!(
            out.status.success(),
            "ceph {}: {}\n{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Cluster {
    /// Stops the daemons (exactly the pids the script started) and removes the directory, unless a
    /// test is failing (then its logs stay for a look).
    fn stop(&self) {
        let _ = Command::new(script())
            .arg("stop")
            .arg(&self.dir)
            .stdin(Stdio::null())
            .output();
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The cluster most tests share: started on first use, stopped when the process exits (an `atexit`
/// handler; the script's watchdog covers a process killed outright).
pub fn shared_cluster() -> &'static Cluster {
    static SHARED: OnceLock<Cluster> = OnceLock::new();
    static STARTING: Mutex<()> = Mutex::new(());
    if let Some(cluster) = SHARED.get() {
        return cluster;
    }
    let _starting = STARTING.lock().unwrap_or_else(|e| e.into_inner());
    SHARED.get_or_init(|| {
        let cluster = Cluster::start("shared", &["--pool", POOL, "--pool", OTHER_POOL]);
        extern "C" fn stop_shared() {
            if let Some(cluster) = SHARED.get() {
                cluster.stop();
            }
        }
        // SAFETY: registers a plain function without arguments, which is all atexit requires.
        unsafe { libc::atexit(stop_shared) };
        cluster
    })
}

/// A namespace no other test uses.
pub fn namespace(test: &str) -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    format!("{test}-{}", N.fetch_add(1, Ordering::Relaxed))
}

/// The plugin's options for `cluster`, namespace `ns`, plus `extra` (later entries win).
pub fn options<'a>(
    cluster: &'a Cluster,
    ns: &'a str,
    extra: &[(&'a str, &'a str)],
) -> Vec<(&'a str, &'a str)> {
    let mut o = vec![
        ("pool", POOL),
        ("conf", cluster.conf()),
        ("namespace", ns),
        ("op_timeout_s", "10"),
    ];
    o.extend_from_slice(extra);
    o
}

fn open(cluster: &Cluster, ns: &str, extra: &[(&str, &str)]) -> PluginBackend {
    must_load("rados", MODULE, CLASS, &options(cluster, ns, extra))
}

/* ---------------------------------------------------------------------------------------------- */
/* Data helpers                                                                                   */
/* ---------------------------------------------------------------------------------------------- */

fn put_items(p: &PluginBackend, items: &[(ChunkKey, u64, usize)]) -> Vec<Status> {
    let request = PutRequest {
        keys: items.iter().map(|(k, _, _)| k.clone()).collect(),
        bufs: items.iter().map(|&(_, s, n)| bytes(s, n)).collect(),
        metas: items.iter().map(|&(_, s, n)| chunk_meta(s, n)).collect(),
    };
    let done = p.put_wait(request, WAIT).expect("put completes");
    assert!(done.error.is_none(), "put failed: {:?}", done.error);
    done.items
}

fn put(p: &PluginBackend, items: &[(ChunkKey, u64, usize)]) {
    let statuses = put_items(p, items);
    assert!(
        statuses.iter().all(|s| *s == Status::OK),
        "put items: {statuses:?}"
    );
}

fn health(p: &PluginBackend) -> Result<String, String> {
    p.health()
        .expect("HEALTH capability")
        .map_err(|e| e.to_string())
}

/// Waits up to `limit` for `cond`.
fn eventually(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/* ---------------------------------------------------------------------------------------------- */
/* Object names, as documented in plugins/rados/README.md                                         */
/* ---------------------------------------------------------------------------------------------- */

fn fnv1a64(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// The head object's name of a key: prefix + escaped canonical key, cut and hashed beyond 512 bytes.
pub fn head_name(prefix: &str, key: &ChunkKey) -> String {
    let escape = |b: u8| -> String {
        if b.is_ascii_alphanumeric() || b"-_.@".contains(&b) {
            (b as char).to_string()
        } else {
            format!("%{b:02X}")
        }
    };
    let canonical = key.as_str().as_bytes();
    let full: String = canonical.iter().map(|&b| escape(b)).collect();
    if full.len() <= 512 {
        return format!("{prefix}{full}");
    }
    let mut cut = String::new();
    for &b in canonical {
        let e = escape(b);
        if cut.len() + e.len() > 480 {
            break;
        }
        cut.push_str(&e);
    }
    format!("{prefix}{cut}~{:016x}", fnv1a64(canonical))
}

fn stripe_names(head: &str, gen: &str, parts: usize) -> Vec<String> {
    (1..parts).map(|i| format!("{head}#{gen}.{i}")).collect()
}

/// A head object's contents (header record at 0, chunk data from 4096).
fn head_object(cluster: &Cluster, ns: &str, head: &str) -> Vec<u8> {
    cluster.rados(ns, &["get", head, "/dev/stdout"])
}

/// The generation a head object's header names, as it appears in stripe names (16 hex digits).
fn generation(cluster: &Cluster, ns: &str, head: &str) -> String {
    let object = head_object(cluster, ns, head);
    assert!(
        object.len() >= 128 && &object[..8] == b"KVHRADOS",
        "header of {head}"
    );
    format!(
        "{:016x}",
        u64::from_le_bytes(object[40..48].try_into().unwrap())
    )
}

/* ---------------------------------------------------------------------------------------------- */
/* Conformance                                                                                    */
/* ---------------------------------------------------------------------------------------------- */

fn conformance(test: &str, extra: &[(&str, &str)]) {
    if !ceph_available(test) {
        return;
    }
    let cluster = shared_cluster();
    let ns = namespace(test);
    let made = AtomicUsize::new(0);
    let factory = || {
        made.fetch_add(1, Ordering::Relaxed);
        let c = config_for("rados", MODULE, CLASS, &options(cluster, &ns, extra));
        kvhost::loader::load(&c.plugins[0], &c)
    };
    let report = kvhost::conformance::run(&factory);
    println!("conformance of rados {extra:?}:\n{report}");
    assert!(
        report.passed(),
        "rados failed conformance:\n{}",
        report.failures().join("\n")
    );
    let passed = report
        .checks
        .iter()
        .filter(|c| c.outcome == kvhost::conformance::Outcome::Pass)
        .count();
    // Every check but pin/prefetch/flush (capabilities a shared store does not offer) ran and passed.
    assert!(passed >= 11, "{report}");
    assert!(
        made.load(Ordering::Relaxed) >= 2,
        "the suite made a fresh instance after destroying one"
    );
}

#[test]
#[cfg_attr(
    not(has_ceph),
    ignore = "needs Ceph and librados-dev (apt-get install ceph-mon ceph-osd ceph-common uuid-runtime librados-dev)"
)]
fn rados_conforms() {
    conformance("conformance", &[]);
}

#[test]
#[cfg_attr(
    not(has_ceph),
    ignore = "needs Ceph and librados-dev (apt-get install ceph-mon ceph-osd ceph-common uuid-runtime librados-dev)"
)]
fn rados_conforms_when_striping_and_queueing() {
    // 4 KiB objects: the suite's 256 KiB chunk takes 64 objects, with 3 operations in flight at most;
    // with the data CRC (off by default, which rados_conforms covers).
    conformance(
        "conformance-striped",
        &[
            ("max_object_bytes", "4096"),
            ("max_in_flight", "3"),
            ("checksum", "true"),
        ],
    );
}

/* ---------------------------------------------------------------------------------------------- */
/* Layout: names, striping, metadata                                                              */
/* ---------------------------------------------------------------------------------------------- */

#[test]
#[cfg_attr(
    not(has_ceph),
    ignore = "needs Ceph and librados-dev (apt-get install ceph-mon ceph-osd ceph-common uuid-runtime librados-dev)"
)]
fn striped_chunks_round_trip_with_their_metadata_and_documented_object_names() {
    if !ceph_available("striped_chunks") {
        return;
    }
    let cluster = shared_cluster();
    let ns = namespace("striped");
    let unit = 16_384usize;
    let p = open(cluster, &ns, &[("max_object_bytes", "16384")]);
    // Sizes around the stripe unit, an empty chunk, and a large one.
    let sizes = [
        0,
        1,
        unit - 1,
        unit,
        unit + 1,
        3 * unit + 7,
        10 * unit,
        1_000_003,
    ];
    let items: Vec<(ChunkKey, u64, usize)> = sizes
        .iter()
        .enumerate()
        .map(|(i, &n)| (key(500 + i as i128), 40 + i as u64, n))
        .collect();
    put(&p, &items);
    for (k, seed, n) in &items {
        assert_chunk(&p, k, *seed, *n);
    }
    // One get of everything at once, into buffers larger than needed.
    let keys: Vec<ChunkKey> = items.iter().map(|(k, _, _)| k.clone()).collect();
    for ((item, buf), (k, seed, n)) in get_chunks(&p, &keys, 1_100_000).into_iter().zip(&items) {
        assert_eq!(
            item,
            GetItem::Hit {
                len: *n,
                meta: chunk_meta(*seed, *n)
            },
            "{k}"
        );
        assert!(buf[..*n] == bytes(*seed, *n)[..], "bytes of {k}");
    }
    // Too small, also for a striped chunk: the exact size needed, whatever the buffer.
    let (item, _) = get_chunks(&p, &keys[7..8], 1_000_002).remove(0);
    assert_eq!(item, GetItem::TooSmall { needed: 1_000_003 });
    let (item, _) = get_chunks(&p, &keys[5..6], 0).remove(0);
    assert_eq!(
        item,
        GetItem::TooSmall {
            needed: 3 * unit as u64 + 7
        }
    );

    // The objects in RADOS are exactly the documented ones: a head per chunk, ceil(len/unit)-1
    // stripes named <head>#<generation>.<i>.
    let mut expected = Vec::new();
    for (k, _, n) in &items {
        let head = head_name("kvh/", k);
        let parts = n.div_ceil(unit).max(1);
        let gen = generation(cluster, &ns, &head);
        expected.extend(stripe_names(&head, &gen, parts));
        expected.push(head);
    }
    expected.sort();
    assert_eq!(cluster.objects(&ns), expected);
    // The head holds the documented 128-byte header at 0 and the first stripe unit of data from 4096.
    let head = head_name("kvh/", &keys[7]);
    let object = head_object(cluster, &ns, &head);
    assert_eq!(object.len(), 4096 + unit);
    assert_eq!(&object[..8], b"KVHRADOS");
    let u16_at = |o: usize| u16::from_le_bytes([object[o], object[o + 1]]);
    let u64_at = |o: usize| u64::from_le_bytes(object[o..o + 8].try_into().unwrap());
    assert_eq!(
        (u16_at(8), u16_at(10)),
        (1, 128),
        "format version, header size"
    );
    assert_eq!(
        (u64_at(16), u64_at(24)),
        (1_000_003, unit as u64),
        "length, stripe unit"
    );
    assert!(
        object[4096..] == bytes(47, 1_000_003)[..unit],
        "the head's data"
    );

    // Remove deletes every object of a chunk; the others stay.
    assert_eq!(p.remove(&keys[6..8], false).unwrap(), vec![Status::OK; 2]);
    let left = cluster.objects(&ns);
    for k in &keys[6..8] {
        let head = head_name("kvh/", k);
        assert!(!left.iter().any(|o| o.starts_with(&head)), "{left:?}");
        assert_absent(&p, k);
    }
    assert_eq!(
        p.remove(&keys[6..7], true).unwrap(),
        vec![Status::NOT_FOUND]
    );
    assert_chunk(&p, &keys[5], 45, 3 * unit + 7);
}

#[test]
#[cfg_attr(
    not(has_ceph),
    ignore = "needs Ceph and librados-dev (apt-get install ceph-mon ceph-osd ceph-common uuid-runtime librados-dev)"
)]
fn readers_with_another_stripe_unit_read_the_writers_layout() {
    if !ceph_available("other_stripe_unit") {
        return;
    }
    let cluster = shared_cluster();
    let ns = namespace("unit");
    let writer = open(cluster, &ns, &[("max_object_bytes", "65536")]);
    let small = open(cluster, &ns, &[("max_object_bytes", "4096")]);
    let large = open(cluster, &ns, &[("max_object_bytes", "1048576")]);
    let items: Vec<(ChunkKey, u64, usize)> = [1000usize, 65_536, 65_537, 300_001]
        .iter()
        .enumerate()
        .map(|(i, &n)| (key(900 + i as i128), i as u64 + 3, n))
        .collect();
    put(&writer, &items);
    for (k, seed, n) in &items {
        assert_chunk(&small, k, *seed, *n);
        assert_chunk(&large, k, *seed, *n);
    }
    // And the other way round.
    put(&small, &[(key(950), 9, 50_000)]);
    assert_chunk(&writer, &key(950), 9, 50_000);
    assert_chunk(&large, &key(950), 9, 50_000);
}

#[test]
#[cfg_attr(
    not(has_ceph),
    ignore = "needs Ceph and librados-dev (apt-get install ceph-mon ceph-osd ceph-common uuid-runtime librados-dev)"
)]
fn object_names_escape_keys_as_documented() {
    if !ceph_available("object_names") {
        return;
    }
    let cluster = shared_cluster();
    let ns = namespace("names");
    let p = open(cluster, &ns, &[("object_prefix", "cache.v1/")]);
    let plain = ChunkKey::new("meta-llama/Llama-3.1-8B", 2, 1, -0x1f, "bfloat16").unwrap();
    let tagged = ChunkKey::build(
        "org/model name",
        1,
        0,
        77,
        "half",
        Some(3),
        &[("lora", "adapter-1"), ("user", "naïve 100%/ok")],
    )
    .unwrap();
    let long_value = "x/".repeat(400);
    let long = ChunkKey::build("m", 1, 0, 1, "half", None, &[("t", long_value.as_str())]).unwrap();
    let long_sibling = ChunkKey::build(
        "m",
        1,
        0,
        1,
        "half",
        None,
        &[("t", format!("{long_value}y").as_str())],
    )
    .unwrap();
    let items = [
        (plain.clone(), 1, 100),
        (tagged.clone(), 2, 200),
        (long.clone(), 3, 300),
        (long_sibling.clone(), 4, 400),
    ];
    put(&p, &items);
    for (k, seed, n) in &items {
        assert_chunk(&p, k, *seed, *n);
    }
    assert_eq!(
        head_name("cache.v1/", &plain),
        "cache.v1/meta-llama%2FLlama-3.1-8B@2@1@-1f@bfloat16"
    );
    assert_eq!(
        head_name("cache.v1/", &tagged),
        "cache.v1/org%2Fmodel%20name@1@0@4d@half@3@lora%25adapter-1@user%25na%C3%AFve%20100%25%2Fok"
    );
    let hashed = head_name("cache.v1/", &long);
    assert!(hashed.contains('~') && hashed.len() < 600, "{hashed}");
    let mut expected: Vec<String> = items
        .iter()
        .map(|(k, _, _)| head_name("cache.v1/", k))
        .collect();
    expected.sort();
    assert_eq!(cluster.objects(&ns), expected);
}

#[test]
#[cfg_attr(
    not(has_ceph),
    ignore = "needs Ceph and librados-dev (apt-get install ceph-mon ceph-osd ceph-common uuid-runtime librados-dev)"
)]
fn overwrites_never_mix_generations_and_collect_the_old_stripes() {
    if !ceph_available("overwrites") {
        return;
    }
    let cluster = shared_cluster();
    let ns = namespace("overwrite");
    let unit = "16384";
    let writer = Arc::new(open(cluster, &ns, &[("max_object_bytes", unit)]));
    // Another backend instance on the same namespace: another host sharing the pool.
    let reader = Arc::new(open(cluster, &ns, &[("max_object_bytes", unit)]));
    let k = key(4242);
    let versions = [
        (100u64, 5 * 16_384 + 11),
        (200u64, 7 * 16_384),
        (300u64, 20_000),
    ];
    put(&writer, &[(k.clone(), versions[0].0, versions[0].1)]);
    let stop = Arc::new(AtomicBool::new(false));
    let (hits, misses) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let readers: Vec<_> = (0..2)
        .map(|_| {
            let (reader, stop, k) = (reader.clone(), stop.clone(), k.clone());
            let (hits, misses) = (hits.clone(), misses.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let (item, buf) = get_chunks(&reader, std::slice::from_ref(&k), 8 * 16_384).remove(0);
                    match item {
                        GetItem::Hit { len, meta: m } => {
                            let (seed, n) = *versions
                                .iter()
                                .find(|(s, n)| *n == len && m == chunk_meta(*s, *n))
                                .unwrap_or_else(|| panic!("a hit of {len} bytes with metadata {m:?} that no put wrote"));
                            assert!(buf[..len] == bytes(seed, n)[..], "a hit mixing two versions");
                            hits.fetch_add(1, Ordering::Relaxed);
                        }
                        GetItem::Miss => {
                            misses.fetch_add(1, Ordering::Relaxed);
                        }
                        other => panic!("get during overwrites: {other:?}"),
                    }
                }
            })
        })
        .collect();
    let started = Instant::now();
    let mut round = 0;
    while started.elapsed() < Duration::from_secs(3) {
        let (seed, n) = versions[round % versions.len()];
        put(&writer, &[(k.clone(), seed, n)]);
        round += 1;
    }
    stop.store(true, Ordering::Relaxed);
    for r in readers {
        r.join().expect("reader thread");
    }
    let (seed, n) = versions[(round - 1) % versions.len()];
    assert_chunk(&reader, &k, seed, n);
    println!(
        "{round} overwrites; readers saw {} hits and {} misses, never a mix",
        hits.load(Ordering::Relaxed),
        misses.load(Ordering::Relaxed)
    );
    assert!(hits.load(Ordering::Relaxed) > 0);
    // The replaced generations' stripes are removed in the background: what stays is the head and the
    // stripes of the generation it names.
    let head = head_name("kvh/", &k);
    let gen = generation(cluster, &ns, &head);
    let mut expected = stripe_names(&head, &gen, n.div_ceil(16_384));
    expected.push(head.clone());
    expected.sort();
    assert!(
        eventually(Duration::from_secs(20), || cluster.objects(&ns) == expected),
        "objects left after the overwrites: {:?}, expected {expected:?}",
        cluster.objects(&ns)
    );
}

/// CRC32C (Castagnoli) from the maintained `crc32c` crate: independent of the plugin's own code.
fn crc32c(data: &[u8]) -> u32 {
    crc32c::crc32c(data)
}

#[test]
#[cfg_attr(
    not(has_ceph),
    ignore = "needs Ceph and librados-dev (apt-get install ceph-mon ceph-osd ceph-common uuid-runtime librados-dev)"
)]
fn the_header_holds_the_crc32c_of_the_whole_chunk_also_when_striped() {
    if !ceph_available("header_crc") {
        return;
    }
    let cluster = shared_cluster();
    let ns = namespace("crc");
    // Stripe units that are and are not multiples of 4096, chunk sizes around them.
    for (unit, sizes) in [
        (4096usize, &[1usize, 4096, 4097, 3 * 4096 + 1, 65_536][..]),
        (10_007, &[10_006, 10_007, 10_008, 5 * 10_007 + 3][..]),
    ] {
        let unit_text = unit.to_string();
        let p = open(
            cluster,
            &ns,
            &[
                ("max_object_bytes", unit_text.as_str()),
                ("checksum", "true"),
            ],
        );
        let items: Vec<(ChunkKey, u64, usize)> = sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| (key(7000 + (unit * 10 + i) as i128), 70 + i as u64, n))
            .collect();
        put(&p, &items);
        for (k, seed, n) in &items {
            let object = head_object(cluster, &ns, &head_name("kvh/", k));
            let u32_at = |o: usize| u32::from_le_bytes(object[o..o + 4].try_into().unwrap());
            assert_eq!(u32_at(12) & 1, 1, "{k}: the data-CRC flag");
            assert_eq!(
                u32_at(36),
                crc32c(&bytes(*seed, *n)),
                "{k}: the header's CRC32C of {n} bytes in objects of {unit}"
            );
            assert_chunk(&p, k, *seed, *n);
        }
    }
    // The default (documented): no data CRC, flag clear, field zero; the header's own CRC still holds.
    let p = open(cluster, &ns, &[]);
    let k = key(7999);
    put(&p, &[(k.clone(), 79, 5000)]);
    let object = head_object(cluster, &ns, &head_name("kvh/", &k));
    let u32_at = |o: usize| u32::from_le_bytes(object[o..o + 4].try_into().unwrap());
    assert_eq!((u32_at(12) & 1, u32_at(36)), (0, 0), "default: no data CRC");
    assert_eq!(
        u32_at(124),
        crc32c(&object[..124]),
        "the header's own CRC32C"
    );
    assert_chunk(&p, &k, 79, 5000);
}

/// Successful client operations the OSD counted (`ceph daemon osd.0 perf dump`: failed ones, such as
/// an exclusive create that finds the object, are not counted).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct OsdOps {
    reads: u64,
    writes: u64,
    read_writes: u64,
    bytes_in: u64,
}

impl std::ops::Sub for OsdOps {
    type Output = OsdOps;
    fn sub(self, before: OsdOps) -> OsdOps {
        OsdOps {
            reads: self.reads - before.reads,
            writes: self.writes - before.writes,
            read_writes: self.read_writes - before.read_writes,
            bytes_in: self.bytes_in - before.bytes_in,
        }
    }
}

impl Cluster {
    fn osd_ops(&self) -> OsdOps {
        let dump: serde_json::Value =
            serde_json::from_str(&self.ceph(&["daemon", "osd.0", "perf", "dump"]))
                .expect("perf dump");
        let counter = |name: &str| {
            dump["osd"][name]
                .as_u64()
                .unwrap_or_else(|| panic!("no osd.{name} in perf dump"))
        };
        OsdOps {
            reads: counter("op_r"),
            writes: counter("op_w"),
            read_writes: counter("op_rw"),
            bytes_in: counter("op_in_bytes"),
        }
    }
}

#[test]
#[cfg_attr(
    not(has_ceph),
    ignore = "needs Ceph and librados-dev (apt-get install ceph-mon ceph-osd ceph-common uuid-runtime librados-dev)"
)]
fn a_new_key_takes_one_write_and_replacing_a_chunk_without_stripes_reads_nothing_first() {
    if !ceph_available("round_trips") {
        return;
    }
    // Its own cluster: the OSD's counters must see this test's operations only.
    let cluster = Cluster::start("round-trips", &["--pool", POOL]);
    let ns = "rt";
    let unit = 65_536usize;
    let p = open(&cluster, ns, &[("max_object_bytes", "65536")]);
    let k = key(31);
    let head = head_name("kvh/", &k);
    let ops = |what: &str, f: &dyn Fn()| {
        let before = cluster.osd_ops();
        f();
        let delta = cluster.osd_ops() - before;
        println!("{what}: {delta:?}");
        delta
    };
    let plain = |reads, writes, read_writes, bytes_in| OsdOps {
        reads,
        writes,
        read_writes,
        bytes_in,
    };

    // A new key: one write operation (exclusive create, data, header), no read, exactly the chunk's
    // bytes and the 128-byte header sent.
    let d = ops("new key", &|| put(&p, &[(k.clone(), 1, 50_000)]));
    assert_eq!(d, plain(0, 1, 0, 50_000 + 128));
    assert_chunk(&p, &k, 1, 50_000);

    // Replacing a chunk without stripes by one without stripes: the failed create's answer carries the
    // version, so the compare-and-swap goes out at once (a read-write op: assert_version, cmpext of the
    // object count, data, header, truncate). No read of the old header.
    let d = ops("overwrite, no stripes", &|| {
        put(&p, &[(k.clone(), 2, 40_000)])
    });
    assert_eq!(d, plain(0, 0, 1, 40_000 + 128));
    assert_chunk(&p, &k, 2, 40_000);
    assert_eq!(
        head_object(&cluster, ns, &head).len(),
        4096 + 40_000,
        "truncated"
    );

    // Replaced by a striped chunk: two stripes, then the old header is read (the new chunk is striped,
    // so the old one likely was too) and the head swapped.
    let n3 = 2 * unit + 9;
    let d = ops("overwrite by a striped chunk", &|| {
        put(&p, &[(k.clone(), 3, n3)])
    });
    assert_eq!(d, plain(1, 2, 1, n3 as u64 + 128));
    assert_chunk(&p, &k, 3, n3);

    // A chunk without stripes replacing a striped one: the CAS's compare fails (the old head names
    // stripes), so the old header is read, the head swapped, and the old stripes removed.
    let d = ops("striped replaced", &|| put(&p, &[(k.clone(), 4, 1000)]));
    assert_eq!((d.reads, d.read_writes, d.bytes_in), (1, 1, 1128), "{d:?}");
    assert_chunk(&p, &k, 4, 1000);
    assert!(
        eventually(Duration::from_secs(20), || cluster.objects(ns)
            == vec![head.clone()]),
        "the old stripes were not removed: {:?}",
        cluster.objects(ns)
    );

    // Someone else's object under the name: the compare fails on it too; read, then replaced.
    cluster.rados_stdin(ns, &["put", &head, "-"], Some(b"not a kvhost chunk"));
    let d = ops("foreign replaced", &|| put(&p, &[(k.clone(), 5, 2000)]));
    assert_eq!(d, plain(1, 0, 1, 2128));
    assert_chunk(&p, &k, 5, 2000);
    let d = ops("overwrite again", &|| put(&p, &[(k.clone(), 6, 0)]));
    assert_eq!(d, plain(0, 0, 1, 128));
    assert_chunk(&p, &k, 6, 0);
}

#[test]
#[cfg_attr(
    not(has_ceph),
    ignore = "needs Ceph and librados-dev (apt-get install ceph-mon ceph-osd ceph-common uuid-runtime librados-dev)"
)]
fn concurrent_writers_of_one_key_never_mix_generations_and_leave_only_the_last_ones_objects() {
    if !ceph_available("concurrent_writers") {
        return;
    }
    let cluster = shared_cluster();
    let ns = namespace("writers");
    let unit = 16_384usize;
    let opts = [("max_object_bytes", "16384")];
    // Two writers (two hosts sharing the namespace) alternate chunks with and without stripes, so that
    // every path races: create, CAS without a read, CAS after a read, and the stripes' removal.
    let writers: Vec<Arc<PluginBackend>> = (0..2)
        .map(|_| Arc::new(open(cluster, &ns, &opts)))
        .collect();
    let reader = Arc::new(open(cluster, &ns, &opts));
    let k = key(5151);
    let versions: [(u64, usize); 5] = [
        (11, 20_000),
        (12, 3 * unit + 5),
        (13, unit),
        (14, 0),
        (15, 5 * unit),
    ];
    let stop = Arc::new(AtomicBool::new(false));
    let hits = Arc::new(AtomicUsize::new(0));
    let readers: Vec<_> = (0..2)
        .map(|_| {
            let (reader, stop, k, hits) = (reader.clone(), stop.clone(), k.clone(), hits.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let (item, buf) = get_chunks(&reader, std::slice::from_ref(&k), 6 * unit).remove(0);
                    match item {
                        GetItem::Hit { len, meta: m } => {
                            let (seed, n) = *versions
                                .iter()
                                .find(|(s, n)| *n == len && m == chunk_meta(*s, *n))
                                .unwrap_or_else(|| panic!("a hit of {len} bytes with metadata {m:?} that no put wrote"));
                            assert!(buf[..len] == bytes(seed, n)[..], "a hit mixing two versions");
                            hits.fetch_add(1, Ordering::Relaxed);
                        }
                        GetItem::Miss => {}
                        other => panic!("get during concurrent overwrites: {other:?}"),
                    }
                }
            })
        })
        .collect();
    let puts: Vec<_> = writers
        .iter()
        .enumerate()
        .map(|(w, writer)| {
            let (writer, k) = (writer.clone(), k.clone());
            std::thread::spawn(move || {
                let mut statuses = Vec::new();
                for round in 0..40 {
                    let (seed, n) = versions[(round + 2 * w) % versions.len()];
                    statuses.push(put_items(&writer, &[(k.clone(), seed, n)])[0]);
                }
                statuses
            })
        })
        .collect();
    let mut statuses = Vec::new();
    for t in puts {
        statuses.extend(t.join().expect("writer thread"));
    }
    stop.store(true, Ordering::Relaxed);
    for r in readers {
        r.join().expect("reader thread");
    }
    // A writer that lost the race eight times in a row gives up with BUSY; nothing else may fail.
    assert!(
        statuses
            .iter()
            .all(|s| *s == Status::OK || *s == Status::BUSY),
        "{statuses:?}"
    );
    let ok = statuses.iter().filter(|s| **s == Status::OK).count();
    println!(
        "{ok} of {} concurrent puts stored; readers saw {} hits, never a mix",
        statuses.len(),
        hits.load(Ordering::Relaxed)
    );
    assert!(ok >= statuses.len() / 2, "{statuses:?}");
    // The key holds one complete version, and only its objects remain: every replaced or abandoned
    // generation's stripes were removed.
    let (item, buf) = get_chunks(&reader, std::slice::from_ref(&k), 6 * unit).remove(0);
    let GetItem::Hit { len, meta: m } = item else {
        panic!("after the writers: {item:?}");
    };
    let (seed, n) = *versions
        .iter()
        .find(|(s, n)| *n == len && m == chunk_meta(*s, *n))
        .expect("a version some put wrote");
    assert!(buf[..n] == bytes(seed, n)[..]);
    let head = head_name("kvh/", &k);
    let gen = generation(cluster, &ns, &head);
    let mut expected = stripe_names(&head, &gen, n.div_ceil(unit).max(1));
    expected.push(head.clone());
    expected.sort();
    assert!(
        eventually(Duration::from_secs(20), || cluster.objects(&ns) == expected),
        "objects left after the concurrent writers: {:?}, expected {expected:?}",
        cluster.objects(&ns)
    );
}

/* ---------------------------------------------------------------------------------------------- */
/* Damaged and foreign objects                                                                    */
/* ---------------------------------------------------------------------------------------------- */

#[test]
#[cfg_attr(
    not(has_ceph),
    ignore = "needs Ceph and librados-dev (apt-get install ceph-mon ceph-osd ceph-common uuid-runtime librados-dev)"
)]
fn missing_short_or_damaged_objects_are_misses_or_corrupt_never_wrong_data() {
    if !ceph_available("damaged_objects") {
        return;
    }
    let cluster = shared_cluster();
    let ns = namespace("damaged");
    let unit = 8192usize;
    // With the data CRC, which catches the changed stripe below.
    let p = open(
        cluster,
        &ns,
        &[("max_object_bytes", "8192"), ("checksum", "true")],
    );
    let n = 5 * unit + 100; // six objects
    let (gone, short, flipped, bad_meta, foreign) = (key(1), key(2), key(3), key(4), key(5));
    put(
        &p,
        &[
            (gone.clone(), 1, n),
            (short.clone(), 2, n),
            (flipped.clone(), 3, n),
            (bad_meta.clone(), 4, n),
        ],
    );
    let stripe = |k: &ChunkKey, i: usize| {
        let head = head_name("kvh/", k);
        let gen = generation(cluster, &ns, &head);
        format!("{head}#{gen}.{i}")
    };

    // A stripe deleted behind the plugin's back: a miss, and the broken chunk is removed altogether.
    cluster.rados(&ns, &["rm", &stripe(&gone, 2)]);
    assert_eq!(
        get_chunks(&p, std::slice::from_ref(&gone), n).remove(0).0,
        GetItem::Miss
    );
    assert!(
        eventually(Duration::from_secs(20), || {
            !cluster
                .objects(&ns)
                .iter()
                .any(|o| o.starts_with(&head_name("kvh/", &gone)))
        }),
        "the broken chunk's objects were not removed: {:?}",
        cluster.objects(&ns)
    );
    assert_absent(&p, &gone);

    // A stripe cut short: a miss too, and removed as broken.
    cluster.rados(&ns, &["truncate", &stripe(&short, 5), "10"]);
    assert_eq!(
        get_chunks(&p, std::slice::from_ref(&short), n).remove(0).0,
        GetItem::Miss
    );
    assert!(
        eventually(Duration::from_secs(20), || {
            p.contains(std::slice::from_ref(&short), false).unwrap()[0] == Presence::Absent
        }),
        "the chunk with a short stripe is still reported"
    );

    // A stripe whose bytes changed (same length): the CRC32C catches it.
    let name = stripe(&flipped, 3);
    let mut data = cluster.rados(&ns, &["get", &name, "/dev/stdout"]);
    assert_eq!(data.len(), unit);
    data[100] ^= 0x5A;
    let file = std::env::temp_dir().join(format!("kvh-flipped-{}", std::process::id()));
    std::fs::write(&file, &data).unwrap();
    cluster.rados(&ns, &["put", &name, file.to_str().unwrap()]);
    let _ = std::fs::remove_file(&file);
    match get_chunks(&p, std::slice::from_ref(&flipped), n)
        .remove(0)
        .0
    {
        GetItem::Failed(status, _) => assert_eq!(status, Status::CORRUPT),
        other => panic!("a chunk with a changed byte was served: {other:?}"),
    }

    // A damaged header (a byte of the shape flipped, so its CRC fails): CORRUPT for contains and get.
    let head = head_name("kvh/", &bad_meta);
    let mut object = head_object(cluster, &ns, &head);
    object[64] ^= 0x01;
    cluster.rados_stdin(&ns, &["put", &head, "-"], Some(&object));
    assert!(matches!(
        p.contains(std::slice::from_ref(&bad_meta), false).unwrap()[0],
        Presence::Failed(Status::CORRUPT, _)
    ));
    match get_chunks(&p, std::slice::from_ref(&bad_meta), n)
        .remove(0)
        .0
    {
        GetItem::Failed(status, _) => assert_eq!(status, Status::CORRUPT),
        other => panic!("a chunk with damaged metadata was served: {other:?}"),
    }

    // Someone else's object under a chunk's name (no header): not ours, a miss; a put replaces it.
    let file = std::env::temp_dir().join(format!("kvh-foreign-{}", std::process::id()));
    std::fs::write(&file, b"not a kvhost chunk").unwrap();
    cluster.rados(
        &ns,
        &["put", &head_name("kvh/", &foreign), file.to_str().unwrap()],
    );
    let _ = std::fs::remove_file(&file);
    assert_absent(&p, &foreign);
    put(&p, &[(foreign.clone(), 6, 3 * unit)]);
    assert_chunk(&p, &foreign, 6, 3 * unit);

    // Every damaged chunk can still be removed or replaced.
    assert_eq!(
        p.remove(std::slice::from_ref(&flipped), false).unwrap(),
        vec![Status::OK]
    );
    assert_absent(&p, &flipped);
    put(&p, &[(flipped.clone(), 7, 1000), (bad_meta.clone(), 8, n)]);
    assert_chunk(&p, &flipped, 7, 1000);
    assert_chunk(&p, &bad_meta, 8, n);
}

/* ---------------------------------------------------------------------------------------------- */
/* clear, health, options, cephx                                                                  */
/* ---------------------------------------------------------------------------------------------- */

#[test]
#[cfg_attr(
    not(has_ceph),
    ignore = "needs Ceph and librados-dev (apt-get install ceph-mon ceph-osd ceph-common uuid-runtime librados-dev)"
)]
fn clear_removes_every_object_with_its_prefix_and_nothing_else() {
    if !ceph_available("clear") {
        return;
    }
    let cluster = shared_cluster();
    let ns = namespace("clear");
    let a = open(
        cluster,
        &ns,
        &[("object_prefix", "a/"), ("max_object_bytes", "4096")],
    );
    let b = open(cluster, &ns, &[("object_prefix", "b/")]);
    let items: Vec<(ChunkKey, u64, usize)> = (0..40)
        .map(|i| (key(i), i as u64, 100 + 997 * i as usize))
        .collect();
    put(&a, &items);
    put(&b, &items[..3]);
    let before = cluster.objects(&ns).len();
    assert!(before > 43, "{before} objects");
    a.clear().unwrap();
    let left = cluster.objects(&ns);
    assert_eq!(left.len(), 3, "{left:?}");
    assert!(left.iter().all(|o| o.starts_with("b/")), "{left:?}");
    for (k, _, _) in &items {
        assert_absent(&a, k);
    }
    assert_chunk(&b, &items[1].0, 1, items[1].2);
    // Still usable.
    put(&a, &items[..2]);
    assert_chunk(&a, &items[1].0, 1, items[1].2);
    let text = health(&a).expect("healthy");
    assert!(
        text.contains("pool kvcache") && text.contains("answers in"),
        "{text}"
    );
}

#[test]
#[cfg_attr(
    not(has_ceph),
    ignore = "needs Ceph and librados-dev (apt-get install ceph-mon ceph-osd ceph-common uuid-runtime librados-dev)"
)]
fn bad_options_and_missing_pools_fail_create_with_the_reason() {
    if !ceph_available("bad_options") {
        return;
    }
    let cluster = shared_cluster();
    let ns = namespace("options");
    let cases: &[(&[(&str, &str)], &str)] = &[
        (
            &[("op_timeout_s", "0")],
            "'op_timeout_s' (expected an integer from 1 to 3600)",
        ),
        (
            &[("max_object_bytes", "100")],
            "'max_object_bytes' (expected an integer from 4096",
        ),
        (
            &[("max_in_flight", "lots")],
            "invalid value 'lots' for option 'max_in_flight'",
        ),
        (
            &[("checksum", "maybe")],
            "'checksum' (expected true or false)",
        ),
        (
            &[("object_prefix", "a#b")],
            "invalid value 'a#b' for option 'object_prefix'",
        ),
        (&[("cluster", "bad name")], "option 'cluster'"),
        (
            &[("pool", "no-such-pool")],
            "pool 'no-such-pool' does not exist",
        ),
        (
            &[("conf", "/nonexistent/ceph.conf")],
            "cannot read ceph configuration '/nonexistent/ceph.conf'",
        ),
    ];
    for (extra, expected) in cases {
        let e = load("rados", MODULE, CLASS, &options(cluster, &ns, extra))
            .expect_err("create must fail");
        assert!(e.contains(expected), "{extra:?}: {e}");
    }
    // pool is required.
    let no_pool: Vec<(&str, &str)> = options(cluster, &ns, &[])
        .into_iter()
        .filter(|(k, _)| *k != "pool")
        .collect();
    let e = load("rados", MODULE, CLASS, &no_pool).expect_err("pool is required");
    assert!(e.contains("pool"), "{e}");
}

#[test]
#[cfg_attr(
    not(has_ceph),
    ignore = "needs Ceph and librados-dev (apt-get install ceph-mon ceph-osd ceph-common uuid-runtime librados-dev)"
)]
fn an_unreachable_cluster_fails_create_in_time_naming_the_monitor() {
    if !ceph_available("unreachable") {
        return;
    }
    // A port nothing listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dir = std::env::temp_dir().join(format!("kvh-unreachable-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let conf = dir.join("ceph.conf");
    std::fs::write(
        &conf,
        format!(
            "[global]\nmon host = v2:127.0.0.1:{port}\nauth client required = none\nms bind msgr1 = false\n\
             log file = {}/client.log\nadmin socket =\n",
            dir.display()
        ),
    )
    .unwrap();
    let started = Instant::now();
    let e = load(
        "rados",
        MODULE,
        CLASS,
        &[
            ("pool", POOL),
            ("conf", conf.to_str().unwrap()),
            ("op_timeout_s", "2"),
        ],
    )
    .expect_err("no cluster there");
    let took = started.elapsed();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        e.contains(&format!("127.0.0.1:{port}"))
            && e.contains("cannot connect")
            && e.contains("timed out"),
        "{e}"
    );
    assert!(took < Duration::from_secs(2 + 10), "create took {took:?}");
}

#[test]
#[cfg_attr(
    not(has_ceph),
    ignore = "needs Ceph and librados-dev (apt-get install ceph-mon ceph-osd ceph-common uuid-runtime librados-dev)"
)]
fn a_cephx_user_with_pool_caps_works_and_is_refused_elsewhere() {
    if !ceph_available("cephx") {
        return;
    }
    let cluster = shared_cluster();
    let keyring = cluster.dir().join("client.kvhost.keyring");
    // As the README tells an operator to do.
    cluster.ceph(&[
        "auth",
        "get-or-create",
        "client.kvhost",
        "mon",
        "allow r",
        "osd",
        &format!("allow rw pool={POOL}"),
        "-o",
        keyring.to_str().unwrap(),
    ]);
    let ns = namespace("cephx");
    let keyring_path = keyring.to_str().unwrap();
    let p = open(
        cluster,
        &ns,
        &[("user", "kvhost"), ("keyring", keyring_path)],
    );
    let items: Vec<(ChunkKey, u64, usize)> =
        (0..4).map(|i| (key(i), i as u64, 3 * MIB + 5)).collect();
    put(&p, &items);
    assert_chunk(&p, &items[3].0, 3, 3 * MIB + 5);
    assert_eq!(
        p.remove(&[items[0].0.clone()], false).unwrap(),
        vec![Status::OK]
    );
    p.clear().unwrap();
    assert_absent(&p, &items[1].0);
    health(&p).expect("healthy");
    drop(p);
    // The same user on a pool it has no caps for: refused at create, with a hint.
    let e = load(
        "rados",
        MODULE,
        CLASS,
        &options(
            cluster,
            &ns,
            &[
                ("user", "kvhost"),
                ("keyring", keyring_path),
                ("pool", OTHER_POOL),
            ],
        ),
    )
    .expect_err("no caps on the other pool");
    assert!(
        e.contains("Operation not permitted") && e.contains("caps"),
        "{e}"
    );
    // A user confined to one namespace of the pool, as the README suggests for host groups: it works
    // there (put, get, remove, clear's listing) and is refused in any other namespace.
    let tenant_keyring = cluster.dir().join("client.kvhost-tenant.keyring");
    cluster.ceph(&[
        "auth",
        "get-or-create",
        "client.kvhost-tenant",
        "mon",
        "allow r",
        "osd",
        &format!("allow rw pool={POOL} namespace=tenant-a"),
        "-o",
        tenant_keyring.to_str().unwrap(),
    ]);
    let tenant = [
        ("user", "kvhost-tenant"),
        ("keyring", tenant_keyring.to_str().unwrap()),
    ];
    let p = must_load(
        "rados",
        MODULE,
        CLASS,
        &options(cluster, "tenant-a", &tenant),
    );
    put(&p, &items[..2]);
    assert_chunk(&p, &items[1].0, 1, 3 * MIB + 5);
    assert_eq!(
        p.remove(std::slice::from_ref(&items[0].0), false).unwrap(),
        vec![Status::OK]
    );
    p.clear().unwrap();
    assert_absent(&p, &items[1].0);
    drop(p);
    let e = load(
        "rados",
        MODULE,
        CLASS,
        &options(cluster, "tenant-b", &tenant),
    )
    .expect_err("no caps in another namespace");
    assert!(e.contains("Operation not permitted"), "{e}");

    // The secret itself as the (secret) `key` option instead of a keyring file; it is never logged.
    let text = std::fs::read_to_string(&keyring).unwrap();
    let secret = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("key = "))
        .expect("a key in the keyring")
        .to_string();
    logs();
    let p = open(
        cluster,
        &ns,
        &[("user", "client.kvhost"), ("key", secret.as_str())],
    );
    put(&p, &items[..1]);
    assert_chunk(&p, &items[0].0, 0, 3 * MIB + 5);
    assert!(p.info().schema.iter().any(|o| o.key == "key" && o.secret));
    drop(p);
    assert!(!logs().contains(&secret), "the cephx secret was logged");
    let e = load(
        "rados",
        MODULE,
        CLASS,
        &options(
            cluster,
            &ns,
            &[("user", "kvhost"), ("key", "AQBnotavalidkey==")],
        ),
    )
    .expect_err("a wrong key");
    assert!(!e.contains("AQBnotavalidkey"), "the key was echoed: {e}");
}

/* ---------------------------------------------------------------------------------------------- */
/* The chain                                                                                      */
/* ---------------------------------------------------------------------------------------------- */

fn chain_on(cluster: &Cluster, ns: &str, extra: &[(&str, &str)]) -> Chain {
    let mut y = format!(
        "chunk_size: 16\nmax_local_cpu_size: 0.125\nlocal_cpu_prefault: false\nblocking_timeout_secs: 20\n\
         storage_plugins: [rados]\nextra_config:\n  \
         storage_plugin.rados.module_path: {MODULE}\n  storage_plugin.rados.class_name: {CLASS}\n"
    );
    for (k, v) in options(cluster, ns, extra) {
        y.push_str(&format!("  storage_plugin.rados.{k}: \"{v}\"\n"));
    }
    let config = Config::from_yaml(&y, None).unwrap_or_else(|e| panic!("{e}\n{y}"));
    Chain::from_config(&config).unwrap_or_else(|e| panic!("{e}"))
}

fn tier_stats(chain: &Chain) -> kvhost::chain::TierStats {
    chain
        .stats()
        .tiers
        .into_iter()
        .find(|t| t.name == "rados")
        .expect("tier rados")
}

#[test]
#[cfg_attr(
    not(has_ceph),
    ignore = "needs Ceph and librados-dev (apt-get install ceph-mon ceph-osd ceph-common uuid-runtime librados-dev)"
)]
fn chain_writes_through_to_rados_and_promotes_its_hits_also_striped() {
    if !ceph_available("chain") {
        return;
    }
    let cluster = shared_cluster();
    let ns = namespace("chain");
    let chain = chain_on(cluster, &ns, &[("max_object_bytes", "1048576")]);
    // Two small chunks and a 5 MiB one (five objects).
    let keys: Vec<ChunkKey> = (0..3).map(|i| key(7000 + i)).collect();
    let data: Vec<Vec<u8>> = [100_000, 4097, 5 * MIB + 3]
        .iter()
        .enumerate()
        .map(|(i, &n)| bytes(i as u64 + 70, n))
        .collect();
    for (i, (k, d)) in keys.iter().zip(&data).enumerate() {
        let outcome = chain
            .put(
                std::slice::from_ref(k),
                &[d],
                &[chunk_meta(i as u64 + 70, d.len())],
            )
            .remove(0);
        assert_eq!(outcome, PutOutcome::Stored);
    }
    wait_drained(&chain);
    assert_eq!(tier_stats(&chain).puts, 3, "{:?}", tier_stats(&chain));
    // The tier holds them (a separate instance sees them: a store shared between hosts).
    let other = open(cluster, &ns, &[]);
    for (i, d) in data.iter().enumerate() {
        assert_chunk(&other, &keys[i], i as u64 + 70, d.len());
    }
    // Drop them from the hot cache: gets are served by rados and promoted, metadata and all.
    for (i, k) in keys.iter().enumerate() {
        assert!(chain.hot().remove(k));
        let h = chain
            .get(std::slice::from_ref(k))
            .remove(0)
            .expect("rados has it");
        assert_eq!(h.bytes(), &data[i][..]);
        assert_eq!(h.meta(), chunk_meta(i as u64 + 70, data[i].len()));
        assert!(chain.hot().contains(k), "promoted");
    }
    let stats = tier_stats(&chain);
    assert_eq!(
        (stats.hits, stats.promotions, stats.errors),
        (3, 3, 0),
        "{stats:?}"
    );
    // A second get is a hot-cache hit: rados is not asked again.
    let _ = chain.get(&keys);
    assert_eq!(tier_stats(&chain).hits, 3);
    // A chunk removed from rados only (by another host) is still served from the hot cache.
    other.remove(&keys[..1], false).unwrap();
    assert_eq!(
        chain.get(&keys[..1]).remove(0).unwrap().bytes(),
        &data[0][..]
    );
    let report = chain.close(Duration::from_secs(20));
    assert!(report.unfinished.is_empty(), "{report:?}");
    // A new chain (a restarted host): the hot cache is empty, rados still has the rest.
    let chain = chain_on(cluster, &ns, &[]);
    assert!(chain.get(&keys[..1]).remove(0).is_none());
    for (i, k) in keys.iter().enumerate().skip(1) {
        let h = chain
            .get(std::slice::from_ref(k))
            .remove(0)
            .expect("persisted in rados");
        assert_eq!(h.bytes(), &data[i][..]);
    }
    chain.close(Duration::from_secs(20));
}

/* ---------------------------------------------------------------------------------------------- */
/* Faults: the OSD stops, the store fills up                                                      */
/* ---------------------------------------------------------------------------------------------- */

/// A generous bound for "fails within op_timeout_s": the timeout plus slack for a loaded 2-core machine.
fn within_timeout(op_timeout_s: u64) -> Duration {
    Duration::from_secs(op_timeout_s + 7)
}

/// Run `op` with the OSD down: it must return within the outage bound of `op_timeout_s` (the caller
/// checks what it returned).
fn fails_within<R>(op_timeout_s: u64, what: &str, op: impl FnOnce() -> R) -> R {
    let started = Instant::now();
    let r = op();
    let took = started.elapsed();
    assert!(
        took < within_timeout(op_timeout_s),
        "{what} took {took:?} with the OSD down"
    );
    println!("OSD down, op_timeout_s={op_timeout_s}: {what} answered in {took:?}");
    r
}

fn is_outage(status: Status) -> bool {
    status == Status::TIMEOUT || status == Status::UNAVAILABLE
}

#[test]
#[cfg_attr(
    not(has_ceph),
    ignore = "needs Ceph and librados-dev (apt-get install ceph-mon ceph-osd ceph-common uuid-runtime librados-dev)"
)]
fn an_osd_outage_fails_calls_in_time_the_chain_keeps_serving_and_the_plugin_recovers() {
    if !ceph_available("osd_outage") {
        return;
    }
    let cluster = Cluster::start("outage", &["--pool", POOL]);
    let ns = "outage";
    let t = 3u64;
    let extra = [
        ("op_timeout_s", "3"),
        ("max_in_flight", "4"),
        ("max_object_bytes", "65536"),
    ];
    let p = open(&cluster, ns, &extra);
    let chain = chain_on(&cluster, ns, &extra);
    // Before: chunks stored through both.
    let before: Vec<(ChunkKey, u64, usize)> = (0..6)
        .map(|i| (key(i), i as u64, 50_000 + 30_000 * i as usize))
        .collect();
    put(&p, &before);
    let hot_key = key(100);
    let hot_data = bytes(100, 200_000);
    assert_eq!(
        chain
            .put(
                std::slice::from_ref(&hot_key),
                &[&hot_data],
                &[chunk_meta(100, hot_data.len())]
            )
            .remove(0),
        PutOutcome::Stored
    );
    wait_drained(&chain);
    // A backend to destroy while the OSD is down, with work in flight.
    let doomed = open(&cluster, ns, &extra);

    cluster.stop_osd();

    // put: 20 chunks of two objects each (40 operations, 4 in flight): every item fails, in about one
    // op_timeout_s, not ten (the queued operations fail at once once the first ones time out).
    let during: Vec<(ChunkKey, u64, usize)> = (0..20)
        .map(|i| (key(200 + i), 200 + i as u64, 70_000))
        .collect();
    let statuses = fails_within(t, "put of 20 striped chunks", || put_items(&p, &during));
    assert!(
        statuses.iter().all(|s| is_outage(*s)),
        "put during the outage: {statuses:?}"
    );
    // get, contains, remove, health: the same.
    let keys: Vec<ChunkKey> = before.iter().map(|(k, _, _)| k.clone()).collect();
    for (item, _) in fails_within(t, "get of 6 chunks", || get_chunks(&p, &keys, 300_000)) {
        assert!(
            matches!(item, GetItem::Failed(s, _) if is_outage(s)),
            "get during the outage: {item:?}"
        );
    }
    let many: Vec<ChunkKey> = (0..40).map(|i| key(300 + i)).collect();
    for presence in fails_within(t, "contains of 40 keys", || p.contains(&many, false)).unwrap() {
        assert!(
            matches!(presence, Presence::Failed(s, _) if is_outage(s)),
            "{presence:?}"
        );
    }
    for status in fails_within(t, "remove of 10 keys", || p.remove(&many[..10], false)).unwrap() {
        assert!(is_outage(status), "remove during the outage: {status}");
    }
    let e = fails_within(t, "health", || health(&p)).expect_err("unhealthy with the OSD down");
    assert!(
        e.contains("probe failed") && e.contains("mon_host v2:127.0.0.1"),
        "{e}"
    );

    // The chain keeps serving from the hot cache; a put is still stored there; a key only in rados is
    // a miss within the bound, not a hang.
    let started = Instant::now();
    let h = chain
        .get(std::slice::from_ref(&hot_key))
        .remove(0)
        .expect("hot cache");
    assert_eq!(h.bytes(), &hot_data[..]);
    drop(h);
    let new_key = key(101);
    let new_data = bytes(101, 150_000);
    assert_eq!(
        chain
            .put(
                std::slice::from_ref(&new_key),
                &[&new_data],
                &[chunk_meta(101, new_data.len())]
            )
            .remove(0),
        PutOutcome::Stored
    );
    assert_eq!(
        chain
            .get(std::slice::from_ref(&new_key))
            .remove(0)
            .unwrap()
            .bytes(),
        &new_data[..]
    );
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "hot-cache hits waited for rados"
    );
    let started = Instant::now();
    assert!(
        chain.get(&keys[..1]).remove(0).is_none(),
        "only in rados, which is down"
    );
    assert!(
        started.elapsed() < within_timeout(t),
        "a chain get took {:?}",
        started.elapsed()
    );
    wait_drained(&chain);
    assert!(tier_stats(&chain).errors >= 1, "{:?}", tier_stats(&chain));

    // create probes the data path: with the OSD down it fails, in time, saying why.
    let started = Instant::now();
    let e = load("rados", MODULE, CLASS, &options(&cluster, ns, &extra))
        .expect_err("create with the OSD down");
    assert!(
        e.contains("did not answer a probe read") && e.contains("timed out"),
        "{e}"
    );
    assert!(
        started.elapsed() < within_timeout(t),
        "create took {:?}",
        started.elapsed()
    );

    // destroy with work in flight returns within the bound, every completion having fired.
    {
        let fired = Arc::new(AtomicUsize::new(0));
        for i in 0..10 {
            let f = fired.clone();
            doomed.put(
                PutRequest {
                    keys: vec![key(400 + i)],
                    bufs: vec![bytes(400 + i as u64, 100_000)],
                    metas: vec![chunk_meta(400 + i as u64, 100_000)],
                },
                move |_| {
                    f.fetch_add(1, Ordering::AcqRel);
                },
            );
        }
        let started = Instant::now();
        drop(doomed);
        assert!(
            started.elapsed() < within_timeout(t),
            "destroy took {:?}",
            started.elapsed()
        );
        println!(
            "OSD down: destroy with 10 puts in flight returned in {:?}",
            started.elapsed()
        );
        assert_eq!(
            fired.load(Ordering::Acquire),
            10,
            "completions by the time destroy returned"
        );
    }

    cluster.start_osd();
    let back = Instant::now();

    // librados reconnects by itself: the same backend works again, with nothing lost or corrupted.
    let probe = key(999);
    assert!(
        eventually(Duration::from_secs(60), || put_items(
            &p,
            &[(probe.clone(), 9, 1000)]
        ) == [Status::OK]),
        "the plugin did not recover within 60 s of the OSD's return"
    );
    println!(
        "OSD back: the same backend stored a chunk again after {:?}",
        back.elapsed()
    );
    for (k, seed, n) in &before {
        assert_chunk(&p, k, *seed, *n);
    }
    // Puts that failed during the outage are absent, or (if the OSD applied them before answering)
    // complete: never partial or wrong.
    let during_keys: Vec<ChunkKey> = during.iter().map(|(k, _, _)| k.clone()).collect();
    for ((item, buf), (k, seed, n)) in get_chunks(&p, &during_keys, 70_000)
        .into_iter()
        .zip(&during)
    {
        match item {
            GetItem::Miss => {}
            GetItem::Hit { len, meta: m } => {
                assert_eq!((len, m), (*n, chunk_meta(*seed, *n)), "{k}");
                assert!(buf == bytes(*seed, *n), "{k}: wrong bytes after the outage");
            }
            other => panic!("{k} after the outage: {other:?}"),
        }
    }
    put(&p, &during);
    assert_chunk(&p, &during[7].0, during[7].1, during[7].2);
    health(&p).expect("healthy again");
    // The chain's tier recovered too.
    let (k2, d2) = (key(102), bytes(102, 90_000));
    assert_eq!(
        chain
            .put(
                std::slice::from_ref(&k2),
                &[&d2],
                &[chunk_meta(102, d2.len())]
            )
            .remove(0),
        PutOutcome::Stored
    );
    wait_drained(&chain);
    assert!(chain.hot().remove(&k2));
    assert_eq!(
        chain
            .get(std::slice::from_ref(&k2))
            .remove(0)
            .expect("from rados")
            .bytes(),
        &d2[..]
    );
    chain.close(Duration::from_secs(20));
}

#[test]
#[cfg_attr(
    not(has_ceph),
    ignore = "needs Ceph and librados-dev (apt-get install ceph-mon ceph-osd ceph-common uuid-runtime librados-dev)"
)]
fn a_full_store_answers_no_space_or_timeout_never_hangs() {
    if !ceph_available("full_store") {
        return;
    }
    // 32 MiB of memstore. The OSD reports itself full to the monitor (a few seconds after it passes
    // 95 %), the monitor flags the pool full, and from then on writes answer ENOSPC (the plugin sets
    // FULL_TRY: without it librados would hold them until the pool had room, a hang). Between the OSD
    // passing 97 % and the flag, the OSD drops writes: those time out. Writes are paced (about 50 MB/s)
    // so that the store does not grow by hundreds of MiB while the full report travels.
    let cluster = Cluster::start("full", &["--pool", POOL, "--memstore-bytes", "33554432"]);
    let t = 3u64;
    let p = open(&cluster, "full", &[("op_timeout_s", "3")]);
    let mut stored = Vec::new();
    let mut failure = None;
    let filling = Instant::now();
    for i in 0..1000u64 {
        let item = (key(i as i128), i, MIB);
        let started = Instant::now();
        let status = put_items(&p, std::slice::from_ref(&item))[0];
        let took = started.elapsed();
        assert!(
            took < within_timeout(t),
            "put {i} took {took:?}: a full store must not hang"
        );
        if status == Status::OK {
            stored.push(item);
        } else {
            failure = Some((i, status));
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let (at, status) = failure.expect("a 32 MiB store took 1000 MiB");
    println!(
        "the store refused chunk {at} with {status} after {} chunks ({:?})",
        stored.len(),
        filling.elapsed()
    );
    assert!(
        status == Status::NO_SPACE || status == Status::TIMEOUT,
        "a full store answered {status}"
    );
    assert!(
        stored.len() >= 10,
        "only {} MiB fit in 32 MiB",
        stored.len()
    );
    // What was stored reads back intact.
    let (k, seed, n) = &stored[stored.len() / 2];
    let started = Instant::now();
    let (item, buf) = get_chunks(&p, std::slice::from_ref(k), *n).remove(0);
    assert!(started.elapsed() < within_timeout(t));
    match item {
        GetItem::Hit { len, .. } => assert!(len == *n && buf == bytes(*seed, *n), "{k}"),
        GetItem::Failed(s, _) if is_outage(s) => {
            // The OSD may be past its fail-safe ratio and drop even reads for a while.
        }
        other => panic!("a stored chunk on a full store: {other:?}"),
    }
}
