//! One `lm://` connection: requests served in order, each under a deadline, until the peer leaves,
//! misbehaves, idles out, or the server stops.
//!
//! Timing rules (all measured on the server's clock, none reset by a trickle of bytes):
//! - Between requests the connection may idle up to `idle_timeout`; a stop closes it at once.
//! - From a request's first header byte, the whole request (header, body, reply) must finish by
//!   `request_deadline`, and no single wait for the peer may exceed `stall_timeout`.
//! - Once the server is stopping, a request in progress has `shutdown_grace` left at most; no new
//!   request is started.
//!
//! Plugin calls and large copies run on the blocking pool, never on the reactor: a read the hot cache
//! answers stays on the reactor through the chain's in-memory calls, which never reach a plugin.

use super::body_budget::BodyBudget;
use super::protocol::{self, Command, ProtocolError, Request, Response, REQUEST_HEADER_LEN};
use super::stats::{CloseReason, ServerStats};
use super::ServeConfig;
use crate::chain::{Chain, PutOutcome};
use crate::log_limit::escape_str;
use crate::warn_limited;
use std::io::{self, IoSlice};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::{sleep_until, Instant};

/// What every connection shares.
pub(super) struct Shared {
    pub(super) chain: Chain,
    pub(super) config: ServeConfig,
    pub(super) stats: Arc<ServerStats>,
    pub(super) budget: Arc<BodyBudget>,
    /// The chain has no plugin tiers: reads never leave memory, so they run on the reactor.
    pub(super) hot_only: bool,
}

/// Counts the connection as open for as long as it lives (also if its task is aborted).
struct OpenGuard<'a>(&'a ServerStats);

impl Drop for OpenGuard<'_> {
    fn drop(&mut self) {
        self.0.connections_open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Serve `stream` until it ends. Never panics on bad input; every server-side close is counted.
pub(super) async fn serve(
    mut stream: TcpStream,
    peer: SocketAddr,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) {
    shared
        .stats
        .connections_open
        .fetch_add(1, Ordering::Relaxed);
    let _open = OpenGuard(&shared.stats);
    let _ = stream.set_nodelay(true);
    let mut conn = Conn {
        stream: &mut stream,
        s: &shared,
        stop: &mut stop,
        scratch: Vec::new(),
    };
    let end = loop {
        match conn.serve_one().await {
            Ok(true) => continue,
            Ok(false) => break None,
            Err(reason) => break Some(reason),
        }
    };
    if let Some(reason) = end {
        shared.stats.close(reason);
        warn_limited!("serve_close", %peer, reason = reason.name(), "closing connection");
    }
    let _ = stream.shutdown().await;
}

struct Conn<'a> {
    stream: &'a mut TcpStream,
    s: &'a Shared,
    stop: &'a mut watch::Receiver<bool>,
    scratch: Vec<u8>,
}

/// The time limits of the request being served.
struct Clock {
    /// `request_deadline` from the first header byte.
    deadline: Instant,
    /// Set once the server is stopping: the request must be done by then.
    stop_by: Option<Instant>,
}

impl Clock {
    /// The earliest limit for the next wait on the peer, and the reason if it passes.
    fn next_limit(&self, stall: std::time::Duration) -> (Instant, CloseReason) {
        let mut limit = (Instant::now() + stall, CloseReason::Stalled);
        if self.deadline <= limit.0 {
            limit = (self.deadline, CloseReason::Deadline);
        }
        if let Some(t) = self.stop_by.filter(|t| *t < limit.0) {
            limit = (t, CloseReason::Shutdown);
        }
        limit
    }
}

fn protocol_reason(e: &ProtocolError) -> CloseReason {
    match e {
        ProtocolError::BadCommand(_) => CloseReason::BadCommand,
        ProtocolError::NegativeLength(_) | ProtocolError::TooLong { .. } => CloseReason::BadLength,
        ProtocolError::BadShape(_) => CloseReason::BadShape,
        ProtocolError::BadKey(_) => CloseReason::BadKey,
    }
}

fn is_retry(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock
    )
}

impl Conn<'_> {
    fn stopping(&self) -> bool {
        *self.stop.borrow()
    }

    /// Wait for the first header byte. `None`: the peer left, or the server is stopping.
    async fn wait_first_byte(&mut self, header: &mut [u8]) -> Result<Option<usize>, CloseReason> {
        let idle = self.s.config.idle_timeout;
        loop {
            if self.stopping() {
                return Ok(None);
            }
            let idle_sleep = async {
                match idle {
                    Some(d) => tokio::time::sleep(d).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                biased;
                _ = self.stop.changed() => {
                    // A dropped sender also means stop.
                    return Ok(None);
                }
                r = self.stream.read(header) => match r {
                    Ok(0) => return Ok(None),
                    Ok(n) => return Ok(Some(n)),
                    Err(e) if is_retry(&e) => continue,
                    Err(_) => return Err(CloseReason::Io),
                },
                _ = idle_sleep => return Err(CloseReason::Idle),
            }
        }
    }

    /// Fill `buf` from the peer within the request's limits.
    async fn read_exact(&mut self, buf: &mut [u8], clock: &mut Clock) -> Result<(), CloseReason> {
        let mut filled = 0;
        while filled < buf.len() {
            let (limit, reason) = clock.next_limit(self.s.config.stall_timeout);
            let watch_stop = clock.stop_by.is_none();
            tokio::select! {
                biased;
                r = self.stream.read(&mut buf[filled..]) => match r {
                    Ok(0) => return Err(CloseReason::Truncated),
                    Ok(n) => filled += n,
                    Err(e) if is_retry(&e) => {}
                    Err(_) => return Err(CloseReason::Io),
                },
                _ = self.stop.changed(), if watch_stop => {
                    clock.stop_by = Some(Instant::now() + self.s.config.shutdown_grace);
                }
                _ = sleep_until(limit) => return Err(reason),
            }
        }
        Ok(())
    }

    /// Write all of `bufs` within the request's limits (header first, so it leaves in the first send).
    async fn write_all(
        &mut self,
        mut bufs: &mut [IoSlice<'_>],
        clock: &mut Clock,
    ) -> Result<(), CloseReason> {
        while !bufs.is_empty() {
            let (limit, reason) = clock.next_limit(self.s.config.stall_timeout);
            let watch_stop = clock.stop_by.is_none();
            tokio::select! {
                biased;
                r = self.stream.write_vectored(bufs) => match r {
                    Ok(0) => return Err(CloseReason::Io),
                    Ok(n) => IoSlice::advance_slices(&mut bufs, n),
                    Err(e) if is_retry(&e) => {}
                    Err(_) => return Err(CloseReason::Io),
                },
                _ = self.stop.changed(), if watch_stop => {
                    clock.stop_by = Some(Instant::now() + self.s.config.shutdown_grace);
                }
                _ = sleep_until(limit) => return Err(reason),
            }
        }
        Ok(())
    }

    async fn reply(
        &mut self,
        r: &Response,
        body: &[u8],
        clock: &mut Clock,
    ) -> Result<(), CloseReason> {
        let header = r.encode();
        let mut bufs = [IoSlice::new(&header), IoSlice::new(body)];
        self.write_all(&mut bufs, clock).await
    }

    /// Serve one request. `Ok(false)`: the connection ended cleanly (peer left, or stopping).
    async fn serve_one(&mut self) -> Result<bool, CloseReason> {
        let mut header = [0u8; REQUEST_HEADER_LEN];
        let Some(first) = self.wait_first_byte(&mut header).await? else {
            return Ok(false);
        };
        let mut clock = Clock {
            deadline: Instant::now() + self.s.config.request_deadline,
            stop_by: None,
        };
        self.read_exact(&mut header[first..], &mut clock).await?;
        let req = protocol::decode_request(&header, self.s.config.max_chunk_bytes).map_err(|e| {
            // The message quotes what the client sent: escaped, so it cannot forge log lines.
            warn_limited!("serve_bad_request", error = %escape_str(&e.to_string()), "bad request");
            protocol_reason(&e)
        })?;
        self.s.stats.request(req.command);
        match req.command {
            Command::Put => self.put(req, &mut clock).await?,
            Command::Get => self.get(req, &mut clock).await?,
            Command::Exist => {
                let key = req.key.expect("decoded with a key");
                let found = if self.s.hot_only {
                    self.s
                        .chain
                        .lookup(std::slice::from_ref(&key), None)
                        .hit_chunks
                        == 1
                } else if self.s.chain.contains_in_memory(&key) {
                    true
                } else {
                    let chain = self.s.chain.clone();
                    blocking(move || chain.lookup(std::slice::from_ref(&key), None).hit_chunks == 1)
                        .await?
                };
                let code = if found {
                    protocol::SUCCESS
                } else {
                    protocol::FAIL
                };
                self.reply(&Response::status(code), &[], &mut clock).await?;
            }
            Command::List => {
                let chain = self.s.chain.clone();
                let body = blocking(move || {
                    let mut keys: Vec<String> =
                        chain.hot().keys().iter().map(|k| k.to_string()).collect();
                    keys.sort();
                    keys.join("\n")
                })
                .await?;
                let r = Response {
                    length: body.len() as u64,
                    ..Response::status(protocol::SUCCESS)
                };
                self.reply(&r, body.as_bytes(), &mut clock).await?;
            }
            Command::Health => {
                self.reply(&Response::status(protocol::SUCCESS), &[], &mut clock)
                    .await?
            }
        }
        Ok(true)
    }

    async fn put(&mut self, req: Request, clock: &mut Clock) -> Result<(), CloseReason> {
        let len = req.length as usize;
        let Some(mut staged) = self.s.budget.try_reserve(len) else {
            self.s
                .stats
                .puts_over_budget
                .fetch_add(1, Ordering::Relaxed);
            warn_limited!(
                "serve_put_over_budget",
                key = %escape_str(&req.key_text),
                bytes = len,
                budget = self.s.budget.limit(),
                in_progress = self.s.budget.used(),
                "PUT refused: bodies in progress would pass put_body_budget_bytes; body dropped"
            );
            return self.discard(len, clock).await;
        };
        let stats = &self.s.stats;
        stats
            .put_body_bytes_staged
            .fetch_add(len as u64, Ordering::Relaxed);
        let read = self.read_exact(staged.as_mut_slice(), clock).await;
        stats
            .put_body_bytes_staged
            .fetch_sub(len as u64, Ordering::Relaxed);
        read?;
        // The whole body is here: only now does it take (and maybe evict for) an arena block.
        let chain = self.s.chain.clone();
        let key = req.key.clone().expect("decoded with a key");
        let meta = protocol::meta_from(&req);
        // Through the hot cache's copy pool: a large body's copy is split over the cores.
        let commit =
            move || chain.put_with(&key, len, meta, |dst| chain.hot().copy(dst, staged.bytes()));
        let outcome = if self.s.hot_only {
            // No plugin can hang this call: run it on this thread (the runtime moves the other
            // tasks away meanwhile), which saves the two thread hops of the blocking pool.
            tokio::task::block_in_place(commit)
        } else {
            blocking(commit).await?
        };
        match outcome {
            PutOutcome::Stored => {
                stats.puts_stored.fetch_add(1, Ordering::Relaxed);
                stats.bytes_in.fetch_add(req.length, Ordering::Relaxed);
            }
            PutOutcome::Duplicate => {
                stats.puts_duplicate.fetch_add(1, Ordering::Relaxed);
            }
            _ => {
                stats.puts_no_space.fetch_add(1, Ordering::Relaxed);
            }
        }
        Ok(())
    }

    /// Read and drop `len` body bytes (a PUT that is not stored), keeping the connection in step.
    async fn discard(&mut self, mut len: usize, clock: &mut Clock) -> Result<(), CloseReason> {
        let mut scratch = std::mem::take(&mut self.scratch);
        scratch.resize(64 << 10, 0);
        let mut result = Ok(());
        while len > 0 && result.is_ok() {
            let n = len.min(scratch.len());
            result = self.read_exact(&mut scratch[..n], clock).await;
            len -= n;
        }
        self.scratch = scratch;
        result
    }

    async fn get(&mut self, req: Request, clock: &mut Clock) -> Result<(), CloseReason> {
        let key = req.key.expect("decoded with a key");
        let found = if self.s.hot_only {
            self.s.chain.get(std::slice::from_ref(&key)).pop().flatten()
        } else if let Some(h) = self.s.chain.get_in_memory(&key) {
            Some(h)
        } else {
            let chain = self.s.chain.clone();
            blocking(move || chain.get(std::slice::from_ref(&key)).pop().flatten()).await?
        };
        match found {
            Some(h) => {
                self.s.stats.get_hits.fetch_add(1, Ordering::Relaxed);
                self.s
                    .stats
                    .bytes_out
                    .fetch_add(h.len() as u64, Ordering::Relaxed);
                let r = Response::hit(&h.meta(), h.len() as u64);
                self.reply(&r, h.bytes(), clock).await
            }
            None => {
                self.s.stats.get_misses.fetch_add(1, Ordering::Relaxed);
                self.reply(&Response::miss(), &[], clock).await
            }
        }
    }
}

/// Run a chain call on the blocking pool. A panic there closes this connection only.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, CloseReason> {
    tokio::task::spawn_blocking(f).await.map_err(|e| {
        tracing::error!(target: "kvhost::serve", "a chain call failed: {e}");
        CloseReason::Io
    })
}
