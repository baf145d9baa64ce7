//! NIST PKITS (the 2011 edition, from the `cryptography_vectors` package that scripts/test
//! installs) through m2mpki's chain verification: every case of sections 4.1–4.7 and 4.13–4.16.
//!
//! Each case's expected result is in its name (`Valid…` / `Invalid…`). The path of a case is
//! built from PKITS' CA certificates by name from the end-entity certificate up to the trust
//! anchor; every CRL of a CA on those paths is offered to the set through `attach_crl` (so a CRL
//! that m2mpki refuses to attach is simply not there, and the set's `require` policy then
//! refuses what it cannot prove). Verification is at 2015-01-01 with RFC 5280's EKU rule
//! (PKITS end-entity certificates carry no EKU). The one hard rule: no chain PKITS marks
//! invalid is accepted. Valid chains that are refused are counted, with the reason, and the
//! table is printed (docs/pkits.md keeps a copy).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests may fail loudly

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::Command;

use m2mpki_ca::rootset::{Anchor, CrlRecord, RevocationPolicy, RootSet, RootSetKind};
use m2mpki_ca::verify::{self, EkuPolicy, Purpose, Validator};
use x509_parser::prelude::{FromDer, X509Certificate};

/// Where the PKITS data is: `$M2MPKI_PKITS`, else the `cryptography_vectors` package of the
/// `python3` on PATH (scripts/test puts its venv first).
fn pkits_dir() -> PathBuf {
    if let Ok(d) = std::env::var("M2MPKI_PKITS") {
        return PathBuf::from(d);
    }
    let out = Command::new("python3")
        .args([
            "-c",
            "import cryptography_vectors, os; print(os.path.dirname(cryptography_vectors.__file__))",
        ])
        .output()
        .expect("python3 runs");
    assert!(
        out.status.success(),
        "the cryptography_vectors package is not installed: run the tests through scripts/test, which installs it ({})",
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim()).join("x509/PKITS_data")
}

/// The PKITS section of a case, from the words in its name (the sections' test names are
/// distinct enough); `None` for the certificate-policy sections 4.8–4.12, which m2mpki does not
/// implement.
fn section(name: &str) -> Option<&'static str> {
    let has = |w: &[&str]| w.iter().any(|x| name.contains(x));
    Some(
        if has(&[
            "Polic",
            "polic",
            "Mapping",
            "requireExplicit",
            "inhibit",
            "UserNotice",
            "CPSPointer",
        ]) {
            return None;
        } else if has(&["deltaCRL"]) {
            "4.15 delta-CRLs"
        } else if has(&[
            "distributionPoint",
            "DistributionPoint",
            "IDP",
            "indirectCRL",
            "onlyContains",
            "onlySomeReasons",
            "cRLIssuer",
            "CRLIssuer",
        ]) && !has(&["BadCRLIssuerName"])
        {
            "4.14 distribution points"
        } else if has(&["nameConstraints"]) {
            "4.13 name constraints"
        } else if has(&["keyUsage"]) {
            "4.7 key usage"
        } else if has(&["basicConstraints", "pathLenConstraint", "cAFalse"]) {
            "4.6 basic constraints"
        } else if has(&["SelfIssued"]) {
            "4.5 self-issued certificates"
        } else if has(&[
            "CRL",
            "Revoked",
            "SerialNumber",
            "SeparateCertificateandCRLKeys",
        ]) {
            "4.4 basic revocation"
        } else if has(&["notBefore", "notAfter"]) {
            "4.2 validity periods"
        } else if has(&["Name", "AttributeTypes", "UTF8String", "Rollover"]) {
            "4.3 name chaining"
        } else if has(&["UnknownCriticalCertificateExtension", "UnknownNotCritical"]) {
            "4.16 private certificate extensions"
        } else {
            "4.1 signature verification"
        },
    )
}

struct Pkits {
    anchor: Vec<u8>,
    /// CA certificates (DER) by subject (raw DER Name).
    cas: HashMap<Vec<u8>, Vec<Vec<u8>>>,
    /// CRLs (DER) by issuer (raw DER Name).
    crls: HashMap<Vec<u8>, Vec<Vec<u8>>>,
}

impl Pkits {
    fn load(dir: &Path) -> (Pkits, Vec<(String, Vec<u8>)>) {
        let mut cas: HashMap<Vec<u8>, Vec<Vec<u8>>> = HashMap::new();
        let mut ees = Vec::new();
        let mut anchor = None;
        for e in std::fs::read_dir(dir.join("certs")).unwrap() {
            let path = e.unwrap().path();
            let name = path.file_stem().unwrap().to_string_lossy().into_owned();
            let der = std::fs::read(&path).unwrap();
            if name == "TrustAnchorRootCertificate" {
                anchor = Some(der);
            } else if name.ends_with("EE") || name.contains("EE") && name.contains("Test") {
                ees.push((name, der));
            } else if let Ok((_, c)) = X509Certificate::from_der(&der) {
                cas.entry(c.subject().as_raw().to_vec())
                    .or_default()
                    .push(der);
            }
        }
        let mut crls: HashMap<Vec<u8>, Vec<Vec<u8>>> = HashMap::new();
        for e in std::fs::read_dir(dir.join("crls")).unwrap() {
            let der = std::fs::read(e.unwrap().path()).unwrap();
            if let Ok((_, c)) =
                x509_parser::revocation_list::CertificateRevocationList::from_der(&der)
            {
                crls.entry(c.issuer().as_raw().to_vec())
                    .or_default()
                    .push(der);
            }
        }
        ees.sort();
        (
            Pkits {
                anchor: anchor.expect("TrustAnchorRootCertificate.crt"),
                cas,
                crls,
            },
            ees,
        )
    }

    /// Every CA certificate that could be on a path from `ee` up (by issuer name), and every
    /// CRL of the names on the way (the anchor's included).
    fn closure(&self, ee: &[u8]) -> (Vec<Vec<u8>>, Vec<Vec<u8>>) {
        let mut names = vec![X509Certificate::from_der(ee)
            .unwrap()
            .1
            .issuer()
            .as_raw()
            .to_vec()];
        let mut seen = std::collections::HashSet::new();
        let mut certs = Vec::new();
        while let Some(n) = names.pop() {
            if !seen.insert(n.clone()) {
                continue;
            }
            for der in self.cas.get(&n).into_iter().flatten() {
                certs.push(der.clone());
                let (_, c) = X509Certificate::from_der(der).unwrap();
                names.push(c.issuer().as_raw().to_vec());
            }
        }
        let crls = seen
            .iter()
            .flat_map(|n| self.crls.get(n).into_iter().flatten().cloned())
            .collect();
        (certs, crls)
    }
}

#[test]
fn pkits_sections_4_1_to_4_7_and_4_13_to_4_16() {
    run(Validator::Auto);
}

/// m2mpki's own path validation (the one for chains under URI, directoryName or rfc822Name
/// constraints) over every case, so that it is held to the same rule as webpki's.
#[test]
fn pkits_through_m2mpki_own_path_validation() {
    run(Validator::Own);
}

/// A valid PKITS chain that m2mpki refuses, pinned: its refusal code under each validation
/// (`None`: that validation accepts it) and why (docs/pkits.md says more). A change that
/// refuses another valid chain, refuses one of these for another reason, or accepts one of
/// them fails [`run`] until this table says so.
struct Known {
    case: &'static str,
    auto: Option<&'static str>,
    own: Option<&'static str>,
    why: &'static str,
}

#[rustfmt::skip]
const REFUSED_VALID: &[Known] = &[
    Known { case: "ValidDSAParameterInheritanceTest5EE", auto: Some("unusable_chain"), own: Some("unusable_chain"), why: "4.1: DSA is not supported; oneM2M uses ECDSA" },
    Known { case: "ValidDSASignaturesTest4EE", auto: Some("unusable_chain"), own: Some("unusable_chain"), why: "4.1: DSA is not supported; oneM2M uses ECDSA" },
    Known { case: "Validpre2000UTCnotBeforeDateTest3EE", auto: Some("unusable_chain"), own: None, why: "4.2: rustls-webpki refuses UTCTime years before 2000 (BadDerTime); the own validation accepts it" },
    Known { case: "ValidNameChainingCapitalizationTest5EE", auto: Some("unknown_root"), own: Some("unknown_root"), why: "4.3: names chain byte for byte (no RFC 5280 §7.1 comparison); unique identifiers are refused by the strict DER reader" },
    Known { case: "ValidNameChainingWhitespaceTest3EE", auto: Some("unknown_root"), own: Some("unknown_root"), why: "4.3: names chain byte for byte (no RFC 5280 §7.1 comparison); unique identifiers are refused by the strict DER reader" },
    Known { case: "ValidNameChainingWhitespaceTest4EE", auto: Some("unknown_root"), own: Some("unknown_root"), why: "4.3: names chain byte for byte (no RFC 5280 §7.1 comparison); unique identifiers are refused by the strict DER reader" },
    Known { case: "ValidNameUIDsTest6EE", auto: Some("unusable_chain"), own: Some("unusable_chain"), why: "4.3: names chain byte for byte (no RFC 5280 §7.1 comparison); unique identifiers are refused by the strict DER reader" },
    Known { case: "ValidRolloverfromPrintableStringtoUTF8StringTest10EE", auto: Some("unknown_root"), own: Some("unknown_root"), why: "4.3: names chain byte for byte (no RFC 5280 §7.1 comparison); unique identifiers are refused by the strict DER reader" },
    Known { case: "ValidUTF8StringCaseInsensitiveMatchTest11EE", auto: Some("unknown_root"), own: Some("unknown_root"), why: "4.3: names chain byte for byte (no RFC 5280 §7.1 comparison); unique identifiers are refused by the strict DER reader" },
    Known { case: "ValidSeparateCertificateandCRLKeysTest19EE", auto: Some("revocation_unknown"), own: Some("revocation_unknown"), why: "4.4: a CRL counts only when the path's issuer key signed it" },
    Known { case: "ValidBasicSelfIssuedCRLSigningKeyTest6EE", auto: Some("revocation_unknown"), own: Some("revocation_unknown"), why: "4.5: a CRL signed by the CA's other (old or new) key does not count" },
    Known { case: "ValidBasicSelfIssuedNewWithOldTest4EE", auto: Some("revocation_unknown"), own: Some("revocation_unknown"), why: "4.5: a CRL signed by the CA's other (old or new) key does not count" },
    Known { case: "ValidBasicSelfIssuedOldWithNewTest1EE", auto: Some("revocation_unknown"), own: Some("revocation_unknown"), why: "4.5: a CRL signed by the CA's other (old or new) key does not count" },
    Known { case: "ValidSelfIssuedpathLenConstraintTest15EE", auto: Some("bad_signature"), own: Some("revocation_unknown"), why: "4.6: a CA certificate as the end entity is refused; self-issued certificates and pathLenConstraint (see docs/pkits.md)" },
    Known { case: "ValidSelfIssuedpathLenConstraintTest17EE", auto: Some("bad_signature"), own: Some("revocation_unknown"), why: "4.6: a CA certificate as the end entity is refused; self-issued certificates and pathLenConstraint (see docs/pkits.md)" },
    Known { case: "ValidpathLenConstraintTest14EE", auto: Some("ca_as_leaf"), own: Some("ca_as_leaf"), why: "4.6: a CA certificate as the end entity is refused; self-issued certificates and pathLenConstraint (see docs/pkits.md)" },
    Known { case: "ValidpathLenConstraintTest8EE", auto: Some("ca_as_leaf"), own: Some("ca_as_leaf"), why: "4.6: a CA certificate as the end entity is refused; self-issued certificates and pathLenConstraint (see docs/pkits.md)" },
    Known { case: "ValidDNnameConstraintsTest19EE", auto: Some("revocation_unknown"), own: Some("revocation_unknown"), why: "4.13: its CRL is signed by the self-issued certificate's key, as in 4.5" },
    Known { case: "ValidIDPwithindirectCRLTest22EE", auto: Some("revocation_unknown"), own: Some("revocation_unknown"), why: "4.14: indirect and reason-partitioned CRLs are refused when attached (no status), or a CA certificate as end entity" },
    Known { case: "ValidIDPwithindirectCRLTest24EE", auto: Some("revocation_unknown"), own: Some("revocation_unknown"), why: "4.14: indirect and reason-partitioned CRLs are refused when attached (no status), or a CA certificate as end entity" },
    Known { case: "ValidIDPwithindirectCRLTest25EE", auto: Some("revocation_unknown"), own: Some("revocation_unknown"), why: "4.14: indirect and reason-partitioned CRLs are refused when attached (no status), or a CA certificate as end entity" },
    Known { case: "ValidcRLIssuerTest28EE", auto: Some("revocation_unknown"), own: Some("revocation_unknown"), why: "4.14: indirect and reason-partitioned CRLs are refused when attached (no status), or a CA certificate as end entity" },
    Known { case: "ValidcRLIssuerTest29EE", auto: Some("revocation_unknown"), own: Some("revocation_unknown"), why: "4.14: indirect and reason-partitioned CRLs are refused when attached (no status), or a CA certificate as end entity" },
    Known { case: "ValidcRLIssuerTest30EE", auto: Some("revocation_unknown"), own: Some("revocation_unknown"), why: "4.14: indirect and reason-partitioned CRLs are refused when attached (no status), or a CA certificate as end entity" },
    Known { case: "ValidcRLIssuerTest33EE", auto: Some("revocation_unknown"), own: Some("revocation_unknown"), why: "4.14: indirect and reason-partitioned CRLs are refused when attached (no status), or a CA certificate as end entity" },
    Known { case: "ValidonlyContainsCACertsTest13EE", auto: Some("ca_as_leaf"), own: Some("ca_as_leaf"), why: "4.14: indirect and reason-partitioned CRLs are refused when attached (no status), or a CA certificate as end entity" },
    Known { case: "ValidonlySomeReasonsTest18EE", auto: Some("revocation_unknown"), own: Some("revocation_unknown"), why: "4.14: indirect and reason-partitioned CRLs are refused when attached (no status), or a CA certificate as end entity" },
    Known { case: "ValidonlySomeReasonsTest19EE", auto: Some("revocation_unknown"), own: Some("revocation_unknown"), why: "4.14: indirect and reason-partitioned CRLs are refused when attached (no status), or a CA certificate as end entity" },
    Known { case: "ValiddeltaCRLTest2EE", auto: Some("revocation_unknown"), own: Some("revocation_unknown"), why: "4.15: delta CRLs, and complete CRLs that announce them, are refused when attached" },
    Known { case: "ValiddeltaCRLTest5EE", auto: Some("revocation_unknown"), own: Some("revocation_unknown"), why: "4.15: delta CRLs, and complete CRLs that announce them, are refused when attached" },
    Known { case: "ValiddeltaCRLTest7EE", auto: Some("revocation_unknown"), own: Some("revocation_unknown"), why: "4.15: delta CRLs, and complete CRLs that announce them, are refused when attached" },
    Known { case: "ValiddeltaCRLTest8EE", auto: Some("revocation_unknown"), own: Some("revocation_unknown"), why: "4.15: delta CRLs, and complete CRLs that announce them, are refused when attached" },
];

fn run(validator: Validator) {
    println!("path validation: {validator:?}");
    let dir = pkits_dir();
    let (pkits, ees) = Pkits::load(&dir);
    assert!(
        ees.len() > 200,
        "PKITS end-entity certificates: {}",
        ees.len()
    );
    let at = time::macros::datetime!(2015-01-01 0:00 UTC);
    // section → (valid agreed, valid refused, invalid refused, invalid ACCEPTED)
    let mut table: BTreeMap<&str, [usize; 4]> = BTreeMap::new();
    let mut refused_valid: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    // case -> the code it was refused with, for every valid chain refused.
    let mut refused_codes: BTreeMap<String, &'static str> = BTreeMap::new();
    let mut accepted_invalid = Vec::new();
    for (name, ee) in &ees {
        let Some(sec) = section(name) else { continue };
        let valid = name.starts_with("Valid");
        let (intermediates, crls) = pkits.closure(ee);
        let mut set = RootSet {
            name: "pkits".into(),
            kind: RootSetKind::Infrastructure,
            anchors: vec![Anchor::from_der(&pkits.anchor, "anchor").unwrap()],
            crls: vec![],
            revocation: RevocationPolicy::default(),
            created: 0,
        };
        let mut crl_refusals = Vec::new();
        for crl in crls {
            let attached = CrlRecord::from_der(&crl, "crl")
                .and_then(|rec| set.attach_crl(rec, &intermediates));
            if let Err(e) = attached {
                crl_refusals.push(e.to_string());
            }
        }
        let mut chain = vec![ee.clone()];
        chain.extend(intermediates);
        if std::env::var("PKITS_DEBUG").is_ok_and(|d| name.contains(&d)) {
            for c in &set.crls {
                println!("{name}: attached CRL of {} scope {:?}", c.issuer, c.scope);
            }
            println!("{name}: refused CRLs {crl_refusals:?}");
        }
        let verdict = verify::verify_using(
            &set,
            &chain,
            Purpose::Server,
            None,
            at,
            EkuPolicy::IfPresent,
            validator,
        );
        let row = table.entry(sec).or_default();
        match (valid, &verdict) {
            (true, Ok(_)) => row[0] += 1,
            (true, Err(r)) => {
                row[1] += 1;
                refused_codes.insert(name.clone(), r.code());
                refused_valid.entry(sec).or_default().push(format!(
                    "{name}: {} ({r}){}",
                    r.code(),
                    if crl_refusals.is_empty() {
                        String::new()
                    } else {
                        format!("; CRLs refused: {}", crl_refusals.join(" | "))
                    }
                ));
            }
            (false, Err(_)) => row[2] += 1,
            (false, Ok(_)) => {
                row[3] += 1;
                accepted_invalid.push(name.clone());
            }
        }
    }
    println!("| section | valid accepted | valid refused | invalid refused | invalid accepted |");
    println!("|---|---|---|---|---|");
    for (sec, [va, vr, ir, ia]) in &table {
        println!("| {sec} | {va} | {vr} | {ir} | {ia} |");
    }
    for (sec, cases) in &refused_valid {
        println!("\nvalid chains refused in {sec}:");
        for c in cases {
            println!("- {c}");
        }
    }
    assert!(
        accepted_invalid.is_empty(),
        "{validator:?}: chains PKITS marks invalid were accepted: {accepted_invalid:?}"
    );
    let pinned: BTreeMap<String, &str> = REFUSED_VALID
        .iter()
        .filter_map(|k| {
            let code = match validator {
                Validator::Auto => k.auto,
                Validator::Own => k.own,
            };
            code.map(|c| (k.case.to_owned(), c))
        })
        .collect();
    let mut differences = Vec::new();
    for (case, code) in &refused_codes {
        match pinned.get(case) {
            None => differences.push(format!(
                "{case}: newly refused ({code}); not in REFUSED_VALID"
            )),
            Some(p) if p != code => {
                differences.push(format!("{case}: refused with {code}, pinned {p}"))
            }
            Some(_) => {}
        }
    }
    for case in pinned.keys() {
        if !refused_codes.contains_key(case) {
            let why = REFUSED_VALID
                .iter()
                .find(|k| k.case == case.as_str())
                .map_or("", |k| k.why);
            differences.push(format!("{case}: accepted now, pinned as refused ({why})"));
        }
    }
    assert!(
        differences.is_empty(),
        "{validator:?}: the valid chains refused differ from REFUSED_VALID:\n{}",
        differences.join("\n")
    );
}
