//! The loader: from a [`PluginSpec`] to a created, checked [`PluginBackend`].
//!
//! 1. Resolve `module_path`: a path (absolute, or relative to the config file), or a bare or dotted name
//!    searched as `lib<name>.so` and `<name>.so` in `plugin_dir`, then `KVHOST_PLUGIN_PATH`, then
//!    `<exe dir>/plugins`, then `<exe dir>`.
//! 2. Open it once (`RTLD_NOW | RTLD_LOCAL | RTLD_NODELETE`), never close it.
//! 3. Find `kvh_plugin_<class_name>_v1` and call it.
//! 4. Check, before any other call: descriptor non-null; `struct_size`; ABI major; class name; required
//!    functions; capabilities against functions; options against the schema; and, for Rust plugins,
//!    abi_stable's layout check.
//! 5. `create` with the options and model metadata.

mod library;

use crate::config::{Config, OnPluginError, PluginSpec};
use crate::plugin::{OptionInfo, PluginBackend, PluginInfo};
use kvhost_plugin_sdk::abi;
use std::fmt;
use std::path::{Path, PathBuf};

/// Why a plugin could not be loaded. Every variant's message names the plugin, the file and the cause.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum LoadError {
    /// No library found for `module_path`.
    NotFound {
        /// Plugin name.
        plugin: String,
        /// What the config said.
        module_path: String,
        /// Every path tried.
        searched: Vec<PathBuf>,
    },
    /// `dlopen` failed (not ELF, wrong architecture, a missing dependency, an initialiser failed).
    Open {
        /// Plugin name.
        plugin: String,
        /// The file.
        path: PathBuf,
        /// `dlerror`.
        reason: String,
    },
    /// The library has no entry point for the class.
    MissingSymbol {
        /// Plugin name.
        plugin: String,
        /// The file.
        path: PathBuf,
        /// The symbol looked for.
        symbol: String,
        /// The `kvh_plugin_*` symbols it does export.
        exported: Vec<String>,
    },
    /// The plugin violates the ABI (a check of step 4 failed).
    Abi {
        /// Plugin name.
        plugin: String,
        /// The file.
        path: PathBuf,
        /// Which check, and the values seen.
        problem: String,
    },
    /// The options do not match the plugin's schema.
    Options {
        /// Plugin name.
        plugin: String,
        /// The file.
        path: PathBuf,
        /// What is wrong.
        problem: String,
    },
    /// `create` failed.
    Create {
        /// Plugin name.
        plugin: String,
        /// The file.
        path: PathBuf,
        /// The status code.
        status: i32,
        /// The plugin's message.
        message: String,
    },
}

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LoadError::NotFound {
                plugin,
                module_path,
                searched,
            } => {
                write!(
                    f,
                    "plugin `{plugin}`: no library for module_path `{module_path}`; searched:"
                )?;
                for p in searched {
                    write!(f, "\n  {}", p.display())?;
                }
                if searched.is_empty() {
                    write!(f, " nothing (no plugin directory)")?;
                }
                Ok(())
            }
            LoadError::Open {
                plugin,
                path,
                reason,
            } => {
                write!(
                    f,
                    "plugin `{plugin}` ({}): cannot open library: {reason}",
                    path.display()
                )
            }
            LoadError::MissingSymbol {
                plugin,
                path,
                symbol,
                exported,
            } => {
                write!(
                    f,
                    "plugin `{plugin}` ({}): no entry point `{symbol}`",
                    path.display()
                )?;
                if exported.is_empty() {
                    write!(
                        f,
                        "; the library exports no kvh_plugin_* symbols (is it a kvhost plugin?)"
                    )
                } else {
                    write!(f, "; it exports: {}", exported.join(", "))?;
                    let class = symbol
                        .trim_start_matches("kvh_plugin_")
                        .trim_end_matches("_v1");
                    let other_major = exported.iter().find(|e| {
                        e.strip_prefix(&format!("kvh_plugin_{class}_v"))
                            .is_some_and(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
                    });
                    match other_major {
                        Some(e) => write!(
                            f,
                            " (`{e}` is built for another ABI major; this host speaks ABI {}: rebuild the plugin \
                             against this host's header)",
                            abi::KVH_ABI_MAJOR
                        ),
                        None => write!(f, " (check class_name; the suffix _v{} is this host's ABI major)", abi::KVH_ABI_MAJOR),
                    }
                }
            }
            LoadError::Abi {
                plugin,
                path,
                problem,
            } => {
                write!(
                    f,
                    "plugin `{plugin}` ({}): ABI check failed: {problem}",
                    path.display()
                )
            }
            LoadError::Options {
                plugin,
                path,
                problem,
            } => {
                write!(f, "plugin `{plugin}` ({}): {problem}", path.display())
            }
            LoadError::Create {
                plugin,
                path,
                status,
                message,
            } => {
                let status = kvhost_plugin_sdk::Status(*status);
                write!(
                    f,
                    "plugin `{plugin}` ({}): create failed: {status}",
                    path.display()
                )?;
                if !message.is_empty() {
                    write!(f, ": {message}")?;
                }
                Ok(())
            }
        }
    }
}

impl std::error::Error for LoadError {}

/// Where libraries are searched, in order: the config's `plugin_dir`s, `KVHOST_PLUGIN_PATH`
/// (colon-separated), then `<exe dir>/plugins`, then `<exe dir>` itself (where Cargo puts Rust plugins
/// built in the same workspace).
pub fn plugin_dirs(config: &Config) -> Vec<PathBuf> {
    let mut dirs = config.plugin_dirs.clone();
    if let Some(env) = std::env::var_os("KVHOST_PLUGIN_PATH") {
        dirs.extend(std::env::split_paths(&env).filter(|p| !p.as_os_str().is_empty()));
    }
    if let Some(exe_dir) = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(Path::to_path_buf))
    {
        // Test binaries live in <profile>/deps; the workspace build puts plugins in <profile>/plugins.
        let exe_dir = match exe_dir.parent() {
            Some(profile) if exe_dir.ends_with("deps") => profile.to_path_buf(),
            _ => exe_dir,
        };
        dirs.push(exe_dir.join("plugins"));
        // Last: Rust plugins built in the same Cargo workspace land next to the binary.
        dirs.push(exe_dir);
    }
    dirs
}

/// Resolve `module_path` to a file, or list every path tried.
pub fn resolve(
    module_path: &str,
    base_dir: &Path,
    dirs: &[PathBuf],
) -> Result<PathBuf, Vec<PathBuf>> {
    let looks_like_path =
        module_path.contains('/') || module_path.ends_with(".so") || module_path.contains(".so.");
    if looks_like_path {
        let p = PathBuf::from(module_path);
        let p = if p.is_relative() { base_dir.join(p) } else { p };
        return if p.is_file() { Ok(p) } else { Err(vec![p]) };
    }
    let mut names = vec![format!("lib{module_path}.so"), format!("{module_path}.so")];
    if let Some((pkg, last)) = module_path.rsplit_once('.') {
        // A dotted name (LMCache's Python module syntax): try `pkg/sub/liblast.so`, then `liblast.so`.
        let sub = pkg.replace('.', "/");
        names.push(format!("{sub}/lib{last}.so"));
        names.push(format!("{sub}/{last}.so"));
        names.push(format!("lib{last}.so"));
    }
    let mut searched = Vec::new();
    for dir in dirs {
        for name in &names {
            let candidate = dir.join(name);
            if candidate.is_file() {
                return Ok(candidate);
            }
            searched.push(candidate);
        }
    }
    Err(searched)
}

fn valid_class_name(name: &str) -> bool {
    !name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// Load, check and create one plugin.
pub fn load(spec: &PluginSpec, config: &Config) -> Result<PluginBackend, LoadError> {
    let dirs = plugin_dirs(config);
    let path = resolve(&spec.module_path, &config.base_dir(), &dirs).map_err(|searched| {
        LoadError::NotFound {
            plugin: spec.name.clone(),
            module_path: spec.module_path.clone(),
            searched,
        }
    })?;
    load_from(spec, &path, config)
}

/// Load, check and create one plugin from a known library file.
pub fn load_from(
    spec: &PluginSpec,
    path: &Path,
    config: &Config,
) -> Result<PluginBackend, LoadError> {
    let (_, vt, info) = inspect(spec, path)?;

    let options =
        validate_options(&spec.options, &info.schema).map_err(|problem| LoadError::Options {
            plugin: spec.name.clone(),
            path: path.to_path_buf(),
            problem,
        })?;
    let info = PluginInfo {
        options: options.clone(),
        ..info
    };

    let (host, ctx) = library::host_api(&spec.name).map_err(|reason| LoadError::Open {
        plugin: spec.name.clone(),
        path: path.to_path_buf(),
        reason,
    })?;
    let metadata = library::FfiMetadata::new(&config.model, config.chunk_size);
    let backend =
        library::create(&vt, host, &options, &metadata).map_err(|(status, message)| {
            LoadError::Create {
                plugin: spec.name.clone(),
                path: path.to_path_buf(),
                status,
                message,
            }
        })?;
    if info.capabilities & !KNOWN_CAPS != 0 {
        tracing::info!(
            target: "kvhost::loader",
            plugin = %spec.name,
            "capability bits {:#x} are newer than this host and are ignored",
            info.capabilities & !KNOWN_CAPS
        );
    }
    tracing::info!(
        target: "kvhost::loader",
        plugin = %spec.name,
        "loaded {} class {} v{} (ABI {}.{})",
        path.display(),
        info.class_name,
        info.version,
        info.abi.0,
        info.abi.1
    );
    Ok(PluginBackend::new(info, vt, backend, ctx))
}

/// Check class `class` of library `path` without creating a backend (for listings).
pub fn describe(path: &Path, class: &str) -> Result<PluginInfo, LoadError> {
    let spec = PluginSpec {
        name: class.to_string(),
        module_path: path.display().to_string(),
        class_name: class.to_string(),
        priority: None,
        position: 0,
        options: Vec::new(),
    };
    inspect(&spec, path).map(|(_, _, info)| info)
}

/// The `kvh_plugin_<class>_v<major>` entry points a library exports, as `(class, major)`.
pub fn exported_entry_points(path: &Path) -> Vec<(String, u32)> {
    library::exported_plugin_symbols(path)
        .iter()
        .filter_map(|s| {
            let rest = s.strip_prefix("kvh_plugin_")?;
            let (class, major) = rest.rsplit_once("_v")?;
            Some((class.to_string(), major.parse().ok()?))
        })
        .collect()
}

const KNOWN_CAPS: u64 = abi::KVH_CAP_PIN
    | abi::KVH_CAP_PREFETCH
    | abi::KVH_CAP_FLUSH
    | abi::KVH_CAP_HEALTH
    | abi::KVH_CAP_PERSISTENT
    | abi::KVH_CAP_SHARED
    | abi::KVH_CAP_DISCARDS
    | abi::KVH_CAP_CLEAR
    | abi::KVH_CAP_ASYNC_CONTAINS
    | abi::KVH_CAP_ASYNC_REMOVE
    | abi::KVH_CAP_STATS;

/// The type of an entry point.
pub type EntryFn =
    unsafe extern "C" fn(*const abi::kvh_host_api) -> *const abi::kvh_plugin_descriptor;

/// Open a library and run every check on class `spec.class_name` without creating a backend.
pub(crate) fn inspect(
    spec: &PluginSpec,
    path: &Path,
) -> Result<
    (
        abi::kvh_plugin_descriptor,
        abi::kvh_backend_vtable,
        PluginInfo,
    ),
    LoadError,
> {
    let plugin = spec.name.clone();
    if !valid_class_name(&spec.class_name) {
        return Err(LoadError::Abi {
            plugin,
            path: path.to_path_buf(),
            problem: format!(
                "class_name `{}` must be [A-Za-z0-9_]+ (it names a C symbol)",
                spec.class_name
            ),
        });
    }
    let lib = library::open(path).map_err(|reason| LoadError::Open {
        plugin: plugin.clone(),
        path: path.to_path_buf(),
        reason,
    })?;
    let symbol = format!("kvh_plugin_{}_v{}", spec.class_name, abi::KVH_ABI_MAJOR);
    let entry = library::entry(lib, &symbol).ok_or_else(|| LoadError::MissingSymbol {
        plugin: plugin.clone(),
        path: path.to_path_buf(),
        symbol: symbol.clone(),
        exported: library::exported_plugin_symbols(path),
    })?;
    inspect_entry(spec, path, entry, Some(lib))
}

/// Checks 1 to 7 on an entry point (`lib`: its library, for the Rust layout check).
fn inspect_entry(
    spec: &PluginSpec,
    path: &Path,
    entry: EntryFn,
    lib: Option<&'static libloading::os::unix::Library>,
) -> Result<
    (
        abi::kvh_plugin_descriptor,
        abi::kvh_backend_vtable,
        PluginInfo,
    ),
    LoadError,
> {
    let plugin = spec.name.clone();
    let abi_err = |problem: String| LoadError::Abi {
        plugin: plugin.clone(),
        path: path.to_path_buf(),
        problem,
    };
    let symbol = format!("kvh_plugin_{}_v{}", spec.class_name, abi::KVH_ABI_MAJOR);
    let (host, _) = library::host_api(&spec.name).map_err(|reason| LoadError::Open {
        plugin: plugin.clone(),
        path: path.to_path_buf(),
        reason,
    })?;

    // 1. Non-null descriptor.
    let desc_ptr = library::call_entry(entry, host);
    if desc_ptr.is_null() {
        return Err(abi_err(format!(
            "{symbol} returned NULL: the plugin refused to load (see its log above)"
        )));
    }
    // 2. Size.
    let (desc, declared) = library::read_descriptor(desc_ptr);
    if declared < abi::KVH_DESCRIPTOR_V1_0_SIZE {
        return Err(abi_err(format!(
            "descriptor struct_size is {declared} bytes, smaller than the {} bytes of ABI 1.0",
            abi::KVH_DESCRIPTOR_V1_0_SIZE
        )));
    }
    // 3. Major.
    if desc.abi_major != abi::KVH_ABI_MAJOR {
        return Err(abi_err(format!(
            "descriptor says ABI major {} but this host speaks {} (the plugin was built against another header)",
            desc.abi_major,
            abi::KVH_ABI_MAJOR
        )));
    }
    // 4. Class name.
    let class = library::c_str(desc.class_name).unwrap_or_default();
    if class != spec.class_name {
        return Err(abi_err(format!(
            "{symbol} returned a descriptor for class `{class}`, not `{}`",
            spec.class_name
        )));
    }
    // 5. Required functions.
    if desc.vtable.is_null() {
        return Err(abi_err("descriptor vtable is NULL".to_string()));
    }
    let (vt, vt_size) = library::read_vtable(desc.vtable);
    if vt_size < abi::KVH_VTABLE_V1_0_SIZE {
        return Err(abi_err(format!(
            "vtable struct_size is {vt_size} bytes, smaller than the {} bytes of ABI 1.0",
            abi::KVH_VTABLE_V1_0_SIZE
        )));
    }
    // Fields past the plugin's `struct_size` were zero-filled when it was read: an older plugin simply
    // lacks them. A capability whose function lies past the plugin's vtable is a contradiction.
    for (bit, minor, size) in [
        (abi::KVH_CAP_CLEAR, 1, abi::KVH_VTABLE_V1_1_SIZE),
        (abi::KVH_CAP_ASYNC_CONTAINS, 2, abi::KVH_VTABLE_V1_2_SIZE),
        (abi::KVH_CAP_ASYNC_REMOVE, 2, abi::KVH_VTABLE_V1_2_SIZE),
        (abi::KVH_CAP_STATS, 3, abi::KVH_VTABLE_V1_3_SIZE),
    ] {
        if desc.capabilities & bit != 0 && vt_size < size {
            let cap = crate::plugin::capability_names(bit).join("");
            return Err(abi_err(format!(
                "capability `{cap}` is advertised but the vtable ({vt_size} bytes) predates it (ABI 1.{minor}, {size} bytes)"
            )));
        }
    }
    let missing: Vec<&str> = [
        ("create", vt.create.is_none()),
        ("destroy", vt.destroy.is_none()),
        ("contains", vt.contains.is_none()),
        ("put", vt.put.is_none()),
        ("get", vt.get.is_none()),
        ("remove", vt.remove.is_none()),
    ]
    .iter()
    .filter(|(_, null)| *null)
    .map(|(n, _)| *n)
    .collect();
    if !missing.is_empty() {
        return Err(abi_err(format!(
            "required vtable function(s) are NULL: {}",
            missing.join(", ")
        )));
    }
    // 6. Capabilities against functions.
    let caps = desc.capabilities;
    let cap_fns: [(u64, &str, bool); 8] = [
        (
            abi::KVH_CAP_PIN,
            "pin/unpin",
            vt.pin.is_some() && vt.unpin.is_some(),
        ),
        (abi::KVH_CAP_PREFETCH, "prefetch", vt.prefetch.is_some()),
        (abi::KVH_CAP_FLUSH, "flush", vt.flush.is_some()),
        (abi::KVH_CAP_HEALTH, "health", vt.health.is_some()),
        (abi::KVH_CAP_CLEAR, "clear", vt.clear.is_some()),
        (
            abi::KVH_CAP_ASYNC_CONTAINS,
            "contains_async",
            vt.contains_async.is_some(),
        ),
        (
            abi::KVH_CAP_ASYNC_REMOVE,
            "remove_async",
            vt.remove_async.is_some(),
        ),
        (abi::KVH_CAP_STATS, "stats", vt.stats.is_some()),
    ];
    let mut vt = vt;
    for (bit, name, present) in cap_fns {
        if caps & bit != 0 && !present {
            let cap = crate::plugin::capability_names(bit).join("");
            return Err(abi_err(format!(
                "capability `{cap}` is advertised but {name} is NULL"
            )));
        }
        if caps & bit == 0 {
            // An optional function without its bit is never called.
            match bit {
                abi::KVH_CAP_PIN => (vt.pin, vt.unpin) = (None, None),
                abi::KVH_CAP_PREFETCH => vt.prefetch = None,
                abi::KVH_CAP_FLUSH => vt.flush = None,
                abi::KVH_CAP_CLEAR => vt.clear = None,
                abi::KVH_CAP_ASYNC_CONTAINS => vt.contains_async = None,
                abi::KVH_CAP_ASYNC_REMOVE => vt.remove_async = None,
                abi::KVH_CAP_STATS => vt.stats = None,
                _ => vt.health = None,
            }
        }
    }
    // 7. (Schema read here; options are validated by the caller.)
    let specs = library::option_specs(&desc).ok_or_else(|| {
        abi_err(format!(
            "option table is NULL or implausible ({} entries)",
            desc.options_len
        ))
    })?;
    let mut schema = Vec::with_capacity(specs.len());
    for (i, s) in specs.iter().enumerate() {
        let key = library::c_str(s.key)
            .ok_or_else(|| abi_err(format!("option spec {i} has a NULL key")))?;
        schema.push(OptionInfo {
            key,
            default: library::c_str(s.default_value),
            doc: library::c_str(s.doc).unwrap_or_default(),
            required: s.flags & abi::KVH_OPTION_REQUIRED != 0,
            secret: s.flags & abi::KVH_OPTION_SECRET != 0,
        });
    }
    // Rust plugins: abi_stable's structural layout check (built-ins share the host's types).
    if let Some((line, minor, layout)) = lib.and_then(|lib| library::rust_layout(lib, &symbol)) {
        check_rust_layout(&line, minor, layout).map_err(abi_err)?;
    }

    let info = PluginInfo {
        name: spec.name.clone(),
        path: path.to_path_buf(),
        class_name: class,
        version: library::c_str(desc.plugin_version).unwrap_or_default(),
        description: library::c_str(desc.description).unwrap_or_default(),
        abi: (desc.abi_major, desc.abi_minor),
        capabilities: caps,
        schema,
        options: Vec::new(),
    };
    Ok((desc, vt, info))
}

fn check_rust_layout(
    line: &str,
    minor: u16,
    layout: &'static abi_stable::type_layout::TypeLayout,
) -> Result<(), String> {
    let ours = kvhost_plugin_sdk::abi_layout();
    if line.as_bytes() != kvhost_plugin_sdk::export::ABI_STABLE_LINE.to_bytes() {
        return Err(format!(
            "the Rust plugin's layout was made with `{line}`, this host uses `{}`; rebuild it against this SDK",
            kvhost_plugin_sdk::export::ABI_STABLE_LINE.to_string_lossy()
        ));
    }
    if minor != abi::KVH_ABI_MINOR {
        // abi_stable compares whole layouts; across minors the structs legitimately differ in length, and
        // the struct_size checks above cover that case.
        return Ok(());
    }
    abi_stable::abi_stability::abi_checking::check_layout_compatibility(ours, layout).map_err(|e| {
        format!(
            "the Rust plugin's ABI types differ from this host's (abi_stable layout check):\n{e}"
        )
    })
}

/// Check configured options against the schema; returns them in schema order with defaults applied.
pub fn validate_options(
    given: &[(String, String)],
    schema: &[OptionInfo],
) -> Result<Vec<(String, String)>, String> {
    let accepted = || {
        if schema.is_empty() {
            "it accepts no options".to_string()
        } else {
            format!(
                "accepted: {}",
                schema
                    .iter()
                    .map(|s| s.key.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        }
    };
    for (k, _) in given {
        if !schema.iter().any(|s| &s.key == k) {
            return Err(format!("unknown option `{k}`; {}", accepted()));
        }
    }
    let mut out = Vec::with_capacity(schema.len());
    for s in schema {
        match given.iter().rev().find(|(k, _)| k == &s.key) {
            Some((_, v)) => out.push((s.key.clone(), v.clone())),
            None => match &s.default {
                Some(d) => out.push((s.key.clone(), d.clone())),
                None if s.required => {
                    return Err(format!("missing required option `{}` ({})", s.key, s.doc));
                }
                None => {}
            },
        }
    }
    Ok(out)
}

/// One plugin that failed under `on_plugin_error: skip`.
#[derive(Debug)]
pub struct Skipped {
    /// The spec.
    pub spec: PluginSpec,
    /// Why.
    pub error: LoadError,
}

/// Load every configured plugin in lookup order. With `on_plugin_error: fail` the first error is
/// returned (plugins already created are destroyed, in reverse order); with `skip` failures are logged
/// as errors and returned beside the plugins that loaded.
pub fn load_all(config: &Config) -> Result<(Vec<PluginBackend>, Vec<Skipped>), LoadError> {
    let mut loaded: Vec<PluginBackend> = Vec::new();
    let mut skipped = Vec::new();
    for spec in &config.plugins {
        match load(spec, config) {
            Ok(p) => loaded.push(p),
            Err(error) if config.on_plugin_error == OnPluginError::Skip => {
                tracing::error!(target: "kvhost::loader", "{error}; skipped (on_plugin_error: skip)");
                skipped.push(Skipped {
                    spec: spec.clone(),
                    error,
                });
            }
            Err(error) => {
                while let Some(p) = loaded.pop() {
                    drop(p);
                }
                return Err(error);
            }
        }
    }
    Ok((loaded, skipped))
}
