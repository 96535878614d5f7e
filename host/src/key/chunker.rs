//! Token ids to prefix-chained chunk keys (LMCache's `ChunkedTokenDatabase`).
//!
//! Chunk *i* covers tokens `[i·chunk_size, (i+1)·chunk_size)`. Its hash is XXH3-64 (the `xxhash-rust`
//! crate: fast, maintained, no unsafe in its API) of the chunk's token ids as little-endian `u32`s,
//! seeded with chunk *i−1*'s hash (0 for the first). So a chunk's key names the whole prefix up to and
//! including it, and two prompts share keys exactly as long as they share whole leading chunks. The
//! 64-bit result is taken as signed, like LMCache's Python `hash`.

use super::{ChunkKey, KeyError};
use xxhash_rust::xxh3::xxh3_64_with_seed;

/// The hash before the first chunk (LMCache's `NONE_HASH` fallback).
pub const NONE_HASH: i64 = 0;

/// One chunk of a token sequence.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Chunk {
    /// First token (inclusive).
    pub start: usize,
    /// Last token (exclusive).
    pub end: usize,
    /// Its key.
    pub key: ChunkKey,
}

/// Makes chunk keys for one model and worker.
#[derive(Clone, Debug)]
pub struct Chunker {
    model_name: String,
    world_size: u32,
    worker_id: u32,
    dtype: String,
    chunk_size: usize,
    save_unfull_chunk: bool,
}

impl Chunker {
    /// A chunker; `save_unfull_chunk` keeps the tail partial chunk (LMCache's default drops it).
    pub fn new(
        model_name: &str,
        world_size: u32,
        worker_id: u32,
        dtype: &str,
        chunk_size: usize,
        save_unfull_chunk: bool,
    ) -> Result<Chunker, KeyError> {
        // Validate the fields once, so `chunks` cannot fail.
        ChunkKey::new(model_name, world_size, worker_id, 0, dtype)?;
        Ok(Chunker {
            model_name: model_name.to_string(),
            world_size,
            worker_id,
            dtype: dtype.to_string(),
            chunk_size: chunk_size.max(1),
            save_unfull_chunk,
        })
    }

    /// Tokens per full chunk.
    pub fn chunk_size(&self) -> usize {
        self.chunk_size
    }

    /// The prefix-chained hashes of `tokens`' chunks.
    pub fn hashes(&self, tokens: &[u32]) -> Vec<i64> {
        let mut prev = NONE_HASH;
        self.spans(tokens.len())
            .map(|(start, end)| {
                let bytes: Vec<u8> = tokens[start..end]
                    .iter()
                    .flat_map(|t| t.to_le_bytes())
                    .collect();
                prev = xxh3_64_with_seed(&bytes, prev as u64) as i64;
                prev
            })
            .collect()
    }

    /// The chunks of `tokens`, with their keys.
    pub fn chunks(&self, tokens: &[u32]) -> Vec<Chunk> {
        self.spans(tokens.len())
            .zip(self.hashes(tokens))
            .map(|((start, end), hash)| Chunk {
                start,
                end,
                key: ChunkKey::new(
                    &self.model_name,
                    self.world_size,
                    self.worker_id,
                    i128::from(hash),
                    &self.dtype,
                )
                .expect("fields validated in Chunker::new"),
            })
            .collect()
    }

    fn spans(&self, n: usize) -> impl Iterator<Item = (usize, usize)> + '_ {
        let full = n / self.chunk_size;
        let tail = usize::from(self.save_unfull_chunk && n % self.chunk_size != 0);
        (0..full + tail).map(move |i| (i * self.chunk_size, ((i + 1) * self.chunk_size).min(n)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunker(size: usize, tail: bool) -> Chunker {
        Chunker::new("m", 1, 0, "bfloat16", size, tail).unwrap()
    }

    #[test]
    fn full_chunks_only_by_default_and_tail_on_request() {
        let tokens: Vec<u32> = (0..10).collect();
        let spans: Vec<_> = chunker(4, false)
            .chunks(&tokens)
            .iter()
            .map(|c| (c.start, c.end))
            .collect();
        assert_eq!(spans, vec![(0, 4), (4, 8)]);
        let spans: Vec<_> = chunker(4, true)
            .chunks(&tokens)
            .iter()
            .map(|c| (c.start, c.end))
            .collect();
        assert_eq!(spans, vec![(0, 4), (4, 8), (8, 10)]);
        assert!(
            chunker(4, true).chunks(&tokens[..8]).len() == 2,
            "no empty tail"
        );
    }

    #[test]
    fn hashes_chain_the_prefix() {
        let c = chunker(4, false);
        let a: Vec<u32> = (0..12).collect();
        let mut b = a.clone();
        b[1] = 99; // differs in the first chunk only
        let (ha, hb) = (c.hashes(&a), c.hashes(&b));
        assert!(
            ha.iter().zip(&hb).all(|(x, y)| x != y),
            "a change in chunk 0 changes every later hash"
        );
        let mut d = a.clone();
        d[9] = 99; // differs in the last chunk only
        let hd = c.hashes(&d);
        assert_eq!(ha[..2], hd[..2], "shared leading chunks share keys");
        assert_ne!(ha[2], hd[2]);
        // Chunk i covers chunk i-1's hash: the same tokens after a different prefix hash differently.
        assert_ne!(c.hashes(&a[4..8])[0], ha[1]);
        assert_eq!(ha, c.hashes(&a), "deterministic");
    }

    #[test]
    fn keys_use_the_hash_and_format_like_lmcache() {
        let c = chunker(2, false);
        let chunks = c.chunks(&[1, 2, 3, 4]);
        assert_eq!(
            chunks[1].key.chunk_hash(),
            i128::from(c.hashes(&[1, 2, 3, 4])[1])
        );
        assert!(chunks[0].key.as_str().starts_with("m@1@0@"));
        assert_eq!(
            ChunkKey::parse(chunks[1].key.as_str()).unwrap(),
            chunks[1].key
        );
    }
}
