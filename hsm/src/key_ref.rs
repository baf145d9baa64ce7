//! Naming a key: a file, a PKCS#11 object or a key held only in memory.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use crate::pkcs11::Pkcs11Uri;
use crate::{Error, Result};

/// Where a private key lives.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum KeyRef {
    /// A PKCS#8 PEM file.
    File(PathBuf),
    /// An object on a PKCS#11 token, named by an RFC 7512 URI (never holding a PIN).
    Pkcs11(Pkcs11Uri),
    /// A key that exists only in this process (generated and not yet saved).
    InMemory,
}

impl KeyRef {
    /// Whether the key is on a hardware token (and so cannot be copied or printed).
    pub fn is_token(&self) -> bool {
        matches!(self, KeyRef::Pkcs11(_))
    }
}

impl FromStr for KeyRef {
    type Err = Error;

    /// A `pkcs11:` URI (RFC 7512), else a file path. The one place that tells them apart.
    fn from_str(s: &str) -> Result<Self> {
        if s.starts_with("pkcs11:") {
            Ok(KeyRef::Pkcs11(s.parse()?))
        } else {
            Ok(KeyRef::File(PathBuf::from(s)))
        }
    }
}

impl KeyRef {
    /// Like [`FromStr`], with a relative file path taken relative to `base` (the folder of the
    /// configuration file that names the key).
    pub fn parse_relative(s: &str, base: &std::path::Path) -> Result<Self> {
        Ok(match s.parse()? {
            KeyRef::File(p) if p.is_relative() => KeyRef::File(base.join(p)),
            other => other,
        })
    }
}

impl fmt::Display for KeyRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeyRef::File(p) => write!(f, "{}", p.display()),
            KeyRef::Pkcs11(uri) => write!(f, "{uri}"),
            KeyRef::InMemory => f.write_str("(in memory)"),
        }
    }
}
