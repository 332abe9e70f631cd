//! AWS settings (standard chain plus `--region` / `--endpoint-url`) and one-line SDK errors.

use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use aws_config::timeout::TimeoutConfig;
use aws_config::{BehaviorVersion, Region, SdkConfig};
use aws_sdk_iot::config::http::HttpResponse;
use aws_sdk_iot::config::{ProvideCredentials, SharedCredentialsProvider};
use aws_sdk_iot::error::{ProvideErrorMetadata, SdkError};

use crate::cli::AwsArgs;

/// Longest a single call may take, retries included: an unreachable endpoint fails this fast.
const OPERATION_TIMEOUT: Duration = Duration::from_secs(10);

/// Longest a TCP/TLS connect may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// Longest one attempt of a call may take.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(5);

/// Longest the credential chain may take (it may ask instance metadata or SSO).
const CREDENTIALS_TIMEOUT: Duration = Duration::from_secs(10);

/// What `CredentialsError::CredentialsNotLoaded` displays: every provider in the chain came up
/// empty. Its type lives in aws-credential-types, which this crate does not depend on.
const NOT_LOADED: &str = "the credential provider was not enabled";

/// The message for "no credentials anywhere in the chain".
const NO_CREDENTIALS: &str =
    "no AWS credentials found: set AWS_PROFILE or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY";

/// A runtime for one command's AWS calls (the CLI is otherwise synchronous).
pub(crate) fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

/// A loaded AWS configuration and the endpoint it talks to, for messages.
#[derive(Debug)]
pub(crate) struct Aws {
    /// The SDK configuration, with credentials already resolved.
    pub(crate) config: SdkConfig,
    /// The AWS IoT endpoint calls go to, as shown in "cannot reach" messages.
    pub(crate) endpoint: String,
}

impl Aws {
    /// Loads the standard chain with the flags on top, and checks region and credentials
    /// up front so that their absence is reported plainly rather than as a failed call.
    pub(crate) async fn load(args: &AwsArgs) -> Result<Aws> {
        let mut loader = aws_config::defaults(BehaviorVersion::latest()).timeout_config(
            TimeoutConfig::builder()
                .connect_timeout(CONNECT_TIMEOUT)
                .operation_attempt_timeout(ATTEMPT_TIMEOUT)
                .operation_timeout(OPERATION_TIMEOUT)
                .build(),
        );
        if let Some(region) = &args.region {
            loader = loader.region(Region::new(region.clone()));
        }
        if let Some(url) = &args.endpoint_url {
            loader = loader.endpoint_url(url);
        }
        let config = loader.load().await;

        let Some(region) = config.region() else {
            bail!("no AWS region: set AWS_REGION (or a region in the AWS profile) or use --region");
        };
        let endpoint = match config.endpoint_url() {
            Some(url) => url.to_owned(),
            None => format!("https://iot.{region}.amazonaws.com"),
        };

        // Resolve once and hand the client the result: the chain is not walked twice
        // (a credential_process or SSO login would otherwise run again).
        let Some(provider) = config.credentials_provider() else {
            bail!(NO_CREDENTIALS);
        };
        let credentials =
            match tokio::time::timeout(CREDENTIALS_TIMEOUT, provider.provide_credentials()).await {
                Ok(Ok(credentials)) => credentials,
                Ok(Err(err)) if err.to_string() == NOT_LOADED => bail!(NO_CREDENTIALS),
                Ok(Err(err)) => bail!(
                    "cannot load AWS credentials: {}",
                    activator::error_chain(&err)
                ),
                Err(_) => bail!(
                    "cannot load AWS credentials: no answer within {}s",
                    CREDENTIALS_TIMEOUT.as_secs()
                ),
            };
        let config = config
            .to_builder()
            .credentials_provider(SharedCredentialsProvider::new(credentials))
            .build();
        Ok(Aws { config, endpoint })
    }

    /// An AWS IoT client over this configuration.
    pub(crate) fn iot(&self) -> aws_sdk_iot::Client {
        aws_sdk_iot::Client::new(&self.config)
    }

    /// One line saying why `op` (the AWS API name) failed: unreachable, or AWS's own reason.
    pub(crate) fn call_error<E>(&self, op: &str, err: SdkError<E, HttpResponse>) -> anyhow::Error
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    {
        match &err {
            SdkError::DispatchFailure(_) | SdkError::TimeoutError(_) => {
                anyhow!(
                    "cannot reach AWS IoT at {}: {}",
                    self.endpoint,
                    root_cause(&err)
                )
            }
            SdkError::ServiceError(service) => {
                let status = service.raw().status().as_u16();
                let error = service.err();
                match (error.code(), error.message()) {
                    (Some(code), Some(message)) => anyhow!("AWS IoT {op}: {code}: {message}"),
                    (Some(code), None) => anyhow!("AWS IoT {op}: {code} (HTTP {status})"),
                    (None, Some(message)) => anyhow!("AWS IoT {op}: HTTP {status}: {message}"),
                    (None, None) => anyhow!("AWS IoT {op}: HTTP {status}"),
                }
            }
            _ => anyhow!("AWS IoT {op}: {}", activator::error_chain(&err)),
        }
    }
}

/// `clap` value parser for `--endpoint-url`: an absolute http(s) URL.
pub(crate) fn parse_endpoint_url(value: &str) -> Result<String, String> {
    let rest = value
        .strip_prefix("https://")
        .or_else(|| value.strip_prefix("http://"));
    match rest {
        Some(host) if !host.is_empty() && !host.starts_with('/') => Ok(value.to_owned()),
        _ => Err("expected an http:// or https:// URL with a host".to_owned()),
    }
}

/// The innermost cause (for a failed connection: the OS's reason, e.g. "Connection refused").
fn root_cause(error: &dyn std::error::Error) -> String {
    let mut last = error;
    while let Some(cause) = last.source() {
        last = cause;
    }
    last.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_urls_must_be_http_or_https_with_a_host() {
        assert!(parse_endpoint_url("http://127.0.0.1:5000").is_ok());
        assert!(parse_endpoint_url("https://iot.eu-west-1.amazonaws.com").is_ok());
        assert!(parse_endpoint_url("127.0.0.1:5000").is_err());
        assert!(parse_endpoint_url("http://").is_err());
        assert!(parse_endpoint_url("ftp://host").is_err());
    }

    #[test]
    fn chain_joins_causes_on_one_line() {
        let inner = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        let outer = anyhow::Error::new(inner).context("connect");
        let err: &dyn std::error::Error = outer.as_ref();
        assert_eq!(activator::error_chain(err), "connect: refused");
        assert_eq!(root_cause(err), "refused");
    }
}
