//! `faulty`: a fault-injection storage plugin written with the Rust SDK. It stores chunks in memory
//! and, by its options, fails items, delays or hangs requests, corrupts the bytes of gets (right
//! length, wrong content), leaves items unreported, and panics on its worker thread. Every decision
//! comes from seeded dice, so a run is reproducible. Faults can be limited to a time window after
//! create, so a test can watch a host trip on a sick tier and recover when it heals.
//!
//! It cannot wrap another plugin: the SDK gives a plugin no loader of other plugins, and loading one
//! from inside a plugin would bypass the host's checks. It also cannot complete a request twice: the
//! SDK's `Pending` completes exactly once by construction (the C fixture `fx_liar` covers that).

pub mod dice;
pub mod options;
pub mod store;
pub mod worker;

use dice::Dice;
use kvhost_plugin_sdk::abi;
use kvhost_plugin_sdk::*;
use options::FaultPlan;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;
use store::{Injected, Store};
use worker::{Job, Queued, Worker};

/// What the backend and its worker thread share.
pub struct Core {
    plan: FaultPlan,
    dice: Dice,
    store: Store,
    injected: Injected,
    created: Instant,
}

impl Core {
    fn faults_active(&self) -> bool {
        self.plan.active(self.created.elapsed())
    }
}

/// The backend.
pub struct Faulty {
    core: Arc<Core>,
    worker: Option<(Arc<Worker>, JoinHandle<()>)>,
}

impl Faulty {
    /// Queue a deferred request (latency, hang, panic) on the worker.
    fn submit(&self, job: Job, worker: &Worker) {
        let core = &self.core;
        let faulty = core.faults_active();
        let panic = faulty && core.dice.roll(core.plan.panic_rate);
        let q = Queued { job, panic };
        if faulty && !panic && core.dice.roll(core.plan.hang_rate) {
            core.injected.hangs.fetch_add(1, Ordering::Relaxed);
            worker.hang(q);
            return;
        }
        let delay = if faulty {
            core.dice.latency(core.plan.latency)
        } else {
            std::time::Duration::ZERO
        };
        worker.schedule(q, Instant::now() + delay);
    }
}

impl Backend for Faulty {
    const CAPABILITIES: u64 = abi::KVH_CAP_HEALTH | abi::KVH_CAP_CLEAR;
    const OPTIONS: &'static [OptionSpec] = options::OPTIONS;
    const DESCRIPTION: &'static std::ffi::CStr =
        c"Fault injection: an in-memory store with seeded errors, latency, hangs, corruption, unreported items and worker panics";

    fn create(ctx: &CreateContext) -> Result<Self, Error> {
        let plan = FaultPlan::from_options(ctx)?;
        let core = Arc::new(Core {
            dice: Dice::new(plan.seed),
            store: Store::default(),
            injected: Injected::default(),
            created: Instant::now(),
            plan,
        });
        let worker = if core.plan.needs_worker() {
            let w = Arc::new(Worker::default());
            let (w2, c2) = (w.clone(), core.clone());
            let handle = ctx
                .spawn("kvhost-faulty", move || w2.run(&c2))
                .map_err(|e| Error::new(Status::INTERNAL, format!("spawn worker: {e}")))?;
            Some((w, handle))
        } else {
            None
        };
        Ok(Faulty { core, worker })
    }

    fn contains(&self, batch: &mut ContainsBatch<'_>) -> Result<(), Error> {
        for i in 0..batch.len() {
            match self.core.store.meta(batch.key(i).canonical()) {
                Some(meta) => batch.set_present(i, meta),
                None => batch.set_absent(i),
            }
        }
        Ok(())
    }

    fn put(&self, req: Request<Put>) -> Submit {
        if let Some((worker, _)) = &self.worker {
            let (pending, submit) = req.defer();
            self.submit(Job::Put(pending), worker);
            return submit;
        }
        let c = &self.core;
        c.store
            .put(&req, &c.plan, &c.dice, &c.injected, c.faults_active());
        req.finish(Status::OK)
    }

    fn get(&self, mut req: Request<Get>) -> Submit {
        if let Some((worker, _)) = &self.worker {
            let (pending, submit) = req.defer();
            self.submit(Job::Get(pending), worker);
            return submit;
        }
        let c = &self.core;
        let faulty = c.faults_active();
        c.store.get(&mut req, &c.plan, &c.dice, &c.injected, faulty);
        req.finish(Status::OK)
    }

    fn remove(&self, batch: &mut KeyBatch<'_>, _force: bool) -> Result<(), Error> {
        for i in 0..batch.len() {
            let held = self.core.store.remove(batch.key(i).canonical());
            batch.set_status(i, if held { Status::OK } else { Status::NOT_FOUND });
        }
        Ok(())
    }

    fn clear(&self) -> Result<(), Error> {
        self.core.store.clear();
        Ok(())
    }

    fn health(&self) -> Result<String, Error> {
        let c = &self.core;
        let (chunks, bytes) = c.store.usage();
        let i = &c.injected;
        let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        let text = format!(
            "faulty: {chunks} chunks, {bytes} bytes; injected: {} errors, {} hangs, {} corrupted ({} caught), {} unreported",
            load(&i.errors),
            load(&i.hangs),
            load(&i.corrupted),
            load(&i.caught),
            load(&i.unreported),
        );
        if c.plan.is_sick() && c.faults_active() {
            return Err(Error::new(
                Status::UNAVAILABLE,
                format!("faults active; {text}"),
            ));
        }
        Ok(text)
    }
}

impl Drop for Faulty {
    fn drop(&mut self) {
        if let Some((worker, handle)) = self.worker.take() {
            worker.stop();
            let _ = handle.join();
        }
    }
}

export_backend!(faulty, Faulty);
