//! Plugins that panic, throw, lie or hang: the host survives, reports precisely, and loses nothing.

use crate::util::*;
use kvhost::plugin::{GetItem, GetRequest, Presence, PutRequest, Status};
use kvhost_plugin_sdk::ChunkMeta;
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(10);

fn meta(len: usize) -> ChunkMeta {
    ChunkMeta {
        length: len as u64,
        ..ChunkMeta::default()
    }
}

#[test]
fn rust_panic_is_caught_and_poisons_the_backend() {
    logs();
    let p = must_load(
        "panicky",
        rust_fixture().to_str().unwrap(),
        "rust_mem",
        &[("panic_in", "contains"), ("put_delay_ms", "300")],
    );
    // A slow put is pending on the plugin's worker when the panic happens.
    let (tx, rx) = crossbeam_channel::bounded(1);
    p.put(
        PutRequest {
            keys: vec![key(1)],
            bufs: vec![vec![1u8; 8]],
            metas: vec![meta(8)],
        },
        move |d| {
            let _ = tx.send(d);
        },
    );
    let err = p.contains(&[key(1)], false).unwrap_err();
    assert_eq!(err.status, Status::PANIC);
    assert!(err.message.contains("told to panic in contains"), "{err}");
    assert!(err.to_string().contains("plugin `panicky`"), "{err}");
    // Poisoned: later calls fail fast...
    let again = p.contains(&[key(1)], false).unwrap_err();
    assert_eq!(again.status, Status::POISONED);
    let g = p
        .get_wait(
            GetRequest {
                keys: vec![key(1)],
                bufs: vec![vec![0; 8]],
            },
            WAIT,
        )
        .unwrap();
    assert_eq!(g.error.as_ref().map(|e| e.status), Some(Status::POISONED));
    // ...and the operation pending at the time completes with an error.
    let pending = rx.recv_timeout(WAIT).expect("pending put completes");
    assert_eq!(pending.error.map(|e| e.status), Some(Status::POISONED));
    assert!(
        logs().contains("panic in contains: rust_mem was told to panic in contains"),
        "payload logged through the host"
    );
}

#[test]
fn rust_panic_in_create_is_a_load_error() {
    let e = load(
        "pc",
        rust_fixture().to_str().unwrap(),
        "rust_mem",
        &[("panic_in", "create")],
    )
    .unwrap_err();
    assert!(
        e.contains("create failed: PANIC") && e.contains("told to panic in create"),
        "{e}"
    );
}

#[test]
fn cpp_exception_is_caught_by_the_noexcept_wrapper() {
    logs();
    let p = must_load(
        "throws",
        fixture("fx_throws").to_str().unwrap(),
        "throws",
        &[],
    );
    let d = p
        .put_wait(
            PutRequest {
                keys: vec![key(2)],
                bufs: vec![vec![0u8; 4]],
                metas: vec![meta(4)],
            },
            WAIT,
        )
        .unwrap();
    let e = d.error.expect("put fails");
    assert_eq!(e.status, Status::PANIC);
    assert!(e.message.contains("disk on fire"), "{e}");
    // The plugin keeps serving its other operations.
    assert_eq!(
        p.contains(&[key(2)], false).unwrap(),
        vec![Presence::Absent]
    );
    assert!(logs().contains("disk on fire"));
}

#[test]
fn lying_statuses_are_mapped_not_trusted() {
    let path = fixture("fx_liar");
    let p = must_load(
        "liar",
        path.to_str().unwrap(),
        "liar",
        &[("mode", "status")],
    );
    let e = p.contains(&[key(3)], false).unwrap_err();
    assert_eq!(e.status, Status(12345));
    assert!(e.to_string().contains("UNKNOWN (12345)"), "{e}");
    let g = p
        .get_wait(
            GetRequest {
                keys: vec![key(3)],
                bufs: vec![vec![0; 8]],
            },
            WAIT,
        )
        .unwrap();
    assert!(
        matches!(&g.items[0], GetItem::Failed(s, why) if *s == Status::NO_RESULT && why.contains("did not report")),
        "{:?}",
        g.items
    );
    let r = p.remove(&[key(3)], true).unwrap();
    assert_eq!(r, vec![Status(777)]);
    assert_eq!(r[0].name(), None);
}

#[test]
fn overlong_lengths_and_bad_shapes_are_rejected() {
    let p = must_load(
        "liar2",
        fixture("fx_liar").to_str().unwrap(),
        "liar",
        &[("mode", "overlong")],
    );
    let g = p
        .get_wait(
            GetRequest {
                keys: vec![key(4)],
                bufs: vec![vec![0; 64]],
            },
            WAIT,
        )
        .unwrap();
    assert!(
        matches!(&g.items[0], GetItem::Failed(Status::INTERNAL, why) if why.contains("into a 64-byte buffer")),
        "{:?}",
        g.items
    );
    let c = p.contains(&[key(4)], false).unwrap();
    assert!(
        matches!(&c[0], Presence::Failed(_, why) if why.contains("9 dimensions")),
        "{c:?}"
    );
}

#[test]
fn double_completion_is_detected_and_ignored() {
    logs();
    let p = must_load(
        "liar3",
        fixture("fx_liar").to_str().unwrap(),
        "liar",
        &[("mode", "double_complete")],
    );
    let before = p.stale_completions();
    let d = p
        .put_wait(
            PutRequest {
                keys: vec![key(5)],
                bufs: vec![vec![0u8; 16]],
                metas: vec![meta(16)],
            },
            WAIT,
        )
        .unwrap();
    assert!(d.error.is_none());
    let deadline = Instant::now() + WAIT;
    while p.stale_completions() == before && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(
        p.stale_completions() > before,
        "the second completion was counted"
    );
    // The counter moves just before the log line is written: wait for the line.
    let named = || {
        logs()
            .lines()
            .any(|l| l.contains("liar3") && l.contains("not pending"))
    };
    while !named() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(named(), "the log names the plugin that completed twice");
    drop(p);
}

#[test]
fn sync_status_with_a_callback_is_handled_once() {
    let p = must_load(
        "liar4",
        fixture("fx_liar").to_str().unwrap(),
        "liar",
        &[("mode", "sync_and_callback")],
    );
    let (tx, rx) = crossbeam_channel::unbounded();
    p.put(
        PutRequest {
            keys: vec![key(6)],
            bufs: vec![vec![0u8; 16]],
            metas: vec![meta(16)],
        },
        move |d| {
            let _ = tx.send(d.error.is_none());
        },
    );
    assert!(rx.recv_timeout(WAIT).is_ok());
    assert!(
        rx.recv_timeout(Duration::from_millis(200)).is_err(),
        "on_done ran exactly once"
    );
}

#[test]
fn hung_operations_time_out_and_destroy_cancels_them() {
    let p = must_load("hang", fixture("fx_hang").to_str().unwrap(), "hang", &[]);
    let e = p
        .put_wait(
            PutRequest {
                keys: vec![key(7)],
                bufs: vec![vec![0u8; 1 << 20]],
                metas: vec![meta(1 << 20)],
            },
            Duration::from_millis(200),
        )
        .unwrap_err();
    assert_eq!(e.status, Status::TIMEOUT);
    assert!(
        e.to_string().contains("plugin `hang`: put failed: TIMEOUT"),
        "{e}"
    );
    assert_eq!(
        p.pending_ops(),
        1,
        "the buffer stays with the pending operation"
    );
    let (tx, rx) = crossbeam_channel::bounded(1);
    p.get(
        GetRequest {
            keys: vec![key(7)],
            bufs: vec![vec![0u8; 64]],
        },
        move |d| {
            let _ = tx.send(d);
        },
    );
    drop(p); // destroy completes everything with CANCELED
    let g = rx
        .recv_timeout(WAIT)
        .expect("destroy completed the hung get");
    assert_eq!(g.error.map(|e| e.status), Some(Status::CANCELED));
}

#[test]
fn hung_async_lookups_and_removes_time_out_and_late_pins_are_released() {
    let p = must_load("hang", fixture("fx_hang").to_str().unwrap(), "hang", &[]);
    let health = |p: &kvhost::plugin::PluginBackend| p.health().unwrap().unwrap();
    let started = Instant::now();
    let (late_tx, late_rx) = crossbeam_channel::bounded(1);
    let e = p
        .contains_wait_or_late(
            &[key(1), key(2)],
            true,
            Duration::from_millis(200),
            move |d| {
                let _ = late_tx.send(d);
            },
        )
        .unwrap_err();
    assert_eq!(e.status, Status::TIMEOUT);
    assert!(
        e.to_string()
            .contains("plugin `hang`: contains failed: TIMEOUT"),
        "{e}"
    );
    let e = p
        .remove_wait(&[key(3)], true, Duration::from_millis(200))
        .unwrap_err();
    assert_eq!(e.status, Status::TIMEOUT);
    assert!(
        started.elapsed() < WAIT,
        "the calling thread was held {:?}",
        started.elapsed()
    );
    assert_eq!(p.pending_ops(), 2, "both stay pending with their arrays");
    // The lookup completes after the host gave up, pinning both keys: the late completion reaches
    // the caller's handler, which owes two unpins (the chain's lookup module pays them; see below).
    p.flush().unwrap();
    assert_eq!(health(&p), "pins=2");
    assert_eq!(p.pending_ops(), 1);
    let late = late_rx
        .recv_timeout(WAIT)
        .expect("the late lookup was handed over");
    assert_eq!(late.keys, [key(1), key(2)]);
    assert!(late.error.is_none());
    assert!(
        late.items.iter().all(|i| matches!(i, Presence::Present(_))),
        "{late:?}"
    );
    p.unpin(&late.keys).unwrap();
    assert_eq!(health(&p), "pins=0", "the late pins were released");
    // A plain contains_wait drops a late completion.
    let e = p
        .contains_wait(&[key(4)], false, Duration::from_millis(50))
        .unwrap_err();
    assert_eq!(e.status, Status::TIMEOUT);
    // An unpinned late lookup leaves nothing to release.
    p.flush().unwrap();
    assert_eq!(health(&p), "pins=0");
    let (tx, rx) = crossbeam_channel::bounded(1);
    p.contains_async(vec![key(5)], false, move |d| {
        let _ = tx.send(d);
    });
    drop(p); // destroy cancels the parked remove and lookup
    let d = rx.recv_timeout(WAIT).expect("destroy completed the lookup");
    assert_eq!(d.error.map(|e| e.status), Some(Status::CANCELED));
    assert!(matches!(d.items[0], Presence::Failed(Status::CANCELED, _)));
}

#[test]
fn a_hung_tier_never_holds_a_lookup_or_remove_past_the_read_timeout() {
    let hang = fixture("fx_hang");
    let y = format!(
        "chunk_size: 16\nmax_local_cpu_size: 0.0625\nlocal_cpu_prefault: false\n\
         blocking_timeout_secs: 0.3\npin_check_interval_sec: 0.05\nstorage_plugins: [hang, mem]\nextra_config:\n  \
         storage_plugin.hang.module_path: {}\n  storage_plugin.hang.class_name: hang\n  \
         storage_plugin.mem.module_path: kvhost_mem\n  storage_plugin.mem.class_name: mem\n",
        hang.display()
    );
    let config = kvhost::config::Config::from_yaml(&y, None).unwrap();
    let chain = kvhost::chain::Chain::from_config(&config).unwrap();
    let hung = chain.plugins()[0].clone();
    // A pinning lookup the hung tier answers only after the chain gave up: the pin monitor releases
    // those pins without waiting for another lookup.
    let pinned = chain.lookup(&[key(40), key(41)], Some("late"));
    assert_eq!(pinned.hit_chunks, 0);
    hung.flush().unwrap();
    assert_eq!(hung.health().unwrap().unwrap(), "pins=2");
    let deadline = Instant::now() + WAIT;
    while hung.health().unwrap().unwrap() != "pins=0" {
        assert!(Instant::now() < deadline, "late pins were never released");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(chain.unpin("late"), 0, "nothing was pinned for the caller");
    // Stored in the second tier only, behind the hung one.
    let k = key(42);
    let mem = chain.plugins()[1].clone();
    let done = mem
        .put_wait(
            PutRequest {
                keys: vec![k.clone()],
                bufs: vec![vec![9u8; 4096]],
                metas: vec![meta(4096)],
            },
            WAIT,
        )
        .unwrap();
    assert!(done.error.is_none() && done.items == [Status::OK]);
    let started = Instant::now();
    let lookup = chain.lookup(std::slice::from_ref(&k), None);
    let took = started.elapsed();
    assert_eq!(lookup.hit_chunks, 1, "the tier behind the hung one answers");
    assert_eq!(lookup.by_tier[0].0, "mem");
    assert!(
        took >= Duration::from_millis(250) && took < Duration::from_secs(5),
        "the hung tier is waited for the read timeout only: {took:?}"
    );
    let got = chain.get(std::slice::from_ref(&k));
    assert!(got[0].is_some(), "promoted from mem past the hung tier");
    let started = Instant::now();
    chain.remove(std::slice::from_ref(&k));
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "remove was held {:?}",
        started.elapsed()
    );
    let after = mem.contains(std::slice::from_ref(&k), false).unwrap();
    assert_eq!(after, [Presence::Absent], "the healthy tier removed it");
    assert_eq!(hung.pending_ops(), 3, "lookup x2 and remove");
}

#[test]
fn rust_plugin_log_and_tracing_events_reach_the_host_under_its_name() {
    logs();
    let _p = must_load("chatty", rust_fixture().to_str().unwrap(), "rust_mem", &[]);
    let text = logs();
    let line = |needle: &str| {
        text.lines()
            .any(|l| l.contains("chatty") && l.contains(needle))
    };
    assert!(
        line("rust_mem created (panic_in=none)"),
        "log crate event:\n{text}"
    );
    assert!(
        line("rust_mem traced its creation"),
        "tracing event:\n{text}"
    );
}

#[test]
fn a_panic_in_a_plugin_worker_thread_poisons_the_backend() {
    logs();
    let p = must_load(
        "workerpanic",
        rust_fixture().to_str().unwrap(),
        "rust_mem",
        &[("panic_in", "worker")],
    );
    let d = p
        .put_wait(
            PutRequest {
                keys: vec![key(8)],
                bufs: vec![vec![1u8; 8]],
                metas: vec![meta(8)],
            },
            WAIT,
        )
        .unwrap();
    // The request the worker held when it panicked completes as it unwinds.
    assert_eq!(d.error.map(|e| e.status), Some(Status::CANCELED));
    let deadline = Instant::now() + WAIT;
    let mut last = None;
    while Instant::now() < deadline {
        match p.contains(&[key(8)], false) {
            Err(e) if e.status == Status::POISONED => {
                last = Some(e);
                break;
            }
            _ => std::thread::sleep(Duration::from_millis(5)),
        }
    }
    assert!(
        last.is_some(),
        "the backend is poisoned after its worker panicked"
    );
    let named = || {
        logs()
            .lines()
            .any(|l| l.contains("panic in a worker thread of `workerpanic`"))
    };
    while !named() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(
        named(),
        "the panic is logged through the host under the instance name"
    );
}
