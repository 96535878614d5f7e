//! Front end: `kvhost serve`, a cache server speaking LMCache's `lm://` protocol on top of the chain,
//! with Prometheus metrics.

pub mod client;
pub mod metrics;
pub mod protocol;
mod server;

pub use server::{CloseReason, ServeConfig, Server, ServerStats};
