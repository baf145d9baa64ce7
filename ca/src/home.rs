//! The home folder: where a CA installation keeps its store and software keys.

use std::path::{Path, PathBuf};

use m2mpki_hsm::{files, KeyRef};

use crate::redb_store::RedbStore;
use crate::{Error, Result};

/// A home folder: `store.redb` and `keys/` (mode 0700).
#[derive(Debug, Clone)]
pub struct Home {
    root: PathBuf,
}

impl Home {
    /// Uses `root` as the home folder, creating it (mode 0700) if needed.
    pub fn open(root: &Path) -> Result<Self> {
        files::create_private_dir(root)?;
        files::create_private_dir(&root.join("keys"))?;
        Ok(Home {
            root: root.to_owned(),
        })
    }

    /// The folder itself.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Opens the store.
    pub fn store(&self) -> Result<RedbStore> {
        RedbStore::open(&self.root.join("store.redb"))
    }

    /// Where a CA's software key is kept, relative to the home folder.
    pub fn ca_key_path(name: &str) -> PathBuf {
        Path::new("keys").join(format!("{name}.key.pem"))
    }

    /// Resolves a key reference stored in a CA record: relative paths are inside the home.
    pub fn resolve_key(&self, stored: &str) -> Result<KeyRef> {
        let key: KeyRef = stored.parse()?;
        Ok(match key {
            KeyRef::File(p) if p.is_relative() => KeyRef::File(self.root.join(p)),
            other => other,
        })
    }

    /// The form of `key` to keep in a record: paths inside the home become relative so the
    /// folder can be moved.
    pub fn storable_key(&self, key: &KeyRef) -> Result<String> {
        match key {
            KeyRef::File(p) => {
                let abs = if p.is_relative() {
                    std::env::current_dir()
                        .map_err(|e| Error::io(p, e))?
                        .join(p)
                } else {
                    p.clone()
                };
                Ok(abs
                    .strip_prefix(&self.root)
                    .map(Path::to_path_buf)
                    .unwrap_or(abs)
                    .display()
                    .to_string())
            }
            other => Ok(other.to_string()),
        }
    }
}
