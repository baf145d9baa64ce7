//! The IN's credential store: root credentials (sealed under a store key), who holds them,
//! technician grants and the active authorization policy.
//!
//! By default one redb file, `bootstrap.redb`, in the IN's home folder, shared by the running
//! server and the `m2mpki bootstrap grant/...` commands (redb multi-writer mode), so grants take
//! effect without a restart. With `store = "postgres://..."` (or `--store`) the same records
//! live in PostgreSQL, shared by several IN instances (see `credstore_pg`).

use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant};

use m2mpki_ca::FieldNodeIdentity;

use crate::config::{DefaultPolicy, Policy};
use crate::protocol::{Admission, RootCredential};
use crate::{Error, Result};
use m2mpki_store::Kind as StoreKind;

pub mod backend;
mod memory;
mod pg_store;
mod redb_store;

pub use crate::credential::{binding, CredentialRecord, CredentialStatus, Seal};
pub use backend::{Backend, Snapshot};
#[cfg(test)]
pub(crate) use memory::MemoryBackend;

/// What the key check value seals (32 bytes, not secret).
const KEY_CHECK: &[u8; 32] = b"m2mpki credential store key chk!";

/// The store: the rules of the IN's credentials over one [`Backend`].
pub struct CredentialStore {
    backend: Box<dyn Backend>,
}

impl std::fmt::Debug for CredentialStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CredentialStore")
            .field("backend", &self.backend.shown())
            .finish()
    }
}

fn parse<T: serde::de::DeserializeOwned>(what: &str, text: &str) -> Result<T> {
    serde_json::from_str(text).map_err(|e| Error::corrupt(format!("corrupt record {what}: {e}")))
}

/// The key credentials are sealed under at the IN: a 0600 key file (AES-256 key wrap) or an
/// AES-256 key on a PKCS#11 token (AES-256-GCM on the token), opened through the `hsm`
/// sealing abstraction. `Debug` shows no key.
#[derive(Debug, Clone)]
pub struct StoreKey(std::sync::Arc<dyn m2mpki_hsm::sealing::Sealer>);

impl StoreKey {
    /// Opens the key `key_ref` names: a token object, or a file (created when missing).
    pub fn load(key_ref: &m2mpki_hsm::KeyRef, keystore: &m2mpki_hsm::Keystore) -> Result<Self> {
        Ok(StoreKey(keystore.open_sealer(key_ref)?))
    }

    /// Whether the key stays on a token.
    pub fn is_token(&self) -> bool {
        self.0.is_token()
    }

    /// Seals `credential` for `record` (bound to it) and sets its `sealed` and `seal`.
    fn seal_into(&self, record: &mut CredentialRecord, credential: &RootCredential) -> Result<()> {
        let sealed = self.0.seal_bound(credential.expose(), &binding(record))?;
        record.sealed = hex::encode(sealed);
        record.seal = Seal::Bound;
        Ok(())
    }

    fn unseal(&self, record: &CredentialRecord, blob: &[u8]) -> Result<RootCredential> {
        let plain = match record.seal {
            Seal::Bound => self.0.unseal_bound(blob, &binding(record))?,
            Seal::Unbound => self.0.unseal(blob)?,
        };
        RootCredential::from_slice(&plain)
            .ok_or_else(|| Error::internal("sealed credential of the wrong size"))
    }
}

/// How a bootstrap went, for the new credential.
#[derive(Debug)]
pub struct NewCredential<'a> {
    /// The identity.
    pub identity: &'a FieldNodeIdentity,
    /// Who admitted it.
    pub admitted_by: &'a Admission,
    /// SHA-256 of the client certificate.
    pub client_cert_sha256: &'a str,
    /// Lifetime end (Unix time).
    pub expires: i64,
}

impl CredentialStore {
    /// Opens (creating) the store `bootstrap.redb` in `home`.
    pub fn open(home: &Path) -> Result<Self> {
        let backend = redb_store::RedbBackend::open(home.join("bootstrap.redb"))?;
        Ok(Self::on(Box::new(backend)))
    }

    /// Opens the store `location` selects: PostgreSQL for a `postgres://` URL (the same
    /// database as the CA ledger, tables of its own), else `bootstrap.redb` in `home` (a
    /// `redb:PATH` location names only the CA ledger).
    pub fn open_at(location: Option<&m2mpki_ca::StoreLocation>, home: &Path) -> Result<Self> {
        match location {
            Some(m2mpki_ca::StoreLocation::Postgres(url)) => {
                Ok(Self::on(Box::new(pg_store::open(url)?)))
            }
            _ => Self::open(home),
        }
    }

    /// A store that lives in memory only (unit tests of what sits above the store).
    pub fn in_memory() -> Self {
        Self::on(Box::<memory::MemoryBackend>::default())
    }

    /// The store over `backend`.
    pub fn on(backend: Box<dyn Backend>) -> Self {
        CredentialStore { backend }
    }

    /// Which backend holds the records: `redb:PATH`, `memory` or the database (never its
    /// password).
    pub fn backend(&self) -> String {
        self.backend.shown()
    }

    /// Makes a fresh root credential for `new`, sealed under `store_key`; nothing is stored yet.
    pub fn prepare(
        store_key: &StoreKey,
        new: NewCredential<'_>,
    ) -> Result<(CredentialRecord, RootCredential)> {
        let credential = RootCredential::random()?;
        let mut id = [0u8; 16];
        aws_lc_rs::rand::fill(&mut id).map_err(|_| Error::internal("random source failed"))?;
        let record = Self::prepare_known(store_key, new, hex::encode(id), &credential)?;
        Ok((record, credential))
    }

    /// A record for a credential both ends already hold (protocol version 2: Ke, named by its
    /// KeID), sealed under `store_key`; nothing is stored yet.
    pub fn prepare_known(
        store_key: &StoreKey,
        new: NewCredential<'_>,
        id: String,
        credential: &RootCredential,
    ) -> Result<CredentialRecord> {
        let mut record = CredentialRecord {
            id,
            identity: new.identity.clone(),
            admitted_by: new.admitted_by.clone(),
            client_cert_sha256: new.client_cert_sha256.to_owned(),
            created: time::OffsetDateTime::now_utc().unix_timestamp(),
            expires: new.expires,
            status: CredentialStatus::Live,
            sealed: String::new(),
            seal: Seal::Unbound,
            supersedes: None,
        };
        store_key.seal_into(&mut record, credential)?;
        Ok(record)
    }

    /// Stores prepared credentials in one durable transaction, in order: each becomes its
    /// identity's live credential and supersedes the previous one (`supersedes` is filled in;
    /// the rule is [`backend::plan_commit`]).
    pub fn commit(&self, records: &mut [CredentialRecord]) -> Result<()> {
        self.commit_until(records, None)
    }

    /// [`commit`](Self::commit) that gives up at `deadline`: nothing is sent to PostgreSQL
    /// after it (a redb commit is not started after it). A store error of kind `Unavailable`
    /// means nothing was recorded; `CommitUnknown` that the commit was sent and not confirmed.
    pub fn commit_until(
        &self,
        records: &mut [CredentialRecord],
        deadline: Option<Instant>,
    ) -> Result<()> {
        self.backend.commit_until(records, deadline)
    }

    /// After a `CommitUnknown` store error: whether the credential `id` was recorded, once every
    /// writer's transaction has ended; an error when the store still does not answer by
    /// `deadline`.
    pub fn settle(&self, id: &str, deadline: Option<Instant>) -> Result<bool> {
        self.backend.settle(id, deadline)
    }

    /// Creates, seals and stores a fresh root credential for `new`, making it the identity's
    /// live credential (the previous one is superseded). Two racing bootstraps of one identity
    /// are serialised: exactly one ends live.
    pub fn issue(
        &self,
        store_key: &StoreKey,
        new: NewCredential<'_>,
    ) -> Result<(CredentialRecord, RootCredential)> {
        let (record, credential) = Self::prepare(store_key, new)?;
        let mut records = [record];
        self.commit(&mut records)?;
        let [record] = records;
        Ok((record, credential))
    }

    /// How many credential records exist (live and superseded).
    pub fn count(&self) -> Result<u64> {
        self.backend.count()
    }

    /// A credential record by ID.
    pub fn credential(&self, id: &str) -> Result<Option<CredentialRecord>> {
        self.backend.credential(id)
    }

    /// The live credential of an identity.
    pub fn live(&self, identity: &FieldNodeIdentity) -> Result<Option<CredentialRecord>> {
        self.backend.live(identity)
    }

    /// All credential records of an identity (live and superseded), oldest first.
    pub fn history(&self, identity: &FieldNodeIdentity) -> Result<Vec<CredentialRecord>> {
        let mut out = self.backend.history(identity)?;
        out.sort_by(|a, b| (a.created, &a.id).cmp(&(b.created, &b.id)));
        Ok(out)
    }

    /// Unseals a stored credential (for the IN's own use, and tests). Only a credential
    /// sealed for this very record opens: one moved from another record, a record whose
    /// identity, ID or expiry was changed, and a record sealed the old, unbound way (until
    /// `m2mpki bootstrap reseal`) are refused, and logged.
    pub fn unseal(
        &self,
        store_key: &StoreKey,
        record: &CredentialRecord,
    ) -> Result<RootCredential> {
        if record.seal == Seal::Unbound {
            tracing::error!(credential_id = %record.id, identity = %record.identity, "refused a credential sealed without its record binding; run `m2mpki bootstrap reseal`");
            return Err(Error::store(
                StoreKind::Conflict,
                format!(
                    "credential {} is sealed without its record binding (an earlier version's \
                 format): run `m2mpki bootstrap reseal` before it is served",
                    record.id
                ),
            ));
        }
        let blob = hex::decode(&record.sealed).map_err(|_| {
            Error::corrupt(format!("credential {}: corrupt sealed value", record.id))
        })?;
        store_key.unseal(record, &blob).map_err(|_| {
            tracing::error!(credential_id = %record.id, identity = %record.identity, "refused a credential whose seal does not match its record (moved from another record, altered, or another store key)");
            Error::corrupt(format!(
                "credential {} does not unseal for its record with this store key (moved from \
                 another record, altered, or another store key)",
                record.id
            ))
        })
    }

    /// Binds every credential sealed the old way to its record: unseals it (AES-KW, or GCM
    /// without associated data) and seals it again bound to the record, all in one
    /// transaction. Returns how many were resealed and how many were bound already. Run it on
    /// a store nobody else could write since: an unbound record cannot show that it was not
    /// moved.
    pub fn reseal(&self, store_key: &StoreKey) -> Result<(u64, u64)> {
        let all = self.backend.all_records()?;
        let mut changed = Vec::new();
        let mut bound = 0u64;
        for mut r in all {
            if r.seal == Seal::Bound {
                bound += 1;
                continue;
            }
            let blob = hex::decode(&r.sealed).map_err(|_| {
                Error::corrupt(format!("credential {}: corrupt sealed value", r.id))
            })?;
            let credential = store_key.unseal(&r, &blob).map_err(|_| {
                Error::corrupt(format!(
                    "credential {} does not unseal with this store key",
                    r.id
                ))
            })?;
            store_key.seal_into(&mut r, &credential)?;
            changed.push(r);
        }
        let n = changed.len() as u64;
        self.rewrite(&changed)?;
        Ok((n, bound))
    }

    /// Replaces existing records by ID, in one transaction (which is live does not change): for
    /// `reseal`, and for tests that alter stored records.
    #[doc(hidden)]
    pub fn rewrite(&self, records: &[CredentialRecord]) -> Result<()> {
        self.backend.rewrite(records)
    }

    /// Checks that `key` is the store key the credentials here are sealed under: the first
    /// start records a check value sealed under its key, every later start (of any IN on a
    /// shared store) must open it. Refuses a mismatch before any credential is sealed under
    /// the wrong key (all INs on one store need the same store key).
    pub fn check_key(&self, key: &StoreKey) -> Result<()> {
        let sealed = hex::encode(key.0.seal(KEY_CHECK)?);
        let stored = self.backend.meta_or_insert(backend::KEY_CHECK, &sealed)?;
        let opens = hex::decode(&stored)
            .ok()
            .and_then(|blob| key.0.unseal(&blob).ok())
            .is_some_and(|plain| plain[..] == KEY_CHECK[..]);
        if opens {
            Ok(())
        } else {
            Err(Error::store(
                StoreKind::Conflict,
                format!(
                    "the configured store key does not open the credentials in {} (they were \
                 sealed under another key; every IN on one store needs the same store key)",
                    self.backend()
                ),
            ))
        }
    }

    /// Copies every record of this store (credentials with their status, the live credential
    /// of each identity, grants, the recorded policy and the store key check) into `to`, which
    /// must be empty, whatever the two backends are; the credentials stay sealed as they are.
    /// Returns the number of credentials and of identities with grants copied.
    pub fn copy_into(&self, to: &CredentialStore) -> Result<(u64, u64)> {
        let snapshot = self.backend.snapshot()?;
        to.backend.import(&snapshot)?;
        Ok((snapshot.records.len() as u64, snapshot.grants.len() as u64))
    }

    /// Records the policy the server runs with, so `bootstrap check` answers as the server does.
    pub fn set_policy(&self, policy: &Policy) -> Result<()> {
        let text = serde_json::to_string(policy).map_err(Error::internal)?;
        self.backend.set_meta(backend::POLICY, &text)
    }

    /// The recorded policy (allow with no default grants when no server has run yet).
    pub fn policy(&self) -> Result<Policy> {
        Ok(self
            .backend
            .meta(backend::POLICY)?
            .map(|text| parse(backend::POLICY, &text))
            .transpose()?
            .unwrap_or_default())
    }

    /// Adds technician grants for an identity; returns its grants now.
    pub fn grant(&self, identity: &FieldNodeIdentity, resources: &[String]) -> Result<Vec<String>> {
        self.backend.change_grants(identity, &|g| {
            g.extend(resources.iter().cloned());
        })
    }

    /// Removes grants; returns what remains.
    pub fn revoke_grant(
        &self,
        identity: &FieldNodeIdentity,
        resources: &[String],
    ) -> Result<Vec<String>> {
        self.backend.change_grants(identity, &|g| {
            for r in resources {
                g.remove(r);
            }
        })
    }

    /// Technician grants of one identity.
    pub fn grants_of(&self, identity: &FieldNodeIdentity) -> Result<Vec<String>> {
        self.backend.grants_of(identity)
    }

    /// Every identity's technician grants, by identity.
    pub fn all_grants(&self) -> Result<Vec<(String, Vec<String>)>> {
        let mut out = self.backend.all_grants()?;
        out.sort();
        Ok(out)
    }

    /// What an identity is granted under `policy`: the default grants (when the policy
    /// allows every authenticated node) plus its technician grants. `None` when the policy
    /// refuses it (default deny and no technician grants).
    pub fn effective_grants(
        &self,
        policy: &Policy,
        identity: &FieldNodeIdentity,
    ) -> Result<Option<Vec<String>>> {
        let own = self.grants_of(identity)?;
        let mut all: BTreeSet<String> = own.iter().cloned().collect();
        match policy.default {
            DefaultPolicy::Allow => all.extend(policy.grants.iter().cloned()),
            DefaultPolicy::Deny if own.is_empty() => return Ok(None),
            DefaultPolicy::Deny => {}
        }
        Ok(Some(all.into_iter().collect()))
    }

    /// Whether `identity` may access `resource` under the recorded policy.
    pub fn check(&self, identity: &FieldNodeIdentity, resource: &str) -> Result<bool> {
        let policy = self.policy()?;
        Ok(self
            .effective_grants(&policy, identity)?
            .is_some_and(|g| g.iter().any(|r| r == resource)))
    }
}

struct Job {
    record: CredentialRecord,
    /// Past it the enrolment is answered without this credential: no commit may start after
    /// it, and none may still be running.
    deadline: Instant,
    reply: tokio::sync::oneshot::Sender<Result<CredentialRecord>>,
}

/// The error a job gets for a group's failure, of the same kind: a store that failed (503, try
/// again), a commit not confirmed, or anything else, such as a corrupt row, which trying
/// again will not mend (500).
fn same_kind(e: &Error) -> Error {
    match e {
        Error::Store(e) => Error::Store(e.clone()),
        Error::Ca(m2mpki_ca::Error::Store(e)) => Error::Store(e.clone()),
        Error::Internal(m) | Error::Ca(m2mpki_ca::Error::Internal(m)) => Error::internal(m),
        other => Error::internal(other.to_string()),
    }
}

/// Stores one group within the earliest deadline of its jobs. A commit whose outcome is
/// unknown is settled (the store is asked, after every writer's transaction ended, whether the
/// group is there) while time is left: the group is then known stored or known absent.
fn commit_group(
    store: &CredentialStore,
    records: &mut [CredentialRecord],
    deadline: Instant,
) -> Result<()> {
    match store.commit_until(records, Some(deadline)) {
        Err(Error::Store(why)) if why.kind() == StoreKind::CommitUnknown => {
            let why = why.message().to_owned();
            let first = records.first().map(|r| r.id.clone()).unwrap_or_default();
            match store.settle(&first, Some(deadline)) {
                Ok(true) => {
                    tracing::warn!(error = %why, "a credential commit was not confirmed, but a fresh read shows it stored");
                    Ok(())
                }
                Ok(false) => Err(Error::unavailable(format!(
                    "{why}; a fresh read shows that nothing was recorded"
                ))),
                Err(_) => Err(Error::commit_unknown(why)),
            }
        }
        other => other,
    }
}

/// Group commit: one writer thread stores every credential that arrives while the previous
/// transaction is being made durable in the next single transaction, so one fsync serves many
/// concurrent bootstraps, and async callers never block a runtime thread on disk.
#[derive(Clone)]
pub struct GroupCommitter {
    jobs: std::sync::mpsc::Sender<Job>,
    commits: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl std::fmt::Debug for GroupCommitter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("GroupCommitter")
    }
}

/// Largest group stored in one transaction.
const MAX_GROUP: usize = 1024;
/// How long a group waits for more enrolments when the last group had several (measured: groups
/// of 2.9 on average instead of 1.5 at 16 and 256 clients; at most this much added latency).
const LINGER: Duration = Duration::from_millis(2);

impl GroupCommitter {
    /// Starts the writer thread; it ends when every handle is dropped.
    pub fn start(store: std::sync::Arc<CredentialStore>) -> Result<Self> {
        let (tx, rx) = std::sync::mpsc::channel::<Job>();
        let commits = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let counted = commits.clone();
        std::thread::Builder::new()
            .name("credential-writer".into())
            .spawn(move || {
                let mut last_group = 1;
                while let Ok(first) = rx.recv() {
                    let mut jobs = vec![first];
                    while jobs.len() < MAX_GROUP {
                        match rx.try_recv() {
                            Ok(j) => jobs.push(j),
                            Err(_) => break,
                        }
                    }
                    // Under load (the last group shared its commit), wait a moment for the
                    // enrolments already in flight, so that one commit serves several: a
                    // commit's cost is mostly fixed, and without this, groups averaged 1.5
                    // enrolments at 16 and 256 concurrent clients. A lone enrolment never waits.
                    if last_group > 1 {
                        let deadline = Instant::now() + LINGER;
                        while jobs.len() < MAX_GROUP {
                            let left = deadline.saturating_duration_since(Instant::now());
                            match rx.recv_timeout(left) {
                                Ok(j) => jobs.push(j),
                                Err(_) => break,
                            }
                        }
                    }
                    last_group = jobs.len();
                    // A job whose deadline passed while it waited (the store was slow for the
                    // group before) is answered without being stored.
                    let now = Instant::now();
                    let (jobs, late): (Vec<Job>, Vec<Job>) =
                        jobs.into_iter().partition(|j| j.deadline > now);
                    for job in late {
                        let _ = job.reply.send(Err(Error::unavailable(
                            "the credential store was too slow; the enrolment's deadline passed before its turn",
                        )));
                    }
                    let Some(deadline) = jobs.iter().map(|j| j.deadline).min() else {
                        continue;
                    };
                    let mut records: Vec<CredentialRecord> =
                        jobs.iter().map(|j| j.record.clone()).collect();
                    let result = commit_group(&store, &mut records, deadline);
                    if result.is_ok() {
                        counted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    for (job, record) in jobs.into_iter().zip(records) {
                        let _ = job.reply.send(match &result {
                            Ok(()) => Ok(record),
                            Err(e) => Err(same_kind(e)),
                        });
                    }
                }
            })
            .map_err(|e| Error::internal(format!("starting the credential writer: {e}")))?;
        Ok(GroupCommitter { jobs: tx, commits })
    }

    /// Transactions that stored credentials so far (one per group).
    pub fn commits(&self) -> u64 {
        self.commits.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Stores a prepared credential; resolves once it is durable, or with an error by about
    /// `deadline`: a store error of kind `Unavailable` when it is known not stored,
    /// `CommitUnknown` when the store did not confirm it. No commit of it starts or runs past `deadline`.
    pub async fn commit(
        &self,
        record: CredentialRecord,
        deadline: Instant,
    ) -> Result<CredentialRecord> {
        let (reply, done) = tokio::sync::oneshot::channel();
        self.jobs
            .send(Job {
                record,
                deadline,
                reply,
            })
            .map_err(|_| Error::unavailable("the credential writer stopped"))?;
        done.await
            .map_err(|_| Error::unavailable("the credential writer stopped"))?
    }
}
