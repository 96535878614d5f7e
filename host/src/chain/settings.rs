//! Chain settings: the write policy, per-tier queueing and the timeouts, read from the config.

use super::breaker::BreakerSettings;
use super::tier::{Backpressure, TierSettings};
use crate::cache::{CacheConfig, PolicyKind};
use crate::config::Config;
use std::time::Duration;

/// Where puts go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WritePolicy {
    /// Every put goes to the hot cache and every tier (LMCache's behaviour).
    WriteThrough,
    /// Puts stay in the hot cache; eviction demotes them to the first tier.
    WriteBack,
}

/// Chain settings (from the config).
#[derive(Clone, Debug)]
pub struct ChainSettings {
    /// Hot-cache settings.
    pub cache: CacheConfig,
    /// Write policy.
    pub write_policy: WritePolicy,
    /// Per-tier queueing.
    pub tier: TierSettings,
    /// How long a get or prefetch waits for a tier.
    pub read_timeout: Duration,
    /// How long a promotion waits for hot-cache room while nothing is evictable (a get whose own
    /// handles fill the cache would otherwise wait for itself).
    pub promotion_wait: Duration,
    /// Lookup pins are released after this long.
    pub pin_timeout: Duration,
    /// How often the pin monitor looks.
    pub pin_check_interval: Duration,
    /// Per-tier circuit breaker.
    pub breaker: BreakerSettings,
}

impl ChainSettings {
    /// Settings from a config.
    pub fn from_config(config: &Config) -> ChainSettings {
        let hot_bytes = crate::config::machine::gib_to_bytes(config.max_local_cpu_size);
        let mut cache = CacheConfig::new(hot_bytes);
        cache.retain = config.local_cpu;
        cache.policy = config.cache_policy.parse().unwrap_or(PolicyKind::Lru);
        cache.arena.explicit_huge_pages = config.local_cpu_use_hugepages;
        cache.arena.prefault = config.local_cpu_prefault;
        if let Some(n) = config.copy_threads {
            cache.copy_threads = n;
        }
        ChainSettings {
            cache,
            write_policy: if config.write_policy == "write_back" {
                WritePolicy::WriteBack
            } else {
                WritePolicy::WriteThrough
            },
            tier: TierSettings {
                queue_depth: config.put_queue_depth,
                backpressure: if config.put_backpressure == "drop" {
                    Backpressure::Drop
                } else {
                    Backpressure::Block
                },
                max_batch: config.put_batch_size,
                max_batch_bytes: config.put_batch_bytes,
                max_pending_batches: config.tier_max_inflight_batches,
                skip_existing: config.skip_existing_in_tiers,
                lookup_timeout: Duration::from_secs_f64(config.blocking_timeout_secs),
            },
            read_timeout: Duration::from_secs_f64(config.blocking_timeout_secs),
            promotion_wait: Duration::from_millis(config.promotion_wait_ms),
            pin_timeout: Duration::from_secs_f64(config.pin_timeout_sec),
            pin_check_interval: Duration::from_secs_f64(config.pin_check_interval_sec),
            breaker: BreakerSettings {
                failures: config.tier_breaker_failures,
                max_inflight_bytes: config.tier_max_inflight_bytes.unwrap_or(if hot_bytes > 0 {
                    hot_bytes / 2
                } else {
                    1 << 30
                }),
                put_deadline: Duration::from_secs_f64(config.tier_put_deadline_secs),
                probe_interval: Duration::from_secs_f64(config.tier_breaker_probe_secs),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_follow_the_config() {
        let y = "max_local_cpu_size: 0.5\nwrite_policy: write_back\nput_backpressure: drop\n\
                 blocking_timeout_secs: 2.5\npin_timeout_sec: 7\nlocal_cpu: false\n";
        let s = ChainSettings::from_config(&Config::from_yaml(y, None).unwrap());
        assert_eq!(s.cache.capacity_bytes, 1 << 29);
        assert!(!s.cache.retain);
        assert_eq!(s.write_policy, WritePolicy::WriteBack);
        assert_eq!(s.tier.backpressure, Backpressure::Drop);
        assert_eq!(s.read_timeout, Duration::from_millis(2500));
        assert_eq!(s.pin_timeout, Duration::from_secs(7));
    }

    #[test]
    fn the_defaults_are_lmcaches() {
        let s = ChainSettings::from_config(&Config::from_yaml("", None).unwrap());
        assert_eq!(s.write_policy, WritePolicy::WriteThrough);
        assert_eq!(s.tier.backpressure, Backpressure::Block);
        assert!(s.cache.retain);
    }
}
