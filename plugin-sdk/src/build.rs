//! Build-script helper: compile a C or C++ plugin into a shared library the way an outside author
//! would (`cc -shared -fPIC -I include …`), as part of the Cargo workspace build.
//!
//! Libraries land in `<target>/<profile>/plugins/` (or another folder under the profile directory),
//! which is where the host looks by default (`<exe dir>/plugins`).

use std::path::{Path, PathBuf};
use std::process::Command;

/// Whether a C program that includes `header` and calls `symbol` compiles and links with `-l<lib>`, using
/// the C compiler [`SharedLib`] uses. `Ok(())`, or `Err` with the compiler's output.
///
/// A plugin that needs a system library calls this from its build script and, on `Err`, skips itself
/// with a `cargo:warning` naming the package to install, so that building the whole workspace still
/// works on a machine without that library's development files.
pub fn c_library_available(header: &str, symbol: &str, lib: &str) -> Result<(), String> {
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR is set by cargo"));
    let stem: String = lib
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    let source = out_dir.join(format!("probe_{stem}.c"));
    let program = out_dir.join(format!("probe_{stem}"));
    std::fs::write(
        &source,
        format!(
            "#include <{header}>\nint main(void) {{ void *volatile p = (void *)&{symbol}; return p == 0; }}\n"
        ),
    )
    .map_err(|e| format!("writing {}: {e}", source.display()))?;
    let compiler = cc::Build::new().cargo_metadata(false).get_compiler();
    let output = Command::new(compiler.path())
        .arg(&source)
        .arg("-o")
        .arg(&program)
        .arg(format!("-l{lib}"))
        .output()
        .map_err(|e| format!("running {:?}: {e}", compiler.path()))?;
    let _ = std::fs::remove_file(&program);
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ))
    }
}

/// Source language of a plugin.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lang {
    /// C11.
    C,
    /// C++17.
    Cpp,
}

/// One shared library to build.
#[derive(Debug)]
pub struct SharedLib {
    name: String,
    lang: Lang,
    sources: Vec<PathBuf>,
    includes: Vec<PathBuf>,
    libs: Vec<String>,
    flags: Vec<String>,
    subdir: String,
}

impl SharedLib {
    /// A library `lib<name>.so` built from `sources` in `lang`.
    pub fn new(name: &str, lang: Lang) -> Self {
        SharedLib {
            name: name.to_string(),
            lang,
            sources: Vec::new(),
            includes: vec![Path::new(env!("CARGO_MANIFEST_DIR")).join("../include")],
            libs: Vec::new(),
            flags: Vec::new(),
            subdir: "plugins".to_string(),
        }
    }
    /// Add a source file.
    pub fn source(mut self, path: impl Into<PathBuf>) -> Self {
        self.sources.push(path.into());
        self
    }
    /// Add an include directory.
    pub fn include(mut self, path: impl Into<PathBuf>) -> Self {
        self.includes.push(path.into());
        self
    }
    /// Link with `-l<lib>`.
    pub fn lib(mut self, lib: &str) -> Self {
        self.libs.push(lib.to_string());
        self
    }
    /// Add a compiler flag.
    pub fn flag(mut self, flag: &str) -> Self {
        self.flags.push(flag.to_string());
        self
    }
    /// Put the library in `<profile>/<subdir>/` instead of `<profile>/plugins/`.
    pub fn subdir(mut self, subdir: &str) -> Self {
        self.subdir = subdir.to_string();
        self
    }

    /// Compile and link; panics (failing the build script) with the compiler's output on error.
    /// Returns the path of the library.
    pub fn build(self) -> PathBuf {
        let out_dir = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR is set by cargo"));
        // OUT_DIR is <target>/<profile>/build/<pkg>-<hash>/out.
        let profile_dir = out_dir
            .ancestors()
            .nth(3)
            .expect("OUT_DIR has a profile directory")
            .to_path_buf();
        let dest_dir = profile_dir.join(&self.subdir);
        std::fs::create_dir_all(&dest_dir).expect("create plugin output directory");
        let dest = dest_dir.join(format!("lib{}.so", self.name));

        let compiler = cc::Build::new()
            .cpp(self.lang == Lang::Cpp)
            .cargo_metadata(false)
            .get_compiler();
        let mut cmd = Command::new(compiler.path());
        let std = if self.lang == Lang::Cpp {
            "-std=c++17"
        } else {
            "-std=c11"
        };
        cmd.args([
            std,
            "-shared",
            "-fPIC",
            "-O2",
            "-g",
            "-pthread",
            "-fvisibility=hidden",
        ]);
        cmd.args(["-Wall", "-Wextra", "-Werror", "-pedantic"]);
        cmd.args(&self.flags);
        for inc in &self.includes {
            cmd.arg("-I").arg(inc);
        }
        // Export only the entry points: C++ runtimes otherwise leak weak template symbols into the
        // dynamic table, and nothing else of a plugin is anyone's business.
        let script = out_dir.join(format!("{}.exports", self.name));
        std::fs::write(&script, "{ global: kvh_plugin_*; local: *; };\n")
            .expect("write the version script");
        cmd.arg(format!("-Wl,--version-script={}", script.display()));
        cmd.args(&self.sources).arg("-o").arg(&dest);
        for lib in &self.libs {
            cmd.arg(format!("-l{lib}"));
        }
        let output = cmd
            .output()
            .unwrap_or_else(|e| panic!("running {:?}: {e}", compiler.path()));
        if !output.status.success() {
            panic!(
                "building {} failed:\n{:?}\n{}{}",
                dest.display(),
                cmd,
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
        }
        for src in &self.sources {
            println!("cargo:rerun-if-changed={}", src.display());
        }
        for inc in &self.includes {
            println!("cargo:rerun-if-changed={}", inc.display());
        }
        dest
    }
}
