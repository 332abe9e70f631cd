//! Configuration from the environment, read once at start (docs/design.md, "Activator
//! contract"): [`policy`] holds the decision's rules, [`fleet`] the fleet backend; this module
//! assembles them and names the variable behind every error.

use std::path::PathBuf;

mod fleet_backend;
mod policy;

pub use fleet_backend::{ApiKeySource, FleetConfig, WriteBack};
pub use policy::{Policy, RejectAction};

/// A configuration problem, naming the variable.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A required variable is not set.
    #[error("{var} is not set: {hint}")]
    Missing {
        /// The variable.
        var: &'static str,
        /// What it should hold.
        hint: &'static str,
    },
    /// Several required variables are not set: all named at once, each with what it holds.
    #[error("{} variables are not set: {}", .0.len(), named(.0))]
    MissingMany(Vec<(&'static str, &'static str)>),
    /// A variable has an unusable value.
    #[error("{var} is invalid: {reason}")]
    Invalid {
        /// The variable.
        var: &'static str,
        /// Why.
        reason: String,
    },
    /// A file named by a variable cannot be used.
    #[error("{var}: cannot read {}", path.display())]
    File {
        /// The variable.
        var: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The balena client could not be built.
    #[error("cannot set up the balena API client")]
    Balena(#[from] balena::Error),
}

fn named(missing: &[(&'static str, &'static str)]) -> String {
    missing
        .iter()
        .map(|(var, hint)| format!("{var} ({hint})"))
        .collect::<Vec<_>>()
        .join("; ")
}

impl ConfigError {
    /// Whether the configuration is incomplete or wrong (the operator's to fix), rather than a
    /// file or the balena client failing.
    pub fn is_usage(&self) -> bool {
        matches!(
            self,
            ConfigError::Missing { .. } | ConfigError::MissingMany(_) | ConfigError::Invalid { .. }
        )
    }

    pub(crate) fn invalid(var: &'static str, reason: impl Into<String>) -> Self {
        ConfigError::Invalid {
            var,
            reason: reason.into(),
        }
    }
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
    /// How far back a sweep looks, newest first (`JITR_SWEEP_WINDOW`, default 48h).
    pub sweep_window: std::time::Duration,
    /// The issuance ledger (`JITR_LEDGER_TABLE`, `JITR_LEDGER`), when one is configured.
    pub ledger: Option<LedgerConfig>,
}

/// The issuance ledger the activator marks its decisions in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LedgerConfig {
    /// The DynamoDB table (`JITR_LEDGER_TABLE`).
    pub table: String,
    /// `require` (the default: a table named alone is a gate) or `record` (`JITR_LEDGER`).
    pub mode: crate::ledger::LedgerMode,
}

impl LedgerConfig {
    fn read(env: &Env<'_>) -> Result<Option<LedgerConfig>, ConfigError> {
        let mode = env
            .get("JITR_LEDGER")
            .map(|v| {
                crate::ledger::LedgerMode::parse(&v)
                    .map_err(|r| ConfigError::invalid("JITR_LEDGER", r))
            })
            .transpose()?;
        let Some(table) = env.get("JITR_LEDGER_TABLE") else {
            if mode.is_some() {
                return Err(ConfigError::Missing {
                    var: "JITR_LEDGER_TABLE",
                    hint: "JITR_LEDGER is set: name the DynamoDB table of the issuance ledger",
                });
            }
            return Ok(None);
        };
        // DynamoDB table names: 3 to 255 of [a-zA-Z0-9_.-].
        let valid = (3..=255).contains(&table.len())
            && table
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
        if !valid {
            return Err(ConfigError::invalid(
                "JITR_LEDGER_TABLE",
                format!("{table:?} is not a DynamoDB table name (3 to 255 of a-z A-Z 0-9 _ . -)"),
            ));
        }
        Ok(Some(LedgerConfig {
            table,
            // The gate belongs to the ledger, not to each shell: a command that names the table
            // without saying `record` honours it as the Lambda under `require` does.
            mode: mode.unwrap_or(crate::ledger::LedgerMode::Require),
        }))
    }
}

/// A duration as operators write one: `30s`, `10m`, `2h`, `1d` (a bare number is seconds).
pub fn parse_duration(value: &str) -> Result<std::time::Duration, String> {
    let value = value.trim();
    let split = value
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(value.len());
    let (number, unit) = value.split_at(split);
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{value:?} is not a duration like 30s, 10m, 2h, 1d"))?;
    let seconds = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        _ => {
            return Err(format!(
                "{value:?}: unknown unit {unit:?} (use s, m, h or d)"
            ))
        }
    };
    Ok(std::time::Duration::from_secs(n.saturating_mul(seconds)))
}

/// The required variables that are not set, for the fleet backend chosen, each with what it
/// holds: so that an operator's shell learns them all in one run, not one per run.
fn missing(env: &Env<'_>) -> Vec<(&'static str, &'static str)> {
    let mut missing: Vec<_> = [policy::TRUSTED_CA_IDS, policy::POLICY_NAME]
        .into_iter()
        .filter(|(var, _)| env.get(var).is_none())
        .collect();
    match env.get("JITR_FLEET_BACKEND").as_deref() {
        None | Some("balena") => {
            if env.get(fleet_backend::FLEET_ID.0).is_none() {
                missing.push(fleet_backend::FLEET_ID);
            }
            if env.get("BALENA_API_KEY").is_none() && env.get("BALENA_API_KEY_SECRET_ID").is_none()
            {
                missing.push(fleet_backend::API_KEY);
            }
        }
        Some("allowlist") if env.get(fleet_backend::ALLOWLIST.0).is_none() => {
            missing.push(fleet_backend::ALLOWLIST)
        }
        _ => {}
    }
    missing
}

/// The variables, trimmed, an empty one counting as unset.
pub(crate) struct Env<'a> {
    lookup: &'a dyn Fn(&str) -> Option<String>,
}

impl Env<'_> {
    pub(crate) fn get(&self, var: &str) -> Option<String> {
        (self.lookup)(var)
            .map(|v| v.trim().to_owned())
            .filter(|v| !v.is_empty())
    }

    pub(crate) fn required(
        &self,
        var: &'static str,
        hint: &'static str,
    ) -> Result<String, ConfigError> {
        self.get(var).ok_or(ConfigError::Missing { var, hint })
    }
}

/// An AWS IoT name: `[a-zA-Z0-9:_-]`, 1 to `max` characters.
pub(crate) fn valid_name(s: &str, max: usize) -> bool {
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
        let env = Env { lookup: &get };
        let missing = missing(&env);
        if missing.len() > 1 {
            return Err(ConfigError::MissingMany(missing));
        }
        let policy = Policy::read(&env)?;
        let fleet = FleetConfig::read(&env, policy.id_format)?;
        let sweep_min_age = match env.get("JITR_SWEEP_MIN_AGE_SECONDS") {
            None => std::time::Duration::from_secs(300),
            Some(v) => std::time::Duration::from_secs(v.parse().map_err(|_| {
                ConfigError::invalid(
                    "JITR_SWEEP_MIN_AGE_SECONDS",
                    "expected a whole number of seconds",
                )
            })?),
        };
        let sweep_window = match env.get("JITR_SWEEP_WINDOW") {
            None => std::time::Duration::from_secs(48 * 3600),
            Some(v) => parse_duration(&v)
                .ok()
                .filter(|d| !d.is_zero())
                .ok_or_else(|| {
                    ConfigError::invalid("JITR_SWEEP_WINDOW", "expected a duration like 48h or 2d")
                })?,
        };
        let ledger = LedgerConfig::read(&env)?;
        Ok(Config {
            policy,
            fleet,
            sweep_min_age,
            sweep_window,
            ledger,
        })
    }
}

/// What an operator's shell knows of the rules that say what is jitr's, each optional there:
/// the trusted CAs (`JITR_TRUSTED_CA_IDS`, empty when unset) and the thing type
/// (`JITR_THING_TYPE`). Read and checked as the Lambda reads them.
pub fn ownership_hints_from_env() -> Result<(Vec<iot::CertificateId>, Option<String>), ConfigError>
{
    let get = |name: &str| std::env::var(name).ok();
    let env = Env { lookup: &get };
    let trusted = match env.get(policy::TRUSTED_CA_IDS.0) {
        Some(list) => policy::trusted_ca_ids(&list)?,
        None => Vec::new(),
    };
    Ok((
        trusted,
        policy::iot_name(&env, "JITR_THING_TYPE", "thing type")?,
    ))
}

/// The pinned balena fleet the operator's commands write to, from `BALENA_API_URL`,
/// `BALENA_FLEET_ID` and `BALENA_API_KEY`: every device they touch is looked up in it.
pub fn balena_fleet_from_env() -> Result<balena::Fleet, ConfigError> {
    let get = |name: &str| std::env::var(name).ok();
    let env = Env { lookup: &get };
    let api_url = fleet_backend::balena_api_url(&env)?;
    let fleet_id = fleet_backend::balena_fleet_id(&env)?;
    let key = env.required(
        "BALENA_API_KEY",
        "a balena API key that may write device variables",
    )?;
    let client = balena::Client::new(&api_url, balena::ApiKey::new(key))?;
    Ok(balena::Fleet::new(client, fleet_id))
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
    fn the_ledger_is_off_unless_named_and_require_needs_its_table() {
        let base = [
            ("JITR_TRUSTED_CA_IDS", CA),
            ("JITR_POLICY_NAME", "jitr-device"),
            ("BALENA_FLEET_ID", "1234567"),
            ("BALENA_API_KEY", "secret"),
        ];
        let with = |extra: &[(&'static str, &'static str)]| {
            let mut all = base.to_vec();
            all.extend_from_slice(extra);
            Config::from_lookup(lookup(&all))
        };
        assert_eq!(with(&[]).unwrap().ledger, None);
        let c = with(&[("JITR_LEDGER_TABLE", "jitr-ledger")]).unwrap();
        assert_eq!(
            c.ledger,
            Some(LedgerConfig {
                table: "jitr-ledger".into(),
                mode: crate::ledger::LedgerMode::Require
            })
        );
        let c = with(&[
            ("JITR_LEDGER_TABLE", "jitr-ledger"),
            ("JITR_LEDGER", "record"),
        ])
        .unwrap();
        assert_eq!(c.ledger.unwrap().mode, crate::ledger::LedgerMode::Record);
        let c = with(&[("JITR_LEDGER_TABLE", "t.l-1"), ("JITR_LEDGER", "require")]).unwrap();
        assert_eq!(c.ledger.unwrap().mode, crate::ledger::LedgerMode::Require);
        let e = with(&[("JITR_LEDGER", "require")]).unwrap_err().to_string();
        assert!(e.starts_with("JITR_LEDGER_TABLE is not set"), "{e}");
        let e = with(&[("JITR_LEDGER_TABLE", "x"), ("JITR_LEDGER", "strict")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("JITR_LEDGER is invalid"), "{e}");
        let e = with(&[("JITR_LEDGER_TABLE", "no spaces")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a DynamoDB table name"), "{e}");
    }

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
            let mut pairs: Vec<(&str, &str)> = base.to_vec();
            if want.starts_with("JITR_TRUSTED_CA_IDS is not") {
                pairs.retain(|(key, _)| *key != "JITR_TRUSTED_CA_IDS");
            }
            for (k, v) in overrides {
                pairs.retain(|(key, _)| *key != k);
                pairs.push((k, v));
            }
            let err = Config::from_lookup(lookup(&pairs)).unwrap_err().to_string();
            assert!(err.starts_with(want), "{want}: {err}");
        }
        // Several missing: all named at once, for the backend chosen.
        let err = Config::from_lookup(lookup(&[])).unwrap_err();
        assert!(err.is_usage());
        let text = err.to_string();
        assert!(text.starts_with("4 variables are not set"), "{text}");
        for var in [
            "JITR_TRUSTED_CA_IDS",
            "JITR_POLICY_NAME",
            "BALENA_FLEET_ID",
            "BALENA_API_KEY",
        ] {
            assert!(text.contains(var), "{var}: {text}");
        }
        let err = Config::from_lookup(lookup(&[("JITR_FLEET_BACKEND", "allowlist")]))
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("3 variables are not set"), "{err}");
        assert!(
            err.contains("JITR_ALLOWLIST") && !err.contains("BALENA"),
            "{err}"
        );
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
