//! The server's counters and the reasons it closes a connection (read by `/metrics` and tests).

use super::protocol::Command;
use std::sync::atomic::{AtomicU64, Ordering};

/// Why the server closed a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CloseReason {
    /// Unknown command.
    BadCommand,
    /// Negative length, or one above `max_chunk_bytes`.
    BadLength,
    /// A key that does not parse.
    BadKey,
    /// A negative shape.
    BadShape,
    /// The peer closed in the middle of a header or body.
    Truncated,
    /// The peer paused mid-request longer than `stall_timeout`.
    Stalled,
    /// Idle longer than `idle_timeout`.
    Idle,
    /// Too many connections.
    TooManyConnections,
    /// A socket error.
    Io,
    /// A request (header plus body) took longer than `request_deadline`, however steadily its bytes came.
    Deadline,
    /// The server was stopping and the request did not finish within `shutdown_grace`.
    Shutdown,
}

impl CloseReason {
    /// All reasons, for metrics.
    pub const ALL: [CloseReason; 11] = [
        CloseReason::BadCommand,
        CloseReason::BadLength,
        CloseReason::BadKey,
        CloseReason::BadShape,
        CloseReason::Truncated,
        CloseReason::Stalled,
        CloseReason::Idle,
        CloseReason::TooManyConnections,
        CloseReason::Io,
        CloseReason::Deadline,
        CloseReason::Shutdown,
    ];

    /// Metric label (and the log's `reason` field).
    pub fn name(self) -> &'static str {
        match self {
            CloseReason::BadCommand => "bad_command",
            CloseReason::BadLength => "bad_length",
            CloseReason::BadKey => "bad_key",
            CloseReason::BadShape => "bad_shape",
            CloseReason::Truncated => "truncated",
            CloseReason::Stalled => "stalled",
            CloseReason::Idle => "idle",
            CloseReason::TooManyConnections => "too_many_connections",
            CloseReason::Io => "io_error",
            CloseReason::Deadline => "deadline",
            CloseReason::Shutdown => "shutdown",
        }
    }

    fn index(self) -> usize {
        CloseReason::ALL
            .iter()
            .position(|r| *r == self)
            .expect("every reason is listed in ALL")
    }
}

/// Server counters.
#[derive(Debug, Default)]
pub struct ServerStats {
    /// Connections open now.
    pub connections_open: AtomicU64,
    /// Connections accepted.
    pub connections_total: AtomicU64,
    /// `accept` failures (EMFILE and the like); the server backs off and keeps accepting.
    pub accept_errors: AtomicU64,
    /// Requests by command: put, get, exist, list, health.
    pub requests: [AtomicU64; 5],
    /// PUT bytes received.
    pub bytes_in: AtomicU64,
    /// GET bytes sent.
    pub bytes_out: AtomicU64,
    /// GET hits.
    pub get_hits: AtomicU64,
    /// GET misses.
    pub get_misses: AtomicU64,
    /// PUTs stored.
    pub puts_stored: AtomicU64,
    /// PUTs of keys already stored (body discarded).
    pub puts_duplicate: AtomicU64,
    /// PUTs refused for lack of room in the hot cache (body discarded).
    pub puts_no_space: AtomicU64,
    /// PUTs refused because the bodies in progress already fill `put_body_budget` (body discarded).
    pub puts_over_budget: AtomicU64,
    /// Bytes of PUT bodies being received now (staged, not yet in the hot cache).
    pub put_body_bytes_staged: AtomicU64,
    /// Connections closed by the server, by [`CloseReason::ALL`] index.
    pub closed: [AtomicU64; CloseReason::ALL.len()],
}

impl ServerStats {
    pub(super) fn request(&self, c: Command) {
        self.requests[c.to_wire() as usize - 1].fetch_add(1, Ordering::Relaxed);
    }

    /// Connections closed for `reason`.
    pub fn closed_for(&self, reason: CloseReason) -> u64 {
        self.closed[reason.index()].load(Ordering::Relaxed)
    }

    pub(super) fn close(&self, reason: CloseReason) {
        self.closed[reason.index()].fetch_add(1, Ordering::Relaxed);
    }

    /// Requests served, all commands.
    pub fn requests_total(&self) -> u64 {
        self.requests
            .iter()
            .map(|r| r.load(Ordering::Relaxed))
            .sum()
    }
}
