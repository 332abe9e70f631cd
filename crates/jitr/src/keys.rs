//! Where the CA key is, for every command that signs: the CA folder's key file (unlocked with
//! its passphrase) or, when the folder records a key URI (`ca/ca.key-uri`), a key in AWS KMS
//! or on a PKCS#11 token, reached through the `ca-keys` backends.

use std::io::IsTerminal;

use anyhow::{Context, Result};
use ca_keys::{KeyUri, Options};
use factory_ca::Ca;
use zeroize::Zeroizing;

use crate::cli::CaDirArgs;
use crate::{passphrase, UsageError};

/// Environment variable holding a PKCS#11 token's user PIN.
pub(crate) const PIN_ENV: &str = "JITR_PKCS11_PIN";

/// A backend failure as the command reports it: usage mistakes exit 2, the rest 1.
pub(crate) fn backend_error(e: ca_keys::Error) -> anyhow::Error {
    if e.is_usage() {
        UsageError(e.to_string()).into()
    } else {
        anyhow::Error::new(e)
    }
}

/// Parses a key URI given on the command line (a usage error when it does not parse).
pub(crate) fn parse_uri(text: &str) -> Result<KeyUri> {
    text.parse().map_err(backend_error)
}

/// The token's user PIN: `--pin-file`, `JITR_PKCS11_PIN`, or a prompt on a terminal.
fn pin(ca: &CaDirArgs, token: &str) -> Result<Zeroizing<String>> {
    if let Some(file) = &ca.pin_file {
        let text = Zeroizing::new(
            std::fs::read_to_string(file)
                .with_context(|| format!("cannot read PIN file {}", file.display()))?,
        );
        return Ok(Zeroizing::new(
            text.trim_end_matches(['\r', '\n']).to_owned(),
        ));
    }
    if let Ok(text) = std::env::var(PIN_ENV) {
        return Ok(Zeroizing::new(text));
    }
    if std::io::stdin().is_terminal() {
        let text = rpassword::prompt_password(format!("User PIN for token {token:?}: "))
            .context("cannot read the PIN from the terminal")?;
        return Ok(Zeroizing::new(text));
    }
    Err(UsageError(format!(
        "token {token:?} needs its user PIN: --pin-file FILE or {PIN_ENV}"
    ))
    .into())
}

/// The backend settings for `uri`: the module and PIN of a token, the KMS request rate.
pub(crate) fn options(ca: &CaDirArgs, uri: &KeyUri, kms_rate: Option<f64>) -> Result<Options> {
    let mut options = Options {
        pkcs11_module: ca.pkcs11_module.clone(),
        kms_rate: kms_rate.unwrap_or(ca_keys::DEFAULT_KMS_RATE),
        ..Options::default()
    };
    if let KeyUri::Pkcs11 { token, .. } = uri {
        if options.pkcs11_module.is_none() {
            return Err(UsageError(
                "a pkcs11: CA key needs the token's module: --pkcs11-module FILE or JITR_PKCS11_MODULE"
                    .to_owned(),
            )
            .into());
        }
        options.pin = Some(pin(ca, token)?);
    }
    Ok(options)
}

/// Loads the CA of `ca.dir` with its key, wherever the folder says it is.
pub(crate) fn load_ca(ca: &CaDirArgs, kms_rate: Option<f64>) -> Result<Ca> {
    let Some(recorded) = factory_ca::ca_key_uri(&ca.dir)? else {
        return passphrase::load_ca(&ca.dir, ca.passphrase_file.as_deref());
    };
    let uri: KeyUri = recorded.parse().map_err(|e: ca_keys::Error| {
        anyhow::anyhow!(
            "{}: {e}",
            ca.dir.join(factory_ca::CA_KEY_URI_FILE).display()
        )
    })?;
    let options = options(ca, &uri, kms_rate)?;
    let key = ca_keys::open(&uri, &options).map_err(backend_error)?;
    Ok(Ca::load_remote(&ca.dir, key)?)
}
