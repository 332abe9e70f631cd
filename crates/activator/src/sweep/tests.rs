//! Unit tests of the sweep over the in-memory ports: newest first to the window, each CA on
//! its own, and how far it got when time runs out.

use std::time::Duration;

use factory_ca::{Ca, CaInit, DeviceId, IdFormat, KeyAlgorithm, KeyProtection};
use time::OffsetDateTime;
use tokio::time::Instant;

use super::*;
use crate::memory::{MemoryFleet, Standing};
use crate::{Policy, RejectAction};
use iot::memory::{Fault, MemoryIot};

const DAY: i64 = 86_400;

struct World {
    _dir: tempfile::TempDir,
    ca: Ca,
    ca_id: CertificateId,
    iot: MemoryIot,
    fleet: MemoryFleet,
    now: i64,
}

impl World {
    fn new() -> World {
        let dir = tempfile::tempdir().unwrap();
        CaInit {
            dir: dir.path().to_owned(),
            root_subject: "CN=sweep test CA".parse().unwrap(),
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
        World {
            _dir: dir,
            ca,
            ca_id,
            iot,
            fleet: MemoryFleet::new(),
            now: OffsetDateTime::now_utc().unix_timestamp(),
        }
    }

    /// A member's pending certificate, registered `age` seconds ago.
    fn pending(&self, n: u32, age: i64) -> CertificateId {
        let device = format!("{n:032x}");
        self.fleet.add(&device, Standing::Member);
        let id = DeviceId::parse(&device, IdFormat::BalenaUuid).unwrap();
        let issued = self
            .ca
            .issue_device(&id, KeyAlgorithm::P256, 10, OffsetDateTime::now_utc())
            .unwrap();
        self.iot.add_certificate(
            &issued.cert_pem,
            CertificateStatus::PendingActivation,
            Some(&self.ca_id),
            self.now - age,
        )
    }

    /// `count` ACTIVE certificates (listing filler), registered `age` seconds ago.
    fn active(&self, count: u32, age: i64) {
        for n in 0..count {
            let id = format!("{:064x}", u64::from(n) + 1 + (age as u64) * 100_000);
            self.iot.add_certificate_as(
                &id,
                "filler",
                CertificateStatus::Active,
                Some(&self.ca_id),
                self.now - age,
            );
        }
    }

    fn activator(&self) -> Activator<MemoryIot, MemoryFleet> {
        let policy = Policy {
            trusted_ca_ids: vec![self.ca_id.clone()],
            policy_name: "jitr-device".into(),
            reject_action: RejectAction::Revoke,
            thing_type: None,
            thing_group: None,
            id_format: IdFormat::BalenaUuid,
            clock_skew: time::Duration::minutes(5),
            max_validity_days: factory_ca::DEFAULT_MAX_DEVICE_DAYS,
        };
        Activator::new(self.iot.clone(), self.fleet.clone(), policy)
    }

    fn options(&self, window: Option<Duration>) -> SweepOptions {
        SweepOptions {
            min_age: Duration::ZERO,
            window,
            now: self.now,
            dry_run: false,
            concurrency: 4,
        }
    }
}

fn quiet(_: SweepEvent<'_>) {}

fn in_a_minute() -> Instant {
    Instant::now() + Duration::from_secs(60)
}

#[tokio::test]
async fn a_sweep_reads_newest_first_and_stops_at_its_window() {
    let w = World::new();
    let old = w.pending(1, 3 * DAY);
    w.active(300, 3 * DAY);
    w.active(300, 60);
    let recent = [w.pending(2, 30), w.pending(3, 30)];
    let activator = w.activator();

    let window = Some(Duration::from_secs(2 * DAY as u64));
    let report = activator
        .sweep(&w.ca_id, &w.options(window), in_a_minute(), &quiet)
        .await;
    assert!(report.is_complete(), "{report:?}");
    // The 302 recent ones fill page one and spill into page two, which reaches past the
    // window: two pages, not the three the whole history takes.
    assert_eq!((report.pages, report.pending, report.activated), (2, 2, 2));
    for id in &recent {
        assert_eq!(w.iot.status(id.as_str()), Some(CertificateStatus::Active));
    }
    assert_eq!(
        w.iot.status(old.as_str()),
        Some(CertificateStatus::PendingActivation)
    );

    // The whole history (reconcile --all) reaches the old one.
    let report = activator
        .sweep(&w.ca_id, &w.options(None), in_a_minute(), &quiet)
        .await;
    assert_eq!((report.pages, report.activated), (3, 1));
    assert_eq!(w.iot.status(old.as_str()), Some(CertificateStatus::Active));
}

#[tokio::test]
async fn one_ca_failing_its_listing_neither_stops_nor_starves_the_others() {
    let w = World::new();
    let broken = CertificateId::parse(&"e".repeat(64)).unwrap();
    let member = w.pending(4, 60);
    w.iot.fail_next("ListCertificatesByCA", Fault::Failed);
    let activator = w.activator();
    let reports = activator
        .sweep_all(
            &[broken.clone(), w.ca_id.clone()],
            &w.options(None),
            in_a_minute(),
            &quiet,
        )
        .await;
    assert_eq!(reports.len(), 2);
    assert_eq!(reports[0].ca_certificate_id, broken.to_string());
    assert!(
        reports[0]
            .incomplete
            .as_deref()
            .is_some_and(|why| why.starts_with("listing failed")),
        "{:?}",
        reports[0]
    );
    assert!(reports[1].is_complete(), "{:?}", reports[1]);
    assert_eq!(reports[1].activated, 1);
    assert_eq!(
        w.iot.status(member.as_str()),
        Some(CertificateStatus::Active)
    );
}

#[tokio::test]
async fn a_sweep_out_of_time_says_how_far_it_got_and_decides_nothing_it_cannot_finish() {
    let w = World::new();
    let member = w.pending(5, 60);
    let report = w
        .activator()
        .sweep(
            &w.ca_id,
            &w.options(None),
            Instant::now() + Duration::from_secs(3),
            &quiet,
        )
        .await;
    // One page fits; a decision needs 5 s, so it is left for the next sweep.
    assert_eq!(report.pages, 1);
    assert_eq!(report.failing.len(), 1, "{report:?}");
    assert!(report.failing[0]
        .1
        .contains("not reached before the deadline"));
    assert_eq!(
        w.iot.status(member.as_str()),
        Some(CertificateStatus::PendingActivation)
    );
}

#[tokio::test]
async fn a_sweep_marks_recent_active_certificates_the_ledger_missed() {
    let w = World::new();
    let recent = format!("{:064x}", 7);
    let old = format!("{:064x}", 8);
    for (id, age) in [(&recent, 600), (&old, 3 * 3600)] {
        w.iot.add_certificate_as(
            id,
            "device",
            CertificateStatus::Active,
            Some(&w.ca_id),
            w.now - age,
        );
    }
    let ledger = crate::memory::MemoryLedger::new();
    ledger.list(&recent, "device");
    ledger.list(&old, "device");
    let activator = w
        .activator()
        .with_ledger(Box::new(ledger.clone()), crate::ledger::LedgerMode::Record);
    let window = Some(Duration::from_secs(2 * DAY as u64));
    let report = activator
        .sweep(&w.ca_id, &w.options(window), in_a_minute(), &quiet)
        .await;
    assert_eq!(report.ledger_marked, 1, "{report:?}");
    assert_eq!(ledger.status(&recent).as_deref(), Some("activated"));
    // Older than LEDGER_MARK_WINDOW: marked by earlier sweeps, or never.
    assert_eq!(ledger.status(&old).as_deref(), Some("issued"));
    // Marked already: the next sweep writes nothing.
    let again = activator
        .sweep(&w.ca_id, &w.options(window), in_a_minute(), &quiet)
        .await;
    assert_eq!(again.ledger_marked, 0);
    assert_eq!(ledger.marks().len(), 1);
}
