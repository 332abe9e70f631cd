//! `jitr ca init`, `ca verification-cert` and `ca register`.

use std::path::Path;

use activator::registration::{register_ca, Registration};
use activator::CertificateId;
use anyhow::{bail, Context, Result};
use ca_keys::KeyUri;
use factory_ca::{
    certificate_id, certificates_from_pem_or_der, CaInit, IssuingCa, KeyProtection, Profile,
    Subject, CA_CERT_FILE,
};
use time::OffsetDateTime;

use super::{print_json, Outcome};
use crate::cli::{CaInitArgs, CaRegisterArgs, VerificationCertArgs};
use crate::{passphrase, UsageError};

/// File in the CA folder that holds the caCertificateId AWS IoT gave the CA.
const AWS_CA_ID_FILE: &str = "aws-ca-id";

pub(crate) fn init(args: CaInitArgs) -> Result<Outcome> {
    let profile = Profile::load(&args.ca.dir)?;
    let subject: Subject = args
        .subject
        .as_deref()
        .unwrap_or(&profile.root.subject)
        .parse()?;
    let issuing = if args.with_issuing_ca {
        Some(IssuingCa {
            subject: args
                .issuing_subject
                .as_deref()
                .unwrap_or(&profile.issuing_ca.subject)
                .parse()?,
            key: profile.issuing_ca.key,
            days: args.issuing_days.unwrap_or(profile.issuing_ca.days),
        })
    } else {
        None
    };
    let key_uri = args
        .key_uri
        .as_deref()
        .map(crate::keys::parse_uri)
        .transpose()?;
    if let Some(KeyUri::File(_)) = key_uri {
        return Err(UsageError(format!(
            "a key file is the default ({}): --key-uri takes awskms: or pkcs11: URIs",
            args.ca.dir.join(factory_ca::CA_KEY_FILE).display()
        ))
        .into());
    }
    let protection = if key_uri.is_some() {
        // The CA key is not written here: nothing to encrypt.
        KeyProtection::InsecurePlaintext
    } else {
        passphrase::for_new_key(
            args.ca.passphrase_file.as_deref(),
            args.insecure_plaintext_key,
        )?
    };
    let root_protection = if args.with_issuing_ca {
        Some(passphrase::root_for_new_key(
            args.root_passphrase_file.as_deref(),
            args.insecure_plaintext_key,
            &protection,
        )?)
    } else {
        None
    };
    let mut init = CaInit {
        dir: args.ca.dir.clone(),
        root_subject: subject,
        root_key: args.key.unwrap_or(profile.root.key),
        root_days: args.days.unwrap_or(profile.root.days),
        issuing,
        protection,
        root_protection,
        remote_key: None,
    };
    let files = match &key_uri {
        None => init.run(OffsetDateTime::now_utc())?,
        Some(uri) => {
            // Nothing is created in KMS or on the token for a folder that already has a CA.
            init.check()?;
            let options = crate::keys::options(&args.ca, uri, None)?;
            let key = if args.existing {
                ca_keys::open(uri, &options)
            } else {
                let algorithm = match &init.issuing {
                    Some(issuing) => issuing.key,
                    None => init.root_key,
                };
                ca_keys::create(uri, algorithm, &options)
            }
            .map_err(crate::keys::backend_error)?;
            // An existing key decides the type of the CA it serves.
            match &mut init.issuing {
                Some(issuing) => issuing.key = key.algorithm(),
                None => init.root_key = key.algorithm(),
            }
            let name = key.uri();
            init.remote_key = Some(key);
            init.run(OffsetDateTime::now_utc()).map_err(|e| {
                let made = if args.existing {
                    String::new()
                } else {
                    format!(" (the key {name} was created: reuse it with --existing, or delete it)")
                };
                anyhow::anyhow!("{}{made}", activator::error_chain(&e))
            })?
        }
    };
    let ca_der = factory_ca::read_certificate(&files.ca_cert)?;
    let ca_id = certificate_id(&ca_der);
    if args.output.json {
        print_json(&serde_json::json!({
            "ca_cert": files.ca_cert,
            "ca_key": files.ca_key,
            "root_cert": files.root.as_ref().map(|r| &r.0),
            "root_key": files.root.as_ref().map(|r| &r.1),
            "ca_certificate_id": ca_id,
        }))?;
    } else {
        println!("CA certificate  {}", files.ca_cert.display());
        match &key_uri {
            None => println!("CA key          {} (mode 0600)", files.ca_key.display()),
            Some(_) => println!(
                "CA key          {} (recorded in {})",
                factory_ca::ca_key_uri(&args.ca.dir)?.unwrap_or_default(),
                files.ca_key.display()
            ),
        }
        if let Some((cert, key)) = &files.root {
            println!("root certificate {}", cert.display());
            println!(
                "root key         {} (mode 0600): move it offline now",
                key.display()
            );
        }
        println!("certificate id  {ca_id} (the caCertificateId once registered in AWS IoT)");
        if args.insecure_plaintext_key {
            eprintln!("warning: the CA keys on disk are NOT encrypted (--insecure-plaintext-key)");
        }
    }
    Ok(Outcome::Success)
}

pub(crate) fn verification_cert(args: VerificationCertArgs) -> Result<Outcome> {
    let ca = crate::keys::load_ca(&args.ca, None)?;
    let pem = ca.verification_certificate(&args.registration_code, OffsetDateTime::now_utc())?;
    match &args.out {
        Some(path) => {
            std::fs::write(path, &pem)
                .with_context(|| format!("cannot write {}", path.display()))?;
            eprintln!("verification certificate written to {}", path.display());
        }
        None => print!("{pem}"),
    }
    Ok(Outcome::Success)
}

/// The CA certificate exactly as `ca.crt` holds it (AWS IoT and moto compare PEM text when
/// linking device certificates to their CA) and its DER.
pub(crate) fn read_ca_pem(dir: &Path) -> Result<(String, Vec<u8>)> {
    let path = dir.join(CA_CERT_FILE);
    let pem = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {} (run `jitr ca init` first)", path.display()))?;
    if !pem.contains("-----BEGIN CERTIFICATE-----") {
        bail!("{} is not a PEM certificate", path.display());
    }
    let mut certs = match certificates_from_pem_or_der(pem.as_bytes()) {
        Ok(certs) => certs,
        Err(reason) => bail!("{}: {reason}", path.display()),
    };
    if certs.len() != 1 {
        bail!(
            "{} holds {} certificates; AWS IoT registers exactly one CA certificate",
            path.display(),
            certs.len()
        );
    }
    Ok((pem, certs.swap_remove(0)))
}

pub(crate) fn register(args: CaRegisterArgs) -> Result<Outcome> {
    let (ca_pem, ca_der) = read_ca_pem(&args.ca.dir)?;
    let jitp = args
        .jitp_template
        .as_deref()
        .map(super::jitp::read_config)
        .transpose()?;
    // Unlock the key before talking to AWS: a wrong passphrase should cost no AWS call.
    let ca = if args.sni_only {
        None
    } else {
        Some(crate::keys::load_ca(&args.ca, None)?)
    };
    let expected_id = CertificateId::parse(&certificate_id(&ca_der))
        .map_err(|reason| anyhow::anyhow!("the CA's certificate id: {reason}"))?;
    let registration = crate::aws::runtime()?.block_on(async {
        let registry = crate::aws::session(&args.aws).await?.registry();
        let deadline = args.aws.deadline(REGISTRATION_TIME);
        let registration =
            register_ca(&registry, ca.as_ref(), &ca_pem, &expected_id, deadline).await?;
        if let Some(jitp) = &jitp {
            use activator::IotAdmin;
            let id = CertificateId::parse(&registration.id)
                .map_err(|reason| anyhow::anyhow!("the CA id AWS IoT gave: {reason}"))?;
            registry
                .set_ca_jitp(&id, jitp, activator::call_deadline(deadline))
                .await
                .context("the CA is registered, but its JITP template could not be set")?;
        }
        anyhow::Ok(registration)
    })?;
    report_registration(&args, &registration, expected_id.as_str())?;
    if let Some(jitp) = &jitp {
        if !args.output.json {
            println!("JITP template set  (role {}; AWS IoT provisions every certificate this CA signed, with no fleet check)", jitp.role_arn);
        }
    }
    Ok(Outcome::Success)
}

/// The longest `ca register` may take in all (four calls at most).
const REGISTRATION_TIME: std::time::Duration = std::time::Duration::from_secs(60);

/// Writes ca/aws-ca-id and says what AWS IoT now holds, with a warning when devices would
/// not be registered.
fn report_registration(
    args: &CaRegisterArgs,
    registration: &Registration,
    expected_id: &str,
) -> Result<()> {
    let id_file = args.ca.dir.join(AWS_CA_ID_FILE);
    factory_ca::write_file_atomic(
        &id_file,
        format!("{}\n", registration.id).as_bytes(),
        0o644,
        true,
    )?;
    let topic = format!("$aws/events/certificates/registered/{}", registration.id);
    let mode = if args.sni_only { "SNI_ONLY" } else { "DEFAULT" };
    if args.output.json {
        print_json(&serde_json::json!({
            "ca_certificate_id": registration.id,
            "ca_certificate_arn": registration.arn,
            "topic": topic,
            "already_registered": registration.already,
            "certificate_mode": mode,
            "status": registration.status,
            "auto_registration_status": registration.auto_registration,
            "jitp_template": args.jitp_template.is_some(),
            "id_file": id_file,
        }))?;
    } else {
        if registration.already {
            let details = match (&registration.status, &registration.auto_registration) {
                (Some(status), Some(auto)) => {
                    format!(" (status {status}, auto-registration {auto})")
                }
                (Some(status), None) => format!(" (status {status})"),
                _ => String::new(),
            };
            println!("the CA is already registered in AWS IoT{details}");
        } else {
            println!("registered the CA in AWS IoT ({mode} mode, active, auto-registration on)");
        }
        println!("CA certificate id  {}", registration.id);
        println!("event topic        {topic}");
        println!("id written to      {}", id_file.display());
    }
    if registration.id != expected_id {
        eprintln!(
            "warning: AWS IoT gave the CA id {} but the SHA-256 of its DER is {expected_id}",
            registration.id
        );
    }
    let inactive = registration
        .status
        .as_deref()
        .is_some_and(|s| s != "ACTIVE");
    let no_auto = registration
        .auto_registration
        .as_deref()
        .is_some_and(|s| s != "ENABLE");
    if inactive || no_auto {
        eprintln!(
            "warning: devices will not be registered until the CA is active with \
             auto-registration on: aws iot update-ca-certificate --certificate-id {} \
             --new-status ACTIVE --new-auto-registration-status ENABLE",
            registration.id
        );
    }
    Ok(())
}
