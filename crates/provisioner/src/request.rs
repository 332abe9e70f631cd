//! cloud-relay's provisioning request, as a Lambda function URL hands it over (payload format
//! 2.0), and the HTTP answer.
//!
//! balena's cloud-relay block, with no `AWS_CERT`/`AWS_PRIVATE_KEY`, POSTs
//! `{"uuid": "<device uuid>", "balena_service": "<service name>"}` to `PROVISION_URL`, then
//! waits for the variables to reach it through balenaCloud. A non-2xx answer whose body is
//! exactly `thing already exists` means "provisioned already: refresh my variables".
//!
//! cloud-relay requests `PROVISION_URL` as given, path and query included, so the URL can carry
//! a secret: with a [`ProvisionToken`] configured, a request that does not present it (as a
//! path segment, `https://<url>/<token>`, or as `?token=<token>`) is answered 403 before
//! anything else is read, the same 403 a stranger's UUID gets.

use base64::Engine;
use factory_ca::{DeviceId, IdFormat};
use serde_json::{json, Value};
use zeroize::Zeroizing;

/// The largest body accepted.
pub(crate) const MAX_BODY: usize = 4096;
/// The body cloud-relay recognises as "provisioned already".
pub(crate) const ALREADY_EXISTS: &str = "thing already exists";

/// The shortest token accepted: 32 characters of [`TOKEN_CHARS`] (`openssl rand -hex 32`
/// makes 64).
pub(crate) const MIN_TOKEN_LEN: usize = 32;
/// The characters a token may hold: those a URL carries unescaped in a path or a query.
pub(crate) const TOKEN_CHARS: &str = "letters, digits, '-', '.', '_', '~'";

/// The secret `PROVISION_URL` carries (`JITR_PROVISION_TOKEN`): only a request presenting it
/// is read further. Never logged, never in a `Debug` output.
#[derive(Clone)]
pub struct ProvisionToken(Zeroizing<String>);

impl std::fmt::Debug for ProvisionToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ProvisionToken(<redacted>)")
    }
}

impl ProvisionToken {
    /// A token: at least [`MIN_TOKEN_LEN`] of [`TOKEN_CHARS`], so that it travels in a URL as
    /// written and cannot be guessed. The refusal says why, never the value.
    pub fn parse(text: &str) -> Result<Self, String> {
        if text.len() < MIN_TOKEN_LEN {
            return Err(format!(
                "a token has at least {MIN_TOKEN_LEN} characters (this has {}); make one with `openssl rand -hex 32`",
                text.len()
            ));
        }
        if !text.bytes().all(is_token_byte) {
            return Err(format!("a token holds only {TOKEN_CHARS}"));
        }
        Ok(ProvisionToken(Zeroizing::new(text.to_owned())))
    }

    /// Whether the function URL event presents the token: one segment of its path, or the
    /// value of a `token` parameter of its query.
    pub fn presented_in(&self, event: &Value) -> bool {
        let path = event["rawPath"].as_str().unwrap_or_default();
        let query = event["rawQueryString"].as_str().unwrap_or_default();
        let in_path = path.split('/').any(|segment| self.is(segment));
        let in_query = query
            .split('&')
            .filter_map(|pair| pair.strip_prefix("token="))
            .any(|value| self.is(value));
        // Both looked at whatever the first says: the time taken does not tell where it failed.
        in_path | in_query
    }

    /// Compares in time that depends on the lengths only, never on where the bytes differ.
    fn is(&self, presented: &str) -> bool {
        let (ours, theirs) = (self.0.as_bytes(), presented.as_bytes());
        if ours.len() != theirs.len() {
            return false;
        }
        ours.iter()
            .zip(theirs)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
    }
}

fn is_token_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-._~".contains(&b)
}

/// What a function URL invocation carries that the provisioner reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpRequest {
    /// The HTTP method.
    pub method: String,
    /// The body, base64-decoded when Lambda encoded it.
    pub body: Vec<u8>,
}

impl HttpRequest {
    /// Whether `event` is a function URL (or API Gateway HTTP API) event, payload format 2.0.
    pub fn matches(event: &Value) -> bool {
        event["version"] == "2.0" && event["requestContext"]["http"].is_object()
    }

    /// The request in a payload 2.0 event; a refusal (as an HTTP answer) when its body is too
    /// large or not decodable.
    pub fn from_event(event: &Value) -> Result<HttpRequest, HttpResponse> {
        let method = event["requestContext"]["http"]["method"]
            .as_str()
            .unwrap_or_default()
            .to_ascii_uppercase();
        let text = event["body"].as_str().unwrap_or_default();
        // Checked before decoding: base64 is 4/3 the size, so this bounds the work too.
        if text.len() > MAX_BODY * 4 / 3 + 4 {
            return Err(too_large());
        }
        let body = if event["isBase64Encoded"] == true {
            base64::engine::general_purpose::STANDARD
                .decode(text)
                .map_err(|_| HttpResponse::bad_request("the body is not valid base64"))?
        } else {
            text.as_bytes().to_vec()
        };
        if body.len() > MAX_BODY {
            return Err(too_large());
        }
        Ok(HttpRequest { method, body })
    }
}

fn too_large() -> HttpResponse {
    HttpResponse::bad_request(&format!("the body is larger than {MAX_BODY} bytes"))
}

/// A provisioning request that passed every check of its form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProvisionRequest {
    /// The device.
    pub device: DeviceId,
    /// The service on it that gets the variables.
    pub service: String,
}

impl ProvisionRequest {
    /// Checks the request: a POST of a JSON object with a device UUID in `format` and a
    /// service name. The refusal is the 400 (or 405) answer, with the reason.
    pub fn parse(request: &HttpRequest, format: IdFormat) -> Result<Self, HttpResponse> {
        if request.method != "POST" {
            return Err(HttpResponse::text(405, "only POST is accepted").with_allow("POST"));
        }
        let value: Value = serde_json::from_slice(&request.body)
            .map_err(|_| HttpResponse::bad_request("the body is not JSON"))?;
        let Some(object) = value.as_object() else {
            return Err(HttpResponse::bad_request("the body is not a JSON object"));
        };
        let field = |name: &str| {
            object.get(name).and_then(Value::as_str).ok_or_else(|| {
                HttpResponse::bad_request(&format!("{name} is missing or not a string"))
            })
        };
        let device = DeviceId::parse(field("uuid")?, format)
            .map_err(|_| HttpResponse::bad_request("uuid is not a balena device UUID"))?;
        let service = field("balena_service")?;
        if !valid_service_name(service) {
            return Err(HttpResponse::bad_request(
                "balena_service is not a service name (letters, digits, '_', '-', '.', at most 63)",
            ));
        }
        Ok(ProvisionRequest {
            device,
            service: service.to_owned(),
        })
    }
}

/// A compose service name as balena accepts one.
pub(crate) fn valid_service_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    matches!(bytes.next(), Some(b) if b.is_ascii_alphanumeric())
        && name.len() <= 63
        && bytes.all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b))
}

/// An HTTP answer, as a function URL takes it back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpResponse {
    /// The status code.
    pub status: u16,
    /// `application/json` or `text/plain`.
    pub content_type: &'static str,
    /// The body.
    pub body: String,
    /// Extra headers (`Retry-After`, `Allow`).
    pub headers: Vec<(&'static str, String)>,
}

impl HttpResponse {
    /// A plain-text answer.
    pub fn text(status: u16, body: &str) -> Self {
        HttpResponse {
            status,
            content_type: "text/plain; charset=utf-8",
            body: body.to_owned(),
            headers: Vec::new(),
        }
    }

    /// A JSON answer.
    pub fn json(status: u16, body: &Value) -> Self {
        HttpResponse {
            status,
            content_type: "application/json",
            body: body.to_string(),
            headers: Vec::new(),
        }
    }

    /// 400 with the reason.
    pub fn bad_request(reason: &str) -> Self {
        HttpResponse::json(400, &json!({"error": "bad request", "reason": reason}))
    }

    /// 403, saying nothing that would help tell a stranger from a missing device: the one
    /// answer to a request without the token, to a stranger, to an inactive or revoked device,
    /// to a service the provisioner does not serve.
    pub fn forbidden() -> Self {
        HttpResponse::json(403, &json!({"error": "forbidden"}))
    }

    /// 409 `thing already exists`: what cloud-relay reads as "provisioned already".
    pub fn already_exists() -> Self {
        HttpResponse::text(409, ALREADY_EXISTS)
    }

    /// 429, with `Retry-After` in seconds.
    pub fn too_many(retry_after: u64) -> Self {
        let mut r = HttpResponse::json(
            429,
            &json!({"error": "too many requests", "reason": "one provisioning attempt per device at a time; try later"}),
        );
        r.headers.push(("retry-after", retry_after.to_string()));
        r
    }

    /// 503: nothing was left half-made; trying again later can succeed.
    pub fn unavailable(reason: &str) -> Self {
        let mut r = HttpResponse::json(503, &json!({"error": "unavailable", "reason": reason}));
        r.headers.push(("retry-after", "60".to_owned()));
        r
    }

    fn with_allow(mut self, methods: &str) -> Self {
        self.headers.push(("allow", methods.to_owned()));
        self
    }

    /// The function URL's response object.
    pub fn to_value(&self) -> Value {
        let mut headers = serde_json::Map::new();
        headers.insert("content-type".into(), self.content_type.into());
        for (name, value) in &self.headers {
            headers.insert((*name).into(), value.as_str().into());
        }
        json!({
            "statusCode": self.status,
            "headers": headers,
            "body": self.body,
            "isBase64Encoded": false,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(method: &str, body: &str, base64: bool) -> Value {
        json!({
            "version": "2.0",
            "routeKey": "$default",
            "rawPath": "/",
            "requestContext": {"http": {"method": method, "path": "/", "sourceIp": "192.0.2.1"}},
            "body": body,
            "isBase64Encoded": base64,
        })
    }

    fn parse(method: &str, body: &str) -> Result<ProvisionRequest, HttpResponse> {
        let request = HttpRequest::from_event(&event(method, body, false))?;
        ProvisionRequest::parse(&request, IdFormat::BalenaUuid)
    }

    #[test]
    fn cloud_relays_request_parses_plain_or_base64() {
        let uuid = "0123456789abcdef0123456789abcdef";
        let body = format!(r#"{{"uuid":"{uuid}","balena_service":"cloud-relay"}}"#);
        let plain = parse("POST", &body).unwrap();
        assert_eq!(plain.device.as_str(), uuid);
        assert_eq!(plain.service, "cloud-relay");
        let encoded = base64::engine::general_purpose::STANDARD.encode(&body);
        let request = HttpRequest::from_event(&event("POST", &encoded, true)).unwrap();
        assert_eq!(
            ProvisionRequest::parse(&request, IdFormat::BalenaUuid).unwrap(),
            plain
        );
    }

    #[test]
    fn every_malformed_request_is_refused_with_its_reason() {
        let uuid = "0123456789abcdef0123456789abcdef";
        for (method, body, status, reason) in [
            ("GET", String::new(), 405, "only POST"),
            ("POST", "{".to_owned(), 400, "not JSON"),
            ("POST", "[]".to_owned(), 400, "not a JSON object"),
            (
                "POST",
                r#"{"balena_service":"a"}"#.to_owned(),
                400,
                "uuid is missing",
            ),
            (
                "POST",
                r#"{"uuid":"nope","balena_service":"a"}"#.to_owned(),
                400,
                "not a balena device UUID",
            ),
            (
                "POST",
                format!(r#"{{"uuid":"{uuid}"}}"#),
                400,
                "balena_service is missing",
            ),
            (
                "POST",
                format!(r#"{{"uuid":"{uuid}","balena_service":"a b"}}"#),
                400,
                "not a service name",
            ),
            (
                "POST",
                format!(
                    r#"{{"uuid":"{uuid}","balena_service":"{}"}}"#,
                    "a".repeat(64)
                ),
                400,
                "not a service name",
            ),
            (
                "POST",
                format!(r#"{{"uuid":"{uuid}","pad":"{}"}}"#, "x".repeat(MAX_BODY)),
                400,
                "larger than 4096",
            ),
        ] {
            let refused = parse(method, &body).unwrap_err();
            assert_eq!(refused.status, status, "{body:.80}");
            assert!(refused.body.contains(reason), "{}: {reason}", refused.body);
        }
    }

    const TOKEN: &str = "0123456789abcdef0123456789abcdef-_.~";

    fn with_url(path: &str, query: &str) -> Value {
        let mut e = event("POST", "{}", false);
        e["rawPath"] = path.into();
        e["rawQueryString"] = query.into();
        e
    }

    #[test]
    fn the_token_is_presented_as_a_path_segment_or_the_token_parameter() {
        let token = ProvisionToken::parse(TOKEN).unwrap();
        for (path, query) in [
            (format!("/{TOKEN}"), String::new()),
            (format!("/provision/{TOKEN}/"), String::new()),
            ("/".to_owned(), format!("token={TOKEN}")),
            ("/".to_owned(), format!("a=1&token={TOKEN}&b=2")),
        ] {
            assert!(
                token.presented_in(&with_url(&path, &query)),
                "{path}?{query}"
            );
        }
        let near = &TOKEN[..TOKEN.len() - 1];
        for (path, query) in [
            ("/".to_owned(), String::new()),
            (format!("/{near}"), String::new()),
            (format!("/{TOKEN}x"), String::new()),
            ("/".to_owned(), format!("token={near}")),
            ("/".to_owned(), format!("secret={TOKEN}")),
            ("/".to_owned(), format!("token=x{TOKEN}")),
            (format!("/{}", TOKEN.to_uppercase()), String::new()),
        ] {
            assert!(
                !token.presented_in(&with_url(&path, &query)),
                "{path}?{query}"
            );
        }
        assert!(
            !token.presented_in(&event("POST", "{}", false)),
            "no path at all"
        );
    }

    #[test]
    fn a_short_or_unsafe_token_is_refused_without_echoing_it() {
        let short = ProvisionToken::parse("abc123").unwrap_err();
        assert!(short.contains("at least 32"), "{short}");
        assert!(!short.contains("abc123"));
        let spaced = format!("{TOKEN} x");
        let e = ProvisionToken::parse(&spaced).unwrap_err();
        assert!(e.contains("only letters"), "{e}");
        for unsafe_char in ["/", "?", "&", "=", "%", "#"] {
            assert!(ProvisionToken::parse(&format!("{TOKEN}{unsafe_char}")).is_err());
        }
        let debug = format!("{:?}", ProvisionToken::parse(TOKEN).unwrap());
        assert!(!debug.contains(TOKEN), "{debug}");
    }

    #[test]
    fn already_exists_is_exactly_what_cloud_relay_looks_for() {
        let v = HttpResponse::already_exists().to_value();
        assert_eq!(v["statusCode"], 409);
        assert_eq!(v["body"], "thing already exists");
        let v = HttpResponse::too_many(42).to_value();
        assert_eq!(v["headers"]["retry-after"], "42");
    }
}
