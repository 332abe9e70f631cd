//! [`MemoryLedger`]: the issuance ledger in a map, for unit tests.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use tokio::time::Instant;

use crate::ledger::{item, Ledger, LedgerEntry, LedgerError, LedgerFuture, LedgerMark, Marked};
use iot::CertificateId;

#[derive(Debug, Default)]
struct LedgerState {
    entries: HashMap<String, LedgerEntry>,
    unavailable: bool,
    gate: Option<Arc<tokio::sync::Barrier>>,
    reads: usize,
    marks: Vec<(String, String)>,
}

/// A ledger of chosen entries. Clones share the state.
#[derive(Debug, Clone, Default)]
pub struct MemoryLedger(Arc<Mutex<LedgerState>>);

impl MemoryLedger {
    /// An empty ledger.
    pub fn new() -> Self {
        Self::default()
    }

    fn state(&self) -> MutexGuard<'_, LedgerState> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Lists a certificate as issued to `device`.
    pub fn list(&self, certificate_id: &str, device: &str) {
        self.state().entries.insert(
            certificate_id.to_owned(),
            LedgerEntry {
                certificate_id: certificate_id.to_owned(),
                device_id: device.to_owned(),
                serial: "01".into(),
                not_after: "2030-01-01T00:00:00Z".into(),
                issued_at: "2026-01-01T00:00:00Z".into(),
                batch: "unit".into(),
                status: item::STATUS_ISSUED.into(),
                region: None,
            },
        );
    }

    /// The status the ledger holds for a certificate.
    pub fn status(&self, certificate_id: &str) -> Option<String> {
        self.state()
            .entries
            .get(certificate_id)
            .map(|e| e.status.clone())
    }

    /// While `true`, every call fails retryably (DynamoDB unreachable).
    pub fn set_unavailable(&self, unavailable: bool) {
        self.state().unavailable = unavailable;
    }

    /// Every read first waits at `gate` (see [`crate::memory::MemoryFleet::set_gate`]).
    pub fn set_read_gate(&self, gate: Arc<tokio::sync::Barrier>) {
        self.state().gate = Some(gate);
    }

    /// How many entries were read.
    pub fn reads(&self) -> usize {
        self.state().reads
    }

    /// The marks written: (certificate id, status).
    pub fn marks(&self) -> Vec<(String, String)> {
        self.state().marks.clone()
    }

    fn call(&self, op: &'static str) -> Result<(), LedgerError> {
        if self.state().unavailable {
            return Err(LedgerError {
                op,
                table: "memory".into(),
                retryable: true,
                source: "DynamoDB is unreachable (MemoryLedger)".into(),
            });
        }
        Ok(())
    }
}

impl Ledger for MemoryLedger {
    fn entry<'a>(
        &'a self,
        id: &'a CertificateId,
        _deadline: Instant,
    ) -> LedgerFuture<'a, Option<LedgerEntry>> {
        Box::pin(async move {
            let gate = self.state().gate.clone();
            if let Some(gate) = gate {
                gate.wait().await;
            }
            self.call("GetItem")?;
            let mut state = self.state();
            state.reads += 1;
            Ok(state.entries.get(id.as_str()).cloned())
        })
    }

    fn mark<'a>(
        &'a self,
        id: &'a CertificateId,
        mark: &'a LedgerMark,
        _now: &'a str,
        _deadline: Instant,
    ) -> LedgerFuture<'a, Marked> {
        Box::pin(async move {
            self.call("UpdateItem")?;
            let mut state = self.state();
            let Some(entry) = state.entries.get_mut(id.as_str()) else {
                return Ok(Marked::NotListed);
            };
            if *mark == LedgerMark::Activated && entry.status == item::STATUS_ACTIVATED {
                return Ok(Marked::Unchanged);
            }
            entry.status = mark.status().to_owned();
            state.marks.push((id.to_string(), mark.status().to_owned()));
            Ok(Marked::Written)
        })
    }

    fn add<'a>(&'a self, entry: &'a LedgerEntry, _deadline: Instant) -> LedgerFuture<'a, ()> {
        Box::pin(async move {
            self.call("UpdateItem")?;
            self.state()
                .entries
                .entry(entry.certificate_id.clone())
                .or_insert_with(|| entry.clone());
            Ok(())
        })
    }
}
