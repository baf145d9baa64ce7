//! PKCS#11 keys: CA and TLS keys that never leave a token.

mod admin;
mod key;
mod secret;
mod token;
mod uri;

use std::path::PathBuf;
use std::sync::Arc;

use zeroize::Zeroizing;

pub use admin::init_token;
pub use key::{generate, list_tokens, KeyListing, Pkcs11Key, TokenListing};
pub use secret::{credential_hmac, import_credential, unwrap_credential, Pkcs11SecretKey};
pub use token::{Token, MODULE_ENV, PIN_ENV};
pub use uri::Pkcs11Uri;

/// Asks the user for a token PIN (given the token label); `None` when there is no one to ask.
pub type PinPrompt = Arc<dyn Fn(&str) -> Option<Zeroizing<String>> + Send + Sync>;
/// Receives warnings meant for the user (e.g. a PIN given in a URI).
pub type Warn = Arc<dyn Fn(&str) + Send + Sync>;

/// How PKCS#11 tokens are reached.
#[derive(Clone)]
pub struct Pkcs11Config {
    /// Module used when a URI has no `module-path` (else `M2MPKI_PKCS11_MODULE`).
    pub module: Option<PathBuf>,
    /// Sessions per token, for parallel signing.
    pub sessions: usize,
    /// Asks for a PIN when neither the URI nor `M2MPKI_PKCS11_PIN` gives one.
    pub pin_prompt: Option<PinPrompt>,
    /// Where warnings go.
    pub warn: Option<Warn>,
}

impl Default for Pkcs11Config {
    fn default() -> Self {
        Pkcs11Config {
            module: None,
            sessions: std::thread::available_parallelism().map_or(2, |n| n.get()),
            pin_prompt: None,
            warn: None,
        }
    }
}

impl std::fmt::Debug for Pkcs11Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pkcs11Config")
            .field("module", &self.module)
            .field("sessions", &self.sessions)
            .finish_non_exhaustive()
    }
}
