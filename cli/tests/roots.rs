//! Root sets, verification and revocation through the binary, cross-checked with OpenSSL and
//! pkilint.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests may fail loudly

mod common;

use std::path::{Path, PathBuf};

use common::*;
use m2mpki_test_pki::{names, ENTERPRISE, HW_TYPE, IN_FQDN};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, GeneralSubtree, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, NameConstraints,
};

/// A lab with the three kinds of set, each holding its lab root.
fn lab_with_sets() -> Lab {
    let lab = Lab::new();
    lab.ok(&[
        "roots",
        "create",
        "metering",
        "--kind",
        "device",
        "--vertical",
        "smart-metering",
    ]);
    lab.ok(&[
        "roots",
        "create",
        "acme",
        "--kind",
        "node",
        "--enterprise",
        ENTERPRISE,
    ]);
    lab.ok(&["roots", "create", "in", "--kind", "infrastructure"]);
    lab.ok(&["roots", "add-ca", "metering", names::MFR_CA]);
    lab.ok(&["roots", "add-ca", "acme", names::ENT_CA]);
    lab.ok(&["roots", "add-ca", "in", names::INFRA_CA]);
    // The sets require a revocation status (the default): a current CRL of every CA.
    for (set, cas) in [
        ("metering", [names::MFR_ROOT, names::MFR_CA]),
        ("acme", [names::ENT_ROOT, names::ENT_CA]),
        ("in", [names::INFRA_ROOT, names::INFRA_CA]),
    ] {
        for ca in cas {
            attach_crl(&lab, set, ca);
        }
    }
    lab
}

/// Issues a CRL of `ca` (next update in ten years, so `--at` in the 2030s still finds it
/// current) and attaches it to `set`.
fn attach_crl(lab: &Lab, set: &str, ca: &str) -> PathBuf {
    let crl = lab.path(&format!("{ca}-{}.crl", rand_u64()));
    let c = crl.display().to_string();
    lab.ok(&["crl", "--ca", ca, "--out", &c, "--next-update", "3650d"]);
    lab.ok(&["roots", "add-crl", set, &c]);
    crl
}

fn issue(lab: &Lab, kind: &str, extra: &[&str], name: &str) -> PathBuf {
    let out = lab.path(&format!("{name}.pem"));
    let key = lab.path(&format!("{name}.key"));
    let ca = match kind {
        "device" => names::MFR_CA,
        "node" => names::ENT_CA,
        _ => names::INFRA_CA,
    };
    let mut args = vec!["issue", kind, "--ca", ca];
    args.extend_from_slice(extra);
    let (k, o) = (key.display().to_string(), out.display().to_string());
    args.extend(["--key-out", &k, "--out", &o]);
    lab.ok(&args);
    out
}

/// `roots verify` must refuse with exit 1 and a reason containing `needle`; with --json the
/// reason code is `code`.
fn refused(lab: &Lab, set: &str, chain: &Path, extra: &[&str], code: &str, needle: &str) {
    let c = chain.display().to_string();
    let mut args = vec!["roots", "verify", set, &c];
    args.extend_from_slice(extra);
    let err = lab.fails(1, &args);
    assert!(err.contains(needle), "{args:?}: {err}");
    let mut json = vec!["--json"];
    json.extend_from_slice(&args);
    let out = lab.run(&json);
    assert_eq!(out.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["valid"], false);
    assert_eq!(v["code"], code, "{args:?}");
}

#[test]
fn valid_chains_verify_and_print_the_identity() {
    let lab = lab_with_sets();
    let dev = issue(&lab, "device", &["--id", "SN-1"], "dev");
    let out = lab.ok(&["roots", "verify", "metering", dev.to_str().unwrap()]);
    assert!(out.contains(&format!("device:{HW_TYPE}:SN-1")), "{out}");
    let node = issue(
        &lab,
        "node",
        &["--enterprise", "plant.acme.example", "--id", "N-1"],
        "node",
    );
    let v = lab.json(&["roots", "verify", "acme", node.to_str().unwrap()]);
    assert_eq!(v["result"]["identity"], "node:plant.acme.example:N-1");
    let srv = issue(&lab, "server", &["--fqdn", IN_FQDN], "srv");
    lab.ok(&[
        "roots",
        "verify",
        "in",
        srv.to_str().unwrap(),
        "--name",
        IN_FQDN,
    ]);
}

#[test]
fn each_refusal_has_its_own_reason() {
    let lab = lab_with_sets();
    let dev = issue(&lab, "device", &["--id", "SN-1"], "dev");
    let node = issue(
        &lab,
        "node",
        &["--enterprise", ENTERPRISE, "--id", "N-1"],
        "node",
    );
    let srv = issue(&lab, "server", &["--fqdn", IN_FQDN], "srv");

    // A root outside the set.
    refused(
        &lab,
        "metering",
        &node,
        &[],
        "unknown_root",
        "does not lead to a root",
    );
    // Expired and not yet valid leaves.
    let old = issue(
        &lab,
        "device",
        &[
            "--id",
            "OLD",
            "--not-before",
            "2024-01-01T00:00:00Z",
            "--validity",
            "30d",
            "--reissue",
        ],
        "old",
    );
    refused(&lab, "metering", &old, &[], "expired", "expired");
    let soon = issue(
        &lab,
        "device",
        &[
            "--id",
            "SOON",
            "--not-before",
            "2030-01-01T00:00:00Z",
            "--validity",
            "30d",
        ],
        "soon",
    );
    refused(
        &lab,
        "metering",
        &soon,
        &[],
        "not_yet_valid",
        "not valid before",
    );
    // ... and the future one is fine at a time it is valid.
    lab.ok(&[
        "roots",
        "verify",
        "metering",
        soon.to_str().unwrap(),
        "--at",
        "2030-01-15T00:00:00Z",
    ]);
    // Wrong EKU for the purpose.
    refused(
        &lab,
        "in",
        &srv,
        &["--purpose", "client"],
        "wrong_purpose",
        "extended key usage",
    );
    refused(
        &lab,
        "metering",
        &dev,
        &["--purpose", "server"],
        "wrong_purpose",
        "extended key usage",
    );
    // A server certificate for another name.
    refused(
        &lab,
        "in",
        &srv,
        &["--name", "other.m2m.localhost"],
        "name_mismatch",
        "not valid for",
    );
    // A CA certificate presented as the leaf.
    let ca_chain = lab.path("ca-chain.pem");
    std::fs::write(&ca_chain, lab.ok(&["ca", "show", names::MFR_CA, "--pem"])).unwrap();
    refused(
        &lab,
        "metering",
        &ca_chain,
        &[],
        "ca_as_leaf",
        "CA certificate",
    );
    // A node of another enterprise, admitted by the roots but not by the set's enterprise.
    lab.ok(&[
        "roots",
        "create",
        "other-ent",
        "--kind",
        "node",
        "--enterprise",
        "other.example",
    ]);
    lab.ok(&["roots", "add-ca", "other-ent", names::ENT_CA]);
    refused(
        &lab,
        "other-ent",
        &node,
        &[],
        "identity_outside_set",
        "other.example",
    );
    // A device certificate is no node.
    lab.ok(&["roots", "add-ca", "acme", names::MFR_CA]);
    refused(
        &lab,
        "acme",
        &dev,
        &[],
        "identity_outside_set",
        "not a node identity",
    );
}

#[test]
fn revocation_crls_agree_with_openssl_and_lint_clean() {
    let lab = lab_with_sets();
    let good = issue(&lab, "device", &["--id", "GOOD"], "good");
    let bad = issue(&lab, "device", &["--id", "BAD"], "bad");
    let serial = lab.json(&["certs", "list", "--id", "BAD"])[0]["serial"]
        .as_str()
        .unwrap()
        .to_owned();
    let v = lab.json(&[
        "revoke",
        &serial,
        "--ca",
        names::MFR_CA,
        "--reason",
        "key-compromise",
    ]);
    assert_eq!(v["status"], "revoked");
    // Revoking twice, or through the wrong CA, is refused.
    lab.fails(1, &["revoke", &serial, "--ca", names::MFR_CA]);
    lab.fails(2, &["revoke", &serial, "--ca", names::ENT_CA]);
    lab.fails(
        2,
        &[
            "revoke",
            &serial,
            "--ca",
            names::MFR_CA,
            "--reason",
            "certificateHold",
        ],
    );
    // The ID lost its live certificate: it may be issued again without --reissue.
    issue(&lab, "device", &["--id", "BAD"], "bad2");

    let crl = lab.path("mfr.crl");
    let c1 = lab.json(&["crl", "--ca", names::MFR_CA, "--out", crl.to_str().unwrap()]);
    assert_eq!(c1["entries"], 1);
    let c2 = lab.json(&[
        "crl",
        "--ca",
        names::MFR_CA,
        "--out",
        crl.to_str().unwrap(),
        "--force",
    ]);
    assert!(
        c2["number"].as_u64() > c1["number"].as_u64(),
        "CRL numbers grow"
    );
    lab.ok(&["roots", "add-crl", "metering", crl.to_str().unwrap()]);
    refused(&lab, "metering", &bad, &[], "revoked", "revoked");
    lab.ok(&["roots", "verify", "metering", good.to_str().unwrap()]);
    // An older CRL cannot replace a newer one.
    let c3 = lab.json(&[
        "crl",
        "--ca",
        names::MFR_CA,
        "--out",
        lab.path("c3.crl").to_str().unwrap(),
    ]);
    assert!(c3["number"].as_u64() > c2["number"].as_u64());
    lab.ok(&[
        "roots",
        "add-crl",
        "metering",
        lab.path("c3.crl").to_str().unwrap(),
    ]);
    lab.fails(1, &["roots", "add-crl", "metering", crl.to_str().unwrap()]);

    // OpenSSL agrees: the CRL's signature, and the revocation status of both certificates.
    let issuer = lab.path("mfr-ca.pem");
    let chain = lab.ok(&["ca", "show", names::MFR_CA, "--pem"]);
    let first = pem::parse_many(chain.as_bytes()).unwrap();
    std::fs::write(&issuer, pem::encode(&first[0])).unwrap();
    let out = tool("openssl")
        .args(["crl", "-noout", "-in"])
        .arg(&crl)
        .arg("-CAfile")
        .arg(&issuer)
        .arg("-verify")
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && text.contains("verify OK"), "{text}");
    let root = lab.root_pem(names::MFR_CA);
    let crl_file = lab.path("crl-chain.pem");
    let root_crl = lab.path("root.crl");
    lab.ok(&[
        "crl",
        "--ca",
        names::MFR_ROOT,
        "--out",
        root_crl.to_str().unwrap(),
    ]);
    std::fs::write(
        &crl_file,
        [
            std::fs::read(&crl).unwrap(),
            std::fs::read(&root_crl).unwrap(),
        ]
        .concat(),
    )
    .unwrap();
    let check = |leaf: &Path| {
        tool("openssl")
            .args(["verify", "-crl_check_all", "-CAfile"])
            .arg(&root)
            .arg("-untrusted")
            .arg(leaf)
            .arg("-CRLfile")
            .arg(&crl_file)
            .arg(leaf)
            .output()
            .unwrap()
    };
    assert!(check(&good).status.success());
    let out = check(&bad);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("revoked")
            || String::from_utf8_lossy(&out.stderr).contains("revoked")
    );

    // pkilint: no finding at WARNING on the CRL (it needs DER).
    let der = lab.path("mfr.crl.der");
    lab.ok(&[
        "crl",
        "--ca",
        names::MFR_CA,
        "--out",
        der.to_str().unwrap(),
        "--der",
    ]);
    let out = tool("lint_crl")
        .args(["lint", "-t", "CRL", "-p", "PKIX", "-s", "WARNING"])
        .arg(&der)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && !text.contains("(WARNING)") && !text.contains("(ERROR)"),
        "lint_crl: {text}"
    );
}

/// A certificate made here with rcgen, outside m2mpki's policies.
struct Made {
    pem: String,
    key: KeyPair,
    params: CertificateParams,
}

fn make(
    cn: &str,
    ca: Option<Option<u8>>,
    issuer: Option<&Made>,
    edit: impl FnOnce(&mut CertificateParams),
) -> Made {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut p = CertificateParams::default();
    p.distinguished_name = rcgen::DistinguishedName::new();
    p.distinguished_name.push(DnType::CommonName, cn);
    p.serial_number = Some(rcgen::SerialNumber::from(rand_u64()));
    p.not_before = rcgen::date_time_ymd(2024, 1, 1);
    p.not_after = rcgen::date_time_ymd(2040, 1, 1);
    match ca {
        Some(pl) => {
            p.is_ca = IsCa::Ca(pl.map_or(
                BasicConstraints::Unconstrained,
                BasicConstraints::Constrained,
            ));
            p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        }
        None => {
            p.is_ca = IsCa::ExplicitNoCa;
            p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
            p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        }
    }
    p.use_authority_key_identifier_extension = issuer.is_some();
    edit(&mut p);
    let pem = match issuer {
        None => p.self_signed(&key).unwrap().pem(),
        Some(i) => {
            let iss = Issuer::from_params(&i.params, &i.key);
            p.signed_by(&key, &iss).unwrap().pem()
        }
    };
    Made {
        pem,
        key,
        params: p,
    }
}

fn rand_u64() -> u64 {
    use std::time::{SystemTime, UNIX_EPOCH};
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        ^ N.fetch_add(1, std::sync::atomic::Ordering::Relaxed) << 48
}

fn write(lab: &Lab, name: &str, parts: &[&Made]) -> PathBuf {
    let p = lab.path(name);
    std::fs::write(&p, parts.iter().map(|m| m.pem.clone()).collect::<String>()).unwrap();
    p
}

#[test]
fn chains_made_elsewhere_expired_intermediates_constraints_and_path_length() {
    let lab = Lab::empty();
    // These chains have no CRLs: the set accepts an unknown status until the end of the test.
    lab.ok(&[
        "roots",
        "create",
        "ext",
        "--kind",
        "infrastructure",
        "--revocation",
        "best-effort",
    ]);

    // An expired intermediate below a valid root, with a leaf that is still valid.
    let root = make("Ext Root", Some(None), None, |_| {});
    let int = make("Ext Expired Int", Some(Some(0)), Some(&root), |p| {
        p.not_after = rcgen::date_time_ymd(2025, 1, 1)
    });
    let leaf = make("in.ext.example", None, Some(&int), |p| {
        p.subject_alt_names = vec![rcgen::SanType::DnsName(
            "in.ext.example".try_into().unwrap(),
        )];
    });
    lab.ok(&[
        "roots",
        "add",
        "ext",
        write(&lab, "root.pem", &[&root]).to_str().unwrap(),
    ]);
    let chain = write(&lab, "expired-int.pem", &[&leaf, &int]);
    refused(
        &lab,
        "ext",
        &chain,
        &[],
        "intermediate_expired",
        "intermediate CA certificate of the chain expired",
    );

    // Name constraints: a root permitting good.example signs a leaf for evil.example.
    let nc_root = make("NC Root", Some(None), None, |p| {
        p.name_constraints = Some(NameConstraints {
            permitted_subtrees: vec![GeneralSubtree::DnsName("good.example".into())],
            excluded_subtrees: vec![],
        });
    });
    let evil = make("evil.example", None, Some(&nc_root), |p| {
        p.subject_alt_names = vec![rcgen::SanType::DnsName("evil.example".try_into().unwrap())];
    });
    lab.ok(&[
        "roots",
        "add",
        "ext",
        write(&lab, "nc-root.pem", &[&nc_root]).to_str().unwrap(),
    ]);
    refused(
        &lab,
        "ext",
        &write(&lab, "evil.pem", &[&evil]),
        &[],
        "name_constraints",
        "name constraints",
    );

    // Path length: an intermediate with pathLen 0 signs another intermediate, which signs the
    // leaf (a trust anchor's own pathLen is not part of path validation, RFC 5280 §6.1).
    let pl_root = make("PL Root", Some(None), None, |_| {});
    let pl_int = make("PL Int", Some(Some(0)), Some(&pl_root), |_| {});
    let pl_int2 = make("PL Int 2", Some(Some(0)), Some(&pl_int), |_| {});
    let pl_leaf = make("in.pl.example", None, Some(&pl_int2), |p| {
        p.subject_alt_names = vec![rcgen::SanType::DnsName("in.pl.example".try_into().unwrap())];
    });
    lab.ok(&[
        "roots",
        "add",
        "ext",
        write(&lab, "pl-root.pem", &[&pl_root]).to_str().unwrap(),
    ]);
    refused(
        &lab,
        "ext",
        &write(&lab, "pl.pem", &[&pl_leaf, &pl_int2, &pl_int]),
        &[],
        "path_too_long",
        "path length",
    );

    // A chain made by the openssl CLI verifies.
    let d = lab.dir.path();
    let run = |args: &[&str]| {
        let out = tool("openssl").current_dir(d).args(args).output().unwrap();
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    // A root made by `openssl req -x509` (`name.key`, `name.pem`), named CN=OpenSSL Root.
    let openssl_root = |name: &str| {
        let (key, pem) = (format!("{name}.key"), format!("{name}.pem"));
        run(&[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            &key,
            "-out",
            &pem,
            "-days",
            "3650",
            "-subj",
            "/CN=OpenSSL Root",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ]);
    };
    openssl_root("o-root");
    run(&[
        "req",
        "-new",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-keyout",
        "o-leaf.key",
        "-out",
        "o-leaf.csr",
        "-subj",
        "/CN=in.openssl.example",
    ]);
    std::fs::write(d.join("ext.cnf"), "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\nsubjectAltName=DNS:in.openssl.example\n").unwrap();
    run(&[
        "x509",
        "-req",
        "-in",
        "o-leaf.csr",
        "-CA",
        "o-root.pem",
        "-CAkey",
        "o-root.key",
        "-CAcreateserial",
        "-days",
        "30",
        "-extfile",
        "ext.cnf",
        "-out",
        "o-leaf.pem",
    ]);
    lab.ok(&[
        "roots",
        "add",
        "ext",
        d.join("o-root.pem").to_str().unwrap(),
    ]);
    let verify_args = [
        "roots",
        "verify",
        "ext",
        d.join("o-leaf.pem").to_str().unwrap(),
        "--name",
        "in.openssl.example",
    ]
    .map(str::to_owned);
    let verify_args: Vec<&str> = verify_args.iter().map(String::as_str).collect();
    lab.ok(&verify_args);
    let listed = lab.json(&["roots", "list"]);
    assert_eq!(listed[0]["revocation"]["mode"], "best-effort", "{listed}");

    // Switched to `require`, the same chain has no status: refused.
    lab.ok(&["roots", "set", "ext", "--revocation", "require"]);
    assert!(lab.ok(&["roots", "list"]).contains("require"));
    let leaf = d.join("o-leaf.pem");
    refused(
        &lab,
        "ext",
        &leaf,
        &["--name", "in.openssl.example"],
        "revocation_unknown",
        "no CRL of the set",
    );

    // CRLs made by `openssl ca`: by an impostor with the root's name, by the root itself.
    std::fs::write(d.join("index.txt"), "").unwrap();
    std::fs::write(d.join("crlnumber"), "1000\n").unwrap(); // hex
    std::fs::write(
        d.join("ca.cnf"),
        "[ca]\ndefault_ca = d\n[d]\ndatabase = index.txt\ncrlnumber = crlnumber\ndefault_md = sha256\ndefault_crl_days = 30\n",
    )
    .unwrap();
    openssl_root("fake-root");
    run(&[
        "ca",
        "-gencrl",
        "-config",
        "ca.cnf",
        "-keyfile",
        "fake-root.key",
        "-cert",
        "fake-root.pem",
        "-out",
        "forged.crl",
    ]);
    std::fs::write(d.join("crlnumber"), "01\n").unwrap();
    run(&[
        "ca",
        "-gencrl",
        "-config",
        "ca.cnf",
        "-keyfile",
        "o-root.key",
        "-cert",
        "o-root.pem",
        "-out",
        "genuine.crl",
    ]);
    // The forgery (number 0x1000, signed by another key) is refused and attaches nothing ...
    let err = lab.fails(
        1,
        &[
            "roots",
            "add-crl",
            "ext",
            d.join("forged.crl").to_str().unwrap(),
        ],
    );
    assert!(err.contains("does not verify"), "{err}");
    // ... as is a CRL of an issuer the set does not trust ...
    std::fs::write(d.join("crlnumber"), "01\n").unwrap();
    let err = lab.fails(
        1,
        &[
            "roots",
            "add-crl",
            "ext",
            d.join("forged.crl").to_str().unwrap(),
            "--issuer-cert",
            d.join("fake-root.pem").to_str().unwrap(),
        ],
    );
    assert!(
        err.contains("does not verify") || err.contains("trusts no"),
        "{err}"
    );
    // ... and every copy of the genuine CRL with one bit flipped (none verifies; the octet
    // that counts unused bits of the signature once passed: x509-parser ignores it).
    let genuine = std::fs::read(d.join("genuine.crl")).unwrap();
    let der = pem::parse(&genuine).unwrap().contents().to_vec();
    for i in 0..der.len() {
        let mut flipped = der.clone();
        flipped[i] ^= 0x04;
        let p = d.join("flipped.crl");
        std::fs::write(&p, &flipped).unwrap();
        let out = lab.run(&["roots", "add-crl", "ext", p.to_str().unwrap()]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            matches!(out.status.code(), Some(1 | 2)),
            "bit {i}: {:?} {err}",
            out.status
        );
        assert!(!err.contains("panicked"), "{err}");
    }
    assert_eq!(
        lab.json(&["roots", "list", "ext"])["crls"]
            .as_array()
            .unwrap()
            .len(),
        0
    );
    // The genuine CRL attaches (its number 1 is not blocked by the forgery's) and applies.
    lab.ok(&[
        "roots",
        "add-crl",
        "ext",
        d.join("genuine.crl").to_str().unwrap(),
    ]);
    lab.ok(&verify_args);
    // Detached again, the status is unknown again.
    let fp = lab.json(&["roots", "list", "ext"])["crls"][0]["sha256"]
        .as_str()
        .unwrap()
        .to_owned();
    lab.ok(&["roots", "remove-crl", "ext", &fp]);
    lab.fails(1, &verify_args);
}

#[test]
fn managing_sets() {
    let lab = Lab::new();
    lab.ok(&[
        "roots",
        "create",
        "m",
        "--kind",
        "device",
        "--vertical",
        "metering",
    ]);
    lab.fails(2, &["roots", "create", "m", "--kind", "infrastructure"]);
    lab.fails(2, &["roots", "create", "n", "--kind", "node"]);
    lab.fails(
        2,
        &["roots", "create", "bad name", "--kind", "infrastructure"],
    );
    let chain = lab.path("chain.pem");
    std::fs::write(&chain, lab.ok(&["ca", "show", names::MFR_CA, "--pem"])).unwrap();
    // A bundle of the issuing CA and its root: both are CA certificates; the issuing CA is
    // not self-signed and is accepted with a warning.
    let out = lab.run(&["roots", "add", "m", chain.to_str().unwrap()]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not self-signed"));
    // Adding again reports duplicates and adds nothing.
    let v = lab.json(&["roots", "add", "m", chain.to_str().unwrap()]);
    assert_eq!(v["added"].as_array().unwrap().len(), 0);
    assert_eq!(v["duplicates"].as_array().unwrap().len(), 2);
    // A leaf is no root, and garbage is garbage: nothing added, the file named.
    let leaf = lab.path("leaf.pem");
    lab.ok(&[
        "issue",
        "device",
        "--ca",
        names::MFR_CA,
        "--id",
        "L",
        "--key-out",
        lab.path("l.key").to_str().unwrap(),
        "--out",
        leaf.to_str().unwrap(),
    ]);
    let err = lab.fails(2, &["roots", "add", "m", leaf.to_str().unwrap()]);
    assert!(
        err.contains("leaf.pem") && err.contains("not a CA certificate"),
        "{err}"
    );
    let junk = lab.path("junk.pem");
    std::fs::write(
        &junk,
        "-----BEGIN CERTIFICATE-----\nnope\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    let err = lab.fails(2, &["roots", "add", "m", junk.to_str().unwrap()]);
    assert!(err.contains("junk.pem"), "{err}");
    lab.fails(2, &["roots", "add", "nope", chain.to_str().unwrap()]);
    let listed = lab.json(&["roots", "list", "m"]);
    let anchors = listed["anchors"].as_array().unwrap();
    assert_eq!(anchors.len(), 2);
    let fp = anchors[0]["sha256"].as_str().unwrap().to_owned();
    assert_eq!(anchors[0]["key_type"], "p256");
    // Export, remove, and the audit log saw every change.
    let out = lab.path("m.pem");
    lab.ok(&["roots", "export", "m", "--out", out.to_str().unwrap()]);
    assert_eq!(
        pem::parse_many(std::fs::read(&out).unwrap()).unwrap().len(),
        2
    );
    let colon_fp: String = fp
        .as_bytes()
        .chunks(2)
        .map(|c| std::str::from_utf8(c).unwrap())
        .collect::<Vec<_>>()
        .join(":");
    lab.ok(&["roots", "remove", "m", &colon_fp]);
    lab.fails(2, &["roots", "remove", "m", &fp]);
    assert_eq!(
        lab.json(&["roots", "list", "m"])["anchors"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    let sets = lab.json(&["roots", "list"]);
    assert_eq!(sets[0]["set"], "m");
    lab.ok(&["audit", "verify"]);
    // 6 CAs, 1 certificate, create, add, add (duplicates only), remove.
    assert_eq!(lab.audit_entries(), 6 + 1 + 4);
}

/// CRLs are consulted for every certificate below the root (a revoked issuing CA refuses its
/// leaves), and a set holding CRLs from both levels still admits good chains, repeatedly (the
/// prepared CRLs are cached by digest, so the second verification takes the cached path).
#[test]
fn a_revoked_issuing_ca_refuses_its_leaves() {
    let lab = lab_with_sets();
    // A set anchored at the manufacturer's root, so the issuing CA is an intermediate of the
    // path (a CA added with add-ca is itself an anchor, and anchors are not revocation-checked).
    lab.ok(&[
        "roots",
        "create",
        "by-root",
        "--kind",
        "device",
        "--vertical",
        "smart-metering",
    ]);
    let root_pem = lab.root_pem(names::MFR_CA);
    lab.ok(&["roots", "add", "by-root", root_pem.to_str().unwrap()]);
    let good = issue(&lab, "device", &["--id", "LEAF-1"], "leaf1");
    // The mfr root's CRL, empty, and the mfr CA's, empty: the leaf verifies twice.
    let root_crl = lab.path("root0.crl");
    lab.ok(&[
        "crl",
        "--ca",
        names::MFR_ROOT,
        "--out",
        root_crl.to_str().unwrap(),
    ]);
    let ca_crl = lab.path("ca0.crl");
    lab.ok(&[
        "crl",
        "--ca",
        names::MFR_CA,
        "--out",
        ca_crl.to_str().unwrap(),
    ]);
    lab.ok(&["roots", "add-crl", "by-root", root_crl.to_str().unwrap()]);
    lab.ok(&["roots", "add-crl", "by-root", ca_crl.to_str().unwrap()]);
    lab.ok(&["roots", "verify", "by-root", good.to_str().unwrap()]);
    lab.ok(&["roots", "verify", "by-root", good.to_str().unwrap()]);

    // The root revokes the issuing CA (`m2mpki revoke` covers leaves only, so this CRL is
    // made with rcgen and the root's own key): its leaves are refused from then on.
    let ca_serial = lab.json(&["ca", "show", names::MFR_CA])["serial"]
        .as_str()
        .unwrap()
        .to_owned();
    let root_key = std::fs::read_to_string(
        lab.home
            .join("keys")
            .join(format!("{}.key.pem", names::MFR_ROOT)),
    )
    .unwrap();
    let root_key = KeyPair::from_pem(&root_key).unwrap();
    let root_text = std::fs::read_to_string(&root_pem).unwrap();
    let root_der = ::pem::parse(&root_text).unwrap().into_contents();
    let (_, root_cert) = x509_parser::parse_x509_certificate(&root_der).unwrap();
    let root_ski = root_cert
        .extensions()
        .iter()
        .find_map(|e| match e.parsed_extension() {
            x509_parser::extensions::ParsedExtension::SubjectKeyIdentifier(k) => Some(k.0.to_vec()),
            _ => None,
        })
        .unwrap();
    let root = rcgen::Issuer::from_ca_cert_pem(&root_text, root_key).unwrap();
    let now = time::OffsetDateTime::now_utc();
    let crl = rcgen::CertificateRevocationListParams {
        this_update: now - time::Duration::minutes(1),
        next_update: now + time::Duration::days(7),
        crl_number: rcgen::SerialNumber::from(1_000_000_000u64),
        issuing_distribution_point: None,
        revoked_certs: vec![rcgen::RevokedCertParams {
            serial_number: rcgen::SerialNumber::from_slice(&hex::decode(&ca_serial).unwrap()),
            revocation_time: now - time::Duration::minutes(1),
            reason_code: Some(rcgen::RevocationReason::CaCompromise),
            invalidity_date: None,
        }],
        // The root's own key identifier, so the set takes this CRL as the root's newer one.
        key_identifier_method: rcgen::KeyIdMethod::PreSpecified(root_ski),
    }
    .signed_by(&root)
    .unwrap();
    let root_crl = lab.path("root1.crl");
    std::fs::write(&root_crl, crl.pem().unwrap()).unwrap();
    lab.ok(&["roots", "add-crl", "by-root", root_crl.to_str().unwrap()]);
    let sets = lab.json(&["roots", "list"]);
    let by_root = sets
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["set"] == "by-root")
        .unwrap();
    assert_eq!(
        by_root["crls"], 2,
        "the newer root CRL replaced the older one"
    );
    refused(&lab, "by-root", &good, &[], "revoked", "revoked");
}

/// Subjects are printed, never executed: ESC, BEL, CR, NUL and a bidi override in a root's
/// subject come out escaped in text mode and intact in --json.
#[test]
fn control_characters_in_a_subject_do_not_reach_the_terminal() {
    let lab = Lab::new();
    lab.ok(&["roots", "create", "evil", "--kind", "infrastructure"]);
    let evil = "Evil\u{1b}[2J\u{7}Root\r\0CA\u{202e}";
    let root = make("x", Some(None), None, |p| {
        p.distinguished_name = rcgen::DistinguishedName::new();
        p.distinguished_name
            .push(DnType::CommonName, rcgen::DnValue::Utf8String(evil.into()));
    });
    let file = write(&lab, "evil.pem", &[&root]);
    lab.ok(&["roots", "add", "evil", file.to_str().unwrap()]);
    for args in [&["roots", "list", "evil"][..], &["roots", "list"][..]] {
        let out = lab.run(args);
        assert!(out.status.success());
        let bad: Vec<u8> = out
            .stdout
            .iter()
            .copied()
            .filter(|b| b.is_ascii_control() && *b != b'\n')
            .collect();
        assert!(bad.is_empty(), "{args:?}: raw control bytes {bad:?}");
        let text = String::from_utf8(out.stdout).unwrap();
        assert!(!text.contains('\u{202e}'), "{text}");
        if args.len() == 3 {
            assert!(
                text.contains(r"Evil\x1b[2J\x07Root\x0d\x00CA\u{202e}"),
                "{text}"
            );
        }
    }
    let v = lab.json(&["roots", "list", "evil"]);
    assert!(
        v["anchors"][0]["subject"].as_str().unwrap().contains(evil),
        "{v}"
    );
}

/// A file that is not a certificate is bad input (exit 2) for `roots verify`, not a chain that
/// was refused (exit 1).
#[test]
fn malformed_files_given_to_verify_exit_2() {
    let lab = lab_with_sets();
    let good = issue(&lab, "server", &["--fqdn", IN_FQDN], "srv");
    let der = first_der(&good);
    let mut cut = der.clone();
    cut.truncate(der.len() - 10);
    let mut trailing = der.clone();
    trailing.extend_from_slice(b"\x05\x00");
    let mut bad_len = der.clone();
    bad_len[1] ^= 0x01; // the outer length
    for (name, bytes) in [
        ("cut.der", cut),
        ("trailing.der", trailing),
        ("len.der", bad_len),
        (
            "junk.pem",
            b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n".to_vec(),
        ),
    ] {
        let p = lab.path(name);
        std::fs::write(&p, bytes).unwrap();
        let err = lab.fails(2, &["roots", "verify", "in", p.to_str().unwrap()]);
        assert!(err.contains(name), "{name}: {err}");
    }
}

/// Mutations of a DER object: the top bit of every octet flipped (tag class, length form,
/// multi-byte characters), each octet made one larger and one smaller (which edits every length
/// and tag), and truncations.
fn mutations(der: &[u8]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for i in 0..der.len() {
        for edit in [
            |b: u8| b ^ 0x80,
            |b: u8| b.wrapping_add(1),
            |b: u8| b.wrapping_sub(1),
        ] {
            let mut m = der.to_vec();
            m[i] = edit(m[i]);
            out.push(m);
        }
    }
    for cut in (1..der.len()).step_by(der.len() / 20 + 1) {
        out.push(der[..cut].to_vec());
    }
    out
}

/// Whether OpenSSL parses `der` as `kind` (x509, crl or req).
fn openssl_parses(dir: &Path, kind: &str, der: &[u8]) -> bool {
    let p = dir.join(format!("mut.{kind}.der"));
    std::fs::write(&p, der).unwrap();
    tool("openssl")
        .args([kind, "-inform", "DER", "-noout", "-in"])
        .arg(&p)
        .output()
        .unwrap()
        .status
        .success()
}

/// Strict DER: of thousands of mutated anchors, CRLs and CSRs, nothing that OpenSSL refuses to
/// parse is accepted (and nothing panics). (Measured when written: OpenSSL refused 582, 328 and
/// 161 of the certificate, CRL and CSR mutations; m2mpki refused every one of them.)
#[test]
fn mutated_der_that_openssl_refuses_is_refused_too() {
    use m2mpki_ca::rootset::{Anchor, CrlRecord};
    let lab = Lab::new();
    let d = lab.dir.path();
    let root = first_der(&lab.root_pem(names::MFR_ROOT));
    let crl_path = lab.path("mfr.crl");
    lab.ok(&[
        "crl",
        "--ca",
        names::MFR_CA,
        "--out",
        crl_path.to_str().unwrap(),
        "--der",
    ]);
    let crl = std::fs::read(&crl_path).unwrap();
    let out = tool("openssl")
        .current_dir(d)
        .args([
            "req",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            "m.key",
            "-outform",
            "DER",
            "-out",
            "m.csr",
            "-subj",
            "/serialNumber=SN-MUT",
        ])
        .output()
        .unwrap();
    assert!(out.status.success());
    let csr = std::fs::read(d.join("m.csr")).unwrap();
    type Ours = fn(&[u8]) -> bool;
    let cases: [(&str, &[u8], Ours); 3] = [
        ("x509", &root, |m| Anchor::from_der(m, "m").is_ok()),
        ("crl", &crl, |m| CrlRecord::from_der(m, "m").is_ok()),
        ("req", &csr, |m| {
            m2mpki_ca::input::VerifiedCsr::from_bytes(m, "m").is_ok()
        }),
    ];
    let mut accepted = Vec::new();
    for (kind, der, ours) in cases {
        assert!(
            ours(der) && openssl_parses(d, kind, der),
            "{kind}: the original"
        );
        // Only what we accept needs OpenSSL's verdict: it must parse it too.
        let all = mutations(der);
        let ours_accepted: Vec<Vec<u8>> = all.iter().filter(|m| ours(m)).cloned().collect();
        // OpenSSL takes ~45 ms to start: two threads, each with its own file.
        let refused: Vec<String> = std::thread::scope(|scope| {
            let half = ours_accepted.len().div_ceil(2).max(1);
            let workers: Vec<_> = ours_accepted
                .chunks(half)
                .enumerate()
                .map(|(t, part)| {
                    let dir = d.join(format!("t{t}"));
                    std::fs::create_dir_all(&dir).unwrap();
                    scope.spawn(move || {
                        part.iter()
                            .filter(|m| !openssl_parses(&dir, kind, m))
                            .map(|m| format!("{kind}: {}", hex::encode(m)))
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            workers
                .into_iter()
                .flat_map(|w| w.join().unwrap())
                .collect()
        });
        accepted.extend(refused);
        println!(
            "{kind}: {} mutations, m2mpki accepted {} (each checked with OpenSSL)",
            all.len(),
            ours_accepted.len()
        );
        assert!(ours_accepted.len() < all.len());
    }
    assert!(
        accepted.is_empty(),
        "{} mutations OpenSSL refuses were accepted:\n{}",
        accepted.len(),
        accepted.join("\n")
    );
}

/// A bootstrap profile carries the IN set's revocation policy and says until when its CRLs keep
/// a node able to bootstrap; `--revocation` and `--crl-grace` override the set's.
#[test]
fn bootstrap_profiles_carry_the_revocation_policy() {
    let lab = lab_with_sets();
    let out = lab.path("p.toml");
    let p = out.to_str().unwrap();
    let v = lab.json(&[
        "bootstrap",
        "profile",
        "--set",
        "in",
        "--fqdn",
        IN_FQDN,
        "--out",
        p,
    ]);
    assert_eq!(v["revocation"]["mode"], "require", "{v}");
    assert_eq!(v["crls"], 2, "{v}");
    assert!(
        v["crls_current_until"].as_str().unwrap().starts_with("20"),
        "{v}"
    );
    let profile = m2mpki_bootstrap::config::FieldNodeProfile::load(&out).unwrap();
    assert_eq!(
        profile.roots.revocation.mode,
        m2mpki_ca::rootset::RevocationMode::Require
    );
    assert_eq!(profile.roots.crls.len(), 2);
    let v = lab.json(&[
        "bootstrap",
        "profile",
        "--set",
        "in",
        "--fqdn",
        IN_FQDN,
        "--out",
        p,
        "--force",
        "--revocation",
        "best-effort",
        "--crl-grace",
        "2d",
    ]);
    assert_eq!(v["revocation"]["mode"], "best-effort", "{v}");
    assert!(v["crls_current_until"].is_null(), "{v}");
    let profile = m2mpki_bootstrap::config::FieldNodeProfile::load(&out).unwrap();
    assert_eq!(
        profile.roots.revocation,
        m2mpki_ca::rootset::RevocationPolicy {
            mode: m2mpki_ca::rootset::RevocationMode::BestEffort,
            crl_grace: 2 * 86_400
        }
    );
    lab.fails(
        2,
        &[
            "bootstrap",
            "profile",
            "--set",
            "in",
            "--fqdn",
            IN_FQDN,
            "--out",
            p,
            "--force",
            "--crl-grace",
            "soon",
        ],
    );
}

/// `--name` takes an IP address too, matched against iPAddress subjectAltNames.
#[test]
fn verify_names_an_ip_address() {
    let lab = Lab::empty();
    lab.ok(&[
        "roots",
        "create",
        "ip",
        "--kind",
        "infrastructure",
        "--revocation",
        "best-effort",
    ]);
    let root = make("IP Root", Some(None), None, |_| {});
    let leaf = make("in.ip.example", None, Some(&root), |p| {
        p.subject_alt_names = vec![
            rcgen::SanType::IpAddress("192.0.2.7".parse().unwrap()),
            rcgen::SanType::IpAddress("2001:db8::7".parse().unwrap()),
        ];
    });
    lab.ok(&[
        "roots",
        "add",
        "ip",
        write(&lab, "ip-root.pem", &[&root]).to_str().unwrap(),
    ]);
    let chain = write(&lab, "ip-leaf.pem", &[&leaf]);
    let c = chain.to_str().unwrap();
    lab.ok(&["roots", "verify", "ip", c, "--name", "192.0.2.7"]);
    lab.ok(&["roots", "verify", "ip", c, "--name", "2001:db8::7"]);
    refused(
        &lab,
        "ip",
        &chain,
        &["--name", "192.0.2.8"],
        "name_mismatch",
        "192.0.2.8",
    );
    refused(
        &lab,
        "ip",
        &chain,
        &["--name", "in.ip.example"],
        "name_mismatch",
        "in.ip.example",
    );
}

/// The lab enterprise's CAs constrain node URIs to acme.example and its subdomains (TS-0003's
/// name constraints on CA certificates). A node certificate signed with the enterprise CA's key
/// but outside that constraint — which `issue node` would never make — is refused with
/// `name_constraints`, as OpenSSL refuses it; the same forgery inside the constraint verifies.
#[test]
fn a_node_outside_its_enterprise_uri_constraint_is_refused() {
    let lab = lab_with_sets();
    let forge = |uris: &[&str], name: &str| {
        m2mpki_test_pki::forge_node(&lab.home, names::ENT_CA, uris, lab.dir.path(), name)
            .unwrap()
            .0
    };
    let root = lab.root_pem(names::ENT_ROOT);
    let inside = forge(&["onem2m-node://plant.acme.example/FORGED-1"], "inside");
    let v = lab.json(&["roots", "verify", "acme", inside.to_str().unwrap()]);
    assert_eq!(v["result"]["identity"], "node:plant.acme.example:FORGED-1");
    let ossl = openssl_verify(&root, &inside, "sslclient");
    assert!(
        ossl.status.success(),
        "{}",
        String::from_utf8_lossy(&ossl.stdout) + String::from_utf8_lossy(&ossl.stderr)
    );
    // A node identity of the enterprise, plus a URI on a foreign host.
    let outside = forge(
        &[
            "onem2m-node://acme.example/FORGED-2",
            "https://evil.example/",
        ],
        "outside",
    );
    refused(
        &lab,
        "acme",
        &outside,
        &[],
        "name_constraints",
        "the URI `https://evil.example/` is outside every permitted subtree",
    );
    assert!(!openssl_verify(&root, &outside, "sslclient")
        .status
        .success());
    // A URI without a host cannot be matched against a URI constraint: refused (RFC 5280).
    let hostless = forge(
        &["onem2m-node://acme.example/FORGED-3", "urn:uuid:0000"],
        "hostless",
    );
    refused(
        &lab,
        "acme",
        &hostless,
        &[],
        "name_constraints",
        "has no host name",
    );
}
