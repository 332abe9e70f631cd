//! Everything that can go wrong while running the CA, one variant per cause.

use std::io;
use std::path::PathBuf;

/// Everything that can go wrong while running the CA.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A device id does not have the required format.
    #[error("invalid device id {id:?}: {reason}")]
    InvalidDeviceId { id: String, reason: &'static str },
    /// A registration code that cannot be a certificate CN.
    #[error("invalid registration code {code:?}: expected 1 to 128 letters and digits")]
    InvalidRegistrationCode { code: String },
    /// A file could not be read.
    #[error("cannot read {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A file or folder could not be written.
    #[error("cannot write {}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The CA folder lacks a file the operation needs.
    #[error("{} not found: is {} a CA folder made by `jitr ca init`?", path.display(), dir.display())]
    MissingCaFile { dir: PathBuf, path: PathBuf },
    /// `ca init` would overwrite an existing CA key.
    #[error("{} already exists: refusing to overwrite a CA key", path.display())]
    CaExists { path: PathBuf },
    /// The passphrase does not decrypt the key.
    #[error("wrong passphrase for {}", path.display())]
    WrongPassphrase { path: PathBuf },
    /// An empty passphrase was given.
    #[error("the CA passphrase is empty")]
    EmptyPassphrase,
    /// The key is encrypted but no passphrase was given.
    #[error("{} is encrypted: a passphrase is required", path.display())]
    PassphraseRequired { path: PathBuf },
    /// A private key file is not in a format we read.
    #[error("{} is not a PKCS#8 private key: {reason}", path.display())]
    KeyFormat { path: PathBuf, reason: String },
    /// A key has a type or size outside the profile.
    #[error("key rejected: {reason}")]
    WeakKey { reason: String },
    /// A certificate file could not be parsed.
    #[error("{what} is not a valid X.509 certificate: {reason}")]
    BadCertificate { what: String, reason: String },
    /// A CSR could not be parsed.
    #[error("CSR is not valid: {reason}")]
    BadCsr { reason: String },
    /// A CSR's self-signature does not verify with its own key.
    #[error("CSR signature does not verify with the key it carries")]
    CsrSignature,
    /// A CSR naming another device than the one expected.
    #[error("the CSR is for device {found}, not {expected}")]
    UnexpectedCsrId { expected: String, found: String },
    /// Ids of the input are already in the manifest (`id` the first of `count`).
    #[error("device {id}{} already issued (in {}): --resume skips issued ids, --force issues them again", if *count > 1 { format!(" and {} more were", count - 1) } else { " was".to_owned() }, manifest.display())]
    AlreadyIssued {
        id: String,
        count: usize,
        manifest: PathBuf,
    },
    /// The manifest ends in part of a line: a run was stopped while writing it.
    #[error("{}:{line}: the last line is cut off (a run was stopped while writing it): rerun the same `jitr issue` with --resume, which removes it and issues that device again", path.display())]
    TornManifest { path: PathBuf, line: usize },
    /// Another run holds the manifest.
    #[error("{} is in use by another jitr run on the same folder", path.display())]
    ManifestBusy { path: PathBuf },
    /// The same id appears twice in one request.
    #[error("device {id} appears more than once in the input")]
    DuplicateInput { id: String },
    /// The manifest holds a line we cannot read.
    #[error("{}:{line}: not a manifest entry", path.display())]
    Manifest {
        path: PathBuf,
        line: usize,
        #[source]
        source: serde_json::Error,
    },
    /// The CA profile file is invalid.
    #[error("invalid CA profile {}", path.display())]
    Profile {
        path: PathBuf,
        #[source]
        source: toml::de::Error,
    },
    /// A subject string such as `O=Acme,CN=Fleet CA` is malformed.
    #[error("invalid subject {subject:?}: {reason}")]
    Subject {
        subject: String,
        reason: &'static str,
    },
    /// The CA can sign nothing any more.
    #[error("the CA expired at {not_after}: it can sign no device")]
    CaExpired { not_after: String },
    /// A validity longer than the profile allows.
    #[error("{days} days is longer than the profile's maximum device validity of {max} days")]
    ValidityTooLong { days: u32, max: u32 },
    /// A passphrase too short for a new key.
    #[error("a CA key passphrase needs at least {min} characters")]
    WeakPassphrase { min: usize },
    /// An issuing CA without a root passphrase of its own.
    #[error("the offline root needs its own passphrase, different from the issuing CA's")]
    RootPassphraseRequired,
    /// A validity period is out of range.
    #[error("invalid validity: {reason}")]
    Validity { reason: &'static str },
    /// The worker threads for a batch could not be started.
    #[error("cannot start the issuing threads")]
    Workers(#[source] rayon::ThreadPoolBuildError),
    /// rcgen refused to build a certificate.
    #[error("certificate generation failed")]
    Rcgen(#[source] rcgen::Error),
    /// The CA key in a KMS or on a token could not sign.
    #[error("the CA key could not sign: {reason}")]
    RemoteKey { reason: String },
    /// The CA folder's key is remote and no remote key was given to load it.
    #[error("the CA key is {uri}: open it with the key backends (jitr does)")]
    RemoteKeyNeeded { uri: String },
    /// The remote key given is not the one the CA folder names, or not the CA certificate's.
    #[error("{what}")]
    RemoteKeyMismatch { what: String },
    /// The OS random generator or a primitive failed.
    #[error("cryptographic operation failed: {op}")]
    Crypto { op: &'static str },
}

impl From<rcgen::Error> for Error {
    fn from(e: rcgen::Error) -> Self {
        match e {
            // A KMS or token failure: the signer left its reason on this thread.
            rcgen::Error::RemoteKeyError => Error::RemoteKey {
                reason: crate::signer::take_remote_error()
                    .unwrap_or_else(|| "the remote key failed".to_owned()),
            },
            other => Error::Rcgen(other),
        }
    }
}
