//! The `kvhost` Python package (`python/`) inside the inference stack: its pytest suite, run with the
//! interpreters of real LMCache 0.5.6 and SGLang installs.
//!
//! Each test builds and installs the package into that virtualenv first (`pip install ./python`, once
//! per interpreter per run: maturin, release build), then runs one pytest file with this build's
//! plugins and fixtures. LMCache lives in `~/.cache/kvhost/lmcache-venv` (or `$KVHOST_LMCACHE_PYTHON`),
//! SGLang in `~/.cache/kvhost/sglang-venv` (or `$KVHOST_SGLANG_PYTHON`); `.ci/test-all` creates both.
//! A test whose virtualenv is missing is reported *ignored* with the reason, unless
//! `KVHOST_REQUIRE_LMCACHE=1` / `KVHOST_REQUIRE_SGLANG=1`, where it runs and fails.

use crate::util::{plugins_dir, profile_dir};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, OnceLock};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("repository root")
        .to_path_buf()
}

fn venv_python(var: &str, venv: &str) -> Option<PathBuf> {
    let p = std::env::var_os(var).map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
            .join(".cache/kvhost")
            .join(venv)
            .join("bin/python")
    });
    p.is_file().then_some(p)
}

/// The interpreter for `engine`; fails the test, naming what is missing, without one.
fn interpreter(engine: &str, test: &str) -> Option<PathBuf> {
    let (var, venv, require) = match engine {
        "lmcache" => (
            "KVHOST_LMCACHE_PYTHON",
            "lmcache-venv",
            "KVHOST_REQUIRE_LMCACHE",
        ),
        _ => (
            "KVHOST_SGLANG_PYTHON",
            "sglang-venv",
            "KVHOST_REQUIRE_SGLANG",
        ),
    };
    let found = venv_python(var, venv);
    // Tests without their virtualenv are ignored at build time (`has_lmcache`/`has_sglang`,
    // tests/build.rs); one that runs anyway ({require}=1, or the venv removed since) fails here.
    assert!(
        found.is_some(),
        "Python test `{test}`: no {engine} virtualenv (~/.cache/kvhost/{venv} or ${var}); \
         .ci/test-all creates it ({require}={})",
        std::env::var(require).unwrap_or_default()
    );
    found
}

/// Build and install the package into `python`'s environment, once per interpreter per test run.
fn install(python: &Path) -> Result<(), String> {
    static DONE: OnceLock<Mutex<HashMap<PathBuf, Result<(), String>>>> = OnceLock::new();
    let mut done = DONE.get_or_init(Default::default).lock().unwrap();
    if let Some(r) = done.get(python) {
        return r.clone();
    }
    let bin = python.parent().expect("venv bin dir");
    let path = std::env::join_paths(std::iter::once(bin.to_path_buf()).chain(
        std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()),
    ))
    .expect("PATH");
    let run = |args: &[&str]| -> Result<(), String> {
        let out = Command::new(python)
            .args(args)
            .env("PATH", &path)
            .current_dir(repo())
            .output()
            .map_err(|e| format!("cannot run {}: {e}", python.display()))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "`{} {}` failed:\n{}\n{}",
                python.display(),
                args.join(" "),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    };
    let result = run(&["-c", "import maturin"])
        .or_else(|_| run(&["-m", "pip", "install", "-q", "maturin>=1.7,<2"]))
        .and_then(|()| {
            run(&[
                "-m",
                "pip",
                "install",
                "-q",
                "--no-build-isolation",
                "--force-reinstall",
                "--no-deps",
                "./python",
            ])
        });
    done.insert(python.to_path_buf(), result.clone());
    result
}

/// Run one pytest file of `python/tests` with `engine`'s interpreter; fails on any failure, and on
/// any skip when the test's dependencies are required.
fn pytest(engine: &str, file: &str) {
    let Some(python) = interpreter(engine, file) else {
        return;
    };
    if let Err(e) = install(&python) {
        panic!(
            "installing the kvhost package into {}: {e}",
            python.display()
        );
    }
    let dirs = std::env::join_paths([plugins_dir(), profile_dir(), profile_dir().join("deps")])
        .expect("plugin dirs");
    let out = Command::new(&python)
        .args(["-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", file])
        .current_dir(repo().join("python/tests"))
        .env("KVHOST_TEST_PLUGIN_DIRS", dirs)
        .env("KVHOST_TEST_FIXTURE_DIR", env!("KVHOST_TEST_PLUGINS_DIR"))
        .env("LMCACHE_LOG_LEVEL", "ERROR")
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .env("PATH", {
            let bin = python.parent().expect("venv bin").to_path_buf();
            std::env::join_paths(std::iter::once(bin).chain(std::env::split_paths(
                &std::env::var_os("PATH").unwrap_or_default(),
            )))
            .expect("PATH")
        })
        .output()
        .expect("run pytest");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let summary = stdout.lines().last().unwrap_or("").to_string();
    eprintln!("pytest {file}: {summary}");
    assert!(
        out.status.success(),
        "pytest {file} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        summary.contains("passed"),
        "pytest {file} ran no test:\n{stdout}"
    );
    // Where CI requires the engines, nothing may be skipped (pytest lists why with -rs).
    let required = ["KVHOST_REQUIRE_LMCACHE", "KVHOST_REQUIRE_SGLANG"]
        .iter()
        .any(|v| std::env::var(v).is_ok_and(|v| v == "1"));
    assert!(
        !(required && summary.contains("skipped")),
        "pytest {file} skipped tests although their dependencies are required:\n{stdout}"
    );
}

#[test]
#[cfg_attr(
    not(has_lmcache),
    ignore = "needs the LMCache virtualenv (~/.cache/kvhost/lmcache-venv or $KVHOST_LMCACHE_PYTHON; .ci/test-all creates it)"
)]
fn python_chain() {
    pytest("lmcache", "test_chain.py");
}

#[test]
#[cfg_attr(
    not(has_lmcache),
    ignore = "needs the LMCache virtualenv (~/.cache/kvhost/lmcache-venv or $KVHOST_LMCACHE_PYTHON; .ci/test-all creates it)"
)]
fn python_lmcache_multiprocess_l2_adapter() {
    pytest("lmcache", "test_lmcache_mp.py");
}

#[test]
#[cfg_attr(
    not(has_lmcache),
    ignore = "needs the LMCache virtualenv (~/.cache/kvhost/lmcache-venv or $KVHOST_LMCACHE_PYTHON; .ci/test-all creates it)"
)]
fn python_lmcache_in_process_storage_plugin() {
    pytest("lmcache", "test_lmcache_inprocess.py");
}

#[test]
#[cfg_attr(
    not(has_sglang),
    ignore = "needs the SGLang virtualenv (~/.cache/kvhost/sglang-venv or $KVHOST_SGLANG_PYTHON; .ci/test-all creates it)"
)]
fn python_sglang_hicache_storage() {
    pytest("sglang", "test_sglang.py");
}
