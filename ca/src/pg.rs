//! One PostgreSQL connection shared by the stores that live in a database (the CA ledger, the
//! IN's credentials): connect on first use and again after a break, read in one snapshot,
//! write under an advisory lock with retries, and never block an async runtime's worker.
//!
//! The `postgres` client drives its own small runtime, which must not be entered from a
//! thread of another runtime; every call here therefore leaves the caller's runtime first
//! ([`outside_runtime`]). When the database is unreachable, calls fail at once for
//! [`DOWN_BACKOFF`] after a failed connect instead of each waiting for its own connect timeout,
//! so an IN refuses enrolments quickly while its store is down.

use std::sync::Mutex;
use std::time::{Duration, Instant};

pub use postgres;
use postgres::error::SqlState;
use postgres::{Client, NoTls, Transaction};

use crate::{Error, Result};

/// Tries of one transaction that meets a serialization failure or a deadlock.
const TRIES: usize = 5;

/// How long after a failed connect further calls fail without trying again.
pub const DOWN_BACKOFF: Duration = Duration::from_secs(1);

/// Why a transaction ended: ours (an m2mpki error, returned as is) or the database's.
#[derive(Debug)]
pub enum Fail {
    /// An m2mpki error (bad data, a refused change): returned as is, never retried.
    Ours(Error),
    /// A database error: retried when it is a serialization failure or deadlock.
    Db(postgres::Error),
}

impl From<Error> for Fail {
    fn from(e: Error) -> Self {
        Fail::Ours(e)
    }
}

impl From<postgres::Error> for Fail {
    fn from(e: postgres::Error) -> Self {
        Fail::Db(e)
    }
}

/// The result of the body of a transaction.
pub type TxResult<T> = std::result::Result<T, Fail>;

/// Whether a failed transaction may simply run again.
fn retryable(e: &postgres::Error) -> bool {
    matches!(
        e.code(),
        Some(c) if *c == SqlState::T_R_SERIALIZATION_FAILURE || *c == SqlState::T_R_DEADLOCK_DETECTED
    )
}

/// Host, port and database of a configuration: never the user or password.
fn describe(config: &postgres::Config) -> String {
    use postgres::config::Host;
    let hosts: Vec<String> = config
        .get_hosts()
        .iter()
        .map(|h| match h {
            Host::Tcp(name) => name.clone(),
            Host::Unix(path) => path.display().to_string(),
        })
        .collect();
    let port = config.get_ports().first().copied().unwrap_or(5432);
    format!(
        "postgres://{}:{port}/{}",
        if hosts.is_empty() {
            "localhost".to_owned()
        } else {
            hosts.join(",")
        },
        config.get_dbname().unwrap_or("")
    )
}

/// The TLS settings of a PostgreSQL URL, in libpq's names, taken out of it before it is parsed
/// (the parser knows neither `verify-full` nor `sslrootcert`): `sslmode=verify-full` with
/// `sslrootcert=FILE` (TLS 1.2/1.3; the database's certificate must chain to a root in FILE
/// and name the host connected to), or `sslmode=disable` (the default: no TLS). Modes that
/// encrypt without verifying (`require`, `prefer`, `allow`, `verify-ca`) are refused. With
/// `verify-full`, `sslcert=FILE` and `sslkey=FILE` (together) give the client certificate
/// chain and its key, for `cert` authentication.
fn take_tls(url: &str) -> Result<(String, Option<tokio_postgres_rustls::MakeRustlsConnect>)> {
    let bad = |reason: String| Error::invalid("PostgreSQL URL", "(not shown)", reason);
    let mut mode = None;
    let mut root = None;
    let mut client = (None, None);
    let mut take = |pair: &str| -> bool {
        let value = |v: &str| Some(v.trim_matches('\'').to_owned());
        match pair.split_once('=') {
            Some(("sslmode", v)) => mode = value(v),
            Some(("sslrootcert", v)) => root = value(v),
            Some(("sslcert", v)) => client.0 = value(v),
            Some(("sslkey", v)) => client.1 = value(v),
            _ => return true,
        }
        false
    };
    let rest = if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        match url.split_once('?') {
            None => url.to_owned(),
            Some((base, query)) => {
                let kept: Vec<&str> = query.split('&').filter(|p| take(p)).collect();
                if kept.is_empty() {
                    base.to_owned()
                } else {
                    format!("{base}?{}", kept.join("&"))
                }
            }
        }
    } else {
        let kept: Vec<&str> = url.split_whitespace().filter(|p| take(p)).collect();
        kept.join(" ")
    };
    match (mode.as_deref(), root) {
        (None | Some("disable"), None) if client != (None, None) => Err(bad(
            "sslcert and sslkey need sslmode=verify-full with sslrootcert=FILE".into(),
        )),
        (None | Some("disable"), None) => Ok((rest, None)),
        (Some("verify-full"), Some(root)) => {
            let pem = std::fs::read(&root).map_err(|e| bad(format!("sslrootcert {root}: {e}")))?;
            let ders = crate::input::der_objects(&pem, &["CERTIFICATE"])
                .map_err(|e| bad(format!("sslrootcert {root}: {e}")))?;
            let mut roots = rustls::RootCertStore::empty();
            for der in ders {
                roots
                    .add(rustls::pki_types::CertificateDer::from(der))
                    .map_err(|e| bad(format!("sslrootcert {root}: unusable root ({e})")))?;
            }
            let builder = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
                rustls::crypto::aws_lc_rs::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .map_err(Error::internal)?
            .with_root_certificates(roots);
            let config = match client {
                (None, None) => builder.with_no_client_auth(),
                (Some(cert), Some(key)) => {
                    let (chain, private) = client_identity(&cert, &key).map_err(bad)?;
                    builder
                        .with_client_auth_cert(chain, private)
                        .map_err(|e| match e {
                            rustls::Error::InconsistentKeys(_) => bad(format!(
                                "sslkey {key} is not the key of the certificate in sslcert {cert}"
                            )),
                            e => bad(format!("sslcert {cert} with sslkey {key}: {e}")),
                        })?
                }
                _ => return Err(bad("sslcert and sslkey go together".into())),
            };
            Ok((
                rest,
                Some(tokio_postgres_rustls::MakeRustlsConnect::new(config)),
            ))
        }
        (Some("verify-full"), None) => Err(bad(
            "sslmode=verify-full needs sslrootcert=FILE (the roots that issue the database's \
             certificate)"
                .into(),
        )),
        (None | Some("disable"), Some(_)) => Err(bad(
            "sslrootcert is given without sslmode=verify-full".into(),
        )),
        (Some(other), _) => Err(bad(format!(
            "sslmode={other} is not supported: use sslmode=verify-full with sslrootcert=FILE \
             (TLS, the database's certificate and name verified) or sslmode=disable"
        ))),
    }
}

/// The client certificate chain in `cert` (PEM) and its private key in `key` (PEM: PKCS#8,
/// SEC1 or PKCS#1). Like libpq, a key file that others may read is refused: it must be 0600 or
/// less, or 0640 or less when root owns it.
fn client_identity(
    cert: &str,
    key: &str,
) -> std::result::Result<
    (
        Vec<rustls::pki_types::CertificateDer<'static>>,
        rustls::pki_types::PrivateKeyDer<'static>,
    ),
    String,
> {
    use rustls::pki_types::pem::PemObject;
    use std::os::unix::fs::MetadataExt;
    let pem = std::fs::read(cert).map_err(|e| format!("sslcert {cert}: {e}"))?;
    let chain: Vec<_> = crate::input::der_objects(&pem, &["CERTIFICATE"])
        .map_err(|e| format!("sslcert {cert}: {e}"))?
        .into_iter()
        .map(rustls::pki_types::CertificateDer::from)
        .collect();
    if chain.is_empty() {
        return Err(format!("sslcert {cert}: no CERTIFICATE in it"));
    }
    let meta = std::fs::metadata(key).map_err(|e| format!("sslkey {key}: {e}"))?;
    let allowed = if meta.uid() == 0 { 0o037 } else { 0o077 };
    if meta.mode() & allowed != 0 {
        return Err(format!(
            "sslkey {key}: others may read it (mode {:o}); make it 0600",
            meta.mode() & 0o777
        ));
    }
    let private = rustls::pki_types::PrivateKeyDer::from_pem_file(key).map_err(|e| {
        format!("sslkey {key}: no usable private key (PEM PKCS#8, SEC1 or PKCS#1): {e}")
    })?;
    Ok((chain, private))
}

/// An error and its causes, `outer: inner: ...` (a TLS failure says why the certificate was
/// refused; none of them repeats the URL).
fn with_causes(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let more = c.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        cause = c.source();
    }
    text
}

/// Runs `f` off the caller's async runtime, if it is on one: in place on a multi-threaded
/// runtime (the worker hands its other tasks on first). A single-threaded runtime cannot be
/// left that way; calls from one are refused with an error rather than a panic.
pub fn outside_runtime<T>(f: impl FnOnce() -> Result<T>) -> Result<T> {
    use tokio::runtime::{Handle, RuntimeFlavor};
    match Handle::try_current() {
        Err(_) => f(),
        Ok(h) if h.runtime_flavor() == RuntimeFlavor::MultiThread => tokio::task::block_in_place(f),
        Ok(_) => Err(Error::internal(
            "the PostgreSQL store was called from a single-threaded async runtime; \
             it needs a multi-threaded one or a plain thread",
        )),
    }
}

struct Conn {
    client: Option<Client>,
    /// Statements prepared on `client`, by their text (gone with the connection).
    prepared: std::collections::HashMap<&'static str, postgres::Statement>,
    /// When the last connect failed, and how.
    down: Option<(Instant, String)>,
}

/// A lazily opened connection to one database. `Debug` shows where, never who or the password.
pub struct PgConn {
    config: postgres::Config,
    /// TLS that verifies the database (`sslmode=verify-full`), or none.
    tls: Option<tokio_postgres_rustls::MakeRustlsConnect>,
    shown: String,
    conn: Mutex<Conn>,
}

impl std::fmt::Debug for PgConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgConn")
            .field("database", &self.shown)
            .finish_non_exhaustive()
    }
}

impl PgConn {
    /// Parses `url` (`postgres://user@host:port/db`, or key=value pairs); connects on first
    /// use. A connect timeout of 5 s applies unless the URL sets one.
    pub fn new(url: &str) -> Result<Self> {
        let (url, tls) = take_tls(url)?;
        let mut config: postgres::Config = url.parse().map_err(|e| {
            // The parser's message never repeats the URL, which may hold a password.
            Error::invalid("PostgreSQL URL", "(not shown)", format!("{e}"))
        })?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(Duration::from_secs(5));
        }
        if config.get_application_name().is_none() {
            config.application_name("m2mpki");
        }
        config.ssl_mode(if tls.is_some() {
            postgres::config::SslMode::Require
        } else {
            postgres::config::SslMode::Disable
        });
        Ok(PgConn {
            tls,
            shown: describe(&config),
            config,
            conn: Mutex::new(Conn {
                client: None,
                prepared: std::collections::HashMap::new(),
                down: None,
            }),
        })
    }

    /// Where it points, without user or password.
    pub fn shown(&self) -> &str {
        &self.shown
    }

    /// A database error as a store error naming the database (never the URL's secrets).
    pub fn db_err(&self, e: &postgres::Error) -> Error {
        match e.as_db_error() {
            Some(db) => Error::Store(format!(
                "{}: {} ({})",
                self.shown,
                db.message(),
                db.code().code()
            )),
            None => Error::Store(format!("{}: {e}", self.shown)),
        }
    }

    /// Runs `f` with the connection, opening it first when there is none or it broke.
    fn with_client<T>(&self, f: impl FnOnce(&mut Client) -> Result<T>) -> Result<T> {
        self.with_conn(|client, _| f(client))
    }

    /// Runs `f` with the connection and its prepared statements.
    fn with_conn<T>(
        &self,
        f: impl FnOnce(
            &mut Client,
            &mut std::collections::HashMap<&'static str, postgres::Statement>,
        ) -> Result<T>,
    ) -> Result<T> {
        outside_runtime(|| {
            let mut guard = self
                .conn
                .lock()
                .map_err(|_| Error::internal("the PostgreSQL connection lock is poisoned"))?;
            if guard.client.as_ref().is_none_or(Client::is_closed) {
                guard.client = None;
                guard.prepared.clear();
                if let Some((at, why)) = &guard.down {
                    if at.elapsed() < DOWN_BACKOFF {
                        return Err(Error::Store(why.clone()));
                    }
                }
                let connected = match &self.tls {
                    None => self.config.connect(NoTls),
                    Some(tls) => self.config.connect(tls.clone()),
                };
                match connected {
                    Ok(client) => {
                        guard.client = Some(client);
                        guard.down = None;
                    }
                    Err(e) => {
                        let why = format!(
                            "cannot connect to PostgreSQL at {}: {}",
                            self.shown,
                            with_causes(&e)
                        );
                        guard.down = Some((Instant::now(), why.clone()));
                        return Err(Error::Store(why));
                    }
                }
            }
            let Conn {
                client, prepared, ..
            } = &mut *guard;
            let client = client
                .as_mut()
                .ok_or_else(|| Error::internal("no PostgreSQL connection"))?;
            let out = f(client, prepared);
            if client.is_closed() {
                guard.client = None;
                guard.prepared.clear();
            }
            out
        })
    }

    /// Statements run on the connection as they are, each committing by itself: for a single
    /// read, one round trip (with `query_typed`) instead of a transaction's four.
    pub fn single<T>(&self, f: impl FnOnce(&mut Client) -> TxResult<T>) -> Result<T> {
        self.with_client(|client| {
            f(client).map_err(|e| match e {
                Fail::Ours(e) => e,
                Fail::Db(e) => self.db_err(&e),
            })
        })
    }

    /// Runs the one statement `sql`, prepared once per connection (no parsing and planning
    /// at each call), with `f`; it commits by itself.
    pub fn single_prepared<T>(
        &self,
        sql: &'static str,
        f: impl FnOnce(&mut Client, &postgres::Statement) -> TxResult<T>,
    ) -> Result<T> {
        self.with_conn(|client, prepared| {
            let statement = match prepared.get(sql) {
                Some(s) => s.clone(),
                None => {
                    let s = client.prepare(sql).map_err(|e| self.db_err(&e))?;
                    prepared.insert(sql, s.clone());
                    s
                }
            };
            f(client, &statement).map_err(|e| match e {
                Fail::Ours(e) => e,
                Fail::Db(e) => self.db_err(&e),
            })
        })
    }

    /// Creates the tables of `schema` (idempotent DDL) under `lock`, and records `version` as
    /// `schema_version` in `meta` (a table of `key` and `value` that `schema` creates); a
    /// database that records a newer version of the `what` schema is refused.
    pub fn ensure_schema(
        &self,
        lock: i64,
        schema: &str,
        meta: &str,
        version: i32,
        what: &str,
    ) -> Result<()> {
        self.write(lock, |tx| {
            tx.batch_execute(schema)?;
            let found = tx.query_opt(
                &format!("SELECT value FROM {meta} WHERE key = 'schema_version'"),
                &[],
            )?;
            match found {
                None => {
                    tx.execute(
                        &format!("INSERT INTO {meta} (key, value) VALUES ('schema_version', $1)"),
                        &[&version.to_string()],
                    )?;
                }
                Some(row) => {
                    let v: String = row.get(0);
                    if v.parse::<i32>().map_or(true, |v| v > version) {
                        return Err(Error::Store(format!(
                            "the database's {what} schema is version {v}; this build knows \
                             version {version} (upgrade m2mpki)"
                        ))
                        .into());
                    }
                }
            }
            Ok(())
        })
    }

    /// A read-only statement sequence in one snapshot (REPEATABLE READ, READ ONLY).
    pub fn read<T>(&self, mut f: impl FnMut(&mut Transaction<'_>) -> TxResult<T>) -> Result<T> {
        self.with_client(|client| {
            let mut run = |client: &mut Client| -> TxResult<T> {
                let mut tx = client
                    .build_transaction()
                    .isolation_level(postgres::IsolationLevel::RepeatableRead)
                    .read_only(true)
                    .start()?;
                let out = f(&mut tx)?;
                tx.commit()?;
                Ok(out)
            };
            run(client).map_err(|e| match e {
                Fail::Ours(e) => e,
                Fail::Db(e) => self.db_err(&e),
            })
        })
    }

    /// A write transaction (READ COMMITTED) that first takes the advisory lock `lock` for its
    /// length, retried from the start on serialization failures and deadlocks; a failed commit
    /// is never retried blind.
    pub fn write<T>(
        &self,
        lock: i64,
        mut f: impl FnMut(&mut Transaction<'_>) -> TxResult<T>,
    ) -> Result<T> {
        self.with_client(|client| {
            let mut tries = 0;
            loop {
                tries += 1;
                let attempt = (|| -> TxResult<T> {
                    let mut tx = client.transaction()?;
                    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&lock])?;
                    let out = f(&mut tx)?;
                    tx.commit()?;
                    Ok(out)
                })();
                match attempt {
                    Ok(v) => return Ok(v),
                    Err(Fail::Ours(e)) => return Err(e),
                    Err(Fail::Db(e)) if retryable(&e) && tries < TRIES => continue,
                    Err(Fail::Db(e)) => return Err(self.db_err(&e)),
                }
            }
        })
    }
}
