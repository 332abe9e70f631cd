//! Delivery to balena devices: `--balena-env FILE` (the variables balena's cloud-relay block
//! reads, as JSON lines) and `--push-balena` (device environment variables set through the
//! balena API, here the fake one).

#![allow(clippy::unwrap_used, clippy::expect_used)] // test setup: a panic is the report

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Output;

use base64::Engine;
use testkit::balena::FakeBalena;

mod common;

use common::uuid;

const KEY: &str = "balena-test-api-key";
const FLEET: u64 = 1234567;
const OTHER_FLEET: u64 = 7654321;
const ENDPOINT: &str = "abc123example-ats.iot.eu-west-1.amazonaws.com";

/// `jitr` in `dir`, with the balena settings pointing at `balena` when given.
fn jitr(dir: &Path, args: &[&str], balena: Option<&FakeBalena>) -> Output {
    let env = match balena {
        Some(balena) => vec![
            ("BALENA_API_KEY", KEY.to_owned()),
            ("BALENA_API_URL", balena.url()),
            ("BALENA_FLEET_ID", FLEET.to_string()),
        ],
        None => Vec::new(),
    };
    common::jitr(dir, args, &env)
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn with_ca() -> tempfile::TempDir {
    common::with_ca(&["--with-issuing-ca"])
}

fn b64(s: &str) -> String {
    let bytes = base64::engine::general_purpose::STANDARD.decode(s).unwrap();
    String::from_utf8(bytes).unwrap()
}

/// A device's variables in the fake, as a sorted map-like list with values decoded.
fn vars(balena: &FakeBalena, device: u64) -> Vec<(String, String)> {
    let mut vars = balena.env_vars(device);
    vars.sort();
    vars
}

fn read(dir: &Path, path: &str) -> String {
    std::fs::read_to_string(dir.join(path)).unwrap()
}

#[test]
fn balena_env_file_holds_base64_chain_and_key_per_device_readable_by_the_owner_only() {
    let tmp = with_ca();
    let dir = tmp.path();
    let ids = [uuid(1), uuid(2)];
    let out = jitr(
        dir,
        &[
            "issue",
            "--id",
            &ids[0],
            "--id",
            &ids[1],
            "--passphrase-file",
            "pass",
            "--balena-env",
            "balena-env.jsonl",
            "--endpoint",
            ENDPOINT,
        ],
        None,
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let path = dir.join("balena-env.jsonl");
    assert_eq!(
        std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let lines: Vec<serde_json::Value> = read(dir, "balena-env.jsonl")
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    for (line, id) in lines.iter().zip(&ids) {
        let object = line.as_object().unwrap();
        let mut keys: Vec<_> = object.keys().map(String::as_str).collect();
        keys.sort_unstable();
        assert_eq!(
            keys,
            ["AWS_CERT", "AWS_DATA_ENDPOINT", "AWS_PRIVATE_KEY", "id"]
        );
        assert_eq!(line["id"], id.as_str());
        assert_eq!(
            b64(line["AWS_CERT"].as_str().unwrap()),
            read(dir, &format!("devices/{id}/chain.pem"))
        );
        assert_eq!(
            b64(line["AWS_PRIVATE_KEY"].as_str().unwrap()),
            read(dir, &format!("devices/{id}/device.key"))
        );
        assert_eq!(line["AWS_DATA_ENDPOINT"], ENDPOINT);
    }
    // The chain is what JITR needs: the device certificate, then its CA.
    let chain = read(dir, &format!("devices/{}/chain.pem", ids[0]));
    assert_eq!(chain.matches("BEGIN CERTIFICATE").count(), 2);

    // Without --endpoint there is no AWS_DATA_ENDPOINT; the file is replaced whole.
    let out = jitr(
        dir,
        &[
            "issue",
            "--id",
            &uuid(3),
            "--passphrase-file",
            "pass",
            "--balena-env",
            "balena-env.jsonl",
        ],
        None,
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let line: serde_json::Value =
        serde_json::from_str(read(dir, "balena-env.jsonl").trim()).unwrap();
    assert_eq!(line["id"], uuid(3));
    assert!(line.get("AWS_DATA_ENDPOINT").is_none());
    assert_eq!(
        std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
        0o600
    );
}

#[test]
fn a_device_that_sent_a_csr_gets_no_private_key_variable() {
    use testkit::certs::rcgen::{CertificateParams, DnType, KeyPair};
    let tmp = with_ca();
    let dir = tmp.path();
    let id = uuid(9);
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, &id);
    let csr = params
        .serialize_request(&KeyPair::generate().unwrap())
        .unwrap();
    std::fs::write(dir.join("device.csr"), csr.pem().unwrap()).unwrap();
    let out = jitr(
        dir,
        &[
            "sign-csr",
            "--csr",
            "device.csr",
            "--passphrase-file",
            "pass",
            "--balena-env",
            "env.jsonl",
        ],
        None,
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let line: serde_json::Value = serde_json::from_str(read(dir, "env.jsonl").trim()).unwrap();
    assert_eq!(line["id"], id.as_str());
    assert!(line.get("AWS_PRIVATE_KEY").is_none(), "{line}");
    assert_eq!(
        b64(line["AWS_CERT"].as_str().unwrap()),
        read(dir, &format!("devices/{id}/chain.pem"))
    );
}

#[test]
fn push_balena_sets_device_variables_updates_them_and_names_unknown_devices() {
    let tmp = with_ca();
    let dir = tmp.path();
    let balena = FakeBalena::start(KEY).unwrap();
    balena.add_fleet(FLEET, "acme/sensors");
    let (one, two) = (uuid(1), uuid(2));
    let device_one = balena.add_device(FLEET, &one, true);
    let device_two = balena.add_device(FLEET, &two, true);

    let issue = |ids: &[&str], extra: &[&str]| {
        let mut args = vec!["issue", "--passphrase-file", "pass", "--push-balena"];
        for id in ids {
            args.extend(["--id", id]);
        }
        args.extend(extra);
        jitr(dir, &args, Some(&balena))
    };

    let out = issue(&[&one, &two], &["--endpoint", ENDPOINT]);
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    for (id, device) in [(&one, device_one), (&two, device_two)] {
        let got = vars(&balena, device);
        let names: Vec<_> = got.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["AWS_CERT", "AWS_DATA_ENDPOINT", "AWS_PRIVATE_KEY"]);
        assert_eq!(
            b64(&got[0].1),
            read(dir, &format!("devices/{id}/chain.pem"))
        );
        assert_eq!(got[1].1, ENDPOINT);
        assert_eq!(
            b64(&got[2].1),
            read(dir, &format!("devices/{id}/device.key"))
        );
    }
    assert!(stderr.contains(&format!(
        "balena: {one}: AWS_CERT created, AWS_PRIVATE_KEY created, AWS_DATA_ENDPOINT created"
    )));
    let requests = balena.requests();
    assert!(requests.iter().all(|r| r.authorized));
    // Every lookup is pinned to the fleet.
    assert!(requests.iter().any(|r| r.path == "/v7/device"
        && r.query
            == format!(
                "$select=id,uuid,is_active,belongs_to__application&$filter=uuid eq '{one}' and belongs_to__application eq {FLEET}"
            )));

    // Issued again: the second push updates the variables in place (409, then PATCH).
    balena.clear_requests();
    let old = vars(&balena, device_one);
    let out = issue(&[&one], &["--force", "--endpoint", ENDPOINT]);
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let new = vars(&balena, device_one);
    assert_eq!(new.len(), 3, "updated, not duplicated");
    assert_ne!(new[0].1, old[0].1, "the new chain");
    assert_eq!(
        b64(&new[0].1),
        read(dir, &format!("devices/{one}/chain.pem"))
    );
    assert_eq!(
        b64(&new[2].1),
        read(dir, &format!("devices/{one}/device.key"))
    );
    let patched: Vec<_> = balena
        .requests()
        .into_iter()
        .filter(|r| r.method == "PATCH")
        .map(|r| r.query)
        .collect();
    assert!(
        patched.contains(&format!(
            "$filter=device eq {device_one} and name eq 'AWS_CERT'"
        )),
        "{patched:?}"
    );
    assert!(stderr.contains("AWS_CERT updated"), "{stderr}");

    // A device balena does not know, and one of another fleet the same key can see, fail on
    // their own (nothing is written to the other fleet); the others are still delivered.
    let (stranger, three, elsewhere) = (uuid(3), uuid(4), uuid(5));
    let device_three = balena.add_device(FLEET, &three, true);
    balena.add_fleet(OTHER_FLEET, "acme/other");
    let device_elsewhere = balena.add_device(OTHER_FLEET, &elsewhere, true);
    let out = issue(&[&stranger, &three, &elsewhere], &[]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    for id in [&stranger, &elsewhere] {
        assert!(
            stderr.contains(&format!(
                "jitr: balena: {id}: not found in balena fleet {FLEET}"
            )),
            "{stderr}"
        );
    }
    assert!(stderr.contains("2 failed"), "{stderr}");
    assert!(balena.env_vars(device_elsewhere).is_empty());
    assert_eq!(
        vars(&balena, device_three).len(),
        2,
        "AWS_CERT, AWS_PRIVATE_KEY"
    );
    assert!(dir.join(format!("devices/{stranger}/chain.pem")).exists());

    // Never a secret on the terminal.
    let all = format!("{}{stderr}", text(&out.stdout));
    assert!(!all.contains(KEY));
    assert!(!all.contains("PRIVATE KEY"));
}

#[test]
fn push_balena_without_a_key_issues_nothing_and_api_errors_name_the_variable() {
    let tmp = with_ca();
    let dir = tmp.path();
    let out = jitr(
        dir,
        &[
            "issue",
            "--id",
            &uuid(1),
            "--passphrase-file",
            "pass",
            "--push-balena",
        ],
        None,
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("--push-balena needs BALENA_API_KEY"),
        "{}",
        text(&out.stderr)
    );
    assert!(!dir.join("devices").exists(), "nothing issued");

    // The API refuses the write: the device and the variable are named, exit 1.
    let balena = FakeBalena::start(KEY).unwrap();
    balena.add_fleet(FLEET, "acme/sensors");
    balena.add_device(FLEET, &uuid(1), true);
    balena.set_fault(testkit::balena::Fault::WriteStatus(500));
    let out = jitr(
        dir,
        &[
            "issue",
            "--id",
            &uuid(1),
            "--passphrase-file",
            "pass",
            "--push-balena",
        ],
        Some(&balena),
    );
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "jitr: balena: {}: AWS_CERT: balena API answered HTTP 500",
            uuid(1)
        )),
        "{stderr}"
    );
    assert!(!stderr.contains(KEY));
}
