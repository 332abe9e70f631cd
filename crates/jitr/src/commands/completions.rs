//! `jitr completions SHELL`: the completion script, generated from the clap definitions.

use std::io::Write;

use anyhow::Result;
use clap::CommandFactory;

use super::Outcome;
use crate::cli::{Cli, CompletionsArgs};

pub(crate) fn completions(args: CompletionsArgs) -> Result<Outcome> {
    // Rendered whole first: the generator panics on a closed pipe, write_all reports it.
    let mut script = Vec::new();
    clap_complete::generate(args.shell, &mut Cli::command(), "jitr", &mut script);
    std::io::stdout().lock().write_all(&script)?;
    Ok(Outcome::Success)
}
