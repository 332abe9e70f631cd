//! `jitr register` against moto (and the fake balena API, and the test kit's proxy for
//! throttling): certificates issued ahead, registered ACTIVE with Thing and policy or
//! PENDING_ACTIVATION alone; reruns that skip what is done and finish what a stopped run left;
//! the fleet check; bad certificate files failing their device only.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test setup: a panic is the report

use std::io::Write;
use std::process::Output;

use aws_sdk_iot::types::CertificateStatus;
use testkit::balena::FakeBalena;
use testkit::certs::TestCa;
use testkit::moto::MotoServer;
use testkit::proxy::{FaultPlan, Proxy};

mod common;

use common::{jitr, stderr, stdout, uuid};

const POLICY: &str = "jitr-device";
const FLEET: u64 = 777;
const KEY: &str = "register-test-key";

struct World {
    rt: tokio::runtime::Runtime,
    moto: MotoServer,
    client: aws_sdk_iot::Client,
    ca: TestCa,
    /// The operator's folder: ca/ca.crt, devices/<id>/device.crt, devices/manifest.jsonl.
    work: tempfile::TempDir,
    /// device id -> certificate id, in issue order.
    devices: Vec<(String, String)>,
}

impl World {
    /// moto with the CA registered and the policy made; `n` devices issued into devices/.
    fn new(n: usize) -> World {
        let rt = testkit::world::runtime();
        let testkit::world::World {
            moto, client, ca, ..
        } = testkit::world::Spec::new("register test CA")
            .policy(POLICY)
            .start_on(&rt)
            .unwrap();
        let work = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(work.path().join("ca")).unwrap();
        std::fs::write(work.path().join("ca/ca.crt"), &ca.cert_pem).unwrap();
        let mut world = World {
            rt,
            moto,
            client,
            ca,
            work,
            devices: Vec::new(),
        };
        for n in 0..n {
            world.issue(&uuid(n));
        }
        world
    }

    /// Issues `id` the way `jitr issue` lays it out: devices/<id>/device.crt and a manifest line.
    fn issue(&mut self, id: &str) -> String {
        let device = factory_ca::DeviceId::parse(id, factory_ca::IdFormat::Any).unwrap();
        let issued = self
            .ca
            .ca
            .issue_device(
                &device,
                factory_ca::KeyAlgorithm::P256,
                365,
                time::OffsetDateTime::now_utc(),
            )
            .unwrap();
        let dir = self.work.path().join("devices").join(id);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("device.crt"), &issued.cert_pem).unwrap();
        let mut manifest = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.work.path().join("devices/manifest.jsonl"))
            .unwrap();
        writeln!(
            manifest,
            "{}",
            serde_json::to_string(&issued.entry).unwrap()
        )
        .unwrap();
        self.devices
            .push((id.to_owned(), issued.entry.certificate_id.clone()));
        issued.cert_pem
    }

    fn env(&self) -> Vec<(&'static str, String)> {
        let mut env = self.moto.aws_env();
        env.push(("JITR_POLICY_NAME", POLICY.to_owned()));
        env
    }

    fn register(&self, extra: &[&str], env: &[(&'static str, String)]) -> Output {
        let mut args = vec!["register", "--manifest", "devices/manifest.jsonl"];
        args.extend(extra);
        jitr(self.work.path(), &args, env)
    }

    fn status(&self, certificate_id: &str) -> Option<CertificateStatus> {
        self.rt
            .block_on(
                self.client
                    .describe_certificate()
                    .certificate_id(certificate_id)
                    .send(),
            )
            .ok()
            .and_then(|d| d.certificate_description()?.status().cloned())
    }

    fn thing_exists(&self, name: &str) -> bool {
        self.rt
            .block_on(self.client.describe_thing().thing_name(name).send())
            .is_ok()
    }

    /// The certificate ids attached to the Thing `name`.
    fn thing_certificates(&self, name: &str) -> Vec<String> {
        let out = self
            .rt
            .block_on(self.client.list_thing_principals().thing_name(name).send())
            .unwrap();
        out.principals()
            .iter()
            .map(|arn| arn.rsplit('/').next().unwrap().to_owned())
            .collect()
    }

    fn policies_of(&self, certificate_id: &str) -> Vec<String> {
        let arn = self
            .rt
            .block_on(
                self.client
                    .describe_certificate()
                    .certificate_id(certificate_id)
                    .send(),
            )
            .unwrap()
            .certificate_description()
            .unwrap()
            .certificate_arn()
            .unwrap()
            .to_owned();
        let out = self
            .rt
            .block_on(self.client.list_attached_policies().target(arn).send())
            .unwrap();
        out.policies()
            .iter()
            .filter_map(|p| p.policy_name().map(str::to_owned))
            .collect()
    }

    fn register_directly(&self, pem: &str, status: CertificateStatus) {
        self.rt
            .block_on(
                self.client
                    .register_certificate()
                    .certificate_pem(pem)
                    .ca_certificate_pem(&self.ca.cert_pem)
                    .status(status)
                    .send(),
            )
            .unwrap();
    }
}

/// The `--json` summary line.
fn summary(out: &Output) -> serde_json::Value {
    let text = stdout(out);
    let last = text.lines().last().unwrap_or_default();
    let value: serde_json::Value = serde_json::from_str(last).unwrap_or_else(|e| {
        panic!("{e}: {text}\n{}", stderr(out));
    });
    value["summary"].clone()
}

/// The `--json` device lines, by device id.
fn rows(out: &Output) -> std::collections::HashMap<String, serde_json::Value> {
    stdout(out)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v.get("device_id").is_some())
        .map(|v| (v["device_id"].as_str().unwrap().to_owned(), v))
        .collect()
}

#[test]
fn active_registration_provisions_every_device_and_a_rerun_skips_them() {
    let w = World::new(3);
    let foreign =
        w.rt.block_on(testkit::foreign::Foreign::plant(&w.moto, &w.client))
            .unwrap();
    let out = w.register(
        &["--status", "ACTIVE", "--fleet-id", "777", "--json"],
        &w.env(),
    );
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    let s = summary(&out);
    assert_eq!(s["registered"], 3, "{s}");
    assert_eq!(s["fleet_check"], false, "{s}");
    for (id, cert) in &w.devices {
        assert_eq!(w.status(cert), Some(CertificateStatus::Active), "{id}");
        assert_eq!(w.thing_certificates(id), vec![cert.clone()], "{id}");
        assert_eq!(w.policies_of(cert), vec![POLICY.to_owned()], "{id}");
        let thing =
            w.rt.block_on(w.client.describe_thing().thing_name(id).send())
                .unwrap();
        assert_eq!(
            thing
                .attributes()
                .and_then(|a| a.get("fleet"))
                .map(String::as_str),
            Some("balena-fleet-777")
        );
    }

    // Again: nothing to do, and it says so; the text form says no fleet check was made.
    let again = w.register(&["--status", "ACTIVE"], &w.env());
    assert!(again.status.success(), "{}", stderr(&again));
    let text = stdout(&again);
    assert!(
        text.contains("registered 0 (0 resumed), skipped 3 existing"),
        "{text}"
    );
    assert!(text.contains("no fleet check was made"), "{text}");
    w.rt.block_on(foreign.assert_untouched(&w.client)).unwrap();
}

#[test]
fn pending_registration_makes_no_thing_and_is_never_activated_by_a_later_run() {
    let w = World::new(2);
    let out = w.register(&["--json"], &w.env());
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(summary(&out)["status"], "PENDING_ACTIVATION");
    for (id, cert) in &w.devices {
        assert_eq!(
            w.status(cert),
            Some(CertificateStatus::PendingActivation),
            "{id}"
        );
        assert!(!w.thing_exists(id), "{id} got a Thing");
    }
    // An ACTIVE run leaves them for the activator, and reports it.
    let active = w.register(&["--status", "ACTIVE", "--json"], &w.env());
    assert!(active.status.success(), "{}", stderr(&active));
    let rows = rows(&active);
    for (id, cert) in &w.devices {
        assert_eq!(rows[id]["outcome"], "left", "{}", rows[id]);
        assert_eq!(rows[id]["status"], "PENDING_ACTIVATION");
        assert_eq!(
            w.status(cert),
            Some(CertificateStatus::PendingActivation),
            "{id}"
        );
        assert!(!w.thing_exists(id));
    }
    // Bad usage is exit 2.
    let bad = w.register(&["--status", "REVOKED"], &w.env());
    assert_eq!(bad.status.code(), Some(2), "{}", stderr(&bad));
}

#[test]
fn a_stopped_run_is_finished_but_an_operators_deactivation_stands() {
    let mut w = World::new(0);
    // Device 0: registered INACTIVE by an earlier run that stopped before activating it (its
    // journal line says so). Device 1: INACTIVE by an operator's hand. Device 2: already has
    // an ACTIVE certificate on its Thing; the manifest holds a newer one.
    let pem0 = w.issue(&uuid(0));
    let pem1 = w.issue(&uuid(1));
    w.register_directly(&pem0, CertificateStatus::Inactive);
    w.register_directly(&pem1, CertificateStatus::Inactive);
    let (id0, cert0) = w.devices[0].clone();
    let (id1, cert1) = w.devices[1].clone();
    std::fs::write(
        w.work.path().join("devices/register-journal.jsonl"),
        format!("{{\"certificate_id\":\"{cert0}\",\"step\":\"inactive\"}}\n"),
    )
    .unwrap();
    let id2 = uuid(2);
    let old = w.ca.device_pem(&id2).unwrap();
    let first = w.register_old_identity(&id2, &old);
    w.issue(&id2);
    let cert2 = w.devices[2].1.clone();

    let out = w.register(&["--status", "ACTIVE", "--json"], &w.env());
    assert!(out.status.success(), "{}", stderr(&out));
    let rows = rows(&out);
    assert_eq!(rows[&id0]["outcome"], "resumed", "{}", rows[&id0]);
    assert_eq!(w.status(&cert0), Some(CertificateStatus::Active));
    assert_eq!(w.thing_certificates(&id0), vec![cert0]);
    assert_eq!(rows[&id1]["outcome"], "left", "{}", rows[&id1]);
    assert_eq!(w.status(&cert1), Some(CertificateStatus::Inactive));
    assert!(!w.thing_exists(&id1));
    assert_eq!(rows[&id2]["outcome"], "left", "{}", rows[&id2]);
    assert!(
        rows[&id2]["reason"].as_str().unwrap().contains(&first),
        "{}",
        rows[&id2]
    );
    assert_eq!(w.status(&cert2), None, "the second identity was registered");
}

impl World {
    /// Registers `pem` ACTIVE on a Thing `id` directly: the device's identity before the run.
    fn register_old_identity(&self, id: &str, pem: &str) -> String {
        self.rt.block_on(async {
            let out = self
                .client
                .register_certificate()
                .certificate_pem(pem)
                .ca_certificate_pem(&self.ca.cert_pem)
                .status(CertificateStatus::Active)
                .send()
                .await
                .unwrap();
            self.client
                .create_thing()
                .thing_name(id)
                .send()
                .await
                .unwrap();
            self.client
                .attach_thing_principal()
                .thing_name(id)
                .principal(out.certificate_arn().unwrap())
                .send()
                .await
                .unwrap();
            out.certificate_id().unwrap().to_owned()
        })
    }
}

#[test]
fn the_fleet_check_registers_only_active_members() {
    let w = World::new(3);
    let balena = FakeBalena::start(KEY).unwrap();
    balena.add_fleet(FLEET, "acme/register");
    balena.add_device(FLEET, &w.devices[0].0, true);
    balena.add_device(FLEET, &w.devices[1].0, false);
    // Device 2 is in no fleet.
    let mut env = w.env();
    env.extend([
        ("BALENA_API_URL", balena.url()),
        ("BALENA_API_KEY", KEY.to_owned()),
        ("BALENA_FLEET_ID", FLEET.to_string()),
    ]);
    let out = w.register(&["--status", "ACTIVE", "--fleet-check", "--json"], &env);
    assert!(out.status.success(), "{}", stderr(&out));
    let rows = rows(&out);
    let s = summary(&out);
    assert_eq!(
        (s["registered"].clone(), s["not_member"].clone()),
        (1.into(), 2.into()),
        "{s}"
    );
    assert_eq!(s["fleet_check"], true);
    assert_eq!(w.status(&w.devices[0].1), Some(CertificateStatus::Active));
    for (id, cert) in &w.devices[1..] {
        assert_eq!(rows[id]["outcome"], "not-member", "{}", rows[id]);
        assert_eq!(w.status(cert), None, "{id} was registered");
        assert!(!w.thing_exists(id));
    }
    // Without balena's settings the fleet check cannot run: an error before any write.
    let none = w.register(&["--fleet-check"], &w.env());
    assert_eq!(none.status.code(), Some(1), "{}", stderr(&none));
    assert!(stderr(&none).contains("BALENA"), "{}", stderr(&none));
}

#[test]
fn a_missing_or_mismatched_certificate_file_fails_that_device_only() {
    let w = World::new(3);
    let dir = |n: usize| w.work.path().join("devices").join(&w.devices[n].0);
    std::fs::remove_file(dir(1).join("device.crt")).unwrap();
    let stranger = w.ca.device_pem(&w.devices[2].0).unwrap();
    std::fs::write(dir(2).join("device.crt"), stranger).unwrap();
    let out = w.register(&["--status", "ACTIVE"], &w.env());
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.contains("device.crt is missing"), "{text}");
    assert!(text.contains("bundle"), "{text}");
    assert!(text.contains("is not the manifest's certificate"), "{text}");
    assert!(text.contains("2 failed"), "{text}");
    assert_eq!(w.status(&w.devices[0].1), Some(CertificateStatus::Active));
    assert_eq!(w.status(&w.devices[1].1), None);
    assert_eq!(w.status(&w.devices[2].1), None);
}

#[test]
fn throttled_calls_are_retried_until_every_device_is_registered() {
    let w = World::new(6);
    let proxy = Proxy::for_url(
        &w.moto.endpoint(),
        FaultPlan {
            seed: 17,
            throttle: 0.3,
            ..FaultPlan::default()
        },
    )
    .unwrap();
    let mut env = w.env();
    env.retain(|(k, _)| *k != "AWS_ENDPOINT_URL");
    env.push(("AWS_ENDPOINT_URL", proxy.url()));
    let out = w.register(&["--status", "ACTIVE", "--json"], &env);
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    assert!(proxy.stats().throttled > 0, "{:?}", proxy.stats());
    assert_eq!(summary(&out)["registered"], 6);
    for (id, cert) in &w.devices {
        assert_eq!(w.status(cert), Some(CertificateStatus::Active), "{id}");
        assert_eq!(w.thing_certificates(id), vec![cert.clone()]);
    }
}
