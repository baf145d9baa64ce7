//! The bootstrap over DTLS 1.2 and CoAP, in-process against a lab IN on loopback UDP: suites,
//! a lossy network, spoofed hellos and silent peers.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests may fail loudly

use std::collections::HashMap;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use m2mpki_bootstrap::client::{self, Enrolment};
use m2mpki_bootstrap::config::{DtlsSuite, FieldNodeProfile, ServerConfig, Transport};
use m2mpki_bootstrap::credstore::CredentialStatus;
use m2mpki_bootstrap::dtls::Pipe;
use m2mpki_bootstrap::server::Server;
use m2mpki_ca::Home;
use m2mpki_hsm::{KeyRef, Keystore};
use m2mpki_test_pki::lab::{self, LabHsm, LabLayout, LabNode};

struct Running {
    rt: tokio::runtime::Runtime,
    server: Arc<Server>,
    dtls: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    layout: LabLayout,
    _dir: tempfile::TempDir,
}

impl Running {
    fn start(tweak: impl FnOnce(&mut ServerConfig)) -> Running {
        let dir = tempfile::tempdir().unwrap();
        let layout = lab::init(&dir.path().join("lab"), LabHsm::None, 8443).unwrap();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let mut config = ServerConfig::load(&layout.serve_config).unwrap();
        config.listen = None; // DTLS alone: TLS can be switched off
        config.dtls.as_mut().expect("the lab serves DTLS").listen =
            SocketAddr::from(([127, 0, 0, 1], 0));
        tweak(&mut config);
        let home = Home::open(&layout.home).unwrap();
        let server = Arc::new(Server::new(config, &home, &Keystore::default()).unwrap());
        let listeners = rt.block_on(server.bind()).unwrap();
        assert!(listeners.tls.is_none());
        let dtls = listeners.dtls_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let s = server.clone();
        rt.spawn(async move {
            s.run(listeners, async {
                let _ = stopped.await;
            })
            .await
        });
        Running {
            rt,
            server,
            dtls,
            stop: Some(stop),
            layout,
            _dir: dir,
        }
    }

    fn node(&self, name: &str) -> &LabNode {
        self.layout.nodes.iter().find(|n| n.name == name).unwrap()
    }

    fn enrolment(&self, name: &str, suites: &[DtlsSuite], to: SocketAddr) -> Enrolment {
        let mut profile = FieldNodeProfile::load(&self.layout.profile).unwrap();
        profile.transport = Transport::Dtls;
        profile.dtls_suites = suites.to_vec();
        Enrolment {
            profile,
            chain: m2mpki_bootstrap::tls::load_chain(&self.node(name).chain).unwrap(),
            key: Keystore::default()
                .open(&KeyRef::File(self.node(name).key.clone()))
                .unwrap(),
            connect: Some(to.to_string()),
            versions: vec![],
            timeout: Duration::from_secs(90),
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

#[test]
fn device_and_node_enrol_with_one_suite_each_and_the_rogue_gets_nothing() {
    let run = Running::start(|_| {});
    for suite in DtlsSuite::ALL {
        for name in ["SN-0001", "pump-1"] {
            let got = run
                .rt
                .block_on(client::enroll(run.enrolment(name, &[suite], run.dtls)))
                .unwrap_or_else(|e| panic!("{name} over {suite:?}: {e}"));
            let node = run.node(name);
            assert_eq!(got.identity, node.identity);
            assert_eq!(got.tls_version, format!("DTLSv1_2 {}", suite.iana_name()));
            let live = run
                .server
                .credentials()
                .live(&node.identity)
                .unwrap()
                .unwrap();
            assert_eq!(live.id, got.credential_id);
            let stored = run
                .server
                .credentials()
                .unseal(run.server.store_key(), &live)
                .unwrap();
            assert_eq!(
                stored, got.credential,
                "the node unwrapped what the IN stored"
            );
        }
    }
    let rogue = run.node("ROGUE-1");
    let err = run
        .rt
        .block_on(client::enroll(run.enrolment(
            "ROGUE-1",
            &[DtlsSuite::Aes128Ccm8],
            run.dtls,
        )))
        .unwrap_err();
    let text = err.to_string();
    assert!(
        matches!(err, m2mpki_bootstrap::Error::Handshake { .. }) && text.contains("unknown ca"),
        "{text}"
    );
    assert!(run
        .server
        .credentials()
        .live(&rogue.identity)
        .unwrap()
        .is_none());
}

/// A tiny deterministic generator, so a failure can be replayed.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// What the proxy did: datagrams passed, dropped, duplicated, held back.
#[derive(Default, Debug)]
struct Disturbed {
    passed: AtomicUsize,
    dropped: AtomicUsize,
    duplicated: AtomicUsize,
    reordered: AtomicUsize,
}

/// A UDP proxy in front of `server` that, for 20 % of datagrams in either direction, drops,
/// duplicates or holds back (reorders after the next datagram) one, at random.
fn lossy_proxy(server: SocketAddr) -> (SocketAddr, Arc<Disturbed>) {
    let front = UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = front.local_addr().unwrap();
    let stats = Arc::new(Disturbed::default());
    let st = stats.clone();
    std::thread::spawn(move || {
        let count = |c: &AtomicUsize| {
            c.fetch_add(1, Ordering::Relaxed);
        };
        let mut rng = XorShift(0x9E37_79B9_7F4A_7C15);
        let mut upstream: HashMap<SocketAddr, Arc<UdpSocket>> = HashMap::new();
        let front = Arc::new(front);
        let (tx, rx) = std::sync::mpsc::channel::<(SocketAddr, Vec<u8>)>();
        front
            .set_read_timeout(Some(Duration::from_millis(5)))
            .unwrap();
        let mut held_up: Option<(SocketAddr, Vec<u8>)> = None;
        let mut held_down: Option<(SocketAddr, Vec<u8>)> = None;
        let mut buf = vec![0u8; 65_536];
        loop {
            // Client to server.
            if let Ok((n, client)) = front.recv_from(&mut buf) {
                let up = upstream.entry(client).or_insert_with(|| {
                    let s = Arc::new(UdpSocket::bind("127.0.0.1:0").unwrap());
                    s.connect(server).unwrap();
                    let (s2, tx) = (s.clone(), tx.clone());
                    std::thread::spawn(move || {
                        let mut b = vec![0u8; 65_536];
                        while let Ok(n) = s2.recv(&mut b) {
                            if tx.send((client, b[..n].to_vec())).is_err() {
                                return;
                            }
                        }
                    });
                    s
                });
                let d = buf[..n].to_vec();
                match (rng.next() % 100, rng.next() % 3) {
                    (0..=19, 0) => count(&st.dropped),
                    (0..=19, 1) => {
                        count(&st.duplicated);
                        let _ = up.send(&d);
                        let _ = up.send(&d);
                    }
                    (0..=19, _) => {
                        count(&st.reordered);
                        if let Some((c, old)) = held_up.replace((client, d)) {
                            let _ = upstream[&c].send(&old);
                        }
                    }
                    _ => {
                        count(&st.passed);
                        let _ = up.send(&d);
                        if let Some((c, old)) = held_up.take() {
                            let _ = upstream[&c].send(&old);
                        }
                    }
                }
            }
            // Server to client.
            while let Ok((client, d)) = rx.try_recv() {
                match (rng.next() % 100, rng.next() % 3) {
                    (0..=19, 0) => count(&st.dropped),
                    (0..=19, 1) => {
                        count(&st.duplicated);
                        let _ = front.send_to(&d, client);
                        let _ = front.send_to(&d, client);
                    }
                    (0..=19, _) => {
                        count(&st.reordered);
                        if let Some((c, old)) = held_down.replace((client, d)) {
                            let _ = front.send_to(&old, c);
                        }
                    }
                    _ => {
                        count(&st.passed);
                        let _ = front.send_to(&d, client);
                        if let Some((c, old)) = held_down.take() {
                            let _ = front.send_to(&old, c);
                        }
                    }
                }
            }
        }
    });
    (addr, stats)
}

#[test]
fn every_enrolment_completes_through_a_lossy_network() {
    let run = Running::start(|c| {
        c.limits.handshake_timeout = Duration::from_secs(60);
        c.limits.idle_timeout = Duration::from_secs(60);
    });
    let (proxy, disturbed) = lossy_proxy(run.dtls);
    let names = ["SN-0001", "SN-0002", "SN-0003", "pump-1", "pump-2"];
    // Each node twice, all at once.
    let results = run.rt.block_on(async {
        let mut tasks = Vec::new();
        for round in 0..2 {
            for name in names {
                let e = run.enrolment(name, &[DtlsSuite::Aes128Ccm8], proxy);
                tasks.push(tokio::spawn(async move {
                    (name, round, client::enroll(e).await)
                }));
            }
        }
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.unwrap());
        }
        out
    });
    for (name, round, r) in &results {
        assert!(
            r.is_ok(),
            "{name} (round {round}): {}",
            r.as_ref().unwrap_err()
        );
    }
    eprintln!("proxy: {disturbed:?}");
    // The network really was bad: each kind of disturbance happened, to about a fifth.
    let n = |c: &AtomicUsize| c.load(Ordering::Relaxed);
    let bad = n(&disturbed.dropped) + n(&disturbed.duplicated) + n(&disturbed.reordered);
    assert!(
        n(&disturbed.dropped) > 0 && n(&disturbed.duplicated) > 0 && n(&disturbed.reordered) > 0,
        "{disturbed:?}"
    );
    assert!(bad * 10 >= bad + n(&disturbed.passed), "{disturbed:?}");
    for name in names {
        let identity = &run.node(name).identity;
        let history = run.server.credentials().history(identity).unwrap();
        let live: Vec<_> = history
            .iter()
            .filter(|r| r.status == CredentialStatus::Live)
            .collect();
        assert_eq!(live.len(), 1, "{name}: {history:?}");
        // Retransmitted requests got the remembered answer, never a second credential.
        assert_eq!(history.len(), 2, "{name}: {history:?}");
        let ids: Vec<&str> = results
            .iter()
            .filter(|(n, _, _)| *n == name)
            .map(|(_, _, r)| r.as_ref().unwrap().credential_id.as_str())
            .collect();
        assert!(ids.contains(&live[0].id.as_str()), "{name}");
    }
}

/// A first-flight ClientHello as OpenSSL's DTLS client sends it.
fn client_hello() -> Vec<u8> {
    let mut b = openssl::ssl::SslContext::builder(openssl::ssl::SslMethod::dtls_client()).unwrap();
    b.set_cipher_list("ECDHE-ECDSA-AES128-CCM8").unwrap();
    let ssl = openssl::ssl::Ssl::new(&b.build()).unwrap();
    match ssl.connect(Pipe::default()) {
        Err(openssl::ssl::HandshakeError::WouldBlock(mut m)) => m.get_mut().outbox.remove(0),
        _ => panic!("no hello"),
    }
}

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .unwrap()
        .parse()
        .unwrap()
}

#[test]
fn spoofed_hellos_leave_no_state_and_silent_peers_do_not_stop_a_real_one() {
    let run = Running::start(|c| {
        c.dtls.as_mut().unwrap().max_peers = 1100;
        c.limits.handshake_timeout = Duration::from_secs(60);
    });
    let hello = client_hello();
    // 10 000 hellos without a cookie, from 100 source addresses (127.0.0.0/8 is all ours).
    let senders: Vec<UdpSocket> = (2..102)
        .map(|i| UdpSocket::bind(SocketAddr::from(([127, 0, 0, i as u8], 0))).unwrap())
        .collect();
    let warm = rss_kib();
    for i in 0..10_000 {
        senders[i % senders.len()]
            .send_to(&hello, run.dtls)
            .unwrap();
    }
    // Each got its stateless HelloVerifyRequest...
    let s = &senders[0];
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = [0u8; 512];
    let (n, _) = s.recv_from(&mut buf).unwrap();
    assert_eq!(
        (buf[0], buf[13]),
        (22, 3),
        "a HelloVerifyRequest: {:?}",
        &buf[..n]
    );
    std::thread::sleep(Duration::from_millis(500));
    // ... and the server holds nothing for them.
    assert_eq!(run.server.dtls_sessions(), 0);
    let grown = rss_kib().saturating_sub(warm);
    eprintln!("RSS growth after 10 000 spoofed hellos: {grown} KiB");
    assert!(grown < 8 * 1024, "memory grew by {grown} KiB");

    // 1 000 silent peers: each returns its cookie, then says nothing.
    let mut silent = Vec::new();
    for _ in 0..1000 {
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        sock.connect(run.dtls).unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut b =
            openssl::ssl::SslContext::builder(openssl::ssl::SslMethod::dtls_client()).unwrap();
        b.set_cipher_list("ECDHE-ECDSA-AES128-CCM8").unwrap();
        let ssl = openssl::ssl::Ssl::new(&b.build()).unwrap();
        let mut mid = match ssl.connect(Pipe::default()) {
            Err(openssl::ssl::HandshakeError::WouldBlock(m)) => m,
            _ => panic!("no hello"),
        };
        for d in mid.get_mut().outbox.drain(..) {
            sock.send(&d).unwrap();
        }
        let n = sock.recv(&mut buf).unwrap();
        mid.get_mut().inbox.push_back(buf[..n].to_vec());
        let mut mid = match mid.handshake() {
            Err(openssl::ssl::HandshakeError::WouldBlock(m)) => m,
            _ => panic!("no second hello"),
        };
        for d in mid.get_mut().outbox.drain(..) {
            sock.send(&d).unwrap();
        }
        silent.push((sock, mid));
    }
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        run.server.dtls_sessions() >= 1000,
        "{}",
        run.server.dtls_sessions()
    );
    let got = run
        .rt
        .block_on(client::enroll(run.enrolment(
            "SN-0003",
            &[DtlsSuite::Aes128Ccm8],
            run.dtls,
        )))
        .unwrap();
    assert_eq!(got.identity, run.node("SN-0003").identity);
    drop(silent);
}
