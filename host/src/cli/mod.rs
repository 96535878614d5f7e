//! Front end: the `kvhost` command line.

mod bench;
mod check;
mod conformance;
mod plugins;
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
    Conformance {
        /// Path to the .so, or a name searched in the plugin directories.
        #[arg(long)]
        plugin: String,
        /// Backend class (the entry point is kvh_plugin_<class>_v1).
        #[arg(long)]
        class: String,
        /// Plugin option, repeatable.
        #[arg(long = "option", short = 'o', value_name = "KEY=VALUE", value_parser = parse_kv)]
        options: Vec<(String, String)>,
    },
}

fn parse_kv(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.trim().to_string(), v.to_string()))
        .ok_or_else(|| format!("`{s}` is not KEY=VALUE"))
}

/// Set up `tracing` from RUST_LOG (default `warn`) in the chosen format.
pub fn init_logging(cli: &Cli) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match cli.log_format {
        LogFormat::Human => builder.with_target(false).try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
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
        Command::Conformance {
            plugin,
            class,
            options,
        } => conformance::run(&plugin, &class, options),
        Command::Serve(args) => serve::run(args),
        Command::Bench(args) => match args.suite {
            Suite::Micro => bench::run_micro(args.json.as_deref(), args.quick),
            Suite::Workload => bench::run_workload(&args),
            Suite::Serve => bench::run_serve(&args),
            Suite::Lmcache => bench::run_lmcache(&args),
        },
    }
}
