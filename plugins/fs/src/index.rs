//! The in-memory index of stored chunks: metadata, pins, LRU order and capacity accounting.
//!
//! Keyed by `key_hash`; each entry keeps its canonical key, so a lookup with a different key of the same
//! hash is a miss. Capacity is reserved before a chunk is written (evicting least recently used,
//! unpinned entries) and charged when it is committed, so concurrent puts never overshoot it.

use kvhost_plugin_sdk::{ChunkMeta, Status};
use std::collections::{BTreeMap, HashMap};

/// One stored chunk.
#[derive(Clone, Debug)]
pub struct Entry {
    /// Canonical key.
    pub canonical: Box<str>,
    /// Stored metadata.
    pub meta: ChunkMeta,
    /// Where the data starts in the file.
    pub data_offset: u64,
    /// True data length.
    pub data_len: u64,
    /// Bytes charged against the capacity.
    pub charge: u64,
    /// Position in the LRU order (larger is more recent).
    tick: u64,
    /// Pin count.
    pub pins: u32,
    /// Unique per committed file: tells a later reader whether the entry is still the one it read.
    pub gen: u64,
    /// The data checksum is known good: the chunk was written by this process, or read and verified.
    pub verified: bool,
}

/// What a committed put brings: everything but the bookkeeping fields.
#[derive(Clone, Debug)]
pub struct NewEntry {
    /// Canonical key.
    pub canonical: Box<str>,
    /// Stored metadata.
    pub meta: ChunkMeta,
    /// Where the data starts.
    pub data_offset: u64,
    /// True data length.
    pub data_len: u64,
    /// Bytes charged.
    pub charge: u64,
}

/// A chunk dropped from the index whose file must be unlinked.
#[derive(Clone, Debug)]
pub struct Victim {
    /// Its hash.
    pub key_hash: u64,
    /// Its canonical key (for the file name).
    pub canonical: Box<str>,
}

/// Why a reservation failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NoSpace {
    /// The chunk is larger than the whole capacity.
    TooLarge,
    /// Pinned chunks and puts in flight leave too little room.
    Pinned,
}

/// The index. Not synchronised: the store wraps it in a mutex.
#[derive(Debug)]
pub struct Index {
    map: HashMap<u64, Entry>,
    lru: BTreeMap<u64, u64>,
    next_tick: u64,
    next_gen: u64,
    capacity: u64,
    used: u64,
    reserved: u64,
    pinned: u64,
    evictions: u64,
}

impl Index {
    /// An empty index of `capacity` bytes.
    pub fn new(capacity: u64) -> Index {
        Index {
            map: HashMap::new(),
            lru: BTreeMap::new(),
            next_tick: 0,
            next_gen: 1,
            capacity,
            used: 0,
            reserved: 0,
            pinned: 0,
            evictions: 0,
        }
    }

    /// Number of chunks.
    pub fn len(&self) -> usize {
        self.map.len()
    }
    /// Bytes charged by committed chunks.
    pub fn used(&self) -> u64 {
        self.used
    }
    /// Bytes reserved by puts in flight.
    pub fn reserved(&self) -> u64 {
        self.reserved
    }
    /// Bytes charged by pinned chunks.
    pub fn pinned(&self) -> u64 {
        self.pinned
    }
    /// Chunks evicted so far.
    pub fn evictions(&self) -> u64 {
        self.evictions
    }

    fn bump(&mut self) -> u64 {
        self.next_tick += 1;
        self.next_tick
    }

    /// The entry of `key_hash` if it is stored under `canonical`; a hit is made most recent when
    /// `touch`.
    pub fn lookup(&mut self, key_hash: u64, canonical: &str, touch: bool) -> Option<&mut Entry> {
        let matches = self
            .map
            .get(&key_hash)
            .is_some_and(|e| &*e.canonical == canonical);
        if !matches {
            return None;
        }
        if touch {
            let tick = self.bump();
            let e = self.map.get_mut(&key_hash)?;
            self.lru.remove(&e.tick);
            e.tick = tick;
            self.lru.insert(tick, key_hash);
        }
        self.map.get_mut(&key_hash)
    }

    /// The canonical key stored under `key_hash`, if any.
    pub fn canonical_of(&self, key_hash: u64) -> Option<&str> {
        self.map.get(&key_hash).map(|e| &*e.canonical)
    }

    /// Reserve `charge` bytes for a put, evicting least recently used unpinned chunks as needed. The
    /// victims are returned (already out of the index) for their files to be unlinked.
    pub fn reserve(&mut self, charge: u64) -> Result<Vec<Victim>, NoSpace> {
        if charge > self.capacity {
            return Err(NoSpace::TooLarge);
        }
        let room = self
            .capacity
            .saturating_sub(self.pinned)
            .saturating_sub(self.reserved);
        if charge > room {
            return Err(NoSpace::Pinned);
        }
        let mut victims = Vec::new();
        while self.used + self.reserved + charge > self.capacity {
            let Some(v) = self.evict_one() else {
                // Unreachable: the room check above guarantees enough unpinned bytes.
                break;
            };
            victims.push(v);
        }
        if self.used + self.reserved + charge > self.capacity {
            return Err(NoSpace::Pinned);
        }
        self.reserved += charge;
        Ok(victims)
    }

    fn evict_one(&mut self) -> Option<Victim> {
        let hash = self
            .lru
            .values()
            .copied()
            .find(|h| self.map.get(h).is_some_and(|e| e.pins == 0))?;
        let e = self.take(hash)?;
        self.evictions += 1;
        Some(Victim {
            key_hash: hash,
            canonical: e.canonical,
        })
    }

    /// Evict until the committed chunks fit the capacity (after a restart with a smaller one).
    pub fn evict_to_fit(&mut self) -> Vec<Victim> {
        let mut victims = Vec::new();
        while self.used + self.reserved > self.capacity {
            match self.evict_one() {
                Some(v) => victims.push(v),
                None => break,
            }
        }
        victims
    }

    /// Give back a reservation whose put failed.
    pub fn unreserve(&mut self, charge: u64) {
        self.reserved = self.reserved.saturating_sub(charge);
    }

    /// Commit a put that reserved `new.charge` bytes: the chunk becomes the most recent entry. An entry
    /// of the same key is replaced and its pins kept; an entry of another key with the same hash is
    /// replaced and returned, for its file to be unlinked. Its data counts as verified.
    pub fn commit(&mut self, key_hash: u64, new: NewEntry) -> Option<Victim> {
        self.unreserve(new.charge);
        self.insert(key_hash, new, true)
    }

    /// Insert an entry without a reservation (the start-up scan: not `verified`).
    pub fn insert(&mut self, key_hash: u64, new: NewEntry, verified: bool) -> Option<Victim> {
        let mut pins = 0;
        let mut other = None;
        if let Some(old) = self.take(key_hash) {
            if old.canonical == new.canonical {
                pins = old.pins;
            } else {
                other = Some(Victim {
                    key_hash,
                    canonical: old.canonical,
                });
            }
        }
        let tick = self.bump();
        let gen = self.next_gen;
        self.next_gen += 1;
        self.used += new.charge;
        if pins > 0 {
            self.pinned += new.charge;
        }
        self.lru.insert(tick, key_hash);
        self.map.insert(
            key_hash,
            Entry {
                canonical: new.canonical,
                meta: new.meta,
                data_offset: new.data_offset,
                data_len: new.data_len,
                charge: new.charge,
                tick,
                pins,
                gen,
                verified,
            },
        );
        other
    }

    /// Drop an entry from every structure.
    fn take(&mut self, key_hash: u64) -> Option<Entry> {
        let e = self.map.remove(&key_hash)?;
        self.lru.remove(&e.tick);
        self.used -= e.charge;
        if e.pins > 0 {
            self.pinned -= e.charge;
        }
        Some(e)
    }

    /// Remove the chunk of `canonical`: `NOT_FOUND` if absent, `BUSY` if pinned and not `force`.
    pub fn remove(&mut self, key_hash: u64, canonical: &str, force: bool) -> Result<Entry, Status> {
        match self.map.get(&key_hash) {
            Some(e) if &*e.canonical == canonical => {
                if e.pins > 0 && !force {
                    return Err(Status::BUSY);
                }
            }
            _ => return Err(Status::NOT_FOUND),
        }
        self.take(key_hash).ok_or(Status::NOT_FOUND)
    }

    /// Record that generation `gen` of `key_hash` passed its data checksum.
    pub fn set_verified(&mut self, key_hash: u64, gen: u64) {
        if let Some(e) = self.map.get_mut(&key_hash) {
            if e.gen == gen {
                e.verified = true;
            }
        }
    }

    /// Remove the entry of `key_hash` only if it is still generation `gen`.
    pub fn remove_if_gen(&mut self, key_hash: u64, gen: u64) -> Option<Entry> {
        if self.map.get(&key_hash)?.gen != gen {
            return None;
        }
        self.take(key_hash)
    }

    /// Pin the chunk of `canonical` once more.
    pub fn pin(&mut self, key_hash: u64, canonical: &str) -> Status {
        let Some(e) = self.lookup(key_hash, canonical, false) else {
            return Status::NOT_FOUND;
        };
        let Some(n) = e.pins.checked_add(1) else {
            return Status::INVALID_ARG;
        };
        e.pins = n;
        let charge = e.charge;
        if n == 1 {
            self.pinned += charge;
        }
        Status::OK
    }

    /// Undo one pin: `INVALID_ARG` when the chunk is not pinned.
    pub fn unpin(&mut self, key_hash: u64, canonical: &str) -> Status {
        let Some(e) = self.lookup(key_hash, canonical, false) else {
            return Status::NOT_FOUND;
        };
        if e.pins == 0 {
            return Status::INVALID_ARG;
        }
        e.pins -= 1;
        let (pins, charge) = (e.pins, e.charge);
        if pins == 0 {
            self.pinned -= charge;
        }
        Status::OK
    }

    /// Drop every entry (pinned ones too); reservations of puts in flight stay.
    pub fn clear(&mut self) -> usize {
        let n = self.map.len();
        self.map.clear();
        self.lru.clear();
        self.used = 0;
        self.pinned = 0;
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn new(c: &str, charge: u64) -> NewEntry {
        NewEntry {
            canonical: c.into(),
            meta: ChunkMeta::default(),
            data_offset: 4096,
            data_len: charge - 4096,
            charge,
        }
    }

    fn put(ix: &mut Index, h: u64, c: &str, charge: u64) -> Result<Vec<u64>, NoSpace> {
        let v = ix.reserve(charge)?;
        ix.commit(h, new(c, charge));
        Ok(v.into_iter().map(|v| v.key_hash).collect())
    }

    #[test]
    fn lru_eviction_with_touch_and_pins() {
        let mut ix = Index::new(4 * 8192);
        for h in 0..4 {
            assert_eq!(put(&mut ix, h, &format!("k{h}"), 8192), Ok(vec![]));
        }
        assert!(ix.lookup(0, "k0", true).is_some());
        assert_eq!(ix.pin(1, "k1"), Status::OK);
        assert_eq!(put(&mut ix, 9, "k9", 8192), Ok(vec![2]));
        assert_eq!(put(&mut ix, 10, "k10", 16384), Ok(vec![3, 0]));
        assert_eq!(ix.used(), 4 * 8192);
        assert_eq!(ix.pinned(), 8192);
        assert_eq!(ix.reserve(5 * 8192).unwrap_err(), NoSpace::TooLarge);
        assert_eq!(ix.pin(9, "k9"), Status::OK);
        assert_eq!(ix.pin(10, "k10"), Status::OK);
        assert_eq!(ix.reserve(8192).unwrap_err(), NoSpace::Pinned);
        assert_eq!(ix.remove(1, "k1", false).unwrap_err(), Status::BUSY);
        assert_eq!(ix.unpin(1, "k1"), Status::OK);
        assert_eq!(ix.unpin(1, "k1"), Status::INVALID_ARG);
        assert_eq!(put(&mut ix, 11, "k11", 8192), Ok(vec![1]));
        assert_eq!(ix.lookup(11, "other", true).map(|e| e.gen), None);
    }

    #[test]
    fn replacement_keeps_pins_and_accounting() {
        let mut ix = Index::new(1 << 20);
        put(&mut ix, 1, "a", 8192).unwrap();
        assert_eq!(ix.pin(1, "a"), Status::OK);
        put(&mut ix, 1, "a", 16384).unwrap();
        assert_eq!(ix.used(), 16384);
        assert_eq!(ix.pinned(), 16384);
        let v = ix.reserve(8192).unwrap();
        assert!(v.is_empty());
        let other = ix.commit(1, new("b", 8192));
        assert_eq!(other.map(|v| v.canonical), Some("a".into()));
        assert_eq!((ix.used(), ix.pinned(), ix.reserved()), (8192, 0, 0));
    }
}
