//! The hash-chained audit log.
//!
//! Every entry carries the SHA-256 of its predecessor; its own hash covers its sequence
//! number, time, action, subject, details and that predecessor hash. Changing, removing or
//! reordering any entry breaks the chain at that entry, which [`verify_chain`] reports.

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// The predecessor hash of the first entry.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// What happened, before it is sealed into the chain.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AuditEvent {
    /// What kind of event (`ca.init`, `cert.issue`, ...).
    pub action: String,
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
    action: &'a str,
    subject: &'a str,
    detail: &'a serde_json::Value,
    prev: &'a str,
}

/// The JSON an entry's hash is taken over, and that hash (SHA-256, hex).
fn sealed(seq: u64, time: i64, event: &AuditEvent, prev: &str) -> Result<(Vec<u8>, String)> {
    let body = serde_json::to_vec(&Sealed {
        seq,
        time,
        action: &event.action,
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
            action: "cert.issue".into(),
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
                        action: "cert.issue".into(),
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
