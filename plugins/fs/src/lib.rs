//! `fs`: a kvhost storage backend that keeps each KV chunk as one checksummed file in a local directory.
//!
//! - Writes go to a temporary file (made ahead of time by a background thread, see `pool.rs`) and are
//!   renamed into place, so a crash never leaves a chunk that reads back wrong; `fsync` chooses when
//!   data is made durable.
//! - At `create` the index is rebuilt from the directory: temporary files and files whose header, size
//!   or name is invalid are removed (and counted); data checksums are verified on every read, and a
//!   chunk that fails is reported `KVH_ERR_CORRUPT` and removed.
//! - Capacity (`max_size_gib`) is enforced with LRU eviction; pinned chunks are never evicted, and a put
//!   that cannot fit fails with `KVH_ERR_NO_SPACE`.
//! - `put` and `get` run on the backend's own I/O threads; `get` reads straight into the host's
//!   buffer. `contains`, `remove`, `pin`, `unpin` are index operations (remove also unlinks).
//!
//! See `README.md` for the file format and the options.

mod format;
mod get;
mod index;
mod io;
mod pool;
mod put;
mod store;

use crossbeam_channel::{Receiver, Sender};
use kvhost_plugin_sdk::abi;
use kvhost_plugin_sdk::log;
use kvhost_plugin_sdk::*;
use parking_lot::{Mutex, RwLock};
use std::path::PathBuf;
use std::sync::Arc;
use std::thread::JoinHandle;
use store::{Fsync, IoBufs, Settings, Store};

enum Job {
    Put(Pending<Put>),
    Get(Pending<Get>),
}

/// The `fs` backend: a [`Store`] plus its I/O threads.
pub struct FsBackend {
    store: Arc<Store>,
    queue: RwLock<Option<Sender<Job>>>,
    workers: Mutex<Vec<JoinHandle<()>>>,
    /// The background thread filling the pool and creating shard directories.
    prep: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for FsBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FsBackend")
            .field("store", &self.store)
            .finish()
    }
}

fn parse_bool(key: &str, v: &str) -> Result<bool, Error> {
    match v.trim().to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Ok(true),
        "false" | "0" | "no" | "off" => Ok(false),
        _ => Err(Error::config(format!(
            "fs: option `{key}` = `{v}`: expected true or false"
        ))),
    }
}

/// Pool files kept ready: enough for every I/O thread to take one while the next are made.
fn pool_files_for(io_threads: usize) -> usize {
    (2 * io_threads).clamp(4, 32)
}

/// Parse the options of `create` into store settings and the I/O thread count.
fn settings_from(ctx: &CreateContext) -> Result<(Settings, usize), Error> {
    let path = ctx.option("path").unwrap_or("").trim();
    if path.is_empty() {
        return Err(Error::config("fs: option `path` must name a directory"));
    }
    let gib: f64 = ctx.parse("max_size_gib")?;
    if !gib.is_finite() || gib <= 0.0 || gib > (1u64 << 33) as f64 {
        return Err(Error::config(format!(
            "fs: option `max_size_gib` = `{gib}`: expected a positive number of GiB"
        )));
    }
    let capacity = (gib * (1u64 << 30) as f64) as u64;
    if capacity < 2 * format::ALIGN {
        return Err(Error::config(format!(
            "fs: option `max_size_gib` = `{gib}` is smaller than two 4 KiB blocks"
        )));
    }
    let fsync_text = ctx.option("fsync").unwrap_or("none").trim();
    let fsync = Fsync::parse(fsync_text).ok_or_else(|| {
        Error::config(format!(
            "fs: option `fsync` = `{fsync_text}`: expected none, chunk or batch"
        ))
    })?;
    let shards: u32 = ctx.parse("shards")?;
    if !(1..=65536).contains(&shards) {
        return Err(Error::config(format!(
            "fs: option `shards` = `{shards}`: expected 1 to 65536"
        )));
    }
    let io_threads: usize = ctx.parse("io_threads")?;
    if !(1..=256).contains(&io_threads) {
        return Err(Error::config(format!(
            "fs: option `io_threads` = `{io_threads}`: expected 1 to 256"
        )));
    }
    let o_direct = parse_bool("o_direct", ctx.option("o_direct").unwrap_or("false"))?;
    let verify_always = match ctx.option("verify_reads").unwrap_or("first").trim() {
        "always" => true,
        "first" => false,
        other => {
            return Err(Error::config(format!(
                "fs: option `verify_reads` = `{other}`: expected first or always"
            )))
        }
    };
    Ok((
        Settings {
            root: PathBuf::from(path),
            capacity,
            fsync,
            shards,
            scan_threads: io_threads,
            o_direct,
            verify_always,
            simulate_no_direct: false,
            pool_files: pool_files_for(io_threads),
        },
        io_threads,
    ))
}

impl FsBackend {
    /// Open a store with `settings` and start `io_threads` I/O threads. With the host's context the
    /// threads run under the SDK's panic boundary (a panic poisons the backend) and log by instance.
    fn start(
        settings: Settings,
        io_threads: usize,
        ctx: Option<&CreateContext>,
    ) -> Result<Self, Error> {
        let store = Arc::new(Store::open(settings)?);
        let (tx, rx) = crossbeam_channel::unbounded::<Job>();
        let (parts_tx, parts_rx) = crossbeam_channel::unbounded::<Part>();
        let mut workers = Vec::with_capacity(io_threads);
        for i in 0..io_threads {
            let queues = Queues {
                jobs: rx.clone(),
                parts: (parts_tx.clone(), parts_rx.clone()),
                threads: io_threads,
            };
            let store = store.clone();
            let name = format!("kvhost-fs-io-{i}");
            let run = move || worker(&store, &queues);
            let spawned = match ctx {
                Some(ctx) => ctx.spawn(&name, run),
                None => std::thread::Builder::new().name(name).spawn(run),
            };
            match spawned {
                Ok(h) => workers.push(h),
                Err(e) => {
                    drop(tx);
                    for w in workers {
                        let _ = w.join();
                    }
                    return Err(Error::new(
                        Status::INTERNAL,
                        format!("fs: cannot start an I/O thread: {e}"),
                    ));
                }
            }
        }
        let prep = {
            let store = store.clone();
            let run = move || prep(&store);
            let name = "kvhost-fs-prep";
            match ctx {
                Some(ctx) => ctx.spawn(name, run),
                None => std::thread::Builder::new().name(name.into()).spawn(run),
            }
        };
        // Without it, puts create their own files and directories, as they do when the pool is empty.
        let prep = prep
            .map_err(|e| log::warn!("fs: cannot start the pool thread: {e}"))
            .ok();
        Ok(FsBackend {
            store,
            queue: RwLock::new(Some(tx)),
            workers: Mutex::new(workers),
            prep: Mutex::new(prep),
        })
    }

    fn submit<O: Op>(&self, req: Request<O>, job: fn(Pending<O>) -> Job) -> Submit {
        let queue = self.queue.read();
        let Some(tx) = queue.as_ref() else {
            return req.finish(Status::CANCELED);
        };
        let (pending, submit) = req.defer();
        // Sending fails only if every I/O thread died; the job is then dropped, which completes it with
        // CANCELED (allowed: the completion may fire before PENDING is returned).
        let _ = tx.send(job(pending));
        submit
    }
}

/// The background thread: prepare while there is work, then sleep until a pool file is taken (or a
/// second passes, to retry after a failure), until the pool is stopped.
fn prep(store: &Store) {
    let Some(pool) = store.pool() else {
        while store.prep_step() {}
        return;
    };
    loop {
        while store.prep_step() {}
        if !pool.wait(std::time::Duration::from_secs(1)) {
            return;
        }
    }
}

/// What an I/O thread takes work from.
struct Queues {
    jobs: Receiver<Job>,
    /// Parts of get and put requests, shared by the I/O threads (see `get.rs`, `put.rs`); served
    /// before new jobs.
    parts: (Sender<Part>, Receiver<Part>),
    threads: usize,
}

fn worker(store: &Arc<Store>, q: &Queues) {
    let mut bufs = IoBufs::default();
    loop {
        let work = crossbeam_channel::select_biased! {
            recv(q.parts.1) -> part => part.map(Work::Part),
            recv(q.jobs) -> job => job.map(Work::Job),
        };
        // The parts channel stays open while this thread holds a sender: an error is the end of jobs.
        let Ok(work) = work else { break };
        serve(store, q, work, &mut bufs);
    }
    // Parts queued by threads still finishing their last request.
    while let Ok(part) = q.parts.1.try_recv() {
        serve(store, q, Work::Part(part), &mut bufs);
    }
}

enum Work {
    Job(Job),
    Part(Part),
}

/// A piece of a request that any I/O thread can run (see `get.rs` and `put.rs`).
pub(crate) enum Part {
    Get(get::GetPart),
    Stage(put::StagePart),
}

fn run_part(store: &Store, part: Part, bufs: &mut IoBufs) {
    match part {
        Part::Get(p) => get::run_part(store, p, bufs),
        Part::Stage(p) => put::run_stage(p, bufs),
    }
}

fn serve(store: &Arc<Store>, q: &Queues, work: Work, bufs: &mut IoBufs) {
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        match work {
            Work::Job(Job::Put(p)) => put::run_put(store, p, bufs, q.threads, &q.parts.0),
            Work::Job(Job::Get(p)) => get::run_get(store, p, bufs, q.threads, &q.parts.0),
            Work::Part(part) => return run_part(store, part, bufs),
        }
        // The parts a request just queued: this thread runs those no other thread has taken yet.
        while let Ok(part) = q.parts.1.try_recv() {
            run_part(store, part, bufs);
        }
    }));
    if outcome.is_err() {
        // The request (or part) was dropped while unwinding, which completed it with CANCELED or
        // reported the item as failed.
        log::error!("fs: an I/O thread panicked while serving a request");
        *bufs = IoBufs::default();
    }
}

impl Backend for FsBackend {
    const CAPABILITIES: u64 = abi::KVH_CAP_PIN
        | abi::KVH_CAP_PERSISTENT
        | abi::KVH_CAP_FLUSH
        | abi::KVH_CAP_HEALTH
        | abi::KVH_CAP_CLEAR
        | abi::KVH_CAP_STATS;
    const OPTIONS: &'static [OptionSpec] = &[
        OptionSpec::required(
            c"path",
            c"directory holding the chunk files (created if missing; one backend instance per directory)",
        ),
        OptionSpec::optional(
            c"max_size_gib",
            c"16",
            c"capacity in GiB (fractions allowed) of chunk files on disk; least recently used chunks are evicted beyond it",
        ),
        OptionSpec::optional(
            c"fsync",
            c"none",
            c"none: never on the put path (flush syncs); chunk: every file before its put completes; batch: once per put request",
        ),
        OptionSpec::optional(
            c"shards",
            c"256",
            c"number of subdirectories the chunk files are spread over (1 to 65536)",
        ),
        OptionSpec::optional(
            c"io_threads",
            c"2",
            c"threads serving put and get (1 to 256); a get of fewer chunks than threads has each chunk of 2 MiB or more read in parts by several of them",
        ),
        OptionSpec::optional(
            c"o_direct",
            c"false",
            c"true: read and write chunk files with O_DIRECT (bypassing the page cache) where the filesystem supports it",
        ),
        OptionSpec::optional(
            c"verify_reads",
            c"first",
            c"first: check a chunk's data checksum on its first read after start-up; always: on every read",
        ),
    ];
    const DESCRIPTION: &'static std::ffi::CStr =
        c"Local-disk store: one checksummed file per chunk, atomic writes, LRU capacity, restart recovery";

    fn create(ctx: &CreateContext) -> Result<Self, Error> {
        let (settings, io_threads) = settings_from(ctx)?;
        FsBackend::start(settings, io_threads, Some(ctx))
    }

    fn contains(&self, batch: &mut ContainsBatch<'_>) -> Result<(), Error> {
        let pin = batch.pin();
        for i in 0..batch.len() {
            let k = batch.key(i);
            match self.store.contains(k.key_hash(), k.canonical(), pin) {
                Ok(Some(meta)) => batch.set_present(i, meta),
                Ok(None) => batch.set_absent(i),
                Err(s) => batch.set_status(i, s),
            }
        }
        Ok(())
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

    fn remove(&self, batch: &mut KeyBatch<'_>, force: bool) -> Result<(), Error> {
        for i in 0..batch.len() {
            let k = batch.key(i);
            let st = self.store.remove(k.key_hash(), k.canonical(), force);
            batch.set_status(i, st);
        }
        Ok(())
    }

    fn pin(&self, batch: &mut KeyBatch<'_>) -> Result<(), Error> {
        for i in 0..batch.len() {
            let k = batch.key(i);
            let st = self.store.pin(k.key_hash(), k.canonical());
            batch.set_status(i, st);
        }
        Ok(())
    }

    fn unpin(&self, batch: &mut KeyBatch<'_>) -> Result<(), Error> {
        for i in 0..batch.len() {
            let k = batch.key(i);
            let st = self.store.unpin(k.key_hash(), k.canonical());
            batch.set_status(i, st);
        }
        Ok(())
    }

    fn flush(&self) -> Result<(), Error> {
        self.store.flush()
    }

    fn clear(&self) -> Result<(), Error> {
        self.store.clear().map(|_| ())
    }

    fn health(&self) -> Result<String, Error> {
        self.store.health()
    }

    fn stats(&self, out: &mut kvhost_plugin_sdk::Stats) -> Result<(), Error> {
        self.store.stats(out);
        Ok(())
    }
}

impl Drop for FsBackend {
    /// Stop taking requests, let the I/O threads finish every queued one (their completions fire), and
    /// join them.
    fn drop(&mut self) {
        if let Some(pool) = self.store.pool() {
            pool.stop();
        }
        if let Some(p) = self.prep.lock().take() {
            if p.join().is_err() {
                log::error!("fs: the pool thread panicked");
            }
        }
        drop(self.queue.write().take());
        for w in self.workers.lock().drain(..) {
            if w.join().is_err() {
                log::error!("fs: an I/O thread panicked");
            }
        }
    }
}

export_backend!(fs, FsBackend);

unsafe extern "C" {
    // Defined by `export_backend!` above under its C name.
    fn kvh_plugin_fs_v1(host: *const abi::kvh_host_api) -> *const abi::kvh_plugin_descriptor;
}

/// The entry point, for hosts that link this crate instead of loading the `.so`.
pub fn entry() -> unsafe extern "C" fn(*const abi::kvh_host_api) -> *const abi::kvh_plugin_descriptor
{
    kvh_plugin_fs_v1
}

#[cfg(test)]
mod tests;
