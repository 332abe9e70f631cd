//! A fleet in several regions, against one moto server that keeps regions apart (it reads
//! the region from each request's signature): `ca register --region A --region B`,
//! `endpoint --region R`, and `issue --region-of FILE` delivering each device its region's
//! data endpoint.

// Test helpers panic on a failed setup step: that is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test setup: a panic is the report

use std::path::Path;
use std::process::Output;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use aws_sdk_iot::config::{BehaviorVersion, Credentials, Region};
use testkit::balena::FakeBalena;
use testkit::moto::MotoServer;
use testkit::proxy::{Canned, FaultPlan, Proxy};

mod common;

use common::{jitr, stderr, stdout, uuid};

const EU: &str = "eu-west-1";
const US: &str = "us-east-1";

/// Credentials and a default region, no endpoint: every command names it with --endpoint-url.
fn credentials() -> Vec<(&'static str, String)> {
    vec![
        ("AWS_REGION", "ap-southeast-2".to_owned()),
        ("AWS_ACCESS_KEY_ID", "testing".to_owned()),
        ("AWS_SECRET_ACCESS_KEY", "testing".to_owned()),
    ]
}

/// The lowercase hex SHA-256 of the DER in `ca/ca.crt`, computed independently of jitr.
fn ca_id(dir: &Path) -> String {
    let pem = std::fs::read(dir.join("ca/ca.crt")).unwrap();
    let (_, pem) = x509_parser::pem::parse_x509_pem(&pem).unwrap();
    hex::encode(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &pem.contents).as_ref())
}

/// What AWS IoT (the SDK, not jitr) says about the CA in `region`: its status, or the error.
fn described_in(endpoint: &str, region: &str, id: &str) -> Result<String, String> {
    let config = aws_sdk_iot::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new(region.to_owned()))
        .endpoint_url(endpoint)
        .credentials_provider(Credentials::new("testing", "testing", None, None, "test"))
        .build();
    let client = aws_sdk_iot::Client::from_conf(config);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        match client
            .describe_ca_certificate()
            .certificate_id(id)
            .send()
            .await
        {
            Ok(out) => Ok(out
                .certificate_description()
                .and_then(|d| d.status())
                .map(|s| s.as_str().to_owned())
                .unwrap_or_default()),
            Err(e) => Err(format!("{:?}", e.into_service_error())),
        }
    })
}

/// `ca/aws-ca-ids.json` as a JSON value.
fn ids_file(dir: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("ca/aws-ca-ids.json")).unwrap()).unwrap()
}

fn json(out: &Output) -> serde_json::Value {
    assert!(out.status.success(), "{}", stderr(out));
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn ca_register_in_two_regions_records_both_ids_and_a_rerun_changes_nothing() {
    let moto = MotoServer::start().unwrap();
    let tmp = common::with_ca(&[]);
    let dir = tmp.path();
    let id = ca_id(dir);
    let url = moto.endpoint();
    let args = [
        "ca",
        "register",
        "--passphrase-file",
        "pass",
        "--region",
        EU,
        "--region",
        US,
        "--endpoint-url",
        &url,
    ];
    let mut with_json = args.to_vec();
    with_json.push("--json");
    let printed = json(&jitr(dir, &with_json, &credentials()));
    let regions = printed["regions"].as_array().unwrap();
    assert_eq!(regions.len(), 2, "{printed}");
    for (result, region) in regions.iter().zip([EU, US]) {
        assert_eq!(result["region"], region, "{printed}");
        assert_eq!(result["ca_certificate_id"], id.as_str());
        assert_eq!(result["already_registered"], false);
        assert_eq!(result["certificate_mode"], "DEFAULT");
        assert_eq!(result["sni_only_fallback"], false);
    }
    // Each region got its own registration code and verification certificate.
    assert_eq!(moto.log().matches("GET /registrationcode").count(), 2);

    // AWS IoT holds the CA in both regions, and only there.
    for region in [EU, US] {
        assert_eq!(described_in(&url, region, &id).as_deref(), Ok("ACTIVE"));
    }
    assert!(described_in(&url, "ap-southeast-2", &id).is_err());

    // One record of every region, pretty; aws-ca-id is the one-region file.
    let text = std::fs::read_to_string(dir.join("ca/aws-ca-ids.json")).unwrap();
    assert!(text.contains("\n  \"eu-west-1\": "), "{text}");
    assert_eq!(ids_file(dir), serde_json::json!({EU: id, US: id}));
    assert!(!dir.join("ca/aws-ca-id").exists());

    // Again: nothing registered, the same record.
    let again = jitr(dir, &args, &credentials());
    assert!(again.status.success(), "{}", stderr(&again));
    let text_out = stdout(&again);
    assert_eq!(
        text_out.matches("already registered").count(),
        2,
        "{text_out}"
    );
    assert!(
        text_out.contains(&format!("CA certificate id  {id}")),
        "{text_out}"
    );
    assert_eq!(moto.log().matches("POST /cacertificate").count(), 2);
    assert_eq!(ids_file(dir), serde_json::json!({EU: id, US: id}));

    // One more region, the old way (one --region): merged, and aws-ca-id written as before.
    let out = jitr(
        dir,
        &[
            "ca",
            "register",
            "--passphrase-file",
            "pass",
            "--region",
            "ap-southeast-2",
            "--endpoint-url",
            &url,
        ],
        &credentials(),
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("registered the CA in AWS IoT (DEFAULT mode"));
    assert_eq!(
        ids_file(dir),
        serde_json::json!({EU: id, US: id, "ap-southeast-2": id})
    );
    assert_eq!(
        std::fs::read_to_string(dir.join("ca/aws-ca-id")).unwrap(),
        format!("{id}\n")
    );
}

#[test]
fn a_region_that_fails_loses_nothing_of_the_others_and_exits_1() {
    let moto = MotoServer::start().unwrap();
    let proxy = Proxy::for_url(&moto.endpoint(), FaultPlan::default()).unwrap();
    let tmp = common::with_ca(&[]);
    let dir = tmp.path();
    let id = ca_id(dir);
    // A region registered on an earlier day stays in the record.
    std::fs::write(
        dir.join("ca/aws-ca-ids.json"),
        format!("{{\"sa-east-1\": \"{id}\"}}\n"),
    )
    .unwrap();
    // The second region's registration is refused.
    let registrations = Arc::new(AtomicUsize::new(0));
    let seen = registrations.clone();
    proxy.answer("RegisterCACertificate", move |_| {
        (seen.fetch_add(1, Ordering::SeqCst) == 1).then(|| {
            Canned::error(
                400,
                "CertificateValidationException",
                serde_json::json!({"message": "The certificate is not a valid CA certificate"}),
            )
        })
    });
    let out = jitr(
        dir,
        &[
            "ca",
            "register",
            "--sni-only",
            "--region",
            EU,
            "--region",
            US,
            "--endpoint-url",
            &proxy.url(),
        ],
        &credentials(),
    );
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert_eq!(
        stderr(&out),
        "jitr: error: us-east-1: AWS IoT RegisterCACertificate: CertificateValidationException: \
         The certificate is not a valid CA certificate\n"
    );
    assert!(stdout(&out).contains("eu-west-1"), "{}", stdout(&out));
    assert_eq!(registrations.load(Ordering::SeqCst), 2);
    assert_eq!(ids_file(dir), serde_json::json!({"sa-east-1": id, EU: id}));
    assert_eq!(
        described_in(&moto.endpoint(), EU, &id).as_deref(),
        Ok("ACTIVE")
    );
    assert!(described_in(&moto.endpoint(), US, &id).is_err());
}

#[test]
fn where_another_account_holds_the_ca_in_default_mode_it_is_registered_sni_only() {
    let moto = MotoServer::start().unwrap();
    let proxy = Proxy::for_url(&moto.endpoint(), FaultPlan::default()).unwrap();
    let tmp = common::with_ca(&[]);
    let dir = tmp.path();
    let id = ca_id(dir);
    // In the first region another account holds the CA in DEFAULT mode: AWS IoT refuses a
    // DEFAULT registration there as existing, while this account has none.
    let refused = Arc::new(AtomicUsize::new(0));
    let count = refused.clone();
    let resource_id = id.clone();
    proxy.answer("RegisterCACertificate", move |request| {
        let body: serde_json::Value = serde_json::from_str(&request.body).unwrap();
        let default_mode = body.get("verificationCertificate").is_some();
        (default_mode && count.fetch_add(1, Ordering::SeqCst) == 0).then(|| {
            Canned::error(
                409,
                "ResourceAlreadyExistsException",
                serde_json::json!({
                    "message": "The CA certificate is already registered",
                    "resourceId": resource_id,
                }),
            )
        })
    });
    let printed = json(&jitr(
        dir,
        &[
            "ca",
            "register",
            "--passphrase-file",
            "pass",
            "--region",
            EU,
            "--region",
            US,
            "--endpoint-url",
            &proxy.url(),
            "--json",
        ],
        &credentials(),
    ));
    let regions = printed["regions"].as_array().unwrap();
    assert_eq!(regions[0]["region"], EU);
    assert_eq!(regions[0]["certificate_mode"], "SNI_ONLY", "{printed}");
    assert_eq!(regions[0]["sni_only_fallback"], true);
    assert_eq!(regions[0]["already_registered"], false);
    assert_eq!(regions[1]["region"], US);
    assert_eq!(regions[1]["certificate_mode"], "DEFAULT", "{printed}");
    assert_eq!(refused.load(Ordering::SeqCst), 2);

    // The retry in SNI_ONLY mode sent no verification certificate.
    let bodies: Vec<serde_json::Value> = proxy
        .requests()
        .iter()
        .filter(|r| r.method == "POST" && r.target.starts_with("/cacertificate"))
        .map(|r| serde_json::from_str(&r.body).unwrap())
        .collect();
    assert_eq!(bodies.len(), 3);
    assert_eq!(bodies[1]["certificateMode"], "SNI_ONLY");
    assert!(bodies[1].get("verificationCertificate").is_none());
    assert!(bodies[2].get("verificationCertificate").is_some());
    for region in [EU, US] {
        assert_eq!(
            described_in(&moto.endpoint(), region, &id).as_deref(),
            Ok("ACTIVE")
        );
    }
    assert_eq!(ids_file(dir), serde_json::json!({EU: id, US: id}));
}

#[test]
fn endpoint_answers_for_the_region_asked() {
    let moto = MotoServer::start().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    for region in [EU, US] {
        let printed = json(&jitr(
            tmp.path(),
            &[
                "endpoint",
                "--region",
                region,
                "--endpoint-url",
                &moto.endpoint(),
                "--json",
            ],
            &credentials(),
        ));
        let address = printed["endpoint_address"].as_str().unwrap();
        assert!(
            address.ends_with(&format!("-ats.iot.{region}.amazonaws.com")),
            "{address}"
        );
    }
}

const KEY: &str = "balena-test-api-key";
const FLEET: u64 = 1234567;

/// balena's settings for the fake, and the AWS credentials.
fn env_with(balena: &FakeBalena) -> Vec<(&'static str, String)> {
    let mut env = credentials();
    env.extend([
        ("BALENA_API_KEY", KEY.to_owned()),
        ("BALENA_API_URL", balena.url()),
        ("BALENA_FLEET_ID", FLEET.to_string()),
    ]);
    env
}

/// A device's AWS_DATA_ENDPOINT in the fake balena.
fn delivered_endpoint(balena: &FakeBalena, device: u64) -> String {
    balena
        .env_vars(device)
        .into_iter()
        .find(|(name, _)| name == "AWS_DATA_ENDPOINT")
        .map(|(_, value)| value)
        .unwrap()
}

#[test]
fn issue_region_of_delivers_each_device_the_endpoint_of_its_region() {
    let moto = MotoServer::start().unwrap();
    let balena = FakeBalena::start(KEY).unwrap();
    balena.add_fleet(FLEET, "acme/sensors");
    let tmp = common::with_ca(&[]);
    let dir = tmp.path();
    let ids = [uuid(1), uuid(2), uuid(3)];
    let devices: Vec<u64> = ids
        .iter()
        .map(|id| balena.add_device(FLEET, id, true))
        .collect();
    std::fs::write(
        dir.join("regions.csv"),
        format!(
            "device_id,region\n# Europe\n{},{EU}\n{}, {EU}\n\n{} {US}\n{},{US}\n",
            ids[0],
            ids[1],
            ids[2],
            uuid(9)
        ),
    )
    .unwrap();
    let out = jitr(
        dir,
        &[
            "issue",
            "--id",
            &ids[0],
            "--id",
            &ids[1],
            "--id",
            &ids[2],
            "--passphrase-file",
            "pass",
            "--push-balena",
            "--balena-env",
            "env.jsonl",
            "--region-of",
            "regions.csv",
            "--endpoint-url",
            &moto.endpoint(),
        ],
        &env_with(&balena),
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("devices per region: eu-west-1 2, us-east-1 1"),
        "{}",
        stderr(&out)
    );
    // Asked once per region, however many devices each has.
    assert_eq!(
        moto.log()
            .matches("GET /endpoint?endpointType=iot:Data-ATS")
            .count(),
        2,
        "{}",
        moto.log()
    );
    let pushed: Vec<String> = devices
        .iter()
        .map(|d| delivered_endpoint(&balena, *d))
        .collect();
    assert!(
        pushed[0].ends_with("-ats.iot.eu-west-1.amazonaws.com"),
        "{pushed:?}"
    );
    assert_eq!(pushed[0], pushed[1]);
    assert!(
        pushed[2].ends_with("-ats.iot.us-east-1.amazonaws.com"),
        "{pushed:?}"
    );
    // The env file says the same, device by device.
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(dir.join("env.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3);
    for (line, expected) in lines.iter().zip(&pushed) {
        assert_eq!(line["AWS_DATA_ENDPOINT"], expected.as_str(), "{line}");
    }
}

#[test]
fn a_bad_region_file_is_a_usage_error_and_nothing_is_issued() {
    let balena = FakeBalena::start(KEY).unwrap();
    balena.add_fleet(FLEET, "acme/sensors");
    let tmp = common::with_ca(&[]);
    let dir = tmp.path();
    let (one, two) = (uuid(1), uuid(2));
    for (text, expected) in [
        (
            format!("{one},{EU}\n"),
            format!("jitr: error: regions.csv: no region for device {two}: every device issued needs one\n"),
        ),
        (
            format!("{one},{EU}\n{two},mars-1\n"),
            "jitr: error: regions.csv:2: \"mars-1\" is not an AWS region name (like eu-west-1 or us-east-1)\n"
                .to_owned(),
        ),
        (
            format!("{one};{EU}\n"),
            format!("jitr: error: regions.csv:1: expected `device_id,region` (or the two separated by spaces), found \"{one};{EU}\"\n"),
        ),
    ] {
        std::fs::write(dir.join("regions.csv"), &text).unwrap();
        // An endpoint that refuses connections: any AWS call would fail with exit 1.
        let out = jitr(
            dir,
            &[
                "issue",
                "--id",
                &one,
                "--id",
                &two,
                "--passphrase-file",
                "pass",
                "--push-balena",
                "--region-of",
                "regions.csv",
                "--endpoint-url",
                "http://127.0.0.1:9",
            ],
            &env_with(&balena),
        );
        assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
        assert_eq!(stderr(&out), expected);
        assert!(!dir.join("devices").exists());
        assert!(balena.requests().is_empty());
    }

    // One endpoint for all, or one per region: not both.
    let out = jitr(
        dir,
        &[
            "issue",
            "--id",
            &one,
            "--region-of",
            "regions.csv",
            "--endpoint",
            "abc-ats.iot.eu-west-1.amazonaws.com",
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
}
