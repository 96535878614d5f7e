//! Shared helpers: where the built plugins are, config builders, log capture.

use kvhost::config::Config;
use kvhost::loader;
use kvhost::plugin::{GetItem, GetRequest, PluginBackend, PluginError, Presence};
use kvhost::ChunkKey;
use kvhost_plugin_sdk::ChunkMeta;
use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};

/// `<target>/<profile>`: the test binary lives in `<profile>/deps`.
pub fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    exe.parent()
        .and_then(|d| d.parent())
        .expect("profile dir")
        .to_path_buf()
}

/// Where the workspace build puts the C plugins.
pub fn plugins_dir() -> PathBuf {
    profile_dir().join("plugins")
}

/// A fixture library built by `tests/build.rs`.
pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("KVHOST_TEST_PLUGINS_DIR")).join(format!("lib{name}.so"))
}

/// The cdylib of a workspace Rust plugin or fixture, `lib<lib_name>.so`. `cargo test` builds it
/// into `<profile>/deps`; only `cargo build` also copies it to `<profile>`, so a test never relies
/// on the loader's `module_path` search finding it (a fresh clone has no `<profile>/lib*.so`).
pub fn rust_plugin(lib_name: &str) -> PathBuf {
    let file = format!("lib{lib_name}.so");
    let deps = profile_dir().join("deps").join(&file);
    if deps.is_file() {
        deps
    } else {
        profile_dir().join(file)
    }
}

/// The SDK-built Rust fixture library.
pub fn rust_fixture() -> PathBuf {
    rust_plugin("kvhost_fixture_rust")
}

/// A config with one plugin `name` loaded from `module_path` (`class`) with `options`, and a small model.
pub fn config_for(name: &str, module_path: &str, class: &str, options: &[(&str, &str)]) -> Config {
    let mut y = format!(
        "chunk_size: 16\nmodel:\n  name: test/model\n  num_layers: 2\n  num_kv_heads: 2\n  head_size: 16\n  dtype: half\n\
         storage_plugins: [{name}]\nextra_config:\n  storage_plugin.{name}.module_path: \"{module_path}\"\n  \
         storage_plugin.{name}.class_name: {class}\n"
    );
    for (k, v) in options {
        y.push_str(&format!("  storage_plugin.{name}.{k}: \"{v}\"\n"));
    }
    Config::from_yaml(&y, None).unwrap_or_else(|e| panic!("test config: {e}\n{y}"))
}

/// Load plugin `name` as configured by [`config_for`].
pub fn load(
    name: &str,
    module_path: &str,
    class: &str,
    options: &[(&str, &str)],
) -> Result<PluginBackend, String> {
    let c = config_for(name, module_path, class, options);
    loader::load(&c.plugins[0], &c).map_err(|e| e.to_string())
}

/// Load, panicking with the loader's message on failure.
pub fn must_load(
    name: &str,
    module_path: &str,
    class: &str,
    options: &[(&str, &str)],
) -> PluginBackend {
    load(name, module_path, class, options).unwrap_or_else(|e| panic!("{e}"))
}

/// A test key.
pub fn key(n: i128) -> ChunkKey {
    ChunkKey::new("test/model", 1, 0, n, "half").unwrap()
}

#[derive(Clone)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        std::io::stderr().write_all(buf)?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();

/// Install a process-wide subscriber capturing everything at debug level; returns the log text so far.
pub fn logs() -> String {
    let buf = LOGS.get_or_init(|| {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let writer = Captured(buf.clone());
        let _ = tracing_subscriber::fmt()
            .with_env_filter("debug")
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .try_init();
        buf
    });
    String::from_utf8_lossy(&buf.lock().unwrap()).into_owned()
}

/// Deterministic bytes for a seed (xorshift), so a test can tell chunks apart.
pub fn bytes(seed: u64, len: usize) -> Vec<u8> {
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

/// Wait (up to 20 s) until the chain has no puts in flight to its plugin tiers.
pub fn wait_drained(chain: &kvhost::chain::Chain) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while chain.stats().puts_in_flight > 0 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    assert_eq!(chain.stats().puts_in_flight, 0, "puts drained");
}

/// Metadata that differs per seed (a negative dimension included), so a plugin that mixes up records
/// or mangles metadata is caught.
pub fn chunk_meta(seed: u64, len: usize) -> ChunkMeta {
    ChunkMeta {
        length: len as u64,
        fmt: 1 + (seed % 6) as i32,
        dtype: 1 + (seed % 8) as i32,
        ndim: 4,
        shape: [2, seed as i32, (len % 977) as i32, -7],
        reserved: 0,
    }
}

/// Get `keys` into buffers of `cap` bytes: each item with its buffer, and the request's error.
pub fn get_chunks_unchecked(
    p: &PluginBackend,
    keys: &[ChunkKey],
    cap: usize,
) -> (Vec<(GetItem, Vec<u8>)>, Option<PluginError>) {
    let request = GetRequest {
        keys: keys.to_vec(),
        bufs: vec![vec![0u8; cap]; keys.len()],
    };
    let done = p
        .get_wait(request, std::time::Duration::from_secs(60))
        .expect("get completes");
    (
        done.items.into_iter().zip(done.request.bufs).collect(),
        done.error,
    )
}

/// [`get_chunks_unchecked`], asserting the request as a whole did not fail.
pub fn get_chunks(p: &PluginBackend, keys: &[ChunkKey], cap: usize) -> Vec<(GetItem, Vec<u8>)> {
    let (items, error) = get_chunks_unchecked(p, keys, cap);
    assert!(error.is_none(), "get failed: {error:?}");
    items
}

/// Asserts `key` reads back as chunk (seed, len): contains' metadata, get's bytes and metadata.
pub fn assert_chunk(p: &PluginBackend, key: &ChunkKey, seed: u64, len: usize) {
    let presence = p.contains(std::slice::from_ref(key), false).unwrap();
    assert_eq!(
        presence[0],
        Presence::Present(chunk_meta(seed, len)),
        "contains {key}"
    );
    let (item, buf) = get_chunks(p, std::slice::from_ref(key), len.max(1)).remove(0);
    assert_eq!(
        item,
        GetItem::Hit {
            len,
            meta: chunk_meta(seed, len)
        },
        "get {key}"
    );
    assert!(buf[..len] == bytes(seed, len)[..], "bytes of {key}");
}

/// Asserts `key` is absent: contains says so and get misses.
pub fn assert_absent(p: &PluginBackend, key: &ChunkKey) {
    assert_eq!(
        p.contains(std::slice::from_ref(key), false).unwrap()[0],
        Presence::Absent,
        "contains {key}"
    );
    assert_eq!(
        get_chunks(p, std::slice::from_ref(key), 16).remove(0).0,
        GetItem::Miss,
        "get {key}"
    );
}
