use anyhow::{bail, Context, Result};
use aws_sdk_iot::types::CertificateStatus;
use factory_ca::{DeviceId, IdFormat};

use super::{print_json, Outcome};
use crate::aws::{self, Aws};
use crate::cli::RevokeArgs;

/// What `revoke` did to one certificate.
#[derive(Debug, serde::Serialize)]
struct Revoked {
    certificate_id: String,
    policies_detached: Vec<String>,
    things_detached: Vec<String>,
}

/// The certificate id at the end of a certificate ARN (`arn:aws:iot:region:account:cert/<id>`).
fn id_from_arn(arn: &str) -> Option<&str> {
    arn.rsplit_once("cert/").map(|(_, id)| id)
}

pub(crate) fn revoke(args: RevokeArgs) -> Result<Outcome> {
    if let Some(id) = &args.id {
        DeviceId::parse(id, IdFormat::Any)?;
    }
    if let Some(id) = &args.certificate_id {
        activator::CertificateId::parse(id)
            .map_err(|reason| anyhow::anyhow!("--certificate-id {id:?}: {reason}"))?;
    }
    let (revoked, deleted) = aws::runtime()?.block_on(async {
        let aws = Aws::load(&args.aws).await?;
        let iot = aws.iot();
        // The certificates to revoke, as ARNs, and the Things involved.
        let (arns, mut things) = match (&args.id, &args.certificate_id) {
            (Some(thing), _) => {
                let answer = iot.list_thing_principals().thing_name(thing).send().await;
                match answer {
                    Ok(answer) => (
                        answer
                            .principals()
                            .iter()
                            .filter(|p| id_from_arn(p).is_some())
                            .cloned()
                            .collect::<Vec<_>>(),
                        vec![thing.clone()],
                    ),
                    Err(e)
                        if e.as_service_error()
                            .is_some_and(|e| e.is_resource_not_found_exception()) =>
                    {
                        (Vec::new(), Vec::new())
                    }
                    Err(e) => return Err(aws.call_error("ListThingPrincipals", e)),
                }
            }
            (None, Some(id)) => {
                let answer = iot
                    .describe_certificate()
                    .certificate_id(id)
                    .send()
                    .await
                    .map_err(|e| aws.call_error("DescribeCertificate", e))?;
                let arn = answer
                    .certificate_description()
                    .and_then(|d| d.certificate_arn())
                    .context("DescribeCertificate answered without an ARN")?
                    .to_owned();
                let things = iot
                    .list_principal_things()
                    .principal(&arn)
                    .send()
                    .await
                    .map_err(|e| aws.call_error("ListPrincipalThings", e))?;
                (vec![arn], things.things().to_vec())
            }
            (None, None) => bail!("give --id or --certificate-id"),
        };
        let mut revoked = Vec::new();
        for arn in &arns {
            let id = id_from_arn(arn).unwrap_or_default().to_owned();
            // Revoke first: from here on the certificate cannot connect, whatever else fails.
            iot.update_certificate()
                .certificate_id(&id)
                .new_status(CertificateStatus::Revoked)
                .send()
                .await
                .map_err(|e| aws.call_error("UpdateCertificate", e))?;
            let policies = iot
                .list_attached_policies()
                .target(arn)
                .send()
                .await
                .map_err(|e| aws.call_error("ListAttachedPolicies", e))?;
            let mut policies_detached = Vec::new();
            for name in policies.policies().iter().filter_map(|p| p.policy_name()) {
                iot.detach_policy()
                    .policy_name(name)
                    .target(arn)
                    .send()
                    .await
                    .map_err(|e| aws.call_error("DetachPolicy", e))?;
                policies_detached.push(name.to_owned());
            }
            let principal_things = iot
                .list_principal_things()
                .principal(arn)
                .send()
                .await
                .map_err(|e| aws.call_error("ListPrincipalThings", e))?;
            let mut things_detached = Vec::new();
            for thing in principal_things.things() {
                iot.detach_thing_principal()
                    .thing_name(thing)
                    .principal(arn)
                    .send()
                    .await
                    .map_err(|e| aws.call_error("DetachThingPrincipal", e))?;
                things_detached.push(thing.clone());
                if !things.contains(thing) {
                    things.push(thing.clone());
                }
            }
            revoked.push(Revoked {
                certificate_id: id,
                policies_detached,
                things_detached,
            });
        }
        let mut deleted = Vec::new();
        if args.delete_thing {
            for thing in &things {
                match iot.delete_thing().thing_name(thing).send().await {
                    Ok(_) => deleted.push(thing.clone()),
                    Err(e)
                        if e.as_service_error()
                            .is_some_and(|e| e.is_resource_not_found_exception()) => {}
                    Err(e) => return Err(aws.call_error("DeleteThing", e)),
                }
            }
        }
        anyhow::Ok((revoked, deleted))
    })?;
    if args.json {
        print_json(&serde_json::json!({"revoked": revoked, "things_deleted": deleted}))?;
    } else {
        if revoked.is_empty() {
            println!("no certificate to revoke");
        }
        for r in &revoked {
            println!(
                "revoked {} (policies detached: {}; detached from: {})",
                r.certificate_id,
                if r.policies_detached.is_empty() {
                    "none".into()
                } else {
                    r.policies_detached.join(", ")
                },
                if r.things_detached.is_empty() {
                    "none".into()
                } else {
                    r.things_detached.join(", ")
                }
            );
        }
        for thing in &deleted {
            println!("deleted Thing {thing}");
        }
    }
    Ok(Outcome::Success)
}
