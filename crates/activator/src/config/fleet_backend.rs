//! The fleet backend: `JITR_FLEET_BACKEND` and its settings (`BALENA_*`, `JITR_ALLOWLIST`,
//! `JITR_BALENA_WRITE_BACK`).

use std::path::PathBuf;

use balena::{ApiKey, FleetId};
use factory_ca::IdFormat;

use super::Env;
use crate::ConfigError;

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
        /// `BALENA_API_URL`, validated.
        api_url: String,
        /// `BALENA_FLEET_ID`.
        fleet_id: FleetId,
        /// `BALENA_API_KEY` or `BALENA_API_KEY_SECRET_ID`.
        api_key: ApiKeySource,
        /// `JITR_BALENA_WRITE_BACK`.
        write_back: WriteBack,
    },
    /// `JITR_FLEET_BACKEND=allowlist`.
    Allowlist {
        /// `JITR_ALLOWLIST`.
        path: PathBuf,
    },
}

impl FleetConfig {
    /// The fleet, as the Thing's fleet attribute records it ([`crate::ownership::fleet_attribute`]).
    pub fn mark(&self) -> crate::ownership::FleetMark {
        match self {
            FleetConfig::Balena { fleet_id, .. } => {
                crate::ownership::FleetMark::Balena(fleet_id.get())
            }
            FleetConfig::Allowlist { .. } => crate::ownership::FleetMark::Allowlist,
        }
    }

    /// Reads the backend; `id_format` is the policy's (balena needs balena UUIDs).
    pub(super) fn read(env: &Env<'_>, id_format: IdFormat) -> Result<FleetConfig, ConfigError> {
        let write_back = match env.get("JITR_BALENA_WRITE_BACK").as_deref() {
            None => WriteBack::Off,
            Some("tag") => WriteBack::Tags,
            Some(other) => {
                return Err(ConfigError::invalid(
                    "JITR_BALENA_WRITE_BACK",
                    format!("{other:?}: expected tag, or leave it unset"),
                ))
            }
        };
        match env.get("JITR_FLEET_BACKEND").as_deref() {
            None | Some("balena") => {
                if id_format != IdFormat::BalenaUuid {
                    return Err(ConfigError::invalid(
                        "JITR_ID_FORMAT",
                        "the balena backend needs balena-uuid device ids",
                    ));
                }
                Ok(FleetConfig::Balena {
                    api_url: balena_api_url(env)?,
                    fleet_id: balena_fleet_id(env)?,
                    api_key: api_key_source(env)?,
                    write_back,
                })
            }
            Some("allowlist") => {
                if write_back != WriteBack::Off {
                    return Err(ConfigError::invalid(
                        "JITR_BALENA_WRITE_BACK",
                        "writing back to balena needs JITR_FLEET_BACKEND=balena",
                    ));
                }
                let path = env.required(ALLOWLIST.0, ALLOWLIST.1)?;
                Ok(FleetConfig::Allowlist {
                    path: PathBuf::from(path),
                })
            }
            Some(other) => Err(ConfigError::invalid(
                "JITR_FLEET_BACKEND",
                format!("{other:?}: expected balena or allowlist"),
            )),
        }
    }
}

/// `BALENA_FLEET_ID`, required with the balena backend, and what it holds.
pub(super) const FLEET_ID: (&str, &str) = (
    "BALENA_FLEET_ID",
    "the numeric id of the balena fleet devices must belong to",
);
/// `BALENA_API_KEY` (or `BALENA_API_KEY_SECRET_ID`), required with the balena backend.
pub(super) const API_KEY: (&str, &str) = (
    "BALENA_API_KEY",
    "set BALENA_API_KEY or BALENA_API_KEY_SECRET_ID",
);
/// `JITR_ALLOWLIST`, required with the allowlist backend.
pub(super) const ALLOWLIST: (&str, &str) = (
    "JITR_ALLOWLIST",
    "a file of device ids, one per line, for JITR_FLEET_BACKEND=allowlist",
);

/// `BALENA_API_URL` (default balenaCloud's), validated: https, or http to loopback only.
pub(crate) fn balena_api_url(env: &Env<'_>) -> Result<String, ConfigError> {
    let url = env
        .get("BALENA_API_URL")
        .unwrap_or_else(|| balena::DEFAULT_API_URL.to_owned());
    balena::validate_api_url(&url).map_err(|reason| ConfigError::invalid("BALENA_API_URL", reason))
}

/// `BALENA_FLEET_ID`, required.
pub(crate) fn balena_fleet_id(env: &Env<'_>) -> Result<FleetId, ConfigError> {
    let id = env.required(FLEET_ID.0, FLEET_ID.1)?;
    FleetId::parse(&id).map_err(|r| ConfigError::invalid("BALENA_FLEET_ID", r))
}

/// `BALENA_API_KEY`, else `BALENA_API_KEY_SECRET_ID`.
fn api_key_source(env: &Env<'_>) -> Result<ApiKeySource, ConfigError> {
    match (
        env.get("BALENA_API_KEY"),
        env.get("BALENA_API_KEY_SECRET_ID"),
    ) {
        (Some(key), _) => Ok(ApiKeySource::Literal(ApiKey::new(key))),
        (None, Some(id)) => Ok(ApiKeySource::SecretsManager(id)),
        (None, None) => Err(ConfigError::Missing {
            var: API_KEY.0,
            hint: API_KEY.1,
        }),
    }
}
