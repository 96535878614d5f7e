//! `Allocator`: O(1) allocation of arena blocks, TLSF (Two-Level Segregated Fit, Masmano et al.) over units.
//!
//! The allocator hands out *offsets* into an arena it never touches: all metadata lives in arrays indexed
//! by unit, so the arena holds only chunk data (huge-page friendly) and every block is aligned to the unit
//! (`O_DIRECT` plugins need that).
//!
//! Size classes: a block of `s` units is in class `(fl, sl)` with `fl = floor(log2(s))` and `sl` the next
//! [`SL_BITS`] bits below the leading one (zero-padded for `s < 16`, where classes are exact). A 64-bit
//! first-level bitmap and a 16-bit second-level bitmap per first level find a non-empty class in O(1).
//!
//! Per-unit metadata (13 bytes a unit), meaningful only at block boundaries:
//! * `state`: whether the unit starts a used block, starts a free block, or is inside a block;
//! * `len`: at a block's first unit its length; at the last unit of a block of two units or more, the
//!   block's first unit (the boundary tag that finds a left neighbour in O(1));
//! * `prev` / `next`: the free-list links of a free block, at its first unit.

/// Second-level index bits: 16 subclasses per power of two, so a class spans at most 1/16 of its sizes.
const SL_BITS: u32 = 4;
const SL_COUNT: usize = 1 << SL_BITS;
/// First levels: block sizes are below 2^32 units, and a rounded-up request can reach 2^32.
const FL_COUNT: usize = 33;
/// End of a free list. Never a block start: there are at most `u32::MAX` units, numbered from 0.
const NIL: u32 = u32::MAX;

/// A block of the arena: `offset` and `len` are multiples of the unit; `len` >= the bytes asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Block {
    /// Byte offset of the block in the arena.
    pub offset: u64,
    /// Byte length of the block.
    pub len: u64,
}

/// What a unit is, as far as block boundaries go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Not the first unit of a block.
    Inner,
    /// First unit of an allocated block.
    Used,
    /// First unit of a free block (on a free list).
    Free,
}

/// An O(1) allocator of unit-aligned blocks of an arena of `capacity` bytes (TLSF).
///
/// `alloc` uses TLSF's *good fit*: the request is rounded up to the next class boundary (see
/// [`Allocator::alloc`]), so it succeeds whenever a free block of that rounded size exists, but may fail
/// when the only large enough free blocks are smaller than the rounded size.
#[derive(Debug)]
pub struct Allocator {
    unit: u64,
    units: u32,
    state: Vec<State>,
    len: Vec<u32>,
    prev: Vec<u32>,
    next: Vec<u32>,
    /// Heads of the free lists, indexed by `fl * SL_COUNT + sl`.
    heads: Vec<u32>,
    fl_bitmap: u64,
    sl_bitmap: [u16; FL_COUNT],
    allocated_units: u64,
    live_blocks: usize,
}

impl Allocator {
    /// `capacity` bytes managed in units of `unit` bytes (a power of two >= 4096); capacity rounded down
    /// to whole units.
    ///
    /// # Panics
    /// If `unit` is not a power of two >= 4096, or the capacity is more than `u32::MAX` units.
    pub fn new(capacity: u64, unit: u64) -> Self {
        assert!(
            unit.is_power_of_two() && unit >= 4096,
            "allocator unit {unit} is not a power of two >= 4096"
        );
        let units = u32::try_from(capacity / unit).unwrap_or_else(|_| {
            panic!("arena of {capacity} bytes has more than 2^32 - 1 units of {unit} bytes")
        });
        let n = units as usize;
        let mut allocator = Self {
            unit,
            units,
            state: vec![State::Inner; n],
            len: vec![0; n],
            prev: vec![NIL; n],
            next: vec![NIL; n],
            heads: vec![NIL; FL_COUNT * SL_COUNT],
            fl_bitmap: 0,
            sl_bitmap: [0; FL_COUNT],
            allocated_units: 0,
            live_blocks: 0,
        };
        if units > 0 {
            allocator.make_free(0, units);
        }
        allocator
    }

    /// The unit a sensible caller picks for an arena: the smallest power of two >= 4096 such that
    /// `capacity / unit <= 1 << 20` (bounds the metadata to about 13 MiB).
    pub fn unit_for(capacity: u64) -> u64 {
        let mut unit = 4096u64;
        while capacity / unit > 1 << 20 {
            unit *= 2;
        }
        unit
    }

    /// The unit, in bytes: every block's offset and length are multiples of it.
    pub fn unit(&self) -> u64 {
        self.unit
    }

    /// Managed bytes (whole units).
    pub fn capacity(&self) -> u64 {
        u64::from(self.units) * self.unit
    }

    /// O(1): a block of at least `bytes` (rounded up to whole units), or `None` when `bytes` is 0 or no
    /// free block is found.
    ///
    /// Good fit: the request is rounded up to its class's upper boundary (to a multiple of 1/16 of its
    /// power of two), so the first block of any non-empty class at or above it fits. A request therefore
    /// always succeeds when a free block of the rounded size exists. Below that, only the first block of
    /// the request's own class is tried, so a request can fail while a block between the request and the
    /// rounded size is free.
    pub fn alloc(&mut self, bytes: u64) -> Option<Block> {
        if bytes == 0 {
            return None;
        }
        let need = bytes.div_ceil(self.unit);
        if need > u64::from(self.units) {
            return None;
        }
        let need = need as u32;
        let start = match self.find_class(good_fit_units(u64::from(need))) {
            Some((fl, sl)) => self.heads[fl * SL_COUNT + sl],
            None => {
                // Last chance, still O(1): the first block of the request's own class may be big enough.
                let (fl, sl) = class_of(u64::from(need));
                let head = self.heads[fl * SL_COUNT + sl];
                if head == NIL || self.len[head as usize] < need {
                    return None;
                }
                head
            }
        };
        let have = self.len[start as usize];
        self.unlink(start);
        if have > need {
            self.make_free(start + need, have - need);
        }
        self.set_block(start, need, State::Used);
        self.allocated_units += u64::from(need);
        self.live_blocks += 1;
        Some(self.block(start, need))
    }

    /// O(1): return a block, coalescing it with its free physical neighbours.
    ///
    /// # Panics
    /// If `block` is not a block currently allocated by this allocator (a double free, a block of another
    /// allocator, or a block with a changed length).
    pub fn free(&mut self, block: Block) {
        let mut start = self.check_live(block);
        let mut len = self.len[start as usize];
        self.allocated_units -= u64::from(len);
        self.live_blocks -= 1;

        let right = start + len;
        if right < self.units && self.state[right as usize] == State::Free {
            self.unlink(right);
            len += self.len[right as usize];
            self.state[right as usize] = State::Inner;
        }
        if start > 0 {
            let left = self.block_ending_at(start - 1);
            if self.state[left as usize] == State::Free {
                self.unlink(left);
                len += self.len[left as usize];
                self.state[start as usize] = State::Inner;
                start = left;
            }
        }
        self.make_free(start, len);
    }

    /// Sum of the lengths of the live blocks, in bytes (exact).
    pub fn allocated_bytes(&self) -> u64 {
        self.allocated_units * self.unit
    }

    /// `capacity() - allocated_bytes()`.
    pub fn free_bytes(&self) -> u64 {
        self.capacity() - self.allocated_bytes()
    }

    /// Number of allocated blocks not yet freed.
    pub fn live_blocks(&self) -> usize {
        self.live_blocks
    }

    /// O(1): the length in bytes of a free block of the largest non-empty class (the first block of that
    /// class), 0 when nothing is free. Never more than the largest free block, and within 1/16 of it.
    pub fn largest_free(&self) -> u64 {
        if self.fl_bitmap == 0 {
            return 0;
        }
        let fl = (u64::BITS - 1 - self.fl_bitmap.leading_zeros()) as usize;
        let sl = (u16::BITS - 1 - self.sl_bitmap[fl].leading_zeros()) as usize;
        let head = self.heads[fl * SL_COUNT + sl];
        u64::from(self.len[head as usize]) * self.unit
    }

    /// The first unit of the allocated `block`, after checking that it is one.
    fn check_live(&self, block: Block) -> u32 {
        let live = block.offset % self.unit == 0
            && block.len % self.unit == 0
            && block.offset / self.unit < u64::from(self.units)
            && {
                let start = (block.offset / self.unit) as usize;
                self.state[start] == State::Used
                    && u64::from(self.len[start]) * self.unit == block.len
            };
        assert!(live, "double free or foreign block {block:?}");
        (block.offset / self.unit) as u32
    }

    /// The first unit of the block whose last unit is `last`.
    fn block_ending_at(&self, last: u32) -> u32 {
        if self.state[last as usize] == State::Inner {
            self.len[last as usize]
        } else {
            // A one-unit block: its last unit is its first.
            last
        }
    }

    /// Writes the boundary tags of the block `start..start + len`.
    fn set_block(&mut self, start: u32, len: u32, state: State) {
        self.state[start as usize] = state;
        self.len[start as usize] = len;
        if len > 1 {
            self.len[(start + len - 1) as usize] = start;
        }
    }

    /// Makes `start..start + len` a free block and puts it at the head of its free list.
    fn make_free(&mut self, start: u32, len: u32) {
        self.set_block(start, len, State::Free);
        let (fl, sl) = class_of(u64::from(len));
        let list = fl * SL_COUNT + sl;
        let head = self.heads[list];
        self.prev[start as usize] = NIL;
        self.next[start as usize] = head;
        if head != NIL {
            self.prev[head as usize] = start;
        }
        self.heads[list] = start;
        self.fl_bitmap |= 1 << fl;
        self.sl_bitmap[fl] |= 1 << sl;
    }

    /// Takes the free block starting at `start` off its free list (its tags are left to the caller).
    fn unlink(&mut self, start: u32) {
        let (prev, next) = (self.prev[start as usize], self.next[start as usize]);
        if next != NIL {
            self.prev[next as usize] = prev;
        }
        if prev == NIL {
            let (fl, sl) = class_of(u64::from(self.len[start as usize]));
            let list = fl * SL_COUNT + sl;
            self.heads[list] = next;
            if next == NIL {
                self.sl_bitmap[fl] &= !(1 << sl);
                if self.sl_bitmap[fl] == 0 {
                    self.fl_bitmap &= !(1 << fl);
                }
            }
        } else {
            self.next[prev as usize] = next;
        }
    }

    /// The first non-empty class at or above the class of `units` units.
    fn find_class(&self, units: u64) -> Option<(usize, usize)> {
        let (fl, sl) = class_of(units);
        let sl_map = self.sl_bitmap[fl] & (u16::MAX << sl);
        if sl_map != 0 {
            return Some((fl, sl_map.trailing_zeros() as usize));
        }
        let fl_map = self.fl_bitmap & (u64::MAX << (fl + 1));
        if fl_map == 0 {
            return None;
        }
        let fl = fl_map.trailing_zeros() as usize;
        Some((fl, self.sl_bitmap[fl].trailing_zeros() as usize))
    }

    fn block(&self, start: u32, len: u32) -> Block {
        Block {
            offset: u64::from(start) * self.unit,
            len: u64::from(len) * self.unit,
        }
    }
}

/// The class `(fl, sl)` of a block of `units` units (`1 <= units < 2^33`).
fn class_of(units: u64) -> (usize, usize) {
    let fl = u64::BITS - 1 - units.leading_zeros();
    let bits = if fl >= SL_BITS {
        units >> (fl - SL_BITS)
    } else {
        units << (SL_BITS - fl)
    };
    (fl as usize, (bits as usize) & (SL_COUNT - 1))
}

/// `units` rounded up to the lower boundary of the next class, unless it is on one already: every block
/// of that class or above holds at least `units`.
fn good_fit_units(units: u64) -> u64 {
    let fl = u64::BITS - 1 - units.leading_zeros();
    if fl < SL_BITS {
        return units; // classes below 16 units are exact
    }
    let step = 1u64 << (fl - SL_BITS);
    units.div_ceil(step) * step
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    const U: u64 = 4096;

    /// Free extents `(start unit, len units)` in address order, read from the boundary tags, with every
    /// structural invariant checked on the way.
    fn check(a: &Allocator) -> Vec<(u32, u32)> {
        let mut free = Vec::new();
        let (mut at, mut used, mut live) = (0u32, 0u64, 0usize);
        let mut prev_free = false;
        while at < a.units {
            let len = a.len[at as usize];
            assert!(len > 0 && at + len <= a.units, "bad block at unit {at}");
            assert_eq!(
                a.block_ending_at(at + len - 1),
                at,
                "bad end tag at unit {at}"
            );
            for inner in at + 1..at + len {
                assert_eq!(a.state[inner as usize], State::Inner);
            }
            match a.state[at as usize] {
                State::Free => {
                    assert!(!prev_free, "two adjacent free blocks at unit {at}");
                    let (fl, sl) = class_of(u64::from(len));
                    assert!(a.sl_bitmap[fl] & (1 << sl) != 0 && a.fl_bitmap & (1 << fl) != 0);
                    free.push((at, len));
                }
                State::Used => {
                    used += u64::from(len);
                    live += 1;
                }
                State::Inner => panic!("unit {at} should start a block"),
            }
            prev_free = a.state[at as usize] == State::Free;
            at += len;
        }
        assert_eq!(used, a.allocated_units);
        assert_eq!(live, a.live_blocks);
        // Every free block is on exactly the list of its class, and every list is non-empty iff its bit is.
        let mut listed = 0;
        for (list, &head) in a.heads.iter().enumerate() {
            let (fl, sl) = (list / SL_COUNT, list % SL_COUNT);
            assert_eq!(head != NIL, a.sl_bitmap[fl] & (1 << sl) != 0);
            let (mut cur, mut prev) = (head, NIL);
            while cur != NIL {
                assert_eq!(a.state[cur as usize], State::Free);
                assert_eq!(class_of(u64::from(a.len[cur as usize])), (fl, sl));
                assert_eq!(a.prev[cur as usize], prev);
                listed += 1;
                (prev, cur) = (cur, a.next[cur as usize]);
            }
        }
        assert_eq!(listed, free.len());
        for fl in 0..FL_COUNT {
            assert_eq!(a.fl_bitmap & (1 << fl) != 0, a.sl_bitmap[fl] != 0);
        }
        free
    }

    #[test]
    fn unit_for_bounds_the_unit_count() {
        assert_eq!(Allocator::unit_for(0), 4096);
        assert_eq!(Allocator::unit_for(4096 << 20), 4096);
        assert_eq!(Allocator::unit_for((4096 << 20) + 4095), 4096);
        assert_eq!(Allocator::unit_for((4096 << 20) + 4096), 8192);
        assert_eq!(Allocator::unit_for(64 << 30), 64 << 10);
        assert_eq!(Allocator::unit_for(u64::MAX), 1 << 44);
        for capacity in [1u64, 5 << 30, 1 << 40, 3 << 40] {
            let unit = Allocator::unit_for(capacity);
            assert!(unit.is_power_of_two() && capacity / unit <= 1 << 20);
            assert!(unit == 4096 || capacity / (unit / 2) > 1 << 20);
        }
    }

    #[test]
    fn capacity_rounds_down_to_units() {
        let a = Allocator::new(10 * U + 123, U);
        assert_eq!(
            (a.capacity(), a.unit(), a.free_bytes()),
            (10 * U, U, 10 * U)
        );
        assert_eq!(a.largest_free(), 10 * U);
        let mut empty = Allocator::new(U - 1, U);
        assert_eq!((empty.capacity(), empty.largest_free()), (0, 0));
        assert_eq!(empty.alloc(1), None);
    }

    #[test]
    #[should_panic(expected = "power of two")]
    fn unit_must_be_a_large_power_of_two() {
        Allocator::new(1 << 20, 3 * 4096);
    }

    #[test]
    fn exact_accounting_and_alignment() {
        let mut a = Allocator::new(100 * U, U);
        assert_eq!(a.alloc(0), None);
        let b1 = a.alloc(1).unwrap();
        let b2 = a.alloc(U + 1).unwrap();
        let b3 = a.alloc(3 * U).unwrap();
        assert_eq!((b1.len, b2.len, b3.len), (U, 2 * U, 3 * U));
        for b in [b1, b2, b3] {
            assert_eq!(b.offset % U, 0);
        }
        assert_eq!(a.allocated_bytes(), 6 * U);
        assert_eq!(a.free_bytes(), 94 * U);
        assert_eq!(a.live_blocks(), 3);
        a.free(b2);
        assert_eq!((a.allocated_bytes(), a.live_blocks()), (4 * U, 2));
        check(&a);
    }

    #[test]
    fn split_and_coalesce_both_sides() {
        let mut a = Allocator::new(64 * U, U);
        let blocks: Vec<Block> = (0..4).map(|_| a.alloc(16 * U).unwrap()).collect();
        assert_eq!(a.alloc(1), None, "the arena is full");
        assert_eq!(a.largest_free(), 0);
        a.free(blocks[0]);
        a.free(blocks[2]);
        assert_eq!(check(&a), vec![(0, 16), (32, 16)]);
        // Freeing the middle block merges with both neighbours into one 48-unit extent.
        a.free(blocks[1]);
        assert_eq!(check(&a), vec![(0, 48)]);
        assert_eq!(a.largest_free(), 48 * U);
        // A smaller request splits it; the remainder stays free.
        let small = a.alloc(5 * U).unwrap();
        assert_eq!(
            small,
            Block {
                offset: 0,
                len: 5 * U
            }
        );
        assert_eq!(check(&a), vec![(5, 43)]);
        a.free(small);
        a.free(blocks[3]);
        assert_eq!(check(&a), vec![(0, 64)]);
    }

    #[test]
    fn full_arena_then_free_all_is_one_block() {
        let mut a = Allocator::new(1000 * U, U);
        let mut blocks = Vec::new();
        while let Some(b) = a.alloc(U) {
            blocks.push(b);
        }
        assert_eq!((blocks.len(), a.free_bytes()), (1000, 0));
        // Free in an interleaved order so that every merge shape occurs.
        let (even, odd): (Vec<Block>, Vec<Block>) =
            blocks.iter().partition(|b| (b.offset / U) % 2 == 0);
        for b in even.into_iter().chain(odd.into_iter().rev()) {
            a.free(b);
        }
        assert_eq!(check(&a), vec![(0, 1000)]);
        assert_eq!(
            a.alloc(1000 * U),
            Some(Block {
                offset: 0,
                len: 1000 * U
            })
        );
    }

    #[test]
    fn fragmentation_keeps_free_space_split() {
        // Alternate 4-unit blocks: freeing every other one leaves 8 free units in 4-unit holes.
        let mut a = Allocator::new(16 * U, U);
        let blocks: Vec<Block> = (0..4).map(|_| a.alloc(4 * U).unwrap()).collect();
        a.free(blocks[0]);
        a.free(blocks[2]);
        assert_eq!(a.free_bytes(), 8 * U);
        assert_eq!(a.largest_free(), 4 * U);
        assert_eq!(a.alloc(5 * U), None, "no hole is large enough");
        assert!(a.alloc(4 * U).is_some() && a.alloc(4 * U).is_some());
        assert_eq!(a.free_bytes(), 0);
    }

    #[test]
    fn good_fit_rounds_to_the_class_boundary() {
        // 100 units: fl = 6, step 4, so a request of 97..=100 units only finds classes from 100 up.
        assert_eq!(good_fit_units(97), 100);
        assert_eq!(good_fit_units(100), 100);
        assert_eq!(good_fit_units(15), 15);
        assert_eq!(good_fit_units(31), 31);
        assert_eq!(good_fit_units(33), 34);
        assert_eq!(good_fit_units(127), 128);
        // A free 98-unit block is in the class of 96..100: a 97-unit request skips that class, but the
        // class's first block is still tried, so it succeeds.
        let mut a = Allocator::new(98 * U, U);
        assert_eq!(a.alloc(97 * U).map(|b| b.len), Some(97 * U));
        // Blocks of 99 and 97 units, both in that class, the 97-unit one first on the list: a 98-unit
        // request fails although the 99-unit block would do.
        let mut a = Allocator::new(197 * U, U);
        let x = a.alloc(99 * U).unwrap();
        let _separator = a.alloc(U).unwrap();
        let y = a.alloc(97 * U).unwrap();
        a.free(x);
        a.free(y);
        assert_eq!(check(&a), vec![(0, 99), (100, 97)]);
        assert_eq!(a.alloc(98 * U), None);
        assert_eq!(a.alloc(99 * U), None);
        assert_eq!(a.alloc(97 * U), Some(y));
        // Alone on the list, or first on it, the 99-unit block serves 98 and 99 units.
        assert_eq!(a.alloc(99 * U), Some(x));
        a.free(y);
        a.free(x);
        assert_eq!(a.alloc(98 * U).map(|b| b.offset), Some(0));
    }

    #[test]
    #[should_panic(expected = "double free")]
    fn double_free_panics() {
        let mut a = Allocator::new(16 * U, U);
        let b = a.alloc(U).unwrap();
        let _keep = a.alloc(U).unwrap();
        a.free(b);
        a.free(b);
    }

    #[test]
    #[should_panic(expected = "double free")]
    fn freeing_a_block_of_another_length_panics() {
        let mut a = Allocator::new(16 * U, U);
        let b = a.alloc(4 * U).unwrap();
        a.free(Block {
            offset: b.offset,
            len: 2 * U,
        });
    }

    #[test]
    #[should_panic(expected = "double free")]
    fn freeing_the_inside_of_a_block_panics() {
        let mut a = Allocator::new(16 * U, U);
        let b = a.alloc(4 * U).unwrap();
        a.free(Block {
            offset: b.offset + U,
            len: U,
        });
    }

    #[derive(Clone, Debug)]
    enum Op {
        Alloc(u64),
        /// Frees the live block at this index (modulo the count) in address order.
        Free(usize),
    }

    /// Request sizes for a 256-unit arena: mostly a few fixed "chunk" sizes, sometimes anything.
    fn ops() -> impl Strategy<Value = Vec<Op>> {
        const UNITS: u64 = 256;
        let size = prop_oneof![
            3 => prop::sample::select(vec![U, 16 * U, 16 * U - 100, 32 * U, 50 * U]),
            1 => 1..=UNITS * U / 4,
        ];
        let op = prop_oneof![
            3 => size.prop_map(Op::Alloc),
            2 => any::<usize>().prop_map(Op::Free),
        ];
        prop::collection::vec(op, 1..200)
    }

    proptest! {
        #[test]
        fn model(ops in ops()) {
            let capacity = 256 * U;
            let mut a = Allocator::new(capacity, U);
            let mut live: BTreeMap<u64, Block> = BTreeMap::new();
            for op in ops {
                match op {
                    Op::Alloc(bytes) => {
                        let free = check(&a);
                        let fits = free.iter().any(|&(_, len)| {
                            u64::from(len) >= good_fit_units(bytes.div_ceil(U))
                        });
                        match a.alloc(bytes) {
                            Some(b) => {
                                prop_assert!(b.len >= bytes && b.len - bytes < U);
                                prop_assert!(b.offset % U == 0 && b.offset + b.len <= capacity);
                                let before = live.range(..b.offset).next_back();
                                prop_assert!(before.is_none_or(|(_, p)| p.offset + p.len <= b.offset));
                                let after = live.range(b.offset..).next();
                                prop_assert!(after.is_none_or(|(_, n)| b.offset + b.len <= n.offset));
                                live.insert(b.offset, b);
                            }
                            None => prop_assert!(!fits, "alloc({}) failed with free {:?}", bytes, free),
                        }
                    }
                    Op::Free(i) => {
                        if let Some(&offset) = live.keys().nth(i % live.len().max(1)) {
                            a.free(live.remove(&offset).unwrap());
                        }
                    }
                }
                prop_assert_eq!(a.allocated_bytes(), live.values().map(|b| b.len).sum::<u64>());
                prop_assert_eq!(a.live_blocks(), live.len());
                let free = check(&a);
                let largest = free.iter().map(|&(_, len)| u64::from(len) * U).max().unwrap_or(0);
                prop_assert!(a.largest_free() <= largest && a.largest_free() * 16 >= largest * 15);
            }
            for b in std::mem::take(&mut live).into_values() {
                a.free(b);
            }
            prop_assert_eq!(check(&a), vec![(0, 256)]);
            prop_assert_eq!(a.alloc(capacity), Some(Block { offset: 0, len: capacity }));
        }
    }
}
