//! Signing a device's CSR: the device keeps its key; the CSR's CN is the device id.

use std::path::Path;

use time::OffsetDateTime;
use x509_parser::prelude::{FromDer, X509CertificationRequest};

use crate::inspect::check_public_key;
use crate::issue::{check_new_ids, write_device};
use crate::write::create_dir;
use crate::{Ca, DeviceId, Error, IdFormat, IssuedDevice, Manifest};

/// How [`Ca::sign_csr_recorded`] signs and records.
#[derive(Debug, Clone)]
pub struct CsrOptions<'a> {
    /// The folder holding `manifest.jsonl` (and `<id>/` with `write_folder`).
    pub devices: &'a Path,
    /// Write `devices/<id>/{device.crt, chain.pem}`.
    pub write_folder: bool,
    /// Validity in days.
    pub days: u32,
    /// Sign again for an id the manifest holds.
    pub force: bool,
    /// The device id the CSR must name.
    pub expect_id: Option<&'a DeviceId>,
    /// Issuance time.
    pub now: OffsetDateTime,
}

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
    // The parser's own words ("Parsing requires 1 bytes/chars") name no problem a factory
    // operator can act on: say what the bytes are not.
    let (rest, csr) = X509CertificationRequest::from_der(&der).map_err(|_| {
        bad(match declared_len(&der) {
            Some(whole) if whole > der.len() => format!(
                "not a PKCS#10 certificate request: it says {whole} bytes of DER and has {} (a cut-off file?)",
                der.len()
            ),
            _ => format!(
                "not a PKCS#10 certificate request ({} bytes of DER that do not parse as one)",
                der.len()
            ),
        })
    })?;
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

/// The length a DER SEQUENCE says it has, header included.
fn declared_len(der: &[u8]) -> Option<usize> {
    let (&tag, rest) = der.split_first()?;
    let (&first, rest) = rest.split_first()?;
    if tag != 0x30 {
        return None;
    }
    if first < 0x80 {
        return Some(2 + usize::from(first));
    }
    let n = usize::from(first & 0x7f);
    if n == 0 || n > 4 || rest.len() < n {
        return None;
    }
    let len = rest[..n]
        .iter()
        .fold(0usize, |acc, &b| (acc << 8) | usize::from(b));
    len.checked_add(2 + n)
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

    /// Signs a CSR and records it like `issue` does, in `opts.devices/manifest.jsonl` (and,
    /// with `opts.write_folder`, `devices/<id>/{device.crt, chain.pem}`); refuses an id already
    /// issued unless `opts.force`, and a CSR whose CN is not `opts.expect_id` when given.
    /// Nothing is written when a check fails.
    pub fn sign_csr_recorded(
        &self,
        csr: &[u8],
        opts: &CsrOptions<'_>,
    ) -> Result<IssuedDevice, Error> {
        let (id, _) = parse_csr(csr, self.profile.device.id_format)?;
        if let Some(expected) = opts.expect_id {
            if *expected != id {
                return Err(Error::UnexpectedCsrId {
                    expected: expected.to_string(),
                    found: id.to_string(),
                });
            }
        }
        create_dir(opts.devices)?;
        let mut manifest = Manifest::open(opts.devices)?;
        check_new_ids([&id], &manifest, opts.force, false)?;
        let issued = self.sign_csr(csr, opts.days, opts.now)?;
        if opts.write_folder {
            write_device(opts.devices, &issued)?;
        }
        manifest.append(&issued.entry)?;
        manifest.flush()?;
        Ok(issued)
    }
}
