//! Issuance with the CA key in AWS KMS: `cargo bench -p ca-keys --bench kms_issue`.
//!
//! moto serves KMS behind the test kit's proxy, which adds 20 ms to every call (a KMS round
//! trip from a factory is tens of milliseconds). The same P-256 KMS key signs
//! `JITR_KMS_DEVICES` devices (default 600) through factory-ca's batch issuance, files and
//! manifest written: once one signature at a time (the baseline: what a signing loop that
//! waits for each answer does), then with the default workers at the default `--kms-rate`
//! (200/s), and at a rate above what the round trips allow, to show where the bound moves.
//! Prints certs/s, the ratio to the baseline, and each run's bound: the rate (after the
//! bucket's one-second burst) or workers / round trip, whichever is lower.
//!
//! Run by `cargo test` (without `--bench`) it does a quick pass over 20 devices.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a benchmark: a panic is the report

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ca_keys::{KeyUri, Options};
use factory_ca::{
    issue_batch, BatchOptions, Ca, CaInit, DeviceId, IdFormat, KeyAlgorithm, KeyProtection,
    RemoteKey, REMOTE_JOBS,
};
use testkit::moto::MotoServer;
use testkit::proxy::{FaultPlan, Proxy};
use time::OffsetDateTime;

const LATENCY: Duration = Duration::from_millis(20);

fn env_count(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A folder on tmpfs when there is one: the disk must not be what is measured.
fn scratch() -> tempfile::TempDir {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        tempfile::tempdir_in(shm).unwrap()
    } else {
        tempfile::tempdir().unwrap()
    }
}

fn ca_with(key: Arc<dyn RemoteKey>, dir: &Path) -> Ca {
    CaInit {
        dir: dir.to_owned(),
        root_subject: "O=Bench,CN=Bench KMS CA".parse().unwrap(),
        root_key: key.algorithm(),
        root_days: 3650,
        issuing: None,
        protection: KeyProtection::InsecurePlaintext,
        root_protection: None,
        remote_key: Some(Arc::clone(&key)),
    }
    .run(OffsetDateTime::now_utc())
    .unwrap();
    Ca::load_remote(dir, key).unwrap()
}

/// Issues `devices` devices with `jobs` workers: certs/s.
fn issue(ca: &Ca, out: &Path, devices: usize, jobs: usize, first: usize) -> f64 {
    let ids: Vec<DeviceId> = (first..first + devices)
        .map(|n| DeviceId::parse(&format!("{n:032x}"), IdFormat::BalenaUuid).unwrap())
        .collect();
    let opts = BatchOptions {
        out_dir: out.to_owned(),
        key: KeyAlgorithm::P256,
        days: 365,
        jobs,
        force: false,
        now: OffsetDateTime::now_utc(),
        rotation: None,
    };
    let started = Instant::now();
    let report = issue_batch(ca, &ids, &opts, &|| {}).unwrap();
    let elapsed = started.elapsed();
    assert!(report.failures.is_empty(), "{:?}", report.failures.first());
    assert_eq!(report.issued.len(), devices);
    devices as f64 / elapsed.as_secs_f64()
}

fn main() {
    let quick = !std::env::args().any(|a| a == "--bench");
    let devices = if quick {
        20
    } else {
        env_count("JITR_KMS_DEVICES", 600).max(20)
    };
    let moto = MotoServer::start().unwrap();
    let proxy = Proxy::for_url(
        &moto.endpoint(),
        FaultPlan {
            latency: LATENCY,
            ..FaultPlan::default()
        },
    )
    .unwrap();
    for (name, value) in [
        ("AWS_ENDPOINT_URL", proxy.url()),
        ("AWS_REGION", "us-east-1".to_owned()),
        ("AWS_ACCESS_KEY_ID", "testing".to_owned()),
        ("AWS_SECRET_ACCESS_KEY", "testing".to_owned()),
        ("AWS_EC2_METADATA_DISABLED", "true".to_owned()),
    ] {
        std::env::set_var(name, value);
    }
    let uri = KeyUri::AwsKms {
        key_id: "alias/bench".to_owned(),
        region: None,
    };
    let key = ca_keys::create(&uri, KeyAlgorithm::P256, &Options::default()).unwrap();
    let uri: KeyUri = key.uri().parse().unwrap();
    let open = |rate: f64| {
        ca_keys::open(
            &uri,
            &Options {
                kms_rate: rate,
                ..Options::default()
            },
        )
        .unwrap()
    };
    let work = scratch();

    // One signature at a time: every device waits a full round trip.
    let sequential_devices = (devices / 10).max(10);
    let sequential_ca = ca_with(open(ca_keys::DEFAULT_KMS_RATE), &work.path().join("seq-ca"));
    let sequential = issue(
        &sequential_ca,
        &work.path().join("seq"),
        sequential_devices,
        1,
        0,
    );
    let pooled_ca = ca_with(open(ca_keys::DEFAULT_KMS_RATE), &work.path().join("ca"));
    let pooled = issue(&pooled_ca, &work.path().join("pooled"), devices, 0, 1 << 20);
    let fast_ca = ca_with(open(10_000.0), &work.path().join("fast-ca"));
    let fast = issue(&fast_ca, &work.path().join("fast"), devices, 0, 2 << 20);
    let round_trip = sequential.recip();

    if quick {
        println!(
            "kms_issue (quick pass, {devices} devices): {pooled:.0} certs/s pooled, {sequential:.0} sequential"
        );
        return;
    }
    println!(
        "KMS issuance: a P-256 CA key in moto's KMS behind a proxy adding {} ms per call; files and manifest on tmpfs",
        LATENCY.as_millis()
    );
    println!("  {:<58} {:>10}   {:>8}   bound", "run", "certs/s", "ratio");
    println!(
        "  {:<58} {:>10.0}   {:>7.2}x   1 / round trip ({:.1} ms measured)",
        format!("baseline: one signature at a time ({sequential_devices} devices)"),
        sequential,
        1.0,
        round_trip * 1000.0
    );
    // The bucket starts full (one second's worth), then refills at the rate.
    let n = devices as f64;
    let bound = |rate: f64| {
        let by_rate = if n > rate {
            n / ((n - rate) / rate)
        } else {
            f64::INFINITY
        };
        by_rate.min(REMOTE_JOBS as f64 / round_trip)
    };
    println!(
        "  {:<58} {:>10.0}   {:>7.2}x   {:.0}/s = min(--kms-rate {} after a one-second burst, {} workers / round trip)",
        format!(
            "{REMOTE_JOBS} workers, --kms-rate {} ({devices} devices)",
            ca_keys::DEFAULT_KMS_RATE
        ),
        pooled,
        pooled / sequential,
        bound(ca_keys::DEFAULT_KMS_RATE),
        ca_keys::DEFAULT_KMS_RATE,
        REMOTE_JOBS
    );
    println!(
        "  {:<58} {:>10.0}   {:>7.2}x   {:.0}/s = {} workers / round trip (moto's own speed caps it here)",
        format!("{REMOTE_JOBS} workers, no rate cap ({devices} devices)"),
        fast,
        fast / sequential,
        bound(f64::INFINITY),
        REMOTE_JOBS
    );
    println!(
        "  KMS Sign requests through the proxy: {}",
        proxy
            .requests()
            .iter()
            .filter(|r| r.body.contains("SigningAlgorithm"))
            .count()
    );
}
