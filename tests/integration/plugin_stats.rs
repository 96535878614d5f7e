//! ABI 1.3 `stats`: what mem and fs report (real eviction counts), how the host checks it, how it
//! reaches the bench table, `/metrics` and `kvhost check`, and that a plugin built against ABI 1.2
//! still loads.

use crate::util::*;
use kvhost::chain::Chain;
use kvhost::config::Config;
use kvhost::plugin::{PluginBackend, PluginStat, PutRequest, StatKind};
use kvhost_plugin_sdk::Status;
use std::time::Duration;

fn stat<'a>(stats: &'a [PluginStat], name: &str) -> &'a PluginStat {
    stats
        .iter()
        .find(|s| s.name == name)
        .unwrap_or_else(|| panic!("no `{name}` in {stats:?}"))
}

/// Puts `n` chunks of `len` bytes, one per request; returns the statuses.
fn fill(p: &PluginBackend, n: usize, len: usize) -> Vec<Status> {
    (0..n)
        .map(|i| {
            let done = p
                .put_wait(
                    PutRequest {
                        keys: vec![key(10_000 + i as i128)],
                        bufs: vec![bytes(i as u64, len)],
                        metas: vec![chunk_meta(i as u64, len)],
                    },
                    Duration::from_secs(30),
                )
                .unwrap();
            assert!(done.error.is_none(), "{:?}", done.error);
            done.items[0]
        })
        .collect()
}

/// Fill a store of `capacity` bytes with twice that: the plugin counts what it evicted, and what it
/// holds stays within its capacity.
fn evictions_are_counted(p: &PluginBackend, capacity: u64) {
    let before = p.stats().expect("stats entry").unwrap();
    assert_eq!(stat(&before, "evictions").value, 0, "{before:?}");
    assert_eq!(stat(&before, "evictions").kind, StatKind::Counter);
    assert_eq!(stat(&before, "capacity_bytes").value, capacity);
    assert_eq!(stat(&before, "capacity_bytes").kind, StatKind::Gauge);
    let len = 64 * 1024;
    let n = (2 * capacity / len as u64) as usize;
    let statuses = fill(p, n, len);
    assert!(statuses.iter().all(|s| *s == Status::OK), "{statuses:?}");
    let after = p.stats().unwrap().unwrap();
    let evicted = stat(&after, "evictions").value;
    let entries = stat(&after, "entries").value;
    assert!(evicted > 0, "{after:?}");
    assert!(stat(&after, "bytes_used").value <= capacity, "{after:?}");
    // Every chunk put is either still held or was counted as evicted.
    assert_eq!(evicted + entries, n as u64, "{after:?}");
}

#[test]
fn mem_counts_its_evictions() {
    let capacity = 1 << 20;
    let p = must_load(
        "mem",
        "kvhost_mem",
        "mem",
        &[("capacity_bytes", &capacity.to_string())],
    );
    evictions_are_counted(&p, capacity);
}

#[test]
fn fs_counts_its_evictions() {
    let dir = std::env::temp_dir().join(format!("kvhost-stats-fs-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    // 4 MiB; fs charges each chunk its file size (header included), so capacity is what it reports.
    let so = crate::util::rust_plugin("kvhost_fs");
    let p = must_load(
        "fs",
        so.to_str().unwrap(),
        "fs",
        &[
            ("path", dir.to_str().unwrap()),
            ("max_size_gib", "0.00390625"),
        ],
    );
    let capacity = stat(&p.stats().unwrap().unwrap(), "capacity_bytes").value;
    assert_eq!(capacity, 4 << 20);
    evictions_are_counted(&p, capacity);
    drop(p);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_plugin_built_against_abi_1_2_loads_without_stats() {
    let path = fixture("fx_abi_1_0");
    let p = must_load("old", path.to_str().unwrap(), "abi_1_2", &[]);
    assert_eq!(p.info().abi, (1, 2));
    assert!(p.stats().is_none(), "no stats entry in a 1.2 vtable");
    p.clear().expect("its 1.2 clear entry is there");
    let factory = || {
        let c = config_for("old", path.to_str().unwrap(), "abi_1_2", &[]);
        kvhost::loader::load(&c.plugins[0], &c)
    };
    let report = kvhost::conformance::run(&factory);
    assert!(report.passed(), "{report}");
}

#[test]
fn stats_advertised_past_a_1_2_vtable_is_refused() {
    let path = fixture("fx_abi_1_0");
    let e = load("bad", path.to_str().unwrap(), "stats_past_vtable", &[]).unwrap_err();
    assert!(
        e.contains("capability `stats` is advertised but the vtable (128 bytes) predates it (ABI 1.3, 136 bytes)"),
        "{e}"
    );
}

fn chain_over_small_mem() -> Chain {
    let y = "chunk_size: 16\nmax_local_cpu_size: 0.002\nlocal_cpu_prefault: false\n\
             storage_plugins: [mem]\nextra_config:\n  storage_plugin.mem.module_path: kvhost_mem\n  \
             storage_plugin.mem.class_name: mem\n  storage_plugin.mem.capacity_bytes: 1048576\n";
    Chain::from_config(&Config::from_yaml(y, None).unwrap()).unwrap()
}

/// The bench tier table's `evictions` for a plugin tier is what the plugin counted, and `/metrics`
/// has the `kvhost_plugin_stat` family.
#[test]
fn plugin_evictions_reach_the_tier_stats_and_metrics() {
    let chain = chain_over_small_mem();
    let len = 64 * 1024;
    for i in 0..40u64 {
        let k = key(20_000 + i as i128);
        let data = bytes(i, len);
        chain.put(&[k], &[&data], &[chunk_meta(i, len)]);
    }
    wait_drained(&chain);
    let tiers = chain.stats_with_plugins();
    let mem = tiers.iter().find(|t| t.name == "mem").unwrap();
    let reported = stat(&mem.plugin, "evictions").value;
    assert!(reported > 0, "{:?}", mem.plugin);
    assert_eq!(mem.evictions, reported);
    let text = kvhost::serve::metrics::render(
        &chain,
        &kvhost::serve::ServerStats::default(),
        "test/model",
        0,
    );
    assert!(text.contains("# TYPE kvhost_plugin_stat untyped"), "{text}");
    let line = text
        .lines()
        .find(|l| {
            l.starts_with("kvhost_plugin_stat{")
                && l.contains("tier=\"mem\",name=\"evictions\",kind=\"counter\"")
        })
        .unwrap_or_else(|| panic!("{text}"));
    let value: u64 = line.rsplit(' ').next().unwrap().parse().unwrap();
    assert!(value >= reported, "{line}");
}

/// Whatever a plugin's stats entry reports is checked before it is believed; each defect is named
/// and the plugin keeps serving.
#[test]
fn malformed_stats_are_refused_with_the_reason() {
    let path = fixture("fx_bad_stats");
    let p = |mode: &str| {
        must_load(
            "bad",
            path.to_str().unwrap(),
            "bad_stats",
            &[("mode", mode)],
        )
    };
    let good = p("good").stats().unwrap().unwrap();
    assert_eq!(
        good,
        [PluginStat {
            name: "evictions".into(),
            value: 42,
            kind: StatKind::Counter
        }]
    );
    for (mode, expect) in [
        (
            "bad_name",
            "entry 0: the name is not 1-47 bytes of [a-z0-9_] ending in a NUL: \"Bad Name\"",
        ),
        ("unterminated", "entry 0: the name is not 1-47 bytes"),
        ("bad_kind", "entry 0 (`entries`): unknown kind 7"),
        ("duplicate", "entry 1: `entries` reported twice"),
        ("lie_len", "reported 37 entries into an array of 32"),
        ("greedy", "asked for a larger array twice"),
        ("huge", "asked for 1000000 entries after being offered 32"),
        ("fail", "IO"),
    ] {
        let plugin = p(mode);
        let e = plugin.stats().unwrap().unwrap_err().to_string();
        assert!(e.contains(expect), "{mode}: {e}");
        // Still serving.
        assert!(plugin.contains(&[key(1)], false).is_ok(), "{mode}");
    }
}
