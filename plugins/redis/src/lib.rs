//! `redis`: a kvhost storage backend that keeps KV chunks in one Redis server or a Redis Cluster.
//!
//! - `put`, `get`, and (ABI 1.2) `contains_async` and `remove_async` run on the backend's own worker
//!   threads and complete asynchronously, so no host thread waits on the network; each request is one
//!   pipeline per node (two for chunks split into parts: parts, then manifests). The synchronous
//!   `contains` and `remove`, for hosts older than ABI 1.2, run the same pipelines on the calling thread.
//! - Values larger than `part_size_mib` are split into parts, written before the manifest that makes the
//!   chunk visible; all keys of a chunk share one hash tag, so in a cluster they live on one node.
//! - Values are written from and read into the host's buffers without intermediate copies.
//! - A node that fails is marked down for `down_ms`: calls to it fail at once with its last error, and
//!   the next call after that reconnects. In a cluster a lost connection or `MOVED` refreshes the slot
//!   map and retries the affected items (up to three passes).
//!
//! See `README.md` for the options, the key layout and the guarantees.

mod control;
mod engine;
mod layout;
mod resp;
mod tls;

use control::{Target, Timeouts, Topology};
use crossbeam_channel::{Receiver, Sender, TrySendError};
use engine::{Engine, Settings};
use kvhost_plugin_sdk::abi;
use kvhost_plugin_sdk::log;
use kvhost_plugin_sdk::*;
use parking_lot::{Mutex, RwLock};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

enum Job {
    Put(Pending<Put>),
    Get(Pending<Get>),
    Contains(Pending<Contains>),
    Remove(Pending<Remove>),
}

/// Requests queued per worker thread before a request is answered `BUSY`.
const QUEUE_PER_WORKER: usize = 64;

/// The `redis` backend: an [`Engine`] plus its worker threads.
pub struct RedisBackend {
    engine: Arc<Engine>,
    queue: RwLock<Option<Sender<Job>>>,
    workers: Mutex<Vec<JoinHandle<()>>>,
    counters: Arc<Counters>,
}

/// What the ABI 1.3 `stats` entry reports: keys handled per kind of request, whole requests that
/// failed, and requests refused because the queue was full. A shared store has no capacity or
/// entry count of this instance's own, so neither is reported.
#[derive(Debug, Default)]
struct Counters {
    put_keys: std::sync::atomic::AtomicU64,
    get_keys: std::sync::atomic::AtomicU64,
    lookup_keys: std::sync::atomic::AtomicU64,
    remove_keys: std::sync::atomic::AtomicU64,
    failed_requests: std::sync::atomic::AtomicU64,
    busy_requests: std::sync::atomic::AtomicU64,
}

impl Counters {
    fn add(c: &std::sync::atomic::AtomicU64, n: usize) {
        c.fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
    }
}

impl std::fmt::Debug for RedisBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisBackend")
            .field("engine", &self.engine)
            .finish()
    }
}

fn opt<'a>(ctx: &'a CreateContext, key: &str) -> &'a str {
    ctx.option(key).unwrap_or("").trim()
}

fn positive<T: std::str::FromStr + PartialOrd + Default + std::fmt::Display>(
    ctx: &CreateContext,
    key: &str,
    max: T,
) -> Result<T, Error>
where
    T::Err: std::fmt::Display,
{
    let v: T = ctx.parse(key)?;
    if v <= T::default() || v > max {
        return Err(Error::config(format!(
            "redis: option `{key}` = `{v}`: expected more than 0 and at most {max}"
        )));
    }
    Ok(v)
}

/// Parse the options of `create`.
fn settings_from(
    ctx: &CreateContext,
) -> Result<(Target, resp::Handshake, Timeouts, Settings, usize), Error> {
    let url = opt(ctx, "url");
    let nodes = opt(ctx, "cluster_nodes");
    let password = opt(ctx, "password");
    let username = opt(ctx, "username");
    let (target, mut hs, url_tls) = match (url.is_empty(), nodes.is_empty()) {
        (false, false) => {
            return Err(Error::config(
                "redis: give either `url` (one server) or `cluster_nodes` (a Redis Cluster), not both",
            ))
        }
        (true, true) => {
            return Err(Error::config(
                "redis: option `url` (redis://host:port/db) or `cluster_nodes` (host:port,host:port,...) is required",
            ))
        }
        (false, true) => {
            let (addr, hs, tls) = control::parse_url(url).map_err(|e| Error::config(format!("redis: {e}")))?;
            (Target::Single(addr), hs, tls)
        }
        (true, false) => {
            let mut seeds = Vec::new();
            for n in nodes.split(',').map(str::trim).filter(|n| !n.is_empty()) {
                let with_scheme = if n.contains("://") { n.to_string() } else { format!("redis://{n}") };
                let (addr, hs, _) = control::parse_url(&with_scheme)
                    .map_err(|e| Error::config(format!("redis: `cluster_nodes`: {e}")))?;
                if hs.db != 0 {
                    return Err(Error::config(format!(
                        "redis: `cluster_nodes` entry `{n}` names database {}: Redis Cluster has only database 0",
                        hs.db
                    )));
                }
                seeds.push(addr);
            }
            let tls = nodes.contains("rediss://");
            (Target::Cluster(seeds), resp::Handshake::default(), tls)
        }
    };
    let tls: bool = ctx.parse("tls")?;
    if tls || url_tls {
        let loaded = tls::Tls::load(
            opt(ctx, "tls_ca_file"),
            opt(ctx, "tls_cert_file"),
            opt(ctx, "tls_key_file"),
        )
        .map_err(|e| Error::config(format!("redis: {e}")))?;
        hs.tls = Some(Arc::new(loaded));
    } else if ["tls_ca_file", "tls_cert_file", "tls_key_file"]
        .iter()
        .any(|k| !opt(ctx, k).is_empty())
    {
        return Err(Error::config(
            "redis: tls_ca_file, tls_cert_file and tls_key_file need TLS: use a rediss:// url or tls: true",
        ));
    }
    if !password.is_empty() {
        hs.password = Some(password.to_string());
    }
    if !username.is_empty() {
        hs.username = Some(username.to_string());
    }
    let db: i64 = ctx.parse("db")?;
    if db != 0 {
        if matches!(target, Target::Cluster(_)) {
            return Err(Error::config("redis: option `db` must be 0 with `cluster_nodes` (Redis Cluster has only database 0)"));
        }
        if !(0..=1_000_000).contains(&db) {
            return Err(Error::config(format!(
                "redis: option `db` = `{db}`: expected 0 or more"
            )));
        }
        hs.db = db;
    }
    let prefix = ctx.option("key_prefix").unwrap_or("kvhost:").to_string();
    if prefix.contains(['{', '}']) || prefix.chars().any(char::is_control) {
        return Err(Error::config(format!(
            "redis: option `key_prefix` = `{prefix}`: must not contain `{{`, `}}` (the plugin's hash tag follows it) or control characters"
        )));
    }
    let t = Timeouts {
        connect: Duration::from_millis(positive(ctx, "connect_timeout_ms", 600_000u64)?),
        command: Duration::from_millis(positive(ctx, "command_timeout_ms", 3_600_000u64)?),
    };
    let part_mib: f64 = positive(ctx, "part_size_mib", 512.0)?;
    let part_size = ((part_mib * (1 << 20) as f64) as usize).max(4096);
    let ttl_s: u64 = ctx.parse("ttl_s")?;
    let down_ms: u64 = ctx.parse("down_ms")?;
    let pool: usize = positive(ctx, "pool_size", 256usize)?;
    Ok((
        target,
        hs,
        t,
        Settings {
            prefix,
            part_size,
            ttl_s,
            down_for: Duration::from_millis(down_ms),
            idle_per_node: pool + 2,
        },
        pool,
    ))
}

impl RedisBackend {
    fn submit<O: Op>(&self, req: Request<O>, job: fn(Pending<O>) -> Job) -> Submit {
        let queue = self.queue.read();
        let Some(tx) = queue.as_ref() else {
            return req.finish(Status::CANCELED);
        };
        let (pending, submit) = req.defer();
        match tx.try_send(job(pending)) {
            Ok(()) => {}
            Err(TrySendError::Full(job)) => {
                Counters::add(&self.counters.busy_requests, 1);
                let e = Error::new(
                    Status::BUSY,
                    format!(
                        "redis: {} requests already queued for the worker threads",
                        tx.capacity().unwrap_or(0)
                    ),
                );
                match job {
                    Job::Put(p) => {
                        p.set_all(e.status);
                        p.fail(&e);
                    }
                    Job::Get(p) => {
                        (0..p.len()).for_each(|i| p.set_status(i, e.status));
                        p.fail(&e);
                    }
                    Job::Contains(p) => {
                        (0..p.len()).for_each(|i| p.set_status(i, e.status));
                        p.fail(&e);
                    }
                    Job::Remove(p) => {
                        (0..p.len()).for_each(|i| p.set_status(i, e.status));
                        p.fail(&e);
                    }
                }
            }
            // Every worker died (each is under the SDK's panic boundary, which poisoned the backend):
            // dropping the job completes it.
            Err(TrySendError::Disconnected(_)) => {}
        }
        submit
    }
}

fn worker(engine: &Engine, rx: &Receiver<Job>, counters: &Counters) {
    for job in rx.iter() {
        let err = match job {
            Job::Put(p) => {
                Counters::add(&counters.put_keys, p.len());
                let err = engine.put(&p);
                finish(p, err.clone());
                err
            }
            Job::Get(mut p) => {
                Counters::add(&counters.get_keys, p.len());
                let err = engine.get(&mut p);
                finish(p, err.clone());
                err
            }
            Job::Contains(p) => {
                Counters::add(&counters.lookup_keys, p.len());
                let err = lookup(engine, &p);
                finish(p, err.clone());
                err
            }
            Job::Remove(p) => {
                Counters::add(&counters.remove_keys, p.len());
                let err = unlink(engine, &p);
                finish(p, err.clone());
                err
            }
        };
        if err.is_some() {
            Counters::add(&counters.failed_requests, 1);
        }
    }
}

/// `(key_hash, canonical)` of each of `n` keys, as the engine takes them.
fn hashed_keys<'a>(n: usize, key: impl Fn(usize) -> Key<'a>) -> Vec<(u64, &'a str)> {
    (0..n)
        .map(|i| {
            let k = key(i);
            (k.key_hash(), k.canonical())
        })
        .collect()
}

/// Look up every key of `b` and report it; the first node error, if any.
fn lookup(engine: &Engine, b: &Batch<Contains>) -> Option<String> {
    let keys = hashed_keys(b.len(), |i| b.key(i));
    let (found, err) = engine.contains(&keys);
    for (i, f) in found.into_iter().enumerate() {
        match f {
            Ok(Some(meta)) => b.set_present(i, meta),
            Ok(None) => b.set_absent(i),
            Err(s) => b.set_status(i, s),
        }
    }
    err
}

/// Remove every key of `b` and report it; the first node error, if any.
fn unlink(engine: &Engine, b: &Batch<Remove>) -> Option<String> {
    let keys = hashed_keys(b.len(), |i| b.key(i));
    let (statuses, err) = engine.remove(&keys);
    for (i, s) in statuses.into_iter().enumerate() {
        b.set_status(i, s);
    }
    err
}

/// Complete with `OK`, or with the first node error (per-item statuses are already set; the host
/// keeps them).
fn finish<O: Op>(p: Pending<O>, err: Option<String>) {
    match err {
        None => p.complete(Status::OK),
        Some(m) => p.fail(&Error::new(Status::UNAVAILABLE, m)),
    }
}

impl Backend for RedisBackend {
    const CAPABILITIES: u64 = abi::KVH_CAP_PERSISTENT
        | abi::KVH_CAP_SHARED
        | abi::KVH_CAP_HEALTH
        | abi::KVH_CAP_CLEAR
        | abi::KVH_CAP_STATS
        | abi::KVH_CAP_ASYNC_CONTAINS
        | abi::KVH_CAP_ASYNC_REMOVE;
    const OPTIONS: &'static [OptionSpec] = &[
        OptionSpec::optional(
            c"url",
            c"",
            c"one server: redis://[[user]:password@]host[:port][/db] (give url or cluster_nodes)",
        ),
        OptionSpec::optional(
            c"cluster_nodes",
            c"",
            c"a Redis Cluster: seed nodes host:port,host:port,... (a YAML list also works); the rest is discovered",
        ),
        OptionSpec::optional(c"username", c"", c"ACL user name (Redis 6+); overrides the url's"),
        OptionSpec::optional(c"password", c"", c"password (AUTH); overrides the url's").secret(),
        OptionSpec::optional(c"db", c"0", c"database number (single server only)"),
        OptionSpec::optional(
            c"key_prefix",
            c"kvhost:",
            c"prefix of every key this instance writes; clear removes exactly the keys under it",
        ),
        OptionSpec::optional(
            c"tls",
            c"false",
            c"true: TLS to every node (implied by a rediss:// url; needed for cluster_nodes)",
        ),
        OptionSpec::optional(
            c"tls_ca_file",
            c"",
            c"PEM file of the CA certificates to trust (empty: the system's)",
        ),
        OptionSpec::optional(
            c"tls_cert_file",
            c"",
            c"PEM client certificate, for servers with tls-auth-clients (with tls_key_file)",
        ),
        OptionSpec::optional(c"tls_key_file", c"", c"PEM private key of tls_cert_file"),
        OptionSpec::optional(c"connect_timeout_ms", c"1000", c"TCP connect timeout"),
        OptionSpec::optional(
            c"command_timeout_ms",
            c"5000",
            c"timeout of every read and write on a connection; a node that exceeds it is marked down",
        ),
        OptionSpec::optional(
            c"pool_size",
            c"4",
            c"worker threads, each with its own connection per node (requests in flight at once)",
        ),
        OptionSpec::optional(
            c"part_size_mib",
            c"4",
            c"values larger than this are split into parts of this size plus a manifest written last",
        ),
        OptionSpec::optional(c"ttl_s", c"0", c"expire every key after this many seconds (0: never)"),
        OptionSpec::optional(
            c"down_ms",
            c"1000",
            c"after a node fails, calls to it fail at once for this long before a reconnect is tried",
        ),
    ];
    const DESCRIPTION: &'static std::ffi::CStr =
        c"Redis / Redis Cluster store: pipelined, zero-copy values, large chunks split with a manifest written last";

    fn create(ctx: &CreateContext) -> Result<Self, Error> {
        let (target, hs, t, settings, pool) = settings_from(ctx)?;
        let topo = Topology::open(target, hs, t)
            .map_err(|e| Error::new(Status::UNAVAILABLE, format!("redis: {e}")))?;
        let engine = Arc::new(Engine::new(topo, settings));
        let (tx, rx) = crossbeam_channel::bounded::<Job>(pool * QUEUE_PER_WORKER);
        let mut workers = Vec::with_capacity(pool);
        let counters = Arc::new(Counters::default());
        for i in 0..pool {
            let (engine, rx, counters) = (engine.clone(), rx.clone(), counters.clone());
            match ctx.spawn(&format!("kvhost-redis-{i}"), move || {
                worker(&engine, &rx, &counters)
            }) {
                Ok(h) => workers.push(h),
                Err(e) => {
                    drop(tx);
                    for w in workers {
                        let _ = w.join();
                    }
                    return Err(Error::new(
                        Status::INTERNAL,
                        format!("redis: cannot start a worker thread: {e}"),
                    ));
                }
            }
        }
        log::info!(
            "redis: {} master(s): {}; parts of {} bytes; {pool} workers",
            engine.topology().masters().len(),
            engine.topology().masters().join(", "),
            engine.settings().part_size
        );
        Ok(RedisBackend {
            engine,
            queue: RwLock::new(Some(tx)),
            workers: Mutex::new(workers),
            counters,
        })
    }

    fn contains(&self, batch: &mut ContainsBatch<'_>) -> Result<(), Error> {
        let keys = hashed_keys(batch.len(), |i| batch.key(i));
        let (found, err) = self.engine.contains(&keys);
        for (i, f) in found.into_iter().enumerate() {
            match f {
                Ok(Some(meta)) => batch.set_present(i, meta),
                Ok(None) => batch.set_absent(i),
                Err(s) => batch.set_status(i, s),
            }
        }
        err.map_or(Ok(()), |m| Err(Error::new(Status::UNAVAILABLE, m)))
    }

    fn put(&self, req: Request<Put>) -> Submit {
        if req.is_empty() {
            return req.finish(Status::OK);
        }
        self.submit(req, Job::Put)
    }

    fn get(&self, req: Request<Get>) -> Submit {
        if req.is_empty() {
            return req.finish(Status::OK);
        }
        self.submit(req, Job::Get)
    }

    fn contains_async(&self, req: Request<Contains>) -> Submit {
        if req.is_empty() {
            return req.finish(Status::OK);
        }
        self.submit(req, Job::Contains)
    }

    /// Removal ignores `force`: this backend has no pins.
    fn remove_async(&self, req: Request<Remove>, _force: bool) -> Submit {
        if req.is_empty() {
            return req.finish(Status::OK);
        }
        self.submit(req, Job::Remove)
    }

    fn remove(&self, batch: &mut KeyBatch<'_>, _force: bool) -> Result<(), Error> {
        let keys = hashed_keys(batch.len(), |i| batch.key(i));
        let (statuses, err) = self.engine.remove(&keys);
        for (i, s) in statuses.into_iter().enumerate() {
            batch.set_status(i, s);
        }
        err.map_or(Ok(()), |m| Err(Error::new(Status::UNAVAILABLE, m)))
    }

    fn clear(&self) -> Result<(), Error> {
        let n = self.engine.clear()?;
        log::info!("redis: clear removed {n} keys");
        Ok(())
    }

    fn health(&self) -> Result<String, Error> {
        self.engine.health()
    }

    fn stats(&self, out: &mut kvhost_plugin_sdk::Stats) -> Result<(), Error> {
        let c = &self.counters;
        let load = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
        let queued = self.queue.read().as_ref().map_or(0, |tx| tx.len());
        out.counter("put_keys", load(&c.put_keys))
            .counter("get_keys", load(&c.get_keys))
            .counter("lookup_keys", load(&c.lookup_keys))
            .counter("remove_keys", load(&c.remove_keys))
            .counter("failed_requests", load(&c.failed_requests))
            .counter("busy_requests", load(&c.busy_requests))
            .gauge("queued", queued as u64);
        Ok(())
    }
}

impl Drop for RedisBackend {
    /// Stop taking requests, let the workers finish every queued one (their completions fire), and
    /// join them.
    fn drop(&mut self) {
        drop(self.queue.write().take());
        for w in self.workers.lock().drain(..) {
            if w.join().is_err() {
                log::error!("redis: a worker thread panicked");
            }
        }
    }
}

export_backend!(redis, RedisBackend);
