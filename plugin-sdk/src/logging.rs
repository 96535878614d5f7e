//! Forwarding of the plugin's `log` and `tracing` events to the host logger.
//!
//! Each plugin library has its own `log` statics, so the SDK installs one `log::Log` per library. The
//! `tracing` crate is built with its `log` feature: with no subscriber inside the plugin, its events
//! become `log` records and take the same path.

use crate::{abi, ffi};
use std::cell::Cell;
use std::sync::atomic::{AtomicPtr, Ordering};

/// A handle to the host's services for one plugin instance. `Copy`, `Send` and `Sync`.
#[derive(Clone, Copy, Debug)]
pub struct Host {
    api: *const abi::kvh_host_api,
}

// SAFETY: the host API table is immutable and valid until process exit, and its functions are
// `[any-thread]` per the ABI.
unsafe impl Send for Host {}
// SAFETY: as above.
unsafe impl Sync for Host {}

static DEFAULT_HOST: AtomicPtr<abi::kvh_host_api> = AtomicPtr::new(std::ptr::null_mut());
thread_local! {
    static THREAD_HOST: Cell<*const abi::kvh_host_api> = const { Cell::new(std::ptr::null()) };
}
static LOGGER: HostLogger = HostLogger;

impl Host {
    /// # Safety
    /// `api` must be NULL or a host API table valid until process exit.
    pub(crate) unsafe fn new(api: *const abi::kvh_host_api) -> Self {
        Host { api }
    }

    fn api(&self) -> Option<&abi::kvh_host_api> {
        // SAFETY: NULL or valid until process exit (constructor contract).
        unsafe { self.api.as_ref() }
    }

    /// The configured instance name.
    pub fn instance_name(&self) -> &str {
        // SAFETY: the host's string lives as long as the table.
        self.api()
            .map(|a| unsafe { ffi::str(a.instance_name) })
            .unwrap_or("")
    }

    /// Whether the host records messages at `level` (`KVH_LOG_*`).
    pub fn log_enabled(&self, level: i32) -> bool {
        match self.api().and_then(|a| a.log_enabled.map(|f| (a, f))) {
            // SAFETY: host function from a valid table, called with its own context.
            Some((a, f)) => unsafe { f(a.host_ctx, level) },
            None => false,
        }
    }

    /// Log `message` at `level` under `target`.
    pub fn log(&self, level: i32, target: &str, message: &str) {
        if let Some((a, f)) = self.api().and_then(|a| a.log.map(|f| (a, f))) {
            // SAFETY: host function from a valid table; the strings are borrowed for the call.
            unsafe {
                f(
                    a.host_ctx,
                    level,
                    ffi::kvh_str(target),
                    ffi::kvh_str(message),
                )
            };
        }
    }

    /// Route `log`/`tracing` events of the current thread to this instance (call it first thing in a
    /// worker thread the backend spawns, so its events carry the right instance name).
    pub fn bind_current_thread(&self) {
        THREAD_HOST.with(|h| h.set(self.api));
    }

    /// Install the library-wide logger on first use; later instances become the default only for the
    /// threads they bind.
    pub(crate) fn install(&self) {
        if self.api.is_null() {
            return;
        }
        let first = DEFAULT_HOST
            .compare_exchange(
                std::ptr::null_mut(),
                self.api.cast_mut(),
                Ordering::AcqRel,
                Ordering::Acquire,
            )
            .is_ok();
        if first && log::set_logger(&LOGGER).is_ok() {
            // The host's filter can change later (a subscriber installed after the plugin loaded, a
            // reload), so every level passes here and `enabled` asks the host per event.
            log::set_max_level(log::LevelFilter::Trace);
        }
    }

    /// The host for events on this thread: the bound one, else the library default.
    pub(crate) fn current() -> Host {
        let bound = THREAD_HOST.with(|h| h.get());
        let api = if bound.is_null() {
            DEFAULT_HOST.load(Ordering::Acquire).cast_const()
        } else {
            bound
        };
        Host { api }
    }

    /// Run `f` with this instance bound to the thread, restoring the previous binding after.
    pub(crate) fn scoped<R>(&self, f: impl FnOnce() -> R) -> R {
        let prev = THREAD_HOST.with(|h| h.replace(self.api));
        struct Restore(*const abi::kvh_host_api);
        impl Drop for Restore {
            fn drop(&mut self) {
                THREAD_HOST.with(|h| h.set(self.0));
            }
        }
        let _restore = Restore(prev);
        f()
    }
}

struct HostLogger;

impl log::Log for HostLogger {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        Host::current().log_enabled(metadata.level() as i32)
    }

    fn log(&self, record: &log::Record<'_>) {
        let host = Host::current();
        let level = record.level() as i32;
        if host.log_enabled(level) {
            host.log(level, record.target(), &record.args().to_string());
        }
    }

    fn flush(&self) {}
}
