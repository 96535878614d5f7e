//! `ChunkKey`: LMCache's `CacheEngineKey` / `LayerCacheEngineKey`.
//!
//! The canonical string `model@world_size@worker_id@{hash:x}@dtype[@layer][@k%v…]` is built (or parsed)
//! once, hashed once with XXH3-64, and shared by reference count afterwards: the data path never formats
//! a key again.

mod chunker;

pub use chunker::{Chunk, Chunker, NONE_HASH};

use std::fmt;
use std::hash::{Hash, Hasher};
use std::ops::Range;
use std::sync::Arc;

/// Why a key string did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// Fewer than the five `@`-separated fields.
    #[error(
        "key `{0}` has fewer than 5 `@`-separated fields (model@world_size@worker_id@hash@dtype)"
    )]
    TooFewFields(String),
    /// A numeric field is not a number.
    #[error("key `{key}`: field {field} `{value}` is not a valid {what}")]
    BadNumber {
        /// The whole key.
        key: String,
        /// Which field.
        field: &'static str,
        /// Its text.
        value: String,
        /// What was expected.
        what: &'static str,
    },
    /// A trailing field is neither a layer id nor `k%v`.
    #[error("key `{key}`: tag `{tag}` is not of the form k%v")]
    BadTag {
        /// The whole key.
        key: String,
        /// The field.
        tag: String,
    },
    /// A field contains `@` or is empty.
    #[error("key field {field} `{value}` is empty or contains `@`")]
    BadField {
        /// Which field.
        field: &'static str,
        /// Its text.
        value: String,
    },
}

/// A KV chunk key. Cheap to clone (one reference count); hashes and compares by its canonical string.
#[derive(Clone)]
pub struct ChunkKey {
    /// Canonical string followed by a NUL, so it can be handed to C as-is.
    text: Arc<str>,
    model: Range<u32>,
    dtype: Range<u32>,
    /// `(key, value)` ranges into `text`.
    tags: Arc<[(Range<u32>, Range<u32>)]>,
    world_size: u32,
    worker_id: u32,
    layer_id: Option<u32>,
    chunk_hash: i128,
    key_hash: u64,
    key_check: u64,
}

/// The seed of [`ChunkKey::key_check`], so that it is independent of `key_hash` (unseeded XXH3).
const CHECK_SEED: u64 = 0x6b76_686f_7374_2d32;

fn check_field(field: &'static str, value: &str) -> Result<(), KeyError> {
    if value.is_empty() || value.contains('@') || value.contains('\0') {
        return Err(KeyError::BadField {
            field,
            value: value.to_string(),
        });
    }
    Ok(())
}

fn hex(hash: i128) -> String {
    if hash < 0 {
        format!("-{:x}", hash.unsigned_abs())
    } else {
        format!("{hash:x}")
    }
}

impl ChunkKey {
    /// A key from its fields (no layer, no tags).
    pub fn new(
        model_name: &str,
        world_size: u32,
        worker_id: u32,
        chunk_hash: i128,
        dtype: &str,
    ) -> Result<Self, KeyError> {
        Self::build(
            model_name,
            world_size,
            worker_id,
            chunk_hash,
            dtype,
            None,
            &[],
        )
    }

    /// A key from all its fields.
    pub fn build(
        model_name: &str,
        world_size: u32,
        worker_id: u32,
        chunk_hash: i128,
        dtype: &str,
        layer_id: Option<u32>,
        tags: &[(&str, &str)],
    ) -> Result<Self, KeyError> {
        check_field("model_name", model_name)?;
        check_field("dtype", dtype)?;
        for (k, v) in tags {
            check_field("tag key", k)?;
            check_field("tag value", v)?;
            if k.contains('%') {
                return Err(KeyError::BadField {
                    field: "tag key",
                    value: k.to_string(),
                });
            }
        }
        let mut s = format!(
            "{model_name}@{world_size}@{worker_id}@{}@{dtype}",
            hex(chunk_hash)
        );
        if let Some(layer) = layer_id {
            s.push_str(&format!("@{layer}"));
        }
        for (k, v) in tags {
            s.push_str(&format!("@{k}%{v}"));
        }
        Self::parse(&s)
    }

    /// Parse LMCache's canonical string (also accepts per-layer keys).
    pub fn parse(s: &str) -> Result<Self, KeyError> {
        let s = s.trim_end_matches('\0');
        let bad_num = |field, value: &str, what| KeyError::BadNumber {
            key: s.to_string(),
            field,
            value: value.to_string(),
            what,
        };
        let mut ranges = Vec::with_capacity(8);
        let mut start = 0usize;
        for (i, b) in s.bytes().enumerate() {
            if b == b'@' {
                ranges.push(start..i);
                start = i + 1;
            }
        }
        ranges.push(start..s.len());
        if ranges.len() < 5 {
            return Err(KeyError::TooFewFields(s.to_string()));
        }
        let field = |i: usize| &s[ranges[i].clone()];
        check_field("model_name", field(0))?;
        check_field("dtype", field(4))?;
        let world_size = field(1)
            .parse()
            .map_err(|_| bad_num("world_size", field(1), "u32"))?;
        let worker_id = field(2)
            .parse()
            .map_err(|_| bad_num("worker_id", field(2), "u32"))?;
        let hash_text = field(3);
        let (neg, digits) = match hash_text.strip_prefix('-') {
            Some(d) => (true, d),
            None => (false, hash_text),
        };
        let magnitude = u128::from_str_radix(digits, 16)
            .map_err(|_| bad_num("chunk_hash", hash_text, "hex integer"))?;
        let chunk_hash = if neg {
            0i128
                .checked_sub_unsigned(magnitude)
                .ok_or_else(|| bad_num("chunk_hash", hash_text, "128-bit hash"))?
        } else {
            i128::try_from(magnitude)
                .map_err(|_| bad_num("chunk_hash", hash_text, "128-bit hash"))?
        };
        // Canonical form, as `hex` writes it: lower case, no leading zeros, no `-0` (checked without
        // formatting: this runs for every key that enters the host).
        let canonical = digits
            .bytes()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
            && (digits == "0" && !neg || !digits.starts_with('0'));
        debug_assert_eq!(canonical, hex(chunk_hash) == hash_text);
        if !canonical {
            return Err(bad_num(
                "chunk_hash",
                hash_text,
                "canonical lower-case hex integer",
            ));
        }
        let mut rest = 5;
        let mut layer_id = None;
        if ranges.len() > 5 && !field(5).is_empty() && field(5).bytes().all(|b| b.is_ascii_digit())
        {
            layer_id = Some(
                field(5)
                    .parse()
                    .map_err(|_| bad_num("layer_id", field(5), "u32"))?,
            );
            rest = 6;
        }
        let mut tags = Vec::new();
        for r in ranges[rest..].iter().cloned() {
            let t = &s[r.clone()];
            let Some(p) = t.find('%') else {
                return Err(KeyError::BadTag {
                    key: s.to_string(),
                    tag: t.to_string(),
                });
            };
            if p == 0 || p + 1 == t.len() {
                return Err(KeyError::BadTag {
                    key: s.to_string(),
                    tag: t.to_string(),
                });
            }
            let (a, b) = (r.start as u32, r.end as u32);
            tags.push((a..a + p as u32, a + p as u32 + 1..b));
        }
        let mut text = String::with_capacity(s.len() + 1);
        text.push_str(s);
        text.push('\0');
        Ok(ChunkKey {
            key_hash: xxhash_rust::xxh3::xxh3_64(s.as_bytes()),
            key_check: xxhash_rust::xxh3::xxh3_64_with_seed(s.as_bytes(), CHECK_SEED),
            text: Arc::from(text),
            model: ranges[0].start as u32..ranges[0].end as u32,
            dtype: ranges[4].start as u32..ranges[4].end as u32,
            tags: Arc::from(tags),
            world_size,
            worker_id,
            layer_id,
            chunk_hash,
        })
    }

    /// The canonical string.
    pub fn as_str(&self) -> &str {
        &self.text[..self.text.len() - 1]
    }

    /// The canonical string with its trailing NUL.
    pub(crate) fn as_str_with_nul(&self) -> &str {
        &self.text
    }

    fn slice(&self, r: &Range<u32>) -> &str {
        &self.text[r.start as usize..r.end as usize]
    }

    /// Model name.
    pub fn model_name(&self) -> &str {
        self.slice(&self.model)
    }
    /// LMCache dtype string.
    pub fn dtype(&self) -> &str {
        self.slice(&self.dtype)
    }
    /// World size.
    pub fn world_size(&self) -> u32 {
        self.world_size
    }
    /// Worker id.
    pub fn worker_id(&self) -> u32 {
        self.worker_id
    }
    /// Layer id of a per-layer key.
    pub fn layer_id(&self) -> Option<u32> {
        self.layer_id
    }
    /// The chunk hash (Python ints of up to 128 bits, sign included).
    pub fn chunk_hash(&self) -> i128 {
        self.chunk_hash
    }
    /// XXH3-64 of the canonical string: stable, computed once.
    pub fn key_hash(&self) -> u64 {
        self.key_hash
    }
    /// A second 64-bit hash of the canonical string, independent of [`ChunkKey::key_hash`] (seeded
    /// XXH3): with it, the hot cache's index tells keys apart without reading their text.
    pub fn key_check(&self) -> u64 {
        self.key_check
    }
    /// The tags in key order.
    pub fn tags(&self) -> impl Iterator<Item = (&str, &str)> {
        self.tags
            .iter()
            .map(|(k, v)| (self.slice(k), self.slice(v)))
    }
    pub(crate) fn tag_ranges(&self) -> &[(Range<u32>, Range<u32>)] {
        &self.tags
    }
    pub(crate) fn model_range(&self) -> Range<u32> {
        self.model.clone()
    }
    pub(crate) fn dtype_range(&self) -> Range<u32> {
        self.dtype.clone()
    }
}

impl PartialEq for ChunkKey {
    fn eq(&self, other: &Self) -> bool {
        // Keys are usually clones of one another: the pointer check avoids touching the text.
        self.key_hash == other.key_hash
            && (Arc::ptr_eq(&self.text, &other.text) || self.text == other.text)
    }
}
impl Eq for ChunkKey {}

impl Hash for ChunkKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u64(self.key_hash);
    }
}

impl fmt::Debug for ChunkKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChunkKey({})", self.as_str())
    }
}

impl fmt::Display for ChunkKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for ChunkKey {
    type Err = KeyError;
    fn from_str(s: &str) -> Result<Self, KeyError> {
        ChunkKey::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_like_lmcache() {
        let k = ChunkKey::new("meta-llama/Llama-3.1-8B", 2, 1, 0x1f, "bfloat16").unwrap();
        assert_eq!(k.as_str(), "meta-llama/Llama-3.1-8B@2@1@1f@bfloat16");
        let neg = ChunkKey::new("m", 1, 0, -255, "half").unwrap();
        assert_eq!(neg.as_str(), "m@1@0@-ff@half");
        assert_eq!(neg.chunk_hash(), -255);
    }

    #[test]
    fn parses_layers_and_tags() {
        let k = ChunkKey::parse("m@1@0@-7b@float@3@user%alice@tier%gold").unwrap();
        assert_eq!(k.layer_id(), Some(3));
        assert_eq!(k.chunk_hash(), -0x7b);
        assert_eq!(
            k.tags().collect::<Vec<_>>(),
            vec![("user", "alice"), ("tier", "gold")]
        );
        assert_eq!(k.model_name(), "m");
        assert_eq!(k.dtype(), "float");
        let rebuilt = ChunkKey::build(
            "m",
            1,
            0,
            -0x7b,
            "float",
            Some(3),
            &[("user", "alice"), ("tier", "gold")],
        )
        .unwrap();
        assert_eq!(rebuilt, k);
    }

    #[test]
    fn rejects_malformed() {
        assert!(matches!(
            ChunkKey::parse("m@1@0@ff"),
            Err(KeyError::TooFewFields(_))
        ));
        assert!(matches!(
            ChunkKey::parse("m@x@0@ff@half"),
            Err(KeyError::BadNumber {
                field: "world_size",
                ..
            })
        ));
        assert!(matches!(
            ChunkKey::parse("m@1@0@zz@half"),
            Err(KeyError::BadNumber {
                field: "chunk_hash",
                ..
            })
        ));
        assert!(matches!(
            ChunkKey::parse("m@1@0@0ff@half"),
            Err(KeyError::BadNumber { .. })
        ));
        assert!(matches!(
            ChunkKey::parse("m@1@0@ff@half@notatag"),
            Err(KeyError::BadTag { .. })
        ));
        assert!(ChunkKey::new("a@b", 1, 0, 1, "half").is_err());
    }

    #[test]
    fn full_u64_and_i64_ranges_round_trip() {
        for h in [i64::MIN as i128, i64::MAX as i128, u64::MAX as i128, 0] {
            let k = ChunkKey::new("m", 1, 0, h, "half").unwrap();
            assert_eq!(ChunkKey::parse(k.as_str()).unwrap().chunk_hash(), h);
        }
    }
}
