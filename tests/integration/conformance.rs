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

/// One `kvhost conformance` line of the README's conformance block, found by its `--class`.
fn readme_command(class: &str) -> String {
    let readme = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md"),
    )
    .expect("read README.md");
    let block = readme
        .split("<!-- conformance-commands: begin -->")
        .nth(1)
        .and_then(|rest| rest.split("<!-- conformance-commands: end -->").next())
        .expect("the README has a conformance-commands block");
    let wanted = format!("--class {class} ");
    block
        .lines()
        .find(|l| {
            l.starts_with("kvhost conformance ")
                && (l.contains(&wanted) || l.ends_with(&format!("--class {class}")))
        })
        .unwrap_or_else(|| panic!("no README conformance line for class {class}"))
        .to_string()
}

/// Runs the README's line for `class` in `sh` exactly as written, with the `kvhost` binary on PATH,
/// the workspace's plugins on KVHOST_PLUGIN_PATH and `env` set, and asserts it passes.
fn run_readme_command(class: &str, env: &[(&str, &str)]) -> String {
    let line = readme_command(class);
    let bin = crate::cli::binary();
    let path = format!(
        "{}:{}",
        bin.parent().unwrap().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let plugin_path = format!(
        "{}:{}",
        plugins_dir().display(),
        profile_dir().join("deps").display()
    );
    let scratch = std::env::temp_dir().join(format!(
        "kvhost-readme-conformance-{class}-{}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&scratch);
    std::fs::create_dir_all(&scratch).unwrap();
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(&line)
        .env("PATH", path)
        .env("KVHOST_PLUGIN_PATH", plugin_path)
        .env("SCRATCH", &scratch)
        .envs(env.iter().copied())
        .env_remove("RUST_LOG")
        .output()
        .expect("run sh");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = std::fs::remove_dir_all(&scratch);
    println!("$ {line}\n{text}");
    assert!(out.status.success(), "`{line}` failed:\n{text}");
    assert!(text.contains(" 0 failed"), "{text}");
    text
}

#[test]
fn readme_conformance_line_for_mem_passes() {
    let text = run_readme_command("mem", &[]);
    assert!(text.contains("PASS  remove_pinned"), "{text}");
    assert!(text.contains("PASS  capacity"), "{text}");
}

#[test]
fn readme_conformance_line_for_log_passes() {
    run_readme_command("log", &[]);
}

#[test]
fn readme_conformance_line_for_fs_passes() {
    // The suite makes a second instance on the same directory after destroying the first.
    let text = run_readme_command("fs", &[]);
    assert!(text.contains("PASS  destroy_in_flight"), "{text}");
    assert!(text.contains("PASS  clear"), "{text}");
    assert!(text.contains("PASS  capacity"), "{text}");
}

#[test]
fn readme_conformance_line_for_logstore_passes() {
    let text = run_readme_command("logstore", &[]);
    assert!(text.contains("PASS  destroy_in_flight"), "{text}");
    assert!(text.contains("PASS  capacity"), "{text}");
}

#[test]
#[cfg_attr(
    not(has_redis),
    ignore = "needs redis-server (apt-get install redis-server)"
)]
fn readme_conformance_line_for_redis_passes() {
    if !crate::redis::have_redis("readme_conformance_line_for_redis_passes") {
        return;
    }
    let server = crate::redis::Server::start(&[]);
    let text = run_readme_command("redis", &[("REDIS_URL", &server.url())]);
    assert!(text.contains("PASS  contains_async"), "{text}");
}

#[test]
#[cfg_attr(
    not(has_ceph),
    ignore = "needs Ceph and librados-dev (apt-get install ceph-mon ceph-osd ceph-common uuid-runtime librados-dev)"
)]
fn readme_conformance_line_for_rados_passes() {
    if !crate::rados::ceph_available("readme_conformance_line_for_rados_passes") {
        return;
    }
    let cluster = crate::rados::shared_cluster();
    run_readme_command("rados", &[("CEPH_CONF", cluster.conf())]);
}

/// `--list`, `--check`, `--timeout` and `--json` do what `--help` says.
#[test]
fn conformance_command_lists_selects_and_reports_json() {
    let bin = crate::cli::binary();
    let list = std::process::Command::new(bin)
        .args(["conformance", "--list"])
        .output()
        .unwrap();
    let listed = String::from_utf8_lossy(&list.stdout).to_string();
    assert!(list.status.success(), "{listed}");
    for c in conformance::list() {
        assert!(
            listed.contains(c.name) && listed.contains(c.proves),
            "{listed}"
        );
    }
    let out = std::process::Command::new(bin)
        .args(["conformance", "--plugin", "kvhost_mem", "--class", "mem"])
        .args(["--check", "round_trip", "--check", "remove_pinned"])
        .args(["--timeout", "5", "--json"])
        .env("KVHOST_PLUGIN_PATH", plugins_dir())
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    let names: Vec<&str> = report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["create", "round_trip", "remove_pinned"]);
    assert_eq!(report["passed"], true);
    assert_eq!(report["counts"]["fail"], 0);
    let bad = std::process::Command::new(bin)
        .args(["conformance", "--plugin", "kvhost_mem", "--class", "mem"])
        .args(["--check", "no_such_check"])
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("no such check: no_such_check"));
    // The black hole fails in JSON too, with exit code 1.
    let beta = fixture("fx_multi");
    let out = std::process::Command::new(bin)
        .args([
            "conformance",
            "--plugin",
            beta.to_str().unwrap(),
            "--class",
            "beta",
        ])
        .args(["-o", "size=1", "--json"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["passed"], false);
    assert!(report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .any(|c| c["name"] == "round_trip" && c["outcome"] == "fail"));
}

/// A completion that never comes fails its check after `--timeout`, not after 20 s.
#[test]
fn a_hung_completion_fails_after_the_given_timeout() {
    // mem's `delay_us` holds every queued operation that long: 3 s against a 0.3 s timeout.
    let bin = crate::cli::binary();
    let started = std::time::Instant::now();
    let out = std::process::Command::new(bin)
        .args(["conformance", "--plugin", "kvhost_mem", "--class", "mem"])
        .args([
            "-o",
            "delay_us=3000000",
            "--check",
            "round_trip",
            "--timeout",
            "0.3",
        ])
        .env("KVHOST_PLUGIN_PATH", plugins_dir())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("FAIL  round_trip"), "{text}");
    // Destroy waits for the delayed operation; the whole run still ends well before 20 s.
    assert!(
        started.elapsed() < std::time::Duration::from_secs(15),
        "{text}"
    );
}

/// A store that reports a capacity it does not enforce fails the capacity check.
#[test]
fn a_store_that_holds_more_than_its_capacity_fails() {
    let path = rust_fixture();
    let factory = || {
        let c = config_for(
            "rust_mem",
            path.to_str().unwrap(),
            "rust_mem",
            &[("claimed_capacity_bytes", "1048576")],
        );
        kvhost::loader::load(&c.plugins[0], &c)
    };
    let options = conformance::Options {
        only: vec!["capacity".to_string()],
        ..Default::default()
    };
    let report = conformance::run_with(&factory, &options);
    assert!(!report.passed(), "{report}");
    let failures = report.failures().join("\n");
    assert!(
        failures.contains("neither evicted nor refused"),
        "{failures}"
    );
}

/// `{instance}` in an option value gives each instance the suite makes a place of its own.
#[test]
fn instance_placeholders_give_each_instance_its_own_directory() {
    let dir = std::env::temp_dir().join(format!("kvhost-instance-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let path = format!("path={}/fs-{{instance}}", dir.display());
    let so = crate::util::rust_plugin("kvhost_fs");
    let out = std::process::Command::new(crate::cli::binary())
        .args([
            "conformance",
            "--plugin",
            so.to_str().unwrap(),
            "--class",
            "fs",
            "-o",
            &path,
        ])
        .args([
            "--check",
            "destroy_in_flight",
            "--check",
            "create_after_destroy",
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{text}");
    // create (1), then the fresh instance after destroy_in_flight (2).
    for n in [1, 2] {
        assert!(
            dir.join(format!("fs-{n}")).is_dir(),
            "fs-{n} missing: {text}"
        );
    }
    assert!(!dir.join("fs-3").exists());
    let _ = std::fs::remove_dir_all(&dir);
}

/// The stats check holds well-known names to the kinds the header gives them.
#[test]
fn a_well_known_stat_of_the_wrong_kind_fails_the_stats_check() {
    let path = fixture("fx_bad_stats");
    let run = |mode: &str| {
        let factory = || {
            let c = config_for(
                "bad",
                path.to_str().unwrap(),
                "bad_stats",
                &[("mode", mode)],
            );
            kvhost::loader::load(&c.plugins[0], &c)
        };
        let options = conformance::Options {
            only: vec!["stats".to_string()],
            ..Default::default()
        };
        conformance::run_with(&factory, &options)
    };
    let good = run("good");
    assert!(good.passed(), "{good}");
    let wrong = run("wrong_kind");
    let failures = wrong.failures().join("\n");
    assert!(
        failures.contains("stats: `evictions` is a Gauge; the header makes it a Counter"),
        "{wrong}"
    );
}
