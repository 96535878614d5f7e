//! # kvhost
//!
//! A native host for KV-cache storage plugins. The modules follow the data's path:
//! [`config`] → [`loader`] → [`plugin`] (the safe binding of one loaded backend) → [`cache`] (the CPU
//! hot cache) → [`chain`] (the storage manager) → front ends ([`cli`], [`bench`], [`serve`]).

#![warn(missing_docs)]

pub mod bench;
pub mod cache;
pub mod chain;
pub mod cli;
pub mod config;
pub mod conformance;
pub mod key;
pub mod loader;
pub mod log_limit;
pub mod plugin;
pub mod serve;

pub use config::{Config, ConfigError, PluginSpec};
pub use key::{ChunkKey, Chunker, KeyError};
