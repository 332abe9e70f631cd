//! Revoking a device's certificates (`jitr revoke`): REVOKED first, so whatever fails later
//! the certificate can no longer connect; then every policy and Thing detached, and the
//! Things deleted on request. Idempotent while the device's Thing stands: a second run finds
//! nothing left to do (after its Thing was deleted, there is nothing of it: exit 1).

use serde::Serialize;
use tokio::time::Instant;

use activator::ownership::{id_from_arn, Ownership};
use iot::{call_deadline, CertificateId, CertificateStatus, IotAdmin, IotRegistry, RegistryError};

/// What a revoke may touch: only what jitr owns ([`activator::ownership`]).
#[derive(Debug, Clone, Default)]
pub struct Scope {
    /// The ownership rule for Things.
    pub ownership: Ownership,
    /// The CAs whose certificates are jitr's (JITR_TRUSTED_CA_IDS); empty when not known
    /// here, and then a certificate is jitr's when the Things it is attached to are.
    pub trusted_cas: Vec<CertificateId>,
    /// The caller has already established that the targets are jitr's (`status --fix` and
    /// `rotate` act on what they read as owned): no check is repeated.
    pub vouched: bool,
}

impl Scope {
    /// For callers that read the targets as jitr's already.
    pub fn vouched() -> Scope {
        Scope {
            vouched: true,
            ..Scope::default()
        }
    }

    /// The scope an operator's shell gives: the trusted CAs (`JITR_TRUSTED_CA_IDS`) and the
    /// thing type (`JITR_THING_TYPE`) where it has them, read and checked as the Lambda reads
    /// them; without them, ownership rests on the fleet attribute and the manifest.
    pub fn from_env() -> Result<Scope, activator::ConfigError> {
        let (trusted_cas, thing_type) = activator::ownership_hints_from_env()?;
        Ok(Scope {
            ownership: Ownership {
                fleet: None,
                thing_type,
            },
            trusted_cas,
            vouched: false,
        })
    }

    /// Whether a certificate registered under `ca` is another application's: a CA is known to
    /// be foreign only when the trusted list is known and does not hold it.
    fn foreign_ca(&self, ca: Option<&CertificateId>) -> bool {
        !self.vouched
            && !self.trusted_cas.is_empty()
            && ca.is_some_and(|ca| !self.trusted_cas.contains(ca))
    }

    fn trusted_ca(&self, ca: Option<&CertificateId>) -> bool {
        ca.is_some_and(|ca| self.trusted_cas.contains(ca))
    }
}

/// Why a revoke did nothing, or what failed.
#[derive(Debug, thiserror::Error)]
pub enum RevokeError {
    /// The target is another application's: jitr acts only on what it owns.
    #[error("{0}")]
    NotOurs(String),
    /// There is nothing of the device in AWS IoT: no Thing, no certificate, none named.
    #[error("{0}")]
    Nothing(String),
    /// An AWS IoT call failed.
    #[error(transparent)]
    Registry(#[from] RegistryError),
}

impl RevokeError {
    /// As a registry error of `operation`, for callers whose errors are those.
    pub fn into_registry(self, operation: &'static str) -> RegistryError {
        match self {
            RevokeError::Registry(e) => e,
            other => RegistryError::failed(operation, other.to_string()),
        }
    }
}

/// What to revoke.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// Every certificate attached to this Thing (the device id).
    Device(String),
    /// One certificate.
    Certificate(CertificateId),
}

/// What was done to one certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Revoked {
    /// The certificate.
    pub certificate_id: String,
    /// Policies detached from it.
    pub policies_detached: Vec<String>,
    /// Things it was detached from.
    pub things_detached: Vec<String>,
}

/// What a revoke did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct RevokeReport {
    /// Each certificate revoked.
    pub revoked: Vec<Revoked>,
    /// Certificates named (by the manifest) that AWS IoT never registered: nothing to revoke.
    pub not_registered: Vec<String>,
    /// Things deleted.
    pub things_deleted: Vec<String>,
    /// Things kept although their deletion was asked: another application's principal (not a
    /// certificate) is attached, and jitr never detaches those.
    pub things_kept: Vec<String>,
    /// Certificates attached to the device's Thing that are another application's (registered
    /// under a CA jitr does not trust): left as they are.
    pub foreign_kept: Vec<String>,
    /// The device's Thing now carrying the revocation mark (`--id` without deletion): the
    /// activator and the provisioner refuse the device until `jitr approve --device` lifts it.
    pub marked: Option<String>,
}

/// Revokes `target` and the certificates `also` names (from the manifest: a device's
/// certificates that never got a Thing, registered or still pending); with `delete_things`,
/// deletes the Things involved (not one holding another application's principal). A device
/// target keeps its Thing, made if need be, with the revocation mark
/// ([`activator::ownership::REVOKED_ATTRIBUTE`]), unless it is deleted. Only what jitr owns is
/// touched (`scope`): a target that is another application's is refused
/// ([`RevokeError::NotOurs`]) before anything changes, another CA's certificate on the
/// device's Thing is left as it is, and a Thing that is not jitr's is never deleted. Only
/// certificates are revoked and detached. Each call is bounded by
/// [`iot::OPERATOR_CALL_TIME`] and the whole by `deadline`; every listing is read to its
/// last page.
pub async fn revoke<A: IotAdmin>(
    iot: &A,
    target: &Target,
    also: &[CertificateId],
    delete_things: bool,
    scope: &Scope,
    deadline: Instant,
) -> Result<RevokeReport, RevokeError> {
    let mut report = RevokeReport::default();
    let mut found = match target {
        Target::Device(thing) => {
            device_targets(iot, thing, also, scope, &mut report, deadline).await?
        }
        Target::Certificate(id) => certificate_targets(iot, id, scope, deadline).await?,
    };
    let d = || call_deadline(deadline);
    for id in also {
        if found
            .arns
            .iter()
            .any(|arn| id_from_arn(arn) == Some(id.as_str()))
        {
            continue;
        }
        match iot.describe_certificate(id, d()).await {
            Ok(described) => found.arns.push(described.arn),
            Err(e) if e.is_not_found() => report.not_registered.push(id.to_string()),
            Err(e) => return Err(e.into()),
        }
    }
    for arn in &found.arns {
        let revoked = revoke_one(iot, arn, deadline).await?;
        for thing in &revoked.things_detached {
            if !found.things.contains(thing) {
                found.things.push(thing.clone());
            }
        }
        report.revoked.push(revoked);
    }
    if delete_things {
        delete_owned(iot, &found, scope, &mut report, deadline).await?;
    }
    if let Target::Device(thing) = target {
        if !report.things_deleted.contains(thing) {
            mark_revoked(iot, thing, d()).await?;
            report.marked = Some(thing.clone());
        }
    }
    Ok(report)
}

/// What a revocation acts on: the certificates, the Things they are attached to, and of
/// those the Things known to be jitr's (the only ones a delete may remove).
struct Found {
    arns: Vec<String>,
    things: Vec<String>,
    deletable: Vec<String>,
}

/// A device's certificates of trusted CAs (another CA's are kept, into the report), and its
/// Thing when jitr owns it.
async fn device_targets<A: IotAdmin>(
    iot: &A,
    thing: &str,
    also: &[CertificateId],
    scope: &Scope,
    report: &mut RevokeReport,
    deadline: Instant,
) -> Result<Found, RevokeError> {
    let mut ours = Vec::new();
    let mut trusted_certificate = false;
    for (id, described) in activator::ownership::attached_certificates(iot, thing, deadline).await?
    {
        // One deleted since the listing has nothing left to revoke.
        let Some(described) = described else { continue };
        let ca = described.ca_certificate_id.as_ref();
        if scope.foreign_ca(ca) {
            report.foreign_kept.push(id.to_string());
        } else {
            trusted_certificate |= scope.trusted_ca(ca);
            ours.push(described.arn);
        }
    }
    match iot.describe_thing(thing, call_deadline(deadline)).await? {
        Some(spec) => {
            let known = scope.vouched || !also.is_empty() || trusted_certificate;
            if !scope.ownership.owns(&spec, known) {
                return Err(RevokeError::NotOurs(format!(
                    "Thing {thing} is not jitr's: it has no fleet attribute or jitr thing type, and no certificate of a trusted CA (JITR_TRUSTED_CA_IDS) is attached; give --manifest if the factory issued it"
                )));
            }
            Ok(Found {
                arns: ours,
                things: vec![thing.to_owned()],
                deletable: vec![thing.to_owned()],
            })
        }
        // A typo, or a device revoked and deleted before: nothing is made for it.
        // The manifest vouches for a device that never connected, which is marked.
        None if ours.is_empty() && also.is_empty() => Err(RevokeError::Nothing(format!(
            "nothing to revoke: AWS IoT has no Thing {thing} and no certificate of it (a device that never connected is cut off with --manifest naming its certificates)"
        ))),
        None => Ok(Found {
            arns: ours,
            things: Vec::new(),
            deletable: Vec::new(),
        }),
    }
}

/// One certificate, when it is jitr's: by its trusted CA, or else by every Thing it is
/// attached to being jitr's.
async fn certificate_targets<A: IotAdmin>(
    iot: &A,
    id: &CertificateId,
    scope: &Scope,
    deadline: Instant,
) -> Result<Found, RevokeError> {
    let d = || call_deadline(deadline);
    let described = iot.describe_certificate(id, d()).await?;
    let ca = described.ca_certificate_id.as_ref();
    if scope.foreign_ca(ca) {
        let ca = ca.map(|c| c.to_string()).unwrap_or_default();
        return Err(RevokeError::NotOurs(format!(
            "certificate {id} is registered under CA {ca}, which is not in JITR_TRUSTED_CA_IDS: not jitr's to revoke"
        )));
    }
    let things = iot.principal_things(&described.arn, d()).await?;
    let ours = scope.vouched || scope.trusted_ca(ca);
    let mut deletable = Vec::new();
    for thing in &things {
        if !ours {
            // Not provably jitr's by its CA: its Things must be.
            if let Some(spec) = iot.describe_thing(thing, d()).await? {
                if !scope.ownership.owns(&spec, false) {
                    return Err(RevokeError::NotOurs(format!(
                        "certificate {id} is attached to Thing {thing}, which is not jitr's (no fleet attribute or jitr thing type): not jitr's to revoke"
                    )));
                }
            }
        }
        deletable.push(thing.clone());
    }
    Ok(Found {
        arns: vec![described.arn],
        things,
        deletable,
    })
}

/// Revokes one certificate first (from then on it cannot connect, whatever else fails), then
/// detaches its policies and Things.
async fn revoke_one<A: IotAdmin>(
    iot: &A,
    arn: &str,
    deadline: Instant,
) -> Result<Revoked, RevokeError> {
    let d = || call_deadline(deadline);
    let id = id_from_arn(arn).unwrap_or_default();
    let certificate = CertificateId::parse(id)
        .map_err(|reason| RegistryError::failed("UpdateCertificate", format!("{arn}: {reason}")))?;
    iot.set_certificate_status(&certificate, CertificateStatus::Revoked, d())
        .await?;
    let mut policies_detached = Vec::new();
    for policy in iot.attached_policies(arn, d()).await? {
        iot.detach_policy(&policy, arn, d()).await?;
        policies_detached.push(policy);
    }
    let mut things_detached = Vec::new();
    for thing in iot.principal_things(arn, d()).await? {
        iot.detach_thing_principal(&thing, arn, d()).await?;
        things_detached.push(thing);
    }
    Ok(Revoked {
        certificate_id: id.to_owned(),
        policies_detached,
        things_detached,
    })
}

/// Deletes the Things found that are jitr's and hold nothing else; keeps the others.
async fn delete_owned<A: IotAdmin>(
    iot: &A,
    found: &Found,
    scope: &Scope,
    report: &mut RevokeReport,
    deadline: Instant,
) -> Result<(), RevokeError> {
    let d = || call_deadline(deadline);
    for thing in &found.things {
        // jitr's certificates are detached by now: whatever is still attached (a Cognito
        // identity, another CA's certificate) is another application's.
        let others = match iot.thing_principals(thing, d()).await {
            Ok(p) => !p.is_empty(),
            Err(e) if e.is_not_found() => continue,
            Err(e) => return Err(e.into()),
        };
        let ours = found.deletable.contains(thing)
            || iot
                .describe_thing(thing, d())
                .await?
                .is_some_and(|spec| scope.ownership.owns(&spec, false));
        if others || !ours {
            report.things_kept.push(thing.clone());
        } else if iot.delete_thing(thing, d()).await? {
            report.things_deleted.push(thing.clone());
        }
    }
    Ok(())
}

/// Leaves the revocation mark on `thing` (made if it does not exist): the time, RFC 3339.
async fn mark_revoked<R: IotRegistry>(
    iot: &R,
    thing: &str,
    deadline: Instant,
) -> Result<(), RegistryError> {
    let now = time::OffsetDateTime::now_utc()
        .replace_nanosecond(0)
        .unwrap_or_else(|_| time::OffsetDateTime::now_utc())
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default();
    let mark = (activator::ownership::REVOKED_ATTRIBUTE.to_owned(), now);
    if iot.describe_thing(thing, deadline).await?.is_none() {
        let spec = iot::ThingSpec {
            name: thing.to_owned(),
            thing_type: None,
            attributes: vec![mark.clone()],
        };
        iot.create_thing(&spec, deadline).await?;
    }
    iot.update_thing_attributes(thing, &[(mark.0, Some(mark.1))], deadline)
        .await
}

/// Lifts the revocation mark from `thing`: `true` when there was one.
pub async fn lift_mark<R: IotRegistry>(
    iot: &R,
    thing: &str,
    deadline: Instant,
) -> Result<bool, RegistryError> {
    let marked = iot
        .describe_thing(thing, deadline)
        .await?
        .is_some_and(|t| activator::ownership::revoked_mark(&t).is_some());
    if marked {
        iot.update_thing_attributes(
            thing,
            &[(activator::ownership::REVOKED_ATTRIBUTE.to_owned(), None)],
            deadline,
        )
        .await?;
    }
    Ok(marked)
}
