//! Issuance benchmark: `cargo bench -p factory-ca --bench issue`.
//!
//! Issues JITR_BENCH_DEVICES (default 20,000) device certificates with files and manifest
//! written, and in the same run measures the floor (P-256 keygen + one CA signature per
//! device on every core, nothing else) and the same work done by Python `cryptography`
//! (JITR_BENCH_PYTHON_DEVICES, default 2,000) and by an `openssl` CLI loop
//! (JITR_BENCH_OPENSSL_DEVICES, default 200). Prints certs/s for each and the ratios.

// Test helpers panic on a failed setup step: that is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{EcdsaKeyPair, ECDSA_P256_SHA256_ASN1_SIGNING};
use factory_ca::{
    issue_batch, BatchOptions, Ca, CaInit, DeviceId, IdFormat, IssuingCa, KeyAlgorithm,
    KeyProtection,
};
use rayon::prelude::*;
use time::OffsetDateTime;

fn env_count(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn rate(devices: usize, elapsed: Duration) -> f64 {
    devices as f64 / elapsed.as_secs_f64()
}

/// P-256 keygen plus one ECDSA signature by the CA key per device, on every core.
fn keygen_sign_limit(ca_key_pem: &str, devices: usize) -> f64 {
    let (_, der) = pkcs8::der::pem::decode_vec(ca_key_pem.as_bytes()).expect("CA key PEM");
    let ca = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &der).expect("P-256 CA key");
    let tbs = [0x5au8; 420]; // about the size of a device TBSCertificate
    let start = Instant::now();
    (0..devices).into_par_iter().for_each(|_| {
        let key = EcdsaKeyPair::generate(&ECDSA_P256_SHA256_ASN1_SIGNING).expect("keygen");
        std::hint::black_box(&key);
        let sig = ca.sign(&SystemRandom::new(), &tbs).expect("sign");
        std::hint::black_box(sig);
    });
    rate(devices, start.elapsed())
}

/// The filesystem's share: the same folder, files and rename per device, with no crypto.
fn write_floor(dir: &Path, devices: usize) -> f64 {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::create_dir_all(dir).expect("floor dir");
    let start = Instant::now();
    (0..devices).into_par_iter().for_each(|n| {
        let tmp = dir.join(format!(".{n:032x}.tmp"));
        std::fs::create_dir(&tmp).expect("mkdir");
        for (name, len) in [
            ("device.key", 241),
            ("device.crt", 684),
            ("chain.pem", 1388),
        ] {
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(tmp.join(name))
                .expect("create");
            f.write_all(&vec![b'x'; len]).expect("write");
        }
        std::fs::rename(&tmp, dir.join(format!("{n:032x}"))).expect("rename");
    });
    rate(devices, start.elapsed())
}

fn baseline(devices: usize, cmd: &mut Command) -> Option<f64> {
    if devices == 0 {
        return None;
    }
    let out = match cmd.output() {
        Ok(out) if out.status.success() => out,
        Ok(out) => {
            eprintln!("baseline failed: {}", String::from_utf8_lossy(&out.stderr));
            return None;
        }
        Err(e) => {
            eprintln!("baseline could not start: {e}");
            return None;
        }
    };
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    Some(v["devices"].as_f64()? / v["seconds"].as_f64()?)
}

fn count_lines(path: &Path) -> usize {
    std::fs::read_to_string(path)
        .map(|t| t.lines().count())
        .unwrap_or(0)
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` runs us with no args: keep that quick.
    let quick = !std::env::args().any(|a| a == "--bench");
    let devices = if quick {
        200
    } else {
        env_count("JITR_BENCH_DEVICES", 20_000)
    };
    let py_devices = if quick {
        20
    } else {
        env_count("JITR_BENCH_PYTHON_DEVICES", 2_000)
    };
    let ossl_devices = if quick {
        5
    } else {
        env_count("JITR_BENCH_OPENSSL_DEVICES", 200)
    };
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());

    // Files go to tmpfs by default so the figure is the tool's, not the disk's: ext4 inode
    // allocation alone caps a 4-inode-per-device workload far below the CPU limit here.
    // JITR_BENCH_DIR points it at a real disk to see that cost.
    let base = std::env::var("JITR_BENCH_DIR").unwrap_or_else(|_| {
        if Path::new("/dev/shm").is_dir() {
            "/dev/shm".into()
        } else {
            env!("CARGO_TARGET_TMPDIR").into()
        }
    });
    let tmp = tempfile::tempdir_in(&base).expect("temp dir");
    let ca_dir = tmp.path().join("ca");
    // The recommended production shape: an offline P-384 root above a P-256 issuing CA,
    // which signs the devices. Plaintext keys so the baselines can read them too.
    CaInit {
        dir: ca_dir.clone(),
        root_subject: "O=Bench,CN=Bench root".parse().expect("subject"),
        root_key: KeyAlgorithm::P384,
        root_days: 7305,
        issuing: Some(IssuingCa {
            subject: "O=Bench,CN=Bench issuing CA".parse().expect("subject"),
            key: KeyAlgorithm::P256,
            days: 1826,
        }),
        protection: KeyProtection::InsecurePlaintext,
        root_protection: Some(KeyProtection::InsecurePlaintext),
        remote_key: None,
    }
    .run(OffsetDateTime::now_utc())
    .expect("ca init");
    let ca_key_pem = std::fs::read_to_string(ca_dir.join("ca.key")).expect("ca.key");

    let limit = keygen_sign_limit(&ca_key_pem, devices);
    let floor = write_floor(&tmp.path().join("floor"), devices);
    // Both costs land on the same cores, so together they bound what any issuer can do.
    let combined = 1.0 / (1.0 / limit + 1.0 / floor);

    let ca = Ca::load(&ca_dir, None).expect("load CA");
    let ids: Vec<DeviceId> = (0..devices)
        .map(|n| DeviceId::parse(&format!("{n:032x}"), IdFormat::BalenaUuid).expect("id"))
        .collect();
    let out = tmp.path().join("devices");
    let opts = BatchOptions {
        out_dir: out.clone(),
        key: KeyAlgorithm::P256,
        days: 3652,
        jobs: 0,
        force: false,
        now: OffsetDateTime::now_utc(),
    };
    let start = Instant::now();
    let report = issue_batch(&ca, &ids, &opts, &|| {}).expect("issue");
    let elapsed = start.elapsed();
    assert!(report.failures.is_empty(), "{:?}", report.failures.first());
    assert_eq!(
        count_lines(&out.join("manifest.jsonl")),
        devices,
        "manifest complete"
    );
    let jitr = rate(devices, elapsed);

    let bench_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches");
    let ca_crt = ca_dir.join("ca.crt");
    let ca_key = ca_dir.join("ca.key");
    let python = baseline(
        py_devices,
        Command::new("python3")
            .arg(bench_dir.join("baseline_cryptography.py"))
            .args([ca_crt.as_os_str(), ca_key.as_os_str()])
            .arg(py_devices.to_string())
            .arg(tmp.path().join("python")),
    );
    let openssl = baseline(
        ossl_devices,
        Command::new("bash")
            .arg(bench_dir.join("baseline_openssl.sh"))
            .args([ca_crt.as_os_str(), ca_key.as_os_str()])
            .arg(ossl_devices.to_string())
            .arg(tmp.path().join("openssl")),
    );

    println!("issuance benchmark: {cores} cores, P-256 device keys signed by a P-256 issuing CA, files + manifest written under {base}");
    println!(
        "  {:<44} {:>10.0} certs/s  ({devices} devices)",
        "keygen+sign limit (aws-lc, all cores)", limit
    );
    println!(
        "  {:<44} {:>10.0} devices/s ({devices} devices)",
        "file-write floor (mkdir, 3 files, rename)", floor
    );
    println!(
        "  {:<44} {:>10.0} certs/s",
        "combined floor (both on the same cores)", combined
    );
    println!(
        "  {:<44} {:>10.0} certs/s  ({devices} devices, {:.2} s) = {:.0}% of the keygen+sign limit, {:.0}% of the combined floor",
        "jitr issue (factory-ca issue_batch)",
        jitr,
        elapsed.as_secs_f64(),
        100.0 * jitr / limit,
        100.0 * jitr / combined
    );
    for (name, n, r) in [
        ("python cryptography (one process)", py_devices, python),
        ("openssl CLI loop", ossl_devices, openssl),
    ] {
        match r {
            Some(r) => println!(
                "  {name:<44} {r:>10.0} certs/s  ({n} devices); jitr is {:.1}x",
                jitr / r
            ),
            None => println!("  {name:<44}    skipped"),
        }
    }
}
