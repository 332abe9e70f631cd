//! Another application's things in the same account and region, as a real account holds
//! them: what every test world that can delete or revoke plants, and asserts untouched at the
//! end.
//!
//! - `warehouse-door-sensor-7`: a Thing with attribute `app=facilities`, nothing attached;
//! - `facilities-gateway`: a Thing with a certificate of another CA, ACTIVE, attached, with a
//!   policy of its own;
//! - `mobile-app-user-1`: a Thing whose principal is a Cognito identity (not a certificate);
//! - a Thing named like a balena device UUID (`uuid_like`), attribute `app=facilities`, empty.

use anyhow::{ensure, Context, Result};
use aws_sdk_iot::types::{AttributePayload, CertificateStatus};
use aws_sdk_iot::Client;

use crate::certs::TestCa;
use crate::moto::{MotoServer, REGION};

/// The foreign Thing with nothing attached.
pub const EMPTY_THING: &str = "warehouse-door-sensor-7";
/// The foreign Thing with another CA's ACTIVE certificate.
pub const CERT_THING: &str = "facilities-gateway";
/// The foreign Thing whose principal is a Cognito identity.
pub const COGNITO_THING: &str = "mobile-app-user-1";
/// The foreign application's IoT policy.
pub const POLICY: &str = "facilities-policy";

/// What was planted, to check at the end.
#[derive(Debug)]
pub struct Foreign {
    /// The foreign certificate's id (under the foreign CA).
    pub certificate_id: String,
    /// Its ARN.
    pub certificate_arn: String,
    /// The Cognito identity attached to [`COGNITO_THING`].
    pub identity_id: String,
    /// A foreign Thing named like a device UUID (not in any fleet jitr serves).
    pub uuid_like: String,
}

impl Foreign {
    /// Plants the foreign things in `moto` (the foreign CA registered too, never trusted by
    /// jitr).
    pub async fn plant(moto: &MotoServer, client: &Client) -> Result<Foreign> {
        let facilities = |thing: &str| {
            client
                .create_thing()
                .thing_name(thing)
                .attribute_payload(
                    AttributePayload::builder()
                        .attributes("app", "facilities")
                        .build(),
                )
                .send()
        };
        facilities(EMPTY_THING).await?;
        facilities(CERT_THING).await?;
        facilities(COGNITO_THING).await?;
        let uuid_like = "f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0".to_owned();
        facilities(&uuid_like).await?;

        let ca = TestCa::new("facilities CA")?;
        crate::iot::register_ca(client, &ca.cert_pem).await?;
        let pem = ca.device_pem("facilities-gateway")?;
        let out = client
            .register_certificate()
            .certificate_pem(pem)
            .ca_certificate_pem(&ca.cert_pem)
            .status(CertificateStatus::Active)
            .send()
            .await
            .context("registering the foreign certificate")?;
        let certificate_id = out
            .certificate_id()
            .context("no certificate id")?
            .to_owned();
        let certificate_arn = out
            .certificate_arn()
            .context("no certificate arn")?
            .to_owned();
        crate::iot::create_policy(client, POLICY).await?;
        client
            .attach_policy()
            .policy_name(POLICY)
            .target(&certificate_arn)
            .send()
            .await?;
        client
            .attach_thing_principal()
            .thing_name(CERT_THING)
            .principal(&certificate_arn)
            .send()
            .await?;

        let identity_id = cognito_identity(moto).await?;
        client
            .attach_thing_principal()
            .thing_name(COGNITO_THING)
            .principal(&identity_id)
            .send()
            .await
            .context("attaching the Cognito identity")?;
        Ok(Foreign {
            certificate_id,
            certificate_arn,
            identity_id,
            uuid_like,
        })
    }

    /// The foreign Things' names.
    pub fn things(&self) -> [&str; 4] {
        [
            EMPTY_THING,
            CERT_THING,
            COGNITO_THING,
            self.uuid_like.as_str(),
        ]
    }

    /// Fails unless every foreign thing is as planted: the Things there with their
    /// attributes, the certificate ACTIVE with its policy and Thing, the identity attached.
    pub async fn assert_untouched(&self, client: &Client) -> Result<()> {
        for thing in self.things() {
            let out = client
                .describe_thing()
                .thing_name(thing)
                .send()
                .await
                .with_context(|| format!("the foreign Thing {thing} is gone"))?;
            let app = out.attributes().and_then(|a| a.get("app")).cloned();
            ensure!(
                app.as_deref() == Some("facilities")
                    && out.attributes().map(|a| a.len()) == Some(1),
                "the foreign Thing {thing}'s attributes changed: {:?}",
                out.attributes()
            );
        }
        let status = crate::iot::status(client, &self.certificate_id).await?;
        ensure!(
            status == CertificateStatus::Active,
            "the foreign certificate is {status:?}"
        );
        let policies = client
            .list_attached_policies()
            .target(&self.certificate_arn)
            .send()
            .await?;
        ensure!(
            policies
                .policies()
                .iter()
                .any(|p| p.policy_name() == Some(POLICY)),
            "the foreign certificate lost its policy"
        );
        let principals = |thing: &'static str| async move {
            anyhow::Ok(
                client
                    .list_thing_principals()
                    .thing_name(thing)
                    .send()
                    .await?
                    .principals()
                    .to_vec(),
            )
        };
        ensure!(
            principals(CERT_THING).await? == vec![self.certificate_arn.clone()],
            "the foreign certificate was detached from {CERT_THING}"
        );
        ensure!(
            principals(COGNITO_THING).await? == vec![self.identity_id.clone()],
            "the Cognito identity was detached from {COGNITO_THING}"
        );
        let empty = client
            .list_thing_principals()
            .thing_name(EMPTY_THING)
            .send()
            .await?;
        ensure!(
            empty.principals().is_empty(),
            "something was attached to {EMPTY_THING}"
        );
        Ok(())
    }
}

/// A Cognito identity in moto (an identity pool, then GetId), by its JSON protocol: the id
/// AWS IoT lists as the Thing's principal.
async fn cognito_identity(moto: &MotoServer) -> Result<String> {
    let endpoint = moto.endpoint();
    tokio::task::spawn_blocking(move || {
        let call = |target: &str, body: serde_json::Value| {
            crate::http::HttpRequest::post(&format!("{endpoint}/"))
                .header("Content-Type", "application/x-amz-json-1.1")
                .header("X-Amz-Target", &format!("AWSCognitoIdentityService.{target}"))
                .header(
                    "Authorization",
                    &format!(
                        "AWS4-HMAC-SHA256 Credential=testing/20260101/{REGION}/cognito-identity/aws4_request, SignedHeaders=host, Signature=0"
                    ),
                )
                .body(body.to_string())
                .send()
                .and_then(|r| r.json())
        };
        let pool = call(
            "CreateIdentityPool",
            serde_json::json!({"IdentityPoolName": "facilities_app", "AllowUnauthenticatedIdentities": true}),
        )?;
        let pool_id = pool["IdentityPoolId"]
            .as_str()
            .with_context(|| format!("CreateIdentityPool: {pool}"))?
            .to_owned();
        let id = call(
            "GetId",
            serde_json::json!({"IdentityPoolId": pool_id, "AccountId": crate::moto::ACCOUNT_ID}),
        )?;
        id["IdentityId"]
            .as_str()
            .map(str::to_owned)
            .with_context(|| format!("GetId: {id}"))
    })
    .await?
}
