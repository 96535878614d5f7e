//! What the machine can give the config: its physical memory, read from `/proc/meminfo`.

/// Total physical memory in bytes (`MemTotal` of `/proc/meminfo`), or `None` where it cannot be read.
/// Read once per process: it does not change while kvhost runs.
pub fn physical_memory_bytes() -> Option<u64> {
    static MEMORY: std::sync::OnceLock<Option<u64>> = std::sync::OnceLock::new();
    *MEMORY.get_or_init(|| {
        let text = std::fs::read_to_string("/proc/meminfo").ok()?;
        parse_mem_total(&text)
    })
}

/// `MemTotal:  24683772 kB` -> bytes.
fn parse_mem_total(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let mut words = line["MemTotal:".len()..].split_whitespace();
    let value: u64 = words.next()?.parse().ok()?;
    let scale = match words.next() {
        Some("kB") => 1024,
        None => 1,
        Some(_) => return None,
    };
    value.checked_mul(scale)
}

/// Bytes of a size given in GiB, saturating at `u64::MAX` (the caller has checked it is finite and
/// non-negative).
pub fn gib_to_bytes(gib: f64) -> u64 {
    let bytes = gib * (1u64 << 30) as f64;
    if bytes >= u64::MAX as f64 {
        u64::MAX
    } else {
        bytes as u64
    }
}

/// A size in GiB, printed with two decimals.
pub fn gib_text(bytes: u64) -> String {
    format!("{:.2} GiB", bytes as f64 / (1u64 << 30) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_mem_total_in_kib() {
        let text = "MemFree: 5 kB\nMemTotal:       24683772 kB\n";
        assert_eq!(parse_mem_total(text), Some(24683772 * 1024));
        assert_eq!(parse_mem_total("MemFree: 1 kB\n"), None);
        assert_eq!(parse_mem_total("MemTotal: 12 MB\n"), None);
    }

    #[test]
    fn this_machine_reports_memory() {
        let bytes = physical_memory_bytes().expect("/proc/meminfo on Linux");
        assert!(bytes > 64 << 20, "{bytes}");
    }

    #[test]
    fn huge_sizes_saturate() {
        assert_eq!(gib_to_bytes(1e12), u64::MAX);
        assert_eq!(gib_to_bytes(1.0), 1 << 30);
    }
}
