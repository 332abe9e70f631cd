//! The AWS IoT registry as traits: [`IotRegistry`] (what the decision needs) and [`IotAdmin`]
//! (what only an operator does), with the values they pass and [`RegistryError`]. The adapter
//! is [`crate::aws`]; the in-memory registry for unit tests is `memory` (feature `testing`).

use std::fmt;
use std::future::Future;

use tokio::time::Instant;

use crate::CertificateId;

/// Boxed cause of an adapter error.
pub type Cause = Box<dyn std::error::Error + Send + Sync + 'static>;

/// A certificate's status in AWS IoT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CertificateStatus {
    /// Can connect.
    Active,
    /// Registered by JITR, waiting for us.
    PendingActivation,
    /// Deactivated.
    Inactive,
    /// Revoked.
    Revoked,
    /// Any other status (PENDING_TRANSFER, REGISTER_INACTIVE, ...).
    Other(String),
}

impl CertificateStatus {
    /// The name AWS IoT uses.
    pub fn as_str(&self) -> &str {
        match self {
            CertificateStatus::Active => "ACTIVE",
            CertificateStatus::PendingActivation => "PENDING_ACTIVATION",
            CertificateStatus::Inactive => "INACTIVE",
            CertificateStatus::Revoked => "REVOKED",
            CertificateStatus::Other(s) => s,
        }
    }
}

impl fmt::Display for CertificateStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What DescribeCertificate tells about a certificate.
#[derive(Debug, Clone)]
pub struct CertificateDescription {
    /// Certificate id.
    pub id: CertificateId,
    /// Certificate ARN (the principal).
    pub arn: String,
    /// Status.
    pub status: CertificateStatus,
    /// The CA it was registered under, when AWS links one.
    pub ca_certificate_id: Option<CertificateId>,
    /// The certificate, PEM.
    pub pem: String,
}

/// What DescribeCACertificate tells about a CA.
#[derive(Debug, Clone)]
pub struct CaDescription {
    /// The CA certificate id.
    pub id: CertificateId,
    /// Its ARN, when AWS said it.
    pub arn: Option<String>,
    /// `ACTIVE` or `INACTIVE`.
    pub status: Option<String>,
    /// `ENABLE` or `DISABLE`.
    pub auto_registration: Option<String>,
    /// The CA certificate, PEM.
    pub pem: String,
}

/// One certificate as ListCertificatesByCA lists it.
#[derive(Debug, Clone)]
pub struct ListedCertificate {
    /// Certificate id.
    pub id: CertificateId,
    /// Status.
    pub status: CertificateStatus,
    /// When it was registered, epoch seconds.
    pub created: Option<i64>,
}

/// A page of ListCertificatesByCA.
#[derive(Debug, Clone, Default)]
pub struct CertificatePage {
    /// Certificates on this page.
    pub certificates: Vec<ListedCertificate>,
    /// Marker for the next page.
    pub next_marker: Option<String>,
}

/// A Thing: the one to create for an activated device, or one as AWS IoT lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ThingSpec {
    /// Thing name: the device id.
    pub name: String,
    /// Optional thing type.
    pub thing_type: Option<String>,
    /// Searchable attributes.
    pub attributes: Vec<(String, String)>,
}

/// How a CA is registered: with a verification certificate proving key possession, or
/// SNI_ONLY (no proof; devices must send SNI).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CaRegistrationMode {
    /// DEFAULT mode, with the verification certificate (PEM).
    Verified {
        /// The verification certificate.
        verification_pem: String,
    },
    /// SNI_ONLY mode.
    SniOnly,
}

/// AWS's answer to a call that failed, as the source of a [`RegistryError`]: the error code
/// AWS gave, to match on ([`RegistryError::code`]), and the line an operator reads
/// (`<code>: <message>`, or `<code> (HTTP <status>)` without a message).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{line}")]
pub struct AwsAnswer {
    /// The error code (`ResourceNotFoundException`, `CertificateStateException`), when AWS
    /// gave one.
    pub code: Option<String>,
    /// What the operator reads.
    pub line: String,
}

impl AwsAnswer {
    /// The answer AWS words as `<code>: <message>`.
    pub fn new(code: &str, message: &str) -> Self {
        AwsAnswer {
            code: Some(code.to_owned()),
            line: format!("{code}: {message}"),
        }
    }
}

/// A registry call that failed. Each variant displays `AWS IoT <op>`; its source says why,
/// in AWS's words (`CertificateValidationException: ...`, an [`AwsAnswer`]) or the network's
/// (`cannot reach AWS IoT at <endpoint>: Connection refused`).
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The resource does not exist.
    #[error("AWS IoT {op}")]
    NotFound {
        /// The API operation.
        op: &'static str,
        /// Why.
        #[source]
        source: Cause,
    },
    /// The resource exists already.
    #[error("AWS IoT {op}")]
    AlreadyExists {
        /// The API operation.
        op: &'static str,
        /// The existing resource's id, when AWS says it.
        resource_id: Option<String>,
        /// Why.
        #[source]
        source: Cause,
    },
    /// Throttled (`ThrottlingException`).
    #[error("AWS IoT {op}")]
    Throttled {
        /// The API operation.
        op: &'static str,
        /// Why.
        #[source]
        source: Cause,
    },
    /// 5xx, timeout or connection failure.
    #[error("AWS IoT {op}")]
    Unavailable {
        /// The API operation.
        op: &'static str,
        /// Why.
        #[source]
        source: Cause,
    },
    /// Still throttled or unavailable after `attempts` tries, with no time left before the
    /// deadline for another.
    #[error(
        "AWS IoT {op}: gave up after {attempts} attempt(s), too close to the deadline to try again"
    )]
    GaveUp {
        /// The API operation.
        op: &'static str,
        /// Attempts made.
        attempts: u32,
        /// The last failure.
        #[source]
        last: Box<RegistryError>,
    },
    /// Any other failure (access denied, invalid request...).
    #[error("AWS IoT {op}")]
    Failed {
        /// The API operation.
        op: &'static str,
        /// Why.
        #[source]
        source: Cause,
    },
}

impl RegistryError {
    /// Whether trying again later can succeed without anybody changing anything.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            RegistryError::Throttled { .. }
                | RegistryError::Unavailable { .. }
                | RegistryError::GaveUp { .. }
        )
    }

    /// The error code AWS answered with (`ResourceNotFoundException`), for the last attempt
    /// of a call given up; `None` when no answer came (a timeout, a refused connection) or
    /// the failure is not AWS's.
    pub fn code(&self) -> Option<&str> {
        let source = match self {
            RegistryError::GaveUp { last, .. } => return last.code(),
            RegistryError::NotFound { source, .. }
            | RegistryError::AlreadyExists { source, .. }
            | RegistryError::Throttled { source, .. }
            | RegistryError::Unavailable { source, .. }
            | RegistryError::Failed { source, .. } => source,
        };
        source.downcast_ref::<AwsAnswer>()?.code.as_deref()
    }

    /// Whether the resource was not found.
    pub fn is_not_found(&self) -> bool {
        matches!(self, RegistryError::NotFound { .. })
    }

    /// A failure of `op` with a one-line reason (for adapters and in-memory ports).
    pub fn failed(op: &'static str, reason: impl Into<String>) -> Self {
        RegistryError::Failed {
            op,
            source: reason.into().into(),
        }
    }
}

/// The AWS IoT control plane, as the decision and the sweep use it. Every write is
/// idempotent: "already exists" and "already attached" are success.
///
/// Every call takes the deadline of the work it is part of (the Lambda invocation's): an
/// adapter may retry throttling and transient failures until shortly before it, and must
/// then give up with a retryable error.
pub trait IotRegistry: Send + Sync {
    /// DescribeCertificate.
    fn describe_certificate(
        &self,
        id: &CertificateId,
        deadline: Instant,
    ) -> impl Future<Output = Result<CertificateDescription, RegistryError>> + Send;
    /// DescribeCACertificate.
    fn describe_ca_certificate(
        &self,
        id: &CertificateId,
        deadline: Instant,
    ) -> impl Future<Output = Result<CaDescription, RegistryError>> + Send;
    /// CreateThing (an existing Thing of that name is success).
    fn create_thing(
        &self,
        thing: &ThingSpec,
        deadline: Instant,
    ) -> impl Future<Output = Result<(), RegistryError>> + Send;
    /// AddThingToThingGroup.
    fn add_thing_to_group(
        &self,
        thing: &str,
        group: &str,
        deadline: Instant,
    ) -> impl Future<Output = Result<(), RegistryError>> + Send;
    /// AttachPolicy to the certificate.
    fn attach_policy(
        &self,
        policy: &str,
        certificate_arn: &str,
        deadline: Instant,
    ) -> impl Future<Output = Result<(), RegistryError>> + Send;
    /// AttachThingPrincipal.
    fn attach_thing_principal(
        &self,
        thing: &str,
        certificate_arn: &str,
        deadline: Instant,
    ) -> impl Future<Output = Result<(), RegistryError>> + Send;
    /// UpdateCertificate to a new status.
    fn set_certificate_status(
        &self,
        id: &CertificateId,
        status: CertificateStatus,
        deadline: Instant,
    ) -> impl Future<Output = Result<(), RegistryError>> + Send;
    /// DescribeThing: the Thing's name, type and attributes; `None` when there is no such Thing.
    fn describe_thing(
        &self,
        thing: &str,
        deadline: Instant,
    ) -> impl Future<Output = Result<Option<ThingSpec>, RegistryError>> + Send;
    /// UpdateThing, merging: each attribute with a value set, each without one removed.
    fn update_thing_attributes(
        &self,
        thing: &str,
        attributes: &[(String, Option<String>)],
        deadline: Instant,
    ) -> impl Future<Output = Result<(), RegistryError>> + Send;
    /// ListThingPrincipals: the principals (ARNs) attached to a Thing.
    fn thing_principals(
        &self,
        thing: &str,
        deadline: Instant,
    ) -> impl Future<Output = Result<Vec<String>, RegistryError>> + Send;
    /// DetachThingPrincipal.
    fn detach_thing_principal(
        &self,
        thing: &str,
        certificate_arn: &str,
        deadline: Instant,
    ) -> impl Future<Output = Result<(), RegistryError>> + Send;
    /// ListCertificatesByCA, one page, newest first or oldest first.
    fn list_certificates_by_ca(
        &self,
        ca: &CertificateId,
        marker: Option<String>,
        newest_first: bool,
        deadline: Instant,
    ) -> impl Future<Output = Result<CertificatePage, RegistryError>> + Send;
}

/// What only an operator does to AWS IoT: CA registration, endpoint lookup, revocation and
/// cleanup. Listings return every page.
pub trait IotAdmin: IotRegistry {
    /// DescribeEndpoint for `endpoint_type` (e.g. `iot:Data-ATS`).
    fn describe_endpoint(
        &self,
        endpoint_type: &str,
        deadline: Instant,
    ) -> impl Future<Output = Result<String, RegistryError>> + Send;
    /// GetRegistrationCode.
    fn registration_code(
        &self,
        deadline: Instant,
    ) -> impl Future<Output = Result<String, RegistryError>> + Send;
    /// RegisterCACertificate, active and with auto-registration on; answers the CA's id and
    /// ARN. A CA registered already is [`RegistryError::AlreadyExists`].
    fn register_ca_certificate(
        &self,
        ca_pem: &str,
        mode: &CaRegistrationMode,
        deadline: Instant,
    ) -> impl Future<Output = Result<(String, Option<String>), RegistryError>> + Send;
    /// ListPrincipalThings: the Things a principal is attached to.
    fn principal_things(
        &self,
        certificate_arn: &str,
        deadline: Instant,
    ) -> impl Future<Output = Result<Vec<String>, RegistryError>> + Send;
    /// ListAttachedPolicies: the policies attached to a principal.
    fn attached_policies(
        &self,
        certificate_arn: &str,
        deadline: Instant,
    ) -> impl Future<Output = Result<Vec<String>, RegistryError>> + Send;
    /// DetachPolicy.
    fn detach_policy(
        &self,
        policy: &str,
        certificate_arn: &str,
        deadline: Instant,
    ) -> impl Future<Output = Result<(), RegistryError>> + Send;
    /// DeleteThing: `true` when deleted, `false` when there was no such Thing.
    fn delete_thing(
        &self,
        thing: &str,
        deadline: Instant,
    ) -> impl Future<Output = Result<bool, RegistryError>> + Send;
    /// ListThings: every Thing (name, type, attributes), every page.
    fn list_things(
        &self,
        deadline: Instant,
    ) -> impl Future<Output = Result<Vec<ThingSpec>, RegistryError>> + Send;
    /// RegisterCertificate under the CA `ca_pem` with `status`: the certificate's id. One that
    /// is registered already is success (its status is left as it is).
    fn register_certificate(
        &self,
        pem: &str,
        ca_pem: &str,
        status: CertificateStatus,
        deadline: Instant,
    ) -> impl Future<Output = Result<CertificateId, RegistryError>> + Send;
    /// UpdateCACertificate with a `registrationConfig`: JITP for the CA `ca`.
    fn set_ca_jitp(
        &self,
        ca: &CertificateId,
        config: &JitpConfig,
        deadline: Instant,
    ) -> impl Future<Output = Result<(), RegistryError>> + Send;
    /// CreateProvisioningClaim for the fleet provisioning template `template`.
    fn create_provisioning_claim(
        &self,
        template: &str,
        deadline: Instant,
    ) -> impl Future<Output = Result<ProvisioningClaim, RegistryError>> + Send;
}

/// A CA's just-in-time provisioning (RegisterCACertificate's `registrationConfig`): the
/// template AWS IoT itself applies to every certificate auto-registered under the CA, and the
/// role it assumes to do so. No fleet check: AWS IoT cannot ask balena.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JitpConfig {
    /// The provisioning template, JSON text.
    pub template_body: String,
    /// The IAM role AWS IoT assumes to apply it.
    pub role_arn: String,
}

/// A claim certificate for fleet provisioning by a trusted user (CreateProvisioningClaim):
/// valid for minutes, it lets one device ask for its own certificate through a template.
pub struct ProvisioningClaim {
    /// The claim certificate's id.
    pub certificate_id: String,
    /// The claim certificate, PEM.
    pub certificate_pem: String,
    /// Its private key, PEM.
    pub private_key: zeroize::Zeroizing<String>,
    /// When it stops working, epoch seconds, when AWS said.
    pub expires_at: Option<i64>,
}

impl fmt::Debug for ProvisioningClaim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProvisioningClaim")
            .field("certificate_id", &self.certificate_id)
            .field("expires_at", &self.expires_at)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_code_is_aws_s_answer_through_a_give_up_and_none_without_one() {
        let answered = RegistryError::Throttled {
            op: "UpdateCertificate",
            source: Box::new(AwsAnswer::new("ThrottlingException", "Rate exceeded")),
        };
        assert_eq!(answered.code(), Some("ThrottlingException"));
        assert_eq!(
            crate::error_chain(&answered),
            "AWS IoT UpdateCertificate: ThrottlingException: Rate exceeded"
        );
        let gave_up = RegistryError::GaveUp {
            op: "UpdateCertificate",
            attempts: 3,
            last: Box::new(answered),
        };
        assert_eq!(gave_up.code(), Some("ThrottlingException"));
        let silent = RegistryError::Unavailable {
            op: "DescribeCertificate",
            source: "no answer from AWS IoT before the deadline".into(),
        };
        assert_eq!(silent.code(), None);
        assert_eq!(
            RegistryError::failed("CreateThing", "bad name").code(),
            None
        );
    }
}
