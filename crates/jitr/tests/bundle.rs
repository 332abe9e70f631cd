//! `jitr issue --bundle FILE|-`: one JSON line per device, the form a flashing station
//! consumes; the file appears whole and private, never over an earlier bundle.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test setup: a panic is the report

use std::os::unix::fs::PermissionsExt;
use std::process::Command;

mod common;

use common::{stderr, stdout, uuid, with_ca};

#[test]
fn a_bundle_holds_every_device_privately_and_is_never_overwritten() {
    let tmp = with_ca(&["--with-issuing-ca"]);
    let dir = tmp.path();
    let ids: Vec<String> = (0..300).map(uuid).collect();
    std::fs::write(dir.join("ids.txt"), ids.join("\n")).unwrap();
    let args = [
        "issue",
        "--ids",
        "ids.txt",
        "--passphrase-file",
        "pass",
        "--bundle",
        "flash.jsonl",
    ];
    let out = common::jitr(dir, &args, &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("issued 300 device certificate(s) into flash.jsonl"));
    let bundle = dir.join("flash.jsonl");
    assert_eq!(
        std::fs::metadata(&bundle).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let text = std::fs::read_to_string(&bundle).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 300);
    let manifest = std::fs::read_to_string(dir.join("devices/manifest.jsonl")).unwrap();
    assert_eq!(manifest.lines().count(), 300);
    // No folders, no leftovers.
    let entries: Vec<_> = std::fs::read_dir(dir.join("devices"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(entries, ["manifest.jsonl"]);
    assert!(!std::fs::read_dir(dir).unwrap().any(|e| e
        .unwrap()
        .file_name()
        .to_string_lossy()
        .contains("partial")));
    // openssl takes a device's chain up to the offline root, and its key.
    let first = &lines[0];
    std::fs::write(dir.join("chain.pem"), first["chain_pem"].as_str().unwrap()).unwrap();
    std::fs::write(dir.join("key.pem"), first["key_pem"].as_str().unwrap()).unwrap();
    let verify = Command::new("openssl")
        .args([
            "verify",
            "-CAfile",
            "ca/root.crt",
            "-untrusted",
            "ca/ca.crt",
            "chain.pem",
        ])
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(verify.status.success(), "{}", stderr(&verify));
    let inspect = common::jitr(dir, &["inspect", "chain.pem", "--ca", "ca/ca.crt"], &[]);
    assert!(inspect.status.success(), "{}", stdout(&inspect));

    // Again to the same file: refused, the bundle and the manifest untouched.
    let before = std::fs::read(&bundle).unwrap();
    let out = common::jitr(dir, &[&args[..], &["--force"]].concat(), &[]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("flash.jsonl exists: refusing to overwrite a bundle"),
        "{}",
        stderr(&out)
    );
    assert_eq!(std::fs::read(&bundle).unwrap(), before);
    assert_eq!(
        std::fs::read_to_string(dir.join("devices/manifest.jsonl"))
            .unwrap()
            .lines()
            .count(),
        300
    );

    // To standard output, for a pipe into the flashing station.
    let out = common::jitr(
        dir,
        &[
            "issue",
            "--id",
            &uuid(1000),
            "--passphrase-file",
            "pass",
            "--bundle",
            "-",
        ],
        &[],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let line: serde_json::Value = serde_json::from_str(stdout(&out).trim()).unwrap();
    assert_eq!(line["id"], uuid(1000).as_str());

    // Not with per-device delivery, which reads the device folders.
    let out = common::jitr(
        dir,
        &[
            "issue",
            "--id",
            &uuid(1001),
            "--bundle",
            "x.jsonl",
            "--push-balena",
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
}
