//! A CA key on a PKCS#11 token (an HSM; SoftHSM2 in tests), through the `cryptoki` crate: an EC
//! key pair on P-256 or P-384 whose private half is sensitive and never extractable, found by
//! the token's label and the objects' label.
//!
//! The token signs `CKM_ECDSA` over a digest made here and answers the raw `r‖s`, which
//! becomes the DER signature X.509 carries. Sessions are pooled, one per signing thread at a
//! time; the first one stays open, so the login lasts as long as the key.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use cryptoki::context::{CInitializeArgs, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::AuthPin;
use factory_ca::{KeyAlgorithm, RemoteKey};

use crate::{der, Error, KeyUri, Options};

/// A signing key on a token.
pub struct Pkcs11Key {
    uri: String,
    token: String,
    algorithm: KeyAlgorithm,
    public_raw: Vec<u8>,
    private: ObjectHandle,
    never_extractable: bool,
    slot: Slot,
    pkcs11: Pkcs11,
    /// Idle sessions; never empty between calls once open (the login lives in them).
    sessions: Mutex<Vec<Session>>,
}

impl std::fmt::Debug for Pkcs11Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pkcs11Key")
            .field("uri", &self.uri)
            .field("algorithm", &self.algorithm)
            .finish_non_exhaustive()
    }
}

/// One line for a PKCS#11 failure of `what`.
fn describe(what: &str, e: &CkError) -> String {
    match e {
        CkError::Pkcs11(rv, function) => format!("{what}: {function:?} answered {}", rv_name(*rv)),
        CkError::LibraryLoading(e) => format!("{what}: cannot load the module: {e}"),
        other => format!("{what}: {other}"),
    }
}

/// The CKR_ name of a return value, as tokens' manuals spell them.
fn rv_name(rv: RvError) -> String {
    let name = format!("{rv:?}");
    let mut out = String::from("CKR_");
    for (i, c) in name.chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            out.push('_');
        }
        out.push(c.to_ascii_uppercase());
    }
    out
}

/// The module at `path`, loaded and initialized once per process and kept for its life: a
/// second context of the same module would be refused (`CKR_CRYPTOKI_ALREADY_INITIALIZED`),
/// and finalizing one would end the other's sessions.
fn module(path: &Path) -> Result<Pkcs11, Error> {
    static MODULES: OnceLock<Mutex<HashMap<PathBuf, Pkcs11>>> = OnceLock::new();
    let mut modules = MODULES
        .get_or_init(Mutex::default)
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(pkcs11) = modules.get(path) {
        return Ok(pkcs11.clone());
    }
    let pkcs11 = Pkcs11::new(path)
        .map_err(|e| Error::Backend(describe(&format!("PKCS#11 module {}", path.display()), &e)))?;
    match pkcs11.initialize(CInitializeArgs::OsThreads) {
        Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
        Err(e) => return Err(Error::Backend(describe("PKCS#11 C_Initialize", &e))),
    }
    modules.insert(path.to_owned(), pkcs11.clone());
    Ok(pkcs11)
}

/// The module, initialized; the slot holding the token labelled `token`; a session logged in
/// as the user.
fn login(
    token: &str,
    options: &Options,
    read_write: bool,
) -> Result<(Pkcs11, Slot, Session), Error> {
    let module = options.pkcs11_module.as_ref().ok_or_else(|| {
        Error::Missing(
            "a pkcs11: key needs the token's module: --pkcs11-module FILE or JITR_PKCS11_MODULE"
                .to_owned(),
        )
    })?;
    let pin = options.pin.as_ref().ok_or_else(|| {
        Error::Missing(format!(
            "token {token:?} needs its user PIN: --pin-file FILE or JITR_PKCS11_PIN"
        ))
    })?;
    let pkcs11 = self::module(module)?;
    let slots = pkcs11
        .get_slots_with_initialized_token()
        .map_err(|e| Error::Backend(describe("PKCS#11 slot list", &e)))?;
    let mut labels = Vec::new();
    let mut found = None;
    for slot in slots {
        let info = pkcs11
            .get_token_info(slot)
            .map_err(|e| Error::Backend(describe("PKCS#11 token info", &e)))?;
        let label = info.label().trim_end().to_owned();
        if label == token {
            found = Some(slot);
            break;
        }
        labels.push(label);
    }
    let slot = found.ok_or_else(|| {
        Error::NotFound(format!(
            "no PKCS#11 token labelled {token:?} in {} (tokens: {})",
            module.display(),
            if labels.is_empty() {
                "none".to_owned()
            } else {
                labels.join(", ")
            }
        ))
    })?;
    let session = if read_write {
        pkcs11.open_rw_session(slot)
    } else {
        pkcs11.open_ro_session(slot)
    }
    .map_err(|e| Error::Backend(describe(&format!("token {token:?}"), &e)))?;
    let pin = AuthPin::new(pin.as_str().to_owned());
    match session.login(UserType::User, Some(&pin)) {
        Ok(()) | Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => {}
        Err(CkError::Pkcs11(RvError::PinIncorrect, _)) => {
            return Err(Error::Unsuitable(format!(
                "token {token:?} refused the PIN (CKR_PIN_INCORRECT)"
            )))
        }
        Err(CkError::Pkcs11(RvError::PinLocked, _)) => {
            return Err(Error::Unsuitable(format!(
                "token {token:?}: the user PIN is locked (CKR_PIN_LOCKED)"
            )))
        }
        Err(e) => {
            return Err(Error::Backend(describe(
                &format!("token {token:?} login"),
                &e,
            )))
        }
    }
    Ok((pkcs11, slot, session))
}

fn find(session: &Session, class: ObjectClass, label: &str) -> Result<Vec<ObjectHandle>, Error> {
    session
        .find_objects(&[
            Attribute::Class(class),
            Attribute::Label(label.as_bytes().to_vec()),
        ])
        .map_err(|e| Error::Backend(describe("PKCS#11 find objects", &e)))
}

impl Pkcs11Key {
    /// Opens the key pair labelled `object` on the token labelled `token`.
    pub fn open(token: &str, object: &str, options: &Options) -> Result<Pkcs11Key, Error> {
        let (pkcs11, slot, session) = login(token, options, false)?;
        let private = match find(&session, ObjectClass::PRIVATE_KEY, object)?.as_slice() {
            [one] => *one,
            [] => {
                return Err(Error::NotFound(format!(
                    "no private key labelled {object:?} on token {token:?}"
                )))
            }
            more => {
                return Err(Error::Unsuitable(format!(
                    "{} private keys are labelled {object:?} on token {token:?}: the label must name one",
                    more.len()
                )))
            }
        };
        let attributes = session
            .get_attributes(
                private,
                &[
                    AttributeType::KeyType,
                    AttributeType::Sign,
                    AttributeType::Sensitive,
                    AttributeType::Extractable,
                ],
            )
            .map_err(|e| Error::Backend(describe("PKCS#11 key attributes", &e)))?;
        let never_extractable = attributes.contains(&Attribute::Sensitive(true))
            && attributes.contains(&Attribute::Extractable(false));
        for attribute in &attributes {
            match attribute {
                Attribute::KeyType(kind) if *kind != KeyType::EC => {
                    return Err(Error::Unsuitable(format!(
                        "{object:?} on token {token:?} is a {kind} key: a jitr CA key is EC P-256 or P-384"
                    )))
                }
                Attribute::Sign(false) => {
                    return Err(Error::Unsuitable(format!(
                        "{object:?} on token {token:?} may not sign (CKA_SIGN is false)"
                    )))
                }
                _ => {}
            }
        }
        let [public] = find(&session, ObjectClass::PUBLIC_KEY, object)?[..] else {
            return Err(Error::NotFound(format!(
                "no (single) public key labelled {object:?} on token {token:?}: the CA certificate needs it"
            )));
        };
        let values = session
            .get_attributes(public, &[AttributeType::EcParams, AttributeType::EcPoint])
            .map_err(|e| Error::Backend(describe("PKCS#11 public key", &e)))?;
        let (mut params, mut point) = (None, None);
        for value in values {
            match value {
                Attribute::EcParams(p) => params = Some(p),
                Attribute::EcPoint(p) => point = Some(p),
                _ => {}
            }
        }
        let unsuitable = || {
            Error::Unsuitable(format!(
                "{object:?} on token {token:?} is not on P-256 or P-384: a jitr CA key is"
            ))
        };
        let algorithm = params
            .as_deref()
            .and_then(der::curve_of)
            .ok_or_else(unsuitable)?;
        let public_raw = point
            .as_deref()
            .and_then(|p| der::ec_point(p, algorithm))
            .ok_or_else(unsuitable)?;
        Ok(Pkcs11Key {
            uri: KeyUri::Pkcs11 {
                token: token.to_owned(),
                object: object.to_owned(),
            }
            .to_string(),
            token: token.to_owned(),
            algorithm,
            public_raw,
            private,
            never_extractable,
            slot,
            pkcs11,
            sessions: Mutex::new(vec![session]),
        })
    }

    /// Generates a key pair labelled `object` on the token: the private key sensitive, never
    /// extractable, for signing only. A label already in use is refused.
    pub fn create(
        token: &str,
        object: &str,
        algorithm: KeyAlgorithm,
        options: &Options,
    ) -> Result<Pkcs11Key, Error> {
        {
            let (_pkcs11, _slot, session) = login(token, options, true)?;
            let taken = find(&session, ObjectClass::PRIVATE_KEY, object)?.len()
                + find(&session, ObjectClass::PUBLIC_KEY, object)?.len();
            if taken > 0 {
                return Err(Error::Exists(format!(
                    "token {token:?} already holds a key labelled {object:?}: use --existing to make it the CA key"
                )));
            }
            let label = Attribute::Label(object.as_bytes().to_vec());
            let id = Attribute::Id(object.as_bytes().to_vec());
            session
                .generate_key_pair(
                    &Mechanism::EccKeyPairGen,
                    &[
                        Attribute::Token(true),
                        Attribute::Private(false),
                        Attribute::Verify(true),
                        Attribute::EcParams(der::curve_oid(algorithm).to_vec()),
                        label.clone(),
                        id.clone(),
                    ],
                    &[
                        Attribute::Token(true),
                        Attribute::Private(true),
                        Attribute::Sensitive(true),
                        Attribute::Extractable(false),
                        Attribute::Sign(true),
                        label,
                        id,
                    ],
                )
                .map_err(|e| {
                    Error::Backend(describe(&format!("token {token:?} key generation"), &e))
                })?;
            // The module is finalized as this context goes; `open` starts afresh.
        }
        Pkcs11Key::open(token, object, options)
    }

    /// Whether the private key can never leave the token (`CKA_SENSITIVE` and not
    /// `CKA_EXTRACTABLE`), as a key `create` makes.
    pub fn never_extractable(&self) -> bool {
        self.never_extractable
    }

    fn session(&self) -> Result<Session, String> {
        let idle = self
            .sessions
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .pop();
        match idle {
            Some(session) => Ok(session),
            // A new session of a logged-in application is logged in too.
            None => self
                .pkcs11
                .open_ro_session(self.slot)
                .map_err(|e| describe(&format!("token {:?}", self.token), &e)),
        }
    }
}

impl RemoteKey for Pkcs11Key {
    fn uri(&self) -> String {
        self.uri.clone()
    }

    fn algorithm(&self) -> KeyAlgorithm {
        self.algorithm
    }

    fn public_key_raw(&self) -> &[u8] {
        &self.public_raw
    }

    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, String> {
        let digest = crate::digest(self.algorithm, message);
        let session = self.session()?;
        let raw = session.sign(&Mechanism::Ecdsa, self.private, &digest);
        self.sessions
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(session);
        let raw = raw.map_err(|e| describe(&format!("{} sign", self.uri), &e))?;
        der::ecdsa_signature(&raw, self.algorithm)
    }
}
