//! cloud-relay's provisioning request, answered safely: checked, limited, made, delivered,
//! then activated by the activator's own decision, or undone.

use std::sync::Arc;
use std::time::Instant as StdInstant;

use activator::{error_chain, CertificateId, Outcome};
use balena::delivery::{self, DeliveryVariables};
use balena::Scope;
use factory_ca::{DeviceId, IssuedDevice};
use serde_json::json;
use time::OffsetDateTime;
use tokio::time::Instant;

use crate::request::{HttpRequest, HttpResponse, ProvisionRequest};
use crate::{epoch_seconds, register_pending, Claim, Provisioner};

impl Provisioner {
    /// Answers one function URL request. Every path ends in an HTTP answer and one log line.
    pub async fn provision(&self, event: &serde_json::Value, deadline: Instant) -> HttpResponse {
        let started = StdInstant::now();
        let request = match HttpRequest::from_event(event)
            .and_then(|r| ProvisionRequest::parse(&r, self.activator.policy().id_format))
        {
            Ok(request) => request,
            Err(refused) => {
                log(None, &refused, "malformed request", started);
                return refused;
            }
        };
        let (response, note) = self.provision_checked(&request, deadline).await;
        log(Some(&request), &response, &note, started);
        response
    }

    /// The request's work once its form is right: the answer and what to log.
    async fn provision_checked(
        &self,
        request: &ProvisionRequest,
        deadline: Instant,
    ) -> (HttpResponse, String) {
        let device = &request.device;
        let fleet = match self.balena().await {
            Ok(fleet) => fleet,
            Err(e) => return (HttpResponse::unavailable("the fleet cannot be checked"), e),
        };
        // Fleet first: a stranger learns nothing, not even whether a Thing exists.
        let (membership, active) = tokio::join!(
            fleet.membership(device, deadline),
            self.active_certificates(device, deadline)
        );
        let member = match membership {
            Ok(balena::Membership::Member(member)) => member,
            Ok(balena::Membership::Inactive(_)) => {
                return (HttpResponse::forbidden(), "inactive in the fleet".into())
            }
            Ok(balena::Membership::NotMember) => {
                return (HttpResponse::forbidden(), "not in the fleet".into())
            }
            Err(e) => {
                return (
                    HttpResponse::unavailable("the fleet cannot be checked"),
                    error_chain(&e),
                )
            }
        };
        match active {
            Ok(active) if !active.is_empty() => {
                let note = format!("certificate {} is ACTIVE already", active[0]);
                return (HttpResponse::already_exists(), note);
            }
            Ok(_) => {}
            Err(e) => {
                return (
                    HttpResponse::unavailable("AWS IoT cannot be read"),
                    error_chain(&e),
                )
            }
        }
        match self.attempts.claim(device, epoch_seconds(), deadline).await {
            Ok(Claim::Granted) => {}
            Ok(Claim::Limited { retry_after }) => {
                return (
                    HttpResponse::too_many(retry_after),
                    "an attempt within the interval".into(),
                )
            }
            Err(e) => {
                return (
                    HttpResponse::unavailable("the attempts table cannot be written"),
                    e.to_string(),
                )
            }
        }
        let issued = match self.issue(device).await {
            Ok(issued) => issued,
            Err(e) => return (HttpResponse::unavailable("signing failed"), e),
        };
        let registry = self.activator.registry();
        let id = match register_pending(registry, &issued.cert_pem, self.ca.cert_pem(), deadline)
            .await
        {
            Ok(id) => id,
            Err(e) => {
                return (
                    HttpResponse::unavailable("the certificate cannot be registered"),
                    error_chain(&e),
                )
            }
        };
        let vars = DeliveryVariables::new(
            device,
            &issued.chain_pem,
            issued.key_pem.as_deref().map(String::as_str),
            Some(&self.endpoint),
            &self.topic_prefix,
        );
        drop(issued);
        let scope = Scope::Service(request.service.clone());
        for (name, value) in vars.iter() {
            if let Err(e) = fleet
                .set_env_var(&member, &scope, name, value, deadline)
                .await
            {
                self.undo(&member, &id, deadline).await;
                return (
                    HttpResponse::unavailable("the variables cannot be delivered"),
                    format!("variable {name}: {}", error_chain(&e)),
                );
            }
        }
        drop(vars);
        // The activator's decision: trusted CA, profile, fleet, ownership, then Thing, policy,
        // principal, and the certificate activated last.
        let decision = match self
            .activator
            .activate(&id, Some(&self.ca_id), deadline)
            .await
        {
            Ok(decision) => decision,
            Err(e) => {
                self.undo(&member, &id, deadline).await;
                return (
                    HttpResponse::unavailable("the certificate cannot be activated"),
                    error_chain(&e),
                );
            }
        };
        match decision.outcome {
            Outcome::Activated => (
                HttpResponse::json(
                    201,
                    &json!({"thingName": device.as_str(), "certificateId": id.as_str()}),
                ),
                decision.reason,
            ),
            Outcome::Held => {
                // Another certificate became the device's identity meanwhile.
                self.undo(&member, &id, deadline).await;
                (HttpResponse::already_exists(), decision.reason)
            }
            Outcome::Rejected => {
                // Revoked by the decision (the device left the fleet meanwhile).
                self.remove_vars(&member, deadline).await;
                (HttpResponse::forbidden(), decision.reason)
            }
            Outcome::AlreadyActive | Outcome::Skipped => {
                self.undo(&member, &id, deadline).await;
                (
                    HttpResponse::unavailable("the certificate was changed while provisioning"),
                    decision.reason,
                )
            }
        }
    }

    /// A key and a certificate for `device`, signed through KMS on a blocking thread.
    async fn issue(&self, device: &DeviceId) -> Result<IssuedDevice, String> {
        let (ca, device) = (Arc::clone(&self.ca), device.clone());
        let (key, days) = (self.key, self.days);
        tokio::task::spawn_blocking(move || {
            ca.issue_device(&device, key, days, OffsetDateTime::now_utc())
        })
        .await
        .map_err(|e| format!("signing panicked: {e}"))?
        .map_err(|e| e.to_string())
    }

    /// Revokes the certificate and removes what was delivered: a retry starts clean.
    async fn undo(&self, member: &balena::Device, id: &CertificateId, deadline: Instant) {
        self.revoke_quietly(id, deadline).await;
        self.remove_vars(member, deadline).await;
    }

    async fn remove_vars(&self, member: &balena::Device, deadline: Instant) {
        let removed = match self.balena().await {
            Ok(fleet) => fleet
                .remove_env_vars(member, &delivery::ALL, deadline)
                .await
                .map_err(|e| error_chain(&e)),
            Err(e) => Err(e),
        };
        if let Err(e) = removed {
            tracing::error!(device_id = %member.uuid, error = %e, "could not remove the delivered variables; remove them by hand (jitr revoke --balena-cleanup)");
        }
    }
}

/// One line per request: the device, the status, why; never a key or a certificate.
fn log(
    request: Option<&ProvisionRequest>,
    response: &HttpResponse,
    note: &str,
    started: StdInstant,
) {
    let device_id = request.map_or("", |r| r.device.as_str());
    let service = request.map_or("", |r| r.service.as_str());
    let duration_ms = started.elapsed().as_millis() as u64;
    if response.status >= 500 {
        tracing::warn!(device_id, service, status = response.status, reason = %note, duration_ms, "provision");
    } else {
        tracing::info!(device_id, service, status = response.status, reason = %note, duration_ms, "provision");
    }
}
