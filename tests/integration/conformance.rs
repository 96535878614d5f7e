//! Every plugin in the repository passes the conformance suite through the real loader.

use crate::util::*;
use kvhost::conformance;

fn run(name: &str, module_path: &str, class: &str, options: &[(&str, &str)]) {
    let factory = || {
        let c = config_for(name, module_path, class, options);
        kvhost::loader::load(&c.plugins[0], &c)
    };
    let report = conformance::run(&factory);
    println!("conformance of {name}:\n{report}");
    assert!(
        report.passed(),
        "{name} failed conformance:\n{}",
        report.failures().join("\n")
    );
    assert!(report.checks.len() >= 12, "{report}");
}

#[test]
fn c_mem_plugin_conforms() {
    run("mem", "kvhost_mem", "mem", &[]);
}

#[test]
fn c_mem_plugin_conforms_when_slow() {
    run("mem_slow", "kvhost_mem", "mem", &[("delay_us", "200")]);
}

#[test]
fn c_log_plugin_conforms() {
    run("log", "kvhost_log", "log", &[]);
}

#[test]
fn rust_sdk_plugin_conforms() {
    run(
        "rust_mem",
        rust_fixture().to_str().unwrap(),
        "rust_mem",
        &[("put_delay_ms", "1")],
    );
}

#[test]
fn c_fixture_with_two_classes_conforms() {
    run("alpha", fixture("fx_multi").to_str().unwrap(), "alpha", &[]);
}

#[test]
fn an_undeclared_black_hole_fails_conformance() {
    // `beta` accepts puts and keeps nothing without advertising KVH_CAP_DISCARDS: a lost-data bug.
    let path = fixture("fx_multi");
    let factory = || {
        let c = config_for("beta", path.to_str().unwrap(), "beta", &[("size", "1")]);
        kvhost::loader::load(&c.plugins[0], &c)
    };
    let report = conformance::run(&factory);
    assert!(!report.passed(), "{report}");
    let failures = report.failures().join("\n");
    assert!(
        failures.contains("round_trip: contains item 0: expected present"),
        "{failures}"
    );
}

/// The README's plugins, built the way an outside author would (one `cc` line), pass conformance.
#[test]
fn readme_c_plugins_build_with_one_cc_line_and_conform() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = std::env::temp_dir().join(format!("kvhost-readme-{}", std::process::id()));
    std::fs::create_dir_all(&out).unwrap();
    for (file, class) in [("tiny.c", "tiny"), ("hello.c", "hello")] {
        let so = out.join(format!("lib{class}.so"));
        let status = std::process::Command::new("cc")
            .args([
                "-std=c11",
                "-shared",
                "-fPIC",
                "-O2",
                "-Wall",
                "-Wextra",
                "-Werror",
                "-pedantic",
                "-pthread",
                "-I",
            ])
            .arg(root.join("include"))
            .arg(root.join("examples/c_plugin").join(file))
            .arg("-o")
            .arg(&so)
            .status()
            .unwrap();
        assert!(status.success(), "cc {file}");
        run(class, so.to_str().unwrap(), class, &[]);
    }
}
