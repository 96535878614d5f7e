//! The store: chunk files in a directory plus the in-memory [`Index`], independent of the SDK's request
//! types (the backend in `lib.rs` drives it from its I/O threads).
//!
//! Locking: `stripes[key_hash % 256]` serialises the file-name-level operations of one key (the rename
//! that commits a put, the unlink of remove, eviction and corruption handling), and is always taken
//! before the index mutex. The index mutex is never held across file I/O except a rename or unlink
//! under its stripe. `clear` takes every stripe, in order.

use crate::format::{self, Header, PendingHeader, ALIGN, CHUNK_EXT, FIXED_LEN, TMP_EXT};
use crate::index::{Index, NewEntry, NoSpace, Victim};
use crate::io::{self as fio, AlignedBuf, BOUNCE};
use crate::pool::{Pool, PoolFile, POOL_DIR};
use kvhost_plugin_sdk::log;
use kvhost_plugin_sdk::{ChunkMeta, Error, Status};
use parking_lot::Mutex;
use std::collections::{BTreeSet, HashMap};
use std::fs::{self, File, OpenOptions};
use std::io::{self, IoSliceMut, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::time::{Instant, SystemTime};

/// When the plugin calls fsync.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fsync {
    /// Never on the put path; `flush` makes completed puts durable.
    None,
    /// Each chunk file is fdatasync'ed before its rename; directories are fsync'ed before the put
    /// completes.
    Chunk,
    /// All files of one put request are written, then fdatasync'ed together, renamed, and each
    /// directory touched is fsync'ed once, before the put completes.
    Batch,
}

impl Fsync {
    /// Parse an option value.
    pub fn parse(s: &str) -> Option<Fsync> {
        match s {
            "none" => Some(Fsync::None),
            "chunk" => Some(Fsync::Chunk),
            "batch" => Some(Fsync::Batch),
            _ => None,
        }
    }
    fn name(self) -> &'static str {
        match self {
            Fsync::None => "none",
            Fsync::Chunk => "chunk",
            Fsync::Batch => "batch",
        }
    }
}

/// Everything the store is configured with.
#[derive(Clone, Debug)]
pub struct Settings {
    /// The directory.
    pub root: PathBuf,
    /// Capacity in bytes.
    pub capacity: u64,
    /// fsync policy.
    pub fsync: Fsync,
    /// Number of shard subdirectories.
    pub shards: u32,
    /// Threads used by the start-up scan (the I/O thread count).
    pub scan_threads: usize,
    /// Use O_DIRECT if the filesystem supports it.
    pub o_direct: bool,
    /// Verify the data checksum on every read (else only until a chunk has passed once).
    pub verify_always: bool,
    /// Behave as if the filesystem refused O_DIRECT (tests of the fallback path only).
    pub simulate_no_direct: bool,
    /// Files the temporary-file pool keeps ready (0: no pool).
    pub pool_files: usize,
}

/// What the start-up scan found.
#[derive(Clone, Debug, Default)]
pub struct StartReport {
    /// Valid chunks indexed.
    pub chunks: usize,
    /// Their charged bytes.
    pub bytes: u64,
    /// Temporary files (interrupted writes) removed.
    pub temp_removed: u64,
    /// Chunk files with a bad header, size or name removed.
    pub corrupt_removed: u64,
    /// Older duplicates of a key removed.
    pub duplicates_removed: u64,
    /// Valid files moved to the shard the current `shards` puts them in.
    pub moved: u64,
    /// Chunks evicted because the capacity is smaller than what was found.
    pub evicted: u64,
    /// Files that could not be read or removed (left alone).
    pub errors: u64,
    /// How long the scan took.
    pub millis: u128,
}

impl StartReport {
    /// Invalid files removed.
    pub fn removed(&self) -> u64 {
        self.temp_removed + self.corrupt_removed
    }
}

#[derive(Default)]
struct Stats {
    corrupt_on_read: AtomicU64,
    missing_on_read: AtomicU64,
    io_errors: AtomicU64,
    no_space: AtomicU64,
    /// Chunks read in parts by several threads.
    split_reads: AtomicU64,
}

#[derive(Default)]
struct Dirty {
    files: Vec<PathBuf>,
    dirs: BTreeSet<u32>,
    overflow: bool,
}

/// Dirty files remembered for `flush` (fsync=none) before falling back to one `syncfs`.
const MAX_DIRTY: usize = 1 << 16;
/// Free space below which `health` reports `NO_SPACE`.
const MIN_FREE: u64 = 16 << 20;
const STRIPES: usize = 256;
/// Buffered writes are at most this size, at file offsets that are multiples of it (larger ones run
/// into dirty-page throttling); verified buffered reads are checksummed in pieces of this size, each
/// while it is still in cache.
const PIECE: usize = 1 << 20;
const LOCK_FILE: &str = ".kvhost-fs.lock";
/// Threads `flush` fdatasyncs files from (one per 8 files, at most this many).
const FLUSH_THREADS: usize = 8;

/// Per-thread reusable buffers.
#[derive(Debug, Default)]
pub struct IoBufs {
    bounce: Option<AlignedBuf>,
    header: Vec<u8>,
}

impl IoBufs {
    fn bounce(&mut self) -> &mut AlignedBuf {
        self.bounce.get_or_insert_with(|| AlignedBuf::new(BOUNCE))
    }
}

/// A chunk written to its temporary file, with its capacity reserved, not yet visible.
#[derive(Debug)]
pub struct Staged {
    key_hash: u64,
    canonical: Box<str>,
    meta: ChunkMeta,
    data_offset: u64,
    data_len: u64,
    charge: u64,
    shard: u32,
    tmp: PathBuf,
    file: File,
}

impl Staged {
    /// The shard directory it goes to.
    pub fn shard(&self) -> u32 {
        self.shard
    }
}

/// The outcome of reading one chunk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReadOutcome {
    /// `len` bytes were written to the destination.
    Hit {
        /// Bytes.
        len: usize,
        /// Stored metadata.
        meta: ChunkMeta,
    },
    /// Not stored.
    Miss,
    /// The destination needs this many bytes.
    TooSmall(u64),
    /// An error (`CORRUPT`, `IO`, ...).
    Failed(Status),
}

/// A chunk file opened for reading, with what the index said about it when it was looked up.
#[derive(Debug)]
pub struct OpenChunk {
    key_hash: u64,
    gen: u64,
    path: PathBuf,
    file: File,
    direct: bool,
    data_offset: u64,
    data_len: u64,
    /// Verify the data checksum.
    check: bool,
    /// Not verified since start-up.
    unverified: bool,
}

impl OpenChunk {
    /// Bytes of data.
    pub fn data_len(&self) -> usize {
        self.data_len as usize
    }

    /// Whether the chunk can be read in parts by [`Store::read_part`] into `dst`: always when buffered;
    /// with O_DIRECT, if its data offset and `dst` are block-aligned.
    pub fn splittable(&self, dst: *const u8) -> bool {
        !self.direct || (self.data_offset % ALIGN == 0 && fio::is_aligned(dst))
    }

    /// Whether the data checksum must be verified.
    pub fn check(&self) -> bool {
        self.check
    }
}

/// The store.
pub struct Store {
    settings: Settings,
    index: Mutex<Index>,
    stripes: Vec<Mutex<()>>,
    direct: AtomicBool,
    direct_state: Mutex<String>,
    dirty: Mutex<Dirty>,
    tmp_seq: AtomicU64,
    pool: Option<Pool>,
    /// Shard directories up to this one were created by [`Store::prep_step`].
    dirs_made: AtomicU32,
    stats: Stats,
    start: StartReport,
    _lock: File,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("root", &self.settings.root)
            .finish()
    }
}

fn io_error(context: impl std::fmt::Display, e: &io::Error) -> Error {
    Error::io(&context.to_string(), e)
}

impl Store {
    /// Open (creating it if needed) and lock the directory, probe O_DIRECT, and rebuild the index from
    /// the files found.
    pub fn open(settings: Settings) -> Result<Store, Error> {
        let root = &settings.root;
        if root.exists() && !root.is_dir() {
            return Err(Error::config(format!(
                "fs: path {} is not a directory",
                root.display()
            )));
        }
        fs::create_dir_all(root).map_err(|e| {
            Error::config(format!(
                "fs: cannot create directory {}: {e}",
                root.display()
            ))
        })?;
        let md = fs::metadata(root)
            .map_err(|e| Error::config(format!("fs: {}: {e}", root.display())))?;
        if !md.is_dir() {
            return Err(Error::config(format!(
                "fs: path {} is not a directory",
                root.display()
            )));
        }
        let lock = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(root.join(LOCK_FILE))
            .map_err(|e| {
                io_error(
                    format!("fs: cannot open {}", root.join(LOCK_FILE).display()),
                    &e,
                )
            })?;
        if let Err(e) =
            rustix::fs::flock(&lock, rustix::fs::FlockOperation::NonBlockingLockExclusive)
        {
            return Err(Error::config(format!(
                "fs: directory {} is in use by another fs backend instance ({e}); give each instance its own path",
                root.display()
            )));
        }
        let (direct, direct_state) = if !settings.o_direct {
            (false, "off".to_string())
        } else {
            match probe_direct(root, settings.simulate_no_direct) {
                Ok(()) => (true, "on".to_string()),
                Err(why) => {
                    log::warn!(
                        "fs: O_DIRECT is not usable in {} ({why}); falling back to buffered I/O",
                        root.display()
                    );
                    (false, format!("fallback ({why})"))
                }
            }
        };
        let mut index = Index::new(settings.capacity);
        let start = scan(&settings, &mut index);
        let pool = match settings.pool_files {
            0 => None,
            n => Some(Pool::new(root, n).map_err(|e| {
                io_error(
                    format!("fs: cannot create {}", root.join(POOL_DIR).display()),
                    &e,
                )
            })?),
        };
        let store = Store {
            index: Mutex::new(index),
            stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
            direct: AtomicBool::new(direct),
            direct_state: Mutex::new(direct_state),
            dirty: Mutex::new(Dirty::default()),
            tmp_seq: AtomicU64::new(0),
            pool,
            dirs_made: AtomicU32::new(0),
            stats: Stats::default(),
            start,
            _lock: lock,
            settings,
        };
        let s = &store.start;
        log::info!(
            "fs: opened {}: {} chunks ({} bytes) of {} capacity; removed {} invalid files ({} temporary, {} corrupt), \
             {} duplicates, moved {}, evicted {}, {} unreadable; scan took {} ms; o_direct={}, fsync={}, shards={}",
            store.settings.root.display(),
            s.chunks,
            s.bytes,
            store.settings.capacity,
            s.removed(),
            s.temp_removed,
            s.corrupt_removed,
            s.duplicates_removed,
            s.moved,
            s.evicted,
            s.errors,
            s.millis,
            store.direct_state.lock(),
            store.settings.fsync.name(),
            store.settings.shards,
        );
        Ok(store)
    }

    /// The settings.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// What the start-up scan found.
    pub fn start_report(&self) -> &StartReport {
        &self.start
    }

    /// `on`, `off` or `fallback (<why>)`.
    pub fn direct_state(&self) -> String {
        self.direct_state.lock().clone()
    }

    fn stripe(&self, key_hash: u64) -> &Mutex<()> {
        &self.stripes[(key_hash % STRIPES as u64) as usize]
    }

    fn shard_dir(&self, shard: u32) -> PathBuf {
        self.settings
            .root
            .join(format::shard_dir_name(shard, self.settings.shards))
    }

    /// The file of a key.
    pub fn path_of(&self, key_hash: u64, canonical: &str) -> PathBuf {
        self.shard_dir(format::shard_of(key_hash, self.settings.shards))
            .join(format::file_name(key_hash, canonical))
    }

    fn disable_direct(&self, why: String) {
        if self.direct.swap(false, Ordering::AcqRel) {
            log::warn!(
                "fs: O_DIRECT failed in {} ({why}); falling back to buffered I/O",
                self.settings.root.display()
            );
            *self.direct_state.lock() = format!("fallback ({why})");
        }
    }

    // ----- background preparation -----

    /// The temporary-file pool, if enabled.
    pub fn pool(&self) -> Option<&Pool> {
        self.pool.as_ref()
    }

    /// One step of the background thread's work: add a file to the pool if it is below its target,
    /// else create one missing shard directory (so puts into a new store do not `mkdir`). Returns
    /// false when there is nothing left to do for now.
    pub fn prep_step(&self) -> bool {
        if let Some(pool) = &self.pool {
            if pool.is_stopped() {
                return false;
            }
            if pool.wants_more() {
                let seq = self.tmp_seq.fetch_add(1, Ordering::Relaxed);
                match pool.fill_one(seq, self.direct.load(Ordering::Acquire)) {
                    Ok(()) => return true,
                    // Retried after the wait; shard directories still get made meanwhile.
                    Err(e) => log::debug!("fs: cannot add a file to the pool: {e}"),
                }
            }
        }
        let next = self.dirs_made.load(Ordering::Relaxed);
        if next >= self.settings.shards {
            return false;
        }
        let dir = self.shard_dir(next);
        if let Err(e) = fs::create_dir(&dir) {
            if e.kind() != io::ErrorKind::AlreadyExists {
                log::debug!("fs: cannot create {}: {e}", dir.display());
            }
        }
        self.dirs_made.store(next + 1, Ordering::Relaxed);
        true
    }

    // ----- put -----

    /// Reserve room for a chunk (evicting as needed) and write it to a temporary file (fdatasync'ed
    /// with fsync=chunk). Nothing is visible until [`commit`](Self::commit).
    pub fn stage(
        &self,
        key_hash: u64,
        canonical: &str,
        data: &[u8],
        meta: &ChunkMeta,
        bufs: &mut IoBufs,
    ) -> Result<Staged, Error> {
        if canonical.is_empty() || canonical.len() > format::MAX_CANONICAL {
            return Err(Error::new(
                Status::INVALID_ARG,
                format!("fs: key of {} bytes", canonical.len()),
            ));
        }
        if meta.length != data.len() as u64 || meta.ndim > 4 {
            return Err(Error::new(
                Status::INVALID_ARG,
                format!(
                    "fs: metadata (length {}, ndim {}) does not match {} bytes of data",
                    meta.length,
                    meta.ndim,
                    data.len()
                ),
            ));
        }
        let data_len = data.len() as u64;
        let hdr = PendingHeader::new(key_hash, canonical, data_len, meta);
        let data_offset = hdr.data_offset();
        let charge = format::charge_for(data_offset, data_len);

        let reserved = self.index.lock().reserve(charge);
        let victims = reserved.map_err(|why| {
            self.stats.no_space.fetch_add(1, Ordering::Relaxed);
            let cap = self.settings.capacity;
            Error::new(
                Status::NO_SPACE,
                match why {
                    NoSpace::TooLarge => format!(
                        "fs: chunk of {data_len} bytes ({charge} on disk) is larger than the capacity ({cap} bytes)"
                    ),
                    NoSpace::Pinned => format!(
                        "fs: no room for {charge} bytes: pinned chunks and puts in flight hold the capacity ({cap} bytes)"
                    ),
                },
            )
        })?;
        self.unlink_victims(victims);

        let shard = format::shard_of(key_hash, self.settings.shards);
        let dir = self.shard_dir(shard);
        let direct = self.direct.load(Ordering::Acquire);
        let pooled = self.pool.as_ref().and_then(|p| p.take(direct));
        let tmp = match &pooled {
            Some(p) => p.path.clone(),
            None => {
                let seq = self.tmp_seq.fetch_add(1, Ordering::Relaxed);
                dir.join(format!(".{key_hash:016x}.{seq:x}{TMP_EXT}"))
            }
        };
        match self.write_temp(&dir, &tmp, direct, pooled, hdr, data, bufs) {
            Ok(file) => Ok(Staged {
                key_hash,
                canonical: canonical.into(),
                meta: *meta,
                data_offset,
                data_len,
                charge,
                shard,
                tmp,
                file,
            }),
            Err(e) => {
                let _ = fs::remove_file(&tmp);
                self.index.lock().unreserve(charge);
                self.stats.io_errors.fetch_add(1, Ordering::Relaxed);
                Err(io_error(format!("fs: write {}", tmp.display()), &e))
            }
        }
    }

    fn open_new(&self, dir: &Path, tmp: &Path, direct: bool) -> io::Result<File> {
        let mut o = OpenOptions::new();
        o.write(true).create_new(true).mode(0o644);
        if direct {
            o.custom_flags(rustix::fs::OFlags::DIRECT.bits() as i32);
        }
        match o.open(tmp) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                fs::create_dir_all(dir)?;
                o.open(tmp)
            }
            r => r,
        }
    }

    /// Write header and data to the temporary file `tmp`: `pooled` if given (a pool file opened in
    /// the `direct` mode), else a new file. The data is checksummed first, so that the header can be
    /// written first. Buffered: header and data are written front to back from offset 0, in writes
    /// ending on multiples of [`PIECE`] ([`fio::write_front_to_back`]). O_DIRECT: header and data are
    /// written in one request. Either way the file is complete before it is renamed into place.
    #[allow(clippy::too_many_arguments)]
    fn write_temp(
        &self,
        dir: &Path,
        tmp: &Path,
        direct: bool,
        pooled: Option<PoolFile>,
        hdr: PendingHeader<'_>,
        data: &[u8],
        bufs: &mut IoBufs,
    ) -> io::Result<File> {
        let data_offset = hdr.data_offset();
        bufs.header.resize(data_offset as usize, 0);
        let mut pooled = pooled;
        if direct {
            let opened = match pooled.take() {
                Some(p) => Ok(p.file),
                None => self.open_new(dir, tmp, true),
            };
            match opened {
                Ok(f) => match self.write_direct(&f, &hdr, data, bufs) {
                    Ok(()) => return self.finish_temp(f),
                    Err(e) if fio::is_direct_unsupported(&e) => {
                        drop(f);
                        fs::remove_file(tmp)?;
                        self.disable_direct(format!("write: {e}"));
                    }
                    Err(e) => return Err(e),
                },
                Err(e) if fio::is_direct_unsupported(&e) => {
                    self.disable_direct(format!("open: {e}"));
                }
                Err(e) => return Err(e),
            }
        }
        // Here `pooled` is a buffered file: after an O_DIRECT failure it was used above and removed.
        let f = match pooled {
            Some(p) => p.file,
            None => self.open_new(dir, tmp, false)?,
        };
        let mut hasher = hdr.hasher();
        hasher.update(data);
        hdr.encode(hasher.digest(), &mut bufs.header);
        fio::write_front_to_back(&f, &bufs.header, data, PIECE)?;
        self.finish_temp(f)
    }

    /// Checksum the data, then write header and data in one request.
    fn write_direct(
        &self,
        f: &File,
        hdr: &PendingHeader<'_>,
        data: &[u8],
        bufs: &mut IoBufs,
    ) -> io::Result<()> {
        let mut hasher = hdr.hasher();
        hasher.update(data);
        let IoBufs { bounce, header } = bufs;
        hdr.encode(hasher.digest(), header);
        let b = bounce.get_or_insert_with(|| AlignedBuf::new(BOUNCE));
        fio::write_direct(f, header, data, b)
    }

    fn finish_temp(&self, f: File) -> io::Result<File> {
        if self.settings.fsync == Fsync::Chunk {
            f.sync_data()?;
        }
        Ok(f)
    }

    /// fdatasync a staged file (fsync=batch). On failure the chunk is abandoned.
    pub fn sync_staged(&self, s: Staged) -> Result<Staged, Error> {
        match s.file.sync_data() {
            Ok(()) => Ok(s),
            Err(e) => {
                self.stats.io_errors.fetch_add(1, Ordering::Relaxed);
                let err = io_error(format!("fs: fdatasync {}", s.tmp.display()), &e);
                self.abandon(s);
                Err(err)
            }
        }
    }

    /// Drop a staged chunk: remove its temporary file and give back its reservation.
    pub fn abandon(&self, s: Staged) {
        drop(s.file);
        let _ = fs::remove_file(&s.tmp);
        self.index.lock().unreserve(s.charge);
    }

    /// Make a staged chunk visible: rename it into place and index it.
    pub fn commit(&self, s: Staged) -> Result<(), Error> {
        let Staged {
            key_hash,
            canonical,
            meta,
            data_offset,
            data_len,
            charge,
            shard,
            tmp,
            file,
        } = s;
        drop(file);
        let dest = self.path_of(key_hash, &canonical);
        let stripe = self.stripe(key_hash).lock();
        let renamed = match fs::rename(&tmp, &dest) {
            // A pool file, and the background thread has not made this shard directory yet.
            Err(e) if e.kind() == io::ErrorKind::NotFound && tmp.exists() => {
                fs::create_dir_all(self.shard_dir(shard)).and_then(|()| fs::rename(&tmp, &dest))
            }
            r => r,
        };
        if let Err(e) = renamed {
            drop(stripe);
            let _ = fs::remove_file(&tmp);
            self.index.lock().unreserve(charge);
            self.stats.io_errors.fetch_add(1, Ordering::Relaxed);
            return Err(io_error(format!("fs: rename to {}", dest.display()), &e));
        }
        let other = self.index.lock().commit(
            key_hash,
            NewEntry {
                canonical,
                meta,
                data_offset,
                data_len,
                charge,
            },
        );
        if let Some(v) = other {
            // A different key with the same hash: its file is replaced (or, with another name, removed).
            let old = self.path_of(v.key_hash, &v.canonical);
            if old != dest {
                let _ = fs::remove_file(old);
            }
        }
        drop(stripe);
        if self.settings.fsync == Fsync::None {
            let mut d = self.dirty.lock();
            if d.files.len() >= MAX_DIRTY {
                d.overflow = true;
                d.files.clear();
            }
            if !d.overflow {
                d.files.push(dest);
                d.dirs.insert(shard);
            }
        }
        Ok(())
    }

    /// fsync a shard directory (after renames into it).
    pub fn sync_dir(&self, shard: u32) -> Result<(), Error> {
        let dir = self.shard_dir(shard);
        File::open(&dir).and_then(|d| d.sync_all()).map_err(|e| {
            self.stats.io_errors.fetch_add(1, Ordering::Relaxed);
            io_error(format!("fs: fsync directory {}", dir.display()), &e)
        })
    }

    fn unlink_victims(&self, victims: Vec<Victim>) {
        for v in victims {
            let path = self.path_of(v.key_hash, &v.canonical);
            let _stripe = self.stripe(v.key_hash).lock();
            // A put of the same file name may have committed since: then the file is the new one.
            let replaced = self
                .index
                .lock()
                .canonical_of(v.key_hash)
                .is_some_and(|c| self.path_of(v.key_hash, c) == path);
            if replaced {
                continue;
            }
            if let Err(e) = fs::remove_file(&path) {
                if e.kind() != io::ErrorKind::NotFound {
                    log::warn!("fs: cannot remove evicted {}: {e}", path.display());
                }
            }
        }
    }

    // ----- get -----

    /// Read the chunk of `canonical` into `dst`, verifying its checksums.
    pub fn read(
        &self,
        key_hash: u64,
        canonical: &str,
        dst: &mut [u8],
        bufs: &mut IoBufs,
    ) -> ReadOutcome {
        match self.open_chunk(key_hash, canonical, dst.len()) {
            Ok(c) => self.read_opened(c, canonical, dst, bufs),
            Err(outcome) => outcome,
        }
    }

    /// Look `canonical` up and open its file, or say why there is nothing to read into a buffer of
    /// `capacity` bytes.
    pub fn open_chunk(
        &self,
        key_hash: u64,
        canonical: &str,
        capacity: usize,
    ) -> Result<OpenChunk, ReadOutcome> {
        let (gen, data_offset, data_len, verified) = {
            let mut ix = self.index.lock();
            match ix.lookup(key_hash, canonical, true) {
                Some(e) => (e.gen, e.data_offset, e.data_len, e.verified),
                None => return Err(ReadOutcome::Miss),
            }
        };
        if data_len > capacity as u64 {
            return Err(ReadOutcome::TooSmall(data_len));
        }
        let path = self.path_of(key_hash, canonical);
        let direct = self.direct.load(Ordering::Acquire);
        let opened = if direct {
            match open_read(&path, true) {
                Err(e) if fio::is_direct_unsupported(&e) => {
                    self.disable_direct(format!("open for read: {e}"));
                    open_read(&path, false).map(|f| (f, false))
                }
                r => r.map(|f| (f, true)),
            }
        } else {
            open_read(&path, false).map(|f| (f, false))
        };
        match opened {
            Ok((file, direct)) => Ok(OpenChunk {
                key_hash,
                gen,
                path,
                file,
                direct,
                data_offset,
                data_len,
                check: self.settings.verify_always || !verified,
                unverified: !verified,
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                // Removed or evicted meanwhile (then the entry is gone or newer), or deleted behind our
                // back (then drop the entry).
                let _stripe = self.stripe(key_hash).lock();
                if self.index.lock().remove_if_gen(key_hash, gen).is_some() {
                    self.stats.missing_on_read.fetch_add(1, Ordering::Relaxed);
                    log::warn!("fs: {} vanished; dropped from the index", path.display());
                }
                Err(ReadOutcome::Miss)
            }
            Err(e) => {
                self.stats.io_errors.fetch_add(1, Ordering::Relaxed);
                log::warn!("fs: open {}: {e}", path.display());
                Err(ReadOutcome::Failed(Error::io("", &e).status))
            }
        }
    }

    /// Read all of an opened chunk into `dst` (at least `c.data_len()` bytes).
    pub fn read_opened(
        &self,
        c: OpenChunk,
        canonical: &str,
        dst: &mut [u8],
        bufs: &mut IoBufs,
    ) -> ReadOutcome {
        let result = if c.direct {
            self.read_direct(&c, dst, bufs)
        } else {
            read_buffered(&c.file, c.data_offset, c.data_len, dst, bufs, c.check)
        };
        match self.conclude(&c, canonical, result) {
            Some(outcome) => outcome,
            None => {
                let key_hash = c.key_hash;
                drop(c);
                self.read(key_hash, canonical, dst, bufs)
            }
        }
    }

    /// Read data bytes `[offset, offset + dst.len())` of `c` into `dst`, for a chunk read in parts by
    /// several threads ([`OpenChunk::splittable`]). The part at offset 0 also reads the header and
    /// returns it decoded. Every part but the last must be a multiple of [`ALIGN`] long.
    pub fn read_part(
        &self,
        c: &OpenChunk,
        offset: usize,
        dst: &mut [u8],
        bufs: &mut IoBufs,
    ) -> io::Result<Option<Result<(format::Fixed, Header), &'static str>>> {
        let head_len = if offset == 0 {
            c.data_offset as usize
        } else {
            0
        };
        let pos = if offset == 0 {
            0
        } else {
            c.data_offset + offset as u64
        };
        let want = head_len + dst.len();
        let (got, head) = if c.direct {
            // One request: the header into the bounce buffer, the aligned data straight into `dst`,
            // the tail (last part only) into the bounce buffer.
            let (n, tail, tail_buf) = fio::direct_split(dst.len());
            let (h, rest) = bufs.bounce().as_mut().split_at_mut(head_len);
            let t = &mut rest[..tail_buf];
            let (d, d_tail) = dst.split_at_mut(n);
            let got = {
                let mut iov = [IoSliceMut::new(h), IoSliceMut::new(d), IoSliceMut::new(t)];
                fio::preadv_full(&c.file, &mut iov, pos)?
            };
            if got >= want {
                d_tail.copy_from_slice(&t[..tail]);
            }
            (got, &*h)
        } else {
            let h = &mut bufs.header;
            h.resize(head_len, 0);
            let mut iov = [IoSliceMut::new(h), IoSliceMut::new(dst)];
            (fio::preadv_full(&c.file, &mut iov, pos)?, &bufs.header[..])
        };
        if got < want {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "file is shorter than its header says",
            ));
        }
        Ok((offset == 0).then(|| format::decode(head)))
    }

    /// The outcome of a chunk read by [`Store::read_part`]: `header` is what the first part decoded
    /// (`None` if it never ran), `failure` the first error of any part, `digest` the data checksum of
    /// all parts (when [`OpenChunk::check`]).
    pub fn conclude_parts(
        &self,
        c: &OpenChunk,
        canonical: &str,
        header: Option<Result<Header, &'static str>>,
        failure: Option<io::Error>,
        digest: Option<u64>,
    ) -> ReadOutcome {
        self.stats.split_reads.fetch_add(1, Ordering::Relaxed);
        let result = match (failure, header) {
            (Some(e), _) => Err(e),
            (None, None) => return ReadOutcome::Failed(Status::INTERNAL),
            (None, Some(Err(why))) => Ok(Err(ReadFail::Corrupt(why))),
            (None, Some(Ok(hdr))) => {
                if (hdr.data_offset, hdr.data_len) != (c.data_offset, c.data_len) {
                    // Replaced by a chunk of another size since the lookup; the parts read the old
                    // layout, so report a miss rather than reading again.
                    return ReadOutcome::Miss;
                }
                match digest {
                    _ if !c.check => Ok(Ok((hdr.data_len as usize, hdr.meta, hdr))),
                    Some(d) if d == hdr.data_checksum => {
                        Ok(Ok((hdr.data_len as usize, hdr.meta, hdr)))
                    }
                    Some(_) => Ok(Err(ReadFail::Corrupt("data checksum mismatch"))),
                    // A part was lost (a panic) before it was checksummed.
                    None => return ReadOutcome::Failed(Status::INTERNAL),
                }
            }
        };
        self.conclude(c, canonical, result).unwrap_or_else(|| {
            // O_DIRECT stopped working mid-read (it is now off); the parts cannot be read again.
            self.stats.io_errors.fetch_add(1, Ordering::Relaxed);
            ReadOutcome::Failed(Status::IO)
        })
    }

    /// Map the result of reading `c` to an outcome, dropping a corrupt chunk. `None`: O_DIRECT turned
    /// out unsupported (now disabled); read again.
    fn conclude(
        &self,
        c: &OpenChunk,
        canonical: &str,
        result: io::Result<Result<(usize, ChunkMeta, Header), ReadFail>>,
    ) -> Option<ReadOutcome> {
        let (key_hash, gen, path) = (c.key_hash, c.gen, &c.path);
        Some(match result {
            Ok(Ok((len, meta, hdr))) => {
                if hdr.key_hash != key_hash || hdr.canonical != canonical {
                    return Some(self.corrupt(key_hash, gen, path, "the file holds another key"));
                }
                if c.check && c.unverified {
                    self.index.lock().set_verified(key_hash, gen);
                }
                ReadOutcome::Hit { len, meta }
            }
            Ok(Err(ReadFail::TooSmall(n))) => ReadOutcome::TooSmall(n),
            Ok(Err(ReadFail::Corrupt(why))) => self.corrupt(key_hash, gen, path, why),
            Err(e) if fio::is_direct_unsupported(&e) && c.direct => {
                self.disable_direct(format!("read: {e}"));
                return None;
            }
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                self.corrupt(key_hash, gen, path, "truncated")
            }
            Err(e) => {
                self.stats.io_errors.fetch_add(1, Ordering::Relaxed);
                log::warn!("fs: read {}: {e}", path.display());
                ReadOutcome::Failed(Error::io("", &e).status)
            }
        })
    }

    fn read_direct(
        &self,
        c: &OpenChunk,
        dst: &mut [u8],
        bufs: &mut IoBufs,
    ) -> io::Result<Result<(usize, ChunkMeta, Header), ReadFail>> {
        let (file, data_offset, data_len, check) = (&c.file, c.data_offset, c.data_len, c.check);
        let len = data_len as usize;
        if fio::is_aligned(dst.as_ptr())
            && data_len >= ALIGN
            && data_offset as usize + ALIGN as usize <= BOUNCE
        {
            // One request for header, data and tail, as for one part of a split read.
            match self.read_part(c, 0, &mut dst[..len], bufs) {
                Ok(Some(Ok((fixed, hdr))))
                    if (hdr.data_offset, hdr.data_len) == (data_offset, data_len) =>
                {
                    return Ok(verify(&fixed, hdr, &dst[..len], check));
                }
                Ok(Some(Err(why))) => return Ok(Err(ReadFail::Corrupt(why))),
                // Short, or replaced by a chunk of another size since the lookup: the general way
                // below tells a truncated file from a replaced one.
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {}
                Err(e) => return Err(e),
            }
        }
        let bounce = bufs.bounce();
        let first = fio::first_direct_read(data_offset, data_len, dst, BOUNCE);
        let buf = &mut bounce.as_mut()[..first];
        let got = fio::read_full_at(file, buf, 0)?;
        let (fixed, hdr) = match format::decode(&buf[..got]) {
            Ok(x) => x,
            Err(why) => return Ok(Err(ReadFail::Corrupt(why))),
        };
        if hdr.data_len > dst.len() as u64 {
            return Ok(Err(ReadFail::TooSmall(hdr.data_len)));
        }
        if hdr.data_offset as usize > first {
            // The key's length changed under us (impossible for the same key): treat as corrupt.
            return Ok(Err(ReadFail::Corrupt("unexpected header size")));
        }
        let len = hdr.data_len as usize;
        let in_first = got.saturating_sub(hdr.data_offset as usize).min(len);
        let start = hdr.data_offset as usize;
        dst[..in_first].copy_from_slice(&buf[start..start + in_first]);
        if in_first < len {
            fio::read_direct_rest(
                file,
                hdr.data_offset + in_first as u64,
                &mut dst[in_first..len],
                bounce,
            )?;
        }
        Ok(verify(&fixed, hdr, &dst[..len], check))
    }

    fn corrupt(&self, key_hash: u64, gen: u64, path: &Path, why: &str) -> ReadOutcome {
        let _stripe = self.stripe(key_hash).lock();
        if self.index.lock().remove_if_gen(key_hash, gen).is_some() {
            self.stats.corrupt_on_read.fetch_add(1, Ordering::Relaxed);
            log::warn!(
                "fs: {} failed verification ({why}); removed",
                path.display()
            );
            if let Err(e) = fs::remove_file(path) {
                if e.kind() != io::ErrorKind::NotFound {
                    log::warn!("fs: cannot remove {}: {e}", path.display());
                }
            }
        }
        ReadOutcome::Failed(Status::CORRUPT)
    }

    // ----- synchronous operations -----

    /// The metadata of a stored chunk (made most recent), pinning it if `pin`.
    pub fn contains(
        &self,
        key_hash: u64,
        canonical: &str,
        pin: bool,
    ) -> Result<Option<ChunkMeta>, Status> {
        let mut ix = self.index.lock();
        let Some(e) = ix.lookup(key_hash, canonical, true) else {
            return Ok(None);
        };
        let meta = e.meta;
        if pin {
            let st = ix.pin(key_hash, canonical);
            if st != Status::OK {
                return Err(st);
            }
        }
        Ok(Some(meta))
    }

    /// Remove a chunk and unlink its file.
    pub fn remove(&self, key_hash: u64, canonical: &str, force: bool) -> Status {
        let _stripe = self.stripe(key_hash).lock();
        let removed = self.index.lock().remove(key_hash, canonical, force);
        match removed {
            Ok(_) => {
                let path = self.path_of(key_hash, canonical);
                if let Err(e) = fs::remove_file(&path) {
                    if e.kind() != io::ErrorKind::NotFound {
                        self.stats.io_errors.fetch_add(1, Ordering::Relaxed);
                        log::warn!("fs: cannot remove {}: {e}", path.display());
                    }
                }
                Status::OK
            }
            Err(s) => s,
        }
    }

    /// Pin a chunk.
    pub fn pin(&self, key_hash: u64, canonical: &str) -> Status {
        self.index.lock().pin(key_hash, canonical)
    }

    /// Unpin a chunk.
    pub fn unpin(&self, key_hash: u64, canonical: &str) -> Status {
        self.index.lock().unpin(key_hash, canonical)
    }

    /// Make every committed put durable: fdatasync the files written since the last flush (fsync=none;
    /// with chunk and batch they already are) and fsync their directories.
    pub fn flush(&self) -> Result<(), Error> {
        let dirty = std::mem::take(&mut *self.dirty.lock());
        let result = self.sync_dirty(&dirty);
        if result.is_err() {
            // Keep them for the next flush.
            let mut d = self.dirty.lock();
            d.overflow |= dirty.overflow;
            d.files.extend(dirty.files);
            d.dirs.extend(dirty.dirs);
        }
        result
    }

    fn sync_dirty(&self, dirty: &Dirty) -> Result<(), Error> {
        let root = &self.settings.root;
        if dirty.overflow {
            return File::open(root)
                .and_then(|d| rustix::fs::syncfs(&d).map_err(io::Error::from))
                .map_err(|e| io_error(format!("fs: syncfs {}", root.display()), &e));
        }
        // Several fdatasyncs in flight: the device gets a deeper queue, and ext4 commits its journal
        // once for the files whose syncs overlap instead of once per file.
        let threads = dirty.files.len().div_ceil(8).clamp(1, FLUSH_THREADS);
        let next = AtomicUsize::new(0);
        let failed: Mutex<Option<Error>> = Mutex::new(None);
        let sync_some = || {
            while failed.lock().is_none() {
                let Some(f) = dirty.files.get(next.fetch_add(1, Ordering::Relaxed)) else {
                    return;
                };
                let r = match File::open(f) {
                    Ok(file) => file
                        .sync_data()
                        .map_err(|e| io_error(format!("fs: fdatasync {}", f.display()), &e)),
                    Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
                    Err(e) => Err(io_error(format!("fs: open {}", f.display()), &e)),
                };
                if let Err(e) = r {
                    failed.lock().get_or_insert(e);
                }
            }
        };
        std::thread::scope(|s| {
            for _ in 1..threads {
                // Fewer helpers if a thread cannot be started: the others take its share.
                let _ = std::thread::Builder::new()
                    .name("kvhost-fs-flush".into())
                    .spawn_scoped(s, sync_some);
            }
            sync_some();
        });
        if let Some(e) = failed.into_inner() {
            return Err(e);
        }
        for &shard in &dirty.dirs {
            self.sync_dir(shard)?;
        }
        Ok(())
    }

    /// Remove every chunk (pinned ones too) and its file. Temporary files of puts in flight stay; those
    /// puts still commit.
    pub fn clear(&self) -> Result<usize, Error> {
        let _stripes: Vec<_> = self.stripes.iter().map(|s| s.lock()).collect();
        let n = self.index.lock().clear();
        let mut first_err = None;
        for dir in shard_dirs(&self.settings.root) {
            let entries = match fs::read_dir(&dir) {
                Ok(e) => e,
                Err(e) => {
                    first_err.get_or_insert(io_error(format!("fs: list {}", dir.display()), &e));
                    continue;
                }
            };
            for entry in entries.flatten() {
                let name = entry.file_name();
                if name.to_string_lossy().ends_with(CHUNK_EXT) {
                    if let Err(e) = fs::remove_file(entry.path()) {
                        if e.kind() != io::ErrorKind::NotFound {
                            first_err.get_or_insert(io_error(
                                format!("fs: remove {}", entry.path().display()),
                                &e,
                            ));
                        }
                    }
                }
            }
        }
        *self.dirty.lock() = Dirty::default();
        log::info!(
            "fs: cleared {} chunks from {}",
            n,
            self.settings.root.display()
        );
        match first_err {
            Some(e) => Err(e),
            None => Ok(n),
        }
    }

    /// Check the directory is writable and the filesystem has room; describe the state.
    /// Counters and gauges for the ABI 1.3 `stats` entry: no I/O, one index lock.
    pub fn stats(&self, out: &mut kvhost_plugin_sdk::Stats) {
        let (chunks, used, reserved, pinned, evictions) = {
            let ix = self.index.lock();
            (
                ix.len(),
                ix.used(),
                ix.reserved(),
                ix.pinned(),
                ix.evictions(),
            )
        };
        let load = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
        out.counter("evictions", evictions)
            .gauge("bytes_used", used)
            .gauge("capacity_bytes", self.settings.capacity)
            .gauge("entries", chunks as u64)
            .gauge("pinned_bytes", pinned)
            .gauge("reserved_bytes", reserved)
            .counter("no_space", load(&self.stats.no_space))
            .counter("corrupt_on_read", load(&self.stats.corrupt_on_read))
            .counter("missing_on_read", load(&self.stats.missing_on_read))
            .counter("io_errors", load(&self.stats.io_errors))
            .counter("split_reads", load(&self.stats.split_reads));
    }

    pub fn health(&self) -> Result<String, Error> {
        let root = &self.settings.root;
        let seq = self.tmp_seq.fetch_add(1, Ordering::Relaxed);
        let probe = root.join(format!(".kvhost-fs-health.{seq:x}"));
        let writable = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&probe)
            .and_then(|mut f| f.write_all(b"ok"))
            .and_then(|()| fs::remove_file(&probe));
        let vfs = rustix::fs::statvfs(root).map_err(io::Error::from);
        let (chunks, used, reserved, pinned, evictions) = {
            let ix = self.index.lock();
            (
                ix.len(),
                ix.used(),
                ix.reserved(),
                ix.pinned(),
                ix.evictions(),
            )
        };
        let free = vfs.as_ref().map(|v| v.f_bavail * v.f_frsize).ok();
        let s = self.start_report();
        let text = format!(
            "fs {}: {chunks} chunks, used={used} reserved={reserved} pinned={pinned} capacity={} bytes, \
             fs_free={} bytes, evictions={evictions}, no_space={}, corrupt_on_read={}, missing_on_read={}, io_errors={}, \
             split_reads={}, removed_at_start={} (temporary={} corrupt={}), o_direct={}, fsync={}, verify_reads={}, shards={}, \
             pool_files={}",
            root.display(),
            self.settings.capacity,
            free.map_or("unknown".to_string(), |f| f.to_string()),
            self.stats.no_space.load(Ordering::Relaxed),
            self.stats.corrupt_on_read.load(Ordering::Relaxed),
            self.stats.missing_on_read.load(Ordering::Relaxed),
            self.stats.io_errors.load(Ordering::Relaxed),
            self.stats.split_reads.load(Ordering::Relaxed),
            s.removed(),
            s.temp_removed,
            s.corrupt_removed,
            self.direct_state(),
            self.settings.fsync.name(),
            if self.settings.verify_always { "always" } else { "first" },
            self.settings.shards,
            self.pool.as_ref().map_or(0, Pool::len),
        );
        if let Err(e) = writable {
            return Err(io_error(format!("directory not writable; {text}"), &e));
        }
        if let Err(e) = vfs {
            return Err(io_error(format!("statvfs failed; {text}"), &e));
        }
        if free.is_some_and(|f| f < MIN_FREE) {
            return Err(Error::new(
                Status::NO_SPACE,
                format!("filesystem almost full; {text}"),
            ));
        }
        Ok(text)
    }
}

impl Drop for Store {
    /// Remove the pool's files (a crash leaves them to the next start-up scan).
    fn drop(&mut self) {
        if let Some(pool) = &self.pool {
            pool.stop();
            pool.drain();
        }
    }
}

/// Why a read did not produce a chunk (besides I/O errors).
enum ReadFail {
    TooSmall(u64),
    Corrupt(&'static str),
}

fn open_read(path: &Path, direct: bool) -> io::Result<File> {
    let mut o = OpenOptions::new();
    o.read(true);
    if direct {
        o.custom_flags(rustix::fs::OFlags::DIRECT.bits() as i32);
    }
    o.open(path)
}

/// Buffered read of a chunk the index has at `data_offset` with `data_len` bytes (`dst` holds at least
/// `data_len`): header and data in one `preadv` of exactly `data_offset + data_len` bytes, the header
/// into a small buffer and the data straight into `dst[..data_len]`; when verifying, header and first
/// [`PIECE`] in one `preadv`, then the rest piece by piece, each hashed right after it is read.
///
/// `dst` is never written past the index's `data_len`. If the header disagrees with the index (the
/// file was replaced by a chunk of another length since the lookup), the data is read again into
/// `dst[..header's data_len]` from where the header says (or `TOO_SMALL` is reported), as a read of
/// the new file alone would; bytes of `dst` past the new length may then hold what the first read
/// put there (as with [`Store::read_part`]).
fn read_buffered(
    file: &File,
    data_offset: u64,
    data_len: u64,
    dst: &mut [u8],
    bufs: &mut IoBufs,
    check: bool,
) -> io::Result<Result<(usize, ChunkMeta, Header), ReadFail>> {
    let head = &mut bufs.header;
    let head_len = (data_offset as usize).max(FIXED_LEN);
    head.resize(head_len, 0);
    // The data right behind the header, as long as the index says (the first piece when verifying).
    let mut first = if head_len as u64 == data_offset {
        (data_len as usize).min(dst.len())
    } else {
        0
    };
    if check {
        first = first.min(PIECE);
    }
    let got = {
        let mut iov = [IoSliceMut::new(head), IoSliceMut::new(&mut dst[..first])];
        fio::preadv_full(file, &mut iov, 0)?
    };
    let (fixed, hdr) = match format::decode(&bufs.header[..got.min(head_len)]) {
        Ok(x) => x,
        Err(why) => return Ok(Err(ReadFail::Corrupt(why))),
    };
    if hdr.data_len > dst.len() as u64 {
        return Ok(Err(ReadFail::TooSmall(hdr.data_len)));
    }
    let len = hdr.data_len as usize;
    let done = if (hdr.data_offset, hdr.data_len) == (data_offset, data_len) {
        if got < head_len + first {
            return Ok(Err(ReadFail::Corrupt("truncated")));
        }
        first
    } else {
        0
    };
    if !check {
        if fio::read_full_at(file, &mut dst[done..len], hdr.data_offset + done as u64)? < len - done
        {
            return Ok(Err(ReadFail::Corrupt("truncated")));
        }
        return Ok(Ok((len, hdr.meta, hdr)));
    }
    // Hash each piece right after reading it, while it is in cache.
    let mut h = fixed.hasher(hdr.canonical.as_bytes());
    h.update(&dst[..done]);
    let mut pos = hdr.data_offset + done as u64;
    for piece in dst[done..len].chunks_mut(PIECE) {
        if fio::read_full_at(file, piece, pos)? < piece.len() {
            return Ok(Err(ReadFail::Corrupt("truncated")));
        }
        h.update(piece);
        pos += piece.len() as u64;
    }
    if h.digest() != hdr.data_checksum {
        return Ok(Err(ReadFail::Corrupt("data checksum mismatch")));
    }
    Ok(Ok((len, hdr.meta, hdr)))
}

/// Check the data checksum when `check` (the header checksum was checked when it was decoded).
fn verify(
    fixed: &format::Fixed,
    hdr: Header,
    data: &[u8],
    check: bool,
) -> Result<(usize, ChunkMeta, Header), ReadFail> {
    if check {
        let mut h = fixed.hasher(hdr.canonical.as_bytes());
        h.update(data);
        if h.digest() != hdr.data_checksum {
            return Err(ReadFail::Corrupt("data checksum mismatch"));
        }
    }
    Ok((data.len(), hdr.meta, hdr))
}

/// Write and read back one block with O_DIRECT in `root`.
fn probe_direct(root: &Path, simulate_failure: bool) -> Result<(), String> {
    if simulate_failure {
        return Err("simulated: O_DIRECT refused".to_string());
    }
    let path = root.join(".kvhost-fs-odirect-probe");
    let result = (|| -> io::Result<()> {
        let _ = fs::remove_file(&path);
        let mut buf = AlignedBuf::new(ALIGN as usize);
        buf.as_mut().fill(0x5A);
        let f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .custom_flags(rustix::fs::OFlags::DIRECT.bits() as i32)
            .open(&path)?;
        fio::write_direct(&f, buf.as_mut(), &[], &mut AlignedBuf::new(ALIGN as usize))?;
        drop(f);
        let f = open_read(&path, true)?;
        let mut back = AlignedBuf::new(ALIGN as usize);
        let got = fio::read_full_at(&f, back.as_mut(), 0)?;
        if got != ALIGN as usize || back.as_mut().iter().any(|&b| b != 0x5A) {
            return Err(io::Error::other("read back differs"));
        }
        Ok(())
    })();
    let _ = fs::remove_file(&path);
    result.map_err(|e| e.to_string())
}

/// The shard-like subdirectories of `root`.
fn shard_dirs(root: &Path) -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir(root) else {
        return Vec::new();
    };
    let mut dirs: Vec<PathBuf> = entries
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .filter(|e| format::looks_like_shard_dir(&e.file_name().to_string_lossy()))
        .map(|e| e.path())
        .collect();
    dirs.sort();
    dirs
}

/// One valid chunk file found by the scan.
struct Found {
    path: PathBuf,
    header: Header,
    mtime: SystemTime,
}

#[derive(Default)]
struct DirScan {
    found: Vec<Found>,
    temp_removed: u64,
    corrupt_removed: u64,
    errors: u64,
}

fn remove_counted(path: &Path, counter: &mut u64, errors: &mut u64) {
    match fs::remove_file(path) {
        Ok(()) => *counter += 1,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => {
            *errors += 1;
            log::warn!("fs: cannot remove {}: {e}", path.display());
        }
    }
}

/// Validate one chunk file's header, size and name (not its data checksum: that is checked on every
/// read).
fn check_file(path: &Path) -> io::Result<Result<Found, &'static str>> {
    let f = File::open(path)?;
    let md = f.metadata()?;
    let mut head = vec![0u8; FIXED_LEN];
    let got = fio::read_full_at(&f, &mut head, 0)?;
    let fixed = match format::Fixed::parse(&head[..got]) {
        Ok(x) => x,
        Err(why) => return Ok(Err(why)),
    };
    let mut canonical = vec![0u8; fixed.canonical_len];
    if fio::read_full_at(&f, &mut canonical, FIXED_LEN as u64)? < canonical.len() {
        return Ok(Err("truncated key"));
    }
    let header = match fixed.finish(&canonical) {
        Ok(h) => h,
        Err(why) => return Ok(Err(why)),
    };
    if !format::valid_file_size(md.size(), header.data_offset, header.data_len) {
        return Ok(Err("file size does not match the header"));
    }
    Ok(Ok(Found {
        path: path.to_path_buf(),
        mtime: md.modified().unwrap_or(SystemTime::UNIX_EPOCH),
        header,
    }))
}

fn scan_dir(dir: &Path) -> DirScan {
    let mut out = DirScan::default();
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) => {
            log::warn!("fs: cannot list {}: {e}", dir.display());
            out.errors += 1;
            return out;
        }
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let path = entry.path();
        if name.ends_with(TMP_EXT) {
            remove_counted(&path, &mut out.temp_removed, &mut out.errors);
        } else if name.ends_with(CHUNK_EXT) {
            match check_file(&path) {
                Ok(Ok(found)) => out.found.push(found),
                Ok(Err(why)) => {
                    log::debug!("fs: removing invalid chunk file {}: {why}", path.display());
                    remove_counted(&path, &mut out.corrupt_removed, &mut out.errors);
                }
                Err(e) => {
                    log::warn!("fs: cannot read {}: {e}; left alone", path.display());
                    out.errors += 1;
                }
            }
        }
    }
    out
}

/// Remove the files a crash left in the pool directory. They never hold a committed chunk (a chunk is
/// committed by renaming its file out of there), so they are temporary files, whatever they contain.
fn clean_pool_dir(dir: &Path, report: &mut StartReport) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        if entry.file_name().to_string_lossy().ends_with(TMP_EXT) {
            remove_counted(&entry.path(), &mut report.temp_removed, &mut report.errors);
        }
    }
}

/// Rebuild the index from the directory: remove temporary and invalid files, move files into the shard
/// the current `shards` gives them, keep the newest file of a key, order the LRU by modification time.
fn scan(settings: &Settings, index: &mut Index) -> StartReport {
    let started = Instant::now();
    let dirs = shard_dirs(&settings.root);
    let threads = settings.scan_threads.clamp(1, 16).min(dirs.len().max(1));
    let per = dirs.len().div_ceil(threads).max(1);
    let results: Vec<DirScan> = std::thread::scope(|s| {
        let handles: Vec<_> = dirs
            .chunks(per)
            .map(|group| {
                s.spawn(move || {
                    let mut acc = DirScan::default();
                    for d in group {
                        let r = scan_dir(d);
                        acc.found.extend(r.found);
                        acc.temp_removed += r.temp_removed;
                        acc.corrupt_removed += r.corrupt_removed;
                        acc.errors += r.errors;
                    }
                    acc
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_default())
            .collect()
    });
    let mut report = StartReport::default();
    clean_pool_dir(&settings.root.join(POOL_DIR), &mut report);
    let mut found = Vec::new();
    for r in results {
        report.temp_removed += r.temp_removed;
        report.corrupt_removed += r.corrupt_removed;
        report.errors += r.errors;
        found.extend(r.found);
    }
    // Newest first: the first file seen for a key wins; older duplicates are removed.
    found.sort_by_key(|f| std::cmp::Reverse(f.mtime));
    let mut kept: HashMap<u64, PathBuf> = HashMap::new();
    let mut order = Vec::new();
    for f in found {
        let h = &f.header;
        let want = settings
            .root
            .join(format::shard_dir_name(
                format::shard_of(h.key_hash, settings.shards),
                settings.shards,
            ))
            .join(format::file_name(h.key_hash, &h.canonical));
        if let Some(path) = kept.get(&h.key_hash) {
            if *path != f.path {
                remove_counted(&f.path, &mut report.duplicates_removed, &mut report.errors);
            }
            continue;
        }
        if f.path != want {
            let moved = want
                .parent()
                .map_or(Ok(()), fs::create_dir_all)
                .and_then(|()| fs::rename(&f.path, &want));
            match moved {
                Ok(()) => report.moved += 1,
                Err(e) => {
                    log::warn!(
                        "fs: cannot move {} to {}: {e}; removed",
                        f.path.display(),
                        want.display()
                    );
                    remove_counted(&f.path, &mut report.corrupt_removed, &mut report.errors);
                    continue;
                }
            }
        }
        kept.insert(h.key_hash, want);
        order.push(f.header);
    }
    // Oldest first into the index, so the LRU order follows modification times.
    order.reverse();
    for h in order {
        let charge = format::charge_for(h.data_offset, h.data_len);
        index.insert(
            h.key_hash,
            NewEntry {
                canonical: h.canonical.into(),
                meta: h.meta,
                data_offset: h.data_offset,
                data_len: h.data_len,
                charge,
            },
            false,
        );
    }
    for v in index.evict_to_fit() {
        let path = settings
            .root
            .join(format::shard_dir_name(
                format::shard_of(v.key_hash, settings.shards),
                settings.shards,
            ))
            .join(format::file_name(v.key_hash, &v.canonical));
        remove_counted(&path, &mut report.evicted, &mut report.errors);
    }
    report.chunks = index.len();
    report.bytes = index.used();
    report.millis = started.elapsed().as_millis();
    report
}
