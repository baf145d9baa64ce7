//! How an enrolment ended, for every binding and for metrics.

/// How an enrolment ended, independent of the transport; each binding maps it to its status
/// codes (HTTP, CoAP).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// A credential was issued (HTTP 200, CoAP 2.04).
    Issued,
    /// The request was malformed (400, 4.00).
    BadRequest,
    /// The policy refused the node (403, 4.03).
    Forbidden,
    /// No such resource (404, 4.04).
    NotFound,
    /// Wrong method (405, 4.05).
    MethodNotAllowed,
    /// The body is too large (413, 4.13).
    TooLarge,
    /// The body is not JSON (415, 4.15).
    UnsupportedMediaType,
    /// A rate limit of the IN was reached (429, 4.29); the answer says when to retry.
    TooManyRequests,
    /// The server failed (500, 5.00).
    Internal,
    /// The credential store cannot be reached; nothing was recorded, try again (503, 5.03).
    Unavailable,
    /// The credential store did not confirm the commit: the credential may be live; bootstrap
    /// again (503, 5.03).
    OutcomeUnknown,
}

impl Outcome {
    /// How a request that failed with `e` ends: the one place where a store failure's kind
    /// becomes a status. A store that cannot be reached is 503 (nothing was recorded, try
    /// again), a commit it did not confirm 503 with its own code, anything else (a corrupt
    /// record, a conflict, a bug) 500: trying again would not mend it.
    pub fn of_failure(e: &crate::Error) -> Outcome {
        match e.store_kind() {
            Some(m2mpki_store::Kind::CommitUnknown) => Outcome::OutcomeUnknown,
            Some(m2mpki_store::Kind::Unavailable) => Outcome::Unavailable,
            _ => Outcome::Internal,
        }
    }

    /// A short name, for metrics.
    pub fn name(self) -> &'static str {
        match self {
            Outcome::Issued => "issued",
            Outcome::BadRequest => "bad_request",
            Outcome::Forbidden => "forbidden",
            Outcome::NotFound => "not_found",
            Outcome::MethodNotAllowed => "method_not_allowed",
            Outcome::TooLarge => "too_large",
            Outcome::UnsupportedMediaType => "unsupported_media_type",
            Outcome::TooManyRequests => "rate_limited",
            Outcome::Internal => "internal",
            Outcome::Unavailable => "store_unavailable",
            Outcome::OutcomeUnknown => "store_outcome_unknown",
        }
    }

    /// The HTTP status.
    pub fn http(self) -> u16 {
        match self {
            Outcome::Issued => 200,
            Outcome::BadRequest => 400,
            Outcome::Forbidden => 403,
            Outcome::NotFound => 404,
            Outcome::MethodNotAllowed => 405,
            Outcome::TooLarge => 413,
            Outcome::UnsupportedMediaType => 415,
            Outcome::TooManyRequests => 429,
            Outcome::Internal => 500,
            Outcome::Unavailable | Outcome::OutcomeUnknown => 503,
        }
    }

    /// The CoAP response code (RFC 7252 §12.1.2), as class and detail.
    pub fn coap(self) -> (u8, u8) {
        match self {
            Outcome::Issued => (2, 4),
            Outcome::BadRequest => (4, 0),
            Outcome::Forbidden => (4, 3),
            Outcome::NotFound => (4, 4),
            Outcome::MethodNotAllowed => (4, 5),
            Outcome::TooLarge => (4, 13),
            Outcome::UnsupportedMediaType => (4, 15),
            Outcome::TooManyRequests => (4, 29),
            Outcome::Internal => (5, 0),
            Outcome::Unavailable | Outcome::OutcomeUnknown => (5, 3),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests may fail loudly

    use super::*;
    use m2mpki_store::Kind;

    /// Only a store that could not be reached, or did not confirm a commit, is answered "try
    /// again"; a corrupt record (of the credential store or of the CA layer) is 500.
    #[test]
    fn a_store_failure_is_answered_by_its_kind() {
        let cases = [
            (Kind::Unavailable, Outcome::Unavailable, 503, (5, 3)),
            (Kind::CommitUnknown, Outcome::OutcomeUnknown, 503, (5, 3)),
            (Kind::Corrupt, Outcome::Internal, 500, (5, 0)),
            (Kind::Conflict, Outcome::Internal, 500, (5, 0)),
            (Kind::NotFound, Outcome::Internal, 500, (5, 0)),
            (Kind::Bug, Outcome::Internal, 500, (5, 0)),
        ];
        for (kind, outcome, http, coap) in cases {
            let ours = crate::Error::Store(m2mpki_store::Error::new(kind, "grant of pump-1"));
            let ca = crate::Error::Ca(m2mpki_store::Error::new(kind, "x").into());
            for e in [ours, ca] {
                assert_eq!(Outcome::of_failure(&e), outcome, "{kind:?}: {e}");
                assert_eq!(Outcome::of_failure(&e).http(), http);
                assert_eq!(Outcome::of_failure(&e).coap(), coap);
            }
        }
        assert_eq!(
            Outcome::of_failure(&crate::Error::Internal("bug".into())),
            Outcome::Internal
        );
    }
}
