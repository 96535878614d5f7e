use super::*;

fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

const TWO_PLUGINS: &str = r#"
chunk_size: 128
storage_plugins: [zeta, alpha]
extra_config:
  storage_plugin.zeta.module_path: ./libz.so
  storage_plugin.zeta.class_name: z
  storage_plugin.zeta.capacity_bytes: 1024
  storage_plugin.alpha.module_path: alpha
  storage_plugin.alpha.class_name: a
  storage_plugin.alpha.hosts: [h1, h2]
"#;

#[test]
fn keeps_config_order_and_collects_options() {
    let c = Config::from_yaml(TWO_PLUGINS, Some(Path::new("/etc/kv/c.yaml"))).unwrap();
    assert_eq!(c.chunk_size, 128);
    let names: Vec<_> = c.plugins.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(
        names,
        ["zeta", "alpha"],
        "order is the storage_plugins order, not sorted"
    );
    assert_eq!(
        c.plugins[0].options,
        vec![("capacity_bytes".to_string(), "1024".to_string())]
    );
    assert_eq!(
        c.plugins[1].options,
        vec![("hosts".to_string(), "h1,h2".to_string())]
    );
    assert_eq!(c.base_dir(), PathBuf::from("/etc/kv"));
}

#[test]
fn comma_string_list_and_priority_override() {
    let y = TWO_PLUGINS.replace("[zeta, alpha]", "\"zeta, alpha\"")
        + "  storage_plugin.alpha.priority: -1\n";
    let c = Config::from_yaml(&y, None).unwrap();
    let names: Vec<_> = c.plugins.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["alpha", "zeta"]);
    assert!(
        c.plugins[0].options.iter().all(|(k, _)| k != "priority"),
        "priority is the host's, not an option"
    );
}

#[test]
fn type_errors_carry_line_and_column() {
    let err = Config::from_yaml(
        "chunk_size: 256\nlocal_cpu: maybe\n",
        Some(Path::new("x.yaml")),
    )
    .unwrap_err();
    let msg = err.to_string();
    assert!(msg.starts_with("config x.yaml:2:"), "{msg}");
    assert!(msg.contains("local_cpu"), "{msg}");
}

#[test]
fn malformed_yaml_is_reported_with_location() {
    let err = Config::from_yaml(
        "storage_plugins: [a, b\nchunk_size: 1\n",
        Some(Path::new("bad.yaml")),
    )
    .unwrap_err();
    assert!(matches!(err, ConfigError::Parse { .. }), "{err}");
    assert!(err.to_string().contains("bad.yaml:"), "{err}");
}

#[test]
fn unknown_keys_warn_lmcache_keys_do_not() {
    let c = Config::from_yaml(
        "chunk_sise: 3\nremote_serde: naive\nlocal_disk: /tmp\n",
        None,
    )
    .unwrap();
    assert_eq!(c.warnings.len(), 1, "{:?}", c.warnings);
    assert!(c.warnings[0].contains("chunk_sise"));
}

#[test]
fn missing_module_path_and_duplicates_are_errors() {
    let e = Config::from_yaml(
        "storage_plugins: [a]\nextra_config:\n  storage_plugin.a.class_name: x\n",
        None,
    )
    .unwrap_err();
    assert!(
        e.to_string()
            .contains("plugin `a`: missing `extra_config.storage_plugin.a.module_path`"),
        "{e}"
    );
    let e = Config::from_yaml(
        &TWO_PLUGINS.replace("[zeta, alpha]", "[zeta, alpha, zeta]"),
        None,
    )
    .unwrap_err();
    assert!(
        e.to_string().contains("duplicate plugin name `zeta`"),
        "{e}"
    );
    let e = Config::from_yaml("storage_plugins: [LocalCPUBackend]\n", None).unwrap_err();
    assert!(e.to_string().contains("reserved"), "{e}");
}

#[test]
fn legacy_external_backends_still_work_with_warning() {
    let y = "external_backends: old\nextra_config:\n  external_backend.old.module_path: o\n  external_backend.old.class_name: o\n";
    let c = Config::from_yaml(y, None).unwrap();
    assert_eq!(c.plugins[0].name, "old");
    assert!(
        c.warnings.iter().any(|w| w.contains("deprecated")),
        "{:?}",
        c.warnings
    );
}

#[test]
fn environment_overrides() {
    let e = env(&[
        ("LMCACHE_CHUNK_SIZE", "512"),
        ("LMCACHE_STORAGE_PLUGINS", "alpha"),
        (
            "LMCACHE_EXTRA_CONFIG",
            r#"{"storage_plugin.alpha.hosts": "h9"}"#,
        ),
        ("LMCACHE_LOCAL_CPU", "\"false\""),
        ("HOME", "/root"),
    ]);
    let c = Config::from_yaml_with_env(TWO_PLUGINS, None, e).unwrap();
    assert_eq!(c.chunk_size, 512);
    assert!(!c.local_cpu);
    assert_eq!(c.plugins.len(), 1);
    assert_eq!(
        c.plugins[0].options,
        vec![("hosts".to_string(), "h9".to_string())]
    );
    assert!(
        c.warnings.iter().any(|w| w.contains("zeta")),
        "{:?}",
        c.warnings
    );
    let bad =
        Config::from_yaml_with_env("", None, env(&[("LMCACHE_CHUNK_SIZE", "lots")])).unwrap_err();
    assert!(bad.to_string().contains("LMCACHE_CHUNK_SIZE"), "{bad}");
}

#[test]
fn embedded_default_parses() {
    let c = Config::from_yaml(DEFAULT_CONFIG_YAML, None).unwrap();
    assert_eq!(c.plugins.len(), 2);
    assert!(c.warnings.is_empty(), "{:?}", c.warnings);
    assert_eq!(c.full_chunk_bytes(), 2 * 32 * 256 * 8 * 128 * 2);
}

#[test]
fn copy_threads_reaches_the_hot_cache_and_defaults_to_one_per_core() {
    use crate::chain::ChainSettings;
    let c = Config::from_yaml("copy_threads: 0\n", None).unwrap();
    assert_eq!(c.copy_threads, Some(0));
    assert_eq!(ChainSettings::from_config(&c).cache.copy_threads, 0);
    let d = Config::from_yaml("", None).unwrap();
    assert_eq!(d.copy_threads, None);
    assert_eq!(
        ChainSettings::from_config(&d).cache.copy_threads,
        crate::cache::CopyPool::default_threads()
    );
    let bad = Config::from_yaml("copy_threads: many\n", None).unwrap_err();
    assert!(bad.to_string().contains("copy_threads"), "{bad}");
}

// Item 8 of issue 13: configs `check` passed that could not run, or refused that were valid.

const GIB: u64 = 1 << 30;

#[test]
fn hot_cache_larger_than_memory_is_refused_naming_key_and_both_numbers() {
    let err = Config::load(
        "max_local_cpu_size: 1e12\n",
        Some(Path::new("big.yaml")),
        std::iter::empty(),
        Some(16 * GIB),
    )
    .unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("max_local_cpu_size"), "{msg}");
    assert!(msg.contains("1000000000000 GiB"), "{msg}");
    assert!(msg.contains(&(16 * GIB).to_string()), "{msg}");
    let ok = Config::load(
        "max_local_cpu_size: 15\n",
        None,
        std::iter::empty(),
        Some(16 * GIB),
    )
    .unwrap();
    assert_eq!(ok.max_local_cpu_size, 15.0);
    // The real loader checks the real machine.
    let err = Config::from_yaml("max_local_cpu_size: 1e12\n", None).unwrap_err();
    assert!(err.to_string().contains("machine's memory"), "{err}");
}

#[test]
fn environment_cannot_slip_an_oversized_hot_cache_past_the_check() {
    let err = Config::load(
        "",
        None,
        env(&[("LMCACHE_MAX_LOCAL_CPU_SIZE", "64")]),
        Some(16 * GIB),
    )
    .unwrap_err();
    assert!(
        err.to_string().contains("max_local_cpu_size 64 GiB"),
        "{err}"
    );
}

#[test]
fn empty_plugin_name_is_an_error_naming_its_position() {
    let err = Config::from_yaml("storage_plugins: ['']\n", None).unwrap_err();
    assert!(
        err.to_string()
            .contains("storage_plugins[0]: the plugin name is empty"),
        "{err}"
    );
    let err = Config::from_yaml(
        "storage_plugins: [a, '  ']\nextra_config:\n  storage_plugin.a.module_path: m\n  storage_plugin.a.class_name: c\n",
        None,
    )
    .unwrap_err();
    assert!(err.to_string().contains("storage_plugins[1]"), "{err}");
    let err = Config::from_yaml("external_backends: ['']\n", None).unwrap_err();
    assert!(err.to_string().contains("external_backends[0]"), "{err}");
}

#[test]
fn comma_string_drops_empty_entries_like_lmcache() {
    let c = Config::from_yaml("storage_plugins: ''\n", None).unwrap();
    assert!(c.plugins.is_empty());
}

#[test]
fn leading_byte_order_mark_is_accepted() {
    for text in [
        "\u{feff}chunk_size: 128\n",
        "\u{feff}---\nchunk_size: 128\n",
    ] {
        let c = Config::from_yaml(text, Some(Path::new("bom.yaml")))
            .unwrap_or_else(|e| panic!("{text:?}: {e}"));
        assert_eq!(c.chunk_size, 128);
    }
}

#[test]
fn duplicate_key_is_reported_at_its_line() {
    let err = Config::from_yaml(
        "# comment\nchunk_size: 256\nlocal_cpu: true\nchunk_size: 128\n",
        Some(Path::new("dup.yaml")),
    )
    .unwrap_err()
    .to_string();
    assert!(err.starts_with("config dup.yaml:4:1:"), "{err}");
    assert!(err.contains("chunk_size"), "{err}");
    let err = Config::from_yaml(
        "model:\n  name: a\n  num_layers: 2\nchunk_size: 16\nmodel2:\n  x: 1\n",
        None,
    );
    assert!(err.is_ok(), "no duplicate: {err:?}");
    let err = Config::from_yaml(
        "model:\n  name: a\n  num_layers: 2\n  name: b\n",
        Some(Path::new("m.yaml")),
    )
    .unwrap_err()
    .to_string();
    assert!(err.starts_with("config m.yaml:4:3:"), "{err}");
}

#[test]
fn legacy_and_new_plugin_lists_naming_one_plugin_name_both_keys() {
    let err = Config::from_yaml(
        "storage_plugins: [a]\nexternal_backends: [a]\nextra_config:\n  storage_plugin.a.module_path: m\n  storage_plugin.a.class_name: c\n",
        None,
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("`storage_plugins` (position 0)")
            && err.contains("`external_backends` (position 0)"),
        "{err}"
    );
    assert!(!err.contains("positions 0 and 1"), "{err}");
}

#[test]
fn each_unknown_key_is_warned_once() {
    let c = Config::from_yaml("chunk_size: 16\nbogus: 1\n", None).unwrap();
    let n = c.warnings.iter().filter(|w| w.contains("bogus")).count();
    assert_eq!(n, 1, "{:?}", c.warnings);
}

#[test]
fn breaker_keys_have_defaults_and_are_checked() {
    let c = Config::from_yaml("blocking_timeout_secs: 4\n", None).unwrap();
    assert_eq!(
        c.tier_put_deadline_secs, 4.0,
        "defaults to blocking_timeout_secs"
    );
    assert_eq!(c.tier_max_inflight_bytes, None);
    assert_eq!(c.tier_breaker_failures, 5);
    let c = Config::from_yaml(
        "tier_max_inflight_bytes: 1048576\ntier_put_deadline_secs: 0.5\ntier_breaker_failures: 0\n",
        None,
    )
    .unwrap();
    assert_eq!(
        (
            c.tier_max_inflight_bytes,
            c.tier_put_deadline_secs,
            c.tier_breaker_failures
        ),
        (Some(1 << 20), 0.5, 0)
    );
    for (text, key) in [
        ("tier_put_deadline_secs: 0\n", "tier_put_deadline_secs"),
        ("tier_put_deadline_secs: .nan\n", "tier_put_deadline_secs"),
        ("tier_breaker_probe_secs: -1\n", "tier_breaker_probe_secs"),
        ("tier_max_inflight_bytes: 0\n", "tier_max_inflight_bytes"),
    ] {
        let err = Config::from_yaml(text, None).unwrap_err().to_string();
        assert!(err.contains(key), "{text}: {err}");
    }
}

/// Found by the config fuzz target: a negative duration passed the loader and panicked in
/// `Duration::from_secs_f64` when a command built the chain settings.
#[test]
fn durations_that_would_panic_are_refused_by_the_loader() {
    for text in [
        "pin_timeout_sec: -1\n",
        "pin_check_interval_sec: -0.5\n",
        "blocking_timeout_secs: -1\n",
        "blocking_timeout_secs: 0\n",
        "blocking_timeout_secs: 1e300\n",
        "pin_timeout_sec: .inf\n",
    ] {
        let key = text.split(':').next().unwrap();
        let err = Config::from_yaml(text, None).unwrap_err().to_string();
        assert!(
            err.contains(key) && err.contains("number of seconds"),
            "{text}: {err}"
        );
    }
    let c = Config::from_yaml("pin_timeout_sec: 0\npin_check_interval_sec: 0\n", None).unwrap();
    let _ = crate::chain::ChainSettings::from_config(&c);
}
