//! The issuance manifest (`manifest.jsonl`): one line per issued certificate.

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, BufWriter, Write};
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

/// Every entry of a manifest file, in order.
pub fn read_manifest(path: &Path) -> Result<Vec<ManifestEntry>, Error> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::Read {
        path: path.to_owned(),
        source,
    })?;
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

/// The manifest of an output folder: what was issued before, and where new lines go.
#[derive(Debug)]
pub struct Manifest {
    path: PathBuf,
    ids: HashSet<String>,
    serials: HashSet<String>,
    writer: Option<BufWriter<File>>,
}

impl Manifest {
    /// Reads `dir/manifest.jsonl` if it exists.
    pub fn open(dir: &Path) -> Result<Manifest, Error> {
        let path = dir.join(MANIFEST_FILE);
        let mut manifest = Manifest {
            path: path.clone(),
            ids: HashSet::new(),
            serials: HashSet::new(),
            writer: None,
        };
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(manifest),
            Err(source) => return Err(Error::Read { path, source }),
        };
        for (n, line) in BufReader::new(file).lines().enumerate() {
            let line = line.map_err(|source| Error::Read {
                path: path.clone(),
                source,
            })?;
            if line.trim().is_empty() {
                continue;
            }
            let entry: ManifestEntry =
                serde_json::from_str(&line).map_err(|source| Error::Manifest {
                    path: path.clone(),
                    line: n + 1,
                    source,
                })?;
            manifest.ids.insert(entry.id);
            manifest.serials.insert(entry.serial);
        }
        Ok(manifest)
    }

    /// The manifest file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether `id` was issued before.
    pub fn contains_id(&self, id: &str) -> bool {
        self.ids.contains(id)
    }

    /// Whether `serial` (hex) was issued before.
    pub fn contains_serial(&self, serial: &str) -> bool {
        self.serials.contains(serial)
    }

    /// Appends one entry (buffered; see [`Manifest::flush`]).
    pub fn append(&mut self, entry: &ManifestEntry) -> Result<(), Error> {
        let path = &self.path;
        let io = |source| Error::Write {
            path: path.clone(),
            source,
        };
        if self.writer.is_none() {
            let file = OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(io)?;
            self.writer = Some(BufWriter::with_capacity(64 * 1024, file));
        }
        if let Some(w) = self.writer.as_mut() {
            let mut line = serde_json::to_vec(entry).map_err(|e| io(e.into()))?;
            line.push(b'\n');
            w.write_all(&line).map_err(io)?;
        }
        self.ids.insert(entry.id.clone());
        self.serials.insert(entry.serial.clone());
        Ok(())
    }

    /// Appends the lines of `pending` (manifest lines written by a bundle run as it went) to
    /// the manifest, syncs it, and removes `pending`.
    pub(crate) fn append_pending(&mut self, pending: &Path) -> Result<(), Error> {
        self.flush()?;
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| Error::Write { path, source }
        };
        let mut from = File::open(pending).map_err(io(pending))?;
        let mut to = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .map_err(io(&self.path))?;
        std::io::copy(&mut from, &mut to).map_err(io(&self.path))?;
        to.sync_all().map_err(io(&self.path))?;
        std::fs::remove_file(pending).map_err(io(pending))?;
        Ok(())
    }

    /// Writes buffered entries to disk and syncs the file.
    pub fn flush(&mut self) -> Result<(), Error> {
        if let Some(w) = self.writer.as_mut() {
            let io = |source| Error::Write {
                path: self.path.clone(),
                source,
            };
            w.flush().map_err(io)?;
            w.get_ref().sync_data().map_err(io)?;
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
