//! `kvhost.lmcache.NativeL2Client`: LMCache's `native_plugin` client contract over a kvhost chain.
//!
//! LMCache (multi-process mode) submits batches and gets a future id back at once; completions are
//! posted from plugin threads into a queue and signalled on a Linux eventfd, which LMCache polls and
//! then calls `drain_completions`. No Python thread is on the data path: submit converts keys and
//! buffers, releases the GIL and hands the batch to the chain; the plugin's completion posts the
//! result without the GIL.
//!
//! Buffer rule: a get or set is reported only after every plugin has given its buffers back, so
//! LMCache never reuses memory a plugin may still touch. A plugin that hangs keeps that operation
//! pending (a warning names it after the timeout) until `close`, whose plugin destroy completes it.
//! Lookups and deletes hold no buffers: they are reported failed at the timeout, and a late answer is
//! dropped.

use crate::buffer::Lent;
use crate::chain::{lend_destinations, lend_sources, metas_from_py, PyChain};
use crate::keys::{self, KeyFormat};
use kvhost::chain::Chain;
use kvhost::plugin::{GetItem, Presence};
use kvhost::ChunkKey;
use parking_lot::{Condvar, Mutex};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList, PyTuple};
use rustix::event::{eventfd, EventfdFlags};
use std::collections::VecDeque;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

/// One finished operation, as `drain_completions` reports it.
struct Completion {
    id: u64,
    ok: bool,
    error: String,
    per_key: Option<Vec<bool>>,
    /// The operation's buffers: released here, under the GIL, when LMCache drains the completion.
    _bufs: Vec<Arc<Lent>>,
}

/// Completions waiting for `drain_completions`, and the eventfd that says there are some.
struct Completions {
    queue: Mutex<Vec<Completion>>,
    efd: OwnedFd,
}

impl Completions {
    fn post(&self, c: Completion) {
        self.queue.lock().push(c);
        // A full counter (2^64 - 2 posts undrained) cannot happen; the fd is non-blocking regardless.
        let _ = rustix::io::write(&self.efd, &1u64.to_ne_bytes());
    }
}

/// An operation that must be reported exactly once: by its completion or by its deadline.
struct Once {
    id: u64,
    done: AtomicBool,
}

impl Once {
    fn claim(&self) -> bool {
        !self.done.swap(true, Ordering::AcqRel)
    }
}

/// What happens at a deadline.
enum Overdue {
    /// Report the operation failed (it holds no buffers).
    Fail(Arc<Once>, &'static str),
    /// Only warn: the plugin still holds the operation's buffers.
    Warn(Arc<Once>, &'static str, usize),
}

impl Overdue {
    fn once(&self) -> &Once {
        match self {
            Overdue::Fail(once, _) | Overdue::Warn(once, _, _) => once,
        }
    }
}

struct Deadline {
    at: Instant,
    what: Overdue,
}

/// Deadlines in the order they fall due: every operation gets the same timeout, so the queue is
/// sorted by construction.
struct Deadlines {
    queue: VecDeque<Deadline>,
    stopped: bool,
}

struct Shared {
    completions: Completions,
    deadlines: Mutex<Deadlines>,
    wake: Condvar,
    timeout: Duration,
}

impl Shared {
    fn arm(&self, what: Overdue) {
        let mut d = self.deadlines.lock();
        // Operations that completed before their deadline leave the queue here, from the front,
        // rather than waiting out the timeout: at 10,000 operations/s and a 30 s timeout the queue
        // would otherwise hold 300,000 finished entries.
        while d
            .queue
            .front()
            .is_some_and(|f| f.what.once().done.load(Ordering::Acquire))
        {
            d.queue.pop_front();
        }
        d.queue.push_back(Deadline {
            at: Instant::now() + self.timeout,
            what,
        });
        // The thread sleeps until the front deadline; a later one needs no wake-up (a wake-up per
        // operation costs a context switch).
        if d.queue.len() == 1 {
            self.wake.notify_one();
        }
    }
}

/// The deadline thread: one per client, asleep until the front deadline.
fn watch(shared: Weak<Shared>) {
    loop {
        let Some(s) = shared.upgrade() else { return };
        let due = {
            let mut d = s.deadlines.lock();
            if d.stopped {
                return;
            }
            match d.queue.front().map(|f| f.at) {
                Some(at) if at <= Instant::now() => d.queue.pop_front().map(|x| x.what),
                Some(at) => {
                    s.wake.wait_until(&mut d, at);
                    None
                }
                None => {
                    // Wake now and then so a dropped client lets this thread go.
                    s.wake.wait_for(&mut d, Duration::from_secs(1));
                    None
                }
            }
        };
        match due {
            Some(Overdue::Fail(once, op)) if once.claim() => {
                s.completions.post(Completion {
                    id: once.id,
                    ok: false,
                    error: format!("{op}: a plugin did not answer within {:?}", s.timeout),
                    per_key: None,
                    _bufs: Vec::new(),
                });
            }
            Some(Overdue::Warn(once, op, n)) if !once.done.load(Ordering::Acquire) => {
                tracing::warn!(
                    target: "kvhost::python",
                    "{op} {} of {n} chunk(s) still pending in a plugin after {:?}; its buffers stay \
                     lent until the plugin completes or the client closes",
                    once.id,
                    s.timeout
                );
            }
            _ => {}
        }
    }
}

/// LMCache's `native_plugin` L2 client, backed by a kvhost chain.
///
/// `NativeL2Client(config=None, *, hot_cache=False, key_format="object", plugin_dirs=(), **chain_keys)`:
/// LMCache calls it with the spec's `adapter_params`. `config` is a kvhost YAML path; without it the
/// remaining keyword arguments are the config itself (`storage_plugins`, `extra_config`, …). The hot
/// cache is off by default: LMCache's L1 already is a CPU cache.
#[pyclass(frozen, name = "NativeL2Client", module = "kvhost.lmcache")]
pub struct L2Client {
    chain: Chain,
    key_format: KeyFormat,
    shared: Arc<Shared>,
    next_id: AtomicU64,
    closed: AtomicBool,
}

impl L2Client {
    fn over(chain: &PyChain) -> PyResult<Self> {
        let efd = eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK).map_err(|e| {
            crate::errors::KvhostError::new_err(format!("NativeL2Client: eventfd: {e}"))
        })?;
        let shared = Arc::new(Shared {
            completions: Completions {
                queue: Mutex::new(Vec::new()),
                efd,
            },
            deadlines: Mutex::new(Deadlines {
                queue: VecDeque::new(),
                stopped: false,
            }),
            wake: Condvar::new(),
            timeout: chain.timeout,
        });
        let weak = Arc::downgrade(&shared);
        std::thread::Builder::new()
            .name("kvhost-l2-deadlines".into())
            .spawn(move || watch(weak))
            .map_err(|e| crate::errors::KvhostError::new_err(format!("NativeL2Client: {e}")))?;
        Ok(L2Client {
            chain: chain.chain.clone(),
            key_format: chain.key_format,
            shared,
            next_id: AtomicU64::new(1),
            closed: AtomicBool::new(false),
        })
    }

    fn id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Report a batch that never reached a plugin.
    fn refuse(&self, id: u64, error: String) -> u64 {
        tracing::warn!(target: "kvhost::python", "L2 operation {id} refused: {error}");
        self.shared.completions.post(Completion {
            id,
            ok: false,
            error,
            per_key: None,
            _bufs: Vec::new(),
        });
        id
    }

    fn keys(&self, keys: &Bound<'_, PyAny>) -> Result<Vec<ChunkKey>, String> {
        if self.closed.load(Ordering::Acquire) {
            return Err("the client is closed".into());
        }
        keys::many(keys, self.key_format).map_err(|e| e.to_string())
    }

    /// Arm operation `id`'s deadline: with `lent` buffers (a count of chunks) it only warns, since the
    /// plugin still holds them; without, it reports the operation failed.
    fn watch(&self, id: u64, op: &'static str, lent: Option<usize>) -> Arc<Once> {
        let once = Arc::new(Once {
            id,
            done: AtomicBool::new(false),
        });
        self.shared.arm(match lent {
            Some(n) => Overdue::Warn(once.clone(), op, n),
            None => Overdue::Fail(once.clone(), op),
        });
        once
    }
}

/// One buffer per key, or why not.
fn one_per_key<T>(bufs: PyResult<Vec<T>>, keys: usize) -> Result<Vec<T>, String> {
    match bufs {
        Ok(b) if b.len() == keys => Ok(b),
        Ok(b) => Err(format!("{keys} keys but {} buffers", b.len())),
        Err(e) => Err(e.to_string()),
    }
}

#[pymethods]
impl L2Client {
    #[new]
    #[pyo3(signature = (config = None, *, hot_cache = false, key_format = "object", plugin_dirs = Vec::new(), **chain_keys))]
    fn new(
        config: Option<&Bound<'_, PyAny>>,
        hot_cache: bool,
        key_format: &str,
        plugin_dirs: Vec<PathBuf>,
        chain_keys: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<Self> {
        let inline = chain_keys.filter(|d| !d.is_empty());
        let config = match (config, inline) {
            (Some(_), Some(extra)) => {
                return Err(crate::errors::ConfigError::new_err(format!(
                    "NativeL2Client: give either `config` (a path) or inline chain keys, not both (got \
                     config and {})",
                    extra.keys()
                )))
            }
            (Some(c), None) => c.clone(),
            (None, Some(d)) => d.clone().into_any(),
            (None, None) => {
                return Err(crate::errors::ConfigError::new_err(
                    "NativeL2Client: adapter_params must name a `config` path or give the chain's keys \
                     (storage_plugins, extra_config, …)",
                ))
            }
        };
        let chain = PyChain::open(
            &config,
            KeyFormat::parse(key_format)?,
            plugin_dirs,
            Some(hot_cache),
        )?;
        L2Client::over(&chain)
    }

    /// A client over an existing `kvhost.Chain` (sharing its plugins), with the chain's key format.
    #[staticmethod]
    fn for_chain(chain: &Bound<'_, PyChain>) -> PyResult<Self> {
        L2Client::over(chain.get())
    }

    /// The eventfd LMCache polls; readable when `drain_completions` has something.
    fn event_fd(&self) -> i32 {
        self.shared.completions.efd.as_raw_fd()
    }

    /// Store `bufs[i]` under `keys[i]`; the plugins read LMCache's memory directly. `metas` (a kvhost
    /// extension) gives each chunk's `(fmt, dtype, shape)`.
    #[pyo3(signature = (keys, bufs, metas = None))]
    fn submit_batch_set(
        &self,
        py: Python<'_>,
        keys: &Bound<'_, PyAny>,
        bufs: &Bound<'_, PyAny>,
        metas: Option<&Bound<'_, PyAny>>,
    ) -> u64 {
        let id = self.id();
        let batch = self.keys(keys).and_then(|keys| {
            let srcs = one_per_key(lend_sources(bufs), keys.len())?;
            let metas = match metas {
                Some(m) => metas_from_py(m, keys.len()).map_err(|e| e.to_string())?,
                None => vec![Default::default(); keys.len()],
            };
            Ok((keys, srcs, metas))
        });
        let (keys, srcs, metas) = match batch {
            Ok(b) => b,
            Err(e) => return self.refuse(id, format!("set: {e}")),
        };
        let holds: Vec<Arc<Lent>> = srcs.iter().map(|s| s.lent.clone()).collect();
        let once = self.watch(id, "set", Some(keys.len()));
        let (chain, shared) = (self.chain.clone(), self.shared.clone());
        py.detach(move || {
            chain.put_lent(keys, srcs, metas, move |items| {
                once.claim();
                let failed: Vec<&String> = items.iter().filter_map(|i| i.as_ref().err()).collect();
                shared.completions.post(Completion {
                    id,
                    ok: failed.is_empty(),
                    error: summary(&failed, items.len(), "stored"),
                    per_key: Some(items.iter().map(|i| i.is_ok()).collect()),
                    _bufs: holds,
                });
            })
        });
        id
    }

    /// Load `keys[i]` into `bufs[i]`; the plugins write LMCache's memory directly. A buffer smaller
    /// than its chunk fails that key (never a truncated load).
    fn submit_batch_get(
        &self,
        py: Python<'_>,
        keys: &Bound<'_, PyAny>,
        bufs: &Bound<'_, PyAny>,
    ) -> u64 {
        let id = self.id();
        let batch = self
            .keys(keys)
            .and_then(|keys| Ok((one_per_key(lend_destinations(bufs), keys.len())?, keys)));
        let (dsts, keys) = match batch {
            Ok(b) => b,
            Err(e) => return self.refuse(id, format!("get: {e}")),
        };
        let holds: Vec<Arc<Lent>> = dsts.iter().map(|d| d.lent.clone()).collect();
        let once = self.watch(id, "get", Some(keys.len()));
        let names: Vec<ChunkKey> = keys.clone();
        let (chain, shared) = (self.chain.clone(), self.shared.clone());
        py.detach(move || {
            chain.get_lent(keys, dsts, move |done| {
                once.claim();
                drop(done.bufs);
                let mut problems = Vec::new();
                let per_key: Vec<bool> = done
                    .items
                    .iter()
                    .zip(&names)
                    .map(|(item, key)| match item {
                        GetItem::Hit { .. } => true,
                        GetItem::Miss => false,
                        GetItem::TooSmall { needed } => {
                            problems
                                .push(format!("`{key}`: buffer too small, {needed} bytes needed"));
                            false
                        }
                        GetItem::Failed(status, why) => {
                            problems.push(format!("`{key}`: {status} {why}"));
                            false
                        }
                    })
                    .collect();
                let loaded = per_key.iter().filter(|&&b| b).count();
                let n = per_key.len();
                let error = if loaded == n {
                    String::new()
                } else if problems.is_empty() {
                    format!("{} of {n} key(s) not found", n - loaded)
                } else {
                    format!(
                        "{} of {n} key(s) not loaded; {} failed, first: {}",
                        n - loaded,
                        problems.len(),
                        problems[0]
                    )
                };
                shared.completions.post(Completion {
                    id,
                    ok: loaded == n,
                    error,
                    per_key: Some(per_key),
                    _bufs: holds,
                });
            })
        });
        id
    }

    /// Which keys the chain holds (per key in the completion).
    fn submit_batch_exists(&self, py: Python<'_>, keys: &Bound<'_, PyAny>) -> u64 {
        let id = self.id();
        let keys = match self.keys(keys) {
            Ok(k) => k,
            Err(e) => return self.refuse(id, format!("exists: {e}")),
        };
        let once = self.watch(id, "exists", None);
        let (chain, shared) = (self.chain.clone(), self.shared.clone());
        py.detach(move || {
            chain.exists_lent(keys, move |items| {
                if !once.claim() {
                    return;
                }
                let failed: Vec<String> = items
                    .iter()
                    .filter_map(|p| match p {
                        Presence::Failed(_, why) => Some(why.clone()),
                        _ => None,
                    })
                    .collect();
                shared.completions.post(Completion {
                    id,
                    ok: true,
                    error: failed.first().map_or_else(String::new, |first| {
                        format!(
                            "{} key(s) could not be looked up; first: {first}",
                            failed.len()
                        )
                    }),
                    per_key: Some(
                        items
                            .iter()
                            .map(|p| matches!(p, Presence::Present(_)))
                            .collect(),
                    ),
                    _bufs: Vec::new(),
                });
            })
        });
        id
    }

    /// Remove keys from every tier (per key: whether any tier held it).
    fn submit_batch_delete(&self, py: Python<'_>, keys: &Bound<'_, PyAny>) -> u64 {
        let id = self.id();
        let keys = match self.keys(keys) {
            Ok(k) => k,
            Err(e) => return self.refuse(id, format!("delete: {e}")),
        };
        let once = self.watch(id, "delete", None);
        let (chain, shared) = (self.chain.clone(), self.shared.clone());
        py.detach(move || {
            chain.remove_lent(keys, move |removed| {
                if once.claim() {
                    shared.completions.post(Completion {
                        id,
                        ok: true,
                        error: String::new(),
                        per_key: Some(removed),
                        _bufs: Vec::new(),
                    });
                }
            })
        });
        id
    }

    /// Every completion posted since the last call, as `(future_id, ok, error, per_key)`; resets the
    /// eventfd.
    fn drain_completions<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        // Reset first: a completion posted after this read signals again.
        let mut counter = [0u8; 8];
        let _ = rustix::io::read(&self.shared.completions.efd, &mut counter);
        let done = std::mem::take(&mut *self.shared.completions.queue.lock());
        let out = PyList::empty(py);
        for c in done {
            let per_key = match &c.per_key {
                Some(v) => PyList::new(py, v)?.into_any(),
                None => py.None().into_bound(py),
            };
            out.append(PyTuple::new(
                py,
                [
                    c.id.into_pyobject(py)?.into_any(),
                    pyo3::types::PyBool::new(py, c.ok).to_owned().into_any(),
                    c.error.into_pyobject(py)?.into_any(),
                    per_key,
                ],
            )?)?;
        }
        Ok(out)
    }

    /// Operations whose deadline is still queued: those not yet reported, plus finished ones that
    /// an older unfinished operation keeps behind it (finished ones leave from the front as new
    /// operations arrive). For monitoring a plugin that stops answering.
    fn pending_deadlines(&self) -> usize {
        self.shared.deadlines.lock().queue.len()
    }

    /// Per-tier counters (as `kvhost.Chain.stats`).
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let text = serde_json::to_string(&self.chain.stats())
            .map_err(|e| pyo3::exceptions::PyValueError::new_err(format!("stats: {e}")))?;
        py.import("json")?.call_method1("loads", (text,))
    }

    /// Stop taking work, drain puts in flight (up to the timeout), then destroy the plugins, which
    /// completes every operation they still hold (reported failed if cancelled). Returns at once when
    /// already closed.
    fn close(&self, py: Python<'_>) {
        if self.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        let (chain, timeout) = (self.chain.clone(), self.shared.timeout);
        let report = py.detach(move || chain.close(timeout));
        if !report.unfinished.is_empty() || !report.stuck.is_empty() {
            tracing::warn!(
                target: "kvhost::python",
                "NativeL2Client.close: unfinished puts {:?}, stuck plugins {:?}",
                report.unfinished,
                report.stuck
            );
        }
        let mut d = self.shared.deadlines.lock();
        d.stopped = true;
        self.shared.wake.notify_all();
    }
}

/// An error line for a batch: empty when nothing failed.
fn summary(failed: &[&String], n: usize, verb: &str) -> String {
    match failed.first() {
        None => String::new(),
        Some(first) => format!("{} of {n} key(s) not {verb}; first: {first}", failed.len()),
    }
}
