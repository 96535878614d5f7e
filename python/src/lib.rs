//! `kvhost._native`: the Python binding of the kvhost host library.
//!
//! The modules follow the data's path: [`keys`] and [`buffer`] (what crosses from Python), [`chain`]
//! (`kvhost.Chain`, synchronous), [`l2`] (LMCache's asynchronous `native_plugin` client). The pure
//! Python package around it (`kvhost/`) holds the LMCache and SGLang adapters.

mod buffer;
mod chain;
mod errors;
mod keys;
mod l2;

use pyo3::prelude::*;

/// Route the host's `tracing` events to stderr, filtered by `KVHOST_LOG` (default `warn`), once.
fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("KVHOST_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .try_init();
}

#[pymodule]
#[pyo3(name = "_native")]
fn native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    init_logging();
    let py = m.py();
    m.add_class::<chain::PyChain>()?;
    m.add_class::<l2::L2Client>()?;
    m.add("KvhostError", py.get_type::<errors::KvhostError>())?;
    m.add("ConfigError", py.get_type::<errors::ConfigError>())?;
    m.add("PluginLoadError", py.get_type::<errors::PluginLoadError>())?;
    m.add("PluginError", py.get_type::<errors::PluginError>())?;
    m.add(
        "OperationTimeout",
        py.get_type::<errors::OperationTimeout>(),
    )?;
    m.add("ChainClosed", py.get_type::<errors::ChainClosed>())?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
