//! A fault-injecting HTTP proxy for AWS IoT control-plane calls, to test retries, idempotence
//! and quota handling against a real moto.
//!
//! [`FaultProxy`] listens on `127.0.0.1` and forwards each request to an upstream (moto),
//! unless its [`FaultPlan`] says otherwise. Per request it first checks the operation's quota
//! ([`Quotas`], a token bucket per operation), then draws from a seeded PRNG to pick one of: a
//! throttling answer, a 500 or 503 answer (a second draw picks which), closing the connection
//! before forwarding, closing it after forwarding (the call took effect, the client never hears
//! of it), forwarding with a delayed answer, or plain forwarding.
//!
//! Error answers are shaped like AWS IoT's (restJson1: the error code in `x-amzn-ErrorType`,
//! a JSON `message`), so aws-sdk-iot reports them as the modelled `ThrottlingException`,
//! `InternalFailureException` and `ServiceUnavailableException`, and its retry strategy treats
//! them as throttling and transient errors. Dropped connections reach the SDK as dispatch or
//! response errors, not service errors.
//!
//! Draws are deterministic for a given seed and request order; with concurrent clients the
//! order in which requests reach the proxy, and so which one gets which fault, may vary.
//! Request and response bodies are buffered (control-plane calls are small); end-to-end headers,
//! `Host` included (SigV4 signs it), pass through unchanged.

use std::collections::BTreeMap;
use std::fmt::{self, Write as _};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use anyhow::Result;
use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderName, HeaderValue, CONTENT_TYPE};
use hyper::http::request::Parts;
use hyper::{HeaderMap, Request, Response, StatusCode};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

use crate::server::BackgroundServer;

/// What the proxy does to requests; [`Default`] is no faults and no quotas.
#[derive(Debug, Clone, Default)]
pub struct FaultPlan {
    /// Seed of the PRNG that draws each request's fault.
    pub seed: u64,
    /// Probability that a request is answered like AWS IoT throttling (HTTP 429 `ThrottlingException`).
    pub throttle: f64,
    /// Probability of a 500 `InternalFailureException` or 503 `ServiceUnavailableException` (drawn 50/50).
    pub server_error: f64,
    /// Probability that the request is read, then its connection closed without forwarding or answering.
    pub drop_before: f64,
    /// Probability that the request is forwarded and answered upstream, then its connection closed without answering.
    pub drop_after: f64,
    /// Probability that the request is forwarded and its answer held for [`slow_by`](Self::slow_by).
    pub slow: f64,
    /// How long a slow answer is held.
    pub slow_by: Duration,
    /// Per-operation rate limits; a request over its operation's rate is throttled, never forwarded.
    pub quotas: Option<Quotas>,
}

/// Requests per second and burst allowed for one operation.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Limit {
    rate: f64,
    burst: f64,
}

/// Per-operation token buckets: operation name (as [`operation_of`] gives it) to rate and burst.
///
/// Operations without an entry are not limited.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Quotas {
    limits: BTreeMap<&'static str, Limit>,
}

impl Quotas {
    /// AWS IoT Core's default control-plane rates (requests per second, burst = rate).
    ///
    /// CreateThing, DeleteThing, DescribeThing, ListThings, AttachThingPrincipal,
    /// DetachThingPrincipal, ListThingPrincipals, ListPrincipalThings, AddThingToThingGroup,
    /// RemoveThingFromThingGroup and ListThingGroupsForThing are the Service Quotas defaults
    /// ("<Operation> API TPS", service code `iotcore`). The certificate and policy rates
    /// (DescribeCertificate, UpdateCertificate, DescribeCACertificate, ListCertificatesByCA: 10;
    /// AttachPolicy, DetachPolicy: 15) are not in Service Quotas and could not be checked against
    /// the AWS IoT Core quota table here: DescribeCertificate 10 and AttachPolicy 15 come from the
    /// issue, the rest from that table as remembered.
    pub fn aws_defaults() -> Quotas {
        [
            ("DescribeCertificate", 10.0),
            ("UpdateCertificate", 10.0),
            ("DescribeCACertificate", 10.0),
            ("ListCertificatesByCA", 10.0),
            ("AttachPolicy", 15.0),
            ("DetachPolicy", 15.0),
            ("CreateThing", 100.0),
            ("DeleteThing", 100.0),
            ("DescribeThing", 350.0),
            ("ListThings", 10.0),
            ("AttachThingPrincipal", 100.0),
            ("DetachThingPrincipal", 100.0),
            ("ListThingPrincipals", 10.0),
            ("ListPrincipalThings", 10.0),
            ("AddThingToThingGroup", 100.0),
            ("RemoveThingFromThingGroup", 100.0),
            ("ListThingGroupsForThing", 100.0),
        ]
        .into_iter()
        .fold(Quotas::default(), |quotas, (op, rate)| {
            quotas.with(op, rate, rate)
        })
    }

    /// Sets (or replaces) `op`'s limit: `rate_per_s` tokens a second, at most `burst` saved up.
    ///
    /// A rate that is not a positive number means no refill; with a burst of zero as well, every
    /// request to `op` is throttled (an operation stuck over its quota). With a positive rate,
    /// a burst below one is taken as one.
    #[must_use]
    pub fn with(mut self, op: &'static str, rate_per_s: f64, burst: f64) -> Quotas {
        let rate = if rate_per_s.is_finite() && rate_per_s > 0.0 {
            rate_per_s
        } else {
            0.0
        };
        // A positive rate with a burst below one would refill a bucket that can never hold a
        // token: at least one. Without a refill, a burst of zero blocks the operation.
        let burst = match (burst.is_finite(), rate > 0.0) {
            (false, _) => 1.0,
            (true, true) => burst.max(1.0),
            (true, false) => burst.max(0.0),
        };
        self.limits.insert(op, Limit { rate, burst });
        self
    }

    /// `op`'s rate in requests per second, if it is limited.
    pub fn rate(&self, op: &str) -> Option<f64> {
        self.limits.get(op).map(|limit| limit.rate)
    }

    /// `op`'s burst (bucket capacity), if it is limited.
    pub fn burst(&self, op: &str) -> Option<f64> {
        self.limits.get(op).map(|limit| limit.burst)
    }

    /// The limited operation among `ops` with the lowest rate (the first one on a tie).
    pub fn slowest(&self, ops: &[&str]) -> Option<(&'static str, f64)> {
        ops.iter()
            .filter_map(|op| self.limits.get_key_value(*op))
            .map(|(op, limit)| (*op, limit.rate))
            .fold(None, |slowest, (op, rate)| match slowest {
                Some((_, lowest)) if lowest <= rate => slowest,
                _ => Some((op, rate)),
            })
    }
}

/// What the proxy has done so far.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FaultStats {
    /// Requests received.
    pub requests: u64,
    /// Requests forwarded upstream and answered there (`drop_after` and `slow` ones included).
    pub forwarded: u64,
    /// Requests answered with a random `ThrottlingException` (`throttle`).
    pub throttled: u64,
    /// Requests answered with a `ThrottlingException` because their operation was over quota.
    pub quota_throttled: u64,
    /// Requests answered with a 500 or 503.
    pub server_errors: u64,
    /// Connections closed before forwarding.
    pub dropped_before: u64,
    /// Connections closed after forwarding.
    pub dropped_after: u64,
    /// Requests whose answer was held back.
    pub slowed: u64,
    /// Forwarded requests per operation.
    pub by_operation: BTreeMap<String, u64>,
}

/// A running proxy; dropping it closes its port and every connection through it.
pub struct FaultProxy {
    server: BackgroundServer,
    upstream: SocketAddr,
    shared: Arc<Shared>,
}

impl fmt::Debug for FaultProxy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FaultProxy")
            .field("addr", &self.addr())
            .field("upstream", &self.upstream)
            .field("plan", &self.shared.lock().plan)
            .finish_non_exhaustive()
    }
}

impl FaultProxy {
    /// Starts a proxy on a free loopback port that forwards to `upstream` as `plan` says.
    pub fn start(upstream: SocketAddr, plan: FaultPlan) -> Result<FaultProxy> {
        let shared = Arc::new(Shared {
            upstream,
            state: Mutex::new(State::new(plan, Instant::now())),
            request_ids: AtomicU64::new(0),
        });
        let thread_shared = Arc::clone(&shared);
        // Dropping the server cancels every connection task, held answers included.
        let server = BackgroundServer::spawn("fault-proxy", move |listener| {
            accept_loop(listener, thread_shared)
        })?;
        Ok(FaultProxy {
            server,
            upstream,
            shared,
        })
    }

    /// Starts a proxy in front of an `http://IP:PORT` base URL (as the servers in this crate give).
    pub fn for_url(upstream_url: &str, plan: FaultPlan) -> Result<FaultProxy> {
        Self::start(crate::server::socket_addr_of(upstream_url)?, plan)
    }

    /// Base URL of the proxy, e.g. `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr())
    }

    /// The address the proxy listens on.
    pub fn addr(&self) -> SocketAddr {
        self.server.addr()
    }

    /// Replaces the plan from the next request on: the PRNG restarts from the new seed and
    /// every quota bucket starts full. Statistics are kept.
    pub fn set_plan(&self, plan: FaultPlan) {
        let mut state = self.shared.lock();
        let stats = std::mem::take(&mut state.stats);
        *state = State::new(plan, Instant::now());
        state.stats = stats;
    }

    /// What the proxy has done so far.
    pub fn stats(&self) -> FaultStats {
        self.shared.lock().stats.clone()
    }
}

/// The AWS IoT operation a request calls, from its method and path (the query is ignored);
/// `"Other"` for anything not listed.
///
/// The paths are those aws-sdk-iot builds (`uri_base` in each operation's module). Labels
/// (certificate ids, thing names, percent-encoded ARNs) are single path segments.
pub fn operation_of(method: &str, path_and_query: &str) -> &'static str {
    let path = path_and_query.split(['?', '#']).next().unwrap_or_default();
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let method = method.to_ascii_uppercase();
    match (method.as_str(), segments.as_slice()) {
        ("GET", ["certificates"]) => "ListCertificates",
        ("GET", ["certificates", _]) => "DescribeCertificate",
        ("PUT", ["certificates", _]) => "UpdateCertificate",
        ("DELETE", ["certificates", _]) => "DeleteCertificate",
        ("GET", ["cacertificates"]) => "ListCACertificates",
        ("POST", ["cacertificate"]) => "RegisterCACertificate",
        ("GET", ["cacertificate", _]) => "DescribeCACertificate",
        ("PUT", ["cacertificate", _]) => "UpdateCACertificate",
        ("DELETE", ["cacertificate", _]) => "DeleteCACertificate",
        ("POST", ["certificate", "register"]) => "RegisterCertificate",
        ("POST", ["certificate", "register-no-ca"]) => "RegisterCertificateWithoutCA",
        ("GET", ["certificates-by-ca", _]) => "ListCertificatesByCA",
        ("GET", ["things"]) => "ListThings",
        ("POST", ["things", _]) => "CreateThing",
        ("GET", ["things", _]) => "DescribeThing",
        ("PATCH", ["things", _]) => "UpdateThing",
        ("DELETE", ["things", _]) => "DeleteThing",
        ("PUT", ["things", _, "principals"]) => "AttachThingPrincipal",
        ("DELETE", ["things", _, "principals"]) => "DetachThingPrincipal",
        ("GET", ["things", _, "principals"]) => "ListThingPrincipals",
        ("GET", ["things", _, "thing-groups"]) => "ListThingGroupsForThing",
        ("GET", ["principals", "things"]) => "ListPrincipalThings",
        ("PUT", ["thing-groups", "addThingToThingGroup"]) => "AddThingToThingGroup",
        ("PUT", ["thing-groups", "removeThingFromThingGroup"]) => "RemoveThingFromThingGroup",
        ("PUT", ["target-policies", _]) => "AttachPolicy",
        ("POST", ["target-policies", _]) => "DetachPolicy",
        ("POST", ["attached-policies", _]) => "ListAttachedPolicies",
        ("POST", ["policy-targets", _]) => "ListTargetsForPolicy",
        ("POST", ["policies", _]) => "CreatePolicy",
        ("GET", ["policies", _]) => "GetPolicy",
        ("DELETE", ["policies", _]) => "DeletePolicy",
        ("GET", ["endpoint"]) => "DescribeEndpoint",
        _ => "Other",
    }
}

/// State shared by the proxy handle and its connections.
struct Shared {
    upstream: SocketAddr,
    state: Mutex<State>,
    /// Numbers the `x-amzn-RequestId`s, apart from the plan's PRNG so ids do not shift faults.
    request_ids: AtomicU64,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A fresh UUID-shaped request id.
    fn request_id(&self) -> String {
        let n = self.request_ids.fetch_add(1, Ordering::Relaxed);
        let mut rng = SplitMix64::new(n ^ 0x6a09_e667_f3bc_c908);
        let (a, b) = (rng.next_u64(), rng.next_u64());
        format!(
            "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
            a >> 32,
            (a >> 16) & 0xffff,
            a & 0xfff,
            0x8000 | ((b >> 48) & 0x3fff),
            b & 0xffff_ffff_ffff
        )
    }
}

/// The plan and everything that changes per request.
struct State {
    plan: FaultPlan,
    rng: SplitMix64,
    buckets: BTreeMap<&'static str, TokenBucket>,
    stats: FaultStats,
}

impl State {
    fn new(plan: FaultPlan, now: Instant) -> State {
        let buckets = plan
            .quotas
            .iter()
            .flat_map(|quotas| quotas.limits.iter())
            .map(|(op, limit)| (*op, TokenBucket::full(*limit, now)))
            .collect();
        State {
            rng: SplitMix64::new(plan.seed),
            plan,
            buckets,
            stats: FaultStats::default(),
        }
    }

    /// Decides what to do with a request for `op` arriving at `now`, and counts the decision.
    fn decide(&mut self, op: &'static str, now: Instant) -> Fault {
        self.stats.requests += 1;
        let fault = self.draw(op, now);
        let counter = match fault {
            Fault::QuotaThrottle => Some(&mut self.stats.quota_throttled),
            Fault::Throttle => Some(&mut self.stats.throttled),
            Fault::ServerError { .. } => Some(&mut self.stats.server_errors),
            Fault::DropBefore => Some(&mut self.stats.dropped_before),
            Fault::DropAfter => Some(&mut self.stats.dropped_after),
            Fault::Slow(_) => Some(&mut self.stats.slowed),
            Fault::Forward => None,
        };
        if let Some(counter) = counter {
            *counter += 1;
        }
        fault
    }

    fn draw(&mut self, op: &'static str, now: Instant) -> Fault {
        if let Some(bucket) = self.buckets.get_mut(op) {
            if !bucket.try_take(now) {
                return Fault::QuotaThrottle;
            }
        }
        let draw = self.rng.next_f64();
        let plan = &self.plan;
        let mut edge = 0.0;
        let mut hit = |probability: f64| {
            edge += if probability.is_nan() {
                0.0
            } else {
                probability.clamp(0.0, 1.0)
            };
            draw < edge
        };
        if hit(plan.throttle) {
            Fault::Throttle
        } else if hit(plan.server_error) {
            Fault::ServerError {
                unavailable: self.rng.next_u64() & 1 == 1,
            }
        } else if hit(plan.drop_before) {
            Fault::DropBefore
        } else if hit(plan.drop_after) {
            Fault::DropAfter
        } else if hit(plan.slow) {
            Fault::Slow(plan.slow_by)
        } else {
            Fault::Forward
        }
    }
}

/// What happens to one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    /// Over its operation's quota: throttled, not forwarded.
    QuotaThrottle,
    /// Throttled at random.
    Throttle,
    /// 500 `InternalFailureException`, or 503 `ServiceUnavailableException` when `unavailable`.
    ServerError { unavailable: bool },
    /// Connection closed, nothing forwarded.
    DropBefore,
    /// Forwarded, then the connection closed without an answer.
    DropAfter,
    /// Forwarded; the answer is held this long.
    Slow(Duration),
    /// Forwarded untouched.
    Forward,
}

/// A token bucket refilled continuously at `rate` up to `burst`; one token per request.
#[derive(Debug, Clone)]
struct TokenBucket {
    limit: Limit,
    tokens: f64,
    updated: Instant,
}

impl TokenBucket {
    fn full(limit: Limit, now: Instant) -> TokenBucket {
        TokenBucket {
            limit,
            tokens: limit.burst,
            updated: now,
        }
    }

    /// Takes a token if there is one at `now`.
    fn try_take(&mut self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.limit.rate).min(self.limit.burst);
        self.updated = self.updated.max(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// SplitMix64 (Steele, Lea, Flood 2014): tiny, fast, and good enough to draw faults.
#[derive(Debug, Clone)]
struct SplitMix64(u64);

impl SplitMix64 {
    fn new(seed: u64) -> SplitMix64 {
        SplitMix64(seed)
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)`, from the top 53 bits.
    fn next_f64(&mut self) -> f64 {
        #[allow(clippy::cast_precision_loss)] // 53 bits fit an f64 mantissa exactly
        let mantissa = (self.next_u64() >> 11) as f64;
        mantissa / (1u64 << 53) as f64
    }
}

type Upstream = Client<HttpConnector, Full<Bytes>>;

/// Returned by the service to make hyper close the connection without answering.
#[derive(Debug)]
struct Dropped;

impl fmt::Display for Dropped {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("connection dropped by the fault plan")
    }
}

impl std::error::Error for Dropped {}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    let upstream: Upstream = Client::builder(TokioExecutor::new()).build_http();
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            // Out of descriptors or similar: back off rather than spin.
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let _ = stream.set_nodelay(true);
        let shared = Arc::clone(&shared);
        let upstream = upstream.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                handle(Arc::clone(&shared), upstream.clone(), request)
            });
            // No header read timeout: it would close idle keep-alive connections, a fault of
            // its own that no plan asked for.
            let _ = hyper::server::conn::http1::Builder::new()
                .keep_alive(true)
                .header_read_timeout(None)
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// Serves one request according to the plan.
async fn handle(
    shared: Arc<Shared>,
    upstream: Upstream,
    request: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Dropped> {
    let (parts, body) = request.into_parts();
    // Read the whole request first, whatever happens to it: with the body left unread hyper
    // may not keep the connection alive, a drop the plan did not ask for.
    let Ok(body) = body
        .collect()
        .await
        .map(http_body_util::Collected::to_bytes)
    else {
        return Err(Dropped); // the client went away mid-body
    };
    let op = operation_of(
        parts.method.as_str(),
        parts.uri.path_and_query().map_or("/", |pq| pq.as_str()),
    );
    let fault = shared.lock().decide(op, Instant::now());
    match fault {
        // As in shared/fixtures/aws/iot-error-throttling.txt (the API reference lists 400 for
        // ThrottlingException; the error type header is what clients go by either way).
        Fault::QuotaThrottle | Fault::Throttle => Ok(aws_error(
            StatusCode::TOO_MANY_REQUESTS,
            "ThrottlingException",
            "Rate exceeded",
            &shared.request_id(),
        )),
        Fault::ServerError { unavailable: false } => Ok(aws_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "InternalFailureException",
            "Internal failure.",
            &shared.request_id(),
        )),
        Fault::ServerError { unavailable: true } => Ok(aws_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "ServiceUnavailableException",
            "Service unavailable.",
            &shared.request_id(),
        )),
        Fault::DropBefore => Err(Dropped),
        Fault::DropAfter | Fault::Slow(_) | Fault::Forward => {
            let response = match forward(&upstream, shared.upstream, parts, body).await {
                Ok(response) => response,
                // The client is dropped either way: it cannot tell the difference.
                Err(_) if fault == Fault::DropAfter => return Err(Dropped),
                Err(e) => return Ok(bad_gateway(shared.upstream, &*e)),
            };
            {
                let mut state = shared.lock();
                state.stats.forwarded += 1;
                *state.stats.by_operation.entry(op.to_owned()).or_default() += 1;
            }
            match fault {
                Fault::DropAfter => Err(Dropped),
                Fault::Slow(by) => {
                    tokio::time::sleep(by).await;
                    Ok(response)
                }
                _ => Ok(response),
            }
        }
    }
}

/// Headers that describe one connection, not the message (RFC 9110 section 7.6.1); the proxy
/// has its own connections on each side, so it neither forwards these nor passes them back.
const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

fn strip_hop_by_hop(headers: &mut HeaderMap) {
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
}

/// Sends the request upstream and reads its whole answer.
async fn forward(
    client: &Upstream,
    upstream: SocketAddr,
    mut parts: Parts,
    body: Bytes,
) -> Result<Response<Full<Bytes>>, Box<dyn std::error::Error + Send + Sync>> {
    let path_and_query = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
    parts.uri = format!("http://{upstream}{path_and_query}").parse()?;
    strip_hop_by_hop(&mut parts.headers);
    let response = client
        .request(Request::from_parts(parts, Full::new(body)))
        .await?;
    let (mut parts, body) = response.into_parts();
    let body = body.collect().await?.to_bytes();
    strip_hop_by_hop(&mut parts.headers);
    Ok(Response::from_parts(parts, Full::new(body)))
}

/// An AWS restJson1 error answer, as AWS IoT sends it.
///
/// Header names go out lower-case (HTTP/1 names are case-insensitive; the SDK reads them so).
fn aws_error(
    status: StatusCode,
    code: &'static str,
    message: &str,
    request_id: &str,
) -> Response<Full<Bytes>> {
    let body = serde_json::json!({ "message": message }).to_string();
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        HeaderName::from_static("x-amzn-errortype"),
        HeaderValue::from_static(code),
    );
    if let Ok(id) = HeaderValue::from_str(request_id) {
        headers.insert(HeaderName::from_static("x-amzn-requestid"), id);
    }
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

/// The answer when the upstream itself failed: a harness problem, not a planned fault.
fn bad_gateway(upstream: SocketAddr, error: &dyn std::error::Error) -> Response<Full<Bytes>> {
    let mut text = format!("fault proxy: upstream {upstream} failed: {error}");
    let mut source = error.source();
    while let Some(cause) = source {
        let _ = write!(text, ": {cause}");
        source = cause.source();
    }
    let mut response = Response::new(Full::new(Bytes::from(text)));
    *response.status_mut() = StatusCode::BAD_GATEWAY;
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::sync::atomic::AtomicUsize;

    use aws_config::retry::RetryConfig;
    use aws_sdk_iot::config::{BehaviorVersion, Credentials, Region};
    use aws_sdk_iot::error::{ProvideErrorMetadata, SdkError};
    use aws_sdk_iot::operation::RequestId;

    use crate::moto::{MotoServer, REGION};
    use crate::proc::port_is_closed;

    /// An AWS IoT client for `url` with the given retry configuration.
    async fn iot_client_with(url: &str, retry: RetryConfig) -> aws_sdk_iot::Client {
        let sdk_config = aws_config::defaults(BehaviorVersion::latest())
            .endpoint_url(url)
            .region(Region::new(REGION))
            .credentials_provider(Credentials::new(
                "testing", "testing", None, None, "testkit",
            ))
            .load()
            .await;
        let config = aws_sdk_iot::config::Builder::from(&sdk_config)
            .retry_config(retry)
            .build();
        aws_sdk_iot::Client::from_conf(config)
    }

    /// An AWS IoT client for `url` with retries disabled.
    async fn iot_client(url: &str) -> aws_sdk_iot::Client {
        iot_client_with(url, RetryConfig::disabled()).await
    }

    /// A well-formed certificate id nobody registered.
    fn unknown_certificate_id() -> String {
        "ab".repeat(32)
    }

    /// An upstream that answers `ok` to everything and counts what it saw.
    fn counting_upstream() -> (crate::server::BackgroundServer, Arc<AtomicUsize>) {
        let seen = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&seen);
        let router = axum::Router::new().fallback(move || {
            let counter = Arc::clone(&counter);
            async move {
                counter.fetch_add(1, Ordering::SeqCst);
                "ok"
            }
        });
        let server = crate::server::BackgroundServer::start("counting-upstream", router).unwrap();
        (server, seen)
    }

    /// Writes `request` on a fresh connection and reads until the proxy closes it.
    fn raw_exchange(addr: SocketAddr, request: &[u8]) -> Vec<u8> {
        let mut stream = std::net::TcpStream::connect(addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        stream.write_all(request).unwrap();
        let mut received = Vec::new();
        match stream.read_to_end(&mut received) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            Err(e) => panic!("reading from the proxy: {e}"),
        }
        received
    }

    #[test]
    fn operation_of_names_every_mapped_call() {
        let id = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
        let arn = "arn%3Aaws%3Aiot%3Aus-east-1%3A123456789012%3Acert%2Fabc";
        let cases = [
            ("GET", format!("/certificates/{id}"), "DescribeCertificate"),
            (
                "PUT",
                format!("/certificates/{id}?newStatus=ACTIVE"),
                "UpdateCertificate",
            ),
            (
                "DELETE",
                format!("/certificates/{id}?forceDelete=true"),
                "DeleteCertificate",
            ),
            (
                "GET",
                "/certificates?pageSize=250".to_owned(),
                "ListCertificates",
            ),
            (
                "GET",
                format!("/cacertificate/{id}"),
                "DescribeCACertificate",
            ),
            (
                "POST",
                "/cacertificate?setAsActive=true&allowAutoRegistration=true".to_owned(),
                "RegisterCACertificate",
            ),
            (
                "PUT",
                format!("/cacertificate/{id}?newStatus=ACTIVE"),
                "UpdateCACertificate",
            ),
            (
                "DELETE",
                format!("/cacertificate/{id}"),
                "DeleteCACertificate",
            ),
            ("GET", "/cacertificates".to_owned(), "ListCACertificates"),
            (
                "POST",
                "/certificate/register".to_owned(),
                "RegisterCertificate",
            ),
            (
                "POST",
                "/certificate/register-no-ca".to_owned(),
                "RegisterCertificateWithoutCA",
            ),
            (
                "GET",
                format!("/certificates-by-ca/{id}?pageSize=250&marker=x"),
                "ListCertificatesByCA",
            ),
            ("POST", "/things/device-1".to_owned(), "CreateThing"),
            (
                "DELETE",
                "/things/device-1?expectedVersion=2".to_owned(),
                "DeleteThing",
            ),
            ("GET", "/things/device%201".to_owned(), "DescribeThing"),
            ("PATCH", "/things/device-1".to_owned(), "UpdateThing"),
            ("GET", "/things?maxResults=10".to_owned(), "ListThings"),
            (
                "PUT",
                "/things/device-1/principals".to_owned(),
                "AttachThingPrincipal",
            ),
            (
                "DELETE",
                "/things/device-1/principals".to_owned(),
                "DetachThingPrincipal",
            ),
            (
                "GET",
                "/things/device-1/principals".to_owned(),
                "ListThingPrincipals",
            ),
            (
                "GET",
                "/things/device-1/thing-groups".to_owned(),
                "ListThingGroupsForThing",
            ),
            (
                "GET",
                "/principals/things?maxResults=5".to_owned(),
                "ListPrincipalThings",
            ),
            (
                "PUT",
                "/target-policies/device-policy".to_owned(),
                "AttachPolicy",
            ),
            (
                "POST",
                "/target-policies/device-policy".to_owned(),
                "DetachPolicy",
            ),
            (
                "POST",
                format!("/attached-policies/{arn}?recursive=false"),
                "ListAttachedPolicies",
            ),
            (
                "POST",
                "/policy-targets/device-policy".to_owned(),
                "ListTargetsForPolicy",
            ),
            (
                "PUT",
                "/thing-groups/addThingToThingGroup".to_owned(),
                "AddThingToThingGroup",
            ),
            (
                "PUT",
                "/thing-groups/removeThingFromThingGroup".to_owned(),
                "RemoveThingFromThingGroup",
            ),
            ("POST", "/policies/device-policy".to_owned(), "CreatePolicy"),
            ("GET", "/policies/device-policy".to_owned(), "GetPolicy"),
            (
                "DELETE",
                "/policies/device-policy".to_owned(),
                "DeletePolicy",
            ),
            (
                "GET",
                "/endpoint?endpointType=iot:Data-ATS".to_owned(),
                "DescribeEndpoint",
            ),
            ("get", format!("/certificates/{id}"), "DescribeCertificate"),
            ("POST", format!("/certificates/{id}"), "Other"),
            ("GET", "/".to_owned(), "Other"),
            ("GET", "/moto-api/reset".to_owned(), "Other"),
            ("GET", "/things/a/b/c".to_owned(), "Other"),
        ];
        for (method, path, want) in cases {
            assert_eq!(operation_of(method, &path), want, "{method} {path}");
        }
    }

    #[test]
    fn quotas_know_rates_bursts_and_the_slowest_operation() {
        let quotas = Quotas::aws_defaults();
        assert_eq!(quotas.rate("DescribeCertificate"), Some(10.0));
        assert_eq!(quotas.burst("DescribeCertificate"), Some(10.0));
        assert_eq!(quotas.rate("AttachPolicy"), Some(15.0));
        assert_eq!(quotas.rate("CreateThing"), Some(100.0));
        assert_eq!(quotas.rate("RegisterCertificate"), None);
        assert_eq!(
            quotas.slowest(&["CreateThing", "AttachPolicy", "UpdateCertificate", "Other"]),
            Some(("UpdateCertificate", 10.0))
        );
        assert_eq!(quotas.slowest(&["Other", "RegisterCertificate"]), None);
        assert_eq!(quotas.slowest(&[]), None);

        let custom =
            Quotas::default()
                .with("ListThings", 2.0, 0.0)
                .with("CreateThing", f64::NAN, 3.0);
        assert_eq!(custom.rate("ListThings"), Some(2.0));
        assert_eq!(custom.burst("ListThings"), Some(1.0));
        let blocked = Quotas::default().with("UpdateCertificate", 0.0, 0.0);
        assert_eq!(blocked.burst("UpdateCertificate"), Some(0.0));
        assert_eq!(custom.rate("CreateThing"), Some(0.0));
        assert_eq!(
            custom.slowest(&["ListThings", "CreateThing"]),
            Some(("CreateThing", 0.0))
        );
    }

    #[test]
    fn token_bucket_allows_the_burst_then_refills_at_the_rate() {
        let start = Instant::now();
        let mut bucket = TokenBucket::full(
            Limit {
                rate: 10.0,
                burst: 3.0,
            },
            start,
        );
        let taken = (0..5).filter(|_| bucket.try_take(start)).count();
        assert_eq!(taken, 3);
        assert!(!bucket.try_take(start + Duration::from_millis(50)));
        assert!(bucket.try_take(start + Duration::from_millis(101)));
        assert!(!bucket.try_take(start + Duration::from_millis(120)));
        // A long pause saves up no more than the burst.
        let later = start + Duration::from_secs(60);
        assert_eq!((0..10).filter(|_| bucket.try_take(later)).count(), 3);
    }

    #[test]
    fn draws_are_deterministic_per_seed_and_follow_the_probabilities() {
        let plan = FaultPlan {
            seed: 7,
            throttle: 0.1,
            server_error: 0.1,
            drop_before: 0.1,
            drop_after: 0.1,
            slow: 0.1,
            slow_by: Duration::from_millis(5),
            quotas: None,
        };
        let now = Instant::now();
        let run = |plan: &FaultPlan| {
            let mut state = State::new(plan.clone(), now);
            (0..10_000)
                .map(|_| state.decide("ListThings", now))
                .collect::<Vec<_>>()
        };
        let first = run(&plan);
        assert_eq!(first, run(&plan));
        assert_ne!(first, run(&FaultPlan { seed: 8, ..plan }));
        let share = |pred: &dyn Fn(&Fault) -> bool| {
            #[allow(clippy::cast_precision_loss)] // small counts
            let n = first.iter().filter(|f| pred(f)).count() as f64;
            n / 10_000.0
        };
        for (what, got) in [
            ("throttle", share(&|f| *f == Fault::Throttle)),
            (
                "500",
                share(&|f| *f == Fault::ServerError { unavailable: false }),
            ),
            (
                "503",
                share(&|f| *f == Fault::ServerError { unavailable: true }),
            ),
            ("drop_before", share(&|f| *f == Fault::DropBefore)),
            ("drop_after", share(&|f| *f == Fault::DropAfter)),
            ("slow", share(&|f| matches!(f, Fault::Slow(_)))),
            ("forward", share(&|f| *f == Fault::Forward)),
        ] {
            let want = match what {
                "500" | "503" => 0.05,
                "forward" => 0.5,
                _ => 0.1,
            };
            assert!((got - want).abs() < 0.02, "{what}: {got}");
        }
        // The default plan never draws a fault.
        let mut state = State::new(FaultPlan::default(), now);
        assert!((0..1000).all(|_| state.decide("ListThings", now) == Fault::Forward));
    }

    #[tokio::test]
    async fn throttled_calls_fail_with_throttling_exception_and_are_not_forwarded() {
        let moto = MotoServer::start().unwrap();
        let plan = FaultPlan {
            throttle: 1.0,
            ..FaultPlan::default()
        };
        let proxy = FaultProxy::for_url(&moto.endpoint(), plan).unwrap();
        let client = iot_client(&proxy.url()).await;

        let err = client
            .describe_certificate()
            .certificate_id(unknown_certificate_id())
            .send()
            .await
            .unwrap_err();
        assert!(matches!(err, SdkError::ServiceError(_)), "{err:?}");
        assert_eq!(err.code(), Some("ThrottlingException"), "{err:?}");
        assert_eq!(err.message(), Some("Rate exceeded"));
        assert_eq!(err.raw_response().map(|r| r.status().as_u16()), Some(429));
        assert!(err.request_id().is_some_and(|id| id.len() == 36), "{err:?}");
        let stats = proxy.stats();
        assert_eq!(stats.requests, 1);
        assert_eq!(stats.throttled, 1);
        assert_eq!(stats.forwarded, 0);
        assert!(stats.by_operation.is_empty());

        // The SDK's standard retry strategy sees it as throttling and tries again.
        let retrying = iot_client_with(
            &proxy.url(),
            RetryConfig::standard()
                .with_max_attempts(3)
                .with_initial_backoff(Duration::from_millis(5)),
        )
        .await;
        let err = retrying.list_things().send().await.unwrap_err();
        assert_eq!(err.code(), Some("ThrottlingException"));
        assert_eq!(proxy.stats().throttled, 4);
    }

    #[tokio::test]
    async fn server_errors_are_internal_failure_or_service_unavailable() {
        let moto = MotoServer::start().unwrap();
        let plan = FaultPlan {
            seed: 3,
            server_error: 1.0,
            ..FaultPlan::default()
        };
        let proxy = FaultProxy::for_url(&moto.endpoint(), plan).unwrap();
        let client = iot_client(&proxy.url()).await;

        let mut seen = BTreeMap::new();
        for _ in 0..12 {
            let err = client.list_things().send().await.unwrap_err();
            assert!(matches!(err, SdkError::ServiceError(_)), "{err:?}");
            let status = err.raw_response().map(|r| r.status().as_u16());
            let code = err.code().map(str::to_owned);
            match (status, code.as_deref()) {
                (Some(500), Some("InternalFailureException"))
                | (Some(503), Some("ServiceUnavailableException")) => {}
                other => panic!("unexpected answer {other:?}: {err:?}"),
            }
            *seen.entry(status).or_insert(0) += 1;
        }
        assert_eq!(seen.len(), 2, "both 500 and 503 should occur: {seen:?}");
        let stats = proxy.stats();
        assert_eq!(stats.server_errors, 12);
        assert_eq!(stats.forwarded, 0);
    }

    #[tokio::test]
    async fn dropped_connections_fail_at_the_client_before_or_after_taking_effect() {
        let moto = MotoServer::start().unwrap();
        let plan = FaultPlan {
            drop_before: 1.0,
            ..FaultPlan::default()
        };
        let proxy = FaultProxy::for_url(&moto.endpoint(), plan).unwrap();
        let client = iot_client(&proxy.url()).await;

        let err = client
            .create_thing()
            .thing_name("dropped-before")
            .send()
            .await
            .unwrap_err();
        assert!(
            matches!(
                err,
                SdkError::DispatchFailure(_) | SdkError::ResponseError(_)
            ),
            "{err:?}"
        );
        proxy.set_plan(FaultPlan::default());
        let err = client
            .describe_thing()
            .thing_name("dropped-before")
            .send()
            .await
            .unwrap_err();
        assert_eq!(err.code(), Some("ResourceNotFoundException"), "{err:?}");

        proxy.set_plan(FaultPlan {
            drop_after: 1.0,
            ..FaultPlan::default()
        });
        let err = client
            .create_thing()
            .thing_name("dropped-after")
            .send()
            .await
            .unwrap_err();
        assert!(
            matches!(
                err,
                SdkError::DispatchFailure(_) | SdkError::ResponseError(_)
            ),
            "{err:?}"
        );
        proxy.set_plan(FaultPlan::default());
        let thing = client
            .describe_thing()
            .thing_name("dropped-after")
            .send()
            .await
            .unwrap();
        assert_eq!(thing.thing_name(), Some("dropped-after"));

        let stats = proxy.stats();
        assert_eq!(stats.requests, 4);
        assert_eq!(stats.dropped_before, 1);
        assert_eq!(stats.dropped_after, 1);
        assert_eq!(stats.forwarded, 3);
        assert_eq!(stats.by_operation.get("CreateThing"), Some(&1));
        assert_eq!(stats.by_operation.get("DescribeThing"), Some(&2));
    }

    #[test]
    fn drops_close_the_connection_without_a_byte_of_answer() {
        let (upstream, seen) = counting_upstream();
        let plan = FaultPlan {
            drop_before: 1.0,
            ..FaultPlan::default()
        };
        let proxy = FaultProxy::start(upstream.addr(), plan).unwrap();
        let request = b"POST /things/x HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\n\r\n{}";
        assert_eq!(raw_exchange(proxy.addr(), request), b"");
        assert_eq!(seen.load(Ordering::SeqCst), 0);

        proxy.set_plan(FaultPlan {
            drop_after: 1.0,
            ..FaultPlan::default()
        });
        assert_eq!(raw_exchange(proxy.addr(), request), b"");
        assert_eq!(seen.load(Ordering::SeqCst), 1);

        // And a fault-free plan answers on the same kind of connection.
        proxy.set_plan(FaultPlan::default());
        let answer = raw_exchange(
            proxy.addr(),
            b"GET /things HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n",
        );
        let answer = String::from_utf8(answer).unwrap();
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(answer.ends_with("\r\n\r\nok"), "{answer}");
    }

    #[tokio::test]
    async fn slow_answers_arrive_after_the_delay() {
        let moto = MotoServer::start().unwrap();
        let plan = FaultPlan {
            slow: 1.0,
            slow_by: Duration::from_millis(300),
            ..FaultPlan::default()
        };
        let proxy = FaultProxy::for_url(&moto.endpoint(), plan).unwrap();
        let client = iot_client(&proxy.url()).await;

        let started = Instant::now();
        let things = client.list_things().send().await.unwrap();
        let took = started.elapsed();
        assert!(things.things().is_empty());
        assert!(took >= Duration::from_millis(300), "{took:?}");
        assert!(took < Duration::from_secs(3), "{took:?}");
        let stats = proxy.stats();
        assert_eq!(stats.slowed, 1);
        assert_eq!(stats.forwarded, 1);
    }

    #[tokio::test]
    async fn quotas_throttle_an_operation_beyond_its_rate() {
        let moto = MotoServer::start().unwrap();
        let quotas = Quotas::aws_defaults();
        let (rate, burst) = (
            quotas.rate("DescribeCertificate").unwrap(),
            quotas.burst("DescribeCertificate").unwrap(),
        );
        let plan = FaultPlan {
            quotas: Some(quotas),
            ..FaultPlan::default()
        };
        let proxy = FaultProxy::for_url(&moto.endpoint(), plan).unwrap();
        let client = iot_client(&proxy.url()).await;

        // Waves of concurrent calls: tokens are taken as requests arrive, so how fast moto
        // answers (slow on a busy machine) does not change how many get through.
        let started = Instant::now();
        let wave = |n: usize| {
            let mut calls = tokio::task::JoinSet::new();
            for _ in 0..n {
                let client = client.clone();
                calls.spawn(async move {
                    client
                        .describe_certificate()
                        .certificate_id(unknown_certificate_id())
                        .send()
                        .await
                        .unwrap_err()
                });
            }
            async move {
                let (mut passed, mut throttled) = (0u64, 0u64);
                while let Some(err) = calls.join_next().await {
                    let err = err.unwrap();
                    match err.code() {
                        Some("ResourceNotFoundException") => passed += 1,
                        Some("ThrottlingException") => throttled += 1,
                        _ => panic!("unexpected error {err:?}"),
                    }
                }
                (passed, throttled)
            }
        };
        let (first_passed, first_throttled) = wave(40).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let (second_passed, second_throttled) = wave(20).await;
        let elapsed = started.elapsed().as_secs_f64();

        let (passed, throttled) = (
            first_passed + second_passed,
            first_throttled + second_throttled,
        );
        assert_eq!(passed + throttled, 60);
        let stats = proxy.stats();
        assert_eq!(stats.by_operation.get("DescribeCertificate"), Some(&passed));
        assert_eq!(stats.forwarded, passed);
        assert_eq!(stats.quota_throttled, throttled);
        assert_eq!(stats.throttled, 0);
        #[allow(clippy::cast_precision_loss)] // small counts
        let (first, second, forwarded) = (first_passed as f64, second_passed as f64, passed as f64);
        assert!(first >= burst, "first wave: {first} forwarded");
        assert!(
            forwarded <= burst + rate * elapsed + 1.0,
            "{forwarded} forwarded in {elapsed}s"
        );
        // Half a second refills about five tokens.
        assert!(
            second >= rate * 0.5 - 1.0,
            "second wave: {second} forwarded"
        );

        // Other operations have their own buckets.
        client.list_things().send().await.unwrap();
    }

    #[test]
    fn dropping_the_proxy_closes_its_port_and_connections() {
        let (upstream, _) = counting_upstream();
        let proxy = FaultProxy::start(upstream.addr(), FaultPlan::default()).unwrap();
        let addr = proxy.addr();
        let mut open = std::net::TcpStream::connect(addr).unwrap();
        open.write_all(b"GET /things HTTP/1.1\r\nHost: h\r\n\r\n")
            .unwrap();
        open.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut answer = [0u8; 12];
        open.read_exact(&mut answer).unwrap();
        assert_eq!(&answer, b"HTTP/1.1 200");
        assert!(format!("{proxy:?}").contains("FaultProxy"));

        drop(proxy);
        assert!(port_is_closed(addr), "{addr} still open");
        // The keep-alive connection is closed too: the rest of the answer, then EOF.
        let mut rest = Vec::new();
        match open.read_to_end(&mut rest) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            Err(e) => panic!("{e}"),
        }
    }
}
