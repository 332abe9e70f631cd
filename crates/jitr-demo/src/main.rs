//! `jitr-demo`: the whole JITR loop on this machine, nothing reaching AWS. A local moto server
//! stands in for AWS IoT (or `--endpoint-url` names another), the real `bootstrap` Lambda binary
//! runs through a Lambda Runtime API emulator, and an allowlist fleet holds all devices but a
//! few. `scripts/demo` builds and runs it.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use activator::aws::Session;
use activator::registration::register_ca;
use activator::CertificateId;
use anyhow::{bail, Context, Result};
use aws_sdk_iot::types::CertificateStatus;
use clap::Parser;
use factory_ca::{
    issue_batch, BatchOptions, Ca, CaInit, DeviceId, IdFormat, KeyAlgorithm, KeyProtection,
};
use serde_json::Value;
use testkit::lambda::{Invocation, RuntimeEmulator};
use testkit::moto::MotoServer;
use testkit::proc::KillOnDrop;
use time::OffsetDateTime;

/// The device policy every activated certificate gets, from the one source in rules/.
const DEVICE_POLICY: &str = include_str!("../../../rules/device-policy.json");
const POLICY_NAME: &str = "jitr-demo-device";
const ACCOUNT: &str = "123456789012";
const REGION: &str = "us-east-1";

/// Run the whole JITR loop locally: moto for AWS IoT, the real bootstrap Lambda.
#[derive(Debug, Parser)]
#[command(name = "jitr-demo", version, about)]
struct Args {
    /// How many devices to issue and connect.
    #[arg(long, default_value_t = 10, value_name = "N")]
    devices: usize,
    /// Use this AWS IoT endpoint (e.g. a running moto server) instead of starting moto.
    #[arg(long, value_name = "URL")]
    endpoint_url: Option<String>,
    /// The `bootstrap` binary [default: next to this program].
    #[arg(long, value_name = "FILE")]
    bootstrap: Option<PathBuf>,
    /// Concurrent Lambda instances (bootstrap processes).
    #[arg(long, default_value_t = 4, value_name = "N")]
    concurrency: usize,
}

/// One device's trip through the loop.
struct Row {
    device: String,
    certificate_id: String,
    expected: &'static str,
    outcome: String,
    elapsed: Duration,
}

/// The local world: AWS IoT (moto), its client, the CA registered, the devices issued.
struct World {
    work: tempfile::TempDir,
    _moto: Option<MotoServer>,
    endpoint: String,
    rt: tokio::runtime::Runtime,
    client: aws_sdk_iot::Client,
    ca: Ca,
    ca_id: String,
    ids: Vec<DeviceId>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("jitr-demo: error: {}", activator::error_chain(e.as_ref()));
            ExitCode::from(1)
        }
    }
}

fn run(args: &Args) -> Result<bool> {
    if args.devices == 0 {
        bail!("--devices must be at least 1");
    }
    let started = Instant::now();
    let world = World::start(args)?;
    let allowlist = world.allowlist(args.devices)?;
    let emulator = RuntimeEmulator::start()?;
    let runtimes = world.start_runtimes(args, &emulator, &allowlist)?;
    let rows = world.connect_all(args, &emulator)?;
    drop(runtimes);
    let wrong = world.report(&rows)?;
    println!(
        "time per activation {:.1} ms (mean, {} concurrent bootstrap processes); whole demo {:.1} s",
        rows.iter().map(|r| r.elapsed).sum::<Duration>().as_secs_f64() * 1000.0
            / rows.len().max(1) as f64,
        args.concurrency.max(1),
        started.elapsed().as_secs_f64()
    );
    Ok(wrong == 0)
}

/// Every tenth device is a stranger (and at least one when there are two or more).
fn outsider(devices: usize, n: usize) -> bool {
    devices > 1 && n % 10 == 9 || (devices > 1 && devices < 10 && n == devices - 1)
}

fn bootstrap_path(given: Option<&Path>) -> Result<PathBuf> {
    if let Some(path) = given {
        return Ok(path.to_owned());
    }
    let exe = std::env::current_exe().context("cannot find the jitr-demo executable")?;
    let sibling = exe.with_file_name("bootstrap");
    if sibling.is_file() {
        Ok(sibling)
    } else {
        bail!("no bootstrap binary next to {}: build it (`cargo build --release -p activator-lambda`) or pass --bootstrap", exe.display())
    }
}

fn render_policy() -> String {
    DEVICE_POLICY
        .replace("${AWS::Partition}", "aws")
        .replace("${AWS::Region}", REGION)
        .replace("${AWS::AccountId}", ACCOUNT)
        .replace("${TopicPrefix}", "balena")
}

impl World {
    /// moto (unless an endpoint is given), the CA made and registered, the policy, the devices.
    fn start(args: &Args) -> Result<World> {
        let work = tempfile::tempdir().context("cannot create a work folder")?;
        let moto = match &args.endpoint_url {
            Some(_) => None,
            None => {
                eprintln!("starting a local moto server for AWS IoT...");
                Some(MotoServer::start()?)
            }
        };
        let endpoint = args
            .endpoint_url
            .clone()
            .or_else(|| moto.as_ref().map(MotoServer::endpoint))
            .unwrap_or_default();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        let sdk = rt.block_on(testkit::iot::sdk_config_for(&endpoint));
        let client = aws_sdk_iot::Client::new(&sdk);
        let ca = make_ca(work.path())?;
        let ca_id = CertificateId::parse(&factory_ca::certificate_id(ca.cert_der()))
            .map_err(anyhow::Error::msg)?;
        let registry = Session::from_config(sdk).registry();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        let ca_id = rt
            .block_on(register_ca(
                &registry,
                Some(&ca),
                ca.cert_pem(),
                &ca_id,
                deadline,
            ))?
            .id;
        rt.block_on(
            client
                .create_policy()
                .policy_name(POLICY_NAME)
                .policy_document(render_policy())
                .send(),
        )
        .context("CreatePolicy")?;
        let ids = issue(work.path(), &ca, args.devices)?;
        Ok(World {
            work,
            _moto: moto,
            endpoint,
            rt,
            client,
            ca,
            ca_id,
            ids,
        })
    }

    /// The fleet: every device but the outsiders, as an allowlist file.
    fn allowlist(&self, devices: usize) -> Result<PathBuf> {
        let path = self.work.path().join("allowlist.txt");
        let members: Vec<&str> = self
            .ids
            .iter()
            .enumerate()
            .filter(|(n, _)| !outsider(devices, *n))
            .map(|(_, id)| id.as_str())
            .collect();
        std::fs::write(&path, members.join("\n"))?;
        Ok(path)
    }

    /// The cloud side: the real bootstrap, one process per concurrent Lambda instance.
    fn start_runtimes(
        &self,
        args: &Args,
        emulator: &RuntimeEmulator,
        allowlist: &Path,
    ) -> Result<Vec<KillOnDrop>> {
        let bootstrap = bootstrap_path(args.bootstrap.as_deref())?;
        let mut runtimes = Vec::new();
        for _ in 0..args.concurrency.max(1) {
            let child = Command::new(&bootstrap)
                .env_clear()
                .envs(emulator.lambda_env())
                .envs([
                    ("JITR_TRUSTED_CA_IDS", self.ca_id.as_str()),
                    ("JITR_POLICY_NAME", POLICY_NAME),
                    ("JITR_FLEET_BACKEND", "allowlist"),
                    ("AWS_ENDPOINT_URL", self.endpoint.as_str()),
                    ("AWS_REGION", REGION),
                    ("AWS_ACCESS_KEY_ID", "demo"),
                    ("AWS_SECRET_ACCESS_KEY", "demo"),
                    ("AWS_EC2_METADATA_DISABLED", "true"),
                    ("JITR_LOG", "warn"),
                ])
                .env("JITR_ALLOWLIST", allowlist)
                .stdout(Stdio::null())
                .spawn()
                .with_context(|| format!("cannot start {}", bootstrap.display()))?;
            runtimes.push(KillOnDrop(child));
        }
        Ok(runtimes)
    }

    /// Every device's first connect, `--concurrency` at a time.
    fn connect_all(&self, args: &Args, emulator: &RuntimeEmulator) -> Result<Vec<Row>> {
        let next = AtomicUsize::new(0);
        let rows = Mutex::new(Vec::with_capacity(self.ids.len()));
        let failure = Mutex::new(None);
        std::thread::scope(|scope| {
            for _ in 0..args.concurrency.max(1) {
                scope.spawn(|| loop {
                    let n = next.fetch_add(1, Ordering::Relaxed);
                    let Some(id) = self.ids.get(n) else { break };
                    match self.first_connect(emulator, id) {
                        Ok((certificate_id, outcome, elapsed)) => {
                            rows.lock().unwrap_or_else(|e| e.into_inner()).push(Row {
                                device: id.to_string(),
                                certificate_id,
                                expected: if outsider(args.devices, n) {
                                    "rejected"
                                } else {
                                    "activated"
                                },
                                outcome,
                                elapsed,
                            })
                        }
                        Err(e) => {
                            failure
                                .lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .get_or_insert(e.context(format!("device {id}")));
                            break;
                        }
                    }
                });
            }
        });
        if let Some(e) = failure.into_inner().unwrap_or_else(|e| e.into_inner()) {
            return Err(e);
        }
        let mut rows = rows.into_inner().unwrap_or_else(|e| e.into_inner());
        rows.sort_by(|a, b| a.device.cmp(&b.device));
        Ok(rows)
    }

    /// A device's first connect, the way AWS IoT does it: the certificate registered
    /// PENDING_ACTIVATION under its CA, and the registered event delivered to the Lambda.
    fn first_connect(
        &self,
        emulator: &RuntimeEmulator,
        id: &DeviceId,
    ) -> Result<(String, String, Duration)> {
        let pem = std::fs::read_to_string(
            self.work
                .path()
                .join("devices")
                .join(id.as_str())
                .join("device.crt"),
        )?;
        let certificate_id = self.rt.block_on(testkit::iot::first_connect(
            &self.client,
            &pem,
            self.ca.cert_pem(),
        ))?;
        let event = testkit::iot::registered_event(&certificate_id, &self.ca_id);
        let start = Instant::now();
        let outcome = match emulator.invoke(event, Duration::from_secs(30))? {
            Invocation::Response(v) => v
                .get("outcome")
                .and_then(Value::as_str)
                .unwrap_or("?")
                .to_owned(),
            Invocation::Error {
                error_type,
                error_message,
            } => format!("error {error_type}: {error_message}"),
        };
        Ok((certificate_id, outcome, start.elapsed()))
    }

    /// Prints one row per device, checked against the registry (ACTIVE for members, REVOKED
    /// for the others), and the totals; returns how many were not as expected.
    fn report(&self, rows: &[Row]) -> Result<usize> {
        let mut wrong = 0;
        println!(
            "{:<32}  {:<16}  {:<10}  {:>8}",
            "device", "certificate id", "outcome", "time"
        );
        for row in rows {
            let status = self
                .rt
                .block_on(testkit::iot::status(&self.client, &row.certificate_id))?;
            let want = if row.expected == "activated" {
                CertificateStatus::Active
            } else {
                CertificateStatus::Revoked
            };
            let ok = row.outcome == row.expected && status == want;
            if !ok {
                wrong += 1;
            }
            println!(
                "{:<32}  {:<16}  {:<10}  {:>6} ms{}",
                row.device,
                &row.certificate_id[..16],
                row.outcome,
                row.elapsed.as_millis(),
                if ok {
                    String::new()
                } else {
                    format!(
                        "  UNEXPECTED (wanted {}, registry says {status:?})",
                        row.expected
                    )
                }
            );
        }
        let activated = rows.iter().filter(|r| r.outcome == "activated").count();
        let rejected = rows.iter().filter(|r| r.outcome == "rejected").count();
        println!();
        println!(
            "devices {}   activated {activated}   rejected {rejected}   unexpected {wrong}",
            rows.len()
        );
        Ok(wrong)
    }
}

/// The factory's CA, in `dir/ca`.
fn make_ca(dir: &Path) -> Result<Ca> {
    let ca_dir = dir.join("ca");
    CaInit {
        dir: ca_dir.clone(),
        root_subject: "O=jitr demo,CN=jitr demo fleet CA".parse()?,
        root_key: KeyAlgorithm::P256,
        root_days: 365,
        issuing: None,
        protection: KeyProtection::InsecurePlaintext,
        root_protection: None,
    }
    .run(OffsetDateTime::now_utc())?;
    Ok(Ca::load(&ca_dir, None)?)
}

/// `devices` certificates into `dir/devices`.
fn issue(dir: &Path, ca: &Ca, devices: usize) -> Result<Vec<DeviceId>> {
    let ids: Vec<DeviceId> = (0..devices)
        .map(|n| {
            DeviceId::parse(
                &format!("{:032x}", 0xde40_0000_u64 + n as u64),
                IdFormat::BalenaUuid,
            )
        })
        .collect::<Result<_, _>>()?;
    let opts = BatchOptions {
        out_dir: dir.join("devices"),
        key: KeyAlgorithm::P256,
        days: 365,
        jobs: 0,
        force: false,
        now: OffsetDateTime::now_utc(),
    };
    let report = issue_batch(ca, &ids, &opts, &|| {})?;
    if let Some(f) = report.failures.first() {
        bail!("issuing {} failed: {}", f.id, f.error);
    }
    Ok(ids)
}
