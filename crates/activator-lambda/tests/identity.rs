//! One device, one identity, through the real `bootstrap` against moto and the fake balena
//! API: each way a certificate could be activated by mistake, tried as an adversary or an
//! operator on a bad day would, must end with nothing activated that should not be.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test setup: a panic is the report

mod common;

use std::time::Duration;

use aws_sdk_iot::types::{CaCertificateStatus, CertificateStatus};
use common::{response, spawn_bootstrap, world, World, INVOKE};
use serde_json::Value;
use testkit::balena::Fault;
use testkit::certs::device_params;
use testkit::lambda::{Invocation, RuntimeEmulator};

fn uuid(n: u32) -> String {
    format!("{n:032x}")
}

/// The error an invocation ended with, or a panic naming the answer it gave instead.
fn error(invocation: Invocation) -> (String, String) {
    match invocation {
        Invocation::Error {
            error_type,
            error_message,
        } => (error_type, error_message),
        Invocation::Response(v) => panic!("expected an error, got {v}"),
    }
}

fn outcome(v: &Value) -> &str {
    v["outcome"].as_str().unwrap()
}

impl World {
    /// The certificates attached to a Thing.
    fn principals(&self, thing: &str) -> Vec<String> {
        self.rt.block_on(async {
            match self
                .client
                .list_thing_principals()
                .thing_name(thing)
                .send()
                .await
            {
                Ok(out) => out
                    .principals()
                    .iter()
                    .map(|p| p.rsplit('/').next().unwrap().to_owned())
                    .collect(),
                Err(_) => Vec::new(),
            }
        })
    }

    fn set_status(&self, id: &str, status: CertificateStatus) {
        self.rt
            .block_on(
                self.client
                    .update_certificate()
                    .certificate_id(id)
                    .new_status(status)
                    .send(),
            )
            .unwrap();
    }

    /// A device certificate from `params`, registered PENDING_ACTIVATION; its id.
    fn connect_with(&self, params: &testkit::certs::rcgen::CertificateParams) -> String {
        let pem = self.ca.sign(params).unwrap();
        self.rt
            .block_on(testkit::iot::first_connect(
                &self.client,
                &pem,
                &self.ca.cert_pem,
            ))
            .unwrap()
    }
}

#[test]
fn a_second_certificate_cannot_take_over_an_active_device() {
    let w = world();
    let emulator = RuntimeEmulator::start().unwrap();
    let bootstrap = spawn_bootstrap(&w.env(&emulator));
    let device = uuid(1);
    w.balena.add_device(common::FLEET, &device, true);

    let owner = w.first_connect(&device);
    let d = response(emulator.invoke(w.event(&owner), INVOKE).unwrap());
    assert_eq!(outcome(&d), "activated", "{d}");

    // Same CN, signed by the same CA (a CSR may carry any CN): held, every time it fires.
    let intruder = w.first_connect(&device);
    for _ in 0..2 {
        let d = response(emulator.invoke(w.event(&intruder), INVOKE).unwrap());
        assert_eq!(outcome(&d), "held", "{d}");
        assert!(d["reason"].as_str().unwrap().contains(&owner), "{d}");
    }
    assert_eq!(w.status(&intruder), CertificateStatus::PendingActivation);
    assert_eq!(w.status(&owner), CertificateStatus::Active);
    assert_eq!(w.principals(&device), vec![owner.clone()]);
    let log = bootstrap.log();
    assert!(
        log.lines()
            .any(|l| l.contains("\"level\":\"WARN\"") && l.contains("\"outcome\":\"held\"")),
        "a hold is logged as a warning:\n{log}"
    );

    // Re-flashed after the owner was revoked: the new certificate goes live on its own, and the
    // old one is detached.
    w.set_status(&owner, CertificateStatus::Revoked);
    let reflashed = w.first_connect(&device);
    let d = response(emulator.invoke(w.event(&reflashed), INVOKE).unwrap());
    assert_eq!(outcome(&d), "activated", "{d}");
    // The owner is detached; the intruder, held, was never attached.
    assert_eq!(w.principals(&device), vec![reflashed]);
    assert_eq!(w.status(&intruder), CertificateStatus::PendingActivation);
}

#[test]
fn a_key_that_loses_sight_of_the_fleet_never_revokes_members() {
    let w = world();
    let emulator = RuntimeEmulator::start().unwrap();
    let _bootstrap = spawn_bootstrap(&w.env(&emulator));
    let (first, member, stranger) = (uuid(1), uuid(2), uuid(3));
    w.balena.add_device(common::FLEET, &first, true);
    w.balena.add_device(common::FLEET, &member, true);
    // A warm container: the key has been seen to see the fleet.
    let id = w.first_connect(&first);
    assert_eq!(
        outcome(&response(emulator.invoke(w.event(&id), INVOKE).unwrap())),
        "activated"
    );
    let stranger_id = w.first_connect(&stranger);
    assert_eq!(
        outcome(&response(
            emulator.invoke(w.event(&stranger_id), INVOKE).unwrap()
        )),
        "rejected"
    );

    // The key's permissions change: every device now looks absent.
    w.balena.hide_fleet_from_key(common::FLEET);
    for device in [&member, &uuid(4)] {
        let id = w.first_connect(device);
        let (kind, message) = error(emulator.invoke(w.event(&id), INVOKE).unwrap());
        assert_eq!(kind, "Retryable", "{message}");
        assert!(message.contains("cannot see fleet"), "{message}");
        assert_eq!(w.status(&id), CertificateStatus::PendingActivation);
    }
}

#[test]
fn an_operators_deactivation_during_a_slow_fleet_check_stands() {
    let w = world();
    let emulator = RuntimeEmulator::start().unwrap();
    let _bootstrap = spawn_bootstrap(&w.env(&emulator));
    let device = uuid(5);
    w.balena.add_device(common::FLEET, &device, true);
    let id = w.first_connect(&device);
    w.balena
        .set_fault(Fault::Delay(Duration::from_millis(1500)));
    let decided = std::thread::scope(|scope| {
        let decision = scope.spawn(|| emulator.invoke(w.event(&id), INVOKE).unwrap());
        std::thread::sleep(Duration::from_millis(700));
        w.set_status(&id, CertificateStatus::Inactive);
        decision.join().unwrap()
    });
    let d = response(decided);
    assert_eq!(outcome(&d), "skipped", "{d}");
    assert!(
        d["reason"].as_str().unwrap().contains("became INACTIVE"),
        "{d}"
    );
    assert_eq!(w.status(&id), CertificateStatus::Inactive);
}

#[test]
fn nothing_under_a_deactivated_ca_is_activated() {
    let w = world();
    let device = uuid(6);
    w.balena.add_device(common::FLEET, &device, true);
    let id = w.first_connect(&device);
    // ca/README's compromise runbook: deactivate the CA first.
    w.rt.block_on(
        w.client
            .update_ca_certificate()
            .certificate_id(&w.ca_id)
            .new_status(CaCertificateStatus::Inactive)
            .send(),
    )
    .unwrap();
    let emulator = RuntimeEmulator::start().unwrap();
    let _bootstrap = spawn_bootstrap(&w.env(&emulator));
    let d = response(emulator.invoke(w.event(&id), INVOKE).unwrap());
    assert_eq!(outcome(&d), "rejected", "{d}");
    assert!(
        d["reason"]
            .as_str()
            .unwrap()
            .contains("INACTIVE in AWS IoT"),
        "{d}"
    );
    assert_ne!(w.status(&id), CertificateStatus::Active);
}

#[test]
fn clock_skew_waits_and_certificates_never_outlive_their_ca() {
    let w = world();
    let emulator = RuntimeEmulator::start().unwrap();
    let _bootstrap = spawn_bootstrap(&w.env(&emulator));
    let now = time::OffsetDateTime::now_utc();
    let (early, outliving) = (uuid(7), uuid(8));
    w.balena.add_device(common::FLEET, &early, true);
    w.balena.add_device(common::FLEET, &outliving, true);

    // notBefore two minutes ahead (a factory clock running fast): left pending, retryable.
    let mut params = device_params(&early);
    params.not_before = now + time::Duration::minutes(2);
    let id = w.connect_with(&params);
    let (kind, message) = error(emulator.invoke(w.event(&id), INVOKE).unwrap());
    assert_eq!(kind, "Retryable", "{message}");
    assert!(message.contains("JITR_CLOCK_SKEW_SECONDS"), "{message}");
    assert_eq!(w.status(&id), CertificateStatus::PendingActivation);

    // notAfter past the CA's own: rejected for good.
    let mut params = device_params(&outliving);
    params.not_after = w.ca.ca.not_after() + time::Duration::days(1);
    let id = w.connect_with(&params);
    let d = response(emulator.invoke(w.event(&id), INVOKE).unwrap());
    assert_eq!(outcome(&d), "rejected", "{d}");
    assert!(
        d["reason"].as_str().unwrap().contains("outlives its CA"),
        "{d}"
    );
}

/// The bootstrap's peak resident memory, from /proc.
fn peak_rss_mib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kib / 1024
}

#[test]
fn the_balena_answer_is_bounded_pinned_and_never_sent_in_the_clear() {
    let w = world();
    let emulator = RuntimeEmulator::start().unwrap();
    let bootstrap = spawn_bootstrap(&w.env(&emulator));
    let device = uuid(9);
    w.balena.add_device(common::FLEET, &device, true);

    // 400 MB where a row was expected: a transient error after 64 KiB, memory flat.
    w.balena.set_fault(Fault::Body {
        bytes: 400 * 1024 * 1024,
    });
    let id = w.first_connect(&device);
    let (kind, message) = error(emulator.invoke(w.event(&id), INVOKE).unwrap());
    assert_eq!(kind, "Retryable", "{message}");
    assert!(message.contains("larger than"), "{message}");
    let peak = peak_rss_mib(bootstrap.child.id());
    assert!(
        peak < 64,
        "bootstrap peaked at {peak} MiB (a Lambda has 128)"
    );

    // Rows of another fleet where the query pinned this one: not trusted.
    w.balena.set_fault(Fault::ForeignRow { fleet: 1 });
    let (kind, message) = error(emulator.invoke(w.event(&id), INVOKE).unwrap());
    assert_eq!(kind, "Retryable", "{message}");
    assert!(message.contains("fleet 1 to a query pinned"), "{message}");
    w.balena.set_fault(Fault::None);
    assert_eq!(w.status(&id), CertificateStatus::PendingActivation);
    assert!(w.things().is_empty());

    // A plain-HTTP API beyond loopback fails the cold start, naming the variable.
    let emulator = RuntimeEmulator::start().unwrap();
    let mut env = w.env(&emulator);
    env.retain(|(k, _)| *k != "BALENA_API_URL");
    env.push(("BALENA_API_URL", "http://api.balena-cloud.com".to_owned()));
    let mut cold = spawn_bootstrap(&env);
    let status = cold.child.wait().unwrap();
    assert_eq!(status.code(), Some(1));
    let mut stderr = String::new();
    std::io::Read::read_to_string(cold.child.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    assert!(stderr.contains("BALENA_API_URL is invalid"), "{stderr}");
}

#[test]
fn under_a_required_ledger_only_what_the_factory_listed_goes_live() {
    use aws_sdk_dynamodb::types::AttributeValue;
    let w = world();
    let dynamodb = aws_sdk_dynamodb::Client::new(&w.rt.block_on(testkit::iot::sdk_config(&w.moto)));
    w.rt.block_on(testkit::dynamodb::create_table(
        &dynamodb,
        "ledger",
        "certificate_id",
    ))
    .unwrap();
    let emulator = RuntimeEmulator::start().unwrap();
    let mut env = w.env(&emulator);
    env.extend([
        ("JITR_LEDGER_TABLE", "ledger".to_owned()),
        ("JITR_LEDGER", "require".to_owned()),
    ]);
    let _bootstrap = spawn_bootstrap(&env);
    let (issued, outsider) = (uuid(1), uuid(2));
    for device in [&issued, &outsider] {
        w.balena.add_device(common::FLEET, device, true);
    }

    // The factory listed one certificate; the CA key also signed another, outside it.
    let listed = w.first_connect(&issued);
    let s = |v: &str| AttributeValue::S(v.to_owned());
    w.rt.block_on(
        dynamodb
            .put_item()
            .table_name("ledger")
            .item("certificate_id", s(&listed))
            .item("device_id", s(&issued))
            .item("status", s("issued"))
            .send(),
    )
    .unwrap();
    let unlisted = w.first_connect(&outsider);

    let d = response(emulator.invoke(w.event(&listed), INVOKE).unwrap());
    assert_eq!(outcome(&d), "activated", "{d}");
    let field = |id: &str, name: &str| {
        w.rt.block_on(testkit::dynamodb::string_attribute(
            &dynamodb,
            "ledger",
            ("certificate_id", id),
            name,
        ))
        .unwrap()
    };
    assert_eq!(field(&listed, "status").as_deref(), Some("activated"));
    assert_eq!(field(&listed, "region").as_deref(), Some("us-east-1"));

    // A member of the fleet, signed by our CA: held all the same, and never added.
    let d = response(emulator.invoke(w.event(&unlisted), INVOKE).unwrap());
    assert_eq!(outcome(&d), "held", "{d}");
    assert!(
        d["reason"]
            .as_str()
            .unwrap()
            .starts_with("not in the ledger"),
        "{d}"
    );
    assert_eq!(w.status(&unlisted), CertificateStatus::PendingActivation);
    assert_eq!(field(&unlisted, "status"), None);
}
