//! Unit tests of the store below the SDK layer (the integration tests in `tests/integration/fs.rs`
//! exercise the loaded `.so`).

use crate::format;
use crate::io::AlignedBuf;
use crate::pool::POOL_DIR;
use crate::store::{Fsync, IoBufs, ReadOutcome, Settings, Store};
use kvhost_plugin_sdk::{ChunkMeta, Status};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let p = std::env::temp_dir().join(format!(
            "kvhost-fs-unit-{}-{}-{tag}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn settings(root: &Path, o_direct: bool, simulate_no_direct: bool) -> Settings {
    Settings {
        root: root.to_path_buf(),
        capacity: 64 << 20,
        fsync: Fsync::None,
        shards: 16,
        scan_threads: 2,
        o_direct,
        verify_always: true,
        simulate_no_direct,
        pool_files: 0,
    }
}

fn meta(len: usize) -> ChunkMeta {
    ChunkMeta {
        length: len as u64,
        fmt: 1,
        dtype: 3,
        ndim: 2,
        shape: [7, len as i32, 0, 0],
        reserved: 0,
    }
}

fn bytes(seed: u64, len: usize) -> Vec<u8> {
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

fn put(store: &Store, canonical: &str, data: &[u8]) {
    let mut bufs = IoBufs::default();
    let h = format::key_hash_of(canonical);
    let s = store
        .stage(h, canonical, data, &meta(data.len()), &mut bufs)
        .unwrap();
    store.commit(s).unwrap();
}

/// Read into a destination at `offset` bytes past an aligned address (0 = aligned).
fn get(store: &Store, canonical: &str, cap: usize, offset: usize) -> (ReadOutcome, Vec<u8>) {
    let mut bufs = IoBufs::default();
    let mut dst = AlignedBuf::new(format::round_up((cap + offset) as u64) as usize);
    let d = &mut dst.as_mut()[offset..offset + cap];
    let h = format::key_hash_of(canonical);
    let out = store.read(h, canonical, d, &mut bufs);
    (out, d.to_vec())
}

const SIZES: [usize; 7] = [0, 1, 4095, 4096, 4097, 1 << 20, (9 << 20) + 5];

fn round_trips(store: &Store) {
    for (i, &n) in SIZES.iter().enumerate() {
        let k = format!("unit/model@1@0@{i:x}@half");
        let data = bytes(i as u64, n);
        put(store, &k, &data);
        for offset in [0, 8, 512] {
            let (out, got) = get(store, &k, n + 3, offset);
            assert_eq!(
                out,
                ReadOutcome::Hit {
                    len: n,
                    meta: meta(n)
                },
                "size {n} offset {offset}"
            );
            assert!(got[..n] == data[..], "bytes of size {n} offset {offset}");
        }
        if n > 0 {
            assert_eq!(get(store, &k, n - 1, 0).0, ReadOutcome::TooSmall(n as u64));
        }
    }
}

#[test]
fn buffered_round_trip() {
    let d = TempDir::new("buffered");
    let store = Store::open(settings(&d.0, false, false)).unwrap();
    assert_eq!(store.direct_state(), "off");
    round_trips(&store);
}

#[test]
fn direct_round_trip_and_files_are_padded() {
    let d = TempDir::new("direct");
    let store = Store::open(settings(&d.0, true, false)).unwrap();
    let state = store.direct_state();
    round_trips(&store);
    if state == "on" {
        let k = "unit/model@1@0@1@half";
        let p = store.path_of(format::key_hash_of(k), k);
        assert_eq!(std::fs::metadata(p).unwrap().len(), 8192, "padded to 4096");
    }
}

#[test]
fn direct_fallback_when_the_filesystem_refuses() {
    let d = TempDir::new("fallback");
    let store = Store::open(settings(&d.0, true, true)).unwrap();
    assert!(
        store.direct_state().starts_with("fallback"),
        "{}",
        store.direct_state()
    );
    round_trips(&store);
    assert!(store.health().unwrap().contains("o_direct=fallback"));
}

#[test]
fn files_written_one_way_read_the_other_way() {
    let d = TempDir::new("mixed");
    {
        let store = Store::open(settings(&d.0, false, false)).unwrap();
        for (i, &n) in SIZES.iter().enumerate() {
            put(&store, &format!("a@1@0@{i:x}@half"), &bytes(i as u64, n));
        }
    }
    {
        let store = Store::open(settings(&d.0, true, false)).unwrap();
        assert_eq!(store.start_report().chunks, SIZES.len());
        for (i, &n) in SIZES.iter().enumerate() {
            let (out, got) = get(&store, &format!("a@1@0@{i:x}@half"), n, 8);
            assert!(matches!(out, ReadOutcome::Hit { .. }), "{out:?}");
            assert!(got == bytes(i as u64, n));
            put(
                &store,
                &format!("b@1@0@{i:x}@half"),
                &bytes(100 + i as u64, n),
            );
        }
    }
    let store = Store::open(settings(&d.0, false, false)).unwrap();
    assert_eq!(store.start_report().chunks, 2 * SIZES.len());
    for (i, &n) in SIZES.iter().enumerate() {
        let (out, got) = get(&store, &format!("b@1@0@{i:x}@half"), n, 0);
        assert!(matches!(out, ReadOutcome::Hit { .. }), "{out:?}");
        assert!(got == bytes(100 + i as u64, n));
    }
}

#[test]
fn a_changed_shard_count_moves_files() {
    let d = TempDir::new("reshard");
    {
        let store = Store::open(settings(&d.0, false, false)).unwrap();
        for i in 0..50 {
            put(&store, &format!("m@1@0@{i:x}@half"), &bytes(i, 1000));
        }
    }
    let mut s = settings(&d.0, false, false);
    s.shards = 300;
    let store = Store::open(s).unwrap();
    let r = store.start_report();
    assert_eq!(r.chunks, 50);
    assert!(r.moved > 0);
    for i in 0..50 {
        let (out, got) = get(&store, &format!("m@1@0@{i:x}@half"), 1000, 0);
        assert!(matches!(out, ReadOutcome::Hit { len: 1000, .. }));
        assert!(got == bytes(i, 1000));
    }
}

#[test]
fn corrupt_data_is_reported_once_then_missing() {
    let d = TempDir::new("corrupt");
    let store = Store::open(settings(&d.0, false, false)).unwrap();
    let k = "c@1@0@1@half";
    put(&store, k, &bytes(1, 10_000));
    let p = store.path_of(format::key_hash_of(k), k);
    let mut raw = std::fs::read(&p).unwrap();
    raw[4096 + 5000] ^= 1;
    std::fs::write(&p, raw).unwrap();
    assert_eq!(
        get(&store, k, 10_000, 0).0,
        ReadOutcome::Failed(Status::CORRUPT)
    );
    assert!(!p.exists());
    assert_eq!(get(&store, k, 10_000, 0).0, ReadOutcome::Miss);
}

#[test]
fn with_verify_first_a_chunk_from_disk_is_checked_on_its_first_read() {
    let d = TempDir::new("verify-first");
    let mut s = settings(&d.0, false, false);
    s.verify_always = false;
    let (a, b) = ("v@1@0@a@half", "v@1@0@b@half");
    {
        let store = Store::open(s.clone()).unwrap();
        put(&store, a, &bytes(1, 300_000));
        put(&store, b, &bytes(2, 300_000));
        let pa = store.path_of(format::key_hash_of(a), a);
        drop(store);
        let mut raw = std::fs::read(&pa).unwrap();
        raw[4096 + 299_999] ^= 0x80;
        std::fs::write(&pa, raw).unwrap();
    }
    let store = Store::open(s).unwrap();
    assert_eq!(
        get(&store, a, 300_000, 0).0,
        ReadOutcome::Failed(Status::CORRUPT)
    );
    for _ in 0..2 {
        let (out, got) = get(&store, b, 300_000, 0);
        assert!(matches!(out, ReadOutcome::Hit { len: 300_000, .. }));
        assert!(got == bytes(2, 300_000));
    }
}

/// Settings with a pool of `n` files (filled by [`prep_all`] in these tests, as the backend's
/// background thread does).
fn pooled(root: &Path, o_direct: bool, n: usize) -> Settings {
    Settings {
        pool_files: n,
        ..settings(root, o_direct, false)
    }
}

/// Run the background preparation until it has nothing left to do.
fn prep_all(store: &Store) {
    while store.prep_step() {}
}

/// Files in the pool directory.
fn pool_dir_files(root: &Path) -> Vec<PathBuf> {
    match std::fs::read_dir(root.join(POOL_DIR)) {
        Ok(rd) => rd.flatten().map(|e| e.path()).collect(),
        Err(_) => Vec::new(),
    }
}

#[test]
fn preparation_makes_every_shard_directory_and_fills_the_pool() {
    let d = TempDir::new("prep");
    let store = Store::open(pooled(&d.0, false, 3)).unwrap();
    assert_eq!(store.pool().unwrap().len(), 0);
    prep_all(&store);
    assert_eq!(store.pool().unwrap().len(), 3);
    assert_eq!(pool_dir_files(&d.0).len(), 3);
    for shard in 0..16 {
        let dir = d.0.join(format::shard_dir_name(shard, 16));
        assert!(dir.is_dir(), "{} missing", dir.display());
    }
}

#[test]
fn puts_take_pool_files_and_read_back_in_both_modes() {
    for o_direct in [false, true] {
        let d = TempDir::new("pool-use");
        let store = Store::open(pooled(&d.0, o_direct, 2)).unwrap();
        for (i, &n) in SIZES.iter().enumerate() {
            prep_all(&store);
            let pool = store.pool().unwrap();
            assert_eq!(pool.len(), 2);
            let k = format!("p@1@0@{i:x}@half");
            let data = bytes(i as u64, n);
            put(&store, &k, &data);
            // The put used a pool file (renamed away), not a new one.
            assert_eq!(pool.len(), 1, "size {n} o_direct={o_direct}");
            assert_eq!(pool_dir_files(&d.0).len(), 1);
            let (out, got) = get(&store, &k, n, 0);
            assert!(matches!(out, ReadOutcome::Hit { .. }), "{out:?}");
            assert!(got == data, "size {n} o_direct={o_direct}");
        }
        drop(store);
        // A clean shutdown leaves no pool file; every chunk is found again.
        assert!(pool_dir_files(&d.0).is_empty());
        let store = Store::open(pooled(&d.0, o_direct, 2)).unwrap();
        assert_eq!(store.start_report().chunks, SIZES.len());
        assert_eq!(store.start_report().removed(), 0);
        for (i, &n) in SIZES.iter().enumerate() {
            let (out, got) = get(&store, &format!("p@1@0@{i:x}@half"), n, 8);
            assert!(matches!(out, ReadOutcome::Hit { .. }), "{out:?}");
            assert!(got == bytes(i as u64, n));
        }
    }
}

#[test]
fn a_put_into_a_shard_not_made_yet_creates_it() {
    let d = TempDir::new("pool-nodir");
    let store = Store::open(pooled(&d.0, false, 1)).unwrap();
    // Fill the pool only: the shard directories come after it.
    assert!(store.prep_step());
    assert_eq!(store.pool().unwrap().len(), 1);
    let k = "n@1@0@1@half";
    assert!(!store
        .path_of(format::key_hash_of(k), k)
        .parent()
        .unwrap()
        .exists());
    put(&store, k, &bytes(1, 5000));
    assert_eq!(store.pool().unwrap().len(), 0);
    let (out, got) = get(&store, k, 5000, 0);
    assert!(matches!(out, ReadOutcome::Hit { len: 5000, .. }), "{out:?}");
    assert!(got == bytes(1, 5000));
}

#[test]
fn leftover_pool_files_are_removed_at_start_and_never_served() {
    let d = TempDir::new("pool-crash");
    let k = "left@1@0@1@half";
    let data = bytes(3, 20_000);
    {
        let store = Store::open(pooled(&d.0, false, 2)).unwrap();
        prep_all(&store);
        put(&store, k, &data);
        // What a crash could leave: a complete, valid chunk file still under its pool name (its put
        // never committed), a half-written one, and an empty one.
        let p = store.path_of(format::key_hash_of(k), k);
        let pool = d.0.join(POOL_DIR);
        std::fs::copy(&p, pool.join("f0.tmp")).unwrap();
        std::fs::write(pool.join("f1.tmp"), &std::fs::read(&p).unwrap()[..6000]).unwrap();
        std::fs::write(pool.join("f2.tmp"), b"").unwrap();
        assert_eq!(store.remove(format::key_hash_of(k), k, false), Status::OK);
    }
    // The clean shutdown removed the pool's own files, not the three it does not know.
    assert_eq!(pool_dir_files(&d.0).len(), 3);
    let store = Store::open(pooled(&d.0, false, 2)).unwrap();
    let r = store.start_report();
    assert_eq!((r.chunks, r.temp_removed, r.corrupt_removed), (0, 3, 0));
    assert!(pool_dir_files(&d.0).is_empty());
    assert_eq!(get(&store, k, 20_000, 0).0, ReadOutcome::Miss);
    assert_eq!(store.contains(format::key_hash_of(k), k, false), Ok(None));
}

#[test]
fn flush_syncs_many_files_and_keeps_them_when_one_fails() {
    let d = TempDir::new("flush");
    let store = Store::open(settings(&d.0, false, false)).unwrap();
    let keys: Vec<String> = (0..40).map(|i| format!("f@1@0@{i:x}@half")).collect();
    for (i, k) in keys.iter().enumerate() {
        put(&store, k, &bytes(i as u64, 3000));
    }
    // One file replaced by a symlink loop: it cannot be opened, so flush fails and keeps its list.
    let bad = store.path_of(format::key_hash_of(&keys[17]), &keys[17]);
    std::fs::remove_file(&bad).unwrap();
    std::os::unix::fs::symlink(&bad, &bad).unwrap();
    let err = store.flush().unwrap_err();
    assert!(
        err.message.contains(&*bad.to_string_lossy()),
        "{}",
        err.message
    );
    assert!(store.flush().is_err(), "the failed flush forgot its files");
    std::fs::remove_file(&bad).unwrap();
    // A file gone by now is skipped; everything else is synced.
    store.flush().unwrap();
    store.flush().unwrap();
}

/// A buffered chunk file byte for byte: the header (checksummed over the data) at offset 0, the data
/// at `data_offset`, nothing after (the format as it has always been written).
fn expected_file(canonical: &str, data: &[u8]) -> Vec<u8> {
    let h = format::PendingHeader::new(
        format::key_hash_of(canonical),
        canonical,
        data.len() as u64,
        &meta(data.len()),
    );
    let mut hasher = h.hasher();
    hasher.update(data);
    let mut out = vec![0u8; h.data_offset() as usize];
    h.encode(hasher.digest(), &mut out);
    out.extend_from_slice(data);
    out
}

/// Sizes around the 1 MiB boundaries the buffered writes end on (the first write holds the header).
const EDGES: [usize; 8] = [
    0,
    1,
    (1 << 20) - 4097,
    (1 << 20) - 4096,
    (1 << 20) - 4095,
    (2 << 20) - 4096,
    4 << 20,
    (4 << 20) + 5,
];

#[test]
fn buffered_files_are_the_header_then_the_data() {
    let d = TempDir::new("layout");
    let store = Store::open(settings(&d.0, false, false)).unwrap();
    // A short key (data at 4096) and a long one (data at 8192).
    let long = "x".repeat(5000);
    for (i, &n) in EDGES.iter().enumerate() {
        for k in [
            format!("l@1@0@{i:x}@half"),
            format!("l@1@0@{i:x}{long}@half"),
        ] {
            let data = bytes(i as u64, n);
            put(&store, &k, &data);
            let raw = std::fs::read(store.path_of(format::key_hash_of(&k), &k)).unwrap();
            assert!(
                raw == expected_file(&k, &data),
                "file of {n} bytes, key of {}",
                k.len()
            );
        }
    }
}

/// Read `canonical` into a destination of `cap` bytes filled with 0xA5.
fn get_filled(store: &Store, canonical: &str, cap: usize) -> (ReadOutcome, Vec<u8>) {
    let mut bufs = IoBufs::default();
    let mut dst = vec![0xA5u8; cap];
    let h = format::key_hash_of(canonical);
    let out = store.read(h, canonical, &mut dst, &mut bufs);
    (out, dst)
}

#[test]
fn buffered_reads_write_nothing_past_the_chunk() {
    let sizes = [0, 1, 4095, 4096, (1 << 20) - 1, 1 << 20, (3 << 20) + 5];
    for verify_always in [false, true] {
        let d = TempDir::new("slack");
        let mut s = settings(&d.0, false, false);
        s.verify_always = verify_always;
        {
            let store = Store::open(s.clone()).unwrap();
            for (i, &n) in sizes.iter().enumerate() {
                put(&store, &format!("s@1@0@{i:x}@half"), &bytes(i as u64, n));
            }
        }
        // After a restart the first read of each chunk verifies it; the second does not (unless
        // verify_always).
        let store = Store::open(s).unwrap();
        for round in 0..2 {
            for (i, &n) in sizes.iter().enumerate() {
                let (out, got) = get_filled(&store, &format!("s@1@0@{i:x}@half"), n + 8197);
                let what = format!("size {n} verify_always={verify_always} round {round}");
                assert_eq!(
                    out,
                    ReadOutcome::Hit {
                        len: n,
                        meta: meta(n)
                    },
                    "{what}"
                );
                assert!(got[..n] == bytes(i as u64, n)[..], "bytes, {what}");
                assert!(got[n..].iter().all(|&b| b == 0xA5), "slack, {what}");
            }
        }
    }
}

#[test]
fn buffered_reads_of_truncated_files_or_another_key_are_corrupt() {
    let n = (2 << 20) + 7;
    for verify_always in [false, true] {
        let d = TempDir::new("truncated");
        let mut s = settings(&d.0, false, false);
        s.verify_always = verify_always;
        let store = Store::open(s).unwrap();
        // Cut in the fixed header, in the key, in the padding, at the data, in the first and the last
        // MiB of the data, one byte short.
        let cuts = [
            0,
            50,
            100,
            4000,
            4096,
            4096 + 1000,
            4096 + (2 << 20),
            4096 + n - 1,
        ];
        for (i, &cut) in cuts.iter().enumerate() {
            let k = format!("t@1@0@{i:x}@half");
            put(&store, &k, &bytes(i as u64, n));
            let p = store.path_of(format::key_hash_of(&k), &k);
            let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
            f.set_len(cut as u64).unwrap();
            drop(f);
            let what = format!("cut at {cut} verify_always={verify_always}");
            assert_eq!(
                get_filled(&store, &k, n + 10).0,
                ReadOutcome::Failed(Status::CORRUPT),
                "{what}"
            );
            assert!(!p.exists(), "{what}: removed");
            assert_eq!(get_filled(&store, &k, n + 10).0, ReadOutcome::Miss);
        }
        // A file holding another key (of the same length).
        let (a, b) = ("o@1@0@a@half", "o@1@0@b@half");
        put(&store, a, &bytes(1, n));
        put(&store, b, &bytes(2, n));
        let pa = store.path_of(format::key_hash_of(a), a);
        std::fs::copy(store.path_of(format::key_hash_of(b), b), &pa).unwrap();
        assert_eq!(
            get_filled(&store, a, n).0,
            ReadOutcome::Failed(Status::CORRUPT)
        );
        assert!(!pa.exists());
    }
}

#[test]
fn a_buffered_file_replaced_by_another_length_is_read_as_its_header_says() {
    // The file of a key is replaced by one of the same key and another length between the lookup
    // and the read (done here by copying it in behind the index's back).
    for verify_always in [false, true] {
        for (n_old, n_new) in [(300_000, 200_000), (200_000, 300_000), (5 << 20, 3 << 20)] {
            let (d, other) = (TempDir::new("replaced"), TempDir::new("replacement"));
            let mut s = settings(&d.0, false, false);
            s.verify_always = verify_always;
            let store = Store::open(s).unwrap();
            let k = "r@1@0@1@half";
            put(&store, k, &bytes(1, n_old));
            {
                let o = Store::open(settings(&other.0, false, false)).unwrap();
                put(&o, k, &bytes(2, n_new));
                let p = o.path_of(format::key_hash_of(k), k);
                std::fs::copy(p, store.path_of(format::key_hash_of(k), k)).unwrap();
            }
            let what = format!("{n_old} -> {n_new} verify_always={verify_always}");
            if n_new > n_old {
                assert_eq!(
                    get_filled(&store, k, n_old).0,
                    ReadOutcome::TooSmall(n_new as u64),
                    "{what}"
                );
            }
            let (out, got) = get_filled(&store, k, n_old.max(n_new) + 100);
            assert_eq!(
                out,
                ReadOutcome::Hit {
                    len: n_new,
                    meta: meta(n_new)
                },
                "{what}"
            );
            assert!(got[..n_new] == bytes(2, n_new)[..], "bytes, {what}");
            assert!(
                got[n_old.max(n_new)..].iter().all(|&b| b == 0xA5),
                "past both lengths, {what}"
            );
        }
    }
}
