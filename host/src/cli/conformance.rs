//! `kvhost conformance`: run the conformance suite against one plugin class.

use crate::config::{Config, PluginSpec};
use crate::{conformance, loader};
use std::process::ExitCode;

pub fn run(
    plugin: &str,
    class: &str,
    options: Vec<(String, String)>,
) -> Result<ExitCode, Box<dyn std::error::Error>> {
    let mut config = Config::from_yaml("chunk_size: 256\n", None)?;
    config.source = Some(std::env::current_dir()?.join("conformance.yaml"));
    let spec = PluginSpec {
        name: class.to_string(),
        module_path: plugin.to_string(),
        class_name: class.to_string(),
        priority: None,
        position: 0,
        options,
    };
    let factory = || loader::load(&spec, &config);
    // Fail early with the loader's message rather than a FAIL line.
    drop(factory()?);
    println!("conformance: plugin {plugin}, class {class}");
    let report = conformance::run(&factory);
    println!("{report}");
    Ok(if report.passed() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
