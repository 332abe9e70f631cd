//! Signing a device's CSR: the device keeps its key; the CSR's CN is the device id.

use std::path::Path;

use time::OffsetDateTime;
use x509_parser::prelude::{FromDer, X509CertificationRequest};

use crate::inspect::check_public_key;
use crate::issue::{check_new_ids, write_device};
use crate::write::create_dir;
use crate::{Ca, DeviceId, Error, IdFormat, IssuedDevice, Manifest};

/// Parses a PEM or DER CSR, checks its self-signature and key, and returns the device id
/// (its CN) and its SubjectPublicKeyInfo DER.
fn parse_csr(bytes: &[u8], format: IdFormat) -> Result<(DeviceId, Vec<u8>), Error> {
    let bad = |reason: String| Error::BadCsr { reason };
    let der = if bytes.starts_with(b"-----") {
        let (label, der) =
            pkcs8::der::pem::decode_vec(bytes).map_err(|e| bad(format!("malformed PEM: {e}")))?;
        if label != "CERTIFICATE REQUEST" && label != "NEW CERTIFICATE REQUEST" {
            return Err(bad(format!(
                "a {label:?} PEM block, expected CERTIFICATE REQUEST"
            )));
        }
        der
    } else {
        bytes.to_vec()
    };
    let (rest, csr) = X509CertificationRequest::from_der(&der).map_err(|e| bad(e.to_string()))?;
    if !rest.is_empty() {
        return Err(bad("trailing data after the CSR".into()));
    }
    let info = &csr.certification_request_info;
    let spki = &info.subject_pki;
    // The same key rule as for certificates (curve, point, RSA size and validity).
    check_public_key(spki).map_err(|reason| Error::WeakKey { reason })?;
    // After the key checks, so a weak key is reported as such rather than as a bad signature.
    csr.verify_signature().map_err(|_| Error::CsrSignature)?;
    let cns: Vec<_> = info.subject.iter_common_name().collect();
    let [cn] = cns.as_slice() else {
        return Err(bad(format!(
            "the subject must hold exactly one CN (found {})",
            cns.len()
        )));
    };
    let cn = cn
        .as_str()
        .map_err(|_| bad("the CN is not a text string".into()))?;
    Ok((DeviceId::parse(cn, format)?, spki.raw.to_vec()))
}

impl Ca {
    /// Signs a device's CSR (PEM or DER); the device keeps its key. The CN is the device id.
    pub fn sign_csr(
        &self,
        csr: &[u8],
        days: u32,
        now: OffsetDateTime,
    ) -> Result<IssuedDevice, Error> {
        let (id, spki) = parse_csr(csr, self.profile.device.id_format)?;
        let public_key = rcgen::SubjectPublicKeyInfo::from_der(&spki)?;
        self.sign_device(&id, &public_key, days, now, None)
    }

    /// Signs a CSR and records it like `issue` does: `out/<id>/{device.crt, chain.pem}` and a
    /// manifest line; refuses an id already issued unless `force`.
    pub fn sign_csr_into(
        &self,
        csr: &[u8],
        out: &Path,
        days: u32,
        force: bool,
        now: OffsetDateTime,
    ) -> Result<IssuedDevice, Error> {
        let issued = self.sign_csr(csr, days, now)?;
        create_dir(out)?;
        let mut manifest = Manifest::open(out)?;
        let id = DeviceId::parse(&issued.entry.id, crate::IdFormat::Any)?;
        check_new_ids([&id], &manifest, force)?;
        write_device(out, &issued)?;
        manifest.append(&issued.entry)?;
        manifest.flush()?;
        Ok(issued)
    }
}
