//! AWS IoT Core's control plane as jitr uses it: the ports the decision and the operator's
//! commands are written against ([`IotRegistry`], and [`IotAdmin`] for what only an operator
//! does), the certificate and account ids, the one error type ([`RegistryError`]) with its
//! retry classes, call deadlines, and their implementations: [`aws`] over aws-sdk-iot (feature
//! `aws`, the default), with the operator's [`aws::Session`], and `memory` (feature `testing`),
//! AWS IoT's state in maps for unit tests.
//!
//! Nothing here knows of fleets, ledgers or the activation decision: those are `activator`'s,
//! built on these ports.

#[cfg(feature = "aws")]
pub mod aws;
pub mod counters;
mod ids;
#[cfg(feature = "testing")]
pub mod memory;
mod ports;

pub use ids::{AccountId, CertificateId};
pub use ports::{
    AwsAnswer, CaDescription, CaRegistrationMode, Cause, CertificateDescription, CertificatePage,
    CertificateStatus, IotAdmin, IotRegistry, JitpConfig, ListedCertificate, ProvisioningClaim,
    RegistryError, ThingSpec,
};

/// The longest one AWS IoT call made for an operator's command may take, retries included:
/// an unreachable endpoint fails in this time, not at the command's overall deadline.
pub const OPERATOR_CALL_TIME: std::time::Duration = std::time::Duration::from_secs(10);

/// The deadline of one call within work that must end by `overall`.
pub fn call_deadline(overall: tokio::time::Instant) -> tokio::time::Instant {
    overall.min(tokio::time::Instant::now() + OPERATOR_CALL_TIME)
}

/// An error and its causes on one line, `a: b: c`, skipping a cause whose text the line
/// already holds (SDK errors often repeat their source in their own message).
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut line = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !line.contains(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
        source = cause.source();
    }
    line
}
