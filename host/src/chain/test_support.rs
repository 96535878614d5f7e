//! Helpers for the chain's unit tests: hot-cache-only chains (plugin tiers are covered by the
//! integration tests, which build the plugins).

use super::{Chain, ChainSettings, PutOutcome, WritePolicy};
use crate::cache::CacheConfig;
use crate::config::Config;
use crate::key::ChunkKey;
use kvhost_plugin_sdk::ChunkMeta;
use std::time::Duration;

/// Settings for a chain with a `capacity`-byte hot cache, no prefaulting, and short timeouts.
pub(crate) fn settings(capacity: u64) -> ChainSettings {
    let mut cache = CacheConfig::new(capacity);
    cache.arena.prefault = false;
    ChainSettings {
        cache,
        write_policy: WritePolicy::WriteThrough,
        read_timeout: Duration::from_millis(500),
        pin_check_interval: Duration::from_millis(10),
        ..ChainSettings::from_config(&Config::from_yaml("", None).expect("the default config"))
    }
}

/// A chain with only a hot cache of `capacity` bytes.
pub(crate) fn hot_only(capacity: u64) -> Chain {
    Chain::new(settings(capacity), Vec::new()).expect("a hot-only chain")
}

/// Key number `n`.
pub(crate) fn key(n: u32) -> ChunkKey {
    ChunkKey::build("unit/model", 1, 0, i128::from(n), "half", None, &[]).expect("a valid key")
}

/// Keys `0..n`.
pub(crate) fn keys(n: u32) -> Vec<ChunkKey> {
    (0..n).map(key).collect()
}

/// `len` bytes derived from `seed`.
pub(crate) fn bytes(seed: u32, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32 ^ seed.wrapping_mul(131)) as u8)
        .collect()
}

/// Put one chunk of `bytes(seed, len)` under `key`.
pub(crate) fn put(chain: &Chain, key: &ChunkKey, seed: u32, len: usize) -> PutOutcome {
    let data = bytes(seed, len);
    chain.put(std::slice::from_ref(key), &[&data], &[ChunkMeta::default()])[0].clone()
}
