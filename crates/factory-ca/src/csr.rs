use std::path::Path;

use time::OffsetDateTime;
use x509_parser::oid_registry::{
    OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_NIST_EC_P384, OID_PKCS1_RSAENCRYPTION,
};
use x509_parser::prelude::{FromDer, X509CertificationRequest};
use x509_parser::public_key::PublicKey;

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
    let alg = &spki.algorithm.algorithm;
    if *alg == OID_KEY_TYPE_EC_PUBLIC_KEY {
        let curve = spki
            .algorithm
            .parameters
            .as_ref()
            .and_then(|p| p.as_oid().ok());
        if !curve
            .as_ref()
            .is_some_and(|c| *c == OID_EC_P256 || *c == OID_NIST_EC_P384)
        {
            return Err(Error::WeakKey {
                reason: "EC keys must be on P-256 or P-384".into(),
            });
        }
    } else if *alg == OID_PKCS1_RSAENCRYPTION {
        match spki.parsed() {
            Ok(PublicKey::RSA(rsa)) if (2048..=8192).contains(&rsa.key_size()) => {}
            Ok(PublicKey::RSA(rsa)) => {
                return Err(Error::WeakKey {
                    reason: format!("RSA {} bits; at least 2048 required", rsa.key_size()),
                })
            }
            _ => return Err(bad("malformed RSA key".into())),
        }
    } else {
        return Err(Error::WeakKey {
            reason: format!("unsupported key algorithm {}", alg.to_id_string()),
        });
    }
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
