//! Proof of use end to end: devices connect over real TLS to the IoT endpoint stand-in, which
//! publishes AWS IoT's connected lifecycle events; the stack's presence rule
//! (`rules/presence-rule.json`, parsed and run by testkit) puts each into the presence table in
//! moto; [`DynamoPresence`] reads them back as `jitr status` and `rotate` do.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test setup: a panic is the report

use std::collections::HashMap;
use std::sync::{mpsc, Arc, Mutex, PoisonError};
use std::time::Duration;

use activator::dynamodb::presence::DynamoPresence;
use activator::presence::{last_connected, Connection, PresenceLog};
use aws_sdk_iot::types::CertificateStatus;
use serde_json::Value;
use testkit::certs::TestCa;
use testkit::iot;
use testkit::iot_endpoint::{
    client, ClientTls, EndpointOptions, IotEndpoint, MqttClient, RegisteredCa, Seen,
};
use testkit::moto::MotoServer;
use testkit::presence::{create_presence_table, PresenceRule};
use tokio::time::Instant;

const POLICY: &str = "jitr-device";
const TABLE: &str = "jitr-presence";
const WAIT: Duration = Duration::from_secs(10);

fn deadline() -> Instant {
    Instant::now() + Duration::from_secs(30)
}

fn now_ms() -> i64 {
    i64::try_from(time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000).unwrap()
}

/// One certificate of a device: its id and the TLS configuration that presents it.
struct Identity {
    id: String,
    tls: ClientTls,
}

struct World {
    _moto: MotoServer,
    iot: aws_sdk_iot::Client,
    sdk: aws_config::SdkConfig,
    ca: TestCa,
    endpoint: IotEndpoint,
    rule: Arc<PresenceRule>,
    registered: mpsc::Receiver<Value>,
}

async fn world() -> World {
    let testkit::world::World {
        moto,
        sdk,
        client: iot,
        ca,
        ca_id,
        ..
    } = testkit::world::Spec::new("presence test CA")
        .start()
        .await
        .unwrap();
    let dynamodb = aws_sdk_dynamodb::Client::new(&sdk);
    iot::create_device_policy(&iot, POLICY, "balena")
        .await
        .unwrap();
    create_presence_table(&dynamodb, TABLE).await.unwrap();
    let rule = PresenceRule::new(dynamodb, TABLE).unwrap();
    let (events, registered) = mpsc::channel::<Value>();
    let events = Mutex::new(events);
    let endpoint = IotEndpoint::start_with(
        iot.clone(),
        vec![RegisteredCa {
            pem: ca.cert_pem.clone(),
            id: ca_id,
        }],
        Box::new(move |event| {
            let _ = events
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .send(event);
        }),
        EndpointOptions::default().presence(rule.sink()),
    )
    .unwrap();
    World {
        _moto: moto,
        iot,
        sdk,
        ca,
        endpoint,
        rule,
        registered,
    }
}

impl World {
    /// A new certificate for `device`, registered by its first connect (JITR) and then
    /// activated as the activator does: Thing, policy, principal, ACTIVE.
    async fn activated(&self, device: &str) -> Identity {
        let id = factory_ca::DeviceId::parse(device, factory_ca::IdFormat::Any).unwrap();
        let issued = self
            .ca
            .ca
            .issue_device(
                &id,
                factory_ca::KeyAlgorithm::P256,
                10,
                time::OffsetDateTime::now_utc(),
            )
            .unwrap();
        let tls = client::tls_config(
            &issued.chain_pem,
            issued.key_pem.as_ref().unwrap(),
            self.endpoint.server_ca_pem(),
        )
        .unwrap();
        let certificate_id = factory_ca::certificate_id(&issued.cert_der);
        // The first connect registers it PENDING_ACTIVATION and is closed.
        assert!(self.connect(&tls, device).await.is_none());
        let event = self.registered.recv_timeout(WAIT).unwrap();
        assert_eq!(event["certificateId"], certificate_id.as_str());
        let arn = format!("arn:aws:iot:us-east-1:123456789012:cert/{certificate_id}");
        // A rotation's second certificate finds the Thing there.
        match self.iot.create_thing().thing_name(device).send().await {
            Ok(_) => {}
            Err(e)
                if e.as_service_error()
                    .is_some_and(|e| e.is_resource_already_exists_exception()) => {}
            Err(e) => panic!("CreateThing {device}: {e:?}"),
        }
        self.iot
            .attach_policy()
            .policy_name(POLICY)
            .target(&arn)
            .send()
            .await
            .unwrap();
        self.iot
            .attach_thing_principal()
            .thing_name(device)
            .principal(&arn)
            .send()
            .await
            .unwrap();
        self.set_status(&certificate_id, CertificateStatus::Active)
            .await;
        Identity {
            id: certificate_id,
            tls,
        }
    }

    async fn set_status(&self, certificate_id: &str, status: CertificateStatus) {
        self.iot
            .update_certificate()
            .certificate_id(certificate_id)
            .new_status(status)
            .send()
            .await
            .unwrap();
    }

    async fn connect(&self, tls: &ClientTls, device: &str) -> Option<MqttClient> {
        MqttClient::connect(self.endpoint.addr(), Arc::clone(tls), device)
            .await
            .ok()
    }

    /// Connects `identity` as `device` (accepted), waits until the rule has handled the
    /// `count`th event, and checks that this one was put; the time bounds of the connection.
    async fn connects(&self, identity: &Identity, device: &str, count: usize) -> (i64, i64) {
        let before = now_ms();
        let client = self.connect(&identity.tls, device).await;
        assert!(client.is_some(), "{device} was refused");
        let deliveries = self.rule.wait_for(count, WAIT).await.unwrap();
        let after = now_ms();
        assert_eq!(deliveries.len(), count, "{deliveries:?}");
        let last = deliveries.last().unwrap();
        assert_eq!(
            last.topic,
            format!("$aws/events/presence/connected/{device}")
        );
        assert_eq!(last.result, Ok(()), "{last:?}");
        drop(client);
        (before, after)
    }

    fn presence(&self) -> DynamoPresence {
        DynamoPresence::new(&self.sdk, TABLE)
    }
}

fn by_certificate(connections: &[Connection]) -> HashMap<&str, i64> {
    connections
        .iter()
        .map(|c| (c.certificate_id.as_str(), c.connected_at))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_accepted_connect_is_recorded_per_device_and_certificate() {
    let w = world().await;
    let presence = w.presence();
    let (d1, d2) = ("d1", "d2");

    // Registered by the first connect, then activated: the refused first connect recorded
    // nothing, and a device that never connected has no records.
    let old = w.activated(d1).await;
    assert!(w.rule.deliveries().is_empty());
    assert!(presence.device(d1, deadline()).await.unwrap().is_empty());
    assert!(presence.all(deadline()).await.unwrap().is_empty());

    // An accepted connect: one record, the certificate the device presented, the time.
    let (before, after) = w.connects(&old, d1, 1).await;
    let records = presence.device(d1, deadline()).await.unwrap();
    assert_eq!(records.len(), 1, "{records:?}");
    assert_eq!(records[0].certificate_id, old.id);
    let first_at = records[0].connected_at;
    assert!(
        (before..=after).contains(&first_at),
        "{first_at} not in {before}..={after}"
    );

    // A rotation's successor connects: a second record beside the first, and the last one.
    let new = w.activated(d1).await;
    assert_ne!(new.id, old.id);
    tokio::time::sleep(Duration::from_millis(5)).await;
    w.connects(&new, d1, 2).await;
    let records = presence.device(d1, deadline()).await.unwrap();
    let times = by_certificate(&records);
    assert_eq!(records.len(), 2, "{records:?}");
    assert_eq!(times[old.id.as_str()], first_at);
    assert!(times[new.id.as_str()] > first_at);
    assert_eq!(last_connected(&records).unwrap().certificate_id, new.id);

    // The old certificate reconnects: its record's time moves, no third record.
    tokio::time::sleep(Duration::from_millis(5)).await;
    let (before, _) = w.connects(&old, d1, 3).await;
    let records = presence.device(d1, deadline()).await.unwrap();
    let times = by_certificate(&records);
    assert_eq!(records.len(), 2, "{records:?}");
    assert!(times[old.id.as_str()] >= before);
    assert!(times[old.id.as_str()] > times[new.id.as_str()]);
    assert_eq!(last_connected(&records).unwrap().certificate_id, old.id);
    let new_at = times[new.id.as_str()];

    // A revoked certificate is refused and records nothing.
    w.set_status(&new.id, CertificateStatus::Revoked).await;
    assert!(w.connect(&new.tls, d1).await.is_none());
    assert!(w.endpoint.seen().iter().any(|(_, s)| matches!(
        s,
        Seen::Refused { client_id, reason } if client_id == d1 && reason.contains("Revoked")
    )));
    // Another device's connect: the only event after the refusal.
    let other = w.activated(d2).await;
    w.connects(&other, d2, 4).await;
    assert_eq!(w.rule.deliveries().len(), 4);

    // The whole table, by device.
    let all = presence.all(deadline()).await.unwrap();
    assert_eq!(all.len(), 2, "{all:?}");
    let d1_times = by_certificate(&all[d1]);
    assert_eq!(d1_times.len(), 2);
    assert_eq!(d1_times[new.id.as_str()], new_at);
    assert_eq!(
        d1_times[old.id.as_str()],
        by_certificate(&presence.device(d1, deadline()).await.unwrap())[old.id.as_str()]
    );
    assert_eq!(all[d2].len(), 1);
    assert_eq!(all[d2][0].certificate_id, other.id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_page_is_read_and_a_missing_table_is_named() {
    let w = world().await;
    // Records as the rule writes them, straight through the rule (no connection needed to
    // test paging): 3 devices, 7 records.
    let mut expected: HashMap<String, HashMap<String, i64>> = HashMap::new();
    for (n, (device, certificates)) in [("p1", 3_usize), ("p2", 1), ("p3", 3)]
        .into_iter()
        .enumerate()
    {
        for c in 0..certificates {
            let certificate_id = format!("{:064x}", n * 10 + c);
            let at = 1_700_000_000_000_i64 + i64::try_from(n * 10 + c).unwrap();
            w.rule
                .deliver(
                    format!("$aws/events/presence/connected/{device}"),
                    serde_json::json!({
                        "clientId": device, "timestamp": at, "eventType": "connected",
                        "principalIdentifier": certificate_id, "sessionIdentifier": "s",
                        "ipAddress": "127.0.0.1", "versionNumber": 1,
                    }),
                )
                .await;
            expected
                .entry(device.to_owned())
                .or_default()
                .insert(certificate_id, at);
        }
    }
    assert!(w.rule.deliveries().iter().all(|d| d.result.is_ok()));
    // A disconnected event is not the rule's: nothing written.
    w.rule
        .deliver(
            "$aws/events/presence/disconnected/p2".into(),
            serde_json::json!({"clientId": "p2", "timestamp": 1, "principalIdentifier": "x"}),
        )
        .await;
    assert_eq!(w.rule.deliveries().last().unwrap().item, None);

    // One item a page: every page of the scan and of the query is read.
    let presence = w.presence().with_page_size(1);
    let all = presence.all(deadline()).await.unwrap();
    let got: HashMap<String, HashMap<String, i64>> = all
        .iter()
        .map(|(d, cs)| {
            (
                d.clone(),
                cs.iter()
                    .map(|c| (c.certificate_id.clone(), c.connected_at))
                    .collect(),
            )
        })
        .collect();
    assert_eq!(got, expected);
    let p3 = presence.device("p3", deadline()).await.unwrap();
    assert_eq!(p3.len(), 3, "{p3:?}");

    // A table that is not there: not found, and the message names it.
    let missing = DynamoPresence::new(&w.sdk, "no-such-table");
    let error = missing.device("p1", deadline()).await.unwrap_err();
    assert!(error.is_not_found(), "{error:?}");
    assert!(
        ::iot::error_chain(&error).contains("no-such-table"),
        "{}",
        ::iot::error_chain(&error)
    );
    let error = missing.all(deadline()).await.unwrap_err();
    assert!(error.is_not_found(), "{error:?}");
}
