//! `GET /metrics` in Prometheus text format.
//!
//! LMCache's names (`lmcache:*`, with its `model_name` and `worker_id` labels) where one exists; kvhost's
//! own per-plugin and server metrics (`kvhost_*`) for what LMCache does not measure, such as storage
//! plugins, which get no metrics in LMCache at all.

use super::stats::{CloseReason, ServerStats};
use crate::chain::{Chain, LatencySummary};
use std::fmt::Write;
use std::sync::atomic::Ordering;

pub use super::metrics_http::start;

// The breaker families live in their own file, a child module that may use `Out`.
#[path = "breaker_metrics.rs"]
mod breaker_metrics;

struct Out {
    text: String,
    labels: String,
}

impl Out {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.text, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }
    fn sample(&mut self, name: &str, extra: &str, value: f64) {
        let sep = if extra.is_empty() { "" } else { "," };
        let _ = writeln!(self.text, "{name}{{{}{sep}{extra}}} {value}", self.labels);
    }
    fn one(&mut self, name: &str, kind: &str, help: &str, value: f64) {
        self.family(name, kind, help);
        self.sample(name, "", value);
    }
    /// A latency summary (quantiles in seconds) — what the chain keeps per operation.
    fn summary(&mut self, name: &str, extra: &str, s: &LatencySummary) {
        let sep = if extra.is_empty() { "" } else { "," };
        for (q, v) in [("0.5", s.p50_us), ("0.99", s.p99_us)] {
            self.sample(
                name,
                &format!("{extra}{sep}quantile=\"{q}\""),
                v as f64 / 1e6,
            );
        }
        self.sample(
            &format!("{name}_sum"),
            extra,
            s.mean_us * s.count as f64 / 1e6,
        );
        self.sample(&format!("{name}_count"), extra, s.count as f64);
    }
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// A per-tier metric: name, type, help, and how to read it from the tier's stats.
type TierMetric = (
    &'static str,
    &'static str,
    &'static str,
    fn(&crate::chain::TierStats) -> u64,
);

/// The exposition text.
pub fn render(chain: &Chain, server: &ServerStats, model_name: &str, worker_id: u32) -> String {
    let mut o = Out {
        text: String::with_capacity(8192),
        labels: format!(
            "model_name=\"{}\",worker_id=\"{worker_id}\"",
            escape(model_name)
        ),
    };
    let stats = chain.stats();
    let hot = &stats.tiers[0];
    let req = |i: usize| server.requests[i].load(Ordering::Relaxed) as f64;

    // LMCache's names.
    o.one(
        "lmcache:num_store_requests",
        "counter",
        "PUT requests served.",
        req(0),
    );
    o.one(
        "lmcache:num_retrieve_requests",
        "counter",
        "GET requests served.",
        req(1),
    );
    o.one(
        "lmcache:num_lookup_requests",
        "counter",
        "EXIST requests and lookups served.",
        req(2) + stats.lookups as f64,
    );
    o.one(
        "lmcache:local_cpu_evict_count",
        "counter",
        "Hot-cache evictions.",
        hot.evictions as f64,
    );
    o.one(
        "lmcache:local_cache_usage",
        "gauge",
        "Bytes of chunks in the hot cache.",
        stats.hot.used_bytes as f64,
    );
    o.one(
        "lmcache:local_cpu_hot_cache_count",
        "gauge",
        "Chunks in the hot cache.",
        stats.hot.entries as f64,
    );
    o.one(
        "lmcache:active_memory_objs_count",
        "gauge",
        "Hot-cache blocks held by readers or tier writes.",
        stats.hot.referenced as f64,
    );
    o.one(
        "lmcache:pinned_memory_objs_count",
        "gauge",
        "Lookups holding pins.",
        stats.pinned_lookups as f64,
    );
    o.one(
        "lmcache:forced_unpin_count",
        "counter",
        "Lookup pins released by the pin timeout.",
        stats.forced_unpins as f64,
    );
    o.one(
        "lmcache:remote_put_task_num",
        "gauge",
        "Puts in flight to plugin tiers.",
        stats.puts_in_flight as f64,
    );
    o.one(
        "lmcache:lmcache_is_healthy",
        "gauge",
        "1 while the server runs.",
        1.0,
    );
    o.family(
        "lmcache:time_to_store",
        "summary",
        "Hot-cache put latency, seconds.",
    );
    o.summary("lmcache:time_to_store", "", &hot.put_latency);
    o.family(
        "lmcache:time_to_retrieve",
        "summary",
        "Hot-cache get latency, seconds.",
    );
    o.summary("lmcache:time_to_retrieve", "", &hot.get_latency);

    // Per tier, plugins included.
    let per_tier: [TierMetric; 11] = [
        (
            "kvhost_tier_hits_total",
            "counter",
            "Chunks found in the tier by gets.",
            |t| t.hits,
        ),
        (
            "kvhost_tier_misses_total",
            "counter",
            "Chunks looked for in the tier and not found.",
            |t| t.misses,
        ),
        (
            "kvhost_tier_puts_total",
            "counter",
            "Chunks stored into the tier.",
            |t| t.puts,
        ),
        (
            "kvhost_tier_put_skipped_total",
            "counter",
            "Chunks not stored because the tier held them.",
            |t| t.put_skipped,
        ),
        (
            "kvhost_tier_put_dropped_total",
            "counter",
            "Chunks dropped by a full queue (backpressure: drop).",
            |t| t.put_dropped,
        ),
        (
            "kvhost_tier_no_space_total",
            "counter",
            "Chunks refused for lack of room.",
            |t| t.no_space,
        ),
        (
            "kvhost_tier_errors_total",
            "counter",
            "Operations that failed in the tier.",
            |t| t.errors,
        ),
        (
            "kvhost_tier_promotions_total",
            "counter",
            "Chunks promoted from the tier into the hot cache.",
            |t| t.promotions,
        ),
        (
            "kvhost_tier_demotions_total",
            "counter",
            "Chunks demoted into the tier on eviction.",
            |t| t.demotions,
        ),
        (
            "kvhost_tier_queue_depth",
            "gauge",
            "Chunks waiting in the tier's queue.",
            |t| t.queue_depth,
        ),
        (
            "kvhost_tier_puts_in_flight",
            "gauge",
            "Chunks queued or being stored into the tier.",
            |t| t.puts_in_flight,
        ),
    ];
    for (name, kind, help, f) in per_tier {
        o.family(name, kind, help);
        for t in &stats.tiers {
            o.sample(name, &format!("tier=\"{}\"", escape(&t.name)), f(t) as f64);
        }
    }
    breaker_metrics::families(&mut o, &stats.tiers);
    o.family(
        "kvhost_tier_bytes_total",
        "counter",
        "Bytes moved into (in) and out of (out) the tier.",
    );
    for t in &stats.tiers {
        let tier = escape(&t.name);
        o.sample(
            "kvhost_tier_bytes_total",
            &format!("tier=\"{tier}\",direction=\"in\""),
            t.bytes_in as f64,
        );
        o.sample(
            "kvhost_tier_bytes_total",
            &format!("tier=\"{tier}\",direction=\"out\""),
            t.bytes_out as f64,
        );
    }
    o.family(
        "kvhost_tier_latency_seconds",
        "summary",
        "Tier operation latency (per plugin call), seconds.",
    );
    for t in &stats.tiers {
        let tier = escape(&t.name);
        for (op, s) in [
            ("put", &t.put_latency),
            ("get", &t.get_latency),
            ("lookup", &t.lookup_latency),
        ] {
            o.summary(
                "kvhost_tier_latency_seconds",
                &format!("tier=\"{tier}\",op=\"{op}\""),
                s,
            );
        }
    }

    // What each plugin reports about itself (ABI 1.3 `stats`): one untyped family, `kind` saying
    // which samples are counters and which gauges.
    o.family(
        "kvhost_plugin_stat",
        "untyped",
        "Counters and gauges a plugin tier reports through its stats entry.",
    );
    for p in chain.plugin_stats() {
        for s in p.stats.unwrap_or_default() {
            let kind = match s.kind {
                crate::plugin::StatKind::Counter => "counter",
                crate::plugin::StatKind::Gauge => "gauge",
            };
            o.sample(
                "kvhost_plugin_stat",
                &format!(
                    "tier=\"{}\",name=\"{}\",kind=\"{kind}\"",
                    escape(&p.tier),
                    s.name
                ),
                s.value as f64,
            );
        }
    }

    // The server.
    o.family(
        "kvhost_serve_requests_total",
        "counter",
        "Requests by command.",
    );
    for (i, c) in ["put", "get", "exist", "list", "health"].iter().enumerate() {
        o.sample(
            "kvhost_serve_requests_total",
            &format!("command=\"{c}\""),
            req(i),
        );
    }
    let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed) as f64;
    o.family(
        "kvhost_serve_bytes_total",
        "counter",
        "Chunk bytes received by PUT (in) and sent by GET (out).",
    );
    o.sample(
        "kvhost_serve_bytes_total",
        "direction=\"in\"",
        load(&server.bytes_in),
    );
    o.sample(
        "kvhost_serve_bytes_total",
        "direction=\"out\"",
        load(&server.bytes_out),
    );
    o.family("kvhost_serve_get_total", "counter", "GETs by result.");
    o.sample(
        "kvhost_serve_get_total",
        "result=\"hit\"",
        load(&server.get_hits),
    );
    o.sample(
        "kvhost_serve_get_total",
        "result=\"miss\"",
        load(&server.get_misses),
    );
    o.family("kvhost_serve_put_total", "counter", "PUTs by result.");
    o.sample(
        "kvhost_serve_put_total",
        "result=\"stored\"",
        load(&server.puts_stored),
    );
    o.sample(
        "kvhost_serve_put_total",
        "result=\"duplicate\"",
        load(&server.puts_duplicate),
    );
    o.sample(
        "kvhost_serve_put_total",
        "result=\"no_space\"",
        load(&server.puts_no_space),
    );
    o.sample(
        "kvhost_serve_put_total",
        "result=\"over_budget\"",
        load(&server.puts_over_budget),
    );
    o.one(
        "kvhost_serve_put_body_bytes_staged",
        "gauge",
        "Bytes of PUT bodies being received (staged outside the hot cache until complete).",
        load(&server.put_body_bytes_staged),
    );
    o.one(
        "kvhost_serve_accept_errors_total",
        "counter",
        "Failed accepts (EMFILE and the like); the server backs off and keeps serving.",
        load(&server.accept_errors),
    );
    o.one(
        "kvhost_serve_connections_open",
        "gauge",
        "Connections open.",
        load(&server.connections_open),
    );
    o.one(
        "kvhost_serve_connections_total",
        "counter",
        "Connections accepted.",
        load(&server.connections_total),
    );
    o.family(
        "kvhost_serve_connections_closed_total",
        "counter",
        "Connections closed by the server, by reason.",
    );
    for r in CloseReason::ALL {
        o.sample(
            "kvhost_serve_connections_closed_total",
            &format!("reason=\"{}\"", r.name()),
            server.closed_for(r) as f64,
        );
    }
    o.text
}
