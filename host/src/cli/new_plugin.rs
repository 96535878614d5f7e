//! `kvhost new-plugin`: write a buildable plugin skeleton (a bounded in-memory store with every
//! required entry) in C, C++ or Rust, with its build file and a README naming the conformance command.

use clap::ValueEnum;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// The skeleton's language.
#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum Lang {
    /// C11 on kvhost_plugin.h and kvhost_plugin_util.h, built by a Makefile with pkg-config.
    C,
    /// C++17 on kvhost_plugin.hpp, built by a Makefile with pkg-config.
    Cpp,
    /// Rust on the kvhost-plugin-sdk crate (by path), built by Cargo.
    Rust,
}

/// Where the Rust skeleton finds the SDK by default: this checkout's, when the binary was built from one.
fn default_sdk_path() -> Option<PathBuf> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../plugin-sdk");
    p.join("Cargo.toml")
        .is_file()
        .then(|| p.canonicalize().unwrap_or(p))
}

/// Whether `name` can be a class name (it becomes a C identifier and a file name).
fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_lowercase())
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && name.len() <= 64
}

fn fill(template: &str, vars: &[(&str, &str)]) -> String {
    vars.iter().fold(template.to_string(), |t, (k, v)| {
        t.replace(&format!("{{{{{k}}}}}"), v)
    })
}

/// The files of the skeleton, relative to its directory.
fn files(lang: Lang, name: &str, sdk: Option<&Path>) -> Result<Vec<(String, String)>, String> {
    let abi_minor = kvhost_plugin_sdk::abi::KVH_ABI_MINOR.to_string();
    let (lang_name, build, lib_path, mut out) = match lang {
        Lang::C => (
            "C11",
            "```sh\nkvhost sdk install --prefix ~/.local        # headers + kvhost-plugin.pc, once\nexport PKG_CONFIG_PATH=~/.local/lib/pkgconfig\nmake\n```".to_string(),
            format!("./lib{name}.so"),
            vec![
                (format!("{name}.c"), include_str!("../../templates/plugin/store.c")),
                ("Makefile".to_string(), include_str!("../../templates/plugin/Makefile.c")),
            ],
        ),
        Lang::Cpp => (
            "C++17",
            "```sh\nkvhost sdk install --prefix ~/.local        # headers + kvhost-plugin.pc, once\nexport PKG_CONFIG_PATH=~/.local/lib/pkgconfig\nmake\n```".to_string(),
            format!("./lib{name}.so"),
            vec![
                (format!("{name}.cpp"), include_str!("../../templates/plugin/store.cpp")),
                ("Makefile".to_string(), include_str!("../../templates/plugin/Makefile.cpp")),
            ],
        ),
        Lang::Rust => (
            "Rust",
            "```sh\ncargo build --release\n```\n\n`Cargo.toml` points at the kvhost plugin SDK by path (it is not on a registry); change the path if\nthe checkout moves.".to_string(),
            format!("./target/release/lib{name}.so"),
            vec![
                ("Cargo.toml".to_string(), include_str!("../../templates/plugin/Cargo.toml.rust")),
                ("src/lib.rs".to_string(), include_str!("../../templates/plugin/lib.rs")),
            ],
        ),
    };
    out.push((
        "README.md".to_string(),
        include_str!("../../templates/plugin/README.md.tmpl"),
    ));
    let sdk_path = match (lang, sdk) {
        (Lang::Rust, None) => {
            return Err("--sdk PATH is needed for a Rust plugin: the path of kvhost's plugin-sdk directory (this binary was not built from a checkout it can name)".to_string())
        }
        (_, s) => s.map(|p| p.display().to_string()).unwrap_or_default(),
    };
    let vars = [
        ("name", name),
        ("lang", lang_name),
        ("build", build.as_str()),
        ("lib_path", lib_path.as_str()),
        ("abi_minor", abi_minor.as_str()),
        ("sdk_path", sdk_path.as_str()),
    ];
    Ok(out
        .into_iter()
        .map(|(path, text)| (path, fill(text, &vars)))
        .collect())
}

/// Write the skeleton of class `name` in `lang` into `dir` (created; it must not hold any of the files).
pub fn run(
    lang: Lang,
    name: &str,
    dir: &Path,
    sdk: Option<PathBuf>,
) -> Result<ExitCode, Box<dyn std::error::Error>> {
    if !valid_name(name) {
        return Err(format!(
            "`{name}` is not a valid class name: a lowercase letter, then lowercase letters, digits or `_` (at most 64)"
        )
        .into());
    }
    let sdk = sdk.or_else(default_sdk_path);
    if let Some(s) = &sdk {
        if lang == Lang::Rust && !s.join("Cargo.toml").is_file() {
            return Err(format!("--sdk {}: no Cargo.toml there", s.display()).into());
        }
    }
    let files = files(lang, name, sdk.as_deref())?;
    for (rel, _) in &files {
        let path = dir.join(rel);
        if path.exists() {
            return Err(format!("{} already exists; nothing was written", path.display()).into());
        }
    }
    for (rel, text) in &files {
        let path = dir.join(rel);
        let write = || -> std::io::Result<()> {
            std::fs::create_dir_all(path.parent().expect("a file in the directory"))?;
            std::fs::write(&path, text)
        };
        write().map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        println!("wrote {}", path.display());
    }
    println!("next: see {}", dir.join("README.md").display());
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_must_be_identifiers() {
        for ok in ["acme", "acme_disk2", "a"] {
            assert!(valid_name(ok), "{ok}");
        }
        for bad in ["", "Acme", "2disk", "acme-disk", "a b", &"x".repeat(65)] {
            assert!(!valid_name(bad), "{bad}");
        }
    }

    #[test]
    fn every_placeholder_is_filled() {
        let sdk = Path::new("/sdk");
        for lang in [Lang::C, Lang::Cpp, Lang::Rust] {
            for (path, text) in files(lang, "acme", Some(sdk)).unwrap() {
                assert!(
                    !text.contains("{{"),
                    "{path} of {lang:?} keeps a placeholder"
                );
            }
        }
        assert!(files(Lang::Rust, "acme", None).is_err());
    }
}
