use std::path::PathBuf;

/// Result alias for this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong while finding, loading, generating or using a key.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The user named a key type we do not support (bad input).
    #[error("unknown key type `{0}` (expected p256, p384 or ed25519)")]
    UnknownKeyType(String),
    /// The key file does not exist (bad input or a broken home folder).
    #[error("key file {} not found", .0.display())]
    KeyNotFound(PathBuf),
    /// The key file exists but is not a key we can read (bad input).
    #[error("key file {}: {reason}", path.display())]
    BadKeyFile {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The key is encrypted and no passphrase was given (bad input).
    #[error("key file {} is encrypted: give its passphrase with --key-pass-file or M2MPKI_KEY_PASS_FILE", .0.display())]
    PassphraseNeeded(PathBuf),
    /// The passphrase did not decrypt the key (bad input).
    #[error("key file {}: wrong passphrase or corrupted encrypted key", .0.display())]
    WrongPassphrase(PathBuf),
    /// The passphrase file is unusable (bad input).
    #[error("passphrase file {}: {reason}", path.display())]
    BadPassphraseFile {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A PKCS#11 URI is malformed or cannot be honoured (bad input).
    #[error("PKCS#11 URI `{uri}`: {reason}")]
    BadPkcs11Uri {
        /// The URI (without any PIN).
        uri: String,
        /// What is wrong.
        reason: String,
    },
    /// No PKCS#11 module was named (bad input).
    #[error("no PKCS#11 module: add module-path= to the URI, or give --pkcs11-module or M2MPKI_PKCS11_MODULE")]
    NoModule,
    /// The PKCS#11 module cannot be loaded (bad input or a broken installation).
    #[error("PKCS#11 module {}: {reason}", path.display())]
    ModuleLoad {
        /// The module path.
        path: PathBuf,
        /// Why loading failed.
        reason: String,
    },
    /// No initialised token matches (bad input).
    #[error("no PKCS#11 token with {token} in module {}", module.display())]
    TokenNotFound {
        /// The selector (token=, serial= or slot-id=).
        token: String,
        /// The module.
        module: PathBuf,
    },
    /// Several tokens and the URI names none (bad input).
    #[error("module {} has several tokens: name one with token=, serial= or slot-id=", .0.display())]
    AmbiguousToken(PathBuf),
    /// The PIN was wrong (bad input).
    #[error("wrong PIN for token `{0}` (tokens lock after repeated failures: check the PIN before trying again)")]
    WrongPin(String),
    /// The token's user PIN is locked (bad input; needs the security officer).
    #[error("the user PIN of token `{0}` is locked after too many failures; the token's security officer must reset it")]
    PinLocked(String),
    /// No PIN was available (bad input).
    #[error("token `{0}` needs a PIN: add pin-source=FILE to the URI or set M2MPKI_PKCS11_PIN")]
    NoPin(String),
    /// No private key matches the URI (bad input).
    #[error("no private key {uri} on token `{token}`")]
    KeyObjectNotFound {
        /// The URI.
        uri: String,
        /// The token label.
        token: String,
    },
    /// The key on the token is of a type we cannot use (bad input).
    #[error("key {uri}: {reason}")]
    UnsupportedTokenKey {
        /// The URI.
        uri: String,
        /// What is wrong.
        reason: String,
    },
    /// An object with that label or id exists already (bad input).
    #[error("token `{token}` already has an object with that label or id ({uri}); choose another")]
    ObjectExists {
        /// The URI.
        uri: String,
        /// The token label.
        token: String,
    },
    /// The token does not support a mechanism we need (HSM).
    #[error("token `{token}` does not support the mechanism needed for {op}")]
    MechanismUnsupported {
        /// The token label.
        token: String,
        /// What we tried.
        op: String,
    },
    /// The token went away (removed, or its sessions died) (HSM).
    #[error("token `{token}` is gone ({reason}); reconnect it and rerun")]
    TokenGone {
        /// The token label.
        token: String,
        /// The PKCS#11 return value.
        reason: String,
    },
    /// Another PKCS#11 failure (HSM).
    #[error("PKCS#11 token `{token}`: {reason}")]
    Pkcs11 {
        /// The token label.
        token: String,
        /// What failed.
        reason: String,
    },
    /// An output file already exists and overwriting was not asked for (bad input).
    #[error("{} already exists (use --force to overwrite)", .0.display())]
    FileExists(PathBuf),
    /// Reading or writing a file failed (storage).
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The cryptographic library refused an operation (a bug or a broken key).
    #[error("signing or key operation failed: {0}")]
    Crypto(String),
}

impl Error {
    /// Whether the error is the caller's fault (bad input) rather than an internal failure.
    pub fn is_bad_input(&self) -> bool {
        !matches!(
            self,
            Error::Io { .. }
                | Error::Crypto(_)
                | Error::MechanismUnsupported { .. }
                | Error::TokenGone { .. }
                | Error::Pkcs11 { .. }
        )
    }

    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}
