//! The CA's signing key, wherever it lives: a key file loaded into memory, or a key that never
//! leaves a KMS or an HSM ([`RemoteKey`], implemented by the `ca-keys` crate). rcgen signs
//! through [`CaKey`] either way.

use std::cell::RefCell;
use std::sync::Arc;

use rcgen::{PublicKeyData, SignatureAlgorithm, SigningKey};

use crate::KeyAlgorithm;

/// A CA key held elsewhere: a KMS key, an object on a PKCS#11 token. Signing may block on the
/// network or the token; it is called from the issuing threads, several at once.
pub trait RemoteKey: Send + Sync + std::fmt::Debug {
    /// Where the key is, as a key URI (`awskms:...`, `pkcs11:...`): what the CA folder records.
    fn uri(&self) -> String;
    /// The key type.
    fn algorithm(&self) -> KeyAlgorithm;
    /// The public key as X.509 carries it in subjectPublicKey: the uncompressed EC point.
    fn public_key_raw(&self) -> &[u8];
    /// An ECDSA signature over `message` (SHA-256 for P-256, SHA-384 for P-384), DER-encoded
    /// as X.509 wants it; the error is one line naming what failed.
    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, String>;
}

/// The key that signs: in memory, or remote.
pub(crate) enum CaKey {
    /// Loaded from the CA folder's key file.
    File(rcgen::KeyPair),
    /// A KMS key or a token object.
    Remote(Arc<dyn RemoteKey>),
}

impl std::fmt::Debug for CaKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CaKey::File(_) => f.write_str("CaKey::File(<redacted>)"),
            CaKey::Remote(key) => write!(f, "CaKey::Remote({})", key.uri()),
        }
    }
}

impl CaKey {
    /// The public key bits (subjectPublicKey).
    pub(crate) fn public_key_raw(&self) -> &[u8] {
        match self {
            CaKey::File(key) => key.public_key_raw(),
            CaKey::Remote(key) => key.public_key_raw(),
        }
    }
}

thread_local! {
    /// Why the last remote signature on this thread failed: rcgen's error carries no text.
    static REMOTE_ERROR: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// The reason of the last remote signing failure on this thread, taken.
pub(crate) fn take_remote_error() -> Option<String> {
    REMOTE_ERROR.with(|cell| cell.borrow_mut().take())
}

impl PublicKeyData for CaKey {
    fn der_bytes(&self) -> &[u8] {
        self.public_key_raw()
    }

    fn algorithm(&self) -> &'static SignatureAlgorithm {
        match self {
            CaKey::File(key) => key.algorithm(),
            CaKey::Remote(key) => key.algorithm().rcgen(),
        }
    }
}

impl SigningKey for CaKey {
    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, rcgen::Error> {
        match self {
            CaKey::File(key) => key.sign(msg),
            CaKey::Remote(key) => key.sign(msg).map_err(|reason| {
                REMOTE_ERROR.with(|cell| *cell.borrow_mut() = Some(reason));
                rcgen::Error::RemoteKeyError
            }),
        }
    }
}
