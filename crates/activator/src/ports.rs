//! The two capabilities the decision needs, as traits: the AWS IoT registry and the fleet
//! directory. Adapters live in [`crate::aws`], [`crate::balena`] and [`crate::allowlist`];
//! unit tests use in-memory fakes.

use std::future::Future;
use std::time::Duration;

use factory_ca::DeviceId;
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

/// The Thing to create for an activated device.
#[derive(Debug, Clone)]
pub struct ThingSpec {
    /// Thing name: the device id.
    pub name: String,
    /// Optional thing type.
    pub thing_type: Option<String>,
    /// Searchable attributes.
    pub attributes: Vec<(String, String)>,
}

/// A registry call that failed.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The resource does not exist.
    #[error("AWS IoT {op}: not found")]
    NotFound {
        op: &'static str,
        #[source]
        source: Cause,
    },
    /// Throttled (`ThrottlingException`).
    #[error("AWS IoT {op}: throttled")]
    Throttled {
        op: &'static str,
        #[source]
        source: Cause,
    },
    /// 5xx, timeout or connection failure.
    #[error("AWS IoT {op}: service unavailable")]
    Unavailable {
        op: &'static str,
        #[source]
        source: Cause,
    },
    /// Still throttled or unavailable after `attempts` tries, with no time left before the
    /// deadline for another.
    #[error(
        "AWS IoT {op}: gave up after {attempts} attempt(s), too close to the deadline to try again"
    )]
    GaveUp {
        op: &'static str,
        attempts: u32,
        #[source]
        last: Box<RegistryError>,
    },
    /// Any other failure (access denied, invalid request...).
    #[error("AWS IoT {op} failed")]
    Failed {
        op: &'static str,
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
}

/// The AWS IoT control plane, as the decision uses it. Every write is idempotent:
/// "already exists" and "already attached" are success.
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
    /// DescribeCACertificate: the CA certificate PEM.
    fn ca_certificate_pem(
        &self,
        id: &CertificateId,
        deadline: Instant,
    ) -> impl Future<Output = Result<String, RegistryError>> + Send;
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
    /// ListCertificatesByCA, one page.
    fn list_certificates_by_ca(
        &self,
        ca: &CertificateId,
        marker: Option<String>,
        deadline: Instant,
    ) -> impl Future<Output = Result<CertificatePage, RegistryError>> + Send;
}

/// Whether a device belongs to the fleet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Membership {
    /// In the fleet and active.
    Member,
    /// In the fleet but deactivated.
    Inactive,
    /// Not in the fleet (proven, not merely unseen).
    NotMember,
}

/// A fleet check that could not be answered. Always transient: the certificate stays
/// pending and the check runs again.
#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    /// The API key was refused (401/403).
    #[error("fleet API refused the API key (HTTP {status})")]
    Unauthorized { status: u16 },
    /// 429 with a Retry-After beyond the invocation's deadline.
    #[error("fleet API rate limited us (retry after {retry_after:?})")]
    RateLimited { retry_after: Duration },
    /// 5xx or an unexpected status.
    #[error("fleet API answered HTTP {status}")]
    Status { status: u16 },
    /// No answer in time.
    #[error("fleet API did not answer in time")]
    Timeout,
    /// Connection failure.
    #[error("fleet API unreachable")]
    Transport(#[source] Cause),
    /// An answer we cannot read.
    #[error("fleet API answer unreadable")]
    Unparsable(#[source] Cause),
    /// The key cannot see the fleet, so an empty answer proves nothing.
    #[error("the API key cannot see fleet {fleet}: an empty answer proves nothing")]
    FleetNotVisible { fleet: String },
    /// More than one device with one UUID.
    #[error("fleet API returned {rows} devices for one UUID")]
    Ambiguous { rows: usize },
    /// The API key could not be fetched.
    #[error("cannot fetch the balena API key")]
    Secret(#[source] Cause),
}

/// The fleet a device must belong to.
pub trait FleetDirectory: Send + Sync {
    /// Whether `device` is an active member, answering before `deadline`.
    fn membership(
        &self,
        device: &DeviceId,
        deadline: Instant,
    ) -> impl Future<Output = Result<Membership, FleetError>> + Send;
    /// A short name for the fleet, recorded on the Thing (`fleet` attribute).
    fn label(&self) -> String;
    /// Records on the fleet side that `device` was activated with `certificate` (balena: device
    /// tags). Best effort, after activation: a failure is logged and changes nothing. The
    /// default records nothing.
    fn record_activation(
        &self,
        device: &DeviceId,
        certificate: &CertificateId,
        deadline: Instant,
    ) -> impl Future<Output = Result<(), Cause>> + Send {
        let _ = (device, certificate, deadline);
        std::future::ready(Ok(()))
    }
}
