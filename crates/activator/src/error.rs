//! Why an invocation did not reach a decision.

use crate::{ledger::LedgerError, EventError, FleetError};
use iot::RegistryError;

/// Why an invocation did not reach a decision. The certificate is left as it was.
#[derive(Debug, thiserror::Error)]
pub enum ActivationError {
    /// The event failed validation (permanent: the same event always fails).
    #[error(transparent)]
    Event(#[from] EventError),
    /// An AWS IoT call failed.
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// The fleet check could not be answered.
    #[error("fleet check failed")]
    Fleet(#[from] FleetError),
    /// The ledger, required, could not be read: nothing is activated unread.
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    /// The certificate is not valid yet, by less than the allowed clock skew: a device clock
    /// (or ours) a little off, waited out rather than rejected for good.
    #[error("the certificate is not valid before {not_before} ({seconds} s from now, within JITR_CLOCK_SKEW_SECONDS): left pending")]
    NotYetValid {
        /// notBefore, RFC 3339.
        not_before: String,
        /// How far ahead it is.
        seconds: i64,
    },
}

impl ActivationError {
    /// Whether a retry can succeed unchanged (throttling, 5xx, timeouts, fleet API down).
    pub fn is_retryable(&self) -> bool {
        match self {
            ActivationError::Event(_) => false,
            ActivationError::Registry(e) => e.is_retryable(),
            ActivationError::Ledger(e) => e.retryable,
            ActivationError::Fleet(_) | ActivationError::NotYetValid { .. } => true,
        }
    }

    /// The error type reported to Lambda.
    pub fn error_type(&self) -> &'static str {
        match self {
            ActivationError::Event(_) => "MalformedEvent",
            _ if self.is_retryable() => "Retryable",
            _ => "Failed",
        }
    }
}
