//! `jitr reconcile`: the Lambda's sweep, run from an operator's shell with the Lambda's
//! configuration, every CA on its own, bounded by `--timeout` (10 minutes), with progress on
//! standard error and a summary per CA.

use std::time::Duration;

use activator::{SweepEvent, SweepOptions, SweepReport};
use anyhow::Result;
use iot::CertificateId;

use super::{print_json, Outcome};
use crate::cli::ReconcileArgs;
use crate::UsageError;

/// How long a reconcile may take unless `--timeout` says otherwise.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(600);

pub(crate) fn reconcile(args: ReconcileArgs) -> Result<Outcome> {
    // The Lambda's configuration, read the Lambda's way: the same decision, the same rules.
    let config = super::activator_config()?;
    let ca_ids = chosen_cas(&args.ca_id, &config.policy.trusted_ca_ids)?;
    let opts = SweepOptions {
        min_age: args.older_than,
        window: (!args.all).then_some(config.sweep_window),
        now: time::OffsetDateTime::now_utc().unix_timestamp(),
        dry_run: args.dry_run,
        concurrency: args.concurrency,
    };
    let deadline = args.aws.deadline(DEFAULT_TIMEOUT);
    let reports = crate::aws::runtime()?.block_on(async {
        let session = crate::aws::session(&args.aws).await?;
        let activator = activator::build_with_sdk(config, session.config())?;
        anyhow::Ok(
            activator
                .sweep_all(&ca_ids, &opts, deadline, &show_progress)
                .await,
        )
    })?;
    // The activator logs a failed ledger write and goes on; here nobody reads its log.
    let ledger_errors = activator::metrics::take().ledger_errors;
    if ledger_errors > 0 {
        eprintln!(
            "reconcile: warning: {ledger_errors} ledger write(s) failed (the decisions stand; the next sweep marks the activations)"
        );
    }
    if !args.dry_run {
        let marked: usize = reports.iter().map(|r| r.ledger_marked).sum();
        if marked > 0 {
            eprintln!("reconcile: marked {marked} ACTIVE certificate(s) activated in the ledger");
        }
    }

    if args.output.json {
        let list: Vec<_> = reports
            .iter()
            .map(|r| serde_json::json!({"ca_certificate_id": r.ca_certificate_id, "report": r}))
            .collect();
        print_json(&list)?;
    } else {
        for report in &reports {
            print_report(report, args.dry_run);
        }
    }
    Ok(if reports.iter().all(SweepReport::is_complete) {
        Outcome::Success
    } else {
        Outcome::Failed
    })
}

/// The CAs to sweep: `--ca-id` values, each one trusted by the configuration (a CA that is
/// not is "not ours to touch": sweeping it would revoke its certificates), else every trusted
/// one.
pub(crate) fn chosen_cas(
    given: &[String],
    trusted: &[CertificateId],
) -> Result<Vec<CertificateId>> {
    if given.is_empty() {
        return Ok(trusted.to_vec());
    }
    given
        .iter()
        .map(|id| {
            let id = CertificateId::parse(id)
                .map_err(|reason| UsageError(format!("--ca-id {id:?}: {reason}")))?;
            if !trusted.contains(&id) {
                return Err(UsageError(format!(
                    "--ca-id {id} is not in JITR_TRUSTED_CA_IDS: its certificates are not ours to decide"
                ))
                .into());
            }
            Ok(id)
        })
        .collect()
}

/// Progress on standard error: pages as they are read, failures as they happen.
fn show_progress(event: SweepEvent<'_>) {
    match event {
        SweepEvent::Page {
            ca,
            pages,
            listed,
            pending,
        } => eprintln!(
            "reconcile: CA {}…: page {pages}, {listed} listed, {pending} pending",
            &ca.as_str()[..12]
        ),
        SweepEvent::Decided(_) => {}
        SweepEvent::Failed { id, reason } => {
            eprintln!("reconcile: {id}: still failing: {reason}");
        }
    }
}

fn print_report(r: &SweepReport, dry_run: bool) {
    let ca = &r.ca_certificate_id;
    if dry_run {
        println!("CA {ca}: {} certificate(s) pending", r.pending);
        for id in &r.pending_ids {
            println!("  would decide {id}");
        }
    } else {
        for d in &r.decisions {
            println!(
                "  {}  {:<14} {}",
                d.certificate_id,
                d.outcome.as_str(),
                d.reason
            );
        }
        for (id, error) in &r.failing {
            println!("  {id}  {:<14} {error}", "still-failing");
        }
        println!(
            "CA {ca}: {} pending, {} activated, {} rejected, {} held, {} skipped, {} still failing",
            r.pending,
            r.activated,
            r.rejected,
            r.held,
            r.skipped,
            r.failing.len()
        );
        if r.held > 0 {
            println!("held certificates wait for an operator: jitr approve --certificate-id ID");
        }
    }
    if let Some(why) = &r.incomplete {
        println!("CA {ca}: incomplete after {} page(s): {why}", r.pages);
    }
}
