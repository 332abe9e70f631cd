//! `jitr revoke`: a device's (or one) certificate REVOKED, detached from its policies and
//! Things, the Things deleted on request; idempotent while the device's Thing stands (once AWS
//! IoT holds nothing of the device: `nothing to revoke`, exit 1).

use anyhow::Result;
use factory_ca::{DeviceId, IdFormat};
use iot::CertificateId;
use operations::revoke::{revoke as revoke_in_aws, RevokeError, RevokeReport, Scope, Target};

use super::{print_json, Outcome};
use crate::cli::RevokeArgs;

/// The longest one revoke may take in all.
const REVOKE_TIME: std::time::Duration = std::time::Duration::from_secs(300);

pub(crate) fn revoke(args: RevokeArgs) -> Result<Outcome> {
    let target = target(&args)?;
    let also = also(&args, &target)?;
    let scope = Scope::from_env().map_err(super::config_error)?;
    let deadline = args.aws.deadline(REVOKE_TIME);
    let (report, nothing, cleaned, failed) = crate::aws::runtime()?.block_on(async {
        let registry = crate::aws::session(&args.aws).await?.registry();
        let revoked = revoke_in_aws(
            &registry,
            &target,
            &also,
            args.delete_thing,
            &scope,
            deadline,
        )
        .await;
        // Nothing of the device in AWS IoT (its Thing deleted before, say) may still leave its
        // variables in balena: with --balena-cleanup they are removed all the same, and the run
        // still fails (exit 1): nothing was revoked, and no mark cuts the device off.
        let (report, nothing) = match revoked {
            Ok(report) => (report, false),
            Err(RevokeError::Nothing(why)) if args.balena_cleanup => {
                eprintln!("jitr: {why}");
                (RevokeReport::default(), true)
            }
            Err(e) => return Err(e.into()),
        };
        let (cleaned, failed) = if args.balena_cleanup {
            let devices = to_clean(&registry, &report, &target, deadline).await?;
            super::balena::cleanup(&devices, args.aws.deadline(REVOKE_TIME)).await?
        } else {
            (Vec::new(), Vec::new())
        };
        anyhow::Ok((report, nothing, cleaned, failed))
    })?;
    if args.output.json {
        let mut value = serde_json::to_value(&report)?;
        value["balena_cleaned"] = serde_json::json!(cleaned);
        value["balena_failed"] = serde_json::json!(failed);
        print_json(&value)?;
    } else {
        if !nothing {
            print_report(&report);
        }
        for device in &cleaned {
            println!("removed jitr's variables from balena device {device}");
        }
    }
    for failure in &failed {
        eprintln!("jitr: balena: {failure}");
    }
    Ok(if failed.is_empty() && !nothing {
        Outcome::Success
    } else {
        Outcome::Failed
    })
}

/// `--id` or `--certificate-id`, checked.
fn target(args: &RevokeArgs) -> Result<Target> {
    Ok(match (&args.id, &args.certificate_id) {
        (Some(id), _) => Target::Device(
            DeviceId::parse(id, IdFormat::Any)
                .map_err(|e| crate::UsageError(format!("--id: {e}")))?
                .to_string(),
        ),
        (None, Some(id)) => {
            Target::Certificate(CertificateId::parse(id).map_err(|reason| {
                crate::UsageError(format!("--certificate-id {id:?}: {reason}"))
            })?)
        }
        (None, None) => anyhow::bail!("give --id or --certificate-id"),
    })
}

/// The device's certificates the manifest names, which may never have got a Thing.
fn also(args: &RevokeArgs, target: &Target) -> Result<Vec<CertificateId>> {
    match (&args.manifest, target) {
        (Some(path), Target::Device(device)) => factory_ca::read_manifest(path)?
            .into_iter()
            .filter(|entry| entry.id == *device)
            .map(|entry| {
                CertificateId::parse(&entry.certificate_id).map_err(|reason| {
                    anyhow::anyhow!(
                        "{}: certificate id {:?}: {reason}",
                        path.display(),
                        entry.certificate_id
                    )
                })
            })
            .collect(),
        (Some(_), Target::Certificate(_)) => {
            Err(crate::UsageError("--manifest goes with --id".to_owned()).into())
        }
        (None, _) => Ok(Vec::new()),
    }
}

/// The devices whose variables `--balena-cleanup` removes: those the revoked certificates were
/// detached from, and the target. A device that still has an ACTIVE certificate (rotated: the
/// revoked one was its old) keeps its variables: they are the live credentials.
async fn to_clean(
    registry: &iot::aws::AwsIotRegistry,
    report: &RevokeReport,
    target: &Target,
    deadline: tokio::time::Instant,
) -> Result<Vec<String>> {
    let mut devices: Vec<String> = report
        .revoked
        .iter()
        .flat_map(|r| r.things_detached.iter().cloned())
        .collect();
    if let Target::Device(device) = target {
        devices.push(device.clone());
    }
    devices.sort();
    devices.dedup();
    let mut clean = Vec::new();
    for device in devices {
        if activator::ownership::active_attached(registry, &device, deadline)
            .await?
            .is_empty()
        {
            clean.push(device);
        } else {
            eprintln!("jitr: balena: {device} still has an ACTIVE certificate: its variables stay");
        }
    }
    Ok(clean)
}

fn print_report(report: &RevokeReport) {
    if report.revoked.is_empty() {
        println!("no certificate to revoke");
    }
    let list = |items: &[String]| {
        if items.is_empty() {
            "none".to_owned()
        } else {
            items.join(", ")
        }
    };
    for r in &report.revoked {
        println!(
            "revoked {} (policies detached: {}; detached from: {})",
            r.certificate_id,
            list(&r.policies_detached),
            list(&r.things_detached)
        );
    }
    for id in &report.not_registered {
        println!("{id} was never registered in AWS IoT: nothing to revoke");
    }
    for thing in &report.things_deleted {
        println!("deleted Thing {thing} (and with it any revocation mark: the device may register again)");
    }
    for thing in &report.things_kept {
        println!("kept Thing {thing}: it is not jitr's, or another application's principal is attached to it");
    }
    for id in &report.foreign_kept {
        println!("left certificate {id} as it is: registered under a CA jitr does not trust (another application's)");
    }
    if let Some(thing) = &report.marked {
        println!("{thing} is cut off for good: the activator and the provisioner refuse it until `jitr approve --device {thing}`");
    }
}
