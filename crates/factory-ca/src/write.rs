//! Writes that never leave a half-written file behind: everything goes to a temporary
//! name in the same folder and is renamed into place once complete.

use std::fs::{self, DirBuilder, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::random::random_bytes;
use crate::Error;

fn temp_sibling(path: &Path, tag: &str) -> Result<PathBuf, Error> {
    let mut nonce = [0u8; 6];
    random_bytes(&mut nonce)?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    Ok(path.with_file_name(format!(".{name}.{tag}.{}", hex::encode(nonce))))
}

fn write_new(path: &Path, bytes: &[u8], mode: u32, sync: bool) -> io::Result<()> {
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)?;
    file.write_all(bytes)?;
    if sync {
        file.sync_all()?;
    }
    Ok(())
}

/// Writes `bytes` to `path` with permission `mode`, atomically replacing any old file
/// (written to a temporary name in the same folder, synced when `sync`, then renamed).
pub fn write_file_atomic(path: &Path, bytes: &[u8], mode: u32, sync: bool) -> Result<(), Error> {
    let tmp = temp_sibling(path, "tmp")?;
    let result = write_new(&tmp, bytes, mode, sync).and_then(|()| fs::rename(&tmp, path));
    result.map_err(|source| {
        let _ = fs::remove_file(&tmp);
        Error::Write {
            path: path.to_owned(),
            source,
        }
    })
}

/// Creates `dir` and its parents.
pub(crate) fn create_dir(dir: &Path) -> Result<(), Error> {
    DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(dir)
        .map_err(|source| Error::Write {
            path: dir.to_owned(),
            source,
        })
}

/// One file of a folder written by [`write_dir_atomic`].
pub(crate) struct DirFile<'a> {
    pub(crate) name: &'static str,
    pub(crate) bytes: &'a [u8],
    pub(crate) mode: u32,
}

/// Writes a complete folder `dir` holding `files`, replacing any previous folder of that
/// name only once the new one is complete.
pub(crate) fn write_dir_atomic(dir: &Path, files: &[DirFile<'_>]) -> Result<(), Error> {
    let tmp = temp_sibling(dir, "tmp")?;
    let fill = || -> io::Result<()> {
        DirBuilder::new().mode(0o755).create(&tmp)?;
        for file in files {
            write_new(&tmp.join(file.name), file.bytes, file.mode, false)?;
        }
        Ok(())
    };
    let result = fill().and_then(|()| match fs::rename(&tmp, dir) {
        Ok(()) => Ok(()),
        // The id was issued before (--force) or a crashed run left its folder: swap it out.
        Err(e) if dir.is_dir() && e.kind() != io::ErrorKind::PermissionDenied => {
            let old = temp_sibling(dir, "old").map_err(io::Error::other)?;
            fs::rename(dir, &old)?;
            fs::rename(&tmp, dir)?;
            let _ = fs::remove_dir_all(&old);
            Ok(())
        }
        Err(e) => Err(e),
    });
    result.map_err(|source| {
        let _ = fs::remove_dir_all(&tmp);
        Error::Write {
            path: dir.to_owned(),
            source,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn dir_is_replaced_whole_and_modes_are_kept() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("dev");
        let files = [
            DirFile {
                name: "a",
                bytes: b"one",
                mode: 0o600,
            },
            DirFile {
                name: "b",
                bytes: b"two",
                mode: 0o644,
            },
        ];
        write_dir_atomic(&dir, &files).unwrap();
        write_dir_atomic(
            &dir,
            &[DirFile {
                name: "a",
                bytes: b"new",
                mode: 0o600,
            }],
        )
        .unwrap();
        assert_eq!(fs::read(dir.join("a")).unwrap(), b"new");
        assert!(!dir.join("b").exists());
        assert_eq!(
            fs::metadata(dir.join("a")).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(
            fs::read_dir(root.path()).unwrap().count(),
            1,
            "no temporary left behind"
        );
    }

    #[test]
    fn failed_write_leaves_nothing() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("missing-parent").join("dev");
        let err = write_dir_atomic(
            &dir,
            &[DirFile {
                name: "a",
                bytes: b"x",
                mode: 0o600,
            }],
        );
        assert!(matches!(err, Err(Error::Write { .. })));
        assert_eq!(fs::read_dir(root.path()).unwrap().count(), 0);
    }
}
