//! Build script of the integration tests: compiles the deliberately broken fixture plugins in
//! `fixtures/c` and `fixtures/cpp` into `<target>/<profile>/test-plugins/libfx_<name>.so`, one library
//! per source file, the way an outside plugin author would (see `kvhost_plugin_sdk::build`).
//!
//! The tests find that folder through `env!("KVHOST_TEST_PLUGINS_DIR")`.
//!
//! It also probes for the services some tests need (redis, Ceph, the LMCache and SGLang
//! virtualenvs, strace) and sets `has_redis`, `has_ceph`, `has_lmcache`, `has_sglang`, `has_strace`:
//! a test whose service is missing is then *ignored* with its reason (`cargo test` lists it), never
//! passed without running.
//! With `KVHOST_REQUIRE_<NAME>=1` the cfg is set anyway, so the test runs and fails on what is
//! missing. Installing a service later re-runs this probe: it watches the `PATH` directories, the
//! librados header's folder and the virtualenv folders.

use kvhost_plugin_sdk::build::{Lang, SharedLib};
use std::path::{Path, PathBuf};

/// A service some tests need: its cfg, its `KVHOST_REQUIRE_*` variable, and whether it is here.
struct Service {
    cfg: &'static str,
    require: &'static str,
    found: bool,
}

/// Whether `tool` is an executable file in a `PATH` directory.
fn on_path(tool: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false)
}

/// Watch `path`, or its nearest existing ancestor below `stop`, so that creating it re-runs this
/// script. Cargo scans a watched folder recursively, so nothing at or above `stop` is watched.
fn watch(path: &Path, stop: &Path) {
    if let Some(existing) = path
        .ancestors()
        .take_while(|p| *p != stop && p.starts_with(stop))
        .find(|p| p.exists())
    {
        println!("cargo:rerun-if-changed={}", existing.display());
    }
}

/// The virtualenv interpreter the tests use for `venv` (overridden by `$var`).
fn venv_python(var: &str, venv: &str) -> PathBuf {
    println!("cargo:rerun-if-env-changed={var}");
    std::env::var_os(var).map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
            .join(".cache/kvhost")
            .join(venv)
            .join("bin/python")
    })
}

/// Probe for every service and emit the cfgs.
fn probe_services() {
    println!("cargo:rerun-if-env-changed=PATH");
    println!("cargo:rerun-if-env-changed=HOME");
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path).filter(|d| d.is_dir()) {
            println!("cargo:rerun-if-changed={}", dir.display());
        }
    }
    const CEPH_TOOLS: &[&str] = &[
        "ceph-mon",
        "ceph-osd",
        "ceph",
        "rados",
        "monmaptool",
        "ceph-authtool",
        "uuidgen",
    ];
    // The rados plugin is built only when librados' header is there (plugins/rados/build.rs).
    let rados_header = Path::new("/usr/include/rados/librados.h");
    watch(rados_header, Path::new("/usr"));
    let lmcache = venv_python("KVHOST_LMCACHE_PYTHON", "lmcache-venv");
    let sglang = venv_python("KVHOST_SGLANG_PYTHON", "sglang-venv");
    // The default virtualenvs live under ~/.cache; an explicit interpreter path is watched up to its
    // grandparent (the venv folder).
    let home_cache = PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache");
    for python in [&lmcache, &sglang] {
        let stop = if python.starts_with(&home_cache) {
            home_cache.clone()
        } else {
            python
                .ancestors()
                .nth(3)
                .map_or_else(|| PathBuf::from("/"), Path::to_path_buf)
        };
        watch(python, &stop);
    }
    let services = [
        Service {
            cfg: "has_redis",
            require: "KVHOST_REQUIRE_REDIS",
            found: on_path("redis-server"),
        },
        Service {
            cfg: "has_ceph",
            require: "KVHOST_REQUIRE_CEPH",
            found: CEPH_TOOLS.iter().all(|t| on_path(t)) && rados_header.is_file(),
        },
        Service {
            cfg: "has_lmcache",
            require: "KVHOST_REQUIRE_LMCACHE",
            found: lmcache.is_file(),
        },
        Service {
            cfg: "has_sglang",
            require: "KVHOST_REQUIRE_SGLANG",
            found: sglang.is_file(),
        },
        Service {
            cfg: "has_strace",
            require: "KVHOST_REQUIRE_STRACE",
            found: on_path("strace"),
        },
    ];
    for s in services {
        println!("cargo::rustc-check-cfg=cfg({})", s.cfg);
        println!("cargo:rerun-if-env-changed={}", s.require);
        let required = std::env::var(s.require).is_ok_and(|v| v == "1");
        if s.found || required {
            println!("cargo:rustc-cfg={}", s.cfg);
        }
    }
}

/// C fixtures: `fixtures/c/<name>.c` becomes `lib<name>.so`.
const C_FIXTURES: &[&str] = &[
    "fx_abi_v2",
    "fx_bad_major",
    "fx_short_size",
    "fx_short_vtable",
    "fx_null_fn",
    "fx_cap_no_fn",
    "fx_cap_past_vtable",
    "fx_create_fails",
    "fx_null_desc",
    "fx_wrong_class",
    "fx_multi",
    "fx_liar",
    "fx_hang",
    "fx_abi_1_0",
    "fx_not_a_plugin",
    "fx_bad_stats",
];

/// C++ fixtures: `fixtures/cpp/<name>.cpp` becomes `lib<name>.so`.
const CPP_FIXTURES: &[&str] = &["fx_throws"];

const SUBDIR: &str = "test-plugins";

fn main() {
    let manifest_dir = PathBuf::from(
        std::env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR is set by cargo"),
    );
    let fixtures = manifest_dir.join("fixtures");
    let c_dir = fixtures.join("c");
    let cpp_dir = fixtures.join("cpp");

    println!("cargo:rerun-if-changed=build.rs");
    probe_services();
    // Included by every C fixture; SharedLib only tracks the sources and include directories it is given.
    println!(
        "cargo:rerun-if-changed={}",
        c_dir.join("fx_common.h").display()
    );

    let mut out_dir: Option<PathBuf> = None;
    let fixtures = C_FIXTURES
        .iter()
        .map(|name| (*name, Lang::C, c_dir.join(format!("{name}.c"))))
        .chain(
            CPP_FIXTURES
                .iter()
                .map(|name| (*name, Lang::Cpp, cpp_dir.join(format!("{name}.cpp")))),
        );
    for (name, lang, source) in fixtures {
        let lib = SharedLib::new(name, lang)
            .source(source)
            .subdir(SUBDIR)
            .build();
        out_dir.get_or_insert_with(|| {
            lib.parent()
                .map(Path::to_path_buf)
                .expect("library has a parent folder")
        });
    }

    let out_dir = out_dir.expect("at least one fixture");
    println!(
        "cargo:rustc-env=KVHOST_TEST_PLUGINS_DIR={}",
        out_dir.display()
    );
}
