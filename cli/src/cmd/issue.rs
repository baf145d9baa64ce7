//! `m2mpki issue`: one certificate, or a batch.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use anyhow::{Context, Result};
use m2mpki_ca::batch::{self, BatchInput, BatchOptions};
use m2mpki_ca::input::VerifiedCsr;
use m2mpki_ca::profile::{LeafProfile, ProfileKind};
use m2mpki_ca::{Authority, KeyFile, LeafRequest, LeafSubject, Requester};
use m2mpki_hsm::files::{self, Mode, Overwrite};
use m2mpki_hsm::SoftwareKey;
use rcgen::PublicKeyData;
use serde::Serialize;

use super::certs::cert_view;
use super::{opt_time, opt_validity, passphrase, write_options, Ctx};
use crate::args::{BatchArgs, BatchProfile, IssueArgs};
use crate::output::{emit, emit_json, ts, UsageError};

pub(crate) fn one(ctx: &Ctx, subject: LeafSubject, a: IssueArgs) -> Result<()> {
    // Every argument is parsed, and existing outputs refused, before a key is touched.
    for path in [Some(&a.out), a.key_out.as_ref()].into_iter().flatten() {
        if !a.force && path.exists() {
            return Err(m2mpki_hsm::Error::FileExists(path.clone()).into());
        }
    }
    let validity = opt_validity(a.validity.as_deref())?;
    let not_before = opt_time("--not-before", a.not_before.as_deref())?;
    let csr = match (&a.csr, &a.key_out) {
        (Some(csr), _) => Some(VerifiedCsr::from_file(csr)?),
        (None, Some(_)) => None,
        (None, None) => return Err(UsageError("give --csr or --key-out".into()).into()),
    };
    let key_pass = match &a.key_out {
        Some(_) => passphrase(a.key_out_pass_file.as_deref())?,
        None => None,
    };
    let store = ctx.store()?;
    let authority = Authority::load(&ctx.home, &*store, &ctx.keystore, &a.ca)?;
    let (public_key, new_key) = match csr {
        Some(csr) => (csr.public_key, None),
        None => {
            let key = SoftwareKey::generate(a.key_type.into())?;
            let spki = rcgen::SubjectPublicKeyInfo::from_der(&key.subject_public_key_info())
                .context("generated key")?;
            (spki, Some(key))
        }
    };
    let profile = LeafProfile::builtin(subject.kind());
    let req = LeafRequest {
        subject,
        public_key,
        validity,
        not_before,
        requester: Requester::operator(),
    };
    // The request and the ledger are checked before the key file is written, so a refusal
    // leaves nothing behind; `commit_with_key` writes the key before the certificate is
    // recorded and removes it when nothing was.
    let prepared = m2mpki_ca::prepare(&*store, &authority, &profile, req, a.reissue)?;
    let cert = match (new_key, &a.key_out) {
        (Some(key), Some(path)) => {
            let overwrite = if a.force {
                Overwrite::Replace
            } else {
                Overwrite::Refuse
            };
            let mut file = KeyFile::new(key, path.clone(), key_pass, overwrite);
            prepared.commit_with_key(&*store, &mut file)?
        }
        _ => prepared.commit(&*store)?,
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

pub(crate) fn batch(ctx: &Ctx, a: BatchArgs) -> Result<()> {
    let started = std::time::Instant::now();
    let committed = Arc::new(AtomicU64::new(0));
    let result = batch_run(ctx, &a, &committed);
    let Some(path) = &a.metrics_file else {
        return result.map(drop);
    };
    let text = batch_metrics(
        &a,
        result.as_ref().ok(),
        committed.load(Ordering::Relaxed),
        started.elapsed().as_secs_f64(),
        time::OffsetDateTime::now_utc(),
    );
    let written = files::write_atomic(
        path,
        text.as_bytes(),
        files::WriteOptions {
            mode: Mode::Public,
            overwrite: Overwrite::Replace,
            sync: false,
        },
    );
    match (result, written) {
        (Ok(_), Ok(())) => Ok(()),
        (Ok(_), Err(e)) => Err(e.into()),
        (Err(run), Ok(())) => Err(run),
        (Err(run), Err(e)) => {
            eprintln!("m2mpki: warning: the metrics file was not written: {e}");
            Err(run)
        }
    }
}

/// The outcome of an `issue batch` run in the Prometheus text format (version 0.0.4, which
/// node_exporter's textfile collector reads): gauges describing the last run of this CA and
/// profile. `report` is `None` when the run failed; `committed` counts the subjects whose
/// chunk was durably recorded, also in a failed run.
fn batch_metrics(
    a: &BatchArgs,
    report: Option<&batch::BatchReport>,
    committed: u64,
    seconds: f64,
    now: time::OffsetDateTime,
) -> String {
    use std::fmt::Write as _;
    fn escape(v: &str) -> String {
        v.replace('\\', "\\\\")
            .replace('"', "\\\"")
            .replace('\n', "\\n")
    }
    let profile = match a.profile {
        BatchProfile::Device => "device",
        BatchProfile::Node => "node",
    };
    let labels = format!("ca=\"{}\",profile=\"{profile}\"", escape(&a.ca));
    let mut out = String::new();
    let mut gauge = |name: &str, help: &str, samples: &[(&str, f64)]| {
        let _ = writeln!(out, "# HELP m2mpki_batch_{name} {help}");
        let _ = writeln!(out, "# TYPE m2mpki_batch_{name} gauge");
        for (extra, value) in samples {
            let _ = writeln!(out, "m2mpki_batch_{name}{{{labels}{extra}}} {value}");
        }
    };
    let ended = now.unix_timestamp_nanos() as f64 / 1e9;
    gauge(
        "last_end_timestamp_seconds",
        "When the last issue batch run ended (Unix time).",
        &[("", ended)],
    );
    gauge(
        "last_success",
        "1 if the last run ended without an error, 0 if it failed.",
        &[("", f64::from(u8::from(report.is_some())))],
    );
    gauge(
        "last_duration_seconds",
        "How long the last run took.",
        &[("", seconds)],
    );
    gauge(
        "last_subjects_done",
        "Subjects of the last run whose chunk was finished and durably recorded (also in a failed run).",
        &[("", committed as f64)],
    );
    if let Some(r) = report {
        gauge(
            "last_certificates",
            "Outcome per subject of the last successful run.",
            &[
                (",result=\"issued\"", r.issued as f64),
                (",result=\"already_issued\"", r.already_issued as f64),
                (",result=\"files_restored\"", r.files_restored as f64),
                (",result=\"missing_key\"", r.missing_keys.len() as f64),
            ],
        );
    }
    out
}

fn batch_run(ctx: &Ctx, a: &BatchArgs, committed: &Arc<AtomicU64>) -> Result<batch::BatchReport> {
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
        requester: Requester::batch(
            a.ids
                .as_ref()
                .or(a.csr_dir.as_ref())
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
        ),
    };
    let store = ctx.store()?;
    let authority = Authority::load(&ctx.home, &*store, &ctx.keystore, &a.ca)?;
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
    let committed = committed.clone();
    let ran = batch::run_batch(&*store, &authority, input, &opts, &move |n| {
        committed.fetch_add(n, Ordering::Relaxed);
        tick.inc(n);
    });
    // A batch that left key files unpaired is a failed batch, whose report is still shown.
    let (report, unpaired) = match ran {
        Ok(report) => (report, None),
        Err(m2mpki_ca::Error::KeyMismatches(report)) => {
            let shown = (*report).clone();
            (shown, Some(m2mpki_ca::Error::KeyMismatches(report)))
        }
        Err(e) => return Err(e.into()),
    };
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
    if let Some(failed) = unpaired {
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
        return Err(failed.into());
    }
    Ok(report)
}
