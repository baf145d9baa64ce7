//! The IN's credential store in PostgreSQL (`store = "postgres://..."` in the server config):
//! several IN instances on one database.
//!
//! Every write (a group of credentials, a grant change, the policy) runs in one transaction
//! that first takes the IN's advisory lock, so two instances that enrol one identity at the
//! same moment are ordered: the later supersedes the earlier and exactly one stays live (also
//! a primary key on the identity in `m2mpki_in_live`). Grants and the policy are read from the
//! database at every enrolment, with no cache: a grant written through any instance (or
//! `m2mpki bootstrap grant --store postgres://...`) applies to the next enrolment everywhere.

use std::collections::HashMap;

use m2mpki_ca::pg::postgres::types::Type;
use m2mpki_ca::pg::{col, PgConn, TxResult};
use m2mpki_ca::FieldNodeIdentity;

use crate::config::Policy;
use crate::credential::{CredentialRecord, CredentialStatus};
use crate::{Error, Result};

type CaError = m2mpki_ca::Error;

/// The advisory lock every IN writer holds for its transaction ("m2min" in ASCII); distinct
/// from the CA ledger's, so issuing certificates and enrolling nodes do not wait on each other.
const LOCK: i64 = 0x6d_32_6d_69_6e;

/// The schema this build writes; a database with a newer one is refused.
const SCHEMA_VERSION: i32 = 1;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS m2mpki_in_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS m2mpki_in_credentials (
    id TEXT PRIMARY KEY,
    identity TEXT NOT NULL,
    created BIGINT NOT NULL,
    record TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS m2mpki_in_credentials_identity ON m2mpki_in_credentials (identity);
CREATE TABLE IF NOT EXISTS m2mpki_in_live (identity TEXT PRIMARY KEY, id TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS m2mpki_in_grants (identity TEXT PRIMARY KEY, grants TEXT NOT NULL);
";

/// A value as the JSON text the tables hold.
fn text<T: serde::Serialize>(v: &T) -> m2mpki_ca::Result<String> {
    serde_json::to_string(v).map_err(|e| CaError::Store(format!("encoding a record: {e}")))
}

/// A value read back from its JSON text.
fn value<T: serde::de::DeserializeOwned>(t: &str) -> m2mpki_ca::Result<T> {
    serde_json::from_str(t).map_err(|e| CaError::Internal(format!("corrupt record: {e}")))
}

/// Connections for the reads of the enrolments (grants, PSK lookups), taken in turn: a read
/// holds its connection (and a runtime worker, which hands its tasks on) for one round trip.
const READ_CONNECTIONS: usize = 4;

/// The IN's connections: one for the group committer and the other writers, a few for the
/// reads of the enrolments, so that a read never waits behind a commit or many others.
pub(crate) struct Pg {
    reads: Vec<PgConn>,
    next_read: std::sync::atomic::AtomicUsize,
    writes: PgConn,
}

impl Pg {
    /// Where it points, without user or password.
    pub(crate) fn shown(&self) -> &str {
        self.writes.shown()
    }

    /// The next read connection, in turn (each opens on first use).
    fn reads(&self) -> &PgConn {
        let n = self
            .next_read
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        &self.reads[n % self.reads.len()]
    }
}

/// Connects and creates the tables when the database has none.
pub(super) fn open(url: &str) -> Result<Pg> {
    let conn = PgConn::new(url).map_err(store)?;
    conn.ensure_schema(LOCK, SCHEMA, "m2mpki_in_meta", SCHEMA_VERSION, "IN")
        .map_err(store)?;
    Ok(Pg {
        reads: (0..READ_CONNECTIONS)
            .map(|_| PgConn::new(url))
            .collect::<m2mpki_ca::Result<_>>()
            .map_err(store)?,
        next_read: std::sync::atomic::AtomicUsize::new(0),
        writes: conn,
    })
}

/// A database failure as the credential store's error (the message names the database).
fn store(e: CaError) -> Error {
    match e {
        CaError::Store(m) => Error::Store(m),
        e @ CaError::CommitUnknown { .. } => Error::CommitUnknown(e.to_string()),
        other => Error::Ca(other),
    }
}

pub(super) fn commit(
    pg: &Pg,
    records: &mut [CredentialRecord],
    deadline: Option<std::time::Instant>,
) -> Result<()> {
    // Within the group, each record supersedes the one before it of the same identity (in
    // order), and the first of an identity supersedes its live credential in the database.
    let identities: Vec<String> = records.iter().map(|r| r.identity.to_string()).collect();
    let mut distinct: Vec<String> = identities.clone();
    distinct.sort_unstable();
    distinct.dedup();
    pg.writes
        .write_until(LOCK, deadline, |tx| {
            let rows = tx.query_typed(
                "SELECT l.identity, c.id, c.record FROM m2mpki_in_live l \
                 JOIN m2mpki_in_credentials c ON c.id = l.id WHERE l.identity = ANY($1)",
                &[(&distinct, Type::TEXT_ARRAY)],
            )?;
            // identity -> (id of its live credential, that record while it is still in the
            // database, None once it is one of this group's)
            let mut live: HashMap<String, (String, Option<CredentialRecord>)> = HashMap::new();
            for row in &rows {
                let record = value::<CredentialRecord>(col(row, 2)?)?;
                live.insert(col(row, 0)?, (col(row, 1)?, Some(record)));
            }
            // A retried transaction starts again from the records as they came.
            let mut new: Vec<CredentialRecord> = records
                .iter()
                .map(|r| CredentialRecord {
                    supersedes: None,
                    status: CredentialStatus::Live,
                    ..r.clone()
                })
                .collect();
            let mut old_updates: Vec<CredentialRecord> = Vec::new();
            let mut index_of: HashMap<String, usize> = HashMap::new();
            for (i, identity) in identities.iter().enumerate() {
                if let Some(&prev) = index_of.get(identity) {
                    new[prev].status = CredentialStatus::Superseded;
                    new[i].supersedes = Some(new[prev].id.clone());
                } else if let Some((old_id, old)) = live.get_mut(identity.as_str()) {
                    if let Some(mut old) = old.take() {
                        old.status = CredentialStatus::Superseded;
                        old_updates.push(old);
                    }
                    new[i].supersedes = Some(old_id.clone());
                }
                index_of.insert(identity.clone(), i);
            }
            if !old_updates.is_empty() {
                let ids: Vec<&str> = old_updates.iter().map(|r| r.id.as_str()).collect();
                let texts = old_updates
                    .iter()
                    .map(text)
                    .collect::<m2mpki_ca::Result<Vec<_>>>()?;
                tx.query_typed(
                    "UPDATE m2mpki_in_credentials c SET record = u.record \
                     FROM UNNEST($1::text[], $2::text[]) AS u(id, record) WHERE c.id = u.id",
                    &[(&ids, Type::TEXT_ARRAY), (&texts, Type::TEXT_ARRAY)],
                )?;
            }
            let ids: Vec<&str> = new.iter().map(|r| r.id.as_str()).collect();
            let created: Vec<i64> = new.iter().map(|r| r.created).collect();
            let texts = new
                .iter()
                .map(text)
                .collect::<m2mpki_ca::Result<Vec<_>>>()?;
            tx.query_typed(
                "INSERT INTO m2mpki_in_credentials (id, identity, created, record) \
                 SELECT * FROM UNNEST($1::text[], $2::text[], $3::int8[], $4::text[])",
                &[
                    (&ids, Type::TEXT_ARRAY),
                    (&identities, Type::TEXT_ARRAY),
                    (&created, Type::INT8_ARRAY),
                    (&texts, Type::TEXT_ARRAY),
                ],
            )?;
            // The last record of each identity is its live one.
            let (live_identities, live_ids): (Vec<&str>, Vec<&str>) = index_of
                .iter()
                .map(|(identity, &i)| (identity.as_str(), new[i].id.as_str()))
                .unzip();
            tx.query_typed(
                "INSERT INTO m2mpki_in_live (identity, id) \
                 SELECT * FROM UNNEST($1::text[], $2::text[]) \
                 ON CONFLICT (identity) DO UPDATE SET id = EXCLUDED.id",
                &[
                    (&live_identities, Type::TEXT_ARRAY),
                    (&live_ids, Type::TEXT_ARRAY),
                ],
            )?;
            Ok(new)
        })
        .map_err(store)
        .map(|new| {
            // The caller's records: what was stored, `supersedes` filled in, still live (each
            // was live when it was answered to its node).
            for (r, n) in records.iter_mut().zip(new) {
                r.supersedes = n.supersedes;
            }
        })
}

/// After an unknown commit: waits for any transaction of the IN's writers to end (the lock),
/// then says whether `id` is recorded; an error when the database still does not answer.
pub(super) fn settle(pg: &Pg, id: &str, deadline: Option<std::time::Instant>) -> Result<bool> {
    pg.writes
        .write_until(LOCK, deadline, |tx| {
            Ok(tx
                .query_typed_opt(
                    "SELECT 1 FROM m2mpki_in_credentials WHERE id = $1",
                    &[(&id, Type::TEXT)],
                )?
                .is_some())
        })
        .map_err(store)
}

pub(super) fn all_records(pg: &Pg) -> Result<Vec<CredentialRecord>> {
    pg.reads()
        .single(|c| {
            c.query_typed("SELECT record FROM m2mpki_in_credentials ORDER BY id", &[])?
                .iter()
                .map(|r| value::<CredentialRecord>(col(r, 0)?).map_err(Into::into))
                .collect::<TxResult<Vec<_>>>()
        })
        .map_err(store)
}

pub(super) fn rewrite(pg: &Pg, records: &[CredentialRecord]) -> Result<()> {
    let texts = records
        .iter()
        .map(|r| Ok((r.id.as_str(), text(r)?)))
        .collect::<m2mpki_ca::Result<Vec<_>>>()
        .map_err(store)?;
    pg.writes
        .write(LOCK, |tx| {
            for (id, record) in &texts {
                let n = tx.execute(
                    "UPDATE m2mpki_in_credentials SET record = $2 WHERE id = $1",
                    &[id, record],
                )?;
                if n != 1 {
                    return Err(CaError::Store(format!("credential {id} is not stored")).into());
                }
            }
            Ok(())
        })
        .map_err(store)
}

pub(super) fn count(pg: &Pg) -> Result<u64> {
    pg.reads()
        .single(|c| {
            let n: i64 = c
                .query_typed_one("SELECT count(*) FROM m2mpki_in_credentials", &[])
                .and_then(|row| Ok(col(&row, 0)?))?;
            Ok(u64::try_from(n).unwrap_or(0))
        })
        .map_err(store)
}

pub(super) fn credential(pg: &Pg, id: &str) -> Result<Option<CredentialRecord>> {
    pg.reads()
        .single(|c| {
            let row = c.query_typed_opt(
                "SELECT record FROM m2mpki_in_credentials WHERE id = $1",
                &[(&id, Type::TEXT)],
            )?;
            Ok(row
                .map(|r| value::<CredentialRecord>(col(&r, 0)?))
                .transpose()?)
        })
        .map_err(store)
}

pub(super) fn live(pg: &Pg, identity: &FieldNodeIdentity) -> Result<Option<CredentialRecord>> {
    let identity = identity.to_string();
    pg.reads()
        .single(|c| {
            let row = c.query_typed_opt(
                "SELECT c.record FROM m2mpki_in_live l \
             JOIN m2mpki_in_credentials c ON c.id = l.id WHERE l.identity = $1",
                &[(&identity, Type::TEXT)],
            )?;
            Ok(row
                .map(|r| value::<CredentialRecord>(col(&r, 0)?))
                .transpose()?)
        })
        .map_err(store)
}

pub(super) fn history(pg: &Pg, identity: &FieldNodeIdentity) -> Result<Vec<CredentialRecord>> {
    let identity = identity.to_string();
    pg.reads()
        .read(|tx| {
            let rows = tx.query(
                "SELECT record FROM m2mpki_in_credentials WHERE identity = $1 \
             ORDER BY created, id",
                &[&identity],
            )?;
            rows.iter()
                .map(|r| Ok(value::<CredentialRecord>(col(r, 0)?)?))
                .collect::<TxResult<Vec<_>>>()
        })
        .map_err(store)
}

pub(super) fn set_policy(pg: &Pg, policy: &Policy) -> Result<()> {
    let value = text(policy).map_err(store)?;
    pg.writes
        .write(LOCK, |tx| {
            tx.execute(
                "INSERT INTO m2mpki_in_meta (key, value) VALUES ('policy', $1) \
             ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
                &[&value],
            )?;
            Ok(())
        })
        .map_err(store)
}

pub(super) fn policy(pg: &Pg) -> Result<Policy> {
    pg.reads()
        .read(|tx| {
            let row = tx.query_opt("SELECT value FROM m2mpki_in_meta WHERE key = 'policy'", &[])?;
            Ok(row
                .map(|r| value::<Policy>(col(&r, 0)?))
                .transpose()?
                .unwrap_or_default())
        })
        .map_err(store)
}

pub(super) fn change_grants(
    pg: &Pg,
    identity: &FieldNodeIdentity,
    f: &dyn Fn(&mut std::collections::BTreeSet<String>),
) -> Result<Vec<String>> {
    let key = identity.to_string();
    pg.writes
        .write(LOCK, |tx| {
            let row = tx.query_opt(
                "SELECT grants FROM m2mpki_in_grants WHERE identity = $1",
                &[&key],
            )?;
            let mut set: std::collections::BTreeSet<String> = row
                .map(|r| value(col(&r, 0)?))
                .transpose()?
                .unwrap_or_default();
            f(&mut set);
            if set.is_empty() {
                tx.execute("DELETE FROM m2mpki_in_grants WHERE identity = $1", &[&key])?;
            } else {
                tx.execute(
                    "INSERT INTO m2mpki_in_grants (identity, grants) VALUES ($1, $2) \
                 ON CONFLICT (identity) DO UPDATE SET grants = EXCLUDED.grants",
                    &[&key, &text(&set)?],
                )?;
            }
            Ok(set.into_iter().collect())
        })
        .map_err(store)
}

pub(super) fn grants_of(pg: &Pg, identity: &FieldNodeIdentity) -> Result<Vec<String>> {
    let key = identity.to_string();
    pg.reads()
        .single_prepared(
            "SELECT grants FROM m2mpki_in_grants WHERE identity = $1",
            |c, statement| {
                let row = c.query_opt(statement, &[&key])?;
                Ok(row
                    .map(|r| value(col(&r, 0)?))
                    .transpose()?
                    .unwrap_or_default())
            },
        )
        .map_err(store)
}

pub(super) fn all_grants(pg: &Pg) -> Result<Vec<(String, Vec<String>)>> {
    pg.reads()
        .read(|tx| {
            let rows = tx.query(
                "SELECT identity, grants FROM m2mpki_in_grants ORDER BY identity",
                &[],
            )?;
            rows.iter()
                .map(|r| {
                    let grants: Vec<String> = value(col(r, 1)?)?;
                    Ok((col::<String>(r, 0)?, grants))
                })
                .collect::<TxResult<Vec<_>>>()
        })
        .map_err(store)
}

/// Records `sealed` as the store key check value unless one is there; returns the one that is.
pub(super) fn key_check(pg: &Pg, sealed: &str) -> Result<String> {
    pg.writes
        .write(LOCK, |tx| {
            tx.execute(
                "INSERT INTO m2mpki_in_meta (key, value) VALUES ('store_key_check', $1) \
             ON CONFLICT (key) DO NOTHING",
                &[&sealed],
            )?;
            let row = tx.query_one(
                "SELECT value FROM m2mpki_in_meta WHERE key = 'store_key_check'",
                &[],
            )?;
            Ok(col::<String>(&row, 0)?)
        })
        .map_err(store)
}

/// Writes a whole credential store into empty tables in one transaction; refuses tables that
/// hold any credential, grant or recorded policy.
pub(super) fn import(
    pg: &Pg,
    records: &[CredentialRecord],
    live: &[(String, String)],
    grants: &[(String, Vec<String>)],
    meta: &[(String, String)],
) -> Result<()> {
    pg.writes
        .write(LOCK, |tx| {
            let used: i64 = tx
                .query_one(
                    "SELECT (SELECT count(*) FROM m2mpki_in_credentials) \
                 + (SELECT count(*) FROM m2mpki_in_grants) \
                 + (SELECT count(*) FROM m2mpki_in_meta WHERE key <> 'schema_version')",
                    &[],
                )
                .and_then(|row| Ok(col(&row, 0)?))?;
            if used > 0 {
                return Err(CaError::Store(format!(
                "the IN tables of {} are not empty ({used} records): refusing to copy into them",
                pg.writes.shown()
            ))
                .into());
            }
            for r in records {
                tx.execute(
                    "INSERT INTO m2mpki_in_credentials (id, identity, created, record) \
                 VALUES ($1, $2, $3, $4)",
                    &[&r.id, &r.identity.to_string(), &r.created, &text(r)?],
                )?;
            }
            for (identity, id) in live {
                tx.execute(
                    "INSERT INTO m2mpki_in_live (identity, id) VALUES ($1, $2)",
                    &[identity, id],
                )?;
            }
            for (identity, set) in grants {
                tx.execute(
                    "INSERT INTO m2mpki_in_grants (identity, grants) VALUES ($1, $2)",
                    &[identity, &text(set)?],
                )?;
            }
            for (key, value) in meta.iter().filter(|(k, _)| k != "schema_version") {
                tx.execute(
                    "INSERT INTO m2mpki_in_meta (key, value) VALUES ($1, $2)",
                    &[key, value],
                )?;
            }
            Ok(())
        })
        .map_err(store)
}
