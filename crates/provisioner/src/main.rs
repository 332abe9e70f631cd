//! `provisioner`: the AWS Lambda custom runtime around [`provisioner::Provisioner`].
//!
//! Reads its configuration once (a bad variable fails the cold start, naming it), opens the
//! CA key in AWS KMS and reads the CA certificate from AWS IoT once, then answers function URL
//! requests (cloud-relay's `PROVISION_URL`), fleet provisioning's pre-provisioning hook and
//! the certificate provider's signing requests. Logs are JSON lines on stdout; no key, no
//! certificate, no API key ever reaches them.

use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use lambda_runtime::{service_fn, Diagnostic, LambdaEvent};
use provisioner::fleet_provisioning::ProviderError;
use provisioner::{Config, EventKind, Provisioner};
use serde_json::Value;
use tokio::time::Instant;

/// The invocation deadline as a tokio instant.
fn deadline_from_epoch_ms(deadline_ms: u64) -> Instant {
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    Instant::now() + Duration::from_millis(deadline_ms.saturating_sub(now_ms))
}

fn diagnostic(error_type: &str, message: String) -> Diagnostic {
    Diagnostic {
        error_type: error_type.to_owned(),
        error_message: message,
    }
}

async fn handle(provisioner: &Provisioner, event: LambdaEvent<Value>) -> Result<Value, Diagnostic> {
    let (payload, context) = event.into_parts();
    let deadline = deadline_from_epoch_ms(context.deadline);
    match EventKind::of(&payload) {
        Some(EventKind::FunctionUrl) => {
            Ok(provisioner.provision(&payload, deadline).await.to_value())
        }
        Some(EventKind::PreProvisioningHook) => {
            Ok(provisioner.pre_provisioning_hook(&payload, deadline).await)
        }
        Some(EventKind::CertificateProvider) => provisioner
            .certificate_provider(&payload)
            .await
            .map_err(|e| match e {
                ProviderError::Refused(m) => diagnostic("MalformedEvent", m),
                ProviderError::Failed(m) => diagnostic("Retryable", m),
            }),
        None => {
            tracing::warn!("event refused: not a function URL request, a pre-provisioning hook or a certificate provider request");
            Err(diagnostic(
                "MalformedEvent",
                "not a function URL request (payload 2.0), a pre-provisioning hook or a certificate provider request".into(),
            ))
        }
    }
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
            eprintln!("jitr provisioner: configuration error: {e}");
            return ExitCode::from(1);
        }
    };
    let provisioner = match Provisioner::build(config).await {
        Ok(p) => p,
        Err(e) => {
            tracing::error!(error = %e, "cannot start");
            eprintln!("jitr provisioner: {e}");
            return ExitCode::from(1);
        }
    };
    let provisioner = &provisioner;
    match lambda_runtime::run(service_fn(move |event| {
        Box::pin(handle(provisioner, event))
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
