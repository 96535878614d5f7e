//! What each plugin tier reports about itself through its `stats` entry (ABI 1.3).

use super::{Chain, TierStats};
use crate::plugin::PluginStat;

/// One plugin tier's own counters and gauges.
#[derive(Clone, Debug)]
pub struct TierPluginStats {
    /// The tier's configured name.
    pub tier: String,
    /// What the plugin reported, or why it could not.
    pub stats: Result<Vec<PluginStat>, String>,
}

impl Chain {
    /// The `stats` of every plugin tier that has the entry, in tier order. Plugins without it (built
    /// against ABI 1.2 or older, or without `KVH_CAP_STATS`) are left out.
    pub fn plugin_stats(&self) -> Vec<TierPluginStats> {
        self.inner
            .tiers
            .iter()
            .filter_map(|t| {
                let stats = t.plugin()?.stats()?;
                Some(TierPluginStats {
                    tier: t.name.clone(),
                    stats: stats.map_err(|e| e.to_string()),
                })
            })
            .collect()
    }

    /// [`stats`](Self::stats), with each plugin tier's own report attached and its `evictions` (which
    /// only the plugin can count) taken from it.
    pub fn stats_with_plugins(&self) -> Vec<TierStats> {
        let mut tiers = self.stats().tiers;
        for p in self.plugin_stats() {
            let Ok(stats) = p.stats else { continue };
            if let Some(t) = tiers.iter_mut().skip(1).find(|t| t.name == p.tier) {
                if let Some(e) = stats.iter().find(|s| s.name == "evictions") {
                    t.evictions = e.value;
                }
                t.plugin = stats;
            }
        }
        tiers
    }
}
