//! The [`FleetDirectory`] adapter over the balena API v7 (OData via pinejs), and the writes
//! jitr makes to balena devices: delivery variables ([`delivery`]) through [`BalenaClient`],
//! and the optional activation write-back (device tags, `JITR_BALENA_WRITE_BACK=tag`).

mod client;
pub mod delivery;

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use factory_ca::DeviceId;
use reqwest::StatusCode;
use serde::Deserialize;
use tokio::sync::OnceCell;
use tokio::time::Instant;

pub use client::{BalenaClient, BalenaError, DeviceField, Upserted};

use crate::config::{ApiKey, WriteBack};
use crate::{Cause, CertificateId, ConfigError, FleetDirectory, FleetError, FleetId, Membership};

/// How long one HTTP request to balena may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// 429 answers honoured (by waiting Retry-After) before giving up.
const MAX_RATE_LIMIT_WAITS: u32 = 3;
/// Time kept back from the deadline for the provisioning calls after the fleet check.
const DEADLINE_RESERVE: Duration = Duration::from_secs(3);
/// Time kept back from the deadline when writing tags back, so the invocation still answers.
const WRITE_BACK_RESERVE: Duration = Duration::from_secs(1);
/// Numeric device ids remembered between the fleet check and the write-back, at most.
const MAX_REMEMBERED_IDS: usize = 1024;
/// The tag holding the Thing name.
pub const TAG_THING: &str = "aws_iot_thing";
/// The tag holding the AWS IoT certificate id.
pub const TAG_CERTIFICATE_ID: &str = "aws_iot_certificate_id";

/// The HTTP client every balena call uses.
fn http_client() -> Result<reqwest::Client, ConfigError> {
    reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(3))
        .user_agent(concat!("jitr-activator/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| ConfigError::Http(Box::new(e)))
}

/// A 429's `Retry-After` in seconds (1 s when absent or unreadable).
fn retry_after(response: &reqwest::Response) -> Duration {
    response
        .headers()
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map_or(Duration::from_secs(1), Duration::from_secs)
}

/// Where the API key comes from.
#[derive(Debug)]
pub enum KeySource {
    /// The key itself.
    Literal(ApiKey),
    /// A Secrets Manager secret, fetched on first use and cached for the container's life.
    SecretsManager {
        client: aws_sdk_secretsmanager::Client,
        secret_id: String,
    },
}

/// Fleet membership from the balena API, pinned to one numeric fleet id.
#[derive(Debug)]
pub struct BalenaDirectory {
    http: reqwest::Client,
    request_timeout: Duration,
    api_url: String,
    fleet: FleetId,
    key_source: KeySource,
    key: OnceCell<ApiKey>,
    /// Set once the key has been shown to see the fleet: only then is an empty answer "not a member".
    fleet_visible: OnceCell<()>,
    /// What to record on the device once it is activated.
    write_back: WriteBack,
    /// Numeric ids of member devices (by UUID) from the fleet check, for the write-back.
    member_ids: Mutex<HashMap<String, u64>>,
}

#[derive(Debug, Deserialize)]
struct OData<T> {
    d: Vec<T>,
}

#[derive(Debug, Deserialize)]
struct DeviceRow {
    /// The numeric id, kept for the write-back (optional: membership never depends on it).
    #[serde(default)]
    id: Option<u64>,
    uuid: String,
    is_active: bool,
}

#[derive(Debug, Deserialize)]
struct ApplicationRow {
    id: u64,
}

impl BalenaDirectory {
    /// A directory for `fleet` at `api_url` (no trailing slash).
    pub fn new(api_url: &str, fleet: FleetId, key_source: KeySource) -> Result<Self, ConfigError> {
        let http = http_client()?;
        Ok(BalenaDirectory {
            http,
            request_timeout: REQUEST_TIMEOUT,
            api_url: api_url.trim_end_matches('/').to_owned(),
            fleet,
            key_source,
            key: OnceCell::new(),
            fleet_visible: OnceCell::new(),
            write_back: WriteBack::Off,
            member_ids: Mutex::new(HashMap::new()),
        })
    }

    /// The same directory recording activations on the device as `write_back` says.
    pub fn with_write_back(mut self, write_back: WriteBack) -> Self {
        self.write_back = write_back;
        self
    }

    /// The same directory with another per-request timeout (default 5 s).
    pub fn with_request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    async fn api_key(&self) -> Result<&ApiKey, FleetError> {
        self.key
            .get_or_try_init(|| async {
                match &self.key_source {
                    KeySource::Literal(key) => Ok(key.clone()),
                    KeySource::SecretsManager { client, secret_id } => {
                        let out = client
                            .get_secret_value()
                            .secret_id(secret_id)
                            .send()
                            .await
                            .map_err(|e| FleetError::Secret(Box::new(e)))?;
                        let text = out.secret_string().ok_or_else(|| {
                            FleetError::Secret("the secret has no SecretString".into())
                        })?;
                        Ok(ApiKey::new(secret_text_to_key(text)))
                    }
                }
            })
            .await
    }

    /// GET `path_and_query` with the key, honouring 429 Retry-After within the deadline.
    async fn get<T: for<'de> Deserialize<'de>>(
        &self,
        path_and_query: &str,
        deadline: Instant,
    ) -> Result<OData<T>, FleetError> {
        let key = self.api_key().await?;
        let url = format!("{}{path_and_query}", self.api_url);
        let mut waits = 0;
        loop {
            let remaining = deadline
                .saturating_duration_since(Instant::now())
                .saturating_sub(DEADLINE_RESERVE);
            if remaining.is_zero() {
                return Err(FleetError::Timeout);
            }
            let response = self
                .http
                .get(&url)
                .bearer_auth(key.expose())
                .timeout(remaining.min(self.request_timeout))
                .send()
                .await
                .map_err(|e| {
                    if e.is_timeout() {
                        FleetError::Timeout
                    } else {
                        FleetError::Transport(Box::new(e))
                    }
                })?;
            let status = response.status();
            match status {
                StatusCode::OK => {
                    let body = response.bytes().await.map_err(|e| {
                        if e.is_timeout() {
                            FleetError::Timeout
                        } else {
                            FleetError::Transport(Box::new(e))
                        }
                    })?;
                    return serde_json::from_slice(&body)
                        .map_err(|e| FleetError::Unparsable(Box::new(e)));
                }
                StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
                    return Err(FleetError::Unauthorized {
                        status: status.as_u16(),
                    })
                }
                StatusCode::TOO_MANY_REQUESTS => {
                    let retry_after = retry_after(&response);
                    waits += 1;
                    if waits > MAX_RATE_LIMIT_WAITS || retry_after >= remaining {
                        return Err(FleetError::RateLimited { retry_after });
                    }
                    tokio::time::sleep(retry_after).await;
                }
                other => {
                    return Err(FleetError::Status {
                        status: other.as_u16(),
                    })
                }
            }
        }
    }

    /// Proves once that the key can see the fleet, so that an empty device answer means
    /// "not a member" rather than "not visible to this key".
    async fn ensure_fleet_visible(&self, deadline: Instant) -> Result<(), FleetError> {
        self.fleet_visible
            .get_or_try_init(|| async {
                let path = format!("/v7/application({})?$select=id", self.fleet);
                let answer: OData<ApplicationRow> = self.get(&path, deadline).await?;
                if answer.d.iter().any(|row| row.id == self.fleet.get()) {
                    Ok(())
                } else {
                    Err(FleetError::FleetNotVisible {
                        fleet: self.fleet.to_string(),
                    })
                }
            })
            .await
            .map(|_| ())
    }
}

/// A secret holds the key as plain text or as JSON `{"BALENA_API_KEY": "..."}` / `{"apiKey": "..."}`.
fn secret_text_to_key(text: &str) -> String {
    if let Ok(serde_json::Value::Object(map)) = serde_json::from_str::<serde_json::Value>(text) {
        for name in ["BALENA_API_KEY", "apiKey", "api_key"] {
            if let Some(serde_json::Value::String(key)) = map.get(name) {
                return key.trim().to_owned();
            }
        }
    }
    text.trim().to_owned()
}

impl FleetDirectory for BalenaDirectory {
    async fn membership(
        &self,
        device: &DeviceId,
        deadline: Instant,
    ) -> Result<Membership, FleetError> {
        // Device ids reaching here are validated balena UUIDs (lowercase hex), so they need no
        // quoting beyond the OData string literal; spaces are sent as %20 like balena's SDK.
        let path = format!(
            "/v7/device?$select=id,uuid,is_active&$filter=uuid%20eq%20'{device}'%20and%20belongs_to__application%20eq%20{}",
            self.fleet
        );
        let answer: OData<DeviceRow> = self.get(&path, deadline).await?;
        match answer.d.as_slice() {
            [row] if row.uuid == device.as_str() => Ok(if row.is_active {
                self.remember_member(device, row.id);
                Membership::Member
            } else {
                Membership::Inactive
            }),
            [_] => Err(FleetError::Unparsable(
                "the answer names another device".into(),
            )),
            [] => {
                self.ensure_fleet_visible(deadline).await?;
                Ok(Membership::NotMember)
            }
            rows => Err(FleetError::Ambiguous { rows: rows.len() }),
        }
    }

    fn label(&self) -> String {
        format!("balena fleet {}", self.fleet)
    }

    async fn record_activation(
        &self,
        device: &DeviceId,
        certificate: &CertificateId,
        deadline: Instant,
    ) -> Result<(), Cause> {
        if self.write_back == WriteBack::Off {
            return Ok(());
        }
        let deadline = deadline
            .checked_sub(WRITE_BACK_RESERVE)
            .unwrap_or_else(Instant::now);
        let key = self.api_key().await?;
        let client = BalenaClient::with_http(self.http.clone(), &self.api_url, key.clone())
            .with_request_timeout(self.request_timeout);
        let remembered = self
            .member_ids
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(device.as_str());
        let id = match remembered {
            Some(id) => id,
            None => client
                .device_id(device, deadline)
                .await?
                .ok_or_else(|| format!("balena has no device {device}"))?,
        };
        let thing = client.upsert(DeviceField::Tag, id, TAG_THING, device.as_str(), deadline);
        let cert = client.upsert(
            DeviceField::Tag,
            id,
            TAG_CERTIFICATE_ID,
            certificate.as_str(),
            deadline,
        );
        let (thing, cert) = tokio::join!(thing, cert);
        thing.map_err(|e| format!("tag {TAG_THING}: {}", crate::error_chain(&e)))?;
        cert.map_err(|e| format!("tag {TAG_CERTIFICATE_ID}: {}", crate::error_chain(&e)))?;
        Ok(())
    }
}

impl BalenaDirectory {
    /// Keeps a member's numeric id for the write-back, so it needs no second lookup.
    fn remember_member(&self, device: &DeviceId, id: Option<u64>) {
        let (WriteBack::Tags, Some(id)) = (self.write_back, id) else {
            return;
        };
        let mut ids = self
            .member_ids
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        // Entries leave at the write-back; ones whose activation failed must not pile up.
        if ids.len() >= MAX_REMEMBERED_IDS {
            ids.clear();
        }
        ids.insert(device.as_str().to_owned(), id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_may_be_plain_or_json() {
        assert_eq!(secret_text_to_key("abc\n"), "abc");
        assert_eq!(secret_text_to_key(r#"{"BALENA_API_KEY":"xyz"}"#), "xyz");
        assert_eq!(secret_text_to_key(r#"{"apiKey":"k"}"#), "k");
    }
}
