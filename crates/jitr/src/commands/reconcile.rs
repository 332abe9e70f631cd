//! `jitr reconcile`: the Lambda's sweep, run from an operator's shell with the Lambda's
//! configuration.

use activator::{CertificateId, Config, SweepReport};
use anyhow::{bail, Context, Result};

use super::{print_json, Outcome};
use crate::cli::ReconcileArgs;

/// Far enough ahead to never matter for one run of the command.
const NO_DEADLINE: std::time::Duration = std::time::Duration::from_secs(30 * 24 * 3600);

pub(crate) fn reconcile(args: ReconcileArgs) -> Result<Outcome> {
    // The Lambda's configuration, read the Lambda's way: the same decision, the same rules.
    let config = Config::from_env().context("activator configuration")?;
    let ca_ids = if args.ca_id.is_empty() {
        config.policy.trusted_ca_ids.clone()
    } else {
        let mut ids = Vec::new();
        for id in &args.ca_id {
            match CertificateId::parse(id) {
                Ok(id) => ids.push(id),
                Err(reason) => bail!("--ca-id {id:?}: {reason}"),
            }
        }
        ids
    };
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let reports = crate::aws::runtime()?.block_on(async {
        let session = crate::aws::session(&args.aws).await?;
        let activator = activator::build_with_sdk(config, session.config())?;
        let mut reports = Vec::new();
        for ca in &ca_ids {
            let report = activator
                // No invocation deadline here: each decision gets its own time and the
                // sweep runs to the end.
                .sweep(
                    ca,
                    args.older_than,
                    now,
                    args.dry_run,
                    args.concurrency,
                    tokio::time::Instant::now() + NO_DEADLINE,
                )
                .await
                .with_context(|| format!("sweeping CA {ca}"))?;
            reports.push((ca.to_string(), report));
        }
        anyhow::Ok(reports)
    })?;

    let failing: usize = reports.iter().map(|(_, r)| r.failing.len()).sum();
    if args.output.json {
        let list: Vec<_> = reports
            .iter()
            .map(|(ca, r)| serde_json::json!({"ca_certificate_id": ca, "report": r}))
            .collect();
        print_json(&list)?;
    } else {
        for (ca, report) in &reports {
            print_report(ca, report, args.dry_run);
        }
    }
    Ok(if failing == 0 {
        Outcome::Success
    } else {
        Outcome::Failed
    })
}

fn print_report(ca: &str, r: &SweepReport, dry_run: bool) {
    if dry_run {
        println!("CA {ca}: {} certificate(s) pending", r.pending);
        for id in &r.pending_ids {
            println!("  would decide {id}");
        }
        return;
    }
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
