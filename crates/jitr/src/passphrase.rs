//! Where CA passphrases come from: a file, the environment, or a prompt on a terminal. The CA
//! that signs devices uses `--passphrase-file` / `JITR_CA_PASSPHRASE`; the offline root has
//! its own, `--root-passphrase-file` / `JITR_ROOT_PASSPHRASE`, never silently the CA's.

use std::io::IsTerminal;
use std::path::Path;

use anyhow::{bail, Context, Result};
use factory_ca::{Ca, Error, KeyProtection, Passphrase};

use crate::UsageError;

/// Environment variable holding the CA passphrase.
pub(crate) const ENV: &str = "JITR_CA_PASSPHRASE";
/// Environment variable holding the offline root's passphrase.
pub(crate) const ROOT_ENV: &str = "JITR_ROOT_PASSPHRASE";

/// The passphrase text from a file or the environment variable `env`, if one was given.
fn given_text(file: Option<&Path>, env: &str) -> Result<Option<String>> {
    if let Some(file) = file {
        let text = std::fs::read_to_string(file)
            .with_context(|| format!("cannot read passphrase file {}", file.display()))?;
        return Ok(Some(text));
    }
    match std::env::var(env) {
        Ok(text) => Ok(Some(text)),
        Err(std::env::VarError::NotPresent) => Ok(None),
        Err(std::env::VarError::NotUnicode(_)) => bail!("{env} is not valid UTF-8"),
    }
}

/// The CA passphrase from a file or the environment, if one was given.
pub(crate) fn given(file: Option<&Path>) -> Result<Option<Passphrase>> {
    given_text(file, ENV)?
        .map(|text| Passphrase::new(text).with_context(|| format!("{ENV} or --passphrase-file")))
        .transpose()
}

fn prompt(label: &str) -> Result<String> {
    rpassword::prompt_password(label).context("cannot read the passphrase from the terminal")
}

/// A passphrase for a new key, from `file`, `env` or two matching prompts; one that is too
/// short is a usage error.
fn new_passphrase(file: Option<&Path>, env: &str, what: &str, missing: &str) -> Result<Passphrase> {
    let text = match given_text(file, env)? {
        Some(text) => text,
        None if std::io::stdin().is_terminal() => {
            let first = prompt(&format!("New {what} passphrase: "))?;
            if first != prompt("Repeat the passphrase: ")? {
                bail!("the two passphrases differ");
            }
            first
        }
        None => return Err(UsageError(missing.to_owned()).into()),
    };
    match Passphrase::for_new_key(text) {
        Err(e @ (Error::WeakPassphrase { .. } | Error::EmptyPassphrase)) => {
            Err(UsageError(format!("{what} passphrase: {e}")).into())
        }
        other => Ok(other?),
    }
}

/// How `ca init` protects the key of the CA that signs devices.
pub(crate) fn for_new_key(file: Option<&Path>, insecure_plaintext: bool) -> Result<KeyProtection> {
    if insecure_plaintext {
        return Ok(KeyProtection::InsecurePlaintext);
    }
    Ok(KeyProtection::Encrypted(new_passphrase(
        file,
        ENV,
        "CA key",
        "no CA passphrase: use --passphrase-file FILE or JITR_CA_PASSPHRASE (or --insecure-plaintext-key for a throwaway CA)",
    )?))
}

/// How `ca init --with-issuing-ca` protects the offline root's key: its own passphrase.
pub(crate) fn root_for_new_key(
    file: Option<&Path>,
    insecure_plaintext: bool,
    ca: &KeyProtection,
) -> Result<KeyProtection> {
    if insecure_plaintext {
        return Ok(KeyProtection::InsecurePlaintext);
    }
    let root = new_passphrase(
        file,
        ROOT_ENV,
        "offline root key",
        "--with-issuing-ca needs the offline root's own passphrase: --root-passphrase-file FILE or JITR_ROOT_PASSPHRASE",
    )?;
    if let KeyProtection::Encrypted(ca) = ca {
        if ca.expose() == root.expose() {
            return Err(UsageError(
                "the offline root's passphrase must differ from the issuing CA's".to_owned(),
            )
            .into());
        }
    }
    Ok(KeyProtection::Encrypted(root))
}

/// Loads the CA, prompting for the passphrase on a terminal when the key needs one.
pub(crate) fn load_ca(dir: &Path, file: Option<&Path>) -> Result<Ca> {
    let given = given(file)?;
    match Ca::load(dir, given.as_ref()) {
        Err(Error::PassphraseRequired { path }) if given.is_none() => {
            if !std::io::stdin().is_terminal() {
                bail!(
                    "{} is encrypted: use --passphrase-file FILE or {ENV}",
                    path.display()
                );
            }
            let text = prompt(&format!("Passphrase for {}: ", path.display()))?;
            Ok(Ca::load(dir, Some(&Passphrase::new(text)?))?)
        }
        other => Ok(other?),
    }
}
