//! Availability under hostile load, tried as an attacker would: thousands of silent or
//! half-hello connections from one address, and authenticated clients that hold their
//! connections open without asking anything, from two others. A legitimate node from a fourth
//! address must still enrol. Every timeout of the IN is set long (30 s) here and the
//! legitimate client gives up after 5 s, so only the admission rules (a cap per address,
//! eviction of the longest-waiting connection of the busiest address) can let it through.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests may fail loudly

use std::net::IpAddr;
use std::time::{Duration, Instant};

use m2mpki_bootstrap::client::{self, Enrolment, Prepared};
use m2mpki_bootstrap::config::{FieldNodeProfile, TlsVersion};
use m2mpki_bootstrap::Error as BError;
use m2mpki_test_pki::hostile::{silent, Flood};

mod common;

use common::Running;

const ATTACKER: [u8; 4] = [127, 0, 0, 2];
/// Two addresses, because one address may hold only `max_connections_per_address` (64).
const IDLE_CLIENTS: [[u8; 4]; 2] = [[127, 0, 0, 3], [127, 0, 0, 4]];

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

    // 128 clients that authenticate, then ask nothing, 64 from each of two addresses.
    let idle: Vec<_> = (0..128)
        .map(|i| {
            let names = ["SN-0001", "SN-0002", "SN-0003", "pump-1", "pump-2"];
            prepared(&run, names[i % names.len()], Duration::from_secs(10))
        })
        .collect();
    let idle_sessions = run.rt.block_on(async {
        let mut held = Vec::new();
        for (i, p) in idle.iter().enumerate() {
            let from = IpAddr::from(IDLE_CLIENTS[i % 2]);
            if let Ok(c) = client::connect_prepared_from(p, Some(from)).await {
                held.push(c);
            }
        }
        held
    });
    assert_eq!(
        idle_sessions.len(),
        128,
        "every idle client holds a session"
    );

    // 2 000 silent or half-hello connections from another address, reopened as the IN closes
    // them, for as long as the test runs.
    let flood = Flood::start(run.rt.handle(), IpAddr::from(ATTACKER), addr, 2000);
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
                flood.opened()
            );
        }
    }
    let opened = flood.stop();
    took.sort();
    eprintln!(
        "20 enrolments under attack: median {:?}, max {:?}; attacker connections opened: {}; idle sessions held: {}",
        took[10],
        took[19],
        opened,
        idle_sessions.len()
    );
    // The attack really ran: far more connections than slots were opened.
    assert!(opened > 2000);
    drop(idle_sessions);
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
            Some(IpAddr::from(IDLE_CLIENTS[0])),
        ))
        .unwrap();
}

/// A connection that sends half a hello and then closes gives its place back at once, not when
/// the hello timeout ends: with one place per address and a 60 s hello timeout, the same
/// address gets a session within a few seconds. (Until 2026-12-01 the IN peeked every 5 ms,
/// never saw the FIN behind the buffered bytes, and held the place for the full 60 s.)
#[test]
fn a_half_hello_that_closes_frees_its_place_at_once() {
    let run = Running::start(|c| {
        c.dtls = None;
        c.limits.max_connections_per_address = 1;
        c.limits.hello_timeout = Duration::from_secs(60);
        c.limits.handshake_timeout = Duration::from_secs(60);
    });
    let addr = run.tls.unwrap();
    let from = IpAddr::from(ATTACKER);
    let p = prepared(&run, "SN-0001", Duration::from_secs(10));
    run.rt.block_on(async {
        let half = silent(from, addr, true).await.unwrap();
        // The IN has taken the place: another connection from this address is closed at once.
        tokio::time::sleep(Duration::from_millis(200)).await;
        // Closed by the IN, not refused for another reason nor left to time out.
        match client::connect_prepared_from(&p, Some(from)).await {
            Err(e @ (BError::Network { .. } | BError::Handshake { .. })) => drop(e),
            other => panic!("expected the connection closed by the IN, got {other:?}"),
        }
        drop(half);
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match client::connect_prepared_from(&p, Some(from)).await {
                Ok(_) => break,
                Err(e) if Instant::now() > deadline => {
                    panic!("the place was not given back 5 s after the peer closed: {e}")
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    });
}

/// The PSK association listener evicts too: with its 4 places held by connections that send
/// nothing (and every timeout at 60 s), a node with its provisioned credential still gets its
/// association, in place of the longest-waiting of them. (Until 2026-12-01 the listener took a
/// place before accepting, and the node waited in the accept queue past its 10 s timeout.)
#[test]
fn a_psk_association_gets_through_when_silent_connections_hold_every_place() {
    let run = Running::start(|c| {
        c.dtls = None;
        c.limits.max_connections = 4;
        c.limits.hello_timeout = Duration::from_secs(60);
        c.limits.handshake_timeout = Duration::from_secs(60);
        c.limits.idle_timeout = Duration::from_secs(60);
    });
    let psk = run.psk.expect("the lab configures a PSK listener");
    let enrolled = run
        .rt
        .block_on(client::enroll_prepared(&prepared(
            &run,
            "SN-0002",
            Duration::from_secs(10),
        )))
        .unwrap();
    let held = run.rt.block_on(async {
        let mut held = Vec::new();
        for _ in 0..4 {
            held.push(silent(IpAddr::from(ATTACKER), psk, false).await.unwrap());
        }
        // Give the IN time to seat them.
        tokio::time::sleep(Duration::from_millis(200)).await;
        held
    });
    let associated = m2mpki_bootstrap::psk::associate(&m2mpki_bootstrap::psk::AssociateRequest {
        credential_id: enrolled.credential_id.clone(),
        credential: enrolled.credential.clone(),
        in_fqdn: enrolled.in_fqdn.clone(),
        connect: psk,
        timeout: Duration::from_secs(10),
    })
    .unwrap();
    assert_eq!(
        associated.association.identity,
        enrolled.identity.to_string()
    );
    drop(held);
}
