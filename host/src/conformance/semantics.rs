//! Checks of the statuses the header defines for the edge cases of pins.

use super::{pattern, Ctx};
use crate::plugin::Presence;
use kvhost_plugin_sdk::Status;

/// Unpin of a stored key that holds no pin is `INVALID_ARG` (the count never goes below zero), and of
/// an absent key `NOT_FOUND`; neither changes what is stored.
pub(super) fn unpin_unpinned(c: &Ctx<'_>) -> Result<String, String> {
    if c.discards {
        return Ok("not applicable to a discarding plugin (nothing is stored)".to_string());
    }
    let (k, absent) = (c.key(), c.key());
    c.expect_put_ok(vec![k.clone()], vec![pattern(21, 300)])?;
    let got = c
        .plugin
        .unpin(&[k.clone(), absent])
        .map_err(|e| e.to_string())?;
    let after = c
        .plugin
        .contains(std::slice::from_ref(&k), false)
        .map_err(|e| e.to_string())?;
    // A pin taken now must still be counted from zero: one unpin releases it, a second is refused.
    let pinned = c
        .plugin
        .pin(std::slice::from_ref(&k))
        .map_err(|e| e.to_string())?;
    let first = c
        .plugin
        .unpin(std::slice::from_ref(&k))
        .map_err(|e| e.to_string())?;
    let second = c
        .plugin
        .unpin(std::slice::from_ref(&k))
        .map_err(|e| e.to_string())?;
    c.plugin.remove(&[k], true).map_err(|e| e.to_string())?;
    if got[0] != Status::INVALID_ARG {
        return Err(format!(
            "unpin of a stored key without a pin: expected INVALID_ARG, got {}",
            got[0]
        ));
    }
    if got[1] != Status::NOT_FOUND {
        return Err(format!(
            "unpin of an absent key: expected NOT_FOUND, got {}",
            got[1]
        ));
    }
    if !matches!(after[0], Presence::Present(_)) {
        return Err(format!("the key after a refused unpin: {:?}", after[0]));
    }
    if pinned[0] != Status::OK || first[0] != Status::OK || second[0] != Status::INVALID_ARG {
        return Err(format!(
            "pin, unpin, unpin after a refused unpin: {}, {}, {} (expected OK, OK, INVALID_ARG)",
            pinned[0], first[0], second[0]
        ));
    }
    Ok("unpin without a pin is INVALID_ARG, of an absent key NOT_FOUND; the pin count never goes negative".to_string())
}

/// Remove without force of a pinned key is `BUSY` and keeps the chunk; with force it is removed.
pub(super) fn remove_pinned(c: &Ctx<'_>) -> Result<String, String> {
    if c.discards {
        return Ok("not applicable to a discarding plugin (nothing is stored)".to_string());
    }
    let k = c.key();
    let data = pattern(22, 700);
    c.expect_put_ok(vec![k.clone()], vec![data.clone()])?;
    let pinned = c
        .plugin
        .pin(std::slice::from_ref(&k))
        .map_err(|e| e.to_string())?;
    let plain = c
        .plugin
        .remove(std::slice::from_ref(&k), false)
        .map_err(|e| e.to_string())?;
    let (items, got) = c.get(vec![k.clone()], vec![data.len()])?;
    let forced = c
        .plugin
        .remove(std::slice::from_ref(&k), true)
        .map_err(|e| e.to_string())?;
    let after = c
        .plugin
        .contains(std::slice::from_ref(&k), false)
        .map_err(|e| e.to_string())?;
    if pinned[0] != Status::OK {
        return Err(format!("pin of a stored key: {}", pinned[0]));
    }
    if plain[0] != Status::BUSY {
        return Err(format!(
            "remove without force of a pinned key: expected BUSY, got {}",
            plain[0]
        ));
    }
    if got[0] != data {
        return Err(format!(
            "the pinned key after a refused remove: {:?} (must still read back)",
            items[0]
        ));
    }
    if forced[0] != Status::OK || after[0] != Presence::Absent {
        return Err(format!(
            "remove with force of a pinned key: {}, then contains {:?} (expected OK, absent)",
            forced[0], after[0]
        ));
    }
    Ok("remove of a pinned key is BUSY and keeps it; force removes it".to_string())
}
