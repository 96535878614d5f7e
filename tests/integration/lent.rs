//! The chain's lent-buffer operations (the Python binding's data path): plugins read and write the
//! caller's buffers; a tier's failure or miss falls through to the next; nothing is reported before
//! every plugin has given the buffers back.

use crate::util::{config_for, fixture, key, must_load};
use kvhost::chain::{Chain, ChainSettings, LentGetDone, LentPutItem};
use kvhost::plugin::{GetItem, PluginBackend, Presence};
use kvhost::ChunkKey;
use std::sync::Arc;
use std::time::Duration;

/// A chain without a hot cache over `plugins`, in order.
fn chain_over(plugins: Vec<PluginBackend>, timeout_s: f64) -> Chain {
    let mut config = config_for("x", "kvhost_mem", "mem", &[]);
    config.local_cpu = false;
    config.max_local_cpu_size = 0.0;
    config.blocking_timeout_secs = timeout_s;
    Chain::new(ChainSettings::from_config(&config), plugins).expect("chain")
}

fn mem(name: &str, extra: &[(&str, &str)]) -> PluginBackend {
    must_load(name, "kvhost_mem", "mem", extra)
}

fn put(chain: &Chain, keys: &[ChunkKey], data: &[Arc<[u8]>]) -> Vec<LentPutItem> {
    let (tx, rx) = crossbeam_channel::bounded(1);
    let metas = vec![Default::default(); keys.len()];
    chain.put_lent(keys.to_vec(), data.to_vec(), metas, move |items| {
        tx.send(items).unwrap()
    });
    rx.recv_timeout(Duration::from_secs(20))
        .expect("put completes")
}

fn get(chain: &Chain, keys: &[ChunkKey], caps: &[usize]) -> LentGetDone<Vec<u8>> {
    let (tx, rx) = crossbeam_channel::bounded(1);
    let bufs = caps.iter().map(|&c| vec![0u8; c]).collect();
    chain.get_lent(keys.to_vec(), bufs, move |done| tx.send(done).unwrap());
    rx.recv_timeout(Duration::from_secs(20))
        .expect("get completes")
}

fn exists(chain: &Chain, keys: &[ChunkKey]) -> Vec<Presence> {
    let (tx, rx) = crossbeam_channel::bounded(1);
    chain.exists_lent(keys.to_vec(), move |p| tx.send(p).unwrap());
    rx.recv_timeout(Duration::from_secs(20))
        .expect("exists completes")
}

fn data(seed: u8, len: usize) -> Arc<[u8]> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31) ^ seed)
        .collect()
}

#[test]
fn round_trip_into_caller_buffers_through_every_tier() {
    let chain = chain_over(vec![mem("a", &[]), mem("b", &[])], 10.0);
    let keys: Vec<ChunkKey> = (1..=4).map(key).collect();
    let chunks: Vec<Arc<[u8]>> = (0..4).map(|i| data(i, 3000 + i as usize)).collect();
    assert!(put(&chain, &keys, &chunks).iter().all(Result::is_ok));
    // Write-through: both tiers hold every chunk.
    for p in chain.plugins() {
        let present = p.contains(&keys, false).unwrap();
        assert!(present.iter().all(|p| matches!(p, Presence::Present(_))));
    }
    let done = get(&chain, &keys, &[4000; 4]);
    for ((item, buf), chunk) in done.items.iter().zip(&done.bufs).zip(&chunks) {
        assert!(
            matches!(item, GetItem::Hit { len, .. } if *len == chunk.len()),
            "{item:?}"
        );
        assert_eq!(&buf[..chunk.len()], &chunk[..]);
        assert!(
            buf[chunk.len()..].iter().all(|&b| b == 0),
            "written past the chunk"
        );
    }
    // A buffer too small is reported, never truncated.
    let small = get(&chain, &keys[..1], &[100]);
    assert_eq!(small.items[0], GetItem::TooSmall { needed: 3000 });
    chain.close(Duration::from_secs(5));
}

#[test]
fn a_miss_or_failure_in_one_tier_falls_through_to_the_next() {
    // Tier 1 fails every lookup and never reports its gets (the `liar` fixture); tier 2 has the data.
    let liar = must_load("liar", fixture("fx_liar").to_str().unwrap(), "liar", &[]);
    let chain = chain_over(vec![liar, mem("m", &[])], 10.0);
    let keys: Vec<ChunkKey> = (10..13).map(key).collect();
    let chunks: Vec<Arc<[u8]>> = (0..3).map(|i| data(i, 1024)).collect();
    // The liar's puts succeed (it is a black hole); mem stores.
    let stored = put(&chain, &keys, &chunks);
    assert!(stored.iter().all(Result::is_ok), "{stored:?}");
    let present = exists(&chain, &keys);
    assert!(
        present.iter().all(|p| matches!(p, Presence::Present(_))),
        "{present:?}"
    );
    let done = get(&chain, &keys, &[1024; 3]);
    for ((item, buf), chunk) in done.items.iter().zip(&done.bufs).zip(&chunks) {
        assert!(matches!(item, GetItem::Hit { .. }), "{item:?}");
        assert_eq!(&buf[..], &chunk[..]);
    }
    // A key no tier has: the liar's failure is what is reported.
    let missing = get(&chain, &[key(99)], &[1024]);
    assert!(
        matches!(&missing.items[0], GetItem::Failed(_, why) if why.contains("liar")),
        "{:?}",
        missing.items
    );
    chain.close(Duration::from_secs(5));
}

#[test]
fn remove_reaches_every_tier_and_a_chain_without_tiers_refuses_puts() {
    let chain = chain_over(vec![mem("a", &[]), mem("b", &[])], 10.0);
    let keys: Vec<ChunkKey> = (20..22).map(key).collect();
    put(&chain, &keys, &[data(1, 64), data(2, 64)]);
    let (tx, rx) = crossbeam_channel::bounded(1);
    chain.remove_lent(vec![keys[0].clone(), key(999)], move |r| {
        tx.send(r).unwrap()
    });
    assert_eq!(
        rx.recv_timeout(Duration::from_secs(10)).unwrap(),
        vec![true, false]
    );
    let present = exists(&chain, &keys);
    assert!(matches!(present[0], Presence::Absent) && matches!(present[1], Presence::Present(_)));
    chain.close(Duration::from_secs(5));

    let empty = chain_over(Vec::new(), 1.0);
    let items = put(&empty, &keys[..1], &[data(3, 10)]);
    assert!(
        matches!(&items[0], Err(why) if why.contains("keeps nothing")),
        "{items:?}"
    );
}

#[test]
fn close_waits_for_lent_puts_and_a_hung_plugin_gives_buffers_back_on_destroy() {
    // A slow plugin: close waits for the lent put, which then succeeds.
    let chain = chain_over(vec![mem("slow", &[("delay_us", "200000")])], 10.0);
    let (tx, rx) = crossbeam_channel::bounded(1);
    let buf = data(7, 4096);
    chain.put_lent(
        vec![key(30)],
        vec![buf.clone()],
        vec![Default::default()],
        move |i| tx.send(i).unwrap(),
    );
    assert_eq!(
        Arc::strong_count(&buf),
        2,
        "the plugin holds the caller's buffer"
    );
    let report = chain.close(Duration::from_secs(5));
    assert!(report.unfinished.is_empty(), "{report:?}");
    assert_eq!(rx.try_recv().unwrap(), vec![Ok(())]);
    assert_eq!(Arc::strong_count(&buf), 1, "the buffer went back");

    // A hung plugin: close names the put, and destroy completes it (cancelled) with the buffer back.
    let hang = must_load("hang", fixture("fx_hang").to_str().unwrap(), "hang", &[]);
    let chain = chain_over(vec![hang], 0.2);
    let (tx, rx) = crossbeam_channel::bounded(1);
    chain.put_lent(
        vec![key(31)],
        vec![buf.clone()],
        vec![Default::default()],
        move |i| tx.send(i).unwrap(),
    );
    assert!(
        rx.try_recv().is_err(),
        "reported before the plugin completed"
    );
    let report = chain.close(Duration::from_millis(200));
    assert_eq!(report.unfinished.len(), 1, "{report:?}");
    let items = rx.recv_timeout(Duration::from_secs(5)).unwrap();
    assert!(
        matches!(&items[0], Err(why) if why.contains("CANCELED") || why.contains("canceled")),
        "{items:?}"
    );
    assert_eq!(Arc::strong_count(&buf), 1, "the buffer went back");
}
