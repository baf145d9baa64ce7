//! The IN's Prometheus endpoint: after enrolments over TLS 1.3, TLS 1.2 and DTLS, a refused
//! rogue device and a rate-limited retry, `GET /metrics` shows each of them, parsed here as
//! the OpenMetrics text format (no promtool on this machine).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests may fail loudly

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use m2mpki_bootstrap::client::{self, Enrolment};
use m2mpki_bootstrap::config::{FieldNodeProfile, TlsVersion, Transport};

mod common;

use common::Running;

fn enrolment(run: &Running, name: &str, version: Option<TlsVersion>) -> Enrolment {
    let mut profile = FieldNodeProfile::load(&run.layout.profile).unwrap();
    let connect = match version {
        Some(_) => run.tls.unwrap(),
        None => {
            profile.transport = Transport::Dtls;
            run.dtls.unwrap()
        }
    };
    Enrolment {
        profile,
        chain: m2mpki_bootstrap::tls::load_chain(&run.node(name).chain).unwrap(),
        key: run.key(name),
        connect: Some(connect.to_string()),
        versions: version.into_iter().collect(),
        timeout: Duration::from_secs(60),
    }
}

/// `GET path` over plain HTTP/1.1: the status line and the body.
fn get(addr: SocketAddr, path: &str) -> (String, String) {
    let mut tcp = std::net::TcpStream::connect(addr).unwrap();
    write!(
        tcp,
        "GET {path} HTTP/1.1\r\nHost: metrics\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut text = String::new();
    tcp.read_to_string(&mut text).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    (head.lines().next().unwrap().to_owned(), body.to_owned())
}

/// Samples by `name{labels}` (labels as written), checking the exposition's shape: every
/// sample belongs to a family announced by `# TYPE`, every value is a number, and the text
/// ends with `# EOF`.
fn parse(text: &str) -> BTreeMap<String, f64> {
    assert!(text.ends_with("# EOF\n"), "{text}");
    let mut families: Vec<String> = Vec::new();
    let mut samples = BTreeMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap();
            assert!(["counter", "gauge", "histogram"].contains(&kind), "{line}");
            families.push(name.to_owned());
            continue;
        }
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').unwrap();
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("not a number: {line}"));
        let name = series.split('{').next().unwrap();
        assert!(
            families.iter().any(|f| name.starts_with(f.as_str())),
            "{name} has no # TYPE"
        );
        samples.insert(series.to_owned(), value);
    }
    samples
}

#[test]
fn the_metrics_endpoint_shows_enrolments_refusals_latency_store_size_and_crl_age() {
    let run = Running::start(|c| {
        c.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
        c.limits.enrolments_per_identity = Some("1/1h".parse().unwrap());
    });
    let metrics = run.metrics.unwrap();
    let (status, before) = get(metrics, "/metrics");
    assert!(status.contains("200"), "{status}");
    let before = parse(&before);
    assert_eq!(before.get("m2mpki_credentials"), Some(&0.0));

    for (name, version) in [
        ("SN-0001", Some(TlsVersion::Tls13)),
        ("pump-1", Some(TlsVersion::Tls12)),
        ("SN-0002", None),
    ] {
        run.rt
            .block_on(client::enroll(enrolment(&run, name, version)))
            .unwrap();
    }
    // Refused at the handshake: an untrusted manufacturer.
    assert!(run
        .rt
        .block_on(client::enroll(enrolment(
            &run,
            "ROGUE-1",
            Some(TlsVersion::Tls13)
        )))
        .is_err());
    // Refused by the rate limit: SN-0001 again.
    assert!(run
        .rt
        .block_on(client::enroll(enrolment(
            &run,
            "SN-0001",
            Some(TlsVersion::Tls13)
        )))
        .is_err());

    let (status, text) = get(metrics, "/metrics");
    assert!(status.contains("200"), "{status}");
    let m = parse(&text);
    let at = |series: &str| {
        *m.get(series)
            .unwrap_or_else(|| panic!("no {series} in:\n{text}"))
    };
    assert_eq!(
        at(r#"m2mpki_enrolments_total{outcome="issued",transport="tls1.3"}"#),
        1.0
    );
    assert_eq!(
        at(r#"m2mpki_enrolments_total{outcome="issued",transport="tls1.2"}"#),
        1.0
    );
    assert_eq!(
        at(r#"m2mpki_enrolments_total{outcome="issued",transport="dtls1.2"}"#),
        1.0
    );
    assert_eq!(
        at(r#"m2mpki_enrolments_total{outcome="rate_limited",transport="tls1.3"}"#),
        1.0
    );
    assert_eq!(at(r#"m2mpki_refusals_total{reason="unknown_root"}"#), 1.0);
    assert_eq!(at("m2mpki_credentials"), 3.0);
    assert_eq!(at("m2mpki_enrolment_seconds_count"), 4.0);
    assert_eq!(at("m2mpki_commit_seconds_count"), 3.0);
    assert!(at("m2mpki_commit_seconds_sum") > 0.0);
    // Connections are counted while they hold a slot: once the IN has closed the last one
    // (it may still be closing when the client is done), none is open.
    let mut open = at("m2mpki_open_connections");
    for _ in 0..100 {
        if open == 0.0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
        open = parse(&get(metrics, "/metrics").1)["m2mpki_open_connections"];
    }
    assert_eq!(open, 0.0);

    // One CRL age per trusted set and issuer that has a CRL, none negative.
    let home = m2mpki_ca::Home::open(&run.layout.home).unwrap();
    let store = home.store().unwrap();
    let mut expected = 0;
    for set in [m2mpki_test_pki::sets::DEVICE, m2mpki_test_pki::sets::NODE] {
        let set = m2mpki_ca::Store::root_set(&store, set).unwrap().unwrap();
        let issuers: std::collections::BTreeSet<_> =
            set.crls.iter().map(|c| c.issuer.clone()).collect();
        expected += issuers.len();
    }
    let ages: Vec<f64> = m
        .iter()
        .filter(|(k, _)| k.starts_with("m2mpki_crl_age_seconds{"))
        .map(|(_, v)| *v)
        .collect();
    assert_eq!(ages.len(), expected, "{text}");
    assert!(expected > 0, "the lab's sets carry CRLs");
    assert!(ages.iter().all(|a| *a >= 0.0), "{ages:?}");

    // Refusals carry the one error document, as on every listener.
    let (status, body) = get(metrics, "/other");
    assert!(status.contains("404"), "{status}");
    let doc: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(doc["error"]["code"], "not_found", "{body}");
}

/// Architecture review §8.5: a connection that closes before its ClientHello, and one that
/// speaks another protocol, are counted under their own reasons, not as hello timeouts; on
/// the bootstrap listener and on the PSK association listener alike.
#[test]
fn connections_without_a_hello_are_counted_by_why() {
    let run = Running::start(|c| c.dtls = None);
    let psk = run.psk.expect("the lab configures a PSK listener");
    for to in [run.tls.unwrap(), psk] {
        drop(std::net::TcpStream::connect(to).unwrap());
        let mut http = std::net::TcpStream::connect(to).unwrap();
        http.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
        let mut rest = Vec::new();
        let _ = http.read_to_end(&mut rest); // the IN closes it
    }
    let metrics = run.metrics.unwrap();
    let at = |key: &str| {
        for _ in 0..50 {
            let (_, body) = get(metrics, "/metrics");
            if let Some(v) = parse(&body).get(key) {
                if *v >= 2.0 {
                    return *v;
                }
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        0.0
    };
    assert_eq!(
        at(r#"m2mpki_refusals_total{reason="closed_before_hello"}"#),
        2.0
    );
    assert_eq!(at(r#"m2mpki_refusals_total{reason="not_tls"}"#), 2.0);
    let (_, body) = get(metrics, "/metrics");
    assert!(
        !parse(&body).contains_key(r#"m2mpki_refusals_total{reason="hello_timeout"}"#),
        "{body}"
    );
}

/// A node that sends a real ClientHello and then stalls is past the hello deadline (60 s here,
/// never reached) and is closed by `handshake_timeout`, counted under that reason. (The
/// admission tests close silent connections by the hello deadline or by eviction; this one
/// is what proves the handshake timeout itself.)
#[test]
fn a_handshake_that_stalls_after_the_hello_is_closed_by_the_handshake_timeout() {
    let run = Running::start(|c| {
        c.dtls = None;
        c.limits.hello_timeout = Duration::from_secs(60);
        c.limits.handshake_timeout = Duration::from_millis(500);
    });
    let profile = FieldNodeProfile::load(&run.layout.profile).unwrap();
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from(profile.in_fqdn.to_string()).unwrap();
    let mut tls = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
    let mut hello = Vec::new();
    tls.write_tls(&mut hello).unwrap();
    let mut tcp = std::net::TcpStream::connect(run.tls.unwrap()).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    tcp.write_all(&hello).unwrap();
    let mut flight = Vec::new();
    let read = tcp.read_to_end(&mut flight);
    // Closed by the IN (EOF or reset), not by our 20 s guard ...
    assert!(
        !matches!(&read, Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut)),
        "{read:?}"
    );
    // ... after it answered the hello (its first flight starts with a handshake record).
    assert_eq!(flight.first(), Some(&22), "{flight:?}");
    let metrics = run.metrics.unwrap();
    let key = r#"m2mpki_refusals_total{reason="handshake_timeout"}"#;
    let mut counted = 0.0;
    for _ in 0..50 {
        let (_, body) = get(metrics, "/metrics");
        counted = parse(&body).get(key).copied().unwrap_or(0.0);
        if counted >= 1.0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(counted, 1.0);
    let (_, body) = get(metrics, "/metrics");
    assert!(
        !parse(&body).contains_key(r#"m2mpki_refusals_total{reason="hello_timeout"}"#),
        "{body}"
    );
}
