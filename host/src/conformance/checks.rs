//! The data-path checks: round trips, batch edges, completions, capabilities and destroy.

use super::{meta_for, pattern, Ctx};
use crate::plugin::{GetItem, GetRequest, Presence, PutRequest};
use kvhost_plugin_sdk::abi;
use kvhost_plugin_sdk::Status;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub(super) fn round_trip(c: &Ctx<'_>) -> Result<String, String> {
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

pub(super) fn empty_batches(c: &Ctx<'_>) -> Result<String, String> {
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
            .prefetch_wait(Vec::new(), c.wait)
            .map_err(|e| e.to_string())?;
        if let Some(e) = d.error {
            return Err(format!("prefetch: {e}"));
        }
    }
    Ok("every operation accepts an empty batch".to_string())
}

pub(super) fn duplicate_keys(c: &Ctx<'_>) -> Result<String, String> {
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

pub(super) fn mixed_hits(c: &Ctx<'_>) -> Result<String, String> {
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

pub(super) fn buffer_too_small(c: &Ctx<'_>) -> Result<String, String> {
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

pub(super) fn exactly_once(c: &Ctx<'_>) -> Result<String, String> {
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
    let deadline = Instant::now() + c.wait;
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

pub(super) fn concurrency(c: &Ctx<'_>) -> Result<String, String> {
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

pub(super) fn pin_unpin(c: &Ctx<'_>) -> Result<String, String> {
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

pub(super) fn prefetch(c: &Ctx<'_>) -> Result<String, String> {
    let (k, absent) = (c.key(), c.key());
    c.expect_put_ok(vec![k.clone()], vec![pattern(6, 100)])?;
    let d = c
        .plugin
        .prefetch_wait(vec![k.clone(), absent], c.wait)
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

pub(super) fn flush(c: &Ctx<'_>) -> Result<String, String> {
    c.expect_put_ok(vec![c.key()], vec![pattern(7, 10)])?;
    c.plugin.flush().map_err(|e| e.to_string())?;
    Ok("flush succeeds".to_string())
}

pub(super) fn clear(c: &Ctx<'_>) -> Result<String, String> {
    let plugin = &c.plugin;
    let keys: Vec<_> = (0..3).map(|_| c.key()).collect();
    let metas = keys.iter().map(|_| meta_for(64)).collect();
    let done = plugin
        .put_wait(
            PutRequest {
                keys: keys.clone(),
                bufs: vec![pattern(1, 64); 3],
                metas,
            },
            c.wait,
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
pub(super) fn contains_async(c: &Ctx<'_>) -> Result<String, String> {
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
            .recv_timeout(c.wait)
            .map_err(|_| format!("a lookup did not complete within {:?}", c.wait))?;
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
        .contains_wait(&[], false, c.wait)
        .map_err(|e| format!("empty batch: {e}"))?;
    if !empty.is_empty() {
        return Err("an empty lookup returned items".to_string());
    }
    if c.plugin.has(abi::KVH_CAP_PIN) && !c.discards {
        let pinned = c
            .plugin
            .contains_wait(&stored, true, c.wait)
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
pub(super) fn remove_async(c: &Ctx<'_>) -> Result<String, String> {
    let keys: Vec<_> = (0..3).map(|_| c.key()).collect();
    c.expect_put_ok(keys.clone(), vec![pattern(5, 4096 + 1); 3])?;
    let removed = c
        .plugin
        .remove_wait(&keys, false, c.wait)
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
        .remove_wait(&keys[..1], true, c.wait)
        .map_err(|e| e.to_string())?;
    if again[0] != Status::NOT_FOUND {
        return Err(format!(
            "second remove_async: expected NOT_FOUND, got {}",
            again[0]
        ));
    }
    c.plugin
        .remove_wait(&[], true, c.wait)
        .map_err(|e| format!("empty batch: {e}"))?;
    Ok("removed keys are gone from contains and get; a second remove finds nothing".to_string())
}

pub(super) fn health(c: &Ctx<'_>) -> Result<String, String> {
    match c.plugin.health() {
        Some(Ok(text)) => Ok(format!("healthy: {text}")),
        Some(Err(e)) => Err(e.to_string()),
        None => Err("capability advertised but no health function".to_string()),
    }
}

/// Consumes the suite's instance: destroying it is the check.
pub(super) fn destroy_in_flight(c: Ctx<'_>) -> Result<String, String> {
    let plugin = c.plugin;
    let n = 32;
    let fired = Arc::new(AtomicUsize::new(0));
    for i in 0..n {
        let k = c.keys.next();
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
            plugin.contains_async(vec![c.keys.next()], false, move |_| {
                f.fetch_add(1, Ordering::AcqRel);
            });
            submitted += 1;
        }
        if plugin.has(abi::KVH_CAP_ASYNC_REMOVE) {
            let f = fired.clone();
            plugin.remove_async(vec![c.keys.next()], true, move |_| {
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

/// Runs on the instance made after `destroy_in_flight` destroyed the previous one.
pub(super) fn create_after_destroy(c: &Ctx<'_>) -> Result<String, String> {
    let k = c.key();
    let data = pattern(31, 2048);
    c.expect_put_ok(vec![k.clone()], vec![data.clone()])?;
    let (items, got) = c.get(vec![k.clone()], vec![data.len()])?;
    c.plugin.remove(&[k], true).map_err(|e| e.to_string())?;
    if c.discards {
        return Ok("a fresh instance came up after destroy".to_string());
    }
    if !matches!(items[0], GetItem::Hit { len: 2048, .. }) || got[0] != data {
        return Err(format!("round trip on the fresh instance: {:?}", items[0]));
    }
    Ok("a fresh instance came up after destroy and served a round trip".to_string())
}
