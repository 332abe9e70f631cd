//! `jitr ca register` and `jitr endpoint` against moto, and against a scripted AWS IoT for the
//! answers moto never gives (a racing registration's 409, a rejected CA).

// Test helpers panic on a failed setup step: that is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use testkit::http::HttpRequest;
use testkit::moto::{routing_authorization, MotoServer};

const PASS: &str = "aws test passphrase";

/// Runs `jitr` in `dir` with only the given environment for AWS: nothing leaks in from the
/// host (no ~/.aws, no instance metadata, no AWS_* variables of the person running the tests).
fn jitr(dir: &Path, args: &[&str], env: &[(&str, String)]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_jitr"));
    command.args(args).current_dir(dir).stdin(Stdio::null());
    for var in [
        "JITR_CA_PASSPHRASE",
        "AWS_PROFILE",
        "AWS_REGION",
        "AWS_DEFAULT_REGION",
        "AWS_ENDPOINT_URL",
        "AWS_ENDPOINT_URL_IOT",
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_WEB_IDENTITY_TOKEN_FILE",
        "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
        "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    ] {
        command.env_remove(var);
    }
    command
        .env("AWS_CONFIG_FILE", "/nonexistent")
        .env("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
        .env("AWS_EC2_METADATA_DISABLED", "true");
    for (name, value) in env {
        command.env(name, value);
    }
    command.output().unwrap()
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

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
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("pass"), format!("{PASS}\n")).unwrap();
    let mut args = vec!["ca", "init", "--subject", "O=Acme,CN=Acme fleet CA"];
    if encrypted {
        args.extend(["--passphrase-file", "pass"]);
    } else {
        args.push("--insecure-plaintext-key");
    }
    let out = jitr(tmp.path(), &args, &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    tmp
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
        assert!(
            message.starts_with("jitr: error: cannot reach AWS IoT at http://127.0.0.1:9"),
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

/// One request the scripted AWS IoT received.
#[derive(Debug, Clone)]
struct Seen {
    method: String,
    target: String,
    body: String,
}

/// A canned REST-JSON answer.
struct Answer {
    status: u16,
    error_type: Option<&'static str>,
    body: String,
}

impl Answer {
    fn ok(body: serde_json::Value) -> Self {
        Answer {
            status: 200,
            error_type: None,
            body: body.to_string(),
        }
    }

    fn error(status: u16, error_type: &'static str, body: serde_json::Value) -> Self {
        Answer {
            status,
            error_type: Some(error_type),
            body: body.to_string(),
        }
    }

    /// As in ../shared/fixtures/aws/iot-error-not-found.txt.
    fn not_found() -> Self {
        Answer::error(
            404,
            "ResourceNotFoundException",
            serde_json::json!({"message": "The certificate given in the request does not exist"}),
        )
    }
}

/// A scripted AWS IoT on a loopback port: answers each request with `route(method, target)`
/// and records it. One request per connection (`Connection: close`); the accept thread ends
/// with the test process.
struct ScriptedIot {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl ScriptedIot {
    fn start(route: impl Fn(&str, &str) -> Answer + Send + 'static) -> Self {
        let listener = TcpListener::bind(("127.0.0.1", 0)).unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = Arc::clone(&seen);
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                Self::answer(stream, &route, &log);
            }
        });
        ScriptedIot { addr, seen }
    }

    /// Reads one request, records it, then answers (so `seen` is complete once jitr exits).
    fn answer(
        stream: TcpStream,
        route: &impl Fn(&str, &str) -> Answer,
        log: &Mutex<Vec<Seen>>,
    ) -> Option<()> {
        let mut reader = BufReader::new(stream.try_clone().ok()?);
        let mut line = String::new();
        reader.read_line(&mut line).ok()?;
        let mut parts = line.split_whitespace();
        let method = parts.next()?.to_owned();
        let target = parts.next()?.to_owned();
        let mut length = 0;
        loop {
            let mut header = String::new();
            reader.read_line(&mut header).ok()?;
            let header = header.trim_end();
            if header.is_empty() {
                break;
            }
            if let Some((name, value)) = header.split_once(':') {
                if name.eq_ignore_ascii_case("content-length") {
                    length = value.trim().parse().ok()?;
                }
            }
        }
        let mut body = vec![0; length];
        reader.read_exact(&mut body).ok()?;
        let answer = route(&method, &target);
        log.lock().unwrap().push(Seen {
            method,
            target,
            body: String::from_utf8_lossy(&body).into_owned(),
        });
        let mut head = format!(
            "HTTP/1.1 {} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n",
            answer.status,
            answer.body.len()
        );
        if let Some(error_type) = answer.error_type {
            head.push_str(&format!("x-amzn-ErrorType: {error_type}\r\n"));
        }
        let mut stream = stream;
        stream
            .write_all(format!("{head}\r\n{}", answer.body).as_bytes())
            .ok()
    }

    fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

/// An AWS-shaped registration code: 64 hex digits.
const CODE: &str = "a3f1c2d4e5b60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f90";

#[test]
fn register_proves_key_possession_with_a_verification_certificate() {
    let tmp = with_ca(true);
    let iot = ScriptedIot::start(|method, target| match (method, target) {
        ("GET", t) if t.starts_with("/cacertificate/") => Answer::not_found(),
        ("GET", "/registrationcode") => Answer::ok(serde_json::json!({"registrationCode": CODE})),
        ("POST", t) if t.starts_with("/cacertificate") => Answer::ok(serde_json::json!({
            "certificateId": "f".repeat(64),
            "certificateArn": format!("arn:aws:iot:us-east-1:123456789012:cacert/{}", "f".repeat(64)),
        })),
        _ => Answer::error(
            400,
            "InvalidRequestException",
            serde_json::json!({"message": "?"}),
        ),
    });
    let out = jitr(
        tmp.path(),
        &[
            "ca",
            "register",
            "--passphrase-file",
            "pass",
            "--endpoint-url",
            &iot.endpoint(),
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

    let seen = iot.seen();
    let calls: Vec<_> = seen
        .iter()
        .map(|s| format!("{} {}", s.method, s.target))
        .collect();
    let id = sha256_of_ca_der(tmp.path());
    assert_eq!(
        calls,
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
    let iot = ScriptedIot::start(|method, target| match (method, target) {
        ("GET", _) => Answer::not_found(),
        _ => Answer::ok(serde_json::json!({"certificateId": "e".repeat(64)})),
    });
    // Encrypted key, no passphrase anywhere: SNI_ONLY must not ask for it.
    let out = jitr(
        tmp.path(),
        &[
            "ca",
            "register",
            "--sni-only",
            "--endpoint-url",
            &iot.endpoint(),
        ],
        &test_credentials(),
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let seen = iot.seen();
    assert_eq!(seen.len(), 2, "{seen:?}");
    let body: serde_json::Value = serde_json::from_str(&seen[1].body).unwrap();
    assert_eq!(body["certificateMode"], "SNI_ONLY");
    assert!(body.get("verificationCertificate").is_none(), "{body}");
}

#[test]
fn a_registration_that_races_another_reports_already_registered() {
    let tmp = with_ca(false);
    let iot = ScriptedIot::start(|method, target| match (method, target) {
        ("GET", _) => Answer::not_found(),
        // The shape of ../shared/fixtures/aws/iot-error-already-exists.txt.
        _ => Answer::error(
            409,
            "ResourceAlreadyExistsException",
            serde_json::json!({
                "message": "The CA certificate is already registered",
                "resourceId": "d".repeat(64),
                "resourceArn": format!("arn:aws:iot:us-east-1:123456789012:cacert/{}", "d".repeat(64)),
            }),
        ),
    });
    let out = jitr(
        tmp.path(),
        &[
            "ca",
            "register",
            "--sni-only",
            "--endpoint-url",
            &iot.endpoint(),
        ],
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
    let iot = ScriptedIot::start(|method, target| match (method, target) {
        ("GET", "/registrationcode") => Answer::ok(serde_json::json!({"registrationCode": CODE})),
        ("GET", _) => Answer::not_found(),
        _ => Answer::error(
            400,
            "CertificateValidationException",
            serde_json::json!({"message": "The certificate is not a valid CA certificate"}),
        ),
    });
    let out = jitr(
        tmp.path(),
        &["ca", "register", "--endpoint-url", &iot.endpoint()],
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
    let iot = ScriptedIot::start(|_, _| Answer::not_found());
    let out = jitr(
        tmp.path(),
        &[
            "ca",
            "register",
            "--passphrase-file",
            "wrong",
            "--endpoint-url",
            &iot.endpoint(),
        ],
        &test_credentials(),
    );
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(iot.seen().is_empty(), "{:?}", iot.seen());
}
