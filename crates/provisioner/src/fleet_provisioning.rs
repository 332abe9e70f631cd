//! AWS IoT fleet provisioning by claim, with our CA and our fleet check:
//!
//! - the **pre-provisioning hook**: AWS sends `{claimCertificateId, certificateId,
//!   certificatePem, templateArn, clientId, parameters}` and waits at most 5 s for
//!   `{allowProvisioning, parameterOverrides}`. Allowed only for an active member of the pinned
//!   fleet (its UUID in the template parameter `JITR_FP_UUID_PARAMETER`) with no ACTIVE or
//!   pending certificate and no revocation mark on its Thing, presenting a certificate our CA
//!   signed whose CN is that UUID.
//!   Answered within [`HOOK_BUDGET`] whatever balena or AWS IoT do: no answer in time is a
//!   refusal.
//! - the **certificate provider**: AWS sends the device's `certificateSigningRequest` from
//!   `CreateCertificateFromCsr` and takes back `{certificatePem}`: signed here by the CA in
//!   KMS, to the device profile, only when the CSR's CN is an active member of the fleet
//!   whose Thing has no revocation mark and no live (ACTIVE or PENDING_ACTIVATION) certificate
//!   attached. The provider is the account's: any principal allowed
//!   `CreateCertificateFromCsr` reaches it, so it is a door of its own, checked like the hook.

use std::sync::Arc;
use std::time::{Duration, Instant as StdInstant};

use iot::error_chain;
use serde_json::{json, Value};
use time::OffsetDateTime;
use tokio::time::Instant;
use x509_parser::prelude::{FromDer, X509Certificate, X509CertificationRequest};

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
        // The certificate must be ours (signed by the CA, which only the provider uses) and
        // name this device: a claim holder cannot register another device, nor a certificate
        // AWS IoT made.
        let Some(pem) = event["certificatePem"].as_str() else {
            return Err("no certificatePem".to_owned());
        };
        let named = self.our_certificate_cn(pem)?;
        if named != device.as_str() {
            return Err(format!(
                "the certificate names {named:?}, the parameter {device}"
            ));
        }
        self.may_have_a_first_certificate(&device, budget)
            .await
            .map_err(|refusal| refusal.to_string())?;
        Ok(device.to_string())
    }

    /// Whether `device` may be given its first certificate by fleet provisioning: an active
    /// member of the fleet, its Thing without the revocation mark, and no ACTIVE or
    /// PENDING_ACTIVATION certificate attached to it (of any CA: one of the fleet CA's is the
    /// device's identity, and any other a claim to the name that an operator must settle).
    async fn may_have_a_first_certificate(
        &self,
        device: &factory_ca::DeviceId,
        budget: Instant,
    ) -> Result<(), Refusal> {
        let fleet = self.balena().await.map_err(Refusal::Unknown)?;
        let (membership, live, mark) = tokio::join!(
            fleet.membership(device, budget),
            self.live_certificates(device, budget),
            self.revoked_mark(device, budget)
        );
        let unknown = |e: &dyn std::error::Error| Refusal::Unknown(error_chain(e));
        match membership.map_err(|e| unknown(&e))? {
            balena::FleetMembership::Member(_) => {}
            balena::FleetMembership::Inactive(_) => {
                return Err(Refusal::No(format!(
                    "device {device} is inactive in the fleet"
                )))
            }
            balena::FleetMembership::NotMember => {
                return Err(Refusal::No(format!("device {device} is not in the fleet")))
            }
        }
        if let Some(at) = mark.map_err(|e| unknown(&e))? {
            return Err(Refusal::No(format!(
                "device {device} was revoked for good at {at} (the Thing's jitr-revoked mark)"
            )));
        }
        let live = live.map_err(|e| unknown(&e))?;
        if let Some(id) = live.first() {
            return Err(Refusal::No(format!(
                "device {device} has an ACTIVE or pending certificate already ({id})"
            )));
        }
        Ok(())
    }

    /// The certificate provider's answer: `{"certificatePem": "..."}`, for a device that may
    /// have a first certificate; the checks end within [`HOOK_BUDGET`] or by `deadline`.
    pub async fn certificate_provider(
        &self,
        event: &Value,
        deadline: Instant,
    ) -> Result<Value, ProviderError> {
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
        let budget = deadline.min(Instant::now() + HOOK_BUDGET);
        let checked = async {
            let device = csr_device(csr.as_bytes(), self.activator.policy().id_format)
                .map_err(Refusal::No)?;
            self.may_have_a_first_certificate(&device, budget).await?;
            Ok::<_, Refusal>(device)
        };
        let checked = match tokio::time::timeout_at(budget, checked).await {
            Ok(checked) => checked,
            Err(_) => Err(Refusal::Unknown(
                "no answer from balena or AWS IoT within the budget".into(),
            )),
        };
        if let Err(refusal) = checked {
            let duration_ms = started.elapsed().as_millis() as u64;
            let principal_id = event["principalId"].as_str().unwrap_or("");
            let reason = refusal.to_string();
            tracing::warn!(principal_id, reason = %reason, duration_ms, "certificate provider refused");
            return Err(match refusal {
                Refusal::No(_) => ProviderError::Refused(reason),
                Refusal::Unknown(_) => ProviderError::Failed(reason),
            });
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

/// Why a device may not have a first certificate.
#[derive(Debug, thiserror::Error)]
enum Refusal {
    /// It may not (permanent).
    #[error("{0}")]
    No(String),
    /// It could not be found out (balena or AWS IoT did not answer): asking again may succeed.
    #[error("{0}")]
    Unknown(String),
}

/// The device a CSR (PEM or DER) names: its one CN, a device id in `format`. Only read here;
/// the signing checks the CSR in full.
fn csr_device(bytes: &[u8], format: factory_ca::IdFormat) -> Result<factory_ca::DeviceId, String> {
    let pem;
    let der = if bytes.starts_with(b"-----") {
        pem = x509_parser::pem::parse_x509_pem(bytes)
            .map_err(|e| format!("certificateSigningRequest: malformed PEM: {e}"))?
            .1;
        &pem.contents
    } else {
        bytes
    };
    let (_, csr) = X509CertificationRequest::from_der(der)
        .map_err(|e| format!("certificateSigningRequest does not parse: {e}"))?;
    let mut cns = csr.certification_request_info.subject.iter_common_name();
    let cn = cns
        .next()
        .and_then(|cn| cn.as_str().ok())
        .ok_or("the CSR has no CN")?;
    if cns.next().is_some() {
        return Err("the CSR has more than one CN".to_owned());
    }
    factory_ca::DeviceId::parse(cn, format)
        .map_err(|_| format!("the CSR's CN {cn:?} is not a device id"))
}

impl Provisioner {
    /// The subject CN of a PEM certificate that our CA signed (exactly one CN), or why not.
    fn our_certificate_cn(&self, pem: &str) -> Result<String, String> {
        let der = factory_ca::certificates_from_pem_or_der(pem.as_bytes())?
            .into_iter()
            .next()
            .ok_or("no certificate in certificatePem")?;
        let (_, cert) = X509Certificate::from_der(&der)
            .map_err(|e| format!("certificatePem does not parse: {e}"))?;
        let (_, ca) = X509Certificate::from_der(self.ca.cert_der())
            .map_err(|e| format!("the CA certificate does not parse: {e}"))?;
        cert.verify_signature(Some(ca.public_key()))
            .map_err(|_| "the certificate is not signed by the CA".to_owned())?;
        let mut cns = cert.subject().iter_common_name();
        let cn = cns
            .next()
            .and_then(|cn| cn.as_str().ok())
            .ok_or("the certificate has no CN")?
            .to_owned();
        if cns.next().is_some() {
            return Err("the certificate has more than one CN".to_owned());
        }
        Ok(cn)
    }
}
