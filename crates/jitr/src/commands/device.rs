//! `jitr device connect`: a device's first connect, retried with backoff until accepted.

use std::time::Duration;

use anyhow::{bail, Result};
use factory_ca::{inspect_device_certificate, IdFormat, InspectOptions};
use tokio::time::Instant;

use super::Outcome;
use crate::cli::DeviceConnectArgs;
use crate::mqtt::{self, Attempt};

/// The backoff ceiling after the first refused attempt; it doubles after each one. The wait is
/// drawn between half the ceiling and the ceiling, so a fleet refused together spreads out.
const FIRST_BACKOFF: Duration = Duration::from_millis(500);
/// The largest backoff ceiling.
const MAX_BACKOFF: Duration = Duration::from_secs(16);

/// A jittered wait under `ceiling`: between half of it and all of it.
fn jittered(ceiling: Duration) -> Duration {
    use std::hash::BuildHasher;
    let draw = std::collections::hash_map::RandomState::new().hash_one(ceiling);
    let fraction = 0.5 + 0.5 * ((draw >> 11) as f64 / (1u64 << 53) as f64);
    ceiling.mul_f64(fraction)
}
/// The longest one attempt (TCP, TLS, CONNECT, CONNACK) may take.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);

pub(crate) fn connect(args: DeviceConnectArgs) -> Result<Outcome> {
    let chain = mqtt::read_certificates(&args.cert)?;
    let client_id = client_id(&args, &chain)?;
    let server_ca = args
        .server_ca
        .as_deref()
        .map(mqtt::read_certificates)
        .transpose()?;
    let attempts = Attempts {
        config: mqtt::tls_config(chain, &args.key, server_ca, &args.endpoint)?,
        message: args.publish.as_ref().map(|p| mqtt::Message {
            topic: p[0].clone(),
            payload: p[1].clone(),
        }),
        endpoint: &args.endpoint,
        client_id: &client_id,
        json: args.output.json,
    };
    let endpoint = &args.endpoint;
    if !attempts.json {
        println!(
            "connecting to {endpoint} as {client_id} (MQTT 3.1.1 over TLS, deadline {}s)",
            args.deadline.as_secs()
        );
    }
    if args.client_id.is_none() {
        // AWS IoT keeps one connection per client id: a second drops the first.
        eprintln!(
            "jitr: note: AWS IoT keeps one connection per client id: if device {client_id} is running, this connection disconnects it until it reconnects; --client-id uses another id (the policy must allow it)"
        );
    }
    let mut report = Report::default();
    let ending = crate::aws::runtime()?.block_on(attempts.run(&mut report, args.deadline));
    if attempts.json {
        println!(
            "{}",
            report.json(endpoint, &client_id, attempts.message.as_ref(), ending)
        );
    }
    let connected = match ending {
        Ending::Connected => true,
        Ending::Deadline => {
            eprintln!(
                "jitr: not connected to {endpoint} within {}s ({} attempt(s))",
                args.deadline.as_secs(),
                report.attempts.len()
            );
            false
        }
        Ending::PublishRefused => bail!("the message was refused: retrying cannot help"),
        Ending::Hopeless => bail!("not connected to {endpoint}: retrying cannot help"),
    };
    Ok(if connected {
        Outcome::Success
    } else {
        Outcome::Failed
    })
}

/// `--client-id`, else the device id: the leaf's CN (the first certificate of the chain).
fn client_id(
    args: &DeviceConnectArgs,
    chain: &[rustls::pki_types::CertificateDer<'_>],
) -> Result<String> {
    if let Some(id) = &args.client_id {
        return Ok(id.clone());
    }
    let leaf = chain.first().map(|c| c.as_ref()).unwrap_or_default();
    let opts = InspectOptions {
        id_format: IdFormat::Any,
        ca_der: None,
        now: time::OffsetDateTime::now_utc(),
        max_validity_days: None,
    };
    match inspect_device_certificate(leaf, &opts).device_id {
        Some(id) => Ok(id.to_string()),
        None => bail!(
            "{}: the certificate's CN is not a device id; give --client-id",
            args.cert.display()
        ),
    }
}

/// What every attempt of one `device connect` shares.
struct Attempts<'a> {
    config: std::sync::Arc<rustls::ClientConfig>,
    message: Option<mqtt::Message>,
    endpoint: &'a mqtt::Endpoint,
    client_id: &'a str,
    json: bool,
}

impl Attempts<'_> {
    /// Attempts until one is accepted, retrying cannot help, or `within` has passed, with a
    /// jittered backoff between them; each attempt is a line of `report`.
    async fn run(&self, report: &mut Report, within: Duration) -> Ending {
        let start = Instant::now();
        let deadline = start + within;
        let mut backoff = FIRST_BACKOFF;
        loop {
            let (mut line, ending) = self.one(report, start, deadline).await;
            let wait = jittered(backoff);
            let retry = ending.is_none() && Instant::now() + wait < deadline;
            if retry {
                line.wait = Some(wait);
            }
            if !self.json {
                println!(
                    "{}",
                    line.text(self.message.as_ref(), report.connected_after)
                );
            }
            report.attempts.push(line);
            if let Some(ending) = ending {
                return ending;
            }
            if !retry {
                return Ending::Deadline;
            }
            tokio::time::sleep(wait).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    /// One attempt: its line, and how the attempts end if this one ends them.
    async fn one(
        &self,
        report: &mut Report,
        start: Instant,
        deadline: Instant,
    ) -> (AttemptLine, Option<Ending>) {
        let remaining = deadline.saturating_duration_since(Instant::now());
        let timeout = remaining.min(ATTEMPT_TIMEOUT).max(Duration::from_secs(1));
        let began = start.elapsed();
        let result = mqtt::attempt(
            self.endpoint,
            self.config.clone(),
            self.client_id,
            self.message.as_ref(),
            timeout,
        )
        .await;
        let (kind, detail, ending) = match result {
            Attempt::Connected { connack } => {
                report.connected_after = Some(connack.duration_since(start));
                ("connected", String::new(), Some(Ending::Connected))
            }
            Attempt::PublishRefused(why) => ("publish-refused", why, Some(Ending::PublishRefused)),
            Attempt::Refused(why) => ("refused", why, None),
            Attempt::Unreachable(why) => ("failed", why, None),
            Attempt::Fatal(why) => ("failed", why, Some(Ending::Hopeless)),
        };
        let line = AttemptLine {
            attempt: report.attempts.len() + 1,
            began,
            result: kind,
            detail,
            wait: None,
        };
        (line, ending)
    }
}

/// How the attempts ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ending {
    /// Accepted (and the message acknowledged).
    Connected,
    /// The deadline came first.
    Deadline,
    /// Connected, but the message was refused: retrying cannot help.
    PublishRefused,
    /// A failure retrying cannot help (an untrusted broker certificate, a bad name).
    Hopeless,
}

impl Ending {
    fn as_str(self) -> &'static str {
        match self {
            Ending::Connected => "connected",
            Ending::Deadline => "deadline",
            Ending::PublishRefused => "publish-refused",
            Ending::Hopeless => "failed",
        }
    }
}

/// One attempt, as reported.
#[derive(Debug)]
struct AttemptLine {
    attempt: usize,
    /// From the first attempt's start.
    began: Duration,
    result: &'static str,
    detail: String,
    /// The backoff before the next attempt, if there is one.
    wait: Option<Duration>,
}

impl AttemptLine {
    fn text(&self, message: Option<&mqtt::Message>, connected_after: Option<Duration>) -> String {
        let n = self.attempt;
        let retry = self
            .wait
            .map(|w| format!("; retrying in {:.2}s", w.as_secs_f64()))
            .unwrap_or_default();
        match self.result {
            "connected" => {
                let after = connected_after.unwrap_or_default().as_secs_f64();
                match message {
                    Some(m) => format!(
                        "attempt {n}: connected ({after:.2}s), published to {}",
                        m.topic
                    ),
                    None => format!("attempt {n}: connected ({after:.2}s)"),
                }
            }
            "publish-refused" => format!("attempt {n}: connected, then {}", self.detail),
            kind => format!("attempt {n}: {kind} ({}){retry}", self.detail),
        }
    }
}

/// Every attempt, for `--json`.
#[derive(Debug, Default)]
struct Report {
    attempts: Vec<AttemptLine>,
    /// From the first attempt's start to the accepting CONNACK.
    connected_after: Option<Duration>,
}

impl Report {
    fn json(
        &self,
        endpoint: &mqtt::Endpoint,
        client_id: &str,
        message: Option<&mqtt::Message>,
        ending: Ending,
    ) -> serde_json::Value {
        let ms = |d: Duration| (d.as_secs_f64() * 1e6).round() / 1e3;
        let attempts: Vec<_> = self
            .attempts
            .iter()
            .map(|a| {
                serde_json::json!({
                    "attempt": a.attempt,
                    "at_ms": ms(a.began),
                    "result": a.result,
                    "detail": a.detail,
                    "wait_ms": a.wait.map(ms),
                })
            })
            .collect();
        let backoff: Duration = self.attempts.iter().filter_map(|a| a.wait).sum();
        serde_json::json!({
            "endpoint": endpoint.to_string(),
            "client_id": client_id,
            "outcome": ending.as_str(),
            "connected_after_ms": self.connected_after.map(ms),
            "backoff_ms": ms(backoff),
            "published": message.map(|m| serde_json::json!({
                "topic": m.topic,
                "accepted": ending == Ending::Connected,
            })),
            "attempts": attempts,
        })
    }
}
