//! The hot cache's key index: one shard of it, an open-addressing table from a key's fingerprint to
//! its entry id, read without a lock.
//!
//! Lookups are what an inference engine asks on its critical path, over an index too large for the
//! caches, so every key costs a DRAM miss. Two things decide the rate:
//! - **No locked instruction per key.** A mutex's `lock cmpxchg` is a full barrier on x86: it keeps
//!   the next key's miss from starting until this one's ends. Readers here take no lock and write
//!   nothing; a per-shard sequence counter (a seqlock) tells them when a writer moved slots under
//!   them, and they retry (then, rarely, read under the writers' lock).
//! - **One line per key.** A slot is 16 bytes (four per line) and holds the key's two independent
//!   64-bit hashes ([`ChunkKey::key_hash`], [`ChunkKey::key_check`]) with the entry id packed into the
//!   low bits of the second: a key is recognised without reading its text, and the line is prefetched
//!   while earlier keys are compared ([`IndexShard::prefetch`]).
//!
//! A fingerprint match is a match: 107 bits of it (the shard and the id take the rest), so two
//! distinct keys in the same shard collide with probability about 2^-100 per lookup. That is enough
//! for a presence answer. [`super::HotCache::get`] and `remove` still compare the whole key with the
//! entry's own before they hand out or drop data, so even a collision never returns another key's
//! bytes.
//!
//! Tables are never freed while the shard lives (a reader may still be probing an old one): growth
//! moves to the next, twice as large, generation. All generations together take at most twice the
//! current one; the hot cache pre-sizes shards for its entry limit, so growth is rare.
//!
//! The shards' first tables share one anonymous mapping with transparent huge pages requested:
//! with 4 KiB pages every key of a walk over a large index also missed the TLB.
//!
//! Linear probing with backward-shift deletion (no tombstones), load at most 1/2.

use crate::key::ChunkKey;
use memmap2::MmapRaw;
use parking_lot::Mutex;
use std::sync::atomic::{fence, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

/// Bits of a slot's `tag` word that hold `id + 1` (0: the slot is empty).
const ID_BITS: u32 = 21;
const ID_MASK: u64 = (1 << ID_BITS) - 1;
/// The largest entry id an index can hold.
pub(crate) const MAX_ID: u32 = (ID_MASK - 1) as u32;
const MIN_SLOTS: usize = 64;
/// Table generations: the last is 2^(GENERATIONS-1) times the first, far beyond any entry limit.
const GENERATIONS: usize = 40;
/// Optimistic read attempts before a reader takes the writers' lock.
const OPTIMISTIC_TRIES: usize = 8;

/// One slot: `hash` is the key's `key_hash`; `tag` holds the high bits of its `key_check` and
/// `id + 1` in the low [`ID_BITS`]. Atomics only so that lock-free readers may race writers.
#[repr(C, align(16))]
struct Slot {
    hash: AtomicU64,
    tag: AtomicU64,
}

/// The `tag` bits a key must match (its `key_check` without the id bits).
fn check_bits(key: &ChunkKey) -> u64 {
    key.key_check() & !ID_MASK
}

/// Whether two keys share an index slot: equal keys, or (odds near 2^-100) keys whose fingerprints,
/// as the slots hold them, collide.
pub(crate) fn same_fingerprint(a: &ChunkKey, b: &ChunkKey) -> bool {
    a.key_hash() == b.key_hash() && check_bits(a) == check_bits(b)
}

/// A key's fingerprint as the slots hold it.
#[derive(Clone, Copy)]
struct Fingerprint {
    hash: u64,
    check: u64,
}

impl Fingerprint {
    fn of(key: &ChunkKey) -> Fingerprint {
        Fingerprint {
            hash: key.key_hash(),
            check: check_bits(key),
        }
    }
}

const SLOT_BYTES: usize = std::mem::size_of::<Slot>();

/// Zeroed memory for slots: an anonymous mapping, with transparent huge pages asked for.
fn map_slots(count: usize) -> std::io::Result<Arc<MmapRaw>> {
    // Huge pages are only a hint: without them the index still works, on 4 KiB pages.
    let (map, _) = super::arena::map_anonymous(count * SLOT_BYTES, false)?;
    // A raw mapping: slots are written through shared references (atomics), so their pointer must
    // not come from `MmapMut`'s read-only `Deref`.
    Ok(Arc::new(MmapRaw::from(map)))
}

/// One generation's slots: `mask + 1` of them at slot `first` of a mapping.
struct Table {
    map: Arc<MmapRaw>,
    first: usize,
    mask: usize,
}

/// The home position of `hash` in a table of `mask + 1` slots: the top bits of a Fibonacci product,
/// independent of the low bits that chose the shard.
fn home(hash: u64, mask: usize) -> usize {
    let bits = (mask + 1).trailing_zeros();
    (hash.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> (64 - bits.max(1))) as usize & mask
}

/// Hint the CPU to start loading the line at `p` (never faults, reads nothing).
#[inline(always)]
fn prefetch_line<T>(p: *const T) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: `prefetcht0` is a hint: it has no architectural effect and does not fault on any
    // address, so any pointer value is fine (SSE is part of the x86-64 baseline).
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(p.cast());
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

impl Table {
    /// `n` (a power of two) slots at slot `first` of `map`, which nothing else uses.
    fn in_map(map: Arc<MmapRaw>, first: usize, n: usize) -> Table {
        assert!(n.is_power_of_two() && (first + n) * SLOT_BYTES <= map.len());
        Table {
            map,
            first,
            mask: n - 1,
        }
    }

    /// A table of `n` slots in a mapping of its own.
    fn with_slots(n: usize) -> std::io::Result<Table> {
        Ok(Table::in_map(map_slots(n)?, 0, n))
    }

    fn slots(&self) -> &[Slot] {
        // SAFETY: `in_map` checked that the range lies inside the mapping, which is page aligned
        // (so 16-byte aligned for `Slot`), zero-filled by the kernel (all-zero `AtomicU64`s are
        // valid), and kept alive by `self.map` for the borrow. The pointer is the raw mapping's
        // (writable, no reference in between), and `Slot` is two atomics, so shared references may
        // read and write it from any thread; only this table hands out the range.
        unsafe {
            std::slice::from_raw_parts(
                self.map
                    .as_mut_ptr()
                    .add(self.first * SLOT_BYTES)
                    .cast::<Slot>(),
                self.mask + 1,
            )
        }
    }

    /// The position of `fp` and its id, if present. Under the writers' lock the answer is exact;
    /// without it, it is only a guess until the caller validates the sequence counter. The probe is
    /// bounded by the table size either way, since a racing writer may shift slots under it.
    #[inline(always)]
    fn probe(&self, fp: Fingerprint) -> Option<(usize, u32)> {
        let slots = self.slots();
        let mut i = home(fp.hash, self.mask);
        for _ in 0..=self.mask {
            let slot = &slots[i];
            let tag = slot.tag.load(Ordering::Relaxed);
            if tag == 0 {
                return None;
            }
            if tag & !ID_MASK == fp.check && slot.hash.load(Ordering::Relaxed) == fp.hash {
                return Some((i, (tag & ID_MASK) as u32 - 1));
            }
            i = (i + 1) & self.mask;
        }
        None
    }
}

/// An insert found no room: the shard could not grow (no memory) and has one empty slot left.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct IndexFull;

/// What only writers touch (under the lock).
struct Writer {
    /// Occupied slots of the current generation.
    len: usize,
}

/// One shard: the current table generation, readable without the lock, and the writers' lock.
pub(crate) struct IndexShard {
    /// Even when no writer is inside; bumped to odd before a writer changes slots and back to even
    /// after.
    seq: AtomicU64,
    /// The current generation: `tables[generation]` is set.
    generation: AtomicUsize,
    /// Generation `g` has `first << g` slots; each is set once and lives as long as the shard.
    tables: [OnceLock<Table>; GENERATIONS],
    writer: Mutex<Writer>,
}

impl IndexShard {
    /// `count` empty shards, each sized for about `expected` keys without growing, their tables in
    /// one mapping.
    pub(crate) fn new_set(count: usize, expected: usize) -> std::io::Result<Box<[IndexShard]>> {
        let each = (expected.max(1) * 2).next_power_of_two().max(MIN_SLOTS);
        let map = map_slots(count * each)?;
        Ok((0..count)
            .map(|i| IndexShard::with_table(Table::in_map(map.clone(), i * each, each)))
            .collect())
    }

    /// One empty shard sized for about `expected` keys without growing.
    #[cfg(test)]
    fn new(expected: usize) -> IndexShard {
        IndexShard::new_set(1, expected)
            .expect("map index slots")
            .into_vec()
            .remove(0)
    }

    fn with_table(table: Table) -> IndexShard {
        let shard = IndexShard {
            seq: AtomicU64::new(0),
            generation: AtomicUsize::new(0),
            tables: std::array::from_fn(|_| OnceLock::new()),
            writer: Mutex::new(Writer { len: 0 }),
        };
        let _ = shard.tables[0].set(table);
        shard
    }

    /// The current table: read `seq` before calling (Acquire), so it is at least as new as that.
    fn table(&self) -> &Table {
        let g = self.generation.load(Ordering::Acquire);
        self.tables[g].get().expect("the current generation is set")
    }

    /// A consistent read of `fp`'s id: optimistic first, under the writers' lock if writers keep
    /// moving slots.
    #[inline(always)]
    fn read(&self, fp: Fingerprint) -> Option<u32> {
        for _ in 0..OPTIMISTIC_TRIES {
            let before = self.seq.load(Ordering::Acquire);
            if before & 1 == 0 {
                let found = self.table().probe(fp);
                // Orders the slot loads above before the re-check below (pairs with the writers'
                // release fence in `begin`).
                fence(Ordering::Acquire);
                if self.seq.load(Ordering::Relaxed) == before {
                    return found.map(|(_, id)| id);
                }
            }
            std::hint::spin_loop();
        }
        let _w = self.writer.lock();
        self.table().probe(fp).map(|(_, id)| id)
    }

    /// The entry id indexed under `key`'s fingerprint, without a lock. The caller checks the entry's
    /// key before trusting the id with data (see the module docs).
    #[inline]
    pub(crate) fn get(&self, key: &ChunkKey) -> Option<u32> {
        self.read(Fingerprint::of(key))
    }

    /// Whether `key` is indexed, without a lock.
    #[inline]
    pub(crate) fn contains(&self, key: &ChunkKey) -> bool {
        self.get(key).is_some()
    }

    /// Start a writer's section: readers that overlap it will retry.
    fn begin(&self) {
        let s = self.seq.load(Ordering::Relaxed);
        debug_assert_eq!(s & 1, 0, "writers hold the lock");
        self.seq.store(s + 1, Ordering::Relaxed);
        // The odd count is visible before any slot store below (pairs with the readers' fence).
        fence(Ordering::Release);
    }

    /// End a writer's section.
    fn end(&self) {
        let s = self.seq.load(Ordering::Relaxed);
        self.seq.store(s + 1, Ordering::Release);
    }

    /// Map `key` to `id`; returns the id it replaced (the same key, or a key with the same
    /// fingerprint), or [`IndexFull`] when the shard could not grow and has no room.
    pub(crate) fn insert(&self, key: &ChunkKey, id: u32) -> Result<Option<u32>, IndexFull> {
        assert!(id <= MAX_ID, "entry id {id} exceeds the index's {MAX_ID}");
        let fp = Fingerprint::of(key);
        let tag = fp.check | (u64::from(id) + 1);
        let mut w = self.writer.lock();
        if let Some((i, old)) = self.table().probe(fp) {
            self.begin();
            self.table().slots()[i].tag.store(tag, Ordering::Relaxed);
            self.end();
            return Ok(Some(old));
        }
        if (w.len + 1) * 2 > self.table().mask + 1 {
            self.grow();
            // Keep one slot empty, so probes end.
            if w.len + 2 > self.table().mask + 1 {
                return Err(IndexFull);
            }
        }
        let t = self.table();
        let slots = t.slots();
        let mut i = home(fp.hash, t.mask);
        while slots[i].tag.load(Ordering::Relaxed) != 0 {
            i = (i + 1) & t.mask;
        }
        self.begin();
        slots[i].hash.store(fp.hash, Ordering::Relaxed);
        slots[i].tag.store(tag, Ordering::Relaxed);
        self.end();
        w.len += 1;
        Ok(None)
    }

    /// Remove `key`; returns its id.
    pub(crate) fn remove(&self, key: &ChunkKey) -> Option<u32> {
        let mut w = self.writer.lock();
        let (i, id) = self.table().probe(Fingerprint::of(key))?;
        self.delete_at(i);
        w.len -= 1;
        Some(id)
    }

    /// Remove `key` only if it maps to `id` (an eviction racing a newer put of the same key).
    pub(crate) fn remove_if(&self, key: &ChunkKey, id: u32) -> bool {
        let mut w = self.writer.lock();
        match self.table().probe(Fingerprint::of(key)) {
            Some((i, found)) if found == id => {
                self.delete_at(i);
                w.len -= 1;
                true
            }
            _ => false,
        }
    }

    /// Backward-shift deletion: pull later members of the probe run into the hole. Caller holds
    /// the writers' lock.
    fn delete_at(&self, mut hole: usize) {
        let t = self.table();
        let (mask, slots) = (t.mask, t.slots());
        self.begin();
        let mut j = hole;
        loop {
            j = (j + 1) & mask;
            let tag = slots[j].tag.load(Ordering::Relaxed);
            if tag == 0 {
                break;
            }
            let hash = slots[j].hash.load(Ordering::Relaxed);
            let k = home(hash, mask);
            // The slot at `j` may move back to `hole` only if its home is not in (hole, j]
            // (cyclically).
            let stays = if hole <= j {
                hole < k && k <= j
            } else {
                hole < k || k <= j
            };
            if stays {
                continue;
            }
            slots[hole].hash.store(hash, Ordering::Relaxed);
            slots[hole].tag.store(tag, Ordering::Relaxed);
            hole = j;
        }
        slots[hole].tag.store(0, Ordering::Relaxed);
        slots[hole].hash.store(0, Ordering::Relaxed);
        self.end();
    }

    /// Move every slot into the next generation, twice as large. Caller holds the writers' lock.
    /// Without memory for it the shard stays as it is and fills past 1/2, up to one empty slot.
    fn grow(&self) {
        let g = self.generation.load(Ordering::Relaxed);
        let old = self.table();
        let next = match Table::with_slots((old.mask + 1) * 2) {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(target: "kvhost::cache", "index shard cannot grow past {} slots: {e}", old.mask + 1);
                return;
            }
        };
        let slots = next.slots();
        for s in old.slots() {
            let tag = s.tag.load(Ordering::Relaxed);
            if tag != 0 {
                let hash = s.hash.load(Ordering::Relaxed);
                let mut i = home(hash, next.mask);
                while slots[i].tag.load(Ordering::Relaxed) != 0 {
                    i = (i + 1) & next.mask;
                }
                slots[i].hash.store(hash, Ordering::Relaxed);
                slots[i].tag.store(tag, Ordering::Relaxed);
            }
        }
        assert!(
            g + 1 < GENERATIONS,
            "index shard outgrew {GENERATIONS} generations"
        );
        let _ = self.tables[g + 1].set(next);
        self.begin();
        self.generation.store(g + 1, Ordering::Release);
        self.end();
    }

    /// Start loading the line that holds `hash`'s home slot, without the lock.
    #[inline(always)]
    pub(crate) fn prefetch(&self, hash: u64) {
        let t = self.table();
        prefetch_line(t.slots().as_ptr().wrapping_add(home(hash, t.mask)));
    }

    /// Indexed keys (under the writers' lock).
    #[cfg(test)]
    fn len(&self) -> usize {
        self.writer.lock().len
    }

    /// Slots of the current generation.
    #[cfg(test)]
    fn capacity(&self) -> usize {
        self.table().mask + 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;
    use std::sync::atomic::AtomicBool;

    fn key(n: u64) -> ChunkKey {
        ChunkKey::new("m", 1, 0, n as i128, "half").unwrap()
    }

    #[test]
    fn insert_get_replace_remove_and_grow() {
        let s = IndexShard::new(1);
        for n in 0..10_000u64 {
            assert_eq!(s.insert(&key(n), n as u32), Ok(None));
        }
        assert_eq!(s.len(), 10_000);
        assert!(s.capacity() >= 20_000, "load stays at most 1/2");
        assert_eq!(s.insert(&key(7), 70), Ok(Some(7)));
        assert_eq!(s.get(&key(7)), Some(70));
        for n in (0..10_000u64).step_by(2) {
            assert!(s.remove(&key(n)).is_some());
        }
        for n in 0..10_000u64 {
            assert_eq!(s.contains(&key(n)), n % 2 == 1, "key {n}");
        }
        assert_eq!(s.len(), 5_000);
        assert_eq!(s.remove(&key(0)), None);
        assert!(!s.remove_if(&key(1), 2), "maps to 1, not 2");
        assert!(s.remove_if(&key(1), 1));
        assert!(!s.contains(&key(1)));
    }

    #[test]
    fn a_matching_key_hash_is_not_enough_the_check_bits_must_match() {
        // Forge a slot carrying `b`'s key_hash with other check bits, as a 64-bit collision would
        // leave it: looking `b` up must miss.
        let s = IndexShard::new(8);
        let (a, b) = (key(1), key(2));
        s.insert(&a, 1).unwrap();
        let t = s.table();
        let slots = t.slots();
        let mut i = home(b.key_hash(), t.mask);
        while slots[i].tag.load(Ordering::Relaxed) != 0 {
            i = (i + 1) & t.mask;
        }
        slots[i].hash.store(b.key_hash(), Ordering::Relaxed);
        slots[i].tag.store(check_bits(&a) | 10, Ordering::Relaxed);
        assert_eq!(s.get(&b), None);
        assert_eq!(s.get(&a), Some(1));
    }

    #[test]
    fn the_largest_id_round_trips_and_a_larger_one_is_refused() {
        let s = IndexShard::new(8);
        s.insert(&key(1), MAX_ID).unwrap();
        assert_eq!(s.get(&key(1)), Some(MAX_ID));
        let refused = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            s.insert(&key(2), MAX_ID + 1)
        }));
        assert!(refused.is_err());
    }

    /// Readers racing a writer that inserts, removes (shifting slots back) and grows never see a
    /// key that is always present go missing, nor a key that is never inserted appear.
    #[test]
    fn lock_free_readers_see_a_consistent_index_while_writers_shift_and_grow() {
        let s = IndexShard::new(4);
        let stable: Vec<ChunkKey> = (0..200).map(key).collect();
        for (i, k) in stable.iter().enumerate() {
            s.insert(k, i as u32).unwrap();
        }
        let absent: Vec<ChunkKey> = (1_000_000..1_000_200).map(key).collect();
        let stop = AtomicBool::new(false);
        std::thread::scope(|scope| {
            scope.spawn(|| {
                for round in 0..300u64 {
                    let churn: Vec<ChunkKey> =
                        (0..100).map(|n| key(10_000 + round * 100 + n)).collect();
                    for (i, k) in churn.iter().enumerate() {
                        s.insert(k, 1000 + i as u32).unwrap();
                    }
                    for k in &churn {
                        assert!(s.remove(k).is_some());
                    }
                }
                stop.store(true, Ordering::Relaxed);
            });
            let mut reads = 0u64;
            while !stop.load(Ordering::Relaxed) || reads == 0 {
                for (i, k) in stable.iter().enumerate() {
                    assert_eq!(s.get(k), Some(i as u32), "stable key {i} went missing");
                }
                for k in &absent {
                    assert!(!s.contains(k), "a key never inserted appeared");
                }
                reads += 1;
            }
        });
        assert_eq!(s.len(), stable.len());
    }

    proptest! {
        #[test]
        fn behaves_like_a_hash_map(ops in proptest::collection::vec((0u8..4, 0u64..300), 0..2000)) {
            let s = IndexShard::new(4);
            let mut model: HashMap<u64, u32> = HashMap::new();
            for (i, (op, k)) in ops.into_iter().enumerate() {
                match op {
                    0 => prop_assert_eq!(s.insert(&key(k), i as u32), Ok(model.insert(k, i as u32))),
                    1 => prop_assert_eq!(s.remove(&key(k)), model.remove(&k)),
                    2 => {
                        let id = model.get(&k).copied().unwrap_or(u32::MAX);
                        let expect = model.get(&k) == Some(&id) && id != u32::MAX;
                        prop_assert_eq!(s.remove_if(&key(k), id), expect);
                        if expect {
                            model.remove(&k);
                        }
                    }
                    _ => prop_assert_eq!(s.get(&key(k)), model.get(&k).copied()),
                }
                prop_assert_eq!(s.len(), model.len());
            }
            for (k, id) in &model {
                prop_assert_eq!(s.get(&key(*k)), Some(*id));
            }
        }
    }
}
