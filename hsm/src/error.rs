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
    /// A key reference names a backend this build cannot use (bad input).
    #[error("key `{0}`: PKCS#11 keys are not available in this build")]
    Pkcs11Unavailable(String),
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
        !matches!(self, Error::Io { .. } | Error::Crypto(_))
    }

    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}
