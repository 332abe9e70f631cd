//! Unit tests of the decision over the in-memory ports: order of writes, the reject action,
//! CA mismatch, and retries.

use std::time::Duration;

use factory_ca::{Ca, CaInit, DeviceId, IdFormat, KeyAlgorithm, KeyProtection};
use time::OffsetDateTime;

use super::*;
use crate::memory::{MemoryFleet, Standing};
use crate::ownership::Retire;
use iot::memory::{Fault, MemoryIot};

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

    fn policy(&self, reject_action: RejectAction) -> Policy {
        Policy {
            trusted_ca_ids: vec![self.ca_id.clone()],
            policy_name: "jitr-device".into(),
            reject_action,
            thing_type: None,
            thing_group: None,
            id_format: IdFormat::BalenaUuid,
            clock_skew: time::Duration::minutes(5),
            max_validity_days: factory_ca::DEFAULT_MAX_DEVICE_DAYS,
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
        self.connect_issued_at(device, OffsetDateTime::now_utc())
    }

    /// The same with a certificate issued at `at` (notBefore a minute before it).
    fn connect_issued_at(&self, device: &str, at: OffsetDateTime) -> CertificateId {
        let id = DeviceId::parse(device, IdFormat::BalenaUuid).unwrap();
        let issued = self
            .ca
            .issue_device(&id, KeyAlgorithm::P256, 30, at)
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

/// A device with an ACTIVE certificate, activated by the decision.
async fn active_device(world: &World) -> CertificateId {
    let first = world.connect(MEMBER);
    let decision = world
        .activator(RejectAction::Revoke)
        .activate(&first, Some(&world.ca_id), deadline())
        .await
        .unwrap();
    assert_eq!(decision.outcome, Outcome::Activated);
    world.iot.clear_calls();
    first
}

#[tokio::test]
async fn a_second_certificate_for_an_active_device_is_held_and_nothing_is_attached() {
    let world = World::new();
    let first = active_device(&world).await;
    let second = world.connect(MEMBER);
    let activator = world.activator(RejectAction::Revoke);
    for _ in 0..2 {
        // A re-fired event or a sweep decides `held` again, and writes nothing.
        let decision = activator
            .activate(&second, Some(&world.ca_id), deadline())
            .await
            .unwrap();
        assert_eq!(decision.outcome, Outcome::Held, "{decision:?}");
        assert!(
            decision.reason.contains(first.as_str()),
            "{}",
            decision.reason
        );
        assert!(world.iot.writes().is_empty(), "{:?}", world.iot.writes());
    }
    assert_eq!(
        world.iot.status(second.as_str()),
        Some(CertificateStatus::PendingActivation)
    );
    assert_eq!(world.iot.principals_of(MEMBER), vec![first.to_string()]);
}

#[tokio::test]
async fn a_device_reflashed_after_a_revocation_is_activated_and_the_old_one_detached() {
    for old_status in [CertificateStatus::Revoked, CertificateStatus::Inactive] {
        let world = World::new();
        let first = active_device(&world).await;
        world.iot.change_status_before(
            "DescribeCertificate",
            1,
            first.as_str(),
            old_status.clone(),
        );
        let second = world.connect(MEMBER);
        let decision = world
            .activator(RejectAction::Revoke)
            .activate(&second, Some(&world.ca_id), deadline())
            .await
            .unwrap();
        assert_eq!(decision.outcome, Outcome::Activated, "{decision:?}");
        assert_eq!(world.iot.principals_of(MEMBER), vec![second.to_string()]);
        assert_eq!(world.iot.status(first.as_str()), Some(old_status));
        let writes = world.iot.writes();
        let activation = writes
            .iter()
            .position(|w| *w == "UpdateCertificate")
            .unwrap();
        let detach = writes
            .iter()
            .position(|w| *w == "DetachThingPrincipal")
            .unwrap();
        assert!(
            activation < detach,
            "activated first, then tidied: {writes:?}"
        );
    }
}

#[tokio::test]
async fn approve_activates_a_held_certificate_and_retires_the_old_one_as_asked() {
    for (retire, old_status, old_attached) in [
        (Retire::Revoke, CertificateStatus::Revoked, false),
        (Retire::Deactivate, CertificateStatus::Inactive, false),
        (Retire::Keep, CertificateStatus::Active, true),
    ] {
        let world = World::new();
        let first = active_device(&world).await;
        let second = world.connect(MEMBER);
        let approval = world
            .activator(RejectAction::Revoke)
            .approve(&second, retire, deadline())
            .await
            .unwrap();
        assert_eq!(approval.decision.outcome, Outcome::Activated);
        assert_eq!(
            world.iot.status(second.as_str()),
            Some(CertificateStatus::Active)
        );
        assert_eq!(world.iot.status(first.as_str()), Some(old_status));
        assert_eq!(
            world.iot.principals_of(MEMBER).contains(&first.to_string()),
            old_attached,
            "{retire:?}"
        );
        let writes = world.iot.writes();
        let activated = writes
            .iter()
            .position(|w| *w == "UpdateCertificate")
            .unwrap();
        assert!(
            writes[..activated]
                .iter()
                .all(|w| *w != "DetachThingPrincipal"),
            "the new one is active before the old one goes: {writes:?}"
        );
    }
}

#[tokio::test]
async fn an_operators_deactivation_during_the_decision_is_not_undone() {
    let world = World::new();
    let cert = world.connect(MEMBER);
    // The second DescribeCertificate is the re-read right before activation.
    world.iot.change_status_before(
        "DescribeCertificate",
        2,
        cert.as_str(),
        CertificateStatus::Inactive,
    );
    let decision = world
        .activator(RejectAction::Revoke)
        .activate(&cert, Some(&world.ca_id), deadline())
        .await
        .unwrap();
    assert_eq!(decision.outcome, Outcome::Skipped, "{decision:?}");
    assert!(
        decision.reason.contains("became INACTIVE"),
        "{}",
        decision.reason
    );
    assert_eq!(
        world.iot.status(cert.as_str()),
        Some(CertificateStatus::Inactive)
    );
    assert!(!world.iot.writes().contains(&"UpdateCertificate"));
}

#[tokio::test]
async fn a_certificate_attached_by_a_racing_decision_holds_this_one() {
    let world = World::new();
    let cert = world.connect(MEMBER);
    let rival = world.connect(MEMBER);
    // The rival's own decision attaches it after our first read of the Thing's principals
    // (nothing there) and before the second, made alongside our attach.
    world
        .iot
        .attach_before("ListThingPrincipals", 2, MEMBER, rival.as_str());
    let decision = world
        .activator(RejectAction::Revoke)
        .activate(&cert, Some(&world.ca_id), deadline())
        .await
        .unwrap();
    assert_eq!(decision.outcome, Outcome::Held, "{decision:?}");
    assert!(
        decision.reason.contains("at the same time"),
        "{}",
        decision.reason
    );
    assert_eq!(
        world.iot.status(cert.as_str()),
        Some(CertificateStatus::PendingActivation)
    );
    // The rival's decision, seeing this one attached and pending, holds too: neither goes
    // live on its own; `jitr approve` picks one.
    let decision = world
        .activator(RejectAction::Revoke)
        .activate(&rival, Some(&world.ca_id), deadline())
        .await
        .unwrap();
    assert_eq!(decision.outcome, Outcome::Held, "{decision:?}");
}

#[tokio::test]
async fn a_deactivated_ca_is_trusted_no_more() {
    let world = World::new();
    world.iot.set_ca_status(&world.ca_id, "INACTIVE");
    let cert = world.connect(MEMBER);
    let decision = world
        .activator(RejectAction::Revoke)
        .activate(&cert, Some(&world.ca_id), deadline())
        .await
        .unwrap();
    assert_eq!(decision.outcome, Outcome::Rejected);
    assert!(
        decision.reason.contains("INACTIVE in AWS IoT"),
        "{}",
        decision.reason
    );
}

#[tokio::test]
async fn a_clock_a_little_behind_waits_and_one_far_behind_rejects() {
    let world = World::new();
    let activator = world.activator(RejectAction::Revoke);
    // notBefore a minute before issuance: issued 3 minutes ahead is 2 minutes early.
    let soon = world.connect_issued_at(
        MEMBER,
        OffsetDateTime::now_utc() + time::Duration::minutes(3),
    );
    let err = activator
        .activate(&soon, Some(&world.ca_id), deadline())
        .await
        .unwrap_err();
    assert!(err.is_retryable(), "{err}");
    assert!(matches!(err, ActivationError::NotYetValid { .. }), "{err}");
    assert_eq!(
        world.iot.status(soon.as_str()),
        Some(CertificateStatus::PendingActivation)
    );
    let far = world.connect_issued_at(
        STRANGER,
        OffsetDateTime::now_utc() + time::Duration::hours(2),
    );
    let decision = activator
        .activate(&far, Some(&world.ca_id), deadline())
        .await
        .unwrap();
    assert_eq!(decision.outcome, Outcome::Rejected);
    assert!(
        decision.reason.contains("not valid before"),
        "{}",
        decision.reason
    );
}

mod ledger {
    use super::*;
    use crate::ledger::item;
    use crate::ledger::LedgerMode;
    use crate::memory::MemoryLedger;

    fn with_ledger(
        world: &World,
        mode: LedgerMode,
    ) -> (Activator<MemoryIot, MemoryFleet>, MemoryLedger) {
        let ledger = MemoryLedger::new();
        let activator = world
            .activator(RejectAction::Revoke)
            .with_ledger(Box::new(ledger.clone()), mode);
        (activator, ledger)
    }

    #[tokio::test]
    async fn required_an_unlisted_certificate_is_held_with_nothing_written() {
        let world = World::new();
        let cert = world.connect(MEMBER);
        let (activator, ledger) = with_ledger(&world, LedgerMode::Require);
        let decision = activator
            .activate(&cert, Some(&world.ca_id), deadline())
            .await
            .unwrap();
        assert_eq!(decision.outcome, Outcome::Held, "{decision:?}");
        assert!(
            decision.reason.starts_with("not in the ledger"),
            "{}",
            decision.reason
        );
        assert!(world.iot.writes().is_empty(), "{:?}", world.iot.writes());
        assert_eq!(
            world.iot.status(cert.as_str()),
            Some(CertificateStatus::PendingActivation)
        );
        assert!(ledger.marks().is_empty());
    }

    #[tokio::test]
    async fn required_a_listed_certificate_is_activated_and_marked() {
        let world = World::new();
        let cert = world.connect(MEMBER);
        let (activator, ledger) = with_ledger(&world, LedgerMode::Require);
        ledger.list(cert.as_str(), MEMBER);
        let decision = activator
            .activate(&cert, Some(&world.ca_id), deadline())
            .await
            .unwrap();
        assert_eq!(decision.outcome, Outcome::Activated, "{decision:?}");
        assert_eq!(
            ledger.status(cert.as_str()).as_deref(),
            Some(item::STATUS_ACTIVATED)
        );
        assert_eq!(ledger.reads(), 1);
    }

    #[tokio::test]
    async fn required_a_certificate_listed_for_another_device_is_held() {
        let world = World::new();
        let cert = world.connect(MEMBER);
        let (activator, ledger) = with_ledger(&world, LedgerMode::Require);
        ledger.list(cert.as_str(), STRANGER);
        let decision = activator
            .activate(&cert, Some(&world.ca_id), deadline())
            .await
            .unwrap();
        assert_eq!(decision.outcome, Outcome::Held);
        assert!(decision.reason.contains(STRANGER), "{}", decision.reason);
        assert!(world.iot.writes().is_empty());
    }

    #[tokio::test]
    async fn required_an_unreadable_ledger_activates_nothing_and_is_retried() {
        let world = World::new();
        let cert = world.connect(MEMBER);
        let (activator, ledger) = with_ledger(&world, LedgerMode::Require);
        ledger.list(cert.as_str(), MEMBER);
        ledger.set_unavailable(true);
        let err = activator
            .activate(&cert, Some(&world.ca_id), deadline())
            .await
            .unwrap_err();
        assert!(err.is_retryable(), "{err}");
        assert!(world.iot.writes().is_empty());
        ledger.set_unavailable(false);
        let decision = activator
            .activate(&cert, Some(&world.ca_id), deadline())
            .await
            .unwrap();
        assert_eq!(decision.outcome, Outcome::Activated);
    }

    #[tokio::test]
    async fn recorded_a_failed_mark_never_blocks_the_activation() {
        let world = World::new();
        let cert = world.connect(MEMBER);
        let (activator, ledger) = with_ledger(&world, LedgerMode::Record);
        ledger.list(cert.as_str(), MEMBER);
        ledger.set_unavailable(true);
        let decision = activator
            .activate(&cert, Some(&world.ca_id), deadline())
            .await
            .unwrap();
        assert_eq!(decision.outcome, Outcome::Activated);
        assert_eq!(
            world.iot.status(cert.as_str()),
            Some(CertificateStatus::Active)
        );
        assert_eq!(
            ledger.status(cert.as_str()).as_deref(),
            Some(item::STATUS_ISSUED)
        );
        // Only recorded: nothing is read, and an unlisted certificate is decided as before.
        assert_eq!(ledger.reads(), 0);
        ledger.set_unavailable(false);
        let other = world.connect(STRANGER);
        let decision = activator
            .activate(&other, Some(&world.ca_id), deadline())
            .await
            .unwrap();
        assert_eq!(decision.outcome, Outcome::Rejected);
    }

    #[tokio::test]
    async fn rejections_and_holds_are_marked_with_their_reasons() {
        let world = World::new();
        let (activator, ledger) = with_ledger(&world, LedgerMode::Record);
        let stranger = world.connect(STRANGER);
        ledger.list(stranger.as_str(), STRANGER);
        let first = world.connect(MEMBER);
        ledger.list(first.as_str(), MEMBER);
        for cert in [&stranger, &first] {
            activator
                .activate(cert, Some(&world.ca_id), deadline())
                .await
                .unwrap();
        }
        let second = world.connect(MEMBER);
        ledger.list(second.as_str(), MEMBER);
        let decision = activator
            .activate(&second, Some(&world.ca_id), deadline())
            .await
            .unwrap();
        assert_eq!(decision.outcome, Outcome::Held);
        assert_eq!(
            ledger.status(stranger.as_str()).as_deref(),
            Some(item::STATUS_REJECTED)
        );
        assert_eq!(
            ledger.status(first.as_str()).as_deref(),
            Some(item::STATUS_ACTIVATED)
        );
        assert_eq!(
            ledger.status(second.as_str()).as_deref(),
            Some(item::STATUS_HELD)
        );
    }

    /// The ledger read runs alongside the fleet check: each waits at a gate for the other, so
    /// run one after the other they would never finish.
    #[tokio::test]
    async fn the_required_read_adds_no_round_trip() {
        let world = World::new();
        let cert = world.connect(MEMBER);
        let (activator, ledger) = with_ledger(&world, LedgerMode::Require);
        ledger.list(cert.as_str(), MEMBER);
        let gate = std::sync::Arc::new(tokio::sync::Barrier::new(2));
        world.fleet.set_gate(gate.clone());
        ledger.set_read_gate(gate);
        let decision = tokio::time::timeout(
            Duration::from_secs(10),
            activator.activate(&cert, Some(&world.ca_id), deadline()),
        )
        .await
        .expect("the ledger read and the fleet check did not run alongside each other")
        .unwrap();
        assert_eq!(decision.outcome, Outcome::Activated, "{decision:?}");
        assert_eq!(ledger.reads(), 1);
    }
}

#[tokio::test]
async fn an_inactive_member_is_held_never_revoked() {
    let world = World::new();
    world.fleet.add(STRANGER, Standing::Inactive);
    let cert = world.connect(STRANGER);
    let decision = world
        .activator(RejectAction::Revoke)
        .activate(&cert, Some(&world.ca_id), deadline())
        .await
        .unwrap();
    assert_eq!(decision.outcome, Outcome::Held, "{decision:?}");
    assert!(decision.reason.contains("inactive"), "{}", decision.reason);
    assert_eq!(
        world.iot.status(cert.as_str()),
        Some(CertificateStatus::PendingActivation)
    );
    assert!(!world.iot.thing_exists(STRANGER));
    // Active again: the next decision (the sweep's) activates it.
    world.fleet.add(STRANGER, Standing::Member);
    let decision = world
        .activator(RejectAction::Revoke)
        .activate(&cert, Some(&world.ca_id), deadline())
        .await
        .unwrap();
    assert_eq!(decision.outcome, Outcome::Activated, "{decision:?}");
}
