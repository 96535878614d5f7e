//! The unsafe half of the loader: opening libraries, finding entry points, reading descriptors and
//! calling `create`. Every pointer read from a plugin is checked here before use.

use crate::plugin::HostCtx;
use kvhost_plugin_sdk::abi;
use libloading::os::unix::{Library, Symbol, RTLD_LOCAL, RTLD_NOW};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::LazyLock;

/// Libraries opened so far, by canonical path. Never closed: plugins may hold thread-locals and
/// threads that make unloading unsound, so every handle is leaked on purpose.
static OPENED: LazyLock<Mutex<HashMap<PathBuf, &'static Library>>> =
    LazyLock::new(|| Mutex::new(HashMap::new()));

/// Open `path` once per process (`RTLD_NOW | RTLD_LOCAL | RTLD_NODELETE`).
pub(crate) fn open(path: &Path) -> Result<&'static Library, String> {
    let canonical = path.canonicalize().map_err(|e| e.to_string())?;
    let mut opened = OPENED.lock();
    if let Some(lib) = opened.get(&canonical) {
        return Ok(lib);
    }
    // SAFETY: loading a library runs its initialisers; running plugin code is the point of a plugin
    // host, and the operator chose this file in the config.
    let lib = unsafe {
        Library::open(
            Some(&canonical),
            RTLD_NOW | RTLD_LOCAL | libc::RTLD_NODELETE,
        )
    }
    .map_err(|e| e.to_string())?;
    let lib: &'static Library = Box::leak(Box::new(lib));
    opened.insert(canonical, lib);
    Ok(lib)
}

/// The entry point `symbol` of `lib`, if exported.
pub(crate) fn entry(
    lib: &'static Library,
    symbol: &str,
) -> Option<unsafe extern "C" fn(*const abi::kvh_host_api) -> *const abi::kvh_plugin_descriptor> {
    // SAFETY: the symbol's type is the ABI's entry-point type; a library exporting this name promises
    // it (the `_v1` suffix pins the ABI major).
    let sym: Symbol<
        unsafe extern "C" fn(*const abi::kvh_host_api) -> *const abi::kvh_plugin_descriptor,
    > = unsafe { lib.get(symbol.as_bytes()) }.ok()?;
    Some(*sym)
}

/// The Rust layout header exported by SDK-built plugins (`<entry>_rust_layout`), if any.
pub(crate) fn rust_layout(
    lib: &'static Library,
    entry_symbol: &str,
) -> Option<(String, u16, &'static abi_stable::type_layout::TypeLayout)> {
    let name = format!("{entry_symbol}_rust_layout");
    // SAFETY: SDK-built plugins export this name with this type; others do not export it at all.
    let sym: Symbol<extern "C" fn() -> *const kvhost_plugin_sdk::export::RustLayoutHeader> =
        unsafe { lib.get(name.as_bytes()) }.ok()?;
    let header = sym();
    // SAFETY: the SDK returns a pointer to a static header, or we treat NULL as absent.
    let header = unsafe { header.as_ref() }?;
    // SAFETY: NUL-terminated static string from the SDK, read with a bound.
    let line = unsafe { crate::plugin::ffi_c_string(header.abi_stable) }.unwrap_or_default();
    if line.as_bytes() != kvhost_plugin_sdk::export::ABI_STABLE_LINE.to_bytes()
        || header.layout.is_null()
    {
        // A different abi_stable line lays out `TypeLayout` differently: do not read it.
        return Some((
            line,
            header.abi_minor,
            <abi::kvh_plugin_descriptor as abi_stable::StableAbi>::LAYOUT,
        ));
    }
    // SAFETY: same abi_stable release line, so the pointer is a `&'static TypeLayout` of the same type.
    let layout = unsafe { &*header.layout.cast::<abi_stable::type_layout::TypeLayout>() };
    Some((line, header.abi_minor, layout))
}

/// Exported dynamic symbols starting with `kvh_plugin_`, read from the ELF file itself.
pub(crate) fn exported_plugin_symbols(path: &Path) -> Vec<String> {
    use object::{Object, ObjectSymbol};
    let Ok(data) = std::fs::read(path) else {
        return Vec::new();
    };
    let Ok(file) = object::File::parse(&*data) else {
        return Vec::new();
    };
    let mut names: Vec<String> = file
        .dynamic_symbols()
        .filter(|s| s.is_definition())
        .filter_map(|s| s.name().ok().map(str::to_string))
        .filter(|n| n.starts_with("kvh_plugin_") && !n.ends_with("_rust_layout"))
        .collect();
    names.sort();
    names.dedup();
    names
}

/// A leaked host API table for one plugin instance (valid until process exit, as the ABI promises).
pub(crate) fn host_api(
    instance: &str,
) -> Result<(&'static abi::kvh_host_api, &'static HostCtx), String> {
    let ctx = crate::plugin::new_instance(instance)
        .ok_or("this process has created 65536 plugin instances; restart it")?;
    let name: &'static str = Box::leak(format!("{instance}\0").into_boxed_str());
    let api = Box::leak(Box::new(abi::kvh_host_api {
        struct_size: std::mem::size_of::<abi::kvh_host_api>() as u32,
        abi_major: abi::KVH_ABI_MAJOR,
        abi_minor: abi::KVH_ABI_MINOR,
        host_ctx: ctx as *const HostCtx as *mut std::ffi::c_void,
        instance_name: abi::kvh_str {
            ptr: name.as_ptr().cast(),
            len: name.len() - 1,
        },
        log: Some(crate::plugin::host_log),
        log_enabled: Some(crate::plugin::host_log_enabled),
    }));
    Ok((api, ctx))
}

/// Call the entry point.
pub(crate) fn call_entry(
    entry: super::EntryFn,
    host: &'static abi::kvh_host_api,
) -> *const abi::kvh_plugin_descriptor {
    // SAFETY: the ABI's entry point, called with a valid host table.
    unsafe { entry(host) }
}

/// Copy a struct that starts with a `u32 struct_size` from plugin memory: only the first
/// `min(struct_size, size_of::<T>())` bytes are read; later fields stay zero (absent).
///
/// # Safety
/// `ptr` must be non-null and point to at least `struct_size` readable bytes, where `struct_size` is the
/// `u32` it starts with (the plugin's promise), and `T` must be valid when zeroed.
unsafe fn read_prefix<T: Copy>(ptr: *const T) -> (T, u32) {
    // SAFETY: the first 4 bytes are `struct_size`, readable per the caller.
    let declared = unsafe { std::ptr::read_unaligned(ptr.cast::<u32>()) };
    let n = (declared as usize).min(std::mem::size_of::<T>());
    let mut out = std::mem::MaybeUninit::<T>::zeroed();
    // SAFETY: `n` bytes are readable (declared by the plugin) and fit in `T`.
    unsafe { std::ptr::copy_nonoverlapping(ptr.cast::<u8>(), out.as_mut_ptr().cast::<u8>(), n) };
    // SAFETY: every field of the ABI structs is valid when zero (NULL pointers, `None` functions).
    (unsafe { out.assume_init() }, declared)
}

/// The descriptor and its declared size.
pub(crate) fn read_descriptor(
    desc: *const abi::kvh_plugin_descriptor,
) -> (abi::kvh_plugin_descriptor, u32) {
    // SAFETY: non-null (checked by the caller); the plugin declares its size in the first field.
    unsafe { read_prefix(desc) }
}

/// The vtable and its declared size.
pub(crate) fn read_vtable(vt: *const abi::kvh_backend_vtable) -> (abi::kvh_backend_vtable, u32) {
    // SAFETY: non-null (checked by the caller); the plugin declares its size in the first field.
    unsafe { read_prefix(vt) }
}

/// A NUL-terminated string from the plugin's static data.
pub(crate) fn c_str(p: *const std::ffi::c_char) -> Option<String> {
    // SAFETY: descriptor strings are NUL-terminated and static (ABI); the read is bounded anyway.
    unsafe { crate::plugin::ffi_c_string(p) }
}

/// The option specs.
pub(crate) fn option_specs(desc: &abi::kvh_plugin_descriptor) -> Option<Vec<abi::kvh_option_spec>> {
    if desc.options_len == 0 {
        return Some(Vec::new());
    }
    if desc.options.is_null() || desc.options_len > 4096 {
        return None;
    }
    // SAFETY: non-null, `options_len` static entries (ABI), bounded above.
    Some(unsafe { std::slice::from_raw_parts(desc.options, desc.options_len) }.to_vec())
}

/// Model metadata as the ABI struct, with the strings it borrows.
pub(crate) struct FfiMetadata {
    _strings: (String, String),
    pub(crate) raw: abi::kvh_model_metadata,
}

impl FfiMetadata {
    pub(crate) fn new(model: &crate::config::ModelSpec, chunk_size: u32) -> Self {
        let name = format!("{}\0", model.name);
        let dtype = format!("{}\0", model.dtype);
        let dtype_code = crate::config::dtype_info(&model.dtype).map_or(0, |(_, c)| c);
        let raw = abi::kvh_model_metadata {
            struct_size: std::mem::size_of::<abi::kvh_model_metadata>() as u32,
            world_size: model.world_size,
            worker_id: model.worker_id,
            chunk_size,
            dtype_code,
            use_mla: u32::from(model.use_mla),
            model_name: abi::kvh_str {
                ptr: name.as_ptr().cast(),
                len: name.len() - 1,
            },
            dtype: abi::kvh_str {
                ptr: dtype.as_ptr().cast(),
                len: dtype.len() - 1,
            },
            kv_shape: [
                u64::from(model.num_layers),
                model.kv_count(),
                u64::from(chunk_size),
                u64::from(model.num_kv_heads),
                u64::from(model.head_size),
            ],
            full_chunk_bytes: model.full_chunk_bytes(chunk_size),
        };
        FfiMetadata {
            _strings: (name, dtype),
            raw,
        }
    }
}

/// Call `create`; returns the backend or `(status, message)`.
pub(crate) fn create(
    vt: &abi::kvh_backend_vtable,
    host: &'static abi::kvh_host_api,
    options: &[(String, String)],
    metadata: &FfiMetadata,
) -> Result<*mut abi::kvh_backend, (i32, String)> {
    let texts: Vec<(String, String)> = options
        .iter()
        .map(|(k, v)| (format!("{k}\0"), format!("{v}\0")))
        .collect();
    let items: Vec<abi::kvh_option> = texts
        .iter()
        .map(|(k, v)| abi::kvh_option {
            key: abi::kvh_str {
                ptr: k.as_ptr().cast(),
                len: k.len() - 1,
            },
            value: abi::kvh_str {
                ptr: v.as_ptr().cast(),
                len: v.len() - 1,
            },
        })
        .collect();
    let opts = abi::kvh_options {
        items: items.as_ptr(),
        len: items.len(),
    };
    let mut err = vec![0u8; 2048];
    let mut out: *mut abi::kvh_backend = std::ptr::null_mut();
    let f = vt.create.expect("checked by the loader");
    // SAFETY: the checked `create`, with host data valid for the call (the host table for ever) and a
    // writable error buffer of `err.len()` bytes.
    let rc = unsafe {
        f(
            host,
            &opts,
            &metadata.raw,
            &mut out,
            abi::kvh_message_buf {
                ptr: err.as_mut_ptr().cast(),
                cap: err.len(),
            },
        )
    };
    let message = {
        let end = err.iter().position(|&b| b == 0).unwrap_or(err.len());
        String::from_utf8_lossy(&err[..end]).trim().to_string()
    };
    if rc != abi::KVH_OK {
        return Err((rc, message));
    }
    if out.is_null() {
        return Err((
            abi::KVH_ERR_INTERNAL,
            "create returned OK but no backend".to_string(),
        ));
    }
    Ok(out)
}
