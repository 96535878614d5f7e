//! The package's exceptions. Each carries the host's message, which names the plugin, file or key
//! and the cause.

use kvhost::chain::ChainError;
use kvhost::ConfigError as HostConfigError;
use pyo3::create_exception;
use pyo3::exceptions::PyException;
use pyo3::PyErr;

create_exception!(
    _native,
    KvhostError,
    PyException,
    "Base class of every kvhost error."
);
create_exception!(
    _native,
    ConfigError,
    KvhostError,
    "The config is missing, malformed or inconsistent (the message names the file, line and key)."
);
create_exception!(
    _native,
    PluginLoadError,
    KvhostError,
    "A plugin could not be found, loaded, checked or created (the message names it and why)."
);
create_exception!(
    _native,
    PluginError,
    KvhostError,
    "A plugin failed an operation (the message names the plugin, the operation and its status)."
);
create_exception!(
    _native,
    OperationTimeout,
    KvhostError,
    "A plugin did not complete within the timeout. Buffers of the operation stay with the plugin \
     until it completes or the chain is closed."
);
create_exception!(
    _native,
    ChainClosed,
    KvhostError,
    "The chain has been closed."
);

pub fn config_error(e: HostConfigError) -> PyErr {
    ConfigError::new_err(e.to_string())
}

pub fn chain_error(e: ChainError) -> PyErr {
    match e {
        ChainError::Load(e) => PluginLoadError::new_err(e.to_string()),
        other => ConfigError::new_err(other.to_string()),
    }
}
