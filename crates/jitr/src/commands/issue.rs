//! `jitr issue` and `jitr sign-csr`: device certificates, and their delivery to balena.

use std::collections::{BTreeMap, HashSet};
use std::io::{BufRead, IsTerminal};
use std::path::Path;

use anyhow::{bail, Context, Result};
use factory_ca::{issue_batch, BatchOptions, CsrOptions, DeviceId, IdFormat};
use indicatif::{ProgressBar, ProgressStyle};
use time::OffsetDateTime;
use zeroize::Zeroizing;

use super::balena::Delivery;
use super::{print_json, Outcome};
use crate::cli::{AwsArgs, IssueArgs, LedgerArgs, SignCsrArgs};
use crate::regions::{AwsRegion, RegionMap};
use crate::UsageError;

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
    let region_map = args.region_of.as_deref().map(RegionMap::load).transpose()?;
    let ca = crate::keys::load_ca(&args.ca, Some(args.kms_rate))?;
    let device = &ca.profile().device;
    let ids = collect_ids(&args, args.id_format.unwrap_or(device.id_format))?;
    // Every device has a region, and every region its endpoint, before anything is issued.
    let endpoints = match &region_map {
        Some(map) => {
            let regions = map.regions_of(&ids)?;
            report_regions(map, &ids);
            if delivery.wanted() {
                data_endpoints(&regions, args.endpoint_url.as_deref())?
            } else {
                BTreeMap::new()
            }
        }
        None => BTreeMap::new(),
    };
    if let Some(bundle) = &args.bundle {
        return issue_bundle(&args, &ca, &ids, bundle, region_map.as_ref());
    }
    let opts = BatchOptions {
        out_dir: args.out.clone(),
        key: args.key.unwrap_or(device.key),
        days: validity_days(args.days, ca.profile())?,
        jobs: args.jobs,
        force: args.force,
        now: OffsetDateTime::now_utc(),
        rotation: None,
    };
    let bar = progress_bar(ids.len());
    let report = issue_batch(&ca, &ids, &opts, &|| bar.inc(1))?;
    bar.finish_and_clear();
    warn_if_capped(report.capped_at);

    if args.output.json {
        for entry in &report.issued {
            print_json(entry)?;
        }
    }
    report_issued(
        &report.failures,
        report.issued.len(),
        &args.out.display().to_string(),
        &args.out,
    );
    // In the ledger before the credentials reach a device: a device connects listed.
    let aws = issue_aws(&args);
    let recorded = record(
        &args.ledger,
        &aws,
        &report.issued,
        region_map.as_ref(),
        &args.out,
        opts.now,
    )?;
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
            let endpoint = region_map
                .as_ref()
                .and_then(|map| map.get(id.as_str()))
                .and_then(|region| endpoints.get(region))
                .map(String::as_str);
            devices.push(delivery.variables_at(id, &chain, Some(&key), endpoint));
        }
        delivered = delivery.deliver(&devices)?;
    }
    Ok(if report.failures.is_empty() && delivered && recorded {
        Outcome::Success
    } else {
        Outcome::Failed
    })
}

/// How many of the devices go to each region, on standard error.
fn report_regions(map: &RegionMap, ids: &[DeviceId]) {
    let mut counts: BTreeMap<&AwsRegion, usize> = BTreeMap::new();
    for region in ids.iter().filter_map(|id| map.get(id.as_str())) {
        *counts.entry(region).or_default() += 1;
    }
    let counts: Vec<String> = counts
        .iter()
        .map(|(region, n)| format!("{region} {n}"))
        .collect();
    eprintln!("devices per region: {}", counts.join(", "));
}

/// Each region's AWS IoT data endpoint (`iot:Data-ATS`), asked once per region.
fn data_endpoints(
    regions: &std::collections::BTreeSet<&AwsRegion>,
    endpoint_url: Option<&str>,
) -> Result<BTreeMap<AwsRegion, String>> {
    use activator::IotAdmin;
    crate::aws::runtime()?.block_on(async {
        let mut endpoints = BTreeMap::new();
        for region in regions {
            let aws = crate::cli::AwsArgs {
                region: Some(region.as_str().to_owned()),
                endpoint_url: endpoint_url.map(str::to_owned),
                timeout: None,
            };
            let registry = crate::aws::session(&aws).await?.registry();
            let deadline = activator::call_deadline(aws.deadline(activator::OPERATOR_CALL_TIME));
            let address = registry
                .describe_endpoint(super::endpoint::ENDPOINT_TYPE, deadline)
                .await
                .with_context(|| format!("the data endpoint of {region} (nothing was issued)"))?;
            eprintln!("data endpoint of {region}: {address}");
            endpoints.insert((*region).clone(), address);
        }
        anyhow::Ok(endpoints)
    })
}

/// `jitr issue --bundle FILE|-`: every device as a JSON line; a file appears whole, mode
/// 0600, only once every line is in it (written to a hidden sibling, synced, then linked into
/// place, so an existing bundle and its keys are never overwritten).
fn issue_bundle(
    args: &IssueArgs,
    ca: &factory_ca::Ca,
    ids: &[DeviceId],
    path: &Path,
    regions: Option<&RegionMap>,
) -> Result<Outcome> {
    let device = &ca.profile().device;
    let opts = factory_ca::BundleOptions {
        manifest_dir: args.out.clone(),
        key: args.key.unwrap_or(device.key),
        days: validity_days(args.days, ca.profile())?,
        jobs: args.jobs,
        force: args.force,
        now: OffsetDateTime::now_utc(),
    };
    let bar = progress_bar(ids.len());
    let report = if path == Path::new("-") {
        let mut out = std::io::BufWriter::with_capacity(1 << 20, std::io::stdout());
        factory_ca::issue_bundle(ca, ids, &opts, &mut out, &|| bar.inc(1))?
    } else {
        if path.exists() {
            bail!(
                "{} exists: refusing to overwrite a bundle (its keys would be lost)",
                path.display()
            );
        }
        let (mut file, tmp) = bundle_file(path)?;
        let durable = file.try_clone().context("cannot reopen the bundle")?;
        // The bundle is synced and linked into place before the manifest names its devices.
        let result =
            factory_ca::issue_bundle_then(ca, ids, &opts, &mut file, &|| bar.inc(1), &mut || {
                durable.sync_all()?;
                // A hard link fails if the name was taken meanwhile: nothing is overwritten. A
                // filesystem without hard links (FAT) gets a rename, the name checked first.
                match std::fs::hard_link(&tmp, path) {
                    Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists && !path.exists() => {
                        std::fs::rename(&tmp, path)
                    }
                    other => other,
                }
            })
            .map_err(anyhow::Error::from);
        let _ = std::fs::remove_file(&tmp);
        result?
    };
    bar.finish_and_clear();
    warn_if_capped(report.capped_at);
    let into = if path == Path::new("-") {
        "standard output".to_owned()
    } else {
        path.display().to_string()
    };
    report_issued(&report.failures, report.issued, &into, &args.out);
    let recorded = match &args.ledger.ledger {
        None => true,
        Some(_) => {
            let failed: HashSet<&str> = report.failures.iter().map(|f| f.id.as_str()).collect();
            let issued: HashSet<&str> = ids
                .iter()
                .map(DeviceId::as_str)
                .filter(|id| !failed.contains(id))
                .collect();
            let manifest = args.out.join(factory_ca::MANIFEST_FILE);
            let lines = crate::ledger::newest_entries(&manifest, &issued)?;
            record(
                &args.ledger,
                &issue_aws(args),
                &lines,
                regions,
                &args.out,
                opts.now,
            )?
        }
    };
    Ok(if report.failures.is_empty() && recorded {
        Outcome::Success
    } else {
        Outcome::Failed
    })
}

/// With `--ledger`: the issued certificates written to the ledger; `false` when some were not
/// (reported, with the command that writes them).
fn record(
    args: &LedgerArgs,
    aws: &AwsArgs,
    issued: &[factory_ca::ManifestEntry],
    regions: Option<&RegionMap>,
    out: &Path,
    now: OffsetDateTime,
) -> Result<bool> {
    let Some(table) = &args.ledger else {
        return Ok(true);
    };
    let batch = crate::ledger::batch_name(args, now);
    let at = factory_ca::show_time(now);
    let entries: Vec<_> = issued
        .iter()
        .map(|line| {
            let region = regions
                .and_then(|map| map.get(&line.id))
                .map(|r| r.as_str().to_owned());
            crate::ledger::entry(line, &batch, &at, region)
        })
        .collect();
    crate::ledger::write(table, aws, &entries, &out.join(factory_ca::MANIFEST_FILE))
}

/// The AWS settings of `issue`: the standard chain, with `--endpoint-url` on top.
fn issue_aws(args: &IssueArgs) -> AwsArgs {
    AwsArgs {
        endpoint_url: args.endpoint_url.clone(),
        ..AwsArgs::from_environment()
    }
}

/// Each failed device on its own line, then the one-line summary.
fn report_issued(failures: &[factory_ca::DeviceFailure], issued: usize, into: &str, out: &Path) {
    for failure in failures {
        eprintln!(
            "jitr: {}: {}",
            failure.id,
            activator::error_chain(&failure.error)
        );
    }
    eprintln!(
        "issued {issued} device certificate(s) into {into} (manifest {}){}",
        out.join(factory_ca::MANIFEST_FILE).display(),
        if failures.is_empty() {
            String::new()
        } else {
            format!(", {} failed", failures.len())
        }
    );
}

/// A new hidden sibling of `path`, mode 0600, for the bundle to be written into.
fn bundle_file(path: &Path) -> Result<(std::fs::File, std::path::PathBuf)> {
    use std::os::unix::fs::OpenOptionsExt;
    let name = path
        .file_name()
        .with_context(|| format!("{} is not a file name", path.display()))?;
    let tmp = path.with_file_name(format!(
        ".{}.{}.partial",
        name.to_string_lossy(),
        std::process::id()
    ));
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("cannot create {}", tmp.display()))?;
    Ok((file, tmp))
}

/// `--days` (else the profile's), refused (exit 2) past the profile's maximum.
fn validity_days(days: Option<u32>, profile: &factory_ca::Profile) -> Result<u32> {
    let days = days.unwrap_or(profile.device.days);
    if days > profile.device.max_days {
        return Err(UsageError(format!(
            "--days {days} is longer than the profile's maximum device validity of {} days ([device] max_days in profile.toml)",
            profile.device.max_days
        ))
        .into());
    }
    Ok(days)
}

/// Says when a device's validity was cut to its CA's own notAfter.
fn warn_if_capped(capped_at: Option<time::OffsetDateTime>) {
    if let Some(at) = capped_at {
        eprintln!(
            "warning: the validity asked for outlives the CA: device certificates end with it, at {}",
            factory_ca::show_time(at)
        );
    }
}

pub(crate) fn sign_csr(args: SignCsrArgs) -> Result<Outcome> {
    let delivery = Delivery::from_args(&args.balena)?;
    let ca = crate::keys::load_ca(&args.ca, None)?;
    let csr =
        std::fs::read(&args.csr).with_context(|| format!("cannot read {}", args.csr.display()))?;
    let days = validity_days(args.days, ca.profile())?;
    let expect_id = args
        .expect_id
        .as_deref()
        .map(|id| DeviceId::parse(id, IdFormat::Any))
        .transpose()?;
    // Every signing is in the manifest, whether the chain goes to --out or devices/<id>/.
    let issued = ca
        .sign_csr_recorded(
            &csr,
            &CsrOptions {
                devices: &args.devices,
                write_folder: args.out.is_none(),
                days,
                force: args.force,
                expect_id: expect_id.as_ref(),
                now: OffsetDateTime::now_utc(),
            },
        )
        .with_context(|| args.csr.display().to_string())?;
    warn_if_capped(issued.capped_at);
    let recorded = record(
        &args.ledger,
        &AwsArgs::from_environment(),
        std::slice::from_ref(&issued.entry),
        None,
        &args.devices,
        OffsetDateTime::now_utc(),
    )?;
    if let Some(out) = &args.out {
        factory_ca::write_file_atomic(out, issued.chain_pem.as_bytes(), 0o644, true)?;
    }
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
        // The device kept its key: the chain, the endpoint and the topic are delivered.
        eprintln!(
            "delivering AWS_CERT, AWS_DATA_ENDPOINT and CLOUD_CONSUMER_TOPIC: the device must \
             provide AWS_PRIVATE_KEY (base64 of its key's PEM) itself, or cloud-relay will not start"
        );
        let devices = [delivery.variables(&id, &issued.chain_pem, None)];
        if !delivery.deliver(&devices)? {
            return Ok(Outcome::Failed);
        }
    }
    Ok(if recorded {
        Outcome::Success
    } else {
        Outcome::Failed
    })
}
