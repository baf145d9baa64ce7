//! The IN's DTLS + CoAP endpoint: one UDP socket, many peers.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use openssl::ssl::{HandshakeError, MidHandshakeSslStream, SslContext, SslStream};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;

use m2mpki_connection::{dtls, udp};

use super::record;
use super::{new_ssl, Pipe};
use crate::coap::{self, option, Block, Message, Type};
use crate::config::DtlsConfig;
use crate::enrol::{Admitted, Answer, Core, Outcome};
use crate::protocol::PATH;
use crate::Result;

/// How often a peer's handshake is polled, so that OpenSSL retransmits on time.
const TICK: Duration = Duration::from_millis(100);
/// Responses remembered per session for retransmitted requests (RFC 7252 §4.5).
const REMEMBERED: usize = 16;
/// Bytes of a response datagram that are not payload, besides IP and UDP: the DTLS record
/// (13 header, 8 explicit nonce, up to 16 tag) and the CoAP header, token and options.
const RESPONSE_OVERHEAD: usize = 37 + 4 + 8 + 16;

/// The DTLS endpoint, built by [`crate::server::Server`] from the shared core.
pub(crate) struct Endpoint {
    pub(crate) core: Arc<Core>,
    pub(crate) ctx: SslContext,
    pub(crate) config: DtlsConfig,
    /// The connection layer's side: cookies, peer places, the count of live peers.
    pub(crate) udp: udp::Endpoint,
    /// The PSK association endpoint (answers who it authenticated) rather than the bootstrap.
    pub(crate) association: bool,
}

/// Who is on the other end of a session, and for what.
enum Session {
    /// A node bootstrapping with its certificate.
    Enrol(Box<Admitted>),
    /// A node associating with its credential.
    Associate(crate::psk::Association, SocketAddr),
}

impl Session {
    fn peer(&self) -> SocketAddr {
        match self {
            Session::Enrol(a) => a.peer,
            Session::Associate(_, p) => *p,
        }
    }
}

/// Protected handshake records (the peer's Finished, first sent and retransmitted) that did
/// not complete the handshake although OpenSSL had read the peer's ChangeCipherSpec and so
/// waited for exactly that record, after which the peer's key is taken to be wrong: OpenSSL
/// silently drops a record that does not decrypt (RFC 6347 §4.1.2.7), so a node with a wrong
/// PSK would otherwise wait for its timeout. Two, so that one spoofed record cannot end a
/// real handshake whose Finished is still to come.
const UNREADABLE_FINISHED: usize = 2;

impl Endpoint {
    fn refused(&self, code: &'static str) {
        self.udp.observer.refused(code);
    }

    /// Serves until `stop` resolves; then lets running peers end within the limits.
    pub(crate) async fn run(
        self: Arc<Self>,
        socket: UdpSocket,
        stop: impl std::future::Future<Output = ()>,
    ) {
        let what = if self.association {
            "DTLS PSK association"
        } else {
            "DTLS"
        };
        udp::serve(socket, &self.udp, what, stop, |peer| {
            let this = self.clone();
            async move { this.serve_peer(peer).await }
        })
        .await;
    }

    async fn serve_peer(&self, p: udp::Peer) {
        let udp::Peer {
            addr: peer,
            socket,
            first_hello,
            hello,
            inbox: mut rx,
            busy,
        } = p;
        let socket = &*socket;
        let first = first_hello;
        let mut stream = match self.handshake(socket, peer, first, hello, &mut rx).await {
            Ok(Some(s)) => s,
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(%peer, error = %e, "DTLS session failed");
                return;
            }
        };
        let min = super::min_sealed(stream.ssl());
        stream.get_mut().min_sealed = min;
        let node = if self.association {
            let Some(a) = crate::psk::association_of(stream.ssl()) else {
                tracing::warn!(%peer, "DTLS PSK handshake completed without a looked-up credential; closed");
                return;
            };
            tracing::info!(%peer, identity = %a.identity, credential = %a.credential_id, suite = %super::suite_name(stream.ssl()), "PSK association established (DTLS)");
            Session::Associate(a, peer)
        } else {
            let transport = format!("DTLSv1_2 {}", super::suite_name(stream.ssl()));
            let Some(node) = super::admitted(stream.ssl(), peer, transport) else {
                return;
            };
            Session::Enrol(Box::new(node))
        };
        let mut coap = CoapSession::default();
        let idle = self.core.config.limits.idle_timeout;
        loop {
            let d = match tokio::time::timeout(idle, rx.recv()).await {
                Ok(Some(d)) => d,
                // Replaced by a new session from the same address, or evicted.
                Ok(None) => return,
                Err(_) => {
                    tracing::debug!(%peer, "DTLS session idle; closed");
                    let _ = stream.shutdown();
                    flush(socket, peer, stream.get_mut()).await;
                    return;
                }
            };
            busy.set(true);
            stream.get_mut().inbox.push_back(d);
            while let Ok(more) = rx.try_recv() {
                stream.get_mut().inbox.push_back(more);
            }
            let mut record = vec![0u8; 16_384];
            loop {
                match stream.ssl_read(&mut record) {
                    Ok(n) => {
                        if let Some(reply) = coap.on_message(self, &node, &record[..n]).await {
                            if let Err(e) = stream.ssl_write(&reply) {
                                tracing::warn!(%peer, error = %e, "DTLS write failed");
                            }
                        }
                    }
                    Err(e) if e.code() == openssl::ssl::ErrorCode::ZERO_RETURN => {
                        let _ = stream.shutdown();
                        flush(socket, peer, stream.get_mut()).await;
                        return;
                    }
                    Err(e) if e.code() == openssl::ssl::ErrorCode::WANT_READ => break,
                    Err(e) => {
                        tracing::info!(%peer, error = %e, "DTLS session ended with an error");
                        flush(socket, peer, stream.get_mut()).await;
                        return;
                    }
                }
            }
            flush(socket, peer, stream.get_mut()).await;
            busy.set(false);
        }
    }

    /// Runs the handshake: a fresh SSL object is given the hello as it was before the cookie,
    /// then the cookie-bearing one (see [`record::ClientHello::without_cookie`]). The peer
    /// must finish within `handshake_timeout` of its cookie-bearing hello (its ClientHello,
    /// which is what `hello_timeout` bounds on TCP: a constrained node may need seconds of
    /// ECC before its next flight, so a silent peer is not cut sooner; the per-address cap
    /// and eviction keep silent peers from holding every place).
    async fn handshake(
        &self,
        socket: &UdpSocket,
        peer: SocketAddr,
        first: Vec<u8>,
        real: Vec<u8>,
        rx: &mut mpsc::Receiver<Vec<u8>>,
    ) -> Result<Option<SslStream<Pipe>>> {
        let (ssl, verdict, mut pipe) = new_ssl(&self.ctx, self.config.mtu, peer.is_ipv6())?;
        pipe.inbox.push_back(first);
        let mut mid: MidHandshakeSslStream<Pipe> = match ssl.accept(pipe) {
            Err(HandshakeError::WouldBlock(m)) => m,
            Ok(_) => return Ok(None),
            Err(e) => {
                tracing::info!(%peer, error = %e, "DTLS hello refused");
                return Ok(None);
            }
        };
        // What OpenSSL answered to the reconstructed first hello was our stateless
        // HelloVerifyRequest already: not sent again.
        mid.get_mut().outbox.clear();
        mid.get_mut().inbox.push_back(real);
        let limits = &self.core.config.limits;
        let deadline = Instant::now() + limits.handshake_timeout;
        // Protected handshake records fed to OpenSSL since it last ran, and those it dropped
        // while waiting for the peer's Finished (its key is then wrong).
        let mut fed_sealed = 0usize;
        let mut unreadable = 0usize;
        loop {
            match mid.handshake() {
                Ok(mut s) => {
                    flush(socket, peer, s.get_mut()).await;
                    return Ok(Some(s));
                }
                Err(HandshakeError::WouldBlock(m)) => {
                    mid = m;
                    flush(socket, peer, mid.get_mut()).await;
                }
                Err(HandshakeError::Failure(m)) => {
                    let mut m = m;
                    let reason = m.error().to_string();
                    flush(socket, peer, m.get_mut()).await;
                    match verdict.lock().ok().and_then(|v| v.clone()) {
                        Some(Err(r)) => {
                            tracing::info!(%peer, code = r.code(), reason = %r, "DTLS handshake refused: the chain check");
                        }
                        _ => tracing::info!(%peer, error = %reason, "DTLS handshake failed"),
                    }
                    return Ok(None);
                }
                Err(HandshakeError::SetupFailure(e)) => {
                    return Err(super::openssl_error(e));
                }
            };
            if mid
                .ssl()
                .state_string_long()
                .contains("read change cipher spec")
            {
                unreadable += fed_sealed;
            }
            fed_sealed = 0;
            if unreadable >= UNREADABLE_FINISHED {
                tracing::info!(%peer, "DTLS handshake refused: the peer's Finished does not decrypt (wrong key?)");
                self.refused("bad_finished");
                let _ = socket.send_to(&dtls::epoch0_alert(20, 1 << 40), peer).await;
                return Ok(None);
            }
            let min = super::min_sealed(mid.ssl());
            mid.get_mut().min_sealed = min;
            let wait = deadline.saturating_duration_since(Instant::now());
            if wait.is_zero() {
                tracing::info!(%peer, code = "handshake_timeout", "DTLS handshake timed out");
                self.refused("handshake_timeout");
                return Ok(None);
            }
            tokio::select! {
                d = rx.recv() => match d {
                    Some(d) => {
                        fed_sealed += record::sealed_handshake_records(&d);
                        mid.get_mut().inbox.push_back(d);
                        while let Ok(more) = rx.try_recv() {
                            fed_sealed += record::sealed_handshake_records(&more);
                            mid.get_mut().inbox.push_back(more);
                        }
                    }
                    // Replaced by a new handshake from the same address, or evicted.
                    None => return Ok(None),
                },
                _ = tokio::time::sleep(TICK.min(wait)) => {}
            }
        }
    }
}

async fn flush(socket: &UdpSocket, peer: SocketAddr, pipe: &mut Pipe) {
    for d in pipe.outbox.drain(..) {
        if let Err(e) = socket.send_to(&d, peer).await {
            tracing::debug!(%peer, error = %e, "DTLS send failed");
        }
    }
}

/// The CoAP side of one DTLS session: responses remembered by message ID, and the last
/// response body for Block2 continuations.
#[derive(Default)]
struct CoapSession {
    remembered: VecDeque<(u16, Vec<u8>)>,
    last: Option<(u8, Vec<u8>)>,
    /// Seconds until a rate-limited node may retry, from the last enrolment answer.
    retry_after: Option<u32>,
}

/// The critical options of [`UNDERSTOOD`] that may occur once (Uri-Host, Uri-Port, Accept,
/// Block2).
const NOT_REPEATABLE: [u16; 4] = [option::URI_HOST, 7, option::ACCEPT, option::BLOCK2];

/// The options this binding understands; any other critical (odd-numbered) option in a
/// request gets 4.02 Bad Option (RFC 7252 §5.4.1).
const UNDERSTOOD: [u16; 7] = [
    option::URI_HOST,
    7, // Uri-Port
    option::URI_PATH,
    option::CONTENT_FORMAT,
    option::ACCEPT,
    option::BLOCK2,
    option::SIZE2,
];

impl CoapSession {
    async fn on_message(&mut self, ep: &Endpoint, node: &Session, bytes: &[u8]) -> Option<Vec<u8>> {
        let m = match Message::decode(bytes) {
            Ok(m) => m,
            Err(e) => {
                tracing::info!(peer = %node.peer(), error = %e, "malformed CoAP message");
                // A message of another version is silently ignored (RFC 7252 §3); a
                // confirmable one we cannot read is rejected with a Reset (§4.2).
                if bytes.first().is_some_and(|b| b >> 6 != 1) {
                    return None;
                }
                return (bytes.len() >= 4 && bytes[0] >> 4 & 3 == 0).then(|| {
                    Message {
                        kind: Type::Rst,
                        code: 0,
                        message_id: u16::from_be_bytes([bytes[2], bytes[3]]),
                        token: vec![],
                        options: vec![],
                        payload: vec![],
                    }
                    .encode()
                });
            }
        };
        match m.kind {
            Type::Ack | Type::Rst => return None,
            Type::Con | Type::Non => {}
        }
        if m.code == 0 {
            // CoAP ping: an empty confirmable message is answered with a Reset.
            return Some(reset(m.message_id));
        }
        if m.code >> 5 != 0 {
            return None; // a response sent to the server: not ours to answer
        }
        if let Some((_, r)) = self.remembered.iter().find(|(id, _)| *id == m.message_id) {
            return Some(r.clone());
        }
        let (code, body, block) = self.respond(ep, node, &m).await;
        let room = usize::from(ep.config.mtu)
            .saturating_sub(if node.peer().is_ipv6() { 48 } else { 28 })
            .saturating_sub(RESPONSE_OVERHEAD);
        let mut options = vec![(option::CONTENT_FORMAT, coap::uint(u32::from(coap::JSON)))];
        if code == coap::code(4, 29) || code == coap::code(5, 3) {
            if let Some(secs) = self.retry_after {
                options.push((option::MAX_AGE, coap::uint(secs)));
            }
        }
        let payload = match block {
            // A Block2 asked for in the first request sets the size (RFC 7959 §2.4), never
            // above what the path MTU allows.
            Some(want) if body.len() > room || want.num > 0 || body.len() > want.size() => {
                let szx = want.szx.min(Block::szx_for(room));
                let size = 1usize << (szx + 4);
                let start = (want.num as usize).saturating_mul(size).min(body.len());
                let end = (start + size).min(body.len());
                let more = end < body.len();
                options.push((
                    option::BLOCK2,
                    Block {
                        num: want.num,
                        more,
                        szx,
                    }
                    .encode(),
                ));
                options.push((option::SIZE2, coap::uint(body.len() as u32)));
                body[start..end].to_vec()
            }
            _ if body.len() > room => {
                let szx = Block::szx_for(room);
                let size = 1usize << (szx + 4);
                options.push((
                    option::BLOCK2,
                    Block {
                        num: 0,
                        more: true,
                        szx,
                    }
                    .encode(),
                ));
                options.push((option::SIZE2, coap::uint(body.len() as u32)));
                body[..size.min(body.len())].to_vec()
            }
            _ => body,
        };
        let reply = Message {
            kind: if m.kind == Type::Con {
                Type::Ack
            } else {
                Type::Non
            },
            code,
            message_id: m.message_id,
            token: m.token.clone(),
            options,
            payload,
        }
        .encode();
        if self.remembered.len() >= REMEMBERED {
            self.remembered.pop_front();
        }
        self.remembered.push_back((m.message_id, reply.clone()));
        Some(reply)
    }

    /// The code and JSON body for a request, and the Block2 it asked for.
    async fn respond(
        &mut self,
        ep: &Endpoint,
        node: &Session,
        m: &Message,
    ) -> (u8, Vec<u8>, Option<Block>) {
        let refuse = |outcome: Outcome, code: &str, msg: String| {
            let a = Answer::refusal(outcome, code, msg);
            let (c, d) = a.outcome.coap();
            (coap::code(c, d), a.body, None)
        };
        if let Some((n, _)) = m
            .options
            .iter()
            .find(|(n, _)| n % 2 == 1 && !UNDERSTOOD.contains(n))
        {
            let a = Answer::refusal(
                Outcome::BadRequest,
                "bad_option",
                format!("critical option {n} is not understood"),
            );
            return (coap::code(4, 2), a.body, None);
        }
        // A critical option that is not repeatable, repeated, is treated as one not
        // understood (RFC 7252 §5.4.5).
        if let Some(n) = NOT_REPEATABLE
            .iter()
            .find(|n| m.option_values(**n).nth(1).is_some())
        {
            let a = Answer::refusal(
                Outcome::BadRequest,
                "bad_option",
                format!("critical option {n} may occur once"),
            );
            return (coap::code(4, 2), a.body, None);
        }
        let block = match m.option_values(option::BLOCK2).next() {
            None => None,
            Some(v) => match Block::decode(v) {
                Some(b) => Some(b),
                None => {
                    return refuse(
                        Outcome::BadRequest,
                        "bad_request",
                        "malformed Block2 option".into(),
                    )
                }
            },
        };
        let node = match node {
            Session::Enrol(a) => a,
            Session::Associate(assoc, _) => {
                return if m.path() != crate::psk::ASSOCIATION_PATH {
                    refuse(
                        Outcome::NotFound,
                        "not_found",
                        format!("the only resource is GET {}", crate::psk::ASSOCIATION_PATH),
                    )
                } else if m.code != coap::GET {
                    refuse(
                        Outcome::MethodNotAllowed,
                        "method_not_allowed",
                        "GET only".into(),
                    )
                } else {
                    (
                        coap::code(2, 5),
                        serde_json::to_vec(assoc).unwrap_or_default(),
                        block,
                    )
                };
            }
        };
        if m.path() != PATH {
            return refuse(
                Outcome::NotFound,
                "not_found",
                format!("the only resource is POST {PATH}"),
            );
        }
        if m.code != coap::POST {
            return refuse(
                Outcome::MethodNotAllowed,
                "method_not_allowed",
                format!("use POST {PATH}"),
            );
        }
        if let Some(b) = block.filter(|b| b.num > 0) {
            return match &self.last {
                Some((code, body)) => (*code, body.clone(), Some(b)),
                None => refuse(
                    Outcome::BadRequest,
                    "bad_request",
                    "Block2 continuation without an earlier response in this session".into(),
                ),
            };
        }
        if m.uint_option(option::CONTENT_FORMAT) != Some(Some(u32::from(coap::JSON))) {
            return refuse(
                Outcome::UnsupportedMediaType,
                "unsupported_media_type",
                "the body must be application/json (Content-Format 50)".into(),
            );
        }
        if let Some(accept) = m.uint_option(option::ACCEPT) {
            if accept != Some(u32::from(coap::JSON)) {
                let a = Answer::refusal(
                    Outcome::BadRequest,
                    "not_acceptable",
                    "the response is application/json (Content-Format 50)",
                );
                return (coap::code(4, 6), a.body, None);
            }
        }
        let a = ep.core.answer(node, &m.payload).await;
        let (c, d) = a.outcome.coap();
        let code = coap::code(c, d);
        self.last = Some((code, a.body.clone()));
        self.retry_after = a.retry_after;
        (code, a.body, block)
    }
}

fn reset(message_id: u16) -> Vec<u8> {
    Message {
        kind: Type::Rst,
        code: 0,
        message_id,
        token: vec![],
        options: vec![],
        payload: vec![],
    }
    .encode()
}
