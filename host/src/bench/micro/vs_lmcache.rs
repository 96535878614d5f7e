//! `kvhost bench --suite micro --vs-lmcache`: the hot cache against LMCache 0.5.6's own
//! `LocalCPUBackend`, in the same run.
//!
//! LMCache runs in a child Python (`python/bench/lmcache_cpu.py`, carried in the binary) that answers
//! one JSON command per line. For every rep the two sides take turns on the same measurement (the
//! order alternates rep by rep), with the same chunk sizes, chunk counts and fresh keys; each row keeps
//! the median of each side. Ratios are kvhost over LMCache, as speed-ups (higher is better for kvhost).

use super::{finish, hot_only_chain, human, keys, mapped, median, meta, MicroOptions, Row};
use crate::chain::Chain;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::Instant;

/// The script, carried in the binary so the suite runs from any directory.
const SCRIPT: &str = include_str!("../../../../python/bench/lmcache_cpu.py");

/// Keys in the prefix walk.
const WALK: usize = 1000;
/// Bytes of one index-row chunk (LMCache's smallest object here: 16 tokens of one 64-wide head).
const SMALL: usize = 4096;

/// Why the side-by-side could not run.
#[derive(Debug, thiserror::Error)]
pub enum VsError {
    /// No LMCache virtualenv: nothing to compare against (a distinct exit code).
    #[error("no LMCache Python at {0}: build the LMCache virtualenv (`python3 -m venv ~/.cache/kvhost/lmcache-venv && ~/.cache/kvhost/lmcache-venv/bin/pip install lmcache==0.5.6`) or pass --lmcache-python")]
    NoLmcache(std::path::PathBuf),
    /// LMCache's side failed.
    #[error("LMCache side: {0}")]
    Lmcache(String),
}

struct Lmcache {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    dir: std::path::PathBuf,
}

impl Lmcache {
    fn start(python: &Path) -> Result<Lmcache, VsError> {
        if !python.is_file() {
            return Err(VsError::NoLmcache(python.to_path_buf()));
        }
        let err = |e: std::io::Error| VsError::Lmcache(e.to_string());
        let dir = std::env::temp_dir().join(format!("kvhost-vs-lmcache-{}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(err)?;
        std::fs::write(dir.join("lmcache_cpu.py"), SCRIPT).map_err(err)?;
        let mut child = Command::new(python)
            .arg(dir.join("lmcache_cpu.py"))
            .env("LMCACHE_LOG_LEVEL", "ERROR")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .map_err(|e| VsError::Lmcache(format!("cannot run {}: {e}", python.display())))?;
        let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            return Err(VsError::Lmcache("no pipes to the child".into()));
        };
        let mut me = Lmcache {
            child,
            stdin,
            stdout: BufReader::new(stdout),
            dir,
        };
        let hello = me.read()?;
        if hello.get("ready").is_none() {
            return Err(VsError::Lmcache(format!("unexpected greeting {hello}")));
        }
        Ok(me)
    }

    fn read(&mut self) -> Result<serde_json::Value, VsError> {
        let mut line = String::new();
        let n = self
            .stdout
            .read_line(&mut line)
            .map_err(|e| VsError::Lmcache(e.to_string()))?;
        if n == 0 {
            let status = self.child.wait().ok().and_then(|s| s.code());
            return Err(match status {
                Some(3) => VsError::Lmcache("LMCache or torch is not importable (exit 3)".into()),
                other => VsError::Lmcache(format!("the script exited ({other:?})")),
            });
        }
        let v: serde_json::Value = serde_json::from_str(&line)
            .map_err(|e| VsError::Lmcache(format!("bad answer {line:?}: {e}")))?;
        match v.get("error") {
            Some(e) => Err(VsError::Lmcache(e.to_string())),
            None => Ok(v),
        }
    }

    fn ask(&mut self, cmd: serde_json::Value) -> Result<serde_json::Value, VsError> {
        writeln!(self.stdin, "{cmd}").map_err(|e| VsError::Lmcache(e.to_string()))?;
        self.read()
    }
}

impl Drop for Lmcache {
    fn drop(&mut self) {
        let _ = writeln!(self.stdin, "{}", serde_json::json!({"op": "quit"}));
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn num(v: &serde_json::Value, field: &str) -> Result<f64, VsError> {
    v.get(field)
        .and_then(serde_json::Value::as_f64)
        .ok_or_else(|| VsError::Lmcache(format!("answer {v} has no `{field}`")))
}

/// One untimed put and get of `n` chunks of `size` (copies included), then an empty cache: the same
/// warm-up LMCache's side gets (`backend()` in the script). A prefaulted arena is not a warm one on
/// this VM: the first pass of puts over a fresh arena ran at 8-12 GB/s where the second ran at
/// 17-21 GB/s.
fn warm_up(chain: &Chain, src: &[u8], dst: &mut [u8], size: usize, n: usize) {
    let hot = chain.hot();
    for (i, k) in keys(&format!("vs-warm-{}", fresh()), n).iter().enumerate() {
        let chunk = &src[i * size..(i + 1) * size];
        chain.put_with(k, size, meta(size), |d| hot.copy(d, chunk));
        if let Some(h) = hot.get(k) {
            hot.copy(&mut dst[i * size..(i + 1) * size], h.bytes());
        }
    }
    hot.clear();
}

/// kvhost's put-with-copy and get-with-copy GB/s over `n` fresh chunks of `size`.
fn kvhost_copy(size: usize, n: usize) -> (f64, f64) {
    let chain = hot_only_chain(n * size + (64 << 20), true);
    let hot = chain.hot().clone();
    let src = mapped(n * size, 0x5a);
    let mut dst = mapped(n * size, 0);
    warm_up(&chain, &src, &mut dst, size, n);
    dst.fill(0);
    let ks = keys(&format!("vs-copy-{}", fresh()), n);
    let t = Instant::now();
    for (i, k) in ks.iter().enumerate() {
        let chunk = &src[i * size..(i + 1) * size];
        chain.put_with(k, size, meta(size), |d| hot.copy(d, chunk));
    }
    let put = t.elapsed();
    let t = Instant::now();
    for (i, k) in ks.iter().enumerate() {
        let h = hot.get(k).expect("chunk just put");
        hot.copy(&mut dst[i * size..(i + 1) * size], h.bytes());
    }
    let get = t.elapsed();
    drop(hot);
    finish(chain);
    assert!(src[..] == dst[..], "kvhost returned different bytes");
    let gb = |d: std::time::Duration| (n * size) as f64 / d.as_secs_f64() / 1e9;
    (gb(put), gb(get))
}

/// kvhost's put and get without the copy, ns per op.
fn kvhost_book(size: usize, n: usize) -> (f64, f64) {
    let chain = hot_only_chain(n * size + (64 << 20), false);
    // The bookkeeping pass without copies, untimed, as LMCache's side warms up.
    for k in &keys(&format!("vs-book-warm-{}", fresh()), n) {
        chain.put_with(k, size, meta(size), |_| {});
        std::hint::black_box(chain.get(std::slice::from_ref(k)));
    }
    chain.hot().clear();
    let ks = keys(&format!("vs-book-{}", fresh()), n);
    let t = Instant::now();
    for k in &ks {
        std::hint::black_box(chain.put_with(k, size, meta(size), |_| {}));
    }
    let put = t.elapsed();
    let t = Instant::now();
    for k in &ks {
        assert!(
            chain.get(std::slice::from_ref(k))[0].is_some(),
            "chunk just put"
        );
    }
    let get = t.elapsed();
    finish(chain);
    (
        put.as_nanos() as f64 / n as f64,
        get.as_nanos() as f64 / n as f64,
    )
}

/// kvhost's contains rate (M keys/s, random order) and 1,000-key prefix walk (µs).
fn kvhost_index(n: usize, calls: usize) -> (f64, f64) {
    let chain = hot_only_chain(n * SMALL + (16 << 20), false);
    let ks = keys(&format!("vs-index-{}", fresh()), n);
    for k in &ks {
        chain.put_with(k, SMALL, meta(SMALL), |_| {});
    }
    let mut x = 0x2545_F491_4F6C_DD1Du64;
    let mut order: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        order.swap(i, (x % (i as u64 + 1)) as usize);
    }
    let t = Instant::now();
    let hits = order
        .iter()
        .filter(|&&i| chain.hot().contains(&ks[i]))
        .count();
    let contains = t.elapsed();
    assert_eq!(hits, n, "contains");
    let t = Instant::now();
    for &s in order.iter().take(calls) {
        let s = s % (n - WALK);
        assert_eq!(chain.prefix_len(&ks[s..s + WALK]), WALK, "prefix walk");
    }
    let walk = t.elapsed();
    finish(chain);
    (
        n as f64 / contains.as_secs_f64() / 1e6,
        walk.as_secs_f64() * 1e6 / calls as f64,
    )
}

/// A number never used before in this process (fresh keys per rep).
fn fresh() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// Both sides of one measurement, `reps` times, alternating which goes first.
fn side_by_side<K, L>(
    reps: usize,
    mut kvhost: impl FnMut() -> K,
    mut lmcache: impl FnMut() -> Result<L, VsError>,
) -> Result<(Vec<K>, Vec<L>), VsError> {
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for rep in 0..reps {
        if rep % 2 == 0 {
            a.push(kvhost());
            b.push(lmcache()?);
        } else {
            b.push(lmcache()?);
            a.push(kvhost());
        }
    }
    Ok((a, b))
}

fn speedup(name: String, unit: &str, kv: f64, lm: f64, ratio: f64, min: Option<f64>) -> Row {
    Row {
        name,
        value: kv,
        unit: unit.into(),
        baseline: Some(lm),
        ratio: Some(ratio),
        target: min.map_or("report".into(), |m| format!(">= {m}x LMCache")),
        met: min.map(|m| ratio >= m),
    }
}

/// Run the side-by-side; rows carry kvhost's value, LMCache's as the baseline, and the speed-up.
pub fn run(
    python: &Path,
    opts: &MicroOptions,
    mut progress: impl FnMut(&str),
) -> Result<Vec<Row>, VsError> {
    let mut lm = Lmcache::start(python)?;
    let mut rows = Vec::new();
    let set = (opts.working_set / 2).max(16 << 20);
    for (size, target) in [
        (256 << 10, Some(2.0)),
        (1 << 20, None),
        (4 << 20, Some(1.2)),
    ] {
        let n = set / size;
        progress(&format!("vs LMCache: copies of {}", human(size)));
        let (kv, lmc) = side_by_side(
            opts.reps,
            || kvhost_copy(size, n),
            || {
                let v = lm.ask(serde_json::json!({"op": "copy", "size": size, "n": n}))?;
                Ok((num(&v, "put_gbps")?, num(&v, "get_gbps")?))
            },
        )?;
        let (kp, kg) = medians(&kv);
        let (lp, lg) = medians(&lmc);
        let label = human(size);
        rows.push(speedup(
            format!("vs. put-with-copy {label} ({n} chunks)"),
            "GB/s",
            kp,
            lp,
            kp / lp,
            target,
        ));
        rows.push(speedup(
            format!("vs. get-with-copy {label} ({n} chunks)"),
            "GB/s",
            kg,
            lg,
            kg / lg,
            target,
        ));
    }
    progress("vs LMCache: bookkeeping");
    let book_n = (opts.keys / 10).clamp(500, 4000);
    let size = 256 << 10;
    let (kv, lmc) = side_by_side(
        opts.reps,
        || kvhost_book(size, book_n),
        || {
            let v = lm.ask(serde_json::json!({"op": "book", "size": size, "n": book_n}))?;
            Ok((num(&v, "put_ns")?, num(&v, "get_ns")?))
        },
    )?;
    let (kp, kg) = medians(&kv);
    let (lp, lg) = medians(&lmc);
    rows.push(speedup(
        format!("vs. put without the copy ({book_n} x 256 KiB), ns/op"),
        "ns",
        kp,
        lp,
        lp / kp,
        Some(20.0),
    ));
    rows.push(speedup(
        format!("vs. get without the copy ({book_n} x 256 KiB), ns/op"),
        "ns",
        kg,
        lg,
        lg / kg,
        Some(5.0),
    ));
    progress("vs LMCache: contains and the 1,000-key walk");
    let index_n = (opts.keys / 5).clamp(4 * WALK, 200_000);
    let calls = 200;
    let (kv, lmc) = side_by_side(
        opts.reps,
        || kvhost_index(index_n, calls),
        || {
            let v = lm.ask(
                serde_json::json!({"op": "contains", "n": index_n, "calls": calls, "walk": WALK}),
            )?;
            Ok((num(&v, "contains_mps")?, num(&v, "walk_us")?))
        },
    )?;
    let (kc, kw) = medians(&kv);
    let (lc, lw) = medians(&lmc);
    rows.push(speedup(
        format!("vs. contains over {index_n} keys, M keys/s"),
        "M/s",
        kc,
        lc,
        kc / lc,
        None,
    ));
    rows.push(speedup(
        format!("vs. {WALK}-key prefix walk (batched_contains), µs"),
        "µs",
        kw,
        lw,
        lw / kw,
        Some(10.0),
    ));
    Ok(rows)
}

/// The medians of both members of the pairs one measurement gives per rep (put and get, say).
fn medians(reps: &[(f64, f64)]) -> (f64, f64) {
    (
        median(reps.iter().map(|x| x.0).collect()),
        median(reps.iter().map(|x| x.1).collect()),
    )
}
