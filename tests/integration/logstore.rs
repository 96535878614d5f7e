//! The C++ `logstore` plugin (`plugins/logstore`, built on `include/kvhost_plugin.hpp`) through the real
//! loader: conformance, the chain (promotion into the hot cache), restart (the index is rebuilt from the
//! file), ring overwrite when the file is full, and corrupted records after a restart.
//!
//! Every store lives in its own file under `<target>/<profile>/logstore-tests/<test>-<pid>/` (a real
//! disk file system, so `o_direct` works), removed when the test passes.

use crate::util::*;
use kvhost::chain::{Chain, PutOutcome};
use kvhost::config::Config;
use kvhost::plugin::{GetItem, PluginBackend, Presence, PutRequest};
use kvhost::ChunkKey;
use kvhost_plugin_sdk::Status;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

const MODULE: &str = "kvhost_logstore";
const CLASS: &str = "logstore";
const WAIT: Duration = Duration::from_secs(30);
/// 64 MiB stores unless a test needs a full one.
const SIZE_GIB: &str = "0.0625";
const BLOCK: u64 = 4096;

/// A directory for one test's store files; removed on drop unless the test is failing.
struct Dir(PathBuf);

impl Dir {
    fn new(test: &str) -> Dir {
        let dir = profile_dir()
            .join("logstore-tests")
            .join(format!("{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        Dir(dir)
    }
    fn file(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

fn options<'a>(
    file: &'a str,
    size_gib: &'a str,
    extra: &[(&'a str, &'a str)],
) -> Vec<(&'a str, &'a str)> {
    let mut o = vec![("path", file), ("size_gib", size_gib)];
    o.extend_from_slice(extra);
    o
}

fn open(file: &Path, size_gib: &str, extra: &[(&str, &str)]) -> PluginBackend {
    let file = file.to_str().unwrap();
    must_load("ls", MODULE, CLASS, &options(file, size_gib, extra))
}

fn try_open(file: &Path, size_gib: &str, extra: &[(&str, &str)]) -> Result<PluginBackend, String> {
    let file = file.to_str().unwrap();
    load("ls", MODULE, CLASS, &options(file, size_gib, extra))
}

fn put(p: &PluginBackend, items: &[(ChunkKey, u64, usize)]) {
    let request = PutRequest {
        keys: items.iter().map(|(k, _, _)| k.clone()).collect(),
        bufs: items.iter().map(|&(_, s, n)| bytes(s, n)).collect(),
        metas: items.iter().map(|&(_, s, n)| chunk_meta(s, n)).collect(),
    };
    let done = p.put_wait(request, WAIT).expect("put completes");
    assert!(done.error.is_none(), "put failed: {:?}", done.error);
    assert!(
        done.items.iter().all(|s| *s == Status::OK),
        "put items: {:?}",
        done.items
    );
}

fn health(p: &PluginBackend) -> String {
    p.health().expect("HEALTH capability").expect("healthy")
}

/* ---------------------------------------------------------------------------------------------- */
/* Conformance                                                                                    */
/* ---------------------------------------------------------------------------------------------- */

fn conformance(test: &str, extra: &[(&str, &str)]) {
    let dir = Dir::new(test);
    let n = AtomicUsize::new(0);
    let factory = || {
        // Each instance its own file: the suite makes several, some while others are alive.
        let file = dir.file(&format!(
            "store-{}.kvlog",
            n.fetch_add(1, Ordering::Relaxed)
        ));
        let file = file.to_str().unwrap().to_string();
        let c = config_for("logstore", MODULE, CLASS, &options(&file, SIZE_GIB, extra));
        kvhost::loader::load(&c.plugins[0], &c)
    };
    let report = kvhost::conformance::run(&factory);
    println!("conformance of logstore {extra:?}:\n{report}");
    assert!(
        report.passed(),
        "logstore failed conformance:\n{}",
        report.failures().join("\n")
    );
    assert!(report.checks.len() >= 12, "{report}");
    assert!(
        n.load(Ordering::Relaxed) >= 2,
        "the suite made a fresh instance after destroying one"
    );
}

#[test]
fn logstore_conforms() {
    conformance("conformance", &[]);
}

#[test]
fn logstore_conforms_with_o_direct_and_sync_always() {
    conformance(
        "conformance-direct",
        &[("o_direct", "true"), ("sync", "always")],
    );
}

/* ---------------------------------------------------------------------------------------------- */
/* The chain                                                                                      */
/* ---------------------------------------------------------------------------------------------- */

fn chain_on(file: &Path) -> Chain {
    let y = format!(
        "chunk_size: 16\nmax_local_cpu_size: 0.0625\nlocal_cpu_prefault: false\nblocking_timeout_secs: 10\n\
         storage_plugins: [ls]\nextra_config:\n  \
         storage_plugin.ls.module_path: {MODULE}\n  storage_plugin.ls.class_name: {CLASS}\n  \
         storage_plugin.ls.path: \"{}\"\n  storage_plugin.ls.size_gib: \"{SIZE_GIB}\"\n",
        file.display()
    );
    let config = Config::from_yaml(&y, None).unwrap_or_else(|e| panic!("{e}\n{y}"));
    Chain::from_config(&config).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn chain_promotes_from_logstore_into_the_hot_cache_also_after_a_restart() {
    let dir = Dir::new("chain");
    let file = dir.file("chain.kvlog");
    let keys: Vec<ChunkKey> = (0..4).map(|i| key(7000 + i)).collect();
    let data: Vec<Vec<u8>> = (0..4)
        .map(|i| bytes(i, 100_000 + i as usize * 4099))
        .collect();
    {
        let chain = chain_on(&file);
        for (k, d) in keys.iter().zip(&data) {
            let outcome = chain
                .put(std::slice::from_ref(k), &[d], &[chunk_meta(1, d.len())])
                .remove(0);
            assert_eq!(outcome, PutOutcome::Stored);
        }
        wait_drained(&chain);
        // Drop one from the hot cache only: the next get is served by logstore and promoted.
        assert!(chain.hot().remove(&keys[0]));
        let h = chain.get(&keys[..1]).remove(0).expect("logstore has it");
        assert_eq!(h.bytes(), &data[0][..]);
        assert_eq!(h.meta(), chunk_meta(1, data[0].len()));
        let stats = chain.stats();
        let ls = stats
            .tiers
            .iter()
            .find(|t| t.name == "ls")
            .expect("tier ls");
        assert_eq!((ls.promotions, ls.hits), (1, 1), "{ls:?}");
        assert!(chain.hot().contains(&keys[0]), "promoted");
        drop(h);
        let report = chain.close(Duration::from_secs(10));
        assert!(report.unfinished.is_empty(), "{report:?}");
    }
    // A new process' chain on the same file: the hot cache is empty, logstore still has everything.
    let chain = chain_on(&file);
    for (i, k) in keys.iter().enumerate() {
        let h = chain
            .get(std::slice::from_ref(k))
            .remove(0)
            .unwrap_or_else(|| panic!("key {i} after restart"));
        assert_eq!(h.bytes(), &data[i][..]);
    }
    let stats = chain.stats();
    let ls = stats.tiers.iter().find(|t| t.name == "ls").unwrap();
    assert_eq!(ls.promotions, 4, "{ls:?}");
    chain.close(Duration::from_secs(10));
}

/* ---------------------------------------------------------------------------------------------- */
/* Restart                                                                                        */
/* ---------------------------------------------------------------------------------------------- */

#[test]
fn restart_rebuilds_the_index_from_the_file() {
    let dir = Dir::new("restart");
    let file = dir.file("restart.kvlog");
    // Sizes around the 4 KiB block boundaries, an empty chunk, and a large one.
    let sizes = [0usize, 1, 4095, 4096, 4097, 65_536, 100_003, 1 << 20];
    let keys: Vec<ChunkKey> = (0..sizes.len()).map(|i| key(100 + i as i128)).collect();
    let replaced = key(200);
    let removed = key(201);
    {
        let p = open(&file, SIZE_GIB, &[]);
        let items: Vec<_> = keys
            .iter()
            .zip(sizes)
            .enumerate()
            .map(|(i, (k, n))| (k.clone(), i as u64, n))
            .collect();
        put(&p, &items);
        put(
            &p,
            &[(replaced.clone(), 50, 3000), (removed.clone(), 51, 3000)],
        );
        put(&p, &[(replaced.clone(), 52, 5000)]); // a newer generation of the same key
        assert_eq!(
            p.remove(std::slice::from_ref(&removed), false).unwrap(),
            vec![Status::OK]
        );
        p.flush().unwrap();
        assert!(
            health(&p).contains(&format!("{} chunks", sizes.len() + 1)),
            "{}",
            health(&p)
        );
    }
    let p = open(&file, SIZE_GIB, &[]);
    for (i, (k, n)) in keys.iter().zip(sizes).enumerate() {
        assert_chunk(&p, k, i as u64, n);
    }
    assert_chunk(&p, &replaced, 52, 5000);
    assert_absent(&p, &removed);
    assert!(
        health(&p).contains(&format!("{} chunks", sizes.len() + 1)),
        "{}",
        health(&p)
    );

    // It keeps working after the restart, and a second restart sees both generations of writes.
    let late = key(300);
    put(&p, &[(late.clone(), 60, 12_345)]);
    drop(p);
    let p = open(&file, SIZE_GIB, &[("verify_on_open", "false")]);
    assert_chunk(&p, &late, 60, 12_345);
    assert_chunk(&p, &keys[7], 7, 1 << 20);

    // clear is durable too.
    p.clear().unwrap();
    assert_absent(&p, &late);
    drop(p);
    let p = open(&file, SIZE_GIB, &[]);
    for k in keys.iter().chain([&replaced, &late]) {
        assert_absent(&p, k);
    }
    put(&p, &[(late.clone(), 61, 999)]);
    drop(p);
    assert_chunk(&open(&file, SIZE_GIB, &[]), &late, 61, 999);
}

#[test]
fn a_store_is_refused_when_it_cannot_be_used_safely() {
    let dir = Dir::new("refuse");
    let file = dir.file("refuse.kvlog");
    // Not a logstore file: left alone.
    std::fs::write(&file, b"precious data, not a logstore").unwrap();
    let e = try_open(&file, SIZE_GIB, &[]).expect_err("not a logstore file");
    assert!(
        e.contains("is not a logstore file") && e.contains("refusing to overwrite"),
        "{e}"
    );
    assert_eq!(
        std::fs::read(&file).unwrap(),
        b"precious data, not a logstore"
    );
    std::fs::remove_file(&file).unwrap();
    // Bad options.
    let e = try_open(&file, "lots", &[]).expect_err("bad size");
    assert!(e.contains("size_gib") && e.contains("lots"), "{e}");
    let e = try_open(&file, "0.0001", &[]).expect_err("below 1 MiB");
    assert!(e.contains("at least 1 MiB"), "{e}");
    let e = try_open(&file, SIZE_GIB, &[("sync", "sometimes")]).expect_err("bad sync");
    assert!(e.contains("'sync'"), "{e}");
    // One instance per file; and the size is fixed once formatted.
    let p = open(&file, SIZE_GIB, &[]);
    let e = try_open(&file, SIZE_GIB, &[]).expect_err("in use");
    assert!(e.contains("in use by another logstore instance"), "{e}");
    drop(p);
    let e = try_open(&file, "0.125", &[]).expect_err("other size");
    assert!(e.contains("was formatted with 67108864 bytes"), "{e}");
    drop(open(&file, SIZE_GIB, &[]));
}

#[test]
fn removes_and_clears_outrank_puts_queued_before_them() {
    let dir = Dir::new("outrank");
    let file = dir.file("outrank.kvlog");
    let (k1, k2, k3) = (key(41), key(42), key(43));
    let p = open(&file, SIZE_GIB, &[]);
    put(&p, &[(k1.clone(), 1, 1000)]);
    let (tx, rx) = std::sync::mpsc::channel();
    let submit = |items: &[(ChunkKey, u64, usize)]| {
        let tx = tx.clone();
        p.put(
            PutRequest {
                keys: items.iter().map(|(k, _, _)| k.clone()).collect(),
                bufs: items.iter().map(|&(_, s, n)| bytes(s, n)).collect(),
                metas: items.iter().map(|&(_, s, n)| chunk_meta(s, n)).collect(),
            },
            move |d| {
                tx.send(d.error.is_none() && d.items.iter().all(|s| *s == Status::OK))
                    .unwrap()
            },
        );
    };
    // An 8 MiB chunk keeps the I/O thread busy, so k1's second generation is usually still queued when
    // remove runs. Whichever comes first, k1 must end up removed: the tombstone outranks the queued put.
    submit(&[(key(40), 9, 8 << 20)]);
    submit(&[(k1.clone(), 2, 2000), (k2.clone(), 3, 3000)]);
    assert_eq!(
        p.remove(std::slice::from_ref(&k1), false).unwrap(),
        vec![Status::OK]
    );
    for _ in 0..2 {
        assert!(rx.recv_timeout(WAIT).unwrap(), "queued put failed");
    }
    assert_absent(&p, &k1);
    assert_chunk(&p, &k2, 3, 3000);
    // The same for clear: a put queued before it does not survive it.
    submit(&[(key(44), 9, 8 << 20)]);
    submit(&[(k3.clone(), 4, 4000)]);
    p.clear().unwrap();
    for _ in 0..2 {
        assert!(rx.recv_timeout(WAIT).unwrap(), "queued put failed");
    }
    for k in [&k1, &k2, &k3, &key(40), &key(44)] {
        assert_absent(&p, k);
    }
    // And the file agrees after a restart.
    drop(p);
    let p = open(&file, SIZE_GIB, &[]);
    for k in [&k1, &k2, &k3, &key(40), &key(44)] {
        assert_absent(&p, k);
    }
}

/* ---------------------------------------------------------------------------------------------- */
/* Ring overwrite                                                                                 */
/* ---------------------------------------------------------------------------------------------- */

/// Which of `keys` are stored; every hit must carry exactly its own bytes and metadata.
fn present(p: &PluginBackend, keys: &[(ChunkKey, u64, usize)]) -> Vec<bool> {
    keys.iter()
        .map(|(k, seed, len)| {
            let (item, buf) = get_chunks(p, std::slice::from_ref(k), *len).remove(0);
            match item {
                GetItem::Hit { len: got, meta: m } => {
                    assert_eq!((got, m), (*len, chunk_meta(*seed, *len)), "metadata of {k}");
                    assert!(
                        buf == bytes(*seed, *len),
                        "bytes of {k}: the ring served another record's data"
                    );
                    true
                }
                GetItem::Miss => false,
                other => panic!("{k}: {other:?}"),
            }
        })
        .collect()
}

#[test]
fn a_full_store_overwrites_its_oldest_chunks_like_a_ring() {
    let dir = Dir::new("ring");
    let file = dir.file("ring.kvlog");
    // 4 MiB: ~4 MiB of ring. Mostly small records (8-12 KiB with the 4 KiB header block), every tenth
    // ~900 KiB: the end of the file is hit at odd places, and the gap a wrap skips before a big record
    // holds whole small records of an older lap, which must stay dead, in memory and after a restart.
    let size = "0.00390625";
    let capacity = (4u64 << 20) - BLOCK;
    let max_chunk = 906 * 1024;
    let chunk = |i: u64| {
        if i % 10 == 9 {
            900 * 1024 + (i % 7) as usize * 1000
        } else {
            1 + ((i * 7919) % 8000) as usize
        }
    };
    let all: Vec<(ChunkKey, u64, usize)> = (0..300u64)
        .map(|i| (key(10_000 + i as i128), i, chunk(i)))
        .collect();
    let p = open(&file, size, &[]);
    for batch in all[..200].chunks(5) {
        put(&p, batch);
    }
    let seen = present(&p, &all[..200]);
    // FIFO: the stored keys are exactly the newest ones, and they fill most of the ring.
    let first = seen.iter().position(|&s| s).expect("something is stored");
    assert!(
        seen[first..].iter().all(|&s| s),
        "stored keys are not a suffix of the put order: {seen:?}"
    );
    assert!(
        first > 120,
        "old chunks were overwritten (first stored: {first})"
    );
    let record = |n: usize| BLOCK + (n as u64).div_ceil(BLOCK) * BLOCK;
    let kept: u64 = all[first..200].iter().map(|&(_, _, n)| record(n)).sum();
    assert!(
        kept <= capacity && kept + 2 * record(max_chunk as usize) > capacity,
        "{kept} of {capacity} bytes kept"
    );
    let text = health(&p);
    assert!(
        text.contains(&format!("{} chunks", 200 - first)) && !text.contains(" 0 evicted"),
        "{text}"
    );

    // After a restart the same chunks are live: the scan agrees with the ring.
    drop(p);
    let p = open(&file, size, &[]);
    assert_eq!(
        present(&p, &all[..200]),
        seen,
        "the index rebuilt from the file differs"
    );
    // The ring goes on from where it was, across more laps, with a restart in the middle of one.
    for batch in all[200..250].chunks(3) {
        put(&p, batch);
    }
    drop(p);
    let p = open(&file, size, &[("verify_on_open", "false")]);
    for batch in all[250..].chunks(4) {
        put(&p, batch);
    }
    let seen = present(&p, &all);
    let first = seen.iter().position(|&s| s).unwrap();
    assert!(seen[first..].iter().all(|&s| s) && first > 220, "{seen:?}");
    drop(p);
    assert_eq!(present(&open(&file, size, &[]), &all), seen);
}

/* ---------------------------------------------------------------------------------------------- */
/* Corruption                                                                                     */
/* ---------------------------------------------------------------------------------------------- */

/// Offset of the record holding `key` (its header magic, its canonical key at +128), and its data offset.
fn find_record(image: &[u8], key: &ChunkKey, newest: bool) -> (usize, usize) {
    let mut found = None;
    for off in (BLOCK as usize..image.len()).step_by(BLOCK as usize) {
        let h = &image[off..];
        if &h[..8] != b"KVHLREC1" {
            continue;
        }
        let key_len = u32::from_le_bytes(h[12..16].try_into().unwrap()) as usize;
        if key_len == key.as_str().len() && &h[128..128 + key_len] == key.as_str().as_bytes() {
            let data = u32::from_le_bytes(h[60..64].try_into().unwrap()) as usize;
            found = Some((off, off + data));
            if !newest {
                break;
            }
        }
    }
    found.unwrap_or_else(|| panic!("no record of {key} in the file"))
}

fn flip(file: &Path, offset: usize) {
    let mut image = std::fs::read(file).unwrap();
    image[offset] ^= 0x5A;
    std::fs::write(file, image).unwrap();
}

#[test]
fn corrupted_records_are_not_served_after_a_restart() {
    let dir = Dir::new("corrupt");
    let file = dir.file("corrupt.kvlog");
    let (a, b, c, d) = (key(1), key(2), key(3), key(4));
    {
        let p = open(&file, SIZE_GIB, &[]);
        put(
            &p,
            &[
                (a.clone(), 1, 70_000),
                (b.clone(), 2, 70_000),
                (c.clone(), 3, 70_000),
            ],
        );
        put(&p, &[(d.clone(), 4, 9000)]);
        put(&p, &[(d.clone(), 5, 9000)]); // d's second generation
        p.flush().unwrap();
    }
    let image = std::fs::read(&file).unwrap();
    let (a_header, _) = find_record(&image, &a, false);
    let (_, b_data) = find_record(&image, &b, false);
    let (_, d2_data) = find_record(&image, &d, true);
    drop(image);
    flip(&file, a_header + 20); // a: its sequence number (header CRC)
    flip(&file, b_data + 65_000); // b: a data byte (data CRC)
    flip(&file, d2_data + 10); // d: the newest generation's data

    // verify_on_open (the default) checks every record: a and b are gone, d falls back to its older
    // generation, c is intact.
    let p = open(&file, SIZE_GIB, &[]);
    assert_absent(&p, &a);
    assert_absent(&p, &b);
    assert_chunk(&p, &c, 3, 70_000);
    assert_chunk(&p, &d, 4, 9000);
    assert!(
        health(&p).contains("1 corrupt") || health(&p).contains("2 corrupt"),
        "{}",
        health(&p)
    );
    drop(p);

    // Without verify_on_open only headers are checked at open: b (and d's newest generation) are indexed,
    // but get verifies the CRC, refuses the bytes with CORRUPT and forgets the record.
    let p = open(&file, SIZE_GIB, &[("verify_on_open", "false")]);
    assert_absent(&p, &a);
    assert!(matches!(
        p.contains(std::slice::from_ref(&b), false).unwrap()[0],
        Presence::Present(_)
    ));
    match get_chunks(&p, std::slice::from_ref(&b), 70_000).remove(0).0 {
        GetItem::Failed(status, _) => assert_eq!(status, Status::CORRUPT),
        other => panic!("corrupted b was served: {other:?}"),
    }
    assert_absent(&p, &b);
    match get_chunks(&p, std::slice::from_ref(&d), 9000).remove(0).0 {
        GetItem::Failed(status, _) => assert_eq!(status, Status::CORRUPT),
        other => panic!("corrupted d was served: {other:?}"),
    }
    assert_chunk(&p, &c, 3, 70_000);
}
