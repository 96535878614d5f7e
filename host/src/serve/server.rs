//! The `lm://` server: one thread per connection, requests on a connection served in order.
//!
//! A PUT body is read from the socket straight into its arena block. A GET reply is the header and the
//! block's bytes in one vectored write. Any bad input (an unknown command, a bad length, a truncated
//! body, an unparsable key, a client that stalls mid-request) closes that connection only, with a
//! logged reason and a counter; the server, other clients and stored data are unaffected.

use super::protocol::{self, Command, ProtocolError, Request, Response, REQUEST_HEADER_LEN};
use crate::chain::{Chain, PutOutcome};
use parking_lot::Mutex;
use std::io::{self, IoSlice, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Server settings.
#[derive(Clone, Debug)]
pub struct ServeConfig {
    /// Largest PUT body accepted.
    pub max_chunk_bytes: u64,
    /// A client may pause this long inside a request (between header bytes, or in a body).
    pub stall_timeout: Duration,
    /// A connection idle this long between requests is closed (`None`: never).
    pub idle_timeout: Option<Duration>,
    /// Connections beyond this many are refused at accept.
    pub max_connections: usize,
}

impl Default for ServeConfig {
    fn default() -> Self {
        ServeConfig {
            max_chunk_bytes: 1 << 30,
            stall_timeout: Duration::from_secs(10),
            idle_timeout: None,
            max_connections: 1024,
        }
    }
}

/// Why a connection was closed by the server.
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
}

impl CloseReason {
    /// All reasons, for metrics.
    pub const ALL: [CloseReason; 9] = [
        CloseReason::BadCommand,
        CloseReason::BadLength,
        CloseReason::BadKey,
        CloseReason::BadShape,
        CloseReason::Truncated,
        CloseReason::Stalled,
        CloseReason::Idle,
        CloseReason::TooManyConnections,
        CloseReason::Io,
    ];

    /// Metric label.
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
        }
    }
}

/// Server counters.
#[derive(Debug, Default)]
pub struct ServerStats {
    /// Connections open now.
    pub connections_open: AtomicU64,
    /// Connections accepted.
    pub connections_total: AtomicU64,
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
    /// PUTs refused for lack of room (body discarded).
    pub puts_no_space: AtomicU64,
    /// Connections closed for bad input, by [`CloseReason::ALL`] index.
    pub closed: [AtomicU64; 9],
}

impl ServerStats {
    fn request(&self, c: Command) {
        self.requests[c.to_wire() as usize - 1].fetch_add(1, Ordering::Relaxed);
    }

    /// Connections closed for `reason`.
    pub fn closed_for(&self, reason: CloseReason) -> u64 {
        let i = CloseReason::ALL
            .iter()
            .position(|r| *r == reason)
            .expect("listed");
        self.closed[i].load(Ordering::Relaxed)
    }

    fn close(&self, reason: CloseReason) {
        let i = CloseReason::ALL
            .iter()
            .position(|r| *r == reason)
            .expect("listed");
        self.closed[i].fetch_add(1, Ordering::Relaxed);
    }
}

/// A running server. Drop does not stop it: call [`Server::shutdown`] and [`Server::wait`].
pub struct Server {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    stats: Arc<ServerStats>,
    accept: Mutex<Option<JoinHandle<()>>>,
}

impl Server {
    /// Bind `addr` and start accepting.
    pub fn start(chain: Chain, addr: SocketAddr, config: ServeConfig) -> io::Result<Server> {
        let listener = TcpListener::bind(addr)?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let stats = Arc::new(ServerStats::default());
        let shared = Shared {
            chain,
            config,
            stop: stop.clone(),
            stats: stats.clone(),
        };
        let accept = std::thread::Builder::new()
            .name("kvhost-serve-accept".into())
            .spawn(move || accept_loop(listener, shared))?;
        tracing::info!(target: "kvhost::serve", "listening on lm://{addr}");
        Ok(Server {
            addr,
            stop,
            stats,
            accept: Mutex::new(Some(accept)),
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Counters.
    pub fn stats(&self) -> &Arc<ServerStats> {
        &self.stats
    }

    /// The flag that stops the server (set it from a signal handler).
    pub fn stop_flag(&self) -> Arc<AtomicBool> {
        self.stop.clone()
    }

    /// Stop accepting; connections finish their current request and close.
    pub fn shutdown(&self) {
        self.stop.store(true, Ordering::Release);
    }

    /// Wait until the server has stopped (after `shutdown`, or the stop flag) and every connection
    /// has finished.
    pub fn wait(&self) {
        if let Some(h) = self.accept.lock().take() {
            let _ = h.join();
        }
    }
}

#[derive(Clone)]
struct Shared {
    chain: Chain,
    config: ServeConfig,
    stop: Arc<AtomicBool>,
    stats: Arc<ServerStats>,
}

/// How often blocked reads wake up to check the stop flag and deadlines.
const POLL: Duration = Duration::from_millis(100);

fn accept_loop(listener: TcpListener, shared: Shared) {
    let mut conns: Vec<JoinHandle<()>> = Vec::new();
    while !shared.stop.load(Ordering::Acquire) {
        match listener.accept() {
            Ok((stream, peer)) => {
                conns.retain(|c| !c.is_finished());
                shared
                    .stats
                    .connections_total
                    .fetch_add(1, Ordering::Relaxed);
                if conns.len() >= shared.config.max_connections {
                    shared.stats.close(CloseReason::TooManyConnections);
                    tracing::warn!(target: "kvhost::serve", %peer, "refused: {} connections open", conns.len());
                    continue;
                }
                let s = shared.clone();
                match std::thread::Builder::new()
                    .name(format!("kvhost-conn-{peer}"))
                    .spawn(move || connection(stream, peer, s))
                {
                    Ok(h) => conns.push(h),
                    Err(e) => {
                        tracing::error!(target: "kvhost::serve", %peer, "cannot spawn a connection thread: {e}")
                    }
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(20))
            }
            Err(e) => {
                tracing::warn!(target: "kvhost::serve", "accept: {e}");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
    for c in conns {
        let _ = c.join();
    }
}

enum ReadEnd {
    /// The buffer is full.
    Done,
    /// The peer closed before the first byte (a clean end between requests).
    Eof,
    /// Stopping, between requests.
    Stopped,
}

/// Read exactly `buf.len()` bytes. Between requests (`idle` is true and nothing read yet) the wait is
/// bounded by the idle timeout and ends on stop; once a byte has arrived, by the stall timeout.
fn read_full(
    stream: &mut TcpStream,
    buf: &mut [u8],
    idle: bool,
    s: &Shared,
) -> Result<ReadEnd, CloseReason> {
    let mut filled = 0;
    let mut last_progress = Instant::now();
    while filled < buf.len() {
        match stream.read(&mut buf[filled..]) {
            Ok(0) if filled == 0 && idle => return Ok(ReadEnd::Eof),
            Ok(0) => return Err(CloseReason::Truncated),
            Ok(n) => {
                filled += n;
                last_progress = Instant::now();
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                if filled == 0 && idle {
                    if s.stop.load(Ordering::Acquire) {
                        return Ok(ReadEnd::Stopped);
                    }
                    if s.config
                        .idle_timeout
                        .is_some_and(|t| last_progress.elapsed() >= t)
                    {
                        return Err(CloseReason::Idle);
                    }
                } else if last_progress.elapsed() >= s.config.stall_timeout {
                    return Err(CloseReason::Stalled);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return Err(CloseReason::Io),
        }
    }
    Ok(ReadEnd::Done)
}

/// Write all of `bufs` (header first, so it goes out in the first send).
fn write_all_vectored(stream: &mut TcpStream, mut bufs: &mut [IoSlice<'_>]) -> io::Result<()> {
    while !bufs.is_empty() {
        match stream.write_vectored(bufs) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut bufs, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn connection(mut stream: TcpStream, peer: SocketAddr, s: Shared) {
    s.stats.connections_open.fetch_add(1, Ordering::Relaxed);
    let _ = stream.set_nodelay(true);
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(POLL));
    let _ = stream.set_write_timeout(Some(s.config.stall_timeout));
    let mut scratch = Vec::new();
    let end = loop {
        match serve_one(&mut stream, &s, &mut scratch) {
            Ok(true) => continue,
            Ok(false) => break None,
            Err(reason) => break Some(reason),
        }
    };
    if let Some(reason) = end {
        s.stats.close(reason);
        tracing::warn!(target: "kvhost::serve", %peer, reason = reason.name(), "closing connection");
    }
    let _ = stream.shutdown(std::net::Shutdown::Both);
    s.stats.connections_open.fetch_sub(1, Ordering::Relaxed);
}

fn protocol_reason(e: &ProtocolError) -> CloseReason {
    match e {
        ProtocolError::BadCommand(_) => CloseReason::BadCommand,
        ProtocolError::NegativeLength(_) | ProtocolError::TooLong { .. } => CloseReason::BadLength,
        ProtocolError::BadShape(_) => CloseReason::BadShape,
        ProtocolError::BadKey(_) => CloseReason::BadKey,
    }
}

/// Serve one request. `Ok(false)`: the connection ended cleanly.
fn serve_one(
    stream: &mut TcpStream,
    s: &Shared,
    scratch: &mut Vec<u8>,
) -> Result<bool, CloseReason> {
    let mut header = [0u8; REQUEST_HEADER_LEN];
    match read_full(stream, &mut header, true, s)? {
        ReadEnd::Done => {}
        ReadEnd::Eof | ReadEnd::Stopped => return Ok(false),
    }
    let req = protocol::decode_request(&header, s.config.max_chunk_bytes).map_err(|e| {
        tracing::warn!(target: "kvhost::serve", "bad request: {e}");
        protocol_reason(&e)
    })?;
    s.stats.request(req.command);
    match req.command {
        Command::Put => put(stream, s, &req, scratch)?,
        Command::Get => get(stream, s, &req)?,
        Command::Exist => {
            let key = req.key.as_ref().expect("decoded with a key");
            let found = s.chain.lookup(std::slice::from_ref(key), None).hit_chunks == 1;
            reply(
                stream,
                &Response::status(if found {
                    protocol::SUCCESS
                } else {
                    protocol::FAIL
                }),
                &[],
            )?;
        }
        Command::List => {
            let mut keys: Vec<String> =
                s.chain.hot().keys().iter().map(|k| k.to_string()).collect();
            keys.sort();
            let body = keys.join("\n");
            let r = Response {
                length: body.len() as u64,
                ..Response::status(protocol::SUCCESS)
            };
            reply(stream, &r, body.as_bytes())?;
        }
        Command::Health => reply(stream, &Response::status(protocol::SUCCESS), &[])?,
    }
    Ok(true)
}

fn reply(stream: &mut TcpStream, r: &Response, body: &[u8]) -> Result<(), CloseReason> {
    let header = r.encode();
    let mut bufs = [IoSlice::new(&header), IoSlice::new(body)];
    write_all_vectored(stream, &mut bufs).map_err(|_| CloseReason::Io)
}

fn put(
    stream: &mut TcpStream,
    s: &Shared,
    req: &Request,
    scratch: &mut Vec<u8>,
) -> Result<(), CloseReason> {
    let key = req.key.as_ref().expect("decoded with a key");
    let len = req.length as usize;
    let meta = protocol::meta_from(req);
    // The body goes straight from the socket into the arena block.
    let outcome = s.chain.try_put_with(key, len, meta, |dst| {
        match read_full(stream, dst, false, s) {
            Ok(_) => Ok(()),
            Err(reason) => Err(reason),
        }
    })?;
    match outcome {
        PutOutcome::Stored => {
            s.stats.puts_stored.fetch_add(1, Ordering::Relaxed);
            s.stats.bytes_in.fetch_add(req.length, Ordering::Relaxed);
            Ok(())
        }
        other => {
            match other {
                PutOutcome::Duplicate => s.stats.puts_duplicate.fetch_add(1, Ordering::Relaxed),
                _ => s.stats.puts_no_space.fetch_add(1, Ordering::Relaxed),
            };
            // Not stored: the body must still be read off the socket.
            discard(stream, len, s, scratch)
        }
    }
}

fn discard(
    stream: &mut TcpStream,
    mut len: usize,
    s: &Shared,
    scratch: &mut Vec<u8>,
) -> Result<(), CloseReason> {
    scratch.resize(256 << 10, 0);
    while len > 0 {
        let n = len.min(scratch.len());
        read_full(stream, &mut scratch[..n], false, s)?;
        len -= n;
    }
    Ok(())
}

fn get(stream: &mut TcpStream, s: &Shared, req: &Request) -> Result<(), CloseReason> {
    let key = req.key.as_ref().expect("decoded with a key");
    match s.chain.get(std::slice::from_ref(key)).pop().flatten() {
        Some(h) => {
            s.stats.get_hits.fetch_add(1, Ordering::Relaxed);
            s.stats
                .bytes_out
                .fetch_add(h.len() as u64, Ordering::Relaxed);
            reply(stream, &Response::hit(&h.meta(), h.len() as u64), h.bytes())
        }
        None => {
            s.stats.get_misses.fetch_add(1, Ordering::Relaxed);
            reply(stream, &Response::miss(), &[])
        }
    }
}
