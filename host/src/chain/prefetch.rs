//! Prefetch: load the cached prefix of some keys into the hot cache in the background.

use super::Chain;
use crate::key::ChunkKey;
use parking_lot::{Condvar, Mutex};
use std::sync::Arc;
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

impl Chain {
    /// Load the cached prefix of `keys` into the hot cache in the background.
    pub fn prefetch(&self, keys: Vec<ChunkKey>) -> PrefetchHandle {
        let handle = PrefetchHandle {
            shared: Arc::new((Mutex::new(None), Condvar::new())),
        };
        let chain = self.clone();
        let h = handle.clone();
        let spawned = std::thread::Builder::new()
            .name("kvhost-prefetch".into())
            .spawn(move || {
                let lookup = chain.lookup(&keys, None);
                let prefix = &keys[..lookup.hit_chunks];
                let before = prefix
                    .iter()
                    .filter(|k| chain.inner.hot.contains(k))
                    .count();
                let got = chain.get(prefix);
                let arrived = got.iter().take_while(|h| h.is_some()).count();
                h.finish(PrefetchResult {
                    requested: keys.len(),
                    arrived,
                    promoted: arrived.saturating_sub(before),
                });
            });
        if spawned.is_err() {
            handle.finish(PrefetchResult::default());
        }
        handle
    }
}
