//! The hot cache and the chain, through the real C plugins loaded by the real loader.

use crate::util::*;
use kvhost::cache::{CacheConfig, CacheError, PolicyKind};
use kvhost::chain::{Chain, ChainSettings, PutOutcome, WritePolicy, HOT_TIER};
use kvhost::config::Config;
use kvhost::ChunkKey;
use kvhost_plugin_sdk::ChunkMeta;
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;

fn meta(len: usize) -> ChunkMeta {
    ChunkMeta {
        length: len as u64,
        fmt: 1,
        dtype: 3,
        ndim: 2,
        shape: [4, len as i32 / 4, 0, 0],
        reserved: 0,
    }
}

/// A chain over the given `storage_plugins` YAML (names must be mem/log/slow), with `cache_mib` of hot
/// cache and extra top-level YAML.
pub fn chain_with(plugins: &str, cache_mib: u64, extra: &str) -> Chain {
    let y = format!(
        "chunk_size: 16\nmax_local_cpu_size: {}\nlocal_cpu_prefault: false\n{}{extra}\n\
         storage_plugins: [{plugins}]\nextra_config:\n  \
         storage_plugin.mem.module_path: kvhost_mem\n  storage_plugin.mem.class_name: mem\n  \
         storage_plugin.mem.capacity_bytes: 268435456\n  \
         storage_plugin.slow.module_path: kvhost_mem\n  storage_plugin.slow.class_name: mem\n  \
         storage_plugin.slow.delay_us: 20000\n  \
         storage_plugin.log.module_path: kvhost_log\n  storage_plugin.log.class_name: log\n  storage_plugin.log.level: trace\n",
        cache_mib as f64 / 1024.0,
        if extra.contains("blocking_timeout_secs") { "" } else { "blocking_timeout_secs: 10\n" }
    );
    let config = Config::from_yaml(&y, None).unwrap_or_else(|e| panic!("{e}\n{y}"));
    Chain::from_config(&config).unwrap_or_else(|e| panic!("{e}"))
}

fn put1(chain: &Chain, k: &ChunkKey, data: &[u8]) -> PutOutcome {
    chain
        .put(std::slice::from_ref(k), &[data], &[meta(data.len())])
        .remove(0)
}

#[test]
fn write_through_then_promotion_from_mem() {
    let chain = chain_with("mem, log", 64, "");
    let k = key(100);
    let data = bytes(1, 300_000);
    assert_eq!(put1(&chain, &k, &data), PutOutcome::Stored);
    assert_eq!(
        put1(&chain, &k, &data),
        PutOutcome::Duplicate,
        "no second copy of a cached key"
    );
    wait_drained(&chain);
    let mem = chain.plugins()[0].clone();
    assert!(matches!(
        mem.contains(std::slice::from_ref(&k), false).unwrap()[0],
        kvhost::plugin::Presence::Present(_)
    ));
    // Drop it from the hot cache only: the next get is served by mem and promoted.
    assert!(chain.hot().remove(&k));
    let h = chain
        .get(std::slice::from_ref(&k))
        .remove(0)
        .expect("mem has it");
    assert_eq!(h.bytes(), &data[..]);
    assert_eq!(h.meta(), meta(data.len()));
    let stats = chain.stats();
    let mem_stats = stats.tiers.iter().find(|t| t.name == "mem").unwrap();
    assert_eq!(mem_stats.promotions, 1);
    assert!(
        chain.hot().contains(&k),
        "the promoted block is now the hot entry"
    );
    drop(h);
    let before = chain.stats().tiers[1].hits;
    let h2 = chain.get(std::slice::from_ref(&k)).remove(0).unwrap();
    assert_eq!(h2.bytes(), &data[..]);
    assert_eq!(
        chain.stats().tiers[1].hits,
        before,
        "second get hit the hot cache, not mem"
    );
    let report = chain.close(Duration::from_secs(5));
    assert_eq!(
        report.destroyed,
        vec!["log".to_string(), "mem".to_string()],
        "reverse order"
    );
}

/// The in-memory reads (what `serve` calls on its reactor) answer from the hot cache and never reach a
/// plugin: a key only the plugin tier holds is "not in memory", and the tier's counters do not move.
#[test]
fn in_memory_reads_never_reach_a_plugin_tier() {
    let chain = chain_with("mem", 64, "");
    let k = key(700);
    let data = bytes(7, 200_000);
    assert_eq!(put1(&chain, &k, &data), PutOutcome::Stored);
    wait_drained(&chain);
    let h = chain.get_in_memory(&k).expect("the hot cache holds it");
    assert_eq!(h.bytes(), &data[..]);
    assert!(chain.contains_in_memory(&k));
    drop(h);
    assert!(chain.hot().remove(&k));
    let mem_before = chain.stats().tiers[1].clone();
    assert!(chain.get_in_memory(&k).is_none(), "only mem holds it now");
    assert!(!chain.contains_in_memory(&k));
    let mem_after = chain.stats().tiers[1].clone();
    assert_eq!(
        (mem_before.hits, mem_before.misses),
        (mem_after.hits, mem_after.misses),
        "no plugin call"
    );
    // The blocking path still finds it in the tier.
    let h = chain
        .get(std::slice::from_ref(&k))
        .remove(0)
        .expect("mem has it");
    assert_eq!(h.bytes(), &data[..]);
    chain.close(Duration::from_secs(5));
}

#[test]
fn batched_get_mixes_tiers_and_misses() {
    let chain = chain_with("mem", 64, "");
    let keys: Vec<ChunkKey> = (0..6).map(|i| key(200 + i)).collect();
    for (i, k) in keys.iter().enumerate().take(4) {
        put1(&chain, k, &bytes(i as u64, 10_000 + i));
    }
    wait_drained(&chain);
    chain.hot().remove(&keys[1]);
    chain.hot().remove(&keys[3]);
    let got = chain.get(&keys);
    for (i, h) in got.iter().enumerate() {
        match i {
            0..=3 => assert_eq!(
                h.as_ref().unwrap().bytes(),
                &bytes(i as u64, 10_000 + i)[..],
                "key {i}"
            ),
            _ => assert!(h.is_none(), "key {i} was never put"),
        }
    }
}

#[test]
fn lookup_walks_tiers_in_order_and_pins() {
    let chain = chain_with(
        "mem",
        64,
        "pin_timeout_sec: 0.2\npin_check_interval_sec: 0.05",
    );
    let keys: Vec<ChunkKey> = (0..5).map(|i| key(300 + i)).collect();
    for (i, k) in keys.iter().enumerate().take(4) {
        put1(&chain, k, &bytes(i as u64, 1000));
    }
    wait_drained(&chain);
    chain.hot().remove(&keys[2]);
    chain.hot().remove(&keys[3]);
    let l = chain.lookup(&keys, Some("req-1"));
    assert_eq!(l.hit_chunks, 4);
    assert_eq!(l.by_tier.len(), 2);
    assert_eq!(l.by_tier[0], (HOT_TIER.to_string(), keys[..2].to_vec()));
    assert_eq!(l.by_tier[1], ("mem".to_string(), keys[2..4].to_vec()));
    assert_eq!(chain.stats().pinned_lookups, 1);
    assert_eq!(chain.unpin("req-1"), 4);
    assert_eq!(chain.unpin("req-1"), 0);
    // A pin nobody releases is forced off by the pin monitor.
    chain.lookup(&keys, Some("forgotten"));
    let deadline = Instant::now() + Duration::from_secs(5);
    while chain.stats().forced_unpins == 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(chain.stats().forced_unpins, 1);
    assert_eq!(chain.stats().pinned_lookups, 0);
}

#[test]
fn pinned_entries_survive_eviction_and_full_cache_says_no_space() {
    let chain = chain_with("", 4, "");
    let cap = chain.hot().capacity();
    let chunk = (cap / 4) as usize;
    let keys: Vec<ChunkKey> = (0..4).map(|i| key(400 + i)).collect();
    for (i, k) in keys.iter().enumerate() {
        assert_eq!(put1(&chain, k, &bytes(i as u64, chunk)), PutOutcome::Stored);
    }
    let l = chain.lookup(&keys, Some("hold"));
    assert_eq!(l.hit_chunks, 4);
    let started = Instant::now();
    let outcome = put1(&chain, &key(499), &bytes(9, chunk));
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "no busy loop, no wait"
    );
    assert!(
        matches!(outcome, PutOutcome::NoSpace(CacheError::NoSpace { .. })),
        "{outcome:?}"
    );
    assert!(chain.stats().tiers[0].no_space >= 1, "counted");
    for k in &keys {
        assert!(chain.hot().contains(k), "pinned entries were not evicted");
    }
    chain.unpin("hold");
    assert_eq!(
        put1(&chain, &key(499), &bytes(9, chunk)),
        PutOutcome::Stored,
        "evicts once unpinned"
    );
    assert_eq!(chain.stats().tiers[0].evictions, 1);
}

#[test]
fn a_handle_outlives_remove_and_clear_returns_the_arena() {
    let chain = chain_with("", 8, "");
    let k = key(500);
    let data = bytes(5, 123_456);
    put1(&chain, &k, &data);
    let h = chain.get(std::slice::from_ref(&k)).remove(0).unwrap();
    assert_eq!(chain.remove(std::slice::from_ref(&k)), 1);
    assert!(!chain.hot().contains(&k));
    assert_eq!(h.bytes(), &data[..], "bytes stay valid after remove");
    assert!(
        chain.hot().snapshot().allocated_bytes > 0,
        "still allocated while the handle lives"
    );
    drop(h);
    assert_eq!(
        chain.hot().snapshot().allocated_bytes,
        0,
        "freed with the last handle"
    );
    for i in 0..10 {
        put1(&chain, &key(600 + i), &bytes(i as u64, 50_000));
    }
    assert_eq!(chain.clear(), 10);
    let s = chain.hot().snapshot();
    assert_eq!((s.allocated_bytes, s.entries, s.blocks), (0, 0, 0));
}

#[test]
fn local_cpu_false_keeps_nothing_in_the_hot_cache() {
    let chain = chain_with("mem", 8, "local_cpu: false");
    let k = key(700);
    let data = bytes(7, 70_000);
    assert_eq!(put1(&chain, &k, &data), PutOutcome::Stored);
    wait_drained(&chain);
    assert_eq!(
        chain.hot().snapshot().allocated_bytes,
        0,
        "staging only: freed once mem took the data"
    );
    assert!(!chain.hot().contains(&k));
    let h = chain
        .get(std::slice::from_ref(&k))
        .remove(0)
        .expect("served by mem");
    assert_eq!(h.bytes(), &data[..]);
    drop(h);
    assert_eq!(chain.hot().snapshot().entries, 0, "not retained");
}

#[test]
fn write_back_demotes_on_eviction() {
    let chain = chain_with("mem", 4, "write_policy: write_back");
    let cap = chain.hot().capacity() as usize;
    let chunk = cap / 4;
    let keys: Vec<ChunkKey> = (0..8).map(|i| key(800 + i)).collect();
    for (i, k) in keys.iter().enumerate() {
        assert_eq!(
            put1(&chain, k, &bytes(i as u64, chunk)),
            PutOutcome::Stored,
            "put {i}"
        );
    }
    wait_drained(&chain);
    let s = chain.stats();
    let mem = s.tiers.iter().find(|t| t.name == "mem").unwrap();
    assert!(mem.demotions >= 4, "evicted chunks went to mem: {mem:?}");
    // Nothing was written through: mem got exactly the demoted chunks.
    assert_eq!(mem.puts, mem.demotions);
    for (i, k) in keys.iter().enumerate() {
        let h = chain
            .get(std::slice::from_ref(k))
            .remove(0)
            .unwrap_or_else(|| panic!("key {i} lost"));
        assert_eq!(h.bytes(), &bytes(i as u64, chunk)[..]);
    }
}

#[test]
fn close_finishes_puts_in_flight_to_a_slow_plugin() {
    // `slow` sleeps 20 ms per chunk: 10 chunks take ~200 ms, well inside the close timeout.
    let chain = chain_with(
        "slow",
        16,
        "tier_max_inflight_batches: 1\nput_batch_size: 1",
    );
    for i in 0..10 {
        put1(&chain, &key(900 + i), &bytes(i as u64, 4096));
    }
    assert!(
        chain.stats().puts_in_flight > 0,
        "work is still in flight when close starts"
    );
    let report = chain.close(Duration::from_secs(10));
    assert!(report.unfinished.is_empty(), "{report:?}");
    assert!(report.in_flight_at_start > 0);
    assert_eq!(put1(&chain, &key(999), b"late"), PutOutcome::Closed);
}

#[test]
fn close_names_what_it_could_not_finish() {
    let chain = chain_with(
        "slow",
        16,
        "tier_max_inflight_batches: 1\nput_batch_size: 1",
    );
    let keys: Vec<ChunkKey> = (0..20).map(|i| key(1000 + i)).collect();
    for (i, k) in keys.iter().enumerate() {
        put1(&chain, k, &bytes(i as u64, 4096));
    }
    let report = chain.close(Duration::from_millis(50));
    assert!(!report.unfinished.is_empty(), "{report:?}");
    for name in &report.unfinished {
        assert!(
            keys.iter().any(|k| k.as_str() == name),
            "{name} is one of ours"
        );
    }
}

#[test]
fn prefetch_loads_the_prefix_in_the_background() {
    let chain = chain_with("mem", 32, "");
    let keys: Vec<ChunkKey> = (0..6).map(|i| key(1100 + i)).collect();
    for (i, k) in keys.iter().enumerate().take(5) {
        put1(&chain, k, &bytes(i as u64, 20_000));
    }
    wait_drained(&chain);
    for k in &keys[1..5] {
        chain.hot().remove(k);
    }
    let handle = chain.prefetch(keys.clone());
    let r = handle
        .wait(Duration::from_secs(10))
        .expect("prefetch finished");
    assert_eq!((r.requested, r.arrived, r.promoted), (6, 5, 4));
    assert!(handle.poll().is_some());
    for k in &keys[..5] {
        assert!(chain.hot().contains(k));
    }
}

#[test]
fn every_cache_policy_evicts_and_keeps_accounting_exact() {
    for policy in ["LRU", "FIFO", "LFU", "MRU", "S3FIFO"] {
        let mut cache = CacheConfig::new(8 * MIB);
        cache.policy = policy.parse::<PolicyKind>().unwrap();
        let settings = ChainSettings {
            cache,
            write_policy: WritePolicy::WriteThrough,
            ..ChainSettings::from_config(&Config::from_yaml("", None).unwrap())
        };
        let chain = Chain::new(settings, Vec::new()).unwrap();
        for i in 0..64u64 {
            let len = 200_000 + (i as usize % 7) * 1000;
            let outcome = put1(&chain, &key(2000 + i as i128), &bytes(i, len));
            assert_eq!(outcome, PutOutcome::Stored, "{policy} put {i}");
        }
        let s = chain.hot().snapshot();
        assert!(s.entries < 64 && s.entries > 0, "{policy}: {s:?}");
        assert!(s.allocated_bytes <= s.capacity_bytes);
        assert!(chain.stats().tiers[0].evictions > 0, "{policy} evicted");
        chain.clear();
        assert_eq!(chain.hot().snapshot().allocated_bytes, 0, "{policy}");
    }
}

#[test]
fn lookup_finds_a_prefix_that_alternates_between_tiers() {
    // k0 only in mem (evicted from the hot cache); k1 only in the hot cache (say its mem write is still
    // queued). LMCache's single pass stops at 1; kvhost's walk restarts from the hot cache and finds 2.
    let chain = chain_with("mem", 16, "");
    let (k0, k1) = (key(1200), key(1201));
    put1(&chain, &k0, &bytes(1, 1000));
    put1(&chain, &k1, &bytes(2, 1000));
    wait_drained(&chain);
    chain.hot().remove(&k0);
    chain.plugins()[0]
        .remove(std::slice::from_ref(&k1), true)
        .unwrap();
    let l = chain.lookup(&[k0.clone(), k1.clone()], None);
    assert_eq!(l.hit_chunks, 2);
    assert_eq!(
        l.by_tier,
        vec![
            ("mem".to_string(), vec![k0]),
            (HOT_TIER.to_string(), vec![k1])
        ]
    );
}

#[test]
fn a_failing_tier_costs_its_own_keys_only() {
    // `liar` (status mode) answers contains with an undefined status and get without results.
    let liar = fixture("fx_liar");
    let y = format!(
        "chunk_size: 16\nmax_local_cpu_size: 0.01\nlocal_cpu_prefault: false\nstorage_plugins: [liar, mem]\n\
         extra_config:\n  storage_plugin.liar.module_path: {}\n  storage_plugin.liar.class_name: liar\n  \
         storage_plugin.mem.module_path: kvhost_mem\n  storage_plugin.mem.class_name: mem\n",
        liar.display()
    );
    let chain = Chain::from_config(&Config::from_yaml(&y, None).unwrap()).unwrap();
    let k = key(1300);
    let data = bytes(13, 5000);
    assert_eq!(put1(&chain, &k, &data), PutOutcome::Stored);
    wait_drained(&chain);
    // The hot cache still serves it; after it leaves, mem serves it past the failing tier.
    assert_eq!(
        chain.get(std::slice::from_ref(&k))[0]
            .as_ref()
            .unwrap()
            .bytes(),
        &data[..]
    );
    chain.hot().remove(&k);
    let h = chain
        .get(std::slice::from_ref(&k))
        .remove(0)
        .expect("mem, behind the liar");
    assert_eq!(h.bytes(), &data[..]);
    assert_eq!(chain.lookup(std::slice::from_ref(&k), None).hit_chunks, 1);
    let liar_stats = chain
        .stats()
        .tiers
        .into_iter()
        .find(|t| t.name == "liar")
        .unwrap();
    assert!(
        liar_stats.errors > 0,
        "errors are counted per tier: {liar_stats:?}"
    );
}

#[test]
fn backpressure_drop_skips_a_full_tier_and_counts_it() {
    // `slow` takes 20 ms per chunk; a queue of 1 with drop backpressure must not block puts.
    let chain = chain_with("slow", 16, "put_queue_depth: 1\nput_backpressure: drop\ntier_max_inflight_batches: 1\nput_batch_size: 1");
    let started = Instant::now();
    for i in 0..20 {
        assert_eq!(
            put1(&chain, &key(1400 + i), &bytes(i as u64, 1000)),
            PutOutcome::Stored
        );
    }
    assert!(
        started.elapsed() < Duration::from_millis(300),
        "puts did not wait for the slow tier"
    );
    let slow = chain
        .stats()
        .tiers
        .into_iter()
        .find(|t| t.name == "slow")
        .unwrap();
    assert!(slow.put_dropped > 0, "dropped chunks are counted: {slow:?}");
    chain.close(Duration::from_secs(10));
}
