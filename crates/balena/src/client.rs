//! The one request loop: every balena API call goes through [`Client::send`].

use std::fmt;
use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use tokio::time::Instant;
use zeroize::Zeroizing;

/// balenaCloud's API, unless configured otherwise.
pub const DEFAULT_API_URL: &str = "https://api.balena-cloud.com";
/// The largest answer body read: a device row is a few hundred bytes, and a body without a
/// bound could take a 128 MB Lambda down.
pub const MAX_BODY: usize = 64 * 1024;
/// How long one HTTP request may take, unless the client is told otherwise.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long connecting may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// 429 answers honoured (by waiting Retry-After) before giving up.
const MAX_RATE_LIMIT_WAITS: u32 = 3;
/// The most of an error body quoted in a message (pinejs errors are one short line).
const MAX_QUOTED_BODY: usize = 200;

/// Boxed cause of an error.
type Cause = Box<dyn std::error::Error + Send + Sync + 'static>;

/// A balena API call that failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `BALENA_API_URL` (or the URL given) cannot be used.
    #[error("invalid balena API URL {url:?}: {reason}")]
    InvalidUrl {
        /// The URL as given.
        url: String,
        /// Why it is refused.
        reason: &'static str,
    },
    /// The HTTP client could not be built.
    #[error("cannot build the HTTP client")]
    Http(#[source] Cause),
    /// The API key was refused (401/403), or it may not touch this resource.
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
        /// The plain-text body, shortened (never echoing a value sent).
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
    /// An answer larger than [`MAX_BODY`].
    #[error("balena API answer is larger than {limit} bytes")]
    TooLarge {
        /// The limit.
        limit: usize,
    },
    /// More than one device with one UUID.
    #[error("balena API returned {rows} devices for one UUID")]
    Ambiguous {
        /// How many.
        rows: usize,
    },
    /// A row that does not belong to the fleet the query was pinned to.
    #[error("balena API answered a device of fleet {found} to a query pinned to fleet {fleet}")]
    WrongFleet {
        /// The pinned fleet.
        fleet: u64,
        /// The fleet the row names.
        found: u64,
    },
    /// The fleet has no service of that name.
    #[error("fleet {fleet} has no service {service:?}")]
    NoService {
        /// The service asked for.
        service: String,
        /// The pinned fleet.
        fleet: u64,
    },
    /// The device does not run that service (yet): balena has no place for its variables.
    #[error(
        "device {device} has no service {service:?} installed (has it run a release with it?)"
    )]
    NotInstalled {
        /// The service asked for.
        service: String,
        /// The device.
        device: String,
    },
    /// The device was deleted from the fleet (or moved out of it) while jitr was writing to
    /// it: balena answers such a write 401, as it answers a key it refuses, and a lookup
    /// right after, with the same key, told the two apart.
    #[error("device {device} is no longer in the fleet (deleted or moved while jitr wrote to it)")]
    DeviceGone {
        /// The device UUID.
        device: String,
    },
    /// The key cannot see the fleet, so an empty answer proves nothing.
    #[error("the API key cannot see fleet {fleet}: an empty answer proves nothing")]
    FleetNotVisible {
        /// The pinned fleet.
        fleet: u64,
    },
}

/// A balena API key; never printed, wiped from memory on drop.
#[derive(Clone)]
pub struct ApiKey(Zeroizing<String>);

impl ApiKey {
    /// Wraps a key.
    pub fn new(key: String) -> Self {
        ApiKey(Zeroizing::new(key))
    }

    /// The key, for the Authorization header.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ApiKey(<redacted>)")
    }
}

/// Checks a balena API base URL and returns it without a trailing slash: `https://`, or
/// `http://` for a loopback host only (a local fake or proxy; the key must never cross a
/// network in the clear).
pub fn validate_api_url(url: &str) -> Result<String, &'static str> {
    let url = url.trim().trim_end_matches('/');
    let (secure, rest) = if let Some(rest) = url.strip_prefix("https://") {
        (true, rest)
    } else if let Some(rest) = url.strip_prefix("http://") {
        (false, rest)
    } else {
        return Err("expected an https:// URL");
    };
    let authority = rest.split('/').next().unwrap_or_default();
    if authority.is_empty() || authority.contains('@') {
        return Err("expected https://HOST[:PORT]");
    }
    let host = match authority.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or_default(),
        None => authority.split(':').next().unwrap_or_default(),
    };
    if !secure && !matches!(host, "127.0.0.1" | "::1" | "localhost") {
        return Err("http:// is allowed for a loopback host only; use https://");
    }
    Ok(url.to_owned())
}

/// A client for the balena API with its key. Cheap to clone (connections are shared).
#[derive(Clone)]
pub struct Client {
    http: reqwest::Client,
    api_url: String,
    key: ApiKey,
    request_timeout: Duration,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("api_url", &self.api_url)
            .finish_non_exhaustive()
    }
}

/// A status and body, read whole (within [`MAX_BODY`]).
#[derive(Debug)]
pub(crate) struct Answer {
    pub(crate) status: StatusCode,
    pub(crate) body: Vec<u8>,
}

#[derive(Debug, Deserialize)]
struct OData<T> {
    d: Vec<T>,
}

impl Client {
    /// A client for the API at `api_url` (see [`validate_api_url`]).
    pub fn new(api_url: &str, key: ApiKey) -> Result<Self, Error> {
        let api_url = validate_api_url(api_url).map_err(|reason| Error::InvalidUrl {
            url: api_url.to_owned(),
            reason,
        })?;
        let http = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .user_agent(concat!("jitr/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| Error::Http(Box::new(e)))?;
        Ok(Client {
            http,
            api_url,
            key,
            request_timeout: REQUEST_TIMEOUT,
        })
    }

    /// The same client with another per-request timeout (default 10 s).
    pub fn with_request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// The base URL, for messages.
    pub fn api_url(&self) -> &str {
        &self.api_url
    }

    /// Sends one request with the key, honouring 429 Retry-After within `deadline`. Any other
    /// status is the caller's to judge; 401 and 403 are always [`Error::Unauthorized`].
    pub(crate) async fn send(
        &self,
        method: Method,
        path_and_query: &str,
        body: Option<&serde_json::Value>,
        deadline: Instant,
    ) -> Result<Answer, Error> {
        let url = format!("{}{path_and_query}", self.api_url);
        let mut waits = 0;
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Err(Error::Timeout);
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
                    return Err(Error::Unauthorized {
                        status: status.as_u16(),
                    })
                }
                StatusCode::TOO_MANY_REQUESTS => {
                    let retry_after = retry_after(&response);
                    waits += 1;
                    if waits > MAX_RATE_LIMIT_WAITS || retry_after >= remaining {
                        return Err(Error::RateLimited { retry_after });
                    }
                    tokio::time::sleep(retry_after).await;
                }
                _ => {
                    let body = read_body(response).await?;
                    return Ok(Answer { status, body });
                }
            }
        }
    }

    /// GET an OData collection: HTTP 200 `{"d": [...]}`, anything else an error.
    pub(crate) async fn get_rows<T: DeserializeOwned>(
        &self,
        path_and_query: &str,
        deadline: Instant,
    ) -> Result<Vec<T>, Error> {
        let answer = self
            .send(Method::GET, path_and_query, None, deadline)
            .await?;
        if answer.status != StatusCode::OK {
            return Err(answer.unexpected(None));
        }
        let rows: OData<T> =
            serde_json::from_slice(&answer.body).map_err(|e| Error::Unparsable(Box::new(e)))?;
        Ok(rows.d)
    }
}

/// Reads a body, refusing one over [`MAX_BODY`] before it is all in memory.
async fn read_body(mut response: reqwest::Response) -> Result<Vec<u8>, Error> {
    if response
        .content_length()
        .is_some_and(|n| n > MAX_BODY as u64)
    {
        return Err(Error::TooLarge { limit: MAX_BODY });
    }
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(transport)? {
        if body.len() + chunk.len() > MAX_BODY {
            return Err(Error::TooLarge { limit: MAX_BODY });
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

impl Answer {
    /// The error for a status the caller did not expect. The body is quoted only when short
    /// and free of `secret` (the value sent), so a message never leaks what was written.
    pub(crate) fn unexpected(&self, secret: Option<&str>) -> Error {
        let text = String::from_utf8_lossy(&self.body);
        let text = text.trim();
        let leaks = secret.is_some_and(|s| !s.is_empty() && text.contains(s));
        let body = if leaks || text.len() > MAX_QUOTED_BODY || text.contains('\n') {
            String::new()
        } else {
            text.to_owned()
        };
        Error::Status {
            status: self.status.as_u16(),
            body,
        }
    }
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

fn transport(e: reqwest::Error) -> Error {
    if e.is_timeout() {
        Error::Timeout
    } else {
        Error::Transport(Box::new(e))
    }
}

/// An OData string literal for a URL: quoted, `'` doubled, and percent-encoded except for
/// unreserved characters.
pub(crate) fn odata_string(value: &str) -> String {
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

    #[test]
    fn api_urls_are_https_except_on_loopback() {
        assert_eq!(
            validate_api_url("https://api.balena-cloud.com/").unwrap(),
            "https://api.balena-cloud.com"
        );
        for ok in [
            "http://127.0.0.1:8080",
            "http://localhost:1",
            "http://[::1]:9",
        ] {
            assert!(validate_api_url(ok).is_ok(), "{ok}");
        }
        for bad in [
            "http://api.balena-cloud.com",
            "http://127.0.0.1.evil.example",
            "api.balena-cloud.com",
            "ftp://x",
            "https://",
            "https://user@host",
        ] {
            assert!(validate_api_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn keys_are_never_printed() {
        assert_eq!(
            format!("{:?}", ApiKey::new("s3cret".into())),
            "ApiKey(<redacted>)"
        );
    }
}
