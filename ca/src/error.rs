use std::path::PathBuf;

/// Result alias for this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// How the command line should treat an error: the documented exit codes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// Refused by policy or verification (exit 1).
    Refused,
    /// Bad usage or bad input (exit 2).
    BadInput,
    /// Internal, storage or HSM failure (exit 3).
    Internal,
}

/// Everything that can go wrong in the CA.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A value given by the user is malformed (bad input).
    #[error("invalid {what} `{value}`: {reason}")]
    InvalidValue {
        /// Which kind of value (e.g. "pre-provisioned ID").
        what: &'static str,
        /// The value as given (never a secret).
        value: String,
        /// What is wrong.
        reason: String,
    },
    /// An input file is unreadable or malformed (bad input).
    #[error("{}: {reason}", path.display())]
    BadFile {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A CSR failed to parse or its self-signature does not verify (bad input).
    #[error("CSR {source_name}: {reason}")]
    BadCsr {
        /// Where the CSR came from (a path).
        source_name: String,
        /// What is wrong with it.
        reason: String,
    },
    /// No CA with that name (bad input).
    #[error("no CA named `{0}` (see `m2mpki ca list`)")]
    UnknownCa(String),
    /// A CA with that name exists already (bad input).
    #[error("a CA named `{0}` exists already")]
    CaExists(String),
    /// No certificate matched (bad input).
    #[error("no certificate {0}")]
    CertNotFound(String),
    /// The request breaks the certificate profile or CA policy (policy refusal).
    #[error("refused by policy: {0}")]
    Policy(String),
    /// The identity already holds a live certificate (policy refusal).
    #[error("{identity} already has a live certificate from CA `{ca}` (serial {serial}); use --reissue to issue another")]
    AlreadyIssued {
        /// CA name.
        ca: String,
        /// Whose certificate it is (a [`crate::SubjectKey`] as text: the error module holds
        /// no domain type, whose parsers return this error).
        identity: String,
        /// Serial of the live certificate (hex).
        serial: String,
    },
    /// A certificate carries no readable field-node identity (verification refusal).
    #[error("no field-node identity in certificate: {0}")]
    NoIdentity(String),
    /// A certificate chain was refused by verification (verification refusal).
    #[error("not trusted: {0}")]
    NotTrusted(crate::refusal::Refusal),
    /// No root set with that name (bad input).
    #[error("no root set named `{0}` (see `m2mpki roots list`)")]
    UnknownRootSet(String),
    /// A root set with that name exists already (bad input).
    #[error("a root set named `{0}` exists already")]
    RootSetExists(String),
    /// The audit log's hash chain is broken (verification refusal).
    #[error("audit log broken at entry {seq}: {reason}")]
    AuditBroken {
        /// The first bad entry.
        seq: u64,
        /// What is wrong with it.
        reason: String,
    },
    /// The ledger and the audit log disagree (verification refusal): a record was changed
    /// after it was logged, or a copy was taken across a commit.
    #[error("the ledger and the audit log differ in {differences} place(s): {}", findings.join("; "))]
    LedgerDiffers {
        /// How many differences.
        differences: u64,
        /// The first ones, one sentence each.
        findings: Vec<String>,
    },
    /// Key loading, generation or signing failed (HSM / key failure or bad key input).
    #[error(transparent)]
    Key(#[from] m2mpki_hsm::Error),
    /// The store is held by another process (storage).
    #[error("the store {} is in use by another m2mpki process", .0.display())]
    StoreLocked(PathBuf),
    /// The store failed (storage); its kind says whether trying again may help.
    #[error("store: {0}")]
    Store(m2mpki_store::Error),
    /// A commit was sent and its answer never came: the store may or may not have recorded
    /// the change (storage). The next read on a fresh connection tells which.
    #[error("store: {why}: the store may or may not have recorded it{}", check_hint(.check))]
    CommitUnknown {
        /// What happened.
        why: String,
        /// The command that shows whether it was recorded, when one is known.
        check: Option<String>,
    },
    /// A file could not be read or written (storage).
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A batch found key files in its output folder that are not their certificate's key
    /// (bad input): those certificates were not written; the report says what the batch did
    /// and lists each one.
    #[error("{}", key_mismatches(.0))]
    KeyMismatches(Box<crate::batch_report::BatchReport>),
    /// Certificate generation failed inside rcgen or a record is corrupt (bug).
    #[error("internal error: {0}")]
    Internal(String),
}

fn key_mismatches(report: &crate::batch_report::BatchReport) -> String {
    let n = report.key_mismatches.len();
    match report.key_mismatches.first() {
        Some(first) => format!(
            "{}: {n} key file(s) in the output folder are not their certificate's key, first for \
             ID `{}` ({}); those certificates were not written: move the foreign key files away \
             and run the batch again",
            first.key_file.display(),
            first.id,
            first.reason
        ),
        None => "a batch reported key mismatches without naming one".into(),
    }
}

fn check_hint(check: &Option<String>) -> String {
    check
        .as_ref()
        .map(|c| format!("; run `{c}` to see"))
        .unwrap_or_default()
}

impl Error {
    /// The exit-code class of this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Policy(_)
            | Error::AlreadyIssued { .. }
            | Error::NoIdentity(_)
            | Error::NotTrusted(_)
            | Error::AuditBroken { .. }
            | Error::LedgerDiffers { .. } => ErrorKind::Refused,
            Error::InvalidValue { .. }
            | Error::BadFile { .. }
            | Error::BadCsr { .. }
            | Error::UnknownCa(_)
            | Error::CaExists(_)
            | Error::UnknownRootSet(_)
            | Error::RootSetExists(_)
            | Error::CertNotFound(_)
            | Error::KeyMismatches(_) => ErrorKind::BadInput,
            Error::Key(e) if e.is_bad_input() => ErrorKind::BadInput,
            Error::Store(e) if e.kind() == m2mpki_store::Kind::BadLocation => ErrorKind::BadInput,
            Error::Key(_)
            | Error::StoreLocked(_)
            | Error::Store(_)
            | Error::CommitUnknown { .. }
            | Error::Io { .. }
            | Error::Internal(_) => ErrorKind::Internal,
        }
    }

    /// A bad-input error for `value` (cut to 200 characters).
    pub fn invalid(what: &'static str, value: &str, reason: impl Into<String>) -> Self {
        Error::InvalidValue {
            what,
            value: value.chars().take(200).collect(),
            reason: reason.into(),
        }
    }

    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    /// A commit whose outcome is unknown, without a command to check it yet.
    pub fn commit_unknown(why: impl Into<String>) -> Self {
        Error::CommitUnknown {
            why: why.into(),
            check: None,
        }
    }

    pub(crate) fn internal(e: impl std::fmt::Display) -> Self {
        Error::Internal(e.to_string())
    }

    /// The store cannot be reached or refused the transaction; nothing was recorded.
    pub fn unavailable(message: impl Into<String>) -> Self {
        Error::Store(m2mpki_store::Error::unavailable(message))
    }

    /// A stored record cannot be read back; `message` names it.
    pub fn corrupt(message: impl Into<String>) -> Self {
        Error::Store(m2mpki_store::Error::corrupt(message))
    }

    /// The store's error, when this is one.
    pub fn store_kind(&self) -> Option<m2mpki_store::Kind> {
        match self {
            Error::Store(e) => Some(e.kind()),
            Error::CommitUnknown { .. } => Some(m2mpki_store::Kind::CommitUnknown),
            Error::StoreLocked(_) => Some(m2mpki_store::Kind::Unavailable),
            _ => None,
        }
    }
}

/// A store error as the CA's: an unconfirmed commit becomes [`Error::CommitUnknown`] (which
/// the CA completes with the command that tells), everything else [`Error::Store`].
impl From<m2mpki_store::Error> for Error {
    fn from(e: m2mpki_store::Error) -> Self {
        match e.kind() {
            m2mpki_store::Kind::CommitUnknown => Error::commit_unknown(e.message()),
            _ => Error::Store(e),
        }
    }
}

/// Lets a transaction body of the PostgreSQL store return the CA's errors with `?`.
impl From<Error> for m2mpki_store::pg::Fail<Error> {
    fn from(e: Error) -> Self {
        m2mpki_store::pg::Fail::Ours(e)
    }
}
