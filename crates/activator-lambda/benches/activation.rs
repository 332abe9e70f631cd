//! Activation benchmark: `cargo bench -p activator-lambda --bench activation`.
//!
//! Runs the real `bootstrap` (release build) through the Lambda Runtime API emulator against a
//! moto server (AWS IoT) and the fake balena API, each behind a `testkit::proxy::Proxy` adding latency
//! that adds JITR_BENCH_LATENCY_MS (default 50) to every request, and prints:
//! - per-activation time, warm (median and p90 of JITR_BENCH_ACTIVATIONS, default 20, minus the
//!   first, which opens connections and fetches the CA certificate), with the requests seen by
//!   the proxies and the sequential round trips they form (target: <= 5 round trips, <= 300 ms,
//!   with the device's Thing principals read before attaching and the certificate's status
//!   read again before activating);
//! - the same activations done by a fully sequential 7-call handler in this process
//!   (DescribeCertificate, DescribeCACertificate, fleet GET, CreateThing, AttachPolicy,
//!   AttachThingPrincipal, UpdateCertificate, one after another, no cache: what the sample JITR
//!   Lambdas do) on JITR_BENCH_BASELINE (default 10) other devices, and the ratio;
//! - cold start, process spawn to the first `next` poll, median of JITR_BENCH_COLD_STARTS
//!   (default 10) fresh processes (target <= 30 ms);
//! - peak RSS (VmHWM) of the warm `bootstrap` after its activations (target <= 32 MiB);
//! - the same warm activations with the issuance ledger required (JITR_LEDGER=require, a
//!   DynamoDB table on moto behind the same proxy): the round trips up to UpdateCertificate
//!   ACTIVE must be as many as without it (the ledger is read alongside the fleet check), and the
//!   mark that follows the activation is shown with its cost to the invocation.
//!
//! Round trips are counted from the proxies' logs: requests of one activation are sorted by
//! arrival, and a request that arrives more than half the added latency after the previous
//! one starts a new round trip (a dependent request cannot arrive before the previous answer,
//! which the proxy holds back for the full latency; concurrent ones arrive together).
//!
//! Without `--bench` (`cargo test --benches`, `--all-targets`) it does a quick run: two
//! activations each way and one cold start, asserting outcomes but not timing targets.

#![allow(clippy::unwrap_used, clippy::expect_used)] // benchmark setup: a panic is the report

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use aws_sdk_iot::config::{BehaviorVersion, Credentials, Region};
use aws_sdk_iot::types::{AttributePayload, CertificateStatus};
use factory_ca::{certificates_from_pem_or_der, inspect_device_certificate, IdFormat};
use serde_json::Value;
use testkit::balena::FakeBalena;
use testkit::certs::TestCa;
use testkit::iot;
use testkit::lambda::{Invocation, RuntimeEmulator};
use testkit::moto::MotoServer;
use testkit::proc::KillOnDrop;
use testkit::proxy::{FaultPlan, ProxiedRequest, Proxy};

const FLEET: u64 = 1234567;
const KEY: &str = "bench-balena-key";
const POLICY: &str = "jitr-device";
const INVOKE_TIMEOUT: Duration = Duration::from_secs(30);

const TARGET_WARM_MS: f64 = 300.0;
const TARGET_ROUND_TRIPS: usize = 5;
const TARGET_COLD_MS: f64 = 30.0;
const TARGET_RSS_MIB: f64 = 32.0;

fn env_count(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

struct Settings {
    quick: bool,
    activations: usize,
    baseline: usize,
    cold_starts: usize,
    latency: Duration,
}

impl Settings {
    fn from_env() -> Settings {
        let quick = !std::env::args().any(|a| a == "--bench");
        let (activations, baseline, cold_starts) = if quick {
            (2, 2, 1)
        } else {
            (
                env_count("JITR_BENCH_ACTIVATIONS", 20).max(2),
                env_count("JITR_BENCH_BASELINE", 10).max(2),
                env_count("JITR_BENCH_COLD_STARTS", 10).max(1),
            )
        };
        Settings {
            quick,
            activations,
            baseline,
            cold_starts,
            latency: Duration::from_millis(env_count("JITR_BENCH_LATENCY_MS", 50) as u64),
        }
    }
}

/// moto and the fake balena API, each behind a latency proxy; a CA registered, the policy made.
struct World {
    rt: tokio::runtime::Runtime,
    _moto: MotoServer,
    balena: FakeBalena,
    moto_proxy: Proxy,
    balena_proxy: Proxy,
    ca: TestCa,
    ca_id: String,
    /// Talks to moto directly, not through the proxy: setup and checks.
    direct: aws_sdk_iot::Client,
    next_device: u32,
}

/// A device in the fleet whose certificate AWS IoT registered PENDING_ACTIVATION.
struct Device {
    uuid: String,
    certificate_id: String,
}

fn sdk_config(rt: &tokio::runtime::Runtime, endpoint: &str) -> aws_config::SdkConfig {
    rt.block_on(
        aws_config::defaults(BehaviorVersion::latest())
            .endpoint_url(endpoint)
            .region(Region::new("us-east-1"))
            .credentials_provider(Credentials::new("testing", "testing", None, None, "bench"))
            .load(),
    )
}

impl World {
    fn start(latency: Duration) -> World {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let testkit::world::World {
            moto,
            client: direct,
            ca,
            ca_id,
            balena,
            ..
        } = testkit::world::Spec::new("jitr bench CA")
            .policy(POLICY)
            .balena(FLEET, "acme/sensors", KEY)
            .start_on(&rt)
            .unwrap();
        let balena = balena.unwrap();
        let plan = FaultPlan {
            latency,
            ..FaultPlan::default()
        };
        let moto_proxy = Proxy::start(moto.addr(), plan.clone()).unwrap();
        let balena_proxy = Proxy::for_url(&balena.url(), plan).unwrap();
        World {
            rt,
            _moto: moto,
            balena,
            moto_proxy,
            balena_proxy,
            ca,
            ca_id,
            direct,
            next_device: 0,
        }
    }

    /// `n` fleet members, each certificate registered as on its first connect (directly, not timed).
    fn devices(&mut self, n: usize) -> Vec<Device> {
        (0..n)
            .map(|_| {
                self.next_device += 1;
                let uuid = format!("{:032x}", 0xbe0c_0000_u64 + u64::from(self.next_device));
                self.balena.add_device(FLEET, &uuid, true);
                let pem = self.ca.device_pem(&uuid).unwrap();
                let certificate_id = self
                    .rt
                    .block_on(iot::first_connect(&self.direct, &pem, &self.ca.cert_pem))
                    .unwrap();
                Device {
                    uuid,
                    certificate_id,
                }
            })
            .collect()
    }

    fn status(&self, certificate_id: &str) -> CertificateStatus {
        self.rt.block_on(async {
            let out = self
                .direct
                .describe_certificate()
                .certificate_id(certificate_id)
                .send()
                .await
                .unwrap();
            out.certificate_description()
                .unwrap()
                .status()
                .unwrap()
                .clone()
        })
    }

    fn event(&self, certificate_id: &str) -> Value {
        testkit::iot::registered_event(certificate_id, &self.ca_id)
    }

    /// What Lambda would give `bootstrap`: the runtime variables and the function's configuration.
    fn bootstrap_env(&self, emulator: &RuntimeEmulator) -> Vec<(&'static str, String)> {
        let mut env = emulator.lambda_env();
        env.extend([
            ("JITR_TRUSTED_CA_IDS", self.ca_id.clone()),
            ("JITR_POLICY_NAME", POLICY.to_owned()),
            ("BALENA_FLEET_ID", FLEET.to_string()),
            ("BALENA_API_KEY", KEY.to_owned()),
            ("BALENA_API_URL", self.balena_proxy.url()),
            ("AWS_ENDPOINT_URL", self.moto_proxy.url()),
            ("AWS_REGION", "us-east-1".to_owned()),
            ("AWS_ACCESS_KEY_ID", "testing".to_owned()),
            ("AWS_SECRET_ACCESS_KEY", "testing".to_owned()),
            ("AWS_EC2_METADATA_DISABLED", "true".to_owned()),
            ("AWS_MAX_ATTEMPTS", "3".to_owned()),
        ]);
        env
    }

    /// A ledger table on moto listing `devices`' certificates (written directly); the
    /// variables that make bootstrap require it.
    fn ledger(&self, devices: &[Device]) -> Vec<(&'static str, String)> {
        use aws_sdk_dynamodb::types::AttributeValue;
        let sdk = self.rt.block_on(iot::sdk_config(&self._moto));
        let dynamodb = aws_sdk_dynamodb::Client::new(&sdk);
        self.rt.block_on(async {
            testkit::dynamodb::create_table(&dynamodb, "bench-ledger", "certificate_id")
                .await
                .unwrap();
            for device in devices {
                dynamodb
                    .put_item()
                    .table_name("bench-ledger")
                    .item(
                        "certificate_id",
                        AttributeValue::S(device.certificate_id.clone()),
                    )
                    .item("device_id", AttributeValue::S(device.uuid.clone()))
                    .item("status", AttributeValue::S("issued".into()))
                    .send()
                    .await
                    .unwrap();
            }
        });
        vec![
            ("JITR_LEDGER_TABLE", "bench-ledger".to_owned()),
            ("JITR_LEDGER", "require".to_owned()),
        ]
    }

    /// Positions in both proxy logs, to read what one activation sent.
    fn mark(&self) -> (usize, usize) {
        (self.moto_proxy.count(), self.balena_proxy.count())
    }

    /// Requests since `mark`, both services, in arrival order.
    fn requests_since(
        &self,
        (moto, balena): (usize, usize),
    ) -> Vec<(&'static str, ProxiedRequest)> {
        let mut all: Vec<_> = self
            .moto_proxy
            .requests_since(moto)
            .into_iter()
            .map(|r| ("iot", r))
            .chain(
                self.balena_proxy
                    .requests_since(balena)
                    .into_iter()
                    .map(|r| ("balena", r)),
            )
            .collect();
        all.sort_by_key(|(_, r)| r.arrived);
        all
    }
}

/// The `bootstrap` process; killed and reaped when dropped.
struct Bootstrap {
    child: KillOnDrop,
    log: tempfile::NamedTempFile,
}

impl Bootstrap {
    fn spawn(env: &[(&'static str, String)]) -> Bootstrap {
        let log = tempfile::NamedTempFile::new().unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_bootstrap"))
            .env_clear()
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .stdin(Stdio::null())
            .stdout(log.reopen().unwrap())
            .stderr(log.reopen().unwrap())
            .spawn()
            .unwrap();
        Bootstrap {
            child: KillOnDrop(child),
            log,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.log.path()).unwrap_or_default()
    }

    /// Waits for the runtime's first `next` poll and returns when it arrived.
    fn first_poll(&mut self, emulator: &RuntimeEmulator) -> Instant {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(at) = emulator.first_poll_at() {
                return at;
            }
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!(
                    "bootstrap exited with {status} before polling:\n{}",
                    self.log()
                );
            }
            assert!(
                Instant::now() < deadline,
                "bootstrap did not poll within 20 s:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    /// Peak resident set size so far (VmHWM), in bytes.
    fn peak_rss(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        let kib: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmHWM in /proc/<pid>/status");
        kib * 1024
    }
}

/// One activation as measured.
struct Sample {
    started: Instant,
    took: Duration,
    requests: Vec<(&'static str, ProxiedRequest)>,
}

impl Sample {
    /// Sequential round trips: requests more than half the latency apart start a new one.
    fn round_trips(&self, latency: Duration) -> usize {
        trips(self.requests.iter(), latency)
    }

    /// The round trips up to and including UpdateCertificate (the moment the device may
    /// connect), and how long after the invocation began that request arrived.
    fn to_activation(&self, latency: Duration) -> (usize, Duration) {
        let upto = self
            .requests
            .iter()
            .position(|(s, r)| operation(s, r) == "UpdateCertificate")
            .expect("an UpdateCertificate in every activation");
        let at = self.requests[upto].1.arrived.duration_since(self.started);
        (trips(self.requests[..=upto].iter(), latency), at)
    }
}

/// Round trips in `requests` (arrival order): one more whenever a request arrives more than
/// half the latency after the one before it.
fn trips<'a>(
    requests: impl Iterator<Item = &'a (&'static str, ProxiedRequest)>,
    latency: Duration,
) -> usize {
    let mut trips = 0;
    let mut last: Option<Instant> = None;
    for (_, r) in requests {
        if last.is_none_or(|l| r.arrived.duration_since(l) > latency / 2) {
            trips += 1;
        }
        last = Some(r.arrived);
    }
    trips
}

impl Sample {
    /// The requests as `op ‖ op → op ...`, grouped by round trip.
    fn timeline(&self, latency: Duration) -> String {
        let mut out = String::new();
        let mut last: Option<Instant> = None;
        for (service, r) in &self.requests {
            match last {
                None => {}
                Some(l) if r.arrived.duration_since(l) > latency / 2 => out.push_str(" → "),
                Some(_) => out.push_str(" ‖ "),
            }
            out.push_str(&operation(service, r));
            last = Some(r.arrived);
        }
        out
    }
}

/// A readable name for a proxied request (aws-sdk-iot REST paths, balena OData resources).
fn operation(service: &str, r: &ProxiedRequest) -> String {
    let path = r.target.split('?').next().unwrap_or_default();
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let name = match (service, r.method.as_str(), segments.as_slice()) {
        ("iot", "GET", ["certificates", _]) => "DescribeCertificate",
        ("iot", "GET", ["cacertificate", _]) => "DescribeCACertificate",
        ("iot", "POST", ["things", _]) => "CreateThing",
        ("iot", "PUT", ["target-policies", _]) => "AttachPolicy",
        ("iot", "PUT", ["things", _, "principals"]) => "AttachThingPrincipal",
        ("iot", "GET", ["things", _, "principals"]) => "ListThingPrincipals",
        ("iot", "PUT", ["certificates", _]) => "UpdateCertificate",
        ("iot", "POST", []) if r.body.contains("UpdateExpression") => "DynamoDB UpdateItem",
        ("iot", "POST", []) if r.body.contains("ConsistentRead") => "DynamoDB GetItem",
        ("balena", "GET", ["v7", "device"]) => "GET balena device",
        ("balena", "GET", ["v7", app]) if app.starts_with("application") => {
            "GET balena application"
        }
        _ => return format!("{service} {} {path}", r.method),
    };
    name.to_owned()
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Median of a non-empty list.
fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Nearest-rank percentile of a non-empty list.
fn percentile(values: &[f64], p: f64) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}

fn verdict(ok: bool) -> &'static str {
    if ok {
        "ok"
    } else {
        "MISSED"
    }
}

/// Activations through `bootstrap`: the samples (first = warm-up) and the process's peak RSS.
fn run_bootstrap(
    world: &World,
    devices: &[Device],
    extra_env: &[(&'static str, String)],
) -> (Vec<Sample>, u64, String) {
    let emulator = RuntimeEmulator::start().unwrap();
    let mut env = world.bootstrap_env(&emulator);
    env.extend_from_slice(extra_env);
    let mut bootstrap = Bootstrap::spawn(&env);
    bootstrap.first_poll(&emulator);
    let mut samples = Vec::new();
    for device in devices {
        let mark = world.mark();
        let started = Instant::now();
        let answer = emulator
            .invoke(world.event(&device.certificate_id), INVOKE_TIMEOUT)
            .unwrap_or_else(|e| panic!("{e:#}\n{}", bootstrap.log()));
        let took = started.elapsed();
        match &answer {
            Invocation::Response(v) if v["outcome"] == "activated" => {
                assert_eq!(v["thingName"], device.uuid.as_str());
            }
            other => panic!("{}: {other:?}\n{}", device.uuid, bootstrap.log()),
        }
        samples.push(Sample {
            started,
            took,
            requests: world.requests_since(mark),
        });
    }
    let rss = bootstrap.peak_rss();
    let log = bootstrap.log();
    drop(bootstrap);
    for device in devices {
        assert_eq!(
            world.status(&device.certificate_id),
            CertificateStatus::Active
        );
    }
    (samples, rss, log)
}

/// Cold starts: spawn to first `next` poll, each with a fresh emulator; and VmHWM at that point.
fn run_cold_starts(world: &World, n: usize) -> (Vec<f64>, Vec<f64>) {
    let mut starts = Vec::new();
    let mut rss = Vec::new();
    for _ in 0..n {
        let emulator = RuntimeEmulator::start().unwrap();
        let env = world.bootstrap_env(&emulator);
        let spawned = Instant::now();
        let mut bootstrap = Bootstrap::spawn(&env);
        let polled = bootstrap.first_poll(&emulator);
        starts.push(ms(polled.duration_since(spawned)));
        rss.push(bootstrap.peak_rss() as f64 / (1024.0 * 1024.0));
    }
    (starts, rss)
}

/// What the sample JITR Lambdas do: every call awaited in turn, the CA fetched every time.
async fn sequential_handler(
    iot: &aws_sdk_iot::Client,
    http: &reqwest::Client,
    balena_url: &str,
    certificate_id: &str,
) -> anyhow::Result<String> {
    let out = iot
        .describe_certificate()
        .certificate_id(certificate_id)
        .send()
        .await?;
    let cert = out
        .certificate_description()
        .ok_or_else(|| anyhow::anyhow!("no description"))?;
    anyhow::ensure!(
        cert.status() == Some(&CertificateStatus::PendingActivation),
        "not pending"
    );
    let arn = cert.certificate_arn().unwrap_or_default().to_owned();
    let ca_id = cert.ca_certificate_id().unwrap_or_default();
    let ca = iot
        .describe_ca_certificate()
        .certificate_id(ca_id)
        .send()
        .await?;
    let ca_pem = ca
        .certificate_description()
        .and_then(|d| d.certificate_pem())
        .unwrap_or_default();
    let der = certificates_from_pem_or_der(cert.certificate_pem().unwrap_or_default().as_bytes())
        .map_err(anyhow::Error::msg)?;
    let ca_der = certificates_from_pem_or_der(ca_pem.as_bytes()).map_err(anyhow::Error::msg)?;
    let inspection = inspect_device_certificate(
        &der[0],
        &factory_ca::InspectOptions {
            id_format: IdFormat::BalenaUuid,
            ca_der: Some(&ca_der[0]),
            now: time::OffsetDateTime::now_utc(),
            max_validity_days: None,
        },
    );
    if let Some(f) = inspection.first_failure() {
        anyhow::bail!("{}: {}", f.check, f.detail);
    }
    let device = inspection
        .device_id
        .ok_or_else(|| anyhow::anyhow!("no device id"))?
        .to_string();

    let url = format!(
        "{balena_url}/v7/device?$select=id,uuid,is_active&$filter=uuid%20eq%20'{device}'%20and%20belongs_to__application%20eq%20{FLEET}"
    );
    let answer: Value = http
        .get(url)
        .bearer_auth(KEY)
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    anyhow::ensure!(
        answer["d"].as_array().map(Vec::len) == Some(1) && answer["d"][0]["is_active"] == true,
        "not an active member: {answer}"
    );

    iot.create_thing()
        .thing_name(&device)
        .attribute_payload(
            AttributePayload::builder()
                .attributes("fleet", format!("balena-fleet-{FLEET}"))
                .build(),
        )
        .send()
        .await?;
    iot.attach_policy()
        .policy_name(POLICY)
        .target(&arn)
        .send()
        .await?;
    iot.attach_thing_principal()
        .thing_name(&device)
        .principal(&arn)
        .send()
        .await?;
    iot.update_certificate()
        .certificate_id(certificate_id)
        .new_status(CertificateStatus::Active)
        .send()
        .await?;
    Ok(device)
}

/// The baseline handler on `devices` through the same proxies (first = warm-up).
fn run_baseline(world: &World, devices: &[Device]) -> Vec<Sample> {
    let iot = aws_sdk_iot::Client::new(&sdk_config(&world.rt, &world.moto_proxy.url()));
    let http = reqwest::Client::new();
    let balena_url = world.balena_proxy.url();
    let mut samples = Vec::new();
    for device in devices {
        let mark = world.mark();
        let started = Instant::now();
        let thing = world
            .rt
            .block_on(sequential_handler(
                &iot,
                &http,
                &balena_url,
                &device.certificate_id,
            ))
            .unwrap();
        let took = started.elapsed();
        assert_eq!(thing, device.uuid);
        samples.push(Sample {
            started,
            took,
            requests: world.requests_since(mark),
        });
    }
    for device in devices {
        assert_eq!(
            world.status(&device.certificate_id),
            CertificateStatus::Active
        );
    }
    samples
}

fn main() {
    let settings = Settings::from_env();
    let latency = settings.latency;
    let mut world = World::start(latency);
    let jitr_devices = world.devices(settings.activations);
    let baseline_devices = world.devices(settings.baseline);

    let (samples, peak_rss, log) = run_bootstrap(&world, &jitr_devices, &[]);
    let baseline = run_baseline(&world, &baseline_devices);
    let ledger_devices = world.devices(settings.activations);
    let ledger_env = world.ledger(&ledger_devices);
    let (with_ledger, _, _) = run_bootstrap(&world, &ledger_devices, &ledger_env);
    let (cold, cold_rss) = run_cold_starts(&world, settings.cold_starts);
    // The same activation with no latency added: what moto, the fake balena API and
    // bootstrap themselves take on this machine, which the round trips' latency adds to.
    let own_devices = world.devices(settings.activations);
    for proxy in [&world.moto_proxy, &world.balena_proxy] {
        proxy.set_plan(FaultPlan::default());
    }
    let (own, _, _) = run_bootstrap(&world, &own_devices, &[]);
    let own_median = median(&own[1..].iter().map(|s| ms(s.took)).collect::<Vec<_>>());

    let warm = &samples[1..];
    let warm_ms: Vec<f64> = warm.iter().map(|s| ms(s.took)).collect();
    let warm_requests: Vec<usize> = warm.iter().map(|s| s.requests.len()).collect();
    let warm_trips: Vec<usize> = warm.iter().map(|s| s.round_trips(latency)).collect();
    let base_warm = &baseline[1..];
    let base_ms: Vec<f64> = base_warm.iter().map(|s| ms(s.took)).collect();
    let base_trips: Vec<usize> = base_warm.iter().map(|s| s.round_trips(latency)).collect();

    let warm_median = median(&warm_ms);
    let warm_p90 = percentile(&warm_ms, 90.0);
    let base_median = median(&base_ms);
    let cold_median = median(&cold);
    let rss_mib = peak_rss as f64 / (1024.0 * 1024.0);
    let max_trips = warm_trips.iter().copied().max().unwrap_or_default();
    let range = |v: &[usize]| {
        let (lo, hi) = (
            v.iter().min().copied().unwrap_or_default(),
            v.iter().max().copied().unwrap_or_default(),
        );
        if lo == hi {
            lo.to_string()
        } else {
            format!("{lo}-{hi}")
        }
    };
    let decisions = log.lines().filter(|l| l.contains("\"decision\"")).count();
    let l = ms(latency);

    println!();
    println!(
        "activation benchmark{}: bootstrap ({}) via the Lambda Runtime API emulator, moto + fake balena API each behind a proxy adding {l:.0} ms to every request",
        if settings.quick { " (quick run: pass --bench for the full one)" } else { "" },
        if cfg!(debug_assertions) { "debug build" } else { "release build" },
    );
    println!("  {:<58} {:>12}   target", "", "measured");
    println!(
        "  {:<58} {:>9.1} ms   {:<16} {}",
        format!("warm activation, median of {}", warm.len()),
        warm_median,
        format!("<= {TARGET_WARM_MS:.0} ms"),
        verdict(warm_median <= TARGET_WARM_MS)
    );
    println!(
        "  {:<58} {:>9.1} ms",
        format!("warm activation, p90 of {}", warm.len()),
        warm_p90
    );
    println!(
        "  {:<58} {:>9.1} ms   (moto, balena fake and bootstrap's own work)",
        "the same, no latency added, median", own_median
    );
    if warm_median > TARGET_WARM_MS {
        let floor = max_trips as f64 * l + own_median;
        println!(
            "  (why: {max_trips} round trips x {l:.0} ms = {:.0} ms of latency, plus {own_median:.0} ms of the stand-ins' and bootstrap's own work = {floor:.0} ms before any waiting; the other {:.0} ms were not attributed here)",
            max_trips as f64 * l,
            (warm_median - floor).max(0.0)
        );
    }
    println!(
        "  {:<58} {:>12}   {:<16} {}",
        "warm activation, sequential round trips",
        range(&warm_trips),
        format!("<= {TARGET_ROUND_TRIPS}"),
        verdict(max_trips <= TARGET_ROUND_TRIPS)
    );
    println!(
        "  {:<58} {:>12}",
        "warm activation, requests (through both proxies)",
        range(&warm_requests)
    );
    println!(
        "  {:<58} {:>9.1} ms   ({} requests, {} round trips)",
        "first activation (new connections, DescribeCACertificate)",
        ms(samples[0].took),
        samples[0].requests.len(),
        samples[0].round_trips(latency)
    );
    println!(
        "  {:<58} {:>9.1} ms   {:<16} ({} round trips)",
        format!(
            "baseline: sequential 7-call handler, median of {}",
            base_warm.len()
        ),
        base_median,
        format!(">= {:.0} ms", 7.0 * l),
        range(&base_trips)
    );
    println!(
        "  {:<58} {:>10.2} x",
        "baseline / bootstrap (warm medians)",
        base_median / warm_median
    );
    println!(
        "  {:<58} {:>9.1} ms   {:<16} {}",
        format!(
            "cold start, spawn to first `next` poll, median of {}",
            cold.len()
        ),
        cold_median,
        format!("<= {TARGET_COLD_MS:.0} ms"),
        verdict(cold_median <= TARGET_COLD_MS)
    );
    println!(
        "  {:<58} {:>8.1} MiB   {:<16} {}",
        format!("peak RSS (VmHWM) after {} activations", samples.len()),
        rss_mib,
        format!("<= {TARGET_RSS_MIB:.0} MiB"),
        verdict(rss_mib <= TARGET_RSS_MIB)
    );
    println!(
        "  {:<58} {:>8.1} MiB",
        "peak RSS (VmHWM) at the first `next` poll, median",
        median(&cold_rss)
    );
    let activation_of = |samples: &[Sample]| {
        let (trips, at): (Vec<usize>, Vec<f64>) = samples[1..]
            .iter()
            .map(|s| {
                let (t, at) = s.to_activation(latency);
                (t, ms(at))
            })
            .unzip();
        (trips, median(&at))
    };
    let (plain_to_active, plain_at) = activation_of(&samples);
    let (ledger_to_active, ledger_at) = activation_of(&with_ledger);
    let ledger_ms: Vec<f64> = with_ledger[1..].iter().map(|s| ms(s.took)).collect();
    let ledger_trips: Vec<usize> = with_ledger[1..]
        .iter()
        .map(|s| s.round_trips(latency))
        .collect();
    let same_trips = ledger_to_active.iter().max() <= plain_to_active.iter().min();
    println!(
        "  {:<58} {:>12}   {:<16} {}",
        "round trips to UpdateCertificate ACTIVE, ledger required",
        range(&ledger_to_active),
        format!("= without ({})", range(&plain_to_active)),
        verdict(same_trips)
    );
    println!(
        "  {:<58} {:>9.1} ms   (without: {plain_at:.1} ms)",
        "UpdateCertificate ACTIVE sent after, ledger required, median", ledger_at
    );
    println!(
        "  {:<58} {:>9.1} ms   ({} round trips: the mark follows the activation)",
        "whole invocation, ledger required, median",
        median(&ledger_ms),
        range(&ledger_trips)
    );
    println!("  critical path, warm:     {}", warm[0].timeline(latency));
    println!(
        "  critical path, ledger:   {}",
        with_ledger[1].timeline(latency)
    );
    println!(
        "  critical path, first:    {}",
        samples[0].timeline(latency)
    );
    println!(
        "  critical path, baseline: {}",
        base_warm[0].timeline(latency)
    );
    println!(
        "  cold starts (ms): {}",
        cold.iter()
            .map(|c| format!("{c:.1}"))
            .collect::<Vec<_>>()
            .join(" ")
    );
    println!();

    assert_eq!(
        decisions,
        samples.len(),
        "one decision log line per activation"
    );
    assert!(
        same_trips,
        "the ledger added a round trip before the activation: {}",
        with_ledger[1].timeline(latency)
    );
    assert!(
        max_trips <= TARGET_ROUND_TRIPS,
        "a warm activation took {max_trips} sequential round trips: {}",
        warm.iter()
            .map(|s| s.timeline(latency))
            .collect::<Vec<_>>()
            .join("\n")
    );
}
