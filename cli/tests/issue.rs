//! Issuance through the `m2mpki` binary, checked by OpenSSL, pkilint and our own parser.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests may fail loudly

mod common;

use std::path::Path;

use common::*;
use m2mpki_ca::FieldNodeIdentity;
use m2mpki_test_pki::{names, ENTERPRISE, HW_TYPE};
use x509_parser::prelude::*;

fn identity_of(chain_pem: &Path) -> FieldNodeIdentity {
    let der = first_der(chain_pem);
    let (_, cert) = X509Certificate::from_der(&der).unwrap();
    FieldNodeIdentity::from_certificate(&cert).unwrap()
}

fn lint_clean(lab: &Lab, pem: &Path, allowed: &[&str]) {
    let leaf = first_cert(pem, &lab.path("leaf-only.pem"));
    let findings = pkilint_findings(&leaf, allowed);
    assert!(findings.is_empty(), "{}: {findings:?}", pem.display());
}

both_backends!(
    every_profile_verifies_with_openssl_and_lints_clean,
    openssl_csrs_are_issued_and_tampered_csrs_refused,
    one_live_certificate_per_identity_unless_reissue,
);

fn every_profile_verifies_with_openssl_and_lints_clean(backend: Backend) {
    let lab = Lab::with(backend);
    // The CA certificates themselves.
    for ca in [
        names::MFR_ROOT,
        names::MFR_CA,
        names::ENT_ROOT,
        names::ENT_CA,
        names::INFRA_ROOT,
        names::INFRA_CA,
    ] {
        let chain = lab.path(&format!("{ca}.pem"));
        std::fs::write(&chain, lab.ok(&["ca", "show", ca, "--pem"])).unwrap();
        lint_clean(&lab, &chain, &[]);
    }

    let device = lab.path("device.pem");
    let device_key = lab.path("device.key");
    let v = lab.json(&[
        "issue",
        "device",
        "--ca",
        names::MFR_CA,
        "--id",
        "SN-0001",
        "--key-out",
        device_key.to_str().unwrap(),
        "--out",
        device.to_str().unwrap(),
    ]);
    assert_eq!(v["identity"], format!("device:{HW_TYPE}:SN-0001"));
    let out = openssl_verify(&lab.root_pem(names::MFR_CA), &device, "sslclient");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    lint_clean(&lab, &device, &[]);
    assert_eq!(
        identity_of(&device),
        format!("device:{HW_TYPE}:SN-0001").parse().unwrap()
    );
    // The key file is private and OpenSSL reads it.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&device_key).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let out = tool("openssl")
        .args(["pkey", "-noout", "-in"])
        .arg(&device_key)
        .output()
        .unwrap();
    assert!(out.status.success());

    let node = lab.path("node.pem");
    lab.ok(&[
        "issue",
        "node",
        "--ca",
        names::ENT_CA,
        "--enterprise",
        ENTERPRISE,
        "--id",
        "pump-7",
        "--key-out",
        lab.path("node.key").to_str().unwrap(),
        "--out",
        node.to_str().unwrap(),
    ]);
    let out = openssl_verify(&lab.root_pem(names::ENT_CA), &node, "sslclient");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Only the documented false positive, and only on our exact URI.
    lint_clean(
        &lab,
        &node,
        &[&format!(
            "pkix.invalid_uri_syntax (ERROR): Invalid URI syntax: \"onem2m-node://{ENTERPRISE}/pump-7\""
        )],
    );
    assert_eq!(
        identity_of(&node),
        FieldNodeIdentity::Node {
            enterprise: ENTERPRISE.parse().unwrap(),
            id: "pump-7".parse().unwrap()
        }
    );

    let server = lab.path("server.pem");
    lab.ok(&[
        "issue",
        "server",
        "--ca",
        names::INFRA_CA,
        "--fqdn",
        m2mpki_test_pki::IN_FQDN,
        "--key-out",
        lab.path("server.key").to_str().unwrap(),
        "--out",
        server.to_str().unwrap(),
    ]);
    let out = tool("openssl")
        .args([
            "verify",
            "-x509_strict",
            "-purpose",
            "sslserver",
            "-verify_hostname",
        ])
        .arg(m2mpki_test_pki::IN_FQDN)
        .arg("-CAfile")
        .arg(lab.root_pem(names::INFRA_CA))
        .arg("-untrusted")
        .arg(&server)
        .arg(&server)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    lint_clean(&lab, &server, &["pkix.invalid_domain_name_syntax"]);

    // The wrong purpose is refused by OpenSSL too: our EKUs mean something.
    let out = openssl_verify(&lab.root_pem(names::MFR_CA), &device, "sslserver");
    assert!(!out.status.success());
}

#[test]
fn device_certificate_forever_and_der_output() {
    let lab = Lab::empty();
    lab.ok(&[
        "ca",
        "init",
        "r",
        "--subject",
        "CN=R,O=Maker",
        "--validity",
        "forever",
        "--path-len",
        "0",
        "--hw-type",
        "1.3.6.1.4.1.99999.7",
    ]);
    let der = lab.path("d.der");
    lab.ok(&[
        "issue",
        "device",
        "--ca",
        "r",
        "--id",
        "00:1B:44:11:3A:B7",
        "--validity",
        "forever",
        "--key-out",
        lab.path("d.key").to_str().unwrap(),
        "--out",
        der.to_str().unwrap(),
        "--der",
    ]);
    let bytes = std::fs::read(&der).unwrap();
    let (_, cert) = X509Certificate::from_der(&bytes).unwrap();
    assert_eq!(cert.validity().not_after.to_datetime().year(), 9999);
    // RFC 5280: 9999 dates are GeneralizedTime 99991231235959Z.
    let text = tool("openssl")
        .args(["x509", "-inform", "DER", "-noout", "-enddate", "-in"])
        .arg(&der)
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&text.stdout).contains("Dec 31 23:59:59 9999 GMT"));
    // Node certificates may not be forever.
    lab.ok(&[
        "ca",
        "init",
        "e",
        "--subject",
        "CN=E,O=Ent",
        "--validity",
        "forever",
    ]);
    let err = lab.fails(
        1,
        &[
            "issue",
            "node",
            "--ca",
            "e",
            "--enterprise",
            "e.example",
            "--id",
            "x",
            "--validity",
            "forever",
            "--key-out",
            lab.path("n.key").to_str().unwrap(),
            "--out",
            lab.path("n.pem").to_str().unwrap(),
        ],
    );
    assert!(err.contains("forever"), "{err}");
    assert!(
        !lab.path("n.key").exists(),
        "a refused request left its key behind"
    );
}

fn openssl_csrs_are_issued_and_tampered_csrs_refused(backend: Backend) {
    let lab = Lab::with(backend);
    let key = lab.path("csr.key");
    let csr = lab.path("req.csr");
    // OpenSSL's CSR carries extensions rcgen's own parser rejects (SKI, a custom EKU).
    let out = tool("openssl")
        .args([
            "req",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
        ])
        .arg(&key)
        .arg("-out")
        .arg(&csr)
        .args([
            "-subj",
            "/CN=ignored/serialNumber=SN-CSR-1",
            "-addext",
            "subjectKeyIdentifier=hash",
            "-addext",
            "extendedKeyUsage=1.3.6.1.4.1.99999.42,serverAuth",
            "-addext",
            "subjectAltName=DNS:evil.example",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cert = lab.path("csr-cert.pem");
    lab.ok(&[
        "issue",
        "device",
        "--ca",
        names::MFR_CA,
        "--id",
        "SN-CSR-1",
        "--csr",
        csr.to_str().unwrap(),
        "--out",
        cert.to_str().unwrap(),
    ]);
    // The profile decided: no wished-for SAN or EKU made it in; the CSR's key did.
    let der = first_der(&cert);
    let (_, parsed) = X509Certificate::from_der(&der).unwrap();
    let text = format!("{:?}", parsed.extensions());
    assert!(!text.contains("evil.example"));
    let eku = parsed.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.client_auth && !eku.server_auth && eku.other.is_empty());
    let pubkey = tool("openssl")
        .args(["pkey", "-pubout", "-in"])
        .arg(&key)
        .output()
        .unwrap();
    let certkey = tool("openssl")
        .args(["x509", "-pubkey", "-noout", "-in"])
        .arg(&cert)
        .output()
        .unwrap();
    assert_eq!(pubkey.stdout, certkey.stdout);
    let out = openssl_verify(&lab.root_pem(names::MFR_CA), &cert, "sslclient");
    assert!(out.status.success());

    // Flip one bit inside the signed part: the self-signature no longer verifies.
    let text = std::fs::read_to_string(&csr).unwrap();
    let mut der = ::pem::parse(&text).unwrap().into_contents();
    let i = der.len() / 2;
    der[i] ^= 0x01;
    let tampered = lab.path("tampered.csr");
    std::fs::write(
        &tampered,
        ::pem::encode(&::pem::Pem::new("CERTIFICATE REQUEST", der)),
    )
    .unwrap();
    let before = (lab.cert_count(), lab.audit_entries());
    let err = lab.fails(
        2,
        &[
            "issue",
            "device",
            "--ca",
            names::MFR_CA,
            "--id",
            "SN-CSR-2",
            "--csr",
            tampered.to_str().unwrap(),
            "--out",
            lab.path("t.pem").to_str().unwrap(),
        ],
    );
    assert!(err.contains("tampered.csr"), "{err}");
    assert_eq!((lab.cert_count(), lab.audit_entries()), before);
    assert!(!lab.path("t.pem").exists());
}

#[test]
fn bad_input_is_exit_2_names_the_problem_and_records_nothing() {
    let lab = Lab::new();
    let out = lab.path("out.pem");
    let o = out.to_str().unwrap();
    let k = lab.path("k.pem");
    let kk = k.to_str().unwrap();
    let truncated = lab.path("truncated.csr");
    std::fs::write(
        &truncated,
        "-----BEGIN CERTIFICATE REQUEST-----\nMIIBADCB\n",
    )
    .unwrap();
    let garbage = lab.path("garbage.csr");
    std::fs::write(&garbage, [0x30, 0x82, 0xff, 0xff, 1, 2, 3]).unwrap();
    let long_id = "x".repeat(65);
    let before = (lab.cert_count(), lab.audit_entries());
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec![
                "issue",
                "device",
                "--ca",
                names::MFR_CA,
                "--id",
                "SN-1",
                "--csr",
                truncated.to_str().unwrap(),
                "--out",
                o,
            ],
            "truncated.csr",
        ),
        (
            vec![
                "issue",
                "device",
                "--ca",
                names::MFR_CA,
                "--id",
                "SN-1",
                "--csr",
                garbage.to_str().unwrap(),
                "--out",
                o,
            ],
            "garbage.csr",
        ),
        (
            vec![
                "issue",
                "device",
                "--ca",
                names::MFR_CA,
                "--id",
                "SN-1",
                "--csr",
                "/nonexistent/x.csr",
                "--out",
                o,
            ],
            "/nonexistent/x.csr",
        ),
        (
            vec![
                "issue",
                "device",
                "--ca",
                names::MFR_CA,
                "--id",
                "bad id!",
                "--key-out",
                kk,
                "--out",
                o,
            ],
            "pre-provisioned ID",
        ),
        (
            vec![
                "issue",
                "device",
                "--ca",
                names::MFR_CA,
                "--id",
                &long_id,
                "--key-out",
                kk,
                "--out",
                o,
            ],
            "longer than 64",
        ),
        (
            vec![
                "issue",
                "device",
                "--ca",
                "no-such-ca",
                "--id",
                "SN-1",
                "--key-out",
                kk,
                "--out",
                o,
            ],
            "no-such-ca",
        ),
        (
            vec![
                "issue",
                "node",
                "--ca",
                names::ENT_CA,
                "--enterprise",
                "Acme Corp",
                "--id",
                "n1",
                "--key-out",
                kk,
                "--out",
                o,
            ],
            "DNS name",
        ),
        (
            vec![
                "issue",
                "server",
                "--ca",
                names::INFRA_CA,
                "--fqdn",
                "bad_name.example",
                "--key-out",
                kk,
                "--out",
                o,
            ],
            "DNS name",
        ),
        (
            vec!["ca", "init", "x", "--subject", "O=no common name"],
            "CN is required",
        ),
        (
            vec!["ca", "init", "x", "--subject", "CN=x", "--validity", "12w"],
            "validity",
        ),
        (
            vec!["ca", "init", "x", "--subject", "CN=x", "--hw-type", "1.2.x"],
            "OID",
        ),
        (
            vec!["issue", "device", "--ca", names::MFR_CA, "--id", "SN-1"],
            "required",
        ),
    ];
    for (args, needle) in cases {
        let err = lab.fails(2, &args);
        assert!(err.contains(needle), "{args:?}: {err}");
        assert!(!out.exists() && !k.exists(), "{args:?} left files behind");
    }
    assert_eq!((lab.cert_count(), lab.audit_entries()), before);

    // An existing output file is kept unless --force.
    std::fs::write(&out, "precious").unwrap();
    let err = lab.fails(
        2,
        &[
            "issue",
            "device",
            "--ca",
            names::MFR_CA,
            "--id",
            "SN-1",
            "--key-out",
            kk,
            "--out",
            o,
        ],
    );
    assert!(err.contains("out.pem") && err.contains("--force"), "{err}");
    assert_eq!(std::fs::read_to_string(&out).unwrap(), "precious");
    assert_eq!((lab.cert_count(), lab.audit_entries()), before);
    lab.ok(&[
        "issue",
        "device",
        "--ca",
        names::MFR_CA,
        "--id",
        "SN-1",
        "--key-out",
        kk,
        "--out",
        o,
        "--force",
    ]);
    assert_eq!(lab.cert_count(), before.0 + 1);

    // A CA whose key file vanished.
    std::fs::remove_file(
        lab.home
            .join("keys")
            .join(format!("{}.key.pem", names::MFR_CA)),
    )
    .unwrap();
    let err = lab.fails(
        2,
        &[
            "issue",
            "device",
            "--ca",
            names::MFR_CA,
            "--id",
            "SN-2",
            "--key-out",
            lab.path("k2").to_str().unwrap(),
            "--out",
            lab.path("o2").to_str().unwrap(),
        ],
    );
    assert!(err.contains("key") && err.contains(names::MFR_CA), "{err}");
}

fn one_live_certificate_per_identity_unless_reissue(backend: Backend) {
    let lab = Lab::with(backend);
    let args = |n: &str| {
        vec![
            "issue".to_owned(),
            "node".into(),
            "--ca".into(),
            names::ENT_CA.into(),
            "--enterprise".into(),
            ENTERPRISE.into(),
            "--id".into(),
            "n-1".into(),
            "--key-out".into(),
            lab.path(&format!("{n}.key")).display().to_string(),
            "--out".into(),
            lab.path(&format!("{n}.pem")).display().to_string(),
        ]
    };
    let a1 = args("a");
    lab.ok(&a1.iter().map(String::as_str).collect::<Vec<_>>());
    let a2 = args("b");
    let err = lab.fails(1, &a2.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(err.contains("already has a live certificate"), "{err}");
    assert!(!lab.path("b.key").exists());
    let mut a3 = args("c");
    a3.push("--reissue".into());
    lab.ok(&a3.iter().map(String::as_str).collect::<Vec<_>>());
    let listed = lab.json(&["certs", "list", "--id", "n-1"]);
    assert_eq!(listed.as_array().unwrap().len(), 2);
    let shown = lab.json(&["certs", "show", "--id", &format!("node:{ENTERPRISE}:n-1")]);
    assert_eq!(shown.as_array().unwrap().len(), 2);
}

#[test]
fn name_constraints_are_enforced_before_signing_and_by_openssl() {
    let lab = Lab::new();
    // An enterprise CA constrained to acme.example URIs (OpenSSL honours URI constraints).
    lab.ok(&[
        "ca",
        "init",
        "uri-ca",
        "--subject",
        "CN=URI CA,O=Acme",
        "--permit-uri-domain",
        "acme.example",
        "--permit-uri-domain",
        ".acme.example",
    ]);
    let err = lab.fails(
        1,
        &[
            "issue",
            "node",
            "--ca",
            "uri-ca",
            "--enterprise",
            "other.example",
            "--id",
            "x",
            "--key-out",
            lab.path("x.key").to_str().unwrap(),
            "--out",
            lab.path("x.pem").to_str().unwrap(),
        ],
    );
    assert!(err.contains("name constraints"), "{err}");
    assert!(!lab.path("x.key").exists());
    // A sub-domain host is inside `.acme.example`, and OpenSSL agrees.
    let ok = lab.path("ok.pem");
    lab.ok(&[
        "issue",
        "node",
        "--ca",
        "uri-ca",
        "--enterprise",
        "plant1.acme.example",
        "--id",
        "x",
        "--key-out",
        lab.path("ok.key").to_str().unwrap(),
        "--out",
        ok.to_str().unwrap(),
    ]);
    std::fs::write(
        lab.path("uri-root.pem"),
        lab.ok(&["ca", "show", "uri-ca", "--pem"]),
    )
    .unwrap();
    let out = openssl_verify(&lab.path("uri-root.pem"), &ok, "sslclient");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The infrastructure CA is constrained to m2m.localhost DNS names.
    let err = lab.fails(
        1,
        &[
            "issue",
            "server",
            "--ca",
            names::INFRA_CA,
            "--fqdn",
            "in.elsewhere.example",
            "--key-out",
            lab.path("s.key").to_str().unwrap(),
            "--out",
            lab.path("s.pem").to_str().unwrap(),
        ],
    );
    assert!(err.contains("name constraints"), "{err}");
}

#[test]
fn ca_policy_path_length_and_lifetime() {
    let lab = Lab::empty();
    lab.ok(&[
        "ca",
        "init",
        "root",
        "--subject",
        "CN=Root,O=X",
        "--path-len",
        "0",
        "--validity",
        "5y",
    ]);
    let err = lab.fails(
        1,
        &[
            "ca",
            "init",
            "sub",
            "--parent",
            "root",
            "--subject",
            "CN=Sub",
        ],
    );
    assert!(err.contains("path length 0"), "{err}");
    lab.ok(&[
        "ca",
        "init",
        "root2",
        "--subject",
        "CN=Root2",
        "--path-len",
        "1",
        "--validity",
        "5y",
    ]);
    let err = lab.fails(
        1,
        &[
            "ca",
            "init",
            "sub2",
            "--parent",
            "root2",
            "--subject",
            "CN=Sub2",
            "--validity",
            "10y",
        ],
    );
    assert!(err.contains("outlive"), "{err}");
    let err = lab.fails(2, &["ca", "init", "root2", "--subject", "CN=Again"]);
    assert!(err.contains("exists"), "{err}");
    let err = lab.fails(
        1,
        &[
            "ca",
            "init",
            "m",
            "--subject",
            "CN=No Org",
            "--hw-type",
            "1.3.6.1.4.1.99999.1",
        ],
    );
    assert!(err.contains("O="), "{err}");
    let list = lab.json(&["ca", "list"]);
    assert_eq!(list.as_array().unwrap().len(), 2);
    let show = lab.json(&["ca", "show", "root2"]);
    assert_eq!(show["kind"], "root");
    assert_eq!(show["path_len"], 1);
}

#[test]
fn encrypted_ca_keys_need_their_passphrase() {
    let lab = Lab::empty();
    let pass = lab.path("pass");
    std::fs::write(&pass, "correct horse battery staple\n").unwrap();
    let p = pass.to_str().unwrap();
    lab.ok(&[
        "--key-pass-file",
        p,
        "ca",
        "init",
        "enc",
        "--subject",
        "CN=Enc,O=Maker",
        "--hw-type",
        "1.3.6.1.4.1.99999.1",
    ]);
    let key = lab.home.join("keys/enc.key.pem");
    let text = std::fs::read_to_string(&key).unwrap();
    assert!(text.contains("ENCRYPTED PRIVATE KEY"));
    assert!(!text.contains("correct horse"));
    // OpenSSL decrypts it with the same passphrase.
    let out = tool("openssl")
        .args(["pkey", "-noout", "-passin"])
        .arg(format!("file:{p}"))
        .arg("-in")
        .arg(&key)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let issue = |extra: &[&str], n: &str| {
        let mut a: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        a.extend(
            ["issue", "device", "--ca", "enc", "--id", n, "--key-out"]
                .iter()
                .map(|s| s.to_string()),
        );
        a.push(lab.path(&format!("{n}.key")).display().to_string());
        a.push("--out".into());
        a.push(lab.path(&format!("{n}.pem")).display().to_string());
        a
    };
    let a = issue(&[], "d1");
    let err = lab.fails(2, &a.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(err.contains("encrypted"), "{err}");
    let wrong = lab.path("wrong");
    std::fs::write(&wrong, "nope\n").unwrap();
    let a = issue(&["--key-pass-file", wrong.to_str().unwrap()], "d1");
    let err = lab.fails(2, &a.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(err.contains("wrong passphrase"), "{err}");
    assert!(!err.contains("nope"));
    let a = issue(&["--key-pass-file", p], "d1");
    lab.ok(&a.iter().map(String::as_str).collect::<Vec<_>>());
}

#[test]
fn audit_log_detects_tampering() {
    let lab = Lab::new();
    lab.ok(&[
        "issue",
        "device",
        "--ca",
        names::MFR_CA,
        "--id",
        "A1",
        "--key-out",
        lab.path("a.key").to_str().unwrap(),
        "--out",
        lab.path("a.pem").to_str().unwrap(),
    ]);
    let n = lab.audit_entries();
    assert_eq!(n, 7, "6 CAs and one certificate");
    let store = m2mpki_ca::RedbStore::open(&lab.home.join("store.redb")).unwrap();
    store
        .tamper_audit_entry(4, |e| e.event.subject = "forged".into())
        .unwrap();
    drop(store);
    let err = lab.fails(1, &["audit", "verify"]);
    assert!(err.contains("entry 4"), "{err}");
}

#[test]
fn listing_formats() {
    let lab = Lab::new();
    lab.ok(&[
        "issue",
        "device",
        "--ca",
        names::MFR_CA,
        "--id",
        "L1",
        "--key-out",
        lab.path("a.key").to_str().unwrap(),
        "--out",
        lab.path("a.pem").to_str().unwrap(),
    ]);
    let csv = lab.ok(&["certs", "list", "--csv"]);
    let mut lines = csv.lines();
    assert!(lines.next().unwrap().starts_with("serial,ca,profile"));
    let row = lines.next().unwrap();
    assert!(row.contains(&format!("device:{HW_TYPE}:L1")), "{row}");
    let v = lab.json(&["certs", "list", "--ca", names::MFR_CA]);
    let serial = v[0]["serial"].as_str().unwrap().to_owned();
    let shown = lab.json(&["certs", "show", &serial]);
    assert_eq!(shown["serial"], serial);
    let pem = lab.ok(&["certs", "show", &serial, "--pem"]);
    assert_eq!(
        ::pem::parse(&pem).unwrap().into_contents(),
        first_der(&lab.path("a.pem"))
    );
    lab.fails(2, &["certs", "show", "00ff"]);
    lab.fails(2, &["certs", "list", "--ca", "nope"]);
    // A reader that stops early is not an error.
    let mut child = lab
        .cmd()
        .args(["certs", "list"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let status = child.wait().unwrap();
    assert!(status.success() || status.code() == Some(0));
}

/// A sub-CA with the default lifetime, made after its root (also with the default), ends with
/// its root and says so; an explicit lifetime that outlives the root is still refused. The
/// store is private to its owner.
#[test]
fn default_ca_lifetime_is_cut_to_the_parent_and_the_store_is_0600() {
    use std::os::unix::fs::PermissionsExt;
    let lab = Lab::empty();
    lab.ok(&[
        "ca",
        "init",
        "root",
        "--subject",
        "CN=Root,O=X",
        "--path-len",
        "1",
    ]);
    std::thread::sleep(std::time::Duration::from_millis(2100));
    let out = lab.run(&[
        "ca",
        "init",
        "sub",
        "--parent",
        "root",
        "--subject",
        "CN=Sub,O=X",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("ends with its parent"), "{err}");
    let (root, sub) = (
        lab.json(&["ca", "show", "root"]),
        lab.json(&["ca", "show", "sub"]),
    );
    assert_eq!(sub["not_after"], root["not_after"]);
    assert_ne!(sub["not_before"], root["not_before"]);
    let v = lab.json(&[
        "ca",
        "init",
        "sub2",
        "--parent",
        "root",
        "--subject",
        "CN=Sub2,O=X",
    ]);
    assert_eq!(v["lifetime_cut_to_parent"], true);
    assert_eq!(v["not_after"], root["not_after"]);
    let err = lab.fails(
        1,
        &[
            "ca",
            "init",
            "sub3",
            "--parent",
            "root",
            "--subject",
            "CN=Sub3,O=X",
            "--validity",
            "20y",
        ],
    );
    assert!(err.contains("outlive"), "{err}");
    // OpenSSL accepts the chain.
    let chain = lab.path("sub.pem");
    std::fs::write(&chain, lab.ok(&["ca", "show", "sub", "--pem"])).unwrap();
    let out = tool("openssl")
        .args(["verify", "-x509_strict", "-CAfile"])
        .arg(lab.root_pem("root"))
        .arg(&chain)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mode = std::fs::metadata(lab.home.join("store.redb"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
}

/// Every issue names who asked: the operator's account for a single issue, the account and
/// the input file for a batch. Both the certificate's record (`certs show`) and its
/// `cert.issue` audit entry say so.
#[test]
fn who_asked_is_recorded_with_the_certificate_and_in_the_audit_log() {
    let lab = Lab::new();
    let issue = |user: &str, args: &[&str]| {
        let out = lab.cmd().env("USER", user).args(args).output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let (key, pem) = (lab.path("w.key"), lab.path("w.pem"));
    issue(
        "alice",
        &[
            "issue",
            "device",
            "--ca",
            names::MFR_CA,
            "--id",
            "W1",
            "--key-out",
            key.to_str().unwrap(),
            "--out",
            pem.to_str().unwrap(),
        ],
    );
    let ids = lab.path("lot-9.txt");
    std::fs::write(&ids, "W2\nW3\n").unwrap();
    issue(
        "line3",
        &[
            "issue",
            "batch",
            "--ca",
            names::MFR_CA,
            "--profile",
            "device",
            "--ids",
            ids.to_str().unwrap(),
            "--out-dir",
            lab.path("out").to_str().unwrap(),
        ],
    );
    let alice = serde_json::json!({"via": "operator", "account": "alice"});
    let line3 =
        serde_json::json!({"via": "batch", "account": "line3", "input": ids.to_str().unwrap()});
    let expected = [("W1", &alice), ("W2", &line3), ("W3", &line3)];
    let store = m2mpki_ca::RedbStore::open(&lab.home.join("store.redb")).unwrap();
    let mut logged = std::collections::HashMap::new();
    m2mpki_ca::Store::audit_log(&store, &mut |e| {
        if e.event.action == m2mpki_ca::audit::AuditAction::CertIssue {
            logged.insert(
                e.event.subject.clone(),
                e.event.detail["requested_by"].clone(),
            );
        }
        Ok(())
    })
    .unwrap();
    drop(store);
    for (id, who) in expected {
        let listed = lab.json(&["certs", "list", "--id", id]);
        let shown = &listed.as_array().unwrap()[0];
        assert_eq!(&shown["requested_by"], who, "{id}");
        let serial = shown["serial"].as_str().unwrap();
        assert_eq!(logged.get(serial), Some(who), "audit entry of {id}");
    }
    let text = lab.ok(&["certs", "show", "--id", &format!("device:{HW_TYPE}:W1")]);
    assert!(text.contains("requested   operator alice"), "{text}");
}
