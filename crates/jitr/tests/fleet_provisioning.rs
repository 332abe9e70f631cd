//! `jitr fleet-provisioning template | claim`: the template and claim policy printed from
//! rules/ (the files the stack renders), and claim certificates made through moto's AWS IoT
//! (CreateProvisioningClaim, which the launcher implements) and handed to one device: a folder,
//! or balena variables on a fleet member (the fake balena API).

#![allow(clippy::unwrap_used, clippy::expect_used)] // test setup: a panic is the report

use std::os::unix::fs::PermissionsExt;

use base64::Engine;
use serde_json::Value;
use testkit::balena::FakeBalena;
use testkit::moto::MotoServer;

mod common;

use common::{jitr, stderr, stdout, uuid};

const KEY: &str = "fleet-provisioning-test-key";
const FLEET: u64 = 31337;
const ENDPOINT: &str = "example-ats.iot.us-east-1.amazonaws.com";

#[test]
fn the_template_is_rules_own_filled_in() {
    let dir = tempfile::tempdir().unwrap();
    let out = jitr(
        dir.path(),
        &[
            "fleet-provisioning",
            "template",
            "--template-name",
            "acme",
            "--policy-name",
            "acme-device",
            "--hook-arn",
            "arn:aws:lambda:eu-west-1:123456789012:function:jitr-provisioner",
            "--region",
            "eu-west-1",
            "--account-id",
            "123456789012",
        ],
        &[],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let printed: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(printed["templateName"], "acme");
    let body = &printed["templateBody"];
    assert_eq!(body["Parameters"]["DeviceUuid"]["Type"], "String");
    assert_eq!(
        body["Resources"]["thing"]["Properties"]["ThingName"],
        serde_json::json!({"Ref": "DeviceUuid"})
    );
    assert_eq!(
        body["Resources"]["policy"]["Properties"]["PolicyName"],
        "acme-device"
    );
    assert_eq!(
        body["Resources"]["certificate"]["Properties"]["Status"],
        "Active"
    );
    assert_eq!(
        printed["preProvisioningHook"]["targetArn"],
        "arn:aws:lambda:eu-west-1:123456789012:function:jitr-provisioner"
    );
    let policy = printed["claimPolicy"].to_string();
    assert!(
        policy.contains(
            "arn:aws:iot:eu-west-1:123456789012:topic/$aws/provisioning-templates/acme/provision/*"
        ),
        "{policy}"
    );
    assert!(policy.contains("topic/$aws/certificates/create-from-csr/*"));
    assert!(!policy.contains("certificates/create/"), "no AWS-made keys");
    assert!(!policy.contains("${"), "every placeholder filled: {policy}");

    // A name AWS would refuse: a usage error.
    let out = jitr(
        dir.path(),
        &["fleet-provisioning", "template", "--template-name", "a b"],
        &[],
    );
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("--template-name"));
}

#[test]
fn a_claim_reaches_one_device_as_files_or_balena_variables() {
    let dir = tempfile::tempdir().unwrap();
    let moto = MotoServer::start().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let iot = rt.block_on(testkit::iot::client(&moto));
    rt.block_on(async {
        iot.create_provisioning_template()
            .template_name("jitr")
            .template_body("{}")
            .provisioning_role_arn("arn:aws:iam::123456789012:role/jitr-fp")
            .enabled(true)
            .send()
            .await
            .unwrap();
        testkit::iot::create_policy(&iot, "jitr-claim")
            .await
            .unwrap();
    });
    let balena = FakeBalena::start(KEY).unwrap();
    balena.add_fleet(FLEET, "acme/fleet");
    let service = balena.add_service(FLEET, "provisioner-agent");
    let member = uuid(1);
    let member_id = balena.add_device(FLEET, &member, true);
    balena.install(member_id, service);
    let stranger = uuid(2);
    let mut env = moto.aws_env();
    env.extend([
        ("BALENA_API_KEY", KEY.to_owned()),
        ("BALENA_API_URL", balena.url()),
        ("BALENA_FLEET_ID", FLEET.to_string()),
    ]);
    let claims = || {
        rt.block_on(async {
            let out = iot.list_certificates().send().await.unwrap();
            out.certificates().len()
        })
    };

    // To a folder: the certificate, the key (owner only), the settings.
    let out = jitr(
        dir.path(),
        &[
            "fleet-provisioning",
            "claim",
            "--id",
            &member,
            "--out",
            "claims",
            "--claim-policy",
            "jitr-claim",
            "--endpoint",
            ENDPOINT,
            "--json",
        ],
        &env,
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let printed: Value = serde_json::from_str(&stdout(&out)).unwrap();
    let claim_id = printed["claim_certificate_id"].as_str().unwrap().to_owned();
    assert!(printed["expires_at"].is_string(), "{printed}");
    let folder = dir.path().join("claims").join(&member);
    let key = folder.join("claim.key");
    assert!(std::fs::read_to_string(&key)
        .unwrap()
        .contains("PRIVATE KEY"));
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert!(std::fs::read_to_string(folder.join("claim.crt"))
        .unwrap()
        .contains("BEGIN CERTIFICATE"));
    let settings: Value =
        serde_json::from_str(&std::fs::read_to_string(folder.join("provisioning.json")).unwrap())
            .unwrap();
    assert_eq!(settings["template"], "jitr");
    assert_eq!(settings["endpoint"], ENDPOINT);
    assert!(!stdout(&out).contains("PRIVATE KEY"), "no key on stdout");
    // The claim policy is attached to the claim certificate.
    let attached = rt.block_on(async {
        let arn = iot
            .describe_certificate()
            .certificate_id(&claim_id)
            .send()
            .await
            .unwrap()
            .certificate_description()
            .unwrap()
            .certificate_arn()
            .unwrap()
            .to_owned();
        iot.list_attached_policies()
            .target(arn)
            .send()
            .await
            .unwrap()
            .policies()
            .iter()
            .filter_map(|p| p.policy_name().map(str::to_owned))
            .collect::<Vec<_>>()
    });
    assert_eq!(attached, vec!["jitr-claim".to_owned()]);

    // To balena: the variables on the member's service only.
    let out = jitr(
        dir.path(),
        &[
            "fleet-provisioning",
            "claim",
            "--id",
            &member,
            "--push-balena",
            "--balena-service",
            "provisioner-agent",
            "--endpoint",
            ENDPOINT,
        ],
        &env,
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let vars = balena.service_vars(member_id);
    let names: Vec<&str> = vars.iter().map(|(_, n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "AWS_CLAIM_CERT",
            "AWS_CLAIM_PRIVATE_KEY",
            "AWS_PROVISIONING_TEMPLATE",
            "AWS_DATA_ENDPOINT"
        ]
    );
    let key = base64::engine::general_purpose::STANDARD
        .decode(&vars[1].2)
        .unwrap();
    assert!(String::from_utf8(key).unwrap().contains("PRIVATE KEY"));
    assert_eq!(vars[2].2, "jitr");
    let made = claims();

    // A device outside the fleet: refused before any claim is made.
    let out = jitr(
        dir.path(),
        &[
            "fleet-provisioning",
            "claim",
            "--id",
            &stranger,
            "--push-balena",
            "--endpoint",
            ENDPOINT,
        ],
        &env,
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("not an active member"),
        "{}",
        stderr(&out)
    );
    assert_eq!(claims(), made);

    // A template that does not exist: one line naming it, exit 1.
    let out = jitr(
        dir.path(),
        &[
            "fleet-provisioning",
            "claim",
            "--id",
            &member,
            "--template-name",
            "missing",
            "--out",
            "claims",
            "--endpoint",
            ENDPOINT,
        ],
        &env,
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("fleet provisioning template missing"),
        "{}",
        stderr(&out)
    );

    // Neither --out nor --push-balena: usage.
    let out = jitr(
        dir.path(),
        &["fleet-provisioning", "claim", "--id", &member],
        &env,
    );
    assert_eq!(out.status.code(), Some(2));
}
