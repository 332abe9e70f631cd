//! A scheduled sweep's cost follows the work, not the fleet:
//! `cargo bench -p activator-lambda --bench sweep`.
//!
//! moto holds `JITR_SWEEP_ACTIVE` ACTIVE certificates (default 20,000) and `JITR_SWEEP_PENDING`
//! pending ones (default 50) spread among them, all under one CA and inside the sweep window;
//! one scheduled sweep through the real `bootstrap`, with Lambda's 30 s function timeout, must
//! decide every pending one. It prints the pages read, the sweep's time and the decisions, and
//! the time AWS IoT's ListCertificatesByCA quota (10 per second) would add to the same pages.
//!
//! Run by `cargo test` (without `--bench`) it does a quick pass: 2,000 and 10.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a benchmark: a panic is the report

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use aws_sdk_iot::types::CertificateStatus;
use futures::StreamExt;
use serde_json::json;
use testkit::iot;
use testkit::lambda::{Invocation, RuntimeEmulator};
use testkit::proc::KillOnDrop;

const FLEET: u64 = 5150;
const KEY: &str = "sweep-bench-key";
const POLICY: &str = "jitr-device";

fn env_count(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let quick = !std::env::args().any(|a| a == "--bench");
    let (active, pending) = if quick {
        (2_000, 10)
    } else {
        (
            env_count("JITR_SWEEP_ACTIVE", 20_000),
            env_count("JITR_SWEEP_PENDING", 50).max(1),
        )
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let testkit::world::World {
        moto,
        client,
        ca,
        ca_id,
        balena,
        ..
    } = testkit::world::Spec::new("sweep bench CA")
        .policy(POLICY)
        .balena(FLEET, "sweep-bench", KEY)
        .start_on(&rt)
        .unwrap();
    let balena = balena.unwrap();

    // Pending ones spread evenly among the active ones, registered in that order.
    let total = active + pending;
    let every = total / pending;
    let setup = Instant::now();
    let plan: Vec<(String, bool)> = (0..total)
        .map(|k| {
            (
                format!("{:032x}", 0x5e_0000_0000_u64 + k as u64),
                k % every == every - 1,
            )
        })
        .collect();
    let pending_ids: Vec<String> = rt.block_on(
        futures::stream::iter(plan.iter())
            .map(|(device, is_pending)| {
                let (client, ca) = (&client, &ca);
                async move {
                    let pem = ca.device_pem(device).unwrap();
                    let status = if *is_pending {
                        CertificateStatus::PendingActivation
                    } else {
                        CertificateStatus::Active
                    };
                    let out = client
                        .register_certificate()
                        .certificate_pem(pem)
                        .ca_certificate_pem(&ca.cert_pem)
                        .status(status)
                        .send()
                        .await
                        .unwrap();
                    is_pending.then(|| out.certificate_id().unwrap().to_owned())
                }
            })
            .buffered(16)
            .filter_map(|id| async move { id })
            .collect(),
    );
    for (device, is_pending) in &plan {
        if *is_pending {
            balena.add_device(FLEET, device, true);
        }
    }
    println!(
        "sweep: {active} ACTIVE and {} pending certificates under one CA, registered in {:.1} s",
        pending_ids.len(),
        setup.elapsed().as_secs_f64()
    );

    let emulator = RuntimeEmulator::start().unwrap();
    emulator.set_function_timeout(Duration::from_secs(30));
    let mut env = emulator.lambda_env();
    env.extend(moto.aws_env());
    env.extend([
        ("JITR_TRUSTED_CA_IDS", ca_id),
        ("JITR_POLICY_NAME", POLICY.to_owned()),
        ("BALENA_FLEET_ID", FLEET.to_string()),
        ("BALENA_API_KEY", KEY.to_owned()),
        ("BALENA_API_URL", balena.url()),
        ("JITR_SWEEP_MIN_AGE_SECONDS", "0".to_owned()),
        ("JITR_LOG", "warn".to_owned()),
    ]);
    let _bootstrap = KillOnDrop(
        Command::new(env!("CARGO_BIN_EXE_bootstrap"))
            .env_clear()
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let scheduled = json!({"source": "aws.events", "detail-type": "Scheduled Event", "detail": {}});
    let started = Instant::now();
    let answer = emulator.invoke(scheduled, Duration::from_secs(40)).unwrap();
    let took = started.elapsed();
    let report = match answer {
        Invocation::Response(v) => v[0].clone(),
        Invocation::Error {
            error_type,
            error_message,
        } => panic!("the sweep failed: {error_type}: {error_message}"),
    };
    let pages = report["pages"].as_u64().unwrap_or(0);
    let decided = report["activated"].as_u64().unwrap_or(0);
    println!(
        "  one scheduled sweep (30 s function timeout): {pages} pages, {} listed, {decided} of {} \
         pending activated, in {:.1} s",
        report["listed"],
        pending_ids.len(),
        took.as_secs_f64()
    );
    println!(
        "  on AWS, ListCertificatesByCA at its 10 per second quota would take at least {:.1} s \
         for those pages (within the 30 s)",
        pages as f64 / 10.0
    );
    let still_pending = pending_ids
        .iter()
        .filter(|id| {
            rt.block_on(iot::status(&client, id)).unwrap() == CertificateStatus::PendingActivation
        })
        .count();
    assert_eq!(
        still_pending, 0,
        "pending certificates left after the sweep"
    );
    assert_eq!(decided as usize, pending_ids.len());
}
