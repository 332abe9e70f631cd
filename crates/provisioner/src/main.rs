//! `provisioner`: the AWS Lambda custom runtime around [`provisioner::Provisioner`].
//!
//! Reads its configuration once (a bad variable fails the cold start, naming it), opens the
//! CA key in AWS KMS and reads the CA certificate from AWS IoT once, then answers function URL
//! requests (cloud-relay's `PROVISION_URL`), fleet provisioning's pre-provisioning hook and
//! the certificate provider's signing requests. Logs are JSON lines on stdout; no key, no
//! certificate, no API key ever reaches them.

use lambda_runtime::{service_fn, Diagnostic, LambdaEvent};
use provisioner::fleet_provisioning::ProviderError;
use provisioner::{Config, EventKind, Provisioner};
use serde_json::Value;
use std::process::ExitCode;

fn diagnostic(error_type: &str, message: String) -> Diagnostic {
    Diagnostic {
        error_type: error_type.to_owned(),
        error_message: message,
    }
}

async fn handle(provisioner: &Provisioner, event: LambdaEvent<Value>) -> Result<Value, Diagnostic> {
    let (payload, context) = event.into_parts();
    let deadline = activator::lambda::deadline_from_epoch_ms(context.deadline);
    match EventKind::of(&payload) {
        Some(EventKind::FunctionUrl) => {
            Ok(provisioner.provision(&payload, deadline).await.to_value())
        }
        Some(EventKind::PreProvisioningHook) => {
            Ok(provisioner.pre_provisioning_hook(&payload, deadline).await)
        }
        Some(EventKind::CertificateProvider) => provisioner
            .certificate_provider(&payload, deadline)
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

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let provisioner =
        match activator::lambda::start("provisioner", Config::from_env, Provisioner::build).await {
            Ok(provisioner) => provisioner,
            Err(code) => return code,
        };
    let provisioner = &provisioner;
    activator::lambda::ended(
        lambda_runtime::run(service_fn(move |event| {
            Box::pin(handle(provisioner, event))
        }))
        .await,
    )
}
