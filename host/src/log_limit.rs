//! Safe logging of untrusted input: escaping and per-cause rate limiting.
//!
//! Two jobs, both about what a hostile client (or a sick plugin) can do to the log:
//!
//! - [`escape`] / [`escape_str`] render untrusted text the way `{:?}` does (newlines, NULs and
//!   other control characters become `\n`, `\0`, `\u{1b}`, invalid UTF-8 becomes `\xNN`), and
//!   bound its length with a `...(N more bytes)` tail, so one key can neither forge a log line
//!   nor fill the disk.
//! - [`WarnLimiter`] lets the first few warnings of each cause through per time window and
//!   counts the rest; the next line that gets through says how many were suppressed. The
//!   [`warn_limited!`](crate::warn_limited) macro does this with a process-wide limiter.
//!
//! ```
//! use kvhost::log_limit::escape;
//! assert_eq!(escape(b"a\nb\0").to_string(), r#""a\nb\0""#);
//! ```

use std::collections::HashMap;
use std::fmt::{self, Write as _};
use std::sync::LazyLock;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// How many input bytes [`escape`] shows before it cuts the text short.
pub const DEFAULT_MAX_BYTES: usize = 128;

/// Untrusted bytes ready for a log line: quoted, escaped and bounded. Made by [`escape`].
#[derive(Clone, Copy)]
pub struct Escaped<'a> {
    bytes: &'a [u8],
    max_bytes: usize,
}

/// Escapes untrusted bytes for a log line, showing at most [`DEFAULT_MAX_BYTES`] of them.
pub fn escape(bytes: &[u8]) -> Escaped<'_> {
    escape_bounded(bytes, DEFAULT_MAX_BYTES)
}

/// Escapes untrusted text for a log line, showing at most [`DEFAULT_MAX_BYTES`] bytes of it.
pub fn escape_str(text: &str) -> Escaped<'_> {
    escape(text.as_bytes())
}

/// Escapes untrusted bytes for a log line, showing at most `max_bytes` of them.
pub fn escape_bounded(bytes: &[u8], max_bytes: usize) -> Escaped<'_> {
    Escaped { bytes, max_bytes }
}

impl fmt::Display for Escaped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let shown = &self.bytes[..self.bytes.len().min(self.max_bytes)];
        f.write_char('"')?;
        let mut used = 0;
        for chunk in shown.utf8_chunks() {
            for c in chunk.valid().chars() {
                // escape_debug leaves printable Unicode alone and escapes quotes, backslashes,
                // control and invisible characters: nothing that can end or fake a log line.
                for e in c.escape_debug() {
                    f.write_char(e)?;
                }
                used += c.len_utf8();
            }
            let invalid = chunk.invalid();
            // An invalid tail at the cut may be a character we split, not bad input: leave it to
            // the "more bytes" count rather than print it as garbage.
            let at_cut = used + invalid.len() == shown.len() && shown.len() < self.bytes.len();
            if at_cut {
                break;
            }
            for b in invalid {
                write!(f, "\\x{b:02x}")?;
            }
            used += invalid.len();
        }
        f.write_char('"')?;
        let more = self.bytes.len() - used;
        if more > 0 {
            write!(f, "...({more} more bytes)")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Escaped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// What [`WarnLimiter::check`] decides about one warning.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Log it; `suppressed` warnings of the same cause were dropped since the last one logged.
    Log {
        /// Warnings of this cause dropped since the last one that was logged.
        suppressed: u64,
    },
    /// Drop it (it has been counted and will be reported with the next one logged).
    Suppress,
}

/// Per-cause state: a fixed window with a budget of lines.
#[derive(Debug)]
struct CauseWindow {
    started: Instant,
    logged: u32,
    suppressed: u64,
}

/// Rate limiter for repeated warnings, one budget per cause.
///
/// Each cause may log `burst` lines per `window`; later ones in the same window are counted
/// and reported by the next line that gets through. Causes are `&'static str` so the table is
/// bounded by the code, not by what clients send.
#[derive(Debug)]
pub struct WarnLimiter {
    window: Duration,
    burst: u32,
    causes: Mutex<HashMap<&'static str, CauseWindow>>,
}

impl WarnLimiter {
    /// A limiter that lets `burst` lines of each cause through per `window`.
    pub fn new(window: Duration, burst: u32) -> Self {
        Self {
            window,
            burst: burst.max(1),
            causes: Mutex::new(HashMap::new()),
        }
    }

    /// Decides whether a warning of `cause` is logged now.
    pub fn check(&self, cause: &'static str) -> Verdict {
        self.check_at(cause, Instant::now())
    }

    /// [`check`](Self::check) at a given instant (tests drive time with this).
    pub fn check_at(&self, cause: &'static str, now: Instant) -> Verdict {
        let mut causes = self.causes.lock();
        let state = causes.entry(cause).or_insert(CauseWindow {
            started: now,
            logged: 0,
            suppressed: 0,
        });
        if now.saturating_duration_since(state.started) >= self.window {
            state.started = now;
            state.logged = 0;
        }
        if state.logged < self.burst {
            state.logged += 1;
            Verdict::Log {
                suppressed: std::mem::take(&mut state.suppressed),
            }
        } else {
            state.suppressed += 1;
            Verdict::Suppress
        }
    }

    /// Takes the counts of warnings suppressed and not yet reported, per cause (for a summary
    /// at shutdown, so the last burst of a flood is not lost silently).
    pub fn take_suppressed(&self) -> Vec<(&'static str, u64)> {
        let mut causes = self.causes.lock();
        let mut out: Vec<_> = causes
            .iter_mut()
            .filter(|(_, s)| s.suppressed > 0)
            .map(|(cause, s)| (*cause, std::mem::take(&mut s.suppressed)))
            .collect();
        out.sort_unstable();
        out
    }
}

/// The process-wide limiter behind [`warn_limited!`](crate::warn_limited): 10 lines per cause
/// per 10 seconds.
pub static WARNINGS: LazyLock<WarnLimiter> =
    LazyLock::new(|| WarnLimiter::new(Duration::from_secs(10), 10));

/// Logs every warning count still suppressed in [`WARNINGS`]; call once at shutdown.
pub fn report_suppressed() {
    for (cause, n) in WARNINGS.take_suppressed() {
        tracing::warn!(
            cause,
            suppressed = n,
            "{n} more warnings of this cause were suppressed"
        );
    }
}

/// `tracing::warn!` with a per-cause rate limit (the process-wide [`WARNINGS`] limiter).
///
/// The first argument is the cause, a `&'static str` naming what went wrong; the rest is what
/// `tracing::warn!` takes. A line logged after suppressed ones carries `suppressed = N`.
///
/// ```
/// kvhost::warn_limited!("bad_key", key = %kvhost::log_limit::escape(b"k\n"), "rejected a key");
/// ```
#[macro_export]
macro_rules! warn_limited {
    ($cause:expr, $($rest:tt)+) => {
        match $crate::log_limit::WARNINGS.check($cause) {
            $crate::log_limit::Verdict::Log { suppressed: 0 } => {
                ::tracing::warn!(cause = $cause, $($rest)+)
            }
            $crate::log_limit::Verdict::Log { suppressed } => {
                ::tracing::warn!(cause = $cause, suppressed, $($rest)+)
            }
            $crate::log_limit::Verdict::Suppress => {}
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_newlines_nuls_and_control_characters() {
        let s = escape(b"line1\nFAKE LOG LINE\r\0\x1b[31m\t\"q\"\\").to_string();
        assert_eq!(s, r#""line1\nFAKE LOG LINE\r\0\u{1b}[31m\t\"q\"\\""#);
        assert!(!s.contains('\n') && !s.contains('\0') && !s.contains('\r'));
    }

    #[test]
    fn matches_debug_for_valid_text() {
        let text = "vllm@model/a@1@0@abc\u{7f}\u{2028}é";
        assert_eq!(escape_str(text).to_string(), format!("{text:?}"));
    }

    #[test]
    fn invalid_utf8_becomes_hex() {
        assert_eq!(escape(b"a\xffb\xc3").to_string(), r#""a\xffb\xc3""#);
    }

    #[test]
    fn bounds_length_with_a_tail() {
        let long = vec![b'k'; 1000];
        let s = escape_bounded(&long, 10).to_string();
        assert_eq!(s, format!("\"{}\"...(990 more bytes)", "k".repeat(10)));
        assert_eq!(
            escape(&long).to_string().len(),
            DEFAULT_MAX_BYTES + 2 + "...(872 more bytes)".len()
        );
    }

    #[test]
    fn cut_inside_a_character_counts_it_as_more() {
        // "é" is two bytes; a 2-byte bound cuts after "a" and half of "é".
        let s = escape_bounded("aé".as_bytes(), 2).to_string();
        assert_eq!(s, r#""a"...(2 more bytes)"#);
    }

    #[test]
    fn short_text_has_no_tail() {
        assert_eq!(escape_bounded(b"abc", 3).to_string(), r#""abc""#);
        assert_eq!(escape(b"").to_string(), r#""""#);
    }

    #[test]
    fn limiter_lets_a_burst_through_then_counts() {
        let l = WarnLimiter::new(Duration::from_secs(10), 3);
        let t0 = Instant::now();
        for _ in 0..3 {
            assert_eq!(l.check_at("a", t0), Verdict::Log { suppressed: 0 });
        }
        for _ in 0..5 {
            assert_eq!(l.check_at("a", t0), Verdict::Suppress);
        }
        // Another cause has its own budget.
        assert_eq!(l.check_at("b", t0), Verdict::Log { suppressed: 0 });
        // Next window: the first line reports what was dropped, once.
        let t1 = t0 + Duration::from_secs(10);
        assert_eq!(l.check_at("a", t1), Verdict::Log { suppressed: 5 });
        assert_eq!(l.check_at("a", t1), Verdict::Log { suppressed: 0 });
    }

    #[test]
    fn take_suppressed_reports_pending_counts_once() {
        let l = WarnLimiter::new(Duration::from_secs(60), 1);
        let t0 = Instant::now();
        l.check_at("x", t0);
        l.check_at("x", t0);
        l.check_at("x", t0);
        l.check_at("y", t0);
        assert_eq!(l.take_suppressed(), vec![("x", 2)]);
        assert!(l.take_suppressed().is_empty());
        assert_eq!(
            l.check_at("x", t0 + Duration::from_secs(60)),
            Verdict::Log { suppressed: 0 }
        );
    }

    #[test]
    fn macro_compiles_with_fields_and_format_args() {
        let key = b"bad\nkey";
        for _ in 0..20 {
            crate::warn_limited!("log_limit_test", key = %escape(key), "refused {}", 1);
        }
        assert!(WARNINGS
            .take_suppressed()
            .iter()
            .any(|(c, n)| *c == "log_limit_test" && *n == 10));
    }
}
