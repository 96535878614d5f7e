//! The few helpers that turn raw ABI pointers into Rust references. All pointer reads in the SDK go
//! through here.

use crate::abi;

/// A slice from a raw pointer and length; `(NULL, _)` and `(_, 0)` give an empty slice.
///
/// # Safety
/// If `ptr` is non-null and `len > 0`, it must point to `len` initialised `T`s valid for `'a`.
pub(crate) unsafe fn slice<'a, T>(ptr: *const T, len: usize) -> &'a [T] {
    if ptr.is_null() || len == 0 {
        &[]
    } else {
        // SAFETY: non-null and non-empty; the caller guarantees the rest.
        unsafe { std::slice::from_raw_parts(ptr, len) }
    }
}

/// A mutable slice from a raw pointer and length, with the same NULL rule as [`slice`].
///
/// # Safety
/// If `ptr` is non-null and `len > 0`, it must point to `len` `T`s valid and unaliased for `'a`.
pub(crate) unsafe fn slice_mut<'a, T>(ptr: *mut T, len: usize) -> &'a mut [T] {
    if ptr.is_null() || len == 0 {
        &mut []
    } else {
        // SAFETY: non-null and non-empty; the caller guarantees validity and exclusivity.
        unsafe { std::slice::from_raw_parts_mut(ptr, len) }
    }
}

/// The text of a `kvh_str`; invalid UTF-8 becomes an empty string rather than undefined behaviour.
///
/// # Safety
/// `s` must describe `s.len` readable bytes valid for `'a` (or be empty).
pub(crate) unsafe fn str<'a>(s: abi::kvh_str) -> &'a str {
    // SAFETY: forwarded to the caller.
    let bytes = unsafe { slice(s.ptr.cast::<u8>(), s.len) };
    std::str::from_utf8(bytes).unwrap_or("")
}

/// A `kvh_str` borrowing `s`.
pub(crate) fn kvh_str(s: &str) -> abi::kvh_str {
    abi::kvh_str {
        ptr: s.as_ptr().cast(),
        len: s.len(),
    }
}

/// Write `msg` NUL-terminated and truncated (at a char boundary) into `buf`.
///
/// # Safety
/// `buf.ptr` must be writable for `buf.cap` bytes, or `buf.cap` must be 0.
pub(crate) unsafe fn write_message(buf: abi::kvh_message_buf, msg: &str) {
    if buf.ptr.is_null() || buf.cap == 0 {
        return;
    }
    let mut n = msg.len().min(buf.cap - 1);
    while !msg.is_char_boundary(n) {
        n -= 1;
    }
    // SAFETY: `n + 1 <= cap` bytes are writable per the caller; source and destination cannot overlap
    // because `msg` is Rust-owned.
    unsafe {
        std::ptr::copy_nonoverlapping(msg.as_ptr(), buf.ptr.cast::<u8>(), n);
        *buf.ptr.add(n) = 0;
    }
}
