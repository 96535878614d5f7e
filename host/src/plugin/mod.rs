//! The safe binding of one loaded backend instance.
//!
//! [`PluginBackend`] owns a `kvh_backend *` and the plugin's vtable (copied and checked by the loader).
//! Synchronous operations borrow their keys for the call. Asynchronous ones (`put`, `get`, `prefetch`)
//! take ownership of their keys and buffers and hand them back in the completion, so the host cannot
//! touch a buffer the plugin may still be using. Every status and length the plugin reports is
//! validated before it is believed.

mod completions;
mod marshal;
mod ops;
mod stats;

pub(crate) use completions::new_instance;
pub use completions::unknown_completions;
use completions::OpTable;
pub(crate) use marshal::{c_string as ffi_c_string, host_log, host_log_enabled};
pub use ops::{
    ContainsDone, DstBuf, GetDone, GetItem, GetRequest, KeyOpDone, PrefetchDone, PutDone,
    PutRequest, RemoveDone, SrcBuf,
};
pub use stats::{stats_line, PluginStat, StatKind};

use kvhost_plugin_sdk::abi;
pub use kvhost_plugin_sdk::{ChunkMeta, Status};
use std::fmt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// An error from one plugin operation, naming the plugin.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("plugin `{plugin}`: {op} failed: {status}{}", if message.is_empty() { String::new() } else { format!(": {message}") })]
#[non_exhaustive]
pub struct PluginError {
    /// The configured plugin name.
    pub plugin: String,
    /// The operation.
    pub op: &'static str,
    /// The plugin's status (unknown codes kept as they are).
    pub status: Status,
    /// The plugin's message, or the host's explanation.
    pub message: String,
}

/// Per-instance host context: what `host_ctx` points to. Leaked, so it lives until process exit as the
/// ABI promises.
pub(crate) struct HostCtx {
    pub(crate) name: String,
    pub(crate) instance: u16,
    pub(crate) pending_ops: AtomicUsize,
    pub(crate) ops: OpTable,
}

/// What the loader learned about a plugin class.
#[derive(Clone, Debug)]
pub struct PluginInfo {
    /// Configured name.
    pub name: String,
    /// The library file.
    pub path: PathBuf,
    /// Backend class.
    pub class_name: String,
    /// The plugin's own version string.
    pub version: String,
    /// One-line description.
    pub description: String,
    /// ABI version the plugin was built against.
    pub abi: (u16, u16),
    /// `KVH_CAP_*` bits.
    pub capabilities: u64,
    /// The option schema.
    pub schema: Vec<OptionInfo>,
    /// Effective options passed to `create` (schema order, defaults applied).
    pub options: Vec<(String, String)>,
}

/// One option of a plugin's schema.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OptionInfo {
    /// Name.
    pub key: String,
    /// Default, if any.
    pub default: Option<String>,
    /// Documentation.
    pub doc: String,
    /// Must be given.
    pub required: bool,
    /// Never printed.
    pub secret: bool,
}

/// Names of the capability bits, for display.
pub fn capability_names(caps: u64) -> Vec<&'static str> {
    [
        (abi::KVH_CAP_PIN, "pin"),
        (abi::KVH_CAP_PREFETCH, "prefetch"),
        (abi::KVH_CAP_FLUSH, "flush"),
        (abi::KVH_CAP_HEALTH, "health"),
        (abi::KVH_CAP_PERSISTENT, "persistent"),
        (abi::KVH_CAP_SHARED, "shared"),
        (abi::KVH_CAP_DISCARDS, "discards"),
        (abi::KVH_CAP_CLEAR, "clear"),
        (abi::KVH_CAP_ASYNC_CONTAINS, "async_contains"),
        (abi::KVH_CAP_ASYNC_REMOVE, "async_remove"),
        (abi::KVH_CAP_STATS, "stats"),
    ]
    .iter()
    .filter(|(bit, _)| caps & bit != 0)
    .map(|&(_, name)| name)
    .collect()
}

/// Presence of one key, from `contains`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Presence {
    /// Stored, with its metadata.
    Present(ChunkMeta),
    /// Not stored.
    Absent,
    /// The plugin failed for this key.
    Failed(Status, String),
}

/// One loaded, created backend. `Send + Sync`: data operations may run on any thread at once, as the ABI
/// allows. Dropping it calls the plugin's `destroy`.
pub struct PluginBackend {
    info: Arc<PluginInfo>,
    vt: abi::kvh_backend_vtable,
    backend: *mut abi::kvh_backend,
    ctx: &'static HostCtx,
}

// SAFETY: the ABI makes every data-path function `[any-thread]` and concurrent-safe; `destroy` runs
// only from `Drop`, which has exclusive access.
unsafe impl Send for PluginBackend {}
// SAFETY: as above.
unsafe impl Sync for PluginBackend {}

impl fmt::Debug for PluginBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PluginBackend")
            .field("name", &self.info.name)
            .field("class", &self.info.class_name)
            .finish()
    }
}

impl PluginBackend {
    /// Bind a created backend. Only the loader calls this, after its checks.
    pub(crate) fn new(
        info: PluginInfo,
        vt: abi::kvh_backend_vtable,
        backend: *mut abi::kvh_backend,
        ctx: &'static HostCtx,
    ) -> Self {
        PluginBackend {
            info: Arc::new(info),
            vt,
            backend,
            ctx,
        }
    }

    /// What the loader learned about this plugin.
    pub fn info(&self) -> &PluginInfo {
        &self.info
    }

    /// Configured name.
    pub fn name(&self) -> &str {
        &self.info.name
    }

    /// Whether the plugin advertises capability `bit`.
    pub fn has(&self, bit: u64) -> bool {
        self.info.capabilities & bit != 0
    }

    /// Completion callbacks from this instance that matched no pending operation (it completed an
    /// operation twice, or one it had finished synchronously). Each was logged and ignored.
    pub fn stale_completions(&self) -> u64 {
        self.ctx.ops.stale.load(Ordering::Relaxed)
    }

    /// Operations the plugin answered with `KVH_PENDING` whose completion has not arrived yet. (The
    /// chain calls a put *in flight* until every tier stored it; *pending* is this.)
    pub fn pending_ops(&self) -> usize {
        self.ctx.pending_ops.load(Ordering::Acquire)
    }

    fn error(&self, op: &'static str, status: Status, message: impl Into<String>) -> PluginError {
        PluginError {
            plugin: self.info.name.clone(),
            op,
            status,
            message: message.into(),
        }
    }

    /// The plugin's `last_error` text for a failed synchronous call on this thread.
    fn last_error(&self) -> String {
        let Some(f) = self.vt.last_error else {
            return String::new();
        };
        let mut buf = marshal::MessageBuf::new();
        let raw = buf.raw();
        // SAFETY: a checked vtable function with the live backend and a host buffer of `cap` bytes.
        unsafe { f(self.backend, raw.ptr, raw.cap) };
        buf.text()
    }

    fn sync_error(&self, op: &'static str, status: abi::kvh_status) -> PluginError {
        let status = Status(status);
        let msg = self.last_error();
        let msg = if status.name().is_none() && msg.is_empty() {
            "the plugin returned a status code this host does not know".to_string()
        } else {
            msg
        };
        self.error(op, status, msg)
    }

    /// Which keys are stored, with their metadata; pins present keys if `pin` (ignored without
    /// `KVH_CAP_PIN`). Always the synchronous entry: the calling thread waits inside the plugin. The
    /// chain uses [`contains_wait`](Self::contains_wait), which prefers `contains_async`.
    pub fn contains(
        &self,
        keys: &[crate::ChunkKey],
        pin: bool,
    ) -> Result<Vec<Presence>, PluginError> {
        let n = keys.len();
        let ffi_keys = marshal::FfiKeys::new(keys);
        let mut meta = vec![ChunkMeta::default(); n];
        let mut status = vec![abi::KVH_ERR_NO_RESULT; n];
        let batch = abi::kvh_contains_batch {
            keys: ffi_keys.keys.as_ptr(),
            out_meta: meta.as_mut_ptr(),
            item_status: status.as_mut_ptr(),
            len: n,
            pin: u32::from(pin && self.has(abi::KVH_CAP_PIN)),
            reserved: 0,
        };
        let f = self.vt.contains.expect("checked by the loader");
        // SAFETY: checked vtable function; every array has `n` entries and outlives the call.
        let rc = unsafe { f(self.backend, &batch) };
        if rc != abi::KVH_OK {
            return Err(self.sync_error("contains", rc));
        }
        Ok(ops::presence_items(rc, &status, &meta))
    }

    fn key_op(
        &self,
        op: &'static str,
        keys: &[crate::ChunkKey],
        call: impl FnOnce(*const abi::kvh_key_batch) -> abi::kvh_status,
    ) -> Result<Vec<Status>, PluginError> {
        let n = keys.len();
        let ffi_keys = marshal::FfiKeys::new(keys);
        let mut status = vec![abi::KVH_ERR_NO_RESULT; n];
        let batch = abi::kvh_key_batch {
            keys: ffi_keys.keys.as_ptr(),
            item_status: status.as_mut_ptr(),
            len: n,
        };
        let rc = call(&batch);
        if rc != abi::KVH_OK {
            return Err(self.sync_error(op, rc));
        }
        Ok(status.into_iter().map(Status).collect())
    }

    /// Remove keys: per key `OK`, `NOT_FOUND` or an error. Always the synchronous entry (see
    /// [`remove_wait`](Self::remove_wait)).
    pub fn remove(
        &self,
        keys: &[crate::ChunkKey],
        force: bool,
    ) -> Result<Vec<Status>, PluginError> {
        let f = self.vt.remove.expect("checked by the loader");
        // SAFETY: checked vtable function; the batch and its arrays outlive the call.
        self.key_op("remove", keys, |b| unsafe { f(self.backend, b, force) })
    }

    /// Pin keys (`KVH_CAP_PIN`).
    pub fn pin(&self, keys: &[crate::ChunkKey]) -> Result<Vec<Status>, PluginError> {
        let Some(f) = self.vt.pin else {
            return Err(self.error(
                "pin",
                Status::UNSUPPORTED,
                "the plugin has no pin capability",
            ));
        };
        // SAFETY: as in `remove`.
        self.key_op("pin", keys, |b| unsafe { f(self.backend, b) })
    }

    /// Unpin keys (`KVH_CAP_PIN`).
    pub fn unpin(&self, keys: &[crate::ChunkKey]) -> Result<Vec<Status>, PluginError> {
        let Some(f) = self.vt.unpin else {
            return Err(self.error(
                "unpin",
                Status::UNSUPPORTED,
                "the plugin has no pin capability",
            ));
        };
        // SAFETY: as in `remove`.
        self.key_op("unpin", keys, |b| unsafe { f(self.backend, b) })
    }

    /// Make completed puts durable (`KVH_CAP_FLUSH`; a no-op without it).
    pub fn flush(&self) -> Result<(), PluginError> {
        let Some(f) = self.vt.flush else {
            return Ok(());
        };
        // SAFETY: checked vtable function with the live backend.
        let rc = unsafe { f(self.backend) };
        if rc != abi::KVH_OK {
            return Err(self.sync_error("flush", rc));
        }
        Ok(())
    }

    /// Remove everything the plugin stores (`KVH_CAP_CLEAR`); `UNSUPPORTED` without it.
    pub fn clear(&self) -> Result<(), PluginError> {
        let Some(f) = self.vt.clear else {
            return Err(self.error(
                "clear",
                Status::UNSUPPORTED,
                "the plugin has no clear capability",
            ));
        };
        // SAFETY: checked vtable function with the live backend.
        let rc = unsafe { f(self.backend) };
        if rc != abi::KVH_OK {
            return Err(self.sync_error("clear", rc));
        }
        Ok(())
    }

    /// The plugin's health (`KVH_CAP_HEALTH`); `None` when it has no health operation.
    pub fn health(&self) -> Option<Result<String, PluginError>> {
        let f = self.vt.health?;
        let mut buf = marshal::MessageBuf::new();
        // SAFETY: checked vtable function; the buffer outlives the call.
        let rc = unsafe { f(self.backend, buf.raw()) };
        Some(if rc == abi::KVH_OK {
            Ok(buf.text())
        } else {
            Err(self.error("health", Status(rc), buf.text()))
        })
    }
}

impl Drop for PluginBackend {
    fn drop(&mut self) {
        let f = self.vt.destroy.expect("checked by the loader");
        // SAFETY: `destroy` of the live backend, once, with exclusive access (we are in `drop`).
        unsafe { f(self.backend) };
        let left = self.pending_ops();
        if left > 0 {
            tracing::error!(
                target: "kvhost::plugin",
                plugin = %self.info.name,
                "destroy returned with {left} operation(s) never completed, breaking the ABI; their buffers are leaked"
            );
        }
    }
}
