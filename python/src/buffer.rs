//! Python buffers lent to plugins: the one FFI module of the binding.
//!
//! A [`Lent`] is the address and length of a caller's contiguous buffer plus a strong reference that
//! keeps the memory exported: a `memoryview` made over the object (which holds the exporter's buffer,
//! so a `bytearray` cannot be resized and the memory cannot be freed while it lives), or, for a torch
//! tensor, the tensor itself. Nothing is copied on the Python side.
//!
//! A `Lent` is dropped on whatever thread releases it last (often a plugin's). Dropping its
//! `Py<PyAny>` without the GIL only queues the decref for the next time a thread takes the GIL
//! (PyO3's reference pool), so a plugin thread never waits for the GIL.

use kvhost::plugin::{DstBuf, SrcBuf};
use pyo3::exceptions::{PyBufferError, PyTypeError, PyValueError};
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::types::PyMemoryView;
use std::os::raw::c_int;
use std::sync::Arc;

/// CPython's `Py_buffer`. The layout has not changed since Python 3.3 and is part of the stable ABI
/// from 3.11; this crate targets abi3 from 3.9, whose limited headers do not declare it yet.
#[repr(C)]
struct PyBufferView {
    buf: *mut std::ffi::c_void,
    obj: *mut ffi::PyObject,
    len: ffi::Py_ssize_t,
    itemsize: ffi::Py_ssize_t,
    readonly: c_int,
    ndim: c_int,
    format: *mut std::ffi::c_char,
    shape: *mut ffi::Py_ssize_t,
    strides: *mut ffi::Py_ssize_t,
    suboffsets: *mut ffi::Py_ssize_t,
    internal: *mut std::ffi::c_void,
}

/// `PyBUF_SIMPLE`: a contiguous run of bytes (non-contiguous exporters refuse).
const PYBUF_SIMPLE: c_int = 0;
/// `PyBUF_WRITABLE`.
const PYBUF_WRITABLE: c_int = 0x0001;

extern "C" {
    // Exported by every CPython 3 (stable ABI from 3.11).
    fn PyObject_GetBuffer(obj: *mut ffi::PyObject, view: *mut PyBufferView, flags: c_int) -> c_int;
    fn PyBuffer_Release(view: *mut PyBufferView);
}

/// A caller's buffer, lent to plugins for the duration of an operation.
pub struct Lent {
    ptr: *mut u8,
    len: usize,
    writable: bool,
    /// Keeps the memory exported and alive.
    _owner: Py<PyAny>,
}

// SAFETY: the memory is owned by `_owner`, which keeps it alive and in place wherever the `Lent` goes;
// `Py<PyAny>` itself is `Send + Sync`, and the bytes are only read or written through the ABI's rules
// (a plugin writes a get destination only while the operation is pending).
unsafe impl Send for Lent {}
// SAFETY: as above; shared access only reads the address.
unsafe impl Sync for Lent {}

impl std::fmt::Debug for Lent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Lent({:p}, {} bytes)", self.ptr, self.len)
    }
}

impl Lent {
    /// Lend `obj`'s bytes: any object with the buffer protocol (`bytes`, `bytearray`, `memoryview`,
    /// numpy arrays, LMCache's `byte_array`), or a contiguous CPU torch tensor. `writable` asks for a
    /// destination.
    pub fn new(obj: &Bound<'_, PyAny>, writable: bool) -> PyResult<Lent> {
        match PyMemoryView::from(obj) {
            Ok(view) => Self::from_memoryview(view, writable),
            Err(e) if e.is_instance_of::<PyTypeError>(obj.py()) => {
                if obj.hasattr("data_ptr")? && obj.hasattr("is_contiguous")? {
                    return Self::from_tensor(obj);
                }
                Err(PyTypeError::new_err(format!(
                    "expected a buffer (bytes, bytearray, memoryview, numpy array) or a CPU torch \
                     tensor, got {}",
                    type_name(obj)
                )))
            }
            Err(e) => Err(e),
        }
    }

    fn from_memoryview(view: Bound<'_, PyMemoryView>, writable: bool) -> PyResult<Lent> {
        let flags = if writable {
            PYBUF_SIMPLE | PYBUF_WRITABLE
        } else {
            PYBUF_SIMPLE
        };
        let mut raw = std::mem::MaybeUninit::<PyBufferView>::uninit();
        // SAFETY: the GIL is held (we have a `Bound`), `view` is a live object and `raw` is writable
        // memory of `Py_buffer`'s size and layout.
        let rc = unsafe { PyObject_GetBuffer(view.as_ptr(), raw.as_mut_ptr(), flags) };
        if rc != 0 {
            let err = PyErr::take(view.py())
                .unwrap_or_else(|| PyBufferError::new_err("the object refused its buffer"));
            let why = if writable {
                "a writable, contiguous buffer is needed"
            } else {
                "a contiguous buffer is needed"
            };
            return Err(PyBufferError::new_err(format!("{why}: {err}")));
        }
        // SAFETY: `PyObject_GetBuffer` returned 0, so it filled `raw`.
        let mut raw = unsafe { raw.assume_init() };
        let (ptr, len, readonly) = (raw.buf.cast::<u8>(), raw.len, raw.readonly != 0);
        // SAFETY: releases the view just obtained, once, with the GIL held. The memory stays exported by
        // the memoryview, which `_owner` keeps.
        unsafe { PyBuffer_Release(&mut raw) };
        let len =
            usize::try_from(len).map_err(|_| PyValueError::new_err("negative buffer length"))?;
        if len > 0 && ptr.is_null() {
            return Err(PyBufferError::new_err("the buffer has no address"));
        }
        Ok(Lent {
            ptr,
            len,
            writable: !readonly,
            _owner: view.into_any().unbind(),
        })
    }

    /// A torch tensor (no buffer protocol): its storage, kept alive by a reference to the tensor.
    fn from_tensor(obj: &Bound<'_, PyAny>) -> PyResult<Lent> {
        let device: String = obj.getattr("device")?.getattr("type")?.extract()?;
        if device != "cpu" {
            return Err(PyValueError::new_err(format!(
                "a tensor on `{device}` cannot be lent to a plugin: only CPU memory"
            )));
        }
        if !obj.call_method0("is_contiguous")?.extract::<bool>()? {
            return Err(PyValueError::new_err(
                "a non-contiguous tensor cannot be lent to a plugin: call .contiguous() first",
            ));
        }
        let ptr: usize = obj.call_method0("data_ptr")?.extract()?;
        let numel: usize = obj.call_method0("numel")?.extract()?;
        let size: usize = obj.call_method0("element_size")?.extract()?;
        let len = numel
            .checked_mul(size)
            .ok_or_else(|| PyValueError::new_err("tensor size overflows"))?;
        Ok(Lent {
            ptr: ptr as *mut u8,
            len,
            writable: true,
            _owner: obj.clone().unbind(),
        })
    }
}

fn type_name(obj: &Bound<'_, PyAny>) -> String {
    obj.get_type()
        .name()
        .map(|n| n.to_string())
        .unwrap_or_else(|_| "an unknown type".into())
}

/// A lent source: `len` bytes at `off` in a lent buffer. Clones share it (one per plugin tier of a
/// write-through put).
#[derive(Clone, Debug)]
pub struct Src {
    pub lent: Arc<Lent>,
    off: usize,
    len: usize,
}

impl Src {
    /// The whole buffer.
    pub fn whole(lent: Arc<Lent>) -> Src {
        let len = lent.len;
        Src { lent, off: 0, len }
    }

    /// `len` bytes at `off`, checked against the buffer's bounds.
    pub fn region(lent: Arc<Lent>, off: usize, len: usize) -> PyResult<Src> {
        check_region(&lent, off, len)?;
        Ok(Src { lent, off, len })
    }
}

fn check_region(lent: &Lent, off: usize, len: usize) -> PyResult<()> {
    match off.checked_add(len) {
        Some(end) if end <= lent.len => Ok(()),
        _ => Err(PyValueError::new_err(format!(
            "region of {len} bytes at offset {off} is outside the {}-byte buffer",
            lent.len
        ))),
    }
}

impl SrcBuf for Src {
    fn bytes(&self) -> &[u8] {
        if self.len == 0 {
            return &[];
        }
        // SAFETY: `off..off+len` lies inside the exporter's live, contiguous memory (checked when the
        // region was made; `ptr` is non-null when the buffer is not empty); it stays in place while the
        // `Lent`'s owner lives, which outlives this borrow.
        unsafe { std::slice::from_raw_parts(self.lent.ptr.add(self.off), self.len) }
    }
}

/// A lent destination: `len` bytes at `off` in a writable lent buffer. The binding creates one per
/// destination per operation and refuses overlapping destinations, so the `&mut` it hands a plugin is
/// the only one.
#[derive(Debug)]
pub struct Dst {
    pub lent: Arc<Lent>,
    off: usize,
    len: usize,
}

impl Dst {
    /// `len` bytes at `off` of a writable lent buffer (the whole buffer: `0, lent.len`).
    pub fn new(lent: Arc<Lent>, off: usize, len: usize) -> PyResult<Dst> {
        if !lent.writable {
            return Err(PyBufferError::new_err(
                "the destination buffer is read-only (pass a bytearray, a writable memoryview or array)",
            ));
        }
        check_region(&lent, off, len)?;
        Ok(Dst { lent, off, len })
    }

    /// The whole of a writable lent buffer.
    pub fn whole(lent: Arc<Lent>) -> PyResult<Dst> {
        let len = lent.len;
        Dst::new(lent, 0, len)
    }

    /// The address range, for overlap checks.
    pub fn range(&self) -> std::ops::Range<usize> {
        let start = self.lent.ptr as usize + self.off;
        start..start + self.len
    }
}

impl DstBuf for Dst {
    fn bytes_mut(&mut self) -> &mut [u8] {
        if self.len == 0 {
            return &mut [];
        }
        // SAFETY: as in `Src::bytes`, and the exporter granted write access (`Dst::new` checked it). No
        // other `Dst` covers these bytes during the operation (the binding refuses overlapping
        // destinations), so this is the only mutable view the host creates.
        unsafe { std::slice::from_raw_parts_mut(self.lent.ptr.add(self.off), self.len) }
    }
}
