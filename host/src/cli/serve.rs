//! `kvhost serve`: run the `lm://` server until SIGINT or SIGTERM, then stop within seconds.
//!
//! On the first signal the listener closes at once, idle connections close, requests in progress get
//! `shutdown_grace_secs` to finish, and write-through puts get `drain_timeout_secs` to reach the
//! plugins; then the process exits 0. A second signal kills the process (the default action).

use crate::chain::Chain;
use crate::config::ServeKeys;
use crate::serve::{metrics, ServeConfig, Server};
use signal_hook::consts::{SIGINT, SIGTERM};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// Defaults not in [`ServeConfig`]: seconds for write-through puts to drain after a stop.
const DEFAULT_DRAIN_SECS: f64 = 4.0;

/// `kvhost serve` flags. Each limit overrides the config's `serve:` key of the same name.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Config file. Default: $LMCACHE_CONFIG_FILE, else the embedded quickstart.
    #[arg(long, short)]
    pub config: Option<PathBuf>,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:65432")]
    pub listen: SocketAddr,
    /// Serve Prometheus metrics (GET /metrics) on this address.
    #[arg(long)]
    pub metrics: Option<SocketAddr>,
    /// Largest chunk a PUT may carry, bytes [default: 1073741824].
    #[arg(long)]
    pub max_chunk_bytes: Option<u64>,
    /// Bytes of PUT bodies in progress across all connections; PUTs past it are refused [default: 2147483648].
    #[arg(long)]
    pub put_body_budget_bytes: Option<u64>,
    /// Connections open at once; more are refused at accept [default: 16384].
    #[arg(long)]
    pub max_connections: Option<usize>,
    /// Seconds a connection may idle between requests, 0 for never [default: 600].
    #[arg(long)]
    pub idle_timeout: Option<f64>,
    /// Seconds a whole request (header, body, reply) may take from its first byte [default: 60].
    #[arg(long)]
    pub request_deadline: Option<f64>,
    /// Seconds a client may stall inside a request before its connection is closed [default: 10].
    #[arg(long)]
    pub stall_timeout: Option<f64>,
    /// Seconds requests in progress get to finish after SIGTERM [default: 2].
    #[arg(long)]
    pub shutdown_grace: Option<f64>,
    /// Seconds write-through puts get to reach the plugins after SIGTERM [default: 4].
    #[arg(long)]
    pub drain_timeout: Option<f64>,
}

/// The server settings: flags over the config's `serve:` keys over the defaults.
fn serve_config(keys: &ServeKeys, args: &Args) -> Result<(ServeConfig, Duration), String> {
    // The flags go through the same checks as the config keys.
    let merged = ServeKeys {
        max_connections: args.max_connections.or(keys.max_connections),
        idle_timeout_secs: args.idle_timeout.or(keys.idle_timeout_secs),
        request_deadline_secs: args.request_deadline.or(keys.request_deadline_secs),
        stall_timeout_secs: args.stall_timeout.or(keys.stall_timeout_secs),
        max_chunk_bytes: args.max_chunk_bytes.or(keys.max_chunk_bytes),
        put_body_budget_bytes: args.put_body_budget_bytes.or(keys.put_body_budget_bytes),
        shutdown_grace_secs: args.shutdown_grace.or(keys.shutdown_grace_secs),
        drain_timeout_secs: args.drain_timeout.or(keys.drain_timeout_secs),
    };
    merged
        .check()
        .map_err(|e| format!("{e} (from --flags or the config's serve: section)"))?;
    let d = ServeConfig::default();
    let secs = Duration::from_secs_f64;
    let config = ServeConfig {
        max_chunk_bytes: merged.max_chunk_bytes.unwrap_or(d.max_chunk_bytes),
        stall_timeout: merged.stall_timeout_secs.map_or(d.stall_timeout, secs),
        request_deadline: merged
            .request_deadline_secs
            .map_or(d.request_deadline, secs),
        idle_timeout: match merged.idle_timeout_secs {
            None => d.idle_timeout,
            Some(0.0) => None,
            Some(s) => Some(secs(s)),
        },
        max_connections: merged.max_connections.unwrap_or(d.max_connections),
        put_body_budget: merged.put_body_budget_bytes.unwrap_or(d.put_body_budget),
        shutdown_grace: merged.shutdown_grace_secs.map_or(d.shutdown_grace, secs),
        worker_threads: d.worker_threads,
    };
    if config.max_chunk_bytes > config.put_body_budget {
        return Err(format!(
            "max_chunk_bytes {} is larger than put_body_budget_bytes {}: the largest PUT could never be accepted",
            config.max_chunk_bytes, config.put_body_budget
        ));
    }
    let drain = secs(merged.drain_timeout_secs.unwrap_or(DEFAULT_DRAIN_SECS));
    Ok((config, drain))
}

/// Descriptors the server needs besides one per connection (plugins, arena, runtimes, metrics).
const FD_HEADROOM: u64 = 256;

/// Say so at start when the soft limit on open files cannot hold `max_connections`: past it, accepts
/// fail with EMFILE (the server backs off and survives, but new clients wait).
fn warn_if_fd_limit_low(max_connections: usize) {
    let soft = std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|l| {
            l.lines()
                .find(|l| l.starts_with("Max open files"))
                .and_then(|l| l.split_whitespace().nth(3))
                .and_then(|v| v.parse::<u64>().ok())
        });
    if let Some(soft) = soft {
        if soft < max_connections as u64 + FD_HEADROOM {
            eprintln!(
                "kvhost: warning: the open-file limit ({soft}) cannot hold max_connections ({max_connections}) \
                 plus {FD_HEADROOM}; raise it (ulimit -n, or LimitNOFILE= under systemd) or lower max_connections"
            );
        }
    }
}

/// Run the server until a signal, then stop cleanly.
pub fn run(args: Args) -> Result<ExitCode, Box<dyn std::error::Error>> {
    // Catch SIGINT/SIGTERM from the start: building the chain (prefaulting the arena, loading
    // plugins) can take seconds; a signal meanwhile is kept and stops the server as soon as it runs.
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM])?;
    let config = super::load_config(args.config.as_deref())?;
    let (serve_config, drain_timeout) = serve_config(&config.serve, &args)?;
    warn_if_fd_limit_low(serve_config.max_connections);
    let chain = Chain::from_config(&config)?;
    let server = Server::start(chain.clone(), args.listen, serve_config)
        .map_err(|e| format!("cannot listen on {}: {e}", args.listen))?;
    let stopper = server.stopper();
    let signalled = std::sync::Arc::new(parking_lot::Mutex::new(None::<Instant>));
    let signalled_at = signalled.clone();
    std::thread::Builder::new()
        .name("kvhost-signals".into())
        .spawn(move || {
            if let Some(sig) = signals.forever().next() {
                *signalled_at.lock() = Some(Instant::now());
                eprintln!("kvhost: signal {sig}: stopping (new connections refused)");
                stopper.stop();
            }
            // Dropping `signals` restores the default action: a second signal kills the process.
        })?;
    if let Some(addr) = args.metrics {
        let bound = metrics::start(
            addr,
            chain.clone(),
            server.stats().clone(),
            config.model.name.clone(),
            config.model.worker_id,
        )
        .map_err(|e| format!("cannot serve metrics on {addr}: {e}"))?;
        eprintln!("kvhost: metrics on http://{bound}/metrics");
    }
    eprintln!(
        "kvhost: serving lm://{} ({})",
        server.local_addr(),
        chain.tier_names().join(" -> ")
    );
    server.wait();
    eprintln!("kvhost: connections closed; draining puts in flight (up to {drain_timeout:?})");
    let report = chain.close(drain_timeout);
    if !report.unfinished.is_empty() {
        eprintln!(
            "kvhost: {} put(s) did not reach every plugin: {}",
            report.unfinished.len(),
            report
                .unfinished
                .iter()
                .map(|k| crate::log_limit::escape_str(k).to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    crate::log_limit::report_suppressed();
    let stats = server.stats();
    let took = signalled
        .lock()
        .map(|t| format!(", {:.2} s after the signal", t.elapsed().as_secs_f64()))
        .unwrap_or_default();
    eprintln!(
        "kvhost: stopped ({} connections, {} requests); {} puts stored{took}",
        stats.connections_total.load(Ordering::Relaxed),
        stats.requests_total(),
        stats.puts_stored.load(Ordering::Relaxed),
    );
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: Args,
    }

    fn args(flags: &[&str]) -> Args {
        Cli::parse_from(std::iter::once("serve").chain(flags.iter().copied())).args
    }

    #[test]
    fn flags_override_config_keys_override_defaults() {
        let keys = ServeKeys {
            max_connections: Some(100),
            idle_timeout_secs: Some(0.0),
            request_deadline_secs: Some(5.0),
            ..ServeKeys::default()
        };
        let (c, drain) = serve_config(&keys, &args(&["--max-connections", "7"])).unwrap();
        assert_eq!(c.max_connections, 7, "the flag wins");
        assert_eq!(c.idle_timeout, None, "0 means never");
        assert_eq!(
            c.request_deadline,
            Duration::from_secs(5),
            "the key applies"
        );
        assert_eq!(c.stall_timeout, ServeConfig::default().stall_timeout);
        assert_eq!(drain, Duration::from_secs_f64(DEFAULT_DRAIN_SECS));
    }

    #[test]
    fn bad_flags_are_refused_by_name() {
        let e = serve_config(&ServeKeys::default(), &args(&["--request-deadline=-3"])).unwrap_err();
        assert!(e.contains("request_deadline_secs -3"), "{e}");
        let e = serve_config(
            &ServeKeys::default(),
            &args(&["--max-chunk-bytes", "4294967296"]),
        )
        .unwrap_err();
        assert!(e.contains("put_body_budget_bytes"), "{e}");
    }
}
