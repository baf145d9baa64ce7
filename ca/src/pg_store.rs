//! The shared store: PostgreSQL, for several CA hosts (and, later, IN instances) on one ledger.
//!
//! Concurrency (docs/store.md): every change appends to the one hash-chained audit log, so
//! writes are a total order anyway. Each write transaction first takes one transaction-level
//! advisory lock (`pg_advisory_xact_lock`), then reads what it depends on (the live
//! certificate of a subject, the last audit entry, a root set) and writes. Under READ
//! COMMITTED every statement after the lock sees every write committed before it, so two
//! processes on two hosts behave as two writers of the embedded store do: serials are never
//! reused (also a primary key), a subject keeps one live certificate (also a primary key on
//! `(ca, subject_key)`), and the audit chain never forks (also a primary key on `seq`).
//! Readers take no lock. A transaction that fails with a serialization failure or deadlock is
//! retried from the start; a failed commit is never retried blind.

use std::collections::HashMap;

use crate::audit::{self, AuditEntry, AuditEvent};
use crate::rootset::RootSet;
use crate::serial::Serial;
use crate::store::{
    CaRecord, CertFilter, CertRecord, Item, NewCert, RecordOutcome, RevocationReason, RevokedEntry,
    Store,
};
use crate::{Error, Result};
use m2mpki_store::pg::{col, postgres, PgConn, Tx};

/// A transaction body that returns the CA's errors.
type TxResult<T> = m2mpki_store::pg::TxResult<T, Error>;

/// The schema this build writes; a database with a newer one is refused.
const SCHEMA_VERSION: i32 = 1;

/// The advisory lock key every writer holds for the length of its transaction
/// ("m2mpki" in ASCII).
const WRITE_LOCK: i64 = 0x6d_32_6d_70_6b_69;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS m2mpki_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS m2mpki_cas (name TEXT PRIMARY KEY, record TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS m2mpki_certs (
    serial BYTEA PRIMARY KEY,
    ca TEXT NOT NULL,
    subject_key TEXT NOT NULL,
    id TEXT,
    record TEXT NOT NULL,
    der BYTEA NOT NULL
);
CREATE INDEX IF NOT EXISTS m2mpki_certs_subject ON m2mpki_certs (subject_key);
CREATE INDEX IF NOT EXISTS m2mpki_certs_id ON m2mpki_certs (id);
CREATE TABLE IF NOT EXISTS m2mpki_live (
    ca TEXT NOT NULL,
    subject_key TEXT NOT NULL,
    serial BYTEA NOT NULL,
    PRIMARY KEY (ca, subject_key)
);
CREATE TABLE IF NOT EXISTS m2mpki_audit (seq BIGINT PRIMARY KEY, entry TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS m2mpki_root_sets (name TEXT PRIMARY KEY, record TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS m2mpki_revoked (
    ca TEXT NOT NULL,
    serial BYTEA NOT NULL,
    entry TEXT NOT NULL,
    PRIMARY KEY (ca, serial)
);
CREATE TABLE IF NOT EXISTS m2mpki_crl_numbers (ca TEXT PRIMARY KEY, n BIGINT NOT NULL);
";

/// The tables that hold data, for the emptiness check of an import.
const DATA_TABLES: &[&str] = &[
    "m2mpki_cas",
    "m2mpki_certs",
    "m2mpki_live",
    "m2mpki_audit",
    "m2mpki_root_sets",
    "m2mpki_revoked",
    "m2mpki_crl_numbers",
];

/// The PostgreSQL-backed [`Store`]. One connection, reopened when it breaks; calls from
/// several threads take turns.
pub struct PgStore {
    conn: PgConn,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore")
            .field("database", &self.conn.shown())
            .finish_non_exhaustive()
    }
}

fn to_json<T: serde::Serialize>(v: &T) -> Result<String> {
    serde_json::to_string(v).map_err(Error::internal)
}

fn from_json<T: serde::de::DeserializeOwned>(what: &str, text: &str) -> Result<T> {
    serde_json::from_str(text).map_err(|e| Error::Internal(format!("corrupt {what} record: {e}")))
}

fn i64_of(n: u64, what: &str) -> Result<i64> {
    i64::try_from(n).map_err(|_| Error::internal(format!("{what} {n} does not fit the database")))
}

impl PgStore {
    /// Connects to `url` (`postgres://user@host:port/db`, or key=value pairs), creating the
    /// schema when the database has none. A connect timeout of 5 s applies unless the URL
    /// sets one.
    pub fn open(url: &str) -> Result<Self> {
        let store = PgStore {
            conn: PgConn::new(url)?,
        };
        store
            .conn
            .ensure_schema(WRITE_LOCK, SCHEMA, "m2mpki_meta", SCHEMA_VERSION, "m2mpki")?;
        Ok(store)
    }

    /// Appends audit entries inside a write transaction (which holds the writers' lock).
    fn append_audit(tx: &mut Tx<'_>, events: Vec<AuditEvent>) -> TxResult<()> {
        if events.is_empty() {
            return Ok(());
        }
        let last = tx.query_opt(
            "SELECT seq, entry FROM m2mpki_audit ORDER BY seq DESC LIMIT 1",
            &[],
        )?;
        let (mut seq, mut prev) = match last {
            Some(row) => {
                let entry: AuditEntry = from_json("audit", col::<&str>(&row, 1)?)?;
                (entry.seq, entry.hash)
            }
            None => (0, audit::GENESIS.to_owned()),
        };
        let t = time::OffsetDateTime::now_utc().unix_timestamp();
        let (mut seqs, mut texts) = (Vec::with_capacity(events.len()), Vec::new());
        for event in events {
            seq += 1;
            let (hash, json) = audit::seal_json(seq, t, &event, &prev)?;
            seqs.push(i64_of(seq, "audit sequence")?);
            texts.push(String::from_utf8(json).map_err(Error::internal)?);
            prev = hash;
        }
        tx.execute(
            "INSERT INTO m2mpki_audit (seq, entry) SELECT * FROM UNNEST($1::BIGINT[], $2::TEXT[])",
            &[&seqs, &texts],
        )?;
        Ok(())
    }

    /// Test support: rewrites one audit entry's JSON in place, as an attacker with database
    /// access could. Only with the `test-support` feature.
    #[cfg(feature = "test-support")]
    pub fn tamper_audit_entry(&self, seq: u64, f: impl FnOnce(&mut AuditEntry)) -> Result<()> {
        let mut f = Some(f);
        self.conn.write(WRITE_LOCK, |tx| {
            let row = tx
                .query_opt(
                    "SELECT entry FROM m2mpki_audit WHERE seq = $1",
                    &[&i64_of(seq, "audit sequence")?],
                )?
                .ok_or_else(|| Error::corrupt(format!("no audit entry {seq}")))?;
            let mut entry: AuditEntry = from_json("audit", col::<&str>(&row, 0)?)?;
            if let Some(f) = f.take() {
                f(&mut entry);
            }
            tx.execute(
                "UPDATE m2mpki_audit SET entry = $2 WHERE seq = $1",
                &[&i64_of(seq, "audit sequence")?, &to_json(&entry)?],
            )?;
            Ok(())
        })
    }
}

fn cert_from_row(row: &postgres::Row) -> Result<CertRecord> {
    from_json("certificate", col::<&str>(row, 0)?)
}

impl Store for PgStore {
    fn backend(&self) -> String {
        self.conn.shown().to_owned()
    }

    fn create_ca(&self, ca: &CaRecord, event: AuditEvent) -> Result<()> {
        let json = to_json(ca)?;
        self.conn.write(WRITE_LOCK, |tx| {
            let n = tx.execute(
                "INSERT INTO m2mpki_cas (name, record) VALUES ($1, $2) ON CONFLICT DO NOTHING",
                &[&ca.name, &json],
            )?;
            if n == 0 {
                return Err(Error::CaExists(ca.name.clone()).into());
            }
            Self::append_audit(tx, vec![event.clone()])
        })
    }

    fn ca(&self, name: &str) -> Result<Option<CaRecord>> {
        self.conn.read(|tx| {
            let row = tx.query_opt("SELECT record FROM m2mpki_cas WHERE name = $1", &[&name])?;
            Ok(row
                .map(|r| from_json("CA", col::<&str>(&r, 0)?))
                .transpose()?)
        })
    }

    fn cas(&self) -> Result<Vec<CaRecord>> {
        self.conn.read(|tx| {
            let rows = tx.query("SELECT record FROM m2mpki_cas ORDER BY name", &[])?;
            Ok(rows
                .iter()
                .map(|r| from_json("CA", col::<&str>(r, 0)?))
                .collect::<Result<_>>()?)
        })
    }

    fn record_certs(&self, certs: &[NewCert], reissue: bool) -> Result<Vec<RecordOutcome>> {
        let jsons = certs
            .iter()
            .map(|c| to_json(&c.record))
            .collect::<Result<Vec<_>>>()?;
        // Set-based: a handful of statements per call however many certificates it carries
        // (one round trip per certificate made PostgreSQL a third as fast as redb).
        self.conn.write(WRITE_LOCK, |tx| {
            let mut live: HashMap<(&str, &str), Serial> = HashMap::new();
            if !reissue {
                let cas: Vec<&str> = certs.iter().map(|c| c.record.ca.as_str()).collect();
                let keys: Vec<&str> = certs
                    .iter()
                    .map(|c| c.record.subject_key.as_str())
                    .collect();
                let rows = tx.query(
                    "SELECT l.ca, l.subject_key, l.serial FROM m2mpki_live l \
                     JOIN UNNEST($1::TEXT[], $2::TEXT[]) AS q(ca, subject_key) \
                       ON l.ca = q.ca AND l.subject_key = q.subject_key",
                    &[&cas, &keys],
                )?;
                let found: HashMap<(&str, &str), Serial> = rows
                    .iter()
                    .map(|row| {
                        Ok((
                            (col::<&str>(row, 0)?, col::<&str>(row, 1)?),
                            Serial::from_bytes(col::<&[u8]>(row, 2)?),
                        ))
                    })
                    .collect::<Result<_>>()?;
                // Keyed by the certificates' own names, which outlive the rows.
                for c in certs {
                    let key = (c.record.ca.as_str(), c.record.subject_key.as_str());
                    if let Some(serial) = found.get(&key) {
                        live.insert(key, serial.clone());
                    }
                }
            }
            let mut outcomes = Vec::with_capacity(certs.len());
            let mut events = Vec::with_capacity(certs.len());
            let mut recorded: Vec<(&NewCert, &String)> = Vec::with_capacity(certs.len());
            for (cert, json) in certs.iter().zip(&jsons) {
                let r = &cert.record;
                let key = (r.ca.as_str(), r.subject_key.as_str());
                if !reissue {
                    if let Some(serial) = live.get(&key) {
                        outcomes.push(RecordOutcome::AlreadyLive(serial.clone()));
                        continue;
                    }
                }
                live.insert(key, r.serial.clone());
                recorded.push((cert, json));
                events.push(crate::store::issue_event(r, reissue));
                outcomes.push(RecordOutcome::Recorded);
            }
            if recorded.is_empty() {
                return Ok(outcomes);
            }
            let serials: Vec<&[u8]> = recorded
                .iter()
                .map(|(c, _)| c.record.serial.as_bytes())
                .collect();
            let cas: Vec<&str> = recorded.iter().map(|(c, _)| c.record.ca.as_str()).collect();
            let keys: Vec<&str> = recorded
                .iter()
                .map(|(c, _)| c.record.subject_key.as_str())
                .collect();
            let ids: Vec<Option<String>> = recorded
                .iter()
                .map(|(c, _)| {
                    c.record
                        .identity
                        .as_ref()
                        .map(|i| i.id().as_str().to_owned())
                })
                .collect();
            let records: Vec<&str> = recorded.iter().map(|(_, j)| j.as_str()).collect();
            let ders: Vec<&[u8]> = recorded.iter().map(|(c, _)| c.der.as_slice()).collect();
            let inserted = tx.execute(
                "INSERT INTO m2mpki_certs (serial, ca, subject_key, id, record, der) \
                 SELECT * FROM UNNEST($1::BYTEA[], $2::TEXT[], $3::TEXT[], $4::TEXT[], \
                                      $5::TEXT[], $6::BYTEA[]) \
                 ON CONFLICT DO NOTHING",
                &[&serials, &cas, &keys, &ids, &records, &ders],
            )?;
            // A serial is never reused: finding one in place aborts the whole transaction.
            if inserted != recorded.len() as u64 {
                let taken = tx.query(
                    "SELECT serial FROM m2mpki_certs WHERE serial = ANY($1) LIMIT 1",
                    &[&serials],
                )?;
                let which = match taken.first() {
                    Some(r) => Serial::from_bytes(col::<&[u8]>(r, 0)?).to_string(),
                    None => String::new(),
                };
                return Err(Error::Internal(format!(
                    "serial {which} exists already; nothing was recorded"
                ))
                .into());
            }
            // The live certificate of each subject: the last one of this call.
            let (live_cas, live_keys, live_serials): (Vec<&str>, Vec<&str>, Vec<&[u8]>) = {
                let mut last: HashMap<(&str, &str), &[u8]> = HashMap::new();
                let mut order = Vec::new();
                for (c, _) in &recorded {
                    let key = (c.record.ca.as_str(), c.record.subject_key.as_str());
                    if last.insert(key, c.record.serial.as_bytes()).is_none() {
                        order.push(key);
                    }
                }
                let mut out = (Vec::new(), Vec::new(), Vec::new());
                for key in order {
                    out.0.push(key.0);
                    out.1.push(key.1);
                    out.2.push(last[&key]);
                }
                out
            };
            tx.execute(
                "INSERT INTO m2mpki_live (ca, subject_key, serial) \
                 SELECT * FROM UNNEST($1::TEXT[], $2::TEXT[], $3::BYTEA[]) \
                 ON CONFLICT (ca, subject_key) DO UPDATE SET serial = EXCLUDED.serial",
                &[&live_cas, &live_keys, &live_serials],
            )?;
            Self::append_audit(tx, events)?;
            Ok(outcomes)
        })
    }

    fn live_cert(&self, ca: &str, subject_key: &str) -> Result<Option<Serial>> {
        self.conn.read(|tx| {
            let row = tx.query_opt(
                "SELECT serial FROM m2mpki_live WHERE ca = $1 AND subject_key = $2",
                &[&ca, &subject_key],
            )?;
            Ok(match row {
                Some(r) => Some(Serial::from_bytes(col::<&[u8]>(&r, 0)?)),
                None => None,
            })
        })
    }

    fn cert(&self, serial: &Serial) -> Result<Option<(CertRecord, Vec<u8>)>> {
        self.conn.read(|tx| {
            let row = tx.query_opt(
                "SELECT record, der FROM m2mpki_certs WHERE serial = $1",
                &[&serial.as_bytes()],
            )?;
            Ok(match row {
                Some(r) => Some((cert_from_row(&r)?, col::<Vec<u8>>(&r, 1)?)),
                None => None,
            })
        })
    }

    fn certs(&self, filter: &CertFilter) -> Result<Vec<CertRecord>> {
        self.conn.read(|tx| {
            let rows = tx.query(
                "SELECT record FROM m2mpki_certs \
                 WHERE ($1::TEXT IS NULL OR ca = $1) \
                   AND ($2::TEXT IS NULL OR subject_key = $2 OR id = $2) \
                 ORDER BY serial",
                &[&filter.ca, &filter.id],
            )?;
            Ok(rows.iter().map(cert_from_row).collect::<Result<Vec<_>>>()?)
        })
    }

    fn audit_log(&self, visit: &mut dyn FnMut(AuditEntry) -> Result<()>) -> Result<()> {
        // In pages, so a long log is not held in memory at once.
        const PAGE: i64 = 10_000;
        let mut after = 0i64;
        loop {
            let rows = self.conn.read(|tx| -> TxResult<_> {
                Ok(tx.query(
                    "SELECT seq, entry FROM m2mpki_audit WHERE seq > $1 ORDER BY seq LIMIT $2",
                    &[&after, &PAGE],
                )?)
            })?;
            for row in &rows {
                after = col(row, 0)?;
                visit(from_json("audit", col::<&str>(row, 1)?)?)?;
            }
            if (rows.len() as i64) < PAGE {
                return Ok(());
            }
        }
    }

    fn create_root_set(&self, set: &RootSet, event: AuditEvent) -> Result<()> {
        let json = to_json(set)?;
        self.conn.write(WRITE_LOCK, |tx| {
            let n = tx.execute(
                "INSERT INTO m2mpki_root_sets (name, record) VALUES ($1, $2) \
                 ON CONFLICT DO NOTHING",
                &[&set.name, &json],
            )?;
            if n == 0 {
                return Err(Error::RootSetExists(set.name.clone()).into());
            }
            Self::append_audit(tx, vec![event.clone()])
        })
    }

    fn root_set(&self, name: &str) -> Result<Option<RootSet>> {
        self.conn.read(|tx| {
            let row = tx.query_opt(
                "SELECT record FROM m2mpki_root_sets WHERE name = $1",
                &[&name],
            )?;
            Ok(row
                .map(|r| from_json("root set", col::<&str>(&r, 0)?))
                .transpose()?)
        })
    }

    fn root_sets(&self) -> Result<Vec<RootSet>> {
        self.conn.read(|tx| {
            let rows = tx.query("SELECT record FROM m2mpki_root_sets ORDER BY name", &[])?;
            Ok(rows
                .iter()
                .map(|r| from_json("root set", col::<&str>(r, 0)?))
                .collect::<Result<_>>()?)
        })
    }

    fn modify_root_set(
        &self,
        name: &str,
        change: &mut dyn FnMut(&mut RootSet) -> Result<AuditEvent>,
    ) -> Result<RootSet> {
        self.conn.write(WRITE_LOCK, |tx| {
            let row = tx.query_opt(
                "SELECT record FROM m2mpki_root_sets WHERE name = $1",
                &[&name],
            )?;
            let mut set: RootSet = match row {
                Some(r) => from_json("root set", col::<&str>(&r, 0)?)?,
                None => return Err(Error::UnknownRootSet(name.to_owned()).into()),
            };
            let event = change(&mut set)?;
            tx.execute(
                "UPDATE m2mpki_root_sets SET record = $2 WHERE name = $1",
                &[&name, &to_json(&set)?],
            )?;
            Self::append_audit(tx, vec![event])?;
            Ok(set)
        })
    }

    fn revoke(
        &self,
        ca: &str,
        serial: &Serial,
        reason: RevocationReason,
        at: i64,
    ) -> Result<CertRecord> {
        self.conn.write(WRITE_LOCK, |tx| {
            let row = tx.query_opt(
                "SELECT record FROM m2mpki_certs WHERE serial = $1",
                &[&serial.as_bytes()],
            )?;
            let mut record = match row {
                Some(r) => cert_from_row(&r)?,
                None => return Err(Error::CertNotFound(format!("with serial {serial}")).into()),
            };
            let (entry, event) = crate::store::revoke_record(&mut record, ca, serial, reason, at)?;
            tx.execute(
                "UPDATE m2mpki_certs SET record = $2 WHERE serial = $1",
                &[&serial.as_bytes(), &to_json(&record)?],
            )?;
            tx.execute(
                "INSERT INTO m2mpki_revoked (ca, serial, entry) VALUES ($1, $2, $3)",
                &[&ca, &serial.as_bytes(), &to_json(&entry)?],
            )?;
            tx.execute(
                "DELETE FROM m2mpki_live WHERE ca = $1 AND subject_key = $2 AND serial = $3",
                &[&ca, &record.subject_key, &serial.as_bytes()],
            )?;
            Self::append_audit(tx, vec![event])?;
            Ok(record)
        })
    }

    fn revoked(&self, ca: &str, visit: &mut dyn FnMut(RevokedEntry) -> Result<()>) -> Result<()> {
        let rows = self.conn.read(|tx| -> TxResult<_> {
            Ok(tx.query(
                "SELECT entry FROM m2mpki_revoked WHERE ca = $1 ORDER BY serial",
                &[&ca],
            )?)
        })?;
        for row in &rows {
            visit(from_json("revocation", col::<&str>(row, 0)?)?)?;
        }
        Ok(())
    }

    fn settle(&self) -> Result<()> {
        Ok(self.conn.settle(WRITE_LOCK)?)
    }

    fn next_crl_number(&self, ca: &str, detail: serde_json::Value) -> Result<u64> {
        self.conn.write(WRITE_LOCK, |tx| {
            let row = tx.query_one(
                "INSERT INTO m2mpki_crl_numbers (ca, n) VALUES ($1, 1) \
                 ON CONFLICT (ca) DO UPDATE SET n = m2mpki_crl_numbers.n + 1 RETURNING n",
                &[&ca],
            )?;
            let n = u64::try_from(col::<i64>(&row, 0)?)
                .map_err(|_| Error::corrupt("negative CRL number in the database"))?;
            Self::append_audit(tx, vec![crate::store::crl_event(ca, detail.clone(), n)])?;
            Ok(n)
        })
    }

    fn export(&self, visit: &mut dyn FnMut(Item) -> Result<()>) -> Result<()> {
        // One snapshot for everything, the audit log included: a copy taken while others
        // write must not log certificates it lacks, nor lag its CRL counters behind its log.
        // Large tables are read in pages, each query within the round-trip bound, all in the
        // same REPEATABLE READ transaction.
        const PAGE: i64 = 10_000;
        let items = self.conn.read(|tx| {
            let mut items = Vec::new();
            for r in tx.query("SELECT record FROM m2mpki_cas ORDER BY name", &[])? {
                items.push(Item::Ca(from_json("CA", col::<&str>(&r, 0)?)?));
            }
            let mut after: Vec<u8> = Vec::new();
            loop {
                let rows = tx.query(
                    "SELECT record, der, serial FROM m2mpki_certs WHERE serial > $1 \
                     ORDER BY serial LIMIT $2",
                    &[&after, &PAGE],
                )?;
                for r in &rows {
                    items.push(Item::Cert(NewCert {
                        record: cert_from_row(r)?,
                        der: col(r, 1)?,
                    }));
                    after = col(r, 2)?;
                }
                if (rows.len() as i64) < PAGE {
                    break;
                }
            }
            for r in tx.query(
                "SELECT ca, subject_key, serial FROM m2mpki_live ORDER BY ca, subject_key",
                &[],
            )? {
                items.push(Item::Live {
                    ca: col(&r, 0)?,
                    subject_key: col(&r, 1)?,
                    serial: Serial::from_bytes(col::<&[u8]>(&r, 2)?),
                });
            }
            for r in tx.query(
                "SELECT ca, entry FROM m2mpki_revoked ORDER BY ca, serial",
                &[],
            )? {
                items.push(Item::Revoked {
                    ca: col(&r, 0)?,
                    entry: from_json("revocation", col::<&str>(&r, 1)?)?,
                });
            }
            for r in tx.query("SELECT ca, n FROM m2mpki_crl_numbers ORDER BY ca", &[])? {
                let n: i64 = col(&r, 1)?;
                items.push(Item::CrlNumber {
                    ca: col(&r, 0)?,
                    last: u64::try_from(n).unwrap_or(0),
                });
            }
            for r in tx.query("SELECT record FROM m2mpki_root_sets ORDER BY name", &[])? {
                items.push(Item::RootSet(from_json("root set", col::<&str>(&r, 0)?)?));
            }
            let mut after = 0i64;
            loop {
                let rows = tx.query(
                    "SELECT seq, entry FROM m2mpki_audit WHERE seq > $1 ORDER BY seq LIMIT $2",
                    &[&after, &PAGE],
                )?;
                for r in &rows {
                    after = col(r, 0)?;
                    items.push(Item::Audit(from_json("audit", col::<&str>(r, 1)?)?));
                }
                if (rows.len() as i64) < PAGE {
                    break;
                }
            }
            Ok(items)
        })?;
        for item in items {
            visit(item)?;
        }
        Ok(())
    }

    fn import(&self, items: &mut dyn Iterator<Item = Result<Item>>) -> Result<u64> {
        // One transaction: a migration lands whole or not at all.
        let mut items = Some(items);
        self.conn.write(WRITE_LOCK, |tx| {
            for table in DATA_TABLES {
                let row = tx.query_one(&format!("SELECT EXISTS (SELECT 1 FROM {table})"), &[])?;
                if col::<bool>(&row, 0)? {
                    return Err(Error::Policy(
                        "the destination store is not empty (table {table}); a migration only \
                         runs into an empty one"
                            .replace("{table}", table),
                    )
                    .into());
                }
            }
            let Some(items) = items.take() else {
                return Err(Error::internal("an import ran twice").into());
            };
            let mut n = 0u64;
            for item in items {
                n += 1;
                match item? {
                    Item::Ca(ca) => {
                        tx.execute(
                            "INSERT INTO m2mpki_cas (name, record) VALUES ($1, $2)",
                            &[&ca.name, &to_json(&ca)?],
                        )?;
                    }
                    Item::Cert(cert) => {
                        let r = &cert.record;
                        tx.execute(
                            "INSERT INTO m2mpki_certs (serial, ca, subject_key, id, record, der) \
                             VALUES ($1, $2, $3, $4, $5, $6)",
                            &[
                                &r.serial.as_bytes(),
                                &r.ca,
                                &r.subject_key,
                                &r.identity.as_ref().map(|i| i.id().as_str().to_owned()),
                                &to_json(r)?,
                                &cert.der.as_slice(),
                            ],
                        )?;
                    }
                    Item::Live {
                        ca,
                        subject_key,
                        serial,
                    } => {
                        tx.execute(
                            "INSERT INTO m2mpki_live (ca, subject_key, serial) VALUES ($1, $2, $3)",
                            &[&ca, &subject_key, &serial.as_bytes()],
                        )?;
                    }
                    Item::Revoked { ca, entry } => {
                        tx.execute(
                            "INSERT INTO m2mpki_revoked (ca, serial, entry) VALUES ($1, $2, $3)",
                            &[&ca, &entry.serial.as_bytes(), &to_json(&entry)?],
                        )?;
                    }
                    Item::CrlNumber { ca, last } => {
                        tx.execute(
                            "INSERT INTO m2mpki_crl_numbers (ca, n) VALUES ($1, $2)",
                            &[&ca, &i64_of(last, "CRL number")?],
                        )?;
                    }
                    Item::RootSet(set) => {
                        tx.execute(
                            "INSERT INTO m2mpki_root_sets (name, record) VALUES ($1, $2)",
                            &[&set.name, &to_json(&set)?],
                        )?;
                    }
                    Item::Audit(entry) => {
                        tx.execute(
                            "INSERT INTO m2mpki_audit (seq, entry) VALUES ($1, $2)",
                            &[&i64_of(entry.seq, "audit sequence")?, &to_json(&entry)?],
                        )?;
                    }
                }
            }
            Ok(n)
        })
    }
}
