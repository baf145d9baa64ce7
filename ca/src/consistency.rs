//! Cross-checks a store's ledger against its audit log: every certificate record must match the
//! `cert.issue` entry that recorded it (CA, serial, subject key, profile, SHA-256 of the DER),
//! every DER must hash to its record's SHA-256, and a CA's CRL counter must not be behind the
//! highest CRL number its log shows. The audit chain proves the log was not changed; this check
//! carries that proof over to the ledger (a flipped bit in a record, a copy taken across a
//! commit).
//!
//! It consumes the [`Item`]s of [`Store::export`](crate::Store::export), in any order, and keeps
//! 32 bytes per certificate per side, so a ledger of millions fits in memory.

use std::collections::HashMap;

use crate::audit::{AuditAction, ChainVerifier};
use crate::store::{CertRecord, Item};
use crate::Result;

/// How many findings a report lists in full (the count is always exact).
const SHOWN: usize = 20;

/// The check, fed one item at a time.
#[derive(Debug, Default)]
pub struct StoreCheck {
    chain: ChainVerifier,
    /// (CA, serial) -> digest of what the ledger holds.
    ledger: HashMap<(String, String), [u8; 32]>,
    /// (CA, serial) -> digest of what the cert.issue entry recorded, and the entry's number.
    logged: HashMap<(String, String), ([u8; 32], u64)>,
    /// CA -> its CRL counter.
    crl_counters: HashMap<String, u64>,
    /// CA -> the highest CRL number its log shows, and that entry.
    crl_logged: HashMap<String, (u64, u64)>,
    findings: Vec<String>,
    found: u64,
    certs: u64,
}

/// What a check found.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Report {
    /// Audit entries checked (the chain is intact up to here).
    pub entries: u64,
    /// Ledger certificates checked.
    pub certificates: u64,
    /// How many differences were found.
    pub differences: u64,
    /// The first differences, one sentence each.
    pub findings: Vec<String>,
}

impl Report {
    /// Whether ledger and log agree.
    pub fn agrees(&self) -> bool {
        self.differences == 0
    }
}

fn digest(ca: &str, serial: &str, subject_key: &str, profile: &str, sha256: &str) -> [u8; 32] {
    let mut ctx = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
    for part in [ca, serial, subject_key, profile, sha256] {
        ctx.update(&(part.len() as u64).to_be_bytes());
        ctx.update(part.as_bytes());
    }
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    out
}

fn profile_name(r: &CertRecord) -> String {
    serde_json::to_value(r.profile)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

impl StoreCheck {
    fn find(&mut self, what: String) {
        self.found += 1;
        if self.findings.len() < SHOWN {
            self.findings.push(what);
        }
    }

    /// Takes the next item; an error only when the audit chain is broken (nothing after a
    /// broken link can be trusted).
    pub fn item(&mut self, item: &Item) -> Result<()> {
        match item {
            Item::Cert(c) => {
                let r = &c.record;
                self.certs += 1;
                let serial = r.serial.to_string();
                let actual = hex::encode(aws_lc_rs::digest::digest(
                    &aws_lc_rs::digest::SHA256,
                    &c.der,
                ));
                if actual != r.sha256 {
                    self.find(format!(
                        "certificate {serial} of CA `{}`: its DER hashes to {actual}, its record says {}",
                        r.ca, r.sha256
                    ));
                }
                if let Some(identity) = &r.identity {
                    if identity.to_string() != r.subject_key {
                        self.find(format!(
                            "certificate {serial} of CA `{}`: its record names identity {identity} but subject key {}",
                            r.ca, r.subject_key
                        ));
                    }
                }
                let d = digest(&r.ca, &serial, &r.subject_key, &profile_name(r), &r.sha256);
                self.ledger.insert((r.ca.clone(), serial), d);
            }
            Item::CrlNumber { ca, last } => {
                self.crl_counters.insert(ca.clone(), *last);
            }
            Item::Audit(entry) => {
                self.chain.check(entry)?;
                let detail = &entry.event.detail;
                let text = |k: &str| detail.get(k).and_then(|v| v.as_str()).unwrap_or_default();
                match entry.event.action {
                    AuditAction::CertIssue => {
                        let ca = text("ca").to_owned();
                        let d = digest(
                            &ca,
                            &entry.event.subject,
                            text("subject_key"),
                            text("profile"),
                            text("sha256"),
                        );
                        self.logged
                            .insert((ca, entry.event.subject.clone()), (d, entry.seq));
                    }
                    AuditAction::CrlIssue => {
                        if let Some(n) = detail.get("crl_number").and_then(|v| v.as_u64()) {
                            let top = self
                                .crl_logged
                                .entry(entry.event.subject.clone())
                                .or_insert((n, entry.seq));
                            if n >= top.0 {
                                *top = (n, entry.seq);
                            }
                        }
                    }
                    _ => {}
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// The report, once every item was seen.
    pub fn finish(mut self) -> Report {
        let ledger = std::mem::take(&mut self.ledger);
        let mut logged = std::mem::take(&mut self.logged);
        let mut keys: Vec<_> = ledger.keys().cloned().collect();
        keys.sort_unstable();
        for key in keys {
            let (ca, serial) = &key;
            match logged.remove(&key) {
                None => self.find(format!(
                    "certificate {serial} of CA `{ca}` is in the ledger but no cert.issue entry records it"
                )),
                Some((d, seq)) if d != ledger[&key] => self.find(format!(
                    "certificate {serial} of CA `{ca}`: its ledger record (subject key, profile or SHA-256) differs from audit entry {seq} that recorded it"
                )),
                Some(_) => {}
            }
        }
        let mut missing: Vec<_> = logged.into_iter().collect();
        missing.sort_unstable_by_key(|(_, (_, seq))| *seq);
        for ((ca, serial), (_, seq)) in missing {
            self.find(format!(
                "audit entry {seq} records certificate {serial} of CA `{ca}`, which the ledger lacks"
            ));
        }
        let mut cas: Vec<_> = std::mem::take(&mut self.crl_logged).into_iter().collect();
        cas.sort_unstable();
        for (ca, (n, seq)) in cas {
            let counter = self.crl_counters.get(&ca).copied().unwrap_or(0);
            if counter < n {
                self.find(format!(
                    "CA `{ca}`: its CRL counter is {counter}, but audit entry {seq} records CRL number {n} (the next CRL would reuse a number)"
                ));
            }
        }
        Report {
            entries: self.chain.count(),
            certificates: self.certs,
            differences: self.found,
            findings: self.findings,
        }
    }
}

/// Checks the whole of `store` in one export (one snapshot where the backend gives one).
pub fn check(store: &dyn crate::Store) -> Result<Report> {
    let mut check = StoreCheck::default();
    store.export(&mut |item| check.item(&item))?;
    Ok(check.finish())
}
