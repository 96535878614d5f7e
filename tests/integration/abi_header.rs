//! The committed header compiles warning-free as C11 and C++17 from two translation units each, and its
//! layout asserts agree with the Rust side.

use std::path::Path;
use std::process::Command;

fn compile(compiler: &str, std: &str, sources: &[&str]) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = std::env::temp_dir().join(format!("kvhost-header-{std}-{}", std::process::id()));
    let mut cmd = Command::new(compiler);
    cmd.arg(format!("-std={std}"))
        .args(["-Wall", "-Wextra", "-Werror", "-pedantic", "-I"])
        .arg(root.join("../include"))
        .args(sources.iter().map(|s| root.join("c").join(s)))
        .arg("-o")
        .arg(&out);
    let output = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {compiler}: {e}"));
    assert!(
        output.status.success(),
        "{compiler} -std={std} failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let run = Command::new(&out)
        .status()
        .expect("run compiled header test");
    assert!(run.success(), "header test program exited with {run}");
    let _ = std::fs::remove_file(out);
}

#[test]
fn header_compiles_as_c11_from_two_units() {
    compile("cc", "c11", &["header_a.c", "header_b.c"]);
}

#[test]
fn header_compiles_as_cpp17_from_two_units() {
    compile("c++", "c++17", &["header_cpp.cpp", "header_cpp_b.cpp"]);
}

#[test]
fn header_constants_match_rust() {
    let header = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../include/kvhost_plugin.h"),
    )
    .unwrap();
    use kvhost_plugin_sdk::abi::*;
    for (name, value) in [
        ("KVH_ABI_MAJOR", KVH_ABI_MAJOR as i64),
        ("KVH_ABI_MINOR", KVH_ABI_MINOR as i64),
        ("KVH_ERR_BUFFER_TOO_SMALL", KVH_ERR_BUFFER_TOO_SMALL as i64),
        ("KVH_VTABLE_V1_0_SIZE", KVH_VTABLE_V1_0_SIZE as i64),
        ("KVH_VTABLE_V1_1_SIZE", KVH_VTABLE_V1_1_SIZE as i64),
        ("KVH_VTABLE_V1_2_SIZE", KVH_VTABLE_V1_2_SIZE as i64),
        ("KVH_VTABLE_V1_3_SIZE", KVH_VTABLE_V1_3_SIZE as i64),
        ("KVH_STATS_BUF_V1_3_SIZE", KVH_STATS_BUF_V1_3_SIZE as i64),
    ] {
        let line = header
            .lines()
            .find(|l| l.starts_with(&format!("#define {name} ")))
            .unwrap_or_else(|| panic!("{name} missing"));
        let text = line
            .split_whitespace()
            .nth(2)
            .unwrap()
            .trim_matches(|c| c == '(' || c == ')');
        assert_eq!(text.parse::<i64>().unwrap(), value, "{name}");
    }
}

/// Compiles the C++ wrapper's self-test (`tests/c/header_hpp_a.cpp` + `header_hpp_b.cpp`, two translation
/// units including `kvhost_plugin.hpp`) with `compiler` and `flags`, runs it, and checks it passed.
fn compile_and_run_hpp(compiler: &str, tag: &str, flags: &[&str], env: &[(&str, &str)]) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = std::env::temp_dir().join(format!("kvhost-header-hpp-{tag}-{}", std::process::id()));
    let mut cmd = Command::new(compiler);
    cmd.args([
        "-std=c++17",
        "-Wall",
        "-Wextra",
        "-Werror",
        "-pedantic",
        "-pthread",
    ])
    .args(flags)
    .arg("-I")
    .arg(root.join("../include"))
    .args(["header_hpp_a.cpp", "header_hpp_b.cpp"].map(|s| root.join("c").join(s)))
    .arg("-o")
    .arg(&out);
    let output = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {compiler}: {e}"));
    assert!(
        output.status.success(),
        "{compiler} {flags:?} failed on kvhost_plugin.hpp:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let run = Command::new(&out)
        .envs(env.iter().copied())
        .output()
        .expect("run the kvhost_plugin.hpp self-test");
    let _ = std::fs::remove_file(&out);
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success() && stdout.contains("all checks passed"),
        "kvhost_plugin.hpp self-test ({compiler} {flags:?}) exited with {}:\n{stdout}{}",
        run.status,
        String::from_utf8_lossy(&run.stderr)
    );
}

#[test]
fn cpp_wrapper_compiles_from_two_units_and_passes_its_self_test() {
    compile_and_run_hpp("c++", "O0", &[], &[]);
    compile_and_run_hpp("c++", "O2", &["-O2"], &[]);
    // Completions, Pending's cancel-on-drop and the thread-local last error under the sanitizers
    // (LeakSanitizer needs ptrace, which the sandbox lacks; see sanitizers.rs).
    compile_and_run_hpp(
        "c++",
        "asan",
        &[
            "-fsanitize=address,undefined",
            "-fno-omit-frame-pointer",
            "-g",
        ],
        &[
            ("ASAN_OPTIONS", "detect_leaks=0:abort_on_error=1"),
            ("UBSAN_OPTIONS", "halt_on_error=1:print_stacktrace=1"),
        ],
    );
    // clang++ where it is installed (it is optional: the toolchain the workspace needs is g++).
    let clang = Command::new("clang++")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if clang {
        compile_and_run_hpp("clang++", "clang", &[], &[]);
    } else {
        println!("clang++ not installed: the wrapper was compiled with c++ only");
    }
}
