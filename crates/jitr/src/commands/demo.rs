//! `jitr demo`: the whole JITR loop on this machine. A local moto server stands in for AWS
//! IoT (or `--endpoint-url` names another), the real `bootstrap` Lambda binary runs through a
//! Lambda Runtime API emulator, and an allowlist fleet holds all devices but a few.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use aws_sdk_iot::types::CertificateStatus;
use factory_ca::{
    issue_batch, BatchOptions, Ca, CaInit, DeviceId, IdFormat, KeyAlgorithm, KeyProtection,
};
use serde_json::Value;
use testkit::lambda::{Invocation, RuntimeEmulator};
use testkit::moto::MotoServer;
use testkit::proc::KillOnDrop;
use time::OffsetDateTime;

use super::Outcome;
use crate::aws::Aws;
use crate::cli::DemoArgs;

/// The device policy every activated certificate gets, from the one source in rules/.
const DEVICE_POLICY: &str = include_str!("../../../../rules/device-policy.json");
const POLICY_NAME: &str = "jitr-demo-device";
const ACCOUNT: &str = "123456789012";
const REGION: &str = "us-east-1";

/// One device's trip through the loop.
struct Row {
    device: String,
    certificate_id: String,
    expected: &'static str,
    outcome: String,
    elapsed: Duration,
}

fn bootstrap_path(given: Option<&Path>) -> Result<PathBuf> {
    if let Some(path) = given {
        return Ok(path.to_owned());
    }
    let exe = std::env::current_exe().context("cannot find the jitr executable")?;
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

pub(crate) fn demo(args: DemoArgs) -> Result<Outcome> {
    if args.devices == 0 {
        bail!("--devices must be at least 1");
    }
    let started = Instant::now();
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
    let sdk = rt.block_on(
        aws_config::defaults(aws_config::BehaviorVersion::latest())
            .endpoint_url(&endpoint)
            .region(aws_config::Region::new(REGION))
            .credentials_provider(aws_sdk_iot::config::Credentials::new(
                "demo",
                "demo",
                None,
                None,
                "jitr-demo",
            ))
            .load(),
    );
    let client = aws_sdk_iot::Client::new(&sdk);

    // The factory: a CA, registered with auto-registration, and N device certificates.
    let ca_dir = work.path().join("ca");
    CaInit {
        dir: ca_dir.clone(),
        root_subject: "O=jitr demo,CN=jitr demo fleet CA".parse()?,
        root_key: KeyAlgorithm::P256,
        root_days: 365,
        issuing: None,
        protection: KeyProtection::InsecurePlaintext,
    }
    .run(OffsetDateTime::now_utc())?;
    let ca = Ca::load(&ca_dir, None)?;
    let (ca_pem, ca_der) = super::ca::read_ca_pem(&ca_dir)?;
    let aws = Aws {
        config: sdk,
        endpoint: endpoint.clone(),
    };
    let ca_id = rt
        .block_on(super::ca::register_in_aws(
            &aws,
            Some(&ca),
            &ca_pem,
            &factory_ca::certificate_id(&ca_der),
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
    let ids: Vec<DeviceId> = (0..args.devices)
        .map(|n| {
            DeviceId::parse(
                &format!("{:032x}", 0xde40_0000_u64 + n as u64),
                IdFormat::BalenaUuid,
            )
        })
        .collect::<Result<_, _>>()?;
    let devices_dir = work.path().join("devices");
    let opts = BatchOptions {
        out_dir: devices_dir.clone(),
        key: KeyAlgorithm::P256,
        days: 365,
        jobs: 0,
        force: false,
        now: OffsetDateTime::now_utc(),
    };
    let report = issue_batch(&ca, &ids, &opts, &|| {})?;
    if let Some(f) = report.failures.first() {
        bail!("issuing {} failed: {}", f.id, f.error);
    }

    // The fleet: every device but every tenth one (and at least one when there are two or more).
    let outsider = |n: usize| {
        args.devices > 1 && n % 10 == 9
            || (args.devices > 1 && args.devices < 10 && n == args.devices - 1)
    };
    let allowlist = work.path().join("allowlist.txt");
    let members: Vec<&str> = ids
        .iter()
        .enumerate()
        .filter(|(n, _)| !outsider(*n))
        .map(|(_, id)| id.as_str())
        .collect();
    std::fs::write(&allowlist, members.join("\n"))?;

    // The cloud side: the real bootstrap, one process per concurrent Lambda instance.
    let emulator = RuntimeEmulator::start()?;
    let bootstrap = bootstrap_path(args.bootstrap.as_deref())?;
    let mut runtimes = Vec::new();
    for _ in 0..args.concurrency.max(1) {
        let child = Command::new(&bootstrap)
            .env_clear()
            .envs(emulator.lambda_env())
            .envs([
                ("JITR_TRUSTED_CA_IDS", ca_id.as_str()),
                ("JITR_POLICY_NAME", POLICY_NAME),
                ("JITR_FLEET_BACKEND", "allowlist"),
                ("AWS_ENDPOINT_URL", endpoint.as_str()),
                ("AWS_REGION", REGION),
                ("AWS_ACCESS_KEY_ID", "demo"),
                ("AWS_SECRET_ACCESS_KEY", "demo"),
                ("AWS_EC2_METADATA_DISABLED", "true"),
                ("JITR_LOG", "warn"),
            ])
            .env("JITR_ALLOWLIST", &allowlist)
            .stdout(Stdio::null())
            .spawn()
            .with_context(|| format!("cannot start {}", bootstrap.display()))?;
        runtimes.push(KillOnDrop(child));
    }

    // Each device's first connect, the way AWS IoT does it: the certificate registered
    // PENDING_ACTIVATION under its CA, and the registered event delivered to the Lambda.
    let next = AtomicUsize::new(0);
    let rows = Mutex::new(Vec::with_capacity(ids.len()));
    let failure = Mutex::new(None);
    std::thread::scope(|scope| {
        for _ in 0..args.concurrency.max(1) {
            scope.spawn(|| loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                let Some(id) = ids.get(n) else { break };
                match first_connect(&rt, &client, &emulator, &devices_dir, id, &ca, &ca_id) {
                    Ok((certificate_id, outcome, elapsed)) => {
                        rows.lock().unwrap_or_else(|e| e.into_inner()).push(Row {
                            device: id.to_string(),
                            certificate_id,
                            expected: if outsider(n) { "rejected" } else { "activated" },
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
    drop(runtimes);
    if let Some(e) = failure.into_inner().unwrap_or_else(|e| e.into_inner()) {
        return Err(e);
    }
    let mut rows = rows.into_inner().unwrap_or_else(|e| e.into_inner());
    rows.sort_by(|a, b| a.device.cmp(&b.device));

    // Check the registry, not just the answers: ACTIVE for members, REVOKED for the others.
    let mut wrong = 0;
    println!(
        "{:<32}  {:<16}  {:<10}  {:>8}",
        "device", "certificate id", "outcome", "time"
    );
    for row in &rows {
        let status = rt.block_on(
            client
                .describe_certificate()
                .certificate_id(&row.certificate_id)
                .send(),
        )?;
        let status = status
            .certificate_description()
            .and_then(|d| d.status())
            .cloned();
        let want = if row.expected == "activated" {
            CertificateStatus::Active
        } else {
            CertificateStatus::Revoked
        };
        let ok = row.outcome == row.expected && status.as_ref() == Some(&want);
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
    let total: Duration = rows.iter().map(|r| r.elapsed).sum();
    println!();
    println!(
        "devices {}   activated {activated}   rejected {rejected}   unexpected {wrong}",
        rows.len()
    );
    println!(
        "time per activation {:.1} ms (mean, {} concurrent bootstrap processes); whole demo {:.1} s",
        total.as_secs_f64() * 1000.0 / rows.len().max(1) as f64,
        args.concurrency.max(1),
        started.elapsed().as_secs_f64()
    );
    drop(moto);
    Ok(if wrong == 0 {
        Outcome::Success
    } else {
        Outcome::Failed
    })
}

fn first_connect(
    rt: &tokio::runtime::Runtime,
    client: &aws_sdk_iot::Client,
    emulator: &RuntimeEmulator,
    devices: &Path,
    id: &DeviceId,
    ca: &Ca,
    ca_id: &str,
) -> Result<(String, String, Duration)> {
    let pem = std::fs::read_to_string(devices.join(id.as_str()).join("device.crt"))?;
    let registered = rt
        .block_on(
            client
                .register_certificate()
                .certificate_pem(pem)
                .ca_certificate_pem(ca.cert_pem())
                .status(CertificateStatus::PendingActivation)
                .send(),
        )
        .context("RegisterCertificate")?;
    let certificate_id = registered
        .certificate_id()
        .context("no certificate id")?
        .to_owned();
    let event = testkit::iot::registered_event(&certificate_id, ca_id);
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
