//! A connect flood as an attacker would run it against an IN: `n` connections from one source
//! address that send nothing or half a ClientHello, each reopened as soon as the IN closes it.
//! Used by `bootstrap/tests/hostile.rs` and by bench section 8; [`DtlsFlood`] is the same over
//! DTLS, with cookie-proven silent peers.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Opens a TCP connection from `from` to `to` and, when `half_hello`, sends the first 45 bytes
/// of a handshake record that announces 512; then returns it, held open.
pub async fn silent(
    from: IpAddr,
    to: SocketAddr,
    half_hello: bool,
) -> std::io::Result<tokio::net::TcpStream> {
    let socket = if from.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.bind(SocketAddr::new(from, 0))?;
    let mut tcp = socket.connect(to).await?;
    if half_hello {
        let mut bytes = vec![22, 3, 1, 2, 0, 1, 0, 1, 252, 3, 3];
        bytes.resize(45, 0x41);
        tcp.write_all(&bytes).await?;
    }
    Ok(tcp)
}

/// A running flood; it stops when [`Flood::stop`] is called or it is dropped.
pub struct Flood {
    stop: Arc<AtomicBool>,
    opened: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Flood {
    /// Starts `n` connection loops from `from` to `to` on `rt`; every other one sends half a
    /// ClientHello. A loop whose connect fails waits 20 ms before it tries again.
    pub fn start(rt: &tokio::runtime::Handle, from: IpAddr, to: SocketAddr, n: usize) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let opened = Arc::new(AtomicUsize::new(0));
        let (s, o) = (stop.clone(), opened.clone());
        let task = rt.spawn(async move {
            let mut tasks = tokio::task::JoinSet::new();
            for i in 0..n {
                let (stop, opened) = (s.clone(), o.clone());
                tasks.spawn(async move {
                    while !stop.load(Ordering::Relaxed) {
                        match silent(from, to, i % 2 == 0).await {
                            Ok(mut tcp) => {
                                opened.fetch_add(1, Ordering::Relaxed);
                                // Held until the IN closes it (or a minute passes).
                                let mut buf = [0u8; 64];
                                let _ = tokio::time::timeout(
                                    Duration::from_secs(60),
                                    tcp.read(&mut buf),
                                )
                                .await;
                            }
                            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                        }
                    }
                });
            }
            while tasks.join_next().await.is_some() {}
        });
        Self { stop, opened, task }
    }

    /// Connections opened so far.
    pub fn opened(&self) -> usize {
        self.opened.load(Ordering::Relaxed)
    }

    /// Stops every loop and closes its connection; returns the connections opened.
    pub fn stop(self) -> usize {
        let opened = self.opened();
        self.stop.store(true, Ordering::Relaxed);
        self.task.abort();
        opened
    }
}

impl Drop for Flood {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.task.abort();
    }
}

/// The kernel's count of connections dropped because a listener's accept queue was full
/// (`TcpExt: ListenOverflows` in /proc/net/netstat, for the whole network namespace), or
/// `None` when it cannot be read.
pub fn listen_overflows() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/net/netstat").ok()?;
    let mut lines = text.lines().filter(|l| l.starts_with("TcpExt:"));
    let (names, values) = (lines.next()?, lines.next()?);
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(n, _)| *n == "ListenOverflows")
        .and_then(|(_, v)| v.parse().ok())
}

/// The DTLS form of the attack (hostile review D1): from `from`, one new UDP port after
/// another returns its cookie to the IN at `to` and then says nothing, so that each holds a
/// place at the IN until its handshake deadline. Runs on its own thread until stopped.
pub struct DtlsFlood {
    stop: Arc<AtomicBool>,
    proven: Arc<AtomicUsize>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl DtlsFlood {
    /// Starts the flood; `sni` is the IN's name (the IN refuses hellos without it).
    pub fn start(from: IpAddr, to: SocketAddr, sni: &str) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let proven = Arc::new(AtomicUsize::new(0));
        let (s, p, sni) = (stop.clone(), proven.clone(), sni.to_owned());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                if cookie_proven(from, to, &sni).is_ok() {
                    p.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
        DtlsFlood {
            stop,
            proven,
            thread: Some(thread),
        }
    }

    /// Stops the flood; returns how many peers returned their cookie.
    pub fn stop(mut self) -> usize {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.proven.load(Ordering::Relaxed)
    }
}

impl Drop for DtlsFlood {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// One cookie-proven, then silent, DTLS peer from a fresh port of `from`.
fn cookie_proven(from: IpAddr, to: SocketAddr, sni: &str) -> anyhow::Result<()> {
    use m2mpki_bootstrap::dtls::Pipe;
    use openssl::ssl::{HandshakeError, Ssl, SslContext, SslMethod};
    let sock = std::net::UdpSocket::bind(SocketAddr::new(from, 0))?;
    sock.connect(to)?;
    sock.set_read_timeout(Some(Duration::from_secs(1)))?;
    let mut b = SslContext::builder(SslMethod::dtls_client())?;
    b.set_cipher_list("ECDHE-ECDSA-AES128-CCM8")?;
    let mut ssl = Ssl::new(&b.build())?;
    ssl.set_hostname(sni)?;
    let mut mid = match ssl.connect(Pipe::default()) {
        Err(HandshakeError::WouldBlock(m)) => m,
        _ => anyhow::bail!("no ClientHello"),
    };
    for d in mid.get_mut().outbox.drain(..) {
        sock.send(&d)?;
    }
    let mut buf = [0u8; 2048];
    let n = sock.recv(&mut buf)?;
    mid.get_mut().inbox.push_back(buf[..n].to_vec());
    let mut mid = match mid.handshake() {
        Err(HandshakeError::WouldBlock(m)) => m,
        _ => anyhow::bail!("no cookie-bearing ClientHello"),
    };
    for d in mid.get_mut().outbox.drain(..) {
        sock.send(&d)?;
    }
    Ok(())
}
