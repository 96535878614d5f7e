//! The C plugins (`log`, `mem`), the C++ plugin `logstore` and the C++ fixture (`fx_throws`) are clean under
//! AddressSanitizer+UBSan and under valgrind memcheck.
//!
//! Both tests compile `tests/c/plugin_driver.c` (a small C host that drives every vtable entry, from
//! four threads, and destroys the backend with operations in flight) and the plugins from source, then
//! run the driver against each plugin. `fx_hang` runs too: it is the one plugin whose destroy cancels
//! pending operations, so the cancellation path is covered as well. `logstore` keeps its file in the build
//! directory; the ASan run drives it twice on the same file (the second time the index is rebuilt by the
//! scan, with `o_direct=true sync=always`).
//!
//! LeakSanitizer does not work in the sandbox the tests run in (it needs ptrace), so the ASan run sets
//! `detect_leaks=0`; leaks are valgrind's job.
//!
//! The C `rados` plugin is driven the same way against a real one-node Ceph cluster (see `rados.rs`),
//! once with one object per chunk and once striped over 4 KiB objects; those two tests are ignored
//! without Ceph, like the other Ceph tests.

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Flags of the sanitizer build, for the driver and every plugin.
const SANITIZE: &[&str] = &[
    "-fsanitize=address,undefined",
    "-fno-omit-frame-pointer",
    "-g",
    "-O1",
];
/// Flags of the build valgrind runs.
const PLAIN: &[&str] = &["-O1", "-g"];
/// Warnings are errors: the plugins and the driver must build clean.
const WARNINGS: &[&str] = &["-Wall", "-Wextra", "-Werror", "-pedantic", "-pthread"];
/// A driver run that takes longer than this is hung (the driver's own deadlines are 10 s per operation).
const RUN_TIMEOUT: Duration = Duration::from_secs(120);

/// One plugin library to build from source and drive.
struct Plugin {
    /// Class name, also the library's file stem.
    class: &'static str,
    /// Source file, relative to the repository root.
    source: &'static str,
    /// Libraries to link (`-l<lib>`).
    libs: &'static [&'static str],
}

const LOG: Plugin = Plugin {
    class: "log",
    source: "plugins/log/log.c",
    libs: &[],
};
const MEM: Plugin = Plugin {
    class: "mem",
    source: "plugins/mem/mem.c",
    libs: &[],
};
const THROWS: Plugin = Plugin {
    class: "throws",
    source: "tests/fixtures/cpp/fx_throws.cpp",
    libs: &[],
};
const HANG: Plugin = Plugin {
    class: "hang",
    source: "tests/fixtures/c/fx_hang.c",
    libs: &[],
};
const LOGSTORE: Plugin = Plugin {
    class: "logstore",
    source: "plugins/logstore/logstore.cpp",
    libs: &[],
};
const RADOS: Plugin = Plugin {
    class: "rados",
    source: "plugins/rados/rados.c",
    libs: &["rados"],
};

/// Options every run of `plugin` gets, for a run whose files go to `dir` (logstore needs a file).
fn options_for(plugin: &Plugin, dir: &Path) -> Vec<String> {
    if plugin.class == LOGSTORE.class {
        vec![
            format!("path={}", path_arg(&dir.join("logstore.kvlog"))),
            "size_gib=0.0625".to_string(),
        ]
    } else {
        Vec::new()
    }
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A fresh, empty build directory `<temp>/kvhost-<kind>-<pid>/`.
fn build_dir(kind: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kvhost-{kind}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
    dir
}

/// Runs a compiler; panics with its output when it fails.
fn compile(compiler: &str, args: Vec<String>) {
    let output = Command::new(compiler)
        .args(&args)
        .output()
        .unwrap_or_else(|e| panic!("running {compiler}: {e}"));
    assert!(
        output.status.success(),
        "{compiler} {} failed ({}):\n{}{}",
        args.join(" "),
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

fn path_arg(p: &Path) -> String {
    p.display().to_string()
}

/// Builds the driver with `flags` into `dir`; returns its path.
fn build_driver(dir: &Path, flags: &[&str]) -> PathBuf {
    let root = repo_root();
    let out = dir.join("plugin_driver");
    let mut args: Vec<String> = vec!["-std=c11".into()];
    args.extend(flags.iter().chain(WARNINGS).map(|s| s.to_string()));
    args.push(format!("-I{}", path_arg(&root.join("include"))));
    args.push(path_arg(&root.join("tests/c/plugin_driver.c")));
    args.extend(["-o".into(), path_arg(&out), "-ldl".into()]);
    compile("cc", args);
    out
}

/// Builds `plugin` as a shared library with `flags` into `dir`; returns its path.
fn build_plugin(dir: &Path, plugin: &Plugin, flags: &[&str]) -> PathBuf {
    let root = repo_root();
    let out = dir.join(format!("lib{}.so", plugin.class));
    let cpp = plugin.source.ends_with(".cpp");
    let mut args: Vec<String> = vec![if cpp { "-std=c++17" } else { "-std=c11" }.into()];
    args.extend(["-shared", "-fPIC", "-fvisibility=hidden"].map(String::from));
    args.extend(flags.iter().chain(WARNINGS).map(|s| s.to_string()));
    args.push(format!("-I{}", path_arg(&root.join("include"))));
    args.push(path_arg(&root.join(plugin.source)));
    args.extend(["-o".into(), path_arg(&out)]);
    args.extend(plugin.libs.iter().map(|lib| format!("-l{lib}")));
    compile(if cpp { "c++" } else { "cc" }, args);
    out
}

/// What a finished run printed.
struct Run {
    description: String,
    success: bool,
    status: String,
    stdout: String,
    stderr: String,
    stdout_path: PathBuf,
    stderr_path: PathBuf,
}

/// Lines shown per output stream in an assertion message; the files keep everything.
const REPORT_LINES: usize = 150;

/// The first REPORT_LINES lines of `text`, with a pointer to `path` for the rest.
fn excerpt(text: &str, path: &Path) -> String {
    let total = text.lines().count();
    if total <= REPORT_LINES {
        return text.to_string();
    }
    let mut shown: String = text
        .lines()
        .take(REPORT_LINES)
        .map(|l| format!("{l}\n"))
        .collect();
    shown.push_str(&format!(
        "... {} more lines in {}\n",
        total - REPORT_LINES,
        path.display()
    ));
    shown
}

impl Run {
    /// The run's command line, exit status and output, for assertion messages.
    fn report(&self) -> String {
        format!(
            "{}\nexit: {}\n--- stdout ---\n{}--- stderr ---\n{}",
            self.description,
            self.status,
            excerpt(&self.stdout, &self.stdout_path),
            excerpt(&self.stderr, &self.stderr_path)
        )
    }
}

/// Runs `program args` with `env`, output to files in `dir` (so a huge log cannot block a pipe),
/// killing it after RUN_TIMEOUT. The build directory is removed only when a test passes, so the
/// files are there to read after a failure.
fn run(dir: &Path, tag: &str, program: &str, args: &[String], env: &[(&str, &str)]) -> Run {
    let stdout_path = dir.join(format!("{tag}.stdout"));
    let stderr_path = dir.join(format!("{tag}.stderr"));
    let description = format!(
        "{}{program} {}",
        env.iter()
            .map(|(k, v)| format!("{k}={v} "))
            .collect::<String>(),
        args.join(" ")
    );
    let mut child = Command::new(program)
        .args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(File::create(&stdout_path).expect("stdout file"))
        .stderr(File::create(&stderr_path).expect("stderr file"))
        .spawn()
        .unwrap_or_else(|e| panic!("running {description}: {e}"));
    let start = Instant::now();
    let (success, status) = loop {
        if let Some(status) = child.try_wait().expect("waiting for the driver") {
            break (status.success(), status.to_string());
        }
        if start.elapsed() > RUN_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            break (
                false,
                format!("killed after {} s (hung)", RUN_TIMEOUT.as_secs()),
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Run {
        description,
        success,
        status,
        stdout: fs::read_to_string(&stdout_path).unwrap_or_default(),
        stderr: fs::read_to_string(&stderr_path).unwrap_or_default(),
        stdout_path,
        stderr_path,
    }
}

/// The checks every driver run must pass: clean exit and a "N passed, 0 failed" summary.
fn assert_driver_passed(run: &Run) {
    assert!(run.success, "driver run failed:\n{}", run.report());
    let summary = run.stdout.lines().last().unwrap_or_default();
    assert!(
        summary.ends_with(" passed, 0 failed"),
        "driver summary is `{summary}`:\n{}",
        run.report()
    );
}

#[test]
fn c_plugins_are_clean_under_asan_and_ubsan() {
    let dir = build_dir("asan");
    let driver = build_driver(&dir, SANITIZE);
    let env = [
        (
            "ASAN_OPTIONS",
            "detect_leaks=0:abort_on_error=1:halt_on_error=1",
        ),
        ("UBSAN_OPTIONS", "halt_on_error=1:print_stacktrace=1"),
    ];
    let runs: [(&Plugin, &[&str]); 7] = [
        (&LOG, &[]),
        (&MEM, &[]),
        (&MEM, &["delay_us=100"]),
        (&THROWS, &[]),
        (&HANG, &[]),
        (&LOGSTORE, &[]),
        (&LOGSTORE, &["o_direct=true", "sync=always"]),
    ];
    for plugin in [&LOG, &MEM, &THROWS, &HANG, &LOGSTORE] {
        build_plugin(&dir, plugin, SANITIZE);
    }
    for (i, (plugin, options)) in runs.iter().enumerate() {
        let mut args = vec![
            path_arg(&dir.join(format!("lib{}.so", plugin.class))),
            plugin.class.to_string(),
        ];
        args.extend(options_for(plugin, &dir));
        args.extend(options.iter().map(|s| s.to_string()));
        let run = run(
            &dir,
            &format!("{}-{i}", plugin.class),
            &path_arg(&driver),
            &args,
            &env,
        );
        for marker in ["ERROR: AddressSanitizer", "runtime error:"] {
            assert!(
                !run.stderr.contains(marker),
                "sanitizer report (`{marker}`):\n{}",
                run.report()
            );
        }
        assert_driver_passed(&run);
    }
    let _ = fs::remove_dir_all(&dir);
}

#[test]
fn c_plugins_are_clean_under_valgrind() {
    match Command::new("valgrind").arg("--version").output() {
        Ok(output) if output.status.success() => {}
        Ok(output) => panic!(
            "`valgrind --version` failed ({}): install valgrind (apt-get install valgrind; .ci/run does)",
            output.status
        ),
        Err(e) => panic!(
            "valgrind is not on PATH ({e}): install it (apt-get install valgrind; .ci/run installs it in CI). \
             This test does not skip: memory leaks in the C plugins are only caught here."
        ),
    }
    let dir = build_dir("valgrind");
    let driver = build_driver(&dir, PLAIN);
    for plugin in [&LOG, &MEM, &THROWS, &HANG, &LOGSTORE] {
        let library = build_plugin(&dir, plugin, PLAIN);
        let args: Vec<String> = [
            "--error-exitcode=99",
            "--leak-check=full",
            "--errors-for-leak-kinds=definite,indirect",
            "--show-leak-kinds=definite,indirect",
            "-q",
        ]
        .iter()
        .map(|s| s.to_string())
        .chain([
            path_arg(&driver),
            path_arg(&library),
            plugin.class.to_string(),
        ])
        .chain(options_for(plugin, &dir))
        .collect();
        let run = run(&dir, plugin.class, "valgrind", &args, &[]);
        assert_driver_passed(&run);
    }
    let _ = fs::remove_dir_all(&dir);
}

/* ---------------------------------------------------------------------------------------------- */
/* The rados plugin, against a real cluster                                                       */
/* ---------------------------------------------------------------------------------------------- */

/// Driver options for the rados plugin on the shared cluster: one run per chunk layout; the striped one
/// also turns the data checksum on (off by default), so the CRC32C code runs under the sanitizers.
fn rados_runs(conf: &str, ns: &str, op_timeout_s: &str) -> Vec<Vec<String>> {
    let base = vec![
        format!("pool={}", crate::rados::POOL),
        format!("conf={conf}"),
        format!("op_timeout_s={op_timeout_s}"),
    ];
    let mut one = base.clone();
    one.push(format!("namespace={ns}-whole"));
    let mut striped = base;
    striped.extend([
        format!("namespace={ns}-striped"),
        "max_object_bytes=4096".to_string(),
        "max_in_flight=4".to_string(),
        "checksum=true".to_string(),
    ]);
    vec![one, striped]
}

#[test]
#[cfg_attr(
    not(has_ceph),
    ignore = "needs Ceph and librados-dev (apt-get install ceph-mon ceph-osd ceph-common uuid-runtime librados-dev)"
)]
fn rados_plugin_is_clean_under_asan_and_ubsan_against_a_real_cluster() {
    if !crate::rados::ceph_available("rados under ASan+UBSan") {
        return;
    }
    let cluster = crate::rados::shared_cluster();
    let dir = build_dir("asan-rados");
    let driver = build_driver(&dir, SANITIZE);
    let library = build_plugin(&dir, &RADOS, SANITIZE);
    let env = [
        (
            "ASAN_OPTIONS",
            "detect_leaks=0:abort_on_error=1:halt_on_error=1",
        ),
        ("UBSAN_OPTIONS", "halt_on_error=1:print_stacktrace=1"),
    ];
    let ns = crate::rados::namespace("asan");
    for (i, options) in rados_runs(cluster.conf(), &ns, "30")
        .into_iter()
        .enumerate()
    {
        let mut args = vec![path_arg(&library), RADOS.class.to_string()];
        args.extend(options);
        let run = run(&dir, &format!("rados-{i}"), &path_arg(&driver), &args, &env);
        for marker in ["ERROR: AddressSanitizer", "runtime error:"] {
            assert!(
                !run.stderr.contains(marker),
                "sanitizer report (`{marker}`):\n{}",
                run.report()
            );
        }
        assert_driver_passed(&run);
    }
    let _ = fs::remove_dir_all(&dir);
}

#[test]
#[cfg_attr(
    not(has_ceph),
    ignore = "needs Ceph and librados-dev (apt-get install ceph-mon ceph-osd ceph-common uuid-runtime librados-dev)"
)]
fn rados_plugin_is_clean_under_valgrind_against_a_real_cluster() {
    if !crate::rados::ceph_available("rados under valgrind") {
        return;
    }
    if !Command::new("valgrind")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
    {
        panic!("valgrind is not installed (apt-get install valgrind; .ci/run installs it)");
    }
    let cluster = crate::rados::shared_cluster();
    let dir = build_dir("valgrind-rados");
    let driver = build_driver(&dir, PLAIN);
    let library = build_plugin(&dir, &RADOS, PLAIN);
    let ns = crate::rados::namespace("valgrind");
    // Everything runs 20-50 times slower under valgrind: a generous operation timeout.
    for (i, options) in rados_runs(cluster.conf(), &ns, "120")
        .into_iter()
        .enumerate()
    {
        let args: Vec<String> = [
            "--error-exitcode=99",
            "--leak-check=full",
            "--errors-for-leak-kinds=definite,indirect",
            "--show-leak-kinds=definite,indirect",
            "-q",
        ]
        .iter()
        .map(|s| s.to_string())
        .chain([
            path_arg(&driver),
            path_arg(&library),
            RADOS.class.to_string(),
        ])
        .chain(options)
        .collect();
        let run = run(&dir, &format!("rados-{i}"), "valgrind", &args, &[]);
        assert_driver_passed(&run);
    }
    let _ = fs::remove_dir_all(&dir);
}
