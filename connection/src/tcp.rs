//! The one TCP accept loop. Every TCP listener of a process (the bootstrap's TLS port, the PSK
//! association port, the metrics port) is this loop with a handler: the loop owns who gets a
//! connection slot (crate::admission), the hello deadline, the handshake deadline helper, the
//! refusal counts and the drain; the handler owns what is said on the connection.

use std::fmt::Display;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use crate::admission::{self, PerAddress, Ticket, Waiting};

/// The bounds of one [`Admission`] (docs/protocol.md, "Limits").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Connections open at once.
    pub max_connections: usize,
    /// Connections open at once from one source address.
    pub max_connections_per_address: usize,
    /// How long a connection may take to deliver its first TLS record.
    pub hello_timeout: Duration,
    /// How long a handshake may take.
    pub handshake_timeout: Duration,
    /// How long a connection may wait for its request after the handshake.
    pub idle_timeout: Duration,
}

/// Where the loop reports what it refused and how many connections are open (the IN's
/// `refusals_total` and `open_connections`).
pub trait Observer: Send + Sync {
    /// A connection refused or closed early, by reason (`per_address_cap`, `evicted`,
    /// `hello_timeout`, `closed_before_hello`, `not_tls`, `descriptors`, `handshake_timeout`).
    fn refused(&self, reason: &'static str);
    /// A connection was admitted.
    fn opened(&self) {}
    /// An admitted connection ended.
    fn closed(&self) {}
}

/// An observer that counts nothing.
#[derive(Debug, Default, Clone, Copy)]
pub struct Unobserved;

impl Observer for Unobserved {
    fn refused(&self, _: &'static str) {}
}

/// The connection slots that a set of listeners share: one per process for the listeners that
/// face nodes (so the limits are the process's, whatever the number of ports), one of its own
/// for a listener that must stay reachable when those are full (metrics).
pub struct Admission {
    limits: Limits,
    permits: Arc<Semaphore>,
    per_address: Arc<PerAddress>,
    waiting: Arc<Waiting>,
    observer: Arc<dyn Observer>,
}

impl std::fmt::Debug for Admission {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admission")
            .field("limits", &self.limits)
            .field("free", &self.permits.available_permits())
            .finish_non_exhaustive()
    }
}

/// What the loop waits for before it hands a connection over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum First {
    /// Nothing: the handler reads (plain HTTP).
    Nothing,
    /// The first TLS record, complete, within `hello_timeout` (peeked, not consumed: the TLS
    /// stack reads it again).
    TlsRecord,
}

/// One admitted connection, handed to the handler. Its slot is held until the handler
/// returns.
#[derive(Debug)]
pub struct Conn {
    /// The connection.
    pub tcp: TcpStream,
    /// Its peer.
    pub peer: SocketAddr,
    /// Its place among the connections that wait on their peers (it can be evicted until it
    /// leaves).
    pub ticket: Ticket,
    /// The first record and perhaps more ([`First::TlsRecord`]; empty with
    /// [`First::Nothing`]): peeked, still unread in the socket. Read its ClientHello with
    /// [`crate::hello::parse_tls_record`].
    pub first_record: Vec<u8>,
}

/// How a handshake ended when it did not complete.
#[derive(Debug)]
pub enum Unfinished<E> {
    /// The stack refused it.
    Failed(E),
    /// Not complete within `handshake_timeout`.
    TimedOut,
    /// The connection was evicted first.
    Evicted,
}

impl Admission {
    /// Slots bounded by `limits`, reported to `observer`.
    pub fn new(limits: Limits, observer: Arc<dyn Observer>) -> Arc<Self> {
        Arc::new(Admission {
            permits: Arc::new(Semaphore::new(limits.max_connections)),
            per_address: PerAddress::new(limits.max_connections_per_address),
            waiting: Arc::new(Waiting::default()),
            observer,
            limits,
        })
    }

    /// The limits.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Counts a refusal the handler decided (an SNI it does not serve, say).
    pub fn refused(&self, reason: &'static str) {
        self.observer.refused(reason);
    }

    /// Runs a handshake within `handshake_timeout` unless the connection is evicted first;
    /// logs how one that did not complete ended (`what` names the stack), and counts a timeout.
    pub async fn handshake<T, E: Display>(
        &self,
        ticket: &mut Ticket,
        peer: SocketAddr,
        what: &str,
        work: impl Future<Output = Result<T, E>>,
    ) -> Result<T, Unfinished<E>> {
        let timed = tokio::time::timeout(self.limits.handshake_timeout, work);
        let end = match ticket.or_evicted(timed).await {
            Some(Ok(Ok(done))) => return Ok(done),
            Some(Ok(Err(e))) => {
                tracing::info!(%peer, error = %e, "{what} handshake failed");
                Unfinished::Failed(e)
            }
            Some(Err(_)) => {
                tracing::info!(%peer, "{what} handshake timed out");
                self.observer.refused("handshake_timeout");
                Unfinished::TimedOut
            }
            None => {
                tracing::info!(%peer, "{what} connection evicted during the handshake");
                Unfinished::Evicted
            }
        };
        Err(end)
    }

    /// Waits until every admitted connection has ended, at most `handshake_timeout +
    /// idle_timeout`; `false` when some were still open then.
    pub async fn drain(&self) -> bool {
        let limit = self.limits.handshake_timeout + self.limits.idle_timeout;
        let all = u32::try_from(self.limits.max_connections).unwrap_or(u32::MAX);
        match tokio::time::timeout(limit, self.permits.acquire_many(all)).await {
            Ok(Ok(permits)) => {
                drop(permits);
                true
            }
            Ok(Err(_)) => true, // closed: nothing can be open
            Err(_) => false,
        }
    }
}

/// Accepts on `listener` until `stop` completes, admitting each connection through
/// `admission` and handing it to `handler` on a task of its own (`what` names the listener in
/// logs). Stops accepting when `stop` completes; the connections already handed over run on
/// (see [`Admission::drain`]).
pub async fn serve<H, F>(
    listener: TcpListener,
    admission: Arc<Admission>,
    what: &'static str,
    first: First,
    stop: impl Future<Output = ()>,
    handler: H,
) where
    H: Fn(Conn) -> F + Send + Sync + 'static,
    F: Future<Output = ()> + Send + 'static,
{
    let handler = Arc::new(handler);
    tokio::pin!(stop);
    loop {
        // Accept first, even when every slot is taken: the newcomer may take the place of a
        // connection that only waits (crate::admission).
        let (tcp, peer) = tokio::select! {
            _ = &mut stop => break,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // Out of descriptors, mostly: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed ({what})");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Some(address_slot) = admission.per_address.enter(peer.ip()) else {
            tracing::debug!(%peer, "{what}: closed: too many connections from this address");
            admission.observer.refused("per_address_cap");
            continue;
        };
        let permit = match admission.permits.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                if admission.waiting.evict() {
                    tracing::debug!(%peer, "{what}: all slots taken: evicted the longest-waiting connection");
                    admission.observer.refused("evicted");
                }
                tokio::select! {
                    _ = &mut stop => break,
                    p = admission.permits.clone().acquire_owned() => match p {
                        Ok(p) => p,
                        Err(_) => break,
                    },
                }
            }
        };
        let ticket = admission.waiting.enter(peer.ip());
        admission.observer.opened();
        let _ = tcp.set_nodelay(true);
        let admission = admission.clone();
        let handler = handler.clone();
        tokio::spawn(async move {
            let slot = (permit, address_slot);
            if let Some(conn) = first_step(&admission, tcp, peer, ticket, first, what).await {
                handler(conn).await;
            }
            drop(slot);
            admission.observer.closed();
        });
    }
}

/// Waits for what the listener reads before its handler, within its deadline.
async fn first_step(
    admission: &Admission,
    tcp: TcpStream,
    peer: SocketAddr,
    mut ticket: Ticket,
    first: First,
    what: &str,
) -> Option<Conn> {
    let bytes = match first {
        First::Nothing => Vec::new(),
        First::TlsRecord => {
            let limit = admission.limits.hello_timeout;
            let mut buf = vec![0u8; admission::MAX_RECORD];
            match ticket
                .or_evicted(admission::peek_first_record(&tcp, &mut buf, limit))
                .await
            {
                Some(Ok(n)) => {
                    buf.truncate(n);
                    buf.shrink_to_fit();
                    buf
                }
                Some(Err(why)) => {
                    tracing::info!(%peer, code = why.code(), "{what}: {}; closed", why.reason());
                    admission.observer.refused(why.code());
                    return None;
                }
                None => {
                    tracing::info!(%peer, "{what}: evicted while waiting for its ClientHello");
                    return None;
                }
            }
        }
    };
    Some(Conn {
        tcp,
        peer,
        ticket,
        first_record: bytes,
    })
}
