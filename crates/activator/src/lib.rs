//! The JITR activation decision for AWS IoT Core, its ports and their adapters.
//!
//! One invocation takes the `$aws/events/certificates/registered/<caId>` event, proves the
//! certificate is ours (trusted CA, signature, validity, device profile, device id), checks
//! fleet membership, then creates the Thing and attaches policy and principal, and activates
//! the certificate last. The Lambda (`bootstrap`) and `jitr reconcile` both run this code
//! with the same configuration.

pub mod allowlist;
#[cfg(feature = "adapters")]
pub mod aws;
#[cfg(feature = "adapters")]
pub mod balena;
mod config;
mod decision;
#[cfg(feature = "adapters")]
mod deployed;
mod error;
mod event;
mod ids;
mod incoming;
mod ports;

pub use config::{
    ApiKey, ApiKeySource, Config, ConfigError, FleetConfig, Policy, RejectAction, WriteBack,
};
pub use decision::{Activator, Decision, Outcome, SweepReport, SWEEP_DECISION_TIME};
pub use error::{error_chain, ActivationError};
pub use event::{EventError, RegisteredEvent};
pub use ids::{AccountId, CertificateId, FleetId};
pub use incoming::{Incoming, ReplayRecord};
pub use ports::{
    Cause, CertificateDescription, CertificatePage, CertificateStatus, FleetDirectory, FleetError,
    IotRegistry, ListedCertificate, Membership, RegistryError, ThingSpec,
};

#[cfg(feature = "adapters")]
pub use deployed::{build, build_with_sdk, DeployedActivator, FleetBackend};
