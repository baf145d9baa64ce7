//! TS-0003's mandatory TLS 1.2 suite, `TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA256`, for field nodes
//! that offer nothing else. rustls will never implement CBC suites (MAC-then-encrypt is a
//! non-feature in its manual), so when `tls.ts0003_cbc = true` the IN reads each ClientHello on
//! its TLS port first (without consuming it) and hands a hello that offers this suite and none
//! of rustls's to OpenSSL, with the same chain check, SNI rule, EMS requirement, exporters and
//! enrolment core; every other hello goes to rustls as before. Off by default.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use openssl::ssl::{
    Ssl, SslContext, SslContextBuilder, SslMethod, SslMode, SslOptions, SslSessionCacheMode,
    SslVersion,
};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::dtls::{export_ts0003, export_wrap_key, install_verifier, openssl_error, Verdict};
use crate::enrol::{Admitted, Core};
use crate::tls::FieldNodeVerifier;
use crate::Result;

/// `TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA256`.
pub const CBC_SUITE: u16 = 0xC023;
const EXT_SERVER_NAME: u16 = 0;
const EXT_EMS: u16 = 23;

/// What the IN needs to know of a TLS ClientHello before choosing a stack.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsHello {
    /// Offered cipher suites.
    pub suites: Vec<u16>,
    /// Offers the extended master secret.
    pub ems: bool,
    /// Carries SNI.
    pub sni: bool,
    /// The host name of its SNI, when it carries one that reads as text.
    pub server_name: Option<String>,
}

fn be(d: &[u8], at: usize, n: usize) -> Option<usize> {
    let b = d.get(at..at.checked_add(n)?)?;
    Some(b.iter().fold(0usize, |acc, x| (acc << 8) | usize::from(*x)))
}

fn vector(d: &[u8], at: usize, len_bytes: usize) -> Option<(&[u8], usize)> {
    let len = be(d, at, len_bytes)?;
    let start = at + len_bytes;
    let end = start.checked_add(len)?;
    Some((d.get(start..end)?, end))
}

/// Reads a ClientHello that fits its first record (every hello a node sends does; a longer one
/// is read as "not for OpenSSL" and goes to rustls, which reassembles it).
pub fn parse_hello(d: &[u8]) -> Option<TlsHello> {
    if *d.first()? != 22 || *d.get(1)? != 3 {
        return None;
    }
    let (record, _) = vector(d, 3, 2)?;
    if *record.first()? != 1 {
        return None;
    }
    let (hello, _) = vector(record, 1, 3)?;
    // client_version(2) random(32) session_id<1> cipher_suites<2> compression<1> extensions<2>
    let (_, after_sid) = vector(hello, 34, 1)?;
    let (suites, after_suites) = vector(hello, after_sid, 2)?;
    let (_, after_comp) = vector(hello, after_suites, 1)?;
    let suites = suites
        .chunks_exact(2)
        .map(|c| u16::from_be_bytes([c[0], c[1]]))
        .collect();
    let (mut ext, _) = match hello.get(after_comp..) {
        Some([]) | None => (&[][..], 0),
        Some(_) => vector(hello, after_comp, 2)?,
    };
    let (mut ems, mut sni) = (false, false);
    let mut server_name = None;
    while !ext.is_empty() {
        let kind = u16::try_from(be(ext, 0, 2)?).ok()?;
        let (body, next) = vector(ext, 2, 2)?;
        ems |= kind == EXT_EMS;
        if kind == EXT_SERVER_NAME {
            sni = true;
            // server_name_list<2> { name_type(1) = host_name(0), HostName<2> } (RFC 6066 §3)
            if let Some((list, _)) = vector(body, 0, 2) {
                if list.first() == Some(&0) {
                    if let Some((host, _)) = vector(list, 1, 2) {
                        server_name = std::str::from_utf8(host).ok().map(str::to_owned);
                    }
                }
            }
        }
        ext = ext.get(next..)?;
    }
    Some(TlsHello {
        suites,
        ems,
        sni,
        server_name,
    })
}

/// The CBC path of an IN: its OpenSSL context, and the suites rustls serves (a hello offering
/// any of them goes to rustls).
pub struct Cbc {
    /// The context.
    pub ctx: SslContext,
    rustls_suites: Vec<u16>,
}

impl Cbc {
    /// The CBC path beside rustls serving `versions`.
    pub fn new(ctx: SslContext, versions: &[crate::config::TlsVersion]) -> Self {
        let versions = crate::tls::versions(versions);
        let rustls_suites = crate::tls::provider()
            .cipher_suites
            .iter()
            .filter(|s| versions.iter().any(|v| s.version() == *v))
            .map(|s| u16::from(s.suite()))
            .collect();
        Cbc { ctx, rustls_suites }
    }

    /// Whether OpenSSL serves this hello: it offers the CBC suite and nothing rustls serves.
    pub fn chooses(&self, hello: &TlsHello) -> bool {
        hello.suites.contains(&CBC_SUITE)
            && !hello.suites.iter().any(|s| self.rustls_suites.contains(s))
    }
}

/// The OpenSSL context for the CBC suite: TLS 1.2 only, that one suite, the IN's chain and
/// software key, our chain check, SNI required (when configured), no tickets or session cache,
/// no renegotiation.
pub fn context(
    chain: &[Vec<u8>],
    pkcs8: &[u8],
    verifier: Arc<FieldNodeVerifier>,
    sni: crate::tls::SniRule,
) -> Result<SslContext> {
    let mut b = SslContextBuilder::new(SslMethod::tls_server()).map_err(openssl_error)?;
    b.set_min_proto_version(Some(SslVersion::TLS1_2))
        .map_err(openssl_error)?;
    b.set_max_proto_version(Some(SslVersion::TLS1_2))
        .map_err(openssl_error)?;
    b.set_cipher_list("ECDHE-ECDSA-AES128-SHA256")
        .map_err(openssl_error)?;
    b.set_groups_list("P-256:X25519:P-384")
        .map_err(openssl_error)?;
    b.set_options(SslOptions::NO_TICKET | SslOptions::NO_RENEGOTIATION);
    b.set_mode(SslMode::RELEASE_BUFFERS);
    b.set_session_cache_mode(SslSessionCacheMode::OFF);
    crate::dtls::set_identity(&mut b, chain, pkcs8)?;
    install_verifier(&mut b, move |chain| {
        verifier.verify(chain, time::OffsetDateTime::now_utc())
    });
    crate::dtls::check_sni(&mut b, sni, "tls-cbc");
    Ok(b.build())
}

/// A fatal handshake_failure alert (TLS 1.2 record), for a hello refused before OpenSSL.
const HANDSHAKE_FAILURE: [u8; 7] = [21, 3, 3, 0, 2, 2, 40];

/// Serves one connection whose hello chose the CBC suite.
pub async fn serve(
    core: Arc<Core>,
    ctx: &SslContext,
    mut tcp: TcpStream,
    peer: SocketAddr,
    hello: &TlsHello,
    mut ticket: crate::admission::Ticket,
) {
    if !hello.ems {
        tracing::info!(%peer, "TLS 1.2 (CBC) hello without the extended master secret refused");
        let _ = tcp.write_all(&HANDSHAKE_FAILURE).await;
        return;
    }
    let Ok(mut ssl) = Ssl::new(ctx) else {
        return;
    };
    let verdict = crate::dtls::attach_verdict(&mut ssl);
    let Ok(verdict) = verdict else {
        return;
    };
    let Ok(mut stream) = tokio_openssl::SslStream::new(ssl, tcp) else {
        return;
    };
    let limit = core.config.limits.handshake_timeout;
    let handshake = tokio::time::timeout(limit, Pin::new(&mut stream).accept());
    match ticket.or_evicted(handshake).await {
        Some(Ok(Ok(()))) => {}
        Some(Ok(Err(e))) => {
            tracing::info!(%peer, error = %e, "TLS 1.2 (CBC) handshake failed");
            return;
        }
        Some(Err(_)) => {
            tracing::info!(%peer, "TLS 1.2 (CBC) handshake timed out");
            return;
        }
        None => {
            tracing::info!(%peer, "TLS 1.2 (CBC) connection evicted during the handshake");
            return;
        }
    }
    let Some(node) = admit(&stream, &verdict, peer) else {
        return;
    };
    crate::http::serve_http(core, node, stream, ticket).await;
}

fn admit(
    stream: &tokio_openssl::SslStream<TcpStream>,
    verdict: &Verdict,
    peer: SocketAddr,
) -> Option<Admitted> {
    let verified = match verdict.lock().ok().and_then(|g| g.clone()) {
        Some(Ok(v)) => v,
        Some(Err(r)) => {
            tracing::warn!(%peer, code = r.code(), "refused after the handshake");
            return None;
        }
        None => {
            tracing::warn!(%peer, "handshake completed without our chain check; refused");
            return None;
        }
    };
    let ssl = stream.ssl();
    let (wrap_key, ts0003) = match (export_wrap_key(ssl), export_ts0003(ssl)) {
        (Ok(w), Ok(t)) => (w, t),
        _ => {
            tracing::warn!(%peer, "exporter failed");
            return None;
        }
    };
    Some(Admitted {
        wrap_key,
        verified,
        peer,
        transport: "TLSv1_2 TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA256 (OpenSSL)".into(),
        ts0003,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello(suites: &[u16], ext: &[u16]) -> Vec<u8> {
        let mut body = vec![3, 3];
        body.extend_from_slice(&[9; 32]);
        body.push(0);
        body.extend_from_slice(&((suites.len() * 2) as u16).to_be_bytes());
        for s in suites {
            body.extend_from_slice(&s.to_be_bytes());
        }
        body.extend_from_slice(&[1, 0]);
        let mut e = Vec::new();
        for x in ext {
            e.extend_from_slice(&x.to_be_bytes());
            e.extend_from_slice(&[0, 0]);
        }
        body.extend_from_slice(&(e.len() as u16).to_be_bytes());
        body.extend_from_slice(&e);
        let mut hs = vec![1];
        hs.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
        hs.extend_from_slice(&body);
        let mut d = vec![22, 3, 1];
        d.extend_from_slice(&(hs.len() as u16).to_be_bytes());
        d.extend_from_slice(&hs);
        d
    }

    #[test]
    fn reads_suites_ems_and_sni() {
        let d = hello(&[CBC_SUITE, 0xC02B], &[EXT_SERVER_NAME, EXT_EMS]);
        assert_eq!(
            parse_hello(&d),
            Some(TlsHello {
                suites: vec![CBC_SUITE, 0xC02B],
                ems: true,
                sni: true,
                server_name: None, // the test hello's extension is empty
            })
        );
        let bare = parse_hello(&hello(&[CBC_SUITE], &[])).unwrap();
        assert!(!bare.ems && !bare.sni);
        for cut in 0..d.len() {
            assert_eq!(parse_hello(&d[..cut]), None, "cut at {cut}");
        }
    }
}
