//! The on-disk format: one file per chunk, `<root>/<shard>/<key_hash:016x>-<short>.kvc`.
//!
//! ```text
//! offset size  field (little-endian)
//!   0     8    magic b"KVHFSCHK"
//!   8     2    format version (1)
//!  10     2    flags (0)
//!  12     4    canonical_len: bytes of the key's canonical string
//!  16     8    data_offset: where the chunk bytes start; round_up(96 + canonical_len, 4096)
//!  24     8    data_len: true length of the chunk in bytes
//!  32     8    key_hash: XXH3-64 (seed 0) of the canonical string (the ABI's `kvh_key.key_hash`)
//!  40    40    kvh_chunk_meta: length u64, fmt i32, dtype i32, ndim u32, shape[4] i32, reserved u32
//!  80     8    data_checksum: XXH3-64 over bytes [0, 80) ++ canonical ++ data
//!  88     8    header_checksum: XXH3-64 over bytes [0, 88) ++ canonical
//!  96     -    canonical string, then zeros up to data_offset
//!  data_offset data_len  the chunk bytes, then (files written with O_DIRECT only) zeros up to a
//!                        multiple of 4096
//! ```

use kvhost_plugin_sdk::ChunkMeta;
use std::hash::Hasher;
use twox_hash::XxHash3_64 as Xxh3;

/// First eight bytes of every chunk file.
pub const MAGIC: [u8; 8] = *b"KVHFSCHK";
/// The format version this code writes and reads.
pub const VERSION: u16 = 1;
/// Bytes of the fixed part of the header (before the canonical string).
pub const FIXED_LEN: usize = 96;
/// Offset of `data_checksum`; the data checksum covers the bytes before it.
const PREFIX_LEN: usize = 80;
/// Block size: data offsets, O_DIRECT transfers and capacity accounting use it.
pub const ALIGN: u64 = 4096;
/// Longest canonical key accepted (a put of a longer key fails with `INVALID_ARG`).
pub const MAX_CANONICAL: usize = 64 * 1024;
/// Largest chunk accepted (1 TiB); larger lengths in a header mean corruption.
pub const MAX_DATA_LEN: u64 = 1 << 40;
/// Extension of committed chunk files.
pub const CHUNK_EXT: &str = ".kvc";
/// Extension of temporary files (removed at start).
pub const TMP_EXT: &str = ".tmp";
/// Longest escaped key fragment in a file name.
const SHORT_MAX: usize = 48;

/// `x` rounded up to a multiple of [`ALIGN`].
pub fn round_up(x: u64) -> u64 {
    x.div_ceil(ALIGN) * ALIGN
}

/// Where the data starts for a canonical key of `canonical_len` bytes.
pub fn data_offset_for(canonical_len: usize) -> u64 {
    round_up((FIXED_LEN + canonical_len) as u64)
}

/// Bytes a chunk is charged against the capacity: its file rounded up to whole blocks.
pub fn charge_for(data_offset: u64, data_len: u64) -> u64 {
    round_up(data_offset + data_len)
}

/// The two file sizes a valid chunk file may have: unpadded (buffered writes) or padded to a block
/// (O_DIRECT writes).
pub fn valid_file_size(size: u64, data_offset: u64, data_len: u64) -> bool {
    size == data_offset + data_len || size == data_offset + round_up(data_len)
}

/// The decoded header of a chunk file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    /// `kvh_key.key_hash` of the key.
    pub key_hash: u64,
    /// Where the data starts.
    pub data_offset: u64,
    /// True data length.
    pub data_len: u64,
    /// Chunk metadata as stored by the put.
    pub meta: ChunkMeta,
    /// XXH3-64 over the header prefix, the canonical key and the data.
    pub data_checksum: u64,
    /// The key's canonical string.
    pub canonical: String,
}

/// Why a header was rejected.
pub type Invalid = &'static str;

fn put_u16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_le_bytes());
}
fn put_u32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}
fn put_u64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}
fn get_u16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
fn get_u32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}
fn get_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// The fixed 96 header bytes, without the checksums (zero) yet.
fn fixed_without_checksums(
    key_hash: u64,
    canonical_len: usize,
    data_len: u64,
    meta: &ChunkMeta,
) -> [u8; FIXED_LEN] {
    let mut b = [0u8; FIXED_LEN];
    b[0..8].copy_from_slice(&MAGIC);
    put_u16(&mut b, 8, VERSION);
    put_u16(&mut b, 10, 0);
    put_u32(&mut b, 12, canonical_len as u32);
    put_u64(&mut b, 16, data_offset_for(canonical_len));
    put_u64(&mut b, 24, data_len);
    put_u64(&mut b, 32, key_hash);
    put_u64(&mut b, 40, meta.length);
    put_u32(&mut b, 48, meta.fmt as u32);
    put_u32(&mut b, 52, meta.dtype as u32);
    put_u32(&mut b, 56, meta.ndim);
    for (i, s) in meta.shape.iter().enumerate() {
        put_u32(&mut b, 60 + 4 * i, *s as u32);
    }
    put_u32(&mut b, 76, meta.reserved);
    b
}

/// Streaming XXH3 of the data checksum: header prefix, canonical key, then the data.
pub struct DataHasher(Xxh3);

impl DataHasher {
    fn with_prefix(prefix: &[u8], canonical: &[u8]) -> Self {
        let mut h = Xxh3::with_seed(0);
        h.write(&prefix[..PREFIX_LEN]);
        h.write(canonical);
        DataHasher(h)
    }
    /// Feed chunk bytes.
    pub fn update(&mut self, data: &[u8]) {
        self.0.write(data);
    }
    /// The checksum.
    pub fn digest(&self) -> u64 {
        self.0.finish()
    }
}

/// A header about to be written: [`PendingHeader::hasher`] checksums the data, then
/// [`PendingHeader::encode`] writes the header bytes.
pub struct PendingHeader<'a> {
    fixed: [u8; FIXED_LEN],
    canonical: &'a str,
}

impl<'a> PendingHeader<'a> {
    /// Start the header of a chunk of `data_len` bytes.
    pub fn new(key_hash: u64, canonical: &'a str, data_len: u64, meta: &ChunkMeta) -> Self {
        PendingHeader {
            fixed: fixed_without_checksums(key_hash, canonical.len(), data_len, meta),
            canonical,
        }
    }

    /// Where the data starts (and the header's length, padding included).
    pub fn data_offset(&self) -> u64 {
        data_offset_for(self.canonical.len())
    }

    /// A hasher for the data checksum.
    pub fn hasher(&self) -> DataHasher {
        DataHasher::with_prefix(&self.fixed, self.canonical.as_bytes())
    }

    /// Write the complete header (`data_offset()` bytes, zero-padded) into `out`.
    pub fn encode(&self, data_checksum: u64, out: &mut [u8]) {
        assert_eq!(out.len() as u64, self.data_offset(), "header buffer size");
        let mut fixed = self.fixed;
        put_u64(&mut fixed, 80, data_checksum);
        let mut h = Xxh3::with_seed(0);
        h.write(&fixed[..88]);
        h.write(self.canonical.as_bytes());
        put_u64(&mut fixed, 88, h.finish());
        out[..FIXED_LEN].copy_from_slice(&fixed);
        let end = FIXED_LEN + self.canonical.len();
        out[FIXED_LEN..end].copy_from_slice(self.canonical.as_bytes());
        out[end..].fill(0);
    }
}

/// The fields of the fixed header part, checked for plausibility but not yet against the checksum.
#[derive(Clone, Copy, Debug)]
pub struct Fixed {
    bytes: [u8; FIXED_LEN],
    /// Bytes of the canonical string that follow the fixed part.
    pub canonical_len: usize,
    /// Where the data starts.
    pub data_offset: u64,
    /// True data length.
    pub data_len: u64,
}

impl Fixed {
    /// Parse and sanity-check the first [`FIXED_LEN`] bytes of a file.
    pub fn parse(b: &[u8]) -> Result<Fixed, Invalid> {
        if b.len() < FIXED_LEN {
            return Err("shorter than a header");
        }
        if b[0..8] != MAGIC {
            return Err("bad magic");
        }
        if get_u16(b, 8) != VERSION {
            return Err("unknown format version");
        }
        if get_u16(b, 10) != 0 {
            return Err("unknown flags");
        }
        let canonical_len = get_u32(b, 12) as usize;
        if canonical_len == 0 || canonical_len > MAX_CANONICAL {
            return Err("bad key length");
        }
        let data_offset = get_u64(b, 16);
        if data_offset != data_offset_for(canonical_len) {
            return Err("bad data offset");
        }
        let data_len = get_u64(b, 24);
        if data_len > MAX_DATA_LEN || get_u64(b, 40) != data_len {
            return Err("bad data length");
        }
        if get_u32(b, 56) > 4 {
            return Err("bad shape rank");
        }
        let mut bytes = [0u8; FIXED_LEN];
        bytes.copy_from_slice(&b[..FIXED_LEN]);
        Ok(Fixed {
            bytes,
            canonical_len,
            data_offset,
            data_len,
        })
    }

    /// Check the header checksum over the fixed part and the canonical bytes, and decode.
    pub fn finish(self, canonical: &[u8]) -> Result<Header, Invalid> {
        if canonical.len() != self.canonical_len {
            return Err("truncated key");
        }
        let mut h = Xxh3::with_seed(0);
        h.write(&self.bytes[..88]);
        h.write(canonical);
        if h.finish() != get_u64(&self.bytes, 88) {
            return Err("header checksum mismatch");
        }
        let canonical = std::str::from_utf8(canonical)
            .map_err(|_| "key is not UTF-8")?
            .to_owned();
        let b = &self.bytes;
        let mut shape = [0i32; 4];
        for (i, s) in shape.iter_mut().enumerate() {
            *s = get_u32(b, 60 + 4 * i) as i32;
        }
        Ok(Header {
            key_hash: get_u64(b, 32),
            data_offset: self.data_offset,
            data_len: self.data_len,
            meta: ChunkMeta {
                length: get_u64(b, 40),
                fmt: get_u32(b, 48) as i32,
                dtype: get_u32(b, 52) as i32,
                ndim: get_u32(b, 56),
                shape,
                reserved: get_u32(b, 76),
            },
            data_checksum: get_u64(b, 80),
            canonical,
        })
    }

    /// A hasher for verifying this file's data checksum.
    pub fn hasher(&self, canonical: &[u8]) -> DataHasher {
        DataHasher::with_prefix(&self.bytes, canonical)
    }
}

/// Decode a complete header from `b` (at least `FIXED_LEN + canonical_len` bytes).
pub fn decode(b: &[u8]) -> Result<(Fixed, Header), Invalid> {
    let fixed = Fixed::parse(b)?;
    let end = FIXED_LEN + fixed.canonical_len;
    if b.len() < end {
        return Err("truncated key");
    }
    let header = fixed.finish(&b[FIXED_LEN..end])?;
    Ok((fixed, header))
}

/// The XXH3-64 the ABI defines as `key_hash`, recomputed from a canonical string.
#[cfg(test)]
pub fn key_hash_of(canonical: &str) -> u64 {
    Xxh3::oneshot(canonical.as_bytes())
}

/// A short, file-name-safe fragment of a canonical key: bytes outside `[A-Za-z0-9._@-]` are written
/// as `%XX`, truncated to 48 bytes. For humans only; the hash identifies the file.
pub fn short_form(canonical: &str) -> String {
    let mut out = String::with_capacity(SHORT_MAX);
    for b in canonical.bytes() {
        let keep = b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'@' | b'-');
        let need = if keep { 1 } else { 3 };
        if out.len() + need > SHORT_MAX {
            break;
        }
        if keep {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The file name of a chunk: `<key_hash:016x>-<short form>.kvc`.
pub fn file_name(key_hash: u64, canonical: &str) -> String {
    format!("{key_hash:016x}-{}{CHUNK_EXT}", short_form(canonical))
}

/// The shard a key lives in, out of `shards`.
pub fn shard_of(key_hash: u64, shards: u32) -> u32 {
    ((key_hash >> 32) % u64::from(shards)) as u32
}

/// Hex digits of a shard directory name for `shards` shards (at least 1).
pub fn shard_width(shards: u32) -> usize {
    let max = shards.saturating_sub(1);
    (((32 - max.leading_zeros()) as usize).div_ceil(4)).max(1)
}

/// The directory name of shard `shard`.
pub fn shard_dir_name(shard: u32, shards: u32) -> String {
    format!("{shard:0w$x}", w = shard_width(shards))
}

/// Whether a directory entry name could be a shard directory (of any shard count up to 65536).
pub fn looks_like_shard_dir(name: &str) -> bool {
    (1..=4).contains(&name.len()) && name.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(len: u64) -> ChunkMeta {
        ChunkMeta {
            length: len,
            fmt: 1,
            dtype: -3,
            ndim: 3,
            shape: [2, -7, 9, 0],
            reserved: 0,
        }
    }

    #[test]
    fn header_round_trip() {
        let canonical = "m/odel@2@1@-abc@bfloat16@3@k%v";
        let data = b"hello world";
        let p = PendingHeader::new(42, canonical, data.len() as u64, &meta(11));
        let mut h = p.hasher();
        h.update(data);
        let sum = h.digest();
        let mut buf = vec![0xEEu8; p.data_offset() as usize];
        p.encode(sum, &mut buf);
        let (fixed, hdr) = decode(&buf).unwrap();
        assert_eq!(hdr.key_hash, 42);
        assert_eq!(hdr.canonical, canonical);
        assert_eq!(hdr.meta, meta(11));
        assert_eq!(hdr.data_offset, 4096);
        let mut v = fixed.hasher(canonical.as_bytes());
        v.update(data);
        assert_eq!(v.digest(), hdr.data_checksum);
        for i in 0..FIXED_LEN + canonical.len() {
            let mut bad = buf.clone();
            bad[i] ^= 0x40;
            assert!(decode(&bad).is_err(), "flip at {i} not detected");
        }
    }

    #[test]
    fn names() {
        assert_eq!(shard_width(1), 1);
        assert_eq!(shard_width(16), 1);
        assert_eq!(shard_width(17), 2);
        assert_eq!(shard_width(256), 2);
        assert_eq!(shard_width(65536), 4);
        assert_eq!(shard_dir_name(10, 256), "0a");
        assert_eq!(
            file_name(0xab, "a/b@1@0@ff@half"),
            "00000000000000ab-a%2Fb@1@0@ff@half.kvc"
        );
        let long = "x".repeat(100);
        assert_eq!(short_form(&long).len(), 48);
        assert_eq!(short_form("//////////////////////").len(), 48);
        assert!(looks_like_shard_dir("0f3"));
        assert!(!looks_like_shard_dir("0F"));
        assert!(!looks_like_shard_dir("abcde"));
    }

    /// Files on disk carry XXH3-64 checksums: whichever implementation computes them must give the
    /// reference values (these were computed with the `xxhash-rust` crate that wrote format-1 files
    /// before the plugin moved to `twox-hash`), split into pieces or not.
    #[test]
    fn checksums_are_standard_xxh3_64() {
        for (n, want) in [
            (0usize, 0x2d06_8005_38d3_94c2u64),
            (100_000, 0x02df_1e98_5a77_6b74),
            (3 << 20, 0xa990_da00_7fc8_c20e),
        ] {
            let v: Vec<u8> = (0..n).map(|i| (i * 31 % 251) as u8).collect();
            let mut h = Xxh3::with_seed(0);
            for piece in v.chunks(7777) {
                h.write(piece);
            }
            assert_eq!(h.finish(), want, "{n} bytes in pieces");
            assert_eq!(Xxh3::oneshot(&v), want, "{n} bytes at once");
        }
    }
}
