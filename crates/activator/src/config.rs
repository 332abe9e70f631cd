//! Configuration from the environment, read once at start (DESIGN.md, "Activator contract").

use std::fmt;
use std::path::PathBuf;

use factory_ca::IdFormat;

use crate::{CertificateId, FleetId};

/// A configuration problem, naming the variable.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A required variable is not set.
    #[error("{var} is not set: {hint}")]
    Missing {
        var: &'static str,
        hint: &'static str,
    },
    /// A variable has an unusable value.
    #[error("{var} is invalid: {reason}")]
    Invalid { var: &'static str, reason: String },
    /// A file named by a variable cannot be used.
    #[error("{var}: cannot read {}", path.display())]
    File {
        var: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The HTTP client could not be built.
    #[error("cannot build the HTTP client")]
    Http(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// What happens to a rejected certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RejectAction {
    /// UpdateCertificate REVOKED (default): it can never be activated again.
    Revoke,
    /// UpdateCertificate INACTIVE: an operator may still activate it by hand.
    Deactivate,
}

/// What the activator records on a balena device once it is activated
/// (`JITR_BALENA_WRITE_BACK`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WriteBack {
    /// Nothing (unset, the default).
    #[default]
    Off,
    /// `tag`: device tags `aws_iot_thing` and `aws_iot_certificate_id`.
    Tags,
}

/// The balena API key; never printed.
#[derive(Clone)]
pub struct ApiKey(String);

impl ApiKey {
    /// Wraps a key.
    pub fn new(key: String) -> Self {
        ApiKey(key)
    }

    /// The key, for the Authorization header.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ApiKey(<redacted>)")
    }
}

/// Where the balena API key comes from.
#[derive(Debug, Clone)]
pub enum ApiKeySource {
    /// `BALENA_API_KEY`.
    Literal(ApiKey),
    /// `BALENA_API_KEY_SECRET_ID`: fetched from Secrets Manager on first use, then cached.
    SecretsManager(String),
}

/// The fleet backend and its settings.
#[derive(Debug, Clone)]
pub enum FleetConfig {
    /// `JITR_FLEET_BACKEND=balena`.
    Balena {
        api_url: String,
        fleet_id: FleetId,
        api_key: ApiKeySource,
        /// `JITR_BALENA_WRITE_BACK`.
        write_back: WriteBack,
    },
    /// `JITR_FLEET_BACKEND=allowlist`.
    Allowlist { path: PathBuf },
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
}

/// Everything the activator reads from the environment.
#[derive(Debug, Clone)]
pub struct Config {
    /// Decision rules.
    pub policy: Policy,
    /// Fleet backend.
    pub fleet: FleetConfig,
    /// How old a pending certificate must be before a scheduled sweep decides it
    /// (`JITR_SWEEP_MIN_AGE_SECONDS`, default 300): younger ones belong to their own event.
    pub sweep_min_age: std::time::Duration,
}

fn valid_name(s: &str, max: usize) -> bool {
    !s.is_empty()
        && s.len() <= max
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b":_-".contains(&b))
}

impl Config {
    /// Reads the configuration from the process environment.
    pub fn from_env() -> Result<Config, ConfigError> {
        Config::from_lookup(|name| std::env::var(name).ok())
    }

    /// Reads the configuration through `get` (the environment, or a map in tests).
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
        let get = |var: &str| {
            get(var)
                .map(|v| v.trim().to_owned())
                .filter(|v| !v.is_empty())
        };
        let invalid = |var: &'static str, reason: &str| ConfigError::Invalid {
            var,
            reason: reason.to_owned(),
        };

        let trusted = get("JITR_TRUSTED_CA_IDS").ok_or(ConfigError::Missing {
            var: "JITR_TRUSTED_CA_IDS",
            hint: "comma-separated caCertificateIds (`jitr ca register` prints it)",
        })?;
        let trusted_ca_ids = trusted
            .split(',')
            .map(|id| {
                CertificateId::parse(id.trim())
                    .map_err(|r| invalid("JITR_TRUSTED_CA_IDS", &format!("{:?}: {r}", id.trim())))
            })
            .collect::<Result<Vec<_>, _>>()?;

        let policy_name = get("JITR_POLICY_NAME").ok_or(ConfigError::Missing {
            var: "JITR_POLICY_NAME",
            hint: "the IoT policy attached to every activated certificate",
        })?;
        if !valid_name(&policy_name, 128) {
            return Err(invalid(
                "JITR_POLICY_NAME",
                "an IoT policy name uses [a-zA-Z0-9:_-], 1 to 128 characters",
            ));
        }

        let reject_action = match get("JITR_REJECT_ACTION").as_deref() {
            None | Some("revoke") => RejectAction::Revoke,
            Some("deactivate") => RejectAction::Deactivate,
            Some(other) => {
                return Err(invalid(
                    "JITR_REJECT_ACTION",
                    &format!("{other:?}: expected revoke or deactivate"),
                ))
            }
        };
        let thing_type = get("JITR_THING_TYPE");
        if thing_type.as_deref().is_some_and(|t| !valid_name(t, 128)) {
            return Err(invalid(
                "JITR_THING_TYPE",
                "a thing type name uses [a-zA-Z0-9:_-], 1 to 128 characters",
            ));
        }
        let thing_group = get("JITR_THING_GROUP");
        if thing_group.as_deref().is_some_and(|t| !valid_name(t, 128)) {
            return Err(invalid(
                "JITR_THING_GROUP",
                "a thing group name uses [a-zA-Z0-9:_-], 1 to 128 characters",
            ));
        }
        let id_format = match get("JITR_ID_FORMAT") {
            None => IdFormat::BalenaUuid,
            Some(f) => f
                .parse()
                .map_err(|e: String| invalid("JITR_ID_FORMAT", &e))?,
        };

        let write_back = match get("JITR_BALENA_WRITE_BACK").as_deref() {
            None => WriteBack::Off,
            Some("tag") => WriteBack::Tags,
            Some(other) => {
                return Err(invalid(
                    "JITR_BALENA_WRITE_BACK",
                    &format!("{other:?}: expected tag, or leave it unset"),
                ))
            }
        };

        let fleet = match get("JITR_FLEET_BACKEND").as_deref() {
            None | Some("balena") => {
                if id_format != IdFormat::BalenaUuid {
                    return Err(invalid(
                        "JITR_ID_FORMAT",
                        "the balena backend needs balena-uuid device ids",
                    ));
                }
                let api_url =
                    get("BALENA_API_URL").unwrap_or_else(|| "https://api.balena-cloud.com".into());
                if !(api_url.starts_with("https://") || api_url.starts_with("http://")) {
                    return Err(invalid("BALENA_API_URL", "expected an http(s):// URL"));
                }
                let fleet_id = get("BALENA_FLEET_ID").ok_or(ConfigError::Missing {
                    var: "BALENA_FLEET_ID",
                    hint: "the numeric id of the balena fleet devices must belong to",
                })?;
                let fleet_id =
                    FleetId::parse(&fleet_id).map_err(|r| invalid("BALENA_FLEET_ID", r))?;
                let api_key = match (get("BALENA_API_KEY"), get("BALENA_API_KEY_SECRET_ID")) {
                    (Some(key), _) => ApiKeySource::Literal(ApiKey::new(key)),
                    (None, Some(id)) => ApiKeySource::SecretsManager(id),
                    (None, None) => {
                        return Err(ConfigError::Missing {
                            var: "BALENA_API_KEY",
                            hint: "set BALENA_API_KEY or BALENA_API_KEY_SECRET_ID",
                        })
                    }
                };
                FleetConfig::Balena {
                    api_url: api_url.trim_end_matches('/').to_owned(),
                    fleet_id,
                    api_key,
                    write_back,
                }
            }
            Some("allowlist") => {
                if write_back != WriteBack::Off {
                    return Err(invalid(
                        "JITR_BALENA_WRITE_BACK",
                        "writing back to balena needs JITR_FLEET_BACKEND=balena",
                    ));
                }
                let path = get("JITR_ALLOWLIST").ok_or(ConfigError::Missing {
                    var: "JITR_ALLOWLIST",
                    hint: "a file of device ids, one per line, for JITR_FLEET_BACKEND=allowlist",
                })?;
                FleetConfig::Allowlist {
                    path: PathBuf::from(path),
                }
            }
            Some(other) => {
                return Err(invalid(
                    "JITR_FLEET_BACKEND",
                    &format!("{other:?}: expected balena or allowlist"),
                ))
            }
        };
        let sweep_min_age = match get("JITR_SWEEP_MIN_AGE_SECONDS") {
            None => std::time::Duration::from_secs(300),
            Some(v) => std::time::Duration::from_secs(v.parse().map_err(|_| {
                invalid(
                    "JITR_SWEEP_MIN_AGE_SECONDS",
                    "expected a whole number of seconds",
                )
            })?),
        };
        Ok(Config {
            policy: Policy {
                trusted_ca_ids,
                policy_name,
                reject_action,
                thing_type,
                thing_group,
                id_format,
            },
            fleet,
            sweep_min_age,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn lookup(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    const CA: &str = "0a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f9";

    #[test]
    fn balena_is_the_default_backend() {
        let c = Config::from_lookup(lookup(&[
            ("JITR_TRUSTED_CA_IDS", CA),
            ("JITR_POLICY_NAME", "jitr-device"),
            ("BALENA_FLEET_ID", "1234567"),
            ("BALENA_API_KEY", "secret"),
        ]))
        .unwrap();
        assert_eq!(c.policy.reject_action, RejectAction::Revoke);
        match c.fleet {
            FleetConfig::Balena {
                api_url,
                fleet_id,
                api_key,
                write_back,
            } => {
                assert_eq!(api_url, "https://api.balena-cloud.com");
                assert_eq!(write_back, WriteBack::Off);
                assert_eq!(fleet_id.get(), 1234567);
                assert_eq!(format!("{api_key:?}"), "Literal(ApiKey(<redacted>))");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn every_error_names_its_variable() {
        let base = [
            ("JITR_TRUSTED_CA_IDS", CA),
            ("JITR_POLICY_NAME", "p"),
            ("BALENA_FLEET_ID", "1"),
            ("BALENA_API_KEY", "k"),
        ];
        let cases: Vec<(Vec<(&str, &str)>, &str)> = vec![
            (vec![], "JITR_TRUSTED_CA_IDS is not set"),
            (
                vec![("JITR_TRUSTED_CA_IDS", "abc")],
                "JITR_TRUSTED_CA_IDS is invalid",
            ),
            (
                vec![("JITR_POLICY_NAME", "")],
                "JITR_POLICY_NAME is not set",
            ),
            (
                vec![("JITR_POLICY_NAME", "has space")],
                "JITR_POLICY_NAME is invalid",
            ),
            (
                vec![("BALENA_FLEET_ID", "my-fleet")],
                "BALENA_FLEET_ID is invalid",
            ),
            (vec![("BALENA_FLEET_ID", "")], "BALENA_FLEET_ID is not set"),
            (vec![("BALENA_API_KEY", "")], "BALENA_API_KEY is not set"),
            (
                vec![("JITR_REJECT_ACTION", "delete")],
                "JITR_REJECT_ACTION is invalid",
            ),
            (
                vec![("JITR_FLEET_BACKEND", "ldap")],
                "JITR_FLEET_BACKEND is invalid",
            ),
            (
                vec![("JITR_FLEET_BACKEND", "allowlist")],
                "JITR_ALLOWLIST is not set",
            ),
            (
                vec![("BALENA_API_URL", "api.balena-cloud.com")],
                "BALENA_API_URL is invalid",
            ),
            (
                vec![("JITR_BALENA_WRITE_BACK", "env")],
                "JITR_BALENA_WRITE_BACK is invalid",
            ),
            (
                vec![
                    ("JITR_FLEET_BACKEND", "allowlist"),
                    ("JITR_ALLOWLIST", "/dev/null"),
                    ("JITR_BALENA_WRITE_BACK", "tag"),
                ],
                "JITR_BALENA_WRITE_BACK is invalid",
            ),
        ];
        for (overrides, want) in cases {
            let mut pairs: Vec<(&str, &str)> = if want.starts_with("JITR_TRUSTED_CA_IDS is not") {
                vec![]
            } else {
                base.to_vec()
            };
            for (k, v) in overrides {
                pairs.retain(|(key, _)| *key != k);
                pairs.push((k, v));
            }
            let err = Config::from_lookup(lookup(&pairs)).unwrap_err().to_string();
            assert!(err.starts_with(want), "{want}: {err}");
        }
    }

    #[test]
    fn write_back_tag_is_read_for_the_balena_backend() {
        let c = Config::from_lookup(lookup(&[
            ("JITR_TRUSTED_CA_IDS", CA),
            ("JITR_POLICY_NAME", "p"),
            ("BALENA_FLEET_ID", "1"),
            ("BALENA_API_KEY", "k"),
            ("JITR_BALENA_WRITE_BACK", "tag"),
        ]))
        .unwrap();
        assert!(matches!(
            c.fleet,
            FleetConfig::Balena {
                write_back: WriteBack::Tags,
                ..
            }
        ));
    }
}
