//! Front end: the `kvhost` command line.

mod bench;
mod check;
mod conformance;
mod plugins;
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

/// Benchmark suites.
#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum Suite {
    /// Hot cache, plugin call and chain costs against the machine's limits.
    Micro,
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
    /// Benchmarks: `--suite micro` measures the data path against memcpy and a linked-in no-op.
    Bench {
        /// Which suite.
        #[arg(long, value_enum, default_value_t = Suite::Micro)]
        suite: Suite,
        /// Also write the results as JSON here.
        #[arg(long)]
        json: Option<PathBuf>,
        /// Small sizes: checks that every row runs; the numbers mean little.
        #[arg(long)]
        quick: bool,
    },
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
        Command::Bench {
            suite: Suite::Micro,
            json,
            quick,
        } => bench::run_micro(json.as_deref(), quick),
    }
}
