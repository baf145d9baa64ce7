//! Any [`Signer`] as a rustls signing key, so TLS handshakes sign with software and token keys
//! alike.

use std::fmt;
use std::sync::Arc;

use rustls::pki_types::SubjectPublicKeyInfoDer;
use rustls::sign::{Signer as TlsSigner, SigningKey};
use rustls::{SignatureAlgorithm, SignatureScheme};

use crate::{KeyType, Signer};

/// A [`Signer`] usable by rustls (`CertifiedKey::new(chain, Arc::new(TlsKey::new(key)))`).
#[derive(Clone)]
pub struct TlsKey {
    key: Arc<dyn Signer>,
}

impl TlsKey {
    /// Wraps a key.
    pub fn new(key: Arc<dyn Signer>) -> Self {
        TlsKey { key }
    }

    /// The one TLS signature scheme this key signs with.
    pub fn scheme(&self) -> SignatureScheme {
        match self.key.key_type() {
            KeyType::P256 => SignatureScheme::ECDSA_NISTP256_SHA256,
            KeyType::P384 => SignatureScheme::ECDSA_NISTP384_SHA384,
            KeyType::Ed25519 => SignatureScheme::ED25519,
        }
    }
}

impl fmt::Debug for TlsKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsKey").field("key", &self.key).finish()
    }
}

impl SigningKey for TlsKey {
    fn choose_scheme(&self, offered: &[SignatureScheme]) -> Option<Box<dyn TlsSigner>> {
        let scheme = self.scheme();
        offered.contains(&scheme).then(|| {
            Box::new(TlsKeySigner {
                key: self.key.clone(),
                scheme,
            }) as Box<dyn TlsSigner>
        })
    }

    fn public_key(&self) -> Option<SubjectPublicKeyInfoDer<'_>> {
        Some(SubjectPublicKeyInfoDer::from(
            rcgen::PublicKeyData::subject_public_key_info(&*self.key),
        ))
    }

    fn algorithm(&self) -> SignatureAlgorithm {
        match self.key.key_type() {
            KeyType::P256 | KeyType::P384 => SignatureAlgorithm::ECDSA,
            KeyType::Ed25519 => SignatureAlgorithm::ED25519,
        }
    }
}

struct TlsKeySigner {
    key: Arc<dyn Signer>,
    scheme: SignatureScheme,
}

impl fmt::Debug for TlsKeySigner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsKeySigner")
            .field("scheme", &self.scheme)
            .finish_non_exhaustive()
    }
}

impl TlsSigner for TlsKeySigner {
    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, rustls::Error> {
        // rcgen's contract matches TLS: ECDSA keys hash with the scheme's hash and return a DER
        // Ecdsa-Sig-Value; Ed25519 signs the message itself.
        rcgen::SigningKey::sign(&*self.key, message).map_err(|e| {
            let detail = crate::sign_error::take().map_or_else(|| e.to_string(), |k| k.to_string());
            rustls::Error::General(format!("signing the handshake failed: {detail}"))
        })
    }

    fn scheme(&self) -> SignatureScheme {
        self.scheme
    }
}
