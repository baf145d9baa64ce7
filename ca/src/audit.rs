//! The hash-chained audit log.
//!
//! Every entry carries the SHA-256 of its predecessor; its own hash covers its sequence
//! number, time, action, subject, details and that predecessor hash. Changing, removing or
//! reordering any entry breaks the chain at that entry, which [`verify_chain`] reports.

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// The predecessor hash of the first entry.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// What kind of event an entry records. Stored (and hashed) as its dotted name, so logs
/// written before this type existed read and verify unchanged.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum AuditAction {
    /// A CA was created (`ca.init`).
    #[serde(rename = "ca.init")]
    CaInit,
    /// A certificate was issued (`cert.issue`).
    #[serde(rename = "cert.issue")]
    CertIssue,
    /// A certificate was revoked (`cert.revoke`).
    #[serde(rename = "cert.revoke")]
    CertRevoke,
    /// A CRL was issued (`crl.issue`).
    #[serde(rename = "crl.issue")]
    CrlIssue,
    /// A root set was created (`roots.create`).
    #[serde(rename = "roots.create")]
    RootsCreate,
    /// A root set's revocation policy changed (`roots.set`).
    #[serde(rename = "roots.set")]
    RootsSet,
    /// Anchors were added to a root set (`roots.add`).
    #[serde(rename = "roots.add")]
    RootsAdd,
    /// An anchor was removed from a root set (`roots.remove`).
    #[serde(rename = "roots.remove")]
    RootsRemove,
    /// A CRL was attached to a root set (`roots.add-crl`).
    #[serde(rename = "roots.add-crl")]
    RootsAddCrl,
    /// A CRL was detached from a root set (`roots.remove-crl`).
    #[serde(rename = "roots.remove-crl")]
    RootsRemoveCrl,
}

impl AuditAction {
    /// The dotted name stored in the log.
    pub fn as_str(self) -> &'static str {
        match self {
            AuditAction::CaInit => "ca.init",
            AuditAction::CertIssue => "cert.issue",
            AuditAction::CertRevoke => "cert.revoke",
            AuditAction::CrlIssue => "crl.issue",
            AuditAction::RootsCreate => "roots.create",
            AuditAction::RootsSet => "roots.set",
            AuditAction::RootsAdd => "roots.add",
            AuditAction::RootsRemove => "roots.remove",
            AuditAction::RootsAddCrl => "roots.add-crl",
            AuditAction::RootsRemoveCrl => "roots.remove-crl",
        }
    }
}

impl std::fmt::Display for AuditAction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What happened, before it is sealed into the chain.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AuditEvent {
    /// What kind of event.
    pub action: AuditAction,
    /// What it happened to (a CA name, a serial).
    pub subject: String,
    /// Details as JSON (never secrets).
    pub detail: serde_json::Value,
}

/// One sealed entry of the audit log.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AuditEntry {
    /// Position in the log, from 1.
    pub seq: u64,
    /// Unix time of the event.
    pub time: i64,
    /// The event.
    #[serde(flatten)]
    pub event: AuditEvent,
    /// Hash of the previous entry (hex), [`GENESIS`] for the first.
    pub prev: String,
    /// This entry's hash (hex).
    pub hash: String,
}

#[derive(Serialize)]
struct Sealed<'a> {
    seq: u64,
    time: i64,
    action: AuditAction,
    subject: &'a str,
    detail: &'a serde_json::Value,
    prev: &'a str,
}

/// The JSON an entry's hash is taken over, and that hash (SHA-256, hex).
fn sealed(seq: u64, time: i64, event: &AuditEvent, prev: &str) -> Result<(Vec<u8>, String)> {
    let body = serde_json::to_vec(&Sealed {
        seq,
        time,
        action: event.action,
        subject: &event.subject,
        detail: &event.detail,
        prev,
    })
    .map_err(Error::internal)?;
    let hash = hex::encode(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &body));
    Ok((body, hash))
}

fn entry_hash(seq: u64, time: i64, event: &AuditEvent, prev: &str) -> Result<String> {
    Ok(sealed(seq, time, event, prev)?.1)
}

/// Seals `event` as entry `seq` after an entry whose hash is `prev`, straight to the stored
/// form: returns the entry's hash and its JSON, which is the hashed JSON with `hash` appended
/// (one serialization instead of two; the store writes thousands of these per batch chunk).
pub fn seal_json(seq: u64, time: i64, event: &AuditEvent, prev: &str) -> Result<(String, Vec<u8>)> {
    let (mut body, hash) = sealed(seq, time, event, prev)?;
    if body.pop() != Some(b'}') {
        return Err(Error::internal("a sealed audit entry is not a JSON object"));
    }
    body.extend_from_slice(b",\"hash\":\"");
    body.extend_from_slice(hash.as_bytes());
    body.extend_from_slice(b"\"}");
    Ok((hash, body))
}

/// Seals `event` as entry `seq` after an entry whose hash is `prev`.
pub fn seal(seq: u64, time: i64, event: AuditEvent, prev: &str) -> Result<AuditEntry> {
    let hash = entry_hash(seq, time, &event, prev)?;
    Ok(AuditEntry {
        seq,
        time,
        event,
        prev: prev.to_owned(),
        hash,
    })
}

/// Checks a log entry by entry, in order, stopping at the first bad one.
#[derive(Debug)]
pub struct ChainVerifier {
    prev: String,
    next_seq: u64,
}

impl Default for ChainVerifier {
    fn default() -> Self {
        ChainVerifier {
            prev: GENESIS.to_owned(),
            next_seq: 1,
        }
    }
}

impl ChainVerifier {
    /// Checks the next entry.
    pub fn check(&mut self, entry: &AuditEntry) -> Result<()> {
        let broken = |reason: &str| Error::AuditBroken {
            seq: entry.seq,
            reason: reason.to_owned(),
        };
        if entry.seq != self.next_seq {
            return Err(broken(&format!(
                "expected entry {} here (an entry is missing or out of order)",
                self.next_seq
            )));
        }
        if entry.prev != self.prev {
            return Err(broken(
                "its predecessor hash does not match the previous entry",
            ));
        }
        if entry_hash(entry.seq, entry.time, &entry.event, &entry.prev)? != entry.hash {
            return Err(broken("its contents do not match its hash (modified)"));
        }
        self.prev.clone_from(&entry.hash);
        self.next_seq += 1;
        Ok(())
    }

    /// How many entries have been checked.
    pub fn count(&self) -> u64 {
        self.next_seq - 1
    }
}

/// Checks a whole log, in order; returns the number of entries, or the first bad one.
pub fn verify_chain(entries: impl IntoIterator<Item = AuditEntry>) -> Result<u64> {
    let mut v = ChainVerifier::default();
    for entry in entries {
        v.check(&entry)?;
    }
    Ok(v.count())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_json_is_the_entry_and_verifies() {
        let event = AuditEvent {
            action: AuditAction::CertIssue,
            subject: "01ab".into(),
            detail: serde_json::json!({"ca": "mfr-ca", "note": "quote \" and \\ and é"}),
        };
        let (hash, json) = seal_json(7, 1_800_000_000, &event, GENESIS).unwrap();
        let entry = seal(7, 1_800_000_000, event, GENESIS).unwrap();
        assert_eq!(hash, entry.hash);
        // Byte for byte what serializing the entry gives, and it parses back to the entry.
        assert_eq!(json, serde_json::to_vec(&entry).unwrap());
        let parsed: AuditEntry = serde_json::from_slice(&json).unwrap();
        assert_eq!(parsed, entry);
        let mut v = ChainVerifier {
            prev: GENESIS.to_owned(),
            next_seq: 7,
        };
        v.check(&parsed).unwrap();
    }

    fn log(n: u64) -> Vec<AuditEntry> {
        let mut prev = GENESIS.to_owned();
        (1..=n)
            .map(|seq| {
                let e = seal(
                    seq,
                    1_700_000_000,
                    AuditEvent {
                        action: AuditAction::CertIssue,
                        subject: format!("serial-{seq}"),
                        detail: serde_json::json!({"ca": "x"}),
                    },
                    &prev,
                )
                .unwrap();
                prev = e.hash.clone();
                e
            })
            .collect()
    }

    #[test]
    fn actions_are_stored_as_their_dotted_names() {
        for action in [
            AuditAction::CaInit,
            AuditAction::CertIssue,
            AuditAction::CertRevoke,
            AuditAction::CrlIssue,
            AuditAction::RootsCreate,
            AuditAction::RootsSet,
            AuditAction::RootsAdd,
            AuditAction::RootsRemove,
            AuditAction::RootsAddCrl,
            AuditAction::RootsRemoveCrl,
        ] {
            let json = serde_json::to_string(&action).unwrap();
            assert_eq!(json, format!("\"{}\"", action.as_str()));
            assert_eq!(serde_json::from_str::<AuditAction>(&json).unwrap(), action);
        }
        // An entry sealed when the action was a string still verifies.
        let old = r#"{"seq":1,"time":1700000000,"action":"cert.issue","subject":"s","detail":{"ca":"x"},"prev":"0000000000000000000000000000000000000000000000000000000000000000"}"#;
        let hash = hex::encode(aws_lc_rs::digest::digest(
            &aws_lc_rs::digest::SHA256,
            old.as_bytes(),
        ));
        let mut stored: serde_json::Value = serde_json::from_str(old).unwrap();
        stored["hash"] = hash.into();
        let entry: AuditEntry = serde_json::from_value(stored).unwrap();
        assert_eq!(verify_chain([entry]).unwrap(), 1);
    }

    #[test]
    fn intact_chain_verifies() {
        assert_eq!(verify_chain(log(5)).unwrap(), 5);
    }

    #[test]
    fn tampering_is_found_at_the_right_entry() {
        let mut l = log(5);
        l[2].event.subject = "forged".into();
        assert!(matches!(
            verify_chain(l),
            Err(Error::AuditBroken { seq: 3, .. })
        ));
        let mut l = log(5);
        l.remove(1);
        assert!(matches!(
            verify_chain(l),
            Err(Error::AuditBroken { seq: 3, .. })
        ));
    }
}
