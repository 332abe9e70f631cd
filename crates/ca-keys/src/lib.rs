//! Where a jitr CA key lives, named by a URI, and the signing backends behind it.
//!
//! - a file path (or `file:PATH`): the encrypted PKCS#8 file `factory-ca` reads (the default,
//!   `ca/ca.key`);
//! - `awskms:key-id=<id, ARN or alias/NAME>[;region=R]`: an AWS KMS key, asymmetric
//!   `ECC_NIST_P256` or `ECC_NIST_P384` for `SIGN_VERIFY` ([`kms`]);
//! - `pkcs11:token=<label>;object=<label>`: a key pair on a PKCS#11 token, an HSM or SoftHSM2
//!   ([`pkcs11`]; the module from `--pkcs11-module` / `JITR_PKCS11_MODULE`, the user PIN from
//!   `--pin-file`, `JITR_PKCS11_PIN` or a prompt).
//!
//! [`open`] finds an existing key and checks it can sign for a CA; [`create`] makes one. Both
//! give a [`factory_ca::RemoteKey`], which `factory-ca` signs through (rcgen's remote signing
//! key); the key itself never leaves the KMS or the token.

pub mod der;
pub mod kms;
pub mod pkcs11;

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use factory_ca::{KeyAlgorithm, RemoteKey};
use zeroize::Zeroizing;

/// A key URI, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyUri {
    /// An encrypted PKCS#8 file.
    File(PathBuf),
    /// An AWS KMS key.
    AwsKms {
        /// Key id, key ARN, alias name (`alias/NAME`) or alias ARN.
        key_id: String,
        /// The region, when not the SDK's default one.
        region: Option<String>,
    },
    /// A key pair on a PKCS#11 token.
    Pkcs11 {
        /// The token's label.
        token: String,
        /// The key objects' label (`CKA_LABEL` of the private and the public key).
        object: String,
    },
}

/// What went wrong with a key URI or a backend; every message is one line naming the key.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The URI does not parse.
    #[error("invalid key URI {uri:?}: {reason}")]
    BadUri {
        /// The URI as given.
        uri: String,
        /// What is wrong.
        reason: String,
    },
    /// A setting the backend needs is missing (a usage error).
    #[error("{0}")]
    Missing(String),
    /// The key exists but cannot serve as a CA key (type, usage, state).
    #[error("{0}")]
    Unsuitable(String),
    /// The key is not there.
    #[error("{0}")]
    NotFound(String),
    /// `create` found a key already there.
    #[error("{0}")]
    Exists(String),
    /// The backend refused or failed.
    #[error("{0}")]
    Backend(String),
}

impl Error {
    /// Whether the fault is in how the command was called (exit 2) rather than in the key or
    /// the backend (exit 1).
    pub fn is_usage(&self) -> bool {
        matches!(self, Error::BadUri { .. } | Error::Missing(_))
    }
}

/// Percent-decodes a URI attribute value (`%XX`).
fn decode(value: &str) -> Result<String, String> {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = value
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| format!("bad percent escape in {value:?}"))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| format!("{value:?} is not UTF-8 once decoded"))
}

/// Percent-encodes what would end an attribute (`;`, `=`, `%`, `?`, `#`, spaces and controls).
fn encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        if b.is_ascii_graphic() && !b";=%?#".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// `name=value` attributes separated by `;`, each name at most once and among `allowed`.
fn attributes(
    body: &str,
    allowed: &[&str],
) -> Result<std::collections::BTreeMap<String, String>, String> {
    let mut out = std::collections::BTreeMap::new();
    if body.contains(['?', '#']) {
        return Err("query and fragment parts are not supported".to_owned());
    }
    for part in body.split(';').filter(|p| !p.is_empty()) {
        let (name, value) = part
            .split_once('=')
            .ok_or_else(|| format!("{part:?} is not name=value"))?;
        if !allowed.contains(&name) {
            return Err(format!(
                "unknown attribute {name:?} (known: {})",
                allowed.join(", ")
            ));
        }
        let value = decode(value)?;
        if value.is_empty() {
            return Err(format!("{name} is empty"));
        }
        if out.insert(name.to_owned(), value).is_some() {
            return Err(format!("{name} given twice"));
        }
    }
    Ok(out)
}

/// `uri` fit to print: a query part and any `pin-*` attribute may hold a PIN (RFC 7512 allows
/// `pin-value`), so their values are left out.
fn redacted(uri: &str) -> String {
    let (path, query) = match uri.split_once('?') {
        Some((path, _)) => (path, "?…"),
        None => (uri, ""),
    };
    let parts: Vec<String> = path
        .split(';')
        .map(|part| match part.split_once('=') {
            Some((name, _)) if name.contains("pin") => format!("{name}=…"),
            _ => part.to_owned(),
        })
        .collect();
    format!("{}{query}", parts.join(";"))
}

impl FromStr for KeyUri {
    type Err = Error;

    fn from_str(uri: &str) -> Result<KeyUri, Error> {
        let bad = |reason: String| Error::BadUri {
            uri: redacted(uri),
            reason,
        };
        if let Some(body) = uri.strip_prefix("awskms:") {
            let mut attrs = attributes(body, &["key-id", "region"]).map_err(bad)?;
            let key_id = attrs
                .remove("key-id")
                .ok_or_else(|| bad("key-id is required".to_owned()))?;
            return Ok(KeyUri::AwsKms {
                key_id,
                region: attrs.remove("region"),
            });
        }
        if let Some(body) = uri.strip_prefix("pkcs11:") {
            // `type=private` is what other tools write for the key object: accepted, implied.
            let mut attrs = attributes(body, &["token", "object", "type"]).map_err(bad)?;
            if attrs.get("type").is_some_and(|t| t != "private") {
                return Err(bad("type must be private (the signing key)".to_owned()));
            }
            let mut take = |name: &str| {
                attrs
                    .remove(name)
                    .ok_or_else(|| bad(format!("{name} is required")))
            };
            return Ok(KeyUri::Pkcs11 {
                token: take("token")?,
                object: take("object")?,
            });
        }
        let path = uri.strip_prefix("file:").unwrap_or(uri);
        if path.is_empty() {
            return Err(bad("empty path".to_owned()));
        }
        if !uri.starts_with("file:") && path.split('/').next().is_some_and(|s| s.contains(':')) {
            return Err(bad(
                "unknown scheme (expected a path, file:, awskms: or pkcs11:)".to_owned(),
            ));
        }
        Ok(KeyUri::File(PathBuf::from(path)))
    }
}

impl fmt::Display for KeyUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeyUri::File(path) => write!(f, "file:{}", path.display()),
            KeyUri::AwsKms { key_id, region } => {
                write!(f, "awskms:key-id={}", encode(key_id))?;
                if let Some(region) = region {
                    write!(f, ";region={}", encode(region))?;
                }
                Ok(())
            }
            KeyUri::Pkcs11 { token, object } => {
                write!(
                    f,
                    "pkcs11:token={};object={}",
                    encode(token),
                    encode(object)
                )
            }
        }
    }
}

/// How to reach and use a remote key.
#[derive(Clone)]
pub struct Options {
    /// The PKCS#11 module (`.so`) for `pkcs11:` URIs.
    pub pkcs11_module: Option<PathBuf>,
    /// The token's user PIN for `pkcs11:` URIs.
    pub pin: Option<Zeroizing<String>>,
    /// KMS Sign requests per second at most (AWS shares one quota per account and region among
    /// all ECC Sign calls; its default is 300/s).
    pub kms_rate: f64,
    /// How long one signature may take, throttling and retries included.
    pub sign_timeout: Duration,
}

impl fmt::Debug for Options {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Options")
            .field("pkcs11_module", &self.pkcs11_module)
            .field("pin", &self.pin.as_ref().map(|_| "<redacted>"))
            .field("kms_rate", &self.kms_rate)
            .field("sign_timeout", &self.sign_timeout)
            .finish()
    }
}

/// KMS Sign requests per second by default: under AWS's shared 300/s for ECC signing, leaving
/// room for other callers in the account.
pub const DEFAULT_KMS_RATE: f64 = 200.0;

impl Default for Options {
    fn default() -> Self {
        Options {
            pkcs11_module: None,
            pin: None,
            kms_rate: DEFAULT_KMS_RATE,
            sign_timeout: Duration::from_secs(30),
        }
    }
}

/// Opens the existing key `uri` names and checks it can sign as a CA key.
pub fn open(uri: &KeyUri, options: &Options) -> Result<Arc<dyn RemoteKey>, Error> {
    match uri {
        KeyUri::File(path) => Err(Error::Missing(format!(
            "{} is a key file: factory-ca loads it with its passphrase",
            path.display()
        ))),
        KeyUri::AwsKms { key_id, region } => Ok(Arc::new(kms::KmsKey::open(
            key_id,
            region.as_deref(),
            options,
        )?)),
        KeyUri::Pkcs11 { token, object } => {
            Ok(Arc::new(pkcs11::Pkcs11Key::open(token, object, options)?))
        }
    }
}

/// Creates a new `algorithm` key where `uri` says (a KMS key under the alias `alias/NAME`, or
/// a key pair labelled `object` on the token), refusing one that is already there.
pub fn create(
    uri: &KeyUri,
    algorithm: KeyAlgorithm,
    options: &Options,
) -> Result<Arc<dyn RemoteKey>, Error> {
    match uri {
        KeyUri::File(path) => Err(Error::Missing(format!(
            "{} is a key file: `jitr ca init` without --key-uri writes it",
            path.display()
        ))),
        KeyUri::AwsKms { key_id, region } => Ok(Arc::new(kms::KmsKey::create(
            key_id,
            region.as_deref(),
            algorithm,
            options,
        )?)),
        KeyUri::Pkcs11 { token, object } => Ok(Arc::new(pkcs11::Pkcs11Key::create(
            token, object, algorithm, options,
        )?)),
    }
}

/// The hash ECDSA signs with on `algorithm`'s curve.
pub(crate) fn digest(algorithm: KeyAlgorithm, message: &[u8]) -> Vec<u8> {
    let alg = match algorithm {
        KeyAlgorithm::P256 => &aws_lc_rs::digest::SHA256,
        KeyAlgorithm::P384 => &aws_lc_rs::digest::SHA384,
    };
    aws_lc_rs::digest::digest(alg, message).as_ref().to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(uri: &str) -> Result<KeyUri, Error> {
        uri.parse()
    }

    #[test]
    fn uris_parse_and_print_back() {
        assert_eq!(
            parse("awskms:key-id=alias/jitr-ca;region=eu-west-1").unwrap(),
            KeyUri::AwsKms {
                key_id: "alias/jitr-ca".into(),
                region: Some("eu-west-1".into())
            }
        );
        let arn = "arn:aws:kms:us-east-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab";
        let uri = parse(&format!("awskms:key-id={arn}")).unwrap();
        assert_eq!(parse(&uri.to_string()).unwrap(), uri);
        let token = parse("pkcs11:token=Factory%20HSM;object=jitr-ca;type=private").unwrap();
        assert_eq!(
            token,
            KeyUri::Pkcs11 {
                token: "Factory HSM".into(),
                object: "jitr-ca".into()
            }
        );
        assert_eq!(
            token.to_string(),
            "pkcs11:token=Factory%20HSM;object=jitr-ca"
        );
        assert_eq!(parse(&token.to_string()).unwrap(), token);
        assert_eq!(
            parse("ca/ca.key").unwrap(),
            KeyUri::File("ca/ca.key".into())
        );
        assert_eq!(
            parse("file:/etc/jitr/ca.key").unwrap(),
            KeyUri::File("/etc/jitr/ca.key".into())
        );
    }

    #[test]
    fn bad_uris_say_what_is_wrong() {
        for (uri, needle) in [
            ("awskms:region=us-east-1", "key-id is required"),
            ("awskms:key-id=a;key-id=b", "given twice"),
            ("awskms:key-id=a;colour=red", "unknown attribute \"colour\""),
            ("pkcs11:token=t", "object is required"),
            (
                "pkcs11:token=t;object=o;type=public",
                "type must be private",
            ),
            ("pkcs11:token=t;object=o?pin-value=1234", "query"),
            (
                "pkcs11:token=t;object=o;pin-value=1234",
                "unknown attribute \"pin-value\"",
            ),
            ("pkcs11:token=%zz;object=o", "percent escape"),
            ("vault:transit/jitr", "unknown scheme"),
            ("awskms:key-id=", "key-id is empty"),
        ] {
            let err = parse(uri).unwrap_err();
            assert!(err.is_usage(), "{uri}");
            let text = err.to_string();
            assert!(text.contains(needle), "{uri}: {text}");
            assert_eq!(text.lines().count(), 1);
            assert!(!text.contains("1234"), "a PIN is never printed: {text}");
        }
    }
}
