//! `m2mpki certs`, `revoke`, `crl` and `audit`: the ledger, revocation and the audit log.

use std::path::{Path, PathBuf};

use anyhow::Result;
use m2mpki_ca::profile::ProfileKind;
use m2mpki_ca::validity::Validity;
use m2mpki_ca::{Authority, CertFilter, CertRecord};
use m2mpki_hsm::files::{self, Mode};
use serde::Serialize;
use time::OffsetDateTime;

use super::{write_options, Ctx};
use crate::output::{csv_field, emit, emit_json, table, ts, UsageError};

#[derive(Serialize)]
pub(crate) struct CertView {
    serial: String,
    ca: String,
    profile: ProfileKind,
    identity: Option<String>,
    subject_key: String,
    subject: String,
    not_before: String,
    not_after: String,
    issued_at: String,
    status: m2mpki_ca::CertStatus,
    sha256: String,
    /// Who asked for it (none for certificates of versions that did not record it).
    #[serde(skip_serializing_if = "Option::is_none")]
    requested_by: Option<m2mpki_ca::Requester>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) out: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) key_out: Option<PathBuf>,
}

pub(crate) fn cert_view(r: &CertRecord) -> CertView {
    CertView {
        serial: r.serial.to_string(),
        ca: r.ca.clone(),
        profile: r.profile,
        identity: r.identity.as_ref().map(ToString::to_string),
        subject_key: r.subject_key.clone(),
        subject: r.subject.clone(),
        not_before: ts(r.not_before),
        not_after: ts(r.not_after),
        issued_at: ts(r.issued_at),
        status: r.status,
        sha256: r.sha256.clone(),
        requested_by: r.requested_by.clone(),
        out: None,
        key_out: None,
    }
}

pub(crate) fn list(ctx: &Ctx, ca: Option<String>, id: Option<String>, csv: bool) -> Result<()> {
    let store = ctx.store()?;
    if let Some(ca) = &ca {
        store
            .ca(ca)?
            .ok_or_else(|| m2mpki_ca::Error::UnknownCa(ca.clone()))?;
    }
    let certs = store.certs(&CertFilter { ca, id })?;
    if ctx.json {
        return emit_json(&certs.iter().map(cert_view).collect::<Vec<_>>());
    }
    if csv {
        let mut s =
            String::from("serial,ca,profile,subject_key,not_before,not_after,status,sha256\n");
        for r in &certs {
            let v = cert_view(r);
            let status = serde_json::to_value(v.status)?;
            s.push_str(
                &[
                    v.serial,
                    v.ca,
                    v.profile.to_string(),
                    v.subject_key,
                    v.not_before,
                    v.not_after,
                    status.as_str().unwrap_or_default().to_owned(),
                    v.sha256,
                ]
                .iter()
                .map(|f| csv_field(f))
                .collect::<Vec<_>>()
                .join(","),
            );
            s.push('\n');
        }
        return emit(&s);
    }
    let rows: Vec<Vec<String>> = certs
        .iter()
        .map(|r| {
            let v = cert_view(r);
            vec![
                v.serial,
                v.ca,
                v.profile.to_string(),
                v.subject_key,
                v.not_after,
            ]
        })
        .collect();
    emit(&table(
        &["SERIAL", "CA", "PROFILE", "SUBJECT", "NOT AFTER"],
        &rows,
    ))
}

pub(crate) fn show(ctx: &Ctx, serial: Option<String>, id: Option<String>, pem: bool) -> Result<()> {
    let store = ctx.store()?;
    let serials = match (serial, id) {
        (Some(s), _) => vec![s.parse()?],
        (None, Some(id)) => store
            .certs(&CertFilter {
                ca: None,
                id: Some(id.clone()),
            })?
            .into_iter()
            .map(|r| r.serial)
            .collect(),
        (None, None) => return Err(UsageError("give a SERIAL or --id".into()).into()),
    };
    let mut found = Vec::new();
    for s in &serials {
        let (r, der) = store
            .cert(s)?
            .ok_or_else(|| m2mpki_ca::Error::CertNotFound(format!("with serial {s}")))?;
        found.push((r, der));
    }
    if found.is_empty() {
        return Err(m2mpki_ca::Error::CertNotFound("for that ID".into()).into());
    }
    if pem {
        let text: String = found
            .iter()
            .map(|(_, der)| files::pem_encode("CERTIFICATE", der))
            .collect();
        return emit(&text);
    }
    let views: Vec<CertView> = found.iter().map(|(r, _)| cert_view(r)).collect();
    if ctx.json {
        return if views.len() == 1 {
            emit_json(&views[0])
        } else {
            emit_json(&views)
        };
    }
    let text = views
        .iter()
        .map(|v| {
            format!(
                "serial      {}\nca          {}\nprofile     {}\nsubject     {}\nidentity    {}\nnot before  {}\nnot after   {}\nissued at   {}\nstatus      {}\nsha256      {}\nrequested   {}",
                v.serial,
                v.ca,
                v.profile,
                v.subject,
                v.subject_key,
                v.not_before,
                v.not_after,
                v.issued_at,
                serde_json::to_value(v.status).ok().and_then(|s| s.as_str().map(str::to_owned)).unwrap_or_default(),
                v.sha256,
                v.requested_by.as_ref().map_or_else(|| "(not recorded)".to_owned(), ToString::to_string)
            )
        })
        .collect::<Vec<_>>()
        .join("\n\n");
    emit(&text)
}

pub(crate) fn audit_verify(ctx: &Ctx) -> Result<()> {
    let store = ctx.store()?;
    let report = m2mpki_ca::consistency::check(&*store)?;
    if !report.agrees() {
        return Err(m2mpki_ca::Error::LedgerDiffers {
            differences: report.differences,
            findings: report.findings,
        }
        .into());
    }
    if ctx.json {
        emit_json(&serde_json::json!({
            "ok": true,
            "entries": report.entries,
            "certificates": report.certificates,
        }))
    } else {
        emit(&format!(
            "audit log intact: {} entries; the ledger's {} certificates match them",
            report.entries, report.certificates
        ))
    }
}

pub(crate) fn revoke(ctx: &Ctx, serial: &str, ca: &str, reason: &str) -> Result<()> {
    let store = ctx.store()?;
    store
        .ca(ca)?
        .ok_or_else(|| m2mpki_ca::Error::UnknownCa(ca.to_owned()))?;
    let serial: m2mpki_ca::Serial = serial.parse()?;
    let reason: m2mpki_ca::revocation::RevocationReason = reason.parse()?;
    let record = m2mpki_ca::revocation::revoke(
        &*store,
        ca,
        &serial,
        reason,
        OffsetDateTime::now_utc().unix_timestamp(),
    )?;
    if ctx.json {
        emit_json(&cert_view(&record))
    } else {
        emit(&format!(
            "revoked {} ({}) of CA `{ca}`: {reason}",
            record.serial, record.subject_key
        ))
    }
}

pub(crate) fn crl(
    ctx: &Ctx,
    ca: &str,
    out: &Path,
    next_update: &str,
    der: bool,
    force: bool,
) -> Result<()> {
    if !force && out.exists() {
        return Err(m2mpki_hsm::Error::FileExists(out.to_owned()).into());
    }
    let next_update: Validity = next_update.parse()?;
    let store = ctx.store()?;
    let authority = Authority::load(&ctx.home, &*store, &ctx.keystore, ca)?;
    let crl = m2mpki_ca::revocation::issue_crl(&*store, &authority, next_update)?;
    let bytes = if der {
        crl.der.clone()
    } else {
        files::pem_encode("X509 CRL", &crl.der).into_bytes()
    };
    files::write_atomic(out, &bytes, write_options(Mode::Public, force))?;
    if ctx.json {
        emit_json(&crl)
    } else {
        emit(&format!(
            "CRL {} of `{ca}`: {} entries, next update {}, written to {}",
            crl.number,
            crl.entries,
            ts(crl.next_update),
            out.display()
        ))
    }
}
