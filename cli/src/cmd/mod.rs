//! Turns parsed arguments into library requests, runs them and prints the results: one file
//! per command group.

mod bootstrap;
mod ca;
mod certs;
mod hsm;
mod issue;
mod lab;
mod roots;
mod store;

use std::path::{Path, PathBuf};

use anyhow::Result;
use m2mpki_ca::validity::{parse_time, Validity};
use m2mpki_ca::{Home, LeafSubject, Store, StoreLocation};
use m2mpki_hsm::files::{Mode, Overwrite, WriteOptions};
use m2mpki_hsm::{Keystore, Passphrase};
use time::OffsetDateTime;

use crate::args::{
    AuditCommand, CaCommand, CertsCommand, Cli, Command, IssueCommand, StoreCommand,
};
use crate::output::UsageError;

pub(crate) struct Ctx {
    pub(crate) home: Home,
    pub(crate) json: bool,
    pub(crate) keystore: Keystore,
    /// `--store` / `$M2MPKI_STORE`; `None`: the home's redb file.
    pub(crate) store: Option<StoreLocation>,
}

impl Ctx {
    pub(crate) fn store(&self) -> Result<Box<dyn Store>> {
        Ok(match &self.store {
            Some(location) => location.open()?,
            None => Box::new(self.home.store()?),
        })
    }
}

fn default_home() -> Result<PathBuf> {
    directories::ProjectDirs::from("org", "m2mpki", "m2mpki")
        .map(|d| d.data_dir().to_path_buf())
        .ok_or_else(|| UsageError("no home folder: give --home or set M2MPKI_HOME".into()).into())
}

pub(crate) fn passphrase(path: Option<&Path>) -> Result<Option<Passphrase>> {
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
    let store = cli.store.as_deref().map(str::parse).transpose()?;
    // Token commands need no home folder.
    let cmd = match cli.command {
        Command::Store(StoreCommand::Migrate { from, to }) => {
            return store::migrate(cli.json, &from.parse()?, &to.parse()?)
        }
        Command::Hsm(cmd) => return hsm::run(&keystore, cli.json, cmd),
        Command::Bootstrap(cmd) => {
            return bootstrap::run(&home, store.as_ref(), &keystore, cli.json, cmd)
        }
        Command::Lab(cmd) => return lab::run(cli.json, store.as_ref(), cmd),
        other => other,
    };
    let ctx = Ctx {
        home: Home::open(&home)?,
        json: cli.json,
        keystore,
        store,
    };
    match cmd {
        Command::Hsm(_) | Command::Bootstrap(_) | Command::Lab(_) | Command::Store(_) => Ok(()),
        Command::Roots(cmd) => roots::run(&ctx, cmd),
        Command::Revoke { serial, ca, reason } => certs::revoke(&ctx, &serial, &ca, &reason),
        Command::Crl {
            ca,
            out,
            next_update,
            der,
            force,
        } => certs::crl(&ctx, &ca, &out, &next_update, der, force),
        Command::Ca(CaCommand::Init(args)) => ca::init(&ctx, args),
        Command::Ca(CaCommand::List) => ca::list(&ctx),
        Command::Ca(CaCommand::Show { name, pem }) => ca::show(&ctx, &name, pem),
        Command::Issue(IssueCommand::Device { id, common }) => {
            let subject = LeafSubject::Device(id.parse()?);
            issue::one(&ctx, subject, common)
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
            issue::one(&ctx, subject, common)
        }
        Command::Issue(IssueCommand::Server { fqdn, common }) => {
            issue::one(&ctx, LeafSubject::Server(fqdn.parse()?), common)
        }
        Command::Issue(IssueCommand::Batch(args)) => issue::batch(&ctx, args),
        Command::Certs(CertsCommand::List { ca, id, csv }) => certs::list(&ctx, ca, id, csv),
        Command::Certs(CertsCommand::Show { serial, id, pem }) => {
            certs::show(&ctx, serial, id, pem)
        }
        Command::Audit(AuditCommand::Verify) => certs::audit_verify(&ctx),
    }
}

pub(crate) fn opt_time(what: &'static str, s: Option<&str>) -> Result<Option<OffsetDateTime>> {
    Ok(match s {
        Some(s) => Some(parse_time(what, s)?),
        None => None,
    })
}

pub(crate) fn opt_validity(s: Option<&str>) -> Result<Option<Validity>> {
    Ok(match s {
        Some(s) => Some(s.parse()?),
        None => None,
    })
}

pub(crate) fn write_options(mode: Mode, force: bool) -> WriteOptions {
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
