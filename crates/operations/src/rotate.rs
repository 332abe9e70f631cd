//! A device's next certificate, put in place by an operator (`jitr rotate`) without waiting
//! for the device's first connect: registered INACTIVE under its CA, then the Thing, the policy
//! and the attachment, and ACTIVE last, exactly the order the activator keeps, so a failure at
//! any step leaves nothing able to connect half-provisioned. The old certificate stays ACTIVE
//! beside it until it is retired ([`retire`]): a device is never left without a usable one.

use tokio::time::Instant;

use crate::register::Placement;
use crate::revoke::{revoke, RevokeReport, Target};
use iot::{call_deadline, CertificateId, CertificateStatus, IotAdmin, RegistryError};

/// Registers `pem` under the CA `ca_pem` and makes it the device's, ACTIVE last. Idempotent:
/// run again, each step finds itself done. The certificate's id.
pub async fn install<A: IotAdmin>(
    iot: &A,
    pem: &str,
    ca_pem: &str,
    placement: &Placement<'_>,
    deadline: Instant,
) -> Result<CertificateId, RegistryError> {
    // The one install order (INACTIVE, Thing, policy, attachment, ACTIVE last), unpaced: one
    // device at a time.
    crate::register::install(
        iot,
        pem,
        ca_pem,
        placement,
        None,
        &crate::register::Paces::unlimited(),
        deadline,
    )
    .await
}

/// Retires the certificates `old` once `new` is ACTIVE (checked first): revoked, policies and
/// Things detached.
pub async fn retire<A: IotAdmin>(
    iot: &A,
    new: &CertificateId,
    old: &[CertificateId],
    deadline: Instant,
) -> Result<Vec<RevokeReport>, RegistryError> {
    let status = iot
        .describe_certificate(new, call_deadline(deadline))
        .await?
        .status;
    if status != CertificateStatus::Active {
        return Err(RegistryError::failed(
            "RetireCertificate",
            format!(
                "the new certificate {new} is {}, not ACTIVE: the old one stays",
                status.as_str()
            ),
        ));
    }
    let mut reports = Vec::new();
    for id in old.iter().filter(|id| *id != new) {
        // The old certificates are the device's own, read from its Thing or the manifest.
        let scope = crate::revoke::Scope::vouched();
        let target = Target::Certificate(id.clone());
        reports.push(
            revoke(iot, &target, &[], false, &scope, deadline)
                .await
                .map_err(|e| e.into_registry("RetireCertificate"))?,
        );
    }
    Ok(reports)
}

#[cfg(test)]
mod tests {
    use super::*;
    use iot::memory::MemoryIot;
    use iot::{IotRegistry, ThingSpec};

    fn deadline() -> Instant {
        Instant::now() + std::time::Duration::from_secs(10)
    }

    #[tokio::test]
    async fn the_new_certificate_is_active_last_and_the_old_retires_only_after() {
        let test_ca = testkit::certs::TestCa::new("rotation test CA").unwrap();
        let device = || test_ca.device_pem("dev-1").unwrap();
        let ca = (test_ca.cert_pem.clone(), vec![device(), device()]);
        let iot = MemoryIot::new();
        iot.add_ca(&ca.0);
        let placement = Placement {
            thing: ThingSpec {
                name: "dev-1".into(),
                thing_type: None,
                attributes: Vec::new(),
            },
            group: None,
            policy: "device",
        };
        let old = install(&iot, &ca.1[0], &ca.0, &placement, deadline())
            .await
            .unwrap();
        let new = install(&iot, &ca.1[1], &ca.0, &placement, deadline())
            .await
            .unwrap();
        let calls = iot.calls();
        let last_update = calls
            .iter()
            .rposition(|c| *c == "UpdateCertificate")
            .unwrap();
        let last_attach = calls
            .iter()
            .rposition(|c| *c == "AttachThingPrincipal")
            .unwrap();
        assert!(last_update > last_attach, "{calls:?}");
        // Both ACTIVE until the old one is retired.
        for id in [&old, &new] {
            assert_eq!(
                iot.describe_certificate(id, deadline())
                    .await
                    .unwrap()
                    .status,
                CertificateStatus::Active
            );
        }
        // Installing again changes nothing.
        assert_eq!(
            install(&iot, &ca.1[1], &ca.0, &placement, deadline())
                .await
                .unwrap(),
            new
        );
        retire(&iot, &new, std::slice::from_ref(&old), deadline())
            .await
            .unwrap();
        assert_eq!(
            iot.describe_certificate(&old, deadline())
                .await
                .unwrap()
                .status,
            CertificateStatus::Revoked
        );
        let principals = iot.thing_principals("dev-1", deadline()).await.unwrap();
        assert_eq!(principals.len(), 1);
        // A new certificate that is not ACTIVE retires nothing.
        iot.set_certificate_status(&new, CertificateStatus::Inactive, deadline())
            .await
            .unwrap();
        assert!(retire(&iot, &new, &[old], deadline()).await.is_err());
    }
}
