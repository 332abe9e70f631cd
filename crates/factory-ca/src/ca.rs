//! The CA: creation (`jitr ca init`, optionally an offline root above an issuing CA),
//! loading with its key, and the verification certificate AWS IoT asks for at registration.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
    KeyUsagePurpose, SerialNumber,
};
use time::{Duration, OffsetDateTime};
use x509_parser::prelude::{FromDer, X509Certificate};

use zeroize::Zeroizing;

use crate::keys::{generate_ca_key, load_private_key, store_private_key, DeviceKey, KeyRole};
use crate::random::random_bytes;
use crate::signer::{CaKey, RemoteKey};
use crate::write::{create_dir, write_file_atomic};
use crate::{Error, KeyAlgorithm, KeyProtection, Passphrase, Profile, Subject};

/// The certificate of the CA that signs devices (registered in AWS IoT).
pub const CA_CERT_FILE: &str = "ca.crt";
/// The private key of the CA that signs devices.
pub const CA_KEY_FILE: &str = "ca.key";
/// The offline root above an issuing CA.
pub const ROOT_CERT_FILE: &str = "root.crt";
/// The offline root's private key.
pub const ROOT_KEY_FILE: &str = "root.key";
/// Where the key of the CA that signs devices is, when it is not `ca.key`: one key URI
/// (`awskms:key-id=...`, `pkcs11:token=...;object=...`).
pub const CA_KEY_URI_FILE: &str = "ca.key-uri";

/// How far `not_before` is backdated, so a device whose clock lags a little still accepts.
pub(crate) const BACKDATE: Duration = Duration::minutes(1);

/// What `jitr ca init` creates.
#[derive(Debug, Clone)]
pub struct CaInit {
    /// Folder for the CA files.
    pub dir: PathBuf,
    /// The top CA (the only one, or the offline root).
    pub root_subject: Subject,
    /// Key type of the top CA.
    pub root_key: KeyAlgorithm,
    /// Validity of the top CA in days.
    pub root_days: u32,
    /// With `Some`, an issuing CA below the root signs the devices.
    pub issuing: Option<IssuingCa>,
    /// How the key of the CA that signs devices is stored (when it is generated here).
    pub protection: KeyProtection,
    /// The key of the CA that signs devices, when it lives in a KMS or on a token: it is used
    /// instead of a generated one, and the folder records its URI instead of a key file. With
    /// an issuing CA, the root above it is still generated here.
    pub remote_key: Option<Arc<dyn RemoteKey>>,
    /// How the offline root's key is stored (required with an issuing CA): a passphrase of
    /// its own, never the issuing CA's.
    pub root_protection: Option<KeyProtection>,
}

/// Subject, key and validity of the issuing CA.
#[derive(Debug, Clone)]
pub struct IssuingCa {
    /// Distinguished name.
    pub subject: Subject,
    /// Key type.
    pub key: KeyAlgorithm,
    /// Validity in days.
    pub days: u32,
}

/// The files `ca init` wrote.
#[derive(Debug, Clone)]
pub struct CaFiles {
    /// The CA that signs devices.
    pub ca_cert: PathBuf,
    /// Its key file, or the file recording its key URI.
    pub ca_key: PathBuf,
    /// The offline root, when there is one.
    pub root: Option<(PathBuf, PathBuf)>,
}

pub(crate) fn random_serial() -> Result<SerialNumber, Error> {
    let mut serial = [0u8; 16];
    random_bytes(&mut serial)?;
    // Positive (top bit clear) and exactly 16 significant bytes (second bit set): 126 random bits.
    serial[0] = (serial[0] & 0x7f) | 0x40;
    Ok(SerialNumber::from_slice(&serial))
}

pub(crate) fn validity(
    now: OffsetDateTime,
    days: u32,
) -> Result<(OffsetDateTime, OffsetDateTime), Error> {
    if days == 0 || days > 100 * 366 {
        return Err(Error::Validity {
            reason: "days must be between 1 and 36600",
        });
    }
    // Certificates carry whole seconds; so does the manifest that describes them.
    let now = now.replace_nanosecond(0).map_err(|_| Error::Validity {
        reason: "clock out of range",
    })?;
    Ok((now - BACKDATE, now + Duration::days(i64::from(days))))
}

fn ca_params(
    subject: &Subject,
    days: u32,
    path_len: u8,
    now: OffsetDateTime,
) -> Result<CertificateParams, Error> {
    let mut params = CertificateParams::default();
    params.distinguished_name = subject.to_rcgen();
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(path_len));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    (params.not_before, params.not_after) = validity(now, days)?;
    params.serial_number = Some(random_serial()?);
    Ok(params)
}

impl CaInit {
    /// Checks that `run` can start: the root's protection, and no CA key (file or URI) in the
    /// folder yet. Call it before creating a remote key for the CA.
    pub fn check(&self) -> Result<(), Error> {
        if self.issuing.is_some() {
            match (&self.protection, &self.root_protection) {
                (_, None) => return Err(Error::RootPassphraseRequired),
                (KeyProtection::Encrypted(ca), Some(KeyProtection::Encrypted(root)))
                    if self.remote_key.is_none() && ca.expose() == root.expose() =>
                {
                    return Err(Error::RootPassphraseRequired)
                }
                _ => {}
            }
        }
        for name in [CA_KEY_FILE, ROOT_KEY_FILE, CA_KEY_URI_FILE] {
            let path = self.dir.join(name);
            if path.exists() {
                return Err(Error::CaExists { path });
            }
        }
        Ok(())
    }

    /// Creates the CA (and root) certificates and keys in `dir`; never overwrites a key. On
    /// failure nothing is left behind (a folder it created is removed again).
    pub fn run(&self, now: OffsetDateTime) -> Result<CaFiles, Error> {
        self.check()?;
        let created = !self.dir.exists();
        let files = [
            CA_CERT_FILE,
            CA_KEY_FILE,
            ROOT_CERT_FILE,
            ROOT_KEY_FILE,
            CA_KEY_URI_FILE,
        ]
        .map(|name| self.dir.join(name));
        let existed = files.clone().map(|path| path.exists());
        create_dir(&self.dir)?;
        let result = self.write(now);
        if result.is_err() {
            if created {
                let _ = std::fs::remove_dir_all(&self.dir);
            } else {
                // A folder that was there keeps what it had, and nothing of this run.
                for (path, existed) in files.iter().zip(existed) {
                    if !existed {
                        let _ = std::fs::remove_file(path);
                    }
                }
            }
        }
        result
    }

    fn write(&self, now: OffsetDateTime) -> Result<CaFiles, Error> {
        let root_key_path = self.dir.join(ROOT_KEY_FILE);
        let ca_cert_path = self.dir.join(CA_CERT_FILE);
        let path_len = if self.issuing.is_some() { 1 } else { 0 };
        let root_params = ca_params(&self.root_subject, self.root_days, path_len, now)?;
        match (&self.issuing, &self.remote_key) {
            (None, remote) => {
                // One CA: it is the root, signing itself.
                let key = match remote {
                    Some(remote) => CaKey::Remote(Arc::clone(remote)),
                    None => CaKey::File(generate_ca_key(self.root_key)?),
                };
                let cert = root_params.self_signed(&key)?;
                write_file_atomic(&ca_cert_path, cert.pem().as_bytes(), 0o644, true)?;
                let ca_key = self.store_ca_key(&key)?;
                Ok(CaFiles {
                    ca_cert: ca_cert_path,
                    ca_key,
                    root: None,
                })
            }
            (Some(issuing), remote) => {
                let root_key = generate_ca_key(self.root_key)?;
                let root_cert = root_params.self_signed(&root_key)?;
                let key = match remote {
                    Some(remote) => CaKey::Remote(Arc::clone(remote)),
                    None => CaKey::File(generate_ca_key(issuing.key)?),
                };
                let mut params = ca_params(&issuing.subject, issuing.days, 0, now)?;
                params.use_authority_key_identifier_extension = true;
                let root_issuer = Issuer::new(root_params, &root_key);
                let cert = params.signed_by(&key, &root_issuer)?;
                let root_cert_path = self.dir.join(ROOT_CERT_FILE);
                write_file_atomic(&root_cert_path, root_cert.pem().as_bytes(), 0o644, true)?;
                write_file_atomic(&ca_cert_path, cert.pem().as_bytes(), 0o644, true)?;
                let root_protection = self
                    .root_protection
                    .as_ref()
                    .ok_or(Error::RootPassphraseRequired)?;
                let root_der = Zeroizing::new(root_key.serialize_der());
                store_private_key(
                    &root_key_path,
                    &root_der,
                    root_protection,
                    KeyRole::OfflineRoot,
                )?;
                let ca_key = self.store_ca_key(&key)?;
                Ok(CaFiles {
                    ca_cert: ca_cert_path,
                    ca_key,
                    root: Some((root_cert_path, root_key_path)),
                })
            }
        }
    }

    /// Writes the signing CA's key file, or the URI of its remote key.
    fn store_ca_key(&self, key: &CaKey) -> Result<PathBuf, Error> {
        match key {
            CaKey::File(key) => {
                let path = self.dir.join(CA_KEY_FILE);
                let der = Zeroizing::new(key.serialize_der());
                store_private_key(&path, &der, &self.protection, KeyRole::SigningCa)?;
                Ok(path)
            }
            CaKey::Remote(key) => {
                let path = self.dir.join(CA_KEY_URI_FILE);
                write_file_atomic(&path, format!("{}\n", key.uri()).as_bytes(), 0o644, true)?;
                Ok(path)
            }
        }
    }
}

/// The key URI the CA folder records, when its key is not a file.
pub fn ca_key_uri(dir: &Path) -> Result<Option<String>, Error> {
    let path = dir.join(CA_KEY_URI_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => Ok(Some(text.trim().to_owned())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(Error::Read { path, source }),
    }
}

/// A CA loaded from its folder, ready to sign.
pub struct Ca {
    pub(crate) dir: PathBuf,
    pub(crate) issuer: Issuer<'static, CaKey>,
    pub(crate) cert_pem: String,
    pub(crate) cert_der: Vec<u8>,
    pub(crate) profile: Profile,
    /// The CA certificate's notAfter: no device it signs may outlive it.
    pub(crate) not_after: OffsetDateTime,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

/// Reads a PEM (or DER) certificate file and returns the DER of its first certificate.
pub fn read_certificate(path: &Path) -> Result<Vec<u8>, Error> {
    let bytes = std::fs::read(path).map_err(|source| Error::Read {
        path: path.to_owned(),
        source,
    })?;
    let mut certs = crate::inspect::certificates_from_pem_or_der(&bytes).map_err(|reason| {
        Error::BadCertificate {
            what: path.display().to_string(),
            reason,
        }
    })?;
    Ok(certs.swap_remove(0))
}

impl Ca {
    /// Loads `dir/ca.crt` and `dir/ca.key` (and `dir/profile.toml`), checking they belong together.
    /// A folder whose key is remote (`ca.key-uri`) needs [`Ca::load_remote`].
    pub fn load(dir: &Path, passphrase: Option<&Passphrase>) -> Result<Ca, Error> {
        if let Some(uri) = ca_key_uri(dir)? {
            return Err(Error::RemoteKeyNeeded { uri });
        }
        let key_path = dir.join(CA_KEY_FILE);
        for path in [dir.join(CA_CERT_FILE), key_path.clone()] {
            if !path.exists() {
                return Err(Error::MissingCaFile {
                    dir: dir.to_owned(),
                    path,
                });
            }
        }
        let key = load_private_key(&key_path, passphrase)?;
        Ca::with_key(dir, CaKey::File(key), &key_path.display().to_string())
    }

    /// Loads a CA whose key is remote: `dir/ca.crt` (and the profile), signing with `key`,
    /// which must be the key the folder's `ca.key-uri` names and the certificate's.
    pub fn load_remote(dir: &Path, key: Arc<dyn RemoteKey>) -> Result<Ca, Error> {
        let recorded = ca_key_uri(dir)?;
        if recorded.as_deref() != Some(key.uri().as_str()) {
            return Err(Error::RemoteKeyMismatch {
                what: format!(
                    "{} records {}, not {}",
                    dir.join(CA_KEY_URI_FILE).display(),
                    recorded.as_deref().unwrap_or("no key URI"),
                    key.uri()
                ),
            });
        }
        let uri = key.uri();
        Ca::with_key(dir, CaKey::Remote(key), &uri)
    }

    fn with_key(dir: &Path, key: CaKey, key_name: &str) -> Result<Ca, Error> {
        let cert_path = dir.join(CA_CERT_FILE);
        if !cert_path.exists() {
            return Err(Error::MissingCaFile {
                dir: dir.to_owned(),
                path: cert_path,
            });
        }
        let profile = Profile::load(dir)?;
        let cert_der = read_certificate(&cert_path)?;
        Ca::from_parts(
            dir,
            &cert_path.display().to_string(),
            cert_der,
            key,
            key_name,
            profile,
        )
    }

    /// A CA with no folder: its certificate (PEM, as AWS IoT's DescribeCACertificate returns
    /// it), a remote key that must be the certificate's, and the device profile to sign to.
    /// What a Lambda that signs through AWS KMS builds at its cold start.
    pub fn from_certificate(
        cert_pem: &str,
        key: Arc<dyn RemoteKey>,
        profile: Profile,
    ) -> Result<Ca, Error> {
        let mut certs = crate::inspect::certificates_from_pem_or_der(cert_pem.as_bytes()).map_err(
            |reason| Error::BadCertificate {
                what: "the CA certificate".to_owned(),
                reason,
            },
        )?;
        let uri = key.uri();
        Ca::from_parts(
            Path::new(""),
            "the CA certificate",
            certs.swap_remove(0),
            CaKey::Remote(key),
            &uri,
            profile,
        )
    }

    fn from_parts(
        dir: &Path,
        what: &str,
        cert_der: Vec<u8>,
        key: CaKey,
        key_name: &str,
        profile: Profile,
    ) -> Result<Ca, Error> {
        let bad = |reason: &str| Error::BadCertificate {
            what: what.to_owned(),
            reason: reason.to_owned(),
        };
        let (_, cert) = X509Certificate::from_der(&cert_der).map_err(|e| bad(&e.to_string()))?;
        if !cert.is_ca() {
            return Err(bad(
                "it is not a CA certificate (basicConstraints CA:TRUE missing)",
            ));
        }
        if cert.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
            return Err(bad(&format!("it does not match the key {key_name}")));
        }
        let not_after = cert.validity().not_after.to_datetime();
        let issuer = Issuer::from_ca_cert_der(&cert_der.clone().into(), key)?;
        let cert_pem = pem_encode("CERTIFICATE", &cert_der);
        Ok(Ca {
            dir: dir.to_owned(),
            issuer,
            cert_pem,
            cert_der,
            profile,
            not_after,
        })
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA certificate, DER.
    pub fn cert_der(&self) -> &[u8] {
        &self.cert_der
    }

    /// The CA folder's profile.
    pub fn profile(&self) -> &Profile {
        &self.profile
    }

    /// The folder this CA was loaded from.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The CA certificate's notAfter.
    pub fn not_after(&self) -> OffsetDateTime {
        self.not_after
    }

    /// Where the key is, when it is not a file in the folder (its URI).
    pub fn remote_key_uri(&self) -> Option<String> {
        match self.issuer.key() {
            CaKey::Remote(key) => Some(key.uri()),
            CaKey::File(_) => None,
        }
    }

    /// The verification certificate AWS IoT asks for: CN = the registration code, signed by
    /// this CA's key, proving we hold it.
    pub fn verification_certificate(
        &self,
        registration_code: &str,
        now: OffsetDateTime,
    ) -> Result<String, Error> {
        if registration_code.is_empty()
            || registration_code.len() > 128
            || !registration_code.bytes().all(|b| b.is_ascii_alphanumeric())
        {
            return Err(Error::InvalidRegistrationCode {
                code: registration_code.to_owned(),
            });
        }
        let key = DeviceKey::generate(KeyAlgorithm::P256)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, registration_code);
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;
        (params.not_before, params.not_after) = validity(now, 30)?;
        params.serial_number = Some(random_serial()?);
        Ok(params.signed_by(&key, &self.issuer)?.pem())
    }
}

pub(crate) fn pem_encode(label: &str, der: &[u8]) -> String {
    crate::pem::pem_string(label, der)
}
