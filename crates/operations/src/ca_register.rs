//! Registering the fleet CA in AWS IoT (`jitr ca register`): DescribeCACertificate first (a CA
//! registered before is reported, not an error), else GetRegistrationCode, the verification
//! certificate signed by the CA's key, and RegisterCACertificate, active and with
//! auto-registration on. A registration that races another still ends "already registered".
//!
//! AWS IoT lets one account per region hold a CA in DEFAULT mode, and any number of accounts
//! in SNI_ONLY mode. When RegisterCACertificate (DEFAULT) answers that the CA already exists
//! while DescribeCACertificate, asked again, still finds nothing in this account, another
//! account holds it: the CA is then registered SNI_ONLY, and the result says so.

use factory_ca::Ca;
use time::OffsetDateTime;
use tokio::time::Instant;

use iot::CaRegistrationMode;
use iot::{call_deadline, CertificateId, IotAdmin, RegistryError};

/// What AWS IoT holds for the CA once registration is done.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registration {
    /// The caCertificateId.
    pub id: String,
    /// The CA certificate's ARN, when AWS said it.
    pub arn: Option<String>,
    /// True when the CA was registered before this run.
    pub already: bool,
    /// ACTIVE / INACTIVE, when known.
    pub status: Option<String>,
    /// ENABLE / DISABLE, when known.
    pub auto_registration: Option<String>,
    /// True when DEFAULT mode was refused because another account holds the CA in this
    /// region, and the CA was registered SNI_ONLY instead.
    pub sni_only_fallback: bool,
}

/// Why registration failed.
#[derive(Debug, thiserror::Error)]
pub enum RegistrationError {
    /// An AWS IoT call failed.
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// The verification certificate could not be made.
    #[error("cannot build the verification certificate")]
    Verification(#[source] factory_ca::Error),
}

/// Registers `ca_pem` (whose SHA-256 id is `expected_id`). With `ca`, in DEFAULT mode with a
/// verification certificate signed by its key, or SNI_ONLY where another account holds the CA
/// in DEFAULT mode (`sni_only_fallback`); without `ca`, SNI_ONLY. Each call is bounded by
/// [`iot::OPERATOR_CALL_TIME`] and the whole by `deadline`.
pub async fn register_ca<A: IotAdmin>(
    iot: &A,
    ca: Option<&Ca>,
    ca_pem: &str,
    expected_id: &CertificateId,
    deadline: Instant,
) -> Result<Registration, RegistrationError> {
    match iot
        .describe_ca_certificate(expected_id, call_deadline(deadline))
        .await
    {
        Ok(described) => {
            return Ok(Registration {
                id: described.id.to_string(),
                arn: described.arn,
                already: true,
                status: described.status,
                auto_registration: described.auto_registration,
                sni_only_fallback: false,
            })
        }
        Err(e) if e.is_not_found() => {}
        Err(e) => return Err(e.into()),
    }
    match register_in_mode(iot, ca, ca_pem, expected_id, deadline).await? {
        Registered::Done(registration) => Ok(registration),
        Registered::HeldByAnotherAccount => {
            match register_in_mode(iot, None, ca_pem, expected_id, deadline).await? {
                Registered::Done(registration) => Ok(Registration {
                    sni_only_fallback: true,
                    ..registration
                }),
                // SNI_ONLY attempts never answer this (see register_in_mode).
                Registered::HeldByAnotherAccount => Err(RegistryError::failed(
                    "RegisterCACertificate",
                    "the CA is held by another account even in SNI_ONLY mode",
                )
                .into()),
            }
        }
    }
}

/// How one RegisterCACertificate attempt ended.
enum Registered {
    /// Registered now, or found registered in this account.
    Done(Registration),
    /// DEFAULT mode refused as existing, yet DescribeCACertificate finds nothing in this
    /// account: another account holds the CA in this region.
    HeldByAnotherAccount,
}

/// One registration in DEFAULT mode (with `ca`) or SNI_ONLY (without).
async fn register_in_mode<A: IotAdmin>(
    iot: &A,
    ca: Option<&Ca>,
    ca_pem: &str,
    expected_id: &CertificateId,
    deadline: Instant,
) -> Result<Registered, RegistrationError> {
    let mode = match ca {
        None => CaRegistrationMode::SniOnly,
        Some(ca) => {
            let code = iot.registration_code(call_deadline(deadline)).await?;
            let verification_pem = ca
                .verification_certificate(&code, OffsetDateTime::now_utc())
                .map_err(RegistrationError::Verification)?;
            CaRegistrationMode::Verified { verification_pem }
        }
    };
    match iot
        .register_ca_certificate(ca_pem, &mode, call_deadline(deadline))
        .await
    {
        Ok((id, arn)) => Ok(Registered::Done(Registration {
            id,
            arn,
            already: false,
            status: Some("ACTIVE".to_owned()),
            auto_registration: Some("ENABLE".to_owned()),
            sni_only_fallback: false,
        })),
        // SNI_ONLY is open to every account: an existing CA can only be this account's.
        Err(RegistryError::AlreadyExists { resource_id, .. }) if ca.is_none() => {
            Ok(Registered::Done(Registration {
                id: resource_id.unwrap_or_else(|| expected_id.to_string()),
                arn: None,
                already: true,
                status: None,
                auto_registration: None,
                sni_only_fallback: false,
            }))
        }
        Err(RegistryError::AlreadyExists { .. }) => {
            // A registration racing ours in this account, or the CA held by another account.
            match iot
                .describe_ca_certificate(expected_id, call_deadline(deadline))
                .await
            {
                Ok(described) => Ok(Registered::Done(Registration {
                    id: described.id.to_string(),
                    arn: described.arn,
                    already: true,
                    status: described.status,
                    auto_registration: described.auto_registration,
                    sni_only_fallback: false,
                })),
                Err(e) if e.is_not_found() => Ok(Registered::HeldByAnotherAccount),
                Err(e) => Err(e.into()),
            }
        }
        Err(e) => Err(e.into()),
    }
}
