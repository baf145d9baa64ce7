use std::sync::Arc;

use crate::pkcs11::{Pkcs11Config, Pkcs11Key};
use crate::{Error, KeyRef, Passphrase, Result, Signer, SoftwareKey};

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
