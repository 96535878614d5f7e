//! One plugin tier of the chain: a bounded queue of puts and a worker that batches them into the
//! plugin. Completions run on the plugin's threads: they update the tier's counters, mark the keys
//! done in the puts in flight (taking its lock), drop the batch's arena handles (which may take the hot
//! cache's lock) and free a batch slot. They never call into the plugin.

use super::breaker::{Breaker, BreakerSettings, BreakerState};
use super::inflight::PutsInFlight;
use super::metrics::{add, inc, TierMetrics};
use super::unreported::UnreportedLog;
use crate::cache::ChunkHandle;
use crate::key::ChunkKey;
use crate::plugin::{PluginBackend, Presence, PutRequest, Status};
use crossbeam_channel::{Receiver, SendTimeoutError, Sender, TrySendError};
use kvhost_plugin_sdk::{abi, ChunkMeta};
use parking_lot::{Condvar, Mutex};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// A chunk to store into a tier. Its handle keeps the arena block alive until the tier completes.
pub(crate) struct PutJob {
    pub(crate) key: ChunkKey,
    pub(crate) handle: ChunkHandle,
    pub(crate) meta: ChunkMeta,
    pub(crate) demotion: bool,
}

/// What to do when a tier's queue is full.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backpressure {
    /// The caller's put waits for room (default).
    Block,
    /// The chunk is not stored in that tier; counted in `put_dropped`.
    Drop,
}

/// Tier settings.
#[derive(Clone, Debug)]
pub struct TierSettings {
    /// Queue depth in chunks.
    pub queue_depth: usize,
    /// Full-queue behaviour.
    pub backpressure: Backpressure,
    /// Chunks per plugin call.
    pub max_batch: usize,
    /// Bytes per plugin call (a batch closes at whichever limit comes first).
    pub max_batch_bytes: u64,
    /// Put batches pending in the plugin at once (config `tier_max_inflight_batches`).
    pub max_pending_batches: usize,
    /// Ask the plugin which keys it already holds before storing (skip those).
    pub skip_existing: bool,
    /// How long the skip-existing lookup may take before the batch is stored anyway.
    pub lookup_timeout: Duration,
}

/// Counts put batches pending in the plugin; waiting is bounded so a hung plugin cannot wedge close.
#[derive(Default)]
struct Slots {
    used: Mutex<usize>,
    freed: Condvar,
}

impl Slots {
    /// Take a slot, waiting while `max` are in use; false if `abandon` is set before one frees.
    fn acquire(&self, max: usize, abandon: &AtomicBool) -> bool {
        let mut used = self.used.lock();
        while *used >= max {
            if abandon.load(Ordering::Acquire) {
                return false;
            }
            self.freed.wait_for(&mut used, Duration::from_millis(50));
        }
        *used += 1;
        true
    }
    fn release(&self) {
        *self.used.lock() -= 1;
        self.freed.notify_all();
    }
}

pub(crate) struct Tier {
    pub(crate) name: String,
    caps: u64,
    /// `None` once close has released it; the plugin is destroyed when the last user drops it.
    plugin: parking_lot::RwLock<Option<Arc<PluginBackend>>>,
    pub(crate) metrics: Arc<TierMetrics>,
    tx: Mutex<Option<Sender<PutJob>>>,
    rx: Receiver<PutJob>,
    settings: TierSettings,
    workers: Mutex<Vec<JoinHandle<()>>>,
    abandon: Arc<AtomicBool>,
    /// Skips the tier while it is sick; bounds the arena bytes its puts hold.
    pub(crate) breaker: Arc<Breaker>,
    /// Where items the plugin leaves unreported are logged.
    pub(crate) unreported: Arc<UnreportedLog>,
}

impl Tier {
    pub(crate) fn start(
        plugin: PluginBackend,
        settings: TierSettings,
        breaker: BreakerSettings,
        inflight: Arc<PutsInFlight>,
    ) -> Arc<Tier> {
        let (tx, rx) = crossbeam_channel::bounded(settings.queue_depth.max(1));
        let plugin = Arc::new(plugin);
        let tier = Arc::new(Tier {
            name: plugin.name().to_string(),
            caps: plugin.info().capabilities,
            plugin: parking_lot::RwLock::new(Some(plugin.clone())),
            metrics: Arc::new(TierMetrics::default()),
            tx: Mutex::new(Some(tx)),
            rx: rx.clone(),
            settings,
            workers: Mutex::new(Vec::new()),
            abandon: Arc::new(AtomicBool::new(false)),
            breaker: Arc::new(Breaker::new(plugin.name(), breaker)),
            unreported: Arc::new(UnreportedLog::new(plugin.name())),
        });
        let worker = Worker {
            plugin,
            metrics: tier.metrics.clone(),
            settings: tier.settings.clone(),
            rx,
            inflight,
            slots: Arc::new(Slots::default()),
            abandon: tier.abandon.clone(),
            breaker: tier.breaker.clone(),
            unreported: tier.unreported.clone(),
        };
        let name = format!("kvhost-tier-{}", tier.name);
        let handle = std::thread::Builder::new()
            .name(name)
            .spawn(move || worker.run())
            .expect("spawn tier worker");
        tier.workers.lock().push(handle);
        tier
    }

    /// The plugin, unless close has released it.
    pub(crate) fn plugin(&self) -> Option<Arc<PluginBackend>> {
        self.plugin.read().clone()
    }

    /// Whether the plugin advertises capability `bit`.
    pub(crate) fn has(&self, bit: u64) -> bool {
        self.caps & bit != 0
    }

    /// Release the tier's reference to the plugin; it is destroyed once no call is using it.
    pub(crate) fn destroy_plugin(&self) {
        let plugin = self.plugin.write().take();
        drop(plugin);
    }

    /// Chunks waiting in the queue.
    pub(crate) fn queue_depth(&self) -> usize {
        self.rx.len()
    }

    /// Queue a put. Returns false (and drops the job) if it was not queued.
    pub(crate) fn submit(&self, job: PutJob, blocking: bool) -> bool {
        let tx = self.tx.lock().clone();
        let Some(tx) = tx else { return false };
        let bytes = job.handle.len() as u64;
        let block = blocking && self.settings.backpressure == Backpressure::Block;
        if !self.breaker.reserve(bytes, block) {
            if self.breaker.state() == BreakerState::Closed {
                inc(&self.metrics.put_dropped);
            }
            return false;
        }
        inc(&self.metrics.puts_in_flight);
        let sent = match (blocking, self.settings.backpressure) {
            // Bounded: a queue that stays full past the put deadline means the tier is stuck.
            (true, Backpressure::Block) => {
                match tx.send_timeout(job, self.breaker.put_deadline()) {
                    Ok(()) => true,
                    Err(SendTimeoutError::Timeout(_)) => {
                        self.breaker.trip(&format!(
                            "its put queue stayed full for the put deadline ({:.1} s)",
                            self.breaker.put_deadline().as_secs_f64()
                        ));
                        false
                    }
                    Err(SendTimeoutError::Disconnected(_)) => false,
                }
            }
            _ => match tx.try_send(job) {
                Ok(()) => true,
                Err(TrySendError::Full(_)) => {
                    inc(&self.metrics.put_dropped);
                    false
                }
                Err(TrySendError::Disconnected(_)) => false,
            },
        };
        if !sent {
            self.metrics.puts_in_flight.fetch_sub(1, Ordering::Relaxed);
            self.breaker.release(bytes);
        }
        sent
    }

    /// Stop taking puts; the worker drains what is queued and exits.
    pub(crate) fn close_queue(&self) {
        self.tx.lock().take();
    }

    /// Give up on outstanding work (after the close deadline): the worker stops waiting for slots.
    pub(crate) fn abandon(&self) {
        self.abandon.store(true, Ordering::Release);
    }

    /// Join the worker if it has exited; true when none is left running.
    pub(crate) fn join_finished(&self, deadline: Instant) -> bool {
        let mut workers = self.workers.lock();
        while Instant::now() < deadline && workers.iter().any(|w| !w.is_finished()) {
            std::thread::sleep(Duration::from_millis(5));
        }
        let (done, running): (Vec<_>, Vec<_>) = workers.drain(..).partition(|w| w.is_finished());
        for w in done {
            let _ = w.join();
        }
        let left = running.is_empty();
        *workers = running;
        left
    }
}

struct Worker {
    plugin: Arc<PluginBackend>,
    metrics: Arc<TierMetrics>,
    settings: TierSettings,
    rx: Receiver<PutJob>,
    inflight: Arc<PutsInFlight>,
    slots: Arc<Slots>,
    abandon: Arc<AtomicBool>,
    breaker: Arc<Breaker>,
    unreported: Arc<UnreportedLog>,
}

impl Worker {
    fn run(self) {
        while let Ok(first) = self.rx.recv() {
            let mut batch = Vec::with_capacity(self.settings.max_batch);
            let mut bytes = first.handle.len() as u64;
            batch.push(first);
            while batch.len() < self.settings.max_batch && bytes < self.settings.max_batch_bytes {
                match self.rx.try_recv() {
                    Ok(job) => {
                        bytes += job.handle.len() as u64;
                        batch.push(job);
                    }
                    Err(_) => break,
                }
            }
            self.store(batch);
        }
        // Wait (boundedly) for the last batches so their completions are counted before exit.
        if self.slots.acquire(1, &self.abandon) {
            self.slots.release();
        }
    }

    fn finish(&self, job: &PutJob) {
        self.metrics.puts_in_flight.fetch_sub(1, Ordering::Relaxed);
        self.inflight.done(&job.key);
        self.breaker.release(job.handle.len() as u64);
    }

    fn store(&self, mut batch: Vec<PutJob>) {
        let discards = self.plugin.has(abi::KVH_CAP_DISCARDS);
        if self.settings.skip_existing && !discards {
            let keys: Vec<ChunkKey> = batch.iter().map(|j| j.key.clone()).collect();
            let started = Instant::now();
            let timeout = self.settings.lookup_timeout;
            if let Ok(presence) = self.plugin.contains_wait(&keys, false, timeout) {
                self.metrics.lookup_latency.record(started.elapsed());
                let mut i = 0;
                batch.retain(|job| {
                    let present = matches!(presence[i], Presence::Present(_));
                    i += 1;
                    if present {
                        inc(&self.metrics.put_skipped);
                        self.finish(job);
                    }
                    !present
                });
            }
        }
        if batch.is_empty() {
            return;
        }
        if !self
            .slots
            .acquire(self.settings.max_pending_batches.max(1), &self.abandon)
        {
            for job in &batch {
                self.finish(job);
            }
            return;
        }
        let n = batch.len();
        let held: u64 = batch.iter().map(|j| j.handle.len() as u64).sum();
        let mut keys = Vec::with_capacity(n);
        let mut bufs = Vec::with_capacity(n);
        let mut metas = Vec::with_capacity(n);
        let mut demotions = 0;
        for job in batch {
            demotions += u64::from(job.demotion);
            keys.push(job.key);
            bufs.push(job.handle);
            metas.push(job.meta);
        }
        let metrics = self.metrics.clone();
        let tier = self.plugin.name().to_string();
        let inflight = self.inflight.clone();
        let slots = self.slots.clone();
        let breaker = self.breaker.clone();
        let unreported = self.unreported.clone();
        let batch_id = breaker.batch_started();
        let started = Instant::now();
        self.plugin
            .put(PutRequest { keys, bufs, metas }, move |done| {
                metrics.put_latency.record(started.elapsed());
                add(&metrics.demotions, demotions);
                let (mut stored, mut failed, mut last_failure) = (0, 0, Status::OK);
                for (i, status) in done.items.iter().enumerate() {
                    match *status {
                        Status::OK => {
                            stored += 1;
                            inc(&metrics.puts);
                            add(&metrics.bytes_in, done.request.bufs[i].len() as u64);
                        }
                        Status::NO_SPACE => inc(&metrics.no_space),
                        other => {
                            failed += 1;
                            last_failure = other;
                            if other == Status::NO_RESULT {
                                unreported.log("put", &done.request.keys[i]);
                            }
                            let n = metrics.errors.fetch_add(1, Ordering::Relaxed) + 1;
                            if n.is_power_of_two() {
                                let why = done
                                    .error
                                    .as_ref()
                                    .map(|e| e.to_string())
                                    .unwrap_or_default();
                                tracing::warn!(
                                    target: "kvhost::chain",
                                    tier = %tier,
                                    key = %done.request.keys[i],
                                    "put failed ({other}) {why}; {n} error(s) so far in this tier"
                                );
                            }
                        }
                    }
                }
                metrics
                    .puts_in_flight
                    .fetch_sub(done.items.len() as u64, Ordering::Relaxed);
                for key in &done.request.keys {
                    inflight.done(key);
                }
                if stored > 0 {
                    breaker.success();
                } else if failed > 0 {
                    breaker.failure(&format!(
                        "put of {n} chunk(s): {failed} failed ({last_failure})"
                    ));
                }
                breaker.batch_done(batch_id);
                // Release the arena blocks before the slot, so a waiting closer sees them freed.
                drop(done);
                breaker.release(held);
                slots.release();
            });
    }
}
