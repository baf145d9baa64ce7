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
    m2mpki_ca::quiet_guarded_panics();
    let cli = args::Cli::parse();
    let json = cli.json;
    // A panic is a bug or a damaged store file (redb panics on some): exit 3 with what and
    // where, never 101. The message was printed by the panic hook already.
    let store = match (&cli.store, &cli.home) {
        (Some(s), _) => s.clone(),
        (None, Some(h)) => h.join("store.redb").display().to_string(),
        (None, None) => "the home's store.redb".into(),
    };
    let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| cmd::run(cli)));
    let Ok(ran) = ran else {
        let err = anyhow::anyhow!(
            "internal error: the command panicked (above); if the panic is in redb, the store file is damaged ({store}): restore it from a backup"
        );
        output::print_error(&err, 3, json);
        return ExitCode::from(3);
    };
    match ran {
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
