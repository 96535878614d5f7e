//! `kvhost.Chain`: a kvhost chain (hot cache, then native plugins) inside the Python process.
//!
//! Every method converts its arguments with the GIL held, then releases the GIL for all native work
//! and waits (up to the config's `blocking_timeout_secs`) for the plugins to complete. Buffers are lent
//! to the plugins without a copy and stay referenced until the plugins give them back.

use crate::buffer::{Dst, Lent, Src};
use crate::errors::{self, ChainClosed, OperationTimeout, PluginError};
use crate::keys::{self, KeyFormat};
use kvhost::chain::{Chain, LentPutItem};
use kvhost::plugin::{GetItem, Presence};
use kvhost::{ChunkKey, Config};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList, PyTuple};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Read a config given as a path (`str` or `os.PathLike`) or a dict of the same keys.
///
/// Unlike the CLI, `LMCACHE_*` environment variables are not applied: inside LMCache they configure
/// LMCache itself. `hot_cache` overrides `local_cpu`; without a hot cache the arena is not reserved.
pub fn load_config(
    config: &Bound<'_, PyAny>,
    plugin_dirs: Vec<PathBuf>,
    hot_cache: Option<bool>,
) -> PyResult<Config> {
    let py = config.py();
    let mut cfg = if let Ok(dict) = config.cast::<PyDict>() {
        let text: String = py
            .import("json")?
            .call_method1("dumps", (dict,))
            .map_err(|e| {
                errors::ConfigError::new_err(format!("config dict is not JSON-serialisable: {e}"))
            })?
            .extract()?;
        Config::from_yaml(&text, None).map_err(errors::config_error)?
    } else {
        let path: PathBuf = config.extract().map_err(|_| {
            PyTypeError::new_err(format!(
                "config must be a path or a dict, got {}",
                config
                    .get_type()
                    .name()
                    .map(|n| n.to_string())
                    .unwrap_or_default()
            ))
        })?;
        let text = std::fs::read_to_string(&path)
            .map_err(|e| errors::ConfigError::new_err(format!("config {}: {e}", path.display())))?;
        Config::from_yaml(&text, Some(&path)).map_err(errors::config_error)?
    };
    if let Some(on) = hot_cache {
        cfg.local_cpu = on;
    }
    if !cfg.local_cpu {
        // The arena only stages when nothing is retained, and the lent path does not stage.
        cfg.max_local_cpu_size = 0.0;
    }
    cfg.plugin_dirs.extend(plugin_dirs);
    if let Some(dir) = package_plugin_dir(py) {
        cfg.plugin_dirs.push(dir);
    }
    Ok(cfg)
}

/// `kvhost/plugins`, where a wheel carries the repository's plugins.
fn package_plugin_dir(py: Python<'_>) -> Option<PathBuf> {
    let file: PathBuf = py
        .import("kvhost")
        .ok()?
        .getattr("__file__")
        .ok()?
        .extract()
        .ok()?;
    Some(file.parent()?.join("plugins"))
}

/// Chunk metadata from `(fmt, dtype, shape)` (LMCache `MemoryFormat` code, `KVH_DTYPE_*` code, up to
/// four dimensions), or `None` for raw bytes.
pub fn meta_from_py(obj: &Bound<'_, PyAny>) -> PyResult<kvhost::plugin::ChunkMeta> {
    let mut meta = kvhost::plugin::ChunkMeta::default();
    if obj.is_none() {
        return Ok(meta);
    }
    let (fmt, dtype, shape): (i32, i32, Vec<i32>) = obj.extract().map_err(|_| {
        PyTypeError::new_err(
            "chunk metadata must be None or a tuple (fmt: int, dtype: int, shape: tuple[int, ...])",
        )
    })?;
    if shape.len() > 4 {
        return Err(PyValueError::new_err(format!(
            "chunk shape {shape:?} has {} dimensions; at most 4 are stored",
            shape.len()
        )));
    }
    meta.fmt = fmt;
    meta.dtype = dtype;
    meta.ndim = shape.len() as u32;
    meta.shape[..shape.len()].copy_from_slice(&shape);
    Ok(meta)
}

/// One metadata entry per key from a Python iterable.
pub fn metas_from_py(
    metas: &Bound<'_, PyAny>,
    n: usize,
) -> PyResult<Vec<kvhost::plugin::ChunkMeta>> {
    let metas = metas
        .try_iter()?
        .map(|m| meta_from_py(&m?))
        .collect::<PyResult<Vec<_>>>()?;
    if metas.len() != n {
        return Err(PyValueError::new_err(format!(
            "{n} keys but {} metadata entries",
            metas.len()
        )));
    }
    Ok(metas)
}

/// `(length, fmt, dtype, shape)` for Python.
pub fn meta_to_py<'py>(
    py: Python<'py>,
    m: &kvhost::plugin::ChunkMeta,
) -> PyResult<Bound<'py, PyTuple>> {
    let ndim = (m.ndim as usize).min(4);
    let shape = PyTuple::new(py, &m.shape[..ndim])?;
    PyTuple::new(
        py,
        [
            m.length.into_pyobject(py)?.into_any(),
            m.fmt.into_pyobject(py)?.into_any(),
            m.dtype.into_pyobject(py)?.into_any(),
            shape.into_any(),
        ],
    )
}

/// Source buffers from Python objects.
pub fn lend_sources(bufs: &Bound<'_, PyAny>) -> PyResult<Vec<Src>> {
    bufs.try_iter()?
        .map(|b| Ok(Src::whole(Arc::new(Lent::new(&b?, false)?))))
        .collect()
}

/// Destination buffers from Python objects; refuses overlapping ones.
pub fn lend_destinations(bufs: &Bound<'_, PyAny>) -> PyResult<Vec<Dst>> {
    let dsts: Vec<Dst> = bufs
        .try_iter()?
        .map(|b| Dst::whole(Arc::new(Lent::new(&b?, true)?)))
        .collect::<PyResult<_>>()?;
    check_disjoint(dsts)
}

/// `(offset, length)` pairs of one buffer as regions.
fn regions(offsets: &Bound<'_, PyAny>, lens: &Bound<'_, PyAny>) -> PyResult<Vec<(usize, usize)>> {
    let offsets: Vec<usize> = offsets.extract()?;
    let lens: Vec<usize> = lens.extract()?;
    if offsets.len() != lens.len() {
        return Err(PyValueError::new_err(format!(
            "{} offsets but {} lengths",
            offsets.len(),
            lens.len()
        )));
    }
    Ok(offsets.into_iter().zip(lens).collect())
}

/// Plugins fill a batch's destinations from several threads at once: refuse overlapping ones.
fn check_disjoint(dsts: Vec<Dst>) -> PyResult<Vec<Dst>> {
    let mut ranges: Vec<(std::ops::Range<usize>, usize)> = dsts
        .iter()
        .enumerate()
        .map(|(i, d)| (d.range(), i))
        .filter(|(r, _)| !r.is_empty())
        .collect();
    ranges.sort_by_key(|(r, _)| r.start);
    for w in ranges.windows(2) {
        if w[1].0.start < w[0].0.end {
            return Err(PyValueError::new_err(format!(
                "destination buffers {} and {} overlap",
                w[0].1, w[1].1
            )));
        }
    }
    Ok(dsts)
}

/// Submit an operation with the GIL released and wait for its completion up to `timeout`.
pub fn wait_for<T: Send + 'static>(
    py: Python<'_>,
    timeout: Duration,
    what: &str,
    submit: impl FnOnce(crossbeam_channel::Sender<T>) + Send,
) -> PyResult<T> {
    let got = py.detach(|| {
        let (tx, rx) = crossbeam_channel::bounded(1);
        submit(tx);
        rx.recv_timeout(timeout)
    });
    got.map_err(|_| {
        OperationTimeout::new_err(format!(
            "{what}: a plugin did not complete within {timeout:?}; its buffers stay with it until it \
             completes or the chain is closed"
        ))
    })
}

/// A kvhost chain in this process: the hot cache (if `local_cpu`), then the config's plugins.
///
/// `Chain(config, *, key_format="auto", plugin_dirs=(), hot_cache=None)`: `config` is a YAML path or
/// a dict of the same keys. Keys are LMCache key strings, `CacheEngineKey` objects, or multi-process
/// `ObjectKey` strings. Thread-safe; the GIL is released around every native call.
#[pyclass(frozen, name = "Chain", module = "kvhost._native")]
pub struct PyChain {
    pub(crate) chain: Chain,
    pub(crate) timeout: Duration,
    pub(crate) key_format: KeyFormat,
    closed: AtomicBool,
}

impl PyChain {
    /// Build a chain from a config object (see [`load_config`]).
    pub fn open(
        config: &Bound<'_, PyAny>,
        key_format: KeyFormat,
        plugin_dirs: Vec<PathBuf>,
        hot_cache: Option<bool>,
    ) -> PyResult<PyChain> {
        let cfg = load_config(config, plugin_dirs, hot_cache)?;
        if !cfg.local_cpu && cfg.plugins.is_empty() {
            return Err(errors::ConfigError::new_err(format!(
                "config {}: no storage_plugins and no hot cache (local_cpu: false): nothing would be stored",
                cfg.source
                    .as_ref()
                    .map_or_else(|| "<dict>".to_string(), |p| p.display().to_string())
            )));
        }
        let timeout = Duration::from_secs_f64(cfg.blocking_timeout_secs.max(0.001));
        let chain = config
            .py()
            .detach(|| Chain::from_config(&cfg))
            .map_err(errors::chain_error)?;
        Ok(PyChain {
            chain,
            timeout,
            key_format,
            closed: AtomicBool::new(false),
        })
    }

    fn keys(&self, keys: &Bound<'_, PyAny>) -> PyResult<Vec<ChunkKey>> {
        self.check_open()?;
        keys::many(keys, self.key_format)
    }

    fn check_open(&self) -> PyResult<()> {
        if self.closed.load(Ordering::Acquire) {
            return Err(ChainClosed::new_err("the chain is closed"));
        }
        Ok(())
    }
}

/// The first error of a batch as a `PluginError`, when every item failed.
fn all_failed(errors: &[String], n: usize, op: &str) -> PyResult<()> {
    if n > 0 && errors.len() == n {
        return Err(PluginError::new_err(format!(
            "{op}: all {n} chunk(s) failed; first: {}",
            errors[0]
        )));
    }
    Ok(())
}

impl PyChain {
    fn put_sources(
        &self,
        py: Python<'_>,
        keys: Vec<ChunkKey>,
        bufs: Vec<Src>,
        metas: Option<Vec<kvhost::plugin::ChunkMeta>>,
    ) -> PyResult<Vec<bool>> {
        let metas = metas.unwrap_or_else(|| vec![Default::default(); keys.len()]);
        if bufs.len() != keys.len() || metas.len() != keys.len() {
            return Err(PyValueError::new_err(format!(
                "put: {} keys, {} buffers and {} metadata entries",
                keys.len(),
                bufs.len(),
                metas.len()
            )));
        }
        let n = keys.len();
        let chain = self.chain.clone();
        let items: Vec<LentPutItem> = wait_for(py, self.timeout, "put", move |tx| {
            chain.put_lent(keys, bufs, metas, move |items| {
                let _ = tx.send(items);
            })
        })?;
        let errors: Vec<String> = items.iter().filter_map(|i| i.clone().err()).collect();
        all_failed(&errors, n, "put")?;
        if let Some(first) = errors.first() {
            tracing::warn!(target: "kvhost::python", "put: {} of {n} chunk(s) not stored; first: {first}", errors.len());
        }
        Ok(items.iter().map(|i| i.is_ok()).collect())
    }

    fn get_destinations(
        &self,
        py: Python<'_>,
        keys: Vec<ChunkKey>,
        dsts: Vec<Dst>,
    ) -> PyResult<Vec<Option<usize>>> {
        if dsts.len() != keys.len() {
            return Err(PyValueError::new_err(format!(
                "get_into: {} keys but {} buffers",
                keys.len(),
                dsts.len()
            )));
        }
        let n = keys.len();
        let names: Vec<String> = keys.iter().map(|k| k.to_string()).collect();
        let chain = self.chain.clone();
        let done = wait_for(py, self.timeout, "get_into", move |tx| {
            chain.get_lent(keys, dsts, move |done| {
                let _ = tx.send(done.items);
            })
        })?;
        let mut errors = Vec::new();
        let mut out = Vec::with_capacity(n);
        for (i, item) in done.into_iter().enumerate() {
            out.push(match item {
                GetItem::Hit { len, .. } => Some(len),
                GetItem::Miss => None,
                GetItem::TooSmall { needed } => {
                    return Err(PyValueError::new_err(format!(
                        "get_into: buffer {i} is too small for `{}`: {needed} bytes needed",
                        names[i]
                    )))
                }
                GetItem::Failed(status, why) => {
                    errors.push(format!("`{}`: {status} {why}", names[i]));
                    None
                }
            });
        }
        all_failed(&errors, n, "get_into")?;
        if let Some(first) = errors.first() {
            tracing::warn!(target: "kvhost::python", "get_into: {} of {n} chunk(s) failed; first: {first}", errors.len());
        }
        Ok(out)
    }
}

#[pymethods]
impl PyChain {
    #[new]
    #[pyo3(signature = (config, *, key_format = "auto", plugin_dirs = Vec::new(), hot_cache = None))]
    fn new(
        config: &Bound<'_, PyAny>,
        key_format: &str,
        plugin_dirs: Vec<PathBuf>,
        hot_cache: Option<bool>,
    ) -> PyResult<Self> {
        PyChain::open(
            config,
            KeyFormat::parse(key_format)?,
            plugin_dirs,
            hot_cache,
        )
    }

    /// Store chunks from buffers (no copy without a hot cache: the plugins read them). `metas[i]` is
    /// `None` or `(fmt, dtype, shape)`. Returns per chunk whether it was stored; raises `PluginError`
    /// when every chunk failed.
    #[pyo3(signature = (keys, bufs, metas = None))]
    fn put(
        &self,
        py: Python<'_>,
        keys: &Bound<'_, PyAny>,
        bufs: &Bound<'_, PyAny>,
        metas: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Vec<bool>> {
        let keys = self.keys(keys)?;
        let bufs = lend_sources(bufs)?;
        let metas = metas.map(|m| metas_from_py(m, keys.len())).transpose()?;
        self.put_sources(py, keys, bufs, metas)
    }

    /// Read chunks straight into writable buffers. Returns per chunk the bytes written, or `None` when
    /// no tier has it. A buffer smaller than its chunk raises `ValueError` naming the size needed.
    fn get_into(
        &self,
        py: Python<'_>,
        keys: &Bound<'_, PyAny>,
        bufs: &Bound<'_, PyAny>,
    ) -> PyResult<Vec<Option<usize>>> {
        let keys = self.keys(keys)?;
        let dsts = lend_destinations(bufs)?;
        self.get_destinations(py, keys, dsts)
    }

    /// Store regions of one buffer: `keys[i]` gets `lens[i]` bytes at `offsets[i]` of `owner` (a
    /// buffer or a CPU tensor, kept alive until the plugins are done). For page pools, whose pages are
    /// regions of one large tensor. Otherwise as `put`.
    fn put_regions(
        &self,
        py: Python<'_>,
        keys: &Bound<'_, PyAny>,
        owner: &Bound<'_, PyAny>,
        offsets: &Bound<'_, PyAny>,
        lens: &Bound<'_, PyAny>,
    ) -> PyResult<Vec<bool>> {
        let keys = self.keys(keys)?;
        let lent = Arc::new(Lent::new(owner, false)?);
        let bufs = regions(offsets, lens)?
            .into_iter()
            .map(|(off, len)| Src::region(lent.clone(), off, len))
            .collect::<PyResult<Vec<_>>>()?;
        self.put_sources(py, keys, bufs, None)
    }

    /// Read chunks into regions of one writable buffer or CPU tensor (see `put_regions`); as
    /// `get_into` otherwise.
    fn get_regions(
        &self,
        py: Python<'_>,
        keys: &Bound<'_, PyAny>,
        owner: &Bound<'_, PyAny>,
        offsets: &Bound<'_, PyAny>,
        lens: &Bound<'_, PyAny>,
    ) -> PyResult<Vec<Option<usize>>> {
        let keys = self.keys(keys)?;
        let lent = Arc::new(Lent::new(owner, true)?);
        let dsts = regions(offsets, lens)?
            .into_iter()
            .map(|(off, len)| Dst::new(lent.clone(), off, len))
            .collect::<PyResult<Vec<_>>>()?;
        self.get_destinations(py, keys, check_disjoint(dsts)?)
    }

    /// Per key whether any tier stores it.
    fn contains(&self, py: Python<'_>, keys: &Bound<'_, PyAny>) -> PyResult<Vec<bool>> {
        Ok(self.meta(py, keys)?.iter().map(|m| m.is_some()).collect())
    }

    /// Per key `(length, fmt, dtype, shape)` of the stored chunk, or `None`.
    fn meta<'py>(
        &self,
        py: Python<'py>,
        keys: &Bound<'py, PyAny>,
    ) -> PyResult<Vec<Option<Bound<'py, PyTuple>>>> {
        let keys = self.keys(keys)?;
        let chain = self.chain.clone();
        let items = wait_for(py, self.timeout, "contains", move |tx| {
            chain.exists_lent(keys, move |items| {
                let _ = tx.send(items);
            })
        })?;
        items
            .iter()
            .map(|p| match p {
                Presence::Present(m) => meta_to_py(py, m).map(Some),
                _ => Ok(None),
            })
            .collect()
    }

    /// LMCache's prefix walk: how many leading keys are stored. With `lookup_id`, they stay pinned
    /// until `unpin(lookup_id)` or the pin timeout.
    #[pyo3(signature = (keys, lookup_id = None))]
    fn lookup(
        &self,
        py: Python<'_>,
        keys: &Bound<'_, PyAny>,
        lookup_id: Option<String>,
    ) -> PyResult<usize> {
        let keys = self.keys(keys)?;
        let chain = self.chain.clone();
        Ok(py.detach(move || chain.lookup(&keys, lookup_id.as_deref()).hit_chunks))
    }

    /// Release the pins of a lookup; returns how many chunks were pinned.
    fn unpin(&self, py: Python<'_>, lookup_id: String) -> usize {
        let chain = self.chain.clone();
        py.detach(move || chain.unpin(&lookup_id))
    }

    /// Whether a put of this key is still on its way to the plugins.
    fn put_in_flight(&self, key: &Bound<'_, PyAny>) -> PyResult<bool> {
        let key = keys::from_py(key, self.key_format)?;
        Ok(self.chain.put_in_flight(&key))
    }

    /// Remove keys from every tier; returns per key whether any tier held it.
    fn remove(&self, py: Python<'_>, keys: &Bound<'_, PyAny>) -> PyResult<Vec<bool>> {
        let keys = self.keys(keys)?;
        let chain = self.chain.clone();
        wait_for(py, self.timeout, "remove", move |tx| {
            chain.remove_lent(keys, move |removed| {
                let _ = tx.send(removed);
            })
        })
    }

    /// Make completed puts durable in every plugin that can flush.
    fn flush(&self, py: Python<'_>) -> PyResult<()> {
        self.check_open()?;
        let chain = self.chain.clone();
        py.detach(move || {
            chain
                .plugins()
                .iter()
                .try_for_each(|p| p.flush().map_err(|e| e.to_string()))
        })
        .map_err(PluginError::new_err)
    }

    /// Remove everything from the hot cache and from every plugin that can clear
    /// (`KVH_CAP_CLEAR`); returns the hot-cache entries removed.
    fn clear(&self, py: Python<'_>) -> PyResult<usize> {
        self.check_open()?;
        let chain = self.chain.clone();
        Ok(py.detach(move || chain.clear()))
    }

    /// Per-tier counters and latencies, hot cache first (`dict`).
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let stats = self.chain.stats();
        let text = serde_json::to_string(&stats)
            .map_err(|e| PyValueError::new_err(format!("stats: {e}")))?;
        let dict = py.import("json")?.call_method1("loads", (text,))?;
        let hot = PyDict::new(py);
        hot.set_item("capacity_bytes", stats.hot.capacity_bytes)?;
        hot.set_item("used_bytes", stats.hot.used_bytes)?;
        hot.set_item("entries", stats.hot.entries)?;
        dict.set_item("hot", hot)?;
        Ok(dict)
    }

    /// Tier names, hot cache first.
    fn tier_names(&self) -> Vec<String> {
        self.chain.tier_names()
    }

    /// Operations submitted to plugins and not completed yet, per plugin.
    fn pending(&self) -> Vec<(String, usize)> {
        self.chain
            .plugins()
            .iter()
            .map(|p| (p.name().to_string(), p.pending_ops()))
            .collect()
    }

    /// Drain puts in flight (up to `timeout` seconds, default the config's blocking timeout), then
    /// destroy the plugins, which completes whatever they still hold. Returns what was left unfinished.
    #[pyo3(signature = (timeout = None))]
    fn close<'py>(&self, py: Python<'py>, timeout: Option<f64>) -> PyResult<Bound<'py, PyDict>> {
        let report = PyDict::new(py);
        if self.closed.swap(true, Ordering::AcqRel) {
            return Ok(report);
        }
        let timeout = timeout.map_or(self.timeout, |t| Duration::from_secs_f64(t.max(0.0)));
        let chain = self.chain.clone();
        let r = py.detach(move || chain.close(timeout));
        report.set_item("unfinished", PyList::new(py, &r.unfinished)?)?;
        report.set_item("stuck", PyList::new(py, &r.stuck)?)?;
        report.set_item("destroyed", PyList::new(py, &r.destroyed)?)?;
        Ok(report)
    }

    fn __enter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    #[pyo3(signature = (*_exc))]
    fn __exit__(&self, py: Python<'_>, _exc: &Bound<'_, PyTuple>) -> PyResult<bool> {
        self.close(py, None)?;
        Ok(false)
    }

    fn __repr__(&self) -> String {
        format!("kvhost.Chain({})", self.chain.tier_names().join(" -> "))
    }
}
