use anyhow::{Context, Result};
use factory_ca::{certificate_id, CaInit, IssuingCa, Profile, Subject};
use time::OffsetDateTime;

use super::{print_json, Outcome};
use crate::cli::{CaInitArgs, VerificationCertArgs};
use crate::passphrase;

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
    let protection = passphrase::for_new_key(
        args.ca.passphrase_file.as_deref(),
        args.insecure_plaintext_key,
    )?;
    let init = CaInit {
        dir: args.ca.dir.clone(),
        root_subject: subject,
        root_key: args.key.unwrap_or(profile.root.key),
        root_days: args.days.unwrap_or(profile.root.days),
        issuing,
        protection,
    };
    let files = init.run(OffsetDateTime::now_utc())?;
    let ca_der = factory_ca::read_certificate(&files.ca_cert)?;
    let ca_id = certificate_id(&ca_der);
    if args.json {
        print_json(&serde_json::json!({
            "ca_cert": files.ca_cert,
            "ca_key": files.ca_key,
            "root_cert": files.root.as_ref().map(|r| &r.0),
            "root_key": files.root.as_ref().map(|r| &r.1),
            "ca_certificate_id": ca_id,
        }))?;
    } else {
        println!("CA certificate  {}", files.ca_cert.display());
        println!("CA key          {} (mode 0600)", files.ca_key.display());
        if let Some((cert, key)) = &files.root {
            println!("root certificate {}", cert.display());
            println!(
                "root key         {} (mode 0600): move it offline now",
                key.display()
            );
        }
        println!("certificate id  {ca_id} (the caCertificateId once registered in AWS IoT)");
        if args.insecure_plaintext_key {
            eprintln!("warning: the CA keys are NOT encrypted (--insecure-plaintext-key)");
        }
    }
    Ok(Outcome::Success)
}

pub(crate) fn verification_cert(args: VerificationCertArgs) -> Result<Outcome> {
    let ca = passphrase::load_ca(&args.ca.dir, args.ca.passphrase_file.as_deref())?;
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
