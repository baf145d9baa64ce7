//! The bootstrap library end to end, in-process: a lab PKI, the IN server on loopback TLS and
//! the client, without the `m2mpki` binary (cli/tests/bootstrap.rs drives that).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests may fail loudly

use std::time::Duration;

use m2mpki_bootstrap::client::{self, Enrolment, Prepared};
use m2mpki_bootstrap::config::{FieldNodeProfile, TlsVersion};
use m2mpki_bootstrap::credstore::CredentialStatus;
use m2mpki_bootstrap::Error;

mod common;

use common::Running;

fn enrolment(run: &Running, chain_of: &str, key_of: &str, version: TlsVersion) -> Enrolment {
    Enrolment {
        profile: FieldNodeProfile::load(&run.layout.profile).unwrap(),
        chain: m2mpki_bootstrap::tls::load_chain(&run.node(chain_of).chain).unwrap(),
        key: run.key(key_of),
        connect: Some(run.tls.unwrap().to_string()),
        versions: vec![version],
        timeout: Duration::from_secs(20),
    }
}

#[test]
fn a_prepared_node_enrols_again_and_the_new_credential_supersedes() {
    let run = Running::start(|c| c.dtls = None);
    let device = run.node("SN-0001").identity.clone();
    for version in [TlsVersion::Tls13, TlsVersion::Tls12] {
        let prepared = Prepared::new(&enrolment(&run, "SN-0001", "SN-0001", version)).unwrap();
        let before = run.server.credentials().history(&device).unwrap().len();
        let first = run.rt.block_on(client::enroll_prepared(&prepared)).unwrap();
        let second = run.rt.block_on(client::enroll_prepared(&prepared)).unwrap();
        assert_eq!(first.identity, device);
        assert_ne!(first.credential, second.credential);
        assert_ne!(first.credential_id, second.credential_id);
        // The IN holds exactly what the node received, live, and the first one superseded.
        let live = run.server.credentials().live(&device).unwrap().unwrap();
        assert_eq!(live.id, second.credential_id);
        assert_eq!(
            live.supersedes.as_deref(),
            Some(first.credential_id.as_str())
        );
        let stored = run
            .server
            .credentials()
            .unseal(run.server.store_key(), &live)
            .unwrap();
        assert_eq!(stored, second.credential);
        let history = run.server.credentials().history(&device).unwrap();
        assert_eq!(history.len(), before + 2);
        let old = history
            .iter()
            .find(|r| r.id == first.credential_id)
            .unwrap();
        assert_eq!(old.status, CredentialStatus::Superseded);
    }
    // A node identity over the one-shot path, too.
    let node = run.node("pump-1").identity.clone();
    let got = run
        .rt
        .block_on(client::enroll(enrolment(
            &run,
            "pump-1",
            "pump-1",
            TlsVersion::Tls13,
        )))
        .unwrap();
    assert_eq!(got.identity, node);
    assert_eq!(
        run.server.credentials().live(&node).unwrap().unwrap().id,
        got.credential_id
    );
}

#[test]
fn untrusted_nodes_and_mismatched_keys_get_nothing() {
    let run = Running::start(|c| c.dtls = None);
    let rogue = run.node("ROGUE-1");
    assert!(!rogue.trusted);
    let err = run
        .rt
        .block_on(client::enroll(enrolment(
            &run,
            "ROGUE-1",
            "ROGUE-1",
            TlsVersion::Tls13,
        )))
        .unwrap_err();
    assert!(
        matches!(err, Error::Handshake { .. } | Error::Refused { .. }),
        "{err}"
    );
    assert!(run
        .server
        .credentials()
        .live(&rogue.identity)
        .unwrap()
        .is_none());
    assert_eq!(run.server.credentials().count().unwrap(), 0);

    // A certificate with someone else's key is refused before anything is sent.
    let err = Prepared::new(&enrolment(&run, "SN-0001", "pump-1", TlsVersion::Tls13)).unwrap_err();
    assert!(matches!(err, Error::BadConfig { .. }), "{err}");
    assert!(err.to_string().contains("does not belong"), "{err}");
    // The set-up's Debug names the node, never its key.
    let prepared =
        Prepared::new(&enrolment(&run, "SN-0001", "SN-0001", TlsVersion::Tls13)).unwrap();
    let shown = format!("{prepared:?}");
    assert!(shown.contains("SN-0001"), "{shown}");
    let key_pem = std::fs::read_to_string(&run.node("SN-0001").key).unwrap();
    let body: String = key_pem
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .collect();
    assert!(!shown.contains(&body[..40]), "{shown}");
}

/// Protocol version 2 (oneM2M TS-0003): both ends export 48 bytes with
/// `EXPORTER-oneM2M-Bootstrap`; the IN records Ke under KeID = hex(first 16)@FQDN, and the
/// node checks the KeID the IN names against its own.
#[test]
fn version_2_records_ke_under_the_ke_id_both_ends_compute_over_tls_and_dtls() {
    let run = Running::start(|_| {});
    let fqdn = run.layout.in_fqdn.clone();
    let mut attempts: Vec<(&str, Enrolment)> = Vec::new();
    for (name, version) in [
        ("SN-0001", TlsVersion::Tls13),
        ("pump-1", TlsVersion::Tls12),
    ] {
        let mut e = enrolment(&run, name, name, version);
        e.profile.protocol_version = 2;
        attempts.push((name, e));
    }
    let mut e = enrolment(&run, "SN-0002", "SN-0002", TlsVersion::Tls13);
    e.profile.protocol_version = 2;
    e.profile.transport = m2mpki_bootstrap::config::Transport::Dtls;
    e.profile.dtls_suites = vec![m2mpki_bootstrap::config::DtlsSuite::Aes128Ccm8];
    e.connect = Some(run.dtls.unwrap().to_string());
    attempts.push(("SN-0002", e));
    for (name, e) in attempts {
        let got = run.rt.block_on(client::enroll(e)).unwrap();
        let ke_id = got.ke_id.clone().expect("a KeID");
        let (rel, at) = ke_id.split_once('@').unwrap();
        assert_eq!(at, fqdn);
        assert!(
            rel.len() == 32
                && rel
                    .chars()
                    .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()),
            "{ke_id}"
        );
        assert_eq!(got.credential_id, ke_id);
        let live = run
            .server
            .credentials()
            .live(&run.node(name).identity)
            .unwrap()
            .unwrap();
        assert_eq!(live.id, ke_id, "{name}");
        let stored = run
            .server
            .credentials()
            .unseal(run.server.store_key(), &live)
            .unwrap();
        assert_eq!(stored, got.credential, "{name}: the IN's Ke is the node's");
    }
    // Version 1 keeps working beside it, with no KeID.
    let got = run
        .rt
        .block_on(client::enroll(enrolment(
            &run,
            "SN-0003",
            "SN-0003",
            TlsVersion::Tls13,
        )))
        .unwrap();
    assert!(got.ke_id.is_none());
}

#[test]
fn an_in_that_answers_version_1_only_refuses_version_2() {
    let run = Running::start(|c| {
        c.dtls = None;
        c.protocol_versions = vec![1];
    });
    let mut e = enrolment(&run, "SN-0001", "SN-0001", TlsVersion::Tls13);
    e.profile.protocol_version = 2;
    match run.rt.block_on(client::enroll(e)) {
        Err(Error::Refused { status, code, .. }) => {
            assert_eq!((status, code.as_str()), (400, "unsupported_version"))
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert_eq!(run.server.credentials().count().unwrap(), 0);
}

/// `[limits] enrolments_per_address`: our client gets a 429 refusal naming the address once
/// the address used its enrolments, whichever identity asks (TLS; DTLS shares the core); nothing
/// is recorded for it.
#[test]
fn an_address_that_enrols_too_often_is_refused_with_429() {
    let run = Running::start(|c| {
        c.limits.enrolments_per_address = Some("2/1h".parse().unwrap());
    });
    for name in ["SN-0001", "pump-1"] {
        let prepared = Prepared::new(&enrolment(&run, name, name, TlsVersion::Tls13)).unwrap();
        run.rt.block_on(client::enroll_prepared(&prepared)).unwrap();
    }
    let device = run.node("SN-0002").identity.clone();
    let prepared =
        Prepared::new(&enrolment(&run, "SN-0002", "SN-0002", TlsVersion::Tls12)).unwrap();
    match run.rt.block_on(client::enroll_prepared(&prepared)) {
        Err(Error::Refused {
            status,
            code,
            message,
        }) => {
            assert_eq!((status, code.as_str()), (429, "rate_limited"));
            assert!(message.contains("127.0.0.1"), "{message}");
        }
        other => panic!("expected a 429 refusal, got {other:?}"),
    }
    assert!(run.server.credentials().live(&device).unwrap().is_none());
    // The refusal comes before the body is read (architecture review §8.2): a request whose
    // body never arrives is answered 429 at once, not after the IN's idle timeout.
    let answer = run.rt.block_on(async {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut c = client::connect_prepared(&prepared).await.unwrap();
        c.tls
            .write_all(
                b"POST /bootstrap HTTP/1.1\r\nhost: in\r\ncontent-type: application/json\r\n\
                  content-length: 100\r\n\r\n",
            )
            .await
            .unwrap();
        let mut buf = vec![0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(5), c.tls.read(&mut buf))
            .await
            .expect("an answer before the body")
            .unwrap();
        String::from_utf8_lossy(&buf[..n]).into_owned()
    });
    assert!(answer.starts_with("HTTP/1.1 429"), "{answer}");
}
