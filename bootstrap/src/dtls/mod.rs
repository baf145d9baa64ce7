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
use openssl::ssl::{Ssl, SslContext, SslContextBuilder, SslVerifyMode};
use openssl::x509::{X509StoreContext, X509StoreContextRef, X509};

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
    /// The peer's Certificate message as it passes by (for the verify callback).
    sent: Sent,
    /// Protected records shorter than this are dropped before OpenSSL sees them
    /// ([`record::without_short_sealed`]); 0 until a suite is known.
    pub min_sealed: usize,
    /// Our chain check's verdict: a refusal sets the description of the fatal alert OpenSSL
    /// then writes ([`record::set_fatal_alerts`]).
    verdict: Option<Verdict>,
}

/// The certificates the peer sent, shared by a [`Pipe`] and its SSL object.
type Sent = Arc<Mutex<record::SentCertificates>>;

/// The shortest protected record the suite `ssl` negotiated can carry (for
/// [`Pipe::min_sealed`]); 0 before it has one.
pub(crate) fn min_sealed(ssl: &openssl::ssl::SslRef) -> usize {
    ssl.current_cipher()
        .map_or(0, |c| record::min_sealed(c.name()))
}

impl Read for Pipe {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while let Some(d) = self.inbox.pop_front() {
            if let Ok(mut sent) = self.sent.lock() {
                sent.observe(&d);
            }
            let Some(d) = record::without_short_sealed(&d, self.min_sealed) else {
                continue;
            };
            // A datagram larger than OpenSSL's buffer is cut, as a UDP socket would cut
            // it; the record layer then discards it.
            let n = d.len().min(buf.len());
            buf[..n].copy_from_slice(&d[..n]);
            return Ok(n);
        }
        Err(std::io::ErrorKind::WouldBlock.into())
    }
}

impl Pipe {
    /// The alert rustls sends for our chain check's refusal, once it has refused.
    fn refusal_alert(&self) -> Option<u8> {
        let verdict = self.verdict.as_ref()?.lock().ok()?;
        match verdict.as_ref()? {
            Err(r) => Some(u8::from(crate::tls::alert_for(r))),
            Ok(_) => None,
        }
    }
}

impl Write for Pipe {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut d = buf.to_vec();
        if let Some(desc) = self.refusal_alert() {
            record::set_fatal_alerts(&mut d, desc);
        }
        self.outbox.push(d);
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

/// The SSL ex-data index kept in `cell`, made on first use (OpenSSL hands out a new index at
/// each call, so each kind of ex-data gets one per process).
pub(crate) fn ex_index<T: Send + Sync + 'static>(
    cell: &'static OnceLock<Index<Ssl, T>>,
) -> Result<Index<Ssl, T>> {
    if let Some(i) = cell.get() {
        return Ok(*i);
    }
    let i = Ssl::new_ex_index::<T>().map_err(openssl_error)?;
    Ok(*cell.get_or_init(|| i))
}

fn verdict_index() -> Result<Index<Ssl, Verdict>> {
    static INDEX: OnceLock<Index<Ssl, Verdict>> = OnceLock::new();
    ex_index(&INDEX)
}

/// Attaches an empty verdict to a new SSL object (our verify callback fills it).
pub(crate) fn attach_verdict(ssl: &mut Ssl) -> Result<Verdict> {
    let verdict: Verdict = Arc::default();
    ssl.set_ex_data(verdict_index()?, verdict.clone());
    Ok(verdict)
}

fn sent_index() -> Result<Index<Ssl, Sent>> {
    static INDEX: OnceLock<Index<Ssl, Sent>> = OnceLock::new();
    ex_index(&INDEX)
}

/// A new SSL object for one handshake, with an empty verdict attached, and the pipe it is to
/// run over (which shows the verify callback the certificates the peer sent).
pub(crate) fn new_ssl(ctx: &SslContext, mtu: u16, ipv6: bool) -> Result<(Ssl, Verdict, Pipe)> {
    let mut ssl = Ssl::new(ctx).map_err(openssl_error)?;
    let verdict = attach_verdict(&mut ssl)?;
    let pipe = Pipe {
        verdict: Some(verdict.clone()),
        ..Pipe::default()
    };
    ssl.set_ex_data(sent_index()?, pipe.sent.clone());
    // OpenSSL's MTU is the datagram payload: the path MTU less the IP and UDP headers.
    let overhead = if ipv6 { 48 } else { 28 };
    ssl.set_mtu(u32::from(mtu).saturating_sub(overhead))
        .map_err(openssl_error)?;
    Ok((ssl, verdict, pipe))
}

pub(crate) fn openssl_error(e: openssl::error::ErrorStack) -> Error {
    Error::internal(format!("OpenSSL: {e}"))
}

/// Installs our chain check as OpenSSL's verify callback. OpenSSL is given no trust anchors:
/// it only reports its own findings, which are ignored; `check` decides, once, on the chain the
/// peer sent (when the pipe saw its Certificate message and its leaf is the one OpenSSL
/// parsed), else on the chain OpenSSL assembled. A refusal ends the handshake with the alert
/// rustls sends for it (the pipe sets it, [`Pipe::refusal_alert`]).
pub(crate) fn install_verifier<F>(b: &mut SslContextBuilder, check: F)
where
    F: Fn(&[Vec<u8>]) -> std::result::Result<Verified, Refusal> + Send + Sync + 'static,
{
    b.set_verify_callback(
        SslVerifyMode::PEER | SslVerifyMode::FAIL_IF_NO_PEER_CERT,
        move |_preverify, ctx: &mut X509StoreContextRef| {
            let Some(verdict) = verdict_of(ctx) else {
                return false;
            };
            let Ok(mut slot) = verdict.lock() else {
                return false;
            };
            if slot.is_none() {
                let built: Vec<Vec<u8>> = ctx
                    .chain()
                    .map(|c| c.iter().filter_map(|x| x.to_der().ok()).collect())
                    .unwrap_or_default();
                let sent = sent_of(ctx).filter(|s| s.first() == built.first());
                *slot = Some(check(sent.as_deref().unwrap_or(&built)));
            }
            match slot.as_ref() {
                Some(Ok(_)) => true,
                Some(Err(_)) | None => false,
            }
        },
    );
}

fn verdict_of(ctx: &X509StoreContextRef) -> Option<Verdict> {
    let ssl = ctx.ex_data(X509StoreContext::ssl_idx().ok()?)?;
    ssl.ex_data(verdict_index().ok()?).cloned()
}

/// The certificates the peer sent, if its pipe saw all of its Certificate message.
fn sent_of(ctx: &X509StoreContextRef) -> Option<Vec<Vec<u8>>> {
    let ssl = ctx.ex_data(X509StoreContext::ssl_idx().ok()?)?;
    let sent = ssl.ex_data(sent_index().ok()?)?;
    let sent = sent.lock().ok()?;
    sent.chain().map(<[Vec<u8>]>::to_vec)
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
    use m2mpki_connection::openssl::{context, Profile, Stack, GROUPS};
    context(Profile {
        stack: if server {
            Stack::DtlsServer
        } else {
            Stack::DtlsClient
        },
        ciphers: list,
        groups: Some(GROUPS),
        server_preference: true,
    })
    .map_err(openssl_error)
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

/// What a completed OpenSSL handshake (DTLS, or the CBC suite over TCP) admits: the verdict
/// our chain check left on the session, and both exports.
pub(crate) fn admitted(
    ssl: &openssl::ssl::SslRef,
    peer: std::net::SocketAddr,
    transport: String,
) -> Option<crate::enrol::Admitted> {
    let verdict = verdict_index()
        .ok()
        .and_then(|i| ssl.ex_data(i))
        .and_then(|v| v.lock().ok().and_then(|g| g.clone()));
    let exports = export_wrap_key(ssl).and_then(|w| Ok((w, export_ts0003(ssl)?)));
    crate::enrol::Admitted::after_handshake(peer, transport, verdict, exports)
}

/// The negotiated suite, IANA-named when it is one of ours.
pub(crate) fn suite_name(ssl: &openssl::ssl::SslRef) -> String {
    let name = ssl.current_cipher().map(|c| c.name()).unwrap_or("?");
    DtlsSuite::ALL
        .into_iter()
        .find(|s| s.openssl_name() == name)
        .map_or_else(|| name.to_owned(), |s| s.iana_name().to_owned())
}
