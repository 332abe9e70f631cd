//! The test kit's one HTTP proxy, in front of moto (AWS IoT) or the fake balena API: added
//! latency, faults, quotas, and answers of its own for the calls moto cannot answer, with every
//! request recorded.
//!
//! [`Proxy`] listens on `127.0.0.1` and forwards each request to an upstream, unless its
//! [`FaultPlan`] says otherwise. Each request is first held for the plan's `latency` (from its
//! arrival; both sockets set TCP_NODELAY, so a Nagle/delayed-ACK stall never adds to it), and
//! recorded ([`ProxiedRequest`]: method, target, body, arrival), so a benchmark can count round
//! trips and see which ones overlapped. An answer registered with [`Proxy::answer`] for the
//! request's operation is sent instead of forwarding (a registration race, an operation moto
//! answers with 500). Otherwise it checks the operation's quota
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
    /// How long every request is held, from its arrival, before anything else happens to it.
    pub latency: Duration,
}

/// One request as it passed through the proxy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxiedRequest {
    /// HTTP method, e.g. `GET`.
    pub method: String,
    /// Request target as sent, e.g. `/certificates/abc?x=1`.
    pub target: String,
    /// The body, as text (lossy UTF-8).
    pub body: String,
    /// When the request reached the proxy (before the latency).
    pub arrived: Instant,
}

/// An answer the proxy sends itself, shaped like AWS IoT's (restJson1).
#[derive(Debug, Clone, PartialEq)]
pub struct Canned {
    /// HTTP status.
    pub status: u16,
    /// `x-amzn-ErrorType`, for an error.
    pub error_type: Option<&'static str>,
    /// The JSON body.
    pub body: serde_json::Value,
}

impl Canned {
    /// HTTP 200 with `body`.
    pub fn ok(body: serde_json::Value) -> Canned {
        Canned {
            status: 200,
            error_type: None,
            body,
        }
    }

    /// An AWS error: `status`, the error type, and `body` (with its `message`).
    pub fn error(status: u16, error_type: &'static str, body: serde_json::Value) -> Canned {
        Canned {
            status,
            error_type: Some(error_type),
            body,
        }
    }

    /// As in testdata/aws/iot-error-not-found.txt.
    pub fn not_found() -> Canned {
        Canned::error(
            404,
            "ResourceNotFoundException",
            serde_json::json!({"message": "The certificate given in the request does not exist"}),
        )
    }
}

/// A function that answers requests of one operation: `Some` to answer, `None` to go on.
type Answerer = Box<dyn Fn(&ProxiedRequest) -> Option<Canned> + Send + Sync>;

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
pub struct Proxy {
    server: BackgroundServer,
    upstream: SocketAddr,
    shared: Arc<Shared>,
}

impl fmt::Debug for Proxy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Proxy")
            .field("addr", &self.addr())
            .field("upstream", &self.upstream)
            .field("plan", &self.shared.lock().plan)
            .finish_non_exhaustive()
    }
}

impl Proxy {
    /// Starts a proxy on a free loopback port that forwards to `upstream` as `plan` says.
    pub fn start(upstream: SocketAddr, plan: FaultPlan) -> Result<Proxy> {
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
        Ok(Proxy {
            server,
            upstream,
            shared,
        })
    }

    /// Starts a proxy in front of an `http://IP:PORT` base URL (as the servers in this crate give).
    pub fn for_url(upstream_url: &str, plan: FaultPlan) -> Result<Proxy> {
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
        let mut fresh = State::new(plan, Instant::now());
        fresh.stats = std::mem::take(&mut state.stats);
        fresh.log = std::mem::take(&mut state.log);
        fresh.answers = std::mem::take(&mut state.answers);
        *state = fresh;
    }

    /// What the proxy has done so far.
    pub fn stats(&self) -> FaultStats {
        self.shared.lock().stats.clone()
    }

    /// Answers requests for `op` (as [`operation_of`] names it) with `answer` instead of
    /// forwarding them, whenever it returns `Some`. Replaces any earlier answerer for `op`.
    pub fn answer(
        &self,
        op: &'static str,
        answer: impl Fn(&ProxiedRequest) -> Option<Canned> + Send + Sync + 'static,
    ) {
        self.shared.lock().answers.insert(op, Box::new(answer));
    }

    /// Every request so far, in arrival order.
    pub fn requests(&self) -> Vec<ProxiedRequest> {
        self.shared.lock().log.clone()
    }

    /// How many requests have arrived so far.
    pub fn count(&self) -> usize {
        self.shared.lock().log.len()
    }

    /// The requests from the `from`-th on (e.g. `from` = a [`count`](Self::count) taken earlier).
    pub fn requests_since(&self, from: usize) -> Vec<ProxiedRequest> {
        self.shared
            .lock()
            .log
            .get(from..)
            .map(<[_]>::to_vec)
            .unwrap_or_default()
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
        ("GET", ["registrationcode"]) => "GetRegistrationCode",
        _ => "Other",
    }
}

/// The operation an `X-Amz-Target` header names (`TrentService.Sign` is `Sign`), for the
/// JSON-protocol services jitr calls; `"Other"` for the rest.
pub fn operation_of_target(header: &str) -> &'static str {
    const KNOWN: [&str; 12] = [
        "Sign",
        "GetPublicKey",
        "CreateKey",
        "CreateAlias",
        "DescribeKey",
        "ScheduleKeyDeletion",
        "PutItem",
        "GetItem",
        "UpdateItem",
        "Query",
        "SendMessage",
        "ReceiveMessage",
    ];
    let name = header.rsplit('.').next().unwrap_or_default();
    KNOWN.into_iter().find(|k| *k == name).unwrap_or("Other")
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
    log: Vec<ProxiedRequest>,
    answers: BTreeMap<&'static str, Answerer>,
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
            log: Vec::new(),
            answers: BTreeMap::new(),
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
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let upstream: Upstream = Client::builder(TokioExecutor::new()).build(connector);
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
    let arrived = Instant::now();
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
    let target = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
    // JSON-protocol services (KMS, DynamoDB, SQS) name the operation in a header.
    let op = match parts
        .headers
        .get("x-amz-target")
        .and_then(|v| v.to_str().ok())
    {
        Some(header) => operation_of_target(header),
        None => operation_of(parts.method.as_str(), target),
    };
    let seen = ProxiedRequest {
        method: parts.method.to_string(),
        target: target.to_owned(),
        body: String::from_utf8_lossy(&body).into_owned(),
        arrived,
    };
    let (latency, canned) = {
        let mut state = shared.lock();
        let canned = state.answers.get(op).and_then(|answer| answer(&seen));
        state.log.push(seen);
        (state.plan.latency, canned)
    };
    tokio::time::sleep_until((arrived + latency).into()).await;
    if let Some(canned) = canned {
        return Ok(canned_response(&canned, &shared.request_id()));
    }
    let fault = shared.lock().decide(op, Instant::now());
    match fault {
        // As in testdata/aws/iot-error-throttling.txt (the API reference lists 400 for
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

/// A [`Canned`] answer as AWS IoT would send it.
fn canned_response(canned: &Canned, request_id: &str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(canned.body.to_string())));
    *response.status_mut() = StatusCode::from_u16(canned.status).unwrap_or(StatusCode::OK);
    let headers = response.headers_mut();
    if let Some(code) = canned.error_type {
        headers.insert(
            HeaderName::from_static("x-amzn-errortype"),
            HeaderValue::from_static(code),
        );
    }
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
mod tests;
