//! The `lm://` server: connections are tasks on a small tokio runtime (no thread per connection),
//! accepted as soon as they arrive, and bounded in number, idle time and per-request time.
//!
//! A PUT body is staged under a shared byte budget and enters the hot cache only once complete
//! ([`body_budget`](super::body_budget)). Any bad input closes that connection only, with a counter
//! and a rate-limited, escaped log line; the server, other clients and stored data are unaffected.
//!
//! Stopping ([`Server::shutdown`], or SIGTERM through the CLI): the listener closes at once, idle
//! connections close, requests in progress get `shutdown_grace` to finish, and [`Server::wait`]
//! returns when every connection is gone. Every PUT whose body was complete is in the chain by then.

use super::body_budget::BodyBudget;
use super::connection::{self, Shared};
use super::stats::{CloseReason, ServerStats};
use crate::chain::Chain;
use crate::warn_limited;
use parking_lot::Mutex;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::JoinSet;

/// Server settings. [`ServeConfig::default`] gives the documented defaults.
#[derive(Clone, Debug)]
pub struct ServeConfig {
    /// Largest PUT body accepted (1 GiB).
    pub max_chunk_bytes: u64,
    /// Longest single wait for the peer inside a request (10 s).
    pub stall_timeout: Duration,
    /// Longest a whole request (header, body and reply) may take from its first byte, however steadily
    /// its bytes come (60 s).
    pub request_deadline: Duration,
    /// A connection idle this long between requests is closed (`None`: never; default 600 s).
    pub idle_timeout: Option<Duration>,
    /// Connections beyond this many are refused at accept (16384).
    pub max_connections: usize,
    /// Bytes of PUT bodies in progress across all connections; a PUT past it is refused (2 GiB).
    pub put_body_budget: u64,
    /// After a stop, how long a request in progress may take to finish (2 s).
    pub shutdown_grace: Duration,
    /// Reactor threads (0: one per CPU, at most 4).
    pub worker_threads: usize,
}

impl Default for ServeConfig {
    fn default() -> Self {
        ServeConfig {
            max_chunk_bytes: 1 << 30,
            stall_timeout: Duration::from_secs(10),
            request_deadline: Duration::from_secs(60),
            idle_timeout: Some(Duration::from_secs(600)),
            max_connections: 16384,
            put_body_budget: 2 << 30,
            shutdown_grace: Duration::from_secs(2),
            worker_threads: 0,
        }
    }
}

/// Blocking-pool threads (chain calls: plugin I/O and hot-cache copies). Bounded so that a hung
/// plugin cannot make the server spawn a thread per request.
const MAX_BLOCKING_THREADS: usize = 64;

/// Pending connections the kernel queues before `accept` (capped by `net.core.somaxconn`). The
/// default of std's `bind`, 128, overflows when thousands of clients connect at once, and a dropped
/// SYN costs the client a 1 s retransmit.
const LISTEN_BACKLOG: u32 = 4096;

/// Backoff after a failed `accept` (EMFILE and the like), so the loop does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// Extra time, past `shutdown_grace`, before connections still open at a stop are aborted.
const ABORT_MARGIN: Duration = Duration::from_secs(1);

/// A running server. Call [`Server::shutdown`] (or [`Stopper::stop`]) and then [`Server::wait`];
/// dropping it also stops it, as `shutdown` does, without waiting.
pub struct Server {
    addr: SocketAddr,
    stats: Arc<ServerStats>,
    stop: Stopper,
    runner: Mutex<Option<JoinHandle<()>>>,
}

/// Stops a [`Server`] from anywhere (a signal thread, say). Cheap to clone.
#[derive(Clone, Debug)]
pub struct Stopper(Arc<watch::Sender<bool>>);

impl Stopper {
    /// Stop accepting; idle connections close, requests in progress finish within `shutdown_grace`.
    pub fn stop(&self) {
        self.0.send_replace(true);
    }
}

impl Server {
    /// Bind `addr` and start accepting.
    pub fn start(chain: Chain, addr: SocketAddr, config: ServeConfig) -> io::Result<Server> {
        if config.max_chunk_bytes > config.put_body_budget {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "max_chunk_bytes ({}) is larger than put_body_budget_bytes ({}): the largest PUT could never be accepted",
                    config.max_chunk_bytes, config.put_body_budget
                ),
            ));
        }
        let workers = match config.worker_threads {
            0 => std::thread::available_parallelism().map_or(2, |n| n.get().min(4)),
            n => n,
        };
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(workers)
            .max_blocking_threads(MAX_BLOCKING_THREADS)
            .thread_name("kvhost-serve")
            .enable_all()
            .build()?;
        let stats = Arc::new(ServerStats::default());
        let (stop_tx, stop_rx) = watch::channel(false);
        let budget = BodyBudget::new(
            config.put_body_budget,
            config.put_body_budget.min(256 << 20),
        );
        let shared = Arc::new(Shared {
            hot_only: chain.plugins().is_empty(),
            chain,
            config,
            stats: stats.clone(),
            budget,
        });
        // Bind here, so a bad address fails `start`, not later.
        let listener = {
            let _entered = runtime.enter();
            bind(addr)?
        };
        let addr = listener.local_addr()?;
        let runner = std::thread::Builder::new()
            .name("kvhost-serve-main".into())
            .spawn(move || {
                runtime.block_on(accept_loop(listener, shared, stop_rx));
                // Chain calls of aborted connections may still run on the blocking pool; do not
                // wait for a hung plugin here (the chain's close drains and reports them).
                runtime.shutdown_timeout(Duration::from_millis(500));
            })?;
        tracing::info!(target: "kvhost::serve", "listening on lm://{addr}");
        Ok(Server {
            addr,
            stats,
            stop: Stopper(Arc::new(stop_tx)),
            runner: Mutex::new(Some(runner)),
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

    /// A handle that stops the server (for a signal thread).
    pub fn stopper(&self) -> Stopper {
        self.stop.clone()
    }

    /// Stop accepting at once; idle connections close, requests in progress get `shutdown_grace`.
    pub fn shutdown(&self) {
        self.stop.stop();
    }

    /// Wait until the server has stopped and every connection has finished.
    pub fn wait(&self) {
        if let Some(h) = self.runner.lock().take() {
            let _ = h.join();
        }
    }
}

/// A listening socket on `addr` with [`LISTEN_BACKLOG`] (must run inside the runtime).
fn bind(addr: SocketAddr) -> io::Result<tokio::net::TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

async fn accept_loop(
    listener: tokio::net::TcpListener,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) {
    let stats = shared.stats.clone();
    let mut conns = JoinSet::new();
    loop {
        if *stop.borrow_and_update() {
            break;
        }
        tokio::select! {
            biased;
            _ = stop.changed() => break,
            Some(done) = conns.join_next(), if !conns.is_empty() => report_end(done),
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    stats.connections_total.fetch_add(1, Ordering::Relaxed);
                    while let Some(done) = conns.try_join_next() {
                        report_end(done);
                    }
                    if conns.len() >= shared.config.max_connections {
                        stats.close(CloseReason::TooManyConnections);
                        warn_limited!(
                            "serve_too_many_connections",
                            %peer,
                            max_connections = shared.config.max_connections,
                            "connection refused: max_connections are open"
                        );
                        drop(stream);
                        continue;
                    }
                    conns.spawn(connection::serve(stream, peer, shared.clone(), stop.clone()));
                }
                Err(e) => {
                    // EMFILE, ENFILE, ENOBUFS...: the pending connection stays queued; back off so
                    // the loop does not spin, and keep serving the connections already open.
                    stats.accept_errors.fetch_add(1, Ordering::Relaxed);
                    warn_limited!("serve_accept_error", error = %e, "accept failed; retrying");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
            },
        }
    }
    // Stop accepting at once: the port closes, new clients are refused by the kernel.
    drop(listener);
    let open = conns.len();
    if open > 0 {
        tracing::info!(target: "kvhost::serve", "stopping: {open} connection(s) finishing their request");
    }
    let abort_at = tokio::time::Instant::now() + shared.config.shutdown_grace + ABORT_MARGIN;
    loop {
        tokio::select! {
            done = conns.join_next() => match done {
                Some(done) => report_end(done),
                None => break,
            },
            _ = tokio::time::sleep_until(abort_at) => {
                tracing::warn!(target: "kvhost::serve", "stopping: aborting {} connection(s) still open", conns.len());
                conns.abort_all();
                while conns.join_next().await.is_some() {}
                break;
            }
        }
    }
}

fn report_end(done: Result<(), tokio::task::JoinError>) {
    if let Err(e) = done {
        if e.is_panic() {
            tracing::error!(target: "kvhost::serve", "a connection task panicked (that connection only is closed): {e}");
        }
    }
}
