//! `kvhost bench --suite serve`: `lm://` PUT and GET throughput of `kvhost serve` against LMCache's own
//! Python server (`python -m lmcache.v1.server`), side by side in one run, with the same client.
//!
//! A last row times a fresh client while `kvhost serve` holds 10,000 idle connections (`idle`).
//!
//! The client is kvhost's Rust `lm://` client on one connection, as an LMCache worker uses one: it
//! sends what LMCache's connector sends and costs little, so the numbers measure the servers.

mod idle;

use super::micro::Row;
use crate::cache::CacheConfig;
use crate::chain::{Chain, ChainSettings};
use crate::config::Config;
use crate::serve::client::LmClient;
use crate::serve::{ServeConfig, Server};
use kvhost_plugin_sdk::ChunkMeta;
use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Sizes and volume of a run.
#[derive(Clone, Debug)]
pub struct ServeBenchOptions {
    /// Chunk sizes to measure.
    pub sizes: Vec<usize>,
    /// Bytes moved per size and direction, per rep.
    pub bytes_per_size: usize,
    /// Reps per size: each measures kvhost, LMCache and the loopback ceiling, in an order that
    /// rotates from rep to rep, with fresh keys; every side keeps its median.
    pub reps: usize,
}

impl Default for ServeBenchOptions {
    fn default() -> Self {
        ServeBenchOptions {
            sizes: vec![256 << 10, 4 << 20],
            bytes_per_size: 512 << 20,
            reps: 5,
        }
    }
}

fn free_port() -> std::io::Result<SocketAddr> {
    TcpListener::bind("127.0.0.1:0")?.local_addr()
}

struct Killed(Child);
impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// PUT then GET `n` chunks of `size` bytes under keys no earlier call used (`tag`); returns
/// (put MB/s, get MB/s).
fn drive(addr: SocketAddr, size: usize, n: usize, tag: u32) -> Result<(f64, f64), String> {
    let mut c = LmClient::connect(addr).map_err(|e| format!("connect {addr}: {e}"))?;
    let body: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
    let meta = ChunkMeta {
        length: size as u64,
        fmt: 1,
        dtype: 3,
        ndim: 3,
        shape: [2, 1, (size / 4) as i32, 0],
        reserved: 0,
    };
    let keys: Vec<String> = (0..n)
        .map(|i| {
            format!(
                "meta-llama/Llama-3.1-8B-Instruct@1@0@{:x}@bfloat16",
                (tag as usize) << 32 | i
            )
        })
        .collect();
    let t = Instant::now();
    for k in &keys {
        c.put(k, &body, &meta).map_err(|e| format!("put: {e}"))?;
    }
    // PUT has no reply; an EXIST on the same connection completes after every PUT before it.
    if !c.exists(&keys[n - 1]).map_err(|e| format!("exist: {e}"))? {
        return Err("the last PUT is not visible".into());
    }
    let put = t.elapsed();
    let mut buf = Vec::with_capacity(size);
    let t = Instant::now();
    for k in &keys {
        if c.get_into(k, &mut buf)
            .map_err(|e| format!("get: {e}"))?
            .is_none()
            || buf.len() != size
        {
            return Err(format!("GET {k} missed"));
        }
    }
    let get = t.elapsed();
    let mb = (size * n) as f64 / 1e6;
    Ok((mb / put.as_secs_f64(), mb / get.as_secs_f64()))
}

/// The machine's loopback ceiling for this access pattern: a bare TCP peer that answers a 1-byte
/// request with `size` bytes from a ready buffer (GET), or reads `size` bytes into one (PUT). No
/// protocol, no storage: no server can beat it.
fn loopback_ceiling(size: usize, n: usize) -> std::io::Result<(f64, f64)> {
    use std::io::{Read, Write};
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let peer = std::thread::spawn(move || -> std::io::Result<()> {
        let (mut s, _) = listener.accept()?;
        s.set_nodelay(true)?;
        let mut buf = vec![7u8; size];
        for _ in 0..n {
            s.read_exact(&mut buf)?;
        }
        s.write_all(&[1])?;
        let mut req = [0u8; 1];
        for _ in 0..n {
            s.read_exact(&mut req)?;
            s.write_all(&buf)?;
        }
        Ok(())
    });
    let mut c = std::net::TcpStream::connect(addr)?;
    c.set_nodelay(true)?;
    let mut buf = vec![1u8; size];
    let t = Instant::now();
    for _ in 0..n {
        c.write_all(&buf)?;
    }
    let mut ack = [0u8; 1];
    c.read_exact(&mut ack)?;
    let put = t.elapsed();
    let t = Instant::now();
    for _ in 0..n {
        c.write_all(&[0])?;
        c.read_exact(&mut buf)?;
    }
    let get = t.elapsed();
    peer.join()
        .map_err(|_| std::io::Error::other("peer panicked"))??;
    let mb = (size * n) as f64 / 1e6;
    Ok((mb / put.as_secs_f64(), mb / get.as_secs_f64()))
}

fn wait_listening(addr: SocketAddr, child: &mut Child) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(120);
    while Instant::now() < deadline {
        if std::net::TcpStream::connect(addr).is_ok() {
            return Ok(());
        }
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("LMCache's server exited with {status}"));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Err("LMCache's server did not start listening within 120 s".into())
}

/// Run the comparison. `python` is a Python with LMCache installed.
pub fn run(
    python: &Path,
    opts: &ServeBenchOptions,
    mut progress: impl FnMut(&str),
) -> Result<Vec<Row>, String> {
    let lm_addr = free_port().map_err(|e| e.to_string())?;
    progress("starting LMCache's server");
    let child = Command::new(python)
        .args([
            "-m",
            "lmcache.v1.server",
            &lm_addr.ip().to_string(),
            &lm_addr.port().to_string(),
            "cpu",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot run {}: {e}", python.display()))?;
    let mut lmcache = Killed(child);
    wait_listening(lm_addr, &mut lmcache.0)?;

    let mut settings =
        ChainSettings::from_config(&Config::from_yaml("", None).map_err(|e| e.to_string())?);
    settings.cache =
        CacheConfig::new((opts.bytes_per_size * opts.sizes.len() + (256 << 20)) as u64);
    // As `kvhost serve` runs by default: the arena is touched once at start, not on every PUT.
    settings.cache.arena.prefault = true;
    let chain = Chain::new(settings, Vec::new()).map_err(|e| e.to_string())?;
    let server = Server::start(
        chain.clone(),
        "127.0.0.1:0".parse().expect("address"),
        ServeConfig::default(),
    )
    .map_err(|e| e.to_string())?;

    let mut rows = Vec::new();
    for (i, &size) in opts.sizes.iter().enumerate() {
        let n = (opts.bytes_per_size / size).max(1);
        let label = if size >= 1 << 20 {
            format!("{} MiB", size >> 20)
        } else {
            format!("{} KiB", size >> 10)
        };
        // (put, get) MB/s of each rep: kvhost, LMCache, loopback.
        let mut runs: [Vec<(f64, f64)>; 3] = [Vec::new(), Vec::new(), Vec::new()];
        let reps = opts.reps.max(1);
        for rep in 0..reps {
            let tag = (rep * opts.sizes.len() + i) as u32;
            for side in (0..3).map(|k| (k + rep) % 3) {
                let step = format!("{label}, rep {} of {reps}", rep + 1);
                let got = match side {
                    0 => {
                        progress(&format!("{step}: kvhost"));
                        drive(server.local_addr(), size, n, tag)?
                    }
                    1 => {
                        progress(&format!("{step}: LMCache"));
                        drive(lm_addr, size, n, tag)?
                    }
                    _ => {
                        progress(&format!("{step}: loopback ceiling"));
                        loopback_ceiling(size, n).map_err(|e| e.to_string())?
                    }
                };
                runs[side].push(got);
            }
        }
        let medians = |side: &Vec<(f64, f64)>| {
            (
                super::micro::median(side.iter().map(|r| r.0).collect()),
                super::micro::median(side.iter().map(|r| r.1).collect()),
            )
        };
        let ((kv_put, kv_get), (lm_put, lm_get), (raw_put, raw_get)) =
            (medians(&runs[0]), medians(&runs[1]), medians(&runs[2]));
        for (op, kv, lm, raw) in [
            ("PUT", kv_put, lm_put, raw_put),
            ("GET", kv_get, lm_get, raw_get),
        ] {
            // 3x LMCache's server, unless that is past what bare loopback TCP moves on this
            // machine: then 0.9x of that ceiling (no server can beat it).
            let goal = (3.0 * lm).min(0.9 * raw);
            rows.push(Row {
                name: format!("serve {op} {label} chunks ({n} of them, one connection)"),
                value: kv,
                unit: "MB/s".into(),
                baseline: Some(lm),
                ratio: Some(kv / lm),
                target: format!(">= {:.2}x LMCache's server", goal / lm),
                met: Some(kv >= goal),
            });
            rows.push(Row {
                name: format!("  {op} {label}: kvhost vs bare loopback TCP (the ceiling)"),
                value: kv,
                unit: "MB/s".into(),
                baseline: Some(raw),
                ratio: Some(kv / raw),
                target: if goal < 3.0 * lm {
                    ">= 0.9x (3x LMCache is past it)".into()
                } else {
                    "report".into()
                },
                met: None,
            });
        }
    }
    server.shutdown();
    server.wait();
    chain.close(Duration::from_secs(5));
    rows.extend(idle::rows(&mut progress));
    Ok(rows)
}
