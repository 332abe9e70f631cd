//! Device ids: balena UUIDs by default, any AWS IoT Thing name on request.

use std::fmt;
use std::str::FromStr;

use crate::Error;

/// Which device ids are accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum IdFormat {
    /// A balena device UUID: lowercase hex, 32 characters (62 for legacy devices).
    #[default]
    BalenaUuid,
    /// Any AWS IoT Thing name: `[a-zA-Z0-9:_-]{1,128}`.
    Any,
}

impl FromStr for IdFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "balena-uuid" | "balena" | "uuid" => Ok(IdFormat::BalenaUuid),
            "any" => Ok(IdFormat::Any),
            other => Err(format!(
                "unknown id format {other:?} (expected balena-uuid or any)"
            )),
        }
    }
}

/// A validated device id: the certificate CN and the AWS IoT Thing name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DeviceId(String);

impl DeviceId {
    /// Validates `id` against `format`.
    pub fn parse(id: &str, format: IdFormat) -> Result<Self, Error> {
        let invalid = |reason| Error::InvalidDeviceId {
            id: shown(id),
            reason,
        };
        match format {
            IdFormat::BalenaUuid => {
                if id.len() == 36 && id.bytes().filter(|&b| b == b'-').count() == 4 {
                    return Err(invalid(
                        "a balena UUID has no dashes (32 lowercase hex characters)",
                    ));
                }
                if id.len() != 32 && id.len() != 62 {
                    return Err(invalid("a balena UUID has 32 (or 62) characters"));
                }
                if !id
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
                {
                    return Err(invalid("a balena UUID is lowercase hexadecimal"));
                }
            }
            IdFormat::Any => {
                if id.is_empty() || id.len() > 128 {
                    return Err(invalid("a Thing name has 1 to 128 characters"));
                }
                if !id
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b":_-".contains(&b))
                {
                    return Err(invalid("a Thing name uses only [a-zA-Z0-9:_-]"));
                }
            }
        }
        Ok(DeviceId(id.to_owned()))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Characters of a rejected id that an error message shows.
const SHOWN_CHARS: usize = 70;

/// `id` as an error message shows it: cut to [`SHOWN_CHARS`] characters, saying how long it was.
fn shown(id: &str) -> String {
    match id.char_indices().nth(SHOWN_CHARS) {
        None => id.to_owned(),
        Some((at, _)) => format!("{}… ({} bytes)", &id[..at], id.len()),
    }
}

impl fmt::Display for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_balena_uuids_of_both_lengths() {
        assert!(DeviceId::parse("0123456789abcdef0123456789abcdef", IdFormat::BalenaUuid).is_ok());
        assert!(DeviceId::parse(&"a".repeat(62), IdFormat::BalenaUuid).is_ok());
    }

    #[test]
    fn rejects_upper_case_short_and_non_hex_uuids() {
        for bad in [
            "0123456789ABCDEF0123456789ABCDEF",
            "0123456789abcdef",
            "0123456789abcdef0123456789abcdeg",
            "0123456789abcdef0123456789abcde\0",
            "",
        ] {
            assert!(
                DeviceId::parse(bad, IdFormat::BalenaUuid).is_err(),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn a_long_rejected_id_is_cut_and_a_dashed_uuid_gets_a_hint() {
        let long = "x".repeat(10_000_000);
        let message = DeviceId::parse(&long, IdFormat::BalenaUuid)
            .unwrap_err()
            .to_string();
        assert!(message.len() < 200, "{}", message.len());
        assert!(message.contains("10000000 bytes"), "{message}");
        let dashed = "3f2504e0-4f89-11d3-9a0c-0305e82c3301";
        let message = DeviceId::parse(dashed, IdFormat::BalenaUuid)
            .unwrap_err()
            .to_string();
        assert!(message.contains("no dashes"), "{message}");
    }

    #[test]
    fn any_format_follows_the_thing_name_rule() {
        assert!(DeviceId::parse("sensor:42_a-B", IdFormat::Any).is_ok());
        assert!(DeviceId::parse(&"x".repeat(128), IdFormat::Any).is_ok());
        assert!(DeviceId::parse(&"x".repeat(129), IdFormat::Any).is_err());
        assert!(DeviceId::parse("a/b", IdFormat::Any).is_err());
        assert!(DeviceId::parse("é", IdFormat::Any).is_err());
    }
}
