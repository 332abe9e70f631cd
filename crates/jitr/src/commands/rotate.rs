//! `jitr rotate`: each device's next certificate in place before the old one goes. A new key
//! and certificate (devices/<id>/ replaced, the manifest recording what it supersedes),
//! registered and activated with the operator's credentials (pre-approved, never held), the
//! variables in balena replaced, and the old certificate retired when the grace ends (by
//! `jitr status --fix`) or at once with `--grace 0`, only after the new one is ACTIVE and
//! delivered.

use std::collections::HashMap;
use std::time::Duration;

use activator::dynamodb::presence::DynamoPresence;
use activator::{FleetBackend, FleetConfig, FleetDirectory};
use anyhow::{Context, Result};
use factory_ca::{issue_batch_with, BatchOptions, DeviceId, IssuedDevice, Rotation};
use iot::{CertificateId, ThingSpec};
use operations::register::Placement;
use operations::rotate;
use operations::status::{self, Known, State, StatusRates};
use time::OffsetDateTime;

use super::balena::Delivery;
use super::{print_json, Outcome};
use crate::cli::RotateArgs;

/// How long a rotation may take unless `--timeout` says otherwise.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(1800);

/// One device's rotation, as reported.
#[derive(Debug, serde::Serialize)]
struct Rotated {
    device_id: String,
    new_certificate_id: Option<String>,
    old_certificate_ids: Vec<String>,
    /// When the old ones retire (RFC 3339), or `null` once retired.
    retire_after: Option<String>,
    retired: bool,
    error: Option<String>,
}

pub(crate) fn rotate(args: RotateArgs) -> Result<Outcome> {
    crate::aws::runtime()?.block_on(run(args))
}

/// The rotation, on the command's one runtime.
async fn run(args: RotateArgs) -> Result<Outcome> {
    let job = Job::new(&args).await?;
    let ids = job.devices(&args).await?;
    // Only devices of the fleet get a certificate activated with the operator's credentials.
    let (ids, strangers) = members(&job.config.fleet, ids, job.deadline).await?;
    let mut rows: Vec<Rotated> = strangers
        .into_iter()
        .map(|id| {
            Rotated::failed(
                id,
                None,
                &[],
                "not an active member of the fleet: not rotated",
            )
        })
        .collect();
    if ids.is_empty() && rows.is_empty() {
        eprintln!("nothing to rotate");
        return Ok(Outcome::Success);
    }
    let old = job.active_now(&ids).await?;
    let (issued, mut recorded) = job.issue(&args, &ids, &old).await?;
    rows.extend(
        issued
            .failures
            .iter()
            .map(|f| Rotated::failed(f.id.clone(), None, &[], &iot::error_chain(&f.error))),
    );
    let (installed, failed) = job.install(issued.handed_over, &old).await;
    rows.extend(failed);
    if let Some(table) = &args.ledger.ledger {
        let ids: Vec<&CertificateId> = installed.iter().map(|i| &i.new).collect();
        recorded &= crate::ledger::mark_activated(table, &job.session, &ids, job.deadline).await?;
    }
    // A failure here leaves the new certificates ACTIVE beside the old: reported, not fatal.
    let delivered = job.deliver(&installed).await;
    let proven = job.wait_proven(&args, &installed, delivered).await;
    for device in installed {
        rows.push(job.finish(&args, device, delivered, &proven).await);
    }
    rows.sort_by(|a, b| a.device_id.cmp(&b.device_id));
    if args.output.json {
        print_json(&rows)?;
    } else {
        rows.iter().for_each(Rotated::print);
    }
    Ok(
        if rows.iter().all(|r| r.error.is_none()) && delivered && recorded {
            Outcome::Success
        } else {
            Outcome::Failed
        },
    )
}

impl Rotated {
    fn failed(
        device_id: String,
        new: Option<String>,
        olds: &[CertificateId],
        error: &str,
    ) -> Rotated {
        Rotated {
            device_id,
            new_certificate_id: new,
            old_certificate_ids: olds.iter().map(ToString::to_string).collect(),
            retire_after: None,
            retired: false,
            error: Some(error.to_owned()),
        }
    }

    /// The row as a line of text.
    fn print(&self) {
        let new = match (&self.error, &self.new_certificate_id) {
            (Some(e), _) => return println!("{}: FAILED: {e}", self.device_id),
            (None, Some(new)) => new,
            (None, None) => return,
        };
        let old = match (
            self.retired,
            &self.retire_after,
            self.old_certificate_ids.len(),
        ) {
            (_, _, 0) => "no old certificate".to_owned(),
            (true, _, n) => format!("{n} old certificate(s) retired"),
            (false, Some(at), n) => {
                format!("{n} old certificate(s) ACTIVE until {at} (then jitr status --fix)")
            }
            (false, None, n) => format!(
                "{n} old certificate(s) still ACTIVE, until the device is seen with the new one (then jitr status --fix)"
            ),
        };
        println!("{}: {new} ACTIVE; {old}", self.device_id);
    }
}

/// A device whose new certificate is ACTIVE, with the ones it supersedes.
struct Installed {
    device_id: String,
    new: CertificateId,
    olds: Vec<CertificateId>,
    /// Its key and chain, for delivery.
    issued: IssuedDevice,
}

/// What one rotation works with: the configuration, the CA, and the one AWS session.
struct Job {
    config: activator::Config,
    delivery: Delivery,
    ca: factory_ca::Ca,
    format: factory_ca::IdFormat,
    aws: crate::cli::AwsArgs,
    deadline: tokio::time::Instant,
    now: OffsetDateTime,
    /// When the old certificates retire (RFC 3339), when a grace above 0 is given.
    retire_after: Option<String>,
    /// `--grace 0`: retired in this run, once the device is seen with the new one.
    retire_now: bool,
    session: iot::aws::Session,
    registry: iot::aws::AwsIotRegistry,
    presence: Option<DynamoPresence>,
}

impl Job {
    async fn new(args: &RotateArgs) -> Result<Job> {
        let config = super::activator_config()?;
        let grace = grace(args.grace, args.balena.push_balena)?;
        let delivery = Delivery::from_args(&args.balena)?;
        let ca = crate::keys::load_ca(&args.ca, None)?;
        let aws = args.aws();
        let now = OffsetDateTime::now_utc();
        let retire_after = match grace {
            Some(grace) if !grace.is_zero() => {
                let grace = time::Duration::try_from(grace).context("--grace is too long")?;
                Some(
                    (now + grace)
                        .format(&time::format_description::well_known::Rfc3339)
                        .unwrap_or_default(),
                )
            }
            _ => None,
        };
        let retire_now = grace.is_some_and(|g| g.is_zero());
        let session = crate::aws::session(&aws).await?;
        let presence = crate::presence::log(&session);
        if retire_now && presence.is_none() {
            return Err(crate::UsageError(format!(
                "--grace 0 retires the old certificate once the device has connected with the new one: set {} (the stack's PresenceTable) so that can be seen",
                crate::presence::PRESENCE_TABLE
            ))
            .into());
        }
        Ok(Job {
            format: ca.profile().device.id_format,
            deadline: aws.deadline(DEFAULT_TIMEOUT),
            registry: session.registry(),
            config,
            delivery,
            ca,
            aws,
            now,
            retire_after,
            retire_now,
            session,
            presence,
        })
    }

    /// The devices: named, or those whose ACTIVE certificate is expiring.
    async fn devices(&self, args: &RotateArgs) -> Result<Vec<DeviceId>> {
        let Some(window) = args.expiring_within else {
            return Ok(args
                .id
                .iter()
                .map(|id| DeviceId::parse(id, self.format))
                .collect::<Result<_, _>>()?);
        };
        let manifest_path = args.out.join(factory_ca::MANIFEST_FILE);
        let mut known = HashMap::new();
        if manifest_path.exists() {
            for entry in factory_ca::read_manifest(&manifest_path)? {
                known.insert(entry.certificate_id.clone(), Known::from_manifest(&entry));
            }
        }
        let scope = status::Scope {
            cas: self.config.policy.trusted_ca_ids.clone(),
            known,
            ownership: activator::ownership::Ownership {
                fleet: Some(self.config.fleet.mark()),
                thing_type: self.config.policy.thing_type.clone(),
            },
            rates: StatusRates::default(),
            ..status::Scope::default()
        };
        let quiet = |_: &str, _: usize, _: Option<usize>| {};
        let observed = status::observe(&self.registry, scope, &quiet, self.deadline).await?;
        let window = time::Duration::try_from(window)?;
        Ok(status::classify(&observed, self.now, window)
            .into_iter()
            .filter(|row| row.state == State::Expiring)
            .map(|row| DeviceId::parse(&row.device_id, self.format))
            .collect::<Result<_, _>>()?)
    }

    /// The certificates each device has ACTIVE now: what the new ones supersede.
    async fn active_now(&self, ids: &[DeviceId]) -> Result<HashMap<String, Vec<CertificateId>>> {
        let mut old = HashMap::new();
        for id in ids {
            let active =
                activator::ownership::active_attached(&self.registry, id.as_str(), self.deadline)
                    .await?;
            old.insert(id.to_string(), active);
        }
        Ok(old)
    }

    /// The new keys and certificates, written to `--out` and the manifest, and put in the
    /// ledger before AWS IoT knows them, as at issuance; `false` beside them when the ledger
    /// write fell short (reported).
    async fn issue(
        &self,
        args: &RotateArgs,
        ids: &[DeviceId],
        old: &HashMap<String, Vec<CertificateId>>,
    ) -> Result<(factory_ca::BatchReport, bool)> {
        let opts = BatchOptions {
            out_dir: args.out.clone(),
            key: args.key.unwrap_or(self.ca.profile().device.key),
            days: super::issue::validity_days(args.days, &self.ca)?,
            jobs: 0,
            force: true,
            now: self.now,
            rotation: Some(Rotation {
                supersedes: old
                    .iter()
                    .filter_map(|(id, certs)| certs.last().map(|c| (id.clone(), c.to_string())))
                    .collect(),
                retire_after: self.retire_after.clone(),
            }),
        };
        let control = factory_ca::RunControl {
            hand_over: true,
            ..factory_ca::RunControl::default()
        };
        let report = issue_batch_with(&self.ca, ids, &opts, &control, &|| {})?;
        let Some(table) = &args.ledger.ledger else {
            return Ok((report, true));
        };
        let batch = crate::ledger::batch_name(&args.ledger, self.now);
        let at = factory_ca::show_time(self.now);
        let entries: Vec<_> = report
            .issued
            .iter()
            .map(|line| crate::ledger::entry(line, &batch, &at, None))
            .collect();
        let manifest = args.out.join(factory_ca::MANIFEST_FILE);
        let until = self.aws.deadline(crate::ledger::LEDGER_TIME);
        let recorded = crate::ledger::put(table, &self.session, &entries, &manifest, until).await?;
        Ok((report, recorded))
    }

    /// Each new certificate registered and ACTIVE, ACTIVE last; a failure is its device's row
    /// (the old certificate stays).
    async fn install(
        &self,
        issued: Vec<IssuedDevice>,
        old: &HashMap<String, Vec<CertificateId>>,
    ) -> (Vec<Installed>, Vec<Rotated>) {
        let fleet_attribute = activator::ownership::fleet_attribute(self.config.fleet.mark());
        let policy = &self.config.policy;
        let (mut installed, mut failed) = (Vec::new(), Vec::new());
        for device in issued {
            let entry = &device.entry;
            let placement = Placement {
                thing: ThingSpec {
                    name: entry.id.clone(),
                    thing_type: policy.thing_type.clone(),
                    attributes: vec![fleet_attribute.clone()],
                },
                group: policy.thing_group.as_deref(),
                policy: &policy.policy_name,
            };
            let result = rotate::install(
                &self.registry,
                &device.cert_pem,
                self.ca.cert_pem(),
                &placement,
                self.deadline,
            )
            .await;
            let olds = old.get(&entry.id).cloned().unwrap_or_default();
            match result {
                Ok(new) => installed.push(Installed {
                    device_id: entry.id.clone(),
                    new,
                    olds,
                    issued: device,
                }),
                Err(e) => failed.push(Rotated::failed(
                    entry.id.clone(),
                    Some(entry.certificate_id.clone()),
                    &olds,
                    &format!(
                        "not activated ({}); the old certificate stays",
                        iot::error_chain(&e)
                    ),
                )),
            }
        }
        (installed, failed)
    }

    /// The new credentials delivered (`--env-file`, `--push-balena`); `true` when nothing is
    /// asked. A failure is reported here and leaves the old certificates ACTIVE.
    async fn deliver(&self, installed: &[Installed]) -> bool {
        if !self.delivery.wanted() {
            return true;
        }
        let mut devices = Vec::new();
        for device in installed {
            let id = match DeviceId::parse(&device.device_id, self.format) {
                Ok(id) => id,
                Err(e) => {
                    eprintln!("jitr: delivery: {e}");
                    return false;
                }
            };
            let key = device.issued.key_pem.as_deref().map(String::as_str);
            devices.push(self.delivery.variables(&id, &device.issued.chain_pem, key));
        }
        match self.delivery.deliver_on(&devices).await {
            Ok(delivered) => delivered,
            Err(e) => {
                eprintln!("jitr: delivery: {}", iot::error_chain(e.as_ref()));
                false
            }
        }
    }

    /// `--grace 0`: whether each device that has old certificates has been seen with its new
    /// one, all waited for at once (empty otherwise).
    async fn wait_proven(
        &self,
        args: &RotateArgs,
        installed: &[Installed],
        delivered: bool,
    ) -> HashMap<String, Result<bool, String>> {
        let (Some(log), true) = (&self.presence, self.retire_now && delivered) else {
            return HashMap::new();
        };
        let until = std::cmp::min(
            tokio::time::Instant::now() + args.wait_connected,
            self.deadline,
        );
        let waits = installed
            .iter()
            .filter(|device| !device.olds.is_empty())
            .map(|device| async move {
                let poll = Duration::from_secs(2);
                let seen = activator::presence::wait_connected(
                    log,
                    &device.device_id,
                    device.new.as_str(),
                    None,
                    poll,
                    until,
                )
                .await
                .map_err(|e| iot::error_chain(&e));
                (device.device_id.clone(), seen)
            });
        if !installed.is_empty() {
            eprintln!(
                "rotate: waiting up to {}s for {} device(s) to connect with their new certificate",
                args.wait_connected.as_secs(),
                installed.len()
            );
        }
        futures::future::join_all(waits).await.into_iter().collect()
    }

    /// The device's row, its old certificates retired first where `--grace 0` and the proof
    /// allow it.
    async fn finish(
        &self,
        args: &RotateArgs,
        device: Installed,
        delivered: bool,
        proven: &HashMap<String, Result<bool, String>>,
    ) -> Rotated {
        let mut row = Rotated {
            new_certificate_id: Some(device.new.to_string()),
            old_certificate_ids: device.olds.iter().map(ToString::to_string).collect(),
            retire_after: self.retire_after.clone(),
            retired: false,
            error: None,
            device_id: device.device_id,
        };
        if !self.retire_now || device.olds.is_empty() {
            return row;
        }
        row.error = match (delivered, proven.get(&row.device_id)) {
            (false, _) => Some(
                "the new credentials were not delivered: the old certificate stays ACTIVE"
                    .to_owned(),
            ),
            (true, Some(Ok(true))) => {
                match rotate::retire(&self.registry, &device.new, &device.olds, self.deadline)
                    .await
                {
                    Ok(_) => {
                        row.retired = true;
                        None
                    }
                    Err(e) => Some(iot::error_chain(&e)),
                }
            }
            (true, Some(Err(e))) => Some(format!(
                "cannot read the presence table ({e}): the old certificate stays ACTIVE"
            )),
            (true, _) => Some(format!(
                "the device has not connected with the new certificate within {}s: the old one stays ACTIVE (jitr status --fix retires it once it has)",
                args.wait_connected.as_secs()
            )),
        };
        row
    }
}

/// The grace asked for, checked against delivery: `None` when the old certificate never retires
/// on its own (nothing delivers the new one here, so only the device's connect proves it).
fn grace(asked: Option<Duration>, delivering: bool) -> Result<Option<Duration>> {
    match (asked, delivering) {
        (Some(_), false) => Err(crate::UsageError(
            "--grace needs --push-balena: without delivery the new certificate may never reach the device, so the old one stays ACTIVE until the device connects with the new one (jitr status --fix then retires it)"
                .to_owned(),
        )
        .into()),
        (Some(grace), true) => Ok(Some(grace)),
        (None, true) => Ok(Some(Duration::from_secs(24 * 3600))),
        (None, false) => Ok(None),
    }
}

/// `ids` split into the fleet's active members and the others (by id).
async fn members(
    fleet: &FleetConfig,
    ids: Vec<DeviceId>,
    deadline: tokio::time::Instant,
) -> Result<(Vec<DeviceId>, Vec<String>)> {
    let fleet = FleetBackend::for_operator(fleet)
        .context("rotation checks the fleet: BALENA_API_KEY and BALENA_FLEET_ID")?;
    let (mut members, mut others) = (Vec::new(), Vec::new());
    for id in ids {
        match fleet.membership(&id, iot::call_deadline(deadline)).await {
            Ok(activator::Membership::Member(_)) => members.push(id),
            Ok(_) => others.push(id.to_string()),
            Err(e) => anyhow::bail!("{}: {id}: {}", fleet.label(), iot::error_chain(&e)),
        }
    }
    Ok((members, others))
}
