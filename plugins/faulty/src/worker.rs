//! The worker thread that completes requests after their latency, holds hung ones until the fault
//! window ends, and panics when told to.

use crate::Core;
use kvhost_plugin_sdk::{Get, Pending, Put, Status};
use parking_lot::{Condvar, Mutex};
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A deferred request.
pub enum Job {
    /// A put.
    Put(Pending<Put>),
    /// A get.
    Get(Pending<Get>),
}

/// One queued request and what happens to it.
pub struct Queued {
    /// The request.
    pub job: Job,
    /// Panic the worker when this request comes up.
    pub panic: bool,
}

#[derive(Default)]
struct Queue {
    due: BinaryHeap<Reverse<(Instant, u64)>>,
    jobs: HashMap<u64, Queued>,
    hung: Vec<Queued>,
    next: u64,
    stop: bool,
}

/// The queue shared by the backend and its worker thread.
#[derive(Default)]
pub struct Worker {
    queue: Mutex<Queue>,
    wake: Condvar,
}

impl Worker {
    /// Run `q` at `at`.
    pub fn schedule(&self, q: Queued, at: Instant) {
        let mut g = self.queue.lock();
        let id = g.next;
        g.next += 1;
        g.jobs.insert(id, q);
        g.due.push(Reverse((at, id)));
        drop(g);
        self.wake.notify_one();
    }

    /// Hold `q` until the fault window ends (or for ever).
    pub fn hang(&self, q: Queued) {
        self.queue.lock().hung.push(q);
    }

    /// Stop the thread; requests still queued or hung are dropped, which completes them `CANCELED`.
    pub fn stop(&self) {
        let dropped = {
            let mut g = self.queue.lock();
            g.stop = true;
            g.due.clear();
            let jobs: Vec<Queued> = g.jobs.drain().map(|(_, q)| q).collect();
            let hung = std::mem::take(&mut g.hung);
            (jobs, hung)
        };
        self.wake.notify_all();
        drop(dropped);
    }

    /// The thread's loop.
    pub fn run(&self, core: &Arc<Core>) {
        let window_end = core.plan.window_end().map(|d| core.created + d);
        loop {
            let mut g = self.queue.lock();
            if g.stop {
                return;
            }
            let now = Instant::now();
            if window_end.is_some_and(|end| now >= end) && !g.hung.is_empty() {
                // The tier recovered: hung requests complete now, in order.
                let hung = std::mem::take(&mut g.hung);
                for q in hung {
                    let id = g.next;
                    g.next += 1;
                    g.jobs.insert(id, q);
                    g.due.push(Reverse((now, id)));
                }
            }
            let ready = match g.due.peek() {
                Some(Reverse((at, id))) if *at <= now => {
                    let id = *id;
                    g.due.pop();
                    g.jobs.remove(&id)
                }
                _ => None,
            };
            match ready {
                Some(q) => {
                    drop(g);
                    serve(core, q);
                }
                None => {
                    let mut until = g
                        .due
                        .peek()
                        .map_or(now + Duration::from_millis(50), |r| r.0 .0);
                    if let Some(end) = window_end.filter(|e| *e > now) {
                        until = until.min(end);
                    }
                    self.wake.wait_until(&mut g, until);
                }
            }
        }
    }
}

fn serve(core: &Core, q: Queued) {
    if q.panic {
        // Unwinding drops the request, which completes it CANCELED; the SDK then poisons the backend.
        let _request = q.job;
        panic!("faulty: injected panic on the worker thread");
    }
    let faulty = core.faults_active();
    match q.job {
        Job::Put(p) => {
            core.store
                .put(&p, &core.plan, &core.dice, &core.injected, faulty);
            p.complete(Status::OK);
        }
        Job::Get(mut p) => {
            core.store
                .get(&mut p, &core.plan, &core.dice, &core.injected, faulty);
            p.complete(Status::OK);
        }
    }
}
