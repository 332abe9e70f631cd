//! The adapters over aws-sdk-iot: [`AwsIotRegistry`] implements [`IotRegistry`] and
//! [`crate::IotAdmin`]; [`Session`] loads the operator's configuration. Nothing above this
//! module sees SDK types.
//!
//! AWS IoT's control plane throttles at low rates (DescribeCertificate and UpdateCertificate
//! at 10 requests per second by default), so this adapter owns the retrying: a throttled or
//! transiently failed call (5xx, timeout, dropped connection) is tried again after a jittered,
//! doubling backoff for as long as the caller's deadline allows, and then given up with
//! [`RegistryError::GaveUp`], which is retryable. The SDK's own retry is switched off for
//! this client so the two do not multiply. Every write here is idempotent, so repeating one
//! whose answer was lost is safe.

use std::future::Future;
use std::hash::BuildHasher;
use std::time::Duration;

use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_config::{BehaviorVersion, SdkConfig};
use aws_sdk_iot::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_iot::types::{AttributePayload, CertificateStatus as SdkStatus};
use aws_sdk_iot::Client;
use tokio::time::Instant;

use crate::ports::{CaDescription, Cause};
use crate::{
    AwsAnswer, CertificateDescription, CertificateId, CertificatePage, CertificateStatus,
    IotRegistry, ListedCertificate, RegistryError, ThingSpec,
};

mod admin;
mod session;

pub use session::{Session, SessionError};

/// Loads the standard AWS configuration chain (AWS_REGION, AWS_ENDPOINT_URL, credentials...)
/// with per-attempt timeouts that keep a call well inside a Lambda invocation.
pub async fn load_sdk_config() -> SdkConfig {
    aws_config::defaults(BehaviorVersion::latest())
        .timeout_config(
            TimeoutConfig::builder()
                .connect_timeout(Duration::from_secs(3))
                .operation_attempt_timeout(Duration::from_secs(5))
                .operation_timeout(Duration::from_secs(20))
                .build(),
        )
        .load()
        .await
}

/// How [`AwsIotRegistry`] retries calls that were throttled or failed transiently.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// The backoff ceiling after the first failure; it doubles after each further one. The
    /// wait is drawn uniformly below the ceiling ("full jitter"), so callers throttled
    /// together spread out.
    pub base: Duration,
    /// The largest backoff ceiling.
    pub cap: Duration,
    /// Time kept free before the deadline: no attempt runs past `deadline - reserve`, so the
    /// caller still has time to answer (a Lambda must post its error before it is killed).
    pub reserve: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            base: Duration::from_millis(100),
            cap: Duration::from_secs(2),
            reserve: Duration::from_millis(500),
        }
    }
}

impl RetryPolicy {
    /// Runs `attempt` until it succeeds, fails for good, or the deadline leaves no room for
    /// another try; `service` names what was called in the error when no answer came in time
    /// (the endpoint, or `presence table <name>`). The one retry loop of the AWS adapters.
    pub async fn run<T, F, Fut>(
        &self,
        op: &'static str,
        deadline: Instant,
        service: &str,
        mut attempt: F,
    ) -> Result<T, RegistryError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, RegistryError>>,
    {
        let usable = deadline.checked_sub(self.reserve).unwrap_or(deadline);
        let gave_up = |attempts, last| {
            crate::counters::gave_up();
            RegistryError::GaveUp {
                op,
                attempts,
                last: Box::new(last),
            }
        };
        let mut attempts = 0;
        loop {
            if Instant::now() >= usable {
                let last = RegistryError::Unavailable {
                    op,
                    source: "no time left before the deadline".into(),
                };
                return Err(gave_up(attempts, last));
            }
            attempts += 1;
            let error = match tokio::time::timeout_at(usable, attempt()).await {
                Ok(Ok(value)) => return Ok(value),
                Ok(Err(error)) if error.is_retryable() => error,
                Ok(Err(error)) => return Err(error),
                Err(_elapsed) => RegistryError::Unavailable {
                    op,
                    source: format!("no answer from {service} before the deadline").into(),
                },
            };
            let wait = self.backoff(attempts);
            if Instant::now() + wait >= usable {
                return Err(gave_up(attempts, error));
            }
            crate::counters::retried();
            tracing::debug!(op, attempts, wait_ms = wait.as_millis() as u64, error = %crate::error_chain(&error), "retrying");
            tokio::time::sleep(wait).await;
        }
    }

    /// The wait before attempt `attempt + 1`, after `attempt` (>= 1) failures.
    fn backoff(&self, attempt: u32) -> Duration {
        let ceiling = self
            .base
            .saturating_mul(1 << attempt.saturating_sub(1).min(16))
            .min(self.cap);
        // A fresh RandomState is freshly keyed: hashing anything with it gives a random
        // number, which is all jitter needs.
        let draw = std::collections::hash_map::RandomState::new().hash_one(attempt);
        ceiling.mul_f64((draw >> 11) as f64 / (1u64 << 53) as f64)
    }
}

/// AWS IoT Core through aws-sdk-iot.
#[derive(Debug, Clone)]
pub struct AwsIotRegistry {
    client: Client,
    retry: RetryPolicy,
    /// Where calls go, for "cannot reach" messages.
    endpoint: String,
}

impl AwsIotRegistry {
    /// A registry over a client built from `sdk`, retrying by [`RetryPolicy::default`].
    pub fn new(sdk: &SdkConfig) -> Self {
        let config = aws_sdk_iot::config::Builder::from(sdk)
            .retry_config(RetryConfig::disabled())
            .build();
        let endpoint = match (sdk.endpoint_url(), sdk.region()) {
            (Some(url), _) => url.to_owned(),
            (None, Some(region)) => format!("https://iot.{region}.amazonaws.com"),
            (None, None) => "AWS IoT (no region)".to_owned(),
        };
        AwsIotRegistry {
            client: Client::from_conf(config),
            retry: RetryPolicy::default(),
            endpoint,
        }
    }

    /// The same with another retry policy.
    pub fn with_retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    /// The endpoint calls go to.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// Runs `attempt` by the registry's retry policy ([`RetryPolicy::run`]).
    async fn call<T, F, Fut>(
        &self,
        op: &'static str,
        deadline: Instant,
        attempt: F,
    ) -> Result<T, RegistryError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, RegistryError>>,
    {
        self.retry.run(op, deadline, &self.endpoint, attempt).await
    }
}

/// One line saying why a call failed, in AWS's words or the network's: what an operator reads.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Detail(String);

/// An SDK error of `service` (`DynamoDB`) in one line, as the IoT adapter words its own:
/// `<code>: <message>` for the service's answer, `cannot reach <service>: <why>` when no
/// answer came. Never the SDK's debug dump (raw headers, request ids, body).
pub fn sdk_error_text<E, R>(service: &str, err: &SdkError<E, R>) -> String
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    R: std::fmt::Debug,
{
    match err {
        SdkError::ServiceError(_) => match (err.code(), err.message()) {
            (Some(code), Some(message)) => format!("{code}: {message}"),
            (Some(code), None) => code.to_owned(),
            (None, Some(message)) => message.to_owned(),
            (None, None) => format!("{service} gave an error without a code"),
        },
        SdkError::TimeoutError(_) => format!("cannot reach {service}: no answer in time"),
        SdkError::DispatchFailure(_) | SdkError::ResponseError(_) => {
            format!("cannot reach {service}: {}", root_cause(err))
        }
        _ => crate::error_chain(err),
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

impl AwsIotRegistry {
    /// Maps an SDK error to ours by its AWS error code and HTTP status; nothing above this
    /// module sees SDK types.
    fn classify<E>(
        &self,
        op: &'static str,
        err: SdkError<E, aws_sdk_iot::config::http::HttpResponse>,
    ) -> RegistryError
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    {
        let service = match &err {
            SdkError::ServiceError(se) => se,
            SdkError::TimeoutError(_)
            | SdkError::DispatchFailure(_)
            | SdkError::ResponseError(_) => {
                let detail = format!(
                    "cannot reach AWS IoT at {}: {}",
                    self.endpoint,
                    root_cause(&err)
                );
                return RegistryError::Unavailable {
                    op,
                    source: Box::new(Detail(detail)),
                };
            }
            _ => {
                return RegistryError::Failed {
                    op,
                    source: Box::new(Detail(crate::error_chain(&err))),
                }
            }
        };
        let status = service.raw().status().as_u16();
        let error = service.err();
        let code = error.code().map(str::to_owned);
        let line = match (error.code(), error.message()) {
            (Some(code), Some(message)) => format!("{code}: {message}"),
            (Some(code), None) => format!("{code} (HTTP {status})"),
            (None, Some(message)) => format!("HTTP {status}: {message}"),
            (None, None) => format!("HTTP {status}"),
        };
        let source: Cause = Box::new(AwsAnswer {
            code: code.clone(),
            line,
        });
        match code.as_deref() {
            Some("ResourceNotFoundException") => RegistryError::NotFound { op, source },
            Some("ResourceAlreadyExistsException") => RegistryError::AlreadyExists {
                op,
                resource_id: resource_id_of(service.raw().body().bytes()),
                source,
            },
            Some("ThrottlingException" | "TooManyRequestsException") => {
                RegistryError::Throttled { op, source }
            }
            // A hard limit (HTTP 410, say too many policies on one certificate): waiting does
            // not lift it, so it is not retried.
            Some("LimitExceededException") => RegistryError::Failed { op, source },
            Some(
                "ServiceUnavailableException" | "InternalFailureException" | "InternalException",
            ) => RegistryError::Unavailable { op, source },
            _ if status == 429 => RegistryError::Throttled { op, source },
            _ if status >= 500 => RegistryError::Unavailable { op, source },
            _ => RegistryError::Failed { op, source },
        }
    }

    /// One call with the adapter's retrying, its error classified.
    async fn send<T, E, F, Fut>(
        &self,
        op: &'static str,
        deadline: Instant,
        send: F,
    ) -> Result<T, RegistryError>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<T, SdkError<E, aws_sdk_iot::config::http::HttpResponse>>>,
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    {
        self.call(op, deadline, || async {
            send().await.map_err(|e| self.classify(op, e))
        })
        .await
    }
}

/// `resourceId` from a ResourceAlreadyExistsException body.
fn resource_id_of(body: Option<&[u8]>) -> Option<String> {
    let value: serde_json::Value = serde_json::from_slice(body?).ok()?;
    value.get("resourceId")?.as_str().map(str::to_owned)
}

fn status_from_sdk(s: Option<&SdkStatus>) -> CertificateStatus {
    match s {
        Some(SdkStatus::Active) => CertificateStatus::Active,
        Some(SdkStatus::PendingActivation) => CertificateStatus::PendingActivation,
        Some(SdkStatus::Inactive) => CertificateStatus::Inactive,
        Some(SdkStatus::Revoked) => CertificateStatus::Revoked,
        Some(other) => CertificateStatus::Other(other.as_str().to_owned()),
        None => CertificateStatus::Other("(none)".into()),
    }
}

/// A Thing as DescribeThing or ListThings gives it, attributes in name order.
pub(crate) fn thing_spec<S: BuildHasher>(
    name: &str,
    thing_type: Option<&str>,
    attributes: Option<&std::collections::HashMap<String, String, S>>,
) -> ThingSpec {
    let mut attributes: Vec<(String, String)> = attributes
        .into_iter()
        .flatten()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    attributes.sort();
    ThingSpec {
        name: name.to_owned(),
        thing_type: thing_type.map(str::to_owned),
        attributes,
    }
}

fn malformed(op: &'static str, what: &'static str) -> RegistryError {
    RegistryError::failed(op, format!("the answer lacks {what}"))
}

/// An "already exists" answer counts as success: the write is idempotent.
fn existing_is_fine(result: Result<(), RegistryError>) -> Result<(), RegistryError> {
    match result {
        Err(RegistryError::AlreadyExists { .. }) => Ok(()),
        other => other,
    }
}

/// Items asked for per page of a listing (the APIs' maximum).
pub(super) const PAGE_SIZE: i32 = 250;

/// Every item of a paged listing: `page(token)` answers one page and the next token.
pub(super) async fn every_page<T, F, Fut>(mut page: F) -> Result<Vec<T>, RegistryError>
where
    F: FnMut(Option<String>) -> Fut,
    Fut: Future<Output = Result<(Vec<T>, Option<String>), RegistryError>>,
{
    let mut all = Vec::new();
    let mut token = None;
    loop {
        let (items, next) = page(token).await?;
        all.extend(items);
        match next {
            Some(next) if !next.is_empty() => token = Some(next),
            _ => return Ok(all),
        }
    }
}

impl IotRegistry for AwsIotRegistry {
    async fn describe_certificate(
        &self,
        id: &CertificateId,
        deadline: Instant,
    ) -> Result<CertificateDescription, RegistryError> {
        const OP: &str = "DescribeCertificate";
        let out = self
            .send(OP, deadline, || {
                self.client
                    .describe_certificate()
                    .certificate_id(id.as_str())
                    .send()
            })
            .await?;
        let d = out
            .certificate_description()
            .ok_or_else(|| malformed(OP, "certificateDescription"))?;
        Ok(CertificateDescription {
            id: id.clone(),
            arn: d
                .certificate_arn()
                .ok_or_else(|| malformed(OP, "certificateArn"))?
                .to_owned(),
            status: status_from_sdk(d.status()),
            ca_certificate_id: d
                .ca_certificate_id()
                .and_then(|c| CertificateId::parse(c).ok()),
            pem: d
                .certificate_pem()
                .ok_or_else(|| malformed(OP, "certificatePem"))?
                .to_owned(),
        })
    }

    async fn describe_ca_certificate(
        &self,
        id: &CertificateId,
        deadline: Instant,
    ) -> Result<CaDescription, RegistryError> {
        const OP: &str = "DescribeCACertificate";
        let out = self
            .send(OP, deadline, || {
                self.client
                    .describe_ca_certificate()
                    .certificate_id(id.as_str())
                    .send()
            })
            .await?;
        let d = out
            .certificate_description()
            .ok_or_else(|| malformed(OP, "certificateDescription"))?;
        Ok(CaDescription {
            id: d
                .certificate_id()
                .and_then(|c| CertificateId::parse(c).ok())
                .unwrap_or_else(|| id.clone()),
            arn: d.certificate_arn().map(str::to_owned),
            status: d.status().map(|s| s.as_str().to_owned()),
            auto_registration: d.auto_registration_status().map(|s| s.as_str().to_owned()),
            pem: d
                .certificate_pem()
                .ok_or_else(|| malformed(OP, "certificatePem"))?
                .to_owned(),
        })
    }

    async fn create_thing(
        &self,
        thing: &ThingSpec,
        deadline: Instant,
    ) -> Result<(), RegistryError> {
        let mut attributes = AttributePayload::builder();
        for (k, v) in &thing.attributes {
            attributes = attributes.attributes(k, v);
        }
        let attributes = attributes.build();
        // A Thing of that name exists (a rerun, a retry whose answer was lost, or a reissued
        // device): it is the one we want.
        existing_is_fine(
            self.send("CreateThing", deadline, || {
                self.client
                    .create_thing()
                    .thing_name(&thing.name)
                    .set_thing_type_name(thing.thing_type.clone())
                    .attribute_payload(attributes.clone())
                    .send()
            })
            .await
            .map(|_| ()),
        )
    }

    async fn add_thing_to_group(
        &self,
        thing: &str,
        group: &str,
        deadline: Instant,
    ) -> Result<(), RegistryError> {
        self.send("AddThingToThingGroup", deadline, || {
            self.client
                .add_thing_to_thing_group()
                .thing_name(thing)
                .thing_group_name(group)
                .send()
        })
        .await
        .map(|_| ())
    }

    async fn attach_policy(
        &self,
        policy: &str,
        certificate_arn: &str,
        deadline: Instant,
    ) -> Result<(), RegistryError> {
        self.send("AttachPolicy", deadline, || {
            self.client
                .attach_policy()
                .policy_name(policy)
                .target(certificate_arn)
                .send()
        })
        .await
        .map(|_| ())
    }

    async fn attach_thing_principal(
        &self,
        thing: &str,
        certificate_arn: &str,
        deadline: Instant,
    ) -> Result<(), RegistryError> {
        self.send("AttachThingPrincipal", deadline, || {
            self.client
                .attach_thing_principal()
                .thing_name(thing)
                .principal(certificate_arn)
                .send()
        })
        .await
        .map(|_| ())
    }

    async fn set_certificate_status(
        &self,
        id: &CertificateId,
        status: CertificateStatus,
        deadline: Instant,
    ) -> Result<(), RegistryError> {
        let status = SdkStatus::from(status.as_str());
        self.send("UpdateCertificate", deadline, || {
            self.client
                .update_certificate()
                .certificate_id(id.as_str())
                .new_status(status.clone())
                .send()
        })
        .await
        .map(|_| ())
    }

    async fn describe_thing(
        &self,
        thing: &str,
        deadline: Instant,
    ) -> Result<Option<ThingSpec>, RegistryError> {
        let result = self
            .send("DescribeThing", deadline, || {
                self.client.describe_thing().thing_name(thing).send()
            })
            .await;
        match result {
            Ok(out) => Ok(Some(thing_spec(
                out.thing_name().unwrap_or(thing),
                out.thing_type_name(),
                out.attributes(),
            ))),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e),
        }
    }

    async fn update_thing_attributes(
        &self,
        thing: &str,
        attributes: &[(String, Option<String>)],
        deadline: Instant,
    ) -> Result<(), RegistryError> {
        // With merge, an empty value removes the attribute (UpdateThing's documented rule).
        let mut payload = AttributePayload::builder().merge(true);
        for (k, v) in attributes {
            payload = payload.attributes(k, v.clone().unwrap_or_default());
        }
        let payload = payload.build();
        self.send("UpdateThing", deadline, || {
            self.client
                .update_thing()
                .thing_name(thing)
                .attribute_payload(payload.clone())
                .send()
        })
        .await
        .map(|_| ())
    }

    async fn thing_principals(
        &self,
        thing: &str,
        deadline: Instant,
    ) -> Result<Vec<String>, RegistryError> {
        every_page(|token| async move {
            let out = self
                .send("ListThingPrincipals", deadline, || {
                    self.client
                        .list_thing_principals()
                        .thing_name(thing)
                        .max_results(PAGE_SIZE)
                        .set_next_token(token.clone())
                        .send()
                })
                .await?;
            Ok((
                out.principals().to_vec(),
                out.next_token().map(str::to_owned),
            ))
        })
        .await
    }

    async fn detach_thing_principal(
        &self,
        thing: &str,
        certificate_arn: &str,
        deadline: Instant,
    ) -> Result<(), RegistryError> {
        self.send("DetachThingPrincipal", deadline, || {
            self.client
                .detach_thing_principal()
                .thing_name(thing)
                .principal(certificate_arn)
                .send()
        })
        .await
        .map(|_| ())
    }

    async fn list_certificates_by_ca(
        &self,
        ca: &CertificateId,
        marker: Option<String>,
        newest_first: bool,
        deadline: Instant,
    ) -> Result<CertificatePage, RegistryError> {
        let out = self
            .send("ListCertificatesByCA", deadline, || {
                self.client
                    .list_certificates_by_ca()
                    .ca_certificate_id(ca.as_str())
                    .set_marker(marker.clone())
                    .page_size(PAGE_SIZE)
                    .ascending_order(!newest_first)
                    .send()
            })
            .await?;
        let certificates = out
            .certificates()
            .iter()
            .filter_map(|c| {
                Some(ListedCertificate {
                    id: CertificateId::parse(c.certificate_id()?).ok()?,
                    status: status_from_sdk(c.status()),
                    created: c.creation_date().map(|d| d.secs()),
                })
            })
            .collect();
        Ok(CertificatePage {
            certificates,
            next_marker: out.next_marker().map(str::to_owned),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap_and_stays_under_its_ceiling() {
        let policy = RetryPolicy {
            base: Duration::from_millis(100),
            cap: Duration::from_millis(700),
            reserve: Duration::ZERO,
        };
        let ceilings = [100, 200, 400, 700, 700, 700];
        for (attempt, ceiling) in (1..).zip(ceilings) {
            let waits: Vec<_> = (0..200).map(|_| policy.backoff(attempt)).collect();
            let ceiling = Duration::from_millis(ceiling);
            assert!(waits.iter().all(|w| *w <= ceiling), "attempt {attempt}");
            // Jittered: spread over the range, not one value.
            assert!(waits.iter().any(|w| *w < ceiling / 3), "attempt {attempt}");
            assert!(
                waits.iter().any(|w| *w > ceiling * 2 / 3),
                "attempt {attempt}"
            );
        }
        assert!(policy.backoff(u32::MAX) <= policy.cap);
    }
}
