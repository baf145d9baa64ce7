use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;

use crate::{Error, Passphrase, Result, Signer, SoftwareKey};

/// Where a private key lives.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum KeyRef {
    /// A PKCS#8 PEM file.
    File(PathBuf),
    /// An object on a PKCS#11 token, named by an RFC 7512 URI.
    Pkcs11(String),
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

    fn from_str(s: &str) -> Result<Self> {
        if s.starts_with("pkcs11:") {
            Ok(KeyRef::Pkcs11(s.to_owned()))
        } else {
            Ok(KeyRef::File(PathBuf::from(s)))
        }
    }
}

impl fmt::Display for KeyRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeyRef::File(p) => write!(f, "{}", p.display()),
            KeyRef::Pkcs11(uri) => f.write_str(uri),
            KeyRef::InMemory => f.write_str("(in memory)"),
        }
    }
}

/// Opens keys by reference, holding what opening needs (a passphrase for encrypted files).
#[derive(Debug, Default, Clone)]
pub struct Keystore {
    passphrase: Option<Passphrase>,
}

impl Keystore {
    /// A keystore that decrypts (and encrypts new) key files with `passphrase` when given.
    pub fn new(passphrase: Option<Passphrase>) -> Self {
        Keystore { passphrase }
    }

    /// The passphrase used for key files, if any.
    pub fn passphrase(&self) -> Option<&Passphrase> {
        self.passphrase.as_ref()
    }

    /// Opens the key `key_ref` for signing.
    pub fn open(&self, key_ref: &KeyRef) -> Result<Arc<dyn Signer>> {
        match key_ref {
            KeyRef::File(path) => Ok(Arc::new(SoftwareKey::load(path, self.passphrase.as_ref())?)),
            KeyRef::Pkcs11(uri) => Err(Error::Pkcs11Unavailable(uri.clone())),
            KeyRef::InMemory => Err(Error::Crypto(
                "an in-memory key cannot be reopened by reference".into(),
            )),
        }
    }
}
