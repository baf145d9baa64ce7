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
