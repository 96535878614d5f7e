//! `kvhost check`: is this config and its plugins sound?

use super::table;
use crate::config::{machine, Config};
use crate::loader;
use crate::plugin::capability_names;
use std::path::Path;
use std::process::ExitCode;

pub fn run(config_path: Option<&Path>) -> Result<ExitCode, Box<dyn std::error::Error>> {
    // Loaded without logging: the warnings are printed below, each once.
    let config = match config_path
        .map(std::path::PathBuf::from)
        .or_else(|| std::env::var_os("LMCACHE_CONFIG_FILE").map(Into::into))
    {
        Some(p) => Config::from_file_unlogged(&p)?,
        None => Config::embedded_default_unlogged()?,
    };
    let origin = config
        .source
        .as_ref()
        .map_or("<embedded quickstart>".to_string(), |p| {
            p.display().to_string()
        });
    println!("config: {origin}");
    println!(
        "chunk_size: {} tokens; model: {} ({} layers, {} kv heads x {}, {}); full chunk: {} bytes",
        config.chunk_size,
        config.model.name,
        config.model.num_layers,
        config.model.num_kv_heads,
        config.model.head_size,
        config.model.dtype,
        config.full_chunk_bytes()
    );
    for w in &config.warnings {
        println!("warning: {w}");
    }
    let (plugins, skipped) = loader::load_all(&config)?;
    let mut rows = vec![[
        "tier",
        "name",
        "file",
        "class",
        "version",
        "abi",
        "capabilities",
        "health",
        "stats",
        "breaker",
        "options",
    ]
    .map(String::from)
    .to_vec()];
    rows.push(vec![
        "0".into(),
        "LocalCPUBackend".into(),
        "(built in)".into(),
        "hot cache".into(),
        env!("CARGO_PKG_VERSION").into(),
        "-".into(),
        "pin,prefetch".into(),
        "ok".into(),
        "-".into(),
        "-".into(),
        format!(
            "local_cpu={} max_local_cpu_size={}GiB ({}) cache_policy={} write_policy={}",
            config.local_cpu,
            config.max_local_cpu_size,
            machine::physical_memory_bytes().map_or("machine memory unknown".to_string(), |m| {
                format!("of {} machine memory", machine::gib_text(m))
            }),
            config.cache_policy,
            config.write_policy
        ),
    ]);
    let mut unhealthy = 0;
    for (i, p) in plugins.iter().enumerate() {
        let info = p.info();
        let mut unhealthy_now = false;
        let health = match p.health() {
            None => "-".to_string(),
            Some(Ok(text)) => format!("ok: {text}"),
            Some(Err(e)) => {
                unhealthy += 1;
                unhealthy_now = true;
                format!("FAILED: {} {}", e.status, e.message)
            }
        };
        let stats = match p.stats() {
            None => "-".to_string(),
            Some(Ok(stats)) => crate::plugin::stats_line(&stats),
            Some(Err(e)) => {
                unhealthy += 1;
                format!("FAILED: {} {}", e.status, e.message)
            }
        };
        let options = info
            .options
            .iter()
            .map(|(k, v)| {
                let secret = info.schema.iter().any(|s| &s.key == k && s.secret);
                format!("{k}={}", if secret { "***" } else { v })
            })
            .collect::<Vec<_>>()
            .join(" ");
        rows.push(vec![
            (i + 1).to_string(),
            info.name.clone(),
            info.path.display().to_string(),
            info.class_name.clone(),
            info.version.clone(),
            format!("{}.{}", info.abi.0, info.abi.1),
            capability_names(info.capabilities).join(","),
            health,
            stats,
            // What the chain's probe would conclude now: a failing health keeps the breaker open.
            if unhealthy_now {
                "open (health failing)"
            } else {
                "closed"
            }
            .to_string(),
            options,
        ]);
    }
    print!("{}", table::render(&rows));
    if !plugins.is_empty() {
        let b = crate::chain::ChainSettings::from_config(&config).breaker;
        println!(
            "circuit breaker per tier: opens after {} consecutive failures, a put outstanding {:.1} s, \
             or {} arena bytes in flight (tier_max_inflight_bytes); probes health every {:.1} s",
            b.failures,
            b.put_deadline.as_secs_f64(),
            b.max_inflight_bytes,
            b.probe_interval.as_secs_f64()
        );
    }
    for s in &skipped {
        println!("skipped: {}", s.error);
    }
    if unhealthy > 0 || !skipped.is_empty() {
        println!(
            "check: {} plugin(s) unhealthy, {} skipped",
            unhealthy,
            skipped.len()
        );
        return Ok(ExitCode::from(1));
    }
    println!("check: ok ({} plugin(s) loaded)", plugins.len());
    Ok(ExitCode::SUCCESS)
}
