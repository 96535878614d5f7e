//! `kvhost bench` (the main job): replay a synthetic multi-turn inference workload through the real
//! chain and report what each tier did.
//!
//! Sessions share a system prompt and grow turn by turn, so prefixes are reused as in serving. Each
//! request is the session's whole conversation so far: look up the cached prefix, get those chunks,
//! and put the chunks that follow it.

use crate::chain::{Chain, PutOutcome, TierStats};
use crate::config::{Config, ModelSpec};
use crate::key::Chunker;
use hdrhistogram::Histogram;
use kvhost_plugin_sdk::ChunkMeta;
use std::time::{Duration, Instant};

/// A model shape by name.
pub fn preset(name: &str) -> Option<ModelSpec> {
    let (n, layers, heads, dim) = match name {
        "llama-3.1-8b" => ("meta-llama/Llama-3.1-8B-Instruct", 32, 8, 128),
        "llama-3.1-70b" => ("meta-llama/Llama-3.1-70B-Instruct", 80, 8, 128),
        "qwen2.5-7b" => ("Qwen/Qwen2.5-7B-Instruct", 28, 4, 128),
        "mistral-7b" => ("mistralai/Mistral-7B-Instruct-v0.3", 32, 8, 128),
        "tiny" => ("kvhost/tiny", 4, 2, 64),
        _ => return None,
    };
    Some(ModelSpec {
        name: n.to_string(),
        num_layers: layers,
        num_kv_heads: heads,
        head_size: dim,
        dtype: "bfloat16".to_string(),
        ..ModelSpec::default()
    })
}

/// Names accepted by [`preset`].
pub const PRESETS: &[&str] = &[
    "llama-3.1-8b",
    "llama-3.1-70b",
    "qwen2.5-7b",
    "mistral-7b",
    "tiny",
];

/// The workload's shape.
#[derive(Clone, Debug)]
pub struct WorkloadOptions {
    /// Concurrent conversations.
    pub sessions: usize,
    /// Turns before a conversation ends (and a new one starts in its place).
    pub turns: usize,
    /// Tokens of the system prompt every session shares.
    pub system_tokens: usize,
    /// Tokens a user adds per turn.
    pub user_tokens: usize,
    /// Tokens the model answers per turn.
    pub answer_tokens: usize,
    /// Probability that a request continues an open session rather than start a new one.
    pub reuse: f64,
    /// Random seed.
    pub seed: u64,
    /// Stop after this long…
    pub duration: Duration,
    /// …or after this many requests, if set.
    pub requests: Option<u64>,
}

impl Default for WorkloadOptions {
    fn default() -> Self {
        WorkloadOptions {
            sessions: 8,
            turns: 6,
            system_tokens: 1024,
            user_tokens: 256,
            answer_tokens: 256,
            reuse: 0.8,
            seed: 42,
            duration: Duration::from_secs(10),
            requests: None,
        }
    }
}

/// The result of a run.
#[derive(Clone, Debug, serde::Serialize)]
pub struct WorkloadReport {
    /// Model name.
    pub model: String,
    /// Bytes per full chunk.
    pub chunk_bytes: u64,
    /// Tokens per chunk.
    pub chunk_size: u32,
    /// Requests served.
    pub requests: u64,
    /// Wall time, seconds.
    pub seconds: f64,
    /// Chunks the requests asked for.
    pub chunks_requested: u64,
    /// Of those, found in some tier (the cached prefix).
    pub chunks_hit: u64,
    /// Chunks put.
    pub chunks_put: u64,
    /// Puts refused for lack of room.
    pub no_space: u64,
    /// Chunks found per tier by lookups, in tier order.
    pub hits_by_tier: Vec<(String, u64)>,
    /// Bytes read by gets (copied out of the cache, as an engine would).
    pub bytes_read: u64,
    /// Bytes written by puts.
    pub bytes_written: u64,
    /// Request-level latency, µs: lookup / get / put (p50, p99).
    pub latency_us: Vec<(String, u64, u64)>,
    /// Per-tier counters from the chain.
    pub tiers: Vec<TierStats>,
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*: deterministic and good enough to pick sessions and tokens.
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
    fn tokens(&mut self, n: usize) -> Vec<u32> {
        (0..n).map(|_| (self.next() % 128_000) as u32).collect()
    }
}

struct Session {
    tokens: Vec<u32>,
    turns: usize,
}

fn hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid bounds")
}

/// Run the workload against `chain`, calling `progress(done_fraction, requests)` now and then.
pub fn run(
    chain: &Chain,
    config: &Config,
    opts: &WorkloadOptions,
    mut progress: impl FnMut(f64, u64),
) -> WorkloadReport {
    let model = &config.model;
    let chunker = Chunker::new(
        &model.name,
        model.world_size,
        model.worker_id,
        &model.dtype,
        config.chunk_size as usize,
        false,
    )
    .expect("model fields validated by the config");
    let chunk_bytes = config.full_chunk_bytes();
    let (_, dtype_code) = crate::config::dtype_info(&model.dtype).unwrap_or((2, 0));
    let meta = ChunkMeta {
        length: chunk_bytes,
        fmt: kvhost_plugin_sdk::abi::KVH_FMT_KV_2LTD,
        dtype: dtype_code,
        ndim: 4,
        shape: [
            model.kv_count() as i32,
            model.num_layers as i32,
            config.chunk_size as i32,
            (model.num_kv_heads * model.head_size) as i32,
        ],
        reserved: 0,
    };
    // One chunk's worth of bytes, written into every new chunk (the contents do not matter here), and a
    // destination every hit is copied into, as an engine copies KV to the GPU: get GB/s is real copying.
    let pattern: Vec<u8> = (0..chunk_bytes).map(|i| (i * 131 % 251) as u8).collect();
    let mut sink = memmap2::MmapOptions::new()
        .len(chunk_bytes.max(1) as usize)
        .populate()
        .map_anon()
        .expect("map the destination buffer");
    let _ = sink.advise(memmap2::Advice::HugePage);
    let mut rng = Rng(opts.seed | 1);
    let system = rng.tokens(opts.system_tokens);
    let mut sessions: Vec<Session> = Vec::new();
    let (mut lookup_h, mut get_h, mut put_h) = (hist(), hist(), hist());
    let mut tier_hits: Vec<(String, u64)> =
        chain.tier_names().into_iter().map(|n| (n, 0)).collect();
    let (mut requested, mut hit, mut put, mut no_space, mut bytes_read, mut bytes_written) =
        (0u64, 0u64, 0u64, 0u64, 0u64, 0u64);
    let started = Instant::now();
    let mut requests = 0u64;
    loop {
        let elapsed = started.elapsed();
        let done = match opts.requests {
            Some(n) => requests as f64 / n as f64,
            None => elapsed.as_secs_f64() / opts.duration.as_secs_f64(),
        };
        if done >= 1.0 {
            break;
        }
        if requests % 4 == 0 {
            progress(done, requests);
        }
        // Pick a session: continue an open one, or start a new one after the shared system prompt.
        let idx = if !sessions.is_empty()
            && (sessions.len() >= opts.sessions || rng.unit() < opts.reuse)
        {
            (rng.next() % sessions.len() as u64) as usize
        } else {
            sessions.push(Session {
                tokens: system.clone(),
                turns: 0,
            });
            sessions.len() - 1
        };
        let user = rng.tokens(opts.user_tokens);
        sessions[idx].tokens.extend(user);
        let chunks = chunker.chunks(&sessions[idx].tokens);
        let keys: Vec<_> = chunks.iter().map(|c| c.key.clone()).collect();
        requested += keys.len() as u64;

        let t = Instant::now();
        let lookup = chain.lookup(&keys, None);
        let _ = lookup_h.record(t.elapsed().as_micros().max(1) as u64);
        for (tier, ks) in &lookup.by_tier {
            if let Some(entry) = tier_hits.iter_mut().find(|(n, _)| n == tier) {
                entry.1 += ks.len() as u64;
            }
        }
        let prefix = lookup.hit_chunks;
        if prefix > 0 {
            let t = Instant::now();
            let got = chain.get(&keys[..prefix]);
            for h in got.iter().flatten() {
                let n = h.len().min(sink.len());
                sink[..n].copy_from_slice(&h.bytes()[..n]);
                bytes_read += n as u64;
                hit += 1;
            }
            let _ = get_h.record(t.elapsed().as_micros().max(1) as u64);
        }
        if prefix < keys.len() {
            let t = Instant::now();
            for key in &keys[prefix..] {
                match chain.put_with(key, chunk_bytes as usize, meta, |dst| {
                    dst.copy_from_slice(&pattern)
                }) {
                    PutOutcome::Stored => {
                        put += 1;
                        bytes_written += chunk_bytes;
                    }
                    PutOutcome::NoSpace(_) => no_space += 1,
                    PutOutcome::Duplicate | PutOutcome::Closed => {}
                }
            }
            let _ = put_h.record(t.elapsed().as_micros().max(1) as u64);
        }
        // The model answers; the answer becomes part of the next turn's prompt.
        let answer = rng.tokens(opts.answer_tokens);
        let s = &mut sessions[idx];
        s.tokens.extend(answer);
        s.turns += 1;
        if s.turns >= opts.turns {
            sessions.swap_remove(idx);
        }
        requests += 1;
    }
    progress(1.0, requests);
    let seconds = started.elapsed().as_secs_f64();
    let q = |h: &Histogram<u64>| (h.value_at_quantile(0.5), h.value_at_quantile(0.99));
    WorkloadReport {
        model: model.name.clone(),
        chunk_bytes,
        chunk_size: config.chunk_size,
        requests,
        seconds,
        chunks_requested: requested,
        chunks_hit: hit,
        chunks_put: put,
        no_space,
        hits_by_tier: tier_hits,
        bytes_read,
        bytes_written,
        latency_us: vec![
            ("lookup".into(), q(&lookup_h).0, q(&lookup_h).1),
            ("get".into(), q(&get_h).0, q(&get_h).1),
            ("put".into(), q(&put_h).0, q(&put_h).1),
        ],
        tiers: chain.stats_with_plugins(),
    }
}

/// The report as text tables.
pub fn render(r: &WorkloadReport) -> String {
    let gb = |b: u64| b as f64 / 1e9;
    let mut out = format!(
        "model {} | chunk {} tokens = {:.1} MiB | {} requests in {:.1} s ({:.1} req/s)\n\
         chunks: {} requested, {} hit ({:.1}%), {} put, {} refused (no space)\n\
         data: read {:.2} GB ({:.2} GB/s), written {:.2} GB ({:.2} GB/s)\n\n",
        r.model,
        r.chunk_size,
        r.chunk_bytes as f64 / (1 << 20) as f64,
        r.requests,
        r.seconds,
        r.requests as f64 / r.seconds,
        r.chunks_requested,
        r.chunks_hit,
        100.0 * r.chunks_hit as f64 / r.chunks_requested.max(1) as f64,
        r.chunks_put,
        r.no_space,
        gb(r.bytes_read),
        gb(r.bytes_read) / r.seconds,
        gb(r.bytes_written),
        gb(r.bytes_written) / r.seconds,
    );
    let mut rows = vec![["latency (request)", "p50", "p99"]
        .map(String::from)
        .to_vec()];
    for (name, p50, p99) in &r.latency_us {
        rows.push(vec![
            name.clone(),
            format!("{:.2} ms", *p50 as f64 / 1e3),
            format!("{:.2} ms", *p99 as f64 / 1e3),
        ]);
    }
    out += &crate::cli::table::render(&rows);
    out.push('\n');
    let mut rows = vec![[
        "tier",
        "hit rate",
        "hits",
        "in GB",
        "out GB",
        "GB/s in",
        "put p50/p99",
        "get p50/p99",
        "evictions",
        "promotions",
        "no space",
        "errors",
        "corrupt",
        "breaker (trips, open s, skipped)",
    ]
    .map(String::from)
    .to_vec()];
    for t in &r.tiers {
        let lookups_hit = r
            .hits_by_tier
            .iter()
            .find(|(n, _)| n == &t.name)
            .map_or(0, |(_, h)| *h);
        rows.push(vec![
            t.name.clone(),
            format!(
                "{:.1}%",
                100.0 * lookups_hit as f64 / r.chunks_requested.max(1) as f64
            ),
            lookups_hit.to_string(),
            format!("{:.2}", gb(t.bytes_in)),
            format!("{:.2}", gb(t.bytes_out)),
            format!("{:.2}", gb(t.bytes_in) / r.seconds),
            format!("{}/{} µs", t.put_latency.p50_us, t.put_latency.p99_us),
            format!("{}/{} µs", t.get_latency.p50_us, t.get_latency.p99_us),
            t.evictions.to_string(),
            t.promotions.to_string(),
            t.no_space.to_string(),
            t.errors.to_string(),
            t.corrupt.to_string(),
            t.breaker.as_ref().map_or("-".to_string(), |b| {
                format!(
                    "{} ({}, {:.1} s, {})",
                    b.state, b.trips, b.open_secs, b.skipped
                )
            }),
        ]);
    }
    out += &crate::cli::table::render(&rows);
    let reported: Vec<_> = r.tiers.iter().filter(|t| !t.plugin.is_empty()).collect();
    if !reported.is_empty() {
        out.push_str("\nplugin stats (ABI 1.3, as each plugin reports them):\n");
        let mut rows = vec![vec!["tier".to_string(), "stats".to_string()]];
        for t in reported {
            rows.push(vec![t.name.clone(), crate::plugin::stats_line(&t.plugin)]);
        }
        out += &crate::cli::table::render(&rows);
    }
    out
}
