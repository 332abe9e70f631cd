//! `jitr jitp-template` and `ca register --jitp-template`: AWS IoT's own just-in-time
//! provisioning, for users who want no Lambda. The template gives what the activator gives (the
//! Thing named by the certificate's CN, the device policy, the `fleet` attribute, the optional
//! thing type and group), but AWS IoT checks neither balena membership nor the device id's form.

use std::path::Path;

use anyhow::Result;
use iot::JitpConfig;
use serde_json::{json, Value};

use super::{print_json, Outcome};
use crate::cli::JitpTemplateArgs;
use crate::UsageError;

/// An AWS IoT name: letters, digits, `:`, `_` or `-`, 1 to 128.
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b":_-".contains(&b))
}

/// An IAM role ARN.
fn valid_role_arn(arn: &str) -> bool {
    let mut parts = arn.splitn(6, ':');
    matches!(
        (parts.next(), parts.next(), parts.next(), parts.next(), parts.next(), parts.next()),
        (Some("arn"), Some(partition), Some("iam"), Some(""), Some(account), Some(resource))
            if partition.starts_with("aws")
                && account.len() == 12
                && account.bytes().all(|b| b.is_ascii_digit())
                && resource.strip_prefix("role/").is_some_and(|r| !r.is_empty())
    )
}

pub(crate) fn template(args: JitpTemplateArgs) -> Result<Outcome> {
    if !valid_role_arn(&args.role_arn) {
        return Err(UsageError(format!(
            "--role-arn {:?} is not an IAM role ARN (arn:aws:iam::<account>:role/<name>)",
            args.role_arn
        ))
        .into());
    }
    for (flag, value) in [
        ("--policy", Some(&args.thing.policy)),
        ("--thing-type", args.thing.thing_type.as_ref()),
        ("--thing-group", args.thing.thing_group.as_ref()),
    ] {
        if let Some(value) = value {
            if !valid_name(value) {
                return Err(UsageError(format!(
                    "{flag} {value:?}: 1 to 128 letters, digits, ':', '_' or '-'"
                ))
                .into());
            }
        }
    }
    let mut thing = json!({"ThingName": {"Ref": "AWS::IoT::Certificate::CommonName"}});
    if let Some(fleet) = args.thing.fleet_id {
        // The attribute the activator writes (the ownership rule's fleet attribute).
        let (name, value) =
            activator::ownership::fleet_attribute(activator::ownership::FleetMark::Balena(fleet));
        thing["AttributePayload"] = json!({ name: value });
    }
    if let Some(thing_type) = &args.thing.thing_type {
        thing["ThingTypeName"] = json!(thing_type);
    }
    if let Some(group) = &args.thing.thing_group {
        thing["ThingGroups"] = json!([group]);
    }
    let body = json!({
        "Parameters": {
            "AWS::IoT::Certificate::CommonName": {"Type": "String"},
            "AWS::IoT::Certificate::Id": {"Type": "String"}
        },
        "Resources": {
            "thing": {
                "Type": "AWS::IoT::Thing",
                "Properties": thing,
                "OverrideSettings": {
                    "AttributePayload": "MERGE",
                    "ThingTypeName": "REPLACE",
                    "ThingGroups": "DO_NOTHING"
                }
            },
            "certificate": {
                "Type": "AWS::IoT::Certificate",
                "Properties": {
                    "CertificateId": {"Ref": "AWS::IoT::Certificate::Id"},
                    "Status": "ACTIVE"
                }
            },
            "policy": {
                "Type": "AWS::IoT::Policy",
                "Properties": {"PolicyName": args.thing.policy}
            }
        }
    });
    print_json(&json!({"templateBody": body.to_string(), "roleArn": args.role_arn}))?;
    Ok(Outcome::Success)
}

/// Reads a registrationConfig file (`{"templateBody": "<JSON text>", "roleArn": "..."}`), as
/// `jitr jitp-template` writes it; any problem is a usage error naming the file.
pub(crate) fn read_config(path: &Path) -> Result<JitpConfig> {
    let bad = |reason: String| UsageError(format!("--jitp-template {}: {reason}", path.display()));
    let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
    let value: Value = serde_json::from_str(&text).map_err(|e| bad(format!("not JSON ({e})")))?;
    let field = |name: &str| {
        value[name]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| bad(format!("{name} is missing or not a string")))
    };
    let (template_body, role_arn) = (field("templateBody")?, field("roleArn")?);
    let template: Value = serde_json::from_str(&template_body)
        .map_err(|e| bad(format!("templateBody is not JSON text ({e})")))?;
    if !template["Resources"].is_object() {
        return Err(bad("templateBody has no Resources".into()).into());
    }
    if !valid_role_arn(&role_arn) {
        return Err(bad(format!("roleArn {role_arn:?} is not an IAM role ARN")).into());
    }
    Ok(JitpConfig {
        template_body,
        role_arn,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn role_arns_are_checked() {
        assert!(valid_role_arn("arn:aws:iam::123456789012:role/jitp"));
        assert!(valid_role_arn(
            "arn:aws-cn:iam::123456789012:role/path/jitp"
        ));
        for bad in [
            "",
            "arn:aws:iam::123:role/x",
            "arn:aws:iam::123456789012:user/x",
            "arn:aws:iam::123456789012:role/",
            "arn:aws:s3:::bucket",
        ] {
            assert!(!valid_role_arn(bad), "{bad}");
        }
    }
}
