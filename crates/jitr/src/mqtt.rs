//! A device's MQTT connect, for real: MQTT 3.1.1 CONNECT over TLS, presenting the device's
//! whole chain, as a balena device does against AWS IoT, and optionally one message.
//!
//! Packets are rumqttc's MQTT 3.1.1 codec; TLS is tokio-rustls on aws-lc-rs, the workspace's
//! one crypto stack. rumqttc's own TLS features are off because they pull in `ring` (through
//! rustls-webpki 0.102's default features) and a second webpki; its event loop is not needed
//! to send one CONNECT and read one CONNACK.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use bytes::BytesMut;
use rumqttc::mqttbytes::v4::{ConnAck, Connect, ConnectReturnCode, Packet, Publish};
use rumqttc::mqttbytes::QoS;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// The MQTT-over-TLS port.
pub(crate) const MQTT_TLS_PORT: u16 = 8883;
/// AWS IoT serves MQTT on 443 to clients that ask for this ALPN protocol.
const AWS_IOT_ALPN: &[u8] = b"x-amzn-mqtt-ca";
/// Largest packet accepted from the broker (a CONNACK is 4 bytes).
const MAX_PACKET: usize = 64 * 1024;
/// Keep-alive announced in CONNECT; the session ends right after CONNACK anyway.
const KEEP_ALIVE_SECS: u16 = 30;

/// Where the broker is: `HOST[:PORT]`, `[v6]:PORT` for IPv6 literals.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Endpoint {
    /// Host name or IP address (what the server certificate must name).
    pub(crate) host: String,
    /// TCP port.
    pub(crate) port: u16,
}

impl Endpoint {
    /// `clap` value parser.
    pub(crate) fn parse(value: &str) -> Result<Endpoint, String> {
        let bad = || {
            format!("{value:?}: expected HOST or HOST:PORT (e.g. abc-ats.iot.eu-west-1.amazonaws.com:8883)")
        };
        if value.contains("://") || value.contains('/') || value.is_empty() {
            return Err(bad());
        }
        let (host, port) = if let Some(rest) = value.strip_prefix('[') {
            let (host, after) = rest.split_once(']').ok_or_else(bad)?;
            match after.strip_prefix(':') {
                Some(port) => (host, Some(port)),
                None if after.is_empty() => (host, None),
                None => return Err(bad()),
            }
        } else {
            match value.split_once(':') {
                Some((host, port)) => (host, Some(port)),
                None => (value, None),
            }
        };
        let port = match port {
            None => MQTT_TLS_PORT,
            Some(p) => p.parse::<u16>().ok().filter(|p| *p != 0).ok_or_else(bad)?,
        };
        ServerName::try_from(host).map_err(|_| bad())?;
        Ok(Endpoint {
            host: host.to_owned(),
            port,
        })
    }
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// The certificates in a PEM file, in order.
pub(crate) fn read_certificates(path: &std::path::Path) -> Result<Vec<CertificateDer<'static>>> {
    let pem = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("{}: not a PEM certificate file", path.display()))?;
    if certs.is_empty() {
        bail!("{}: no certificate in it", path.display());
    }
    Ok(certs)
}

/// The TLS client configuration of a device: its chain and key, and the roots it trusts.
pub(crate) fn tls_config(
    chain: Vec<CertificateDer<'static>>,
    key_path: &std::path::Path,
    server_ca: Option<Vec<CertificateDer<'static>>>,
    endpoint: &Endpoint,
) -> Result<Arc<rustls::ClientConfig>> {
    let key = PrivateKeyDer::from_pem_file(key_path)
        .with_context(|| format!("{}: not a PEM private key", key_path.display()))?;
    let mut roots = rustls::RootCertStore::empty();
    match server_ca {
        Some(certs) => {
            for cert in certs {
                roots
                    .add(cert)
                    .context("--server-ca: a certificate rustls cannot use as a trust anchor")?;
            }
        }
        None => {
            let native = rustls_native_certs::load_native_certs();
            let (added, _) = roots.add_parsable_certificates(native.certs);
            if added == 0 {
                bail!("no trusted root certificates found on this system: give --server-ca FILE");
            }
        }
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .context("the certificate and the key do not go together")?;
    if endpoint.port == 443 {
        config.alpn_protocols = vec![AWS_IOT_ALPN.to_vec()];
    }
    Ok(Arc::new(config))
}

/// How one connection attempt ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Attempt {
    /// CONNACK accepted the connection (at `connack`), and the message, if any, was
    /// acknowledged; it was then closed cleanly.
    Connected {
        /// When the accepting CONNACK arrived.
        connack: tokio::time::Instant,
    },
    /// Connected, but the broker closed the connection instead of acknowledging the message:
    /// the device's policy does not allow the topic (AWS IoT disconnects such a client).
    PublishRefused(String),
    /// The broker turned the device away: TLS alert, connection closed, or CONNACK refusal.
    /// AWS IoT does this while a JITR certificate is still pending activation.
    Refused(String),
    /// No connection to speak of: DNS, TCP, or no answer in time.
    Unreachable(String),
    /// Retrying cannot help: the broker's own certificate is not trusted.
    Fatal(String),
}

/// A message to publish once connected: topic and payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Message {
    /// The topic.
    pub(crate) topic: String,
    /// The payload.
    pub(crate) payload: String,
}

/// One MQTT CONNECT over a new TLS connection (then the message, QoS 1, if any), bounded by
/// `timeout`.
pub(crate) async fn attempt(
    endpoint: &Endpoint,
    config: Arc<rustls::ClientConfig>,
    client_id: &str,
    message: Option<&Message>,
    timeout: Duration,
) -> Attempt {
    match tokio::time::timeout(timeout, connect(endpoint, config, client_id, message)).await {
        Ok(attempt) => attempt,
        Err(_) => Attempt::Unreachable(format!("no answer within {}s", timeout.as_secs_f32())),
    }
}

async fn connect(
    endpoint: &Endpoint,
    config: Arc<rustls::ClientConfig>,
    client_id: &str,
    message: Option<&Message>,
) -> Attempt {
    let tcp = match TcpStream::connect((endpoint.host.as_str(), endpoint.port)).await {
        Ok(tcp) => tcp,
        Err(e) => return Attempt::Unreachable(format!("TCP connect: {e}")),
    };
    let _ = tcp.set_nodelay(true);
    let Ok(server_name) = ServerName::try_from(endpoint.host.clone()) else {
        return Attempt::Fatal(format!("{} is not a valid server name", endpoint.host));
    };
    let mut tls = match TlsConnector::from(config).connect(server_name, tcp).await {
        Ok(tls) => tls,
        Err(e) => return classify(&e, "TLS handshake"),
    };

    let mut connect = Connect::new(client_id);
    connect.keep_alive = KEEP_ALIVE_SECS;
    let mut out = BytesMut::new();
    if let Err(e) = Packet::Connect(connect).write(&mut out, MAX_PACKET) {
        return Attempt::Fatal(format!("cannot encode CONNECT: {e}"));
    }
    if let Err(e) = send(&mut tls, &out).await {
        return classify(&e, "sending CONNECT");
    }

    let mut incoming = BytesMut::with_capacity(64);
    let ack = match next_packet(&mut tls, &mut incoming, "CONNACK").await {
        Ok(Packet::ConnAck(ack)) => ack,
        Ok(other) => {
            return Attempt::Refused(format!("expected CONNACK, the broker sent {other:?}"))
        }
        Err(attempt) => return attempt,
    };
    match ack {
        ConnAck {
            code: ConnectReturnCode::Success,
            ..
        } => {
            let connack = tokio::time::Instant::now();
            if let Some(message) = message {
                if let Err(refused) = publish(&mut tls, &mut incoming, message).await {
                    return refused;
                }
            }
            // A clean goodbye: DISCONNECT, then TLS close_notify. Failures here change nothing.
            let mut out = BytesMut::new();
            if Packet::Disconnect.write(&mut out, MAX_PACKET).is_ok() {
                let _ = send(&mut tls, &out).await;
            }
            let _ = tls.shutdown().await;
            Attempt::Connected { connack }
        }
        ConnAck { code, .. } => Attempt::Refused(format!("CONNACK refused: {code:?}")),
    }
}

/// Publishes `message` with QoS 1 and waits for its PUBACK; a broker that closes the
/// connection instead refused it.
async fn publish(
    tls: &mut tokio_rustls::client::TlsStream<TcpStream>,
    incoming: &mut BytesMut,
    message: &Message,
) -> Result<(), Attempt> {
    let mut publish = Publish::new(&message.topic, QoS::AtLeastOnce, message.payload.as_bytes());
    publish.pkid = 1;
    let mut out = BytesMut::new();
    Packet::Publish(publish)
        .write(&mut out, MAX_PACKET)
        .map_err(|e| Attempt::Fatal(format!("cannot encode PUBLISH: {e}")))?;
    send(tls, &out)
        .await
        .map_err(|e| Attempt::PublishRefused(format!("sending PUBLISH: {e}")))?;
    loop {
        match next_packet(tls, incoming, "PUBACK").await {
            Ok(Packet::PubAck(ack)) if ack.pkid == 1 => return Ok(()),
            // Messages for the device's own subscriptions may come first.
            Ok(_) => {}
            Err(_) => {
                return Err(Attempt::PublishRefused(format!(
                    "the broker closed the connection instead of acknowledging the message to {} (the device policy does not allow that topic, or another connection took this client id: AWS IoT keeps one per id)",
                    message.topic
                )))
            }
        }
    }
}

/// The next packet from the broker; the connection's end is a refusal.
async fn next_packet(
    tls: &mut tokio_rustls::client::TlsStream<TcpStream>,
    incoming: &mut BytesMut,
    waiting_for: &str,
) -> Result<Packet, Attempt> {
    loop {
        match Packet::read(incoming, MAX_PACKET) {
            Ok(packet) => return Ok(packet),
            Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => {}
            Err(e) => {
                return Err(Attempt::Refused(format!(
                    "unreadable packet while waiting for {waiting_for}: {e}"
                )))
            }
        }
        match tls.read_buf(incoming).await {
            Ok(0) => {
                return Err(Attempt::Refused(format!(
                    "connection closed before {waiting_for}"
                )))
            }
            Ok(_) => {}
            Err(e) => return Err(classify(&e, &format!("waiting for {waiting_for}"))),
        }
    }
}

async fn send(
    tls: &mut tokio_rustls::client::TlsStream<TcpStream>,
    bytes: &[u8],
) -> std::io::Result<()> {
    tls.write_all(bytes).await?;
    tls.flush().await
}

/// Sorts an I/O error of the TLS connection into refused (the broker said no), fatal (we
/// do not trust the broker) or unreachable.
fn classify(e: &std::io::Error, during: &str) -> Attempt {
    use std::io::ErrorKind;
    if let Some(tls) = e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    {
        return match tls {
            rustls::Error::AlertReceived(alert) => {
                Attempt::Refused(format!("TLS alert from the broker: {alert:?}"))
            }
            rustls::Error::InvalidCertificate(_) => Attempt::Fatal(format!(
                "the broker's certificate is not trusted ({tls}); check --server-ca"
            )),
            other => Attempt::Refused(format!("{during}: {other}")),
        };
    }
    match e.kind() {
        ErrorKind::ConnectionReset
        | ErrorKind::ConnectionAborted
        | ErrorKind::BrokenPipe
        | ErrorKind::UnexpectedEof => {
            Attempt::Refused(format!("{during}: connection closed by the broker"))
        }
        _ => Attempt::Unreachable(format!("{during}: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_default_to_port_8883() {
        let e = Endpoint::parse("abc-ats.iot.eu-west-1.amazonaws.com").unwrap();
        assert_eq!(e.port, 8883);
        assert_eq!(e.to_string(), "abc-ats.iot.eu-west-1.amazonaws.com:8883");
        let e = Endpoint::parse("127.0.0.1:18883").unwrap();
        assert_eq!((e.host.as_str(), e.port), ("127.0.0.1", 18883));
        let e = Endpoint::parse("[::1]:443").unwrap();
        assert_eq!((e.host.as_str(), e.port), ("::1", 443));
        assert_eq!(e.to_string(), "[::1]:443");
        for bad in [
            "",
            "mqtts://host",
            "host:0",
            "host:x",
            "host/path",
            "[::1",
            "a b",
        ] {
            assert!(Endpoint::parse(bad).is_err(), "{bad}");
        }
    }
}
