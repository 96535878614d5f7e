//! `kvhost plugins`: what backend classes are available, and which files are not plugins.

use crate::config::Config;
use crate::loader;
use crate::plugin::capability_names;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

fn libraries(paths: &[PathBuf]) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for p in paths {
        if p.is_file() {
            out.push(p.clone());
        } else if let Ok(entries) = std::fs::read_dir(p) {
            let mut files: Vec<PathBuf> = entries
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|f| {
                    f.is_file()
                        && f.file_name()
                            .is_some_and(|n| n.to_string_lossy().contains(".so"))
                })
                .collect();
            files.sort();
            out.extend(files);
        }
    }
    out
}

pub fn run(paths: &[PathBuf]) -> Result<ExitCode, Box<dyn std::error::Error>> {
    let dirs = if paths.is_empty() {
        let config = Config::from_yaml("", None)?;
        loader::plugin_dirs(&config)
    } else {
        paths.to_vec()
    };
    let libs = libraries(&dirs);
    if libs.is_empty() {
        println!(
            "no .so files in: {}",
            dirs.iter()
                .map(|d| d.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
        return Ok(ExitCode::SUCCESS);
    }
    let (mut classes, mut refused) = (0, 0);
    for lib in &libs {
        let (ok, bad) = describe(lib);
        classes += ok;
        refused += bad;
    }
    println!(
        "{} librar{} scanned, {classes} backend class(es), {refused} refused",
        libs.len(),
        if libs.len() == 1 { "y" } else { "ies" }
    );
    // A refused class is a plugin the host would not load: a failure, not a listing detail.
    Ok(if refused == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// Print what `lib` offers; returns (classes loaded, classes refused).
fn describe(lib: &Path) -> (usize, usize) {
    let symbols = loader::exported_entry_points(lib);
    let ours: Vec<&(String, u32)> = symbols
        .iter()
        .filter(|(_, major)| *major == u32::from(kvhost_plugin_sdk::abi::KVH_ABI_MAJOR))
        .collect();
    if ours.is_empty() {
        let why = if symbols.is_empty() {
            "not a kvhost plugin: it exports no kvh_plugin_<class>_v<N> entry point".to_string()
        } else {
            let found: Vec<String> = symbols
                .iter()
                .map(|(c, m)| format!("{c} (ABI {m})"))
                .collect();
            format!(
                "built for another ABI major: {}; this host speaks ABI {}",
                found.join(", "),
                kvhost_plugin_sdk::abi::KVH_ABI_MAJOR
            )
        };
        println!("{}\n  {why}\n", lib.display());
        // A library that is no plugin at all is only named; classes of another major are refused.
        return (0, symbols.len());
    }
    println!("{}", lib.display());
    let (mut ok, mut refused) = (0, 0);
    for (class, _) in ours {
        match loader::describe(lib, class) {
            Ok(info) => {
                ok += 1;
                println!(
                    "  class {} v{} (ABI {}.{})",
                    info.class_name, info.version, info.abi.0, info.abi.1
                );
                if !info.description.is_empty() {
                    println!("    {}", info.description);
                }
                let caps = capability_names(info.capabilities);
                println!(
                    "    capabilities: {}",
                    if caps.is_empty() {
                        "none".to_string()
                    } else {
                        caps.join(", ")
                    }
                );
                if info.schema.is_empty() {
                    println!("    options: none");
                }
                for o in &info.schema {
                    let default = match (&o.default, o.required) {
                        (_, true) => "required".to_string(),
                        (Some(d), _) => format!("default `{d}`"),
                        (None, _) => "optional".to_string(),
                    };
                    println!("    option {:<16} {:<22} {}", o.key, default, o.doc);
                }
            }
            Err(e) => {
                refused += 1;
                println!("  class {class}: refused: {e}");
            }
        }
    }
    println!();
    (ok, refused)
}
