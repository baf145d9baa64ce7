//! The credential store in one redb file, `bootstrap.redb` in the IN's home: shared by the
//! running server and the `m2mpki bootstrap grant/...` commands (redb multi-writer mode), so
//! grants take effect without a restart.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Instant;

use m2mpki_ca::FieldNodeIdentity;
use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use serde::Serialize;

use super::backend::{self, Backend, Snapshot};
use crate::credential::CredentialRecord;
use crate::{Error, Result};
use m2mpki_store::Kind;

const CREDENTIALS: TableDefinition<&str, &[u8]> = TableDefinition::new("credentials");
/// identity -> id of its live credential.
const LIVE: TableDefinition<&str, &str> = TableDefinition::new("live_credentials");
const GRANTS: TableDefinition<&str, &[u8]> = TableDefinition::new("grants");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");

/// The redb backend. The database is reopened after an I/O error (redb refuses every later
/// transaction until then).
pub(crate) struct RedbBackend {
    db: RwLock<Option<Arc<Database>>>,
    path: PathBuf,
}

/// Opens `bootstrap.redb` (refusing a zero-length file, turning redb's panics on a damaged one
/// into an error) and creates its tables.
fn open_redb(path: &Path) -> Result<Database> {
    let ca = |e: m2mpki_ca::Error| match e {
        m2mpki_ca::Error::Store(m) => Error::Store(m),
        e => Error::Ca(e),
    };
    let db = m2mpki_ca::open_database(path).map_err(ca)?;
    m2mpki_ca::guarded(path, || {
        let tx = db
            .begin_write()
            .map_err(|e| m2mpki_ca::Error::unavailable(e.to_string()))?;
        let made = (|| {
            tx.open_table(CREDENTIALS)?;
            tx.open_table(LIVE)?;
            tx.open_table(GRANTS)?;
            tx.open_table(META)?;
            Ok::<_, redb::TableError>(())
        })();
        made.map_err(|e| m2mpki_ca::Error::unavailable(e.to_string()))?;
        tx.commit()
            .map_err(|e| m2mpki_ca::Error::unavailable(e.to_string()))
    })
    .map_err(ca)?;
    Ok(db)
}

fn db_err(e: impl std::fmt::Display) -> Error {
    Error::unavailable(e.to_string())
}

fn json<T: Serialize>(v: &T) -> Result<Vec<u8>> {
    serde_json::to_vec(v).map_err(Error::internal)
}

fn parse<T: serde::de::DeserializeOwned>(what: &str, b: &[u8]) -> Result<T> {
    serde_json::from_slice(b).map_err(|e| Error::corrupt(format!("corrupt record {what}: {e}")))
}

fn meta_text(key: &str, v: &[u8]) -> Result<String> {
    String::from_utf8(v.to_vec()).map_err(|_| Error::corrupt(format!("corrupt meta record {key}")))
}

impl RedbBackend {
    /// Opens (creating) the store at `path`.
    pub(crate) fn open(path: PathBuf) -> Result<Self> {
        let db = open_redb(&path)?;
        Ok(RedbBackend {
            db: RwLock::new(Some(Arc::new(db))),
            path,
        })
    }

    /// The database, opened again if an I/O error closed it.
    fn db(&self) -> Result<Arc<Database>> {
        if let Some(db) = self.db.read().unwrap_or_else(|p| p.into_inner()).as_ref() {
            return Ok(db.clone());
        }
        let mut slot = self.db.write().unwrap_or_else(|p| p.into_inner());
        if let Some(db) = slot.as_ref() {
            return Ok(db.clone());
        }
        match open_redb(&self.path) {
            Ok(db) => {
                tracing::warn!(path = %self.path.display(), "reopened the credential store after an I/O error");
                let db = Arc::new(db);
                *slot = Some(db.clone());
                Ok(db)
            }
            // Still held by a transaction of before the error, or the disk still fails: the
            // next call tries again.
            Err(e) => Err(Error::unavailable(format!(
                "reopening after an I/O error: {e}"
            ))),
        }
    }

    /// After redb failed on an I/O error (a full disk) it refuses every later transaction
    /// until the file is opened again: closes `failed`, so that the next call reopens it.
    fn close_after(&self, failed: &Arc<Database>) {
        let mut slot = self.db.write().unwrap_or_else(|p| p.into_inner());
        if slot.as_ref().is_some_and(|d| Arc::ptr_eq(d, failed)) {
            tracing::warn!(path = %self.path.display(), "closing the credential store after an I/O error; the next request reopens it");
            *slot = None;
        }
    }

    /// Commits `tx`, closing the database when the disk failed: a failed commit of a record
    /// may or may not be in the file ([`Error::CommitUnknown`]; the reopened file will tell).
    fn finish(&self, db: &Arc<Database>, tx: redb::WriteTransaction) -> Result<()> {
        tx.commit().map_err(|e| match e {
            redb::CommitError::Storage(e) => {
                self.close_after(db);
                Error::commit_unknown(e.to_string())
            }
            e => {
                self.close_after(db);
                Error::unavailable(e.to_string())
            }
        })
    }

    fn read_all<T>(&self, f: impl FnOnce(&redb::ReadTransaction) -> Result<T>) -> Result<T> {
        let db = self.db()?;
        let tx = db.begin_read().map_err(db_err)?;
        f(&tx)
    }
}

impl Backend for RedbBackend {
    fn shown(&self) -> String {
        format!("redb:{}", self.path.display())
    }

    fn commit_until(
        &self,
        records: &mut [CredentialRecord],
        deadline: Option<Instant>,
    ) -> Result<()> {
        let db = self.db()?;
        if deadline.is_some_and(|d| Instant::now() >= d) {
            return Err(Error::unavailable("the enrolment's deadline passed first"));
        }
        let tx = db.begin_write().map_err(|e| {
            self.close_after(&db);
            Error::unavailable(e.to_string())
        })?;
        let plan = {
            let mut creds = tx.open_table(CREDENTIALS).map_err(db_err)?;
            let mut live = tx.open_table(LIVE).map_err(db_err)?;
            let mut live_now = HashMap::new();
            for identity in backend::identities(records) {
                let Some(id) = live
                    .get(identity.as_str())
                    .map_err(db_err)?
                    .map(|v| v.value().to_owned())
                else {
                    continue;
                };
                let record = creds.get(id.as_str()).map_err(db_err)?.ok_or_else(|| {
                    Error::corrupt(format!(
                        "corrupt store: the live credential {id} of {identity} is not recorded"
                    ))
                })?;
                live_now.insert(identity, parse(&id, record.value())?);
            }
            let plan = backend::plan_commit(records, &live_now);
            for r in plan.superseded.iter().chain(&plan.new) {
                creds
                    .insert(r.id.as_str(), json(r)?.as_slice())
                    .map_err(db_err)?;
            }
            for (identity, id) in &plan.live {
                live.insert(identity.as_str(), id.as_str())
                    .map_err(db_err)?;
            }
            plan
        };
        self.finish(&db, tx)?;
        backend::answer(records, &plan);
        Ok(())
    }

    fn settle(&self, id: &str, _deadline: Option<Instant>) -> Result<bool> {
        Ok(self.credential(id)?.is_some())
    }

    fn count(&self) -> Result<u64> {
        self.read_all(|tx| {
            tx.open_table(CREDENTIALS)
                .map_err(db_err)?
                .len()
                .map_err(db_err)
        })
    }

    fn credential(&self, id: &str) -> Result<Option<CredentialRecord>> {
        self.read_all(|tx| {
            let t = tx.open_table(CREDENTIALS).map_err(db_err)?;
            let v = t.get(id).map_err(db_err)?;
            v.map(|v| parse(id, v.value())).transpose()
        })
    }

    fn live(&self, identity: &FieldNodeIdentity) -> Result<Option<CredentialRecord>> {
        self.read_all(|tx| {
            let live = tx.open_table(LIVE).map_err(db_err)?;
            let Some(id) = live
                .get(identity.to_string().as_str())
                .map_err(db_err)?
                .map(|v| v.value().to_owned())
            else {
                return Ok(None);
            };
            let creds = tx.open_table(CREDENTIALS).map_err(db_err)?;
            let v = creds.get(id.as_str()).map_err(db_err)?;
            v.map(|v| parse(&id, v.value())).transpose()
        })
    }

    fn history(&self, identity: &FieldNodeIdentity) -> Result<Vec<CredentialRecord>> {
        Ok(self
            .all_records()?
            .into_iter()
            .filter(|r| &r.identity == identity)
            .collect())
    }

    fn all_records(&self) -> Result<Vec<CredentialRecord>> {
        self.read_all(|tx| {
            let mut out = Vec::new();
            for row in tx
                .open_table(CREDENTIALS)
                .map_err(db_err)?
                .iter()
                .map_err(db_err)?
            {
                let (k, v) = row.map_err(db_err)?;
                out.push(parse::<CredentialRecord>(k.value(), v.value())?);
            }
            Ok(out)
        })
    }

    fn rewrite(&self, records: &[CredentialRecord]) -> Result<()> {
        let db = self.db()?;
        let tx = db.begin_write().map_err(db_err)?;
        {
            let mut creds = tx.open_table(CREDENTIALS).map_err(db_err)?;
            for r in records {
                if creds.get(r.id.as_str()).map_err(db_err)?.is_none() {
                    return Err(Error::store(
                        Kind::NotFound,
                        format!("credential {} is not stored", r.id),
                    ));
                }
                creds
                    .insert(r.id.as_str(), json(r)?.as_slice())
                    .map_err(db_err)?;
            }
        }
        self.finish(&db, tx)
    }

    fn meta(&self, key: &str) -> Result<Option<String>> {
        self.read_all(|tx| {
            let t = tx.open_table(META).map_err(db_err)?;
            let v = t.get(key).map_err(db_err)?;
            v.map(|v| meta_text(key, v.value())).transpose()
        })
    }

    fn set_meta(&self, key: &str, value: &str) -> Result<()> {
        let db = self.db()?;
        let tx = db.begin_write().map_err(db_err)?;
        tx.open_table(META)
            .map_err(db_err)?
            .insert(key, value.as_bytes())
            .map_err(db_err)?;
        self.finish(&db, tx)
    }

    fn meta_or_insert(&self, key: &str, value: &str) -> Result<String> {
        let db = self.db()?;
        let tx = db.begin_write().map_err(db_err)?;
        let stored = {
            let mut t = tx.open_table(META).map_err(db_err)?;
            let found = t
                .get(key)
                .map_err(db_err)?
                .map(|v| meta_text(key, v.value()))
                .transpose()?;
            match found {
                Some(v) => v,
                None => {
                    t.insert(key, value.as_bytes()).map_err(db_err)?;
                    value.to_owned()
                }
            }
        };
        self.finish(&db, tx)?;
        Ok(stored)
    }

    fn change_grants(
        &self,
        identity: &FieldNodeIdentity,
        change: &dyn Fn(&mut BTreeSet<String>),
    ) -> Result<Vec<String>> {
        let key = identity.to_string();
        let db = self.db()?;
        let tx = db.begin_write().map_err(db_err)?;
        let now = {
            let mut t = tx.open_table(GRANTS).map_err(db_err)?;
            let mut set: BTreeSet<String> = t
                .get(key.as_str())
                .map_err(db_err)?
                .map(|v| parse(&key, v.value()))
                .transpose()?
                .unwrap_or_default();
            change(&mut set);
            if set.is_empty() {
                t.remove(key.as_str()).map_err(db_err)?;
            } else {
                t.insert(key.as_str(), json(&set)?.as_slice())
                    .map_err(db_err)?;
            }
            set.into_iter().collect()
        };
        self.finish(&db, tx)?;
        Ok(now)
    }

    fn grants_of(&self, identity: &FieldNodeIdentity) -> Result<Vec<String>> {
        let key = identity.to_string();
        self.read_all(|tx| {
            let t = tx.open_table(GRANTS).map_err(db_err)?;
            let v = t.get(key.as_str()).map_err(db_err)?;
            Ok(v.map(|v| parse(&key, v.value()))
                .transpose()?
                .unwrap_or_default())
        })
    }

    fn all_grants(&self) -> Result<Vec<(String, Vec<String>)>> {
        self.read_all(|tx| {
            let t = tx.open_table(GRANTS).map_err(db_err)?;
            let mut out = Vec::new();
            for row in t.iter().map_err(db_err)? {
                let (k, v) = row.map_err(db_err)?;
                out.push((k.value().to_owned(), parse(k.value(), v.value())?));
            }
            Ok(out)
        })
    }

    fn snapshot(&self) -> Result<Snapshot> {
        self.read_all(|tx| {
            let mut s = Snapshot::default();
            for row in tx
                .open_table(CREDENTIALS)
                .map_err(db_err)?
                .iter()
                .map_err(db_err)?
            {
                let (k, v) = row.map_err(db_err)?;
                s.records.push(parse(k.value(), v.value())?);
            }
            for row in tx
                .open_table(LIVE)
                .map_err(db_err)?
                .iter()
                .map_err(db_err)?
            {
                let (k, v) = row.map_err(db_err)?;
                s.live.push((k.value().to_owned(), v.value().to_owned()));
            }
            for row in tx
                .open_table(GRANTS)
                .map_err(db_err)?
                .iter()
                .map_err(db_err)?
            {
                let (k, v) = row.map_err(db_err)?;
                s.grants
                    .push((k.value().to_owned(), parse(k.value(), v.value())?));
            }
            for row in tx
                .open_table(META)
                .map_err(db_err)?
                .iter()
                .map_err(db_err)?
            {
                let (k, v) = row.map_err(db_err)?;
                s.meta
                    .push((k.value().to_owned(), meta_text(k.value(), v.value())?));
            }
            Ok(s)
        })
    }

    fn import(&self, snapshot: &Snapshot) -> Result<()> {
        let db = self.db()?;
        let tx = db.begin_write().map_err(db_err)?;
        {
            let mut creds = tx.open_table(CREDENTIALS).map_err(db_err)?;
            let mut live = tx.open_table(LIVE).map_err(db_err)?;
            let mut grants = tx.open_table(GRANTS).map_err(db_err)?;
            let mut meta = tx.open_table(META).map_err(db_err)?;
            let used = creds.len().map_err(db_err)? + grants.len().map_err(db_err)?;
            if used > 0 || meta.len().map_err(db_err)? > 0 {
                return Err(Error::store(
                    Kind::Conflict,
                    format!(
                        "{} is not empty ({used} credentials and grants, or a recorded policy or \
                     key check): refusing to copy into it",
                        self.shown()
                    ),
                ));
            }
            for r in &snapshot.records {
                creds
                    .insert(r.id.as_str(), json(r)?.as_slice())
                    .map_err(db_err)?;
            }
            for (identity, id) in &snapshot.live {
                live.insert(identity.as_str(), id.as_str())
                    .map_err(db_err)?;
            }
            for (identity, set) in &snapshot.grants {
                grants
                    .insert(identity.as_str(), json(set)?.as_slice())
                    .map_err(db_err)?;
            }
            for (key, value) in snapshot.meta.iter().filter(|(k, _)| k != "schema_version") {
                meta.insert(key.as_str(), value.as_bytes())
                    .map_err(db_err)?;
            }
        }
        self.finish(&db, tx)
    }
}
