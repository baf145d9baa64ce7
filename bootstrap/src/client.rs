//! The Field Node side: connect, authenticate both ways, export, `POST /bootstrap`, unwrap.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;
use m2mpki_ca::FieldNodeIdentity;
use m2mpki_hsm::tls::TlsKey;
use m2mpki_hsm::Signer;
use rustls::pki_types::{CertificateDer, ServerName};
use serde::Serialize;
use tokio_rustls::TlsConnector;

use crate::config::{FieldNodeProfile, TlsVersion, Transport, DEFAULT_MTU};
use crate::protocol::{
    self, Admission, BootstrapRequest, BootstrapResponse, ErrorBody, RootCredential, Ts0003Keys,
    WrapKey, PATH, VERSION_TS0003, WRAP_ALGORITHM,
};
use crate::tls;
use crate::{Error, Result};

/// Largest response the client reads.
const MAX_RESPONSE: usize = 64 * 1024;

/// What the field node brings to an enrolment.
pub struct Enrolment {
    /// Its pre-conditions.
    pub profile: FieldNodeProfile,
    /// Its certificate chain (leaf first).
    pub chain: Vec<CertificateDer<'static>>,
    /// Its key (file or token).
    pub key: Arc<dyn Signer>,
    /// Connect here instead of resolving the FQDN (SNI and verification still use the FQDN).
    pub connect: Option<String>,
    /// TLS versions offered (empty: 1.3 and 1.2; not used over DTLS).
    pub versions: Vec<TlsVersion>,
    /// Limit for the whole exchange.
    pub timeout: Duration,
}

impl std::fmt::Debug for Enrolment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Enrolment")
            .field("in_fqdn", &self.profile.in_fqdn)
            .field("connect", &self.connect)
            .finish_non_exhaustive()
    }
}

/// What a bootstrap provisioned, before the node puts it anywhere: the credential still
/// wrapped (version 1) with the key to unwrap it, or Ke (version 2, which the node derived
/// itself). `Debug` shows neither.
#[derive(Clone)]
pub enum Provisioned {
    /// Version 1: `wrapped` is AES-256-KW under `wrap_key` (the IN's answer, as received).
    Wrapped {
        /// RootCredentialWrapKey, exported from the session.
        wrap_key: WrapKey,
        /// The wrapped credential.
        wrapped: Vec<u8>,
    },
    /// Version 2: Ke.
    Ke(RootCredential),
}

impl std::fmt::Debug for Provisioned {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Provisioned::Wrapped { .. } => "Provisioned::Wrapped(<redacted>)",
            Provisioned::Ke(_) => "Provisioned::Ke(<redacted>)",
        })
    }
}

impl Provisioned {
    /// The credential in host memory (version 1: unwrapped here; an integrity failure is an
    /// error).
    pub fn into_host(self) -> Result<RootCredential> {
        match self {
            Provisioned::Wrapped { wrap_key, wrapped } => protocol::unwrap(&wrap_key, &wrapped),
            Provisioned::Ke(ke) => Ok(ke),
        }
    }
}

/// A completed bootstrap: the root credential (by default in host memory; see
/// [`enroll_provisioned`]) and what came with it.
#[derive(Debug, Clone, Serialize)]
pub struct Enrolled<C = RootCredential> {
    /// Credential ID (version 2: the KeID).
    pub credential_id: String,
    /// Version 2 (TS-0003): KeID, `hex(RelativeKeID)@IN-FQDN`, checked against ours.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ke_id: Option<String>,
    /// The IN's FQDN (checked against the one dialled).
    pub in_fqdn: String,
    /// Our identity as the IN saw it (checked against our certificate).
    pub identity: FieldNodeIdentity,
    /// The set that admitted us.
    pub admitted_by: Admission,
    /// Expiry (RFC 3339).
    pub expires: String,
    /// Granted resources.
    pub grants: Vec<String>,
    /// Configuration parameters.
    pub parameters: serde_json::Map<String, serde_json::Value>,
    /// TLS version used.
    pub tls_version: String,
    /// The root credential (version 2: Ke).
    #[serde(skip)]
    pub credential: C,
}

impl<C> Enrolled<C> {
    /// The same enrolment with its credential turned into something else (e.g. stored).
    pub fn map_credential<D>(self, f: impl FnOnce(C) -> Result<D>) -> Result<Enrolled<D>> {
        Ok(Enrolled {
            credential: f(self.credential)?,
            credential_id: self.credential_id,
            ke_id: self.ke_id,
            in_fqdn: self.in_fqdn,
            identity: self.identity,
            admitted_by: self.admitted_by,
            expires: self.expires,
            grants: self.grants,
            parameters: self.parameters,
            tls_version: self.tls_version,
        })
    }
}

/// Whether an I/O error carries a TLS-level failure (an alert received or sent, a certificate
/// refused): a refusal, not a broken network.
fn tls_failure(err: &std::io::Error) -> bool {
    err.get_ref()
        .is_some_and(|inner| inner.downcast_ref::<rustls::Error>().is_some())
}

/// Explains a failed TLS handshake: a TLS-level failure is a refusal ([`Error::Handshake`]);
/// anything else (EOF, reset) a broken network ([`Error::Network`]).
fn handshake_error(peer: &str, err: std::io::Error) -> Error {
    if tls_failure(&err) {
        Error::Handshake {
            peer: peer.to_owned(),
            reason: err.to_string(),
        }
    } else {
        Error::Network {
            peer: peer.to_owned(),
            reason: format!("during the TLS handshake: {err}"),
        }
    }
}

/// Explains an HTTP failure: a TLS failure such as the IN's alert (it refused our certificate,
/// which TLS 1.3 tells only now) is a handshake refusal; a connection that closed or broke is
/// the network; anything else breaks the protocol.
fn http_error(peer: &str, err: &hyper::Error) -> Error {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(err);
    let mut io = false;
    while let Some(e) = source {
        if let Some(ioe) = e.downcast_ref::<std::io::Error>() {
            if tls_failure(ioe) {
                return Error::Handshake {
                    peer: peer.to_owned(),
                    reason: ioe.to_string(),
                };
            }
            io = true;
        }
        if e.downcast_ref::<rustls::Error>().is_some() {
            return Error::Handshake {
                peer: peer.to_owned(),
                reason: e.to_string(),
            };
        }
        source = e.source();
    }
    if io || err.is_closed() || err.is_incomplete_message() || err.is_canceled() {
        return Error::Network {
            peer: peer.to_owned(),
            reason: format!("HTTP: {err}"),
        };
    }
    Error::Protocol(format!("HTTP: {err}"))
}

/// Runs the bootstrap procedure against the profile's IN.
pub async fn enroll(e: Enrolment) -> Result<Enrolled> {
    enroll_prepared(&Prepared::new(&e)?).await
}

/// [`enroll`], leaving the credential as the IN provisioned it (version 1: still wrapped), for
/// a node that unwraps it somewhere safer than host memory (a PKCS#11 token).
pub async fn enroll_provisioned(e: Enrolment) -> Result<Enrolled<Provisioned>> {
    let p = Prepared::new(&e)?;
    with_timeout(&p, enroll_inner(&p)).await
}

async fn with_timeout<T>(
    p: &Prepared,
    f: impl std::future::Future<Output = Result<T>>,
) -> Result<T> {
    let timeout = p.timeout;
    tokio::time::timeout(timeout, f).await.map_err(|_| {
        Error::Timeout(format!(
            "after {timeout:?} waiting for the Infrastructure Node"
        ))
    })?
}

/// Runs the bootstrap procedure with a set-up made once ([`Prepared::new`]): what a tool that
/// enrols the same node repeatedly (or a benchmark) calls, so each enrolment costs only the
/// exchange itself.
pub async fn enroll_prepared(p: &Prepared) -> Result<Enrolled> {
    with_timeout(p, enroll_inner(p))
        .await?
        .map_credential(Provisioned::into_host)
}

/// What a field node sets up before it bootstraps: its certificate checked against its key, its
/// identity, and the TLS client configuration. Made once, it serves any number of
/// enrolments.
#[derive(Clone)]
pub struct Prepared {
    config: Arc<rustls::ClientConfig>,
    /// The DTLS context, when the profile says `transport = "dtls"`.
    dtls: Option<openssl::ssl::SslContext>,
    /// The protocol version asked for.
    protocol_version: u32,
    own_identity: FieldNodeIdentity,
    fqdn: m2mpki_ca::DnsName,
    addr: String,
    timeout: Duration,
}

impl std::fmt::Debug for Prepared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Prepared")
            .field("identity", &self.own_identity)
            .field("in_fqdn", &self.fqdn)
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl Prepared {
    /// Checks the node's certificate and key and builds the TLS configuration.
    pub fn new(e: &Enrolment) -> Result<Self> {
        let fqdn = e.profile.in_fqdn.clone();
        let leaf = e.chain.first().ok_or_else(|| Error::BadConfig {
            path: "--cert".into(),
            reason: "no certificate".into(),
        })?;
        let (_, own) =
            x509_parser::parse_x509_certificate(leaf).map_err(|err| Error::BadConfig {
                path: "--cert".into(),
                reason: format!("malformed certificate ({err})"),
            })?;
        if !e.key.matches(own.public_key().raw) {
            return Err(Error::BadConfig {
                path: "--key".into(),
                reason: "the key does not belong to the certificate".into(),
            });
        }
        let own_identity = FieldNodeIdentity::from_certificate(&own)?;
        let certified = Arc::new(rustls::sign::CertifiedKey::new(
            e.chain.clone(),
            Arc::new(TlsKey::new(e.key.clone())),
        ));
        let versions = if e.versions.is_empty() {
            vec![TlsVersion::Tls13, TlsVersion::Tls12]
        } else {
            e.versions.clone()
        };
        let config =
            tls::client_config(&versions, e.profile.roots.clone(), fqdn.clone(), certified)?;
        let dtls = match e.profile.transport {
            Transport::Tls => None,
            Transport::Dtls => {
                let pkcs8 = e.key.software_pkcs8().ok_or_else(|| Error::BadConfig {
                    path: "--key".into(),
                    reason: "the key is on a token; DTLS (OpenSSL) signs only with a key file here (docs/dtls.md)".into(),
                })?;
                let ders: Vec<Vec<u8>> = e.chain.iter().map(|c| c.as_ref().to_vec()).collect();
                Some(crate::dtls::client::context(
                    &e.profile.dtls_suites,
                    &ders,
                    &pkcs8,
                    e.profile.roots.clone(),
                    fqdn.clone(),
                )?)
            }
        };
        let port = match e.profile.transport {
            Transport::Tls => e.profile.port,
            Transport::Dtls => e.profile.coap_port,
        };
        let addr = e
            .connect
            .clone()
            .unwrap_or_else(|| format!("{fqdn}:{port}"));
        Ok(Prepared {
            config: Arc::new(config),
            dtls,
            protocol_version: e.profile.protocol_version,
            own_identity,
            fqdn,
            addr,
            timeout: e.timeout,
        })
    }
}

/// A mutually authenticated TLS session with the IN, before any request: what
/// [`enroll`] builds on, and a way for tests and other bindings to speak on the session.
pub struct Connected {
    /// The TLS stream.
    pub tls: tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
    /// `RootCredentialWrapKey`, exported from the session.
    pub wrap_key: WrapKey,
    /// The TS-0003 export of the session (protocol version 2).
    pub ts0003: Ts0003Keys,
    /// The negotiated TLS version.
    pub tls_version: String,
    /// `FQDN (address)`, for messages.
    pub peer: String,
    /// The identity in our own certificate.
    pub own_identity: FieldNodeIdentity,
}

impl std::fmt::Debug for Connected {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connected")
            .field("peer", &self.peer)
            .field("tls_version", &self.tls_version)
            .finish_non_exhaustive()
    }
}

/// Connects to the profile's IN and completes the mutual TLS handshake and the export.
pub async fn connect(e: &Enrolment) -> Result<Connected> {
    connect_prepared(&Prepared::new(e)?).await
}

/// [`connect`] with a set-up made once.
pub async fn connect_prepared(p: &Prepared) -> Result<Connected> {
    connect_prepared_from(p, None).await
}

/// [`connect_prepared`] from the local address `from` (a multi-homed node choosing its
/// interface), or from whatever the system picks.
pub async fn connect_prepared_from(
    p: &Prepared,
    from: Option<std::net::IpAddr>,
) -> Result<Connected> {
    let connect_err = |err: std::io::Error| Error::Connect {
        addr: p.addr.clone(),
        reason: err.to_string(),
    };
    let tcp = match from {
        None => tokio::net::TcpStream::connect(&p.addr)
            .await
            .map_err(connect_err)?,
        Some(local) => {
            let remote = tokio::net::lookup_host(&p.addr)
                .await
                .map_err(connect_err)?
                .find(|a| a.is_ipv4() == local.is_ipv4())
                .ok_or_else(|| {
                    connect_err(std::io::Error::other(format!(
                        "no address of the same family as {local}"
                    )))
                })?;
            let socket = if local.is_ipv4() {
                tokio::net::TcpSocket::new_v4()
            } else {
                tokio::net::TcpSocket::new_v6()
            }
            .map_err(connect_err)?;
            socket
                .bind(std::net::SocketAddr::new(local, 0))
                .map_err(connect_err)?;
            socket.connect(remote).await.map_err(connect_err)?
        }
    };
    let _ = tcp.set_nodelay(true);
    let server_name = ServerName::try_from(p.fqdn.to_string()).map_err(Error::internal)?;
    let peer = format!("{} ({})", p.fqdn, p.addr);
    let tls = TlsConnector::from(p.config.clone())
        .connect(server_name, tcp)
        .await
        .map_err(|err| handshake_error(&peer, err))?;
    let (_, conn) = tls.get_ref();
    let wrap_key = tls::export_wrap_key(conn)?;
    let ts0003 = tls::export_ts0003(conn)?;
    let tls_version = conn
        .protocol_version()
        .map_or_else(|| "?".into(), |v| format!("{v:?}"));
    Ok(Connected {
        tls,
        wrap_key,
        ts0003,
        tls_version,
        peer,
        own_identity: p.own_identity.clone(),
    })
}

async fn enroll_inner(p: &Prepared) -> Result<Enrolled<Provisioned>> {
    match &p.dtls {
        Some(ctx) => enroll_dtls(p, ctx).await,
        None => enroll_tls(p).await,
    }
}

/// The bootstrap over DTLS and CoAP: the same request and response documents as over HTTP.
async fn enroll_dtls(
    p: &Prepared,
    ctx: &openssl::ssl::SslContext,
) -> Result<Enrolled<Provisioned>> {
    let deadline = std::time::Instant::now() + p.timeout;
    let mut session =
        crate::dtls::client::connect(ctx, &p.addr, &p.fqdn, DEFAULT_MTU, deadline).await?;
    let body = serde_json::to_vec(&BootstrapRequest {
        version: p.protocol_version,
    })
    .map_err(Error::internal)?;
    let (status, bytes) = session.post_bootstrap(&body).await?;
    let wrap_key = session.wrap_key.clone();
    let keys = session.ts0003.clone();
    let protocol = session.protocol.clone();
    session.close().await;
    accept_response(p, status, &bytes, &wrap_key, &keys, protocol)
}

async fn enroll_tls(p: &Prepared) -> Result<Enrolled<Provisioned>> {
    let fqdn = p.fqdn.clone();
    let Connected {
        tls,
        wrap_key,
        ts0003,
        tls_version,
        peer,
        ..
    } = connect_prepared(p).await?;

    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .map_err(|err| Error::Protocol(format!("HTTP: {err}")))?;
    let driver = tokio::spawn(connection);
    let body = serde_json::to_vec(&BootstrapRequest {
        version: p.protocol_version,
    })
    .map_err(Error::internal)?;
    let req = hyper::Request::builder()
        .method(hyper::Method::POST)
        .uri(PATH)
        .header(hyper::header::HOST, fqdn.as_str())
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .header(hyper::header::ACCEPT, "application/json")
        .body(Full::new(Bytes::from(body)))
        .map_err(Error::internal)?;
    // In TLS 1.3 the client's handshake ends before the IN has judged its certificate; a
    // refusal then arrives as an alert while the request is under way.
    let resp = match sender.send_request(req).await {
        Ok(r) => r,
        Err(err) => {
            // The connection task may hold the real cause: the IN's alert.
            if let Ok(Ok(Err(conn_err))) =
                tokio::time::timeout(Duration::from_secs(2), driver).await
            {
                return Err(http_error(&peer, &conn_err));
            }
            return Err(http_error(&peer, &err));
        }
    };
    let status = resp.status();
    let bytes = Limited::new(resp.into_body(), MAX_RESPONSE)
        .collect()
        .await
        .map_err(|err| match err.downcast::<hyper::Error>() {
            Ok(h) => http_error(&peer, &h),
            Err(other) => Error::Protocol(format!("reading the response: {other}")),
        })?
        .to_bytes();
    driver.abort();
    accept_response(p, status.as_u16(), &bytes, &wrap_key, &ts0003, tls_version)
}

/// Checks a response document (either transport; `status` as HTTP reads it, CoAP `c.dd` as
/// `c*100+dd`) and takes the credential as provisioned.
fn accept_response(
    p: &Prepared,
    status: u16,
    bytes: &[u8],
    wrap_key: &WrapKey,
    keys: &Ts0003Keys,
    tls_version: String,
) -> Result<Enrolled<Provisioned>> {
    let fqdn = &p.fqdn;
    let own_identity = &p.own_identity;
    if !(200..300).contains(&status) {
        let detail: Option<ErrorBody> = serde_json::from_slice(bytes).ok();
        return Err(match detail {
            Some(d) => Error::Refused {
                status,
                code: d.error.code,
                message: d.error.message,
            },
            None => Error::Refused {
                status,
                code: "unknown".into(),
                message: String::from_utf8_lossy(bytes).chars().take(200).collect(),
            },
        });
    }
    let r: BootstrapResponse = serde_json::from_slice(bytes)
        .map_err(|err| Error::Protocol(format!("malformed response: {err}")))?;
    if r.version != p.protocol_version {
        return Err(Error::Protocol(format!(
            "the response is of version {}, we asked for {}",
            r.version, p.protocol_version
        )));
    }
    if r.in_fqdn != fqdn.as_str() {
        return Err(Error::Protocol(format!(
            "the response names IN `{}`, but we dialled `{fqdn}`",
            r.in_fqdn
        )));
    }
    if &r.identity != own_identity {
        return Err(Error::Protocol(format!(
            "the response names identity `{}`, but our certificate says `{own_identity}`",
            r.identity
        )));
    }
    let (credential, ke_id) = if r.version == VERSION_TS0003 {
        // Both ends derived Ke; the IN proves it did by naming the same KeID.
        let own = keys.ke_id(fqdn.as_str());
        if r.ke_id.as_deref() != Some(own.as_str()) || r.credential_id != own {
            return Err(Error::Protocol(format!(
                "the response names KeID {:?}, but our session gives `{own}`",
                r.ke_id
            )));
        }
        if r.wrapped_credential.is_some() {
            return Err(Error::Protocol(
                "a version 2 response carries a wrapped credential".into(),
            ));
        }
        (Provisioned::Ke(keys.ke().clone()), Some(own))
    } else {
        if r.wrap_algorithm.as_deref() != Some(WRAP_ALGORITHM) {
            return Err(Error::Protocol(format!(
                "unsupported wrap algorithm {:?}",
                r.wrap_algorithm
            )));
        }
        let b64 = r
            .wrapped_credential
            .as_deref()
            .ok_or_else(|| Error::Protocol("the response carries no wrapped_credential".into()))?;
        let wrapped = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .map_err(|_| Error::Protocol("wrapped_credential is not base64".into()))?;
        (
            Provisioned::Wrapped {
                wrap_key: wrap_key.clone(),
                wrapped,
            },
            None,
        )
    };
    Ok(Enrolled {
        ke_id,
        credential_id: r.credential_id,
        in_fqdn: r.in_fqdn,
        identity: r.identity,
        admitted_by: r.admitted_by,
        expires: r.expires,
        grants: r.grants,
        parameters: r.parameters,
        tls_version,
        credential,
    })
}
