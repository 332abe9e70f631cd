//! The issuance ledger: one item per certificate the factory issued, kept in AWS (DynamoDB,
//! [`crate::dynamodb::DynamoLedger`]) so the activator knows what was issued, not only what the CA
//! signed. The factory writes an item per certificate when it issues (`jitr issue --ledger`);
//! the activator marks each decision on it (`JITR_LEDGER_TABLE`), and with `JITR_LEDGER=require`
//! holds any certificate the ledger does not list: a stolen CA key, or a signing station used
//! outside the process, then brings no device online.
//!
//! The port is object-safe (boxed futures), so an activator carries an optional ledger without
//! a third type parameter on everything built on it.

use std::fmt;
use std::future::Future;
use std::pin::Pin;

use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use iot::Cause;
use iot::CertificateId;

/// Item attribute names and status values, shared by every adapter and the CLI.
pub mod item {
    /// The key: the AWS IoT certificate id (lowercase hex SHA-256 of the DER).
    pub const CERTIFICATE_ID: &str = "certificate_id";
    /// The device id (the certificate's CN, the Thing's name).
    pub const DEVICE_ID: &str = "device_id";
    /// The serial number, lowercase hex.
    pub const SERIAL: &str = "serial";
    /// notAfter, RFC 3339.
    pub const NOT_AFTER: &str = "not_after";
    /// When the factory issued it, RFC 3339.
    pub const ISSUED_AT: &str = "issued_at";
    /// The issuance batch it came in.
    pub const BATCH: &str = "batch";
    /// One of the `STATUS_*` values.
    pub const STATUS: &str = "status";
    /// When the activator activated it, RFC 3339.
    pub const ACTIVATED_AT: &str = "activated_at";
    /// The AWS region: the one assigned at issuance, then the one it was activated in.
    pub const REGION: &str = "region";
    /// Why it was held or rejected.
    pub const REASON: &str = "reason";
    /// When the last decision on it was made, RFC 3339.
    pub const DECIDED_AT: &str = "decided_at";

    /// Issued by the factory; not decided yet.
    pub const STATUS_ISSUED: &str = "issued";
    /// Activated.
    pub const STATUS_ACTIVATED: &str = "activated";
    /// Left pending on purpose.
    pub const STATUS_HELD: &str = "held";
    /// Revoked or deactivated by a decision.
    pub const STATUS_REJECTED: &str = "rejected";
}

/// One certificate as the ledger lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LedgerEntry {
    /// The certificate id.
    pub certificate_id: String,
    /// The device id.
    pub device_id: String,
    /// Serial, lowercase hex.
    pub serial: String,
    /// notAfter, RFC 3339.
    pub not_after: String,
    /// Issued at, RFC 3339.
    pub issued_at: String,
    /// The issuance batch.
    pub batch: String,
    /// `issued`, `activated`, `held` or `rejected`.
    pub status: String,
    /// The region, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
}

/// A decision to mark on a listed certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LedgerMark {
    /// Activated (also what the sweep marks on a certificate it finds ACTIVE).
    Activated,
    /// Held, with the reason.
    Held(String),
    /// Rejected, with the reason.
    Rejected(String),
}

impl LedgerMark {
    /// The status value this mark writes.
    pub fn status(&self) -> &'static str {
        match self {
            LedgerMark::Activated => item::STATUS_ACTIVATED,
            LedgerMark::Held(_) => item::STATUS_HELD,
            LedgerMark::Rejected(_) => item::STATUS_REJECTED,
        }
    }
}

/// What marking did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Marked {
    /// The item now says so.
    Written,
    /// The item said so already (an activation marked twice keeps its first time).
    Unchanged,
    /// The ledger does not list the certificate: nothing was written (the activator never adds
    /// to the ledger; only the factory and `jitr approve --add-to-ledger` do).
    NotListed,
}

/// A ledger call that failed: the operation, the table and why, on one line.
#[derive(Debug, thiserror::Error)]
#[error("ledger {op} on {table}")]
pub struct LedgerError {
    /// The DynamoDB operation.
    pub op: &'static str,
    /// The table.
    pub table: String,
    /// Whether trying again later can succeed unchanged (throttling, 5xx, timeouts).
    pub retryable: bool,
    /// Why.
    #[source]
    pub source: Cause,
}

/// A boxed ledger answer.
pub type LedgerFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, LedgerError>> + Send + 'a>>;

/// The ledger as the activator uses it. Every call answers by its deadline.
pub trait Ledger: Send + Sync + fmt::Debug {
    /// The entry for `id`, or `None` when the ledger does not list it (a strongly consistent
    /// read: an item written at issuance is seen).
    fn entry<'a>(
        &'a self,
        id: &'a CertificateId,
        deadline: Instant,
    ) -> LedgerFuture<'a, Option<LedgerEntry>>;
    /// Marks a decision on a listed certificate at `now` (RFC 3339); never creates an item.
    fn mark<'a>(
        &'a self,
        id: &'a CertificateId,
        mark: &'a LedgerMark,
        now: &'a str,
        deadline: Instant,
    ) -> LedgerFuture<'a, Marked>;
    /// Writes `entry`, creating it if need be (`jitr approve --add-to-ledger`). An existing
    /// item keeps its status.
    fn add<'a>(&'a self, entry: &'a LedgerEntry, deadline: Instant) -> LedgerFuture<'a, ()>;
}

/// Whether the activator only records its decisions, or also requires every certificate to be
/// listed (`JITR_LEDGER`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LedgerMode {
    /// Mark decisions; an unlisted certificate is decided as without a ledger.
    Record,
    /// Also hold any certificate the ledger does not list.
    Require,
}

impl LedgerMode {
    /// `record` or `require`.
    pub fn parse(value: &str) -> Result<Self, String> {
        match value {
            "record" => Ok(LedgerMode::Record),
            "require" => Ok(LedgerMode::Require),
            other => Err(format!("{other:?}: expected record or require")),
        }
    }
}

/// The ledger an activator carries, and how it uses it.
#[derive(Debug)]
pub(crate) struct LedgerPort {
    pub(crate) ledger: Box<dyn Ledger>,
    pub(crate) mode: LedgerMode,
}

/// The reason an unlisted certificate is held with.
pub const NOT_IN_LEDGER: &str = "not in the ledger";
