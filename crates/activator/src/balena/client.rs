//! Writes to balena devices through the API v7: device lookups by UUID, and upserts of device
//! environment variables and device tags (POST, and on HTTP 409 PATCH the existing row).
//!
//! Same conventions as the fleet check: `Authorization: Bearer <key>`, spaces in `$filter`
//! sent as `%20` like balena's SDK, 429 answered by waiting `Retry-After` within a deadline.

use std::time::Duration;

use factory_ca::DeviceId;
use reqwest::{Method, StatusCode};
use serde::Deserialize;
use tokio::time::Instant;

use crate::{ApiKey, Cause, ConfigError};

/// How long one HTTP request to balena may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// 429 answers honoured (by waiting Retry-After) before giving up.
const MAX_RATE_LIMIT_WAITS: u32 = 3;
/// The most of an error body quoted in a message (pinejs errors are one short line).
const MAX_QUOTED_BODY: usize = 200;

/// A balena API write that failed.
#[derive(Debug, thiserror::Error)]
pub enum BalenaError {
    /// The API key was refused (401/403), or it may not write this resource.
    #[error("balena API refused the API key (HTTP {status})")]
    Unauthorized {
        /// 401 or 403.
        status: u16,
    },
    /// 429 with a Retry-After beyond the deadline, or too many of them.
    #[error("balena API rate limited us (retry after {retry_after:?})")]
    RateLimited {
        /// What the last answer asked for.
        retry_after: Duration,
    },
    /// Any other unexpected status, with balena's one-line explanation when it gave one.
    #[error("balena API answered HTTP {status}{}", if body.is_empty() { String::new() } else { format!(": {body}") })]
    Status {
        /// The HTTP status.
        status: u16,
        /// The plain-text body, shortened (never echoing the value sent).
        body: String,
    },
    /// No answer in time.
    #[error("balena API did not answer in time")]
    Timeout,
    /// Connection failure.
    #[error("balena API unreachable")]
    Transport(#[source] Cause),
    /// An answer we cannot read.
    #[error("balena API answer unreadable")]
    Unparsable(#[source] Cause),
    /// More than one device with one UUID.
    #[error("balena API returned {rows} devices for one UUID")]
    Ambiguous {
        /// How many.
        rows: usize,
    },
}

/// What a device carries that jitr writes: environment variables or tags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceField {
    /// `device_environment_variable` (`name`, `value`): the device's services see it.
    EnvVar,
    /// `device_tag` (`tag_key`, `value`): shown in the balena dashboard.
    Tag,
}

impl DeviceField {
    /// The API resource.
    fn resource(self) -> &'static str {
        match self {
            DeviceField::EnvVar => "device_environment_variable",
            DeviceField::Tag => "device_tag",
        }
    }

    /// The field holding the variable's name.
    fn key_field(self) -> &'static str {
        match self {
            DeviceField::EnvVar => "name",
            DeviceField::Tag => "tag_key",
        }
    }
}

/// What an upsert did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Upserted {
    /// The variable did not exist and was created (HTTP 201).
    Created,
    /// It existed (HTTP 409 on create) and its value was replaced.
    Updated,
}

/// A client for balena API writes, with its own key.
#[derive(Clone)]
pub struct BalenaClient {
    http: reqwest::Client,
    api_url: String,
    key: ApiKey,
    request_timeout: Duration,
}

impl std::fmt::Debug for BalenaClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BalenaClient")
            .field("api_url", &self.api_url)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Deserialize)]
struct OData<T> {
    d: Vec<T>,
}

#[derive(Debug, Deserialize)]
struct IdRow {
    id: u64,
}

impl BalenaClient {
    /// A client for the API at `api_url` (e.g. `https://api.balena-cloud.com`).
    pub fn new(api_url: &str, key: ApiKey) -> Result<Self, ConfigError> {
        let http = super::http_client()?;
        Ok(Self::with_http(http, api_url, key))
    }

    /// The same over an HTTP client built elsewhere (connections are shared).
    pub(crate) fn with_http(http: reqwest::Client, api_url: &str, key: ApiKey) -> Self {
        BalenaClient {
            http,
            api_url: api_url.trim_end_matches('/').to_owned(),
            key,
            request_timeout: REQUEST_TIMEOUT,
        }
    }

    /// The same client with another per-request timeout (default 10 s).
    pub fn with_request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// The numeric id of the device with this UUID, `None` when balena has no such device
    /// (or the key cannot see it: balena answers both the same way).
    pub async fn device_id(
        &self,
        uuid: &DeviceId,
        deadline: Instant,
    ) -> Result<Option<u64>, BalenaError> {
        let path = format!(
            "/v7/device?$select=id&$filter=uuid%20eq%20{}",
            odata_string(uuid.as_str())
        );
        let response = self.send(Method::GET, &path, None, deadline).await?;
        if response.status != StatusCode::OK {
            return Err(response.unexpected(None));
        }
        let answer: OData<IdRow> = serde_json::from_slice(&response.body)
            .map_err(|e| BalenaError::Unparsable(Box::new(e)))?;
        match answer.d.as_slice() {
            [] => Ok(None),
            [row] => Ok(Some(row.id)),
            rows => Err(BalenaError::Ambiguous { rows: rows.len() }),
        }
    }

    /// Sets `name` to `value` on the device with numeric id `device`: creates it, or on
    /// HTTP 409 (it exists) replaces its value.
    pub async fn upsert(
        &self,
        field: DeviceField,
        device: u64,
        name: &str,
        value: &str,
        deadline: Instant,
    ) -> Result<Upserted, BalenaError> {
        let mut body = serde_json::Map::new();
        body.insert("device".into(), device.into());
        body.insert(field.key_field().into(), name.into());
        body.insert("value".into(), value.into());
        let create = serde_json::Value::Object(body);
        let path = format!("/v7/{}", field.resource());
        let response = self
            .send(Method::POST, &path, Some(&create), deadline)
            .await?;
        match response.status {
            StatusCode::CREATED | StatusCode::OK => return Ok(Upserted::Created),
            StatusCode::CONFLICT => {}
            _ => return Err(response.unexpected(Some(value))),
        }
        let path = format!(
            "/v7/{}?$filter=device%20eq%20{device}%20and%20{}%20eq%20{}",
            field.resource(),
            field.key_field(),
            odata_string(name)
        );
        let update = serde_json::json!({ "value": value });
        let response = self
            .send(Method::PATCH, &path, Some(&update), deadline)
            .await?;
        if response.status.is_success() {
            Ok(Upserted::Updated)
        } else {
            Err(response.unexpected(Some(value)))
        }
    }

    /// Sends one request with the key, honouring 429 Retry-After within the deadline; any
    /// other status is the caller's to judge.
    async fn send(
        &self,
        method: Method,
        path_and_query: &str,
        body: Option<&serde_json::Value>,
        deadline: Instant,
    ) -> Result<Answer, BalenaError> {
        let url = format!("{}{path_and_query}", self.api_url);
        let mut waits = 0;
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Err(BalenaError::Timeout);
            }
            let mut request = self
                .http
                .request(method.clone(), &url)
                .bearer_auth(self.key.expose())
                .timeout(remaining.min(self.request_timeout));
            if let Some(body) = body {
                request = request.json(body);
            }
            let response = request.send().await.map_err(transport)?;
            let status = response.status();
            match status {
                StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
                    return Err(BalenaError::Unauthorized {
                        status: status.as_u16(),
                    })
                }
                StatusCode::TOO_MANY_REQUESTS => {
                    let retry_after = super::retry_after(&response);
                    waits += 1;
                    if waits > MAX_RATE_LIMIT_WAITS || retry_after >= remaining {
                        return Err(BalenaError::RateLimited { retry_after });
                    }
                    tokio::time::sleep(retry_after).await;
                }
                _ => {
                    let body = response.bytes().await.map_err(transport)?;
                    return Ok(Answer {
                        status,
                        body: body.to_vec(),
                    });
                }
            }
        }
    }
}

/// A status and body, read whole.
struct Answer {
    status: StatusCode,
    body: Vec<u8>,
}

impl Answer {
    /// The error for a status the caller did not expect. The body is quoted only when short
    /// and free of `secret` (the value sent), so a message never leaks what was written.
    fn unexpected(&self, secret: Option<&str>) -> BalenaError {
        let text = String::from_utf8_lossy(&self.body);
        let text = text.trim();
        let leaks = secret.is_some_and(|s| !s.is_empty() && text.contains(s));
        let body = if leaks || text.len() > MAX_QUOTED_BODY || text.contains('\n') {
            String::new()
        } else {
            text.to_owned()
        };
        BalenaError::Status {
            status: self.status.as_u16(),
            body,
        }
    }
}

fn transport(e: reqwest::Error) -> BalenaError {
    if e.is_timeout() {
        BalenaError::Timeout
    } else {
        BalenaError::Transport(Box::new(e))
    }
}

/// An OData string literal for a URL: quoted, `'` doubled, and percent-encoded except for
/// unreserved characters.
fn odata_string(value: &str) -> String {
    let mut out = String::from("'");
    for byte in value.replace('\'', "''").bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~'".contains(&byte) {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out.push('\'');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn odata_strings_are_quoted_and_percent_encoded() {
        assert_eq!(odata_string("AWS_CERT"), "'AWS_CERT'");
        assert_eq!(odata_string("it's a tag"), "'it''s%20a%20tag'");
        assert_eq!(odata_string("a&b=c"), "'a%26b%3Dc'");
    }

    #[test]
    fn error_bodies_are_quoted_only_when_short_and_free_of_the_value() {
        let answer = |body: &str| Answer {
            status: StatusCode::BAD_REQUEST,
            body: body.as_bytes().to_vec(),
        };
        assert_eq!(
            answer("Unique key constraint violated")
                .unexpected(None)
                .to_string(),
            "balena API answered HTTP 400: Unique key constraint violated"
        );
        assert_eq!(
            answer("bad value c2VjcmV0")
                .unexpected(Some("c2VjcmV0"))
                .to_string(),
            "balena API answered HTTP 400"
        );
        assert_eq!(
            answer(&"x".repeat(500)).unexpected(None).to_string(),
            "balena API answered HTTP 400"
        );
    }
}
