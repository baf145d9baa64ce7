//! `m2mpki ca`: create, list and show CAs.

use anyhow::Result;
use m2mpki_ca::{CaInit, CaKey, CaRecord, NameConstraints};
use m2mpki_hsm::KeyRef;
use serde::Serialize;

use super::{opt_time, opt_validity, Ctx};
use crate::args::CaInitArgs;
use crate::output::{emit, emit_json, table, ts};

#[derive(Serialize)]
struct CaView<'a> {
    name: &'a str,
    subject: &'a str,
    kind: &'static str,
    parent: Option<&'a str>,
    key: &'a str,
    key_type: String,
    hw_type: Option<String>,
    path_len: Option<u8>,
    name_constraints: &'a NameConstraints,
    serial: String,
    not_before: String,
    not_after: String,
    sha256: String,
}

fn ca_view(r: &CaRecord) -> CaView<'_> {
    CaView {
        name: &r.name,
        subject: &r.subject,
        kind: if r.parent.is_some() {
            "issuing"
        } else {
            "root"
        },
        parent: r.parent.as_deref(),
        key: &r.key,
        key_type: r.key_type.to_string(),
        hw_type: r.hw_type.as_ref().map(ToString::to_string),
        path_len: r.path_len,
        name_constraints: &r.name_constraints,
        serial: r.serial.to_string(),
        not_before: ts(r.not_before),
        not_after: ts(r.not_after),
        sha256: hex::encode(aws_lc_rs_digest(&r.cert_der)),
    }
}

fn aws_lc_rs_digest(der: &[u8]) -> Vec<u8> {
    m2mpki_ca::input::sha256(der)
}

pub(crate) fn init(ctx: &Ctx, a: Box<CaInitArgs>) -> Result<()> {
    let store = ctx.store()?;
    let key = match &a.key {
        Some(k) => CaKey::Existing(k.parse::<KeyRef>()?),
        None => CaKey::Generate(a.key_type.into()),
    };
    let req = CaInit {
        name: a.name.clone(),
        subject: a.subject.clone(),
        parent: a.parent.clone(),
        key,
        validity: opt_validity(a.validity.as_deref())?,
        not_before: opt_time("--not-before", a.not_before.as_deref())?,
        path_len: a.path_len,
        hw_type: a.hw_type.as_deref().map(str::parse).transpose()?,
        name_constraints: NameConstraints::new(
            &a.permit_dns,
            &a.exclude_dns,
            &a.permit_uri_domain,
            &a.exclude_uri_domain,
        )?,
        replace_key_file: a.force,
    };
    let record = m2mpki_ca::init_ca(&ctx.home, &*store, &ctx.keystore, req)?;
    // A defaulted lifetime is cut to the parent's: say so.
    let parent_not_after = match &a.parent {
        Some(p) if a.validity.is_none() => store.ca(p)?.map(|p| p.not_after),
        _ => None,
    };
    let cut_to_parent = parent_not_after == Some(record.not_after);
    if cut_to_parent && !ctx.json {
        eprintln!(
            "m2mpki: note: the default lifetime ({}) would outlive the parent CA; CA `{}` ends with its parent, {}",
            m2mpki_ca::DEFAULT_CA_VALIDITY,
            record.name,
            ts(record.not_after)
        );
    }
    if ctx.json {
        #[derive(Serialize)]
        struct Out<'a> {
            #[serde(flatten)]
            ca: CaView<'a>,
            /// The defaulted lifetime was cut to the parent's notAfter.
            lifetime_cut_to_parent: bool,
        }
        emit_json(&Out {
            ca: ca_view(&record),
            lifetime_cut_to_parent: cut_to_parent,
        })
    } else {
        emit(&format!(
            "created {} CA `{}`\n  subject   {}\n  key       {} ({})\n  valid to  {}",
            ca_view(&record).kind,
            record.name,
            record.subject,
            record.key,
            record.key_type,
            ts(record.not_after)
        ))
    }
}

pub(crate) fn list(ctx: &Ctx) -> Result<()> {
    let cas = ctx.store()?.cas()?;
    if ctx.json {
        return emit_json(&cas.iter().map(ca_view).collect::<Vec<_>>());
    }
    let rows: Vec<Vec<String>> = cas
        .iter()
        .map(|r| {
            let v = ca_view(r);
            vec![
                r.name.clone(),
                v.kind.to_owned(),
                r.parent.clone().unwrap_or_else(|| "-".into()),
                r.key_type.to_string(),
                v.not_after,
                r.subject.clone(),
            ]
        })
        .collect();
    emit(&table(
        &["NAME", "KIND", "PARENT", "KEY", "NOT AFTER", "SUBJECT"],
        &rows,
    ))
}

pub(crate) fn show(ctx: &Ctx, name: &str, pem: bool) -> Result<()> {
    let record = ctx
        .store()?
        .ca(name)?
        .ok_or_else(|| m2mpki_ca::Error::UnknownCa(name.to_owned()))?;
    if pem {
        return emit(&record.chain_pem());
    }
    let v = ca_view(&record);
    if ctx.json {
        return emit_json(&v);
    }
    let mut s = format!(
        "name        {}\nkind        {}\nsubject     {}\nparent      {}\nkey         {} ({})\nserial      {}\nnot before  {}\nnot after   {}\npath len    {}\nsha256      {}",
        v.name,
        v.kind,
        v.subject,
        v.parent.unwrap_or("-"),
        v.key,
        v.key_type,
        v.serial,
        v.not_before,
        v.not_after,
        v.path_len.map_or("unconstrained".into(), |n| n.to_string()),
        v.sha256
    );
    if let Some(hw) = &v.hw_type {
        s.push_str(&format!("\nhw type     {hw}"));
    }
    if !record.name_constraints.is_empty() {
        s.push_str(&format!(
            "\nconstraints {}",
            serde_json::to_string(&record.name_constraints)?
        ));
    }
    emit(&s)
}
