//! Benchmarks behind `kvhost bench`. They print ratios measured side by side in one run; they assert
//! nothing about absolute speed.

pub mod micro;
pub mod serve;
pub mod workload;
