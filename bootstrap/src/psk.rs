//! The credential put to use: TS-0003's Provisioned Symmetric Key security association
//! (clause 8.2.2.1), with the root credential a bootstrap provisioned as the pre-shared key.
//!
//! The IN side is a TLS 1.2 listener (OpenSSL: rustls has no PSK support) that looks the key
//! up by PSK identity — the credential ID, which for protocol version 2 is the KeID — in the
//! sealed credential store, and refuses identities it does not know, superseded credentials
//! and expired ones. Once the handshake proves the node holds the key, the IN knows which
//! field node is talking, and hands that on: `GET /.well-known/m2mpki/association` is answered
//! by the IN itself (who the association authenticated), and every other HTTP request is
//! forwarded to the configured upstream (the IN-CSE) with the authenticated identity in
//! `X-M2mpki-Identity` and the credential in `X-M2mpki-Credential-Id`; the same headers sent by
//! the node are removed first, so only the IN can set them. docs/protocol.md §9 has the
//! design and its trade-offs.
//!
//! The node side is [`associate`]: a PSK client for a credential file.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use m2mpki_connection::admission::Ticket;
use openssl::ex_data::Index;
use openssl::ssl::{Ssl, SslContext, SslContextBuilder};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::credstore::{CredentialStatus, CredentialStore, StoreKey};
use crate::dtls::openssl_error;
use crate::{Error, Result};
use m2mpki_connection::http_head::{self, Head};

/// Where the IN answers who an association authenticated.
pub const ASSOCIATION_PATH: &str = "/.well-known/m2mpki/association";
/// The header carrying the authenticated identity to the upstream.
pub const IDENTITY_HEADER: &str = "X-M2mpki-Identity";
/// The header carrying the credential ID (the PSK identity) to the upstream.
pub const CREDENTIAL_HEADER: &str = "X-M2mpki-Credential-Id";

/// TLS 1.2 PSK suites, ECDHE first (forward secrecy where the node offers it), then the plain
/// PSK suites constrained nodes implement (RFC 6655's CCM_8 among them).
pub const TLS_SUITES: &str = "ECDHE-PSK-AES128-CBC-SHA256:ECDHE-PSK-CHACHA20-POLY1305:\
ECDHE-PSK-AES256-CBC-SHA384:PSK-AES128-GCM-SHA256:PSK-AES256-GCM-SHA384:PSK-AES128-CCM8:\
PSK-AES128-CCM:PSK-CHACHA20-POLY1305:PSK-AES128-CBC-SHA256";

/// Who an association authenticated: what the IN's record says of the PSK identity.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Association {
    /// The field node's identity (canonical form).
    pub identity: String,
    /// The credential ID the node used as PSK identity.
    pub credential_id: String,
    /// When the credential expires (Unix time).
    pub expires: i64,
}

fn association_index() -> Result<Index<Ssl, Association>> {
    static INDEX: OnceLock<Index<Ssl, Association>> = OnceLock::new();
    crate::dtls::ex_index(&INDEX)
}

/// Why a PSK identity gets no key.
fn lookup(
    store: &CredentialStore,
    key: &StoreKey,
    identity: &str,
    now: i64,
) -> std::result::Result<(Association, crate::protocol::RootCredential), &'static str> {
    // Credential IDs and KeIDs are stored in lower case (hex, and the IN's FQDN as a DNS
    // name); nodes scripted from `openssl s_client -keymatexport` print the hex in upper case.
    let identity = identity.to_ascii_lowercase();
    let record = match store.credential(&identity) {
        Ok(Some(r)) => r,
        Ok(None) => return Err("unknown_credential"),
        Err(_) => return Err("store_unavailable"),
    };
    if record.status != CredentialStatus::Live {
        return Err("credential_superseded");
    }
    if record.expires <= now {
        return Err("credential_expired");
    }
    let secret = store
        .unseal(key, &record)
        .map_err(|_| "credential_unsealable")?;
    Ok((
        Association {
            identity: record.identity.to_string(),
            credential_id: record.id,
            expires: record.expires,
        },
        secret,
    ))
}

/// The IN's PSK context over TLS: TLS 1.2, PSK suites only, the key looked up by identity in
/// `store`, an SNI other than the IN's names refused (`sni`).
pub(crate) fn server_context(
    store: Arc<CredentialStore>,
    key: StoreKey,
    sni: crate::tls::SniRule,
) -> Result<SslContext> {
    use m2mpki_connection::openssl::{context, Profile, Stack};
    let mut b = context(Profile {
        stack: Stack::TlsServer,
        ciphers: TLS_SUITES,
        groups: None,
        server_preference: true,
    })
    .map_err(openssl_error)?;
    crate::dtls::check_sni(&mut b, sni, "psk");
    install_lookup(&mut b, store, key)?;
    Ok(b.build())
}

/// The IN's PSK context over DTLS 1.2 (CoAP), with TS-0003's `TLS_PSK_WITH_AES_128_CCM_8`
/// first.
pub(crate) fn dtls_server_context(
    store: Arc<CredentialStore>,
    key: StoreKey,
    sni: crate::tls::SniRule,
) -> Result<SslContext> {
    let mut list = DTLS_SUITES.to_owned();
    // OpenSSL 3.2 and later count CCM_8's 64-bit tag below security level 1.
    if openssl::version::number() >= 0x3020_0000 {
        list.push_str(":@SECLEVEL=0");
    }
    let mut b = crate::dtls::base_context(true, &list)?;
    crate::dtls::check_sni(&mut b, sni, "psk-dtls");
    install_lookup(&mut b, store, key)?;
    Ok(b.build())
}

/// DTLS 1.2 PSK suites: TS-0003's mandatory one first.
pub const DTLS_SUITES: &str = "PSK-AES128-CCM8:ECDHE-PSK-AES128-CBC-SHA256:PSK-AES128-CCM:\
PSK-AES128-GCM-SHA256:ECDHE-PSK-CHACHA20-POLY1305:PSK-CHACHA20-POLY1305";

/// The association a PSK handshake of `ssl` authenticated, if it did.
pub(crate) fn association_of(ssl: &openssl::ssl::SslRef) -> Option<Association> {
    association_index()
        .ok()
        .and_then(|i| ssl.ex_data(i).cloned())
}

/// Installs the PSK lookup: the identity names a credential record of `store`.
fn install_lookup(
    b: &mut SslContextBuilder,
    store: Arc<CredentialStore>,
    key: StoreKey,
) -> Result<()> {
    let index = association_index()?;
    b.set_psk_server_callback(move |ssl, identity, psk| {
        let Some(identity) = identity.and_then(|i| std::str::from_utf8(i).ok()) else {
            tracing::info!("PSK association refused: no readable PSK identity");
            return Ok(0);
        };
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        match lookup(&store, &key, identity, now) {
            Ok((assoc, secret)) => {
                let bytes = secret.expose();
                let Some(out) = psk.get_mut(..bytes.len()) else {
                    return Ok(0);
                };
                out.copy_from_slice(bytes);
                ssl.set_ex_data(index, assoc);
                Ok(bytes.len())
            }
            Err(code) => {
                tracing::info!(
                    psk_identity = %identity.escape_debug(),
                    code,
                    "PSK association refused"
                );
                Ok(0)
            }
        }
    });
    Ok(())
}

/// The association listener of a running IN.
pub(crate) struct Listener {
    pub(crate) ctx: SslContext,
    pub(crate) upstream: Option<SocketAddr>,
    /// How long the upstream may take to start its answer (504 after), and to finish it.
    pub(crate) upstream_timeout: Duration,
    pub(crate) limits: crate::config::Limits,
    /// The connection slots it shares with the bootstrap listener.
    pub(crate) admission: Arc<m2mpki_connection::Admission>,
}

impl Listener {
    /// Serves until `stop` resolves.
    pub(crate) async fn run(
        self: Arc<Self>,
        listener: TcpListener,
        stop: impl std::future::Future<Output = ()>,
    ) {
        let admission = self.admission.clone();
        let first = m2mpki_connection::First::TlsRecord;
        m2mpki_connection::serve(
            listener,
            admission,
            "PSK association",
            first,
            stop,
            move |c| {
                let this = self.clone();
                async move {
                    let limit = this.limits.handshake_timeout + this.limits.idle_timeout;
                    let peer = c.peer;
                    if tokio::time::timeout(limit, this.serve(c)).await.is_err() {
                        tracing::info!(%peer, "PSK association took too long; closed");
                    }
                }
            },
        )
        .await;
    }

    async fn serve(&self, conn: m2mpki_connection::Conn) {
        let (peer, mut ticket) = (conn.peer, conn.ticket);
        let ssl = match Ssl::new(&self.ctx) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "PSK session setup failed");
                return;
            }
        };
        let Ok(mut tls) = tokio_openssl::SslStream::new(ssl, conn.tcp) else {
            return;
        };
        let handshake = Pin::new(&mut tls).accept();
        let done = self
            .admission
            .handshake(&mut ticket, peer, "PSK", handshake);
        if done.await.is_err() {
            return;
        }
        let Some(assoc) = association_of(tls.ssl()) else {
            tracing::warn!(%peer, "PSK handshake completed without a looked-up credential; closed");
            return;
        };
        let suite = tls
            .ssl()
            .current_cipher()
            .map_or("?", openssl::ssl::SslCipherRef::name)
            .to_owned();
        tracing::info!(%peer, identity = %assoc.identity, credential = %assoc.credential_id, %suite, "PSK association established");
        if let Err(e) = self.exchange(&mut tls, &assoc, peer, ticket).await {
            tracing::info!(%peer, error = %e, "PSK association ended with an error");
        }
        let _ = tls.shutdown().await;
    }

    /// One HTTP request on an established association: answered here or forwarded. The
    /// connection can be evicted until its request head is in, not after.
    async fn exchange(
        &self,
        tls: &mut tokio_openssl::SslStream<TcpStream>,
        assoc: &Association,
        peer: SocketAddr,
        mut ticket: Ticket,
    ) -> std::io::Result<()> {
        let max_body = self.limits.max_body;
        let head = tokio::time::timeout(self.limits.idle_timeout, http_head::read(tls, max_body));
        let Some(head) = ticket.or_evicted(head).await else {
            tracing::info!(%peer, "PSK association evicted while waiting for its request");
            return Ok(());
        };
        ticket.leave();
        let buffered = match head {
            Ok(Ok(Head::Ok { buffered })) => buffered,
            Ok(Ok(Head::Refuse(r))) => {
                let body = m2mpki_connection::http::error_document(r.code, &r.message);
                let out = http_head::json_response(r.status, &body);
                return tls.write_all(&out).await;
            }
            Ok(Ok(Head::Closed)) | Err(_) => return Ok(()),
            Ok(Err(e)) => return Err(e),
        };
        let request = match Request::parse(&buffered) {
            Ok(r) => r,
            Err(status_msg) => {
                let body = m2mpki_connection::http::error_document("bad_request", &status_msg);
                let out = http_head::json_response(hyper::StatusCode::BAD_REQUEST, &body);
                return tls.write_all(&out).await;
            }
        };
        if request.path == ASSOCIATION_PATH {
            let status = if request.method == "GET" {
                hyper::StatusCode::OK
            } else {
                hyper::StatusCode::METHOD_NOT_ALLOWED
            };
            let body = if status == hyper::StatusCode::OK {
                serde_json::to_vec(assoc).map_err(std::io::Error::other)?
            } else {
                m2mpki_connection::http::error_document("method_not_allowed", "GET only")
            };
            return tls
                .write_all(&http_head::json_response(status, &body))
                .await;
        }
        let Some(upstream) = self.upstream else {
            let body = m2mpki_connection::http::error_document(
                "not_found",
                &format!("no upstream is configured; this IN answers {ASSOCIATION_PATH} only"),
            );
            return tls
                .write_all(&http_head::json_response(
                    hyper::StatusCode::NOT_FOUND,
                    &body,
                ))
                .await;
        };
        // The whole body first (bounded by max_body), so the upstream gets one clean request.
        let mut body = buffered[request.head_len..].to_vec();
        let want = request.content_length.unwrap_or(0);
        while body.len() < want {
            let mut chunk = vec![0u8; (want - body.len()).min(16 * 1024)];
            let n = tls.read(&mut chunk).await?;
            if n == 0 {
                return Ok(());
            }
            body.extend_from_slice(&chunk[..n]);
        }
        body.truncate(want);
        let mut up = match TcpStream::connect(upstream).await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(%upstream, error = %e, "upstream unreachable");
                let body = m2mpki_connection::http::error_document(
                    "upstream_unavailable",
                    "the service behind the IN is unreachable",
                );
                return tls
                    .write_all(&http_head::json_response(
                        hyper::StatusCode::BAD_GATEWAY,
                        &body,
                    ))
                    .await;
            }
        };
        up.write_all(&request.forwarded_head(assoc, peer, upstream))
            .await?;
        up.write_all(&body).await?;
        up.flush().await?;
        // The upstream's answer, then the association closes (one request each). An upstream
        // that closes without a byte is 502; one silent past the upstream timeout is 504.
        let gateway = |status: hyper::StatusCode, code: &str, message: &str| {
            let body = m2mpki_connection::http::error_document(code, message);
            http_head::json_response(status, &body)
        };
        let mut first = vec![0u8; 16 * 1024];
        match tokio::time::timeout(self.upstream_timeout, up.read(&mut first)).await {
            Err(_) => {
                tracing::warn!(%upstream, "upstream did not answer within the upstream timeout");
                return tls
                    .write_all(&gateway(
                        hyper::StatusCode::GATEWAY_TIMEOUT,
                        "upstream_timeout",
                        "the service behind the IN did not answer in time",
                    ))
                    .await;
            }
            Ok(Ok(0)) | Ok(Err(_)) => {
                tracing::warn!(%upstream, "upstream closed without answering");
                return tls
                    .write_all(&gateway(
                        hyper::StatusCode::BAD_GATEWAY,
                        "upstream_closed",
                        "the service behind the IN closed the connection without answering",
                    ))
                    .await;
            }
            Ok(Ok(n)) => tls.write_all(&first[..n]).await?,
        }
        let rest = tokio::io::copy(&mut up, tls);
        if tokio::time::timeout(self.upstream_timeout, rest)
            .await
            .is_err()
        {
            tracing::warn!(%upstream, "upstream answer cut off after the upstream timeout");
        }
        Ok(())
    }
}

/// A parsed request head.
struct Request {
    method: String,
    path: String,
    /// The node's Host header (the first).
    host: Option<Vec<u8>>,
    /// `Name: value` lines to pass on.
    headers: Vec<(String, Vec<u8>)>,
    head_len: usize,
    content_length: Option<usize>,
}

/// A header name as CGI/WSGI-style upstreams see it: case folded and `_` taken for `-`
/// (`X_M2mpki_Identity` becomes `HTTP_X_M2MPKI_IDENTITY` there, as `X-M2mpki-Identity` does).
fn folded(name: &str) -> String {
    name.bytes()
        .map(|b| match b {
            b'_' => '-',
            b => char::from(b.to_ascii_lowercase()),
        })
        .collect()
}

/// Headers that concern one hop only, say where the request came from, or that only the IN
/// may set, compared as [`folded`]: the IN sets its own (identity, credential, the node's
/// address in `X-Forwarded-For`, `X-Real-IP` and `Forwarded`) and `connection: close`.
fn dropped(folded_name: &str) -> bool {
    [
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authorization",
        "proxy-authenticate",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "content-length",
        "x-forwarded-for",
        "x-forwarded-host",
        "x-forwarded-proto",
        "x-real-ip",
        "forwarded",
        "host",
    ]
    .contains(&folded_name)
        || folded_name == folded(IDENTITY_HEADER)
        || folded_name == folded(CREDENTIAL_HEADER)
}

impl Request {
    fn parse(buf: &[u8]) -> std::result::Result<Self, String> {
        let mut headers = [httparse::EMPTY_HEADER; http_head::MAX_HEADERS];
        let mut req = httparse::Request::new(&mut headers);
        let head_len = match req.parse(buf) {
            Ok(httparse::Status::Complete(n)) => n,
            _ => return Err("malformed request head".into()),
        };
        let method = req.method.unwrap_or("").to_owned();
        let path = req.path.unwrap_or("").to_owned();
        // Origin-form only: the IN is the origin to the node, not a forward proxy.
        if method == "CONNECT" || !path.starts_with('/') {
            return Err(format!(
                "only origin-form targets (/path) are forwarded, not `{method} {path}`"
            ));
        }
        let mut content_length = None;
        let mut host = None;
        // Headers named in Connection concern this hop only (RFC 9110 §7.6.1).
        let hop: Vec<String> = req
            .headers
            .iter()
            .filter(|h| folded(h.name) == "connection")
            .flat_map(|h| {
                String::from_utf8_lossy(h.value)
                    .split(',')
                    .map(|t| folded(t.trim()))
                    .collect::<Vec<_>>()
            })
            .collect();
        let mut kept = Vec::new();
        for h in req.headers.iter() {
            let name = folded(h.name);
            if name == "transfer-encoding" {
                return Err("chunked request bodies are not forwarded; send Content-Length".into());
            }
            if name == "content-length" {
                content_length = std::str::from_utf8(h.value)
                    .ok()
                    .and_then(|v| v.parse().ok());
            }
            if name == "host" && host.is_none() {
                host = Some(h.value.to_vec());
            }
            if !dropped(&name) && !hop.contains(&name) {
                kept.push((h.name.to_owned(), h.value.to_vec()));
            }
        }
        Ok(Request {
            method,
            path,
            host,
            headers: kept,
            head_len,
            content_length,
        })
    }

    fn forwarded_head(
        &self,
        assoc: &Association,
        peer: SocketAddr,
        upstream: SocketAddr,
    ) -> Vec<u8> {
        let mut out = format!("{} {} HTTP/1.1\r\nHost: ", self.method, self.path).into_bytes();
        // HTTP/1.1 needs a Host: the node's (one), or the upstream's address for an HTTP/1.0
        // request that had none.
        match &self.host {
            Some(h) => out.extend_from_slice(h),
            None => out.extend_from_slice(upstream.to_string().as_bytes()),
        }
        out.extend_from_slice(b"\r\n");
        let for_value = match peer.ip() {
            std::net::IpAddr::V4(ip) => ip.to_string(),
            std::net::IpAddr::V6(ip) => format!("\"[{ip}]\""),
        };
        for (name, value) in &self.headers {
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(value);
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(
            format!(
                "{IDENTITY_HEADER}: {}\r\n{CREDENTIAL_HEADER}: {}\r\nX-Forwarded-For: {ip}\r\nX-Real-IP: {ip}\r\nForwarded: for={for_value}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                assoc.identity,
                assoc.credential_id,
                self.content_length.unwrap_or(0),
                ip = peer.ip(),
            )
            .as_bytes(),
        );
        out
    }
}

/// What [`associate`] needs: the credential a bootstrap wrote, and where the IN listens.
#[derive(Debug)]
pub struct AssociateRequest {
    /// The credential ID (the PSK identity).
    pub credential_id: String,
    /// The credential (the PSK).
    pub credential: crate::protocol::RootCredential,
    /// The IN's FQDN (sent as SNI).
    pub in_fqdn: String,
    /// The IN's association listener.
    pub connect: SocketAddr,
    /// Connect, handshake and answer timeout.
    pub timeout: Duration,
}

/// What the IN said of an association it accepted.
#[derive(Debug, Clone, Serialize)]
pub struct Associated {
    /// The IN's answer.
    #[serde(flatten)]
    pub association: Association,
    /// The TLS suite negotiated.
    pub suite: String,
}

/// Establishes a PSK association with the IN and asks it who it authenticated.
pub fn associate(req: &AssociateRequest) -> Result<Associated> {
    let addr = req.connect.to_string();
    let conn_err = |reason: String| Error::Connect {
        addr: addr.clone(),
        reason,
    };
    use m2mpki_connection::openssl::{context, Profile, Stack};
    let mut b = context(Profile {
        stack: Stack::TlsClient,
        ciphers: TLS_SUITES,
        groups: None,
        server_preference: false,
    })
    .map_err(openssl_error)?;
    let identity = req.credential_id.clone();
    let key = req.credential.clone();
    b.set_psk_client_callback(move |_ssl, _hint, id_out, psk_out| {
        let id = identity.as_bytes();
        let (Some(id_slot), Some(psk_slot)) = (
            id_out.get_mut(..id.len() + 1),
            psk_out.get_mut(..key.expose().len()),
        ) else {
            return Ok(0);
        };
        id_slot[..id.len()].copy_from_slice(id);
        id_slot[id.len()] = 0;
        psk_slot.copy_from_slice(key.expose());
        Ok(psk_slot.len())
    });
    let ctx = b.build();
    let mut ssl = Ssl::new(&ctx).map_err(openssl_error)?;
    ssl.set_hostname(&req.in_fqdn).map_err(openssl_error)?;
    let tcp = std::net::TcpStream::connect_timeout(&req.connect, req.timeout)
        .map_err(|e| conn_err(e.to_string()))?;
    tcp.set_read_timeout(Some(req.timeout))
        .and_then(|()| tcp.set_write_timeout(Some(req.timeout)))
        .map_err(|e| conn_err(e.to_string()))?;
    let mut tls = ssl.connect(tcp).map_err(|e| Error::Handshake {
        peer: addr.clone(),
        reason: match e {
            openssl::ssl::HandshakeError::Failure(m) => m.error().to_string(),
            other => other.to_string(),
        },
    })?;
    let suite = tls
        .ssl()
        .current_cipher()
        .map_or("?", openssl::ssl::SslCipherRef::name)
        .to_owned();
    let request = format!(
        "GET {ASSOCIATION_PATH} HTTP/1.1\r\nhost: {}\r\nconnection: close\r\n\r\n",
        req.in_fqdn
    );
    tls.write_all(request.as_bytes())
        .map_err(|e| conn_err(e.to_string()))?;
    let mut answer = Vec::new();
    match tls.read_to_end(&mut answer) {
        Ok(_) => {}
        // A peer that closes without close_notify after a whole answer is still an answer.
        Err(_) if !answer.is_empty() => {}
        Err(e) => return Err(conn_err(e.to_string())),
    }
    let bad = |reason: String| Error::Protocol(format!("association answer: {reason}"));
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut resp = httparse::Response::new(&mut headers);
    let head_len = match resp.parse(&answer) {
        Ok(httparse::Status::Complete(n)) => n,
        _ => return Err(bad("not an HTTP response".into())),
    };
    if resp.code != Some(200) {
        return Err(bad(format!(
            "status {} ({})",
            resp.code.unwrap_or(0),
            String::from_utf8_lossy(&answer[head_len..])
                .chars()
                .take(300)
                .collect::<String>()
        )));
    }
    let association: Association =
        serde_json::from_slice(&answer[head_len..]).map_err(|e| bad(e.to_string()))?;
    if association.credential_id != req.credential_id {
        return Err(bad(format!(
            "the IN names credential {}, not ours ({})",
            association.credential_id, req.credential_id
        )));
    }
    Ok(Associated { association, suite })
}
