//! `m2mpki lab`: the README's main job, with and without a SoftHSM2 token.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests may fail loudly

mod common;

use common::*;

fn demo(extra: &[&str]) {
    let lab = Lab::empty();
    let dir = lab.path("demo");
    let mut args = vec!["--json", "lab", "demo", "--dir", dir.to_str().unwrap()];
    args.extend_from_slice(extra);
    let out = lab.run(&args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "lab demo {extra:?} failed: {stderr}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["ok"], true);
    let steps = v["steps"].as_array().unwrap();
    // With software keys the IN also serves DTLS: a device enrols over DTLS + CoAP and the
    // rogue is refused there too. With the IN key on a token it serves TLS alone.
    let dtls = !extra.contains(&"softhsm");
    // Then each node that got a credential puts it to use (a PSK association with the IN),
    // and the IN's metrics endpoint is read.
    assert_eq!(steps.len(), if dtls { 5 + 3 + 1 } else { 3 + 2 + 1 });
    assert!(steps.iter().all(|s| s["ok"] == true), "{steps:?}");
    assert!(steps[2]["outcome"].as_str().unwrap().contains("refused"));
    if dtls {
        assert!(
            steps[3]["outcome"]
                .as_str()
                .unwrap()
                .contains("DTLSv1_2 TLS_ECDHE_ECDSA_WITH_AES_128_CCM_8"),
            "{steps:?}"
        );
        assert!(
            steps[4]["outcome"].as_str().unwrap().contains("unknown ca"),
            "{steps:?}"
        );
    }
    let assoc: Vec<_> = steps
        .iter()
        .filter(|s| s["step"].as_str().unwrap().starts_with("associate "))
        .collect();
    assert_eq!(assoc.len(), if dtls { 3 } else { 2 }, "{steps:?}");
    for s in assoc {
        assert!(
            s["outcome"]
                .as_str()
                .unwrap()
                .contains("the IN authenticated"),
            "{s:?}"
        );
    }
    let metrics = steps.last().unwrap();
    assert_eq!(metrics["step"], "metrics");
    let (issued, refused) = if dtls { (3, 2) } else { (2, 1) };
    assert!(
        metrics["outcome"].as_str().unwrap().contains(&format!(
            "counts {issued} issued enrolments and {refused} handshakes refused"
        )),
        "{metrics:?}"
    );
    // What it left behind is a working lab: its audit log verifies, and its credential
    // store holds exactly the credentials issued (two over TLS, one over DTLS).
    let home = dir.join("lab").join("home");
    let m2mpki = || {
        let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_m2mpki"));
        c.arg("--home").arg(&home);
        c
    };
    let out = m2mpki().args(["audit", "verify"]).output().unwrap();
    assert!(out.status.success());
    let store = m2mpki_bootstrap::credstore::CredentialStore::open(&home).unwrap();
    assert_eq!(store.count().unwrap(), if dtls { 3 } else { 2 });
    if extra.contains(&"softhsm") {
        let cas: serde_json::Value = serde_json::from_slice(
            &m2mpki()
                .args(["--json", "ca", "list"])
                .output()
                .unwrap()
                .stdout,
        )
        .unwrap();
        let on_token = cas
            .as_array()
            .unwrap()
            .iter()
            .filter(|c| c["key"].as_str().unwrap().starts_with("pkcs11:"))
            .count();
        assert_eq!(on_token, 6, "the lab's CA keys live on the token");
        assert!(v["lab"]["in_key"].as_str().unwrap().starts_with("pkcs11:"));
    }
}

#[test]
fn lab_demo_with_software_keys() {
    demo(&[]);
}

#[test]
fn lab_demo_with_softhsm() {
    // Fails (does not skip) when SoftHSM2 is missing: scripts/test installs it.
    demo(&["--hsm", "softhsm"]);
}

#[test]
fn lab_init_refuses_a_used_folder_and_prints_next_steps() {
    let lab = Lab::empty();
    let dir = lab.path("l");
    let out = lab.ok(&["lab", "init", dir.to_str().unwrap()]);
    assert!(out.contains("bootstrap serve --config"), "{out}");
    assert!(out.contains("bootstrap enroll --profile"), "{out}");
    let err = lab.fails(2, &["lab", "init", dir.to_str().unwrap()]);
    assert!(err.contains("not empty"), "{err}");
    // The plain (non-terminal) demo output is readable text.
    let out = lab.ok(&["lab", "demo"]);
    assert!(out.contains("all steps did what they should"), "{out}");
}
