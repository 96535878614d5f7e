//! Configuration: LMCache's YAML format plus a few kvhost keys.
//!
//! Sources, later ones winning: the YAML file (or the embedded default), then `LMCACHE_<KEY>`
//! environment variables, then `LMCACHE_EXTRA_CONFIG` (JSON) merged into `extra_config`.
//!
//! Storage plugins are named by `storage_plugins` (a YAML list or a comma string); each one's
//! `module_path`, `class_name` and optional `priority` come from `extra_config` keys
//! `storage_plugin.<name>.<key>`, and every other `storage_plugin.<name>.<key>` is an option for the
//! plugin. The legacy `external_backends` / `external_backend.<name>.*` form still works, with a
//! deprecation warning.

pub mod machine;
mod raw;
mod serve;

use raw::{RawConfig, StringList};
pub use serve::ServeKeys;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// A configuration problem. Every variant names where it comes from.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("config {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The YAML is malformed, or a value has the wrong type.
    #[error("config {origin}{location}: {message}")]
    Parse {
        /// The file, or the environment variable.
        origin: String,
        /// `:line:column`, when known.
        location: String,
        /// The parser's message.
        message: String,
    },
    /// The values are well-formed but inconsistent.
    #[error("config {origin}: {message}")]
    Invalid {
        /// The file (or `<embedded default>`).
        origin: String,
        /// What is wrong.
        message: String,
    },
}

/// What to do when a plugin fails to load.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum OnPluginError {
    /// Refuse to start (the default).
    #[default]
    Fail,
    /// Log the error loudly and start without that plugin.
    Skip,
}

/// The model whose KV cache is stored (LMCache's `LMCacheMetadata`). In LMCache it comes from vLLM;
/// kvhost reads it from the `model:` section.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelSpec {
    /// Model name, as in keys.
    pub name: String,
    /// Tensor-parallel world size.
    pub world_size: u32,
    /// This worker's rank.
    pub worker_id: u32,
    /// Transformer layers.
    pub num_layers: u32,
    /// KV heads per layer.
    pub num_kv_heads: u32,
    /// Head dimension.
    pub head_size: u32,
    /// KV dtype (LMCache string: `bfloat16`, `half`, `float`, …).
    pub dtype: String,
    /// MLA model (one KV tensor instead of two).
    pub use_mla: bool,
}

impl Default for ModelSpec {
    fn default() -> Self {
        ModelSpec {
            name: "kvhost/default".to_string(),
            world_size: 1,
            worker_id: 0,
            num_layers: 32,
            num_kv_heads: 8,
            head_size: 128,
            dtype: "bfloat16".to_string(),
            use_mla: false,
        }
    }
}

/// Bytes per element and LMCache wire code of an LMCache dtype string.
pub fn dtype_info(dtype: &str) -> Option<(u64, i32)> {
    use kvhost_plugin_sdk::abi::*;
    Some(match dtype {
        "half" | "float16" => (2, KVH_DTYPE_FLOAT16),
        "bfloat16" => (2, KVH_DTYPE_BFLOAT16),
        "float" | "float32" => (4, KVH_DTYPE_FLOAT32),
        "double" | "float64" => (8, KVH_DTYPE_FLOAT64),
        "uint8" => (1, KVH_DTYPE_UINT8),
        "int8" | "bool" => (1, KVH_DTYPE_NONE),
        "int16" => (2, KVH_DTYPE_NONE),
        "int32" => (4, KVH_DTYPE_NONE),
        "int64" => (8, KVH_DTYPE_NONE),
        "fp8_e4m3fn" | "fp8_e4m3fnuz" => (1, KVH_DTYPE_FP8_E4M3FN),
        "fp8_e5m2" | "fp8_e5m2fnuz" => (1, KVH_DTYPE_FP8_E5M2),
        _ => return None,
    })
}

impl ModelSpec {
    /// KV tensors per layer: 1 for MLA, else 2.
    pub fn kv_count(&self) -> u64 {
        if self.use_mla {
            1
        } else {
            2
        }
    }

    /// Bytes in one full chunk of `chunk_size` tokens.
    pub fn full_chunk_bytes(&self, chunk_size: u32) -> u64 {
        let elem = dtype_info(&self.dtype).map_or(2, |(b, _)| b);
        self.kv_count()
            * u64::from(self.num_layers)
            * u64::from(chunk_size)
            * u64::from(self.num_kv_heads)
            * u64::from(self.head_size)
            * elem
    }
}

/// One configured storage plugin.
#[derive(Clone, Debug, PartialEq)]
pub struct PluginSpec {
    /// The configured name (the `storage_plugins` entry).
    pub name: String,
    /// Path to the `.so`, or a bare or dotted name searched in the plugin directories.
    pub module_path: String,
    /// The backend class; the entry symbol is `kvh_plugin_<class_name>_v1`.
    pub class_name: String,
    /// Explicit lookup priority (lower first), if given.
    pub priority: Option<i64>,
    /// Position in `storage_plugins`.
    pub position: usize,
    /// The plugin's options (`storage_plugin.<name>.<key>` other than the keys above), as text.
    pub options: Vec<(String, String)>,
}

/// Backend names LMCache reserves for its built-ins.
const RESERVED_NAMES: &[&str] = &[
    "LocalCPUBackend",
    "LocalDiskBackend",
    "PDBackend",
    "MaruBackend",
    "P2PBackend",
    "NixlStorageBackend",
    "GdsBackend",
];

/// The loaded configuration.
#[derive(Clone, Debug)]
pub struct Config {
    /// Where it came from: the file path, or `None` for the embedded default.
    pub source: Option<PathBuf>,
    /// Tokens per chunk.
    pub chunk_size: u32,
    /// Keep chunks in the CPU hot cache (otherwise it only stages).
    pub local_cpu: bool,
    /// Hot-cache size in GiB.
    pub max_local_cpu_size: f64,
    /// Ask for huge pages for the arena.
    pub local_cpu_use_hugepages: bool,
    /// Eviction policy name (LRU, FIFO, LFU, MRU, S3FIFO).
    pub cache_policy: String,
    /// Store the tail partial chunk.
    pub save_unfull_chunk: bool,
    /// Remote get/contains timeout.
    pub blocking_timeout_secs: f64,
    /// Lookup pins are released after this long.
    pub pin_timeout_sec: f64,
    /// `write_through` (default) or `write_back`.
    pub write_policy: String,
    /// How often lookup pins are checked against `pin_timeout_sec`.
    pub pin_check_interval_sec: f64,
    /// Touch the whole arena at start (default) instead of on first use.
    pub local_cpu_prefault: bool,
    /// Chunks queued per plugin tier before backpressure applies.
    pub put_queue_depth: usize,
    /// `block` (default): a put waits for queue room; `drop`: the tier skips the chunk (counted).
    pub put_backpressure: String,
    /// Chunks per plugin put call.
    pub put_batch_size: usize,
    /// Bytes per plugin put call (a batch closes at whichever of the two limits comes first).
    pub put_batch_bytes: u64,
    /// Plugin put calls outstanding per tier.
    pub tier_max_inflight_batches: usize,
    /// Ask a tier which keys it holds before storing, and skip those.
    pub skip_existing_in_tiers: bool,
    /// How long a promotion into the hot cache waits for room when nothing is evictable.
    pub promotion_wait_ms: u64,
    /// Threads that share a hot-cache copy of 1 MiB or more (from 256 KiB while a helper is
    /// awake), the caller's included (0 or 1: the caller's thread only); `None`: one per core.
    pub copy_threads: Option<usize>,
    /// Arena bytes one tier's puts may hold (queued or being stored) before its circuit breaker
    /// trips; `None`: half the hot cache (1 GiB without one).
    pub tier_max_inflight_bytes: Option<u64>,
    /// A tier put outstanding this long trips the tier's breaker; default `blocking_timeout_secs`.
    pub tier_put_deadline_secs: f64,
    /// Consecutive failed operations that trip a tier's breaker (0: never on failures).
    pub tier_breaker_failures: u32,
    /// How often an open breaker probes its tier (`health`), seconds.
    pub tier_breaker_probe_secs: f64,
    /// The storage plugins in lookup order (priority, then list position).
    pub plugins: Vec<PluginSpec>,
    /// Extra plugin directories from the config (`plugin_dir`), searched first.
    pub plugin_dirs: Vec<PathBuf>,
    /// What to do when a plugin fails to load.
    pub on_plugin_error: OnPluginError,
    /// The model.
    pub model: ModelSpec,
    /// The `serve:` section (`kvhost serve` limits).
    pub serve: ServeKeys,
    /// `extra_config` entries that are not plugin keys.
    pub extra_config: BTreeMap<String, String>,
    /// Warnings found while loading (unknown keys, deprecated forms); also logged.
    pub warnings: Vec<String>,
}

/// The embedded default configuration (`examples/quickstart.yaml`).
pub const DEFAULT_CONFIG_YAML: &str = include_str!("../../../examples/quickstart.yaml");

impl Config {
    /// Load a config file, then apply the process environment.
    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_yaml_with_env(&text, Some(path), std::env::vars())
    }

    /// Like [`Config::from_file`], but the warnings are left in [`Config::warnings`] and not logged:
    /// for callers that show them themselves (`kvhost check`), so each is printed once.
    pub fn from_file_unlogged(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::load(
            &text,
            Some(path),
            std::env::vars(),
            machine::physical_memory_bytes(),
        )
    }

    /// Like [`Config::embedded_default`], but the warnings are not logged (see
    /// [`Config::from_file_unlogged`]).
    pub fn embedded_default_unlogged() -> Result<Config, ConfigError> {
        Self::load(
            DEFAULT_CONFIG_YAML,
            None,
            std::env::vars(),
            machine::physical_memory_bytes(),
        )
    }

    /// The embedded default config, with the process environment applied.
    pub fn embedded_default() -> Result<Config, ConfigError> {
        Self::from_yaml_with_env(DEFAULT_CONFIG_YAML, None, std::env::vars())
    }

    /// Parse YAML text (from `path`, used for messages and relative module paths) with no environment.
    pub fn from_yaml(text: &str, path: Option<&Path>) -> Result<Config, ConfigError> {
        Self::from_yaml_with_env(text, path, std::iter::empty())
    }

    /// Parse YAML text and apply `LMCACHE_*` variables from `env`; log the warnings.
    pub fn from_yaml_with_env(
        text: &str,
        path: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let config = Self::load(text, path, env, machine::physical_memory_bytes())?;
        config.log_warnings();
        Ok(config)
    }

    /// Log each of [`Config::warnings`] once at WARN.
    pub fn log_warnings(&self) {
        for w in &self.warnings {
            tracing::warn!(target: "kvhost::config", "{w}");
        }
    }

    /// Parse, apply the environment and resolve, checking the hot cache against `machine_memory`
    /// bytes (not checked when unknown). Logs nothing.
    fn load(
        text: &str,
        path: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
        machine_memory: Option<u64>,
    ) -> Result<Config, ConfigError> {
        let origin = path.map_or_else(
            || "<embedded default>".to_string(),
            |p| p.display().to_string(),
        );
        let mut warnings = Vec::new();
        let mut raw = RawConfig::parse(text, &origin, &mut warnings)?;
        for (var, value) in env {
            raw.apply_env(&var, &value, &mut warnings)?;
        }
        Self::resolve(raw, path, &origin, warnings, machine_memory)
    }

    fn resolve(
        raw: RawConfig,
        path: Option<&Path>,
        origin: &str,
        mut warnings: Vec<String>,
        machine_memory: Option<u64>,
    ) -> Result<Config, ConfigError> {
        let invalid = |message: String| ConfigError::Invalid {
            origin: origin.to_string(),
            message,
        };
        let extra: BTreeMap<String, String> = raw
            .extra_config
            .unwrap_or_default()
            .into_iter()
            .map(|(k, v)| (k, raw::value_text(&v)))
            .collect();

        // (name, key prefix, position in its own list)
        let mut names: Vec<(String, &'static str, usize)> = Vec::new();
        for (i, n) in raw
            .storage_plugins
            .map(StringList::into_names)
            .unwrap_or_default()
            .into_iter()
            .enumerate()
        {
            names.push((n, "storage_plugin", i));
        }
        if let Some(legacy) = raw.external_backends {
            warnings.push("`external_backends` is deprecated: use `storage_plugins` and `storage_plugin.<name>.*`".into());
            for (i, n) in legacy.into_names().into_iter().enumerate() {
                names.push((n, "external_backend", i));
            }
        }

        let mut plugins: Vec<PluginSpec> = Vec::new();
        let mut claimed: Vec<String> = Vec::new();
        for (position, (name, prefix_root, index)) in names.iter().enumerate() {
            let list = format!("{prefix_root}s");
            if name.is_empty() {
                return Err(invalid(format!(
                    "{list}[{index}]: the plugin name is empty"
                )));
            }
            if name.contains(char::is_whitespace) {
                return Err(invalid(format!(
                    "{list}[{index}]: plugin name `{}` has whitespace",
                    name.escape_debug()
                )));
            }
            if let Some((_, first_root, first_index)) =
                names[..position].iter().find(|(n, ..)| n == name)
            {
                let first_list = format!("{first_root}s");
                return Err(invalid(if first_list == list {
                    format!(
                        "duplicate plugin name `{name}` in {list} (positions {first_index} and {index}); names must be unique"
                    )
                } else {
                    format!(
                        "plugin `{name}` is named by both `{first_list}` (position {first_index}) and `{list}` \
                         (position {index}); name it once, in `storage_plugins` (`external_backends` is the \
                         deprecated form)"
                    )
                }));
            }
            if RESERVED_NAMES.contains(&name.as_str()) || name.starts_with("RemoteBackend") {
                return Err(invalid(format!(
                    "plugin name `{name}` is reserved for an LMCache built-in backend"
                )));
            }
            let prefix = format!("{prefix_root}.{name}.");
            let mut module_path = None;
            let mut class_name = None;
            let mut priority = None;
            let mut options = Vec::new();
            for (k, v) in &extra {
                let Some(sub) = k.strip_prefix(&prefix) else {
                    continue;
                };
                claimed.push(k.clone());
                match sub {
                    "module_path" => module_path = Some(v.clone()),
                    "class_name" => class_name = Some(v.clone()),
                    "priority" => {
                        priority = Some(v.trim().parse::<i64>().map_err(|_| {
                            invalid(format!(
                                "extra_config `{k}`: priority `{v}` is not an integer"
                            ))
                        })?)
                    }
                    _ => options.push((sub.to_string(), v.clone())),
                }
            }
            if *prefix_root == "external_backend" && (module_path.is_some() || class_name.is_some())
            {
                warnings.push(format!(
                    "`external_backend.{name}.*` is deprecated: rename the keys to `storage_plugin.{name}.*`"
                ));
            }
            let module_path = module_path.ok_or_else(|| {
                invalid(format!("plugin `{name}`: missing `extra_config.{prefix}module_path` (path or name of its .so)"))
            })?;
            let class_name = class_name.ok_or_else(|| {
                invalid(format!("plugin `{name}`: missing `extra_config.{prefix}class_name` (the backend class to load)"))
            })?;
            plugins.push(PluginSpec {
                name: name.clone(),
                module_path,
                class_name,
                priority,
                position,
                options,
            });
        }
        // Explicit priorities override list position; ties keep list order (stable sort).
        plugins.sort_by_key(|p| p.priority.unwrap_or(p.position as i64));

        let mut extra_config = BTreeMap::new();
        for (k, v) in extra {
            if claimed.contains(&k) {
                continue;
            }
            if k.starts_with("storage_plugin.") || k.starts_with("external_backend.") {
                warnings.push(format!(
                    "extra_config `{k}` names a plugin that is not in storage_plugins (ignored)"
                ));
            }
            extra_config.insert(k, v);
        }

        let base = path
            .and_then(Path::parent)
            .map(Path::to_path_buf)
            .unwrap_or_default();
        let plugin_dirs = raw
            .plugin_dir
            .map(StringList::into_vec)
            .unwrap_or_default()
            .into_iter()
            .map(|d| {
                let d = PathBuf::from(d);
                if d.is_relative() {
                    base.join(d)
                } else {
                    d
                }
            })
            .collect();

        let on_plugin_error = match raw.on_plugin_error.as_deref() {
            None | Some("fail") => OnPluginError::Fail,
            Some("skip") => OnPluginError::Skip,
            Some(other) => {
                return Err(invalid(format!(
                    "on_plugin_error `{other}`: expected `fail` or `skip`"
                )))
            }
        };
        let write_policy = raw
            .write_policy
            .unwrap_or_else(|| "write_through".to_string());
        if !matches!(write_policy.as_str(), "write_through" | "write_back") {
            return Err(invalid(format!(
                "write_policy `{write_policy}`: expected `write_through` or `write_back`"
            )));
        }
        let put_backpressure = raw.put_backpressure.unwrap_or_else(|| "block".to_string());
        if !matches!(put_backpressure.as_str(), "block" | "drop") {
            return Err(invalid(format!(
                "put_backpressure `{put_backpressure}`: expected `block` or `drop`"
            )));
        }
        let cache_policy = raw
            .cache_policy
            .unwrap_or_else(|| "LRU".to_string())
            .parse::<crate::cache::PolicyKind>()
            .map_err(|e| invalid(format!("cache_policy: {e}")))?
            .name()
            .to_string();
        let chunk_size = raw.chunk_size.unwrap_or(256);
        if chunk_size == 0 {
            return Err(invalid("chunk_size must be positive".to_string()));
        }
        let max_local_cpu_size = raw.max_local_cpu_size.unwrap_or(5.0);
        if !(max_local_cpu_size.is_finite() && max_local_cpu_size >= 0.0) {
            return Err(invalid(format!(
                "max_local_cpu_size {max_local_cpu_size} GiB must be a non-negative number"
            )));
        }
        let arena_bytes = machine::gib_to_bytes(max_local_cpu_size);
        if let Some(memory) = machine_memory {
            if arena_bytes > memory {
                return Err(invalid(format!(
                    "max_local_cpu_size {max_local_cpu_size} GiB ({arena_bytes} bytes) is more than this \
                     machine's memory ({memory} bytes, {}): the hot-cache arena could not be mapped",
                    machine::gib_text(memory)
                )));
            }
        }

        // Durations are checked here, not where they become `Duration`s (which panics on a
        // negative, NaN or huge value): under 1e9 s (31 years), finite, positive or not negative.
        let seconds = |key: &str, v: f64, zero_ok: bool| {
            if v.is_finite() && (v > 0.0 || (zero_ok && v == 0.0)) && v < 1e9 {
                Ok(v)
            } else {
                let what = if zero_ok { "non-negative" } else { "positive" };
                Err(invalid(format!(
                    "{key} {v}: expected a {what} number of seconds below 1e9"
                )))
            }
        };
        let positive = |key: &str, v: f64| seconds(key, v, false);
        let blocking_timeout_secs = positive(
            "blocking_timeout_secs",
            raw.blocking_timeout_secs.unwrap_or(10.0),
        )?;
        let pin_timeout_sec = seconds(
            "pin_timeout_sec",
            raw.pin_timeout_sec.unwrap_or(300.0),
            true,
        )?;
        let pin_check_interval_sec = seconds(
            "pin_check_interval_sec",
            raw.pin_check_interval_sec.unwrap_or(30.0),
            true,
        )?;
        let tier_put_deadline_secs = positive(
            "tier_put_deadline_secs",
            raw.tier_put_deadline_secs.unwrap_or(blocking_timeout_secs),
        )?;
        let tier_breaker_probe_secs = positive(
            "tier_breaker_probe_secs",
            raw.tier_breaker_probe_secs.unwrap_or(1.0),
        )?;
        let tier_max_inflight_bytes = match raw.tier_max_inflight_bytes {
            Some(0) => {
                return Err(invalid(
                    "tier_max_inflight_bytes must be positive".to_string(),
                ))
            }
            other => other,
        };

        let serve = raw.serve.unwrap_or_default();
        serve.check().map_err(invalid)?;

        let mut model = ModelSpec::default();
        if let Some(m) = raw.model {
            m.apply(&mut model);
        }
        if dtype_info(&model.dtype).is_none() {
            return Err(invalid(format!(
                "model.dtype `{}` is not an LMCache dtype",
                model.dtype
            )));
        }

        Ok(Config {
            source: path.map(Path::to_path_buf),
            chunk_size,
            local_cpu: raw.local_cpu.unwrap_or(true),
            max_local_cpu_size,
            local_cpu_use_hugepages: raw.local_cpu_use_hugepages.unwrap_or(false),
            cache_policy,
            save_unfull_chunk: raw.save_unfull_chunk.unwrap_or(false),
            blocking_timeout_secs,
            pin_timeout_sec,
            write_policy,
            pin_check_interval_sec,
            local_cpu_prefault: raw.local_cpu_prefault.unwrap_or(true),
            put_queue_depth: raw.put_queue_depth.unwrap_or(1024).max(1),
            put_backpressure,
            put_batch_size: raw.put_batch_size.unwrap_or(32).max(1),
            put_batch_bytes: raw.put_batch_bytes.unwrap_or(64 << 20).max(1),
            tier_max_inflight_batches: raw.tier_max_inflight_batches.unwrap_or(4).max(1),
            skip_existing_in_tiers: raw.skip_existing_in_tiers.unwrap_or(true),
            promotion_wait_ms: raw.promotion_wait_ms.unwrap_or(100),
            copy_threads: raw.copy_threads,
            tier_max_inflight_bytes,
            tier_put_deadline_secs,
            tier_breaker_failures: raw.tier_breaker_failures.unwrap_or(5),
            tier_breaker_probe_secs,
            plugins,
            plugin_dirs,
            on_plugin_error,
            model,
            serve,
            extra_config,
            warnings,
        })
    }

    /// The directory relative module paths are resolved against.
    pub fn base_dir(&self) -> PathBuf {
        self.source
            .as_deref()
            .and_then(Path::parent)
            .map(Path::to_path_buf)
            .unwrap_or_default()
    }

    /// Bytes in one full chunk of the configured model.
    pub fn full_chunk_bytes(&self) -> u64 {
        self.model.full_chunk_bytes(self.chunk_size)
    }
}

#[cfg(test)]
mod tests;
