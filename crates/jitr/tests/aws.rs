//! `jitr ca register` and `jitr endpoint` against moto, with the test kit's proxy answering
//! what moto never gives (a racing registration's 409, a rejected CA, a verification check).

// Test helpers panic on a failed setup step: that is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test setup: a panic is the report

use std::path::Path;
use std::process::Output;
use std::time::{Duration, Instant};

use testkit::http::HttpRequest;
use testkit::moto::{routing_authorization, MotoServer};
use testkit::proxy::{Canned, FaultPlan, Proxy};

mod common;

use common::{jitr, stderr, stdout};

/// Credentials and region for a scripted endpoint given with `--endpoint-url`.
fn test_credentials() -> Vec<(&'static str, String)> {
    vec![
        ("AWS_REGION", "us-east-1".to_owned()),
        ("AWS_ACCESS_KEY_ID", "testing".to_owned()),
        ("AWS_SECRET_ACCESS_KEY", "testing".to_owned()),
    ]
}

/// A folder with a CA in `ca/`: encrypted with the passphrase in `pass`, or plaintext.
fn with_ca(encrypted: bool) -> tempfile::TempDir {
    common::with_ca(if encrypted {
        &[]
    } else {
        &["--insecure-plaintext-key"]
    })
}

/// The lowercase hex SHA-256 of the DER in `ca/ca.crt`, computed independently of jitr.
fn sha256_of_ca_der(dir: &Path) -> String {
    let pem = std::fs::read(dir.join("ca/ca.crt")).unwrap();
    let (_, pem) = x509_parser::pem::parse_x509_pem(&pem).unwrap();
    hex::encode(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &pem.contents).as_ref())
}

/// moto's DescribeCACertificate answer for `id`.
fn moto_describe_ca(moto: &MotoServer, id: &str) -> serde_json::Value {
    let response = HttpRequest::get(&format!("{}/cacertificate/{id}", moto.endpoint()))
        .header("Authorization", &routing_authorization("iot"))
        .send()
        .unwrap();
    assert_eq!(response.status, 200, "{}", response.text());
    response.json().unwrap()
}

/// Asserts a successful first registration: output, `ca/aws-ca-id`, and what moto holds.
fn assert_registered(dir: &Path, moto: &MotoServer, out: &Output) {
    assert!(out.status.success(), "{}", stderr(out));
    let id = sha256_of_ca_der(dir);
    let printed = stdout(out);
    assert!(printed.contains("registered the CA"), "{printed}");
    assert!(printed.contains(&id), "{printed}");
    assert!(
        printed.contains(&format!("$aws/events/certificates/registered/{id}")),
        "{printed}"
    );
    assert_eq!(
        std::fs::read_to_string(dir.join("ca/aws-ca-id")).unwrap(),
        format!("{id}\n")
    );

    let described = moto_describe_ca(moto, &id);
    let description = &described["certificateDescription"];
    assert_eq!(description["certificateId"], id.as_str());
    assert_eq!(description["status"], "ACTIVE");
    // The exact file, so that device certificates registered with this PEM link to the CA.
    assert_eq!(
        description["certificatePem"],
        std::fs::read_to_string(dir.join("ca/ca.crt"))
            .unwrap()
            .as_str()
    );
    // moto answers no autoRegistrationStatus; its request log shows what was asked for.
    assert!(
        moto.log()
            .contains("POST /cacertificate?setAsActive=true&allowAutoRegistration=true"),
        "{}",
        moto.log()
    );
}

/// Asserts a second registration of the same CA: reported, not an error, id file kept.
fn assert_already_registered(dir: &Path, out: &Output) {
    assert!(out.status.success(), "{}", stderr(out));
    let id = sha256_of_ca_der(dir);
    let printed = stdout(out);
    assert!(printed.contains("already registered"), "{printed}");
    assert!(printed.contains("status ACTIVE"), "{printed}");
    assert!(printed.contains(&id), "{printed}");
    assert_eq!(
        std::fs::read_to_string(dir.join("ca/aws-ca-id")).unwrap(),
        format!("{id}\n")
    );
}

#[test]
fn register_with_a_verification_certificate_then_again() {
    let moto = MotoServer::start().unwrap();
    let tmp = with_ca(true);
    let mut env = moto.aws_env();
    env.retain(|(name, _)| *name != "AWS_ENDPOINT_URL");
    let args = [
        "ca",
        "register",
        "--passphrase-file",
        "pass",
        "--endpoint-url",
        &moto.endpoint(),
    ];
    let out = jitr(tmp.path(), &args, &env);
    assert_registered(tmp.path(), &moto, &out);
    assert!(
        moto.log().contains("GET /registrationcode"),
        "{}",
        moto.log()
    );

    let again = jitr(tmp.path(), &args, &env);
    assert_already_registered(tmp.path(), &again);
}

#[test]
fn register_sni_only_needs_no_ca_key_and_a_second_run_says_already_registered() {
    let moto = MotoServer::start().unwrap();
    let tmp = with_ca(false);
    // No key at all: SNI_ONLY registration must not touch it.
    std::fs::remove_file(tmp.path().join("ca/ca.key")).unwrap();
    let env = moto.aws_env();
    let args = [
        "ca",
        "register",
        "--sni-only",
        "--endpoint-url",
        &moto.endpoint(),
    ];

    let out = jitr(tmp.path(), &args, &env);
    assert_registered(tmp.path(), &moto, &out);
    assert!(stdout(&out).contains("SNI_ONLY"), "{}", stdout(&out));
    assert!(!moto.log().contains("/registrationcode"), "{}", moto.log());

    let again = jitr(tmp.path(), &args, &env);
    assert_already_registered(tmp.path(), &again);

    let mut json_args = args.to_vec();
    json_args.push("--json");
    let json = jitr(tmp.path(), &json_args, &env);
    assert!(json.status.success(), "{}", stderr(&json));
    let printed: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    let id = sha256_of_ca_der(tmp.path());
    assert_eq!(printed["already_registered"], true);
    assert_eq!(printed["ca_certificate_id"], id.as_str());
    assert_eq!(
        printed["topic"],
        format!("$aws/events/certificates/registered/{id}").as_str()
    );
}

#[test]
fn endpoint_prints_the_ats_data_endpoint() {
    let moto = MotoServer::start().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    // The endpoint from the environment alone (AWS_ENDPOINT_URL), as the standard chain has it.
    let out = jitr(tmp.path(), &["endpoint"], &moto.aws_env());
    assert!(out.status.success(), "{}", stderr(&out));
    let address = stdout(&out);
    let address = address.trim();
    assert!(
        address.ends_with("-ats.iot.us-east-1.amazonaws.com") && !address.contains(' '),
        "{address}"
    );
    assert!(
        moto.log()
            .contains("GET /endpoint?endpointType=iot:Data-ATS"),
        "{}",
        moto.log()
    );

    // --region overrides AWS_REGION.
    let out = jitr(
        tmp.path(),
        &["endpoint", "--region", "eu-west-1", "--json"],
        &moto.aws_env(),
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let printed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let address = printed["endpoint_address"].as_str().unwrap();
    assert!(
        address.ends_with("-ats.iot.eu-west-1.amazonaws.com"),
        "{address}"
    );
}

#[test]
fn an_unreachable_endpoint_fails_fast_with_one_line() {
    let moto = MotoServer::start().unwrap();
    let tmp = with_ca(false);
    for args in [
        vec!["endpoint", "--endpoint-url", "http://127.0.0.1:9"],
        vec![
            "ca",
            "register",
            "--sni-only",
            "--endpoint-url",
            "http://127.0.0.1:9",
        ],
    ] {
        let started = Instant::now();
        // The flag wins over AWS_ENDPOINT_URL (which points at a live moto).
        let out = jitr(tmp.path(), &args, &moto.aws_env());
        assert!(started.elapsed() < Duration::from_secs(15));
        assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
        let message = stderr(&out);
        assert_eq!(message.lines().count(), 1, "{message}");
        // The call is retried until its time is up; the message names the endpoint and the
        // last error.
        assert!(
            message.starts_with("jitr: error: AWS IoT ")
                && message
                    .contains("cannot reach AWS IoT at http://127.0.0.1:9: Connection refused"),
            "{message}"
        );
    }
    assert!(!tmp.path().join("ca/aws-ca-id").exists());
}

#[test]
fn missing_credentials_or_region_are_named() {
    let moto = MotoServer::start().unwrap();
    let tmp = with_ca(false);
    let no_credentials: Vec<_> = moto
        .aws_env()
        .into_iter()
        .filter(|(name, _)| !name.starts_with("AWS_ACCESS") && !name.starts_with("AWS_SECRET"))
        .collect();
    for args in [vec!["endpoint"], vec!["ca", "register", "--sni-only"]] {
        let out = jitr(tmp.path(), &args, &no_credentials);
        assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
        assert_eq!(
            stderr(&out),
            "jitr: error: no AWS credentials found: set AWS_PROFILE or \
             AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY\n"
        );
    }

    let no_region: Vec<_> = moto
        .aws_env()
        .into_iter()
        .filter(|(name, _)| *name != "AWS_REGION")
        .collect();
    let out = jitr(tmp.path(), &["endpoint"], &no_region);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let message = stderr(&out);
    assert!(
        message.starts_with("jitr: error: no AWS region") && message.lines().count() == 1,
        "{message}"
    );
    assert!(!moto.log().contains("/endpoint"), "{}", moto.log());
}

#[test]
fn a_bad_endpoint_url_is_a_usage_error() {
    let tmp = tempfile::tempdir().unwrap();
    let out = jitr(
        tmp.path(),
        &["endpoint", "--endpoint-url", "127.0.0.1:5000"],
        &test_credentials(),
    );
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
}

/// AWS IoT as the tests below need it: moto behind the test kit's proxy, which answers the
/// calls a test scripts (a registration code, a race, a refusal) and records every request.
fn scripted_iot() -> (MotoServer, Proxy) {
    let moto = MotoServer::start().unwrap();
    let proxy = Proxy::for_url(&moto.endpoint(), FaultPlan::default()).unwrap();
    (moto, proxy)
}

/// `METHOD target` of every request the proxy saw.
fn calls(proxy: &Proxy) -> Vec<String> {
    proxy
        .requests()
        .iter()
        .map(|r| format!("{} {}", r.method, r.target))
        .collect()
}

/// An AWS-shaped registration code: 64 hex digits.
const CODE: &str = "a3f1c2d4e5b60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f90";

#[test]
fn register_proves_key_possession_with_a_verification_certificate() {
    let tmp = with_ca(true);
    let (_moto, iot) = scripted_iot();
    iot.answer("GetRegistrationCode", |_| {
        Some(Canned::ok(serde_json::json!({"registrationCode": CODE})))
    });
    iot.answer("RegisterCACertificate", |_| {
        Some(Canned::ok(serde_json::json!({
            "certificateId": "f".repeat(64),
            "certificateArn": format!("arn:aws:iot:us-east-1:123456789012:cacert/{}", "f".repeat(64)),
        })))
    });
    let out = jitr(
        tmp.path(),
        &[
            "ca",
            "register",
            "--passphrase-file",
            "pass",
            "--endpoint-url",
            &iot.url(),
            "--json",
        ],
        &test_credentials(),
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let printed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    // The id AWS answers is the one reported (and a mismatch with the DER hash is warned about).
    let aws_id = "f".repeat(64);
    assert_eq!(printed["ca_certificate_id"], aws_id.as_str());
    assert_eq!(printed["already_registered"], false);
    assert_eq!(printed["certificate_mode"], "DEFAULT");
    assert!(stderr(&out).contains("warning: AWS IoT gave the CA id"));
    assert_eq!(
        std::fs::read_to_string(tmp.path().join("ca/aws-ca-id")).unwrap(),
        format!("{aws_id}\n")
    );

    let seen = iot.requests();
    let id = sha256_of_ca_der(tmp.path());
    assert_eq!(
        calls(&iot),
        [
            format!("GET /cacertificate/{id}"),
            "GET /registrationcode".to_owned(),
            "POST /cacertificate?setAsActive=true&allowAutoRegistration=true".to_owned(),
        ]
    );
    let body: serde_json::Value = serde_json::from_str(&seen[2].body).unwrap();
    let ca_pem = std::fs::read_to_string(tmp.path().join("ca/ca.crt")).unwrap();
    assert_eq!(body["caCertificate"], ca_pem.as_str());
    assert!(body.get("certificateMode").is_none(), "{body}");

    // The verification certificate: CN = the code, signed by the CA key.
    let verification = body["verificationCertificate"].as_str().unwrap();
    let (_, verification) = x509_parser::pem::parse_x509_pem(verification.as_bytes()).unwrap();
    let verification = verification.parse_x509().unwrap();
    let (_, ca_pem) = x509_parser::pem::parse_x509_pem(ca_pem.as_bytes()).unwrap();
    let ca = ca_pem.parse_x509().unwrap();
    let cn = verification
        .subject()
        .iter_common_name()
        .next()
        .unwrap()
        .as_str()
        .unwrap();
    assert_eq!(cn, CODE);
    assert_eq!(verification.issuer(), ca.subject());
    verification
        .verify_signature(Some(ca.public_key()))
        .unwrap();
}

#[test]
fn register_sni_only_sends_no_verification_certificate() {
    let tmp = with_ca(true);
    let (_moto, iot) = scripted_iot();
    iot.answer("RegisterCACertificate", |_| {
        Some(Canned::ok(
            serde_json::json!({"certificateId": "e".repeat(64)}),
        ))
    });
    // Encrypted key, no passphrase anywhere: SNI_ONLY must not ask for it.
    let out = jitr(
        tmp.path(),
        &["ca", "register", "--sni-only", "--endpoint-url", &iot.url()],
        &test_credentials(),
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let seen = iot.requests();
    assert_eq!(seen.len(), 2, "{seen:?}");
    let body: serde_json::Value = serde_json::from_str(&seen[1].body).unwrap();
    assert_eq!(body["certificateMode"], "SNI_ONLY");
    assert!(body.get("verificationCertificate").is_none(), "{body}");
}

#[test]
fn a_registration_that_races_another_reports_already_registered() {
    let tmp = with_ca(false);
    let (_moto, iot) = scripted_iot();
    // Registered by someone else between our DescribeCACertificate and RegisterCACertificate:
    // the shape of testdata/aws/iot-error-already-exists.txt.
    iot.answer("RegisterCACertificate", |_| {
        Some(Canned::error(
            409,
            "ResourceAlreadyExistsException",
            serde_json::json!({
                "message": "The CA certificate is already registered",
                "resourceId": "d".repeat(64),
                "resourceArn": format!("arn:aws:iot:us-east-1:123456789012:cacert/{}", "d".repeat(64)),
            }),
        ))
    });
    let out = jitr(
        tmp.path(),
        &["ca", "register", "--sni-only", "--endpoint-url", &iot.url()],
        &test_credentials(),
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let printed = stdout(&out);
    assert!(printed.contains("already registered"), "{printed}");
    assert!(printed.contains(&"d".repeat(64)), "{printed}");
    assert_eq!(
        std::fs::read_to_string(tmp.path().join("ca/aws-ca-id")).unwrap(),
        format!("{}\n", "d".repeat(64))
    );
}

#[test]
fn a_rejected_ca_fails_with_aws_reason_on_one_line() {
    let tmp = with_ca(false);
    let (_moto, iot) = scripted_iot();
    iot.answer("GetRegistrationCode", |_| {
        Some(Canned::ok(serde_json::json!({"registrationCode": CODE})))
    });
    iot.answer("RegisterCACertificate", |_| {
        Some(Canned::error(
            400,
            "CertificateValidationException",
            serde_json::json!({"message": "The certificate is not a valid CA certificate"}),
        ))
    });
    let out = jitr(
        tmp.path(),
        &["ca", "register", "--endpoint-url", &iot.url()],
        &test_credentials(),
    );
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert_eq!(
        stderr(&out),
        "jitr: error: AWS IoT RegisterCACertificate: CertificateValidationException: \
         The certificate is not a valid CA certificate\n"
    );
    assert!(!tmp.path().join("ca/aws-ca-id").exists());
}

#[test]
fn a_wrong_passphrase_fails_before_any_aws_call() {
    let tmp = with_ca(true);
    std::fs::write(tmp.path().join("wrong"), "not the passphrase\n").unwrap();
    let (_moto, iot) = scripted_iot();
    let out = jitr(
        tmp.path(),
        &[
            "ca",
            "register",
            "--passphrase-file",
            "wrong",
            "--endpoint-url",
            &iot.url(),
        ],
        &test_credentials(),
    );
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(iot.requests().is_empty(), "{:?}", calls(&iot));
}

#[test]
fn jitp_template_gives_the_activators_result_and_register_sets_it_on_the_ca() {
    let moto = MotoServer::start().unwrap();
    let tmp = with_ca(false);
    let role = "arn:aws:iam::123456789012:role/jitr-jitp";
    let env = moto.aws_env();
    let out = jitr(
        tmp.path(),
        &[
            "jitp-template",
            "--role-arn",
            role,
            "--policy",
            "acme-device",
            "--fleet-id",
            "424242",
            "--thing-group",
            "sensors",
        ],
        &env,
    );
    assert!(out.status.success(), "{}", stderr(&out));
    std::fs::write(tmp.path().join("jitp.json"), &out.stdout).unwrap();
    let printed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(printed["roleArn"], role);
    let body: serde_json::Value =
        serde_json::from_str(printed["templateBody"].as_str().unwrap()).unwrap();
    let thing = &body["Resources"]["thing"]["Properties"];
    assert_eq!(
        thing["ThingName"],
        serde_json::json!({"Ref": "AWS::IoT::Certificate::CommonName"})
    );
    // The attribute the activator writes for the same fleet.
    assert_eq!(thing["AttributePayload"]["fleet"], "balena-fleet-424242");
    assert_eq!(thing["ThingGroups"], serde_json::json!(["sensors"]));
    assert_eq!(
        body["Resources"]["policy"]["Properties"]["PolicyName"],
        "acme-device"
    );
    assert_eq!(
        body["Resources"]["certificate"]["Properties"]["Status"],
        "ACTIVE"
    );

    // Registered with it: moto holds the registrationConfig; a second run on the registered
    // CA sets it again.
    let args = [
        "ca",
        "register",
        "--sni-only",
        "--jitp-template",
        "jitp.json",
        "--endpoint-url",
        &moto.endpoint(),
    ];
    for _ in 0..2 {
        let out = jitr(tmp.path(), &args, &env);
        assert!(out.status.success(), "{}", stderr(&out));
        assert!(
            stdout(&out).contains("JITP template set"),
            "{}",
            stdout(&out)
        );
        let id = sha256_of_ca_der(tmp.path());
        let described = moto_describe_ca(&moto, &id);
        assert_eq!(described["registrationConfig"]["roleArn"], role);
        assert_eq!(
            described["registrationConfig"]["templateBody"],
            printed["templateBody"]
        );
    }

    // A file that is not a registrationConfig, or a role that is not a role: usage, no call.
    for (text, reason) in [
        ("not json", "not JSON"),
        (
            r#"{"templateBody": "{}", "roleArn": "arn:aws:iam::123456789012:role/x"}"#,
            "no Resources",
        ),
        (
            r#"{"templateBody": "{\"Resources\":{}}", "roleArn": "role"}"#,
            "not an IAM role ARN",
        ),
    ] {
        std::fs::write(tmp.path().join("bad.json"), text).unwrap();
        let out = jitr(
            tmp.path(),
            &[
                "ca",
                "register",
                "--sni-only",
                "--jitp-template",
                "bad.json",
            ],
            &env,
        );
        assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
        assert!(stderr(&out).contains(reason), "{}", stderr(&out));
        assert!(stderr(&out).contains("bad.json"), "{}", stderr(&out));
    }
    let out = jitr(tmp.path(), &["jitp-template", "--role-arn", "nope"], &env);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
}
