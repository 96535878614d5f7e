//! # kvhost plugin SDK
//!
//! Two layers:
//! - [`abi`]: the stable C ABI (`#[repr(C)]` types, constants, function-pointer types). cbindgen turns it
//!   into `include/kvhost_plugin.h`; C and C++ plugins use that header, and the host binds plugins
//!   through these types.
//! - The Rust authoring layer: implement [`Backend`] and call [`export_backend!`] once per class.
//!
//! ```
//! use kvhost_plugin_sdk::*;
//!
//! struct Null;
//! impl Backend for Null {
//!     fn create(_: &CreateContext) -> Result<Self, Error> { Ok(Null) }
//!     fn contains(&self, b: &mut ContainsBatch<'_>) -> Result<(), Error> {
//!         (0..b.len()).for_each(|i| b.set_absent(i));
//!         Ok(())
//!     }
//!     fn put(&self, req: Request<Put>) -> Submit { req.set_all(Status::OK); req.finish(Status::OK) }
//!     fn get(&self, req: Request<Get>) -> Submit {
//!         (0..req.len()).for_each(|i| req.set_status(i, Status::NOT_FOUND));
//!         req.finish(Status::OK)
//!     }
//!     fn remove(&self, b: &mut KeyBatch<'_>, _force: bool) -> Result<(), Error> {
//!         (0..b.len()).for_each(|i| b.set_status(i, Status::NOT_FOUND));
//!         Ok(())
//!     }
//! }
//! export_backend!(null, Null);
//! ```
//!
//! Asynchronous operations: [`Request::defer`] turns a request into a [`Pending`] that a worker thread
//! completes. To serve one request on several threads at once, [`Pending::<Get>::share`] hands out each
//! item's destination buffer as a [`DstPart`] (splittable, disjoint) and [`Pending::<Put>::share`] makes a
//! [`SharedPut`]; the request completes when the last handle drops (see `plugins/fs/src/get.rs`).
//!
//! Plugins must be built with `panic = "unwind"` (the default): the SDK turns panics into
//! `KVH_ERR_PANIC` and poisons the backend; with `panic = "abort"` a panic would end the host process.

#![warn(missing_docs)]

pub mod abi;
mod backend;
#[cfg(feature = "build")]
pub mod build;
#[doc(hidden)]
pub mod export;
mod ffi;
mod key;
mod logging;
mod request;
mod stats;
mod status;

pub use backend::{Backend, CreateContext, ModelMetadata, OptionSpec};
pub use key::{ChunkMeta, Key};
pub use logging::Host;
pub use request::{
    Batch, Contains, ContainsBatch, DstPart, Get, KeyBatch, Op, Pending, Prefetch, Put, Remove,
    Request, SharedGet, SharedPut, Submit,
};
pub use stats::{valid_stat_name, Stats};
pub use status::{Error, Status};

/// The `log` crate the SDK forwards to the host; use its macros in a plugin.
pub use log;
/// The `tracing` crate, built so that its events reach the host too.
pub use tracing;

/// The abi_stable layout of the ABI's root type as this SDK sees it. The host compares a Rust plugin's
/// exported layout against its own with abi_stable's checker.
pub fn abi_layout() -> &'static abi_stable::type_layout::TypeLayout {
    <abi::kvh_plugin_descriptor as abi_stable::StableAbi>::LAYOUT
}

/// Export backend type `$ty` as class `$class`: defines the entry point `kvh_plugin_<class>_v1`, the
/// static descriptor and vtable, and the Rust layout symbol `kvh_plugin_<class>_v1_rust_layout`.
/// Call it once per class; one library may export several classes.
#[macro_export]
macro_rules! export_backend {
    ($class:ident, $ty:ty) => {
        const _: () = {
            use $crate::abi as __abi;
            use $crate::export as __ex;
            const __N: usize = <$ty as $crate::Backend>::OPTIONS.len();
            static __OPTIONS: __ex::Static<[__abi::kvh_option_spec; __N]> =
                __ex::Static(__ex::option_specs::<__N>(<$ty as $crate::Backend>::OPTIONS));
            static __VTABLE: __ex::Static<__abi::kvh_backend_vtable> =
                __ex::Static(__ex::vtable::<$ty>());
            static __DESCRIPTOR: __ex::Static<__abi::kvh_plugin_descriptor> =
                __ex::Static(__ex::descriptor::<$ty>(
                    match ::core::ffi::CStr::from_bytes_with_nul(
                        concat!(stringify!($class), "\0").as_bytes(),
                    ) {
                        Ok(s) => s,
                        Err(_) => panic!("class name contains a NUL byte"),
                    },
                    match ::core::ffi::CStr::from_bytes_with_nul(
                        concat!(env!("CARGO_PKG_VERSION"), "\0").as_bytes(),
                    ) {
                        Ok(s) => s,
                        Err(_) => panic!("version contains a NUL byte"),
                    },
                    &__OPTIONS.0,
                    &__VTABLE.0,
                ));
            static __LAYOUT: __ex::Static<__ex::RustLayoutHeader> =
                __ex::Static(__ex::rust_layout_header());

            /// Entry point of this backend class.
            ///
            /// # Safety
            /// Called by the kvhost host with a host API valid until process exit, or NULL.
            #[unsafe(export_name = concat!("kvh_plugin_", stringify!($class), "_v1"))]
            pub unsafe extern "C" fn __kvh_entry(
                host: *const __abi::kvh_host_api,
            ) -> *const __abi::kvh_plugin_descriptor {
                // SAFETY: forwarded from the host, per the ABI.
                unsafe { __ex::on_entry(host) };
                &__DESCRIPTOR.0
            }

            /// The abi_stable layout header of this build of the SDK.
            #[unsafe(export_name = concat!("kvh_plugin_", stringify!($class), "_v1_rust_layout"))]
            pub extern "C" fn __kvh_rust_layout() -> *const __ex::RustLayoutHeader {
                &__LAYOUT.0
            }
        };
    };
}
