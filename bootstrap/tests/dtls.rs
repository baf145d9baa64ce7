//! The bootstrap over DTLS 1.2 and CoAP, in-process against a lab IN on loopback UDP: suites,
//! a lossy network, spoofed hellos and silent peers.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests may fail loudly

use std::collections::HashMap;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use m2mpki_bootstrap::client::{self, Enrolment};
use m2mpki_bootstrap::coap::{self, option, Block, Message, Type};
use m2mpki_bootstrap::config::{DtlsSuite, FieldNodeProfile, Transport};
use m2mpki_bootstrap::credstore::CredentialStatus;
use m2mpki_bootstrap::dtls::Pipe;
use m2mpki_hsm::{KeyRef, Keystore};

use m2mpki_test_pki::IN_FQDN;

mod common;

use common::Running;

/// An enrolment of lab node `name` over DTLS, offering `suites`, to `to`.
fn enrolment(run: &Running, name: &str, suites: &[DtlsSuite], to: SocketAddr) -> Enrolment {
    let mut profile = FieldNodeProfile::load(&run.layout.profile).unwrap();
    profile.transport = Transport::Dtls;
    profile.dtls_suites = suites.to_vec();
    Enrolment {
        profile,
        chain: m2mpki_bootstrap::tls::load_chain(&run.node(name).chain).unwrap(),
        key: run.key(name),
        connect: Some(to.to_string()),
        versions: vec![],
        timeout: Duration::from_secs(90),
    }
}

/// The IN with TLS switched off, `tweak` applied.
fn start(tweak: impl FnOnce(&mut m2mpki_bootstrap::config::ServerConfig)) -> (Running, SocketAddr) {
    let run = Running::start(|c| {
        c.listen = None; // DTLS alone: TLS can be switched off
        tweak(c);
    });
    assert!(run.tls.is_none());
    let dtls = run.dtls.unwrap();
    (run, dtls)
}

#[test]
fn device_and_node_enrol_with_one_suite_each_and_the_rogue_gets_nothing() {
    let (run, dtls) = start(|_| {});
    for suite in DtlsSuite::ALL {
        for name in ["SN-0001", "pump-1"] {
            let got = run
                .rt
                .block_on(client::enroll(enrolment(&run, name, &[suite], dtls)))
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
        .block_on(client::enroll(enrolment(
            &run,
            "ROGUE-1",
            &[DtlsSuite::Aes128Ccm8],
            dtls,
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
    // Counted under its code, as over TLS (hostile review D10).
    assert_eq!(refusals(&run, "unknown_root"), 1);
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
    let (run, dtls) = start(|c| {
        c.limits.handshake_timeout = Duration::from_secs(60);
        c.limits.idle_timeout = Duration::from_secs(60);
    });
    let (proxy, disturbed) = lossy_proxy(dtls);
    let names = ["SN-0001", "SN-0002", "SN-0003", "pump-1", "pump-2"];
    // Each node twice, all at once.
    let results = run.rt.block_on(async {
        let mut tasks = Vec::new();
        for round in 0..2 {
            for name in names {
                let e = enrolment(&run, name, &[DtlsSuite::Aes128Ccm8], proxy);
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

#[test]
fn spoofed_hellos_leave_no_state_and_silent_peers_do_not_stop_a_real_one() {
    let (run, dtls) = start(|c| {
        c.dtls.as_mut().unwrap().max_peers = 1100;
        c.limits.handshake_timeout = Duration::from_secs(60);
    });
    let hello = client_hello();
    // 10 000 hellos without a cookie, from 100 source addresses (127.0.0.0/8 is all ours).
    let senders: Vec<UdpSocket> = (2..102)
        .map(|i| UdpSocket::bind(SocketAddr::from(([127, 0, 0, i as u8], 0))).unwrap())
        .collect();
    for i in 0..10_000 {
        senders[i % senders.len()].send_to(&hello, dtls).unwrap();
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
    // ... and the server holds nothing for them: no session (the process's RSS is not a
    // measure here, since the other tests of this binary run in threads beside it).
    assert_eq!(run.server.dtls_sessions(), 0);

    // 1 000 silent peers from 20 addresses (50 each, within the per-address cap): each
    // returns its cookie, then says nothing.
    let mut silent = Vec::new();
    for i in 0..1000 {
        let sock = UdpSocket::bind(SocketAddr::from(([127, 0, 1, 1 + (i % 20) as u8], 0))).unwrap();
        sock.connect(dtls).unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mid = half_handshake(&sock);
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
        .block_on(client::enroll(enrolment(
            &run,
            "SN-0003",
            &[DtlsSuite::Aes128Ccm8],
            dtls,
        )))
        .unwrap();
    assert_eq!(got.identity, run.node("SN-0003").identity);
    drop(silent);
}

/// A DTLS session of lab node `name` with the IN at `to`, for speaking CoAP by hand.
fn session(run: &Running, name: &str, to: SocketAddr) -> m2mpki_bootstrap::dtls::client::Session {
    let profile = FieldNodeProfile::load(&run.layout.profile).unwrap();
    let chain: Vec<Vec<u8>> = m2mpki_bootstrap::tls::load_chain(&run.node(name).chain)
        .unwrap()
        .iter()
        .map(|c| c.as_ref().to_vec())
        .collect();
    let key = Keystore::default()
        .open(&KeyRef::File(run.node(name).key.clone()))
        .unwrap();
    let ctx = m2mpki_bootstrap::dtls::client::context(
        &[DtlsSuite::Aes128Gcm],
        &chain,
        &key.software_pkcs8().unwrap(),
        profile.roots.clone(),
        profile.in_fqdn.clone(),
    )
    .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    run.rt
        .block_on(m2mpki_bootstrap::dtls::client::connect(
            &ctx,
            &to.to_string(),
            &profile.in_fqdn,
            1280,
            deadline,
        ))
        .unwrap()
}

fn post(message_id: u16, path: &str, options: Vec<(u16, Vec<u8>)>, body: &[u8]) -> Message {
    let mut all = vec![(option::URI_PATH, path.as_bytes().to_vec())];
    all.extend(options);
    Message {
        kind: Type::Con,
        code: coap::POST,
        message_id,
        token: vec![7, 7],
        options: all,
        payload: body.to_vec(),
    }
}

fn exchange(
    run: &Running,
    s: &mut m2mpki_bootstrap::dtls::client::Session,
    m: &Message,
) -> (Vec<u8>, Message) {
    run.rt.block_on(async {
        s.send_record(&m.encode()).await.unwrap();
        let raw = s
            .recv_record(Duration::from_secs(10))
            .await
            .unwrap()
            .expect("an answer");
        let parsed = Message::decode(&raw).unwrap();
        (raw, parsed)
    })
}

fn json() -> (u16, Vec<u8>) {
    (option::CONTENT_FORMAT, coap::uint(u32::from(coap::JSON)))
}

#[test]
fn coap_codes_retransmissions_and_refusals() {
    let (run, dtls) = start(|_| {});
    let mut s = session(&run, "SN-0001", dtls);
    let count = || run.server.credentials().count().unwrap();
    let body = br#"{"version":1}"#;
    // A retransmitted request (same message ID) gets the same bytes, not a second credential.
    let (first, m) = exchange(&run, &mut s, &post(0x100, "bootstrap", vec![json()], body));
    assert_eq!(
        (m.kind, m.code, m.message_id, m.token.clone()),
        (Type::Ack, coap::code(2, 4), 0x100, vec![7, 7])
    );
    assert_eq!(m.uint_option(option::CONTENT_FORMAT), Some(Some(50)));
    let doc: serde_json::Value = serde_json::from_slice(&m.payload).unwrap();
    assert!(doc["wrapped_credential"].is_string(), "{doc}");
    assert_eq!(count(), 1);
    let (again, _) = exchange(&run, &mut s, &post(0x100, "bootstrap", vec![json()], body));
    assert_eq!(again, first);
    assert_eq!(count(), 1);
    // A new message ID is a new request: a new credential that supersedes.
    let (_, m) = exchange(&run, &mut s, &post(0x101, "bootstrap", vec![json()], body));
    assert_eq!(m.code, coap::code(2, 4));
    assert_eq!(count(), 2);
    // Each refusal has its code and the JSON error document, and issues nothing.
    let cases: Vec<(Message, (u8, u8), &str)> = vec![
        (post(1, "other", vec![json()], body), (4, 4), "not_found"),
        (
            Message {
                code: 1,
                ..post(2, "bootstrap", vec![json()], body)
            },
            (4, 5),
            "method_not_allowed",
        ),
        (
            post(3, "bootstrap", vec![], body),
            (4, 15),
            "unsupported_media_type",
        ),
        (
            post(
                4,
                "bootstrap",
                vec![(option::CONTENT_FORMAT, vec![0])],
                body,
            ),
            (4, 15),
            "unsupported_media_type",
        ),
        (
            post(5, "bootstrap", vec![json()], b"[1]"),
            (4, 0),
            "bad_request",
        ),
        (
            post(6, "bootstrap", vec![json()], br#"{"version":3}"#),
            (4, 0),
            "unsupported_version",
        ),
        (
            post(7, "bootstrap", vec![json(), (9, vec![1])], body),
            (4, 2),
            "bad_option",
        ),
        (
            post(
                8,
                "bootstrap",
                vec![json(), (option::ACCEPT, vec![0])],
                body,
            ),
            (4, 6),
            "not_acceptable",
        ),
        (
            post(9, "bootstrap", vec![json()], &vec![b' '; 9000]),
            (4, 13),
            "body_too_large",
        ),
        (
            post(
                10,
                "bootstrap",
                vec![json(), (option::BLOCK2, vec![0x7f])],
                body,
            ),
            (4, 0),
            "bad_request",
        ),
        (
            post(
                11,
                "bootstrap",
                vec![
                    (option::URI_HOST, b"in.m2m.localhost".to_vec()),
                    (option::URI_HOST, b"victim.example".to_vec()),
                    json(),
                ],
                body,
            ),
            (4, 2),
            "bad_option",
        ),
    ];
    for (req, (c, d), code) in cases {
        let (_, m) = exchange(&run, &mut s, &req);
        assert_eq!(
            m.code,
            coap::code(c, d),
            "{code}: {}",
            coap::code_text(m.code)
        );
        let doc: serde_json::Value = serde_json::from_slice(&m.payload).unwrap();
        assert_eq!(doc["error"]["code"], code, "{doc}");
    }
    assert_eq!(count(), 2);
    // A ping gets a Reset; a message we cannot parse, too.
    let ping = Message {
        kind: Type::Con,
        code: 0,
        message_id: 0x55,
        token: vec![],
        options: vec![],
        payload: vec![],
    };
    let (_, m) = exchange(&run, &mut s, &ping);
    assert_eq!((m.kind, m.message_id), (Type::Rst, 0x55));
    let (_, m) = run.rt.block_on(async {
        s.send_record(&[0x40, 0x02, 0x00, 0x66, 0xf0])
            .await
            .unwrap();
        let raw = s
            .recv_record(Duration::from_secs(10))
            .await
            .unwrap()
            .unwrap();
        (raw.clone(), Message::decode(&raw).unwrap())
    });
    assert_eq!((m.kind, m.message_id), (Type::Rst, 0x66));
    // A Block2 in the first request sets the block size (RFC 7959 §2.4): 64-byte blocks,
    // although the whole answer would fit the path MTU.
    let want = Block {
        num: 0,
        more: false,
        szx: 2,
    };
    let (_, m) = exchange(
        &run,
        &mut s,
        &post(
            0x90,
            "bootstrap",
            vec![json(), (option::BLOCK2, want.encode())],
            body,
        ),
    );
    assert_eq!(m.code, coap::code(2, 4));
    let b = Block::decode(m.option_values(option::BLOCK2).next().expect("Block2")).unwrap();
    assert_eq!((b.num, b.szx, b.more), (0, 2, true));
    assert_eq!(m.payload.len(), 64);
    // Messages of versions 0, 2 and 3 are silently ignored (RFC 7252 §3), then the session
    // still answers.
    run.rt.block_on(async {
        for version in [0u8, 2, 3] {
            let mut bad = post(0x70 + u16::from(version), "bootstrap", vec![json()], body).encode();
            bad[0] = (bad[0] & 0x3f) | (version << 6);
            s.send_record(&bad).await.unwrap();
            assert!(
                s.recv_record(Duration::from_millis(500))
                    .await
                    .unwrap()
                    .is_none(),
                "version {version} got an answer"
            );
        }
    });
    let (_, m) = exchange(&run, &mut s, &ping);
    assert_eq!(m.kind, Type::Rst);
    run.rt.block_on(s.close());
}

/// A pass-through UDP proxy that records the largest datagram the server sent; its socket
/// towards the server is returned too, for a test to send from what the server sees as the
/// node's address and port.
fn recording_proxy(server: SocketAddr) -> (SocketAddr, Arc<AtomicUsize>, Arc<UdpSocket>) {
    let front = Arc::new(UdpSocket::bind("127.0.0.1:0").unwrap());
    let addr = front.local_addr().unwrap();
    let back = Arc::new(UdpSocket::bind("127.0.0.1:0").unwrap());
    back.connect(server).unwrap();
    let largest = Arc::new(AtomicUsize::new(0));
    let client = Arc::new(std::sync::Mutex::new(None::<SocketAddr>));
    {
        let (back, front, client, l) =
            (back.clone(), front.clone(), client.clone(), largest.clone());
        std::thread::spawn(move || {
            let mut b = vec![0u8; 65_536];
            while let Ok(n) = back.recv(&mut b) {
                l.fetch_max(n, Ordering::Relaxed);
                if let Some(c) = *client.lock().unwrap() {
                    let _ = front.send_to(&b[..n], c);
                }
            }
        });
    }
    {
        let back = back.clone();
        std::thread::spawn(move || {
            let mut b = vec![0u8; 65_536];
            while let Ok((n, from)) = front.recv_from(&mut b) {
                *client.lock().unwrap() = Some(from);
                let _ = back.send(&b[..n]);
            }
        });
    }
    (addr, largest, back)
}

#[test]
fn a_small_path_mtu_fragments_the_handshake_and_blocks_the_response() {
    const MTU: u16 = 300;
    let (run, dtls) = start(|c| c.dtls.as_mut().unwrap().mtu = MTU);
    let (proxy, largest, _) = recording_proxy(dtls);
    // Our client follows Block2 on its own ...
    let got = run
        .rt
        .block_on(client::enroll(enrolment(
            &run,
            "SN-0002",
            &[DtlsSuite::Aes128Ccm8],
            proxy,
        )))
        .unwrap();
    assert_eq!(got.identity, run.node("SN-0002").identity);
    let biggest = largest.load(Ordering::Relaxed);
    assert!(
        biggest > 100 && biggest <= usize::from(MTU) - 28,
        "largest datagram from the IN: {biggest} bytes"
    );
    // ... and by hand: block 0 says more follow and how much; the continuation serves the same
    // document (no new credential); a continuation without a response is refused.
    let mut s = session(&run, "SN-0003", dtls);
    let before = run.server.credentials().count().unwrap();
    let body = br#"{"version":1}"#;
    let (_, m) = exchange(&run, &mut s, &post(1, "bootstrap", vec![json()], body));
    let b0 = Block::decode(m.option_values(option::BLOCK2).next().expect("Block2")).unwrap();
    assert!(b0.more && b0.num == 0, "{b0:?}");
    let total = m.uint_option(option::SIZE2).unwrap().unwrap() as usize;
    let mut doc = m.payload.clone();
    let mut num = 1;
    loop {
        let want = Block {
            num,
            more: false,
            szx: b0.szx,
        };
        let (_, m) = exchange(
            &run,
            &mut s,
            &post(
                1 + num as u16,
                "bootstrap",
                vec![json(), (option::BLOCK2, want.encode())],
                body,
            ),
        );
        assert_eq!(m.code, coap::code(2, 4));
        doc.extend_from_slice(&m.payload);
        let b = Block::decode(m.option_values(option::BLOCK2).next().unwrap()).unwrap();
        if !b.more {
            break;
        }
        num += 1;
    }
    assert_eq!(doc.len(), total);
    let parsed: serde_json::Value = serde_json::from_slice(&doc).unwrap();
    assert_eq!(parsed["identity"], run.node("SN-0003").identity.to_string());
    assert_eq!(run.server.credentials().count().unwrap(), before + 1);
    run.rt.block_on(s.close());
    let mut fresh = session(&run, "SN-0003", dtls);
    let want = Block {
        num: 1,
        more: false,
        szx: b0.szx,
    };
    let (_, m) = exchange(
        &run,
        &mut fresh,
        &post(
            9,
            "bootstrap",
            vec![json(), (option::BLOCK2, want.encode())],
            body,
        ),
    );
    assert_eq!(m.code, coap::code(4, 0));
}

#[test]
fn a_dtls_only_in_rereads_its_root_sets() {
    let (run, dtls) = start(|_| {});
    let e = |name: &str| enrolment(&run, name, &[DtlsSuite::Aes128Ccm8], dtls);
    run.rt.block_on(client::enroll(e("SN-0001"))).unwrap();
    // The device set loses its anchors while the IN runs: within its refresh period (5 s) its
    // devices are refused, over DTLS too.
    {
        let home = m2mpki_ca::Home::open(&run.layout.home).unwrap();
        let store = home.store().unwrap();
        let set = m2mpki_ca::Store::root_set(&store, "metering")
            .unwrap()
            .unwrap();
        for a in &set.anchors {
            m2mpki_ca::roots::remove_anchor(&store, "metering", &a.sha256).unwrap();
        }
    }
    let until = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        match run.rt.block_on(client::enroll(e("SN-0002"))) {
            Err(m2mpki_bootstrap::Error::Handshake { reason, .. }) => {
                assert!(reason.contains("unknown ca"), "{reason}");
                break;
            }
            Ok(_) if std::time::Instant::now() < until => {
                std::thread::sleep(Duration::from_millis(500));
            }
            other => panic!("still admitted after 20 s, or another failure: {other:?}"),
        }
    }
}

/// Starts an OpenSSL DTLS handshake from `sock` up to the cookie-bearing hello, and returns the
/// half-done handshake (its peer exists at the IN from then on).
fn half_handshake(sock: &UdpSocket) -> openssl::ssl::MidHandshakeSslStream<Pipe> {
    let mut b = openssl::ssl::SslContext::builder(openssl::ssl::SslMethod::dtls_client()).unwrap();
    b.set_cipher_list("ECDHE-ECDSA-AES128-CCM8").unwrap();
    let mut ssl = openssl::ssl::Ssl::new(&b.build()).unwrap();
    ssl.set_hostname(IN_FQDN).unwrap(); // the IN requires SNI
    let mut mid = match ssl.connect(Pipe::default()) {
        Err(openssl::ssl::HandshakeError::WouldBlock(m)) => m,
        _ => panic!("no hello"),
    };
    for d in mid.get_mut().outbox.drain(..) {
        sock.send(&d).unwrap();
    }
    let mut buf = [0u8; 2048];
    let n = sock.recv(&mut buf).unwrap();
    assert_eq!(buf[13], 3, "a HelloVerifyRequest");
    mid.get_mut().inbox.push_back(buf[..n].to_vec());
    let mut mid = match mid.handshake() {
        Err(openssl::ssl::HandshakeError::WouldBlock(m)) => m,
        _ => panic!("no second hello"),
    };
    for d in mid.get_mut().outbox.drain(..) {
        sock.send(&d).unwrap();
    }
    mid
}

#[test]
fn a_node_that_restarts_its_handshake_from_the_same_address_is_answered() {
    let (run, dtls) = start(|_| {});
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.connect(dtls).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let _old = half_handshake(&sock);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(run.server.dtls_sessions(), 1);
    // What the IN answered to the old handshake (its ServerHello flight) is read and dropped.
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut buf = [0u8; 2048];
    while sock.recv(&mut buf).is_ok() {}
    sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    // The node reboots: a new hello (new random) from the same address and port gets its
    // HelloVerifyRequest, and its cookie-bearing hello replaces the old session.
    let _new = half_handshake(&sock);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(run.server.dtls_sessions(), 1);
}

/// Cookie-proven, silent peers from `ip`: `n` half-done handshakes, each from its own port.
fn silent_peers(
    ip: [u8; 4],
    n: usize,
    dtls: SocketAddr,
) -> Vec<(UdpSocket, openssl::ssl::MidHandshakeSslStream<Pipe>)> {
    (0..n)
        .map(|_| {
            let sock = UdpSocket::bind(SocketAddr::from((ip, 0))).unwrap();
            sock.connect(dtls).unwrap();
            sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mid = half_handshake(&sock);
            (sock, mid)
        })
        .collect()
}

/// The counter `m2mpki_refusals_total{reason="<reason>"}` on the metrics listener.
fn refusals(run: &Running, reason: &str) -> u64 {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(run.metrics.expect("a metrics listener")).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let want = format!("m2mpki_refusals_total{{reason=\"{reason}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&want))
        .map_or(0, |v| v.trim().parse().unwrap())
}

/// Hostile review D1: one address holds at most `max_connections_per_address` places (as on
/// TLS), and when every place is taken a newcomer takes that of the longest-waiting peer of
/// the address holding the most; a real node enrols through both, and the metrics count both.
#[test]
fn one_address_holds_its_share_of_places_and_a_newcomer_evicts_a_silent_peer() {
    let (run, dtls) = start(|c| {
        c.dtls.as_mut().unwrap().max_peers = 100;
        c.limits.max_connections_per_address = 64;
        c.limits.handshake_timeout = Duration::from_secs(60);
    });
    let _flood = silent_peers([127, 0, 0, 6], 150, dtls);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(run.server.dtls_sessions(), 64);
    assert_eq!(refusals(&run, "per_address_cap"), 150 - 64);
    // A second address fills the rest and takes 20 places from the first.
    let _second = silent_peers([127, 0, 0, 7], 56, dtls);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(run.server.dtls_sessions(), 100);
    assert_eq!(refusals(&run, "evicted"), 20);
    let got = run
        .rt
        .block_on(client::enroll(enrolment(
            &run,
            "SN-0003",
            &[DtlsSuite::Aes128Gcm],
            dtls,
        )))
        .unwrap();
    assert_eq!(got.identity, run.node("SN-0003").identity);
    assert_eq!(refusals(&run, "evicted"), 21);
}

/// Hostile review D2: a protected record shorter than the suite's nonce and tag, spoofed from
/// the node's address and port, no longer ends its session (OpenSSL 3.0 failed the session
/// with internal_error); the node's next request is answered.
#[test]
fn a_short_protected_record_from_the_nodes_port_does_not_end_its_session() {
    let (run, dtls) = start(|_| {});
    let (proxy, _, back) = recording_proxy(dtls);
    let mut s = session(&run, "SN-0001", proxy);
    let body = br#"{"version":1}"#;
    let (_, m) = exchange(&run, &mut s, &post(1, "bootstrap", vec![json()], body));
    assert_eq!(m.code, coap::code(2, 4));
    for spoofed in [
        "15fefd00010000000001f400020228",
        "17fefd000100000000000a0003010203",
        "17fefd0001000000000010000f000102030405060708090a0b0c0d0e",
    ] {
        back.send(&hex::decode(spoofed).unwrap()).unwrap();
    }
    std::thread::sleep(Duration::from_millis(200));
    let (_, m) = exchange(&run, &mut s, &post(2, "bootstrap", vec![json()], body));
    assert_eq!(m.code, coap::code(2, 4));
    assert_eq!(run.server.credentials().count().unwrap(), 2);
    run.rt.block_on(s.close());
}
