//! The plugin author's kit end to end: `kvhost sdk install` into a temporary prefix, the README's
//! one-line pkg-config build, `kvhost new-plugin` skeletons in C, C++ and Rust built against it and
//! passed through the whole conformance suite, and the README's AddressSanitizer command.

use crate::util::*;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn scratch(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("kvhost-kit-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn kvhost(args: &[&str]) -> Output {
    let o = Command::new(crate::cli::binary())
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .expect("run kvhost");
    assert!(o.status.success(), "kvhost {args:?}:\n{}", text(&o));
    o
}

/// `kvhost sdk install --prefix <dir>/prefix`; returns PKG_CONFIG_PATH for it.
fn install(dir: &Path) -> String {
    let prefix = dir.join("prefix");
    kvhost(&["sdk", "install", "--prefix", prefix.to_str().unwrap()]);
    for f in [
        "include/kvhost/kvhost_plugin.h",
        "include/kvhost/kvhost_plugin.hpp",
        "include/kvhost/kvhost_plugin_util.h",
        "share/kvhost/lsan.supp",
    ] {
        let installed = std::fs::read_to_string(prefix.join(f)).unwrap();
        let name = Path::new(f).file_name().unwrap();
        let source = if f.ends_with(".supp") {
            root().join("plugin-sdk").join(name)
        } else {
            root().join("include").join(name)
        };
        assert_eq!(installed, std::fs::read_to_string(source).unwrap(), "{f}");
    }
    prefix.join("lib/pkgconfig").display().to_string()
}

/// Run `line` in `sh` in `dir` with PKG_CONFIG_PATH set; asserts success.
fn sh(dir: &Path, pkg_config_path: &str, line: &str) {
    let o = Command::new("sh")
        .arg("-c")
        .arg(line)
        .current_dir(dir)
        .env("PKG_CONFIG_PATH", pkg_config_path)
        .output()
        .unwrap();
    assert!(o.status.success(), "`{line}` failed:\n{}", text(&o));
}

fn conforms(lib: &Path, class: &str) {
    let o = kvhost(&[
        "conformance",
        "--plugin",
        lib.to_str().unwrap(),
        "--class",
        class,
    ]);
    let t = text(&o);
    assert!(t.contains(" 0 failed"), "{t}");
    for check in [
        "round_trip",
        "remove_pinned",
        "unpin_unpinned",
        "capacity",
        "destroy_in_flight",
    ] {
        assert!(t.contains(&format!("PASS  {check} ")), "{check}:\n{t}");
    }
}

#[test]
fn the_readme_pkg_config_line_builds_hello_from_an_installed_prefix() {
    let dir = scratch("pc");
    let pc = install(&dir);
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    let block = readme
        .split("<!-- pkg-config-build: begin -->")
        .nth(1)
        .and_then(|r| r.split("<!-- pkg-config-build: end -->").next())
        .expect("README pkg-config block");
    let line = block
        .lines()
        .find(|l| l.starts_with("cc $(pkg-config --cflags kvhost-plugin)"))
        .expect("the cc line");
    std::fs::copy(
        root().join("examples/c_plugin/hello.c"),
        dir.join("hello.c"),
    )
    .unwrap();
    sh(&dir, &pc, line);
    let report = kvhost(&[
        "conformance",
        "--plugin",
        dir.join("libhello.so").to_str().unwrap(),
        "--class",
        "hello",
    ]);
    assert!(text(&report).contains(" 0 failed"), "{}", text(&report));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_c_skeleton_builds_against_the_prefix_and_conforms() {
    let dir = scratch("c");
    let pc = install(&dir);
    let src = dir.join("acme");
    kvhost(&["new-plugin", "--lang", "c", "acme", src.to_str().unwrap()]);
    sh(&src, &pc, "make");
    conforms(&src.join("libacme.so"), "acme");
    // Never overwrites.
    let again = Command::new(crate::cli::binary())
        .args(["new-plugin", "--lang", "c", "acme", src.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(again.status.code(), Some(1));
    assert!(
        text(&again).contains("already exists; nothing was written"),
        "{}",
        text(&again)
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_cpp_skeleton_builds_against_the_prefix_and_conforms() {
    let dir = scratch("cpp");
    let pc = install(&dir);
    let src = dir.join("acme");
    kvhost(&[
        "new-plugin",
        "--lang",
        "cpp",
        "acme_pp",
        src.to_str().unwrap(),
    ]);
    sh(&src, &pc, "make");
    conforms(&src.join("libacme_pp.so"), "acme_pp");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_rust_skeleton_builds_against_the_sdk_and_conforms() {
    let dir = scratch("rust");
    let src = dir.join("acme");
    let sdk = root().join("plugin-sdk");
    kvhost(&[
        "new-plugin",
        "--lang",
        "rust",
        "acme_rs",
        src.to_str().unwrap(),
        "--sdk",
        sdk.to_str().unwrap(),
    ]);
    // The workspace's lock file pins the versions already in the offline registry cache; a target
    // directory of its own, kept between runs, so only the first build compiles the dependencies.
    std::fs::copy(root().join("Cargo.lock"), src.join("Cargo.lock")).unwrap();
    let target = profile_dir().parent().unwrap().join("new-plugin-tests");
    let o = Command::new(env!("CARGO"))
        .args(["build", "--offline", "-q"])
        .current_dir(&src)
        .env("CARGO_TARGET_DIR", &target)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "cargo build of the skeleton:\n{}",
        text(&o)
    );
    conforms(&target.join("debug/libacme_rs.so"), "acme_rs");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The README's ASan command: conformance exits 0 on a clean plugin built with ASan, with the
/// shipped suppressions; the same plugin with a leak of its own still fails (the suppressions cover
/// only the host's allocations).
#[test]
fn conformance_under_asan_is_clean_for_a_clean_plugin_and_catches_a_leak() {
    let asan = Command::new("cc")
        .arg("-print-file-name=libasan.so")
        .output()
        .unwrap();
    let asan = String::from_utf8_lossy(&asan.stdout).trim().to_string();
    // gcc ships libasan with its runtime libraries, so a missing one is a broken toolchain: fail, never
    // pass without running.
    assert!(
        Path::new(&asan).is_absolute() && Path::new(&asan).is_file(),
        "cc has no libasan.so ({asan}): install the compiler's sanitizer runtime (apt-get install libasan8)"
    );
    let dir = scratch("asan");
    let pc = install(&dir);
    let src = dir.join("acme");
    kvhost(&["new-plugin", "--lang", "c", "acme", src.to_str().unwrap()]);
    sh(
        &src,
        &pc,
        "make CFLAGS='-O1 -g -fsanitize=address -fno-omit-frame-pointer'",
    );
    let supp = dir.join("prefix/share/kvhost/lsan.supp");
    let run = |lib: &Path| {
        Command::new(crate::cli::binary())
            .args([
                "conformance",
                "--plugin",
                lib.to_str().unwrap(),
                "--class",
                "acme",
            ])
            .env("LD_PRELOAD", &asan)
            .env("ASAN_OPTIONS", "fast_unwind_on_malloc=0")
            .env("LSAN_OPTIONS", format!("suppressions={}", supp.display()))
            .env_remove("RUST_LOG")
            .output()
            .unwrap()
    };
    let clean = run(&src.join("libacme.so"));
    assert_eq!(clean.status.code(), Some(0), "{}", text(&clean));
    assert!(!text(&clean).contains("LeakSanitizer"), "{}", text(&clean));
    // The same store, leaking its backend on destroy.
    let source = std::fs::read_to_string(src.join("acme.c")).unwrap();
    let leaky = source.replacen(
        "    pthread_mutex_destroy(&b->lock);\n    free(b);",
        "    pthread_mutex_destroy(&b->lock);",
        1,
    );
    assert_ne!(
        leaky, source,
        "the template's destroy changed; update this test"
    );
    std::fs::write(src.join("acme.c"), leaky).unwrap();
    sh(
        &src,
        &pc,
        "make -B CFLAGS='-O1 -g -fsanitize=address -fno-omit-frame-pointer'",
    );
    let leaking = run(&src.join("libacme.so"));
    assert_ne!(leaking.status.code(), Some(0), "{}", text(&leaking));
    assert!(
        text(&leaking).contains("LeakSanitizer: detected memory leaks"),
        "{}",
        text(&leaking)
    );
    assert!(
        text(&leaking).contains("store_create"),
        "{}",
        text(&leaking)
    );
    let _ = std::fs::remove_dir_all(&dir);
}
