//! The checks of ABI 1.3 `stats`: what it reports, and, for a store that reports `capacity_bytes`,
//! filling it past that.

use super::{meta_for, pattern, Ctx, Verdict};
use crate::plugin::{GetItem, PluginStat, Presence, PutRequest, StatKind};
use kvhost_plugin_sdk::{abi, Status};

/// The largest capacity the check fills (twice over); a larger store is skipped with a hint.
const MAX_FILL: u64 = 256 << 20;

fn value(stats: &[PluginStat], name: &str) -> Option<u64> {
    stats.iter().find(|s| s.name == name).map(|s| s.value)
}

fn stats(c: &Ctx<'_>) -> Result<Vec<PluginStat>, String> {
    match c.plugin.stats() {
        Some(r) => r.map_err(|e| format!("stats: {e}")),
        None => Err("KVH_CAP_STATS is advertised but stats is absent".to_string()),
    }
}

/// Fill twice the reported capacity: every put item is OK or NO_SPACE, the store evicts or refuses
/// (never holds more than its capacity), every chunk that went missing is counted in `evictions`
/// (when reported), and a pinned chunk survives byte for byte.
pub(super) fn capacity(c: &Ctx<'_>) -> Result<Verdict, String> {
    if c.discards {
        return Ok(Verdict::Skip("a discarding plugin holds nothing".into()));
    }
    let before = stats(c)?;
    let Some(cap) = value(&before, "capacity_bytes") else {
        return Ok(Verdict::Skip("the plugin reports no capacity_bytes".into()));
    };
    if cap == 0 || cap > MAX_FILL {
        return Ok(Verdict::Skip(format!(
            "capacity_bytes is {cap}; this check fills stores of 1 B to {MAX_FILL} B (give the plugin a smaller capacity option to run it)"
        )));
    }
    let pins = c.plugin.has(abi::KVH_CAP_PIN);
    let pinned_key = c.key();
    let pinned_data = pattern(41, 4096);
    if pins {
        c.expect_put_ok(vec![pinned_key.clone()], vec![pinned_data.clone()])?;
        let st = c
            .plugin
            .pin(std::slice::from_ref(&pinned_key))
            .map_err(|e| e.to_string())?;
        if st[0] != Status::OK {
            return Err(format!("pin of a stored key: {}", st[0]));
        }
    }
    let chunk = (cap / 16).clamp(4096, 1 << 20) as usize;
    let n = (2 * cap).div_ceil(chunk as u64) as usize;
    let keys: Vec<_> = (0..n).map(|_| c.key()).collect();
    let (mut stored, mut no_space) = (0u64, 0u64);
    let mut failure = None;
    for (i, k) in keys.iter().enumerate() {
        let data = pattern(1000 + i as u64, chunk);
        let done = c
            .plugin
            .put_wait(
                PutRequest {
                    keys: vec![k.clone()],
                    bufs: vec![data],
                    metas: vec![meta_for(chunk)],
                },
                c.wait,
            )
            .map_err(|e| e.to_string())?;
        match (done.error, done.items[0]) {
            (Some(e), _) if e.status == Status::NO_SPACE => no_space += 1,
            (Some(e), _) => failure = Some(format!("put {i} of {n}: {e}")),
            (None, Status::OK) => stored += 1,
            (None, Status::NO_SPACE) => no_space += 1,
            (None, s) => failure = Some(format!("put {i} of {n}: {s} (expected OK or NO_SPACE)")),
        }
        if failure.is_some() {
            break;
        }
    }
    let presence = c.plugin.contains(&keys, false).map_err(|e| e.to_string());
    let after = stats(c);
    let (pin_items, pin_bufs) = if pins {
        c.get(vec![pinned_key.clone()], vec![pinned_data.len()])?
    } else {
        (Vec::new(), Vec::new())
    };
    // Clean up before judging, so a failure leaves the store as it was found.
    c.plugin.remove(&keys, true).map_err(|e| e.to_string())?;
    if pins {
        let _ = c.plugin.unpin(std::slice::from_ref(&pinned_key));
        c.plugin
            .remove(&[pinned_key], true)
            .map_err(|e| e.to_string())?;
    }
    if let Some(f) = failure {
        return Err(f);
    }
    let present = presence?
        .iter()
        .filter(|p| matches!(p, Presence::Present(_)))
        .count() as u64;
    let after = after?;
    let lost = stored.saturating_sub(present);
    if lost == 0 && no_space == 0 {
        return Err(format!(
            "{stored} chunks of {chunk} bytes ({} bytes, twice capacity_bytes {cap}) all stored and all still present: neither evicted nor refused",
            stored * chunk as u64
        ));
    }
    if let Some(used) = value(&after, "bytes_used") {
        if used > cap {
            return Err(format!("bytes_used {used} exceeds capacity_bytes {cap}"));
        }
    }
    let evicted = match (value(&before, "evictions"), value(&after, "evictions")) {
        (Some(b), Some(a)) => {
            let delta = a.saturating_sub(b);
            if lost > delta {
                return Err(format!(
                    "{lost} stored chunks went missing but evictions grew by {delta}: silent loss"
                ));
            }
            format!(", evictions +{delta}")
        }
        _ => String::new(),
    };
    if pins {
        let intact = matches!(pin_items.first(), Some(GetItem::Hit { len, .. }) if *len == pinned_data.len())
            && pin_bufs[0] == pinned_data;
        if !intact {
            return Err(format!(
                "the pinned chunk did not survive filling the store: {:?}",
                pin_items.first()
            ));
        }
    }
    Ok(Verdict::Pass(format!(
        "capacity {cap}: {n} puts of {chunk} bytes -> {stored} stored, {no_space} NO_SPACE, {lost} evicted{evicted}{}",
        if pins { "; the pinned chunk survived" } else { "" }
    )))
}

/// The well-known stat names and the kind the header gives each.
const WELL_KNOWN: &[(&str, StatKind)] = &[
    ("evictions", StatKind::Counter),
    ("no_space", StatKind::Counter),
    ("bytes_used", StatKind::Gauge),
    ("capacity_bytes", StatKind::Gauge),
    ("entries", StatKind::Gauge),
];

/// `stats` answers (the host has checked names and kinds), well-known names have their documented
/// kinds, and no counter goes down across some traffic.
pub(super) fn stats_report(c: &Ctx<'_>) -> Result<String, String> {
    let before = stats(c)?;
    let keys: Vec<_> = (0..4).map(|_| c.key()).collect();
    c.put(
        keys.clone(),
        (0..4).map(|i| pattern(50 + i, 3000)).collect(),
    )?;
    c.get(keys.clone(), vec![3000; 4])?;
    c.plugin.remove(&keys, true).map_err(|e| e.to_string())?;
    let after = stats(c)?;
    for s in &after {
        if let Some((_, kind)) = WELL_KNOWN.iter().find(|(n, _)| *n == s.name) {
            if s.kind != *kind {
                return Err(format!(
                    "`{}` is a {:?}; the header makes it a {kind:?}",
                    s.name, s.kind
                ));
            }
        }
        if s.kind == StatKind::Counter {
            if let Some(b) = before.iter().find(|b| b.name == s.name) {
                if s.value < b.value {
                    return Err(format!(
                        "counter `{}` went down from {} to {}",
                        s.name, b.value, s.value
                    ));
                }
            }
        }
    }
    Ok(format!(
        "{} stats ({}); counters never went down",
        after.len(),
        crate::plugin::stats_line(&after)
    ))
}
