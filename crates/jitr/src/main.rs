//! `jitr`: the operator's CLI over the factory CA and the activator.

mod aws;
mod cli;
mod commands;
mod mqtt;
mod passphrase;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    match commands::run(cli) {
        Ok(commands::Outcome::Success) => ExitCode::SUCCESS,
        Ok(commands::Outcome::Failed) => ExitCode::from(1),
        Err(err) => {
            // One line; a cause whose text the line already holds is not repeated.
            eprintln!("jitr: error: {}", activator::error_chain(err.as_ref()));
            ExitCode::from(1)
        }
    }
}
