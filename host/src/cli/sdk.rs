//! `kvhost sdk install`: put the plugin headers, a pkg-config file and the LeakSanitizer
//! suppressions under a prefix, from copies compiled into this binary (so they always match the ABI
//! this host speaks).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// The files, relative to the prefix.
const FILES: &[(&str, &str)] = &[
    (
        "include/kvhost/kvhost_plugin.h",
        include_str!("../../../include/kvhost_plugin.h"),
    ),
    (
        "include/kvhost/kvhost_plugin.hpp",
        include_str!("../../../include/kvhost_plugin.hpp"),
    ),
    (
        "include/kvhost/kvhost_plugin_util.h",
        include_str!("../../../include/kvhost_plugin_util.h"),
    ),
    (
        "share/kvhost/lsan.supp",
        include_str!("../../../plugin-sdk/lsan.supp"),
    ),
];

/// The pkg-config file for `prefix` (header-only: Cflags, no Libs).
fn pkg_config(prefix: &Path) -> String {
    let abi = kvhost_plugin_sdk::abi::KVH_ABI_MINOR;
    format!(
        "prefix={}\nincludedir=${{prefix}}/include\n\nName: kvhost-plugin\n\
         Description: Headers for writing kvhost storage plugins (C ABI 1.{abi}; C11 and C++17)\n\
         Version: {}\nCflags: -I${{includedir}}/kvhost\n",
        prefix.display(),
        env!("CARGO_PKG_VERSION"),
    )
}

/// Write every file under `prefix` (created if missing; existing files are replaced).
pub fn install(prefix: &Path) -> Result<ExitCode, Box<dyn std::error::Error>> {
    let prefix: PathBuf = if prefix.is_absolute() {
        prefix.to_path_buf()
    } else {
        std::env::current_dir()?.join(prefix)
    };
    let mut written = Vec::new();
    let pc = pkg_config(&prefix);
    let files = FILES.iter().map(|(p, t)| (*p, *t)).chain(std::iter::once((
        "lib/pkgconfig/kvhost-plugin.pc",
        pc.as_str(),
    )));
    for (rel, text) in files {
        let path = prefix.join(rel);
        let write = || -> std::io::Result<()> {
            std::fs::create_dir_all(path.parent().expect("a file under the prefix"))?;
            std::fs::write(&path, text)
        };
        write().map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        written.push(path);
    }
    for p in &written {
        println!("installed {}", p.display());
    }
    println!(
        "build with: PKG_CONFIG_PATH={}/lib/pkgconfig cc $(pkg-config --cflags kvhost-plugin) -shared -fPIC ...",
        prefix.display()
    );
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pc_file_points_at_the_prefix() {
        let pc = pkg_config(Path::new("/opt/kvh"));
        assert!(pc.starts_with("prefix=/opt/kvh\n"), "{pc}");
        assert!(pc.contains("Cflags: -I${includedir}/kvhost\n"), "{pc}");
    }
}
