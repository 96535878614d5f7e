//! Model-based stress test: random operation sequences from two threads against the real chain (hot
//! cache + the C `mem` plugin), each thread checked against a simple reference model of its own keys.
//!
//! Keys are content-addressed, as in LMCache: a key always names the same bytes. Checked after every
//! operation: bytes are always those put; no acknowledged chunk is lost (the `mem` tier has room for
//! everything, so a hot-cache eviction must be served by promotion); a removed key is not found; pinned
//! entries stay in the hot cache; and after `clear` with no handles alive the arena is empty.

use crate::chain::chain_with;
use kvhost::chain::{Chain, PutOutcome};
use kvhost::ChunkKey;
use kvhost_plugin_sdk::ChunkMeta;
use proptest::prelude::*;
use std::collections::HashSet;
use std::time::Duration;

const KEYS: u8 = 24;

#[derive(Clone, Debug)]
enum Op {
    Put(u8),
    Get(u8),
    GetBatch(u8, u8),
    Lookup { start: u8, len: u8, pin: bool },
    Unpin,
    Remove(u8),
    EvictHot(u8),
    Prefetch(u8, u8),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..KEYS).prop_map(Op::Put),
        3 => (0..KEYS).prop_map(Op::Get),
        1 => (0..KEYS, 1..6u8).prop_map(|(k, n)| Op::GetBatch(k, n)),
        2 => (0..KEYS, 1..8u8, any::<bool>()).prop_map(|(start, len, pin)| Op::Lookup { start, len, pin }),
        1 => Just(Op::Unpin),
        1 => (0..KEYS).prop_map(Op::Remove),
        2 => (0..KEYS).prop_map(Op::EvictHot),
        1 => (0..KEYS, 1..6u8).prop_map(|(k, n)| Op::Prefetch(k, n)),
    ]
}

fn key(thread: usize, k: u8) -> ChunkKey {
    ChunkKey::build(
        "stress/model",
        2,
        thread as u32,
        i128::from(k) * 7919 + 1,
        "half",
        None,
        &[("t", &thread.to_string())],
    )
    .unwrap()
}

/// The bytes key `k` of `thread` names (length varies by key: 0.5 to 250 KB).
fn value(thread: usize, k: u8) -> Vec<u8> {
    let len = 512 + (usize::from(k) * 10_627) % 250_000;
    let mut x = ((thread as u64) << 40) ^ (u64::from(k) << 32) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// One thread's model: the acknowledged keys, and the keys its current lookup pinned in the hot cache.
#[derive(Default)]
struct Model {
    live: HashSet<u8>,
    pinned: HashSet<u8>,
    lookup_id: Option<String>,
}

/// Check what a get returned. With `may_fill`, a get may find no room in the hot cache to promote a
/// chunk into (this thread's own pins can fill a 1 MiB cache): then the chunk must still be in the
/// chain, which is what "not lost" means.
fn check_get(
    chain: &Chain,
    thread: usize,
    model: &Model,
    k: u8,
    got: Option<&[u8]>,
    may_fill: bool,
) -> Result<(), String> {
    match (model.live.contains(&k), got) {
        (true, Some(bytes)) if bytes != value(thread, k) => {
            Err(format!("thread {thread} key {k}: wrong bytes"))
        }
        (true, Some(_)) | (false, None) => Ok(()),
        (true, None) if may_fill && chain.lookup(&[key(thread, k)], None).hit_chunks == 1 => Ok(()),
        (true, None) => Err(format!(
            "thread {thread} key {k}: acknowledged chunk was lost"
        )),
        (false, Some(_)) => Err(format!("thread {thread} key {k}: found a removed key")),
    }
}

/// `may_fill`: the hot cache is small enough that pins and in-flight puts can leave no evictable room,
/// so `NoSpace` is a legitimate answer (never a lost chunk).
fn run_thread(chain: &Chain, thread: usize, ops: &[Op], may_fill: bool) -> Result<(), String> {
    let mut m = Model::default();
    for (step, op) in ops.iter().enumerate() {
        let ctx = |e: String| format!("step {step} {op:?}: {e}");
        match *op {
            Op::Put(k) => {
                let data = value(thread, k);
                let meta = ChunkMeta {
                    length: data.len() as u64,
                    fmt: 1,
                    dtype: 2,
                    ndim: 1,
                    shape: [data.len() as i32, 0, 0, 0],
                    reserved: 0,
                };
                match chain.put(&[key(thread, k)], &[&data], &[meta]).remove(0) {
                    PutOutcome::Stored => {
                        m.live.insert(k);
                    }
                    PutOutcome::Duplicate if m.live.contains(&k) => {}
                    PutOutcome::NoSpace(_) if may_fill => {}
                    other => {
                        return Err(ctx(format!(
                            "put returned {other:?} (in model: {})",
                            m.live.contains(&k)
                        )))
                    }
                }
            }
            Op::Get(k) => {
                let h = chain.get(&[key(thread, k)]).remove(0);
                check_get(
                    chain,
                    thread,
                    &m,
                    k,
                    h.as_ref().map(|h| h.bytes()),
                    may_fill,
                )
                .map_err(ctx)?;
            }
            Op::GetBatch(k, n) => {
                let ks: Vec<u8> = (k..k.saturating_add(n).min(KEYS)).collect();
                let keys: Vec<ChunkKey> = ks.iter().map(|&i| key(thread, i)).collect();
                for (i, h) in ks.iter().zip(chain.get(&keys)) {
                    check_get(
                        chain,
                        thread,
                        &m,
                        *i,
                        h.as_ref().map(|h| h.bytes()),
                        may_fill,
                    )
                    .map_err(ctx)?;
                }
            }
            Op::Lookup { start, len, pin } => {
                let ks: Vec<u8> = (start..start.saturating_add(len).min(KEYS)).collect();
                let keys: Vec<ChunkKey> = ks.iter().map(|&i| key(thread, i)).collect();
                let id = format!("t{thread}-s{step}");
                let l = chain.lookup(&keys, pin.then_some(id.as_str()));
                let expect = ks.iter().take_while(|k| m.live.contains(k)).count();
                if l.hit_chunks != expect {
                    let missing = key(thread, ks[l.hit_chunks]);
                    let in_tiers: Vec<String> = chain
                        .plugins()
                        .iter()
                        .map(|p| {
                            format!(
                                "{}: {:?}",
                                p.name(),
                                p.contains(std::slice::from_ref(&missing), false)
                            )
                        })
                        .collect();
                    return Err(ctx(format!(
                        "lookup found {} chunks, the model has a prefix of {expect}; {missing}: hot={} tiers={in_tiers:?} stats={:?}",
                        l.hit_chunks,
                        chain.hot().contains(&missing),
                        chain.stats().tiers
                    )));
                }
                if pin {
                    if let Some(old) = m.lookup_id.replace(id) {
                        chain.unpin(&old);
                        m.pinned.clear();
                    }
                    // The hot part of the prefix is pinned (a key still being stored counts as hot too;
                    // only those indexed in the hot cache now are checked to stay there).
                    let hot: Vec<ChunkKey> = l
                        .by_tier
                        .first()
                        .filter(|(t, _)| t == kvhost::chain::HOT_TIER)
                        .map(|(_, k)| k.clone())
                        .unwrap_or_default();
                    m.pinned = ks
                        .iter()
                        .copied()
                        .filter(|&i| {
                            hot.contains(&key(thread, i)) && chain.hot().contains(&key(thread, i))
                        })
                        .collect();
                }
            }
            Op::Unpin => {
                if let Some(id) = m.lookup_id.take() {
                    chain.unpin(&id);
                }
                m.pinned.clear();
            }
            Op::Remove(k) => {
                chain.remove(&[key(thread, k)]);
                m.live.remove(&k);
                m.pinned.remove(&k);
            }
            Op::EvictHot(k) => {
                if !m.pinned.contains(&k) {
                    chain.hot().remove(&key(thread, k));
                }
            }
            Op::Prefetch(k, n) => {
                let ks: Vec<u8> = (k..k.saturating_add(n).min(KEYS)).collect();
                let keys: Vec<ChunkKey> = ks.iter().map(|&i| key(thread, i)).collect();
                let r = chain
                    .prefetch(keys)
                    .wait(Duration::from_secs(20))
                    .ok_or_else(|| ctx("prefetch never finished".into()))?;
                let expect = ks.iter().take_while(|k| m.live.contains(k)).count();
                // With a small cache, promotions may find no room: fewer chunks may arrive, never more.
                if r.arrived > expect || (!may_fill && r.arrived != expect) {
                    return Err(ctx(format!(
                        "prefetch brought {} chunks, the model has a prefix of {expect}",
                        r.arrived
                    )));
                }
            }
        }
        for &k in &m.pinned {
            if !chain.hot().contains(&key(thread, k)) {
                return Err(ctx(format!("pinned key {k} left the hot cache")));
            }
        }
    }
    if let Some(id) = m.lookup_id.take() {
        chain.unpin(&id);
    }
    // Nothing acknowledged is lost, whatever the hot cache evicted meanwhile.
    for &k in &m.live {
        let h = chain.get(&[key(thread, k)]).remove(0);
        check_get(
            chain,
            thread,
            &m,
            k,
            h.as_ref().map(|h| h.bytes()),
            may_fill,
        )
        .map_err(|e| format!("final check: {e}"))?;
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, max_shrink_iters: 64, .. ProptestConfig::default() })]

    #[test]
    fn chain_matches_its_model_from_two_threads(
        ops_a in proptest::collection::vec(op(), 1..80),
        ops_b in proptest::collection::vec(op(), 1..80),
        small_cache in any::<bool>(),
    ) {
        // A small hot cache forces evictions (served back by promotion from mem); a large one never evicts.
        // A short read timeout: with a small cache, promotions that find no room give up quickly.
        let chain = chain_with("mem", if small_cache { 1 } else { 32 }, "blocking_timeout_secs: 0.3");
        let (ra, rb) = std::thread::scope(|s| {
            let a = s.spawn(|| run_thread(&chain, 0, &ops_a, small_cache));
            let b = s.spawn(|| run_thread(&chain, 1, &ops_b, small_cache));
            (a.join().expect("thread a"), b.join().expect("thread b"))
        });
        prop_assert!(ra.is_ok(), "{}", ra.unwrap_err());
        prop_assert!(rb.is_ok(), "{}", rb.unwrap_err());
        let report = chain.close(Duration::from_secs(20));
        prop_assert!(report.unfinished.is_empty(), "{:?}", report);
        chain.hot().clear();
        let s = chain.hot().snapshot();
        prop_assert_eq!((s.allocated_bytes, s.entries, s.blocks), (0, 0, 0), "arena empty after clear");
    }
}
