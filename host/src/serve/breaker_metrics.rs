//! `/metrics` families of the plugin tiers' circuit breakers and integrity counters (issue 13), one
//! sample per plugin tier (the hot cache has no breaker).

use super::{escape, Out};

/// Circuit-breaker and integrity families of the plugin tiers (issue 13).
pub(super) fn families(o: &mut Out, tiers: &[crate::chain::TierStats]) {
    type Read = fn(&crate::chain::BreakerStats) -> f64;
    let families: [(&str, &str, &str, Read); 5] = [
        (
            "kvhost_tier_breaker_open",
            "gauge",
            "1 while the tier's circuit breaker is open (the tier is skipped).",
            |b| f64::from(u8::from(b.state == "open")),
        ),
        (
            "kvhost_tier_breaker_trips_total",
            "counter",
            "Times the tier's circuit breaker opened.",
            |b| b.trips as f64,
        ),
        (
            "kvhost_tier_breaker_skipped_total",
            "counter",
            "Operations that skipped the tier while its breaker was open.",
            |b| b.skipped as f64,
        ),
        (
            "kvhost_tier_breaker_open_seconds_total",
            "counter",
            "Seconds the tier's breaker has been open.",
            |b| b.open_secs,
        ),
        (
            "kvhost_tier_inflight_bytes",
            "gauge",
            "Hot-cache arena bytes held by the tier's puts (bounded by tier_max_inflight_bytes).",
            |b| b.inflight_bytes as f64,
        ),
    ];
    for (name, kind, help, f) in families {
        o.family(name, kind, help);
        for t in tiers {
            if let Some(b) = &t.breaker {
                o.sample(name, &format!("tier=\"{}\"", escape(&t.name)), f(b));
            }
        }
    }
    o.family(
        "kvhost_tier_corrupt_total",
        "counter",
        "Get items the tier's plugin reported CORRUPT (never returned).",
    );
    for t in tiers.iter().filter(|t| t.breaker.is_some()) {
        o.sample(
            "kvhost_tier_corrupt_total",
            &format!("tier=\"{}\"", escape(&t.name)),
            t.corrupt as f64,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chain::{BreakerStats, TierStats};

    #[test]
    fn breaker_families_have_one_sample_per_plugin_tier() {
        let hot = TierStats {
            name: "LocalCPUBackend".into(),
            ..TierStats::default()
        };
        let sick = TierStats {
            name: "si\"ck".into(),
            corrupt: 3,
            breaker: Some(BreakerStats {
                state: "open",
                trips: 2,
                skipped: 7,
                open_secs: 1.5,
                inflight_bytes: 4096,
                max_inflight_bytes: 8192,
            }),
            ..TierStats::default()
        };
        let mut o = Out {
            text: String::new(),
            labels: "model_name=\"m\"".into(),
        };
        families(&mut o, &[hot, sick]);
        let t = o.text;
        for line in [
            "kvhost_tier_breaker_open{model_name=\"m\",tier=\"si\\\"ck\"} 1",
            "kvhost_tier_breaker_trips_total{model_name=\"m\",tier=\"si\\\"ck\"} 2",
            "kvhost_tier_breaker_skipped_total{model_name=\"m\",tier=\"si\\\"ck\"} 7",
            "kvhost_tier_breaker_open_seconds_total{model_name=\"m\",tier=\"si\\\"ck\"} 1.5",
            "kvhost_tier_inflight_bytes{model_name=\"m\",tier=\"si\\\"ck\"} 4096",
            "kvhost_tier_corrupt_total{model_name=\"m\",tier=\"si\\\"ck\"} 3",
        ] {
            assert!(t.contains(line), "missing `{line}` in:\n{t}");
        }
        assert!(
            !t.contains("LocalCPUBackend"),
            "the hot cache has no breaker:\n{t}"
        );
    }
}
