//! Build script of the integration tests: compiles the deliberately broken fixture plugins in
//! `fixtures/c` and `fixtures/cpp` into `<target>/<profile>/test-plugins/libfx_<name>.so`, one library
//! per source file, the way an outside plugin author would (see `kvhost_plugin_sdk::build`).
//!
//! The tests find that folder through `env!("KVHOST_TEST_PLUGINS_DIR")`.

use kvhost_plugin_sdk::build::{Lang, SharedLib};
use std::path::{Path, PathBuf};

/// C fixtures: `fixtures/c/<name>.c` becomes `lib<name>.so`.
const C_FIXTURES: &[&str] = &[
    "fx_abi_v2",
    "fx_bad_major",
    "fx_short_size",
    "fx_short_vtable",
    "fx_null_fn",
    "fx_cap_no_fn",
    "fx_cap_past_vtable",
    "fx_create_fails",
    "fx_null_desc",
    "fx_wrong_class",
    "fx_multi",
    "fx_liar",
    "fx_hang",
    "fx_abi_1_0",
    "fx_not_a_plugin",
    "fx_bad_stats",
];

/// C++ fixtures: `fixtures/cpp/<name>.cpp` becomes `lib<name>.so`.
const CPP_FIXTURES: &[&str] = &["fx_throws"];

const SUBDIR: &str = "test-plugins";

fn main() {
    let manifest_dir = PathBuf::from(
        std::env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR is set by cargo"),
    );
    let fixtures = manifest_dir.join("fixtures");
    let c_dir = fixtures.join("c");
    let cpp_dir = fixtures.join("cpp");

    println!("cargo:rerun-if-changed=build.rs");
    // Included by every C fixture; SharedLib only tracks the sources and include directories it is given.
    println!(
        "cargo:rerun-if-changed={}",
        c_dir.join("fx_common.h").display()
    );

    let mut out_dir: Option<PathBuf> = None;
    let fixtures = C_FIXTURES
        .iter()
        .map(|name| (*name, Lang::C, c_dir.join(format!("{name}.c"))))
        .chain(
            CPP_FIXTURES
                .iter()
                .map(|name| (*name, Lang::Cpp, cpp_dir.join(format!("{name}.cpp")))),
        );
    for (name, lang, source) in fixtures {
        let lib = SharedLib::new(name, lang)
            .source(source)
            .subdir(SUBDIR)
            .build();
        out_dir.get_or_insert_with(|| {
            lib.parent()
                .map(Path::to_path_buf)
                .expect("library has a parent folder")
        });
    }

    let out_dir = out_dir.expect("at least one fixture");
    println!(
        "cargo:rustc-env=KVHOST_TEST_PLUGINS_DIR={}",
        out_dir.display()
    );
}
