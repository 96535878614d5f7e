//! Staging for PUT bodies in progress, under one byte budget shared by every connection.
//!
//! A PUT body is read into a staging buffer and copied into the hot cache only once it has fully
//! arrived, so a client that declares a large body and then sends nothing (or trickles) holds staging
//! memory, never an arena block: it evicts nothing. The budget bounds that memory; a PUT that would
//! pass it is refused (its body is read and dropped, so the connection stays in step).
//!
//! Buffers are reused: a few released buffers are kept so that back-to-back PUTs do not pay the page
//! faults of a fresh allocation each time.

use parking_lot::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Released buffers kept for reuse, at most.
const SPARE_BUFFERS: usize = 8;

/// The shared budget and its spare buffers.
#[derive(Debug)]
pub(super) struct BodyBudget {
    limit: u64,
    used: AtomicU64,
    spare_bytes_max: u64,
    spare: Mutex<Vec<Vec<u8>>>,
}

/// One body's staging buffer, counted against the budget until dropped.
#[derive(Debug)]
pub(super) struct StagedBody {
    buf: Vec<u8>,
    len: usize,
    budget: Arc<BodyBudget>,
}

impl BodyBudget {
    /// A budget of `limit` bytes, keeping at most `spare_bytes_max` bytes of released buffers.
    pub(super) fn new(limit: u64, spare_bytes_max: u64) -> Arc<BodyBudget> {
        Arc::new(BodyBudget {
            limit,
            used: AtomicU64::new(0),
            spare_bytes_max: spare_bytes_max.min(limit),
            spare: Mutex::new(Vec::new()),
        })
    }

    /// Bytes reserved by bodies in progress now.
    pub(super) fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    /// The budget.
    pub(super) fn limit(&self) -> u64 {
        self.limit
    }

    /// Reserve `len` bytes for one body, or `None` if the budget cannot hold them now.
    pub(super) fn try_reserve(self: &Arc<Self>, len: usize) -> Option<StagedBody> {
        let want = len as u64;
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(want).filter(|&total| total <= self.limit)
            })
            .ok()?;
        // A fresh buffer comes from calloc: its pages are mapped as the body's bytes land in them, so
        // a PUT header that declares a large body and sends nothing costs (almost) no memory.
        let buf = self.take_spare(len).unwrap_or_else(|| vec![0; len]);
        Some(StagedBody {
            buf,
            len,
            budget: self.clone(),
        })
    }

    /// The smallest spare buffer that holds `len` bytes.
    fn take_spare(&self, len: usize) -> Option<Vec<u8>> {
        let mut spare = self.spare.lock();
        let i = spare
            .iter()
            .enumerate()
            .filter(|(_, b)| b.len() >= len)
            .min_by_key(|(_, b)| b.len())
            .map(|(i, _)| i)?;
        Some(spare.swap_remove(i))
    }

    fn release(&self, buf: Vec<u8>, len: usize) {
        self.used.fetch_sub(len as u64, Ordering::AcqRel);
        let mut spare = self.spare.lock();
        let kept: u64 = spare.iter().map(|b| b.len() as u64).sum();
        if spare.len() < SPARE_BUFFERS && kept + buf.len() as u64 <= self.spare_bytes_max {
            spare.push(buf);
        }
    }
}

impl StagedBody {
    /// The body's bytes (to fill from the socket, then to copy into the hot cache).
    pub(super) fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.buf[..self.len]
    }

    /// The body's bytes.
    pub(super) fn bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

impl Drop for StagedBody {
    fn drop(&mut self) {
        self.budget.release(std::mem::take(&mut self.buf), self.len);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_past_the_budget_and_frees_on_drop() {
        let b = BodyBudget::new(100, 100);
        let a = b.try_reserve(60).expect("fits");
        assert!(b.try_reserve(41).is_none(), "60 + 41 > 100");
        let c = b.try_reserve(40).expect("60 + 40 fits exactly");
        assert_eq!(b.used(), 100);
        drop(a);
        assert_eq!(b.used(), 40);
        assert!(b.try_reserve(60).is_some());
        drop(c);
        assert_eq!(b.used(), 0);
    }

    #[test]
    fn a_body_larger_than_the_budget_is_refused() {
        let b = BodyBudget::new(10, 10);
        assert!(b.try_reserve(11).is_none());
        assert!(b.try_reserve(usize::MAX).is_none(), "no overflow");
        assert_eq!(b.used(), 0);
    }

    #[test]
    fn buffers_are_reused_with_their_bytes() {
        let b = BodyBudget::new(1 << 20, 1 << 20);
        let mut s = b.try_reserve(1000).unwrap();
        s.as_mut_slice().fill(7);
        let ptr = s.bytes().as_ptr();
        drop(s);
        let s = b.try_reserve(500).unwrap();
        assert_eq!(s.bytes().as_ptr(), ptr, "the spare buffer is reused");
        assert_eq!(s.bytes().len(), 500);
    }

    #[test]
    fn spare_memory_is_bounded() {
        let b = BodyBudget::new(1 << 20, 1000);
        drop(b.try_reserve(800).unwrap());
        drop(b.try_reserve(800).unwrap()); // reuses the first
        let (x, y) = (b.try_reserve(800).unwrap(), b.try_reserve(800).unwrap());
        drop(x);
        drop(y); // only one of the two fits in 1000 spare bytes
        assert_eq!(b.spare.lock().len(), 1);
    }
}
