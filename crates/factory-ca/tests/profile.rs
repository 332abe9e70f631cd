//! Every certificate the CA makes, cross-checked by independent implementations:
//! x509-parser for each profile field, `openssl verify` for the chains, and openssl for
//! the encrypted key format.

// Test helpers panic on a failed setup step: that is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test setup: a panic is the report

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use ::time::{Duration, OffsetDateTime};
use factory_ca::{
    certificate_id, certificates_from_pem_or_der, inspect_device_certificate, issue_batch,
    BatchOptions, Ca, CaInit, Check, CsrOptions, DeviceId, Error, IdFormat, InspectOptions,
    IssuingCa, KeyAlgorithm, KeyProtection, ManifestEntry, Passphrase, DEFAULT_MAX_DEVICE_DAYS,
};
use x509_parser::extensions::ParsedExtension;
use x509_parser::oid_registry::{OID_EC_P256, OID_NIST_EC_P384};
use x509_parser::prelude::*;

const PASS: &str = "test passphrase, not a secret";

fn pass() -> Passphrase {
    Passphrase::new(PASS.into()).unwrap()
}

fn init(dir: &Path, issuing: bool) -> CaInit {
    CaInit {
        dir: dir.to_owned(),
        root_subject: "O=Test Fleet,CN=Test fleet CA".parse().unwrap(),
        root_key: KeyAlgorithm::P384,
        root_days: 7305,
        issuing: issuing.then(|| IssuingCa {
            subject: "O=Test Fleet,CN=Test issuing CA".parse().unwrap(),
            key: KeyAlgorithm::P256,
            days: 1826,
        }),
        protection: KeyProtection::Encrypted(pass()),
        root_protection: Some(KeyProtection::Encrypted(
            Passphrase::new(format!("{PASS} for the root")).unwrap(),
        )),
        remote_key: None,
    }
}

fn der_of(path: &Path) -> Vec<u8> {
    certificates_from_pem_or_der(&std::fs::read(path).unwrap())
        .unwrap()
        .remove(0)
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

fn uuid(n: usize) -> String {
    format!("{n:032x}")
}

fn ski(cert: &X509Certificate<'_>) -> Option<Vec<u8>> {
    cert.extensions()
        .iter()
        .find_map(|e| match e.parsed_extension() {
            ParsedExtension::SubjectKeyIdentifier(k) => Some(k.0.to_vec()),
            _ => None,
        })
}

fn aki(cert: &X509Certificate<'_>) -> Option<Vec<u8>> {
    cert.extensions()
        .iter()
        .find_map(|e| match e.parsed_extension() {
            ParsedExtension::AuthorityKeyIdentifier(k) => {
                k.key_identifier.as_ref().map(|k| k.0.to_vec())
            }
            _ => None,
        })
}

fn curve(cert: &X509Certificate<'_>) -> String {
    let oid = cert
        .public_key()
        .algorithm
        .parameters
        .as_ref()
        .unwrap()
        .as_oid()
        .unwrap();
    if oid == OID_EC_P256 {
        "P-256".into()
    } else if oid == OID_NIST_EC_P384 {
        "P-384".into()
    } else {
        oid.to_id_string()
    }
}

fn assert_ca_profile(der: &[u8], path_len: u32, curve_name: &str, days: i64, now: OffsetDateTime) {
    let (_, cert) = X509Certificate::from_der(der).unwrap();
    let bc = cert.basic_constraints().unwrap().unwrap();
    assert!(bc.critical && bc.value.ca, "critical CA:TRUE");
    assert_eq!(bc.value.path_len_constraint, Some(path_len));
    let ku = cert.key_usage().unwrap().unwrap();
    assert!(
        ku.critical
            && ku.value.key_cert_sign()
            && ku.value.crl_sign()
            && !ku.value.digital_signature()
    );
    assert!(ski(&cert).is_some(), "SKI present");
    assert_eq!(curve(&cert), curve_name);
    assert_validity(&cert, days, now);
    assert_serial(cert.raw_serial());
}

fn assert_validity(cert: &X509Certificate<'_>, days: i64, now: OffsetDateTime) {
    let nb = cert.validity().not_before.to_datetime();
    let na = cert.validity().not_after.to_datetime();
    let backdate = now - nb;
    assert!(
        backdate >= Duration::seconds(59) && backdate <= Duration::seconds(61),
        "backdated a minute: {backdate}"
    );
    assert!((na - now - Duration::days(days)).abs() <= Duration::seconds(1));
}

fn assert_serial(raw: &[u8]) {
    assert!(raw[0] & 0x80 == 0, "positive");
    let significant: Vec<_> = raw.iter().skip_while(|b| **b == 0).collect();
    assert!(
        (16..=20).contains(&significant.len()),
        "16-20 bytes, got {}",
        significant.len()
    );
}

fn openssl(args: &[&str]) -> (bool, String) {
    let out = Command::new("openssl")
        .args(args)
        .output()
        .expect("openssl is installed by scripts/setup");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn path_str(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn batch(dir: &Path, out: &Path, ids: &[String], force: bool) -> factory_ca::BatchReport {
    let ca = Ca::load(dir, Some(&pass())).unwrap();
    let ids: Vec<_> = ids
        .iter()
        .map(|i| DeviceId::parse(i, IdFormat::BalenaUuid).unwrap())
        .collect();
    let opts = BatchOptions {
        out_dir: out.to_owned(),
        key: KeyAlgorithm::P256,
        days: 3652,
        jobs: 2,
        force,
        now: OffsetDateTime::now_utc(),
        rotation: None,
    };
    issue_batch(&ca, &ids, &opts, &|| {}).unwrap()
}

fn manifest(out: &Path) -> Vec<ManifestEntry> {
    std::fs::read_to_string(out.join("manifest.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn single_ca_matches_the_root_profile_and_its_key_is_encrypted_pkcs8() {
    let tmp = tempfile::tempdir().unwrap();
    let now = OffsetDateTime::now_utc();
    let files = init(tmp.path(), false).run(now).unwrap();
    assert!(files.root.is_none());
    assert_ca_profile(&der_of(&files.ca_cert), 0, "P-384", 7305, now);
    assert_eq!(mode(&files.ca_key), 0o600);
    let key_text = std::fs::read_to_string(&files.ca_key).unwrap();
    assert!(key_text.starts_with("-----BEGIN ENCRYPTED PRIVATE KEY-----"));

    // openssl reads our PBES2 (scrypt, AES-256-CBC) file with the passphrase, and not without it.
    let pass_file = tmp.path().join("pass");
    std::fs::write(&pass_file, PASS).unwrap();
    let (ok, text) = openssl(&[
        "pkcs8",
        "-in",
        path_str(&files.ca_key),
        "-passin",
        &format!("file:{}", path_str(&pass_file)),
        "-nocrypt",
        "-topk8",
        "-out",
        "/dev/null",
    ]);
    assert!(ok, "{text}");
    let (ok, _) = openssl(&[
        "pkey",
        "-in",
        path_str(&files.ca_key),
        "-passin",
        "pass:wrong",
        "-noout",
    ]);
    assert!(!ok);
    // PBES2: PBKDF2-HMAC-SHA256 at 600,000 iterations (0x927C0), AES-256-CBC.
    let (ok, text) = openssl(&["asn1parse", "-in", path_str(&files.ca_key)]);
    assert!(
        ok && text.contains(":PBKDF2")
            && text.contains(":0927C0")
            && text.contains("hmacWithSHA256")
            && text.contains("aes-256-cbc"),
        "{text}"
    );

    let (ok, text) = openssl(&[
        "verify",
        "-x509_strict",
        "-CAfile",
        path_str(&files.ca_cert),
        path_str(&files.ca_cert),
    ]);
    assert!(ok, "{text}");
}

#[test]
fn issuing_ca_sits_below_a_path_limited_root() {
    let tmp = tempfile::tempdir().unwrap();
    let now = OffsetDateTime::now_utc();
    let files = init(tmp.path(), true).run(now).unwrap();
    let (root_cert, root_key) = files.root.clone().unwrap();
    assert_eq!(mode(&root_key), 0o600);
    let root_der = der_of(&root_cert);
    let ca_der = der_of(&files.ca_cert);
    assert_ca_profile(&root_der, 1, "P-384", 7305, now);
    assert_ca_profile(&ca_der, 0, "P-256", 1826, now);
    let (_, root) = X509Certificate::from_der(&root_der).unwrap();
    let (_, ca) = X509Certificate::from_der(&ca_der).unwrap();
    assert_eq!(aki(&ca), ski(&root), "issuing CA's AKI is the root's SKI");
    assert_eq!(ca.issuer().as_raw(), root.subject().as_raw());
    ca.verify_signature(Some(root.public_key())).unwrap();
    let (ok, text) = openssl(&[
        "verify",
        "-x509_strict",
        "-CAfile",
        path_str(&root_cert),
        path_str(&files.ca_cert),
    ]);
    assert!(ok, "{text}");
}

#[test]
fn refuses_to_overwrite_an_existing_ca() {
    let tmp = tempfile::tempdir().unwrap();
    init(tmp.path(), false)
        .run(OffsetDateTime::now_utc())
        .unwrap();
    let before = std::fs::read(tmp.path().join("ca.key")).unwrap();
    let err = init(tmp.path(), false)
        .run(OffsetDateTime::now_utc())
        .unwrap_err();
    assert!(err.to_string().contains("already exists"), "{err}");
    assert_eq!(std::fs::read(tmp.path().join("ca.key")).unwrap(), before);
}

#[test]
fn wrong_passphrase_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    init(tmp.path(), false)
        .run(OffsetDateTime::now_utc())
        .unwrap();
    let wrong = Passphrase::new("not it".into()).unwrap();
    let err = Ca::load(tmp.path(), Some(&wrong)).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "wrong passphrase for {}",
            tmp.path().join("ca.key").display()
        )
    );
}

fn check_device_dir(
    out: &Path,
    entry: &ManifestEntry,
    ca: &X509Certificate<'_>,
    now: OffsetDateTime,
) {
    let dir = out.join(&entry.id);
    let key_path = dir.join("device.key");
    assert_eq!(mode(&key_path), 0o600, "device key is private");
    let der = der_of(&dir.join("device.crt"));
    assert_eq!(
        certificate_id(&der),
        entry.certificate_id,
        "manifest id is SHA-256 of the DER"
    );
    let (_, cert) = X509Certificate::from_der(&der).unwrap();
    assert_eq!(
        hex::encode(cert.raw_serial()).trim_start_matches("00"),
        entry.serial.trim_start_matches("00")
    );
    assert_serial(cert.raw_serial());
    let cns: Vec<_> = cert
        .subject()
        .iter_common_name()
        .map(|c| c.as_str().unwrap())
        .collect();
    assert_eq!(cns, [entry.id.as_str()]);
    assert_eq!(cert.subject().iter().count(), 1, "subject is CN only");
    let bc = cert.basic_constraints().unwrap().unwrap();
    assert!(!bc.value.ca);
    let ku = cert.key_usage().unwrap().unwrap();
    assert!(
        ku.critical && ku.value.digital_signature() && ku.value.flags == 1,
        "critical digitalSignature only"
    );
    let eku = cert.extended_key_usage().unwrap().unwrap();
    assert!(eku.value.client_auth && !eku.value.server_auth);
    assert!(ski(&cert).is_some());
    assert_eq!(aki(&cert), ski(ca));
    assert_eq!(curve(&cert), "P-256");
    // Ten years, unless the CA ends sooner: a device never outlives it.
    let ca_end = ca.validity().not_after.to_datetime();
    if now + Duration::days(3652) <= ca_end {
        assert_validity(&cert, 3652, now);
    } else {
        assert_eq!(cert.validity().not_after.to_datetime(), ca_end);
    }
    cert.verify_signature(Some(ca.public_key())).unwrap();

    // The key file is PKCS#8 and belongs to the certificate.
    let key_pem = std::fs::read_to_string(&key_path).unwrap();
    let (label, key_der) = pkcs8::der::pem::decode_vec(key_pem.as_bytes()).unwrap();
    assert_eq!(label, "PRIVATE KEY");
    let key = aws_lc_rs::signature::EcdsaKeyPair::from_pkcs8(
        &aws_lc_rs::signature::ECDSA_P256_SHA256_ASN1_SIGNING,
        &key_der,
    )
    .unwrap();
    use aws_lc_rs::signature::KeyPair;
    assert_eq!(
        key.public_key().as_ref(),
        cert.public_key().subject_public_key.data.as_ref()
    );

    // chain.pem: the device certificate, then the signing CA.
    let chain =
        certificates_from_pem_or_der(&std::fs::read(dir.join("chain.pem")).unwrap()).unwrap();
    assert_eq!(chain.len(), 2);
    assert_eq!(chain[0], der);
    assert_eq!(chain[1], ca.as_ref());
}

#[test]
fn device_certificates_match_the_profile_and_verify_with_openssl() {
    let tmp = tempfile::tempdir().unwrap();
    let now = OffsetDateTime::now_utc();
    let files = init(tmp.path(), false).run(now).unwrap();
    let out = tmp.path().join("devices");
    let ids: Vec<_> = (1..=6).map(uuid).collect();
    let report = batch(tmp.path(), &out, &ids, false);
    assert!(report.failures.is_empty(), "{:?}", report.failures);
    let entries = manifest(&out);
    assert_eq!(entries.len(), ids.len());
    let ca_der = der_of(&files.ca_cert);
    let (_, ca) = X509Certificate::from_der(&ca_der).unwrap();
    let mut serials = std::collections::HashSet::new();
    for entry in &entries {
        assert!(serials.insert(entry.serial.clone()), "unique serials");
        check_device_dir(&out, entry, &ca, now);
        let dev = out.join(&entry.id);
        let (ok, text) = openssl(&[
            "verify",
            "-x509_strict",
            "-purpose",
            "sslclient",
            "-CAfile",
            path_str(&files.ca_cert),
            path_str(&dev.join("device.crt")),
        ]);
        assert!(ok, "{text}");
        let inspection = inspect_device_certificate(
            &der_of(&dev.join("device.crt")),
            &InspectOptions {
                id_format: IdFormat::BalenaUuid,
                ca_der: Some(&ca_der),
                now,
                max_validity_days: Some(factory_ca::DEFAULT_MAX_DEVICE_DAYS),
            },
        );
        assert!(inspection.passed(), "{:?}", inspection.first_failure());
        assert_eq!(inspection.device_id.unwrap().as_str(), entry.id);
    }
}

#[test]
fn chain_from_an_issuing_ca_verifies_up_to_the_offline_root() {
    let tmp = tempfile::tempdir().unwrap();
    let now = OffsetDateTime::now_utc();
    let files = init(tmp.path(), true).run(now).unwrap();
    let out = tmp.path().join("devices");
    batch(tmp.path(), &out, &[uuid(7)], false);
    let entry = &manifest(&out)[0];
    let ca_der = der_of(&files.ca_cert);
    let (_, ca) = X509Certificate::from_der(&ca_der).unwrap();
    check_device_dir(&out, entry, &ca, now);
    let root = files.root.unwrap().0;
    let dev = out.join(&entry.id);
    // The device presents chain.pem; a verifier that trusts only the root accepts it.
    let (ok, text) = openssl(&[
        "verify",
        "-x509_strict",
        "-purpose",
        "sslclient",
        "-CAfile",
        path_str(&root),
        "-untrusted",
        path_str(&dev.join("chain.pem")),
        path_str(&dev.join("device.crt")),
    ]);
    assert!(ok, "{text}");
    // The leaf alone does not verify against the root.
    let (ok, _) = openssl(&[
        "verify",
        "-CAfile",
        path_str(&root),
        path_str(&dev.join("device.crt")),
    ]);
    assert!(!ok);
}

#[test]
fn an_id_already_in_the_manifest_is_refused_unless_forced() {
    let tmp = tempfile::tempdir().unwrap();
    init(tmp.path(), false)
        .run(OffsetDateTime::now_utc())
        .unwrap();
    let out = tmp.path().join("devices");
    batch(tmp.path(), &out, &[uuid(1)], false);
    let first_cert = std::fs::read(out.join(uuid(1)).join("device.crt")).unwrap();

    let ca = Ca::load(tmp.path(), Some(&pass())).unwrap();
    let ids = [
        DeviceId::parse(&uuid(2), IdFormat::BalenaUuid).unwrap(),
        DeviceId::parse(&uuid(1), IdFormat::BalenaUuid).unwrap(),
    ];
    let opts = BatchOptions {
        out_dir: out.clone(),
        key: KeyAlgorithm::P256,
        days: 10,
        jobs: 1,
        force: false,
        now: OffsetDateTime::now_utc(),
        rotation: None,
    };
    let err = issue_batch(&ca, &ids, &opts, &|| {}).unwrap_err();
    assert!(
        err.to_string()
            .contains(&format!("device {} was already issued", uuid(1))),
        "{err}"
    );
    assert!(
        !out.join(uuid(2)).exists(),
        "nothing issued when the batch is refused"
    );
    assert_eq!(manifest(&out).len(), 1);

    let report = batch(tmp.path(), &out, &[uuid(1)], true);
    assert_eq!(report.issued.len(), 1);
    assert_ne!(
        std::fs::read(out.join(uuid(1)).join("device.crt")).unwrap(),
        first_cert
    );
    let entries = manifest(&out);
    assert_eq!(entries.len(), 2, "a reissue appends a line");
    assert_ne!(entries[0].serial, entries[1].serial);

    let dup = [
        DeviceId::parse(&uuid(3), IdFormat::BalenaUuid).unwrap(),
        DeviceId::parse(&uuid(3), IdFormat::BalenaUuid).unwrap(),
    ];
    assert!(issue_batch(&ca, &dup, &opts, &|| {})
        .unwrap_err()
        .to_string()
        .contains("more than once"));
}

#[test]
fn a_batch_failing_midway_keeps_manifest_and_files_in_agreement() {
    let tmp = tempfile::tempdir().unwrap();
    init(tmp.path(), false)
        .run(OffsetDateTime::now_utc())
        .unwrap();
    let out = tmp.path().join("devices");
    std::fs::create_dir_all(&out).unwrap();
    // A plain file where device 3's folder must go: that device cannot be written.
    std::fs::write(out.join(uuid(3)), b"in the way").unwrap();
    let ids: Vec<_> = (1..=5).map(uuid).collect();
    let report = batch(tmp.path(), &out, &ids, false);
    assert_eq!(report.failures.len(), 1);
    assert_eq!(report.failures[0].id, uuid(3));
    assert!(report.failures[0].error.to_string().contains(&uuid(3)));
    let entries = manifest(&out);
    let in_manifest: std::collections::BTreeSet<_> = entries.iter().map(|e| e.id.clone()).collect();
    let on_disk: std::collections::BTreeSet<_> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_dir())
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(in_manifest, on_disk);
    assert_eq!(in_manifest.len(), 4);
    let leftovers: Vec<PathBuf> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with('.'))
        .collect();
    assert!(
        leftovers.is_empty(),
        "no temporary files left: {leftovers:?}"
    );
}

fn openssl_csr(tmp: &Path, name: &str, key_args: &[&str], cn: &str) -> Vec<u8> {
    let key = tmp.join(format!("{name}.key"));
    let csr = tmp.join(format!("{name}.csr"));
    let mut args = vec![
        "req",
        "-new",
        "-nodes",
        "-keyout",
        path_str(&key),
        "-out",
        path_str(&csr),
    ];
    args.extend_from_slice(key_args);
    let subj = format!("/CN={cn}");
    args.extend_from_slice(&["-subj", &subj]);
    let (ok, text) = openssl(&args);
    assert!(ok, "{text}");
    std::fs::read(csr).unwrap()
}

#[test]
fn csr_path_signs_the_devices_own_key_and_rejects_weak_or_forged_requests() {
    let tmp = tempfile::tempdir().unwrap();
    let files = init(tmp.path(), false)
        .run(OffsetDateTime::now_utc())
        .unwrap();
    let ca = Ca::load(tmp.path(), Some(&pass())).unwrap();
    let now = OffsetDateTime::now_utc();
    let ca_der = der_of(&files.ca_cert);

    for (name, args) in [
        (
            "ec",
            &["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"][..],
        ),
        ("rsa", &["-newkey", "rsa:2048"][..]),
    ] {
        let csr = openssl_csr(tmp.path(), name, args, &uuid(42));
        let issued = ca.sign_csr(&csr, 365, now).unwrap();
        assert!(issued.key_pem.is_none(), "the device keeps its key");
        let cert_path = tmp.path().join(format!("{name}.crt"));
        std::fs::write(&cert_path, &issued.cert_pem).unwrap();
        let (ok, text) = openssl(&[
            "verify",
            "-x509_strict",
            "-purpose",
            "sslclient",
            "-CAfile",
            path_str(&files.ca_cert),
            path_str(&cert_path),
        ]);
        assert!(ok, "{text}");
        // The certificate carries the CSR's key.
        let (_, out) = openssl(&["x509", "-in", path_str(&cert_path), "-noout", "-pubkey"]);
        let (_, want) = openssl(&[
            "pkey",
            "-in",
            path_str(&tmp.path().join(format!("{name}.key"))),
            "-pubout",
        ]);
        assert_eq!(out, want);
        let inspection = inspect_device_certificate(
            &issued.cert_der,
            &InspectOptions {
                id_format: IdFormat::BalenaUuid,
                ca_der: Some(&ca_der),
                now,
                max_validity_days: Some(factory_ca::DEFAULT_MAX_DEVICE_DAYS),
            },
        );
        assert!(inspection.passed(), "{:?}", inspection.first_failure());
    }

    let weak = openssl_csr(tmp.path(), "weak", &["-newkey", "rsa:1024"], &uuid(43));
    assert!(ca
        .sign_csr(&weak, 365, now)
        .unwrap_err()
        .to_string()
        .contains("RSA 1024 bits"));
    let p521 = openssl_csr(
        tmp.path(),
        "p521",
        &["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-521"],
        &uuid(44),
    );
    assert!(ca
        .sign_csr(&p521, 365, now)
        .unwrap_err()
        .to_string()
        .contains("P-256 or P-384"));
    let bad_cn = openssl_csr(
        tmp.path(),
        "badcn",
        &["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"],
        "Not-A-UUID",
    );
    assert!(ca
        .sign_csr(&bad_cn, 365, now)
        .unwrap_err()
        .to_string()
        .contains("invalid device id"));

    // Flip one bit of the signature: the CSR no longer proves possession of its key.
    let good = openssl_csr(
        tmp.path(),
        "forged",
        &["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"],
        &uuid(45),
    );
    let (_, mut der) = pkcs8::der::pem::decode_vec(&good).unwrap();
    let last = der.len() - 3;
    der[last] ^= 1;
    let err = ca.sign_csr(&der, 365, now).unwrap_err();
    assert!(
        err.to_string().contains("signature does not verify"),
        "{err}"
    );
}

#[test]
fn every_csr_signing_is_recorded_and_a_second_one_for_an_id_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    init(tmp.path(), false)
        .run(OffsetDateTime::now_utc())
        .unwrap();
    let ca = Ca::load(tmp.path(), Some(&pass())).unwrap();
    let out = tmp.path().join("devices");
    let csr = openssl_csr(
        tmp.path(),
        "d",
        &["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"],
        &uuid(9),
    );
    let opts = |write_folder, force, expect_id| CsrOptions {
        devices: &out,
        write_folder,
        days: 365,
        force,
        expect_id,
        now: OffsetDateTime::now_utc(),
    };
    let issued = ca
        .sign_csr_recorded(&csr, &opts(true, false, None))
        .unwrap();
    assert!(!out.join(uuid(9)).join("device.key").exists());
    assert_eq!(
        certificate_id(&der_of(&out.join(uuid(9)).join("device.crt"))),
        issued.entry.certificate_id
    );
    assert_eq!(manifest(&out), vec![issued.entry.clone()]);
    // Written elsewhere (`--out`) or to the folder, an id issued before is refused...
    for write_folder in [false, true] {
        assert!(ca
            .sign_csr_recorded(&csr, &opts(write_folder, false, None))
            .unwrap_err()
            .to_string()
            .contains("already issued"));
    }
    // ...unless forced, and then recorded too, even without a folder.
    let again = ca
        .sign_csr_recorded(&csr, &opts(false, true, None))
        .unwrap();
    assert_eq!(manifest(&out), vec![issued.entry, again.entry]);

    // A CSR for another device than the one expected: refused, nothing written.
    let other = DeviceId::parse(&uuid(10), IdFormat::BalenaUuid).unwrap();
    let csr10 = openssl_csr(
        tmp.path(),
        "e",
        &["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"],
        &uuid(11),
    );
    let err = ca
        .sign_csr_recorded(&csr10, &opts(true, false, Some(&other)))
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        format!("the CSR is for device {}, not {}", uuid(11), uuid(10))
    );
    assert_eq!(manifest(&out).len(), 2);
    assert!(!out.join(uuid(11)).exists());
}

#[test]
fn devices_never_outlive_their_ca_nor_the_profiles_maximum() {
    let tmp = tempfile::tempdir().unwrap();
    let mut short = init(tmp.path(), false);
    short.root_days = 30;
    short.run(OffsetDateTime::now_utc()).unwrap();
    let ca = Ca::load(tmp.path(), Some(&pass())).unwrap();
    let id = DeviceId::parse(&uuid(1), IdFormat::BalenaUuid).unwrap();
    let now = OffsetDateTime::now_utc();
    let issued = ca.issue_device(&id, KeyAlgorithm::P256, 365, now).unwrap();
    assert_eq!(issued.capped_at, Some(ca.not_after()));
    let (_, cert) = X509Certificate::from_der(&issued.cert_der).unwrap();
    assert_eq!(cert.validity().not_after.to_datetime(), ca.not_after());

    let err = ca
        .issue_device(&id, KeyAlgorithm::P256, DEFAULT_MAX_DEVICE_DAYS + 1, now)
        .unwrap_err();
    assert!(matches!(err, Error::ValidityTooLong { .. }), "{err}");

    // Past the CA's end: nothing is signed.
    let later = ca.not_after() + Duration::days(1);
    let err = ca
        .issue_device(&id, KeyAlgorithm::P256, 10, later)
        .unwrap_err();
    assert!(matches!(err, Error::CaExpired { .. }), "{err}");

    // Inspection says the same of certificates made elsewhere.
    let ca_der = ca.cert_der().to_vec();
    let inspect = |der: &[u8], now, max| {
        inspect_device_certificate(
            der,
            &InspectOptions {
                id_format: IdFormat::BalenaUuid,
                ca_der: Some(&ca_der),
                now,
                max_validity_days: max,
            },
        )
    };
    let capped = inspect(&issued.cert_der, now, Some(DEFAULT_MAX_DEVICE_DAYS));
    assert!(capped.passed(), "{:?}", capped.first_failure());
    let too_long = inspect(&issued.cert_der, now, Some(10));
    assert_eq!(too_long.first_failure().unwrap().check, Check::Validity);
    assert!(too_long
        .first_failure()
        .unwrap()
        .detail
        .contains("longer than the profile's maximum"));
    let after_ca = inspect(&issued.cert_der, later, None);
    let failures: Vec<_> = after_ca
        .findings
        .iter()
        .filter(|f| !f.ok)
        .map(|f| f.check)
        .collect();
    assert!(failures.contains(&Check::Issuer), "{failures:?}");
}

#[test]
fn verification_certificate_carries_the_registration_code_and_is_signed_by_the_ca() {
    let tmp = tempfile::tempdir().unwrap();
    let files = init(tmp.path(), false)
        .run(OffsetDateTime::now_utc())
        .unwrap();
    let ca = Ca::load(tmp.path(), Some(&pass())).unwrap();
    let code = "3f0f6a1bd39bf6c0a8e8c0b5a3a1e1d3c0b0a0f0e0d0c0b0a09080706050403";
    let pem = ca
        .verification_certificate(code, OffsetDateTime::now_utc())
        .unwrap();
    let der = certificates_from_pem_or_der(pem.as_bytes())
        .unwrap()
        .remove(0);
    let (_, cert) = X509Certificate::from_der(&der).unwrap();
    assert_eq!(
        cert.subject()
            .iter_common_name()
            .next()
            .unwrap()
            .as_str()
            .unwrap(),
        code
    );
    let ca_der = der_of(&files.ca_cert);
    let (_, ca_cert) = X509Certificate::from_der(&ca_der).unwrap();
    cert.verify_signature(Some(ca_cert.public_key())).unwrap();
    assert!(ca
        .verification_certificate("code with spaces", OffsetDateTime::now_utc())
        .is_err());
}

#[test]
fn a_batch_hands_over_what_it_wrote_when_asked_and_keeps_nothing_otherwise() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ca");
    init(&dir, false).run(OffsetDateTime::now_utc()).unwrap();
    let ca = Ca::load(&dir, Some(&pass())).unwrap();
    let out = tmp.path().join("devices");
    let ids: Vec<_> = (0..3)
        .map(|n| DeviceId::parse(&uuid(n), IdFormat::BalenaUuid).unwrap())
        .collect();
    let opts = BatchOptions {
        out_dir: out.clone(),
        key: KeyAlgorithm::P256,
        days: 30,
        jobs: 2,
        force: false,
        now: OffsetDateTime::now_utc(),
        rotation: None,
    };
    let control = factory_ca::RunControl {
        hand_over: true,
        ..factory_ca::RunControl::default()
    };
    let report = factory_ca::issue_batch_with(&ca, &ids[..2], &opts, &control, &|| {}).unwrap();
    assert_eq!(report.handed_over.len(), 2);
    for (entry, device) in report.issued.iter().zip(&report.handed_over) {
        assert_eq!(entry.id, device.entry.id);
        let folder = out.join(&entry.id);
        let read = |name: &str| std::fs::read_to_string(folder.join(name)).unwrap();
        assert_eq!(read(factory_ca::CHAIN_FILE), device.chain_pem);
        assert_eq!(read(factory_ca::DEVICE_CERT_FILE), device.cert_pem);
        let key = device.key_pem.as_deref().map(String::as_str);
        assert_eq!(Some(read(factory_ca::DEVICE_KEY_FILE).as_str()), key);
        // The key is redacted when the report is printed for debugging.
        assert!(!format!("{device:?}").contains("PRIVATE KEY"));
    }
    let report = issue_batch(&ca, &ids[2..], &opts, &|| {}).unwrap();
    assert_eq!(report.issued.len(), 1);
    assert!(report.handed_over.is_empty());
}
