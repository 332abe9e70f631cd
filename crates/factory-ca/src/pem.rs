//! PEM, written straight into a buffer: 64-character base64 lines between the BEGIN and END
//! lines, each line ended by `newline`, which is `\n` in a file and the two characters `\n`
//! inside a JSON string (so a bundle line needs no second, escaping pass).

const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Appends the base64 of `bytes` (with `=` padding).
fn push_base64(out: &mut Vec<u8>, bytes: &[u8]) {
    let mut chunks = bytes.chunks_exact(3);
    for c in &mut chunks {
        let n = (u32::from(c[0]) << 16) | (u32::from(c[1]) << 8) | u32::from(c[2]);
        out.extend_from_slice(&[
            ALPHABET[(n >> 18) as usize & 63],
            ALPHABET[(n >> 12) as usize & 63],
            ALPHABET[(n >> 6) as usize & 63],
            ALPHABET[n as usize & 63],
        ]);
    }
    match chunks.remainder() {
        [a] => {
            let n = u32::from(*a) << 16;
            out.extend_from_slice(&[
                ALPHABET[(n >> 18) as usize & 63],
                ALPHABET[(n >> 12) as usize & 63],
                b'=',
                b'=',
            ]);
        }
        [a, b] => {
            let n = (u32::from(*a) << 16) | (u32::from(*b) << 8);
            out.extend_from_slice(&[
                ALPHABET[(n >> 18) as usize & 63],
                ALPHABET[(n >> 12) as usize & 63],
                ALPHABET[(n >> 6) as usize & 63],
                b'=',
            ]);
        }
        _ => {}
    }
}

/// Appends `der` as PEM with `label`, each line ended by `newline`.
pub(crate) fn push_pem(out: &mut Vec<u8>, label: &str, der: &[u8], newline: &[u8]) {
    out.extend_from_slice(b"-----BEGIN ");
    out.extend_from_slice(label.as_bytes());
    out.extend_from_slice(b"-----");
    out.extend_from_slice(newline);
    // 48 bytes make one 64-character line.
    for line in der.chunks(48) {
        push_base64(out, line);
        out.extend_from_slice(newline);
    }
    out.extend_from_slice(b"-----END ");
    out.extend_from_slice(label.as_bytes());
    out.extend_from_slice(b"-----");
    out.extend_from_slice(newline);
}

/// `der` as PEM text with `label`.
pub(crate) fn pem_string(label: &str, der: &[u8]) -> String {
    let mut out = Vec::with_capacity(der.len() * 4 / 3 + der.len() / 48 + 64);
    push_pem(&mut out, label, der, b"\n");
    // Only ASCII was written.
    String::from_utf8(out).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pem_is_what_the_pem_crate_writes_for_every_length() {
        for len in 1..200usize {
            let der: Vec<u8> = (0..len).map(|i| (i * 37 + len) as u8).collect();
            let theirs = pkcs8::der::pem::encode_string(
                "CERTIFICATE",
                pkcs8::der::pem::LineEnding::LF,
                &der,
            )
            .unwrap();
            assert_eq!(pem_string("CERTIFICATE", &der), theirs, "{len} bytes");
        }
        let mut json = Vec::new();
        push_pem(&mut json, "PRIVATE KEY", &[1, 2, 3], b"\\n");
        assert_eq!(
            String::from_utf8(json).unwrap(),
            "-----BEGIN PRIVATE KEY-----\\nAQID\\n-----END PRIVATE KEY-----\\n"
        );
    }
}
