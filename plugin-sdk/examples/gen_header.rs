//! Writes `include/kvhost_plugin.h` from `src/abi.rs`; with `--check`, fails if the committed header
//! differs from what would be generated.

use std::path::Path;
use std::process::ExitCode;

fn main() -> ExitCode {
    let crate_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let header = crate_dir.join("../include/kvhost_plugin.h");
    let config = match cbindgen::Config::from_file(crate_dir.join("cbindgen.toml")) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("gen_header: cbindgen.toml: {e}");
            return ExitCode::from(2);
        }
    };
    let bindings = match cbindgen::Builder::new()
        .with_config(config)
        .with_src(crate_dir.join("src/abi.rs"))
        .generate()
    {
        Ok(b) => b,
        Err(e) => {
            eprintln!("gen_header: cbindgen failed: {e}");
            return ExitCode::from(2);
        }
    };
    let mut raw = Vec::new();
    bindings.write(&mut raw);
    let abi_source = match std::fs::read_to_string(crate_dir.join("src/abi.rs")) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("gen_header: reading src/abi.rs: {e}");
            return ExitCode::from(2);
        }
    };
    let generated = with_status_names(
        &parenthesize_negative_defines(&String::from_utf8_lossy(&raw)),
        &abi_source,
    )
    .into_bytes();
    if std::env::args().any(|a| a == "--check") {
        let committed = std::fs::read(&header).unwrap_or_default();
        if committed != generated {
            eprintln!(
                "gen_header: {} is out of date with plugin-sdk/src/abi.rs.\n\
                 Run `cargo run -p kvhost-plugin-sdk --example gen_header` and commit the result.",
                header.display()
            );
            return ExitCode::FAILURE;
        }
        println!("gen_header: {} is up to date", header.display());
    } else {
        if let Err(e) = std::fs::write(&header, &generated) {
            eprintln!("gen_header: writing {}: {e}", header.display());
            return ExitCode::from(2);
        }
        println!("gen_header: wrote {}", header.display());
    }
    ExitCode::SUCCESS
}

/// The status constants of `abi.rs` (`pub const KVH_...: kvh_status`), in declaration order.
fn status_constants(abi_source: &str) -> Vec<&str> {
    abi_source
        .lines()
        .filter_map(|l| l.strip_prefix("pub const "))
        .filter_map(|l| l.split_once(": kvh_status ="))
        .map(|(name, _)| name.trim())
        .collect()
}

/// Adds `kvh_status_name`, generated from the status constants, inside the include guard: the one
/// table of status names that the C util header, the C++ wrapper and the SDK (by a test) share.
fn with_status_names(header: &str, abi_source: &str) -> String {
    let mut f = String::from(
        "/**\n * The name of a status code (\"OK\", \"NOT_FOUND\", ...), or \"UNKNOWN\" for a code this header\n \
         * does not define. Generated from the status constants of plugin-sdk/src/abi.rs. Static string;\n \
         * any thread.\n */\nstatic inline const char *kvh_status_name(kvh_status status) {\n    switch (status) {\n",
    );
    for name in status_constants(abi_source) {
        let short = name
            .strip_prefix("KVH_ERR_")
            .or_else(|| name.strip_prefix("KVH_"))
            .unwrap_or(name);
        f.push_str(&format!("    case {name}: return \"{short}\";\n"));
    }
    f.push_str("    default: return \"UNKNOWN\";\n    }\n}\n\n");
    let guard_end = "#endif  /* KVHOST_PLUGIN_H */";
    match header.find(guard_end) {
        Some(at) => format!("{}{f}{}", &header[..at], &header[at..]),
        None => format!("{header}\n{f}"),
    }
}

/// `#define X -1` becomes `#define X (-1)`, so `a-X` cannot turn into `a--1`.
fn parenthesize_negative_defines(header: &str) -> String {
    let mut out = String::with_capacity(header.len() + 256);
    for line in header.lines() {
        let mut parts = line.splitn(3, ' ');
        match (parts.next(), parts.next(), parts.next()) {
            (Some("#define"), Some(name), Some(value)) if value.starts_with('-') => {
                out.push_str(&format!("#define {name} ({value})"));
            }
            _ => out.push_str(line),
        }
        out.push('\n');
    }
    out
}
