//! Items a plugin left without a status (`KVH_ERR_NO_RESULT`): logged naming the tier, the operation
//! and the key (escaped, since keys come from clients), rate-limited per cause.

use crate::key::ChunkKey;
use crate::log_limit::escape_str;

/// Log one unreported item.
pub(crate) fn log(tier: &str, op: &'static str, key: &ChunkKey) {
    let key = key.to_string();
    crate::warn_limited!(
        "plugin_unreported_item",
        tier = %escape_str(tier),
        op,
        key = %escape_str(&key),
        "the plugin completed a {op} without reporting this item (a plugin bug; counted as an error)"
    );
}
