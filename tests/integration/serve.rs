//! `kvhost serve`: LMCache's `lm://` protocol, driven by our Rust client; every bad input closes only
//! its own connection, moves a counter, and leaves the server and stored data intact.

use crate::chain::chain_with;
use kvhost::chain::Chain;
use kvhost::serve::client::LmClient;
use kvhost::serve::protocol::{self, Command};
use kvhost::serve::{CloseReason, ServeConfig, Server};
use kvhost_plugin_sdk::ChunkMeta;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

const KEY: &str = "meta-llama/Llama-3.1-8B-Instruct@1@0@-5eed@bfloat16";

fn key(n: u32) -> String {
    format!("meta-llama/Llama-3.1-8B-Instruct@1@0@{n:x}@bfloat16")
}

fn meta() -> ChunkMeta {
    ChunkMeta {
        length: 0,
        fmt: 1,
        dtype: 3,
        ndim: 4,
        shape: [2, 32, 256, 1024],
        reserved: 0,
    }
}

fn data(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

fn server(chain: Chain) -> Server {
    let config = ServeConfig {
        stall_timeout: Duration::from_millis(400),
        max_chunk_bytes: 64 << 20,
        ..ServeConfig::default()
    };
    Server::start(chain, "127.0.0.1:0".parse().unwrap(), config).unwrap()
}

/// Wait until the server has closed `stream` (read returns 0 or an error).
fn assert_closed(stream: &mut TcpStream) {
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut b = [0u8; 64];
    loop {
        match stream.read(&mut b) {
            Ok(0) | Err(_) => return,
            Ok(_) => continue,
        }
    }
}

fn wait_counter(server: &Server, reason: CloseReason, at_least: u64) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while server.stats().closed_for(reason) < at_least && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(
        server.stats().closed_for(reason) >= at_least,
        "{reason:?} counter did not move"
    );
}

#[test]
fn put_get_exist_health_list_round_trip() {
    let srv = server(chain_with("mem", 64, ""));
    let mut c = LmClient::connect(srv.local_addr()).unwrap();
    let body = data(7, 3 << 20);
    c.put(KEY, &body, &meta()).unwrap();
    let (r, got) = c.get(KEY).unwrap().expect("hit");
    assert_eq!(got, body, "the exact bytes");
    assert_eq!(
        (r.code, r.length, r.fmt, r.dtype, r.shape),
        (200, body.len() as u64, 1, 3, [2, 32, 256, 1024])
    );
    assert!(c.exists(KEY).unwrap());
    assert!(!c.exists(&key(999)).unwrap());
    assert!(c.get(&key(999)).unwrap().is_none(), "miss answers FAIL");
    assert!(c.health().unwrap());
    assert_eq!(c.list().unwrap(), vec![KEY.to_string()]);
    // A second PUT of the same key is consumed and ignored; the connection stays in sync.
    c.put(KEY, &data(9, 1000), &meta()).unwrap();
    assert_eq!(c.get(KEY).unwrap().unwrap().1, body);
    srv.shutdown();
    srv.wait();
}

#[test]
fn many_connections_at_once_each_in_order() {
    let srv = server(chain_with("mem", 64, ""));
    let addr = srv.local_addr();
    std::thread::scope(|s| {
        for t in 0..8u32 {
            s.spawn(move || {
                let mut c = LmClient::connect(addr).unwrap();
                for i in 0..20u32 {
                    let k = key(t * 1000 + i);
                    let body = data((t + i) as u8, 50_000 + i as usize);
                    c.put(&k, &body, &meta()).unwrap();
                    // Requests on one connection are served in order: the GET sees the PUT before it.
                    assert_eq!(c.get(&k).unwrap().expect("own put").1, body);
                }
            });
        }
    });
    assert_eq!(
        srv.stats()
            .puts_stored
            .load(std::sync::atomic::Ordering::Relaxed),
        160
    );
    srv.shutdown();
    srv.wait();
}

/// Store a chunk with a good client, run `misbehave` on a raw connection, then check the counter for
/// `reason` moved, the bad connection is closed, and a good client still gets the stored bytes.
fn bad_input(reason: CloseReason, misbehave: impl FnOnce(&mut TcpStream)) {
    let srv = server(chain_with("", 64, ""));
    let mut good = LmClient::connect(srv.local_addr()).unwrap();
    let body = data(1, 100_000);
    good.put(KEY, &body, &meta()).unwrap();
    assert!(good.health().unwrap());
    let mut bad = TcpStream::connect(srv.local_addr()).unwrap();
    misbehave(&mut bad);
    assert_closed(&mut bad);
    wait_counter(&srv, reason, 1);
    assert!(good.health().unwrap(), "the server still answers others");
    assert_eq!(
        good.get(KEY).unwrap().expect("still stored").1,
        body,
        "nothing stored was lost"
    );
    let mut fresh = LmClient::connect(srv.local_addr()).unwrap();
    assert!(fresh.exists(KEY).unwrap());
    srv.shutdown();
    srv.wait();
}

fn header(command: Command, len: u32, key: &str) -> [u8; protocol::REQUEST_HEADER_LEN] {
    protocol::encode_request(command, len, 1, 3, [1, 2, 3, 4], key).unwrap()
}

#[test]
fn bad_command_closes_the_connection() {
    bad_input(CloseReason::BadCommand, |s| {
        let mut h = header(Command::Get, 0, KEY);
        h[0..4].copy_from_slice(&42i32.to_le_bytes());
        s.write_all(&h).unwrap();
    });
}

#[test]
fn negative_length_closes_the_connection() {
    bad_input(CloseReason::BadLength, |s| {
        let mut h = header(Command::Put, 0, &key(1));
        h[4..8].copy_from_slice(&(-1i32).to_le_bytes());
        s.write_all(&h).unwrap();
    });
}

#[test]
fn oversized_length_closes_the_connection() {
    bad_input(CloseReason::BadLength, |s| {
        s.write_all(&header(Command::Put, (64 << 20) + 1, &key(2)))
            .unwrap();
    });
}

#[test]
fn truncated_body_is_not_stored_and_closes_the_connection() {
    let truncated = key(3);
    let t = truncated.clone();
    bad_input(CloseReason::Truncated, move |s| {
        s.write_all(&header(Command::Put, 1 << 20, &t)).unwrap();
        s.write_all(&[0u8; 1000]).unwrap();
        s.shutdown(std::net::Shutdown::Write).unwrap();
    });
}

#[test]
fn a_key_that_does_not_parse_closes_the_connection() {
    bad_input(CloseReason::BadKey, |s| {
        s.write_all(&header(Command::Get, 0, "no@at@signs@enough"))
            .unwrap();
    });
}

#[test]
fn a_stalled_client_is_closed_after_the_stall_timeout() {
    bad_input(CloseReason::Stalled, |s| {
        let h = header(Command::Put, 4096, &key(4));
        s.write_all(&h[..100]).unwrap(); // part of a header, then nothing
    });
}

#[test]
fn a_partial_put_is_never_visible() {
    let srv = server(chain_with("", 64, ""));
    let mut bad = TcpStream::connect(srv.local_addr()).unwrap();
    bad.write_all(&header(Command::Put, 1 << 20, &key(5)))
        .unwrap();
    bad.write_all(&[7u8; 4096]).unwrap();
    drop(bad);
    wait_counter(&srv, CloseReason::Truncated, 1);
    let mut c = LmClient::connect(srv.local_addr()).unwrap();
    assert!(!c.exists(&key(5)).unwrap());
    assert_eq!(
        srv.stats()
            .puts_stored
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
    srv.shutdown();
    srv.wait();
}

#[test]
fn metrics_endpoint_speaks_prometheus() {
    let chain = chain_with("mem", 16, "");
    let srv = server(chain.clone());
    let mut c = LmClient::connect(srv.local_addr()).unwrap();
    c.put(KEY, &data(3, 4096), &meta()).unwrap();
    c.get(KEY).unwrap().unwrap();
    let mut bad = TcpStream::connect(srv.local_addr()).unwrap();
    let mut h = header(Command::Get, 0, KEY);
    h[0..4].copy_from_slice(&9i32.to_le_bytes());
    bad.write_all(&h).unwrap();
    assert_closed(&mut bad);
    wait_counter(&srv, CloseReason::BadCommand, 1);
    let addr = kvhost::serve::metrics::start(
        "127.0.0.1:0".parse().unwrap(),
        chain,
        srv.stats().clone(),
        "m".into(),
        0,
    )
    .unwrap();
    let mut http = TcpStream::connect(addr).unwrap();
    http.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut text = String::new();
    http.read_to_string(&mut text).unwrap();
    for line in [
        "# TYPE lmcache:num_store_requests counter",
        "lmcache:num_store_requests{model_name=\"m\",worker_id=\"0\"} 1",
        "lmcache:num_retrieve_requests{model_name=\"m\",worker_id=\"0\"} 1",
        "kvhost_serve_connections_closed_total{model_name=\"m\",worker_id=\"0\",reason=\"bad_command\"} 1",
        "kvhost_tier_queue_depth{model_name=\"m\",worker_id=\"0\",tier=\"mem\"}",
        "kvhost_tier_latency_seconds{model_name=\"m\",worker_id=\"0\",tier=\"mem\",op=\"put\",quantile=\"0.99\"}",
    ] {
        assert!(text.contains(line), "missing `{line}` in:\n{text}");
    }
    srv.shutdown();
    srv.wait();
}

/// The budget for PUT bodies in progress is shared by all connections: while one client holds most of
/// it with an unfinished body, another client's PUT that does not fit is refused (its body read and
/// dropped, so its connection stays in step), counted, and not stored; once the first body completes,
/// PUTs are accepted again.
#[test]
fn put_bodies_past_the_shared_budget_are_refused_and_counted() {
    let config = ServeConfig {
        stall_timeout: Duration::from_secs(5),
        max_chunk_bytes: 1 << 20,
        put_body_budget: 1 << 20,
        ..ServeConfig::default()
    };
    let srv = Server::start(
        chain_with("", 64, ""),
        "127.0.0.1:0".parse().unwrap(),
        config,
    )
    .unwrap();
    let stats = srv.stats().clone();
    let load = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
    // Client A: a 768 KiB body, of which only the first half arrives for now.
    let a_body = data(1, 768 << 10);
    let mut a = TcpStream::connect(srv.local_addr()).unwrap();
    a.write_all(&header(Command::Put, a_body.len() as u32, &key(1)))
        .unwrap();
    a.write_all(&a_body[..a_body.len() / 2]).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while load(&stats.put_body_bytes_staged) == 0 {
        assert!(Instant::now() < deadline, "A's body was never staged");
        std::thread::sleep(Duration::from_millis(5));
    }
    // Client B: 512 KiB more than the 1 MiB budget can hold now.
    let mut b = LmClient::connect(srv.local_addr()).unwrap();
    b.put(&key(2), &data(2, 512 << 10), &meta()).unwrap();
    assert!(!b.exists(&key(2)).unwrap(), "the refused PUT is not stored");
    assert_eq!(load(&stats.puts_over_budget), 1);
    assert!(b.health().unwrap(), "B's connection is still in step");
    // A finishes; its PUT is stored and the budget is free again.
    a.write_all(&a_body[a_body.len() / 2..]).unwrap();
    let mut a = LmClient::from_stream(a);
    assert_eq!(a.get(&key(1)).unwrap().expect("A stored").1, a_body);
    assert_eq!(load(&stats.put_body_bytes_staged), 0);
    b.put(&key(3), &data(3, 512 << 10), &meta()).unwrap();
    assert!(b.exists(&key(3)).unwrap());
    assert_eq!(load(&stats.puts_over_budget), 1);
    srv.shutdown();
    srv.wait();
}

/// Connections past `max_connections` are closed at once and counted; the ones open keep working.
#[test]
fn connections_past_max_connections_are_refused() {
    let config = ServeConfig {
        max_connections: 2,
        ..ServeConfig::default()
    };
    let srv = Server::start(
        chain_with("", 16, ""),
        "127.0.0.1:0".parse().unwrap(),
        config,
    )
    .unwrap();
    let mut first = LmClient::connect(srv.local_addr()).unwrap();
    let mut second = LmClient::connect(srv.local_addr()).unwrap();
    assert!(first.health().unwrap() && second.health().unwrap());
    let mut third = TcpStream::connect(srv.local_addr()).unwrap();
    assert_closed(&mut third);
    wait_counter(&srv, CloseReason::TooManyConnections, 1);
    assert!(first.health().unwrap());
    drop(second);
    // A slot is free again once a connection leaves.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let ok = LmClient::connect(srv.local_addr())
            .and_then(|mut c| c.health())
            .unwrap_or(false);
        if ok {
            break;
        }
        assert!(Instant::now() < deadline, "no slot after a connection left");
        std::thread::sleep(Duration::from_millis(20));
    }
    srv.shutdown();
    srv.wait();
}
