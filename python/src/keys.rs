//! Keys from Python: LMCache key strings, `CacheEngineKey` objects, and multi-process `ObjectKey`s.
//!
//! An `ObjectKey` string (`model@kv_rank:08x@group:x@hash_hex[@salt]`, LMCache's native-connector wire
//! form) becomes the canonical kvhost key
//! `model@world_size@global_rank@hash64:x@mp@kv_rank%RRRRRRRR@group%G@hash%H[@salt%S]`, so plugins see a
//! well-formed key (ABI `kvh_key`), and every field of the original stays in it: distinct object keys
//! never share a kvhost key, and the same object key maps to the same kvhost key in every process.

use kvhost::ChunkKey;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyString;
use std::fmt::Write;

/// How strings are read as keys.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyFormat {
    /// A `CacheEngineKey` string if it parses as one, else an `ObjectKey` string.
    Auto,
    /// `CacheEngineKey` strings only.
    Engine,
    /// `ObjectKey` strings only (LMCache's multi-process L2 adapters).
    Object,
}

impl KeyFormat {
    pub fn parse(s: &str) -> PyResult<KeyFormat> {
        Ok(match s {
            "auto" => KeyFormat::Auto,
            "engine" => KeyFormat::Engine,
            "object" => KeyFormat::Object,
            other => {
                return Err(PyValueError::new_err(format!(
                    "key_format `{other}`: expected `auto`, `engine` or `object`"
                )))
            }
        })
    }
}

/// The canonical kvhost key of an `ObjectKey` string.
pub fn from_object_key(s: &str) -> Result<ChunkKey, String> {
    let fields: Vec<&str> = s.split('@').collect();
    if !(4..=5).contains(&fields.len()) {
        return Err(format!(
            "object key `{s}`: expected 4 or 5 `@`-separated fields (model@kv_rank@group@hash[@salt])"
        ));
    }
    let (model, rank, group, hash) = (fields[0], fields[1], fields[2], fields[3]);
    let hex = |t: &str| !t.is_empty() && t.bytes().all(|b| b.is_ascii_hexdigit());
    if rank.len() != 8 || !hex(rank) {
        return Err(format!(
            "object key `{s}`: kv_rank `{rank}` is not 8 hex digits"
        ));
    }
    if !hex(group) {
        return Err(format!(
            "object key `{s}`: object_group_id `{group}` is not hex"
        ));
    }
    if !hex(hash) || hash.len() % 2 != 0 {
        return Err(format!(
            "object key `{s}`: chunk_hash `{hash}` is not hex bytes"
        ));
    }
    let kv_rank = u32::from_str_radix(rank, 16).map_err(|e| format!("object key `{s}`: {e}"))?;
    // LMCache's own 64-bit view of a hash: the low 64 bits of the big-endian integer.
    let tail = &hash[hash.len().saturating_sub(16)..];
    let hash64 = u64::from_str_radix(tail, 16).map_err(|e| format!("object key `{s}`: {e}"))?;
    // The canonical text, written once (this runs per key on the data path), then parsed and checked
    // like any other key.
    let mut text = String::with_capacity(s.len() + 64);
    let _ = write!(
        text,
        "{model}@{}@{}@{hash64:x}@mp@kv_rank%{rank}@group%{group}@hash%{hash}",
        (kv_rank >> 24) & 0xff,
        (kv_rank >> 16) & 0xff
    );
    if let Some(salt) = fields.get(4) {
        text.push_str("@salt%");
        text.push_str(salt);
    }
    ChunkKey::parse(&text).map_err(|e| format!("object key `{s}`: {e}"))
}

/// A key from a string in `format`.
pub fn from_str(s: &str, format: KeyFormat) -> Result<ChunkKey, String> {
    match format {
        KeyFormat::Engine => ChunkKey::parse(s).map_err(|e| e.to_string()),
        KeyFormat::Object => from_object_key(s),
        KeyFormat::Auto => ChunkKey::parse(s).or_else(|engine| {
            from_object_key(s).map_err(|object| {
                format!("`{s}` is neither a CacheEngineKey string ({engine}) nor an ObjectKey string ({object})")
            })
        }),
    }
}

/// A key from a Python object: a `str`, or an object with `to_string()` (LMCache's `CacheEngineKey`).
pub fn from_py(obj: &Bound<'_, PyAny>, format: KeyFormat) -> PyResult<ChunkKey> {
    let text = if let Ok(s) = obj.cast::<PyString>() {
        s.to_cow()?.into_owned()
    } else if obj.hasattr("to_string")? {
        obj.call_method0("to_string")?.extract::<String>()?
    } else {
        return Err(PyValueError::new_err(format!(
            "a key must be a str or a CacheEngineKey, got {}",
            obj.get_type().name()?
        )));
    };
    from_str(&text, format).map_err(PyValueError::new_err)
}

/// Keys from a Python iterable.
pub fn many(objs: &Bound<'_, PyAny>, format: KeyFormat) -> PyResult<Vec<ChunkKey>> {
    objs.try_iter()?.map(|o| from_py(&o?, format)).collect()
}
