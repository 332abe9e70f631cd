//! Certificate factories for tests: a real jitr CA, good device certificates issued by it,
//! and hostile ones built with rcgen (wrong key, CA:TRUE, no clientAuth, expired, ...).

use std::path::Path;

pub use rcgen;

use anyhow::{Context, Result};
use factory_ca::{Ca, CaInit, DeviceId, IdFormat, KeyAlgorithm, KeyProtection};
use rcgen::{
    CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    SerialNumber,
};
use time::{Duration, OffsetDateTime};

/// A jitr CA in a temporary folder, with its key at hand for signing hostile certificates.
pub struct TestCa {
    _dir: tempfile::TempDir,
    /// The CA as `jitr` loads it.
    pub ca: Ca,
    /// The CA certificate PEM, byte for byte as registered in AWS IoT.
    pub cert_pem: String,
    key_pem: String,
}

impl std::fmt::Debug for TestCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestCa").finish_non_exhaustive()
    }
}

/// The parameters of a well-formed device certificate for `id`; tests mutate them.
pub fn device_params(id: &str) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, id);
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params.use_authority_key_identifier_extension = true;
    let now = OffsetDateTime::now_utc();
    params.not_before = now - Duration::minutes(1);
    params.not_after = now + Duration::days(365);
    params.serial_number = Some(SerialNumber::from_slice(&[0x41; 16]));
    params
}

impl TestCa {
    /// A new single-level CA (P-256, so tests are quick), key unencrypted in a temp folder.
    pub fn new(common_name: &str) -> Result<TestCa> {
        let dir = tempfile::tempdir()?;
        CaInit {
            dir: dir.path().to_owned(),
            root_subject: format!("O=jitr tests,CN={common_name}").parse()?,
            root_key: KeyAlgorithm::P256,
            root_days: 3650,
            issuing: None,
            protection: KeyProtection::InsecurePlaintext,
            root_protection: None,
            remote_key: None,
        }
        .run(OffsetDateTime::now_utc())?;
        let ca = Ca::load(dir.path(), None)?;
        let cert_pem = std::fs::read_to_string(dir.path().join("ca.crt"))?;
        let key_pem = std::fs::read_to_string(dir.path().join("ca.key"))?;
        Ok(TestCa {
            _dir: dir,
            ca,
            cert_pem,
            key_pem,
        })
    }

    /// The CA folder.
    pub fn dir(&self) -> &Path {
        self._dir.path()
    }

    /// A good device certificate (PEM) for `id`, issued the way `jitr issue` does.
    pub fn device_pem(&self, id: &str) -> Result<String> {
        let id = DeviceId::parse(id, IdFormat::Any)?;
        Ok(self
            .ca
            .issue_device(&id, KeyAlgorithm::P256, 3650, OffsetDateTime::now_utc())?
            .cert_pem)
    }

    /// A certificate signed by this CA's key from `params` with a fresh P-256 key.
    pub fn sign(&self, params: &CertificateParams) -> Result<String> {
        self.sign_with_key(params, &KeyPair::generate()?)
    }

    /// A certificate signed by this CA's key for the given subject key.
    pub fn sign_with_key(
        &self,
        params: &CertificateParams,
        subject_key: &KeyPair,
    ) -> Result<String> {
        let ca_key = KeyPair::from_pem(&self.key_pem).context("CA key")?;
        let issuer = Issuer::from_ca_cert_pem(&self.cert_pem, ca_key)?;
        Ok(params.signed_by(subject_key, &issuer)?.pem())
    }

    /// A certificate whose issuer name is this CA's but which another key signed.
    pub fn forged_pem(&self, params: &CertificateParams) -> Result<String> {
        let impostor = KeyPair::generate()?;
        let issuer = Issuer::from_ca_cert_pem(&self.cert_pem, impostor)?;
        Ok(params.signed_by(&KeyPair::generate()?, &issuer)?.pem())
    }
}

/// The AWS IoT certificate id of a PEM certificate.
pub fn certificate_id_of(pem: &str) -> Result<String> {
    let der = factory_ca::certificates_from_pem_or_der(pem.as_bytes())
        .map_err(anyhow::Error::msg)?
        .into_iter()
        .next()
        .context("no certificate")?;
    Ok(factory_ca::certificate_id(&der))
}
