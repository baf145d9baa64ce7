//! What the CLI keeps when the store misbehaves: key files that belong to another store's CA,
//! two `ca init`s of one name at once, a connection cut while a commit is in flight (a proxy
//! that forwards COMMIT and then cuts), and a database that stops answering.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests may fail loudly

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use m2mpki_test_pki::names;
use m2mpki_test_pki::pg::{Fault, FaultProxy, TestDb};

/// The lab's CA store moved into a database of its own; the home keeps only the keys.
struct PgLab {
    lab: Lab,
    db: TestDb,
}

impl PgLab {
    fn new() -> PgLab {
        let lab = Lab::new();
        let db = TestDb::create().unwrap();
        let from = format!("redb:{}", lab.home.join("store.redb").display());
        lab.json(&["store", "migrate", "--from", &from, "--to", &db.url]);
        std::fs::rename(lab.home.join("store.redb"), lab.path("old-store.redb")).unwrap();
        PgLab { lab, db }
    }

    /// m2mpki on the store at `url` (the database itself, or a proxy in front of it).
    fn run(&self, url: &str, args: &[&str]) -> std::process::Output {
        self.lab
            .cmd()
            .env("M2MPKI_STORE", url)
            .args(args)
            .output()
            .unwrap()
    }

    fn ok(&self, url: &str, args: &[&str]) -> String {
        let out = self.run(url, args);
        assert!(
            out.status.success(),
            "m2mpki {args:?} ({:?}): {}",
            out.status.code(),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Runs `args` expecting exit `code`; returns stderr.
    fn fails(&self, url: &str, code: i32, args: &[&str]) -> String {
        let out = self.run(url, args);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(out.status.code(), Some(code), "m2mpki {args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
        stderr
    }
}

/// The SubjectPublicKeyInfo of a PEM private key file, through OpenSSL.
fn spki_of_key(key: &Path) -> Vec<u8> {
    let out = tool("openssl")
        .args(["pkey", "-pubout", "-outform", "DER", "-in"])
        .arg(key)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// The SubjectPublicKeyInfo of a CA's certificate as the store at `url` records it.
fn spki_of_ca(pg: &PgLab, url: &str, ca: &str) -> Vec<u8> {
    let pem_path = pg.lab.path(&format!("{ca}-chain.pem"));
    std::fs::write(&pem_path, pg.ok(url, &["ca", "show", ca, "--pem"])).unwrap();
    let out = tool("openssl")
        .args(["x509", "-noout", "-pubkey", "-in"])
        .arg(&pem_path)
        .output()
        .unwrap();
    let pubkey = pg.lab.path(&format!("{ca}-pub.pem"));
    std::fs::write(&pubkey, &out.stdout).unwrap();
    let der = tool("openssl")
        .args(["pkey", "-pubin", "-outform", "DER", "-in"])
        .arg(&pubkey)
        .output()
        .unwrap();
    der.stdout
}

/// `ca init mfr-ca` sent to another store of a lab home (a forgotten `--store`) is refused
/// and names the key file; the lab's issuing CA keeps its key and still issues.
#[test]
fn ca_init_for_another_store_leaves_the_homes_key_alone() {
    let lab = Lab::new();
    let key = lab
        .home
        .join("keys")
        .join(format!("{}.key.pem", names::MFR_CA));
    let before = std::fs::read(&key).unwrap();
    let other = format!("redb:{}", lab.path("other.redb").display());
    let err = lab.fails(
        1,
        &[
            "--store",
            &other,
            "ca",
            "init",
            names::MFR_CA,
            "--subject",
            "CN=Staging CA,O=Example Manufacturer",
            "--hw-type",
            m2mpki_test_pki::HW_TYPE,
        ],
    );
    assert!(err.contains(&key.display().to_string()), "{err}");
    assert!(err.contains("another store"), "{err}");
    assert_eq!(std::fs::read(&key).unwrap(), before);
    lab.ok(&[
        "issue",
        "device",
        "--ca",
        names::MFR_CA,
        "--id",
        "AFTER-1",
        "--key-out",
        lab.path("after.key").to_str().unwrap(),
        "--out",
        lab.path("after.pem").to_str().unwrap(),
    ]);
    // --force replaces a file only when no CA of the store uses it: never the lab's own.
    let own = lab.fails(
        2,
        &[
            "ca",
            "init",
            names::MFR_CA,
            "--subject",
            "CN=Again",
            "--force",
        ],
    );
    assert!(own.contains("exists already"), "{own}");
    assert_eq!(std::fs::read(&key).unwrap(), before);
    // A file no CA uses (left by a crash, say) goes with --force.
    let stray = lab.home.join("keys").join("stray.key.pem");
    std::fs::copy(&key, &stray).unwrap();
    lab.fails(1, &["ca", "init", "stray", "--subject", "CN=Stray"]);
    lab.ok(&["ca", "init", "stray", "--subject", "CN=Stray", "--force"]);
    assert_ne!(std::fs::read(&stray).unwrap(), before);
}

/// Two `ca init` of one name at once on one PostgreSQL store, 20 times: one wins, and the CA
/// it recorded has its own key (the key file's public key is the certificate's, and the CA
/// signs an issuing CA below it).
#[test]
fn two_ca_inits_of_one_name_at_once_leave_the_winner_its_key() {
    let pg = PgLab::new();
    let url = pg.db.url.clone();
    for i in 0..20 {
        let name = format!("twin-{i}");
        let run = |n: &str| {
            pg.lab
                .cmd()
                .env("M2MPKI_STORE", &url)
                .args(["ca", "init", n, "--subject", &format!("CN=Twin {i}")])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap()
        };
        let (mut a, mut b) = (run(&name), run(&name));
        let (ra, rb) = (a.wait().unwrap(), b.wait().unwrap());
        assert!(
            ra.success() != rb.success() || (ra.success() && rb.success()),
            "round {i}: neither created the CA ({ra:?}, {rb:?})"
        );
        let key = pg.lab.home.join("keys").join(format!("{name}.key.pem"));
        assert!(key.exists(), "round {i}: the recorded CA has no key file");
        assert_eq!(
            spki_of_key(&key),
            spki_of_ca(&pg, &url, &name),
            "round {i}: the key file is not the recorded CA's"
        );
        pg.ok(
            &url,
            &[
                "ca",
                "init",
                &format!("sub-{i}"),
                "--subject",
                &format!("CN=Sub {i}"),
                "--parent",
                &name,
            ],
        );
    }
}

/// A proxy forwards COMMIT and cuts the connection before the answer. Cut once, each command
/// settles the outcome on a fresh connection and succeeds with what it recorded; cut every
/// time, it says the outcome is unknown, keeps the key and names the command that tells, and
/// the next command sees what landed.
#[test]
fn a_connection_cut_during_commit_keeps_every_key() {
    let pg = PgLab::new();
    let proxy = FaultProxy::start(&pg.db.url).unwrap();
    let via = proxy.url(&pg.db.url);
    let direct = pg.db.url.clone();
    let keys = pg.lab.home.join("keys");

    // ca init, cut once: recorded, key kept, exit 0.
    proxy.set(Fault::CutNextCommit);
    pg.ok(&via, &["ca", "init", "cut-ca-0", "--subject", "CN=Cut 0"]);
    assert_eq!(proxy.cuts(), 1);
    assert_eq!(
        spki_of_key(&keys.join("cut-ca-0.key.pem")),
        spki_of_ca(&pg, &direct, "cut-ca-0")
    );

    // ca init, every commit cut: unknown, key kept; the CA is recorded and signs.
    proxy.set(Fault::CutEveryCommit);
    let err = pg.fails(
        &via,
        3,
        &["ca", "init", "cut-ca-1", "--subject", "CN=Cut 1"],
    );
    assert!(err.contains("may or may not"), "{err}");
    assert!(err.contains("m2mpki ca show cut-ca-1"), "{err}");
    assert!(err.contains("kept at"), "{err}");
    assert_eq!(
        spki_of_key(&keys.join("cut-ca-1.key.pem")),
        spki_of_ca(&pg, &direct, "cut-ca-1")
    );
    proxy.set(Fault::Relay);
    pg.ok(
        &via,
        &[
            "ca",
            "init",
            "below-1",
            "--subject",
            "CN=Below",
            "--parent",
            "cut-ca-1",
        ],
    );

    // issue device --key-out, cut once: issued, both files written.
    let issue = |id: &str| {
        let key = pg.lab.path(&format!("{id}.key"));
        let cert = pg.lab.path(&format!("{id}.pem"));
        (key, cert)
    };
    let (k0, c0) = issue("CUTDEV-0");
    proxy.set(Fault::CutNextCommit);
    pg.ok(
        &via,
        &[
            "issue",
            "device",
            "--ca",
            names::MFR_CA,
            "--id",
            "CUTDEV-0",
            "--key-out",
            k0.to_str().unwrap(),
            "--out",
            c0.to_str().unwrap(),
        ],
    );
    assert!(k0.exists() && c0.exists());
    let pem = std::fs::read_to_string(&c0).unwrap();
    let leaf = pem::parse_many(&pem).unwrap().remove(0);
    let leaf_pem = pg.lab.path("cutdev0-leaf.pem");
    std::fs::write(&leaf_pem, pem::encode(&leaf)).unwrap();
    let out = tool("openssl")
        .args(["x509", "-noout", "-pubkey", "-in"])
        .arg(&leaf_pem)
        .output()
        .unwrap();
    let cert_pub = pg.lab.path("cutdev0-pub.pem");
    std::fs::write(&cert_pub, out.stdout).unwrap();
    let cert_spki = tool("openssl")
        .args(["pkey", "-pubin", "-outform", "DER", "-in"])
        .arg(&cert_pub)
        .output()
        .unwrap()
        .stdout;
    assert_eq!(
        spki_of_key(&k0),
        cert_spki,
        "the kept key is the certificate's"
    );

    // issue device --key-out, every commit cut: unknown, the key kept, the record there.
    let (k1, c1) = issue("CUTDEV-1");
    proxy.set(Fault::CutEveryCommit);
    let err = pg.fails(
        &via,
        3,
        &[
            "issue",
            "device",
            "--ca",
            names::MFR_CA,
            "--id",
            "CUTDEV-1",
            "--key-out",
            k1.to_str().unwrap(),
            "--out",
            c1.to_str().unwrap(),
        ],
    );
    assert!(
        err.contains("may or may not") && err.contains("m2mpki certs show "),
        "{err}"
    );
    assert!(
        k1.exists(),
        "the key of a certificate that may be recorded was deleted"
    );
    proxy.set(Fault::Relay);
    let listed: serde_json::Value =
        serde_json::from_str(&pg.ok(&direct, &["--json", "certs", "show", "--id", "CUTDEV-1"]))
            .unwrap();
    let serial = listed["serial"].as_str().unwrap().to_owned();
    assert!(
        err.contains(&serial),
        "the error names serial {serial}: {err}"
    );

    // revoke, cut once: revoked, exit 0, and the ledger says so.
    proxy.set(Fault::CutNextCommit);
    pg.ok(
        &via,
        &[
            "revoke",
            &serial,
            "--ca",
            names::MFR_CA,
            "--reason",
            "superseded",
        ],
    );
    let shown: serde_json::Value =
        serde_json::from_str(&pg.ok(&direct, &["--json", "certs", "show", &serial])).unwrap();
    assert_eq!(shown["status"], "revoked", "{shown}");

    // crl, every commit cut: unknown, no file; the next crl gets a higher number.
    let crl = pg.lab.path("cut.crl");
    proxy.set(Fault::CutEveryCommit);
    let err = pg.fails(
        &via,
        3,
        &["crl", "--ca", names::MFR_CA, "--out", crl.to_str().unwrap()],
    );
    assert!(err.contains("higher number"), "{err}");
    assert!(!crl.exists());
    proxy.set(Fault::Relay);
    let first: serde_json::Value = serde_json::from_str(&pg.ok(
        &via,
        &[
            "--json",
            "crl",
            "--ca",
            names::MFR_CA,
            "--out",
            crl.to_str().unwrap(),
        ],
    ))
    .unwrap();
    assert!(first["number"].as_u64().unwrap() >= 2, "{first}");
    let audit: serde_json::Value =
        serde_json::from_str(&pg.ok(&direct, &["--json", "audit", "verify"])).unwrap();
    assert_eq!(audit["ok"], true);
}

/// A database that stops answering while its TCP connection stays up: a batch exits 3 within
/// its deadline (each round trip gets 5 s) instead of hanging.
#[test]
fn a_database_that_stops_answering_ends_a_batch_with_exit_3() {
    let pg = PgLab::new();
    let proxy = FaultProxy::start(&pg.db.url).unwrap();
    let via = proxy.url(&pg.db.url);
    let ids = pg.lab.path("ids.txt");
    let text: String = (0..3000).map(|i| format!("STALL-{i:05}\n")).collect();
    std::fs::write(&ids, text).unwrap();
    let mut child = pg
        .lab
        .cmd()
        .env("M2MPKI_STORE", &via)
        .args([
            "issue",
            "batch",
            "--ca",
            names::MFR_CA,
            "--profile",
            "device",
            "--ids",
        ])
        .arg(&ids)
        .arg("--out-dir")
        .arg(pg.lab.path("out"))
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    proxy.set(Fault::Stall);
    let stalled = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if stalled.elapsed() > Duration::from_secs(40) {
            let _ = child.kill();
            panic!("the batch still hangs 40 s after the database stopped answering");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    assert_eq!(status.code(), Some(3), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

/// A cluster of this test's own, from scripts/pg-cluster (fsync and synchronous_commit off, as
/// the shared test cluster and many tuned servers run), stopped when dropped.
struct OwnCluster {
    dir: String,
    url: String,
}

impl OwnCluster {
    fn script() -> std::process::Command {
        std::process::Command::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../scripts/pg-cluster"
        ))
    }

    fn start() -> OwnCluster {
        let out = Self::script().arg("start").output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let line = String::from_utf8(out.stdout).unwrap();
        let var = |name: &str| -> String {
            line.split_whitespace()
                .find_map(|kv| kv.strip_prefix(&format!("{name}=")))
                .unwrap_or_else(|| panic!("{name} in {line}"))
                .to_owned()
        };
        OwnCluster {
            dir: var("M2MPKI_TEST_PG_DIR"),
            url: var("M2MPKI_TEST_PG"),
        }
    }

    fn run(&self, what: &str) {
        let out = Self::script().args([what, &self.dir]).output().unwrap();
        assert!(
            out.status.success(),
            "pg-cluster {what}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for OwnCluster {
    fn drop(&mut self) {
        let _ = Self::script().args(["stop", &self.dir]).output();
    }
}

/// Serial of every certificate the bundles in `dir` hold, by ID.
fn bundled(dir: &Path) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in entries {
        let path = e.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if !(name.starts_with("bundle-") && name.ends_with(".jsonl")) {
            continue;
        }
        for line in std::fs::read_to_string(&path).unwrap().lines() {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            out.push((
                v["id"].as_str().unwrap().to_owned(),
                v["serial"].as_str().unwrap().to_owned(),
            ));
        }
    }
    out
}

/// A server that runs with `synchronous_commit = off`, stopped immediately in the middle of a
/// bundled batch, three times: every certificate written to a bundle has its ledger record after
/// the restart (each write transaction asks for a synchronous commit), and the rerun gives no ID
/// a second certificate.
#[test]
fn an_immediate_stop_mid_batch_loses_no_acknowledged_chunk() {
    let cluster = OwnCluster::start();
    let lab = Lab::new();
    let from = format!("redb:{}", lab.home.join("store.redb").display());
    lab.json(&["store", "migrate", "--from", &from, "--to", &cluster.url]);
    std::fs::rename(lab.home.join("store.redb"), lab.path("old-store.redb")).unwrap();
    let m2mpki = |args: &[&str]| {
        lab.cmd()
            .env("M2MPKI_STORE", &cluster.url)
            .args(args)
            .output()
            .unwrap()
    };
    let batch = |ids: &Path, out: &Path| {
        lab.cmd()
            .env("M2MPKI_STORE", &cluster.url)
            .args([
                "issue",
                "batch",
                "--ca",
                names::MFR_CA,
                "--profile",
                "device",
            ])
            .args(["--bundle", "--chunk", "256", "--ids"])
            .arg(ids)
            .arg("--out-dir")
            .arg(out)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    for round in 0..3 {
        let ids = lab.path(&format!("ids-{round}.txt"));
        let text: String = (0..20_000).map(|i| format!("R{round}-{i:05}\n")).collect();
        std::fs::write(&ids, text).unwrap();
        let out = lab.path(&format!("out-{round}"));
        let mut child = batch(&ids, &out);
        let started = Instant::now();
        while bundled(&out).len() < 1024 {
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "no bundles after 60 s"
            );
            assert!(child.try_wait().unwrap().is_none(), "the batch ended early");
            std::thread::sleep(Duration::from_millis(20));
        }
        cluster.run("crash");
        let status = child.wait().unwrap();
        assert_ne!(status.code(), Some(0), "the batch survived the stop");
        cluster.run("revive");

        let listed = m2mpki(&["--json", "certs", "list", "--ca", names::MFR_CA]);
        assert!(
            listed.status.success(),
            "{}",
            String::from_utf8_lossy(&listed.stderr)
        );
        let listed: serde_json::Value = serde_json::from_slice(&listed.stdout).unwrap();
        let ledger: std::collections::HashSet<String> = listed
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["serial"].as_str().unwrap().to_owned())
            .collect();
        let first = bundled(&out);
        let lost: Vec<_> = first.iter().filter(|(_, s)| !ledger.contains(s)).collect();
        assert!(
            lost.is_empty(),
            "round {round}: {} of {} bundled certificates have no ledger record (e.g. {:?})",
            lost.len(),
            first.len(),
            lost.first()
        );

        // The rerun issues the rest, and nothing twice.
        let rest = lab.path(&format!("rest-{round}"));
        let out2 = batch(&ids, &rest).wait_with_output().unwrap();
        assert!(
            out2.status.success(),
            "{}",
            String::from_utf8_lossy(&out2.stderr)
        );
        let mut per_id: std::collections::HashMap<String, std::collections::HashSet<String>> =
            Default::default();
        for (id, serial) in first.iter().chain(bundled(&rest).iter()) {
            per_id.entry(id.clone()).or_default().insert(serial.clone());
        }
        assert_eq!(per_id.len(), 20_000, "round {round}");
        let twice: Vec<_> = per_id.iter().filter(|(_, s)| s.len() > 1).collect();
        assert!(
            twice.is_empty(),
            "round {round}: IDs issued twice: {:?}",
            twice.first()
        );
    }
    let verified = m2mpki(&["audit", "verify"]);
    assert!(
        verified.status.success(),
        "{}",
        String::from_utf8_lossy(&verified.stderr)
    );
}
