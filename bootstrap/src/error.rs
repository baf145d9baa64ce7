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
    /// Credential store failure (storage): nothing was recorded.
    #[error("credential store: {0}")]
    Store(String),
    /// The credential store was sent a commit and did not confirm it (storage): the records
    /// may or may not be live.
    #[error("credential store: {0}: the store may or may not have recorded it")]
    CommitUnknown(String),
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
            Error::Key(_)
            | Error::Connect { .. }
            | Error::Listen { .. }
            | Error::Network { .. }
            | Error::Timeout(_)
            | Error::Store(_)
            | Error::CommitUnknown(_)
            | Error::Io { .. }
            | Error::Internal(_) => K::Internal,
        }
    }

    pub(crate) fn internal(e: impl std::fmt::Display) -> Self {
        Error::Internal(e.to_string())
    }
}
