//! `JITR_BALENA_WRITE_BACK=tag`: after activation the device carries tags naming its Thing and
//! certificate, in the fake balena API; AWS IoT is a moto server. A failed write-back never
//! changes the outcome.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test setup: a panic is the report

use std::time::Duration;

use ::iot::aws::AwsIotRegistry;
use activator::balena_directory::{BalenaDirectory, TAG_CERTIFICATE_ID, TAG_THING};
use activator::{Activator, Outcome, RegisteredEvent, WriteBack};
use aws_sdk_iot::types::CertificateStatus as SdkStatus;
use testkit::balena::Fault;
use testkit::iot;

mod common;

use common::{deadline, uuid, world, World, FLEET};

impl World {
    fn activator(&self, write_back: WriteBack) -> Activator<AwsIotRegistry, BalenaDirectory> {
        let fleet = self
            .fleet(Duration::from_secs(2))
            .with_write_back(write_back);
        Activator::new(self.registry.clone(), fleet, self.policy())
    }

    /// A device's first connect: its certificate registered PENDING_ACTIVATION; the event.
    async fn connect(&self, device: &str) -> (String, RegisteredEvent) {
        let id = self
            .first_connect(&self.ca.device_pem(device).unwrap())
            .await;
        let event = self.event(&id);
        (id, event)
    }

    /// The operator retires a certificate (what `jitr revoke` does to a replaced one): a new
    /// certificate for the same device is then its identity, not a contender to hold.
    async fn retire(&self, certificate_id: &str) {
        self.client
            .update_certificate()
            .certificate_id(certificate_id)
            .new_status(SdkStatus::Inactive)
            .send()
            .await
            .unwrap();
    }

    /// Requests other than the fleet check's own reads.
    fn writes(&self) -> Vec<String> {
        self.balena
            .requests()
            .into_iter()
            .filter(|r| r.method != "GET")
            .map(|r| format!("{} {}", r.method, r.path))
            .collect()
    }
}

fn tags(thing: &str, certificate_id: &str) -> Vec<(String, String)> {
    vec![
        (TAG_THING.to_owned(), thing.to_owned()),
        (TAG_CERTIFICATE_ID.to_owned(), certificate_id.to_owned()),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn activation_is_written_back_as_device_tags_and_updated_on_reissue() {
    let w = world().await;
    let a = w.activator(WriteBack::Tags);
    let device = uuid(1);
    let numeric = w.balena.add_device(FLEET, &device, true);

    let (id, event) = w.connect(&device).await;
    let d = a.handle_event(&event, None, deadline()).await.unwrap();
    assert_eq!(d.outcome, Outcome::Activated);
    let mut got = w.balena.tags(numeric);
    got.sort();
    let mut want = tags(&device, &id);
    want.sort();
    assert_eq!(got, want);
    // The fleet check's answer carried the numeric id: one device query, no second lookup.
    let device_reads = w
        .balena
        .requests()
        .iter()
        .filter(|r| r.method == "GET" && r.path == "/v7/device")
        .count();
    assert_eq!(device_reads, 1);
    assert!(w.balena.requests().iter().all(|r| r.authorized));

    // The device is issued a new certificate, the old one retired: the tags now name the new
    // one (409, then PATCH).
    w.retire(&id).await;
    w.balena.clear_requests();
    let (new_id, event) = w.connect(&device).await;
    assert_ne!(new_id, id);
    let d = a.handle_event(&event, None, deadline()).await.unwrap();
    assert_eq!(d.outcome, Outcome::Activated);
    let certificate_tag: Vec<_> = w
        .balena
        .tags(numeric)
        .into_iter()
        .filter(|(k, _)| k == TAG_CERTIFICATE_ID)
        .collect();
    assert_eq!(
        certificate_tag,
        vec![(TAG_CERTIFICATE_ID.to_owned(), new_id.clone())]
    );
    let mut writes = w.writes();
    writes.sort();
    assert_eq!(
        writes,
        vec![
            "PATCH /v7/device_tag",
            "PATCH /v7/device_tag",
            "POST /v7/device_tag",
            "POST /v7/device_tag"
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_write_back_leaves_the_device_activated() {
    let w = world().await;
    let a = w.activator(WriteBack::Tags);
    let device = uuid(2);
    let numeric = w.balena.add_device(FLEET, &device, true);
    // Reads work (the fleet check passes), every write is refused.
    w.balena.set_fault(Fault::WriteStatus(500));

    let (id, event) = w.connect(&device).await;
    let d = a.handle_event(&event, None, deadline()).await.unwrap();
    assert_eq!(d.outcome, Outcome::Activated);
    assert_eq!(
        iot::status(&w.client, &id).await.unwrap(),
        SdkStatus::Active
    );
    assert!(w.balena.tags(numeric).is_empty());
    assert_eq!(w.writes().len(), 2, "both tags were tried");

    // With the API key refused for writes only: the same (a new certificate, the old retired).
    w.balena.set_fault(Fault::WriteStatus(401));
    w.retire(&id).await;
    let (id, event) = w.connect(&device).await;
    let d = a.handle_event(&event, None, deadline()).await.unwrap();
    assert_eq!(d.outcome, Outcome::Activated);
    assert_eq!(
        iot::status(&w.client, &id).await.unwrap(),
        SdkStatus::Active
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_write_back_nothing_is_written_and_rejections_never_write() {
    let w = world().await;
    let member = uuid(3);
    let numeric = w.balena.add_device(FLEET, &member, true);
    let (_, event) = w.connect(&member).await;
    let d = w
        .activator(WriteBack::Off)
        .handle_event(&event, None, deadline())
        .await
        .unwrap();
    assert_eq!(d.outcome, Outcome::Activated);
    assert!(w.balena.tags(numeric).is_empty());

    // A stranger is rejected: nothing is written back for it either.
    let (_, event) = w.connect(&uuid(4)).await;
    let d = w
        .activator(WriteBack::Tags)
        .handle_event(&event, None, deadline())
        .await
        .unwrap();
    assert_eq!(d.outcome, Outcome::Rejected);
    assert!(w.writes().is_empty(), "{:?}", w.writes());
}
