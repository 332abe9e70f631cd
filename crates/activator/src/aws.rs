//! The [`IotRegistry`] adapter over aws-sdk-iot. Nothing above this module sees SDK types.

use std::time::Duration;

use aws_config::timeout::TimeoutConfig;
use aws_config::{BehaviorVersion, SdkConfig};
use aws_sdk_iot::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_iot::types::{AttributePayload, CertificateStatus as SdkStatus};
use aws_sdk_iot::Client;

use crate::ports::Cause;
use crate::{
    CertificateDescription, CertificateId, CertificatePage, CertificateStatus, IotRegistry,
    ListedCertificate, RegistryError, ThingSpec,
};

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

/// AWS IoT Core through aws-sdk-iot.
#[derive(Debug, Clone)]
pub struct AwsIotRegistry {
    client: Client,
}

impl AwsIotRegistry {
    /// A registry over a client built from `sdk`.
    pub fn new(sdk: &SdkConfig) -> Self {
        AwsIotRegistry {
            client: Client::new(sdk),
        }
    }

    /// The underlying client.
    pub fn client(&self) -> &Client {
        &self.client
    }
}

/// Maps an SDK error to ours by its AWS error code and HTTP status.
fn classify<E>(
    op: &'static str,
    err: SdkError<E, aws_sdk_iot::config::http::HttpResponse>,
) -> RegistryError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    let (code, status) = match &err {
        SdkError::ServiceError(se) => (
            se.err().code().map(str::to_owned),
            Some(se.raw().status().as_u16()),
        ),
        SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) | SdkError::ResponseError(_) => {
            return RegistryError::Unavailable {
                op,
                source: Box::new(err),
            };
        }
        _ => (None, None),
    };
    let source: Cause = Box::new(err);
    match code.as_deref() {
        Some("ResourceNotFoundException") => RegistryError::NotFound { op, source },
        Some("ThrottlingException" | "TooManyRequestsException" | "LimitExceededException") => {
            RegistryError::Throttled { op, source }
        }
        Some("ServiceUnavailableException" | "InternalFailureException" | "InternalException") => {
            RegistryError::Unavailable { op, source }
        }
        _ if status == Some(429) => RegistryError::Throttled { op, source },
        _ if status.is_some_and(|s| s >= 500) => RegistryError::Unavailable { op, source },
        _ => RegistryError::Failed { op, source },
    }
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

fn status_to_sdk(s: &CertificateStatus) -> SdkStatus {
    match s {
        CertificateStatus::Active => SdkStatus::Active,
        CertificateStatus::PendingActivation => SdkStatus::PendingActivation,
        CertificateStatus::Inactive => SdkStatus::Inactive,
        CertificateStatus::Revoked => SdkStatus::Revoked,
        CertificateStatus::Other(s) => SdkStatus::from(s.as_str()),
    }
}

fn malformed(op: &'static str, what: &'static str) -> RegistryError {
    RegistryError::Failed {
        op,
        source: format!("the answer lacks {what}").into(),
    }
}

impl IotRegistry for AwsIotRegistry {
    async fn describe_certificate(
        &self,
        id: &CertificateId,
    ) -> Result<CertificateDescription, RegistryError> {
        const OP: &str = "DescribeCertificate";
        let out = self
            .client
            .describe_certificate()
            .certificate_id(id.as_str())
            .send()
            .await
            .map_err(|e| classify(OP, e))?;
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

    async fn ca_certificate_pem(&self, id: &CertificateId) -> Result<String, RegistryError> {
        const OP: &str = "DescribeCACertificate";
        let out = self
            .client
            .describe_ca_certificate()
            .certificate_id(id.as_str())
            .send()
            .await
            .map_err(|e| classify(OP, e))?;
        out.certificate_description()
            .and_then(|d| d.certificate_pem())
            .map(str::to_owned)
            .ok_or_else(|| malformed(OP, "certificatePem"))
    }

    async fn create_thing(&self, thing: &ThingSpec) -> Result<(), RegistryError> {
        let mut attributes = AttributePayload::builder();
        for (k, v) in &thing.attributes {
            attributes = attributes.attributes(k, v);
        }
        let result = self
            .client
            .create_thing()
            .thing_name(&thing.name)
            .set_thing_type_name(thing.thing_type.clone())
            .attribute_payload(attributes.build())
            .send()
            .await;
        match result {
            Ok(_) => Ok(()),
            // A Thing of that name exists (a rerun, or a reissued device): it is the one we want.
            Err(e)
                if e.as_service_error()
                    .is_some_and(|e| e.is_resource_already_exists_exception()) =>
            {
                Ok(())
            }
            Err(e) => Err(classify("CreateThing", e)),
        }
    }

    async fn add_thing_to_group(&self, thing: &str, group: &str) -> Result<(), RegistryError> {
        self.client
            .add_thing_to_thing_group()
            .thing_name(thing)
            .thing_group_name(group)
            .send()
            .await
            .map(|_| ())
            .map_err(|e| classify("AddThingToThingGroup", e))
    }

    async fn attach_policy(
        &self,
        policy: &str,
        certificate_arn: &str,
    ) -> Result<(), RegistryError> {
        self.client
            .attach_policy()
            .policy_name(policy)
            .target(certificate_arn)
            .send()
            .await
            .map(|_| ())
            .map_err(|e| classify("AttachPolicy", e))
    }

    async fn attach_thing_principal(
        &self,
        thing: &str,
        certificate_arn: &str,
    ) -> Result<(), RegistryError> {
        self.client
            .attach_thing_principal()
            .thing_name(thing)
            .principal(certificate_arn)
            .send()
            .await
            .map(|_| ())
            .map_err(|e| classify("AttachThingPrincipal", e))
    }

    async fn set_certificate_status(
        &self,
        id: &CertificateId,
        status: CertificateStatus,
    ) -> Result<(), RegistryError> {
        self.client
            .update_certificate()
            .certificate_id(id.as_str())
            .new_status(status_to_sdk(&status))
            .send()
            .await
            .map(|_| ())
            .map_err(|e| classify("UpdateCertificate", e))
    }

    async fn list_certificates_by_ca(
        &self,
        ca: &CertificateId,
        marker: Option<String>,
    ) -> Result<CertificatePage, RegistryError> {
        const OP: &str = "ListCertificatesByCA";
        let out = self
            .client
            .list_certificates_by_ca()
            .ca_certificate_id(ca.as_str())
            .set_marker(marker)
            .page_size(250)
            .send()
            .await
            .map_err(|e| classify(OP, e))?;
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
