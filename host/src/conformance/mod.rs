//! The plugin conformance suite: checks that any loaded plugin keeps the ABI's promises.
//!
//! The suite keeps at most one instance of the plugin alive at a time: checks share one instance, and
//! a check that destroys its instance (`destroy_in_flight`) is followed by a fresh one from the
//! factory. So a store that locks its directory or file per instance passes with the same options
//! every time. Every check uses fresh keys. A plugin advertising `KVH_CAP_DISCARDS` is checked for
//! consistent misses instead of round trips.

mod capacity;
mod checks;
mod report;
mod semantics;

pub use report::{CheckResult, Outcome, Report};

use crate::key::ChunkKey;
use crate::loader::LoadError;
use crate::plugin::{GetItem, GetRequest, PluginBackend, PutRequest};
use kvhost_plugin_sdk::abi;
use kvhost_plugin_sdk::{ChunkMeta, Status};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// Makes a fresh instance of the plugin under test.
pub type Factory<'a> = dyn Fn() -> Result<PluginBackend, LoadError> + Sync + 'a;

/// How a run is shaped.
#[derive(Clone, Debug)]
pub struct Options {
    /// How long to wait for any single completion before calling it a hang.
    pub timeout: Duration,
    /// Run only these checks (by name; `create` always runs). Empty: all of them.
    pub only: Vec<String>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            timeout: Duration::from_secs(20),
            only: Vec::new(),
        }
    }
}

/// One check of the suite, as `--list` shows it.
#[derive(Clone, Copy, Debug)]
pub struct CheckInfo {
    /// Name, as `--check` takes it.
    pub name: &'static str,
    /// The capability bit the check needs; skipped without it.
    pub needs: Option<u64>,
    /// What a pass proves, one line.
    pub proves: &'static str,
}

type Outcome2 = Result<String, String>;

/// What a check that may not apply to this plugin found.
pub(crate) enum Verdict {
    /// It applied and passed.
    Pass(String),
    /// It does not apply (why).
    Skip(String),
}

enum Body {
    /// Runs on the shared instance.
    Shared(fn(&Ctx<'_>) -> Outcome2),
    /// Runs on the shared instance and may find it does not apply.
    MaySkip(fn(&Ctx<'_>) -> Result<Verdict, String>),
    /// Takes the instance and destroys it; the next check gets a fresh one.
    Consumes(fn(Ctx<'_>) -> Outcome2),
}

struct Check {
    info: CheckInfo,
    body: Body,
}

const CREATE: CheckInfo = CheckInfo {
    name: "create",
    needs: None,
    proves: "the class loads, its descriptor and option schema pass the loader's checks, and create succeeds",
};

const fn check(name: &'static str, needs: Option<u64>, proves: &'static str, body: Body) -> Check {
    Check {
        info: CheckInfo {
            name,
            needs,
            proves,
        },
        body,
    }
}

/// The suite, in the order it runs.
const CHECKS: &[Check] = &[
    check("round_trip", None, "chunks of 1 B, 4 KiB+3 and 256 KiB read back byte for byte with their metadata; remove removes; a second remove is NOT_FOUND", Body::Shared(checks::round_trip)),
    check("empty_batches", None, "every operation accepts an empty batch", Body::Shared(checks::empty_batches)),
    check("duplicate_keys", None, "a key twice in one put and one get yields one of the two values", Body::Shared(checks::duplicate_keys)),
    check("mixed_hits_and_misses", None, "hits and misses in one batch are reported per item", Body::Shared(checks::mixed_hits)),
    check("buffer_too_small", None, "a get into a short buffer is BUFFER_TOO_SMALL with the exact size needed", Body::Shared(checks::buffer_too_small)),
    check("exactly_once", None, "each of 128 put/get operations completes exactly once", Body::Shared(checks::exactly_once)),
    check("concurrency", None, "4 threads putting, getting, looking up and removing at once see their own data", Body::Shared(checks::concurrency)),
    check("pin_unpin", Some(abi::KVH_CAP_PIN), "pin, unpin and contains(pin) of stored keys are OK; pin of an absent key is OK or NOT_FOUND", Body::Shared(checks::pin_unpin)),
    check("unpin_unpinned", Some(abi::KVH_CAP_PIN), "unpin of a stored key without a pin is INVALID_ARG and of an absent key NOT_FOUND (as the header says)", Body::Shared(semantics::unpin_unpinned)),
    check("remove_pinned", Some(abi::KVH_CAP_PIN), "remove without force of a pinned key is BUSY and keeps it; with force it removes it (as the header says)", Body::Shared(semantics::remove_pinned)),
    check("prefetch", Some(abi::KVH_CAP_PREFETCH), "prefetch reports stored keys OK and absent keys NOT_FOUND", Body::Shared(checks::prefetch)),
    check("flush", Some(abi::KVH_CAP_FLUSH), "flush after a put succeeds", Body::Shared(checks::flush)),
    check("health", Some(abi::KVH_CAP_HEALTH), "health answers OK", Body::Shared(checks::health)),
    check("contains_async", Some(abi::KVH_CAP_ASYNC_CONTAINS), "16 asynchronous lookups in flight at once agree with contains, and each completes once", Body::Shared(checks::contains_async)),
    check("remove_async", Some(abi::KVH_CAP_ASYNC_REMOVE), "asynchronous remove removes, and a second one is NOT_FOUND", Body::Shared(checks::remove_async)),
    check("stats", Some(abi::KVH_CAP_STATS), "stats answers with valid names and kinds, the well-known names have the kinds the header gives them, and no counter goes down", Body::Shared(capacity::stats_report)),
    check("capacity", Some(abi::KVH_CAP_STATS), "filling twice the reported capacity_bytes evicts or refuses with NO_SPACE, never holds more, loses nothing that evictions does not count, and keeps a pinned chunk", Body::MaySkip(capacity::capacity)),
    check("clear", Some(abi::KVH_CAP_CLEAR), "clear removes every chunk", Body::Shared(checks::clear)),
    check("destroy_in_flight", None, "destroy with puts, gets and async lookups/removes queued completes every one of them before it returns", Body::Consumes(checks::destroy_in_flight)),
    check("create_after_destroy", None, "a fresh instance with the same options comes up after a destroy (locks and files were released) and serves a round trip", Body::Shared(checks::create_after_destroy)),
];

/// Every check, `create` first, in the order a run makes them.
pub fn list() -> Vec<CheckInfo> {
    std::iter::once(CREATE)
        .chain(CHECKS.iter().map(|c| c.info))
        .collect()
}

/// Names in `wanted` that are not checks of the suite.
pub fn unknown_checks(wanted: &[String]) -> Vec<String> {
    let known = list();
    wanted
        .iter()
        .filter(|w| !known.iter().any(|k| k.name == w.as_str()))
        .cloned()
        .collect()
}

/// Run every check with the default options.
pub fn run(factory: &Factory<'_>) -> Report {
    run_with(factory, &Options::default())
}

/// Run the checks `options` selects.
pub fn run_with(factory: &Factory<'_>, options: &Options) -> Report {
    let keys = Keys::new();
    let mut report = Report::default();
    let started = Instant::now();
    let mut ctx = match Ctx::make(factory, &keys, options.timeout) {
        Ok(c) => {
            let info = c.plugin.info();
            report.push(
                CREATE.name,
                Outcome::Pass,
                format!(
                    "class {} v{} ABI {}.{}",
                    info.class_name, info.version, info.abi.0, info.abi.1
                ),
                started.elapsed(),
            );
            Some(c)
        }
        Err(e) => {
            report.push(CREATE.name, Outcome::Fail, e, started.elapsed());
            return report;
        }
    };
    let capabilities = ctx.as_ref().map_or(0, |c| c.plugin.info().capabilities);
    for check in CHECKS {
        let name = check.info.name;
        if !options.only.is_empty() && !options.only.iter().any(|o| o == name) {
            continue;
        }
        let started = Instant::now();
        if check.info.needs.is_some_and(|bit| capabilities & bit == 0) {
            report.push(
                name,
                Outcome::Skip,
                "capability not advertised".into(),
                started.elapsed(),
            );
            continue;
        }
        if ctx.is_none() {
            match Ctx::make(factory, &keys, options.timeout) {
                Ok(c) => ctx = Some(c),
                Err(e) => {
                    report.push(
                        name,
                        Outcome::Fail,
                        format!("fresh instance: {e}"),
                        started.elapsed(),
                    );
                    continue;
                }
            }
        }
        let mut skipped = None;
        let result = match check.body {
            Body::Shared(_) | Body::MaySkip(_) => {
                let c = ctx.as_ref().expect("made above");
                let stale_before = c.plugin.stale_completions();
                let result = guarded(|| match check.body {
                    Body::Shared(f) => f(c),
                    Body::MaySkip(f) => f(c).map(|v| match v {
                        Verdict::Pass(d) => d,
                        Verdict::Skip(d) => {
                            skipped = Some(d.clone());
                            d
                        }
                    }),
                    Body::Consumes(_) => unreachable!("matched above"),
                });
                let stale = c.plugin.stale_completions() - stale_before;
                match result {
                    Ok(_) if stale > 0 => Err(format!(
                        "{stale} completion(s) for operations that were not pending"
                    )),
                    r => r,
                }
            }
            Body::Consumes(f) => {
                let c = ctx.take().expect("made above");
                guarded(move || f(c))
            }
        };
        let (outcome, detail) = match (result, skipped) {
            (Ok(_), Some(why)) => (Outcome::Skip, why),
            (Ok(d), None) => (Outcome::Pass, d),
            (Err(d), _) => (Outcome::Fail, d),
        };
        report.push(name, outcome, detail, started.elapsed());
    }
    report
}

/// A check's result, with a panic turned into a failure.
fn guarded(f: impl FnOnce() -> Outcome2) -> Outcome2 {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f))
        .unwrap_or_else(|_| Err("the check panicked (see stderr)".to_string()))
}

/// Fresh keys for one run: unique across runs (the run's start time) and within it (a counter).
pub(crate) struct Keys {
    run_id: u64,
    next: AtomicUsize,
}

impl Keys {
    fn new() -> Keys {
        Keys {
            run_id: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64),
            next: AtomicUsize::new(0),
        }
    }

    fn next(&self) -> ChunkKey {
        let n = self.next.fetch_add(1, Ordering::Relaxed) as i128;
        let hash =
            ((self.run_id as i128) << 20) ^ (n * 0x9e37_79b9) ^ if n % 2 == 0 { 0 } else { -1 };
        ChunkKey::build(
            "conformance/model",
            2,
            1,
            hash,
            "bfloat16",
            None,
            &[("suite", "conformance")],
        )
        .expect("valid key")
    }
}

/// What a check works with: the live instance, the run's keys and its timeout.
pub(crate) struct Ctx<'a> {
    plugin: PluginBackend,
    keys: &'a Keys,
    discards: bool,
    wait: Duration,
}

impl<'a> Ctx<'a> {
    fn make(factory: &Factory<'_>, keys: &'a Keys, wait: Duration) -> Result<Ctx<'a>, String> {
        let plugin = factory().map_err(|e| e.to_string())?;
        Ok(Ctx {
            discards: plugin.has(abi::KVH_CAP_DISCARDS),
            plugin,
            keys,
            wait,
        })
    }
}

impl Ctx<'_> {
    fn key(&self) -> ChunkKey {
        self.keys.next()
    }

    fn put(&self, keys: Vec<ChunkKey>, bufs: Vec<Vec<u8>>) -> Result<Vec<Status>, String> {
        let metas = bufs.iter().map(|b| meta_for(b.len())).collect();
        let done = self
            .plugin
            .put_wait(PutRequest { keys, bufs, metas }, self.wait)
            .map_err(|e| e.to_string())?;
        if let Some(e) = done.error {
            return Err(e.to_string());
        }
        Ok(done.items)
    }

    fn get(
        &self,
        keys: Vec<ChunkKey>,
        caps: Vec<usize>,
    ) -> Result<(Vec<GetItem>, Vec<Vec<u8>>), String> {
        let bufs = caps.into_iter().map(|c| vec![0xA5u8; c]).collect();
        let done = self
            .plugin
            .get_wait(GetRequest { keys, bufs }, self.wait)
            .map_err(|e| e.to_string())?;
        if let Some(e) = done.error {
            return Err(e.to_string());
        }
        Ok((done.items, done.request.bufs))
    }

    fn expect_put_ok(&self, keys: Vec<ChunkKey>, bufs: Vec<Vec<u8>>) -> Result<(), String> {
        let items = self.put(keys, bufs)?;
        match items.iter().position(|s| *s != Status::OK) {
            Some(i) => Err(format!("put item {i}: {}", items[i])),
            None => Ok(()),
        }
    }
}

/// Deterministic, key-specific bytes.
fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Non-trivial metadata, so a plugin that drops fields is caught.
fn meta_for(len: usize) -> ChunkMeta {
    ChunkMeta {
        length: len as u64,
        fmt: abi::KVH_FMT_KV_2LTD,
        dtype: abi::KVH_DTYPE_BFLOAT16,
        ndim: 4,
        shape: [2, 3, (len % 1000) as i32 + 1, 7],
        reserved: 0,
    }
}
