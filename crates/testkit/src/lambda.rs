//! An emulator of the AWS Lambda Runtime API (`2018-06-01`), the API `lambda_runtime` 1.x
//! polls, so the real `bootstrap` binary can be run end to end.
//!
//! Start the emulator, run `bootstrap` with [`RuntimeEmulator::lambda_env`], then call
//! [`RuntimeEmulator::invoke`]: each event is handed out by one `GET .../invocation/next` (a
//! long poll, as in Lambda) and `invoke` returns what the runtime posts back for it.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, RecvTimeoutError, SyncSender};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Result};
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{json, Value};
use tokio::sync::mpsc;

use crate::server::BackgroundServer;

/// The function name the emulator pretends to run.
pub const FUNCTION_NAME: &str = "jitr-activator";

/// The ARN sent in `Lambda-Runtime-Invoked-Function-Arn`.
pub const FUNCTION_ARN: &str = "arn:aws:lambda:us-east-1:123456789012:function:jitr-activator";

/// Function timeout used for `Lambda-Runtime-Deadline-Ms` unless changed.
pub const DEFAULT_FUNCTION_TIMEOUT: Duration = Duration::from_secs(30);

/// Largest response or error body Lambda accepts (6 MB, synchronous invocation).
const MAX_BODY: usize = 6 * 1024 * 1024;

/// What the runtime posted back for one event.
#[derive(Debug, Clone, PartialEq)]
pub enum Invocation {
    /// `POST .../invocation/{id}/response`: the handler's JSON result.
    Response(Value),
    /// `POST .../invocation/{id}/error`: the handler failed.
    Error {
        /// `errorType` from the body (or the `Lambda-Runtime-Function-Error-Type` header).
        error_type: String,
        /// `errorMessage` from the body (or the raw body).
        error_message: String,
    },
}

/// A running Runtime API emulator; dropping it stops the server.
pub struct RuntimeEmulator {
    server: BackgroundServer,
    shared: Arc<Shared>,
}

impl fmt::Debug for RuntimeEmulator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RuntimeEmulator")
            .field("address", &self.address())
            .field("polls", &self.polls())
            .finish_non_exhaustive()
    }
}

/// An event waiting for a `next` poll.
struct Queued {
    request_id: String,
    event: Value,
}

/// State shared by the server and the `invoke` callers.
struct Shared {
    queue: mpsc::UnboundedSender<Queued>,
    pending: tokio::sync::Mutex<mpsc::UnboundedReceiver<Queued>>,
    /// Callers still waiting for an answer, by request id.
    waiters: Mutex<HashMap<String, SyncSender<Invocation>>>,
    function_timeout: Mutex<Duration>,
    first_poll_at: OnceLock<Instant>,
    polls: AtomicUsize,
    init_error: Mutex<Option<Value>>,
}

impl Shared {
    fn waiters(&self) -> MutexGuard<'_, HashMap<String, SyncSender<Invocation>>> {
        self.waiters.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn init_error(&self) -> MutexGuard<'_, Option<Value>> {
        self.init_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn function_timeout(&self) -> Duration {
        *self
            .function_timeout
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

impl RuntimeEmulator {
    /// Starts the emulator on a free loopback port.
    pub fn start() -> Result<Self> {
        let (queue, pending) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            queue,
            pending: tokio::sync::Mutex::new(pending),
            waiters: Mutex::new(HashMap::new()),
            function_timeout: Mutex::new(DEFAULT_FUNCTION_TIMEOUT),
            first_poll_at: OnceLock::new(),
            polls: AtomicUsize::new(0),
            init_error: Mutex::new(None),
        });
        let router = axum::Router::new()
            .route("/2018-06-01/runtime/invocation/next", get(next))
            .route(
                "/2018-06-01/runtime/invocation/{request_id}/response",
                post(response),
            )
            .route(
                "/2018-06-01/runtime/invocation/{request_id}/error",
                post(invocation_error),
            )
            .route("/2018-06-01/runtime/init/error", post(init_error))
            .layer(DefaultBodyLimit::max(MAX_BODY))
            .with_state(Arc::clone(&shared));
        let server = BackgroundServer::start("lambda-runtime-api", router)?;
        Ok(Self { server, shared })
    }

    /// `127.0.0.1:PORT`, the value for `AWS_LAMBDA_RUNTIME_API`.
    pub fn address(&self) -> String {
        self.server.addr().to_string()
    }

    /// The environment Lambda gives a function: what `lambda_runtime` needs to start.
    pub fn lambda_env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_LAMBDA_RUNTIME_API", self.address()),
            ("AWS_LAMBDA_FUNCTION_NAME", FUNCTION_NAME.to_owned()),
            ("AWS_LAMBDA_FUNCTION_VERSION", "$LATEST".to_owned()),
            ("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "128".to_owned()),
            (
                "AWS_LAMBDA_LOG_GROUP_NAME",
                format!("/aws/lambda/{FUNCTION_NAME}"),
            ),
            (
                "AWS_LAMBDA_LOG_STREAM_NAME",
                "2025/01/01/[$LATEST]testkit".to_owned(),
            ),
        ]
    }

    /// Sets the function timeout that deadlines are computed from (default 30 s).
    pub fn set_function_timeout(&self, timeout: Duration) {
        *self
            .shared
            .function_timeout
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = timeout;
    }

    /// When the runtime first polled `next` (the end of its cold start), if it has.
    pub fn first_poll_at(&self) -> Option<Instant> {
        self.shared.first_poll_at.get().copied()
    }

    /// How many `next` polls have arrived.
    pub fn polls(&self) -> usize {
        self.shared.polls.load(Ordering::SeqCst)
    }

    /// The body the runtime posted to `init/error`, if it did.
    pub fn init_error(&self) -> Option<Value> {
        self.shared.init_error().clone()
    }

    /// Queues `event`, waits for the runtime to answer it, and returns the answer.
    ///
    /// Fails after `timeout`, or as soon as the runtime reports an init error. Callable from
    /// several threads at once; events are handed out one per `next` poll, in order.
    pub fn invoke(&self, event: Value, timeout: Duration) -> Result<Invocation> {
        let deadline = Instant::now() + timeout;
        let request_id = new_request_id();
        let (answer, answered) = sync_channel(1);
        self.shared.waiters().insert(request_id.clone(), answer);
        let queued = Queued {
            request_id: request_id.clone(),
            event,
        };
        if self.shared.queue.send(queued).is_err() {
            self.shared.waiters().remove(&request_id);
            bail!("the Runtime API emulator has stopped");
        }
        loop {
            let slice = deadline
                .saturating_duration_since(Instant::now())
                .min(Duration::from_millis(100));
            match answered.recv_timeout(slice) {
                Ok(invocation) => return Ok(invocation),
                Err(RecvTimeoutError::Disconnected) => {
                    bail!("invocation {request_id} was dropped without an answer")
                }
                Err(RecvTimeoutError::Timeout) => {}
            }
            let init_error = self.init_error();
            if init_error.is_some() || Instant::now() >= deadline {
                // Withdraw the event; an answer may have raced in just now.
                self.shared.waiters().remove(&request_id);
                if let Ok(invocation) = answered.try_recv() {
                    return Ok(invocation);
                }
                return Err(match init_error {
                    Some(error) => anyhow!("the runtime failed to initialise: {error}"),
                    None => anyhow!(
                        "no answer for invocation {request_id} within {timeout:?} ({} polls so far)",
                        self.polls()
                    ),
                });
            }
        }
    }
}

/// How one event of an asynchronous delivery ended.
#[derive(Debug, Clone, PartialEq)]
pub struct Delivered {
    /// The event's index in the delivered list.
    pub index: usize,
    /// How many times the function ran for it (1 + retries).
    pub attempts: u32,
    /// The last answer: a response, or the error that sent it to the failure queue.
    pub last: Invocation,
}

/// What an asynchronous delivery did ([`RuntimeEmulator::deliver_async`]).
#[derive(Debug, Clone, Default)]
pub struct AsyncDelivery {
    /// Every event's ending, in index order.
    pub events: Vec<Delivered>,
    /// Function runs, retries included.
    pub invocations: usize,
    /// Runs that were retries of a failed one.
    pub retries: usize,
    /// The indices of the events that failed every attempt: what Lambda hands to the
    /// on-failure destination (an SQS queue), in the order they landed there.
    pub failure_queue: Vec<usize>,
    /// From the first hand-out to the last answer.
    pub elapsed: Duration,
}

impl AsyncDelivery {
    /// The events whose function run ended in a response (not in the failure queue).
    pub fn succeeded(&self) -> usize {
        self.events
            .iter()
            .filter(|e| matches!(e.last, Invocation::Response(_)))
            .count()
    }
}

impl RuntimeEmulator {
    /// Delivers `events` the way Lambda runs asynchronous invocations (an IoT rule's Lambda
    /// action): up to `concurrency` runs at once (run as many runtime processes); a run that
    /// ends in an error (or gives no answer within `timeout`) is retried, up to `max_retries`
    /// times (Lambda's default is 2), and an event that fails every attempt goes to the
    /// failure queue. Lambda waits a minute before the first retry and two before the second;
    /// here a retry simply goes to the back of the line, behind every event not yet run.
    pub fn deliver_async(
        &self,
        events: &[Value],
        concurrency: usize,
        max_retries: u32,
        timeout: Duration,
    ) -> AsyncDelivery {
        let line: Mutex<std::collections::VecDeque<(usize, u32)>> =
            Mutex::new((0..events.len()).map(|i| (i, 1)).collect());
        let in_flight = AtomicUsize::new(0);
        let endings: Mutex<Vec<Delivered>> = Mutex::new(Vec::with_capacity(events.len()));
        let failure_queue = Mutex::new(Vec::new());
        let (invocations, retries) = (AtomicUsize::new(0), AtomicUsize::new(0));
        let started = Instant::now();
        std::thread::scope(|scope| {
            for _ in 0..concurrency.max(1) {
                scope.spawn(|| loop {
                    // Take the next run; while others are still running, a retry of theirs
                    // may yet join the line, so wait rather than stop.
                    let next = {
                        let mut line = line.lock().unwrap_or_else(PoisonError::into_inner);
                        let next = line.pop_front();
                        if next.is_some() {
                            in_flight.fetch_add(1, Ordering::SeqCst);
                        }
                        next
                    };
                    let Some((index, attempt)) = next else {
                        if in_flight.load(Ordering::SeqCst) == 0 {
                            break;
                        }
                        std::thread::sleep(Duration::from_millis(5));
                        continue;
                    };
                    invocations.fetch_add(1, Ordering::Relaxed);
                    if attempt > 1 {
                        retries.fetch_add(1, Ordering::Relaxed);
                    }
                    let answer = self
                        .invoke(events[index].clone(), timeout)
                        .unwrap_or_else(|e| Invocation::Error {
                            error_type: "Runtime.NoAnswer".to_owned(),
                            error_message: e.to_string(),
                        });
                    let failed = matches!(answer, Invocation::Error { .. });
                    if failed && attempt <= max_retries {
                        line.lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .push_back((index, attempt + 1));
                    } else {
                        if failed {
                            failure_queue
                                .lock()
                                .unwrap_or_else(PoisonError::into_inner)
                                .push(index);
                        }
                        endings
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .push(Delivered {
                                index,
                                attempts: attempt,
                                last: answer,
                            });
                    }
                    in_flight.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        let mut events = endings.into_inner().unwrap_or_else(PoisonError::into_inner);
        events.sort_by_key(|e| e.index);
        AsyncDelivery {
            events,
            invocations: invocations.into_inner(),
            retries: retries.into_inner(),
            failure_queue: failure_queue
                .into_inner()
                .unwrap_or_else(PoisonError::into_inner),
            elapsed: started.elapsed(),
        }
    }
}

/// `GET /2018-06-01/runtime/invocation/next`: waits for an event and hands it out.
async fn next(State(shared): State<Arc<Shared>>) -> Response {
    shared.first_poll_at.get_or_init(Instant::now);
    shared.polls.fetch_add(1, Ordering::SeqCst);
    let mut pending = shared.pending.lock().await;
    loop {
        // `recv` is cancel-safe: if the runtime hangs up while waiting, no event is lost.
        let Some(queued) = pending.recv().await else {
            return (StatusCode::INTERNAL_SERVER_ERROR, "emulator stopped").into_response();
        };
        if !shared.waiters().contains_key(&queued.request_id) {
            continue; // the caller gave up on this one
        }
        let deadline = SystemTime::now() + shared.function_timeout();
        let deadline_ms = deadline
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis());
        let mut headers = HeaderMap::new();
        let pairs = [
            ("lambda-runtime-aws-request-id", queued.request_id.clone()),
            ("lambda-runtime-deadline-ms", deadline_ms.to_string()),
            (
                "lambda-runtime-invoked-function-arn",
                FUNCTION_ARN.to_owned(),
            ),
            ("lambda-runtime-trace-id", new_trace_id()),
            ("content-type", "application/json".to_owned()),
        ];
        for (name, value) in pairs {
            if let Ok(value) = HeaderValue::from_str(&value) {
                headers.insert(name, value);
            }
        }
        return (StatusCode::OK, headers, queued.event.to_string()).into_response();
    }
}

/// `POST .../invocation/{id}/response`.
async fn response(
    State(shared): State<Arc<Shared>>,
    Path(request_id): Path<String>,
    body: Bytes,
) -> Response {
    let value = serde_json::from_slice(&body)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&body).into_owned()));
    answer(&shared, &request_id, Invocation::Response(value))
}

/// `POST .../invocation/{id}/error`.
async fn invocation_error(
    State(shared): State<Arc<Shared>>,
    Path(request_id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let parsed: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let header_type = headers
        .get("lambda-runtime-function-error-type")
        .and_then(|v| v.to_str().ok());
    let error_type = parsed["errorType"]
        .as_str()
        .or(header_type)
        .unwrap_or("Unknown")
        .to_owned();
    let error_message = parsed["errorMessage"].as_str().map_or_else(
        || String::from_utf8_lossy(&body).into_owned(),
        str::to_owned,
    );
    answer(
        &shared,
        &request_id,
        Invocation::Error {
            error_type,
            error_message,
        },
    )
}

/// Delivers an answer to its waiting caller: 202, or 400 for an unknown request id.
fn answer(shared: &Shared, request_id: &str, invocation: Invocation) -> Response {
    let Some(waiter) = shared.waiters().remove(request_id) else {
        return (
            StatusCode::BAD_REQUEST,
            axum::Json(json!({
                "errorMessage": format!("Invalid request ID: {request_id}"),
                "errorType": "InvalidRequestID"
            })),
        )
            .into_response();
    };
    // Capacity 1 and one answer per id: this never blocks. A caller that has just given up
    // simply never reads it.
    let _ = waiter.try_send(invocation);
    accepted()
}

/// `POST /2018-06-01/runtime/init/error`.
async fn init_error(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let value = serde_json::from_slice(&body).unwrap_or_else(|_| {
        json!({
            "errorType": headers
                .get("lambda-runtime-function-error-type")
                .and_then(|v| v.to_str().ok()),
            "errorMessage": String::from_utf8_lossy(&body),
        })
    });
    *shared.init_error() = Some(value);
    accepted()
}

/// The Runtime API's `202 Accepted` answer.
fn accepted() -> Response {
    (StatusCode::ACCEPTED, axum::Json(json!({"status": "OK"}))).into_response()
}

/// `n` random bytes from the OS CSPRNG (falls back to a time-derived value if that fails).
fn random_bytes<const N: usize>() -> [u8; N] {
    let mut bytes = [0u8; N];
    if aws_lc_rs::rand::fill(&mut bytes).is_err() {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        for (i, byte) in bytes.iter_mut().enumerate() {
            *byte = nanos.to_le_bytes()[i % 16] ^ (i as u8);
        }
    }
    bytes
}

/// A request id shaped like Lambda's (a random UUID).
fn new_request_id() -> String {
    let mut b = random_bytes::<16>();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h = hex::encode(b);
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

/// An X-Ray trace header like Lambda sends.
fn new_trace_id() -> String {
    let seconds = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    format!(
        "Root=1-{seconds:08x}-{};Parent={};Sampled=0",
        hex::encode(random_bytes::<12>()),
        hex::encode(random_bytes::<8>())
    )
}

#[cfg(test)]
mod tests;
