//! `jitr`: the operator's CLI over the factory CA and the activator.

mod aws;
mod cli;
mod commands;
mod keys;
mod ledger;
mod mqtt;
mod passphrase;
mod presence;
mod progress;
mod regions;

use std::process::ExitCode;

use clap::Parser;

/// A mistake in how a command was called, found after parsing: exit 2, like clap's own.
#[derive(Debug)]
pub(crate) struct UsageError(pub(crate) String);

impl std::fmt::Display for UsageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UsageError {}

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    match commands::run(cli) {
        Ok(commands::Outcome::Success) => ExitCode::SUCCESS,
        Ok(commands::Outcome::Failed) => ExitCode::from(1),
        Err(err) => {
            // One line; a cause whose text the line already holds is not repeated.
            eprintln!("jitr: error: {}", iot::error_chain(err.as_ref()));
            let usage = err.chain().any(|cause| cause.is::<UsageError>());
            ExitCode::from(if usage { 2 } else { 1 })
        }
    }
}
