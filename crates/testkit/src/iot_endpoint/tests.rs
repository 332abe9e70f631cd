//! The stand-in against moto: JITR on first connect, policy on CONNECT and PUBLISH, relay.

use std::sync::mpsc;

use super::*;
use crate::certs::TestCa;
use crate::moto::MotoServer;

const POLICY: &str = "device";

/// A device's TLS client configuration: its chain and key, trusting the stand-in's root.
fn device_tls(ca: &TestCa, id: &str, server_ca: &str) -> Arc<rustls::ClientConfig> {
    let device = factory_ca::DeviceId::parse(id, factory_ca::IdFormat::Any).unwrap();
    let issued = ca
        .ca
        .issue_device(
            &device,
            factory_ca::KeyAlgorithm::P256,
            10,
            time::OffsetDateTime::now_utc(),
        )
        .unwrap();
    client::tls_config(
        &issued.chain_pem,
        issued.key_pem.as_ref().unwrap(),
        server_ca,
    )
    .unwrap()
}

/// Connects, or `None` when the stand-in closed instead.
async fn connect(
    endpoint: &IotEndpoint,
    config: Arc<rustls::ClientConfig>,
    client_id: &str,
) -> Option<MqttClient> {
    MqttClient::connect(endpoint.addr(), config, client_id)
        .await
        .ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_connect_registers_then_the_policy_decides_what_a_device_may_do() {
    let moto = tokio::task::spawn_blocking(MotoServer::start)
        .await
        .unwrap()
        .unwrap();
    let client = crate::iot::client(&moto).await;
    let ca = TestCa::new("endpoint test CA").unwrap();
    let ca_id = crate::iot::register_ca(&client, &ca.cert_pem)
        .await
        .unwrap();
    crate::iot::create_device_policy(&client, POLICY, "balena")
        .await
        .unwrap();
    let (events, received) = mpsc::channel::<Value>();
    let events = Mutex::new(events);
    let endpoint = IotEndpoint::start(
        client.clone(),
        vec![RegisteredCa {
            pem: ca.cert_pem.clone(),
            id: ca_id.clone(),
        }],
        Box::new(move |event| {
            let _ = events
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .send(event);
        }),
    )
    .unwrap();
    let (dev1, dev2) = ("d1", "d2");
    let tls1 = device_tls(&ca, dev1, endpoint.server_ca_pem());
    let tls2 = device_tls(&ca, dev2, endpoint.server_ca_pem());

    // First connect: registered PENDING_ACTIVATION, the event published, closed.
    assert!(connect(&endpoint, tls1.clone(), dev1).await.is_none());
    let event = received.recv_timeout(Duration::from_secs(5)).unwrap();
    assert_eq!(event["caCertificateId"], ca_id.as_str());
    let cert1 = event["certificateId"].as_str().unwrap().to_owned();
    assert_eq!(
        crate::iot::status(&client, &cert1).await.unwrap(),
        CertificateStatus::PendingActivation
    );
    // Still pending: the event again, closed again.
    assert!(connect(&endpoint, tls1.clone(), dev1).await.is_none());
    assert_eq!(
        received.recv_timeout(Duration::from_secs(5)).unwrap()["certificateId"],
        cert1.as_str()
    );

    // What the activator does, for both devices.
    let activate = |device: &'static str, certificate_id: String| {
        let client = client.clone();
        async move {
            let arn = format!("{ARN_PREFIX}:cert/{certificate_id}");
            client
                .create_thing()
                .thing_name(device)
                .send()
                .await
                .unwrap();
            client
                .attach_policy()
                .policy_name(POLICY)
                .target(&arn)
                .send()
                .await
                .unwrap();
            client
                .attach_thing_principal()
                .thing_name(device)
                .principal(&arn)
                .send()
                .await
                .unwrap();
            client
                .update_certificate()
                .certificate_id(&certificate_id)
                .new_status(CertificateStatus::Active)
                .send()
                .await
                .unwrap();
        }
    };
    activate(dev1, cert1).await;
    assert!(connect(&endpoint, tls2.clone(), dev2).await.is_none());
    let cert2 = received.recv_timeout(Duration::from_secs(5)).unwrap()["certificateId"]
        .as_str()
        .unwrap()
        .to_owned();
    activate(dev2, cert2).await;

    // The client id must be the attached Thing's name.
    assert!(connect(&endpoint, tls1.clone(), dev2).await.is_none());
    let mut one = connect(&endpoint, tls1.clone(), dev1).await.unwrap();
    let mut two = connect(&endpoint, tls2, dev2).await.unwrap();

    // Subscriptions inside the device's tree are granted, others refused.
    assert!(two.subscribe("balena/d2/#").await.unwrap());
    assert!(!two.subscribe("balena/d1/#").await.unwrap());
    // A message to its own tree is acknowledged and relayed; two's subscriber is itself.
    assert!(two.publish("balena/d2/sensors", b"21.5").await.unwrap());
    let relayed = two.next(Duration::from_secs(5)).await;
    assert!(
        matches!(&relayed, Next::Packet(Packet::Publish(p)) if p.topic == "balena/d2/sensors" && p.payload == "21.5"),
        "{relayed:?}"
    );
    // Another device's topic, or a bare one (cloud-relay's default), disconnects.
    assert!(
        !one.publish("balena/d2/sensors", b"x").await.unwrap(),
        "disconnected"
    );
    let mut one = connect(&endpoint, tls1, dev1).await.unwrap();
    assert!(!one.publish("sensors", b"x").await.unwrap(), "disconnected");
    let seen: Vec<Seen> = endpoint.seen().into_iter().map(|(_, s)| s).collect();
    for topic in ["balena/d2/sensors", "sensors"] {
        assert!(
            seen.contains(&Seen::ForbiddenPublish {
                client_id: dev1.into(),
                topic: topic.into()
            }),
            "{seen:?}"
        );
    }
    assert!(seen.iter().any(
        |s| matches!(s, Seen::Published { topic, receivers: 1, .. } if topic == "balena/d2/sensors")
    ));
}

#[test]
fn topic_filters_match_as_mqtt_says() {
    assert!(filter_matches("a/+/c", "a/b/c"));
    assert!(filter_matches("a/#", "a/b/c"));
    assert!(!filter_matches("a/+", "a/b/c"));
    assert!(!filter_matches("a/b", "a/b/c"));
    assert!(filter_matches("a/b/c", "a/b/c"));
}
