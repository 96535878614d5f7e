//! A small persistent pool that splits large copies over the machine's cores.
//!
//! One thread cannot saturate memory bandwidth: on the reference 2-vCPU VM a single `memcpy` moves
//! ~12 GB/s where two threads move ~16. So copies of at least [`SPLIT_MIN`] bytes are cut into pieces
//! that the caller and the pool's helper threads claim from a shared counter. Copies from
//! [`SPLIT_AWAKE_MIN`] up to `SPLIT_MIN` are split (one piece per thread) only while a helper is
//! awake; when every helper is parked, the caller copies alone and wakes one for the copies that
//! follow, without waiting for it.
//!
//! - **The caller copies too.** It publishes the job and then claims pieces like any helper, so a copy
//!   never waits for a sleeping thread to wake (60-120 µs on that VM, as long as a 1 MiB copy takes):
//!   a helper that wakes late finds every piece claimed and the caller has done the whole copy.
//! - **Cheap waking.** A helper that just copied spins for [`SPIN`] before parking, so back-to-back
//!   copies (a batch of chunks) find it awake; a parked helper is woken with one futex call.
//! - **No locks across a copy.** The job list's mutex is held only to publish, find or withdraw a job.
//! - **Small copies stay on the caller's thread** (below `SPLIT_AWAKE_MIN`), and a pool of one
//!   thread starts no helper.
//! - **Back-off.** A split copy that ended later than the caller alone would have (a helper
//!   descheduled while holding a piece) counts as a strike; after [`STRIKES`] in a row, or one
//!   more than twice as slow, the pool copies on the caller's thread for a while.

use parking_lot::{Condvar, Mutex};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Copies of at least this many bytes are split over the pool, waking a parked helper if need be.
pub const SPLIT_MIN: usize = 1 << 20;
/// Copies from this size up to [`SPLIT_MIN`] are split only while a helper is awake (spinning after
/// a copy), when the hand-off costs about a microsecond; otherwise the caller copies alone and wakes
/// a helper for the copies that follow (a burst of chunks), without waiting for it.
pub const SPLIT_AWAKE_MIN: usize = 256 << 10;
/// Bytes per claimed piece: small enough that two threads finish together, large enough that the
/// per-piece atomic is noise.
const PIECE: usize = 256 << 10;
/// Split copies in a row that must be late before the pool backs off (see `CopyPool::copy`): one
/// late copy is a hiccup (an interrupt, a neighbour on the host), not a busy machine.
const STRIKES: u32 = 3;
/// Copies made without the pool after helpers were late [`STRIKES`] times in a row.
const BACKOFF_COPIES: u32 = 64;
/// The longest back-off, after helpers were late many times in a row.
const BACKOFF_MAX: u32 = 4096;
/// How long an idle helper spins before parking.
const SPIN: Duration = Duration::from_micros(100);

/// A pool of copy threads shared by a hot cache (cheap to share by reference).
pub struct CopyPool {
    shared: Arc<Shared>,
    helpers: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for CopyPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CopyPool")
            .field("threads", &self.threads())
            .finish()
    }
}

struct Shared {
    /// Copies with pieces left to claim.
    jobs: Mutex<Vec<Arc<Job>>>,
    /// `jobs.len()`, read without the lock by spinning helpers.
    open: AtomicUsize,
    /// Helpers parked (or about to park) on `wake`.
    sleepers: AtomicUsize,
    /// A caller woke a helper ahead of the next copies; cleared when a helper wakes.
    nudge: AtomicBool,
    sleep: Mutex<()>,
    wake: Condvar,
    stop: AtomicBool,
    /// Copies left to make on the caller's thread alone after helpers were late.
    backoff: AtomicU32,
    /// The length of the last back-off (doubled while helpers keep being late).
    backoff_stretch: AtomicU32,
    /// Split copies in a row that were late.
    strikes: AtomicU32,
    /// Pieces copied by helpers (how much of the work the pool took).
    helper_pieces: AtomicU64,
    /// Copies published to the helpers.
    split_copies: AtomicU64,
}

/// One split copy. The raw pointers are dereferenced only for a claimed piece, and the caller does not
/// return (its borrows stay alive) until every claimed piece is done.
struct Job {
    dst: *mut u8,
    src: *const u8,
    len: usize,
    piece: usize,
    pieces: usize,
    next: AtomicUsize,
    done: AtomicUsize,
}

// SAFETY: the pointers are only used for disjoint pieces while the caller keeps the borrows they came
// from alive (see `CopyPool::copy`); the counters are atomics.
unsafe impl Send for Job {}
// SAFETY: as above.
unsafe impl Sync for Job {}

impl Job {
    fn has_work(&self) -> bool {
        self.next.load(Ordering::Relaxed) < self.pieces
    }

    /// Claim and copy pieces until none is left; returns how many this thread copied.
    fn run(&self) -> usize {
        let mut copied = 0;
        loop {
            let i = self.next.fetch_add(1, Ordering::Relaxed);
            if i >= self.pieces {
                return copied;
            }
            let start = i * self.piece;
            let n = self.piece.min(self.len - start);
            // SAFETY: `start + n <= len`, so the piece lies inside both slices the caller lent; pieces
            // are disjoint (each index is claimed once), and `copy` does not return before `done`
            // counts this piece, so both slices are alive and unaliased by other writers.
            unsafe { std::ptr::copy_nonoverlapping(self.src.add(start), self.dst.add(start), n) };
            self.done.fetch_add(1, Ordering::Release);
            copied += 1;
        }
    }
}

impl CopyPool {
    /// A pool in which `threads` threads share a large copy, the caller's included: `threads - 1`
    /// helpers are started once. `0` or `1` copy on the caller's thread only.
    pub fn new(threads: usize) -> CopyPool {
        let shared = Arc::new(Shared {
            jobs: Mutex::new(Vec::new()),
            open: AtomicUsize::new(0),
            sleepers: AtomicUsize::new(0),
            nudge: AtomicBool::new(false),
            sleep: Mutex::new(()),
            wake: Condvar::new(),
            stop: AtomicBool::new(false),
            helper_pieces: AtomicU64::new(0),
            split_copies: AtomicU64::new(0),
            backoff: AtomicU32::new(0),
            backoff_stretch: AtomicU32::new(BACKOFF_COPIES / 2),
            strikes: AtomicU32::new(0),
        });
        let helpers = (1..threads.max(1))
            .filter_map(|i| {
                let s = shared.clone();
                // A pool that cannot start a helper still copies correctly, on fewer threads.
                std::thread::Builder::new()
                    .name(format!("kvhost-copy-{i}"))
                    .spawn(move || helper(&s))
                    .map_err(|e| tracing::warn!(target: "kvhost::cache", "copy thread {i}: {e}"))
                    .ok()
            })
            .collect();
        CopyPool { shared, helpers }
    }

    /// The default size: one copying thread per core.
    pub fn default_threads() -> usize {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    }

    /// Threads that share a large copy, the caller's included.
    pub fn threads(&self) -> usize {
        self.helpers.len() + 1
    }

    /// Pieces of split copies that helper threads copied so far (0 means the callers did all of it).
    pub fn helper_pieces(&self) -> u64 {
        self.shared.helper_pieces.load(Ordering::Relaxed)
    }

    /// Copies offered to the helpers so far (split into pieces; the caller may still have copied
    /// every piece itself when no helper got a core in time).
    pub fn split_copies(&self) -> u64 {
        self.shared.split_copies.load(Ordering::Relaxed)
    }

    /// Copy `src` into `dst` (same length, like `copy_from_slice`), over the pool when it is large.
    pub fn copy(&self, dst: &mut [u8], src: &[u8]) {
        assert_eq!(
            dst.len(),
            src.len(),
            "copy: destination and source lengths differ"
        );
        let len = src.len();
        let s = &*self.shared;
        if len < SPLIT_AWAKE_MIN || self.helpers.is_empty() || s.backoff_left() {
            dst.copy_from_slice(src);
            return;
        }
        if len < SPLIT_MIN && s.sleepers.load(Ordering::Relaxed) == self.helpers.len() {
            // Every helper is parked: wake one for the next copies, and copy this one alone.
            if s.nudge.swap(true, Ordering::Relaxed) {
                // A wake-up is already on its way.
            } else {
                let _g = s.sleep.lock();
                s.wake.notify_one();
            }
            dst.copy_from_slice(src);
            return;
        }
        let started = Instant::now();
        // Below SPLIT_MIN, one piece per thread.
        let piece = if len < SPLIT_MIN {
            len.div_ceil(self.threads()).next_multiple_of(4096)
        } else {
            PIECE
        };
        let pieces = len.div_ceil(piece);
        let job = Arc::new(Job {
            dst: dst.as_mut_ptr(),
            src: src.as_ptr(),
            len,
            piece,
            pieces,
            next: AtomicUsize::new(0),
            done: AtomicUsize::new(0),
        });
        s.jobs.lock().push(job.clone());
        s.split_copies.fetch_add(1, Ordering::Relaxed);
        s.open.fetch_add(1, Ordering::SeqCst);
        let parked = s.sleepers.load(Ordering::SeqCst) > 0;
        if parked {
            // Under `sleep`, so a helper between its last check and its wait cannot miss this.
            let _g = s.sleep.lock();
            s.wake.notify_all();
        }
        let mine = job.run();
        {
            let mut jobs = s.jobs.lock();
            jobs.retain(|j| !Arc::ptr_eq(j, &job));
            s.open.fetch_sub(1, Ordering::SeqCst);
        }
        // Helpers may still be finishing pieces they claimed (at most one each).
        let own = started.elapsed();
        let mut spins = 0u32;
        while job.done.load(Ordering::Acquire) < pieces {
            spins += 1;
            if spins < 1 << 10 {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
        // A helper that sat on a piece (descheduled: more runnable threads than cores) made this copy
        // slower than the caller alone, and a spinning helper that gets no core only steals the
        // caller's: after STRIKES such copies in a row, or one that took more than twice as long
        // as the caller alone would have (a helper descheduled for a time slice), copy alone for a
        // while before trying the pool again. Each back-off that follows another without a good split copy between them
        // doubles the stretch (up to BACKOFF_MAX), so a machine that stays oversubscribed pays for a
        // retry only rarely; a split copy that went well resets both.
        // A helper that was awake (spinning) yet took no piece is not getting a core either.
        let starved = !parked && mine == pieces;
        // What the caller alone would have taken, from its own pace on the pieces it copied.
        let alone = own.mul_f64(pieces as f64 / mine.max(1) as f64);
        let elapsed = started.elapsed();
        // A caller that copied no piece (descheduled after publishing) has no pace to judge by:
        // the helpers did the whole copy, which is not a late one.
        if mine == 0 || !(starved || elapsed > alone) {
            s.strikes.store(0, Ordering::Relaxed);
            s.backoff_stretch
                .store(BACKOFF_COPIES / 2, Ordering::Relaxed);
        } else if elapsed > alone * 2 || s.strikes.fetch_add(1, Ordering::Relaxed) + 1 >= STRIKES {
            s.strikes.store(0, Ordering::Relaxed);
            let stretch = s
                .backoff_stretch
                .load(Ordering::Relaxed)
                .clamp(BACKOFF_COPIES, BACKOFF_MAX / 2)
                * 2;
            s.backoff_stretch.store(stretch, Ordering::Relaxed);
            s.backoff.store(stretch, Ordering::Relaxed);
        }
    }
}

impl Drop for CopyPool {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        {
            let _g = self.shared.sleep.lock();
            self.shared.wake.notify_all();
        }
        for h in self.helpers.drain(..) {
            let _ = h.join();
        }
    }
}

impl Shared {
    /// Whether this copy should skip the pool (and count it).
    fn backoff_left(&self) -> bool {
        self.backoff
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
            .is_ok()
    }
}

fn helper(s: &Shared) {
    let mut idle_since = Instant::now();
    let mut polls = 0u32;
    while !s.stop.load(Ordering::Relaxed) {
        if s.open.load(Ordering::Acquire) > 0 {
            let job = s.jobs.lock().iter().find(|j| j.has_work()).cloned();
            if let Some(job) = job {
                let n = job.run();
                s.helper_pieces.fetch_add(n as u64, Ordering::Relaxed);
                idle_since = Instant::now();
                continue;
            }
        }
        polls += 1;
        if polls % 64 != 0 || idle_since.elapsed() < SPIN {
            std::hint::spin_loop();
            continue;
        }
        let mut g = s.sleep.lock();
        s.sleepers.fetch_add(1, Ordering::SeqCst);
        if s.open.load(Ordering::SeqCst) == 0
            && !s.stop.load(Ordering::SeqCst)
            && !s.nudge.load(Ordering::SeqCst)
        {
            s.wake.wait(&mut g);
        }
        s.nudge.store(false, Ordering::SeqCst);
        s.sleepers.fetch_sub(1, Ordering::SeqCst);
        drop(g);
        idle_since = Instant::now();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 12) as u8)
            .collect()
    }

    #[test]
    fn copies_every_byte_at_odd_sizes_and_offsets() {
        let pool = CopyPool::new(3);
        assert_eq!(pool.threads(), 3);
        for len in [
            0,
            1,
            4095,
            SPLIT_MIN - 1,
            SPLIT_MIN,
            SPLIT_MIN + 1,
            PIECE * 5 + 17,
            (4 << 20) + 4093,
        ] {
            for offset in [0usize, 1, 7, 64] {
                let src = pattern(len + offset, len as u8);
                let mut dst = vec![0xEEu8; len + 2 * offset + 3];
                pool.copy(&mut dst[offset..offset + len], &src[offset..]);
                assert_eq!(
                    &dst[offset..offset + len],
                    &src[offset..],
                    "len {len} off {offset}"
                );
                assert!(dst[..offset].iter().all(|&b| b == 0xEE), "bytes before");
                assert!(
                    dst[offset + len..].iter().all(|&b| b == 0xEE),
                    "bytes after"
                );
            }
        }
    }

    #[test]
    fn a_pool_of_one_or_zero_starts_no_thread_and_still_copies() {
        for threads in [0, 1] {
            let pool = CopyPool::new(threads);
            assert_eq!(pool.threads(), 1);
            let src = pattern(3 << 20, 9);
            let mut dst = vec![0; src.len()];
            pool.copy(&mut dst, &src);
            assert_eq!(dst, src);
        }
    }

    #[test]
    fn concurrent_callers_each_get_their_own_bytes() {
        let pool = CopyPool::new(2);
        std::thread::scope(|scope| {
            for t in 0..4u8 {
                let pool = &pool;
                scope.spawn(move || {
                    for round in 0..20usize {
                        let len = SPLIT_MIN + round * 4099 + t as usize;
                        let src = pattern(len, t.wrapping_mul(17).wrapping_add(round as u8));
                        let mut dst = vec![0; len];
                        pool.copy(&mut dst, &src);
                        assert!(dst == src, "caller {t} round {round}");
                    }
                });
            }
        });
    }

    #[test]
    fn helpers_take_pieces_of_large_copies() {
        // Proves the split happens: a helper copies some pieces of a long run of large copies (a
        // helper that is never scheduled in 200 copies of 8 MiB would mean the pool does nothing).
        let pool = CopyPool::new(2);
        let src = pattern(8 << 20, 3);
        let mut dst = vec![0; src.len()];
        let before = helper_pieces(&pool);
        for _ in 0..200 {
            pool.copy(&mut dst, &src);
        }
        assert_eq!(dst, src);
        assert!(
            helper_pieces(&pool) > before,
            "no helper ever copied a piece"
        );
    }

    #[test]
    fn mid_size_copies_wake_a_parked_helper_and_then_split() {
        // 512 KiB is below SPLIT_MIN: with the helper parked the caller copies alone and only wakes
        // it; once it is awake (spinning), a stream of such copies is split.
        let pool = CopyPool::new(2);
        let src = pattern(512 << 10, 5);
        let mut dst = vec![0; src.len()];
        // Let the helper park (it spins SPIN after start, then waits).
        let parked_by = Instant::now() + Duration::from_secs(10);
        while pool.shared.sleepers.load(Ordering::SeqCst) == 0 {
            assert!(Instant::now() < parked_by, "the helper never parked");
            std::thread::sleep(Duration::from_millis(1));
        }
        pool.copy(&mut dst, &src);
        assert_eq!(dst, src);
        assert_eq!(
            pool.split_copies(),
            0,
            "a copy was split while the helper was parked"
        );
        // Whether the woken helper also gets a core in time depends on the machine's load (a busy
        // test run may starve it, and the back-off then pauses splitting), so keep copying until a
        // copy is split, for at most 20 s.
        let give_up = Instant::now() + Duration::from_secs(20);
        let mut copies = 0u64;
        while pool.split_copies() == 0 && Instant::now() < give_up {
            dst.fill(0);
            pool.copy(&mut dst, &src);
            assert_eq!(dst, src, "copy {copies}");
            copies += 1;
        }
        assert!(
            pool.split_copies() > 0,
            "no mid-size copy was split after the nudge ({copies} copies in 20 s)"
        );
    }

    #[test]
    fn copies_below_the_awake_threshold_never_split() {
        let pool = CopyPool::new(2);
        let src = pattern(SPLIT_AWAKE_MIN - 1, 9);
        let mut dst = vec![0; src.len()];
        for _ in 0..500 {
            pool.copy(&mut dst, &src);
        }
        assert_eq!(dst, src);
        assert_eq!(pool.split_copies(), 0);
    }

    fn helper_pieces(pool: &CopyPool) -> u64 {
        pool.helper_pieces()
    }

    #[test]
    #[should_panic(expected = "lengths differ")]
    fn mismatched_lengths_panic_like_copy_from_slice() {
        let pool = CopyPool::new(2);
        pool.copy(&mut [0u8; 4], &[0u8; 5]);
    }
}
