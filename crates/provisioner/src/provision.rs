//! cloud-relay's provisioning request, answered safely: the token, an unfinished undo
//! finished, checked, limited, made, delivered, then activated by the activator's own
//! decision, or undone (and what could not be undone recorded, for the next request).

use std::sync::Arc;
use std::time::Instant as StdInstant;

use activator::Outcome;
use balena::delivery::{self, DeliveryVariables};
use balena::Scope;
use factory_ca::{DeviceId, IssuedDevice};
use iot::{error_chain, CertificateId};
use serde_json::json;
use time::OffsetDateTime;
use tokio::time::Instant;

use crate::attempts::PendingUndo;
use crate::request::{HttpRequest, HttpResponse, ProvisionRequest};
use crate::{epoch_seconds, register_pending, Claim, Provisioner};

/// An HTTP answer and the reason logged beside it.
type Answer = (HttpResponse, String);

/// Time kept from the forward path for undoing a failure (revoke, detach, remove variables).
const UNDO_RESERVE: std::time::Duration = std::time::Duration::from_secs(5);
/// Time kept from the undo for recording what it could not do.
const RECORD_RESERVE: std::time::Duration = std::time::Duration::from_millis(1500);

impl Provisioner {
    /// Answers one function URL request. Every path ends in an HTTP answer and one log line.
    pub async fn provision(&self, event: &serde_json::Value, deadline: Instant) -> HttpResponse {
        let started = StdInstant::now();
        // Before anything else, the body included: without the token, a caller learns nothing,
        // not even whether its request was well-formed.
        if let Some(token) = &self.token {
            if !token.presented_in(event) {
                let refused = HttpResponse::forbidden();
                log(None, &refused, "no or wrong provisioning token", started);
                return refused;
            }
        }
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
        if let Err(answer) = self.finish_undo(fleet, request, work).await {
            return answer;
        }
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

    /// Finishes what an earlier attempt for the device could not undo (its certificate revoked
    /// and detached, its credentials removed from the service), before anything else is read:
    /// a device is never left with a revoked `AWS_CERT`, answered "provisioned already". While
    /// the undo cannot be finished, the answer is 503.
    async fn finish_undo(
        &self,
        fleet: &balena::Fleet,
        request: &ProvisionRequest,
        work: Instant,
    ) -> Result<(), Answer> {
        let device = &request.device;
        let pending = match self.attempts.pending_undo(device, work).await {
            Ok(Some(pending)) => pending,
            Ok(None) => return Ok(()),
            Err(e) => {
                let answer = HttpResponse::unavailable("the attempts table cannot be read");
                return Err((answer, e.to_string()));
            }
        };
        let member = match &pending.service {
            None => None,
            Some(_) => match fleet.membership(device, work).await {
                Ok(balena::FleetMembership::Member(d) | balena::FleetMembership::Inactive(d)) => {
                    Some(d)
                }
                // Gone from the fleet: its variables went with it.
                Ok(balena::FleetMembership::NotMember) => None,
                Err(e) => {
                    let answer = HttpResponse::unavailable("the fleet cannot be checked");
                    return Err((answer, error_chain(&e)));
                }
            },
        };
        let pending = PendingUndo {
            service: pending.service.filter(|_| member.is_some()),
            ..pending
        };
        let steps = work
            .checked_sub(RECORD_RESERVE)
            .unwrap_or_else(Instant::now);
        let (left, why) = self
            .undo_steps(member.as_ref(), device, &pending, steps)
            .await;
        let recorded = self
            .attempts
            .record_undo(device, &left, epoch_seconds(), work)
            .await;
        match (left.is_empty(), recorded) {
            (true, Ok(())) => {
                tracing::info!(device_id = %device, "finished the undo an earlier attempt left");
                Ok(())
            }
            (true, Err(e)) => Err((
                HttpResponse::unavailable("the attempts table cannot be written"),
                format!("the earlier attempt is undone, but its record stays: {e}"),
            )),
            (false, recorded) => {
                let mut note = format!("an earlier attempt is still not undone: {why}");
                if let Err(e) = recorded {
                    note.push_str(&format!("; {e}"));
                }
                Err((
                    HttpResponse::unavailable("an earlier attempt is still being undone"),
                    note,
                ))
            }
        }
    }

    /// The device may be provisioned: an active member of the fleet, its Thing without the
    /// revocation mark, running a service the provisioner serves, with neither an ACTIVE
    /// certificate nor credentials delivered another way. Else the answer (403, 409, 503) and
    /// why; every refusal of the device itself is the one 403.
    async fn eligible(
        &self,
        fleet: &balena::Fleet,
        request: &ProvisionRequest,
        work: Instant,
    ) -> Result<balena::Device, Answer> {
        let device = &request.device;
        let unavailable = |what: &str, why: String| (HttpResponse::unavailable(what), why);
        // Fleet first: a stranger learns nothing, not even whether a Thing exists.
        let (membership, active, mark) = tokio::join!(
            fleet.membership(device, work),
            self.active_certificates(device, work),
            self.revoked_mark(device, work)
        );
        let member = match membership {
            Ok(balena::FleetMembership::Member(member)) => member,
            Ok(balena::FleetMembership::Inactive(_)) => {
                return Err((HttpResponse::forbidden(), "inactive in the fleet".into()))
            }
            Ok(balena::FleetMembership::NotMember) => {
                return Err((HttpResponse::forbidden(), "not in the fleet".into()))
            }
            Err(e) => return Err(unavailable("the fleet cannot be checked", error_chain(&e))),
        };
        // Cut off for good by `jitr revoke --id`: refused, whatever else it has, until
        // `jitr approve --device` clears the mark.
        match mark {
            Ok(Some(at)) => {
                let note = format!("revoked for good at {at} (the Thing's jitr-revoked mark)");
                return Err((HttpResponse::forbidden(), note));
            }
            Ok(None) => {}
            Err(e) => return Err(unavailable("AWS IoT cannot be read", error_chain(&e))),
        }
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
                let undo = PendingUndo {
                    certificate: None,
                    service: Some(request.service.clone()),
                };
                self.undo_recorded(member, &request.device, undo, deadline)
                    .await;
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
        let undo = PendingUndo {
            certificate: Some(id.clone()),
            service: Some(request.service.clone()),
        };
        self.undo_recorded(member, &request.device, undo, deadline)
            .await;
    }

    /// Does `undo`; what it cannot do is recorded in the attempts table (by `deadline`, the
    /// steps ending [`RECORD_RESERVE`] before it), for the device's next request to finish.
    async fn undo_recorded(
        &self,
        member: &balena::Device,
        device: &DeviceId,
        undo: PendingUndo,
        deadline: Instant,
    ) {
        let steps = deadline
            .checked_sub(RECORD_RESERVE)
            .unwrap_or_else(Instant::now);
        let (left, why) = self.undo_steps(Some(member), device, &undo, steps).await;
        if left.is_empty() {
            return;
        }
        let certificate_id = left.certificate.as_ref().map(CertificateId::as_str);
        let service = left.service.as_deref();
        match self
            .attempts
            .record_undo(device, &left, epoch_seconds(), deadline)
            .await
        {
            Ok(()) => {
                tracing::warn!(device_id = %device, certificate_id, service, error = %why, "could not undo a failed provisioning; recorded, the device's next request finishes it");
            }
            Err(e) => {
                tracing::error!(device_id = %device, certificate_id, service, error = %why, record = %e, "could not undo a failed provisioning, nor record it; revoke the certificate (jitr revoke --certificate-id) and remove AWS_CERT and AWS_PRIVATE_KEY from that service by hand");
            }
        }
    }

    /// Runs the steps of `undo` by `deadline` (the certificate revoked and detached, and the
    /// service's credentials removed when `member` is given): what is left, and why.
    async fn undo_steps(
        &self,
        member: Option<&balena::Device>,
        device: &DeviceId,
        undo: &PendingUndo,
        deadline: Instant,
    ) -> (PendingUndo, String) {
        let retracted = async {
            match &undo.certificate {
                Some(id) => self
                    .retract(id, device, deadline)
                    .await
                    .map_err(|e| error_chain(&e)),
                None => Ok(()),
            }
        };
        let removed = async {
            match (member, &undo.service) {
                (Some(member), Some(service)) => {
                    self.remove_credentials(member, service, deadline).await
                }
                _ => Ok(()),
            }
        };
        let (retracted, removed) = tokio::join!(retracted, removed);
        let mut why = Vec::new();
        let mut left = PendingUndo::default();
        if let Err(e) = retracted {
            left.certificate = undo.certificate.clone();
            why.push(format!("certificate: {e}"));
        }
        if let Err(e) = removed {
            left.service = undo.service.clone();
            why.push(format!("variables: {e}"));
        }
        (left, why.join("; "))
    }

    /// Removes `AWS_CERT` and `AWS_PRIVATE_KEY` from `service` on the device: the two a
    /// request of the provisioner created (they were nowhere on the device before it). Nothing
    /// device-wide, no other service, no other variable; a service no longer installed has
    /// none.
    async fn remove_credentials(
        &self,
        member: &balena::Device,
        service: &str,
        deadline: Instant,
    ) -> Result<(), String> {
        let fleet = self.balena().await?;
        match fleet
            .remove_service_vars(
                member,
                service,
                &[delivery::AWS_CERT, delivery::AWS_PRIVATE_KEY],
                deadline,
            )
            .await
        {
            Ok(()) | Err(balena::Error::NoService { .. } | balena::Error::NotInstalled { .. }) => {
                Ok(())
            }
            Err(e) => Err(error_chain(&e)),
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
