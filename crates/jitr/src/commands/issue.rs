//! `jitr issue` and `jitr sign-csr`: device certificates, and their delivery to balena.

use std::collections::HashSet;
use std::io::{BufRead, IsTerminal};
use std::path::Path;

use anyhow::{bail, Context, Result};
use factory_ca::{issue_batch, BatchOptions, DeviceId, IdFormat};
use indicatif::{ProgressBar, ProgressStyle};
use time::OffsetDateTime;
use zeroize::Zeroizing;

use super::balena::Delivery;
use super::{print_json, Outcome};
use crate::cli::{IssueArgs, SignCsrArgs};
use crate::passphrase;

/// Batches smaller than this finish before a progress bar would be worth drawing.
const PROGRESS_THRESHOLD: usize = 200;

/// Reads ids from `--id` values and the `--ids` file, validating each.
fn collect_ids(args: &IssueArgs, format: IdFormat) -> Result<Vec<DeviceId>> {
    let mut ids = Vec::new();
    for id in &args.id {
        ids.push(DeviceId::parse(id, format)?);
    }
    if let Some(path) = &args.ids {
        let reader: Box<dyn BufRead> = if path == Path::new("-") {
            Box::new(std::io::stdin().lock())
        } else {
            let file = std::fs::File::open(path)
                .with_context(|| format!("cannot read {}", path.display()))?;
            Box::new(std::io::BufReader::new(file))
        };
        for (n, line) in reader.lines().enumerate() {
            let line = line.with_context(|| format!("cannot read {}", path.display()))?;
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let id = DeviceId::parse(line, format)
                .with_context(|| format!("{}:{}", path.display(), n + 1))?;
            ids.push(id);
        }
    }
    if ids.is_empty() {
        bail!("no device ids given");
    }
    Ok(ids)
}

fn progress_bar(len: usize) -> ProgressBar {
    if len < PROGRESS_THRESHOLD || !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(len as u64);
    if let Ok(style) =
        ProgressStyle::with_template("{bar:40} {pos}/{len} devices  {per_sec}  eta {eta}")
    {
        bar.set_style(style);
    }
    bar
}

pub(crate) fn issue(args: IssueArgs) -> Result<Outcome> {
    let delivery = Delivery::from_args(&args.balena)?;
    let ca = passphrase::load_ca(&args.ca.dir, args.ca.passphrase_file.as_deref())?;
    let device = &ca.profile().device;
    let ids = collect_ids(&args, args.id_format.unwrap_or(device.id_format))?;
    let opts = BatchOptions {
        out_dir: args.out.clone(),
        key: args.key.unwrap_or(device.key),
        days: args.days.unwrap_or(device.days),
        jobs: args.jobs,
        force: args.force,
        now: OffsetDateTime::now_utc(),
    };
    let bar = progress_bar(ids.len());
    let report = issue_batch(&ca, &ids, &opts, &|| bar.inc(1))?;
    bar.finish_and_clear();

    if args.output.json {
        for entry in &report.issued {
            print_json(entry)?;
        }
    }
    for failure in &report.failures {
        eprintln!(
            "jitr: {}: {}",
            failure.id,
            activator::error_chain(&failure.error)
        );
    }
    eprintln!(
        "issued {} device certificate(s) into {} (manifest {}){}",
        report.issued.len(),
        args.out.display(),
        args.out.join(factory_ca::MANIFEST_FILE).display(),
        if report.failures.is_empty() {
            String::new()
        } else {
            format!(", {} failed", report.failures.len())
        }
    );
    let mut delivered = true;
    if delivery.wanted() {
        let issued: HashSet<&str> = report.issued.iter().map(|e| e.id.as_str()).collect();
        let mut devices = Vec::with_capacity(issued.len());
        for id in ids.iter().filter(|id| issued.contains(id.as_str())) {
            let dir = args.out.join(id.as_str());
            let read = |name: &str| {
                let path = dir.join(name);
                std::fs::read_to_string(&path)
                    .map(Zeroizing::new)
                    .with_context(|| format!("cannot read {}", path.display()))
            };
            let (chain, key) = (read("chain.pem")?, read("device.key")?);
            devices.push(delivery.variables(id, &chain, Some(&key)));
        }
        delivered = delivery.deliver(&devices)?;
    }
    Ok(if report.failures.is_empty() && delivered {
        Outcome::Success
    } else {
        Outcome::Failed
    })
}

pub(crate) fn sign_csr(args: SignCsrArgs) -> Result<Outcome> {
    let delivery = Delivery::from_args(&args.balena)?;
    let ca = passphrase::load_ca(&args.ca.dir, args.ca.passphrase_file.as_deref())?;
    let csr =
        std::fs::read(&args.csr).with_context(|| format!("cannot read {}", args.csr.display()))?;
    let days = args.days.unwrap_or(ca.profile().device.days);
    let now = OffsetDateTime::now_utc();
    let issued = match &args.out {
        Some(out) => {
            let issued = ca
                .sign_csr(&csr, days, now)
                .with_context(|| args.csr.display().to_string())?;
            std::fs::write(out, &issued.chain_pem)
                .with_context(|| format!("cannot write {}", out.display()))?;
            issued
        }
        None => ca
            .sign_csr_into(&csr, &args.devices, days, args.force, now)
            .with_context(|| args.csr.display().to_string())?,
    };
    if args.output.json {
        print_json(&issued.entry)?;
    } else {
        let place = match &args.out {
            Some(out) => out.display().to_string(),
            None => args.devices.join(&issued.entry.id).display().to_string(),
        };
        eprintln!(
            "signed {} (certificate id {}) into {place}",
            issued.entry.id, issued.entry.certificate_id
        );
    }
    if delivery.wanted() {
        // The CSR's CN was validated as a device id when it was signed.
        let id = DeviceId::parse(&issued.entry.id, IdFormat::Any)?;
        // The device kept its key: only the chain (and endpoint) are delivered.
        let devices = [delivery.variables(&id, &issued.chain_pem, None)];
        if !delivery.deliver(&devices)? {
            return Ok(Outcome::Failed);
        }
    }
    Ok(Outcome::Success)
}
