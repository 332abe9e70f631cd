//! The provisioner's configuration, read once at its cold start like the activator's (a
//! missing or invalid value fails the start, naming the variable): the activator's own
//! variables (the decision that activates what the provisioner makes), and its own.

use std::time::Duration;

use activator::FleetConfig;
use ca_keys::KeyUri;
use iot::CertificateId;

use crate::request::ProvisionToken;

/// The template parameter that holds the device UUID in a fleet provisioning request, unless
/// `JITR_FP_UUID_PARAMETER` says another.
pub(crate) const DEFAULT_UUID_PARAMETER: &str = "DeviceUuid";
/// The services the provisioner delivers to unless `JITR_PROVISION_SERVICES` says others:
/// balena's cloud-relay block, as its docker-compose names it.
pub(crate) const DEFAULT_SERVICES: &str = "cloud-relay";
/// One provisioning attempt per device in this time, unless `JITR_PROVISION_INTERVAL` says
/// another.
pub(crate) const DEFAULT_INTERVAL: Duration = Duration::from_secs(600);

/// A configuration problem, naming the variable.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// One of the activator's variables.
    #[error(transparent)]
    Activator(#[from] activator::ConfigError),
    /// A required variable is not set.
    #[error("{var} is not set: {hint}")]
    Missing {
        /// The variable.
        var: &'static str,
        /// What it should hold.
        hint: &'static str,
    },
    /// A variable has an unusable value.
    #[error("{var} is invalid: {reason}")]
    Invalid {
        /// The variable.
        var: &'static str,
        /// Why.
        reason: String,
    },
}

/// Where the secret that `PROVISION_URL` carries comes from.
#[derive(Debug, Clone)]
pub enum TokenSource {
    /// `JITR_PROVISION_TOKEN`: the token itself.
    Value(ProvisionToken),
    /// `JITR_PROVISION_TOKEN_SECRET_ID`: a Secrets Manager secret (name or ARN) whose string
    /// is the token, read once at the cold start.
    Secret(String),
}

/// Everything the provisioner reads from the environment.
#[derive(Debug, Clone)]
pub struct Config {
    /// The activator's configuration: its decision activates every certificate made here.
    /// `JITR_TRUSTED_CA_IDS` defaults to `JITR_CA_CERTIFICATE_ID`.
    pub activator: activator::Config,
    /// `JITR_CA_KEY_URI`: the CA key in AWS KMS (`awskms:key-id=...`); a key file is refused,
    /// since a file key in the cloud is a key anyone with the function's code can copy.
    pub ca_key: KeyUri,
    /// `JITR_CA_CERTIFICATE_ID`: the CA as registered in AWS IoT; its certificate is read from
    /// there at the cold start.
    pub ca_certificate_id: CertificateId,
    /// `JITR_TOPIC_PREFIX` (default `balena`): the device topics' first level(s), for the
    /// delivered `CLOUD_CONSUMER_TOPIC`.
    pub topic_prefix: String,
    /// `JITR_DATA_ENDPOINT`: the endpoint delivered as `AWS_DATA_ENDPOINT` (default: AWS IoT's
    /// DescribeEndpoint `iot:Data-ATS`, asked at the cold start).
    pub data_endpoint: Option<String>,
    /// `JITR_FP_UUID_PARAMETER` (default `DeviceUuid`): the fleet provisioning template
    /// parameter holding the device UUID.
    pub uuid_parameter: String,
    /// `JITR_PROVISION_TABLE`: the DynamoDB table of provisioning attempts (key `device_id`),
    /// which limits each device to one attempt per `interval`.
    pub attempts_table: String,
    /// `JITR_PROVISION_INTERVAL` (default 10m): the shortest time between two attempts for one
    /// device.
    pub interval: Duration,
    /// `JITR_PROVISION_SERVICES` (comma-separated, default `cloud-relay`): the only services a
    /// request may name; a key is never delivered to any other service.
    pub services: Vec<String>,
    /// `JITR_PROVISION_TOKEN` or `JITR_PROVISION_TOKEN_SECRET_ID` (at most one): the secret a
    /// request must present in the URL, else it is answered 403 before anything is read. None:
    /// any caller is heard, and can tell a member from a stranger by the answer.
    pub token: Option<TokenSource>,
}

impl Config {
    /// Reads the configuration from the process environment.
    pub fn from_env() -> Result<Config, ConfigError> {
        Config::from_lookup(|name| std::env::var(name).ok())
    }

    /// Reads the configuration through `get` (the environment, or a map in tests).
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
        let var = |name: &str| {
            get(name)
                .map(|v| v.trim().to_owned())
                .filter(|v| !v.is_empty())
        };
        let ca_id_text = var("JITR_CA_CERTIFICATE_ID").ok_or(ConfigError::Missing {
            var: "JITR_CA_CERTIFICATE_ID",
            hint: "the CA's certificate id in AWS IoT (`jitr ca register` prints it)",
        })?;
        let ca_certificate_id =
            CertificateId::parse(&ca_id_text).map_err(|reason| ConfigError::Invalid {
                var: "JITR_CA_CERTIFICATE_ID",
                reason: reason.to_string(),
            })?;
        let activator = activator::Config::from_lookup(|name| match name {
            "JITR_TRUSTED_CA_IDS" => var(name).or_else(|| Some(ca_id_text.clone())),
            _ => var(name),
        })?;
        if !matches!(activator.fleet, FleetConfig::Balena { .. }) {
            return Err(ConfigError::Invalid {
                var: "JITR_FLEET_BACKEND",
                reason: "the provisioner delivers through balena: it must be `balena`".into(),
            });
        }
        if !activator.policy.trusted_ca_ids.contains(&ca_certificate_id) {
            return Err(ConfigError::Invalid {
                var: "JITR_TRUSTED_CA_IDS",
                reason: format!(
                    "it does not list JITR_CA_CERTIFICATE_ID {ca_certificate_id}, so nothing provisioned could be activated"
                ),
            });
        }
        let key_text = var("JITR_CA_KEY_URI").ok_or(ConfigError::Missing {
            var: "JITR_CA_KEY_URI",
            hint: "the CA key in AWS KMS, awskms:key-id=<id or ARN>",
        })?;
        let ca_key: KeyUri =
            key_text
                .parse()
                .map_err(|e: ca_keys::Error| ConfigError::Invalid {
                    var: "JITR_CA_KEY_URI",
                    reason: e.to_string(),
                })?;
        if !matches!(ca_key, KeyUri::AwsKms { .. }) {
            return Err(ConfigError::Invalid {
                var: "JITR_CA_KEY_URI",
                reason: format!(
                    "{key_text:?} is not an AWS KMS key: the provisioner signs only through KMS (awskms:key-id=...), never with a key it could leak"
                ),
            });
        }
        let topic_prefix = var("JITR_TOPIC_PREFIX")
            .unwrap_or_else(|| balena::delivery::DEFAULT_TOPIC_PREFIX.to_owned());
        balena::delivery::validate_topic_prefix(&topic_prefix).map_err(|reason| {
            ConfigError::Invalid {
                var: "JITR_TOPIC_PREFIX",
                reason: reason.to_owned(),
            }
        })?;
        let data_endpoint = var("JITR_DATA_ENDPOINT");
        if let Some(endpoint) = &data_endpoint {
            let host_like = endpoint.len() <= 253
                && endpoint
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-');
            if !host_like {
                return Err(ConfigError::Invalid {
                    var: "JITR_DATA_ENDPOINT",
                    reason: format!("{endpoint:?} is not a host name"),
                });
            }
        }
        let uuid_parameter =
            var("JITR_FP_UUID_PARAMETER").unwrap_or_else(|| DEFAULT_UUID_PARAMETER.to_owned());
        let attempts_table = var("JITR_PROVISION_TABLE").ok_or(ConfigError::Missing {
            var: "JITR_PROVISION_TABLE",
            hint: "the DynamoDB table of provisioning attempts (key device_id, a string)",
        })?;
        let interval = match var("JITR_PROVISION_INTERVAL") {
            None => DEFAULT_INTERVAL,
            Some(v) => activator::parse_duration(&v)
                .ok()
                .filter(|d| !d.is_zero())
                .ok_or(ConfigError::Invalid {
                    var: "JITR_PROVISION_INTERVAL",
                    reason: format!("{v:?} is not a duration like 10m"),
                })?,
        };
        let services_text =
            var("JITR_PROVISION_SERVICES").unwrap_or_else(|| DEFAULT_SERVICES.to_owned());
        let services: Vec<String> = services_text
            .split(',')
            .map(|s| s.trim().to_owned())
            .collect();
        if let Some(bad) = services
            .iter()
            .find(|s| !crate::request::valid_service_name(s))
        {
            return Err(ConfigError::Invalid {
                var: "JITR_PROVISION_SERVICES",
                reason: format!("{bad:?} is not a service name"),
            });
        }
        let token = match (
            var("JITR_PROVISION_TOKEN"),
            var("JITR_PROVISION_TOKEN_SECRET_ID"),
        ) {
            (Some(_), Some(_)) => {
                return Err(ConfigError::Invalid {
                    var: "JITR_PROVISION_TOKEN",
                    reason: "set it or JITR_PROVISION_TOKEN_SECRET_ID, not both".into(),
                })
            }
            (Some(text), None) => Some(TokenSource::Value(ProvisionToken::parse(&text).map_err(
                |reason| ConfigError::Invalid {
                    var: "JITR_PROVISION_TOKEN",
                    reason,
                },
            )?)),
            (None, Some(id)) => Some(TokenSource::Secret(id)),
            (None, None) => None,
        };
        Ok(Config {
            token,
            services,
            activator,
            ca_key,
            ca_certificate_id,
            topic_prefix,
            data_endpoint,
            uuid_parameter,
            attempts_table,
            interval,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn base() -> HashMap<&'static str, String> {
        HashMap::from([
            ("JITR_CA_CERTIFICATE_ID", "a".repeat(64)),
            ("JITR_POLICY_NAME", "jitr-device".to_owned()),
            ("BALENA_FLEET_ID", "42".to_owned()),
            ("BALENA_API_KEY", "key".to_owned()),
            (
                "JITR_CA_KEY_URI",
                "awskms:key-id=alias/jitr-ca;region=eu-west-1".to_owned(),
            ),
            ("JITR_PROVISION_TABLE", "jitr-provisioning".to_owned()),
        ])
    }

    fn read(vars: &HashMap<&'static str, String>) -> Result<Config, ConfigError> {
        Config::from_lookup(|name| vars.get(name).cloned())
    }

    #[test]
    fn defaults_trust_the_signing_ca_and_use_the_documented_values() {
        let config = read(&base()).unwrap();
        assert_eq!(
            config.activator.policy.trusted_ca_ids,
            vec![config.ca_certificate_id.clone()]
        );
        assert_eq!(config.topic_prefix, "balena");
        assert_eq!(config.uuid_parameter, "DeviceUuid");
        assert_eq!(config.interval, DEFAULT_INTERVAL);
        assert_eq!(config.data_endpoint, None);
        assert_eq!(config.services, vec!["cloud-relay".to_owned()]);
        assert!(config.token.is_none());
    }

    #[test]
    fn the_token_comes_from_the_variable_or_a_secret_never_both() {
        let token = "f".repeat(64);
        let mut vars = base();
        vars.insert("JITR_PROVISION_TOKEN", token);
        assert!(matches!(
            read(&vars).unwrap().token,
            Some(TokenSource::Value(_))
        ));
        vars.insert(
            "JITR_PROVISION_TOKEN_SECRET_ID",
            "jitr/provision-token".into(),
        );
        let e = read(&vars).unwrap_err().to_string();
        assert!(e.starts_with("JITR_PROVISION_TOKEN is invalid"), "{e}");
        vars.remove("JITR_PROVISION_TOKEN");
        assert!(matches!(
            read(&vars).unwrap().token,
            Some(TokenSource::Secret(id)) if id == "jitr/provision-token"
        ));
        vars.remove("JITR_PROVISION_TOKEN_SECRET_ID");
        vars.insert("JITR_PROVISION_TOKEN", "short".into());
        let e = read(&vars).unwrap_err().to_string();
        assert!(
            e.starts_with("JITR_PROVISION_TOKEN is invalid: a token has at least 32"),
            "{e}"
        );
        assert!(!e.contains("short"), "the value is not echoed: {e}");
    }

    #[test]
    fn a_key_file_in_the_cloud_is_refused_naming_the_variable() {
        let mut vars = base();
        vars.insert("JITR_CA_KEY_URI", "/var/task/ca.key".to_owned());
        let e = read(&vars).unwrap_err().to_string();
        assert!(e.starts_with("JITR_CA_KEY_URI is invalid"), "{e}");
        assert!(e.contains("not an AWS KMS key"), "{e}");
    }

    #[test]
    fn each_missing_or_bad_variable_is_named() {
        for (var, value, expected) in [
            (
                "JITR_CA_CERTIFICATE_ID",
                None,
                "JITR_CA_CERTIFICATE_ID is not set",
            ),
            (
                "JITR_CA_CERTIFICATE_ID",
                Some("xyz"),
                "JITR_CA_CERTIFICATE_ID is invalid",
            ),
            (
                "JITR_PROVISION_TABLE",
                None,
                "JITR_PROVISION_TABLE is not set",
            ),
            ("JITR_CA_KEY_URI", None, "JITR_CA_KEY_URI is not set"),
            (
                "JITR_TOPIC_PREFIX",
                Some("a/#"),
                "JITR_TOPIC_PREFIX is invalid",
            ),
            (
                "JITR_DATA_ENDPOINT",
                Some("https://x/"),
                "JITR_DATA_ENDPOINT is invalid",
            ),
            (
                "JITR_PROVISION_INTERVAL",
                Some("soon"),
                "JITR_PROVISION_INTERVAL is invalid",
            ),
            ("JITR_POLICY_NAME", None, "JITR_POLICY_NAME is not set"),
            (
                "JITR_PROVISION_SERVICES",
                Some("relay, a b"),
                "JITR_PROVISION_SERVICES is invalid",
            ),
            ("JITR_FLEET_BACKEND", Some("allowlist"), "JITR_"),
            (
                "JITR_TRUSTED_CA_IDS",
                Some(&"b".repeat(64)),
                "JITR_TRUSTED_CA_IDS is invalid",
            ),
        ] {
            let mut vars = base();
            match value {
                Some(v) => vars.insert(var, v.to_owned()),
                None => vars.remove(var),
            };
            let e = read(&vars).unwrap_err().to_string();
            assert!(e.starts_with(expected), "{var}: {e}");
        }
    }
}
