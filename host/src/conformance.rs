//! The plugin conformance suite: checks that any loaded plugin keeps the ABI's promises.
//!
//! Each check gets fresh keys (and, where it destroys its backend, a fresh instance from the factory).
//! A plugin advertising `KVH_CAP_DISCARDS` is checked for consistent misses instead of round trips.

use crate::key::ChunkKey;
use crate::loader::LoadError;
use crate::plugin::{GetItem, GetRequest, PluginBackend, Presence, PutRequest};
use kvhost_plugin_sdk::abi;
use kvhost_plugin_sdk::{ChunkMeta, Status};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The outcome of one check.
#[derive(Clone, Debug)]
pub struct CheckResult {
    /// Check name.
    pub name: &'static str,
    /// Passed, failed, or skipped (not applicable to this plugin's capabilities).
    pub outcome: Outcome,
    /// What was seen.
    pub detail: String,
}

/// Pass, fail or skip.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The plugin kept its promise.
    Pass,
    /// It did not.
    Fail,
    /// The check does not apply (capability not advertised).
    Skip,
}

/// All checks of one run.
#[derive(Clone, Debug, Default)]
pub struct Report {
    /// In order.
    pub checks: Vec<CheckResult>,
}

impl Report {
    /// No check failed.
    pub fn passed(&self) -> bool {
        self.checks.iter().all(|c| c.outcome != Outcome::Fail)
    }

    /// The failed checks, one line each.
    pub fn failures(&self) -> Vec<String> {
        self.checks
            .iter()
            .filter(|c| c.outcome == Outcome::Fail)
            .map(|c| format!("{}: {}", c.name, c.detail))
            .collect()
    }
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for c in &self.checks {
            let tag = match c.outcome {
                Outcome::Pass => "PASS",
                Outcome::Fail => "FAIL",
                Outcome::Skip => "SKIP",
            };
            writeln!(f, "{tag}  {:<22} {}", c.name, c.detail)?;
        }
        let (p, fl, s) = self
            .checks
            .iter()
            .fold((0, 0, 0), |(p, f, s), c| match c.outcome {
                Outcome::Pass => (p + 1, f, s),
                Outcome::Fail => (p, f + 1, s),
                Outcome::Skip => (p, f, s + 1),
            });
        write!(f, "{p} passed, {fl} failed, {s} skipped")
    }
}

/// Makes a fresh instance of the plugin under test.
pub type Factory<'a> = dyn Fn() -> Result<PluginBackend, LoadError> + Sync + 'a;

/// How long to wait for any single completion before calling it a hang.
const WAIT: Duration = Duration::from_secs(20);

struct Ctx<'a> {
    factory: &'a Factory<'a>,
    plugin: PluginBackend,
    discards: bool,
    run_id: u64,
    next: AtomicUsize,
}

type CheckFn = fn(&Ctx<'_>) -> Result<String, String>;

/// Run every check.
pub fn run(factory: &Factory<'_>) -> Report {
    let mut report = Report::default();
    let plugin = match factory() {
        Ok(p) => p,
        Err(e) => {
            report.checks.push(CheckResult {
                name: "create",
                outcome: Outcome::Fail,
                detail: e.to_string(),
            });
            return report;
        }
    };
    let info = plugin.info().clone();
    report.checks.push(CheckResult {
        name: "create",
        outcome: Outcome::Pass,
        detail: format!(
            "class {} v{} ABI {}.{}",
            info.class_name, info.version, info.abi.0, info.abi.1
        ),
    });
    let ctx = Ctx {
        factory,
        discards: plugin.has(abi::KVH_CAP_DISCARDS),
        plugin,
        run_id: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64),
        next: AtomicUsize::new(0),
    };
    let checks: &[(&'static str, Option<u64>, CheckFn)] = &[
        ("round_trip", None, round_trip),
        ("empty_batches", None, empty_batches),
        ("duplicate_keys", None, duplicate_keys),
        ("mixed_hits_and_misses", None, mixed_hits),
        ("buffer_too_small", None, buffer_too_small),
        ("exactly_once", None, exactly_once),
        ("concurrency", None, concurrency),
        ("pin_unpin", Some(abi::KVH_CAP_PIN), pin_unpin),
        ("prefetch", Some(abi::KVH_CAP_PREFETCH), prefetch),
        ("flush", Some(abi::KVH_CAP_FLUSH), flush),
        ("health", Some(abi::KVH_CAP_HEALTH), health),
        ("clear", Some(abi::KVH_CAP_CLEAR), clear),
        (
            "contains_async",
            Some(abi::KVH_CAP_ASYNC_CONTAINS),
            contains_async,
        ),
        (
            "remove_async",
            Some(abi::KVH_CAP_ASYNC_REMOVE),
            remove_async,
        ),
        ("destroy_in_flight", None, destroy_in_flight),
    ];
    for &(name, cap, check) in checks {
        if let Some(bit) = cap {
            if !ctx.plugin.has(bit) {
                report.checks.push(CheckResult {
                    name,
                    outcome: Outcome::Skip,
                    detail: "capability not advertised".into(),
                });
                continue;
            }
        }
        let stale_before = ctx.plugin.stale_completions();
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| check(&ctx)))
            .unwrap_or_else(|_| Err("the check panicked (see stderr)".to_string()));
        let stale = ctx.plugin.stale_completions() - stale_before;
        let result = match result {
            Ok(_) if stale > 0 => Err(format!(
                "{stale} completion(s) for operations that were not pending"
            )),
            r => r,
        };
        let (outcome, detail) = match result {
            Ok(d) => (Outcome::Pass, d),
            Err(d) => (Outcome::Fail, d),
        };
        report.checks.push(CheckResult {
            name,
            outcome,
            detail,
        });
    }
    report
}

impl Ctx<'_> {
    fn key(&self) -> ChunkKey {
        let n = self.next.fetch_add(1, Ordering::Relaxed) as i128;
        let hash =
            ((self.run_id as i128) << 20) ^ (n * 0x9e37_79b9) ^ if n % 2 == 0 { 0 } else { -1 };
        ChunkKey::build(
            "conformance/model",
            2,
            1,
            hash,
            "bfloat16",
            None,
            &[("suite", "conformance")],
        )
        .expect("valid key")
    }

    fn put(&self, keys: Vec<ChunkKey>, bufs: Vec<Vec<u8>>) -> Result<Vec<Status>, String> {
        let metas = bufs.iter().map(|b| meta_for(b.len())).collect();
        let done = self
            .plugin
            .put_wait(PutRequest { keys, bufs, metas }, WAIT)
            .map_err(|e| e.to_string())?;
        if let Some(e) = done.error {
            return Err(e.to_string());
        }
        Ok(done.items)
    }

    fn get(
        &self,
        keys: Vec<ChunkKey>,
        caps: Vec<usize>,
    ) -> Result<(Vec<GetItem>, Vec<Vec<u8>>), String> {
        let bufs = caps.into_iter().map(|c| vec![0xA5u8; c]).collect();
        let done = self
            .plugin
            .get_wait(GetRequest { keys, bufs }, WAIT)
            .map_err(|e| e.to_string())?;
        if let Some(e) = done.error {
            return Err(e.to_string());
        }
        Ok((done.items, done.request.bufs))
    }

    fn expect_put_ok(&self, keys: Vec<ChunkKey>, bufs: Vec<Vec<u8>>) -> Result<(), String> {
        let items = self.put(keys, bufs)?;
        match items.iter().position(|s| *s != Status::OK) {
            Some(i) => Err(format!("put item {i}: {}", items[i])),
            None => Ok(()),
        }
    }
}

/// Deterministic, key-specific bytes.
fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Non-trivial metadata, so a plugin that drops fields is caught.
fn meta_for(len: usize) -> ChunkMeta {
    ChunkMeta {
        length: len as u64,
        fmt: abi::KVH_FMT_KV_2LTD,
        dtype: abi::KVH_DTYPE_BFLOAT16,
        ndim: 4,
        shape: [2, 3, (len % 1000) as i32 + 1, 7],
        reserved: 0,
    }
}

fn round_trip(c: &Ctx<'_>) -> Result<String, String> {
    let sizes = [1usize, 4096 + 3, 256 * 1024];
    let keys: Vec<_> = sizes.iter().map(|_| c.key()).collect();
    let bufs: Vec<_> = sizes
        .iter()
        .enumerate()
        .map(|(i, &n)| pattern(i as u64 + 7, n))
        .collect();
    c.expect_put_ok(keys.clone(), bufs.clone())?;
    let presence = c.plugin.contains(&keys, false).map_err(|e| e.to_string())?;
    let (items, got) = c.get(keys.clone(), sizes.to_vec())?;
    if c.discards {
        if presence.iter().any(|p| *p != Presence::Absent)
            || items.iter().any(|i| *i != GetItem::Miss)
        {
            return Err(format!(
                "a discarding plugin reported a hit: {presence:?} {items:?}"
            ));
        }
        return Ok("discarding plugin: puts accepted, every lookup misses".to_string());
    }
    for (i, p) in presence.iter().enumerate() {
        if *p != Presence::Present(meta_for(sizes[i])) {
            return Err(format!(
                "contains item {i}: expected present with the stored metadata, got {p:?}"
            ));
        }
    }
    for (i, item) in items.iter().enumerate() {
        match item {
            GetItem::Hit { len, meta } if *len == sizes[i] && *meta == meta_for(sizes[i]) => {
                if got[i][..*len] != bufs[i][..] {
                    return Err(format!("get item {i}: bytes differ from what was put"));
                }
            }
            other => return Err(format!("get item {i} ({} bytes): {other:?}", sizes[i])),
        }
    }
    let removed = c.plugin.remove(&keys, false).map_err(|e| e.to_string())?;
    if removed.iter().any(|s| *s != Status::OK) {
        return Err(format!("remove of stored keys: {removed:?}"));
    }
    let after = c.plugin.contains(&keys, false).map_err(|e| e.to_string())?;
    if after.iter().any(|p| *p != Presence::Absent) {
        return Err(format!("contains after remove: {after:?}"));
    }
    let (items, _) = c.get(keys.clone(), sizes.to_vec())?;
    if items.iter().any(|i| *i != GetItem::Miss) {
        return Err(format!("get after remove: {items:?}"));
    }
    let again = c
        .plugin
        .remove(&keys[..1], true)
        .map_err(|e| e.to_string())?;
    if again[0] != Status::NOT_FOUND {
        return Err(format!(
            "second remove: expected NOT_FOUND, got {}",
            again[0]
        ));
    }
    Ok(format!(
        "{} chunks ({} bytes) put, found, read back exactly with metadata, removed",
        sizes.len(),
        sizes.iter().sum::<usize>()
    ))
}

fn empty_batches(c: &Ctx<'_>) -> Result<String, String> {
    c.plugin
        .contains(&[], true)
        .map_err(|e| format!("contains: {e}"))?;
    c.plugin
        .remove(&[], true)
        .map_err(|e| format!("remove: {e}"))?;
    let items = c.put(Vec::new(), Vec::new())?;
    let (got, _) = c.get(Vec::new(), Vec::new())?;
    if !items.is_empty() || !got.is_empty() {
        return Err("empty batches returned items".to_string());
    }
    if c.plugin.has(abi::KVH_CAP_PIN) {
        c.plugin.pin(&[]).map_err(|e| format!("pin: {e}"))?;
        c.plugin.unpin(&[]).map_err(|e| format!("unpin: {e}"))?;
    }
    if c.plugin.has(abi::KVH_CAP_PREFETCH) {
        let d = c
            .plugin
            .prefetch_wait(Vec::new(), WAIT)
            .map_err(|e| e.to_string())?;
        if let Some(e) = d.error {
            return Err(format!("prefetch: {e}"));
        }
    }
    Ok("every operation accepts an empty batch".to_string())
}

fn duplicate_keys(c: &Ctx<'_>) -> Result<String, String> {
    let k = c.key();
    let (a, b) = (pattern(1, 1000), pattern(2, 1000));
    c.expect_put_ok(vec![k.clone(), k.clone()], vec![a.clone(), b.clone()])?;
    let (items, got) = c.get(vec![k.clone(), k.clone()], vec![1000, 1000])?;
    if c.discards {
        return if items.iter().all(|i| *i == GetItem::Miss) {
            Ok("misses".into())
        } else {
            Err(format!("{items:?}"))
        };
    }
    for (i, item) in items.iter().enumerate() {
        if !matches!(item, GetItem::Hit { len: 1000, .. }) || (got[i] != a && got[i] != b) {
            return Err(format!(
                "get item {i} after a duplicate put: {item:?} (must be one of the two values)"
            ));
        }
    }
    c.plugin.remove(&[k], true).map_err(|e| e.to_string())?;
    Ok("a key twice in one put and one get is handled".to_string())
}

fn mixed_hits(c: &Ctx<'_>) -> Result<String, String> {
    let keys: Vec<_> = (0..4).map(|_| c.key()).collect();
    c.expect_put_ok(
        vec![keys[0].clone(), keys[2].clone()],
        vec![pattern(3, 333), pattern(4, 444)],
    )?;
    let presence = c.plugin.contains(&keys, false).map_err(|e| e.to_string())?;
    let (items, _) = c.get(keys.clone(), vec![333, 500, 444, 10])?;
    c.plugin.remove(&keys, true).map_err(|e| e.to_string())?;
    let expect_hit = [!c.discards, false, !c.discards, false];
    for i in 0..4 {
        let hit = matches!(presence[i], Presence::Present(_));
        let got = matches!(items[i], GetItem::Hit { .. });
        let miss = presence[i] == Presence::Absent && items[i] == GetItem::Miss;
        if hit != expect_hit[i] || got != expect_hit[i] || (!expect_hit[i] && !miss) {
            return Err(format!(
                "item {i}: contains {:?}, get {:?}",
                presence[i], items[i]
            ));
        }
    }
    Ok("hits and misses in one batch are reported per item".to_string())
}

fn buffer_too_small(c: &Ctx<'_>) -> Result<String, String> {
    if c.discards {
        return Ok("not applicable to a discarding plugin (nothing is ever read)".to_string());
    }
    let k = c.key();
    let data = pattern(9, 5000);
    c.expect_put_ok(vec![k.clone()], vec![data.clone()])?;
    let (items, _) = c.get(vec![k.clone(), k.clone()], vec![4999, 0])?;
    for (i, item) in items.iter().enumerate() {
        if *item != (GetItem::TooSmall { needed: 5000 }) {
            return Err(format!("get into a too-small buffer (item {i}): expected TooSmall{{needed: 5000}}, got {item:?}"));
        }
    }
    let (items, got) = c.get(vec![k.clone()], vec![5000])?;
    if !matches!(items[0], GetItem::Hit { len: 5000, .. }) || got[0] != data {
        return Err(format!("get with the exact size: {:?}", items[0]));
    }
    c.plugin.remove(&[k], true).map_err(|e| e.to_string())?;
    Ok("BUFFER_TOO_SMALL reports the exact size needed".to_string())
}

fn exactly_once(c: &Ctx<'_>) -> Result<String, String> {
    let n = 64;
    let fired = Arc::new(AtomicUsize::new(0));
    let keys: Vec<_> = (0..n).map(|_| c.key()).collect();
    for (i, k) in keys.iter().enumerate() {
        let f = fired.clone();
        let data = pattern(i as u64, 64 + i);
        let metas = vec![meta_for(data.len())];
        c.plugin.put(
            PutRequest {
                keys: vec![k.clone()],
                bufs: vec![data],
                metas,
            },
            move |_| {
                f.fetch_add(1, Ordering::AcqRel);
            },
        );
        let f = fired.clone();
        c.plugin.get(
            GetRequest {
                keys: vec![k.clone()],
                bufs: vec![vec![0u8; 256]],
            },
            move |_| {
                f.fetch_add(1, Ordering::AcqRel);
            },
        );
    }
    let deadline = Instant::now() + WAIT;
    while fired.load(Ordering::Acquire) < 2 * n && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(2));
    }
    // Give a second (wrong) completion time to show up.
    std::thread::sleep(Duration::from_millis(100));
    let total = fired.load(Ordering::Acquire);
    c.plugin.remove(&keys, true).map_err(|e| e.to_string())?;
    if total != 2 * n {
        return Err(format!(
            "{} operations submitted, {total} completions",
            2 * n
        ));
    }
    if c.plugin.pending_ops() != 0 {
        return Err(format!(
            "{} operations still pending",
            c.plugin.pending_ops()
        ));
    }
    Ok(format!("{} operations, {total} completions", 2 * n))
}

fn concurrency(c: &Ctx<'_>) -> Result<String, String> {
    let threads = 4;
    let rounds = 50;
    let errors = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                s.spawn(move || -> Result<(), String> {
                    for r in 0..rounds {
                        let k = c.key();
                        let data = pattern((t * 1000 + r) as u64, 1024 + r);
                        c.expect_put_ok(vec![k.clone()], vec![data.clone()])?;
                        let (items, got) = c.get(vec![k.clone()], vec![data.len()])?;
                        let ok = if c.discards {
                            items[0] == GetItem::Miss
                        } else {
                            got[0] == data
                        };
                        if !ok {
                            return Err(format!("thread {t} round {r}: {:?}", items[0]));
                        }
                        c.plugin
                            .contains(std::slice::from_ref(&k), false)
                            .map_err(|e| e.to_string())?;
                        c.plugin.remove(&[k], true).map_err(|e| e.to_string())?;
                    }
                    Ok(())
                })
            })
            .collect();
        handles
            .into_iter()
            .filter_map(|h| h.join().unwrap_or(Err("thread panicked".into())).err())
            .collect::<Vec<_>>()
    });
    match errors.first() {
        Some(e) => Err(e.clone()),
        None => Ok(format!(
            "{threads} threads x {rounds} put/get/contains/remove rounds"
        )),
    }
}

fn pin_unpin(c: &Ctx<'_>) -> Result<String, String> {
    let (k, absent) = (c.key(), c.key());
    c.expect_put_ok(vec![k.clone()], vec![pattern(5, 100)])?;
    let pinned = c
        .plugin
        .pin(&[k.clone(), absent.clone()])
        .map_err(|e| e.to_string())?;
    let unpinned = c
        .plugin
        .unpin(std::slice::from_ref(&k))
        .map_err(|e| e.to_string())?;
    let via_contains = c
        .plugin
        .contains(std::slice::from_ref(&k), true)
        .map_err(|e| e.to_string())?;
    c.plugin
        .unpin(std::slice::from_ref(&k))
        .map_err(|e| e.to_string())?;
    c.plugin.remove(&[k], true).map_err(|e| e.to_string())?;
    if pinned[0] != Status::OK || unpinned[0] != Status::OK {
        return Err(format!(
            "pin/unpin of a stored key: {pinned:?} / {unpinned:?}"
        ));
    }
    if !matches!(pinned[1], Status::OK | Status::NOT_FOUND) {
        return Err(format!("pin of an absent key: {}", pinned[1]));
    }
    if !c.discards && !matches!(via_contains[0], Presence::Present(_)) {
        return Err(format!(
            "contains(pin) of a stored key: {:?}",
            via_contains[0]
        ));
    }
    Ok("pin, unpin and contains(pin) behave".to_string())
}

fn prefetch(c: &Ctx<'_>) -> Result<String, String> {
    let (k, absent) = (c.key(), c.key());
    c.expect_put_ok(vec![k.clone()], vec![pattern(6, 100)])?;
    let d = c
        .plugin
        .prefetch_wait(vec![k.clone(), absent], WAIT)
        .map_err(|e| e.to_string())?;
    c.plugin.remove(&[k], true).map_err(|e| e.to_string())?;
    if let Some(e) = d.error {
        return Err(e.to_string());
    }
    let expect_first = if c.discards {
        Status::NOT_FOUND
    } else {
        Status::OK
    };
    if d.items[0] != expect_first || d.items[1] != Status::NOT_FOUND {
        return Err(format!("prefetch of [stored, absent]: {:?}", d.items));
    }
    Ok("prefetch reports stored and absent keys".to_string())
}

fn flush(c: &Ctx<'_>) -> Result<String, String> {
    c.expect_put_ok(vec![c.key()], vec![pattern(7, 10)])?;
    c.plugin.flush().map_err(|e| e.to_string())?;
    Ok("flush succeeds".to_string())
}

fn clear(c: &Ctx<'_>) -> Result<String, String> {
    let plugin = (c.factory)().map_err(|e| format!("fresh instance: {e}"))?;
    let keys: Vec<_> = (0..3).map(|_| c.key()).collect();
    let metas = keys.iter().map(|_| meta_for(64)).collect();
    let done = plugin
        .put_wait(
            PutRequest {
                keys: keys.clone(),
                bufs: vec![pattern(1, 64); 3],
                metas,
            },
            WAIT,
        )
        .map_err(|e| e.to_string())?;
    if let Some(e) = done.error {
        return Err(e.to_string());
    }
    plugin.clear().map_err(|e| e.to_string())?;
    let after = plugin.contains(&keys, false).map_err(|e| e.to_string())?;
    if after.iter().any(|p| *p != Presence::Absent) {
        return Err(format!("contains after clear: {after:?}"));
    }
    Ok("clear removes everything".to_string())
}

/// `contains_async` answers exactly what `contains` answers, for many lookups in flight at once.
fn contains_async(c: &Ctx<'_>) -> Result<String, String> {
    let sizes = [1usize, 4096 + 3, 256 * 1024];
    let stored: Vec<_> = sizes.iter().map(|_| c.key()).collect();
    let bufs = sizes
        .iter()
        .enumerate()
        .map(|(i, &n)| pattern(i as u64 + 11, n))
        .collect();
    c.expect_put_ok(stored.clone(), bufs)?;
    // Stored and absent keys interleaved.
    let mut keys = Vec::new();
    for k in &stored {
        keys.push(k.clone());
        keys.push(c.key());
    }
    let sync = c.plugin.contains(&keys, false).map_err(|e| e.to_string())?;
    let lookups = 16;
    let (tx, rx) = crossbeam_channel::unbounded();
    for i in 0..lookups {
        let tx = tx.clone();
        c.plugin.contains_async(keys.clone(), false, move |d| {
            let _ = tx.send((i, d));
        });
    }
    for _ in 0..lookups {
        let (i, d) = rx
            .recv_timeout(WAIT)
            .map_err(|_| format!("a lookup did not complete within {WAIT:?}"))?;
        if let Some(e) = d.error {
            return Err(format!("lookup {i}: {e}"));
        }
        if d.items != sync {
            return Err(format!(
                "lookup {i}: contains_async says {:?}, contains says {sync:?}",
                d.items
            ));
        }
    }
    if rx.recv_timeout(Duration::from_millis(200)).is_ok() {
        return Err("a lookup completed twice".to_string());
    }
    for (i, p) in sync.iter().enumerate() {
        let want = if i % 2 == 1 || c.discards {
            Presence::Absent
        } else {
            Presence::Present(meta_for(sizes[i / 2]))
        };
        if *p != want {
            return Err(format!("key {i}: expected {want:?}, got {p:?}"));
        }
    }
    let empty = c
        .plugin
        .contains_wait(&[], false, WAIT)
        .map_err(|e| format!("empty batch: {e}"))?;
    if !empty.is_empty() {
        return Err("an empty lookup returned items".to_string());
    }
    if c.plugin.has(abi::KVH_CAP_PIN) && !c.discards {
        let pinned = c
            .plugin
            .contains_wait(&stored, true, WAIT)
            .map_err(|e| format!("pinning lookup: {e}"))?;
        if pinned.iter().any(|p| !matches!(p, Presence::Present(_))) {
            return Err(format!("pinning lookup: {pinned:?}"));
        }
        let unpinned = c.plugin.unpin(&stored).map_err(|e| e.to_string())?;
        if unpinned.iter().any(|s| *s != Status::OK) {
            return Err(format!("unpin after a pinning async lookup: {unpinned:?}"));
        }
    }
    c.plugin.remove(&stored, true).map_err(|e| e.to_string())?;
    Ok(format!(
        "{lookups} lookups of {} keys in flight at once agree with contains",
        keys.len()
    ))
}

/// `remove_async` removes: afterwards both lookups and gets miss, and a second remove finds nothing.
fn remove_async(c: &Ctx<'_>) -> Result<String, String> {
    let keys: Vec<_> = (0..3).map(|_| c.key()).collect();
    c.expect_put_ok(keys.clone(), vec![pattern(5, 4096 + 1); 3])?;
    let removed = c
        .plugin
        .remove_wait(&keys, false, WAIT)
        .map_err(|e| e.to_string())?;
    // A discarding plugin may answer either; any other must have removed every key.
    let fine = |s: &Status| *s == Status::OK || (c.discards && *s == Status::NOT_FOUND);
    if !removed.iter().all(fine) {
        return Err(format!("remove_async of stored keys: {removed:?}"));
    }
    let after = c.plugin.contains(&keys, false).map_err(|e| e.to_string())?;
    if after.iter().any(|p| *p != Presence::Absent) {
        return Err(format!("contains after remove_async: {after:?}"));
    }
    let (items, _) = c.get(keys.clone(), vec![8192; 3])?;
    if items.iter().any(|i| *i != GetItem::Miss) {
        return Err(format!("get after remove_async: {items:?}"));
    }
    let again = c
        .plugin
        .remove_wait(&keys[..1], true, WAIT)
        .map_err(|e| e.to_string())?;
    if again[0] != Status::NOT_FOUND {
        return Err(format!(
            "second remove_async: expected NOT_FOUND, got {}",
            again[0]
        ));
    }
    c.plugin
        .remove_wait(&[], true, WAIT)
        .map_err(|e| format!("empty batch: {e}"))?;
    Ok("removed keys are gone from contains and get; a second remove finds nothing".to_string())
}

fn health(c: &Ctx<'_>) -> Result<String, String> {
    match c.plugin.health() {
        Some(Ok(text)) => Ok(format!("healthy: {text}")),
        Some(Err(e)) => Err(e.to_string()),
        None => Err("capability advertised but no health function".to_string()),
    }
}

fn destroy_in_flight(c: &Ctx<'_>) -> Result<String, String> {
    let plugin = (c.factory)().map_err(|e| format!("second instance: {e}"))?;
    let n = 32;
    let fired = Arc::new(AtomicUsize::new(0));
    for i in 0..n {
        let k = c.key();
        let f = fired.clone();
        let data = pattern(i, 4096);
        let metas = vec![meta_for(4096)];
        plugin.put(
            PutRequest {
                keys: vec![k.clone()],
                bufs: vec![data],
                metas,
            },
            move |_| {
                f.fetch_add(1, Ordering::AcqRel);
            },
        );
        let f = fired.clone();
        plugin.get(
            GetRequest {
                keys: vec![k],
                bufs: vec![vec![0u8; 4096]],
            },
            move |_| {
                f.fetch_add(1, Ordering::AcqRel);
            },
        );
    }
    // The ABI 1.2 entries, when present, are pending operations too.
    let mut submitted = 2 * n as usize;
    for _ in 0..n {
        if plugin.has(abi::KVH_CAP_ASYNC_CONTAINS) {
            let f = fired.clone();
            plugin.contains_async(vec![c.key()], false, move |_| {
                f.fetch_add(1, Ordering::AcqRel);
            });
            submitted += 1;
        }
        if plugin.has(abi::KVH_CAP_ASYNC_REMOVE) {
            let f = fired.clone();
            plugin.remove_async(vec![c.key()], true, move |_| {
                f.fetch_add(1, Ordering::AcqRel);
            });
            submitted += 1;
        }
    }
    drop(plugin); // destroy while operations may still be queued
    let total = fired.load(Ordering::Acquire);
    if total != submitted {
        return Err(format!(
            "destroy returned after {total} of {submitted} completions"
        ));
    }
    Ok(format!(
        "destroy with {submitted} operations submitted completed all of them before returning"
    ))
}
