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
            eprintln!("jitr: error: {err:#}");
            ExitCode::from(1)
        }
    }
}
