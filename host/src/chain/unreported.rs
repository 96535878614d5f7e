//! Items a plugin left without a status (`KVH_ERR_NO_RESULT`): logged naming the tier, the operation
//! and the key (escaped, since keys come from clients). Each tier has its own rate limit (10 lines per
//! operation per 10 s), so one lying plugin cannot hide another's reports; suppressed lines are counted
//! in the next line and in a last line when the tier goes away.

use crate::key::ChunkKey;
use crate::log_limit::{escape_str, Verdict, WarnLimiter};
use std::time::Duration;

/// One tier's unreported-item log.
pub(crate) struct UnreportedLog {
    tier: String,
    limiter: WarnLimiter,
}

impl UnreportedLog {
    pub(crate) fn new(tier: &str) -> UnreportedLog {
        UnreportedLog {
            tier: tier.to_string(),
            limiter: WarnLimiter::new(Duration::from_secs(10), 10),
        }
    }

    /// Log one unreported item of `op`.
    pub(crate) fn log(&self, op: &'static str, key: &ChunkKey) {
        let Verdict::Log { suppressed } = self.limiter.check(op) else {
            return;
        };
        let key = key.to_string();
        tracing::warn!(
            target: "kvhost::chain",
            tier = %escape_str(&self.tier),
            op,
            key = %escape_str(&key),
            suppressed,
            "the plugin completed a {op} without reporting this item (a plugin bug; counted as an error)"
        );
    }
}

impl Drop for UnreportedLog {
    fn drop(&mut self) {
        for (op, n) in self.limiter.take_suppressed() {
            tracing::warn!(
                target: "kvhost::chain",
                tier = %escape_str(&self.tier),
                op,
                "{n} more unreported {op} item(s) were not logged (rate limit)"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_each_operation_separately() {
        let log = UnreportedLog::new("t");
        let key = ChunkKey::parse("m@1@0@1@half").unwrap();
        for _ in 0..25 {
            log.log("put", &key);
        }
        log.log("get", &key);
        let left = log.limiter.take_suppressed();
        assert_eq!(
            left,
            vec![("put", 15)],
            "10 put lines logged, 15 counted; get unaffected"
        );
    }
}
