//! The fleet directory port ([`FleetDirectory`]): whether a device is a member of the fleet,
//! and the values it answers with. Adapters live in [`crate::balena_directory`] and [`crate::allowlist`];
//! the in-memory fleet for unit tests in `memory` (feature `testing`). The AWS IoT registry's
//! ports are the `iot` crate's.

use std::fmt;
use std::future::Future;

use factory_ca::DeviceId;
use iot::{Cause, CertificateId};
use tokio::time::Instant;

/// A member of the fleet as the directory found it: what the write-back needs to find the
/// device again without a second lookup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FleetMember {
    /// The device.
    pub device: DeviceId,
    /// The directory's own handle for it (balena's numeric device id), when it has one.
    pub handle: Option<u64>,
}

/// Whether a device belongs to the fleet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Membership {
    /// In the fleet and active.
    Member(FleetMember),
    /// In the fleet but deactivated.
    Inactive,
    /// Not in the fleet (proven, not merely unseen).
    NotMember,
}

/// A fleet check that could not be answered. Always transient: the certificate stays
/// pending and the check runs again. Displays as its cause.
#[derive(Debug)]
pub struct FleetError(pub Cause);

impl fmt::Display for FleetError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for FleetError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.0.source()
    }
}

/// The fleet a device must belong to.
pub trait FleetDirectory: Send + Sync {
    /// Whether `device` is an active member, answering before `deadline`.
    fn membership(
        &self,
        device: &DeviceId,
        deadline: Instant,
    ) -> impl Future<Output = Result<Membership, FleetError>> + Send;
    /// A short name for the fleet, for logs and reasons.
    fn label(&self) -> String;
    /// The fleet, as the Thing's fleet attribute records it ([`crate::ownership::fleet_attribute`]).
    fn mark(&self) -> crate::ownership::FleetMark;
    /// Records on the fleet side that `member` was activated with `certificate` (balena: device
    /// tags). Best effort, after activation: a failure is logged and changes nothing. The
    /// default records nothing.
    fn record_activation(
        &self,
        member: &FleetMember,
        certificate: &CertificateId,
        deadline: Instant,
    ) -> impl Future<Output = Result<(), Cause>> + Send {
        let _ = (member, certificate, deadline);
        std::future::ready(Ok(()))
    }
}
