//! The issuance ledger on moto's DynamoDB, end to end through the `jitr` binary: `issue
//! --ledger` lists what the factory issued; the activator's own decision (run by `jitr
//! reconcile` with the Lambda's configuration) marks it, and under JITR_LEDGER=require holds a
//! certificate the CA signed outside the factory; `approve` refuses that one unless
//! `--add-to-ledger`; `ledger import` fills in without undoing a mark.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test setup: a panic is the report

use std::collections::HashMap;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use aws_sdk_dynamodb::types::AttributeValue;
use aws_sdk_iot::types::CertificateStatus;
use testkit::certs::TestCa;
use testkit::iot;
use testkit::moto::MotoServer;

const POLICY: &str = "jitr-device";
const TABLE: &str = "jitr-ledger";

fn uuid(n: u32) -> String {
    format!("{n:032x}")
}

struct World {
    rt: tokio::runtime::Runtime,
    moto: MotoServer,
    ca: TestCa,
    ca_id: String,
    iot: aws_sdk_iot::Client,
    dynamodb: aws_sdk_dynamodb::Client,
    work: tempfile::TempDir,
}

fn world() -> World {
    let rt = testkit::world::runtime();
    let testkit::world::World {
        moto,
        sdk,
        client: iot,
        ca,
        ca_id,
        ..
    } = testkit::world::Spec::new("ledger test CA")
        .policy(POLICY)
        .start_on(&rt)
        .unwrap();
    let dynamodb = aws_sdk_dynamodb::Client::new(&sdk);
    rt.block_on(testkit::dynamodb::create_table(
        &dynamodb,
        TABLE,
        "certificate_id",
    ))
    .unwrap();
    let work = tempfile::tempdir().unwrap();
    let members: String = (1..=4).map(|n| format!("{}\n", uuid(n))).collect();
    std::fs::write(work.path().join("allowlist"), members).unwrap();
    World {
        rt,
        moto,
        ca,
        ca_id,
        iot,
        dynamodb,
        work,
    }
}

impl World {
    /// The `jitr` binary with the Lambda's configuration, the ledger `mode` (if any), on moto.
    fn jitr(&self, mode: Option<&str>, args: &[&str]) -> Output {
        let mut command = Command::new(env!("CARGO_BIN_EXE_jitr"));
        command
            .args(args)
            .current_dir(self.work.path())
            .env_clear()
            .envs(self.moto.aws_env())
            .env("JITR_TRUSTED_CA_IDS", &self.ca_id)
            .env("JITR_POLICY_NAME", POLICY)
            .env("JITR_FLEET_BACKEND", "allowlist")
            .env("JITR_ALLOWLIST", self.work.path().join("allowlist"))
            .stdin(Stdio::null());
        // `Some("")`: the table named alone, as an operator's shell may have it.
        if let Some(mode) = mode {
            command.env("JITR_LEDGER_TABLE", TABLE);
            if !mode.is_empty() {
                command.env("JITR_LEDGER", mode);
            }
        }
        command.output().unwrap()
    }

    fn item(&self, certificate_id: &str) -> Option<HashMap<String, AttributeValue>> {
        self.rt.block_on(async {
            self.dynamodb
                .get_item()
                .table_name(TABLE)
                .key("certificate_id", AttributeValue::S(certificate_id.into()))
                .send()
                .await
                .unwrap()
                .item
        })
    }

    fn field(&self, certificate_id: &str, name: &str) -> Option<String> {
        self.item(certificate_id)?
            .get(name)
            .and_then(|v| v.as_s().ok())
            .cloned()
    }

    /// A device's first connect with the certificate at `path`: registered PENDING_ACTIVATION.
    fn connect(&self, path: &Path) -> String {
        let pem = std::fs::read_to_string(path).unwrap();
        self.rt
            .block_on(iot::first_connect(&self.iot, &pem, &self.ca.cert_pem))
            .unwrap()
    }

    fn status(&self, id: &str) -> CertificateStatus {
        self.rt.block_on(iot::status(&self.iot, id)).unwrap()
    }
}

fn ok(out: &Output) -> String {
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    text
}

fn manifest_ids(dir: &Path) -> HashMap<String, String> {
    std::fs::read_to_string(dir.join("manifest.jsonl"))
        .unwrap()
        .lines()
        .map(|line| {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            (
                v["id"].as_str().unwrap().to_owned(),
                v["certificate_id"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

#[test]
fn the_ledger_lists_what_the_factory_issued_and_the_activator_requires_it() {
    let w = world();
    let ca_dir = w.ca.dir().to_str().unwrap().to_owned();

    // The factory: two devices, in the ledger as they are issued.
    let text = ok(&w.jitr(
        None,
        &[
            "issue",
            "--dir",
            &ca_dir,
            "--id",
            &uuid(1),
            "--id",
            &uuid(2),
            "--out",
            "devices",
            "--ledger",
            TABLE,
            "--batch",
            "line-7",
        ],
    ));
    assert!(
        text.contains("recorded 2 certificate(s) in the ledger jitr-ledger"),
        "{text}"
    );
    let issued = manifest_ids(&w.work.path().join("devices"));
    let listed = &issued[&uuid(1)];
    assert_eq!(w.field(listed, "device_id"), Some(uuid(1)));
    assert_eq!(w.field(listed, "batch").as_deref(), Some("line-7"));
    assert_eq!(w.field(listed, "status").as_deref(), Some("issued"));
    for name in ["serial", "not_after", "issued_at"] {
        assert!(w.field(listed, name).is_some(), "{name} missing");
    }

    // A certificate the CA signed outside the factory (no ledger): a stolen key's work.
    ok(&w.jitr(
        None,
        &[
            "issue",
            "--dir",
            &ca_dir,
            "--id",
            &uuid(3),
            "--out",
            "elsewhere",
        ],
    ));
    let outsider = manifest_ids(&w.work.path().join("elsewhere"))[&uuid(3)].clone();
    assert!(w.item(&outsider).is_none());

    let listed = w.connect(
        &w.work
            .path()
            .join(format!("devices/{}/device.crt", uuid(1))),
    );
    let outsider_id = w.connect(
        &w.work
            .path()
            .join(format!("elsewhere/{}/device.crt", uuid(3))),
    );
    assert_eq!(outsider_id, outsider);

    // The activator's decision, required: the listed one activated and marked, the other held.
    // The gate belongs to the ledger: a shell that names only the table gets it too (#21
    // case 3), as the Lambda under JITR_LEDGER=require has it.
    let out = w.jitr(Some(""), &["reconcile", "--older-than", "0s", "--json"]);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(text.contains("not in the ledger"), "{text}");
    assert_eq!(w.status(&listed), CertificateStatus::Active);
    assert_eq!(w.status(&outsider), CertificateStatus::PendingActivation);
    assert_eq!(
        w.field(&listed, "status").as_deref(),
        Some("activated"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(w.field(&listed, "region").as_deref(), Some("us-east-1"));
    assert!(w.field(&listed, "activated_at").is_some());
    assert!(w.item(&outsider).is_none(), "the activator never adds");

    // `approve` refuses it while the ledger does not list it...
    let out = w.jitr(Some(""), &["approve", "--certificate-id", &outsider]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("not in the ledger"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_eq!(w.status(&outsider), CertificateStatus::PendingActivation);
    // ...and --add-to-ledger needs a ledger to add to.
    let out = w.jitr(
        None,
        &["approve", "--certificate-id", &outsider, "--add-to-ledger"],
    );
    assert_eq!(out.status.code(), Some(2));
    // With it, the operator's word lists and activates it.
    ok(&w.jitr(
        Some("require"),
        &["approve", "--certificate-id", &outsider, "--add-to-ledger"],
    ));
    assert_eq!(w.status(&outsider), CertificateStatus::Active);
    assert_eq!(w.field(&outsider, "device_id"), Some(uuid(3)));
    assert_eq!(w.field(&outsider, "status").as_deref(), Some("activated"));

    // Import fills in what is missing (uuid 3's own manifest), keeping the marks.
    let text = ok(&w.jitr(
        None,
        &[
            "ledger",
            "import",
            "--manifest",
            "devices/manifest.jsonl",
            "--ledger",
            TABLE,
        ],
    ));
    assert!(text.contains("2 of 2 certificate(s)"), "{text}");
    assert_eq!(w.field(&listed, "status").as_deref(), Some("activated"));
    assert_eq!(w.field(&listed, "batch").as_deref(), Some("line-7"));

    // A device bound for another region: the ledger records where it was sent.
    std::fs::write(
        w.work.path().join("regions.csv"),
        format!("device_id,region\n{},eu-west-1\n", uuid(4)),
    )
    .unwrap();
    ok(&w.jitr(
        None,
        &[
            "issue",
            "--dir",
            &ca_dir,
            "--id",
            &uuid(4),
            "--out",
            "devices",
            "--region-of",
            "regions.csv",
            "--ledger",
            TABLE,
        ],
    ));
    let bound = &manifest_ids(&w.work.path().join("devices"))[&uuid(4)];
    assert_eq!(w.field(bound, "region").as_deref(), Some("eu-west-1"));
}

#[test]
fn a_ledger_write_that_fails_says_so_and_how_to_finish() {
    let w = world();
    let ca_dir = w.ca.dir().to_str().unwrap().to_owned();
    let out = w.jitr(
        None,
        &[
            "issue",
            "--dir",
            &ca_dir,
            "--id",
            &uuid(1),
            "--out",
            "devices",
            "--ledger",
            "no-such-table",
        ],
    );
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(
        text.contains("1 of 1 certificate(s) are issued but NOT in the ledger no-such-table"),
        "{text}"
    );
    assert!(text.contains("jitr ledger import --manifest"), "{text}");
    // The reason in DynamoDB's words, one line, not the SDK's dump of the raw response.
    assert!(
        text.contains("ResourceNotFoundException: ") && !text.contains("headers"),
        "{text}"
    );
    // Issued all the same: nothing is lost.
    assert!(w
        .work
        .path()
        .join(format!("devices/{}/device.crt", uuid(1)))
        .exists());

    // The import it points to, against the same missing table, with more certificates: one
    // line for the reason they share, not one (of 2 KB) per certificate.
    for n in 2..=5 {
        ok(&w.jitr(
            None,
            &[
                "issue",
                "--dir",
                &ca_dir,
                "--id",
                &uuid(n),
                "--out",
                "devices",
            ],
        ));
    }
    let out = w.jitr(
        None,
        &[
            "ledger",
            "import",
            "--manifest",
            "devices/manifest.jsonl",
            "--ledger",
            "no-such-table",
        ],
    );
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stderr);
    assert_eq!(text.lines().count(), 2, "{text}");
    assert!(
        text.contains("ledger UpdateItem on no-such-table: ResourceNotFoundException: ")
            && text.contains("(5 certificates, the first "),
        "{text}"
    );
    assert!(text.contains("0 of 5 certificate(s)"), "{text}");
}
