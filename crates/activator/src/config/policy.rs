//! The decision's rules: `JITR_TRUSTED_CA_IDS`, `JITR_POLICY_NAME`, `JITR_REJECT_ACTION`,
//! `JITR_THING_TYPE`, `JITR_THING_GROUP`, `JITR_ID_FORMAT`.

use factory_ca::IdFormat;

use super::{valid_name, Env};
use crate::ConfigError;
use iot::CertificateId;

/// What happens to a rejected certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RejectAction {
    /// UpdateCertificate REVOKED (default): it can never be activated again.
    Revoke,
    /// UpdateCertificate INACTIVE: an operator may still activate it by hand.
    Deactivate,
}

/// The decision's rules.
#[derive(Debug, Clone)]
pub struct Policy {
    /// CA ids whose certificates may be activated.
    pub trusted_ca_ids: Vec<CertificateId>,
    /// IoT policy attached to every activated certificate.
    pub policy_name: String,
    /// What to do with a rejected certificate.
    pub reject_action: RejectAction,
    /// Optional thing type.
    pub thing_type: Option<String>,
    /// Optional thing group.
    pub thing_group: Option<String>,
    /// Accepted device ids.
    pub id_format: IdFormat,
    /// How far ahead of our clock a certificate's notBefore may be and still wait rather than
    /// be rejected (`JITR_CLOCK_SKEW_SECONDS`, default 300).
    pub clock_skew: time::Duration,
    /// The longest device validity accepted, in days (`JITR_MAX_DEVICE_VALIDITY_DAYS`, default
    /// the CA profile's default maximum).
    pub max_validity_days: u32,
}

/// `JITR_TRUSTED_CA_IDS`, required, and what it holds.
pub(super) const TRUSTED_CA_IDS: (&str, &str) = (
    "JITR_TRUSTED_CA_IDS",
    "comma-separated caCertificateIds (`jitr ca register` prints it)",
);
/// `JITR_POLICY_NAME`, required, and what it holds.
pub(super) const POLICY_NAME: (&str, &str) = (
    "JITR_POLICY_NAME",
    "the IoT policy attached to every activated certificate",
);

/// The CA ids in `list` (JITR_TRUSTED_CA_IDS: comma-separated, spaces allowed).
pub(super) fn trusted_ca_ids(list: &str) -> Result<Vec<CertificateId>, ConfigError> {
    list.split(',')
        .map(|id| {
            CertificateId::parse(id.trim()).map_err(|r| {
                ConfigError::invalid(TRUSTED_CA_IDS.0, format!("{:?}: {r}", id.trim()))
            })
        })
        .collect()
}

/// The optional AWS IoT name in `var` (a thing type or group: `what`).
pub(super) fn iot_name(
    env: &Env<'_>,
    var: &'static str,
    what: &str,
) -> Result<Option<String>, ConfigError> {
    match env.get(var) {
        Some(name) if !valid_name(&name, 128) => Err(ConfigError::invalid(
            var,
            format!("a {what} name uses [a-zA-Z0-9:_-], 1 to 128 characters"),
        )),
        other => Ok(other),
    }
}

impl Policy {
    /// Reads the rules.
    pub(super) fn read(env: &Env<'_>) -> Result<Policy, ConfigError> {
        let trusted_ca_ids = trusted_ca_ids(&env.required(TRUSTED_CA_IDS.0, TRUSTED_CA_IDS.1)?)?;
        let policy_name = env.required(POLICY_NAME.0, POLICY_NAME.1)?;
        if !valid_name(&policy_name, 128) {
            return Err(ConfigError::invalid(
                "JITR_POLICY_NAME",
                "an IoT policy name uses [a-zA-Z0-9:_-], 1 to 128 characters",
            ));
        }
        let reject_action = match env.get("JITR_REJECT_ACTION").as_deref() {
            None | Some("revoke") => RejectAction::Revoke,
            Some("deactivate") => RejectAction::Deactivate,
            Some(other) => {
                return Err(ConfigError::invalid(
                    "JITR_REJECT_ACTION",
                    format!("{other:?}: expected revoke or deactivate"),
                ))
            }
        };
        let thing_type = iot_name(env, "JITR_THING_TYPE", "thing type")?;
        let thing_group = iot_name(env, "JITR_THING_GROUP", "thing group")?;
        let id_format = match env.get("JITR_ID_FORMAT") {
            None => IdFormat::BalenaUuid,
            Some(f) => f
                .parse()
                .map_err(|e: String| ConfigError::invalid("JITR_ID_FORMAT", e))?,
        };
        let clock_skew = match env.get("JITR_CLOCK_SKEW_SECONDS") {
            None => 300,
            Some(v) => v.parse::<u32>().map_err(|_| {
                ConfigError::invalid(
                    "JITR_CLOCK_SKEW_SECONDS",
                    "expected a whole number of seconds",
                )
            })?,
        };
        let max_validity_days = match env.get("JITR_MAX_DEVICE_VALIDITY_DAYS") {
            None => factory_ca::DEFAULT_MAX_DEVICE_DAYS,
            Some(v) => v.parse::<u32>().ok().filter(|d| *d > 0).ok_or_else(|| {
                ConfigError::invalid(
                    "JITR_MAX_DEVICE_VALIDITY_DAYS",
                    "expected a positive number of days",
                )
            })?,
        };
        Ok(Policy {
            trusted_ca_ids,
            policy_name,
            reject_action,
            thing_type,
            thing_group,
            id_format,
            clock_skew: time::Duration::seconds(i64::from(clock_skew)),
            max_validity_days,
        })
    }
}
