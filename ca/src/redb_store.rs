//! The embedded store: one redb file under the home folder.

use std::path::{Path, PathBuf};

use redb::{
    Database, MultimapTableDefinition, ReadableDatabase, ReadableTable, ReadableTableMetadata,
    TableDefinition,
};

use crate::audit::{self, AuditEntry, AuditEvent};
use crate::rootset::RootSet;
use crate::serial::Serial;
use crate::store::{CaRecord, RevocationReason, RevokedEntry};
use crate::store::{CertFilter, CertRecord, Item, NewCert, RecordOutcome, Store};
use crate::{Error, Result};

const CAS: TableDefinition<&str, &[u8]> = TableDefinition::new("cas");
const CERTS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("certs");
const CERT_DER: TableDefinition<&[u8], &[u8]> = TableDefinition::new("cert_der");
/// "<ca>\x1f<subject key>" -> serial of the live certificate.
const LIVE: TableDefinition<&str, &[u8]> = TableDefinition::new("live");
/// pre-provisioned ID / subject key -> serials.
const BY_ID: MultimapTableDefinition<&str, &[u8]> = MultimapTableDefinition::new("by_id");
const AUDIT: TableDefinition<u64, &[u8]> = TableDefinition::new("audit");
const ROOT_SETS: TableDefinition<&str, &[u8]> = TableDefinition::new("root_sets");
/// "<ca>\x1f<serial hex>" -> revoked entry.
const REVOKED: TableDefinition<&str, &[u8]> = TableDefinition::new("revoked");
const CRL_NUMBERS: TableDefinition<&str, u64> = TableDefinition::new("crl_numbers");

std::thread_local! {
    /// Set while [`guarded`] runs on this thread: the panic hook stays quiet.
    static GUARDED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Installs a panic hook that keeps quiet about the panics [`guarded`] turns into errors (redb
/// panics on some damaged files) and reports every other panic as before. Call once, early.
pub fn quiet_guarded_panics() {
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if !GUARDED.with(std::cell::Cell::get) {
            previous(info);
        }
    }));
}

/// Runs `f` on the redb file `path`; a panic inside (redb meeting a damaged file) becomes a
/// storage error naming the file instead of ending the process.
pub fn guarded<T>(path: &Path, f: impl FnOnce() -> Result<T>) -> Result<T> {
    let was = GUARDED.with(|g| g.replace(true));
    let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    GUARDED.with(|g| g.set(was));
    out.unwrap_or_else(|panic| {
        let what = panic
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "no message".into());
        Err(damaged(path, &what))
    })
}

fn damaged(path: &Path, what: &str) -> Error {
    Error::corrupt(format!(
        "{}: the store file is damaged ({what}); restore it from a backup",
        path.display()
    ))
}

/// Opens the redb file `path` (multi-writer), creating it when it does not exist. An existing
/// file of zero bytes is refused: it is what a lost or truncated store looks like, and taking
/// it for a new, empty one would forget every record (remove it to start an empty store).
/// A panic of redb on a damaged file becomes an error naming the file.
pub fn open_database(path: &Path) -> Result<Database> {
    if path.exists() {
        refuse_empty(path)?;
    }
    m2mpki_hsm::files::ensure_private_file(path)?;
    guarded(path, || {
        redb::Builder::new()
            .set_concurrency_mode(redb::ConcurrencyMode::MultiWriter)
            .create(path)
            .map_err(|e| match e {
                redb::DatabaseError::DatabaseAlreadyOpen => Error::StoreLocked(path.to_owned()),
                e => Error::unavailable(format!("{}: {e}", path.display())),
            })
    })
}

/// Refuses an existing file of zero bytes. A process creating the file right now makes it
/// non-empty within milliseconds; a few short waits tell that apart from a damaged store.
fn refuse_empty(path: &Path) -> Result<()> {
    for wait in [0u64, 20, 50, 100] {
        std::thread::sleep(std::time::Duration::from_millis(wait));
        match std::fs::metadata(path) {
            Ok(m) if m.len() > 0 => return Ok(()),
            Ok(_) => {}
            Err(e) => return Err(Error::unavailable(format!("{}: {e}", path.display()))),
        }
    }
    Err(Error::corrupt(format!(
        "{}: the store file is empty (0 bytes): a lost or truncated store; restore it from a \
         backup, or remove it to start an empty store",
        path.display()
    )))
}

/// The redb-backed [`Store`].
pub struct RedbStore {
    db: Database,
    path: PathBuf,
}

impl std::fmt::Debug for RedbStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedbStore")
            .field("path", &self.path)
            .finish()
    }
}

fn db_err(e: impl std::fmt::Display) -> Error {
    Error::unavailable(e.to_string())
}

fn to_json<T: serde::Serialize>(v: &T) -> Result<Vec<u8>> {
    serde_json::to_vec(v).map_err(Error::internal)
}

fn from_json<T: serde::de::DeserializeOwned>(what: &str, bytes: &[u8]) -> Result<T> {
    serde_json::from_slice(bytes).map_err(|e| Error::corrupt(format!("corrupt {what} record: {e}")))
}

fn live_key(ca: &str, subject_key: &str) -> String {
    format!("{ca}\x1f{subject_key}")
}

/// Splits a "<ca>\x1f<rest>" key.
fn split_key(what: &str, key: &str) -> Result<(String, String)> {
    key.split_once('\x1f')
        .map(|(a, b)| (a.to_owned(), b.to_owned()))
        .ok_or_else(|| Error::corrupt(format!("corrupt {what} key {key:?}")))
}

fn now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

impl RedbStore {
    /// Opens (creating if needed) the store at `path`.
    pub fn open(path: &Path) -> Result<Self> {
        let db = open_database(path)?;
        let store = RedbStore {
            db,
            path: path.to_owned(),
        };
        // Create the tables so readers never meet a missing one.
        guarded(path, || store.create_tables())?;
        Ok(store)
    }

    fn create_tables(&self) -> Result<()> {
        let store = self;
        let tx = store.db.begin_write().map_err(db_err)?;
        tx.open_table(CAS).map_err(db_err)?;
        tx.open_table(CERTS).map_err(db_err)?;
        tx.open_table(CERT_DER).map_err(db_err)?;
        tx.open_table(LIVE).map_err(db_err)?;
        tx.open_multimap_table(BY_ID).map_err(db_err)?;
        tx.open_table(AUDIT).map_err(db_err)?;
        tx.open_table(ROOT_SETS).map_err(db_err)?;
        tx.open_table(REVOKED).map_err(db_err)?;
        tx.open_table(CRL_NUMBERS).map_err(db_err)?;
        tx.commit().map_err(db_err)
    }

    /// Commits `tx`. A storage error here (an I/O error while the commit is written, a full
    /// disk) leaves it open whether the file holds the commit: [`Error::CommitUnknown`].
    fn commit(&self, tx: redb::WriteTransaction) -> Result<()> {
        tx.commit().map_err(|e| match e {
            redb::CommitError::Storage(e) => {
                Error::commit_unknown(format!("{}: {e}", self.path.display()))
            }
            e => db_err(e),
        })
    }

    /// Appends audit entries inside a write transaction.
    fn append_audit(tx: &redb::WriteTransaction, events: Vec<AuditEvent>) -> Result<()> {
        let mut table = tx.open_table(AUDIT).map_err(db_err)?;
        let (mut seq, mut prev) = match table.last().map_err(db_err)? {
            Some((k, v)) => {
                let last: AuditEntry = from_json("audit", v.value())?;
                (k.value(), last.hash)
            }
            None => (0, audit::GENESIS.to_owned()),
        };
        let t = now();
        for event in events {
            seq += 1;
            let (hash, json) = audit::seal_json(seq, t, &event, &prev)?;
            table.insert(seq, json.as_slice()).map_err(db_err)?;
            prev = hash;
        }
        Ok(())
    }

    /// Benchmark support: records revocations of `ca` in bulk (100 000 per transaction),
    /// without certificate records or audit entries, to build CRLs of a given size.
    #[doc(hidden)]
    pub fn bulk_insert_revoked(&self, ca: &str, entries: &[RevokedEntry]) -> Result<()> {
        for chunk in entries.chunks(100_000) {
            let tx = self.db.begin_write().map_err(db_err)?;
            {
                let mut t = tx.open_table(REVOKED).map_err(db_err)?;
                for e in chunk {
                    t.insert(
                        format!("{ca}\x1f{}", e.serial).as_str(),
                        to_json(e)?.as_slice(),
                    )
                    .map_err(db_err)?;
                }
            }
            tx.commit().map_err(db_err)?;
        }
        Ok(())
    }

    /// Test support: rewrites one audit entry's JSON in place, as an attacker with file
    /// access could. Used to prove that `audit verify` notices. Only with the `test-support`
    /// feature.
    #[cfg(feature = "test-support")]
    pub fn tamper_audit_entry(&self, seq: u64, f: impl FnOnce(&mut AuditEntry)) -> Result<()> {
        let tx = self.db.begin_write().map_err(db_err)?;
        {
            let mut table = tx.open_table(AUDIT).map_err(db_err)?;
            let mut entry: AuditEntry = match table.get(seq).map_err(db_err)? {
                Some(v) => from_json("audit", v.value())?,
                None => return Err(Error::corrupt(format!("no audit entry {seq}"))),
            };
            f(&mut entry);
            table
                .insert(seq, to_json(&entry)?.as_slice())
                .map_err(db_err)?;
        }
        tx.commit().map_err(db_err)
    }
}

impl Store for RedbStore {
    fn backend(&self) -> String {
        format!("redb:{}", self.path.display())
    }

    fn create_ca(&self, ca: &CaRecord, event: AuditEvent) -> Result<()> {
        let tx = self.db.begin_write().map_err(db_err)?;
        {
            let mut table = tx.open_table(CAS).map_err(db_err)?;
            if table.get(ca.name.as_str()).map_err(db_err)?.is_some() {
                return Err(Error::CaExists(ca.name.clone()));
            }
            table
                .insert(ca.name.as_str(), to_json(ca)?.as_slice())
                .map_err(db_err)?;
        }
        Self::append_audit(&tx, vec![event])?;
        self.commit(tx)
    }

    fn ca(&self, name: &str) -> Result<Option<CaRecord>> {
        let tx = self.db.begin_read().map_err(db_err)?;
        let table = tx.open_table(CAS).map_err(db_err)?;
        let value = table.get(name).map_err(db_err)?;
        value.map(|v| from_json("CA", v.value())).transpose()
    }

    fn cas(&self) -> Result<Vec<CaRecord>> {
        let tx = self.db.begin_read().map_err(db_err)?;
        let table = tx.open_table(CAS).map_err(db_err)?;
        let mut out = Vec::new();
        for row in table.iter().map_err(db_err)? {
            let (_, v) = row.map_err(db_err)?;
            out.push(from_json("CA", v.value())?);
        }
        Ok(out)
    }

    fn record_certs(&self, certs: &[NewCert], reissue: bool) -> Result<Vec<RecordOutcome>> {
        let tx = self.db.begin_write().map_err(db_err)?;
        let mut outcomes = Vec::with_capacity(certs.len());
        let mut events = Vec::with_capacity(certs.len());
        {
            let mut records = tx.open_table(CERTS).map_err(db_err)?;
            let mut ders = tx.open_table(CERT_DER).map_err(db_err)?;
            let mut live = tx.open_table(LIVE).map_err(db_err)?;
            let mut by_id = tx.open_multimap_table(BY_ID).map_err(db_err)?;
            for cert in certs {
                let r = &cert.record;
                let serial = r.serial.as_bytes();
                let lk = live_key(&r.ca, &r.subject_key);
                if !reissue {
                    if let Some(existing) = live.get(lk.as_str()).map_err(db_err)? {
                        outcomes.push(RecordOutcome::AlreadyLive(Serial::from_bytes(
                            existing.value(),
                        )));
                        continue;
                    }
                }
                // A serial is never reused: finding one in place aborts the whole transaction.
                if records
                    .insert(serial, to_json(r)?.as_slice())
                    .map_err(db_err)?
                    .is_some()
                {
                    return Err(Error::Internal(format!(
                        "serial {} exists already; nothing was recorded",
                        r.serial
                    )));
                }
                ders.insert(serial, cert.der.as_slice()).map_err(db_err)?;
                live.insert(lk.as_str(), serial).map_err(db_err)?;
                by_id
                    .insert(r.subject_key.as_str(), serial)
                    .map_err(db_err)?;
                if let Some(identity) = &r.identity {
                    by_id
                        .insert(identity.id().as_str(), serial)
                        .map_err(db_err)?;
                }
                events.push(crate::store::issue_event(r, reissue));
                outcomes.push(RecordOutcome::Recorded);
            }
        }
        Self::append_audit(&tx, events)?;
        self.commit(tx)?;
        Ok(outcomes)
    }

    fn live_cert(&self, ca: &str, subject_key: &str) -> Result<Option<Serial>> {
        let tx = self.db.begin_read().map_err(db_err)?;
        let live = tx.open_table(LIVE).map_err(db_err)?;
        let value = live
            .get(live_key(ca, subject_key).as_str())
            .map_err(db_err)?;
        Ok(value.map(|v| Serial::from_bytes(v.value())))
    }

    fn cert(&self, serial: &Serial) -> Result<Option<(CertRecord, Vec<u8>)>> {
        let tx = self.db.begin_read().map_err(db_err)?;
        let records = tx.open_table(CERTS).map_err(db_err)?;
        let ders = tx.open_table(CERT_DER).map_err(db_err)?;
        let Some(rec) = records.get(serial.as_bytes()).map_err(db_err)? else {
            return Ok(None);
        };
        let record: CertRecord = from_json("certificate", rec.value())?;
        let der = ders
            .get(serial.as_bytes())
            .map_err(db_err)?
            .ok_or_else(|| Error::corrupt(format!("certificate {serial} has no DER")))?
            .value()
            .to_vec();
        Ok(Some((record, der)))
    }

    fn certs(&self, filter: &CertFilter) -> Result<Vec<CertRecord>> {
        let tx = self.db.begin_read().map_err(db_err)?;
        let records = tx.open_table(CERTS).map_err(db_err)?;
        let keep = |r: &CertRecord| filter.ca.as_ref().is_none_or(|ca| &r.ca == ca);
        let mut out = Vec::new();
        if let Some(id) = &filter.id {
            let by_id = tx.open_multimap_table(BY_ID).map_err(db_err)?;
            for serial in by_id.get(id.as_str()).map_err(db_err)? {
                let serial = serial.map_err(db_err)?;
                if let Some(v) = records.get(serial.value()).map_err(db_err)? {
                    let r: CertRecord = from_json("certificate", v.value())?;
                    if keep(&r) {
                        out.push(r);
                    }
                }
            }
            out.sort_by(|a, b| a.serial.cmp(&b.serial));
            return Ok(out);
        }
        for row in records.iter().map_err(db_err)? {
            let (_, v) = row.map_err(db_err)?;
            let r: CertRecord = from_json("certificate", v.value())?;
            if keep(&r) {
                out.push(r);
            }
        }
        Ok(out)
    }

    fn audit_log(&self, visit: &mut dyn FnMut(AuditEntry) -> Result<()>) -> Result<()> {
        let tx = self.db.begin_read().map_err(db_err)?;
        let table = tx.open_table(AUDIT).map_err(db_err)?;
        for row in table.iter().map_err(db_err)? {
            let (_, v) = row.map_err(db_err)?;
            visit(from_json("audit", v.value())?)?;
        }
        Ok(())
    }

    fn create_root_set(&self, set: &RootSet, event: AuditEvent) -> Result<()> {
        let tx = self.db.begin_write().map_err(db_err)?;
        {
            let mut table = tx.open_table(ROOT_SETS).map_err(db_err)?;
            if table.get(set.name.as_str()).map_err(db_err)?.is_some() {
                return Err(Error::RootSetExists(set.name.clone()));
            }
            table
                .insert(set.name.as_str(), to_json(set)?.as_slice())
                .map_err(db_err)?;
        }
        Self::append_audit(&tx, vec![event])?;
        self.commit(tx)
    }

    fn root_set(&self, name: &str) -> Result<Option<RootSet>> {
        let tx = self.db.begin_read().map_err(db_err)?;
        let table = tx.open_table(ROOT_SETS).map_err(db_err)?;
        let value = table.get(name).map_err(db_err)?;
        value.map(|v| from_json("root set", v.value())).transpose()
    }

    fn root_sets(&self) -> Result<Vec<RootSet>> {
        let tx = self.db.begin_read().map_err(db_err)?;
        let table = tx.open_table(ROOT_SETS).map_err(db_err)?;
        let mut out = Vec::new();
        for row in table.iter().map_err(db_err)? {
            let (_, v) = row.map_err(db_err)?;
            out.push(from_json("root set", v.value())?);
        }
        Ok(out)
    }

    fn modify_root_set(
        &self,
        name: &str,
        change: &mut dyn FnMut(&mut RootSet) -> Result<AuditEvent>,
    ) -> Result<RootSet> {
        let tx = self.db.begin_write().map_err(db_err)?;
        let set = {
            let mut table = tx.open_table(ROOT_SETS).map_err(db_err)?;
            let mut set: RootSet = match table.get(name).map_err(db_err)? {
                Some(v) => from_json("root set", v.value())?,
                None => return Err(Error::UnknownRootSet(name.to_owned())),
            };
            let event = change(&mut set)?;
            table
                .insert(name, to_json(&set)?.as_slice())
                .map_err(db_err)?;
            Self::append_audit(&tx, vec![event])?;
            set
        };
        self.commit(tx)?;
        Ok(set)
    }

    fn revoke(
        &self,
        ca: &str,
        serial: &Serial,
        reason: RevocationReason,
        at: i64,
    ) -> Result<CertRecord> {
        let tx = self.db.begin_write().map_err(db_err)?;
        let record = {
            let mut records = tx.open_table(CERTS).map_err(db_err)?;
            let mut record: CertRecord = match records.get(serial.as_bytes()).map_err(db_err)? {
                Some(v) => from_json("certificate", v.value())?,
                None => return Err(Error::CertNotFound(format!("with serial {serial}"))),
            };
            let (entry, event) = crate::store::revoke_record(&mut record, ca, serial, reason, at)?;
            records
                .insert(serial.as_bytes(), to_json(&record)?.as_slice())
                .map_err(db_err)?;
            tx.open_table(REVOKED)
                .map_err(db_err)?
                .insert(
                    format!("{ca}\x1f{serial}").as_str(),
                    to_json(&entry)?.as_slice(),
                )
                .map_err(db_err)?;
            let mut live = tx.open_table(LIVE).map_err(db_err)?;
            let lk = live_key(ca, &record.subject_key);
            let is_live = live
                .get(lk.as_str())
                .map_err(db_err)?
                .is_some_and(|v| v.value() == serial.as_bytes());
            if is_live {
                live.remove(lk.as_str()).map_err(db_err)?;
            }
            (record, event)
        };
        let (record, event) = record;
        Self::append_audit(&tx, vec![event])?;
        self.commit(tx)?;
        Ok(record)
    }

    fn revoked(&self, ca: &str, visit: &mut dyn FnMut(RevokedEntry) -> Result<()>) -> Result<()> {
        let tx = self.db.begin_read().map_err(db_err)?;
        let table = tx.open_table(REVOKED).map_err(db_err)?;
        let (from, to) = (format!("{ca}\x1f"), format!("{ca}\x20"));
        for row in table
            .range::<&str>(from.as_str()..to.as_str())
            .map_err(db_err)?
        {
            let (_, v) = row.map_err(db_err)?;
            visit(from_json("revocation", v.value())?)?;
        }
        Ok(())
    }

    fn next_crl_number(&self, ca: &str, detail: serde_json::Value) -> Result<u64> {
        let tx = self.db.begin_write().map_err(db_err)?;
        let n = {
            let mut table = tx.open_table(CRL_NUMBERS).map_err(db_err)?;
            let n = table.get(ca).map_err(db_err)?.map_or(0, |v| v.value()) + 1;
            table.insert(ca, n).map_err(db_err)?;
            n
        };
        Self::append_audit(&tx, vec![crate::store::crl_event(ca, detail, n)])?;
        self.commit(tx)?;
        Ok(n)
    }

    fn export(&self, visit: &mut dyn FnMut(Item) -> Result<()>) -> Result<()> {
        // One read transaction: a consistent snapshot of everything.
        let tx = self.db.begin_read().map_err(db_err)?;
        for row in tx.open_table(CAS).map_err(db_err)?.iter().map_err(db_err)? {
            let (_, v) = row.map_err(db_err)?;
            visit(Item::Ca(from_json("CA", v.value())?))?;
        }
        let ders = tx.open_table(CERT_DER).map_err(db_err)?;
        for row in tx
            .open_table(CERTS)
            .map_err(db_err)?
            .iter()
            .map_err(db_err)?
        {
            let (k, v) = row.map_err(db_err)?;
            let record: CertRecord = from_json("certificate", v.value())?;
            let der = ders
                .get(k.value())
                .map_err(db_err)?
                .ok_or_else(|| Error::corrupt(format!("certificate {} has no DER", record.serial)))?
                .value()
                .to_vec();
            visit(Item::Cert(NewCert { record, der }))?;
        }
        for row in tx
            .open_table(LIVE)
            .map_err(db_err)?
            .iter()
            .map_err(db_err)?
        {
            let (k, v) = row.map_err(db_err)?;
            let (ca, subject_key) = split_key("live", k.value())?;
            visit(Item::Live {
                ca,
                subject_key,
                serial: Serial::from_bytes(v.value()),
            })?;
        }
        for row in tx
            .open_table(REVOKED)
            .map_err(db_err)?
            .iter()
            .map_err(db_err)?
        {
            let (k, v) = row.map_err(db_err)?;
            let (ca, _) = split_key("revocation", k.value())?;
            visit(Item::Revoked {
                ca,
                entry: from_json("revocation", v.value())?,
            })?;
        }
        let numbers = tx.open_table(CRL_NUMBERS).map_err(db_err)?;
        for row in numbers.iter().map_err(db_err)? {
            let (k, v) = row.map_err(db_err)?;
            visit(Item::CrlNumber {
                ca: k.value().to_owned(),
                last: v.value(),
            })?;
        }
        let sets = tx.open_table(ROOT_SETS).map_err(db_err)?;
        for row in sets.iter().map_err(db_err)? {
            let (_, v) = row.map_err(db_err)?;
            visit(Item::RootSet(from_json("root set", v.value())?))?;
        }
        for row in tx
            .open_table(AUDIT)
            .map_err(db_err)?
            .iter()
            .map_err(db_err)?
        {
            let (_, v) = row.map_err(db_err)?;
            visit(Item::Audit(from_json("audit", v.value())?))?;
        }
        Ok(())
    }

    fn import(&self, items: &mut dyn Iterator<Item = Result<Item>>) -> Result<u64> {
        let tx = self.db.begin_write().map_err(db_err)?;
        let n = {
            let mut cas = tx.open_table(CAS).map_err(db_err)?;
            let mut certs = tx.open_table(CERTS).map_err(db_err)?;
            let mut ders = tx.open_table(CERT_DER).map_err(db_err)?;
            let mut live = tx.open_table(LIVE).map_err(db_err)?;
            let mut by_id = tx.open_multimap_table(BY_ID).map_err(db_err)?;
            let mut audit = tx.open_table(AUDIT).map_err(db_err)?;
            let mut sets = tx.open_table(ROOT_SETS).map_err(db_err)?;
            let mut revoked = tx.open_table(REVOKED).map_err(db_err)?;
            let mut numbers = tx.open_table(CRL_NUMBERS).map_err(db_err)?;
            let empty = cas.is_empty().map_err(db_err)?
                && certs.is_empty().map_err(db_err)?
                && audit.is_empty().map_err(db_err)?
                && sets.is_empty().map_err(db_err)?
                && revoked.is_empty().map_err(db_err)?
                && numbers.is_empty().map_err(db_err)?;
            if !empty {
                return Err(Error::Policy(format!(
                    "the destination store {} is not empty; a migration only runs into an empty one",
                    self.path.display()
                )));
            }
            let mut n = 0u64;
            for item in items {
                n += 1;
                match item? {
                    Item::Ca(ca) => {
                        cas.insert(ca.name.as_str(), to_json(&ca)?.as_slice())
                            .map_err(db_err)?;
                    }
                    Item::Cert(cert) => {
                        let r = &cert.record;
                        let serial = r.serial.as_bytes();
                        certs
                            .insert(serial, to_json(r)?.as_slice())
                            .map_err(db_err)?;
                        ders.insert(serial, cert.der.as_slice()).map_err(db_err)?;
                        by_id
                            .insert(r.subject_key.as_str(), serial)
                            .map_err(db_err)?;
                        if let Some(identity) = &r.identity {
                            by_id
                                .insert(identity.id().as_str(), serial)
                                .map_err(db_err)?;
                        }
                    }
                    Item::Live {
                        ca,
                        subject_key,
                        serial,
                    } => {
                        live.insert(live_key(&ca, &subject_key).as_str(), serial.as_bytes())
                            .map_err(db_err)?;
                    }
                    Item::Revoked { ca, entry } => {
                        revoked
                            .insert(
                                format!("{ca}\x1f{}", entry.serial).as_str(),
                                to_json(&entry)?.as_slice(),
                            )
                            .map_err(db_err)?;
                    }
                    Item::CrlNumber { ca, last } => {
                        numbers.insert(ca.as_str(), last).map_err(db_err)?;
                    }
                    Item::RootSet(set) => {
                        sets.insert(set.name.as_str(), to_json(&set)?.as_slice())
                            .map_err(db_err)?;
                    }
                    Item::Audit(entry) => {
                        audit
                            .insert(entry.seq, to_json(&entry)?.as_slice())
                            .map_err(db_err)?;
                    }
                }
            }
            n
        };
        self.commit(tx)?;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profile::ProfileKind;
    use crate::store::CertStatus;

    fn new_cert(subject_key: &str, serial: Serial) -> NewCert {
        NewCert {
            record: CertRecord {
                serial,
                ca: "ca".into(),
                profile: ProfileKind::Device,
                subject_key: subject_key.into(),
                identity: None,
                subject: format!("CN={subject_key}"),
                not_before: 0,
                not_after: 1,
                issued_at: 0,
                sha256: String::new(),
                status: CertStatus::Valid,
                revoked_at: None,
                revocation_reason: None,
                requested_by: None,
            },
            der: vec![0x30, 0],
        }
    }

    fn audit_len(store: &RedbStore) -> usize {
        let mut n = 0;
        store
            .audit_log(&mut |_| {
                n += 1;
                Ok(())
            })
            .unwrap();
        n
    }

    #[test]
    fn a_reused_serial_aborts_the_whole_chunk() {
        let dir = tempfile::tempdir().unwrap();
        let store = RedbStore::open(&dir.path().join("store.redb")).unwrap();
        let taken = Serial::random().unwrap();
        store
            .record_certs(&[new_cert("first", taken.clone())], false)
            .unwrap();
        let audit_before = audit_len(&store);
        let fresh = Serial::random().unwrap();
        let err = store
            .record_certs(
                &[
                    new_cert("second", fresh.clone()),
                    new_cert("third", taken.clone()),
                ],
                true,
            )
            .unwrap_err();
        assert!(err.to_string().contains("exists already"), "{err}");
        // Nothing of the chunk is recorded, the first certificate is untouched.
        assert!(store.cert(&fresh).unwrap().is_none());
        assert_eq!(store.live_cert("ca", "second").unwrap(), None);
        assert_eq!(store.live_cert("ca", "third").unwrap(), None);
        let (first, _) = store.cert(&taken).unwrap().unwrap();
        assert_eq!(first.subject_key, "first");
        assert_eq!(audit_len(&store), audit_before);
    }

    #[test]
    fn a_live_subject_is_reported_not_reissued() {
        let dir = tempfile::tempdir().unwrap();
        let store = RedbStore::open(&dir.path().join("store.redb")).unwrap();
        let first = Serial::random().unwrap();
        store
            .record_certs(&[new_cert("dev", first.clone())], false)
            .unwrap();
        let second = Serial::random().unwrap();
        let outcomes = store
            .record_certs(&[new_cert("dev", second.clone())], false)
            .unwrap();
        assert_eq!(outcomes, [RecordOutcome::AlreadyLive(first.clone())]);
        assert!(store.cert(&second).unwrap().is_none());
        store
            .record_certs(&[new_cert("dev", second.clone())], true)
            .unwrap();
        assert_eq!(store.live_cert("ca", "dev").unwrap(), Some(second));
    }
}
