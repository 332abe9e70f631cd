//! A CA key that never touches disk: `jitr ca init --key-uri` with AWS KMS (moto's) and a
//! PKCS#11 token (SoftHSM2), then every command that signs (`ca verification-cert`,
//! `ca register`, `issue`, `sign-csr`) through it unchanged. Every certificate is checked with
//! `openssl verify`; keys that cannot serve fail in one line, exit 1, leaving no files.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test setup: a panic is the report

use std::path::Path;
use std::process::{Command, Output};

use testkit::moto::MotoServer;
use testkit::proxy::{Canned, FaultPlan, Proxy};

mod common;

use common::{stderr, stdout, uuid, ROOT_PASS};

const SOFTHSM: &str = "/usr/lib/softhsm/libsofthsm2.so";
const PIN: &str = "jitr-user-pin";

fn jitr(dir: &Path, args: &[&str], env: &[(&str, String)]) -> Output {
    common::jitr(dir, args, env)
}

/// `openssl verify` of `cert` against `ca_file`, with `untrusted` intermediates.
fn openssl_verifies(dir: &Path, ca_file: &str, untrusted: Option<&str>, cert: &str) {
    let mut command = Command::new("openssl");
    command.arg("verify").arg("-CAfile").arg(ca_file);
    if let Some(untrusted) = untrusted {
        command.arg("-untrusted").arg(untrusted);
    }
    let out = command.arg(cert).current_dir(dir).output().unwrap();
    assert!(
        out.status.success(),
        "openssl verify {cert}: {}{}",
        stdout(&out),
        stderr(&out)
    );
}

/// The CA folder's files, sorted.
fn ca_files(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir.join("ca"))
        .map(|d| {
            d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

fn issue_and_sign_csr(dir: &Path, env: &[(&str, String)], extra: &[&str]) {
    let (one, two) = (uuid_1(), uuid_2());
    let mut args = vec!["issue", "--id", &one, "--id", &two];
    args.extend(extra);
    let out = jitr(dir, &args, env);
    assert!(out.status.success(), "{}", stderr(&out));

    use testkit::certs::rcgen::{CertificateParams, DnType, KeyPair};
    let id = uuid(0xc5);
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, &id);
    let csr = params
        .serialize_request(&KeyPair::generate().unwrap())
        .unwrap();
    std::fs::write(dir.join("device.csr"), csr.pem().unwrap()).unwrap();
    let mut args = vec!["sign-csr", "--csr", "device.csr", "--expect-id", &id];
    args.extend(extra);
    let out = jitr(dir, &args, env);
    assert!(out.status.success(), "{}", stderr(&out));
}

fn uuid_1() -> String {
    uuid(0xc1)
}

fn uuid_2() -> String {
    uuid(0xc2)
}

/// Every device certificate of the folder verifies up to `ca_file` (through `untrusted`).
fn devices_verify(dir: &Path, ca_file: &str, untrusted: Option<&str>) {
    for id in [uuid_1(), uuid_2(), uuid(0xc5)] {
        openssl_verifies(dir, ca_file, untrusted, &format!("devices/{id}/device.crt"));
    }
}

#[test]
fn a_ca_key_in_kms_signs_the_verification_certificate_and_every_device() {
    let moto = MotoServer::start().unwrap();
    // The proxy records what `ca register` sends: the verification certificate.
    let proxy = Proxy::for_url(&moto.endpoint(), FaultPlan::default()).unwrap();
    let mut env = moto.aws_env();
    env.retain(|(name, _)| *name != "AWS_ENDPOINT_URL");
    env.push(("AWS_ENDPOINT_URL", proxy.url()));
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let out = jitr(
        dir,
        &[
            "ca",
            "init",
            "--subject",
            "O=Acme,CN=Acme KMS CA",
            "--key-uri",
            "awskms:key-id=alias/acme-fleet-ca",
        ],
        &env,
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("CA key          awskms:key-id=arn:aws:kms:us-east-1:"));
    assert_eq!(ca_files(dir), ["ca.crt", "ca.key-uri"], "no key file");
    let uri = std::fs::read_to_string(dir.join("ca/ca.key-uri")).unwrap();
    assert!(uri.starts_with("awskms:key-id=arn:aws:kms:"), "{uri}");
    openssl_verifies(dir, "ca/ca.crt", None, "ca/ca.crt");

    let out = jitr(dir, &["ca", "register"], &env);
    assert!(out.status.success(), "{}", stderr(&out));
    let register = proxy
        .requests()
        .into_iter()
        .find(|r| r.method == "POST" && r.target.starts_with("/cacertificate"))
        .expect("RegisterCACertificate was sent");
    let body: serde_json::Value = serde_json::from_str(&register.body).unwrap();
    let verification = body["verificationCertificate"].as_str().unwrap();
    std::fs::write(dir.join("verification.crt"), verification).unwrap();
    openssl_verifies(dir, "ca/ca.crt", None, "verification.crt");

    issue_and_sign_csr(dir, &env, &[]);
    devices_verify(dir, "ca/ca.crt", None);

    // KMS stumbles (throttled twice): retried, the devices are issued all the same.
    let refusals = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = std::sync::Arc::clone(&refusals);
    proxy.answer("Sign", move |_| {
        (count.fetch_add(1, std::sync::atomic::Ordering::SeqCst) < 2).then(|| {
            Canned::error(
                400,
                "ThrottlingException",
                serde_json::json!({"__type": "ThrottlingException", "message": "Rate exceeded"}),
            )
        })
    });
    let out = jitr(dir, &["issue", "--id", &uuid(0xd1)], &env);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(refusals.load(std::sync::atomic::Ordering::SeqCst) >= 3);
    openssl_verifies(
        dir,
        "ca/ca.crt",
        None,
        &format!("devices/{}/device.crt", uuid(0xd1)),
    );

    // KMS refuses for good: one line naming the key, exit 1, nothing written for the device.
    proxy.answer("Sign", |_| {
        Some(Canned::error(
            400,
            "AccessDeniedException",
            serde_json::json!({"__type": "AccessDeniedException", "message": "not allowed to kms:Sign"}),
        ))
    });
    let out = jitr(dir, &["issue", "--id", &uuid(0xd2)], &env);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("AccessDeniedException: not allowed to kms:Sign"),
        "{err}"
    );
    assert!(err.contains("arn:aws:kms:us-east-1:"), "{err}");
    assert!(!dir.join(format!("devices/{}", uuid(0xd2))).exists());
}

#[test]
fn an_offline_root_in_a_file_above_an_issuing_ca_in_kms() {
    let moto = MotoServer::start().unwrap();
    let env = moto.aws_env();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    std::fs::write(dir.join("root-pass"), format!("{ROOT_PASS}\n")).unwrap();
    let out = jitr(
        dir,
        &[
            "ca",
            "init",
            "--with-issuing-ca",
            "--root-passphrase-file",
            "root-pass",
            "--key-uri",
            "awskms:key-id=alias/acme-issuing",
        ],
        &env,
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        ca_files(dir),
        ["ca.crt", "ca.key-uri", "root.crt", "root.key"]
    );
    issue_and_sign_csr(dir, &env, &[]);
    devices_verify(dir, "ca/root.crt", Some("ca/ca.crt"));

    // A second folder reuses the same KMS key (--existing); the key's type decides the CA's.
    let other = tempfile::tempdir().unwrap();
    let out = jitr(
        other.path(),
        &[
            "ca",
            "init",
            "--key",
            "p384",
            "--key-uri",
            "awskms:key-id=alias/acme-issuing",
            "--existing",
        ],
        &env,
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        std::fs::read_to_string(other.path().join("ca/ca.key-uri")).unwrap(),
        std::fs::read_to_string(dir.join("ca/ca.key-uri")).unwrap()
    );
    let text = Command::new("openssl")
        .args(["x509", "-noout", "-text", "-in", "ca/ca.crt"])
        .current_dir(other.path())
        .output()
        .unwrap();
    assert!(stdout(&text).contains("prime256v1"), "{}", stdout(&text));
}

#[test]
fn kms_keys_that_cannot_serve_fail_in_one_line_and_leave_nothing() {
    let moto = MotoServer::start().unwrap();
    let env = moto.aws_env();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    // An RSA key, for signing: a real KMS key, but no jitr CA key.
    let rsa = {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let config = rt.block_on(testkit::iot::sdk_config(&moto));
        let client = aws_sdk_kms::Client::new(&config);
        rt.block_on(
            client
                .create_key()
                .key_spec(aws_sdk_kms::types::KeySpec::Rsa2048)
                .key_usage(aws_sdk_kms::types::KeyUsageType::SignVerify)
                .send(),
        )
        .unwrap()
        .key_metadata()
        .unwrap()
        .key_id()
        .to_owned()
    };
    for (uri, existing, code, needle) in [
        (
            format!("awskms:key-id={rsa}"),
            true,
            1,
            "is RSA_2048: a jitr CA key is ECC_NIST_P256 or ECC_NIST_P384",
        ),
        (
            "awskms:key-id=alias/missing".to_owned(),
            true,
            1,
            "AWS KMS key alias/missing not found",
        ),
        (
            format!("awskms:key-id={rsa}"),
            false,
            2,
            "names an existing key: use --existing",
        ),
        ("awskms:key=oops".to_owned(), false, 2, "invalid key URI"),
        (
            "ca/other.key".to_owned(),
            false,
            2,
            "a key file is the default",
        ),
    ] {
        let mut args = vec!["ca", "init", "--key-uri", &uri];
        if existing {
            args.push("--existing");
        }
        let out = jitr(dir, &args, &env);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(code), "{uri}: {err}");
        assert!(err.contains(needle), "{uri}: {err}");
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(!dir.join("ca").exists(), "{uri}: nothing written");
    }
}

/// A SoftHSM2 token labelled `label` in `dir/tokens`; the environment that reaches it.
fn softhsm(dir: &Path, label: &str) -> Vec<(&'static str, String)> {
    assert!(
        Path::new(SOFTHSM).exists(),
        "{SOFTHSM} is missing: run scripts/setup (it installs Debian's softhsm2)"
    );
    let tokens = dir.join("tokens");
    std::fs::create_dir_all(&tokens).unwrap();
    let conf = dir.join("softhsm2.conf");
    std::fs::write(
        &conf,
        format!(
            "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
            tokens.display()
        ),
    )
    .unwrap();
    let out = Command::new("softhsm2-util")
        .args(["--init-token", "--free", "--label", label, "--pin", PIN])
        .args(["--so-pin", "jitr-so-pin"])
        .env("SOFTHSM2_CONF", &conf)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    std::fs::write(dir.join("pin"), format!("{PIN}\n")).unwrap();
    vec![
        ("SOFTHSM2_CONF", conf.display().to_string()),
        ("JITR_PKCS11_MODULE", SOFTHSM.to_owned()),
    ]
}

#[test]
fn a_ca_key_on_a_pkcs11_token_signs_every_device() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let env = softhsm(dir, "factory");
    let uri = "pkcs11:token=factory;object=acme-ca";
    let out = jitr(
        dir,
        &["ca", "init", "--key-uri", uri, "--pin-file", "pin"],
        &env,
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(ca_files(dir), ["ca.crt", "ca.key-uri"]);
    assert_eq!(
        std::fs::read_to_string(dir.join("ca/ca.key-uri")).unwrap(),
        format!("{uri}\n")
    );
    issue_and_sign_csr(dir, &env, &["--pin-file", "pin"]);
    devices_verify(dir, "ca/ca.crt", None);
    let out = jitr(
        dir,
        &[
            "ca",
            "verification-cert",
            "--registration-code",
            "0123456789abcdef",
            "--out",
            "verification.crt",
            "--pin-file",
            "pin",
        ],
        &env,
    );
    assert!(out.status.success(), "{}", stderr(&out));
    openssl_verifies(dir, "ca/ca.crt", None, "verification.crt");

    // The PIN from the environment works as well as from a file.
    let mut with_pin = env.clone();
    with_pin.push(("JITR_PKCS11_PIN", PIN.to_owned()));
    let out = jitr(dir, &["issue", "--id", &uuid(0xe1)], &with_pin);
    assert!(out.status.success(), "{}", stderr(&out));
}

#[test]
fn token_failures_fail_in_one_line_and_leave_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let env = softhsm(dir, "factory");
    std::fs::write(dir.join("wrong-pin"), "not-the-pin\n").unwrap();
    let without_module: Vec<_> = env
        .iter()
        .filter(|(name, _)| *name != "JITR_PKCS11_MODULE")
        .cloned()
        .collect();
    let uri = "pkcs11:token=factory;object=acme-ca";
    for (args, env, code, needle) in [
        (
            vec!["--pin-file", "wrong-pin"],
            env.clone(),
            1,
            "refused the PIN (CKR_PIN_INCORRECT)",
        ),
        (
            vec!["--pin-file", "pin", "--existing"],
            env.clone(),
            1,
            "no private key labelled \"acme-ca\" on token \"factory\"",
        ),
        (vec![], env.clone(), 2, "needs its user PIN: --pin-file"),
        (
            vec!["--pin-file", "pin"],
            without_module,
            2,
            "needs the token's module: --pkcs11-module",
        ),
    ] {
        let mut all = vec!["ca", "init", "--key-uri", uri];
        all.extend(args.iter().copied());
        let out = jitr(dir, &all, &env);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(code), "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(!dir.join("ca").exists(), "{args:?}: nothing written");
    }

    // A CA made, then used with a wrong PIN: exit 1, no device written.
    let out = jitr(
        dir,
        &["ca", "init", "--key-uri", uri, "--pin-file", "pin"],
        &env,
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let out = jitr(
        dir,
        &["issue", "--id", &uuid(1), "--pin-file", "wrong-pin"],
        &env,
    );
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("CKR_PIN_INCORRECT"),
        "{}",
        stderr(&out)
    );
    assert!(!dir.join("devices").join(uuid(1)).exists());
}
