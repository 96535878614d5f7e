//! Prefetch: load the cached prefix of some keys into the hot cache in the background.

use super::Chain;
use crate::key::ChunkKey;
use crossbeam_channel::{Receiver, Sender};
use parking_lot::{Condvar, Mutex};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Once};
use std::time::{Duration, Instant};

/// What a prefetch achieved.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PrefetchResult {
    /// Keys asked for.
    pub requested: usize,
    /// Chunks in the hot cache when it finished (the cached prefix).
    pub arrived: usize,
    /// Of those, chunks promoted from plugin tiers.
    pub promoted: usize,
}

/// A prefetch running in the background.
#[derive(Clone)]
pub struct PrefetchHandle {
    shared: Arc<(Mutex<Option<PrefetchResult>>, Condvar)>,
}

impl PrefetchHandle {
    /// The result if finished.
    pub fn poll(&self) -> Option<PrefetchResult> {
        self.shared.0.lock().clone()
    }

    /// Wait up to `timeout` for the result.
    pub fn wait(&self, timeout: Duration) -> Option<PrefetchResult> {
        let deadline = Instant::now() + timeout;
        let mut r = self.shared.0.lock();
        while r.is_none() {
            if self.shared.1.wait_until(&mut r, deadline).timed_out() {
                break;
            }
        }
        r.clone()
    }

    fn finish(&self, result: PrefetchResult) {
        *self.shared.0.lock() = Some(result);
        self.shared.1.notify_all();
    }
}

/// Prefetch worker threads per chain: enough to overlap a few tier reads, never one per call.
pub(crate) const PREFETCH_WORKERS: usize = 4;

/// Prefetches queued beyond the running ones before `prefetch` waits for room.
const PREFETCH_QUEUE: usize = 4096;

/// One queued prefetch.
struct PrefetchJob {
    chain: Chain,
    keys: Vec<ChunkKey>,
    handle: PrefetchHandle,
}

impl PrefetchJob {
    fn run(self) {
        let PrefetchJob {
            chain,
            keys,
            handle,
        } = self;
        let lookup = chain.lookup(&keys, None);
        let prefix = &keys[..lookup.hit_chunks];
        let before = prefix
            .iter()
            .filter(|k| chain.inner.hot.contains(k))
            .count();
        let got = chain.get(prefix);
        let arrived = got.iter().take_while(|h| h.is_some()).count();
        handle.finish(PrefetchResult {
            requested: keys.len(),
            arrived,
            promoted: arrived.saturating_sub(before),
        });
    }
}

/// The chain's prefetch workers and their bounded queue, shared by every clone of the chain. The
/// workers start on the first prefetch and end when the chain is dropped (the queue disconnects).
pub(super) struct PrefetchPool {
    tx: Sender<PrefetchJob>,
    rx: Receiver<PrefetchJob>,
    started: Once,
    running: AtomicUsize,
}

impl Default for PrefetchPool {
    fn default() -> Self {
        let (tx, rx) = crossbeam_channel::bounded(PREFETCH_QUEUE);
        PrefetchPool {
            tx,
            rx,
            started: Once::new(),
            running: AtomicUsize::new(0),
        }
    }
}

impl PrefetchPool {
    /// Queue `job`, waiting while the queue is full. Without any worker (none could be started) the
    /// job runs on the caller's thread, so a handle is always finished.
    fn submit(&self, job: PrefetchJob) {
        self.started.call_once(|| self.start_workers());
        if self.running.load(Ordering::Acquire) == 0 {
            return job.run();
        }
        if let Err(e) = self.tx.send(job) {
            // Unreachable while `self` holds the receiver; run it here rather than lose it.
            e.into_inner().run();
        }
    }

    fn start_workers(&self) {
        for i in 0..PREFETCH_WORKERS {
            let rx = self.rx.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("kvhost-prefetch{i}"))
                .spawn(move || {
                    while let Ok(job) = rx.recv() {
                        job.run();
                    }
                });
            match spawned {
                Ok(_) => {
                    self.running.fetch_add(1, Ordering::AcqRel);
                }
                Err(e) => {
                    tracing::warn!(target: "kvhost::chain", "could not start prefetch worker {i}: {e}");
                }
            }
        }
    }
}

impl Chain {
    /// Load the cached prefix of `keys` into the hot cache in the background, on the chain's 4
    /// prefetch threads (`PREFETCH_WORKERS`). Waits only while 4096 prefetches (`PREFETCH_QUEUE`)
    /// are already queued.
    pub fn prefetch(&self, keys: Vec<ChunkKey>) -> PrefetchHandle {
        let handle = PrefetchHandle {
            shared: Arc::new((Mutex::new(None), Condvar::new())),
        };
        self.inner.prefetch.submit(PrefetchJob {
            chain: self.clone(),
            keys,
            handle: handle.clone(),
        });
        handle
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::{hot_only, key, keys, put};
    use super::*;

    #[test]
    fn a_prefetch_reports_the_cached_prefix() {
        let chain = hot_only(8 << 20);
        put(&chain, &key(0), 0, 100);
        put(&chain, &key(1), 1, 100);
        let r = chain.prefetch(keys(3)).wait(Duration::from_secs(5));
        assert_eq!(
            r,
            Some(PrefetchResult {
                requested: 3,
                arrived: 2,
                promoted: 0
            })
        );
    }

    /// Threads of this process, from /proc/self/status.
    fn threads() -> usize {
        let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("Threads:"))
            .and_then(|n| n.trim().parse().ok())
            .expect("a Threads: line")
    }

    const ALONE: &str = "KVHOST_PREFETCH_THREADS_ALONE";

    /// 10,000 prefetches never run on more than the pool's threads. Runs in a child process of
    /// this test binary, alone, so the process thread count is this test's own.
    #[test]
    fn ten_thousand_prefetches_keep_the_thread_count_bounded() {
        if std::env::var_os(ALONE).is_none() {
            let name =
                "chain::prefetch::tests::ten_thousand_prefetches_keep_the_thread_count_bounded";
            let out = std::process::Command::new(std::env::current_exe().unwrap())
                .args([name, "--exact", "--test-threads=1", "--nocapture"])
                .env(ALONE, "1")
                .output()
                .expect("run the test alone");
            let text = String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr);
            assert!(out.status.success(), "{text}");
            assert!(text.contains("1 passed"), "the child ran the test: {text}");
            return;
        }
        let chain = hot_only(8 << 20);
        for k in 0..8 {
            put(&chain, &key(k), k, 4096);
        }
        let before = threads();
        let mut most = before;
        let mut handles = Vec::with_capacity(10_000);
        for i in 0..10_000u32 {
            handles.push(chain.prefetch(vec![key(i % 8), key(i % 8 + 1), key(100)]));
            if i % 16 == 0 {
                most = most.max(threads());
            }
        }
        for h in &handles {
            let r = h
                .wait(Duration::from_secs(30))
                .expect("every prefetch finishes");
            assert_eq!(r.requested, 3);
        }
        most = most.max(threads());
        eprintln!("threads: {before} before, at most {most} during 10000 prefetches");
        assert!(
            most <= before + PREFETCH_WORKERS,
            "{most} threads during the prefetches, {before} before: more than {PREFETCH_WORKERS} were added"
        );
    }
}
