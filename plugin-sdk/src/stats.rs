//! Named counters and gauges a backend reports through `stats` (ABI 1.3).

use crate::abi;

/// Whether `name` may name a stat: 1 to 47 bytes of `[a-z0-9_]`.
pub fn valid_stat_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() < abi::KVH_STAT_NAME_CAP
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

/// What a backend's [`stats`](crate::Backend::stats) fills: well-known names (`evictions`,
/// `bytes_used`, `capacity_bytes`, `entries`, `no_space`) and any plugin-specific ones.
#[derive(Default, Debug)]
pub struct Stats {
    items: Vec<abi::kvh_stat>,
    bad_name: Option<String>,
}

impl Stats {
    /// A count that only grows while the backend lives.
    pub fn counter(&mut self, name: &str, value: u64) -> &mut Self {
        self.push(name, value, abi::KVH_STAT_COUNTER)
    }

    /// A level that may go up and down.
    pub fn gauge(&mut self, name: &str, value: u64) -> &mut Self {
        self.push(name, value, abi::KVH_STAT_GAUGE)
    }

    fn push(&mut self, name: &str, value: u64, kind: u32) -> &mut Self {
        let duplicate = self.items.iter().any(|s| stat_name(s) == name.as_bytes());
        if !valid_stat_name(name) || duplicate {
            // Reported once by the trampoline as an error; a naming bug never poisons the backend.
            self.bad_name.get_or_insert_with(|| name.to_string());
            return self;
        }
        let mut stat = abi::kvh_stat {
            name: [0; abi::KVH_STAT_NAME_CAP],
            value,
            kind,
            reserved: 0,
        };
        for (dst, src) in stat.name.iter_mut().zip(name.bytes()) {
            *dst = src as core::ffi::c_char;
        }
        self.items.push(stat);
        self
    }

    /// The entries so far, or the first invalid or repeated name.
    pub(crate) fn finish(self) -> Result<Vec<abi::kvh_stat>, String> {
        match self.bad_name {
            Some(n) => Err(format!(
                "stats: `{n}` is not a valid stat name (1-47 bytes of [a-z0-9_], unique)"
            )),
            None => Ok(self.items),
        }
    }
}

fn stat_name(s: &abi::kvh_stat) -> Vec<u8> {
    s.name
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked_and_unique() {
        let mut s = Stats::default();
        s.counter("evictions", 3).gauge("bytes_used", 10);
        assert_eq!(s.finish().unwrap().len(), 2);
        for bad in ["", "Upper", "has space", &"x".repeat(48)] {
            let mut s = Stats::default();
            s.gauge(bad, 1);
            assert!(s.finish().is_err(), "{bad:?}");
        }
        let mut s = Stats::default();
        s.gauge("entries", 1).gauge("entries", 2);
        assert!(s.finish().is_err());
        assert!(valid_stat_name(&"a".repeat(47)));
    }
}
