//! `jitr status --manifest` over a large fleet: `cargo bench -p jitr --bench status`.
//!
//! moto holds `JITR_STATUS_DEVICES` devices (default 10,000), each an ACTIVE certificate
//! under the trusted CA with its Thing; the fake balena API holds the fleet; the manifest names
//! every certificate. The release `jitr status --manifest --json` reads it all, paced at AWS
//! IoT's default 10 requests a second per operation, and every device must come out `active`.
//! Target: within a minute. The baseline, measured in the same run over 300 devices and
//! extrapolated: a per-device loop (ListThingPrincipals, then DescribeCertificate for each
//! principal) at the same pace, which is what a script without bulk listings does.
//!
//! A real account holds other applications: `JITR_STATUS_FOREIGN` foreign Things (default
//! 1,000; attribute `app=facilities`, nothing attached, the kind `--fix` used to delete) and
//! the testkit's foreign set (a certificate of another CA, a Cognito identity) sit beside the
//! fleet. `status --fix --yes --delete-things` runs twice after the read, timed beside it, and
//! every foreign Thing must still be there, as planted.
//!
//! Run by `cargo test` (without `--bench`) it does a quick pass over 100 devices and 20 foreign
//! Things.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a benchmark: a panic is the report

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use futures::stream::{self, StreamExt};

const FLEET: u64 = 99;
const KEY: &str = "status-bench-key";

fn env_count(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let quick = !std::env::args().any(|a| a == "--bench");
    let devices = if quick {
        100
    } else {
        env_count("JITR_STATUS_DEVICES", 10_000)
    };
    let foreign_things = if quick {
        20
    } else {
        env_count("JITR_STATUS_FOREIGN", 1_000)
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
    } = testkit::world::Spec::new("status bench CA")
        .balena(FLEET, "acme/bench", KEY)
        .start_on(&rt)
        .unwrap();
    let balena = balena.unwrap();
    let work = tempfile::tempdir().unwrap();
    let manifest = work.path().join("manifest.jsonl");

    // The fleet: a certificate per device, issued here, registered ACTIVE, its Thing made.
    let setup = Instant::now();
    let mut lines = std::fs::File::create(&manifest).unwrap();
    let mut pems = Vec::with_capacity(devices);
    for n in 0..devices {
        let id = format!("{n:032x}");
        let device = factory_ca::DeviceId::parse(&id, factory_ca::IdFormat::Any).unwrap();
        let issued = ca
            .ca
            .issue_device(
                &device,
                factory_ca::KeyAlgorithm::P256,
                365,
                time::OffsetDateTime::now_utc(),
            )
            .unwrap();
        writeln!(lines, "{}", serde_json::to_string(&issued.entry).unwrap()).unwrap();
        balena.add_device(FLEET, &id, true);
        pems.push((id, issued.cert_pem));
    }
    drop(lines);
    rt.block_on(
        stream::iter(&pems)
            .map(|(id, pem)| {
                let client = client.clone();
                let ca_pem = ca.cert_pem.clone();
                async move {
                    client
                        .register_certificate()
                        .certificate_pem(pem)
                        .ca_certificate_pem(ca_pem)
                        .status(aws_sdk_iot::types::CertificateStatus::Active)
                        .send()
                        .await
                        .unwrap();
                    client.create_thing().thing_name(id).send().await.unwrap();
                }
            })
            .buffer_unordered(8)
            .collect::<Vec<()>>(),
    );
    let foreign_names: Vec<String> = (0..foreign_things)
        .map(|n| format!("facilities-sensor-{n}"))
        .collect();
    rt.block_on(
        stream::iter(&foreign_names)
            .map(|name| {
                let client = client.clone();
                async move {
                    client
                        .create_thing()
                        .thing_name(name)
                        .attribute_payload(
                            aws_sdk_iot::types::AttributePayload::builder()
                                .attributes("app", "facilities")
                                .build(),
                        )
                        .send()
                        .await
                        .unwrap();
                }
            })
            .buffer_unordered(8)
            .collect::<Vec<()>>(),
    );
    let foreign = rt
        .block_on(testkit::foreign::Foreign::plant(&moto, &client))
        .unwrap();
    let setup = setup.elapsed();

    let jitr = env!("CARGO_BIN_EXE_jitr");
    let mut env = moto.aws_env();
    env.extend([
        ("JITR_TRUSTED_CA_IDS", ca_id),
        ("JITR_POLICY_NAME", "jitr-device".to_owned()),
        ("JITR_FLEET_BACKEND", "balena".to_owned()),
        ("BALENA_API_URL", balena.url()),
        ("BALENA_API_KEY", KEY.to_owned()),
        ("BALENA_FLEET_ID", FLEET.to_string()),
    ]);
    let status = |extra: &[&str]| {
        let started = Instant::now();
        let out = Command::new(jitr)
            .args(["status", "--json", "--manifest"])
            .arg(&manifest)
            .args(extra)
            .env_clear()
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .env("AWS_CONFIG_FILE", "/nonexistent")
            .env("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let elapsed = started.elapsed();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let value: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(value["summary"]["active"], devices, "{}", value["summary"]);
        (elapsed, value)
    };
    let (elapsed, _) = status(&[]);
    // --fix twice: nothing of the fleet needs fixing, and nothing foreign may be touched.
    let (first_fix, value) = status(&["--fix", "--yes", "--delete-things"]);
    assert_eq!(value["fixes"].as_array().map(Vec::len), Some(0), "{value}");
    let (second_fix, _) = status(&["--fix", "--yes", "--delete-things"]);
    let left: std::collections::HashSet<String> = rt.block_on(async {
        let mut names = std::collections::HashSet::new();
        let mut token = None;
        loop {
            let page = client
                .list_things()
                .set_next_token(token)
                .send()
                .await
                .unwrap();
            names.extend(
                page.things()
                    .iter()
                    .filter_map(|t| t.thing_name().map(str::to_owned)),
            );
            token = page.next_token().map(str::to_owned);
            if token.is_none() {
                break names;
            }
        }
    });
    let missing = foreign_names.iter().filter(|n| !left.contains(*n)).count();
    assert_eq!(missing, 0, "{missing} foreign Things deleted");
    rt.block_on(foreign.assert_untouched(&client)).unwrap();

    // The baseline: per device, ListThingPrincipals, then DescribeCertificate per principal,
    // each operation paced at 10 a second as AWS would allow.
    let sample = devices.min(300);
    let pace = pace::Pace::new(10.0);
    let pace2 = pace::Pace::new(10.0);
    let baseline_start = Instant::now();
    rt.block_on(
        stream::iter(pems.iter().take(sample))
            .map(|(id, _)| {
                let (client, pace, pace2) = (client.clone(), &pace, &pace2);
                async move {
                    pace.take().await;
                    let principals = client
                        .list_thing_principals()
                        .thing_name(id)
                        .send()
                        .await
                        .unwrap();
                    for arn in principals.principals() {
                        pace2.take().await;
                        let cert = arn.rsplit('/').next().unwrap_or_default();
                        let _ = client
                            .describe_certificate()
                            .certificate_id(cert)
                            .send()
                            .await;
                    }
                }
            })
            .buffer_unordered(8)
            .collect::<Vec<()>>(),
    );
    let per_device = baseline_start.elapsed().as_secs_f64() / sample as f64;
    let baseline = Duration::from_secs_f64(per_device * devices as f64);

    if quick {
        println!(
            "status (quick pass, {devices} devices, {foreign_things} foreign Things): {:.1} s; --fix twice {:.1} s, {:.1} s; foreign untouched",
            elapsed.as_secs_f64(),
            first_fix.as_secs_f64(),
            second_fix.as_secs_f64()
        );
        return;
    }
    println!(
        "status benchmark: {devices} devices in moto (ACTIVE certificate + Thing each) and {foreign_things} foreign Things plus a foreign certificate and Cognito identity (set up in {:.0} s), the fleet on the fake balena API, --manifest; reads paced at 10/s per operation",
        setup.as_secs_f64()
    );
    println!(
        "  jitr status --fix --yes --delete-things, twice: {:.1} s, {:.1} s; all {foreign_things} foreign Things and the foreign certificate and identity untouched",
        first_fix.as_secs_f64(),
        second_fix.as_secs_f64()
    );
    println!(
        "  jitr status --manifest --json         {:>8.1} s   target <= 60 s: {}",
        elapsed.as_secs_f64(),
        if elapsed <= Duration::from_secs(60) {
            "ok"
        } else {
            "MISSED"
        }
    );
    println!(
        "  baseline: per-device reads at 10/s     {:>8.1} s   (measured over {sample} devices, extrapolated)",
        baseline.as_secs_f64()
    );
    println!(
        "  baseline / jitr status                 {:>8.1} x",
        baseline.as_secs_f64() / elapsed.as_secs_f64()
    );
}
