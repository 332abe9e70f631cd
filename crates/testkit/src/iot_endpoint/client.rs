//! A plain MQTT 3.1.1 client over TLS for the other side of the stand-in: the application that
//! subscribes to what devices publish, and the stand-in's own tests. Devices themselves connect
//! with `jitr device connect`, Node's `aws-iot-device-sdk` or Python's `awsiotsdk`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use bytes::BytesMut;
use rumqttc::mqttbytes::v4::{Connect, ConnectReturnCode, Packet, Publish, Subscribe};
use rumqttc::mqttbytes::QoS;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::net::TcpStream;

use super::{read_packet, write_packet};

/// A TLS client configuration: `chain_pem` and `key_pem` presented, `server_ca_pem` trusted.
pub fn tls_config(
    chain_pem: &str,
    key_pem: &str,
    server_ca_pem: &str,
) -> Result<Arc<rustls::ClientConfig>> {
    let chain = CertificateDer::pem_slice_iter(chain_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .context("client certificate chain")?;
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).context("client key")?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(server_ca_pem.as_bytes()) {
        roots.add(cert.context("server CA")?)?;
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    Ok(Arc::new(
        rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)?,
    ))
}

/// What waiting for the next packet gave.
#[derive(Debug)]
pub enum Next {
    /// A packet.
    Packet(Packet),
    /// The server closed the connection.
    Closed,
    /// Nothing within the wait.
    Quiet,
}

/// One connected client.
pub struct MqttClient {
    tls: tokio_rustls::client::TlsStream<TcpStream>,
    buffer: BytesMut,
    next_pkid: u16,
}

impl std::fmt::Debug for MqttClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MqttClient").finish_non_exhaustive()
    }
}

impl MqttClient {
    /// TLS to `addr` (server name `localhost`), then CONNECT as `client_id`: the client once
    /// CONNACK accepts, or why not (the stand-in closes instead of refusing, as AWS IoT does).
    pub async fn connect(
        addr: SocketAddr,
        config: Arc<rustls::ClientConfig>,
        client_id: &str,
    ) -> Result<MqttClient> {
        let tcp = TcpStream::connect(addr).await?;
        tcp.set_nodelay(true)?;
        let tls = tokio_rustls::TlsConnector::from(config)
            .connect(ServerName::try_from("localhost")?, tcp)
            .await
            .context("TLS handshake")?;
        let mut client = MqttClient {
            tls,
            buffer: BytesMut::new(),
            next_pkid: 1,
        };
        client
            .send(Packet::Connect(Connect::new(client_id)))
            .await?;
        match client.next(Duration::from_secs(10)).await {
            Next::Packet(Packet::ConnAck(ack)) if ack.code == ConnectReturnCode::Success => {
                Ok(client)
            }
            Next::Packet(other) => bail!("CONNECT refused: {other:?}"),
            Next::Closed => bail!("connection closed before CONNACK"),
            Next::Quiet => bail!("no CONNACK within 10 s"),
        }
    }

    /// Sends one packet.
    pub async fn send(&mut self, packet: Packet) -> Result<()> {
        write_packet(&mut self.tls, packet)
            .await
            .context("sending a packet")
    }

    /// The next packet from the server, waiting at most `wait`.
    pub async fn next(&mut self, wait: Duration) -> Next {
        match tokio::time::timeout(wait, read_packet(&mut self.tls, &mut self.buffer)).await {
            Ok(Some(packet)) => Next::Packet(packet),
            Ok(None) => Next::Closed,
            Err(_) => Next::Quiet,
        }
    }

    fn pkid(&mut self) -> u16 {
        let pkid = self.next_pkid;
        self.next_pkid = self.next_pkid.checked_add(1).unwrap_or(1);
        pkid
    }

    /// Subscribes to `filter`: whether the server granted it.
    pub async fn subscribe(&mut self, filter: &str) -> Result<bool> {
        let mut subscribe = Subscribe::new(filter, QoS::AtMostOnce);
        subscribe.pkid = self.pkid();
        let pkid = subscribe.pkid;
        self.send(Packet::Subscribe(subscribe)).await?;
        loop {
            match self.next(Duration::from_secs(10)).await {
                Next::Packet(Packet::SubAck(ack)) if ack.pkid == pkid => {
                    return Ok(ack.return_codes.iter().all(|c| {
                        !matches!(c, rumqttc::mqttbytes::v4::SubscribeReasonCode::Failure)
                    }))
                }
                Next::Packet(_) => {}
                Next::Closed => bail!("connection closed before SUBACK"),
                Next::Quiet => bail!("no SUBACK within 10 s"),
            }
        }
    }

    /// Publishes `payload` to `topic` with QoS 1 and waits for the PUBACK: `Ok(false)` when the
    /// server closed the connection instead (a topic the policy does not allow).
    pub async fn publish(&mut self, topic: &str, payload: &[u8]) -> Result<bool> {
        let mut publish = Publish::new(topic, QoS::AtLeastOnce, payload.to_vec());
        publish.pkid = self.pkid();
        let pkid = publish.pkid;
        self.send(Packet::Publish(publish)).await?;
        loop {
            match self.next(Duration::from_secs(10)).await {
                Next::Packet(Packet::PubAck(ack)) if ack.pkid == pkid => return Ok(true),
                Next::Packet(_) => {}
                Next::Closed => return Ok(false),
                Next::Quiet => bail!("no PUBACK within 10 s"),
            }
        }
    }
}
