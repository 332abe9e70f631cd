//! The issuance manifest (`manifest.jsonl`): one line per issued certificate.

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::Error;

/// Name of the issuance manifest inside the output folder.
pub const MANIFEST_FILE: &str = "manifest.jsonl";

/// One issued certificate, one JSON line of `manifest.jsonl`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestEntry {
    /// Device id (certificate CN, Thing name).
    pub id: String,
    /// Serial number, lowercase hex of the DER integer.
    pub serial: String,
    /// RFC 3339.
    pub not_before: String,
    /// RFC 3339.
    pub not_after: String,
    /// Lowercase hex SHA-256 of the certificate DER: the id AWS IoT gives the certificate.
    pub certificate_id: String,
    /// Set by `jitr rotate`: the certificate id this one replaces on the device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub supersedes: Option<String>,
    /// Set by `jitr rotate`: when the replaced certificate is retired (RFC 3339); until then
    /// both are ACTIVE, so the device can move over without downtime.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retire_after: Option<String>,
}

/// The AWS IoT certificate id of a certificate: lowercase hex SHA-256 of its DER.
pub fn certificate_id(der: &[u8]) -> String {
    hex(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, der).as_ref())
}

/// The part of a manifest's text that is whole lines, and the number of the cut-off last line
/// when one follows them (a run stopped while writing it). A last line with no newline that
/// still reads as an entry is whole: only its newline is missing.
fn whole_lines(text: &[u8]) -> (usize, Option<usize>) {
    let whole = text
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(0, |at| at + 1);
    let tail = &text[whole..];
    if tail.iter().all(u8::is_ascii_whitespace)
        || serde_json::from_slice::<ManifestEntry>(tail).is_ok()
    {
        return (text.len(), None);
    }
    let line = text[..whole].iter().filter(|&&b| b == b'\n').count() + 1;
    (whole, Some(line))
}

/// Every entry of a manifest file, in order.
pub fn read_manifest(path: &Path) -> Result<Vec<ManifestEntry>, Error> {
    let text = std::fs::read(path).map_err(|source| Error::Read {
        path: path.to_owned(),
        source,
    })?;
    if let (_, Some(line)) = whole_lines(&text) {
        return Err(Error::TornManifest {
            path: path.to_owned(),
            line,
        });
    }
    let text = String::from_utf8_lossy(&text);
    text.lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty())
        .map(|(n, line)| {
            serde_json::from_str(line).map_err(|source| Error::Manifest {
                path: path.to_owned(),
                line: n + 1,
                source,
            })
        })
        .collect()
}

/// What a manifest line is read for when a run starts: the id and the serial, borrowed.
#[derive(Deserialize)]
struct Keys<'a> {
    #[serde(borrow)]
    id: std::borrow::Cow<'a, str>,
    #[serde(borrow)]
    serial: std::borrow::Cow<'a, str>,
}

/// The manifest of an output folder: what was issued before, and where new lines go.
///
/// Held open and locked (an exclusive `flock`) while a run writes it: a second run on the same
/// folder is refused instead of interleaving. Every line is appended whole: a write that fails
/// part-way (a full disk) is cut back to the last whole line before the error is returned.
#[derive(Debug)]
pub struct Manifest {
    path: PathBuf,
    ids: HashSet<String>,
    serials: HashSet<String>,
    file: File,
    /// Bytes of whole lines in the file.
    len: u64,
    /// The last line has no newline yet (written by hand, or cut just before it).
    needs_newline: bool,
    /// Lines appended since the last sync.
    unsynced: bool,
    /// The number of the cut-off last line that [`Manifest::open_repairing`] removed.
    repaired: Option<usize>,
}

impl Manifest {
    /// Opens (creating it if need be) and locks `dir/manifest.jsonl`; a cut-off last line,
    /// left by a run that was stopped while writing it, is refused with the way to repair it.
    pub fn open(dir: &Path) -> Result<Manifest, Error> {
        Manifest::open_with(dir, false)
    }

    /// [`Manifest::open`], removing a cut-off last line instead of refusing it (its device has
    /// no complete record, so it counts as not issued). [`Manifest::repaired`] says which.
    pub fn open_repairing(dir: &Path) -> Result<Manifest, Error> {
        Manifest::open_with(dir, true)
    }

    fn open_with(dir: &Path, repair: bool) -> Result<Manifest, Error> {
        let path = dir.join(MANIFEST_FILE);
        let read = |source| Error::Read {
            path: path.clone(),
            source,
        };
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(&path)
            .map_err(read)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(Error::ManifestBusy { path });
            }
            Err(std::fs::TryLockError::Error(source)) => return Err(read(source)),
        }
        let mut text = Vec::new();
        file.read_to_end(&mut text).map_err(read)?;
        let (whole, torn) = whole_lines(&text);
        let mut repaired = None;
        if let Some(line) = torn {
            if !repair {
                return Err(Error::TornManifest { path, line });
            }
            file.set_len(whole as u64).map_err(|source| Error::Write {
                path: path.clone(),
                source,
            })?;
            file.sync_data().map_err(|source| Error::Write {
                path: path.clone(),
                source,
            })?;
            repaired = Some(line);
        }
        let text = &text[..whole];
        let mut manifest = Manifest {
            path: path.clone(),
            ids: HashSet::new(),
            serials: HashSet::new(),
            file,
            len: whole as u64,
            needs_newline: !text.is_empty() && !text.ends_with(b"\n"),
            unsynced: false,
            repaired,
        };
        for (n, line) in text.split(|&b| b == b'\n').enumerate() {
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            let keys: Keys<'_> =
                serde_json::from_slice(line).map_err(|source| Error::Manifest {
                    path: path.clone(),
                    line: n + 1,
                    source,
                })?;
            manifest.ids.insert(keys.id.into_owned());
            manifest.serials.insert(keys.serial.into_owned());
        }
        Ok(manifest)
    }

    /// The manifest file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The number of the cut-off last line that [`Manifest::open_repairing`] removed.
    pub fn repaired(&self) -> Option<usize> {
        self.repaired
    }

    /// Whether `id` was issued before.
    pub fn contains_id(&self, id: &str) -> bool {
        self.ids.contains(id)
    }

    /// Whether `serial` (hex) was issued before.
    pub fn contains_serial(&self, serial: &str) -> bool {
        self.serials.contains(serial)
    }

    /// Appends `bytes` (whole lines) in one write; a write that fails part-way is cut back, so
    /// the file never ends in part of a line.
    fn append_bytes(&mut self, bytes: &[u8]) -> Result<(), Error> {
        let mut line = Vec::new();
        let bytes = if self.needs_newline {
            line.reserve(bytes.len() + 1);
            line.push(b'\n');
            line.extend_from_slice(bytes);
            &line[..]
        } else {
            bytes
        };
        if let Err(source) = self.file.write_all(bytes) {
            let _ = self.file.set_len(self.len);
            return Err(Error::Write {
                path: self.path.clone(),
                source,
            });
        }
        self.len += bytes.len() as u64;
        self.needs_newline = false;
        self.unsynced = true;
        Ok(())
    }

    /// Appends one entry as a whole line (synced by [`Manifest::flush`]).
    pub fn append(&mut self, entry: &ManifestEntry) -> Result<(), Error> {
        let mut line = serde_json::to_vec(entry).map_err(|e| Error::Write {
            path: self.path.clone(),
            source: e.into(),
        })?;
        line.push(b'\n');
        self.append_bytes(&line)?;
        self.ids.insert(entry.id.clone());
        self.serials.insert(entry.serial.clone());
        Ok(())
    }

    /// Appends the lines of `pending` (manifest lines written by a bundle run as it went) to
    /// the manifest, syncs it, and removes `pending`. A failure leaves the manifest as it was.
    pub(crate) fn append_pending(&mut self, pending: &Path) -> Result<(), Error> {
        let lines = std::fs::read(pending).map_err(|source| Error::Read {
            path: pending.to_owned(),
            source,
        })?;
        let before = self.len;
        let appended = self.append_bytes(&lines).and_then(|()| self.flush());
        if appended.is_err() {
            // Synced or not, none of these lines counts: the caller undoes their bundle.
            let _ = self.file.set_len(before);
            self.len = before;
        }
        appended?;
        std::fs::remove_file(pending).map_err(|source| Error::Write {
            path: pending.to_owned(),
            source,
        })?;
        Ok(())
    }

    /// Syncs the lines appended so far to disk.
    pub fn flush(&mut self) -> Result<(), Error> {
        if self.unsynced {
            self.file.sync_data().map_err(|source| Error::Write {
                path: self.path.clone(),
                source,
            })?;
            self.unsynced = false;
        }
        Ok(())
    }
}

impl Drop for Manifest {
    fn drop(&mut self) {
        let _ = self.flush();
    }
}

/// Lowercase hex of `bytes` (a table, not a char iterator: it runs twice per device).
pub(crate) fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = Vec::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(DIGITS[usize::from(b >> 4)]);
        out.push(DIGITS[usize::from(b & 15)]);
    }
    // Only ASCII digits were written.
    String::from_utf8(out).unwrap_or_default()
}

#[cfg(test)]
mod hex_tests {
    #[test]
    fn hex_is_lowercase_and_two_digits_a_byte() {
        let bytes: Vec<u8> = (0..=255).collect();
        assert_eq!(super::hex(&bytes), hex::encode(&bytes));
        assert_eq!(super::hex(&[]), "");
    }
}
