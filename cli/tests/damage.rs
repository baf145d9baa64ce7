//! Damaged store files: a zero-length store is refused rather than taken for a new one; bytes
//! overwritten anywhere in the file end in exit 3 or an `audit verify` finding, never a panic
//! and never a changed answer with exit 0; a flipped bit in a certificate record is found by
//! `audit verify`'s cross-check of the ledger against the audit chain.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests may fail loudly

mod common;

use common::*;
use m2mpki_test_pki::names;

fn store_file(lab: &Lab) -> std::path::PathBuf {
    lab.home.join("store.redb")
}

/// Issues a device certificate for `id` from the lab's manufacturer CA; returns its record.
fn issue(lab: &Lab, id: &str) -> serde_json::Value {
    let key = lab.path(&format!("{id}.key"));
    let out = lab.path(&format!("{id}.pem"));
    lab.json(&[
        "issue",
        "device",
        "--ca",
        names::MFR_CA,
        "--id",
        id,
        "--key-out",
        key.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ])
}

#[test]
fn a_zero_length_store_is_refused_not_taken_for_a_new_one() {
    let lab = Lab::new();
    let key = lab
        .home
        .join("keys")
        .join(format!("{}.key.pem", names::MFR_CA));
    let key_before = std::fs::read(&key).unwrap();
    std::fs::write(store_file(&lab), b"").unwrap();
    for args in [
        &["ca", "list"][..],
        &["audit", "verify"],
        &["certs", "list"],
        &["ca", "init", names::MFR_CA, "--subject", "CN=Again"],
    ] {
        let err = lab.fails(3, args);
        assert!(err.contains("store.redb"), "{args:?}: {err}");
        assert!(err.contains("empty (0 bytes)"), "{args:?}: {err}");
    }
    assert_eq!(
        std::fs::read(&key).unwrap(),
        key_before,
        "the CA key was touched"
    );
    // Removing the file is the explicit way to start an empty store.
    std::fs::remove_file(store_file(&lab)).unwrap();
    assert_eq!(lab.json(&["ca", "list"]).as_array().unwrap().len(), 0);

    // The IN's credential store likewise.
    let lab = Lab::new();
    let creds = lab.home.join("bootstrap.redb");
    lab.ok(&["bootstrap", "grant", "device:1.3.6.1.4.1.99999.1:D-1", "/r"]);
    assert!(std::fs::metadata(&creds).unwrap().len() > 0);
    std::fs::write(&creds, b"").unwrap();
    let err = lab.fails(3, &["bootstrap", "grants"]);
    assert!(
        err.contains("bootstrap.redb") && err.contains("empty (0 bytes)"),
        "{err}"
    );
}

#[test]
fn overwritten_bytes_anywhere_end_in_exit_3_or_a_finding_never_a_silent_change() {
    let lab = Lab::new();
    for n in 0..6 {
        issue(&lab, &format!("D-DMG-{n}"));
    }
    let good = std::fs::read(store_file(&lab)).unwrap();
    let listing = lab.ok(&["--json", "certs", "list"]);
    let cas = lab.ok(&["--json", "ca", "list"]);
    let (mut refused, mut found, mut unaffected) = (0, 0, 0);
    let mut at = 512;
    while at + 512 <= good.len() {
        let mut bad = good.clone();
        // A fixed pattern: reproducible, and never valid JSON or a valid page by chance.
        for (i, b) in bad[at..at + 512].iter_mut().enumerate() {
            *b = (i as u8).wrapping_mul(37) ^ 0xA5;
        }
        std::fs::write(store_file(&lab), &bad).unwrap();
        let runs: Vec<_> = [
            &["--json", "certs", "list"][..],
            &["--json", "ca", "list"],
            &["audit", "verify"],
        ]
        .iter()
        .map(|args| lab.run(args))
        .collect();
        for (out, what) in runs.iter().zip(["certs list", "ca list", "audit verify"]) {
            let code = out.status.code();
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(
                matches!(code, Some(0 | 1 | 3)),
                "{what} with bytes {at}..{} overwritten: exit {code:?}: {stderr}",
                at + 512
            );
        }
        let codes: Vec<_> = runs.iter().map(|o| o.status.code().unwrap()).collect();
        if codes.iter().all(|&c| c == 0) {
            // Nothing noticed: then nothing may have changed.
            assert_eq!(String::from_utf8_lossy(&runs[0].stdout), listing, "at {at}");
            assert_eq!(String::from_utf8_lossy(&runs[1].stdout), cas, "at {at}");
            unaffected += 1;
        } else if codes[2] == 1 {
            found += 1;
        } else {
            refused += 1;
        }
        at += 4096;
    }
    eprintln!("{refused} refused, {found} audit findings, {unaffected} unaffected");
    assert!(refused > 0, "no damage was noticed at all");

    // A truncated file is refused.
    std::fs::write(store_file(&lab), &good[..good.len() / 2]).unwrap();
    let err = lab.fails(3, &["certs", "list"]);
    assert!(err.contains("store.redb"), "{err}");
}

#[test]
fn a_flipped_bit_in_a_certificate_record_is_an_audit_finding() {
    let lab = Lab::new();
    let id = "D-FLIP-0001";
    let issued = issue(&lab, id);
    let serial = issued["serial"].as_str().unwrap().to_owned();
    let good = std::fs::read(store_file(&lab)).unwrap();
    // The ledger record's JSON: `"subject_key":"…D-FLIP-0001","identity":"…D-FLIP-0001",
    // "subject":…`; the audit entry and the index keys hold the ID without those neighbours.
    for field_after in ["identity", "subject"] {
        let needle = format!("{id}\",\"{field_after}\"");
        let at = good
            .windows(needle.len())
            .position(|w| w == needle.as_bytes())
            .expect("the certificate record in the file");
        let mut bad = good.clone();
        bad[at + id.len() - 1] ^= 0x01; // D-FLIP-0001 -> D-FLIP-0000
        std::fs::write(store_file(&lab), &bad).unwrap();
        let listed = lab.json(&["certs", "list"]);
        assert!(
            listed.to_string().contains("D-FLIP-0000"),
            "the flipped record reads back changed: {listed}"
        );
        let err = lab.fails(1, &["audit", "verify"]);
        assert!(err.contains(&serial), "{field_after}: {err}");
    }
    std::fs::write(store_file(&lab), &good).unwrap();
    lab.ok(&["audit", "verify"]);
}
