//! `kvhost bench`: benchmarks that print ratios measured side by side in one run.

use crate::bench::micro::{self, MicroOptions};
use std::path::Path;
use std::process::ExitCode;

pub fn run_micro(json: Option<&Path>, quick: bool) -> Result<ExitCode, Box<dyn std::error::Error>> {
    let opts = if quick {
        MicroOptions::quick()
    } else {
        MicroOptions::full()
    };
    let bar = indicatif::ProgressBar::new_spinner();
    bar.enable_steady_tick(std::time::Duration::from_millis(120));
    let rows = micro::run(opts, |step| {
        bar.set_message(format!("micro benchmark: {step}"))
    });
    bar.finish_and_clear();
    print!("{}", micro::table(&rows));
    let met = rows.iter().filter(|r| r.met == Some(true)).count();
    let judged = rows.iter().filter(|r| r.met.is_some()).count();
    println!(
        "targets met: {met} of {judged}{}",
        if quick {
            " (quick run: sizes too small to judge)"
        } else {
            ""
        }
    );
    if let Some(path) = json {
        std::fs::write(path, serde_json::to_string_pretty(&rows)?)?;
        println!("wrote {}", path.display());
    }
    Ok(ExitCode::SUCCESS)
}
