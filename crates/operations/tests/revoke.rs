//! `jitr revoke` and the decision together, over the in-memory ports: a device cut off stays
//! cut off through a re-flash, until `jitr approve --device` lifts the mark.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test setup: a panic is the report

use std::time::Duration;

use activator::memory::{MemoryFleet, Standing};
use activator::{Activator, Outcome, Policy, RejectAction};
use factory_ca::{Ca, CaInit, DeviceId, IdFormat, KeyAlgorithm, KeyProtection};
use iot::memory::MemoryIot;
use iot::{CertificateId, CertificateStatus, IotRegistry};
use operations::revoke;
use time::OffsetDateTime;
use tokio::time::Instant;

const MEMBER: &str = "0123456789abcdef0123456789abcdef";
const STRANGER: &str = "fedcba9876543210fedcba9876543210";

struct World {
    _dir: tempfile::TempDir,
    ca: Ca,
    ca_id: CertificateId,
    iot: MemoryIot,
    fleet: MemoryFleet,
}

impl World {
    fn new() -> World {
        let dir = tempfile::tempdir().unwrap();
        CaInit {
            dir: dir.path().to_owned(),
            root_subject: "CN=revoke test CA".parse().unwrap(),
            root_key: KeyAlgorithm::P256,
            root_days: 30,
            issuing: None,
            protection: KeyProtection::InsecurePlaintext,
            root_protection: None,
            remote_key: None,
        }
        .run(OffsetDateTime::now_utc())
        .unwrap();
        let ca = Ca::load(dir.path(), None).unwrap();
        let iot = MemoryIot::new();
        let ca_id = iot.add_ca(ca.cert_pem());
        let fleet = MemoryFleet::new();
        fleet.add(MEMBER, Standing::Member);
        World {
            _dir: dir,
            ca,
            ca_id,
            iot,
            fleet,
        }
    }

    fn activator(&self, reject_action: RejectAction) -> Activator<MemoryIot, MemoryFleet> {
        let policy = Policy {
            trusted_ca_ids: vec![self.ca_id.clone()],
            policy_name: "jitr-device".into(),
            reject_action,
            thing_type: None,
            thing_group: None,
            id_format: IdFormat::BalenaUuid,
            clock_skew: time::Duration::minutes(5),
            max_validity_days: factory_ca::DEFAULT_MAX_DEVICE_DAYS,
        };
        Activator::new(self.iot.clone(), self.fleet.clone(), policy)
    }

    /// A device's first connect: its certificate registered PENDING_ACTIVATION.
    fn connect(&self, device: &str) -> CertificateId {
        let id = DeviceId::parse(device, IdFormat::BalenaUuid).unwrap();
        let issued = self
            .ca
            .issue_device(&id, KeyAlgorithm::P256, 30, OffsetDateTime::now_utc())
            .unwrap();
        self.iot.add_certificate(
            &issued.cert_pem,
            CertificateStatus::PendingActivation,
            Some(&self.ca_id),
            0,
        )
    }
}

fn deadline() -> Instant {
    Instant::now() + Duration::from_secs(30)
}

#[tokio::test]
async fn a_device_cut_off_by_revoke_is_rejected_until_the_mark_is_lifted() {
    let world = World::new();
    let first = world.connect(MEMBER);
    let activator = world.activator(RejectAction::Revoke);
    activator
        .activate(&first, Some(&world.ca_id), deadline())
        .await
        .unwrap();
    // A device AWS IoT knows nothing of is refused, and nothing is made for it (a typo).
    let nothing = revoke::revoke(
        &world.iot,
        &revoke::Target::Device(STRANGER.into()),
        &[],
        false,
        &revoke::Scope::default(),
        deadline(),
    )
    .await;
    assert!(
        matches!(nothing, Err(revoke::RevokeError::Nothing(_))),
        "{nothing:?}"
    );
    assert!(
        IotRegistry::describe_thing(&world.iot, STRANGER, deadline())
            .await
            .unwrap()
            .is_none()
    );
    let report = revoke::revoke(
        &world.iot,
        &revoke::Target::Device(MEMBER.into()),
        &[],
        false,
        &revoke::Scope::default(),
        deadline(),
    )
    .await
    .unwrap();
    assert_eq!(report.marked.as_deref(), Some(MEMBER));
    // The device is re-flashed with a fresh certificate: still cut off.
    let again = world.connect(MEMBER);
    let decision = activator
        .activate(&again, Some(&world.ca_id), deadline())
        .await
        .unwrap();
    assert_eq!(decision.outcome, Outcome::Rejected, "{decision:?}");
    assert!(
        decision.reason.contains("jitr approve --device"),
        "{}",
        decision.reason
    );
    assert_eq!(
        world.iot.status(again.as_str()),
        Some(CertificateStatus::Revoked)
    );
    assert!(revoke::lift_mark(&world.iot, MEMBER, deadline())
        .await
        .unwrap());
    assert!(!revoke::lift_mark(&world.iot, MEMBER, deadline())
        .await
        .unwrap());
    let third = world.connect(MEMBER);
    let decision = activator
        .activate(&third, Some(&world.ca_id), deadline())
        .await
        .unwrap();
    assert_eq!(decision.outcome, Outcome::Activated, "{decision:?}");
}
