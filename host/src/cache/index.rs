//! The hot cache's key index: one shard of it, an open-addressing table from key to entry id built
//! for the prefix walk.
//!
//! A prefix walk over a large index is bound by memory latency: every key lands on a random cache
//! line. A `HashMap` gives no way to start those loads early, so each key paid one full DRAM (and TLB)
//! miss in turn. Here the slots are a dense array of `(hash, id)` pairs (16 bytes, four per line) whose
//! address any thread can compute without the lock, so [`IndexShard::prefetch`] issues the loads for
//! the next keys while the current one is compared; the precomputed XXH3 is compared first and the
//! key itself only on a hash match. Linear probing with backward-shift deletion (no tombstones), load
//! at most 1/2.

use crate::key::ChunkKey;
use parking_lot::{Mutex, MutexGuard};
use std::sync::atomic::{AtomicPtr, AtomicUsize, Ordering};

const EMPTY: u32 = u32::MAX;
const MIN_SLOTS: usize = 64;

#[derive(Clone, Copy)]
struct Slot {
    hash: u64,
    id: u32,
}

const VACANT: Slot = Slot { hash: 0, id: EMPTY };

/// The table proper (under the shard's lock).
pub(crate) struct Table {
    slots: Box<[Slot]>,
    /// The key of each occupied slot, at the same position.
    keys: Box<[Option<ChunkKey>]>,
    len: usize,
}

/// One shard: the table under a mutex, plus where its slots live for lock-free prefetching.
pub(crate) struct IndexShard {
    table: Mutex<Table>,
    /// `table.slots.as_ptr()` and its length minus one, published for [`IndexShard::prefetch`] only:
    /// nothing is read through them, so a stale pair just prefetches a useless line.
    slots_at: AtomicPtr<Slot>,
    keys_at: AtomicPtr<Option<ChunkKey>>,
    mask: AtomicUsize,
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
    fn with_slots(n: usize) -> Table {
        Table {
            slots: vec![VACANT; n].into_boxed_slice(),
            keys: (0..n).map(|_| None).collect(),
            len: 0,
        }
    }

    fn mask(&self) -> usize {
        self.slots.len() - 1
    }

    /// The position of `key`, if present.
    fn find(&self, key: &ChunkKey) -> Option<usize> {
        let mask = self.mask();
        let hash = key.key_hash();
        let mut i = home(hash, mask);
        loop {
            let s = self.slots[i];
            if s.id == EMPTY {
                return None;
            }
            if s.hash == hash && self.keys[i].as_ref() == Some(key) {
                return Some(i);
            }
            i = (i + 1) & mask;
        }
    }

    /// The entry id of `key`.
    pub(crate) fn get(&self, key: &ChunkKey) -> Option<u32> {
        self.find(key).map(|i| self.slots[i].id)
    }

    /// Whether `key` is indexed.
    pub(crate) fn contains_key(&self, key: &ChunkKey) -> bool {
        self.find(key).is_some()
    }

    /// Map `key` to `id`; returns the id it replaced.
    pub(crate) fn insert(&mut self, key: ChunkKey, id: u32) -> Option<u32> {
        debug_assert_ne!(id, EMPTY);
        if let Some(i) = self.find(&key) {
            return Some(std::mem::replace(&mut self.slots[i].id, id));
        }
        if (self.len + 1) * 2 > self.slots.len() {
            self.grow();
        }
        let mask = self.mask();
        let hash = key.key_hash();
        let mut i = home(hash, mask);
        while self.slots[i].id != EMPTY {
            i = (i + 1) & mask;
        }
        self.slots[i] = Slot { hash, id };
        self.keys[i] = Some(key);
        self.len += 1;
        None
    }

    /// Remove `key`; returns its id.
    pub(crate) fn remove(&mut self, key: &ChunkKey) -> Option<u32> {
        let i = self.find(key)?;
        let id = self.slots[i].id;
        self.delete_at(i);
        Some(id)
    }

    /// Backward-shift deletion: pull later members of the probe run into the hole.
    fn delete_at(&mut self, mut hole: usize) {
        let mask = self.mask();
        let mut j = hole;
        loop {
            j = (j + 1) & mask;
            let s = self.slots[j];
            if s.id == EMPTY {
                break;
            }
            let k = home(s.hash, mask);
            // `s` may move back to `hole` only if its home is not in (hole, j] (cyclically).
            let stays = if hole <= j {
                hole < k && k <= j
            } else {
                hole < k || k <= j
            };
            if stays {
                continue;
            }
            self.slots[hole] = s;
            self.keys[hole] = self.keys[j].take();
            hole = j;
        }
        self.slots[hole] = VACANT;
        self.keys[hole] = None;
        self.len -= 1;
    }

    fn grow(&mut self) {
        let old = std::mem::replace(self, Table::with_slots(self.slots.len() * 2));
        for (slot, key) in old.slots.iter().zip(old.keys.into_vec()) {
            if let Some(key) = key {
                self.insert(key, slot.id);
            }
        }
    }

    /// The indexed keys.
    pub(crate) fn keys(&self) -> impl Iterator<Item = &ChunkKey> {
        self.keys.iter().flatten()
    }

    /// Indexed keys.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.len
    }
}

impl IndexShard {
    /// An empty shard sized for about `expected` keys.
    pub(crate) fn new(expected: usize) -> IndexShard {
        let mut table = Table::with_slots((expected * 2).next_power_of_two().max(MIN_SLOTS));
        let shard = IndexShard {
            slots_at: AtomicPtr::new(table.slots.as_mut_ptr()),
            keys_at: AtomicPtr::new(table.keys.as_mut_ptr()),
            mask: AtomicUsize::new(table.mask()),
            table: Mutex::new(table),
        };
        shard.publish(&mut shard.table.lock());
        shard
    }

    /// Lock the table. Call [`IndexShard::publish`] before unlocking after an insert (it may grow).
    pub(crate) fn lock(&self) -> MutexGuard<'_, Table> {
        self.table.lock()
    }

    /// Record where the table's slots are now (after an insert that may have moved them).
    pub(crate) fn publish(&self, t: &mut Table) {
        self.slots_at.store(t.slots.as_mut_ptr(), Ordering::Relaxed);
        self.keys_at.store(t.keys.as_mut_ptr(), Ordering::Relaxed);
        self.mask.store(t.mask(), Ordering::Relaxed);
    }

    /// Map `key` to `id` (see [`Table::insert`]).
    pub(crate) fn insert(&self, key: ChunkKey, id: u32) -> Option<u32> {
        let mut t = self.lock();
        let old = t.insert(key, id);
        self.publish(&mut t);
        old
    }

    /// Start loading the lines that hold `hash`'s home slot and the key stored there, without the
    /// lock.
    #[inline(always)]
    pub(crate) fn prefetch(&self, hash: u64) {
        let mask = self.mask.load(Ordering::Relaxed);
        let i = home(hash, mask);
        prefetch_line(self.slots_at.load(Ordering::Relaxed).wrapping_add(i));
        let key = self.keys_at.load(Ordering::Relaxed).wrapping_add(i);
        prefetch_line(key);
        prefetch_line(key.cast::<u8>().wrapping_add(64));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;

    fn key(n: u64) -> ChunkKey {
        ChunkKey::new("m", 1, 0, n as i128, "half").unwrap()
    }

    #[test]
    fn insert_get_replace_remove_and_grow() {
        let s = IndexShard::new(1);
        for n in 0..10_000u64 {
            assert_eq!(s.insert(key(n), n as u32), None);
        }
        let mut t = s.lock();
        assert_eq!(t.len(), 10_000);
        assert!(t.slots.len() >= 20_000, "load stays at most 1/2");
        assert_eq!(t.insert(key(7), 70), Some(7));
        assert_eq!(t.get(&key(7)), Some(70));
        for n in (0..10_000u64).step_by(2) {
            assert!(t.remove(&key(n)).is_some());
        }
        for n in 0..10_000u64 {
            assert_eq!(t.contains_key(&key(n)), n % 2 == 1, "key {n}");
        }
        assert_eq!(t.keys().count(), 5_000);
        assert_eq!(t.remove(&key(0)), None);
    }

    #[test]
    fn a_matching_hash_is_not_enough_the_key_must_match() {
        // Forge a slot carrying `b`'s hash but another key, as a hash collision would leave it:
        // looking `b` up must compare the key and miss.
        let s = IndexShard::new(8);
        let (a, b) = (key(1), key(2));
        let mut t = s.lock();
        t.insert(a.clone(), 1);
        let mask = t.mask();
        let mut i = home(b.key_hash(), mask);
        while t.slots[i].id != EMPTY {
            i = (i + 1) & mask;
        }
        t.slots[i] = Slot {
            hash: b.key_hash(),
            id: 9,
        };
        t.keys[i] = Some(a.clone());
        t.len += 1;
        assert_eq!(t.get(&b), None);
        assert_eq!(t.get(&a), Some(1));
    }

    proptest! {
        #[test]
        fn behaves_like_a_hash_map(ops in proptest::collection::vec((0u8..3, 0u64..300), 0..2000)) {
            let s = IndexShard::new(4);
            let mut model: HashMap<u64, u32> = HashMap::new();
            for (i, (op, k)) in ops.into_iter().enumerate() {
                let mut t = s.lock();
                match op {
                    0 => prop_assert_eq!(t.insert(key(k), i as u32), model.insert(k, i as u32)),
                    1 => prop_assert_eq!(t.remove(&key(k)), model.remove(&k)),
                    _ => prop_assert_eq!(t.get(&key(k)), model.get(&k).copied()),
                }
                s.publish(&mut t);
                prop_assert_eq!(t.len(), model.len());
            }
            let t = s.lock();
            for (k, id) in &model {
                prop_assert_eq!(t.get(&key(*k)), Some(*id));
            }
        }
    }
}
