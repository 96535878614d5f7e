//! The HTTP side of `/metrics`: hyper on its own one-thread tokio runtime, so the endpoint answers
//! however busy `lm://` is, and an `accept` failure (EMFILE when the process is out of file
//! descriptors) only delays it: the loop backs off and accepts again once descriptors are free.
//!
//! What is served is [`render`](super::metrics::render)'s text; new metric families go there.

use super::metrics::render;
use super::stats::ServerStats;
use crate::chain::Chain;
use crate::warn_limited;
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{header, Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Semaphore;

/// Metrics connections served at once; more are closed at accept (a scraper needs one).
const MAX_CONNECTIONS: usize = 64;
/// A client must send its request headers within this time.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Backoff after a failed `accept`.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

struct Source {
    chain: Chain,
    server: Arc<ServerStats>,
    model_name: String,
    worker_id: u32,
}

/// Serve `GET /metrics` on `addr` from a background thread. Returns the bound address.
pub fn start(
    addr: SocketAddr,
    chain: Chain,
    server: Arc<ServerStats>,
    model_name: String,
    worker_id: u32,
) -> std::io::Result<SocketAddr> {
    let listener = std::net::TcpListener::bind(addr)?;
    listener.set_nonblocking(true)?;
    let bound = listener.local_addr()?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let listener = {
        let _entered = runtime.enter();
        tokio::net::TcpListener::from_std(listener)?
    };
    let source = Arc::new(Source {
        chain,
        server,
        model_name,
        worker_id,
    });
    std::thread::Builder::new()
        .name("kvhost-metrics".into())
        .spawn(move || runtime.block_on(accept_loop(listener, source)))?;
    Ok(bound)
}

async fn accept_loop(listener: tokio::net::TcpListener, source: Arc<Source>) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (stream, _peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                warn_limited!("metrics_accept_error", error = %e, "metrics: accept failed; retrying");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            warn_limited!(
                "metrics_too_many_connections",
                "metrics: {MAX_CONNECTIONS} connections open; closing a new one"
            );
            continue;
        };
        let source = source.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let response = respond(&source, &req);
                async move { Ok::<_, Infallible>(response) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service)
                .await;
            drop(slot);
        });
    }
}

fn respond(source: &Source, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let (status, content_type, body) =
        if req.uri().path() == "/metrics" && req.method() == Method::GET {
            let text = render(
                &source.chain,
                &source.server,
                &source.model_name,
                source.worker_id,
            );
            (StatusCode::OK, "text/plain; version=0.0.4", text)
        } else {
            (
                StatusCode::NOT_FOUND,
                "text/plain",
                "try GET /metrics\n".to_string(),
            )
        };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    response
}
