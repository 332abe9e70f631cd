//! Hostile certificates and events against the real activation decision, x509-limbo style:
//! one table of named cases, each a certificate or event an attacker (or a broken factory)
//! could present. The registry is an in-memory AWS IoT that records every write, and the fleet
//! directory counts every device as a member, so only the certificate or the event can be the
//! reason a case is refused. Every case must end not activated, without a panic, with nothing
//! provisioned and a reason that names the problem.
//!
//! The certificates are DER built by hand (a small encoder below) and signed with the test
//! CA's own key, so each differs from a good certificate in exactly the one way its name says;
//! `good_certificates_built_the_same_way_are_activated` proves the builder's unmodified output
//! passes.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test setup: a panic is the report

use std::sync::Arc;
use std::time::Duration as StdDuration;

use activator::memory::MemoryFleet;
use activator::{Activator, Incoming, Outcome, Policy, RegisteredEvent, RejectAction};
use base64::Engine;
use factory_ca::DeviceId;
use iot::memory::MemoryIot;
use iot::{AccountId, CertificateId, CertificateStatus};
use serde_json::{json, Value};
use testkit::certs::rcgen::{KeyPair, PublicKeyData, SigningKey};
use testkit::certs::{device_params, TestCa};
use time::{Duration, OffsetDateTime};
use tokio::time::Instant;
use x509_parser::extensions::ParsedExtension;
use x509_parser::prelude::{FromDer, X509Certificate};

const ACCOUNT: &str = "123456789012";
const POLICY: &str = "jitr-device";

// ---------------------------------------------------------------------------------------
// A small DER encoder: enough of X.509 to build any certificate we want, wrong on purpose.

fn tlv(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    let n = body.len();
    if n < 0x80 {
        out.push(n as u8);
    } else {
        let bytes = n.to_be_bytes();
        let skip = bytes.iter().take_while(|b| **b == 0).count();
        out.push(0x80 | (bytes.len() - skip) as u8);
        out.extend_from_slice(&bytes[skip..]);
    }
    out.extend_from_slice(body);
    out
}

fn seq(parts: &[&[u8]]) -> Vec<u8> {
    tlv(0x30, &parts.concat())
}

fn set(parts: &[&[u8]]) -> Vec<u8> {
    tlv(0x31, &parts.concat())
}

fn oid(dotted: &str) -> Vec<u8> {
    let arcs: Vec<u64> = dotted.split('.').map(|a| a.parse().unwrap()).collect();
    let mut body = vec![(arcs[0] * 40 + arcs[1]) as u8];
    for &arc in &arcs[2..] {
        let mut groups = vec![(arc & 0x7f) as u8];
        let mut rest = arc >> 7;
        while rest > 0 {
            groups.push(0x80 | (rest & 0x7f) as u8);
            rest >>= 7;
        }
        body.extend(groups.iter().rev());
    }
    tlv(0x06, &body)
}

fn boolean(v: bool) -> Vec<u8> {
    tlv(0x01, &[if v { 0xff } else { 0x00 }])
}

fn utf8(s: &str) -> Vec<u8> {
    tlv(0x0c, s.as_bytes())
}

fn bmp(s: &str) -> Vec<u8> {
    let units: Vec<u8> = s.encode_utf16().flat_map(u16::to_be_bytes).collect();
    tlv(0x1e, &units)
}

/// A Name of single-attribute RDNs, in order.
fn name(attrs: &[(&str, Vec<u8>)]) -> Vec<u8> {
    let rdns: Vec<Vec<u8>> = attrs
        .iter()
        .map(|(o, v)| set(&[&seq(&[&oid(o), v])]))
        .collect();
    let parts: Vec<&[u8]> = rdns.iter().map(Vec::as_slice).collect();
    seq(&parts)
}

const CN: &str = "2.5.4.3";
const ORG: &str = "2.5.4.10";

fn cn_name(cn: &str) -> Vec<u8> {
    name(&[(CN, utf8(cn))])
}

fn time(t: OffsetDateTime) -> Vec<u8> {
    let (y, mo, d) = (t.year(), u8::from(t.month()), t.day());
    let (h, mi, s) = (t.hour(), t.minute(), t.second());
    if (1950..2050).contains(&y) {
        let text = format!("{:02}{mo:02}{d:02}{h:02}{mi:02}{s:02}Z", y % 100);
        tlv(0x17, text.as_bytes())
    } else {
        tlv(
            0x18,
            format!("{y:04}{mo:02}{d:02}{h:02}{mi:02}{s:02}Z").as_bytes(),
        )
    }
}

fn alg(o: &str) -> Vec<u8> {
    seq(&[&oid(o)])
}

const ECDSA_SHA1: &str = "1.2.840.10045.4.1";
const ECDSA_SHA256: &str = "1.2.840.10045.4.3.2";
const ECDSA_SHA384: &str = "1.2.840.10045.4.3.3";
const RSA_SHA256: &str = "1.2.840.113549.1.1.11";
const CLIENT_AUTH: &str = "1.3.6.1.5.5.7.3.2";
const SERVER_AUTH: &str = "1.3.6.1.5.5.7.3.1";
const ANY_EKU: &str = "2.5.29.37.0";

fn ext(o: &str, critical: bool, value: &[u8]) -> Vec<u8> {
    let crit = if critical { boolean(true) } else { Vec::new() };
    seq(&[&oid(o), &crit, &tlv(0x04, value)])
}

fn basic_constraints(ca: bool) -> Vec<u8> {
    let body = if ca { boolean(true) } else { Vec::new() };
    ext("2.5.29.19", true, &seq(&[&body]))
}

/// keyUsage from the bits' first byte (digitalSignature = 0x80, keyEncipherment = 0x20,
/// keyCertSign = 0x04, cRLSign = 0x02).
fn key_usage(bits: u8, critical: bool) -> Vec<u8> {
    let unused = if bits == 0 {
        0
    } else {
        bits.trailing_zeros() as u8
    };
    ext("2.5.29.15", critical, &tlv(0x03, &[unused, bits]))
}

fn extended_key_usage(purposes: &[&str]) -> Vec<u8> {
    let oids: Vec<Vec<u8>> = purposes.iter().map(|p| oid(p)).collect();
    let parts: Vec<&[u8]> = oids.iter().map(Vec::as_slice).collect();
    ext("2.5.29.37", false, &seq(&parts))
}

fn subject_key_id(id: &[u8]) -> Vec<u8> {
    ext("2.5.29.14", false, &tlv(0x04, id))
}

fn authority_key_id(id: &[u8]) -> Vec<u8> {
    ext("2.5.29.35", false, &seq(&[&tlv(0x80, id)]))
}

fn san_dns(host: &str) -> Vec<u8> {
    ext("2.5.29.17", false, &seq(&[&tlv(0x82, host.as_bytes())]))
}

/// SHA-256 of `bytes`, first 20 bytes (a key identifier).
fn key_id(bytes: &[u8]) -> Vec<u8> {
    hex::decode(&factory_ca::certificate_id(bytes)[..40]).unwrap()
}

fn pem(der: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).unwrap());
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
}

fn spki_from_base64(b64: &str) -> Vec<u8> {
    base64::engine::general_purpose::STANDARD
        .decode(b64)
        .unwrap()
}

// Public keys made once with `openssl genpkey ... | openssl pkey -pubout -outform DER`:
// kinds rcgen cannot generate. Only their SubjectPublicKeyInfo matters to the profile.
const RSA_1024: &str = "MIGfMA0GCSqGSIb3DQEBAQUAA4GNADCBiQKBgQDg+ncFdJAURDr4b3PbqdCBWeOqVFI3QTFfgbUC80ytk6Hg09Kg12m5cxm/GU/DuT+aKP+15WwlWAsM1or0eP69dPnY6YVO0fodeSEvcNsIVnJNHWoqKgKsH03Nl0m4z4tlXG+FwJepDmNhn5xzMo9mKCZgRPaJsoAmRkqUkhyNWwIDAQAB";
const RSA_2048: &str = "MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEAifGbugvD0/yOIs9xWv/cogdz08VQmoZLscOKknCGZ/fboTnhDs2wwW3xBP4VWJovoIJ9hAHz67M3Jw2WEqa1EV+7lBo29WXI2tMaaffZVp1MC5/Ju9/yrQhaX7esakGWa+oc2vT2SwgsgDa/9FXdmaTcyFS0E4aR7Xh6bJi9W1+oSxwZiIDPaMPm/NKWkEoszkGJ9weVV3VuOnPq3Olrw7zGYz0jMF8B4O3GgFBcHnwE/CmjC66XWc5+2k9eE3zwMVSGSLRIVglHYK6vGldxQIoqI/cFtIiS3FLx+fxeqxGpkZLZFnqlc/nUSo641bcLfeJBlkFytzJhO/MhehSInQIDAQAB";
const SECP256K1: &str = "MFYwEAYHKoZIzj0CAQYFK4EEAAoDQgAEV7xA5W8W6AMC03eXGKI6ZYDiGXTXuLzvFEFDqPIetA6pqBMipKylMH3QqOs64boGYbI3L+LWcF0/bzLRg+myIA==";
const P521: &str = "MIGbMBAGByqGSM49AgEGBSuBBAAjA4GGAAQAtUIZdr5GmT4NGPwfuSjD2sseyahzlVsFzf84J5eihMgFUHGnqBqYkIkQ1oljj9itG/LJBrpc+S+gLVHkXgPIZyYAzkCcf6tWzuTl3sloracre5J6fb7Vit8eCjWfwl0CGz+30DcqiXFIPFoIZ8iQuGehD9lS/SxvlBhO1CJPx2KgOfg=";
const BRAINPOOL_P256: &str = "MFowFAYHKoZIzj0CAQYJKyQDAwIIAQEHA0IABA3vbvTFvDfXe0hVE+qXgWh/HZX5t6h7pfEHLqTp8CZUP6nJ/lGXKhKx6+f01Zj3sluoWyu2q9DSDEXOXZGvVo4=";
const ED25519: &str = "MCowBQYDK2VwAyEATj06py1flyl3My3+nOhyvJRb34nuGAh/OKoJ6HORkIE=";
const P256_EXPLICIT_PARAMS: &str = "MIIBSzCCAQMGByqGSM49AgEwgfcCAQEwLAYHKoZIzj0BAQIhAP////8AAAABAAAAAAAAAAAAAAAA////////////////MFsEIP////8AAAABAAAAAAAAAAAAAAAA///////////////8BCBaxjXYqjqT57PrvVV2mIa8ZR0GsMxTsPY7zjw+J9JgSwMVAMSdNgiG5wSTamZ44ROdJreBn36QBEEEaxfR8uEsQkf4vOblY6RA8ncDfYEt6zOg9KE5RdiYwpZP40Li/hp/m47n60p8D54WK84zV2sxXs7LtkBoN79R9QIhAP////8AAAAA//////////+85vqtpxeehPO5ysL8YyVRAgEBA0IABJGVudCp1w7p2b2taBv0lWYHuoTrQ2hi11bBvWuSk04XVwjrz9r5242k4brlW61beGtbbcgLycC1VtGQQl3cMr8=";

/// An RSA SubjectPublicKeyInfo from the INTEGER contents of its modulus and exponent.
fn rsa_spki(modulus: &[u8], exponent: &[u8]) -> Vec<u8> {
    let key = seq(&[&tlv(0x02, modulus), &tlv(0x02, exponent)]);
    let mut bits = vec![0];
    bits.extend(key);
    seq(&[
        &seq(&[&oid("1.2.840.113549.1.1.1"), &[0x05, 0x00]]),
        &tlv(0x03, &bits),
    ])
}

/// An RSA key with a modulus of `bits` bits (not a usable key: its size is all that counts).
fn rsa_spki_of_size(bits: usize) -> Vec<u8> {
    let mut modulus = vec![0x00];
    modulus.extend(std::iter::repeat_n(0xc5, bits / 8));
    rsa_spki(&modulus, &[0x01, 0x00, 0x01])
}

/// The modulus (INTEGER contents) of the RSA-2048 key above.
fn rsa_2048_modulus() -> Vec<u8> {
    let spki = spki_from_base64(RSA_2048);
    let (_, info) = x509_parser::x509::SubjectPublicKeyInfo::from_der(&spki).unwrap();
    match info.parsed().unwrap() {
        x509_parser::public_key::PublicKey::RSA(rsa) => rsa.modulus.to_vec(),
        _ => unreachable!("an RSA key"),
    }
}

/// A fresh P-256 key's SubjectPublicKeyInfo with its curve OID's bytes under another tag.
fn p256_spki_with_curve_tag(tag: u8) -> Vec<u8> {
    let key = KeyPair::generate().unwrap();
    let spki = key.subject_public_key_info();
    let (_, info) = x509_parser::x509::SubjectPublicKeyInfo::from_der(&spki).unwrap();
    let curve = oid("1.2.840.10045.3.1.7");
    let mut bits = vec![0];
    bits.extend_from_slice(&info.subject_public_key.data);
    seq(&[
        &seq(&[&oid("1.2.840.10045.2.1"), &tlv(tag, &curve[2..])]),
        &tlv(0x03, &bits),
    ])
}

/// A TBSCertificate, field by field; `Default`-like values come from [`Pki::good`].
#[derive(Clone)]
struct Tbs {
    /// The `[0]` version INTEGER value; `None` omits it (v1).
    version: Option<u8>,
    /// The serial INTEGER's content octets, exactly as encoded.
    serial: Vec<u8>,
    /// AlgorithmIdentifier inside the signed part.
    inner_alg: Vec<u8>,
    /// AlgorithmIdentifier outside it.
    outer_alg: Vec<u8>,
    issuer: Vec<u8>,
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
    subject: Vec<u8>,
    spki: Vec<u8>,
    /// Extensions, each a full Extension; `None` omits the `[3]` field.
    extensions: Option<Vec<Vec<u8>>>,
}

impl Tbs {
    fn der(&self) -> Vec<u8> {
        let version = self
            .version
            .map(|v| tlv(0xa0, &tlv(0x02, &[v])))
            .unwrap_or_default();
        let extensions = self
            .extensions
            .as_ref()
            .map(|exts| {
                let parts: Vec<&[u8]> = exts.iter().map(Vec::as_slice).collect();
                tlv(0xa3, &seq(&parts))
            })
            .unwrap_or_default();
        seq(&[
            &version,
            &tlv(0x02, &self.serial),
            &self.inner_alg,
            &self.issuer,
            &seq(&[&time(self.not_before), &time(self.not_after)]),
            &self.subject,
            &self.spki,
            &extensions,
        ])
    }

    fn with_extensions(mut self, f: impl FnOnce(&mut Vec<Vec<u8>>)) -> Self {
        f(self.extensions.get_or_insert_with(Vec::new));
        self
    }
}

/// A Certificate from its parts.
fn certificate(tbs: &[u8], outer_alg: &[u8], signature: &[u8]) -> Vec<u8> {
    let mut bits = vec![0];
    bits.extend_from_slice(signature);
    seq(&[tbs, outer_alg, &tlv(0x03, &bits)])
}

/// The trusted CA and what the builder needs from it.
struct Pki {
    ca: TestCa,
    ca_id: String,
    ca_key: KeyPair,
    ca_subject: Vec<u8>,
    ca_ski: Vec<u8>,
    /// A second CA with the same name as ours and its own key, never trusted.
    twin: TestCa,
    twin_id: String,
    /// Another CA, registered in the account but not trusted.
    stranger: TestCa,
    stranger_id: String,
}

fn ca_id_of(pem: &str) -> String {
    testkit::certs::certificate_id_of(pem).unwrap()
}

impl Pki {
    fn new() -> Pki {
        let ca = TestCa::new("jitr test CA").unwrap();
        let ca_key =
            KeyPair::from_pem(&std::fs::read_to_string(ca.dir().join("ca.key")).unwrap()).unwrap();
        let ca_der = factory_ca::certificates_from_pem_or_der(ca.cert_pem.as_bytes()).unwrap();
        let (_, parsed) = X509Certificate::from_der(&ca_der[0]).unwrap();
        let ca_subject = parsed.subject().as_raw().to_vec();
        let ca_ski = parsed
            .extensions()
            .iter()
            .find_map(|e| match e.parsed_extension() {
                ParsedExtension::SubjectKeyIdentifier(id) => Some(id.0.to_vec()),
                _ => None,
            })
            .expect("the CA has a subjectKeyIdentifier");
        let twin = TestCa::new("jitr test CA").unwrap();
        let stranger = TestCa::new("someone else's CA").unwrap();
        Pki {
            ca_id: ca_id_of(&ca.cert_pem),
            twin_id: ca_id_of(&twin.cert_pem),
            stranger_id: ca_id_of(&stranger.cert_pem),
            ca,
            ca_key,
            ca_subject,
            ca_ski,
            twin,
            stranger,
        }
    }

    /// A TBS to the device profile for `id`, with a fresh P-256 key.
    fn good(&self, id: &str) -> Tbs {
        let key = KeyPair::generate().unwrap();
        self.good_with_spki(id, key.subject_public_key_info())
    }

    fn good_with_spki(&self, id: &str, spki: Vec<u8>) -> Tbs {
        let now = OffsetDateTime::now_utc().replace_nanosecond(0).unwrap();
        let ski = key_id(&spki);
        Tbs {
            version: Some(2),
            serial: vec![0x41; 16],
            inner_alg: alg(ECDSA_SHA256),
            outer_alg: alg(ECDSA_SHA256),
            issuer: self.ca_subject.clone(),
            not_before: now - Duration::minutes(1),
            not_after: now + Duration::days(3650),
            subject: cn_name(id),
            spki,
            extensions: Some(vec![
                basic_constraints(false),
                key_usage(0x80, true),
                extended_key_usage(&[CLIENT_AUTH]),
                subject_key_id(&ski),
                authority_key_id(&self.ca_ski),
            ]),
        }
    }

    /// Signed by the trusted CA's key (ECDSA P-256, SHA-256), DER.
    fn signed_der(&self, tbs: &Tbs) -> Vec<u8> {
        self.signed_der_by(tbs, &self.ca_key)
    }

    fn signed_der_by(&self, tbs: &Tbs, key: &KeyPair) -> Vec<u8> {
        let der = tbs.der();
        certificate(&der, &tbs.outer_alg, &key.sign(&der).unwrap())
    }

    fn signed(&self, tbs: &Tbs) -> String {
        pem(&self.signed_der(tbs))
    }

    /// Signed by the trusted CA's key over SHA-1 (`openssl dgst`: no Rust signer here
    /// offers ECDSA with SHA-1 any more).
    fn signed_sha1(&self, tbs: &Tbs) -> String {
        let dir = tempfile::tempdir().unwrap();
        let der = tbs.der();
        std::fs::write(dir.path().join("tbs"), &der).unwrap();
        let out = std::process::Command::new("openssl")
            .args(["dgst", "-sha1", "-sign"])
            .arg(self.ca.dir().join("ca.key"))
            .arg("-out")
            .arg(dir.path().join("sig"))
            .arg(dir.path().join("tbs"))
            .output()
            .expect("openssl is installed (scripts/setup)");
        assert!(out.status.success(), "{out:?}");
        let sig = std::fs::read(dir.path().join("sig")).unwrap();
        pem(&certificate(&der, &tbs.outer_alg, &sig))
    }
}

// ---------------------------------------------------------------------------------------
// The cases.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Want {
    /// The decision ran and revoked the certificate.
    Rejected,
    /// The decision ran and wrote nothing.
    Skipped,
    /// The certificate was active already; nothing written.
    AlreadyActive,
    /// The event failed validation before any AWS call.
    Malformed,
}

/// A certificate registered in the fake AWS IoT, and the event that names it.
struct Registration {
    pem: String,
    /// The id it is registered under (default: SHA-256 of its first certificate).
    id: Option<String>,
    status: CertificateStatus,
    /// The CA AWS IoT links it to (default: the trusted CA).
    registered_ca: Option<Option<String>>,
    /// Fields of the event to replace.
    event: Value,
    /// The account the activator runs in.
    account: Option<&'static str>,
}

enum Setup {
    /// A registered certificate and its event.
    Certificate(Registration),
    /// An invocation payload, as JSON.
    Payload(Value),
    /// An invocation payload, as bytes off the wire.
    Raw(Vec<u8>),
}

struct Case {
    name: &'static str,
    setup: Setup,
    want: Want,
    reason: &'static str,
}

/// Registered PENDING_ACTIVATION under the trusted CA.
fn registration(pem: String) -> Registration {
    Registration {
        pem,
        id: None,
        status: CertificateStatus::PendingActivation,
        registered_ca: None,
        event: json!({}),
        account: Some(ACCOUNT),
    }
}

fn pending(pem: String) -> Setup {
    Setup::Certificate(registration(pem))
}

fn uuid(n: u32) -> String {
    format!("{n:032x}")
}

fn fixture_event() -> Value {
    serde_json::from_str(include_str!(
        "../../../testdata/aws/certificate-registered.json"
    ))
    .unwrap()
}

fn event_with(field: &str, value: Value) -> Value {
    let mut v = fixture_event();
    if value.is_null() {
        v.as_object_mut().unwrap().remove(field);
    } else {
        v[field] = value;
    }
    v
}

fn first_der(pem: &str) -> Vec<u8> {
    factory_ca::certificates_from_pem_or_der(pem.as_bytes()).unwrap()[0].clone()
}

fn certificate_cases(pki: &Pki) -> Vec<Case> {
    let now = OffsetDateTime::now_utc().replace_nanosecond(0).unwrap();
    let mut n = 0;
    let mut id = || {
        n += 1;
        uuid(n)
    };
    let mut cases = Vec::new();
    let mut case = |name, setup, want, reason| {
        cases.push(Case {
            name,
            setup,
            want,
            reason,
        })
    };
    let r = Want::Rejected;

    // Serial numbers.
    let mut t = pki.good(&id());
    t.serial = vec![0x00];
    case(
        "serial zero",
        pending(pki.signed(&t)),
        r,
        "serial: serial is zero",
    );
    let mut t = pki.good(&id());
    t.serial = vec![0x80; 16];
    case(
        "serial negative",
        pending(pki.signed(&t)),
        r,
        "serial: serial 8080",
    );
    let mut t = pki.good(&id());
    t.serial = vec![0xff];
    case(
        "serial minus one",
        pending(pki.signed(&t)),
        r,
        "is negative",
    );
    let mut t = pki.good(&id());
    t.serial = [vec![0x01], vec![0x42; 20]].concat();
    case(
        "serial 21 bytes",
        pending(pki.signed(&t)),
        r,
        "serial: serial is 21 bytes, at most 20 allowed",
    );
    let mut t = pki.good(&id());
    t.serial = vec![0x12, 0x34];
    case(
        "serial of 16 bits",
        pending(pki.signed(&t)),
        r,
        "serial: serial 1234 has fewer than 64 bits",
    );
    let mut t = pki.good(&id());
    t.serial = Vec::new();
    case(
        "serial INTEGER of zero length",
        pending(pki.signed(&t)),
        r,
        "serial: serial is zero",
    );

    // What the certificate may do.
    let t = pki
        .good(&id())
        .with_extensions(|e| e[0] = basic_constraints(true));
    case(
        "CA:TRUE leaf",
        pending(pki.signed(&t)),
        r,
        "basic-constraints: CA:TRUE",
    );
    let t = pki
        .good(&id())
        .with_extensions(|e| e[1] = key_usage(0x86, true));
    case(
        "leaf with keyCertSign and cRLSign",
        pending(pki.signed(&t)),
        r,
        "key-usage: keyUsage",
    );
    let t = pki
        .good(&id())
        .with_extensions(|e| e[1] = key_usage(0x20, true));
    case(
        "keyUsage without digitalSignature",
        pending(pki.signed(&t)),
        r,
        "lacks digitalSignature",
    );
    let t = pki
        .good(&id())
        .with_extensions(|e| e[1] = key_usage(0x80, false));
    case(
        "keyUsage not critical",
        pending(pki.signed(&t)),
        r,
        "key-usage: keyUsage is not critical",
    );
    let t = pki.good(&id()).with_extensions(|e| {
        e.remove(1);
    });
    case(
        "keyUsage missing",
        pending(pki.signed(&t)),
        r,
        "key-usage: keyUsage is missing",
    );
    let t = pki
        .good(&id())
        .with_extensions(|e| e[2] = extended_key_usage(&[SERVER_AUTH]));
    case(
        "serverAuth only, no clientAuth",
        pending(pki.signed(&t)),
        r,
        "extended-key-usage: extendedKeyUsage lacks clientAuth",
    );
    let t = pki
        .good(&id())
        .with_extensions(|e| e[2] = extended_key_usage(&[ANY_EKU]));
    case(
        "anyExtendedKeyUsage instead of clientAuth",
        pending(pki.signed(&t)),
        r,
        "lacks clientAuth",
    );
    let t = pki.good(&id()).with_extensions(|e| {
        e.remove(2);
    });
    case(
        "extendedKeyUsage missing",
        pending(pki.signed(&t)),
        r,
        "extended-key-usage: extendedKeyUsage is missing",
    );
    let t = pki
        .good(&id())
        .with_extensions(|e| e.push(basic_constraints(true)));
    case(
        "basicConstraints twice (CA:FALSE then CA:TRUE)",
        pending(pki.signed(&t)),
        r,
        "basic-constraints: malformed basicConstraints",
    );
    let t = pki
        .good(&id())
        .with_extensions(|e| e.push(ext("1.3.6.1.4.1.55555.1", true, &[0x05, 0x00])));
    case(
        "unknown critical extension",
        pending(pki.signed(&t)),
        r,
        "critical extension 1.3.6.1.4.1.55555.1",
    );

    // Keys.
    case(
        "RSA-1024 key",
        pending(pki.signed(&pki.good_with_spki(&id(), spki_from_base64(RSA_1024)))),
        r,
        "key-type: RSA 1024 bits",
    );
    case(
        "RSA-16384 key",
        pending(pki.signed(&pki.good_with_spki(&id(), rsa_spki_of_size(16384)))),
        r,
        "key-type: RSA 16384 bits",
    );
    case(
        "EC key on secp256k1",
        pending(pki.signed(&pki.good_with_spki(&id(), spki_from_base64(SECP256K1)))),
        r,
        "key-type: EC key on curve 1.3.132.0.10",
    );
    case(
        "EC key on P-521 (outside the profile)",
        pending(pki.signed(&pki.good_with_spki(&id(), spki_from_base64(P521)))),
        r,
        "key-type: EC key on curve 1.3.132.0.35",
    );
    case(
        "EC key on brainpoolP256r1",
        pending(pki.signed(&pki.good_with_spki(&id(), spki_from_base64(BRAINPOOL_P256)))),
        r,
        "key-type: EC key on curve 1.3.36.3.3.2.8.1.1.7",
    );
    case(
        "EC key with explicit curve parameters",
        pending(pki.signed(&pki.good_with_spki(&id(), spki_from_base64(P256_EXPLICIT_PARAMS)))),
        r,
        "key-type: EC key on curve (not a named curve)",
    );
    case(
        "Ed25519 key",
        pending(pki.signed(&pki.good_with_spki(&id(), spki_from_base64(ED25519)))),
        r,
        "key-type: key algorithm 1.3.101.112",
    );
    case(
        "P-256 curve OID bytes under an OCTET STRING tag",
        pending(pki.signed(&pki.good_with_spki(&id(), p256_spki_with_curve_tag(0x04)))),
        r,
        "key-type: EC key on curve (not a named curve)",
    );
    case(
        "RSA-2048 with public exponent 1",
        pending(pki.signed(&pki.good_with_spki(&id(), rsa_spki(&rsa_2048_modulus(), &[0x01])))),
        r,
        "key-type: RSA public key is not valid",
    );
    let mut even = rsa_2048_modulus();
    *even.last_mut().unwrap() &= 0xfe;
    case(
        "RSA-2048 with an even modulus",
        pending(pki.signed(&pki.good_with_spki(&id(), rsa_spki(&even, &[0x01, 0x00, 0x01])))),
        r,
        "key-type: RSA public key is not valid",
    );
    case(
        "RSA-2048 with an even public exponent",
        pending(pki.signed(
            &pki.good_with_spki(&id(), rsa_spki(&rsa_2048_modulus(), &[0x01, 0x00, 0x00])),
        )),
        r,
        "key-type: RSA public key is not valid",
    );
    let mut bogus_point = vec![0x00, 0x04];
    bogus_point.extend([0u8; 64]);
    let bogus = seq(&[
        &seq(&[&oid("1.2.840.10045.2.1"), &oid("1.2.840.10045.3.1.7")]),
        &tlv(0x03, &bogus_point),
    ]);
    case(
        "P-256 key that is not a point on the curve",
        pending(pki.signed(&pki.good_with_spki(&id(), bogus))),
        r,
        "key-type: EC public key is not a point on P-256",
    );

    // Signatures.
    case(
        "ecdsa-with-SHA1 signature",
        pending(pki.signed_sha1(&Tbs {
            inner_alg: alg(ECDSA_SHA1),
            outer_alg: alg(ECDSA_SHA1),
            ..pki.good(&id())
        })),
        r,
        "signature-algorithm: signature algorithm 1.2.840.10045.4.1 is not",
    );
    case(
        "signature algorithm differs inside and outside",
        pending(pki.signed(&Tbs {
            outer_alg: alg(ECDSA_SHA384),
            ..pki.good(&id())
        })),
        r,
        "signature-algorithm: the signature algorithm differs",
    );
    let rsa_alg = seq(&[&oid(RSA_SHA256), &[0x05, 0x00]]);
    case(
        "claims sha256WithRSA, signed with the CA's EC key",
        pending(pki.signed(&Tbs {
            inner_alg: rsa_alg.clone(),
            outer_alg: rsa_alg,
            ..pki.good(&id())
        })),
        r,
        "issuer: the signature does not verify",
    );
    let mut der = pki.signed_der(&pki.good(&id()));
    let last = der.len() - 1;
    der[last] ^= 0x01;
    case(
        "signature with one bit flipped",
        pending(pem(&der)),
        r,
        "issuer: the signature does not verify",
    );
    let original = pki.good(&id());
    let signature = pki.ca_key.sign(&original.der()).unwrap();
    let altered = Tbs {
        subject: cn_name(&id()),
        ..original
    };
    case(
        "CN changed after signing",
        pending(pem(&certificate(
            &altered.der(),
            &altered.outer_alg,
            &signature,
        ))),
        r,
        "issuer: the signature does not verify",
    );
    let t = pki.good(&id());
    case(
        "empty signature",
        pending(pem(&certificate(&t.der(), &t.outer_alg, &[]))),
        r,
        "issuer: the signature does not verify",
    );

    // Who issued it.
    let impostor = KeyPair::generate().unwrap();
    case(
        "issuer name and AKI equal to the CA's, another key signed",
        pending(pem(&pki.signed_der_by(&pki.good(&id()), &impostor))),
        r,
        "issuer: the signature does not verify",
    );
    case(
        "issuer name equal, another key signed, no AKI (rcgen forgery)",
        pending(pki.ca.forged_pem(&device_params(&id())).unwrap()),
        r,
        "issuer: the signature does not verify",
    );
    case(
        "issued by another CA with the same name",
        pending(pki.twin.device_pem(&id()).unwrap()),
        r,
        "issuer: authorityKeyIdentifier",
    );
    let t = pki
        .good(&id())
        .with_extensions(|e| e[4] = authority_key_id(&[0x5a; 20]));
    case(
        "AKI that is not the CA's, signed by the CA",
        pending(pki.signed(&t)),
        r,
        "issuer: authorityKeyIdentifier 5a5a",
    );
    let t = Tbs {
        issuer: name(&[(ORG, utf8("jitr tests")), (CN, utf8("jitr test CA 2"))]),
        ..pki.good(&id())
    };
    case(
        "issuer name not the CA's, signed by the CA",
        pending(pki.signed(&t)),
        r,
        "issuer: issuer",
    );
    let device_key = KeyPair::generate().unwrap();
    let leaf_id = id();
    let t = Tbs {
        issuer: cn_name(&leaf_id),
        subject: cn_name(&leaf_id),
        ..pki.good_with_spki(&leaf_id, device_key.subject_public_key_info())
    }
    .with_extensions(|e| {
        e.remove(4);
    });
    case(
        "self-signed leaf",
        pending(pem(&pki.signed_der_by(&t, &device_key))),
        r,
        "is not the CA",
    );
    case(
        "the CA certificate itself presented as a device",
        pending(pki.ca.cert_pem.clone()),
        r,
        "basic-constraints: CA:TRUE",
    );

    // Validity.
    case(
        "expired",
        pending(pki.signed(&Tbs {
            not_before: now - Duration::days(30),
            not_after: now - Duration::days(1),
            ..pki.good(&id())
        })),
        r,
        "validity: expired at",
    );
    case(
        "not yet valid",
        pending(pki.signed(&Tbs {
            not_before: now + Duration::days(1),
            ..pki.good(&id())
        })),
        r,
        "validity: not valid before",
    );
    case(
        "notAfter before notBefore",
        pending(pki.signed(&Tbs {
            not_before: now + Duration::days(1),
            not_after: now - Duration::days(1),
            ..pki.good(&id())
        })),
        r,
        "validity:",
    );
    case(
        "version 1 certificate",
        pending(pki.signed(&Tbs {
            version: None,
            extensions: None,
            ..pki.good(&id())
        })),
        r,
        "version: ",
    );

    // The subject.
    let (a, b) = (id(), id());
    case(
        "two CNs, each a device id",
        pending(pki.signed(&Tbs {
            subject: name(&[(CN, utf8(&a)), (CN, utf8(&b))]),
            ..pki.good(&a)
        })),
        r,
        "common-name: the subject has 2 CNs, expected one",
    );
    let device = id();
    case(
        "CN only in a subjectAltName",
        pending(
            pki.signed(
                &Tbs {
                    subject: name(&[(ORG, utf8("acme"))]),
                    ..pki.good(&device)
                }
                .with_extensions(|e| e.push(san_dns(&device))),
            ),
        ),
        r,
        "common-name: the subject has no CN",
    );
    case(
        "upper-case UUID",
        pending(pki.signed(&pki.good(&format!("ABCDEF{}", &id()[6..])))),
        r,
        "common-name: invalid device id",
    );
    case(
        "non-hex UUID",
        pending(pki.signed(&pki.good(&format!("{}g", &id()[1..])))),
        r,
        "is lowercase hexadecimal",
    );
    case(
        "31-character UUID",
        pending(pki.signed(&pki.good(&id()[1..]))),
        r,
        "a balena UUID has 32 (or 62) characters",
    );
    case(
        "33-character UUID",
        pending(pki.signed(&pki.good(&format!("{}0", id())))),
        r,
        "a balena UUID has 32 (or 62) characters",
    );
    case(
        "UUID with a NUL byte",
        pending(pki.signed(&pki.good(&format!("{}\0", &id()[1..])))),
        r,
        "is lowercase hexadecimal",
    );
    case(
        "UUID with a non-ASCII letter",
        pending(pki.signed(&pki.good(&format!("{}é", &id()[2..])))),
        r,
        "is lowercase hexadecimal",
    );
    case(
        "UUID with a trailing newline",
        pending(pki.signed(&pki.good(&format!("{}\n", id())))),
        r,
        "a balena UUID has 32 (or 62) characters",
    );
    case(
        "empty CN",
        pending(pki.signed(&pki.good(""))),
        r,
        "common-name: invalid device id",
    );
    case(
        "CN as a BMPString",
        pending(pki.signed(&Tbs {
            subject: name(&[(CN, bmp(&uuid(999)))]),
            ..pki.good(&id())
        })),
        r,
        "common-name: the CN is not a text string",
    );

    // The registered PEM.
    let good = pki.signed(&pki.good(&id()));
    case(
        "device certificate and CA certificate in one PEM",
        pending(format!("{good}{}", pki.ca.cert_pem)),
        r,
        "the registered PEM holds 2 certificates",
    );
    let good = pki.signed(&pki.good(&id()));
    case(
        "the same certificate twice in one PEM",
        pending(format!("{good}{good}")),
        r,
        "the registered PEM holds 2 certificates",
    );
    let good = pki.signed(&pki.good(&id()));
    case(
        "text before the PEM block",
        pending(format!("subject=CN=evil\n{good}")),
        r,
        "unexpected text outside PEM blocks",
    );
    let good = pki.signed(&pki.good(&id()));
    case(
        "text after the PEM block",
        pending(format!("{good}trailing junk\n")),
        r,
        "unexpected text outside PEM blocks",
    );
    let good = pki.signed(&pki.good(&id()));
    case(
        "PEM with a PRIVATE KEY block",
        pending(good.replace("CERTIFICATE", "PRIVATE KEY")),
        r,
        "not a CERTIFICATE or is not terminated",
    );
    let good = pki.signed(&pki.good(&id()));
    case(
        "PEM truncated before END",
        pending(good.replace("-----END CERTIFICATE-----\n", "")),
        r,
        "is not terminated",
    );
    let good = pki.signed(&pki.good(&id()));
    let mut lines: Vec<&str> = good.lines().collect();
    let broken = lines[1].replacen(|c: char| c.is_ascii_alphanumeric(), "*", 1);
    lines[1] = &broken;
    case(
        "PEM with a character outside base64",
        pending(lines.join("\n")),
        r,
        "malformed PEM",
    );
    case(
        "registered PEM of only a vertical tab (found by fuzzing)",
        pending("\x0b\n".into()),
        r,
        "the registered PEM does not parse: the input holds no certificate",
    );
    let mut der = pki.signed_der(&pki.good(&id()));
    der.extend_from_slice(b"\x05\x00");
    case(
        "DER with trailing bytes inside the PEM",
        pending(pem(&der)),
        r,
        "parse: 2 bytes of trailing data",
    );
    let huge = pki
        .good(&id())
        .with_extensions(|e| e.push(ext("1.3.6.1.4.1.55555.2", false, &vec![0x41; 70_000])));
    case(
        "certificate larger than 64 KiB",
        pending(pki.signed(&huge)),
        r,
        "is too large for a certificate file",
    );
    let (pem_a, pem_b) = (pki.signed(&pki.good(&id())), pki.signed(&pki.good(&id())));
    case(
        "registered under an id that is not its hash",
        Setup::Certificate(Registration {
            id: Some(factory_ca::certificate_id(&first_der(&pem_b))),
            ..registration(pem_a)
        }),
        r,
        "does not hash to its id",
    );

    // The CA it is registered under.
    case(
        "issued and registered under an untrusted CA",
        Setup::Certificate(Registration {
            registered_ca: Some(Some(pki.stranger_id.clone())),
            event: json!({"caCertificateId": pki.stranger_id}),
            ..registration(pki.stranger.device_pem(&id()).unwrap())
        }),
        r,
        "is not in JITR_TRUSTED_CA_IDS",
    );
    case(
        "same-name CA, registered under it, event names the trusted CA",
        Setup::Certificate(Registration {
            registered_ca: Some(Some(pki.twin_id.clone())),
            ..registration(pki.twin.device_pem(&id()).unwrap())
        }),
        Want::Skipped,
        "the event names CA",
    );
    case(
        "same-name CA, not linked to any CA, event names the trusted CA",
        Setup::Certificate(Registration {
            registered_ca: Some(None),
            ..registration(pki.twin.device_pem(&id()).unwrap())
        }),
        r,
        "issuer: authorityKeyIdentifier",
    );

    // Forged events for certificates that are not pending, or from another account.
    let good = pki.ca.device_pem(&id()).unwrap();
    case(
        "forged event for an ACTIVE certificate",
        Setup::Certificate(Registration {
            status: CertificateStatus::Active,
            ..registration(good)
        }),
        Want::AlreadyActive,
        "already active",
    );
    let good = pki.ca.device_pem(&id()).unwrap();
    case(
        "forged event for a REVOKED certificate",
        Setup::Certificate(Registration {
            status: CertificateStatus::Revoked,
            ..registration(good)
        }),
        Want::Skipped,
        "REVOKED, never reactivated",
    );
    let good = pki.ca.device_pem(&id()).unwrap();
    case(
        "forged event for an INACTIVE certificate",
        Setup::Certificate(Registration {
            status: CertificateStatus::Inactive,
            ..registration(good)
        }),
        Want::Skipped,
        "INACTIVE, never reactivated",
    );
    let good = pki.ca.device_pem(&id()).unwrap();
    case(
        "forged event for a PENDING_TRANSFER certificate",
        Setup::Certificate(Registration {
            status: CertificateStatus::Other("PENDING_TRANSFER".into()),
            ..registration(good)
        }),
        Want::Skipped,
        "PENDING_TRANSFER",
    );
    let good = pki.ca.device_pem(&id()).unwrap();
    case(
        "forged account id on a good pending certificate",
        Setup::Certificate(Registration {
            event: json!({"awsAccountId": "999999999999"}),
            ..registration(good)
        }),
        Want::Skipped,
        "event names account 999999999999, this is 123456789012",
    );
    case(
        "event for a certificate that was never registered",
        Setup::Payload(json!({
            "certificateId": "f".repeat(64),
            "caCertificateId": pki.ca_id,
            "timestamp": 1732269800000u64,
            "certificateStatus": "PENDING_ACTIVATION",
            "awsAccountId": ACCOUNT,
        })),
        Want::Skipped,
        "the certificate is not registered",
    );
    cases
}

fn event_cases() -> Vec<Case> {
    let m = Want::Malformed;
    let mut cases = Vec::new();
    let mut case = |name, setup, reason| {
        cases.push(Case {
            name,
            setup,
            want: m,
            reason,
        })
    };
    let hex64 = "a".repeat(64);
    let mb = 1024 * 1024;
    case(
        "event that is a JSON array",
        Setup::Payload(json!([fixture_event()])),
        "not a JSON object",
    );
    case(
        "event with a 1 MB certificateId",
        Setup::Payload(event_with("certificateId", json!("a".repeat(mb)))),
        "certificateId a certificate id has 64 hex characters",
    );
    case(
        "event with a 1 MB awsAccountId",
        Setup::Payload(event_with("awsAccountId", json!("1".repeat(mb)))),
        "awsAccountId an AWS account id has 12 digits",
    );
    case(
        "event with a 1 MB certificateStatus",
        Setup::Payload(event_with(
            "certificateStatus",
            json!("PENDING_ACTIVATION".repeat(mb / 18)),
        )),
        "certificateStatus is not PENDING_ACTIVATION",
    );
    case(
        "upper-case certificateId",
        Setup::Payload(event_with("certificateId", json!("A".repeat(64)))),
        "certificateId a certificate id is lowercase hexadecimal",
    );
    case(
        "upper-case caCertificateId",
        Setup::Payload(event_with("caCertificateId", json!("F".repeat(64)))),
        "caCertificateId a certificate id is lowercase hexadecimal",
    );
    case(
        "63-character certificateId",
        Setup::Payload(event_with("certificateId", json!("a".repeat(63)))),
        "has 64 hex characters",
    );
    case(
        "65-character certificateId",
        Setup::Payload(event_with("certificateId", json!("a".repeat(65)))),
        "has 64 hex characters",
    );
    case(
        "certificateId with a NUL byte",
        Setup::Payload(event_with(
            "certificateId",
            json!(format!("{}\0", &hex64[1..])),
        )),
        "certificateId a certificate id is lowercase hexadecimal",
    );
    case(
        "certificateId of 64 bytes with non-ASCII",
        Setup::Payload(event_with(
            "certificateId",
            json!(format!("{}é", &hex64[2..])),
        )),
        "certificateId a certificate id is lowercase hexadecimal",
    );
    case(
        "certificateId of 64 non-ASCII characters",
        Setup::Payload(event_with("certificateId", json!("é".repeat(64)))),
        "has 64 hex characters",
    );
    case(
        "certificateId as a number",
        Setup::Payload(event_with("certificateId", json!(42))),
        "certificateId is not a string",
    );
    case(
        "certificateId missing",
        Setup::Payload(event_with("certificateId", Value::Null)),
        "certificateId is missing",
    );
    case(
        "caCertificateId non-hex",
        Setup::Payload(event_with("caCertificateId", json!("z".repeat(64)))),
        "caCertificateId a certificate id is lowercase hexadecimal",
    );
    case(
        "event claiming the certificate is ACTIVE",
        Setup::Payload(event_with("certificateStatus", json!("ACTIVE"))),
        "certificateStatus is not PENDING_ACTIVATION",
    );
    case(
        "certificateStatus in lower case",
        Setup::Payload(event_with("certificateStatus", json!("pending_activation"))),
        "certificateStatus is not PENDING_ACTIVATION",
    );
    case(
        "certificateStatus with a NUL byte",
        Setup::Payload(event_with(
            "certificateStatus",
            json!("PENDING_ACTIVATION\0"),
        )),
        "certificateStatus is not PENDING_ACTIVATION",
    );
    case(
        "awsAccountId of 11 digits",
        Setup::Payload(event_with("awsAccountId", json!("12345678901"))),
        "awsAccountId an AWS account id has 12 digits",
    );
    case(
        "awsAccountId in Arabic-Indic digits",
        Setup::Payload(event_with("awsAccountId", json!("١٢٣٤٥٦٧٨٩٠١٢"))),
        "awsAccountId an AWS account id has 12 digits",
    );
    case(
        "awsAccountId with a NUL byte",
        Setup::Payload(event_with("awsAccountId", json!("12345678901\0"))),
        "awsAccountId an AWS account id has 12 digits",
    );
    case(
        "awsAccountId as a number",
        Setup::Payload(event_with("awsAccountId", json!(123456789012u64))),
        "awsAccountId is not a string",
    );
    case(
        "negative timestamp",
        Setup::Payload(event_with("timestamp", json!(-1))),
        "timestamp is not a non-negative integer",
    );
    case(
        "fractional timestamp",
        Setup::Payload(event_with("timestamp", json!(1.5))),
        "timestamp is not a non-negative integer",
    );
    case(
        "timestamp beyond u64",
        Setup::Raw(
            fixture_event()
                .to_string()
                .replace("1732269800000", "123456789012345678901234567890")
                .into_bytes(),
        ),
        "timestamp is not a non-negative integer",
    );
    case(
        "certificateRegistrationTimestamp with non-ASCII digits",
        Setup::Payload(event_with(
            "certificateRegistrationTimestamp",
            json!("١٧٣٢٢٦٩٧٩٩٠٠٠"),
        )),
        "certificateRegistrationTimestamp is not epoch milliseconds",
    );
    case(
        "JSON nested 100 000 deep",
        Setup::Raw(
            format!("{{\"a\":{}{}}}", "[".repeat(100_000), "]".repeat(100_000)).into_bytes(),
        ),
        "recursion limit exceeded",
    );
    case(
        "payload that is not UTF-8",
        Setup::Raw(b"{\"certificateId\":\"\xff\xfe\"}".to_vec()),
        "invalid unicode",
    );
    case(
        "SQS replay of a forged-status event",
        Setup::Payload(json!({"Records": [
            {"messageId": "m1", "body": event_with("certificateStatus", json!("ACTIVE")).to_string()},
        ]})),
        "certificateStatus is not PENDING_ACTIVATION",
    );
    case(
        "SQS replay with a 1 MB body of junk",
        Setup::Payload(json!({"Records": [
            {"messageId": "m1", "body": "{".repeat(mb)},
        ]})),
        "Records[].body is not JSON",
    );
    case(
        "SQS replay with base64 that is not base64",
        Setup::Payload(json!({"Records": [
            {"messageId": "m1", "body": json!({"base64OriginalPayload": "%%%\0"}).to_string()},
        ]})),
        "has invalid base64OriginalPayload",
    );
    case(
        "SQS replay of a destination record with an upper-case id",
        Setup::Payload(json!({"Records": [
            {"messageId": "m1", "body": json!({"requestPayload": event_with("certificateId", json!("A".repeat(64)))}).to_string()},
        ]})),
        "certificateId a certificate id is lowercase hexadecimal",
    );
    cases
}

// ---------------------------------------------------------------------------------------
// Running a case.

fn policy(pki: &Pki) -> Policy {
    Policy {
        trusted_ca_ids: vec![CertificateId::parse(&pki.ca_id).unwrap()],
        policy_name: POLICY.into(),
        reject_action: RejectAction::Revoke,
        thing_type: None,
        thing_group: Some("devices".into()),
        id_format: factory_ca::IdFormat::BalenaUuid,
        clock_skew: time::Duration::minutes(5),
        max_validity_days: factory_ca::DEFAULT_MAX_DEVICE_DAYS,
    }
}

fn registry(pki: &Pki) -> MemoryIot {
    let iot = MemoryIot::new();
    for (id, ca) in [
        (&pki.ca_id, &pki.ca),
        (&pki.twin_id, &pki.twin),
        (&pki.stranger_id, &pki.stranger),
    ] {
        assert_eq!(iot.add_ca(&ca.cert_pem).as_str(), id);
    }
    iot
}

/// A fleet every device belongs to: only the certificate or the event can refuse a case.
#[derive(Clone, Default)]
struct EveryDevice(MemoryFleet);

impl EveryDevice {
    fn recorded(&self) -> Vec<(String, String)> {
        self.0.recorded()
    }
}

impl activator::FleetDirectory for EveryDevice {
    async fn membership(
        &self,
        device: &DeviceId,
        deadline: Instant,
    ) -> Result<activator::Membership, activator::FleetError> {
        self.0
            .add(device.as_str(), activator::memory::Standing::Member);
        self.0.membership(device, deadline).await
    }
    fn label(&self) -> String {
        "every fleet".into()
    }
    fn mark(&self) -> activator::ownership::FleetMark {
        activator::ownership::FleetMark::Memory
    }
    async fn record_activation(
        &self,
        member: &activator::FleetMember,
        certificate: &CertificateId,
        deadline: Instant,
    ) -> Result<(), iot::Cause> {
        self.0
            .record_activation(member, certificate, deadline)
            .await
    }
}

fn deadline() -> Instant {
    Instant::now() + StdDuration::from_secs(10)
}

/// What a case came to: an outcome and reason, or the validation error.
#[derive(Debug)]
struct Ended {
    outcome: Option<Outcome>,
    reason: String,
    certificate_id: Option<String>,
    status_before: Option<CertificateStatus>,
}

/// Parses a payload the way the Lambda does and runs the decision for a registered event.
async fn invoke(
    activator: &Arc<Activator<MemoryIot, EveryDevice>>,
    payload: &Value,
    account: Option<&'static str>,
) -> Ended {
    let not_decided = |reason: String| Ended {
        outcome: None,
        reason,
        certificate_id: None,
        status_before: None,
    };
    // Both entry points must agree that the payload is refused, or both accept it.
    let direct = RegisteredEvent::from_value(payload);
    let event = match Incoming::from_value(payload) {
        Err(e) => {
            assert!(
                direct.is_err(),
                "Incoming refused what RegisteredEvent accepts"
            );
            return not_decided(e.to_string());
        }
        Ok(Incoming::Replay(records)) => {
            let reasons: Vec<String> = records
                .iter()
                .map(|r| match &r.event {
                    Err(e) => e.to_string(),
                    Ok(_) => panic!("replayed record {} accepted", r.message_id),
                })
                .collect();
            return not_decided(reasons.join("; "));
        }
        Ok(Incoming::Sweep) => panic!("a hostile payload was taken for a scheduled sweep"),
        Ok(Incoming::Registered(event)) => {
            assert_eq!(direct.as_ref(), Ok(&event));
            event
        }
    };
    let account = account.map(|a| AccountId::parse(a).unwrap());
    let status_before = activator.registry().status(event.certificate_id.as_str());
    let task = {
        let activator = activator.clone();
        let event = event.clone();
        tokio::spawn(async move {
            activator
                .handle_event(&event, account.as_ref(), deadline())
                .await
        })
    };
    let decision = task
        .await
        .expect("the decision panicked")
        .expect("no registry or fleet call fails here: the decision must decide");
    assert_eq!(decision.certificate_id, event.certificate_id.as_str());
    Ended {
        outcome: Some(decision.outcome),
        reason: decision.reason,
        certificate_id: Some(event.certificate_id.to_string()),
        status_before,
    }
}

async fn run(pki: &Pki, case: Case) -> Result<String, String> {
    let iot = registry(pki);
    let fleet = EveryDevice::default();
    let activator = Arc::new(Activator::new(iot.clone(), fleet.clone(), policy(pki)));
    let (payload, account) = match case.setup {
        Setup::Certificate(Registration {
            pem,
            id,
            status,
            registered_ca,
            event,
            account,
        }) => {
            let id = id.unwrap_or_else(|| {
                factory_ca::certificates_from_pem_or_der(pem.as_bytes())
                    .ok()
                    .and_then(|c| c.into_iter().next())
                    .map(|der| factory_ca::certificate_id(&der))
                    // Unparsable PEM: AWS would have refused it; any id will do here.
                    .unwrap_or_else(|| factory_ca::certificate_id(pem.as_bytes()))
            });
            let ca = registered_ca
                .unwrap_or_else(|| Some(pki.ca_id.clone()))
                .map(|c| CertificateId::parse(&c).unwrap());
            iot.add_certificate_as(&id, &pem, status, ca.as_ref(), 0);
            let mut payload = json!({
                "certificateId": id,
                "caCertificateId": pki.ca_id,
                "timestamp": 1732269800000u64,
                "certificateStatus": "PENDING_ACTIVATION",
                "awsAccountId": ACCOUNT,
                "certificateRegistrationTimestamp": "1732269799000",
            });
            for (k, v) in event.as_object().unwrap() {
                payload[k] = v.clone();
            }
            (payload, account)
        }
        Setup::Payload(v) => (v, Some(ACCOUNT)),
        Setup::Raw(bytes) => match serde_json::from_slice::<Value>(&bytes) {
            Ok(v) => (v, Some(ACCOUNT)),
            Err(e) => {
                return check_malformed(case.want, case.reason, &e.to_string(), &iot);
            }
        },
    };
    let ended = invoke(&activator, &payload, account).await;
    let writes = iot.writes();
    let activated = ended
        .certificate_id
        .as_deref()
        .is_some_and(|id| iot.status(id) == Some(CertificateStatus::Active))
        && ended.status_before != Some(CertificateStatus::Active);
    if activated || writes.iter().any(|w| *w != "UpdateCertificate") {
        return Err(format!("provisioned or activated: {writes:?}"));
    }
    if !fleet.recorded().is_empty() {
        return Err(format!("fleet write-back for {:?}", fleet.recorded()));
    }
    if !ended.reason.contains(case.reason) {
        return Err(format!(
            "reason {:?} does not contain {:?}",
            ended.reason, case.reason
        ));
    }
    let Some(outcome) = ended.outcome else {
        return check_malformed(case.want, case.reason, &ended.reason, &iot);
    };
    let id = ended.certificate_id.unwrap_or_default();
    match (case.want, outcome) {
        (Want::Rejected, Outcome::Rejected) => {
            if writes != ["UpdateCertificate"] {
                return Err(format!("a rejection wrote {writes:?}"));
            }
            if iot.status(&id) != Some(CertificateStatus::Revoked) {
                return Err("rejected but not revoked".into());
            }
        }
        (Want::Skipped, Outcome::Skipped) | (Want::AlreadyActive, Outcome::AlreadyActive) => {
            if !writes.is_empty() {
                return Err(format!("{outcome:?} but wrote {writes:?}"));
            }
            if iot.status(&id) != ended.status_before {
                return Err("the status changed".into());
            }
        }
        (want, got) => return Err(format!("wanted {want:?}, got {got:?}")),
    }
    Ok(format!("{}: {}", outcome.as_str(), ended.reason))
}

fn check_malformed(
    want: Want,
    expected: &str,
    reason: &str,
    iot: &MemoryIot,
) -> Result<String, String> {
    if want != Want::Malformed {
        return Err(format!(
            "wanted {want:?}, the payload was refused: {reason}"
        ));
    }
    if !reason.contains(expected) {
        return Err(format!("reason {reason:?} does not contain {expected:?}"));
    }
    if reason.len() > 500 {
        return Err(format!(
            "the reason echoes the input ({} bytes)",
            reason.len()
        ));
    }
    if !iot.calls().is_empty() {
        return Err(format!("AWS was called: {:?}", iot.calls()));
    }
    Ok(format!("malformed: {reason}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_certificates_and_events_are_never_activated() {
    let pki = Pki::new();
    let mut cases = certificate_cases(&pki);
    cases.extend(event_cases());
    assert!(cases.len() >= 40, "{} cases", cases.len());
    let mut names = std::collections::HashSet::new();
    let mut failures = Vec::new();
    let total = cases.len();
    for case in cases {
        let name = case.name;
        assert!(names.insert(name), "duplicate case name {name:?}");
        match run(&pki, case).await {
            Ok(result) => println!("ok   {name:<64} {result}"),
            Err(problem) => {
                println!("FAIL {name:<64} {problem}");
                failures.push(format!("{name}: {problem}"));
            }
        }
    }
    println!("{total} hostile cases");
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

/// The builder's unmodified certificates pass, so each hostile case is refused for its one
/// flaw and not for something the builder always gets wrong.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn good_certificates_built_the_same_way_are_activated() {
    let pki = Pki::new();
    let goods = [
        ("hand-built P-256", pki.signed(&pki.good(&uuid(1)))),
        (
            "hand-built RSA-2048",
            pki.signed(&pki.good_with_spki(&uuid(2), spki_from_base64(RSA_2048))),
        ),
        ("hand-built legacy 62-character UUID", {
            pki.signed(&pki.good(&"ab".repeat(31)))
        }),
        (
            "hand-built without basicConstraints",
            pki.signed(&pki.good(&uuid(3)).with_extensions(|e| {
                e.remove(0);
            })),
        ),
        ("issued by factory-ca", pki.ca.device_pem(&uuid(4)).unwrap()),
        (
            "issued by rcgen from device_params",
            pki.ca.sign(&device_params(&uuid(5))).unwrap(),
        ),
    ];
    for (name, pem) in goods {
        let iot = registry(&pki);
        let fleet = EveryDevice::default();
        let activator = Arc::new(Activator::new(iot.clone(), fleet.clone(), policy(&pki)));
        let id = testkit::certs::certificate_id_of(&pem).unwrap();
        let ca = CertificateId::parse(&pki.ca_id).unwrap();
        iot.add_certificate_as(
            &id,
            &pem,
            CertificateStatus::PendingActivation,
            Some(&ca),
            0,
        );
        let payload = event_with("certificateId", json!(id));
        let payload = {
            let mut p = payload;
            p["caCertificateId"] = json!(pki.ca_id);
            p
        };
        let ended = invoke(&activator, &payload, Some(ACCOUNT)).await;
        assert_eq!(ended.outcome, Some(Outcome::Activated), "{name}: {ended:?}");
        let writes = iot.writes();
        assert_eq!(
            writes.last(),
            Some(&"UpdateCertificate"),
            "{name}: activation is the last write"
        );
        assert_eq!(iot.status(&id), Some(CertificateStatus::Active), "{name}");
        for step in ["CreateThing", "AttachPolicy", "AttachThingPrincipal"] {
            assert!(iot.calls().contains(&step), "{name}: {step}");
        }
        assert_eq!(fleet.recorded().len(), 1, "{name}: fleet write-back");
    }
}

// ---------------------------------------------------------------------------------------
// Good certificates in a hostile world: the device's Thing already has a certificate, or
// the fleet answer cannot be trusted.

/// A good pending certificate for `device`, registered in `iot`; its id.
fn pending_good(pki: &Pki, iot: &MemoryIot, device: &str) -> String {
    let pem = pki.ca.device_pem(device).unwrap();
    let ca = CertificateId::parse(&pki.ca_id).unwrap();
    iot.add_certificate(&pem, CertificateStatus::PendingActivation, Some(&ca), 0)
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thing_that_already_has_a_certificate_decides_what_a_new_one_gets() {
    let pki = Pki::new();
    let cases = [
        (
            "an ACTIVE other certificate",
            CertificateStatus::Active,
            Outcome::Held,
        ),
        (
            "an INACTIVE other certificate",
            CertificateStatus::Inactive,
            Outcome::Activated,
        ),
        (
            "a REVOKED other certificate",
            CertificateStatus::Revoked,
            Outcome::Activated,
        ),
    ];
    for (n, (name, other_status, want)) in cases.into_iter().enumerate() {
        let iot = registry(&pki);
        let fleet = EveryDevice::default();
        let activator = Activator::new(iot.clone(), fleet, policy(&pki));
        let device = uuid(900 + n as u32);
        let other = pending_good(&pki, &iot, &device);
        iot.change_status_before("DescribeCertificate", 1, &other, other_status.clone());
        iot.attach(&device, &other);
        let new = pending_good(&pki, &iot, &device);
        let id = CertificateId::parse(&new).unwrap();
        let ca = CertificateId::parse(&pki.ca_id).unwrap();
        let decision = activator
            .activate(&id, Some(&ca), deadline())
            .await
            .unwrap();
        assert_eq!(decision.outcome, want, "{name}: {decision:?}");
        let attached = iot.principals_of(&device);
        match want {
            Outcome::Held => {
                assert_eq!(attached, vec![other.clone()], "{name}");
                assert_eq!(iot.status(&new), Some(CertificateStatus::PendingActivation));
            }
            _ => {
                assert_eq!(attached, vec![new.clone()], "{name}: the old one detached");
                assert_eq!(iot.status(&new), Some(CertificateStatus::Active));
            }
        }
        assert_eq!(
            iot.status(&other),
            Some(other_status),
            "{name}: left as it was"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_answers_that_prove_nothing_never_activate_or_revoke() {
    use activator::balena_directory::{BalenaDirectory, KeySource};
    use testkit::balena::{FakeBalena, Fault};

    const FLEET: u64 = 31337;
    const KEY: &str = "hostile-fleet-key";
    let pki = Pki::new();
    let balena = tokio::task::spawn_blocking(|| FakeBalena::start(KEY))
        .await
        .unwrap()
        .unwrap();
    balena.add_fleet(FLEET, "acme/hostile");
    balena.add_fleet(FLEET + 1, "acme/elsewhere");
    let (member, inactive, elsewhere) = (uuid(950), uuid(951), uuid(952));
    balena.add_device(FLEET, &member, true);
    balena.add_device(FLEET, &inactive, false);
    balena.add_device(FLEET + 1, &elsewhere, true);
    let iot = registry(&pki);
    // One directory for the whole test: a warm container.
    let fleet = BalenaDirectory::new(
        &balena.url(),
        activator::FleetId::parse(&FLEET.to_string()).unwrap(),
        KeySource::Literal(balena::ApiKey::new(KEY.into())),
    )
    .unwrap()
    .with_request_timeout(StdDuration::from_millis(500));
    let activator = Activator::new(iot.clone(), fleet, policy(&pki));
    let ca = CertificateId::parse(&pki.ca_id).unwrap();
    let decide = |device: String| {
        let iot = iot.clone();
        let activator = &activator;
        let ca = ca.clone();
        let pki = &pki;
        async move {
            let id = pending_good(pki, &iot, &device);
            let cert = CertificateId::parse(&id).unwrap();
            let result = activator.activate(&cert, Some(&ca), deadline()).await;
            (id, result)
        }
    };

    // Proven answers decide.
    for (name, device, want) in [
        ("a stranger", uuid(953), Outcome::Rejected),
        // Paused, which can be undone: held, never revoked (#21 case 5).
        ("an inactive device", inactive.clone(), Outcome::Held),
        (
            "a device of another fleet the key sees",
            elsewhere.clone(),
            Outcome::Rejected,
        ),
    ] {
        let (_, result) = decide(device).await;
        assert_eq!(result.unwrap().outcome, want, "{name}");
    }
    // Answers that prove nothing leave the certificate pending, nothing written.
    let faults = [
        (
            "a row of another fleet",
            Fault::ForeignRow { fleet: FLEET + 1 },
        ),
        (
            "an oversized body",
            Fault::Body {
                bytes: 10 * 1024 * 1024,
            },
        ),
        ("a slow body", Fault::SlowBody(StdDuration::from_secs(3))),
        ("the fleet hidden from the key", Fault::None),
    ];
    for (name, fault) in faults {
        if name == "the fleet hidden from the key" {
            balena.hide_fleet_from_key(FLEET);
        }
        balena.set_fault(fault);
        iot.clear_calls();
        let (id, result) = decide(member.clone()).await;
        let err = result.expect_err(name);
        assert!(err.is_retryable(), "{name}: {err}");
        assert_eq!(
            iot.status(&id),
            Some(CertificateStatus::PendingActivation),
            "{name}"
        );
        assert!(iot.writes().is_empty(), "{name}: {:?}", iot.writes());
    }
}
