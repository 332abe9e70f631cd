//! Own-CA tooling for AWS IoT Just-In-Time Registration.
//!
//! Creates the fleet owner's CA (optionally an offline root above an issuing CA), the
//! verification certificate AWS IoT asks for when the CA is registered, and device
//! certificates (key generated here, or a device's CSR signed) to the profile in docs/design.md.
//! [`inspect`] checks any certificate against that profile; the activator uses the same
//! checks before it activates anything.

mod bundle;
mod ca;
mod csr;
mod error;
mod id;
mod inspect;
mod issue;
mod keys;
mod manifest;
mod pem;
mod profile;
mod random;
mod run;
mod signer;
mod template;
mod write;

pub use bundle::{
    issue_bundle, issue_bundle_then, issue_bundle_with, BundleOptions, BundleReport, BundleSinks,
};
pub use ca::{
    ca_key_uri, read_certificate, Ca, CaFiles, CaInit, IssuingCa, CA_CERT_FILE, CA_KEY_FILE,
    CA_KEY_URI_FILE, ROOT_CERT_FILE, ROOT_KEY_FILE,
};
pub use csr::CsrOptions;
pub use error::Error;
pub use id::{DeviceId, IdFormat};
pub use inspect::{
    certificates_from_pem_or_der, inspect_device_certificate, show_time, Check, Finding,
    InspectOptions, Inspection,
};
pub use issue::{
    issue_batch, issue_batch_with, BatchOptions, BatchReport, DeviceFailure, IssuedDevice,
    Rotation, CHAIN_FILE, DEVICE_CERT_FILE, DEVICE_KEY_FILE, REMOTE_JOBS,
};
pub use keys::{KeyAlgorithm, KeyProtection, KeyRole, Passphrase, MIN_PASSPHRASE_CHARS};
pub use manifest::{certificate_id, read_manifest, Manifest, ManifestEntry, MANIFEST_FILE};
pub use profile::{Profile, Subject, DEFAULT_MAX_DEVICE_DAYS, PROFILE_FILE};
pub use run::{RunControl, Stage, Timings};
pub use signer::RemoteKey;
pub use template::push_der_len;
pub use write::write_file_atomic;

/// Result alias for this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
