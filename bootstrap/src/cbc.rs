//! TS-0003's mandatory TLS 1.2 suite, `TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA256`, for field nodes
//! that offer nothing else. rustls will never implement CBC suites (MAC-then-encrypt is a
//! non-feature in its manual), so when `tls.ts0003_cbc = true` the IN reads each ClientHello on
//! its TLS port first (without consuming it) and hands a hello that offers this suite and none
//! of rustls's to OpenSSL, with the same chain check, SNI rule, EMS requirement, exporters and
//! enrolment core; every other hello goes to rustls as before. Off by default.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use openssl::ssl::{Ssl, SslContext};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use m2mpki_connection::admission::Ticket;
use m2mpki_connection::hello::ClientHello;
use m2mpki_connection::Admission;

use crate::dtls::{install_verifier, openssl_error};
use crate::enrol::Admitted;
use crate::tls::FieldNodeVerifier;
use crate::Result;
use m2mpki_connection::http::Routes;

/// `TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA256`.
pub const CBC_SUITE: u16 = 0xC023;

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
    pub fn chooses(&self, hello: &ClientHello<'_>) -> bool {
        hello.offers(CBC_SUITE) && !hello.suites().any(|s| self.rustls_suites.contains(&s))
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
    use m2mpki_connection::openssl::{context, Profile, Stack, GROUPS};
    let mut b = context(Profile {
        stack: Stack::TlsServer,
        ciphers: "ECDHE-ECDSA-AES128-SHA256",
        groups: Some(GROUPS),
        server_preference: false,
    })
    .map_err(openssl_error)?;
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
    routes: &Arc<Routes<Admitted>>,
    admission: &Admission,
    ctx: &SslContext,
    mut tcp: TcpStream,
    peer: SocketAddr,
    offers_ems: bool,
    mut ticket: Ticket,
) {
    if !offers_ems {
        tracing::info!(%peer, "TLS 1.2 (CBC) hello without the extended master secret refused");
        let _ = tcp.write_all(&HANDSHAKE_FAILURE).await;
        return;
    }
    let Ok(mut ssl) = Ssl::new(ctx) else {
        return;
    };
    if crate::dtls::attach_verdict(&mut ssl).is_err() {
        return;
    }
    let Ok(mut stream) = tokio_openssl::SslStream::new(ssl, tcp) else {
        return;
    };
    let handshake = Pin::new(&mut stream).accept();
    let done = admission.handshake(&mut ticket, peer, "TLS 1.2 (CBC)", handshake);
    if done.await.is_err() {
        return;
    }
    let transport = "TLSv1_2 TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA256 (OpenSSL)".to_owned();
    let Some(node) = crate::dtls::admitted(stream.ssl(), peer, transport) else {
        return;
    };
    crate::http::serve_http(routes, node, stream, ticket).await;
}
