//! The CPU hot cache: LMCache's `LocalCPUBackend`, on one arena.
//!
//! - **Index.** Sharded open-addressing tables from key to entry id (`parking_lot` mutexes, see
//!   [`super::index`]), placed by the key's precomputed XXH3, so lookups from many threads rarely
//!   meet and a prefix walk can prefetch the next keys' slots.
//! - **State.** Entries, the eviction policy and the allocator share one lock, taken for O(1) work
//!   only; copies happen outside every lock.
//! - **Lock order.** The state lock may be held while taking a shard lock (eviction removes victims
//!   from the index); a shard lock is never held while taking the state lock.
//! - **Ownership.** A reader gets a [`ChunkHandle`]; the entry is never evicted or freed while one
//!   exists, and a handle may outlive the entry's removal: the block is freed when the last handle
//!   drops. A reference count only moves from 0 to 1 under the state lock, where eviction decides.
//! - **Full.** A put that finds nothing evictable gets [`CacheError::NoSpace`] at once (counted); reads
//!   and prefetches may wait for space up to a deadline, without spinning.

use super::alloc::{Allocator, Block};
use super::arena::{Arena, ArenaOptions};
use super::copy_pool::CopyPool;
use super::index::{self, IndexShard};
use super::policy::{Policy, PolicyKind};
use crate::key::ChunkKey;
use kvhost_plugin_sdk::ChunkMeta;
use parking_lot::{Condvar, Mutex};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// Hot-cache settings.
#[derive(Clone, Debug)]
pub struct CacheConfig {
    /// Arena size in bytes.
    pub capacity_bytes: u64,
    /// Keep chunks after a put (`local_cpu: true`); otherwise the arena only stages.
    pub retain: bool,
    /// Eviction policy.
    pub policy: PolicyKind,
    /// Mapping options.
    pub arena: ArenaOptions,
    /// Index shards (rounded up to a power of two).
    pub shards: usize,
    /// How many eviction candidates to examine before giving up (pinned entries are skipped).
    pub max_eviction_scan: usize,
    /// Threads that share a copy of 1 MiB or more (from 256 KiB while a helper is awake), the
    /// caller's included (`copy_threads`; 0 or 1: the caller's thread only). Defaults to the
    /// number of cores.
    pub copy_threads: usize,
}

impl CacheConfig {
    /// A configuration of `capacity_bytes` with defaults for the rest.
    pub fn new(capacity_bytes: u64) -> Self {
        CacheConfig {
            capacity_bytes,
            retain: true,
            policy: PolicyKind::Lru,
            arena: ArenaOptions::default(),
            shards: 64,
            max_eviction_scan: 4096,
            copy_threads: CopyPool::default_threads(),
        }
    }
}

/// Why the cache could not do something.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CacheError {
    /// Nothing evictable frees enough room (everything is pinned or referenced, or the chunk is larger
    /// than the largest free extent).
    #[error("hot cache full: no evictable space for {needed} bytes ({allocated} of {capacity} bytes in use)")]
    NoSpace {
        /// Bytes asked for.
        needed: u64,
        /// Bytes allocated.
        allocated: u64,
        /// Arena bytes.
        capacity: u64,
    },
    /// The chunk can never fit.
    #[error("chunk of {needed} bytes is larger than the hot cache ({capacity} bytes)")]
    TooLarge {
        /// Bytes asked for.
        needed: u64,
        /// Arena bytes.
        capacity: u64,
    },
    /// The arena could not be mapped.
    #[error("cannot map a {bytes}-byte hot-cache arena: {reason}")]
    Map {
        /// Size asked for.
        bytes: u64,
        /// The OS error.
        reason: String,
    },
}

/// Hot-cache counters (monotonic unless noted).
#[derive(Debug, Default)]
pub struct CacheCounters {
    /// Lookups that found the key.
    pub hits: AtomicU64,
    /// Lookups that did not.
    pub misses: AtomicU64,
    /// Chunks inserted.
    pub inserts: AtomicU64,
    /// Puts skipped because the key was already cached.
    pub duplicates: AtomicU64,
    /// Bytes copied in.
    pub bytes_in: AtomicU64,
    /// Bytes handed out by gets.
    pub bytes_out: AtomicU64,
    /// Entries evicted.
    pub evictions: AtomicU64,
    /// Allocations refused for lack of evictable space.
    pub no_space: AtomicU64,
    /// Entries removed explicitly.
    pub removals: AtomicU64,
}

/// A snapshot of the cache's state.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CacheSnapshot {
    /// Arena bytes.
    pub capacity_bytes: u64,
    /// Bytes in allocated blocks (including staged and removed-but-referenced ones).
    pub allocated_bytes: u64,
    /// Chunk bytes of indexed entries.
    pub used_bytes: u64,
    /// Indexed entries.
    pub entries: u64,
    /// Live blocks (indexed or not).
    pub blocks: u64,
    /// Entries with at least one handle.
    pub referenced: u64,
}

type Shard = IndexShard;

/// How often a stage waiting for room re-checks without being notified.
const WAIT_SLICE: std::time::Duration = std::time::Duration::from_millis(1);

/// Entries scanned per hold of the state lock while listing keys.
const KEYS_SLICE: usize = 4096;

/// How many keys ahead a prefix walk prefetches (enough loads in flight to cover DRAM latency).
const PREFETCH_AHEAD: usize = 16;

#[derive(Debug)]
struct Entry {
    key: Option<ChunkKey>,
    block: Block,
    len: u64,
    meta: ChunkMeta,
    indexed: bool,
    live: bool,
    /// Evicted for write-back demotion: its block is freed when the demotion completes.
    demoting: bool,
}

impl Entry {
    const VACANT: Entry = Entry {
        key: None,
        block: Block { offset: 0, len: 0 },
        len: 0,
        meta: zero_meta(),
        indexed: false,
        live: false,
        demoting: false,
    };
}

const fn zero_meta() -> ChunkMeta {
    ChunkMeta {
        length: 0,
        fmt: 0,
        dtype: 0,
        ndim: 0,
        shape: [0; 4],
        reserved: 0,
    }
}

struct State {
    entries: Vec<Entry>,
    free_ids: Vec<u32>,
    policy: Policy,
    alloc: Allocator,
    used_bytes: u64,
    indexed: u64,
    /// Bytes of blocks evicted for demotion and not yet freed: room that is on its way.
    demoting: u64,
}

/// Called with each evicted entry's key and a handle that keeps its block alive (called outside the
/// cache's locks, before the allocation that caused the eviction returns; it must not block). Used for
/// write-back demotion: the block is freed when the hook's handle and its clones drop.
pub type EvictHook = Box<dyn Fn(ChunkKey, ChunkHandle) + Send + Sync>;

pub(crate) struct Inner {
    arena: Arena,
    shards: Box<[Shard]>,
    shard_mask: u64,
    state: Mutex<State>,
    space: Condvar,
    refs: Box<[AtomicU32]>,
    /// `Entry::indexed` of each id, readable without the state lock: the last handle of an indexed
    /// entry drops without taking the lock (nothing to free). Written under the state lock.
    indexed: Box<[AtomicBool]>,
    config: CacheConfig,
    counters: CacheCounters,
    evict_hook: Mutex<Option<Arc<EvictHook>>>,
    copier: CopyPool,
}

/// The hot cache. Cheap to clone (shared).
#[derive(Clone)]
pub struct HotCache {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for HotCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HotCache")
            .field("snapshot", &self.snapshot())
            .finish()
    }
}

/// A reference to a committed chunk: its bytes stay valid and unchanged while the handle lives.
pub struct ChunkHandle {
    inner: Arc<Inner>,
    id: u32,
    block: Block,
    len: u64,
    meta: ChunkMeta,
}

/// An allocated block not yet visible to readers: write it, then [`HotCache::commit`] it, or drop it
/// to free it.
pub struct StagedBlock {
    inner: Arc<Inner>,
    id: u32,
    block: Block,
}

impl HotCache {
    /// Map the arena and build an empty cache.
    pub fn new(config: CacheConfig) -> Result<HotCache, CacheError> {
        let capacity = config.capacity_bytes.max(4096);
        let unit = Allocator::unit_for(capacity);
        let alloc = Allocator::new(capacity, unit);
        let arena =
            Arena::new(alloc.capacity() as usize, config.arena).map_err(|e| CacheError::Map {
                bytes: capacity,
                reason: e.to_string(),
            })?;
        // At most one entry per allocation unit can exist at once.
        let max_entries = (alloc.capacity() / unit) as usize;
        assert!(
            max_entries <= index::MAX_ID as usize + 1,
            "{max_entries} entries exceed the index's id range"
        );
        let shards = config.shards.max(1).next_power_of_two();
        let mut entries = Vec::with_capacity(max_entries);
        entries.resize_with(max_entries, || Entry::VACANT);
        let state = State {
            entries,
            free_ids: (0..max_entries as u32).rev().collect(),
            policy: Policy::new(config.policy, max_entries),
            alloc,
            used_bytes: 0,
            indexed: 0,
            demoting: 0,
        };
        let per_shard = max_entries / shards + 1;
        let index = IndexShard::new_set(shards, per_shard).map_err(|e| CacheError::Map {
            bytes: capacity,
            reason: format!("index: {e}"),
        })?;
        Ok(HotCache {
            inner: Arc::new(Inner {
                arena,
                shards: index,
                shard_mask: shards as u64 - 1,
                state: Mutex::new(state),
                space: Condvar::new(),
                refs: (0..max_entries).map(|_| AtomicU32::new(0)).collect(),
                indexed: (0..max_entries).map(|_| AtomicBool::new(false)).collect(),
                counters: CacheCounters::default(),
                evict_hook: Mutex::new(None),
                copier: CopyPool::new(config.copy_threads),
                config,
            }),
        })
    }

    /// Install the eviction hook (write-back demotion).
    pub fn set_evict_hook(&self, hook: Option<EvictHook>) {
        *self.inner.evict_hook.lock() = hook.map(Arc::new);
    }

    /// Copy `src` into `dst` (same length), splitting large copies over the copy pool.
    /// Every copy into or out of the arena goes through here.
    pub fn copy(&self, dst: &mut [u8], src: &[u8]) {
        self.inner.copier.copy(dst, src);
    }

    /// The copy pool (its size and how much work its helpers took).
    pub fn copier(&self) -> &CopyPool {
        &self.inner.copier
    }

    /// The configuration.
    pub fn config(&self) -> &CacheConfig {
        &self.inner.config
    }

    /// Arena capacity in bytes.
    pub fn capacity(&self) -> u64 {
        self.inner.state.lock().alloc.capacity()
    }

    /// Which huge pages the arena got.
    pub fn huge_pages(&self) -> &'static str {
        self.inner.arena.huge_pages()
    }

    /// Counters.
    pub fn counters(&self) -> &CacheCounters {
        &self.inner.counters
    }

    /// A consistent snapshot of the occupancy.
    pub fn snapshot(&self) -> CacheSnapshot {
        let s = self.inner.state.lock();
        let referenced = s
            .entries
            .iter()
            .enumerate()
            .filter(|(i, e)| e.live && self.inner.refs[*i].load(Ordering::Acquire) > 0)
            .count() as u64;
        CacheSnapshot {
            capacity_bytes: s.alloc.capacity(),
            allocated_bytes: s.alloc.allocated_bytes(),
            used_bytes: s.used_bytes,
            entries: s.indexed,
            blocks: s.alloc.live_blocks() as u64,
            referenced,
        }
    }

    fn shard(&self, key: &ChunkKey) -> &Shard {
        &self.inner.shards[(key.key_hash() & self.inner.shard_mask) as usize]
    }

    /// Whether `key` is cached (no LRU touch, like LMCache's `contains`).
    pub fn contains(&self, key: &ChunkKey) -> bool {
        self.shard(key).contains(key)
    }

    /// The number of leading keys of `keys` that are cached. Memory latency bound on a large index,
    /// so the index lines of the keys [`PREFETCH_AHEAD`] places on are requested while each key is
    /// compared, keeping that many loads in flight; nothing is allocated.
    pub fn prefix_hits(&self, keys: &[ChunkKey]) -> usize {
        for k in keys.iter().take(PREFETCH_AHEAD) {
            self.shard(k).prefetch(k.key_hash());
        }
        for (i, k) in keys.iter().enumerate() {
            if let Some(next) = keys.get(i + PREFETCH_AHEAD) {
                self.shard(next).prefetch(next.key_hash());
            }
            if !self.contains(k) {
                return i;
            }
        }
        keys.len()
    }

    /// A handle to `key`'s chunk, touching it for the eviction policy.
    pub fn get(&self, key: &ChunkKey) -> Option<ChunkHandle> {
        let Some(id) = self.shard(key).get(key) else {
            self.inner.counters.misses.fetch_add(1, Ordering::Relaxed);
            return None;
        };
        let mut s = self.inner.state.lock();
        let e = &s.entries[id as usize];
        // The id may have been evicted and reused between the two locks: check it is still this key.
        if !(e.live && e.indexed && e.key.as_ref() == Some(key)) {
            drop(s);
            self.inner.counters.misses.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        self.inner.refs[id as usize].fetch_add(1, Ordering::AcqRel);
        let handle = ChunkHandle {
            inner: self.inner.clone(),
            id,
            block: e.block,
            len: e.len,
            meta: e.meta,
        };
        s.policy.touch(id);
        drop(s);
        self.inner.counters.hits.fetch_add(1, Ordering::Relaxed);
        self.inner
            .counters
            .bytes_out
            .fetch_add(handle.len, Ordering::Relaxed);
        Some(handle)
    }

    /// Allocate a block of `bytes`, evicting unreferenced entries as the policy says. With a deadline,
    /// wait (without spinning) for handles to drop, or demotions to finish, while nothing is evictable.
    pub fn stage(&self, bytes: u64, deadline: Option<Instant>) -> Result<StagedBlock, CacheError> {
        let bytes = bytes.max(1);
        loop {
            let mut demoted = Vec::new();
            let result = self.stage_locked(bytes, deadline, &mut demoted);
            // Demotions are handed over outside the lock; the room they free arrives when they finish.
            if !demoted.is_empty() {
                let hook = self.inner.evict_hook.lock().clone();
                for (key, handle) in demoted {
                    match &hook {
                        Some(h) => h(key, handle),
                        None => drop(handle),
                    }
                }
            }
            match result {
                Some(r) => return r,
                None => continue,
            }
        }
    }

    /// One attempt under the state lock. `None`: an entry was evicted for demotion; dispatch it and
    /// try again.
    fn stage_locked(
        &self,
        bytes: u64,
        deadline: Option<Instant>,
        demoted: &mut Vec<(ChunkKey, ChunkHandle)>,
    ) -> Option<Result<StagedBlock, CacheError>> {
        let demote = self.inner.evict_hook.lock().is_some();
        let mut s = self.inner.state.lock();
        if bytes > s.alloc.capacity() {
            return Some(Err(CacheError::TooLarge {
                needed: bytes,
                capacity: s.alloc.capacity(),
            }));
        }
        loop {
            if let Some(block) = s.alloc.alloc(bytes) {
                let id = s
                    .free_ids
                    .pop()
                    .expect("one entry per allocation unit at most");
                s.entries[id as usize] = Entry {
                    block,
                    live: true,
                    ..Entry::VACANT
                };
                self.inner.refs[id as usize].store(1, Ordering::Release);
                return Some(Ok(StagedBlock {
                    inner: self.inner.clone(),
                    id,
                    block,
                }));
            }
            let waiting_helps = deadline.is_some_and(|d| Instant::now() < d);
            // Enough room is already being demoted: wait for it rather than evict more.
            if !(waiting_helps && s.demoting >= bytes) && self.evict_one(&mut s, demote, demoted) {
                if !demoted.is_empty() {
                    return None;
                }
                continue;
            }
            let full = CacheError::NoSpace {
                needed: bytes,
                allocated: s.alloc.allocated_bytes(),
                capacity: s.alloc.capacity(),
            };
            match deadline {
                Some(d) if waiting_helps => {
                    // In slices: a handle's last drop notifies without the lock (see `release`), so
                    // a notification can slip in between the eviction attempt and this wait.
                    let slice = d.min(Instant::now() + WAIT_SLICE);
                    self.inner.space.wait_until(&mut s, slice);
                }
                _ => {
                    self.inner.counters.no_space.fetch_add(1, Ordering::Relaxed);
                    return Some(Err(full));
                }
            }
        }
    }

    /// Evict one unreferenced entry; false when there is none within the scan limit. With `demote`,
    /// the entry's block is kept alive by a handle pushed on `demoted` instead of being freed.
    fn evict_one(
        &self,
        s: &mut State,
        demote: bool,
        demoted: &mut Vec<(ChunkKey, ChunkHandle)>,
    ) -> bool {
        let refs = &self.inner.refs;
        let Some(id) = s.policy.victim(
            |id| refs[id as usize].load(Ordering::Acquire) == 0,
            self.inner.config.max_eviction_scan,
        ) else {
            return false;
        };
        s.policy.remove(id);
        let e = &mut s.entries[id as usize];
        let key = e.key.clone().expect("indexed entries have keys");
        e.indexed = false;
        self.inner.indexed[id as usize].store(false, Ordering::SeqCst);
        let len = e.len;
        s.used_bytes -= len;
        s.indexed -= 1;
        self.shard(&key).remove_if(&key, id);
        self.inner
            .counters
            .evictions
            .fetch_add(1, Ordering::Relaxed);
        if demote {
            // Write-back: a handle keeps the block until the demotion completes.
            let e = &mut s.entries[id as usize];
            e.demoting = true;
            let e = &s.entries[id as usize];
            s.demoting += e.block.len;
            refs[id as usize].store(1, Ordering::Release);
            demoted.push((
                key,
                ChunkHandle {
                    inner: self.inner.clone(),
                    id,
                    block: e.block,
                    len: e.len,
                    meta: e.meta,
                },
            ));
        } else {
            Self::free_entry(s, id);
        }
        true
    }

    fn free_entry(s: &mut State, id: u32) {
        let e = std::mem::replace(&mut s.entries[id as usize], Entry::VACANT);
        if e.demoting {
            s.demoting -= e.block.len;
        }
        s.alloc.free(e.block);
        s.free_ids.push(id);
    }

    /// Make a staged block visible under `key` with its first `len` bytes and `meta`, and return a
    /// handle to it. A key already cached is replaced (the same key names the same bytes; the chain skips
    /// such puts before copying, so this only happens when two puts race). With `retain` off nothing is
    /// indexed: the handle is the only reference and the block is freed when it drops.
    pub fn commit(
        &self,
        staged: StagedBlock,
        key: &ChunkKey,
        len: u64,
        meta: ChunkMeta,
    ) -> ChunkHandle {
        assert!(
            len <= staged.block.len,
            "committed length exceeds the staged block"
        );
        let handle = staged.into_handle(key, len, meta);
        self.inner
            .counters
            .bytes_in
            .fetch_add(len, Ordering::Relaxed);
        let id = handle.id;
        if !self.inner.config.retain {
            return handle;
        }
        // The index changes under the state lock (state, then index, as eviction and `remove`), so
        // a slot never names an entry that another thread retired or reused in between.
        let mut s = self.inner.state.lock();
        let replaced = match self.shard(key).insert(key, id) {
            Ok(replaced) => replaced,
            Err(index::IndexFull) => {
                drop(s);
                crate::warn_limited!(
                    "index_full",
                    "hot cache index shard full (could not map memory to grow it): {} not cached",
                    crate::log_limit::escape(key.as_str().as_bytes())
                );
                return handle;
            }
        };
        if let Some(old) = replaced {
            let e = &s.entries[old as usize];
            // The old entry may have been evicted (and its id reused) since: only retire it if it is
            // still the indexed entry of this slot (this key, or one with its fingerprint).
            if e.live
                && e.indexed
                && e.key
                    .as_ref()
                    .is_some_and(|k| index::same_fingerprint(k, key))
            {
                self.retire(&mut s, old);
            }
            self.inner
                .counters
                .duplicates
                .fetch_add(1, Ordering::Relaxed);
        }
        let e = &mut s.entries[id as usize];
        e.indexed = true;
        self.inner.indexed[id as usize].store(true, Ordering::SeqCst);
        s.used_bytes += len;
        s.indexed += 1;
        s.policy.insert(id, key.key_hash());
        drop(s);
        self.inner.counters.inserts.fetch_add(1, Ordering::Relaxed);
        handle
    }

    /// Take an indexed entry out of the index bookkeeping; free it now if no handle holds it.
    fn retire(&self, s: &mut State, id: u32) {
        let e = &mut s.entries[id as usize];
        e.indexed = false;
        // SeqCst pairs with `release`: of this store-then-load and its decrement-then-load, at least
        // one sees the other, so the entry is never left unindexed, unreferenced and unfreed.
        self.inner.indexed[id as usize].store(false, Ordering::SeqCst);
        let len = e.len;
        s.used_bytes -= len;
        s.indexed -= 1;
        s.policy.remove(id);
        if self.inner.refs[id as usize].load(Ordering::SeqCst) == 0 {
            Self::free_entry(s, id);
            self.inner.space.notify_all();
        }
    }

    /// Remove `key`. Handles already given out stay valid; the block is freed when the last drops.
    pub fn remove(&self, key: &ChunkKey) -> bool {
        // Under the state lock, like `commit`: see there.
        let mut s = self.inner.state.lock();
        let Some(id) = self.shard(key).remove(key) else {
            return false;
        };
        let e = &s.entries[id as usize];
        if !(e.live
            && e.indexed
            && e.key
                .as_ref()
                .is_some_and(|k| index::same_fingerprint(k, key)))
        {
            return false;
        }
        // The slot was this entry's: it is out of the index now, whichever key it holds.
        let removed = e.key.as_ref() == Some(key);
        self.retire(&mut s, id);
        if removed {
            self.inner.counters.removals.fetch_add(1, Ordering::Relaxed);
        }
        removed
    }

    /// Remove every entry; returns how many were removed. Referenced blocks are freed when released.
    pub fn clear(&self) -> usize {
        self.keys().iter().filter(|k| self.remove(k)).count()
    }

    /// The cached keys (for `LIST`), in no particular order.
    /// The state lock is taken for [`KEYS_SLICE`] entries at a time, so a listing of a large cache
    /// holds up puts and gets for microseconds at a time, not for the whole scan.
    pub fn keys(&self) -> Vec<ChunkKey> {
        let mut out = Vec::new();
        let mut start = 0;
        loop {
            let s = self.inner.state.lock();
            let Some(slice) = s.entries.get(start..) else {
                return out;
            };
            let slice = &slice[..slice.len().min(KEYS_SLICE)];
            if slice.is_empty() {
                return out;
            }
            out.extend(
                slice
                    .iter()
                    .filter(|e| e.live && e.indexed)
                    .filter_map(|e| e.key.clone()),
            );
            start += slice.len();
        }
    }
}

impl Inner {
    /// Drop one reference to entry `id`; free it if that was the last and it is not indexed.
    fn release(&self, id: u32) {
        if self.refs[id as usize].fetch_sub(1, Ordering::SeqCst) != 1 {
            return;
        }
        if self.indexed[id as usize].load(Ordering::SeqCst) {
            // Still indexed: nothing to free (eviction or `retire` frees it, under the lock). It is
            // evictable now: wake a waiting stage (which also re-checks every `WAIT_SLICE`).
            self.space.notify_all();
            return;
        }
        let mut s = self.state.lock();
        // Between the decrement and this lock, the entry may have been freed by `retire` or eviction
        // (then the slot is vacant or reused), or a reader may have taken a new reference. Free only a
        // live, unindexed entry that nobody holds; every free happens under this lock, so exactly once.
        let e = &s.entries[id as usize];
        if self.refs[id as usize].load(Ordering::Acquire) == 0 && e.live && !e.indexed {
            HotCache::free_entry(&mut s, id);
        }
        drop(s);
        self.space.notify_all();
    }
}

impl StagedBlock {
    /// Size of the block (at least what was asked for).
    pub fn capacity(&self) -> usize {
        self.block.len as usize
    }

    /// The block's bytes, writable: the block is not visible to anyone else yet.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: the block lies in the arena and is owned by this staged block alone until commit.
        unsafe { self.inner.arena.bytes_mut(self.block) }
    }

    fn into_handle(mut self, key: &ChunkKey, len: u64, meta: ChunkMeta) -> ChunkHandle {
        let id = std::mem::replace(&mut self.id, TRANSFERRED);
        {
            let mut s = self.inner.state.lock();
            let e = &mut s.entries[id as usize];
            e.key = Some(key.clone());
            e.len = len;
            e.meta = meta;
        }
        // The staged block's reference becomes the handle's.
        ChunkHandle {
            inner: self.inner.clone(),
            id,
            block: self.block,
            len,
            meta,
        }
    }
}

/// `StagedBlock::id` after its reference moved to a handle.
const TRANSFERRED: u32 = u32::MAX;

impl Drop for StagedBlock {
    fn drop(&mut self) {
        if self.id != TRANSFERRED {
            self.inner.release(self.id);
        }
    }
}

impl ChunkHandle {
    /// The chunk's bytes.
    pub fn bytes(&self) -> &[u8] {
        // SAFETY: a committed block is immutable and stays allocated while this handle exists.
        unsafe { self.inner.arena.bytes(self.block, self.len) }
    }
    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len as usize
    }
    /// True for an empty chunk.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// The chunk's metadata.
    pub fn meta(&self) -> ChunkMeta {
        self.meta
    }
    /// The arena block (offset and reserved length).
    pub fn block(&self) -> Block {
        self.block
    }
}

impl Clone for ChunkHandle {
    fn clone(&self) -> Self {
        // The count is already >= 1 (this handle), so this is never a 0 -> 1 transition.
        self.inner.refs[self.id as usize].fetch_add(1, Ordering::AcqRel);
        ChunkHandle {
            inner: self.inner.clone(),
            id: self.id,
            block: self.block,
            len: self.len,
            meta: self.meta,
        }
    }
}

impl Drop for ChunkHandle {
    fn drop(&mut self) {
        self.inner.release(self.id);
    }
}

impl std::fmt::Debug for StagedBlock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StagedBlock")
            .field("block", &self.block)
            .finish()
    }
}

impl std::fmt::Debug for ChunkHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChunkHandle")
            .field("block", &self.block)
            .field("len", &self.len)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: i128) -> ChunkKey {
        ChunkKey::new("m", 1, 0, n, "half").unwrap()
    }

    fn cache(bytes: u64) -> HotCache {
        HotCache::new(CacheConfig::new(bytes)).unwrap()
    }

    fn put(c: &HotCache, k: &ChunkKey, len: usize) -> ChunkHandle {
        let mut st = c.stage(len as u64, None).unwrap();
        st.as_mut_slice()[..len].fill(k.key_hash() as u8);
        c.commit(
            st,
            k,
            len as u64,
            ChunkMeta {
                length: len as u64,
                ..ChunkMeta::default()
            },
        )
    }

    #[test]
    fn index_and_entries_agree_after_racing_puts_removes_and_evictions() {
        // Puts of the same few keys from two threads, with removals and evictions (a cache of 8
        // chunks for 16 keys): once quiet, every key the index says is present must be readable
        // with its own bytes, and the entries the cache counts must be exactly those it lists.
        // A stress check of those invariants. The window that `commit` and `remove` now close by
        // changing the index under the state lock (a slot left naming an entry another thread had
        // retired and reused) is too narrow to hit reliably here: this test passed against the old
        // order in three runs.
        let c = cache(8 * 4096);
        let keys: Vec<ChunkKey> = (0..16).map(key).collect();
        std::thread::scope(|s| {
            for t in 0..2usize {
                let (c, keys) = (&c, &keys);
                s.spawn(move || {
                    for i in 0..20_000usize {
                        let k = &keys[(i * 7 + t * 3) % keys.len()];
                        if i % 5 == 4 {
                            c.remove(k);
                        } else if let Ok(mut st) = c.stage(4096, None) {
                            st.as_mut_slice().fill(k.key_hash() as u8);
                            let meta = ChunkMeta {
                                length: 4096,
                                ..ChunkMeta::default()
                            };
                            drop(c.commit(st, k, 4096, meta));
                        }
                    }
                });
            }
        });
        for k in &keys {
            let present = c.contains(k);
            let read = c.get(k);
            assert_eq!(present, read.is_some(), "{k}: contains and get disagree");
            if let Some(h) = read {
                assert!(
                    h.bytes().iter().all(|&b| b == k.key_hash() as u8),
                    "{k}: wrong bytes"
                );
            }
        }
        assert_eq!(c.keys().len() as u64, c.snapshot().entries);
    }

    #[test]
    fn last_handle_racing_remove_frees_exactly_once() {
        // Regression: a handle's last drop raced `remove`, and both freed the block (the allocator's
        // double-free check fired). Hammer the race from two threads.
        let c = cache(64 << 20);
        let barrier = std::sync::Barrier::new(2);
        for round in 0..5_000 {
            let k = key(round);
            let h = put(&c, &k, 4096);
            std::thread::scope(|s| {
                s.spawn(|| {
                    barrier.wait();
                    drop(h)
                });
                s.spawn(|| {
                    barrier.wait();
                    c.remove(&k)
                });
            });
            assert_eq!(c.snapshot().allocated_bytes, 0, "round {round}");
        }
    }

    #[test]
    fn handles_of_indexed_entries_drop_without_freeing_and_removal_still_frees() {
        // The last handle of an indexed entry drops without the state lock; racing it against
        // `remove` must still free every block exactly once, and never an indexed one.
        let c = cache(64 << 20);
        for round in 0..2_000 {
            let k = key(round);
            drop(put(&c, &k, 4096));
            let handles: Vec<_> = (0..4).map(|_| c.get(&k).expect("indexed")).collect();
            std::thread::scope(|s| {
                for h in handles {
                    s.spawn(move || drop(h));
                }
                s.spawn(|| assert!(c.remove(&k)));
            });
            assert_eq!(c.snapshot().allocated_bytes, 0, "round {round}");
        }
        let kept = put(&c, &key(-1), 4096);
        drop(kept);
        drop(c.get(&key(-1)));
        assert_eq!(c.snapshot().entries, 1);
        assert_eq!(
            c.snapshot().blocks,
            1,
            "an indexed, unreferenced entry keeps its block"
        );
    }

    #[test]
    fn blocks_are_page_aligned_as_the_abi_promises() {
        let c = cache(8 << 20);
        for len in [1usize, 4095, 4097, 100_000] {
            let mut st = c.stage(len as u64, None).unwrap();
            let cap = st.capacity();
            let buf = st.as_mut_slice();
            assert_eq!(
                buf.as_ptr() as usize % 4096,
                0,
                "start of a {len}-byte block"
            );
            assert_eq!(cap % 4096, 0, "capacity of a {len}-byte block");
            assert!(cap >= len);
        }
    }

    #[test]
    fn staged_blocks_free_on_drop_and_commit_replaces() {
        let c = cache(1 << 20);
        drop(c.stage(1000, None).unwrap());
        assert_eq!(c.snapshot().allocated_bytes, 0);
        let k = key(1);
        let a = put(&c, &k, 100);
        let b = put(&c, &k, 200); // a racing duplicate: replaces, the old block lives on in `a`
        assert_eq!(c.snapshot().entries, 1);
        assert_eq!((a.len(), b.len()), (100, 200));
        drop(a);
        drop(b);
        assert_eq!(c.snapshot().blocks, 1, "only the indexed block remains");
    }

    #[test]
    fn waiting_stage_wakes_when_a_handle_drops() {
        let c = cache(1 << 20);
        let cap = c.capacity();
        let h = put(&c, &key(1), cap as usize);
        let c2 = c.clone();
        let waiter = std::thread::spawn(move || {
            c2.stage(
                cap,
                Some(Instant::now() + std::time::Duration::from_secs(10)),
            )
            .is_ok()
        });
        std::thread::sleep(std::time::Duration::from_millis(50));
        c.remove(&key(1));
        drop(h);
        assert!(
            waiter.join().unwrap(),
            "the waiting stage got the freed room"
        );
        let err = c.stage(cap + 1, None).unwrap_err();
        assert!(matches!(err, CacheError::TooLarge { .. }), "{err}");
    }
}
