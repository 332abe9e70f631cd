//! What the `jitr` integration tests share: running the binary in a folder with nothing of the
//! host's environment leaking in (no ~/.aws, no instance metadata, no AWS_*, BALENA_* or JITR_*
//! variables of the person running the tests), and a CA made the way an operator makes one.

#![allow(dead_code)] // each test file uses its own part of this

use std::path::Path;
use std::process::{Command, Output, Stdio};

/// The passphrase every test CA is encrypted with.
pub(crate) const PASS: &str = "jitr test passphrase";
/// The offline root's own passphrase (with `--with-issuing-ca`).
pub(crate) const ROOT_PASS: &str = "jitr test root passphrase";

/// Runs `jitr args` in `dir` with only `env` set beyond `PATH` and `HOME`.
pub(crate) fn jitr(dir: &Path, args: &[&str], env: &[(&str, String)]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_jitr"));
    command
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .env_clear()
        .env("AWS_CONFIG_FILE", "/nonexistent")
        .env("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
        .env("AWS_EC2_METADATA_DISABLED", "true");
    for var in ["PATH", "HOME"] {
        if let Some(value) = std::env::var_os(var) {
            command.env(var, value);
        }
    }
    for (name, value) in env {
        command.env(name, value);
    }
    command.output().unwrap()
}

/// Standard output as text.
pub(crate) fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Standard error as text.
pub(crate) fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A balena-shaped device UUID from a number.
pub(crate) fn uuid(n: usize) -> String {
    format!("{n:032x}")
}

/// A folder with `pass` and `root-pass` (the passphrases) and a CA made by `jitr ca init` with
/// `extra` flags (`--passphrase-file pass`, and `--root-passphrase-file root-pass` with
/// `--with-issuing-ca`, unless `--insecure-plaintext-key` is among them).
pub(crate) fn with_ca(extra: &[&str]) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("pass"), format!("{PASS}\n")).unwrap();
    std::fs::write(tmp.path().join("root-pass"), format!("{ROOT_PASS}\n")).unwrap();
    let mut args = vec!["ca", "init", "--subject", "O=Acme,CN=Acme fleet CA"];
    if !extra.contains(&"--insecure-plaintext-key") {
        args.extend(["--passphrase-file", "pass"]);
        if extra.contains(&"--with-issuing-ca") {
            args.extend(["--root-passphrase-file", "root-pass"]);
        }
    }
    args.extend(extra);
    let out = jitr(tmp.path(), &args, &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    tmp
}

/// The `bootstrap` binary next to `jitr` (`cargo test --workspace` builds both).
pub(crate) fn bootstrap() -> std::path::PathBuf {
    let path = std::path::PathBuf::from(env!("CARGO_BIN_EXE_jitr")).with_file_name("bootstrap");
    assert!(
        path.exists(),
        "{} is missing: run the suite with `cargo test --workspace` (it builds bootstrap)",
        path.display()
    );
    path
}
