//! The credential store in memory: for unit tests of what sits above the store (the enrolment
//! core, the supersede rule end to end) without a file or a database. Nothing survives the
//! process.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Mutex;
use std::time::Instant;

use m2mpki_ca::FieldNodeIdentity;

use super::backend::{self, Backend, Snapshot};
use crate::credential::CredentialRecord;
use crate::{Error, Result};
use m2mpki_store::Kind;

#[derive(Default)]
struct State {
    credentials: BTreeMap<String, CredentialRecord>,
    live: BTreeMap<String, String>,
    grants: BTreeMap<String, BTreeSet<String>>,
    meta: BTreeMap<String, String>,
}

/// The in-memory backend; one lock is its transaction.
#[derive(Default)]
pub(crate) struct MemoryBackend {
    state: Mutex<State>,
}

impl MemoryBackend {
    fn with<T>(&self, f: impl FnOnce(&mut State) -> Result<T>) -> Result<T> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut state)
    }
}

impl Backend for MemoryBackend {
    fn shown(&self) -> String {
        "memory".into()
    }

    fn commit_until(
        &self,
        records: &mut [CredentialRecord],
        deadline: Option<Instant>,
    ) -> Result<()> {
        if deadline.is_some_and(|d| Instant::now() >= d) {
            return Err(Error::unavailable("the enrolment's deadline passed first"));
        }
        let plan = self.with(|s| {
            let mut live_now = HashMap::new();
            for identity in backend::identities(records) {
                if let Some(id) = s.live.get(&identity) {
                    let record = s.credentials.get(id).ok_or_else(|| {
                        Error::corrupt(format!(
                            "corrupt store: the live credential {id} of {identity} is not recorded"
                        ))
                    })?;
                    live_now.insert(identity, record.clone());
                }
            }
            let plan = backend::plan_commit(records, &live_now);
            for r in plan.superseded.iter().chain(&plan.new) {
                s.credentials.insert(r.id.clone(), r.clone());
            }
            for (identity, id) in &plan.live {
                s.live.insert(identity.clone(), id.clone());
            }
            Ok(plan)
        })?;
        backend::answer(records, &plan);
        Ok(())
    }

    fn settle(&self, id: &str, _deadline: Option<Instant>) -> Result<bool> {
        self.with(|s| Ok(s.credentials.contains_key(id)))
    }

    fn count(&self) -> Result<u64> {
        self.with(|s| Ok(s.credentials.len() as u64))
    }

    fn credential(&self, id: &str) -> Result<Option<CredentialRecord>> {
        self.with(|s| Ok(s.credentials.get(id).cloned()))
    }

    fn live(&self, identity: &FieldNodeIdentity) -> Result<Option<CredentialRecord>> {
        self.with(|s| {
            Ok(s.live
                .get(&identity.to_string())
                .and_then(|id| s.credentials.get(id))
                .cloned())
        })
    }

    fn history(&self, identity: &FieldNodeIdentity) -> Result<Vec<CredentialRecord>> {
        self.with(|s| {
            Ok(s.credentials
                .values()
                .filter(|r| &r.identity == identity)
                .cloned()
                .collect())
        })
    }

    fn all_records(&self) -> Result<Vec<CredentialRecord>> {
        self.with(|s| Ok(s.credentials.values().cloned().collect()))
    }

    fn rewrite(&self, records: &[CredentialRecord]) -> Result<()> {
        self.with(|s| {
            if let Some(r) = records.iter().find(|r| !s.credentials.contains_key(&r.id)) {
                return Err(Error::store(
                    Kind::NotFound,
                    format!("credential {} is not stored", r.id),
                ));
            }
            for r in records {
                s.credentials.insert(r.id.clone(), r.clone());
            }
            Ok(())
        })
    }

    fn meta(&self, key: &str) -> Result<Option<String>> {
        self.with(|s| Ok(s.meta.get(key).cloned()))
    }

    fn set_meta(&self, key: &str, value: &str) -> Result<()> {
        self.with(|s| {
            s.meta.insert(key.into(), value.into());
            Ok(())
        })
    }

    fn meta_or_insert(&self, key: &str, value: &str) -> Result<String> {
        self.with(|s| {
            Ok(s.meta
                .entry(key.into())
                .or_insert_with(|| value.into())
                .clone())
        })
    }

    fn change_grants(
        &self,
        identity: &FieldNodeIdentity,
        change: &dyn Fn(&mut BTreeSet<String>),
    ) -> Result<Vec<String>> {
        let key = identity.to_string();
        self.with(|s| {
            let mut set = s.grants.remove(&key).unwrap_or_default();
            change(&mut set);
            let now = set.iter().cloned().collect();
            if !set.is_empty() {
                s.grants.insert(key, set);
            }
            Ok(now)
        })
    }

    fn grants_of(&self, identity: &FieldNodeIdentity) -> Result<Vec<String>> {
        self.with(|s| {
            Ok(s.grants
                .get(&identity.to_string())
                .map(|g| g.iter().cloned().collect())
                .unwrap_or_default())
        })
    }

    fn all_grants(&self) -> Result<Vec<(String, Vec<String>)>> {
        self.with(|s| {
            Ok(s.grants
                .iter()
                .map(|(k, g)| (k.clone(), g.iter().cloned().collect()))
                .collect())
        })
    }

    fn snapshot(&self) -> Result<Snapshot> {
        self.with(|s| {
            Ok(Snapshot {
                records: s.credentials.values().cloned().collect(),
                live: s.live.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
                grants: s
                    .grants
                    .iter()
                    .map(|(k, g)| (k.clone(), g.iter().cloned().collect()))
                    .collect(),
                meta: s.meta.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            })
        })
    }

    fn import(&self, snapshot: &Snapshot) -> Result<()> {
        self.with(|s| {
            if !s.credentials.is_empty() || !s.grants.is_empty() || !s.meta.is_empty() {
                return Err(Error::store(
                    Kind::Conflict,
                    "the memory store is not empty: refusing to copy into it",
                ));
            }
            for r in &snapshot.records {
                s.credentials.insert(r.id.clone(), r.clone());
            }
            s.live.extend(snapshot.live.iter().cloned());
            for (k, g) in &snapshot.grants {
                s.grants.insert(k.clone(), g.iter().cloned().collect());
            }
            s.meta.extend(
                snapshot
                    .meta
                    .iter()
                    .filter(|(k, _)| k != "schema_version")
                    .cloned(),
            );
            Ok(())
        })
    }
}
