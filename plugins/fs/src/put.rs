//! Serving put requests on the I/O threads.
//!
//! The chunks of a request are written to temporary files in windows of [`PUT_WINDOW`]. A window of
//! several chunks and at least [`PARALLEL_PUT_MIN`] bytes is queued as one part per chunk, so idle I/O
//! threads write its chunks at once; the thread that writes its last chunk makes the window visible in
//! request order (so within a request the last put of a key wins) and starts the next window. Smaller
//! windows are written in order by the thread at hand. No I/O thread waits for another, and no thread
//! is started per request.

use crate::store::{Fsync, IoBufs, Staged, Store};
use crate::Part;
use crossbeam_channel::Sender;
use kvhost_plugin_sdk::{log, Error, Pending, Put, SharedPut, Status};
use parking_lot::Mutex;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// Chunks of a put staged (each holding an open temporary file) at a time.
const PUT_WINDOW: usize = 64;
/// Bytes a window must hold before its chunks are spread over the I/O threads (a hand-off costs tens
/// of microseconds).
const PARALLEL_PUT_MIN: usize = 1 << 20;

/// One put request in progress.
pub struct PutRun {
    store: Arc<Store>,
    request: SharedPut,
    parts: Sender<Part>,
    threads: usize,
    /// Shard directories written to, with the items in each (synced at the end when `fsync` asks).
    dirs: Mutex<BTreeMap<u32, Vec<usize>>>,
}

/// A window of a put request whose chunks are staged by several threads.
pub struct Window {
    run: Arc<PutRun>,
    start: usize,
    staged: Vec<Mutex<Option<Result<Staged, Error>>>>,
    left: AtomicUsize,
}

/// Stage item `item` of a window. Dropping it (done, or unwound by a panic) counts it as finished; the
/// last one commits the window.
pub struct StagePart {
    window: Arc<Window>,
    item: usize,
}

impl Drop for StagePart {
    fn drop(&mut self) {
        if self.window.left.fetch_sub(1, Ordering::AcqRel) != 1 {
            return;
        }
        let w = &*self.window;
        let staged = w
            .staged
            .iter()
            .enumerate()
            .map(|(k, slot)| {
                let r = slot.lock().take().unwrap_or_else(|| {
                    Err(Error::new(
                        Status::INTERNAL,
                        "fs: the thread writing this chunk panicked",
                    ))
                });
                (w.start + k, r)
            })
            .collect();
        commit(&w.run, staged);
        advance(&w.run, w.start + w.staged.len(), None);
    }
}

/// Serve `p`, spreading its chunks over `threads` I/O threads through the `parts` queue.
pub fn run_put(
    store: &Arc<Store>,
    p: Pending<Put>,
    bufs: &mut IoBufs,
    threads: usize,
    parts: &Sender<Part>,
) {
    let run = Arc::new(PutRun {
        store: store.clone(),
        request: p.share(),
        parts: parts.clone(),
        threads,
        dirs: Mutex::new(BTreeMap::new()),
    });
    advance(&run, 0, Some(bufs));
}

/// Write the chunk of a queued part.
pub fn run_stage(part: StagePart, bufs: &mut IoBufs) {
    let r = stage(&part.window.run, part.item, bufs);
    *part.window.staged[part.item - part.window.start].lock() = Some(r);
}

/// Continue `run` from item `start`: small windows are staged and committed here (with `bufs`, or
/// this thread's own when a window finisher gets here from `drop`), the first large one is queued;
/// after the last window, sync the directories.
fn advance(run: &Arc<PutRun>, mut start: usize, mut bufs: Option<&mut IoBufs>) {
    let len = run.request.len();
    let mut own = IoBufs::default();
    while start < len {
        let end = (start + PUT_WINDOW).min(len);
        let bytes: usize = (start..end).map(|i| run.request.data(i).len()).sum();
        if run.threads > 1 && end - start > 1 && bytes >= PARALLEL_PUT_MIN {
            let window = Arc::new(Window {
                run: run.clone(),
                start,
                staged: (start..end).map(|_| Mutex::new(None)).collect(),
                left: AtomicUsize::new(end - start),
            });
            for item in start..end {
                let part = StagePart {
                    window: window.clone(),
                    item,
                };
                // The receiving end lives as long as the I/O threads, which run this code; a part
                // that cannot be queued is dropped, which reports its chunk as failed.
                let _ = run.parts.send(Part::Stage(part));
            }
            return;
        }
        let b = bufs.as_deref_mut().unwrap_or(&mut own);
        let staged = (start..end).map(|i| (i, stage(run, i, b))).collect();
        commit(run, staged);
        start = end;
    }
    if run.store.settings().fsync != Fsync::None {
        for (shard, items) in std::mem::take(&mut *run.dirs.lock()) {
            if let Err(e) = run.store.sync_dir(shard) {
                log::warn!("{e}");
                // Visible but maybe not durable: report the put as failed.
                items
                    .iter()
                    .for_each(|&i| run.request.set_status(i, e.status));
            }
        }
    }
}

fn stage(run: &PutRun, i: usize, bufs: &mut IoBufs) -> Result<Staged, Error> {
    let key = run.request.key(i);
    let meta = run.request.meta(i);
    run.store.stage(
        key.key_hash(),
        key.canonical(),
        run.request.data(i),
        &meta,
        bufs,
    )
}

/// Make the staged chunks visible in order and report every item.
fn commit(run: &PutRun, staged: Vec<(usize, Result<Staged, Error>)>) {
    let store = &run.store;
    let batch_sync = store.settings().fsync == Fsync::Batch;
    for (i, r) in staged {
        let s = match r {
            Ok(s) => s,
            Err(e) => {
                log::debug!("fs: put {}: {e}", run.request.key(i).canonical());
                run.request.set_status(i, e.status);
                continue;
            }
        };
        let shard = s.shard();
        let synced = if batch_sync {
            store.sync_staged(s)
        } else {
            Ok(s)
        };
        match synced.and_then(|s| store.commit(s)) {
            Ok(()) => {
                run.request.set_status(i, Status::OK);
                run.dirs.lock().entry(shard).or_default().push(i);
            }
            Err(e) => {
                log::warn!("fs: put {}: {e}", run.request.key(i).canonical());
                run.request.set_status(i, e.status);
            }
        }
    }
}
