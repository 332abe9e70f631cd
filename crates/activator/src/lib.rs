//! The JITR activation decision for AWS IoT Core, over the `iot` crate's registry ports, with
//! the fleet and ledger ports and their adapters (balena, the allowlist, DynamoDB).
//!
//! One invocation takes the `$aws/events/certificates/registered/<caId>` event, proves the
//! certificate is ours (trusted CA, signature, validity, device profile, device id), checks
//! fleet membership, then creates the Thing and attaches policy and principal, and activates
//! the certificate last. The Lambda (`bootstrap`) and `jitr reconcile` both run this code
//! with the same configuration. The operator's other AWS IoT work (`jitr status`, `register`,
//! `rotate`, `revoke`, `ca register`) is the `operations` crate's, built on the ports, the
//! ownership rule and the adapters here and in `iot`.

pub mod allowlist;
#[cfg(feature = "adapters")]
pub mod balena_directory;
mod config;
mod decision;
#[cfg(feature = "adapters")]
mod deployed;
#[cfg(feature = "adapters")]
pub mod dynamodb;
mod error;
mod event;
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
pub use error::ActivationError;
pub use event::{EventError, RegisteredEvent};
pub use incoming::{Incoming, ReplayRecord};
pub use ports::{FleetDirectory, FleetError, FleetMember, Membership};
pub use sweep::{
    Progress, SweepEvent, SweepOptions, SweepReport, LEDGER_MARK_WINDOW, SWEEP_DECISION_TIME,
    SWEEP_PAGE_TIME,
};
pub use trust::CA_CACHE_TIME;

#[cfg(feature = "adapters")]
pub use deployed::{build, build_with_sdk, DeployedActivator, FleetBackend};
