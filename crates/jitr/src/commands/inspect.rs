//! `jitr inspect`: a certificate against the device profile and its CA's signature.

use anyhow::{bail, Context, Result};
use factory_ca::{certificates_from_pem_or_der, inspect_device_certificate, InspectOptions};
use time::OffsetDateTime;

use super::{print_json, Outcome};
use crate::cli::InspectArgs;

fn read_first_certificate(path: &std::path::Path) -> Result<Vec<u8>> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    match certificates_from_pem_or_der(&bytes) {
        Ok(mut certs) => Ok(certs.swap_remove(0)),
        Err(reason) => bail!("{}: {reason}", path.display()),
    }
}

pub(crate) fn inspect(args: InspectArgs) -> Result<Outcome> {
    let der = read_first_certificate(&args.file)?;
    let ca_der = args.ca.as_deref().map(read_first_certificate).transpose()?;
    let opts = InspectOptions {
        id_format: args.id_format,
        ca_der: ca_der.as_deref(),
        now: OffsetDateTime::now_utc(),
        max_validity_days: None,
    };
    let inspection = inspect_device_certificate(&der, &opts);
    if args.output.json {
        print_json(&inspection)?;
    } else {
        println!(
            "{}  certificate id {}",
            args.file.display(),
            inspection.certificate_id
        );
        for f in &inspection.findings {
            println!(
                "  {:<4}  {:<20} {}",
                if f.ok { "ok" } else { "FAIL" },
                f.check.to_string(),
                f.detail
            );
        }
        if ca_der.is_none() {
            println!("  (no --ca given: the signature was not checked)");
        }
    }
    Ok(if inspection.passed() {
        Outcome::Success
    } else {
        Outcome::Failed
    })
}
