//! The enrolment core, free of any transport: from an admitted field node (identity from its
//! verified chain, the key both ends exported) and a request body to the answer document. TLS
//! with HTTP ([`crate::server`]) and DTLS with CoAP ([`crate::dtls`]) are two thin bindings on
//! it; what they share is decided and recorded here once.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use m2mpki_ca::verify::Verified;

use crate::config::ServerConfig;
use crate::credstore::{CredentialStore, GroupCommitter, NewCredential, StoreKey};
pub use crate::outcome::Outcome;
use crate::protocol::{
    self, Admission, BootstrapRequest, BootstrapResponse, Ts0003Keys, WrapKey, VERSION,
    VERSION_TS0003, WRAP_ALGORITHM,
};
use crate::ratelimit::Buckets;
use crate::tls::FieldNodeVerifier;
use crate::{Error, Result};

/// The Retry-After (Max-Age) of a 503 while the credential store is unreachable, in seconds.
const STORE_RETRY_AFTER: u32 = 2;

/// How long an enrolment may wait for the credential store, from the request: well inside a
/// node's usual timeout (the client's default is 30 s), so that the node gets the 503 rather
/// than a broken connection, and nothing is stored after that answer.
pub const STORE_DEADLINE: Duration = Duration::from_secs(10);

/// An answer: the outcome and the JSON document (the response, or the error document of
/// docs/protocol.md §5).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// How it ended.
    pub outcome: Outcome,
    /// The JSON body.
    pub body: Vec<u8>,
    /// When a rate-limited node may try again, in whole seconds (HTTP `Retry-After`, CoAP
    /// `Max-Age` with 4.29, RFC 8516).
    pub retry_after: Option<u32>,
}

impl Answer {
    /// A refusal with its error document.
    pub fn refusal(outcome: Outcome, code: &str, message: impl Into<String>) -> Self {
        Answer {
            outcome,
            body: m2mpki_connection::http::error_document(code, &message.into()),
            retry_after: None,
        }
    }

    /// A rate-limit refusal: retry after `wait` (rounded up to whole seconds, at least 1).
    pub fn rate_limited(message: String, wait: Duration) -> Self {
        let secs = wait.as_secs_f64().ceil().clamp(1.0, f64::from(u32::MAX)) as u32;
        Answer {
            retry_after: Some(secs),
            ..Answer::refusal(Outcome::TooManyRequests, "rate_limited", message)
        }
    }
}

/// The IN's enrolment rate limits (`[limits] enrolments_per_address`,
/// `enrolments_per_identity`).
#[derive(Debug)]
pub struct RateLimits {
    address: Option<Buckets<IpAddr>>,
    identity: Option<Buckets<String>>,
}

impl RateLimits {
    /// The limits a configuration asks for.
    pub fn new(limits: &crate::config::Limits) -> Self {
        RateLimits {
            address: limits.enrolments_per_address.map(Buckets::new),
            identity: limits.enrolments_per_identity.map(Buckets::new),
        }
    }

    /// Takes one enrolment from the node's address and identity buckets: `None` when both
    /// had one, else the refusal.
    fn check(&self, node: &Admitted) -> Option<Answer> {
        let now = Instant::now();
        if let Some(b) = &self.address {
            if let Err(wait) = b.take(&node.peer.ip(), now) {
                tracing::warn!(peer = %node.peer, "enrolment refused: address rate limit");
                return Some(Answer::rate_limited(
                    format!("too many enrolments from {}", node.peer.ip()),
                    wait,
                ));
            }
        }
        if let (Some(b), Some(identity)) = (&self.identity, &node.verified.identity) {
            if let Err(wait) = b.take(&identity.to_string(), now) {
                tracing::warn!(peer = %node.peer, %identity, "enrolment refused: identity rate limit");
                return Some(Answer::rate_limited(
                    format!("too many enrolments of {identity}"),
                    wait,
                ));
            }
        }
        None
    }
}

/// A field node that completed the handshake: what the transport learned.
pub struct Admitted {
    /// RootCredentialWrapKey, exported from the session.
    pub wrap_key: WrapKey,
    /// The verified chain: identity, the set that admitted it, the leaf's hash.
    pub verified: Verified,
    /// Its address.
    pub peer: SocketAddr,
    /// The protocol, for logs (`TLSv1_3`, `DTLSv1_2`).
    pub transport: String,
    /// The TS-0003 export (protocol version 2) of the same session (every transport makes it).
    pub ts0003: Ts0003Keys,
}

impl Admitted {
    /// What a completed handshake on any stack becomes: its chain verdict (`None` when the
    /// chain check never ran) and both exports of the session. A refusal, a missing verdict
    /// or a failed export is logged and admits nothing (the connection is then closed).
    pub(crate) fn after_handshake(
        peer: SocketAddr,
        transport: String,
        verdict: Option<std::result::Result<Verified, m2mpki_ca::verify::Refusal>>,
        exports: Result<(WrapKey, Ts0003Keys)>,
    ) -> Option<Self> {
        let verified = match verdict {
            Some(Ok(v)) => v,
            Some(Err(r)) => {
                tracing::warn!(%peer, %transport, code = r.code(), "refused after the handshake");
                return None;
            }
            None => {
                tracing::warn!(%peer, %transport, "handshake completed without our chain check; refused");
                return None;
            }
        };
        let (wrap_key, ts0003) = match exports {
            Ok(keys) => keys,
            Err(e) => {
                tracing::warn!(%peer, %transport, error = %e, "exporter failed");
                return None;
            }
        };
        Some(Admitted {
            wrap_key,
            verified,
            peer,
            transport,
            ts0003,
        })
    }
}

/// What every transport shares: the configuration, the verifier, the credential store with
/// its writer and key.
pub struct Core {
    pub(crate) config: ServerConfig,
    pub(crate) verifier: Arc<FieldNodeVerifier>,
    pub(crate) creds: Arc<CredentialStore>,
    pub(crate) writer: GroupCommitter,
    pub(crate) store_key: StoreKey,
    pub(crate) limiter: RateLimits,
    pub(crate) metrics: Arc<crate::metrics::Metrics>,
}

impl Core {
    /// Answers a bootstrap request body from an admitted node: the body must be a JSON object
    /// of this protocol version; then the policy decides, and a fresh credential is recorded
    /// (sealed, group-committed) before it is wrapped and returned.
    pub async fn answer(&self, node: &Admitted, body: &[u8]) -> Answer {
        if let Some(refusal) = self.rate_limited(node) {
            return refusal;
        }
        self.answer_within_limits(node, body).await
    }

    /// The rate limits' refusal of a request of `node`, if they refuse it (counted as an
    /// answered enrolment). A binding that reads a body calls this first, so that a refused
    /// node's body is never read (docs/protocol.md, the server configuration), then
    /// [`answer_within_limits`](Self::answer_within_limits).
    pub(crate) fn rate_limited(&self, node: &Admitted) -> Option<Answer> {
        let refusal = self.limiter.check(node)?;
        self.metrics
            .enrolment(refusal.outcome, &node.transport, Duration::ZERO);
        Some(refusal)
    }

    /// [`answer`](Self::answer) for a request that [`rate_limited`](Self::rate_limited) let
    /// through.
    pub(crate) async fn answer_within_limits(&self, node: &Admitted, body: &[u8]) -> Answer {
        let start = Instant::now();
        let answer = self.answer_uncounted(node, body).await;
        self.metrics
            .enrolment(answer.outcome, &node.transport, start.elapsed());
        answer
    }

    async fn answer_uncounted(&self, node: &Admitted, body: &[u8]) -> Answer {
        if body.len() > self.config.limits.max_body {
            return Answer::refusal(
                Outcome::TooLarge,
                "body_too_large",
                format!(
                    "the body may have at most {} bytes",
                    self.config.limits.max_body
                ),
            );
        }
        // An object, and nothing else: serde would read a struct from a JSON array too.
        let object: serde_json::Map<String, serde_json::Value> = match serde_json::from_slice(body)
        {
            Ok(o) => o,
            Err(e) => {
                return Answer::refusal(
                    Outcome::BadRequest,
                    "bad_request",
                    format!("the body must be a JSON object: {e}"),
                )
            }
        };
        let request: BootstrapRequest = match serde_json::from_value(object.into()) {
            Ok(r) => r,
            Err(e) => {
                return Answer::refusal(
                    Outcome::BadRequest,
                    "bad_request",
                    format!("malformed request: {e}"),
                )
            }
        };
        let allowed = &self.config.protocol_versions;
        if !allowed.contains(&request.version) {
            let list: Vec<String> = allowed.iter().map(u32::to_string).collect();
            return Answer::refusal(
                Outcome::BadRequest,
                "unsupported_version",
                format!("this server speaks version {}", list.join(" and ")),
            );
        }
        let ts0003 = (request.version == VERSION_TS0003).then_some(&node.ts0003);
        let deadline = Instant::now() + STORE_DEADLINE;
        match self.issue(node, ts0003, deadline).await {
            Ok(a) => a,
            Err(e) => self.failed(node, &e),
        }
    }

    /// The answer to a bootstrap that failed with `e` (logged with what failed: a corrupt
    /// record is named, never answered "try again").
    fn failed(&self, node: &Admitted, e: &Error) -> Answer {
        match Outcome::of_failure(e) {
            Outcome::OutcomeUnknown => {
                tracing::error!(peer = %node.peer, error = %e, "bootstrap answered 503: the credential store did not confirm the commit");
                Answer {
                    retry_after: Some(STORE_RETRY_AFTER),
                    ..Answer::refusal(
                        Outcome::OutcomeUnknown,
                        "store_outcome_unknown",
                        "the IN's credential store did not confirm the new credential, which may be live without having reached you; bootstrap again (the new credential replaces it)",
                    )
                }
            }
            Outcome::Unavailable => {
                tracing::error!(peer = %node.peer, error = %e, "bootstrap refused: the credential store is unavailable");
                Answer {
                    retry_after: Some(STORE_RETRY_AFTER),
                    ..Answer::refusal(
                        Outcome::Unavailable,
                        "store_unavailable",
                        "the IN cannot reach its credential store; nothing was recorded, try again later",
                    )
                }
            }
            _ => {
                tracing::error!(peer = %node.peer, error = %e, "bootstrap failed");
                Answer::refusal(
                    Outcome::Internal,
                    "internal",
                    "the server could not complete the bootstrap",
                )
            }
        }
    }

    /// Records and answers an enrolment: version 1 makes a fresh credential and wraps it;
    /// version 2 (`ts0003`) records Ke, which both ends derived, under its KeID.
    async fn issue(
        &self,
        node: &Admitted,
        ts0003: Option<&Ts0003Keys>,
        deadline: Instant,
    ) -> Result<Answer> {
        let identity = node
            .verified
            .identity
            .clone()
            .ok_or_else(|| Error::internal("admitted certificate without identity"))?;
        let admitted_by = Admission {
            set: node.verified.set.clone(),
            kind: node.verified.kind.clone(),
        };
        let Some(grants) = self
            .creds
            .effective_grants(&self.config.policy, &identity)?
        else {
            tracing::info!(%identity, set = %admitted_by.set, "refused by policy");
            return Ok(Answer::refusal(
                Outcome::Forbidden,
                "denied_by_policy",
                format!("{identity} is authenticated but the IN's policy admits only field nodes with technician grants"),
            ));
        };
        let now = time::OffsetDateTime::now_utc();
        let now = now.replace_nanosecond(0).unwrap_or(now);
        let expires = self.config.lifetime.not_after(now);
        let new = NewCredential {
            identity: &identity,
            admitted_by: &admitted_by,
            client_cert_sha256: &node.verified.sha256,
            expires: expires.unix_timestamp(),
        };
        let fqdn = self.config.fqdn.as_str();
        let (record, wrapped, ke_id, version) = match ts0003 {
            None => {
                let (record, credential) = CredentialStore::prepare(&self.store_key, new)?;
                let wrapped = protocol::wrap(&node.wrap_key, &credential)?;
                let b64 = base64::engine::general_purpose::STANDARD.encode(wrapped);
                (record, Some(b64), None, VERSION)
            }
            Some(k) => {
                let ke_id = k.ke_id(fqdn);
                let record =
                    CredentialStore::prepare_known(&self.store_key, new, ke_id.clone(), k.ke())?;
                (record, None, Some(ke_id), VERSION_TS0003)
            }
        };
        let committing = Instant::now();
        let record = self.writer.commit(record, deadline).await?;
        self.metrics.commit(committing.elapsed());
        tracing::info!(%identity, set = %admitted_by.set, credential_id = %record.id, version, transport = %node.transport, peer = %node.peer, "issued a root credential");
        let doc = BootstrapResponse {
            version,
            credential_id: record.id,
            wrap_algorithm: wrapped.as_ref().map(|_| WRAP_ALGORITHM.to_owned()),
            wrapped_credential: wrapped,
            ke_id,
            in_fqdn: self.config.fqdn.to_string(),
            identity: identity.clone(),
            admitted_by,
            expires: m2mpki_ca::validity::format_time(expires),
            grants,
            parameters: self.config.parameters.clone(),
        };
        Ok(Answer {
            outcome: Outcome::Issued,
            body: serde_json::to_vec(&doc).map_err(Error::internal)?,
            retry_after: None,
        })
    }
}

impl crate::metrics::Gauges for Core {
    fn credentials(&self) -> Option<u64> {
        self.creds.count().ok()
    }

    fn trusted_sets(&self) -> Arc<Vec<m2mpki_ca::verify::TrustedSet>> {
        self.verifier.sets()
    }
}
