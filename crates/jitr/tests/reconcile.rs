//! `jitr reconcile` against moto: it sweeps what the Lambda missed with the Lambda's own
//! decision and configuration, and says so in its exit code when something still fails.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test setup: a panic is the report

use std::process::{Command, Output, Stdio};

use aws_sdk_iot::types::CertificateStatus;
use serde_json::json;
use testkit::certs::TestCa;
use testkit::iot;
use testkit::moto::MotoServer;

const POLICY: &str = "jitr-device";

fn uuid(n: u32) -> String {
    format!("{n:032x}")
}

struct World {
    rt: tokio::runtime::Runtime,
    moto: MotoServer,
    ca: TestCa,
    ca_id: String,
    client: aws_sdk_iot::Client,
    allowlist: tempfile::NamedTempFile,
}

fn world(with_policy: bool) -> World {
    let rt = testkit::world::runtime();
    let spec = testkit::world::Spec::new("reconcile test CA");
    let spec = match with_policy {
        true => spec.policy(POLICY),
        false => spec,
    };
    let testkit::world::World {
        moto,
        client,
        ca,
        ca_id,
        ..
    } = spec.start_on(&rt).unwrap();
    let allowlist = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(allowlist.path(), format!("{}\n{}\n", uuid(1), uuid(2))).unwrap();
    World {
        rt,
        moto,
        ca,
        ca_id,
        client,
        allowlist,
    }
}

impl World {
    fn register(&self, device: &str) -> String {
        let pem = self.ca.device_pem(device).unwrap();
        self.rt
            .block_on(iot::first_connect(&self.client, &pem, &self.ca.cert_pem))
            .unwrap()
    }

    fn status(&self, id: &str) -> CertificateStatus {
        self.rt.block_on(iot::status(&self.client, id)).unwrap()
    }

    fn jitr(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_jitr"))
            .args(args)
            .env_clear()
            .envs(self.moto.aws_env())
            .env("AWS_MAX_ATTEMPTS", "1")
            .env("JITR_TRUSTED_CA_IDS", &self.ca_id)
            .env("JITR_POLICY_NAME", POLICY)
            .env("JITR_FLEET_BACKEND", "allowlist")
            .env("JITR_ALLOWLIST", self.allowlist.path())
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }
}

#[test]
fn sweeps_pending_certificates_with_the_lambdas_decision() {
    let w = world(true);
    let member = w.register(&uuid(1));
    let other_member = w.register(&uuid(2));
    let stranger = w.register(&uuid(3));

    let out = w.jitr(&["reconcile", "--older-than", "0s", "--dry-run"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("3 certificate(s) pending"), "{text}");
    assert_eq!(
        w.status(&member),
        CertificateStatus::PendingActivation,
        "a dry run changes nothing"
    );

    // Certificates younger than --older-than are left to the Lambda.
    let out = w.jitr(&["reconcile", "--older-than", "1h"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("0 pending"));
    assert_eq!(w.status(&member), CertificateStatus::PendingActivation);

    let out = w.jitr(&["reconcile", "--older-than", "0s"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("3 pending, 2 activated, 1 rejected, 0 held, 0 skipped, 0 still failing"),
        "{text}"
    );
    assert_eq!(w.status(&member), CertificateStatus::Active);
    assert_eq!(w.status(&other_member), CertificateStatus::Active);
    assert_eq!(w.status(&stranger), CertificateStatus::Revoked);

    // Nothing left: a second sweep has nothing to do.
    let out = w.jitr(&["reconcile", "--older-than", "0s", "--json"]);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report[0]["report"]["pending"], 0);
}

#[test]
fn certificates_that_still_fail_make_it_exit_1_and_stay_pending() {
    // No device policy exists, so AttachPolicy fails: the certificate must stay pending.
    let w = world(false);
    let member = w.register(&uuid(1));
    let out = w.jitr(&["reconcile", "--older-than", "0s"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("1 still failing"), "{text}");
    assert!(text.contains("still-failing"), "{text}");
    assert_eq!(w.status(&member), CertificateStatus::PendingActivation);

    let out = w.jitr(&["reconcile", "--older-than", "soon"]);
    assert_eq!(out.status.code(), Some(2), "bad usage");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_jitr"));
    let out = cmd
        .args(["reconcile"])
        .env_clear()
        .envs(w.moto.aws_env())
        .output()
        .unwrap();
    // Missing configuration is a usage error, every missing variable named in one line.
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    for var in [
        "JITR_TRUSTED_CA_IDS",
        "JITR_POLICY_NAME",
        "BALENA_FLEET_ID",
        "BALENA_API_KEY",
    ] {
        assert!(stderr.contains(var), "{var}: {stderr}");
    }
    // One missing: named as before, still exit 2.
    let out = Command::new(env!("CARGO_BIN_EXE_jitr"))
        .args(["reconcile"])
        .env_clear()
        .envs(w.moto.aws_env())
        .env("JITR_POLICY_NAME", POLICY)
        .env("JITR_FLEET_BACKEND", "allowlist")
        .env("JITR_ALLOWLIST", w.allowlist.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("JITR_TRUSTED_CA_IDS is not set"));
}

#[test]
fn revoke_undoes_an_activation_and_is_idempotent() {
    let w = world(true);
    let member = w.register(&uuid(1));
    assert!(w
        .jitr(&["reconcile", "--older-than", "0s"])
        .status
        .success());
    assert_eq!(w.status(&member), CertificateStatus::Active);

    let out = w.jitr(&["revoke", "--id", &uuid(1), "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["revoked"][0]["certificate_id"], member.as_str());
    assert_eq!(report["revoked"][0]["policies_detached"], json!([POLICY]));
    assert_eq!(w.status(&member), CertificateStatus::Revoked);
    let (policies, things) = w.rt.block_on(async {
        let arn = w
            .client
            .describe_certificate()
            .certificate_id(&member)
            .send()
            .await
            .unwrap()
            .certificate_description()
            .unwrap()
            .certificate_arn()
            .unwrap()
            .to_owned();
        let p = w
            .client
            .list_attached_policies()
            .target(&arn)
            .send()
            .await
            .unwrap()
            .policies()
            .len();
        let t = w
            .client
            .list_principal_things()
            .principal(&arn)
            .send()
            .await
            .unwrap()
            .things()
            .len();
        (p, t)
    });
    assert_eq!((policies, things), (0, 0));

    // Again, by certificate id, and deleting the Thing: still fine.
    let out = w.jitr(&["revoke", "--certificate-id", &member, "--delete-thing"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The certificate was detached already, so its Thing stood (with the mark): by device id,
    // it goes.
    let out = w.jitr(&["revoke", "--id", &uuid(1), "--delete-thing"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains(&format!("deleted Thing {}", uuid(1))));
    // Now AWS IoT holds nothing of the device, and revoking nothing is an error (a typo must
    // not look done), with no Thing made.
    let out = w.jitr(&["revoke", "--id", &uuid(1), "--delete-thing"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("nothing to revoke"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = w.jitr(&["revoke", "--id", &uuid(7)]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("nothing to revoke"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let made =
        w.rt.block_on(w.client.describe_thing().thing_name(uuid(7)).send());
    assert!(made.is_err(), "a Thing was made for an unknown id");
    let out = w.jitr(&["revoke"]);
    assert_eq!(out.status.code(), Some(2));
    // A value that cannot be a certificate id is a usage error, named.
    let out = w.jitr(&["revoke", "--certificate-id", "nothex"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--certificate-id \"nothex\""));
    // The shell's JITR_TRUSTED_CA_IDS is read as the Lambda reads it: a bad one is named, exit 2.
    let out = Command::new(env!("CARGO_BIN_EXE_jitr"))
        .args(["revoke", "--certificate-id", &member])
        .env_clear()
        .envs(w.moto.aws_env())
        .env("JITR_TRUSTED_CA_IDS", format!("{}, nothex", w.ca_id))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("JITR_TRUSTED_CA_IDS is invalid: \"nothex\""),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_held_certificate_goes_live_only_by_approval_which_retires_the_old_one() {
    let w = world(true);
    let owner = w.register(&uuid(1));
    assert!(w
        .jitr(&["reconcile", "--older-than", "0s"])
        .status
        .success());
    assert_eq!(w.status(&owner), CertificateStatus::Active);

    // The device comes back with a new certificate (re-issued with --force, say).
    let newer = w.register(&uuid(1));
    let out = w.jitr(&["reconcile", "--older-than", "0s"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("1 held"), "{text}");
    assert!(text.contains("jitr approve --certificate-id"), "{text}");
    assert_eq!(w.status(&newer), CertificateStatus::PendingActivation);

    let bad = w.jitr(&["approve", "--certificate-id", "not-an-id"]);
    assert_eq!(bad.status.code(), Some(1));
    let out = w.jitr(&["approve", "--certificate-id", &newer, "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let approval: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(approval["decision"]["outcome"], "activated");
    assert_eq!(approval["retired"], json!([owner]));
    assert_eq!(w.status(&newer), CertificateStatus::Active);
    assert_eq!(w.status(&owner), CertificateStatus::Revoked);
    let principals = w.rt.block_on(async {
        w.client
            .list_thing_principals()
            .thing_name(uuid(1))
            .send()
            .await
            .unwrap()
            .principals()
            .len()
    });
    assert_eq!(principals, 1, "only the approved certificate is attached");
}

#[test]
fn an_unreachable_endpoint_ends_within_a_minute_naming_it_and_the_last_error() {
    let w = world(true);
    let started = std::time::Instant::now();
    let out = w.jitr(&["reconcile", "--endpoint-url", "http://127.0.0.1:9"]);
    let took = started.elapsed();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert_eq!(out.status.code(), Some(1), "{stdout}{stderr}");
    assert!(took < std::time::Duration::from_secs(60), "{took:?}");
    assert!(
        stdout.contains("incomplete after 0 page(s): listing failed")
            && stdout.contains("cannot reach AWS IoT at http://127.0.0.1:9"),
        "{stdout}"
    );
}

#[test]
fn a_ca_that_is_not_trusted_is_refused_not_swept() {
    let w = world(true);
    let untrusted = "ab".repeat(32);
    let out = w.jitr(&["reconcile", "--ca-id", &untrusted]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("is not in JITR_TRUSTED_CA_IDS"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn reconcile_shows_its_progress_and_looks_back_as_far_as_asked() {
    let w = world(true);
    let member = w.register(&uuid(1));
    let out = w.jitr(&["reconcile", "--older-than", "0s", "--all"]);
    assert!(out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("page 1, 1 listed, 1 pending"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(w.status(&member), CertificateStatus::Active);
}

#[test]
fn revoke_reads_every_page_and_the_manifests_certificates_without_a_thing() {
    use testkit::proxy::{Canned, FaultPlan, Proxy};

    let w = world(true);
    let device = uuid(1);
    let first = w.register(&device);
    assert!(w
        .jitr(&["reconcile", "--older-than", "0s"])
        .status
        .success());
    // A second certificate attached to the same Thing by hand (an operator's console click).
    let second = w.register(&device);
    let arn = |id: &str| format!("arn:aws:iot:us-east-1:123456789012:cert/{id}");
    w.rt.block_on(
        w.client
            .attach_thing_principal()
            .thing_name(&device)
            .principal(arn(&second))
            .send(),
    )
    .unwrap();
    // AWS answers ListThingPrincipals a page at a time; moto never does: the proxy does.
    let proxy = Proxy::for_url(&w.moto.endpoint(), FaultPlan::default()).unwrap();
    let (a, b) = (arn(&first), arn(&second));
    proxy.answer("ListThingPrincipals", move |request| {
        Some(if request.target.contains("nextToken=page-2") {
            Canned::ok(json!({"principals": [b.clone()]}))
        } else {
            Canned::ok(json!({"principals": [a.clone()], "nextToken": "page-2"}))
        })
    });
    // A third certificate of the device, pending, that never got a Thing; and one the
    // factory issued that never connected.
    let pending = w.register(&device);
    let never = "cd".repeat(32);
    let manifest = tempfile::NamedTempFile::new().unwrap();
    let line = |id: &str| {
        json!({"id": device, "serial": "01", "not_before": "2026-01-01T00:00:00Z",
               "not_after": "2027-01-01T00:00:00Z", "certificate_id": id})
        .to_string()
    };
    std::fs::write(
        manifest.path(),
        format!("{}\n{}\n{}\n", line(&first), line(&pending), line(&never)),
    )
    .unwrap();
    let out = w.jitr(&[
        "revoke",
        "--id",
        &device,
        "--manifest",
        manifest.path().to_str().unwrap(),
        "--endpoint-url",
        &proxy.url(),
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let revoked: Vec<_> = report["revoked"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["certificate_id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        revoked,
        vec![first.clone(), second.clone(), pending.clone()]
    );
    assert_eq!(report["not_registered"], json!([never]));
    for id in [&first, &second, &pending] {
        assert_eq!(w.status(id), CertificateStatus::Revoked);
    }
}

/// #21 case 4: revocation lasts. `jitr revoke --id` leaves the mark on the device's Thing; a
/// re-flashed device's fresh certificate is rejected until `jitr approve --device` lifts it.
/// Another application's things in the account are untouched throughout.
#[test]
fn a_revoked_device_stays_cut_off_until_approved_again() {
    let w = world(true);
    let foreign =
        w.rt.block_on(testkit::foreign::Foreign::plant(&w.moto, &w.client))
            .unwrap();
    let first = w.register(&uuid(1));
    assert!(w
        .jitr(&["reconcile", "--older-than", "0s"])
        .status
        .success());
    assert_eq!(w.status(&first), CertificateStatus::Active);
    let out = w.jitr(&["revoke", "--id", &uuid(1)]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("cut off for good"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );

    // Re-flashed: a fresh certificate, a member of the fleet all along, rejected.
    let second = w.register(&uuid(1));
    w.jitr(&["reconcile", "--older-than", "0s"]);
    assert_eq!(w.status(&second), CertificateStatus::Revoked);

    // Nothing to lift on a device never cut off: exit 1.
    let out = w.jitr(&["approve", "--device", &uuid(2)]);
    assert_eq!(out.status.code(), Some(1));
    let out = w.jitr(&["approve", "--device", &uuid(1)]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let third = w.register(&uuid(1));
    assert!(w
        .jitr(&["reconcile", "--older-than", "0s"])
        .status
        .success());
    assert_eq!(w.status(&third), CertificateStatus::Active);
    w.rt.block_on(foreign.assert_untouched(&w.client)).unwrap();
}

/// #21: `jitr revoke` acts only on what jitr owns. A Thing named like a device that is another
/// application's, and another CA's certificate (named, or attached to the device's own Thing),
/// are refused or left as they are; the device's own certificate is revoked.
#[test]
fn revoke_touches_only_what_jitr_owns() {
    let w = world(true);
    let foreign =
        w.rt.block_on(testkit::foreign::Foreign::plant(&w.moto, &w.client))
            .unwrap();
    let refused = |out: Output, what: &str| {
        assert_eq!(
            out.status.code(),
            Some(1),
            "{what}: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("not jitr's"), "{what}: {stderr}");
    };
    // A foreign Thing that looks like a balena UUID: not marked, not deleted.
    refused(
        w.jitr(&["revoke", "--id", &foreign.uuid_like, "--delete-thing"]),
        "a foreign UUID-named Thing",
    );
    refused(
        w.jitr(&["revoke", "--id", &foreign.uuid_like]),
        "a foreign UUID-named Thing, marking",
    );
    // Another CA's certificate, by id: refused by its CA, and without the trusted list known
    // (a shell with AWS credentials only) by its Thing.
    refused(
        w.jitr(&["revoke", "--certificate-id", &foreign.certificate_id]),
        "another CA's certificate",
    );
    let out = Command::new(env!("CARGO_BIN_EXE_jitr"))
        .args(["revoke", "--certificate-id", &foreign.certificate_id])
        .env_clear()
        .envs(w.moto.aws_env())
        .env("AWS_MAX_ATTEMPTS", "1")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    refused(out, "another CA's certificate, no JITR_TRUSTED_CA_IDS");
    w.rt.block_on(foreign.assert_untouched(&w.client)).unwrap();

    // Another application's certificate attached to the device's own Thing stays ACTIVE and
    // attached, and keeps the Thing from being deleted.
    let member = w.register(&uuid(1));
    assert!(w
        .jitr(&["reconcile", "--older-than", "0s"])
        .status
        .success());
    w.rt.block_on(
        w.client
            .attach_thing_principal()
            .thing_name(uuid(1))
            .principal(&foreign.certificate_arn)
            .send(),
    )
    .unwrap();
    let out = w.jitr(&["revoke", "--id", &uuid(1), "--delete-thing", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["revoked"][0]["certificate_id"], member.as_str());
    assert_eq!(report["revoked"].as_array().map(Vec::len), Some(1));
    assert_eq!(report["foreign_kept"], json!([foreign.certificate_id]));
    assert_eq!(report["things_kept"], json!([uuid(1)]));
    assert_eq!(w.status(&member), CertificateStatus::Revoked);
    w.rt.block_on(
        w.client
            .detach_thing_principal()
            .thing_name(uuid(1))
            .principal(&foreign.certificate_arn)
            .send(),
    )
    .unwrap();
    w.rt.block_on(foreign.assert_untouched(&w.client)).unwrap();
}
