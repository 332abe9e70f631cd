//! The balena [`FleetDirectory`]: the fleet check and the activation write-back through the
//! `balena` crate's one client, pinned to `BALENA_FLEET_ID`. The API key is the literal
//! `BALENA_API_KEY`, or fetched from Secrets Manager on first use and kept for the
//! container's life.

use std::time::Duration;

use factory_ca::DeviceId;
use tokio::sync::OnceCell;
use tokio::time::Instant;

use balena::{ApiKey, Fleet, FleetId};

use crate::config::WriteBack;
use crate::{FleetDirectory, FleetError, FleetMember, Membership};
use iot::{Cause, CertificateId};

/// How long one HTTP request of the fleet check may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Time kept back from the deadline for the provisioning calls after the fleet check.
const DEADLINE_RESERVE: Duration = Duration::from_secs(3);
/// Time kept back from the deadline when writing tags back, so the invocation still answers.
const WRITE_BACK_RESERVE: Duration = Duration::from_secs(1);
/// The tag holding the Thing name.
pub const TAG_THING: &str = "aws_iot_thing";
/// The tag holding the AWS IoT certificate id.
pub const TAG_CERTIFICATE_ID: &str = "aws_iot_certificate_id";

/// Where the API key comes from.
#[derive(Debug)]
pub enum KeySource {
    /// The key itself.
    Literal(ApiKey),
    /// A Secrets Manager secret, fetched on first use and cached for the container's life.
    SecretsManager {
        /// The client.
        client: aws_sdk_secretsmanager::Client,
        /// The secret's id or ARN.
        secret_id: String,
    },
}

/// Why the API key could not be had.
#[derive(Debug, thiserror::Error)]
#[error("cannot fetch the balena API key from Secrets Manager")]
struct SecretError(#[source] Cause);

/// Fleet membership from the balena API, pinned to one numeric fleet id.
#[derive(Debug)]
pub struct BalenaDirectory {
    api_url: String,
    fleet_id: FleetId,
    /// `None` for a directory over a fleet built already ([`BalenaDirectory::over`]).
    key_source: Option<KeySource>,
    fleet: OnceCell<Fleet>,
    write_back: WriteBack,
    request_timeout: Duration,
}

impl BalenaDirectory {
    /// A directory for `fleet_id` at `api_url` (validated when the client is built).
    pub fn new(
        api_url: &str,
        fleet_id: FleetId,
        key_source: KeySource,
    ) -> Result<Self, balena::Error> {
        // Fail at start on a bad URL, not at the first event.
        balena::validate_api_url(api_url).map_err(|reason| balena::Error::InvalidUrl {
            url: api_url.to_owned(),
            reason,
        })?;
        Ok(BalenaDirectory {
            api_url: api_url.to_owned(),
            fleet_id,
            key_source: Some(key_source),
            fleet: OnceCell::new(),
            write_back: WriteBack::Off,
            request_timeout: REQUEST_TIMEOUT,
        })
    }

    /// A directory over `fleet`, whose client is built already: an operator's command, with
    /// the shell's own key ([`crate::balena_fleet_from_env`]).
    pub fn over(fleet: Fleet) -> Self {
        BalenaDirectory {
            api_url: fleet.client().api_url().to_owned(),
            fleet_id: fleet.id(),
            key_source: None,
            fleet: OnceCell::new_with(Some(fleet)),
            write_back: WriteBack::Off,
            request_timeout: REQUEST_TIMEOUT,
        }
    }

    /// The same directory recording activations on the device as `write_back` says.
    pub fn with_write_back(mut self, write_back: WriteBack) -> Self {
        self.write_back = write_back;
        self
    }

    /// The same directory with another per-request timeout (default 5 s).
    pub fn with_request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// The pinned fleet, its client built with the key on first use.
    pub async fn fleet(&self) -> Result<&Fleet, Cause> {
        self.fleet
            .get_or_try_init(|| async {
                let key = match &self.key_source {
                    // A directory made `over` a fleet has it from the start.
                    None => return Err::<Fleet, Cause>("no balena API key".into()),
                    Some(KeySource::Literal(key)) => key.clone(),
                    Some(KeySource::SecretsManager { client, secret_id }) => {
                        let out = client
                            .get_secret_value()
                            .secret_id(secret_id)
                            .send()
                            .await
                            .map_err(|e| SecretError(Box::new(e)))?;
                        let text = out
                            .secret_string()
                            .ok_or_else(|| SecretError("the secret has no SecretString".into()))?;
                        ApiKey::new(secret_text_to_key(text))
                    }
                };
                let client = balena::Client::new(&self.api_url, key)?
                    .with_request_timeout(self.request_timeout);
                Ok::<_, Cause>(Fleet::new(client, self.fleet_id))
            })
            .await
    }
}

/// A secret holds the key as plain text or as JSON `{"BALENA_API_KEY": "..."}` / `{"apiKey": "..."}`.
fn secret_text_to_key(text: &str) -> String {
    if let Ok(serde_json::Value::Object(map)) = serde_json::from_str::<serde_json::Value>(text) {
        for name in ["BALENA_API_KEY", "apiKey", "api_key"] {
            if let Some(serde_json::Value::String(key)) = map.get(name) {
                return key.trim().to_owned();
            }
        }
    }
    text.trim().to_owned()
}

impl FleetDirectory for BalenaDirectory {
    async fn membership(
        &self,
        device: &DeviceId,
        deadline: Instant,
    ) -> Result<Membership, FleetError> {
        let fleet = self.fleet().await.map_err(FleetError)?;
        let deadline = deadline
            .checked_sub(DEADLINE_RESERVE)
            .unwrap_or_else(Instant::now);
        match fleet.membership(device, deadline).await {
            Ok(balena::FleetMembership::Member(d)) => Ok(Membership::Member(FleetMember {
                device: d.uuid,
                handle: Some(d.id),
            })),
            Ok(balena::FleetMembership::Inactive(_)) => Ok(Membership::Inactive),
            Ok(balena::FleetMembership::NotMember) => Ok(Membership::NotMember),
            Err(e) => Err(FleetError(Box::new(e))),
        }
    }

    fn label(&self) -> String {
        format!("balena fleet {}", self.fleet_id)
    }

    fn mark(&self) -> crate::ownership::FleetMark {
        crate::ownership::FleetMark::Balena(self.fleet_id.get())
    }

    async fn record_activation(
        &self,
        member: &FleetMember,
        certificate: &CertificateId,
        deadline: Instant,
    ) -> Result<(), Cause> {
        if self.write_back == WriteBack::Off {
            return Ok(());
        }
        let deadline = deadline
            .checked_sub(WRITE_BACK_RESERVE)
            .unwrap_or_else(Instant::now);
        let fleet = self.fleet().await?;
        let device = match member.handle {
            Some(id) => balena::Device {
                id,
                uuid: member.device.clone(),
                is_active: true,
            },
            None => fleet
                .device(&member.device, deadline)
                .await?
                .ok_or_else(|| {
                    format!(
                        "balena fleet {} has no device {}",
                        self.fleet_id, member.device
                    )
                })?,
        };
        let thing = fleet.set_tag(&device, TAG_THING, member.device.as_str(), deadline);
        let cert = fleet.set_tag(&device, TAG_CERTIFICATE_ID, certificate.as_str(), deadline);
        let (thing, cert) = tokio::join!(thing, cert);
        thing.map_err(|e| format!("tag {TAG_THING}: {}", iot::error_chain(&e)))?;
        cert.map_err(|e| format!("tag {TAG_CERTIFICATE_ID}: {}", iot::error_chain(&e)))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_may_be_plain_or_json() {
        assert_eq!(secret_text_to_key("abc\n"), "abc");
        assert_eq!(secret_text_to_key(r#"{"BALENA_API_KEY":"xyz"}"#), "xyz");
        assert_eq!(secret_text_to_key(r#"{"apiKey":"k"}"#), "k");
    }
}
