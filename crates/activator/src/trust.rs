//! Proving a certificate is ours: its CA trusted, ACTIVE in AWS IoT and within its validity
//! (the CA's description cached for at most a minute), the certificate one well-formed
//! certificate that hashes to its id, signed by that CA, valid now, to the device profile.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use factory_ca::{
    certificates_from_pem_or_der, inspect_device_certificate, Check, DeviceId, InspectOptions,
};
use tokio::time::Instant;

use crate::{ActivationError, Activator, FleetDirectory};
use iot::{CertificateId, IotRegistry, RegistryError};

/// How long a CA's description is trusted before it is read again: an operator's
/// `update-ca-certificate --new-status INACTIVE` takes effect within this time.
pub const CA_CACHE_TIME: Duration = Duration::from_secs(60);

/// What AWS IoT said about a CA, and when.
#[derive(Debug)]
pub(crate) struct CachedCa {
    der: Vec<u8>,
    status: Option<String>,
    fetched: Instant,
}

/// The CA descriptions, by id.
pub(crate) type CaCache = Mutex<HashMap<CertificateId, Arc<CachedCa>>>;

/// The verdict on a certificate before anything is written.
pub(crate) enum Verdict {
    /// Ours, for this device.
    Accept(DeviceId),
    /// Not ours; the Thing it names, when it names a valid one.
    Reject {
        thing: Option<DeviceId>,
        reason: String,
    },
}

impl Verdict {
    fn rejected(reason: impl Into<String>) -> Result<Verdict, ActivationError> {
        Ok(Verdict::Reject {
            thing: None,
            reason: reason.into(),
        })
    }
}

impl<R: IotRegistry, F: FleetDirectory> Activator<R, F> {
    /// Proves the certificate `id` (PEM `pem`, registered under `ca_id`) is ours.
    pub(crate) async fn verify(
        &self,
        id: &CertificateId,
        pem: &str,
        ca_id: &CertificateId,
        deadline: Instant,
    ) -> Result<Verdict, ActivationError> {
        if !self.policy.trusted_ca_ids.contains(ca_id) {
            return Verdict::rejected(format!("CA {ca_id} is not in JITR_TRUSTED_CA_IDS"));
        }
        let der = match certificates_from_pem_or_der(pem.as_bytes()) {
            Ok(certs) if certs.len() == 1 => certs.into_iter().next().unwrap_or_default(),
            Ok(certs) => {
                return Verdict::rejected(format!(
                    "the registered PEM holds {} certificates",
                    certs.len()
                ))
            }
            Err(e) => return Verdict::rejected(format!("the registered PEM does not parse: {e}")),
        };
        if factory_ca::certificate_id(&der) != id.as_str() {
            return Verdict::rejected("the registered certificate does not hash to its id");
        }
        let ca = self.ca(ca_id, deadline).await?;
        if ca.status.as_deref() != Some("ACTIVE") {
            return Verdict::rejected(format!(
                "CA {ca_id} is {} in AWS IoT: nothing under it is activated",
                ca.status.as_deref().unwrap_or("of unknown status")
            ));
        }
        let now = (self.clock)();
        let inspection = inspect_device_certificate(
            &der,
            &InspectOptions {
                id_format: self.policy.id_format,
                ca_der: Some(&ca.der),
                now,
                max_validity_days: Some(self.policy.max_validity_days),
            },
        );
        let Some(failure) = inspection.first_failure() else {
            return match inspection.device_id {
                Some(device) => Ok(Verdict::Accept(device)),
                None => Verdict::rejected("no device id"),
            };
        };
        // A device clock (or ours) a little off: not yet valid by less than the allowed skew
        // is a wait, never a rejection, which could not be undone.
        if failure.check == Check::Validity {
            if let Some(not_before) = inspection.not_before.filter(|nb| *nb > now) {
                let early = not_before - now;
                if early <= self.policy.clock_skew {
                    return Err(ActivationError::NotYetValid {
                        not_before: factory_ca::show_time(not_before),
                        seconds: early.whole_seconds(),
                    });
                }
            }
        }
        Ok(Verdict::Reject {
            thing: inspection.device_id.clone(),
            reason: format!("{}: {}", failure.check, failure.detail),
        })
    }

    /// The CA's description, from the cache when younger than [`CA_CACHE_TIME`].
    async fn ca(
        &self,
        ca_id: &CertificateId,
        deadline: Instant,
    ) -> Result<Arc<CachedCa>, ActivationError> {
        let cached = self
            .ca_cache
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(ca_id)
            .filter(|ca| ca.fetched.elapsed() < CA_CACHE_TIME)
            .cloned();
        if let Some(ca) = cached {
            return Ok(ca);
        }
        let description = self
            .registry
            .describe_ca_certificate(ca_id, deadline)
            .await?;
        let der = certificates_from_pem_or_der(description.pem.as_bytes())
            .ok()
            .and_then(|certs| certs.into_iter().next())
            .ok_or_else(|| {
                RegistryError::failed(
                    "DescribeCACertificate",
                    "the CA certificate PEM does not parse",
                )
            })?;
        let ca = Arc::new(CachedCa {
            der,
            status: description.status,
            fetched: Instant::now(),
        });
        self.ca_cache
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(ca_id.clone(), ca.clone());
        Ok(ca)
    }
}
