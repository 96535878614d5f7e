//! Requests served by several threads at once.
//!
//! - A get: [`Pending::<Get>::share`] splits it into a [`SharedGet`] (keys and results, shareable) and
//!   one [`DstPart`] per item (its destination buffer, which can be split further and sent to other
//!   threads).
//! - A put: [`Pending::<Put>::share`] makes a [`SharedPut`] (keys, data, metadata and results,
//!   shareable).
//!
//! The request completes when the last of these handles is dropped, so no thread can touch a host
//! buffer after the host got it back.

use super::{Batch, Get, Op, Pending, Put};
use crate::key::{ChunkMeta, Key};
use crate::status::{Error, Status};
use crate::{abi, ffi};
use std::sync::{Arc, Mutex, PoisonError};

/// The shared half of a get request made by [`Pending::share`]: keys, capacities and the per-item
/// results, usable from any thread. Clones are cheap and refer to the same request.
#[derive(Clone)]
pub struct SharedGet(Arc<Shared<Get>>);

/// A put request made shareable by [`Pending::<Put>::share`]: keys, data, metadata and the per-item
/// results, usable from any thread. Clones are cheap and refer to the same request.
#[derive(Clone)]
pub struct SharedPut(Arc<Shared<Put>>);

/// The destination buffer of one item of a shared get request, or a part of it. `Send`, so a part can
/// be filled on another thread; parts never overlap.
pub struct DstPart {
    ptr: *mut u8,
    len: usize,
    item: usize,
    offset: usize,
    _request: Arc<Shared<Get>>,
}

struct Shared<O: Op> {
    /// `Some` until dropped; then completed with `failure` or OK.
    pending: Option<Pending<O>>,
    /// Serialises writes to the host's per-item result arrays.
    results: Mutex<()>,
    failure: Mutex<Option<Error>>,
}

// SAFETY: through `&Shared` the request is only read (keys, capacities, put data and metadata: host data
// that stays valid and unchanged until completion) and its result slots are written under `results`;
// get destination buffers are reached only through `DstPart`s, which are disjoint. Completion happens in
// `drop`, once.
unsafe impl<O: Op> Sync for Shared<O> {}

impl<O: Op> Shared<O> {
    fn new(pending: Pending<O>) -> Arc<Self> {
        Arc::new(Shared {
            pending: Some(pending),
            results: Mutex::new(()),
            failure: Mutex::new(None),
        })
    }

    fn batch(&self) -> &Batch<O> {
        // `pending` is taken only in `drop`, when no handle is left.
        self.pending.as_ref().expect("request completed early")
    }

    /// Run `f` with the result slots to itself.
    fn write<R>(&self, f: impl FnOnce(&Batch<O>) -> R) -> R {
        let _g = self.results.lock().unwrap_or_else(PoisonError::into_inner);
        f(self.batch())
    }

    fn fail(&self, err: Error) {
        let mut f = self.failure.lock().unwrap_or_else(PoisonError::into_inner);
        f.get_or_insert(err);
    }
}

// SAFETY: a `DstPart` is the only handle to its bytes of a host destination buffer (parts are made
// disjoint by `share` and `split_at`); the buffer stays writable until completion, which cannot happen
// while this part (which holds the request) is alive.
unsafe impl Send for DstPart {}

impl Pending<Get> {
    /// Share this request between threads: returns the [`SharedGet`] and, per item in order, its whole
    /// destination buffer as a [`DstPart`]. Gives the request back unchanged if two destination buffers
    /// overlap (the host never passes such a batch; they could not be handed out separately).
    #[allow(clippy::result_large_err)]
    pub fn share(self) -> Result<(SharedGet, Vec<DstPart>), Pending<Get>> {
        let raw = *self.batch.raw();
        let dsts: Vec<abi::kvh_mut_bytes> = (0..raw.len)
            // SAFETY: `dst` has `len` entries, checked non-null by the trampoline.
            .map(|i| unsafe { *raw.dst.add(i) })
            .collect();
        if overlapping(&dsts) {
            return Err(self);
        }
        let shared = Shared::new(self);
        let parts = dsts
            .into_iter()
            .enumerate()
            .map(|(item, b)| DstPart {
                ptr: b.ptr,
                len: if b.ptr.is_null() { 0 } else { b.len },
                item,
                offset: 0,
                _request: shared.clone(),
            })
            .collect();
        Ok((SharedGet(shared), parts))
    }
}

/// Whether any two non-empty buffers overlap.
fn overlapping(dsts: &[abi::kvh_mut_bytes]) -> bool {
    let mut spans: Vec<(usize, usize)> = dsts
        .iter()
        .filter(|b| !b.ptr.is_null() && b.len > 0)
        .map(|b| (b.ptr as usize, (b.ptr as usize).saturating_add(b.len)))
        .collect();
    spans.sort_unstable();
    spans.windows(2).any(|w| w[0].1 > w[1].0)
}

impl Pending<Put> {
    /// Share this request between threads (see [`SharedPut`]).
    pub fn share(self) -> SharedPut {
        SharedPut(Shared::new(self))
    }
}

impl<O: Op> Drop for Shared<O> {
    fn drop(&mut self) {
        let failure = self
            .failure
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(p) = self.pending.take() {
            match failure {
                Some(e) => p.fail(&e),
                None => p.complete(Status::OK),
            }
        }
    }
}

/// The methods both shared requests have: size, keys, whole-request failure.
macro_rules! shared_request_methods {
    ($t:ident) => {
        impl $t {
            /// Number of items.
            pub fn len(&self) -> usize {
                self.0.batch().len()
            }
            /// True for an empty batch.
            pub fn is_empty(&self) -> bool {
                self.len() == 0
            }
            /// Key of item `i`.
            pub fn key(&self, i: usize) -> Key<'_> {
                self.0.batch().key(i)
            }
            /// Complete the whole request with `err` instead of OK (the first such call wins).
            pub fn fail(&self, err: Error) {
                self.0.fail(err);
            }
        }
    };
}
shared_request_methods!(SharedGet);
shared_request_methods!(SharedPut);

impl SharedGet {
    /// Capacity of the destination buffer of item `i`.
    pub fn capacity(&self, i: usize) -> usize {
        self.0.batch().capacity(i)
    }
    /// Report a hit: `len` bytes were written into item `i`'s buffer, with `meta`.
    pub fn set_found(&self, i: usize, len: usize, meta: ChunkMeta) {
        self.0.write(|b| b.set_found(i, len, meta));
    }
    /// Report that item `i` needs `needed` bytes, more than its capacity.
    pub fn set_too_small(&self, i: usize, needed: usize) {
        self.0.write(|b| b.set_too_small(i, needed));
    }
    /// Report a miss or an error for item `i`.
    pub fn set_status(&self, i: usize, status: Status) {
        self.0.write(|b| b.set_status(i, status));
    }
}

impl SharedPut {
    /// Bytes of chunk `i` (borrowed from the host until completion).
    pub fn data(&self, i: usize) -> &[u8] {
        self.0.batch().data(i)
    }
    /// Metadata of chunk `i`.
    pub fn meta(&self, i: usize) -> ChunkMeta {
        self.0.batch().meta(i)
    }
    /// Report the outcome of chunk `i`.
    pub fn set_status(&self, i: usize, status: Status) {
        self.0.write(|b| b.set_status(i, status));
    }
}

impl DstPart {
    /// The item whose buffer this is part of.
    pub fn item(&self) -> usize {
        self.item
    }
    /// Where this part starts in the item's buffer.
    pub fn offset(&self) -> usize {
        self.offset
    }
    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }
    /// True for an empty part.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// Address of the first byte (for alignment checks).
    pub fn as_ptr(&self) -> *const u8 {
        self.ptr
    }
    /// The bytes of this part.
    pub fn bytes(&mut self) -> &mut [u8] {
        // SAFETY: `ptr` and `len` describe host memory writable until completion, which waits for this
        // part; no other part covers these bytes; `&mut self` prevents a second borrow.
        unsafe { ffi::slice_mut(self.ptr, self.len) }
    }
    /// Split into `[0, mid)` and `[mid, len)`. Panics if `mid > len`.
    pub fn split_at(self, mid: usize) -> (DstPart, DstPart) {
        assert!(
            mid <= self.len,
            "split at {mid} of a {}-byte part",
            self.len
        );
        let tail = if self.ptr.is_null() {
            self.ptr
        } else {
            // SAFETY: `mid <= len`, so the result stays inside (or one past) the part.
            unsafe { self.ptr.add(mid) }
        };
        let second = DstPart {
            ptr: tail,
            len: self.len - mid,
            item: self.item,
            offset: self.offset + mid,
            _request: self._request.clone(),
        };
        let first = DstPart { len: mid, ..self };
        (first, second)
    }
}

impl std::fmt::Debug for DstPart {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "DstPart(item {}, bytes {}..{})",
            self.item,
            self.offset,
            self.offset + self.len
        )
    }
}

impl std::fmt::Debug for SharedGet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SharedGet({} items)", self.len())
    }
}

impl std::fmt::Debug for SharedPut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SharedPut({} chunks)", self.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(ptr: usize, len: usize) -> abi::kvh_mut_bytes {
        abi::kvh_mut_bytes {
            ptr: ptr as *mut u8,
            len,
        }
    }

    #[test]
    fn overlap_is_found_in_any_order_and_empty_buffers_never_overlap() {
        assert!(!overlapping(&[]));
        assert!(!overlapping(&[b(4096, 100), b(4196, 100), b(8192, 1)]));
        assert!(overlapping(&[b(4096, 101), b(4196, 100)]));
        assert!(overlapping(&[b(8192, 10), b(100, 10), b(8195, 1)]));
        assert!(overlapping(&[b(4096, 10), b(4096, 10)]));
        // NULL or empty buffers take no bytes.
        assert!(!overlapping(&[b(4096, 0), b(4096, 10), b(0, 10), b(0, 10)]));
    }
}
