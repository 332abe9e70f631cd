//! The activation decision: verify, check the fleet, provision, activate last.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant as StdInstant;

use factory_ca::{
    certificates_from_pem_or_der, inspect_device_certificate, DeviceId, InspectOptions,
};
use serde::Serialize;
use time::OffsetDateTime;
use tokio::time::Instant;

use crate::error::error_chain;
use crate::{
    AccountId, ActivationError, CertificateId, CertificateStatus, FleetDirectory, IotRegistry,
    Membership, Policy, RegisteredEvent, RegistryError, RejectAction, ThingSpec,
};

/// How an invocation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    /// Provisioned and activated now.
    Activated,
    /// It was active already; nothing written.
    AlreadyActive,
    /// Refused; the certificate was revoked (or deactivated).
    Rejected,
    /// Not ours to act on (revoked, inactive, gone, or a mismatched event); nothing written.
    Skipped,
}

impl Outcome {
    /// The name used in responses and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Activated => "activated",
            Outcome::AlreadyActive => "already-active",
            Outcome::Rejected => "rejected",
            Outcome::Skipped => "skipped",
        }
    }
}

/// The response of one invocation (also logged as one JSON line).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Decision {
    /// The certificate acted on.
    pub certificate_id: String,
    /// The Thing (device id), when the certificate names a valid one.
    pub thing_name: Option<String>,
    /// What happened.
    pub outcome: Outcome,
    /// Why, in words.
    pub reason: String,
}

/// The decision with its two ports and its rules. Build once, call per event.
#[derive(Debug)]
pub struct Activator<R, F> {
    pub(crate) registry: R,
    fleet: F,
    pub(crate) policy: Policy,
    /// CA certificates (DER) by id, fetched once per container.
    ca_cache: Mutex<HashMap<CertificateId, Arc<Vec<u8>>>>,
    clock: fn() -> OffsetDateTime,
}

/// The verdict on a certificate before anything is written.
enum Verdict {
    Accept(DeviceId),
    Reject {
        thing: Option<DeviceId>,
        reason: String,
    },
}

impl<R: IotRegistry, F: FleetDirectory> Activator<R, F> {
    /// An activator using the system clock.
    pub fn new(registry: R, fleet: F, policy: Policy) -> Self {
        Activator {
            registry,
            fleet,
            policy,
            ca_cache: Mutex::new(HashMap::new()),
            clock: OffsetDateTime::now_utc,
        }
    }

    /// The same, judging validity at the time `clock` gives.
    pub fn with_clock(mut self, clock: fn() -> OffsetDateTime) -> Self {
        self.clock = clock;
        self
    }

    /// The registry port (for callers that sweep, like `jitr reconcile`).
    pub fn registry(&self) -> &R {
        &self.registry
    }

    /// The rules in force.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// Handles one certificate-registered event. `account` is the account this code runs in,
    /// when known: an event claiming another account is skipped.
    pub async fn handle_event(
        &self,
        event: &RegisteredEvent,
        account: Option<&AccountId>,
        deadline: Instant,
    ) -> Result<Decision, ActivationError> {
        if let Some(account) = account {
            if *account != event.aws_account_id {
                return Ok(self.log(
                    Decision {
                        certificate_id: event.certificate_id.to_string(),
                        thing_name: None,
                        outcome: Outcome::Skipped,
                        reason: format!(
                            "event names account {}, this is {account}",
                            event.aws_account_id
                        ),
                    },
                    StdInstant::now(),
                ));
            }
        }
        self.activate(
            &event.certificate_id,
            Some(&event.ca_certificate_id),
            deadline,
        )
        .await
    }

    /// Runs the decision for one certificate, as the event or a reconcile sweep asks.
    pub async fn activate(
        &self,
        id: &CertificateId,
        event_ca: Option<&CertificateId>,
        deadline: Instant,
    ) -> Result<Decision, ActivationError> {
        let started = StdInstant::now();
        let result = self.decide(id, event_ca, deadline).await;
        match result {
            Ok(decision) => Ok(self.log(decision, started)),
            Err(error) => {
                tracing::warn!(
                    certificate_id = %id,
                    retryable = error.is_retryable(),
                    error = %error_chain(&error),
                    duration_ms = started.elapsed().as_millis() as u64,
                    "activation failed; certificate left as it was"
                );
                Err(error)
            }
        }
    }

    pub(crate) fn log(&self, decision: Decision, started: StdInstant) -> Decision {
        tracing::info!(
            certificate_id = %decision.certificate_id,
            device_id = decision.thing_name.as_deref().unwrap_or(""),
            outcome = decision.outcome.as_str(),
            reason = %decision.reason,
            duration_ms = started.elapsed().as_millis() as u64,
            "decision"
        );
        decision
    }

    async fn decide(
        &self,
        id: &CertificateId,
        event_ca: Option<&CertificateId>,
        deadline: Instant,
    ) -> Result<Decision, ActivationError> {
        let decision = |thing: Option<&DeviceId>, outcome, reason: String| Decision {
            certificate_id: id.to_string(),
            thing_name: thing.map(|t| t.to_string()),
            outcome,
            reason,
        };
        let cert = match self.registry.describe_certificate(id, deadline).await {
            Ok(cert) => cert,
            Err(RegistryError::NotFound { .. }) => {
                return Ok(decision(
                    None,
                    Outcome::Skipped,
                    "the certificate is not registered".into(),
                ));
            }
            Err(e) => return Err(e.into()),
        };
        match &cert.status {
            CertificateStatus::PendingActivation => {}
            CertificateStatus::Active => {
                return Ok(decision(
                    None,
                    Outcome::AlreadyActive,
                    "the certificate is already active".into(),
                ))
            }
            other => {
                return Ok(decision(
                    None,
                    Outcome::Skipped,
                    format!("the certificate is {other:?}, never reactivated"),
                ))
            }
        }
        if let (Some(event_ca), Some(registered_ca)) = (event_ca, &cert.ca_certificate_id) {
            if event_ca != registered_ca {
                return Ok(decision(None, Outcome::Skipped, format!("the event names CA {event_ca}, the certificate is registered under {registered_ca}")));
            }
        }
        let ca_id = cert.ca_certificate_id.as_ref().or(event_ca);

        let verdict = match ca_id {
            None => Verdict::Reject {
                thing: None,
                reason: "the certificate is not registered under any CA".into(),
            },
            Some(ca_id) if !self.policy.trusted_ca_ids.contains(ca_id) => Verdict::Reject {
                thing: None,
                reason: format!("CA {ca_id} is not in JITR_TRUSTED_CA_IDS"),
            },
            Some(ca_id) => self.verify(id, &cert.pem, ca_id, deadline).await?,
        };
        let device = match verdict {
            Verdict::Accept(device) => device,
            Verdict::Reject { thing, reason } => {
                return self.reject(id, thing.as_ref(), reason, deadline).await
            }
        };

        let member = match self.fleet.membership(&device, deadline).await? {
            Membership::Member(member) => member,
            Membership::NotMember => {
                let reason = format!("device {device} is not in {}", self.fleet.label());
                return self.reject(id, Some(&device), reason, deadline).await;
            }
            Membership::Inactive => {
                let reason = format!("device {device} is inactive in {}", self.fleet.label());
                return self.reject(id, Some(&device), reason, deadline).await;
            }
        };

        self.provision(&device, &cert.arn, deadline).await?;
        // Always last: until here the certificate cannot connect, whatever failed.
        self.registry
            .set_certificate_status(id, CertificateStatus::Active, deadline)
            .await?;
        // The device is active whatever happens here: a failed write-back is only reported.
        if let Err(error) = self.fleet.record_activation(&member, id, deadline).await {
            tracing::warn!(
                certificate_id = %id,
                device_id = %device,
                error = %error_chain(error.as_ref()),
                "fleet write-back failed; the device is activated all the same"
            );
        }
        Ok(decision(
            Some(&device),
            Outcome::Activated,
            format!("device {device} is in {}", self.fleet.label()),
        ))
    }

    /// Proves the certificate is ours: one certificate, the id is its hash, signed by the
    /// trusted CA, valid now, to the device profile, CN a device id.
    async fn verify(
        &self,
        id: &CertificateId,
        pem: &str,
        ca_id: &CertificateId,
        deadline: Instant,
    ) -> Result<Verdict, ActivationError> {
        let reject = |reason: String| {
            Ok(Verdict::Reject {
                thing: None,
                reason,
            })
        };
        let der = match certificates_from_pem_or_der(pem.as_bytes()) {
            Ok(certs) if certs.len() == 1 => certs.into_iter().next().unwrap_or_default(),
            Ok(certs) => {
                return reject(format!(
                    "the registered PEM holds {} certificates",
                    certs.len()
                ))
            }
            Err(e) => return reject(format!("the registered PEM does not parse: {e}")),
        };
        if factory_ca::certificate_id(&der) != id.as_str() {
            return reject("the registered certificate does not hash to its id".into());
        }
        let ca_der = self.ca_certificate(ca_id, deadline).await?;
        let inspection = inspect_device_certificate(
            &der,
            &InspectOptions {
                id_format: self.policy.id_format,
                ca_der: Some(&ca_der),
                now: (self.clock)(),
            },
        );
        match inspection.first_failure() {
            None => match inspection.device_id {
                Some(device) => Ok(Verdict::Accept(device)),
                None => reject("no device id".into()),
            },
            Some(f) => Ok(Verdict::Reject {
                thing: inspection.device_id.clone(),
                reason: format!("{}: {}", f.check, f.detail),
            }),
        }
    }

    async fn ca_certificate(
        &self,
        ca_id: &CertificateId,
        deadline: Instant,
    ) -> Result<Arc<Vec<u8>>, ActivationError> {
        if let Some(der) = self
            .ca_cache
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(ca_id)
        {
            return Ok(der.clone());
        }
        let pem = self
            .registry
            .describe_ca_certificate(ca_id, deadline)
            .await?
            .pem;
        let der = certificates_from_pem_or_der(pem.as_bytes())
            .ok()
            .and_then(|certs| certs.into_iter().next())
            .ok_or_else(|| {
                RegistryError::failed(
                    "DescribeCACertificate",
                    "the CA certificate PEM does not parse",
                )
            })?;
        let der = Arc::new(der);
        self.ca_cache
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(ca_id.clone(), der.clone());
        Ok(der)
    }

    /// CreateThing (then the group) alongside AttachPolicy, then AttachThingPrincipal.
    async fn provision(
        &self,
        device: &DeviceId,
        certificate_arn: &str,
        deadline: Instant,
    ) -> Result<(), RegistryError> {
        let thing = ThingSpec {
            name: device.to_string(),
            thing_type: self.policy.thing_type.clone(),
            attributes: vec![("fleet".into(), self.fleet.label().replace(' ', "-"))],
        };
        let create = async {
            self.registry.create_thing(&thing, deadline).await?;
            if let Some(group) = &self.policy.thing_group {
                self.registry
                    .add_thing_to_group(&thing.name, group, deadline)
                    .await?;
            }
            Ok::<_, RegistryError>(())
        };
        let attach =
            self.registry
                .attach_policy(&self.policy.policy_name, certificate_arn, deadline);
        tokio::try_join!(create, attach)?;
        self.registry
            .attach_thing_principal(&thing.name, certificate_arn, deadline)
            .await
    }

    async fn reject(
        &self,
        id: &CertificateId,
        thing: Option<&DeviceId>,
        reason: String,
        deadline: Instant,
    ) -> Result<Decision, ActivationError> {
        let status = match self.policy.reject_action {
            RejectAction::Revoke => CertificateStatus::Revoked,
            RejectAction::Deactivate => CertificateStatus::Inactive,
        };
        self.registry
            .set_certificate_status(id, status, deadline)
            .await?;
        Ok(Decision {
            certificate_id: id.to_string(),
            thing_name: thing.map(|t| t.to_string()),
            outcome: Outcome::Rejected,
            reason,
        })
    }
}

#[cfg(test)]
mod tests;
