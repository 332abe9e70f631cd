//! `jitr register --status ACTIVE` over a factory batch: `cargo bench -p jitr --bench register`.
//!
//! `JITR_REGISTER_DEVICES` certificates (default 10,000) are issued in-process into the folder
//! layout `jitr issue` writes (devices/<id>/device.crt and the manifest), then the release
//! `jitr register --status ACTIVE --json` registers them in moto: each INACTIVE, its Thing,
//! policy and attachment, ACTIVE last, every operation paced at AWS IoT's default rate. Beside
//! the elapsed time: the quota-bound time, the least time AWS's default quotas allow (devices /
//! the rate of the slowest operation each device needs), and the ratio. A rerun then shows
//! what a resumed run costs when everything is done already.
//!
//! Run by `cargo test` (without `--bench`) it does a quick pass over 50 devices.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a benchmark: a panic is the report

use std::io::Write;
use std::process::{Command, Output, Stdio};
use std::time::Instant;

use operations::register::{RegisterRates, Wanted};
use testkit::iot;

const POLICY: &str = "jitr-device";

fn env_count(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn run(dir: &std::path::Path, env: &[(&'static str, String)]) -> (Output, f64) {
    let started = Instant::now();
    // JITR_REGISTER_BIN measures a copy, safe from a rebuild of the shared target folder.
    let jitr = std::env::var("JITR_REGISTER_BIN")
        .unwrap_or_else(|_| env!("CARGO_BIN_EXE_jitr").to_owned());
    let out = Command::new(jitr)
        .args([
            "register",
            "--manifest",
            "devices/manifest.jsonl",
            "--status",
            "ACTIVE",
            "--json",
        ])
        .current_dir(dir)
        .env_clear()
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .env("AWS_CONFIG_FILE", "/nonexistent")
        .env("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
        .env("JITR_POLICY_NAME", POLICY)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let elapsed = started.elapsed().as_secs_f64();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    (out, elapsed)
}

fn summary(out: &Output) -> serde_json::Value {
    let text = String::from_utf8_lossy(&out.stdout);
    let last = text.lines().last().unwrap_or_default();
    serde_json::from_str::<serde_json::Value>(last).unwrap()["summary"].clone()
}

fn main() {
    let quick = !std::env::args().any(|a| a == "--bench");
    let devices = if quick {
        50
    } else {
        env_count("JITR_REGISTER_DEVICES", 10_000)
    };
    let rt = testkit::world::runtime();
    let testkit::world::World {
        moto, client, ca, ..
    } = testkit::world::Spec::new("register bench CA")
        .policy(POLICY)
        .start_on(&rt)
        .unwrap();

    // The factory's batch, issued in-process (the fast path), laid out as `jitr issue` does.
    let work = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(work.path().join("ca")).unwrap();
    std::fs::write(work.path().join("ca/ca.crt"), &ca.cert_pem).unwrap();
    let devices_dir = work.path().join("devices");
    std::fs::create_dir_all(&devices_dir).unwrap();
    let setup = Instant::now();
    let mut manifest =
        std::io::BufWriter::new(std::fs::File::create(devices_dir.join("manifest.jsonl")).unwrap());
    let mut ids = Vec::with_capacity(devices);
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
        let dir = devices_dir.join(&id);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("device.crt"), &issued.cert_pem).unwrap();
        writeln!(
            manifest,
            "{}",
            serde_json::to_string(&issued.entry).unwrap()
        )
        .unwrap();
        ids.push((id, issued.entry.certificate_id));
    }
    drop(manifest);
    let setup = setup.elapsed().as_secs_f64();

    let env = moto.aws_env();
    let (out, elapsed) = run(work.path(), &env);
    let s = summary(&out);
    assert_eq!(s["registered"], devices, "{s}");
    assert_eq!(s["failed"], 0, "{s}");
    // A sample, read back: ACTIVE, with its Thing attached.
    let step = (devices / 20).max(1);
    for (id, cert) in ids.iter().step_by(step) {
        let status = rt
            .block_on(iot::status(&client, cert))
            .unwrap_or_else(|e| panic!("{id}: {e}"));
        assert_eq!(
            status,
            aws_sdk_iot::types::CertificateStatus::Active,
            "{id}"
        );
        let principals = rt
            .block_on(client.list_thing_principals().thing_name(id).send())
            .unwrap();
        assert_eq!(principals.principals().len(), 1, "{id}");
    }
    let (again, rerun) = run(work.path(), &env);
    assert_eq!(summary(&again)["skipped"], devices);

    let (slowest, rate) = RegisterRates::default().bound(Wanted::Active, false);
    let bound = devices as f64 / rate;
    if quick {
        println!(
            "register (quick pass, {devices} devices): {elapsed:.1} s, quota bound {bound:.1} s, rerun {rerun:.1} s"
        );
        return;
    }
    println!(
        "register benchmark: {devices} pre-issued certificates (issued and written in {setup:.0} s) registered ACTIVE in moto: RegisterCertificate INACTIVE, ListThingPrincipals, CreateThing, AttachPolicy, AttachThingPrincipal, UpdateCertificate ACTIVE, each paced at AWS IoT's default rate"
    );
    println!(
        "  jitr register --status ACTIVE          {elapsed:>8.1} s   {:>6.1} devices/s",
        devices as f64 / elapsed
    );
    let label = format!("quota-bound time ({slowest} {rate}/s)");
    println!("  {label:<38} {bound:>8.1} s   {rate:>6.1} devices/s");
    println!(
        "  elapsed / quota bound                  {:>8.2} x",
        elapsed / bound
    );
    println!("  rerun, everything done already         {rerun:>8.1} s");
}
