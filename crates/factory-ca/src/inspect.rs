//! Checks a certificate against the device profile (docs/design.md), one finding per rule.
//!
//! The operator's `jitr inspect` prints these findings; the activator refuses to activate
//! a certificate with any failing finding, quoting the first as the reason.

use std::fmt;

use aws_lc_rs::signature::{
    EcdsaVerificationAlgorithm, ParsedPublicKey, ECDSA_P256_SHA256_ASN1, ECDSA_P384_SHA384_ASN1,
};
use serde::Serialize;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use x509_parser::der_parser::asn1_rs::Tag;
use x509_parser::extensions::ParsedExtension;
use x509_parser::oid_registry::{
    Oid, OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_NIST_EC_P384, OID_PKCS1_RSAENCRYPTION,
    OID_PKCS1_SHA256WITHRSA, OID_PKCS1_SHA384WITHRSA, OID_PKCS1_SHA512WITHRSA,
    OID_SIG_ECDSA_WITH_SHA256, OID_SIG_ECDSA_WITH_SHA384, OID_SIG_ECDSA_WITH_SHA512,
    OID_X509_EXT_AUTHORITY_KEY_IDENTIFIER, OID_X509_EXT_BASIC_CONSTRAINTS,
    OID_X509_EXT_EXTENDED_KEY_USAGE, OID_X509_EXT_KEY_USAGE, OID_X509_EXT_SUBJECT_ALT_NAME,
    OID_X509_EXT_SUBJECT_KEY_IDENTIFIER,
};
use x509_parser::prelude::{FromDer, X509Certificate, X509Version};
use x509_parser::public_key::PublicKey;
use x509_parser::x509::SubjectPublicKeyInfo;

use crate::{DeviceId, IdFormat};

/// Largest certificate (or PEM file) we look at; real device certificates are ~1 KiB.
const MAX_INPUT: usize = 64 * 1024;

/// One rule of the device profile.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Check {
    /// The bytes are one well-formed X.509 certificate.
    Parse,
    /// X.509 version 3.
    Version,
    /// A valid EC P-256/P-384 key, or a valid RSA key of 2048 to 8192 bits.
    KeyType,
    /// ECDSA or RSA PKCS#1 with SHA-256 or stronger.
    SignatureAlgorithm,
    /// Not a CA (basicConstraints CA:FALSE or absent).
    BasicConstraints,
    /// Critical keyUsage with digitalSignature and no CA usages.
    KeyUsage,
    /// extendedKeyUsage includes clientAuth.
    ExtendedKeyUsage,
    /// No critical extension outside the profile (RFC 5280 4.2: it must be refused).
    CriticalExtensions,
    /// The current time lies within notBefore..notAfter.
    Validity,
    /// Exactly one subject CN, and it is a valid device id.
    CommonName,
    /// Serial positive, non-zero, at most 20 bytes, at least 64 bits.
    Serial,
    /// Issued and signed by the given CA.
    Issuer,
}

impl fmt::Display for Check {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = serde_json::to_value(self).ok();
        f.write_str(s.as_ref().and_then(|v| v.as_str()).unwrap_or("?"))
    }
}

/// The outcome of one check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    /// Which rule.
    pub check: Check,
    /// Whether the certificate satisfies it.
    pub ok: bool,
    /// What was found, in words.
    pub detail: String,
}

/// Every finding for one certificate.
#[derive(Debug, Clone, Serialize)]
pub struct Inspection {
    /// Findings in check order.
    pub findings: Vec<Finding>,
    /// The CN, when it is a valid device id.
    #[serde(serialize_with = "ser_id")]
    pub device_id: Option<DeviceId>,
    /// Lowercase hex SHA-256 of the DER (the AWS IoT certificate id).
    pub certificate_id: String,
    /// notBefore, when the certificate parses.
    #[serde(skip)]
    pub not_before: Option<OffsetDateTime>,
    /// notAfter, when the certificate parses.
    #[serde(skip)]
    pub not_after: Option<OffsetDateTime>,
}

fn ser_id<S: serde::Serializer>(id: &Option<DeviceId>, s: S) -> Result<S::Ok, S::Error> {
    match id {
        Some(id) => s.serialize_some(id.as_str()),
        None => s.serialize_none(),
    }
}

impl Inspection {
    /// True when every check passed.
    pub fn passed(&self) -> bool {
        self.findings.iter().all(|f| f.ok)
    }

    /// The first failing check, if any.
    pub fn first_failure(&self) -> Option<&Finding> {
        self.findings.iter().find(|f| !f.ok)
    }
}

/// What to inspect against.
#[derive(Debug, Clone)]
pub struct InspectOptions<'a> {
    /// Accepted device ids.
    pub id_format: IdFormat,
    /// DER of the CA that must have signed the certificate.
    pub ca_der: Option<&'a [u8]>,
    /// The time validity is judged at.
    pub now: OffsetDateTime,
    /// The longest validity (notBefore to notAfter) the profile allows, in days.
    pub max_validity_days: Option<u32>,
}

struct Findings(Vec<Finding>);

impl Findings {
    fn push(&mut self, check: Check, result: Result<String, String>) {
        let (ok, detail) = match result {
            Ok(d) => (true, d),
            Err(d) => (false, d),
        };
        self.0.push(Finding { check, ok, detail });
    }
}

/// Inspects one DER certificate against the device profile.
pub fn inspect_device_certificate(der: &[u8], opts: &InspectOptions<'_>) -> Inspection {
    let certificate_id = crate::certificate_id(der);
    let mut out = Findings(Vec::new());
    let parsed = if der.len() > MAX_INPUT {
        Err(format!(
            "{} bytes is larger than any device certificate",
            der.len()
        ))
    } else {
        match X509Certificate::from_der(der) {
            Ok(([], cert)) => Ok(cert),
            Ok((rest, _)) => Err(format!(
                "{} bytes of trailing data after the certificate",
                rest.len()
            )),
            Err(e) => Err(format!("not DER X.509: {e}")),
        }
    };
    let cert = match parsed {
        Ok(cert) => cert,
        Err(detail) => {
            out.push(Check::Parse, Err(detail));
            return Inspection {
                findings: out.0,
                device_id: None,
                certificate_id,
                not_before: None,
                not_after: None,
            };
        }
    };
    out.push(Check::Parse, Ok("one X.509 certificate".into()));
    out.push(
        Check::Version,
        if cert.version() == X509Version::V3 {
            Ok("v3".into())
        } else {
            Err(format!("{:?}, expected v3", cert.version()))
        },
    );
    out.push(Check::KeyType, key_type(&cert));
    out.push(Check::SignatureAlgorithm, signature_algorithm(&cert));
    out.push(Check::BasicConstraints, basic_constraints(&cert));
    out.push(Check::KeyUsage, key_usage(&cert));
    out.push(Check::ExtendedKeyUsage, extended_key_usage(&cert));
    out.push(Check::CriticalExtensions, critical_extensions(&cert));
    out.push(
        Check::Validity,
        validity(&cert, opts.now, opts.max_validity_days),
    );
    let (cn_result, device_id) = common_name(&cert, opts.id_format);
    out.push(Check::CommonName, cn_result);
    out.push(Check::Serial, serial(cert.raw_serial()));
    if let Some(ca_der) = opts.ca_der {
        out.push(Check::Issuer, issued_by(&cert, ca_der, opts.now));
    }
    Inspection {
        findings: out.0,
        device_id,
        certificate_id,
        not_before: Some(cert.validity().not_before.to_datetime()),
        not_after: Some(cert.validity().not_after.to_datetime()),
    }
}

fn curve(params: Option<&Oid<'_>>) -> Option<(&'static str, &'static EcdsaVerificationAlgorithm)> {
    match params {
        Some(oid) if *oid == OID_EC_P256 => Some(("P-256", &ECDSA_P256_SHA256_ASN1)),
        Some(oid) if *oid == OID_NIST_EC_P384 => Some(("P-384", &ECDSA_P384_SHA384_ASN1)),
        _ => None,
    }
}

fn key_type(cert: &X509Certificate<'_>) -> Result<String, String> {
    check_public_key(cert.public_key())
}

/// The key rule of the profile, for a certificate's or a CSR's key: a valid P-256/P-384 point,
/// or a valid RSA key of 2048 to 8192 bits.
pub(crate) fn check_public_key(spki: &SubjectPublicKeyInfo<'_>) -> Result<String, String> {
    let alg = &spki.algorithm.algorithm;
    if *alg == OID_KEY_TYPE_EC_PUBLIC_KEY {
        // `as_oid` reads any tag's contents as an OID: only a namedCurve OID names a curve.
        let named = spki
            .algorithm
            .parameters
            .as_ref()
            .filter(|p| p.tag() == Tag::Oid)
            .and_then(|p| p.as_oid().ok());
        return match curve(named.as_ref()) {
            // A point off the curve (or not a point) is no key at all.
            Some((name, alg)) => match ParsedPublicKey::new(alg, &*spki.subject_public_key.data) {
                Ok(_) => Ok(format!("EC {name}")),
                Err(_) => Err(format!("EC public key is not a point on {name}")),
            },
            None => Err(format!(
                "EC key on curve {}, expected P-256 or P-384",
                named
                    .map(|c| c.to_id_string())
                    .unwrap_or_else(|| "(not a named curve)".into())
            )),
        };
    }
    if *alg == OID_PKCS1_RSAENCRYPTION {
        return match spki.parsed() {
            Ok(PublicKey::RSA(rsa)) if rsa.key_size() >= 2048 && rsa.key_size() <= 8192 => {
                // aws-lc's RSA_check_key: odd modulus, odd exponent greater than 1.
                match aws_lc_rs::rsa::PublicKey::from_der(&spki.subject_public_key.data) {
                    Ok(_) => Ok(format!("RSA {} bits", rsa.key_size())),
                    Err(_) => Err("RSA public key is not valid (modulus or exponent)".into()),
                }
            }
            Ok(PublicKey::RSA(rsa)) => Err(format!(
                "RSA {} bits, expected 2048 to 8192",
                rsa.key_size()
            )),
            _ => Err("malformed RSA public key".into()),
        };
    }
    Err(format!(
        "key algorithm {}, expected EC or RSA",
        alg.to_id_string()
    ))
}

fn signature_algorithm(cert: &X509Certificate<'_>) -> Result<String, String> {
    let outer = &cert.signature_algorithm.algorithm;
    if *outer != cert.tbs_certificate.signature.algorithm {
        return Err("the signature algorithm differs inside and outside the signed part".into());
    }
    let name = [
        (&OID_SIG_ECDSA_WITH_SHA256, "ecdsa-with-SHA256"),
        (&OID_SIG_ECDSA_WITH_SHA384, "ecdsa-with-SHA384"),
        (&OID_SIG_ECDSA_WITH_SHA512, "ecdsa-with-SHA512"),
        (&OID_PKCS1_SHA256WITHRSA, "sha256WithRSAEncryption"),
        (&OID_PKCS1_SHA384WITHRSA, "sha384WithRSAEncryption"),
        (&OID_PKCS1_SHA512WITHRSA, "sha512WithRSAEncryption"),
    ]
    .into_iter()
    .find(|(oid, _)| *oid == outer)
    .map(|(_, name)| name);
    name.map(str::to_owned).ok_or_else(|| {
        format!(
            "signature algorithm {} is not ECDSA/RSA with SHA-256 or stronger",
            outer.to_id_string()
        )
    })
}

fn basic_constraints(cert: &X509Certificate<'_>) -> Result<String, String> {
    match cert.basic_constraints() {
        Ok(None) => Ok("absent (not a CA)".into()),
        Ok(Some(bc)) if !bc.value.ca => Ok("CA:FALSE".into()),
        Ok(Some(_)) => Err("CA:TRUE: a device certificate must not be a CA".into()),
        Err(e) => Err(format!("malformed basicConstraints: {e}")),
    }
}

fn key_usage(cert: &X509Certificate<'_>) -> Result<String, String> {
    match cert.key_usage() {
        Ok(Some(ku)) => {
            if !ku.critical {
                Err("keyUsage is not critical".into())
            } else if !ku.value.digital_signature() {
                Err(format!("keyUsage {} lacks digitalSignature", ku.value))
            } else if ku.value.key_cert_sign() || ku.value.crl_sign() {
                Err(format!("keyUsage {} allows signing certificates", ku.value))
            } else {
                Ok(format!("critical {}", ku.value))
            }
        }
        Ok(None) => Err("keyUsage is missing".into()),
        Err(e) => Err(format!("malformed keyUsage: {e}")),
    }
}

fn extended_key_usage(cert: &X509Certificate<'_>) -> Result<String, String> {
    match cert.extended_key_usage() {
        Ok(Some(eku)) if eku.value.client_auth => Ok("clientAuth".into()),
        Ok(Some(_)) => Err("extendedKeyUsage lacks clientAuth".into()),
        Ok(None) => Err("extendedKeyUsage is missing (clientAuth required)".into()),
        Err(e) => Err(format!("malformed extendedKeyUsage: {e}")),
    }
}

/// The extensions the profile reads; any other one marked critical must be refused.
fn critical_extensions(cert: &X509Certificate<'_>) -> Result<String, String> {
    let known = [
        OID_X509_EXT_BASIC_CONSTRAINTS,
        OID_X509_EXT_KEY_USAGE,
        OID_X509_EXT_EXTENDED_KEY_USAGE,
        OID_X509_EXT_SUBJECT_KEY_IDENTIFIER,
        OID_X509_EXT_AUTHORITY_KEY_IDENTIFIER,
        OID_X509_EXT_SUBJECT_ALT_NAME,
    ];
    match cert
        .extensions()
        .iter()
        .find(|e| e.critical && !known.contains(&e.oid))
    {
        Some(e) => Err(format!(
            "critical extension {} is not one the profile knows",
            e.oid.to_id_string()
        )),
        None => Ok("none unknown".into()),
    }
}

/// A time as RFC 3339 text.
pub fn show_time(t: OffsetDateTime) -> String {
    t.format(&Rfc3339).unwrap_or_else(|_| t.to_string())
}

fn validity(
    cert: &X509Certificate<'_>,
    now: OffsetDateTime,
    max_days: Option<u32>,
) -> Result<String, String> {
    let v = cert.validity();
    let (nb, na) = (v.not_before.to_datetime(), v.not_after.to_datetime());
    let days = (na - nb).whole_days();
    if now < nb {
        Err(format!("not valid before {}", show_time(nb)))
    } else if now > na {
        Err(format!("expired at {}", show_time(na)))
    } else if let Some(max) = max_days.filter(|max| days > i64::from(*max)) {
        Err(format!(
            "valid for {days} days, longer than the profile's maximum of {max}"
        ))
    } else {
        Ok(format!("{} to {}", show_time(nb), show_time(na)))
    }
}

fn common_name(
    cert: &X509Certificate<'_>,
    format: IdFormat,
) -> (Result<String, String>, Option<DeviceId>) {
    let cns: Vec<_> = cert.subject().iter_common_name().collect();
    let cn = match cns.as_slice() {
        [] => {
            return (
                Err("the subject has no CN (a CN only in subjectAltName does not count)".into()),
                None,
            )
        }
        [cn] => cn,
        _ => {
            return (
                Err(format!("the subject has {} CNs, expected one", cns.len())),
                None,
            )
        }
    };
    let Ok(text) = cn.as_str() else {
        return (Err("the CN is not a text string".into()), None);
    };
    match DeviceId::parse(text, format) {
        Ok(id) => (Ok(format!("CN={id}")), Some(id)),
        Err(e) => (Err(e.to_string()), None),
    }
}

fn serial(raw: &[u8]) -> Result<String, String> {
    let hex = hex::encode(raw);
    if raw.first().is_some_and(|b| b & 0x80 != 0) {
        return Err(format!("serial {hex} is negative"));
    }
    let significant = raw.iter().skip_while(|b| **b == 0).count();
    if significant == 0 {
        return Err("serial is zero".into());
    }
    if raw.len() > 20 {
        return Err(format!("serial is {} bytes, at most 20 allowed", raw.len()));
    }
    if significant < 8 {
        return Err(format!("serial {hex} has fewer than 64 bits"));
    }
    Ok(hex)
}

fn extension_key_id<'a>(cert: &'a X509Certificate<'_>, oid: &Oid<'_>) -> Option<&'a [u8]> {
    let ext = cert.get_extension_unique(oid).ok().flatten()?;
    match ext.parsed_extension() {
        ParsedExtension::SubjectKeyIdentifier(id) => Some(id.0),
        ParsedExtension::AuthorityKeyIdentifier(aki) => aki.key_identifier.as_ref().map(|id| id.0),
        _ => None,
    }
}

fn issued_by(
    cert: &X509Certificate<'_>,
    ca_der: &[u8],
    now: OffsetDateTime,
) -> Result<String, String> {
    let (_, ca) = X509Certificate::from_der(ca_der)
        .map_err(|e| format!("the CA certificate does not parse: {e}"))?;
    if !ca.is_ca() {
        return Err("the given CA certificate is not a CA".into());
    }
    if cert.issuer().as_raw() != ca.subject().as_raw() {
        return Err(format!(
            "issuer {} is not the CA {}",
            cert.issuer(),
            ca.subject()
        ));
    }
    let ski = extension_key_id(&ca, &OID_X509_EXT_SUBJECT_KEY_IDENTIFIER);
    let aki = extension_key_id(cert, &OID_X509_EXT_AUTHORITY_KEY_IDENTIFIER);
    if let (Some(ski), Some(aki)) = (ski, aki) {
        if ski != aki {
            return Err(format!(
                "authorityKeyIdentifier {} is not the CA's {}",
                hex::encode(aki),
                hex::encode(ski)
            ));
        }
    }
    cert.verify_signature(Some(ca.public_key()))
        .map_err(|_| "the signature does not verify with the CA's public key".to_owned())?;
    // Signed by it, and covered by it: the CA valid now and the device not outliving it.
    let ca_validity = ca.validity();
    let ca_not_after = ca_validity.not_after.to_datetime();
    if now > ca_not_after {
        return Err(format!("the CA expired at {}", show_time(ca_not_after)));
    }
    if now < ca_validity.not_before.to_datetime() {
        return Err(format!(
            "the CA is not valid before {}",
            show_time(ca_validity.not_before.to_datetime())
        ));
    }
    let device_not_after = cert.validity().not_after.to_datetime();
    if device_not_after > ca_not_after {
        return Err(format!(
            "it outlives its CA: notAfter {} is after the CA's {}",
            show_time(device_not_after),
            show_time(ca_not_after)
        ));
    }
    Ok(format!("signed by {}", ca.subject()))
}

/// Splits PEM text (one or more CERTIFICATE blocks, nothing else but whitespace) or a
/// single DER certificate into DER certificates, first first. `Ok` holds at least one.
pub fn certificates_from_pem_or_der(bytes: &[u8]) -> Result<Vec<Vec<u8>>, String> {
    if bytes.len() > MAX_INPUT {
        return Err(format!(
            "{} bytes is too large for a certificate file",
            bytes.len()
        ));
    }
    let Some(first) = bytes.iter().position(|b| !b.is_ascii_whitespace()) else {
        return Err("the input is empty".into());
    };
    if bytes[first] == 0x30 {
        return Ok(vec![bytes.to_vec()]);
    }
    let text = std::str::from_utf8(bytes).map_err(|_| "neither PEM text nor DER".to_owned())?;
    const END: &str = "-----END CERTIFICATE-----";
    let mut certs = Vec::new();
    let mut rest = text.trim();
    while !rest.is_empty() {
        if !rest.starts_with("-----BEGIN ") {
            return Err("unexpected text outside PEM blocks".into());
        }
        let end = rest
            .find(END)
            .ok_or("a PEM block is not a CERTIFICATE or is not terminated")?;
        let block = &rest[..end + END.len()];
        let (label, der) = pkcs8::der::pem::decode_vec(block.as_bytes())
            .map_err(|e| format!("malformed PEM: {e}"))?;
        if label != "CERTIFICATE" {
            return Err(format!(
                "a {label:?} PEM block where a CERTIFICATE was expected"
            ));
        }
        certs.push(der);
        rest = rest[end + END.len()..].trim_start();
    }
    // Text of only non-ASCII whitespace (a vertical tab, a no-break space) gets here.
    if certs.is_empty() {
        return Err("the input holds no certificate".into());
    }
    Ok(certs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whitespace_of_any_kind_alone_is_an_error_not_an_empty_list() {
        for input in ["", " \n", "\x0b\n", "\u{a0}", "\u{2003}\r\n"] {
            assert!(
                certificates_from_pem_or_der(input.as_bytes()).is_err(),
                "{input:?}"
            );
        }
    }
}
