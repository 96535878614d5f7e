//! The chain's breaker thread: every 50 ms it trips the breakers of tiers with a put past its
//! deadline and probes the open ones. A probe runs on its own thread and is given up after the read
//! timeout, so a plugin whose `health` hangs delays neither the other tiers nor the deadlines; while
//! one probe of a tier is still stuck, no second one starts.

use super::tier::Tier;
use super::Inner;
use crate::key::ChunkKey;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Start the thread; it ends when the chain closes or is dropped.
pub(super) fn start_monitor(inner: &Arc<Inner>) {
    if inner.tiers.is_empty() {
        return;
    }
    let weak = Arc::downgrade(inner);
    let probing: Vec<Arc<AtomicBool>> = inner.tiers.iter().map(|_| Arc::default()).collect();
    let spawned = std::thread::Builder::new()
        .name("kvhost-breakers".into())
        .spawn(move || loop {
            std::thread::sleep(Duration::from_millis(50));
            let Some(inner) = weak.upgrade() else {
                return;
            };
            if inner.closed.load(Ordering::Acquire) {
                return;
            }
            for (tier, busy) in inner.tiers.iter().zip(&probing) {
                let timeout = inner.settings.read_timeout;
                tier.breaker
                    .tick(|| probe_in_thread(tier.clone(), busy.clone(), timeout));
            }
        });
    if let Err(e) = spawned {
        tracing::error!(target: "kvhost::chain", "cannot start the breaker thread ({e}): tiers are not probed or timed");
    }
}

/// Run [`probe`] on a helper thread and wait up to `timeout` for it.
fn probe_in_thread(
    tier: Arc<Tier>,
    busy: Arc<AtomicBool>,
    timeout: Duration,
) -> Result<String, String> {
    if busy.swap(true, Ordering::AcqRel) {
        return Err("the previous probe has not returned yet".to_string());
    }
    let (tx, rx) = crossbeam_channel::bounded(1);
    let spawned = std::thread::Builder::new()
        .name("kvhost-probe".into())
        .spawn(move || {
            let result = probe(&tier, timeout);
            busy.store(false, Ordering::Release);
            let _ = tx.send(result);
        });
    if let Err(e) = spawned {
        return Err(format!("cannot start a probe thread: {e}"));
    }
    rx.recv_timeout(timeout)
        .unwrap_or_else(|_| Err(format!("no answer within {timeout:?}")))
}

/// The plugin's `health`, or, without one, a lookup of one key answered in time.
fn probe(tier: &Tier, timeout: Duration) -> Result<String, String> {
    let plugin = tier.plugin().ok_or("the tier is closed")?;
    match plugin.health() {
        Some(Ok(text)) => Ok(format!("health: {text}")),
        Some(Err(e)) => Err(e.to_string()),
        None => {
            let key = ChunkKey::new("kvhost/breaker-probe", 1, 0, 1, "bfloat16")
                .map_err(|e| e.to_string())?;
            plugin
                .contains_wait(&[key], false, timeout)
                .map(|_| "a lookup answered".to_string())
                .map_err(|e| e.to_string())
        }
    }
}
