//! The streaming bundle: every line a complete device (its chain verifying up to the root,
//! its key the certificate's), the manifest written only once the bundle is, and a failed
//! write leaving the manifest as it was.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test setup: a panic is the report

use std::io::Write;
use std::path::Path;
use std::process::Command;

use ::time::OffsetDateTime;
use factory_ca::{
    certificate_id, certificates_from_pem_or_der, issue_bundle, BundleOptions, Ca, CaInit,
    DeviceId, Error, IdFormat, IssuingCa, KeyAlgorithm, KeyProtection, ManifestEntry,
};
use x509_parser::prelude::*;

fn ca(dir: &Path) -> Ca {
    CaInit {
        dir: dir.to_owned(),
        root_subject: "O=Test Fleet,CN=Test fleet root".parse().unwrap(),
        root_key: KeyAlgorithm::P384,
        root_days: 3650,
        issuing: Some(IssuingCa {
            subject: "O=Test Fleet,CN=Test issuing CA".parse().unwrap(),
            key: KeyAlgorithm::P256,
            days: 1000,
        }),
        protection: KeyProtection::InsecurePlaintext,
        root_protection: Some(KeyProtection::InsecurePlaintext),
        remote_key: None,
    }
    .run(OffsetDateTime::now_utc())
    .unwrap();
    Ca::load(dir, None).unwrap()
}

fn ids(n: usize) -> Vec<DeviceId> {
    (0..n)
        .map(|i| DeviceId::parse(&format!("{:032x}", 0xb0b0 + i), IdFormat::BalenaUuid).unwrap())
        .collect()
}

fn options(manifest_dir: &Path) -> BundleOptions {
    BundleOptions {
        manifest_dir: manifest_dir.to_owned(),
        key: KeyAlgorithm::P256,
        days: 365,
        jobs: 2,
        force: false,
        now: OffsetDateTime::now_utc(),
    }
}

#[test]
fn every_line_is_a_whole_device_and_the_manifest_names_each_once() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = ca(&tmp.path().join("ca"));
    let devices = tmp.path().join("devices");
    let ids = ids(700); // more than one worker block, so chunks interleave
    let mut out = Vec::new();
    let report = issue_bundle(&ca, &ids, &options(&devices), &mut out, &|| {}).unwrap();
    assert_eq!(report.issued, ids.len());
    assert!(report.failures.is_empty());
    let text = String::from_utf8(out).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), ids.len());
    let manifest: Vec<ManifestEntry> = std::fs::read_to_string(devices.join("manifest.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(manifest.len(), ids.len());
    assert!(!devices.join("manifest.jsonl.pending").exists());

    let (_, issuing) = X509Certificate::from_der(ca.cert_der()).unwrap();
    let mut seen = std::collections::HashSet::new();
    for line in &lines {
        let object = line.as_object().unwrap();
        let mut keys: Vec<_> = object.keys().map(String::as_str).collect();
        keys.sort_unstable();
        assert_eq!(
            keys,
            [
                "certificate_id",
                "chain_pem",
                "id",
                "key_pem",
                "not_after",
                "serial"
            ]
        );
        let id = line["id"].as_str().unwrap();
        assert!(seen.insert(id.to_owned()), "{id} twice");
        let chain =
            certificates_from_pem_or_der(line["chain_pem"].as_str().unwrap().as_bytes()).unwrap();
        assert_eq!(chain.len(), 2);
        assert_eq!(
            chain[1],
            ca.cert_der(),
            "the chain ends with the issuing CA"
        );
        let (_, cert) = X509Certificate::from_der(&chain[0]).unwrap();
        cert.verify_signature(Some(issuing.public_key())).unwrap();
        assert_eq!(cert.subject().to_string(), format!("CN={id}"));
        assert_eq!(line["certificate_id"], certificate_id(&chain[0]).as_str());
        assert_eq!(
            line["serial"],
            cert.raw_serial_as_string().replace(':', "").as_str()
        );
        // The key is the certificate's.
        let key_pem = line["key_pem"].as_str().unwrap();
        let (label, key_der) = pkcs8::der::pem::decode_vec(key_pem.as_bytes()).unwrap();
        assert_eq!(label, "PRIVATE KEY");
        let pair = aws_lc_rs::signature::EcdsaKeyPair::from_pkcs8(
            &aws_lc_rs::signature::ECDSA_P256_SHA256_ASN1_SIGNING,
            &key_der,
        )
        .unwrap();
        use aws_lc_rs::signature::KeyPair;
        assert_eq!(
            pair.public_key().as_ref(),
            cert.public_key().subject_public_key.data.as_ref()
        );
        let entry = manifest.iter().find(|e| e.id == id).unwrap();
        assert_eq!(
            entry.certificate_id,
            line["certificate_id"].as_str().unwrap()
        );
        assert_eq!(entry.serial, line["serial"].as_str().unwrap());
        assert_eq!(entry.not_after, line["not_after"].as_str().unwrap());
    }

    // The same ids again: refused before anything is written, unless forced.
    let mut again = Vec::new();
    let err = issue_bundle(&ca, &ids[..3], &options(&devices), &mut again, &|| {}).unwrap_err();
    assert!(matches!(err, Error::AlreadyIssued { .. }), "{err}");
    assert!(again.is_empty());
    let forced = BundleOptions {
        force: true,
        ..options(&devices)
    };
    issue_bundle(&ca, &ids[..3], &forced, &mut again, &|| {}).unwrap();
    assert_eq!(again.iter().filter(|b| **b == b'\n').count(), 3);
}

#[test]
fn openssl_reads_a_bundled_chain_and_key() {
    let tmp = tempfile::tempdir().unwrap();
    let ca_dir = tmp.path().join("ca");
    let ca = ca(&ca_dir);
    let mut out = Vec::new();
    issue_bundle(
        &ca,
        &ids(1),
        &options(&tmp.path().join("devices")),
        &mut out,
        &|| {},
    )
    .unwrap();
    let line: serde_json::Value = serde_json::from_slice(&out).unwrap();
    std::fs::write(
        tmp.path().join("chain.pem"),
        line["chain_pem"].as_str().unwrap(),
    )
    .unwrap();
    std::fs::write(
        tmp.path().join("key.pem"),
        line["key_pem"].as_str().unwrap(),
    )
    .unwrap();
    let verify = Command::new("openssl")
        .args(["verify", "-CAfile"])
        .arg(ca_dir.join("root.crt"))
        .arg("-untrusted")
        .arg(ca_dir.join("ca.crt"))
        .arg(tmp.path().join("chain.pem"))
        .output()
        .unwrap();
    assert!(
        verify.status.success(),
        "{}",
        String::from_utf8_lossy(&verify.stderr)
    );
    let key = Command::new("openssl")
        .args(["pkey", "-noout", "-in"])
        .arg(tmp.path().join("key.pem"))
        .output()
        .unwrap();
    assert!(
        key.status.success(),
        "{}",
        String::from_utf8_lossy(&key.stderr)
    );
}

/// A writer that takes `budget` bytes, then fails like a full disk.
struct Full {
    budget: usize,
}

impl Write for Full {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if buf.len() > self.budget {
            return Err(std::io::Error::other("No space left on device"));
        }
        self.budget -= buf.len();
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn a_failed_write_records_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = ca(&tmp.path().join("ca"));
    let devices = tmp.path().join("devices");
    // One earlier device, so the manifest exists and must stay as it is.
    issue_bundle(&ca, &ids(1), &options(&devices), &mut Vec::new(), &|| {}).unwrap();
    let before = std::fs::read_to_string(devices.join("manifest.jsonl")).unwrap();
    let err = issue_bundle(
        &ca,
        &ids(2000)[1..],
        &options(&devices),
        &mut Full { budget: 300_000 },
        &|| {},
    )
    .unwrap_err();
    assert!(err.to_string().contains("cannot write"), "{err}");
    assert_eq!(
        std::fs::read_to_string(devices.join("manifest.jsonl")).unwrap(),
        before
    );
    assert!(!devices.join("manifest.jsonl.pending").exists());
}
