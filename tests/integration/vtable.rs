//! Every vtable entry of the C plugins, called through the host binding.

use crate::util::*;
use kvhost::plugin::{GetItem, GetRequest, Presence, PutRequest, Status};
use kvhost_plugin_sdk::abi;
use kvhost_plugin_sdk::ChunkMeta;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(10);

fn meta(len: usize) -> ChunkMeta {
    ChunkMeta {
        length: len as u64,
        fmt: abi::KVH_FMT_KV_2LTD,
        dtype: abi::KVH_DTYPE_FLOAT16,
        ndim: 3,
        shape: [2, 4, 8, 0],
        reserved: 0,
    }
}

#[test]
fn mem_plugin_every_entry() {
    let p = must_load("mem", "kvhost_mem", "mem", &[("capacity_bytes", "10000")]);
    let info = p.info().clone();
    assert_eq!(info.class_name, "mem");
    for bit in [
        abi::KVH_CAP_PIN,
        abi::KVH_CAP_PREFETCH,
        abi::KVH_CAP_FLUSH,
        abi::KVH_CAP_HEALTH,
    ] {
        assert!(p.has(bit), "mem advertises {bit:#x}");
    }
    let (a, b, c) = (key(1), key(2), key(3));
    // put (async) + contains with metadata
    let done = p
        .put_wait(
            PutRequest {
                keys: vec![a.clone(), b.clone()],
                bufs: vec![vec![1u8; 4000], vec![2u8; 4000]],
                metas: vec![meta(4000), meta(4000)],
            },
            WAIT,
        )
        .unwrap();
    assert_eq!(done.items, vec![Status::OK, Status::OK]);
    assert_eq!(
        p.contains(&[a.clone(), c.clone()], false).unwrap(),
        vec![Presence::Present(meta(4000)), Presence::Absent]
    );
    // get: hit, miss, too small
    let g = p
        .get_wait(
            GetRequest {
                keys: vec![a.clone(), c.clone(), b.clone()],
                bufs: vec![vec![0; 4000], vec![0; 10], vec![0; 100]],
            },
            WAIT,
        )
        .unwrap();
    assert_eq!(
        g.items[0],
        GetItem::Hit {
            len: 4000,
            meta: meta(4000)
        }
    );
    assert_eq!(g.items[1], GetItem::Miss);
    assert_eq!(g.items[2], GetItem::TooSmall { needed: 4000 });
    assert!(g.request.bufs[0].iter().all(|&x| x == 1));
    // pin a, then overflow capacity: FIFO would evict a first, but it is pinned, so b goes.
    assert_eq!(p.pin(std::slice::from_ref(&a)).unwrap(), vec![Status::OK]);
    let d = p
        .put_wait(
            PutRequest {
                keys: vec![c.clone()],
                bufs: vec![vec![3u8; 4000]],
                metas: vec![meta(4000)],
            },
            WAIT,
        )
        .unwrap();
    assert_eq!(d.items, vec![Status::OK]);
    let pres = p
        .contains(&[a.clone(), b.clone(), c.clone()], false)
        .unwrap();
    assert_eq!(
        pres,
        vec![
            Presence::Present(meta(4000)),
            Presence::Absent,
            Presence::Present(meta(4000))
        ],
        "pinned a survives FIFO eviction"
    );
    // a chunk larger than the capacity gets NO_SPACE, not a silent drop
    let big = p
        .put_wait(
            PutRequest {
                keys: vec![key(9)],
                bufs: vec![vec![0u8; 20000]],
                metas: vec![meta(20000)],
            },
            WAIT,
        )
        .unwrap();
    assert_eq!(big.items, vec![Status::NO_SPACE]);
    // remove without force keeps a pinned key; with force removes it
    assert_eq!(
        p.remove(std::slice::from_ref(&a), false).unwrap(),
        vec![Status::BUSY]
    );
    assert_eq!(p.unpin(std::slice::from_ref(&a)).unwrap(), vec![Status::OK]);
    assert_eq!(p.pin(std::slice::from_ref(&a)).unwrap(), vec![Status::OK]);
    assert_eq!(
        p.remove(std::slice::from_ref(&a), true).unwrap(),
        vec![Status::OK]
    );
    assert_eq!(
        p.remove(std::slice::from_ref(&a), true).unwrap(),
        vec![Status::NOT_FOUND]
    );
    // prefetch (async), flush, health
    let pf = p.prefetch_wait(vec![c.clone(), a.clone()], WAIT).unwrap();
    assert_eq!(pf.items, vec![Status::OK, Status::NOT_FOUND]);
    p.flush().unwrap();
    let h = p.health().expect("has health").unwrap();
    assert!(h.contains("mem"), "{h}");
    assert_eq!(p.pending_ops(), 0);
}

#[test]
fn log_plugin_logs_every_call_and_stores_nothing() {
    logs();
    let p = must_load("logtest", "kvhost_log", "log", &[("level", "info")]);
    assert!(p.has(abi::KVH_CAP_DISCARDS));
    let k = key(0x1234);
    let d = p
        .put_wait(
            PutRequest {
                keys: vec![k.clone()],
                bufs: vec![vec![7u8; 321]],
                metas: vec![meta(321)],
            },
            WAIT,
        )
        .unwrap();
    assert_eq!(d.items, vec![Status::OK]);
    assert_eq!(
        p.contains(std::slice::from_ref(&k), true).unwrap(),
        vec![Presence::Absent]
    );
    let g = p
        .get_wait(
            GetRequest {
                keys: vec![k.clone()],
                bufs: vec![vec![0; 321]],
            },
            WAIT,
        )
        .unwrap();
    assert_eq!(g.items, vec![GetItem::Miss]);
    assert_eq!(p.pin(std::slice::from_ref(&k)).unwrap(), vec![Status::OK]);
    assert_eq!(p.unpin(std::slice::from_ref(&k)).unwrap(), vec![Status::OK]);
    assert_eq!(
        p.remove(std::slice::from_ref(&k), true).unwrap(),
        vec![Status::OK]
    );
    p.flush().unwrap();
    assert!(p.health().unwrap().is_ok());
    let text = logs();
    let canonical = k.as_str();
    for call in ["put", "contains", "get", "pin", "unpin", "remove"] {
        let found = text
            .lines()
            .any(|l| l.contains("logtest") && l.contains(call) && l.contains(canonical));
        assert!(
            found,
            "no `{call}` log line with the key for plugin logtest in:\n{text}"
        );
    }
    assert!(
        text.lines()
            .any(|l| l.contains("logtest") && l.contains("321")),
        "put size logged"
    );
}

#[test]
fn keys_reach_plugins_in_both_forms() {
    // The Rust fixture reports what it received; its contains answers by canonical string, so a key with
    // tags and a layer must round-trip through the structured and string forms intact.
    let p = must_load("rk", rust_fixture().to_str().unwrap(), "rust_mem", &[]);
    let k = kvhost::ChunkKey::build(
        "org/m",
        4,
        3,
        -0xdead,
        "bfloat16",
        Some(7),
        &[("user", "u1")],
    )
    .unwrap();
    assert_eq!(k.as_str(), "org/m@4@3@-dead@bfloat16@7@user%u1");
    p.put_wait(
        PutRequest {
            keys: vec![k.clone()],
            bufs: vec![vec![1; 10]],
            metas: vec![meta(10)],
        },
        WAIT,
    )
    .unwrap();
    let parsed = kvhost::ChunkKey::parse(k.as_str()).unwrap();
    assert_eq!(
        p.contains(&[parsed], false).unwrap(),
        vec![Presence::Present(meta(10))]
    );
}
