//! The `locus` binary: parses the command line and calls into the library.

use std::process::ExitCode;

use clap::Parser;
use locus::{
    cli::{self, Cli, Exit},
    config::LogFormat,
};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let log_format = cli.log_format;
    cli::init_logging(log_format);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(cli::run(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if let Some(Exit(code)) = e.downcast_ref::<Exit>() {
                return ExitCode::from(*code);
            }
            let report = cli::report(&e);
            // Said once: as a log event where logs are JSON for a collector,
            // as a plain line for a person otherwise.
            match log_format {
                LogFormat::Json => tracing::error!("{report}"),
                LogFormat::Text => eprintln!("error: {report}"),
            }
            ExitCode::FAILURE
        }
    }
}
