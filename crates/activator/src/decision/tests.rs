//! Unit tests of the decision over the in-memory ports: order of writes, the reject action,
//! CA mismatch, and retries.

use std::time::Duration;

use factory_ca::{Ca, CaInit, DeviceId, IdFormat, KeyAlgorithm, KeyProtection};
use time::OffsetDateTime;

use super::*;
use crate::memory::{Fault, MemoryFleet, MemoryIot, Standing};

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
            root_subject: "CN=unit test CA".parse().unwrap(),
            root_key: KeyAlgorithm::P256,
            root_days: 30,
            issuing: None,
            protection: KeyProtection::InsecurePlaintext,
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

    fn policy(&self, reject_action: RejectAction) -> Policy {
        Policy {
            trusted_ca_ids: vec![self.ca_id.clone()],
            policy_name: "jitr-device".into(),
            reject_action,
            thing_type: None,
            thing_group: None,
            id_format: IdFormat::BalenaUuid,
        }
    }

    fn activator(&self, reject_action: RejectAction) -> Activator<MemoryIot, MemoryFleet> {
        Activator::new(
            self.iot.clone(),
            self.fleet.clone(),
            self.policy(reject_action),
        )
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
async fn activation_is_the_last_write_after_thing_policy_and_principal() {
    let world = World::new();
    let cert = world.connect(MEMBER);
    let decision = world
        .activator(RejectAction::Revoke)
        .activate(&cert, Some(&world.ca_id), deadline())
        .await
        .unwrap();
    assert_eq!(decision.outcome, Outcome::Activated, "{decision:?}");
    let writes = world.iot.writes();
    assert_eq!(writes.last(), Some(&"UpdateCertificate"), "{writes:?}");
    let position = |op| writes.iter().position(|w| *w == op).unwrap();
    assert!(position("CreateThing") < position("AttachThingPrincipal"));
    assert!(position("AttachPolicy") < position("UpdateCertificate"));
    assert_eq!(
        world.iot.status(cert.as_str()),
        Some(CertificateStatus::Active)
    );
    assert_eq!(world.iot.principals_of(MEMBER), vec![cert.to_string()]);
    assert_eq!(world.iot.policies_of(cert.as_str()), vec!["jitr-device"]);
    assert_eq!(
        world.fleet.recorded(),
        vec![(MEMBER.to_owned(), cert.to_string())]
    );
}

#[tokio::test]
async fn a_stranger_is_revoked_or_deactivated_as_configured_and_nothing_attached() {
    for (action, status) in [
        (RejectAction::Revoke, CertificateStatus::Revoked),
        (RejectAction::Deactivate, CertificateStatus::Inactive),
    ] {
        let world = World::new();
        let cert = world.connect(STRANGER);
        let decision = world
            .activator(action)
            .activate(&cert, Some(&world.ca_id), deadline())
            .await
            .unwrap();
        assert_eq!(decision.outcome, Outcome::Rejected);
        assert!(decision.reason.contains("is not in"), "{}", decision.reason);
        assert_eq!(world.iot.writes(), vec!["UpdateCertificate"]);
        assert_eq!(world.iot.status(cert.as_str()), Some(status));
        assert!(!world.iot.thing_exists(STRANGER));
    }
}

#[tokio::test]
async fn an_event_naming_another_ca_is_skipped_without_a_write() {
    let world = World::new();
    let cert = world.connect(MEMBER);
    let other = CertificateId::parse(&"e".repeat(64)).unwrap();
    let decision = world
        .activator(RejectAction::Revoke)
        .activate(&cert, Some(&other), deadline())
        .await
        .unwrap();
    assert_eq!(decision.outcome, Outcome::Skipped);
    assert!(world.iot.writes().is_empty());
    assert_eq!(
        world.iot.status(cert.as_str()),
        Some(CertificateStatus::PendingActivation)
    );
}

#[tokio::test]
async fn a_certificate_of_an_untrusted_ca_is_rejected() {
    let world = World::new();
    let cert = world.connect(MEMBER);
    let mut policy = world.policy(RejectAction::Revoke);
    policy.trusted_ca_ids = vec![CertificateId::parse(&"e".repeat(64)).unwrap()];
    let activator = Activator::new(world.iot.clone(), world.fleet.clone(), policy);
    let decision = activator.activate(&cert, None, deadline()).await.unwrap();
    assert_eq!(decision.outcome, Outcome::Rejected);
    assert!(decision.reason.contains("JITR_TRUSTED_CA_IDS"));
}

#[tokio::test]
async fn transient_failures_leave_the_certificate_pending_and_a_retry_completes_it() {
    let world = World::new();
    let cert = world.connect(MEMBER);
    let activator = world.activator(RejectAction::Revoke);

    world.fleet.set_unavailable(true);
    let err = activator
        .activate(&cert, Some(&world.ca_id), deadline())
        .await
        .unwrap_err();
    assert!(
        err.is_retryable() && err.error_type() == "Retryable",
        "{err}"
    );
    assert!(world.iot.writes().is_empty());
    world.fleet.set_unavailable(false);

    world.iot.fail_next("UpdateCertificate", Fault::Throttled);
    let err = activator
        .activate(&cert, Some(&world.ca_id), deadline())
        .await
        .unwrap_err();
    assert!(err.is_retryable(), "{err}");
    assert_eq!(
        world.iot.status(cert.as_str()),
        Some(CertificateStatus::PendingActivation)
    );

    world.iot.fail_next("AttachPolicy", Fault::Failed);
    let err = activator
        .activate(&cert, Some(&world.ca_id), deadline())
        .await
        .unwrap_err();
    assert_eq!(err.error_type(), "Failed", "{err}");

    let decision = activator
        .activate(&cert, Some(&world.ca_id), deadline())
        .await
        .unwrap();
    assert_eq!(decision.outcome, Outcome::Activated);
    assert_eq!(world.iot.principals_of(MEMBER), vec![cert.to_string()]);
}
