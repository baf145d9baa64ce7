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
                Err(m2mpki_ca::Error::Store("source broke".into())),
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
