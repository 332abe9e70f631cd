//! Delivery to balena devices: `--balena-env FILE` (the variables balena's cloud-relay block
//! reads, as JSON lines) and `--push-balena` (device or `--balena-service` variables set
//! through the balena API, here the fake one).

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
            [
                "AWS_CERT",
                "AWS_DATA_ENDPOINT",
                "AWS_PRIVATE_KEY",
                "CLOUD_CONSUMER_TOPIC",
                "id"
            ]
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
        // cloud-relay publishes there; the device policy allows <prefix>/<thing>/*.
        assert_eq!(line["CLOUD_CONSUMER_TOPIC"], format!("balena/{id}/sensors"));
    }
    // The chain is what JITR needs: the device certificate, then its CA.
    let chain = read(dir, &format!("devices/{}/chain.pem", ids[0]));
    assert_eq!(chain.matches("BEGIN CERTIFICATE").count(), 2);

    // Without --endpoint there is no AWS_DATA_ENDPOINT; the file is replaced whole; the
    // topic prefix is the stack's (JITR_TOPIC_PREFIX, or --topic-prefix).
    let out = common::jitr(
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
        &[("JITR_TOPIC_PREFIX", "acme/fleet-1".to_owned())],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let line: serde_json::Value =
        serde_json::from_str(read(dir, "balena-env.jsonl").trim()).unwrap();
    assert_eq!(line["id"], uuid(3));
    assert!(line.get("AWS_DATA_ENDPOINT").is_none());
    assert_eq!(
        line["CLOUD_CONSUMER_TOPIC"],
        format!("acme/fleet-1/{}/sensors", uuid(3))
    );
    // A prefix the policy could not hold is a usage error, before anything is issued.
    let out = jitr(
        dir,
        &[
            "issue",
            "--id",
            &uuid(4),
            "--passphrase-file",
            "pass",
            "--balena-env",
            "x.jsonl",
            "--topic-prefix",
            "acme/#",
        ],
        None,
    );
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("--topic-prefix"),
        "{}",
        text(&out.stderr)
    );
    assert!(!dir.join(format!("devices/{}", uuid(4))).exists());
    assert_eq!(
        std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
        0o600
    );
}

#[test]
fn a_device_that_sent_a_csr_gets_no_private_key_variable_and_is_told_so() {
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
            "--endpoint",
            ENDPOINT,
        ],
        None,
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let line: serde_json::Value = serde_json::from_str(read(dir, "env.jsonl").trim()).unwrap();
    let mut keys: Vec<_> = line.as_object().unwrap().keys().cloned().collect();
    keys.sort();
    assert_eq!(
        keys,
        [
            "AWS_CERT",
            "AWS_DATA_ENDPOINT",
            "CLOUD_CONSUMER_TOPIC",
            "id"
        ]
    );
    assert_eq!(line["id"], id.as_str());
    assert_eq!(
        b64(line["AWS_CERT"].as_str().unwrap()),
        read(dir, &format!("devices/{id}/chain.pem"))
    );
    // Without AWS_PRIVATE_KEY cloud-relay stops ("Partially registered"): the operator is
    // told the device must set it, and the help says what is written.
    assert!(
        text(&out.stderr).contains("the device must provide AWS_PRIVATE_KEY"),
        "{}",
        text(&out.stderr)
    );
    let help = text(&jitr(dir, &["sign-csr", "--help"], None).stdout);
    assert!(
        help.contains("AWS_CERT, AWS_DATA_ENDPOINT and CLOUD_CONSUMER_TOPIC"),
        "{help}"
    );
    assert!(help.contains("must provide AWS_PRIVATE_KEY"), "{help}");
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
        assert_eq!(
            names,
            [
                "AWS_CERT",
                "AWS_DATA_ENDPOINT",
                "AWS_PRIVATE_KEY",
                "CLOUD_CONSUMER_TOPIC"
            ]
        );
        assert_eq!(
            b64(&got[0].1),
            read(dir, &format!("devices/{id}/chain.pem"))
        );
        assert_eq!(got[1].1, ENDPOINT);
        assert_eq!(
            b64(&got[2].1),
            read(dir, &format!("devices/{id}/device.key"))
        );
        assert_eq!(got[3].1, format!("balena/{id}/sensors"));
    }
    assert!(stderr.contains(&format!(
        "balena: {one}: AWS_CERT created, AWS_PRIVATE_KEY created, AWS_DATA_ENDPOINT created, CLOUD_CONSUMER_TOPIC created"
    )), "{stderr}");
    // Device variables reach every service on the device: said once, with the way out.
    assert_eq!(
        stderr
            .matches("every service on the device sees it")
            .count(),
        1,
        "{stderr}"
    );
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
    assert_eq!(new.len(), 4, "updated, not duplicated");
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
        3,
        "AWS_CERT, AWS_PRIVATE_KEY, CLOUD_CONSUMER_TOPIC"
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

#[test]
fn push_balena_to_a_service_sets_service_variables_of_that_device_only() {
    let tmp = with_ca();
    let dir = tmp.path();
    let balena = FakeBalena::start(KEY).unwrap();
    balena.add_fleet(FLEET, "acme/sensors");
    let relay = balena.add_service(FLEET, "cloud-relay");
    let other_service = balena.add_service(FLEET, "sensor");
    let (one, two, bare) = (uuid(1), uuid(2), uuid(3));
    let device_one = balena.add_device(FLEET, &one, true);
    let device_two = balena.add_device(FLEET, &two, true);
    let device_bare = balena.add_device(FLEET, &bare, true);
    for device in [device_one, device_two] {
        balena.install(device, relay);
        balena.install(device, other_service);
    }
    balena.install(device_bare, other_service);

    let issue = |ids: &[&str], service: &str| {
        let mut args = vec![
            "issue",
            "--passphrase-file",
            "pass",
            "--push-balena",
            "--balena-service",
            service,
            "--endpoint",
            ENDPOINT,
        ];
        for id in ids {
            args.extend(["--id", id]);
        }
        jitr(dir, &args, Some(&balena))
    };
    let out = issue(&[&one], "cloud-relay");
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(!stderr.contains("every service"), "{stderr}");
    // Only the relay service of that device holds them; no device-wide variable.
    let mut got = balena.service_vars(device_one);
    got.sort();
    let names: Vec<_> = got
        .iter()
        .map(|(s, n, _)| (s.as_str(), n.as_str()))
        .collect();
    assert_eq!(
        names,
        [
            ("cloud-relay", "AWS_CERT"),
            ("cloud-relay", "AWS_DATA_ENDPOINT"),
            ("cloud-relay", "AWS_PRIVATE_KEY"),
            ("cloud-relay", "CLOUD_CONSUMER_TOPIC"),
        ]
    );
    assert_eq!(
        b64(&got[2].2),
        read(dir, &format!("devices/{one}/device.key"))
    );
    assert!(balena.env_vars(device_one).is_empty());
    assert!(balena.service_vars(device_two).is_empty());

    // A device that does not run the service, and a service the fleet does not have: each
    // named, nothing written anywhere.
    let out = issue(&[&bare], "cloud-relay");
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "jitr: balena: {bare}: AWS_CERT: device {bare} has no service \"cloud-relay\" installed"
        )),
        "{stderr}"
    );
    let out = issue(&[&two], "cloud-relay-typo");
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "fleet {FLEET} has no service \"cloud-relay-typo\""
        )),
        "{stderr}"
    );
    assert!(balena.service_vars(device_bare).is_empty());
    assert!(balena.service_vars(device_two).is_empty());
    assert!(balena.env_vars(device_bare).is_empty());

    // --balena-service needs --push-balena: a usage error.
    let out = jitr(
        dir,
        &[
            "issue",
            "--id",
            &uuid(7),
            "--passphrase-file",
            "pass",
            "--balena-service",
            "cloud-relay",
        ],
        None,
    );
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
}

#[test]
fn fleet_vars_point_cloud_relay_at_the_provisioner_on_the_pinned_fleet_only() {
    let dir = tempfile::tempdir().unwrap();
    let balena = FakeBalena::start(KEY).unwrap();
    balena.add_fleet(FLEET, "acme/fleet");
    balena.add_fleet(OTHER_FLEET, "acme/other");
    let url = "https://abcdefghij.lambda-url.eu-west-1.on.aws/";
    let args = [
        "balena",
        "fleet-vars",
        "--provision-url",
        url,
        "--endpoint",
        ENDPOINT,
    ];
    let out = jitr(dir.path(), &args, Some(&balena));
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout),
        format!(
            "PROVISION_URL={url} (created on balena fleet {FLEET})\nAWS_DATA_ENDPOINT={ENDPOINT} (created on balena fleet {FLEET})\n"
        )
    );
    let expected = vec![
        ("PROVISION_URL".to_owned(), url.to_owned()),
        ("AWS_DATA_ENDPOINT".to_owned(), ENDPOINT.to_owned()),
    ];
    assert_eq!(balena.fleet_vars(FLEET), expected);
    assert!(balena.fleet_vars(OTHER_FLEET).is_empty());

    // Again: updated in place, nothing duplicated.
    let out = jitr(dir.path(), &args, Some(&balena));
    assert!(text(&out.stdout).contains("(updated on balena fleet"));
    assert_eq!(balena.fleet_vars(FLEET), expected);

    // Not an https URL: a usage error before any call; no key: exit 1 naming the variables.
    let out = jitr(
        dir.path(),
        &[
            "balena",
            "fleet-vars",
            "--provision-url",
            "ftp://x",
            "--endpoint",
            ENDPOINT,
        ],
        Some(&balena),
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("--provision-url"),
        "{}",
        text(&out.stderr)
    );
    let out = jitr(dir.path(), &args, None);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("BALENA_API_KEY"),
        "{}",
        text(&out.stderr)
    );
    // A key that cannot see the fleet: refused by balena, said in one line, exit 1.
    balena.hide_fleet_from_key(FLEET);
    let out = jitr(dir.path(), &args, Some(&balena));
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("PROVISION_URL"),
        "{}",
        text(&out.stderr)
    );
}
