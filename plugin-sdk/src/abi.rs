//! The kvhost storage-plugin C ABI, major version 1.
//!
//! Everything in this module is `#[repr(C)]`, a constant, or a function-pointer type. cbindgen turns it
//! into `include/kvhost_plugin.h`; nothing else in the crate reaches the header.
//!
//! # Rules that hold for every item
//! - **Growth.** Structs that carry `struct_size` only ever grow at the end; a reader ignores fields past
//!   the writer's `struct_size`. Nothing is reordered, retyped or removed within major 1.
//! - **Statuses** are plain `int32_t`. Codes are stable forever; a retired code is never reused.
//! - **Strings** (`kvh_str`) are UTF-8, length-delimited and *not* NUL-terminated, except where a field
//!   says the host adds a NUL at `ptr[len]`.
//! - **Ownership.** What the host passes is borrowed: it stays valid for the duration of the call, or,
//!   for an operation that returned `KVH_PENDING`, until its completion callback has returned. The plugin
//!   copies anything it keeps. What the plugin returns from the entry point (descriptor, option specs,
//!   vtable, strings) is static: valid until process exit.
//! - **Threads.** `[control]` functions are called by one host thread at a time and never concurrently
//!   with any other call on the same backend. `[any-thread]` functions may be called from any host thread,
//!   concurrently with each other, on the same backend.
#![allow(non_camel_case_types)]

use abi_stable::StableAbi;
use core::ffi::{c_char, c_void};

/// Major version of this ABI. A breaking change bumps it and renames every entry symbol (`_v2`), so a
/// mismatch is a clean symbol-lookup miss rather than undefined behaviour.
pub const KVH_ABI_MAJOR: u16 = 1;
/// Minor version of this ABI. Additive changes only: new trailing fields, new capability bits, new
/// status codes. A host accepts a plugin with any minor; fields the plugin did not know are absent.
pub const KVH_ABI_MINOR: u16 = 3;

/// Result of an operation. One of the `KVH_OK`, `KVH_PENDING` or `KVH_ERR_*` codes. Readers must treat
/// unknown values as errors (a future minor may add codes).
pub type kvh_status = i32;

/// Success. For a batch: every item has its own status in `item_status`.
pub const KVH_OK: kvh_status = 0;
/// The operation was accepted and will finish later: its completion callback fires exactly once.
pub const KVH_PENDING: kvh_status = 1;
/// An argument is out of range or inconsistent.
pub const KVH_ERR_INVALID_ARG: kvh_status = -1;
/// A required pointer was NULL.
pub const KVH_ERR_NULL_PARAM: kvh_status = -2;
/// The key is not stored (a miss). Per-item only.
pub const KVH_ERR_NOT_FOUND: kvh_status = -3;
/// The destination buffer is too small; `out_len` holds the size needed. Per-item only.
pub const KVH_ERR_BUFFER_TOO_SMALL: kvh_status = -4;
/// The plugin does not support this operation or argument.
pub const KVH_ERR_UNSUPPORTED: kvh_status = -5;
/// The plugin is temporarily overloaded; the caller may retry later.
pub const KVH_ERR_BUSY: kvh_status = -6;
/// An I/O error in the storage medium.
pub const KVH_ERR_IO: kvh_status = -7;
/// The operation did not finish within the plugin's own deadline.
pub const KVH_ERR_TIMEOUT: kvh_status = -8;
/// The operation was cancelled (for example by `destroy`) before it finished.
pub const KVH_ERR_CANCELED: kvh_status = -9;
/// The store is full and could not make room.
pub const KVH_ERR_NO_SPACE: kvh_status = -10;
/// An option or the model metadata is invalid (from `create`).
pub const KVH_ERR_INVALID_CONFIG: kvh_status = -11;
/// A bug or an unexpected state inside the plugin.
pub const KVH_ERR_INTERNAL: kvh_status = -12;
/// The plugin panicked (Rust) or threw (C++) inside this operation.
pub const KVH_ERR_PANIC: kvh_status = -13;
/// A previous panic poisoned this backend; it refuses all further data operations.
pub const KVH_ERR_POISONED: kvh_status = -14;
/// The caller and the plugin disagree on the ABI.
pub const KVH_ERR_ABI_MISMATCH: kvh_status = -15;
/// A service the plugin depends on (a server, a cluster) is unreachable right now.
pub const KVH_ERR_UNAVAILABLE: kvh_status = -16;
/// Stored data failed its integrity check; it was not returned.
pub const KVH_ERR_CORRUPT: kvh_status = -17;
/// Written by the host into every `item_status` slot before a call. A plugin never returns it; the host
/// reads it back as "the plugin did not report this item".
pub const KVH_ERR_NO_RESULT: kvh_status = -18;

/// Capability: `pin` and `unpin` are implemented (non-NULL) and pins are honoured.
pub const KVH_CAP_PIN: u64 = 1 << 0;
/// Capability: `prefetch` is implemented.
pub const KVH_CAP_PREFETCH: u64 = 1 << 1;
/// Capability: `flush` is implemented.
pub const KVH_CAP_FLUSH: u64 = 1 << 2;
/// Capability: `health` is implemented.
pub const KVH_CAP_HEALTH: u64 = 1 << 3;
/// Informational: stored data survives a restart of the host process.
pub const KVH_CAP_PERSISTENT: u64 = 1 << 4;
/// Informational: the store may be shared by several hosts (other writers may add or remove keys).
pub const KVH_CAP_SHARED: u64 = 1 << 5;
/// Informational: the backend accepts puts but keeps nothing (a black hole such as the `log` backend).
/// The host never expects a hit from it, and the conformance suite checks that it never reports one.
pub const KVH_CAP_DISCARDS: u64 = 1 << 6;
/// Capability: `clear` is implemented (since ABI 1.1; needs a vtable of at least
/// `KVH_VTABLE_V1_1_SIZE` bytes).
pub const KVH_CAP_CLEAR: u64 = 1 << 7;
/// Capability: `contains_async` is implemented (since ABI 1.2; needs a vtable of at least
/// `KVH_VTABLE_V1_2_SIZE` bytes). Set it when answering `contains` needs I/O (a network or disk round
/// trip): the host then never blocks one of its threads inside the plugin to look keys up. Do not set
/// it for a store that answers from memory: the host then waits for each lookup's completion, and a
/// plugin that completes operations from one worker queue answers a lookup only after the puts queued
/// before it (measured on an in-memory store: lookup p50 from 0.01 ms to 10.6 ms).
pub const KVH_CAP_ASYNC_CONTAINS: u64 = 1 << 8;
/// Capability: `remove_async` is implemented (since ABI 1.2; vtable of at least `KVH_VTABLE_V1_2_SIZE`
/// bytes). Set it when removing needs I/O.
pub const KVH_CAP_ASYNC_REMOVE: u64 = 1 << 9;

/// Capability: `stats` is implemented (since ABI 1.3; vtable of at least `KVH_VTABLE_V1_3_SIZE` bytes).
pub const KVH_CAP_STATS: u64 = 1 << 10;

/// Log level: error.
pub const KVH_LOG_ERROR: i32 = 1;
/// Log level: warning.
pub const KVH_LOG_WARN: i32 = 2;
/// Log level: info.
pub const KVH_LOG_INFO: i32 = 3;
/// Log level: debug.
pub const KVH_LOG_DEBUG: i32 = 4;
/// Log level: trace.
pub const KVH_LOG_TRACE: i32 = 5;

/// Option spec flag: the option must be given in the config.
pub const KVH_OPTION_REQUIRED: u32 = 1 << 0;
/// Option spec flag: the value is a secret (a password); the host never prints it.
pub const KVH_OPTION_SECRET: u32 = 1 << 1;

/// Bytes of `kvh_stat.name`, including the terminating NUL: names are at most 47 bytes.
pub const KVH_STAT_NAME_CAP: usize = 48;
/// `kvh_stat.kind`: a count that only grows while the backend lives (evictions, bytes written). The
/// host may show its rate.
pub const KVH_STAT_COUNTER: u32 = 1;
/// `kvh_stat.kind`: a level that may go up and down (bytes used, entries, capacity).
pub const KVH_STAT_GAUGE: u32 = 2;

/// `kvh_key.layer_id` when the key is not per-layer.
pub const KVH_NO_LAYER: i32 = -1;

/// LMCache `MemoryFormat`: undefined.
pub const KVH_FMT_UNDEFINED: i32 = 0;
/// LMCache `MemoryFormat`: `[2, layers, tokens, hidden]`.
pub const KVH_FMT_KV_2LTD: i32 = 1;
/// LMCache `MemoryFormat`: `[tokens, 2, hidden]`.
pub const KVH_FMT_KV_T2D: i32 = 2;
/// LMCache `MemoryFormat`: `[2, tokens, hidden]`.
pub const KVH_FMT_KV_2TD: i32 = 3;
/// LMCache `MemoryFormat`: opaque binary.
pub const KVH_FMT_BINARY: i32 = 4;
/// LMCache `MemoryFormat`: opaque binary buffer.
pub const KVH_FMT_BINARY_BUFFER: i32 = 5;
/// LMCache `MemoryFormat`: MLA `[1, layers, tokens, hidden]`.
pub const KVH_FMT_KV_MLA_FMT: i32 = 6;

/// LMCache wire dtype code: none.
pub const KVH_DTYPE_NONE: i32 = 0;
/// LMCache wire dtype code: `torch.half` (LMCache itself encodes fp16 as `KVH_DTYPE_FLOAT16`).
pub const KVH_DTYPE_HALF: i32 = 1;
/// LMCache wire dtype code: float16.
pub const KVH_DTYPE_FLOAT16: i32 = 2;
/// LMCache wire dtype code: bfloat16.
pub const KVH_DTYPE_BFLOAT16: i32 = 3;
/// LMCache wire dtype code: float32.
pub const KVH_DTYPE_FLOAT32: i32 = 4;
/// LMCache wire dtype code: float64.
pub const KVH_DTYPE_FLOAT64: i32 = 5;
/// LMCache wire dtype code: uint8.
pub const KVH_DTYPE_UINT8: i32 = 6;
/// LMCache wire dtype code: float8 e4m3fn.
pub const KVH_DTYPE_FP8_E4M3FN: i32 = 7;
/// LMCache wire dtype code: float8 e5m2.
pub const KVH_DTYPE_FP8_E5M2: i32 = 8;

/// `sizeof(kvh_plugin_descriptor)` in ABI 1.0: the smallest `struct_size` the host accepts.
pub const KVH_DESCRIPTOR_V1_0_SIZE: u32 = 64;
/// `sizeof(kvh_backend_vtable)` in ABI 1.0: the smallest `struct_size` the host accepts.
pub const KVH_VTABLE_V1_0_SIZE: u32 = 104;
/// `sizeof(kvh_backend_vtable)` in ABI 1.1 (adds `clear`).
pub const KVH_VTABLE_V1_1_SIZE: u32 = 112;
/// `sizeof(kvh_backend_vtable)` in ABI 1.2 (adds `contains_async` and `remove_async`).
pub const KVH_VTABLE_V1_2_SIZE: u32 = 128;
/// `sizeof(kvh_backend_vtable)` in ABI 1.3 (adds `stats`).
pub const KVH_VTABLE_V1_3_SIZE: u32 = 136;
/// `sizeof(kvh_stats_buf)` in ABI 1.3.
pub const KVH_STATS_BUF_V1_3_SIZE: u32 = 32;
/// `sizeof(kvh_host_api)` in ABI 1.0.
pub const KVH_HOST_API_V1_0_SIZE: u32 = 48;
/// `sizeof(kvh_model_metadata)` in ABI 1.0.
pub const KVH_MODEL_METADATA_V1_0_SIZE: u32 = 104;

/// A borrowed UTF-8 string: `len` bytes at `ptr`. `ptr` may be NULL only when `len` is 0.
#[repr(C)]
#[derive(StableAbi, Clone, Copy, Debug)]
pub struct kvh_str {
    /// First byte; owned by whoever passed the string (see the field that holds it).
    pub ptr: *const c_char,
    /// Length in bytes, excluding any terminating NUL.
    pub len: usize,
}

/// A borrowed read-only byte buffer. `ptr` may be NULL only when `len` is 0.
#[repr(C)]
#[derive(StableAbi, Clone, Copy, Debug)]
pub struct kvh_bytes {
    /// First byte; owned by the host.
    pub ptr: *const u8,
    /// Length in bytes.
    pub len: usize,
}

/// A borrowed writable byte buffer. `ptr` may be NULL only when `len` is 0.
#[repr(C)]
#[derive(StableAbi, Clone, Copy, Debug)]
pub struct kvh_mut_bytes {
    /// First byte; owned by the host, writable by the plugin for the lifetime of the request.
    pub ptr: *mut u8,
    /// Capacity in bytes.
    pub len: usize,
}

/// A host-owned buffer the plugin writes a NUL-terminated, truncated UTF-8 message into.
#[repr(C)]
#[derive(StableAbi, Clone, Copy, Debug)]
pub struct kvh_message_buf {
    /// Start of the buffer; owned by the host, valid for the call only.
    pub ptr: *mut c_char,
    /// Capacity in bytes, including room for the NUL. May be 0 (then write nothing).
    pub cap: usize,
}

/// One `k%v` tag of a key (LMCache's `lmcache.tag.<k>` request configs).
#[repr(C)]
#[derive(StableAbi, Clone, Copy, Debug)]
pub struct kvh_tag {
    /// Tag name, without the `lmcache.tag.` prefix.
    pub key: kvh_str,
    /// Tag value.
    pub value: kvh_str,
}

/// A KV chunk key: LMCache's `CacheEngineKey` (or `LayerCacheEngineKey`) in structured form and as its
/// canonical string. Two keys are the same key exactly when their canonical strings are equal.
///
/// Ownership: host. Every pointer inside is valid for the call (or until completion for PENDING ops).
#[repr(C)]
#[derive(StableAbi, Clone, Copy, Debug)]
pub struct kvh_key {
    /// `model@world_size@worker_id@{hash:x}@dtype[@layer][@k%v…]`. The host adds a NUL at `ptr[len]`,
    /// so C code may use `canonical.ptr` as a C string.
    pub canonical: kvh_str,
    /// Model name (not NUL-terminated).
    pub model_name: kvh_str,
    /// LMCache dtype string, e.g. `bfloat16`, `half` (not NUL-terminated).
    pub dtype: kvh_str,
    /// Tags in key order; NULL when `tags_len` is 0.
    pub tags: *const kvh_tag,
    /// Number of tags.
    pub tags_len: usize,
    /// Low 64 bits (two's complement) of the chunk hash. The canonical string is authoritative for hashes
    /// that do not fit in 64 bits.
    pub chunk_hash: i64,
    /// XXH3-64 (seed 0) of the canonical string's bytes. Stable across releases; use it for sharding.
    pub key_hash: u64,
    /// Tensor-parallel world size.
    pub world_size: u32,
    /// Worker (rank) id.
    pub worker_id: u32,
    /// Layer id for per-layer keys, or `KVH_NO_LAYER`.
    pub layer_id: i32,
    /// Zero. Reserved.
    pub reserved: u32,
}

/// Per-chunk metadata, stored by `put` and returned by `contains` and `get`. It uses LMCache's integer
/// codes, so a server speaking LMCache's wire protocol can answer with it.
#[repr(C)]
#[derive(StableAbi, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct kvh_chunk_meta {
    /// Length of the chunk in bytes.
    pub length: u64,
    /// LMCache `MemoryFormat` code (`KVH_FMT_*`).
    pub fmt: i32,
    /// LMCache wire dtype code (`KVH_DTYPE_*`).
    pub dtype: i32,
    /// Number of meaningful entries in `shape` (0 to 4).
    pub ndim: u32,
    /// Shape; entries at and past `ndim` are 0.
    pub shape: [i32; 4],
    /// Zero. Reserved.
    pub reserved: u32,
}

/// One `key: value` option from the config (`storage_plugin.<name>.<key>: value`).
#[repr(C)]
#[derive(StableAbi, Clone, Copy, Debug)]
pub struct kvh_option {
    /// Option name. The host adds a NUL at `ptr[len]`.
    pub key: kvh_str,
    /// Option value as text (lists are comma-joined, maps are JSON). The host adds a NUL at `ptr[len]`.
    pub value: kvh_str,
}

/// The options given to `create`: every key of the plugin's schema that has a value (given in the
/// config, or its default), in schema order, plus nothing else (the host has already rejected unknown
/// keys and missing required ones). An optional option with no default (`default_value` NULL) that the
/// config does not give is absent: not present with an empty value.
#[repr(C)]
#[derive(StableAbi, Clone, Copy, Debug)]
pub struct kvh_options {
    /// The options, in schema order. Owned by the host, valid during `create` only.
    pub items: *const kvh_option,
    /// Number of options.
    pub len: usize,
}

/// The model whose KV cache the backend stores (LMCache's `LMCacheMetadata`), given to `create`.
/// Owned by the host, valid during `create` only.
#[repr(C)]
#[derive(StableAbi, Clone, Copy, Debug)]
pub struct kvh_model_metadata {
    /// `sizeof(kvh_model_metadata)` as the host compiled it.
    pub struct_size: u32,
    /// Tensor-parallel world size.
    pub world_size: u32,
    /// This worker's rank.
    pub worker_id: u32,
    /// Tokens per full chunk.
    pub chunk_size: u32,
    /// KV dtype as a `KVH_DTYPE_*` code.
    pub dtype_code: i32,
    /// 1 for MLA models (one KV tensor instead of two), else 0.
    pub use_mla: u32,
    /// Model name. The host adds a NUL at `ptr[len]`.
    pub model_name: kvh_str,
    /// KV dtype as an LMCache dtype string. The host adds a NUL at `ptr[len]`.
    pub dtype: kvh_str,
    /// `(num_layers, 2 or 1 for MLA, chunk_size, num_kv_heads, head_size)`.
    pub kv_shape: [u64; 5],
    /// Bytes in one full chunk: the product of `kv_shape` times the dtype size.
    pub full_chunk_bytes: u64,
}

/// Host services offered to a plugin. Owned by the host and valid until process exit (the host never
/// unloads plugins), so a plugin may keep the pointer. One per configured plugin instance.
#[repr(C)]
#[derive(StableAbi, Clone, Copy, Debug)]
pub struct kvh_host_api {
    /// `sizeof(kvh_host_api)` as the host compiled it. Fields past it do not exist.
    pub struct_size: u32,
    /// The host's `KVH_ABI_MAJOR`.
    pub abi_major: u16,
    /// The host's `KVH_ABI_MINOR`. Batch structs may have grown by what this minor added.
    pub abi_minor: u16,
    /// Opaque host context; pass it back to every function below.
    pub host_ctx: *mut c_void,
    /// The configured instance name (`storage_plugins` entry). The host adds a NUL at `ptr[len]`.
    pub instance_name: kvh_str,
    /// Log a message. Never NULL when `struct_size` covers it (always, from ABI 1.0). `[any-thread]`,
    /// never blocks for long, never calls back into the plugin. `target` names the plugin module (may
    /// be empty). Both strings are borrowed for the call.
    pub log: Option<
        unsafe extern "C" fn(host_ctx: *mut c_void, level: i32, target: kvh_str, message: kvh_str),
    >,
    /// Whether a message at `level` would be recorded, so the plugin can skip formatting. Never NULL
    /// when `struct_size` covers it (always, from ABI 1.0). `[any-thread]`.
    pub log_enabled: Option<unsafe extern "C" fn(host_ctx: *mut c_void, level: i32) -> bool>,
}

/// Completion callback of a PENDING operation.
///
/// Called exactly once per PENDING operation, from any plugin thread (possibly before the submitting call
/// has returned). Before calling it, the plugin writes every per-item result of the request. `message`
/// is an optional human-readable detail for a failure, borrowed for the duration of the call. The plugin
/// must not hold its own locks while calling it. After it returns the plugin must not touch the request.
///
/// `status` is `KVH_OK` when the per-item results are valid, or an error for the whole operation (then
/// the host ignores `item_status`). Inside the callback the host may submit new data-path calls to the
/// same plugin, except once `destroy` has been called; it never calls `destroy` or `flush` from a
/// callback.
pub type kvh_complete_fn =
    Option<unsafe extern "C" fn(user_data: *mut c_void, status: kvh_status, message: kvh_str)>;

/// Where to report the end of a PENDING operation. Owned by the host.
#[repr(C)]
#[derive(StableAbi, Clone, Copy, Debug)]
pub struct kvh_completion {
    /// The callback (never NULL when the host passes it); a `kvh_complete_fn`.
    pub complete:
        Option<unsafe extern "C" fn(user_data: *mut c_void, status: kvh_status, message: kvh_str)>,
    /// Opaque host value to pass back; not a pointer the plugin may dereference.
    pub user_data: *mut c_void,
}

/// Arguments of `contains` and `contains_async`. Owned by the host: valid for the call of `contains`;
/// for `contains_async` that returned `KVH_PENDING`, valid (and its outputs writable) until the
/// completion callback.
#[repr(C)]
#[derive(StableAbi, Clone, Copy, Debug)]
pub struct kvh_contains_batch {
    /// Keys to look up.
    pub keys: *const kvh_key,
    /// Per key, written by the plugin: the stored chunk's metadata when present.
    pub out_meta: *mut kvh_chunk_meta,
    /// Per key, written by the plugin: `KVH_OK` present, `KVH_ERR_NOT_FOUND` absent, or an error.
    pub item_status: *mut kvh_status,
    /// Number of keys (may be 0).
    pub len: usize,
    /// Non-zero: pin each present key (only passed to plugins with `KVH_CAP_PIN`).
    pub pin: u32,
    /// Zero. Reserved.
    pub reserved: u32,
}

/// Arguments of `put`. Owned by the host; valid and untouched by the host until the call returns a status
/// other than PENDING, or until the completion callback has returned.
#[repr(C)]
#[derive(StableAbi, Clone, Copy, Debug)]
pub struct kvh_put_batch {
    /// Keys to store.
    pub keys: *const kvh_key,
    /// Per key: the chunk bytes (read-only). Buffers from the host's CPU hot cache (every put that
    /// comes through the chain) start on a 4096-byte boundary, so `O_DIRECT` plugins can write them
    /// without a bounce copy; lengths are not rounded.
    pub src: *const kvh_bytes,
    /// Per key: the chunk metadata to store with it. The host guarantees `meta[i].length == src[i].len`.
    pub meta: *const kvh_chunk_meta,
    /// Per key, written by the plugin: `KVH_OK` stored, or an error (`KVH_ERR_NO_SPACE`, …).
    pub item_status: *mut kvh_status,
    /// Number of keys (may be 0).
    pub len: usize,
}

/// Arguments of `get`. Owned by the host; valid until the call returns a status other than PENDING, or
/// until the completion callback has returned. The host does not read or write any destination buffer
/// in that time.
#[repr(C)]
#[derive(StableAbi, Clone, Copy, Debug)]
pub struct kvh_get_batch {
    /// Keys to read.
    pub keys: *const kvh_key,
    /// Per key: the host-provided destination buffer. Buffers from the host's CPU hot cache (every
    /// promotion through the chain) start on a 4096-byte boundary and their capacity is a multiple of
    /// 4096, so `O_DIRECT` plugins can read into them directly. The buffers of one batch never
    /// overlap, so a plugin may fill them from several threads at once.
    pub dst: *const kvh_mut_bytes,
    /// Per key, written by the plugin: bytes written on `KVH_OK`, or bytes needed on
    /// `KVH_ERR_BUFFER_TOO_SMALL`.
    pub out_len: *mut u64,
    /// Per key, written by the plugin on `KVH_OK`: the stored chunk metadata, whose `length` must
    /// equal `out_len[i]` (the host rejects the item otherwise).
    pub out_meta: *mut kvh_chunk_meta,
    /// Per key, written by the plugin: `KVH_OK`, `KVH_ERR_NOT_FOUND`, `KVH_ERR_BUFFER_TOO_SMALL` or an error.
    pub item_status: *mut kvh_status,
    /// Number of keys (may be 0).
    pub len: usize,
}

/// Arguments of `remove`, `pin`, `unpin`, `prefetch` and `remove_async`. Owned by the host; same
/// lifetime rule as `kvh_put_batch`.
#[repr(C)]
#[derive(StableAbi, Clone, Copy, Debug)]
pub struct kvh_key_batch {
    /// The keys.
    pub keys: *const kvh_key,
    /// Per key, written by the plugin: `KVH_OK`, `KVH_ERR_NOT_FOUND` or an error.
    pub item_status: *mut kvh_status,
    /// Number of keys (may be 0).
    pub len: usize,
}

/// One named number a backend reports through `stats` (ABI 1.3). Written by the plugin into an array
/// the host owns, so no pointer crosses the boundary and nothing needs to outlive the call.
///
/// Well-known names (report those that apply, with these kinds, in these units):
/// `evictions` (counter: chunks dropped to make room), `bytes_used` (gauge: bytes of chunk data held),
/// `capacity_bytes` (gauge: the most chunk data the store will hold; a store that reports it is checked
/// by the conformance suite's capacity check), `entries` (gauge: chunks held), `no_space` (counter:
/// put items refused with `KVH_ERR_NO_SPACE`). Any other name is plugin-specific and shown as given.
#[repr(C)]
#[derive(StableAbi, Clone, Copy, Debug)]
pub struct kvh_stat {
    /// The name, NUL-terminated UTF-8 of at most 47 bytes from `[a-z0-9_]`, unique within one answer.
    pub name: [c_char; KVH_STAT_NAME_CAP],
    /// The value.
    pub value: u64,
    /// `KVH_STAT_COUNTER` or `KVH_STAT_GAUGE`.
    pub kind: u32,
    /// Zero. Reserved.
    pub reserved: u32,
}

/// The array `stats` fills. Owned by the host, valid for the call.
#[repr(C)]
#[derive(StableAbi, Clone, Copy, Debug)]
pub struct kvh_stats_buf {
    /// `sizeof(kvh_stats_buf)` as the host compiled it; fields past it do not exist.
    pub struct_size: u32,
    /// Zero. Reserved.
    pub reserved: u32,
    /// `cap` host-owned entries; the plugin writes `items[0..len)`.
    pub items: *mut kvh_stat,
    /// Number of entries in `items` (the host passes at least 16).
    pub cap: usize,
    /// Written by the plugin: the number of entries written (`KVH_OK`), or the number it needs when
    /// that is more than `cap` (`KVH_ERR_BUFFER_TOO_SMALL`; the host may call again with a larger array).
    pub len: usize,
}

/// The plugin's backend instance. Opaque to the host; created by `create`, freed by `destroy`.
#[repr(C)]
#[derive(StableAbi)]
pub struct kvh_backend {
    _opaque: [u8; 0],
}

/// The operations of one backend class. Static, owned by the plugin. Grows only at the end.
///
/// Required: `create`, `destroy`, `contains`, `put`, `get`, `remove`. Each optional operation is non-NULL
/// exactly when its capability bit is set; `last_error` is optional without a bit.
#[repr(C)]
#[derive(StableAbi, Clone, Copy, Debug)]
pub struct kvh_backend_vtable {
    /// `sizeof(kvh_backend_vtable)` as the plugin compiled it. At least `KVH_VTABLE_V1_0_SIZE`.
    pub struct_size: u32,
    /// Zero. Reserved.
    pub reserved: u32,
    /// `[control]` Create a backend. `host` lives until process exit; `options` and `metadata` only
    /// for this call. On success store the new backend in `*out_backend` and return
    /// `KVH_OK`. On failure return an error and write the reason into `error` (NUL-terminated).
    pub create: Option<
        unsafe extern "C" fn(
            host: *const kvh_host_api,
            options: *const kvh_options,
            metadata: *const kvh_model_metadata,
            out_backend: *mut *mut kvh_backend,
            error: kvh_message_buf,
        ) -> kvh_status,
    >,
    /// `[control]` Destroy a backend: finish or cancel every pending operation (their callbacks fire
    /// before this returns), join the plugin's threads, free everything. No callback fires after it returns.
    /// From the moment the host calls it, the host makes no other call on this backend, not even from
    /// the completion callbacks that fire while it drains.
    pub destroy: Option<unsafe extern "C" fn(backend: *mut kvh_backend)>,
    /// `[any-thread]` Which keys are stored, with their metadata; pins them if `batch->pin`. Synchronous:
    /// the calling host thread waits, so a plugin that needs I/O to answer should also implement
    /// `contains_async`. Returns `KVH_OK` when per-item results are valid, or an error for the whole
    /// call (then the host ignores `item_status`; the same holds for every batch operation).
    pub contains: Option<
        unsafe extern "C" fn(
            backend: *mut kvh_backend,
            batch: *const kvh_contains_batch,
        ) -> kvh_status,
    >,
    /// `[any-thread]` Store chunks. Returns `KVH_PENDING` (the callback fires exactly once later) or any
    /// other status (finished now; the callback never fires). A key already stored may be kept or replaced.
    pub put: Option<
        unsafe extern "C" fn(
            backend: *mut kvh_backend,
            batch: *const kvh_put_batch,
            done: kvh_completion,
        ) -> kvh_status,
    >,
    /// `[any-thread]` Read chunks into host buffers. Same PENDING rule as `put`. A buffer that is too small
    /// gets `KVH_ERR_BUFFER_TOO_SMALL` with the size needed in `out_len`; its contents are unspecified.
    pub get: Option<
        unsafe extern "C" fn(
            backend: *mut kvh_backend,
            batch: *const kvh_get_batch,
            done: kvh_completion,
        ) -> kvh_status,
    >,
    /// `[any-thread]` Remove keys. Per item: `KVH_OK` removed, `KVH_ERR_NOT_FOUND` absent, or, for a key
    /// pinned by `pin` or `contains(pin)` when `force` is zero, `KVH_ERR_BUSY` (the chunk stays, with
    /// its pins). `force` non-zero removes pinned keys too (their pins go with them). Synchronous: once it returns,
    /// the keys are no longer served; a persistent plugin may make the removal durable lazily, by the
    /// next `flush` or `destroy` at the latest (the same holds for `clear` and `remove_async`). A plugin
    /// that needs I/O to remove should also implement `remove_async`.
    pub remove: Option<
        unsafe extern "C" fn(
            backend: *mut kvh_backend,
            batch: *const kvh_key_batch,
            force: bool,
        ) -> kvh_status,
    >,
    /// `[any-thread]` Optional. Copy the message of the last synchronous call that failed on this thread
    /// and this backend into `buf` (NUL-terminated, truncated to `cap`) and return its full length.
    /// Returns 0 when there is none. The host calls it right after the failed call, on the same thread.
    pub last_error: Option<
        unsafe extern "C" fn(backend: *mut kvh_backend, buf: *mut c_char, cap: usize) -> usize,
    >,
    /// `[any-thread]` `KVH_CAP_PIN`. Pin keys against eviction (counted: each pin needs an unpin). Per
    /// item: `KVH_OK` pinned; for an absent key `KVH_ERR_NOT_FOUND` (or `KVH_OK` from a plugin that
    /// cannot tell, which then must treat the later `unpin` the same way).
    pub pin: Option<
        unsafe extern "C" fn(backend: *mut kvh_backend, batch: *const kvh_key_batch) -> kvh_status,
    >,
    /// `[any-thread]` `KVH_CAP_PIN`. Undo one pin per key. Per item: `KVH_OK` one pin released;
    /// `KVH_ERR_INVALID_ARG` for a stored key that holds no pin (the count never goes below zero and
    /// the chunk is untouched); `KVH_ERR_NOT_FOUND` for an absent key.
    pub unpin: Option<
        unsafe extern "C" fn(backend: *mut kvh_backend, batch: *const kvh_key_batch) -> kvh_status,
    >,
    /// `[any-thread]` `KVH_CAP_PREFETCH`. Warm the plugin's own fast path for these keys. Same PENDING rule
    /// as `put`; per-item `KVH_OK` means the key will be cheap to `get`.
    pub prefetch: Option<
        unsafe extern "C" fn(
            backend: *mut kvh_backend,
            batch: *const kvh_key_batch,
            done: kvh_completion,
        ) -> kvh_status,
    >,
    /// `[any-thread]` `KVH_CAP_FLUSH`. Make every put completed, and every remove and clear returned, so
    /// far durable. Synchronous.
    pub flush: Option<unsafe extern "C" fn(backend: *mut kvh_backend) -> kvh_status>,
    /// `[any-thread]` `KVH_CAP_HEALTH`. Check the backend and what it depends on. Returns `KVH_OK` or an
    /// error, with a NUL-terminated human-readable detail in `message` either way. Synchronous, quick.
    pub health: Option<
        unsafe extern "C" fn(backend: *mut kvh_backend, message: kvh_message_buf) -> kvh_status,
    >,
    /// `[any-thread]` `KVH_CAP_CLEAR`, since ABI 1.1. Remove every chunk this backend stores for this
    /// instance (pinned ones too). Synchronous; may take long.
    pub clear: Option<unsafe extern "C" fn(backend: *mut kvh_backend) -> kvh_status>,
    /// `[any-thread]` `KVH_CAP_ASYNC_CONTAINS`, since ABI 1.2. `contains` with a completion: the same
    /// results in the same arrays, and the same PENDING rule as `put` (the batch stays valid until the
    /// callback has returned). A host that knows ABI 1.2 calls it instead of `contains` when the bit is
    /// set; `contains` stays required and must give the same answers (older hosts and the conformance
    /// suite call it). Keys pinned by an operation that completed after the host stopped waiting for it
    /// are unpinned by the host.
    pub contains_async: Option<
        unsafe extern "C" fn(
            backend: *mut kvh_backend,
            batch: *const kvh_contains_batch,
            done: kvh_completion,
        ) -> kvh_status,
    >,
    /// `[any-thread]` `KVH_CAP_ASYNC_REMOVE`, since ABI 1.2. `remove` with a completion, same PENDING
    /// rule as `put`: once the callback has fired (or the call returned a final status), the keys are
    /// no longer served. `remove` stays required, as for `contains_async`.
    pub remove_async: Option<
        unsafe extern "C" fn(
            backend: *mut kvh_backend,
            batch: *const kvh_key_batch,
            force: bool,
            done: kvh_completion,
        ) -> kvh_status,
    >,
    /// `[any-thread]` `KVH_CAP_STATS`, since ABI 1.3. Fill `out->items` with the backend's counters and
    /// gauges (see `kvh_stat` for the well-known names) and set `out->len`. Synchronous and quick: no
    /// I/O, no waiting on queued work; called for every metrics scrape and table. Returns `KVH_OK`, or
    /// `KVH_ERR_BUFFER_TOO_SMALL` with `out->len` set to the entries needed (then the host ignores
    /// `items`), or another error.
    pub stats: Option<
        unsafe extern "C" fn(backend: *mut kvh_backend, out: *mut kvh_stats_buf) -> kvh_status,
    >,
}

/// What an entry point returns: one backend class. Static, owned by the plugin. Grows only at the end.
#[repr(C)]
#[derive(StableAbi, Clone, Copy, Debug)]
pub struct kvh_plugin_descriptor {
    /// `sizeof(kvh_plugin_descriptor)` as the plugin compiled it. At least `KVH_DESCRIPTOR_V1_0_SIZE`.
    pub struct_size: u32,
    /// `KVH_ABI_MAJOR` the plugin was built against.
    pub abi_major: u16,
    /// `KVH_ABI_MINOR` the plugin was built against.
    pub abi_minor: u16,
    /// The class name, NUL-terminated; must equal the name in the entry symbol.
    pub class_name: *const c_char,
    /// The plugin's own version (free-form, semver recommended), NUL-terminated.
    pub plugin_version: *const c_char,
    /// One line saying what the backend is, NUL-terminated. May be NULL.
    pub description: *const c_char,
    /// `KVH_CAP_*` bits.
    pub capabilities: u64,
    /// The accepted options. May be NULL when `options_len` is 0.
    pub options: *const kvh_option_spec,
    /// Number of option specs.
    pub options_len: usize,
    /// The operations.
    pub vtable: *const kvh_backend_vtable,
}

/// One accepted option of a backend class. Static, owned by the plugin. Frozen for major 1.
#[repr(C)]
#[derive(StableAbi, Clone, Copy, Debug)]
pub struct kvh_option_spec {
    /// Option name, NUL-terminated: `[a-z0-9_]+`.
    pub key: *const c_char,
    /// Default value, NUL-terminated, or NULL when there is none (then, when the config does not give
    /// the option, it is absent from `kvh_options`).
    pub default_value: *const c_char,
    /// One line of documentation, NUL-terminated.
    pub doc: *const c_char,
    /// `KVH_OPTION_*` bits.
    pub flags: u32,
    /// Zero. Reserved.
    pub reserved: u32,
}

/// The entry point a plugin exports once per class, as `kvh_plugin_<class_name>_v1`.
///
/// The host finds the library from the config's `module_path`: a path (absolute, or relative to the
/// directory of the YAML file that names it; to the current directory for a config given without a
/// file), or a bare name searched as `lib<name>.so` in `plugin_dir`, then `KVHOST_PLUGIN_PATH`, then
/// `<host executable dir>/plugins`.
///
/// `[control]` May be called more than once; must return the same descriptor each time, or NULL to refuse
/// (after logging why through `host`). `host` is borrowed for the call.
pub type kvh_plugin_entry_fn =
    Option<unsafe extern "C" fn(host: *const kvh_host_api) -> *const kvh_plugin_descriptor>;

const _: () = {
    use core::mem::size_of;
    assert!(size_of::<kvh_plugin_descriptor>() == KVH_DESCRIPTOR_V1_0_SIZE as usize);
    assert!(size_of::<kvh_backend_vtable>() == KVH_VTABLE_V1_3_SIZE as usize);
    assert!(size_of::<kvh_stats_buf>() == KVH_STATS_BUF_V1_3_SIZE as usize);
    assert!(size_of::<kvh_stat>() == 64);
    assert!(core::mem::offset_of!(kvh_stat, value) == 48);
    assert!(core::mem::offset_of!(kvh_backend_vtable, stats) == 128);
    assert!(size_of::<kvh_host_api>() == KVH_HOST_API_V1_0_SIZE as usize);
    assert!(size_of::<kvh_model_metadata>() == KVH_MODEL_METADATA_V1_0_SIZE as usize);
    assert!(size_of::<kvh_chunk_meta>() == 40);
    assert!(size_of::<kvh_key>() == 96);
    assert!(size_of::<kvh_option_spec>() == 32);
    // The same offsets the header asserts on the C side.
    assert!(core::mem::offset_of!(kvh_backend_vtable, create) == 8);
    assert!(core::mem::offset_of!(kvh_backend_vtable, health) == 96);
    assert!(core::mem::offset_of!(kvh_backend_vtable, clear) == 104);
    assert!(core::mem::offset_of!(kvh_backend_vtable, contains_async) == 112);
    assert!(core::mem::offset_of!(kvh_backend_vtable, remove_async) == 120);
    assert!(core::mem::offset_of!(kvh_plugin_descriptor, vtable) == 56);
    assert!(core::mem::offset_of!(kvh_key, chunk_hash) == 64);
    assert!(core::mem::offset_of!(kvh_chunk_meta, shape) == 20);
};
