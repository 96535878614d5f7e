//! The trait a Rust plugin implements, and what `create` receives.

use crate::logging::Host;
use crate::request::{
    Contains, ContainsBatch, Get, KeyBatch, Prefetch, Put, Remove, Request, Submit,
};
use crate::status::{Error, Status};
use std::ffi::CStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// One accepted option of a backend class, as declared by the plugin.
#[derive(Clone, Copy, Debug)]
pub struct OptionSpec {
    /// Option name: `[a-z0-9_]+`.
    pub key: &'static CStr,
    /// Default value, if any.
    pub default: Option<&'static CStr>,
    /// One line of documentation.
    pub doc: &'static CStr,
    /// `KVH_OPTION_*` bits.
    pub flags: u32,
}

impl OptionSpec {
    /// An optional option with a default.
    pub const fn optional(key: &'static CStr, default: &'static CStr, doc: &'static CStr) -> Self {
        OptionSpec {
            key,
            default: Some(default),
            doc,
            flags: 0,
        }
    }
    /// A required option without a default.
    pub const fn required(key: &'static CStr, doc: &'static CStr) -> Self {
        OptionSpec {
            key,
            default: None,
            doc,
            flags: crate::abi::KVH_OPTION_REQUIRED,
        }
    }
    /// The same option, marked secret (never printed by the host).
    pub const fn secret(mut self) -> Self {
        self.flags |= crate::abi::KVH_OPTION_SECRET;
        self
    }
}

/// The model whose KV cache the backend stores (copied out of the ABI struct).
#[derive(Clone, Debug, Default)]
pub struct ModelMetadata {
    /// Model name.
    pub model_name: String,
    /// World size.
    pub world_size: u32,
    /// Worker id.
    pub worker_id: u32,
    /// Tokens per chunk.
    pub chunk_size: u32,
    /// LMCache dtype string.
    pub dtype: String,
    /// `KVH_DTYPE_*` code.
    pub dtype_code: i32,
    /// MLA model.
    pub use_mla: bool,
    /// `(layers, 2|1, chunk_size, kv_heads, head_size)`.
    pub kv_shape: [u64; 5],
    /// Bytes of one full chunk.
    pub full_chunk_bytes: u64,
}

/// What `create` receives: the options (defaults applied, already validated against
/// [`Backend::OPTIONS`] by the host), the model metadata and the host handle.
#[derive(Debug)]
pub struct CreateContext {
    /// Configured instance name.
    pub instance_name: String,
    /// Options in schema order.
    pub options: Vec<(String, String)>,
    /// Model metadata.
    pub metadata: ModelMetadata,
    /// Host services (logging).
    pub host: Host,
    /// The backend's poison flag, shared with threads started by [`CreateContext::spawn`].
    pub(crate) poisoned: Arc<AtomicBool>,
}

impl CreateContext {
    /// Start a worker thread for this backend. Its `log`/`tracing` events carry the instance name, and
    /// a panic in it is caught, logged through the host and poisons the backend (later calls return
    /// `KVH_ERR_POISONED`, requests still pending complete with it), exactly like a panic in a call
    /// from the host. Requests the thread held when it panicked complete with `CANCELED` as they drop.
    pub fn spawn<F>(&self, name: &str, f: F) -> std::io::Result<std::thread::JoinHandle<()>>
    where
        F: FnOnce() + Send + 'static,
    {
        let host = self.host;
        let poisoned = self.poisoned.clone();
        let instance = self.instance_name.clone();
        std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || {
                host.bind_current_thread();
                if let Err(payload) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
                    poisoned.store(true, Ordering::Release);
                    let what = payload
                        .downcast_ref::<&str>()
                        .copied()
                        .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
                        .unwrap_or("non-string panic payload");
                    let msg = format!(
                        "panic in a worker thread of `{instance}`: {what}; backend poisoned"
                    );
                    host.log(crate::abi::KVH_LOG_ERROR, "kvhost_plugin_sdk", &msg);
                }
            })
    }

    /// The value of option `key`, if given or defaulted.
    pub fn option(&self, key: &str) -> Option<&str> {
        self.options
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// Option `key` parsed as `T`, or an `INVALID_CONFIG` error naming the key and value.
    pub fn parse<T: std::str::FromStr>(&self, key: &str) -> Result<T, Error>
    where
        T::Err: std::fmt::Display,
    {
        let value = self
            .option(key)
            .ok_or_else(|| Error::config(format!("option `{key}` is missing")))?;
        value
            .trim()
            .parse()
            .map_err(|e| Error::config(format!("option `{key}` = `{value}`: {e}")))
    }
}

/// A storage backend. Implement it, then export it with [`export_backend!`](crate::export_backend).
///
/// Every method may be called from any host thread, concurrently (hence `Send + Sync`), except `create`
/// and `Drop`, which the host serialises. A panic in any method is caught: the call returns
/// `KVH_ERR_PANIC` and the backend is poisoned (later calls return `KVH_ERR_POISONED`).
pub trait Backend: Send + Sync + Sized + 'static {
    /// `KVH_CAP_*` bits. The optional methods below are exported exactly when their bit is set.
    const CAPABILITIES: u64 = 0;
    /// Accepted options.
    const OPTIONS: &'static [OptionSpec] = &[];
    /// One line describing the backend.
    const DESCRIPTION: &'static CStr = c"";

    /// Make a backend from its options.
    fn create(ctx: &CreateContext) -> Result<Self, Error>;

    /// For each key: `set_present` with its metadata (pinning it if `batch.pin()`), or `set_absent`.
    fn contains(&self, batch: &mut ContainsBatch<'_>) -> Result<(), Error>;

    /// Store chunks: set each item's status, then `finish` or `defer` the request.
    fn put(&self, req: Request<Put>) -> Submit;

    /// Read chunks into the host's buffers (`fill` or `set_found`/`set_status` per item), then `finish`
    /// or `defer` the request.
    fn get(&self, req: Request<Get>) -> Submit;

    /// Remove keys (`OK` or `NOT_FOUND` per item). `force` removes pinned keys too.
    fn remove(&self, batch: &mut KeyBatch<'_>, force: bool) -> Result<(), Error>;

    /// `KVH_CAP_PIN`: pin keys.
    fn pin(&self, _batch: &mut KeyBatch<'_>) -> Result<(), Error> {
        Err(Error::new(Status::UNSUPPORTED, "pin is not supported"))
    }

    /// `KVH_CAP_PIN`: unpin keys.
    fn unpin(&self, _batch: &mut KeyBatch<'_>) -> Result<(), Error> {
        Err(Error::new(Status::UNSUPPORTED, "unpin is not supported"))
    }

    /// `KVH_CAP_PREFETCH`: warm keys.
    fn prefetch(&self, req: Request<Prefetch>) -> Submit {
        req.finish(Status::UNSUPPORTED)
    }

    /// `KVH_CAP_FLUSH`: make completed puts durable.
    fn flush(&self) -> Result<(), Error> {
        Ok(())
    }

    /// `KVH_CAP_CLEAR`: remove everything this instance stores.
    fn clear(&self) -> Result<(), Error> {
        Err(Error::new(Status::UNSUPPORTED, "clear is not supported"))
    }

    /// `KVH_CAP_ASYNC_CONTAINS` (ABI 1.2): [`contains`](Self::contains) with a completion, for a
    /// backend that needs a network or disk round trip to answer. `defer` the request to a worker, which
    /// answers every key (`set_present`, `set_absent` or `set_status`) and completes it. A host that knows
    /// ABI 1.2 calls this instead of `contains` when the bit is set; `contains` must still give the same
    /// answers.
    fn contains_async(&self, req: Request<Contains>) -> Submit {
        req.finish(Status::UNSUPPORTED)
    }

    /// `KVH_CAP_ASYNC_REMOVE` (ABI 1.2): [`remove`](Self::remove) with a completion. Once it completes,
    /// the keys are no longer served.
    fn remove_async(&self, req: Request<Remove>, _force: bool) -> Submit {
        req.finish(Status::UNSUPPORTED)
    }

    /// `KVH_CAP_HEALTH`: a one-line state on success.
    fn health(&self) -> Result<String, Error> {
        Ok("ok".to_string())
    }

    /// `KVH_CAP_STATS` (ABI 1.3): report counters and gauges (`out.counter("evictions", n)`,
    /// `out.gauge("bytes_used", n)`, …). Quick and without I/O: the host calls it for every metrics
    /// scrape. An invalid or repeated name makes the call fail with a message naming it.
    fn stats(&self, _out: &mut crate::Stats) -> Result<(), Error> {
        Ok(())
    }
}
