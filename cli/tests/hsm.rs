//! `m2mpki hsm` and PKCS#11 errors through the binary, on SoftHSM2.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests may fail loudly

mod common;

use common::*;
use m2mpki_test_pki::softhsm::{isolated, process_softhsm};

/// A fresh token; returns (lab, token label, pin file path).
fn token_lab(name: &str) -> (Lab, String, String) {
    let lab = Lab::empty();
    let hsm = process_softhsm().unwrap();
    let label = format!("{name}-{}", std::process::id());
    hsm.init_token(&label, "2468", "1357").unwrap();
    let pin = lab.path("pin");
    std::fs::write(&pin, "2468\n").unwrap();
    (lab, label, pin.display().to_string())
}

fn module() -> String {
    process_softhsm().unwrap().module.display().to_string()
}

#[test]
fn keygen_list_and_a_ca_on_the_token() {
    isolated(
        concat!(module_path!(), "::keygen_list_and_a_ca_on_the_token"),
        keygen_list_and_a_ca_on_the_token_body,
    );
}

fn keygen_list_and_a_ca_on_the_token_body() {
    let (lab, label, pin) = token_lab("cli-keygen");
    let m = module();
    let uri = format!("pkcs11:token={label};object=root?pin-source={pin}");
    let v = lab.json(&[
        "--pkcs11-module",
        &m,
        "hsm",
        "keygen",
        &uri,
        "--key-type",
        "p384",
    ]);
    assert_eq!(v["key_type"], "p384");
    let full = v["uri"].as_str().unwrap().to_owned();
    assert!(full.contains("id=%"), "{full}");
    // The same label again is refused.
    let err = lab.fails(2, &["--pkcs11-module", &m, "hsm", "keygen", &uri]);
    assert!(err.contains("already has an object"), "{err}");

    let listed = lab.json(&[
        "hsm",
        "list",
        "--module",
        &m,
        "--login",
        &format!("pkcs11:token={label}?pin-source={pin}"),
    ]);
    let token = listed
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["label"] == label.as_str())
        .unwrap()
        .clone();
    let private = token["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["class"] == "private")
        .unwrap()
        .clone();
    assert_eq!(private["sensitive"], true);
    assert_eq!(private["extractable"], false);
    assert_eq!(private["never_extractable"], true);

    // A root CA whose key stays on the token; the record keeps the URI, never the PIN.
    let out = lab.ok(&[
        "--pkcs11-module",
        &m,
        "ca",
        "init",
        "root",
        "--subject",
        "CN=Token Root,O=Maker",
        "--hw-type",
        "1.3.6.1.4.1.99999.1",
        "--key",
        &full,
    ]);
    assert!(out.contains("pkcs11:"), "{out}");
    let shown = lab.json(&["ca", "show", "root"]);
    assert!(shown["key"].as_str().unwrap().starts_with("pkcs11:"));
    lab.ok(&[
        "--pkcs11-module",
        &m,
        "issue",
        "device",
        "--ca",
        "root",
        "--id",
        "T1",
        "--key-out",
        lab.path("t1.key").to_str().unwrap(),
        "--out",
        lab.path("t1.pem").to_str().unwrap(),
    ]);
    let root = lab.root_pem("root");
    let r = openssl_verify(&root, &lab.path("t1.pem"), "sslclient");
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    // CRLs are signed on the token too, and OpenSSL accepts them.
    let serial = lab.json(&["certs", "list", "--id", "T1"])[0]["serial"]
        .as_str()
        .unwrap()
        .to_owned();
    lab.ok(&["revoke", &serial, "--ca", "root", "--reason", "superseded"]);
    let crl = lab.path("root.crl");
    let v = lab.json(&[
        "--pkcs11-module",
        &m,
        "crl",
        "--ca",
        "root",
        "--out",
        crl.to_str().unwrap(),
    ]);
    assert_eq!(v["entries"], 1);
    let out = tool("openssl")
        .args(["crl", "-noout", "-verify", "-CAfile"])
        .arg(&root)
        .arg("-in")
        .arg(&crl)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && text.contains("verify OK"), "{text}");
}

#[test]
fn pkcs11_errors_have_their_exit_codes() {
    isolated(
        concat!(module_path!(), "::pkcs11_errors_have_their_exit_codes"),
        pkcs11_errors_have_their_exit_codes_body,
    );
}

fn pkcs11_errors_have_their_exit_codes_body() {
    let (lab, label, pin) = token_lab("cli-errors");
    let m = module();
    lab.ok(&[
        "--pkcs11-module",
        &m,
        "hsm",
        "keygen",
        &format!("pkcs11:token={label};object=k?pin-source={pin}"),
    ]);
    let wrong = lab.path("wrong-pin");
    std::fs::write(&wrong, "0000\n").unwrap();
    let cases: Vec<(Vec<String>, &str)> = vec![
        (vec!["ca".into(), "init".into(), "x".into(), "--subject".into(), "CN=x".into(), "--key".into(),
            format!("pkcs11:token={label};object=k?pin-source={}", wrong.display())], "wrong PIN"),
        (vec!["ca".into(), "init".into(), "x".into(), "--subject".into(), "CN=x".into(), "--key".into(),
            format!("pkcs11:token=no-such-token;object=k?pin-source={pin}")], "no PKCS#11 token"),
        (vec!["ca".into(), "init".into(), "x".into(), "--subject".into(), "CN=x".into(), "--key".into(),
            format!("pkcs11:token={label};object=missing?pin-source={pin}")], "no private key"),
        (vec!["ca".into(), "init".into(), "x".into(), "--subject".into(), "CN=x".into(), "--key".into(),
            format!("pkcs11:token={label};object=k?pin-source={pin}&module-path=/nonexistent/p11.so")], "/nonexistent/p11.so"),
        (vec!["ca".into(), "init".into(), "x".into(), "--subject".into(), "CN=x".into(), "--key".into(),
            format!("pkcs11:token={label};serial=1;object=k")], "mutually exclusive"),
    ];
    for (args, needle) in cases {
        let mut a = vec!["--pkcs11-module".to_owned(), m.clone()];
        a.extend(args);
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        let err = lab.fails(2, &a);
        assert!(err.contains(needle), "{a:?}: {err}");
        // The token's label carries the process ID, which may itself contain "2468".
        let scrubbed = err.replace(&label, "<label>");
        assert!(
            !scrubbed.contains("0000") && !scrubbed.contains("2468"),
            "a PIN leaked: {err}"
        );
    }
    // No module anywhere.
    let mut c = lab.cmd();
    c.env_remove("M2MPKI_PKCS11_MODULE");
    let out = c
        .args([
            "ca",
            "init",
            "x",
            "--subject",
            "CN=x",
            "--key",
            &format!("pkcs11:token={label};object=k"),
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no PKCS#11 module"));
    // No PIN source and no terminal: a clear error, not a hang.
    let out = lab
        .cmd()
        .env_remove("M2MPKI_PKCS11_PIN")
        .stdin(std::process::Stdio::null())
        .args([
            "--pkcs11-module",
            &m,
            "ca",
            "init",
            "x",
            "--subject",
            "CN=x",
            "--key",
            &format!("pkcs11:token={label};object=k"),
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.code() == Some(2) && stderr.contains("needs a PIN"),
        "{stderr}"
    );
    // A PIN from the environment works; nothing was recorded by the failures above.
    let out = lab
        .cmd()
        .env("M2MPKI_PKCS11_PIN", "2468")
        .args([
            "--pkcs11-module",
            &m,
            "ca",
            "init",
            "x",
            "--subject",
            "CN=x",
            "--key",
            &format!("pkcs11:token={label};object=k"),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(lab.json(&["ca", "list"]).as_array().unwrap().len(), 1);
    assert_eq!(lab.audit_entries(), 1);
}
