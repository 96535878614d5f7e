//! The loader's checks, each against a fixture plugin with exactly one defect.

use crate::util::*;
use kvhost::config::{Config, OnPluginError};
use kvhost::loader;

fn load_fixture(file: &str, class: &str, options: &[(&str, &str)]) -> String {
    let path = fixture(file);
    match load("fx", path.to_str().unwrap(), class, options) {
        Ok(_) => panic!("{file}/{class} loaded but should not have"),
        Err(e) => e,
    }
}

fn assert_has(msg: &str, parts: &[&str]) {
    for p in parts {
        assert!(msg.contains(p), "expected `{p}` in:\n{msg}");
    }
}

#[test]
fn wrong_abi_major_symbol_is_a_clean_miss_with_a_hint() {
    let e = load_fixture("fx_abi_v2", "abi_v2", &[]);
    assert_has(
        &e,
        &[
            "plugin `fx`",
            "libfx_abi_v2.so",
            "no entry point `kvh_plugin_abi_v2_v1`",
            "kvh_plugin_abi_v2_v2",
            "another ABI major",
        ],
    );
}

#[test]
fn descriptor_with_wrong_major_is_refused() {
    let e = load_fixture("fx_bad_major", "bad_major", &[]);
    assert_has(
        &e,
        &[
            "libfx_bad_major.so",
            "ABI check failed",
            "ABI major 2 but this host speaks 1",
        ],
    );
}

#[test]
fn short_descriptor_is_refused() {
    let e = load_fixture("fx_short_size", "short_size", &[]);
    assert_has(
        &e,
        &["descriptor struct_size is 40 bytes", "64 bytes of ABI 1.0"],
    );
}

#[test]
fn short_vtable_is_refused() {
    let e = load_fixture("fx_short_vtable", "short_vtable", &[]);
    assert_has(&e, &["vtable struct_size is 48 bytes"]);
}

#[test]
fn null_required_function_is_named() {
    let e = load_fixture("fx_null_fn", "null_fn", &[]);
    assert_has(&e, &["required vtable function(s) are NULL: get"]);
}

#[test]
fn capability_without_function_is_refused() {
    let e = load_fixture("fx_cap_no_fn", "cap_no_fn", &[]);
    assert_has(
        &e,
        &["capability `pin` is advertised but pin/unpin is NULL"],
    );
}

#[test]
fn capability_past_the_plugins_vtable_is_refused() {
    let e = load_fixture("fx_cap_past_vtable", "cap_past_vtable", &[]);
    assert_has(
        &e,
        &["capability `async_contains` is advertised but the vtable (112 bytes) predates it (ABI 1.2, 128 bytes)"],
    );
}

#[test]
fn create_failure_carries_the_plugins_message() {
    let e = load_fixture(
        "fx_create_fails",
        "create_fails",
        &[("endpoint", "tcp://192.0.2.7:4000")],
    );
    assert_has(
        &e,
        &[
            "plugin `fx`",
            "create failed: UNAVAILABLE (-16)",
            "cannot reach store at tcp://192.0.2.7:4000: connection refused",
        ],
    );
}

#[test]
fn missing_required_option_is_reported_before_create() {
    let e = load_fixture("fx_create_fails", "create_fails", &[]);
    assert_has(
        &e,
        &[
            "missing required option `endpoint`",
            "where the store lives",
        ],
    );
}

#[test]
fn entry_point_returning_null_is_refused() {
    let e = load_fixture("fx_null_desc", "null_desc", &[]);
    assert_has(&e, &["kvh_plugin_null_desc_v1 returned NULL"]);
}

#[test]
fn descriptor_for_another_class_is_refused() {
    let e = load_fixture("fx_wrong_class", "wrong_class", &[]);
    assert_has(&e, &["class `something_else`, not `wrong_class`"]);
}

#[test]
fn a_library_that_is_not_a_plugin_says_so() {
    let e = load_fixture("fx_not_a_plugin", "anything", &[]);
    assert_has(
        &e,
        &[
            "no entry point `kvh_plugin_anything_v1`",
            "exports no kvh_plugin_* symbols",
        ],
    );
}

#[test]
fn wrong_class_name_lists_the_classes_exported() {
    let e = load_fixture("fx_multi", "gamma", &[]);
    assert_has(
        &e,
        &[
            "no entry point `kvh_plugin_gamma_v1`",
            "kvh_plugin_alpha_v1, kvh_plugin_beta_v1",
            "check class_name",
        ],
    );
}

#[test]
fn one_library_exports_two_classes_with_their_own_schemas() {
    let path = fixture("fx_multi");
    let a = must_load("a", path.to_str().unwrap(), "alpha", &[]);
    assert_eq!(
        a.info().options,
        vec![("color".to_string(), "red".to_string())],
        "default applied"
    );
    let b = must_load("b", path.to_str().unwrap(), "beta", &[("size", "3")]);
    assert_eq!(b.info().class_name, "beta");
    let e = load("c", path.to_str().unwrap(), "alpha", &[("colour", "blue")]).unwrap_err();
    assert_has(&e, &["unknown option `colour`", "accepted: color"]);
    let e = load("d", path.to_str().unwrap(), "beta", &[]).unwrap_err();
    assert_has(&e, &["missing required option `size`"]);
}

#[test]
fn rust_plugin_with_a_different_layout_is_refused_by_abi_stable() {
    let path = rust_fixture();
    let e = load("sk", path.to_str().unwrap(), "skewed", &[]).unwrap_err();
    assert_has(&e, &["abi_stable layout check", "capabilities"]);
}

#[test]
fn rust_plugin_built_with_the_sdk_passes_the_layout_check() {
    let path = rust_fixture();
    let p = must_load("rm", path.to_str().unwrap(), "rust_mem", &[]);
    assert_eq!(p.info().class_name, "rust_mem");
}

#[test]
fn missing_library_lists_every_path_searched() {
    let e = load("ghost", "no_such_plugin", "ghost", &[]).unwrap_err();
    assert_has(
        &e,
        &[
            "plugin `ghost`: no library for module_path `no_such_plugin`",
            "libno_such_plugin.so",
            "no_such_plugin.so",
        ],
    );
    assert!(
        e.contains(
            &plugins_dir()
                .join("libno_such_plugin.so")
                .display()
                .to_string()
        ),
        "{e}"
    );
    let e = load("ghost", "/nonexistent/dir/libx.so", "x", &[]).unwrap_err();
    assert_has(&e, &["/nonexistent/dir/libx.so"]);
}

#[test]
fn a_file_that_is_not_a_shared_library_is_reported_by_dlopen() {
    let dir = std::env::temp_dir().join(format!("kvhost-junk-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let junk = dir.join("libjunk.so");
    std::fs::write(&junk, b"this is not ELF").unwrap();
    let e = load("junk", junk.to_str().unwrap(), "junk", &[]).unwrap_err();
    assert_has(&e, &["plugin `junk`", "cannot open library"]);
}

#[test]
fn bare_names_are_found_in_the_plugin_directory() {
    let p = must_load("m", "kvhost_mem", "mem", &[]);
    assert_eq!(p.info().path, plugins_dir().join("libkvhost_mem.so"));
    // The dotted (LMCache module) form resolves to the last component too.
    let p = must_load("l", "kvhost.plugins.kvhost_log", "log", &[]);
    assert_eq!(p.info().class_name, "log");
}

#[test]
fn plugins_load_in_config_order_and_skip_policy_keeps_going() {
    let y = |order: &str, policy: &str| {
        format!(
            "storage_plugins: [{order}]\non_plugin_error: {policy}\nextra_config:\n  \
             storage_plugin.mem.module_path: kvhost_mem\n  storage_plugin.mem.class_name: mem\n  \
             storage_plugin.log.module_path: kvhost_log\n  storage_plugin.log.class_name: log\n  \
             storage_plugin.bad.module_path: {}\n  storage_plugin.bad.class_name: null_fn\n",
            fixture("fx_null_fn").display()
        )
    };
    let c = Config::from_yaml(&y("log, mem", "fail"), None).unwrap();
    let (loaded, _) = loader::load_all(&c).unwrap();
    assert_eq!(
        loaded.iter().map(|p| p.name()).collect::<Vec<_>>(),
        ["log", "mem"]
    );
    let c = Config::from_yaml(&y("mem, bad, log", "skip"), None).unwrap();
    assert_eq!(c.on_plugin_error, OnPluginError::Skip);
    let (loaded, skipped) = loader::load_all(&c).unwrap();
    assert_eq!(
        loaded.iter().map(|p| p.name()).collect::<Vec<_>>(),
        ["mem", "log"]
    );
    assert_eq!(skipped.len(), 1);
    assert!(skipped[0].error.to_string().contains("NULL: get"));
    let c = Config::from_yaml(&y("mem, bad, log", "fail"), None).unwrap();
    let e = loader::load_all(&c).unwrap_err();
    assert!(e.to_string().contains("plugin `bad`"), "{e}");
}

#[test]
fn a_plugin_built_against_abi_1_0_loads_and_lacks_clear() {
    let path = fixture("fx_abi_1_0");
    let p = must_load("old", path.to_str().unwrap(), "abi_1_0", &[]);
    assert_eq!(p.info().abi, (1, 0));
    let e = p.clear().unwrap_err();
    assert_eq!(e.status, kvhost::plugin::Status::UNSUPPORTED);
    let factory = || {
        let c = config_for("old", path.to_str().unwrap(), "abi_1_0", &[]);
        loader::load(&c.plugins[0], &c)
    };
    let report = kvhost::conformance::run(&factory);
    assert!(report.passed(), "{report}");
}

/// The header's rule: an optional option without a default that the config does not give is absent
/// from what `create` receives (not present with an empty value); defaults and given values are there.
#[test]
fn an_optional_option_without_a_default_is_absent_when_not_given() {
    use kvhost::plugin::OptionInfo;
    let spec = |key: &str, default: Option<&str>, required: bool| OptionInfo {
        key: key.to_string(),
        default: default.map(str::to_string),
        doc: String::new(),
        required,
        secret: false,
    };
    let schema = [
        spec("path", None, true),
        spec("label", None, false),
        spec("size", Some("4"), false),
    ];
    let given = [("path".to_string(), "/x".to_string())];
    let got = loader::validate_options(&given, &schema).unwrap();
    assert_eq!(
        got,
        [
            ("path".to_string(), "/x".to_string()),
            ("size".to_string(), "4".to_string())
        ]
    );
    let given = [
        ("path".to_string(), "/x".to_string()),
        ("label".to_string(), String::new()),
    ];
    let got = loader::validate_options(&given, &schema).unwrap();
    assert!(
        got.contains(&("label".to_string(), String::new())),
        "{got:?}"
    );
}
