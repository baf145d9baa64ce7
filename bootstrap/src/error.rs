use std::path::PathBuf;

/// Result alias for this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in the bootstrap.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A configuration or profile file is malformed (bad input).
    #[error("{}: {reason}", path.display())]
    BadConfig {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The peer could not be reached (network).
    #[error("cannot connect to {addr}: {reason}")]
    Connect {
        /// Where we tried.
        addr: String,
        /// Why it failed.
        reason: String,
    },
    /// A listening socket could not be opened (a port in use, an address not ours).
    #[error("cannot listen on {addr}: {reason}")]
    Listen {
        /// The address.
        addr: String,
        /// Why.
        reason: String,
    },
    /// The TLS handshake failed (the peer, or we, refused the other's certificate).
    #[error("TLS handshake with {peer} failed: {reason}")]
    Handshake {
        /// The peer.
        peer: String,
        /// Why.
        reason: String,
    },
    /// The Infrastructure Node refused the bootstrap (policy).
    #[error("the Infrastructure Node refused the bootstrap ({status} {code}): {message}")]
    Refused {
        /// HTTP status.
        status: u16,
        /// Reason code.
        code: String,
        /// Message.
        message: String,
    },
    /// The response broke the protocol: malformed, wrong identity or FQDN, or an unwrap
    /// integrity failure (verification).
    #[error("protocol violation by the Infrastructure Node: {0}")]
    Protocol(String),
    /// The connection broke (reset, closed early) without a refusal from the peer (network).
    #[error("the connection to {peer} broke: {reason}")]
    Network {
        /// The peer.
        peer: String,
        /// What happened.
        reason: String,
    },
    /// The peer took too long (network).
    #[error("timed out {0}")]
    Timeout(String),
    /// CA layer error (root sets, identities, store).
    #[error(transparent)]
    Ca(#[from] m2mpki_ca::Error),
    /// Key error.
    #[error(transparent)]
    Key(#[from] m2mpki_hsm::Error),
    /// Credential store failure (storage). Its kind says what it means: unavailable (nothing
    /// was recorded, try again), a commit sent and not confirmed (the records may or may not
    /// be live), a corrupt record (named; trying again will not mend it), a conflict.
    #[error("credential store: {}{}", .0, unconfirmed(.0))]
    Store(m2mpki_store::Error),
    /// A file could not be read or written (storage).
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// Something that should not happen (bug).
    #[error("internal error: {0}")]
    Internal(String),
}

impl Error {
    /// Exit-code class: refused (1), bad input (2) or internal (3).
    pub fn kind(&self) -> m2mpki_ca::ErrorKind {
        use m2mpki_ca::ErrorKind as K;
        match self {
            Error::Refused { .. } | Error::Protocol(_) | Error::Handshake { .. } => K::Refused,
            Error::BadConfig { .. } => K::BadInput,
            Error::Ca(e) => e.kind(),
            Error::Key(e) if e.is_bad_input() => K::BadInput,
            Error::Store(e) if e.kind() == StoreKind::BadLocation => K::BadInput,
            Error::Key(_)
            | Error::Connect { .. }
            | Error::Listen { .. }
            | Error::Network { .. }
            | Error::Timeout(_)
            | Error::Store(_)
            | Error::Io { .. }
            | Error::Internal(_) => K::Internal,
        }
    }

    pub(crate) fn internal(e: impl std::fmt::Display) -> Self {
        Error::Internal(e.to_string())
    }

    /// The credential store cannot be reached or refused the transaction; nothing was
    /// recorded.
    pub fn unavailable(message: impl Into<String>) -> Self {
        Error::Store(m2mpki_store::Error::unavailable(message))
    }

    /// A store failure of `kind`.
    pub(crate) fn store(kind: StoreKind, message: impl Into<String>) -> Self {
        Error::Store(m2mpki_store::Error::new(kind, message))
    }

    /// A stored record cannot be read back; `message` names it.
    pub(crate) fn corrupt(message: impl Into<String>) -> Self {
        Error::Store(m2mpki_store::Error::corrupt(message))
    }

    /// A commit that was sent and not confirmed.
    pub(crate) fn commit_unknown(message: impl Into<String>) -> Self {
        Error::Store(m2mpki_store::Error::commit_unknown(message))
    }

    /// The kind of a store failure, when this is one (of the credential store, or of the CA
    /// layer's store).
    pub fn store_kind(&self) -> Option<StoreKind> {
        match self {
            Error::Store(e) => Some(e.kind()),
            Error::Ca(e) => e.store_kind(),
            _ => None,
        }
    }
}

use m2mpki_store::Kind as StoreKind;

fn unconfirmed(e: &m2mpki_store::Error) -> &'static str {
    if e.kind() == StoreKind::CommitUnknown {
        ": the store may or may not have recorded it"
    } else {
        ""
    }
}

impl From<m2mpki_store::Error> for Error {
    fn from(e: m2mpki_store::Error) -> Self {
        Error::Store(e)
    }
}

/// Lets a transaction body of the PostgreSQL store return the bootstrap's errors with `?`.
impl From<Error> for m2mpki_store::pg::Fail<Error> {
    fn from(e: Error) -> Self {
        m2mpki_store::pg::Fail::Ours(e)
    }
}
