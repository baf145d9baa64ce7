//! Availability under hostile load, tried as an attacker would: thousands of silent or
//! half-hello connections from one address, and authenticated clients that hold their
//! connections open without asking anything, from another. A legitimate node from a third
//! address must still enrol. Every timeout of the IN is set long (30 s) here and the
//! legitimate client gives up after 5 s, so only the admission rules (a cap per address,
//! eviction of the longest-waiting connection of the busiest address) can let it through.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests may fail loudly

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use m2mpki_bootstrap::client::{self, Enrolment, Prepared};
use m2mpki_bootstrap::config::{FieldNodeProfile, TlsVersion};
use tokio::io::AsyncWriteExt;

mod common;

use common::Running;

const ATTACKER: [u8; 4] = [127, 0, 0, 2];
const IDLE_CLIENTS: [u8; 4] = [127, 0, 0, 3];

fn prepared(run: &Running, name: &str, timeout: Duration) -> Prepared {
    Prepared::new(&Enrolment {
        profile: FieldNodeProfile::load(&run.layout.profile).unwrap(),
        chain: m2mpki_bootstrap::tls::load_chain(&run.node(name).chain).unwrap(),
        key: run.key(name),
        connect: Some(run.tls.unwrap().to_string()),
        versions: vec![TlsVersion::Tls13],
        timeout,
    })
    .unwrap()
}

/// Opens a TCP connection from `from` and, every other time, sends the first half of a
/// ClientHello record; then holds it.
async fn silent(
    from: IpAddr,
    to: SocketAddr,
    half_hello: bool,
) -> std::io::Result<tokio::net::TcpStream> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(from, 0))?;
    let mut tcp = socket.connect(to).await?;
    if half_hello {
        // A handshake record announcing 512 bytes, and 40 of them.
        let mut bytes = vec![22, 3, 1, 2, 0, 1, 0, 1, 252, 3, 3];
        bytes.resize(45, 0x41);
        tcp.write_all(&bytes).await?;
    }
    Ok(tcp)
}

#[test]
fn a_legitimate_node_enrols_through_2000_silent_connections_and_idle_authenticated_ones() {
    let run = Running::start(|c| {
        c.dtls = None;
        c.limits.max_connections = 128;
        c.limits.hello_timeout = Duration::from_secs(30);
        c.limits.handshake_timeout = Duration::from_secs(30);
        c.limits.idle_timeout = Duration::from_secs(30);
        // max_connections_per_address: the default (64).
    });
    let addr = run.tls.unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let opened = Arc::new(AtomicUsize::new(0));

    // 128 clients that authenticate, then ask nothing, from one address.
    let idle: Vec<_> = (0..128)
        .map(|i| {
            let names = ["SN-0001", "SN-0002", "SN-0003", "pump-1", "pump-2"];
            prepared(&run, names[i % names.len()], Duration::from_secs(10))
        })
        .collect();
    let idle_sessions = run.rt.block_on(async {
        let mut held = Vec::new();
        for p in &idle {
            if let Ok(c) = client::connect_prepared_from(p, Some(IpAddr::from(IDLE_CLIENTS))).await
            {
                held.push(c);
            }
        }
        held
    });
    assert!(!idle_sessions.is_empty(), "no idle client got a session");

    // 2 000 silent or half-hello connections from another address, reopened as the IN closes
    // them, for as long as the test runs.
    let attack = {
        let stop = stop.clone();
        let opened = opened.clone();
        run.rt.spawn(async move {
            let mut tasks = tokio::task::JoinSet::new();
            for i in 0..2000 {
                let stop = stop.clone();
                let opened = opened.clone();
                tasks.spawn(async move {
                    while !stop.load(Ordering::Relaxed) {
                        match silent(IpAddr::from(ATTACKER), addr, i % 2 == 0).await {
                            Ok(mut tcp) => {
                                opened.fetch_add(1, Ordering::Relaxed);
                                // Held until the IN closes it.
                                let mut buf = [0u8; 64];
                                let _ = tokio::time::timeout(
                                    Duration::from_secs(60),
                                    tokio::io::AsyncReadExt::read(&mut tcp, &mut buf),
                                )
                                .await;
                            }
                            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                        }
                    }
                });
            }
            while tasks.join_next().await.is_some() {}
        })
    };
    // Let the attack fill the IN.
    std::thread::sleep(Duration::from_secs(2));

    // 20 legitimate enrolments, one after the other, from 127.0.0.1.
    let legit = prepared(&run, "SN-0003", Duration::from_secs(5));
    let mut took = Vec::new();
    for i in 0..20 {
        let start = Instant::now();
        let got = run.rt.block_on(client::enroll_prepared(&legit));
        took.push(start.elapsed());
        if let Err(e) = got {
            panic!(
                "legitimate enrolment {i} failed under attack after {:?}: {e} (attacker connections opened: {})",
                start.elapsed(),
                opened.load(Ordering::Relaxed)
            );
        }
    }
    stop.store(true, Ordering::Relaxed);
    took.sort();
    eprintln!(
        "20 enrolments under attack: median {:?}, max {:?}; attacker connections opened: {}; idle sessions held: {}",
        took[10],
        took[19],
        opened.load(Ordering::Relaxed),
        idle_sessions.len()
    );
    // The attack really ran: far more connections than slots were opened.
    assert!(opened.load(Ordering::Relaxed) > 2000);
    drop(idle_sessions);
    attack.abort();
}

/// A connection that sends nothing is closed after `hello_timeout`, long before the handshake
/// timeout would have freed its slot: on the bootstrap listener and on the PSK association
/// listener.
#[test]
fn a_silent_connection_is_closed_after_the_hello_timeout() {
    let run = Running::start(|c| {
        c.dtls = None;
        c.limits.hello_timeout = Duration::from_millis(300);
        c.limits.handshake_timeout = Duration::from_secs(60);
        c.limits.idle_timeout = Duration::from_secs(60);
    });
    let psk = run.psk.expect("the lab configures a PSK listener");
    run.rt.block_on(async {
        for (addr, half) in [
            (run.tls.unwrap(), false),
            (run.tls.unwrap(), true),
            (psk, false),
            (psk, true),
        ] {
            let mut tcp = silent(IpAddr::from([127, 0, 0, 1]), addr, half)
                .await
                .unwrap();
            let mut buf = [0u8; 64];
            let read = tokio::time::timeout(
                Duration::from_secs(20),
                tokio::io::AsyncReadExt::read(&mut tcp, &mut buf),
            )
            .await;
            // Closed by the IN (EOF or reset), not by our 20 s guard.
            assert!(matches!(read, Ok(Ok(0)) | Ok(Err(_))), "{read:?}");
        }
    });
}

/// The per-address cap (4 here): the fifth connection from one address is closed at once while
/// four are open; a place is free again when one of them ends; other addresses are not
/// affected.
#[test]
fn connections_beyond_the_per_address_cap_are_closed_at_once() {
    let run = Running::start(|c| {
        c.dtls = None;
        c.limits.max_connections_per_address = 4;
        c.limits.hello_timeout = Duration::from_secs(60);
        c.limits.handshake_timeout = Duration::from_secs(60);
    });
    let addr = run.tls.unwrap();
    let held = run.rt.block_on(async {
        let from = IpAddr::from(ATTACKER);
        let mut held = Vec::new();
        for _ in 0..4 {
            held.push(silent(from, addr, false).await.unwrap());
        }
        // Give the IN time to count them.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let mut fifth = silent(from, addr, false).await.unwrap();
        let mut buf = [0u8; 8];
        let read = tokio::time::timeout(
            Duration::from_secs(20),
            tokio::io::AsyncReadExt::read(&mut fifth, &mut buf),
        )
        .await;
        assert!(matches!(read, Ok(Ok(0)) | Ok(Err(_))), "{read:?}");
        // A place is free again once one of them closes.
        drop(held.pop());
        tokio::time::sleep(Duration::from_millis(200)).await;
        held
    });
    assert_eq!(held.len(), 3);
    let p = prepared(&run, "SN-0001", Duration::from_secs(10));
    run.rt
        .block_on(client::connect_prepared_from(
            &p,
            Some(IpAddr::from(ATTACKER)),
        ))
        .unwrap();
    run.rt
        .block_on(client::connect_prepared_from(
            &p,
            Some(IpAddr::from(IDLE_CLIENTS)),
        ))
        .unwrap();
}
