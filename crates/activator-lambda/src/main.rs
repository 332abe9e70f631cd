//! `bootstrap`: the AWS Lambda custom runtime around the jitr activator.
//!
//! Reads configuration once (a bad variable fails the cold start, naming it), builds the
//! SDK and HTTP clients once, then serves certificate-registered events. Logs are JSON
//! lines on stdout; one per decision.

use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use activator::{
    AccountId, ActivationError, Activator, Config, FleetDirectory, Incoming, IotRegistry,
};
use lambda_runtime::{service_fn, Diagnostic, LambdaEvent};
use serde_json::Value;
use tokio::time::Instant;

/// An invocation error, typed for Lambda: `MalformedEvent`, `Retryable` or `Failed`.
#[derive(Debug)]
enum InvocationError {
    /// One event's decision failed.
    Activation(ActivationError),
    /// A scheduled sweep left certificates pending.
    SweepIncomplete { failing: usize },
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
                error_message: activator::error_chain(&e),
            },
            InvocationError::SweepIncomplete { failing } => Diagnostic {
                error_type: "Retryable".to_owned(),
                error_message: format!("sweep left {failing} certificate(s) pending; see the log"),
            },
        }
    }
}

/// Decisions a scheduled sweep runs at once, well inside AWS IoT's default API quotas.
const SWEEP_CONCURRENCY: usize = 4;

/// The invocation deadline as a tokio instant.
fn deadline_from_epoch_ms(deadline_ms: u64) -> Instant {
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    Instant::now() + Duration::from_millis(deadline_ms.saturating_sub(now_ms))
}

/// One invocation, whatever its kind; generic over the activator's ports so the same code
/// serves the deployed adapters and any other.
async fn handle<R: IotRegistry, F: FleetDirectory>(
    activator: &Activator<R, F>,
    sweep_min_age: Duration,
    event: LambdaEvent<Value>,
) -> Result<Value, InvocationError> {
    let (payload, context) = event.into_parts();
    let deadline = deadline_from_epoch_ms(context.deadline);
    let account = AccountId::from_arn(&context.invoked_function_arn);
    let incoming = Incoming::from_value(&payload).map_err(|e| {
        tracing::warn!(error = %e, "event refused");
        InvocationError::from(ActivationError::from(e))
    })?;
    match incoming {
        Incoming::Registered(event) => {
            let decision = activator
                .handle_event(&event, account.as_ref(), deadline)
                .await?;
            // A Decision is plain strings and an enum: it always serializes.
            Ok(serde_json::to_value(&decision).unwrap_or(Value::Null))
        }
        Incoming::Sweep => sweep(activator, sweep_min_age, deadline).await,
        Incoming::Replay(records) => {
            // SQS partial batch response: only records worth retrying go back to the queue.
            let mut failures = Vec::new();
            for record in records {
                match record.event {
                    Err(e) => {
                        tracing::warn!(message_id = %record.message_id, error = %e, "replay record dropped")
                    }
                    Ok(event) => match activator
                        .handle_event(&event, account.as_ref(), deadline)
                        .await
                    {
                        Err(e) if e.is_retryable() => {
                            failures.push(serde_json::json!({"itemIdentifier": record.message_id}));
                        }
                        // Decided, or failed for good (logged by the activator): not retried.
                        _ => {}
                    },
                }
            }
            Ok(serde_json::json!({"batchItemFailures": failures}))
        }
    }
}

/// The scheduled sweep over every trusted CA, inside the invocation's deadline; an error
/// while anything is left failing (the next scheduled sweep picks it up).
async fn sweep<R: IotRegistry, F: FleetDirectory>(
    activator: &Activator<R, F>,
    min_age: Duration,
    deadline: Instant,
) -> Result<Value, InvocationError> {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let mut reports = Vec::new();
    let mut failing = 0;
    for ca in &activator.policy().trusted_ca_ids {
        let r = activator
            .sweep(ca, min_age, now, false, SWEEP_CONCURRENCY, deadline)
            .await?;
        tracing::info!(
            ca_certificate_id = %ca,
            pending = r.pending,
            activated = r.activated,
            rejected = r.rejected,
            failing = r.failing.len(),
            "sweep"
        );
        failing += r.failing.len();
        reports.push(serde_json::json!({
            "caCertificateId": ca.as_str(), "pending": r.pending, "activated": r.activated,
            "rejected": r.rejected, "skipped": r.skipped, "failing": r.failing.len(),
        }));
    }
    if failing > 0 {
        return Err(InvocationError::SweepIncomplete { failing });
    }
    Ok(Value::Array(reports))
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("JITR_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .json()
        .flatten_event(true)
        .with_current_span(false)
        .with_span_list(false)
        .with_target(false)
        .with_env_filter(filter)
        .with_writer(std::io::stdout)
        .init();
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    init_logging();
    let config = match Config::from_env() {
        Ok(config) => config,
        Err(e) => {
            tracing::error!(error = %e, "invalid configuration");
            eprintln!("jitr activator: configuration error: {e}");
            return ExitCode::from(1);
        }
    };
    let sweep_min_age = config.sweep_min_age;
    let activator = match activator::build(config).await {
        Ok(a) => a,
        Err(e) => {
            tracing::error!(error = %e, "cannot start");
            eprintln!("jitr activator: {e}");
            return ExitCode::from(1);
        }
    };
    let activator = &activator;
    // Boxed: the handler's future type, nested in the runtime's, is otherwise too deep for
    // the compiler's layout computation.
    match lambda_runtime::run(service_fn(move |event| {
        Box::pin(handle(activator, sweep_min_age, event))
    }))
    .await
    {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "runtime failed");
            ExitCode::from(1)
        }
    }
}
