use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;

use crate::pkcs11::{Pkcs11Config, Pkcs11Key, Pkcs11Uri};
use crate::{Error, Passphrase, Result, Signer, SoftwareKey};

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

/// Opens keys by reference, holding what opening needs (a passphrase for encrypted files,
/// the PKCS#11 module and PIN sources for token keys).
#[derive(Debug, Default, Clone)]
pub struct Keystore {
    passphrase: Option<Passphrase>,
    pkcs11: Pkcs11Config,
}

impl Keystore {
    /// A keystore that decrypts (and encrypts new) key files with `passphrase` when given.
    pub fn new(passphrase: Option<Passphrase>) -> Self {
        Keystore {
            passphrase,
            pkcs11: Pkcs11Config::default(),
        }
    }

    /// The same keystore reaching tokens with `cfg`.
    pub fn with_pkcs11(mut self, cfg: Pkcs11Config) -> Self {
        self.pkcs11 = cfg;
        self
    }

    /// How tokens are reached.
    pub fn pkcs11(&self) -> &Pkcs11Config {
        &self.pkcs11
    }

    /// The passphrase used for key files, if any.
    pub fn passphrase(&self) -> Option<&Passphrase> {
        self.passphrase.as_ref()
    }

    /// Opens the key `key_ref` for signing.
    pub fn open(&self, key_ref: &KeyRef) -> Result<Arc<dyn Signer>> {
        match key_ref {
            KeyRef::File(path) => Ok(Arc::new(SoftwareKey::load(path, self.passphrase.as_ref())?)),
            KeyRef::Pkcs11(uri) => Ok(Arc::new(Pkcs11Key::open(uri, &self.pkcs11)?)),
            KeyRef::InMemory => Err(Error::Crypto(
                "an in-memory key cannot be reopened by reference".into(),
            )),
        }
    }
}
