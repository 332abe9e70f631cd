//! `jitr rotate`: each device's next certificate in place before the old one goes. A new key
//! and certificate (devices/<id>/ replaced, the manifest recording what it supersedes),
//! registered and activated with the operator's credentials (pre-approved, never held), the
//! variables in balena replaced, and the old certificate retired when the grace ends (by
//! `jitr status --fix`) or at once with `--grace 0`, only after the new one is ACTIVE and
//! delivered.

use std::collections::HashMap;
use std::time::Duration;

use activator::{CertificateId, FleetConfig, ThingSpec};
use anyhow::{Context, Result};
use factory_ca::{issue_batch, BatchOptions, DeviceId, Rotation};
use operations::register::Placement;
use operations::rotate;
use operations::status::{self, Known, Rates, State};
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
    let config = super::activator_config()?;
    let grace = grace(args.grace, args.balena.push_balena)?;
    let delivery = Delivery::from_args(&args.balena)?;
    let ca = crate::keys::load_ca(&args.ca, None)?;
    let format = ca.profile().device.id_format;
    let aws = args.aws();
    let deadline = aws.deadline(DEFAULT_TIMEOUT);
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
    let manifest_path = args.out.join(factory_ca::MANIFEST_FILE);
    let runtime = crate::aws::runtime()?;
    let (registry, presence) = runtime.block_on(async {
        let session = crate::aws::session(&aws).await?;
        anyhow::Ok((session.registry(), crate::presence::log(&session)))
    })?;
    if retire_now && presence.is_none() {
        return Err(crate::UsageError(format!(
            "--grace 0 retires the old certificate once the device has connected with the new one: set {} (the stack's PresenceTable) so that can be seen",
            crate::presence::PRESENCE_TABLE
        ))
        .into());
    }

    // The devices: named, or those whose ACTIVE certificate is expiring.
    let ids: Vec<DeviceId> = match args.expiring_within {
        None => args
            .id
            .iter()
            .map(|id| DeviceId::parse(id, format))
            .collect::<Result<_, _>>()?,
        Some(window) => {
            let mut known = HashMap::new();
            if manifest_path.exists() {
                for entry in factory_ca::read_manifest(&manifest_path)? {
                    known.insert(entry.certificate_id.clone(), Known::from_manifest(&entry));
                }
            }
            let scope = status::Scope {
                cas: config.policy.trusted_ca_ids.clone(),
                known,
                ownership: activator::Ownership {
                    fleet: Some(config.fleet.mark()),
                    thing_type: config.policy.thing_type.clone(),
                },
                rates: Rates::default(),
                ..status::Scope::default()
            };
            let observed = runtime.block_on(status::observe(
                &registry,
                scope,
                &|_: &str, _: usize, _: Option<usize>| {},
                deadline,
            ))?;
            let window = time::Duration::try_from(window)?;
            status::classify(&observed, now, window)
                .into_iter()
                .filter(|row| row.state == State::Expiring)
                .map(|row| DeviceId::parse(&row.device_id, format))
                .collect::<Result<_, _>>()?
        }
    };
    // Only devices of the fleet get a certificate activated with the operator's credentials.
    let (ids, strangers) = runtime.block_on(members(&config.fleet, ids, deadline))?;
    let mut rows: Vec<Rotated> = strangers
        .into_iter()
        .map(|id| Rotated {
            device_id: id,
            new_certificate_id: None,
            old_certificate_ids: Vec::new(),
            retire_after: None,
            retired: false,
            error: Some("not an active member of the fleet: not rotated".to_owned()),
        })
        .collect();
    if ids.is_empty() && rows.is_empty() {
        eprintln!("nothing to rotate");
        return Ok(Outcome::Success);
    }

    // The certificates each device has ACTIVE now: what the new ones supersede.
    let old: HashMap<String, Vec<CertificateId>> = runtime.block_on(async {
        let mut old = HashMap::new();
        for id in &ids {
            old.insert(
                id.to_string(),
                activator::ownership::active_attached(&registry, id.as_str(), deadline).await?,
            );
        }
        anyhow::Ok(old)
    })?;
    let opts = BatchOptions {
        out_dir: args.out.clone(),
        key: args.key.unwrap_or(ca.profile().device.key),
        days: super::issue::validity_days(args.days, &ca)?,
        jobs: 0,
        force: true,
        now,
        rotation: Some(Rotation {
            supersedes: old
                .iter()
                .filter_map(|(id, certs)| certs.last().map(|c| (id.clone(), c.to_string())))
                .collect(),
            retire_after: retire_after.clone(),
        }),
    };
    let report = issue_batch(&ca, &ids, &opts, &|| {})?;
    // In the ledger before AWS IoT knows them, as at issuance.
    let ledger_entries: Vec<_> = match &args.ledger.ledger {
        None => Vec::new(),
        Some(_) => {
            let batch = crate::ledger::batch_name(&args.ledger, now);
            let at = factory_ca::show_time(now);
            report
                .issued
                .iter()
                .map(|line| crate::ledger::entry(line, &batch, &at, None))
                .collect()
        }
    };
    let mut recorded = match &args.ledger.ledger {
        Some(table) => crate::ledger::write(table, &aws, &ledger_entries, &manifest_path)?,
        None => true,
    };
    rows.extend(report.failures.iter().map(|f| Rotated {
        device_id: f.id.clone(),
        new_certificate_id: None,
        old_certificate_ids: Vec::new(),
        retire_after: None,
        retired: false,
        error: Some(activator::error_chain(&f.error)),
    }));

    // Registered and ACTIVE, then delivered, then (grace 0) the old retired.
    let fleet_attribute = activator::fleet_attribute(config.fleet.mark());
    let mut installed = Vec::new();
    for entry in &report.issued {
        let pem = std::fs::read_to_string(args.out.join(&entry.id).join("device.crt"))?;
        let placement = Placement {
            thing: ThingSpec {
                name: entry.id.clone(),
                thing_type: config.policy.thing_type.clone(),
                attributes: vec![fleet_attribute.clone()],
            },
            group: config.policy.thing_group.as_deref(),
            policy: &config.policy.policy_name,
        };
        let result = runtime.block_on(rotate::install(
            &registry,
            &pem,
            ca.cert_pem(),
            &placement,
            deadline,
        ));
        let olds = old.get(&entry.id).cloned().unwrap_or_default();
        match result {
            Ok(new) => installed.push((entry.id.clone(), new, olds)),
            Err(e) => rows.push(Rotated {
                device_id: entry.id.clone(),
                new_certificate_id: Some(entry.certificate_id.clone()),
                old_certificate_ids: olds.iter().map(ToString::to_string).collect(),
                retire_after: None,
                retired: false,
                error: Some(format!(
                    "not activated ({}); the old certificate stays",
                    activator::error_chain(&e)
                )),
            }),
        }
    }
    if let Some(table) = &args.ledger.ledger {
        let ids: Vec<&CertificateId> = installed.iter().map(|(_, new, _)| new).collect();
        recorded &= runtime.block_on(crate::ledger::mark_activated(table, &aws, &ids, deadline))?;
    }
    // A failure here leaves the new certificates ACTIVE beside the old: reported, not fatal.
    let delivered = if delivery.wanted() {
        let deliver = || -> Result<bool> {
            let mut devices = Vec::new();
            for (id, _, _) in &installed {
                let dir = args.out.join(id);
                let read = |name: &str| {
                    std::fs::read_to_string(dir.join(name))
                        .map(zeroize::Zeroizing::new)
                        .with_context(|| format!("cannot read {}", dir.join(name).display()))
                };
                let (chain, key) = (read("chain.pem")?, read("device.key")?);
                devices.push(delivery.variables(&DeviceId::parse(id, format)?, &chain, Some(&key)));
            }
            delivery.deliver(&devices)
        };
        match deliver() {
            Ok(delivered) => delivered,
            Err(e) => {
                eprintln!("jitr: delivery: {}", activator::error_chain(e.as_ref()));
                false
            }
        }
    } else {
        true
    };
    // --grace 0: the old ones go once the device is seen with the new one, all waited at once.
    let proven: HashMap<String, Result<bool, String>> = match (&presence, retire_now && delivered) {
        (Some(log), true) => {
            let until = std::cmp::min(tokio::time::Instant::now() + args.wait_connected, deadline);
            let waits = installed
                .iter()
                .filter(|(_, _, olds)| !olds.is_empty())
                .map(|(id, new, _)| async move {
                    let seen = activator::presence::wait_connected(
                        log,
                        id,
                        new.as_str(),
                        None,
                        Duration::from_secs(2),
                        until,
                    )
                    .await
                    .map_err(|e| activator::error_chain(&e));
                    (id.clone(), seen)
                });
            if !installed.is_empty() {
                eprintln!(
                    "rotate: waiting up to {}s for {} device(s) to connect with their new certificate",
                    args.wait_connected.as_secs(),
                    installed.len()
                );
            }
            runtime
                .block_on(futures::future::join_all(waits))
                .into_iter()
                .collect()
        }
        _ => HashMap::new(),
    };
    for (id, new, olds) in installed {
        let mut row = Rotated {
            device_id: id,
            new_certificate_id: Some(new.to_string()),
            old_certificate_ids: olds.iter().map(ToString::to_string).collect(),
            retire_after: retire_after.clone(),
            retired: false,
            error: None,
        };
        if retire_now && !olds.is_empty() {
            row.error = match (delivered, proven.get(&row.device_id)) {
                (false, _) => Some(
                    "the new credentials were not delivered: the old certificate stays ACTIVE"
                        .to_owned(),
                ),
                (true, Some(Ok(true))) => {
                    match runtime.block_on(rotate::retire(&registry, &new, &olds, deadline)) {
                        Ok(_) => {
                            row.retired = true;
                            None
                        }
                        Err(e) => Some(activator::error_chain(&e)),
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
        }
        rows.push(row);
    }
    rows.sort_by(|a, b| a.device_id.cmp(&b.device_id));

    if args.output.json {
        print_json(&rows)?;
    } else {
        for row in &rows {
            match (&row.error, &row.new_certificate_id) {
                (Some(e), _) => println!("{}: FAILED: {e}", row.device_id),
                (None, Some(new)) => {
                    let old = match (
                        row.retired,
                        &row.retire_after,
                        row.old_certificate_ids.len(),
                    ) {
                        (_, _, 0) => "no old certificate".to_owned(),
                        (true, _, n) => format!("{n} old certificate(s) retired"),
                        (false, Some(at), n) => {
                            format!(
                                "{n} old certificate(s) ACTIVE until {at} (then jitr status --fix)"
                            )
                        }
                        (false, None, n) => format!(
                            "{n} old certificate(s) still ACTIVE, until the device is seen with the new one (then jitr status --fix)"
                        ),
                    };
                    println!("{}: {new} ACTIVE; {old}", row.device_id);
                }
                (None, None) => {}
            }
        }
    }
    Ok(
        if rows.iter().all(|r| r.error.is_none()) && delivered && recorded {
            Outcome::Success
        } else {
            Outcome::Failed
        },
    )
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
    let (mut members, mut others) = (Vec::new(), Vec::new());
    match fleet {
        FleetConfig::Balena { .. } => {
            let fleet = activator::balena_fleet_from_env()
                .context("rotation checks the fleet: BALENA_API_KEY and BALENA_FLEET_ID")?;
            for id in ids {
                match fleet
                    .membership(&id, activator::call_deadline(deadline))
                    .await
                {
                    Ok(balena::Membership::Member(_)) => members.push(id),
                    Ok(_) => others.push(id.to_string()),
                    Err(e) => anyhow::bail!("balena: {id}: {}", activator::error_chain(&e)),
                }
            }
        }
        FleetConfig::Allowlist { path } => {
            let list = activator::allowlist::AllowlistDirectory::load(path)?;
            let listed: std::collections::HashSet<&str> = list.ids().collect();
            for id in ids {
                if listed.contains(id.as_str()) {
                    members.push(id);
                } else {
                    others.push(id.to_string());
                }
            }
        }
    }
    Ok((members, others))
}
