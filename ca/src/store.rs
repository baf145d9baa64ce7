//! What the CA remembers, behind a narrow trait so other backends (PostgreSQL) can follow.

use std::fmt;
use std::str::FromStr;

use m2mpki_hsm::KeyType;
use serde::{Deserialize, Serialize};

use crate::constraints::NameConstraints;
use crate::identity::Oid;

use crate::audit::{AuditEntry, AuditEvent};
use crate::identity::FieldNodeIdentity;
use crate::profile::ProfileKind;
use crate::rootset::RootSet;
use crate::serial::Serial;
use crate::{Error, Result};

/// A CA as the store remembers it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CaRecord {
    /// Unique name (`[A-Za-z0-9._-]`, 1 to 64 characters).
    pub name: String,
    /// Subject DN as text.
    pub subject: String,
    /// Organization (O) of the subject: the manufacturer or enterprise.
    pub organization: Option<String>,
    /// Key location: a path (relative to the home folder when inside it) or a PKCS#11 URI.
    pub key: String,
    /// Key algorithm.
    pub key_type: KeyType,
    /// Parent CA, `None` for a root.
    pub parent: Option<String>,
    /// The manufacturer's hwType OID for device certificates.
    pub hw_type: Option<Oid>,
    /// basicConstraints pathLenConstraint.
    pub path_len: Option<u8>,
    /// Name constraints in the certificate.
    #[serde(default)]
    pub name_constraints: NameConstraints,
    /// Serial of the CA certificate.
    pub serial: Serial,
    /// notBefore (Unix time).
    pub not_before: i64,
    /// notAfter (Unix time).
    pub not_after: i64,
    /// When the CA was created (Unix time).
    pub created: i64,
    /// The CA certificate.
    #[serde(with = "crate::hex_serde::bytes")]
    pub cert_der: Vec<u8>,
    /// Its ancestors, parent first and root last (empty for a root).
    #[serde(with = "crate::hex_serde::list")]
    pub chain_der: Vec<Vec<u8>>,
}

impl CaRecord {
    /// The CA certificate followed by its ancestors, root last, as PEM.
    pub fn chain_pem(&self) -> String {
        std::iter::once(&self.cert_der)
            .chain(&self.chain_der)
            .map(|der| m2mpki_hsm::files::pem_encode("CERTIFICATE", der))
            .collect()
    }

    /// The root certificate of this CA's chain.
    pub fn root_der(&self) -> &[u8] {
        self.chain_der.last().unwrap_or(&self.cert_der)
    }
}

/// RFC 5280 §5.3.1 reason codes (certificateHold and removeFromCRL are not offered: m2mpki
/// issues no delta CRLs and no temporary holds).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum RevocationReason {
    /// unspecified (0).
    Unspecified,
    /// keyCompromise (1).
    KeyCompromise,
    /// cACompromise (2).
    #[serde(rename = "cACompromise")]
    CaCompromise,
    /// affiliationChanged (3).
    AffiliationChanged,
    /// superseded (4).
    Superseded,
    /// cessationOfOperation (5).
    CessationOfOperation,
    /// privilegeWithdrawn (9).
    PrivilegeWithdrawn,
    /// aACompromise (10).
    #[serde(rename = "aACompromise")]
    AaCompromise,
}

const REASONS: &[(&str, RevocationReason)] = &[
    ("unspecified", RevocationReason::Unspecified),
    ("key-compromise", RevocationReason::KeyCompromise),
    ("ca-compromise", RevocationReason::CaCompromise),
    ("affiliation-changed", RevocationReason::AffiliationChanged),
    ("superseded", RevocationReason::Superseded),
    (
        "cessation-of-operation",
        RevocationReason::CessationOfOperation,
    ),
    ("privilege-withdrawn", RevocationReason::PrivilegeWithdrawn),
    ("aa-compromise", RevocationReason::AaCompromise),
];

impl RevocationReason {
    pub(crate) fn to_rcgen(self) -> rcgen::RevocationReason {
        use rcgen::RevocationReason as R;
        match self {
            RevocationReason::Unspecified => R::Unspecified,
            RevocationReason::KeyCompromise => R::KeyCompromise,
            RevocationReason::CaCompromise => R::CaCompromise,
            RevocationReason::AffiliationChanged => R::AffiliationChanged,
            RevocationReason::Superseded => R::Superseded,
            RevocationReason::CessationOfOperation => R::CessationOfOperation,
            RevocationReason::PrivilegeWithdrawn => R::PrivilegeWithdrawn,
            RevocationReason::AaCompromise => R::AaCompromise,
        }
    }
}

impl FromStr for RevocationReason {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let norm: String = s
            .chars()
            .filter(|c| c.is_ascii_alphanumeric())
            .collect::<String>()
            .to_ascii_lowercase();
        REASONS
            .iter()
            .find(|(name, _)| name.replace('-', "") == norm)
            .map(|(_, r)| *r)
            .ok_or_else(|| {
                Error::invalid(
                    "revocation reason",
                    s,
                    format!(
                        "expected one of {}",
                        REASONS
                            .iter()
                            .map(|(n, _)| *n)
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                )
            })
    }
}

impl fmt::Display for RevocationReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = REASONS
            .iter()
            .find(|(_, r)| r == self)
            .map_or("unspecified", |(n, _)| n);
        f.write_str(name)
    }
}

/// A revoked certificate, as a CA's CRL needs it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RevokedEntry {
    /// Serial.
    pub serial: Serial,
    /// When it was revoked (Unix time).
    pub revoked_at: i64,
    /// Why.
    pub reason: RevocationReason,
    /// The certificate's notAfter: expired certificates leave the CRL.
    pub not_after: i64,
}

/// The state of an issued certificate.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CertStatus {
    /// Issued and not revoked.
    Valid,
    /// Revoked.
    Revoked,
}

/// The ledger record of one issued certificate (its DER is kept beside it).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CertRecord {
    /// Serial number.
    pub serial: Serial,
    /// The issuing CA's name.
    pub ca: String,
    /// The profile it was issued under.
    pub profile: ProfileKind,
    /// The key under which "one live certificate per subject" is enforced: the canonical
    /// field-node identity, or `server:<fqdn>`.
    pub subject_key: String,
    /// The field-node identity, for device and node certificates.
    pub identity: Option<FieldNodeIdentity>,
    /// The subject DN as text.
    pub subject: String,
    /// notBefore (Unix time).
    pub not_before: i64,
    /// notAfter (Unix time).
    pub not_after: i64,
    /// When it was recorded (Unix time).
    pub issued_at: i64,
    /// SHA-256 of the DER (hex).
    pub sha256: String,
    /// Current state.
    pub status: CertStatus,
    /// When it was revoked (Unix time).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_at: Option<i64>,
    /// Why it was revoked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revocation_reason: Option<RevocationReason>,
    /// Who asked for it (none in records of versions before requesters were kept).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requested_by: Option<crate::Requester>,
}

/// A certificate to record: its record and DER.
#[derive(Clone, Debug)]
pub struct NewCert {
    /// The record.
    pub record: CertRecord,
    /// The certificate.
    pub der: Vec<u8>,
}

/// What happened to one certificate handed to [`Store::record_certs`].
#[derive(Clone, Debug, PartialEq)]
pub enum RecordOutcome {
    /// Recorded (with its audit entry).
    Recorded,
    /// Not recorded: the subject already has this live certificate.
    AlreadyLive(Serial),
}

/// Filters for [`Store::certs`].
#[derive(Clone, Debug, Default)]
pub struct CertFilter {
    /// Only certificates of this CA.
    pub ca: Option<String>,
    /// Only certificates whose pre-provisioned ID, canonical identity or subject key is this.
    pub id: Option<String>,
}

/// One record of a store, as `store migrate` copies it: everything a store holds is a
/// sequence of these ([`Store::export`], [`Store::import`]).
#[derive(Clone, Debug)]
pub enum Item {
    /// A CA.
    Ca(CaRecord),
    /// An issued certificate (its current record, revoked or not) and its DER.
    Cert(NewCert),
    /// The live certificate of a subject at a CA.
    Live {
        /// The CA.
        ca: String,
        /// The subject key.
        subject_key: String,
        /// The live certificate.
        serial: Serial,
    },
    /// A revocation, as the CA's CRL lists it.
    Revoked {
        /// The CA.
        ca: String,
        /// The entry.
        entry: RevokedEntry,
    },
    /// The last CRL number a CA took.
    CrlNumber {
        /// The CA.
        ca: String,
        /// The number.
        last: u64,
    },
    /// A root set with its anchors and CRLs.
    RootSet(RootSet),
    /// An audit entry, as sealed (copied, never re-sealed).
    Audit(AuditEntry),
}

/// The storage the CA needs. Every method is atomic; every change appends audit entries in
/// the same transaction.
pub trait Store: Send + Sync {
    /// Where the store is, for messages (never a password).
    fn backend(&self) -> String;
    /// Records a new CA; refuses a duplicate name.
    fn create_ca(&self, ca: &CaRecord, event: AuditEvent) -> Result<()>;
    /// A CA by name.
    fn ca(&self, name: &str) -> Result<Option<CaRecord>>;
    /// All CAs, by name.
    fn cas(&self) -> Result<Vec<CaRecord>>;
    /// Records certificates in one transaction, each with a `cert.issue` audit entry.
    ///
    /// A certificate whose subject already has a live certificate from the same CA is not
    /// recorded (its outcome says which serial is live) unless `reissue` is set. A serial that
    /// exists already fails the whole call: serials are never reused.
    fn record_certs(&self, certs: &[NewCert], reissue: bool) -> Result<Vec<RecordOutcome>>;
    /// The live certificate of a subject at a CA, if any.
    fn live_cert(&self, ca: &str, subject_key: &str) -> Result<Option<Serial>>;
    /// A certificate and its DER.
    fn cert(&self, serial: &Serial) -> Result<Option<(CertRecord, Vec<u8>)>>;
    /// Certificates matching `filter`, in serial order.
    fn certs(&self, filter: &CertFilter) -> Result<Vec<CertRecord>>;
    /// Visits the audit log in order, stopping at the first error `visit` returns.
    fn audit_log(&self, visit: &mut dyn FnMut(AuditEntry) -> Result<()>) -> Result<()>;

    /// Records a new root set; refuses a duplicate name.
    fn create_root_set(&self, set: &RootSet, event: AuditEvent) -> Result<()>;
    /// A root set by name.
    fn root_set(&self, name: &str) -> Result<Option<RootSet>>;
    /// All root sets, by name.
    fn root_sets(&self) -> Result<Vec<RootSet>>;
    /// Changes a root set atomically: `change` edits it and returns the audit event (or an
    /// error, and nothing changes).
    fn modify_root_set(
        &self,
        name: &str,
        change: &mut dyn FnMut(&mut RootSet) -> Result<AuditEvent>,
    ) -> Result<RootSet>;

    /// Revokes a certificate of `ca` (with its audit entry). The subject loses its live
    /// certificate, so it may be issued a new one without `--reissue`.
    fn revoke(
        &self,
        ca: &str,
        serial: &Serial,
        reason: RevocationReason,
        at: i64,
    ) -> Result<CertRecord>;
    /// Visits the revoked certificates of `ca`.
    fn revoked(&self, ca: &str, visit: &mut dyn FnMut(RevokedEntry) -> Result<()>) -> Result<()>;
    /// Takes the next CRL number of `ca` (1, 2, ...), with an audit entry.
    fn next_crl_number(&self, ca: &str, detail: serde_json::Value) -> Result<u64>;

    /// Waits until every write transaction that began before this call has ended, so that
    /// the next read shows the outcome of a commit that was [`Error::CommitUnknown`] (on
    /// PostgreSQL: takes and releases the writers' lock on a fresh connection). The embedded
    /// store has nothing to wait for.
    fn settle(&self) -> Result<()> {
        Ok(())
    }

    /// Visits everything the store holds: CAs, certificates, live certificates, revocations,
    /// CRL numbers, root sets, then the audit log in order.
    fn export(&self, visit: &mut dyn FnMut(Item) -> Result<()>) -> Result<()>;
    /// Loads `items` into this store in one transaction, refusing unless the store is empty;
    /// returns how many were loaded. Audit entries are stored as given (not re-sealed), so
    /// the caller verifies the chain afterwards.
    fn import(&self, items: &mut dyn Iterator<Item = Result<Item>>) -> Result<u64>;
}

/// What became of a change whose commit failed with `err`: an error that is not
/// [`Error::CommitUnknown`] is returned as it is (nothing was recorded). Otherwise the store is
/// settled and `landed` reads whether the change is there: `Some` is the change recorded after
/// all (returned as success), `None` an error saying that nothing was recorded, and a read
/// that fails leaves the outcome unknown, with `check` as the command that will tell.
pub fn settle_outcome<T>(
    store: &dyn Store,
    err: Error,
    check: impl FnOnce() -> String,
    landed: impl FnOnce(&dyn Store) -> Result<Option<T>>,
) -> Result<T> {
    let Error::CommitUnknown { why, .. } = err else {
        return Err(err);
    };
    match store.settle().and_then(|()| landed(store)) {
        Ok(Some(v)) => Ok(v),
        Ok(None) => Err(Error::unavailable(format!(
            "{why}; a fresh read shows that nothing was recorded"
        ))),
        Err(_) => Err(Error::CommitUnknown {
            why,
            check: Some(check()),
        }),
    }
}

/// The `cert.issue` audit event of a recorded certificate (every backend writes the same).
pub(crate) fn issue_event(r: &CertRecord, reissue: bool) -> AuditEvent {
    let mut detail = serde_json::json!({
        "ca": r.ca,
        "profile": r.profile,
        "subject_key": r.subject_key,
        "sha256": r.sha256,
        "reissue": reissue,
    });
    if let (Some(who), Some(map)) = (&r.requested_by, detail.as_object_mut()) {
        map.insert(
            "requested_by".into(),
            serde_json::to_value(who).unwrap_or_default(),
        );
    }
    AuditEvent {
        action: crate::audit::AuditAction::CertIssue,
        subject: r.serial.to_string(),
        detail,
    }
}

/// Revokes `record` (found under `serial`) for CA `ca`, checking that `ca` issued it and that
/// it is not revoked yet: the changed record is left in `record`; returns the CRL entry and
/// the `cert.revoke` audit event to store with it.
pub(crate) fn revoke_record(
    record: &mut CertRecord,
    ca: &str,
    serial: &Serial,
    reason: RevocationReason,
    at: i64,
) -> Result<(RevokedEntry, AuditEvent)> {
    if record.ca != ca {
        return Err(Error::CertNotFound(format!(
            "with serial {serial} from CA `{ca}` (it was issued by `{}`)",
            record.ca
        )));
    }
    if record.status == CertStatus::Revoked {
        return Err(Error::Policy(format!(
            "certificate {serial} is already revoked"
        )));
    }
    record.status = CertStatus::Revoked;
    record.revoked_at = Some(at);
    record.revocation_reason = Some(reason);
    let entry = RevokedEntry {
        serial: serial.clone(),
        revoked_at: at,
        reason,
        not_after: record.not_after,
    };
    let event = AuditEvent {
        action: crate::audit::AuditAction::CertRevoke,
        subject: serial.to_string(),
        detail: serde_json::json!({ "ca": ca, "reason": reason, "subject_key": record.subject_key }),
    };
    Ok((entry, event))
}

/// The `crl.issue` audit event for CRL number `n` of `ca`.
pub(crate) fn crl_event(ca: &str, mut detail: serde_json::Value, n: u64) -> AuditEvent {
    if let Some(obj) = detail.as_object_mut() {
        obj.insert("crl_number".into(), n.into());
    }
    AuditEvent {
        action: crate::audit::AuditAction::CrlIssue,
        subject: ca.to_owned(),
        detail,
    }
}
