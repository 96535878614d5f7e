//! The `kvhost` command. Exit codes: 0 success, 1 the job failed (bad config, a plugin refused, a check
//! failed), 2 usage error.

use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
    let cli = kvhost::cli::Cli::parse();
    kvhost::cli::init_logging(&cli);
    match kvhost::cli::run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("kvhost: {e:#}");
            ExitCode::from(1)
        }
    }
}
