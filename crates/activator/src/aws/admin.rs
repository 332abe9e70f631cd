//! [`IotAdmin`] over aws-sdk-iot: what only the operator's commands call. Listings follow
//! `nextToken`/`nextMarker` through every page.

use aws_sdk_iot::types::CertificateMode;
use tokio::time::Instant;

use super::{malformed, AwsIotRegistry};
use crate::ports::CaRegistrationMode;
use crate::{IotAdmin, RegistryError};

/// Items asked for per page of a listing (the APIs' maximum).
const PAGE_SIZE: i32 = 250;

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

    async fn thing_principals(
        &self,
        thing: &str,
        deadline: Instant,
    ) -> Result<Vec<String>, RegistryError> {
        let mut all = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let out = self
                .send("ListThingPrincipals", deadline, || {
                    self.client
                        .list_thing_principals()
                        .thing_name(thing)
                        .max_results(PAGE_SIZE)
                        .set_next_token(token.clone())
                        .send()
                })
                .await?;
            all.extend(out.principals().iter().cloned());
            match out.next_token() {
                Some(next) if !next.is_empty() => token = Some(next.to_owned()),
                _ => return Ok(all),
            }
        }
    }

    async fn principal_things(
        &self,
        certificate_arn: &str,
        deadline: Instant,
    ) -> Result<Vec<String>, RegistryError> {
        let mut all = Vec::new();
        let mut token: Option<String> = None;
        loop {
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
            all.extend(out.things().iter().cloned());
            match out.next_token() {
                Some(next) if !next.is_empty() => token = Some(next.to_owned()),
                _ => return Ok(all),
            }
        }
    }

    async fn attached_policies(
        &self,
        certificate_arn: &str,
        deadline: Instant,
    ) -> Result<Vec<String>, RegistryError> {
        let mut all = Vec::new();
        let mut marker: Option<String> = None;
        loop {
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
            all.extend(
                out.policies()
                    .iter()
                    .filter_map(|p| p.policy_name().map(str::to_owned)),
            );
            match out.next_marker() {
                Some(next) if !next.is_empty() => marker = Some(next.to_owned()),
                _ => return Ok(all),
            }
        }
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

    async fn detach_thing_principal(
        &self,
        thing: &str,
        certificate_arn: &str,
        deadline: Instant,
    ) -> Result<(), RegistryError> {
        self.send("DetachThingPrincipal", deadline, || {
            self.client
                .detach_thing_principal()
                .thing_name(thing)
                .principal(certificate_arn)
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
}
