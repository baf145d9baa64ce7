//! Where a store lives, and opening it: the one place that knows both backends.

use std::fmt;
use std::str::FromStr;

use crate::store::Store;
use crate::{Error, Result};

/// Where a store lives: `redb:PATH` (the embedded store, shared by the processes of one host) or a
/// PostgreSQL URL (`postgres://` or `postgresql://`), shared by several processes and hosts.
#[derive(Clone, PartialEq, Eq)]
pub enum StoreLocation {
    /// An embedded redb file.
    Redb(std::path::PathBuf),
    /// A PostgreSQL database (the URL may carry a password: never printed).
    Postgres(String),
}

impl fmt::Debug for StoreLocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreLocation::Redb(p) => write!(f, "Redb({})", p.display()),
            StoreLocation::Postgres(_) => f.write_str("Postgres(..)"),
        }
    }
}

impl FromStr for StoreLocation {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        if s.starts_with("postgres://") || s.starts_with("postgresql://") {
            Ok(StoreLocation::Postgres(s.to_owned()))
        } else if let Some(path) = s.strip_prefix("redb:") {
            if path.is_empty() {
                return Err(Error::invalid("store", s, "redb: needs a file path"));
            }
            Ok(StoreLocation::Redb(path.into()))
        } else {
            // Never echo what might be a mistyped URL with a password in it.
            Err(Error::invalid(
                "store",
                if s.contains('@') { "(not shown)" } else { s },
                "expected redb:PATH or a postgres:// URL",
            ))
        }
    }
}

impl StoreLocation {
    /// Opens the store (creating an empty one when there is none).
    pub fn open(&self) -> Result<Box<dyn Store>> {
        Ok(match self {
            StoreLocation::Redb(path) => Box::new(crate::RedbStore::open(path)?),
            StoreLocation::Postgres(url) => Box::new(crate::PgStore::open(url)?),
        })
    }
}
