//! The `extern "C"` trampolines behind [`export_backend!`](crate::export_backend). Each one checks its
//! pointers, refuses calls on a poisoned backend, and catches panics so none crosses the ABI.
#![doc(hidden)]

use crate::backend::{Backend, CreateContext, ModelMetadata, OptionSpec};
use crate::logging::Host;
use crate::request::{ContainsBatch, KeyBatch, Request, Submit, DEFERRED};
use crate::status::{Error, Status};
use crate::{abi, ffi};
use std::cell::RefCell;
use std::ffi::c_char;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// A `Sync` wrapper for the static descriptor, vtable and option table, which hold raw pointers to
/// static data only.
#[repr(transparent)]
pub struct Static<T>(pub T);
// SAFETY: only ever wraps immutable ABI tables whose pointers refer to `'static` immutable data.
unsafe impl<T> Sync for Static<T> {}

/// What `kvh_plugin_<class>_v1_rust_layout` returns: which abi_stable release made the layout, and the
/// layout of `kvh_plugin_descriptor` (which reaches every other ABI type).
#[repr(C)]
pub struct RustLayoutHeader {
    /// NUL-terminated `abi_stable <major.minor>` the layout was produced with; the host compares it
    /// before reading `layout`.
    pub abi_stable: *const c_char,
    /// `KVH_ABI_MINOR` of the SDK that produced the layout.
    pub abi_minor: u16,
    /// `&'static abi_stable::type_layout::TypeLayout`.
    pub layout: *const core::ffi::c_void,
}

/// The abi_stable release line whose `TypeLayout` format both sides must share.
pub const ABI_STABLE_LINE: &std::ffi::CStr = c"abi_stable 0.11";

/// The layout header for `kvh_plugin_descriptor` as this SDK compiled it.
pub const fn rust_layout_header() -> RustLayoutHeader {
    RustLayoutHeader {
        abi_stable: ABI_STABLE_LINE.as_ptr(),
        abi_minor: abi::KVH_ABI_MINOR,
        layout: <abi::kvh_plugin_descriptor as abi_stable::StableAbi>::LAYOUT as *const _
            as *const core::ffi::c_void,
    }
}

/// The option table of a backend, built at compile time.
pub const fn option_specs<const N: usize>(opts: &[OptionSpec]) -> [abi::kvh_option_spec; N] {
    let mut out = [abi::kvh_option_spec {
        key: std::ptr::null(),
        default_value: std::ptr::null(),
        doc: std::ptr::null(),
        flags: 0,
        reserved: 0,
    }; N];
    let mut i = 0;
    while i < N {
        out[i] = abi::kvh_option_spec {
            key: opts[i].key.as_ptr(),
            default_value: match opts[i].default {
                Some(d) => d.as_ptr(),
                None => std::ptr::null(),
            },
            doc: opts[i].doc.as_ptr(),
            flags: opts[i].flags,
            reserved: 0,
        };
        i += 1;
    }
    out
}

/// The vtable of backend type `B`: optional slots are filled exactly when `B::CAPABILITIES` says so.
pub const fn vtable<B: Backend>() -> abi::kvh_backend_vtable {
    let caps = B::CAPABILITIES;
    abi::kvh_backend_vtable {
        struct_size: std::mem::size_of::<abi::kvh_backend_vtable>() as u32,
        reserved: 0,
        create: Some(create::<B>),
        destroy: Some(destroy::<B>),
        contains: Some(contains::<B>),
        put: Some(put::<B>),
        get: Some(get::<B>),
        remove: Some(remove::<B>),
        last_error: Some(last_error),
        pin: if caps & abi::KVH_CAP_PIN != 0 {
            Some(pin::<B>)
        } else {
            None
        },
        unpin: if caps & abi::KVH_CAP_PIN != 0 {
            Some(unpin::<B>)
        } else {
            None
        },
        prefetch: if caps & abi::KVH_CAP_PREFETCH != 0 {
            Some(prefetch::<B>)
        } else {
            None
        },
        flush: if caps & abi::KVH_CAP_FLUSH != 0 {
            Some(flush::<B>)
        } else {
            None
        },
        health: if caps & abi::KVH_CAP_HEALTH != 0 {
            Some(health::<B>)
        } else {
            None
        },
        clear: if caps & abi::KVH_CAP_CLEAR != 0 {
            Some(clear::<B>)
        } else {
            None
        },
        contains_async: if caps & abi::KVH_CAP_ASYNC_CONTAINS != 0 {
            Some(contains_async::<B>)
        } else {
            None
        },
        remove_async: if caps & abi::KVH_CAP_ASYNC_REMOVE != 0 {
            Some(remove_async::<B>)
        } else {
            None
        },
        stats: if caps & abi::KVH_CAP_STATS != 0 {
            Some(stats::<B>)
        } else {
            None
        },
    }
}

/// The descriptor of backend class `class_name` (NUL-terminated) implemented by `B`.
pub const fn descriptor<B: Backend>(
    class_name: &'static std::ffi::CStr,
    version: &'static std::ffi::CStr,
    options: &'static [abi::kvh_option_spec],
    vtable: &'static abi::kvh_backend_vtable,
) -> abi::kvh_plugin_descriptor {
    abi::kvh_plugin_descriptor {
        struct_size: std::mem::size_of::<abi::kvh_plugin_descriptor>() as u32,
        abi_major: abi::KVH_ABI_MAJOR,
        abi_minor: abi::KVH_ABI_MINOR,
        class_name: class_name.as_ptr(),
        plugin_version: version.as_ptr(),
        description: B::DESCRIPTION.as_ptr(),
        capabilities: B::CAPABILITIES,
        options: options.as_ptr(),
        options_len: options.len(),
        vtable,
    }
}

/// Install the plugin's logger from the entry point's host table.
///
/// # Safety
/// `host` must be NULL or a host API valid until process exit (the ABI's promise).
pub unsafe fn on_entry(host: *const abi::kvh_host_api) {
    // SAFETY: forwarded.
    unsafe { Host::new(host) }.install();
}

/// The heap object behind a `kvh_backend *`.
struct Instance<B> {
    backend: B,
    poisoned: Arc<AtomicBool>,
    host: Host,
}

thread_local! {
    static LAST_ERROR: RefCell<String> = const { RefCell::new(String::new()) };
}

pub(crate) fn set_last_error(msg: &str) {
    LAST_ERROR.with(|e| {
        let mut e = e.borrow_mut();
        e.clear();
        e.push_str(msg);
    });
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> &str {
    payload
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("non-string panic payload")
}

/// # Safety
/// `be` must be NULL or a pointer returned by `create::<B>` and not yet destroyed.
unsafe fn instance<'a, B>(be: *mut abi::kvh_backend) -> Option<&'a Instance<B>> {
    // SAFETY: per the contract, a non-null `be` is a live `Instance<B>`.
    unsafe { be.cast::<Instance<B>>().as_ref() }
}

/// Run one data-path call behind the panic boundary.
fn guarded<B>(
    inst: &Instance<B>,
    op: &str,
    f: impl FnOnce(&B) -> abi::kvh_status,
) -> abi::kvh_status {
    if inst.poisoned.load(Ordering::Acquire) {
        set_last_error("backend poisoned by an earlier panic");
        return abi::KVH_ERR_POISONED;
    }
    inst.host.scoped(|| {
        let prev = DEFERRED.with(|d| d.replace(false));
        let result = catch_unwind(AssertUnwindSafe(|| f(&inst.backend)));
        let deferred = DEFERRED.with(|d| d.replace(prev));
        match result {
            Ok(status) => status,
            Err(payload) => {
                inst.poisoned.store(true, Ordering::Release);
                let msg = format!(
                    "panic in {op}: {}; backend poisoned",
                    panic_message(&*payload)
                );
                inst.host.log(abi::KVH_LOG_ERROR, "kvhost_plugin_sdk", &msg);
                set_last_error(&msg);
                // A request deferred before the panic completes itself (its `Pending` was dropped or
                // still lives on a worker), so the call must report PENDING to keep exactly-once.
                if deferred {
                    abi::KVH_PENDING
                } else {
                    abi::KVH_ERR_PANIC
                }
            }
        }
    })
}

fn sync_result(r: Result<(), Error>) -> abi::kvh_status {
    match r {
        Ok(()) => abi::KVH_OK,
        Err(e) => {
            set_last_error(&e.message);
            e.status.0
        }
    }
}

/// True when every per-item array a non-empty batch needs is non-null.
fn arrays_ok(len: usize, ptrs: &[bool]) -> bool {
    len == 0 || ptrs.iter().all(|&nonnull| nonnull)
}

/// `create` trampoline.
///
/// # Safety
/// Called by the host per the ABI.
pub unsafe extern "C" fn create<B: Backend>(
    host: *const abi::kvh_host_api,
    options: *const abi::kvh_options,
    metadata: *const abi::kvh_model_metadata,
    out_backend: *mut *mut abi::kvh_backend,
    error: abi::kvh_message_buf,
) -> abi::kvh_status {
    let fail = |status: Status, msg: &str| {
        // SAFETY: `error` is the host's buffer, valid for this call.
        unsafe { ffi::write_message(error, msg) };
        status.0
    };
    if host.is_null() || options.is_null() || metadata.is_null() || out_backend.is_null() {
        return fail(Status::NULL_PARAM, "create: a required pointer is NULL");
    }
    // SAFETY: the host API is valid until process exit (ABI).
    let host = unsafe { Host::new(host) };
    host.install();
    // SAFETY: non-null, valid for this call (ABI).
    let (opts, md) = unsafe { (&*options, &*metadata) };
    // SAFETY: the host passes `len` valid options with valid strings.
    let options = unsafe { ffi::slice(opts.items, opts.len) }
        .iter()
        // SAFETY: as above.
        .map(|o| unsafe { (ffi::str(o.key).to_owned(), ffi::str(o.value).to_owned()) })
        .collect();
    let metadata = ModelMetadata {
        // SAFETY: host strings valid for this call.
        model_name: unsafe { ffi::str(md.model_name) }.to_owned(),
        world_size: md.world_size,
        worker_id: md.worker_id,
        chunk_size: md.chunk_size,
        // SAFETY: as above.
        dtype: unsafe { ffi::str(md.dtype) }.to_owned(),
        dtype_code: md.dtype_code,
        use_mla: md.use_mla != 0,
        kv_shape: md.kv_shape,
        full_chunk_bytes: md.full_chunk_bytes,
    };
    // Shared with worker threads the backend spawns through `CreateContext::spawn`.
    let poisoned = Arc::new(AtomicBool::new(false));
    let ctx = CreateContext {
        instance_name: host.instance_name().to_owned(),
        options,
        metadata,
        host,
        poisoned: poisoned.clone(),
    };
    match catch_unwind(AssertUnwindSafe(|| host.scoped(|| B::create(&ctx)))) {
        Ok(Ok(backend)) => {
            let inst = Box::new(Instance {
                backend,
                poisoned,
                host,
            });
            // SAFETY: `out_backend` is non-null and writable for this call.
            unsafe { *out_backend = Box::into_raw(inst).cast() };
            abi::KVH_OK
        }
        Ok(Err(e)) => fail(e.status, &e.message),
        Err(payload) => fail(
            Status::PANIC,
            &format!("panic in create: {}", panic_message(&*payload)),
        ),
    }
}

/// `destroy` trampoline.
///
/// # Safety
/// Called by the host per the ABI, once per backend.
pub unsafe extern "C" fn destroy<B: Backend>(be: *mut abi::kvh_backend) {
    if be.is_null() {
        return;
    }
    // SAFETY: `be` came from `Box::into_raw` in `create::<B>` and is destroyed once.
    let inst = unsafe { Box::from_raw(be.cast::<Instance<B>>()) };
    let host = inst.host;
    if let Err(payload) = catch_unwind(AssertUnwindSafe(|| host.scoped(|| drop(inst)))) {
        let msg = format!("panic in destroy: {}", panic_message(&*payload));
        host.log(abi::KVH_LOG_ERROR, "kvhost_plugin_sdk", &msg);
    }
}

/// `contains` trampoline.
///
/// # Safety
/// Called by the host per the ABI.
pub unsafe extern "C" fn contains<B: Backend>(
    be: *mut abi::kvh_backend,
    batch: *const abi::kvh_contains_batch,
) -> abi::kvh_status {
    // SAFETY: host contract.
    let (Some(inst), Some(raw)) = (unsafe { instance::<B>(be) }, unsafe { batch.as_ref() }) else {
        return abi::KVH_ERR_NULL_PARAM;
    };
    if !contains_arrays(raw) {
        return abi::KVH_ERR_NULL_PARAM;
    }
    guarded(inst, "contains", |b| {
        sync_result(b.contains(&mut ContainsBatch::new(raw)))
    })
}

/// `remove` trampoline.
///
/// # Safety
/// Called by the host per the ABI.
pub unsafe extern "C" fn remove<B: Backend>(
    be: *mut abi::kvh_backend,
    batch: *const abi::kvh_key_batch,
    force: bool,
) -> abi::kvh_status {
    // SAFETY: host contract.
    let (Some(inst), Some(raw)) = (unsafe { instance::<B>(be) }, unsafe { batch.as_ref() }) else {
        return abi::KVH_ERR_NULL_PARAM;
    };
    if !key_arrays(raw) {
        return abi::KVH_ERR_NULL_PARAM;
    }
    guarded(inst, "remove", |b| {
        sync_result(b.remove(&mut KeyBatch::new(raw), force))
    })
}

/// `pin` trampoline.
///
/// # Safety
/// Called by the host per the ABI.
pub unsafe extern "C" fn pin<B: Backend>(
    be: *mut abi::kvh_backend,
    batch: *const abi::kvh_key_batch,
) -> abi::kvh_status {
    // SAFETY: host contract.
    let (Some(inst), Some(raw)) = (unsafe { instance::<B>(be) }, unsafe { batch.as_ref() }) else {
        return abi::KVH_ERR_NULL_PARAM;
    };
    if !key_arrays(raw) {
        return abi::KVH_ERR_NULL_PARAM;
    }
    guarded(inst, "pin", |b| sync_result(b.pin(&mut KeyBatch::new(raw))))
}

/// `unpin` trampoline.
///
/// # Safety
/// Called by the host per the ABI.
pub unsafe extern "C" fn unpin<B: Backend>(
    be: *mut abi::kvh_backend,
    batch: *const abi::kvh_key_batch,
) -> abi::kvh_status {
    // SAFETY: host contract.
    let (Some(inst), Some(raw)) = (unsafe { instance::<B>(be) }, unsafe { batch.as_ref() }) else {
        return abi::KVH_ERR_NULL_PARAM;
    };
    if !key_arrays(raw) {
        return abi::KVH_ERR_NULL_PARAM;
    }
    guarded(inst, "unpin", |b| {
        sync_result(b.unpin(&mut KeyBatch::new(raw)))
    })
}

/// The common body of every asynchronous trampoline: NULL checks, then the call behind the panic
/// boundary with a [`Request`] the backend finishes or defers.
///
/// # Safety
/// `be` and `batch` come from the host per the ABI; `batch` stays valid until completion.
unsafe fn submit_async<B: Backend, O: crate::request::Op>(
    be: *mut abi::kvh_backend,
    batch: *const O::Raw,
    done: abi::kvh_completion,
    op: &str,
    arrays_present: impl FnOnce(&O::Raw) -> bool,
    call: impl FnOnce(&B, Request<O>) -> Submit,
) -> abi::kvh_status {
    // SAFETY: host contract.
    let (Some(inst), Some(raw)) = (unsafe { instance::<B>(be) }, NonNull::new(batch.cast_mut()))
    else {
        return abi::KVH_ERR_NULL_PARAM;
    };
    // SAFETY: non-null batch, valid until completion.
    if done.complete.is_none() || !arrays_present(unsafe { raw.as_ref() }) {
        return abi::KVH_ERR_NULL_PARAM;
    }
    // SAFETY: the batch stays valid until completion; the poison flag lives in the instance, which
    // outlives its pending requests. A request dropped unused (poisoned backend) fires nothing.
    let req = unsafe { Request::new(raw, done, &*inst.poisoned) };
    guarded(inst, op, |b| call(b, req).0)
}

/// `put` trampoline.
///
/// # Safety
/// Called by the host per the ABI.
pub unsafe extern "C" fn put<B: Backend>(
    be: *mut abi::kvh_backend,
    batch: *const abi::kvh_put_batch,
    done: abi::kvh_completion,
) -> abi::kvh_status {
    let arrays = |r: &abi::kvh_put_batch| {
        let ptrs = [
            !r.keys.is_null(),
            !r.src.is_null(),
            !r.meta.is_null(),
            !r.item_status.is_null(),
        ];
        arrays_ok(r.len, &ptrs)
    };
    // SAFETY: forwarded host contract.
    unsafe { submit_async(be, batch, done, "put", arrays, |b: &B, req| b.put(req)) }
}

/// `get` trampoline.
///
/// # Safety
/// Called by the host per the ABI.
pub unsafe extern "C" fn get<B: Backend>(
    be: *mut abi::kvh_backend,
    batch: *const abi::kvh_get_batch,
    done: abi::kvh_completion,
) -> abi::kvh_status {
    let arrays = |r: &abi::kvh_get_batch| {
        let ptrs = [
            !r.keys.is_null(),
            !r.dst.is_null(),
            !r.out_len.is_null(),
            !r.out_meta.is_null(),
            !r.item_status.is_null(),
        ];
        arrays_ok(r.len, &ptrs)
    };
    // SAFETY: forwarded host contract.
    unsafe { submit_async(be, batch, done, "get", arrays, |b: &B, req| b.get(req)) }
}

fn key_arrays(r: &abi::kvh_key_batch) -> bool {
    arrays_ok(r.len, &[!r.keys.is_null(), !r.item_status.is_null()])
}

fn contains_arrays(r: &abi::kvh_contains_batch) -> bool {
    let ptrs = [
        !r.keys.is_null(),
        !r.out_meta.is_null(),
        !r.item_status.is_null(),
    ];
    arrays_ok(r.len, &ptrs)
}

/// `prefetch` trampoline.
///
/// # Safety
/// Called by the host per the ABI.
pub unsafe extern "C" fn prefetch<B: Backend>(
    be: *mut abi::kvh_backend,
    batch: *const abi::kvh_key_batch,
    done: abi::kvh_completion,
) -> abi::kvh_status {
    // SAFETY: forwarded host contract.
    unsafe {
        submit_async(be, batch, done, "prefetch", key_arrays, |b: &B, req| {
            b.prefetch(req)
        })
    }
}

/// `contains_async` trampoline (ABI 1.2).
///
/// # Safety
/// Called by the host per the ABI.
pub unsafe extern "C" fn contains_async<B: Backend>(
    be: *mut abi::kvh_backend,
    batch: *const abi::kvh_contains_batch,
    done: abi::kvh_completion,
) -> abi::kvh_status {
    // SAFETY: forwarded host contract.
    unsafe {
        submit_async(
            be,
            batch,
            done,
            "contains_async",
            contains_arrays,
            |b: &B, req| b.contains_async(req),
        )
    }
}

/// `remove_async` trampoline (ABI 1.2).
///
/// # Safety
/// Called by the host per the ABI.
pub unsafe extern "C" fn remove_async<B: Backend>(
    be: *mut abi::kvh_backend,
    batch: *const abi::kvh_key_batch,
    force: bool,
    done: abi::kvh_completion,
) -> abi::kvh_status {
    // SAFETY: forwarded host contract.
    unsafe {
        submit_async(be, batch, done, "remove_async", key_arrays, |b: &B, req| {
            b.remove_async(req, force)
        })
    }
}

/// `flush` trampoline.
///
/// # Safety
/// Called by the host per the ABI.
pub unsafe extern "C" fn flush<B: Backend>(be: *mut abi::kvh_backend) -> abi::kvh_status {
    // SAFETY: host contract.
    let Some(inst) = (unsafe { instance::<B>(be) }) else {
        return abi::KVH_ERR_NULL_PARAM;
    };
    guarded(inst, "flush", |b| sync_result(b.flush()))
}

/// `clear` trampoline.
///
/// # Safety
/// Called by the host per the ABI.
pub unsafe extern "C" fn clear<B: Backend>(be: *mut abi::kvh_backend) -> abi::kvh_status {
    // SAFETY: host contract.
    let Some(inst) = (unsafe { instance::<B>(be) }) else {
        return abi::KVH_ERR_NULL_PARAM;
    };
    guarded(inst, "clear", |b| sync_result(b.clear()))
}

/// `health` trampoline.
///
/// # Safety
/// Called by the host per the ABI.
pub unsafe extern "C" fn health<B: Backend>(
    be: *mut abi::kvh_backend,
    message: abi::kvh_message_buf,
) -> abi::kvh_status {
    // SAFETY: host contract.
    let Some(inst) = (unsafe { instance::<B>(be) }) else {
        return abi::KVH_ERR_NULL_PARAM;
    };
    guarded(inst, "health", |b| {
        let (status, text) = match b.health() {
            Ok(text) => (abi::KVH_OK, text),
            Err(e) => (e.status.0, e.message),
        };
        // SAFETY: the host's buffer, valid for this call.
        unsafe { ffi::write_message(message, &text) };
        status
    })
}

/// `stats` trampoline (ABI 1.3).
///
/// # Safety
/// Called by the host per the ABI.
pub unsafe extern "C" fn stats<B: Backend>(
    be: *mut abi::kvh_backend,
    out: *mut abi::kvh_stats_buf,
) -> abi::kvh_status {
    // SAFETY: host contract.
    let Some(inst) = (unsafe { instance::<B>(be) }) else {
        return abi::KVH_ERR_NULL_PARAM;
    };
    // SAFETY: the host's buffer descriptor, valid and exclusively ours for this call.
    let Some(out) = (unsafe { out.as_mut() }) else {
        set_last_error("stats: out is NULL");
        return abi::KVH_ERR_NULL_PARAM;
    };
    guarded(inst, "stats", |b| {
        let mut collected = crate::Stats::default();
        if let Err(e) = b.stats(&mut collected) {
            set_last_error(&e.message);
            return e.status.0;
        }
        let items = match collected.finish() {
            Ok(items) => items,
            Err(msg) => {
                set_last_error(&msg);
                return abi::KVH_ERR_INTERNAL;
            }
        };
        out.len = items.len();
        if items.len() > out.cap {
            return abi::KVH_ERR_BUFFER_TOO_SMALL;
        }
        if !items.is_empty() {
            if out.items.is_null() {
                set_last_error("stats: items is NULL");
                return abi::KVH_ERR_NULL_PARAM;
            }
            // SAFETY: the host's array of `cap >= items.len()` entries, valid for this call and not
            // overlapping `items` (ours, on the heap).
            unsafe { std::ptr::copy_nonoverlapping(items.as_ptr(), out.items, items.len()) };
        }
        abi::KVH_OK
    })
}

/// `last_error` (shared by every class of the library: the message is per thread).
///
/// # Safety
/// Called by the host per the ABI.
pub unsafe extern "C" fn last_error(
    _be: *mut abi::kvh_backend,
    buf: *mut c_char,
    cap: usize,
) -> usize {
    LAST_ERROR.with(|e| {
        let e = e.borrow();
        // SAFETY: the host's buffer of `cap` bytes, valid for this call.
        unsafe { ffi::write_message(abi::kvh_message_buf { ptr: buf, cap }, &e) };
        e.len()
    })
}
