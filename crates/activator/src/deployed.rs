//! The activator as deployed: the AWS SDK registry and the configured fleet backend, built
//! from [`Config`] (the `adapters` feature).

use crate::balena_directory::{BalenaDirectory, KeySource};
use crate::{
    allowlist, balena_fleet_from_env, dynamodb, Activator, ApiKeySource, Config, ConfigError,
    FleetConfig, FleetDirectory, FleetError, FleetMember, Membership,
};
use iot::{Cause, CertificateId};

/// The fleet directory chosen by `JITR_FLEET_BACKEND`.
#[derive(Debug)]
pub enum FleetBackend {
    /// The balena API (boxed: it is much larger than the allowlist, and built once).
    Balena(Box<BalenaDirectory>),
    /// A static list of device ids.
    Allowlist(allowlist::AllowlistDirectory),
}

impl FleetDirectory for FleetBackend {
    async fn membership(
        &self,
        device: &factory_ca::DeviceId,
        deadline: tokio::time::Instant,
    ) -> Result<Membership, FleetError> {
        match self {
            FleetBackend::Balena(d) => d.membership(device, deadline).await,
            FleetBackend::Allowlist(d) => d.membership(device, deadline).await,
        }
    }

    fn label(&self) -> String {
        match self {
            FleetBackend::Balena(d) => d.label(),
            FleetBackend::Allowlist(d) => d.label(),
        }
    }

    fn mark(&self) -> crate::ownership::FleetMark {
        match self {
            FleetBackend::Balena(d) => d.mark(),
            FleetBackend::Allowlist(d) => d.mark(),
        }
    }

    async fn record_activation(
        &self,
        member: &FleetMember,
        certificate: &CertificateId,
        deadline: tokio::time::Instant,
    ) -> Result<(), Cause> {
        match self {
            FleetBackend::Balena(d) => d.record_activation(member, certificate, deadline).await,
            FleetBackend::Allowlist(d) => d.record_activation(member, certificate, deadline).await,
        }
    }
}

impl FleetBackend {
    /// The directory an operator's command checks the fleet with: the configured backend,
    /// balena through the shell's own key (`BALENA_API_URL`, `BALENA_FLEET_ID`,
    /// `BALENA_API_KEY`), not the deployed function's secret.
    pub fn for_operator(fleet: &FleetConfig) -> Result<FleetBackend, ConfigError> {
        Ok(match fleet {
            FleetConfig::Balena { .. } => {
                FleetBackend::Balena(Box::new(BalenaDirectory::over(balena_fleet_from_env()?)))
            }
            FleetConfig::Allowlist { path } => {
                FleetBackend::Allowlist(allowlist::AllowlistDirectory::load(path)?)
            }
        })
    }

    /// Every device of the fleet with whether it is active (an allowlist's are all active),
    /// `progress` told how many were read so far.
    pub async fn roster(
        &self,
        deadline: tokio::time::Instant,
        progress: &mut (dyn FnMut(usize) + Send),
    ) -> Result<Vec<(String, bool)>, FleetError> {
        match self {
            FleetBackend::Balena(directory) => {
                let fleet = directory.fleet().await.map_err(FleetError)?;
                let devices = fleet
                    .devices(deadline, progress)
                    .await
                    .map_err(|e| FleetError(Box::new(e)))?;
                Ok(devices
                    .into_iter()
                    .map(|d| (d.uuid.to_string(), d.is_active))
                    .collect())
            }
            FleetBackend::Allowlist(list) => {
                Ok(list.ids().map(|id| (id.to_owned(), true)).collect())
            }
        }
    }
}

/// The activator as deployed: AWS IoT through the SDK, and the configured fleet backend.
pub type DeployedActivator = Activator<iot::aws::AwsIotRegistry, FleetBackend>;

/// Builds the deployed activator from configuration: SDK clients and HTTP client, once.
pub async fn build(config: Config) -> Result<DeployedActivator, ConfigError> {
    build_with_sdk(config, &iot::aws::load_sdk_config().await)
}

/// The same over an SDK configuration the caller loaded (the CLI's `--region`/`--endpoint-url`).
pub fn build_with_sdk(
    config: Config,
    sdk: &aws_config::SdkConfig,
) -> Result<DeployedActivator, ConfigError> {
    let registry = iot::aws::AwsIotRegistry::new(sdk);
    let fleet = match &config.fleet {
        FleetConfig::Balena {
            api_url,
            fleet_id,
            api_key,
            write_back,
        } => {
            let key = match api_key {
                ApiKeySource::Literal(key) => KeySource::Literal(key.clone()),
                ApiKeySource::SecretsManager(id) => KeySource::SecretsManager {
                    client: aws_sdk_secretsmanager::Client::new(sdk),
                    secret_id: id.clone(),
                },
            };
            FleetBackend::Balena(Box::new(
                BalenaDirectory::new(api_url, *fleet_id, key)?.with_write_back(*write_back),
            ))
        }
        FleetConfig::Allowlist { path } => {
            FleetBackend::Allowlist(allowlist::AllowlistDirectory::load(path)?)
        }
    };
    let activator = Activator::new(registry, fleet, config.policy);
    Ok(match &config.ledger {
        Some(ledger) => activator.with_ledger(
            Box::new(dynamodb::DynamoLedger::new(sdk, &ledger.table)),
            ledger.mode,
        ),
        None => activator,
    })
}
