//! Status codes and the error type of the Rust authoring layer.

use crate::abi;
use std::fmt;

/// A `kvh_status` value. Unknown values are kept as they are, never transmuted into an enum.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Status(pub abi::kvh_status);

impl Status {
    /// `KVH_OK`.
    pub const OK: Status = Status(abi::KVH_OK);
    /// `KVH_PENDING`.
    pub const PENDING: Status = Status(abi::KVH_PENDING);
    /// `KVH_ERR_INVALID_ARG`.
    pub const INVALID_ARG: Status = Status(abi::KVH_ERR_INVALID_ARG);
    /// `KVH_ERR_NULL_PARAM`.
    pub const NULL_PARAM: Status = Status(abi::KVH_ERR_NULL_PARAM);
    /// `KVH_ERR_NOT_FOUND`.
    pub const NOT_FOUND: Status = Status(abi::KVH_ERR_NOT_FOUND);
    /// `KVH_ERR_BUFFER_TOO_SMALL`.
    pub const BUFFER_TOO_SMALL: Status = Status(abi::KVH_ERR_BUFFER_TOO_SMALL);
    /// `KVH_ERR_UNSUPPORTED`.
    pub const UNSUPPORTED: Status = Status(abi::KVH_ERR_UNSUPPORTED);
    /// `KVH_ERR_BUSY`.
    pub const BUSY: Status = Status(abi::KVH_ERR_BUSY);
    /// `KVH_ERR_IO`.
    pub const IO: Status = Status(abi::KVH_ERR_IO);
    /// `KVH_ERR_TIMEOUT`.
    pub const TIMEOUT: Status = Status(abi::KVH_ERR_TIMEOUT);
    /// `KVH_ERR_CANCELED`.
    pub const CANCELED: Status = Status(abi::KVH_ERR_CANCELED);
    /// `KVH_ERR_NO_SPACE`.
    pub const NO_SPACE: Status = Status(abi::KVH_ERR_NO_SPACE);
    /// `KVH_ERR_INVALID_CONFIG`.
    pub const INVALID_CONFIG: Status = Status(abi::KVH_ERR_INVALID_CONFIG);
    /// `KVH_ERR_INTERNAL`.
    pub const INTERNAL: Status = Status(abi::KVH_ERR_INTERNAL);
    /// `KVH_ERR_PANIC`.
    pub const PANIC: Status = Status(abi::KVH_ERR_PANIC);
    /// `KVH_ERR_POISONED`.
    pub const POISONED: Status = Status(abi::KVH_ERR_POISONED);
    /// `KVH_ERR_ABI_MISMATCH`.
    pub const ABI_MISMATCH: Status = Status(abi::KVH_ERR_ABI_MISMATCH);
    /// `KVH_ERR_UNAVAILABLE`.
    pub const UNAVAILABLE: Status = Status(abi::KVH_ERR_UNAVAILABLE);
    /// `KVH_ERR_CORRUPT`.
    pub const CORRUPT: Status = Status(abi::KVH_ERR_CORRUPT);
    /// `KVH_ERR_NO_RESULT`.
    pub const NO_RESULT: Status = Status(abi::KVH_ERR_NO_RESULT);

    /// The stable symbolic name of a known code, or `None` for a value this ABI minor does not define
    /// (displayed as `UNKNOWN`, the C headers' spelling). The same names as `kvh_status_name`, the
    /// table generated into `include/kvhost_plugin.h` (a test compares the two).
    pub fn name(self) -> Option<&'static str> {
        Some(match self.0 {
            abi::KVH_OK => "OK",
            abi::KVH_PENDING => "PENDING",
            abi::KVH_ERR_INVALID_ARG => "INVALID_ARG",
            abi::KVH_ERR_NULL_PARAM => "NULL_PARAM",
            abi::KVH_ERR_NOT_FOUND => "NOT_FOUND",
            abi::KVH_ERR_BUFFER_TOO_SMALL => "BUFFER_TOO_SMALL",
            abi::KVH_ERR_UNSUPPORTED => "UNSUPPORTED",
            abi::KVH_ERR_BUSY => "BUSY",
            abi::KVH_ERR_IO => "IO",
            abi::KVH_ERR_TIMEOUT => "TIMEOUT",
            abi::KVH_ERR_CANCELED => "CANCELED",
            abi::KVH_ERR_NO_SPACE => "NO_SPACE",
            abi::KVH_ERR_INVALID_CONFIG => "INVALID_CONFIG",
            abi::KVH_ERR_INTERNAL => "INTERNAL",
            abi::KVH_ERR_PANIC => "PANIC",
            abi::KVH_ERR_POISONED => "POISONED",
            abi::KVH_ERR_ABI_MISMATCH => "ABI_MISMATCH",
            abi::KVH_ERR_UNAVAILABLE => "UNAVAILABLE",
            abi::KVH_ERR_CORRUPT => "CORRUPT",
            abi::KVH_ERR_NO_RESULT => "NO_RESULT",
            _ => return None,
        })
    }

    /// True for `KVH_OK`.
    pub fn is_ok(self) -> bool {
        self == Status::OK
    }
}

impl fmt::Debug for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(name) => write!(f, "{name} ({})", self.0),
            None => write!(f, "UNKNOWN ({})", self.0),
        }
    }
}

/// An error a backend reports: a status code plus a message for humans.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Error {
    /// The code the host sees. Never `OK` or `PENDING`.
    pub status: Status,
    /// Detail for logs and `last_error`.
    pub message: String,
}

impl Error {
    /// An error with `status` and `message`. A non-error status is turned into `INTERNAL`.
    pub fn new(status: Status, message: impl Into<String>) -> Self {
        let status = if status.0 < 0 {
            status
        } else {
            Status::INTERNAL
        };
        Error {
            status,
            message: message.into(),
        }
    }

    /// `INVALID_CONFIG` with a message, for `create`.
    pub fn config(message: impl Into<String>) -> Self {
        Error::new(Status::INVALID_CONFIG, message)
    }

    /// `IO` from an I/O error.
    pub fn io(context: &str, err: &std::io::Error) -> Self {
        let status = match err.kind() {
            std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded => Status::NO_SPACE,
            std::io::ErrorKind::TimedOut => Status::TIMEOUT,
            _ => Status::IO,
        };
        Error::new(status, format!("{context}: {err}"))
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.status, self.message)
    }
}

impl std::error::Error for Error {}

#[cfg(test)]
mod name_table_tests {
    use super::Status;

    /// `(code constant, name)` from `kvh_status_name` in the generated header.
    fn header_names() -> Vec<(String, String)> {
        let header = include_str!("../../include/kvhost_plugin.h");
        let start = header
            .find("kvh_status_name(kvh_status status)")
            .expect("the generated header has kvh_status_name");
        header[start..]
            .lines()
            .take_while(|l| !l.contains("default:"))
            .filter_map(|l| l.trim().strip_prefix("case "))
            .filter_map(|l| l.split_once(": return \""))
            .map(|(c, n)| (c.to_string(), n.trim_end_matches("\";").to_string()))
            .collect()
    }

    #[test]
    fn the_sdk_and_the_generated_header_spell_every_status_alike() {
        let abi = include_str!("abi.rs");
        let names = header_names();
        assert_eq!(names.len(), 20, "{names:?}");
        for (constant, name) in &names {
            let line = abi
                .lines()
                .find(|l| l.starts_with(&format!("pub const {constant}: kvh_status = ")))
                .unwrap_or_else(|| panic!("{constant} is not a status constant of abi.rs"));
            let code: i32 = line
                .rsplit("= ")
                .next()
                .and_then(|v| v.trim_end_matches(';').parse().ok())
                .unwrap_or_else(|| panic!("value of {line}"));
            assert_eq!(Status(code).name(), Some(name.as_str()), "{constant}");
        }
        assert_eq!(Status(12345).name(), None);
        assert_eq!(Status(12345).to_string(), "UNKNOWN (12345)");
        assert!(
            include_str!("../../include/kvhost_plugin.h").contains("default: return \"UNKNOWN\";")
        );
    }
}
