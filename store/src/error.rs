//! The store error: what failed, and of which kind, so that callers decide by the kind (try
//! again, or not) and never by the message.

/// Result alias of the store plumbing.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// How a store failed: what a caller may do about it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Kind {
    /// The store cannot be reached or refused the transaction (a database down, a full disk,
    /// a deadline passed): nothing was recorded; trying again later may succeed.
    Unavailable,
    /// The change conflicts with what is stored (a record written by another process first,
    /// a store that is not empty when it must be).
    Conflict,
    /// A stored record cannot be read back (damaged, altered by hand, written by a newer
    /// version): trying again will not mend it; the message names the record.
    Corrupt,
    /// A record the change needs is not there.
    NotFound,
    /// A commit was sent and its answer never came: the store may or may not hold it.
    CommitUnknown,
    /// The store's location is malformed (a bad URL or TLS setting): bad input.
    BadLocation,
    /// Something that should not happen (a bug, a runtime that cannot be made).
    Bug,
}

impl Kind {
    /// Whether trying again later may succeed (the answer to a client: 503 rather than 500).
    pub fn is_transient(self) -> bool {
        matches!(self, Kind::Unavailable | Kind::CommitUnknown)
    }
}

/// A store failure: its kind and a message that names the store (never a password) and, for
/// a database error, its SQLSTATE.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct Error {
    kind: Kind,
    message: String,
}

impl Error {
    /// An error of `kind`.
    pub fn new(kind: Kind, message: impl Into<String>) -> Self {
        Error {
            kind,
            message: message.into(),
        }
    }

    /// The store cannot be reached; nothing was recorded.
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(Kind::Unavailable, message)
    }

    /// A stored record cannot be read back; `message` names it.
    pub fn corrupt(message: impl Into<String>) -> Self {
        Self::new(Kind::Corrupt, message)
    }

    /// A commit that was sent and not confirmed.
    pub fn commit_unknown(message: impl Into<String>) -> Self {
        Self::new(Kind::CommitUnknown, message)
    }

    /// Its kind.
    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// Its message.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The same error with `context: ` before its message.
    pub fn context(self, context: impl std::fmt::Display) -> Self {
        Error {
            kind: self.kind,
            message: format!("{context}: {}", self.message),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests may fail loudly

    use super::*;

    #[test]
    fn only_an_unreachable_store_or_an_unknown_commit_is_worth_trying_again() {
        let transient: Vec<Kind> = [
            Kind::Unavailable,
            Kind::Conflict,
            Kind::Corrupt,
            Kind::NotFound,
            Kind::CommitUnknown,
            Kind::BadLocation,
            Kind::Bug,
        ]
        .into_iter()
        .filter(|k| k.is_transient())
        .collect();
        assert_eq!(transient, [Kind::Unavailable, Kind::CommitUnknown]);
    }

    #[test]
    fn context_keeps_the_kind() {
        let e = Error::corrupt("row 7").context("credential store");
        assert_eq!(e.kind(), Kind::Corrupt);
        assert_eq!(e.to_string(), "credential store: row 7");
    }
}
