//! A balena fleet's first connects, as the devices see them: from each device's first CONNECT
//! to its accepted CONNECT, with the device's own retry backoff in between.
//!
//! `cargo build --release -p activator-lambda && cargo bench -p jitr --bench first_connect`
//! provisions a fleet through `jitr` in a [`DeviceWorld`] (moto for AWS IoT, the test kit's
//! MQTT stand-in, the fake balena API, `JITR_FC_RUNTIMES` real `bootstrap` processes, default
//! 4, behind the topic rule), then every device connects at once with `jitr device connect`:
//! the first CONNECT is closed while the certificate is pending, `bootstrap` activates it, a
//! later attempt is accepted. It prints p50 and p99 of first CONNECT → accepted CONNECT over
//! 20 devices (target p50 <= 1 s, p99 <= 2 s), the share of that time which is the devices' own
//! backoff, the same for 200 devices, and the baseline: the same 20-device first connect made
//! by the library balena's cloud-relay uses (Node `aws-iot-device-sdk` 2.2.12, configured as
//! cloud-relay configures it, with its default reconnect timing), measured in the same run.
//!
//! Run by `cargo test` (without `--bench`) it does a quick pass over 5 devices.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a benchmark: a panic is the report

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use testkit::first_connect::{DeviceWorld, Fleet, WorldOptions};

const MESSAGE: &str = "{\"temperature\":21.5}";
const DEADLINE: Duration = Duration::from_secs(60);

fn env_count(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn binaries() -> (PathBuf, PathBuf) {
    let jitr = PathBuf::from(env!("CARGO_BIN_EXE_jitr"));
    let bootstrap = jitr.with_file_name("bootstrap");
    assert!(
        bootstrap.exists(),
        "{} is missing: build it first (cargo build --release -p activator-lambda)",
        bootstrap.display()
    );
    (jitr, bootstrap)
}

/// The `q` quantile of sorted `times` (nearest rank).
fn percentile(times: &[Duration], q: f64) -> Duration {
    let rank = ((q * times.len() as f64).ceil() as usize).clamp(1, times.len());
    times[rank - 1]
}

/// First CONNECT → accepted, for every device, and the devices' backoff in that time.
struct Figures {
    times: Vec<Duration>,
    backoff: Option<Duration>,
    elapsed: Duration,
}

impl Figures {
    fn p(&self, q: f64) -> Duration {
        percentile(&self.times, q)
    }

    fn backoff_share(&self) -> Option<f64> {
        let total: Duration = self.times.iter().sum();
        self.backoff
            .map(|b| b.as_secs_f64() / total.as_secs_f64().max(f64::EPSILON))
    }
}

/// A fresh world with `devices` fleet members provisioned through `jitr`.
fn fleet(devices: usize, runtimes: usize) -> (DeviceWorld, Fleet) {
    let (jitr, bootstrap) = binaries();
    let mut world = DeviceWorld::start(WorldOptions::default()).unwrap();
    let fleet = world
        .provision(&jitr, &bootstrap, runtimes, devices, 0, &|_| {})
        .unwrap();
    (world, fleet)
}

/// `devices` devices connect at once with `jitr device connect`.
fn with_jitr(devices: usize, runtimes: usize) -> Figures {
    let (jitr, _) = binaries();
    let (world, fleet) = fleet(devices, runtimes);
    let started = Instant::now();
    let reports = world
        .connect_all(&jitr, &fleet, MESSAGE, &|_| DEADLINE, &|_, _| {})
        .unwrap();
    let elapsed = started.elapsed();
    let mut times = Vec::new();
    let mut backoff = Duration::ZERO;
    for report in &reports {
        let after = report
            .connected_after
            .unwrap_or_else(|| panic!("{} was not accepted: {}", report.uuid, report.json));
        times.push(after);
        backoff += report.backoff;
    }
    let missing = world.wait_received_all(
        fleet.devices.iter().map(|d| d.topic.as_str()),
        Duration::from_secs(5),
    );
    assert!(missing.is_empty(), "messages never arrived on {missing:?}");
    times.sort();
    Figures {
        times,
        backoff: Some(backoff),
        elapsed,
    }
}

/// The same first connect made by cloud-relay's client library, one Node process per device,
/// each timed from its own start (the SDK connects at once) to its `connect` event.
fn with_cloud_relays_client(devices: usize, runtimes: usize) -> Figures {
    let clients = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients");
    assert!(
        clients.join("node_modules/aws-iot-device-sdk").exists(),
        "run scripts/setup first (it installs aws-iot-device-sdk)"
    );
    let (world, fleet) = fleet(devices, runtimes);
    let started = Instant::now();
    let mut children = Vec::new();
    for device in &fleet.devices {
        let mut command = Command::new("node");
        command
            .arg("cloud_relay.js")
            .arg(MESSAGE)
            .current_dir(&clients)
            .env_clear()
            .envs(&device.env)
            .env("RESIN_DEVICE_UUID", &device.uuid)
            .env("AWS_ROOT_CA_PATH", fleet.dir.path().join("aws-root.pem"))
            .env("TEST_PORT", world.endpoint().port().to_string())
            .env("SETTLE_MS", "200")
            .env("DEADLINE_MS", DEADLINE.as_millis().to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        if let Some(path) = std::env::var_os("PATH") {
            command.env("PATH", path);
        }
        children.push((device.uuid.clone(), command.spawn().expect("node")));
    }
    let mut times = Vec::new();
    for (uuid, child) in children {
        let out = child.wait_with_output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let connected = stdout
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|e| e["event"] == "connect")
            .and_then(|e| e["at_ms"].as_f64())
            .unwrap_or_else(|| panic!("{uuid} never connected: {stdout}"));
        times.push(Duration::from_secs_f64(connected / 1000.0));
    }
    let elapsed = started.elapsed();
    times.sort();
    Figures {
        times,
        backoff: None,
        elapsed,
    }
}

fn row(label: &str, f: &Figures, target: &str) {
    println!(
        "  {label:<52} {:>7.2} s {:>7.2} s {:>9} {:>8.1} s   {target}",
        f.p(0.50).as_secs_f64(),
        f.p(0.99).as_secs_f64(),
        f.backoff_share()
            .map_or("-".to_owned(), |s| format!("{:.0}%", s * 100.0)),
        f.elapsed.as_secs_f64(),
    );
}

fn main() {
    let quick = !std::env::args().any(|a| a == "--bench");
    let runtimes = env_count("JITR_FC_RUNTIMES", 4).max(1);
    if quick {
        let f = with_jitr(5, runtimes);
        println!(
            "first_connect (quick pass, 5 devices): p50 {:.2} s, p99 {:.2} s",
            f.p(0.50).as_secs_f64(),
            f.p(0.99).as_secs_f64()
        );
        return;
    }
    let small = env_count("JITR_FC_DEVICES", 20).max(1);
    let large = env_count("JITR_FC_LARGE", 200).max(1);
    println!(
        "first-connect benchmark: every device connects at once to the AWS IoT stand-in (TLS, \
         JITR, policy); {runtimes} release bootstrap processes via the Runtime API emulator; \
         moto; fake balena API"
    );
    let ours = with_jitr(small, runtimes);
    let baseline = with_cloud_relays_client(small, runtimes);
    let big = with_jitr(large, runtimes);
    println!(
        "  {:<52} {:>9} {:>9} {:>9} {:>10}",
        "first CONNECT → accepted CONNECT", "p50", "p99", "backoff", "all done"
    );
    let verdict = |f: &Figures| {
        if f.p(0.50) <= Duration::from_secs(1) && f.p(0.99) <= Duration::from_secs(2) {
            "ok"
        } else {
            "MISSED"
        }
    };
    row(
        &format!("{small} devices, jitr device connect"),
        &ours,
        &format!("p50 <= 1 s, p99 <= 2 s: {}", verdict(&ours)),
    );
    row(
        &format!("{small} devices, cloud-relay's aws-iot-device-sdk (baseline)"),
        &baseline,
        "(SDK default reconnect timing)",
    );
    row(&format!("{large} devices, jitr device connect"), &big, "");
    println!(
        "  baseline / jitr: p50 {:.2}x, p99 {:.2}x",
        baseline.p(0.50).as_secs_f64() / ours.p(0.50).as_secs_f64(),
        baseline.p(0.99).as_secs_f64() / ours.p(0.99).as_secs_f64()
    );
}
