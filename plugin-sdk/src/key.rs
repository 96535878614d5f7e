//! Read-only views of what the host passes: keys and chunk metadata.

use crate::{abi, ffi};

/// Chunk metadata (LMCache integer codes). The ABI struct itself, re-exported under a Rust name.
pub type ChunkMeta = abi::kvh_chunk_meta;

/// A borrowed view of one key of a request.
#[derive(Clone, Copy)]
pub struct Key<'a> {
    raw: &'a abi::kvh_key,
}

impl<'a> Key<'a> {
    pub(crate) fn new(raw: &'a abi::kvh_key) -> Self {
        Key { raw }
    }

    /// LMCache's canonical string: `model@ws@wid@{hash:x}@dtype[@layer][@k%v…]`. Unique per key.
    pub fn canonical(&self) -> &'a str {
        // SAFETY: the host guarantees the key's strings are valid for the request's lifetime `'a`.
        unsafe { ffi::str(self.raw.canonical) }
    }

    /// Model name.
    pub fn model_name(&self) -> &'a str {
        // SAFETY: as in `canonical`.
        unsafe { ffi::str(self.raw.model_name) }
    }

    /// LMCache dtype string.
    pub fn dtype(&self) -> &'a str {
        // SAFETY: as in `canonical`.
        unsafe { ffi::str(self.raw.dtype) }
    }

    /// Low 64 bits of the chunk hash.
    pub fn chunk_hash(&self) -> i64 {
        self.raw.chunk_hash
    }

    /// Stable XXH3-64 of the canonical string.
    pub fn key_hash(&self) -> u64 {
        self.raw.key_hash
    }

    /// World size.
    pub fn world_size(&self) -> u32 {
        self.raw.world_size
    }

    /// Worker id.
    pub fn worker_id(&self) -> u32 {
        self.raw.worker_id
    }

    /// Layer id of a per-layer key.
    pub fn layer_id(&self) -> Option<u32> {
        u32::try_from(self.raw.layer_id).ok()
    }

    /// The `(key, value)` tags.
    pub fn tags(&self) -> impl Iterator<Item = (&'a str, &'a str)> + 'a {
        // SAFETY: the host guarantees `tags_len` tags at `tags` for the request's lifetime.
        let tags = unsafe { ffi::slice(self.raw.tags, self.raw.tags_len) };
        // SAFETY: as in `canonical`.
        tags.iter()
            .map(|t| unsafe { (ffi::str(t.key), ffi::str(t.value)) })
    }
}

impl std::fmt::Debug for Key<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.canonical())
    }
}

impl std::fmt::Display for Key<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.canonical())
    }
}
