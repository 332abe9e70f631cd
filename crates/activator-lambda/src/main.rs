//! `bootstrap`: the AWS Lambda custom runtime around the jitr activator.
//!
//! Reads configuration once (a bad variable fails the cold start, naming it), builds the
//! SDK and HTTP clients once, then serves certificate-registered events, scheduled sweeps and
//! failure-queue replays. Logs are JSON lines on stdout, one per decision; beside them,
//! CloudWatch Embedded Metric Format lines carry the metrics (no API calls).

use std::process::ExitCode;
use std::time::Duration;

use activator::lambda::{deadline_from_epoch_ms, epoch_ms};
use activator::metrics;
use activator::{
    ActivationError, Activator, Config, Decision, FleetDirectory, Incoming, SweepEvent,
    SweepOptions,
};
use iot::{AccountId, IotRegistry};
use lambda_runtime::{service_fn, Diagnostic, LambdaEvent};
use serde_json::Value;
use tokio::time::Instant;

/// An invocation error, typed for Lambda: `MalformedEvent`, `Retryable` or `Failed`.
#[derive(Debug)]
enum InvocationError {
    /// One event's decision failed.
    Activation(ActivationError),
    /// A scheduled sweep left work for the next one.
    SweepIncomplete { failing: usize, cas: usize },
}

impl From<ActivationError> for InvocationError {
    fn from(e: ActivationError) -> Self {
        InvocationError::Activation(e)
    }
}

impl From<InvocationError> for Diagnostic {
    fn from(e: InvocationError) -> Diagnostic {
        match e {
            InvocationError::Activation(e) => Diagnostic {
                error_type: e.error_type().to_owned(),
                error_message: iot::error_chain(&e),
            },
            InvocationError::SweepIncomplete { failing, cas } => Diagnostic {
                error_type: "Retryable".to_owned(),
                error_message: format!(
                    "sweep left {failing} certificate(s) pending and {cas} CA listing(s) unfinished; see the log"
                ),
            },
        }
    }
}

/// Decisions a scheduled sweep runs at once, well inside AWS IoT's default API quotas.
const SWEEP_CONCURRENCY: usize = 4;

/// What the handler needs besides the activator.
struct Context {
    sweep_min_age: Duration,
    sweep_window: Duration,
    /// The function's name, the `Function` dimension of every metric.
    function: String,
}

/// Prints one decision's metrics line.
fn decision_metrics(ctx: &Context, outcome: &str, started: Instant) {
    let ms = started.elapsed().as_secs_f64() * 1000.0;
    println!(
        "{}",
        metrics::emf_line(
            &ctx.function,
            epoch_ms(),
            &[("Outcome", outcome)],
            &[
                ("Decisions", "Count", 1.0),
                ("DecisionDuration", "Milliseconds", ms)
            ],
        )
    );
}

/// One decision for an event, with its metrics line.
async fn on_registered<R: IotRegistry, F: FleetDirectory>(
    activator: &Activator<R, F>,
    ctx: &Context,
    event: &activator::RegisteredEvent,
    account: Option<&AccountId>,
    deadline: Instant,
) -> Result<Decision, ActivationError> {
    let started = Instant::now();
    let result = activator.handle_event(event, account, deadline).await;
    let outcome = match &result {
        Ok(decision) => decision.outcome.as_str(),
        Err(_) => "failed",
    };
    decision_metrics(ctx, outcome, started);
    result
}

/// One invocation, whatever its kind; generic over the activator's ports so the same code
/// serves the deployed adapters and any other.
async fn handle<R: IotRegistry, F: FleetDirectory>(
    activator: &Activator<R, F>,
    ctx: &Context,
    event: LambdaEvent<Value>,
) -> Result<Value, InvocationError> {
    let (payload, context) = event.into_parts();
    let deadline = deadline_from_epoch_ms(context.deadline);
    let account = AccountId::from_arn(&context.invoked_function_arn);
    let incoming = Incoming::from_value(&payload).map_err(|e| {
        tracing::warn!(error = %e, "event refused");
        InvocationError::from(ActivationError::from(e))
    });
    let result = match incoming {
        Err(e) => Err(e),
        Ok(Incoming::Registered(event)) => {
            on_registered(activator, ctx, &event, account.as_ref(), deadline)
                .await
                // A Decision is plain strings and an enum: it always serializes.
                .map(|d| serde_json::to_value(&d).unwrap_or(Value::Null))
                .map_err(InvocationError::from)
        }
        Ok(Incoming::Sweep) => on_sweep(activator, ctx, deadline).await,
        Ok(Incoming::Replay(records)) => {
            // SQS partial batch response: only records worth retrying go back to the queue.
            let mut failures = Vec::new();
            for record in records {
                match record.event {
                    Err(e) => {
                        tracing::warn!(message_id = %record.message_id, error = %e, "replay record dropped")
                    }
                    Ok(event) => {
                        match on_registered(activator, ctx, &event, account.as_ref(), deadline)
                            .await
                        {
                            Err(e) if e.is_retryable() => failures
                                .push(serde_json::json!({"itemIdentifier": record.message_id})),
                            // Decided, or failed for good (logged by the activator): not retried.
                            _ => {}
                        }
                    }
                }
            }
            Ok(serde_json::json!({"batchItemFailures": failures}))
        }
    };
    println!(
        "{}",
        metrics::counters_line(&ctx.function, epoch_ms(), metrics::take())
    );
    result
}

/// The scheduled sweep over every trusted CA, each on its own and with its own share of the
/// invocation; an error while anything is left (the next scheduled sweep picks it up).
async fn on_sweep<R: IotRegistry, F: FleetDirectory>(
    activator: &Activator<R, F>,
    ctx: &Context,
    deadline: Instant,
) -> Result<Value, InvocationError> {
    let opts = SweepOptions {
        min_age: ctx.sweep_min_age,
        window: Some(ctx.sweep_window),
        now: epoch_ms() / 1000,
        dry_run: false,
        concurrency: SWEEP_CONCURRENCY,
    };
    // Per-decision lines come from the activator's own log; metrics count decisions here.
    let count_decision = |event: SweepEvent<'_>| match event {
        SweepEvent::Decided(d) => decision_metrics(ctx, d.outcome.as_str(), Instant::now()),
        SweepEvent::Failed { .. } => decision_metrics(ctx, "failed", Instant::now()),
        SweepEvent::Page { .. } => {}
    };
    let reports = activator
        .sweep_all(
            &activator.policy().trusted_ca_ids,
            &opts,
            deadline,
            &count_decision,
        )
        .await;
    let (mut failing, mut unfinished) = (0, 0);
    for r in &reports {
        tracing::info!(
            ca_certificate_id = %r.ca_certificate_id,
            pages = r.pages,
            listed = r.listed,
            pending = r.pending,
            activated = r.activated,
            rejected = r.rejected,
            held = r.held,
            failing = r.failing.len(),
            incomplete = r.incomplete.as_deref().unwrap_or(""),
            "sweep"
        );
        println!(
            "{}",
            metrics::emf_line(
                &ctx.function,
                epoch_ms(),
                &[],
                &[
                    ("SweepPages", "Count", r.pages as f64),
                    ("SweepPending", "Count", r.pending as f64),
                    ("SweepFailing", "Count", r.failing.len() as f64),
                    (
                        "SweepIncomplete",
                        "Count",
                        f64::from(u8::from(r.incomplete.is_some()))
                    ),
                ],
            )
        );
        failing += r.failing.len();
        unfinished += usize::from(r.incomplete.is_some());
    }
    if failing > 0 || unfinished > 0 {
        return Err(InvocationError::SweepIncomplete {
            failing,
            cas: unfinished,
        });
    }
    Ok(serde_json::to_value(&reports).unwrap_or(Value::Null))
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let built = activator::lambda::start("activator", Config::from_env, |config| async move {
        let ctx = Context {
            sweep_min_age: config.sweep_min_age,
            sweep_window: config.sweep_window,
            function: std::env::var("AWS_LAMBDA_FUNCTION_NAME").unwrap_or_else(|_| "jitr".into()),
        };
        activator::build(config)
            .await
            .map(|activator| (activator, ctx))
    })
    .await;
    let (activator, ctx) = match built {
        Ok(built) => built,
        Err(code) => return code,
    };
    let (activator, ctx) = (&activator, &ctx);
    // Boxed: the handler's future type, nested in the runtime's, is otherwise too deep for
    // the compiler's layout computation.
    activator::lambda::ended(
        lambda_runtime::run(service_fn(move |event| {
            Box::pin(handle(activator, ctx, event))
        }))
        .await,
    )
}
