//! Values across the ABI: keys and strings lent to the plugin, strings and messages read back from it,
//! and the host API's log callbacks.

use super::HostCtx;
use crate::key::ChunkKey;
use kvhost_plugin_sdk::abi;
use std::ffi::c_void;
use std::panic::{catch_unwind, AssertUnwindSafe};

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
