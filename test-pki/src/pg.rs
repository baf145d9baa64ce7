//! PostgreSQL databases for tests: one fresh database per test on the throwaway cluster that
//! `scripts/test` starts (`scripts/pg-cluster`), named by `$M2MPKI_TEST_PG`.

use anyhow::{bail, Context, Result};
pub use postgres;
use postgres::{Client, NoTls};

/// The variable naming the test cluster's administrative URL.
pub const ENV: &str = "M2MPKI_TEST_PG";

/// The test cluster's administrative URL, or an error saying how to get one.
pub fn server() -> Result<String> {
    match std::env::var(ENV) {
        Ok(url) if !url.is_empty() => Ok(url),
        _ => bail!(
            "{ENV} is not set: run the tests with scripts/test, which starts a throwaway \
             PostgreSQL cluster (or start one with `eval $(scripts/pg-cluster start)`)"
        ),
    }
}

/// The root that issued the test cluster's TLS certificate (`$M2MPKI_TEST_PG_CA`).
pub fn server_ca() -> Result<std::path::PathBuf> {
    match std::env::var("M2MPKI_TEST_PG_CA") {
        Ok(p) if !p.is_empty() => Ok(p.into()),
        _ => bail!("M2MPKI_TEST_PG_CA is not set: start the cluster with scripts/pg-cluster"),
    }
}

/// The role that logs in to the test cluster by client certificate only (over TLS; rejected
/// without), and its certificate and key files (`$M2MPKI_TEST_PG_CLIENT_CERT`, `_KEY`).
pub fn client_certificate() -> Result<(&'static str, std::path::PathBuf, std::path::PathBuf)> {
    let var = |name: &str| match std::env::var(name) {
        Ok(p) if !p.is_empty() => Ok(std::path::PathBuf::from(p)),
        _ => bail!("{name} is not set: start the cluster with scripts/pg-cluster"),
    };
    Ok((
        "m2mpki_cert",
        var("M2MPKI_TEST_PG_CLIENT_CERT")?,
        var("M2MPKI_TEST_PG_CLIENT_KEY")?,
    ))
}

/// A database of its own for one test, dropped (with its connections) at the end.
#[derive(Debug)]
pub struct TestDb {
    admin: String,
    name: String,
    /// The URL of the database.
    pub url: String,
}

impl TestDb {
    /// Creates an empty database with a fresh name.
    pub fn create() -> Result<Self> {
        let admin = server()?;
        let mut random = [0u8; 6];
        aws_lc_rs::rand::fill(&mut random).map_err(|_| anyhow::anyhow!("no randomness"))?;
        let name = format!("m2mpki_t_{}", hex::encode(random));
        let mut client = Client::connect(&admin, NoTls)
            .with_context(|| format!("connecting to the test cluster ({ENV})"))?;
        client
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .with_context(|| format!("creating database {name}"))?;
        let url = match admin.rsplit_once('/') {
            Some((base, _)) => format!("{base}/{name}"),
            None => bail!("{ENV} must be a postgres:// URL ending in /DATABASE"),
        };
        Ok(TestDb { admin, name, url })
    }
}

impl TestDb {
    /// Hands the database to `role` (it may then create the store's tables in it).
    pub fn give_to(&self, role: &str) -> Result<()> {
        let mut client = Client::connect(&self.admin, NoTls)
            .with_context(|| format!("connecting to the test cluster ({ENV})"))?;
        client.batch_execute(&format!("ALTER DATABASE {} OWNER TO {role}", self.name))?;
        Ok(())
    }

    /// Makes the database refuse new connections and ends the open ones, as when its server
    /// goes away (`false`), or accept them again (`true`).
    pub fn set_reachable(&self, reachable: bool) -> Result<()> {
        let mut client = Client::connect(&self.admin, NoTls)
            .with_context(|| format!("connecting to the test cluster ({ENV})"))?;
        client.batch_execute(&format!(
            "ALTER DATABASE {} ALLOW_CONNECTIONS {reachable}",
            self.name
        ))?;
        if !reachable {
            client.batch_execute(&format!(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                 WHERE datname = '{}' AND pid <> pg_backend_pid()",
                self.name
            ))?;
        }
        Ok(())
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        // Best effort: the whole cluster goes away at the end of the run anyway.
        if let Ok(mut client) = Client::connect(&self.admin, NoTls) {
            let _ = client.batch_execute(&format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            ));
        }
    }
}

/// What a [`FaultProxy`] does to the connections through it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Relays both ways.
    Relay,
    /// Forwards the next `COMMIT` of a write transaction a client sends to the server, lets the server commit, and
    /// then cuts the connection before the answer reaches the client (the outcome is unknown
    /// to the client, as after a failover or a network cut at the worst moment); relays again
    /// afterwards.
    CutNextCommit,
    /// [`CutNextCommit`](Self::CutNextCommit) for every commit, until changed.
    CutEveryCommit,
    /// Stops relaying anything (both ways) while the TCP connections stay up, as a frozen
    /// server or a black-holing middlebox does.
    Stall,
}

/// A TCP proxy in front of the test cluster that misbehaves on demand ([`Fault`]), for
/// tests of what the stores do when a commit's outcome is unknown or the database stops
/// answering. Its threads end with the process.
#[derive(Debug)]
pub struct FaultProxy {
    fault: std::sync::Arc<std::sync::Mutex<Fault>>,
    cuts: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    /// Where the proxy listens, as `127.0.0.1:PORT`.
    pub addr: std::net::SocketAddr,
}

impl FaultProxy {
    /// Starts a proxy to the server of `url` (a `postgres://user@host:port/db` URL), relaying.
    pub fn start(url: &str) -> Result<Self> {
        let target = url
            .split_once('@')
            .and_then(|(_, rest)| rest.split_once('/'))
            .map(|(hostport, _)| hostport.to_owned())
            .context("a postgres://user@host:port/db URL")?;
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let fault = std::sync::Arc::new(std::sync::Mutex::new(Fault::Relay));
        let cuts = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (f, c) = (fault.clone(), cuts.clone());
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let Ok(server) = std::net::TcpStream::connect(&target) else {
                    continue;
                };
                let (f, c) = (f.clone(), c.clone());
                std::thread::spawn(move || drop(relay_connection(client, server, &f, &c)));
            }
        });
        Ok(FaultProxy { fault, cuts, addr })
    }

    /// `url` with its host and port replaced by the proxy's.
    pub fn url(&self, url: &str) -> String {
        match (url.split_once('@'), url.rsplit_once('/')) {
            (Some((user, _)), Some((_, db))) => format!("{user}@{}/{db}", self.addr),
            _ => url.to_owned(),
        }
    }

    /// Changes what the proxy does from now on (for connections open and new).
    pub fn set(&self, fault: Fault) {
        if let Ok(mut f) = self.fault.lock() {
            *f = fault;
        }
    }

    /// How many commits it has cut so far.
    pub fn cuts(&self) -> usize {
        self.cuts.load(std::sync::atomic::Ordering::SeqCst)
    }
}

fn current(fault: &std::sync::Mutex<Fault>) -> Fault {
    fault.lock().map(|f| *f).unwrap_or(Fault::Relay)
}

/// Relays one connection: the client's messages are parsed (startup first, then type byte and
/// length) so that a `COMMIT` can be recognised; the server's bytes are copied as they come.
fn relay_connection(
    mut client: std::net::TcpStream,
    mut server: std::net::TcpStream,
    fault: &std::sync::Arc<std::sync::Mutex<Fault>>,
    cuts: &std::sync::atomic::AtomicUsize,
) -> std::io::Result<()> {
    use std::io::{Read, Write};
    let (mut from_server, mut to_client) = (server.try_clone()?, client.try_clone()?);
    let f = fault.clone();
    // Set once a COMMIT is cut: nothing more of the server's reaches the client.
    let cut = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let cut_seen = cut.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 16384];
        loop {
            match from_server.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if current(&f) == Fault::Stall
                        || cut_seen.load(std::sync::atomic::Ordering::SeqCst)
                    {
                        continue;
                    }
                    if to_client.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            }
        }
        let _ = to_client.shutdown(std::net::Shutdown::Both);
    });
    let mut started = false;
    let mut read_only = false;
    loop {
        let message = if started {
            let mut head = [0u8; 5];
            client.read_exact(&mut head)?;
            let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
            let mut body = vec![0u8; len.saturating_sub(4)];
            client.read_exact(&mut body)?;
            let mut m = head.to_vec();
            m.extend_from_slice(&body);
            m
        } else {
            let mut len = [0u8; 4];
            client.read_exact(&mut len)?;
            let mut body = vec![0u8; (u32::from_be_bytes(len) as usize).saturating_sub(4)];
            client.read_exact(&mut body)?;
            // SSLRequest and GSSENCRequest come before the real startup message.
            let code = body
                .get(..4)
                .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]));
            started = !matches!(code, Some(80_877_103 | 80_877_104));
            let mut m = len.to_vec();
            m.extend_from_slice(&body);
            m
        };
        let fault_now = current(fault);
        if fault_now == Fault::Stall {
            continue;
        }
        let query = if message.first() == Some(&b'Q') {
            String::from_utf8_lossy(&message[5..])
                .trim_end_matches('\0')
                .trim()
                .to_ascii_uppercase()
        } else {
            String::new()
        };
        // Only the commits of write transactions are cut: a read-only one starts so.
        if query.starts_with("BEGIN") || query.starts_with("START TRANSACTION") {
            read_only = query.contains("READ ONLY");
        }
        let is_commit = query == "COMMIT" && !read_only;
        let cutting =
            is_commit && matches!(fault_now, Fault::CutNextCommit | Fault::CutEveryCommit);
        if cutting {
            cut.store(true, std::sync::atomic::Ordering::SeqCst);
            if let (Fault::CutNextCommit, Ok(mut f)) = (fault_now, fault.lock()) {
                *f = Fault::Relay;
            }
        }
        server.write_all(&message)?;
        if cutting {
            // Give the server the moment it needs to commit, then cut both sides.
            std::thread::sleep(std::time::Duration::from_millis(300));
            cuts.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let _ = client.shutdown(std::net::Shutdown::Both);
            let _ = server.shutdown(std::net::Shutdown::Both);
            return Ok(());
        }
    }
}
