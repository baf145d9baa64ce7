//! Prometheus metrics of the IN (`[metrics] listen`, off by default): enrolments by outcome
//! and transport, refusals by reason, enrolment and commit latency, open connections, the
//! credential store's size and the age of each trusted root set's newest CRL. Served as
//! OpenMetrics text on `GET /metrics` of a plain-HTTP listener of its own: bind it to a
//! management address, it carries no secrets but tells who enrols how often.

use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::http::request::Parts;
use hyper::{Method, Response};
use m2mpki_connection::http::{Answering, Handler, Routes};
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

use m2mpki_connection::Unobserved;

use crate::outcome::Outcome;

type Labels = Vec<(&'static str, String)>;

/// A counter of refusals by reason, handed to the parts that refuse (the verifier, the
/// admission rules).
#[derive(Clone, Debug, Default)]
pub struct Refusals(Family<Labels, Counter>);

impl Refusals {
    /// Counts one refusal for `reason` (a short code: `unknown_ca`, `hello_timeout`, ...).
    pub fn count(&self, reason: &str) {
        self.0
            .get_or_create(&vec![("reason", reason.to_owned())])
            .inc();
    }
}

/// The IN's metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    enrolments: Family<Labels, Counter>,
    /// Refusals by reason.
    pub refusals: Refusals,
    enrol_seconds: Histogram,
    commit_seconds: Histogram,
    /// TCP connections holding a slot now.
    pub open_connections: Gauge,
    credentials: Gauge,
    crl_age: Family<Labels, Gauge<f64, AtomicU64>>,
}

/// The connection layer counts its refusals and open connections here.
impl m2mpki_connection::Observer for Metrics {
    fn refused(&self, reason: &'static str) {
        self.refusals.count(reason);
    }

    fn opened(&self) {
        self.open_connections.inc();
    }

    fn closed(&self) {
        self.open_connections.dec();
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

/// The transport as a label: `tls1.3`, `tls1.2`, `tls1.2-cbc`, `dtls1.2`.
fn transport_label(transport: &str) -> &'static str {
    if transport.starts_with("DTLS") {
        "dtls1.2"
    } else if transport.contains("OpenSSL") {
        "tls1.2-cbc"
    } else if transport.contains("1_3") {
        "tls1.3"
    } else {
        "tls1.2"
    }
}

impl Metrics {
    /// Registers every metric (names as Prometheus shows them; counters get `_total`).
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("m2mpki");
        let enrolments = Family::<Labels, Counter>::default();
        registry.register(
            "enrolments",
            "Bootstrap requests answered, by outcome and transport",
            enrolments.clone(),
        );
        let refusals = Refusals::default();
        registry.register(
            "refusals",
            "Connections and handshakes refused before any request, by reason",
            refusals.0.clone(),
        );
        let enrol_seconds = Histogram::new(exponential_buckets(0.000_5, 2.0, 16));
        registry.register(
            "enrolment_seconds",
            "Time from a request's body to its answer (policy, sealing, commit, wrapping)",
            enrol_seconds.clone(),
        );
        let commit_seconds = Histogram::new(exponential_buckets(0.000_25, 2.0, 16));
        registry.register(
            "commit_seconds",
            "Time a credential waited for its durable group commit",
            commit_seconds.clone(),
        );
        let open_connections = Gauge::default();
        registry.register(
            "open_connections",
            "TLS connections holding one of the max_connections slots",
            open_connections.clone(),
        );
        let credentials = Gauge::default();
        registry.register(
            "credentials",
            "Credentials recorded in the IN's store (all states)",
            credentials.clone(),
        );
        let crl_age = Family::<Labels, Gauge<f64, AtomicU64>>::default();
        registry.register(
            "crl_age_seconds",
            "Seconds since thisUpdate of the newest CRL of each trusted root set and issuer",
            crl_age.clone(),
        );
        Metrics {
            registry,
            enrolments,
            refusals,
            enrol_seconds,
            commit_seconds,
            open_connections,
            credentials,
            crl_age,
        }
    }

    /// Counts an answered request and how long it took.
    pub(crate) fn enrolment(&self, outcome: Outcome, transport: &str, took: Duration) {
        self.enrolments
            .get_or_create(&vec![
                ("outcome", outcome.name().to_owned()),
                ("transport", transport_label(transport).to_owned()),
            ])
            .inc();
        self.enrol_seconds.observe(took.as_secs_f64());
    }

    /// Records how long a commit took.
    pub(crate) fn commit(&self, took: Duration) {
        self.commit_seconds.observe(took.as_secs_f64());
    }

    /// The text a scrape gets, after reading the gauges that are computed on demand.
    pub(crate) fn render(&self, gauges: &dyn Gauges) -> String {
        if let Some(n) = gauges.credentials() {
            self.credentials.set(i64::try_from(n).unwrap_or(i64::MAX));
        }
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        for set in gauges.trusted_sets().iter().map(|t| t.set()) {
            let mut newest: std::collections::BTreeMap<&str, i64> = Default::default();
            for crl in &set.crls {
                let e = newest.entry(crl.issuer.as_str()).or_insert(crl.this_update);
                *e = (*e).max(crl.this_update);
            }
            for (issuer, this_update) in newest {
                self.crl_age
                    .get_or_create(&vec![
                        ("set", set.name.clone()),
                        ("issuer", issuer.to_owned()),
                    ])
                    .set((now - this_update) as f64);
            }
        }
        let mut out = String::new();
        if encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

/// What a scrape reads at the moment it is served (the enrolment core provides it).
pub(crate) trait Gauges: Send + Sync {
    /// How many credentials the store holds, when it answers.
    fn credentials(&self) -> Option<u64>;
    /// The root sets the verifier trusts now.
    fn trusted_sets(&self) -> Arc<Vec<m2mpki_ca::verify::TrustedSet>>;
}

/// Scrapes served at once; a connection beyond them is closed when accepted. A scraper needs
/// one; the cap keeps idle connections to this listener from taking the descriptors the
/// enrolment listeners need.
pub const MAX_SCRAPES: usize = 16;

/// How long a scrape connection may take, from accept to answer.
const SCRAPE_TOTAL: Duration = Duration::from_secs(15);

/// Serves `GET /metrics` on `listener` until `stop` completes: the connection layer's accept
/// loop with slots of its own (at most [`MAX_SCRAPES`], so a scraper cannot take the slots of
/// nodes, nor nodes those of the operator's scrape), refusals not counted among the IN's, and
/// its HTTP binding with one route (other paths and methods get the error document of
/// docs/protocol.md §5).
pub(crate) async fn serve(
    listener: TcpListener,
    gauges: Arc<dyn Gauges>,
    metrics: Arc<Metrics>,
    stop: impl std::future::Future<Output = ()>,
) {
    let limits = m2mpki_connection::Limits {
        max_connections: MAX_SCRAPES,
        max_connections_per_address: MAX_SCRAPES,
        hello_timeout: SCRAPE_TOTAL,
        handshake_timeout: SCRAPE_TOTAL,
        idle_timeout: SCRAPE_TOTAL,
    };
    let admission = m2mpki_connection::Admission::new(limits, Arc::new(Unobserved));
    // A scrape has no body.
    let routes = Arc::new(Routes::new(0, SCRAPE_TOTAL).route(
        Method::GET,
        "/metrics",
        None,
        Arc::new(Scrape { gauges, metrics }),
    ));
    let first = m2mpki_connection::First::Nothing;
    m2mpki_connection::serve(listener, admission, "metrics", first, stop, move |conn| {
        let routes = routes.clone();
        async move {
            let peer = conn.peer;
            m2mpki_connection::http::serve(routes, Arc::new(()), peer, conn.tcp, conn.ticket).await;
        }
    })
    .await;
}

/// `GET /metrics`.
struct Scrape {
    gauges: Arc<dyn Gauges>,
    metrics: Arc<Metrics>,
}

impl Handler<()> for Scrape {
    fn handle(&self, _: Arc<()>, _: Parts, _: Bytes) -> Answering {
        let mut r = Response::new(Full::new(Bytes::from(self.metrics.render(&*self.gauges))));
        r.headers_mut().insert(
            hyper::header::CONTENT_TYPE,
            hyper::header::HeaderValue::from_static(
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            ),
        );
        Box::pin(std::future::ready(r))
    }
}

/// The address a metrics listener is bound to, for messages.
pub(crate) fn describe(addr: SocketAddr) -> String {
    format!("http://{addr}/metrics")
}
