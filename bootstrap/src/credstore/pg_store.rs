//! The IN's credential store in PostgreSQL (`store = "postgres://..."` in the server config):
//! several IN instances on one database.
//!
//! Every write (a group of credentials, a grant change, the policy) runs in one transaction
//! that first takes the IN's advisory lock, so two instances that enrol one identity at the
//! same moment are ordered: the later supersedes the earlier and exactly one stays live (also
//! a primary key on the identity in `m2mpki_in_live`). Grants and the policy are read from the
//! database at every enrolment, with no cache: a grant written through any instance (or
//! `m2mpki bootstrap grant --store postgres://...`) applies to the next enrolment everywhere.

use std::collections::{BTreeSet, HashMap};
use std::time::Instant;

use m2mpki_ca::FieldNodeIdentity;
use m2mpki_store::pg::postgres::types::Type;
use m2mpki_store::pg::{col, Fail, PgConn};
use m2mpki_store::Kind;

use super::backend::{self, Backend, Snapshot};
use crate::credential::CredentialRecord;
use crate::{Error, Result};

/// A transaction body that returns the bootstrap's errors.
type TxResult<T> = m2mpki_store::pg::TxResult<T, Error>;

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
fn text<T: serde::Serialize>(v: &T) -> Result<String> {
    serde_json::to_string(v).map_err(|e| Error::internal(format!("encoding a record: {e}")))
}

/// A value read back from its JSON text.
fn value<T: serde::de::DeserializeOwned>(t: &str) -> Result<T> {
    serde_json::from_str(t).map_err(|e| Error::corrupt(format!("corrupt record: {e}")))
}

/// Connections for the reads of the enrolments (grants, PSK lookups), taken in turn: a read
/// holds its connection (and a runtime worker, which hands its tasks on) for one round trip.
const READ_CONNECTIONS: usize = 4;

/// The IN's connections: one for the group committer and the other writers, a few for the
/// reads of the enrolments, so that a read never waits behind a commit or many others.
pub(crate) struct PgBackend {
    reads: Vec<PgConn>,
    next_read: std::sync::atomic::AtomicUsize,
    writes: PgConn,
}

impl PgBackend {
    /// The next read connection, in turn (each opens on first use).
    fn reads(&self) -> &PgConn {
        let n = self
            .next_read
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        &self.reads[n % self.reads.len()]
    }
}

/// Connects and creates the tables when the database has none.
pub(crate) fn open(url: &str) -> Result<PgBackend> {
    let conn = PgConn::new(url)?;
    conn.ensure_schema(LOCK, SCHEMA, "m2mpki_in_meta", SCHEMA_VERSION, "IN")?;
    Ok(PgBackend {
        reads: (0..READ_CONNECTIONS)
            .map(|_| PgConn::new(url))
            .collect::<m2mpki_store::Result<_>>()?,
        next_read: std::sync::atomic::AtomicUsize::new(0),
        writes: conn,
    })
}

impl Backend for PgBackend {
    fn shown(&self) -> String {
        self.writes.shown().to_owned()
    }

    fn commit_until(
        &self,
        records: &mut [CredentialRecord],
        deadline: Option<Instant>,
    ) -> Result<()> {
        let identities: Vec<String> = records.iter().map(|r| r.identity.to_string()).collect();
        let distinct = backend::identities(records);
        let plan = self.writes.write_until(LOCK, deadline, |tx| {
            let rows = tx.query_typed(
                "SELECT l.identity, c.record FROM m2mpki_in_live l \
                     JOIN m2mpki_in_credentials c ON c.id = l.id WHERE l.identity = ANY($1)",
                &[(&distinct, Type::TEXT_ARRAY)],
            )?;
            let mut live_now = HashMap::new();
            for row in &rows {
                live_now.insert(
                    col::<String>(row, 0)?,
                    value::<CredentialRecord>(col(row, 1)?)?,
                );
            }
            // Planned in the transaction: a retried one starts again from the records as
            // they came.
            let plan = backend::plan_commit(records, &live_now);
            if !plan.superseded.is_empty() {
                let ids: Vec<&str> = plan.superseded.iter().map(|r| r.id.as_str()).collect();
                let texts = plan
                    .superseded
                    .iter()
                    .map(text)
                    .collect::<Result<Vec<_>>>()?;
                tx.query_typed(
                    "UPDATE m2mpki_in_credentials c SET record = u.record \
                         FROM UNNEST($1::text[], $2::text[]) AS u(id, record) WHERE c.id = u.id",
                    &[(&ids, Type::TEXT_ARRAY), (&texts, Type::TEXT_ARRAY)],
                )?;
            }
            let ids: Vec<&str> = plan.new.iter().map(|r| r.id.as_str()).collect();
            let created: Vec<i64> = plan.new.iter().map(|r| r.created).collect();
            let texts = plan.new.iter().map(text).collect::<Result<Vec<_>>>()?;
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
            let (live_identities, live_ids): (Vec<&str>, Vec<&str>) = plan
                .live
                .iter()
                .map(|(identity, id)| (identity.as_str(), id.as_str()))
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
            Ok(plan)
        })?;
        backend::answer(records, &plan);
        Ok(())
    }

    /// Waits for any transaction of the IN's writers to end (the lock), then says whether `id`
    /// is recorded; an error when the database still does not answer.
    fn settle(&self, id: &str, deadline: Option<Instant>) -> Result<bool> {
        self.writes.write_until(LOCK, deadline, |tx| {
            Ok(tx
                .query_typed_opt(
                    "SELECT 1 FROM m2mpki_in_credentials WHERE id = $1",
                    &[(&id, Type::TEXT)],
                )?
                .is_some())
        })
    }

    fn count(&self) -> Result<u64> {
        self.reads().single(|c| {
            let n: i64 = c
                .query_typed_one("SELECT count(*) FROM m2mpki_in_credentials", &[])
                .map_err(Fail::from)
                .and_then(|row| Ok(col(&row, 0)?))?;
            Ok(u64::try_from(n).unwrap_or(0))
        })
    }

    fn credential(&self, id: &str) -> Result<Option<CredentialRecord>> {
        self.reads().single(|c| {
            let row = c.query_typed_opt(
                "SELECT record FROM m2mpki_in_credentials WHERE id = $1",
                &[(&id, Type::TEXT)],
            )?;
            Ok(row
                .map(|r| value::<CredentialRecord>(col(&r, 0)?))
                .transpose()?)
        })
    }

    fn live(&self, identity: &FieldNodeIdentity) -> Result<Option<CredentialRecord>> {
        let identity = identity.to_string();
        self.reads().single(|c| {
            let row = c.query_typed_opt(
                "SELECT c.record FROM m2mpki_in_live l \
                     JOIN m2mpki_in_credentials c ON c.id = l.id WHERE l.identity = $1",
                &[(&identity, Type::TEXT)],
            )?;
            Ok(row
                .map(|r| value::<CredentialRecord>(col(&r, 0)?))
                .transpose()?)
        })
    }

    fn history(&self, identity: &FieldNodeIdentity) -> Result<Vec<CredentialRecord>> {
        let identity = identity.to_string();
        self.reads().read(|tx| {
            let rows = tx.query(
                "SELECT record FROM m2mpki_in_credentials WHERE identity = $1",
                &[&identity],
            )?;
            rows.iter()
                .map(|r| Ok(value::<CredentialRecord>(col(r, 0)?)?))
                .collect::<TxResult<Vec<_>>>()
        })
    }

    fn all_records(&self) -> Result<Vec<CredentialRecord>> {
        self.reads().single(|c| {
            c.query_typed("SELECT record FROM m2mpki_in_credentials", &[])?
                .iter()
                .map(|r| value::<CredentialRecord>(col(r, 0)?).map_err(Into::into))
                .collect::<TxResult<Vec<_>>>()
        })
    }

    fn rewrite(&self, records: &[CredentialRecord]) -> Result<()> {
        let texts = records
            .iter()
            .map(|r| Ok((r.id.as_str(), text(r)?)))
            .collect::<Result<Vec<_>>>()?;
        self.writes.write(LOCK, |tx| {
            for (id, record) in &texts {
                let n = tx.execute(
                    "UPDATE m2mpki_in_credentials SET record = $2 WHERE id = $1",
                    &[id, record],
                )?;
                if n != 1 {
                    return Err(Error::Store(m2mpki_store::Error::new(
                        Kind::NotFound,
                        format!("credential {id} is not stored"),
                    ))
                    .into());
                }
            }
            Ok(())
        })
    }

    fn meta(&self, key: &str) -> Result<Option<String>> {
        self.reads().read(|tx| {
            let row = tx.query_opt("SELECT value FROM m2mpki_in_meta WHERE key = $1", &[&key])?;
            Ok(row.map(|r| col::<String>(&r, 0)).transpose()?)
        })
    }

    fn set_meta(&self, key: &str, value: &str) -> Result<()> {
        self.writes.write(LOCK, |tx| {
            tx.execute(
                "INSERT INTO m2mpki_in_meta (key, value) VALUES ($1, $2) \
                     ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
                &[&key, &value],
            )?;
            Ok(())
        })
    }

    fn meta_or_insert(&self, key: &str, value: &str) -> Result<String> {
        self.writes.write(LOCK, |tx| {
            tx.execute(
                "INSERT INTO m2mpki_in_meta (key, value) VALUES ($1, $2) \
                     ON CONFLICT (key) DO NOTHING",
                &[&key, &value],
            )?;
            let row = tx.query_one("SELECT value FROM m2mpki_in_meta WHERE key = $1", &[&key])?;
            Ok(col::<String>(&row, 0)?)
        })
    }

    fn change_grants(
        &self,
        identity: &FieldNodeIdentity,
        change: &dyn Fn(&mut BTreeSet<String>),
    ) -> Result<Vec<String>> {
        let key = identity.to_string();
        self.writes.write(LOCK, |tx| {
            let row = tx.query_opt(
                "SELECT grants FROM m2mpki_in_grants WHERE identity = $1",
                &[&key],
            )?;
            let mut set: BTreeSet<String> = row
                .map(|r| value(col(&r, 0)?))
                .transpose()?
                .unwrap_or_default();
            change(&mut set);
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
    }

    fn grants_of(&self, identity: &FieldNodeIdentity) -> Result<Vec<String>> {
        let key = identity.to_string();
        self.reads().single_prepared(
            "SELECT grants FROM m2mpki_in_grants WHERE identity = $1",
            |c, statement| {
                let row = c.query_opt(statement, &[&key])?;
                Ok(row
                    .map(|r| value(col(&r, 0)?))
                    .transpose()?
                    .unwrap_or_default())
            },
        )
    }

    fn all_grants(&self) -> Result<Vec<(String, Vec<String>)>> {
        self.reads().read(|tx| {
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
    }

    fn snapshot(&self) -> Result<Snapshot> {
        self.reads().read(|tx| {
            let mut s = Snapshot::default();
            for r in tx.query("SELECT record FROM m2mpki_in_credentials ORDER BY id", &[])? {
                s.records.push(value(col(&r, 0)?)?);
            }
            for r in tx.query(
                "SELECT identity, id FROM m2mpki_in_live ORDER BY identity",
                &[],
            )? {
                s.live.push((col(&r, 0)?, col(&r, 1)?));
            }
            for r in tx.query(
                "SELECT identity, grants FROM m2mpki_in_grants ORDER BY identity",
                &[],
            )? {
                s.grants.push((col(&r, 0)?, value(col(&r, 1)?)?));
            }
            for r in tx.query("SELECT key, value FROM m2mpki_in_meta ORDER BY key", &[])? {
                s.meta.push((col(&r, 0)?, col(&r, 1)?));
            }
            Ok(s)
        })
    }

    fn import(&self, snapshot: &Snapshot) -> Result<()> {
        self.writes
            .write(LOCK, |tx| {
                let used: i64 = tx
                    .query_one(
                        "SELECT (SELECT count(*) FROM m2mpki_in_credentials) \
                         + (SELECT count(*) FROM m2mpki_in_grants) \
                         + (SELECT count(*) FROM m2mpki_in_meta WHERE key <> 'schema_version')",
                        &[],
                    )
                    .map_err(Fail::from)
                    .and_then(|row| Ok(col(&row, 0)?))?;
                if used > 0 {
                    return Err(Error::Store(m2mpki_store::Error::new(
                        Kind::Conflict,
                        format!(
                        "the IN tables of {} are not empty ({used} records): refusing to copy into them",
                        self.writes.shown()
                    ),
                    ))
                    .into());
                }
                for r in &snapshot.records {
                    tx.execute(
                        "INSERT INTO m2mpki_in_credentials (id, identity, created, record) \
                         VALUES ($1, $2, $3, $4)",
                        &[&r.id, &r.identity.to_string(), &r.created, &text(r)?],
                    )?;
                }
                for (identity, id) in &snapshot.live {
                    tx.execute(
                        "INSERT INTO m2mpki_in_live (identity, id) VALUES ($1, $2)",
                        &[identity, id],
                    )?;
                }
                for (identity, set) in &snapshot.grants {
                    tx.execute(
                        "INSERT INTO m2mpki_in_grants (identity, grants) VALUES ($1, $2)",
                        &[identity, &text(set)?],
                    )?;
                }
                for (key, value) in snapshot.meta.iter().filter(|(k, _)| k != "schema_version") {
                    tx.execute(
                        "INSERT INTO m2mpki_in_meta (key, value) VALUES ($1, $2)",
                        &[key, value],
                    )?;
                }
                Ok(())
            })
    }
}
