//! The JITR activation decision for AWS IoT Core, its ports and their adapters.
//!
//! One invocation takes the `$aws/events/certificates/registered/<caId>` event, proves the
//! certificate is ours (trusted CA, signature, validity, device profile, device id), checks
//! fleet membership, then creates the Thing and attaches policy and principal, and activates
//! the certificate last. The Lambda (`bootstrap`) and `jitr reconcile` both run this code
//! with the same configuration. The operator's other AWS IoT work (`jitr status`, `register`,
//! `rotate`, `revoke`, `ca register`) is the `operations` crate's, built on the ports, the
//! ownership rule and the adapters here.

pub mod allowlist;
#[cfg(feature = "adapters")]
pub mod aws;
mod config;
mod decision;
#[cfg(feature = "adapters")]
mod deployed;
mod error;
mod event;
#[cfg(feature = "adapters")]
pub mod fleet;
mod ids;
mod incoming;
#[cfg(feature = "adapters")]
pub mod lambda;
pub mod ledger;
#[cfg(feature = "testing")]
pub mod memory;
pub mod metrics;
pub mod ownership;
mod ports;
pub mod presence;
mod sweep;
mod trust;

pub use balena::FleetId;
pub use config::{
    balena_fleet_from_env, ownership_hints_from_env, parse_duration, ApiKeySource, Config,
    ConfigError, FleetConfig, LedgerConfig, Policy, RejectAction, WriteBack,
};
pub use decision::{Activator, Approval, Decision, Outcome};
pub use error::{error_chain, ActivationError};
pub use event::{EventError, RegisteredEvent};
pub use ids::{AccountId, CertificateId};
pub use incoming::{Incoming, ReplayRecord};
pub use ledger::{Ledger, LedgerEntry, LedgerError, LedgerMark, LedgerMode, Marked};
pub use ownership::{fleet_attribute, FleetMark, Ownership, Retire};
pub use ports::{
    CaDescription, CaRegistrationMode, Cause, CertificateDescription, CertificatePage,
    CertificateStatus, FleetDirectory, FleetError, FleetMember, IotAdmin, IotRegistry, JitpConfig,
    ListedCertificate, Membership, ProvisioningClaim, RegistryError, ThingSpec,
};
pub use sweep::{
    Progress, SweepEvent, SweepOptions, SweepReport, LEDGER_MARK_WINDOW, SWEEP_DECISION_TIME,
    SWEEP_PAGE_TIME,
};
pub use trust::CA_CACHE_TIME;

#[cfg(feature = "adapters")]
pub use deployed::{build, build_with_sdk, DeployedActivator, FleetBackend};

/// The longest one AWS IoT call made for an operator's command may take, retries included:
/// an unreachable endpoint fails in this time, not at the command's overall deadline.
pub const OPERATOR_CALL_TIME: std::time::Duration = std::time::Duration::from_secs(10);

/// The deadline of one call within work that must end by `overall`.
pub fn call_deadline(overall: tokio::time::Instant) -> tokio::time::Instant {
    overall.min(tokio::time::Instant::now() + OPERATOR_CALL_TIME)
}
