//! Regions for a fleet shipped worldwide: AWS region names, and the `--region-of FILE` map
//! that says in which region each device connects (so it is given that region's data
//! endpoint, and the issuance ledger can record it).
//!
//! The file: one device per line, `device_id,region` or `device_id region` (any whitespace),
//! e.g. `0123…cdef,eu-west-1`; blank lines and `#` comments are skipped, and a first line
//! `device_id,region` (a header, as a spreadsheet exports it) too. A device is listed once.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::Path;

use anyhow::{Context, Result};
use factory_ca::{DeviceId, IdFormat};

use crate::UsageError;

/// The longest region name accepted (the longest AWS has today is 14 characters).
const MAX_REGION_LEN: usize = 32;

/// An AWS region name such as `eu-west-1` or `us-gov-west-1`, checked for its shape.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct AwsRegion(String);

impl AwsRegion {
    /// A region name: two letters, one or more words of letters, a number, joined by `-`.
    pub(crate) fn parse(name: &str) -> Result<AwsRegion, String> {
        let parts: Vec<&str> = name.split('-').collect();
        let letters = |p: &str| !p.is_empty() && p.bytes().all(|b| b.is_ascii_lowercase());
        let ok = name.len() <= MAX_REGION_LEN
            && parts.len() >= 3
            && parts[0].len() == 2
            && parts[..parts.len() - 1].iter().all(|p| letters(p))
            && parts[parts.len() - 1].bytes().all(|b| b.is_ascii_digit())
            && !parts[parts.len() - 1].is_empty();
        if ok {
            Ok(AwsRegion(name.to_owned()))
        } else {
            Err(format!(
                "{name:?} is not an AWS region name (like eu-west-1 or us-east-1)"
            ))
        }
    }

    /// The name, e.g. `eu-west-1`.
    pub(crate) fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for AwsRegion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Each device's region, read from a `--region-of` file.
#[derive(Debug, Clone)]
pub(crate) struct RegionMap {
    /// Where the map came from, to name it in messages.
    origin: String,
    by_device: BTreeMap<String, AwsRegion>,
}

impl RegionMap {
    /// Reads and checks `path`; a malformed line is a usage error naming `path:line`.
    pub(crate) fn load(path: &Path) -> Result<RegionMap> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        RegionMap::parse(&text, &path.display().to_string())
    }

    /// Parses the file's text; `origin` names it in messages.
    pub(crate) fn parse(text: &str, origin: &str) -> Result<RegionMap> {
        let mut by_device = BTreeMap::new();
        let mut first_line = BTreeMap::new();
        let mut seen_data = false;
        for (n, line) in text.lines().enumerate() {
            let at = || format!("{origin}:{}", n + 1);
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let fields: Vec<&str> = if line.contains(',') {
                line.split(',').map(str::trim).collect()
            } else {
                line.split_whitespace().collect()
            };
            let [id, region] = fields[..] else {
                return Err(UsageError(format!(
                    "{}: expected `device_id,region` (or the two separated by spaces), found {line:?}",
                    at()
                ))
                .into());
            };
            let header = !seen_data
                && id.eq_ignore_ascii_case("device_id")
                && region.eq_ignore_ascii_case("region");
            seen_data = true;
            if header {
                continue;
            }
            let device = DeviceId::parse(id, IdFormat::Any)
                .map_err(|e| UsageError(format!("{}: {}", at(), iot::error_chain(&e))))?;
            let region = AwsRegion::parse(region)
                .map_err(|reason| UsageError(format!("{}: {reason}", at())))?;
            if let Some(earlier) = first_line.insert(device.as_str().to_owned(), n + 1) {
                return Err(UsageError(format!(
                    "{}: device {id} is already listed on line {earlier}",
                    at()
                ))
                .into());
            }
            by_device.insert(device.as_str().to_owned(), region);
        }
        Ok(RegionMap {
            origin: origin.to_owned(),
            by_device,
        })
    }

    /// The region of `device_id`, if the file lists it.
    pub(crate) fn get(&self, device_id: &str) -> Option<&AwsRegion> {
        self.by_device.get(device_id)
    }

    /// The distinct regions of `ids`, or a usage error naming the first id the file does not
    /// list (and how many more), so that nothing is issued to a device without a region.
    pub(crate) fn regions_of<'a>(
        &self,
        ids: impl IntoIterator<Item = &'a DeviceId>,
    ) -> Result<BTreeSet<&AwsRegion>> {
        let mut regions = BTreeSet::new();
        let mut missing = Vec::new();
        for id in ids {
            match self.get(id.as_str()) {
                Some(region) => {
                    regions.insert(region);
                }
                None => missing.push(id.as_str()),
            }
        }
        match missing.as_slice() {
            [] => Ok(regions),
            [first, rest @ ..] => Err(UsageError(format!(
                "{}: no region for device {first}{}: every device issued needs one",
                self.origin,
                if rest.is_empty() {
                    String::new()
                } else {
                    format!(" (and {} more)", rest.len())
                }
            ))
            .into()),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // a test: a panic is the report

    use super::*;

    const A: &str = "0123456789abcdef0123456789abcdef";
    const B: &str = "fedcba9876543210fedcba9876543210";

    fn id(s: &str) -> DeviceId {
        DeviceId::parse(s, IdFormat::Any).unwrap()
    }

    #[test]
    fn region_names_are_checked_for_their_shape() {
        for ok in [
            "eu-west-1",
            "us-east-1",
            "ap-southeast-2",
            "us-gov-west-1",
            "cn-north-1",
            "us-isob-east-1",
        ] {
            assert_eq!(AwsRegion::parse(ok).unwrap().as_str(), ok);
        }
        for bad in [
            "",
            "eu",
            "eu-west",
            "EU-west-1",
            "eu-west-x",
            "eu-west-",
            "e-west-1",
            "eu--1",
            "eu_west_1",
            "eu-west-1 ",
            "eu-w3st-1",
        ] {
            assert!(AwsRegion::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn reads_commas_or_spaces_with_an_optional_header_and_comments() {
        let text =
            format!("device_id,region\n# shipped to Europe\n{A}, eu-west-1\n\n{B}\tus-east-1\n");
        let map = RegionMap::parse(&text, "r.csv").unwrap();
        assert_eq!(map.get(A).unwrap().as_str(), "eu-west-1");
        assert_eq!(map.get(B).unwrap().as_str(), "us-east-1");
        assert!(map.get("other").is_none());
        let regions = map.regions_of(&[id(A), id(B), id(A)]).unwrap();
        let names: Vec<_> = regions.iter().map(|r| r.as_str()).collect();
        assert_eq!(names, ["eu-west-1", "us-east-1"]);
    }

    #[test]
    fn a_bad_line_is_a_usage_error_naming_file_and_line() {
        for (text, expected) in [
            (
                format!("{A},eu-west-1\n{B},mars-1\n"),
                "r.csv:2: \"mars-1\" is not an AWS region name",
            ),
            (format!("{A}\n"), "r.csv:1: expected `device_id,region`"),
            (format!("{A},eu-west-1,x\n"), "r.csv:1: expected"),
            (
                format!("{A},eu-west-1\n\n{A},us-east-1\n"),
                "r.csv:3: device",
            ),
            ("not/an/id,eu-west-1\n".to_owned(), "r.csv:1: "),
            // A header is only a header on the first line.
            (format!("{A},eu-west-1\ndevice_id,region\n"), "r.csv:2: "),
        ] {
            let err = RegionMap::parse(&text, "r.csv").unwrap_err();
            assert!(err.is::<UsageError>(), "{err:#}");
            let message = format!("{err:#}");
            assert!(message.starts_with(expected), "{message}");
            assert_eq!(message.lines().count(), 1, "{message}");
        }
    }

    #[test]
    fn a_device_without_a_region_is_named_with_the_count_of_others() {
        let map = RegionMap::parse(&format!("{A},eu-west-1\n"), "r.csv").unwrap();
        let err = map.regions_of(&[id(A), id(B), id("c0ffee")]).unwrap_err();
        assert!(err.is::<UsageError>());
        assert_eq!(
            format!("{err:#}"),
            format!("r.csv: no region for device {B} (and 1 more): every device issued needs one")
        );
    }
}
