//! `jitr status [--fix [--yes]]`: every device's one state, the most urgent first, from AWS IoT
//! and the fleet, configured like `jitr reconcile` (the Lambda's variables); and the safe fixes,
//! shown first, applied only with `--yes`.

use std::collections::{BTreeSet, HashMap};
use std::io::IsTerminal;
use std::time::Duration;

use crate::progress::Phases;
use activator::{ownership::Ownership, FleetBackend, FleetDirectory};
use anyhow::{Context, Result};
use operations::status::{self, DeviceStatus, Known, Scope, Standing, State, StatusRates};

use super::reconcile::chosen_cas;
use super::{print_json, Outcome};
use crate::cli::StatusArgs;

/// How long a status may take unless `--timeout` says otherwise (reads are paced at AWS IoT's
/// default 10 a second: a fleet without a manifest needs a DescribeCertificate each).
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(3600);

pub(crate) fn status(args: StatusArgs) -> Result<Outcome> {
    let config = super::activator_config()?;
    let mut scope = Scope {
        cas: chosen_cas(&args.ca_id, &config.policy.trusted_ca_ids)?,
        ownership: Ownership {
            fleet: Some(config.fleet.mark()),
            thing_type: config.policy.thing_type.clone(),
        },
        deep: args.deep,
        rates: StatusRates {
            per_operation: args.rate,
            ..StatusRates::default()
        },
        ..Scope::default()
    };
    if let Some(path) = &args.manifest {
        for entry in factory_ca::read_manifest(path)? {
            scope.manifest_devices.insert(entry.id.clone());
            let known = Known::from_manifest(&entry);
            scope.known.insert(entry.certificate_id.clone(), known);
        }
    }
    let ownership = scope.ownership.clone();
    let fleet = FleetBackend::for_operator(&config.fleet)
        .context("the fleet's roster needs BALENA_API_KEY and BALENA_FLEET_ID")?;
    let deadline = args.aws.deadline(DEFAULT_TIMEOUT);
    let window =
        time::Duration::try_from(args.expiring_within).context("--expiring-within is too long")?;
    let runtime = crate::aws::runtime()?;
    let (rows, foreign, registry) = runtime.block_on(async {
        let progress = Phases::new("status");
        scope.roster = Some(roster(&fleet, deadline, &progress).await?);
        let session = crate::aws::session(&args.aws).await?;
        let registry = session.registry();
        let progress_step =
            |what: &str, done: usize, total: Option<usize>| progress.step(what, done, total);
        let mut observed = status::observe(&registry, scope, &progress_step, deadline).await?;
        observed.presence = crate::presence::read(&session, deadline).await?;
        progress.done();
        let rows = status::classify(&observed, time::OffsetDateTime::now_utc(), window);
        anyhow::Ok((rows, observed.foreign_things, registry))
    })?;
    // Revokes are what --yes covers; deleting a Thing asks for its own yes.
    let deletes = status::plan_fixes(&rows, true)
        .iter()
        .filter(|f| matches!(f.action, status::FixAction::DeleteThing { .. }))
        .count();
    let delete_things =
        args.delete_things || (args.fix && args.yes && deletes > 0 && confirm_deletes(deletes));
    let fixes = status::plan_fixes(&rows, delete_things);
    let applied = if args.fix && args.yes {
        runtime.block_on(async {
            let fixes = still_drifted(&fleet, &rows, fixes.clone(), deadline).await?;
            anyhow::Ok(Some(
                status::apply_fixes(&registry, &fixes, &ownership, deadline).await,
            ))
        })?
    } else {
        None
    };
    let kept = if delete_things { 0 } else { deletes };
    print(&args, &rows, &fixes, applied.as_deref(), kept)?;
    if foreign > 0 {
        eprintln!("status: {foreign} Thing(s) in the account are not jitr's: left alone");
    }
    let fixed: BTreeSet<&str> = fixes.iter().map(|f| f.device_id.as_str()).collect();
    let fine = |row: &DeviceStatus| {
        row.state.is_fine() || (applied.is_some() && fixed.contains(row.device_id.as_str()))
    };
    let all_applied = applied
        .as_ref()
        .is_none_or(|a| a.iter().all(|a| a.error.is_none()));
    Ok(if rows.iter().all(fine) && all_applied {
        Outcome::Success
    } else {
        Outcome::Failed
    })
}

/// The rows, the fixes planned and those applied, as JSON or text; `kept` Things were left
/// in place for want of `--delete-things`.
fn print(
    args: &StatusArgs,
    rows: &[DeviceStatus],
    fixes: &[status::Fix],
    applied: Option<&[status::Applied]>,
    kept: usize,
) -> Result<()> {
    if args.output.json {
        let mut value = serde_json::json!({
            "devices": rows,
            "summary": summary_map(rows),
        });
        if args.fix {
            value["fixes"] = serde_json::to_value(fixes)?;
        }
        if let Some(applied) = applied {
            value["applied"] = serde_json::to_value(applied)?;
        }
        return print_json(&value);
    }
    print_rows(rows);
    if args.fix {
        print_fixes(fixes, applied);
        if kept > 0 {
            println!("{kept} Thing(s) left in place: deleting them needs --delete-things");
        }
    }
    Ok(())
}

/// Asks on a terminal whether `n` Things may be deleted; `false` anywhere else.
fn confirm_deletes(n: usize) -> bool {
    if !std::io::stdin().is_terminal() || !std::io::stderr().is_terminal() {
        return false;
    }
    eprint!("delete {n} Thing(s) of jitr's devices (their certificates are gone)? [y/N] ");
    let mut answer = String::new();
    std::io::stdin().read_line(&mut answer).is_ok() && matches!(answer.trim(), "y" | "Y" | "yes")
}

/// The fleet's roster: balena's devices (BALENA_API_KEY, BALENA_FLEET_ID), or the allowlist.
async fn roster(
    fleet: &FleetBackend,
    deadline: tokio::time::Instant,
    progress: &Phases,
) -> Result<HashMap<String, Standing>> {
    let devices = fleet
        .roster(deadline, &mut |n| {
            progress.step("fleet devices read", n, None)
        })
        .await
        .map_err(|e| anyhow::anyhow!("{}: {}", fleet.label(), iot::error_chain(&e)))?;
    Ok(devices
        .into_iter()
        .map(|(id, active)| {
            let standing = if active {
                Standing::Active
            } else {
                Standing::Inactive
            };
            (id, standing)
        })
        .collect())
}

/// The fixes, less those of a drifted device that is a member again right now: the roster was
/// read minutes ago, and a revocation cannot be taken back.
async fn still_drifted(
    fleet: &FleetBackend,
    rows: &[DeviceStatus],
    fixes: Vec<status::Fix>,
    deadline: tokio::time::Instant,
) -> Result<Vec<status::Fix>> {
    let mut back = BTreeSet::new();
    for row in rows.iter().filter(|r| r.state == State::Drifted) {
        let device = row.device_id.as_str();
        let Ok(id) = factory_ca::DeviceId::parse(device, factory_ca::IdFormat::Any) else {
            continue;
        };
        let membership = fleet
            .membership(&id, iot::call_deadline(deadline))
            .await
            .map_err(|e| {
                let why = iot::error_chain(&e);
                anyhow::anyhow!("{}: {device}: {why}", fleet.label())
            })?;
        if let activator::Membership::Member(_) = membership {
            eprintln!("status: {device} is in the fleet again: not fixed");
            back.insert(device.to_owned());
        }
    }
    Ok(fixes
        .into_iter()
        .filter(|f| !back.contains(&f.device_id))
        .collect())
}

fn summary_map(rows: &[DeviceStatus]) -> serde_json::Map<String, serde_json::Value> {
    status::summary(rows)
        .into_iter()
        .map(|(state, n)| (state.as_str().to_owned(), n.into()))
        .collect()
}

fn print_rows(rows: &[DeviceStatus]) {
    for row in rows {
        let certificates: Vec<String> = row
            .certificates
            .iter()
            .map(|c| format!("{}…:{}", &c.certificate_id[..12], c.status))
            .collect();
        let seen = row.last_connected.as_ref().map_or(String::new(), |c| {
            format!(
                " [last connected: {}… at {}]",
                &c.certificate_id[..12.min(c.certificate_id.len())],
                epoch_ms(c.connected_at)
            )
        });
        println!(
            "{:<13} {:<32}  {:<40}  {}{seen}",
            row.state.as_str(),
            row.device_id,
            certificates.join(" "),
            row.reason
        );
    }
    let needs = |s: State| rows.iter().any(|r| r.state == s);
    if needs(State::Held) {
        println!("held certificates wait for an operator: jitr approve --certificate-id ID");
    }
    if needs(State::Expiring) {
        println!("expiring certificates: jitr rotate --expiring-within WINDOW");
    }
    let counts: Vec<String> = status::summary(rows)
        .into_iter()
        .filter(|(_, n)| *n > 0)
        .map(|(state, n)| format!("{n} {state}"))
        .collect();
    println!(
        "{} device(s): {}",
        rows.len(),
        if counts.is_empty() {
            "none".to_owned()
        } else {
            counts.join(", ")
        }
    );
}

/// Epoch milliseconds as RFC 3339 (the number itself when out of range).
fn epoch_ms(ms: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| ms.to_string())
}

fn print_fixes(fixes: &[status::Fix], applied: Option<&[status::Applied]>) {
    if fixes.is_empty() {
        println!("nothing to fix");
        return;
    }
    match applied {
        None => {
            println!("would fix ({}), with --yes:", fixes.len());
            for fix in fixes {
                println!("  {fix}");
            }
        }
        Some(applied) => {
            for a in applied {
                match &a.error {
                    None => println!("fixed: {}", a.fix),
                    Some(e) => println!("FAILED: {}: {e}", a.fix),
                }
            }
        }
    }
}
