//! The one UDP (DTLS) receive loop. Every DTLS endpoint of a process (the bootstrap over DTLS,
//! the PSK association over DTLS) is this loop with a handler: the loop reads every datagram,
//! hands those of a peer it knows to that peer's queue, answers a first hello with a stateless
//! cookie (crate::dtls), admits a cookie-proven peer under the same rules as the TCP loop
//! (per-address cap, a place per peer, eviction of the longest-waiting peer of the busiest
//! address, refusals counted through the [`Observer`]), gives each peer a task within its
//! session time, and drains. The handler runs the DTLS session itself.

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::UdpSocket;
use tokio::sync::mpsc;

use crate::dtls::{self, Cookies};
use crate::Observer;

/// Datagrams queued for one peer; more are dropped (the peer retransmits).
const PEER_QUEUE: usize = 16;
/// The largest datagram taken from a peer: a full DTLS record (2^14 bytes of plaintext and its
/// expansion). Together with [`PEER_QUEUE`] and `max_peers` this bounds what peers can make
/// the endpoint hold.
pub const MAX_DATAGRAM: usize = (1 << 14) + 2048 + 13;

/// The bounds of one UDP endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Peers with a handshake or session under way at once.
    pub max_peers: usize,
    /// Of those, from one source address.
    pub max_peers_per_address: usize,
    /// How long one peer's task may run in all (handshake and requests).
    pub session_time: Duration,
}

/// One cookie-proven peer, handed to the handler.
#[derive(Debug)]
pub struct Peer {
    /// Its address.
    pub addr: SocketAddr,
    /// The socket, to answer on.
    pub socket: Arc<UdpSocket>,
    /// Its hello as it was before the cookie ([`dtls::DatagramHello::without_cookie`]).
    pub first_hello: Vec<u8>,
    /// Its cookie-bearing hello, as received.
    pub hello: Vec<u8>,
    /// Its later datagrams. Closed when the peer is replaced by a new handshake from the same
    /// address and port, or evicted: the handler then ends.
    pub inbox: mpsc::Receiver<Vec<u8>>,
    /// Set while a request of the peer is being answered (such a peer is not evicted).
    pub busy: Busy,
}

/// Whether a peer's request is being answered.
#[derive(Debug, Clone, Default)]
pub struct Busy(Arc<AtomicBool>);

impl Busy {
    /// Marks the peer busy (not evictable) or waiting.
    pub fn set(&self, busy: bool) {
        self.0.store(busy, Ordering::Relaxed);
    }

    fn get(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

struct PeerHandle {
    tx: mpsc::Sender<Vec<u8>>,
    random: Vec<u8>,
    /// Rises with each new peer: the lowest of an address is its longest-waiting.
    id: u64,
    busy: Busy,
}

/// The peers with a handshake or session under way, by address, and how many each source
/// address (IP) holds: the UDP side of [`crate::admission`]'s rules.
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
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.per_ip.remove(&addr.ip());
            }
        }
        true
    }

    /// The longest-waiting peer of the address with the most peers that wait (every peer but
    /// one whose request is being answered), as on the TCP loop: an attacker holding many
    /// places only ever gives up its own. Linear in the peers, and only run when all places are
    /// taken.
    fn evictable(&self) -> Option<SocketAddr> {
        let waiting = || self.by_addr.iter().filter(|(_, p)| !p.busy.get());
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

/// What a UDP endpoint shares with its loop: the cookie secret, and how many peers it holds
/// (for gauges and tests).
pub struct Endpoint {
    /// The bounds.
    pub limits: Limits,
    /// The cookie secret.
    pub cookies: Cookies,
    /// Peers with a handshake or session under way now.
    pub live: AtomicUsize,
    /// Where refusals are counted.
    pub observer: Arc<dyn Observer>,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint")
            .field("limits", &self.limits)
            .field("live", &self.live)
            .finish_non_exhaustive()
    }
}

/// Receives on `socket` until `stop` completes, admitting cookie-proven peers through
/// `endpoint` and running `handler` for each on a task of its own (`what` names the endpoint
/// in logs); then lets running peers end within `session_time`.
pub async fn serve<H, F>(
    socket: UdpSocket,
    endpoint: &Endpoint,
    what: &'static str,
    stop: impl Future<Output = ()>,
    handler: H,
) where
    H: Fn(Peer) -> F,
    F: Future<Output = ()> + Send + 'static,
{
    let socket = Arc::new(socket);
    let limits = &endpoint.limits;
    let mut peers = Peers::default();
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<(SocketAddr, u64)>();
    let mut next_id = 0u64;
    let mut buf = vec![0u8; 65_536];
    let mut tasks = tokio::task::JoinSet::new();
    tokio::pin!(stop);
    loop {
        let (n, from) = tokio::select! {
            _ = &mut stop => break,
            Some((addr, id)) = done_rx.recv() => {
                peers.remove(addr, Some(id));
                endpoint.live.store(peers.len(), Ordering::Relaxed);
                continue;
            }
            Some(_) = tasks.join_next(), if !tasks.is_empty() => continue,
            r = socket.recv_from(&mut buf) => match r {
                Ok(x) => x,
                Err(e) => {
                    // ICMP errors of earlier sends surface here (connection refused); they
                    // say nothing about the socket.
                    tracing::debug!(error = %e, "{what}: receive error");
                    continue;
                }
            },
        };
        let Some(d) = buf.get(..n).filter(|_| n <= MAX_DATAGRAM) else {
            continue;
        };
        let hello = dtls::client_hello(d);
        if let Some(p) = peers.by_addr.get(&from) {
            // A hello with another client_random is a new handshake from the same address (a
            // node that rebooted): it goes through the cookie exchange and, once proven,
            // replaces the old session. Anything else belongs to the session.
            let new_handshake = hello
                .as_ref()
                .is_some_and(|h| h.hello.random != p.random.as_slice());
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
        let random = hello.hello.random;
        if !endpoint
            .cookies
            .check(hello.hello.cookie, &from, random, now)
        {
            let cookie = endpoint.cookies.make(&from, random, now);
            let hvr = dtls::hello_verify_request(&hello, &cookie);
            let _ = socket.send_to(&hvr, from).await;
            continue;
        }
        if !hello.hello.ems {
            tracing::info!(peer = %from, "{what}: hello without the extended master secret refused");
            let alert = dtls::epoch0_alert(40, hello.record_seq);
            let _ = socket.send_to(&alert, from).await;
            continue;
        }
        // The address has proved it receives: from here on the TCP loop's rules.
        if !peers.by_addr.contains_key(&from) {
            if peers.of_ip(from.ip()) >= limits.max_peers_per_address {
                tracing::debug!(peer = %from, "{what}: hello dropped: too many peers from this address");
                endpoint.observer.refused("per_address_cap");
                continue;
            }
            if peers.len() >= limits.max_peers {
                match peers.evictable() {
                    Some(victim) => {
                        peers.remove(victim, None);
                        tracing::debug!(peer = %from, evicted = %victim, "{what}: all places taken: evicted the longest-waiting peer of the busiest address");
                        endpoint.observer.refused("evicted");
                    }
                    None => {
                        tracing::debug!(peer = %from, "{what}: hello dropped: every place is answering a request");
                        endpoint.observer.refused("peer_limit");
                        continue;
                    }
                }
            }
        }
        let (tx, inbox) = mpsc::channel(PEER_QUEUE);
        next_id += 1;
        let id = next_id;
        let busy = Busy::default();
        peers.insert(
            from,
            PeerHandle {
                tx,
                random: random.to_vec(),
                id,
                busy: busy.clone(),
            },
        );
        endpoint.live.store(peers.len(), Ordering::Relaxed);
        let session = handler(Peer {
            addr: from,
            socket: socket.clone(),
            first_hello: hello.without_cookie(),
            hello: d.to_vec(),
            inbox,
            busy,
        });
        let done = done_tx.clone();
        let limit = limits.session_time;
        tasks.spawn(async move {
            if tokio::time::timeout(limit, session).await.is_err() {
                tracing::info!(peer = %from, "{what}: session took too long; dropped");
            }
            let _ = done.send((from, id));
        });
    }
    drop(peers);
    let drain = limits.session_time;
    if tokio::time::timeout(drain, async { while tasks.join_next().await.is_some() {} })
        .await
        .is_err()
    {
        tracing::warn!("{what}: some sessions were still open after {drain:?}; stopping anyway");
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests may fail loudly
    use super::*;

    fn handle(id: u64, busy: bool) -> PeerHandle {
        let (tx, _) = mpsc::channel(1);
        let b = Busy::default();
        b.set(busy);
        PeerHandle {
            tx,
            random: vec![],
            id,
            busy: b,
        }
    }

    #[test]
    fn eviction_takes_the_oldest_waiting_peer_of_the_busiest_address() {
        let mut p = Peers::default();
        let legit: SocketAddr = "192.0.2.1:5684".parse().unwrap();
        let a1: SocketAddr = "192.0.2.9:1000".parse().unwrap();
        let a2: SocketAddr = "192.0.2.9:1001".parse().unwrap();
        let a3: SocketAddr = "192.0.2.9:1002".parse().unwrap();
        p.insert(legit, handle(1, false));
        p.insert(a1, handle(2, true)); // answering: never evicted
        p.insert(a2, handle(3, false));
        p.insert(a3, handle(4, false));
        assert_eq!(p.of_ip(a1.ip()), 3);
        assert_eq!(p.evictable(), Some(a2));
        assert!(p.remove(a2, None));
        // One waiting each now: the oldest goes, whoever it is.
        assert_eq!(p.evictable(), Some(legit));
        // A stale removal (another peer took the address since) removes nothing.
        assert!(!p.remove(a3, Some(99)));
        assert!(p.remove(a3, Some(4)));
        assert_eq!(p.len(), 2);
        assert_eq!(p.of_ip(a1.ip()), 1);
    }

    #[test]
    fn a_peer_replaced_at_the_same_address_is_counted_once() {
        let mut p = Peers::default();
        let a: SocketAddr = "192.0.2.1:5684".parse().unwrap();
        p.insert(a, handle(1, false));
        p.insert(a, handle(2, false));
        assert_eq!((p.len(), p.of_ip(a.ip())), (1, 1));
        assert!(!p.remove(a, Some(1)));
        assert!(p.remove(a, Some(2)));
        assert_eq!(p.of_ip(a.ip()), 0);
    }
}
