//! The completion-token table: every pending asynchronous operation, keyed by the token the plugin
//! passes back to `on_complete`.
//!
//! Completions are found through a table of pending operations keyed by a token
//! `(shard, slot, generation)`, never by a pointer the plugin hands back. A plugin that completes an
//! operation twice, completes one it finished synchronously, or passes garbage therefore hits a stale or
//! unknown token: the host logs it, counts it, and touches no memory.

use super::HostCtx;
use kvhost_plugin_sdk::abi;
use parking_lot::{Mutex, RwLock};
use std::ffi::c_void;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::LazyLock;

/// An operation's state, finished exactly once with the plugin's outcome.
pub(crate) trait PendingOp: Send {
    /// Finish the operation with the plugin's aggregate status and message.
    fn finish(self: Box<Self>, status: abi::kvh_status, message: &str);
}

/// A pending operation's state, owned through the raw pointer of `Box::into_raw`. The plugin holds
/// pointers into this allocation until it completes; moving a `Box` would assert unique access to it
/// and invalidate them under Rust's aliasing rules, while moving this raw owner asserts nothing.
pub(crate) struct PendingState(NonNull<dyn PendingOp>);

// SAFETY: the state is `PendingOp: Send`; the owner is the only host-side handle to it.
unsafe impl Send for PendingState {}

impl PendingState {
    /// Take ownership of `state`; also returns the raw pointer the operation's batch pointers are
    /// derived from (valid until `finish` or drop).
    pub(crate) fn new<S: PendingOp + 'static>(state: Box<S>) -> (PendingState, *mut S) {
        let raw = Box::into_raw(state);
        let op: *mut dyn PendingOp = raw;
        // SAFETY: `Box::into_raw` never returns null.
        (PendingState(unsafe { NonNull::new_unchecked(op) }), raw)
    }

    /// Finish the operation (the plugin is done with its pointers).
    pub(crate) fn finish(self, status: abi::kvh_status, message: &str) {
        let raw = self.0.as_ptr();
        std::mem::forget(self);
        // SAFETY: `raw` came from `Box::into_raw` in `new` and is reclaimed once (`self` is forgotten).
        unsafe { Box::from_raw(raw) }.finish(status, message);
    }
}

impl Drop for PendingState {
    fn drop(&mut self) {
        // SAFETY: as in `finish`: reclaimed once, here, when never finished.
        drop(unsafe { Box::from_raw(self.0.as_ptr()) });
    }
}

struct Slot {
    generation: u32,
    op: PendingState,
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
    fn new() -> Self {
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

/// The host context of a new plugin instance named `name`, registered under the next instance id
/// (completion tokens name the instance, never a pointer); `None` when the process has made too many
/// instances. Leaked: it lives until process exit, as the ABI promises `host_ctx` does.
pub(crate) fn new_instance(name: &str) -> Option<&'static HostCtx> {
    let mut all = INSTANCES.write();
    if all.len() >= MAX_INSTANCES {
        return None;
    }
    let ctx: &'static HostCtx = Box::leak(Box::new(HostCtx {
        name: name.to_string(),
        instance: all.len() as u16,
        pending_ops: AtomicUsize::new(0),
        ops: OpTable::new(),
    }));
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
    op: PendingState,
    ctx: &'static HostCtx,
) -> Result<*mut c_void, PendingState> {
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
) -> Result<(PendingState, &'static HostCtx), Option<&'static HostCtx>> {
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
        let message = unsafe { super::marshal::str_lossy(message) };
        match take(user_data) {
            Ok((op, owner)) => {
                owner.pending_ops.fetch_sub(1, Ordering::AcqRel);
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
