//! The real `bootstrap` binary, end to end: a Lambda Runtime API emulator hands it events,
//! AWS IoT is a moto server, balena is the fake API.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test setup: a panic is the report

mod common;

use aws_sdk_iot::types::CertificateStatus;
use common::{response, spawn_bootstrap, world, FLEET, INVOKE, KEY};
use serde_json::{json, Value};
use testkit::balena::Fault;
use testkit::lambda::{Invocation, RuntimeEmulator};

#[test]
fn bootstrap_activates_members_rejects_strangers_and_retries_on_outages() {
    let w = world();
    let emulator = RuntimeEmulator::start().unwrap();
    let bootstrap = spawn_bootstrap(&w.env(&emulator));

    let member = format!("{:032x}", 1);
    w.balena.add_device(FLEET, &member, true);
    let id = w.first_connect(&member);
    let r = response(emulator.invoke(w.event(&id), INVOKE).unwrap());
    assert_eq!(
        r,
        json!({"certificateId": id, "thingName": member, "outcome": "activated", "reason": format!("device {member} is in balena fleet {FLEET}")})
    );
    assert_eq!(w.status(&id), CertificateStatus::Active);
    assert_eq!(w.things(), vec![member.clone()]);

    // Delivered again (AWS delivers at least once): already active, nothing new.
    let r = response(emulator.invoke(w.event(&id), INVOKE).unwrap());
    assert_eq!(r["outcome"], "already-active");

    let stranger = format!("{:032x}", 2);
    let id = w.first_connect(&stranger);
    let r = response(emulator.invoke(w.event(&id), INVOKE).unwrap());
    assert_eq!(r["outcome"], "rejected");
    assert_eq!(w.status(&id), CertificateStatus::Revoked);

    // Malformed: a permanent error, before any AWS call.
    let mut bad = w.event(&id);
    bad["certificateId"] = json!("not-hex");
    match emulator.invoke(bad, INVOKE).unwrap() {
        Invocation::Error {
            error_type,
            error_message,
        } => {
            assert_eq!(error_type, "MalformedEvent");
            assert!(error_message.contains("certificateId"), "{error_message}");
        }
        other => panic!("{other:?}"),
    }

    // balena down: a retryable invocation error, the certificate stays pending.
    let later = format!("{:032x}", 3);
    w.balena.add_device(FLEET, &later, true);
    let id = w.first_connect(&later);
    w.balena.set_fault(Fault::Status(503));
    match emulator.invoke(w.event(&id), INVOKE).unwrap() {
        Invocation::Error {
            error_type,
            error_message,
        } => {
            assert_eq!(error_type, "Retryable");
            assert!(error_message.contains("503"), "{error_message}");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(w.status(&id), CertificateStatus::PendingActivation);
    // Lambda retries once balena is back: activated.
    w.balena.set_fault(Fault::None);
    assert_eq!(
        response(emulator.invoke(w.event(&id), INVOKE).unwrap())["outcome"],
        "activated"
    );

    // One JSON log line per decision, with the fields an operator searches by; no secrets.
    let log = bootstrap.log();
    let decisions: Vec<Value> = log
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["message"] == "decision")
        .collect();
    assert_eq!(decisions.len(), 4, "{log}");
    assert_eq!(decisions[0]["outcome"], "activated");
    assert_eq!(decisions[0]["device_id"], member.as_str());
    assert!(decisions[0]["duration_ms"].is_u64());
    assert!(!log.contains(KEY), "the API key never reaches the logs");
    assert!(!log.contains("BEGIN CERTIFICATE"), "no PEM in logs");
}

#[test]
fn a_missing_variable_fails_the_cold_start_naming_it() {
    let w = world();
    let emulator = RuntimeEmulator::start().unwrap();
    let env: Vec<_> = w
        .env(&emulator)
        .into_iter()
        .filter(|(k, _)| *k != "JITR_POLICY_NAME")
        .collect();
    let mut bootstrap = spawn_bootstrap(&env);
    let status = bootstrap.child.wait().unwrap();
    assert!(!status.success());
    let mut stderr = String::new();
    std::io::Read::read_to_string(bootstrap.child.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    assert!(stderr.contains("JITR_POLICY_NAME is not set"), "{stderr}");
    assert_eq!(emulator.polls(), 0, "never asked for an event");

    let env: Vec<_> = w
        .env(&emulator)
        .into_iter()
        .map(|(k, v)| {
            if k == "BALENA_FLEET_ID" {
                (k, "my-fleet".to_owned())
            } else {
                (k, v)
            }
        })
        .collect();
    let mut bootstrap = spawn_bootstrap(&env);
    assert!(!bootstrap.child.wait().unwrap().success());
    let mut stderr = String::new();
    std::io::Read::read_to_string(bootstrap.child.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    assert!(stderr.contains("BALENA_FLEET_ID is invalid"), "{stderr}");
}

#[test]
fn scheduled_sweeps_and_failure_queue_replays_finish_what_events_missed() {
    let w = world();
    let emulator = RuntimeEmulator::start().unwrap();
    let mut env = w.env(&emulator);
    env.push(("JITR_SWEEP_MIN_AGE_SECONDS", "0".to_owned()));
    let _bootstrap = spawn_bootstrap(&env);

    // Two devices whose events were lost: the scheduled sweep decides both.
    let member = format!("{:032x}", 11);
    w.balena.add_device(FLEET, &member, true);
    let member_id = w.first_connect(&member);
    let stranger_id = w.first_connect(&format!("{:032x}", 12));
    let scheduled = json!({"version": "0", "id": "x", "detail-type": "Scheduled Event", "source": "aws.events", "account": "123456789012", "time": "2026-11-23T00:00:00Z", "region": "us-east-1", "resources": [], "detail": {}});
    let r = response(emulator.invoke(scheduled.clone(), INVOKE).unwrap());
    assert_eq!(r[0]["pending"], 2);
    assert_eq!(
        (r[0]["activated"].as_u64(), r[0]["rejected"].as_u64()),
        (Some(1), Some(1))
    );
    assert_eq!(w.status(&member_id), CertificateStatus::Active);
    assert_eq!(w.status(&stranger_id), CertificateStatus::Revoked);

    // The failure queue replays a Lambda destination record: retryable failures go back.
    let later = format!("{:032x}", 13);
    w.balena.add_device(FLEET, &later, true);
    let later_id = w.first_connect(&later);
    let record = |id: &str| json!({"messageId": id, "body": json!({"version": "1.0", "requestContext": {"condition": "RetriesExhausted"}, "requestPayload": w.event(&later_id)}).to_string()});
    w.balena.set_fault(Fault::Status(502));
    let r = response(
        emulator
            .invoke(
                json!({"Records": [record("m-1"), {"messageId": "m-bad", "body": "{}"}]}),
                INVOKE,
            )
            .unwrap(),
    );
    assert_eq!(r, json!({"batchItemFailures": [{"itemIdentifier": "m-1"}]}));
    assert_eq!(w.status(&later_id), CertificateStatus::PendingActivation);
    w.balena.set_fault(Fault::None);
    let r = response(
        emulator
            .invoke(json!({"Records": [record("m-2")]}), INVOKE)
            .unwrap(),
    );
    assert_eq!(r, json!({"batchItemFailures": []}));
    assert_eq!(w.status(&later_id), CertificateStatus::Active);

    // A sweep that cannot finish is an error, so the Lambda Errors alarm sees it.
    let stuck_id = w.first_connect(&format!("{:032x}", 14));
    w.balena.set_fault(Fault::Status(503));
    match emulator.invoke(scheduled, INVOKE).unwrap() {
        Invocation::Error { error_type, .. } => assert_eq!(error_type, "Retryable"),
        other => panic!("{other:?}"),
    }
    assert_eq!(w.status(&stuck_id), CertificateStatus::PendingActivation);
}

#[test]
fn each_ca_is_swept_on_its_own_and_the_metrics_are_in_the_log() {
    use testkit::proxy::{Canned, FaultPlan, Proxy};

    let w = world();
    // A second trusted CA whose listing AWS refuses (a permission gone wrong, say).
    let broken = "ab".repeat(32);
    let proxy = Proxy::for_url(&w.moto.endpoint(), FaultPlan::default()).unwrap();
    let refused = broken.clone();
    proxy.answer("ListCertificatesByCA", move |request| {
        request.target.contains(&refused).then(|| {
            Canned::error(
                403,
                "AccessDeniedException",
                json!({"message": "not authorized to list this CA"}),
            )
        })
    });
    let emulator = RuntimeEmulator::start().unwrap();
    let mut env = w.env(&emulator);
    for (name, value) in env.iter_mut() {
        match *name {
            "AWS_ENDPOINT_URL" => *value = proxy.url(),
            "JITR_TRUSTED_CA_IDS" => *value = format!("{broken},{}", w.ca_id),
            _ => {}
        }
    }
    env.push(("JITR_SWEEP_MIN_AGE_SECONDS", "0".to_owned()));
    env.push(("AWS_LAMBDA_FUNCTION_NAME", "jitr-activator".to_owned()));
    let bootstrap = spawn_bootstrap(&env);
    let member = format!("{:032x}", 21);
    w.balena.add_device(FLEET, &member, true);
    let member_id = w.first_connect(&member);

    let scheduled = json!({"source": "aws.events", "detail-type": "Scheduled Event", "detail": {}});
    match emulator.invoke(scheduled, INVOKE).unwrap() {
        Invocation::Error {
            error_type,
            error_message,
        } => {
            assert_eq!(error_type, "Retryable");
            assert!(
                error_message.contains("1 CA listing(s) unfinished"),
                "{error_message}"
            );
        }
        other => panic!("{other:?}"),
    }
    // The refused CA did not stop the trusted one.
    assert_eq!(w.status(&member_id), CertificateStatus::Active);
    let log = bootstrap.log();
    let sweep_lines: Vec<Value> = log
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|l| l["message"] == "sweep")
        .collect();
    assert_eq!(sweep_lines.len(), 2, "{log}");
    assert!(sweep_lines[0]["incomplete"]
        .as_str()
        .unwrap()
        .contains("AccessDeniedException"));
    assert_eq!(sweep_lines[1]["activated"], 1);

    // Embedded Metric Format: the decision by outcome, the counters, the sweeps.
    let metrics: Vec<Value> = log
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|l| l.get("_aws").is_some())
        .collect();
    let activated = metrics
        .iter()
        .find(|m| m["Outcome"] == "activated")
        .unwrap_or_else(|| panic!("no decision metric in\n{log}"));
    assert_eq!(activated["Function"], "jitr-activator");
    assert_eq!(activated["Decisions"], 1.0);
    assert_eq!(
        activated["_aws"]["CloudWatchMetrics"][0]["Dimensions"],
        json!([["Function", "Outcome"]])
    );
    assert!(metrics.iter().any(|m| m["SweepIncomplete"] == 1.0));
    assert!(metrics.iter().any(|m| m.get("AwsGiveUps").is_some()));
}
