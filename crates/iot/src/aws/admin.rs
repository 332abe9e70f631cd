//! [`IotAdmin`] over aws-sdk-iot: what only the operator's commands call. Listings follow
//! `nextToken`/`nextMarker` through every page.

use aws_sdk_iot::types::CertificateMode;
use tokio::time::Instant;

use super::{every_page, malformed, AwsIotRegistry, PAGE_SIZE};
use crate::ports::CaRegistrationMode;
use crate::{CertificateId, CertificateStatus};
use crate::{IotAdmin, JitpConfig, ProvisioningClaim, RegistryError, ThingSpec};

impl IotAdmin for AwsIotRegistry {
    async fn describe_endpoint(
        &self,
        endpoint_type: &str,
        deadline: Instant,
    ) -> Result<String, RegistryError> {
        const OP: &str = "DescribeEndpoint";
        let out = self
            .send(OP, deadline, || {
                self.client
                    .describe_endpoint()
                    .endpoint_type(endpoint_type)
                    .send()
            })
            .await?;
        out.endpoint_address()
            .map(str::to_owned)
            .ok_or_else(|| malformed(OP, "endpointAddress"))
    }

    async fn registration_code(&self, deadline: Instant) -> Result<String, RegistryError> {
        const OP: &str = "GetRegistrationCode";
        let out = self
            .send(OP, deadline, || self.client.get_registration_code().send())
            .await?;
        out.registration_code()
            .map(str::to_owned)
            .ok_or_else(|| malformed(OP, "registrationCode"))
    }

    async fn register_ca_certificate(
        &self,
        ca_pem: &str,
        mode: &CaRegistrationMode,
        deadline: Instant,
    ) -> Result<(String, Option<String>), RegistryError> {
        const OP: &str = "RegisterCACertificate";
        let out = self
            .send(OP, deadline, || {
                let request = self
                    .client
                    .register_ca_certificate()
                    .ca_certificate(ca_pem)
                    .set_as_active(true)
                    .allow_auto_registration(true);
                match mode {
                    CaRegistrationMode::Verified { verification_pem } => {
                        request.verification_certificate(verification_pem)
                    }
                    // SNI_ONLY needs no proof of key possession.
                    CaRegistrationMode::SniOnly => {
                        request.certificate_mode(CertificateMode::SniOnly)
                    }
                }
                .send()
            })
            .await?;
        let id = out
            .certificate_id()
            .ok_or_else(|| malformed(OP, "certificateId"))?;
        Ok((id.to_owned(), out.certificate_arn().map(str::to_owned)))
    }

    async fn principal_things(
        &self,
        certificate_arn: &str,
        deadline: Instant,
    ) -> Result<Vec<String>, RegistryError> {
        every_page(|token| async move {
            let out = self
                .send("ListPrincipalThings", deadline, || {
                    self.client
                        .list_principal_things()
                        .principal(certificate_arn)
                        .max_results(PAGE_SIZE)
                        .set_next_token(token.clone())
                        .send()
                })
                .await?;
            Ok((out.things().to_vec(), out.next_token().map(str::to_owned)))
        })
        .await
    }

    async fn attached_policies(
        &self,
        certificate_arn: &str,
        deadline: Instant,
    ) -> Result<Vec<String>, RegistryError> {
        every_page(|marker| async move {
            let out = self
                .send("ListAttachedPolicies", deadline, || {
                    self.client
                        .list_attached_policies()
                        .target(certificate_arn)
                        .page_size(PAGE_SIZE)
                        .set_marker(marker.clone())
                        .send()
                })
                .await?;
            let names = out
                .policies()
                .iter()
                .filter_map(|p| p.policy_name().map(str::to_owned))
                .collect();
            Ok((names, out.next_marker().map(str::to_owned)))
        })
        .await
    }

    async fn detach_policy(
        &self,
        policy: &str,
        certificate_arn: &str,
        deadline: Instant,
    ) -> Result<(), RegistryError> {
        self.send("DetachPolicy", deadline, || {
            self.client
                .detach_policy()
                .policy_name(policy)
                .target(certificate_arn)
                .send()
        })
        .await
        .map(|_| ())
    }

    async fn delete_thing(&self, thing: &str, deadline: Instant) -> Result<bool, RegistryError> {
        let result = self
            .send("DeleteThing", deadline, || {
                self.client.delete_thing().thing_name(thing).send()
            })
            .await;
        match result {
            Ok(_) => Ok(true),
            Err(e) if e.is_not_found() => Ok(false),
            Err(e) => Err(e),
        }
    }

    async fn list_things(&self, deadline: Instant) -> Result<Vec<ThingSpec>, RegistryError> {
        let things = every_page(|token| async move {
            let out = self
                .send("ListThings", deadline, || {
                    self.client
                        .list_things()
                        .max_results(PAGE_SIZE)
                        .set_next_token(token.clone())
                        .send()
                })
                .await?;
            let names = out
                .things()
                .iter()
                .filter_map(|t| {
                    let name = t.thing_name()?;
                    Some(super::thing_spec(name, t.thing_type_name(), t.attributes()))
                })
                .collect();
            Ok((names, out.next_token().map(str::to_owned)))
        })
        .await?;
        Ok(things)
    }

    async fn register_certificate(
        &self,
        pem: &str,
        ca_pem: &str,
        status: CertificateStatus,
        deadline: Instant,
    ) -> Result<CertificateId, RegistryError> {
        const OP: &str = "RegisterCertificate";
        // AWS IoT's id is the SHA-256 of the DER: known before asking, and after a conflict.
        let der = factory_ca::certificates_from_pem_or_der(pem.as_bytes())
            .map_err(|reason| RegistryError::failed(OP, reason))?;
        let expected = CertificateId::parse(&factory_ca::certificate_id(&der[0]))
            .map_err(|reason| RegistryError::failed(OP, reason))?;
        let sdk_status = aws_sdk_iot::types::CertificateStatus::from(status.as_str());
        let result = self
            .send(OP, deadline, || {
                self.client
                    .register_certificate()
                    .certificate_pem(pem)
                    .ca_certificate_pem(ca_pem)
                    .status(sdk_status.clone())
                    .send()
            })
            .await;
        match result {
            Ok(_) | Err(RegistryError::AlreadyExists { .. }) => Ok(expected),
            Err(e) => Err(e),
        }
    }

    async fn set_ca_jitp(
        &self,
        ca: &CertificateId,
        config: &JitpConfig,
        deadline: Instant,
    ) -> Result<(), RegistryError> {
        let registration = aws_sdk_iot::types::RegistrationConfig::builder()
            .template_body(&config.template_body)
            .role_arn(&config.role_arn)
            .build();
        self.send("UpdateCACertificate", deadline, || {
            self.client
                .update_ca_certificate()
                .certificate_id(ca.as_str())
                .registration_config(registration.clone())
                .send()
        })
        .await
        .map(|_| ())
    }

    async fn create_provisioning_claim(
        &self,
        template: &str,
        deadline: Instant,
    ) -> Result<ProvisioningClaim, RegistryError> {
        const OP: &str = "CreateProvisioningClaim";
        let out = self
            .send(OP, deadline, || {
                self.client
                    .create_provisioning_claim()
                    .template_name(template)
                    .send()
            })
            .await?;
        let private_key = out
            .key_pair()
            .and_then(|k| k.private_key())
            .ok_or_else(|| malformed(OP, "keyPair.PrivateKey"))?;
        Ok(ProvisioningClaim {
            certificate_id: out
                .certificate_id()
                .ok_or_else(|| malformed(OP, "certificateId"))?
                .to_owned(),
            certificate_pem: out
                .certificate_pem()
                .ok_or_else(|| malformed(OP, "certificatePem"))?
                .to_owned(),
            private_key: zeroize::Zeroizing::new(private_key.to_owned()),
            expires_at: out.expiration().map(|t| t.secs()),
        })
    }
}
