//! Front end: the `kvhost` command line.

mod bench;
mod check;
mod conformance;
mod new_plugin;
mod plugins;
mod sdk;
mod serve;
pub(crate) mod table;

use crate::config::Config;
use clap::{Parser, Subcommand, ValueEnum};
use std::path::PathBuf;
use std::process::ExitCode;

/// A native host for KV-cache storage plugins (LMCache-compatible).
#[derive(Debug, Parser)]
#[command(name = "kvhost", version, about, long_about = None)]
pub struct Cli {
    /// Log format on stderr. Filter with RUST_LOG (default: warn).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Human)]
    pub log_format: LogFormat,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// `kvhost bench` options.
#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// Which suite.
    #[arg(long, value_enum, default_value_t = Suite::Workload)]
    pub suite: Suite,
    /// Config file. Default: $LMCACHE_CONFIG_FILE, else the embedded quickstart.
    #[arg(long, short)]
    pub config: Option<PathBuf>,
    /// Also write the results as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Model shape preset (overrides the config's `model`): llama-3.1-8b, llama-3.1-70b, qwen2.5-7b,
    /// mistral-7b, tiny.
    #[arg(long)]
    pub model: Option<String>,
    /// Transformer layers.
    #[arg(long)]
    pub layers: Option<u32>,
    /// KV heads per layer.
    #[arg(long)]
    pub kv_heads: Option<u32>,
    /// Head dimension.
    #[arg(long)]
    pub head_dim: Option<u32>,
    /// KV dtype (LMCache name: bfloat16, half, float, fp8_e4m3fn, …).
    #[arg(long)]
    pub dtype: Option<String>,
    /// Tokens per chunk.
    #[arg(long)]
    pub chunk_size: Option<u32>,
    /// Concurrent conversations.
    #[arg(long, default_value_t = 8)]
    pub sessions: usize,
    /// Turns per conversation.
    #[arg(long, default_value_t = 6)]
    pub turns: usize,
    /// Tokens of the shared system prompt.
    #[arg(long, default_value_t = 1024)]
    pub system_tokens: usize,
    /// Tokens a user adds per turn.
    #[arg(long, default_value_t = 256)]
    pub user_tokens: usize,
    /// Tokens the model answers per turn.
    #[arg(long, default_value_t = 256)]
    pub answer_tokens: usize,
    /// Probability that a request continues an open conversation.
    #[arg(long, default_value_t = 0.8)]
    pub reuse: f64,
    /// Random seed.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Seconds to run.
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Stop after this many requests instead.
    #[arg(long)]
    pub requests: Option<u64>,
    /// Micro, serve and lmcache suites: small sizes, to check every row runs.
    #[arg(long)]
    pub quick: bool,
    /// Micro suite: run only these rows, by letter (for example `cg`); default all.
    #[arg(long)]
    pub rows: Option<String>,
    /// Micro suite: the module path of row b's no-op plugin (loaded from its `.so`).
    #[arg(long, default_value = "kvhost_noop")]
    pub noop_plugin: String,
    /// Micro suite: also run LMCache's own `LocalCPUBackend` through the same sizes in the same run
    /// and print kvhost/LMCache ratios (needs the LMCache virtualenv; exit code 3 without it).
    #[arg(long)]
    pub vs_lmcache: bool,
    /// Workload suite: exit 0 even when a tier's circuit breaker was open for most of the run.
    #[arg(long)]
    pub allow_open_breaker: bool,
    /// Serve and lmcache suites: a Python with LMCache installed. Default: $KVHOST_LMCACHE_PYTHON, else
    /// ~/.cache/kvhost/lmcache-venv/bin/python.
    #[arg(long)]
    pub lmcache_python: Option<PathBuf>,
}

/// Benchmark suites.
#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum Suite {
    /// A multi-turn inference workload through the configured chain.
    Workload,
    /// Hot cache, plugin call and chain costs against the machine's limits.
    Micro,
    /// `kvhost serve` against LMCache's own server (needs LMCache installed: `--lmcache-python`).
    Serve,
    /// The `kvhost` Python package inside LMCache against LMCache's own connectors (`fs_native`,
    /// `resp`, `LocalDiskBackend`), side by side; needs LMCache and the package installed.
    Lmcache,
}

/// Log output formats.
#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum LogFormat {
    /// Quiet, readable lines.
    Human,
    /// One JSON object per line.
    Json,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Validate a config, load every plugin, run their health checks, and print the chain.
    Check {
        /// Config file (LMCache YAML). Default: $LMCACHE_CONFIG_FILE, else the embedded quickstart.
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// List the backend classes of every plugin library in the plugin directories (or the given ones).
    Plugins {
        /// Directories or .so files to scan. Default: KVHOST_PLUGIN_PATH and <exe dir>/plugins.
        paths: Vec<PathBuf>,
    },
    /// Replay a synthetic multi-turn inference workload through the chain (the main job), or run the
    /// micro benchmarks (`--suite micro`).
    Bench(BenchArgs),
    /// Serve LMCache's `lm://` protocol on top of the chain (point LMCache's `remote_url` at it).
    Serve(serve::Args),
    /// Run the conformance suite against one plugin class.
    ///
    /// The suite keeps at most one instance alive at a time: the checks share one instance, and the
    /// check that destroys it is followed by a fresh one made with the same options, so a store that
    /// locks its directory or file passes with one `-o path=…`. Option values may also contain
    /// `{instance}`, replaced by a number that is fresh for each instance the suite makes
    /// (1, 2, …), for stores that want a separate place per instance. Exit codes: 0 every check
    /// passed or was skipped, 1 a check failed or the plugin did not load, 2 usage error.
    Conformance(conformance::Args),
    /// The plugin author's kit: install the headers and pkg-config file.
    #[command(subcommand)]
    Sdk(SdkCommand),
    /// Write a buildable plugin skeleton (a bounded in-memory store with every required entry, its
    /// build file and a README with the conformance command) into DIR.
    NewPlugin {
        /// Language of the skeleton.
        #[arg(long, value_enum)]
        lang: new_plugin::Lang,
        /// Class name (entry point kvh_plugin_<NAME>_v1): a lowercase letter, then [a-z0-9_].
        name: String,
        /// Directory to write into (created; existing files are never overwritten).
        dir: PathBuf,
        /// Rust only: the kvhost plugin-sdk directory Cargo.toml points at. Default: this binary's
        /// checkout, when it was built from one.
        #[arg(long)]
        sdk: Option<PathBuf>,
    },
}

/// `kvhost sdk` subcommands.
#[derive(Debug, Subcommand)]
pub enum SdkCommand {
    /// Write include/kvhost/{kvhost_plugin.h, kvhost_plugin.hpp, kvhost_plugin_util.h},
    /// lib/pkgconfig/kvhost-plugin.pc and share/kvhost/lsan.supp under PREFIX (the copies compiled
    /// into this binary, so they match the ABI it speaks). Then:
    /// `PKG_CONFIG_PATH=PREFIX/lib/pkgconfig cc $(pkg-config --cflags kvhost-plugin) -shared -fPIC …`.
    Install {
        /// Where to install (e.g. /usr/local or ~/.local).
        #[arg(long)]
        prefix: PathBuf,
    },
}

pub(crate) fn parse_kv(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.trim().to_string(), v.to_string()))
        .ok_or_else(|| format!("`{s}` is not KEY=VALUE"))
}

/// Set up `tracing` from RUST_LOG (default `warn`) in the chosen format.
pub fn init_logging(cli: &Cli) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let colour = colour_wanted(
        std::io::IsTerminal::is_terminal(&std::io::stderr()),
        std::env::var_os("NO_COLOR").as_deref(),
    );
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colour)
        .with_writer(std::io::stderr);
    let _ = match cli.log_format {
        LogFormat::Human => builder.with_target(false).try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

/// Colour codes on stderr only for a terminal, and never when `NO_COLOR` is set to anything non-empty
/// (<https://no-color.org>).
fn colour_wanted(stderr_is_terminal: bool, no_color: Option<&std::ffi::OsStr>) -> bool {
    stderr_is_terminal && no_color.is_none_or(|v| v.is_empty())
}

/// Load `path`, or `$LMCACHE_CONFIG_FILE`, or the embedded default.
pub fn load_config(path: Option<&std::path::Path>) -> Result<Config, crate::ConfigError> {
    match path
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("LMCACHE_CONFIG_FILE").map(PathBuf::from))
    {
        Some(p) => Config::from_file(&p),
        None => Config::embedded_default(),
    }
}

/// Run a parsed command line.
pub fn run(cli: Cli) -> Result<ExitCode, Box<dyn std::error::Error>> {
    match cli.command {
        Command::Check { config } => check::run(config.as_deref()),
        Command::Plugins { paths } => plugins::run(&paths),
        Command::Conformance(args) => conformance::run(args),
        Command::Sdk(SdkCommand::Install { prefix }) => sdk::install(&prefix),
        Command::NewPlugin {
            lang,
            name,
            dir,
            sdk,
        } => new_plugin::run(lang, &name, &dir, sdk),
        Command::Serve(args) => serve::run(args),
        Command::Bench(args) => match args.suite {
            Suite::Micro => bench::run_micro(&args),
            Suite::Workload => bench::run_workload(&args),
            Suite::Serve => bench::run_serve(&args),
            Suite::Lmcache => bench::run_lmcache(&args),
        },
    }
}

#[cfg(test)]
mod colour_tests {
    use super::colour_wanted;
    use std::ffi::OsStr;

    #[test]
    fn colour_only_on_a_terminal_without_no_color() {
        assert!(colour_wanted(true, None));
        assert!(colour_wanted(true, Some(OsStr::new(""))));
        assert!(!colour_wanted(true, Some(OsStr::new("1"))));
        assert!(!colour_wanted(false, None));
    }
}
