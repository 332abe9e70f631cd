//! [`MemoryFleet`]: a fleet of chosen devices, for unit tests.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use factory_ca::DeviceId;
use tokio::time::Instant;

use crate::{FleetDirectory, FleetError, FleetMember, Membership};
use iot::{Cause, CertificateId};

/// Where a device stands in a [`MemoryFleet`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Standing {
    /// An active member.
    Member,
    /// In the fleet, deactivated.
    Inactive,
}

#[derive(Debug, Default)]
struct FleetState {
    devices: HashMap<String, Standing>,
    unavailable: bool,
    gate: Option<Arc<tokio::sync::Barrier>>,
    recorded: Vec<(String, String)>,
}

/// A fleet of chosen devices; every other device is not a member. Clones share the state.
#[derive(Debug, Clone, Default)]
pub struct MemoryFleet(Arc<Mutex<FleetState>>);

impl MemoryFleet {
    /// An empty fleet.
    pub fn new() -> Self {
        Self::default()
    }

    fn state(&self) -> MutexGuard<'_, FleetState> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Puts a device in the fleet.
    pub fn add(&self, device: &str, standing: Standing) {
        self.state().devices.insert(device.to_owned(), standing);
    }

    /// While `true`, every membership check fails (the fleet API is down).
    pub fn set_unavailable(&self, unavailable: bool) {
        self.state().unavailable = unavailable;
    }

    /// Every membership check first waits at `gate` (with another port's call that must run
    /// alongside it: run one after the other, they would wait for ever).
    pub fn set_gate(&self, gate: Arc<tokio::sync::Barrier>) {
        self.state().gate = Some(gate);
    }

    /// The activations recorded: (device, certificate id).
    pub fn recorded(&self) -> Vec<(String, String)> {
        self.state().recorded.clone()
    }
}

impl FleetDirectory for MemoryFleet {
    async fn membership(
        &self,
        device: &DeviceId,
        _deadline: Instant,
    ) -> Result<Membership, FleetError> {
        let gate = self.state().gate.clone();
        if let Some(gate) = gate {
            gate.wait().await;
        }
        let state = self.state();
        if state.unavailable {
            return Err(FleetError("the fleet API is down (MemoryFleet)".into()));
        }
        Ok(match state.devices.get(device.as_str()) {
            Some(Standing::Member) => Membership::Member(FleetMember {
                device: device.clone(),
                handle: None,
            }),
            Some(Standing::Inactive) => Membership::Inactive,
            None => Membership::NotMember,
        })
    }

    fn label(&self) -> String {
        "the memory fleet".into()
    }

    fn mark(&self) -> crate::ownership::FleetMark {
        crate::ownership::FleetMark::Memory
    }

    async fn record_activation(
        &self,
        member: &FleetMember,
        certificate: &CertificateId,
        _deadline: Instant,
    ) -> Result<(), Cause> {
        self.state()
            .recorded
            .push((member.device.to_string(), certificate.to_string()));
        Ok(())
    }
}
