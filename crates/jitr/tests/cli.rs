//! The `jitr` binary as an operator uses it: exit codes, messages, files.

// Test helpers panic on a failed setup step: that is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test setup: a panic is the report

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};

mod common;

use common::{stderr, uuid, PASS};

fn jitr(dir: &Path, args: &[&str]) -> Output {
    common::jitr(dir, args, &[])
}

/// A folder with an encrypted CA and its passphrase file.
fn with_ca(issuing: bool) -> tempfile::TempDir {
    common::with_ca(if issuing { &["--with-issuing-ca"] } else { &[] })
}

#[test]
fn issue_from_an_ids_file_writes_private_keys_chains_and_manifest() {
    let tmp = with_ca(true);
    let ids: Vec<_> = (1..=20).map(uuid).collect();
    std::fs::write(
        tmp.path().join("ids.txt"),
        format!("# factory batch 1\n{}\n\n", ids.join("\n")),
    )
    .unwrap();
    let out = jitr(
        tmp.path(),
        &[
            "issue",
            "--ids",
            "ids.txt",
            "--passphrase-file",
            "pass",
            "--json",
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let printed: Vec<serde_json::Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(printed.len(), 20);
    let manifest = std::fs::read_to_string(tmp.path().join("devices/manifest.jsonl")).unwrap();
    assert_eq!(manifest.lines().count(), 20);
    for id in &ids {
        let dir = tmp.path().join("devices").join(id);
        assert_eq!(
            std::fs::metadata(dir.join("device.key"))
                .unwrap()
                .permissions()
                .mode()
                & 0o777,
            0o600
        );
        let check = jitr(
            tmp.path(),
            &[
                "inspect",
                &format!("devices/{id}/chain.pem"),
                "--ca",
                "ca/ca.crt",
            ],
        );
        assert!(
            check.status.success(),
            "{}",
            String::from_utf8_lossy(&check.stdout)
        );
    }
    // A root-signed check of a leaf issued by the issuing CA fails, with exit 1.
    let check = jitr(
        tmp.path(),
        &[
            "inspect",
            &format!("devices/{}/device.crt", ids[0]),
            "--ca",
            "ca/root.crt",
        ],
    );
    assert_eq!(check.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&check.stdout).contains("FAIL  issuer"));
}

#[test]
fn passphrase_from_the_environment_and_wrong_passphrase() {
    let tmp = with_ca(false);
    let ok = common::jitr(
        tmp.path(),
        &["issue", "--id", &uuid(1)],
        &[("JITR_CA_PASSPHRASE", PASS.to_owned())],
    );
    assert!(ok.status.success(), "{}", stderr(&ok));
    std::fs::write(tmp.path().join("wrong"), "nope").unwrap();
    let out = jitr(
        tmp.path(),
        &["issue", "--id", &uuid(2), "--passphrase-file", "wrong"],
    );
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        stderr(&out).trim(),
        "jitr: error: wrong passphrase for ca/ca.key"
    );
    let out = jitr(tmp.path(), &["issue", "--id", &uuid(2)]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out)
            .contains("ca/ca.key is encrypted: use --passphrase-file FILE or JITR_CA_PASSPHRASE"),
        "{}",
        stderr(&out)
    );
    assert!(!tmp.path().join("devices").join(uuid(2)).exists());
}

#[test]
fn bad_input_is_named_and_leaves_nothing_behind() {
    let tmp = with_ca(false);
    std::fs::write(
        tmp.path().join("ids.txt"),
        format!("{}\nNOT-A-UUID\n", uuid(1)),
    )
    .unwrap();
    let out = jitr(
        tmp.path(),
        &["issue", "--ids", "ids.txt", "--passphrase-file", "pass"],
    );
    // A bad value is a usage error (issue #25): exit 2.
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("ids.txt:2: invalid device id \"NOT-A-UUID\""),
        "{}",
        stderr(&out)
    );
    assert!(!tmp.path().join("devices").exists(), "no partial output");
    // A validity of no days is as much a bad value as one past the maximum: exit 2, named.
    std::fs::write(tmp.path().join("one.txt"), format!("{}\n", uuid(1))).unwrap();
    for days in ["0", "99999"] {
        let out = jitr(
            tmp.path(),
            &[
                "issue",
                "--ids",
                "one.txt",
                "--passphrase-file",
                "pass",
                "--days",
                days,
            ],
        );
        assert_eq!(
            out.status.code(),
            Some(2),
            "--days {days}: {}",
            stderr(&out)
        );
        assert!(stderr(&out).contains("--days"), "{}", stderr(&out));
    }
    assert!(!tmp.path().join("devices").exists(), "no partial output");

    let out = jitr(
        tmp.path(),
        &[
            "issue",
            "--id",
            &uuid(1),
            "--dir",
            "nowhere",
            "--passphrase-file",
            "pass",
        ],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("nowhere/ca.crt not found"),
        "{}",
        stderr(&out)
    );

    let out = jitr(tmp.path(), &["issue", "--passphrase-file", "pass"]);
    assert_eq!(out.status.code(), Some(2), "usage error");
    let out = jitr(tmp.path(), &["issue", "--id", &uuid(1), "--key", "p521"]);
    assert_eq!(out.status.code(), Some(2));

    assert!(jitr(
        tmp.path(),
        &["issue", "--id", &uuid(1), "--passphrase-file", "pass"]
    )
    .status
    .success());
    let out = jitr(
        tmp.path(),
        &["issue", "--id", &uuid(1), "--passphrase-file", "pass"],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("already issued"), "{}", stderr(&out));
    let out = jitr(
        tmp.path(),
        &[
            "issue",
            "--id",
            &uuid(1),
            "--passphrase-file",
            "pass",
            "--force",
        ],
    );
    assert!(out.status.success());

    // An output folder that cannot be written: a file stands where the folder should be.
    std::fs::write(tmp.path().join("blocked"), "").unwrap();
    let out = jitr(
        tmp.path(),
        &[
            "issue",
            "--id",
            &uuid(5),
            "--out",
            "blocked/devices",
            "--passphrase-file",
            "pass",
        ],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("cannot write blocked/devices"),
        "{}",
        stderr(&out)
    );

    let out = jitr(tmp.path(), &["ca", "init", "--passphrase-file", "pass"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("refusing to overwrite a CA key"));
    // No passphrase anywhere and no terminal to ask on: a usage error, like a missing root
    // passphrase.
    let out = jitr(tmp.path(), &["ca", "init", "--dir", "other"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("no CA passphrase"),
        "{}",
        stderr(&out)
    );
    assert!(!tmp.path().join("other/ca.key").exists());
}

#[test]
fn sign_csr_keeps_the_device_key_on_the_device() {
    let tmp = with_ca(false);
    let id = uuid(77);
    let status = Command::new("openssl")
        .args([
            "req",
            "-new",
            "-nodes",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-keyout",
            "d.key",
            "-out",
            "d.csr",
            "-subj",
            &format!("/CN={id}"),
        ])
        .current_dir(tmp.path())
        .output()
        .unwrap();
    assert!(status.status.success());
    let out = jitr(
        tmp.path(),
        &[
            "sign-csr",
            "--csr",
            "d.csr",
            "--passphrase-file",
            "pass",
            "--json",
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let entry: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(entry["id"], id.as_str());
    assert!(!tmp
        .path()
        .join("devices")
        .join(&id)
        .join("device.key")
        .exists());
    let verify = Command::new("openssl")
        .args([
            "verify",
            "-purpose",
            "sslclient",
            "-CAfile",
            "ca/ca.crt",
            &format!("devices/{id}/device.crt"),
        ])
        .current_dir(tmp.path())
        .output()
        .unwrap();
    assert!(
        verify.status.success(),
        "{}",
        String::from_utf8_lossy(&verify.stderr)
    );
    let out = jitr(
        tmp.path(),
        &["sign-csr", "--csr", "d.csr", "--passphrase-file", "pass"],
    );
    assert_eq!(out.status.code(), Some(1));
    std::fs::write(
        tmp.path().join("junk.csr"),
        "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
    )
    .unwrap();
    let out = jitr(
        tmp.path(),
        &[
            "sign-csr",
            "--csr",
            "junk.csr",
            "--passphrase-file",
            "pass",
            "--out",
            "x.pem",
        ],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("junk.csr: CSR is not valid: not a PKCS#10 certificate request"),
        "{}",
        stderr(&out)
    );
    assert!(!stderr(&out).contains("Nom"), "{}", stderr(&out));
    assert!(!tmp.path().join("x.pem").exists());
    // A real CSR cut off half-way (DER, as openssl writes it) is said to be one.
    let der = Command::new("openssl")
        .args(["req", "-in", "d.csr", "-outform", "DER"])
        .current_dir(tmp.path())
        .output()
        .unwrap();
    assert!(der.status.success() && der.stdout.len() > 100);
    std::fs::write(
        tmp.path().join("cut.der"),
        &der.stdout[..der.stdout.len() / 2],
    )
    .unwrap();
    let out = jitr(
        tmp.path(),
        &["sign-csr", "--csr", "cut.der", "--passphrase-file", "pass"],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains(&format!(
            "it says {} bytes of DER and has {} (a cut-off file?)",
            der.stdout.len(),
            der.stdout.len() / 2
        )),
        "{}",
        stderr(&out)
    );
}

#[test]
fn verification_cert_is_written_for_the_registration_code() {
    let tmp = with_ca(false);
    let out = jitr(
        tmp.path(),
        &[
            "ca",
            "verification-cert",
            "--registration-code",
            "abc123",
            "--passphrase-file",
            "pass",
            "--out",
            "verify.crt",
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let text = Command::new("openssl")
        .args(["x509", "-in", "verify.crt", "-noout", "-subject"])
        .current_dir(tmp.path())
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&text.stdout).trim(),
        "subject=CN = abc123"
    );
}

#[test]
fn inspect_refuses_files_without_a_certificate_instead_of_crashing() {
    let tmp = tempfile::tempdir().unwrap();
    for (name, body) in [
        ("vt.pem", "\x0b\n"),
        ("empty.pem", ""),
        (
            "key.pem",
            "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
        ),
    ] {
        std::fs::write(tmp.path().join(name), body).unwrap();
        let out = jitr(tmp.path(), &["inspect", name]);
        assert_eq!(out.status.code(), Some(1), "{name}: {}", stderr(&out));
        assert!(
            stderr(&out).starts_with(&format!("jitr: error: {name}: ")),
            "{}",
            stderr(&out)
        );
    }
}

/// `openssl req` makes a CSR for `id` in `dir` (key `NAME.key`, CSR `NAME.csr`).
fn openssl_csr(dir: &Path, name: &str, id: &str) {
    let out = Command::new("openssl")
        .args(["req", "-new", "-nodes", "-newkey", "ec", "-pkeyopt"])
        .args(["ec_paramgen_curve:P-256", "-keyout", &format!("{name}.key")])
        .args([
            "-out",
            &format!("{name}.csr"),
            "-subj",
            &format!("/CN={id}"),
        ])
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn manifest_lines(dir: &Path) -> usize {
    std::fs::read_to_string(dir.join("devices/manifest.jsonl"))
        .map(|t| t.lines().count())
        .unwrap_or(0)
}

#[test]
fn sign_csr_records_every_signing_and_checks_the_expected_id() {
    let tmp = with_ca(false);
    let dir = tmp.path();
    let id = uuid(78);
    openssl_csr(dir, "d", &id);
    let sign = |extra: &[&str]| {
        let mut args = vec!["sign-csr", "--csr", "d.csr", "--passphrase-file", "pass"];
        args.extend(extra);
        jitr(dir, &args)
    };
    // --out writes the chain elsewhere and the manifest still records it.
    let out = sign(&["--out", "chain.pem", "--expect-id", &id]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(dir.join("chain.pem").exists());
    assert!(!dir.join("devices").join(&id).exists());
    assert_eq!(manifest_lines(dir), 1);
    // A second signing for the id is refused, with or without --out, unless forced.
    for extra in [&["--out", "again.pem"][..], &[]] {
        let out = sign(extra);
        assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
        assert!(stderr(&out).contains("already issued"), "{}", stderr(&out));
    }
    assert!(!dir.join("again.pem").exists());
    assert!(sign(&["--force", "--out", "again.pem"]).status.success());
    assert_eq!(manifest_lines(dir), 2);
    // A CSR for another device than expected: refused, nothing written.
    openssl_csr(dir, "e", &uuid(79));
    let out = jitr(
        dir,
        &["sign-csr", "--csr", "e.csr", "--passphrase-file", "pass"],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    openssl_csr(dir, "f", &uuid(80));
    let out = jitr(
        dir,
        &[
            "sign-csr",
            "--csr",
            "f.csr",
            "--passphrase-file",
            "pass",
            "--expect-id",
            &uuid(81),
            "--out",
            "f.pem",
        ],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains(&format!(
            "the CSR is for device {}, not {}",
            uuid(80),
            uuid(81)
        )),
        "{}",
        stderr(&out)
    );
    assert!(!dir.join("f.pem").exists());
    assert_eq!(manifest_lines(dir), 3);
}

#[test]
fn new_ca_keys_need_strong_and_separate_passphrases() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    std::fs::write(dir.join("short"), "eleven char\n").unwrap();
    std::fs::write(dir.join("pass"), format!("{PASS}\n")).unwrap();
    std::fs::write(dir.join("root"), "an offline root passphrase\n").unwrap();
    let init = |args: &[&str], env: &[(&str, String)]| {
        let mut all = vec!["ca", "init"];
        all.extend(args);
        common::jitr(dir, &all, env)
    };
    let out = init(&["--passphrase-file", "short"], &[]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("at least 12 characters"),
        "{}",
        stderr(&out)
    );
    // The offline root needs its own passphrase: none given and no terminal to ask on.
    let out = init(&["--with-issuing-ca", "--passphrase-file", "pass"], &[]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("--root-passphrase-file"),
        "{}",
        stderr(&out)
    );
    let out = init(
        &[
            "--with-issuing-ca",
            "--passphrase-file",
            "pass",
            "--root-passphrase-file",
            "pass",
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("must differ"), "{}", stderr(&out));
    assert!(!dir.join("ca").exists(), "nothing written");

    let out = init(
        &["--with-issuing-ca", "--passphrase-file", "pass"],
        &[(
            "JITR_ROOT_PASSPHRASE",
            "an offline root passphrase".to_owned(),
        )],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    // OpenSSL 3 reads both keys, each with its own passphrase, and the root costs more.
    for (key, pass, iterations) in [
        ("ca/ca.key", "pass", "0927C0"),
        ("ca/root.key", "root", "1E8480"),
    ] {
        let pkey = Command::new("openssl")
            .args([
                "pkey",
                "-noout",
                "-in",
                key,
                "-passin",
                &format!("file:{pass}"),
            ])
            .current_dir(dir)
            .output()
            .unwrap();
        assert!(
            pkey.status.success(),
            "{key}: {}",
            String::from_utf8_lossy(&pkey.stderr)
        );
        let parsed = Command::new("openssl")
            .args(["asn1parse", "-in", key])
            .current_dir(dir)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&parsed.stdout);
        assert!(
            text.contains(":PBKDF2") && text.contains(&format!(":{iterations}")),
            "{text}"
        );
    }
    let wrong = Command::new("openssl")
        .args([
            "pkey",
            "-noout",
            "-in",
            "ca/root.key",
            "-passin",
            "file:pass",
        ])
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        !wrong.status.success(),
        "the CA's passphrase does not open the root"
    );
}

#[test]
fn issuance_never_outlives_the_ca_nor_the_profiles_maximum() {
    let tmp = with_ca(false);
    let dir = tmp.path();
    let out = jitr(
        dir,
        &[
            "issue",
            "--id",
            &uuid(1),
            "--passphrase-file",
            "pass",
            "--days",
            "3653",
        ],
    );
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("maximum device validity"),
        "{}",
        stderr(&out)
    );
    assert!(!dir.join("devices").exists());
}

/// A device never outlives its CA. The profile's default validity means "as long as the CA
/// lasts, at most that": cut without a word (#25: the defaults warned on every run). An
/// explicit --days that outlives the CA is said before anything is issued.
#[test]
fn a_ca_that_ends_sooner_caps_its_devices_and_says_so() {
    let tmp = common::with_ca(&["--days", "30"]);
    let dir = tmp.path();
    let out = jitr(
        dir,
        &["issue", "--id", &uuid(2), "--passphrase-file", "pass"],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(!stderr(&out).contains("warning"), "{}", stderr(&out));
    let out = jitr(
        dir,
        &[
            "issue",
            "--id",
            &uuid(3),
            "--passphrase-file",
            "pass",
            "--days",
            "60",
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stderr(&out);
    let warned = text
        .find("warning: --days 60 outlives the CA")
        .unwrap_or_else(|| panic!("{text}"));
    let issued = text
        .find("issued 1 device")
        .unwrap_or_else(|| panic!("{text}"));
    assert!(warned < issued, "said before the work: {text}");
    // An explicit --days within the CA's life: nothing to say.
    let out = jitr(
        dir,
        &[
            "issue",
            "--id",
            &uuid(4),
            "--passphrase-file",
            "pass",
            "--days",
            "10",
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(!stderr(&out).contains("warning"), "{}", stderr(&out));
    let check = jitr(
        dir,
        &[
            "inspect",
            &format!("devices/{}/device.crt", uuid(2)),
            "--ca",
            "ca/ca.crt",
        ],
    );
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stdout)
    );
}

/// The commands that decide with the activator's configuration list its variables in `--help`,
/// and a shell missing several learns them all in one run (exit 2).
#[test]
fn the_deciding_commands_name_their_variables() {
    let tmp = tempfile::tempdir().unwrap();
    for command in ["reconcile", "approve", "status", "rotate"] {
        let out = jitr(tmp.path(), &[command, "--help"]);
        assert!(out.status.success(), "{command}");
        let help = String::from_utf8_lossy(&out.stdout);
        for var in [
            "JITR_TRUSTED_CA_IDS",
            "JITR_POLICY_NAME",
            "BALENA_FLEET_ID",
            "JITR_LEDGER_TABLE",
        ] {
            assert!(help.contains(var), "{command} --help lacks {var}");
        }
    }
    let out = Command::new(env!("CARGO_BIN_EXE_jitr"))
        .args(["status"])
        .env_clear()
        .env("JITR_FLEET_BACKEND", "allowlist")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let text = stderr(&out);
    assert_eq!(text.lines().count(), 1, "{text}");
    for var in ["JITR_TRUSTED_CA_IDS", "JITR_POLICY_NAME", "JITR_ALLOWLIST"] {
        assert!(text.contains(var), "{var}: {text}");
    }
}

/// `jitr completions` and `jitr man` come from the clap definitions, checked by the programs
/// that read them: bash loads the script and completes a command and a flag; groff renders
/// every page without a warning. `--version` names the commit this checkout is at.
#[test]
fn completions_man_pages_and_version_come_from_the_command_definitions() {
    let tmp = tempfile::tempdir().unwrap();
    let bin = env!("CARGO_BIN_EXE_jitr");
    let complete = |words: &str, cword: usize| {
        let script = format!(
            "source <('{bin}' completions bash) || exit 9; COMP_WORDS=({words}); COMP_CWORD={cword}; \
             _jitr jitr \"${{COMP_WORDS[$COMP_CWORD]}}\" \"${{COMP_WORDS[$COMP_CWORD-1]}}\"; \
             printf '%s\\n' \"${{COMPREPLY[@]}}\""
        );
        let out = Command::new("bash").args(["-c", &script]).output().unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
        String::from_utf8(out.stdout).unwrap()
    };
    assert_eq!(complete("jitr iss", 1).trim(), "issue");
    assert!(complete("jitr issue --bu", 2)
        .lines()
        .any(|l| l == "--bundle"));
    let out = jitr(tmp.path(), &["completions", "nosuch"]);
    assert_eq!(out.status.code(), Some(2));
    for shell in ["zsh", "fish", "elvish", "powershell"] {
        let out = jitr(tmp.path(), &["completions", shell]);
        assert!(out.status.success() && out.stdout.len() > 1000, "{shell}");
    }

    let pages = tmp.path().join("man/man1");
    let out = jitr(tmp.path(), &["man", "--out", pages.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let mut names: Vec<String> = std::fs::read_dir(&pages)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    for want in ["jitr.1", "jitr-issue.1", "jitr-ca-init.1", "jitr-revoke.1"] {
        assert!(names.iter().any(|n| n == want), "{want} not in {names:?}");
    }
    assert!(stderr(&out).contains(&format!("wrote {} manual pages", names.len())));
    for name in &names {
        let path = pages.join(name);
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o644,
            "{name}"
        );
        let out = Command::new("groff")
            .args(["-man", "-Tutf8", "-ww", "-z"])
            .arg(&path)
            .output()
            .unwrap();
        assert!(
            out.status.success() && out.stderr.is_empty(),
            "{name}: {}",
            stderr(&out)
        );
    }
    let issue = std::fs::read_to_string(pages.join("jitr-issue.1")).unwrap();
    assert!(issue.contains("bundle"), "{issue}");
    let out = jitr(tmp.path(), &["man"]);
    assert!(String::from_utf8_lossy(&out.stdout).starts_with(".ie"));

    let out = jitr(tmp.path(), &["--version"]);
    let version = String::from_utf8(out.stdout).unwrap();
    let head = Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8(o.stdout).unwrap().trim().to_owned());
    let commit = std::env::var("JITR_COMMIT")
        .ok()
        .or(head)
        .unwrap_or_else(|| "unknown".to_owned());
    assert_eq!(
        version.trim(),
        format!("jitr {} (commit {commit})", env!("CARGO_PKG_VERSION"))
    );
}
