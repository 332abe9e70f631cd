//! One thin function per command; the logic lives in the libraries.

mod approve;
mod balena;
mod ca;
mod completions;
mod device;
mod endpoint;
mod fleet_provisioning;
mod inspect;
mod issue;
mod jitp;
mod ledger;
mod man;
mod reconcile;
mod register;
mod revoke;
mod rotate;
mod status;

use anyhow::Result;

use crate::cli::{
    BalenaCommand, CaCommand, Cli, Command, DeviceCommand, FleetProvisioningCommand, LedgerCommand,
};

/// The activator's configuration, read from the same variables as the Lambda: a missing or
/// bad variable is the operator's to fix (exit 2), every missing one named at once.
pub(crate) fn activator_config() -> Result<activator::Config> {
    activator::Config::from_env().map_err(config_error)
}

/// A configuration error as the command's: missing or invalid variables are a usage error
/// (exit 2).
pub(crate) fn config_error(e: activator::ConfigError) -> anyhow::Error {
    if e.is_usage() {
        crate::UsageError(format!("activator configuration: {e}")).into()
    } else {
        anyhow::Error::new(e).context("activator configuration")
    }
}

/// How a command ended when it did not hit an error.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// Everything succeeded: exit 0.
    Success,
    /// A check or part of the work failed and was reported: exit 1.
    Failed,
}

/// Runs the parsed command.
pub(crate) fn run(cli: Cli) -> Result<Outcome> {
    match cli.command {
        Command::Ca(CaCommand::Init(args)) => ca::init(args),
        Command::Ca(CaCommand::VerificationCert(args)) => ca::verification_cert(args),
        Command::Ca(CaCommand::Register(args)) => ca::register(args),
        Command::Issue(args) => issue::issue(args),
        Command::SignCsr(args) => issue::sign_csr(args),
        Command::Inspect(args) => inspect::inspect(args),
        Command::Endpoint(args) => endpoint::endpoint(args),
        Command::Reconcile(args) => reconcile::reconcile(args),
        Command::Revoke(args) => revoke::revoke(args),
        Command::Approve(args) => approve::approve(args),
        Command::Status(args) => status::status(args),
        Command::Rotate(args) => rotate::rotate(args),
        Command::Register(args) => register::register(args),
        Command::Device(DeviceCommand::Connect(args)) => device::connect(args),
        Command::Balena(BalenaCommand::FleetVars(args)) => balena::fleet_vars(args),
        Command::JitpTemplate(args) => jitp::template(args),
        Command::FleetProvisioning(FleetProvisioningCommand::Template(args)) => {
            fleet_provisioning::template(args)
        }
        Command::FleetProvisioning(FleetProvisioningCommand::Claim(args)) => {
            fleet_provisioning::claim(args)
        }
        Command::Ledger(LedgerCommand::Import(args)) => ledger::import(args),
        Command::Completions(args) => completions::completions(args),
        Command::Man(args) => man::man(args),
    }
}

/// Prints a value as one line of JSON on standard output.
pub(crate) fn print_json(value: &impl serde::Serialize) -> Result<()> {
    println!("{}", serde_json::to_string(value)?);
    Ok(())
}
