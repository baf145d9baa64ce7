//! SoftHSM2 tokens for tests and labs: a private token folder and config per use.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use anyhow::{bail, Context, Result};

/// Where distributions install the SoftHSM2 module.
const MODULE_CANDIDATES: &[&str] = &[
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/local/lib/softhsm/libsofthsm2.so",
];

/// The SoftHSM2 PKCS#11 module, or an error saying how to install it.
pub fn module() -> Result<PathBuf> {
    MODULE_CANDIDATES
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .context("SoftHSM2 is not installed (Debian/Ubuntu: apt-get install softhsm2; scripts/test installs it)")
}

/// A SoftHSM2 configuration with its own token folder.
#[derive(Debug, Clone)]
pub struct SoftHsm {
    /// The config file (what `SOFTHSM2_CONF` must name).
    pub conf: PathBuf,
    /// The token folder.
    pub token_dir: PathBuf,
    /// The module.
    pub module: PathBuf,
}

impl SoftHsm {
    /// Creates a config and an empty token folder under `dir`.
    pub fn create(dir: &Path) -> Result<Self> {
        let module = module()?;
        let token_dir = dir.join("tokens");
        std::fs::create_dir_all(&token_dir)
            .with_context(|| format!("creating {}", token_dir.display()))?;
        let conf = dir.join("softhsm2.conf");
        std::fs::write(
            &conf,
            format!(
                "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\nslots.removable = false\n",
                token_dir.display()
            ),
        )
        .with_context(|| format!("writing {}", conf.display()))?;
        Ok(SoftHsm {
            conf,
            token_dir,
            module,
        })
    }

    /// Initialises a token in a free slot: in this process when it uses this config (a module
    /// that is already initialised would not see a token made by another process), else with
    /// `softhsm2-util`.
    pub fn init_token(&self, label: &str, pin: &str, so_pin: &str) -> Result<()> {
        if std::env::var_os("SOFTHSM2_CONF").as_deref() == Some(self.conf.as_os_str()) {
            return m2mpki_hsm::pkcs11::init_token(&self.module, label, so_pin, pin)
                .with_context(|| format!("initialising SoftHSM2 token {label}"));
        }
        let out = Command::new("softhsm2-util")
            .env("SOFTHSM2_CONF", &self.conf)
            .args([
                "--init-token",
                "--free",
                "--label",
                label,
                "--pin",
                pin,
                "--so-pin",
                so_pin,
            ])
            .output()
            .context("running softhsm2-util (apt-get install softhsm2)")?;
        if !out.status.success() {
            bail!(
                "softhsm2-util --init-token failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    /// Points this process's SoftHSM2 at this config. SoftHSM2 reads `SOFTHSM2_CONF` once, when
    /// the module is initialised, so call this before any token is opened in the process and
    /// before the process starts other threads (the `lab` command and the bench call it first
    /// thing; tests use [`isolated`] instead, which sets it on a child process).
    pub fn use_in_this_process(&self) {
        std::env::set_var("SOFTHSM2_CONF", &self.conf);
    }

    /// The config a parent test made for this process (see [`isolated`]).
    fn inherited() -> Option<Self> {
        let dir = PathBuf::from(std::env::var_os(ISOLATED_DIR)?);
        let conf = dir.join("softhsm2.conf");
        (std::env::var_os("SOFTHSM2_CONF").as_deref() == Some(conf.as_os_str())).then(|| SoftHsm {
            conf,
            token_dir: dir.join("tokens"),
            module: module().unwrap_or_default(),
        })
    }
}

/// Set on a test's child process by [`isolated`]: the folder of the child's own SoftHSM2 config.
const ISOLATED_DIR: &str = "M2MPKI_TEST_SOFTHSM_DIR";

/// Runs the test `name` (its path as the test harness knows it, e.g. `softhsm::batch_issue`;
/// a leading crate name from `module_path!()` is dropped) with a SoftHSM2 config and token
/// folder of its own. SoftHSM2 reads `SOFTHSM2_CONF` once per process and misbehaves when one
/// thread initialises a token while another lists slots, so tests that touch a token cannot
/// share a process: the test binary runs itself again for this one test, with `SOFTHSM2_CONF`
/// set in the child's environment from the start (nothing is set in a running process), and
/// `body` runs in that child. The parent fails if the child fails.
#[allow(clippy::panic)] // test support: a failure here is the test's failure
pub fn isolated(name: &str, body: impl FnOnce()) {
    if SoftHsm::inherited().is_some() {
        body();
        return;
    }
    let name = name.split_once("::").map_or(name, |(first, rest)| {
        // module_path!() starts with the crate (test binary) name; libtest's names do not.
        if std::env::current_exe()
            .ok()
            .and_then(|p| p.file_stem().map(|s| s.to_string_lossy().into_owned()))
            .is_some_and(|stem| stem.starts_with(first))
        {
            rest
        } else {
            name
        }
    });
    let dir = tempfile::Builder::new()
        .prefix("m2mpki-softhsm-")
        .tempdir()
        .unwrap_or_else(|e| panic!("a temporary folder for SoftHSM2: {e}"));
    let hsm = SoftHsm::create(dir.path()).unwrap_or_else(|e| panic!("{e:#}"));
    let exe = std::env::current_exe().unwrap_or_else(|e| panic!("the test binary: {e}"));
    let out = Command::new(exe)
        .args([name, "--exact", "--nocapture", "--test-threads=1"])
        .env("SOFTHSM2_CONF", &hsm.conf)
        .env(ISOLATED_DIR, dir.path())
        .env_remove("RUST_TEST_THREADS")
        .output()
        .unwrap_or_else(|e| panic!("running {name} in a child process: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{name} failed in its SoftHSM2 process ({:?}):\n{stdout}\n{stderr}",
        out.status
    );
    // The child must have run exactly this test: a misspelt name would pass silently.
    assert!(
        stdout.contains("1 passed"),
        "{name}: the child process ran no test:\n{stdout}\n{stderr}"
    );
}

/// The SoftHSM2 config of this test process, made for it by [`isolated`].
pub fn process_softhsm() -> Result<&'static SoftHsm> {
    static HSM: OnceLock<Option<SoftHsm>> = OnceLock::new();
    HSM.get_or_init(SoftHsm::inherited).as_ref().context(
        "this test touches SoftHSM2 but does not run in its own process: wrap it in \
         m2mpki_test_pki::softhsm::isolated",
    )
}
