//! Registering certificates issued ahead of time (`jitr register`): each one registered under
//! its CA and, when it is to be ACTIVE, given its Thing, policy and attachment, ACTIVE last,
//! every operation paced at AWS IoT's default rate for it ([`RegisterRates`]).
//!
//! Why INACTIVE first and ACTIVE last, rather than RegisterCertificate with ACTIVE at once: a
//! certificate registered ACTIVE could connect before its Thing and policy exist, and a failure
//! or Ctrl-C between the calls would leave it live and half-provisioned. Registered INACTIVE, it
//! cannot connect until the last call, the activator's own rule; and INACTIVE is a status the
//! activator's sweep leaves alone (PENDING_ACTIVATION would hand the certificate to it).

use std::collections::HashMap;

use tokio::time::Instant;

use activator::ownership::id_from_arn;
use iot::{call_deadline, CertificateId, CertificateStatus, IotRegistry, RegistryError, ThingSpec};
use pace::Pace;

// AWS IoT Core's default control-plane quotas, requests a second per account and region
// ("AWS IoT Core API throttling limits", AWS General Reference, "AWS IoT Core endpoints and
// quotas", https://docs.aws.amazon.com/general/latest/gr/iot-core.html; the Thing operations are
// also in Service Quotas as "<Operation> API TPS", service code `iotcore`). The table could not
// be read from here: the figures are the ones `testkit::proxy::Quotas::aws_defaults` carries,
// plus RegisterCertificate at 10, and `RegisterRates` lets an account with raised quotas go faster.
const REGISTER_CERTIFICATE_TPS: f64 = 10.0;
const UPDATE_CERTIFICATE_TPS: f64 = 10.0;
const DESCRIBE_CERTIFICATE_TPS: f64 = 10.0;
const DESCRIBE_CA_CERTIFICATE_TPS: f64 = 10.0;
const LIST_CERTIFICATES_BY_CA_TPS: f64 = 10.0;
const LIST_THING_PRINCIPALS_TPS: f64 = 10.0;
const ATTACH_POLICY_TPS: f64 = 15.0;
const CREATE_THING_TPS: f64 = 100.0;
const ADD_THING_TO_THING_GROUP_TPS: f64 = 100.0;
const ATTACH_THING_PRINCIPAL_TPS: f64 = 100.0;

/// Where a certificate goes: its device's Thing, the Thing's group and the device policy
/// (`jitr register`, and `jitr rotate` through [`crate::rotate::install`]).
#[derive(Debug, Clone)]
pub struct Placement<'a> {
    /// The device's Thing.
    pub thing: ThingSpec,
    /// Its Thing group, if the fleet uses one.
    pub group: Option<&'a str>,
    /// The device policy.
    pub policy: &'a str,
}

/// Requests a second for each operation a registration makes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RegisterRates {
    /// RegisterCertificate.
    pub register_certificate: f64,
    /// UpdateCertificate (the activation).
    pub update_certificate: f64,
    /// DescribeCertificate (a certificate attached to the device's Thing that the listing of
    /// the CA did not show).
    pub describe_certificate: f64,
    /// DescribeCACertificate (once).
    pub describe_ca_certificate: f64,
    /// ListCertificatesByCA pages.
    pub list_certificates_by_ca: f64,
    /// ListThingPrincipals (does the device have a live certificate already?).
    pub list_thing_principals: f64,
    /// AttachPolicy.
    pub attach_policy: f64,
    /// CreateThing.
    pub create_thing: f64,
    /// AddThingToThingGroup.
    pub add_thing_to_group: f64,
    /// AttachThingPrincipal.
    pub attach_thing_principal: f64,
}

impl Default for RegisterRates {
    /// AWS IoT Core's defaults.
    fn default() -> Self {
        RegisterRates {
            register_certificate: REGISTER_CERTIFICATE_TPS,
            update_certificate: UPDATE_CERTIFICATE_TPS,
            describe_certificate: DESCRIBE_CERTIFICATE_TPS,
            describe_ca_certificate: DESCRIBE_CA_CERTIFICATE_TPS,
            list_certificates_by_ca: LIST_CERTIFICATES_BY_CA_TPS,
            list_thing_principals: LIST_THING_PRINCIPALS_TPS,
            attach_policy: ATTACH_POLICY_TPS,
            create_thing: CREATE_THING_TPS,
            add_thing_to_group: ADD_THING_TO_THING_GROUP_TPS,
            attach_thing_principal: ATTACH_THING_PRINCIPAL_TPS,
        }
    }
}

impl RegisterRates {
    /// The operation every new device calls once that allows the fewest calls a second, and
    /// that rate: the most devices a second these rates let through.
    pub fn bound(&self, wanted: Wanted, with_group: bool) -> (&'static str, f64) {
        let mut ops = vec![("RegisterCertificate", self.register_certificate)];
        if wanted == Wanted::Active {
            ops.extend([
                ("ListThingPrincipals", self.list_thing_principals),
                ("CreateThing", self.create_thing),
                ("AttachPolicy", self.attach_policy),
                ("AttachThingPrincipal", self.attach_thing_principal),
                ("UpdateCertificate", self.update_certificate),
            ]);
            if with_group {
                ops.push(("AddThingToThingGroup", self.add_thing_to_group));
            }
        }
        ops.into_iter()
            .fold(
                None,
                |slowest: Option<(&'static str, f64)>, (op, rate)| match slowest {
                    Some((_, lowest)) if lowest <= rate => slowest,
                    _ => Some((op, rate)),
                },
            )
            .unwrap_or(("RegisterCertificate", self.register_certificate))
    }
}

/// One token bucket per operation, shared by every device registered at once.
#[derive(Debug)]
pub struct Paces {
    register_certificate: Pace,
    update_certificate: Pace,
    describe_certificate: Pace,
    describe_ca_certificate: Pace,
    list_certificates_by_ca: Pace,
    list_thing_principals: Pace,
    attach_policy: Pace,
    create_thing: Pace,
    add_thing_to_group: Pace,
    attach_thing_principal: Pace,
}

impl Paces {
    /// Buckets at `rates`.
    pub fn new(rates: &RegisterRates) -> Paces {
        Paces {
            register_certificate: Pace::new(rates.register_certificate),
            update_certificate: Pace::new(rates.update_certificate),
            describe_certificate: Pace::new(rates.describe_certificate),
            describe_ca_certificate: Pace::new(rates.describe_ca_certificate),
            list_certificates_by_ca: Pace::new(rates.list_certificates_by_ca),
            list_thing_principals: Pace::new(rates.list_thing_principals),
            attach_policy: Pace::new(rates.attach_policy),
            create_thing: Pace::new(rates.create_thing),
            add_thing_to_group: Pace::new(rates.add_thing_to_group),
            attach_thing_principal: Pace::new(rates.attach_thing_principal),
        }
    }

    /// Buckets that never wait: one device at a time, as `jitr rotate` installs.
    pub fn unlimited() -> Paces {
        Paces {
            register_certificate: Pace::unlimited(),
            update_certificate: Pace::unlimited(),
            describe_certificate: Pace::unlimited(),
            describe_ca_certificate: Pace::unlimited(),
            list_certificates_by_ca: Pace::unlimited(),
            list_thing_principals: Pace::unlimited(),
            attach_policy: Pace::unlimited(),
            create_thing: Pace::unlimited(),
            add_thing_to_group: Pace::unlimited(),
            attach_thing_principal: Pace::unlimited(),
        }
    }
}

/// The status a registration is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wanted {
    /// Registered, provisioned and ACTIVE: the device connects at once, no activator involved.
    Active,
    /// Registered PENDING_ACTIVATION only: the activator decides on the first connect (or its
    /// sweep), with its fleet check; no Thing is made here.
    PendingActivation,
}

impl Wanted {
    /// The status AWS IoT shows once done.
    pub fn status(self) -> CertificateStatus {
        match self {
            Wanted::Active => CertificateStatus::Active,
            Wanted::PendingActivation => CertificateStatus::PendingActivation,
        }
    }
}

/// What to do with one certificate, given what AWS IoT has.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// Not registered: register it.
    Register,
    /// Registered INACTIVE by an earlier run that stopped before activating it: finish.
    Resume,
    /// Registered already with the status wanted: nothing to do.
    Skip,
    /// Registered with another status (an operator's or the activator's doing): left as it is.
    Leave(CertificateStatus),
}

/// The plan for a certificate `existing` in AWS IoT (`None`: not registered); `unfinished` says
/// an earlier run of ours registered it INACTIVE and did not record the activation. Only that
/// INACTIVE is ours to change: any other may be a deactivation we must not undo.
pub fn plan(wanted: Wanted, existing: Option<&CertificateStatus>, unfinished: bool) -> Plan {
    match existing {
        None => Plan::Register,
        Some(status) if *status == wanted.status() => Plan::Skip,
        Some(CertificateStatus::Inactive) if wanted == Wanted::Active && unfinished => Plan::Resume,
        Some(status) => Plan::Leave(status.clone()),
    }
}

/// Every certificate registered under the CA `ca` with its status, every page.
pub async fn registered_under<R: IotRegistry>(
    iot: &R,
    ca: &CertificateId,
    paces: &Paces,
    progress: &(dyn Fn(usize) + Send + Sync),
    deadline: Instant,
) -> Result<HashMap<CertificateId, CertificateStatus>, RegistryError> {
    let mut known = HashMap::new();
    let mut marker = None;
    loop {
        paces.list_certificates_by_ca.take().await;
        let page = iot
            .list_certificates_by_ca(ca, marker, false, call_deadline(deadline))
            .await?;
        known.extend(page.certificates.into_iter().map(|c| (c.id, c.status)));
        progress(known.len());
        match page.next_marker {
            Some(next) if !next.is_empty() => marker = Some(next),
            _ => return Ok(known),
        }
    }
}

/// The ARN of the certificate `id` is this prefix followed by the id
/// (`arn:<partition>:iot:<region>:<account>:cert/`): read once from the CA's own ARN, so a
/// registration needs no DescribeCertificate for it. `None` when AWS IoT gave no ARN.
pub async fn certificate_arn_prefix<R: IotRegistry>(
    iot: &R,
    ca: &CertificateId,
    paces: &Paces,
    deadline: Instant,
) -> Result<Option<String>, RegistryError> {
    paces.describe_ca_certificate.take().await;
    let ca = iot
        .describe_ca_certificate(ca, call_deadline(deadline))
        .await?;
    Ok(ca.arn.as_deref().and_then(|arn| {
        let (head, _) = arn.rsplit_once(":cacert/")?;
        Some(format!("{head}:cert/"))
    }))
}

/// Another certificate attached to the device's Thing that is ACTIVE or PENDING_ACTIVATION:
/// the device's identity already, which a bulk registration does not replace (`jitr rotate`
/// does). `known` (the CA's listing) spares a DescribeCertificate for certificates it holds.
pub async fn live_identity<R: IotRegistry>(
    iot: &R,
    thing: &str,
    own: &CertificateId,
    known: &HashMap<CertificateId, CertificateStatus>,
    paces: &Paces,
    deadline: Instant,
) -> Result<Option<(CertificateId, CertificateStatus)>, RegistryError> {
    paces.list_thing_principals.take().await;
    let principals = match iot.thing_principals(thing, call_deadline(deadline)).await {
        Ok(p) => p,
        Err(e) if e.is_not_found() => return Ok(None),
        Err(e) => return Err(e),
    };
    for arn in principals {
        let Some(id) = id_from_arn(&arn).and_then(|id| CertificateId::parse(id).ok()) else {
            continue;
        };
        if id == *own {
            continue;
        }
        let status = match known.get(&id) {
            Some(status) => status.clone(),
            None => {
                paces.describe_certificate.take().await;
                iot.describe_certificate(&id, call_deadline(deadline))
                    .await?
                    .status
            }
        };
        if matches!(
            status,
            CertificateStatus::Active | CertificateStatus::PendingActivation
        ) {
            return Ok(Some((id, status)));
        }
    }
    Ok(None)
}

/// Registers `pem` under the CA `ca_pem` INACTIVE, makes the Thing (and its group), attaches
/// the policy and the Thing, and activates it last. Idempotent: run again, each step finds
/// itself done. `arn_prefix` (see [`certificate_arn_prefix`]) spares a DescribeCertificate.
/// The certificate's id.
pub async fn install<R: iot::IotAdmin>(
    iot: &R,
    pem: &str,
    ca_pem: &str,
    placement: &Placement<'_>,
    arn_prefix: Option<&str>,
    paces: &Paces,
    deadline: Instant,
) -> Result<CertificateId, RegistryError> {
    let d = || call_deadline(deadline);
    paces.register_certificate.take().await;
    let id = iot
        .register_certificate(pem, ca_pem, CertificateStatus::Inactive, d())
        .await?;
    let arn = match arn_prefix {
        Some(prefix) => format!("{prefix}{id}"),
        None => {
            paces.describe_certificate.take().await;
            iot.describe_certificate(&id, d()).await?.arn
        }
    };
    paces.create_thing.take().await;
    iot.create_thing(&placement.thing, d()).await?;
    if let Some(group) = placement.group {
        paces.add_thing_to_group.take().await;
        iot.add_thing_to_group(&placement.thing.name, group, d())
            .await?;
    }
    paces.attach_policy.take().await;
    iot.attach_policy(placement.policy, &arn, d()).await?;
    paces.attach_thing_principal.take().await;
    iot.attach_thing_principal(&placement.thing.name, &arn, d())
        .await?;
    paces.update_certificate.take().await;
    iot.set_certificate_status(&id, CertificateStatus::Active, d())
        .await?;
    Ok(id)
}

/// Registers `pem` under the CA `ca_pem` PENDING_ACTIVATION, and nothing else: the activator
/// decides. One that is registered already is left as it is.
pub async fn register_pending<R: iot::IotAdmin>(
    iot: &R,
    pem: &str,
    ca_pem: &str,
    paces: &Paces,
    deadline: Instant,
) -> Result<CertificateId, RegistryError> {
    paces.register_certificate.take().await;
    iot.register_certificate(
        pem,
        ca_pem,
        CertificateStatus::PendingActivation,
        call_deadline(deadline),
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_an_unfinished_inactive_certificate_of_ours_is_resumed() {
        use CertificateStatus::*;
        let active = Wanted::Active;
        assert_eq!(plan(active, None, false), Plan::Register);
        assert_eq!(plan(active, None, true), Plan::Register);
        assert_eq!(plan(active, Some(&Active), false), Plan::Skip);
        assert_eq!(plan(active, Some(&Inactive), true), Plan::Resume);
        // An INACTIVE certificate we did not leave so: an operator's or a rejection's.
        assert_eq!(plan(active, Some(&Inactive), false), Plan::Leave(Inactive));
        assert_eq!(plan(active, Some(&Revoked), true), Plan::Leave(Revoked));
        assert_eq!(
            plan(active, Some(&PendingActivation), false),
            Plan::Leave(PendingActivation)
        );
    }

    #[test]
    fn pending_registration_never_activates_or_changes_a_registered_certificate() {
        use CertificateStatus::*;
        let pending = Wanted::PendingActivation;
        assert_eq!(plan(pending, None, false), Plan::Register);
        assert_eq!(plan(pending, Some(&PendingActivation), false), Plan::Skip);
        assert_eq!(plan(pending, Some(&Active), false), Plan::Leave(Active));
        assert_eq!(plan(pending, Some(&Inactive), true), Plan::Leave(Inactive));
    }

    #[test]
    fn the_bound_is_the_slowest_operation_a_device_needs() {
        let rates = RegisterRates::default();
        assert_eq!(
            rates.bound(Wanted::PendingActivation, false),
            ("RegisterCertificate", 10.0)
        );
        let raised = RegisterRates {
            register_certificate: 50.0,
            update_certificate: 40.0,
            list_thing_principals: 60.0,
            ..rates
        };
        assert_eq!(raised.bound(Wanted::Active, false), ("AttachPolicy", 15.0));
        assert_eq!(
            raised.bound(Wanted::PendingActivation, true),
            ("RegisterCertificate", 50.0)
        );
    }

    #[tokio::test]
    async fn install_activates_last() {
        use iot::memory::MemoryIot;
        let iot = MemoryIot::new();
        let placement = Placement {
            thing: iot::ThingSpec {
                name: "dev-1".into(),
                thing_type: None,
                attributes: Vec::new(),
            },
            group: None,
            policy: "device",
        };
        let test_ca = testkit::certs::TestCa::new("bulk test CA").unwrap();
        let (ca, pem) = (
            test_ca.cert_pem.clone(),
            test_ca.device_pem("dev-1").unwrap(),
        );
        iot.add_ca(&ca);
        let deadline = Instant::now() + std::time::Duration::from_secs(10);
        let paces = Paces::new(&RegisterRates::default());
        let id = install(&iot, &pem, &ca, &placement, None, &paces, deadline)
            .await
            .unwrap();
        let calls = iot.calls();
        assert_eq!(calls.last(), Some(&"UpdateCertificate"));
        assert_eq!(
            iot.describe_certificate(&id, deadline)
                .await
                .unwrap()
                .status,
            CertificateStatus::Active
        );
        // Another certificate of the device is found as its live identity; its own is not.
        let known = HashMap::new();
        assert_eq!(
            live_identity(&iot, "dev-1", &id, &known, &paces, deadline)
                .await
                .unwrap(),
            None
        );
        let other = CertificateId::parse(&"0".repeat(64)).unwrap();
        assert_eq!(
            live_identity(&iot, "dev-1", &other, &known, &paces, deadline)
                .await
                .unwrap(),
            Some((id, CertificateStatus::Active))
        );
    }
}
