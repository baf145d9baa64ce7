//! Turns parsed arguments into library requests, runs them and prints the results.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use m2mpki_ca::batch::{self, BatchInput, BatchOptions};
use m2mpki_ca::input::VerifiedCsr;
use m2mpki_ca::profile::{LeafProfile, ProfileKind};
use m2mpki_ca::validity::{format_time, parse_time, Validity};
use m2mpki_ca::{
    audit::ChainVerifier, Authority, CaInit, CaKey, CaRecord, CertFilter, CertRecord, Home,
    LeafRequest, LeafSubject, NameConstraints, Store,
};
use m2mpki_hsm::files::{self, Mode, Overwrite, WriteOptions};
use m2mpki_hsm::{KeyRef, Keystore, Passphrase, SoftwareKey};
use rcgen::PublicKeyData;
use serde::Serialize;
use time::OffsetDateTime;

use crate::args::{
    AuditCommand, BatchArgs, BatchProfile, CaCommand, CaInitArgs, CertsCommand, Cli, Command,
    HsmCommand, IssueArgs, IssueCommand, PurposeArg, RevocationArg, RootsCommand, SetKind,
};
use crate::output::{csv_field, emit, emit_json, table, UsageError};

struct Ctx {
    home: Home,
    json: bool,
    keystore: Keystore,
}

impl Ctx {
    fn store(&self) -> Result<m2mpki_ca::RedbStore> {
        Ok(self.home.store()?)
    }
}

fn default_home() -> Result<PathBuf> {
    directories::ProjectDirs::from("org", "m2mpki", "m2mpki")
        .map(|d| d.data_dir().to_path_buf())
        .ok_or_else(|| UsageError("no home folder: give --home or set M2MPKI_HOME".into()).into())
}

fn passphrase(path: Option<&Path>) -> Result<Option<Passphrase>> {
    Ok(match path {
        Some(p) => Some(Passphrase::from_file(p)?),
        None => None,
    })
}

/// Runs one command.
pub fn run(cli: Cli) -> Result<()> {
    let home = match &cli.home {
        Some(h) => h.clone(),
        None => default_home()?,
    };
    let mut pkcs11 = m2mpki_hsm::pkcs11::Pkcs11Config {
        module: cli.pkcs11_module.clone(),
        pin_prompt: Some(std::sync::Arc::new(crate::prompt::pin_from_terminal)),
        warn: Some(std::sync::Arc::new(|w: &str| {
            eprintln!("m2mpki: warning: {w}")
        })),
        ..Default::default()
    };
    if let Some(n) = cli.pkcs11_sessions {
        pkcs11.sessions = n.max(1);
    }
    let keystore = Keystore::new(passphrase(cli.key_pass_file.as_deref())?).with_pkcs11(pkcs11);
    // Token commands need no home folder.
    let cmd = match cli.command {
        Command::Hsm(cmd) => return hsm(&keystore, cli.json, cmd),
        Command::Bootstrap(cmd) => {
            return crate::bootstrap_cmd::run(&home, &keystore, cli.json, cmd)
        }
        Command::Lab(cmd) => return crate::lab_cmd::run(cli.json, cmd),
        other => other,
    };
    let ctx = Ctx {
        home: Home::open(&home)?,
        json: cli.json,
        keystore,
    };
    match cmd {
        Command::Hsm(_) | Command::Bootstrap(_) | Command::Lab(_) => Ok(()),
        Command::Roots(cmd) => roots(&ctx, cmd),
        Command::Revoke { serial, ca, reason } => revoke(&ctx, &serial, &ca, &reason),
        Command::Crl {
            ca,
            out,
            next_update,
            der,
            force,
        } => crl(&ctx, &ca, &out, &next_update, der, force),
        Command::Ca(CaCommand::Init(args)) => ca_init(&ctx, args),
        Command::Ca(CaCommand::List) => ca_list(&ctx),
        Command::Ca(CaCommand::Show { name, pem }) => ca_show(&ctx, &name, pem),
        Command::Issue(IssueCommand::Device { id, common }) => {
            let subject = LeafSubject::Device(id.parse()?);
            issue_one(&ctx, subject, common)
        }
        Command::Issue(IssueCommand::Node {
            enterprise,
            id,
            common,
        }) => {
            let subject = LeafSubject::Node {
                enterprise: enterprise.parse()?,
                id: id.parse()?,
            };
            issue_one(&ctx, subject, common)
        }
        Command::Issue(IssueCommand::Server { fqdn, common }) => {
            issue_one(&ctx, LeafSubject::Server(fqdn.parse()?), common)
        }
        Command::Issue(IssueCommand::Batch(args)) => issue_batch(&ctx, args),
        Command::Certs(CertsCommand::List { ca, id, csv }) => certs_list(&ctx, ca, id, csv),
        Command::Certs(CertsCommand::Show { serial, id, pem }) => certs_show(&ctx, serial, id, pem),
        Command::Audit(AuditCommand::Verify) => audit_verify(&ctx),
    }
}

fn opt_time(what: &'static str, s: Option<&str>) -> Result<Option<OffsetDateTime>> {
    Ok(match s {
        Some(s) => Some(parse_time(what, s)?),
        None => None,
    })
}

fn opt_validity(s: Option<&str>) -> Result<Option<Validity>> {
    Ok(match s {
        Some(s) => Some(s.parse()?),
        None => None,
    })
}

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

pub(crate) fn ts(unix: i64) -> String {
    OffsetDateTime::from_unix_timestamp(unix)
        .map(format_time)
        .unwrap_or_else(|_| unix.to_string())
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

fn ca_init(ctx: &Ctx, a: Box<CaInitArgs>) -> Result<()> {
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
    };
    let record = m2mpki_ca::init_ca(&ctx.home, &store, &ctx.keystore, req)?;
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
    let nc = &record.name_constraints;
    if !(nc.permitted_uri_domains.is_empty() && nc.excluded_uri_domains.is_empty()) {
        eprintln!(
            "m2mpki: warning: CA `{}` carries URI name constraints. OpenSSL honours them, but rustls-webpki \
             (used by `roots verify` and the bootstrap server) refuses every certificate with a URI \
             subjectAltName below such a CA, so its node certificates cannot bootstrap with m2mpki. \
             Node root sets keep node identities to their enterprise instead.",
            record.name
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

fn ca_list(ctx: &Ctx) -> Result<()> {
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

fn ca_show(ctx: &Ctx, name: &str, pem: bool) -> Result<()> {
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

fn write_options(mode: Mode, force: bool) -> WriteOptions {
    WriteOptions {
        mode,
        overwrite: if force {
            Overwrite::Replace
        } else {
            Overwrite::Refuse
        },
        sync: true,
    }
}

#[derive(Serialize)]
struct CertView {
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
    #[serde(skip_serializing_if = "Option::is_none")]
    out: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    key_out: Option<PathBuf>,
}

fn cert_view(r: &CertRecord) -> CertView {
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
        out: None,
        key_out: None,
    }
}

fn issue_one(ctx: &Ctx, subject: LeafSubject, a: IssueArgs) -> Result<()> {
    // Refuse existing outputs before anything is signed or recorded.
    for path in [Some(&a.out), a.key_out.as_ref()].into_iter().flatten() {
        if !a.force && path.exists() {
            return Err(m2mpki_hsm::Error::FileExists(path.clone()).into());
        }
    }
    let store = ctx.store()?;
    let authority = Authority::load(&ctx.home, &store, &ctx.keystore, &a.ca)?;
    let (public_key, new_key) = match (&a.csr, &a.key_out) {
        (Some(csr), _) => (VerifiedCsr::from_file(csr)?.public_key, None),
        (None, Some(_)) => {
            let key = SoftwareKey::generate(a.key_type.into())?;
            let spki = rcgen::SubjectPublicKeyInfo::from_der(&key.subject_public_key_info())
                .context("generated key")?;
            (spki, Some(key))
        }
        (None, None) => return Err(UsageError("give --csr or --key-out".into()).into()),
    };
    let profile = LeafProfile::builtin(subject.kind());
    let req = LeafRequest {
        subject,
        public_key,
        validity: opt_validity(a.validity.as_deref())?,
        not_before: opt_time("--not-before", a.not_before.as_deref())?,
    };
    // Check the request and the ledger before the key file is written, so a refusal leaves
    // nothing behind.
    let approved = authority.approve(&profile, req.clone())?;
    if !a.reissue {
        if let Some(serial) = store.live_cert(&authority.record.name, approved.subject_key())? {
            return Err(m2mpki_ca::Error::AlreadyIssued {
                ca: authority.record.name.clone(),
                identity: approved.subject_key().to_owned(),
                serial: serial.to_string(),
            }
            .into());
        }
    }
    drop(approved);
    if let (Some(mut key), Some(path)) = (new_key, &a.key_out) {
        let pass = passphrase(a.key_out_pass_file.as_deref())?;
        key.save(
            path,
            pass.as_ref(),
            if a.force {
                Overwrite::Replace
            } else {
                Overwrite::Refuse
            },
        )?;
    }
    let cert = match m2mpki_ca::issue(&store, &authority, &profile, req, a.reissue) {
        Ok(cert) => cert,
        Err(e) => {
            // The key certifies nothing: do not leave it behind.
            if let Some(path) = &a.key_out {
                let _ = std::fs::remove_file(path);
            }
            return Err(e.into());
        }
    };
    let bytes = if a.der {
        cert.der.clone()
    } else {
        m2mpki_ca::chain_pem(&cert.der, &authority.chain_without_root()).into_bytes()
    };
    files::write_atomic(&a.out, &bytes, write_options(Mode::Public, a.force))?;
    if ctx.json {
        let mut v = cert_view(&cert.record);
        v.out = Some(a.out.clone());
        v.key_out = a.key_out.clone();
        emit_json(&v)
    } else {
        emit(&format!(
            "issued {} certificate {}\n  subject   {}\n  identity  {}\n  valid to  {}\n  written   {}{}",
            cert.record.profile,
            cert.record.serial,
            cert.record.subject,
            cert.record.subject_key,
            ts(cert.record.not_after),
            a.out.display(),
            a.key_out
                .as_ref()
                .map(|k| format!("\n  key       {}", k.display()))
                .unwrap_or_default()
        ))
    }
}

fn issue_batch(ctx: &Ctx, a: BatchArgs) -> Result<()> {
    if let Some(n) = a.threads {
        rayon::ThreadPoolBuilder::new()
            .num_threads(n.max(1))
            .build_global()
            .context("starting worker threads")?;
    }
    let input = match (&a.ids, &a.csr_dir) {
        (Some(ids), _) => BatchInput::Ids(batch::load_ids(ids)?),
        (None, Some(dir)) => BatchInput::Csrs(batch::load_csr_dir(dir)?),
        (None, None) => return Err(UsageError("give --ids or --csr-dir".into()).into()),
    };
    let profile = match a.profile {
        BatchProfile::Device => ProfileKind::Device,
        BatchProfile::Node => ProfileKind::Node,
    };
    let enterprise = a.enterprise.as_deref().map(str::parse).transpose()?;
    if profile == ProfileKind::Node && enterprise.is_none() {
        return Err(UsageError("--profile node needs --enterprise".into()).into());
    }
    let opts = BatchOptions {
        profile,
        enterprise,
        key_type: a.key_type.into(),
        key_passphrase: passphrase(a.key_out_pass_file.as_deref())?,
        validity: opt_validity(a.validity.as_deref())?,
        not_before: opt_time("--not-before", a.not_before.as_deref())?,
        out_dir: a.out_dir.clone(),
        reissue: a.reissue,
        output: if a.bundle {
            batch::BatchOutput::Bundle
        } else if a.der {
            batch::BatchOutput::Der
        } else {
            batch::BatchOutput::Pem
        },
        chunk_size: a.chunk,
    };
    let store = ctx.store()?;
    let authority = Authority::load(&ctx.home, &store, &ctx.keystore, &a.ca)?;
    let bar = if ctx.json {
        indicatif::ProgressBar::hidden()
    } else {
        let bar = indicatif::ProgressBar::new(input.len() as u64);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} {pos}/{len} [{bar:40}] {per_sec} eta {eta}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        bar
    };
    let started = std::time::Instant::now();
    let bar = Arc::new(bar);
    let tick = bar.clone();
    let report = batch::run_batch(&store, &authority, input, &opts, &move |n| tick.inc(n))?;
    bar.finish_and_clear();
    let secs = started.elapsed().as_secs_f64();
    if ctx.json {
        #[derive(Serialize)]
        struct Out<'a> {
            #[serde(flatten)]
            report: &'a batch::BatchReport,
            seconds: f64,
            out_dir: &'a Path,
        }
        emit_json(&Out {
            report: &report,
            seconds: secs,
            out_dir: &a.out_dir,
        })?;
    } else {
        emit(&format!(
            "batch done: {} issued, {} already issued, {} files restored, {} total in {:.1}s ({:.0}/s)",
            report.issued,
            report.already_issued,
            report.files_restored,
            report.total,
            secs,
            report.issued as f64 / secs.max(1e-9)
        ))?;
    }
    if !report.missing_keys.is_empty() {
        eprintln!(
            "m2mpki: warning: {} certificate(s) exist but their key file is missing, e.g. {} (use --reissue for those IDs)",
            report.missing_keys.len(),
            report.missing_keys[0]
        );
    }
    if let Some(first) = report.key_mismatches.first() {
        if !ctx.json {
            for m in &report.key_mismatches {
                eprintln!(
                    "m2mpki: {}: {} ({}); its certificate was not written",
                    m.id,
                    m.reason,
                    m.key_file.display()
                );
            }
        }
        return Err(m2mpki_ca::Error::BadFile {
            path: first.key_file.clone(),
            reason: format!(
                "{} key file(s) in the output folder are not their certificate's key, first for ID `{}` ({}); those certificates were not written: move the foreign key files away and run the batch again",
                report.key_mismatches.len(),
                first.id,
                first.reason
            ),
        }
        .into());
    }
    Ok(())
}

fn certs_list(ctx: &Ctx, ca: Option<String>, id: Option<String>, csv: bool) -> Result<()> {
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

fn certs_show(ctx: &Ctx, serial: Option<String>, id: Option<String>, pem: bool) -> Result<()> {
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
                "serial      {}\nca          {}\nprofile     {}\nsubject     {}\nidentity    {}\nnot before  {}\nnot after   {}\nissued at   {}\nstatus      {}\nsha256      {}",
                v.serial,
                v.ca,
                v.profile,
                v.subject,
                v.subject_key,
                v.not_before,
                v.not_after,
                v.issued_at,
                serde_json::to_value(v.status).ok().and_then(|s| s.as_str().map(str::to_owned)).unwrap_or_default(),
                v.sha256
            )
        })
        .collect::<Vec<_>>()
        .join("\n\n");
    emit(&text)
}

fn audit_verify(ctx: &Ctx) -> Result<()> {
    let store = ctx.store()?;
    let mut verifier = ChainVerifier::default();
    store.audit_log(&mut |entry| verifier.check(&entry))?;
    let n = verifier.count();
    if ctx.json {
        emit_json(&serde_json::json!({ "ok": true, "entries": n }))
    } else {
        emit(&format!("audit log intact: {n} entries"))
    }
}

fn hsm(keystore: &Keystore, json: bool, cmd: HsmCommand) -> Result<()> {
    use m2mpki_hsm::pkcs11;
    match cmd {
        HsmCommand::Keygen { uri, key_type } => {
            let uri: pkcs11::Pkcs11Uri = uri.parse()?;
            let (key, full) = pkcs11::generate(&uri, key_type.into(), keystore.pkcs11())?;
            let spki = m2mpki_ca::input::sha256(&key.subject_public_key_info());
            if json {
                emit_json(&serde_json::json!({
                    "uri": full.to_string(),
                    "token": key.token().label,
                    "key_type": key_type_name(&key),
                    "spki_sha256": hex::encode(spki),
                }))
            } else {
                emit(&format!(
                    "generated {} key on token `{}`\n  uri  {full}",
                    key_type_name(&key),
                    key.token().label
                ))
            }
        }
        HsmCommand::KeygenSecret { uri } => {
            let uri: pkcs11::Pkcs11Uri = uri.parse()?;
            let (_, full) = pkcs11::Pkcs11SecretKey::generate(&uri, keystore.pkcs11())?;
            if json {
                emit_json(&serde_json::json!({ "uri": full.to_string(), "key_type": "aes256" }))
            } else {
                emit(&format!("generated AES-256 key\n  uri  {full}"))
            }
        }
        HsmCommand::List { module, login } => {
            let module = module
                .or_else(|| keystore.pkcs11().module.clone())
                .ok_or(m2mpki_hsm::Error::NoModule)?;
            let login: Option<pkcs11::Pkcs11Uri> = login.as_deref().map(str::parse).transpose()?;
            let tokens = pkcs11::list_tokens(&module, login.as_ref(), keystore.pkcs11())?;
            if json {
                return emit_json(&tokens);
            }
            let mut out = String::new();
            for t in &tokens {
                out.push_str(&format!(
                    "token `{}` (slot {}, serial {}, {} {})\n",
                    t.label, t.slot_id, t.serial, t.manufacturer, t.model
                ));
                let rows: Vec<Vec<String>> = t
                    .keys
                    .iter()
                    .map(|k| {
                        let flag = |b: Option<bool>, yes: &str| match b {
                            Some(true) => yes.to_owned(),
                            Some(false) => format!("NOT {yes}"),
                            None => "-".to_owned(),
                        };
                        vec![
                            k.class.to_owned(),
                            k.label.clone().unwrap_or_default(),
                            k.id.clone(),
                            k.key_type.clone(),
                            flag(k.sensitive, "sensitive"),
                            match k.extractable {
                                Some(true) => "EXTRACTABLE".to_owned(),
                                Some(false) => "not extractable".to_owned(),
                                None => "-".to_owned(),
                            },
                        ]
                    })
                    .collect();
                if rows.is_empty() {
                    out.push_str("  (no key objects visible; --login URI shows private keys)\n");
                } else {
                    for line in table(
                        &["CLASS", "LABEL", "ID", "TYPE", "SENSITIVE", "EXTRACTABLE"],
                        &rows,
                    )
                    .lines()
                    {
                        out.push_str("  ");
                        out.push_str(line);
                        out.push('\n');
                    }
                }
            }
            if tokens.is_empty() {
                out.push_str("no initialised tokens\n");
            }
            emit(&out)
        }
    }
}

fn key_type_name(key: &m2mpki_hsm::pkcs11::Pkcs11Key) -> String {
    use m2mpki_hsm::Signer;
    key.key_type().to_string()
}

fn fingerprint(s: &str) -> String {
    s.chars()
        .filter(|c| *c != ':')
        .collect::<String>()
        .to_ascii_lowercase()
}

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

fn roots(ctx: &Ctx, cmd: RootsCommand) -> Result<()> {
    use m2mpki_ca::audit::AuditEvent;
    use m2mpki_ca::rootset::{
        check_set_name, Anchor, CrlRecord, RevocationPolicy, RootSet, RootSetKind,
    };
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
            check_set_name(&set)?;
            let revocation = RevocationPolicy {
                mode: revocation_mode(revocation),
                crl_grace: grace_seconds(&crl_grace)?,
            };
            let kind = match kind {
                SetKind::Device => {
                    let v = vertical
                        .ok_or_else(|| UsageError("--kind device needs --vertical".into()))?;
                    if v.is_empty() || v.len() > 64 || v.chars().any(|c| c.is_control()) {
                        return Err(UsageError(format!("invalid vertical `{v}`")).into());
                    }
                    RootSetKind::Device { vertical: v }
                }
                SetKind::Node => RootSetKind::Node {
                    enterprise: enterprise
                        .ok_or_else(|| UsageError("--kind node needs --enterprise".into()))?
                        .parse()?,
                },
                SetKind::Infrastructure => RootSetKind::Infrastructure,
            };
            let record = RootSet {
                name: set.clone(),
                kind: kind.clone(),
                anchors: vec![],
                crls: vec![],
                revocation,
                created: OffsetDateTime::now_utc().unix_timestamp(),
            };
            let mut detail = serde_json::to_value(&kind)?;
            detail["revocation"] = serde_json::to_value(revocation)?;
            store.create_root_set(
                &record,
                AuditEvent {
                    action: "roots.create".into(),
                    subject: set.clone(),
                    detail,
                },
            )?;
            if ctx.json {
                emit_json(
                    &serde_json::json!({ "set": set, "kind": kind, "revocation": revocation }),
                )
            } else {
                emit(&format!(
                    "created root set `{set}`: {kind}, revocation {revocation}"
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
            let grace = crl_grace.as_deref().map(grace_seconds).transpose()?;
            let s = store.modify_root_set(&set, &mut |s| {
                if let Some(r) = revocation {
                    s.revocation.mode = revocation_mode(r);
                }
                if let Some(g) = grace {
                    s.revocation.crl_grace = g;
                }
                Ok(AuditEvent {
                    action: "roots.set".into(),
                    subject: set.clone(),
                    detail: serde_json::json!({ "revocation": s.revocation }),
                })
            })?;
            if ctx.json {
                emit_json(&serde_json::json!({ "set": set, "revocation": s.revocation }))
            } else {
                emit(&format!("`{set}`: revocation {}", s.revocation))
            }
        }
        RootsCommand::Add { set, files } => {
            let mut anchors = Vec::new();
            for f in &files {
                for der in m2mpki_ca::input::read_der_objects(f, &["CERTIFICATE"])? {
                    anchors.push(Anchor::from_der(&der, &f.display().to_string())?);
                }
            }
            roots_add(ctx, &store, &set, anchors)
        }
        RootsCommand::AddCa { set, ca } => {
            let record = store
                .ca(&ca)?
                .ok_or_else(|| m2mpki_ca::Error::UnknownCa(ca.clone()))?;
            let anchor = Anchor::from_der(record.root_der(), &format!("CA {ca}"))?;
            roots_add(ctx, &store, &set, vec![anchor])
        }
        RootsCommand::Remove {
            set,
            fingerprint: fp,
        } => {
            let fp = fingerprint(&fp);
            let mut removed = None;
            store.modify_root_set(&set, &mut |s| {
                let i = s
                    .anchors
                    .iter()
                    .position(|a| a.sha256 == fp)
                    .ok_or_else(|| {
                        m2mpki_ca::Error::invalid(
                            "fingerprint",
                            &fp,
                            format!("no anchor with it in set `{set}`"),
                        )
                    })?;
                removed = Some(s.anchors.remove(i));
                Ok(AuditEvent {
                    action: "roots.remove".into(),
                    subject: set.clone(),
                    detail: serde_json::json!({ "sha256": fp }),
                })
            })?;
            let a = removed.ok_or_else(|| unknown(&set))?;
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
        RootsCommand::RemoveCrl {
            set,
            fingerprint: fp,
        } => {
            let fp = fingerprint(&fp);
            let mut removed = None;
            store.modify_root_set(&set, &mut |s| {
                let crl = s.detach_crl(&fp)?;
                let detail = serde_json::json!({ "issuer": crl.issuer, "number": crl.number, "sha256": crl.sha256 });
                removed = Some(crl);
                Ok(AuditEvent {
                    action: "roots.remove-crl".into(),
                    subject: set.clone(),
                    detail,
                })
            })?;
            let crl = removed.ok_or_else(|| unknown(&set))?;
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
                issuers.extend(verify_read_certs(f)?);
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
            let mut changed = false;
            let view = serde_json::json!({ "issuer": crl.issuer, "number": crl.number, "entries": crl.entries, "sha256": crl.sha256 });
            store.modify_root_set(&set, &mut |s| {
                changed = s.attach_crl(crl.clone(), &issuers)?;
                Ok(AuditEvent {
                    action: "roots.add-crl".into(),
                    subject: set.clone(),
                    detail: view.clone(),
                })
            })?;
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

/// Certificates from a file (PEM bundle or DER), each checked to parse.
fn verify_read_certs(path: &Path) -> Result<Vec<Vec<u8>>> {
    Ok(m2mpki_ca::verify::read_chain(path)?)
}

pub(crate) fn revocation_mode(arg: RevocationArg) -> m2mpki_ca::rootset::RevocationMode {
    match arg {
        RevocationArg::Require => m2mpki_ca::rootset::RevocationMode::Require,
        RevocationArg::BestEffort => m2mpki_ca::rootset::RevocationMode::BestEffort,
    }
}

/// A CRL grace period in seconds: `0`, or hours or days (`12h`, `2d`).
pub(crate) fn grace_seconds(text: &str) -> Result<u64> {
    if text == "0" {
        return Ok(0);
    }
    let bad = || {
        UsageError(format!(
            "invalid --crl-grace `{text}`: expected 0, hours (12h) or days (2d)"
        ))
    };
    let (n, unit) = text.split_at(text.len().saturating_sub(1));
    let n: u64 = n.parse().map_err(|_| bad())?;
    let secs = match unit {
        "h" => n.checked_mul(3600),
        "d" => n.checked_mul(86_400),
        _ => None,
    };
    Ok(secs.filter(|s| *s <= 366 * 86_400).ok_or_else(bad)?)
}

fn roots_add(
    ctx: &Ctx,
    store: &m2mpki_ca::RedbStore,
    set: &str,
    anchors: Vec<m2mpki_ca::rootset::Anchor>,
) -> Result<()> {
    use m2mpki_ca::audit::AuditEvent;
    let mut report = Default::default();
    store.modify_root_set(set, &mut |s| {
        report = s.add_anchors(anchors.clone());
        Ok(AuditEvent {
            action: "roots.add".into(),
            subject: set.to_owned(),
            detail: serde_json::json!({ "added": report.added, "duplicates": report.duplicates }),
        })
    })?;
    for subject in &report.not_self_signed {
        eprintln!(
            "m2mpki: warning: `{subject}` is not self-signed; it is trusted as an anchor as it is"
        );
    }
    if ctx.json {
        emit_json(&report)
    } else {
        let mut out = format!("added {} anchor(s) to `{set}`", report.added.len());
        for d in &report.duplicates {
            out.push_str(&format!("\n  already present: {d}"));
        }
        emit(&out)
    }
}

fn revoke(ctx: &Ctx, serial: &str, ca: &str, reason: &str) -> Result<()> {
    let store = ctx.store()?;
    store
        .ca(ca)?
        .ok_or_else(|| m2mpki_ca::Error::UnknownCa(ca.to_owned()))?;
    let serial: m2mpki_ca::Serial = serial.parse()?;
    let reason: m2mpki_ca::revocation::RevocationReason = reason.parse()?;
    let record = store.revoke(
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

fn crl(ctx: &Ctx, ca: &str, out: &Path, next_update: &str, der: bool, force: bool) -> Result<()> {
    if !force && out.exists() {
        return Err(m2mpki_hsm::Error::FileExists(out.to_owned()).into());
    }
    let next_update: Validity = next_update.parse()?;
    let store = ctx.store()?;
    let authority = Authority::load(&ctx.home, &store, &ctx.keystore, ca)?;
    let crl = m2mpki_ca::revocation::issue_crl(&store, &authority, next_update)?;
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
