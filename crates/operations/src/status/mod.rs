//! Every device's state (`jitr status`), read from AWS IoT and the fleet, and the safe fixes
//! (`jitr status --fix`).
//!
//! What is read, all in bulk and paced within AWS IoT's default rates ([`StatusRates`]): every
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
use iot::{call_deadline, CertificateId, CertificateStatus, IotAdmin, RegistryError};
use pace::Pace;

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
    /// Every Thing jitr owns ([`activator::ownership::Ownership`]).
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
pub struct StatusRates {
    /// ListCertificatesByCA, ListThings pages; DescribeCertificate, ListThingPrincipals,
    /// ListPrincipalThings calls: 10 a second each by default.
    pub per_operation: f64,
    /// Calls in flight at once.
    pub concurrency: usize,
}

impl Default for StatusRates {
    fn default() -> Self {
        StatusRates {
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
    pub ownership: activator::ownership::Ownership,
    /// Read every owned Thing's attachments, not only where they decide a state.
    pub deep: bool,
    /// How fast each kind of read goes.
    pub rates: StatusRates,
}

mod classify;
mod fix;
mod observe;

pub use classify::{classify, summary};
pub use fix::{apply_fixes, plan_fixes, Applied, Fix, FixAction};
pub use observe::{known_from_pem, observe};

#[cfg(test)]
mod tests;
