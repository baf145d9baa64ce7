//! The Infrastructure Node endpoint: mutual TLS, the exporter, `POST /bootstrap`.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use m2mpki_ca::rootset::RootSet;
use m2mpki_ca::verify::TrustedSet;
use m2mpki_ca::{Home, Store};
use m2mpki_connection::{Admission, Conn, First, Observer};
use m2mpki_hsm::tls::TlsKey;
use m2mpki_hsm::Keystore;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use crate::config::{DtlsConfig, ServerConfig};
use crate::credstore::{CredentialStore, StoreKey};
use crate::enrol::{Admitted, Core};
use crate::tls::{self, FieldNodeVerifier};
use crate::{Error, Result};

/// Receive buffer asked for the DTLS socket.
const DTLS_RECV_BUFFER: usize = 4 << 20;

/// How often the trusted root sets (and their CRLs) are re-read from the store.
const TRUST_REFRESH: Duration = Duration::from_secs(5);

/// A configured IN endpoint, ready to run.
pub struct Server {
    shared: Arc<Core>,
    /// The TLS configuration's parts: each connection gets a configuration of its own, with a
    /// verifier that keeps that connection's verdict.
    tls: tls::ServerParts,
    dtls: Option<Arc<crate::dtls::server::Endpoint>>,
    cbc: Option<Arc<crate::cbc::Cbc>>,
    /// The server names answered (TLS hellos are checked before any stack).
    sni: crate::tls::SniRule,
    psk: Option<Arc<crate::psk::Listener>>,
    psk_dtls: Option<Arc<crate::dtls::server::Endpoint>>,
    ca_store: Arc<dyn Store>,
    /// The TCP connection slots of the listeners that face nodes (bootstrap and PSK
    /// association): the limits are the process's, whatever the number of ports.
    admission: Arc<Admission>,
    /// The bootstrap's HTTP routes (both TLS stacks).
    routes: Arc<m2mpki_connection::http::Routes<Admitted>>,
}

/// The bound sockets of the configured transports.
#[derive(Debug)]
pub struct Listeners {
    /// TLS (TCP), when configured.
    pub tls: Option<TcpListener>,
    /// DTLS (UDP), when configured.
    pub dtls: Option<tokio::net::UdpSocket>,
    /// The PSK association listener (TCP), when configured.
    pub psk: Option<TcpListener>,
    /// The PSK association over DTLS (UDP), when configured.
    pub psk_dtls: Option<tokio::net::UdpSocket>,
    /// The Prometheus metrics listener (plain HTTP), when configured.
    pub metrics: Option<TcpListener>,
}

impl Listeners {
    /// The TLS address.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.tls
            .as_ref()
            .ok_or_else(|| std::io::Error::other("TLS is switched off in the server config"))?
            .local_addr()
    }

    /// The DTLS address.
    pub fn dtls_addr(&self) -> std::io::Result<SocketAddr> {
        self.dtls
            .as_ref()
            .ok_or_else(|| std::io::Error::other("DTLS is switched off in the server config"))?
            .local_addr()
    }

    /// The DTLS PSK association address.
    pub fn psk_dtls_addr(&self) -> std::io::Result<SocketAddr> {
        self.psk_dtls
            .as_ref()
            .ok_or_else(|| std::io::Error::other("no [psk] dtls_listen in the server config"))?
            .local_addr()
    }

    /// The metrics address.
    pub fn metrics_addr(&self) -> std::io::Result<SocketAddr> {
        self.metrics
            .as_ref()
            .ok_or_else(|| std::io::Error::other("no [metrics] listen in the server config"))?
            .local_addr()
    }

    /// The PSK association address.
    pub fn psk_addr(&self) -> std::io::Result<SocketAddr> {
        self.psk
            .as_ref()
            .ok_or_else(|| std::io::Error::other("no [psk] listener in the server config"))?
            .local_addr()
    }
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("fqdn", &self.shared.config.fqdn)
            .field("listen", &self.shared.config.listen)
            .finish_non_exhaustive()
    }
}

/// Loads the named sets, checking each exists and has the kind its list says.
fn load_sets(store: &dyn Store, config: &ServerConfig) -> Result<Vec<RootSet>> {
    let mut sets = Vec::new();
    for (names, want) in [(&config.device_sets, "device"), (&config.node_sets, "node")] {
        for name in names {
            let set = store
                .root_set(name)?
                .ok_or_else(|| m2mpki_ca::Error::UnknownRootSet(name.clone()))?;
            if set.kind.as_str() != want {
                return Err(Error::BadConfig {
                    path: "trust".into(),
                    reason: format!("root set `{name}` is a {} set, listed as {want}", set.kind),
                });
            }
            sets.push(set);
        }
    }
    Ok(sets)
}

/// A listening socket on `addr` with the longest accept queue the kernel allows
/// (`net.core.somaxconn`, 4096 on current Linux), as Go's `net.Listen` asks for.
///
/// `TcpListener::bind` asks for 128. Field nodes reconnect in bursts (after a power cut, a
/// whole site at once; 256 clients in the benchmark), and with 128 the queue overflowed while
/// handshakes kept the workers busy: the kernel dropped SYNs, clients resent them a second
/// later, and the p99 latency at 256 clients was that second. Under a connect flood it is the
/// same second: 2 000 attacker connections that reconnect as soon as they are closed kept a
/// queue of 128 full, the kernel dropped a legitimate node's SYN (`ListenOverflows` counted
/// 10 113 drops in one run of `tests/hostile.rs`) and its enrolment took 1 to 2 s instead of
/// 20 ms. The admission rules (m2mpki_connection::admission) can only act on connections that were
/// accepted; the queue must hold the flood until they do.
pub fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    // As `TcpListener::bind` does: a restarted IN can bind while old connections linger.
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    // listen(2) silently lowers a larger request to net.core.somaxconn.
    socket.listen(65_535)
}

/// `sets` made ready for verification: anchors read and CRLs parsed once per load.
fn prepared(sets: Vec<RootSet>) -> Vec<TrustedSet> {
    sets.into_iter().map(TrustedSet::new).collect()
}

/// Descriptors kept for what is not a connection: the listeners, the stores' files and
/// database connections (six per PostgreSQL store), the token's, logging.
const DESCRIPTOR_RESERVE: u64 = 64;

/// The most descriptors the IN can hold at once under its configured caps: each TLS
/// connection waiting for its hello or handshake holds two (measured by the hostile review),
/// each PSK association two (the node's and the upstream's), each metrics scrape one; DTLS
/// peers share the endpoint's one socket.
pub fn descriptors_needed(c: &ServerConfig) -> u64 {
    let per = 2 * c.limits.max_connections as u64;
    let mut need = DESCRIPTOR_RESERVE;
    if c.listen.is_some() {
        need += per;
    }
    if c.psk.is_some() {
        need += per;
    }
    if c.metrics_listen.is_some() {
        need += crate::metrics::MAX_SCRAPES as u64;
    }
    need
}

/// Raises the soft RLIMIT_NOFILE to the hard limit (the usual soft 1 024 is less than the
/// default caps need, and `accept` failing with EMFILE defeats the admission rules), and
/// refuses a configuration whose caps cannot fit under the hard limit (exit 2, with the
/// arithmetic). Returns the limit now in force.
pub fn ensure_descriptors(c: &ServerConfig) -> Result<u64> {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let need = descriptors_needed(c);
    let now = getrlimit(Resource::Nofile);
    let hard = now.maximum.unwrap_or(u64::MAX);
    if need > hard {
        let listeners = [c.listen.map(|_| "TLS"), c.psk.as_ref().map(|_| "PSK")]
            .into_iter()
            .flatten()
            .collect::<Vec<_>>();
        let fixed = if c.metrics_listen.is_some() {
            crate::metrics::MAX_SCRAPES as u64
        } else {
            0
        };
        return Err(Error::BadConfig {
            path: "[limits]".into(),
            reason: format!(
                "the caps need up to {need} file descriptors (2 x max_connections {} for each of {} listener(s) {}, {} for metrics, {DESCRIPTOR_RESERVE} reserved), but the hard RLIMIT_NOFILE is {hard}: lower limits.max_connections to at most {}, or raise the limit (systemd: LimitNOFILE=)",
                c.limits.max_connections,
                listeners.len(),
                listeners.join(" and "),
                fixed,
                hard.saturating_sub(DESCRIPTOR_RESERVE + fixed) / (2 * listeners.len().max(1) as u64),
            ),
        });
    }
    let soft = now.current.unwrap_or(u64::MAX);
    if soft < hard {
        setrlimit(
            Resource::Nofile,
            Rlimit {
                current: now.maximum,
                maximum: now.maximum,
            },
        )
        .map_err(|e| {
            Error::internal(format!("raising RLIMIT_NOFILE from {soft} to {hard}: {e}"))
        })?;
        tracing::info!(
            from = soft,
            to = hard,
            need,
            "raised the soft descriptor limit"
        );
    }
    Ok(hard)
}

impl Server {
    /// Prepares the endpoint: loads the trusted sets, the TLS chain and key (file or token),
    /// the credential store and its key, and records the policy.
    pub fn new(config: ServerConfig, home: &Home, keystore: &Keystore) -> Result<Self> {
        ensure_descriptors(&config)?;
        let ca_store: Arc<dyn Store> = match &config.store {
            Some(location) => Arc::from(location.open()?),
            None => Arc::new(home.store()?),
        };
        let provider = tls::provider();
        let metrics = Arc::new(crate::metrics::Metrics::new());
        let observer: Arc<dyn Observer> = metrics.clone();
        let admission = Admission::new(config.limits.connections(), observer);
        let verifier = Arc::new(
            FieldNodeVerifier::new(prepared(load_sets(&*ca_store, &config)?), provider.clone())
                .with_algorithms(config.algorithms.clone())
                .counting(metrics.refusals.clone()),
        );
        let chain = tls::load_chain(&config.chain)?;
        let key = keystore.open(&config.key)?;
        let leaf = chain.first().ok_or_else(|| Error::BadConfig {
            path: config.chain.clone(),
            reason: "no certificate".into(),
        })?;
        let (_, cert) =
            x509_parser::parse_x509_certificate(leaf).map_err(|e| Error::BadConfig {
                path: config.chain.clone(),
                reason: format!("malformed certificate ({e})"),
            })?;
        if !key.matches(cert.public_key().raw) {
            return Err(Error::BadConfig {
                path: config.chain.clone(),
                reason: format!("the certificate does not belong to the key {}", config.key),
            });
        }
        let ee = webpki::EndEntityCert::try_from(leaf).map_err(|e| Error::BadConfig {
            path: config.chain.clone(),
            reason: format!("unusable certificate ({e:?})"),
        })?;
        let name = rustls::pki_types::ServerName::try_from(config.fqdn.as_str())
            .map_err(|e| Error::internal(e.to_string()))?;
        if ee.verify_is_valid_for_subject_name(&name).is_err() {
            return Err(Error::BadConfig {
                path: config.chain.clone(),
                reason: format!(
                    "the certificate does not name the IN's FQDN `{}`",
                    config.fqdn
                ),
            });
        }
        let sni = tls::SniRule::new(&config.server_names, config.require_sni);
        let dtls_ctx = match &config.dtls {
            None => None,
            Some(d) => {
                let pkcs8 = key.software_pkcs8().ok_or_else(|| Error::BadConfig {
                    path: "dtls".into(),
                    reason: format!(
                        "the IN key {} is on a token; DTLS (OpenSSL) signs only with a key file here (docs/dtls.md)",
                        config.key
                    ),
                })?;
                let ders: Vec<Vec<u8>> = chain.iter().map(|c| c.as_ref().to_vec()).collect();
                let mut b = crate::dtls::context(true, &d.suites, &ders, &pkcs8)?;
                crate::dtls::check_sni(&mut b, sni.clone(), "dtls");
                let v = verifier.clone();
                crate::dtls::install_verifier(&mut b, move |chain| {
                    v.verify(chain, time::OffsetDateTime::now_utc())
                });
                Some((b.build(), d.clone()))
            }
        };
        let cbc = if config.ts0003_cbc {
            let pkcs8 = key.software_pkcs8().ok_or_else(|| Error::BadConfig {
                path: "tls.ts0003_cbc".into(),
                reason: format!(
                    "the IN key {} is on a token; the CBC suite (OpenSSL) signs only with a key file here (docs/dtls.md)",
                    config.key
                ),
            })?;
            let ders: Vec<Vec<u8>> = chain.iter().map(|c| c.as_ref().to_vec()).collect();
            Some(Arc::new(crate::cbc::Cbc::new(
                crate::cbc::context(&ders, &pkcs8, verifier.clone(), sni.clone())?,
                &config.versions,
            )))
        } else {
            None
        };
        let certified = Arc::new(rustls::sign::CertifiedKey::new(
            chain,
            Arc::new(TlsKey::new(key)),
        ));
        let tls_parts = tls::ServerParts::new(&config.versions, sni.clone(), certified);
        // Checked once here, not on the first connection.
        tls_parts.config(Arc::new(tls::ConnectionVerifier::new(verifier.clone())))?;
        let creds = Arc::new(CredentialStore::open_at(
            config.store.as_ref(),
            home.root(),
        )?);
        creds.set_policy(&config.policy)?;
        let key_ref = config.store_key.clone().unwrap_or_else(|| {
            m2mpki_hsm::KeyRef::File(home.root().join("keys").join("credential-store.key"))
        });
        let store_key = StoreKey::load(&key_ref, keystore)?;
        creds.check_key(&store_key)?;
        let shared = Arc::new(Core::new(config, verifier, creds, store_key, metrics)?);
        let dtls = match dtls_ctx {
            None => None,
            Some((ctx, config)) => Some(Arc::new(crate::dtls::server::Endpoint {
                core: shared.clone(),
                ctx,
                udp: udp_endpoint(&config, &shared)?,
                config,
                association: false,
            })),
        };
        // A PSK node names the IN in its KeID; SNI, when it sends one, must name it too, but
        // is not required (TS-0003's association does not ask for it).
        let psk_sni = tls::SniRule::new(&shared.config.server_names, false);
        let psk = match &shared.config.psk {
            None => None,
            Some(p) => Some(Arc::new(crate::psk::Listener {
                ctx: crate::psk::server_context(
                    shared.creds.clone(),
                    shared.store_key.clone(),
                    psk_sni.clone(),
                )?,
                upstream: p.upstream,
                upstream_timeout: p.upstream_timeout,
                limits: shared.config.limits.clone(),
                admission: admission.clone(),
            })),
        };
        let psk_dtls = match shared.config.psk.as_ref().and_then(|p| p.dtls_listen) {
            None => None,
            Some(listen) => {
                let assoc_dtls = DtlsConfig {
                    listen,
                    ..shared.config.dtls.clone().unwrap_or_else(|| DtlsConfig {
                        listen,
                        mtu: crate::config::DEFAULT_MTU,
                        suites: vec![],
                        max_peers: 1024,
                    })
                };
                Some(Arc::new(crate::dtls::server::Endpoint {
                    core: shared.clone(),
                    ctx: crate::psk::dtls_server_context(
                        shared.creds.clone(),
                        shared.store_key.clone(),
                        psk_sni.clone(),
                    )?,
                    udp: udp_endpoint(&assoc_dtls, &shared)?,
                    config: assoc_dtls,
                    association: true,
                }))
            }
        };
        let routes = Arc::new(crate::http::routes(shared.clone()));
        Ok(Server {
            shared,
            tls: tls_parts,
            dtls,
            cbc,
            sni,
            psk,
            psk_dtls,
            ca_store,
            admission,
            routes,
        })
    }

    /// The credential store (to read back what was issued).
    pub fn credentials(&self) -> &CredentialStore {
        &self.shared.creds
    }

    /// Transactions that stored credentials since the start: one per group commit, so
    /// `credential_commits / enrolments` is the commits per enrolment.
    pub fn credential_commits(&self) -> u64 {
        self.shared.writer.commits()
    }

    /// DTLS peers with a handshake or session under way (0 when DTLS is off). A peer exists
    /// only after it returned a cookie: spoofed hellos never show here.
    pub fn dtls_sessions(&self) -> usize {
        self.dtls
            .as_ref()
            .map_or(0, |d| d.udp.live.load(std::sync::atomic::Ordering::Relaxed))
    }

    /// The store key.
    pub fn store_key(&self) -> &StoreKey {
        &self.shared.store_key
    }

    /// Binds the configured addresses: TCP with the longest accept queue the kernel allows
    /// (see [`listen`]), UDP for DTLS.
    pub async fn bind(&self) -> Result<Listeners> {
        let cant = |addr: SocketAddr, e: std::io::Error| Error::Listen {
            addr: addr.to_string(),
            reason: e.to_string(),
        };
        let tls = match self.shared.config.listen {
            None => None,
            Some(addr) => Some(listen(addr).map_err(|e| cant(addr, e))?),
        };
        let dtls = match &self.shared.config.dtls {
            None => None,
            Some(d) => Some(bind_dtls(d.listen).await.map_err(|e| cant(d.listen, e))?),
        };
        let psk = match &self.shared.config.psk {
            None => None,
            Some(p) => Some(listen(p.listen).map_err(|e| cant(p.listen, e))?),
        };
        let psk_dtls = match self.shared.config.psk.as_ref().and_then(|p| p.dtls_listen) {
            None => None,
            Some(addr) => Some(bind_dtls(addr).await.map_err(|e| cant(addr, e))?),
        };
        let metrics = match self.shared.config.metrics_listen {
            None => None,
            Some(addr) => Some(TcpListener::bind(addr).await.map_err(|e| cant(addr, e))?),
        };
        Ok(Listeners {
            tls,
            dtls,
            psk,
            psk_dtls,
            metrics,
        })
    }

    /// Serves until `shutdown` completes, then stops accepting and lets open connections
    /// finish (within the handshake and idle limits).
    pub async fn run(
        self: Arc<Self>,
        listeners: Listeners,
        shutdown: impl Future<Output = ()>,
    ) -> Result<()> {
        // Both transports verify through the one verifier: its sets and CRLs are re-read here.
        let refresher = {
            let this = self.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(TRUST_REFRESH);
                tick.tick().await;
                loop {
                    tick.tick().await;
                    // CRLs are prepared here, off the handshake path, before the sets go live.
                    let loaded = {
                        let this = this.clone();
                        tokio::task::spawn_blocking(move || {
                            load_sets(&*this.ca_store, &this.shared.config).map(prepared)
                        })
                        .await
                        .unwrap_or_else(|e| Err(Error::internal(format!("trust refresh: {e}"))))
                    };
                    match loaded {
                        Ok(sets) => this.shared.verifier.replace_sets(sets),
                        Err(e) => {
                            tracing::warn!(error = %e, "could not refresh the trusted root sets; keeping the previous ones")
                        }
                    }
                }
            })
        };
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        // Every listener runs until the stop signal, sent when the shutdown future completes.
        let stopped = |mut stop: tokio::sync::watch::Receiver<bool>| async move {
            let _ = stop.wait_for(|s| *s).await;
        };
        let addr_of =
            |a: std::io::Result<SocketAddr>| a.map_or_else(|_| "?".into(), |a| a.to_string());
        let dtls = match (listeners.dtls, &self.dtls) {
            (Some(socket), Some(endpoint)) => {
                tracing::info!(addr = %addr_of(socket.local_addr()), fqdn = %self.shared.config.fqdn, "bootstrap server listening (DTLS, CoAP)");
                Some(tokio::spawn(
                    endpoint.clone().run(socket, stopped(stop_rx.clone())),
                ))
            }
            _ => None,
        };
        let psk = match (listeners.psk, &self.psk) {
            (Some(listener), Some(service)) => {
                tracing::info!(addr = %addr_of(listener.local_addr()), upstream = ?service.upstream, "PSK association listener (TLS 1.2 PSK)");
                Some(tokio::spawn(
                    service.clone().run(listener, stopped(stop_rx.clone())),
                ))
            }
            _ => None,
        };
        let psk_dtls = match (listeners.psk_dtls, &self.psk_dtls) {
            (Some(socket), Some(endpoint)) => {
                tracing::info!(addr = %addr_of(socket.local_addr()), "PSK association listener (DTLS 1.2 PSK, CoAP)");
                Some(tokio::spawn(
                    endpoint.clone().run(socket, stopped(stop_rx.clone())),
                ))
            }
            _ => None,
        };
        let metrics = listeners.metrics.map(|listener| {
            tracing::info!(url = %crate::metrics::describe(listener.local_addr().unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)))), "metrics listener");
            tokio::spawn(crate::metrics::serve(
                listener,
                self.shared.clone(),
                self.shared.metrics.clone(),
                stopped(stop_rx.clone()),
            ))
        });
        let tls = listeners.tls.map(|listener| {
            tracing::info!(addr = %addr_of(listener.local_addr()), fqdn = %self.shared.config.fqdn, "bootstrap server listening");
            let this = self.clone();
            tokio::spawn(m2mpki_connection::serve(
                listener,
                self.admission.clone(),
                "bootstrap",
                First::TlsRecord,
                stopped(stop_rx.clone()),
                move |conn| this.clone().serve_tls(conn),
            ))
        });
        shutdown.await;
        let _ = stop_tx.send(true);
        for listener in [tls, psk].into_iter().flatten() {
            let _ = listener.await;
        }
        for endpoint in [dtls, psk_dtls].into_iter().flatten() {
            let _ = endpoint.await;
        }
        tracing::info!("draining open connections");
        if !self.admission.drain().await {
            let limits = self.admission.limits();
            let drain = limits.handshake_timeout + limits.idle_timeout;
            tracing::warn!("some connections were still open after {drain:?}; stopping anyway");
        }
        if let Some(m) = metrics {
            let _ = m.await;
        }
        drop(stop_rx);
        refresher.abort();
        tracing::info!("bootstrap server stopped");
        Ok(())
    }

    /// One connection of the TLS port, its ClientHello complete in the socket: the SNI rule,
    /// then the stack its suites choose (the CBC path or rustls).
    async fn serve_tls(self: Arc<Self>, conn: Conn) {
        let hello = m2mpki_connection::hello::parse_tls_record(&conn.first_record);
        let peer = conn.peer;
        if let Some(hello) = &hello {
            let name = hello.server_name;
            if let Err(code) = self.sni.check(if hello.sni && name.is_none() {
                Some("")
            } else {
                name
            }) {
                tracing::info!(%peer, sni = ?name, code, "TLS hello refused: SNI");
                self.admission.refused(code);
                let mut tcp = conn.tcp;
                let _ =
                    tokio::io::AsyncWriteExt::write_all(&mut tcp, &tls::UNRECOGNIZED_NAME_ALERT)
                        .await;
                return;
            }
            if let Some(cbc) = &self.cbc {
                if cbc.chooses(hello) {
                    let ems = hello.ems;
                    crate::cbc::serve(
                        &self.routes,
                        &self.admission,
                        &cbc.ctx,
                        conn.tcp,
                        peer,
                        ems,
                        conn.ticket,
                    )
                    .await;
                    return;
                }
            }
        }
        let verifier = Arc::new(tls::ConnectionVerifier::new(self.shared.verifier.clone()));
        let config = match self.tls.config(verifier.clone()) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(%peer, error = %e, "TLS setup failed");
                return;
            }
        };
        let acceptor = TlsAcceptor::from(Arc::new(config));
        let (tcp, ticket) = (conn.tcp, conn.ticket);
        serve_connection(
            &self.routes,
            &self.admission,
            acceptor,
            verifier,
            tcp,
            peer,
            ticket,
        )
        .await;
    }
}

/// The connection layer's side of a DTLS endpoint: a fresh cookie secret, `max_peers` places,
/// the per-address cap of the TCP listeners, each peer's task bounded by the handshake and idle
/// timeouts, refusals counted in the IN's metrics.
fn udp_endpoint(config: &DtlsConfig, core: &Core) -> Result<m2mpki_connection::udp::Endpoint> {
    let limits = &core.config.limits;
    let observer: Arc<dyn Observer> = core.metrics.clone();
    Ok(m2mpki_connection::udp::Endpoint {
        limits: m2mpki_connection::udp::Limits {
            max_peers: config.max_peers,
            max_peers_per_address: limits.max_connections_per_address,
            session_time: limits.handshake_timeout + limits.idle_timeout,
        },
        cookies: m2mpki_connection::dtls::Cookies::new()
            .map_err(|e| Error::internal(e.to_string()))?,
        live: std::sync::atomic::AtomicUsize::new(0),
        observer,
    })
}

/// A UDP socket for a DTLS endpoint (bootstrap or PSK association), with the enlarged receive
/// buffer. Nodes come back in bursts, each with a ~1 KiB certificate flight: with the default
/// 208 KiB the kernel dropped datagrams at 256 peers (RcvbufErrors), and each drop cost the
/// peer a 1 s retransmission; under a hello flood the same drops would fall on real nodes. The
/// kernel caps the request at net.core.rmem_max.
async fn bind_dtls(addr: SocketAddr) -> std::io::Result<tokio::net::UdpSocket> {
    let socket = tokio::net::UdpSocket::bind(addr).await?;
    if let Err(e) = rustix::net::sockopt::set_socket_recv_buffer_size(&socket, DTLS_RECV_BUFFER) {
        tracing::warn!(%addr, error = %e, "could not enlarge the DTLS socket's receive buffer");
    }
    Ok(socket)
}

async fn serve_connection(
    routes: &Arc<m2mpki_connection::http::Routes<Admitted>>,
    admission: &Admission,
    acceptor: TlsAcceptor,
    verifier: Arc<tls::ConnectionVerifier>,
    tcp: tokio::net::TcpStream,
    peer: SocketAddr,
    mut ticket: m2mpki_connection::admission::Ticket,
) {
    // The ClientHello is complete in the socket's buffer already (read at accept, for SNI):
    // the handshake deadline starts now, and the hello deadline is not applied again.
    let Ok(tls) = admission
        .handshake(&mut ticket, peer, "TLS", acceptor.accept(tcp))
        .await
    else {
        return;
    };
    let (_, conn) = tls.get_ref();
    let transport = conn
        .protocol_version()
        .map_or_else(|| "?".into(), |v| format!("{v:?}"));
    // The verifier makes client authentication mandatory: a completed handshake has a verdict.
    let verdict = verifier.take().map(Ok);
    let exports = tls::export_wrap_key(conn).and_then(|w| Ok((w, tls::export_ts0003(conn)?)));
    let Some(node) = Admitted::after_handshake(peer, transport, verdict, exports) else {
        return;
    };
    crate::http::serve_http(routes, node, tls, ticket).await;
}
