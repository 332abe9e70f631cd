//! Certificates for balena devices that leave the factory without one, signed by the fleet's
//! own CA in AWS KMS and activated by the same decision as every JIT-registered certificate.
//!
//! One Lambda binary, `provisioner`, answers three events:
//!
//! - **cloud-relay's `PROVISION_URL`** ([`request`], [`Provisioner::provision`]), through a
//!   function URL: the URL's token first when one is configured (else the same 403 as a
//!   stranger gets); an undo an earlier attempt left unfinished is finished; the device must
//!   be an active member of the pinned fleet, its Thing without the revocation mark, and have
//!   no ACTIVE certificate; one attempt per device per interval ([`attempts`]); the key and certificate
//!   are made here, the certificate registered PENDING_ACTIVATION, the variables written to the
//!   device's service through balena, and only then the activator's decision activates it.
//!   The answer never carries key material: the key reaches only the device.
//! - **the fleet provisioning pre-provisioning hook** ([`fleet_provisioning`]): allows
//!   `RegisterThing` only for an active fleet member with no ACTIVE certificate and no
//!   revocation mark, within 4 s.
//! - **the certificate provider** for `CreateCertificateFromCsr` ([`fleet_provisioning`]):
//!   signs the device's CSR with the KMS CA, to the device profile, only for the same devices
//!   the hook allows.

mod attempts;
mod config;
pub mod fleet_provisioning;
mod provision;
mod request;

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use activator::{DeployedActivator, FleetBackend};
use factory_ca::{Ca, KeyAlgorithm};
use iot::{CertificateId, IotAdmin, IotRegistry, RegistryError};
use serde_json::Value;
use tokio::time::Instant;

pub use attempts::{Attempts, Claim};
pub use config::{Config, ConfigError, TokenSource};
pub use request::{HttpRequest, HttpResponse, ProvisionRequest, ProvisionToken};

/// The event kinds the binary answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    /// A function URL request (payload format 2.0): cloud-relay's provisioning POST.
    FunctionUrl,
    /// AWS IoT fleet provisioning's pre-provisioning hook.
    PreProvisioningHook,
    /// AWS IoT's certificate provider request (`CreateCertificateFromCsr`).
    CertificateProvider,
}

impl EventKind {
    /// Which of the three `event` is, by the fields each documented shape carries.
    pub fn of(event: &Value) -> Option<EventKind> {
        if HttpRequest::matches(event) {
            Some(EventKind::FunctionUrl)
        } else if event["certificateSigningRequest"].is_string() {
            Some(EventKind::CertificateProvider)
        } else if event["claimCertificateId"].is_string() || event["templateArn"].is_string() {
            Some(EventKind::PreProvisioningHook)
        } else {
            None
        }
    }
}

/// Why the provisioner cannot start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A variable.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The activator's adapters.
    #[error(transparent)]
    Activator(#[from] activator::ConfigError),
    /// The KMS key.
    #[error("JITR_CA_KEY_URI: {0}")]
    Key(#[from] ca_keys::Error),
    /// The CA as AWS IoT knows it.
    #[error("JITR_CA_CERTIFICATE_ID {id}: {reason}")]
    Ca {
        /// The CA id.
        id: CertificateId,
        /// Why.
        reason: String,
    },
    /// The token's secret could not be read, or does not hold a token.
    #[error("JITR_PROVISION_TOKEN_SECRET_ID {id}: {reason}")]
    Token {
        /// The secret's name or ARN.
        id: String,
        /// Why.
        reason: String,
    },
    /// The data endpoint could not be asked.
    #[error("cannot ask AWS IoT for the data endpoint (set JITR_DATA_ENDPOINT to skip it): {0}")]
    Endpoint(String),
}

/// The provisioner, built once per container.
#[derive(Debug)]
pub struct Provisioner {
    activator: DeployedActivator,
    ca: Arc<Ca>,
    ca_id: CertificateId,
    attempts: Attempts,
    token: Option<ProvisionToken>,
    endpoint: String,
    topic_prefix: String,
    uuid_parameter: String,
    services: Vec<String>,
    key: KeyAlgorithm,
    days: u32,
}

/// Seconds since the epoch.
pub(crate) fn epoch_seconds() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// How long the cold start may spend on AWS calls.
const START_TIME: Duration = Duration::from_secs(10);
/// How long one KMS signature may take, throttling included: well inside an invocation.
const SIGN_TIMEOUT: Duration = Duration::from_secs(5);

impl Provisioner {
    /// Builds the provisioner: the activator's adapters, the KMS key (checked to be the CA
    /// certificate's), the CA certificate from AWS IoT, the data endpoint.
    pub async fn build(config: Config) -> Result<Provisioner, StartError> {
        let sdk = iot::aws::load_sdk_config().await;
        let activator = activator::build_with_sdk(config.activator.clone(), &sdk)?;
        let deadline = Instant::now() + START_TIME;
        let ca_id = config.ca_certificate_id.clone();
        let ca_error = |reason: String| StartError::Ca {
            id: ca_id.clone(),
            reason,
        };
        let description = activator
            .registry()
            .describe_ca_certificate(&ca_id, deadline)
            .await
            .map_err(|e| ca_error(iot::error_chain(&e)))?;
        if description.status.as_deref() != Some("ACTIVE") {
            return Err(ca_error(format!(
                "the CA is {} in AWS IoT, not ACTIVE",
                description.status.as_deref().unwrap_or("of unknown status")
            )));
        }
        let uri = config.ca_key.clone();
        // Opening a KMS key blocks (DescribeKey, GetPublicKey on the key's own runtime).
        let key = tokio::task::spawn_blocking(move || {
            let options = ca_keys::Options {
                sign_timeout: SIGN_TIMEOUT,
                ..ca_keys::Options::default()
            };
            ca_keys::open(&uri, &options)
        })
        .await
        .map_err(|e| ca_error(format!("opening the key panicked: {e}")))??;
        let policy = &config.activator.policy;
        let mut profile = factory_ca::Profile::default();
        profile.device.id_format = policy.id_format;
        profile.device.max_days = profile.device.max_days.min(policy.max_validity_days);
        profile.device.days = profile.device.days.min(profile.device.max_days);
        let (key_algorithm, days) = (profile.device.key, profile.device.days);
        let ca = Ca::from_certificate(&description.pem, key, profile)
            .map_err(|e| ca_error(e.to_string()))?;
        let endpoint = match config.data_endpoint {
            Some(endpoint) => endpoint,
            None => activator
                .registry()
                .describe_endpoint("iot:Data-ATS", deadline)
                .await
                .map_err(|e| StartError::Endpoint(iot::error_chain(&e)))?,
        };
        let token = match config.token {
            None => None,
            Some(TokenSource::Value(token)) => Some(token),
            Some(TokenSource::Secret(id)) => Some(read_token(&sdk, &id, deadline).await?),
        };
        if token.is_none() {
            tracing::warn!("no JITR_PROVISION_TOKEN: any caller of the URL can tell a fleet member from a stranger by the answer");
        }
        Ok(Provisioner {
            token,
            attempts: Attempts::new(&sdk, &config.attempts_table, config.interval),
            activator,
            ca: Arc::new(ca),
            ca_id,
            endpoint,
            topic_prefix: config.topic_prefix,
            uuid_parameter: config.uuid_parameter,
            services: config.services,
            key: key_algorithm,
            days,
        })
    }

    /// The pinned balena fleet (the configuration admits no other backend).
    async fn balena(&self) -> Result<&balena::Fleet, String> {
        match self.activator.fleet() {
            FleetBackend::Balena(directory) => directory
                .fleet()
                .await
                .map_err(|e| iot::error_chain(e.as_ref())),
            FleetBackend::Allowlist(_) => Err("the fleet backend is not balena".into()),
        }
    }

    /// The ACTIVE certificates attached to the device's Thing.
    async fn active_certificates(
        &self,
        device: &factory_ca::DeviceId,
        deadline: Instant,
    ) -> Result<Vec<CertificateId>, RegistryError> {
        activator::ownership::active_attached(self.activator.registry(), device.as_str(), deadline)
            .await
    }

    /// The ACTIVE or PENDING_ACTIVATION certificates attached to the device's Thing: any of
    /// them is, or may become, its identity.
    async fn live_certificates(
        &self,
        device: &factory_ca::DeviceId,
        deadline: Instant,
    ) -> Result<Vec<CertificateId>, RegistryError> {
        activator::ownership::attached_where(
            self.activator.registry(),
            device.as_str(),
            deadline,
            |status| {
                matches!(
                    status,
                    iot::CertificateStatus::Active | iot::CertificateStatus::PendingActivation
                )
            },
        )
        .await
    }

    /// Revokes `id` (unless it is REVOKED already) and detaches it from the device's Thing if
    /// it is attached: safe to run again. A certificate AWS IoT does not know is done.
    pub(crate) async fn retract(
        &self,
        id: &CertificateId,
        device: &factory_ca::DeviceId,
        deadline: Instant,
    ) -> Result<(), RegistryError> {
        let registry = self.activator.registry();
        let described = match registry.describe_certificate(id, deadline).await {
            Ok(described) => described,
            Err(e) if e.is_not_found() => return Ok(()),
            Err(e) => return Err(e),
        };
        if described.status != iot::CertificateStatus::Revoked {
            registry
                .set_certificate_status(id, iot::CertificateStatus::Revoked, deadline)
                .await?;
        }
        match registry.thing_principals(device.as_str(), deadline).await {
            Ok(principals) if principals.contains(&described.arn) => {
                registry
                    .detach_thing_principal(device.as_str(), &described.arn, deadline)
                    .await
            }
            Ok(_) => Ok(()),
            Err(e) if e.is_not_found() => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// When the device's Thing carries the revocation mark (`jitr revoke --id` left it), the
    /// mark's value; `None` for no mark or no Thing.
    async fn revoked_mark(
        &self,
        device: &factory_ca::DeviceId,
        deadline: Instant,
    ) -> Result<Option<String>, RegistryError> {
        let thing = self
            .activator
            .registry()
            .describe_thing(device.as_str(), deadline)
            .await?;
        Ok(thing
            .as_ref()
            .and_then(activator::ownership::revoked_mark)
            .map(str::to_owned))
    }
}

/// The token a Secrets Manager secret holds (its `SecretString`, trimmed), by `deadline`.
async fn read_token(
    sdk: &aws_config::SdkConfig,
    id: &str,
    deadline: Instant,
) -> Result<ProvisionToken, StartError> {
    let error = |reason: String| StartError::Token {
        id: id.to_owned(),
        reason,
    };
    let client = aws_sdk_secretsmanager::Client::new(sdk);
    let read = client.get_secret_value().secret_id(id).send();
    let out = tokio::time::timeout_at(deadline, read)
        .await
        .map_err(|_| error("no answer from Secrets Manager in time".into()))?
        .map_err(|e| error(aws_sdk_secretsmanager::error::DisplayErrorContext(&e).to_string()))?;
    let text = out
        .secret_string()
        .ok_or_else(|| error("the secret has no SecretString".into()))?;
    ProvisionToken::parse(text.trim()).map_err(error)
}

/// Registers `pem` under the CA, PENDING_ACTIVATION: nothing can connect with it yet.
async fn register_pending<R: IotAdmin>(
    registry: &R,
    pem: &str,
    ca_pem: &str,
    deadline: Instant,
) -> Result<CertificateId, RegistryError> {
    registry
        .register_certificate(
            pem,
            ca_pem,
            iot::CertificateStatus::PendingActivation,
            deadline,
        )
        .await
}
