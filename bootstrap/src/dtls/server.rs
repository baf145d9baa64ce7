//! The IN's DTLS + CoAP endpoint: one UDP socket, many peers.

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use openssl::ssl::{HandshakeError, MidHandshakeSslStream, SslContext, SslStream};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;

use super::record::{self, Cookies};
use super::{new_ssl, Pipe};
use crate::coap::{self, option, Block, Message, Type};
use crate::config::DtlsConfig;
use crate::enrol::{Admitted, Answer, Core, Outcome};
use crate::protocol::PATH;
use crate::Result;

/// How often a peer's handshake is polled, so that OpenSSL retransmits on time.
const TICK: Duration = Duration::from_millis(100);
/// Datagrams queued for one peer; more are dropped (the peer retransmits).
const PEER_QUEUE: usize = 16;
/// The largest datagram taken from a peer: a full DTLS record (2^14 bytes of plaintext and its
/// expansion). Together with [`PEER_QUEUE`] and `max_peers` this bounds what peers can make
/// the IN hold.
const MAX_DATAGRAM: usize = (1 << 14) + 2048 + 13;
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
    pub(crate) cookies: Cookies,
    /// Peers with a handshake or session under way.
    pub(crate) live: std::sync::atomic::AtomicUsize,
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

struct PeerHandle {
    tx: mpsc::Sender<Vec<u8>>,
    random: Vec<u8>,
    /// Rises with each new peer: the lowest of an address is its longest-waiting.
    id: u64,
    /// Set while a request of the peer is being answered: such a peer is not evicted.
    busy: Arc<AtomicBool>,
}

/// The peers with a handshake or session under way, by address, and how many each source
/// address (IP) holds: the DTLS side of [`crate::admission`]'s rules.
#[derive(Default)]
struct Peers {
    by_addr: HashMap<SocketAddr, PeerHandle>,
    per_ip: HashMap<IpAddr, usize>,
}

impl Peers {
    fn len(&self) -> usize {
        self.by_addr.len()
    }

    fn of_ip(&self, ip: IpAddr) -> usize {
        self.per_ip.get(&ip).copied().unwrap_or(0)
    }

    /// Adds a peer; one at the same address and port is replaced (and so ends).
    fn insert(&mut self, addr: SocketAddr, peer: PeerHandle) {
        if self.by_addr.insert(addr, peer).is_none() {
            *self.per_ip.entry(addr.ip()).or_insert(0) += 1;
        }
    }

    /// Removes the peer at `addr` if it is `id` (or any, for `None`); dropping its sender ends
    /// its task at its next wait on the peer.
    fn remove(&mut self, addr: SocketAddr, id: Option<u64>) -> bool {
        let matches = self
            .by_addr
            .get(&addr)
            .is_some_and(|p| id.is_none_or(|id| p.id == id));
        if !matches {
            return false;
        }
        self.by_addr.remove(&addr);
        if let Some(n) = self.per_ip.get_mut(&addr.ip()) {
            *n -= 1;
            if *n == 0 {
                self.per_ip.remove(&addr.ip());
            }
        }
        true
    }

    /// The longest-waiting peer of the address with the most peers that wait (every peer but
    /// one whose request is being answered), as on the TLS listener: an attacker holding many
    /// places only ever gives up its own. Linear in the peers, and only run when all places are
    /// taken.
    fn evictable(&self) -> Option<SocketAddr> {
        let waiting = || {
            self.by_addr
                .iter()
                .filter(|(_, p)| !p.busy.load(Ordering::Relaxed))
        };
        let mut counts: HashMap<IpAddr, usize> = HashMap::new();
        for (a, _) in waiting() {
            *counts.entry(a.ip()).or_insert(0) += 1;
        }
        let most = counts.values().copied().max()?;
        waiting()
            .filter(|(a, _)| counts.get(&a.ip()) == Some(&most))
            .min_by_key(|(_, p)| p.id)
            .map(|(a, _)| *a)
    }
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A fatal alert in epoch 0, for a peer we refuse outside OpenSSL's state machine: 40
/// (`handshake_failure`) for a cookie-proven hello without the extended master secret, 20
/// (`bad_record_mac`) for a Finished that does not decrypt.
fn epoch0_alert(description: u8, record_seq: u64) -> Vec<u8> {
    let mut v = vec![21, 254, 253, 0, 0];
    v.extend_from_slice(&record_seq.to_be_bytes()[2..]);
    v.extend_from_slice(&[0, 2, 2, description]);
    v
}

/// Protected handshake records (the peer's Finished, first sent and retransmitted) that did
/// not complete the handshake although OpenSSL had read the peer's ChangeCipherSpec and so
/// waited for exactly that record, after which the peer's key is taken to be wrong: OpenSSL
/// silently drops a record that does not decrypt (RFC 6347 §4.1.2.7), so a node with a wrong
/// PSK would otherwise wait for its timeout. Two, so that one spoofed record cannot end a
/// real handshake whose Finished is still to come.
const UNREADABLE_FINISHED: usize = 2;

impl Endpoint {
    fn refused(&self, code: &str) {
        self.core.metrics.refusals.count(code);
    }

    /// Serves until `stop` resolves; then lets running peers end within the limits.
    pub(crate) async fn run(
        self: Arc<Self>,
        socket: UdpSocket,
        stop: impl std::future::Future<Output = ()>,
    ) {
        let socket = Arc::new(socket);
        let mut peers = Peers::default();
        let (done_tx, mut done_rx) = mpsc::unbounded_channel::<(SocketAddr, u64)>();
        let mut next_id = 0u64;
        let mut buf = vec![0u8; 65_536];
        let mut tasks = tokio::task::JoinSet::new();
        let per_address = self.core.config.limits.max_connections_per_address;
        tokio::pin!(stop);
        loop {
            let (n, from) = tokio::select! {
                _ = &mut stop => break,
                Some((addr, id)) = done_rx.recv() => {
                    peers.remove(addr, Some(id));
                    self.live.store(peers.len(), Ordering::Relaxed);
                    continue;
                }
                Some(_) = tasks.join_next(), if !tasks.is_empty() => continue,
                r = socket.recv_from(&mut buf) => match r {
                    Ok(x) => x,
                    Err(e) => {
                        // ICMP errors of earlier sends surface here (connection refused);
                        // they say nothing about the socket.
                        tracing::debug!(error = %e, "DTLS receive error");
                        continue;
                    }
                },
            };
            if n > MAX_DATAGRAM {
                continue;
            }
            let d = &buf[..n];
            let hello = record::client_hello(d);
            if let Some(p) = peers.by_addr.get(&from) {
                // A hello with another client_random is a new handshake from the same address
                // (a node that rebooted): it goes through the cookie exchange and, once proven,
                // replaces the old session. Anything else belongs to the session.
                let new_handshake = hello
                    .as_ref()
                    .is_some_and(|h| h.random != p.random.as_slice());
                if !new_handshake {
                    // Full queue: drop; the peer retransmits.
                    let _ = p.tx.try_send(d.to_vec());
                    continue;
                }
            }
            let Some(hello) = hello else {
                continue; // not for a session we have, and not a hello: nothing to answer
            };
            let now = now_secs();
            if !self.cookies.check(hello.cookie, &from, hello.random, now) {
                let cookie = self.cookies.make(&from, hello.random, now);
                let hvr = record::hello_verify_request(&hello, &cookie);
                let _ = socket.send_to(&hvr, from).await;
                continue;
            }
            if !hello.offers_ems {
                tracing::info!(peer = %from, "DTLS hello without the extended master secret refused");
                let _ = socket
                    .send_to(&epoch0_alert(40, hello.record_seq), from)
                    .await;
                continue;
            }
            // The address has proved it receives: from here on the TLS listener's rules.
            if !peers.by_addr.contains_key(&from) {
                if peers.of_ip(from.ip()) >= per_address {
                    tracing::debug!(peer = %from, "DTLS hello dropped: too many peers from this address");
                    self.refused("per_address_cap");
                    continue;
                }
                if peers.len() >= self.config.max_peers {
                    match peers.evictable() {
                        Some(victim) => {
                            peers.remove(victim, None);
                            tracing::debug!(peer = %from, evicted = %victim, "all DTLS places taken: evicted the longest-waiting peer of the busiest address");
                            self.refused("evicted");
                        }
                        None => {
                            tracing::debug!(peer = %from, "DTLS hello dropped: every place is answering a request");
                            self.refused("peer_limit");
                            continue;
                        }
                    }
                }
            }
            let (tx, rx) = mpsc::channel(PEER_QUEUE);
            next_id += 1;
            let id = next_id;
            let busy = Arc::new(AtomicBool::new(false));
            peers.insert(
                from,
                PeerHandle {
                    tx,
                    random: hello.random.to_vec(),
                    id,
                    busy: busy.clone(),
                },
            );
            self.live.store(peers.len(), Ordering::Relaxed);
            let this = self.clone();
            let socket = socket.clone();
            let first = hello.without_cookie();
            let real = d.to_vec();
            let done = done_tx.clone();
            tasks.spawn(async move {
                let limits = &this.core.config.limits;
                let deadline = limits.handshake_timeout + limits.idle_timeout;
                if tokio::time::timeout(
                    deadline,
                    this.serve_peer(&socket, from, first, real, rx, &busy),
                )
                .await
                .is_err()
                {
                    tracing::info!(peer = %from, "DTLS session took too long; dropped");
                }
                let _ = done.send((from, id));
            });
        }
        drop(peers);
        let limits = &self.core.config.limits;
        let drain = limits.handshake_timeout + limits.idle_timeout;
        if tokio::time::timeout(drain, async { while tasks.join_next().await.is_some() {} })
            .await
            .is_err()
        {
            tracing::warn!("some DTLS sessions were still open after {drain:?}; stopping anyway");
        }
    }

    async fn serve_peer(
        &self,
        socket: &UdpSocket,
        peer: SocketAddr,
        first: Vec<u8>,
        real: Vec<u8>,
        mut rx: mpsc::Receiver<Vec<u8>>,
        busy: &AtomicBool,
    ) {
        let mut stream = match self.handshake(socket, peer, first, real, &mut rx).await {
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
            let Some(node) = self.admit(&stream, peer) else {
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
            busy.store(true, Ordering::Relaxed);
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
            busy.store(false, Ordering::Relaxed);
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
                let _ = socket.send_to(&epoch0_alert(20, 1 << 40), peer).await;
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

    /// The verdict of our chain check and the exporter, after a completed handshake.
    fn admit(&self, stream: &SslStream<Pipe>, peer: SocketAddr) -> Option<Admitted> {
        let ssl = stream.ssl();
        let verdict = ssl
            .ex_data(super::verdict_index().ok()?)
            .and_then(|v| v.lock().ok().and_then(|g| g.clone()));
        let verified = match verdict {
            Some(Ok(v)) => v,
            Some(Err(r)) => {
                tracing::warn!(%peer, code = r.code(), "DTLS peer refused after the handshake");
                return None;
            }
            None => {
                tracing::warn!(%peer, "DTLS handshake completed without our chain check; refused");
                return None;
            }
        };
        let wrap_key = match super::export_wrap_key(ssl) {
            Ok(k) => k,
            Err(e) => {
                tracing::warn!(%peer, error = %e, "exporter failed");
                return None;
            }
        };
        let ts0003 = match super::export_ts0003(ssl) {
            Ok(k) => k,
            Err(e) => {
                tracing::warn!(%peer, error = %e, "exporter failed");
                return None;
            }
        };
        Some(Admitted {
            wrap_key,
            verified,
            peer,
            transport: format!("DTLSv1_2 {}", super::suite_name(ssl)),
            ts0003,
        })
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
