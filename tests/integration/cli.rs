//! The `kvhost` binary itself: exit codes, `check`, `plugins`, `conformance`, `bench`, and `serve`'s
//! shutdown on SIGTERM.

use crate::util::*;
use kvhost::serve::client::LmClient;
use kvhost_plugin_sdk::ChunkMeta;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Build the `kvhost` binary once (`cargo test` builds only libraries for this package).
pub fn binary() -> &'static PathBuf {
    static BIN: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BIN.get_or_init(|| {
        let profile = profile_dir();
        let mut build = Command::new(env!("CARGO"));
        build.args(["build", "-q", "-p", "kvhost", "--bin", "kvhost"]);
        // The micro bench loads its no-op plugin from its .so (the binary does not link it).
        let mut noop = Command::new(env!("CARGO"));
        noop.args(["build", "-q", "-p", "kvhost-plugin-noop", "--lib"]);
        if profile.ends_with("release") {
            build.arg("--release");
            noop.arg("--release");
        }
        for (mut cmd, what) in [(build, "kvhost"), (noop, "kvhost-plugin-noop")] {
            let status = cmd.status().expect("run cargo build");
            assert!(status.success(), "cargo build -p {what} failed");
        }
        profile.join("kvhost")
    })
}

fn kvhost() -> Command {
    let bin = binary();
    assert!(bin.is_file(), "{} is missing", bin.display());
    let mut c = Command::new(bin);
    c.env_remove("LMCACHE_CONFIG_FILE").env_remove("RUST_LOG");
    c
}

fn run(args: &[&str]) -> Output {
    kvhost().args(args).output().expect("run kvhost")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn small_config(name: &str, body: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kvhost-cli-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("kvhost.yaml");
    std::fs::write(&path, body).unwrap();
    path
}

const SMALL: &str = "chunk_size: 16\nmax_local_cpu_size: 0.05\nlocal_cpu_prefault: false\n\
    model:\n  name: test/model\n  num_layers: 2\n  num_kv_heads: 2\n  head_size: 16\n  dtype: half\n\
    storage_plugins: [mem]\nextra_config:\n  storage_plugin.mem.module_path: kvhost_mem\n  storage_plugin.mem.class_name: mem\n";

#[test]
fn check_prints_the_chain_and_exits_zero() {
    let o = run(&["check"]);
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    for part in [
        "LocalCPUBackend",
        "mem",
        "log",
        "capacity_bytes=4294967296",
        // mem's ABI 1.3 stats column.
        "evictions=0 bytes_used=0 capacity_bytes=4294967296 entries=0",
        "check: ok (2 plugin(s) loaded)",
    ] {
        assert!(t.contains(part), "`{part}` missing:\n{t}");
    }
}

#[test]
fn check_fails_with_the_loaders_message() {
    let cfg = small_config("bad", &SMALL.replace("kvhost_mem", "kvhost_nope"));
    let o = run(&["check", "--config", cfg.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        text(&o).contains("no library for module_path `kvhost_nope`"),
        "{}",
        text(&o)
    );
    let o = run(&["check", "--config", "/nonexistent.yaml"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o).contains("/nonexistent.yaml"), "{}", text(&o));
}

#[test]
fn usage_errors_exit_two() {
    assert_eq!(run(&["frobnicate"]).status.code(), Some(2));
    assert_eq!(
        run(&["serve", "--listen", "not-an-address"]).status.code(),
        Some(2)
    );
    let help = run(&["--help"]);
    assert!(help.status.success() && text(&help).contains("conformance"));
}

#[test]
fn plugins_lists_classes_and_names_non_plugins() {
    let dir = PathBuf::from(env!("KVHOST_TEST_PLUGINS_DIR"));
    let o = run(&[
        "plugins",
        plugins_dir().to_str().unwrap(),
        dir.to_str().unwrap(),
    ]);
    let t = text(&o);
    // The fixtures directory holds defective classes: the listing names each and exits 1.
    assert_eq!(o.status.code(), Some(1), "{t}");
    assert!(t.contains(": refused: "), "{t}");
    assert!(
        t.contains("class mem v0.1.0 (ABI 1.3)") && t.contains("option capacity_bytes"),
        "{t}"
    );
    assert!(
        t.contains("libfx_not_a_plugin.so\n  not a kvhost plugin"),
        "{t}"
    );
    assert!(
        t.contains("built for another ABI major: abi_v2 (ABI 2)"),
        "{t}"
    );
}

#[test]
fn plugins_exits_zero_when_every_class_loads() {
    let o = run(&["plugins", plugins_dir().to_str().unwrap()]);
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    assert!(t.contains(", 0 refused") && !t.contains("refused:"), "{t}");
}

/// Log lines carry no colour codes when stderr is not a terminal; on a terminal (a pseudo-terminal
/// from `script`) they do, unless NO_COLOR is set. `bench` logs the config warning through the log
/// (`check` prints its warnings itself); only the warning's own line is judged, since the progress bar
/// draws with escape codes on a terminal by design.
#[test]
fn log_colours_only_on_a_terminal_and_never_with_no_color() {
    // An unknown config key is a warning: one log line on stderr.
    let cfg = small_config("colour", &format!("{SMALL}no_such_key: 1\n"));
    let args = [
        "bench",
        "--config",
        cfg.to_str().unwrap(),
        "--requests",
        "1",
    ];
    let warning_line = |t: &str| -> String {
        t.lines()
            .find(|l| l.contains("no_such_key"))
            .unwrap_or_else(|| panic!("no warning line in {t:?}"))
            .to_string()
    };
    let o = run(&args);
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    assert!(
        !warning_line(&t).contains('\x1b'),
        "colour codes on a pipe: {t:?}"
    );
    // `script` (bsdutils, an essential package) gives the pseudo-terminal; without it this fails.
    assert!(
        Command::new("script").arg("--version").output().is_ok(),
        "no `script` for a pseudo-terminal (apt-get install bsdutils)"
    );
    let on_tty = |no_color: Option<&str>| {
        let line = format!("{} {}", binary().display(), args.join(" "));
        let mut c = Command::new("script");
        c.args(["-qec", &line, "/dev/null"])
            .env_remove("RUST_LOG")
            .env_remove("LMCACHE_CONFIG_FILE")
            .env_remove("NO_COLOR")
            .stdin(Stdio::null());
        if let Some(v) = no_color {
            c.env("NO_COLOR", v);
        }
        text(&c.output().expect("run script"))
    };
    let coloured = warning_line(&on_tty(None));
    assert!(coloured.contains('\x1b'), "{coloured:?}");
    let plain = warning_line(&on_tty(Some("1")));
    assert!(!plain.contains('\x1b'), "{plain:?}");
}

#[test]
fn conformance_command_passes_and_fails_honestly() {
    let o = run(&[
        "conformance",
        "--plugin",
        "kvhost_mem",
        "--class",
        "mem",
        "--option",
        "delay_us=10",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("0 failed"), "{}", text(&o));
    let beta = fixture("fx_multi");
    let o = run(&[
        "conformance",
        "--plugin",
        beta.to_str().unwrap(),
        "--class",
        "beta",
        "-o",
        "size=1",
    ]);
    assert_eq!(
        o.status.code(),
        Some(1),
        "an undeclared black hole fails: {}",
        text(&o)
    );
    assert!(text(&o).contains("FAIL  round_trip"), "{}", text(&o));
}

#[test]
fn bench_runs_the_workload_and_writes_json() {
    let cfg = small_config("bench", SMALL);
    let json = cfg.with_file_name("report.json");
    let o = run(&[
        "bench",
        "--config",
        cfg.to_str().unwrap(),
        "--requests",
        "40",
        "--json",
        json.to_str().unwrap(),
    ]);
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    assert!(
        t.contains("40 requests") && t.contains("LocalCPUBackend") && t.contains("mem"),
        "{t}"
    );
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(report["requests"], 40);
    assert!(
        report["chunks_hit"].as_u64().unwrap() > 0,
        "multi-turn sessions reuse prefixes"
    );
}

#[test]
fn micro_bench_exit_code_says_whether_every_target_was_met() {
    // Quick sizes on a shared machine may miss a target or not: the exit code must agree with the
    // table either way (1 exactly when a judged row says NO).
    let o = run(&["bench", "--suite", "micro", "--quick"]);
    let t = text(&o);
    assert!(
        t.contains("b. contains of 1 key through the dlopen'd no-op"),
        "{t}"
    );
    let missed = t.lines().any(|l| l.trim_end().ends_with(" NO"));
    assert_eq!(o.status.code(), Some(if missed { 1 } else { 0 }), "{t}");
    // A row that cannot run is a miss, never a pass.
    let o = run(&[
        "bench",
        "--suite",
        "micro",
        "--quick",
        "--noop-plugin",
        "/nonexistent/libkvhost_noop.so",
    ]);
    let t = text(&o);
    assert_eq!(o.status.code(), Some(1), "{t}");
    assert!(t.contains("b. per-op cost, dlopen'd no-op (FAILED"), "{t}");
}

#[test]
fn micro_vs_lmcache_without_lmcache_says_so_with_its_own_exit_code() {
    let o = run(&[
        "bench",
        "--suite",
        "micro",
        "--vs-lmcache",
        "--quick",
        "--lmcache-python",
        "/nonexistent/bin/python",
    ]);
    let t = text(&o);
    assert_eq!(o.status.code(), Some(3), "{t}");
    assert!(
        t.contains("no LMCache Python at /nonexistent/bin/python"),
        "{t}"
    );
}

#[test]
#[cfg_attr(
    not(has_lmcache),
    ignore = "needs the LMCache virtualenv (~/.cache/kvhost/lmcache-venv or $KVHOST_LMCACHE_PYTHON; .ci/test-all creates it)"
)]
fn micro_vs_lmcache_prints_every_ratio_and_exits_by_its_targets() {
    let o = run(&["bench", "--suite", "micro", "--vs-lmcache", "--quick"]);
    let t = text(&o);
    for row in [
        "vs. put-with-copy 256 KiB",
        "vs. get-with-copy 4 MiB",
        "vs. put without the copy",
        "vs. get without the copy",
        "vs. contains over",
        "vs. 1000-key prefix walk",
    ] {
        assert!(t.contains(row), "missing `{row}`:\n{t}");
    }
    let missed = t.lines().any(|l| l.trim_end().ends_with(" NO"));
    assert_eq!(o.status.code(), Some(if missed { 1 } else { 0 }), "{t}");
}

#[test]
fn serve_drains_and_exits_zero_on_sigterm() {
    let cfg = small_config("serve", SMALL);
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let addr = format!("127.0.0.1:{port}");
    let mut child = kvhost()
        .args([
            "serve",
            "--config",
            cfg.to_str().unwrap(),
            "--listen",
            &addr,
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut client = loop {
        match LmClient::connect(&addr) {
            Ok(c) => break c,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            Err(e) => panic!("server did not start: {e}"),
        }
    };
    let key = "test/model@1@0@abc@half";
    client
        .put(key, &[5u8; 2048], &ChunkMeta::default())
        .unwrap();
    assert_eq!(client.get(key).unwrap().unwrap().1, vec![5u8; 2048]);
    // SAFETY: sending a signal to our own child process.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "serve did not exit after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let out = child.wait_with_output().unwrap();
    assert!(status.success(), "exit {status}: {}", text(&out));
    assert!(
        text(&out).contains("stopped (1 connections, 2 requests)"),
        "{}",
        text(&out)
    );
}

#[test]
fn json_logs_carry_the_plugin_name() {
    let o = kvhost()
        .args(["--log-format", "json", "check"])
        .env("RUST_LOG", "debug")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let stderr = String::from_utf8_lossy(&o.stderr);
    let plugin_lines: Vec<serde_json::Value> = stderr
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["fields"]["plugin"] == "log")
        .collect();
    assert!(
        !plugin_lines.is_empty(),
        "no JSON log line from plugin `log`:\n{stderr}"
    );
    assert!(
        plugin_lines.iter().any(|v| v["fields"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("health")),
        "{stderr}"
    );
}

#[test]
fn check_prints_each_config_warning_once() {
    let cfg = small_config("warn-once", &format!("{SMALL}bogus_key: 1\n"));
    let out = run(&["check", "-c", cfg.to_str().unwrap()]);
    let all = text(&out);
    assert!(out.status.success(), "{all}");
    assert_eq!(
        all.matches("unknown config key `bogus_key`").count(),
        1,
        "stdout and stderr together:\n{all}"
    );
}

#[test]
fn check_refuses_a_hot_cache_larger_than_the_machine() {
    let cfg = small_config(
        "huge-arena",
        &SMALL.replace("max_local_cpu_size: 0.05", "max_local_cpu_size: 1e12"),
    );
    let out = run(&["check", "-c", cfg.to_str().unwrap()]);
    let all = text(&out);
    assert!(!out.status.success(), "{all}");
    assert!(
        all.contains("max_local_cpu_size 1000000000000 GiB") && all.contains("machine's memory ("),
        "{all}"
    );
}

/// SMALL with a `faulty` tier named `sick` that hangs every call for its first `hang_ms`.
fn sick_config(name: &str, hang_ms: u64) -> PathBuf {
    let body = SMALL
        .replace("storage_plugins: [mem]", "storage_plugins: [sick]")
        .replace(
            "storage_plugin.mem.module_path: kvhost_mem\n  storage_plugin.mem.class_name: mem\n",
            &format!(
                "storage_plugin.sick.module_path: {}\n  storage_plugin.sick.class_name: faulty\n  \
             storage_plugin.sick.hang_rate: 1\n  storage_plugin.sick.faults_for_ms: {hang_ms}\n",
                crate::sick_tier::faulty_so().display()
            ),
        );
    small_config(
        name,
        &format!("{body}tier_put_deadline_secs: 0.2\ntier_breaker_probe_secs: 0.1\n"),
    )
}

#[test]
fn check_shows_the_breaker_of_a_sick_tier() {
    let cfg = sick_config("check-sick", 60_000);
    let out = run(&["check", "-c", cfg.to_str().unwrap()]);
    let all = text(&out);
    assert!(
        !out.status.success(),
        "an unhealthy tier fails check:\n{all}"
    );
    assert!(all.contains("open (health failing)"), "{all}");
    assert!(
        all.contains("circuit breaker per tier: opens after 5 consecutive failures"),
        "{all}"
    );
}

#[test]
fn bench_fails_when_a_tier_was_open_most_of_the_run_unless_allowed() {
    let cfg = sick_config("bench-sick", 3_000);
    let args = [
        "bench",
        "--config",
        cfg.to_str().unwrap(),
        "--duration",
        "2",
    ];
    let out = run(&args);
    let all = text(&out);
    assert_eq!(out.status.code(), Some(1), "{all}");
    assert!(
        all.contains("circuit breaker OPEN"),
        "the trip is logged as it happens:\n{all}"
    );
    assert!(
        all.contains("breaker: open for most of the run: sick"),
        "{all}"
    );
    assert!(
        all.contains("open (") || all.contains("closed ("),
        "breaker column:\n{all}"
    );

    let out = run(&[&args[..], &["--allow-open-breaker"]].concat());
    let all = text(&out);
    assert!(out.status.success(), "{all}");
    assert!(all.contains("(allowed by --allow-open-breaker)"), "{all}");
}
