//! Where the CA passphrase comes from: --passphrase-file, JITR_CA_PASSPHRASE, or a prompt.

use std::io::IsTerminal;
use std::path::Path;

use anyhow::{bail, Context, Result};
use factory_ca::{Ca, Error, KeyProtection, Passphrase};

/// Environment variable holding the CA passphrase.
pub(crate) const ENV: &str = "JITR_CA_PASSPHRASE";

/// The passphrase from a file or the environment, if one was given.
pub(crate) fn given(file: Option<&Path>) -> Result<Option<Passphrase>> {
    if let Some(file) = file {
        let text = std::fs::read_to_string(file)
            .with_context(|| format!("cannot read passphrase file {}", file.display()))?;
        return Ok(Some(Passphrase::new(text)?));
    }
    match std::env::var(ENV) {
        Ok(text) => Ok(Some(
            Passphrase::new(text).with_context(|| format!("{ENV} is set"))?,
        )),
        Err(std::env::VarError::NotPresent) => Ok(None),
        Err(std::env::VarError::NotUnicode(_)) => bail!("{ENV} is not valid UTF-8"),
    }
}

fn prompt(label: &str) -> Result<Passphrase> {
    let text = rpassword::prompt_password(label)
        .context("cannot read the passphrase from the terminal")?;
    Ok(Passphrase::new(text)?)
}

/// How `ca init` protects new keys: given passphrase, prompted (twice), or plaintext on request.
pub(crate) fn for_new_key(file: Option<&Path>, insecure_plaintext: bool) -> Result<KeyProtection> {
    if insecure_plaintext {
        return Ok(KeyProtection::InsecurePlaintext);
    }
    if let Some(pass) = given(file)? {
        return Ok(KeyProtection::Encrypted(pass));
    }
    if !std::io::stdin().is_terminal() {
        bail!("no CA passphrase: use --passphrase-file FILE or {ENV} (or --insecure-plaintext-key for a throwaway CA)");
    }
    let first = prompt("New CA key passphrase: ")?;
    let again = prompt("Repeat the passphrase: ")?;
    if first.expose() != again.expose() {
        bail!("the two passphrases differ");
    }
    Ok(KeyProtection::Encrypted(first))
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
            let pass = prompt(&format!("Passphrase for {}: ", path.display()))?;
            Ok(Ca::load(dir, Some(&pass))?)
        }
        other => Ok(other?),
    }
}
