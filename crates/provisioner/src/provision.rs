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

/// An HTTP answer and the reason logged beside it.
type Answer = (HttpResponse, String);

/// Time kept from the forward path for undoing a failure (revoke, detach, remove variables).
const UNDO_RESERVE: std::time::Duration = std::time::Duration::from_secs(5);

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

    /// The request's work once its form is right: the answer and what to log. The forward
    /// path ends [`UNDO_RESERVE`] before the invocation's deadline, so undoing a failure always
    /// has time of its own.
    async fn provision_checked(&self, request: &ProvisionRequest, deadline: Instant) -> Answer {
        let work = deadline
            .checked_sub(UNDO_RESERVE)
            .unwrap_or_else(Instant::now);
        let fleet = match self.balena().await {
            Ok(fleet) => fleet,
            Err(e) => return (HttpResponse::unavailable("the fleet cannot be checked"), e),
        };
        let member = match self.eligible(fleet, request, work).await {
            Ok(member) => member,
            Err(answer) => return answer,
        };
        match self
            .attempts
            .claim(&request.device, epoch_seconds(), work)
            .await
        {
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
        let (id, vars) = match self.make(&request.device, work).await {
            Ok(made) => made,
            Err(answer) => return answer,
        };
        let scope = Scope::Service(request.service.clone());
        for (name, value) in vars.iter() {
            if let Err(e) = fleet.set_env_var(&member, &scope, name, value, work).await {
                self.undo(&member, request, &id, deadline).await;
                return (
                    HttpResponse::unavailable("the variables cannot be delivered"),
                    format!("variable {name}: {}", error_chain(&e)),
                );
            }
        }
        drop(vars);
        self.activate_made(&member, request, &id, work, deadline)
            .await
    }

    /// The device may be provisioned: an active member of the fleet, running a service the
    /// provisioner serves, with neither an ACTIVE certificate nor credentials delivered another
    /// way. Else the answer (403, 409, 503) and why.
    async fn eligible(
        &self,
        fleet: &balena::Fleet,
        request: &ProvisionRequest,
        work: Instant,
    ) -> Result<balena::Device, Answer> {
        let device = &request.device;
        let unavailable = |what: &str, why: String| (HttpResponse::unavailable(what), why);
        // Fleet first: a stranger learns nothing, not even whether a Thing exists.
        let (membership, active) = tokio::join!(
            fleet.membership(device, work),
            self.active_certificates(device, work)
        );
        let member = match membership {
            Ok(balena::Membership::Member(member)) => member,
            Ok(balena::Membership::Inactive(_)) => {
                return Err((HttpResponse::forbidden(), "inactive in the fleet".into()))
            }
            Ok(balena::Membership::NotMember) => {
                return Err((HttpResponse::forbidden(), "not in the fleet".into()))
            }
            Err(e) => return Err(unavailable("the fleet cannot be checked", error_chain(&e))),
        };
        // The key goes to a configured service only, and only if the device runs it.
        if !self.services.contains(&request.service) {
            let note = format!(
                "service {} is not one the provisioner serves",
                request.service
            );
            return Err((HttpResponse::forbidden(), note));
        }
        match fleet.service_install(&member, &request.service, work).await {
            Ok(_) => {}
            Err(e @ (balena::Error::NoService { .. } | balena::Error::NotInstalled { .. })) => {
                return Err((HttpResponse::forbidden(), error_chain(&e)))
            }
            Err(e) => return Err(unavailable("the fleet cannot be checked", error_chain(&e))),
        }
        match active {
            Ok(active) if !active.is_empty() => {
                let note = format!("certificate {} is ACTIVE already", active[0]);
                return Err((HttpResponse::already_exists(), note));
            }
            Ok(_) => {}
            Err(e) => return Err(unavailable("AWS IoT cannot be read", error_chain(&e))),
        }
        // Credentials delivered another way (the factory's `--push-balena`) are the device's
        // identity: never overwritten, never removed.
        for name in [delivery::AWS_CERT, delivery::AWS_PRIVATE_KEY] {
            match fleet.has_env_var(&member, name, work).await {
                Ok(false) => {}
                Ok(true) => {
                    let note = format!("the device has {name} already");
                    return Err((HttpResponse::already_exists(), note));
                }
                Err(e) => return Err(unavailable("the fleet cannot be checked", error_chain(&e))),
            }
        }
        Ok(member)
    }

    /// A key and a certificate signed in KMS, the certificate registered PENDING_ACTIVATION:
    /// its id and the variables to deliver.
    async fn make(
        &self,
        device: &DeviceId,
        work: Instant,
    ) -> Result<(CertificateId, DeliveryVariables), Answer> {
        let issued = self
            .issue(device)
            .await
            .map_err(|e| (HttpResponse::unavailable("signing failed"), e))?;
        let registry = self.activator.registry();
        let id = register_pending(registry, &issued.cert_pem, self.ca.cert_pem(), work)
            .await
            .map_err(|e| {
                (
                    HttpResponse::unavailable("the certificate cannot be registered"),
                    error_chain(&e),
                )
            })?;
        let vars = DeliveryVariables::new(
            device,
            &issued.chain_pem,
            issued.key_pem.as_deref().map(String::as_str),
            Some(&self.endpoint),
            &self.topic_prefix,
        );
        Ok((id, vars))
    }

    /// The activator's decision on the delivered certificate (trusted CA, profile, fleet,
    /// ownership, then Thing, policy, principal, ACTIVE last), and the answer it makes; any
    /// outcome but `activated` is undone.
    async fn activate_made(
        &self,
        member: &balena::Device,
        request: &ProvisionRequest,
        id: &CertificateId,
        work: Instant,
        deadline: Instant,
    ) -> Answer {
        let decision = match self.activator.activate(id, Some(&self.ca_id), work).await {
            Ok(decision) => decision,
            Err(e) => {
                self.undo(member, request, id, deadline).await;
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
                    &json!({"thingName": request.device.as_str(), "certificateId": id.as_str()}),
                ),
                decision.reason,
            ),
            Outcome::Held => {
                // Another certificate became the device's identity meanwhile.
                self.undo(member, request, id, deadline).await;
                (HttpResponse::already_exists(), decision.reason)
            }
            Outcome::Rejected => {
                // Revoked (or deactivated) by the decision, before anything was attached: the
                // device left the fleet meanwhile.
                self.remove_credentials(member, request, deadline).await;
                (HttpResponse::forbidden(), decision.reason)
            }
            Outcome::AlreadyActive | Outcome::Skipped => {
                self.undo(member, request, id, deadline).await;
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

    /// Revokes the certificate, detaches it, and removes the credentials this request
    /// delivered: a retry starts clean. Runs on the invocation's own deadline, past the
    /// forward path's.
    async fn undo(
        &self,
        member: &balena::Device,
        request: &ProvisionRequest,
        id: &CertificateId,
        deadline: Instant,
    ) {
        self.revoke_quietly(id, &request.device, deadline).await;
        self.remove_credentials(member, request, deadline).await;
    }

    /// Removes `AWS_CERT` and `AWS_PRIVATE_KEY` from the request's service on the device: the
    /// two this request created (they were nowhere on the device before it). Nothing
    /// device-wide, no other service, no other variable.
    async fn remove_credentials(
        &self,
        member: &balena::Device,
        request: &ProvisionRequest,
        deadline: Instant,
    ) {
        let removed = match self.balena().await {
            Ok(fleet) => fleet
                .remove_service_vars(
                    member,
                    &request.service,
                    &[delivery::AWS_CERT, delivery::AWS_PRIVATE_KEY],
                    deadline,
                )
                .await
                .map_err(|e| error_chain(&e)),
            Err(e) => Err(e),
        };
        if let Err(e) = removed {
            tracing::error!(device_id = %member.uuid, service = %request.service, error = %e, "could not remove the delivered credentials; remove AWS_CERT and AWS_PRIVATE_KEY from that service by hand");
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
