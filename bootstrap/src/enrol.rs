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
    /// The core of a server: `config`'s policy, lifetime and limits over `creds`, whose
    /// credentials are sealed under `store_key`; starts the credential writer.
    pub(crate) fn new(
        config: ServerConfig,
        verifier: Arc<FieldNodeVerifier>,
        creds: Arc<CredentialStore>,
        store_key: StoreKey,
        metrics: Arc<crate::metrics::Metrics>,
    ) -> Result<Self> {
        let writer = GroupCommitter::start(creds.clone())?;
        let limiter = RateLimits::new(&config.limits);
        Ok(Core {
            config,
            verifier,
            creds,
            writer,
            store_key,
            limiter,
            metrics,
        })
    }

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
        // Read here, on the worker: the PostgreSQL backend leaves the worker for it
        // (`pg::outside_runtime`, block_in_place), and a redb read is one of pages the OS
        // caches. Moving the read to tokio's blocking pool cost the IN 10 % more CPU per
        // enrolment (bench section 4, 256 clients, TLS 1.3: 616 -> 680 us, 2026-12-04).
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests may fail loudly
    //! Every branch of the enrolment core, without a socket: an admitted node is made by hand
    //! and the credential store lives in memory (or fails on purpose).

    use std::collections::BTreeSet;
    use std::path::Path;
    use std::sync::Mutex;

    use m2mpki_ca::rootset::RootSetKind;
    use m2mpki_ca::FieldNodeIdentity;
    use m2mpki_store::Kind;

    use super::*;
    use crate::credstore::{Backend, CredentialRecord, CredentialStatus, MemoryBackend, Snapshot};
    use crate::metrics::Metrics;

    const CONFIG: &str = r#"
fqdn = "in.example.net"
listen = "127.0.0.1:0"
[tls]
chain = "in.pem"
key = "in.key"
[trust]
device_sets = ["metering"]
[policy]
grants = ["weather"]
[parameters]
poa = "coap://in.example.net"
"#;

    const DEVICE: &str = "device:1.3.6.1.4.1.99999.1:METER-0001";

    /// Which store calls fail, and how.
    #[derive(Default)]
    struct Faults {
        commit: Mutex<Option<Kind>>,
        settle: Mutex<Option<Kind>>,
        grants: Mutex<Option<Kind>>,
    }

    impl Faults {
        fn check(slot: &Mutex<Option<Kind>>) -> Result<()> {
            match *slot.lock().unwrap() {
                Some(kind) => Err(Error::store(kind, "injected")),
                None => Ok(()),
            }
        }
    }

    /// The memory backend with injected failures.
    struct Failing {
        inner: MemoryBackend,
        faults: Arc<Faults>,
    }

    impl Backend for Failing {
        fn shown(&self) -> String {
            "failing memory".into()
        }
        fn commit_until(
            &self,
            records: &mut [CredentialRecord],
            deadline: Option<Instant>,
        ) -> Result<()> {
            Faults::check(&self.faults.commit)?;
            self.inner.commit_until(records, deadline)
        }
        fn settle(&self, id: &str, deadline: Option<Instant>) -> Result<bool> {
            Faults::check(&self.faults.settle)?;
            self.inner.settle(id, deadline)
        }
        fn count(&self) -> Result<u64> {
            self.inner.count()
        }
        fn credential(&self, id: &str) -> Result<Option<CredentialRecord>> {
            self.inner.credential(id)
        }
        fn live(&self, identity: &FieldNodeIdentity) -> Result<Option<CredentialRecord>> {
            self.inner.live(identity)
        }
        fn history(&self, identity: &FieldNodeIdentity) -> Result<Vec<CredentialRecord>> {
            self.inner.history(identity)
        }
        fn all_records(&self) -> Result<Vec<CredentialRecord>> {
            self.inner.all_records()
        }
        fn rewrite(&self, records: &[CredentialRecord]) -> Result<()> {
            self.inner.rewrite(records)
        }
        fn meta(&self, key: &str) -> Result<Option<String>> {
            self.inner.meta(key)
        }
        fn set_meta(&self, key: &str, value: &str) -> Result<()> {
            self.inner.set_meta(key, value)
        }
        fn meta_or_insert(&self, key: &str, value: &str) -> Result<String> {
            self.inner.meta_or_insert(key, value)
        }
        fn change_grants(
            &self,
            identity: &FieldNodeIdentity,
            change: &dyn Fn(&mut BTreeSet<String>),
        ) -> Result<Vec<String>> {
            self.inner.change_grants(identity, change)
        }
        fn grants_of(&self, identity: &FieldNodeIdentity) -> Result<Vec<String>> {
            Faults::check(&self.faults.grants)?;
            self.inner.grants_of(identity)
        }
        fn all_grants(&self) -> Result<Vec<(String, Vec<String>)>> {
            self.inner.all_grants()
        }
        fn snapshot(&self) -> Result<Snapshot> {
            self.inner.snapshot()
        }
        fn import(&self, snapshot: &Snapshot) -> Result<()> {
            self.inner.import(snapshot)
        }
    }

    struct Fixture {
        core: Core,
        faults: Arc<Faults>,
        _dir: tempfile::TempDir,
    }

    /// A core configured by [`CONFIG`] plus `extra` (TOML tables), over a memory store.
    fn core(extra: &str) -> Fixture {
        core_from(&format!("{CONFIG}{extra}"))
    }

    /// A core configured by `config`, over a memory store.
    fn core_from(config: &str) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let config = ServerConfig::parse(config, Path::new("/etc")).unwrap();
        let faults = Arc::new(Faults::default());
        let creds = Arc::new(CredentialStore::on(Box::new(Failing {
            inner: MemoryBackend::default(),
            faults: faults.clone(),
        })));
        let store_key = StoreKey::load(
            &m2mpki_hsm::KeyRef::File(dir.path().join("store.key")),
            &m2mpki_hsm::Keystore::new(None),
        )
        .unwrap();
        let verifier = Arc::new(FieldNodeVerifier::new(
            vec![],
            Arc::new(rustls::crypto::aws_lc_rs::default_provider()),
        ));
        let core = Core::new(config, verifier, creds, store_key, Arc::new(Metrics::new())).unwrap();
        Fixture {
            core,
            faults,
            _dir: dir,
        }
    }

    /// A node of the `metering` device set, admitted from `peer`.
    fn node(identity: Option<&str>, peer: &str) -> Admitted {
        Admitted {
            wrap_key: WrapKey::new([7; 32]),
            verified: Verified {
                set: "metering".into(),
                kind: RootSetKind::Device {
                    vertical: "smart-metering".into(),
                },
                identity: identity.map(|i| i.parse().unwrap()),
                subject: "CN=METER-0001".into(),
                serial: "01".into(),
                sha256: "ab".repeat(32),
                anchor: "cd".repeat(32),
            },
            peer: peer.parse().unwrap(),
            transport: "TLSv1_3".into(),
            ts0003: Ts0003Keys::from_export(&[9; 48]),
        }
    }

    fn device() -> Admitted {
        node(Some(DEVICE), "192.0.2.1:40000")
    }

    /// The error code of a refusal, after checking that the document is the §5 one.
    fn code(answer: &Answer) -> String {
        let doc: protocol::ErrorBody = serde_json::from_slice(&answer.body).unwrap();
        assert!(!doc.error.message.is_empty());
        doc.error.code
    }

    fn issued(answer: &Answer) -> BootstrapResponse {
        assert_eq!(
            answer.outcome,
            Outcome::Issued,
            "{}",
            String::from_utf8_lossy(&answer.body)
        );
        serde_json::from_slice(&answer.body).unwrap()
    }

    fn count(f: &Fixture) -> u64 {
        f.core.creds.count().unwrap()
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn version_1_records_a_sealed_credential_and_sends_it_wrapped() {
        let f = core("");
        let node = device();
        let doc = issued(&f.core.answer(&node, br#"{"version": 1}"#).await);
        assert_eq!(doc.version, 1);
        assert_eq!(doc.wrap_algorithm.as_deref(), Some(WRAP_ALGORITHM));
        assert_eq!(doc.ke_id, None);
        assert_eq!(doc.identity.to_string(), DEVICE);
        assert_eq!(doc.admitted_by.set, "metering");
        assert_eq!(doc.grants, vec!["weather".to_owned()]);
        assert_eq!(doc.parameters["poa"], "coap://in.example.net");
        assert_eq!(doc.in_fqdn, "in.example.net");
        let wrapped = base64::engine::general_purpose::STANDARD
            .decode(doc.wrapped_credential.unwrap())
            .unwrap();
        let sent = protocol::unwrap(&node.wrap_key, &wrapped).unwrap();
        let record = f
            .core
            .creds
            .live(&DEVICE.parse().unwrap())
            .unwrap()
            .unwrap();
        assert_eq!(record.id, doc.credential_id);
        assert_eq!(record.client_cert_sha256, node.verified.sha256);
        let stored = f.core.creds.unseal(&f.core.store_key, &record).unwrap();
        assert_eq!(stored.expose(), sent.expose());
        assert_eq!(f.core.writer.commits(), 1);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn version_2_records_ke_under_its_ke_id_and_sends_no_credential() {
        let f = core("");
        let node = device();
        let doc = issued(&f.core.answer(&node, br#"{"version": 2}"#).await);
        let ke_id = node.ts0003.ke_id("in.example.net");
        assert_eq!(ke_id, format!("{}@in.example.net", "09".repeat(16)));
        assert_eq!(doc.version, 2);
        assert_eq!(doc.ke_id.as_deref(), Some(ke_id.as_str()));
        assert_eq!(doc.credential_id, ke_id);
        assert_eq!(doc.wrapped_credential, None);
        assert_eq!(doc.wrap_algorithm, None);
        let record = f.core.creds.credential(&ke_id).unwrap().unwrap();
        let stored = f.core.creds.unseal(&f.core.store_key, &record).unwrap();
        assert_eq!(stored.expose(), &[9; 32]);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_second_bootstrap_supersedes_the_first() {
        let f = core("");
        let first = issued(&f.core.answer(&device(), br#"{"version": 1}"#).await);
        let second = issued(&f.core.answer(&device(), br#"{"version": 1}"#).await);
        assert_ne!(first.credential_id, second.credential_id);
        let history = f.core.creds.history(&DEVICE.parse().unwrap()).unwrap();
        assert_eq!(history.len(), 2);
        let old = history
            .iter()
            .find(|r| r.id == first.credential_id)
            .unwrap();
        let new = history
            .iter()
            .find(|r| r.id == second.credential_id)
            .unwrap();
        assert_eq!(old.status, CredentialStatus::Superseded);
        assert_eq!(new.status, CredentialStatus::Live);
        assert_eq!(
            new.supersedes.as_deref(),
            Some(first.credential_id.as_str())
        );
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_body_that_is_not_a_request_object_is_refused_and_records_nothing() {
        let f = core("");
        let cases: [(&[u8], &str); 8] = [
            (b"", "bad_request"),
            (b"not json", "bad_request"),
            (b"[1]", "bad_request"),
            (b"{}", "bad_request"),
            (br#"{"version": "1"}"#, "bad_request"),
            (br#"{"version": 1, "extra": true}"#, "bad_request"),
            (br#"{"version": 3}"#, "unsupported_version"),
            (br#"{"version": 0}"#, "unsupported_version"),
        ];
        for (body, want) in cases {
            let answer = f.core.answer(&device(), body).await;
            let shown = String::from_utf8_lossy(body);
            assert_eq!(answer.outcome, Outcome::BadRequest, "{shown}");
            assert_eq!(code(&answer), want, "{shown}");
            assert_eq!(answer.retry_after, None);
        }
        assert_eq!(count(&f), 0);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_version_the_configuration_leaves_out_is_refused() {
        let f = core("[protocol]\nversions = [1]\n");
        let answer = f.core.answer(&device(), br#"{"version": 2}"#).await;
        assert_eq!(answer.outcome, Outcome::BadRequest);
        assert_eq!(code(&answer), "unsupported_version");
        issued(&f.core.answer(&device(), br#"{"version": 1}"#).await);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_body_over_the_limit_is_refused_before_it_is_parsed() {
        let f = core("[limits]\nmax_body = 1024\n");
        let mut body = br#"{"version": 1}"#.to_vec();
        body.resize(1024, b' ');
        issued(&f.core.answer(&device(), &body).await);
        body.push(b' ');
        let answer = f.core.answer(&device(), &body).await;
        assert_eq!(answer.outcome, Outcome::TooLarge);
        assert_eq!(code(&answer), "body_too_large");
        assert_eq!(count(&f), 1);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn default_deny_admits_only_a_node_with_technician_grants() {
        let f = core_from(&CONFIG.replace("[policy]\n", "[policy]\ndefault = \"deny\"\n"));
        let answer = f.core.answer(&device(), br#"{"version": 1}"#).await;
        assert_eq!(answer.outcome, Outcome::Forbidden);
        assert_eq!(code(&answer), "denied_by_policy");
        assert_eq!(count(&f), 0);
        f.core
            .creds
            .grant(&DEVICE.parse().unwrap(), &["meter".to_owned()])
            .unwrap();
        let doc = issued(&f.core.answer(&device(), br#"{"version": 1}"#).await);
        // Default deny: the default grants are not added to the technician's.
        assert_eq!(doc.grants, vec!["meter".to_owned()]);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn technician_grants_are_added_to_the_default_ones() {
        let f = core("");
        f.core
            .creds
            .grant(&DEVICE.parse().unwrap(), &["meter".to_owned()])
            .unwrap();
        let doc = issued(&f.core.answer(&device(), br#"{"version": 1}"#).await);
        assert_eq!(doc.grants, vec!["meter".to_owned(), "weather".to_owned()]);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn rate_limits_refuse_with_a_retry_after_and_record_nothing() {
        let f = core(
            "[limits]\nenrolments_per_identity = \"1/1h\"\nenrolments_per_address = \"3/1h\"\n",
        );
        issued(&f.core.answer(&device(), br#"{"version": 1}"#).await);
        let again = f.core.answer(&device(), br#"{"version": 1}"#).await;
        assert_eq!(again.outcome, Outcome::TooManyRequests);
        assert_eq!(code(&again), "rate_limited");
        let wait = again.retry_after.unwrap();
        assert!((1..=3600).contains(&wait), "{wait}");
        // The refused attempt took one of the address's three; another identity from the
        // same address has the third...
        let other = "device:1.3.6.1.4.1.99999.1:METER-0002";
        issued(
            &f.core
                .answer(&node(Some(other), "192.0.2.1:40001"), br#"{"version": 1}"#)
                .await,
        );
        // ...and then the address is spent for every identity.
        let third = "device:1.3.6.1.4.1.99999.1:METER-0003";
        let spent = f
            .core
            .answer(&node(Some(third), "192.0.2.1:40002"), br#"{"version": 1}"#)
            .await;
        assert_eq!(spent.outcome, Outcome::TooManyRequests);
        // Another address is not.
        issued(
            &f.core
                .answer(&node(Some(third), "192.0.2.2:40000"), br#"{"version": 1}"#)
                .await,
        );
        assert_eq!(count(&f), 3);
        // A refused node's body is not even looked at.
        let unread = f.core.answer(&device(), b"not json").await;
        assert_eq!(unread.outcome, Outcome::TooManyRequests);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn an_admitted_node_without_an_identity_is_an_internal_error() {
        let f = core("");
        let answer = f
            .core
            .answer(&node(None, "192.0.2.1:40000"), br#"{"version": 1}"#)
            .await;
        assert_eq!(answer.outcome, Outcome::Internal);
        assert_eq!(code(&answer), "internal");
        assert_eq!(answer.retry_after, None);
        assert_eq!(count(&f), 0);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_store_failure_is_answered_by_its_kind_and_records_nothing() {
        // (commit fails with, settle fails with, grants fail with) → (outcome, code, retry).
        type Case = (
            Option<Kind>,
            Option<Kind>,
            Option<Kind>,
            Outcome,
            &'static str,
            Option<u32>,
        );
        let cases: [Case; 6] = [
            (
                Some(Kind::Unavailable),
                None,
                None,
                Outcome::Unavailable,
                "store_unavailable",
                Some(STORE_RETRY_AFTER),
            ),
            // Unconfirmed, and a fresh read finds nothing: known not stored.
            (
                Some(Kind::CommitUnknown),
                None,
                None,
                Outcome::Unavailable,
                "store_unavailable",
                Some(STORE_RETRY_AFTER),
            ),
            // Unconfirmed, and the store cannot say.
            (
                Some(Kind::CommitUnknown),
                Some(Kind::Unavailable),
                None,
                Outcome::OutcomeUnknown,
                "store_outcome_unknown",
                Some(STORE_RETRY_AFTER),
            ),
            (
                Some(Kind::Corrupt),
                None,
                None,
                Outcome::Internal,
                "internal",
                None,
            ),
            (
                None,
                None,
                Some(Kind::Unavailable),
                Outcome::Unavailable,
                "store_unavailable",
                Some(STORE_RETRY_AFTER),
            ),
            // A grant record that does not read back is not "try again".
            (
                None,
                None,
                Some(Kind::Corrupt),
                Outcome::Internal,
                "internal",
                None,
            ),
        ];
        for (commit, settle, grants, outcome, want, retry) in cases {
            let f = core("");
            *f.faults.commit.lock().unwrap() = commit;
            *f.faults.settle.lock().unwrap() = settle;
            *f.faults.grants.lock().unwrap() = grants;
            let case = format!("commit {commit:?}, settle {settle:?}, grants {grants:?}");
            let answer = f.core.answer(&device(), br#"{"version": 1}"#).await;
            assert_eq!(answer.outcome, outcome, "{case}");
            assert_eq!(code(&answer), want, "{case}");
            assert_eq!(answer.retry_after, retry, "{case}");
            assert_eq!(count(&f), 0, "{case}");
            // The writer survives the failure: the next enrolment is stored.
            *f.faults.commit.lock().unwrap() = None;
            *f.faults.settle.lock().unwrap() = None;
            *f.faults.grants.lock().unwrap() = None;
            issued(&f.core.answer(&device(), br#"{"version": 1}"#).await);
        }
    }
}
