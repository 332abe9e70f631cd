//! The factory line never loses track of a device: `jitr issue` stopped by Ctrl-C at random
//! points, or by a full disk, then continued with `--resume`, ends with the manifest, the
//! device folders and the bundles naming every id exactly once; a cut-off manifest line is
//! refused with the command that repairs it, and repaired by it; bad and repeated ids are
//! each named at their FILE:LINE.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test setup: a panic is the report

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

mod common;

use common::{stderr, uuid, with_ca};

/// A cheap pseudo-random sequence, seeded from the clock and printed, so a failure can be
/// replayed (`JITR_TEST_SEED`).
struct Rng(u64);

impl Rng {
    fn new() -> Rng {
        let seed = std::env::var("JITR_TEST_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos() as u64
            });
        eprintln!("JITR_TEST_SEED={seed}");
        Rng(seed | 1)
    }

    fn below(&mut self, n: u64) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n
    }
}

fn write_ids(dir: &Path, n: usize) -> Vec<String> {
    let ids: Vec<String> = (0..n).map(|i| uuid(0x5000 + i)).collect();
    std::fs::write(dir.join("ids.txt"), ids.join("\n") + "\n").unwrap();
    ids
}

/// Starts `jitr args` in `dir`, sends SIGINT after `after`, and waits (at most a minute).
fn interrupted(dir: &Path, args: &[&str], after: Duration) -> Output {
    let child = Command::new(env!("CARGO_BIN_EXE_jitr"))
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(after);
    // Already finished is fine: kill then fails, and the run is simply complete.
    let _ = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status();
    let start = Instant::now();
    let pid = child.id();
    let waiter = std::thread::spawn(move || child.wait_with_output().unwrap());
    while !waiter.is_finished() {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "jitr {pid} did not stop within a minute of SIGINT"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    waiter.join().unwrap()
}

/// Every manifest line, parsed (each must be whole): id -> how many lines name it.
fn manifest_ids(devices: &Path) -> BTreeMap<String, usize> {
    let text = std::fs::read_to_string(devices.join("manifest.jsonl")).unwrap_or_default();
    assert!(
        text.is_empty() || text.ends_with('\n'),
        "the manifest ends in a whole line"
    );
    let mut ids = BTreeMap::new();
    for line in text.lines() {
        let entry: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("manifest line {line:?} is not whole: {e}"));
        *ids.entry(entry["id"].as_str().unwrap().to_owned())
            .or_insert(0) += 1;
    }
    ids
}

/// The device folders (each complete), and that no temporary is left.
fn folders(devices: &Path) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let Ok(entries) = std::fs::read_dir(devices) else {
        return names;
    };
    for entry in entries {
        let entry = entry.unwrap();
        let name = entry.file_name().to_string_lossy().into_owned();
        if name == "manifest.jsonl" {
            continue;
        }
        assert!(!name.starts_with('.'), "a temporary was left: {name}");
        for file in ["device.key", "device.crt", "chain.pem"] {
            let len = std::fs::metadata(entry.path().join(file))
                .unwrap_or_else(|_| panic!("{name}/{file} missing"))
                .len();
            assert!(len > 0, "{name}/{file} is empty");
        }
        names.insert(name);
    }
    names
}

/// The manifest and the folders agree: each folder has exactly one line, each line a folder.
fn agree(devices: &Path) -> BTreeSet<String> {
    let lines = manifest_ids(devices);
    for (id, n) in &lines {
        assert_eq!(*n, 1, "{id} is in the manifest {n} times");
    }
    let dirs = folders(devices);
    let named: BTreeSet<String> = lines.into_keys().collect();
    assert_eq!(
        named, dirs,
        "the manifest names exactly the folders on disk"
    );
    dirs
}

fn plain_ca() -> tempfile::TempDir {
    with_ca(&["--with-issuing-ca", "--insecure-plaintext-key"])
}

#[test]
fn ctrl_c_at_random_points_then_resume_issues_every_id_exactly_once() {
    let tmp = plain_ca();
    let dir = tmp.path();
    let ids = write_ids(dir, 4000);
    let mut rng = Rng::new();
    let mut interruptions = 0;
    let mut args = vec!["issue", "--ids", "ids.txt"];
    for round in 0..8 {
        let out = interrupted(dir, &args, Duration::from_millis(80 + rng.below(600)));
        let text = stderr(&out);
        let done = agree(&dir.join("devices"));
        if out.status.success() {
            assert!(text.contains("issued"), "{text}");
            break;
        }
        if out.status.code().is_none() {
            // Ctrl-C before issuance began: the default action, nothing of this run recorded.
            continue;
        }
        interruptions += 1;
        // A clean stop after the devices in flight, with the count and the way on.
        assert_eq!(out.status.code(), Some(1), "round {round}: {text}");
        assert!(
            text.contains("interrupted: issued "),
            "round {round}: {text}"
        );
        assert!(text.contains("--resume"), "{text}");
        assert!(done.len() < ids.len());
        args = vec!["issue", "--ids", "ids.txt", "--resume"];
    }
    assert!(
        interruptions > 0,
        "no run was interrupted: the test proved nothing"
    );
    // The last resume runs to the end.
    let out = common::jitr(dir, &["issue", "--ids", "ids.txt", "--resume"], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let done = agree(&dir.join("devices"));
    let want: BTreeSet<String> = ids.into_iter().collect();
    assert_eq!(done.len(), want.len(), "every id issued once");
    assert!(done == want, "the ids issued are the ids asked for");
    // And a plain rerun of the same ids is refused at the first one, by FILE:LINE.
    let out = common::jitr(dir, &["issue", "--ids", "ids.txt"], &[]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("ids.txt:1: device"),
        "{}",
        stderr(&out)
    );
    assert!(
        stderr(&out).contains("3999 more were already issued"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn bundles_interrupted_and_resumed_hold_every_id_once_between_them() {
    let tmp = plain_ca();
    let dir = tmp.path();
    // Enough that a run lasts longer than the first interruption, even on a quiet machine.
    let ids = write_ids(dir, 40_000);
    let mut rng = Rng::new();
    let mut bundles = Vec::new();
    for round in 0..9 {
        let name = format!("flash-{round}.jsonl");
        let mut args = vec!["issue", "--ids", "ids.txt", "--bundle", &name];
        if round > 0 {
            args.push("--resume");
        }
        let out = if round == 8 {
            // The last resume runs to the end.
            common::jitr(dir, &args, &[])
        } else {
            interrupted(dir, &args, Duration::from_millis(40 + rng.below(400)))
        };
        let text = stderr(&out);
        if dir.join(&name).exists() {
            bundles.push(name.clone());
        }
        if out.status.success() {
            break;
        }
        if out.status.code().is_none() {
            // Ctrl-C before issuance began (reading ids, unlocking): the default action, and
            // nothing of this run exists.
            assert!(!dir.join(&name).exists());
            continue;
        }
        assert!(text.contains("interrupted: issued "), "{text}");
        assert!(text.contains("new --bundle file"), "{text}");
        // The bundle of a stopped run is whole, private, and named by the manifest.
        assert!(
            !std::fs::read_dir(dir).unwrap().any(|e| e
                .unwrap()
                .file_name()
                .to_string_lossy()
                .ends_with(".partial")),
            "a partial bundle was left"
        );
    }
    assert!(
        bundles.len() > 1,
        "no run was interrupted: the test proved nothing"
    );
    let mut in_bundles = BTreeMap::new();
    for name in &bundles {
        let text = std::fs::read_to_string(dir.join(name)).unwrap();
        assert!(text.is_empty() || text.ends_with('\n'));
        for line in text.lines() {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            assert!(v["key_pem"].as_str().unwrap().contains("PRIVATE KEY"));
            *in_bundles
                .entry(v["id"].as_str().unwrap().to_owned())
                .or_insert(0) += 1;
        }
    }
    let manifest = manifest_ids(&dir.join("devices"));
    assert_eq!(manifest, in_bundles, "the manifest and the bundles agree");
    assert!(
        in_bundles.values().all(|&n| n == 1),
        "an id is in two bundles"
    );
    let want: BTreeSet<String> = ids.into_iter().collect();
    let got: BTreeSet<String> = in_bundles.into_keys().collect();
    assert_eq!(got.len(), want.len(), "every id in a bundle");
    assert!(got == want, "the ids issued are the ids asked for");
    // Resuming into a bundle that exists is refused with the way on.
    let out = common::jitr(
        dir,
        &[
            "issue",
            "--ids",
            "ids.txt",
            "--resume",
            "--bundle",
            &bundles[0],
        ],
        &[],
    );
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("new --bundle file"),
        "{}",
        stderr(&out)
    );
}

/// A small tmpfs of `size`, unmounted when dropped.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(at).unwrap();
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .status()
            .unwrap();
        assert!(
            status.success(),
            "mount a {size} tmpfs (the tests run as root)"
        );
        Tmpfs(at.to_owned())
    }

    fn grow(&self, size: &str) {
        let status = Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(&self.0)
            .status()
            .unwrap();
        assert!(status.success());
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn a_full_disk_leaves_whole_lines_and_matching_folders_and_resume_finishes() {
    let tmp = plain_ca();
    let dir = tmp.path();
    let ids = write_ids(dir, 600);
    let disk = Tmpfs::mount(&dir.join("small"), "1m");
    let out = common::jitr(
        dir,
        &["issue", "--ids", "ids.txt", "--out", "small/devices"],
        &[],
    );
    let text = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("No space left on device"), "{text}");
    let done = agree(&dir.join("small/devices"));
    assert!(!done.is_empty() && done.len() < ids.len(), "{}", done.len());

    // A bundle onto the full disk: refused whole, nothing recorded, nothing left.
    let before = manifest_ids(&dir.join("small/devices"));
    let out = common::jitr(
        dir,
        &[
            "issue",
            "--ids",
            "ids.txt",
            "--out",
            "small/devices",
            "--resume",
            "--bundle",
            "small/flash.jsonl",
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(!dir.join("small/flash.jsonl").exists());
    assert_eq!(manifest_ids(&dir.join("small/devices")), before);
    assert!(
        !std::fs::read_dir(dir.join("small")).unwrap().any(|e| e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .starts_with('.')),
        "a partial bundle was left"
    );

    // Room again: --resume issues the rest, each once.
    disk.grow("32m");
    let out = common::jitr(
        dir,
        &[
            "issue",
            "--ids",
            "ids.txt",
            "--out",
            "small/devices",
            "--resume",
        ],
        &[],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains(&format!("{} already issued skipped", done.len())),
        "{}",
        stderr(&out)
    );
    let all = agree(&dir.join("small/devices"));
    assert_eq!(all, ids.into_iter().collect::<BTreeSet<_>>());
}

#[test]
fn a_cut_off_manifest_line_is_refused_with_its_repair_and_repaired_by_it() {
    let tmp = plain_ca();
    let dir = tmp.path();
    let ids = write_ids(dir, 20);
    let out = common::jitr(dir, &["issue", "--ids", "ids.txt"], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    // A crash in the middle of the last line, its folder already written.
    let manifest = dir.join("devices/manifest.jsonl");
    let text = std::fs::read_to_string(&manifest).unwrap();
    std::fs::write(&manifest, &text[..text.len() - 40]).unwrap();
    let last = ids.last().unwrap();

    let out = common::jitr(dir, &["issue", "--id", &uuid(0x9999)], &[]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    assert!(
        err.contains("manifest.jsonl:20: the last line is cut off"),
        "{err}"
    );
    assert!(err.contains("--resume"), "{err}");
    // Other commands reading the manifest say the same.
    let out = common::jitr(dir, &["issue", "--ids", "ids.txt", "--resume"], &[]);
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("removed its cut-off last line 20"), "{err}");
    assert!(err.contains("issued 1 device certificate(s)"), "{err}");
    let all = agree(&dir.join("devices"));
    assert!(all.contains(last));
    assert_eq!(all.len(), 20);
}

#[test]
fn every_bad_and_repeated_id_is_named_at_its_line_and_nothing_is_issued() {
    let tmp = plain_ca();
    let dir = tmp.path();
    let long = "a".repeat(10_000_000);
    let lines = [
        format!("\u{feff}{}", uuid(1)), // a BOM before the first id is not part of it
        uuid(2),
        "3f2504e0-4f89-11d3-9a0c-0305e82c3301".to_owned(),
        uuid(2),
        "# a comment".to_owned(),
        long,
        "NOTHEX".to_owned(),
        uuid(1),
    ];
    std::fs::write(dir.join("ids.txt"), lines.join("\n")).unwrap();
    let out = common::jitr(dir, &["issue", "--ids", "ids.txt"], &[]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.len() < 2000, "values are cut: {} bytes", err.len());
    for want in [
        "ids.txt:3: invalid device id",
        "no dashes",
        &format!(
            "ids.txt:4: device {} appears again (first at ids.txt:2)",
            uuid(2)
        ),
        "ids.txt:6: invalid device id",
        "10000000 bytes",
        "ids.txt:7: invalid device id",
        &format!(
            "ids.txt:8: device {} appears again (first at ids.txt:1)",
            uuid(1)
        ),
        "5 bad or repeated device id(s)",
    ] {
        assert!(err.contains(want), "{want:?} in {err}");
    }
    assert!(!err.contains("ids.txt:1:"), "the BOM line is fine: {err}");
    assert!(
        !dir.join("devices/manifest.jsonl").exists()
            || manifest_ids(&dir.join("devices")).is_empty()
    );
}

#[test]
fn timings_and_the_json_summary_give_the_stage_breakdown() {
    let tmp = plain_ca();
    let dir = tmp.path();
    write_ids(dir, 300);
    let out = common::jitr(
        dir,
        &[
            "issue",
            "--ids",
            "ids.txt",
            "--bundle",
            "b.jsonl",
            "--json",
            "--timings",
        ],
        &[],
    );
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("timings: 300 device(s) in"), "{err}");
    for stage in ["keygen", "sign", "encode", "write", "manifest"] {
        assert!(err.contains(&format!("  {stage} ")), "{stage} in {err}");
    }
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["issued"], 300);
    assert_eq!(summary["stopped"], false);
    let keygen = summary["worker_seconds"]["keygen"].as_f64().unwrap();
    let sign = summary["worker_seconds"]["sign"].as_f64().unwrap();
    assert!(keygen > 0.0 && sign > 0.0, "{summary}");
    assert!(summary["devices_per_second"].as_f64().unwrap() > 0.0);

    write_ids(dir, 50);
    let out = common::jitr(
        dir,
        &["issue", "--ids", "ids.txt", "--force", "--timings=json"],
        &[],
    );
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    let line = err.lines().find(|l| l.starts_with('{')).expect(&err);
    let summary: serde_json::Value = serde_json::from_str(line).unwrap();
    assert_eq!(summary["issued"], 50);

    let out = common::jitr(
        dir,
        &["issue", "--ids", "ids.txt", "--bundle", "-", "--json"],
        &[],
    );
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
}

#[test]
fn the_issuing_ca_that_signs_devices_follows_the_subject() {
    // with_ca gives `--subject "O=Acme,CN=Acme fleet CA"`.
    let tmp = with_ca(&["--with-issuing-ca", "--insecure-plaintext-key"]);
    let out = Command::new("openssl")
        .args(["x509", "-noout", "-subject", "-in"])
        .arg(tmp.path().join("ca/ca.crt"))
        .output()
        .unwrap();
    let subject = String::from_utf8_lossy(&out.stdout);
    assert!(subject.contains("O = Acme"), "{subject}");
    assert!(subject.contains("CN = Acme fleet issuing CA"), "{subject}");
}
