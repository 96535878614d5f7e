//! Rows a, d and e: copies into and out of the hot cache against the machine's copy limits, measured
//! over the same bytes in the same run.

use super::{finish, gbps, hot_only_chain, human, keys, median, meta, MicroOptions, Row};
use crate::cache::{copy_pool::SPLIT_MIN, CacheConfig};
use crate::chain::{Chain, ChainSettings};
use crate::config::Config;
use crate::loader;
use crate::plugin::PutRequest;
use memmap2::MmapMut;
use std::hint::black_box;
use std::time::{Duration, Instant};

/// Copy `n` chunks of `size` from `src` to `dst` on one thread.
fn memcpy(src: &[u8], dst: &mut [u8], size: usize, n: usize) -> Duration {
    let t = Instant::now();
    for i in 0..n {
        dst[i * size..(i + 1) * size].copy_from_slice(&src[i * size..(i + 1) * size]);
    }
    black_box(dst[0]);
    t.elapsed()
}

/// The same bytes copied by `threads` threads, each taking a contiguous share of every chunk (the way
/// a split copy works), with no hand-off between chunks: the machine's multi-threaded limit.
fn threaded_copy(src: &[u8], dst: &mut [u8], size: usize, n: usize, threads: usize) -> Duration {
    let share = size.div_ceil(threads).next_multiple_of(4096);
    let t = Instant::now();
    std::thread::scope(|s| {
        let mut rest: &mut [u8] = &mut dst[..n * size];
        let mut parts: Vec<Vec<(&mut [u8], &[u8])>> = (0..threads).map(|_| Vec::new()).collect();
        for i in 0..n {
            let (mut chunk, tail) = rest.split_at_mut(size);
            rest = tail;
            for (j, part) in parts.iter_mut().enumerate() {
                let take = share.min(chunk.len());
                if take == 0 {
                    break;
                }
                let (head, tail) = chunk.split_at_mut(take);
                chunk = tail;
                let off = i * size + j * share;
                part.push((head, &src[off..off + take]));
            }
        }
        for part in parts {
            s.spawn(move || {
                for (d, s) in part {
                    d.copy_from_slice(s);
                }
            });
        }
    });
    black_box(dst[0]);
    t.elapsed()
}

/// Thread counts the multi-threaded baseline tries: 2 up to the number of cores (the best is kept).
fn baseline_threads() -> std::ops::RangeInclusive<usize> {
    2..=crate::cache::CopyPool::default_threads().max(2)
}

/// Row a: put-with-copy and get-with-copy at one chunk size, against single-thread memcpy and the best
/// N-thread copy of the same bytes, interleaved rep by rep.
pub(super) fn row_a(
    size: usize,
    opts: &MicroOptions,
    src: &MmapMut,
    dst: &mut MmapMut,
) -> Vec<Row> {
    let n = opts.working_set / size;
    let bytes = n * size;
    let chain = hot_only_chain(bytes + (64 << 20), true);
    let hot = chain.hot().clone();
    let ks = keys(&format!("bench-a-{size}"), n);
    let threads: Vec<usize> = baseline_threads().collect();
    let (mut single, mut put, mut get) = (vec![], vec![], vec![]);
    let mut multi_by_t = vec![Vec::new(); threads.len()];
    for _ in 0..opts.reps {
        single.push(gbps(bytes, memcpy(src, dst, size, n)));
        for (slot, &t) in threads.iter().enumerate() {
            multi_by_t[slot].push(gbps(bytes, threaded_copy(src, dst, size, n, t)));
        }
        chain.clear();
        let t = Instant::now();
        for (i, k) in ks.iter().enumerate() {
            let chunk = &src[i * size..(i + 1) * size];
            chain.put_with(k, size, meta(size), |d| hot.copy(d, chunk));
        }
        put.push(gbps(bytes, t.elapsed()));
        let t = Instant::now();
        for (i, k) in ks.iter().enumerate() {
            let h = hot.get(k).expect("chunk just put");
            hot.copy(&mut dst[i * size..(i + 1) * size], h.bytes());
        }
        black_box(dst[0]);
        get.push(gbps(bytes, t.elapsed()));
    }
    drop(hot);
    finish(chain);
    let single = median(single);
    let (best_t, multi) = threads
        .iter()
        .zip(multi_by_t)
        .map(|(&t, v)| (t, median(v)))
        .fold((1, 0.0), |a, b| if b.1 > a.1 { b } else { a });
    let (base, base_name) = if size >= SPLIT_MIN {
        (multi, format!("{best_t}-thread copy"))
    } else {
        (single, "memcpy".to_string())
    };
    let label = human(size);
    let mk = |what: &str, v: f64| Row {
        name: format!(
            "a. hot-cache {what} {label} chunks ({} MiB set; memcpy {single:.1}, {best_t}-thread \
             copy {multi:.1} GB/s)",
            bytes >> 20
        ),
        value: v,
        unit: "GB/s".into(),
        baseline: Some(base),
        ratio: Some(v / base),
        target: format!(">= 0.9x {base_name}"),
        met: Some(v / base >= 0.9),
    };
    vec![
        mk("put-with-copy", median(put)),
        mk("get-with-copy", median(get)),
    ]
}

/// Row d: put throughput into a full cache that must evict, against a cache with free space.
pub(super) fn row_d(opts: &MicroOptions, src: &MmapMut) -> Row {
    let size = 1 << 20;
    let n = opts.working_set / size;
    let chain = hot_only_chain(n * size, true);
    let hot = chain.hot().clone();
    let ks = keys("bench-d", 2 * n);
    let run = |range: std::ops::Range<usize>| {
        let t = Instant::now();
        for i in range {
            let off = (i % n) * size;
            let chunk = &src[off..off + size];
            chain.put_with(&ks[i], size, meta(size), |d| hot.copy(d, chunk));
        }
        t.elapsed()
    };
    let (mut free, mut full) = (vec![], vec![]);
    for _ in 0..opts.reps {
        chain.clear();
        free.push(gbps(n * size, run(0..n))); // fills the cache exactly
        full.push(gbps(n * size, run(n..2 * n))); // every put evicts one chunk
    }
    let evictions = chain
        .hot()
        .counters()
        .evictions
        .load(std::sync::atomic::Ordering::Relaxed);
    drop(hot);
    finish(chain);
    let (a, b) = (median(full), median(free));
    Row {
        name: format!("d. put while full and evicting (1 MiB chunks, {evictions} evictions)"),
        value: a,
        unit: "GB/s".into(),
        baseline: Some(b),
        ratio: Some(a / b),
        target: ">= 0.8x put with free space".into(),
        met: Some(a / b >= 0.8),
    }
}

/// Row e: get with a lower-tier hit through the C `mem` plugin, promoted into the hot cache.
pub(super) fn row_e(opts: &MicroOptions, src: &MmapMut, dst: &mut MmapMut) -> Result<Row, String> {
    let size = 4 << 20;
    let n = (opts.working_set / 4 / size).max(4);
    let bytes = n * size;
    let config = Config::from_yaml(
        &format!(
            "chunk_size: 256\nstorage_plugins: [mem]\nextra_config:\n  storage_plugin.mem.module_path: kvhost_mem\n  \
             storage_plugin.mem.class_name: mem\n  storage_plugin.mem.capacity_bytes: {}\n",
            bytes * 2
        ),
        None,
    )
    .map_err(|e| e.to_string())?;
    let mem = loader::load(&config.plugins[0], &config)
        .map_err(|e| format!("{e} (build the workspace first)"))?;
    let ks = keys("bench-e", n);
    for (i, k) in ks.iter().enumerate() {
        let chunk = src[i * size..(i + 1) * size].to_vec();
        let d = mem
            .put_wait(
                PutRequest {
                    keys: vec![k.clone()],
                    bufs: vec![chunk],
                    metas: vec![meta(size)],
                },
                Duration::from_secs(30),
            )
            .map_err(|e| e.to_string())?;
        if let Some(e) = d.error {
            return Err(e.to_string());
        }
    }
    let mut settings = ChainSettings::from_config(&config);
    settings.cache = CacheConfig::new((bytes + (64 << 20)) as u64);
    let chain = Chain::new(settings, vec![mem]).map_err(|e| e.to_string())?;
    let (mut base, mut promote) = (vec![], vec![]);
    for _ in 0..opts.reps {
        base.push(gbps(bytes, memcpy(src, dst, size, n)));
        chain.hot().clear();
        let t = Instant::now();
        let mut ok = 0;
        for k in &ks {
            ok += usize::from(chain.get(std::slice::from_ref(k))[0].is_some());
        }
        promote.push(gbps(bytes, t.elapsed()));
        if ok != n {
            return Err(format!("only {ok} of {n} chunks were promoted"));
        }
    }
    let (a, b) = (median(promote), median(base));
    chain.close(Duration::from_secs(10));
    Ok(Row {
        name: "e. get with a mem-plugin hit, promoted (4 MiB chunks; the plugin copies)".into(),
        value: a,
        unit: "GB/s".into(),
        baseline: Some(b),
        ratio: Some(a / b),
        target: "report".into(),
        met: None,
    })
}
