//! Root-set administration: every change to an agreed root set, checked and audited in one
//! place. The `roots` commands and the lab call these; nothing else writes a set.

use serde_json::json;

use crate::audit::{AuditAction, AuditEvent};
use crate::identity::DnsName;
use crate::rootset::{
    check_set_name, AddReport, Anchor, CrlRecord, RevocationMode, RevocationPolicy, RootSet,
    RootSetKind,
};
use crate::store::Store;
use crate::{Error, Result};

impl RootSetKind {
    /// A device set of `vertical` (1–64 characters, no control characters).
    pub fn device(vertical: &str) -> Result<Self> {
        if vertical.is_empty() || vertical.len() > 64 || vertical.chars().any(char::is_control) {
            return Err(Error::invalid(
                "vertical",
                vertical,
                "expected 1 to 64 characters, none of them control characters",
            ));
        }
        Ok(RootSetKind::Device {
            vertical: vertical.to_owned(),
        })
    }

    /// A node set of `enterprise`.
    pub fn node(enterprise: DnsName) -> Self {
        RootSetKind::Node { enterprise }
    }
}

fn event(action: AuditAction, set: &str, detail: serde_json::Value) -> AuditEvent {
    AuditEvent {
        action,
        subject: set.to_owned(),
        detail,
    }
}

/// Creates an empty set named `name` (checked) at Unix time `now`.
pub fn create<S: Store + ?Sized>(
    store: &S,
    name: &str,
    kind: RootSetKind,
    revocation: RevocationPolicy,
    now: i64,
) -> Result<RootSet> {
    check_set_name(name)?;
    let set = RootSet {
        name: name.to_owned(),
        kind,
        anchors: vec![],
        crls: vec![],
        revocation,
        created: now,
    };
    let mut detail = serde_json::to_value(&set.kind).map_err(Error::internal)?;
    detail["revocation"] = serde_json::to_value(revocation).map_err(Error::internal)?;
    store.create_root_set(&set, event(AuditAction::RootsCreate, name, detail))?;
    Ok(set)
}

/// Changes a set's revocation policy: the mode, the CRL grace (seconds), or both.
pub fn set_policy<S: Store + ?Sized>(
    store: &S,
    name: &str,
    mode: Option<RevocationMode>,
    crl_grace: Option<u64>,
) -> Result<RevocationPolicy> {
    if mode.is_none() && crl_grace.is_none() {
        return Err(Error::invalid(
            "revocation policy",
            "",
            "give a mode, a CRL grace or both",
        ));
    }
    let set = store.modify_root_set(name, &mut |s| {
        if let Some(m) = mode {
            s.revocation.mode = m;
        }
        if let Some(g) = crl_grace {
            s.revocation.crl_grace = g;
        }
        Ok(event(
            AuditAction::RootsSet,
            name,
            json!({ "revocation": s.revocation }),
        ))
    })?;
    Ok(set.revocation)
}

/// Adds anchors (already parsed and checked to be CA certificates), skipping duplicates.
pub fn add_anchors<S: Store + ?Sized>(
    store: &S,
    name: &str,
    anchors: Vec<Anchor>,
) -> Result<AddReport> {
    let mut report = AddReport::default();
    store.modify_root_set(name, &mut |s| {
        report = s.add_anchors(anchors.clone());
        Ok(event(
            AuditAction::RootsAdd,
            name,
            json!({ "added": report.added, "duplicates": report.duplicates }),
        ))
    })?;
    Ok(report)
}

/// Removes the anchor whose certificate has this SHA-256 (hex, any case, `:` allowed).
pub fn remove_anchor<S: Store + ?Sized>(store: &S, name: &str, sha256: &str) -> Result<Anchor> {
    let fp = normalise_fingerprint(sha256);
    let mut removed = None;
    store.modify_root_set(name, &mut |s| {
        removed = Some(s.remove_anchor(&fp)?);
        Ok(event(
            AuditAction::RootsRemove,
            name,
            json!({ "sha256": fp }),
        ))
    })?;
    removed.ok_or_else(|| Error::UnknownRootSet(name.to_owned()))
}

/// Attaches a CRL after [`RootSet::attach_crl`]'s checks (a CA the set trusts signed it; the
/// number never goes back). `issuers` are candidate signer certificates (DER). Returns whether
/// the set changed (false: it already had this CRL).
pub fn attach_crl<S: Store + ?Sized>(
    store: &S,
    name: &str,
    crl: CrlRecord,
    issuers: &[Vec<u8>],
) -> Result<bool> {
    let mut changed = false;
    let detail = crl_detail(&crl);
    store.modify_root_set(name, &mut |s| {
        changed = s.attach_crl(crl.clone(), issuers)?;
        Ok(event(AuditAction::RootsAddCrl, name, detail.clone()))
    })?;
    Ok(changed)
}

/// Detaches the CRL whose DER has this SHA-256.
pub fn detach_crl<S: Store + ?Sized>(store: &S, name: &str, sha256: &str) -> Result<CrlRecord> {
    let fp = normalise_fingerprint(sha256);
    let mut removed = None;
    store.modify_root_set(name, &mut |s| {
        let crl = s.detach_crl(&fp)?;
        let detail = crl_detail(&crl);
        removed = Some(crl);
        Ok(event(AuditAction::RootsRemoveCrl, name, detail))
    })?;
    removed.ok_or_else(|| Error::UnknownRootSet(name.to_owned()))
}

/// What the audit log says of a CRL.
fn crl_detail(crl: &CrlRecord) -> serde_json::Value {
    json!({ "issuer": crl.issuer, "number": crl.number, "entries": crl.entries, "sha256": crl.sha256 })
}

/// A SHA-256 fingerprint as sets store it: lowercase hex without separators.
pub fn normalise_fingerprint(s: &str) -> String {
    s.chars()
        .filter(|c| *c != ':')
        .collect::<String>()
        .to_ascii_lowercase()
}
