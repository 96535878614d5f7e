//! Bad configuration files, each through the real path the binary takes: read the file, load plugins.

use crate::util::*;
use kvhost::config::Config;
use kvhost::loader;
use std::path::PathBuf;

fn write_config(name: &str, text: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kvhost-badcfg-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("kvhost.yaml");
    std::fs::write(&path, text).unwrap();
    path
}

/// Load config and plugins; return the first error's text.
fn error_of(name: &str, text: &str) -> String {
    let path = write_config(name, text);
    let config = match Config::from_file(&path) {
        Ok(c) => c,
        Err(e) => return e.to_string(),
    };
    match loader::load_all(&config) {
        Ok(_) => panic!("config `{name}` loaded but should fail:\n{text}"),
        Err(e) => e.to_string(),
    }
}

fn plugin_yaml(module_path: &str, class: &str, extra: &str) -> String {
    format!(
        "chunk_size: 256\nstorage_plugins: [mem]\nextra_config:\n  storage_plugin.mem.module_path: {module_path}\n  \
         storage_plugin.mem.class_name: {class}\n{extra}"
    )
}

#[test]
fn malformed_yaml_names_file_line_and_column() {
    let e = error_of(
        "malformed",
        "chunk_size: 256\nstorage_plugins: [mem\nlocal_cpu: true\n",
    );
    assert!(e.contains("kvhost.yaml:"), "{e}");
    assert!(e.contains("config "), "{e}");
}

#[test]
fn wrong_type_names_the_key_and_position() {
    let e = error_of("types", "chunk_size: many\n");
    assert!(
        e.contains("kvhost.yaml:1:") && e.contains("chunk_size"),
        "{e}"
    );
}

#[test]
fn missing_module_path_is_named() {
    let e = error_of(
        "no-module",
        "storage_plugins: [mem]\nextra_config:\n  storage_plugin.mem.class_name: mem\n",
    );
    assert!(
        e.contains("plugin `mem`: missing `extra_config.storage_plugin.mem.module_path`"),
        "{e}"
    );
}

#[test]
fn nonexistent_library_lists_the_path_relative_to_the_config() {
    let e = error_of("no-so", &plugin_yaml("./plugins/libnope.so", "mem", ""));
    assert!(
        e.contains("no library for module_path `./plugins/libnope.so`"),
        "{e}"
    );
    assert!(
        e.contains("kvhost-badcfg-") && e.contains("libnope.so"),
        "resolved against the config dir: {e}"
    );
}

#[test]
fn wrong_class_name_is_a_missing_entry_point() {
    let so = plugins_dir().join("libkvhost_mem.so");
    let e = error_of("class", &plugin_yaml(so.to_str().unwrap(), "memory", ""));
    assert!(
        e.contains("no entry point `kvh_plugin_memory_v1`") && e.contains("kvh_plugin_mem_v1"),
        "{e}"
    );
}

#[test]
fn unknown_option_lists_accepted_ones() {
    let e = error_of(
        "option",
        &plugin_yaml("kvhost_mem", "mem", "  storage_plugin.mem.capacity_gb: 3\n"),
    );
    assert!(
        e.contains("unknown option `capacity_gb`") && e.contains("capacity_bytes"),
        "{e}"
    );
}

#[test]
fn invalid_option_value_is_refused_by_the_plugin() {
    let e = error_of(
        "value",
        &plugin_yaml(
            "kvhost_mem",
            "mem",
            "  storage_plugin.mem.capacity_bytes: lots\n",
        ),
    );
    assert!(
        e.contains("create failed: INVALID_CONFIG") && e.contains("capacity_bytes"),
        "{e}"
    );
}

#[test]
fn duplicate_plugin_name_is_refused() {
    let e = error_of(
        "dup",
        &plugin_yaml("kvhost_mem", "mem", "").replace("[mem]", "[mem, mem]"),
    );
    assert!(e.contains("duplicate plugin name `mem`"), "{e}");
}
