//! Production-line batches: scale, CSR folders, crashes and reruns.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests may fail loudly

mod common;

use std::collections::HashSet;
use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use m2mpki_ca::{RedbStore, Serial, Store};
use m2mpki_hsm::SoftwareKey;
use m2mpki_test_pki::{names, ENTERPRISE};
use rcgen::PublicKeyData;
use x509_parser::prelude::*;

fn write_ids(path: &Path, prefix: &str, n: usize) {
    let mut s = String::from("# production lot 42\n\n");
    for i in 0..n {
        s.push_str(&format!("{prefix}{i:06}\n"));
    }
    std::fs::write(path, s).unwrap();
}

fn pem_files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            let n = p.file_name().unwrap().to_string_lossy().into_owned();
            n.ends_with(".pem") && !n.ends_with(".key.pem")
        })
        .collect();
    v.sort();
    v
}

/// Runs `m2mpki args` and SIGKILLs it as soon as `ready` says enough is on disk (or after 60 s,
/// or when it ends by itself).
fn kill_when(lab: &Lab, args: &[&str], ready: impl Fn() -> bool) {
    let mut child = lab
        .cmd()
        .args(args)
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while !ready()
        && start.elapsed() < Duration::from_secs(60)
        && child.try_wait().unwrap().is_none()
    {
        std::thread::sleep(Duration::from_millis(2));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
}

/// No temporary file of a killed run is left in `out`.
fn assert_no_temp_files(out: &Path) {
    let stray: Vec<_> = std::fs::read_dir(out)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
        .collect();
    assert!(stray.is_empty(), "{stray:?}");
}

both_backends!(
    ten_thousand_ids_get_ten_thousand_distinct_serials,
    a_batch_killed_midway_and_rerun_ends_with_one_live_certificate_per_id,
    csr_folders_from_openssl,
);

fn ten_thousand_ids_get_ten_thousand_distinct_serials(backend: Backend) {
    let lab = Lab::with(backend);
    let ids = lab.path("ids.txt");
    write_ids(&ids, "SN-", 10_000);
    let out = lab.path("out");
    let report = lab.json(&[
        "issue",
        "batch",
        "--ca",
        names::MFR_CA,
        "--profile",
        "device",
        "--ids",
        ids.to_str().unwrap(),
        "--out-dir",
        out.to_str().unwrap(),
    ]);
    assert_eq!(report["issued"], 10_000);
    assert_eq!(report["total"], 10_000);
    let listed = lab.json(&["certs", "list", "--ca", names::MFR_CA]);
    let listed = listed.as_array().unwrap();
    assert_eq!(listed.len(), 10_000);
    let serials: HashSet<&str> = listed
        .iter()
        .map(|c| c["serial"].as_str().unwrap())
        .collect();
    assert_eq!(serials.len(), 10_000);
    let subjects: HashSet<&str> = listed
        .iter()
        .map(|c| c["subject_key"].as_str().unwrap())
        .collect();
    assert_eq!(subjects.len(), 10_000);
    assert_eq!(pem_files(&out).len(), 10_000);
    // A rerun issues nothing new.
    let again = lab.json(&[
        "issue",
        "batch",
        "--ca",
        names::MFR_CA,
        "--profile",
        "device",
        "--ids",
        ids.to_str().unwrap(),
        "--out-dir",
        out.to_str().unwrap(),
    ]);
    assert_eq!(again["issued"], 0);
    assert_eq!(again["already_issued"], 10_000);
    assert_eq!(lab.cert_count(), 10_000);
    assert_eq!(lab.audit_entries(), 6 + 10_000);
    // One of them, checked by OpenSSL.
    let one = out.join("SN-004242.pem");
    let r = openssl_verify(&lab.root_pem(names::MFR_CA), &one, "sslclient");
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
}

/// Every certificate file that exists has its record, and its key file holds its key.
fn check_files_against_ledger(home: &Path, out: &Path) -> usize {
    let store = RedbStore::open(&home.join("store.redb")).unwrap();
    let files = pem_files(out);
    for f in &files {
        let der = first_der(f);
        let (_, cert) = X509Certificate::from_der(&der).unwrap();
        let serial = Serial::from_bytes(cert.raw_serial());
        let (record, stored) = store
            .cert(&serial)
            .unwrap()
            .unwrap_or_else(|| panic!("{} has no record", f.display()));
        assert_eq!(stored, der);
        assert!(record
            .subject_key
            .ends_with(f.file_stem().unwrap().to_str().unwrap()));
        let key_file = f.with_extension("key.pem");
        let key = SoftwareKey::load(&key_file, None).unwrap();
        assert_eq!(
            key.subject_public_key_info(),
            cert.tbs_certificate.subject_pki.raw,
            "{} does not hold the key of its certificate",
            key_file.display()
        );
    }
    files.len()
}

fn a_batch_killed_midway_and_rerun_ends_with_one_live_certificate_per_id(backend: Backend) {
    let lab = Lab::with(backend);
    let n = 6_000;
    let ids = lab.path("ids.txt");
    write_ids(&ids, "K-", n);
    let out = lab.path("out");
    let args = [
        "issue",
        "batch",
        "--ca",
        names::ENT_CA,
        "--profile",
        "node",
        "--enterprise",
        ENTERPRISE,
        "--ids",
        ids.to_str().unwrap(),
        "--out-dir",
        out.to_str().unwrap(),
        "--chunk",
        "64",
    ];
    // Kill it twice at different points, then let it finish.
    for min_files in [1, n / 3] {
        kill_when(&lab, &args, || {
            std::fs::read_dir(&out).map(|d| d.count()).unwrap_or(0) > min_files * 2
        });
        let files = check_files_against_ledger(&lab.home, &out);
        assert!(files < n, "the batch finished before it could be killed");
        lab.ok(&["audit", "verify"]);
    }
    let report = lab.json(&args);
    assert_eq!(
        report["issued"].as_u64().unwrap() + report["already_issued"].as_u64().unwrap(),
        n as u64
    );
    assert!(report["already_issued"].as_u64().unwrap() > 0);
    assert_eq!(check_files_against_ledger(&lab.home, &out), n);
    let listed = lab.json(&["certs", "list", "--ca", names::ENT_CA]);
    let listed = listed.as_array().unwrap();
    assert_eq!(listed.len(), n, "exactly one certificate per ID");
    let subjects: HashSet<&str> = listed
        .iter()
        .map(|c| c["subject_key"].as_str().unwrap())
        .collect();
    assert_eq!(subjects.len(), n);
    lab.ok(&["audit", "verify"]);
    assert_no_temp_files(&out);
}

fn csr_folders_from_openssl(backend: Backend) {
    let lab = Lab::with(backend);
    let dir = lab.path("csrs");
    std::fs::create_dir(&dir).unwrap();
    for i in 0..5 {
        // serialNumber in the subject names the ID ...
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
            .arg(lab.path(&format!("k{i}.pem")))
            .arg("-out")
            .arg(dir.join(format!("req{i}.csr")))
            .args(["-subj", &format!("/CN=x/serialNumber=CSR-{i}")])
            .output()
            .unwrap();
        assert!(out.status.success());
    }
    // ... or, without one, the file name does.
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
        .arg(lab.path("named.pem"))
        .arg("-out")
        .arg(dir.join("NAMED-7.csr"))
        .args(["-subj", "/CN=whatever", "-outform", "DER"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let out_dir = lab.path("out");
    let r = lab.json(&[
        "issue",
        "batch",
        "--ca",
        names::MFR_CA,
        "--profile",
        "device",
        "--csr-dir",
        dir.to_str().unwrap(),
        "--out-dir",
        out_dir.to_str().unwrap(),
    ]);
    assert_eq!(r["issued"], 6);
    for id in ["CSR-0", "CSR-4", "NAMED-7"] {
        assert!(out_dir.join(format!("{id}.pem")).exists(), "{id}");
        assert!(!out_dir.join(format!("{id}.key.pem")).exists());
    }
    // A bad CSR stops the whole batch before anything is issued, naming the file: the first
    // bad one in name order, however the parallel reading and checking interleave.
    for name in ["broken.csr", "zz-broken.csr"] {
        std::fs::write(
            dir.join(name),
            "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
        )
        .unwrap();
    }
    let before = lab.cert_count();
    let err = lab.fails(
        2,
        &[
            "issue",
            "batch",
            "--ca",
            names::MFR_CA,
            "--profile",
            "device",
            "--reissue",
            "--csr-dir",
            dir.to_str().unwrap(),
            "--out-dir",
            out_dir.to_str().unwrap(),
        ],
    );
    assert!(
        err.contains("broken.csr") && !err.contains("zz-broken.csr"),
        "{err}"
    );
    assert_eq!(lab.cert_count(), before);
}

#[test]
fn bad_id_lists_name_file_and_line() {
    let lab = Lab::new();
    let ids = lab.path("ids.txt");
    let out = lab.path("out");
    for (content, needle) in [
        ("A1\nA2\nbad id\n", "line 3"),
        ("A1\nA2\nA1\n", "repeats line 1"),
        ("A1\n-x\n", "line 2"),
    ] {
        std::fs::write(&ids, content).unwrap();
        let err = lab.fails(
            2,
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
                out.to_str().unwrap(),
            ],
        );
        assert!(err.contains("ids.txt") && err.contains(needle), "{err}");
    }
    assert_eq!(lab.cert_count(), 0);
    std::fs::write(&ids, "A1\n").unwrap();
    let err = lab.fails(
        2,
        &[
            "issue",
            "batch",
            "--ca",
            names::ENT_CA,
            "--profile",
            "node",
            "--ids",
            ids.to_str().unwrap(),
            "--out-dir",
            out.to_str().unwrap(),
        ],
    );
    assert!(err.contains("--enterprise"), "{err}");
    // A device batch on a CA without a hwType is a policy refusal.
    let err = lab.fails(
        1,
        &[
            "issue",
            "batch",
            "--ca",
            names::ENT_CA,
            "--profile",
            "device",
            "--ids",
            ids.to_str().unwrap(),
            "--out-dir",
            out.to_str().unwrap(),
        ],
    );
    assert!(err.contains("hwType"), "{err}");
}

/// The entries of every `<kind>-N.jsonl` file in `out`, with the files' count.
fn bundle_lines(out: &Path, kind: &str) -> (usize, Vec<serde_json::Value>) {
    let mut files = 0;
    let mut lines = Vec::new();
    for e in std::fs::read_dir(out).unwrap().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with(&format!("{kind}-")) && name.ends_with(".jsonl") {
            files += 1;
            for line in std::fs::read_to_string(e.path()).unwrap().lines() {
                lines.push(serde_json::from_str(line).unwrap());
            }
        }
    }
    (files, lines)
}

#[test]
fn bundles_hold_every_certificate_once_and_a_lost_bundle_is_restored() {
    use std::os::unix::fs::PermissionsExt;
    let lab = Lab::new();
    let n = 2_000;
    let ids = lab.path("ids.txt");
    write_ids(&ids, "B-", n);
    let out = lab.path("out");
    let args = [
        "issue",
        "batch",
        "--ca",
        names::MFR_CA,
        "--profile",
        "device",
        "--ids",
        ids.to_str().unwrap(),
        "--out-dir",
        out.to_str().unwrap(),
        "--bundle",
        "--chunk",
        "256",
    ];
    let report = lab.json(&args);
    assert_eq!(report["issued"], n);
    assert!(pem_files(&out).iter().all(|p| p.ends_with("chain.pem")));

    // Eight chunks: eight certificate bundles and eight key bundles (0600).
    let (files, certs) = bundle_lines(&out, "bundle");
    assert_eq!((files, certs.len()), (8, n));
    let (key_files, keys) = bundle_lines(&out, "keys");
    assert_eq!((key_files, keys.len()), (8, n));
    for e in std::fs::read_dir(&out).unwrap().flatten() {
        if e.file_name().to_string_lossy().starts_with("keys-") {
            assert_eq!(e.metadata().unwrap().permissions().mode() & 0o777, 0o600);
        }
    }
    let keys: std::collections::HashMap<&str, &str> = keys
        .iter()
        .map(|k| (k["id"].as_str().unwrap(), k["key"].as_str().unwrap()))
        .collect();
    assert_eq!(keys.len(), n, "one key per ID when nothing was interrupted");

    // Each entry: its certificate is the recorded one, names its ID, and its key is beside it.
    assert_eq!(check_bundles_against_ledger(&lab.home, &out), n);

    // One of them with the folder's chain.pem, checked by OpenSSL.
    let chain = std::fs::read_to_string(out.join("chain.pem")).unwrap();
    let one = lab.path("one.pem");
    std::fs::write(
        &one,
        format!("{}{chain}", certs[1234]["certificate"].as_str().unwrap()),
    )
    .unwrap();
    let r = openssl_verify(&lab.root_pem(names::MFR_CA), &one, "sslclient");
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));

    // A bundle lost (a power cut before the page cache reached the disk): the rerun issues
    // nothing and writes what the ledger holds for the missing IDs into a new bundle.
    std::fs::remove_file(out.join("bundle-000003.jsonl")).unwrap();
    let again = lab.json(&args);
    assert_eq!(again["issued"], 0);
    assert_eq!(again["already_issued"], n);
    assert_eq!(again["files_restored"], 256);
    assert_eq!(again["missing_keys"].as_array().unwrap().len(), 0);
    let (_, restored) = bundle_lines(&out, "bundle");
    let ids: HashSet<&str> = restored.iter().map(|l| l["id"].as_str().unwrap()).collect();
    assert_eq!((restored.len(), ids.len()), (n, n));
    assert_eq!(lab.cert_count(), n);

    // Key lines count only for the serial they were made for: a stray key line for an issued
    // ID (what a run killed between syncing keys and recording leaves) does not hide a lost
    // key bundle.
    let lost_keys = std::fs::read_to_string(out.join("keys-000002.jsonl")).unwrap();
    std::fs::remove_file(out.join("keys-000002.jsonl")).unwrap();
    let stray: serde_json::Value = serde_json::from_str(lost_keys.lines().next().unwrap()).unwrap();
    std::fs::write(
        out.join("keys-000900.jsonl"),
        format!(
            "{}\n",
            serde_json::json!({"id": stray["id"], "serial": "0badc0de", "key": stray["key"]})
        ),
    )
    .unwrap();
    let keyless = lab.json(&args);
    assert_eq!(keyless["issued"], 0);
    assert_eq!(keyless["missing_keys"].as_array().unwrap().len(), 256);
    assert!(keyless["missing_keys"]
        .as_array()
        .unwrap()
        .contains(&stray["id"]));

    // A damaged bundle stops the batch with its name and line, before anything is issued.
    let mut damaged = std::fs::read_to_string(out.join("bundle-000005.jsonl")).unwrap();
    damaged.push_str("{\"id\": 42}\n");
    std::fs::write(out.join("bundle-000005.jsonl"), damaged).unwrap();
    let err = lab.fails(2, &args);
    assert!(
        err.contains("bundle-000005.jsonl") && err.contains("line 257"),
        "{err}"
    );
    assert_eq!(lab.cert_count(), n);
}

/// Every bundle entry is in one bundle only, is its ledger record (serial, identity, DER) and
/// has its key; returns how many entries there are.
fn check_bundles_against_ledger(home: &Path, out: &Path) -> usize {
    let store = RedbStore::open(&home.join("store.redb")).unwrap();
    let (_, certs) = bundle_lines(out, "bundle");
    let (_, keys) = bundle_lines(out, "keys");
    // Keys by (ID, serial): a run killed between syncing a chunk's keys and recording it
    // leaves keys for serials that were never issued; the rerun makes new ones.
    let keys: std::collections::HashMap<(&str, &str), &str> = keys
        .iter()
        .map(|k| {
            (
                (k["id"].as_str().unwrap(), k["serial"].as_str().unwrap()),
                k["key"].as_str().unwrap(),
            )
        })
        .collect();
    let mut seen = HashSet::new();
    for line in &certs {
        let id = line["id"].as_str().unwrap();
        assert!(seen.insert(id.to_owned()), "{id} is in two bundles");
        let der = ::pem::parse(line["certificate"].as_str().unwrap())
            .unwrap()
            .into_contents();
        let (_, cert) = X509Certificate::from_der(&der).unwrap();
        let serial = Serial::from_bytes(cert.raw_serial());
        let (record, stored) = store
            .cert(&serial)
            .unwrap()
            .unwrap_or_else(|| panic!("{id} is in a bundle without a record"));
        assert_eq!(stored, der);
        assert_eq!(line["serial"], serial.to_string());
        assert_eq!(line["identity"], record.subject_key.as_str());
        assert!(record.subject_key.ends_with(&format!(":{id}")));
        let serial = serial.to_string();
        let key = keys
            .get(&(id, serial.as_str()))
            .unwrap_or_else(|| panic!("{id} has a certificate but no key"));
        let key = rcgen::KeyPair::from_pem(key).unwrap();
        assert_eq!(
            key.subject_public_key_info(),
            cert.tbs_certificate.subject_pki.raw
        );
    }
    certs.len()
}

#[test]
fn a_bundle_batch_killed_midway_and_rerun_loses_nothing() {
    let lab = Lab::new();
    let n = 6_000;
    let ids = lab.path("ids.txt");
    write_ids(&ids, "KB-", n);
    let out = lab.path("out");
    let args = [
        "issue",
        "batch",
        "--ca",
        names::MFR_CA,
        "--profile",
        "device",
        "--ids",
        ids.to_str().unwrap(),
        "--out-dir",
        out.to_str().unwrap(),
        "--bundle",
        "--chunk",
        "64",
    ];
    for min_bundles in [1, 30] {
        kill_when(&lab, &args, || {
            std::fs::read_dir(&out)
                .map(|d| {
                    d.flatten()
                        .filter(|e| e.file_name().to_string_lossy().starts_with("bundle-"))
                        .count()
                })
                .unwrap_or(0)
                > min_bundles
        });
        let entries = check_bundles_against_ledger(&lab.home, &out);
        assert!(entries < n, "the batch finished before it could be killed");
        lab.ok(&["audit", "verify"]);
    }
    let report = lab.json(&args);
    assert_eq!(
        report["issued"].as_u64().unwrap() + report["already_issued"].as_u64().unwrap(),
        n as u64
    );
    assert_eq!(report["missing_keys"].as_array().unwrap().len(), 0);
    assert_eq!(check_bundles_against_ledger(&lab.home, &out), n);
    let (_, lines) = bundle_lines(&out, "bundle");
    let distinct: HashSet<&str> = lines.iter().map(|l| l["id"].as_str().unwrap()).collect();
    assert_eq!(distinct.len(), n, "each ID in exactly one bundle line");
    assert_eq!(lab.cert_count(), n);
    assert_no_temp_files(&out);
}

/// The SubjectPublicKeyInfo of the certificate in a PEM file and of a key file.
fn cert_spki(cert_pem: &Path) -> Vec<u8> {
    let der = first_der(cert_pem);
    let (_, c) = X509Certificate::from_der(&der).unwrap();
    c.tbs_certificate.subject_pki.raw.to_vec()
}

fn key_spki(key_pem: &Path) -> Vec<u8> {
    SoftwareKey::load(key_pem, None)
        .unwrap()
        .subject_public_key_info()
}

/// Every `<ID>.pem` in `out` that has an `<ID>.key.pem` beside it holds that key's public key.
/// Returns (pairs, certificates without a key).
fn assert_pairs_match(out: &Path) -> (usize, usize) {
    let (mut pairs, mut keyless) = (0, 0);
    for cert in pem_files(out) {
        let key = cert.with_extension("key.pem");
        if key.exists() {
            assert_eq!(cert_spki(&cert), key_spki(&key), "{}", cert.display());
            pairs += 1;
        } else {
            keyless += 1;
        }
    }
    (pairs, keyless)
}

fn batch_args<'a>(ids: &'a str, out: &'a str) -> Vec<&'a str> {
    vec![
        "issue",
        "batch",
        "--ca",
        names::MFR_CA,
        "--profile",
        "device",
        "--ids",
        ids,
        "--out-dir",
        out,
    ]
}

/// A stray key file under an ID's name never gets a certificate written beside it: a live ID
/// whose certificate would be restored there is reported (exit 2) and left without one; an ID
/// issued now gets a fresh key that replaces the stray.
#[test]
fn a_stray_key_file_never_gets_a_foreign_certificate() {
    let lab = Lab::new();
    let ids = lab.path("ids.txt");
    let (first, out) = (lab.path("first"), lab.path("out"));
    std::fs::write(&ids, "X-1\n").unwrap();
    let (ids_s, first_s, out_s) = (
        ids.to_str().unwrap(),
        first.to_str().unwrap(),
        out.to_str().unwrap(),
    );
    lab.json(&batch_args(ids_s, first_s)); // X-1 is live, its files in `first`
    std::fs::create_dir_all(&out).unwrap();
    let stray = SoftwareKey::generate(m2mpki_hsm::KeyType::P256).unwrap();
    for id in ["X-1", "X-2"] {
        std::fs::write(
            out.join(format!("{id}.key.pem")),
            stray.to_pkcs8_pem(None).unwrap().as_bytes(),
        )
        .unwrap();
    }
    std::fs::write(&ids, "X-1\nX-2\n").unwrap();
    let mut args = vec!["--json"];
    args.extend(batch_args(ids_s, out_s));
    let run = lab.run(&args);
    let err = String::from_utf8_lossy(&run.stderr);
    assert_eq!(run.status.code(), Some(2), "{err}");
    assert!(err.contains("X-1") && err.contains("X-1.key.pem"), "{err}");
    let report: serde_json::Value = serde_json::from_slice(&run.stdout).unwrap();
    assert_eq!(report["issued"], 1);
    assert_eq!(report["files_restored"], 0);
    assert_eq!(report["key_mismatches"][0]["id"], "X-1");
    assert!(
        !out.join("X-1.pem").exists(),
        "no certificate beside a foreign key"
    );
    // X-2 was issued now: its key file is the new key, not the stray.
    assert_ne!(
        key_spki(&out.join("X-2.key.pem")),
        stray.subject_public_key_info()
    );
    assert_eq!(assert_pairs_match(&out), (1, 0));
    // With the stray moved away, the rerun restores X-1's certificate (keyless, reported).
    std::fs::remove_file(out.join("X-1.key.pem")).unwrap();
    let again = lab.json(&batch_args(ids_s, out_s));
    assert_eq!(again["files_restored"], 1);
    assert_eq!(again["missing_keys"][0], "X-1");
    assert_eq!(
        cert_spki(&out.join("X-1.pem")),
        key_spki(&first.join("X-1.key.pem"))
    );
}

/// Two batches of the same IDs into two folders at once: each ID is issued once, and neither
/// folder ever holds a certificate beside a key that is not its own, also after a rerun.
#[test]
fn concurrent_batches_of_the_same_ids_never_mismatch_keys() {
    let lab = Lab::new();
    let ids = lab.path("ids.txt");
    write_ids(&ids, "C-", 2000);
    let (a, b) = (lab.path("a"), lab.path("b"));
    let spawn = |out: &Path| {
        let mut args = vec!["--json".to_owned()];
        args.extend(
            batch_args(ids.to_str().unwrap(), out.to_str().unwrap())
                .iter()
                .map(|s| s.to_string()),
        );
        args.extend(["--chunk".into(), "64".into()]);
        lab.cmd()
            .args(&args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (ca, cb) = (spawn(&a), spawn(&b));
    let (ra, rb) = (
        ca.wait_with_output().unwrap(),
        cb.wait_with_output().unwrap(),
    );
    for r in [&ra, &rb] {
        assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    }
    let (va, vb): (serde_json::Value, serde_json::Value) = (
        serde_json::from_slice(&ra.stdout).unwrap(),
        serde_json::from_slice(&rb.stdout).unwrap(),
    );
    let issued = va["issued"].as_u64().unwrap() + vb["issued"].as_u64().unwrap();
    assert_eq!(issued, 2000, "{va} {vb}");
    assert_eq!(lab.cert_count(), 2000);
    // A folder also gets (keyless, reported) the certificates of IDs the other batch won: the
    // batch restores every live ID's certificate. None sits beside a foreign key.
    let (pa, ka) = assert_pairs_match(&a);
    let (pb, kb) = assert_pairs_match(&b);
    assert_eq!(pa + pb, 2000);
    assert_eq!(ka, va["missing_keys"].as_array().unwrap().len(), "{va}");
    assert_eq!(kb, vb["missing_keys"].as_array().unwrap().len(), "{vb}");
    // Keys of IDs a folder lost are gone (they were never certified).
    let keys = |d: &Path| {
        std::fs::read_dir(d)
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with(".key.pem"))
            .count()
    };
    assert_eq!(keys(&a) + keys(&b), 2000);
    // A rerun after losing every certificate file: all come back, each beside its own key or
    // none.
    for cert in pem_files(&b) {
        std::fs::remove_file(cert).unwrap();
    }
    let again = lab.json(&batch_args(ids.to_str().unwrap(), b.to_str().unwrap()));
    assert_eq!(again["files_restored"], 2000);
    assert_eq!(again["issued"], 0);
    assert_eq!(again["missing_keys"].as_array().unwrap().len(), 2000 - pb);
    assert_eq!(again["key_mismatches"].as_array().unwrap().len(), 0);
    assert_eq!(assert_pairs_match(&b), (pb, 2000 - pb));
}

/// Samples of a Prometheus text exposition (format 0.0.4, what node_exporter's textfile
/// collector reads) by `name{labels}`, checking its shape: every family announced once with
/// `# HELP` then `# TYPE gauge`, every sample in an announced family, every value a number.
fn prometheus_samples(text: &str) -> std::collections::BTreeMap<String, f64> {
    let mut families: Vec<String> = Vec::new();
    let mut helped: Option<String> = None;
    let mut samples = std::collections::BTreeMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            helped = Some(rest.split_once(' ').unwrap().0.to_owned());
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap();
            assert_eq!(kind, "gauge", "{line}");
            assert_eq!(helped.as_deref(), Some(name), "# HELP before {line}");
            assert!(
                !families.iter().any(|f| f == name),
                "{name} announced twice"
            );
            families.push(name.to_owned());
            continue;
        }
        assert!(!line.starts_with('#') && !line.is_empty(), "{line:?}");
        let (series, value) = line.rsplit_once(' ').unwrap();
        let value: f64 = value.parse().unwrap_or_else(|_| panic!("{line}"));
        let name = series.split('{').next().unwrap();
        assert!(families.iter().any(|f| f == name), "{name} has no # TYPE");
        assert!(
            samples.insert(series.to_owned(), value).is_none(),
            "{series} twice"
        );
    }
    samples
}

/// `--metrics-file` leaves the outcome of every run, successful or not, for node_exporter's
/// textfile collector: replaced atomically, world-readable, the counts of the run.
#[test]
fn a_batch_leaves_its_outcome_for_the_textfile_collector() {
    use std::os::unix::fs::PermissionsExt;
    let lab = Lab::new();
    let ids = lab.path("ids.txt");
    write_ids(&ids, "M-", 20);
    let textfile = lab.path("textfile");
    std::fs::create_dir_all(&textfile).unwrap();
    let prom = textfile.join("m2mpki_batch.prom");
    let (ids_s, out, prom_s) = (
        ids.to_str().unwrap(),
        lab.path("out"),
        prom.to_str().unwrap().to_owned(),
    );
    let out_s = out.to_str().unwrap();
    let mut args = batch_args(ids_s, out_s);
    args.extend(["--metrics-file", &prom_s]);
    let series = |name: &str, extra: &str| {
        format!(
            "m2mpki_batch_{name}{{ca=\"{}\",profile=\"device\"{extra}}}",
            names::MFR_CA
        )
    };
    let read = || prometheus_samples(&std::fs::read_to_string(&prom).unwrap());

    lab.ok(&args);
    let m = read();
    assert_eq!(m[&series("last_success", "")], 1.0);
    assert_eq!(m[&series("last_subjects_done", "")], 20.0);
    assert_eq!(m[&series("last_certificates", ",result=\"issued\"")], 20.0);
    assert_eq!(
        m[&series("last_certificates", ",result=\"already_issued\"")],
        0.0
    );
    assert!(m[&series("last_duration_seconds", "")] > 0.0);
    let ended = m[&series("last_end_timestamp_seconds", "")];
    let now = ::time::OffsetDateTime::now_utc().unix_timestamp() as f64;
    assert!(
        (now - 600.0..=now + 1.0).contains(&ended),
        "{ended} vs {now}"
    );
    let mode = std::fs::metadata(&prom).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o644);

    // A rerun replaces the file: nothing new to issue.
    lab.ok(&args);
    let m = read();
    assert_eq!(m[&series("last_certificates", ",result=\"issued\"")], 0.0);
    assert_eq!(
        m[&series("last_certificates", ",result=\"already_issued\"")],
        20.0
    );

    // A run that fails after its chunk was recorded (a foreign key file under a live ID's
    // name, exit 2) says so, with what it recorded and no per-result counts.
    std::fs::remove_file(out.join("M-000000.pem")).unwrap();
    let stray = SoftwareKey::generate(m2mpki_hsm::KeyType::P256).unwrap();
    std::fs::write(
        out.join("M-000000.key.pem"),
        stray.to_pkcs8_pem(None).unwrap().as_bytes(),
    )
    .unwrap();
    lab.fails(2, &args);
    let m = read();
    assert_eq!(m[&series("last_success", "")], 0.0);
    assert_eq!(m[&series("last_subjects_done", "")], 20.0);
    assert!(!m.keys().any(|k| k.contains("last_certificates")), "{m:?}");

    // A run that fails before it starts (a bad ID list) too; only the .prom file is left in
    // the collector's folder (no temporary files).
    std::fs::write(&ids, "bad id\n").unwrap();
    lab.fails(2, &args);
    let m = read();
    assert_eq!(m[&series("last_success", "")], 0.0);
    assert_eq!(m[&series("last_subjects_done", "")], 0.0);
    let left: Vec<_> = std::fs::read_dir(&textfile).unwrap().collect();
    assert_eq!(left.len(), 1);

    // An unwritable metrics file is an error naming it, after a run that succeeded.
    std::fs::write(&ids, "N-1\n").unwrap();
    let missing = lab.path("no-such-dir/m.prom");
    let mut args = batch_args(ids_s, out_s);
    let missing_s = missing.to_str().unwrap().to_owned();
    args.extend(["--metrics-file", &missing_s]);
    let err = lab.run(&args);
    let stderr = String::from_utf8_lossy(&err.stderr);
    assert_eq!(err.status.code(), Some(3), "{stderr}");
    assert!(stderr.contains("no-such-dir"), "{stderr}");
    // The OS error once, not once per link of the error chain.
    assert_eq!(
        stderr.matches("No such file or directory").count(),
        1,
        "{stderr}"
    );
}
