//! The CA profile (`ca/profile.toml`): subjects, key types, validity and id format.

use std::fmt;
use std::path::Path;
use std::str::FromStr;

use rcgen::{DistinguishedName, DnType};
use serde::{Deserialize, Serialize};

use crate::{Error, IdFormat, KeyAlgorithm};

/// Name of the profile file inside a CA folder.
pub const PROFILE_FILE: &str = "profile.toml";

/// The longest device validity unless the profile says otherwise: ten years (and the two leap
/// days in them), the default validity.
pub const DEFAULT_MAX_DEVICE_DAYS: u32 = 10 * 365 + 2;

/// Defaults for subjects, key types and validity, read from `ca/profile.toml` when present.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Profile {
    /// The top CA: the only CA by default, the offline root with `--with-issuing-ca`.
    pub root: CaProfile,
    /// The issuing CA below the root, with `--with-issuing-ca`.
    pub issuing_ca: CaProfile,
    /// Device certificates.
    pub device: DeviceProfile,
}

/// Subject, key and validity of one CA certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CaProfile {
    /// Distinguished name, e.g. `O=Acme,CN=Acme fleet CA`.
    pub subject: String,
    /// Key type.
    pub key: KeyAlgorithm,
    /// Validity in days.
    pub days: u32,
}

/// Key type, validity and id format of device certificates.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DeviceProfile {
    /// Key type generated for devices.
    pub key: KeyAlgorithm,
    /// Validity in days.
    pub days: u32,
    /// The longest validity a device certificate may have, in days: issuance refuses more and
    /// inspection (and so the activator) rejects a certificate valid for longer.
    pub max_days: u32,
    /// Accepted device ids.
    pub id_format: IdFormat,
}

impl Default for Profile {
    fn default() -> Self {
        Profile {
            root: CaProfile {
                subject: "O=jitr,CN=jitr fleet CA".into(),
                key: KeyAlgorithm::P384,
                days: 20 * 365 + 5,
            },
            issuing_ca: CaProfile {
                subject: "O=jitr,CN=jitr fleet issuing CA".into(),
                key: KeyAlgorithm::P256,
                days: 5 * 365 + 1,
            },
            device: DeviceProfile {
                key: KeyAlgorithm::P256,
                days: 10 * 365 + 2,
                max_days: DEFAULT_MAX_DEVICE_DAYS,
                id_format: IdFormat::BalenaUuid,
            },
        }
    }
}

impl Profile {
    /// Reads `dir/profile.toml`, or the defaults when the file does not exist.
    pub fn load(dir: &Path) -> Result<Profile, Error> {
        let path = dir.join(PROFILE_FILE);
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Profile::default()),
            Err(source) => return Err(Error::Read { path, source }),
        };
        let file: ProfileFile =
            toml::from_str(&text).map_err(|source| Error::Profile { path, source })?;
        let mut profile = Profile::default();
        file.root.apply(&mut profile.root);
        file.issuing_ca.apply(&mut profile.issuing_ca);
        let d = file.device;
        profile.device.key = d.key.unwrap_or(profile.device.key);
        profile.device.days = d.days.unwrap_or(profile.device.days);
        profile.device.max_days = d.max_days.unwrap_or(profile.device.max_days);
        profile.device.id_format = d.id_format.unwrap_or(profile.device.id_format);
        Subject::from_str(&profile.root.subject)?;
        Subject::from_str(&profile.issuing_ca.subject)?;
        Ok(profile)
    }
}

/// `profile.toml` as written: every field optional, unknown ones refused.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct ProfileFile {
    root: CaSection,
    issuing_ca: CaSection,
    device: DeviceSection,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct CaSection {
    subject: Option<String>,
    key: Option<KeyAlgorithm>,
    days: Option<u32>,
}

impl CaSection {
    fn apply(self, ca: &mut CaProfile) {
        ca.subject = self.subject.unwrap_or_else(|| ca.subject.clone());
        ca.key = self.key.unwrap_or(ca.key);
        ca.days = self.days.unwrap_or(ca.days);
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct DeviceSection {
    key: Option<KeyAlgorithm>,
    days: Option<u32>,
    max_days: Option<u32>,
    id_format: Option<IdFormat>,
}

/// A distinguished name given as `O=Acme,CN=Acme fleet CA` (`\,` escapes a comma).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subject(Vec<(DnKind, String)>);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DnKind {
    C,
    St,
    L,
    O,
    Ou,
    Cn,
}

impl DnKind {
    fn rcgen(self) -> DnType {
        match self {
            DnKind::C => DnType::CountryName,
            DnKind::St => DnType::StateOrProvinceName,
            DnKind::L => DnType::LocalityName,
            DnKind::O => DnType::OrganizationName,
            DnKind::Ou => DnType::OrganizationalUnitName,
            DnKind::Cn => DnType::CommonName,
        }
    }

    fn label(self) -> &'static str {
        match self {
            DnKind::C => "C",
            DnKind::St => "ST",
            DnKind::L => "L",
            DnKind::O => "O",
            DnKind::Ou => "OU",
            DnKind::Cn => "CN",
        }
    }
}

impl Subject {
    /// A subject with only a common name.
    pub fn common_name(cn: &str) -> Subject {
        Subject(vec![(DnKind::Cn, cn.to_owned())])
    }

    /// The same subject with its CN replaced (or added).
    pub fn with_common_name(&self, cn: &str) -> Subject {
        let mut parts: Vec<_> = self
            .0
            .iter()
            .filter(|(k, _)| *k != DnKind::Cn)
            .cloned()
            .collect();
        parts.push((DnKind::Cn, cn.to_owned()));
        Subject(parts)
    }

    /// The subject of the issuing CA under a root of this subject: the same names, its CN
    /// saying "issuing" (`O=Acme,CN=Acme fleet CA` -> `O=Acme,CN=Acme fleet issuing CA`), so the
    /// CA that AWS IoT sees in every chain carries the owner's name, not jitr's.
    pub fn issuing_below(&self) -> Subject {
        let cn = self
            .0
            .iter()
            .find(|(k, _)| *k == DnKind::Cn)
            .map_or("", |(_, v)| v.as_str());
        let issuing = match cn.strip_suffix(" CA") {
            Some(stem) => format!("{stem} issuing CA"),
            None if cn.is_empty() => "issuing CA".to_owned(),
            None => format!("{cn} issuing CA"),
        };
        self.with_common_name(&issuing)
    }

    pub(crate) fn to_rcgen(&self) -> DistinguishedName {
        let mut dn = DistinguishedName::new();
        for (kind, value) in &self.0 {
            dn.push(kind.rcgen(), value.as_str());
        }
        dn
    }
}

impl FromStr for Subject {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        let bad = |reason| Error::Subject {
            subject: s.to_owned(),
            reason,
        };
        let mut parts = Vec::new();
        let mut current = String::new();
        let mut chars = s.chars();
        let mut fields = Vec::new();
        while let Some(c) = chars.next() {
            match c {
                '\\' => current.push(chars.next().ok_or_else(|| bad("dangling backslash"))?),
                ',' => fields.push(std::mem::take(&mut current)),
                c => current.push(c),
            }
        }
        fields.push(current);
        for field in fields {
            let (key, value) = field
                .split_once('=')
                .ok_or_else(|| bad("expected KEY=value pairs separated by commas"))?;
            let kind = match key.trim().to_ascii_uppercase().as_str() {
                "C" => DnKind::C,
                "ST" => DnKind::St,
                "L" => DnKind::L,
                "O" => DnKind::O,
                "OU" => DnKind::Ou,
                "CN" => DnKind::Cn,
                _ => return Err(bad("unknown attribute (use C, ST, L, O, OU, CN)")),
            };
            let value = value.trim();
            if value.is_empty() || value.len() > 64 {
                return Err(bad("each value has 1 to 64 characters"));
            }
            if kind == DnKind::C
                && (value.len() != 2 || !value.bytes().all(|b| b.is_ascii_uppercase()))
            {
                return Err(bad("C is a two-letter upper-case country code"));
            }
            parts.push((kind, value.to_owned()));
        }
        if !parts.iter().any(|(k, _)| *k == DnKind::Cn) {
            return Err(bad("a CN is required"));
        }
        Ok(Subject(parts))
    }
}

impl fmt::Display for Subject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (kind, value)) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{}={}", kind.label(), value.replace(',', "\\,"))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_subject_with_escaped_comma() {
        let s: Subject = "C=DE, O=Acme\\, Inc.,CN=Fleet CA".parse().unwrap();
        assert_eq!(s.to_string(), "C=DE,O=Acme\\, Inc.,CN=Fleet CA");
    }

    #[test]
    fn the_issuing_subject_keeps_the_owners_names() {
        let root: Subject = "O=Acme,CN=Acme fleet CA".parse().unwrap();
        assert_eq!(
            root.issuing_below().to_string(),
            "O=Acme,CN=Acme fleet issuing CA"
        );
        let root: Subject = "C=DE,O=Acme,CN=Acme devices".parse().unwrap();
        assert_eq!(
            root.issuing_below().to_string(),
            "C=DE,O=Acme,CN=Acme devices issuing CA"
        );
        let default: Subject = Profile::default().root.subject.parse().unwrap();
        assert_eq!(
            default.issuing_below().to_string(),
            Profile::default().issuing_ca.subject
        );
    }

    #[test]
    fn rejects_subject_without_cn_or_with_unknown_key() {
        assert!("O=Acme".parse::<Subject>().is_err());
        assert!("X=1,CN=a".parse::<Subject>().is_err());
        assert!("CN".parse::<Subject>().is_err());
        assert!("C=Germany,CN=a".parse::<Subject>().is_err());
    }

    #[test]
    fn profile_file_overrides_defaults_and_rejects_unknown_fields() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(PROFILE_FILE), "[root]\nkey = \"p256\"\n").unwrap();
        let p = Profile::load(dir.path()).unwrap();
        assert_eq!(p.root.key, KeyAlgorithm::P256);
        assert_eq!(p.device, Profile::default().device);
        std::fs::write(dir.path().join(PROFILE_FILE), "[root]\nsubjekt = \"x\"\n").unwrap();
        assert!(matches!(
            Profile::load(dir.path()),
            Err(Error::Profile { .. })
        ));
    }
}
