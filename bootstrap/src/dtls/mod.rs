//! The bootstrap over DTLS 1.2 (RFC 6347) and CoAP (RFC 7252), for constrained field nodes.
//!
//! OpenSSL (the system's 3.x, through the `openssl` crate) runs the DTLS handshake and record
//! layer: neither rustls nor aws-lc-rs has DTLS (docs/dtls.md records the choice and the spike
//! behind it). Everything around it is ours and shared with TLS: the chain check
//! ([`crate::tls::FieldNodeVerifier`], [`m2mpki_ca::verify`]) runs inside OpenSSL's verify
//! callback, the exporter label and length are the TLS ones, and [`crate::enrol::Core`]
//! decides and records the enrolment.
//!
//! OpenSSL only ever sees datagrams through a [`Pipe`] (no socket of its own): the server
//! demultiplexes one UDP socket by peer address, answers first hellos statelessly
//! ([`record`]), and drives each peer's handshake from a task with a timer tick, which is
//! when OpenSSL retransmits.

pub mod client;
pub mod record;
pub mod server;

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::sync::{Arc, Mutex, OnceLock};

use m2mpki_ca::verify::{Refusal, Verified};
use openssl::ex_data::Index;
use openssl::pkey::PKey;
use openssl::ssl::{
    Ssl, SslContext, SslContextBuilder, SslMethod, SslMode, SslOptions, SslSessionCacheMode,
    SslVerifyMode, SslVersion,
};
use openssl::x509::{X509StoreContext, X509StoreContextRef, X509VerifyResult, X509};

use crate::config::DtlsSuite;
use crate::protocol::{
    Ts0003Keys, WrapKey, EXPORTER_LABEL, TS0003_LABEL, TS0003_LEN, WRAP_KEY_LEN,
};
use crate::{Error, Result};

/// The datagrams between OpenSSL and our socket code: reads take one datagram (or would
/// block), each write is one datagram.
#[derive(Debug, Default)]
pub struct Pipe {
    /// Received, not yet read by OpenSSL.
    pub inbox: VecDeque<Vec<u8>>,
    /// Written by OpenSSL, not yet sent.
    pub outbox: Vec<Vec<u8>>,
}

impl Read for Pipe {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self.inbox.pop_front() {
            Some(d) => {
                // A datagram larger than OpenSSL's buffer is cut, as a UDP socket would cut
                // it; the record layer then discards it.
                let n = d.len().min(buf.len());
                buf[..n].copy_from_slice(&d[..n]);
                Ok(n)
            }
            None => Err(std::io::ErrorKind::WouldBlock.into()),
        }
    }
}

impl Write for Pipe {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.outbox.push(buf.to_vec());
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// What our chain check decided during a handshake: filled by the verify callback, read once
/// the handshake is over. A credential is only ever issued for `Some(Ok(_))`, whatever OpenSSL
/// itself concluded.
pub type Verdict = Arc<Mutex<Option<std::result::Result<Verified, Refusal>>>>;

fn verdict_index() -> Result<Index<Ssl, Verdict>> {
    static INDEX: OnceLock<Index<Ssl, Verdict>> = OnceLock::new();
    if let Some(i) = INDEX.get() {
        return Ok(*i);
    }
    let i = Ssl::new_ex_index::<Verdict>().map_err(openssl_error)?;
    Ok(*INDEX.get_or_init(|| i))
}

/// Attaches an empty verdict to a new SSL object (our verify callback fills it).
pub(crate) fn attach_verdict(ssl: &mut Ssl) -> Result<Verdict> {
    let verdict: Verdict = Arc::default();
    ssl.set_ex_data(verdict_index()?, verdict.clone());
    Ok(verdict)
}

/// A new SSL object for one handshake, with an empty verdict attached.
pub(crate) fn new_ssl(ctx: &SslContext, mtu: u16, ipv6: bool) -> Result<(Ssl, Verdict)> {
    let mut ssl = Ssl::new(ctx).map_err(openssl_error)?;
    let verdict = attach_verdict(&mut ssl)?;
    // OpenSSL's MTU is the datagram payload: the path MTU less the IP and UDP headers.
    let overhead = if ipv6 { 48 } else { 28 };
    ssl.set_mtu(u32::from(mtu).saturating_sub(overhead))
        .map_err(openssl_error)?;
    Ok((ssl, verdict))
}

pub(crate) fn openssl_error(e: openssl::error::ErrorStack) -> Error {
    Error::internal(format!("OpenSSL: {e}"))
}

/// The OpenSSL verify result codes that already carry the alert a refusal deserves.
fn openssl_agrees(r: &Refusal, code: i32) -> bool {
    match r {
        // unable to get issuer (2, 20), self-signed (18, 19), leaf signature (21)
        Refusal::UnknownRoot => matches!(code, 2 | 18 | 19 | 20 | 21),
        Refusal::Expired(_) | Refusal::IntermediateExpired(_) => code == 10,
        Refusal::NotYetValid(_) | Refusal::IntermediateNotYetValid(_) => code == 9,
        Refusal::WrongPurpose(_) => code == 26,
        _ => false,
    }
}

/// Installs our chain check as OpenSSL's verify callback. OpenSSL is given no trust anchors:
/// it only assembles the chain the peer sent and reports its own findings; `check` decides.
/// The callback refuses at the first OpenSSL finding whose alert fits our refusal
/// (`unknown_ca`, `certificate_expired`, `unsupported_certificate`), otherwise at the last
/// call (depth 0), with `handshake_failure`.
pub(crate) fn install_verifier<F>(b: &mut SslContextBuilder, check: F)
where
    F: Fn(&[Vec<u8>]) -> std::result::Result<Verified, Refusal> + Send + Sync + 'static,
{
    b.set_verify_callback(
        SslVerifyMode::PEER | SslVerifyMode::FAIL_IF_NO_PEER_CERT,
        move |preverify, ctx: &mut X509StoreContextRef| {
            let Some(verdict) = verdict_of(ctx) else {
                return false;
            };
            let Ok(mut slot) = verdict.lock() else {
                return false;
            };
            if slot.is_none() {
                let chain: Vec<Vec<u8>> = ctx
                    .chain()
                    .map(|c| c.iter().filter_map(|x| x.to_der().ok()).collect())
                    .unwrap_or_default();
                *slot = Some(check(&chain));
            }
            match slot.as_ref() {
                Some(Ok(_)) => true,
                Some(Err(r)) => {
                    if !preverify && openssl_agrees(r, ctx.error().as_raw()) {
                        return false;
                    }
                    if preverify && ctx.error_depth() == 0 {
                        ctx.set_error(X509VerifyResult::APPLICATION_VERIFICATION);
                        return false;
                    }
                    true
                }
                None => false,
            }
        },
    );
}

fn verdict_of(ctx: &X509StoreContextRef) -> Option<Verdict> {
    let ssl = ctx.ex_data(X509StoreContext::ssl_idx().ok()?)?;
    ssl.ex_data(verdict_index().ok()?).cloned()
}

/// What both ends set on their DTLS context: DTLS 1.2 only, the suites, our certificate chain
/// and software key, no session cache or tickets (each bootstrap is a full handshake with a
/// fresh exporter), no renegotiation, P-256 with SHA-256 first.
pub(crate) fn context(
    server: bool,
    suites: &[DtlsSuite],
    chain: &[Vec<u8>],
    pkcs8: &[u8],
) -> Result<SslContextBuilder> {
    let mut list: String = suites
        .iter()
        .map(|s| s.openssl_name())
        .collect::<Vec<_>>()
        .join(":");
    // OpenSSL 3.2 and later count CCM_8's 64-bit tag below security level 1.
    if suites.contains(&DtlsSuite::Aes128Ccm8) && openssl::version::number() >= 0x3020_0000 {
        list.push_str(":@SECLEVEL=0");
    }
    let mut b = base_context(server, &list)?;
    b.set_sigalgs_list("ECDSA+SHA256:ECDSA+SHA384:ed25519")
        .map_err(openssl_error)?;
    set_identity(&mut b, chain, pkcs8)?;
    Ok(b)
}

/// A DTLS 1.2 context with the cipher list `list` and what every m2mpki DTLS endpoint uses
/// (groups, options, our stateless cookie exchange on a server), without credentials.
pub(crate) fn base_context(server: bool, list: &str) -> Result<SslContextBuilder> {
    let method = if server {
        SslMethod::dtls_server()
    } else {
        SslMethod::dtls_client()
    };
    let mut b = SslContextBuilder::new(method).map_err(openssl_error)?;
    b.set_min_proto_version(Some(SslVersion::DTLS1_2))
        .map_err(openssl_error)?;
    b.set_max_proto_version(Some(SslVersion::DTLS1_2))
        .map_err(openssl_error)?;
    b.set_cipher_list(list).map_err(openssl_error)?;
    b.set_groups_list("P-256:X25519:P-384")
        .map_err(openssl_error)?;
    b.set_options(
        SslOptions::NO_TICKET
            | SslOptions::NO_QUERY_MTU
            | SslOptions::NO_RENEGOTIATION
            | SslOptions::CIPHER_SERVER_PREFERENCE,
    );
    if server {
        // The cookie exchange is ours and stateless (record.rs): an SSL object exists only
        // for a hello whose cookie we checked. OpenSSL's own exchange stays on so that such an
        // object accepts the cookie-bearing hello (message_seq 1); it is handed the hello as
        // it was before the cookie first, and what it answers to that is dropped.
        b.set_options(SslOptions::COOKIE_EXCHANGE);
        b.set_cookie_generate_cb(|_, out| {
            let n = out.len().min(1);
            out[..n].fill(0);
            Ok(n)
        });
        b.set_cookie_verify_cb(|_, _| true);
    }
    b.set_mode(SslMode::RELEASE_BUFFERS);
    b.set_session_cache_mode(SslSessionCacheMode::OFF);
    Ok(b)
}

/// Gives an OpenSSL context our certificate chain (leaf first) and software key (PKCS#8 DER),
/// checking they belong together.
pub(crate) fn set_identity(
    b: &mut SslContextBuilder,
    chain: &[Vec<u8>],
    pkcs8: &[u8],
) -> Result<()> {
    let leaf = chain
        .first()
        .ok_or_else(|| Error::internal("empty chain"))?;
    let leaf = X509::from_der(leaf).map_err(openssl_error)?;
    b.set_certificate(&leaf).map_err(openssl_error)?;
    for c in &chain[1..] {
        b.add_extra_chain_cert(X509::from_der(c).map_err(openssl_error)?)
            .map_err(openssl_error)?;
    }
    let key = PKey::private_key_from_pkcs8(pkcs8).map_err(openssl_error)?;
    b.set_private_key(&key).map_err(openssl_error)?;
    b.check_private_key().map_err(openssl_error)?;
    Ok(())
}

/// Refuses a ClientHello whose SNI (`server_name`) `rule` does not answer, or without one when
/// it is required, with a fatal `unrecognized_name` alert, as over TLS; the refusal is logged
/// with its code.
pub(crate) fn check_sni(b: &mut SslContextBuilder, rule: crate::tls::SniRule, path: &'static str) {
    b.set_servername_callback(move |ssl, alert| {
        let name = ssl.servername(openssl::ssl::NameType::HOST_NAME);
        match rule.check(name) {
            Ok(()) => Ok(()),
            Err(code) => {
                tracing::info!(sni = ?name, code, path, "hello refused: SNI");
                *alert = openssl::ssl::SslAlert::UNRECOGNIZED_NAME;
                Err(openssl::ssl::SniError::ALERT_FATAL)
            }
        }
    });
}

/// RootCredentialWrapKey from a DTLS session: the same exporter as over TLS (RFC 5705 applies
/// to DTLS): label `EXPORTER-oneM2M-RootCredentialWrapKey`, no context, 32 bytes.
pub(crate) fn export_wrap_key(ssl: &openssl::ssl::SslRef) -> Result<WrapKey> {
    let mut out = [0u8; WRAP_KEY_LEN];
    let label = std::str::from_utf8(EXPORTER_LABEL).map_err(Error::internal)?;
    ssl.export_keying_material(&mut out, label, None)
        .map_err(|e| Error::Protocol(format!("DTLS exporter failed: {e}")))?;
    let key = WrapKey::new(out);
    zeroize::Zeroize::zeroize(&mut out);
    Ok(key)
}

/// The TS-0003 export of a DTLS session (protocol version 2): label
/// `EXPORTER-oneM2M-Bootstrap`, no context, 48 bytes.
pub(crate) fn export_ts0003(ssl: &openssl::ssl::SslRef) -> Result<Ts0003Keys> {
    let mut out = [0u8; TS0003_LEN];
    let label = std::str::from_utf8(TS0003_LABEL).map_err(Error::internal)?;
    ssl.export_keying_material(&mut out, label, None)
        .map_err(|e| Error::Protocol(format!("DTLS exporter failed: {e}")))?;
    let keys = Ts0003Keys::from_export(&out);
    zeroize::Zeroize::zeroize(&mut out);
    Ok(keys)
}

/// The negotiated suite, IANA-named when it is one of ours.
pub(crate) fn suite_name(ssl: &openssl::ssl::SslRef) -> String {
    let name = ssl.current_cipher().map(|c| c.name()).unwrap_or("?");
    DtlsSuite::ALL
        .into_iter()
        .find(|s| s.openssl_name() == name)
        .map_or_else(|| name.to_owned(), |s| s.iana_name().to_owned())
}
