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
