//! Safe views of the batches the host passes, and the completion model of asynchronous operations.
//!
//! `put`, `get`, `prefetch`, `contains_async` and `remove_async` receive a [`Request`]. The backend answers with a [`Submit`], which it can
//! only make by consuming the request:
//! - [`Request::finish`] ends the operation now (the host's callback never fires);
//! - [`Request::defer`] turns it into a [`Pending`] that may move to another thread and must be
//!   completed later. Completion happens exactly once: by [`Pending::complete`], or, if the `Pending` is
//!   dropped, with `KVH_ERR_CANCELED`.

use crate::key::{ChunkMeta, Key};
use crate::status::{Error, Status};
use crate::{abi, ffi};
use std::cell::Cell;
use std::marker::PhantomData;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, Ordering};

mod shared;
pub use shared::{DstPart, SharedGet, SharedPut};

thread_local! {
    /// Set when a request is deferred during the current trampoline call, so a panic after `defer`
    /// still reports PENDING (the `Pending` completes itself as it unwinds).
    pub(crate) static DEFERRED: Cell<bool> = const { Cell::new(false) };
}

mod sealed {
    pub trait Sealed {}
}

/// The kind of an asynchronous operation: [`Put`], [`Get`], [`Prefetch`], [`Contains`] or [`Remove`].
pub trait Op: sealed::Sealed {
    /// The ABI batch struct of this operation.
    type Raw;
}

/// Marker for `put` requests.
#[derive(Debug)]
pub enum Put {}
/// Marker for `get` requests.
#[derive(Debug)]
pub enum Get {}
/// Marker for `prefetch` requests.
#[derive(Debug)]
pub enum Prefetch {}
/// Marker for `contains_async` requests (ABI 1.2).
#[derive(Debug)]
pub enum Contains {}
/// Marker for `remove_async` requests (ABI 1.2).
#[derive(Debug)]
pub enum Remove {}

impl sealed::Sealed for Put {}
impl sealed::Sealed for Get {}
impl sealed::Sealed for Prefetch {}
impl sealed::Sealed for Contains {}
impl sealed::Sealed for Remove {}
impl Op for Contains {
    type Raw = abi::kvh_contains_batch;
}
impl Op for Remove {
    type Raw = abi::kvh_key_batch;
}
impl Op for Put {
    type Raw = abi::kvh_put_batch;
}
impl Op for Get {
    type Raw = abi::kvh_get_batch;
}
impl Op for Prefetch {
    type Raw = abi::kvh_key_batch;
}

/// The items of one asynchronous request. Reached through [`Request`] or [`Pending`].
pub struct Batch<O: Op> {
    raw: NonNull<O::Raw>,
}

/// What a backend returns from an asynchronous operation. Made only by consuming the request.
#[must_use]
#[derive(Debug)]
pub struct Submit(pub(crate) abi::kvh_status);

/// An asynchronous request as it arrives, on the calling host thread. Not `Send`: call
/// [`Request::defer`] to get something that may move to a worker thread.
pub struct Request<O: Op> {
    batch: Batch<O>,
    done: abi::kvh_completion,
    poisoned: *const AtomicBool,
    _not_send: PhantomData<*const ()>,
}

/// A deferred request. Complete it exactly once with [`Pending::complete`]; dropping it completes it with
/// `KVH_ERR_CANCELED`. `Send`, so it can be queued to a worker thread.
pub struct Pending<O: Op> {
    batch: Batch<O>,
    done: abi::kvh_completion,
    poisoned: *const AtomicBool,
    completed: bool,
}

// SAFETY: the ABI lets a PENDING request be completed from any thread, and every buffer it points to
// stays valid and untouched by the host until completion; `poisoned` points into the backend instance,
// which `destroy` frees only after the backend has completed all its pending requests.
unsafe impl<O: Op> Send for Pending<O> {}

impl<O: Op> Request<O> {
    /// # Safety
    /// `raw` must point to a batch valid until completion, per the ABI; `poisoned` must outlive it.
    pub(crate) unsafe fn new(
        raw: NonNull<O::Raw>,
        done: abi::kvh_completion,
        poisoned: *const AtomicBool,
    ) -> Self {
        Request {
            batch: Batch { raw },
            done,
            poisoned,
            _not_send: PhantomData,
        }
    }

    /// End the operation now with `status` (per-item statuses must already be set). The callback never
    /// fires. `PENDING` is not a final status and is reported as `INTERNAL`.
    pub fn finish(self, status: Status) -> Submit {
        let status = if status == Status::PENDING {
            Status::INTERNAL
        } else {
            status
        };
        Submit(status.0)
    }

    /// End the operation now with `err` for the whole request; its message reaches the host (as the
    /// call's `last_error`).
    pub fn fail(self, err: &Error) -> Submit {
        crate::export::set_last_error(&err.message);
        self.finish(err.status)
    }

    /// Defer the operation: the returned [`Pending`] must be completed later (or dropped).
    pub fn defer(self) -> (Pending<O>, Submit) {
        DEFERRED.with(|d| d.set(true));
        let pending = Pending {
            batch: self.batch,
            done: self.done,
            poisoned: self.poisoned,
            completed: false,
        };
        (pending, Submit(abi::KVH_PENDING))
    }
}

impl<O: Op> Pending<O> {
    /// Complete the operation with `status`. Per-item results must be written first.
    pub fn complete(mut self, status: Status) {
        self.fire(status, "");
    }

    /// Complete the operation with an error and its message.
    pub fn fail(mut self, err: &Error) {
        self.fire(err.status, &err.message);
    }

    fn fire(&mut self, status: Status, message: &str) {
        if std::mem::replace(&mut self.completed, true) {
            return;
        }
        // SAFETY: `poisoned` outlives every pending request (see the `Send` impl).
        let poisoned = unsafe { (*self.poisoned).load(Ordering::Acquire) };
        let (status, message) = if poisoned {
            (Status::POISONED, "backend poisoned by an earlier panic")
        } else {
            (status, message)
        };
        if let Some(complete) = self.done.complete {
            // SAFETY: the host's callback with its own user data, called exactly once (guarded by
            // `completed`); the message is borrowed for the call only.
            unsafe { complete(self.done.user_data, status.0, ffi::kvh_str(message)) };
        }
    }
}

impl<O: Op> Drop for Pending<O> {
    fn drop(&mut self) {
        self.fire(
            Status::CANCELED,
            "request dropped by the backend without completion",
        );
    }
}

impl<O: Op> std::ops::Deref for Request<O> {
    type Target = Batch<O>;
    fn deref(&self) -> &Batch<O> {
        &self.batch
    }
}
impl<O: Op> std::ops::DerefMut for Request<O> {
    fn deref_mut(&mut self) -> &mut Batch<O> {
        &mut self.batch
    }
}
impl<O: Op> std::ops::Deref for Pending<O> {
    type Target = Batch<O>;
    fn deref(&self) -> &Batch<O> {
        &self.batch
    }
}
impl<O: Op> std::ops::DerefMut for Pending<O> {
    fn deref_mut(&mut self) -> &mut Batch<O> {
        &mut self.batch
    }
}

impl<O: Op> Batch<O> {
    fn raw(&self) -> &O::Raw {
        // SAFETY: the host keeps the batch valid until completion; a `Batch` lives no longer.
        unsafe { self.raw.as_ref() }
    }
}

/// Write `status` into slot `i` of a host-owned status array of `len` items.
fn write_status(array: *mut abi::kvh_status, len: usize, i: usize, status: Status) {
    assert!(i < len, "item {i} out of range (batch of {len})");
    // SAFETY: the trampoline checked `array` is non-null for a non-empty batch; `i < len`.
    unsafe { *array.add(i) = status.0 };
}

fn key_at<'a>(keys: *const abi::kvh_key, len: usize, i: usize) -> Key<'a> {
    assert!(i < len, "item {i} out of range (batch of {len})");
    // SAFETY: the trampoline checked `keys` is non-null for a non-empty batch; `i < len`; the host keeps
    // the keys valid for the request's lifetime.
    Key::new(unsafe { &*keys.add(i) })
}

impl Batch<Put> {
    /// Bytes of chunk `i` (borrowed from the host; usually an arena block).
    pub fn data(&self, i: usize) -> &[u8] {
        assert!(i < self.len());
        // SAFETY: `src` has `len` entries (checked non-null by the trampoline); each describes a host
        // buffer readable until completion.
        unsafe {
            let b = *self.raw().src.add(i);
            ffi::slice(b.ptr, b.len)
        }
    }
    /// Metadata of chunk `i`.
    pub fn meta(&self, i: usize) -> ChunkMeta {
        assert!(i < self.len());
        // SAFETY: `meta` has `len` entries, checked non-null by the trampoline.
        unsafe { *self.raw().meta.add(i) }
    }
    /// Report the same outcome for every chunk.
    pub fn set_all(&self, status: Status) {
        (0..self.len()).for_each(|i| self.set_status(i, status));
    }
}

impl Batch<Get> {
    /// Capacity of the destination buffer of chunk `i`.
    pub fn capacity(&self, i: usize) -> usize {
        assert!(i < self.len());
        // SAFETY: `dst` has `len` entries, checked non-null by the trampoline.
        unsafe { (*self.raw().dst.add(i)).len }
    }
    /// The host-provided destination buffer of chunk `i`.
    pub fn dst(&mut self, i: usize) -> &mut [u8] {
        assert!(i < self.len());
        // SAFETY: `dst` has `len` entries; each is a host buffer the plugin may write until completion,
        // which the host does not touch meanwhile; `&mut self` prevents two live borrows.
        unsafe {
            let b = *self.raw().dst.add(i);
            ffi::slice_mut(b.ptr, b.len)
        }
    }
    /// Key `i` and its destination buffer at once (the key is host data, not part of the buffer, so
    /// both can be used together, e.g. to name a file while reading into the buffer).
    pub fn key_and_dst(&mut self, i: usize) -> (Key<'_>, &mut [u8]) {
        let len = self.len();
        let raw = *self.raw();
        let key = key_at(raw.keys, len, i);
        // SAFETY: `dst` has `len` entries (checked by `key_at`'s bound and the trampoline's NULL
        // check); each is a host buffer the plugin may write until completion and that never overlaps
        // the keys; `&mut self` prevents a second live borrow of it.
        let dst = unsafe {
            let b = *raw.dst.add(i);
            ffi::slice_mut(b.ptr, b.len)
        };
        (key, dst)
    }

    /// Report a hit: `len` bytes were written into `dst(i)`, with `meta`.
    pub fn set_found(&self, i: usize, len: usize, meta: ChunkMeta) {
        assert!(i < self.len());
        let raw = self.raw();
        // SAFETY: `out_len` and `out_meta` have `len` entries, checked non-null by the trampoline.
        unsafe {
            *raw.out_len.add(i) = len as u64;
            *raw.out_meta.add(i) = meta;
        }
        write_status(raw.item_status, raw.len, i, Status::OK);
    }
    /// Report that chunk `i` needs `needed` bytes, more than `capacity(i)`.
    pub fn set_too_small(&self, i: usize, needed: usize) {
        assert!(i < self.len());
        let raw = self.raw();
        // SAFETY: as in `set_found`.
        unsafe { *raw.out_len.add(i) = needed as u64 };
        write_status(raw.item_status, raw.len, i, Status::BUFFER_TOO_SMALL);
    }
    /// Copy `data` into `dst(i)` and report a hit, or report `BUFFER_TOO_SMALL`.
    pub fn fill(&mut self, i: usize, data: &[u8], meta: ChunkMeta) {
        if data.len() > self.capacity(i) {
            self.set_too_small(i, data.len());
        } else {
            self.dst(i)[..data.len()].copy_from_slice(data);
            self.set_found(i, data.len(), meta);
        }
    }
}

/// The methods every batch has: its size, its keys and the per-item status. Every ABI batch struct
/// has `keys`, `item_status` and `len`.
macro_rules! batch_common_methods {
    ($($op:ty),*) => {$(
        impl Batch<$op> {
            /// Number of items.
            pub fn len(&self) -> usize {
                self.raw().len
            }
            /// True for an empty batch.
            pub fn is_empty(&self) -> bool {
                self.len() == 0
            }
            /// Key of item `i`.
            pub fn key(&self, i: usize) -> Key<'_> {
                key_at(self.raw().keys, self.len(), i)
            }
            /// Report the outcome of item `i` (an error, or `NOT_FOUND`, or `OK` where the operation has
            /// no result besides the status).
            pub fn set_status(&self, i: usize, status: Status) {
                write_status(self.raw().item_status, self.len(), i, status);
            }
        }
    )*};
}
batch_common_methods!(Put, Get, Prefetch, Contains, Remove);

impl Batch<Contains> {
    /// Whether present keys should be pinned.
    pub fn pin(&self) -> bool {
        self.raw().pin != 0
    }
    /// Report key `i` as present with `meta`.
    pub fn set_present(&self, i: usize, meta: ChunkMeta) {
        assert!(i < self.len());
        // SAFETY: `out_meta` has `len` entries, checked non-null by the trampoline; the host does not
        // touch it until completion.
        unsafe { *self.raw().out_meta.add(i) = meta };
        write_status(self.raw().item_status, self.len(), i, Status::OK);
    }
    /// Report key `i` as absent.
    pub fn set_absent(&self, i: usize) {
        write_status(self.raw().item_status, self.len(), i, Status::NOT_FOUND);
    }
}

/// The arguments of `contains` (synchronous).
pub struct ContainsBatch<'a> {
    raw: &'a abi::kvh_contains_batch,
}

impl<'a> ContainsBatch<'a> {
    pub(crate) fn new(raw: &'a abi::kvh_contains_batch) -> Self {
        ContainsBatch { raw }
    }
    /// Number of keys.
    pub fn len(&self) -> usize {
        self.raw.len
    }
    /// True for an empty batch.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Key `i`.
    pub fn key(&self, i: usize) -> Key<'a> {
        key_at(self.raw.keys, self.raw.len, i)
    }
    /// Whether present keys should be pinned.
    pub fn pin(&self) -> bool {
        self.raw.pin != 0
    }
    /// Report key `i` as present with `meta`.
    pub fn set_present(&mut self, i: usize, meta: ChunkMeta) {
        assert!(i < self.len());
        // SAFETY: `out_meta` has `len` entries, checked non-null by the trampoline.
        unsafe { *self.raw.out_meta.add(i) = meta };
        write_status(self.raw.item_status, self.raw.len, i, Status::OK);
    }
    /// Report key `i` as absent.
    pub fn set_absent(&mut self, i: usize) {
        write_status(self.raw.item_status, self.raw.len, i, Status::NOT_FOUND);
    }
    /// Report an error for key `i`.
    pub fn set_status(&mut self, i: usize, status: Status) {
        write_status(self.raw.item_status, self.raw.len, i, status);
    }
}

/// The arguments of `remove`, `pin` and `unpin` (synchronous).
pub struct KeyBatch<'a> {
    raw: &'a abi::kvh_key_batch,
}

impl<'a> KeyBatch<'a> {
    pub(crate) fn new(raw: &'a abi::kvh_key_batch) -> Self {
        KeyBatch { raw }
    }
    /// Number of keys.
    pub fn len(&self) -> usize {
        self.raw.len
    }
    /// True for an empty batch.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Key `i`.
    pub fn key(&self, i: usize) -> Key<'a> {
        key_at(self.raw.keys, self.raw.len, i)
    }
    /// Report the outcome for key `i` (`OK`, `NOT_FOUND` or an error).
    pub fn set_status(&mut self, i: usize, status: Status) {
        write_status(self.raw.item_status, self.raw.len, i, status);
    }
}
