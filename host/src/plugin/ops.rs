//! Asynchronous operations: `put`, `get`, `prefetch`, and `contains`/`remove` through their ABI 1.2
//! asynchronous entries.
//!
//! Each call moves its keys, buffers and per-item arrays into one boxed operation state, turns the box
//! into a raw owner ([`PendingState`], `Box::into_raw`), and derives the batch pointer the plugin gets
//! from that raw allocation, so no pointer is taken before a move that could invalidate it. The state
//! is registered in the completion table before the plugin is called. The state (with the caller's buffers) comes back through the `on_done` closure, exactly
//! once: from the completion callback for PENDING, or right away for any other status.

use super::completions::{self, PendingOp, PendingState};
use super::marshal::FfiKeys;
use super::{PluginBackend, PluginError, Presence};
use crate::key::ChunkKey;
use kvhost_plugin_sdk::abi;
use kvhost_plugin_sdk::{ChunkMeta, Status};
use std::sync::atomic::Ordering;
use std::time::Duration;

/// A source buffer a plugin may read until the operation completes.
pub trait SrcBuf: Send + 'static {
    /// The bytes. Must stay at the same address while the buffer is owned by an operation.
    fn bytes(&self) -> &[u8];
}

/// A destination buffer a plugin may write until the operation completes.
pub trait DstBuf: Send + 'static {
    /// The writable bytes. Must stay at the same address while owned by an operation.
    fn bytes_mut(&mut self) -> &mut [u8];
}

impl SrcBuf for Vec<u8> {
    fn bytes(&self) -> &[u8] {
        self
    }
}
impl SrcBuf for Box<[u8]> {
    fn bytes(&self) -> &[u8] {
        self
    }
}
impl SrcBuf for std::sync::Arc<[u8]> {
    fn bytes(&self) -> &[u8] {
        self
    }
}
impl DstBuf for Vec<u8> {
    fn bytes_mut(&mut self) -> &mut [u8] {
        self
    }
}
impl DstBuf for Box<[u8]> {
    fn bytes_mut(&mut self) -> &mut [u8] {
        self
    }
}

/// Chunks to store: `keys[i]`, `bufs[i]`, `metas[i]`.
#[derive(Debug)]
pub struct PutRequest<B> {
    /// Keys.
    pub keys: Vec<ChunkKey>,
    /// Chunk bytes.
    pub bufs: Vec<B>,
    /// Chunk metadata.
    pub metas: Vec<ChunkMeta>,
}

/// The end of a put: the request back, the aggregate result, and one status per chunk.
#[derive(Debug)]
pub struct PutDone<B> {
    /// The request, buffers included.
    pub request: PutRequest<B>,
    /// Per chunk: `OK` or the error. When the whole call failed, every item carries that error.
    pub items: Vec<Status>,
    /// The whole call's error, if it failed.
    pub error: Option<PluginError>,
}

/// Chunks to read into `bufs[i]`.
#[derive(Debug)]
pub struct GetRequest<B> {
    /// Keys.
    pub keys: Vec<ChunkKey>,
    /// Destination buffers.
    pub bufs: Vec<B>,
}

/// The outcome of one chunk of a get.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GetItem {
    /// `len` bytes were written into the buffer; the chunk's metadata.
    Hit {
        /// Bytes written.
        len: usize,
        /// Stored metadata.
        meta: ChunkMeta,
    },
    /// Not stored.
    Miss,
    /// The buffer was too small; this many bytes are needed.
    TooSmall {
        /// Required size.
        needed: u64,
    },
    /// The plugin failed, or reported something impossible (then `Status::INTERNAL` and why).
    Failed(Status, String),
}

/// The end of a get.
#[derive(Debug)]
pub struct GetDone<B> {
    /// The request, buffers included.
    pub request: GetRequest<B>,
    /// Per chunk.
    pub items: Vec<GetItem>,
    /// The whole call's error, if it failed.
    pub error: Option<PluginError>,
}

/// The end of an operation on a key batch (`prefetch`, `remove`).
#[derive(Debug)]
pub struct KeyOpDone {
    /// The keys.
    pub keys: Vec<ChunkKey>,
    /// Per key: `OK` (warm, or removed), `NOT_FOUND` or an error.
    pub items: Vec<Status>,
    /// The whole call's error, if it failed.
    pub error: Option<PluginError>,
}

/// The end of a prefetch.
pub type PrefetchDone = KeyOpDone;

/// The end of a remove.
pub type RemoveDone = KeyOpDone;

/// The end of a contains.
#[derive(Debug)]
pub struct ContainsDone {
    /// The keys.
    pub keys: Vec<ChunkKey>,
    /// Per key. When the whole call failed, every key carries that error.
    pub items: Vec<Presence>,
    /// The whole call's error, if it failed.
    pub error: Option<PluginError>,
}

/// Per-key presence from the raw arrays of a finished contains.
pub(crate) fn presence_items(
    aggregate: abi::kvh_status,
    status: &[abi::kvh_status],
    meta: &[ChunkMeta],
) -> Vec<Presence> {
    item_statuses(aggregate, status)
        .into_iter()
        .zip(meta)
        .map(|(s, m)| match s.0 {
            abi::KVH_OK => match check_meta(m) {
                Ok(()) => Presence::Present(*m),
                Err(why) => Presence::Failed(Status::INTERNAL, why),
            },
            abi::KVH_ERR_NOT_FOUND => Presence::Absent,
            abi::KVH_ERR_NO_RESULT => {
                Presence::Failed(s, "the plugin did not report this key".into())
            }
            _ => Presence::Failed(s, String::new()),
        })
        .collect()
}

/// A metadata record is plausible.
pub(crate) fn check_meta(m: &ChunkMeta) -> Result<(), String> {
    if m.ndim > 4 {
        return Err(format!(
            "the plugin reported a shape with {} dimensions (at most 4)",
            m.ndim
        ));
    }
    Ok(())
}

/// Map the per-item statuses of a finished batch, given the aggregate status.
fn item_statuses(aggregate: abi::kvh_status, raw: &[abi::kvh_status]) -> Vec<Status> {
    raw.iter()
        .map(|&s| match (aggregate, s) {
            (abi::KVH_OK, s) => Status(s),
            (agg, abi::KVH_ERR_NO_RESULT) => Status(agg),
            (_, s) => Status(s),
        })
        .collect()
}

fn aggregate_error(
    plugin: &str,
    op: &'static str,
    status: abi::kvh_status,
    message: &str,
) -> Option<PluginError> {
    (status != abi::KVH_OK).then(|| PluginError {
        plugin: plugin.to_string(),
        op,
        status: Status(status),
        message: if message.is_empty() && Status(status).name().is_none() {
            "the plugin returned a status code this host does not know".to_string()
        } else {
            message.to_string()
        },
    })
}

struct PutState<B, F> {
    plugin: String,
    request: PutRequest<B>,
    ffi_keys: FfiKeys,
    src: Vec<abi::kvh_bytes>,
    status: Vec<abi::kvh_status>,
    batch: abi::kvh_put_batch,
    on_done: Option<F>,
}

impl<B: SrcBuf, F: FnOnce(PutDone<B>) + Send + 'static> PendingOp for PutState<B, F> {
    fn finish(self: Box<Self>, status: abi::kvh_status, message: &str) {
        let s = *self;
        let items = item_statuses(status, &s.status);
        let error = aggregate_error(&s.plugin, "put", status, message);
        if let Some(f) = s.on_done {
            f(PutDone {
                request: s.request,
                items,
                error,
            });
        }
    }
}

// SAFETY: the raw pointers in the state point into the state's own heap data (and the keys' shared,
// immutable text), which moves with it; the plugin accesses them from any thread per the ABI.
unsafe impl<B: Send, F: Send> Send for PutState<B, F> {}

struct GetState<B, F> {
    plugin: String,
    request: GetRequest<B>,
    ffi_keys: FfiKeys,
    dst: Vec<abi::kvh_mut_bytes>,
    out_len: Vec<u64>,
    out_meta: Vec<ChunkMeta>,
    status: Vec<abi::kvh_status>,
    batch: abi::kvh_get_batch,
    on_done: Option<F>,
}

impl<B: DstBuf, F: FnOnce(GetDone<B>) + Send + 'static> PendingOp for GetState<B, F> {
    fn finish(self: Box<Self>, status: abi::kvh_status, message: &str) {
        let s = *self;
        let items = item_statuses(status, &s.status)
            .into_iter()
            .enumerate()
            .map(|(i, st)| {
                let cap = s.dst[i].len as u64;
                match st.0 {
                    abi::KVH_OK => {
                        let (len, meta) = (s.out_len[i], s.out_meta[i]);
                        if len > cap {
                            GetItem::Failed(
                                Status::INTERNAL,
                                format!("the plugin claims {len} bytes written into a {cap}-byte buffer"),
                            )
                        } else if meta.length != len {
                            GetItem::Failed(
                                Status::INTERNAL,
                                format!("the plugin returned {len} bytes but metadata says {}", meta.length),
                            )
                        } else if let Err(why) = check_meta(&meta) {
                            GetItem::Failed(Status::INTERNAL, why)
                        } else {
                            GetItem::Hit { len: len as usize, meta }
                        }
                    }
                    abi::KVH_ERR_NOT_FOUND => GetItem::Miss,
                    abi::KVH_ERR_BUFFER_TOO_SMALL if s.out_len[i] > cap => GetItem::TooSmall { needed: s.out_len[i] },
                    abi::KVH_ERR_BUFFER_TOO_SMALL => GetItem::Failed(
                        Status::INTERNAL,
                        format!("the plugin reported BUFFER_TOO_SMALL but needs {} <= {cap} bytes", s.out_len[i]),
                    ),
                    abi::KVH_ERR_NO_RESULT => GetItem::Failed(st, "the plugin did not report this chunk".into()),
                    _ => GetItem::Failed(st, String::new()),
                }
            })
            .collect();
        let error = aggregate_error(&s.plugin, "get", status, message);
        if let Some(f) = s.on_done {
            f(GetDone {
                request: s.request,
                items,
                error,
            });
        }
    }
}

// SAFETY: as for `PutState`.
unsafe impl<B: Send, F: Send> Send for GetState<B, F> {}

struct KeyOpState<F> {
    plugin: String,
    op: &'static str,
    keys: Vec<ChunkKey>,
    ffi_keys: FfiKeys,
    status: Vec<abi::kvh_status>,
    batch: abi::kvh_key_batch,
    on_done: Option<F>,
}

// SAFETY: as for `PutState`.
unsafe impl<F: Send> Send for KeyOpState<F> {}

impl<F: FnOnce(KeyOpDone) + Send + 'static> PendingOp for KeyOpState<F> {
    fn finish(self: Box<Self>, status: abi::kvh_status, message: &str) {
        let s = *self;
        let items = item_statuses(status, &s.status);
        let error = aggregate_error(&s.plugin, s.op, status, message);
        if let Some(f) = s.on_done {
            f(KeyOpDone {
                keys: s.keys,
                items,
                error,
            });
        }
    }
}

struct ContainsState<F> {
    plugin: String,
    keys: Vec<ChunkKey>,
    ffi_keys: FfiKeys,
    meta: Vec<ChunkMeta>,
    status: Vec<abi::kvh_status>,
    batch: abi::kvh_contains_batch,
    on_done: Option<F>,
}

// SAFETY: as for `PutState`.
unsafe impl<F: Send> Send for ContainsState<F> {}

impl<F: FnOnce(ContainsDone) + Send + 'static> PendingOp for ContainsState<F> {
    fn finish(self: Box<Self>, status: abi::kvh_status, message: &str) {
        let s = *self;
        let items = presence_items(status, &s.status, &s.meta);
        let error = aggregate_error(&s.plugin, "contains", status, message);
        if let Some(f) = s.on_done {
            f(ContainsDone {
                keys: s.keys,
                items,
                error,
            });
        }
    }
}

fn length_mismatch(plugin: &str, op: &'static str, what: &str) -> PluginError {
    PluginError {
        plugin: plugin.to_string(),
        op,
        status: Status::INVALID_ARG,
        message: what.to_string(),
    }
}

impl PluginBackend {
    /// Submit an operation whose state is already owned by a [`PendingState`]: register it, call the
    /// plugin, and resolve a synchronous return. `call`'s batch pointer was derived from the state's
    /// raw allocation.
    fn submit(
        &self,
        state: PendingState,
        call: impl FnOnce(abi::kvh_completion) -> abi::kvh_status,
        op: &'static str,
    ) {
        let token = match completions::register(state, self.ctx) {
            Ok(token) => token,
            Err(state) => {
                return state.finish(
                    abi::KVH_ERR_BUSY,
                    "too many operations pending on this plugin",
                )
            }
        };
        self.ctx.pending_ops.fetch_add(1, Ordering::AcqRel);
        let rc = call(abi::kvh_completion {
            complete: Some(completions::on_complete),
            user_data: token,
        });
        if rc == abi::KVH_PENDING {
            return;
        }
        match completions::take(token) {
            Ok((state, _)) => {
                self.ctx.pending_ops.fetch_sub(1, Ordering::AcqRel);
                let message = if rc == abi::KVH_OK {
                    String::new()
                } else {
                    self.last_error()
                };
                state.finish(rc, &message);
            }
            Err(_) => tracing::error!(
                target: "kvhost::plugin",
                plugin = %self.info.name,
                "{op} returned status {rc} but had already fired its completion callback; \
                 the callback's result was used"
            ),
        }
    }

    /// Store chunks asynchronously. `on_done` runs exactly once, on the completing plugin thread or on
    /// this thread; it must not block for long.
    pub fn put<B: SrcBuf, F: FnOnce(PutDone<B>) + Send + 'static>(
        &self,
        request: PutRequest<B>,
        on_done: F,
    ) {
        let n = request.keys.len();
        if request.bufs.len() != n || request.metas.len() != n {
            let items = vec![Status::INVALID_ARG; n];
            let error = Some(length_mismatch(
                &self.info.name,
                "put",
                "keys, buffers and metadata differ in length",
            ));
            return on_done(PutDone {
                request,
                items,
                error,
            });
        }
        let keys = FfiKeys::new(&request.keys);
        let src = request
            .bufs
            .iter()
            .map(|b| {
                let b = b.bytes();
                abi::kvh_bytes {
                    ptr: b.as_ptr(),
                    len: b.len(),
                }
            })
            .collect();
        let mut state = Box::new(PutState {
            plugin: self.info.name.clone(),
            ffi_keys: keys,
            src,
            status: vec![abi::KVH_ERR_NO_RESULT; n],
            batch: abi::kvh_put_batch {
                keys: std::ptr::null(),
                src: std::ptr::null(),
                meta: std::ptr::null(),
                item_status: std::ptr::null_mut(),
                len: n,
            },
            request,
            on_done: Some(on_done),
        });
        state.batch.keys = state.ffi_keys.keys.as_ptr();
        state.batch.src = state.src.as_ptr();
        state.batch.meta = state.request.metas.as_ptr();
        state.batch.item_status = state.status.as_mut_ptr();
        let (state, raw) = PendingState::new(state);
        // SAFETY: `raw` is the live allocation `state` owns; the place is only addressed, not read.
        let batch: *const abi::kvh_put_batch = unsafe { &raw const (*raw).batch };
        let f = self.vt.put.expect("checked by the loader");
        // SAFETY: `batch` and every array it points to live in the state's allocation, which the
        // completion table owns (by raw pointer, untouched by the host) until the plugin completes or
        // returns.
        self.submit(state, |done| unsafe { f(self.backend, batch, done) }, "put");
    }

    /// Read chunks into the request's buffers asynchronously; `on_done` as for [`put`](Self::put).
    pub fn get<B: DstBuf, F: FnOnce(GetDone<B>) + Send + 'static>(
        &self,
        mut request: GetRequest<B>,
        on_done: F,
    ) {
        let n = request.keys.len();
        if request.bufs.len() != n {
            let items = vec![GetItem::Failed(Status::INVALID_ARG, String::new()); n];
            let error = Some(length_mismatch(
                &self.info.name,
                "get",
                "keys and buffers differ in length",
            ));
            return on_done(GetDone {
                request,
                items,
                error,
            });
        }
        let keys = FfiKeys::new(&request.keys);
        let dst = request
            .bufs
            .iter_mut()
            .map(|b| {
                let s = b.bytes_mut();
                abi::kvh_mut_bytes {
                    ptr: s.as_mut_ptr(),
                    len: s.len(),
                }
            })
            .collect();
        let mut state = Box::new(GetState {
            plugin: self.info.name.clone(),
            request,
            ffi_keys: keys,
            dst,
            out_len: vec![0; n],
            out_meta: vec![ChunkMeta::default(); n],
            status: vec![abi::KVH_ERR_NO_RESULT; n],
            batch: abi::kvh_get_batch {
                keys: std::ptr::null(),
                dst: std::ptr::null(),
                out_len: std::ptr::null_mut(),
                out_meta: std::ptr::null_mut(),
                item_status: std::ptr::null_mut(),
                len: n,
            },
            on_done: Some(on_done),
        });
        state.batch.keys = state.ffi_keys.keys.as_ptr();
        state.batch.dst = state.dst.as_ptr();
        state.batch.out_len = state.out_len.as_mut_ptr();
        state.batch.out_meta = state.out_meta.as_mut_ptr();
        state.batch.item_status = state.status.as_mut_ptr();
        let (state, raw) = PendingState::new(state);
        // SAFETY: `raw` is the live allocation `state` owns; the place is only addressed, not read.
        let batch: *const abi::kvh_get_batch = unsafe { &raw const (*raw).batch };
        let f = self.vt.get.expect("checked by the loader");
        // SAFETY: as in `put`; the destination buffers are owned by the state and not touched by the
        // host until completion.
        self.submit(state, |done| unsafe { f(self.backend, batch, done) }, "get");
    }

    /// Ask the plugin to warm keys (`KVH_CAP_PREFETCH`); without the capability every key is reported
    /// `UNSUPPORTED` at once.
    pub fn prefetch<F: FnOnce(PrefetchDone) + Send + 'static>(
        &self,
        keys: Vec<ChunkKey>,
        on_done: F,
    ) {
        let n = keys.len();
        let Some(f) = self.vt.prefetch else {
            return on_done(PrefetchDone {
                keys,
                items: vec![Status::UNSUPPORTED; n],
                error: None,
            });
        };
        // SAFETY: as in `put`.
        self.submit_key_op("prefetch", keys, on_done, |batch, done| unsafe {
            f(self.backend, batch, done)
        });
    }

    /// Submit an asynchronous operation on a key batch (`prefetch`, `remove_async`): `call` gets the
    /// batch, which lives in the boxed state until completion, and the completion.
    fn submit_key_op<F: FnOnce(KeyOpDone) + Send + 'static>(
        &self,
        op: &'static str,
        keys: Vec<ChunkKey>,
        on_done: F,
        call: impl FnOnce(*const abi::kvh_key_batch, abi::kvh_completion) -> abi::kvh_status,
    ) {
        let n = keys.len();
        let ffi_keys = FfiKeys::new(&keys);
        let mut state = Box::new(KeyOpState {
            plugin: self.info.name.clone(),
            op,
            keys,
            ffi_keys,
            status: vec![abi::KVH_ERR_NO_RESULT; n],
            batch: abi::kvh_key_batch {
                keys: std::ptr::null(),
                item_status: std::ptr::null_mut(),
                len: n,
            },
            on_done: Some(on_done),
        });
        state.batch.keys = state.ffi_keys.keys.as_ptr();
        state.batch.item_status = state.status.as_mut_ptr();
        let (state, raw) = PendingState::new(state);
        // SAFETY: `raw` is the live allocation `state` owns; the place is only addressed, not read.
        let batch: *const abi::kvh_key_batch = unsafe { &raw const (*raw).batch };
        self.submit(state, |done| call(batch, done), op);
    }

    /// Look keys up without blocking this thread inside the plugin when it has `contains_async`
    /// (`KVH_CAP_ASYNC_CONTAINS`); otherwise the synchronous `contains` runs here and `on_done` is called
    /// before this returns. `pin` is ignored without `KVH_CAP_PIN`.
    pub fn contains_async<F: FnOnce(ContainsDone) + Send + 'static>(
        &self,
        keys: Vec<ChunkKey>,
        pin: bool,
        on_done: F,
    ) {
        let Some(f) = self.vt.contains_async else {
            let (items, error) = match self.contains(&keys, pin) {
                Ok(items) => (items, None),
                Err(e) => (
                    vec![Presence::Failed(e.status, String::new()); keys.len()],
                    Some(e),
                ),
            };
            return on_done(ContainsDone { keys, items, error });
        };
        let n = keys.len();
        let ffi_keys = FfiKeys::new(&keys);
        let mut state = Box::new(ContainsState {
            plugin: self.info.name.clone(),
            keys,
            ffi_keys,
            meta: vec![ChunkMeta::default(); n],
            status: vec![abi::KVH_ERR_NO_RESULT; n],
            batch: abi::kvh_contains_batch {
                keys: std::ptr::null(),
                out_meta: std::ptr::null_mut(),
                item_status: std::ptr::null_mut(),
                len: n,
                pin: u32::from(pin && self.has(abi::KVH_CAP_PIN)),
                reserved: 0,
            },
            on_done: Some(on_done),
        });
        state.batch.keys = state.ffi_keys.keys.as_ptr();
        state.batch.out_meta = state.meta.as_mut_ptr();
        state.batch.item_status = state.status.as_mut_ptr();
        let (state, raw) = PendingState::new(state);
        // SAFETY: `raw` is the live allocation `state` owns; the place is only addressed, not read.
        let batch: *const abi::kvh_contains_batch = unsafe { &raw const (*raw).batch };
        // SAFETY: as in `put`.
        self.submit(
            state,
            |done| unsafe { f(self.backend, batch, done) },
            "contains",
        );
    }

    /// Remove keys without blocking this thread inside the plugin when it has `remove_async`
    /// (`KVH_CAP_ASYNC_REMOVE`); otherwise as [`contains_async`](Self::contains_async).
    pub fn remove_async<F: FnOnce(RemoveDone) + Send + 'static>(
        &self,
        keys: Vec<ChunkKey>,
        force: bool,
        on_done: F,
    ) {
        let Some(f) = self.vt.remove_async else {
            let (items, error) = match self.remove(&keys, force) {
                Ok(items) => (items, None),
                Err(e) => (vec![e.status; keys.len()], Some(e)),
            };
            return on_done(RemoveDone { keys, items, error });
        };
        // SAFETY: as in `put`.
        self.submit_key_op("remove", keys, on_done, |batch, done| unsafe {
            f(self.backend, batch, force, done)
        });
    }

    /// [`contains_async`](Self::contains_async) and wait up to `timeout`; without `contains_async`, the
    /// synchronous [`contains`](Self::contains) (no copy of the keys, no channel). A lookup that
    /// completes after the timeout is dropped: if it pinned keys, they stay pinned (use
    /// [`contains_wait_or_late`](Self::contains_wait_or_late) to be handed them).
    pub fn contains_wait(
        &self,
        keys: &[ChunkKey],
        pin: bool,
        timeout: Duration,
    ) -> Result<Vec<Presence>, PluginError> {
        self.contains_wait_or_late(keys, pin, timeout, drop)
    }

    /// [`contains_wait`](Self::contains_wait), handing a completion that arrives after the timeout to
    /// `on_late` (on the plugin's completion thread: it must not call back into the plugin). A
    /// pinning caller records the late pins there and unpins them later from its own thread.
    pub fn contains_wait_or_late(
        &self,
        keys: &[ChunkKey],
        pin: bool,
        timeout: Duration,
        on_late: impl FnOnce(ContainsDone) + Send + 'static,
    ) -> Result<Vec<Presence>, PluginError> {
        if self.vt.contains_async.is_none() {
            return self.contains(keys, pin);
        }
        let d = self.wait_for("contains", timeout, |tx| {
            self.contains_async(keys.to_vec(), pin, move |d: ContainsDone| {
                if let Err(late) = tx.send(d) {
                    on_late(late.into_inner());
                }
            })
        })?;
        d.error.map_or(Ok(d.items), Err)
    }

    /// [`remove_async`](Self::remove_async) and wait up to `timeout`; without `remove_async`, the
    /// synchronous [`remove`](Self::remove).
    pub fn remove_wait(
        &self,
        keys: &[ChunkKey],
        force: bool,
        timeout: Duration,
    ) -> Result<Vec<Status>, PluginError> {
        if self.vt.remove_async.is_none() {
            return self.remove(keys, force);
        }
        let d = self.wait_for("remove", timeout, |tx| {
            self.remove_async(keys.to_vec(), force, move |d| {
                let _ = tx.send(d);
            })
        })?;
        d.error.map_or(Ok(d.items), Err)
    }

    /// [`put`](Self::put) and wait up to `timeout`. On timeout the operation stays pending: its buffers
    /// stay with it until the plugin completes (or forever), so nothing the plugin writes is freed.
    pub fn put_wait<B: SrcBuf>(
        &self,
        request: PutRequest<B>,
        timeout: Duration,
    ) -> Result<PutDone<B>, PluginError> {
        self.wait_for("put", timeout, |tx| {
            self.put(request, move |d| {
                let _ = tx.send(d);
            })
        })
    }

    /// [`get`](Self::get) and wait up to `timeout` (see [`put_wait`](Self::put_wait)).
    pub fn get_wait<B: DstBuf>(
        &self,
        request: GetRequest<B>,
        timeout: Duration,
    ) -> Result<GetDone<B>, PluginError> {
        self.wait_for("get", timeout, |tx| {
            self.get(request, move |d| {
                let _ = tx.send(d);
            })
        })
    }

    /// [`prefetch`](Self::prefetch) and wait up to `timeout`.
    pub fn prefetch_wait(
        &self,
        keys: Vec<ChunkKey>,
        timeout: Duration,
    ) -> Result<PrefetchDone, PluginError> {
        self.wait_for("prefetch", timeout, |tx| {
            self.prefetch(keys, move |d| {
                let _ = tx.send(d);
            })
        })
    }

    /// Start an operation whose completion sends its result on the given channel, and wait for that
    /// result up to `timeout`.
    fn wait_for<D>(
        &self,
        op: &'static str,
        timeout: Duration,
        start: impl FnOnce(crossbeam_channel::Sender<D>),
    ) -> Result<D, PluginError> {
        let (tx, rx) = crossbeam_channel::bounded(1);
        start(tx);
        rx.recv_timeout(timeout)
            .map_err(|_| self.timeout_error(op, timeout))
    }

    fn timeout_error(&self, op: &'static str, timeout: Duration) -> PluginError {
        PluginError {
            plugin: self.info.name.clone(),
            op,
            status: Status::TIMEOUT,
            message: format!(
                "no completion within {timeout:?}; the operation stays pending with its buffers"
            ),
        }
    }
}
