//! `jitr-demo`: the whole JITR loop on this machine, as the devices see it, nothing reaching
//! AWS or balena. moto stands in for AWS IoT's control plane (or `--endpoint-url` names
//! another), the test kit's AWS IoT stand-in for its MQTT data plane, the fake balena API for
//! the fleet; the real `bootstrap` Lambda runs through a Lambda Runtime API emulator, invoked
//! by the topic rule on each certificate-registered event.
//!
//! The fleet owner's part runs through `jitr` (each command shown): CA, registration, issuance
//! with delivery to each device's cloud-relay service. Then every device connects at once as
//! a device does (`jitr device connect`: its chain, client id = UUID, jittered backoff): the
//! first connect is closed while the certificate is pending, `bootstrap` checks the fleet and
//! activates it, the reconnect is accepted, and one message to the device's
//! `CLOUD_CONSUMER_TOPIC` reaches a subscribed application. The strangers (in no fleet) are
//! never accepted. `scripts/demo` builds and runs it.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use aws_sdk_iot::types::CertificateStatus;
use clap::Parser;
use testkit::first_connect::{
    Activation, DeviceReport, DeviceWorld, Fleet, FleetDevice, WorldOptions, AT_ONCE,
};

/// The whole JITR loop locally, as the devices see it.
#[derive(Debug, Parser)]
#[command(name = "jitr-demo", version, about)]
struct Args {
    /// How many devices connect (every tenth, and at least one, is a stranger to the fleet).
    #[arg(long, default_value_t = 10, value_name = "N")]
    devices: usize,
    /// Use this AWS IoT control plane (e.g. a running moto server) instead of starting moto.
    #[arg(long, value_name = "URL")]
    endpoint_url: Option<String>,
    /// The `bootstrap` binary [default: next to this program].
    #[arg(long, value_name = "FILE")]
    bootstrap: Option<PathBuf>,
    /// The `jitr` binary [default: next to this program].
    #[arg(long, value_name = "FILE")]
    jitr: Option<PathBuf>,
    /// Concurrent Lambda instances (bootstrap processes).
    #[arg(long, default_value_t = 4, value_name = "N")]
    concurrency: usize,
    /// How long a member device keeps trying before it gives up [default: 30 s, and 0.1 s
    /// more per device past 100: a large fleet queues at the Lambda, as a real one would].
    #[arg(long, value_name = "SECONDS")]
    deadline: Option<u64>,
}

/// How many device rows the table shows before it summarises (a screenful); the devices not
/// behaving as expected are shown whatever their number.
const ROWS: usize = 20;

/// How long a member keeps trying when `--deadline` is not given: 30 s, and 0.1 s more per
/// device past 100 (a large fleet queues at the Lambda, as a real one would).
fn member_deadline(devices: usize) -> Duration {
    Duration::from_secs(30 + (devices.saturating_sub(100) / 10) as u64)
}

/// How long a stranger keeps trying: it is never accepted, the demo need not wait longer
/// than its first CONNECT takes to be registered (plus a second per hundred devices: a
/// thousand processes starting at once keep this machine's two cores busy for a while).
fn stranger_deadline(devices: usize) -> Duration {
    Duration::from_secs(5 + (devices / 100) as u64)
}

/// The message every device publishes once accepted.
const MESSAGE: &str = "{\"temperature\":21.5}";

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("jitr-demo: error: {}", iot::error_chain(e.as_ref()));
            ExitCode::from(1)
        }
    }
}

/// How many of `devices` are strangers: every tenth, and one when there are two or more.
fn strangers(devices: usize) -> usize {
    match devices {
        0 | 1 => 0,
        n => (n / 10).max(1),
    }
}

fn sibling(given: Option<&Path>, name: &str, package: &str) -> Result<PathBuf> {
    if let Some(path) = given {
        // Absolute: the commands run in the owner's folder.
        return std::fs::canonicalize(path).with_context(|| format!("--{name} {}", path.display()));
    }
    let exe = std::env::current_exe().context("cannot find the jitr-demo executable")?;
    let path = exe.with_file_name(name);
    if path.is_file() {
        Ok(path)
    } else {
        bail!(
            "no {name} binary next to {}: build it (`cargo build --release -p {package}`) or pass --{name}",
            exe.display()
        )
    }
}

fn run(args: &Args) -> Result<bool> {
    if args.devices == 0 {
        bail!("--devices must be at least 1");
    }
    let bootstrap = sibling(args.bootstrap.as_deref(), "bootstrap", "activator-lambda")?;
    let jitr = sibling(args.jitr.as_deref(), "jitr", "jitr")?;
    let started = Instant::now();
    println!(
        "starting {}, the fake balena API, the AWS IoT MQTT stand-in and {} bootstrap process(es)",
        if args.endpoint_url.is_some() {
            "on the given AWS IoT"
        } else {
            "a local moto server for AWS IoT"
        },
        args.concurrency.max(1)
    );
    let mut world = DeviceWorld::start(WorldOptions {
        endpoint_url: args.endpoint_url.clone(),
        ..WorldOptions::default()
    })?;
    let strangers = strangers(args.devices);
    let fleet = world.provision(
        &jitr,
        &bootstrap,
        args.concurrency,
        args.devices - strangers,
        strangers,
        &|line| println!("{line}"),
    )?;
    println!(
        "{} device(s) connect at once to {} (jitr device connect: chain, client id = UUID, \
         jittered backoff), each publishing to its CLOUD_CONSUMER_TOPIC once accepted...",
        fleet.devices.len(),
        world.endpoint().addr()
    );
    let stranger_deadline = stranger_deadline(args.devices);
    let member_deadline = args
        .deadline
        .map_or_else(|| member_deadline(args.devices), Duration::from_secs);
    if fleet.devices.len() > AT_ONCE {
        println!("({AT_ONCE} at a time: each device that ends makes room for the next)");
    }
    let connecting = Instant::now();
    let last_said = std::cell::Cell::new(Instant::now());
    let reports = world.connect_all(
        &jitr,
        &fleet,
        MESSAGE,
        &|device| {
            if device.member {
                member_deadline
            } else {
                stranger_deadline
            }
        },
        &|done, total| {
            if done == total || last_said.get().elapsed() >= Duration::from_secs(5) {
                last_said.set(Instant::now());
                println!(
                    "  {done} of {total} device(s) done after {:.1} s",
                    connecting.elapsed().as_secs_f64()
                );
            }
        },
    )?;
    let connected_in = connecting.elapsed();
    // A message relayed a moment ago may still be on its way to the application.
    world.wait_received_all(
        fleet
            .devices
            .iter()
            .zip(&reports)
            .filter(|(d, r)| d.member && r.outcome == "connected")
            .map(|(d, _)| d.topic.as_str()),
        Duration::from_secs(2),
    );
    let wrong = report(&world, &fleet, &reports)?;
    println!(
        "whole demo {:.1} s ({} device(s) connecting: {:.1} s)",
        started.elapsed().as_secs_f64(),
        fleet.devices.len(),
        connected_in.as_secs_f64()
    );
    Ok(wrong == 0)
}

/// One table row per device, checked: members connected, activated, ACTIVE and their message
/// received; strangers never connected, rejected, REVOKED. Returns how many were not.
fn report(world: &DeviceWorld, fleet: &Fleet, reports: &[DeviceReport]) -> Result<usize> {
    let activations = world.activations();
    let received = world.received();
    println!();
    println!(
        "{:<32}  {:<8}  {:>22}  {:>8}  {:<18}  {:<8}  {:<8}",
        "device", "fleet", "first CONNECT→accepted", "attempts", "Lambda", "cert", "message"
    );
    let mut wrong = 0;
    let mut hidden = 0;
    for (n, (device, run)) in fleet.devices.iter().zip(reports).enumerate() {
        let status = world.status_if_registered(&device.certificate_id)?;
        let lambda = last_activation(&activations, device);
        let got = received.iter().any(|r| r.topic == device.topic);
        let ok = if device.member {
            run.outcome == "connected"
                && lambda.is_some_and(|a| a.outcome == "activated")
                && status == Some(CertificateStatus::Active)
                && got
        } else {
            run.outcome != "connected"
                && lambda.is_some_and(|a| a.outcome == "rejected")
                && status == Some(CertificateStatus::Revoked)
        };
        if !ok {
            wrong += 1;
        }
        // The first screenful, then only what went wrong.
        if ok && n >= ROWS {
            hidden += 1;
            continue;
        }
        println!(
            "{:<32}  {:<8}  {:>22}  {:>8}  {:<18}  {:<8}  {:<8}{}",
            device.uuid,
            if device.member { "member" } else { "stranger" },
            match run.connected_after {
                Some(d) => format!("{:.2} s", d.as_secs_f64()),
                None => format!("never ({})", run.outcome),
            },
            run.attempts,
            match lambda {
                Some(a) => format!(
                    "{} {:.0} ms",
                    a.outcome,
                    a.answered.duration_since(a.published).as_secs_f64() * 1000.0
                ),
                None => "not run".to_owned(),
            },
            status.map_or("unknown".to_owned(), |s| format!("{s:?}").to_uppercase()),
            if got { "received" } else { "-" },
            if ok { "" } else { "  UNEXPECTED" }
        );
    }
    if hidden > 0 {
        println!("... and {hidden} more device(s) as expected");
    }
    let mut times: Vec<Duration> = reports.iter().filter_map(|r| r.connected_after).collect();
    times.sort();
    let connected = times.len();
    let backoff: Duration = reports
        .iter()
        .filter(|r| r.connected_after.is_some())
        .map(|r| r.backoff)
        .sum();
    let total: Duration = times.iter().sum();
    println!();
    print!("devices {}   connected {connected}", reports.len());
    if connected > 0 {
        print!(
            " (first CONNECT→accepted p50 {:.2} s, p99 {:.2} s; {:.0}% of it the devices' own backoff)",
            percentile(&times, 0.50).as_secs_f64(),
            percentile(&times, 0.99).as_secs_f64(),
            100.0 * backoff.as_secs_f64() / total.as_secs_f64().max(f64::EPSILON)
        );
    }
    println!(
        "   never accepted {}   unexpected {wrong}",
        reports.len() - connected
    );
    Ok(wrong)
}

/// The last Lambda run for the device's certificate (a device that reconnected while pending
/// published the event again).
fn last_activation<'a>(
    activations: &'a [Activation],
    device: &FleetDevice,
) -> Option<&'a Activation> {
    activations
        .iter()
        .filter(|a| a.certificate_id == device.certificate_id)
        .find(|a| a.outcome == "activated" || a.outcome == "rejected")
        .or_else(|| {
            activations
                .iter()
                .rev()
                .find(|a| a.certificate_id == device.certificate_id)
        })
}

/// The `q` quantile of sorted `times` (nearest rank).
fn percentile(times: &[Duration], q: f64) -> Duration {
    if times.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((q * times.len() as f64).ceil() as usize).clamp(1, times.len());
    times[rank - 1]
}
