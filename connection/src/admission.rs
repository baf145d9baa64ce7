//! Who gets one of the IN's connection slots when an attacker wants them all.
//!
//! Three rules on every TCP listener (docs/protocol.md, "Limits"):
//! - at most `max_connections_per_address` connections per source address; more are closed
//!   as soon as they are accepted;
//! - a connection must deliver its first TLS record (the ClientHello) within `hello_timeout`,
//!   well before `handshake_timeout`;
//! - a connection that waits on its peer — for the hello, the rest of the handshake or the
//!   request — can be evicted: when every slot is taken, a newly accepted connection closes the
//!   longest-waiting connection of the address with the most waiting connections (so an
//!   attacker churning its own connections only ever evicts its own). A connection whose
//!   request is being answered is never evicted.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::unix::AsyncFd;
use tokio::net::TcpStream;
use tokio::sync::oneshot;

/// Open connections per source address.
#[derive(Debug)]
pub struct PerAddress {
    max: usize,
    open: Mutex<HashMap<IpAddr, usize>>,
}

/// One connection counted against its address; dropping it gives the place back.
#[derive(Debug)]
pub struct AddressSlot {
    table: Arc<PerAddress>,
    ip: IpAddr,
}

impl PerAddress {
    /// At most `max` connections from one address.
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(PerAddress {
            max,
            open: Mutex::new(HashMap::new()),
        })
    }

    /// A place for one more connection from `ip`, unless it has `max` open.
    pub fn enter(self: &Arc<Self>, ip: IpAddr) -> Option<AddressSlot> {
        let mut open = self.open.lock().ok()?;
        let n = open.entry(ip).or_insert(0);
        if *n >= self.max {
            return None;
        }
        *n += 1;
        Some(AddressSlot {
            table: self.clone(),
            ip,
        })
    }
}

impl Drop for AddressSlot {
    fn drop(&mut self) {
        if let Ok(mut open) = self.table.open.lock() {
            if let Some(n) = open.get_mut(&self.ip) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    open.remove(&self.ip);
                }
            }
        }
    }
}

/// The connections waiting on their peers, oldest first.
#[derive(Debug, Default)]
pub struct Waiting {
    next: AtomicU64,
    queue: Mutex<BTreeMap<u64, (IpAddr, oneshot::Sender<()>)>>,
}

/// A connection's place among the waiting: it ends with [`Ticket::leave`] or when dropped.
#[derive(Debug)]
pub struct Ticket {
    seq: u64,
    waiting: Arc<Waiting>,
    /// `None` once the eviction arrived (a oneshot must not be polled again after that).
    evicted: Option<oneshot::Receiver<()>>,
}

impl Waiting {
    /// Enters a connection from `ip` as waiting (the youngest).
    pub fn enter(self: &Arc<Self>, ip: IpAddr) -> Ticket {
        let seq = self.next.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        if let Ok(mut q) = self.queue.lock() {
            q.insert(seq, (ip, tx));
        }
        Ticket {
            seq,
            waiting: self.clone(),
            evicted: Some(rx),
        }
    }

    /// Tells the longest-waiting connection of the address with the most waiting connections
    /// to close; `false` when none waits. Linear in the waiting connections (at most
    /// `max_connections`), and only run when every slot is taken.
    pub fn evict(&self) -> bool {
        let Ok(mut q) = self.queue.lock() else {
            return false;
        };
        while !q.is_empty() {
            let mut counts: HashMap<IpAddr, usize> = HashMap::new();
            for (ip, _) in q.values() {
                *counts.entry(*ip).or_insert(0) += 1;
            }
            let most = counts.values().copied().max().unwrap_or(0);
            // In sequence order: the first of a top address is its longest-waiting.
            let Some(seq) = q
                .iter()
                .find(|(_, (ip, _))| counts.get(ip) == Some(&most))
                .map(|(seq, _)| *seq)
            else {
                return false;
            };
            if let Some((_, tx)) = q.remove(&seq) {
                if tx.send(()).is_ok() {
                    return true;
                }
            }
        }
        false
    }

    /// How many wait (for tests and metrics).
    #[cfg(test)]
    fn len(&self) -> usize {
        self.queue.lock().map_or(0, |q| q.len())
    }
}

impl Ticket {
    /// Runs `work` unless the connection is evicted first (`None`).
    pub async fn or_evicted<F: Future>(&mut self, work: F) -> Option<F::Output> {
        let evicted = self.evicted.as_mut()?;
        // Biased: an eviction that has arrived wins over work that is ready at the same time.
        tokio::select! {
            biased;
            _ = evicted => {
                self.evicted = None;
                None
            }
            out = work => Some(out),
        }
    }

    /// The connection stops waiting on its peer: from now on it cannot be evicted.
    pub fn leave(self) {}
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if let Ok(mut q) = self.waiting.queue.lock() {
            q.remove(&self.seq);
        }
    }
}

/// Why a connection's first TLS record never came: each is counted under its own
/// `refusals_total` reason (a peer that closed or spoke another protocol did not time out).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NoHello {
    /// Not complete within `hello_timeout`.
    TimedOut,
    /// The peer closed or reset the connection first.
    Closed,
    /// The first bytes cannot start a TLS handshake record that fits a record.
    NotTls,
    /// The connection could not be watched (out of file descriptors).
    Unwatchable,
}

impl NoHello {
    /// The `refusals_total` reason.
    pub fn code(self) -> &'static str {
        match self {
            NoHello::TimedOut => "hello_timeout",
            NoHello::Closed => "closed_before_hello",
            NoHello::NotTls => "not_tls",
            NoHello::Unwatchable => "descriptors",
        }
    }

    /// What the log says.
    pub fn reason(self) -> &'static str {
        match self {
            NoHello::TimedOut => "no ClientHello within the hello timeout",
            NoHello::Closed => "closed before its ClientHello was complete",
            NoHello::NotTls => "its first bytes are not a TLS handshake record",
            NoHello::Unwatchable => "cannot be watched (out of file descriptors?)",
        }
    }
}

/// Waits until the first TLS record is complete in the socket's receive buffer (without
/// reading it), within `limit`.
pub async fn first_record(tcp: &TcpStream, limit: Duration) -> Result<(), NoHello> {
    let mut buf = vec![0u8; MAX_RECORD];
    peek_first_record(tcp, &mut buf, limit).await.map(|_| ())
}

/// The longest TLS record on the wire (RFC 8446 §5.2) with its header.
pub const MAX_RECORD: usize = 5 + (1 << 14) + 256;

/// `fd` registered with the runtime for readable events.
///
/// tokio 1.54 deprecates the safe constructor because a `T: AsRawFd` need not own its
/// descriptor (RUSTSEC-2026-0386). An `OwnedFd` does: it stays open, and the same, until the
/// `AsyncFd` drops it, which is what the unsafe `register_with_interest` asks of its caller.
/// This crate forbids unsafe code, so it uses the safe constructor for the one type it is sound
/// for.
#[allow(deprecated)]
fn watch_readable(fd: std::os::fd::OwnedFd) -> std::io::Result<AsyncFd<std::os::fd::OwnedFd>> {
    AsyncFd::with_interest(fd, tokio::io::Interest::READABLE)
}

/// Peeks until the connection's first TLS record is complete in `buf`, within `limit`, and
/// returns how many bytes were peeked (that record and perhaps more); else why not: on
/// timeout, when the peer closes or resets first, or when the bytes cannot start a handshake
/// record that fits in `buf`.
///
/// It sleeps until the socket reports something new instead of polling. A peek returns at
/// once while bytes are buffered and never shows the peer's FIN behind them: a loop that
/// peeked every 5 ms (until 2026-12-01) kept a connection that sent half a hello and closed
/// (CLOSE-WAIT) in its slot until `hello_timeout`, and woke 200 times a second for each
/// connection that waits. Waiting on the stream's own readiness is no way out: clearing it
/// while bytes are buffered would leave the TLS stack's first read waiting for an event that
/// never comes. So the wait watches a duplicate of the socket (its own epoll registration,
/// edge-triggered, with EPOLLRDHUP for the FIN) and leaves the stream's readiness alone.
pub async fn peek_first_record(
    tcp: &TcpStream,
    buf: &mut [u8],
    limit: Duration,
) -> Result<usize, NoHello> {
    use rustix::net::RecvFlags;
    use std::os::fd::AsFd;
    let watch = match tcp.as_fd().try_clone_to_owned().and_then(watch_readable) {
        Ok(w) => w,
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch a new connection (out of file descriptors?); closed");
            return Err(NoHello::Unwatchable);
        }
    };
    let wait = async {
        loop {
            let mut event = watch.readable().await.map_err(|_| NoHello::Closed)?;
            let n = match rustix::net::recv(tcp, &mut *buf, RecvFlags::PEEK | RecvFlags::DONTWAIT) {
                Ok((_, 0)) => return Err(NoHello::Closed), // before sending anything
                Ok((_, n)) => n,
                Err(rustix::io::Errno::AGAIN) => {
                    event.clear_ready();
                    continue;
                }
                Err(rustix::io::Errno::INTR) => continue,
                Err(_) => return Err(NoHello::Closed),
            };
            if buf[0] != 22 {
                return Err(NoHello::NotTls);
            }
            if n >= 5 {
                let len = 5 + usize::from(u16::from_be_bytes([buf[3], buf[4]]));
                if len <= n {
                    return Ok(n);
                }
                if len > buf.len() {
                    return Err(NoHello::NotTls);
                }
            }
            if event.ready().is_read_closed() {
                return Err(NoHello::Closed); // the peer closed after these bytes
            }
            // Events after the one this guard holds keep the watch ready.
            event.clear_ready();
        }
    };
    tokio::time::timeout(limit, wait)
        .await
        .unwrap_or(Err(NoHello::TimedOut))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_gets_its_places_back_when_connections_end() {
        let t = PerAddress::new(2);
        let ip = IpAddr::from([192, 0, 2, 1]);
        let other: IpAddr = IpAddr::from([192, 0, 2, 2]);
        let a = t.enter(ip);
        let b = t.enter(ip);
        assert!(a.is_some() && b.is_some());
        assert!(t.enter(ip).is_none());
        assert!(t.enter(other).is_some());
        drop(a);
        assert!(t.enter(ip).is_some());
        drop(b);
        assert!(t.open.lock().map(|m| m.is_empty()).unwrap_or(false));
    }

    #[tokio::test]
    async fn the_oldest_waiting_connection_is_evicted_and_one_that_left_is_not() {
        let ip = IpAddr::from([192, 0, 2, 1]);
        let w = Arc::new(Waiting::default());
        let first = w.enter(ip);
        let mut second = w.enter(ip);
        let mut third = w.enter(ip);
        first.leave();
        assert_eq!(w.len(), 2);
        assert!(w.evict());
        // `second` was evicted: its work does not run to the end, nor does any later work.
        assert!(second
            .or_evicted(tokio::time::sleep(Duration::from_secs(60)))
            .await
            .is_none());
        assert!(second.or_evicted(async { 1 }).await.is_none());
        // `third` was not.
        assert_eq!(third.or_evicted(async { 7 }).await, Some(7));
        drop(third);
        drop(second);
        assert!(!w.evict());
    }

    #[tokio::test]
    async fn eviction_takes_from_the_address_with_the_most_waiting() {
        let (legit, attacker) = (IpAddr::from([192, 0, 2, 1]), IpAddr::from([192, 0, 2, 9]));
        let w = Arc::new(Waiting::default());
        let mut oldest_legit = w.enter(legit);
        let mut attackers: Vec<Ticket> = (0..3).map(|_| w.enter(attacker)).collect();
        assert!(w.evict());
        assert!(w.evict());
        // The legitimate connection waited longest but is alone: two attackers went.
        assert_eq!(oldest_legit.or_evicted(async { 1 }).await, Some(1));
        let mut evicted = 0;
        for t in &mut attackers {
            if t.or_evicted(async {}).await.is_none() {
                evicted += 1;
            }
        }
        assert_eq!(evicted, 2);
        // One each now: the oldest goes.
        assert!(w.evict());
        assert_eq!(oldest_legit.or_evicted(async { 1 }).await, None);
    }
}
