//! Device certificates from a template: everything a batch shares (issuer, validity, the
//! signature algorithm, the extensions but the key identifier) encoded once, and per device
//! only the serial, the CN, the public key and its identifier spliced in before the CA signs.
//!
//! The bytes are exactly those rcgen writes for the device profile (field order, string and
//! time types, extension order and criticality); a test holds the two side by side. Doing it
//! here saves rcgen's per-certificate parameter building and DER writer, which cost about as
//! much as the key generation the batch exists for.

use rcgen::{PublicKeyData, SigningKey};
use time::OffsetDateTime;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::signer::CaKey;
use crate::Error;

/// Appends DER length octets for `len` (short form below 128, long form above): the one DER
/// length encoder, shared with `ca-keys`' signature encoding.
pub fn push_der_len(out: &mut Vec<u8>, len: usize) {
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes = len.to_be_bytes();
        let skip = bytes.iter().take_while(|b| **b == 0).count();
        out.push(0x80 | (bytes.len() - skip) as u8);
        out.extend_from_slice(&bytes[skip..]);
    }
}

/// A TLV with `tag` around `content`.
fn push_tlv(out: &mut Vec<u8>, tag: u8, content: &[u8]) {
    out.push(tag);
    push_der_len(out, content.len());
    out.extend_from_slice(content);
}

fn tlv(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(content.len() + 4);
    push_tlv(&mut out, tag, content);
    out
}

/// UTCTime for 1950 to 2049, GeneralizedTime otherwise (RFC 5280 4.1.2.5), whole seconds.
fn time(t: OffsetDateTime) -> Vec<u8> {
    let t = t.to_offset(time::UtcOffset::UTC);
    let (year, month, day) = (t.year(), u8::from(t.month()), t.day());
    let clock = format!(
        "{month:02}{day:02}{:02}{:02}{:02}Z",
        t.hour(),
        t.minute(),
        t.second()
    );
    if (1950..2050).contains(&year) {
        tlv(0x17, format!("{:02}{clock}", year % 100).as_bytes())
    } else {
        tlv(0x18, format!("{year:04}{clock}").as_bytes())
    }
}

// Object identifiers and fixed parts, DER.
const VERSION_3: [u8; 5] = [0xa0, 0x03, 0x02, 0x01, 0x02];
const OID_CN: [u8; 5] = [0x06, 0x03, 0x55, 0x04, 0x03];
const OID_AKI: [u8; 5] = [0x06, 0x03, 0x55, 0x1d, 0x23];
const OID_KU: [u8; 5] = [0x06, 0x03, 0x55, 0x1d, 0x0f];
const OID_EKU: [u8; 5] = [0x06, 0x03, 0x55, 0x1d, 0x25];
const OID_SKI: [u8; 5] = [0x06, 0x03, 0x55, 0x1d, 0x0e];
const OID_BC: [u8; 5] = [0x06, 0x03, 0x55, 0x1d, 0x13];
const CRITICAL: [u8; 3] = [0x01, 0x01, 0xff];
/// keyUsage: digitalSignature only.
const KU_VALUE: [u8; 4] = [0x03, 0x02, 0x07, 0x80];
/// extKeyUsage: clientAuth.
const EKU_VALUE: [u8; 12] = [
    0x30, 0x0a, 0x06, 0x08, 0x2b, 0x06, 0x01, 0x05, 0x05, 0x07, 0x03, 0x02,
];
/// basicConstraints: CA:FALSE (an empty SEQUENCE).
const BC_VALUE: [u8; 2] = [0x30, 0x00];

/// An extension: `SEQUENCE { oid, [critical], OCTET STRING value }`.
fn extension(oid: &[u8], critical: bool, value: &[u8]) -> Vec<u8> {
    let mut content = oid.to_vec();
    if critical {
        content.extend_from_slice(&CRITICAL);
    }
    push_tlv(&mut content, 0x04, value);
    tlv(0x30, &content)
}

/// What every device certificate of one batch shares.
pub(crate) struct DeviceTemplate {
    /// The CA's signature AlgorithmIdentifier.
    signature_algorithm: Vec<u8>,
    /// signature, issuer, validity: between the serial and the subject.
    middle: Vec<u8>,
    /// The authority key identifier, key usage and extended key usage extensions.
    extensions_head: Vec<u8>,
    /// The basic constraints extension.
    extensions_tail: Vec<u8>,
    /// Length of the extensions with a 20-byte subject key identifier.
    extensions_len: usize,
}

impl DeviceTemplate {
    /// The template for devices `ca_cert_der`'s key signs with `signature_algorithm`, valid
    /// from `not_before` to `not_after`.
    pub(crate) fn new(
        ca_cert_der: &[u8],
        signature_algorithm: &rcgen::SignatureAlgorithm,
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
    ) -> Result<DeviceTemplate, Error> {
        let bad = |reason: String| Error::BadCertificate {
            what: "the CA certificate".to_owned(),
            reason,
        };
        let (_, ca) = X509Certificate::from_der(ca_cert_der).map_err(|e| bad(e.to_string()))?;
        // The issuer is the CA's subject, byte for byte.
        let issuer = ca.tbs_certificate.subject.as_raw();
        let authority_key_id = match ca
            .iter_extensions()
            .find_map(|e| match e.parsed_extension() {
                x509_parser::extensions::ParsedExtension::SubjectKeyIdentifier(id) => {
                    Some(id.0.to_vec())
                }
                _ => None,
            }) {
            Some(id) => id,
            // rcgen's own way for a CA without one: the first 20 bytes of SHA-256(SPKI).
            None => aws_lc_rs::digest::digest(
                &aws_lc_rs::digest::SHA256,
                ca.tbs_certificate.subject_pki.raw,
            )
            .as_ref()[..20]
                .to_vec(),
        };
        let signature_algorithm = {
            let mut content = Vec::new();
            for oid in signature_algorithm_oids(signature_algorithm)? {
                content.extend_from_slice(oid);
            }
            tlv(0x30, &content)
        };
        let mut middle = signature_algorithm.clone();
        middle.extend_from_slice(issuer);
        let mut validity = time(not_before);
        validity.extend_from_slice(&time(not_after));
        push_tlv(&mut middle, 0x30, &validity);

        let mut extensions_head = extension(&OID_AKI, false, &{
            let mut aki = Vec::new();
            push_tlv(&mut aki, 0x80, &authority_key_id);
            tlv(0x30, &aki)
        });
        extensions_head.extend_from_slice(&extension(&OID_KU, true, &KU_VALUE));
        extensions_head.extend_from_slice(&extension(&OID_EKU, false, &EKU_VALUE));
        let extensions_tail = extension(&OID_BC, true, &BC_VALUE);
        let ski_len = extension(&OID_SKI, false, &tlv(0x04, &[0u8; 20])).len();
        let extensions_len = extensions_head.len() + ski_len + extensions_tail.len();
        Ok(DeviceTemplate {
            signature_algorithm,
            middle,
            extensions_head,
            extensions_tail,
            extensions_len,
        })
    }

    /// The TBSCertificate of device `cn` with `serial` (positive, minimal) and `public_key`.
    pub(crate) fn tbs(&self, serial: &[u8], cn: &str, public_key: &impl PublicKeyData) -> Vec<u8> {
        let spki = public_key.subject_public_key_info();
        let ski = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &spki);
        let mut content = Vec::with_capacity(512);
        content.extend_from_slice(&VERSION_3);
        push_tlv(&mut content, 0x02, serial);
        content.extend_from_slice(&self.middle);
        // subject: one RDN, CN as UTF8String
        let mut atv = OID_CN.to_vec();
        push_tlv(&mut atv, 0x0c, cn.as_bytes());
        let rdn = tlv(0x31, &tlv(0x30, &atv));
        push_tlv(&mut content, 0x30, &rdn);
        content.extend_from_slice(&spki);
        // [3] { SEQUENCE { AKI, KU, EKU, SKI, BC } }
        let mut extensions = Vec::with_capacity(self.extensions_len);
        extensions.extend_from_slice(&self.extensions_head);
        extensions.extend_from_slice(&extension(&OID_SKI, false, &tlv(0x04, &ski.as_ref()[..20])));
        extensions.extend_from_slice(&self.extensions_tail);
        push_tlv(&mut content, 0xa3, &tlv(0x30, &extensions));
        tlv(0x30, &content)
    }

    /// The certificate: `tbs` signed by `key`.
    pub(crate) fn sign(&self, tbs: Vec<u8>, key: &CaKey) -> Result<Vec<u8>, Error> {
        let signature = key.sign(&tbs)?;
        let mut bits = Vec::with_capacity(signature.len() + 1);
        bits.push(0);
        bits.extend_from_slice(&signature);
        let mut content = tbs;
        content.extend_from_slice(&self.signature_algorithm);
        push_tlv(&mut content, 0x03, &bits);
        Ok(tlv(0x30, &content))
    }
}

/// The DER OIDs of the AlgorithmIdentifier for the CA keys jitr uses (ECDSA; no parameters).
fn signature_algorithm_oids(alg: &rcgen::SignatureAlgorithm) -> Result<Vec<&'static [u8]>, Error> {
    // ecdsa-with-SHA256 1.2.840.10045.4.3.2 and ecdsa-with-SHA384 1.2.840.10045.4.3.3
    const SHA256: &[u8] = &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x02];
    const SHA384: &[u8] = &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x03];
    if alg == &rcgen::PKCS_ECDSA_P256_SHA256 {
        Ok(vec![SHA256])
    } else if alg == &rcgen::PKCS_ECDSA_P384_SHA384 {
        Ok(vec![SHA384])
    } else {
        Err(Error::WeakKey {
            reason: "the CA key must be ECDSA P-256 or P-384".to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::DeviceKey;
    use crate::{Ca, CaInit, IssuingCa, KeyAlgorithm, KeyProtection};
    use rcgen::{CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyUsagePurpose};
    use time::Duration;

    /// The device certificate as rcgen writes it for the profile (how jitr built them before
    /// the template), with the serial and validity given.
    fn with_rcgen(
        ca: &Ca,
        cn: &str,
        key: &impl PublicKeyData,
        serial: &[u8],
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
    ) -> Vec<u8> {
        let mut params = CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, cn);
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;
        params.not_before = not_before;
        params.not_after = not_after;
        params.serial_number = Some(rcgen::SerialNumber::from_slice(serial));
        params.signed_by(key, &ca.issuer).unwrap().der().to_vec()
    }

    fn tbs_of(der: &[u8]) -> Vec<u8> {
        let (_, cert) = X509Certificate::from_der(der).unwrap();
        cert.tbs_certificate.as_ref().to_vec()
    }

    fn ca(root: KeyAlgorithm, issuing: bool) -> (tempfile::TempDir, Ca) {
        let dir = tempfile::tempdir().unwrap();
        CaInit {
            dir: dir.path().to_owned(),
            root_subject: "O=Acme Corp,CN=Acme fleet root".parse().unwrap(),
            root_key: root,
            root_days: 3650,
            issuing: issuing.then(|| IssuingCa {
                subject: "O=Acme Corp,CN=Acme issuing CA".parse().unwrap(),
                key: KeyAlgorithm::P256,
                days: 1000,
            }),
            protection: KeyProtection::InsecurePlaintext,
            root_protection: Some(KeyProtection::InsecurePlaintext),
            remote_key: None,
        }
        .run(OffsetDateTime::now_utc())
        .unwrap();
        let ca = Ca::load(dir.path(), None).unwrap();
        (dir, ca)
    }

    #[test]
    fn the_template_writes_what_rcgen_writes_for_the_device_profile() {
        let now = OffsetDateTime::now_utc().replace_nanosecond(0).unwrap();
        let rsa = rcgen::KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256).unwrap();
        for (root, issuing) in [
            (KeyAlgorithm::P256, false),
            (KeyAlgorithm::P384, false),
            (KeyAlgorithm::P384, true),
        ] {
            let (_dir, ca) = ca(root, issuing);
            // Before and after 2050: UTCTime, then GeneralizedTime.
            for (not_before, not_after) in [
                (now - Duration::minutes(1), now + Duration::days(365)),
                (
                    now,
                    OffsetDateTime::new_utc(
                        time::Date::from_calendar_date(2061, time::Month::March, 9).unwrap(),
                        time::Time::from_hms(23, 59, 59).unwrap(),
                    ),
                ),
            ] {
                let algorithm = rcgen::PublicKeyData::algorithm(ca.issuer.key());
                let template =
                    DeviceTemplate::new(&ca.cert_der, algorithm, not_before, not_after).unwrap();
                for (key_alg, cn) in [
                    (KeyAlgorithm::P256, "0123456789abcdef0123456789abcdef"),
                    (
                        KeyAlgorithm::P384,
                        "thing:with_a-long-name".repeat(5).as_str(),
                    ),
                ] {
                    let key = DeviceKey::generate(key_alg).unwrap();
                    let serial = [0x45; 16];
                    let ours = template.tbs(&serial, cn, &key);
                    let theirs = with_rcgen(&ca, cn, &key, &serial, not_before, not_after);
                    assert_eq!(
                        ours,
                        tbs_of(&theirs),
                        "{root:?} issuing={issuing} {key_alg:?}"
                    );
                    // And signed, it is a certificate that verifies with the CA's key.
                    let cert = template.sign(ours, ca.issuer.key()).unwrap();
                    let (_, parsed) = X509Certificate::from_der(&cert).unwrap();
                    let (_, issuer) = X509Certificate::from_der(&ca.cert_der).unwrap();
                    parsed.verify_signature(Some(issuer.public_key())).unwrap();
                }
                // A device key from a CSR may be RSA: the SPKI is the key's own.
                let ours = template.tbs(&[0x51; 16], "rsa-device", &rsa);
                let theirs =
                    with_rcgen(&ca, "rsa-device", &rsa, &[0x51; 16], not_before, not_after);
                assert_eq!(ours, tbs_of(&theirs));
            }
        }
    }
}
