//! `jitr register --manifest F [--status ACTIVE|PENDING_ACTIVATION] [--fleet-check]`: the
//! certificates `jitr issue` made, registered in AWS IoT under their CA without waiting for the
//! devices' first connect, paced at AWS IoT's default rates (`operations::register`).
//!
//! Resumable: what AWS IoT has is read first (one listing of the CA), so a rerun skips what is
//! done. An ACTIVE registration goes INACTIVE first and ACTIVE last; a journal beside the
//! manifest (`register-journal.jsonl`) records, before the first write, that the certificate is
//! ours to finish, and after the last that it is done. A rerun finishes only the INACTIVE
//! certificates the journal says it left so: any other INACTIVE one may be an operator's
//! deactivation, which is never undone.

use std::collections::{HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use factory_ca::{DeviceId, IdFormat};
use futures::stream::{self, StreamExt};
use indicatif::ProgressBar;
use iot::{call_deadline, error_chain, CertificateId, CertificateStatus, ThingSpec};
use operations::register::Placement;
use operations::register::{self as bulk, Paces, Plan, RegisterRates, Wanted};
use serde::{Deserialize, Serialize};

use super::{print_json, Outcome};
use crate::cli::RegisterArgs;
use crate::UsageError;

/// The journal's name, in the manifest's folder.
const JOURNAL_FILE: &str = "register-journal.jsonl";
/// The device certificate `jitr issue` writes into each device's folder.
const CERT_FILE: &str = factory_ca::DEVICE_CERT_FILE;
/// Time allowed beyond the quota-bound time for the whole run, unless `--timeout`.
const SLACK: Duration = Duration::from_secs(600);

/// What happened to one device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
enum Done {
    /// Registered now (with ACTIVE: provisioned and activated).
    Registered,
    /// An earlier run's unfinished registration, finished now.
    Resumed,
    /// Registered already with the status asked for.
    Skipped,
    /// Registered with another status, or the device has another live certificate: untouched.
    Left,
    /// Not an active member of the fleet (`--fleet-check`): not registered.
    NotMember,
    /// Could not be registered; a rerun tries again.
    Failed,
}

/// One device's line.
#[derive(Debug, Serialize)]
struct Row {
    device_id: String,
    certificate_id: String,
    outcome: Done,
    /// The certificate's status in AWS IoT as far as known.
    status: Option<String>,
    reason: String,
}

/// A journal line: `inactive` before the certificate is registered INACTIVE, `active` once it
/// was activated.
#[derive(Debug, Serialize, Deserialize)]
struct JournalLine {
    certificate_id: String,
    step: String,
}

/// The append-only journal of ACTIVE registrations in progress.
struct Journal {
    file: Mutex<File>,
}

impl Journal {
    /// Opens `path` for appending; the certificates it leaves unfinished.
    fn open(path: &Path) -> Result<(Journal, HashSet<String>)> {
        let mut unfinished = HashSet::new();
        match std::fs::read_to_string(path) {
            Ok(text) => {
                // A torn last line (a crash mid-write) is ignored: its step did not happen yet.
                for line in text.lines() {
                    if let Ok(entry) = serde_json::from_str::<JournalLine>(line) {
                        if entry.step == "inactive" {
                            unfinished.insert(entry.certificate_id);
                        } else {
                            unfinished.remove(&entry.certificate_id);
                        }
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("cannot write {}", path.display()))?;
        Ok((
            Journal {
                file: Mutex::new(file),
            },
            unfinished,
        ))
    }

    /// Appends one line; `sync` puts it on disk before anything else happens (write-ahead).
    fn record(&self, id: &CertificateId, step: &str, sync: bool) -> std::io::Result<()> {
        let mut line = serde_json::to_string(&JournalLine {
            certificate_id: id.to_string(),
            step: step.to_owned(),
        })?;
        line.push('\n');
        let mut file = self
            .file
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        file.write_all(line.as_bytes())?;
        if sync {
            file.sync_data()?;
        }
        Ok(())
    }
}

/// A manifest device whose certificate was found and matches its line.
struct Device {
    id: DeviceId,
    certificate_id: CertificateId,
    pem: String,
}

pub(crate) fn register(args: RegisterArgs) -> Result<Outcome> {
    let started = Instant::now();
    let (ca_pem, ca_der) = super::ca::read_ca_pem(&args.dir)?;
    let ca_id = CertificateId::parse(&factory_ca::certificate_id(&ca_der))
        .map_err(|reason| anyhow::anyhow!("{}: {reason}", args.dir.display()))?;
    let fleet = checked_fleet(&args)?;
    let fleet_label = fleet
        .as_ref()
        .map(|f| f.id().get())
        .or(args.thing.fleet_id)
        .map(|id| {
            activator::ownership::fleet_attribute(activator::ownership::FleetMark::Balena(id))
        });
    let manifest = Manifest::read(&args.manifest)?;
    let mut rows = manifest.unreadable;
    let (journal, unfinished) = Journal::open(&manifest.folder.join(JOURNAL_FILE))?;
    let rates = RegisterRates::default();
    let (slowest, bound_rate) = rates.bound(args.status, args.thing.thing_group.is_some());
    let quota_time = Duration::from_secs_f64(manifest.devices_named as f64 / bound_rate);
    let deadline = tokio::time::Instant::now() + args.aws.timeout.unwrap_or(quota_time * 2 + SLACK);
    let paces = Paces::new(&rates);
    let bar = crate::progress::bar(manifest.devices.len(), "devices", 0);
    let runtime = crate::aws::runtime()?;
    let done = runtime.block_on(async {
        let iot = crate::aws::session(&args.aws).await?.registry();
        let (arn_prefix, known) = under_ca(&iot, &ca_id, &paces, &bar, deadline).await?;
        let ctx = Ctx {
            iot: &iot,
            wanted: args.status,
            ca_pem: &ca_pem,
            arn_prefix: arn_prefix.as_deref(),
            known: &known,
            unfinished: &unfinished,
            fleet: fleet.as_ref(),
            journal: &journal,
            paces: &paces,
            deadline,
        };
        let placement_of = |id: &DeviceId| Placement {
            thing: ThingSpec {
                name: id.to_string(),
                thing_type: args.thing.thing_type.clone(),
                attributes: fleet_label.iter().cloned().collect(),
            },
            group: args.thing.thing_group.as_deref(),
            policy: &args.thing.policy,
        };
        let rows = stream::iter(&manifest.devices)
            .map(|device| {
                let (ctx, bar, placement) = (&ctx, &bar, placement_of(&device.id));
                async move {
                    let row = ctx.one(device, &placement).await;
                    bar.inc(1);
                    row
                }
            })
            .buffer_unordered(args.concurrency.max(1))
            .collect::<Vec<Row>>()
            .await;
        anyhow::Ok(rows)
    })?;
    bar.finish_and_clear();
    rows.extend(done);
    let summary = Summary {
        rows: &rows,
        elapsed: started.elapsed(),
        quota_time,
        bound_rate,
        slowest,
        superseded: manifest.superseded,
    };
    summary.print(&args)?;
    Ok(if summary.count(Done::Failed) == 0 {
        Outcome::Success
    } else {
        Outcome::Failed
    })
}

/// What AWS IoT holds under the CA: its certificates' ARN prefix, and every certificate
/// registered under it with its status (what a rerun skips).
async fn under_ca<R: iot::IotAdmin>(
    iot: &R,
    ca_id: &CertificateId,
    paces: &Paces,
    bar: &ProgressBar,
    deadline: tokio::time::Instant,
) -> Result<(Option<String>, HashMap<CertificateId, CertificateStatus>)> {
    let arn_prefix = bulk::certificate_arn_prefix(iot, ca_id, paces, deadline)
        .await
        .with_context(|| {
            format!("the CA {ca_id} in AWS IoT (registered? `jitr ca register` does it)")
        })?;
    bar.set_message("reading the CA's certificates");
    let known = bulk::registered_under(iot, ca_id, paces, &|_| bar.tick(), deadline)
        .await
        .with_context(|| format!("listing the certificates of CA {ca_id}"))?;
    bar.set_message("");
    Ok((arn_prefix, known))
}

/// The fleet `--fleet-check` asks (BALENA_API_KEY, BALENA_FLEET_ID), which `--fleet-id`, if
/// given, must name.
fn checked_fleet(args: &RegisterArgs) -> Result<Option<balena::Fleet>> {
    if !args.fleet_check {
        return Ok(None);
    }
    let fleet = activator::balena_fleet_from_env()
        .context("--fleet-check needs BALENA_API_KEY and BALENA_FLEET_ID")?;
    if args
        .thing
        .fleet_id
        .is_some_and(|id| id.to_string() != fleet.id().to_string())
    {
        return Err(UsageError(format!(
            "--fleet-id differs from BALENA_FLEET_ID ({}), the fleet --fleet-check asks",
            fleet.id()
        ))
        .into());
    }
    Ok(Some(fleet))
}

/// The manifest's devices, each at its last line (a reissue appends): the current certificate.
struct Manifest {
    folder: PathBuf,
    /// Devices whose certificate was found and matches its line, in manifest order.
    devices: Vec<Device>,
    /// The others, as failed rows.
    unreadable: Vec<Row>,
    /// How many devices the manifest names.
    devices_named: usize,
    /// Earlier lines of reissued devices.
    superseded: usize,
}

impl Manifest {
    fn read(path: &Path) -> Result<Manifest> {
        let entries = factory_ca::read_manifest(path)?;
        let lines = entries.len();
        let mut latest: HashMap<String, factory_ca::ManifestEntry> = HashMap::new();
        let mut order = Vec::new();
        for entry in entries {
            if !latest.contains_key(&entry.id) {
                order.push(entry.id.clone());
            }
            latest.insert(entry.id.clone(), entry);
        }
        let folder = path.parent().map(Path::to_path_buf).unwrap_or_default();
        let (mut devices, mut unreadable) = (Vec::new(), Vec::new());
        for id in &order {
            let entry = &latest[id];
            match load(&folder, entry) {
                Ok(device) => devices.push(device),
                Err(reason) => unreadable.push(Row {
                    device_id: entry.id.clone(),
                    certificate_id: entry.certificate_id.clone(),
                    outcome: Done::Failed,
                    status: None,
                    reason,
                }),
            }
        }
        Ok(Manifest {
            folder,
            devices,
            unreadable,
            devices_named: order.len(),
            superseded: lines - order.len(),
        })
    }
}

/// What a run did, printed at its end.
struct Summary<'a> {
    rows: &'a [Row],
    elapsed: Duration,
    quota_time: Duration,
    bound_rate: f64,
    slowest: &'static str,
    superseded: usize,
}

impl Summary<'_> {
    fn count(&self, done: Done) -> usize {
        self.rows.iter().filter(|r| r.outcome == done).count()
    }

    fn print(&self, args: &RegisterArgs) -> Result<()> {
        let (registered, resumed, skipped, left, strangers, failed) = (
            self.count(Done::Registered),
            self.count(Done::Resumed),
            self.count(Done::Skipped),
            self.count(Done::Left),
            self.count(Done::NotMember),
            self.count(Done::Failed),
        );
        let (superseded, bound_rate, slowest) = (self.superseded, self.bound_rate, self.slowest);
        let rate = (registered + resumed) as f64 / self.elapsed.as_secs_f64().max(1e-3);
        if args.output.json {
            for row in self.rows {
                print_json(row)?;
            }
            return print_json(&serde_json::json!({"summary": {
                "status": args.status.status().as_str(),
                "registered": registered + resumed,
                "resumed": resumed,
                "skipped": skipped,
                "left": left,
                "not_member": strangers,
                "failed": failed,
                "superseded_lines": superseded,
                "fleet_check": args.fleet_check,
                "elapsed_s": self.elapsed.as_secs_f64(),
                "per_second": rate,
                "quota_bound_s": self.quota_time.as_secs_f64(),
            }}));
        }
        for row in self
            .rows
            .iter()
            .filter(|r| matches!(r.outcome, Done::Left | Done::NotMember | Done::Failed))
        {
            let outcome = serde_json::to_value(row.outcome)?;
            println!(
                "{:<10} {:<32}  {}…  {}",
                outcome.as_str().unwrap_or_default(),
                row.device_id,
                row.certificate_id.get(..12).unwrap_or(&row.certificate_id),
                row.reason
            );
        }
        println!(
            "register {}: registered {} ({resumed} resumed), skipped {skipped} existing, {left} left as they were, {strangers} not in the fleet, {failed} failed, in {:.1} s ({rate:.1}/s; AWS's default quotas allow {bound_rate}/s, {slowest})",
            args.status.status().as_str(),
            registered + resumed,
            self.elapsed.as_secs_f64(),
        );
        if superseded > 0 {
            println!("{superseded} earlier manifest line(s) of reissued devices: only each device's last certificate is registered");
        }
        if !args.fleet_check {
            println!("no fleet check was made (--fleet-check registers only active members of the balena fleet)");
        }
        if failed > 0 {
            println!(
                "run the same command again to retry the failed devices; done ones are skipped"
            );
        }
        Ok(())
    }
}

/// A device's certificate from `<folder>/<id>/device.crt`, checked against its manifest line.
fn load(folder: &Path, entry: &factory_ca::ManifestEntry) -> Result<Device, String> {
    let id = DeviceId::parse(&entry.id, IdFormat::Any).map_err(|e| e.to_string())?;
    let path: PathBuf = folder.join(&entry.id).join(CERT_FILE);
    let pem = std::fs::read_to_string(&path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            format!(
                "{} is missing (register reads the devices folder `jitr issue` writes; a --bundle issuance keeps certificates in the bundle only)",
                path.display()
            )
        } else {
            format!("cannot read {}: {e}", path.display())
        }
    })?;
    let der = factory_ca::certificates_from_pem_or_der(pem.as_bytes())
        .map_err(|reason| format!("{}: {reason}", path.display()))?;
    let actual = factory_ca::certificate_id(&der[0]);
    if actual != entry.certificate_id {
        return Err(format!(
            "{} is not the manifest's certificate (its SHA-256 is {actual})",
            path.display()
        ));
    }
    let certificate_id =
        CertificateId::parse(&actual).map_err(|reason| format!("{}: {reason}", path.display()))?;
    Ok(Device {
        id,
        certificate_id,
        pem,
    })
}

/// What every device's registration shares.
struct Ctx<'a, R> {
    iot: &'a R,
    wanted: Wanted,
    ca_pem: &'a str,
    arn_prefix: Option<&'a str>,
    known: &'a HashMap<CertificateId, CertificateStatus>,
    unfinished: &'a HashSet<String>,
    fleet: Option<&'a balena::Fleet>,
    journal: &'a Journal,
    paces: &'a Paces,
    deadline: tokio::time::Instant,
}

impl<R: iot::IotAdmin> Ctx<'_, R> {
    async fn one(&self, device: &Device, placement: &Placement<'_>) -> Row {
        let row = |outcome: Done, status: Option<&CertificateStatus>, reason: String| Row {
            device_id: device.id.to_string(),
            certificate_id: device.certificate_id.to_string(),
            outcome,
            status: status.map(|s| s.as_str().to_owned()),
            reason,
        };
        let existing = self.known.get(&device.certificate_id);
        let unfinished = self.unfinished.contains(device.certificate_id.as_str());
        let resume = match bulk::plan(self.wanted, existing, unfinished) {
            Plan::Skip => return row(Done::Skipped, existing, "registered already".into()),
            Plan::Leave(status) => {
                return row(
                    Done::Left,
                    Some(&status),
                    format!("registered already as {status}: left as it is"),
                )
            }
            Plan::Register => false,
            Plan::Resume => true,
        };
        if let Some((outcome, reason)) = self.refused(&device.id).await {
            return row(outcome, existing, reason);
        }
        let result = match self.wanted {
            Wanted::PendingActivation => bulk::register_pending(
                self.iot,
                &device.pem,
                self.ca_pem,
                self.paces,
                self.deadline,
            )
            .await
            .map(|_| None)
            .map_err(|e| format!("{} (a rerun tries again)", error_chain(&e))),
            Wanted::Active => self.activate(device, placement).await,
        };
        match result {
            Ok(None) => row(
                if resume {
                    Done::Resumed
                } else {
                    Done::Registered
                },
                Some(&self.wanted.status()),
                String::new(),
            ),
            Ok(Some((other, status))) => row(
                Done::Left,
                existing,
                format!(
                    "the device's Thing has another {status} certificate, {other}: not registered (`jitr rotate` replaces an identity)"
                ),
            ),
            Err(e) => row(Done::Failed, existing, e),
        }
    }

    /// Why `--fleet-check` keeps the device out, if it does.
    async fn refused(&self, device: &DeviceId) -> Option<(Done, String)> {
        let fleet = self.fleet?;
        let reason = match fleet.membership(device, call_deadline(self.deadline)).await {
            Ok(balena::FleetMembership::Member(_)) => return None,
            Ok(balena::FleetMembership::Inactive(_)) => {
                "inactive in the balena fleet: not registered".to_owned()
            }
            Ok(balena::FleetMembership::NotMember) => {
                "not a device of the balena fleet: not registered".to_owned()
            }
            Err(e) => return Some((Done::Failed, format!("fleet check: {}", error_chain(&e)))),
        };
        Some((Done::NotMember, reason))
    }

    /// The ACTIVE path: INACTIVE, Thing, policy, attachment, ACTIVE, journaled around it.
    /// `Some` names another live certificate of the device, which keeps its place.
    async fn activate(
        &self,
        device: &Device,
        placement: &Placement<'_>,
    ) -> Result<Option<(CertificateId, CertificateStatus)>, String> {
        let thing = &placement.thing.name;
        let other = bulk::live_identity(
            self.iot,
            thing,
            &device.certificate_id,
            self.known,
            self.paces,
            self.deadline,
        )
        .await
        .map_err(|e| error_chain(&e))?;
        if other.is_some() {
            return Ok(other);
        }
        self.journal
            .record(&device.certificate_id, "inactive", true)
            .map_err(|e| format!("cannot write the journal: {e}"))?;
        bulk::install(
            self.iot,
            &device.pem,
            self.ca_pem,
            placement,
            self.arn_prefix,
            self.paces,
            self.deadline,
        )
        .await
        .map_err(|e| format!("{} (a rerun finishes it)", error_chain(&e)))?;
        // The certificate is ACTIVE: a lost line only means a rerun skips it as ACTIVE.
        let _ = self.journal.record(&device.certificate_id, "active", false);
        Ok(None)
    }
}
