//! `m2mpki`: certificate authority and oneM2M PKI-based bootstrap toolkit.
//!
//! This crate is only argument parsing and output; the work happens in the libraries.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod args;
mod cmd;
mod output;
mod prompt;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = args::Cli::parse();
    let json = cli.json;
    match cmd::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            if output::is_broken_pipe(&err) {
                return ExitCode::SUCCESS;
            }
            let code = output::exit_code(&err);
            output::print_error(&err, code, json);
            ExitCode::from(code)
        }
    }
}
