//! The config as written: every field optional, parsed with locations, unknown keys collected.

use super::{ConfigError, ModelSpec};
use serde::Deserialize;
use serde_yaml_ng::Value;
use std::collections::BTreeMap;

/// A list given either as a YAML sequence or as a comma-separated string (LMCache's `_to_str_list`).
#[derive(Debug, Deserialize, Clone)]
#[serde(untagged)]
pub(super) enum StringList {
    List(Vec<String>),
    Comma(String),
}

impl StringList {
    /// Plugin names: a YAML list keeps its empty entries (so they are reported with their
    /// position); a comma string drops them, as LMCache's `_to_str_list` does.
    pub(super) fn into_names(self) -> Vec<String> {
        match self {
            StringList::List(v) => v.into_iter().map(|s| s.trim().to_string()).collect(),
            comma @ StringList::Comma(_) => comma.into_vec(),
        }
    }

    /// The entries, trimmed, empty ones dropped.
    pub(super) fn into_vec(self) -> Vec<String> {
        match self {
            StringList::List(v) => v
                .into_iter()
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .collect(),
            StringList::Comma(s) => s
                .split(',')
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .collect(),
        }
    }
}

/// The `model:` section.
#[derive(Debug, Deserialize, Default, Clone)]
pub(super) struct RawModel {
    name: Option<String>,
    world_size: Option<u32>,
    worker_id: Option<u32>,
    num_layers: Option<u32>,
    num_kv_heads: Option<u32>,
    head_size: Option<u32>,
    dtype: Option<String>,
    use_mla: Option<bool>,
}

impl RawModel {
    pub(super) fn apply(self, m: &mut ModelSpec) {
        macro_rules! set {
            ($($f:ident => $t:ident),*) => { $( if let Some(v) = self.$f { m.$t = v; } )* };
        }
        set!(name => name, world_size => world_size, worker_id => worker_id, num_layers => num_layers,
             num_kv_heads => num_kv_heads, head_size => head_size, dtype => dtype, use_mla => use_mla);
    }
}

macro_rules! raw_config {
    ($($field:ident : $ty:ty),* $(,)?) => {
        /// Every key kvhost reads. LMCache keys kvhost does not use are accepted silently (see
        /// `LMCACHE_KEYS`); anything else is reported as unknown.
        #[derive(Debug, Deserialize, Default)]
        pub(super) struct RawConfig {
            $(pub(super) $field: Option<$ty>,)*
        }

        impl RawConfig {
            const FIELDS: &'static [&'static str] = &[$(stringify!($field)),*];

            /// Fields set in `other` replace those of `self`.
            fn merge(&mut self, other: RawConfig) {
                $(if other.$field.is_some() { self.$field = other.$field; })*
            }
        }
    };
}

raw_config! {
    chunk_size: u32,
    local_cpu: bool,
    max_local_cpu_size: f64,
    local_cpu_use_hugepages: bool,
    cache_policy: String,
    save_unfull_chunk: bool,
    blocking_timeout_secs: f64,
    pin_timeout_sec: f64,
    storage_plugins: StringList,
    external_backends: StringList,
    extra_config: BTreeMap<String, Value>,
    plugin_dir: StringList,
    on_plugin_error: String,
    write_policy: String,
    model: RawModel,
    serve: super::ServeKeys,
    pin_check_interval_sec: f64,
    local_cpu_prefault: bool,
    put_queue_depth: usize,
    put_backpressure: String,
    put_batch_size: usize,
    put_batch_bytes: u64,
    tier_max_inflight_batches: usize,
    skip_existing_in_tiers: bool,
    promotion_wait_ms: u64,
    copy_threads: usize,
    tier_max_inflight_bytes: u64,
    tier_put_deadline_secs: f64,
    tier_breaker_failures: u32,
    tier_breaker_probe_secs: f64,
}

/// LMCache config keys that kvhost accepts without using (so an LMCache config loads cleanly).
const LMCACHE_KEYS: &[&str] = &[
    "reserve_local_cpu_size",
    "local_disk",
    "local_disk_path_sharding",
    "max_local_disk_size",
    "remote_url",
    "remote_storage_plugins",
    "remote_serde",
    "save_decode_cache",
    "use_layerwise",
    "enable_async_loading",
    "lookup_timeout_ms",
    "cost_aware_half_life_seconds",
    "cost_aware_ewma_alpha",
    "pre_caching_hash_algorithm",
    "store_location",
    "retrieve_locations",
    "min_retrieve_tokens",
    "numa_mode",
    "enable_lazy_memory_allocator",
    "gds_path",
    "gds_buffer_size",
    "gds_backend",
    "use_gds",
    "maru_path",
    "maru_pool_size",
    "enable_p2p",
    "enable_pd",
    "transfer_channel",
    "enable_controller",
    "lmcache_instance_id",
    "lookup_server_worker_ids",
    "enable_scheduler_bypass_lookup",
    "external_lookup_client",
    "runtime_plugin_locations",
    "plugin_locations",
    "enable_blending",
    "blend_special_str",
    "use_experimental",
];

fn is_lmcache_key(key: &str) -> bool {
    LMCACHE_KEYS.contains(&key)
        || [
            "p2p_",
            "pd_",
            "nixl_",
            "controller_",
            "lmcache_worker_",
            "lazy_memory_",
            "blend_",
        ]
        .iter()
        .any(|p| key.starts_with(p))
}

/// A config value as the text a plugin option receives: scalars as written, sequences comma-joined,
/// maps as JSON.
pub(super) fn value_text(v: &Value) -> String {
    match v {
        Value::Null => String::new(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(s) => s.clone(),
        Value::Sequence(items) => items.iter().map(value_text).collect::<Vec<_>>().join(","),
        Value::Mapping(_) | Value::Tagged(_) => serde_json::to_string(v).unwrap_or_default(),
    }
}

fn parse_error(origin: &str, text: &str, err: &serde_yaml_ng::Error) -> ConfigError {
    let mut message = err.to_string();
    let mut location = err.location().map(|l| (l.line(), l.column()));
    // The parser places a duplicate key at the start of its mapping; find the repeated line.
    if let Some(found) = duplicate_key_name(&message).and_then(|key| second_occurrence(text, &key))
    {
        if let Some((line, column)) = location {
            let wrong = format!(" at line {line} column {column}");
            if let Some(head) = message.strip_suffix(&wrong) {
                message = format!("{head} at line {} column {}", found.0, found.1);
            }
        }
        location = Some(found);
    }
    ConfigError::Parse {
        origin: origin.to_string(),
        location: location
            .map(|(line, column)| format!(":{line}:{column}"))
            .unwrap_or_default(),
        message,
    }
}

/// The key named by a duplicate-key error of serde (`duplicate field `k``) or of a YAML mapping
/// (`duplicate entry with key "k"`).
fn duplicate_key_name(message: &str) -> Option<String> {
    if let Some((_, rest)) = message.split_once("duplicate field `") {
        return rest.split('`').next().map(str::to_string);
    }
    let (_, rest) = message.split_once("duplicate entry with key \"")?;
    rest.split('"').next().map(str::to_string)
}

/// Line and column (1-based) of the second block-mapping line `key:` at one indentation.
fn second_occurrence(text: &str, key: &str) -> Option<(usize, usize)> {
    let mut seen_at_indent: Vec<usize> = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let body = line.trim_start_matches(' ');
        if body.is_empty() || body.starts_with('#') {
            continue;
        }
        let indent = line.len() - body.len();
        // A shallower line closes the mappings nested deeper than it.
        seen_at_indent.retain(|&i| i <= indent);
        let body = body.strip_prefix("- ").unwrap_or(body);
        let named = [key.to_string(), format!("\"{key}\""), format!("'{key}'")]
            .iter()
            .any(|k| {
                body.strip_prefix(k.as_str())
                    .is_some_and(|r| r.trim_start().starts_with(':'))
            });
        if !named {
            continue;
        }
        if seen_at_indent.contains(&indent) {
            return Some((n + 1, indent + 1));
        }
        seen_at_indent.push(indent);
    }
    None
}

impl RawConfig {
    /// Parse YAML text; unknown keys become warnings.
    pub(super) fn parse(
        text: &str,
        origin: &str,
        warnings: &mut Vec<String>,
    ) -> Result<RawConfig, ConfigError> {
        // Editors on Windows write a byte-order mark; YAML allows it at the start of a stream.
        let text = text.strip_prefix('\u{feff}').unwrap_or(text);
        if text.trim().is_empty() {
            return Ok(RawConfig::default());
        }
        let de = serde_yaml_ng::Deserializer::from_str(text);
        let mut unknown = Vec::new();
        let raw: RawConfig = serde_ignored::deserialize(de, |path| unknown.push(path.to_string()))
            .map_err(|e| parse_error(origin, text, &e))?;
        for key in unknown {
            if !is_lmcache_key(&key) {
                warnings.push(format!("{origin}: unknown config key `{key}` (ignored)"));
            }
        }
        Ok(raw)
    }

    /// Apply one environment variable if it is an `LMCACHE_*` override.
    pub(super) fn apply_env(
        &mut self,
        var: &str,
        value: &str,
        warnings: &mut Vec<String>,
    ) -> Result<(), ConfigError> {
        let Some(key) = var.strip_prefix("LMCACHE_") else {
            return Ok(());
        };
        let key = key.to_ascii_lowercase();
        if key == "extra_config" {
            let json: serde_json::Value =
                serde_json::from_str(value).map_err(|e| ConfigError::Parse {
                    origin: format!("environment variable {var}"),
                    location: String::new(),
                    message: format!("not a JSON object: {e}"),
                })?;
            let serde_json::Value::Object(map) = json else {
                return Err(ConfigError::Parse {
                    origin: format!("environment variable {var}"),
                    location: String::new(),
                    message: "expected a JSON object".to_string(),
                });
            };
            let extra = self.extra_config.get_or_insert_with(BTreeMap::new);
            for (k, v) in map {
                let v = serde_yaml_ng::to_value(v).unwrap_or(Value::Null);
                extra.insert(k, v);
            }
            return Ok(());
        }
        if !Self::FIELDS.contains(&key.as_str()) || key == "model" {
            if !is_lmcache_key(&key) && key != "config_file" {
                tracing::debug!(target: "kvhost::config", "environment variable {var} is not a config key kvhost reads");
            }
            return Ok(());
        }
        // LMCache unquotes quoted values; what remains is read as YAML (`[a, b]` is a list, `a,b` a string).
        let unquoted = ['"', '\'']
            .iter()
            .find_map(|q| value.strip_prefix(*q).and_then(|v| v.strip_suffix(*q)))
            .unwrap_or(value);
        let parsed: Value = serde_yaml_ng::from_str(unquoted)
            .unwrap_or_else(|_| Value::String(unquoted.to_string()));
        let mut map = serde_yaml_ng::Mapping::new();
        map.insert(Value::String(key.clone()), parsed);
        let one: RawConfig =
            serde_yaml_ng::from_value(Value::Mapping(map)).map_err(|e| ConfigError::Parse {
                origin: format!("environment variable {var}"),
                location: String::new(),
                message: format!("value `{value}`: {e}"),
            })?;
        if key == "external_backends" {
            warnings.push(format!("{var} is deprecated: use LMCACHE_STORAGE_PLUGINS"));
        }
        self.merge(one);
        Ok(())
    }
}
