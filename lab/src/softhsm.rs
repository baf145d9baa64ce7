//! SoftHSM2 tokens for labs (and, through `m2mpki-test-pki`, tests): a private token folder
//! and config per use.

use std::path::{Path, PathBuf};
use std::process::Command;

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
    /// thing; tests run each token user in a process of its own instead, with the variable set
    /// from its start: `m2mpki_test_pki::softhsm::isolated`).
    pub fn use_in_this_process(&self) {
        std::env::set_var("SOFTHSM2_CONF", &self.conf);
    }
}
