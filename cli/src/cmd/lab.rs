//! `m2mpki lab`: whole lab PKIs and the end-to-end demo.

use std::io::IsTerminal;
use std::path::Path;

use anyhow::Result;
use m2mpki_ca::StoreLocation;
use m2mpki_lab::lab::{self, LabHsm, LabLayout};

use crate::args::{HsmArg, LabCommand};
use crate::output::{emit, emit_json, table, UsageError};

/// The demo did not do what it should (exit 1).
#[derive(Debug, thiserror::Error)]
#[error("the demo failed: {0}")]
pub struct DemoFailed(pub String);

fn hsm(arg: Option<HsmArg>) -> Result<LabHsm> {
    Ok(match arg {
        None => LabHsm::None,
        Some(HsmArg::Softhsm) => {
            m2mpki_lab::softhsm::module().map_err(|e| UsageError(format!("--hsm softhsm: {e}")))?;
            LabHsm::SoftHsm
        }
    })
}

fn next_steps(l: &LabLayout) -> String {
    let m = "m2mpki";
    let home = l.home.display();
    let mut s = String::new();
    if let Some(conf) = &l.softhsm_conf {
        s.push_str(&format!("  export SOFTHSM2_CONF={}\n", conf.display()));
    }
    let dev = l.nodes.iter().find(|n| n.name == "SN-0001");
    s.push_str(&format!("  export M2MPKI_HOME={home}\n"));
    s.push_str(&format!(
        "  {m} bootstrap serve --config {} &\n",
        l.serve_config.display()
    ));
    if let Some(d) = dev {
        s.push_str(&format!(
            "  {m} bootstrap enroll --profile {} --cert {} --key {} --out {}/SN-0001.cred --connect 127.0.0.1:{}\n",
            l.profile.display(),
            d.chain.display(),
            d.key.display(),
            l.dir.display(),
            l.port
        ));
        s.push_str(&format!(
            "  {m} bootstrap associate --credential {}/SN-0001.cred --connect 127.0.0.1:{}\n",
            l.dir.display(),
            l.port + 1
        ));
        s.push_str(&format!("  {m} bootstrap grant {} valve-7\n", d.identity));
        s.push_str(&format!("  {m} bootstrap check {} valve-7\n", d.identity));
    }
    s.push_str(&format!(
        "  {m} certs list\n  {m} roots list\n  {m} audit verify\n"
    ));
    s
}

fn describe(l: &LabLayout) -> String {
    let mut s = format!(
        "lab in {}\n  home      {}\n  CAs       {}\n  root sets metering (device, vertical smart-metering), acme (node), in-roots (infrastructure)\n  IN        {} (certificate {}, key {})\n  profile   {}\n  config    {}\n",
        l.dir.display(),
        l.home.display(),
        l.cas.join(", "),
        l.in_fqdn,
        l.in_chain.display(),
        l.in_key,
        l.profile.display(),
        l.serve_config.display()
    );
    for n in &l.nodes {
        s.push_str(&format!(
            "  node      {:<8} {}{}\n",
            n.name,
            n.identity,
            if n.trusted {
                ""
            } else {
                "  (untrusted manufacturer)"
            }
        ));
    }
    s
}

/// Moves a new lab's CA store into the PostgreSQL store `url`: the lab is built in its home's
/// redb file, copied (checked as `store migrate` checks), and the file removed; the IN's
/// config names the database, so the IN keeps its credentials there too.
fn move_into(layout: &LabLayout, location: &StoreLocation) -> Result<String> {
    let redb = layout.home.join("store.redb");
    let from = StoreLocation::Redb(redb.clone());
    let shown = super::store::copy(&from, location)?.to;
    std::fs::remove_file(&redb)?;
    let StoreLocation::Postgres(url) = location else {
        return Ok(shown);
    };
    let config = std::fs::read_to_string(&layout.serve_config)?;
    let listen = format!("listen = \"127.0.0.1:{}\"\n", layout.port);
    if !config.contains(&listen) {
        return Err(anyhow::anyhow!(
            "{}: no `{}` line to put the store beside",
            layout.serve_config.display(),
            listen.trim()
        ));
    }
    let store_line = format!("store = {}\n", toml::Value::String(url.clone()));
    let config = config.replacen(&listen, &format!("{listen}{store_line}"), 1);
    m2mpki_hsm::files::write_atomic(
        &layout.serve_config,
        config.as_bytes(),
        m2mpki_hsm::files::WriteOptions {
            // It may hold the database password.
            mode: m2mpki_hsm::files::Mode::Secret,
            overwrite: m2mpki_hsm::files::Overwrite::Replace,
            sync: true,
        },
    )?;
    Ok(shown)
}

pub fn run(json: bool, store: Option<&StoreLocation>, cmd: LabCommand) -> Result<()> {
    match cmd {
        LabCommand::Init { dir, hsm: h, port } => {
            let layout =
                lab::init(&dir, hsm(h)?, port).map_err(|e| UsageError(format!("{e:#}")))?;
            let postgres = match store {
                Some(location @ StoreLocation::Postgres(_)) => Some(move_into(&layout, location)?),
                Some(StoreLocation::Redb(_)) => {
                    return Err(UsageError(
                        "lab init keeps its redb store in the lab's home; --store takes a \
                         postgres:// URL here"
                            .into(),
                    )
                    .into())
                }
                None => None,
            };
            if json {
                let mut doc = serde_json::to_value(&layout)?;
                if let (Some(obj), Some(location)) = (doc.as_object_mut(), postgres) {
                    obj.insert("store".into(), location.clone().into());
                }
                return emit_json(&doc);
            }
            let mut text = describe(&layout);
            let mut steps = next_steps(&layout);
            if let Some(location) = postgres {
                text.push_str(&format!("  store     {location}\n"));
                steps = format!("  export M2MPKI_STORE='<the --store URL>'\n{steps}");
            }
            emit(&format!("{text}\nnext, by hand:\n{steps}"))
        }
        LabCommand::Demo { dir, hsm: h, keep } => {
            if store.is_some() {
                eprintln!(
                    "m2mpki: warning: lab demo builds a store of its own in its lab folder; --store (or $M2MPKI_STORE) is not used"
                );
            }
            let h = hsm(h)?;
            let temp = match &dir {
                Some(_) => None,
                None => Some(tempfile::Builder::new().prefix("m2mpki-lab-").tempdir()?),
            };
            let lab_dir: &Path = match (&dir, &temp) {
                (Some(d), _) => d,
                (None, Some(t)) => t.path(),
                (None, None) => return Err(UsageError("no lab folder".into()).into()),
            };
            let layout = lab::init(&lab_dir.join("lab"), h, 8443)
                .map_err(|e| UsageError(format!("{e:#}")))?;
            let report = lab::demo(layout)?;
            if json {
                emit_json(&report)?;
            } else {
                let rows: Vec<Vec<String>> = report
                    .steps
                    .iter()
                    .map(|s| {
                        vec![
                            if s.ok { "ok".into() } else { "FAILED".into() },
                            s.step.clone(),
                            s.expected.clone(),
                            s.outcome.clone(),
                            format!("{} ms", s.millis),
                        ]
                    })
                    .collect();
                let mut out = describe(&report.lab);
                out.push_str(&format!(
                    "\nbootstrap server on {} ({}):\n",
                    report.listen, report.lab.in_fqdn
                ));
                if std::io::stdout().is_terminal() {
                    out.push_str(&table(&["", "STEP", "EXPECTED", "OUTCOME", "TIME"], &rows));
                } else {
                    for s in &report.steps {
                        out.push_str(&format!(
                            "{} {}: {} -> {}\n",
                            if s.ok { "ok" } else { "FAILED" },
                            s.step,
                            s.expected,
                            s.outcome
                        ));
                    }
                }
                out.push_str(if report.ok {
                    "\nall steps did what they should\n"
                } else {
                    "\nSOME STEPS FAILED\n"
                });
                if dir.is_some() || keep {
                    out.push_str(&format!(
                        "\nthe lab stays in {}; try it by hand:\n{}",
                        report.lab.dir.display(),
                        next_steps(&report.lab)
                    ));
                }
                emit(&out)?;
            }
            if let (Some(t), true) = (temp, keep) {
                let _ = t.keep();
            }
            if !report.ok {
                return Err(DemoFailed(
                    report
                        .steps
                        .iter()
                        .filter(|s| !s.ok)
                        .map(|s| s.step.clone())
                        .collect::<Vec<_>>()
                        .join(", "),
                )
                .into());
            }
            Ok(())
        }
    }
}
