//! One PostgreSQL connection shared by the stores that live in a database (the CA ledger, the
//! IN's credentials): connect on first use and again after a break, read in one snapshot,
//! write under an advisory lock with retries, and never block an async runtime's worker.
//!
//! Every wait is bounded (docs/store.md, "Bounded waits"): each round trip must be answered
//! within [`OP_TIMEOUT`] (a client-side deadline: a database that stops answering while its
//! TCP connection stays up cannot hold a caller), the server ends a statement, a lock wait or
//! an abandoned transaction on its side too (`statement_timeout`, `lock_timeout`,
//! `idle_in_transaction_session_timeout`), and TCP keepalives and a TCP user timeout notice a
//! dead peer. A connection that missed a deadline is dropped and opened again on next use.
//!
//! Every write transaction commits with `synchronous_commit = on`, whatever the server's
//! setting: an acknowledged commit is on the database's disk. A commit whose answer never came
//! is reported as [`Error::CommitUnknown`], never as "nothing recorded".
//!
//! The client drives its own small runtime, which must not be entered from a thread of
//! another runtime; every call here therefore leaves the caller's runtime first
//! ([`outside_runtime`]). When the database is unreachable, calls fail at once for
//! [`DOWN_BACKOFF`] after a failed connect instead of each waiting for its own connect timeout,
//! so an IN refuses enrolments quickly while its store is down.

use std::cell::Cell;
use std::future::Future;
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub use tokio_postgres as postgres;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{Client, GenericClient, NoTls, Row, Statement, ToStatement};

use crate::{Error, Kind, Result};

/// Tries of one transaction that meets a serialization failure or a deadlock.
const TRIES: usize = 5;

/// How long after a failed connect further calls fail without trying again.
pub const DOWN_BACKOFF: Duration = Duration::from_secs(1);

/// How long one round trip to the database may take before the connection is given up (the
/// statement is then also ended by the server's `statement_timeout`, the same length).
pub const OP_TIMEOUT: Duration = Duration::from_secs(5);

/// The session settings every connection starts with: the server's side of the bounded waits.
const SESSION_SETTINGS: &str = "SET statement_timeout = '5s'; SET lock_timeout = '5s'; \
     SET idle_in_transaction_session_timeout = '15s'";

/// Why a statement failed: the database's error, or no answer in time.
#[derive(Debug)]
pub enum DbFail {
    /// A database error: retried when it is a serialization failure or deadlock.
    Db(postgres::Error),
    /// No answer within the deadline: the connection is dropped.
    TimedOut(Duration),
}

impl From<postgres::Error> for DbFail {
    fn from(e: postgres::Error) -> Self {
        DbFail::Db(e)
    }
}

/// Why a transaction ended: the caller's error `E` (returned as is) or the database's.
#[derive(Debug)]
pub enum Fail<E = Error> {
    /// The caller's error (bad data, a refused change): returned as is, never retried.
    Ours(E),
    /// A database error: retried when it is a serialization failure or deadlock.
    Db(postgres::Error),
    /// No answer within the deadline: the connection is dropped.
    TimedOut(Duration),
}

impl<E> From<DbFail> for Fail<E> {
    fn from(e: DbFail) -> Self {
        match e {
            DbFail::Db(e) => Fail::Db(e),
            DbFail::TimedOut(d) => Fail::TimedOut(d),
        }
    }
}

impl<E> From<postgres::Error> for Fail<E> {
    fn from(e: postgres::Error) -> Self {
        Fail::Db(e)
    }
}

impl<E: From<Error>> From<Error> for Fail<E> {
    fn from(e: Error) -> Self {
        Fail::Ours(E::from(e))
    }
}

/// The result of the body of a transaction whose own errors are `E`.
pub type TxResult<T, E = Error> = std::result::Result<T, Fail<E>>;

/// The result of one statement.
pub type DbResult<T> = std::result::Result<T, DbFail>;

/// Column `idx` of `row` as a `T`. A value of another type than the code expects (a table
/// altered by hand, or by another version) is a corrupt row: an internal error naming the
/// column, answered 500 and never retried, where `Row::get` would panic (on the IN's
/// credential writer thread that stopped every later enrolment until a restart).
pub fn col<'a, T: postgres::types::FromSql<'a>>(row: &'a Row, idx: usize) -> Result<T> {
    row.try_get(idx).map_err(|e| {
        let name = row.columns().get(idx).map_or("?", |c| c.name());
        Error::corrupt(format!("corrupt row: column `{name}`: {e}"))
    })
}

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
    let bad = |reason: String| {
        Error::new(
            Kind::BadLocation,
            format!("invalid PostgreSQL URL `(not shown)`: {reason}"),
        )
    };
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
            let ders = certificates(&pem).map_err(|e| bad(format!("sslrootcert {root}: {e}")))?;
            let mut roots = rustls::RootCertStore::empty();
            for der in ders {
                roots
                    .add(der)
                    .map_err(|e| bad(format!("sslrootcert {root}: unusable root ({e})")))?;
            }
            let builder = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
                rustls::crypto::aws_lc_rs::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .map_err(|e| bug(e.to_string()))?
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
    let chain = certificates(&pem).map_err(|e| format!("sslcert {cert}: {e}"))?;
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

/// The certificates of a file: PEM `CERTIFICATE` blocks (at least one, nothing else), or one
/// DER certificate.
fn certificates(
    bytes: &[u8],
) -> std::result::Result<Vec<rustls::pki_types::CertificateDer<'static>>, String> {
    use rustls::pki_types::pem::{PemObject, SectionKind};
    let looks_pem = bytes
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .is_some_and(|i| bytes[i..].starts_with(b"-----BEGIN"));
    if !looks_pem {
        if bytes.first() != Some(&0x30) {
            return Err("neither PEM nor DER (expected CERTIFICATE)".into());
        }
        return Ok(vec![rustls::pki_types::CertificateDer::from(
            bytes.to_vec(),
        )]);
    }
    let mut out = Vec::new();
    for section in <(SectionKind, Vec<u8>) as PemObject>::pem_slice_iter(bytes) {
        match section.map_err(|e| format!("malformed PEM: {e}"))? {
            (SectionKind::Certificate, der) => out.push(der.into()),
            (other, _) => {
                return Err(format!(
                    "unexpected PEM block `{other:?}` (expected CERTIFICATE)"
                ))
            }
        }
    }
    if out.is_empty() {
        return Err("no PEM block (expected CERTIFICATE)".into());
    }
    Ok(out)
}

/// A store error for something that should not happen.
fn bug(message: impl Into<String>) -> Error {
    Error::new(Kind::Bug, message)
}

/// The kind of a database error, by its SQLSTATE class: an integrity violation is a conflict
/// with what is stored, a statement the database cannot run (undefined table, syntax) a bug or
/// a schema altered by hand, data the database cannot read corrupt; everything else (a
/// connection lost, the server shutting down, out of resources, a lock or statement timeout)
/// leaves the store unavailable for now.
fn kind_of(code: &SqlState) -> Kind {
    match &code.code()[..2] {
        "23" => Kind::Conflict,
        "42" => Kind::Bug,
        "XX" | "22" => Kind::Corrupt,
        _ => Kind::Unavailable,
    }
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
pub fn outside_runtime<T, E: From<Error>>(f: impl FnOnce() -> Result<T, E>) -> Result<T, E> {
    use tokio::runtime::{Handle, RuntimeFlavor};
    match Handle::try_current() {
        Err(_) => f(),
        Ok(h) if h.runtime_flavor() == RuntimeFlavor::MultiThread => tokio::task::block_in_place(f),
        Ok(_) => Err(E::from(bug(
            "the PostgreSQL store was called from a single-threaded async runtime; \
             it needs a multi-threaded one or a plain thread",
        ))),
    }
}

/// Statements on one connection (a transaction, or the connection itself for statements that
/// commit by themselves), each bounded by the deadline: the sync face of the async client.
/// Its methods are those of `postgres::Client`, returning [`TxResult`].
pub struct Db<'a, C> {
    c: &'a C,
    rt: &'a tokio::runtime::Runtime,
    deadline: Option<Instant>,
    /// Set when a deadline was missed: the connection is then dropped.
    lost: &'a Cell<bool>,
}

/// A write or read transaction.
pub type Tx<'a> = Db<'a, tokio_postgres::Transaction<'a>>;
/// The connection itself (each statement commits by itself).
pub type Session<'a> = Db<'a, Client>;

impl<C> Db<'_, C> {
    /// Waits for `fut`, at most until the operation's deadline.
    fn wait<T>(&self, fut: impl Future<Output = Result<T, postgres::Error>>) -> DbResult<T> {
        bounded(self.rt, self.deadline, self.lost, fut)
    }
}

/// Waits on `rt` for `fut`, for at most [`OP_TIMEOUT`] or until `deadline`, whichever is
/// sooner; a missed deadline marks the connection `lost`.
fn bounded<T>(
    rt: &tokio::runtime::Runtime,
    deadline: Option<Instant>,
    lost: &Cell<bool>,
    fut: impl Future<Output = Result<T, postgres::Error>>,
) -> DbResult<T> {
    let mut limit = OP_TIMEOUT;
    if let Some(d) = deadline {
        limit = limit.min(d.saturating_duration_since(Instant::now()));
    }
    if limit.is_zero() {
        lost.set(true);
        return Err(DbFail::TimedOut(Duration::ZERO));
    }
    // The timer is made inside the runtime: it needs the runtime's time driver.
    match rt.block_on(async { tokio::time::timeout(limit, fut).await }) {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(DbFail::Db(e)),
        Err(_) => {
            lost.set(true);
            Err(DbFail::TimedOut(limit))
        }
    }
}

impl<C: GenericClient + Sync> Db<'_, C> {
    /// Runs a statement; returns the number of rows it changed.
    pub fn execute<T: ?Sized + ToStatement + Sync + Send>(
        &mut self,
        query: &T,
        params: &[&(dyn ToSql + Sync)],
    ) -> DbResult<u64> {
        self.wait(self.c.execute(query, params))
    }
    /// Runs a query; returns its rows.
    pub fn query<T: ?Sized + ToStatement + Sync + Send>(
        &mut self,
        query: &T,
        params: &[&(dyn ToSql + Sync)],
    ) -> DbResult<Vec<Row>> {
        self.wait(self.c.query(query, params))
    }
    /// Runs a query that returns exactly one row.
    pub fn query_one<T: ?Sized + ToStatement + Sync + Send>(
        &mut self,
        query: &T,
        params: &[&(dyn ToSql + Sync)],
    ) -> DbResult<Row> {
        self.wait(self.c.query_one(query, params))
    }
    /// Runs a query that returns at most one row.
    pub fn query_opt<T: ?Sized + ToStatement + Sync + Send>(
        &mut self,
        query: &T,
        params: &[&(dyn ToSql + Sync)],
    ) -> DbResult<Option<Row>> {
        self.wait(self.c.query_opt(query, params))
    }
    /// Runs a query with typed parameters, without preparing it (one round trip).
    pub fn query_typed(
        &mut self,
        query: &str,
        params: &[(&(dyn ToSql + Sync), Type)],
    ) -> DbResult<Vec<Row>> {
        self.wait(self.c.query_typed(query, params))
    }
    /// [`query_typed`](Self::query_typed) for exactly one row.
    pub fn query_typed_one(
        &mut self,
        query: &str,
        params: &[(&(dyn ToSql + Sync), Type)],
    ) -> DbResult<Row> {
        self.wait(self.c.query_typed_one(query, params))
    }
    /// [`query_typed`](Self::query_typed) for at most one row.
    pub fn query_typed_opt(
        &mut self,
        query: &str,
        params: &[(&(dyn ToSql + Sync), Type)],
    ) -> DbResult<Option<Row>> {
        self.wait(self.c.query_typed_opt(query, params))
    }
    /// Runs statements separated by `;`, without parameters.
    pub fn batch_execute(&mut self, query: &str) -> DbResult<()> {
        self.wait(self.c.batch_execute(query))
    }
    /// Prepares a statement.
    pub fn prepare(&mut self, query: &str) -> DbResult<Statement> {
        self.wait(self.c.prepare(query))
    }
}

/// The async client connected, and the runtime that drives its connection.
struct Conn {
    rt: Option<tokio::runtime::Runtime>,
    client: Option<Client>,
    /// Statements prepared on `client`, by their text (gone with the connection).
    prepared: std::collections::HashMap<&'static str, Statement>,
    /// When the last connect failed, and how.
    down: Option<(Instant, String)>,
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.client = None;
        // Dropping a runtime blocks, which panics inside another runtime (an IN stopping):
        // shut it down without waiting instead.
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
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
    /// use. A connect timeout of 5 s applies unless the URL sets one; TCP keepalives probe an
    /// idle connection after 15 s, and unacknowledged data gives up after [`OP_TIMEOUT`].
    pub fn new(url: &str) -> Result<Self> {
        let (url, tls) = take_tls(url)?;
        let mut config: postgres::Config = url.parse().map_err(|e| {
            // The parser's message never repeats the URL, which may hold a password.
            Error::new(
                Kind::BadLocation,
                format!("invalid PostgreSQL URL `(not shown)`: {e}"),
            )
        })?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(Duration::from_secs(5));
        }
        if config.get_application_name().is_none() {
            config.application_name("m2mpki");
        }
        config
            .keepalives(true)
            .keepalives_idle(Duration::from_secs(15))
            .keepalives_interval(Duration::from_secs(5))
            .keepalives_retries(3)
            .tcp_user_timeout(OP_TIMEOUT);
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
                rt: None,
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
            Some(db) => Error::new(
                kind_of(db.code()),
                format!("{}: {} ({})", self.shown, db.message(), db.code().code()),
            ),
            None => Error::unavailable(format!("{}: {}", self.shown, with_causes(e))),
        }
    }

    /// A failed transaction as the caller's error.
    fn fail_err<E: From<Error>>(&self, e: Fail<E>) -> E {
        E::from(match e {
            Fail::Ours(e) => return e,
            Fail::Db(e) => self.db_err(&e),
            Fail::TimedOut(d) if d.is_zero() => Error::unavailable(format!(
                "{}: the deadline passed before the database answered; nothing was committed",
                self.shown
            )),
            Fail::TimedOut(d) => Error::unavailable(format!(
                "{}: no answer from the database within {} ms (the connection is dropped)",
                self.shown,
                d.as_millis()
            )),
        })
    }

    /// Connects `conn` when it has no open connection.
    fn connect(&self, conn: &mut Conn) -> Result<()> {
        if conn.client.as_ref().is_some_and(|c| !c.is_closed()) {
            return Ok(());
        }
        conn.client = None;
        conn.prepared.clear();
        if let Some((at, why)) = &conn.down {
            if at.elapsed() < DOWN_BACKOFF {
                return Err(Error::unavailable(why.clone()));
            }
        }
        if conn.rt.is_none() {
            conn.rt = Some(
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| bug(format!("a runtime for PostgreSQL: {e}")))?,
            );
        }
        let rt = conn
            .rt
            .as_ref()
            .ok_or_else(|| bug("no PostgreSQL runtime"))?;
        let limit = self
            .config
            .get_connect_timeout()
            .copied()
            .unwrap_or(OP_TIMEOUT)
            + OP_TIMEOUT;
        let connected = rt.block_on(async {
            tokio::time::timeout(limit, async {
                let client = match &self.tls {
                    None => {
                        let (client, connection) = self.config.connect(NoTls).await?;
                        tokio::spawn(async move { drop(connection.await) });
                        client
                    }
                    Some(tls) => {
                        let (client, connection) = self.config.connect(tls.clone()).await?;
                        tokio::spawn(async move { drop(connection.await) });
                        client
                    }
                };
                client.batch_execute(SESSION_SETTINGS).await?;
                Ok::<_, postgres::Error>(client)
            })
            .await
        });
        match connected {
            Ok(Ok(client)) => {
                conn.client = Some(client);
                conn.down = None;
                Ok(())
            }
            failed => {
                let why = match failed {
                    Ok(Err(e)) => with_causes(&e),
                    _ => format!("no answer within {} s", limit.as_secs()),
                };
                let why = format!("cannot connect to PostgreSQL at {}: {why}", self.shown);
                conn.down = Some((Instant::now(), why.clone()));
                Err(Error::unavailable(why))
            }
        }
    }

    /// Runs `f` with the connection (opened first when there is none or it broke), its
    /// runtime, the flag that marks it lost, and its prepared statements.
    fn with_conn<T, E: From<Error>>(
        &self,
        f: impl FnOnce(
            &Client,
            &tokio::runtime::Runtime,
            &Cell<bool>,
            &mut std::collections::HashMap<&'static str, Statement>,
        ) -> Result<T, E>,
    ) -> Result<T, E> {
        self.with_conn_mut(|client, rt, lost, prepared| f(client, rt, lost, prepared))
    }

    /// [`with_conn`](Self::with_conn) with the client borrowed mutably (for transactions).
    fn with_conn_mut<T, E: From<Error>>(
        &self,
        f: impl FnOnce(
            &mut Client,
            &tokio::runtime::Runtime,
            &Cell<bool>,
            &mut std::collections::HashMap<&'static str, Statement>,
        ) -> Result<T, E>,
    ) -> Result<T, E> {
        outside_runtime(|| {
            let mut guard = self
                .conn
                .lock()
                .map_err(|_| bug("the PostgreSQL connection lock is poisoned"))?;
            self.connect(&mut guard)?;
            let lost = Cell::new(false);
            let Conn {
                rt,
                client,
                prepared,
                ..
            } = &mut *guard;
            let (Some(rt), Some(client)) = (rt.as_ref(), client.as_mut()) else {
                return Err(E::from(bug("no PostgreSQL connection")));
            };
            let out = f(client, rt, &lost, prepared);
            if lost.get() || client.is_closed() {
                guard.client = None;
                guard.prepared.clear();
            }
            out
        })
    }

    /// Statements run on the connection as they are, each committing by itself: for a single
    /// read, one round trip (with `query_typed`) instead of a transaction's four.
    pub fn single<T, E: From<Error>>(
        &self,
        f: impl FnOnce(&mut Session<'_>) -> TxResult<T, E>,
    ) -> Result<T, E> {
        self.with_conn(|client, rt, lost, _| {
            let mut db = Db {
                c: client,
                rt,
                deadline: None,
                lost,
            };
            f(&mut db).map_err(|e| self.fail_err(e))
        })
    }

    /// Runs the one statement `sql`, prepared once per connection (no parsing and planning
    /// at each call), with `f`; it commits by itself.
    pub fn single_prepared<T, E: From<Error>>(
        &self,
        sql: &'static str,
        f: impl FnOnce(&mut Session<'_>, &Statement) -> TxResult<T, E>,
    ) -> Result<T, E> {
        self.with_conn(|client, rt, lost, prepared| {
            let mut db = Db {
                c: client,
                rt,
                deadline: None,
                lost,
            };
            let statement = match prepared.get(sql) {
                Some(s) => s.clone(),
                None => {
                    let s = db.prepare(sql).map_err(|e| self.fail_err(e.into()))?;
                    prepared.insert(sql, s.clone());
                    s
                }
            };
            f(&mut db, &statement).map_err(|e| self.fail_err(e))
        })
    }

    /// Creates the tables of `schema` (idempotent DDL) under `lock`, and records `version` as
    /// `schema_version` in `meta` (a table of `key` and `value` that `schema` creates); a
    /// database that records a newer version of the `what` schema is refused. A database
    /// already at `version` is only read (one statement, no write transaction).
    pub fn ensure_schema(
        &self,
        lock: i64,
        schema: &str,
        meta: &str,
        version: i32,
        what: &str,
    ) -> Result<()> {
        let check = |found: Option<String>| -> Result<bool> {
            match found {
                None => Ok(false),
                Some(v) if v.parse::<i32>() == Ok(version) => Ok(true),
                Some(v) if v.parse::<i32>().is_ok_and(|v| v < version) => Ok(false),
                Some(v) => Err(Error::unavailable(format!(
                    "the database's {what} schema is version {v}; this build knows version \
                     {version} (upgrade m2mpki)"
                ))),
            }
        };
        let query = format!("SELECT value FROM {meta} WHERE key = 'schema_version'");
        // A missing table is an error here: the write below creates it.
        if let Ok(found) = self.single(|c| {
            c.query_typed_opt(&query, &[])?
                .map(|row| row.try_get::<_, String>(0))
                .transpose()
                .map_err(Fail::<Error>::Db)
        }) {
            if check(found)? {
                return Ok(());
            }
        }
        self.write(lock, |tx| {
            tx.batch_execute(schema)?;
            let found = tx
                .query_opt(&query, &[])?
                .map(|row| row.try_get::<_, String>(0))
                .transpose()?;
            if found.is_none() {
                tx.execute(
                    &format!("INSERT INTO {meta} (key, value) VALUES ('schema_version', $1)"),
                    &[&version.to_string()],
                )?;
            } else {
                check(found)?;
            }
            Ok(())
        })
    }

    /// A read-only statement sequence in one snapshot (REPEATABLE READ, READ ONLY).
    pub fn read<T, E: From<Error>>(
        &self,
        mut f: impl FnMut(&mut Tx<'_>) -> TxResult<T, E>,
    ) -> Result<T, E> {
        self.with_conn_mut(|client, rt, lost, _| {
            let mut run = || -> TxResult<T, E> {
                let tx = bounded(
                    rt,
                    None,
                    lost,
                    client
                        .build_transaction()
                        .isolation_level(postgres::IsolationLevel::RepeatableRead)
                        .read_only(true)
                        .start(),
                )?;
                let out = {
                    let mut db = Db {
                        c: &tx,
                        rt,
                        deadline: None,
                        lost,
                    };
                    f(&mut db)?
                };
                bounded(rt, None, lost, tx.commit())?;
                Ok(out)
            };
            run().map_err(|e| self.fail_err(e))
        })
    }

    /// A write transaction (READ COMMITTED, `synchronous_commit = on`) that first takes the
    /// advisory lock `lock` for its length, retried from the start on serialization failures
    /// and deadlocks; a failed commit is never retried blind. A commit that was sent and not
    /// answered is [`Error::CommitUnknown`].
    pub fn write<T, E: From<Error>>(
        &self,
        lock: i64,
        f: impl FnMut(&mut Tx<'_>) -> TxResult<T, E>,
    ) -> Result<T, E> {
        self.write_until(lock, None, f)
    }

    /// [`write`](Self::write) that gives up at `deadline`: nothing is sent after it, so a
    /// transaction that missed it either did not commit (an error that says so) or is
    /// [`Error::CommitUnknown`] (its COMMIT was sent in time but not answered).
    pub fn write_until<T, E: From<Error>>(
        &self,
        lock: i64,
        deadline: Option<Instant>,
        mut f: impl FnMut(&mut Tx<'_>) -> TxResult<T, E>,
    ) -> Result<T, E> {
        self.with_conn_mut(|client, rt, lost, _| {
            let mut tries = 0;
            loop {
                tries += 1;
                let mut committing = false;
                let attempt = (|| -> TxResult<T, E> {
                    let tx = bounded(rt, deadline, lost, client.transaction())?;
                    let out = {
                        let mut db = Db {
                            c: &tx,
                            rt,
                            deadline,
                            lost,
                        };
                        let body = db
                            .batch_execute(&format!(
                                "SET LOCAL synchronous_commit = on; SELECT pg_advisory_xact_lock({lock})"
                            ))
                            .map_err(Fail::from)
                            .and_then(|()| f(&mut db));
                        match body {
                            Ok(v) => v,
                            // Rolled back now, not when the connection is next used: a dropped
                            // transaction only queues its ROLLBACK, and until it is sent the
                            // transaction keeps its locks (an ALTER TABLE waited behind them
                            // until idle_in_transaction_session_timeout closed the connection).
                            Err(e @ (Fail::Ours(_) | Fail::Db(_))) => {
                                let _ = bounded(rt, None, lost, tx.rollback());
                                return Err(e);
                            }
                            Err(e) => return Err(e),
                        }
                    };
                    committing = true;
                    bounded(rt, deadline, lost, tx.commit())?;
                    Ok(out)
                })();
                match attempt {
                    Ok(v) => return Ok(v),
                    Err(Fail::Ours(e)) => return Err(e),
                    Err(Fail::Db(e)) if retryable(&e) && tries < TRIES => continue,
                    // The server answered the COMMIT with an error: nothing was committed.
                    Err(Fail::Db(e)) if committing && e.as_db_error().is_none() => {
                        return Err(E::from(Error::commit_unknown(format!(
                            "{}: the connection broke while the commit was in flight ({})",
                            self.shown,
                            with_causes(&e)
                        ))))
                    }
                    Err(Fail::TimedOut(d)) if committing && !d.is_zero() => {
                        return Err(E::from(Error::commit_unknown(format!(
                            "{}: the commit was not answered within {} ms",
                            self.shown,
                            d.as_millis()
                        ))))
                    }
                    Err(e) => return Err(self.fail_err(e)),
                }
            }
        })
    }

    /// Waits until every write transaction that held `lock` before this call has ended
    /// (committed or rolled back, on any connection), so that a read after it sees the final
    /// outcome of a commit that was [`Error::CommitUnknown`]. Bounded by `lock_timeout`.
    pub fn settle(&self, lock: i64) -> Result<()> {
        self.write(lock, |_| Ok::<_, Fail>(()))
    }
}
