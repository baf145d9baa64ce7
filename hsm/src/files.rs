//! Crash-safe file output shared by every crate that writes keys, certificates or records.
//!
//! Files are written to a temporary sibling, flushed to disk and renamed into place, so a reader
//! (or a process killed at any instant) sees either no file or the whole file, never a torn one.

use std::fs;
use std::io::Write;
use std::path::Path;

use crate::{Error, Result};

/// Who may read a file we write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Owner read/write only (0600): private keys, credentials, anything secret.
    Secret,
    /// World-readable (0644): certificates and other public material.
    Public,
}

/// Whether an existing file may be replaced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Overwrite {
    /// Refuse with [`Error::FileExists`] when the target exists.
    Refuse,
    /// Replace the target atomically.
    Replace,
}

/// Options for [`write_atomic`].
#[derive(Clone, Copy, Debug)]
pub struct WriteOptions {
    /// File permissions.
    pub mode: Mode,
    /// What to do when the target exists.
    pub overwrite: Overwrite,
    /// `fsync` the file before renaming it into place. Callers that write many files and sync
    /// the file system once afterwards may turn it off.
    pub sync: bool,
}

/// Writes `contents` to `path` atomically (temporary file + rename) with the given options.
pub fn write_atomic(path: &Path, contents: &[u8], opts: WriteOptions) -> Result<()> {
    if opts.overwrite == Overwrite::Refuse && path.exists() {
        return Err(Error::FileExists(path.to_owned()));
    }
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let mut tmp = tempfile::Builder::new()
        .prefix(".m2mpki-")
        .suffix(".tmp")
        .permissions(permissions(opts.mode))
        .tempfile_in(dir)
        .map_err(|e| Error::io(dir, e))?;
    tmp.write_all(contents).map_err(|e| Error::io(path, e))?;
    if opts.sync {
        tmp.as_file().sync_all().map_err(|e| Error::io(path, e))?;
    }
    match opts.overwrite {
        Overwrite::Replace => tmp
            .persist(path)
            .map(drop)
            .map_err(|e| Error::io(path, e.error)),
        // persist_noclobber closes the race between the exists() check above and the rename.
        Overwrite::Refuse => tmp.persist_noclobber(path).map(drop).map_err(|e| {
            if e.error.kind() == std::io::ErrorKind::AlreadyExists {
                Error::FileExists(path.to_owned())
            } else {
                Error::io(path, e.error)
            }
        }),
    }
}

/// PEM with LF line endings (the `pem` crate defaults to CRLF).
pub fn pem_encode(tag: &str, der: &[u8]) -> String {
    pem::encode_config(
        &pem::Pem::new(tag, der.to_vec()),
        pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF),
    )
}

/// Creates a directory (and its parents) readable only by the owner.
pub fn create_private_dir(path: &Path) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
        .map_err(|e| Error::io(path, e))
}

/// Makes `path` a file only its owner can read and write (0600): created empty when missing
/// (a database such as redb initialises an empty file), tightened when it is wider.
pub fn ensure_private_file(path: &Path) -> Result<()> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    match fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
    {
        Ok(_) => return Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(Error::io(path, e)),
    }
    let meta = fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if meta.is_file() && meta.permissions().mode() & 0o077 != 0 {
        fs::set_permissions(path, permissions(Mode::Secret)).map_err(|e| Error::io(path, e))?;
    }
    Ok(())
}

fn permissions(mode: Mode) -> fs::Permissions {
    use std::os::unix::fs::PermissionsExt;
    fs::Permissions::from_mode(match mode {
        Mode::Secret => 0o600,
        Mode::Public => 0o644,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    const SECRET_NEW: WriteOptions = WriteOptions {
        mode: Mode::Secret,
        overwrite: Overwrite::Refuse,
        sync: true,
    };

    #[test]
    fn secret_files_are_0600_and_not_clobbered() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("k.pem");
        write_atomic(&f, b"one", SECRET_NEW).unwrap();
        let mode = fs::metadata(&f).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(matches!(
            write_atomic(&f, b"two", SECRET_NEW),
            Err(Error::FileExists(_))
        ));
        assert_eq!(fs::read(&f).unwrap(), b"one");
        let replace = WriteOptions {
            overwrite: Overwrite::Replace,
            ..SECRET_NEW
        };
        write_atomic(&f, b"two", replace).unwrap();
        assert_eq!(fs::read(&f).unwrap(), b"two");
        // no temporary files are left behind
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn private_files_are_made_0600_and_wider_ones_tightened() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("store.db");
        ensure_private_file(&f).unwrap();
        assert_eq!(
            fs::metadata(&f).unwrap().permissions().mode() & 0o777,
            0o600
        );
        fs::write(&f, b"data").unwrap();
        fs::set_permissions(&f, fs::Permissions::from_mode(0o644)).unwrap();
        ensure_private_file(&f).unwrap();
        assert_eq!(
            fs::metadata(&f).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(fs::read(&f).unwrap(), b"data", "contents untouched");
    }
}
