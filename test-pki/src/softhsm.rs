//! SoftHSM2 for tests: the lab's [`SoftHsm`], and [`isolated`], which runs a test that
//! touches a token in a process of its own.

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

use anyhow::{Context, Result};

pub use m2mpki_lab::softhsm::*;

/// The config a parent test made for this process (see [`isolated`]).
fn inherited() -> Option<SoftHsm> {
    let dir = PathBuf::from(std::env::var_os(ISOLATED_DIR)?);
    let conf = dir.join("softhsm2.conf");
    (std::env::var_os("SOFTHSM2_CONF").as_deref() == Some(conf.as_os_str())).then(|| SoftHsm {
        conf,
        token_dir: dir.join("tokens"),
        module: module().unwrap_or_default(),
    })
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
    if inherited().is_some() {
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
    HSM.get_or_init(inherited).as_ref().context(
        "this test touches SoftHSM2 but does not run in its own process: wrap it in \
         m2mpki_test_pki::softhsm::isolated",
    )
}
