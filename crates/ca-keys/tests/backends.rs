//! The signing backends against real parts: AWS KMS as moto serves it, PKCS#11 through
//! SoftHSM2 (Debian's `softhsm2`, installed by scripts/setup). Every signature is checked
//! with the public key the backend reports, and keys that cannot serve as CA keys are refused
//! with one line naming them.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test setup: a panic is the report

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use aws_lc_rs::signature::{UnparsedPublicKey, ECDSA_P256_SHA256_ASN1, ECDSA_P384_SHA384_ASN1};
use ca_keys::{Error, KeyUri, Options};
use factory_ca::{KeyAlgorithm, RemoteKey};
use testkit::moto::MotoServer;
use testkit::proxy::{Canned, FaultPlan, Proxy};
use zeroize::Zeroizing;

/// The SoftHSM2 module Debian installs.
const SOFTHSM: &str = "/usr/lib/softhsm/libsofthsm2.so";
const PIN: &str = "jitr-user-pin";

fn verifies(key: &dyn RemoteKey, message: &[u8], signature: &[u8]) -> bool {
    let alg = match key.algorithm() {
        KeyAlgorithm::P256 => &ECDSA_P256_SHA256_ASN1,
        KeyAlgorithm::P384 => &ECDSA_P384_SHA384_ASN1,
    };
    UnparsedPublicKey::new(alg, key.public_key_raw())
        .verify(message, signature)
        .is_ok()
}

/// Runs `f` with the process environment pointing the AWS SDK at `endpoint` (the KMS backend
/// reads the standard chain, as jitr does). Tests in this file that touch the environment run
/// one at a time.
fn with_aws<T>(endpoint: &str, f: impl FnOnce() -> T) -> T {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _guard = LOCK
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    // SAFETY-free: set_var is safe in edition 2021; the lock keeps these tests apart.
    for (name, value) in [
        ("AWS_ENDPOINT_URL", endpoint),
        ("AWS_REGION", "us-east-1"),
        ("AWS_ACCESS_KEY_ID", "testing"),
        ("AWS_SECRET_ACCESS_KEY", "testing"),
        ("AWS_EC2_METADATA_DISABLED", "true"),
        ("AWS_CONFIG_FILE", "/nonexistent"),
        ("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent"),
    ] {
        std::env::set_var(name, value);
    }
    f()
}

fn kms(key_id: &str) -> KeyUri {
    KeyUri::AwsKms {
        key_id: key_id.to_owned(),
        region: None,
    }
}

#[test]
fn a_kms_key_is_created_opened_and_signs_raw_and_digest_messages() {
    let moto = MotoServer::start().unwrap();
    with_aws(&moto.endpoint(), || {
        let options = Options::default();
        let key = ca_keys::create(&kms("alias/jitr-ca"), KeyAlgorithm::P384, &options).unwrap();
        assert_eq!(key.algorithm(), KeyAlgorithm::P384);
        assert!(
            key.uri()
                .starts_with("awskms:key-id=arn:aws:kms:us-east-1:"),
            "{}",
            key.uri()
        );
        // Short messages go as RAW (KMS hashes), long ones as DIGEST (hashed here).
        for len in [100, 4096, 5000] {
            let message = vec![0x5a; len];
            let signature = key.sign(&message).unwrap();
            assert!(verifies(key.as_ref(), &message, &signature), "{len} bytes");
        }
        // The recorded URI opens the same key; so does the alias.
        let uri: KeyUri = key.uri().parse().unwrap();
        let again = ca_keys::open(&uri, &options).unwrap();
        assert_eq!(again.public_key_raw(), key.public_key_raw());
        let by_alias = ca_keys::open(&kms("alias/jitr-ca"), &options).unwrap();
        assert_eq!(by_alias.uri(), key.uri());
        // Creating under a taken alias is refused; a bare key id cannot be created.
        let err = ca_keys::create(&kms("alias/jitr-ca"), KeyAlgorithm::P256, &options).unwrap_err();
        assert!(matches!(err, Error::Exists(_)), "{err}");
        assert!(err.to_string().contains("--existing"), "{err}");
        let err = ca_keys::create(&uri, KeyAlgorithm::P256, &options).unwrap_err();
        assert!(err.is_usage(), "{err}");
    });
}

#[test]
fn kms_keys_that_cannot_be_ca_keys_are_refused_in_one_line() {
    let moto = MotoServer::start().unwrap();
    let client = {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let config = rt.block_on(testkit::iot::sdk_config(&moto));
        (rt, aws_sdk_kms::Client::new(&config))
    };
    let make = |spec: aws_sdk_kms::types::KeySpec, usage: aws_sdk_kms::types::KeyUsageType| {
        client
            .0
            .block_on(client.1.create_key().key_spec(spec).key_usage(usage).send())
            .unwrap()
            .key_metadata()
            .unwrap()
            .key_id()
            .to_owned()
    };
    use aws_sdk_kms::types::{KeySpec, KeyUsageType};
    let rsa = make(KeySpec::Rsa2048, KeyUsageType::SignVerify);
    let symmetric = make(KeySpec::SymmetricDefault, KeyUsageType::EncryptDecrypt);
    let secp256k1 = make(KeySpec::EccSecgP256K1, KeyUsageType::SignVerify);
    with_aws(&moto.endpoint(), || {
        let options = Options::default();
        for (id, needle) in [
            (
                rsa.as_str(),
                "is RSA_2048: a jitr CA key is ECC_NIST_P256 or ECC_NIST_P384",
            ),
            (
                symmetric.as_str(),
                "is for ENCRYPT_DECRYPT, not SIGN_VERIFY",
            ),
            (secp256k1.as_str(), "is ECC_SECG_P256K1"),
            ("alias/nobody", "AWS KMS key alias/nobody not found"),
        ] {
            let err = ca_keys::open(&kms(id), &options).unwrap_err();
            let text = err.to_string();
            assert!(text.contains(needle), "{id}: {text}");
            assert_eq!(text.lines().count(), 1, "{text}");
            assert!(!err.is_usage());
        }
    });
}

#[test]
fn a_throttled_kms_is_retried_then_named_when_it_stays_throttled() {
    let moto = MotoServer::start().unwrap();
    let proxy = Proxy::for_url(&moto.endpoint(), FaultPlan::default()).unwrap();
    with_aws(&proxy.url(), || {
        let options = Options {
            sign_timeout: Duration::from_secs(2),
            ..Options::default()
        };
        let key = ca_keys::create(&kms("alias/throttled"), KeyAlgorithm::P256, &options).unwrap();
        let throttled = Canned::error(
            400,
            "ThrottlingException",
            serde_json::json!({"__type": "ThrottlingException", "message": "Rate exceeded"}),
        );
        // Two refusals, then through: the signature arrives.
        let refusals = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (count, answer) = (Arc::clone(&refusals), throttled.clone());
        proxy.answer("Sign", move |_| {
            (count.fetch_add(1, std::sync::atomic::Ordering::SeqCst) < 2).then(|| answer.clone())
        });
        let signature = key.sign(b"tbs").unwrap();
        assert!(verifies(key.as_ref(), b"tbs", &signature));
        assert_eq!(refusals.load(std::sync::atomic::Ordering::SeqCst), 3);
        // Throttled for good: retried with growing waits, then a one-line error naming the key
        // once the next wait would pass the timeout.
        proxy.answer("Sign", move |_| Some(throttled.clone()));
        let started = Instant::now();
        let err = key.sign(b"tbs").unwrap_err();
        let elapsed = started.elapsed();
        assert!(elapsed >= Duration::from_millis(500), "{elapsed:?}");
        assert!(elapsed <= Duration::from_secs(2), "{elapsed:?}");
        assert!(err.contains("ThrottlingException: Rate exceeded"), "{err}");
        let arn = key.uri()["awskms:key-id=".len()..]
            .split(';')
            .next()
            .unwrap()
            .to_owned();
        assert!(err.contains(&arn), "{err}");
        assert!(err.contains("gave up after"), "{err}");
        assert_eq!(err.lines().count(), 1);
    });
}

#[test]
fn the_kms_rate_caps_sign_requests_per_second() {
    let moto = MotoServer::start().unwrap();
    with_aws(&moto.endpoint(), || {
        let options = Options {
            kms_rate: 20.0,
            ..Options::default()
        };
        let key: Arc<dyn RemoteKey> =
            ca_keys::create(&kms("alias/rated"), KeyAlgorithm::P256, &options).unwrap();
        // 60 signatures from 6 threads: the first second's 20 at once, then 20 per second.
        let started = Instant::now();
        std::thread::scope(|s| {
            for _ in 0..6 {
                let key = Arc::clone(&key);
                s.spawn(move || {
                    for _ in 0..10 {
                        key.sign(b"m").unwrap();
                    }
                });
            }
        });
        let elapsed = started.elapsed();
        assert!(elapsed >= Duration::from_millis(1900), "{elapsed:?}");
    });
}

/// The SoftHSM2 configuration of this test process, with every test's token in it. SoftHSM
/// reads its configuration and finds its tokens once, when the module is first initialized,
/// and the module then stays initialized for the process (as in jitr): so the tokens are all
/// made here, before any test opens one.
fn softhsm_conf() -> &'static Path {
    static CONF: std::sync::OnceLock<(tempfile::TempDir, PathBuf)> = std::sync::OnceLock::new();
    let (_, conf) = CONF.get_or_init(|| {
        assert!(
            Path::new(SOFTHSM).exists(),
            "{SOFTHSM} is missing: run scripts/setup (it installs Debian's softhsm2)"
        );
        let dir = tempfile::tempdir().unwrap();
        let tokens = dir.path().join("tokens");
        std::fs::create_dir(&tokens).unwrap();
        let conf = dir.path().join("softhsm2.conf");
        std::fs::write(
            &conf,
            format!(
                "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
                tokens.display()
            ),
        )
        .unwrap();
        std::env::set_var("SOFTHSM2_CONF", &conf);
        for label in TOKENS {
            let out = Command::new("softhsm2-util")
                .args(["--init-token", "--free", "--label", label, "--pin", PIN])
                .args(["--so-pin", "jitr-so-pin"])
                .env("SOFTHSM2_CONF", &conf)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        import_rsa(&conf, "failures", "rsa");
        (dir, conf)
    });
    conf
}

/// The tokens the tests use, one each.
const TOKENS: [&str; 2] = ["factory", "failures"];

/// The options that reach the token labelled `label` (one of [`TOKENS`]).
fn token(label: &str) -> Options {
    assert!(TOKENS.contains(&label));
    softhsm_conf();
    Options {
        pkcs11_module: Some(SOFTHSM.into()),
        pin: Some(Zeroizing::new(PIN.to_owned())),
        ..Options::default()
    }
}

/// Imports an RSA key pair labelled `label` (made by openssl) on `token`: the wrong kind of CA
/// key.
fn import_rsa(conf: &Path, token: &str, label: &str) {
    let dir = tempfile::tempdir().unwrap();
    let pem = dir.path().join("rsa.pem");
    let out = Command::new("openssl")
        .args([
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
            "-out",
        ])
        .arg(&pem)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = Command::new("softhsm2-util")
        .arg("--import")
        .arg(&pem)
        .args([
            "--token", token, "--label", label, "--id", "0a0a", "--pin", PIN,
        ])
        .env("SOFTHSM2_CONF", conf)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn pkcs11(token: &str, object: &str) -> KeyUri {
    KeyUri::Pkcs11 {
        token: token.to_owned(),
        object: object.to_owned(),
    }
}

#[test]
fn a_token_key_is_generated_unextractable_and_signs_from_many_threads() {
    let options = token("factory");
    for (object, algorithm) in [
        ("ca-256", KeyAlgorithm::P256),
        ("ca-384", KeyAlgorithm::P384),
    ] {
        let key = ca_keys::create(&pkcs11("factory", object), algorithm, &options).unwrap();
        assert_eq!(key.algorithm(), algorithm);
        assert_eq!(key.uri(), format!("pkcs11:token=factory;object={object}"));
        std::thread::scope(|s| {
            for n in 0..4u8 {
                let key = Arc::clone(&key);
                s.spawn(move || {
                    for i in 0..10u8 {
                        let message = [n, i, 0x42];
                        let signature = key.sign(&message).unwrap();
                        assert!(verifies(key.as_ref(), &message, &signature));
                    }
                });
            }
        });
    }
    // Opened again by its URI, while the first is still open; the private key can never
    // leave the token; a label in use cannot be created twice.
    let uri: KeyUri = "pkcs11:token=factory;object=ca-256".parse().unwrap();
    let key = ca_keys::pkcs11::Pkcs11Key::open("factory", "ca-256", &options).unwrap();
    assert_eq!(key.algorithm(), KeyAlgorithm::P256);
    assert!(key.never_extractable());
    let again = ca_keys::open(&uri, &options).unwrap();
    assert_eq!(again.public_key_raw(), key.public_key_raw());
    let err = ca_keys::create(&uri, KeyAlgorithm::P256, &options).unwrap_err();
    assert!(matches!(err, Error::Exists(_)), "{err}");
}

#[test]
fn token_failures_are_one_line_errors() {
    let options = token("failures");
    // Made and let go: no session of this process stays logged in to the token.
    drop(ca_keys::create(&pkcs11("failures", "ca"), KeyAlgorithm::P256, &options).unwrap());
    let cases: Vec<(KeyUri, Options, &str)> = vec![
        (
            pkcs11("failures", "ca"),
            Options {
                pin: Some(Zeroizing::new("wrong-pin".to_owned())),
                ..options.clone()
            },
            "refused the PIN (CKR_PIN_INCORRECT)",
        ),
        (
            pkcs11("failures", "missing"),
            options.clone(),
            "no private key labelled \"missing\"",
        ),
        (
            pkcs11("failures", "rsa"),
            options.clone(),
            "is a CKK_RSA key: a jitr CA key is EC P-256 or P-384",
        ),
        (
            pkcs11("nowhere", "ca"),
            options.clone(),
            "no PKCS#11 token labelled \"nowhere\"",
        ),
        (
            pkcs11("failures", "ca"),
            Options {
                pin: None,
                ..options.clone()
            },
            "needs its user PIN",
        ),
        (
            pkcs11("failures", "ca"),
            Options {
                pkcs11_module: Some("/nonexistent/libnothing.so".into()),
                ..options
            },
            "cannot load the module",
        ),
    ];
    for (uri, options, needle) in cases {
        let err = ca_keys::open(&uri, &options).unwrap_err();
        let text = err.to_string();
        assert!(text.contains(needle), "{uri}: {text}");
        assert_eq!(text.lines().count(), 1, "{text}");
    }
}
