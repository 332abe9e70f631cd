//! The operator's AWS session: the standard chain (`AWS_PROFILE`, `AWS_REGION`,
//! `AWS_ENDPOINT_URL`, credentials) with `--region` / `--endpoint-url` on top, checked up front
//! so that a missing region or missing credentials are named plainly rather than reported as
//! a failed call.

use std::time::Duration;

use aws_config::timeout::TimeoutConfig;
use aws_config::{BehaviorVersion, Region, SdkConfig};
use aws_credential_types::provider::{ProvideCredentials, SharedCredentialsProvider};

/// Longest a TCP/TLS connect may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Longest one attempt of a call may take.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest the credential chain may take (it may ask instance metadata or SSO).
const CREDENTIALS_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a session could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// No region anywhere.
    #[error("no AWS region: set AWS_REGION (or a region in the AWS profile) or use --region")]
    NoRegion,
    /// Every credential provider came up empty.
    #[error(
        "no AWS credentials found: set AWS_PROFILE or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY"
    )]
    NoCredentials,
    /// A provider failed.
    #[error("cannot load AWS credentials")]
    Credentials(#[source] super::Cause),
    /// The chain took too long.
    #[error("cannot load AWS credentials: no answer within {}s", CREDENTIALS_TIMEOUT.as_secs())]
    CredentialsTimeout,
}

/// A loaded AWS configuration, credentials resolved once.
#[derive(Debug, Clone)]
pub struct Session {
    config: SdkConfig,
}

impl Session {
    /// Loads the standard chain with `region` and `endpoint_url` on top.
    pub async fn load(
        region: Option<&str>,
        endpoint_url: Option<&str>,
    ) -> Result<Session, SessionError> {
        let mut loader = aws_config::defaults(BehaviorVersion::latest()).timeout_config(
            TimeoutConfig::builder()
                .connect_timeout(CONNECT_TIMEOUT)
                .operation_attempt_timeout(ATTEMPT_TIMEOUT)
                .build(),
        );
        if let Some(region) = region {
            loader = loader.region(Region::new(region.to_owned()));
        }
        if let Some(url) = endpoint_url {
            loader = loader.endpoint_url(url);
        }
        let config = loader.load().await;
        if config.region().is_none() {
            return Err(SessionError::NoRegion);
        }
        // Resolve once and hand the clients the result: the chain is not walked twice
        // (a credential_process or SSO login would otherwise run again).
        let Some(provider) = config.credentials_provider() else {
            return Err(SessionError::NoCredentials);
        };
        let credentials =
            match tokio::time::timeout(CREDENTIALS_TIMEOUT, provider.provide_credentials()).await {
                Ok(Ok(credentials)) => credentials,
                Ok(Err(
                    aws_credential_types::provider::error::CredentialsError::CredentialsNotLoaded(
                        _,
                    ),
                )) => return Err(SessionError::NoCredentials),
                Ok(Err(err)) => return Err(SessionError::Credentials(Box::new(err))),
                Err(_) => return Err(SessionError::CredentialsTimeout),
            };
        let config = config
            .to_builder()
            .credentials_provider(SharedCredentialsProvider::new(credentials))
            .build();
        Ok(Session { config })
    }

    /// A session over an SDK configuration loaded elsewhere (tests, the demo).
    pub fn from_config(config: SdkConfig) -> Session {
        Session { config }
    }

    /// The SDK configuration.
    pub fn config(&self) -> &SdkConfig {
        &self.config
    }

    /// The AWS IoT registry over this session.
    pub fn registry(&self) -> super::AwsIotRegistry {
        super::AwsIotRegistry::new(&self.config)
    }
}
