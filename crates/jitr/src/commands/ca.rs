//! `jitr ca init`, `ca verification-cert` and `ca register`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use ca_keys::KeyUri;
use factory_ca::{
    certificate_id, certificates_from_pem_or_der, CaInit, IssuingCa, KeyProtection, Profile,
    Subject, CA_CERT_FILE,
};
use iot::CertificateId;
use operations::ca_register::{register_ca, Registration};
use time::OffsetDateTime;

use super::{print_json, Outcome};
use crate::cli::{CaInitArgs, CaRegisterArgs, VerificationCertArgs};
use crate::regions::AwsRegion;
use crate::{passphrase, UsageError};

/// File in the CA folder that holds the caCertificateId AWS IoT gave the CA.
const AWS_CA_ID_FILE: &str = "aws-ca-id";
/// File in the CA folder that maps each region the CA is registered in to its id there.
const AWS_CA_IDS_FILE: &str = "aws-ca-ids.json";

pub(crate) fn init(args: CaInitArgs) -> Result<Outcome> {
    let profile = Profile::load(&args.ca.dir)?;
    let subject: Subject = args
        .subject
        .as_deref()
        .unwrap_or(&profile.root.subject)
        .parse()?;
    let issuing = issuing_ca(&args, &profile, &subject)?;
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
        Some(uri) => init_with_remote_key(&args, &mut init, uri)?,
    };
    print_init(&args, &files, key_uri.is_some())?;
    Ok(Outcome::Success)
}

/// The issuing CA `--with-issuing-ca` asks for: `--subject` names the owner, and the issuing
/// CA (the one in every chain) follows it unless `--issuing-subject` names it.
fn issuing_ca(
    args: &CaInitArgs,
    profile: &Profile,
    subject: &Subject,
) -> Result<Option<IssuingCa>> {
    if !args.with_issuing_ca {
        return Ok(None);
    }
    Ok(Some(IssuingCa {
        subject: match (&args.issuing_subject, &args.subject) {
            (Some(issuing), _) => issuing.parse()?,
            (None, Some(_)) => subject.issuing_below(),
            (None, None) => profile.issuing_ca.subject.parse()?,
        },
        key: profile.issuing_ca.key,
        days: args.issuing_days.unwrap_or(profile.issuing_ca.days),
    }))
}

/// The CA made with its key in KMS or on a PKCS#11 token, created there or (`--existing`)
/// opened; an existing key decides the type of the CA it serves.
fn init_with_remote_key(
    args: &CaInitArgs,
    init: &mut CaInit,
    uri: &KeyUri,
) -> Result<factory_ca::CaFiles> {
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
        anyhow::anyhow!("{}{made}", iot::error_chain(&e))
    })
}

/// What `ca init` made, as JSON or text.
fn print_init(args: &CaInitArgs, files: &factory_ca::CaFiles, remote_key: bool) -> Result<()> {
    let ca_der = factory_ca::read_certificate(&files.ca_cert)?;
    let ca_id = certificate_id(&ca_der);
    if args.output.json {
        return print_json(&serde_json::json!({
            "ca_cert": files.ca_cert,
            "ca_key": files.ca_key,
            "root_cert": files.root.as_ref().map(|r| &r.0),
            "root_key": files.root.as_ref().map(|r| &r.1),
            "ca_certificate_id": ca_id,
        }));
    }
    println!("CA certificate  {}", files.ca_cert.display());
    if remote_key {
        println!(
            "CA key          {} (recorded in {})",
            factory_ca::ca_key_uri(&args.ca.dir)?.unwrap_or_default(),
            files.ca_key.display()
        );
    } else {
        println!("CA key          {} (mode 0600)", files.ca_key.display());
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
    Ok(())
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
    let regions = regions(&args)?;
    let ids_file = args.ca.dir.join(AWS_CA_IDS_FILE);
    // Read before any AWS call: a broken file must not cost a registration its record.
    let mut ids = read_ca_ids(&ids_file)?;
    // Unlock the key before talking to AWS: a wrong passphrase should cost no AWS call.
    let ca = if args.sni_only {
        None
    } else {
        Some(crate::keys::load_ca(&args.ca, None)?)
    };
    let expected_id = CertificateId::parse(&certificate_id(&ca_der))
        .map_err(|reason| anyhow::anyhow!("the CA's certificate id: {reason}"))?;
    // No --region: the standard chain's one region, exactly as before regions were repeatable.
    let targets: Vec<Option<&str>> = if regions.is_empty() {
        vec![None]
    } else {
        regions.iter().map(|r| Some(r.as_str())).collect()
    };
    let per_region = args
        .timeout
        .unwrap_or(REGISTRATION_TIME * targets.len().try_into().unwrap_or(u32::MAX));
    let deadline = tokio::time::Instant::now() + per_region;
    let mut results = crate::aws::runtime()?.block_on(register_each(
        &args,
        &targets,
        ca.as_ref(),
        &ca_pem,
        &expected_id,
        jitp.as_ref(),
        deadline,
    ));
    // What succeeded is recorded even when another region failed.
    for (region, result) in &results {
        if let Ok(registration) = result {
            ids.insert(region.clone(), registration.id.clone());
        }
    }
    if results.iter().any(|(_, r)| r.is_ok()) {
        write_ca_ids(&ids_file, &ids)?;
    }
    let succeeded = results.iter().any(|(_, r)| r.is_ok());
    let outcome = if results.len() == 1 {
        let (region, result) = results.swap_remove(0);
        record_one(&args, &region, &result?, expected_id.as_str(), &ids_file)?
    } else {
        report_regions(&args, &results, expected_id.as_str(), &ids_file)?;
        if results.iter().all(|(_, r)| r.is_ok()) {
            Outcome::Success
        } else {
            Outcome::Failed
        }
    };
    if let Some(jitp) = &jitp {
        if succeeded && !args.output.json {
            println!("JITP template set  (role {}; AWS IoT provisions every certificate this CA signed, with no fleet check)", jitp.role_arn);
        }
    }
    Ok(outcome)
}

/// One region: the contract from before there were several, ca/aws-ca-id included (the
/// deployment reads it, and scripts written for one region keep working). With several,
/// aws-ca-ids.json is the record: a file holding one region's id would mislead.
fn record_one(
    args: &CaRegisterArgs,
    region: &str,
    registration: &Registration,
    expected_id: &str,
    ids_file: &Path,
) -> Result<Outcome> {
    let id_file = args.ca.dir.join(AWS_CA_ID_FILE);
    factory_ca::write_file_atomic(
        &id_file,
        format!("{}\n", registration.id).as_bytes(),
        0o644,
        true,
    )?;
    report_registration(args, region, registration, expected_id, &id_file, ids_file)?;
    Ok(Outcome::Success)
}

/// `--region`, each named once, in the order given.
fn regions(args: &CaRegisterArgs) -> Result<Vec<AwsRegion>> {
    let mut regions: Vec<AwsRegion> = Vec::new();
    for name in &args.region {
        let region =
            AwsRegion::parse(name).map_err(|reason| UsageError(format!("--region: {reason}")))?;
        if !regions.contains(&region) {
            regions.push(region);
        }
    }
    Ok(regions)
}

/// Each region in turn (`None`: the standard chain's): each has its own registration code and
/// verification certificate. The region's name beside what happened there.
async fn register_each(
    args: &CaRegisterArgs,
    targets: &[Option<&str>],
    ca: Option<&factory_ca::Ca>,
    ca_pem: &str,
    expected_id: &CertificateId,
    jitp: Option<&iot::JitpConfig>,
    deadline: tokio::time::Instant,
) -> Vec<(String, Result<Registration>)> {
    let mut results = Vec::with_capacity(targets.len());
    for target in targets {
        let name = target.unwrap_or("the default region").to_owned();
        let aws = args.aws(*target);
        let result = register_in(&aws, ca, ca_pem, expected_id, jitp, deadline).await;
        results.push(match result {
            Ok((region, registration)) => (region, Ok(registration)),
            Err(e) => (name, Err(e)),
        });
    }
    results
}

/// Registers the CA in the region `aws` names (and sets its JITP template): the region's name
/// as the session resolved it, and what AWS IoT holds there.
async fn register_in(
    aws: &crate::cli::AwsArgs,
    ca: Option<&factory_ca::Ca>,
    ca_pem: &str,
    expected_id: &CertificateId,
    jitp: Option<&iot::JitpConfig>,
    deadline: tokio::time::Instant,
) -> Result<(String, Registration)> {
    let session = crate::aws::session(aws).await?;
    let region = session
        .config()
        .region()
        .map_or_else(|| "unknown".to_owned(), ToString::to_string);
    let registry = session.registry();
    let registration = register_ca(&registry, ca, ca_pem, expected_id, deadline).await?;
    if let Some(jitp) = jitp {
        use iot::IotAdmin;
        let id = CertificateId::parse(&registration.id)
            .map_err(|reason| anyhow::anyhow!("the CA id AWS IoT gave: {reason}"))?;
        registry
            .set_ca_jitp(&id, jitp, iot::call_deadline(deadline))
            .await
            .context("the CA is registered, but its JITP template could not be set")?;
    }
    Ok((region, registration))
}

/// The longest `ca register` may take in one region (four calls at most, six when DEFAULT
/// mode falls back to SNI_ONLY).
const REGISTRATION_TIME: std::time::Duration = std::time::Duration::from_secs(60);

/// `ca/aws-ca-ids.json` as it is (empty when absent): region → caCertificateId.
fn read_ca_ids(path: &Path) -> Result<BTreeMap<String, String>> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(BTreeMap::new()),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    serde_json::from_str(&text).map_err(|e| {
        anyhow::anyhow!(
            "{} is not a JSON object of region to CA id ({e}): fix or remove it",
            path.display()
        )
    })
}

/// Writes the merged map whole (pretty JSON, keys sorted), replacing the file atomically.
fn write_ca_ids(path: &Path, ids: &BTreeMap<String, String>) -> Result<()> {
    let mut text = serde_json::to_string_pretty(ids)?;
    text.push('\n');
    factory_ca::write_file_atomic(path, text.as_bytes(), 0o644, true)?;
    Ok(())
}

/// The certificate mode the CA holds after this run, as AWS IoT names it.
fn mode_of(args: &CaRegisterArgs, registration: &Registration) -> &'static str {
    if args.sni_only || registration.sni_only_fallback {
        "SNI_ONLY"
    } else {
        "DEFAULT"
    }
}

/// One line saying what AWS IoT holds for the CA in a region.
fn what_was_done(args: &CaRegisterArgs, registration: &Registration) -> String {
    if registration.already {
        let details = match (&registration.status, &registration.auto_registration) {
            (Some(status), Some(auto)) => format!(" (status {status}, auto-registration {auto})"),
            (Some(status), None) => format!(" (status {status})"),
            _ => String::new(),
        };
        format!("the CA is already registered in AWS IoT{details}")
    } else {
        format!(
            "registered the CA in AWS IoT ({} mode, active, auto-registration on)",
            mode_of(args, registration)
        )
    }
}

/// One region's result as JSON (the fields `ca register --json` has always printed).
fn registration_json(
    args: &CaRegisterArgs,
    region: &str,
    registration: &Registration,
) -> serde_json::Value {
    serde_json::json!({
        "region": region,
        "ca_certificate_id": registration.id,
        "ca_certificate_arn": registration.arn,
        "topic": format!("$aws/events/certificates/registered/{}", registration.id),
        "already_registered": registration.already,
        "certificate_mode": mode_of(args, registration),
        "sni_only_fallback": registration.sni_only_fallback,
        "status": registration.status,
        "auto_registration_status": registration.auto_registration,
        "jitp_template": args.jitp_template.is_some(),
    })
}

/// Says what AWS IoT now holds in one region, with a warning when devices would not be
/// registered there.
fn report_registration(
    args: &CaRegisterArgs,
    region: &str,
    registration: &Registration,
    expected_id: &str,
    id_file: &Path,
    ids_file: &Path,
) -> Result<()> {
    let topic = format!("$aws/events/certificates/registered/{}", registration.id);
    if args.output.json {
        let mut json = registration_json(args, region, registration);
        json["id_file"] = serde_json::json!(id_file);
        json["ids_file"] = serde_json::json!(ids_file);
        print_json(&json)?;
    } else {
        println!("{}", what_was_done(args, registration));
        println!("CA certificate id  {}", registration.id);
        println!("event topic        {topic}");
        println!("id written to      {}", id_file.display());
    }
    warn_about(region, registration, expected_id);
    Ok(())
}

/// Several regions: one line per region, then where the ids went; failures on stderr.
fn report_regions(
    args: &CaRegisterArgs,
    results: &[(String, Result<Registration>)],
    expected_id: &str,
    ids_file: &Path,
) -> Result<()> {
    let ids_file: PathBuf = ids_file.to_owned();
    if args.output.json {
        let regions: Vec<serde_json::Value> = results
            .iter()
            .map(|(region, result)| match result {
                Ok(registration) => registration_json(args, region, registration),
                Err(e) => serde_json::json!({
                    "region": region,
                    "error": iot::error_chain(e.as_ref()),
                }),
            })
            .collect();
        print_json(&serde_json::json!({"regions": regions, "ids_file": ids_file}))?;
    } else {
        for (region, result) in results {
            if let Ok(registration) = result {
                println!("{region:<18} {}", what_was_done(args, registration));
            }
        }
        let mut ids: Vec<&str> = results
            .iter()
            .filter_map(|(_, r)| r.as_ref().ok().map(|r| r.id.as_str()))
            .collect();
        ids.dedup();
        if let [id] = ids.as_slice() {
            println!("CA certificate id  {id}");
            println!("event topic        $aws/events/certificates/registered/{id}");
        }
        if !ids.is_empty() {
            println!("ids written to     {}", ids_file.display());
        }
    }
    for (region, result) in results {
        match result {
            Ok(registration) => warn_about(region, registration, expected_id),
            Err(e) => eprintln!("jitr: error: {region}: {}", iot::error_chain(e.as_ref())),
        }
    }
    Ok(())
}

/// Warnings about one region's registration: an unexpected id, SNI_ONLY by necessity, a CA
/// that will not register devices.
fn warn_about(region: &str, registration: &Registration, expected_id: &str) {
    if registration.id != expected_id {
        eprintln!(
            "warning: AWS IoT gave the CA id {} in {region} but the SHA-256 of its DER is {expected_id}",
            registration.id
        );
    }
    if registration.sni_only_fallback {
        eprintln!(
            "note: {region}: another AWS account holds this CA in DEFAULT mode there (one account \
             per region may), so it was registered SNI_ONLY: devices must send the endpoint's \
             name (SNI) when they connect, as AWS's device SDKs do"
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
            "warning: devices will not be registered in {region} until the CA is active with \
             auto-registration on: aws iot update-ca-certificate --region {region} \
             --certificate-id {} --new-status ACTIVE --new-auto-registration-status ENABLE",
            registration.id
        );
    }
}
