//! `bootstrap`: the AWS Lambda custom runtime around the jitr activator.
//!
//! Reads configuration once (a bad variable fails the cold start, naming it), builds the
//! SDK and HTTP clients once, then serves certificate-registered events. Logs are JSON
//! lines on stdout; one per decision.

use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use activator::{AccountId, ActivationError, Config, DeployedActivator, RegisteredEvent};
use lambda_runtime::{service_fn, Diagnostic, LambdaEvent};
use serde_json::Value;
use tokio::time::Instant;

/// An invocation error, typed for Lambda: `MalformedEvent`, `Retryable` or `Failed`.
#[derive(Debug)]
struct InvocationError(ActivationError);

impl From<InvocationError> for Diagnostic {
    fn from(e: InvocationError) -> Diagnostic {
        let mut message = e.0.to_string();
        let mut source = std::error::Error::source(&e.0);
        while let Some(cause) = source {
            message.push_str(": ");
            message.push_str(&cause.to_string());
            source = cause.source();
        }
        Diagnostic {
            error_type: e.0.error_type().to_owned(),
            error_message: message,
        }
    }
}

/// The invocation deadline as a tokio instant.
fn deadline_from_epoch_ms(deadline_ms: u64) -> Instant {
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    Instant::now() + Duration::from_millis(deadline_ms.saturating_sub(now_ms))
}

async fn handle(
    activator: &DeployedActivator,
    event: LambdaEvent<Value>,
) -> Result<Value, InvocationError> {
    let (payload, context) = event.into_parts();
    let deadline = deadline_from_epoch_ms(context.deadline);
    let account = AccountId::from_arn(&context.invoked_function_arn);
    let event = RegisteredEvent::from_value(&payload).map_err(|e| {
        tracing::warn!(error = %e, "event refused");
        InvocationError(e.into())
    })?;
    let decision = activator
        .handle_event(&event, account.as_ref(), deadline)
        .await
        .map_err(InvocationError)?;
    // A Decision is plain strings and an enum: it always serializes.
    Ok(serde_json::to_value(&decision).unwrap_or(Value::Null))
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
    let activator = match activator::build(config).await {
        Ok(a) => a,
        Err(e) => {
            tracing::error!(error = %e, "cannot start");
            eprintln!("jitr activator: {e}");
            return ExitCode::from(1);
        }
    };
    // Lives as long as the process; the runtime needs a reference it can hand to every call.
    let activator: &'static DeployedActivator = Box::leak(Box::new(activator));
    match lambda_runtime::run(service_fn(move |event| handle(activator, event))).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "runtime failed");
            ExitCode::from(1)
        }
    }
}
