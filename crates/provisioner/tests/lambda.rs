//! The real `provisioner` binary, end to end: the Lambda Runtime API emulator hands it function
//! URL requests shaped like AWS's (payload format 2.0), fleet provisioning hook calls and
//! certificate provider requests; AWS IoT, KMS and DynamoDB are a moto server; balena is the
//! fake API, which records the service variables it receives.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test setup: a panic is the report

use std::sync::Arc;
use std::time::{Duration, Instant};

use aws_sdk_iot::types::CertificateStatus;
use base64::Engine;
use factory_ca::{CaInit, KeyAlgorithm, KeyProtection, Subject};
use serde_json::{json, Value};
use testkit::balena::{FakeBalena, Fault};
use testkit::lambda::{Invocation, RuntimeEmulator};
use testkit::moto::MotoServer;
use testkit::proc::FunctionProcess;
use x509_parser::prelude::{FromDer, X509Certificate};

const FLEET: u64 = 777;
const KEY: &str = "provisioner-test-balena-key-do-not-log";
const POLICY: &str = "jitr-device";
const TABLE: &str = "jitr-provisioning";
const SERVICE: &str = "cloud-relay";
const ENDPOINT: &str = "example-ats.iot.us-east-1.amazonaws.com";
const INVOKE: Duration = Duration::from_secs(30);

struct World {
    rt: tokio::runtime::Runtime,
    moto: MotoServer,
    balena: FakeBalena,
    iot: aws_sdk_iot::Client,
    ca_pem: String,
    ca_id: String,
    key_uri: String,
    service: u64,
    _dir: tempfile::TempDir,
}

/// moto for IoT, KMS and DynamoDB; a CA whose key is in moto's KMS, registered in moto's IoT;
/// the attempts table; a balena fleet with the cloud-relay service.
fn world() -> World {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let moto = MotoServer::start().unwrap();
    // The KMS backend reads the standard AWS chain, as the Lambda does: the tests of this
    // file, each with its own moto, set it one at a time.
    static ENV: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let guard = ENV
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    for (name, value) in moto.aws_env() {
        std::env::set_var(name, value);
    }
    let key = ca_keys::create(
        &"awskms:key-id=alias/jitr-provisioner-ca;region=us-east-1"
            .parse()
            .unwrap(),
        KeyAlgorithm::P256,
        &ca_keys::Options::default(),
    )
    .unwrap();
    drop(guard);
    let key_uri = key.uri();
    let dir = tempfile::tempdir().unwrap();
    let ca_dir = dir.path().join("ca");
    CaInit {
        dir: ca_dir.clone(),
        root_subject: Subject::common_name("jitr provisioner test CA"),
        root_key: KeyAlgorithm::P256,
        root_days: 3650,
        issuing: None,
        protection: KeyProtection::InsecurePlaintext,
        remote_key: Some(Arc::clone(&key)),
        root_protection: None,
    }
    .run(time::OffsetDateTime::now_utc())
    .unwrap();
    let ca_pem = std::fs::read_to_string(ca_dir.join("ca.crt")).unwrap();
    let sdk = rt.block_on(testkit::iot::sdk_config(&moto));
    let iot = aws_sdk_iot::Client::new(&sdk);
    let ca_id = rt.block_on(async {
        testkit::iot::create_policy(&iot, POLICY).await.unwrap();
        testkit::iot::register_ca(&iot, &ca_pem).await.unwrap()
    });
    let dynamodb = aws_sdk_dynamodb::Client::new(&sdk);
    rt.block_on(testkit::dynamodb::create_table(
        &dynamodb,
        TABLE,
        "device_id",
    ))
    .unwrap();
    let balena = FakeBalena::start(KEY).unwrap();
    balena.add_fleet(FLEET, "acme/sensors");
    let service = balena.add_service(FLEET, SERVICE);
    World {
        rt,
        moto,
        balena,
        iot,
        ca_pem,
        ca_id,
        key_uri,
        service,
        _dir: dir,
    }
}

impl World {
    fn env(&self, emulator: &RuntimeEmulator) -> Vec<(&'static str, String)> {
        let mut env = emulator.lambda_env();
        env.extend(self.moto.aws_env());
        env.extend([
            ("JITR_CA_CERTIFICATE_ID", self.ca_id.clone()),
            ("JITR_CA_KEY_URI", self.key_uri.clone()),
            ("JITR_POLICY_NAME", POLICY.to_owned()),
            ("JITR_PROVISION_TABLE", TABLE.to_owned()),
            ("JITR_DATA_ENDPOINT", ENDPOINT.to_owned()),
            ("BALENA_FLEET_ID", FLEET.to_string()),
            ("BALENA_API_KEY", KEY.to_owned()),
            ("BALENA_API_URL", self.balena.url()),
            ("AWS_MAX_ATTEMPTS", "1".to_owned()),
        ]);
        env
    }

    /// A device of the fleet running the cloud-relay service.
    fn member(&self, n: u32) -> (String, u64) {
        let uuid = format!("{n:032x}");
        let id = self.balena.add_device(FLEET, &uuid, true);
        self.balena.install(id, self.service);
        (uuid, id)
    }

    fn certificates(&self) -> Vec<(String, CertificateStatus)> {
        self.rt.block_on(async {
            let out = self.iot.list_certificates().send().await.unwrap();
            out.certificates()
                .iter()
                .map(|c| {
                    (
                        c.certificate_id().unwrap().to_owned(),
                        c.status().unwrap().clone(),
                    )
                })
                .collect()
        })
    }

    fn things(&self) -> Vec<String> {
        self.rt.block_on(async {
            let out = self.iot.list_things().send().await.unwrap();
            out.things()
                .iter()
                .filter_map(|t| t.thing_name().map(str::to_owned))
                .collect()
        })
    }

    fn principals(&self, thing: &str) -> Vec<String> {
        self.rt.block_on(async {
            let out = self
                .iot
                .list_thing_principals()
                .thing_name(thing)
                .send()
                .await
                .unwrap();
            out.principals().to_vec()
        })
    }
}

/// The real `provisioner` binary with exactly `env`.
fn spawn(env: &[(&str, String)]) -> FunctionProcess {
    FunctionProcess::spawn(env!("CARGO_BIN_EXE_provisioner"), env).unwrap()
}

/// A function URL event (payload format 2.0) as AWS builds it for cloud-relay's POST.
fn url_event(method: &str, body: &str) -> Value {
    json!({
        "version": "2.0",
        "routeKey": "$default",
        "rawPath": "/",
        "rawQueryString": "",
        "headers": {"content-type": "application/json", "host": "abc.lambda-url.us-east-1.on.aws"},
        "requestContext": {
            "accountId": "anonymous",
            "apiId": "abc",
            "domainName": "abc.lambda-url.us-east-1.on.aws",
            "http": {"method": method, "path": "/", "protocol": "HTTP/1.1", "sourceIp": "192.0.2.10", "userAgent": "node"},
            "requestId": "c6af9ac6-7b61-11e6-9a41-93e8deadbeef",
            "routeKey": "$default",
            "stage": "$default",
            "time": "30/Nov/2026:18:00:00 +0000",
            "timeEpoch": 1_796_061_600_000_i64
        },
        "body": body,
        "isBase64Encoded": false
    })
}

fn provision_body(uuid: &str) -> String {
    json!({"uuid": uuid, "balena_service": SERVICE}).to_string()
}

fn response(invocation: Invocation) -> Value {
    match invocation {
        Invocation::Response(v) => v,
        Invocation::Error {
            error_type,
            error_message,
        } => panic!("{error_type}: {error_message}"),
    }
}

fn b64(text: &str) -> String {
    String::from_utf8(
        base64::engine::general_purpose::STANDARD
            .decode(text)
            .unwrap(),
    )
    .unwrap()
}

#[test]
fn cloud_relays_provisioning_request_is_answered_safely() {
    let w = world();
    let emulator = RuntimeEmulator::start().unwrap();
    let provisioner = spawn(&w.env(&emulator));
    let post = |uuid: &str| {
        response(
            emulator
                .invoke(url_event("POST", &provision_body(uuid)), INVOKE)
                .unwrap(),
        )
    };

    // A member: 201, the certificate ACTIVE on its Thing, the variables on its service.
    let (member, member_id) = w.member(1);
    let r = post(&member);
    assert_eq!(r["statusCode"], 201, "{r}");
    let body: Value = serde_json::from_str(r["body"].as_str().unwrap()).unwrap();
    let certificate_id = body["certificateId"].as_str().unwrap().to_owned();
    assert_eq!(
        body,
        json!({"thingName": member, "certificateId": certificate_id})
    );
    assert!(
        !r.to_string().contains("PRIVATE KEY"),
        "no key material in the answer"
    );
    assert_eq!(
        w.certificates(),
        vec![(certificate_id.clone(), CertificateStatus::Active)]
    );
    assert_eq!(w.things(), vec![member.clone()]);
    assert_eq!(w.principals(&member).len(), 1);
    let vars = w.balena.service_vars(member_id);
    let names: Vec<&str> = vars.iter().map(|(_, n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "AWS_CERT",
            "AWS_PRIVATE_KEY",
            "AWS_DATA_ENDPOINT",
            "CLOUD_CONSUMER_TOPIC"
        ]
    );
    assert!(vars.iter().all(|(service, _, _)| service == SERVICE));
    assert!(
        w.balena.env_vars(member_id).is_empty(),
        "nothing device-wide"
    );
    let value = |name: &str| vars.iter().find(|(_, n, _)| n == name).unwrap().2.clone();
    let chain = b64(&value("AWS_CERT"));
    assert_eq!(
        testkit::certs::certificate_id_of(&chain).unwrap(),
        certificate_id,
        "AWS_CERT starts with the activated certificate"
    );
    assert!(chain.ends_with(&w.ca_pem), "and carries the CA after it");
    assert!(b64(&value("AWS_PRIVATE_KEY")).contains("BEGIN PRIVATE KEY"));
    assert_eq!(value("AWS_DATA_ENDPOINT"), ENDPOINT);
    assert_eq!(
        value("CLOUD_CONSUMER_TOPIC"),
        format!("balena/{member}/sensors")
    );
    // The certificate is the CA's, signed in KMS: the issuer verifies it.
    let ca_der = factory_ca::certificates_from_pem_or_der(w.ca_pem.as_bytes()).unwrap();
    let (_, ca) = X509Certificate::from_der(&ca_der[0]).unwrap();
    let der = factory_ca::certificates_from_pem_or_der(chain.as_bytes()).unwrap();
    let (_, cert) = X509Certificate::from_der(&der[0]).unwrap();
    cert.verify_signature(Some(ca.public_key())).unwrap();

    // Asked again at once: 409 `thing already exists`, before any rate limit.
    let r = post(&member);
    assert_eq!(r["statusCode"], 409);
    assert_eq!(r["body"], "thing already exists");

    // A stranger (a UUID the fleet does not hold): 403, nothing created anywhere.
    let stranger = format!("{:032x}", 0xdead_u32);
    let r = post(&stranger);
    assert_eq!(r["statusCode"], 403);
    assert_eq!(
        r["body"], r#"{"error":"forbidden"}"#,
        "nothing that helps enumeration"
    );
    // An inactive member is refused the same way.
    let (inactive, inactive_id) = w.member(2);
    w.balena.set_device_active(inactive_id, false);
    assert_eq!(post(&inactive)["statusCode"], 403);
    assert_eq!(w.certificates().len(), 1);
    assert_eq!(w.things(), vec![member.clone()]);

    // Malformed: 400 with the reason, before any call.
    for (method, body, reason) in [
        ("POST", "{not json".to_owned(), "not JSON"),
        (
            "POST",
            json!({"uuid": "x", "balena_service": SERVICE}).to_string(),
            "uuid",
        ),
        (
            "POST",
            json!({"uuid": member}).to_string(),
            "balena_service",
        ),
        (
            "POST",
            format!("{{\"pad\":\"{}\"}}", "x".repeat(5000)),
            "4096",
        ),
    ] {
        let r = response(emulator.invoke(url_event(method, &body), INVOKE).unwrap());
        assert_eq!(r["statusCode"], 400, "{body:.60}");
        assert!(r["body"].as_str().unwrap().contains(reason), "{r}");
    }

    // balena refuses the variables: 503, the certificate revoked, nothing attached, nothing
    // left on the device.
    let (unlucky, unlucky_id) = w.member(3);
    w.balena.add_env_var(unlucky_id, "RELAY_MODE", "1");
    w.balena.set_fault(Fault::WriteStatus(503));
    let r = post(&unlucky);
    w.balena.set_fault(Fault::None);
    assert_eq!(r["statusCode"], 503, "{r}");
    let certificates = w.certificates();
    assert_eq!(certificates.len(), 2);
    assert!(certificates
        .iter()
        .any(|(id, status)| id != &certificate_id && *status == CertificateStatus::Revoked));
    assert!(!w.things().contains(&unlucky), "no Thing for it");
    assert!(w.balena.service_vars(unlucky_id).is_empty());
    assert_eq!(
        w.balena.env_vars(unlucky_id),
        vec![("RELAY_MODE".to_owned(), "1".to_owned())]
    );
    // Its retry within the interval: 429 with Retry-After, nothing new.
    let r = post(&unlucky);
    assert_eq!(r["statusCode"], 429, "{r}");
    let retry_after: u64 = r["headers"]["retry-after"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=600).contains(&retry_after), "{retry_after}");
    assert_eq!(w.certificates().len(), 2);

    // Half-way: AWS_CERT written, AWS_PRIVATE_KEY refused. Undone: the certificate revoked, the
    // variable this request wrote removed, the owner's own variable kept.
    let (halfway, halfway_id) = w.member(4);
    w.balena.add_env_var(halfway_id, "RELAY_MODE", "1");
    w.balena
        .set_fault(Fault::PostStatusAfter { ok: 1, status: 503 });
    let r = post(&halfway);
    w.balena.set_fault(Fault::None);
    assert_eq!(r["statusCode"], 503, "{r}");
    assert!(
        w.balena.service_vars(halfway_id).is_empty(),
        "AWS_CERT removed again"
    );
    assert_eq!(
        w.balena.env_vars(halfway_id),
        vec![("RELAY_MODE".to_owned(), "1".to_owned())]
    );
    assert_eq!(
        w.certificates()
            .iter()
            .filter(|(_, s)| *s == CertificateStatus::Revoked)
            .count(),
        2
    );

    // Credentials delivered another way (the factory's --push-balena, device-wide): 409, and
    // nothing of them touched.
    let (factory, factory_id) = w.member(5);
    w.balena.add_env_var(factory_id, "AWS_CERT", "ZmFjdG9yeQ==");
    let r = post(&factory);
    assert_eq!(r["statusCode"], 409, "{r}");
    assert_eq!(r["body"], "thing already exists");
    assert_eq!(
        w.balena.env_vars(factory_id),
        vec![("AWS_CERT".to_owned(), "ZmFjdG9yeQ==".to_owned())]
    );

    // A service the provisioner does not serve, or one the device does not run: 403, nothing
    // made, the attempt not spent.
    let (other_service, _) = w.member(6);
    let r = response(
        emulator
            .invoke(
                url_event(
                    "POST",
                    &json!({"uuid": other_service, "balena_service": "main"}).to_string(),
                ),
                INVOKE,
            )
            .unwrap(),
    );
    assert_eq!(r["statusCode"], 403, "{r}");
    let not_running = format!("{:032x}", 7);
    w.balena.add_device(FLEET, &not_running, true);
    assert_eq!(post(&not_running)["statusCode"], 403);
    assert_eq!(w.certificates().len(), 3);
    assert_eq!(
        post(&other_service)["statusCode"],
        201,
        "the device can still be provisioned"
    );

    // One line per request; no key, certificate or API key in the log.
    let log = provisioner.log();
    let lines: Vec<Value> = log
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["message"] == "provision")
        .collect();
    assert_eq!(lines.len(), 15, "{log}");
    assert_eq!(lines[0]["status"], 201);
    assert_eq!(lines[0]["device_id"], member.as_str());
    for secret in [KEY, "PRIVATE KEY", "BEGIN CERTIFICATE"] {
        assert!(!log.contains(secret), "{secret} in the log");
    }
    drop(provisioner);
}

#[test]
fn the_hook_allows_only_fleet_members_in_time_and_the_provider_signs_with_the_kms_ca() {
    let w = world();
    let emulator = RuntimeEmulator::start().unwrap();
    let _provisioner = spawn(&w.env(&emulator));
    let hook = |uuid: &str, pem: &str| {
        json!({
            "claimCertificateId": "1".repeat(64),
            "certificateId": "2".repeat(64),
            "certificatePem": pem,
            "templateArn": "arn:aws:iot:us-east-1:123456789012:provisioningtemplate/jitr",
            "clientId": "claim-client",
            "parameters": {"DeviceUuid": uuid, "SerialNumber": "s-1"}
        })
    };
    let (member, _) = w.member(10);
    let (inactive, inactive_id) = w.member(11);
    w.balena.set_device_active(inactive_id, false);
    let stranger = format!("{:032x}", 12);

    // The certificate provider signs a member's CSR with the CA in KMS.
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, member.as_str());
    let csr = params.serialize_request(&key).unwrap().pem().unwrap();
    let r = response(
        emulator
            .invoke(
                json!({"certificateSigningRequest": csr, "principalId": "3".repeat(64), "clientId": "claim-client"}),
                INVOKE,
            )
            .unwrap(),
    );
    let pem = r["certificatePem"].as_str().unwrap().to_owned();
    let der = factory_ca::certificates_from_pem_or_der(pem.as_bytes()).unwrap();
    let (_, cert) = X509Certificate::from_der(&der[0]).unwrap();
    let ca_der = factory_ca::certificates_from_pem_or_der(w.ca_pem.as_bytes()).unwrap();
    let (_, ca) = X509Certificate::from_der(&ca_der[0]).unwrap();
    cert.verify_signature(Some(ca.public_key())).unwrap();
    assert_eq!(
        cert.subject()
            .iter_common_name()
            .next()
            .unwrap()
            .as_str()
            .unwrap(),
        member
    );
    // A CSR that is not one is refused, as a permanent error.
    match emulator
        .invoke(json!({"certificateSigningRequest": "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n"}), INVOKE)
        .unwrap()
    {
        Invocation::Error { error_type, .. } => assert_eq!(error_type, "MalformedEvent"),
        other => panic!("{other:?}"),
    }

    // The hook: a member whose certificate our CA signed for it is allowed; the rest are not.
    let allowed = |event: Value| {
        response(emulator.invoke(event, INVOKE).unwrap())["allowProvisioning"]
            .as_bool()
            .unwrap()
    };
    let signed = |uuid: &str| {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = rcgen::CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, uuid);
        let csr = params.serialize_request(&key).unwrap().pem().unwrap();
        let r = response(
            emulator
                .invoke(json!({"certificateSigningRequest": csr}), INVOKE)
                .unwrap(),
        );
        r["certificatePem"].as_str().unwrap().to_owned()
    };
    assert!(allowed(hook(&member, &pem)));
    assert!(!allowed(hook(&member, "")), "no certificate");
    let foreign = testkit::certs::TestCa::new("another CA").unwrap();
    assert!(
        !allowed(hook(&member, &foreign.device_pem(&member).unwrap())),
        "a certificate our CA did not sign"
    );
    assert!(!allowed(hook(&stranger, &signed(&stranger))));
    assert!(!allowed(hook(&inactive, &signed(&inactive))));
    assert!(!allowed(hook("not-a-uuid", &pem)));
    let (other, _) = w.member(13);
    assert!(
        !allowed(hook(&other, &pem)),
        "a certificate naming another device"
    );
    assert!(allowed(hook(&other, &signed(&other))));
    // A device that has an ACTIVE certificate is not provisioned again.
    let r = response(
        emulator
            .invoke(url_event("POST", &provision_body(&other)), INVOKE)
            .unwrap(),
    );
    assert_eq!(r["statusCode"], 201, "{r}");
    assert!(!allowed(hook(&other, &signed(&other))));

    // balena hanging: refused within the hook's budget, well inside AWS's 5 s.
    let (slow, _) = w.member(14);
    let slow_pem = signed(&slow);
    w.balena.set_fault(Fault::Delay(Duration::from_secs(20)));
    let started = Instant::now();
    assert!(!allowed(hook(&slow, &slow_pem)));
    let took = started.elapsed();
    w.balena.set_fault(Fault::None);
    assert!(took < Duration::from_secs(4), "answered in {took:?}");
    assert!(
        allowed(hook(&slow, &slow_pem)),
        "allowed once balena answers"
    );
}

#[test]
fn a_bad_configuration_fails_the_cold_start_naming_the_variable() {
    let w = world();
    let emulator = RuntimeEmulator::start().unwrap();
    for (var, value, expected) in [
        (
            "JITR_CA_KEY_URI",
            Some("/var/task/ca.key"),
            "JITR_CA_KEY_URI is invalid",
        ),
        (
            "JITR_PROVISION_TABLE",
            None,
            "JITR_PROVISION_TABLE is not set",
        ),
        (
            "JITR_CA_CERTIFICATE_ID",
            Some(&"f".repeat(64)),
            "JITR_CA_CERTIFICATE_ID",
        ),
    ] {
        let env: Vec<_> = w
            .env(&emulator)
            .into_iter()
            .filter(|(k, _)| *k != var)
            .chain(value.map(|v| (var, v.to_owned())))
            .collect();
        let mut provisioner = spawn(&env);
        let status = provisioner.child.wait().unwrap();
        assert!(!status.success(), "{var}");
        let mut stderr = String::new();
        std::io::Read::read_to_string(provisioner.child.stderr.as_mut().unwrap(), &mut stderr)
            .unwrap();
        assert!(stderr.contains(expected), "{var}: {stderr}");
    }
    assert_eq!(emulator.polls(), 0, "never asked for an event");
}
