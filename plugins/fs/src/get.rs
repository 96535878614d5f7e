//! Serving get requests on the I/O threads.
//!
//! A request goes to one I/O thread, which hands its items out to the others as parts: one part per
//! item when the request has at least as many items as there are threads, else each large chunk is
//! split into ranges read at once by several threads (a page-cache copy or a device read of one 4 MiB
//! chunk then takes a fraction of the time). The thread that took the request runs the first part and
//! then whatever parts are still queued (see `serve` in `lib.rs`); the request completes when its last
//! part is done, on whichever thread finished it, so no thread waits for another.
//!
//! A chunk whose checksum must be verified is hashed in order (XXH3 is a stream): each part, once read,
//! is hashed by the first thread that finds every part before it hashed, so hashing the first part
//! overlaps reading the next.

use crate::format::{DataHasher, Header};
use crate::store::{IoBufs, OpenChunk, ReadOutcome, Store};
use crate::Part;
use crossbeam_channel::Sender;
use kvhost_plugin_sdk::{log, DstPart, Error, Get, Pending, SharedGet, Status};
use parking_lot::Mutex;
use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// The smallest part of a split chunk, so chunks under twice this are read by one thread (handing a
/// part to another thread costs tens of microseconds on a busy machine).
const SPLIT_MIN: usize = 1 << 20;
/// Part boundaries fall on multiples of this (a multiple of the O_DIRECT block).
const PART_ALIGN: usize = 64 << 10;

/// Work for one I/O thread: all of one item, or a range of a chunk read in parts.
pub enum GetPart {
    /// Read all of one item: look it up and open it here, or use the chunk already opened (one too
    /// small to split, or not splittable).
    Item {
        request: SharedGet,
        dst: DstPart,
        chunk: Option<OpenChunk>,
    },
    /// One range of a chunk read in parts.
    Range(RangePart),
}

/// What the parts of one chunk share; the last part to finish reports the item.
pub struct SplitRead {
    store: Arc<Store>,
    request: SharedGet,
    item: usize,
    chunk: OpenChunk,
    left: AtomicUsize,
    /// The decoded header, from the part at offset 0.
    header: Mutex<Option<Result<Header, &'static str>>>,
    /// The first error of any part.
    failure: Mutex<Option<io::Error>>,
    /// The in-order checksum, when the chunk must be verified.
    verify: Option<Mutex<Frontier>>,
}

/// The parts of a verified chunk, hashed in order as they arrive.
struct Frontier {
    /// Set from the header by the first part; out while a thread is hashing.
    hasher: Option<DataHasher>,
    /// A thread is hashing (with `hasher` taken out).
    busy: bool,
    /// The next part to hash.
    next: usize,
    /// Parts read but not yet hashed, by index.
    ready: Vec<Option<DstPart>>,
    /// A part failed: the chunk will not be served, stop hashing.
    broken: bool,
    /// The checksum of all parts.
    digest: Option<u64>,
}

/// One range of a split chunk. Dropping it (done, failed, or unwound by a panic) counts it as finished.
pub struct RangePart {
    read: Arc<SplitRead>,
    index: usize,
    /// Moved into the frontier once read, when verifying.
    dst: Option<DstPart>,
}

impl Drop for RangePart {
    fn drop(&mut self) {
        if self.read.left.fetch_sub(1, Ordering::AcqRel) != 1 {
            return;
        }
        let r = &*self.read;
        let key = r.request.key(r.item);
        let digest = r.verify.as_ref().and_then(|v| v.lock().digest);
        let outcome = r.store.conclude_parts(
            &r.chunk,
            key.canonical(),
            r.header.lock().take(),
            r.failure.lock().take(),
            digest,
        );
        report(&r.request, r.item, outcome);
    }
}

/// Serve `p`, spreading it over `threads` I/O threads through the `parts` queue.
pub fn run_get(
    store: &Arc<Store>,
    p: Pending<Get>,
    bufs: &mut IoBufs,
    threads: usize,
    parts: &Sender<Part>,
) {
    let (request, dsts) = match p.share() {
        Ok(x) => x,
        Err(p) => {
            let why = "get: the host passed overlapping destination buffers";
            log::error!("fs: {why}");
            return p.fail(&Error::new(Status::INVALID_ARG, why));
        }
    };
    let ways = threads / request.len().max(1);
    let mut work = Vec::with_capacity(request.len().max(threads));
    for dst in dsts {
        if ways < 2 {
            work.push(GetPart::Item {
                request: request.clone(),
                dst,
                chunk: None,
            });
        } else {
            split(store, &request, dst, ways, &mut work);
        }
    }
    drop(request);
    let mut work = work.into_iter();
    let mine = work.next();
    if threads > 1 {
        for part in work.by_ref() {
            // The receiving end lives as long as this thread.
            let _ = parts.send(Part::Get(part));
        }
    }
    if let Some(part) = mine {
        run_part(store, part, bufs);
    }
    for part in work {
        run_part(store, part, bufs);
    }
}

/// Open the chunk of `dst`'s item and queue it as up to `ways` parts (one if it is small).
fn split(
    store: &Arc<Store>,
    request: &SharedGet,
    dst: DstPart,
    ways: usize,
    out: &mut Vec<GetPart>,
) {
    let i = dst.item();
    let key = request.key(i);
    let chunk = match store.open_chunk(key.key_hash(), key.canonical(), dst.len()) {
        Ok(c) => c,
        Err(outcome) => return report(request, i, outcome),
    };
    let len = chunk.data_len();
    let n = ways.min(len / SPLIT_MIN);
    if n < 2 || !chunk.splittable(dst.as_ptr()) {
        out.push(GetPart::Item {
            request: request.clone(),
            dst,
            chunk: Some(chunk),
        });
        return;
    }
    let step = (len / n).div_ceil(PART_ALIGN) * PART_ALIGN;
    let count = len.div_ceil(step);
    let verify = chunk.check().then(|| {
        Mutex::new(Frontier {
            hasher: None,
            busy: false,
            next: 0,
            ready: (0..count).map(|_| None).collect(),
            broken: false,
            digest: None,
        })
    });
    let read = Arc::new(SplitRead {
        store: store.clone(),
        request: request.clone(),
        item: i,
        chunk,
        left: AtomicUsize::new(count),
        header: Mutex::new(None),
        failure: Mutex::new(None),
        verify,
    });
    // The capacity past the data is not written.
    let (mut rest, _) = dst.split_at(len);
    for index in 0..count {
        let mid = step.min(rest.len());
        let (part, tail) = rest.split_at(mid);
        out.push(GetPart::Range(RangePart {
            read: read.clone(),
            index,
            dst: Some(part),
        }));
        rest = tail;
    }
}

/// Hand part `index` (read, or `None` if its read failed) to the checksum, and hash every part that is
/// next in order, unless another thread is already doing so.
fn hash_in_order(frontier: &Mutex<Frontier>, index: usize, part: Option<DstPart>) {
    let mut f = frontier.lock();
    match part {
        Some(p) => f.ready[index] = Some(p),
        None => f.broken = true,
    }
    if f.busy {
        return;
    }
    loop {
        let next = f.next;
        if f.broken || f.hasher.is_none() || f.ready.get(next).is_none_or(Option::is_none) {
            break;
        }
        let (Some(mut part), Some(mut hasher)) = (f.ready[next].take(), f.hasher.take()) else {
            break;
        };
        f.busy = true;
        parking_lot::MutexGuard::unlocked(&mut f, || hasher.update(part.bytes()));
        f.busy = false;
        f.hasher = Some(hasher);
        f.next += 1;
    }
    if f.next == f.ready.len() && !f.broken {
        f.digest = f.hasher.as_ref().map(DataHasher::digest);
    }
}

/// Run one part on this thread.
pub fn run_part(store: &Store, part: GetPart, bufs: &mut IoBufs) {
    match part {
        GetPart::Item {
            request,
            mut dst,
            chunk,
        } => {
            let i = dst.item();
            let key = request.key(i);
            let outcome = match chunk {
                Some(c) => store.read_opened(c, key.canonical(), dst.bytes(), bufs),
                None => store.read(key.key_hash(), key.canonical(), dst.bytes(), bufs),
            };
            report(&request, i, outcome);
        }
        GetPart::Range(mut part) => {
            let r = &*part.read;
            let Some(dst) = part.dst.as_mut() else { return };
            let offset = dst.offset();
            let ok = match store.read_part(&r.chunk, offset, dst.bytes(), bufs) {
                Ok(Some(Ok((fixed, header)))) => {
                    if let Some(v) = &r.verify {
                        v.lock().hasher = Some(fixed.hasher(header.canonical.as_bytes()));
                    }
                    *r.header.lock() = Some(Ok(header));
                    true
                }
                Ok(Some(Err(why))) => {
                    *r.header.lock() = Some(Err(why));
                    false
                }
                Ok(None) => true,
                Err(e) => {
                    r.failure.lock().get_or_insert(e);
                    false
                }
            };
            if let Some(v) = &r.verify {
                let done = part.dst.take().filter(|_| ok);
                hash_in_order(v, part.index, done);
            }
        }
    }
}

fn report(request: &SharedGet, i: usize, outcome: ReadOutcome) {
    match outcome {
        ReadOutcome::Hit { len, meta } => request.set_found(i, len, meta),
        ReadOutcome::Miss => request.set_status(i, Status::NOT_FOUND),
        ReadOutcome::TooSmall(n) => request.set_too_small(i, n as usize),
        ReadOutcome::Failed(s) => request.set_status(i, s),
    }
}
