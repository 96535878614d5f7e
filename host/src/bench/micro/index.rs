//! Rows c, f and g: the hot cache's bookkeeping without any copy. Contains and lookup rates over a
//! large index (one and two threads), put and get without the copy, and the 1,000-key prefix walk an
//! inference engine makes once per request.

use super::{finish, hot_only_chain, keys, median, meta, MicroOptions, Row};
use crate::chain::Chain;
use crate::key::ChunkKey;
use std::hint::black_box;
use std::time::{Duration, Instant};

/// Keys in the prefix walk of row g.
const WALK: usize = 1000;
/// Keys per prefix walk in row c's lookup rate (the reference measurement's walk length).
const SHORT_WALK: usize = 16;

/// A fixed pseudo-random permutation of `0..n`, so lookups do not walk memory sequentially.
fn shuffled(n: usize) -> Vec<u32> {
    let mut order: Vec<u32> = (0..n as u32).collect();
    let mut x = 0x2545_F491_4F6C_DD1Du64;
    for i in (1..n).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        order.swap(i, (x % (i as u64 + 1)) as usize);
    }
    order
}

/// Run `work(thread, threads)` on `threads` threads at once; the wall time of the slowest.
fn on_threads(threads: usize, work: impl Fn(usize, usize) + Sync) -> Duration {
    let barrier = std::sync::Barrier::new(threads);
    let t = Instant::now();
    std::thread::scope(|s| {
        for i in 0..threads {
            let (work, barrier) = (&work, &barrier);
            s.spawn(move || {
                barrier.wait();
                work(i, threads)
            });
        }
    });
    t.elapsed()
}

fn cached_chain(opts: &MicroOptions) -> (Chain, Vec<ChunkKey>) {
    let n = opts.keys;
    let chain = hot_only_chain(n * 4096 + (16 << 20), false);
    let ks = keys("bench-c", n);
    for k in &ks {
        chain.put_with(k, 1, meta(1), |d| d[0] = 1);
    }
    (chain, ks)
}

/// Row c: contains and lookup rates over `opts.keys` cached keys, one thread (judged) and two
/// (reported, against one: the index is sharded so readers rarely meet).
pub(super) fn row_c(opts: &MicroOptions) -> Vec<Row> {
    let (chain, ks) = cached_chain(opts);
    let n = ks.len();
    let order = shuffled(n);
    // The caller's keys in the order it asks, as an engine holds a request's keys: read in
    // sequence, while the index lines they land on are random. (Indexing `ks` through `order`
    // instead would add a miss on the bench's own 100 MB key array to every call.)
    let asked: Vec<ChunkKey> = order.iter().map(|&i| ks[i as usize].clone()).collect();
    let ops = n.max(2_000_000);
    let contains = |thread: usize, threads: usize| {
        let mut hits = 0usize;
        for i in (thread..ops).step_by(threads) {
            hits += usize::from(chain.hot().contains(&asked[i % n]));
        }
        assert_eq!(
            hits,
            (ops - thread).div_ceil(threads),
            "every key is cached"
        );
    };
    let walks = ops / SHORT_WALK;
    let lookup = |thread: usize, threads: usize| {
        let mut found = 0usize;
        for w in (thread..walks).step_by(threads) {
            let start = order[w % n] as usize % (n - SHORT_WALK);
            found += chain.prefix_len(&ks[start..start + SHORT_WALK]);
        }
        assert_eq!(found % SHORT_WALK, 0, "every walk is a full hit");
    };
    let rate = |count: usize, d: Duration| count as f64 / d.as_secs_f64() / 1e6;
    let (mut c1, mut c2, mut l1, mut l2) = (vec![], vec![], vec![], vec![]);
    for _ in 0..opts.reps {
        c1.push(rate(ops, on_threads(1, contains)));
        c2.push(rate(ops, on_threads(2, contains)));
        l1.push(rate(walks * SHORT_WALK, on_threads(1, lookup)));
        l2.push(rate(walks * SHORT_WALK, on_threads(2, lookup)));
    }
    finish(chain);
    let one = |name: &str, v: f64| Row {
        name: format!("c. {name} over {n} cached keys, 1 thread"),
        value: v,
        unit: "M keys/s".into(),
        baseline: None,
        ratio: None,
        target: ">= 10 M keys/s".into(),
        met: Some(v >= 10.0),
    };
    let two = |name: &str, v: f64, base: f64| Row {
        name: format!("c. {name} over {n} cached keys, 2 threads (vs 1)"),
        value: v,
        unit: "M keys/s".into(),
        baseline: Some(base),
        ratio: Some(v / base),
        target: "report".into(),
        met: None,
    };
    let (c1, c2, l1, l2) = (median(c1), median(c2), median(l1), median(l2));
    let walk = format!("lookup ({SHORT_WALK}-key prefix walks, per key)");
    vec![
        one("contains", c1),
        two("contains", c2, c1),
        one(&walk, l1),
        two(&walk, l2, l1),
    ]
}

/// Row f: put and get without the copy (stage, commit, index and policy; index lookup, handle and
/// policy touch), ns per op, one thread (judged: under 1 µs) and two (reported).
pub(super) fn row_f(opts: &MicroOptions) -> Vec<Row> {
    let n = opts.keys.min(200_000);
    let len = 4096;
    let chain = hot_only_chain(n * len + (16 << 20), false);
    let (mut p1, mut p2, mut g1, mut g2) = (vec![], vec![], vec![], vec![]);
    for rep in 0..opts.reps {
        for (threads, puts, gets) in [(1, &mut p1, &mut g1), (2, &mut p2, &mut g2)] {
            // Fresh keys every rep, so every put inserts.
            let ks = keys(&format!("bench-f-{rep}-{threads}"), n);
            chain.clear();
            let put = on_threads(threads, |t, threads| {
                for k in ks.iter().skip(t).step_by(threads) {
                    black_box(chain.put_with(k, len, meta(len), |_| {}));
                }
            });
            let get = on_threads(threads, |t, threads| {
                for k in ks.iter().skip(t).step_by(threads) {
                    let h = chain.get(std::slice::from_ref(k));
                    assert!(h[0].is_some(), "chunk just put");
                }
            });
            puts.push(put.as_nanos() as f64 / n as f64);
            gets.push(get.as_nanos() as f64 / n as f64);
        }
    }
    finish(chain);
    let mk = |what: &str, threads: usize, ns: f64, one: Option<f64>| Row {
        name: format!(
            "f. {what} without the copy, {threads} thread{} ({:.2} M ops/s)",
            if threads == 1 { "" } else { "s" },
            1e3 / ns
        ),
        value: ns,
        unit: "ns/op".into(),
        baseline: one,
        ratio: one.map(|b| ns / b),
        target: if one.is_some() {
            "report".into()
        } else {
            "<= 1000 ns/op".into()
        },
        met: one.is_none().then_some(ns <= 1000.0),
    };
    let (p1, p2, g1, g2) = (median(p1), median(p2), median(g1), median(g2));
    vec![
        mk("put", 1, p1, None),
        mk("put", 2, p2, Some(p1)),
        mk("get", 1, g1, None),
        mk("get", 2, g2, Some(g1)),
    ]
}

/// Row g: one 1,000-key prefix walk over `opts.keys` cached keys, µs per call: all hit (judged,
/// through the allocation-free `prefix_len`), the same through `lookup` (which also lists the keys per
/// tier; reported), and a walk that misses at key 500 (reported).
pub(super) fn row_g(opts: &MicroOptions) -> Vec<Row> {
    let (chain, ks) = cached_chain(opts);
    let n = ks.len();
    if n < 2 * WALK {
        return vec![super::failed(
            "g. 1,000-key prefix walk",
            "needs at least 2,000 keys",
        )];
    }
    let starts: Vec<usize> = shuffled(n)
        .iter()
        .map(|&s| s as usize % (n - WALK))
        .collect();
    let calls = (opts.keys / 10).clamp(100, 5_000);
    let absent = keys("bench-g-absent", 1).remove(0);
    let time = |f: &dyn Fn(usize) -> usize, expect: usize| {
        let t = Instant::now();
        for c in 0..calls {
            let got = f(starts[c % starts.len()]);
            assert_eq!(got, expect, "prefix walk");
        }
        t.elapsed().as_secs_f64() * 1e6 / calls as f64
    };
    let miss_walks: Vec<Vec<ChunkKey>> = (0..64)
        .map(|i| {
            let s = starts[i];
            let mut w = ks[s..s + WALK].to_vec();
            w[WALK / 2] = absent.clone();
            w
        })
        .collect();
    let (mut hit, mut full, mut miss) = (vec![], vec![], vec![]);
    for _ in 0..opts.reps {
        hit.push(time(&|s| chain.prefix_len(&ks[s..s + WALK]), WALK));
        full.push(time(
            &|s| chain.lookup(&ks[s..s + WALK], None).hit_chunks,
            WALK,
        ));
        miss.push(time(
            &|s| chain.prefix_len(&miss_walks[s % miss_walks.len()]),
            WALK / 2,
        ));
    }
    finish(chain);
    let (hit, full, miss) = (median(hit), median(full), median(miss));
    let row = |name: String, v: f64, judged: bool| Row {
        name,
        value: v,
        unit: "µs/call".into(),
        baseline: None,
        ratio: None,
        target: if judged {
            "<= 30 µs".into()
        } else {
            "report".into()
        },
        met: judged.then_some(v <= 30.0),
    };
    vec![
        row(
            format!("g. {WALK}-key prefix walk, all hit ({n} keys cached)"),
            hit,
            true,
        ),
        row(
            format!("g. {WALK}-key walk through lookup() (keys listed per tier)"),
            full,
            false,
        ),
        row(
            format!("g. {WALK}-key prefix walk, miss at {}", WALK / 2),
            miss,
            false,
        ),
    ]
}
