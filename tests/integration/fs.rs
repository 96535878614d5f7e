//! The `fs` plugin (plugins/fs) through the real loader: conformance, the chain, restart, corruption,
//! capacity and O_DIRECT.

use crate::util::*;
use kvhost::chain::{Chain, PutOutcome};
use kvhost::config::Config;
use kvhost::conformance;
use kvhost::plugin::{GetItem, GetRequest, PluginBackend, Presence, PutRequest};
use kvhost::ChunkKey;
use kvhost_plugin_sdk::{ChunkMeta, Status};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(30);

/// The fs plugin's cdylib, built by the workspace (a dependency of this package).
fn fs_so() -> PathBuf {
    crate::util::rust_plugin("kvhost_fs")
}

/// A fresh directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        Self::under(&std::env::temp_dir(), tag)
    }
    fn under(base: &Path, tag: &str) -> TempDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let p = base.join(format!(
            "kvhost-fs-it-{}-{}-{tag}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        TempDir(p)
    }
    fn path(&self) -> &str {
        self.0.to_str().expect("utf-8 temp path")
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn load_fs(dir: &TempDir, options: &[(&str, &str)]) -> Result<PluginBackend, String> {
    let mut opts = vec![("path", dir.path())];
    opts.extend_from_slice(options);
    load("fs", fs_so().to_str().unwrap(), "fs", &opts)
}

fn must_load_fs(dir: &TempDir, options: &[(&str, &str)]) -> PluginBackend {
    load_fs(dir, options).unwrap_or_else(|e| panic!("{e}"))
}

fn meta(len: usize, salt: i32) -> ChunkMeta {
    ChunkMeta {
        length: len as u64,
        fmt: 1 + salt % 6,
        dtype: 3,
        ndim: 4,
        shape: [2, salt, (len % 997) as i32, -1],
        reserved: 0,
    }
}

fn fkey(n: i128) -> ChunkKey {
    ChunkKey::new("fs/test-model", 2, 1, n, "bfloat16").unwrap()
}

fn put(p: &PluginBackend, keys: &[ChunkKey], data: &[Vec<u8>], salt: i32) -> Vec<Status> {
    let done = p
        .put_wait(
            PutRequest {
                keys: keys.to_vec(),
                bufs: data.to_vec(),
                metas: data.iter().map(|d| meta(d.len(), salt)).collect(),
            },
            WAIT,
        )
        .expect("put completes");
    assert!(done.error.is_none(), "{:?}", done.error);
    done.items
}

fn put_ok(p: &PluginBackend, keys: &[ChunkKey], data: &[Vec<u8>], salt: i32) {
    let st = put(p, keys, data, salt);
    assert!(st.iter().all(|s| *s == Status::OK), "put: {st:?}");
}

fn get(p: &PluginBackend, keys: &[ChunkKey], caps: &[usize]) -> (Vec<GetItem>, Vec<Vec<u8>>) {
    let done = p
        .get_wait(
            GetRequest {
                keys: keys.to_vec(),
                bufs: caps.iter().map(|&c| vec![0xA5u8; c]).collect(),
            },
            WAIT,
        )
        .expect("get completes");
    assert!(done.error.is_none(), "{:?}", done.error);
    (done.items, done.request.bufs)
}

fn expect_hits(p: &PluginBackend, keys: &[ChunkKey], data: &[Vec<u8>], salt: i32) {
    let caps: Vec<usize> = data.iter().map(|d| d.len() + 7).collect();
    let (items, got) = get(p, keys, &caps);
    for (i, item) in items.iter().enumerate() {
        assert_eq!(
            *item,
            GetItem::Hit {
                len: data[i].len(),
                meta: meta(data[i].len(), salt)
            },
            "item {i}"
        );
        assert!(got[i][..data[i].len()] == data[i][..], "bytes of item {i}");
    }
    let presence = p.contains(keys, false).unwrap();
    for (i, pr) in presence.iter().enumerate() {
        assert_eq!(
            *pr,
            Presence::Present(meta(data[i].len(), salt)),
            "item {i}"
        );
    }
}

fn health(p: &PluginBackend) -> String {
    p.health().expect("KVH_CAP_HEALTH").expect("healthy")
}

/// Every `*.kvc` file under `dir`, with its contents.
fn chunk_files(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    for shard in std::fs::read_dir(dir).unwrap().flatten() {
        if !shard.file_type().unwrap().is_dir() {
            continue;
        }
        for f in std::fs::read_dir(shard.path()).unwrap().flatten() {
            if f.file_name().to_string_lossy().ends_with(".kvc") {
                out.push((f.path(), std::fs::read(f.path()).unwrap()));
            }
        }
    }
    out
}

/// The file holding `key` (its header contains the canonical string).
fn file_of(dir: &Path, key: &ChunkKey) -> PathBuf {
    let needle = key.as_str().as_bytes();
    let hits: Vec<PathBuf> = chunk_files(dir)
        .into_iter()
        .filter(|(_, c)| c.windows(needle.len()).any(|w| w == needle))
        .map(|(p, _)| p)
        .collect();
    assert_eq!(hits.len(), 1, "files for {key}: {hits:?}");
    hits.into_iter().next().unwrap()
}

fn run_conformance(tag: &str, options: &[(&str, &str)]) {
    let dirs = Mutex::new(Vec::new());
    let so = fs_so();
    let factory = || {
        let d = TempDir::new(tag);
        let mut opts = vec![("path", d.path())];
        opts.extend_from_slice(options);
        let c = config_for("fs", so.to_str().unwrap(), "fs", &opts);
        let r = kvhost::loader::load(&c.plugins[0], &c);
        dirs.lock().unwrap().push(d);
        r
    };
    let report = conformance::run(&factory);
    println!("conformance of fs ({tag}):\n{report}");
    assert!(
        report.passed(),
        "fs ({tag}) failed conformance:\n{}",
        report.failures().join("\n")
    );
    let skipped: Vec<_> = report
        .checks
        .iter()
        .filter(|c| c.outcome == conformance::Outcome::Skip)
        .map(|c| c.name)
        .collect();
    // The index answers lookups from memory and unlink is cheap, so fs keeps the synchronous
    // contains/remove instead of the ABI 1.2 asynchronous entries.
    // `capacity` skips itself: the default 16 GiB is more than it fills (the README's conformance
    // line and readme_conformance_line_for_fs_passes run it at 64 MiB).
    assert_eq!(
        skipped,
        ["prefetch", "contains_async", "remove_async", "capacity"],
        "only prefetch and the asynchronous lookup/remove are not advertised"
    );
}

#[test]
fn conforms_with_defaults() {
    run_conformance("defaults", &[]);
}

#[test]
fn conforms_with_o_direct_and_batch_fsync() {
    run_conformance(
        "direct-batch",
        &[
            ("o_direct", "true"),
            ("fsync", "batch"),
            ("io_threads", "1"),
            ("shards", "4"),
        ],
    );
}

#[test]
fn conforms_with_chunk_fsync_and_four_threads() {
    run_conformance(
        "chunk",
        &[("fsync", "chunk"), ("io_threads", "4"), ("shards", "1")],
    );
}

fn chain_over(dir: &TempDir, cache_mib: u64) -> Chain {
    let y = format!(
        "chunk_size: 16\nmax_local_cpu_size: {}\nlocal_cpu_prefault: false\nblocking_timeout_secs: 10\n\
         storage_plugins: [fs]\nextra_config:\n  \
         storage_plugin.fs.module_path: \"{}\"\n  storage_plugin.fs.class_name: fs\n  \
         storage_plugin.fs.path: \"{}\"\n  storage_plugin.fs.max_size_gib: 0.5\n  \
         storage_plugin.fs.o_direct: true\n",
        cache_mib as f64 / 1024.0,
        fs_so().display(),
        dir.path()
    );
    let config = Config::from_yaml(&y, None).unwrap_or_else(|e| panic!("{e}\n{y}"));
    Chain::from_config(&config).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn chain_writes_through_and_promotes_from_fs_also_after_restart() {
    let dir = TempDir::new("chain");
    let keys: Vec<ChunkKey> = (0..4).map(|i| fkey(1000 + i)).collect();
    let data: Vec<Vec<u8>> = (0..4)
        .map(|i| bytes(i, 200_000 + 4096 * i as usize + 3))
        .collect();
    {
        let chain = chain_over(&dir, 64);
        for (k, d) in keys.iter().zip(&data) {
            let out = chain.put(std::slice::from_ref(k), &[d], &[meta(d.len(), 5)]);
            assert_eq!(out, vec![PutOutcome::Stored]);
        }
        wait_drained(&chain);
        let fs = chain.plugins()[0].clone();
        for p in fs.contains(&keys, false).unwrap() {
            assert!(matches!(p, Presence::Present(_)), "{p:?}");
        }
        // Evict from the hot cache only: the get is served by fs and promoted.
        assert!(chain.hot().remove(&keys[0]));
        let h = chain
            .get(std::slice::from_ref(&keys[0]))
            .remove(0)
            .expect("fs has it");
        assert_eq!(h.bytes(), &data[0][..]);
        assert_eq!(h.meta(), meta(data[0].len(), 5));
        let stats = chain.stats();
        let t = stats.tiers.iter().find(|t| t.name == "fs").unwrap();
        assert_eq!((t.hits, t.promotions), (1, 1), "{t:?}");
        assert!(
            chain.hot().contains(&keys[0]),
            "promoted into the hot cache"
        );
        drop(h);
        let report = chain.close(Duration::from_secs(10));
        assert!(report.unfinished.is_empty(), "{report:?}");
    }
    // A new chain (new plugin instance, empty hot cache) on the same directory.
    let chain = chain_over(&dir, 64);
    let got = chain.get(&keys);
    for (i, h) in got.iter().enumerate() {
        let h = h
            .as_ref()
            .unwrap_or_else(|| panic!("key {i} lost over restart"));
        assert_eq!(h.bytes(), &data[i][..], "key {i}");
        assert_eq!(h.meta(), meta(data[i].len(), 5));
    }
    let stats = chain.stats();
    let t = stats.tiers.iter().find(|t| t.name == "fs").unwrap();
    assert_eq!(t.promotions, 4, "{t:?}");
    chain.close(Duration::from_secs(10));
}

#[test]
fn restart_finds_identical_bytes_and_metadata() {
    let dir = TempDir::new("restart");
    let mut keys: Vec<ChunkKey> = (0..5).map(|i| fkey(2000 + i)).collect();
    keys.push(
        ChunkKey::build(
            "org/model:v2",
            8,
            7,
            -0x1234_5678_9abc_def0_1122,
            "half",
            Some(31),
            &[("lora", "a b/c"), ("tenant", "x")],
        )
        .unwrap(),
    );
    let sizes = [0usize, 1, 4096, 100_003, 3 << 20, 77];
    let data: Vec<Vec<u8>> = sizes
        .iter()
        .enumerate()
        .map(|(i, &n)| bytes(50 + i as u64, n))
        .collect();
    {
        let p = must_load_fs(&dir, &[("fsync", "batch")]);
        put_ok(&p, &keys, &data, 9);
        expect_hits(&p, &keys, &data, 9);
    }
    let p = must_load_fs(&dir, &[]);
    let h = health(&p);
    assert!(h.contains(&format!("{} chunks", keys.len())), "{h}");
    assert!(h.contains("removed_at_start=0"), "{h}");
    expect_hits(&p, &keys, &data, 9);
    // Still writable after the restart, and a replaced value survives the next one.
    let new = bytes(99, 12_345);
    put_ok(&p, &keys[1..2], std::slice::from_ref(&new), 4);
    drop(p);
    let p = must_load_fs(&dir, &[]);
    expect_hits(&p, &keys[1..2], std::slice::from_ref(&new), 4);
    expect_hits(&p, &keys[2..], &data[2..], 9);
}

#[test]
fn corrupt_truncated_and_temporary_files_are_never_served_and_are_removed() {
    let dir = TempDir::new("corrupt");
    let keys: Vec<ChunkKey> = (0..5).map(|i| fkey(3000 + i)).collect();
    let data: Vec<Vec<u8>> = (0..5).map(|i| bytes(i, 50_000 + i as usize)).collect();
    {
        let p = must_load_fs(&dir, &[("shards", "16")]);
        put_ok(&p, &keys, &data, 2);
    }
    let root = dir.0.clone();
    // 0: one flipped data byte (found at start, detected on read).
    let f0 = file_of(&root, &keys[0]);
    let mut raw = std::fs::read(&f0).unwrap();
    let at = raw.len() - 1000;
    raw[at] ^= 0x10;
    std::fs::write(&f0, raw).unwrap();
    // 1: one flipped header byte (in the stored metadata).
    let f1 = file_of(&root, &keys[1]);
    let mut raw = std::fs::read(&f1).unwrap();
    raw[44] ^= 0x01;
    std::fs::write(&f1, raw).unwrap();
    // 2: truncated in the middle of the data.
    let f2 = file_of(&root, &keys[2]);
    let len = std::fs::metadata(&f2).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&f2)
        .unwrap()
        .set_len(len - 20_000)
        .unwrap();
    // 3: truncated to nothing (a crash right after create). 4 stays intact.
    let f3 = file_of(&root, &keys[3]);
    std::fs::write(&f3, b"").unwrap();
    // A half-written temporary file, a chunk file with garbage, and an unrelated file to leave alone.
    let shard = f0.parent().unwrap().to_path_buf();
    let stray = shard.join(".00000000deadbeef.7.tmp");
    std::fs::write(&stray, bytes(7, 10_000)).unwrap();
    let garbage = shard.join("0123456789abcdef-garbage.kvc");
    std::fs::write(&garbage, bytes(8, 9000)).unwrap();
    let unrelated = shard.join("README.txt");
    std::fs::write(&unrelated, b"not a chunk").unwrap();

    let p = must_load_fs(&dir, &[("shards", "16")]);
    let h = health(&p);
    assert!(
        h.contains("removed_at_start=5 (temporary=1 corrupt=4)"),
        "{h}"
    );
    for f in [&f1, &f2, &f3, &stray, &garbage] {
        assert!(!f.exists(), "{} was not removed", f.display());
    }
    assert!(
        unrelated.exists(),
        "files that are not chunks are left alone"
    );
    let presence = p.contains(&keys, false).unwrap();
    assert!(
        matches!(presence[0], Presence::Present(_)),
        "data is verified lazily"
    );
    for (i, pr) in presence.iter().enumerate().take(4).skip(1) {
        assert_eq!(*pr, Presence::Absent, "key {i}");
    }
    let caps: Vec<usize> = data.iter().map(Vec::len).collect();
    let (items, got) = get(&p, &keys, &caps);
    assert_eq!(
        items[0],
        GetItem::Failed(Status::CORRUPT, String::new()),
        "flipped data byte"
    );
    for (i, item) in items.iter().enumerate().take(4).skip(1) {
        assert_eq!(*item, GetItem::Miss, "key {i}");
    }
    assert!(matches!(items[4], GetItem::Hit { len: 50_004, .. }));
    assert!(got[4] == data[4]);
    assert!(!f0.exists(), "the corrupt file is removed on read");
    assert_eq!(p.contains(&keys[..1], false).unwrap()[0], Presence::Absent);
    assert_eq!(get(&p, &keys[..1], &caps[..1]).0[0], GetItem::Miss);
    assert!(health(&p).contains("corrupt_on_read=1"));
    assert_eq!(chunk_files(&root).len(), 1, "only the intact chunk is left");
}

#[test]
fn verify_reads_always_checks_chunks_written_by_the_same_instance() {
    let dir = TempDir::new("verify-always");
    let p = must_load_fs(&dir, &[("verify_reads", "always")]);
    let k = fkey(3500);
    let data = bytes(35, 2_000_000);
    put_ok(&p, std::slice::from_ref(&k), std::slice::from_ref(&data), 1);
    expect_hits(&p, std::slice::from_ref(&k), std::slice::from_ref(&data), 1);
    let f = file_of(&dir.0, &k);
    let mut raw = std::fs::read(&f).unwrap();
    raw[4096 + 1_234_567] ^= 0x02;
    std::fs::write(&f, raw).unwrap();
    let (items, _) = get(&p, std::slice::from_ref(&k), &[data.len()]);
    assert_eq!(items[0], GetItem::Failed(Status::CORRUPT, String::new()));
    assert!(!f.exists());
    assert_eq!(
        p.contains(std::slice::from_ref(&k), false).unwrap()[0],
        Presence::Absent
    );
}

#[test]
fn capacity_evicts_least_recently_used_and_reports_no_space() {
    let dir = TempDir::new("capacity");
    // 0.001 GiB = 1_073_741 bytes; a 100_000-byte chunk takes 4096 (header) + 100_000 rounded up to
    // 4096 = 106_496 bytes, so exactly 10 fit.
    let p = must_load_fs(&dir, &[("max_size_gib", "0.001")]);
    let keys: Vec<ChunkKey> = (0..14).map(|i| fkey(4000 + i)).collect();
    let chunk = |i: usize| bytes(i as u64, 100_000);
    for (i, k) in keys.iter().enumerate().take(10) {
        put_ok(&p, std::slice::from_ref(k), &[chunk(i)], 1);
    }
    assert!(health(&p).contains("10 chunks"));
    // A get makes key 0 the most recent: the next put evicts key 1.
    let (items, _) = get(&p, &keys[..1], &[100_000]);
    assert!(matches!(items[0], GetItem::Hit { .. }));
    put_ok(&p, &keys[10..11], &[chunk(10)], 1);
    let pr = p
        .contains(&[keys[0].clone(), keys[1].clone(), keys[10].clone()], false)
        .unwrap();
    assert!(matches!(pr[0], Presence::Present(_)));
    assert_eq!(pr[1], Presence::Absent, "least recently used is evicted");
    assert!(matches!(pr[2], Presence::Present(_)));
    // LRU order now 2..=9, 0, 10. A pinned chunk (2) is skipped: 3 goes.
    assert_eq!(p.pin(&keys[2..3]).unwrap(), vec![Status::OK]);
    put_ok(&p, &keys[11..12], &[chunk(11)], 1);
    let pr = p.contains(&keys[2..4], false).unwrap();
    assert!(matches!(pr[0], Presence::Present(_)), "pinned chunk kept");
    assert_eq!(pr[1], Presence::Absent);
    assert_eq!(
        p.remove(&keys[2..3], false).unwrap(),
        vec![Status::BUSY],
        "a pinned chunk is not removed without force"
    );
    // Larger than the whole capacity: NO_SPACE, and nothing is evicted for it.
    let before = health(&p);
    let st = put(&p, &keys[12..13], &[bytes(12, 2_000_000)], 1);
    assert_eq!(st, vec![Status::NO_SPACE]);
    assert_eq!(
        p.contains(&keys[12..13], false).unwrap()[0],
        Presence::Absent
    );
    assert!(before.contains("10 chunks") && health(&p).contains("10 chunks"));
    // Everything pinned: NO_SPACE until something is unpinned.
    let stored: Vec<ChunkKey> = keys[..12]
        .iter()
        .zip(p.contains(&keys[..12], false).unwrap())
        .filter(|(_, pr)| matches!(pr, Presence::Present(_)))
        .map(|(k, _)| k.clone())
        .collect();
    assert_eq!(stored.len(), 10);
    assert!(p.pin(&stored).unwrap().iter().all(|s| *s == Status::OK));
    assert_eq!(
        put(&p, &keys[13..14], &[chunk(13)], 1),
        vec![Status::NO_SPACE]
    );
    assert!(p.unpin(&stored).unwrap().iter().all(|s| *s == Status::OK));
    assert_eq!(p.unpin(&keys[2..3]).unwrap(), vec![Status::OK]);
    assert_eq!(
        p.unpin(&keys[2..3]).unwrap(),
        vec![Status::INVALID_ARG],
        "more unpins than pins"
    );
    put_ok(&p, &keys[13..14], &[chunk(13)], 1);
    assert_eq!(chunk_files(&dir.0).len(), 10, "evicted files are unlinked");
    let h = health(&p);
    assert!(h.contains("no_space=2"), "{h}");
}

fn direct_round_trip(dir: &TempDir) -> String {
    let keys: Vec<ChunkKey> = (0..5).map(|i| fkey(5000 + i)).collect();
    let sizes = [1usize, 4097, 65_536, (1 << 20) + 3, 5 << 20];
    let data: Vec<Vec<u8>> = sizes
        .iter()
        .enumerate()
        .map(|(i, &n)| bytes(70 + i as u64, n))
        .collect();
    let state;
    {
        let p = must_load_fs(dir, &[("o_direct", "true")]);
        let h = health(&p);
        state = h
            .split("o_direct=")
            .nth(1)
            .and_then(|s| s.split(',').next())
            .unwrap_or("")
            .to_string();
        assert!(
            state == "on" || state.starts_with("fallback"),
            "o_direct state: {h}"
        );
        put_ok(&p, &keys, &data, 3);
        expect_hits(&p, &keys, &data, 3);
    }
    // Where this filesystem takes O_DIRECT, the plugin must have used it; elsewhere it must say why not.
    match direct_supported(&dir.0) {
        Ok(()) => assert_eq!(state, "on", "{} takes O_DIRECT", dir.path()),
        Err(why) => assert!(
            state.starts_with("fallback"),
            "{} refuses O_DIRECT ({why}) but the plugin says `{state}`",
            dir.path()
        ),
    }
    if state == "on" {
        // Files written with O_DIRECT are padded to whole blocks; the header keeps the true length.
        for (k, d) in keys.iter().zip(&data) {
            let len = std::fs::metadata(file_of(&dir.0, k)).unwrap().len();
            assert_eq!(len % 4096, 0);
            assert_eq!(len, 4096 + (d.len() as u64).div_ceil(4096) * 4096);
        }
    }
    // The same files read back buffered, then written buffered and read back with O_DIRECT.
    {
        let p = must_load_fs(dir, &[("o_direct", "false")]);
        expect_hits(&p, &keys, &data, 3);
        put_ok(&p, &keys[..2], &data[3..5], 4);
    }
    let p = must_load_fs(dir, &[("o_direct", "true")]);
    expect_hits(&p, &keys[..2], &data[3..5], 4);
    expect_hits(&p, &keys[2..], &data[2..], 3);
    state
}

/// Whether the filesystem of `dir` takes O_DIRECT: open a file there with it and write one aligned
/// 4 KiB block from an aligned buffer (what the plugin's files need), independently of the plugin.
fn direct_supported(dir: &Path) -> Result<(), String> {
    use std::os::unix::fs::OpenOptionsExt;
    use std::os::unix::io::AsRawFd;
    std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    let path = dir.join(".test-odirect-probe");
    let result = (|| {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .custom_flags(libc::O_DIRECT)
            .open(&path)
            .map_err(|e| format!("open(O_DIRECT): {e}"))?;
        let layout = std::alloc::Layout::from_size_align(4096, 4096).unwrap();
        // SAFETY: a non-zero-sized layout; freed below with the same layout.
        let buf = unsafe { std::alloc::alloc_zeroed(layout) };
        assert!(!buf.is_null(), "allocating 4 KiB");
        // SAFETY: `buf` holds 4096 initialised bytes; `f` is an open file.
        let n = unsafe { libc::pwrite(f.as_raw_fd(), buf.cast(), 4096, 0) };
        let err = std::io::Error::last_os_error();
        // SAFETY: allocated above with `layout`.
        unsafe { std::alloc::dealloc(buf, layout) };
        if n == 4096 {
            Ok(())
        } else {
            Err(format!("aligned O_DIRECT write: {err}"))
        }
    })();
    let _ = std::fs::remove_file(&path);
    result
}

#[test]
fn o_direct_works_or_falls_back_cleanly() {
    let dir = TempDir::new("direct");
    let state = direct_round_trip(&dir);
    println!("o_direct on {}: {state}", std::env::temp_dir().display());
    // tmpfs: O_DIRECT is refused by older kernels (fallback) and accepted since Linux 6.6.
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        let dir = TempDir::under(shm, "direct");
        let state = direct_round_trip(&dir);
        println!("o_direct on /dev/shm: {state}");
    }
}

#[test]
fn o_direct_through_the_chain_reads_into_aligned_arena_blocks() {
    let dir = TempDir::new("direct-chain");
    let chain = chain_over(&dir, 64);
    let keys: Vec<ChunkKey> = (0..3).map(|i| fkey(6000 + i)).collect();
    let data: Vec<Vec<u8>> = [4096usize, (2 << 20) + 17, 8 << 20]
        .iter()
        .enumerate()
        .map(|(i, &n)| bytes(90 + i as u64, n))
        .collect();
    for (k, d) in keys.iter().zip(&data) {
        chain.put(std::slice::from_ref(k), &[d], &[meta(d.len(), 6)]);
    }
    wait_drained(&chain);
    for k in &keys {
        chain.hot().remove(k);
    }
    for (i, h) in chain.get(&keys).into_iter().enumerate() {
        let h = h.unwrap_or_else(|| panic!("key {i} not promoted"));
        assert_eq!(h.bytes(), &data[i][..]);
    }
    chain.close(Duration::from_secs(10));
}

const DURABLE_CHILD: &str = "KVHOST_FS_DURABLE_CHILD";
/// What the writer prints once the put completed (libtest may have started the line).
const DURABLE_MARK: &str = "kvhost-fs-writer: durable";
const DURABLE_TEST: &str = "fs::chunks_reported_durable_survive_a_kill_9_of_their_writer";

fn durable_keys() -> (Vec<ChunkKey>, Vec<Vec<u8>>) {
    let keys = (0..8).map(|i| fkey(7500 + i)).collect();
    let data = (0..8)
        .map(|i| bytes(300 + i, 10_000 + 70_001 * i as usize))
        .collect();
    (keys, data)
}

/// The writer: stores the chunks with `fsync: chunk`, says so once the plugin completed the put (the
/// point where it promises they are durable), then keeps the store open until it is killed: no
/// destroy, no flush, no clean exit.
fn durable_writer(dir: &str) -> ! {
    let p = load(
        "fs",
        fs_so().to_str().unwrap(),
        "fs",
        &[("path", dir), ("fsync", "chunk"), ("shards", "2")],
    )
    .expect("load fs in the writer");
    let (keys, data) = durable_keys();
    put_ok(&p, &keys, &data, 9);
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    writeln!(out, "\n{DURABLE_MARK} {}", keys.len()).unwrap();
    out.flush().unwrap();
    loop {
        std::thread::sleep(Duration::from_secs(60));
    }
}

/// A chunk the plugin reported stored with `fsync: chunk` is read back by another process after its
/// writer was killed with SIGKILL (nothing ran after the report: no destroy, no flush). A kill keeps
/// the page cache, so the kill proves the files are complete and indexed at the report; the
/// `fdatasync` calls are checked by the next test.
#[test]
fn chunks_reported_durable_survive_a_kill_9_of_their_writer() {
    if let Ok(dir) = std::env::var(DURABLE_CHILD) {
        durable_writer(&dir);
    }
    kill_9_round(false);
}

/// The same round with the writer under `strace`: one `fdatasync` per chunk ran before the put was
/// reported stored.
#[test]
#[cfg_attr(
    not(has_strace),
    ignore = "needs strace (apt-get install strace; .ci/test-all installs it)"
)]
fn chunks_are_fdatasynced_before_their_put_is_reported() {
    kill_9_round(true);
}

/// Start a durable writer (under `strace` when `traced`), wait for its report, SIGKILL it, and read
/// its chunks back from another instance.
fn kill_9_round(traced: bool) {
    use std::io::BufRead;
    let dir = TempDir::new("kill9");
    std::fs::create_dir_all(&dir.0).unwrap();
    let trace = dir.0.with_extension("strace");
    let exe = std::env::current_exe().unwrap();
    let test_args = [DURABLE_TEST, "--exact", "--nocapture", "--test-threads=1"];
    let mut cmd = if traced {
        let mut c = std::process::Command::new("strace");
        c.args(["-f", "-qq", "-e", "trace=fdatasync,fsync", "-o"])
            .arg(&trace)
            .arg(&exe)
            .args(test_args);
        c
    } else {
        let mut c = std::process::Command::new(&exe);
        c.args(test_args);
        c
    };
    let mut child = cmd
        .env(DURABLE_CHILD, dir.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start the writer");
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = crossbeam_channel::unbounded();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let said = loop {
        match rx.recv_timeout(Duration::from_secs(120)) {
            Ok(l) if l.contains(DURABLE_MARK) => break l,
            Ok(_) => continue,
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("the writer never reported its put durable ({e})");
            }
        }
    };
    let fdatasyncs_before_report = traced.then(|| {
        let text = std::fs::read_to_string(&trace).unwrap_or_default();
        text.lines().filter(|l| l.contains("fdatasync(")).count()
    });
    // The writer under strace is strace's child; kill the whole group of processes we started.
    let victims: Vec<u32> = if traced {
        descendants(child.id())
    } else {
        vec![child.id()]
    };
    for pid in victims {
        // SAFETY: signalling a process this test started (the writer, or strace and the writer).
        unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
    }
    let _ = child.wait();
    let _ = std::fs::remove_file(&trace);
    if let Some(n) = fdatasyncs_before_report {
        assert!(
            n >= 8,
            "{said}: only {n} fdatasync call(s) before the put was reported, for 8 chunks"
        );
    }
    let (keys, data) = durable_keys();
    let p = must_load_fs(&dir, &[("fsync", "chunk"), ("shards", "2")]);
    expect_hits(&p, &keys, &data, 9);
}

/// `pid` and every process below it (from /proc), children last.
fn descendants(pid: u32) -> Vec<u32> {
    let mut all = vec![pid];
    let mut i = 0;
    while i < all.len() {
        let parent = all[i];
        let children = std::fs::read_to_string(format!("/proc/{parent}/task/{parent}/children"))
            .unwrap_or_default();
        all.extend(
            children
                .split_whitespace()
                .filter_map(|c| c.parse::<u32>().ok()),
        );
        i += 1;
    }
    all.reverse();
    all
}

#[test]
fn flush_and_every_fsync_mode_keep_data_over_restart() {
    for mode in ["none", "chunk", "batch"] {
        let dir = TempDir::new(mode);
        let keys: Vec<ChunkKey> = (0..6).map(|i| fkey(7000 + i)).collect();
        let data: Vec<Vec<u8>> = (0..6)
            .map(|i| bytes(i, 30_000 * (i as usize + 1)))
            .collect();
        {
            let p = must_load_fs(&dir, &[("fsync", mode), ("shards", "3")]);
            put_ok(&p, &keys, &data, 8);
            p.flush().unwrap_or_else(|e| panic!("{mode}: {e}"));
        }
        let p = must_load_fs(&dir, &[("fsync", mode), ("shards", "3")]);
        expect_hits(&p, &keys, &data, 8);
    }
}

#[test]
fn clear_removes_every_chunk_file() {
    let dir = TempDir::new("clear");
    let p = must_load_fs(&dir, &[]);
    let keys: Vec<ChunkKey> = (0..8).map(|i| fkey(8000 + i)).collect();
    let data: Vec<Vec<u8>> = (0..8).map(|i| bytes(i, 5000)).collect();
    put_ok(&p, &keys, &data, 0);
    p.pin(&keys[..2]).unwrap();
    assert_eq!(chunk_files(&dir.0).len(), 8);
    p.clear().unwrap();
    assert!(chunk_files(&dir.0).is_empty());
    assert!(p
        .contains(&keys, false)
        .unwrap()
        .iter()
        .all(|pr| *pr == Presence::Absent));
    put_ok(&p, &keys[..1], &data[..1], 0);
    expect_hits(&p, &keys[..1], &data[..1], 0);
}

#[test]
fn one_instance_per_directory() {
    let dir = TempDir::new("lock");
    let first = must_load_fs(&dir, &[]);
    let err = load_fs(&dir, &[]).expect_err("a second instance on the same directory");
    assert!(
        err.contains("in use by another fs backend instance"),
        "{err}"
    );
    drop(first);
    must_load_fs(&dir, &[]);
}

#[test]
fn bad_options_are_refused_with_the_reason() {
    let dir = TempDir::new("options");
    for (opts, needle) in [
        (vec![("fsync", "sometimes")], "fsync"),
        (vec![("shards", "0")], "shards"),
        (vec![("io_threads", "0")], "io_threads"),
        (vec![("max_size_gib", "0")], "max_size_gib"),
        (vec![("max_size_gib", "lots")], "max_size_gib"),
        (vec![("o_direct", "maybe")], "o_direct"),
        (vec![("verify_reads", "never")], "verify_reads"),
    ] {
        let err = load_fs(&dir, &opts).expect_err(needle);
        assert!(
            err.contains("INVALID_CONFIG") && err.contains(needle),
            "{err}"
        );
    }
    let file = dir.0.with_extension("file");
    std::fs::write(&file, b"x").unwrap();
    let err = load(
        "fs",
        fs_so().to_str().unwrap(),
        "fs",
        &[("path", file.to_str().unwrap())],
    )
    .expect_err("a file as path");
    let _ = std::fs::remove_file(&file);
    assert!(err.contains("not a directory"), "{err}");
    let err = load("fs", fs_so().to_str().unwrap(), "fs", &[]).expect_err("no path");
    assert!(err.contains("path"), "{err}");
}

/// A get buffer that starts on a 4096-byte boundary (as the hot cache's arena blocks do), or 64 bytes
/// past one.
struct PageBuf {
    raw: Vec<u8>,
    off: usize,
    len: usize,
}

impl PageBuf {
    fn new(len: usize, aligned: bool) -> PageBuf {
        let raw = vec![0xA5u8; len + 8192];
        let base = (4096 - raw.as_ptr() as usize % 4096) % 4096;
        let off = if aligned { base } else { base + 64 };
        PageBuf { raw, off, len }
    }
}

impl kvhost::plugin::DstBuf for PageBuf {
    fn bytes_mut(&mut self) -> &mut [u8] {
        &mut self.raw[self.off..self.off + self.len]
    }
}

fn split_reads(p: &PluginBackend) -> u64 {
    let h = health(p);
    let n = h
        .split("split_reads=")
        .nth(1)
        .and_then(|s| s.split(',').next());
    n.and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no split_reads in {h}"))
}

/// Get `keys` in one request into buffers of `slack` bytes more than each chunk; check every byte, the
/// untouched slack, and the metadata.
fn get_exact(p: &PluginBackend, keys: &[ChunkKey], data: &[&Vec<u8>], aligned: bool, salt: i32) {
    let slack = 8192 + 5;
    let bufs = data
        .iter()
        .map(|d| PageBuf::new(d.len() + slack, aligned))
        .collect();
    let mut done = p
        .get_wait(
            GetRequest {
                keys: keys.to_vec(),
                bufs,
            },
            WAIT,
        )
        .expect("get completes");
    assert!(done.error.is_none(), "{:?}", done.error);
    for (i, (item, buf)) in done.items.iter().zip(&mut done.request.bufs).enumerate() {
        let d = data[i];
        let want = GetItem::Hit {
            len: d.len(),
            meta: meta(d.len(), salt),
        };
        assert_eq!(*item, want, "item {i} of {}", keys.len());
        let got = kvhost::plugin::DstBuf::bytes_mut(buf);
        assert!(
            got[..d.len()] == d[..],
            "bytes of item {i} ({} bytes)",
            d.len()
        );
        assert!(
            got[d.len()..].iter().all(|&b| b == 0xA5),
            "slack of item {i} was written"
        );
    }
}

#[test]
fn large_chunks_are_read_in_parts_by_several_io_threads() {
    let sizes = [4 << 20, (3 << 20) + 123, (8 << 20) + 4096, (1 << 20) + 1];
    let data: Vec<Vec<u8>> = sizes
        .iter()
        .enumerate()
        .map(|(i, &n)| bytes(400 + i as u64, n))
        .collect();
    for threads in ["1", "2", "3", "4"] {
        for direct in ["false", "true"] {
            let dir = TempDir::new("split");
            let opts = [("io_threads", threads), ("o_direct", direct)];
            let keys: Vec<ChunkKey> = (0..4).map(|i| fkey(9000 + i)).collect();
            {
                let p = must_load_fs(&dir, &opts);
                put_ok(&p, &keys, &data, 9);
            }
            // After a restart the first read of each chunk verifies its checksum (hashing the parts
            // in order); the reads after it do not.
            let p = must_load_fs(&dir, &opts);
            let n: usize = threads.parse().unwrap();
            let on = health(&p).contains("o_direct=on") || direct == "false";
            for (k, d) in keys.iter().zip(&data) {
                get_exact(&p, std::slice::from_ref(k), &[d], true, 9);
            }
            let first = if n == 1 { 0 } else { 3 };
            assert_eq!(split_reads(&p), first, "verifying first reads");
            for aligned in [true, false] {
                for (k, d) in keys.iter().zip(&data) {
                    get_exact(&p, std::slice::from_ref(k), &[d], aligned, 9);
                }
                get_exact(&p, &keys[..2], &[&data[0], &data[1]], aligned, 9);
                get_exact(&p, &keys, &data.iter().collect::<Vec<_>>(), aligned, 9);
            }
            // Single gets of the three chunks of 2 MiB or more, plus the 2-item get when 4 threads give
            // each item 2 ways; O_DIRECT splits only into aligned buffers.
            let per_round = 3 + if n >= 4 { 2 } else { 0 };
            let rounds = if direct == "true" && on { 1 } else { 2 };
            let want = first + if n == 1 { 0 } else { per_round * rounds };
            assert_eq!(
                split_reads(&p),
                want,
                "threads={threads} o_direct={direct}: split reads"
            );
        }
    }
}

#[test]
fn a_chunk_read_in_parts_that_was_truncated_or_swapped_is_never_served() {
    for direct in ["false", "true"] {
        let dir = TempDir::new("split-corrupt");
        let p = must_load_fs(&dir, &[("io_threads", "2"), ("o_direct", direct)]);
        let keys: Vec<ChunkKey> = (0..3).map(|i| fkey(9100 + i)).collect();
        let data: Vec<Vec<u8>> = (0..3).map(|i| bytes(500 + i, 4 << 20)).collect();
        put_ok(&p, &keys, &data, 4);
        for (k, d) in keys.iter().zip(&data) {
            get_exact(&p, std::slice::from_ref(k), &[d], true, 4);
        }
        let before = split_reads(&p);
        assert_eq!(before, 3, "o_direct={direct}: {}", health(&p));
        // 0: cut in the second half (read by the second part); 1: holds key 2's file.
        let f0 = file_of(&dir.0, &keys[0]);
        let len = std::fs::metadata(&f0).unwrap().len();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&f0)
            .unwrap()
            .set_len(len - (1 << 20))
            .unwrap();
        let f1 = file_of(&dir.0, &keys[1]);
        std::fs::copy(file_of(&dir.0, &keys[2]), &f1).unwrap();
        for k in &keys[..2] {
            let done = p
                .get_wait(
                    GetRequest {
                        keys: vec![k.clone()],
                        bufs: vec![PageBuf::new(4 << 20, true)],
                    },
                    WAIT,
                )
                .unwrap();
            assert_eq!(
                done.items[0],
                GetItem::Failed(Status::CORRUPT, String::new()),
                "o_direct={direct}: {k}"
            );
        }
        assert_eq!(split_reads(&p), before + 2, "both were read in parts");
        assert!(!f0.exists() && !f1.exists(), "corrupt files are removed");
        assert!(health(&p).contains("corrupt_on_read=2"), "{}", health(&p));
        get_exact(&p, &keys[2..], &[&data[2]], true, 4);
    }
}

#[test]
fn a_chunk_verified_in_parts_detects_a_flipped_byte_in_any_part() {
    let size = (6 << 20) + 321;
    // Bytes into the data: in the first part, in the middle one, in the last (partial) block.
    let flips = [17usize, 3 << 20, size - 5];
    for (direct, verify_reads) in [("false", "first"), ("true", "first"), ("false", "always")] {
        let dir = TempDir::new("split-verify");
        let opts = [
            ("io_threads", "3"),
            ("o_direct", direct),
            ("verify_reads", verify_reads),
        ];
        let keys: Vec<ChunkKey> = (0..4).map(|i| fkey(9200 + i)).collect();
        let data: Vec<Vec<u8>> = (0..4).map(|i| bytes(600 + i, size)).collect();
        {
            let p = must_load_fs(&dir, &opts);
            put_ok(&p, &keys, &data, 5);
        }
        for (k, &at) in keys.iter().zip(&flips) {
            let f = file_of(&dir.0, k);
            let mut raw = std::fs::read(&f).unwrap();
            raw[4096 + at] ^= 0x40;
            std::fs::write(&f, raw).unwrap();
        }
        // Unverified since the restart (or verify_reads=always): every read checks the data.
        let p = must_load_fs(&dir, &opts);
        for (i, k) in keys[..3].iter().enumerate() {
            let done = p
                .get_wait(
                    GetRequest {
                        keys: vec![k.clone()],
                        bufs: vec![PageBuf::new(size, true)],
                    },
                    WAIT,
                )
                .unwrap();
            assert_eq!(
                done.items[0],
                GetItem::Failed(Status::CORRUPT, String::new()),
                "o_direct={direct} verify_reads={verify_reads}: flip at {}",
                flips[i]
            );
        }
        get_exact(&p, &keys[3..], &[&data[3]], true, 5);
        get_exact(&p, &keys[3..], &[&data[3]], true, 5);
        let h = health(&p);
        assert!(h.contains("corrupt_on_read=3"), "{h}");
        assert_eq!(split_reads(&p), 5, "{h}");
        assert_eq!(chunk_files(&dir.0).len(), 1, "corrupt files are removed");
    }
}

#[test]
fn a_put_request_is_written_by_several_threads_and_made_visible_in_order() {
    for (threads, direct) in [("1", "false"), ("3", "false"), ("3", "true")] {
        let dir = TempDir::new("put-order");
        // 8 MiB of capacity: the 9 MiB chunk cannot fit; keys 1 and 5 are the same (the later wins).
        let p = must_load_fs(
            &dir,
            &[
                ("io_threads", threads),
                ("o_direct", direct),
                ("max_size_gib", "0.0078125"),
            ],
        );
        let keys: Vec<ChunkKey> = [0, 1, 2, 3, 4, 1].iter().map(|&n| fkey(9300 + n)).collect();
        let sizes = [1 << 20, 700_000, 4097, 9 << 20, 1 << 20, 300_000];
        let data: Vec<Vec<u8>> = sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| bytes(700 + i as u64, n))
            .collect();
        let st = put(&p, &keys, &data, 6);
        let want = [
            Status::OK,
            Status::OK,
            Status::OK,
            Status::NO_SPACE,
            Status::OK,
            Status::OK,
        ];
        assert_eq!(st, want, "io_threads={threads} o_direct={direct}");
        let unique = [0usize, 5, 2, 4];
        let ks: Vec<ChunkKey> = unique.iter().map(|&i| keys[i].clone()).collect();
        let ds: Vec<Vec<u8>> = unique.iter().map(|&i| data[i].clone()).collect();
        expect_hits(&p, &ks, &ds, 6);
        assert_eq!(
            get(&p, &keys[3..4], &[10 << 20]).0[0],
            GetItem::Miss,
            "the chunk that did not fit"
        );
        let h = health(&p);
        assert!(h.contains("reserved=0 "), "nothing stays reserved: {h}");
        assert_eq!(chunk_files(&dir.0).len(), 4, "{h}");
    }
}
