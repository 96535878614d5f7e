//! `kvhost conformance`: run the conformance suite against one plugin class.

use crate::config::{Config, PluginSpec};
use crate::{conformance, loader};
use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

/// `kvhost conformance` options.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Path to the .so, or a name searched in the plugin directories (lib<name>.so).
    #[arg(long, required_unless_present = "list")]
    pub plugin: Option<String>,
    /// Backend class (the entry point is kvh_plugin_<class>_v1).
    #[arg(long, required_unless_present = "list")]
    pub class: Option<String>,
    /// Plugin option, repeatable. `{instance}` in a value becomes a fresh number per instance.
    #[arg(long = "option", short = 'o', value_name = "KEY=VALUE", value_parser = super::parse_kv)]
    pub options: Vec<(String, String)>,
    /// Seconds to wait for any one completion before the check fails as a hang.
    #[arg(long, value_name = "SECS", default_value_t = 20.0, value_parser = parse_timeout)]
    pub timeout: f64,
    /// Run only this check (repeatable; `create` always runs). See `--list`.
    #[arg(long = "check", value_name = "NAME")]
    pub checks: Vec<String>,
    /// Print every check with what it proves, and exit.
    #[arg(long)]
    pub list: bool,
    /// Print the report as one JSON object on stdout instead of text.
    #[arg(long)]
    pub json: bool,
}

fn parse_timeout(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(t) if t.is_finite() && t > 0.0 && t <= 86_400.0 => Ok(t),
        _ => Err(format!("`{s}` is not a number of seconds in (0, 86400]")),
    }
}

/// Replace every `{instance}` in the option values with `n`.
fn with_instance(options: &[(String, String)], n: usize) -> Vec<(String, String)> {
    options
        .iter()
        .map(|(k, v)| (k.clone(), v.replace("{instance}", &n.to_string())))
        .collect()
}

pub fn run(args: Args) -> Result<ExitCode, Box<dyn std::error::Error>> {
    if args.list {
        for c in conformance::list() {
            let needs = c
                .needs
                .map(|bit| {
                    format!(
                        " [needs {}]",
                        crate::plugin::capability_names(bit).join(",")
                    )
                })
                .unwrap_or_default();
            println!("{:<22} {}{needs}", c.name, c.proves);
        }
        return Ok(ExitCode::SUCCESS);
    }
    let unknown = conformance::unknown_checks(&args.checks);
    if !unknown.is_empty() {
        eprintln!(
            "kvhost: no such check: {} (`kvhost conformance --list` shows them)",
            unknown.join(", ")
        );
        return Ok(ExitCode::from(2));
    }
    let (Some(plugin), Some(class)) = (args.plugin, args.class) else {
        return Err("--plugin and --class are required".into());
    };
    let mut config = Config::from_yaml("chunk_size: 256\n", None)?;
    config.source = Some(std::env::current_dir()?.join("conformance.yaml"));
    let instances = AtomicUsize::new(0);
    let factory = || {
        let n = instances.fetch_add(1, Ordering::Relaxed) + 1;
        let spec = PluginSpec {
            name: class.clone(),
            module_path: plugin.clone(),
            class_name: class.clone(),
            priority: None,
            position: 0,
            options: with_instance(&args.options, n),
        };
        loader::load(&spec, &config)
    };
    let options = conformance::Options {
        timeout: Duration::from_secs_f64(args.timeout),
        only: args.checks,
    };
    if !args.json {
        println!("conformance: plugin {plugin}, class {class}");
    }
    let report = conformance::run_with(&factory, &options);
    if args.json {
        let (passed, failed, skipped) = report.counts();
        let out = serde_json::json!({
            "plugin": plugin,
            "class": class,
            "passed": report.passed(),
            "counts": { "pass": passed, "fail": failed, "skip": skipped },
            "checks": report.checks,
        });
        print_out(&out.to_string());
    } else {
        print_out(&report.to_string());
    }
    Ok(if report.passed() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// Print a line on stdout; a closed pipe (`| head`) is not an error worth a panic.
fn print_out(text: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stdout().lock(), "{text}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instance_numbers_replace_every_placeholder() {
        let o = vec![
            (
                "path".to_string(),
                "/tmp/a-{instance}/b{instance}".to_string(),
            ),
            ("x".to_string(), "plain".to_string()),
        ];
        assert_eq!(
            with_instance(&o, 7),
            vec![
                ("path".to_string(), "/tmp/a-7/b7".to_string()),
                ("x".to_string(), "plain".to_string())
            ]
        );
    }

    #[test]
    fn timeouts_must_be_positive_and_finite() {
        assert!(parse_timeout("0.5").is_ok());
        for bad in ["0", "-1", "nan", "inf", "x", "1e9"] {
            assert!(parse_timeout(bad).is_err(), "{bad}");
        }
    }
}
