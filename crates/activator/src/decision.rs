//! The activation decision: verify, check the fleet, provision, activate last.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant as StdInstant;

use factory_ca::DeviceId;
use serde::Serialize;
use time::OffsetDateTime;
use tokio::time::Instant;

use crate::ledger::{Ledger, LedgerEntry, LedgerError, LedgerMark, LedgerMode, LedgerPort, Marked};
use crate::ownership::{Owners, Retire};
use crate::trust::{CaCache, Verdict};
use crate::{
    ActivationError, FleetDirectory, FleetMember, Membership, Policy, RegisteredEvent, RejectAction,
};
use iot::error_chain;
use iot::{
    AccountId, CertificateDescription, CertificateId, CertificateStatus, IotRegistry,
    RegistryError, ThingSpec,
};

/// How an invocation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    /// Provisioned and activated now.
    Activated,
    /// It was active already; nothing written.
    AlreadyActive,
    /// Left PENDING_ACTIVATION on purpose: another certificate is the device's identity
    /// (`jitr approve` can make this one it), or the ledger (`JITR_LEDGER=require`) does not
    /// list it.
    Held,
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
            Outcome::Held => "held",
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
    /// CA descriptions by id, each trusted for [`crate::trust::CA_CACHE_TIME`].
    pub(crate) ca_cache: CaCache,
    pub(crate) clock: fn() -> OffsetDateTime,
    /// The issuance ledger, when one is configured.
    pub(crate) ledger: Option<LedgerPort>,
}

/// Who asks for the decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// An event, a replay or a sweep: a certificate that is not the device's only identity
    /// is held.
    Automatic,
    /// An operator's `jitr approve`: the certificate replaces the device's identity.
    Approve(Retire),
}

/// What an approval did beyond the decision.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Approval {
    /// The decision on the approved certificate.
    pub decision: Decision,
    /// The certificates it replaced, retired as asked (none but for `jitr approve`).
    pub retired: Vec<String>,
}

impl From<Decision> for Approval {
    /// A decision that retired nothing.
    fn from(decision: Decision) -> Self {
        Approval {
            decision,
            retired: Vec::new(),
        }
    }
}

/// A certificate the checks accepted, and what they found: what activating it needs.
struct Accepted<'a> {
    id: &'a CertificateId,
    cert: &'a CertificateDescription,
    device: &'a DeviceId,
    member: &'a FleetMember,
    owners: Owners,
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
            ledger: None,
        }
    }

    /// The same, marking every decision in `ledger` and, in [`LedgerMode::Require`], holding
    /// any certificate it does not list.
    pub fn with_ledger(mut self, ledger: Box<dyn Ledger>, mode: LedgerMode) -> Self {
        self.ledger = Some(LedgerPort { ledger, mode });
        self
    }

    /// The ledger, when one is configured (for `jitr approve --add-to-ledger`).
    pub fn ledger(&self) -> Option<&dyn Ledger> {
        self.ledger.as_ref().map(|port| port.ledger.as_ref())
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

    /// The fleet port (for callers that check membership themselves, like the provisioner).
    pub fn fleet(&self) -> &F {
        &self.fleet
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
        self.logged(id, self.decide(id, event_ca, Mode::Automatic, deadline))
            .await
            .map(|approval| approval.decision)
    }

    /// `jitr approve`: the same checks as any decision, but a certificate that another one
    /// holds the device's place for is activated, and the other retired as `retire` says
    /// (after the new one is active, so the device is never without a usable certificate).
    pub async fn approve(
        &self,
        id: &CertificateId,
        retire: Retire,
        deadline: Instant,
    ) -> Result<Approval, ActivationError> {
        self.logged(id, self.decide(id, None, Mode::Approve(retire), deadline))
            .await
    }

    /// Logs how a decision ended: one line per decision, a warning for a failure or a hold.
    async fn logged(
        &self,
        id: &CertificateId,
        decision: impl std::future::Future<Output = Result<Approval, ActivationError>>,
    ) -> Result<Approval, ActivationError> {
        let started = StdInstant::now();
        match decision.await {
            Ok(Approval { decision, retired }) => Ok(Approval {
                decision: self.log(decision, started),
                retired,
            }),
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
        let duration_ms = started.elapsed().as_millis() as u64;
        let device_id = decision.thing_name.as_deref().unwrap_or("");
        if decision.outcome == Outcome::Held {
            tracing::warn!(
                certificate_id = %decision.certificate_id,
                device_id,
                outcome = decision.outcome.as_str(),
                reason = %decision.reason,
                duration_ms,
                "decision"
            );
        } else {
            tracing::info!(
                certificate_id = %decision.certificate_id,
                device_id,
                outcome = decision.outcome.as_str(),
                reason = %decision.reason,
                duration_ms,
                "decision"
            );
        }
        decision
    }

    /// The decision, in at most five sequential round trips when nothing else is attached to
    /// the device's Thing: DescribeCertificate; the fleet check alongside the Thing's
    /// principals (and the ledger's item, when it is required); CreateThing alongside
    /// AttachPolicy; AttachThingPrincipal alongside the certificate's status read again and the
    /// principals read again; UpdateCertificate ACTIVE, always last. The CA's description is
    /// cached, so only a cold start pays for it. With a ledger, the decision is marked after
    /// it is made, alongside the tidying up that follows an activation.
    async fn decide(
        &self,
        id: &CertificateId,
        event_ca: Option<&CertificateId>,
        mode: Mode,
        deadline: Instant,
    ) -> Result<Approval, ActivationError> {
        let done = |thing: Option<&DeviceId>, outcome, reason: String| {
            Ok(decision(id, thing, outcome, reason).into())
        };
        let cert = match self.registry.describe_certificate(id, deadline).await {
            Ok(cert) => cert,
            Err(e) if e.is_not_found() => {
                return done(
                    None,
                    Outcome::Skipped,
                    "the certificate is not registered".into(),
                )
            }
            Err(e) => return Err(e.into()),
        };
        match &cert.status {
            CertificateStatus::PendingActivation => {}
            CertificateStatus::Active => {
                return done(
                    None,
                    Outcome::AlreadyActive,
                    "the certificate is already active".into(),
                )
            }
            other => {
                return done(
                    None,
                    Outcome::Skipped,
                    format!("the certificate is {other}, never reactivated"),
                )
            }
        }
        if let (Some(event_ca), Some(registered_ca)) = (event_ca, &cert.ca_certificate_id) {
            if event_ca != registered_ca {
                return done(None, Outcome::Skipped, format!("the event names CA {event_ca}, the certificate is registered under {registered_ca}"));
            }
        }
        let verdict = match cert.ca_certificate_id.as_ref().or(event_ca) {
            None => Verdict::Reject {
                thing: None,
                reason: "the certificate is not registered under any CA".into(),
            },
            Some(ca_id) => self.verify(id, &cert.pem, ca_id, deadline).await?,
        };
        let device = match verdict {
            Verdict::Accept(device) => device,
            Verdict::Reject { thing, reason } => {
                return self.reject(id, thing.as_ref(), reason, deadline).await
            }
        };
        let (membership, owners, listing, thing) = tokio::join!(
            self.fleet.membership(&device, deadline),
            self.owners(device.as_str(), &cert.arn, deadline),
            self.listing(id, deadline),
            self.registry.describe_thing(device.as_str(), deadline)
        );
        // Cut off for good by `jitr revoke`: rejected until `jitr approve --device` lifts it.
        if let Some(at) = thing?.as_ref().and_then(crate::ownership::revoked_mark) {
            let reason = format!(
                "device {device} was cut off by jitr revoke at {at}: `jitr approve --device {device}` lifts it"
            );
            return self.reject(id, Some(&device), reason, deadline).await;
        }
        if membership.is_err() {
            crate::metrics::fleet_error();
        }
        let member = match membership? {
            Membership::Member(member) => member,
            Membership::NotMember => {
                let reason = format!("device {device} is not in {}", self.fleet.label());
                return self.reject(id, Some(&device), reason, deadline).await;
            }
            Membership::Inactive => {
                // Paused, which can be undone: held, never revoked; the sweep decides again.
                let reason = format!(
                    "device {device} is inactive in {}: held until it is active again",
                    self.fleet.label()
                );
                self.mark_ledger(id, LedgerMark::Held(reason.clone()), deadline)
                    .await;
                return done(Some(&device), Outcome::Held, reason);
            }
        };
        let owners = owners?;
        if let Some(reason) = unlisted(id, &device, listing?) {
            // Nothing to mark: the ledger has no item for it.
            return done(Some(&device), Outcome::Held, reason);
        }
        if mode == Mode::Automatic && !owners.contenders.is_empty() {
            let reason = owners.held_reason(device.as_str());
            self.mark_ledger(id, LedgerMark::Held(reason.clone()), deadline)
                .await;
            return done(Some(&device), Outcome::Held, reason);
        }
        let accepted = Accepted {
            id,
            cert: &cert,
            device: &device,
            member: &member,
            owners,
        };
        self.activate_member(accepted, mode, deadline).await
    }

    /// Provisions and activates a certificate the checks accepted, then tidies up.
    async fn activate_member(
        &self,
        accepted: Accepted<'_>,
        mode: Mode,
        deadline: Instant,
    ) -> Result<Approval, ActivationError> {
        let Accepted {
            id,
            cert,
            device,
            member,
            owners,
        } = accepted;
        self.provision(device, &cert.arn, deadline).await?;
        let (attached, status, principals) = tokio::join!(
            self.registry
                .attach_thing_principal(device.as_str(), &cert.arn, deadline),
            self.registry.describe_certificate(id, deadline),
            self.attached(device.as_str(), deadline)
        );
        attached?;
        let status = status?.status;
        if status != CertificateStatus::PendingActivation {
            // An operator (or another decision) acted meanwhile: their word stands.
            return Ok(decision(
                id,
                Some(device),
                Outcome::Skipped,
                format!("the certificate became {status} while being decided; not activated"),
            )
            .into());
        }
        if mode == Mode::Automatic {
            let known: Vec<&str> = owners.leftovers.iter().map(|(_, a)| a.as_str()).collect();
            if let Some(rival) = principals?
                .into_iter()
                .find(|arn| *arn != cert.arn && !known.contains(&arn.as_str()))
            {
                // Another certificate for this device was attached while this one was being
                // decided: neither goes live on its own.
                let reason = format!(
                    "another certificate ({rival}) was attached to Thing {device} at the same time: approve one with `jitr approve --certificate-id`"
                );
                self.mark_ledger(id, LedgerMark::Held(reason.clone()), deadline)
                    .await;
                return Ok(decision(id, Some(device), Outcome::Held, reason).into());
            }
        }
        // Always last: until here the certificate cannot connect, whatever failed.
        self.registry
            .set_certificate_status(id, CertificateStatus::Active, deadline)
            .await?;
        // The device is active: what follows tidies up, and the ledger is marked alongside.
        let tidy = async {
            self.detach_leftovers(device.as_str(), &owners, deadline)
                .await;
            let retired = match mode {
                Mode::Approve(retire) => {
                    self.retire(device.as_str(), &owners, retire, deadline)
                        .await?
                }
                Mode::Automatic => Vec::new(),
            };
            // The device is active whatever happens here: a failed write-back is only reported.
            if let Err(error) = self.fleet.record_activation(member, id, deadline).await {
                tracing::warn!(
                    certificate_id = %id,
                    device_id = %device,
                    error = %error_chain(error.as_ref()),
                    "fleet write-back failed; the device is activated all the same"
                );
            }
            Ok::<_, ActivationError>(retired)
        };
        let (retired, _) =
            tokio::join!(tidy, self.mark_ledger(id, LedgerMark::Activated, deadline));
        let retired = retired?;
        let reason = format!("device {device} is in {}", self.fleet.label());
        Ok(Approval {
            decision: decision(id, Some(device), Outcome::Activated, reason),
            retired,
        })
    }

    /// CreateThing (then the group) alongside AttachPolicy.
    async fn provision(
        &self,
        device: &DeviceId,
        certificate_arn: &str,
        deadline: Instant,
    ) -> Result<(), RegistryError> {
        let thing = ThingSpec {
            name: device.to_string(),
            thing_type: self.policy.thing_type.clone(),
            attributes: vec![crate::ownership::fleet_attribute(self.fleet.mark())],
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
        tokio::try_join!(create, attach).map(|_| ())
    }

    async fn reject(
        &self,
        id: &CertificateId,
        thing: Option<&DeviceId>,
        reason: String,
        deadline: Instant,
    ) -> Result<Approval, ActivationError> {
        let status = match self.policy.reject_action {
            RejectAction::Revoke => CertificateStatus::Revoked,
            RejectAction::Deactivate => CertificateStatus::Inactive,
        };
        let (set, _) = tokio::join!(
            self.registry.set_certificate_status(id, status, deadline),
            self.mark_ledger(id, LedgerMark::Rejected(reason.clone()), deadline)
        );
        set?;
        Ok(decision(id, thing, Outcome::Rejected, reason).into())
    }

    /// The ledger's item for `id` when the ledger is required (`None` when it is not, so
    /// nothing is read).
    async fn listing(
        &self,
        id: &CertificateId,
        deadline: Instant,
    ) -> Result<Option<Option<LedgerEntry>>, LedgerError> {
        match &self.ledger {
            Some(port) if port.mode == LedgerMode::Require => {
                port.ledger.entry(id, deadline).await.map(Some)
            }
            _ => Ok(None),
        }
    }

    /// Marks a decision in the ledger, if there is one: what marking did, `None` without a
    /// ledger or when the write failed. Never fails the decision: a failed write is logged,
    /// and the sweep marks what it finds ACTIVE.
    pub(crate) async fn mark_ledger(
        &self,
        id: &CertificateId,
        mark: LedgerMark,
        deadline: Instant,
    ) -> Option<Marked> {
        let port = self.ledger.as_ref()?;
        let now = factory_ca::show_time((self.clock)());
        match port.ledger.mark(id, &mark, &now, deadline).await {
            Ok(marked) => {
                if marked == Marked::NotListed {
                    tracing::debug!(
                        certificate_id = %id,
                        status = mark.status(),
                        "the ledger does not list the certificate; nothing marked"
                    );
                }
                Some(marked)
            }
            Err(error) => {
                crate::metrics::ledger_error();
                tracing::warn!(
                    certificate_id = %id,
                    status = mark.status(),
                    error = %error_chain(&error),
                    "ledger write failed; the decision stands, and the sweep marks it later"
                );
                None
            }
        }
    }
}

/// Why a certificate the ledger is required for is held: not listed, or listed for another
/// device. `None` when the ledger lists it for this device, or is not required.
fn unlisted(
    id: &CertificateId,
    device: &DeviceId,
    listing: Option<Option<LedgerEntry>>,
) -> Option<String> {
    match listing? {
        None => Some(format!(
            "{}: the factory never recorded certificate {id} (a CA key used outside the factory?); \
             `jitr approve --certificate-id {id} --add-to-ledger` adds it",
            crate::ledger::NOT_IN_LEDGER
        )),
        Some(entry) if entry.device_id != device.as_str() => Some(format!(
            "{}: the ledger lists certificate {id} for device {}, not {device}",
            crate::ledger::NOT_IN_LEDGER,
            entry.device_id
        )),
        Some(_) => None,
    }
}

/// A decision on `id`.
fn decision(
    id: &CertificateId,
    thing: Option<&DeviceId>,
    outcome: Outcome,
    reason: String,
) -> Decision {
    Decision {
        certificate_id: id.to_string(),
        thing_name: thing.map(|t| t.to_string()),
        outcome,
        reason,
    }
}

#[cfg(test)]
mod tests;
