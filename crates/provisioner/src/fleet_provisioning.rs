//! AWS IoT fleet provisioning by claim, with our CA and our fleet check:
//!
//! - the **pre-provisioning hook**: AWS sends `{claimCertificateId, certificateId,
//!   certificatePem, templateArn, clientId, parameters}` and waits at most 5 s for
//!   `{allowProvisioning, parameterOverrides}`. Allowed only for an active member of the pinned
//!   fleet (its UUID in the template parameter `JITR_FP_UUID_PARAMETER`) with no ACTIVE
//!   certificate, whose certificate, when it names a device, names that one. Answered within
//!   [`HOOK_BUDGET`] whatever balena or AWS IoT do: no answer in time is a refusal.
//! - the **certificate provider**: AWS sends the device's `certificateSigningRequest` from
//!   `CreateCertificateFromCsr` and takes back `{certificatePem}`: signed here by the CA in
//!   KMS, to the device profile (the CSR's CN is the device UUID).

use std::sync::Arc;
use std::time::{Duration, Instant as StdInstant};

use activator::error_chain;
use serde_json::{json, Value};
use time::OffsetDateTime;
use tokio::time::Instant;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::Provisioner;

/// The hook's whole budget: AWS allows 5 s; this leaves room for the runtime's round trip.
pub const HOOK_BUDGET: Duration = Duration::from_millis(3500);
/// The largest CSR accepted.
const MAX_CSR: usize = 16 * 1024;

/// A certificate provider request that cannot be signed.
#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    /// The request or its CSR is not acceptable (permanent).
    #[error("{0}")]
    Refused(String),
    /// Signing failed (KMS unreachable, throttled): the device may try again.
    #[error("{0}")]
    Failed(String),
}

impl Provisioner {
    /// The pre-provisioning hook's answer: `{"allowProvisioning": bool}`.
    pub async fn pre_provisioning_hook(&self, event: &Value, deadline: Instant) -> Value {
        let started = StdInstant::now();
        let budget = deadline.min(Instant::now() + HOOK_BUDGET);
        let verdict = match tokio::time::timeout_at(budget, self.hook_verdict(event, budget)).await
        {
            Ok(verdict) => verdict,
            Err(_) => Err("no answer within the hook's budget".to_owned()),
        };
        let duration_ms = started.elapsed().as_millis() as u64;
        let certificate_id = event["certificateId"].as_str().unwrap_or("");
        match verdict {
            Ok(device) => {
                tracing::info!(device_id = %device, certificate_id, allow = true, duration_ms, "pre-provisioning hook");
                json!({"allowProvisioning": true})
            }
            Err(reason) => {
                tracing::warn!(certificate_id, allow = false, reason = %reason, duration_ms, "pre-provisioning hook");
                json!({"allowProvisioning": false})
            }
        }
    }

    /// The device the hook allows, or why not.
    async fn hook_verdict(&self, event: &Value, budget: Instant) -> Result<String, String> {
        let parameter = &self.uuid_parameter;
        let Some(uuid) = event["parameters"][parameter.as_str()].as_str() else {
            return Err(format!("no template parameter {parameter}"));
        };
        let format = self.activator.policy().id_format;
        let device = factory_ca::DeviceId::parse(uuid, format)
            .map_err(|_| format!("parameter {parameter} is not a device UUID"))?;
        if let Some(named) = event["certificatePem"].as_str().and_then(certificate_cn) {
            if factory_ca::DeviceId::parse(&named, format).is_ok() && named != device.as_str() {
                return Err(format!(
                    "the certificate names device {named}, the parameter {device}"
                ));
            }
        }
        let fleet = self.balena().await?;
        let (membership, active) = tokio::join!(
            fleet.membership(&device, budget),
            self.active_certificates(&device, budget)
        );
        match membership.map_err(|e| error_chain(&e))? {
            balena::Membership::Member(_) => {}
            balena::Membership::Inactive(_) => {
                return Err(format!("device {device} is inactive in the fleet"))
            }
            balena::Membership::NotMember => {
                return Err(format!("device {device} is not in the fleet"))
            }
        }
        let active = active.map_err(|e| error_chain(&e))?;
        if let Some(id) = active.first() {
            return Err(format!(
                "device {device} has an ACTIVE certificate already ({id})"
            ));
        }
        Ok(device.to_string())
    }

    /// The certificate provider's answer: `{"certificatePem": "..."}`.
    pub async fn certificate_provider(&self, event: &Value) -> Result<Value, ProviderError> {
        let started = StdInstant::now();
        let Some(csr) = event["certificateSigningRequest"].as_str() else {
            return Err(ProviderError::Refused(
                "certificateSigningRequest is missing".into(),
            ));
        };
        if csr.len() > MAX_CSR {
            return Err(ProviderError::Refused(format!(
                "certificateSigningRequest is larger than {MAX_CSR} bytes"
            )));
        }
        let (ca, csr, days) = (Arc::clone(&self.ca), csr.as_bytes().to_vec(), self.days);
        let signed =
            tokio::task::spawn_blocking(move || ca.sign_csr(&csr, days, OffsetDateTime::now_utc()))
                .await
                .map_err(|e| ProviderError::Failed(format!("signing panicked: {e}")))?;
        let duration_ms = started.elapsed().as_millis() as u64;
        match signed {
            Ok(issued) => {
                tracing::info!(device_id = %issued.entry.id, certificate_id = %issued.entry.certificate_id, duration_ms, "certificate provider");
                Ok(json!({"certificatePem": issued.cert_pem}))
            }
            Err(e) => {
                let reason = e.to_string();
                tracing::warn!(reason = %reason, duration_ms, "certificate provider refused");
                match e {
                    factory_ca::Error::RemoteKey { .. } | factory_ca::Error::CaExpired { .. } => {
                        Err(ProviderError::Failed(reason))
                    }
                    _ => Err(ProviderError::Refused(reason)),
                }
            }
        }
    }
}

/// The subject CN of a PEM certificate, when it has exactly one.
fn certificate_cn(pem: &str) -> Option<String> {
    let der = factory_ca::certificates_from_pem_or_der(pem.as_bytes())
        .ok()?
        .into_iter()
        .next()?;
    let (_, cert) = X509Certificate::from_der(&der).ok()?;
    let mut cns = cert.subject().iter_common_name();
    let cn = cns.next()?.as_str().ok()?.to_owned();
    cns.next().is_none().then_some(cn)
}
