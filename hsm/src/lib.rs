//! Keys and signing for m2mpki.
//!
//! Everything in m2mpki that signs (certificates, CRLs and, later, TLS handshakes) goes through
//! a [`Signer`]: a key that implements rcgen's [`rcgen::SigningKey`] and knows its
//! [`KeyType`]. Software keys ([`SoftwareKey`]) are the embedded default; PKCS#11 tokens are a
//! second implementation of the same trait. Callers name a key with a [`KeyRef`] (a file path or,
//! for tokens, a `pkcs11:` URI) and open it through a [`Keystore`], so code that only signs never
//! learns where the key lives.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod error;
pub mod files;
mod key_ref;
mod key_type;
mod keystore;
pub mod pkcs11;
pub mod sealing;
mod secret;
pub mod sign_error;
mod software;
pub mod tls;

pub use error::{Error, Result};
pub use key_ref::KeyRef;
pub use key_type::KeyType;
pub use keystore::Keystore;
pub use secret::Passphrase;
pub use software::SoftwareKey;

use std::fmt;

/// A private key that can sign: the one abstraction every signing path of m2mpki uses.
///
/// Implementations must be cheap to share between threads (`Send + Sync`) so batch issuance can
/// sign in parallel, and their `Debug` output must never contain key material.
pub trait Signer: rcgen::SigningKey + Send + Sync + fmt::Debug {
    /// The key's algorithm.
    fn key_type(&self) -> KeyType;
    /// Where the key lives, for records and messages (a path or a PKCS#11 URI, never a secret).
    fn key_ref(&self) -> &KeyRef;
    /// Whether this is the private half of `spki_der` (a DER SubjectPublicKeyInfo, as a
    /// certificate carries it): the one check that a certificate and a key belong together.
    fn matches(&self, spki_der: &[u8]) -> bool {
        rcgen::PublicKeyData::subject_public_key_info(self) == spki_der
    }
    /// The private key as PKCS#8 DER, for a library that can only sign with keys it holds
    /// itself (OpenSSL, for DTLS). Only keys already in process memory give it; a key on a
    /// token never leaves it, and returns `None`.
    fn software_pkcs8(&self) -> Option<zeroize::Zeroizing<Vec<u8>>> {
        None
    }
}
