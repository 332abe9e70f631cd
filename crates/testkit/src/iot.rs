//! AWS IoT against a [`MotoServer`]: the client tests use, and the steps every scenario
//! repeats (a CA registered, a device policy, a device's first connect, its registered event).

use anyhow::{Context, Result};
use aws_sdk_iot::config::{BehaviorVersion, Credentials, Region};
use aws_sdk_iot::types::CertificateStatus;
use aws_sdk_iot::Client;

use crate::moto::{MotoServer, ACCOUNT_ID, REGION};

/// SDK configuration for `moto`: test credentials, no SDK retries (moto answers bad input
/// with HTTP 500, and retrying that only slows a failing test down). The activator's own
/// registry adapter retries 5xx whatever this says, until the deadline it is given.
pub async fn sdk_config(moto: &MotoServer) -> aws_config::SdkConfig {
    sdk_config_for(&moto.endpoint()).await
}

/// The same configuration for another endpoint (a proxy in front of moto).
pub async fn sdk_config_for(endpoint: &str) -> aws_config::SdkConfig {
    aws_config::defaults(BehaviorVersion::latest())
        .endpoint_url(endpoint)
        .region(Region::new(REGION))
        .credentials_provider(Credentials::new(
            "testing", "testing", None, None, "testkit",
        ))
        .retry_config(aws_config::retry::RetryConfig::disabled())
        .load()
        .await
}

/// An AWS IoT client for `moto`, configured as [`sdk_config`].
pub async fn client(moto: &MotoServer) -> Client {
    Client::new(&sdk_config(moto).await)
}

/// Creates an IoT policy allowing `iot:Connect`, as the device policy stand-in.
pub async fn create_policy(client: &Client, name: &str) -> Result<()> {
    let doc = serde_json::json!({"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "iot:Connect", "Resource": "*"}]});
    client
        .create_policy()
        .policy_name(name)
        .policy_document(doc.to_string())
        .send()
        .await
        .context("CreatePolicy")?;
    Ok(())
}

/// The device policy jitr deploys (`rules/device-policy.json`, the one source the template
/// embeds) as AWS IoT holds it: the template's variables filled in for moto's account and
/// region, device topics under `topic_prefix`.
pub fn device_policy(topic_prefix: &str) -> String {
    include_str!("../../../rules/device-policy.json")
        .replace("${AWS::Partition}", "aws")
        .replace("${AWS::Region}", REGION)
        .replace("${AWS::AccountId}", ACCOUNT_ID)
        .replace("${TopicPrefix}", topic_prefix)
}

/// Creates the device policy ([`device_policy`]) as `name`.
pub async fn create_device_policy(client: &Client, name: &str, topic_prefix: &str) -> Result<()> {
    client
        .create_policy()
        .policy_name(name)
        .policy_document(device_policy(topic_prefix))
        .send()
        .await
        .context("CreatePolicy")?;
    Ok(())
}

/// Registers `ca_pem` as an active CA with auto-registration on; returns its id.
pub async fn register_ca(client: &Client, ca_pem: &str) -> Result<String> {
    let out = client
        .register_ca_certificate()
        .ca_certificate(ca_pem)
        .set_as_active(true)
        .allow_auto_registration(true)
        .send()
        .await
        .context("RegisterCACertificate")?;
    out.certificate_id()
        .map(str::to_owned)
        .context("no caCertificateId")
}

/// What AWS IoT does on a device's first connect: registers the certificate
/// PENDING_ACTIVATION under its CA (moto links them only when `ca_pem` matches byte for byte).
pub async fn first_connect(client: &Client, device_pem: &str, ca_pem: &str) -> Result<String> {
    let out = client
        .register_certificate()
        .certificate_pem(device_pem)
        .ca_certificate_pem(ca_pem)
        .status(CertificateStatus::PendingActivation)
        .send()
        .await
        .context("RegisterCertificate")?;
    out.certificate_id()
        .map(str::to_owned)
        .context("no certificateId")
}

/// A certificate's status.
pub async fn status(client: &Client, certificate_id: &str) -> Result<CertificateStatus> {
    status_if_registered(client, certificate_id)
        .await?
        .context("DescribeCertificate: the certificate is not registered")
}

/// A certificate's status, or `None` when AWS IoT never registered it (a device that never
/// got as far as its first CONNECT).
pub async fn status_if_registered(
    client: &Client,
    certificate_id: &str,
) -> Result<Option<CertificateStatus>> {
    let out = match client
        .describe_certificate()
        .certificate_id(certificate_id)
        .send()
        .await
    {
        Ok(out) => out,
        Err(e)
            if e.as_service_error()
                .is_some_and(|e| e.is_resource_not_found_exception()) =>
        {
            return Ok(None)
        }
        Err(e) => return Err(anyhow::Error::new(e).context("DescribeCertificate")),
    };
    out.certificate_description()
        .and_then(|d| d.status())
        .cloned()
        .context("no status")
        .map(Some)
}

/// The event AWS IoT publishes on `$aws/events/certificates/registered/<caId>` (the shape of
/// `testdata/aws/certificate-registered.json`), which the topic rule hands to the Lambda.
pub fn registered_event(certificate_id: &str, ca_certificate_id: &str) -> serde_json::Value {
    let now_ms = time::OffsetDateTime::now_utc().unix_timestamp() * 1000;
    serde_json::json!({
        "certificateId": certificate_id,
        "caCertificateId": ca_certificate_id,
        "timestamp": now_ms,
        "certificateStatus": "PENDING_ACTIVATION",
        "awsAccountId": ACCOUNT_ID,
        "certificateRegistrationTimestamp": now_ms.to_string(),
    })
}
