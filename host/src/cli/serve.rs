//! `kvhost serve`: run the `lm://` server until SIGINT or SIGTERM, then drain and exit 0.

use crate::chain::Chain;
use crate::serve::{metrics, ServeConfig, Server};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::time::Duration;

pub struct Args {
    pub config: Option<PathBuf>,
    pub listen: SocketAddr,
    pub metrics: Option<SocketAddr>,
    pub max_chunk_bytes: u64,
    pub stall_timeout: f64,
    pub drain_timeout: f64,
}

pub fn run(args: Args) -> Result<ExitCode, Box<dyn std::error::Error>> {
    // Catch SIGINT/SIGTERM from the start: building the chain (prefaulting the arena, loading
    // plugins) can take seconds, and a signal meanwhile must stop the server cleanly, not kill it.
    let early_stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(signal, early_stop.clone())?;
    }
    let config = super::load_config(args.config.as_deref())?;
    let chain = Chain::from_config(&config)?;
    let serve_config = ServeConfig {
        max_chunk_bytes: args.max_chunk_bytes,
        stall_timeout: Duration::from_secs_f64(args.stall_timeout.max(0.1)),
        ..ServeConfig::default()
    };
    let server = Server::start(chain.clone(), args.listen, serve_config)
        .map_err(|e| format!("cannot listen on {}: {e}", args.listen))?;
    let stop = server.stop_flag();
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(signal, stop.clone())?;
    }
    if early_stop.load(Ordering::Acquire) {
        server.shutdown();
    }
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
    eprintln!("kvhost: stopping; draining puts in flight");
    let report = chain.close(Duration::from_secs_f64(args.drain_timeout));
    if !report.unfinished.is_empty() {
        eprintln!(
            "kvhost: {} put(s) did not finish: {}",
            report.unfinished.len(),
            report.unfinished.join(", ")
        );
    }
    let stats = server.stats();
    eprintln!(
        "kvhost: stopped ({} connections, {} requests)",
        stats.connections_total.load(Ordering::Relaxed),
        stats
            .requests
            .iter()
            .map(|r| r.load(Ordering::Relaxed))
            .sum::<u64>()
    );
    Ok(ExitCode::SUCCESS)
}
