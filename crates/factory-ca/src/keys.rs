//! Key types, CA key files (encrypted PKCS#8, mode 0600) and device key generation.

use std::fmt;
use std::path::Path;
use std::str::FromStr;

use aws_lc_rs::signature::{
    EcdsaKeyPair, EcdsaSigningAlgorithm, KeyPair as _, ECDSA_P256_SHA256_ASN1_SIGNING,
    ECDSA_P384_SHA384_ASN1_SIGNING,
};
use pkcs8::der::pem::LineEnding;
use pkcs8::{EncryptedPrivateKeyInfoRef, PrivateKeyInfoRef};
use rcgen::{PublicKeyData, SignatureAlgorithm};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::random::random_bytes;
use crate::write::write_file_atomic;
use crate::Error;

/// Key types jitr generates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KeyAlgorithm {
    /// NIST P-256 with ECDSA-SHA256.
    P256,
    /// NIST P-384 with ECDSA-SHA384.
    P384,
}

impl KeyAlgorithm {
    pub(crate) fn rcgen(self) -> &'static SignatureAlgorithm {
        match self {
            KeyAlgorithm::P256 => &rcgen::PKCS_ECDSA_P256_SHA256,
            KeyAlgorithm::P384 => &rcgen::PKCS_ECDSA_P384_SHA384,
        }
    }

    fn aws_lc(self) -> &'static EcdsaSigningAlgorithm {
        match self {
            KeyAlgorithm::P256 => &ECDSA_P256_SHA256_ASN1_SIGNING,
            KeyAlgorithm::P384 => &ECDSA_P384_SHA384_ASN1_SIGNING,
        }
    }
}

impl FromStr for KeyAlgorithm {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "p256" | "p-256" => Ok(KeyAlgorithm::P256),
            "p384" | "p-384" => Ok(KeyAlgorithm::P384),
            other => Err(format!(
                "unknown key type {other:?} (expected p256 or p384)"
            )),
        }
    }
}

impl fmt::Display for KeyAlgorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            KeyAlgorithm::P256 => "p256",
            KeyAlgorithm::P384 => "p384",
        })
    }
}

/// A passphrase protecting CA keys; wiped from memory on drop, never printed.
#[derive(Clone)]
pub struct Passphrase(Zeroizing<String>);

/// The shortest passphrase a new CA key may be encrypted with.
pub const MIN_PASSPHRASE_CHARS: usize = 12;

impl Passphrase {
    /// A passphrase for a new key: at least [`MIN_PASSPHRASE_CHARS`] characters.
    pub fn for_new_key(secret: String) -> Result<Self, Error> {
        let pass = Passphrase::new(secret)?;
        if pass.0.chars().count() < MIN_PASSPHRASE_CHARS {
            return Err(Error::WeakPassphrase {
                min: MIN_PASSPHRASE_CHARS,
            });
        }
        Ok(pass)
    }

    /// Wraps a passphrase, rejecting empty ones (a key written by an earlier version may have
    /// a shorter one: it still unlocks).
    pub fn new(secret: String) -> Result<Self, Error> {
        let secret = Zeroizing::new(secret);
        // A trailing newline is an artefact of `echo pass > file`, not part of the secret.
        let trimmed = secret.trim_end_matches(['\r', '\n']);
        if trimmed.is_empty() {
            return Err(Error::EmptyPassphrase);
        }
        Ok(Passphrase(Zeroizing::new(trimmed.to_owned())))
    }

    /// The secret itself, for comparing a prompted passphrase with its confirmation.
    pub fn expose(&self) -> &str {
        &self.0
    }

    fn bytes(&self) -> &[u8] {
        self.0.as_bytes()
    }
}

impl fmt::Debug for Passphrase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Passphrase(<redacted>)")
    }
}

/// How a CA private key is stored on disk.
#[derive(Debug, Clone)]
pub enum KeyProtection {
    /// Encrypted PKCS#8: PBES2 with PBKDF2-HMAC-SHA256 and AES-256-CBC, which OpenSSL 3 reads
    /// (`openssl pkey`); the iteration count follows the key's [`KeyRole`].
    Encrypted(Passphrase),
    /// Plain PKCS#8; only on the operator's explicit request.
    InsecurePlaintext,
}

/// Which CA a key belongs to, which sets how hard its passphrase is to guess at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyRole {
    /// The CA that signs devices: PBKDF2 at OWASP's 600,000 iterations (2023 advice for
    /// PBKDF2-HMAC-SHA256), unlocked for every batch.
    SigningCa,
    /// The offline root: unlocked rarely, so a much higher cost.
    OfflineRoot,
}

impl KeyRole {
    /// PBKDF2-HMAC-SHA256 iterations for this role. (scrypt would be stronger per second, but
    /// OpenSSL 3 caps scrypt at 32 MiB, so anything above N=2^14 could not be read by
    /// `openssl pkey`.)
    pub fn pbkdf2_iterations(self) -> u32 {
        match self {
            KeyRole::SigningCa => 600_000,
            KeyRole::OfflineRoot => 2_000_000,
        }
    }
}

const ENCRYPTED_LABEL: &str = "ENCRYPTED PRIVATE KEY";
pub(crate) const PLAIN_LABEL: &str = "PRIVATE KEY";

/// Writes a PKCS#8 key to `path` (mode 0600), encrypted unless told otherwise.
pub(crate) fn store_private_key(
    path: &Path,
    pkcs8_der: &[u8],
    protection: &KeyProtection,
    role: KeyRole,
) -> Result<(), Error> {
    let pem = match protection {
        KeyProtection::Encrypted(pass) => {
            let info = PrivateKeyInfoRef::try_from(pkcs8_der).map_err(|_| Error::Crypto {
                op: "encode PKCS#8",
            })?;
            let mut salt = [0u8; 16];
            let mut iv = [0u8; 16];
            random_bytes(&mut salt)?;
            random_bytes(&mut iv)?;
            let params = pkcs8::pkcs5::pbes2::Parameters::generate_pbkdf2_sha256_aes256cbc(
                role.pbkdf2_iterations(),
                &salt,
                iv,
            )
            .map_err(|_| Error::Crypto {
                op: "PBES2 parameters",
            })?;
            let doc = info
                .encrypt_with_params(params, pass.bytes())
                .map_err(|_| Error::Crypto {
                    op: "encrypt PKCS#8",
                })?;
            Zeroizing::new(
                pkcs8::der::pem::encode_string(ENCRYPTED_LABEL, LineEnding::LF, doc.as_bytes())
                    .map_err(|_| Error::Crypto { op: "PEM encode" })?,
            )
        }
        KeyProtection::InsecurePlaintext => pkcs8_pem(pkcs8_der)?,
    };
    write_file_atomic(path, pem.as_bytes(), 0o600, true)
}

/// Reads a PKCS#8 key written by [`store_private_key`] (or any PKCS#8 PEM key).
pub(crate) fn load_private_key(
    path: &Path,
    passphrase: Option<&Passphrase>,
) -> Result<rcgen::KeyPair, Error> {
    let text = Zeroizing::new(std::fs::read_to_string(path).map_err(|source| Error::Read {
        path: path.to_owned(),
        source,
    })?);
    let format = |reason: &str| Error::KeyFormat {
        path: path.to_owned(),
        reason: reason.to_owned(),
    };
    let (label, doc) =
        pkcs8::SecretDocument::from_pem(&text).map_err(|_| format("expected a PEM block"))?;
    let der = match label {
        ENCRYPTED_LABEL => {
            let pass = passphrase.ok_or_else(|| Error::PassphraseRequired {
                path: path.to_owned(),
            })?;
            let info = EncryptedPrivateKeyInfoRef::try_from(doc.as_bytes())
                .map_err(|_| format("malformed EncryptedPrivateKeyInfo"))?;
            // A wrong passphrase shows up as a padding failure or as garbage that does not decode.
            info.decrypt(pass.bytes())
                .map_err(|_| Error::WrongPassphrase {
                    path: path.to_owned(),
                })?
        }
        PLAIN_LABEL => doc,
        other => {
            return Err(format(&format!(
                "found a {other:?} PEM block; convert it with `openssl pkcs8 -topk8`"
            )))
        }
    };
    rcgen::KeyPair::try_from(der.as_bytes()).map_err(|e| format(&e.to_string()))
}

/// PEM "PRIVATE KEY" text for a PKCS#8 document.
pub(crate) fn pkcs8_pem(pkcs8_der: &[u8]) -> Result<Zeroizing<String>, Error> {
    pkcs8::der::pem::encode_string(PLAIN_LABEL, LineEnding::LF, pkcs8_der)
        .map(Zeroizing::new)
        .map_err(|_| Error::Crypto { op: "PEM encode" })
}

/// Generates a CA key pair.
pub(crate) fn generate_ca_key(alg: KeyAlgorithm) -> Result<rcgen::KeyPair, Error> {
    Ok(rcgen::KeyPair::generate_for(alg.rcgen())?)
}

/// A freshly generated device key.
///
/// `rcgen::KeyPair::generate` serializes the key to PKCS#8 and parses it back, which costs
/// as much again as generating it. A device key is only ever the *subject* of a
/// certificate here, never a signer, so we keep aws-lc's key object as it is and hand rcgen
/// just its public half.
pub(crate) struct DeviceKey {
    key: EcdsaKeyPair,
    alg: KeyAlgorithm,
}

impl DeviceKey {
    pub(crate) fn generate(alg: KeyAlgorithm) -> Result<Self, Error> {
        let key = EcdsaKeyPair::generate(alg.aws_lc()).map_err(|_| Error::Crypto {
            op: "generate device key",
        })?;
        Ok(DeviceKey { key, alg })
    }

    /// The private key as PKCS#8 PEM.
    pub(crate) fn pkcs8_pem(&self) -> Result<Zeroizing<String>, Error> {
        Ok(Zeroizing::new(crate::pem::pem_string(
            PLAIN_LABEL,
            &self.pkcs8_der()?,
        )))
    }

    /// The private key as PKCS#8 DER.
    pub(crate) fn pkcs8_der(&self) -> Result<Zeroizing<Vec<u8>>, Error> {
        let doc = self.key.to_pkcs8v1().map_err(|_| Error::Crypto {
            op: "encode device key",
        })?;
        Ok(Zeroizing::new(doc.as_ref().to_vec()))
    }
}

impl PublicKeyData for DeviceKey {
    fn der_bytes(&self) -> &[u8] {
        self.key.public_key().as_ref()
    }

    fn algorithm(&self) -> &'static SignatureAlgorithm {
        self.alg.rcgen()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encrypted_key_round_trips_and_rejects_a_wrong_passphrase() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ca.key");
        let key = generate_ca_key(KeyAlgorithm::P256).unwrap();
        let pass = Passphrase::new("correct horse\n".into()).unwrap();
        store_private_key(
            &path,
            &key.serialize_der(),
            &KeyProtection::Encrypted(pass.clone()),
            KeyRole::SigningCa,
        )
        .unwrap();

        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.starts_with("-----BEGIN ENCRYPTED PRIVATE KEY-----"));
        let loaded = load_private_key(&path, Some(&pass)).unwrap();
        assert_eq!(loaded.public_key_raw(), key.public_key_raw());

        let wrong = Passphrase::new("battery staple".into()).unwrap();
        assert!(matches!(
            load_private_key(&path, Some(&wrong)),
            Err(Error::WrongPassphrase { .. })
        ));
        assert!(matches!(
            load_private_key(&path, None),
            Err(Error::PassphraseRequired { .. })
        ));
    }

    #[test]
    fn key_files_are_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("plain.key");
        let key = generate_ca_key(KeyAlgorithm::P384).unwrap();
        store_private_key(
            &path,
            &key.serialize_der(),
            &KeyProtection::InsecurePlaintext,
            KeyRole::SigningCa,
        )
        .unwrap();
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert!(load_private_key(&path, None).is_ok());
    }

    #[test]
    fn keys_are_wrapped_with_pbkdf2_at_the_roles_cost_and_openssl_reads_them() {
        use pkcs8::pkcs5::pbes2;
        let dir = tempfile::tempdir().unwrap();
        let pass = Passphrase::for_new_key("correct horse battery".into()).unwrap();
        std::fs::write(dir.path().join("pass"), "correct horse battery").unwrap();
        for (role, iterations) in [
            (KeyRole::SigningCa, 600_000),
            (KeyRole::OfflineRoot, 2_000_000),
        ] {
            let path = dir.path().join(format!("{role:?}.key"));
            let key = generate_ca_key(KeyAlgorithm::P256).unwrap();
            store_private_key(
                &path,
                &key.serialize_der(),
                &KeyProtection::Encrypted(pass.clone()),
                role,
            )
            .unwrap();
            let text = std::fs::read_to_string(&path).unwrap();
            let (_, doc) = pkcs8::SecretDocument::from_pem(&text).unwrap();
            let info = pkcs8::EncryptedPrivateKeyInfoRef::try_from(doc.as_bytes()).unwrap();
            let params = info.encryption_algorithm.pbes2().expect("PBES2");
            let kdf = params.kdf.pbkdf2().expect("PBKDF2");
            assert_eq!(kdf.iteration_count, iterations);
            assert!(matches!(
                params.encryption,
                pbes2::EncryptionScheme::Aes256Cbc { .. }
            ));
            // OpenSSL 3 (what `openssl pkey` runs) reads it with the passphrase.
            let out = std::process::Command::new("openssl")
                .args(["pkey", "-noout", "-passin"])
                .arg(format!("file:{}", dir.path().join("pass").display()))
                .arg("-in")
                .arg(&path)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }

    #[test]
    fn keys_written_by_earlier_versions_with_scrypt_still_load() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("old.key");
        let key = generate_ca_key(KeyAlgorithm::P256).unwrap();
        let der = key.serialize_der();
        // What jitr wrote before: pkcs8's default PBES2, scrypt N=2^14 with AES-256-CBC.
        let doc = PrivateKeyInfoRef::try_from(der.as_slice())
            .unwrap()
            .encrypt("short".as_bytes())
            .unwrap();
        let pem = pkcs8::der::pem::encode_string(ENCRYPTED_LABEL, LineEnding::LF, doc.as_bytes())
            .unwrap();
        std::fs::write(&path, pem).unwrap();
        let pass = Passphrase::new("short".into()).unwrap();
        let loaded = load_private_key(&path, Some(&pass)).unwrap();
        assert_eq!(loaded.public_key_raw(), key.public_key_raw());
    }

    #[test]
    fn new_keys_need_a_passphrase_of_twelve_characters() {
        assert!(matches!(
            Passphrase::for_new_key("eleven char".into()),
            Err(Error::WeakPassphrase { min: 12 })
        ));
        assert!(Passphrase::for_new_key("twelve chars".into()).is_ok());
    }

    #[test]
    fn empty_passphrase_is_refused() {
        assert!(Passphrase::new("\n".into()).is_err());
        assert_eq!(
            format!("{:?}", Passphrase::new("s3cret".into()).unwrap()),
            "Passphrase(<redacted>)"
        );
    }
}
