//! The unsafe half of the binding: building ABI batches from Rust values, calling the plugin's vtable,
//! and routing completion callbacks back to their operations.
//!
//! Completions are found through a table of pending operations keyed by a token
//! `(shard, slot, generation)`, never by a pointer the plugin hands back. A plugin that completes an
//! operation twice, completes one it finished synchronously, or passes garbage therefore hits a stale or
//! unknown token: the host logs it, counts it, and touches no memory.

use super::HostCtx;
use crate::key::ChunkKey;
use kvhost_plugin_sdk::abi;
use parking_lot::{Mutex, RwLock};
use std::ffi::c_void;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::LazyLock;

/// A `kvh_str` borrowing `s` (the caller keeps `s` alive for as long as the plugin may read it).
pub(crate) fn kvh_str(s: &str) -> abi::kvh_str {
    abi::kvh_str {
        ptr: s.as_ptr().cast(),
        len: s.len(),
    }
}

/// ABI keys for a batch: `keys[i]` describes `src[i]`, borrowing its strings.
pub(crate) struct FfiKeys {
    pub(crate) keys: Vec<abi::kvh_key>,
    _tags: Vec<abi::kvh_tag>,
}

impl FfiKeys {
    /// Describe `src`. The result borrows `src`'s strings: keep `src` alive and unmoved-in-content
    /// (its `Arc`ed text never moves) while the plugin may read the keys.
    pub(crate) fn new(src: &[ChunkKey]) -> FfiKeys {
        let ntags: usize = src.iter().map(|k| k.tag_ranges().len()).sum();
        let mut tags = Vec::with_capacity(ntags);
        for k in src {
            let text = k.as_str();
            for (kr, vr) in k.tag_ranges() {
                tags.push(abi::kvh_tag {
                    key: kvh_str(&text[kr.start as usize..kr.end as usize]),
                    value: kvh_str(&text[vr.start as usize..vr.end as usize]),
                });
            }
        }
        let mut keys = Vec::with_capacity(src.len());
        let mut next_tag = 0usize;
        for k in src {
            let text = k.as_str();
            let n = k.tag_ranges().len();
            let m = k.model_range();
            let d = k.dtype_range();
            keys.push(abi::kvh_key {
                // The text is stored with a trailing NUL, which the ABI promises for `canonical`.
                canonical: kvh_str(text),
                model_name: kvh_str(&text[m.start as usize..m.end as usize]),
                dtype: kvh_str(&text[d.start as usize..d.end as usize]),
                tags: if n == 0 {
                    std::ptr::null()
                } else {
                    tags[next_tag..].as_ptr()
                },
                tags_len: n,
                chunk_hash: k.chunk_hash() as i64,
                key_hash: k.key_hash(),
                world_size: k.world_size(),
                worker_id: k.worker_id(),
                layer_id: k.layer_id().map_or(abi::KVH_NO_LAYER, |l| l as i32),
                reserved: 0,
            });
            next_tag += n;
        }
        debug_assert!(src.iter().all(|k| k.as_str_with_nul().ends_with('\0')));
        FfiKeys { keys, _tags: tags }
    }
}

/// A pending operation as the completion table holds it.
pub(crate) trait PendingOp: Send {
    /// Finish the operation with the plugin's aggregate status and message.
    fn finish(self: Box<Self>, status: abi::kvh_status, message: &str);
}

struct Slot {
    generation: u32,
    op: Box<dyn PendingOp>,
}

const SHARDS: usize = 16;
const SLOT_BITS: u32 = 20;
const GEN_BITS: u32 = 24;
const MAX_INSTANCES: usize = 1 << 16;

/// The pending operations of one plugin instance.
pub(crate) struct OpTable {
    shards: [Mutex<slab::Slab<Slot>>; SHARDS],
    next_shard: AtomicUsize,
    generation: AtomicU32,
    /// Completions that matched no pending operation of this instance.
    pub(crate) stale: AtomicU64,
}

impl OpTable {
    pub(crate) fn new() -> Self {
        OpTable {
            shards: std::array::from_fn(|_| Mutex::new(slab::Slab::new())),
            next_shard: AtomicUsize::new(0),
            generation: AtomicU32::new(1),
            stale: AtomicU64::new(0),
        }
    }
}

/// Every host context ever created, by instance id (the token names the instance, never a pointer).
static INSTANCES: LazyLock<RwLock<Vec<&'static HostCtx>>> =
    LazyLock::new(|| RwLock::new(Vec::new()));
/// Completions whose token names no instance at all (garbage `user_data`).
static UNKNOWN_COMPLETIONS: AtomicU64 = AtomicU64::new(0);

/// Create and register a host context with the next instance id; `None` when the process has made
/// too many instances.
pub(crate) fn register_instance(
    make: impl FnOnce(u16) -> &'static HostCtx,
) -> Option<&'static HostCtx> {
    let mut all = INSTANCES.write();
    if all.len() >= MAX_INSTANCES {
        return None;
    }
    let ctx = make(all.len() as u16);
    all.push(ctx);
    Some(ctx)
}

/// Completion callbacks whose `user_data` named no plugin instance, process-wide.
pub fn unknown_completions() -> u64 {
    UNKNOWN_COMPLETIONS.load(Ordering::Relaxed)
}

// Token layout (64 bits): generation(24) | instance(16) | slot(20) | shard(4).
fn encode(instance: u16, shard: usize, slot: usize, generation: u32) -> *mut c_void {
    let token = (u64::from(generation & ((1 << GEN_BITS) - 1)) << 40)
        | (u64::from(instance) << 24)
        | ((slot as u64) << 4)
        | shard as u64;
    token as usize as *mut c_void
}

fn decode(user_data: *mut c_void) -> (u16, usize, usize, u32) {
    let t = user_data as usize as u64;
    (
        (t >> 24) as u16,
        (t & 0xf) as usize,
        ((t >> 4) & ((1 << SLOT_BITS) - 1)) as usize,
        (t >> 40) as u32,
    )
}

/// Register `op` for instance `ctx`; returns the `user_data` token for its completion, or gives the
/// operation back when the instance has too many operations pending.
pub(crate) fn register(
    op: Box<dyn PendingOp>,
    ctx: &'static HostCtx,
) -> Result<*mut c_void, Box<dyn PendingOp>> {
    let table = &ctx.ops;
    let shard = table.next_shard.fetch_add(1, Ordering::Relaxed) % SHARDS;
    let generation = table.generation.fetch_add(1, Ordering::Relaxed) & ((1 << GEN_BITS) - 1);
    let mut slots = table.shards[shard].lock();
    if slots.vacant_key() >= (1 << SLOT_BITS) {
        return Err(op);
    }
    let slot = slots.insert(Slot { generation, op });
    Ok(encode(ctx.instance, shard, slot, generation))
}

/// Take the operation for `token` out of its instance's table, if it is still pending.
pub(crate) fn take(
    user_data: *mut c_void,
) -> Result<(Box<dyn PendingOp>, &'static HostCtx), Option<&'static HostCtx>> {
    let (instance, shard, slot, generation) = decode(user_data);
    let Some(ctx) = INSTANCES.read().get(instance as usize).copied() else {
        return Err(None);
    };
    let mut slots = ctx.ops.shards[shard].lock();
    match slots.get(slot) {
        Some(s) if s.generation == generation => Ok((slots.remove(slot).op, ctx)),
        _ => Err(Some(ctx)),
    }
}

/// The `kvh_complete_fn` the host gives every PENDING operation.
///
/// # Safety
/// Called by plugins per the ABI; `message` must describe readable bytes or be empty. Every other
/// argument is validated here.
pub(crate) unsafe extern "C" fn on_complete(
    user_data: *mut c_void,
    status: abi::kvh_status,
    message: abi::kvh_str,
) {
    let outcome = catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: the plugin passes a borrowed message valid for this call (ABI).
        let message = unsafe { str_lossy(message) };
        match take(user_data) {
            Ok((op, owner)) => {
                owner.in_flight.fetch_sub(1, Ordering::AcqRel);
                op.finish(status, &message);
            }
            Err(Some(owner)) => {
                owner.ops.stale.fetch_add(1, Ordering::Relaxed);
                tracing::error!(
                    target: "kvhost::plugin",
                    plugin = %owner.name,
                    "completion callback for an operation that is not pending (status {status}): the plugin \
                     completed an operation twice, or one it had already finished synchronously; ignored"
                );
            }
            Err(None) => {
                UNKNOWN_COMPLETIONS.fetch_add(1, Ordering::Relaxed);
                tracing::error!(
                    target: "kvhost::plugin",
                    "completion callback with a user_data ({user_data:p}) that names no plugin instance; ignored"
                );
            }
        }
    }));
    if outcome.is_err() {
        // Unwinding into plugin frames is undefined behaviour; this is a host bug, so stop here.
        eprintln!("kvhost: panic inside the completion callback; aborting");
        std::process::abort();
    }
}

/// A Rust string from a plugin-provided `kvh_str`, tolerating NULL and invalid UTF-8.
///
/// # Safety
/// If `s.ptr` is non-null it must point to `s.len` readable bytes.
pub(crate) unsafe fn str_lossy(s: abi::kvh_str) -> String {
    if s.ptr.is_null() || s.len == 0 {
        return String::new();
    }
    // SAFETY: non-null with `len` readable bytes per the caller.
    let bytes = unsafe { std::slice::from_raw_parts(s.ptr.cast::<u8>(), s.len.min(64 * 1024)) };
    String::from_utf8_lossy(bytes).into_owned()
}

/// Read a NUL-terminated string from a plugin's static data, bounded to 4 KiB.
///
/// # Safety
/// `p` must be NULL or point to a NUL-terminated string (or at least 4 KiB of readable bytes).
pub(crate) unsafe fn c_string(p: *const std::ffi::c_char) -> Option<String> {
    if p.is_null() {
        return None;
    }
    let mut len = 0usize;
    // SAFETY: reading byte by byte up to the NUL or 4 KiB, within the string per the caller.
    while len < 4096 && unsafe { *p.add(len) } != 0 {
        len += 1;
    }
    // SAFETY: `len` bytes were just read.
    let bytes = unsafe { std::slice::from_raw_parts(p.cast::<u8>(), len) };
    Some(String::from_utf8_lossy(bytes).into_owned())
}

/// A message buffer the plugin writes into, and its text afterwards.
pub(crate) struct MessageBuf(Vec<u8>);

impl MessageBuf {
    pub(crate) fn new() -> Self {
        MessageBuf(vec![0u8; 1024])
    }
    pub(crate) fn raw(&mut self) -> abi::kvh_message_buf {
        abi::kvh_message_buf {
            ptr: self.0.as_mut_ptr().cast(),
            cap: self.0.len(),
        }
    }
    pub(crate) fn text(&self) -> String {
        let end = self.0.iter().position(|&b| b == 0).unwrap_or(self.0.len());
        String::from_utf8_lossy(&self.0[..end]).trim().to_string()
    }
}

/// Host-side log sink: `kvh_host_api.log`.
///
/// # Safety
/// Called by plugins per the ABI with the `host_ctx` the host gave them.
pub(crate) unsafe extern "C" fn host_log(
    host_ctx: *mut c_void,
    level: i32,
    target: abi::kvh_str,
    message: abi::kvh_str,
) {
    let r = catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: `host_ctx` is the leaked `HostCtx` the host created for this plugin (never freed).
        let Some(ctx) = (unsafe { host_ctx.cast::<HostCtx>().as_ref() }) else {
            return;
        };
        // SAFETY: borrowed strings valid for this call (ABI).
        let (target, message) = unsafe { (str_lossy(target), str_lossy(message)) };
        let plugin = ctx.name.as_str();
        match level {
            abi::KVH_LOG_ERROR => {
                tracing::error!(target: "kvhost::plugin", plugin, module = %target, "{message}")
            }
            abi::KVH_LOG_WARN => {
                tracing::warn!(target: "kvhost::plugin", plugin, module = %target, "{message}")
            }
            abi::KVH_LOG_INFO => {
                tracing::info!(target: "kvhost::plugin", plugin, module = %target, "{message}")
            }
            abi::KVH_LOG_DEBUG => {
                tracing::debug!(target: "kvhost::plugin", plugin, module = %target, "{message}")
            }
            _ => tracing::trace!(target: "kvhost::plugin", plugin, module = %target, "{message}"),
        }
    }));
    if r.is_err() {
        eprintln!("kvhost: panic while logging for a plugin; aborting");
        std::process::abort();
    }
}

/// Host-side level check: `kvh_host_api.log_enabled`.
///
/// # Safety
/// Called by plugins per the ABI.
pub(crate) unsafe extern "C" fn host_log_enabled(_host_ctx: *mut c_void, level: i32) -> bool {
    match level {
        abi::KVH_LOG_ERROR => tracing::enabled!(target: "kvhost::plugin", tracing::Level::ERROR),
        abi::KVH_LOG_WARN => tracing::enabled!(target: "kvhost::plugin", tracing::Level::WARN),
        abi::KVH_LOG_INFO => tracing::enabled!(target: "kvhost::plugin", tracing::Level::INFO),
        abi::KVH_LOG_DEBUG => tracing::enabled!(target: "kvhost::plugin", tracing::Level::DEBUG),
        _ => tracing::enabled!(target: "kvhost::plugin", tracing::Level::TRACE),
    }
}
