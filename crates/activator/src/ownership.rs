//! What jitr owns, and one device, one identity.
//!
//! **Ownership.** An AWS account holds other applications' Things and certificates; jitr reads
//! and touches only its own. A certificate is jitr's when it is registered under a trusted CA
//! (JITR_TRUSTED_CA_IDS). A Thing is jitr's when ([`Ownership::owns`]):
//! - it carries the fleet attribute jitr sets ([`fleet_attribute`]; with no fleet known, any
//!   value that function makes), or jitr's revocation mark ([`REVOKED_ATTRIBUTE`]); or
//! - it has the thing type jitr gives its Things (JITR_THING_TYPE), when one is configured; or
//! - its name is a device jitr knows: in the fleet's roster, the manifest, or the CN of a
//!   certificate under a trusted CA.
//!
//! Anything else is foreign: listed as such, never changed. Principals that are not
//! certificates (Cognito identities, say) are never detached, and a Thing holding one is not
//! empty.
//!
//! **One identity.** Who else is attached to the device's Thing, and what happens to them.
//! Another certificate that is ACTIVE (or PENDING_ACTIVATION and attached, a decision under
//! way or cut short) keeps its place: a new one is `held` until an operator approves it.
//! INACTIVE or REVOKED ones are left-overs: detached once the new one is active, so a device
//! re-flashed after a revocation needs no human.

use serde::Serialize;
use tokio::time::Instant;

use crate::{Activator, FleetDirectory};
use iot::{
    CertificateDescription, CertificateId, CertificateStatus, IotRegistry, RegistryError, ThingSpec,
};

/// The Thing attribute naming the fleet a Thing was made for.
pub const FLEET_ATTRIBUTE: &str = "fleet";

/// The Thing attribute `jitr revoke --id` leaves (its value: when, RFC 3339): the device is cut
/// off for good. The activator rejects its certificates and the provisioner refuses it until
/// `jitr approve --device` removes the mark.
pub const REVOKED_ATTRIBUTE: &str = "jitr-revoked";

/// The fleet a Thing was made for, as its [`FLEET_ATTRIBUTE`] records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FleetMark {
    /// A balena fleet, by id.
    Balena(u64),
    /// The allowlist backend.
    Allowlist,
    /// The in-memory fleet of tests.
    Memory,
}

/// The one function that makes the fleet attribute jitr sets on every Thing it creates:
/// `fleet=balena-fleet-<id>` (or `the-allowlist`).
pub fn fleet_attribute(fleet: FleetMark) -> (String, String) {
    let value = match fleet {
        FleetMark::Balena(id) => format!("{BALENA_PREFIX}{id}"),
        FleetMark::Allowlist => ALLOWLIST.to_owned(),
        FleetMark::Memory => MEMORY.to_owned(),
    };
    (FLEET_ATTRIBUTE.to_owned(), value)
}

const BALENA_PREFIX: &str = "balena-fleet-";
const ALLOWLIST: &str = "the-allowlist";
const MEMORY: &str = "the-memory-fleet";

/// Whether `value` is one [`fleet_attribute`] makes, for some fleet.
fn is_fleet_value(value: &str) -> bool {
    value == ALLOWLIST
        || value == MEMORY
        || value
            .strip_prefix(BALENA_PREFIX)
            .is_some_and(|id| !id.is_empty() && id.bytes().all(|b| b.is_ascii_digit()))
}

/// The value of attribute `name` on `thing`.
pub fn attribute<'a>(thing: &'a ThingSpec, name: &str) -> Option<&'a str> {
    thing
        .attributes
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

/// When the device was cut off for good, if its Thing carries the mark.
pub fn revoked_mark(thing: &ThingSpec) -> Option<&str> {
    attribute(thing, REVOKED_ATTRIBUTE)
}

/// The ownership rule of the module docs, for one fleet and configuration.
#[derive(Debug, Clone, Default)]
pub struct Ownership {
    /// The fleet jitr serves here, when known (else any fleet jitr could have marked).
    pub fleet: Option<FleetMark>,
    /// JITR_THING_TYPE, when configured.
    pub thing_type: Option<String>,
}

impl Ownership {
    /// Whether `thing` is jitr's; `known_device` says whether its name is a device jitr knows
    /// (roster, manifest, or a trusted CA's certificate).
    pub fn owns(&self, thing: &ThingSpec, known_device: bool) -> bool {
        let marked = attribute(thing, FLEET_ATTRIBUTE).is_some_and(|v| match self.fleet {
            Some(fleet) => v == fleet_attribute(fleet).1,
            None => is_fleet_value(v),
        });
        let typed = self
            .thing_type
            .as_deref()
            .is_some_and(|t| thing.thing_type.as_deref() == Some(t));
        known_device || marked || typed || revoked_mark(thing).is_some()
    }
}

/// Whether a principal ARN is a certificate's (`arn:aws:iot:…:cert/<id>`); Cognito identities
/// and other principals are not jitr's to detach.
pub fn is_certificate_arn(arn: &str) -> bool {
    arn.starts_with("arn:") && arn.contains(":cert/")
}

/// The certificate id at the end of a certificate ARN (`arn:aws:iot:region:account:cert/<id>`).
pub fn id_from_arn(arn: &str) -> Option<&str> {
    arn.rsplit_once("cert/").map(|(_, id)| id)
}

/// The ACTIVE certificates attached to `thing` (none when there is no such Thing), in the order
/// AWS IoT lists its principals.
pub async fn active_attached<R: IotRegistry>(
    iot: &R,
    thing: &str,
    deadline: Instant,
) -> Result<Vec<CertificateId>, RegistryError> {
    attached_where(iot, thing, deadline, |s| *s == CertificateStatus::Active).await
}

/// The certificates attached to `thing` whose status `keep` accepts (none when there is no
/// such Thing), in the order AWS IoT lists its principals.
pub async fn attached_where<R: IotRegistry>(
    iot: &R,
    thing: &str,
    deadline: Instant,
    keep: impl Fn(&CertificateStatus) -> bool,
) -> Result<Vec<CertificateId>, RegistryError> {
    Ok(attached_certificates(iot, thing, deadline)
        .await?
        .into_iter()
        .filter_map(|(id, described)| described.filter(|d| keep(&d.status)).map(|_| id))
        .collect())
}

/// The certificates attached to `thing` (none when there is no such Thing), each with what
/// AWS IoT says of it (`None` when it was deleted between the listing and the reading), in
/// the order AWS IoT lists its principals. Principals that are not certificates (a Cognito
/// identity) are another application's and left out.
pub async fn attached_certificates<R: IotRegistry>(
    iot: &R,
    thing: &str,
    deadline: Instant,
) -> Result<Vec<(CertificateId, Option<CertificateDescription>)>, RegistryError> {
    let principals = match iot
        .thing_principals(thing, iot::call_deadline(deadline))
        .await
    {
        Ok(p) => p,
        Err(e) if e.is_not_found() => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut attached = Vec::new();
    for arn in principals.iter().filter(|p| is_certificate_arn(p)) {
        let Some(id) = id_from_arn(arn).and_then(|id| CertificateId::parse(id).ok()) else {
            continue;
        };
        let described = match iot
            .describe_certificate(&id, iot::call_deadline(deadline))
            .await
        {
            Ok(described) => Some(described),
            Err(e) if e.is_not_found() => None,
            Err(e) => return Err(e),
        };
        attached.push((id, described));
    }
    Ok(attached)
}

/// What `jitr approve` does to the certificates a held one replaces.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Retire {
    /// REVOKED and detached (default): the old identity can never connect again.
    Revoke,
    /// INACTIVE and detached: an operator may still bring it back.
    Deactivate,
    /// Left ACTIVE and attached: both can connect until someone decides.
    Keep,
}

impl std::str::FromStr for Retire {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "revoke" => Ok(Retire::Revoke),
            "deactivate" => Ok(Retire::Deactivate),
            "keep" => Ok(Retire::Keep),
            other => Err(format!("{other:?}: expected revoke, deactivate or keep")),
        }
    }
}

/// The other certificates attached to a device's Thing, by what they mean for a new one.
#[derive(Debug, Default, Clone)]
pub(crate) struct Owners {
    /// ACTIVE or PENDING_ACTIVATION: the device's identity, or a claim to it.
    pub(crate) contenders: Vec<(CertificateId, String, CertificateStatus)>,
    /// INACTIVE, REVOKED or gone: to detach.
    pub(crate) leftovers: Vec<(CertificateId, String)>,
}

impl Owners {
    /// The reason a new certificate is held, naming who holds the place.
    pub(crate) fn held_reason(&self, thing: &str) -> String {
        let names: Vec<String> = self
            .contenders
            .iter()
            .map(|(id, _, status)| format!("{id} ({status})"))
            .collect();
        format!(
            "Thing {thing} already has certificate {}: approve this one with `jitr approve --certificate-id`",
            names.join(", ")
        )
    }
}

impl<R: IotRegistry, F: FleetDirectory> Activator<R, F> {
    /// The certificates other than `own_arn` attached to `thing` (none when it does not
    /// exist), with their statuses (read alongside each other).
    pub(crate) async fn owners(
        &self,
        thing: &str,
        own_arn: &str,
        deadline: Instant,
    ) -> Result<Owners, RegistryError> {
        let principals = self.attached(thing, deadline).await?;
        let others: Vec<(CertificateId, String)> = principals
            .into_iter()
            .filter(|arn| arn != own_arn)
            .filter_map(|arn| {
                let id = CertificateId::parse(id_from_arn(&arn)?).ok()?;
                Some((id, arn))
            })
            .collect();
        let statuses = futures::future::join_all(
            others
                .iter()
                .map(|(id, _)| self.registry.describe_certificate(id, deadline)),
        )
        .await;
        let mut owners = Owners::default();
        for ((id, arn), described) in others.into_iter().zip(statuses) {
            match described {
                Ok(d) => match d.status {
                    CertificateStatus::Active | CertificateStatus::PendingActivation => {
                        owners.contenders.push((id, arn, d.status))
                    }
                    _ => owners.leftovers.push((id, arn)),
                },
                Err(e) if e.is_not_found() => owners.leftovers.push((id, arn)),
                Err(e) => return Err(e),
            }
        }
        Ok(owners)
    }

    /// The principals attached to `thing`; none when the Thing does not exist.
    pub(crate) async fn attached(
        &self,
        thing: &str,
        deadline: Instant,
    ) -> Result<Vec<String>, RegistryError> {
        match self.registry.thing_principals(thing, deadline).await {
            Ok(principals) => Ok(principals),
            Err(e) if e.is_not_found() => Ok(Vec::new()),
            Err(e) => Err(e),
        }
    }

    /// Detaches the left-overs from `thing`, after the new certificate is active. A failure
    /// is logged and left to the next decision: the device is active either way.
    pub(crate) async fn detach_leftovers(&self, thing: &str, owners: &Owners, deadline: Instant) {
        for (id, arn) in &owners.leftovers {
            if let Err(e) = self
                .registry
                .detach_thing_principal(thing, arn, deadline)
                .await
            {
                tracing::warn!(
                    device_id = thing,
                    certificate_id = %id,
                    error = %iot::error_chain(&e),
                    "could not detach an old certificate from the Thing"
                );
            }
        }
    }

    /// Retires the contenders an approved certificate replaces: per `retire`, their status
    /// set and they detached. Errors are returned: the operator must hear of them.
    pub(crate) async fn retire(
        &self,
        thing: &str,
        owners: &Owners,
        retire: Retire,
        deadline: Instant,
    ) -> Result<Vec<String>, RegistryError> {
        let status = match retire {
            Retire::Keep => return Ok(Vec::new()),
            Retire::Revoke => CertificateStatus::Revoked,
            Retire::Deactivate => CertificateStatus::Inactive,
        };
        let mut retired = Vec::new();
        for (id, arn, _) in &owners.contenders {
            self.registry
                .set_certificate_status(id, status.clone(), deadline)
                .await?;
            self.registry
                .detach_thing_principal(thing, arn, deadline)
                .await?;
            retired.push(id.to_string());
        }
        Ok(retired)
    }
}
