//! `noop`: the smallest complete kvhost plugin written with the Rust SDK. It accepts every put and
//! keeps nothing (so it advertises `KVH_CAP_DISCARDS`), answering every call synchronously.
//!
//! It is the template for Rust plugin authors, and the benchmark's no-op backend: the host measures
//! the cost of calling it through `dlopen` against calling the same code linked into the binary.

use kvhost_plugin_sdk::abi;
use kvhost_plugin_sdk::*;

/// The backend: no state at all.
#[derive(Debug)]
pub struct Noop;

impl Backend for Noop {
    const CAPABILITIES: u64 = abi::KVH_CAP_DISCARDS;
    const DESCRIPTION: &'static std::ffi::CStr =
        c"Stores nothing; answers every call at once (SDK template and benchmark no-op)";

    fn create(_ctx: &CreateContext) -> Result<Self, Error> {
        Ok(Noop)
    }

    fn contains(&self, batch: &mut ContainsBatch<'_>) -> Result<(), Error> {
        (0..batch.len()).for_each(|i| batch.set_absent(i));
        Ok(())
    }

    fn put(&self, req: Request<Put>) -> Submit {
        req.set_all(Status::OK);
        req.finish(Status::OK)
    }

    fn get(&self, req: Request<Get>) -> Submit {
        (0..req.len()).for_each(|i| req.set_status(i, Status::NOT_FOUND));
        req.finish(Status::OK)
    }

    fn remove(&self, batch: &mut KeyBatch<'_>, _force: bool) -> Result<(), Error> {
        (0..batch.len()).for_each(|i| batch.set_status(i, Status::NOT_FOUND));
        Ok(())
    }
}

export_backend!(noop, Noop);

unsafe extern "C" {
    // Defined by `export_backend!` above under its C name.
    fn kvh_plugin_noop_v1(host: *const abi::kvh_host_api) -> *const abi::kvh_plugin_descriptor;
}

/// The entry point, for hosts that link this crate instead of loading the `.so`.
pub fn entry() -> unsafe extern "C" fn(*const abi::kvh_host_api) -> *const abi::kvh_plugin_descriptor
{
    kvh_plugin_noop_v1
}
