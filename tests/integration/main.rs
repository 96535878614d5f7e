//! kvhost integration tests: one binary that builds on real plugins (C, C++ and Rust `.so` files made
//! by the workspace build) and loads them through the real loader.

mod abi_header;
mod bad_config;
mod chain;
mod cli;
mod conformance;
mod faults;
mod fs;
mod fuzz;
mod lent;
mod lmcache_compat;
mod loader;
mod logstore;
mod plugin_stats;
mod python;
mod rados;
mod redis;
mod sanitizers;
mod sdk_kit;
mod serve;
mod serve_hostile;
mod sick_tier;
mod stress;
mod util;
mod vtable;
