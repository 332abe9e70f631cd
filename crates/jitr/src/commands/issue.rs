//! `jitr issue` and `jitr sign-csr`: device certificates, and their delivery to balena.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Read;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use factory_ca::{
    issue_batch_with, BatchOptions, CsrOptions, DeviceId, IdFormat, RunControl, Stage, Timings,
};
use time::OffsetDateTime;

use super::balena::Delivery;
use super::{print_json, Outcome};
use crate::cli::{AwsArgs, IssueArgs, LedgerArgs, SignCsrArgs, TimingsFormat};
use crate::regions::{AwsRegion, RegionMap};
use crate::UsageError;

/// Batches smaller than this finish before a progress bar would be worth drawing.
const PROGRESS_THRESHOLD: usize = 200;

/// Bad or repeated ids shown, each at its FILE:LINE, before the run is refused.
const SHOWN_PROBLEMS: usize = 20;

/// The ids of a run, each with where it came from.
struct IdList {
    ids: Vec<DeviceId>,
    /// For each id, its line in the `--ids` file (0: given with `--id`).
    lines: Vec<usize>,
    /// The `--ids` file as messages name it.
    file: String,
}

impl IdList {
    /// Where the id at `index` came from: `FILE:LINE`, or `--id`.
    fn origin(&self, index: usize) -> String {
        match self.lines[index] {
            0 => "--id".to_owned(),
            line => format!("{}:{line}", self.file),
        }
    }

    /// Where `id` came from.
    fn origin_of(&self, id: &str) -> Option<String> {
        let index = self.ids.iter().position(|d| d.as_str() == id)?;
        Some(self.origin(index))
    }
}

/// Reads ids from `--id` values and the `--ids` file, validating each; every bad or repeated
/// id is reported at its FILE:LINE (the first [`SHOWN_PROBLEMS`] of them) and nothing is issued.
fn collect_ids(args: &IssueArgs, format: IdFormat) -> Result<IdList> {
    let file = args
        .ids
        .as_deref()
        .map_or_else(String::new, |p| p.display().to_string());
    let mut list = IdList {
        ids: Vec::new(),
        lines: Vec::new(),
        file,
    };
    let mut problems = 0usize;
    let mut problem = |origin: String, message: String| {
        if problems < SHOWN_PROBLEMS {
            eprintln!("jitr: {origin}: {message}");
        }
        problems += 1;
    };
    let mut first_seen: std::collections::HashMap<String, String> = Default::default();
    let mut add =
        |list: &mut IdList, text: &str, line: usize, problem: &mut dyn FnMut(String, String)| {
            let origin = if line == 0 {
                "--id".to_owned()
            } else {
                format!("{}:{line}", list.file)
            };
            match DeviceId::parse(text, format) {
                Ok(id) => {
                    if let Some(first) = first_seen.get(id.as_str()) {
                        problem(
                            origin,
                            format!("device {id} appears again (first at {first})"),
                        );
                    } else {
                        first_seen.insert(id.as_str().to_owned(), origin);
                        list.ids.push(id);
                        list.lines.push(line);
                    }
                }
                Err(e) => problem(origin, e.to_string()),
            }
        };
    for id in &args.id {
        add(&mut list, id, 0, &mut problem);
    }
    if let Some(path) = &args.ids {
        let text = read_ids_file(path)?;
        // A byte-order mark (Windows editors) is not part of the first id.
        let text = text.strip_prefix("\u{feff}".as_bytes()).unwrap_or(&text);
        for (n, line) in text.split(|&b| b == b'\n').enumerate() {
            let line = String::from_utf8_lossy(line);
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            add(&mut list, line, n + 1, &mut problem);
        }
    }
    if problems > 0 {
        let shown = if problems > SHOWN_PROBLEMS {
            format!(" (the first {SHOWN_PROBLEMS} above)")
        } else {
            " (above)".to_owned()
        };
        return Err(UsageError(format!(
            "{problems} bad or repeated device id(s){shown}: nothing was issued"
        ))
        .into());
    }
    if list.ids.is_empty() {
        bail!("no device ids given");
    }
    Ok(list)
}

/// The `--ids` file's bytes (`-`: standard input).
fn read_ids_file(path: &Path) -> Result<Vec<u8>> {
    if path == Path::new("-") {
        let mut text = Vec::new();
        std::io::stdin()
            .lock()
            .read_to_end(&mut text)
            .context("cannot read the ids from standard input")?;
        return Ok(text);
    }
    std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))
}

/// An issuance error naming a device, with the FILE:LINE the device came from.
fn locate(error: factory_ca::Error, list: &IdList) -> anyhow::Error {
    let origin = match &error {
        factory_ca::Error::AlreadyIssued { id, .. } | factory_ca::Error::DuplicateInput { id } => {
            list.origin_of(id)
        }
        _ => None,
    };
    match origin {
        Some(origin) => anyhow::Error::new(error).context(origin),
        None => error.into(),
    }
}

/// Ctrl-C (or SIGTERM) during issuance: the returned flag is set, and the workers start no
/// new device; a second one ends the process at once (exit 130).
fn stop_on_interrupt() -> Arc<AtomicBool> {
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        // Registered first, so it sees the flag as the previous signal left it.
        let _ = signal_hook::flag::register_conditional_shutdown(signal, 130, Arc::clone(&stop));
        let _ = signal_hook::flag::register(signal, Arc::clone(&stop));
    }
    stop
}

/// After issuance, Ctrl-C ends the process again (through the conditional shutdown above).
fn interrupt_ends(stop: &AtomicBool) {
    stop.store(true, Ordering::Relaxed);
}

/// Wall times of the run's own stages, beside the workers' per-device [`Timings`].
#[derive(Debug, Default)]
struct RunTimes {
    read_ids: Duration,
    unlock: Duration,
    issue: Duration,
    workers: usize,
}

/// What `--timings` and `--json` print about a run.
struct Summary<'a> {
    issued: usize,
    failed: usize,
    skipped: usize,
    stopped: bool,
    times: &'a RunTimes,
    timings: &'a Timings,
}

impl Summary<'_> {
    fn json(&self) -> serde_json::Value {
        let stages: serde_json::Map<String, serde_json::Value> = Stage::ALL
            .iter()
            .map(|&stage| {
                (
                    stage.name().to_owned(),
                    serde_json::json!(self.timings.get(stage).as_secs_f64()),
                )
            })
            .collect();
        serde_json::json!({
            "issued": self.issued,
            "failed": self.failed,
            "skipped": self.skipped,
            "stopped": self.stopped,
            "workers": self.times.workers,
            "devices_per_second": self.rate(),
            "seconds": {
                "read_ids": self.times.read_ids.as_secs_f64(),
                "unlock": self.times.unlock.as_secs_f64(),
                "issue": self.times.issue.as_secs_f64(),
            },
            "worker_seconds": stages,
        })
    }

    fn rate(&self) -> f64 {
        let seconds = self.times.issue.as_secs_f64();
        if seconds > 0.0 {
            self.issued as f64 / seconds
        } else {
            0.0
        }
    }

    /// The breakdown for a person, on standard error.
    fn print(&self, format: TimingsFormat) {
        if format == TimingsFormat::Json {
            eprintln!("{}", self.json());
            return;
        }
        let t = self.times;
        eprintln!(
            "timings: {} device(s) in {:.2} s = {:.0}/s on {} worker(s); read ids {:.2} s, unlock CA key {:.2} s",
            self.issued,
            t.issue.as_secs_f64(),
            self.rate(),
            t.workers,
            t.read_ids.as_secs_f64(),
            t.unlock.as_secs_f64(),
        );
        let total: f64 = Stage::ALL
            .iter()
            .map(|&s| self.timings.get(s).as_secs_f64())
            .sum();
        let per_device = |seconds: f64| {
            if self.issued > 0 {
                1e6 * seconds / self.issued as f64
            } else {
                0.0
            }
        };
        for stage in Stage::ALL {
            let seconds = self.timings.get(stage).as_secs_f64();
            eprintln!(
                "  {:<9} {:>8.2} s worker time  {:>5.1}%  {:>7.1} µs/device",
                stage.name(),
                seconds,
                if total > 0.0 {
                    100.0 * seconds / total
                } else {
                    0.0
                },
                per_device(seconds)
            );
        }
    }
}

pub(crate) fn issue(args: IssueArgs) -> Result<Outcome> {
    let delivery = Delivery::from_args(&args.balena)?;
    if args.output.json && args.bundle.as_deref() == Some(Path::new("-")) {
        return Err(UsageError(
            "--json prints a summary on standard output, where --bundle - writes the bundle: name a bundle file".to_owned(),
        )
        .into());
    }
    let region_map = args.region_of.as_deref().map(RegionMap::load).transpose()?;
    let mut times = RunTimes::default();
    let clock = Instant::now();
    let ca = crate::keys::load_ca(&args.ca, Some(args.kms_rate))?;
    times.unlock = clock.elapsed();
    let device = &ca.profile().device;
    let clock = Instant::now();
    let list = collect_ids(&args, args.id_format.unwrap_or(device.id_format))?;
    times.read_ids = clock.elapsed();
    let ids = &list.ids;
    // Every device has a region, and every region its endpoint, before anything is issued.
    let endpoints = match &region_map {
        Some(map) => endpoints(map, ids, &delivery, &args)?,
        None => BTreeMap::new(),
    };
    if let Some(bundle) = &args.bundle {
        return issue_bundle(&args, &ca, &list, bundle, region_map.as_ref(), times);
    }
    let (report, now) = issue_folders(&args, &ca, &list, times, delivery.wanted())?;
    // In the ledger before the credentials reach a device: a device connects listed.
    let aws = issue_aws(&args);
    let recorded = record(
        &args.ledger,
        &aws,
        &report.issued,
        region_map.as_ref(),
        &args.out,
        now,
    )?;
    let delivered = if delivery.wanted() {
        let endpoint_of = |id: &DeviceId| {
            let region = region_map.as_ref().and_then(|map| map.get(id.as_str()))?;
            endpoints.get(region).map(String::as_str)
        };
        deliver_issued(&delivery, ids, &report.handed_over, &endpoint_of)?
    } else {
        true
    };
    Ok(
        if report.failures.is_empty() && !report.stopped && delivered && recorded {
            Outcome::Success
        } else {
            Outcome::Failed
        },
    )
}

/// Issuance into one folder per device (the default, without `--bundle`), Ctrl-C finishing
/// the devices in flight; the report and the issuance time.
fn issue_folders(
    args: &IssueArgs,
    ca: &factory_ca::Ca,
    list: &IdList,
    mut times: RunTimes,
    hand_over: bool,
) -> Result<(factory_ca::BatchReport, OffsetDateTime)> {
    let device = &ca.profile().device;
    let ids = &list.ids;
    let opts = BatchOptions {
        out_dir: args.out.clone(),
        key: args.key.unwrap_or(device.key),
        days: validity_days(args.days, ca)?,
        jobs: args.jobs,
        force: args.force,
        now: OffsetDateTime::now_utc(),
        rotation: None,
    };
    let control = RunControl {
        stop: stop_on_interrupt(),
        skip_issued: args.resume,
        hand_over,
        ..RunControl::default()
    };
    times.workers = ca.workers(args.jobs);
    let bar = crate::progress::bar(ids.len(), "devices", PROGRESS_THRESHOLD);
    let clock = Instant::now();
    let report = issue_batch_with(ca, ids, &opts, &control, &|| bar.inc(1));
    times.issue = clock.elapsed();
    interrupt_ends(&control.stop);
    let report = report.map_err(|e| locate(e, list))?;
    bar.finish_and_clear();
    report_repaired(report.repaired, &args.out);
    let summary = Summary {
        issued: report.issued.len(),
        failed: report.failures.len(),
        skipped: report.skipped,
        stopped: report.stopped,
        times: &times,
        timings: &control.timings,
    };
    if let Some(format) = args.timings {
        summary.print(format);
    }

    if args.output.json {
        for entry in &report.issued {
            print_json(entry)?;
        }
    }
    report_issued(
        &report.failures,
        &summary,
        &args.out.display().to_string(),
        &args.out,
        false,
    );
    Ok((report, opts.now))
}

/// Each region's data endpoint, where delivery needs them; the devices per region reported.
/// Every device has a region, and every region its endpoint, before anything is issued.
fn endpoints(
    map: &RegionMap,
    ids: &[DeviceId],
    delivery: &Delivery,
    args: &IssueArgs,
) -> Result<BTreeMap<AwsRegion, String>> {
    let regions = map.regions_of(ids)?;
    report_regions(map, ids);
    if !delivery.wanted() {
        return Ok(BTreeMap::new());
    }
    data_endpoints(&regions, args.endpoint_url.as_deref())
}

/// The devices just issued, delivered from memory in the order of `ids`; `Ok(false)` when a
/// device failed.
fn deliver_issued<'a>(
    delivery: &Delivery,
    ids: &'a [DeviceId],
    issued: &[factory_ca::IssuedDevice],
    endpoint_of: &dyn Fn(&DeviceId) -> Option<&'a str>,
) -> Result<bool> {
    let by_id: HashMap<&str, &factory_ca::IssuedDevice> =
        issued.iter().map(|d| (d.entry.id.as_str(), d)).collect();
    let devices: Vec<_> = ids
        .iter()
        .filter_map(|id| by_id.get(id.as_str()).map(|device| (id, device)))
        .map(|(id, device)| {
            let key = device.key_pem.as_deref().map(String::as_str);
            delivery.variables_at(id, &device.chain_pem, key, endpoint_of(id))
        })
        .collect();
    delivery.deliver(&devices)
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
    use iot::IotAdmin;
    crate::aws::runtime()?.block_on(async {
        let mut endpoints = BTreeMap::new();
        for region in regions {
            let aws = crate::cli::AwsArgs {
                region: Some(region.as_str().to_owned()),
                endpoint_url: endpoint_url.map(str::to_owned),
                timeout: None,
            };
            let registry = crate::aws::session(&aws).await?.registry();
            let deadline = iot::call_deadline(aws.deadline(iot::OPERATOR_CALL_TIME));
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
    list: &IdList,
    path: &Path,
    regions: Option<&RegionMap>,
    mut times: RunTimes,
) -> Result<Outcome> {
    let ids = &list.ids;
    let device = &ca.profile().device;
    let opts = factory_ca::BundleOptions {
        manifest_dir: args.out.clone(),
        key: args.key.unwrap_or(device.key),
        days: validity_days(args.days, ca)?,
        jobs: args.jobs,
        force: args.force,
        now: OffsetDateTime::now_utc(),
    };
    let control = RunControl {
        stop: stop_on_interrupt(),
        skip_issued: args.resume,
        ..RunControl::default()
    };
    times.workers = ca.workers(args.jobs);
    let bar = crate::progress::bar(ids.len(), "devices", PROGRESS_THRESHOLD);
    let clock = Instant::now();
    let report = if path == Path::new("-") {
        let mut out = std::io::BufWriter::with_capacity(1 << 20, std::io::stdout());
        let sinks = factory_ca::BundleSinks {
            out: &mut out,
            commit: &mut || Ok(()),
            undo: &mut || {},
        };
        factory_ca::issue_bundle_with(ca, ids, &opts, &control, sinks, &|| bar.inc(1))
    } else {
        to_file(ca, ids, &opts, &control, path, args.resume, &bar)?
    };
    times.issue = clock.elapsed();
    interrupt_ends(&control.stop);
    let report = report.map_err(|e| locate(e, list))?;
    bar.finish_and_clear();
    report_repaired(report.repaired, &args.out);
    let into = if path == Path::new("-") {
        "standard output".to_owned()
    } else {
        path.display().to_string()
    };
    let summary = Summary {
        issued: report.issued,
        failed: report.failures.len(),
        skipped: report.skipped,
        stopped: report.stopped,
        times: &times,
        timings: &control.timings,
    };
    if let Some(format) = args.timings {
        summary.print(format);
    }
    if args.output.json {
        println!("{}", summary.json());
    }
    report_issued(
        &report.failures,
        &summary,
        &into,
        &args.out,
        path != Path::new("-"),
    );
    let recorded = record_bundle(args, ids, &report.failures, regions, opts.now)?;
    Ok(
        if report.failures.is_empty() && !report.stopped && recorded {
            Outcome::Success
        } else {
            Outcome::Failed
        },
    )
}

/// The bundle's devices in the ledger (`--ledger`), read back from the manifest's newest
/// lines: every device asked for but those that failed. `true` when there is no ledger.
fn record_bundle(
    args: &IssueArgs,
    ids: &[DeviceId],
    failures: &[factory_ca::DeviceFailure],
    regions: Option<&RegionMap>,
    now: OffsetDateTime,
) -> Result<bool> {
    if args.ledger.ledger.is_none() {
        return Ok(true);
    }
    let failed: HashSet<&str> = failures.iter().map(|f| f.id.as_str()).collect();
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
        now,
    )
}

/// Issuance into the bundle file `path`, which must not exist: written under a temporary name,
/// synced and linked into place before the manifest names its devices, and removed if the
/// manifest could not record them. The outer error is the file's, the inner the issuance's.
fn to_file(
    ca: &factory_ca::Ca,
    ids: &[DeviceId],
    opts: &factory_ca::BundleOptions,
    control: &RunControl,
    path: &Path,
    resume: bool,
    bar: &indicatif::ProgressBar,
) -> Result<Result<factory_ca::BundleReport, factory_ca::Error>> {
    if path.exists() {
        let hint = if resume {
            ": it holds the devices issued before; give --resume a new --bundle file for the rest"
        } else {
            ": refusing to overwrite a bundle (its keys would be lost)"
        };
        bail!("{} exists{hint}", path.display());
    }
    remove_stale_partials(path);
    let (mut file, tmp) = bundle_file(path)?;
    let durable = file.try_clone().context("cannot reopen the bundle")?;
    let mut linked = false;
    // The bundle is synced and linked into place before the manifest names its devices.
    let mut commit = || {
        durable.sync_all()?;
        // A hard link fails if the name was taken meanwhile: nothing is overwritten. A
        // filesystem without hard links (FAT) gets a rename, the name checked first.
        match std::fs::hard_link(&tmp, path) {
            Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists && !path.exists() => {
                std::fs::rename(&tmp, path)
            }
            other => other,
        }?;
        linked = true;
        Ok(())
    };
    // The manifest could not record the devices: their bundle goes too.
    let mut undo = || {
        let _ = std::fs::remove_file(path);
    };
    let sinks = factory_ca::BundleSinks {
        out: &mut file,
        commit: &mut commit,
        undo: &mut undo,
    };
    let result = factory_ca::issue_bundle_with(ca, ids, opts, control, sinks, &|| {
        bar.inc(1);
    });
    let _ = std::fs::remove_file(&tmp);
    Ok(result)
}

/// Hidden `.<name>.<pid>.partial` siblings of `path` left by runs that died (their process is
/// gone): never linked into place, so no device of theirs is recorded.
fn remove_stale_partials(path: &Path) {
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
        return;
    };
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    let prefix = format!(".{}.", name.to_string_lossy());
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let file = entry.file_name();
        let file = file.to_string_lossy();
        let pid = file
            .strip_prefix(&prefix)
            .and_then(|rest| rest.strip_suffix(".partial"));
        if let Some(pid) = pid.filter(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit())) {
            if !Path::new("/proc").join(pid).exists() {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }
}

/// Says that a cut-off last manifest line was removed (`--resume`).
fn report_repaired(line: Option<usize>, out: &Path) {
    if let Some(line) = line {
        eprintln!(
            "repaired {}: removed its cut-off last line {line} (that device is issued again)",
            out.join(factory_ca::MANIFEST_FILE).display()
        );
    }
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

/// Each failed device on its own line, then the one-line summary (with how to go on after a
/// stop).
fn report_issued(
    failures: &[factory_ca::DeviceFailure],
    summary: &Summary<'_>,
    into: &str,
    out: &Path,
    bundle_file: bool,
) {
    for failure in failures {
        eprintln!("jitr: {}: {}", failure.id, iot::error_chain(&failure.error));
    }
    let mut notes = String::new();
    if summary.skipped > 0 {
        notes.push_str(&format!(", {} already issued skipped", summary.skipped));
    }
    if !failures.is_empty() {
        notes.push_str(&format!(", {} failed", failures.len()));
    }
    let stopped = if summary.stopped { "interrupted: " } else { "" };
    eprintln!(
        "{stopped}issued {} device certificate(s) into {into} (manifest {}){notes}",
        summary.issued,
        out.join(factory_ca::MANIFEST_FILE).display(),
    );
    if summary.stopped {
        eprintln!(
            "the rest were not started: run the same command with --resume to issue them (each id once){}",
            if bundle_file {
                ", into a new --bundle file"
            } else {
                ""
            }
        );
    }
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

/// `--days` (else the profile's), refused (exit 2) past the profile's maximum. A device never
/// outlives its CA: the profile's default is "as long as the CA lasts, at most that", so it is
/// cut to the CA's end without a word; an explicit `--days` that outlives the CA is said
/// before anything is issued, not after the work.
pub(crate) fn validity_days(days: Option<u32>, ca: &factory_ca::Ca) -> Result<u32> {
    let profile = ca.profile();
    let explicit = days.is_some();
    let days = days.unwrap_or(profile.device.days);
    if days > profile.device.max_days {
        return Err(UsageError(format!(
            "--days {days} is longer than the profile's maximum device validity of {} days ([device] max_days in profile.toml)",
            profile.device.max_days
        ))
        .into());
    }
    let ends = OffsetDateTime::now_utc().checked_add(time::Duration::days(i64::from(days)));
    if explicit && ends.is_none_or(|ends| ends > ca.not_after()) {
        eprintln!(
            "warning: --days {days} outlives the CA: device certificates end with it, at {}",
            factory_ca::show_time(ca.not_after())
        );
    }
    Ok(days)
}

pub(crate) fn sign_csr(args: SignCsrArgs) -> Result<Outcome> {
    let delivery = Delivery::from_args(&args.balena)?;
    let ca = crate::keys::load_ca(&args.ca, None)?;
    let csr =
        std::fs::read(&args.csr).with_context(|| format!("cannot read {}", args.csr.display()))?;
    let days = validity_days(args.days, &ca)?;
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
