//! Helpers shared by the CLI integration tests: running `m2mpki`, OpenSSL and pkilint.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use m2mpki_hsm::pkcs11::{Pkcs11Config, Pkcs11Uri};
use m2mpki_hsm::Keystore;
use m2mpki_test_pki::softhsm::process_softhsm;
use m2mpki_test_pki::{KeyBackend, LabPki, LabSpec};

/// Where the lab's CA keys live: the suite runs once per backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Software,
    SoftHsm,
}

/// Generates `mod software` and `mod softhsm`, each with one `#[test]` per named function
/// (which takes a [`Backend`]).
#[macro_export]
macro_rules! both_backends {
    ($($name:ident),* $(,)?) => {
        mod software {
            $(#[test] fn $name() { super::$name($crate::common::Backend::Software) })*
        }
        mod softhsm {
            $(#[test] fn $name() {
                m2mpki_test_pki::softhsm::isolated(
                    concat!(module_path!(), "::", stringify!($name)),
                    || super::$name($crate::common::Backend::SoftHsm),
                )
            })*
        }
    };
}

/// A lab PKI in a temporary home, driven through the `m2mpki` binary.
pub struct Lab {
    pub dir: tempfile::TempDir,
    pub home: PathBuf,
    pub backend: Backend,
}

impl Lab {
    pub fn new() -> Lab {
        Lab::with(Backend::Software)
    }

    /// A lab whose CA keys live on `backend`. SoftHSM labs get a token of their own (the
    /// process shares one SoftHSM config; `m2mpki` children inherit it).
    pub fn with(backend: Backend) -> Lab {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let dir = tempfile::tempdir().unwrap();
        let home = dir.path().join("home");
        let (spec, keystore) = match backend {
            Backend::Software => (LabSpec::default(), Keystore::default()),
            Backend::SoftHsm => {
                let hsm = process_softhsm().unwrap();
                let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let label = format!("lab-{}-{n}", std::process::id());
                hsm.init_token(&label, "4321", "8765").unwrap();
                let pin = dir.path().join("token.pin");
                std::fs::write(&pin, "4321\n").unwrap();
                let uri: Pkcs11Uri = format!(
                    "pkcs11:token={label}?module-path={}&pin-source={}",
                    hsm.module.display(),
                    pin.display()
                )
                .parse()
                .unwrap();
                let spec = LabSpec {
                    backend: KeyBackend::Pkcs11(uri),
                    ..LabSpec::default()
                };
                let cfg = Pkcs11Config {
                    sessions: 2,
                    ..Pkcs11Config::default()
                };
                (spec, Keystore::default().with_pkcs11(cfg))
            }
        };
        // Built in-process by test-pki; the store is closed again before the binary runs.
        let pki = LabPki::build(&home, &keystore, &spec).unwrap();
        if backend == Backend::SoftHsm {
            assert!(pki.cas.iter().all(|c| c.key.starts_with("pkcs11:")));
        }
        drop(pki);
        Lab { dir, home, backend }
    }

    /// An empty home (no CAs).
    pub fn empty() -> Lab {
        let dir = tempfile::tempdir().unwrap();
        let home = dir.path().join("home");
        Lab {
            dir,
            home,
            backend: Backend::Software,
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn cmd(&self) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_m2mpki"));
        c.arg("--home").arg(&self.home);
        c.env_remove("M2MPKI_HOME")
            .env_remove("M2MPKI_KEY_PASS_FILE");
        c
    }

    /// Runs m2mpki with `args`; returns the output whatever the exit code.
    pub fn run(&self, args: &[&str]) -> Output {
        self.cmd().args(args).output().unwrap()
    }

    /// Runs m2mpki and insists on success.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "m2mpki {args:?} failed ({:?}): {}",
            out.status.code(),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Runs m2mpki with --json and parses stdout.
    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut a = vec!["--json"];
        a.extend_from_slice(args);
        serde_json::from_str(&self.ok(&a)).unwrap()
    }

    /// Runs m2mpki expecting failure with `code`; returns stderr.
    pub fn fails(&self, code: i32, args: &[&str]) -> String {
        let out = self.run(args);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(
            out.status.code(),
            Some(code),
            "m2mpki {args:?}: expected exit {code}; stderr: {stderr}"
        );
        assert!(!stderr.contains("panicked"), "panic: {stderr}");
        stderr
    }

    /// Writes the root certificate of CA `ca`'s chain to a file and returns its path.
    pub fn root_pem(&self, ca: &str) -> PathBuf {
        let chain = self.ok(&["ca", "show", ca, "--pem"]);
        let blocks = pem::parse_many(chain.as_bytes()).unwrap();
        let root = blocks.last().unwrap();
        let path = self.path(&format!("{ca}-root.pem"));
        std::fs::write(&path, pem::encode(root)).unwrap();
        path
    }

    /// Number of certificates in the ledger.
    pub fn cert_count(&self) -> usize {
        self.json(&["certs", "list"]).as_array().unwrap().len()
    }

    /// Number of audit entries.
    pub fn audit_entries(&self) -> u64 {
        self.json(&["audit", "verify"])["entries"].as_u64().unwrap()
    }
}

/// Runs an external tool, failing the test loudly when it is not installed.
pub fn tool(name: &str) -> Command {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(name).is_file()))
        .unwrap_or(false);
    assert!(
        found,
        "`{name}` is not installed: run the tests through scripts/test, which installs it"
    );
    Command::new(name)
}

/// `openssl verify` of a leaf against a root, with the leaf file's chain as untrusted.
pub fn openssl_verify(root: &Path, chain_pem: &Path, purpose: &str) -> Output {
    tool("openssl")
        .args(["verify", "-x509_strict", "-purpose", purpose, "-CAfile"])
        .arg(root)
        .arg("-untrusted")
        .arg(chain_pem)
        .arg(chain_pem)
        .output()
        .unwrap()
}

/// The first certificate of a PEM file, as its own PEM file (pkilint lints one certificate).
pub fn first_cert(chain_pem: &Path, out: &Path) -> PathBuf {
    let text = std::fs::read(chain_pem).unwrap();
    let blocks = pem::parse_many(&text).unwrap();
    std::fs::write(out, pem::encode(&blocks[0])).unwrap();
    out.to_owned()
}

/// The DER of the first certificate of a PEM file.
pub fn first_der(chain_pem: &Path) -> Vec<u8> {
    let text = std::fs::read(chain_pem).unwrap();
    pem::parse_many(&text).unwrap().remove(0).into_contents()
}

/// Findings of pkilint at WARNING or above, except those that start with one of `allowed`
/// (known false positives: pkilint's URI check knows only nine schemes such as http and ftp,
/// so it flags `urn:dev:` and our `onem2m-node:` URIs alike; it also flags `*.localhost`).
pub fn pkilint_findings(cert_pem: &Path, allowed: &[&str]) -> Vec<String> {
    let out = tool("lint_pkix_cert")
        .args(["lint", "-s", "WARNING"])
        .arg(cert_pem)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !text.contains("Failed to load") && !stderr.contains("Failed to load"),
        "pkilint could not read {}: {text}{stderr}",
        cert_pem.display()
    );
    // Each finding is an indented line `code (SEVERITY)[: message]`; the exit code counts them.
    let findings: Vec<String> = text
        .lines()
        .filter(|l| l.starts_with(' '))
        .filter(|l| {
            [
                "(NOTICE)",
                "(WARNING)",
                "(ERROR)",
                "(FATAL)",
                "(INFO)",
                "(DEBUG)",
            ]
            .iter()
            .any(|sev| l.contains(sev))
        })
        .map(|l| l.trim().to_owned())
        .collect();
    assert_eq!(
        out.status.code(),
        Some(findings.len() as i32),
        "could not parse pkilint output: {text}{stderr}"
    );
    findings
        .into_iter()
        .filter(|f| !allowed.iter().any(|a| f.starts_with(a)))
        .collect()
}
