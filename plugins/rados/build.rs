use kvhost_plugin_sdk::build::{c_library_available, Lang, SharedLib};

/// Where librados' header usually is; watched so that installing librados-dev later rebuilds the plugin.
const HEADER: &str = "/usr/include/rados/librados.h";

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    match c_library_available("rados/librados.h", "rados_create2", "rados") {
        Ok(()) => {
            SharedLib::new("kvhost_rados", Lang::C)
                .source("rados.c")
                .lib("rados")
                .build();
        }
        Err(why) => {
            // The rest of the workspace builds without it: say so loudly, do not fail.
            println!(
                "cargo:warning=kvhost-plugin-rados: NOT BUILT: librados development files not found \
                 (install librados-dev, e.g. `apt-get install librados-dev`); the `rados` storage plugin \
                 (libkvhost_rados.so) is skipped"
            );
            if let Some(line) = why.lines().find(|l| !l.trim().is_empty()) {
                println!("cargo:warning=kvhost-plugin-rados: the compiler said: {line}");
            }
            println!("cargo:rerun-if-changed={HEADER}");
        }
    }
}
