//! Issuance as a factory runs it: `cargo bench -p jitr --bench issue`, every figure from one
//! run, on tmpfs (`/dev/shm`; `JITR_BENCH_DIR` for elsewhere).
//!
//! The release `jitr` binary, end to end, exactly as the README runs it: a CA made by `jitr ca
//! init --with-issuing-ca --passphrase-file …` (encrypted keys), a file of fresh random ids,
//! `jitr issue --passphrase-file pass --ids ids.txt --out OUT --bundle FILE` (key unlock, id
//! checks, the manifest and its duplicate refusal, the bundle synced and linked into place all
//! included, timed from exec to exit). Beside it, in the same run:
//! - the library's own figure (`factory_ca::issue_bundle` in-process, same CA);
//! - one Python `cryptography` process writing the same bundle, then the same folders
//!   (`crates/factory-ca/benches/baseline_cryptography.py`);
//! - the stage breakdown the binary prints with `--timings=json`;
//! - folders (`jitr issue` without `--bundle`) against Python folders;
//! - the issue's own reproduction: a single CA (`jitr ca init --passphrase-file`, whose key
//!   signs devices and is P-384 by the profile), to show what a P-384 signature costs;
//! - a million devices into one bundle through the binary, wall time.
//!
//! Counts: `JITR_BENCH_BUNDLE_DEVICES` (200,000), `JITR_BENCH_DEVICES` (60,000 folders),
//! `JITR_BENCH_PYTHON_DEVICES` (2,000), `JITR_BENCH_P384_DEVICES` (50,000),
//! `JITR_BENCH_MOONSHOT` (1,000,000; 0 skips it). `JITR_ISSUE_BIN` measures another binary.
//! Run by `cargo test` (without `--bench`) it does a quick pass over a few hundred devices.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a benchmark: a panic is the report

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use factory_ca::{BundleOptions, Ca, DeviceId, IdFormat, KeyAlgorithm};
use time::OffsetDateTime;

const PASS: &str = "bench passphrase, long enough";

fn env_count(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn jitr_bin() -> PathBuf {
    std::env::var_os("JITR_ISSUE_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_jitr")))
}

fn jitr(dir: &Path, args: &[&str]) -> Output {
    let out = Command::new(jitr_bin())
        .current_dir(dir)
        .args(args)
        .output()
        .expect("run jitr");
    assert!(
        out.status.success(),
        "jitr {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// `count` fresh random 32-hex ids, one per line.
fn write_ids(path: &Path, count: usize) -> Vec<DeviceId> {
    use aws_lc_rs::rand::SecureRandom;
    let rng = aws_lc_rs::rand::SystemRandom::new();
    let mut bytes = vec![0u8; 16 * count];
    rng.fill(&mut bytes).expect("random ids");
    let ids: Vec<String> = bytes.chunks(16).map(hex::encode).collect();
    std::fs::write(path, ids.join("\n") + "\n").expect("ids file");
    ids.iter()
        .map(|id| DeviceId::parse(id, IdFormat::BalenaUuid).unwrap())
        .collect()
}

/// What one timed `jitr issue` run did: devices/s from exec to exit, wall time, and its
/// `--timings=json` summary.
struct CliRun {
    rate: f64,
    wall: Duration,
    summary: serde_json::Value,
}

fn cli_issue(dir: &Path, ca: &str, ids: &Path, out: &str, bundle: Option<&str>) -> CliRun {
    let ids_arg = ids.to_str().unwrap();
    let mut args = vec![
        "issue",
        "--dir",
        ca,
        "--passphrase-file",
        "pass",
        "--ids",
        ids_arg,
        "--out",
        out,
        "--timings=json",
    ];
    if let Some(bundle) = bundle {
        args.extend(["--bundle", bundle]);
    }
    let start = Instant::now();
    let output = jitr(dir, &args);
    let wall = start.elapsed();
    let stderr = String::from_utf8_lossy(&output.stderr);
    let summary: serde_json::Value = stderr
        .lines()
        .find(|l| l.starts_with('{'))
        .and_then(|l| serde_json::from_str(l).ok())
        .expect("a --timings=json line");
    let issued = summary["issued"].as_u64().unwrap() as usize;
    let expected = std::fs::read_to_string(ids).unwrap().lines().count();
    assert_eq!(issued, expected, "every device issued");
    let manifest = dir.join(out).join("manifest.jsonl");
    assert_eq!(
        std::fs::read_to_string(&manifest).unwrap().lines().count(),
        expected,
        "a manifest line per device"
    );
    CliRun {
        rate: issued as f64 / wall.as_secs_f64(),
        wall,
        summary,
    }
}

/// One Python `cryptography` process issuing `devices` into `out` (`bundle` or `folders`).
fn python(ca_dir: &Path, devices: usize, out: &Path, mode: &str) -> Option<f64> {
    if devices == 0 {
        return None;
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../factory-ca/benches/baseline_cryptography.py");
    let out = Command::new("python3")
        .arg(script)
        .args([ca_dir.join("ca.crt"), ca_dir.join("ca.key")])
        .arg(devices.to_string())
        .arg(out)
        .arg(mode)
        .output();
    let out = match out {
        Ok(out) if out.status.success() => out,
        Ok(out) => {
            eprintln!(
                "python baseline failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            return None;
        }
        Err(e) => {
            eprintln!("python baseline could not start: {e}");
            return None;
        }
    };
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    Some(v["devices"].as_f64()? / v["seconds"].as_f64()?)
}

/// The library's bundle rate, in-process, on the same (plaintext copy of the) CA.
fn library_bundle(ca: &Ca, ids: &[DeviceId], manifest_dir: &Path, file: &Path) -> f64 {
    let opts = BundleOptions {
        manifest_dir: manifest_dir.to_owned(),
        key: KeyAlgorithm::P256,
        days: 1800,
        jobs: 0,
        force: false,
        now: OffsetDateTime::now_utc(),
    };
    let start = Instant::now();
    let mut out = std::fs::File::create(file).unwrap();
    let report = factory_ca::issue_bundle(ca, ids, &opts, &mut out, &|| {}).expect("bundle");
    let elapsed = start.elapsed();
    assert_eq!(report.issued, ids.len());
    ids.len() as f64 / elapsed.as_secs_f64()
}

fn verdict(ok: bool) -> &'static str {
    if ok {
        "ok"
    } else {
        "MISSED"
    }
}

fn stages(run: &CliRun) -> String {
    let issued = run.summary["issued"].as_f64().unwrap_or(1.0).max(1.0);
    let workers = run.summary["workers"].as_f64().unwrap_or(1.0);
    let seconds = &run.summary["seconds"];
    let mut text = format!(
        "unlock {:.2} s, read ids {:.2} s, issue {:.2} s on {workers} workers; per device (worker µs):",
        seconds["unlock"].as_f64().unwrap_or(0.0),
        seconds["read_ids"].as_f64().unwrap_or(0.0),
        seconds["issue"].as_f64().unwrap_or(0.0),
    );
    for stage in factory_ca::Stage::ALL {
        let s = run.summary["worker_seconds"][stage.name()]
            .as_f64()
            .unwrap_or(0.0);
        text.push_str(&format!(" {} {:.1}", stage.name(), 1e6 * s / issued));
    }
    text
}

fn remove(path: &Path) {
    if path.is_dir() {
        std::fs::remove_dir_all(path).unwrap();
    } else {
        let _ = std::fs::remove_file(path);
    }
}

fn main() {
    let quick = !std::env::args().any(|a| a == "--bench");
    let pick = |name: &str, full: usize, small: usize| {
        if quick {
            small
        } else {
            env_count(name, full)
        }
    };
    let bundle_devices = pick("JITR_BENCH_BUNDLE_DEVICES", 200_000, 300);
    let folder_devices = pick("JITR_BENCH_DEVICES", 60_000, 200);
    let py_devices = pick("JITR_BENCH_PYTHON_DEVICES", 2_000, 20);
    let p384_devices = pick("JITR_BENCH_P384_DEVICES", 50_000, 100);
    let moonshot = pick("JITR_BENCH_MOONSHOT", 1_000_000, 0);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());

    let base = std::env::var("JITR_BENCH_DIR").unwrap_or_else(|_| {
        if Path::new("/dev/shm").is_dir() {
            "/dev/shm".into()
        } else {
            env!("CARGO_TARGET_TMPDIR").into()
        }
    });
    let tmp = tempfile::tempdir_in(&base).expect("temp dir");
    let dir = tmp.path();
    std::fs::write(dir.join("pass"), PASS).unwrap();
    std::fs::write(dir.join("root-pass"), format!("{PASS} (root)")).unwrap();

    // The README's CA: an offline P-384 root above the P-256 CA that signs devices.
    jitr(
        dir,
        &[
            "ca",
            "init",
            "--dir",
            "ca",
            "--with-issuing-ca",
            "--subject",
            "O=Bench,CN=Bench fleet CA",
            "--passphrase-file",
            "pass",
            "--root-passphrase-file",
            "root-pass",
        ],
    );
    // The same shape with plaintext keys, for the baselines that cannot unlock ours.
    jitr(
        dir,
        &[
            "ca",
            "init",
            "--dir",
            "ca-plain",
            "--with-issuing-ca",
            "--insecure-plaintext-key",
        ],
    );
    // The issue's reproduction: one CA, which signs devices itself (P-384 by the profile).
    jitr(
        dir,
        &[
            "ca",
            "init",
            "--dir",
            "ca-single",
            "--passphrase-file",
            "pass",
        ],
    );
    let plain = Ca::load(&dir.join("ca-plain"), None).expect("plaintext CA");

    // The bundle.
    let ids = write_ids(&dir.join("ids.txt"), bundle_devices);
    let cli = cli_issue(dir, "ca", &dir.join("ids.txt"), "m1", Some("bundle.jsonl"));
    remove(&dir.join("bundle.jsonl"));
    let library = library_bundle(&plain, &ids, &dir.join("m-lib"), &dir.join("lib.jsonl"));
    remove(&dir.join("lib.jsonl"));
    let py_bundle = python(
        &dir.join("ca-plain"),
        py_devices,
        &dir.join("py-bundle"),
        "bundle",
    );
    remove(&dir.join("py-bundle"));

    // Folders.
    write_ids(&dir.join("ids-folders.txt"), folder_devices);
    let folders = cli_issue(dir, "ca", &dir.join("ids-folders.txt"), "devices", None);
    remove(&dir.join("devices"));
    let py_folders = python(
        &dir.join("ca-plain"),
        py_devices,
        &dir.join("py-folders"),
        "folders",
    );
    remove(&dir.join("py-folders"));

    // The single P-384 CA.
    write_ids(&dir.join("ids-p384.txt"), p384_devices);
    let p384 = cli_issue(
        dir,
        "ca-single",
        &dir.join("ids-p384.txt"),
        "m-p384",
        Some("p384.jsonl"),
    );
    remove(&dir.join("p384.jsonl"));

    // A million into one bundle.
    let moon = (moonshot > 0).then(|| {
        write_ids(&dir.join("ids-moon.txt"), moonshot);
        let run = cli_issue(
            dir,
            "ca",
            &dir.join("ids-moon.txt"),
            "m-moon",
            Some("moon.jsonl"),
        );
        remove(&dir.join("moon.jsonl"));
        run
    });

    println!(
        "issuance benchmark, the release jitr binary end to end: {cores} cores, P-256 device keys, under {base}"
    );
    println!("  bundle: jitr issue --passphrase-file pass --ids ids.txt --out m1 --bundle bundle.jsonl ({bundle_devices} devices)");
    let py_bundle_ratio = py_bundle.map(|p| cli.rate / p);
    println!(
        "  {:<44} {:>8.0} devices/s  target >= 50000/s and >= 10x python: {}",
        "jitr issue --bundle (CLI, exec to exit)",
        cli.rate,
        verdict(cli.rate >= 50_000.0 && py_bundle_ratio.is_none_or(|x| x >= 10.0))
    );
    println!("    stages: {}", stages(&cli));
    println!(
        "  {:<44} {:>8.0} devices/s  (the CLI is {:.0}% of it)",
        "library issue_bundle (in-process)",
        library,
        100.0 * cli.rate / library
    );
    match (py_bundle, py_bundle_ratio) {
        (Some(r), Some(x)) => println!(
            "  {:<44} {:>8.0} devices/s  ({py_devices} devices); the CLI is {x:.1}x",
            "python cryptography bundle (one process)", r
        ),
        _ => println!("  python cryptography bundle: skipped"),
    }
    println!(
        "  folders: jitr issue --passphrase-file pass --ids ids.txt ({folder_devices} devices)"
    );
    let py_folder_ratio = py_folders.map(|p| folders.rate / p);
    println!(
        "  {:<44} {:>8.0} devices/s  target >= 4x python: {}",
        "jitr issue (folders, CLI, exec to exit)",
        folders.rate,
        verdict(py_folder_ratio.is_none_or(|x| x >= 4.0))
    );
    println!("    stages: {}", stages(&folders));
    match (py_folders, py_folder_ratio) {
        (Some(r), Some(x)) => println!(
            "  {:<44} {:>8.0} devices/s  ({py_devices} devices); the CLI is {x:.1}x",
            "python cryptography folders (one process)", r
        ),
        _ => println!("  python cryptography folders: skipped"),
    }
    println!(
        "  single CA (jitr ca init --passphrase-file: its P-384 key signs devices), bundle of {p384_devices}: {:.0} devices/s, {:.0}% of the P-256 issuing CA's",
        p384.rate,
        100.0 * p384.rate / cli.rate
    );
    println!("    stages: {}", stages(&p384));
    if let Some(moon) = moon {
        println!(
            "  moonshot: {moonshot} devices into one bundle through the CLI in {:.1} s ({:.0}/s)   goal < 30 s: {}",
            moon.wall.as_secs_f64(),
            moon.rate,
            verdict(moon.wall < Duration::from_secs(30))
        );
        println!("    stages: {}", stages(&moon));
    }
}
