//! A local stand-in for AWS IoT Core's MQTT data plane, which moto lacks: what a device meets
//! on its first connect.
//!
//! [`IotEndpoint`] listens with TLS on `127.0.0.1` (a server certificate for `localhost` and
//! `127.0.0.1` from a test root, [`IotEndpoint::server_ca_pem`]) and requires a client
//! certificate chaining to one of the CAs it was given (the ones registered in moto). Then, on
//! MQTT 3.1.1 CONNECT, it does what AWS IoT does with Just-In-Time Registration:
//! - an unknown certificate is registered PENDING_ACTIVATION in moto under its CA, the
//!   certificate-registered event is published (handed to the sink, as the topic rule hands it
//!   to the Lambda) and the connection is closed;
//! - a pending one publishes the event again and is closed; an INACTIVE or REVOKED one is closed;
//! - an ACTIVE one is judged by its attached policies (read from moto): `iot:Connect` on
//!   `client/<client id>` with the Thing variables (the client id's Thing attached to the
//!   certificate) expanded; refused ones are closed, as AWS IoT closes them.
//!
//! Connected clients may PUBLISH (`iot:Publish` on `topic/<topic>`; a forbidden one disconnects
//! the client, as AWS IoT does), SUBSCRIBE (`iot:Subscribe` on `topicfilter/<filter>`; refused
//! filters get a failure code) and receive what others publish (`iot:Receive`). Packets are
//! rumqttc's MQTT 3.1.1 codec; TLS is rustls. Everything seen is recorded ([`Seen`]).
//!
//! A client id is one session: a newer connection with the same id ends the older
//! ([`Seen::TakenOver`]), as AWS IoT does.
//!
//! With [`EndpointOptions::presence`], every accepted connection (once CONNACK is sent) also
//! publishes AWS IoT's lifecycle event on `$aws/events/presence/connected/<client id>`, handed
//! to the presence sink as the stack's presence topic rule receives it
//! ([`crate::presence::PresenceRule`] runs that rule into a DynamoDB table).

pub mod client;
mod policy;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use aws_sdk_iot::types::CertificateStatus;
use bytes::BytesMut;
use futures::future::BoxFuture;
use rumqttc::mqttbytes::v4::{
    ConnAck, ConnectReturnCode, Packet, PubAck, Publish, SubAck, SubscribeReasonCode,
};
use rumqttc::mqttbytes::QoS;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

pub use client::{MqttClient, Next};
pub use policy::{Context as PolicyContext, Policies};

use crate::server::BackgroundServer;

/// The account and region of the ARNs policies are evaluated against (moto's).
const ARN_PREFIX: &str = "arn:aws:iot:us-east-1:123456789012";
/// The largest MQTT packet accepted.
const MAX_PACKET: usize = 128 * 1024;
/// How long a client may take to send CONNECT after the TLS handshake.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Where certificate-registered events go (the topic rule's Lambda action).
pub type EventSink = Box<dyn Fn(Value) + Send + Sync>;

/// Where lifecycle events go: called with the topic and the event, awaited in the connection's
/// task (so one connection's events are handed over in order).
pub type PresenceSink = Arc<dyn Fn(String, Value) -> BoxFuture<'static, ()> + Send + Sync>;

/// A client's TLS configuration, as [`client::tls_config`] makes it.
pub type ClientTls = Arc<rustls::ClientConfig>;

/// The topic AWS IoT publishes a client's connected events on.
pub const PRESENCE_CONNECTED_TOPIC: &str = "$aws/events/presence/connected";

/// What an endpoint does besides JITR and policy enforcement.
#[derive(Default)]
pub struct EndpointOptions {
    presence: Option<PresenceSink>,
}

impl std::fmt::Debug for EndpointOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EndpointOptions")
            .field("presence", &self.presence.is_some())
            .finish()
    }
}

impl EndpointOptions {
    /// Publishes a connected lifecycle event to `sink` on every accepted connection.
    pub fn presence(mut self, sink: PresenceSink) -> Self {
        self.presence = Some(sink);
        self
    }
}

/// One thing the endpoint saw happen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seen {
    /// An unknown certificate was registered PENDING_ACTIVATION and its event published.
    Registered {
        /// The certificate id.
        certificate_id: String,
    },
    /// A pending certificate connected again: its event published again, closed.
    StillPending {
        /// The certificate id.
        certificate_id: String,
    },
    /// A connection was refused (closed without CONNACK, or refused by it).
    Refused {
        /// The MQTT client id.
        client_id: String,
        /// Why.
        reason: String,
    },
    /// A client connected.
    Connected {
        /// The MQTT client id.
        client_id: String,
    },
    /// A client published; delivered to `receivers` subscribers.
    Published {
        /// The publisher.
        client_id: String,
        /// The topic.
        topic: String,
        /// The payload, as text.
        payload: String,
        /// How many subscribers got it.
        receivers: usize,
    },
    /// A client was disconnected because another connected with its client id: AWS IoT
    /// keeps the newer connection and drops the older (lifecycle `disconnectReason`
    /// `DUPLICATE_CLIENTID`).
    TakenOver {
        /// The client id both used.
        client_id: String,
    },
    /// A client was disconnected for a publish its policy does not allow.
    ForbiddenPublish {
        /// The publisher.
        client_id: String,
        /// The topic.
        topic: String,
    },
}

/// A running endpoint; dropping it closes its port and every connection.
pub struct IotEndpoint {
    server: BackgroundServer,
    shared: Arc<Shared>,
    server_ca_pem: String,
}

impl std::fmt::Debug for IotEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IotEndpoint")
            .field("addr", &self.addr())
            .finish_non_exhaustive()
    }
}

/// A CA certificates may chain to: its PEM, byte for byte as registered, and its id.
#[derive(Debug, Clone)]
pub struct RegisteredCa {
    /// The PEM (moto links a device certificate to its CA by comparing PEM text).
    pub pem: String,
    /// The caCertificateId.
    pub id: String,
}

struct Shared {
    client: aws_sdk_iot::Client,
    cas: Vec<(RegisteredCa, Vec<u8>)>,
    sink: EventSink,
    presence: Option<PresenceSink>,
    /// The last lifecycle event version number given, per client id.
    versions: Mutex<HashMap<String, u64>>,
    account: String,
    seen: Mutex<Vec<(Instant, Seen)>>,
    subscribers: Mutex<Vec<Subscriber>>,
    next_connection: AtomicU64,
    /// The live connection of each client id, and how to end it: a newer connection with
    /// the same id ends the older, as AWS IoT does ("If a client connects with a client ID
    /// that is already in use, the existing client is disconnected",
    /// https://docs.aws.amazon.com/iot/latest/developerguide/life-cycle-events.html).
    live: Mutex<HashMap<String, (u64, tokio::sync::oneshot::Sender<()>)>>,
}

/// A connection's subscription.
struct Subscriber {
    connection: u64,
    filter: String,
    policies: Arc<Policies>,
    context: PolicyContext,
    outbox: mpsc::UnboundedSender<Publish>,
}

impl Shared {
    fn record(&self, seen: Seen) {
        self.seen
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push((Instant::now(), seen));
    }

    fn subscribers(&self) -> MutexGuard<'_, Vec<Subscriber>> {
        self.subscribers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

impl IotEndpoint {
    /// Starts the endpoint: devices whose chains lead to one of `cas` may complete the TLS
    /// handshake; AWS IoT's state is read from and written to moto through `client`; events go
    /// to `sink`.
    pub fn start(
        client: aws_sdk_iot::Client,
        cas: Vec<RegisteredCa>,
        sink: EventSink,
    ) -> Result<IotEndpoint> {
        IotEndpoint::start_with(client, cas, sink, EndpointOptions::default())
    }

    /// [`IotEndpoint::start`] with `options`.
    pub fn start_with(
        client: aws_sdk_iot::Client,
        cas: Vec<RegisteredCa>,
        sink: EventSink,
        options: EndpointOptions,
    ) -> Result<IotEndpoint> {
        let (server_config, server_ca_pem) = tls_config(&cas)?;
        let cas = cas
            .into_iter()
            .map(|ca| {
                let der = factory_ca::certificates_from_pem_or_der(ca.pem.as_bytes())
                    .map_err(anyhow::Error::msg)?
                    .remove(0);
                Ok((ca, der))
            })
            .collect::<Result<Vec<_>>>()?;
        let shared = Arc::new(Shared {
            client,
            cas,
            sink,
            presence: options.presence,
            versions: Mutex::new(HashMap::new()),
            account: crate::moto::ACCOUNT_ID.to_owned(),
            seen: Mutex::new(Vec::new()),
            subscribers: Mutex::new(Vec::new()),
            next_connection: AtomicU64::new(0),
            live: Mutex::new(HashMap::new()),
        });
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server_config));
        let thread_shared = Arc::clone(&shared);
        let server = BackgroundServer::spawn("iot-endpoint", move |listener| {
            accept_loop(listener, acceptor, thread_shared)
        })?;
        Ok(IotEndpoint {
            server,
            shared,
            server_ca_pem,
        })
    }

    /// The address (always `127.0.0.1`).
    pub fn addr(&self) -> SocketAddr {
        self.server.addr()
    }

    /// The port devices connect to (AWS IoT's is 8883).
    pub fn port(&self) -> u16 {
        self.addr().port()
    }

    /// The root the server certificate chains to: what a device trusts as AWS's.
    pub fn server_ca_pem(&self) -> &str {
        &self.server_ca_pem
    }

    /// Everything seen so far, with when.
    pub fn seen(&self) -> Vec<(Instant, Seen)> {
        self.shared
            .seen
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

/// The server's TLS configuration: a fresh test root and a server certificate for
/// `localhost` and `127.0.0.1`; client certificates required, chaining to `cas`.
fn tls_config(cas: &[RegisteredCa]) -> Result<(rustls::ServerConfig, String)> {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, SanType};
    let root_key = KeyPair::generate()?;
    let mut root = CertificateParams::new(Vec::new())?;
    root.distinguished_name
        .push(DnType::CommonName, "testkit AWS IoT stand-in root");
    root.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let root_cert = root.self_signed(&root_key)?;
    let root_issuer = Issuer::new(root, root_key);
    let server_key = KeyPair::generate()?;
    let mut server = CertificateParams::new(vec!["localhost".to_owned()])?;
    server
        .subject_alt_names
        .push(SanType::IpAddress([127, 0, 0, 1].into()));
    let server_cert = server.signed_by(&server_key, &root_issuer)?;

    let mut roots = rustls::RootCertStore::empty();
    for ca in cas {
        for der in factory_ca::certificates_from_pem_or_der(ca.pem.as_bytes())
            .map_err(anyhow::Error::msg)?
        {
            roots.add(CertificateDer::from(der))?;
        }
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()
    .context("client certificate verifier")?;
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(
            vec![server_cert.der().clone()],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(server_key.serialize_der())),
        )?;
    Ok((config, root_cert.pem()))
}

async fn accept_loop(
    listener: TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    shared: Arc<Shared>,
) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let _ = stream.set_nodelay(true);
        let (acceptor, shared) = (acceptor.clone(), Arc::clone(&shared));
        tokio::spawn(async move {
            // A handshake that fails (no client certificate, an unknown CA) just closes.
            if let Ok(tls) = acceptor.accept(stream).await {
                serve(tls, &shared).await;
            }
        });
    }
}

/// What a connection knows once it is accepted.
struct Session {
    connection: u64,
    client_id: String,
    /// The certificate the client presented (its id).
    certificate_id: String,
    policies: Arc<Policies>,
    context: PolicyContext,
}

/// One connection, from CONNECT to close.
async fn serve(tls: tokio_rustls::server::TlsStream<TcpStream>, shared: &Shared) {
    let leaf = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|chain| chain.first())
        .map(|c| c.as_ref().to_vec());
    let peer = tls.get_ref().0.peer_addr().ok();
    let (mut reader, mut writer) = tokio::io::split(tls);
    let mut buffer = BytesMut::with_capacity(4096);
    let Ok(Some(Packet::Connect(connect))) =
        tokio::time::timeout(CONNECT_TIMEOUT, read_packet(&mut reader, &mut buffer)).await
    else {
        return;
    };
    let Some(leaf) = leaf else { return };
    let session = match admit(shared, &leaf, &connect.client_id).await {
        Ok(session) => session,
        Err(reason) => {
            shared.record(Seen::Refused {
                client_id: connect.client_id.clone(),
                reason,
            });
            // AWS IoT closes the connection without a CONNACK.
            let _ = writer.shutdown().await;
            return;
        }
    };
    // The newest accepted connection holds the client id from here on: the older is ended.
    let (kick, mut kicked) = tokio::sync::oneshot::channel::<()>();
    let older = shared
        .live
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .insert(session.client_id.clone(), (session.connection, kick));
    if let Some((_, older)) = older {
        let _ = older.send(());
    }
    if write_packet(
        &mut writer,
        Packet::ConnAck(ConnAck::new(ConnectReturnCode::Success, false)),
    )
    .await
    .is_err()
    {
        forget(shared, &session);
        return;
    }
    shared.record(Seen::Connected {
        client_id: session.client_id.clone(),
    });
    if let Some(presence) = &shared.presence {
        // AWS IoT sends no lifecycle events for client ids holding a wildcard.
        if !session.client_id.contains(['#', '+']) {
            let event = connected_event(shared, &session, peer);
            let topic = format!("{PRESENCE_CONNECTED_TOPIC}/{}", session.client_id);
            presence(topic, event).await;
        }
    }
    let (outbox, mut inbox) = mpsc::unbounded_channel::<Publish>();
    loop {
        tokio::select! {
            _ = &mut kicked => {
                shared.record(Seen::TakenOver {
                    client_id: session.client_id.clone(),
                });
                break;
            }
            packet = read_packet(&mut reader, &mut buffer) => {
                let Some(packet) = packet else { break };
                match handle(shared, &session, &outbox, packet) {
                    Reply::Send(reply) => {
                        if write_packet(&mut writer, reply).await.is_err() {
                            break;
                        }
                    }
                    Reply::Nothing => {}
                    Reply::Close => break,
                }
            }
            Some(publish) = inbox.recv() => {
                if write_packet(&mut writer, Packet::Publish(publish)).await.is_err() {
                    break;
                }
            }
        }
    }
    shared
        .subscribers()
        .retain(|s| s.connection != session.connection);
    forget(shared, &session);
    let _ = writer.shutdown().await;
}

/// Drops `session` from the live connections, unless a newer one holds its client id.
fn forget(shared: &Shared, session: &Session) {
    let mut live = shared.live.lock().unwrap_or_else(PoisonError::into_inner);
    if live
        .get(&session.client_id)
        .is_some_and(|(connection, _)| *connection == session.connection)
    {
        live.remove(&session.client_id);
    }
}

/// What AWS IoT decides on CONNECT for the certificate `leaf` and `client_id`.
async fn admit(shared: &Shared, leaf: &[u8], client_id: &str) -> Result<Session, String> {
    let certificate_id = factory_ca::certificate_id(leaf);
    let described = shared
        .client
        .describe_certificate()
        .certificate_id(&certificate_id)
        .send()
        .await;
    let description = match described {
        Ok(out) => out.certificate_description().cloned(),
        Err(e)
            if e.as_service_error()
                .is_some_and(|e| e.is_resource_not_found_exception()) =>
        {
            None
        }
        Err(e) => return Err(format!("DescribeCertificate: {e}")),
    };
    let Some(description) = description else {
        register(shared, leaf, &certificate_id).await?;
        shared.record(Seen::Registered {
            certificate_id: certificate_id.clone(),
        });
        return Err("certificate registered PENDING_ACTIVATION; connection closed".into());
    };
    match description.status() {
        Some(CertificateStatus::Active) => {}
        Some(CertificateStatus::PendingActivation) => {
            publish_event(shared, &certificate_id, description.ca_certificate_id());
            shared.record(Seen::StillPending {
                certificate_id: certificate_id.clone(),
            });
            return Err("certificate PENDING_ACTIVATION; connection closed".into());
        }
        other => return Err(format!("certificate is {other:?}")),
    }
    let arn = description.certificate_arn().unwrap_or_default().to_owned();
    let (policies, attached) = policies_of(shared, &arn, client_id).await?;
    let context = PolicyContext {
        client_id: client_id.to_owned(),
        attached,
    };
    if !policies.allows(
        "iot:Connect",
        &format!("{ARN_PREFIX}:client/{client_id}"),
        &context,
    ) {
        return Err(format!(
            "iot:Connect as client {client_id} not allowed (Thing attached: {attached})"
        ));
    }
    Ok(Session {
        connection: shared.next_connection.fetch_add(1, Ordering::Relaxed),
        client_id: client_id.to_owned(),
        certificate_id,
        policies: Arc::new(policies),
        context,
    })
}

/// JITR: the certificate registered under the CA that signed it, then its event published.
async fn register(shared: &Shared, leaf: &[u8], certificate_id: &str) -> Result<(), String> {
    let ca = shared
        .cas
        .iter()
        .find(|(_, ca_der)| {
            let inspection = factory_ca::inspect_device_certificate(
                leaf,
                &factory_ca::InspectOptions {
                    id_format: factory_ca::IdFormat::Any,
                    ca_der: Some(ca_der),
                    now: time::OffsetDateTime::now_utc(),
                    max_validity_days: None,
                },
            );
            inspection
                .findings
                .iter()
                .any(|f| f.check == factory_ca::Check::Issuer && f.ok)
        })
        .map(|(ca, _)| ca.clone())
        .ok_or("no registered CA signed the certificate")?;
    let pem = pem_of(leaf);
    shared
        .client
        .register_certificate()
        .certificate_pem(pem)
        .ca_certificate_pem(&ca.pem)
        .status(CertificateStatus::PendingActivation)
        .send()
        .await
        .map_err(|e| format!("RegisterCertificate: {e}"))?;
    publish_event(shared, certificate_id, Some(&ca.id));
    Ok(())
}

fn publish_event(shared: &Shared, certificate_id: &str, ca_id: Option<&str>) {
    let Some(ca_id) = ca_id else { return };
    let mut event = crate::iot::registered_event(certificate_id, ca_id);
    event["awsAccountId"] = Value::String(shared.account.clone());
    (shared.sink)(event);
}

/// The event AWS IoT publishes on `$aws/events/presence/connected/<client id>`, in the shape
/// of AWS IoT's documentation ("Lifecycle events"): for a client authenticated by an X.509
/// certificate, `principalIdentifier` is the certificate id; `timestamp` is epoch milliseconds;
/// `versionNumber` grows with each connection of the client id.
fn connected_event(shared: &Shared, session: &Session, peer: Option<SocketAddr>) -> Value {
    let version = {
        let mut versions = shared
            .versions
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let version = versions.entry(session.client_id.clone()).or_insert(0);
        *version += 1;
        *version
    };
    let now = time::OffsetDateTime::now_utc();
    let timestamp = i64::try_from(now.unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX);
    serde_json::json!({
        "clientId": session.client_id,
        "timestamp": timestamp,
        "eventType": "connected",
        "sessionIdentifier": format!("{:016x}-{:08x}", timestamp, session.connection),
        "principalIdentifier": session.certificate_id,
        "ipAddress": peer.map(|p| p.ip().to_string()).unwrap_or_default(),
        "versionNumber": version,
    })
}

fn pem_of(der: &[u8]) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut pem = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in b64.as_bytes().chunks(64) {
        pem.push_str(&String::from_utf8_lossy(line));
        pem.push('\n');
    }
    pem.push_str("-----END CERTIFICATE-----\n");
    pem
}

/// The certificate's attached policies and whether the client id's Thing is attached to it.
async fn policies_of(
    shared: &Shared,
    arn: &str,
    client_id: &str,
) -> Result<(Policies, bool), String> {
    let things = shared
        .client
        .list_principal_things()
        .principal(arn)
        .send()
        .await
        .map_err(|e| format!("ListPrincipalThings: {e}"))?;
    let attached = things.things().iter().any(|t| t == client_id);
    let listed = shared
        .client
        .list_attached_policies()
        .target(arn)
        .send()
        .await
        .map_err(|e| format!("ListAttachedPolicies: {e}"))?;
    let mut documents = Vec::new();
    for name in listed.policies().iter().filter_map(|p| p.policy_name()) {
        let policy = shared
            .client
            .get_policy()
            .policy_name(name)
            .send()
            .await
            .map_err(|e| format!("GetPolicy {name}: {e}"))?;
        documents.push(policy.policy_document().unwrap_or_default().to_owned());
    }
    Ok((
        Policies::parse(documents.iter().map(String::as_str)),
        attached,
    ))
}

/// What to do after one packet of a connected client.
enum Reply {
    Send(Packet),
    Nothing,
    /// Close the connection (a forbidden publish, a DISCONNECT).
    Close,
}

/// The reply to one packet of a connected client.
fn handle(
    shared: &Shared,
    session: &Session,
    outbox: &mpsc::UnboundedSender<Publish>,
    packet: Packet,
) -> Reply {
    match packet {
        Packet::PingReq => Reply::Send(Packet::PingResp),
        Packet::Disconnect => Reply::Close,
        Packet::Publish(publish) => {
            let resource = format!("{ARN_PREFIX}:topic/{}", publish.topic);
            if !session
                .policies
                .allows("iot:Publish", &resource, &session.context)
            {
                shared.record(Seen::ForbiddenPublish {
                    client_id: session.client_id.clone(),
                    topic: publish.topic,
                });
                return Reply::Close;
            }
            let receivers = relay(shared, &publish, &resource);
            shared.record(Seen::Published {
                client_id: session.client_id.clone(),
                topic: publish.topic.clone(),
                payload: String::from_utf8_lossy(&publish.payload).into_owned(),
                receivers,
            });
            if publish.qos == QoS::AtMostOnce {
                Reply::Nothing
            } else {
                Reply::Send(Packet::PubAck(PubAck::new(publish.pkid)))
            }
        }
        Packet::Subscribe(subscribe) => {
            let codes = subscribe
                .filters
                .iter()
                .map(|f| {
                    let resource = format!("{ARN_PREFIX}:topicfilter/{}", f.path);
                    if session
                        .policies
                        .allows("iot:Subscribe", &resource, &session.context)
                    {
                        shared.subscribers().push(Subscriber {
                            connection: session.connection,
                            filter: f.path.clone(),
                            policies: Arc::clone(&session.policies),
                            context: session.context.clone(),
                            outbox: outbox.clone(),
                        });
                        SubscribeReasonCode::Success(QoS::AtMostOnce)
                    } else {
                        SubscribeReasonCode::Failure
                    }
                })
                .collect();
            Reply::Send(Packet::SubAck(SubAck::new(subscribe.pkid, codes)))
        }
        _ => Reply::Nothing,
    }
}

/// Hands a publish to every subscriber whose filter matches and whose policy lets it
/// receive; how many got it.
fn relay(shared: &Shared, publish: &Publish, resource: &str) -> usize {
    let subscribers = shared.subscribers();
    let mut delivered = 0;
    let mut done = HashMap::new();
    for s in subscribers.iter() {
        if done.contains_key(&s.connection)
            || !filter_matches(&s.filter, &publish.topic)
            || !s.policies.allows("iot:Receive", resource, &s.context)
        {
            continue;
        }
        let copy = Publish::new(
            publish.topic.clone(),
            QoS::AtMostOnce,
            publish.payload.to_vec(),
        );
        if s.outbox.send(copy).is_ok() {
            delivered += 1;
            done.insert(s.connection, ());
        }
    }
    delivered
}

/// MQTT topic filter matching: `+` one level, `#` the rest.
pub(crate) fn filter_matches(filter: &str, topic: &str) -> bool {
    let mut levels = topic.split('/');
    for part in filter.split('/') {
        match part {
            "#" => return true,
            "+" => {
                if levels.next().is_none() {
                    return false;
                }
            }
            literal => {
                if levels.next() != Some(literal) {
                    return false;
                }
            }
        }
    }
    levels.next().is_none()
}

async fn read_packet<R: tokio::io::AsyncRead + Unpin>(
    reader: &mut R,
    buffer: &mut BytesMut,
) -> Option<Packet> {
    loop {
        match Packet::read(buffer, MAX_PACKET) {
            Ok(packet) => return Some(packet),
            Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => {}
            Err(_) => return None,
        }
        let mut chunk = [0u8; 4096];
        match reader.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buffer.extend_from_slice(&chunk[..n]),
        }
    }
}

async fn write_packet<W: tokio::io::AsyncWrite + Unpin>(
    writer: &mut W,
    packet: Packet,
) -> std::io::Result<()> {
    let mut out = BytesMut::new();
    packet
        .write(&mut out, MAX_PACKET)
        .map_err(|e| std::io::Error::other(format!("{e:?}")))?;
    writer.write_all(&out).await?;
    writer.flush().await
}

#[cfg(test)]
mod tests;
