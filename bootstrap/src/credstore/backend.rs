//! What a credential store backend is (redb, PostgreSQL, memory), and the rules every backend
//! applies the same way: which credential a commit supersedes, what a copy carries.

use std::collections::{BTreeSet, HashMap};
use std::time::Instant;

use m2mpki_ca::FieldNodeIdentity;

use crate::credential::{CredentialRecord, CredentialStatus};
use crate::Result;

/// The meta key of the recorded policy (JSON).
pub(crate) const POLICY: &str = "policy";
/// The meta key of the store key check value (hex).
pub(crate) const KEY_CHECK: &str = "store_key_check";

/// Where a credential store keeps its records. Each method is one transaction of the backend;
/// the rules shared by every backend ([`plan_commit`], what [`Snapshot`] holds) are functions
/// of this module, so a backend only reads and writes.
pub trait Backend: Send + Sync {
    /// Where the records are, for messages (never a password).
    fn shown(&self) -> String;

    /// Stores prepared records in one durable transaction, as [`plan_commit`] says: each
    /// becomes its identity's live credential and supersedes the previous one; `supersedes` is
    /// filled in on `records`, which stay live. Nothing is sent after `deadline`.
    /// A store error of kind `Unavailable` means nothing was recorded, `CommitUnknown` that the
    /// commit was not confirmed.
    fn commit_until(
        &self,
        records: &mut [CredentialRecord],
        deadline: Option<Instant>,
    ) -> Result<()>;

    /// After an unconfirmed commit: whether credential `id` is recorded, once every writer's
    /// transaction has ended.
    fn settle(&self, id: &str, deadline: Option<Instant>) -> Result<bool>;

    /// How many credential records exist.
    fn count(&self) -> Result<u64>;

    /// A credential record by ID.
    fn credential(&self, id: &str) -> Result<Option<CredentialRecord>>;

    /// The live credential of an identity.
    fn live(&self, identity: &FieldNodeIdentity) -> Result<Option<CredentialRecord>>;

    /// Every credential record of an identity, in any order.
    fn history(&self, identity: &FieldNodeIdentity) -> Result<Vec<CredentialRecord>>;

    /// Every credential record, in any order.
    fn all_records(&self) -> Result<Vec<CredentialRecord>>;

    /// Replaces stored records by ID in one transaction; refuses an ID that is not stored.
    fn rewrite(&self, records: &[CredentialRecord]) -> Result<()>;

    /// A meta value ([`POLICY`], [`KEY_CHECK`]).
    fn meta(&self, key: &str) -> Result<Option<String>>;

    /// Sets a meta value.
    fn set_meta(&self, key: &str, value: &str) -> Result<()>;

    /// Sets a meta value unless one is there; returns the one that is, in one transaction.
    fn meta_or_insert(&self, key: &str, value: &str) -> Result<String>;

    /// Changes the grants of `identity` in one transaction; returns them after the change.
    fn change_grants(
        &self,
        identity: &FieldNodeIdentity,
        change: &dyn Fn(&mut BTreeSet<String>),
    ) -> Result<Vec<String>>;

    /// The technician grants of an identity.
    fn grants_of(&self, identity: &FieldNodeIdentity) -> Result<Vec<String>>;

    /// Every identity's grants (identity in its canonical text form).
    fn all_grants(&self) -> Result<Vec<(String, Vec<String>)>>;

    /// Everything the store holds, read in one transaction.
    fn snapshot(&self) -> Result<Snapshot>;

    /// Writes `snapshot` into this store in one transaction; refuses a store that holds any
    /// credential, grant or meta value.
    fn import(&self, snapshot: &Snapshot) -> Result<()>;
}

/// Everything a credential store holds: what a copy carries from one backend to another.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// Every credential record, live and superseded, sealed as stored.
    pub records: Vec<CredentialRecord>,
    /// identity -> ID of its live credential.
    pub live: Vec<(String, String)>,
    /// identity -> its technician grants.
    pub grants: Vec<(String, Vec<String>)>,
    /// The recorded policy and the store key check, and whatever else is kept as meta.
    pub meta: Vec<(String, String)>,
}

/// What one commit writes, the same on every backend.
#[derive(Debug)]
pub struct CommitPlan {
    /// The new records as stored: the last of each identity live, earlier ones of the same
    /// identity in the group superseded; each names the credential it replaced.
    pub new: Vec<CredentialRecord>,
    /// Records that were live before the commit, now superseded.
    pub superseded: Vec<CredentialRecord>,
    /// identity -> ID of its live credential after the commit.
    pub live: Vec<(String, String)>,
}

/// The supersede rule: within `records` (in order), each record supersedes the one before it
/// of the same identity, and the first of an identity supersedes that identity's credential
/// in `live_now` (identity -> its live record, as read in the committing transaction). A
/// retried transaction plans again from the records as they came.
pub fn plan_commit(
    records: &[CredentialRecord],
    live_now: &HashMap<String, CredentialRecord>,
) -> CommitPlan {
    let mut new: Vec<CredentialRecord> = records
        .iter()
        .map(|r| CredentialRecord {
            supersedes: None,
            status: CredentialStatus::Live,
            ..r.clone()
        })
        .collect();
    let mut superseded = Vec::new();
    // identity -> index of its latest record in `new`, in the order identities first appear.
    let mut last: Vec<(String, usize)> = Vec::new();
    for i in 0..new.len() {
        let identity = new[i].identity.to_string();
        match last.iter_mut().find(|(id, _)| *id == identity) {
            Some((_, prev)) => {
                new[*prev].status = CredentialStatus::Superseded;
                new[i].supersedes = Some(new[*prev].id.clone());
                *prev = i;
            }
            None => {
                if let Some(old) = live_now.get(&identity) {
                    new[i].supersedes = Some(old.id.clone());
                    superseded.push(CredentialRecord {
                        status: CredentialStatus::Superseded,
                        ..old.clone()
                    });
                }
                last.push((identity, i));
            }
        }
    }
    let live = last
        .into_iter()
        .map(|(identity, i)| (identity, new[i].id.clone()))
        .collect();
    CommitPlan {
        new,
        superseded,
        live,
    }
}

/// The distinct identities of `records`, in their canonical text form.
pub fn identities(records: &[CredentialRecord]) -> Vec<String> {
    let mut out: Vec<String> = records.iter().map(|r| r.identity.to_string()).collect();
    out.sort_unstable();
    out.dedup();
    out
}

/// Fills in the caller's records after a commit of `plan`: `supersedes` as stored; each stays
/// live (it was live when it was answered to its node).
pub fn answer(records: &mut [CredentialRecord], plan: &CommitPlan) {
    for (r, n) in records.iter_mut().zip(&plan.new) {
        r.supersedes.clone_from(&n.supersedes);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests may fail loudly

    use super::*;
    use crate::credential::Seal;
    use crate::protocol::Admission;
    use m2mpki_ca::rootset::RootSetKind;

    fn record(id: &str, identity: &str) -> CredentialRecord {
        CredentialRecord {
            id: id.into(),
            identity: identity.parse().unwrap(),
            admitted_by: Admission {
                set: "meters".into(),
                kind: RootSetKind::Device {
                    vertical: "metering".into(),
                },
            },
            client_cert_sha256: "00".into(),
            created: 1,
            expires: 2,
            status: CredentialStatus::Live,
            sealed: String::new(),
            seal: Seal::Bound,
            supersedes: None,
        }
    }

    const A: &str = "node:acme.example:pump-1";
    const B: &str = "node:acme.example:pump-2";

    #[test]
    fn a_first_commit_supersedes_nothing() {
        let plan = plan_commit(&[record("1", A), record("2", B)], &HashMap::new());
        assert!(plan.superseded.is_empty());
        assert!(plan.new.iter().all(|r| r.supersedes.is_none()));
        assert!(plan.new.iter().all(|r| r.status == CredentialStatus::Live));
        assert_eq!(plan.live, [(A.into(), "1".into()), (B.into(), "2".into())]);
    }

    #[test]
    fn a_commit_supersedes_the_live_credential_of_its_identity_only() {
        let live = HashMap::from([(A.to_string(), record("0", A))]);
        let plan = plan_commit(&[record("1", A), record("2", B)], &live);
        assert_eq!(plan.superseded.len(), 1);
        assert_eq!(plan.superseded[0].id, "0");
        assert_eq!(plan.superseded[0].status, CredentialStatus::Superseded);
        assert_eq!(plan.new[0].supersedes.as_deref(), Some("0"));
        assert_eq!(plan.new[1].supersedes, None);
    }

    #[test]
    fn within_a_group_the_later_record_of_an_identity_wins() {
        let live = HashMap::from([(A.to_string(), record("0", A))]);
        let plan = plan_commit(&[record("1", A), record("2", B), record("3", A)], &live);
        let by_id = |id: &str| plan.new.iter().find(|r| r.id == id).unwrap();
        assert_eq!(by_id("1").status, CredentialStatus::Superseded);
        assert_eq!(by_id("1").supersedes.as_deref(), Some("0"));
        assert_eq!(by_id("3").status, CredentialStatus::Live);
        assert_eq!(by_id("3").supersedes.as_deref(), Some("1"));
        // The record live before the group is superseded once, not once per record.
        assert_eq!(plan.superseded.len(), 1);
        assert_eq!(plan.live, [(A.into(), "3".into()), (B.into(), "2".into())]);
    }

    #[test]
    fn a_retried_plan_starts_from_the_records_as_they_came() {
        let mut came = [record("1", A), record("2", A)];
        came[0].status = CredentialStatus::Superseded;
        came[1].supersedes = Some("stale".into());
        let plan = plan_commit(&came, &HashMap::new());
        assert_eq!(plan.new[0].supersedes, None);
        assert_eq!(plan.new[1].supersedes.as_deref(), Some("1"));
        assert_eq!(plan.new[1].status, CredentialStatus::Live);
        answer(&mut came, &plan);
        assert_eq!(came[1].supersedes.as_deref(), Some("1"));
    }
}
