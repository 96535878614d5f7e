//! Front end: `kvhost serve`, a cache server speaking LMCache's `lm://` protocol on top of the chain,
//! with Prometheus metrics.

mod body_budget;
pub mod client;
mod connection;
pub mod metrics;
mod metrics_http;
pub mod protocol;
mod server;
mod stats;

pub use server::{ServeConfig, Server, Stopper};
pub use stats::{CloseReason, ServerStats};
