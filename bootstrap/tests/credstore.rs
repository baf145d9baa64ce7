//! The IN's credential store on every backend (redb in a temp folder, a fresh PostgreSQL
//! database on the cluster `scripts/test` starts, memory): one live credential per identity,
//! sealed values bound to their records, group commit order, grants and policy, copying
//! between any two backends. Integration tests, so that `cargo test --lib` needs no database.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests may fail loudly

use std::collections::BTreeSet;
use std::path::Path;

use m2mpki_bootstrap::config::{DefaultPolicy, Policy};
use m2mpki_bootstrap::credstore::{
    CredentialRecord, CredentialStatus, CredentialStore, NewCredential, Seal, StoreKey,
};
use m2mpki_bootstrap::protocol::Admission;
use m2mpki_ca::rootset::RootSetKind;
use m2mpki_ca::FieldNodeIdentity;

fn identity(text: &str) -> FieldNodeIdentity {
    text.parse().unwrap()
}

fn fx() -> (tempfile::TempDir, CredentialStore, StoreKey) {
    let dir = tempfile::tempdir().unwrap();
    let store = CredentialStore::open(dir.path()).unwrap();
    let key = file_key(dir.path(), "store.key");
    (dir, store, key)
}

fn file_key(dir: &Path, name: &str) -> StoreKey {
    StoreKey::load(
        &m2mpki_hsm::KeyRef::File(dir.join(name)),
        &m2mpki_hsm::Keystore::default(),
    )
    .unwrap()
}

/// A store on a backend, with a folder for its key files (and its database).
struct Fx {
    dir: tempfile::TempDir,
    store: CredentialStore,
    key: StoreKey,
    db: Option<m2mpki_test_pki::pg::TestDb>,
}

/// A store on each backend: redb in a temp folder, a fresh PostgreSQL database on the cluster
/// `scripts/test` starts (`$M2MPKI_TEST_PG`), and memory.
fn backends() -> Vec<Fx> {
    let [redb, pg] = redb_and_pg();
    vec![redb, pg, memory()]
}

fn memory() -> Fx {
    let dir = tempfile::tempdir().unwrap();
    let key = file_key(dir.path(), "store.key");
    Fx {
        dir,
        store: CredentialStore::in_memory(),
        key,
        db: None,
    }
}

fn redb_and_pg() -> [Fx; 2] {
    let (dir, store, key) = fx();
    let redb = Fx {
        dir,
        store,
        key,
        db: None,
    };
    let dir = tempfile::tempdir().unwrap();
    let db = m2mpki_test_pki::pg::TestDb::create().unwrap();
    let store = CredentialStore::open_at(
        Some(&m2mpki_ca::StoreLocation::Postgres(db.url.clone())),
        dir.path(),
    )
    .unwrap();
    assert!(
        store.backend().starts_with("postgres://"),
        "{}",
        store.backend()
    );
    let key = file_key(dir.path(), "store.key");
    let pg = Fx {
        dir,
        store,
        key,
        db: Some(db),
    };
    [redb, pg]
}

fn admission() -> Admission {
    Admission {
        set: "meters".into(),
        kind: RootSetKind::Device {
            vertical: "metering".into(),
        },
    }
}

fn new<'a>(id: &'a FieldNodeIdentity, admitted_by: &'a Admission) -> NewCredential<'a> {
    NewCredential {
        identity: id,
        admitted_by,
        client_cert_sha256: "00",
        expires: 2_000_000_000,
    }
}

#[test]
fn each_identity_has_one_live_credential_and_a_history() {
    for Fx {
        dir, store, key, ..
    } in backends()
    {
        one_live_credential_and_a_history(&dir, &store, &key);
    }
}

fn one_live_credential_and_a_history(
    dir: &tempfile::TempDir,
    store: &CredentialStore,
    key: &StoreKey,
) {
    let adm = admission();
    let a = identity("device:1.3.6.1.4.1.99999.1:SN-1");
    let b = identity("node:acme.example:pump-1");
    let (first, c1) = store.issue(key, new(&a, &adm)).unwrap();
    let (second, c2) = store.issue(key, new(&a, &adm)).unwrap();
    let (other, _) = store.issue(key, new(&b, &adm)).unwrap();
    assert_ne!(c1, c2, "every bootstrap gets a fresh credential");
    assert_eq!(second.supersedes.as_deref(), Some(first.id.as_str()));
    assert_eq!(store.live(&a).unwrap().unwrap().id, second.id);
    assert_eq!(store.live(&b).unwrap().unwrap().id, other.id);
    let history = store.history(&a).unwrap();
    let states: Vec<_> = history.iter().map(|r| (r.id.clone(), r.status)).collect();
    assert!(states.contains(&(first.id.clone(), CredentialStatus::Superseded)));
    assert!(states.contains(&(second.id.clone(), CredentialStatus::Live)));
    assert_eq!(history.len(), 2);
    assert_eq!(store.count().unwrap(), 3);
    // Sealed, not stored in the clear; unseals to what the node got.
    let rec = store.credential(&second.id).unwrap().unwrap();
    assert!(!rec.sealed.contains(&hex::encode(c2.expose())));
    assert_eq!(store.unseal(key, &rec).unwrap(), c2);
    // The record's identity is typed and stored canonically.
    assert_eq!(rec.identity, a);
    // Another store key does not open it, and says which credential.
    let other_key = StoreKey::load(
        &m2mpki_hsm::KeyRef::File(dir.path().join("other.key")),
        &m2mpki_hsm::Keystore::default(),
    )
    .unwrap();
    let err = store.unseal(&other_key, &rec).unwrap_err();
    assert!(err.to_string().contains(&rec.id), "{err}");
    // An unknown identity has nothing.
    let c = identity("device:1.3.6.1.4.1.99999.1:SN-404");
    assert!(store.live(&c).unwrap().is_none());
    assert!(store.history(&c).unwrap().is_empty());
}

/// Two records with their sealed values swapped (as anyone who can write the store, but
/// does not hold the store key, could do), and a record moved to another identity: none
/// opens, on either backend; put back, each opens again.
#[test]
fn sealed_values_open_only_in_their_own_record() {
    for Fx { store, key, .. } in backends() {
        let adm = admission();
        let a = identity("device:1.3.6.1.4.1.99999.1:SN-A");
        let b = identity("device:1.3.6.1.4.1.99999.1:SN-B");
        let (ra, ca) = store.issue(&key, new(&a, &adm)).unwrap();
        let (rb, cb) = store.issue(&key, new(&b, &adm)).unwrap();
        let (mut xa, mut xb) = (ra.clone(), rb.clone());
        std::mem::swap(&mut xa.sealed, &mut xb.sealed);
        store.rewrite(&[xa, xb]).unwrap();
        for id in [&ra.id, &rb.id] {
            let r = store.credential(id).unwrap().unwrap();
            let err = store.unseal(&key, &r).unwrap_err();
            assert!(
                err.to_string().contains("moved from another record"),
                "{err}"
            );
        }
        // The same value under another identity, or with a later expiry, does not open.
        let mut moved = ra.clone();
        moved.identity = b.clone();
        assert!(store.unseal(&key, &moved).is_err());
        let mut longer = ra.clone();
        longer.expires += 86_400 * 365;
        assert!(store.unseal(&key, &longer).is_err());
        store.rewrite(&[ra.clone(), rb.clone()]).unwrap();
        assert_eq!(store.unseal(&key, &ra).unwrap(), ca);
        assert_eq!(store.unseal(&key, &rb).unwrap(), cb);
    }
}

/// A record sealed the way earlier versions did (unbound) is never served; `reseal` binds
/// it to its record, after which it opens to the same credential.
#[test]
fn unbound_records_are_refused_until_resealed() {
    for Fx {
        dir, store, key, ..
    } in backends()
    {
        let adm = admission();
        let a = identity("device:1.3.6.1.4.1.99999.1:SN-OLD");
        let (mut old, credential) = CredentialStore::prepare(&key, new(&a, &adm)).unwrap();
        // Sealed alone, under the same key file, as earlier versions did.
        let sealer = m2mpki_hsm::Keystore::default()
            .open_sealer(&m2mpki_hsm::KeyRef::File(dir.path().join("store.key")))
            .unwrap();
        old.sealed = hex::encode(sealer.seal(credential.expose()).unwrap());
        old.seal = Seal::Unbound;
        // Stored as an earlier version wrote it: no `seal` field at all.
        let text = serde_json::to_string(&old).unwrap();
        assert!(!text.contains("\"seal\""), "{text}");
        store.commit(&mut [old.clone()]).unwrap();
        let (bound, _) = store
            .issue(&key, new(&identity("node:acme.example:n-1"), &adm))
            .unwrap();
        let stored = store.credential(&old.id).unwrap().unwrap();
        assert_eq!(stored.seal, Seal::Unbound);
        let err = store.unseal(&key, &stored).unwrap_err();
        assert!(err.to_string().contains("bootstrap reseal"), "{err}");
        assert_eq!(store.reseal(&key).unwrap(), (1, 1));
        let stored = store.credential(&old.id).unwrap().unwrap();
        assert_eq!(stored.seal, Seal::Bound);
        assert_eq!(store.unseal(&key, &stored).unwrap(), credential);
        assert!(store.unseal(&key, &bound).is_ok());
        assert_eq!(store.reseal(&key).unwrap(), (0, 2));
    }
}

#[test]
fn a_group_commit_keeps_order_within_the_group() {
    for Fx { store, key, .. } in backends() {
        group_keeps_order(&store, &key);
    }
}

fn group_keeps_order(store: &CredentialStore, key: &StoreKey) {
    let adm = admission();
    let a = identity("device:1.3.6.1.4.1.99999.1:SN-1");
    let mut group: Vec<CredentialRecord> = (0..3)
        .map(|_| CredentialStore::prepare(key, new(&a, &adm)).unwrap().0)
        .collect();
    store.commit(&mut group).unwrap();
    assert_eq!(group[0].supersedes, None);
    assert_eq!(group[1].supersedes.as_deref(), Some(group[0].id.as_str()));
    assert_eq!(group[2].supersedes.as_deref(), Some(group[1].id.as_str()));
    assert_eq!(store.live(&a).unwrap().unwrap().id, group[2].id);
}

#[test]
fn grants_under_each_policy() {
    for Fx { store, .. } in backends() {
        grants_and_policy(&store);
    }
}

fn grants_and_policy(store: &CredentialStore) {
    let tech = identity("node:acme.example:pump-1");
    let plain = identity("node:acme.example:pump-2");
    store
        .grant(&tech, &["valve-7".into(), "meter".into()])
        .unwrap();
    assert_eq!(
        store.revoke_grant(&tech, &["meter".into()]).unwrap(),
        ["valve-7"]
    );
    let allow = Policy {
        default: DefaultPolicy::Allow,
        grants: vec!["weather".into()],
    };
    let deny = Policy {
        default: DefaultPolicy::Deny,
        grants: vec!["weather".into()],
    };
    // (policy, identity, effective grants)
    let cases: [(&Policy, &FieldNodeIdentity, Option<Vec<&str>>); 4] = [
        (&allow, &tech, Some(vec!["valve-7", "weather"])),
        (&allow, &plain, Some(vec!["weather"])),
        (&deny, &tech, Some(vec!["valve-7"])),
        (&deny, &plain, None),
    ];
    for (policy, who, want) in cases {
        let got = store.effective_grants(policy, who).unwrap();
        let want = want.map(|w| w.into_iter().map(String::from).collect::<Vec<_>>());
        assert_eq!(got, want, "{policy:?} {who}");
    }
    store.set_policy(&deny).unwrap();
    assert!(store.check(&tech, "valve-7").unwrap());
    assert!(!store.check(&tech, "weather").unwrap());
    assert!(!store.check(&plain, "weather").unwrap());
    // Removing the last grant removes the identity from the table.
    store.revoke_grant(&tech, &["valve-7".into()]).unwrap();
    assert!(store.all_grants().unwrap().is_empty());
}

#[test]
fn the_store_file_is_private() {
    use std::os::unix::fs::PermissionsExt;
    let (dir, _store, _) = fx();
    for f in ["bootstrap.redb", "store.key"] {
        let mode = std::fs::metadata(dir.path().join(f))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "{f}: {mode:o}");
    }
}

#[test]
fn a_store_refuses_a_store_key_that_does_not_open_its_credentials() {
    for Fx {
        dir, store, key, ..
    } in backends()
    {
        store.check_key(&key).unwrap();
        // Again, as at every start.
        store.check_key(&key).unwrap();
        let other = file_key(dir.path(), "other.key");
        let err = store.check_key(&other).unwrap_err().to_string();
        assert!(err.contains("store key"), "{}: {err}", store.backend());
    }
}

/// Two IN instances on one database enrol one identity at the same moment, over and over:
/// exactly one credential ends live, every credential is recorded, and the superseded ones
/// form one chain back from it (no fork). A grant written through one applies at the other.
#[test]
fn two_stores_on_one_database_keep_one_live_credential() {
    let [_, Fx {
        dir,
        store,
        key,
        db,
    }] = redb_and_pg();
    let db = db.unwrap();
    let loc = m2mpki_ca::StoreLocation::Postgres(db.url.clone());
    let other = CredentialStore::open_at(Some(&loc), dir.path()).unwrap();
    let adm = admission();
    let a = identity("device:1.3.6.1.4.1.99999.1:SN-RACE");
    let ids = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for (n, st) in [&store, &other].into_iter().enumerate() {
            let (key, adm, a, ids) = (&key, &adm, &a, &ids);
            s.spawn(move || {
                for round in 0..30 {
                    // Groups of 1 to 3, as the group committer makes them.
                    let mut group: Vec<CredentialRecord> = (0..1 + (round + n) % 3)
                        .map(|_| CredentialStore::prepare(key, new(a, adm)).unwrap().0)
                        .collect();
                    st.commit(&mut group).unwrap();
                    ids.lock().unwrap().extend(group.into_iter().map(|r| r.id));
                }
            });
        }
    });
    let ids = ids.into_inner().unwrap();
    let history = store.history(&a).unwrap();
    assert_eq!(history.len(), ids.len());
    let live: Vec<_> = history
        .iter()
        .filter(|r| r.status == CredentialStatus::Live)
        .collect();
    assert_eq!(live.len(), 1, "one live credential");
    assert_eq!(other.live(&a).unwrap().unwrap().id, live[0].id);
    // Walk back from the live credential through `supersedes`: every record, once.
    let by_id: std::collections::HashMap<&str, &CredentialRecord> =
        history.iter().map(|r| (r.id.as_str(), r)).collect();
    let mut seen = BTreeSet::new();
    let mut at = Some(live[0].id.as_str());
    while let Some(id) = at {
        assert!(seen.insert(id.to_owned()), "{id} twice in the chain");
        at = by_id[id].supersedes.as_deref();
    }
    assert_eq!(seen, ids.iter().cloned().collect::<BTreeSet<_>>());

    let tech = identity("node:acme.example:pump-9");
    store.grant(&tech, &["valve-9".into()]).unwrap();
    other
        .set_policy(&Policy {
            default: DefaultPolicy::Deny,
            grants: vec![],
        })
        .unwrap();
    assert!(other.check(&tech, "valve-9").unwrap());
    assert!(!store
        .check(&identity("node:acme.example:pump-8"), "valve-9")
        .unwrap());
}

/// A store copied into another backend reads back the same, record for record, whichever the
/// two backends are, and the copy is refused into a store that already holds something.
#[test]
fn a_store_copies_into_any_other_backend() {
    let [redb, pg] = redb_and_pg();
    copies(&redb, &pg);
    let [redb, pg] = redb_and_pg();
    copies(&pg, &redb);
    let (from, [redb, _]) = (memory(), redb_and_pg());
    copies(&from, &redb);
    let ([redb, _], to) = (redb_and_pg(), memory());
    copies(&redb, &to);
}

fn copies(from: &Fx, to: &Fx) {
    let (key, from, to) = (&from.key, &from.store, &to.store);
    let adm = admission();
    let a = identity("device:1.3.6.1.4.1.99999.1:SN-1");
    let b = identity("node:acme.example:pump-1");
    from.check_key(key).unwrap();
    let (r1, ca1) = from.issue(key, new(&a, &adm)).unwrap();
    from.issue(key, new(&a, &adm)).unwrap();
    from.issue(key, new(&b, &adm)).unwrap();
    from.grant(&b, &["valve-7".into()]).unwrap();
    let policy = Policy {
        default: DefaultPolicy::Deny,
        grants: vec!["weather".into()],
    };
    from.set_policy(&policy).unwrap();
    let what = format!("{} -> {}", from.backend(), to.backend());
    assert_eq!(from.copy_into(to).unwrap(), (3, 1), "{what}");
    for who in [&a, &b] {
        let (h1, h2) = (from.history(who).unwrap(), to.history(who).unwrap());
        assert_eq!(
            serde_json::to_value(&h1).unwrap(),
            serde_json::to_value(&h2).unwrap(),
            "{what}"
        );
        assert_eq!(
            from.live(who).unwrap().unwrap().id,
            to.live(who).unwrap().unwrap().id,
            "{what}"
        );
    }
    assert_eq!(to.all_grants().unwrap(), from.all_grants().unwrap());
    assert_eq!(to.policy().unwrap().default, DefaultPolicy::Deny);
    // Still sealed under the same key, and the key check came along.
    to.check_key(key).unwrap();
    let first = to.credential(&r1.id).unwrap().unwrap();
    assert_eq!(to.unseal(key, &first).unwrap(), ca1);
    // A second copy into the now full store is refused, and changes nothing.
    let err = from.copy_into(to).unwrap_err().to_string();
    assert!(err.contains("not empty"), "{what}: {err}");
    assert_eq!(to.count().unwrap(), 3);
}
