//! The CA store on both backends: the same suite against redb and PostgreSQL (a database of
//! its own per test on the cluster scripts/test starts), writers racing from several
//! connections and processes, and `store migrate`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests may fail loudly

mod common;

use std::collections::{HashMap, HashSet};
use std::path::Path;

use common::*;
use m2mpki_ca::audit::{AuditAction, AuditEvent, ChainVerifier};
use m2mpki_ca::profile::ProfileKind;
use m2mpki_ca::rootset::{RootSet, RootSetKind};
use m2mpki_ca::store::RevocationReason;
use m2mpki_ca::{
    CaRecord, CertFilter, CertRecord, CertStatus, Item, NameConstraints, NewCert, PgStore,
    RecordOutcome, Serial, Store, StoreLocation,
};
use m2mpki_test_pki::names;
use m2mpki_test_pki::pg::TestDb;

/// Which backend a test of the suite runs on.
#[derive(Clone, Copy, Debug)]
enum Backend {
    Redb,
    Postgres,
}

/// A fresh, empty store of one backend (and what keeps it alive).
struct Fx {
    _dir: tempfile::TempDir,
    _db: Option<TestDb>,
    store: Box<dyn Store>,
}

fn fresh(backend: Backend) -> Fx {
    let dir = tempfile::tempdir().unwrap();
    let (db, location) = match backend {
        Backend::Redb => (None, StoreLocation::Redb(dir.path().join("store.redb"))),
        Backend::Postgres => {
            let db = TestDb::create().unwrap();
            let location = StoreLocation::Postgres(db.url.clone());
            (Some(db), location)
        }
    };
    let store = location.open().unwrap();
    Fx {
        _dir: dir,
        _db: db,
        store,
    }
}

/// Generates `mod redb` and `mod postgres`, each with one `#[test]` per named function (which
/// takes a [`Backend`]).
macro_rules! both_stores {
    ($($name:ident),* $(,)?) => {
        mod redb {
            $(#[test] fn $name() { super::$name(super::Backend::Redb) })*
        }
        mod postgres {
            $(#[test] fn $name() { super::$name(super::Backend::Postgres) })*
        }
    };
}

both_stores!(
    cas_are_unique_and_listed_by_name,
    a_live_subject_is_reported_not_reissued,
    a_reused_serial_aborts_the_whole_call,
    certificates_are_found_by_ca_and_id,
    revocation_frees_the_subject_and_lists_the_entry,
    crl_numbers_count_up,
    root_sets_change_atomically,
    the_audit_log_is_one_chain,
    export_and_import_round_trip,
    import_refuses_a_store_that_is_not_empty,
);

fn event(action: AuditAction, subject: &str) -> AuditEvent {
    AuditEvent {
        action,
        subject: subject.into(),
        detail: serde_json::json!({ "test": true }),
    }
}

fn ca_record(name: &str) -> CaRecord {
    CaRecord {
        name: name.into(),
        subject: format!("CN={name}"),
        organization: Some("Test".into()),
        key: format!("keys/{name}.key.pem"),
        key_type: m2mpki_hsm::KeyType::P256,
        parent: None,
        hw_type: None,
        path_len: Some(0),
        name_constraints: NameConstraints::default(),
        serial: Serial::random().unwrap(),
        not_before: 0,
        not_after: 2_000_000_000,
        created: 0,
        cert_der: vec![0x30, 0x03, 0x02, 0x01, 0x01],
        chain_der: vec![],
    }
}

fn new_cert(ca: &str, subject_key: &str) -> NewCert {
    let serial = Serial::random().unwrap();
    NewCert {
        record: CertRecord {
            serial: serial.clone(),
            ca: ca.into(),
            profile: ProfileKind::Device,
            subject_key: subject_key.into(),
            identity: Some(subject_key.parse().unwrap()),
            subject: format!("CN={subject_key}"),
            not_before: 0,
            not_after: 2_000_000_000,
            issued_at: 0,
            sha256: hex::encode(serial.as_bytes()),
            status: CertStatus::Valid,
            revoked_at: None,
            revocation_reason: None,
            requested_by: None,
        },
        der: serial.as_bytes().to_vec(),
    }
}

fn device(id: &str) -> String {
    format!("device:1.3.6.1.4.1.99999.1:{id}")
}

fn audit(store: &dyn Store) -> Vec<m2mpki_ca::audit::AuditEntry> {
    let mut entries = Vec::new();
    store
        .audit_log(&mut |e| {
            entries.push(e);
            Ok(())
        })
        .unwrap();
    entries
}

fn chain_len(store: &dyn Store) -> u64 {
    let mut v = ChainVerifier::default();
    store.audit_log(&mut |e| v.check(&e)).unwrap();
    v.count()
}

fn cas_are_unique_and_listed_by_name(b: Backend) {
    let fx = fresh(b);
    let s = &*fx.store;
    s.create_ca(&ca_record("zeta"), event(AuditAction::CaInit, "zeta"))
        .unwrap();
    let alpha = ca_record("alpha");
    s.create_ca(&alpha, event(AuditAction::CaInit, "alpha"))
        .unwrap();
    let err = s
        .create_ca(&ca_record("zeta"), event(AuditAction::CaInit, "zeta"))
        .unwrap_err();
    assert!(
        matches!(err, m2mpki_ca::Error::CaExists(ref n) if n == "zeta"),
        "{err}"
    );
    let names: Vec<_> = s.cas().unwrap().into_iter().map(|c| c.name).collect();
    assert_eq!(names, ["alpha", "zeta"]);
    assert_eq!(s.ca("alpha").unwrap().unwrap(), alpha);
    assert!(s.ca("nope").unwrap().is_none());
    // The refused duplicate left no audit entry.
    assert_eq!(chain_len(s), 2);
}

fn a_live_subject_is_reported_not_reissued(b: Backend) {
    let fx = fresh(b);
    let s = &*fx.store;
    let first = new_cert("ca", &device("A"));
    s.record_certs(std::slice::from_ref(&first), false).unwrap();
    let second = new_cert("ca", &device("A"));
    let outcomes = s
        .record_certs(std::slice::from_ref(&second), false)
        .unwrap();
    assert_eq!(
        outcomes,
        [RecordOutcome::AlreadyLive(first.record.serial.clone())]
    );
    assert!(s.cert(&second.record.serial).unwrap().is_none());
    // Another CA may hold a live certificate for the same subject.
    let elsewhere = new_cert("other-ca", &device("A"));
    assert_eq!(
        s.record_certs(std::slice::from_ref(&elsewhere), false)
            .unwrap(),
        [RecordOutcome::Recorded]
    );
    s.record_certs(std::slice::from_ref(&second), true).unwrap();
    assert_eq!(
        s.live_cert("ca", &device("A")).unwrap(),
        Some(second.record.serial.clone())
    );
    // Within one call, the second certificate of a subject sees the first as live.
    let twins = [new_cert("ca", &device("B")), new_cert("ca", &device("B"))];
    let outcomes = s.record_certs(&twins, false).unwrap();
    assert_eq!(
        outcomes,
        [
            RecordOutcome::Recorded,
            RecordOutcome::AlreadyLive(twins[0].record.serial.clone())
        ]
    );
}

fn a_reused_serial_aborts_the_whole_call(b: Backend) {
    let fx = fresh(b);
    let s = &*fx.store;
    let taken = new_cert("ca", &device("first"));
    s.record_certs(std::slice::from_ref(&taken), false).unwrap();
    let before = chain_len(s);
    let fresh_one = new_cert("ca", &device("second"));
    let mut clash = new_cert("ca", &device("third"));
    clash.record.serial = taken.record.serial.clone();
    let err = s
        .record_certs(&[fresh_one.clone(), clash], true)
        .unwrap_err();
    assert!(err.to_string().contains("exists already"), "{err}");
    assert!(s.cert(&fresh_one.record.serial).unwrap().is_none());
    assert_eq!(s.live_cert("ca", &device("second")).unwrap(), None);
    assert_eq!(s.live_cert("ca", &device("third")).unwrap(), None);
    let (first, der) = s.cert(&taken.record.serial).unwrap().unwrap();
    assert_eq!(first.subject_key, device("first"));
    assert_eq!(der, taken.der);
    assert_eq!(chain_len(s), before);
}

fn certificates_are_found_by_ca_and_id(b: Backend) {
    let fx = fresh(b);
    let s = &*fx.store;
    let certs = [
        new_cert("ca1", &device("X-1")),
        new_cert("ca2", &device("X-1")),
        new_cert("ca1", &device("X-2")),
    ];
    s.record_certs(&certs, false).unwrap();
    let serials = |f: CertFilter| -> Vec<Serial> {
        s.certs(&f).unwrap().into_iter().map(|r| r.serial).collect()
    };
    let mut all: Vec<Serial> = certs.iter().map(|c| c.record.serial.clone()).collect();
    all.sort();
    assert_eq!(serials(CertFilter::default()), all, "all, in serial order");
    let mut by_id = vec![
        certs[0].record.serial.clone(),
        certs[1].record.serial.clone(),
    ];
    by_id.sort();
    // By pre-provisioned ID and by canonical identity.
    for id in ["X-1".to_owned(), device("X-1")] {
        assert_eq!(
            serials(CertFilter {
                id: Some(id.clone()),
                ..Default::default()
            }),
            by_id,
            "{id}"
        );
    }
    assert_eq!(
        serials(CertFilter {
            ca: Some("ca1".into()),
            id: Some("X-1".into())
        }),
        [certs[0].record.serial.clone()]
    );
    assert!(serials(CertFilter {
        id: Some("nobody".into()),
        ..Default::default()
    })
    .is_empty());
}

fn revocation_frees_the_subject_and_lists_the_entry(b: Backend) {
    let fx = fresh(b);
    let s = &*fx.store;
    let c = new_cert("ca", &device("R"));
    let serial = c.record.serial.clone();
    s.record_certs(&[c], false).unwrap();
    let err = s
        .revoke("other", &serial, RevocationReason::KeyCompromise, 10)
        .unwrap_err();
    assert!(err.to_string().contains("issued by `ca`"), "{err}");
    let unknown = Serial::random().unwrap();
    assert!(s
        .revoke("ca", &unknown, RevocationReason::KeyCompromise, 10)
        .is_err());
    let record = s
        .revoke("ca", &serial, RevocationReason::KeyCompromise, 10)
        .unwrap();
    assert_eq!(record.status, CertStatus::Revoked);
    assert_eq!(s.live_cert("ca", &device("R")).unwrap(), None);
    let (stored, _) = s.cert(&serial).unwrap().unwrap();
    assert_eq!(
        stored.revocation_reason,
        Some(RevocationReason::KeyCompromise)
    );
    let err = s
        .revoke("ca", &serial, RevocationReason::Superseded, 11)
        .unwrap_err();
    assert!(err.to_string().contains("already revoked"), "{err}");
    let mut listed = Vec::new();
    s.revoked("ca", &mut |e| {
        listed.push(e);
        Ok(())
    })
    .unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].serial, serial);
    assert_eq!(listed[0].revoked_at, 10);
    let mut other = 0;
    s.revoked("other", &mut |_| {
        other += 1;
        Ok(())
    })
    .unwrap();
    assert_eq!(other, 0);
    // The subject may be issued a new certificate without reissue.
    assert_eq!(
        s.record_certs(&[new_cert("ca", &device("R"))], false)
            .unwrap(),
        [RecordOutcome::Recorded]
    );
}

fn crl_numbers_count_up(b: Backend) {
    let fx = fresh(b);
    let s = &*fx.store;
    let detail = serde_json::json!({ "entries": 0 });
    assert_eq!(s.next_crl_number("a", detail.clone()).unwrap(), 1);
    assert_eq!(s.next_crl_number("a", detail.clone()).unwrap(), 2);
    assert_eq!(s.next_crl_number("b", detail).unwrap(), 1);
    let last = audit(s).pop().unwrap();
    assert_eq!(last.event.action, AuditAction::CrlIssue);
    assert_eq!(last.event.detail["crl_number"], 1);
}

fn root_set(name: &str) -> RootSet {
    RootSet {
        name: name.into(),
        kind: RootSetKind::Device {
            vertical: "metering".into(),
        },
        anchors: vec![],
        crls: vec![],
        revocation: Default::default(),
        created: 0,
    }
}

fn root_sets_change_atomically(b: Backend) {
    let fx = fresh(b);
    let s = &*fx.store;
    s.create_root_set(&root_set("b"), event(AuditAction::RootsCreate, "b"))
        .unwrap();
    s.create_root_set(&root_set("a"), event(AuditAction::RootsCreate, "a"))
        .unwrap();
    assert!(matches!(
        s.create_root_set(&root_set("a"), event(AuditAction::RootsCreate, "a")),
        Err(m2mpki_ca::Error::RootSetExists(_))
    ));
    let names: Vec<_> = s.root_sets().unwrap().into_iter().map(|r| r.name).collect();
    assert_eq!(names, ["a", "b"]);
    let before = chain_len(s);
    // A change that fails leaves the set and the log as they were.
    let err = s
        .modify_root_set("a", &mut |set| {
            set.created = 99;
            Err(m2mpki_ca::Error::Policy("no".into()))
        })
        .unwrap_err();
    assert!(err.to_string().contains("no"));
    assert_eq!(s.root_set("a").unwrap().unwrap().created, 0);
    assert_eq!(chain_len(s), before);
    let changed = s
        .modify_root_set("a", &mut |set| {
            set.created = 42;
            Ok(event(AuditAction::RootsSet, "a"))
        })
        .unwrap();
    assert_eq!(changed.created, 42);
    assert_eq!(s.root_set("a").unwrap().unwrap().created, 42);
    assert_eq!(chain_len(s), before + 1);
    assert!(matches!(
        s.modify_root_set("zz", &mut |_| Ok(event(AuditAction::RootsSet, "zz"))),
        Err(m2mpki_ca::Error::UnknownRootSet(_))
    ));
}

fn the_audit_log_is_one_chain(b: Backend) {
    let fx = fresh(b);
    let s = &*fx.store;
    s.create_ca(&ca_record("ca"), event(AuditAction::CaInit, "ca"))
        .unwrap();
    let batch: Vec<_> = (0..50)
        .map(|i| new_cert("ca", &device(&format!("L{i}"))))
        .collect();
    s.record_certs(&batch, false).unwrap();
    let entries = audit(s);
    assert_eq!(entries.len(), 51);
    assert_eq!(
        entries.iter().map(|e| e.seq).collect::<Vec<_>>(),
        (1..=51).collect::<Vec<u64>>()
    );
    assert_eq!(chain_len(s), 51);
}

/// A store with something of every kind in it.
fn populate(s: &dyn Store) {
    s.create_ca(&ca_record("ca"), event(AuditAction::CaInit, "ca"))
        .unwrap();
    let certs: Vec<_> = (0..20)
        .map(|i| new_cert("ca", &device(&format!("E{i}"))))
        .collect();
    s.record_certs(&certs, false).unwrap();
    s.revoke(
        "ca",
        &certs[3].record.serial,
        RevocationReason::Superseded,
        5,
    )
    .unwrap();
    s.next_crl_number("ca", serde_json::json!({})).unwrap();
    s.create_root_set(&root_set("m"), event(AuditAction::RootsCreate, "m"))
        .unwrap();
}

/// Everything a store holds, in a comparable form.
fn contents(s: &dyn Store) -> Vec<String> {
    let mut out = Vec::new();
    s.export(&mut |item| {
        out.push(match item {
            Item::Cert(c) => format!("cert {:?} {}", c.record, hex::encode(c.der)),
            other => format!("{other:?}"),
        });
        Ok(())
    })
    .unwrap();
    out.sort();
    out
}

fn export_and_import_round_trip(b: Backend) {
    let src = fresh(b);
    populate(&*src.store);
    let other = match b {
        Backend::Redb => Backend::Postgres,
        Backend::Postgres => Backend::Redb,
    };
    let dst = fresh(other);
    let mut items = Vec::new();
    src.store
        .export(&mut |i| {
            items.push(i);
            Ok(())
        })
        .unwrap();
    let n = dst
        .store
        .import(&mut items.clone().into_iter().map(Ok))
        .unwrap();
    assert_eq!(n, items.len() as u64);
    assert_eq!(contents(&*dst.store), contents(&*src.store));
    assert_eq!(chain_len(&*dst.store), chain_len(&*src.store));
    // The copy behaves: the revoked subject is free, the others are live, and the chain goes
    // on from where it was.
    assert_eq!(
        dst.store
            .record_certs(&[new_cert("ca", &device("E3"))], false)
            .unwrap(),
        [RecordOutcome::Recorded]
    );
    assert!(matches!(
        dst.store
            .record_certs(&[new_cert("ca", &device("E4"))], false)
            .unwrap()[0],
        RecordOutcome::AlreadyLive(_)
    ));
    assert_eq!(
        dst.store
            .next_crl_number("ca", serde_json::json!({}))
            .unwrap(),
        2
    );
    assert_eq!(chain_len(&*dst.store), chain_len(&*src.store) + 2);
}

fn import_refuses_a_store_that_is_not_empty(b: Backend) {
    let fx = fresh(b);
    fx.store
        .create_root_set(&root_set("m"), event(AuditAction::RootsCreate, "m"))
        .unwrap();
    let err = fx
        .store
        .import(&mut std::iter::once(Ok(Item::Ca(ca_record("x")))))
        .unwrap_err();
    assert!(err.to_string().contains("not empty"), "{err}");
    assert!(fx.store.ca("x").unwrap().is_none());
    // A failing item rolls the whole import back.
    let empty = fresh(b);
    let err = empty
        .store
        .import(
            &mut [
                Ok(Item::Ca(ca_record("y"))),
                Err(m2mpki_ca::Error::unavailable("source broke")),
            ]
            .into_iter(),
        )
        .unwrap_err();
    assert!(err.to_string().contains("source broke"), "{err}");
    assert!(empty.store.ca("y").unwrap().is_none());
    // What was refused is still there.
    assert!(fx.store.root_set("m").unwrap().is_some());
}

/// Writers on separate connections race for the same subjects: each subject ends with one
/// live certificate, every outcome names it, and the audit log stays one chain.
#[test]
fn racing_writers_on_postgres_keep_one_live_certificate_and_one_chain() {
    let db = TestDb::create().unwrap();
    const WRITERS: usize = 6;
    const SUBJECTS: usize = 40;
    let outcomes: Vec<Vec<(String, NewCert, RecordOutcome)>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..WRITERS)
            .map(|w| {
                let url = db.url.clone();
                scope.spawn(move || {
                    let store = PgStore::open(&url).unwrap();
                    let mut out = Vec::new();
                    for i in 0..SUBJECTS {
                        // Different orders per writer, some in pairs.
                        let subject = device(&format!("S{}", (i * (w + 1)) % SUBJECTS));
                        let cert = new_cert("ca", &subject);
                        let got = store
                            .record_certs(std::slice::from_ref(&cert), false)
                            .unwrap();
                        out.push((subject, cert, got[0].clone()));
                    }
                    out
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let store = PgStore::open(&db.url).unwrap();
    let mut recorded: HashMap<String, Serial> = HashMap::new();
    let mut attempts = 0;
    for (subject, cert, outcome) in outcomes.iter().flatten() {
        attempts += 1;
        if *outcome == RecordOutcome::Recorded {
            let before = recorded.insert(subject.clone(), cert.record.serial.clone());
            assert!(before.is_none(), "{subject} recorded twice");
        }
    }
    assert_eq!(recorded.len(), SUBJECTS);
    for (subject, _, outcome) in outcomes.iter().flatten() {
        let live = store.live_cert("ca", subject).unwrap().unwrap();
        assert_eq!(live, recorded[subject]);
        if let RecordOutcome::AlreadyLive(s) = outcome {
            assert_eq!(*s, live, "{subject}");
        }
    }
    assert_eq!(chain_len(&store), SUBJECTS as u64);
    assert_eq!(store.certs(&CertFilter::default()).unwrap().len(), SUBJECTS);
    assert_eq!(attempts, WRITERS * SUBJECTS);
}

/// A lab whose store was migrated to a fresh PostgreSQL database; commands get `--store`.
struct PgLab {
    lab: Lab,
    db: TestDb,
}

impl PgLab {
    fn new() -> PgLab {
        let lab = Lab::new();
        let db = TestDb::create().unwrap();
        let report = lab.json(&[
            "store",
            "migrate",
            "--from",
            &format!("redb:{}", lab.home.join("store.redb").display()),
            "--to",
            &db.url,
        ]);
        assert_eq!(report["audit_verified"], true);
        // The home's own store is put aside so nothing can read it by mistake.
        std::fs::rename(lab.home.join("store.redb"), lab.path("old-store.redb")).unwrap();
        PgLab { lab, db }
    }

    fn cmd(&self) -> std::process::Command {
        let mut c = self.lab.cmd();
        c.env("M2MPKI_STORE", &self.db.url);
        c
    }

    fn json(&self, args: &[&str]) -> serde_json::Value {
        let out = self.cmd().arg("--json").args(args).output().unwrap();
        assert!(
            out.status.success(),
            "m2mpki {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }
}

fn write_ids(path: &Path, ids: impl IntoIterator<Item = String>) {
    let text: String = ids.into_iter().map(|id| id + "\n").collect();
    std::fs::write(path, text).unwrap();
}

/// `store migrate` from PostgreSQL while an `issue batch` and `crl`s write it: every copy is
/// one snapshot, so its ledger and its audit log agree (`audit verify` cross-checks them) and
/// its CRL counter is not behind its log: `crl` on the copy takes a number no CRL in the copy's
/// log has.
#[test]
fn a_migration_from_a_database_being_written_is_one_snapshot() {
    let pg = PgLab::new();
    let ids = pg.lab.path("ids.txt");
    write_ids(&ids, (0..6000).map(|i| format!("SNAP-{i:05}")));
    let batch = pg
        .cmd()
        .args(["issue", "batch", "--ca", names::MFR_CA])
        .args(["--profile", "device", "--chunk", "100", "--ids"])
        .arg(&ids)
        .arg("--out-dir")
        .arg(pg.lab.path("out"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stop = std::sync::atomic::AtomicBool::new(false);
    let copies = std::thread::scope(|scope| {
        let crls = scope.spawn(|| {
            let mut n = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let crl = pg.lab.path(&format!("w-{n}.crl"));
                pg.json(&["crl", "--ca", names::MFR_CA, "--out", crl.to_str().unwrap()]);
                n += 1;
            }
            n
        });
        let mut copies = Vec::new();
        for i in 0..4 {
            std::thread::sleep(std::time::Duration::from_millis(400));
            let to = pg.lab.path(&format!("copy-{i}.redb"));
            let report = pg.lab.json(&[
                "store",
                "migrate",
                "--from",
                &pg.db.url,
                "--to",
                &format!("redb:{}", to.display()),
            ]);
            assert_eq!(report["audit_verified"], true);
            copies.push(to);
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        assert!(crls.join().unwrap() > 0);
        copies
    });
    let out = batch.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut sizes = Vec::new();
    for copy in &copies {
        let on_copy = |args: &[&str]| {
            let out = pg
                .lab
                .cmd()
                .env("M2MPKI_STORE", format!("redb:{}", copy.display()))
                .arg("--json")
                .args(args)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{args:?} on {}: {}",
                copy.display(),
                String::from_utf8_lossy(&out.stderr)
            );
            serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
        };
        let verified = on_copy(&["audit", "verify"]);
        let certs = verified["certificates"].as_u64().unwrap();
        sizes.push(certs);
        // The highest CRL number the copy's log shows, then a CRL on the copy.
        let store = m2mpki_ca::RedbStore::open(copy).unwrap();
        let mut top = 0;
        store
            .audit_log(&mut |e| {
                if e.event.action == AuditAction::CrlIssue {
                    top = top.max(e.event.detail["crl_number"].as_u64().unwrap());
                }
                Ok(())
            })
            .unwrap();
        drop(store);
        let crl = pg.lab.path("copy.crl");
        let issued = on_copy(&[
            "crl",
            "--ca",
            names::MFR_CA,
            "--out",
            crl.to_str().unwrap(),
            "--force",
        ]);
        assert!(
            issued["number"].as_u64().unwrap() > top,
            "the copy's CRL {} reuses a number its log shows ({top})",
            issued["number"]
        );
    }
    eprintln!("copies taken with {sizes:?} certificates");
    // The copies were taken while the batch ran (not all before or all after it).
    assert!(sizes.windows(2).any(|w| w[0] != w[1]), "{sizes:?}");
}

/// Two `issue batch` processes on one CA and one database at once, with overlapping ID lists:
/// all serials distinct, one live certificate per ID, every ID issued exactly once between
/// them, and `audit verify` passes.
#[test]
fn two_batch_processes_share_one_postgres_ledger() {
    let pg = PgLab::new();
    let baseline = pg.json(&["audit", "verify"])["entries"].as_u64().unwrap();
    let a = pg.lab.path("a.txt");
    let b = pg.lab.path("b.txt");
    // 0..600 and 300..900: 300 IDs in both lists, in opposite orders.
    write_ids(&a, (0..600).map(|i| format!("LOT-{i:04}")));
    write_ids(&b, (300..900).rev().map(|i| format!("LOT-{i:04}")));
    let spawn = |ids: &Path, out: &str| {
        pg.cmd()
            .args(["--json", "issue", "batch", "--ca", names::MFR_CA])
            .args(["--profile", "device", "--chunk", "50", "--ids"])
            .arg(ids)
            .arg("--out-dir")
            .arg(pg.lab.path(out))
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (ca, cb) = (spawn(&a, "out-a"), spawn(&b, "out-b"));
    let (ra, rb) = (
        ca.wait_with_output().unwrap(),
        cb.wait_with_output().unwrap(),
    );
    for r in [&ra, &rb] {
        assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    }
    let (ja, jb): (serde_json::Value, serde_json::Value) = (
        serde_json::from_slice(&ra.stdout).unwrap(),
        serde_json::from_slice(&rb.stdout).unwrap(),
    );
    let issued = ja["issued"].as_u64().unwrap() + jb["issued"].as_u64().unwrap();
    assert_eq!(issued, 900, "{ja} {jb}");
    assert_eq!(
        ja["already_issued"].as_u64().unwrap() + jb["already_issued"].as_u64().unwrap(),
        300,
        "{ja} {jb}"
    );
    let listed = pg.json(&["certs", "list", "--ca", names::MFR_CA]);
    let rows = listed.as_array().unwrap();
    let serials: HashSet<&str> = rows.iter().map(|r| r["serial"].as_str().unwrap()).collect();
    assert_eq!(serials.len(), rows.len(), "a serial was reused");
    let mut per_id: HashMap<String, usize> = HashMap::new();
    for r in rows {
        if r["status"] == "valid" {
            *per_id
                .entry(r["subject_key"].as_str().unwrap().to_owned())
                .or_default() += 1;
        }
    }
    assert_eq!(per_id.len(), 900);
    assert!(
        per_id.values().all(|&n| n == 1),
        "an ID has two live certificates"
    );
    let verified = pg.json(&["audit", "verify"]);
    assert_eq!(verified["ok"], true);
    // One entry per certificate after the lab's own.
    assert_eq!(verified["entries"].as_u64().unwrap(), baseline + 900);
}

/// The CLI on a PostgreSQL store: issue, revoke, CRL and list behave as on redb; a migration
/// back to redb gives the same ledger; the destination must be empty; a broken source chain
/// lands nothing; an unreachable database is a storage failure (exit 3) that names it
/// without its password.
#[test]
fn the_cli_runs_on_postgres_and_migrates_both_ways() {
    let pg = PgLab::new();
    let out = pg.lab.path("d.pem");
    let key = pg.lab.path("d.key");
    let issued = pg.json(&[
        "issue",
        "device",
        "--ca",
        names::MFR_CA,
        "--id",
        "PG-1",
        "--out",
        out.to_str().unwrap(),
        "--key-out",
        key.to_str().unwrap(),
    ]);
    let serial = issued["serial"].as_str().unwrap().to_owned();
    pg.json(&[
        "revoke",
        &serial,
        "--ca",
        names::MFR_CA,
        "--reason",
        "key-compromise",
    ]);
    let crl = pg.lab.path("mfr.crl");
    pg.json(&["crl", "--ca", names::MFR_CA, "--out", crl.to_str().unwrap()]);
    let text = std::process::Command::new("openssl")
        .args(["crl", "-noout", "-text", "-in"])
        .arg(&crl)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&text.stdout).to_uppercase();
    assert!(text.contains(&serial.to_uppercase()), "{text}");

    // Back to redb: the same ledger.
    let back = pg.lab.path("back.redb");
    let report = pg.lab.json(&[
        "store",
        "migrate",
        "--from",
        &pg.db.url,
        "--to",
        &format!("redb:{}", back.display()),
    ]);
    assert_eq!(report["audit_verified"], true);
    let on_pg = pg.json(&["certs", "list"]);
    let on_redb = pg.lab.json(&[
        "--store",
        &format!("redb:{}", back.display()),
        "certs",
        "list",
    ]);
    assert_eq!(on_pg, on_redb);

    // Not into a store that holds anything.
    let err = pg.lab.fails(
        1,
        &[
            "store",
            "migrate",
            "--from",
            &format!("redb:{}", back.display()),
            "--to",
            &pg.db.url,
        ],
    );
    assert!(err.contains("not empty"), "{err}");

    // A tampered source chain: nothing lands.
    {
        let store = m2mpki_ca::RedbStore::open(&back).unwrap();
        store
            .tamper_audit_entry(5, |e| e.event.subject = "forged".into())
            .unwrap();
    }
    let empty = TestDb::create().unwrap();
    let err = pg.lab.fails(
        1,
        &[
            "store",
            "migrate",
            "--from",
            &format!("redb:{}", back.display()),
            "--to",
            &empty.url,
        ],
    );
    assert!(err.contains("audit log broken at entry 5"), "{err}");
    let after = PgStore::open(&empty.url).unwrap();
    assert!(after.cas().unwrap().is_empty());
    assert_eq!(chain_len(&after), 0);

    // Unreachable: exit 3, the address named, the password not.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("postgres://ca:s3cret-pw@127.0.0.1:{port}/ledger");
    let err = pg.lab.fails(3, &["--store", &url, "ca", "list"]);
    assert!(err.contains(&format!("127.0.0.1:{port}/ledger")), "{err}");
    assert!(!err.contains("s3cret-pw"), "{err}");
    // A malformed store argument is bad usage (exit 2), and is not echoed when it may hold a
    // password.
    let err = pg
        .lab
        .fails(2, &["--store", "mysql://u:pw@host/db", "ca", "list"]);
    assert!(
        err.contains("redb:PATH or a postgres:// URL") && !err.contains("pw@"),
        "{err}"
    );
}

/// Two `bootstrap serve` processes read their root sets and CRLs from one PostgreSQL store
/// (`store = "postgres://..."`): both enrol a device; once its certificate is revoked and the
/// CRL added to the set on the shared store (by the CLI, on another "host"), both refuse it
/// within their refresh period, without a restart.
#[test]
fn two_ins_on_one_postgres_store_both_see_a_new_crl() {
    let lab = SharedLab::new();
    let mut ins = Children(Vec::new());
    for n in 0..2 {
        let port = free_port();
        ins.0.push((
            lab.start_in(n, port, "store.key", std::process::Stdio::null()),
            port,
        ));
        lab.wait_ready(port);
    }
    let (cert, key) = lab.device("SN-0001");

    // Revoke SN-0001 and publish the CRL into the device set, on the shared store.
    let listed: serde_json::Value =
        serde_json::from_str(&lab.on_pg(&["--json", "certs", "list", "--id", "SN-0001"])).unwrap();
    let serial = listed[0]["serial"].as_str().unwrap().to_owned();
    lab.on_pg(&[
        "revoke",
        &serial,
        "--ca",
        names::MFR_CA,
        "--reason",
        "key-compromise",
    ]);
    let crl = lab.dir.path().join("mfr.crl");
    lab.on_pg(&["crl", "--ca", names::MFR_CA, "--out", crl.to_str().unwrap()]);
    lab.on_pg(&[
        "roots",
        "add-crl",
        m2mpki_test_pki::sets::DEVICE,
        crl.to_str().unwrap(),
    ]);

    // Both INs refuse it within their refresh period (5 s), without a restart.
    for (_, port) in &ins.0 {
        let mut refused = None;
        for n in 0..60 {
            let (code, err) = lab.enrol(*port, &cert, &key, &format!("crl-{port}-{n}"));
            if code != Some(0) {
                refused = Some((code, err));
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(250));
        }
        let (code, err) = refused
            .unwrap_or_else(|| panic!("the IN on port {port} still enrols a revoked device"));
        assert_eq!(code, Some(1), "{err}");
    }
}

/// A lab whose CA store was migrated into a fresh PostgreSQL database, with Infrastructure
/// Nodes started on it: each IN has a home of its own (a copy of the lab's) and all share the
/// database (root sets, CRLs, credentials, grants) and one store key file.
struct SharedLab {
    dir: tempfile::TempDir,
    lab_dir: std::path::PathBuf,
    home: std::path::PathBuf,
    db: TestDb,
    /// The lab's serve.toml up to its DTLS and PSK sections (TLS only).
    base: String,
}

impl SharedLab {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let lab_dir = dir.path().join("lab");
        let db = TestDb::create().unwrap();
        let mut lab = SharedLab {
            home: lab_dir.join("home"),
            lab_dir,
            db,
            base: String::new(),
            dir,
        };
        // `lab init --store`: the lab's CA store goes into the database (its home keeps only
        // the keys) and serve.toml names the database.
        let (code, out, err) = lab.m2mpki(&[
            "--json",
            "--store",
            &lab.db.url,
            "lab",
            "init",
            lab.lab_dir.to_str().unwrap(),
        ]);
        assert_eq!(code, Some(0), "{err}");
        let layout: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert!(layout["store"].as_str().unwrap().starts_with("postgres://"));
        assert!(!lab.home.join("store.redb").exists());
        let base = std::fs::read_to_string(lab.lab_dir.join("serve.toml")).unwrap();
        assert!(
            base.contains(&format!("store = \"{}\"", lab.db.url)),
            "{base}"
        );
        let cut = base.find("\n[dtls]").or(base.find("\n[psk]")).unwrap();
        lab.base = base[..cut].to_owned();
        lab
    }

    fn m2mpki(&self, args: &[&str]) -> (Option<i32>, String, String) {
        m2mpki(args)
    }

    /// `m2mpki --home <lab home> --store <database> ARGS`, which must succeed.
    fn on_pg(&self, args: &[&str]) -> String {
        let mut a = vec![
            "--home",
            self.home.to_str().unwrap(),
            "--store",
            self.db.url.as_str(),
        ];
        a.extend_from_slice(args);
        let (code, out, err) = self.m2mpki(&a);
        assert_eq!(code, Some(0), "m2mpki {args:?}: {err}");
        out
    }

    /// Writes IN `n`'s configuration (port `port`, store key file `key`) and starts it, its
    /// standard error going to `stderr`.
    fn start_in(
        &self,
        n: usize,
        port: u16,
        key: &str,
        stderr: std::process::Stdio,
    ) -> std::process::Child {
        self.start_in_at(n, port, key, stderr, &self.db.url)
    }

    /// [`start_in`](Self::start_in) on the database at `url` (a proxy in front of it).
    fn start_in_at(
        &self,
        n: usize,
        port: u16,
        key: &str,
        stderr: std::process::Stdio,
        url: &str,
    ) -> std::process::Child {
        let home = self.dir.path().join(format!("in-home-{n}"));
        if !home.exists() {
            let ok = std::process::Command::new("cp")
                .arg("-a")
                .arg(&self.home)
                .arg(&home)
                .status()
                .unwrap();
            assert!(ok.success());
        }
        let text = self
            .base
            .replace(
                "listen = \"127.0.0.1:8443\"",
                &format!("listen = \"127.0.0.1:{port}\""),
            )
            .replace(
                &format!("store = \"{}\"", self.db.url),
                &format!("store = \"{url}\""),
            )
            .replace(
                "[credentials]\n",
                &format!(
                    "[credentials]\nstore_key = \"{}\"\n",
                    self.dir.path().join(key).display()
                ),
            );
        let config = self.dir.path().join(format!("in-{n}.toml"));
        std::fs::write(&config, text).unwrap();
        std::process::Command::new(env!("CARGO_BIN_EXE_m2mpki"))
            .env_remove("M2MPKI_STORE")
            .arg("--home")
            .arg(&home)
            .args(["bootstrap", "serve", "--config"])
            .arg(&config)
            .stderr(stderr)
            .spawn()
            .unwrap()
    }

    /// Enrols with `cert`/`key` at `port`; the exit code, and the result document on success.
    fn enrol(&self, port: u16, cert: &Path, key: &Path, tag: &str) -> (Option<i32>, String) {
        let out = self.dir.path().join(format!("cred-{tag}.json"));
        let (code, stdout, err) = self.m2mpki(&[
            "--home",
            self.home.to_str().unwrap(),
            "--json",
            "bootstrap",
            "enroll",
            "--profile",
            self.lab_dir.join("profile.toml").to_str().unwrap(),
            "--cert",
            cert.to_str().unwrap(),
            "--key",
            key.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--connect",
            &format!("127.0.0.1:{port}"),
            "--timeout",
            "10s",
            "--force",
        ]);
        (code, if code == Some(0) { stdout } else { err })
    }

    fn device(&self, id: &str) -> (std::path::PathBuf, std::path::PathBuf) {
        let d = self.lab_dir.join("devices");
        (d.join(format!("{id}.pem")), d.join(format!("{id}.key.pem")))
    }

    /// Waits until the IN on `port` enrols SN-0001.
    fn wait_ready(&self, port: u16) {
        let (cert, key) = self.device("SN-0001");
        let mut last = String::new();
        for n in 0..100 {
            let (code, text) = self.enrol(port, &cert, &key, &format!("ready-{port}-{n}"));
            if code == Some(0) {
                return;
            }
            last = text;
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
        panic!("the IN on port {port} did not enrol SN-0001: {last}");
    }
}

/// `m2mpki ARGS` with no `$M2MPKI_STORE` from the environment: exit code, stdout and stderr.
fn m2mpki(args: &[&str]) -> (Option<i32>, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_m2mpki"))
        .env_remove("M2MPKI_STORE")
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// [`m2mpki`] with `--home HOME` first.
fn m2mpki_in(home: &Path, args: &[&str]) -> (Option<i32>, String, String) {
    let mut all = vec!["--home", home.to_str().unwrap()];
    all.extend_from_slice(args);
    m2mpki(&all)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Two `bootstrap serve` processes on one PostgreSQL store, 16 clients enrolling through both
/// (four identities through both at once): no enrolment fails while both run, every identity
/// ends with one live credential, and every credential a client received is recorded. One IN
/// is killed (SIGKILL) mid-run: clients retry on the other and all succeed; the killed one
/// restarts cleanly and serves again. An IN configured with another store key refuses to start.
#[test]
fn two_ins_on_one_postgres_store_share_credentials_and_survive_a_kill() {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    let lab = SharedLab::new();
    let null = std::process::Stdio::null;
    // 12 more devices, issued into the shared ledger.
    let ids = lab.dir.path().join("ids.txt");
    let names: Vec<String> = (0..12).map(|n| format!("SN-20{n:02}")).collect();
    std::fs::write(&ids, names.join("\n")).unwrap();
    lab.on_pg(&[
        "issue",
        "batch",
        "--ca",
        names::MFR_CA,
        "--profile",
        "device",
        "--ids",
        ids.to_str().unwrap(),
        "--out-dir",
        lab.lab_dir.join("devices").to_str().unwrap(),
    ]);

    let ports = [free_port(), free_port()];
    let mut ins = Children(Vec::new());
    ins.0
        .push((lab.start_in(0, ports[0], "store.key", null()), ports[0]));
    lab.wait_ready(ports[0]);
    ins.0
        .push((lab.start_in(1, ports[1], "store.key", null()), ports[1]));
    lab.wait_ready(ports[1]);

    // Another store key: refused at start, before it could seal anything.
    let out = lab
        .start_in(2, free_port(), "other.key", std::process::Stdio::piped())
        .wait_with_output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(3),
        "an IN with another store key started"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("store key"), "{err}");

    let killed = AtomicBool::new(false);
    let done = AtomicUsize::new(0);
    let failures_before_kill = AtomicUsize::new(0);
    let retried_after_kill = AtomicUsize::new(0);
    let received = std::sync::Mutex::new(Vec::<(String, String)>::new());
    std::thread::scope(|s| {
        for client in 0..16usize {
            let (lab, names) = (&lab, &names);
            let (killed, done, failures_before_kill, retried_after_kill, received) = (
                &killed,
                &done,
                &failures_before_kill,
                &retried_after_kill,
                &received,
            );
            s.spawn(move || {
                // Clients 12..15 share identities 0..3 with clients 0..3.
                let (cert, key) = lab.device(&names[client % 12]);
                for round in 0..6 {
                    let mut target = (client + round) % 2;
                    let mut result = None;
                    for attempt in 0..6 {
                        let tag = format!("{client}-{round}-{attempt}");
                        let was_killed = killed.load(Ordering::SeqCst);
                        let (code, text) = lab.enrol(ports[target], &cert, &key, &tag);
                        if code == Some(0) {
                            result = Some(text);
                            break;
                        }
                        if !was_killed && !killed.load(Ordering::SeqCst) {
                            failures_before_kill.fetch_add(1, Ordering::SeqCst);
                            eprintln!("client {client} at {}: {text}", ports[target]);
                        } else {
                            retried_after_kill.fetch_add(1, Ordering::SeqCst);
                        }
                        // Retry on the other IN.
                        target = 1 - target;
                    }
                    let text = result.unwrap_or_else(|| {
                        panic!("client {client}, round {round}: no IN enrolled it")
                    });
                    let doc: serde_json::Value = serde_json::from_str(&text).unwrap();
                    let result = &doc["result"];
                    received.lock().unwrap().push((
                        result["identity"].as_str().unwrap().to_owned(),
                        result["credential_id"].as_str().unwrap().to_owned(),
                    ));
                    done.fetch_add(1, Ordering::SeqCst);
                }
            });
        }
        // Kill the first IN once a third of the enrolments are in.
        while done.load(Ordering::SeqCst) < 32 {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        killed.store(true, Ordering::SeqCst);
        ins.0[0].0.kill().unwrap();
        ins.0[0].0.wait().unwrap();
    });
    assert_eq!(failures_before_kill.load(Ordering::SeqCst), 0);
    // The kill hit clients at work: some enrolments went to the dead IN and were retried.
    assert!(retried_after_kill.load(Ordering::SeqCst) > 0);
    let received = received.into_inner().unwrap();
    assert_eq!(received.len(), 16 * 6);

    // The killed IN restarts cleanly on the same store and port, and serves again.
    ins.0[0].0 = lab.start_in(0, ports[0], "store.key", null());
    lab.wait_ready(ports[0]);

    // A grant written from a third "host" applies at the next enrolment at both instances.
    let (cert, key) = lab.device("SN-0001");
    let enrolled = |port: u16, tag: &str| -> serde_json::Value {
        let (code, text) = lab.enrol(port, &cert, &key, tag);
        assert_eq!(code, Some(0), "{text}");
        serde_json::from_str::<serde_json::Value>(&text).unwrap()["result"].clone()
    };
    let identity = enrolled(ports[1], "before-grant")["identity"]
        .as_str()
        .unwrap()
        .to_owned();
    lab.on_pg(&["bootstrap", "grant", &identity, "valve-9"]);
    for port in ports {
        let grants = enrolled(port, &format!("granted-{port}"))["grants"].clone();
        assert!(
            grants.as_array().unwrap().iter().any(|g| g == "valve-9"),
            "{port}: {grants}"
        );
    }

    // One live credential per identity; every credential a client got is recorded.
    let mut identities: Vec<&str> = received.iter().map(|(i, _)| i.as_str()).collect();
    identities.sort_unstable();
    identities.dedup();
    assert_eq!(identities.len(), 12);
    for identity in identities {
        let history: serde_json::Value =
            serde_json::from_str(&lab.on_pg(&["--json", "bootstrap", "credentials", identity]))
                .unwrap();
        let history = history.as_array().unwrap();
        let live = history.iter().filter(|r| r["status"] == "live").count();
        assert_eq!(live, 1, "{identity}: {live} live credentials");
        for (_, id) in received.iter().filter(|(i, _)| i == identity) {
            assert!(
                history.iter().any(|r| r["credential_id"] == id.as_str()),
                "{identity}: credential {id} a client received is not recorded"
            );
        }
    }
}

/// Child processes killed when the test ends, also when it fails.
struct Children(Vec<(std::process::Child, u16)>);

impl Drop for Children {
    fn drop(&mut self) {
        for (child, _) in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// An IN on PostgreSQL stops cleanly on SIGTERM (exit 0, every time: its database clients shut
/// down without blocking inside the runtime), and one started on a port that is taken exits 3
/// naming the address, without a panic.
#[test]
fn an_in_on_postgres_stops_cleanly_and_names_a_busy_port() {
    let lab = SharedLab::new();
    for round in 0..4 {
        let port = free_port();
        let mut ins = Children(vec![(
            lab.start_in(round, port, "store.key", std::process::Stdio::piped()),
            port,
        )]);
        lab.wait_ready(port);
        if round == 0 {
            // A second IN on the same port.
            let mut busy = lab.start_in(9, port, "store.key", std::process::Stdio::piped());
            let status = busy.wait().unwrap();
            let mut err = String::new();
            std::io::Read::read_to_string(busy.stderr.as_mut().unwrap(), &mut err).unwrap();
            assert_eq!(status.code(), Some(3), "{err}");
            assert!(err.contains(&format!("127.0.0.1:{port}")), "{err}");
            assert!(!err.contains("panicked"), "{err}");
        }
        let (mut child, _) = ins.0.pop().unwrap();
        let sent = std::process::Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap();
        assert!(sent.success());
        let status = child.wait().unwrap();
        let mut log = String::new();
        std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut log).unwrap();
        assert_eq!(status.code(), Some(0), "round {round}: {log}");
    }
}

/// When its store goes away, an IN refuses enrolments at once with 503 `store_unavailable`
/// (the client gets a refusal, not a timeout; nothing is recorded), and serves again as soon
/// as the database is back, without a restart.
#[test]
fn an_in_whose_store_is_unreachable_answers_503_and_recovers() {
    let lab = SharedLab::new();
    let port = free_port();
    let _ins = Children(vec![(
        lab.start_in(0, port, "store.key", std::process::Stdio::null()),
        port,
    )]);
    lab.wait_ready(port);
    let (cert, key) = lab.device("SN-0002");
    lab.db.set_reachable(false).unwrap();
    for n in 0..3 {
        let (code, err) = lab.enrol(port, &cert, &key, &format!("down-{n}"));
        assert_eq!(code, Some(1), "{err}");
        assert!(
            err.contains("503") && err.contains("store_unavailable"),
            "{err}"
        );
    }
    lab.db.set_reachable(true).unwrap();
    let mut back = None;
    for n in 0..50 {
        let (code, text) = lab.enrol(port, &cert, &key, &format!("back-{n}"));
        if code == Some(0) {
            back = Some(text);
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let back: serde_json::Value =
        serde_json::from_str(&back.expect("the IN did not serve again")).unwrap();
    let identity = back["result"]["identity"].as_str().unwrap();
    let history: serde_json::Value =
        serde_json::from_str(&lab.on_pg(&["--json", "bootstrap", "credentials", identity]))
            .unwrap();
    // Only the enrolment after the store came back is recorded.
    assert_eq!(history.as_array().unwrap().len(), 1, "{history}");
}

/// A column of another type than the IN expects (a table altered by hand) is a corrupt row:
/// the enrolment that reads it is answered 500 `internal`, not "try again", and the IN's
/// credential writer lives on: once the column is put back, the next enrolment is served
/// without a restart. (`Row::get` panicked on the writer thread, and every later enrolment
/// was 503 until a restart; architecture review, panic surface.)
#[test]
fn a_corrupt_column_is_a_500_and_the_in_serves_again_once_it_is_repaired() {
    let lab = SharedLab::new();
    let port = free_port();
    let _ins = Children(vec![(
        lab.start_in(
            0,
            port,
            "store.key",
            std::process::Stdio::from(std::fs::File::create("/tmp/in-corrupt.log").unwrap()),
        ),
        port,
    )]);
    lab.wait_ready(port);
    let (cert, key) = lab.device("SN-0003");
    let (code, err) = lab.enrol(port, &cert, &key, "first");
    assert_eq!(code, Some(0), "{err}");
    use m2mpki_test_pki::pg::postgres;
    let mut sql = postgres::Client::connect(&lab.db.url, postgres::NoTls).unwrap();
    sql.batch_execute(
        "ALTER TABLE m2mpki_in_credentials ALTER COLUMN record TYPE jsonb USING record::jsonb",
    )
    .unwrap();
    for n in 0..2 {
        let (code, err) = lab.enrol(port, &cert, &key, &format!("corrupt-{n}"));
        assert_eq!(code, Some(1), "{err}");
        assert!(err.contains("500") && err.contains("internal"), "{err}");
    }
    sql.batch_execute(
        "ALTER TABLE m2mpki_in_credentials ALTER COLUMN record TYPE text USING record::text",
    )
    .unwrap();
    let (code, err) = lab.enrol(port, &cert, &key, "repaired");
    assert_eq!(code, Some(0), "{err}");
}

/// The IN's commit meets a connection cut after the COMMIT was forwarded, then a database that
/// stops answering: a cut whose outcome a fresh read settles is answered with the credential
/// the database holds; one it cannot settle is 503 `store_outcome_unknown` (not "nothing was
/// recorded": the credential is live), and the node's retry makes it whole; a stalled database
/// is a 503 well within the node's timeout, and nothing is committed after that answer.
#[test]
fn an_in_whose_commits_are_cut_or_stalled_says_what_it_knows_within_its_deadline() {
    use m2mpki_test_pki::pg::{Fault, FaultProxy};
    let lab = SharedLab::new();
    let proxy = FaultProxy::start(&lab.db.url).unwrap();
    let port = free_port();
    let _ins = Children(vec![(
        lab.start_in_at(
            0,
            port,
            "store.key",
            std::process::Stdio::null(),
            &proxy.url(&lab.db.url),
        ),
        port,
    )]);
    lab.wait_ready(port);
    let (cert, key) = lab.device("SN-0002");
    let history = |identity: &str| -> Vec<serde_json::Value> {
        let out = lab.on_pg(&["--json", "bootstrap", "credentials", identity]);
        serde_json::from_str::<serde_json::Value>(&out)
            .unwrap()
            .as_array()
            .unwrap()
            .clone()
    };
    let live = |h: &[serde_json::Value]| -> Vec<String> {
        h.iter()
            .filter(|r| r["status"] == "live")
            .map(|r| r["credential_id"].as_str().unwrap().to_owned())
            .collect()
    };

    // One cut COMMIT: settled on a fresh connection, answered with what was recorded.
    proxy.set(Fault::CutNextCommit);
    let (code, text) = lab.enrol(port, &cert, &key, "cut-once");
    assert_eq!(code, Some(0), "{text}");
    assert_eq!(proxy.cuts(), 1, "the commit was not cut");
    let doc: serde_json::Value = serde_json::from_str(&text).unwrap();
    let identity = doc["result"]["identity"].as_str().unwrap().to_owned();
    let first = doc["result"]["credential_id"].as_str().unwrap().to_owned();
    let h = history(&identity);
    assert_eq!(live(&h), vec![first.clone()], "{h:?}");

    // Every COMMIT cut, the settling one too: the outcome stays unknown and the answer says so.
    proxy.set(Fault::CutEveryCommit);
    let (code, err) = lab.enrol(port, &cert, &key, "cut-always");
    proxy.set(Fault::Relay);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("503") && err.contains("store_outcome_unknown"),
        "{err}"
    );
    let h = history(&identity);
    assert_eq!(h.len(), 2, "the cut credential was committed: {h:?}");
    let undelivered = live(&h);
    assert_eq!(undelivered.len(), 1);
    assert_ne!(undelivered[0], first, "{h:?}");
    // The node's retry makes it whole: its new credential supersedes the undelivered one.
    let mut again = None;
    for n in 0..50 {
        let (code, text) = lab.enrol(port, &cert, &key, &format!("retry-{n}"));
        if code == Some(0) {
            again = Some(text);
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let again: serde_json::Value =
        serde_json::from_str(&again.expect("no retry succeeded")).unwrap();
    let h = history(&identity);
    assert_eq!(
        live(&h),
        vec![again["result"]["credential_id"]
            .as_str()
            .unwrap()
            .to_owned()]
    );
    let before = h.len();

    // A database that stops answering (TCP up): a 503 well within the node's 10 s timeout.
    proxy.set(Fault::Stall);
    let started = std::time::Instant::now();
    let (code, err) = lab.enrol(port, &cert, &key, "stalled");
    let took = started.elapsed();
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("503"), "after {took:?}: {err}");
    eprintln!("a stalled database was answered 503 after {took:?}");
    // Nothing is committed after the answer, however long the IN still holds the request.
    std::thread::sleep(std::time::Duration::from_secs(2));
    proxy.set(Fault::Relay);
    std::thread::sleep(super_deadline());
    assert_eq!(
        history(&identity).len(),
        before,
        "a credential was committed after the 503"
    );
}

/// Longer than the IN's store deadline for one enrolment.
fn super_deadline() -> std::time::Duration {
    m2mpki_bootstrap::enrol::STORE_DEADLINE + std::time::Duration::from_secs(1)
}

/// `m2mpki bootstrap migrate --to postgres://...` copies a home's IN store into the database
/// (grants and policy here; credential records are compared one by one in
/// bootstrap/tests/credstore.rs), refuses a second run into the filled database (exit 1),
/// takes only postgres:// URLs and two different ends (exit 2), and `--from` copies the
/// database back into another home's bootstrap.redb.
#[test]
fn bootstrap_migrate_copies_the_in_store_into_postgres() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    let db = TestDb::create().unwrap();
    let m2mpki = |args: &[&str]| m2mpki_in(&home, args);
    for (who, what) in [
        ("node:acme.example:pump-1", "valve-7"),
        ("node:acme.example:pump-2", "meter"),
    ] {
        let (code, _, err) = m2mpki(&["bootstrap", "grant", who, what]);
        assert_eq!(code, Some(0), "{err}");
    }
    let (code, out, err) = m2mpki(&["--json", "bootstrap", "migrate", "--to", &db.url]);
    assert_eq!(code, Some(0), "{err}");
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["identities_with_grants"], 2);
    assert!(!out.contains("postgres@"), "the report shows who: {out}");
    let (code, out, err) = m2mpki(&["--json", "--store", &db.url, "bootstrap", "grants"]);
    assert_eq!(code, Some(0), "{err}");
    let grants: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(grants["grants"].as_array().unwrap().len(), 2, "{grants}");
    let (code, _, err) = m2mpki(&[
        "--store",
        &db.url,
        "bootstrap",
        "check",
        "node:acme.example:pump-1",
        "valve-7",
    ]);
    assert_eq!(code, Some(0), "{err}");

    let (code, _, err) = m2mpki(&["bootstrap", "migrate", "--to", &db.url]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("already holds"), "{err}");
    let redb = format!("redb:{}", dir.path().join("x.redb").display());
    let (code, _, err) = m2mpki(&["bootstrap", "migrate", "--to", &redb]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("--to must be a postgres:// URL"), "{err}");
    let (code, _, err) = m2mpki(&["bootstrap", "migrate", "--from", &db.url, "--to", &db.url]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("the same store"), "{err}");

    // And back: the database into another home's (missing) bootstrap.redb.
    let back = dir.path().join("back");
    let (code, out, err) = m2mpki_in(
        &back,
        &["--json", "bootstrap", "migrate", "--from", &db.url],
    );
    assert_eq!(code, Some(0), "{err}");
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["identities_with_grants"], 2, "{out}");
    assert!(back.join("bootstrap.redb").exists());
    let (code, _, err) = m2mpki_in(
        &back,
        &["bootstrap", "check", "node:acme.example:pump-2", "meter"],
    );
    assert_eq!(code, Some(0), "{err}");
    // The filled file is refused as a destination like the database was.
    let (code, _, err) = m2mpki_in(&back, &["bootstrap", "migrate", "--from", &db.url]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("already holds"), "{err}");
}

/// `sslmode=verify-full&sslrootcert=FILE`: the store talks TLS to PostgreSQL (the server's
/// pg_stat_ssl shows it) after verifying its certificate and name; a root that did not issue
/// the database's certificate is refused before anything is sent (exit 3, naming the
/// certificate); modes that encrypt without verifying, and a missing root file, are usage
/// errors (exit 2) that never print the URL.
#[test]
fn the_store_verifies_postgresql_over_tls() {
    let dir = tempfile::tempdir().unwrap();
    let db = TestDb::create().unwrap();
    let ca = m2mpki_test_pki::pg::server_ca().unwrap();
    let tls_url = format!(
        "{}?sslmode=verify-full&sslrootcert={}",
        db.url,
        ca.display()
    );
    let store = m2mpki_ca::PgStore::open(&tls_url).unwrap();
    assert!(store.cas().unwrap().is_empty());
    // The server's view of this connection.
    use m2mpki_test_pki::pg::postgres;
    let mut admin =
        postgres::Client::connect(&m2mpki_test_pki::pg::server().unwrap(), postgres::NoTls)
            .unwrap();
    let row = admin
        .query_one(
            "SELECT bool_and(s.ssl), min(s.version) FROM pg_stat_ssl s \
             JOIN pg_stat_activity a USING (pid) WHERE a.datname = $1",
            &[&db.url.rsplit('/').next().unwrap()],
        )
        .unwrap();
    let (ssl, version): (Option<bool>, Option<String>) =
        (row.try_get(0).unwrap(), row.try_get(1).unwrap());
    assert_eq!(ssl, Some(true), "{version:?}");
    assert!(version.unwrap_or_default().starts_with("TLSv1."));
    drop(store);

    let home = dir.path().join("home");
    let m2mpki = |store: &str| {
        let (code, _, err) = m2mpki_in(&home, &["--store", store, "ca", "list"]);
        (code, err)
    };
    let (code, err) = m2mpki(&tls_url);
    assert_eq!(code, Some(0), "{err}");

    // Another root: refused by the TLS handshake.
    let other = dir.path().join("other-ca.pem");
    let made = std::process::Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=another CA",
            "-keyout",
        ])
        .arg(dir.path().join("other.key"))
        .arg("-out")
        .arg(&other)
        .output()
        .unwrap();
    assert!(made.status.success());
    let (code, err) = m2mpki(&format!(
        "{}?sslmode=verify-full&sslrootcert={}",
        db.url,
        other.display()
    ));
    assert_eq!(code, Some(3), "{err}");
    assert!(err.contains("certificate"), "{err}");

    for (query, says) in [
        ("sslmode=require", "sslmode=require is not supported"),
        ("sslmode=verify-full", "needs sslrootcert"),
        (
            "sslrootcert=/nonexistent.pem",
            "without sslmode=verify-full",
        ),
        (
            "sslmode=verify-full&sslrootcert=/nonexistent.pem",
            "/nonexistent.pem",
        ),
    ] {
        let url = format!(
            "{}?{query}",
            db.url.replace("postgres@", "postgres:s3cret@")
        );
        let (code, err) = m2mpki(&url);
        assert_eq!(code, Some(2), "{query}: {err}");
        assert!(err.contains(says), "{query}: {err}");
        assert!(!err.contains("s3cret"), "{query}: {err}");
    }
}

/// `sslcert` and `sslkey` log in by client certificate (pg_hba `cert`): the role that may only
/// log in that way gets its store; without the certificate, with a key of others or with
/// one file of the pair, it does not, with the reason and no key material in the message.
#[test]
fn the_store_logs_in_to_postgresql_with_a_client_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let db = TestDb::create().unwrap();
    let (role, cert, key) = m2mpki_test_pki::pg::client_certificate().unwrap();
    db.give_to(role).unwrap();
    let ca = m2mpki_test_pki::pg::server_ca().unwrap();
    let as_role = db.url.replace("postgres@", &format!("{role}@"));
    let verified = format!("{as_role}?sslmode=verify-full&sslrootcert={}", ca.display());
    let with_cert = format!(
        "{verified}&sslcert={}&sslkey={}",
        cert.display(),
        key.display()
    );

    let store = m2mpki_ca::PgStore::open(&with_cert).unwrap();
    assert!(
        store.cas().unwrap().is_empty(),
        "the schema was created as {role}"
    );
    drop(store);
    // The tables were created by the role the certificate logged in as.
    use m2mpki_test_pki::pg::postgres;
    let mut admin = postgres::Client::connect(&db.url, postgres::NoTls).unwrap();
    let owner: String = admin
        .query_one(
            "SELECT tableowner::text FROM pg_tables WHERE tablename = 'm2mpki_meta'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(owner, role);

    let home = dir.path().join("home");
    let m2mpki = |store: &str| {
        let (code, _, err) = m2mpki_in(&home, &["--store", store, "ca", "list"]);
        (code, err)
    };
    let (code, err) = m2mpki(&with_cert);
    assert_eq!(code, Some(0), "{err}");

    // Without the certificate the server refuses the role (pg_hba `cert`).
    let (code, err) = m2mpki(&verified);
    assert_eq!(code, Some(3), "{err}");
    assert!(err.contains("certificate"), "{err}");

    // A key file others may read is refused before connecting, as libpq does.
    let open_key = dir.path().join("open.key");
    std::fs::copy(&key, &open_key).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&open_key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let not_a_key = dir.path().join("cert-as.key");
    std::fs::copy(&cert, &not_a_key).unwrap();
    std::fs::set_permissions(&not_a_key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let key_pem = std::fs::read_to_string(&key).unwrap();
    let key_body = key_pem.lines().nth(1).unwrap();
    for (query, says) in [
        (
            format!("sslcert={}&sslkey={}", cert.display(), open_key.display()),
            "others may read it",
        ),
        (format!("sslcert={}", cert.display()), "go together"),
        (
            format!("sslcert={}&sslkey={}", key.display(), key.display()),
            "expected CERTIFICATE",
        ),
        (
            // Another key (the test CA's): not the certificate's.
            format!(
                "sslcert={}&sslkey={}",
                cert.display(),
                ca.with_file_name("ca.key").display()
            ),
            "is not the key of",
        ),
        (
            format!("sslcert={}&sslkey={}", cert.display(), not_a_key.display()),
            "no usable private key",
        ),
    ] {
        let (code, err) = m2mpki(&format!("{verified}&{query}"));
        assert_eq!(code, Some(2), "{query}: {err}");
        assert!(err.contains(says), "{query}: {err}");
        assert!(!err.contains(key_body), "key material in: {err}");
    }
    // Without verify-full a client certificate is refused too.
    let (code, err) = m2mpki(&format!(
        "{as_role}?sslcert={}&sslkey={}",
        cert.display(),
        key.display()
    ));
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("need sslmode=verify-full"), "{err}");
}
