//! Eviction policies over entry ids (LMCache's `cache_policy`): LRU, FIFO, LFU, MRU and S3-FIFO.
//!
//! A policy only orders the ids of the cache's entry table; it never frees anything. Every structure is
//! an array indexed by id (or bucket), sized once from the entry capacity: no operation allocates.

use std::fmt;
use std::str::FromStr;

/// End of a list.
const NIL: u32 = u32::MAX;

/// An eviction policy, as named by LMCache's `cache_policy` (case-insensitive).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PolicyKind {
    /// Evict the least recently used entry (the default).
    #[default]
    Lru,
    /// Evict the oldest entry, whatever its hits.
    Fifo,
    /// Evict the least frequently used entry; the least recently used among equals.
    Lfu,
    /// Evict the most recently used entry.
    Mru,
    /// S3-FIFO (Yang et al., SOSP'23): a small probationary FIFO, a main FIFO and a ghost of keys
    /// recently evicted from the small one.
    S3Fifo,
}

impl PolicyKind {
    /// LMCache's name for the policy.
    pub fn name(self) -> &'static str {
        match self {
            Self::Lru => "LRU",
            Self::Fifo => "FIFO",
            Self::Lfu => "LFU",
            Self::Mru => "MRU",
            Self::S3Fifo => "S3FIFO",
        }
    }
}

impl fmt::Display for PolicyKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A `cache_policy` name that is not one of the accepted ones.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown cache policy `{0}`: expected LRU, FIFO, LFU, MRU or S3FIFO (also S3-FIFO; any case)"
)]
pub struct ParsePolicyError(pub String);

impl FromStr for PolicyKind {
    type Err = ParsePolicyError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        const NAMES: [(&str, PolicyKind); 6] = [
            ("LRU", PolicyKind::Lru),
            ("FIFO", PolicyKind::Fifo),
            ("LFU", PolicyKind::Lfu),
            ("MRU", PolicyKind::Mru),
            ("S3FIFO", PolicyKind::S3Fifo),
            ("S3-FIFO", PolicyKind::S3Fifo),
        ];
        NAMES
            .iter()
            .find(|(name, _)| name.eq_ignore_ascii_case(s))
            .map(|&(_, kind)| kind)
            .ok_or_else(|| ParsePolicyError(s.to_string()))
    }
}

/// The eviction order of a cache's entries, identified by `u32` ids below a capacity fixed at
/// construction.
#[derive(Debug)]
pub struct Policy {
    kind: PolicyKind,
    imp: Imp,
}

#[derive(Debug)]
enum Imp {
    Recency(Recency),
    Lfu(Lfu),
    S3Fifo(S3Fifo),
}

impl Policy {
    /// A policy for ids `0..max_entries`, with every structure sized for that many entries.
    ///
    /// # Panics
    /// If `max_entries` exceeds `u32::MAX`.
    pub fn new(kind: PolicyKind, max_entries: usize) -> Self {
        assert!(
            max_entries <= NIL as usize,
            "{max_entries} entries do not fit u32 ids"
        );
        let imp = match kind {
            PolicyKind::Lru => Imp::Recency(Recency::new(max_entries, true, false)),
            PolicyKind::Fifo => Imp::Recency(Recency::new(max_entries, false, false)),
            PolicyKind::Mru => Imp::Recency(Recency::new(max_entries, true, true)),
            PolicyKind::Lfu => Imp::Lfu(Lfu::new(max_entries)),
            PolicyKind::S3Fifo => Imp::S3Fifo(S3Fifo::new(max_entries)),
        };
        Self { kind, imp }
    }

    /// Which policy this is.
    pub fn kind(&self) -> PolicyKind {
        self.kind
    }

    /// A new entry. `key_hash` identifies its key across evictions (S3-FIFO's ghost remembers it).
    ///
    /// # Panics
    /// If `id` is out of range or already present.
    pub fn insert(&mut self, id: u32, key_hash: u64) {
        assert!(
            (id as usize) < self.capacity() && !self.contains(id),
            "policy insert of id {id}: out of range or already present"
        );
        match &mut self.imp {
            Imp::Recency(p) => p.insert(id),
            Imp::Lfu(p) => p.insert(id),
            Imp::S3Fifo(p) => p.insert(id, key_hash),
        }
    }

    /// A hit on `id`: LRU and MRU make it the most recent, LFU counts it, S3-FIFO counts it up to 3,
    /// FIFO ignores it. A no-op for an absent id.
    pub fn touch(&mut self, id: u32) {
        if !self.contains(id) {
            return;
        }
        match &mut self.imp {
            Imp::Recency(p) => p.touch(id),
            Imp::Lfu(p) => p.touch(id),
            Imp::S3Fifo(p) => p.touch(id),
        }
    }

    /// `id` left the cache (explicitly, or after [`Policy::victim`] chose it). A no-op for an absent id.
    pub fn remove(&mut self, id: u32) {
        if !self.contains(id) {
            return;
        }
        match &mut self.imp {
            Imp::Recency(p) => p.remove(id),
            Imp::Lfu(p) => p.remove(id),
            Imp::S3Fifo(p) => p.remove(id),
        }
    }

    /// Choose a victim: the first id in eviction order for which `evictable(id)` is true, calling
    /// `evictable` at most `max_scan` times; `None` if none is found. Does not remove the id: the caller
    /// calls [`Policy::remove`] once it is evicted.
    ///
    /// O(1) when the first candidate is evictable. S3-FIFO moves entries between and within its queues
    /// as it goes (that is its eviction algorithm; the moves are bounded by the hit counters, and do not
    /// count against `max_scan`) but never loses an id. Every policy finds a victim whenever fewer than
    /// `max_scan` ids are non-evictable and one is evictable.
    pub fn victim(&mut self, evictable: impl FnMut(u32) -> bool, max_scan: usize) -> Option<u32> {
        match &mut self.imp {
            Imp::Recency(p) => p.victim(evictable, max_scan),
            Imp::Lfu(p) => p.victim(evictable, max_scan),
            Imp::S3Fifo(p) => p.victim(evictable, max_scan),
        }
    }

    /// Number of ids present.
    pub fn len(&self) -> usize {
        match &self.imp {
            Imp::Recency(p) => p.list.len as usize,
            Imp::Lfu(p) => p.len as usize,
            Imp::S3Fifo(p) => (p.small.len + p.main.len) as usize,
        }
    }

    /// Whether no id is present.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether `id` is present (false for an id out of range).
    pub fn contains(&self, id: u32) -> bool {
        let i = id as usize;
        match &self.imp {
            Imp::Recency(p) => p.linked.get(i).copied().unwrap_or(false),
            Imp::Lfu(p) => p.bucket_of.get(i).is_some_and(|&b| b != NIL),
            Imp::S3Fifo(p) => p.queue.get(i).is_some_and(|&q| q != Queue::None),
        }
    }

    fn capacity(&self) -> usize {
        match &self.imp {
            Imp::Recency(p) => p.linked.len(),
            Imp::Lfu(p) => p.bucket_of.len(),
            Imp::S3Fifo(p) => p.queue.len(),
        }
    }
}

/// A doubly linked list threaded through [`Links`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct List {
    head: u32,
    tail: u32,
    len: u32,
}

impl List {
    const EMPTY: Self = Self {
        head: NIL,
        tail: NIL,
        len: 0,
    };
}

/// Intrusive links for lists of indices below a fixed bound; an index is on at most one list at a time.
#[derive(Debug)]
struct Links {
    prev: Vec<u32>,
    next: Vec<u32>,
}

impl Links {
    fn new(n: usize) -> Self {
        Self {
            prev: vec![NIL; n],
            next: vec![NIL; n],
        }
    }

    fn next(&self, i: u32) -> u32 {
        self.next[i as usize]
    }

    fn prev(&self, i: u32) -> u32 {
        self.prev[i as usize]
    }

    /// The element after `cur` in `list`, or its head when `cur` is NIL.
    fn after(&self, list: &List, cur: u32) -> u32 {
        if cur == NIL {
            list.head
        } else {
            self.next(cur)
        }
    }

    /// Links `i` after `at` (at the front when `at` is NIL).
    fn insert_after(&mut self, list: &mut List, at: u32, i: u32) {
        let next = self.after(list, at);
        self.prev[i as usize] = at;
        self.next[i as usize] = next;
        if at == NIL {
            list.head = i;
        } else {
            self.next[at as usize] = i;
        }
        if next == NIL {
            list.tail = i;
        } else {
            self.prev[next as usize] = i;
        }
        list.len += 1;
    }

    fn push_back(&mut self, list: &mut List, i: u32) {
        self.insert_after(list, list.tail, i);
    }

    fn unlink(&mut self, list: &mut List, i: u32) {
        let (prev, next) = (self.prev(i), self.next(i));
        if prev == NIL {
            list.head = next;
        } else {
            self.next[prev as usize] = next;
        }
        if next == NIL {
            list.tail = prev;
        } else {
            self.prev[next as usize] = prev;
        }
        list.len -= 1;
    }
}

/// LRU, FIFO and MRU: one list, oldest first, newest (inserted or, unless FIFO, touched) last.
#[derive(Debug)]
struct Recency {
    links: Links,
    list: List,
    linked: Vec<bool>,
    /// LRU, MRU: a hit makes the entry the newest.
    move_on_touch: bool,
    /// MRU: evict from the newest end.
    evict_newest: bool,
}

impl Recency {
    fn new(n: usize, move_on_touch: bool, evict_newest: bool) -> Self {
        Self {
            links: Links::new(n),
            list: List::EMPTY,
            linked: vec![false; n],
            move_on_touch,
            evict_newest,
        }
    }

    fn insert(&mut self, id: u32) {
        self.links.push_back(&mut self.list, id);
        self.linked[id as usize] = true;
    }

    fn touch(&mut self, id: u32) {
        if self.move_on_touch && self.list.tail != id {
            self.links.unlink(&mut self.list, id);
            self.links.push_back(&mut self.list, id);
        }
    }

    fn remove(&mut self, id: u32) {
        self.links.unlink(&mut self.list, id);
        self.linked[id as usize] = false;
    }

    fn victim(&self, mut evictable: impl FnMut(u32) -> bool, max_scan: usize) -> Option<u32> {
        let (mut id, step): (u32, fn(&Links, u32) -> u32) = if self.evict_newest {
            (self.list.tail, Links::prev)
        } else {
            (self.list.head, Links::next)
        };
        for _ in 0..max_scan {
            if id == NIL {
                break;
            }
            if evictable(id) {
                return Some(id);
            }
            id = step(&self.links, id);
        }
        None
    }
}

/// O(1) LFU: a list of frequency buckets in increasing frequency, each a list of its entries, least
/// recently touched first.
#[derive(Debug)]
struct Lfu {
    items: Links,
    /// Each entry's bucket, NIL when absent.
    bucket_of: Vec<u32>,
    buckets: Links,
    /// The non-empty buckets, lowest frequency first.
    order: List,
    freq: Vec<u32>,
    members: Vec<List>,
    /// Bucket slots not in `order`. Every bucket in use is non-empty, so `n` slots always suffice.
    spare: Vec<u32>,
    len: u32,
}

impl Lfu {
    fn new(n: usize) -> Self {
        Self {
            items: Links::new(n),
            bucket_of: vec![NIL; n],
            buckets: Links::new(n),
            order: List::EMPTY,
            freq: vec![0; n],
            members: vec![List::EMPTY; n],
            spare: (0..n as u32).rev().collect(),
            len: 0,
        }
    }

    fn insert(&mut self, id: u32) {
        let first = self.order.head;
        let bucket = if first != NIL && self.freq[first as usize] == 1 {
            first
        } else {
            self.new_bucket(NIL, 1)
        };
        self.items.push_back(&mut self.members[bucket as usize], id);
        self.bucket_of[id as usize] = bucket;
        self.len += 1;
    }

    fn touch(&mut self, id: u32) {
        let from = self.bucket_of[id as usize];
        let freq = self.freq[from as usize];
        let next = self.buckets.next(from);
        let to = if freq == u32::MAX {
            from // saturated: only its recency changes
        } else if next != NIL && self.freq[next as usize] == freq + 1 {
            next
        } else if self.members[from as usize].len == 1 {
            // Alone in its bucket, and no bucket for freq + 1: the bucket itself moves up.
            self.freq[from as usize] = freq + 1;
            return;
        } else {
            self.new_bucket(from, freq + 1)
        };
        self.items.unlink(&mut self.members[from as usize], id);
        self.items.push_back(&mut self.members[to as usize], id);
        self.bucket_of[id as usize] = to;
        self.release_if_empty(from);
    }

    fn remove(&mut self, id: u32) {
        let bucket = self.bucket_of[id as usize];
        self.items.unlink(&mut self.members[bucket as usize], id);
        self.bucket_of[id as usize] = NIL;
        self.len -= 1;
        self.release_if_empty(bucket);
    }

    fn victim(&self, mut evictable: impl FnMut(u32) -> bool, mut max_scan: usize) -> Option<u32> {
        let mut bucket = self.order.head;
        while bucket != NIL {
            let mut id = self.members[bucket as usize].head;
            while id != NIL {
                if max_scan == 0 {
                    return None;
                }
                max_scan -= 1;
                if evictable(id) {
                    return Some(id);
                }
                id = self.items.next(id);
            }
            bucket = self.buckets.next(bucket);
        }
        None
    }

    /// A new, empty bucket of frequency `freq` after bucket `at` (first when `at` is NIL).
    fn new_bucket(&mut self, at: u32, freq: u32) -> u32 {
        let bucket = self.spare.pop().expect("at most one bucket per entry");
        self.freq[bucket as usize] = freq;
        self.members[bucket as usize] = List::EMPTY;
        self.buckets.insert_after(&mut self.order, at, bucket);
        bucket
    }

    fn release_if_empty(&mut self, bucket: u32) {
        if self.members[bucket as usize].len == 0 {
            self.buckets.unlink(&mut self.order, bucket);
            self.spare.push(bucket);
        }
    }
}

/// Where an S3-FIFO entry is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Queue {
    None,
    Small,
    Main,
}

/// The small queue's share of the entries: evictions come from it while it holds at least this many
/// percent of them (the paper's 10%).
const SMALL_PERCENT: usize = 10;
/// The 2-bit hit counter's ceiling.
const MAX_FREQ: u8 = 3;

/// S3-FIFO: new keys go to the small FIFO, keys the ghost remembers straight to the main FIFO. Evicting
/// from the small FIFO promotes entries hit since insertion to main (clearing their counter) and
/// evicts the rest, whose key hashes go to the ghost; evicting from main reinserts entries with a
/// non-zero counter after decrementing it.
#[derive(Debug)]
struct S3Fifo {
    links: Links,
    small: List,
    main: List,
    queue: Vec<Queue>,
    freq: Vec<u8>,
    key_hash: Vec<u64>,
    ghost: Ghost,
    /// The last victim chosen from the small queue: its removal is an eviction, so its key is a ghost.
    pending: u32,
}

impl S3Fifo {
    fn new(n: usize) -> Self {
        // The ghost remembers as many keys as the main queue's share of the entries.
        let ghost = Ghost::new((n - n * SMALL_PERCENT / 100).max(1));
        Self {
            links: Links::new(n),
            small: List::EMPTY,
            main: List::EMPTY,
            queue: vec![Queue::None; n],
            freq: vec![0; n],
            key_hash: vec![0; n],
            ghost,
            pending: NIL,
        }
    }

    fn insert(&mut self, id: u32, key_hash: u64) {
        let i = id as usize;
        self.key_hash[i] = key_hash;
        self.freq[i] = 0;
        if self.ghost.take(key_hash) {
            self.links.push_back(&mut self.main, id);
            self.queue[i] = Queue::Main;
        } else {
            self.links.push_back(&mut self.small, id);
            self.queue[i] = Queue::Small;
        }
    }

    fn touch(&mut self, id: u32) {
        let freq = &mut self.freq[id as usize];
        *freq = (*freq + 1).min(MAX_FREQ);
    }

    fn remove(&mut self, id: u32) {
        let i = id as usize;
        match self.queue[i] {
            Queue::Small => {
                self.links.unlink(&mut self.small, id);
                if self.pending == id {
                    self.ghost.push(self.key_hash[i]);
                }
            }
            Queue::Main => self.links.unlink(&mut self.main, id),
            Queue::None => unreachable!("Policy::remove checks presence"),
        }
        self.queue[i] = Queue::None;
        if self.pending == id {
            self.pending = NIL;
        }
    }

    /// Walks both queues from their heads with a cursor each (the last entry passed over, NIL before the
    /// first), so a non-evictable entry keeps its place and is passed over once. Entries moved to the
    /// tail of main are met again; entries behind a cursor never move, so with both cursors at the end
    /// every entry was passed over.
    fn victim(&mut self, mut evictable: impl FnMut(u32) -> bool, max_scan: usize) -> Option<u32> {
        self.pending = NIL;
        let len = (self.small.len + self.main.len) as usize;
        let small_first = self.small.len as usize * 100 >= len * SMALL_PERCENT;
        let (mut small_at, mut main_at) = (NIL, NIL);
        let mut scanned = 0;
        while scanned < max_scan {
            let s = self.links.after(&self.small, small_at);
            let m = self.links.after(&self.main, main_at);
            let from_small = match (s != NIL, m != NIL) {
                (false, false) => return None,
                (true, true) => small_first,
                (from_small, _) => from_small,
            };
            if from_small {
                let i = s as usize;
                if self.freq[i] > 0 {
                    // Hit since insertion: promote, its hits spent on the promotion.
                    self.freq[i] = 0;
                    self.links.unlink(&mut self.small, s);
                    self.links.push_back(&mut self.main, s);
                    self.queue[i] = Queue::Main;
                    continue;
                }
                scanned += 1;
                if evictable(s) {
                    self.pending = s;
                    return Some(s);
                }
                small_at = s;
            } else {
                let i = m as usize;
                if self.freq[i] > 0 {
                    self.freq[i] -= 1;
                    self.links.unlink(&mut self.main, m);
                    self.links.push_back(&mut self.main, m);
                    continue;
                }
                scanned += 1;
                if evictable(m) {
                    return Some(m);
                }
                main_at = m;
            }
        }
        None
    }
}

/// A bounded FIFO set of key hashes: the last `capacity` pushed, less those taken since.
///
/// A ring holds the pushes in order; an open-addressing table (linear probing, at most half full) maps
/// each hash to the stamp of its latest push, so a hash aging out of the ring leaves the table only if
/// it was not pushed again since.
#[derive(Debug)]
struct Ghost {
    ring: Vec<u64>,
    pushes: u64,
    slots: Vec<Slot>,
    shift: u32,
}

#[derive(Clone, Copy, Debug)]
struct Slot {
    hash: u64,
    /// 1 + the push number; 0 for an empty slot.
    stamp: u64,
}

impl Slot {
    const EMPTY: Self = Self { hash: 0, stamp: 0 };
}

impl Ghost {
    fn new(capacity: usize) -> Self {
        let slots = (2 * capacity).next_power_of_two().max(2);
        Self {
            ring: vec![0; capacity],
            pushes: 0,
            slots: vec![Slot::EMPTY; slots],
            shift: u64::BITS - slots.trailing_zeros(),
        }
    }

    fn mask(&self) -> usize {
        self.slots.len() - 1
    }

    /// Fibonacci hashing: spreads hashes that differ only in their high bits.
    fn home(&self, hash: u64) -> usize {
        (hash.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> self.shift) as usize
    }

    fn find(&self, hash: u64) -> Option<usize> {
        let mut i = self.home(hash);
        loop {
            let slot = self.slots[i];
            if slot.stamp == 0 {
                return None;
            }
            if slot.hash == hash {
                return Some(i);
            }
            i = (i + 1) & self.mask();
        }
    }

    /// Whether `hash` is in the set; if so, it leaves it.
    fn take(&mut self, hash: u64) -> bool {
        let found = self.find(hash);
        if let Some(i) = found {
            self.delete(i);
        }
        found.is_some()
    }

    fn push(&mut self, hash: u64) {
        let capacity = self.ring.len() as u64;
        if self.pushes >= capacity {
            let oldest = self.pushes - capacity;
            let old = self.ring[(oldest % capacity) as usize];
            if let Some(i) = self
                .find(old)
                .filter(|&i| self.slots[i].stamp == oldest + 1)
            {
                self.delete(i);
            }
        }
        self.ring[(self.pushes % capacity) as usize] = hash;
        let slot = Slot {
            hash,
            stamp: self.pushes + 1,
        };
        let mut i = self.home(hash);
        while self.slots[i].stamp != 0 && self.slots[i].hash != hash {
            i = (i + 1) & self.mask();
        }
        self.slots[i] = slot;
        self.pushes += 1;
    }

    /// Backward-shift deletion: later entries of the probe run move into the hole when their home
    /// allows, so lookups never need tombstones.
    fn delete(&mut self, mut hole: usize) {
        let mask = self.mask();
        let mut i = hole;
        loop {
            i = (i + 1) & mask;
            let slot = self.slots[i];
            if slot.stamp == 0 {
                break;
            }
            let home = self.home(slot.hash);
            if i.wrapping_sub(home) & mask >= i.wrapping_sub(hole) & mask {
                self.slots[hole] = slot;
                hole = i;
            }
        }
        self.slots[hole] = Slot::EMPTY;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::{HashMap, VecDeque};

    const ALL: [PolicyKind; 5] = [
        PolicyKind::Lru,
        PolicyKind::Fifo,
        PolicyKind::Lfu,
        PolicyKind::Mru,
        PolicyKind::S3Fifo,
    ];

    fn walk(links: &Links, list: &List) -> Vec<u32> {
        let (mut out, mut cur, mut prev) = (Vec::new(), list.head, NIL);
        while cur != NIL {
            assert_eq!(links.prev(cur), prev, "broken back link at {cur}");
            out.push(cur);
            (prev, cur) = (cur, links.next(cur));
        }
        assert_eq!((list.tail, out.len()), (prev, list.len as usize));
        out
    }

    /// The eviction order (for S3-FIFO: the small queue, then main), with the links checked.
    fn order(p: &Policy) -> Vec<u32> {
        match &p.imp {
            Imp::Recency(r) => {
                let mut ids = walk(&r.links, &r.list);
                if r.evict_newest {
                    ids.reverse();
                }
                ids
            }
            Imp::Lfu(l) => {
                let mut ids = Vec::new();
                let mut last_freq = 0;
                for b in walk(&l.buckets, &l.order) {
                    assert!(l.freq[b as usize] > last_freq, "buckets out of order");
                    last_freq = l.freq[b as usize];
                    let members = walk(&l.items, &l.members[b as usize]);
                    assert!(!members.is_empty(), "empty bucket in use");
                    assert!(members.iter().all(|&id| l.bucket_of[id as usize] == b));
                    ids.extend(members);
                }
                assert_eq!(l.spare.len() + l.order.len as usize, l.freq.len());
                ids
            }
            Imp::S3Fifo(s) => {
                let (small, main) = s3_queues(p);
                assert!(small.iter().all(|&id| s.queue[id as usize] == Queue::Small));
                assert!(main.iter().all(|&id| s.queue[id as usize] == Queue::Main));
                small.into_iter().chain(main).collect()
            }
        }
    }

    fn s3_queues(p: &Policy) -> (Vec<u32>, Vec<u32>) {
        let Imp::S3Fifo(s) = &p.imp else {
            panic!("not S3-FIFO")
        };
        (walk(&s.links, &s.small), walk(&s.links, &s.main))
    }

    fn evict(p: &mut Policy) -> Option<u32> {
        let id = p.victim(|_| true, usize::MAX)?;
        p.remove(id);
        Some(id)
    }

    #[test]
    fn parses_lmcache_names_in_any_case() {
        for (name, kind) in [
            ("LRU", PolicyKind::Lru),
            ("lru", PolicyKind::Lru),
            ("Fifo", PolicyKind::Fifo),
            ("lfu", PolicyKind::Lfu),
            ("MRU", PolicyKind::Mru),
            ("S3FIFO", PolicyKind::S3Fifo),
            ("s3-fifo", PolicyKind::S3Fifo),
        ] {
            assert_eq!(name.parse(), Ok(kind), "{name}");
        }
        for kind in ALL {
            assert_eq!(kind.to_string().parse(), Ok(kind));
        }
        let err = "ARC".parse::<PolicyKind>().unwrap_err();
        assert_eq!(err, ParsePolicyError("ARC".into()));
        assert!(
            err.to_string().contains("LRU, FIFO, LFU, MRU or S3FIFO"),
            "{err}"
        );
        assert_eq!(PolicyKind::default(), PolicyKind::Lru);
    }

    #[test]
    fn membership_and_len() {
        for kind in ALL {
            let mut p = Policy::new(kind, 8);
            assert_eq!(p.kind(), kind);
            assert!(p.is_empty() && !p.contains(3) && !p.contains(100));
            p.insert(3, 3);
            p.insert(5, 5);
            p.touch(3);
            p.touch(7); // absent: ignored
            assert_eq!((p.len(), p.contains(3), p.contains(5)), (2, true, true));
            p.remove(3);
            p.remove(3);
            p.remove(100);
            assert_eq!((p.len(), p.contains(3)), (1, false));
            assert_eq!(
                p.victim(|_| true, 0),
                None,
                "{kind}: max_scan 0 scans nothing"
            );
            assert_eq!(evict(&mut p), Some(5));
            assert_eq!(evict(&mut p), None);
            assert!(p.is_empty());
        }
    }

    #[test]
    #[should_panic(expected = "already present")]
    fn double_insert_panics() {
        let mut p = Policy::new(PolicyKind::Lru, 4);
        p.insert(1, 1);
        p.insert(1, 1);
    }

    /// Inserts 0..4, touches 0 twice and 2 once, then evicts everything.
    fn worked_example(kind: PolicyKind) -> Vec<u32> {
        let mut p = Policy::new(kind, 8);
        for id in 0..4 {
            p.insert(id, u64::from(id));
        }
        p.touch(0);
        p.touch(2);
        p.touch(0);
        std::iter::from_fn(|| evict(&mut p)).collect()
    }

    #[test]
    fn worked_examples() {
        assert_eq!(worked_example(PolicyKind::Lru), [1, 3, 2, 0]);
        assert_eq!(worked_example(PolicyKind::Fifo), [0, 1, 2, 3]);
        assert_eq!(worked_example(PolicyKind::Mru), [0, 2, 3, 1]);
        // Counts 3, 1, 2, 1: least frequent first, least recently used among equals.
        assert_eq!(worked_example(PolicyKind::Lfu), [1, 3, 2, 0]);
        // All four are in the small queue (>= 10%): 1 and 3 are evicted, 0 and 2 promoted on the way,
        // then main evicts them in promotion order (their counters were cleared by the promotion).
        assert_eq!(worked_example(PolicyKind::S3Fifo), [1, 3, 0, 2]);
    }

    #[test]
    fn lfu_orders_by_count_then_recency() {
        let mut p = Policy::new(PolicyKind::Lfu, 8);
        for id in 0..5 {
            p.insert(id, 0);
        }
        for id in [4, 4, 4, 3, 3, 1, 2, 2, 0] {
            p.touch(id);
        }
        // Counts: 0→2, 1→2, 2→3, 3→3, 4→4; among count 2, 1 was touched before 0.
        assert_eq!(order(&p), [1, 0, 3, 2, 4]);
        p.remove(3);
        p.insert(3, 0);
        assert_eq!(order(&p), [3, 1, 0, 2, 4]);
    }

    #[test]
    fn pinned_entries_are_skipped_within_max_scan() {
        for kind in ALL {
            let mut p = Policy::new(kind, 8);
            for id in 0..6 {
                p.insert(id, u64::from(id));
            }
            let first = order(&p)[0];
            assert_eq!(p.victim(|_| true, 1), Some(first), "{kind}");
            // Pin the first three in order: two scans are not enough, three are not, four are.
            let pinned: Vec<u32> = order(&p)[..3].to_vec();
            let evictable = |id| !pinned.contains(&id);
            assert_eq!(p.victim(evictable, 3), None, "{kind}");
            let victim = p.victim(evictable, 4);
            assert_eq!(victim, Some(order(&p)[3]), "{kind}");
            assert_eq!(p.victim(|_| false, usize::MAX), None, "{kind}");
            assert_eq!(p.len(), 6, "{kind}: victim removes nothing");
        }
    }

    #[test]
    fn s3fifo_one_hit_wonder_goes_to_the_ghost() {
        let mut p = Policy::new(PolicyKind::S3Fifo, 10);
        p.insert(0, 100);
        p.insert(1, 101);
        p.touch(1);
        assert_eq!(s3_queues(&p), (vec![0, 1], vec![]));
        assert_eq!(evict(&mut p), Some(0));
        // 0's key is now a ghost, so it comes back into main.
        p.insert(0, 100);
        assert_eq!(s3_queues(&p), (vec![1], vec![0]));
        // An explicit removal is not an eviction: no ghost.
        p.insert(2, 102);
        p.remove(2);
        p.insert(2, 102);
        assert_eq!(s3_queues(&p), (vec![1, 2], vec![0]));
        // The ghost entry was used up by the re-insertion.
        p.remove(0);
        p.insert(0, 100);
        assert_eq!(s3_queues(&p), (vec![1, 2, 0], vec![]));
    }

    #[test]
    fn s3fifo_main_reinserts_entries_with_hits() {
        let mut p = Policy::new(PolicyKind::S3Fifo, 100);
        for id in 0..3 {
            p.insert(id, id.into());
            p.touch(id);
        }
        p.insert(3, 3);
        assert_eq!(
            evict(&mut p),
            Some(3),
            "0..3 promoted, 3 evicted from small"
        );
        assert_eq!(s3_queues(&p), (vec![], vec![0, 1, 2]));
        p.touch(0);
        p.touch(0);
        p.touch(1);
        assert_eq!(evict(&mut p), Some(2));
        assert_eq!(s3_queues(&p), (vec![], vec![0, 1]));
        assert_eq!(evict(&mut p), Some(1));
        assert_eq!(evict(&mut p), Some(0));
    }

    /// Runs a cache of `slots` entries over `keys`; returns the keys resident at the end.
    fn simulate(kind: PolicyKind, slots: usize, keys: impl IntoIterator<Item = u64>) -> Vec<u64> {
        let mut p = Policy::new(kind, slots);
        let mut resident: HashMap<u64, u32> = HashMap::new();
        let mut free: Vec<u32> = (0..slots as u32).collect();
        for key in keys {
            if let Some(&id) = resident.get(&key) {
                p.touch(id);
                continue;
            }
            if free.is_empty() {
                let id = evict(&mut p).unwrap();
                resident.retain(|_, v| *v != id);
                free.push(id);
            }
            let id = free.pop().unwrap();
            p.insert(id, key);
            resident.insert(key, id);
        }
        let mut keys: Vec<u64> = resident.into_keys().collect();
        keys.sort_unstable();
        keys
    }

    #[test]
    fn s3fifo_resists_scans() {
        // Four hot keys hit between bursts of one-time keys, each burst as large as the cache.
        let mut trace = Vec::new();
        for round in 0..20u64 {
            trace.extend(0..4);
            trace.extend((0..20).map(|i| 1000 + round * 100 + i));
        }
        trace.extend(0..4);
        let hot = |kind| {
            simulate(kind, 20, trace.iter().copied())
                .into_iter()
                .filter(|&k| k < 4)
                .count()
        };
        assert_eq!(hot(PolicyKind::S3Fifo), 4);
        assert_eq!(hot(PolicyKind::Lru), 4, "hot keys were just re-inserted");
        // Without the trailing hits the scan flushed LRU's hot keys but not S3-FIFO's.
        let scanned = |kind| {
            simulate(kind, 20, trace[..trace.len() - 4].iter().copied())
                .into_iter()
                .filter(|&k| k < 4)
                .count()
        };
        assert_eq!(scanned(PolicyKind::S3Fifo), 4);
        assert_eq!(scanned(PolicyKind::Lru), 0);
    }

    #[test]
    fn ghost_is_a_bounded_fifo_set() {
        let mut g = Ghost::new(3);
        for h in [1, 2, 3] {
            g.push(h);
        }
        g.push(4); // 1 ages out
        assert!(!g.take(1));
        assert!(g.take(2));
        assert!(!g.take(2));
        g.push(3); // 3 again: its first push aging out must not forget it
        g.push(5);
        g.push(6);
        assert!(g.take(3));
        assert!(!g.take(4));
    }

    #[derive(Clone, Debug)]
    enum Op {
        Insert(u32, u64),
        Touch(u32),
        Remove(u32),
        Pin(u32),
        Victim(usize),
        /// Victim then remove, as the cache evicts.
        Evict(usize),
    }

    const IDS: u32 = 12;

    fn ops() -> impl Strategy<Value = Vec<Op>> {
        let id = 0..IDS;
        let scan = prop_oneof![1..4usize, Just(usize::MAX)];
        let op = prop_oneof![
            4 => (id.clone(), 0..20u64).prop_map(|(id, h)| Op::Insert(id, h)),
            4 => id.clone().prop_map(Op::Touch),
            1 => id.clone().prop_map(Op::Remove),
            1 => id.prop_map(Op::Pin),
            1 => scan.clone().prop_map(Op::Victim),
            2 => scan.prop_map(Op::Evict),
        ];
        prop::collection::vec(op, 1..300)
    }

    /// The reference for LRU, FIFO, MRU and LFU: every present id with its count and the time of its
    /// insertion and last touch, sorted into eviction order on demand.
    #[derive(Default)]
    struct Model {
        entries: HashMap<u32, (u64, u64, u64)>,
        clock: u64,
    }

    impl Model {
        fn order(&self, kind: PolicyKind) -> Vec<u32> {
            let mut ids: Vec<(&u32, &(u64, u64, u64))> = self.entries.iter().collect();
            ids.sort_by_key(|&(_, &(count, inserted, used))| match kind {
                PolicyKind::Lru => (0, used),
                PolicyKind::Fifo => (0, inserted),
                PolicyKind::Mru => (0, u64::MAX - used),
                PolicyKind::Lfu => (count, used),
                PolicyKind::S3Fifo => unreachable!(),
            });
            ids.into_iter().map(|(&id, _)| id).collect()
        }
    }

    /// The reference S3-FIFO: queues as `VecDeque`s, the ghost as the last pushes, taken ones blanked.
    struct RefS3 {
        small: VecDeque<u32>,
        main: VecDeque<u32>,
        freq: HashMap<u32, u8>,
        hash: HashMap<u32, u64>,
        ghost: VecDeque<Option<u64>>,
        ghost_capacity: usize,
        pending: Option<u32>,
    }

    impl RefS3 {
        fn new(n: usize) -> Self {
            Self {
                small: VecDeque::new(),
                main: VecDeque::new(),
                freq: HashMap::new(),
                hash: HashMap::new(),
                ghost: VecDeque::new(),
                ghost_capacity: (n - n / 10).max(1),
                pending: None,
            }
        }

        fn insert(&mut self, id: u32, hash: u64) {
            let ghost = self
                .ghost
                .iter_mut()
                .filter(|h| **h == Some(hash))
                .fold(false, |_, h| {
                    *h = None;
                    true
                });
            if ghost {
                self.main.push_back(id);
            } else {
                self.small.push_back(id);
            }
            self.freq.insert(id, 0);
            self.hash.insert(id, hash);
        }

        fn touch(&mut self, id: u32) {
            if let Some(f) = self.freq.get_mut(&id) {
                *f = (*f + 1).min(3);
            }
        }

        fn remove(&mut self, id: u32) {
            if let Some(i) = self.small.iter().position(|&x| x == id) {
                self.small.remove(i);
                if self.pending == Some(id) {
                    if self.ghost.len() == self.ghost_capacity {
                        self.ghost.pop_front();
                    }
                    self.ghost.push_back(Some(self.hash[&id]));
                }
            } else if let Some(i) = self.main.iter().position(|&x| x == id) {
                self.main.remove(i);
            }
            if self.pending == Some(id) {
                self.pending = None;
            }
            if !self.small.contains(&id) && !self.main.contains(&id) {
                self.freq.remove(&id);
            }
        }

        fn victim(&mut self, evictable: impl Fn(u32) -> bool, max_scan: usize) -> Option<u32> {
            self.pending = None;
            let len = self.small.len() + self.main.len();
            let small_first = self.small.len() * 10 >= len;
            // Entries passed over stay at the front of their queue: the cursors count them.
            let (mut si, mut mi, mut scanned) = (0, 0, 0);
            while scanned < max_scan {
                let (s, m) = (si < self.small.len(), mi < self.main.len());
                let from_small = if s && m {
                    small_first
                } else if s || m {
                    s
                } else {
                    return None;
                };
                let id = if from_small {
                    self.small[si]
                } else {
                    self.main[mi]
                };
                let freq = self.freq.get_mut(&id).unwrap();
                if *freq > 0 {
                    if from_small {
                        *freq = 0;
                        self.small.remove(si);
                    } else {
                        *freq -= 1;
                        self.main.remove(mi);
                    }
                    self.main.push_back(id);
                    continue;
                }
                scanned += 1;
                if evictable(id) {
                    self.pending = from_small.then_some(id);
                    return Some(id);
                }
                if from_small {
                    si += 1;
                } else {
                    mi += 1;
                }
            }
            None
        }
    }

    fn run(kind: PolicyKind, ops: Vec<Op>) -> Result<(), TestCaseError> {
        let mut p = Policy::new(kind, IDS as usize);
        let mut model = Model::default();
        let mut s3 = RefS3::new(IDS as usize);
        let mut pinned = [false; IDS as usize];
        for op in ops {
            model.clock += 1;
            let now = model.clock;
            match op {
                Op::Insert(id, hash) => {
                    if !p.contains(id) {
                        p.insert(id, hash);
                        model.entries.insert(id, (1, now, now));
                        s3.insert(id, hash);
                    }
                }
                Op::Touch(id) => {
                    p.touch(id);
                    if let Some(e) = model.entries.get_mut(&id) {
                        (e.0, e.2) = (e.0 + 1, now);
                    }
                    s3.touch(id);
                }
                Op::Remove(id) => {
                    p.remove(id);
                    model.entries.remove(&id);
                    s3.remove(id);
                }
                Op::Pin(id) => pinned[id as usize] ^= true,
                Op::Victim(max_scan) | Op::Evict(max_scan) => {
                    let evictable = |id: u32| !pinned[id as usize];
                    let mut calls = 0;
                    let victim = p.victim(
                        |id| {
                            calls += 1;
                            evictable(id)
                        },
                        max_scan,
                    );
                    prop_assert!(calls <= max_scan);
                    if let Some(id) = victim {
                        prop_assert!(p.contains(id) && evictable(id));
                    }
                    let stuck = model.entries.keys().filter(|&&id| !evictable(id)).count();
                    if stuck < max_scan && model.entries.keys().any(|&id| evictable(id)) {
                        prop_assert!(
                            victim.is_some(),
                            "no victim among {:?}",
                            model.entries.keys()
                        );
                    }
                    if kind == PolicyKind::S3Fifo {
                        prop_assert_eq!(victim, s3.victim(evictable, max_scan));
                    } else {
                        let order = model.order(kind);
                        let expected = order.into_iter().take(max_scan).find(|&id| evictable(id));
                        prop_assert_eq!(victim, expected);
                    }
                    if let (Op::Evict(_), Some(id)) = (op, victim) {
                        p.remove(id);
                        model.entries.remove(&id);
                        s3.remove(id);
                    }
                }
            }
            let mut ids = order(&p);
            prop_assert_eq!(p.len(), ids.len());
            if kind == PolicyKind::S3Fifo {
                prop_assert_eq!(
                    s3_queues(&p),
                    (Vec::from(s3.small.clone()), Vec::from(s3.main.clone()))
                );
            } else {
                prop_assert_eq!(&ids, &model.order(kind));
            }
            ids.sort_unstable();
            let mut expected: Vec<u32> = model.entries.keys().copied().collect();
            expected.sort_unstable();
            prop_assert_eq!(&ids, &expected);
            for id in 0..IDS {
                prop_assert_eq!(p.contains(id), model.entries.contains_key(&id));
            }
        }
        Ok(())
    }

    proptest! {
        /// The ghost against the last `capacity` pushes, taken ones blanked; few hashes and a small
        /// table, so probe runs collide and wrap.
        #[test]
        fn ghost_model(capacity in 1..6usize, ops in prop::collection::vec((any::<bool>(), 0..12u64), 1..200)) {
            let mut g = Ghost::new(capacity);
            let mut model: VecDeque<Option<u64>> = VecDeque::new();
            for (push, hash) in ops {
                if push {
                    if model.len() == capacity {
                        model.pop_front();
                    }
                    model.push_back(Some(hash));
                    g.push(hash);
                } else {
                    let expected = model.iter().any(|&h| h == Some(hash));
                    model.iter_mut().filter(|h| **h == Some(hash)).for_each(|h| *h = None);
                    prop_assert_eq!(g.take(hash), expected);
                }
                let live = g.slots.iter().filter(|s| s.stamp != 0).count();
                let mut distinct: Vec<u64> = model.iter().flatten().copied().collect();
                distinct.sort_unstable();
                distinct.dedup();
                prop_assert_eq!(live, distinct.len());
                for h in distinct {
                    prop_assert!(g.find(h).is_some());
                }
            }
        }

        #[test]
        fn lru_model(ops in ops()) { run(PolicyKind::Lru, ops)?; }
        #[test]
        fn fifo_model(ops in ops()) { run(PolicyKind::Fifo, ops)?; }
        #[test]
        fn lfu_model(ops in ops()) { run(PolicyKind::Lfu, ops)?; }
        #[test]
        fn mru_model(ops in ops()) { run(PolicyKind::Mru, ops)?; }
        #[test]
        fn s3fifo_model(ops in ops()) { run(PolicyKind::S3Fifo, ops)?; }
    }
}
