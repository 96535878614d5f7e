//! `kvhost bench`: benchmarks that print ratios measured side by side in one run.

use super::BenchArgs;
use crate::bench::micro::{self, MicroOptions};
use crate::bench::workload::{self, WorkloadOptions};
use crate::chain::Chain;
use std::path::Path;
use std::process::ExitCode;

/// `--suite micro --vs-lmcache` without an LMCache virtualenv: nothing was compared.
pub const EXIT_NO_LMCACHE: u8 = 3;

/// `--suite micro`: exits 1 when a judged row misses its target (or cannot run); with
/// `--vs-lmcache`, 3 when there is no LMCache virtualenv and 2 when LMCache's side fails.
pub fn run_micro(args: &BenchArgs) -> Result<ExitCode, Box<dyn std::error::Error>> {
    let quick = args.quick;
    let mut opts = if quick {
        MicroOptions::quick()
    } else {
        MicroOptions::full()
    };
    opts.noop_module = args.noop_plugin.clone();
    opts.rows = args.rows.clone();
    let bar = indicatif::ProgressBar::new_spinner();
    bar.enable_steady_tick(std::time::Duration::from_millis(120));
    let step = |step: &str| bar.set_message(format!("micro benchmark: {step}"));
    let rows = if args.vs_lmcache {
        let python = lmcache_python(args.lmcache_python.as_deref());
        match micro::vs_lmcache::run(&python, &opts, step) {
            Ok(rows) => rows,
            Err(e) => {
                bar.finish_and_clear();
                eprintln!("kvhost bench --suite micro --vs-lmcache: {e}");
                return Ok(ExitCode::from(match e {
                    micro::vs_lmcache::VsError::NoLmcache(_) => EXIT_NO_LMCACHE,
                    _ => 2,
                }));
            }
        }
    } else {
        micro::run(opts, step)
    };
    bar.finish_and_clear();
    print!("{}", micro::table(&rows));
    let met = rows.iter().filter(|r| r.met == Some(true)).count();
    let judged = rows.iter().filter(|r| r.met.is_some()).count();
    println!(
        "targets met: {met} of {judged}{}",
        if quick {
            " (quick run: sizes too small to judge fairly)"
        } else {
            ""
        }
    );
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&rows)?)?;
        println!("wrote {}", path.display());
    }
    Ok(if micro::all_met(&rows) {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

pub fn run_workload(args: &BenchArgs) -> Result<ExitCode, Box<dyn std::error::Error>> {
    let mut config = super::load_config(args.config.as_deref())?;
    if let Some(name) = &args.model {
        config.model = workload::preset(name).ok_or_else(|| {
            format!(
                "unknown model preset `{name}`; known: {}",
                workload::PRESETS.join(", ")
            )
        })?;
    }
    let m = &mut config.model;
    if let Some(v) = args.layers {
        m.num_layers = v;
    }
    if let Some(v) = args.kv_heads {
        m.num_kv_heads = v;
    }
    if let Some(v) = args.head_dim {
        m.head_size = v;
    }
    if let Some(v) = &args.dtype {
        if crate::config::dtype_info(v).is_none() {
            return Err(format!("--dtype `{v}` is not an LMCache dtype").into());
        }
        m.dtype = v.clone();
    }
    if let Some(v) = args.chunk_size {
        config.chunk_size = v.max(1);
    }
    let opts = WorkloadOptions {
        sessions: args.sessions.max(1),
        turns: args.turns.max(1),
        system_tokens: args.system_tokens,
        user_tokens: args.user_tokens,
        answer_tokens: args.answer_tokens,
        reuse: args.reuse.clamp(0.0, 1.0),
        seed: args.seed,
        duration: std::time::Duration::from_secs_f64(args.duration.max(0.1)),
        requests: args.requests,
    };
    let origin = config
        .source
        .as_ref()
        .map_or("<embedded quickstart>".to_string(), |p| {
            p.display().to_string()
        });
    eprintln!("loading chain from {origin}");
    let chain = Chain::from_config(&config)?;
    eprintln!("chain: {}", chain.tier_names().join(" -> "));
    let bar = indicatif::ProgressBar::new(1000);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:40} {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let report = workload::run(&chain, &config, &opts, |done, requests| {
        bar.set_position((done * 1000.0) as u64);
        bar.set_message(format!("{requests} requests"));
    });
    bar.finish_and_clear();
    let close = chain.close(std::time::Duration::from_secs(30));
    print!("{}", workload::render(&report));
    if !close.unfinished.is_empty() {
        println!("close: {} put(s) did not finish", close.unfinished.len());
    }
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)?;
        println!("wrote {}", path.display());
    }
    // A tier whose breaker was open most of the run served nothing: the figures are not its.
    let mostly_open: Vec<String> = report
        .tiers
        .iter()
        .filter_map(|t| t.breaker.as_ref().map(|b| (t, b)))
        .filter(|(_, b)| b.open_secs > report.seconds / 2.0)
        .map(|(t, b)| format!("{} ({:.1} of {:.1} s)", t.name, b.open_secs, report.seconds))
        .collect();
    if !mostly_open.is_empty() {
        let list = mostly_open.join(", ");
        if args.allow_open_breaker {
            println!("breaker: open for most of the run: {list} (allowed by --allow-open-breaker)");
        } else {
            println!(
                "breaker: open for most of the run: {list}; failing (pass --allow-open-breaker to accept)"
            );
            return Ok(ExitCode::from(1));
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Where LMCache is installed: the flag, `$KVHOST_LMCACHE_PYTHON`, or the cached virtualenv.
pub fn lmcache_python(flag: Option<&Path>) -> std::path::PathBuf {
    flag.map(Path::to_path_buf)
        .or_else(|| std::env::var_os("KVHOST_LMCACHE_PYTHON").map(Into::into))
        .unwrap_or_else(|| {
            let home = std::env::var_os("HOME")
                .map(std::path::PathBuf::from)
                .unwrap_or_default();
            home.join(".cache/kvhost/lmcache-venv/bin/python")
        })
}

/// The LMCache side-by-side benchmark script and the L2 harness it drives, carried in the binary so
/// the suite runs from any directory.
const LMCACHE_BENCH: [(&str, &str); 2] = [
    (
        "lmcache_bench.py",
        include_str!("../../../python/bench/lmcache_bench.py"),
    ),
    (
        "lmcache_l2.py",
        include_str!("../../../python/bench/lmcache_l2.py"),
    ),
];

/// `--suite lmcache`: runs the script with LMCache's Python; its exit code is the suite's (1 when a row
/// misses its target).
pub fn run_lmcache(args: &BenchArgs) -> Result<ExitCode, Box<dyn std::error::Error>> {
    let python = lmcache_python(args.lmcache_python.as_deref());
    if !python.is_file() {
        return Err(format!(
            "no LMCache Python at {}: install LMCache 0.5.6 and this repository's package into a \
             virtualenv (`pip install lmcache==0.5.6 ./python`), or pass --lmcache-python",
            python.display()
        )
        .into());
    }
    let dir = std::env::temp_dir().join(format!("kvhost-lmcache-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    for (name, text) in LMCACHE_BENCH {
        std::fs::write(dir.join(name), text)?;
    }
    let plugin_dirs = std::env::join_paths(crate::loader::plugin_dirs(
        &crate::Config::embedded_default()?,
    ))?;
    let mut cmd = std::process::Command::new(&python);
    cmd.arg(dir.join("lmcache_bench.py"))
        .arg("--plugin-dirs")
        .arg(&plugin_dirs)
        .env("LMCACHE_LOG_LEVEL", "ERROR");
    if args.quick {
        cmd.arg("--quick");
    }
    if let Some(path) = &args.json {
        cmd.arg("--json").arg(path);
    }
    let status = cmd.status();
    let _ = std::fs::remove_dir_all(&dir);
    let code = status
        .map_err(|e| format!("cannot run {}: {e}", python.display()))?
        .code()
        .unwrap_or(2);
    Ok(ExitCode::from(u8::try_from(code).unwrap_or(2)))
}

pub fn run_serve(args: &BenchArgs) -> Result<ExitCode, Box<dyn std::error::Error>> {
    let python = lmcache_python(args.lmcache_python.as_deref());
    if !python.is_file() {
        return Err(format!(
            "no LMCache Python at {}: install it with `python3 -m venv ~/.cache/kvhost/lmcache-venv && \
             ~/.cache/kvhost/lmcache-venv/bin/pip install lmcache==0.5.6`, or pass --lmcache-python",
            python.display()
        )
        .into());
    }
    let mut opts = crate::bench::serve::ServeBenchOptions::default();
    if args.quick {
        opts.bytes_per_size = 16 << 20;
        opts.reps = 1;
    }
    let bar = indicatif::ProgressBar::new_spinner();
    bar.enable_steady_tick(std::time::Duration::from_millis(120));
    let rows = crate::bench::serve::run(&python, &opts, |step| {
        bar.set_message(format!("serve benchmark: {step}"))
    })?;
    bar.finish_and_clear();
    print!("{}", micro::table(&rows));
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&rows)?)?;
        println!("wrote {}", path.display());
    }
    // A missed target is a failed run (report-only and skipped rows do not count).
    if rows.iter().any(|r| r.met == Some(false)) {
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}
