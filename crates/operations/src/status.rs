//! Every device's state (`jitr status`), read from AWS IoT and the fleet, and the safe fixes
//! (`jitr status --fix`).
//!
//! What is read, all in bulk and paced within AWS IoT's default rates ([`Rates`]): every
//! certificate under each trusted CA (ListCertificatesByCA), every Thing (ListThings), and the
//! fleet's roster. A certificate's device and validity come from the manifest when one is given,
//! else from DescribeCertificate (its PEM: CN and notAfter), one per certificate at 10 a second.
//! Attachments are read only where they decide a state (ListThingPrincipals for a Thing whose
//! device has no live certificate, or two ACTIVE ones; ListPrincipalThings for an ACTIVE
//! certificate without a Thing), or for every device with `deep`.
//!
//! Each device gets one state, the most urgent that applies ([`State`], in order).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;

use futures::stream::{self, StreamExt};
use serde::Serialize;
use time::OffsetDateTime;
use tokio::time::Instant;

use crate::revoke::{revoke, Target};
use activator::ownership::id_from_arn;
use activator::pace::Pace;
use activator::{call_deadline, CertificateId, CertificateStatus, IotAdmin, RegistryError};

/// A device's state, the most urgent first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum State {
    /// An ACTIVE certificate, but the device is not in the fleet.
    Drifted,
    /// The device is inactive in the fleet (paused, which can be undone): its certificates
    /// are held as they are and its Thing kept; nothing is revoked or deleted.
    Inactive,
    /// More than one ACTIVE certificate (past a rotation's grace, if any).
    Duplicate,
    /// A certificate waiting for approval beside an ACTIVE one.
    Held,
    /// Its ACTIVE certificate ends within the window.
    Expiring,
    /// A certificate still PENDING_ACTIVATION.
    Pending,
    /// A Thing with no certificate attached, or an ACTIVE certificate with no Thing.
    Orphan,
    /// In the fleet or the manifest, nothing registered in AWS IoT.
    NotConnected,
    /// Every certificate REVOKED or INACTIVE, or the device cut off by `jitr revoke`.
    Revoked,
    /// One ACTIVE certificate, attached, the device an active member.
    Active,
}

impl State {
    /// Every state, in order.
    pub const ALL: [State; 10] = [
        State::Drifted,
        State::Inactive,
        State::Duplicate,
        State::Held,
        State::Expiring,
        State::Pending,
        State::Orphan,
        State::NotConnected,
        State::Revoked,
        State::Active,
    ];

    /// The name printed and in JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Drifted => "drifted",
            State::Inactive => "inactive",
            State::Duplicate => "duplicate",
            State::Held => "held",
            State::Expiring => "expiring",
            State::Pending => "pending",
            State::Orphan => "orphan",
            State::NotConnected => "not-connected",
            State::Revoked => "revoked",
            State::Active => "active",
        }
    }

    /// Whether a fleet in this state needs nobody (the exit code's rule).
    pub fn is_fine(self) -> bool {
        matches!(self, State::Active | State::NotConnected | State::Inactive)
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One certificate of a device, as reported.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CertificateRow {
    /// The certificate id.
    pub certificate_id: String,
    /// Its status.
    pub status: String,
    /// Its notAfter (RFC 3339), when known.
    pub not_after: Option<String>,
    /// When AWS IoT registered it, epoch seconds.
    #[serde(skip)]
    pub created: Option<i64>,
}

/// One device, as reported.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DeviceStatus {
    /// The device id (Thing name, certificate CN).
    pub device_id: String,
    /// Its state.
    pub state: State,
    /// Its certificates, oldest first.
    pub certificates: Vec<CertificateRow>,
    /// Its Thing, when there is one.
    pub thing: Option<String>,
    /// Whether it is an active member of the fleet.
    pub fleet_member: bool,
    /// The certificate that connected last, when the presence table records one.
    pub last_connected: Option<activator::presence::Connection>,
    /// Whether the newest ACTIVE certificate has connected (the proof a duplicate's older
    /// certificates may be retired on).
    #[serde(skip)]
    pub newest_connected: bool,
    /// Why this state, in a few words.
    pub reason: String,
}

/// What the manifest (or the certificate itself) says about a certificate.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Known {
    /// The device it was issued to.
    pub device: String,
    /// Its notBefore.
    pub not_before: Option<OffsetDateTime>,
    /// Its notAfter.
    pub not_after: Option<OffsetDateTime>,
    /// `jitr rotate`: the certificate it replaces.
    pub supersedes: Option<String>,
    /// `jitr rotate`: when the replaced one is retired.
    pub retire_after: Option<OffsetDateTime>,
}

impl Known {
    /// From a manifest line (dates that do not parse are unknown).
    pub fn from_manifest(entry: &factory_ca::ManifestEntry) -> Known {
        let date =
            |s: &str| OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).ok();
        Known {
            device: entry.id.clone(),
            not_before: date(&entry.not_before),
            not_after: date(&entry.not_after),
            supersedes: entry.supersedes.clone(),
            retire_after: entry.retire_after.as_deref().and_then(date),
        }
    }
}

/// A device of the fleet's roster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Standing {
    /// An active member.
    Active,
    /// A member, deactivated.
    Inactive,
}

/// One certificate as listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    /// Its id.
    pub id: CertificateId,
    /// Its status.
    pub status: CertificateStatus,
    /// When registered, epoch seconds.
    pub created: Option<i64>,
}

/// Everything read, ready to classify.
#[derive(Debug, Clone, Default)]
pub struct Observed {
    /// Every certificate under the trusted CAs.
    pub certificates: Vec<Listed>,
    /// What is known about them, by certificate id.
    pub known: HashMap<String, Known>,
    /// Every Thing jitr owns ([`activator::Ownership`]).
    pub things: BTreeSet<String>,
    /// How many Things were listed that jitr does not own: left alone.
    pub foreign_things: usize,
    /// Owned Things carrying the revocation mark, and when they were cut off.
    pub revoked_marks: HashMap<String, String>,
    /// The certificate ids attached to a Thing, for the Things whose attachments were read.
    pub principals: HashMap<String, Vec<String>>,
    /// For those Things: how many attached principals are not certificates (never detached;
    /// a Thing holding one is not empty).
    pub other_principals: HashMap<String, usize>,
    /// Every device's connections (the presence table), when one was read.
    pub presence: Option<HashMap<String, Vec<activator::presence::Connection>>>,
    /// For ACTIVE certificates without a Thing of their device's name whose attachments were
    /// read: the Things they are attached to.
    pub certificate_things: HashMap<String, Vec<String>>,
    /// The fleet's roster: every device of the fleet and its standing (`None`: not read, and
    /// then no device is judged drifted).
    pub roster: Option<HashMap<String, Standing>>,
    /// Devices the manifest names.
    pub manifest_devices: BTreeSet<String>,
    /// Certificates whose device could not be learned (their CN is no device id).
    pub unattributed: Vec<String>,
}

/// Requests per second for each bulk read (AWS IoT's defaults).
#[derive(Debug, Clone, Copy)]
pub struct Rates {
    /// ListCertificatesByCA, ListThings pages; DescribeCertificate, ListThingPrincipals,
    /// ListPrincipalThings calls: 10 a second each by default.
    pub per_operation: f64,
    /// Calls in flight at once.
    pub concurrency: usize,
}

impl Default for Rates {
    fn default() -> Self {
        Rates {
            per_operation: 10.0,
            concurrency: 8,
        }
    }
}

/// How the reading went, for the progress line.
pub trait Progress: Send + Sync {
    /// `what` has reached `done` (of `total`, when known).
    fn step(&self, what: &str, done: usize, total: Option<usize>);
}

impl<F: Fn(&str, usize, Option<usize>) + Send + Sync> Progress for F {
    fn step(&self, what: &str, done: usize, total: Option<usize>) {
        self(what, done, total)
    }
}

fn live(status: &CertificateStatus) -> bool {
    matches!(
        status,
        CertificateStatus::Active | CertificateStatus::PendingActivation
    )
}

/// What [`observe`] reads, and what it already knows.
#[derive(Debug, Clone, Default)]
pub struct Scope {
    /// The trusted CAs whose certificates are read.
    pub cas: Vec<CertificateId>,
    /// What the manifest says, by certificate id (spares a DescribeCertificate each).
    pub known: HashMap<String, Known>,
    /// The fleet's roster (`None`: not read, and then no device is judged drifted).
    pub roster: Option<HashMap<String, Standing>>,
    /// Devices the manifest names.
    pub manifest_devices: BTreeSet<String>,
    /// Which Things are jitr's.
    pub ownership: activator::Ownership,
    /// Read every owned Thing's attachments, not only where they decide a state.
    pub deep: bool,
    /// How fast each kind of read goes.
    pub rates: Rates,
}

/// Reads AWS IoT for the certificates under the scope's CAs, the Things jitr owns and the
/// attachments that matter. Foreign Things are counted, never read further. Every call is
/// bounded by `deadline`.
pub async fn observe<A: IotAdmin>(
    iot: &A,
    scope: Scope,
    progress: &dyn Progress,
    deadline: Instant,
) -> Result<Observed, RegistryError> {
    let Scope {
        cas,
        mut known,
        roster,
        manifest_devices,
        ownership,
        deep,
        rates,
    } = scope;
    let d = || call_deadline(deadline);
    let (list_pace, describe_pace, principals_pace, things_pace) = (
        Pace::new(rates.per_operation),
        Pace::new(rates.per_operation),
        Pace::new(rates.per_operation),
        Pace::new(rates.per_operation),
    );
    // 1. Every certificate under each trusted CA, oldest first.
    let mut certificates = Vec::new();
    for ca in &cas {
        let mut marker = None;
        loop {
            list_pace.take().await;
            let page = iot.list_certificates_by_ca(ca, marker, false, d()).await?;
            certificates.extend(page.certificates.into_iter().map(|c| Listed {
                id: c.id,
                status: c.status,
                created: c.created,
            }));
            progress.step("certificates listed", certificates.len(), None);
            match page.next_marker {
                Some(next) => marker = Some(next),
                None => break,
            }
        }
    }
    // 2. The device and validity of every certificate the manifest does not name.
    let unknown: Vec<&CertificateId> = certificates
        .iter()
        .map(|c| &c.id)
        .filter(|id| !known.contains_key(id.as_str()))
        .collect();
    let total = unknown.len();
    let described: Vec<Result<(String, Option<Known>), RegistryError>> = stream::iter(unknown)
        .map(|id| async {
            describe_pace.take().await;
            let description = iot.describe_certificate(id, d()).await?;
            Ok((id.to_string(), known_from_pem(&description.pem)))
        })
        .buffer_unordered(rates.concurrency.max(1))
        .collect()
        .await;
    let mut unattributed = Vec::new();
    for (n, result) in described.into_iter().enumerate() {
        let (id, found) = result?;
        match found {
            Some(k) => {
                known.insert(id, k);
            }
            None => unattributed.push(id),
        }
        progress.step("certificates described", n + 1, Some(total));
    }
    // 3. Every Thing, of which only jitr's are kept.
    things_pace.take().await;
    let listed = iot.list_things(d()).await?;
    progress.step("things listed", listed.len(), None);
    let mut by_device: BTreeMap<&str, Vec<&Listed>> = BTreeMap::new();
    for c in &certificates {
        if let Some(k) = known.get(c.id.as_str()) {
            by_device.entry(k.device.as_str()).or_default().push(c);
        }
    }
    let known_device = |name: &str| {
        by_device.contains_key(name)
            || manifest_devices.contains(name)
            || roster.as_ref().is_some_and(|r| r.contains_key(name))
    };
    let mut things = BTreeSet::new();
    let mut revoked_marks = HashMap::new();
    let mut foreign_things = 0;
    for thing in &listed {
        if !ownership.owns(thing, known_device(&thing.name)) {
            foreign_things += 1;
            continue;
        }
        if let Some(at) = activator::ownership::revoked_mark(thing) {
            revoked_marks.insert(thing.name.clone(), at.to_owned());
        }
        things.insert(thing.name.clone());
    }

    // 4. The attachments that decide a state.
    let active = |device: &str| {
        by_device.get(device).map_or(0, |cs| {
            cs.iter()
                .filter(|c| c.status == CertificateStatus::Active)
                .count()
        })
    };
    let has_live = |device: &str| {
        by_device
            .get(device)
            .is_some_and(|cs| cs.iter().any(|c| live(&c.status)))
    };
    let things_to_read: Vec<&String> = things
        .iter()
        .filter(|t| deep || !has_live(t) || active(t) >= 2)
        .collect();
    let certificates_to_read: Vec<&Listed> = certificates
        .iter()
        .filter(|c| c.status == CertificateStatus::Active)
        .filter(|c| {
            known
                .get(c.id.as_str())
                .is_some_and(|k| !things.contains(&k.device))
        })
        .collect();
    let total = things_to_read.len() + certificates_to_read.len();
    // Per Thing: its certificate ids, and how many other principals it holds.
    type Attached = (String, Vec<String>, usize);
    let principals: Vec<Result<Attached, RegistryError>> = stream::iter(things_to_read)
        .map(|thing| async {
            principals_pace.take().await;
            let arns = iot.thing_principals(thing, d()).await?;
            let (certs, others): (Vec<&String>, Vec<&String>) = arns
                .iter()
                .partition(|arn| activator::ownership::is_certificate_arn(arn));
            let ids = certs
                .into_iter()
                .filter_map(|arn| id_from_arn(arn).map(str::to_owned))
                .collect();
            Ok((thing.clone(), ids, others.len()))
        })
        .buffer_unordered(rates.concurrency.max(1))
        .collect()
        .await;
    let mut done = 0;
    let mut thing_principals = HashMap::new();
    let mut other_principals = HashMap::new();
    for result in principals {
        let (thing, ids, others) = result?;
        if others > 0 {
            other_principals.insert(thing.clone(), others);
        }
        thing_principals.insert(thing, ids);
        done += 1;
        progress.step("attachments read", done, Some(total));
    }
    let attached: Vec<Result<(String, Vec<String>), RegistryError>> =
        stream::iter(certificates_to_read)
            .map(|c| async {
                principals_pace.take().await;
                let arn = iot.describe_certificate(&c.id, d()).await?.arn;
                Ok((c.id.to_string(), iot.principal_things(&arn, d()).await?))
            })
            .buffer_unordered(rates.concurrency.max(1))
            .collect()
            .await;
    let mut certificate_things = HashMap::new();
    for result in attached {
        let (id, things) = result?;
        certificate_things.insert(id, things);
        done += 1;
        progress.step("attachments read", done, Some(total));
    }
    Ok(Observed {
        certificates,
        known,
        things,
        foreign_things,
        revoked_marks,
        principals: thing_principals,
        other_principals,
        presence: None,
        certificate_things,
        roster,
        manifest_devices,
        unattributed,
    })
}

/// The device and validity a certificate's PEM carries.
pub fn known_from_pem(pem: &str) -> Option<Known> {
    let der = factory_ca::certificates_from_pem_or_der(pem.as_bytes()).ok()?;
    let inspection = factory_ca::inspect_device_certificate(
        der.first()?,
        &factory_ca::InspectOptions {
            id_format: factory_ca::IdFormat::Any,
            ca_der: None,
            now: OffsetDateTime::now_utc(),
            max_validity_days: None,
        },
    );
    Some(Known {
        device: inspection.device_id?.to_string(),
        not_before: inspection.not_before,
        not_after: inspection.not_after,
        supersedes: None,
        retire_after: None,
    })
}

fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// Every device's one state, the most urgent first (then by device id).
pub fn classify(
    observed: &Observed,
    now: OffsetDateTime,
    expiring_within: time::Duration,
) -> Vec<DeviceStatus> {
    let mut certs: BTreeMap<String, Vec<&Listed>> = BTreeMap::new();
    for c in &observed.certificates {
        if let Some(k) = observed.known.get(c.id.as_str()) {
            certs.entry(k.device.clone()).or_default().push(c);
        }
    }
    let mut devices: BTreeSet<String> = certs.keys().cloned().collect();
    devices.extend(observed.things.iter().cloned());
    if let Some(roster) = &observed.roster {
        devices.extend(roster.keys().cloned());
    }
    devices.extend(observed.manifest_devices.iter().cloned());

    let mut rows: Vec<DeviceStatus> = devices
        .into_iter()
        .map(|device| {
            let mut mine = certs.remove(&device).unwrap_or_default();
            // Oldest first; a certificate that supersedes another is the newer of the two even
            // when both were made in the same second.
            mine.sort_by_key(|c| {
                let known = observed.known.get(c.id.as_str());
                (
                    known.and_then(|k| k.not_before),
                    c.created,
                    known.is_some_and(|k| k.supersedes.is_some()),
                )
            });
            classify_device(observed, &device, &mine, now, expiring_within)
        })
        .collect();
    rows.sort_by(|a, b| (a.state, &a.device_id).cmp(&(b.state, &b.device_id)));
    rows
}

fn classify_device(
    observed: &Observed,
    device: &str,
    certs: &[&Listed],
    now: OffsetDateTime,
    window: time::Duration,
) -> DeviceStatus {
    let known = |c: &Listed| observed.known.get(c.id.as_str());
    let rows: Vec<CertificateRow> = certs
        .iter()
        .map(|c| CertificateRow {
            certificate_id: c.id.to_string(),
            status: c.status.as_str().to_owned(),
            not_after: known(c).and_then(|k| k.not_after).map(rfc3339),
            created: c.created,
        })
        .collect();
    let active: Vec<&Listed> = certs
        .iter()
        .copied()
        .filter(|c| c.status == CertificateStatus::Active)
        .collect();
    let pending: Vec<&Listed> = certs
        .iter()
        .copied()
        .filter(|c| c.status == CertificateStatus::PendingActivation)
        .collect();
    let standing = observed
        .roster
        .as_ref()
        .and_then(|r| r.get(device).copied());
    let member = standing == Some(Standing::Active);
    let judged = observed.roster.is_some();
    let thing = observed.things.contains(device).then(|| device.to_owned());
    let short = |id: &CertificateId| id.as_str()[..12.min(id.as_str().len())].to_owned();

    // A rotation in its grace period: the newest ACTIVE certificate replaces the others, which
    // stay ACTIVE until retire_after.
    let rotating = active.len() >= 2 && {
        let newest = active[active.len() - 1];
        known(newest).is_some_and(|k| {
            k.retire_after.is_some_and(|at| at > now)
                && active[..active.len() - 1]
                    .iter()
                    .all(|old| k.supersedes.as_deref() == Some(old.id.as_str()))
        })
    };
    let revoked_mark = observed.revoked_marks.get(device);
    let connections = observed
        .presence
        .as_ref()
        .and_then(|p| p.get(device))
        .map(Vec::as_slice)
        .unwrap_or_default();
    let last_connected = activator::presence::last_connected(connections).cloned();
    let newest_connected = active.last().is_some_and(|newest| {
        activator::presence::has_connected(connections, newest.id.as_str(), None)
    });
    let (state, reason) = if let (Some(at), false) = (revoked_mark, active.is_empty()) {
        (
            State::Drifted,
            format!(
                "cut off by jitr revoke at {at}, yet {} ACTIVE certificate(s)",
                active.len()
            ),
        )
    } else if !active.is_empty() && judged && standing.is_none() {
        (
            State::Drifted,
            format!(
                "{} ACTIVE certificate(s), but the device is not in the fleet",
                active.len()
            ),
        )
    } else if standing == Some(Standing::Inactive) && !(active.is_empty() && pending.is_empty()) {
        (
            State::Inactive,
            "inactive in the fleet (paused): its certificates are held as they are".to_owned(),
        )
    } else if active.len() >= 2 && !rotating {
        let attached = observed
            .principals
            .get(device)
            .map(|ids| {
                active
                    .iter()
                    .filter(|c| ids.iter().any(|i| i == c.id.as_str()))
                    .count()
            })
            .map_or(String::new(), |n| format!(", {n} attached to the Thing"));
        let newest = active[active.len() - 1];
        let proof = if newest_connected {
            "it has connected".to_owned()
        } else {
            "held for the operator: no record that it has connected".to_owned()
        };
        (
            State::Duplicate,
            format!(
                "{} ACTIVE certificates{attached}: the newest ({}) replaces the others; {proof}",
                active.len(),
                short(&newest.id)
            ),
        )
    } else if !pending.is_empty() && !active.is_empty() {
        (
            State::Held,
            format!(
                "{} waits for approval (jitr approve) beside ACTIVE {}",
                short(&pending[0].id),
                short(&active[0].id)
            ),
        )
    } else if let Some((c, end)) = (if rotating {
        // Only the newest counts: the ones it replaces are on their way out.
        &active[active.len() - 1..]
    } else {
        &active[..]
    })
    .iter()
    .find_map(|c| {
        known(c)
            .and_then(|k| k.not_after)
            .filter(|end| *end <= now + window)
            .map(|end| (c, end))
    }) {
        (
            State::Expiring,
            format!("{} ends {}", short(&c.id), rfc3339(end)),
        )
    } else if !pending.is_empty() {
        (
            State::Pending,
            format!(
                "{} is PENDING_ACTIVATION: the device's next connect or a sweep decides",
                short(&pending[0].id)
            ),
        )
    } else if let (Some(at), true) = (revoked_mark, active.is_empty()) {
        (
            State::Revoked,
            format!("cut off by jitr revoke at {at} (jitr approve --device lifts it)"),
        )
    } else if thing.is_some()
        && !observed.other_principals.contains_key(device)
        && observed
            .principals
            .get(device)
            .is_some_and(|ids| ids.is_empty())
    {
        (
            State::Orphan,
            "a Thing with no certificate attached".to_owned(),
        )
    } else if let (Some(c), None) = (active.first(), &thing) {
        let elsewhere = observed
            .certificate_things
            .get(c.id.as_str())
            .filter(|t| !t.is_empty())
            .map_or(String::new(), |t| {
                format!(" (attached to {})", t.join(", "))
            });
        (
            State::Orphan,
            format!(
                "ACTIVE certificate {} with no Thing{elsewhere}",
                short(&c.id)
            ),
        )
    } else if certs.is_empty() {
        let why = match standing {
            Some(Standing::Active) => "in the fleet, nothing registered in AWS IoT yet",
            Some(Standing::Inactive) => "inactive in the fleet, nothing registered in AWS IoT",
            None => "in the manifest, nothing registered in AWS IoT yet",
        };
        (State::NotConnected, why.to_owned())
    } else if active.is_empty() {
        (
            State::Revoked,
            "every certificate is REVOKED or INACTIVE".to_owned(),
        )
    } else if rotating {
        (
            State::Active,
            format!(
                "rotating: {} replaces the old certificate(s) until its grace ends",
                short(&active[active.len() - 1].id)
            ),
        )
    } else {
        (State::Active, String::new())
    };
    DeviceStatus {
        device_id: device.to_owned(),
        state,
        certificates: rows,
        thing,
        fleet_member: member,
        last_connected,
        newest_connected,
        reason,
    }
}

/// Counts per state, every state listed.
pub fn summary(rows: &[DeviceStatus]) -> BTreeMap<State, usize> {
    let mut counts: BTreeMap<State, usize> = State::ALL.iter().map(|s| (*s, 0)).collect();
    for row in rows {
        *counts.entry(row.state).or_default() += 1;
    }
    counts
}

/// One safe action of `status --fix`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Fix {
    /// The device.
    pub device_id: String,
    /// What to do.
    pub action: FixAction,
    /// Why.
    pub reason: String,
}

/// What a fix does.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(tag = "action", rename_all = "kebab-case")]
pub enum FixAction {
    /// Revoke a certificate (REVOKED, policies and Things detached).
    Revoke {
        /// The certificate.
        certificate_id: String,
    },
    /// Delete a Thing with nothing attached.
    DeleteThing {
        /// The Thing.
        thing: String,
    },
    /// Make the device's Thing again and attach the certificate to it.
    Reattach {
        /// The certificate.
        certificate_id: String,
        /// The Thing (the device id).
        thing: String,
    },
}

impl fmt::Display for Fix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.action {
            FixAction::Revoke { certificate_id } => write!(
                f,
                "{}: revoke certificate {certificate_id} ({})",
                self.device_id, self.reason
            ),
            FixAction::DeleteThing { thing } => {
                write!(
                    f,
                    "{}: delete Thing {thing} ({})",
                    self.device_id, self.reason
                )
            }
            FixAction::Reattach {
                certificate_id,
                thing,
            } => write!(
                f,
                "{}: attach certificate {certificate_id} to Thing {thing} ({})",
                self.device_id, self.reason
            ),
        }
    }
}

/// The safe fixes for `rows` (every row a device jitr owns): a drifted device's ACTIVE
/// certificates revoked (and its Thing deleted, with `delete_things`); a duplicate's ACTIVE
/// certificates but the newest revoked, only once the newest has connected (proof of use:
/// without it, nothing); an orphan Thing deleted (with `delete_things`); an orphan certificate
/// attached again to its device's Thing when the device is an active member and the certificate
/// is attached nowhere else (revoking it would take the device's only identity), revoked
/// otherwise. An inactive device is never touched. Nothing else is.
pub fn plan_fixes(rows: &[DeviceStatus], delete_things: bool) -> Vec<Fix> {
    let mut fixes = Vec::new();
    for row in rows {
        let active: Vec<&CertificateRow> = row
            .certificates
            .iter()
            .filter(|c| c.status == CertificateStatus::Active.as_str())
            .collect();
        let revoke = |c: &CertificateRow, reason: &str| Fix {
            device_id: row.device_id.clone(),
            action: FixAction::Revoke {
                certificate_id: c.certificate_id.clone(),
            },
            reason: reason.to_owned(),
        };
        match row.state {
            State::Drifted => {
                fixes.extend(
                    active
                        .iter()
                        .map(|c| revoke(c, "not in the fleet, or cut off by jitr revoke")),
                );
                // Its Thing goes too, once nothing live is attached (an orphan otherwise).
                if let (Some(thing), true) = (&row.thing, delete_things) {
                    fixes.push(Fix {
                        device_id: row.device_id.clone(),
                        action: FixAction::DeleteThing {
                            thing: thing.clone(),
                        },
                        reason: "not in the fleet, or cut off by jitr revoke".to_owned(),
                    });
                }
            }
            State::Duplicate if row.newest_connected => {
                // Certificates are listed oldest first: all but the last go.
                let keep = active.len().saturating_sub(1);
                fixes.extend(
                    active[..keep]
                        .iter()
                        .map(|c| revoke(c, "a newer ACTIVE certificate replaces it")),
                );
            }
            State::Orphan => match (&row.thing, active.first()) {
                (Some(thing), None) if delete_things => fixes.push(Fix {
                    device_id: row.device_id.clone(),
                    action: FixAction::DeleteThing {
                        thing: thing.clone(),
                    },
                    reason: "no certificate is attached to it".to_owned(),
                }),
                (None, Some(c)) if row.fleet_member && !row.reason.contains("attached to") => {
                    fixes.push(Fix {
                        device_id: row.device_id.clone(),
                        action: FixAction::Reattach {
                            certificate_id: c.certificate_id.clone(),
                            thing: row.device_id.clone(),
                        },
                        reason: "its Thing is gone: made again and attached".to_owned(),
                    });
                }
                (None, Some(c)) => fixes.push(revoke(c, "ACTIVE without its Thing")),
                _ => {}
            },
            _ => {}
        }
    }
    fixes
}

/// How one fix went.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Applied {
    /// The fix.
    pub fix: Fix,
    /// `None` when done; the error otherwise.
    pub error: Option<String>,
}

/// Applies `fixes` one after the other (each idempotent: a second run finds them done); a
/// Thing made again gets what `ownership` says jitr's Things carry.
pub async fn apply_fixes<A: IotAdmin>(
    iot: &A,
    fixes: &[Fix],
    ownership: &activator::Ownership,
    deadline: Instant,
) -> Vec<Applied> {
    let mut applied = Vec::new();
    for fix in fixes {
        let result = match &fix.action {
            FixAction::Revoke { certificate_id } => match CertificateId::parse(certificate_id) {
                // The fixes were read off jitr's own certificates and Things.
                Ok(id) => revoke(
                    iot,
                    &Target::Certificate(id),
                    &[],
                    false,
                    &crate::revoke::Scope::vouched(),
                    deadline,
                )
                .await
                .map(|_| ())
                .map_err(|e| e.into_registry("RevokeCertificate")),
                Err(reason) => Err(RegistryError::failed("RevokeCertificate", reason)),
            },
            FixAction::DeleteThing { thing } => delete_thing(iot, thing, deadline).await,
            FixAction::Reattach {
                certificate_id,
                thing,
            } => reattach(iot, certificate_id, thing, ownership, deadline).await,
        };
        applied.push(Applied {
            fix: fix.clone(),
            error: result.err().map(|e| activator::error_chain(&e)),
        });
    }
    applied
}

/// Makes `thing` again and attaches the certificate to it (both idempotent).
async fn reattach<A: IotAdmin>(
    iot: &A,
    certificate_id: &str,
    thing: &str,
    ownership: &activator::Ownership,
    deadline: Instant,
) -> Result<(), RegistryError> {
    let d = || call_deadline(deadline);
    let id = CertificateId::parse(certificate_id)
        .map_err(|reason| RegistryError::failed("AttachThingPrincipal", reason))?;
    let arn = iot.describe_certificate(&id, d()).await?.arn;
    let spec = activator::ThingSpec {
        name: thing.to_owned(),
        thing_type: ownership.thing_type.clone(),
        attributes: ownership
            .fleet
            .map(activator::fleet_attribute)
            .into_iter()
            .collect(),
    };
    iot.create_thing(&spec, d()).await?;
    iot.attach_thing_principal(thing, &arn, d()).await
}

/// Deletes a Thing after detaching the certificates still attached to it, none of them ACTIVE
/// (an ACTIVE certificate stops the deletion: that device is not done with its Thing). A
/// principal that is not a certificate stops it too: it is another application's, never
/// detached by jitr.
async fn delete_thing<A: IotAdmin>(
    iot: &A,
    thing: &str,
    deadline: Instant,
) -> Result<(), RegistryError> {
    let d = || call_deadline(deadline);
    if let Some(id) = activator::ownership::active_attached(iot, thing, deadline)
        .await?
        .first()
    {
        return Err(RegistryError::failed(
            "DeleteThing",
            format!("certificate {id} attached to {thing} is ACTIVE: the Thing stays"),
        ));
    }
    let principals = match iot.thing_principals(thing, d()).await {
        Ok(p) => p,
        Err(e) if e.is_not_found() => return Ok(()),
        Err(e) => return Err(e),
    };
    if let Some(other) = principals
        .iter()
        .find(|arn| !activator::ownership::is_certificate_arn(arn))
    {
        return Err(RegistryError::failed(
            "DeleteThing",
            format!("{other} is attached to {thing} and is not a certificate: the Thing stays"),
        ));
    }
    if let Some(mark) = iot
        .describe_thing(thing, d())
        .await?
        .as_ref()
        .and_then(|t| activator::ownership::revoked_mark(t).map(str::to_owned))
    {
        return Err(RegistryError::failed(
            "DeleteThing",
            format!("{thing} carries the revocation mark of {mark}: the Thing stays"),
        ));
    }
    for arn in &principals {
        iot.detach_thing_principal(thing, arn, d()).await?;
    }
    iot.delete_thing(thing, d()).await.map(|_| ())
}

#[cfg(test)]
mod tests;
