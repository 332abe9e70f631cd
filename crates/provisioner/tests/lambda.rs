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
    key: Arc<dyn factory_ca::RemoteKey>,
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
        key,
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

    /// Sets (or, with `None`, removes) a Thing attribute directly in AWS IoT, creating the
    /// Thing if need be: what `jitr revoke` and `jitr approve --device` do to the mark.
    fn set_thing_attribute(&self, thing: &str, name: &str, value: Option<&str>) {
        let exists = self.things().iter().any(|t| t == thing);
        self.rt.block_on(async {
            if !exists {
                self.iot
                    .create_thing()
                    .thing_name(thing)
                    .send()
                    .await
                    .unwrap();
            }
            let payload = aws_sdk_iot::types::AttributePayload::builder()
                .attributes(name, value.unwrap_or_default())
                .merge(true)
                .build();
            self.iot
                .update_thing()
                .thing_name(thing)
                .attribute_payload(payload)
                .send()
                .await
                .unwrap();
        });
    }

    /// A device certificate for `uuid` signed by the CA in KMS, made here (not through the
    /// provider, which refuses strangers).
    fn ca_signed(&self, uuid: &str) -> String {
        let ca = factory_ca::Ca::from_certificate(
            &self.ca_pem,
            Arc::clone(&self.key),
            factory_ca::Profile::default(),
        )
        .unwrap();
        let id = factory_ca::DeviceId::parse(uuid, factory_ca::IdFormat::BalenaUuid).unwrap();
        ca.issue_device(&id, KeyAlgorithm::P256, 30, time::OffsetDateTime::now_utc())
            .unwrap()
            .cert_pem
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

/// The exit status and standard error of a provisioner that must stop at its cold start,
/// within 20 s (else the test fails, and the process is killed as it is dropped).
fn exit_of(mut provisioner: FunctionProcess) -> (std::process::ExitStatus, String) {
    let started = Instant::now();
    let status = loop {
        if let Some(status) = provisioner.child.try_wait().unwrap() {
            break status;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the provisioner did not stop at its cold start"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(provisioner.child.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    (status, stderr)
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
    assert!(!allowed(hook(&stranger, &w.ca_signed(&stranger))));
    assert!(!allowed(hook(&inactive, &w.ca_signed(&inactive))));
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
    assert!(!allowed(hook(&other, &w.ca_signed(&other))));

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
        let (status, stderr) = exit_of(spawn(&env));
        assert!(!status.success(), "{var}");
        assert!(stderr.contains(expected), "{var}: {stderr}");
    }
    assert_eq!(emulator.polls(), 0, "never asked for an event");
}

const TOKEN: &str = "3f0c9e1d2b7a48c6a5e4d3c2b1a09f8e7d6c5b4a39281706f5e4d3c2b1a09f8e";

/// `url_event` at `path`?`query`, as a function URL hands over `PROVISION_URL` with its token.
fn url_event_at(path: &str, query: &str, method: &str, body: &str) -> Value {
    let mut event = url_event(method, body);
    event["rawPath"] = path.into();
    event["rawQueryString"] = query.into();
    event["requestContext"]["http"]["path"] = path.into();
    event
}

/// A CSR naming `uuid`, PEM.
fn csr(uuid: &str) -> String {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, uuid);
    params.serialize_request(&key).unwrap().pem().unwrap()
}

#[test]
fn without_the_token_every_caller_gets_the_one_403_and_nothing_happens() {
    let w = world();
    let emulator = RuntimeEmulator::start().unwrap();
    let mut env = w.env(&emulator);
    env.push(("JITR_PROVISION_TOKEN", TOKEN.to_owned()));
    let provisioner = spawn(&env);
    let invoke = |event: Value| response(emulator.invoke(event, INVOKE).unwrap());

    // Every kind of device the provisioner tells apart once the token is presented.
    let (fresh, fresh_id) = w.member(1); // would be 201
    let (provisioned, _) = w.member(2); // will have an ACTIVE certificate: 409
    let (inactive, inactive_id) = w.member(3);
    w.balena.set_device_active(inactive_id, false);
    let (revoked, _) = w.member(4);
    w.set_thing_attribute(
        &revoked,
        activator::ownership::REVOKED_ATTRIBUTE,
        Some("2026-11-30T18:00:00Z"),
    );
    let (failed, failed_id) = w.member(5); // a failed attempt within the interval: 429
    let stranger = format!("{:032x}", 0xdead_u32);
    let with_token = |uuid: &str| {
        invoke(url_event_at(
            &format!("/{TOKEN}"),
            "",
            "POST",
            &provision_body(uuid),
        ))
    };
    assert_eq!(with_token(&provisioned)["statusCode"], 201);
    w.balena.set_fault(Fault::WriteStatus(503));
    assert_eq!(with_token(&failed)["statusCode"], 503);
    w.balena.set_fault(Fault::None);
    let certificates = w.certificates();
    let things = w.things();
    let requests_before = w.balena.requests().len();

    // Without the token, with a wrong one, or one a character short, in the path or the
    // query: one answer, whatever the UUID, the body or the method, asked over and over.
    let near = &TOKEN[..TOKEN.len() - 1];
    let urls = [
        ("/".to_owned(), String::new()),
        (format!("/{near}"), String::new()),
        ("/".to_owned(), format!("token={near}")),
        ("/".to_owned(), format!("secret={TOKEN}")),
        (format!("/{}", TOKEN.to_uppercase()), String::new()),
    ];
    let mut answers = Vec::new();
    for (path, query) in &urls {
        for uuid in [
            &fresh,
            &provisioned,
            &inactive,
            &revoked,
            &failed,
            &stranger,
        ] {
            for _ in 0..2 {
                answers.push(invoke(url_event_at(
                    path,
                    query,
                    "POST",
                    &provision_body(uuid),
                )));
            }
        }
        answers.push(invoke(url_event_at(path, query, "POST", "{not json")));
        answers.push(invoke(url_event_at(path, query, "GET", "")));
    }
    let first = answers[0].clone();
    assert_eq!(first["statusCode"], 403, "{first}");
    assert_eq!(first["body"], r#"{"error":"forbidden"}"#);
    for answer in &answers {
        assert_eq!(answer, &first, "every answer before the token is the same");
    }
    assert_eq!(w.certificates(), certificates, "nothing made");
    assert_eq!(w.things(), things);
    assert!(w.balena.service_vars(fresh_id).is_empty());
    assert_eq!(
        w.balena.requests().len(),
        requests_before,
        "balena not even asked"
    );

    // With the token, as a path segment or `?token=`: the answers differ again, and the
    // refusals of the device itself are still the one 403.
    let r = invoke(url_event_at(
        "/",
        &format!("token={TOKEN}"),
        "POST",
        &provision_body(&fresh),
    ));
    assert_eq!(r["statusCode"], 201, "{r}");
    assert_eq!(w.balena.service_vars(fresh_id).len(), 4);
    assert_eq!(with_token(&provisioned)["statusCode"], 409);
    assert_eq!(with_token(&failed)["statusCode"], 429);
    for uuid in [&inactive, &revoked, &stranger] {
        let r = with_token(uuid);
        assert_eq!(
            (&r["statusCode"], &r["body"], &r["headers"]),
            (&first["statusCode"], &first["body"], &first["headers"]),
            "{uuid}"
        );
    }
    assert_eq!(
        with_token("nope")["statusCode"],
        400,
        "malformed, once authorised"
    );
    assert!(w.balena.service_vars(failed_id).is_empty());

    // The token never reaches the log.
    let log = provisioner.log();
    assert!(
        !log.contains(TOKEN) && !log.contains(near),
        "the token in the log"
    );
    let refused = log
        .lines()
        .filter(|l| l.contains("no or wrong provisioning token"))
        .count();
    assert_eq!(refused, answers.len(), "one line per refusal");
}

#[test]
fn the_token_can_come_from_secrets_manager_and_a_bad_one_fails_the_start() {
    let w = world();
    let emulator = RuntimeEmulator::start().unwrap();
    let sdk = w.rt.block_on(testkit::iot::sdk_config(&w.moto));
    let secrets = aws_sdk_secretsmanager::Client::new(&sdk);
    w.rt.block_on(async {
        for (name, value) in [
            ("jitr/provision-token", format!("{TOKEN}\n")),
            ("jitr/short", "abc".to_owned()),
        ] {
            secrets
                .create_secret()
                .name(name)
                .secret_string(value)
                .send()
                .await
                .unwrap();
        }
    });
    let with_secret = |id: &str| {
        let mut env = w.env(&emulator);
        env.push(("JITR_PROVISION_TOKEN_SECRET_ID", id.to_owned()));
        env
    };
    // A secret that is no token, or no secret at all: the cold start fails, naming the variable.
    for (id, expected) in [
        ("jitr/short", "at least 32"),
        ("jitr/missing", "ResourceNotFound"),
    ] {
        let (status, stderr) = exit_of(spawn(&with_secret(id)));
        assert!(!status.success(), "{id}");
        assert!(
            stderr.contains("JITR_PROVISION_TOKEN_SECRET_ID"),
            "{stderr}"
        );
        assert!(stderr.contains(expected), "{id}: {stderr}");
        assert!(!stderr.contains("abc"), "the value is not echoed: {stderr}");
    }
    let _provisioner = spawn(&with_secret("jitr/provision-token"));
    let (member, _) = w.member(1);
    let post = |path: &str| {
        response(
            emulator
                .invoke(
                    url_event_at(path, "", "POST", &provision_body(&member)),
                    INVOKE,
                )
                .unwrap(),
        )
    };
    assert_eq!(post("/")["statusCode"], 403);
    assert_eq!(post(&format!("/{TOKEN}"))["statusCode"], 201);
}

#[test]
fn an_undo_that_fails_is_recorded_and_finished_by_the_next_request() {
    let w = world();
    let emulator = RuntimeEmulator::start().unwrap();
    let mut env = w.env(&emulator);
    env.push(("JITR_PROVISION_INTERVAL", "1s".to_owned()));
    let provisioner = spawn(&env);
    let post = |uuid: &str| {
        response(
            emulator
                .invoke(url_event("POST", &provision_body(uuid)), INVOKE)
                .unwrap(),
        )
    };
    let (member, member_id) = w.member(1);

    // AWS_CERT written, AWS_PRIVATE_KEY refused, and balena refuses the undo's removal too: the
    // certificate is revoked, but a revoked AWS_CERT is left on the service.
    w.balena
        .set_fault(Fault::WritesFailAfter { ok: 1, status: 503 });
    let r = post(&member);
    assert_eq!(r["statusCode"], 503, "{r}");
    let first = w.certificates();
    assert_eq!(first.len(), 1);
    assert_eq!(first[0].1, CertificateStatus::Revoked);
    let left: Vec<String> = w
        .balena
        .service_vars(member_id)
        .into_iter()
        .map(|(_, n, _)| n)
        .collect();
    assert_eq!(left, ["AWS_CERT"], "the undo could not remove it");

    // The record outlives the container: a new one, balena still refusing writes, finishes
    // nothing, makes nothing, and says so with a 503 (not "thing already exists").
    drop(provisioner);
    let provisioner = spawn(&env);
    std::thread::sleep(Duration::from_millis(1100));
    let r = post(&member);
    assert_eq!(r["statusCode"], 503, "{r}");
    assert!(
        r["body"].as_str().unwrap().contains("still being undone"),
        "{r}"
    );
    assert_eq!(
        w.certificates(),
        first,
        "nothing new made while the undo is unfinished"
    );

    // Once balena writes again, the next request finishes the undo first, then provisions.
    w.balena.set_fault(Fault::None);
    std::thread::sleep(Duration::from_millis(1100));
    let r = post(&member);
    assert_eq!(r["statusCode"], 201, "the device is not stuck: {r}");
    let body: Value = serde_json::from_str(r["body"].as_str().unwrap()).unwrap();
    let new_id = body["certificateId"].as_str().unwrap();
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
    let cert = b64(&vars[0].2);
    assert_eq!(
        testkit::certs::certificate_id_of(&cert).unwrap(),
        new_id,
        "the new certificate, not the revoked one"
    );
    let statuses = w.certificates();
    assert_eq!(statuses.len(), 2);
    assert!(statuses.contains(&(new_id.to_owned(), CertificateStatus::Active)));
    assert!(statuses.contains(&first[0]));
    assert_eq!(w.principals(&member).len(), 1, "only the new one attached");
    // And the record is gone: the next request is the ordinary "provisioned already".
    let r = post(&member);
    assert_eq!(r["statusCode"], 409, "{r}");
    assert_eq!(r["body"], "thing already exists");
    let log = provisioner.log();
    assert!(
        log.contains("finished the undo an earlier attempt left"),
        "{log}"
    );
}

#[test]
fn a_device_revoked_for_good_gets_nothing_until_the_mark_is_cleared() {
    let w = world();
    let emulator = RuntimeEmulator::start().unwrap();
    let _provisioner = spawn(&w.env(&emulator));
    let invoke = |event: Value| emulator.invoke(event, INVOKE).unwrap();
    let post = |uuid: &str| response(invoke(url_event("POST", &provision_body(uuid))));
    let stranger = format!("{:032x}", 0xdead_u32);
    let refused_stranger = post(&stranger);
    assert_eq!(refused_stranger["statusCode"], 403);

    // `jitr revoke --id` left the mark on the Thing (set here directly, as it does).
    let (member, member_id) = w.member(1);
    w.set_thing_attribute(
        &member,
        activator::ownership::REVOKED_ATTRIBUTE,
        Some("2026-11-30T18:00:00Z"),
    );
    for _ in 0..2 {
        let r = post(&member);
        assert_eq!(r, refused_stranger, "the same 403 a stranger gets");
    }
    assert!(w.certificates().is_empty(), "nothing issued");
    assert!(
        w.balena.service_vars(member_id).is_empty(),
        "nothing delivered"
    );
    // Fleet provisioning: the certificate provider does not sign for it, the hook refuses it.
    match invoke(json!({"certificateSigningRequest": csr(&member)})) {
        Invocation::Error {
            error_type,
            error_message,
        } => {
            assert_eq!(error_type, "MalformedEvent");
            assert!(error_message.contains("jitr-revoked"), "{error_message}");
        }
        other => panic!("signed for a revoked device: {other:?}"),
    }
    let hook = json!({
        "claimCertificateId": "1".repeat(64),
        "certificateId": "2".repeat(64),
        "certificatePem": w.ca_signed(&member),
        "templateArn": "arn:aws:iot:us-east-1:123456789012:provisioningtemplate/jitr",
        "clientId": "claim-client",
        "parameters": {"DeviceUuid": member}
    });
    assert_eq!(response(invoke(hook.clone()))["allowProvisioning"], false);

    // `jitr approve --device` clears the mark: provisioned again, the attempt not spent.
    w.set_thing_attribute(&member, activator::ownership::REVOKED_ATTRIBUTE, None);
    assert_eq!(response(invoke(hook))["allowProvisioning"], true);
    let r = post(&member);
    assert_eq!(r["statusCode"], 201, "{r}");
}

#[test]
fn the_certificate_provider_signs_only_for_a_member_without_a_live_certificate() {
    let w = world();
    let emulator = RuntimeEmulator::start().unwrap();
    let _provisioner = spawn(&w.env(&emulator));
    let provide = |csr: String| {
        emulator
            .invoke(
                json!({"certificateSigningRequest": csr, "principalId": "3".repeat(64), "clientId": "anyone"}),
                INVOKE,
            )
            .unwrap()
    };
    let refused = |uuid: &str, why: &str| match provide(csr(uuid)) {
        Invocation::Error {
            error_type,
            error_message,
        } => {
            assert_eq!(error_type, "MalformedEvent", "{uuid}: {error_message}");
            assert!(error_message.contains(why), "{uuid}: {error_message}");
        }
        Invocation::Response(r) => panic!("{uuid}: signed: {r}"),
    };
    let (member, _) = w.member(1);
    let (inactive, inactive_id) = w.member(2);
    w.balena.set_device_active(inactive_id, false);
    let stranger = format!("{:032x}", 0xdead_u32);
    refused(&stranger, "not in the fleet");
    refused(&inactive, "inactive");
    refused("not-a-device-uuid", "not a device id");

    // A member that already has a live certificate (ACTIVE, or PENDING_ACTIVATION attached):
    // refused, so `CreateCertificateFromCsr --set-as-active` cannot add a second identity.
    let (provisioned, _) = w.member(3);
    let r = response(
        emulator
            .invoke(url_event("POST", &provision_body(&provisioned)), INVOKE)
            .unwrap(),
    );
    assert_eq!(r["statusCode"], 201, "{r}");
    refused(&provisioned, "ACTIVE or pending certificate already");
    let (pending, _) = w.member(4);
    w.rt.block_on(async {
        let out = w
            .iot
            .register_certificate()
            .certificate_pem(w.ca_signed(&pending))
            .ca_certificate_pem(&w.ca_pem)
            .status(CertificateStatus::PendingActivation)
            .send()
            .await
            .unwrap();
        w.iot
            .create_thing()
            .thing_name(&pending)
            .send()
            .await
            .unwrap();
        w.iot
            .attach_thing_principal()
            .thing_name(&pending)
            .principal(out.certificate_arn().unwrap())
            .send()
            .await
            .unwrap();
    });
    refused(&pending, "ACTIVE or pending certificate already");

    // balena unreachable: a retryable error, nothing signed.
    w.balena.set_fault(Fault::Status(503));
    match provide(csr(&member)) {
        Invocation::Error { error_type, .. } => assert_eq!(error_type, "Retryable"),
        other => panic!("{other:?}"),
    }
    w.balena.set_fault(Fault::None);

    // An active member with no certificate: signed.
    let r = response(provide(csr(&member)));
    let pem = r["certificatePem"].as_str().unwrap();
    let der = factory_ca::certificates_from_pem_or_der(pem.as_bytes()).unwrap();
    let (_, cert) = X509Certificate::from_der(&der[0]).unwrap();
    assert_eq!(
        cert.subject()
            .iter_common_name()
            .next()
            .unwrap()
            .as_str()
            .unwrap(),
        member
    );
}
