//! The few DER shapes the backends meet: an ECDSA signature from its raw `r‖s` (what PKCS#11
//! returns) to the `ECDSA-Sig-Value` X.509 carries, the EC point inside a
//! SubjectPublicKeyInfo (what KMS returns) or an OCTET STRING (`CKA_EC_POINT`), and the named
//! curves by OID.

use factory_ca::KeyAlgorithm;

/// `id-ecPublicKey` parameters: the named curve's OID, DER-encoded (`CKA_EC_PARAMS`).
pub(crate) fn curve_oid(algorithm: KeyAlgorithm) -> &'static [u8] {
    match algorithm {
        // 1.2.840.10045.3.1.7 (prime256v1)
        KeyAlgorithm::P256 => &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07],
        // 1.3.132.0.34 (secp384r1)
        KeyAlgorithm::P384 => &[0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x22],
    }
}

/// The curve a DER OID names.
pub(crate) fn curve_of(oid: &[u8]) -> Option<KeyAlgorithm> {
    [KeyAlgorithm::P256, KeyAlgorithm::P384]
        .into_iter()
        .find(|a| curve_oid(*a) == oid)
}

/// The length of one coordinate (and of `r` and `s`).
pub(crate) fn coordinate_len(algorithm: KeyAlgorithm) -> usize {
    match algorithm {
        KeyAlgorithm::P256 => 32,
        KeyAlgorithm::P384 => 48,
    }
}

/// A positive INTEGER from big-endian magnitude bytes: leading zeros dropped, one added back
/// when the top bit is set.
fn push_integer(out: &mut Vec<u8>, magnitude: &[u8]) {
    let trimmed: &[u8] = match magnitude.iter().position(|b| *b != 0) {
        Some(first) => &magnitude[first..],
        None => &[0],
    };
    let pad = trimmed[0] & 0x80 != 0;
    out.push(0x02);
    factory_ca::push_der_len(out, trimmed.len() + usize::from(pad));
    if pad {
        out.push(0);
    }
    out.extend_from_slice(trimmed);
}

/// `r‖s` (each `coordinate_len` bytes) as a DER `ECDSA-Sig-Value`.
pub(crate) fn ecdsa_signature(raw: &[u8], algorithm: KeyAlgorithm) -> Result<Vec<u8>, String> {
    let n = coordinate_len(algorithm);
    if raw.len() != 2 * n {
        return Err(format!(
            "the token returned a {}-byte ECDSA signature, expected {}",
            raw.len(),
            2 * n
        ));
    }
    let mut body = Vec::with_capacity(2 * n + 8);
    push_integer(&mut body, &raw[..n]);
    push_integer(&mut body, &raw[n..]);
    let mut out = Vec::with_capacity(body.len() + 3);
    out.push(0x30);
    factory_ca::push_der_len(&mut out, body.len());
    out.extend_from_slice(&body);
    Ok(out)
}

/// Reads one TLV at the start of `input`: (tag, content, rest).
fn tlv(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let count = usize::from(first & 0x7f);
        if count == 0 || count > 4 || rest.len() < count {
            return None;
        }
        let len = rest[..count]
            .iter()
            .fold(0usize, |acc, b| (acc << 8) | usize::from(*b));
        (len, &rest[count..])
    };
    (rest.len() >= len).then(|| (tag, &rest[..len], &rest[len..]))
}

/// The curve and uncompressed point of an EC SubjectPublicKeyInfo (DER); `None` for anything
/// else (an RSA key, another curve).
pub(crate) fn ec_spki(spki: &[u8]) -> Option<(KeyAlgorithm, Vec<u8>)> {
    let (0x30, body, _) = tlv(spki)? else {
        return None;
    };
    let (0x30, algorithm, rest) = tlv(body)? else {
        return None;
    };
    let (0x06, oid, params) = tlv(algorithm)? else {
        return None;
    };
    // id-ecPublicKey 1.2.840.10045.2.1
    if oid != [0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01] {
        return None;
    }
    let curve = curve_of(params)?;
    let (0x03, bits, _) = tlv(rest)? else {
        return None;
    };
    let (&0, point) = bits.split_first()? else {
        return None;
    };
    valid_point(point, curve).then(|| (curve, point.to_vec()))
}

/// The uncompressed point of `CKA_EC_POINT`: a DER OCTET STRING around it, or (some tokens)
/// the point itself.
pub(crate) fn ec_point(value: &[u8], curve: KeyAlgorithm) -> Option<Vec<u8>> {
    if valid_point(value, curve) {
        return Some(value.to_vec());
    }
    match tlv(value)? {
        (0x04, point, []) if valid_point(point, curve) => Some(point.to_vec()),
        _ => None,
    }
}

fn valid_point(point: &[u8], curve: KeyAlgorithm) -> bool {
    point.len() == 1 + 2 * coordinate_len(curve) && point[0] == 0x04
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_signatures_become_der_integers_positive_and_minimal() {
        let mut raw = vec![0u8; 64];
        raw[0] = 0x80; // r needs a leading zero
        raw[32..35].copy_from_slice(&[0, 0, 0x01]); // s has leading zeros to drop
        raw[63] = 0x02;
        let der = ecdsa_signature(&raw, KeyAlgorithm::P256).unwrap();
        assert_eq!(der[0], 0x30);
        assert_eq!(usize::from(der[1]), der.len() - 2);
        let (tag, r, rest) = tlv(&der[2..]).unwrap();
        assert_eq!((tag, r.len(), r[0], r[1]), (0x02, 33, 0, 0x80));
        let (tag, s, rest) = tlv(rest).unwrap();
        assert_eq!((tag, s.len(), s[0]), (0x02, 30, 0x01));
        assert!(rest.is_empty());
        assert!(ecdsa_signature(&raw, KeyAlgorithm::P384).is_err());
        let zero = ecdsa_signature(&[0u8; 96], KeyAlgorithm::P384).unwrap();
        assert_eq!(zero, [0x30, 6, 2, 1, 0, 2, 1, 0]);
    }

    #[test]
    fn spki_and_ec_point_yield_the_curve_and_point() {
        use aws_lc_rs::rand::SystemRandom;
        use aws_lc_rs::signature::{EcdsaKeyPair, KeyPair, ECDSA_P384_SHA384_ASN1_SIGNING};
        let pkcs8 =
            EcdsaKeyPair::generate_pkcs8(&ECDSA_P384_SHA384_ASN1_SIGNING, &SystemRandom::new())
                .unwrap();
        let pair =
            EcdsaKeyPair::from_pkcs8(&ECDSA_P384_SHA384_ASN1_SIGNING, pkcs8.as_ref()).unwrap();
        let point = pair.public_key().as_ref().to_vec();
        // SubjectPublicKeyInfo for P-384, built by hand around the point.
        let mut algorithm = vec![0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01];
        algorithm.extend_from_slice(curve_oid(KeyAlgorithm::P384));
        let mut body = vec![0x30, algorithm.len() as u8];
        body.extend_from_slice(&algorithm);
        body.extend_from_slice(&[0x03, (point.len() + 1) as u8, 0]);
        body.extend_from_slice(&point);
        let mut spki = vec![0x30, body.len() as u8];
        spki.extend_from_slice(&body);
        assert_eq!(ec_spki(&spki), Some((KeyAlgorithm::P384, point.clone())));
        let mut wrapped = vec![0x04, point.len() as u8];
        wrapped.extend_from_slice(&point);
        assert_eq!(ec_point(&wrapped, KeyAlgorithm::P384), Some(point.clone()));
        assert_eq!(ec_point(&point, KeyAlgorithm::P384), Some(point.clone()));
        assert_eq!(ec_point(&point, KeyAlgorithm::P256), None);
        assert_eq!(ec_spki(&spki[..spki.len() - 1]), None);
    }
}
