//! How a chunk is laid out in Redis: key names and the value headers.
//!
//! A chunk of `L` bytes with key hash `h` (16 hex digits) and canonical key `K`, under prefix `P`:
//! - `L <= part_size`: one string `P{h}m:K` = 64-byte [`Head`] (parts = 0) ++ data.
//! - otherwise: parts `P{h}p<g>.<i>:K` (i = 0..n; g = the write's 64-bit generation, 16 hex digits) =
//!   16-byte part header ++ data[i*part_size..], written first, then the manifest `P{h}m:K` = [`Head`]
//!   alone (parts = n, generation g). The manifest is written only after every part was acknowledged,
//!   so a chunk is visible only when complete. Writers of the same key (two hosts storing the same
//!   prefix) write disjoint parts; whichever manifest lands last names a complete set, and its writer
//!   unlinks the parts of the manifest it replaced (`SET ... GET`).
//! - `{h}` is a Redis Cluster hash tag: every key of a chunk hashes to the same slot, so a chunk never
//!   spans nodes and one pipeline per node carries it.
//! - Every part also carries the generation and its index in its header: a reader that finds a part
//!   missing (unlinked by a newer write, evicted, or deleted), foreign or of the wrong length reports
//!   a miss.

use kvhost_plugin_sdk::ChunkMeta;
use xxhash_rust::xxh3::xxh3_64;

/// Bytes of [`Head`].
pub const HEAD_LEN: usize = 64;
/// Bytes of [`PartHead`].
pub const PART_HEAD_LEN: usize = 16;
const MAGIC: &[u8; 4] = b"KVHR";
const PART_MAGIC: &[u8; 4] = b"KVHp";
const VERSION: u16 = 1;

/// The manifest / inline-value header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Head {
    /// Chunk length in bytes.
    pub len: u64,
    /// Number of parts (0: data follows the header in the same value).
    pub parts: u32,
    /// Bytes per part (the last part may be shorter).
    pub part_size: u32,
    /// Generation of this write (ties parts to their manifest).
    pub gen: u64,
    /// Chunk metadata.
    pub meta: ChunkMeta,
}

impl Head {
    /// Serialise (little endian, checksummed).
    pub fn encode(&self) -> [u8; HEAD_LEN] {
        let mut b = [0u8; HEAD_LEN];
        b[0..4].copy_from_slice(MAGIC);
        b[4..6].copy_from_slice(&VERSION.to_le_bytes());
        b[8..16].copy_from_slice(&self.len.to_le_bytes());
        b[16..20].copy_from_slice(&self.parts.to_le_bytes());
        b[20..24].copy_from_slice(&self.part_size.to_le_bytes());
        b[24..32].copy_from_slice(&self.gen.to_le_bytes());
        b[32..36].copy_from_slice(&self.meta.fmt.to_le_bytes());
        b[36..40].copy_from_slice(&self.meta.dtype.to_le_bytes());
        b[40..44].copy_from_slice(&self.meta.ndim.to_le_bytes());
        for (i, s) in self.meta.shape.iter().enumerate() {
            b[44 + 4 * i..48 + 4 * i].copy_from_slice(&s.to_le_bytes());
        }
        let sum = xxh3_64(&b[..60]) as u32;
        b[60..64].copy_from_slice(&sum.to_le_bytes());
        b
    }

    /// Parse and check a header; `Err` says what is wrong.
    pub fn decode(b: &[u8]) -> Result<Head, String> {
        if b.len() < HEAD_LEN {
            return Err(format!("header is {} bytes, expected {HEAD_LEN}", b.len()));
        }
        if &b[0..4] != MAGIC {
            return Err("bad magic (not written by kvhost's redis plugin)".into());
        }
        let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap_or_default());
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap_or_default());
        if u16_at(4) != VERSION {
            return Err(format!(
                "format version {} (this plugin reads {VERSION})",
                u16_at(4)
            ));
        }
        if u32_at(60) != xxh3_64(&b[..60]) as u32 {
            return Err("header checksum mismatch".into());
        }
        let len = u64_at(8);
        let mut shape = [0i32; 4];
        for (i, s) in shape.iter_mut().enumerate() {
            *s = u32_at(44 + 4 * i) as i32;
        }
        let head = Head {
            len,
            parts: u32_at(16),
            part_size: u32_at(20),
            gen: u64_at(24),
            meta: ChunkMeta {
                length: len,
                fmt: u32_at(32) as i32,
                dtype: u32_at(36) as i32,
                ndim: u32_at(40),
                shape,
                reserved: 0,
            },
        };
        if head.parts > 0 {
            let ps = head.part_size as u64;
            if ps == 0 || head.len.div_ceil(ps) != head.parts as u64 {
                return Err(format!(
                    "{} parts of {} bytes cannot hold {} bytes",
                    head.parts, head.part_size, head.len
                ));
            }
        }
        Ok(head)
    }

    /// Byte range of part `i` within the chunk.
    pub fn part_range(&self, i: u32) -> std::ops::Range<usize> {
        let start = i as u64 * self.part_size as u64;
        let end = (start + self.part_size as u64).min(self.len);
        start as usize..end as usize
    }
}

/// The header of one part.
pub fn part_head(gen: u64, index: u32) -> [u8; PART_HEAD_LEN] {
    let mut b = [0u8; PART_HEAD_LEN];
    b[0..4].copy_from_slice(PART_MAGIC);
    b[4..8].copy_from_slice(&index.to_le_bytes());
    b[8..16].copy_from_slice(&gen.to_le_bytes());
    b
}

/// Key names of one chunk.
#[derive(Clone, Debug)]
pub struct Names {
    /// `P{h}`: prefix and hash tag.
    tagged: String,
    canonical: String,
}

impl Names {
    /// Names for the chunk with `key_hash` and `canonical` key under `prefix`.
    pub fn new(prefix: &str, key_hash: u64, canonical: &str) -> Names {
        Names {
            tagged: format!("{prefix}{{{key_hash:016x}}}"),
            canonical: canonical.to_string(),
        }
    }

    /// The manifest (or inline value) key.
    pub fn manifest(&self) -> Vec<u8> {
        format!("{}m:{}", self.tagged, self.canonical).into_bytes()
    }

    /// The key of part `i` of the write with generation `gen`.
    pub fn part(&self, gen: u64, i: u32) -> Vec<u8> {
        format!("{}p{gen:016x}.{i}:{}", self.tagged, self.canonical).into_bytes()
    }

    /// The hash tag, for slot routing (every key of the chunk has it).
    pub fn slot_key(&self) -> &[u8] {
        self.tagged.as_bytes()
    }
}

/// Redis Cluster's slot of `key`: CRC16/XMODEM of its hash tag (or of the whole key) mod 16384.
pub fn slot_of(key: &[u8]) -> u16 {
    let tag = key
        .iter()
        .position(|&c| c == b'{')
        .and_then(|open| {
            let rest = &key[open + 1..];
            rest.iter()
                .position(|&c| c == b'}')
                .filter(|&close| close > 0)
                .map(|close| &rest[..close])
        })
        .unwrap_or(key);
    crc16::State::<crc16::XMODEM>::calculate(tag) % 16384
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(len: u64) -> ChunkMeta {
        ChunkMeta {
            length: len,
            fmt: 1,
            dtype: 3,
            ndim: 4,
            shape: [2, 256, 8, -1],
            reserved: 0,
        }
    }

    #[test]
    fn head_round_trips_and_rejects_damage() {
        let h = Head {
            len: 10 << 20,
            parts: 3,
            part_size: 4 << 20,
            gen: 0xfeed,
            meta: meta(10 << 20),
        };
        let b = h.encode();
        assert_eq!(Head::decode(&b).unwrap(), h);
        for i in 0..HEAD_LEN {
            let mut bad = b;
            bad[i] ^= 0x40;
            assert!(Head::decode(&bad).is_err(), "flip at byte {i} accepted");
        }
        assert!(Head::decode(&b[..63]).is_err());
        assert_eq!(h.part_range(2), (8 << 20)..(10 << 20));
    }

    #[test]
    fn inconsistent_part_counts_are_rejected() {
        let mut h = Head {
            len: 9,
            parts: 2,
            part_size: 4,
            gen: 1,
            meta: meta(9),
        };
        assert!(Head::decode(&h.encode()).is_err());
        h.parts = 3;
        assert!(Head::decode(&h.encode()).is_ok());
    }

    #[test]
    fn every_key_of_a_chunk_shares_one_slot() {
        let n = Names::new("kv:", 0x1234_5678_9abc_def0, "model@1@0@42@half");
        let s = slot_of(n.slot_key());
        assert_eq!(slot_of(&n.manifest()), s);
        assert_eq!(slot_of(&n.part(u64::MAX, 7)), s);
        // Known values from the Redis Cluster specification's test vector and `CLUSTER KEYSLOT`.
        assert_eq!(
            crc16::State::<crc16::XMODEM>::calculate(b"123456789"),
            0x31C3
        );
        assert_eq!(slot_of(b"foo"), 12182);
        assert_eq!(slot_of(b"{user1000}.following"), slot_of(b"user1000"));
        // An empty tag `{}` does not count: the whole key is hashed.
        assert_eq!(
            slot_of(b"foo{}{bar}"),
            crc16::State::<crc16::XMODEM>::calculate(b"foo{}{bar}") % 16384
        );
    }
}
