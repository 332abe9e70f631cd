//! `jitr fleet-provisioning template | claim`: AWS IoT fleet provisioning by claim, with our
//! CA and our fleet check. The template and the claim policy are rules/' own files (the stack
//! renders the same ones), filled in here.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use anyhow::{bail, Context, Result};
use base64::Engine;
use factory_ca::{DeviceId, IdFormat};
use iot::{CertificateId, IotAdmin, IotRegistry, ProvisioningClaim};
use serde_json::{json, Value};

use super::{print_json, Outcome};
use crate::cli::{FpClaimArgs, FpTemplateArgs};

const TEMPLATE_BODY: &str = include_str!("../../../../rules/fleet-provisioning-template.json");
const CLAIM_POLICY: &str = include_str!("../../../../rules/claim-policy.json");

/// `${NAME}` placeholders of a rules/ file replaced, then parsed.
fn fill(text: &str, values: &[(&str, &str)]) -> Result<Value> {
    let mut text = text.to_owned();
    for (name, value) in values {
        // Values go into JSON strings: escaped as JSON would.
        let escaped = serde_json::to_string(value)?;
        text = text.replace(&format!("${{{name}}}"), &escaped[1..escaped.len() - 1]);
    }
    if let Some(at) = text.find("${") {
        bail!(
            "unfilled placeholder in a rules/ file near {:?}",
            &text[at..(at + 40).min(text.len())]
        );
    }
    Ok(serde_json::from_str(&text)?)
}

/// An AWS IoT name: letters, digits, `_` or `-`, 1 to `max`.
fn check_name(flag: &str, value: &str, max: usize) -> Result<()> {
    let ok = !value.is_empty()
        && value.len() <= max
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if !ok {
        return Err(crate::UsageError(format!(
            "{flag} {value:?}: 1 to {max} letters, digits, '_' or '-'"
        ))
        .into());
    }
    Ok(())
}

pub(crate) fn template(args: FpTemplateArgs) -> Result<Outcome> {
    check_name("--template-name", &args.template_name, 36)?;
    check_name("--policy-name", &args.policy_name, 128)?;
    check_name("--uuid-parameter", &args.uuid_parameter, 128)?;
    let star_or = |flag: &str, value: &str, ok: fn(u8) -> bool| -> Result<()> {
        if value == "*" || (!value.is_empty() && value.bytes().all(ok)) {
            Ok(())
        } else {
            Err(crate::UsageError(format!("{flag} {value:?} is not valid")).into())
        }
    };
    star_or("--region", &args.region, |b| {
        b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-'
    })?;
    star_or("--account-id", &args.account_id, |b| b.is_ascii_digit())?;
    star_or("--partition", &args.partition, |b| {
        b.is_ascii_lowercase() || b == b'-'
    })?;
    let body = fill(
        TEMPLATE_BODY,
        &[
            ("UuidParameter", &args.uuid_parameter),
            ("PolicyName", &args.policy_name),
        ],
    )?;
    let claim_policy = fill(
        CLAIM_POLICY,
        &[
            ("AWS::Partition", &args.partition),
            ("AWS::Region", &args.region),
            ("AWS::AccountId", &args.account_id),
            ("ProvisioningTemplateName", &args.template_name),
        ],
    )?;
    let hook = args
        .hook_arn
        .as_ref()
        .map(|arn| json!({"targetArn": arn, "payloadVersion": "2020-04-01"}));
    print_json(&json!({
        "templateName": args.template_name,
        "templateBody": body,
        "preProvisioningHook": hook,
        "claimPolicy": claim_policy,
    }))?;
    Ok(Outcome::Success)
}

/// The variables a device's provisioning agent reads.
const AWS_CLAIM_CERT: &str = "AWS_CLAIM_CERT";
const AWS_CLAIM_PRIVATE_KEY: &str = "AWS_CLAIM_PRIVATE_KEY";
const AWS_PROVISIONING_TEMPLATE: &str = "AWS_PROVISIONING_TEMPLATE";

pub(crate) fn claim(args: FpClaimArgs) -> Result<Outcome> {
    let device = DeviceId::parse(&args.id, IdFormat::BalenaUuid)
        .map_err(|e| crate::UsageError(format!("--id: {e}")))?;
    check_name("--template-name", &args.template_name, 36)?;
    let fleet = if args.push_balena {
        Some(activator::balena_fleet_from_env().context(
            "--push-balena needs BALENA_API_KEY and BALENA_FLEET_ID (BALENA_API_URL for another API)",
        )?)
    } else {
        None
    };
    let deadline = args.aws.deadline(std::time::Duration::from_secs(60));
    let (claim, endpoint) = crate::aws::runtime()?.block_on(async {
        // The device first: no claim is made for one that cannot receive it.
        let member = match &fleet {
            Some(fleet) => match fleet.membership(&device, deadline).await? {
                balena::FleetMembership::Member(member) => Some(member),
                _ => bail!(
                    "device {device} is not an active member of balena fleet {}: no claim made",
                    fleet.id()
                ),
            },
            None => None,
        };
        let registry = crate::aws::session(&args.aws).await?.registry();
        let (claim, endpoint) = make_claim(&registry, &args, deadline).await?;
        if let (Some(fleet), Some(member)) = (&fleet, &member) {
            let scope = match &args.balena_service {
                Some(service) => balena::Scope::Service(service.clone()),
                None => balena::Scope::Device,
            };
            for (name, value) in variables(&claim, &args.template_name, &endpoint) {
                fleet
                    .set_env_var(member, &scope, name, &value, deadline)
                    .await
                    .with_context(|| format!("variable {name} on device {device}"))?;
            }
        }
        anyhow::Ok((claim, endpoint))
    })?;
    let folder = match &args.out {
        Some(out) => Some(write_claim(
            out,
            &device,
            &claim,
            &args.template_name,
            &endpoint,
        )?),
        None => None,
    };
    print_claim(&args, &device, &claim, &endpoint, folder.as_deref())?;
    Ok(Outcome::Success)
}

/// The claim made in AWS IoT (and `--claim-policy` attached to it), with the data endpoint
/// the device is to use.
async fn make_claim(
    registry: &iot::aws::AwsIotRegistry,
    args: &FpClaimArgs,
    deadline: tokio::time::Instant,
) -> Result<(ProvisioningClaim, String)> {
    let call = || iot::call_deadline(deadline);
    let endpoint = match &args.endpoint {
        Some(endpoint) => endpoint.clone(),
        None => registry.describe_endpoint("iot:Data-ATS", call()).await?,
    };
    let claim = registry
        .create_provisioning_claim(&args.template_name, call())
        .await
        .with_context(|| format!("fleet provisioning template {}", args.template_name))?;
    if let Some(policy) = &args.claim_policy {
        let id = CertificateId::parse(&claim.certificate_id)
            .map_err(|e| anyhow::anyhow!("claim certificate id: {e}"))?;
        let arn = registry.describe_certificate(&id, call()).await?.arn;
        registry
            .attach_policy(policy, &arn, call())
            .await
            .with_context(|| format!("claim policy {policy}"))?;
    }
    Ok((claim, endpoint))
}

/// What `claim` made, as JSON or text.
fn print_claim(
    args: &FpClaimArgs,
    device: &DeviceId,
    claim: &ProvisioningClaim,
    endpoint: &str,
    folder: Option<&std::path::Path>,
) -> Result<()> {
    let expires = claim.expires_at.map(|t| {
        time::OffsetDateTime::from_unix_timestamp(t)
            .ok()
            .and_then(|t| {
                t.format(&time::format_description::well_known::Rfc3339)
                    .ok()
            })
            .unwrap_or_else(|| t.to_string())
    });
    if args.output.json {
        print_json(&json!({
            "device_id": device.as_str(),
            "claim_certificate_id": claim.certificate_id,
            "expires_at": expires,
            "template": args.template_name,
            "endpoint": endpoint,
            "folder": folder.map(|p| p.display().to_string()),
            "pushed_to_balena": args.push_balena,
        }))?;
    } else {
        let to = match folder {
            Some(path) => path.display().to_string(),
            None => "balena".to_owned(),
        };
        println!(
            "claim {} for {device} (template {}, valid until {}) -> {to}",
            claim.certificate_id,
            args.template_name,
            expires.as_deref().unwrap_or("unknown")
        );
    }
    Ok(())
}

fn b64(text: &str) -> zeroize::Zeroizing<String> {
    zeroize::Zeroizing::new(base64::engine::general_purpose::STANDARD.encode(text))
}

fn variables(
    claim: &ProvisioningClaim,
    template: &str,
    endpoint: &str,
) -> Vec<(&'static str, zeroize::Zeroizing<String>)> {
    vec![
        (AWS_CLAIM_CERT, b64(&claim.certificate_pem)),
        (AWS_CLAIM_PRIVATE_KEY, b64(&claim.private_key)),
        (
            AWS_PROVISIONING_TEMPLATE,
            zeroize::Zeroizing::new(template.to_owned()),
        ),
        (
            balena::delivery::AWS_DATA_ENDPOINT,
            zeroize::Zeroizing::new(endpoint.to_owned()),
        ),
    ]
}

/// `<out>/<uuid>/{claim.crt, claim.key, provisioning.json}`, the key readable by the owner only.
fn write_claim(
    out: &Path,
    device: &DeviceId,
    claim: &ProvisioningClaim,
    template: &str,
    endpoint: &str,
) -> Result<std::path::PathBuf> {
    let dir = out.join(device.as_str());
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("cannot restrict {}", dir.display()))?;
    factory_ca::write_file_atomic(
        &dir.join("claim.key"),
        claim.private_key.as_bytes(),
        0o600,
        true,
    )?;
    factory_ca::write_file_atomic(
        &dir.join("claim.crt"),
        claim.certificate_pem.as_bytes(),
        0o644,
        true,
    )?;
    let settings = json!({
        "template": template,
        "endpoint": endpoint,
        "device_uuid_parameter": crate::cli::DEFAULT_UUID_PARAMETER,
        "device_uuid": device.as_str(),
        // The claim policy lets a claim certificate connect only with a `claim-` client id.
        "client_id": format!("claim-{device}"),
        "claim_certificate_id": claim.certificate_id,
        "expires_at": claim.expires_at,
    });
    factory_ca::write_file_atomic(
        &dir.join("provisioning.json"),
        format!("{settings:#}\n").as_bytes(),
        0o644,
        true,
    )?;
    Ok(dir)
}
