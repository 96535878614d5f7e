//! Low-level file I/O: aligned bounce buffers and the O_DIRECT read and write paths.
//!
//! O_DIRECT needs every transfer's memory address, file offset and length to be block-aligned. Chunk
//! data is written straight from the host's buffer when that buffer is aligned, and through a bounce
//! buffer otherwise; the last partial block is always bounced and zero-padded (files written this way
//! are padded to 4096, the header holds the true length).

use crate::format::ALIGN;
use std::fs::File;
use std::io::{self, IoSlice, IoSliceMut};
use std::os::unix::fs::FileExt;

/// Size of a worker's bounce buffer.
pub const BOUNCE: usize = 4 << 20;

/// A heap buffer whose start is aligned to [`ALIGN`] (an oversized `Vec` viewed at an aligned offset).
pub struct AlignedBuf {
    raw: Vec<u8>,
    off: usize,
    len: usize,
}

impl AlignedBuf {
    /// A zeroed buffer of `len` bytes (a multiple of [`ALIGN`]).
    pub fn new(len: usize) -> AlignedBuf {
        let align = ALIGN as usize;
        let raw = vec![0u8; len + align];
        let off = (align - raw.as_ptr() as usize % align) % align;
        AlignedBuf { raw, off, len }
    }

    /// The aligned bytes.
    pub fn as_mut(&mut self) -> &mut [u8] {
        &mut self.raw[self.off..self.off + self.len]
    }
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AlignedBuf({} bytes)", self.len)
    }
}

/// Whether `p` is aligned to [`ALIGN`].
pub fn is_aligned(p: *const u8) -> bool {
    (p as usize) % (ALIGN as usize) == 0
}

fn floor(x: usize) -> usize {
    x / ALIGN as usize * ALIGN as usize
}

fn ceil(x: usize) -> usize {
    x.div_ceil(ALIGN as usize) * ALIGN as usize
}

/// Whether an error means "this file or filesystem does not do O_DIRECT (for this transfer)".
pub fn is_direct_unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(code) if code == rustix::io::Errno::INVAL.raw_os_error()
            || code == rustix::io::Errno::OPNOTSUPP.raw_os_error()
    )
}

/// Read into `buf` at `offset` until it is full or the file ends; returns the bytes read.
pub fn read_full_at(file: &File, buf: &mut [u8], mut offset: u64) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match file.read_at(&mut buf[got..], offset) {
            Ok(0) => break,
            Ok(n) => {
                got += n;
                offset += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

fn truncated() -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        "file is shorter than its header says",
    )
}

/// Write `header` (a multiple of [`ALIGN`] bytes) then `data` to an O_DIRECT file, padding the end with
/// zeros to a block. Aligned data goes straight from `data`, in one `pwritev` with the header and the
/// padded tail (one device request per chunk); unaligned data is streamed through `bounce`.
pub fn write_direct(
    file: &File,
    header: &[u8],
    data: &[u8],
    bounce: &mut AlignedBuf,
) -> io::Result<()> {
    let buf = bounce.as_mut();
    let align = ALIGN as usize;
    if is_aligned(data.as_ptr()) && data.len() >= align && header.len() + align <= buf.len() {
        let n = floor(data.len());
        let tail = data.len() - n;
        let (h, rest) = buf.split_at_mut(header.len());
        h.copy_from_slice(header);
        let t = &mut rest[..ceil(tail)];
        t[..tail].copy_from_slice(&data[n..]);
        t[tail..].fill(0);
        let mut iov = [IoSlice::new(h), IoSlice::new(&data[..n]), IoSlice::new(t)];
        return pwritev_all(file, &mut iov, 0);
    }
    let mut w = Streamer {
        file,
        buf,
        fill: 0,
        pos: 0,
    };
    w.push(header)?;
    w.push(data)?;
    w.flush()
}

/// Write `header` at offset 0 and `data` right after it, front to back (buffered files): first header
/// and data up to the first multiple of `piece` in one `pwritev`, then the rest in writes of at most
/// `piece` bytes at `piece`-aligned offsets. Writing in file order lets the page cache fill the file
/// in order (a header written last, after the data behind it, leaves the file's pages fragmented and
/// every later read of it slower); bounded writes keep one call from running into dirty-page
/// throttling with a whole large chunk at once.
pub fn write_front_to_back(
    file: &File,
    header: &[u8],
    data: &[u8],
    piece: usize,
) -> io::Result<()> {
    let first = (header.len().next_multiple_of(piece) - header.len()).min(data.len());
    let mut iov = [IoSlice::new(header), IoSlice::new(&data[..first])];
    pwritev_all(file, &mut iov, 0)?;
    let mut pos = (header.len() + first) as u64;
    for p in data[first..].chunks(piece) {
        write_all_at(file, p, pos)?;
        pos += p.len() as u64;
    }
    Ok(())
}

/// `pwritev` every byte of `bufs` at `offset`.
fn pwritev_all(file: &File, mut bufs: &mut [IoSlice<'_>], mut offset: u64) -> io::Result<()> {
    IoSlice::advance_slices(&mut bufs, 0);
    while !bufs.is_empty() {
        match rustix::io::pwritev(file, bufs, offset) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => {
                offset += n as u64;
                IoSlice::advance_slices(&mut bufs, n);
            }
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// `preadv` into `bufs` at `offset` until they are full or the file ends; returns the bytes read.
pub fn preadv_full(
    file: &File,
    mut bufs: &mut [IoSliceMut<'_>],
    mut offset: u64,
) -> io::Result<usize> {
    let mut total = 0;
    IoSliceMut::advance_slices(&mut bufs, 0);
    while !bufs.is_empty() {
        match rustix::io::preadv(file, bufs, offset) {
            Ok(0) => break,
            Ok(n) => {
                total += n;
                offset += n as u64;
                IoSliceMut::advance_slices(&mut bufs, n);
            }
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(total)
}

/// The pieces of a one-request O_DIRECT read of a whole chunk file into an aligned destination:
/// `(aligned data bytes read straight into the destination, tail bytes, bounce bytes for the tail)`.
pub fn direct_split(data_len: usize) -> (usize, usize, usize) {
    let n = floor(data_len);
    let tail = data_len - n;
    (n, tail, ceil(tail))
}

struct Streamer<'a> {
    file: &'a File,
    buf: &'a mut [u8],
    fill: usize,
    pos: u64,
}

impl Streamer<'_> {
    fn push(&mut self, mut data: &[u8]) -> io::Result<()> {
        while !data.is_empty() {
            let n = data.len().min(self.buf.len() - self.fill);
            self.buf[self.fill..self.fill + n].copy_from_slice(&data[..n]);
            self.fill += n;
            data = &data[n..];
            if self.fill == self.buf.len() {
                self.flush()?;
            }
        }
        Ok(())
    }

    /// Write what is buffered, zero-padded to a block.
    fn flush(&mut self) -> io::Result<()> {
        if self.fill == 0 {
            return Ok(());
        }
        let n = ceil(self.fill);
        self.buf[self.fill..n].fill(0);
        write_all_at(self.file, &self.buf[..n], self.pos)?;
        self.pos += n as u64;
        self.fill = 0;
        Ok(())
    }
}

fn write_all_at(file: &File, mut data: &[u8], mut offset: u64) -> io::Result<()> {
    while !data.is_empty() {
        match file.write_at(data, offset) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => {
                data = &data[n..];
                offset += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// The first read of an O_DIRECT get: how many bytes to read at offset 0 into the bounce buffer. Just
/// the header when the data can go straight into an aligned destination, else as much of the file as
/// the bounce buffer holds.
pub fn first_direct_read(data_offset: u64, data_len: u64, dst: &[u8], bounce_len: usize) -> usize {
    let whole = ceil((data_offset + data_len) as usize);
    if is_aligned(dst.as_ptr()) && data_len >= ALIGN {
        data_offset as usize
    } else {
        whole.min(bounce_len)
    }
}

/// Read `dst.len()` data bytes starting at file offset `pos` of an O_DIRECT file into `dst`: straight
/// into `dst` when it is aligned, through `bounce` otherwise and for the last partial block. `pos` must
/// be block-aligned.
pub fn read_direct_rest(
    file: &File,
    mut pos: u64,
    dst: &mut [u8],
    bounce: &mut AlignedBuf,
) -> io::Result<()> {
    let mut done = 0;
    if is_aligned(dst.as_ptr()) {
        let n = floor(dst.len());
        if n > 0 {
            if read_full_at(file, &mut dst[..n], pos)? < n {
                return Err(truncated());
            }
            done = n;
            pos += n as u64;
        }
    }
    let buf = bounce.as_mut();
    while done < dst.len() {
        let want = dst.len() - done;
        let n = ceil(want).min(buf.len());
        let got = read_full_at(file, &mut buf[..n], pos)?;
        let take = want.min(n);
        if got < take {
            return Err(truncated());
        }
        dst[done..done + take].copy_from_slice(&buf[..take]);
        done += take;
        pos += n as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_buf_is_aligned() {
        for len in [4096, 8192, BOUNCE] {
            let mut b = AlignedBuf::new(len);
            assert!(is_aligned(b.as_mut().as_ptr()));
            assert_eq!(b.as_mut().len(), len);
        }
    }
}
