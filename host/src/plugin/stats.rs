//! The plugin's `stats` entry (ABI 1.3): named counters and gauges, checked before they are believed.

use super::{PluginBackend, PluginError};
use kvhost_plugin_sdk::{abi, valid_stat_name, Status};

/// Whether a stat only grows (counter) or moves both ways (gauge).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum StatKind {
    /// Only grows while the backend lives.
    Counter,
    /// Goes up and down.
    Gauge,
}

/// One named number reported by a plugin.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct PluginStat {
    /// `[a-z0-9_]{1,47}`, unique within one answer.
    pub name: String,
    /// The value.
    pub value: u64,
    /// Counter or gauge.
    pub kind: StatKind,
}

/// The entries the host offers first; a plugin that needs more says so and gets exactly that many,
/// up to [`MAX_STATS`].
const FIRST_CAP: usize = 32;
/// More entries than this is a plugin bug, not a report.
const MAX_STATS: usize = 1024;

impl PluginBackend {
    /// The plugin's counters and gauges (`KVH_CAP_STATS`); `None` when it has no `stats` entry (built
    /// against ABI 1.2 or older, or without the capability).
    pub fn stats(&self) -> Option<Result<Vec<PluginStat>, PluginError>> {
        let f = self.vt.stats?;
        let mut cap = FIRST_CAP;
        for _ in 0..2 {
            let mut items = vec![
                abi::kvh_stat {
                    name: [0; abi::KVH_STAT_NAME_CAP],
                    value: 0,
                    kind: 0,
                    reserved: 0,
                };
                cap
            ];
            let mut out = abi::kvh_stats_buf {
                struct_size: std::mem::size_of::<abi::kvh_stats_buf>() as u32,
                reserved: 0,
                items: items.as_mut_ptr(),
                cap,
                len: 0,
            };
            // SAFETY: checked vtable function with the live backend; `out` and the `cap` entries it
            // points to are ours and outlive the call.
            let rc = unsafe { f(self.backend, &mut out) };
            match rc {
                abi::KVH_OK if out.len <= cap => {
                    return Some(self.checked_stats(&items[..out.len]));
                }
                abi::KVH_OK => {
                    return Some(Err(self.error(
                        "stats",
                        Status::INTERNAL,
                        format!("reported {} entries into an array of {cap}", out.len),
                    )))
                }
                abi::KVH_ERR_BUFFER_TOO_SMALL if out.len > cap && out.len <= MAX_STATS => {
                    cap = out.len;
                }
                abi::KVH_ERR_BUFFER_TOO_SMALL => {
                    return Some(Err(self.error(
                        "stats",
                        Status::BUFFER_TOO_SMALL,
                        format!(
                            "asked for {} entries after being offered {cap} (at most {MAX_STATS})",
                            out.len
                        ),
                    )))
                }
                rc => return Some(Err(self.sync_error("stats", rc))),
            }
        }
        Some(Err(self.error(
            "stats",
            Status::BUFFER_TOO_SMALL,
            "asked for a larger array twice".to_string(),
        )))
    }

    fn checked_stats(&self, items: &[abi::kvh_stat]) -> Result<Vec<PluginStat>, PluginError> {
        let mut out: Vec<PluginStat> = Vec::with_capacity(items.len());
        for (i, s) in items.iter().enumerate() {
            let bytes: Vec<u8> = s.name.iter().map(|&c| c as u8).collect();
            let name = bytes
                .iter()
                .position(|&b| b == 0)
                .and_then(|end| std::str::from_utf8(&bytes[..end]).ok())
                .filter(|n| valid_stat_name(n))
                .ok_or_else(|| {
                    self.error(
                        "stats",
                        Status::INTERNAL,
                        format!(
                            "entry {i}: the name is not 1-47 bytes of [a-z0-9_] ending in a NUL: {:?}",
                            String::from_utf8_lossy(&bytes).trim_end_matches('\0')
                        ),
                    )
                })?;
            let kind = match s.kind {
                abi::KVH_STAT_COUNTER => StatKind::Counter,
                abi::KVH_STAT_GAUGE => StatKind::Gauge,
                k => {
                    return Err(self.error(
                        "stats",
                        Status::INTERNAL,
                        format!("entry {i} (`{name}`): unknown kind {k}"),
                    ))
                }
            };
            if out.iter().any(|o| o.name == name) {
                return Err(self.error(
                    "stats",
                    Status::INTERNAL,
                    format!("entry {i}: `{name}` reported twice"),
                ));
            }
            out.push(PluginStat {
                name: name.to_string(),
                value: s.value,
                kind,
            });
        }
        Ok(out)
    }
}

/// `name=value` pairs on one line, for tables and logs.
pub fn stats_line(stats: &[PluginStat]) -> String {
    stats
        .iter()
        .map(|s| format!("{}={}", s.name, s.value))
        .collect::<Vec<_>>()
        .join(" ")
}
