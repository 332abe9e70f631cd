//! `jitr status`, `status --fix` and `jitr rotate` against moto and the fake balena API: a
//! fleet with one device in each state, the safe fixes applied (and a second run finding
//! nothing to do), and rotations with and without a grace period.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test setup: a panic is the report

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::process::Output;

use aws_sdk_iot::types::CertificateStatus;
use testkit::balena::FakeBalena;
use testkit::certs::TestCa;
use testkit::iot;
use testkit::moto::MotoServer;
use time::OffsetDateTime;

mod common;

use common::{stderr, stdout, uuid};

const POLICY: &str = "jitr-device";
const FLEET: u64 = 777;
const KEY: &str = "status-test-key";
const PRESENCE_TABLE: &str = "jitr-presence";

struct World {
    rt: tokio::runtime::Runtime,
    moto: MotoServer,
    client: aws_sdk_iot::Client,
    ca: TestCa,
    ca_id: String,
    balena: FakeBalena,
    manifest: tempfile::TempDir,
    /// Another application's things in the same account: never touched.
    foreign: testkit::foreign::Foreign,
}

impl World {
    fn new() -> World {
        let rt = testkit::world::runtime();
        let testkit::world::World {
            moto,
            client,
            ca,
            ca_id,
            balena,
            foreign,
            ..
        } = testkit::world::Spec::new("status test CA")
            .policy(POLICY)
            .balena(FLEET, "acme/status", KEY)
            .foreign()
            .start_on(&rt)
            .unwrap();
        World {
            rt,
            moto,
            client,
            ca,
            ca_id,
            balena: balena.unwrap(),
            manifest: tempfile::tempdir().unwrap(),
            foreign: foreign.unwrap(),
        }
    }

    /// Fails the test unless the foreign application's things are as planted.
    fn foreign_untouched(&self) {
        self.rt
            .block_on(self.foreign.assert_untouched(&self.client))
            .unwrap();
    }

    fn env(&self) -> Vec<(&'static str, String)> {
        let mut env = self.moto.aws_env();
        env.extend([
            ("JITR_TRUSTED_CA_IDS", self.ca_id.clone()),
            ("JITR_POLICY_NAME", POLICY.to_owned()),
            ("JITR_FLEET_BACKEND", "balena".to_owned()),
            ("BALENA_API_URL", self.balena.url()),
            ("BALENA_API_KEY", KEY.to_owned()),
            ("BALENA_FLEET_ID", FLEET.to_string()),
        ]);
        env
    }

    fn manifest_path(&self) -> std::path::PathBuf {
        self.manifest.path().join("manifest.jsonl")
    }

    /// A certificate for `device` valid `days`, registered in moto with `status`, recorded in
    /// the manifest; with `thing`, attached (policy and principal) to the device's Thing.
    fn cert(&self, device: &str, days: u32, status: CertificateStatus, thing: bool) -> String {
        let id = factory_ca::DeviceId::parse(device, factory_ca::IdFormat::Any).unwrap();
        let issued = self
            .ca
            .ca
            .issue_device(
                &id,
                factory_ca::KeyAlgorithm::P256,
                days,
                OffsetDateTime::now_utc(),
            )
            .unwrap();
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.manifest_path())
            .unwrap();
        writeln!(file, "{}", serde_json::to_string(&issued.entry).unwrap()).unwrap();
        let certificate_id = issued.entry.certificate_id.clone();
        self.rt.block_on(async {
            let out = self
                .client
                .register_certificate()
                .certificate_pem(&issued.cert_pem)
                .ca_certificate_pem(&self.ca.cert_pem)
                .status(status)
                .send()
                .await
                .unwrap();
            let arn = out.certificate_arn().unwrap().to_owned();
            if thing {
                let _ = self.client.create_thing().thing_name(device).send().await;
                self.client
                    .attach_policy()
                    .policy_name(POLICY)
                    .target(&arn)
                    .send()
                    .await
                    .unwrap();
                self.client
                    .attach_thing_principal()
                    .thing_name(device)
                    .principal(&arn)
                    .send()
                    .await
                    .unwrap();
            }
        });
        certificate_id
    }

    /// The presence table in moto, and the stack's presence rule writing into it.
    fn presence_table(&self) -> std::sync::Arc<testkit::presence::PresenceRule> {
        self.rt.block_on(async {
            let config = iot::sdk_config(&self.moto).await;
            let dynamodb = aws_sdk_dynamodb::Client::new(&config);
            testkit::presence::create_presence_table(&dynamodb, PRESENCE_TABLE)
                .await
                .unwrap();
            testkit::presence::PresenceRule::new(dynamodb, PRESENCE_TABLE).unwrap()
        })
    }

    /// The device `device`: waits (up to a minute) for credentials delivered to it in balena,
    /// then connects with them; AWS IoT's connected event goes through the presence rule.
    fn device_connects_with_delivered(&self, device: &str, rule: &testkit::presence::PresenceRule) {
        use base64::Engine as _;
        let until = std::time::Instant::now() + std::time::Duration::from_secs(60);
        let chain = loop {
            let delivered = self
                .balena
                .env_vars(self.balena_id(device))
                .into_iter()
                .find(|(name, _)| name == "AWS_CERT");
            if let Some((_, value)) = delivered {
                break base64::engine::general_purpose::STANDARD
                    .decode(value)
                    .unwrap();
            }
            assert!(
                std::time::Instant::now() < until,
                "nothing delivered to {device}"
            );
            std::thread::sleep(std::time::Duration::from_millis(200));
        };
        let der = factory_ca::certificates_from_pem_or_der(&chain).unwrap();
        let certificate_id = factory_ca::certificate_id(&der[0]);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let now = OffsetDateTime::now_utc().unix_timestamp() * 1000;
        rt.block_on(rule.deliver(
            format!("$aws/events/presence/connected/{device}"),
            serde_json::json!({
                "clientId": device,
                "timestamp": now,
                "eventType": "connected",
                "sessionIdentifier": "00000000-0000-0000-0000-000000000000",
                "principalIdentifier": certificate_id,
                "ipAddress": "127.0.0.1",
                "versionNumber": 1,
            }),
        ));
        assert!(
            rule.deliveries().iter().all(|d| d.result.is_ok()),
            "{:?}",
            rule.deliveries()
        );
    }

    fn thing(&self, device: &str) {
        let _ = self
            .rt
            .block_on(self.client.create_thing().thing_name(device).send());
    }

    fn member(&self, device: &str, active: bool) {
        self.balena.add_device(FLEET, device, active);
    }

    /// balena's numeric id of a member.
    fn balena_id(&self, device: &str) -> u64 {
        self.balena.device_id(device).expect("a member")
    }

    fn status(&self, id: &str) -> CertificateStatus {
        self.rt.block_on(iot::status(&self.client, id)).unwrap()
    }

    fn jitr(&self, dir: &Path, args: &[&str]) -> Output {
        common::jitr(dir, args, &self.env())
    }

    /// `jitr status --json` (and extra args): each device's state and the summary.
    fn states(&self, extra: &[&str]) -> (BTreeMap<String, String>, serde_json::Value, Output) {
        let manifest = self.manifest_path().display().to_string();
        let mut args = vec!["status", "--json", "--manifest", manifest.as_str()];
        args.extend(extra);
        let out = self.jitr(self.manifest.path(), &args);
        let value: serde_json::Value = serde_json::from_str(&stdout(&out))
            .unwrap_or_else(|e| panic!("{e}: {}{}", stdout(&out), stderr(&out)));
        let states = value["devices"]
            .as_array()
            .unwrap()
            .iter()
            .map(|row| {
                (
                    row["device_id"].as_str().unwrap().to_owned(),
                    row["state"].as_str().unwrap().to_owned(),
                )
            })
            .collect();
        (states, value, out)
    }
}

/// The devices, by state.
struct Devices {
    active: String,
    drifted: String,
    duplicate: String,
    held: String,
    expiring: String,
    pending: String,
    bare_thing: String,
    lost_cert: String,
    waiting: String,
    revoked: String,
    paused: String,
}

fn every_state(w: &World) -> (Devices, BTreeMap<&'static str, String>) {
    use CertificateStatus::{Active, PendingActivation, Revoked};
    let d = Devices {
        active: uuid(1),
        drifted: uuid(2),
        duplicate: uuid(3),
        held: uuid(4),
        expiring: uuid(5),
        pending: uuid(6),
        bare_thing: uuid(7),
        lost_cert: uuid(8),
        waiting: uuid(9),
        revoked: uuid(10),
        paused: uuid(11),
    };
    let mut certs = BTreeMap::new();
    for device in [
        &d.active,
        &d.duplicate,
        &d.held,
        &d.expiring,
        &d.pending,
        &d.bare_thing,
        &d.lost_cert,
        &d.waiting,
        &d.revoked,
    ] {
        w.member(device, true);
    }
    certs.insert("active", w.cert(&d.active, 365, Active, true));
    certs.insert("drifted", w.cert(&d.drifted, 365, Active, true));
    certs.insert("duplicate-old", w.cert(&d.duplicate, 365, Active, true));
    certs.insert("duplicate-new", w.cert(&d.duplicate, 365, Active, true));
    certs.insert("held-active", w.cert(&d.held, 365, Active, true));
    certs.insert(
        "held-pending",
        w.cert(&d.held, 365, PendingActivation, false),
    );
    certs.insert("expiring", w.cert(&d.expiring, 10, Active, true));
    certs.insert("pending", w.cert(&d.pending, 365, PendingActivation, false));
    w.thing(&d.bare_thing);
    certs.insert("lost", w.cert(&d.lost_cert, 365, Active, false));
    certs.insert("revoked", w.cert(&d.revoked, 365, Revoked, false));
    // Paused in balena, which can be undone: held, never revoked.
    w.member(&d.paused, false);
    certs.insert("paused", w.cert(&d.paused, 365, Active, true));
    (d, certs)
}

#[test]
fn status_names_each_state_and_fix_repairs_only_what_is_safe() {
    let w = World::new();
    let (d, certs) = every_state(&w);
    let (states, value, out) = w.states(&[]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let want = [
        (&d.active, "active"),
        (&d.drifted, "drifted"),
        (&d.duplicate, "duplicate"),
        (&d.held, "held"),
        (&d.expiring, "expiring"),
        (&d.pending, "pending"),
        (&d.bare_thing, "orphan"),
        (&d.lost_cert, "orphan"),
        (&d.waiting, "not-connected"),
        (&d.revoked, "revoked"),
        (&d.paused, "inactive"),
    ];
    for (device, state) in want {
        assert_eq!(
            states.get(device.as_str()).map(String::as_str),
            Some(state),
            "{device}: {value}"
        );
    }
    assert_eq!(states.len(), want.len(), "{value}");
    // The most urgent first; every row has the documented shape; the summary counts.
    let rows = value["devices"].as_array().unwrap();
    assert_eq!(rows[0]["state"], "drifted");
    let row = rows
        .iter()
        .find(|r| r["device_id"] == d.active.as_str())
        .unwrap();
    assert_eq!(row["fleet_member"], true);
    assert_eq!(row["thing"], d.active.as_str());
    assert_eq!(
        row["certificates"][0]["certificate_id"],
        certs["active"].as_str()
    );
    assert_eq!(row["certificates"][0]["status"], "ACTIVE");
    assert!(row["certificates"][0]["not_after"].is_string());
    assert_eq!(value["summary"]["orphan"], 2);
    assert!(
        stderr(&out).contains("status: certificates listed"),
        "progress on stderr"
    );

    // The text form ends with the counts.
    let manifest = w.manifest_path().display().to_string();
    let text = w.jitr(w.manifest.path(), &["status", "--manifest", &manifest]);
    let last = stdout(&text).lines().last().unwrap_or_default().to_owned();
    assert!(
        last.starts_with("11 device(s): 1 drifted, 1 inactive, 1 duplicate"),
        "{last}"
    );

    // Foreign Things are not jitr's: never listed as devices, counted on stderr.
    assert!(
        stderr(&out).contains("4 Thing(s) in the account are not jitr's"),
        "{}",
        stderr(&out)
    );

    // --fix shows the plan and changes nothing: the drifted certificate revoked, the lost one
    // attached again. No Thing deleted without --delete-things; the duplicate's newer
    // certificate never connected, so nothing proves the older one is unused: held.
    let (_, plan, _) = w.states(&["--fix"]);
    assert_eq!(
        plan["fixes"].as_array().unwrap().len(),
        2,
        "{}",
        plan["fixes"]
    );
    assert_eq!(w.status(&certs["drifted"]), CertificateStatus::Active);
    let text = w.jitr(
        w.manifest.path(),
        &["status", "--manifest", &manifest, "--fix"],
    );
    assert!(
        stdout(&text).contains("2 Thing(s) left in place: deleting them needs --delete-things"),
        "{}",
        stdout(&text)
    );

    // --fix --yes applies the revokes only.
    let (_, applied, _) = w.states(&["--fix", "--yes"]);
    assert_eq!(applied["applied"].as_array().unwrap().len(), 2, "{applied}");
    w.foreign_untouched();
    let things = w.rt.block_on(w.client.list_things().send()).unwrap();
    assert!(things
        .things()
        .iter()
        .any(|t| t.thing_name() == Some(d.bare_thing.as_str())));

    // --delete-things: the drifted device's Thing and the bare Thing go; nothing else.
    let (_, applied, out) = w.states(&["--fix", "--yes", "--delete-things"]);
    assert!(
        applied["applied"]
            .as_array()
            .unwrap()
            .iter()
            .all(|a| a["error"].is_null()),
        "{applied}"
    );
    assert_eq!(w.status(&certs["drifted"]), CertificateStatus::Revoked);
    // The lost certificate of an active member is attached again, not revoked: its only identity.
    assert_eq!(w.status(&certs["lost"]), CertificateStatus::Active);
    assert_eq!(w.status(&certs["duplicate-old"]), CertificateStatus::Active);
    assert_eq!(w.status(&certs["duplicate-new"]), CertificateStatus::Active);
    assert_eq!(w.status(&certs["paused"]), CertificateStatus::Active);
    assert_eq!(
        w.status(&certs["held-pending"]),
        CertificateStatus::PendingActivation
    );
    assert_eq!(w.status(&certs["expiring"]), CertificateStatus::Active);
    let things = w.rt.block_on(w.client.list_things().send()).unwrap();
    for gone in [&d.bare_thing, &d.drifted] {
        assert!(!things
            .things()
            .iter()
            .any(|t| t.thing_name() == Some(gone.as_str())));
    }
    assert!(things
        .things()
        .iter()
        .any(|t| t.thing_name() == Some(d.paused.as_str())));
    // Held, expiring and pending remain: they need an operator or a device, not a fix.
    assert_eq!(out.status.code(), Some(1));

    let (states, again, _) = w.states(&["--fix", "--yes", "--delete-things"]);
    assert_eq!(again["fixes"].as_array().unwrap().len(), 0, "{again}");
    assert_eq!(states[&d.drifted], "revoked");
    assert_eq!(again["summary"]["orphan"], 0, "{again}");
    assert_eq!(states[&d.duplicate], "duplicate");
    assert_eq!(states[&d.paused], "inactive");
    assert_eq!(states[&d.bare_thing], "not-connected");
    assert_eq!(states[&d.lost_cert], "active");
    w.foreign_untouched();
}

#[test]
fn rotate_puts_the_new_certificate_in_place_before_the_old_goes() {
    let w = World::new();
    let (a, b) = (uuid(21), uuid(22));
    for device in [&a, &b] {
        w.member(device, true);
    }
    let old_a = w.cert(&a, 365, CertificateStatus::Active, true);
    let old_b = w.cert(&b, 10, CertificateStatus::Active, true);
    // rotate reads the CA from a jitr CA folder: the test CA's.
    let ca_dir = w.ca.dir().display().to_string();
    let out_dir = w.manifest.path().display().to_string();

    // With a grace period: both ACTIVE, the device shown rotating, the manifest saying so.
    let out = w.jitr(
        w.manifest.path(),
        &[
            "rotate",
            "--dir",
            &ca_dir,
            "--out",
            &out_dir,
            "--id",
            &a,
            "--grace",
            "1h",
            "--push-balena",
            "--json",
        ],
    );
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    let rows: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    let new_a = rows[0]["new_certificate_id"].as_str().unwrap().to_owned();
    assert_eq!(rows[0]["old_certificate_ids"][0], old_a.as_str());
    assert_eq!(rows[0]["retired"], false);
    assert_eq!(w.status(&new_a), CertificateStatus::Active);
    assert_eq!(w.status(&old_a), CertificateStatus::Active);
    let manifest = std::fs::read_to_string(w.manifest_path()).unwrap();
    let line: serde_json::Value = serde_json::from_str(manifest.lines().last().unwrap()).unwrap();
    assert_eq!(line["certificate_id"], new_a.as_str());
    assert_eq!(line["supersedes"], old_a.as_str());
    assert!(line["retire_after"].is_string());
    let (states, value, _) = w.states(&[]);
    assert_eq!(states[&a], "active", "{value}");
    assert!(std::path::Path::new(&out_dir)
        .join(&a)
        .join("device.key")
        .exists());

    // --expiring-within picks b; --grace 0 retires its old certificate once the device has
    // connected with the new one: here the device picks up its delivered credentials and
    // connects, which AWS IoT's connected event and the stack's presence rule record.
    let presence = w.presence_table();
    let mut env = w.env();
    env.push(("JITR_PRESENCE_TABLE", PRESENCE_TABLE.to_owned()));
    let rotate_b = [
        "rotate",
        "--dir",
        &ca_dir,
        "--out",
        &out_dir,
        "--expiring-within",
        "30d",
        "--grace",
        "0",
        "--push-balena",
        "--wait-connected",
        "60s",
        "--json",
    ];
    let out = std::thread::scope(|scope| {
        let device = scope.spawn(|| w.device_connects_with_delivered(&b, &presence));
        let out = common::jitr(w.manifest.path(), &rotate_b, &env);
        device.join().unwrap();
        out
    });
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    let rows: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(rows.as_array().unwrap().len(), 1, "{rows}");
    assert_eq!(rows[0]["device_id"], b.as_str());
    assert_eq!(rows[0]["retired"], true);
    let new_b = rows[0]["new_certificate_id"].as_str().unwrap();
    assert_eq!(w.status(new_b), CertificateStatus::Active);
    assert_eq!(w.status(&old_b), CertificateStatus::Revoked);
    // status shows the certificate that last connected.
    let manifest = w.manifest_path().display().to_string();
    let out = common::jitr(
        w.manifest.path(),
        &["status", "--json", "--manifest", &manifest],
        &env,
    );
    let value: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    let row = value["devices"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["device_id"] == b.as_str())
        .unwrap();
    assert_eq!(row["last_connected"]["certificate_id"], new_b, "{row}");
    let principals =
        w.rt.block_on(w.client.list_thing_principals().thing_name(&b).send())
            .unwrap();
    assert_eq!(
        principals.principals().len(),
        1,
        "only the new one attached"
    );
    // The device got the new credentials before its old certificate went.
    let vars: Vec<String> = w
        .balena
        .env_vars(w.balena_id(&b))
        .into_iter()
        .map(|(name, _)| name)
        .collect();
    assert!(vars.contains(&"AWS_CERT".to_owned()), "{vars:?}");

    // --grace 0 without delivery would cut the device off: a usage error, nothing done.
    let out = w.jitr(
        w.manifest.path(),
        &[
            "rotate", "--dir", &ca_dir, "--out", &out_dir, "--id", &a, "--grace", "0",
        ],
    );
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    // A device that is not in the fleet gets nothing.
    let stranger = uuid(23);
    let out = w.jitr(
        w.manifest.path(),
        &[
            "rotate", "--dir", &ca_dir, "--out", &out_dir, "--id", &stranger, "--json",
        ],
    );
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let rows: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert!(rows[0]["error"]
        .as_str()
        .unwrap()
        .contains("not an active member"));
    assert!(!std::path::Path::new(&out_dir).join(&stranger).exists());
    w.foreign_untouched();
}

/// #21 case 2: a rotation without delivery never retires the old certificate on a guess.
/// `--grace` without delivery is refused; without it the new certificate is ACTIVE beside the
/// old, and `status --fix --yes` leaves the old one ACTIVE while nothing shows the device uses
/// the new one.
#[test]
fn a_rotation_whose_new_certificate_never_connects_leaves_the_old_one_active() {
    let w = World::new();
    let device = uuid(31);
    w.member(&device, true);
    let old = w.cert(&device, 365, CertificateStatus::Active, true);
    let ca_dir = w.ca.dir().display().to_string();
    let out_dir = w.manifest.path().display().to_string();

    let refused = w.jitr(
        w.manifest.path(),
        &[
            "rotate", "--dir", &ca_dir, "--out", &out_dir, "--id", &device, "--grace", "2s",
        ],
    );
    assert_eq!(refused.status.code(), Some(2), "{}", stderr(&refused));
    assert!(
        stderr(&refused).contains("--grace needs --push-balena"),
        "{}",
        stderr(&refused)
    );

    let out = w.jitr(
        w.manifest.path(),
        &[
            "rotate", "--dir", &ca_dir, "--out", &out_dir, "--id", &device, "--json",
        ],
    );
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    let rows: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    let new = rows[0]["new_certificate_id"].as_str().unwrap().to_owned();
    assert!(rows[0]["retire_after"].is_null(), "{rows}");
    let manifest = std::fs::read_to_string(w.manifest_path()).unwrap();
    let line: serde_json::Value = serde_json::from_str(manifest.lines().last().unwrap()).unwrap();
    assert!(
        line.get("retire_after").is_none_or(|v| v.is_null()),
        "{line}"
    );

    // Both ACTIVE: a duplicate, held for the operator, and --fix revokes neither.
    let (states, value, _) = w.states(&["--fix", "--yes", "--delete-things"]);
    assert_eq!(states[&device], "duplicate", "{value}");
    let row = value["devices"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["device_id"] == device.as_str())
        .unwrap();
    assert!(
        row["reason"]
            .as_str()
            .unwrap()
            .contains("held for the operator"),
        "{row}"
    );
    assert_eq!(w.status(&old), CertificateStatus::Active);
    assert_eq!(w.status(&new), CertificateStatus::Active);

    // --grace 0 with delivery waits for the device's connect with the new certificate; it
    // never comes, so the old one stays ACTIVE and the rotation says so (exit 1).
    let presence = w.presence_table();
    let mut env = w.env();
    env.push(("JITR_PRESENCE_TABLE", PRESENCE_TABLE.to_owned()));
    let out = common::jitr(
        w.manifest.path(),
        &[
            "rotate",
            "--dir",
            &ca_dir,
            "--out",
            &out_dir,
            "--id",
            &device,
            "--grace",
            "0",
            "--push-balena",
            "--wait-connected",
            "3s",
            "--json",
        ],
        &env,
    );
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}{}",
        stdout(&out),
        stderr(&out)
    );
    let rows: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert!(
        rows[0]["error"]
            .as_str()
            .unwrap()
            .contains("has not connected"),
        "{rows}"
    );
    assert_eq!(rows[0]["retired"], false);
    assert_eq!(w.status(&old), CertificateStatus::Active);
    assert_eq!(w.status(&new), CertificateStatus::Active);
    let newest = rows[0]["new_certificate_id"].as_str().unwrap().to_owned();

    // Once the device connects with its newest certificate, that is proof: --fix retires the
    // others.
    w.device_connects_with_delivered(&device, &presence);
    let manifest = w.manifest_path().display().to_string();
    let out = common::jitr(
        w.manifest.path(),
        &[
            "status",
            "--json",
            "--manifest",
            &manifest,
            "--fix",
            "--yes",
        ],
        &env,
    );
    let value: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(value["fixes"].as_array().unwrap().len(), 2, "{value}");
    assert_eq!(w.status(&old), CertificateStatus::Revoked);
    assert_eq!(w.status(&new), CertificateStatus::Revoked);
    assert_eq!(w.status(&newest), CertificateStatus::Active);
    w.foreign_untouched();
}
