//! `jitr approve`: a held certificate made the device's identity, after the same checks as
//! any decision; the certificate(s) it replaces retired once it is active.

use activator::Outcome as DecisionOutcome;
use anyhow::{Context, Result};
use iot::{CertificateId, IotRegistry};

use super::{print_json, Outcome};
use crate::cli::ApproveArgs;

/// The longest one approval may take (a decision, then the retirements).
const APPROVE_TIME: std::time::Duration = std::time::Duration::from_secs(60);

pub(crate) fn approve(args: ApproveArgs) -> Result<Outcome> {
    if let Some(device) = &args.device {
        let lifted = lift(device, &args)?;
        if args.certificate_id.is_none() {
            return Ok(if lifted {
                Outcome::Success
            } else {
                Outcome::Failed
            });
        }
    }
    let Some(certificate_id) = &args.certificate_id else {
        return Err(crate::UsageError("give --certificate-id or --device".to_owned()).into());
    };
    let id = CertificateId::parse(certificate_id)
        .map_err(|reason| anyhow::anyhow!("--certificate-id {certificate_id:?}: {reason}"))?;
    // The Lambda's configuration, read the Lambda's way: the same checks, the same rules.
    let config = super::activator_config()?;
    if args.add_to_ledger && config.ledger.is_none() {
        return Err(crate::UsageError(
            "--add-to-ledger needs the ledger: set JITR_LEDGER_TABLE (and JITR_LEDGER) as the Lambda has them"
                .to_owned(),
        )
        .into());
    }
    let approval = crate::aws::runtime()?.block_on(async {
        let session = crate::aws::session(&args.aws).await?;
        let activator = activator::build_with_sdk(config, session.config())?;
        let deadline = args.aws.deadline(APPROVE_TIME);
        if let (true, Some(ledger)) = (args.add_to_ledger, activator.ledger()) {
            // Listed first: the decision then reads it like any certificate the factory issued.
            let cert = activator
                .registry()
                .describe_certificate(&id, iot::call_deadline(deadline))
                .await?;
            let entry = crate::ledger::entry_from_pem(
                &cert.pem,
                id.as_str(),
                time::OffsetDateTime::now_utc(),
            )?;
            ledger
                .add(&entry, iot::call_deadline(deadline))
                .await
                .context("cannot add the certificate to the ledger; nothing was activated")?;
            eprintln!("added {id} (device {}) to the ledger", entry.device_id);
        }
        anyhow::Ok(activator.approve(&id, args.retire, deadline).await?)
    })?;
    if activator::metrics::take().ledger_errors > 0 {
        eprintln!(
            "warning: the decision could not be marked in the ledger; the activator's sweep marks it"
        );
    }
    if args.output.json {
        print_json(&approval)?;
    } else {
        let d = &approval.decision;
        println!("{}  {}  {}", d.certificate_id, d.outcome.as_str(), d.reason);
        for old in &approval.retired {
            println!("retired {old} ({})", retire_word(args.retire));
        }
    }
    Ok(match approval.decision.outcome {
        DecisionOutcome::Activated | DecisionOutcome::AlreadyActive => Outcome::Success,
        _ => Outcome::Failed,
    })
}

/// Lifts the revocation mark from `device`'s Thing: whether there was one (said either way).
fn lift(device: &str, args: &ApproveArgs) -> Result<bool> {
    let device = factory_ca::DeviceId::parse(device, factory_ca::IdFormat::Any)?;
    let lifted = crate::aws::runtime()?.block_on(async {
        let registry = crate::aws::session(&args.aws).await?.registry();
        let deadline = args.aws.deadline(APPROVE_TIME);
        anyhow::Ok(operations::revoke::lift_mark(&registry, device.as_str(), deadline).await?)
    })?;
    if lifted {
        println!("lifted the revocation mark from {device}: its certificates are decided as anyone's again");
    } else {
        eprintln!("jitr: {device} carries no revocation mark: nothing to lift");
    }
    Ok(lifted)
}

fn retire_word(retire: activator::ownership::Retire) -> &'static str {
    match retire {
        activator::ownership::Retire::Revoke => "revoked and detached",
        activator::ownership::Retire::Deactivate => "deactivated and detached",
        activator::ownership::Retire::Keep => "kept",
    }
}
