//! The JITR activation decision for AWS IoT Core, its ports and their adapters.
//!
//! One invocation takes the `$aws/events/certificates/registered/<caId>` event, proves the
//! certificate is ours (trusted CA, signature, validity, device profile, device id), checks
//! fleet membership, then creates the Thing and attaches policy and principal, and activates
//! the certificate last. The Lambda (`bootstrap`) and `jitr reconcile` both run this code
//! with the same configuration.

pub mod allowlist;
pub mod aws;
pub mod balena;
mod config;
mod decision;
mod error;
mod event;
mod ids;
mod incoming;
mod ports;

pub use config::{
    ApiKey, ApiKeySource, Config, ConfigError, FleetConfig, Policy, RejectAction, WriteBack,
};
pub use decision::{Activator, Decision, Outcome, SweepReport, SWEEP_DECISION_TIME};
pub use error::{error_chain, ActivationError};
pub use event::{EventError, RegisteredEvent};
pub use ids::{AccountId, CertificateId, FleetId};
pub use incoming::{Incoming, ReplayRecord};
pub use ports::{
    Cause, CertificateDescription, CertificatePage, CertificateStatus, FleetDirectory, FleetError,
    IotRegistry, ListedCertificate, Membership, RegistryError, ThingSpec,
};

/// The fleet directory chosen by `JITR_FLEET_BACKEND`.
#[derive(Debug)]
pub enum FleetBackend {
    /// The balena API (boxed: it is much larger than the allowlist, and built once).
    Balena(Box<balena::BalenaDirectory>),
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

    async fn record_activation(
        &self,
        device: &factory_ca::DeviceId,
        certificate: &CertificateId,
        deadline: tokio::time::Instant,
    ) -> Result<(), Cause> {
        match self {
            FleetBackend::Balena(d) => d.record_activation(device, certificate, deadline).await,
            FleetBackend::Allowlist(d) => d.record_activation(device, certificate, deadline).await,
        }
    }
}

/// The activator as deployed: AWS IoT through the SDK, and the configured fleet backend.
pub type DeployedActivator = Activator<aws::AwsIotRegistry, FleetBackend>;

/// Builds the deployed activator from configuration: SDK clients and HTTP client, once.
pub async fn build(config: Config) -> Result<DeployedActivator, ConfigError> {
    build_with_sdk(config, &aws::load_sdk_config().await)
}

/// The same over an SDK configuration the caller loaded (the CLI's `--region`/`--endpoint-url`).
pub fn build_with_sdk(
    config: Config,
    sdk: &aws_config::SdkConfig,
) -> Result<DeployedActivator, ConfigError> {
    let registry = aws::AwsIotRegistry::new(sdk);
    let fleet = match &config.fleet {
        FleetConfig::Balena {
            api_url,
            fleet_id,
            api_key,
            write_back,
        } => {
            let key = match api_key {
                ApiKeySource::Literal(key) => balena::KeySource::Literal(key.clone()),
                ApiKeySource::SecretsManager(id) => balena::KeySource::SecretsManager {
                    client: aws_sdk_secretsmanager::Client::new(sdk),
                    secret_id: id.clone(),
                },
            };
            FleetBackend::Balena(Box::new(
                balena::BalenaDirectory::new(api_url, *fleet_id, key)?.with_write_back(*write_back),
            ))
        }
        FleetConfig::Allowlist { path } => {
            FleetBackend::Allowlist(allowlist::AllowlistDirectory::load(path)?)
        }
    };
    Ok(Activator::new(registry, fleet, config.policy))
}
