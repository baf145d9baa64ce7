//! `m2mpki roots`: the agreed root sets.

use anyhow::Result;
use m2mpki_hsm::files::{self, Mode};
use serde::Serialize;
use time::OffsetDateTime;

use super::{opt_time, write_options, Ctx};
use crate::args::{PurposeArg, RootsCommand, SetKind};
use crate::output::{emit, emit_json, table, ts, UsageError};
use m2mpki_ca::rootset::AddReport;

#[derive(Serialize)]
struct AnchorView<'a> {
    subject: &'a str,
    sha256: &'a str,
    not_before: String,
    not_after: String,
    key_type: &'a str,
    self_signed: bool,
}

fn anchor_view(a: &m2mpki_ca::rootset::Anchor) -> AnchorView<'_> {
    AnchorView {
        subject: &a.subject,
        sha256: &a.sha256,
        not_before: ts(a.not_before),
        not_after: ts(a.not_after),
        key_type: &a.key_type,
        self_signed: a.self_signed,
    }
}

pub(crate) fn run(ctx: &Ctx, cmd: RootsCommand) -> Result<()> {
    use m2mpki_ca::roots;
    use m2mpki_ca::rootset::{Anchor, CrlRecord, RevocationPolicy, RootSetKind};
    let store = ctx.store()?;
    let unknown = |name: &str| m2mpki_ca::Error::UnknownRootSet(name.to_owned());
    match cmd {
        RootsCommand::Create {
            set,
            kind,
            vertical,
            enterprise,
            revocation,
            crl_grace,
        } => {
            let revocation = RevocationPolicy {
                mode: revocation.into(),
                crl_grace,
            };
            let kind = match kind {
                SetKind::Device => RootSetKind::device(
                    &vertical.ok_or_else(|| UsageError("--kind device needs --vertical".into()))?,
                )?,
                SetKind::Node => RootSetKind::node(
                    enterprise
                        .ok_or_else(|| UsageError("--kind node needs --enterprise".into()))?
                        .parse()?,
                ),
                SetKind::Infrastructure => RootSetKind::Infrastructure,
            };
            let created = roots::create(
                &*store,
                &set,
                kind,
                revocation,
                OffsetDateTime::now_utc().unix_timestamp(),
            )?;
            if ctx.json {
                emit_json(
                    &serde_json::json!({ "set": set, "kind": created.kind, "revocation": revocation }),
                )
            } else {
                emit(&format!(
                    "created root set `{set}`: {}, revocation {revocation}",
                    created.kind
                ))
            }
        }
        RootsCommand::Set {
            set,
            revocation,
            crl_grace,
        } => {
            if revocation.is_none() && crl_grace.is_none() {
                return Err(UsageError("give --revocation and/or --crl-grace".into()).into());
            }
            let policy = roots::set_policy(&*store, &set, revocation.map(Into::into), crl_grace)?;
            if ctx.json {
                emit_json(&serde_json::json!({ "set": set, "revocation": policy }))
            } else {
                emit(&format!("`{set}`: revocation {policy}"))
            }
        }
        RootsCommand::Add { set, files } => {
            let mut anchors = Vec::new();
            for f in &files {
                for der in m2mpki_ca::input::read_der_objects(f, &["CERTIFICATE"])? {
                    anchors.push(Anchor::from_der(&der, &f.display().to_string())?);
                }
            }
            added(ctx, &set, &roots::add_anchors(&*store, &set, anchors)?)
        }
        RootsCommand::AddCa { set, ca } => {
            let record = store
                .ca(&ca)?
                .ok_or_else(|| m2mpki_ca::Error::UnknownCa(ca.clone()))?;
            let anchor = Anchor::from_der(record.root_der(), &format!("CA {ca}"))?;
            added(ctx, &set, &roots::add_anchors(&*store, &set, vec![anchor])?)
        }
        RootsCommand::Remove { set, fingerprint } => {
            let a = roots::remove_anchor(&*store, &set, &fingerprint)?;
            if ctx.json {
                emit_json(&anchor_view(&a))
            } else {
                emit(&format!("removed `{}` from `{set}`", a.subject))
            }
        }
        RootsCommand::List { set: None } => {
            let sets = store.root_sets()?;
            if ctx.json {
                let v: Vec<_> = sets
                    .iter()
                    .map(|s| serde_json::json!({
                        "set": s.name, "kind": s.kind, "anchors": s.anchors.len(), "crls": s.crls.len(),
                        "revocation": s.revocation
                    }))
                    .collect();
                return emit_json(&v);
            }
            let rows: Vec<Vec<String>> = sets
                .iter()
                .map(|s| {
                    vec![
                        s.name.clone(),
                        s.kind.to_string(),
                        s.anchors.len().to_string(),
                        s.crls.len().to_string(),
                        s.revocation.to_string(),
                    ]
                })
                .collect();
            emit(&table(
                &["SET", "KIND", "ANCHORS", "CRLS", "REVOCATION"],
                &rows,
            ))
        }
        RootsCommand::List { set: Some(name) } => {
            let s = store.root_set(&name)?.ok_or_else(|| unknown(&name))?;
            if ctx.json {
                return emit_json(&serde_json::json!({
                    "set": s.name,
                    "kind": s.kind,
                    "revocation": s.revocation,
                    "anchors": s.anchors.iter().map(anchor_view).collect::<Vec<_>>(),
                    "crls": s.crls.iter().map(|c| serde_json::json!({
                        "issuer": c.issuer, "number": c.number, "entries": c.entries,
                        "this_update": ts(c.this_update), "next_update": c.next_update.map(ts), "sha256": c.sha256
                    })).collect::<Vec<_>>(),
                }));
            }
            let rows: Vec<Vec<String>> = s
                .anchors
                .iter()
                .map(|a| {
                    let v = anchor_view(a);
                    vec![
                        v.sha256.to_owned(),
                        v.key_type.to_owned(),
                        v.not_after,
                        v.subject.to_owned(),
                    ]
                })
                .collect();
            let mut out = format!(
                "root set `{}`: {}, revocation {}\n",
                s.name, s.kind, s.revocation
            );
            out.push_str(&table(&["SHA256", "KEY", "NOT AFTER", "SUBJECT"], &rows));
            for c in &s.crls {
                out.push_str(&format!(
                    "CRL of `{}`: number {}, {} entries, next update {}, sha256 {}\n",
                    c.issuer,
                    c.number.as_deref().unwrap_or("-"),
                    c.entries,
                    c.next_update.map_or("-".into(), ts),
                    c.sha256
                ));
            }
            emit(&out)
        }
        RootsCommand::Export { set, out, force } => {
            let s = store.root_set(&set)?.ok_or_else(|| unknown(&set))?;
            let text: String = s
                .anchors
                .iter()
                .map(|a| files::pem_encode("CERTIFICATE", &a.der))
                .collect();
            files::write_atomic(&out, text.as_bytes(), write_options(Mode::Public, force))?;
            if ctx.json {
                emit_json(
                    &serde_json::json!({ "set": set, "anchors": s.anchors.len(), "out": out }),
                )
            } else {
                emit(&format!(
                    "wrote {} anchors of `{set}` to {}",
                    s.anchors.len(),
                    out.display()
                ))
            }
        }
        RootsCommand::RemoveCrl { set, fingerprint } => {
            let crl = roots::detach_crl(&*store, &set, &fingerprint)?;
            if ctx.json {
                emit_json(
                    &serde_json::json!({ "set": set, "removed": { "issuer": crl.issuer, "number": crl.number, "sha256": crl.sha256 } }),
                )
            } else {
                emit(&format!(
                    "detached CRL of `{}` (number {}) from `{set}`",
                    crl.issuer,
                    crl.number.as_deref().unwrap_or("-")
                ))
            }
        }
        RootsCommand::AddCrl {
            set,
            file,
            issuer_cert,
        } => {
            // Candidate signers: the given certificates and every CA of this home. Only those
            // that chain to an anchor of the set count (checked by attach_crl).
            let mut issuers: Vec<Vec<u8>> = Vec::new();
            for f in &issuer_cert {
                issuers.extend(m2mpki_ca::verify::read_chain(f)?);
            }
            issuers.extend(store.cas()?.into_iter().map(|c| c.cert_der));
            let mut ders = m2mpki_ca::input::read_der_objects(&file, &["X509 CRL"])?;
            if ders.len() != 1 {
                return Err(UsageError(format!(
                    "{}: holds {} CRLs; add one at a time",
                    file.display(),
                    ders.len()
                ))
                .into());
            }
            let crl = CrlRecord::from_der(&ders.remove(0), &file.display().to_string())?;
            let view = serde_json::json!({ "issuer": crl.issuer, "number": crl.number, "entries": crl.entries, "sha256": crl.sha256 });
            let changed = roots::attach_crl(&*store, &set, crl.clone(), &issuers)?;
            if ctx.json {
                emit_json(&serde_json::json!({ "set": set, "crl": view, "changed": changed }))
            } else if changed {
                emit(&format!(
                    "attached CRL of `{}` (number {}, {} entries) to `{set}`",
                    crl.issuer,
                    crl.number.as_deref().unwrap_or("-"),
                    crl.entries
                ))
            } else {
                emit(&format!("`{set}` already has this CRL"))
            }
        }
        RootsCommand::Verify {
            set,
            chain,
            purpose,
            name,
            at,
        } => {
            use m2mpki_ca::verify::{self, Purpose};
            let s = store.root_set(&set)?.ok_or_else(|| unknown(&set))?;
            let ders = verify::read_chain(&chain)?;
            let purpose = match purpose {
                Some(PurposeArg::Client) => Purpose::Client,
                Some(PurposeArg::Server) => Purpose::Server,
                None if matches!(s.kind, RootSetKind::Infrastructure) => Purpose::Server,
                None => Purpose::Client,
            };
            // A DNS name (checked like everywhere else) or an IP address.
            let name: Option<rustls_pki_types::ServerName<'static>> = match name.as_deref() {
                None => None,
                Some(n) => Some(match n.parse::<std::net::IpAddr>() {
                    Ok(ip) => rustls_pki_types::ServerName::IpAddress(ip.into()),
                    Err(_) => {
                        let dns: m2mpki_ca::DnsName = n.parse()?;
                        rustls_pki_types::ServerName::try_from(dns.as_str().to_owned())
                            .map_err(|e| m2mpki_ca::Error::invalid("--name", n, e.to_string()))?
                    }
                }),
            };
            let at = opt_time("--at", at.as_deref())?.unwrap_or_else(OffsetDateTime::now_utc);
            match verify::verify_with(
                &s,
                &ders,
                purpose,
                name.as_ref(),
                at,
                verify::EkuPolicy::Required,
            ) {
                Ok(v) => {
                    if ctx.json {
                        emit_json(&serde_json::json!({ "valid": true, "result": v }))
                    } else {
                        emit(&format!(
                            "valid: {} (set `{}`, {}){}",
                            v.subject,
                            v.set,
                            v.kind,
                            v.identity
                                .map(|i| format!("\n  identity  {i}"))
                                .unwrap_or_default()
                        ))
                    }
                }
                Err(refusal) => {
                    if ctx.json {
                        emit_json(
                            &serde_json::json!({ "valid": false, "code": refusal.code(), "reason": refusal.to_string() }),
                        )?;
                    }
                    Err(anyhow::Error::from(m2mpki_ca::Error::from(refusal))
                        .context(format!("{}", chain.display())))
                }
            }
        }
    }
}

/// Prints what adding anchors did.
fn added(ctx: &Ctx, set: &str, report: &AddReport) -> Result<()> {
    for subject in &report.not_self_signed {
        eprintln!(
            "m2mpki: warning: `{subject}` is not self-signed; it is trusted as an anchor as it is"
        );
    }
    if ctx.json {
        emit_json(report)
    } else {
        let mut out = format!("added {} anchor(s) to `{set}`", report.added.len());
        for d in &report.duplicates {
            out.push_str(&format!("\n  already present: {d}"));
        }
        emit(&out)
    }
}
