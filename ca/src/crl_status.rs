//! Revocation status of a verified path from the CRLs of a root set: fail-closed.
//!
//! For every certificate below the anchor, the CRLs that apply to it are those whose issuer is
//! the certificate's issuer (by name), that are signed by that issuer's key (the key of the
//! path, not any key of that name), whose issuer may sign CRLs (cRLSign, when keyUsage is
//! present), and whose scope (RFC 5280 §5.2.5 issuingDistributionPoint: user or CA certificates
//! only, distribution point names matched against the certificate's cRLDistributionPoints as
//! §6.3.3 says) covers the certificate. The order CRLs were added in never matters:
//!
//! - a certificate listed by any CRL that applies is revoked;
//! - otherwise it is good when a *current* CRL applies (nextUpdate, plus the set's grace, not
//!   passed at the verification time);
//! - otherwise its status is unknown: only a CRL past its nextUpdate applies (`crl_expired`),
//!   or none (`revocation_unknown`). A set with [`RevocationMode::Require`] refuses both; one
//!   with [`RevocationMode::BestEffort`] accepts them.
//!
//! CRLs whose meaning this module does not implement (delta CRLs, indirect CRLs, CRLs
//! partitioned by reason, attribute-certificate CRLs, distribution points named relative to
//! the issuer, unknown critical extensions) are refused when they are attached
//! ([`PreparedCrl::unsupported`]) and never applied.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, OnceLock};

use x509_parser::prelude::{FromDer, X509Certificate};

use crate::input::sha256;
use crate::refusal::Refusal;
use crate::rootset::{CrlRecord, RevocationMode, RevocationPolicy, RootSet};
use crate::{Error, Result as CaResult};

/// What part of its issuer's certificates a CRL speaks for.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Scope {
    /// The distribution point names of the issuingDistributionPoint; `None`: all points.
    points: Option<Vec<crate::der::PointName>>,
    only_user: bool,
    only_ca: bool,
}

impl Scope {
    fn covers(&self, cert: &X509Certificate<'_>) -> bool {
        let is_ca = cert
            .basic_constraints()
            .ok()
            .flatten()
            .is_some_and(|bc| bc.value.ca);
        if (self.only_user && is_ca) || (self.only_ca && !is_ca) {
            return false;
        }
        let Some(points) = &self.points else {
            return true;
        };
        // The certificate's own distribution points (read strictly; points with a cRLIssuer
        // belong to indirect CRLs and are left out): one name in common is a match.
        cert.extensions()
            .iter()
            .filter(|e| e.oid == x509_parser::oid_registry::OID_X509_EXT_CRL_DISTRIBUTION_POINTS)
            .any(|e| {
                crate::der::crl_distribution_points(e.value, cert.issuer().as_raw())
                    .is_ok_and(|names| names.iter().any(|n| points.contains(n)))
            })
    }
}

/// A CRL ready for lookups: parsed once, its revoked serials in a set, its signature checked
/// once per issuer key.
pub(crate) struct PreparedCrl {
    /// What checking its signature against an issuer key takes.
    signature: CrlSignature,
    /// Its issuer, as the raw DER Name.
    pub(crate) issuer: Vec<u8>,
    /// Its issuer as text, for messages.
    issuer_text: String,
    /// What it covers.
    scope: Scope,
    /// Why it cannot be applied, when it cannot.
    unsupported: Option<String>,
    /// nextUpdate (Unix time), if present.
    next_update: Option<i64>,
    /// Raw serials (INTEGER contents) of the revoked certificates.
    pub(crate) revoked: HashSet<Vec<u8>>,
    /// Issuer SPKI (DER) → whether the signature verified with it.
    signature_ok: Mutex<HashMap<Vec<u8>, bool>>,
}

/// How a prepared CRL's signature is checked against an issuer key.
enum CrlSignature {
    /// ECDSA: the digest of the TBSCertList, taken once, and the signature. A new issuer key
    /// costs one verification, not a parse and a hash of the whole CRL (1 s for a million
    /// entries, on the handshake that met the key first).
    Ecdsa {
        sha_bits: u16,
        digest: aws_lc_rs::digest::Digest,
        signature: Vec<u8>,
    },
    /// Any other algorithm: the whole CRL, parsed again for each new issuer key.
    Whole(Arc<[u8]>),
}

/// The aws-lc-rs algorithm for an ECDSA signature with SHA-`sha_bits` by the key `spki`.
fn ecdsa_algorithm(
    spki: &x509_parser::x509::SubjectPublicKeyInfo<'_>,
    sha_bits: u16,
) -> Option<&'static aws_lc_rs::signature::EcdsaVerificationAlgorithm> {
    use aws_lc_rs::signature as sig;
    use x509_parser::oid_registry::{OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_NIST_EC_P384};
    if spki.algorithm.algorithm != OID_KEY_TYPE_EC_PUBLIC_KEY {
        return None;
    }
    let curve = spki.algorithm.parameters.as_ref()?.as_oid().ok()?;
    match (curve, sha_bits) {
        (c, 256) if c == OID_EC_P256 => Some(&sig::ECDSA_P256_SHA256_ASN1),
        (c, 384) if c == OID_EC_P256 => Some(&sig::ECDSA_P256_SHA384_ASN1),
        (c, 256) if c == OID_NIST_EC_P384 => Some(&sig::ECDSA_P384_SHA256_ASN1),
        (c, 384) if c == OID_NIST_EC_P384 => Some(&sig::ECDSA_P384_SHA384_ASN1),
        _ => None,
    }
}

/// Why a CRL's extensions put it beyond what [`check_path`] implements, if they do; and its
/// scope.
fn scope_of(
    crl: &x509_parser::revocation_list::CertificateRevocationList<'_>,
) -> (Scope, Option<String>) {
    use x509_parser::oid_registry::{
        OID_X509_EXT_AUTHORITY_KEY_IDENTIFIER, OID_X509_EXT_CRL_NUMBER,
        OID_X509_EXT_DELTA_CRL_INDICATOR, OID_X509_EXT_FRESHEST_CRL,
        OID_X509_EXT_ISSUER_DISTRIBUTION_POINT,
    };
    let mut scope = Scope::default();
    for ext in crl.extensions() {
        if ext.oid == OID_X509_EXT_FRESHEST_CRL {
            // Its status is only current together with its delta CRLs, which are not applied.
            return (
                scope,
                Some(
                    "it announces delta CRLs (freshestCRL), and m2mpki applies complete CRLs only"
                        .into(),
                ),
            );
        }
        if ext.oid == OID_X509_EXT_DELTA_CRL_INDICATOR {
            return (
                scope,
                Some("it is a delta CRL (deltaCRLIndicator); attach complete CRLs".into()),
            );
        }
        if ext.oid == OID_X509_EXT_ISSUER_DISTRIBUTION_POINT {
            // Read strictly here: x509-parser skips the fields it cannot read, which would
            // turn a scoped CRL into a complete one.
            let idp = match crate::der::issuing_distribution_point(ext.value, crl.issuer().as_raw())
            {
                Ok(idp) => idp,
                Err(e) => {
                    return (
                        scope,
                        Some(format!("its issuingDistributionPoint cannot be read ({e})")),
                    )
                }
            };
            if idp.indirect {
                return (scope, Some("it is an indirect CRL (indirectCRL)".into()));
            }
            if idp.some_reasons {
                return (
                    scope,
                    Some("it covers only some revocation reasons (onlySomeReasons)".into()),
                );
            }
            if idp.only_attribute {
                return (scope, Some("it covers attribute certificates only".into()));
            }
            scope.only_user = idp.only_user;
            scope.only_ca = idp.only_ca;
            scope.points = idp.points;
            continue;
        }
        let known =
            ext.oid == OID_X509_EXT_CRL_NUMBER || ext.oid == OID_X509_EXT_AUTHORITY_KEY_IDENTIFIER;
        if ext.critical && !known {
            return (
                scope,
                Some(format!(
                    "it carries an unknown critical extension {}",
                    ext.oid
                )),
            );
        }
    }
    if crl.next_update().is_none() {
        return (
            scope,
            Some("it has no nextUpdate, so whether it is current cannot be told".into()),
        );
    }
    (scope, None)
}

/// The prepared form of `crl`, from a process-wide cache keyed by its digest and length.
/// `None`: the CRL does not parse (with nothing after it).
pub(crate) fn prepare_crl(crl: &CrlRecord) -> Option<Arc<PreparedCrl>> {
    use x509_parser::revocation_list::CertificateRevocationList;
    /// (SHA-256 hex, length) of a CRL's DER → its prepared form.
    type Cache = Mutex<HashMap<(String, usize), Arc<PreparedCrl>>>;
    static CACHE: OnceLock<Cache> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    let key = (crl.sha256.clone(), crl.der.len());
    if let Some(p) = cache.lock().ok()?.get(&key) {
        return Some(p.clone());
    }
    let (rest, parsed) = CertificateRevocationList::from_der(&crl.der).ok()?;
    if !rest.is_empty() {
        return None;
    }
    let (scope, unsupported) = scope_of(&parsed);
    let signature = {
        use aws_lc_rs::digest::{digest, SHA256, SHA384};
        use x509_parser::oid_registry::{OID_SIG_ECDSA_WITH_SHA256, OID_SIG_ECDSA_WITH_SHA384};
        let alg = &parsed.signature_algorithm.algorithm;
        let tbs = parsed.tbs_cert_list.as_ref();
        let ecdsa = |sha_bits, digest| CrlSignature::Ecdsa {
            sha_bits,
            digest,
            signature: parsed.signature_value.data.to_vec(),
        };
        if *alg == OID_SIG_ECDSA_WITH_SHA256 {
            ecdsa(256, digest(&SHA256, tbs))
        } else if *alg == OID_SIG_ECDSA_WITH_SHA384 {
            ecdsa(384, digest(&SHA384, tbs))
        } else {
            CrlSignature::Whole(Arc::from(crl.der.as_slice()))
        }
    };
    let prepared = Arc::new(PreparedCrl {
        signature,
        issuer: parsed.issuer().as_raw().to_vec(),
        issuer_text: parsed.issuer().to_string(),
        scope,
        unsupported,
        next_update: parsed.next_update().map(|t| t.timestamp()),
        revoked: parsed
            .iter_revoked_certificates()
            .map(|r| r.raw_serial().to_vec())
            .collect(),
        signature_ok: Mutex::new(HashMap::new()),
    });
    let mut cache = cache.lock().ok()?;
    // Sets change rarely; a bound keeps replaced CRLs from piling up.
    if cache.len() >= 64 {
        cache.clear();
    }
    cache.insert(key, prepared.clone());
    Some(prepared)
}

impl PreparedCrl {
    /// Why this CRL cannot be applied, if it cannot.
    pub(crate) fn unsupported(&self) -> Option<&str> {
        self.unsupported.as_deref()
    }

    /// Whether the CRL's signature verifies with `issuer_spki` (DER), checked once per key.
    pub(crate) fn signed_by(&self, issuer_spki: &[u8]) -> bool {
        use x509_parser::revocation_list::CertificateRevocationList;
        if let Some(ok) = self
            .signature_ok
            .lock()
            .ok()
            .and_then(|m| m.get(issuer_spki).copied())
        {
            return ok;
        }
        let Ok((_, spki)) = x509_parser::x509::SubjectPublicKeyInfo::from_der(issuer_spki) else {
            return false;
        };
        let ok = match &self.signature {
            CrlSignature::Ecdsa {
                sha_bits,
                digest,
                signature,
            } => ecdsa_algorithm(&spki, *sha_bits).is_some_and(|alg| {
                aws_lc_rs::signature::UnparsedPublicKey::new(alg, &spki.subject_public_key.data)
                    .verify_digest(digest, signature)
                    .is_ok()
            }),
            CrlSignature::Whole(der) => CertificateRevocationList::from_der(der)
                .is_ok_and(|(_, crl)| crl.verify_signature(&spki).is_ok()),
        };
        if let Ok(mut m) = self.signature_ok.lock() {
            m.insert(issuer_spki.to_vec(), ok);
        }
        ok
    }
}

/// Whether `issuer` may sign CRLs: cRLSign, when its keyUsage is present.
pub(crate) fn may_sign_crls(issuer: &X509Certificate<'_>) -> bool {
    match issuer.key_usage() {
        Ok(Some(ku)) => ku.value.crl_sign(),
        Ok(None) => true,
        Err(_) => false,
    }
}

/// Checks the revocation status of every certificate below the anchor of a verified path.
/// `path` holds the certificates from the leaf up, each followed by its issuer; the last
/// entry is the anchor's certificate (whose own status is not checked: it is trusted as it
/// is). `at` is the verification time (Unix).
pub(crate) fn check_path(
    crls: &[Arc<PreparedCrl>],
    policy: &RevocationPolicy,
    path: &[&X509Certificate<'_>],
    at: i64,
) -> Result<(), Refusal> {
    for pair in path.windows(2) {
        let (cert, issuer) = (pair[0], pair[1]);
        let applicable: Vec<&PreparedCrl> = if may_sign_crls(issuer) {
            crls.iter()
                .map(|c| &**c)
                .filter(|c| {
                    c.unsupported.is_none()
                        && c.issuer == cert.issuer().as_raw()
                        && c.scope.covers(cert)
                        && c.signed_by(issuer.public_key().raw)
                })
                .collect()
        } else {
            Vec::new()
        };
        if applicable
            .iter()
            .any(|c| c.revoked.contains(cert.raw_serial()))
        {
            return Err(Refusal::Revoked);
        }
        let grace = i64::try_from(policy.crl_grace).unwrap_or(i64::MAX);
        let current =
            |c: &&PreparedCrl| c.next_update.is_some_and(|n| at <= n.saturating_add(grace));
        if applicable.iter().any(current) || policy.mode == RevocationMode::BestEffort {
            continue;
        }
        let who = format!("`{}`", cert.subject());
        return Err(match applicable.iter().max_by_key(|c| c.next_update) {
            Some(stale) => Refusal::CrlExpired(format!(
                "the newest CRL of `{}` that covers {who} was due to be replaced at {}",
                stale.issuer_text,
                stale
                    .next_update
                    .and_then(|n| time::OffsetDateTime::from_unix_timestamp(n).ok())
                    .map_or_else(|| "an unknown time".into(), crate::validity::format_time)
            )),
            None => Refusal::RevocationUnknown(format!(
                "no CRL of the set from `{}` covers {who}",
                cert.issuer()
            )),
        });
    }
    Ok(())
}

/// Attaching CRLs to a set: their signer must be a CA the set trusts (this file judges CRLs, so
/// the set's data types need not know how).
impl RootSet {
    /// Attaches a CRL after checking that a CA this set trusts signed it: an anchor of the
    /// set, or a CA certificate among `issuers` that chains (by signatures, through
    /// `issuers`) to an anchor, with cRLSign when its keyUsage is present. CRLs this crate
    /// cannot apply (delta, indirect, reason-partitioned, without nextUpdate, ...) are refused
    /// with the reason, so whatever is attached is applied by verification.
    ///
    /// A CRL replaces the one of the same issuer, signing key and scope when its number is
    /// higher; a lower or equal number (with other content) is refused, so CRLs never go back.
    /// Numbers count per key: a CRL of another key (a forgery could claim any number) never
    /// blocks the genuine one. Returns whether the set changed.
    pub fn attach_crl(&mut self, mut crl: CrlRecord, issuers: &[Vec<u8>]) -> CaResult<bool> {
        let refused =
            |reason: String| Error::Policy(format!("CRL of `{}` refused: {reason}", crl.issuer));
        let prepared = prepare_crl(&crl).ok_or_else(|| refused("it does not parse".into()))?;
        if let Some(why) = prepared.unsupported() {
            return Err(refused(why.to_owned()));
        }
        crl.signer = Some(self.crl_signer(&prepared, issuers).map_err(refused)?);
        let number = |c: &CrlRecord| {
            c.number
                .as_deref()
                .and_then(|n| u128::from_str_radix(n, 16).ok())
        };
        let same_series = |x: &CrlRecord| {
            x.issuer == crl.issuer
                && x.scope == crl.scope
                // CRLs attached before signatures were checked give way to a checked one.
                && x.signer.as_ref().is_none_or(|s| Some(s) == crl.signer.as_ref())
        };
        if let Some(i) = self.crls.iter().position(same_series) {
            let old = &self.crls[i];
            if old.sha256 == crl.sha256 {
                return Ok(false);
            }
            let (o, n) = (number(old), number(&crl));
            if old.signer.is_some() && o.is_some() && n.is_some() && n <= o {
                return Err(Error::Policy(format!(
                    "the set already has a CRL of `{}` with number {} from the same key (this one has {}); CRLs never go back",
                    crl.issuer,
                    old.number.clone().unwrap_or_default(),
                    crl.number.clone().unwrap_or_default()
                )));
            }
            self.crls[i] = crl;
        } else {
            self.crls.push(crl);
        }
        Ok(true)
    }

    /// The SHA-256 (hex) of the SubjectPublicKeyInfo that signed `crl`: an anchor's, or a
    /// CA certificate's from `issuers` that chains to an anchor. Err: why none qualifies.
    fn crl_signer(
        &self,
        crl: &PreparedCrl,
        issuers: &[Vec<u8>],
    ) -> std::result::Result<String, String> {
        fn parse(der: &[u8]) -> Option<X509Certificate<'_>> {
            X509Certificate::from_der(der).ok().map(|(_, c)| c)
        }
        let anchors: Vec<X509Certificate<'_>> =
            self.anchors.iter().filter_map(|a| parse(&a.der)).collect();
        let others: Vec<X509Certificate<'_>> = issuers.iter().filter_map(|d| parse(d)).collect();
        let mut named = false;
        for (cert, is_anchor) in anchors
            .iter()
            .map(|c| (c, true))
            .chain(others.iter().map(|c| (c, false)))
        {
            if cert.subject().as_raw() != crl.issuer.as_slice() {
                continue;
            }
            named = true;
            if !crl.signed_by(cert.public_key().raw) {
                continue;
            }
            if !may_sign_crls(cert) {
                return Err(format!(
                    "its issuer `{}` lacks the cRLSign key usage",
                    cert.subject()
                ));
            }
            if !is_anchor && !chains_to(cert, &anchors, &others, 8) {
                continue;
            }
            return Ok(hex::encode(sha256(cert.public_key().raw)));
        }
        Err(if named {
            format!(
                "its signature does not verify with the key of any CA named `{}` that set `{}` trusts",
                name_text(&crl.issuer),
                self.name
            )
        } else {
            format!(
                "set `{}` trusts no CA named `{}`: neither an anchor nor an issuing CA certificate that chains to one (give it with --issuer-cert) signed it",
                self.name,
                name_text(&crl.issuer)
            )
        })
    }
}

/// The DN text of a raw DER Name (its hex when it does not parse).
fn name_text(raw: &[u8]) -> String {
    x509_parser::x509::X509Name::from_der(raw)
        .map(|(_, n)| n.to_string())
        .unwrap_or_else(|_| hex::encode(raw))
}

/// Whether `cert` is a CA certificate that chains, by signatures through `others`, to one of
/// `anchors` within `depth` steps.
fn chains_to(
    cert: &X509Certificate<'_>,
    anchors: &[X509Certificate<'_>],
    others: &[X509Certificate<'_>],
    depth: usize,
) -> bool {
    let is_ca = cert
        .basic_constraints()
        .ok()
        .flatten()
        .is_some_and(|bc| bc.value.ca);
    if !is_ca || depth == 0 {
        return false;
    }
    let signed_by = |parent: &X509Certificate<'_>| {
        parent.subject().as_raw() == cert.issuer().as_raw()
            && cert.verify_signature(Some(parent.public_key())).is_ok()
    };
    anchors.iter().any(signed_by)
        || others
            .iter()
            .any(|p| signed_by(p) && chains_to(p, anchors, others, depth - 1))
}

#[cfg(test)]
#[allow(clippy::cloned_ref_to_slice_refs)] // `&[crl.clone()]` reads best in tables of cases
mod tests {
    use super::*;
    use m2mpki_hsm::{KeyType, SoftwareKey};
    use rcgen::PublicKeyData;

    /// A CRL revoking serial 0x0a, signed by a fresh CA key of `key_type`; and that key.
    fn crl_by(key_type: KeyType) -> (crate::rootset::CrlRecord, SoftwareKey) {
        let key = SoftwareKey::generate(key_type).unwrap();
        let mut ca = rcgen::CertificateParams::default();
        ca.distinguished_name = rcgen::DistinguishedName::new();
        ca.distinguished_name
            .push(rcgen::DnType::CommonName, "CRL test CA");
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        let now = time::OffsetDateTime::now_utc();
        let issuer = rcgen::Issuer::new(ca, &key);
        let crl = rcgen::CertificateRevocationListParams {
            this_update: now,
            next_update: now + time::Duration::days(1),
            crl_number: rcgen::SerialNumber::from(1u64),
            issuing_distribution_point: None,
            revoked_certs: vec![rcgen::RevokedCertParams {
                serial_number: rcgen::SerialNumber::from(10u64),
                revocation_time: now,
                reason_code: None,
                invalidity_date: None,
            }],
            key_identifier_method: rcgen::KeyIdMethod::Sha256,
        }
        .signed_by(&issuer)
        .unwrap();
        let record = crate::rootset::CrlRecord::from_der(crl.der(), "test").unwrap();
        (record, key)
    }

    #[test]
    fn prepared_crls_check_signatures_against_the_right_key_only() {
        let stranger = SoftwareKey::generate(KeyType::P256).unwrap();
        for key_type in [KeyType::P256, KeyType::P384, KeyType::Ed25519] {
            let (crl, key) = crl_by(key_type);
            let prepared = prepare_crl(&crl).expect("prepared");
            assert!(prepared.revoked.contains([10u8].as_slice()), "{key_type}");
            // Twice each: the second answer comes from the per-key memo.
            for _ in 0..2 {
                assert!(
                    prepared.signed_by(&key.subject_public_key_info()),
                    "{key_type}"
                );
                assert!(
                    !prepared.signed_by(&stranger.subject_public_key_info()),
                    "{key_type}"
                );
            }
            assert!(!prepared.signed_by(b"not an SPKI"), "{key_type}");
        }
    }

    #[test]
    fn a_tampered_crl_signature_is_refused() {
        let (crl, key) = crl_by(KeyType::P256);
        // Flip a bit of the signature (the last octet of the DER is inside it).
        let mut der = crl.der.clone();
        *der.last_mut().unwrap() ^= 1;
        let tampered = crate::rootset::CrlRecord::from_der(&der, "tampered").unwrap();
        let prepared = prepare_crl(&tampered).expect("still parses");
        assert!(!prepared.signed_by(&key.subject_public_key_info()));
    }

    /// A CA (rcgen key), two leaves with distribution points `a` and `b`, and a way to make
    /// CRLs of that CA.
    struct Pki {
        ca_key: rcgen::KeyPair,
        ca_params: rcgen::CertificateParams,
        ca_der: Vec<u8>,
        leaf_a: Vec<u8>,
        leaf_b: Vec<u8>,
    }

    fn pki() -> Pki {
        let ca_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut ca_params = rcgen::CertificateParams::default();
        ca_params.distinguished_name = rcgen::DistinguishedName::new();
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "Scope CA");
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        let ca_der = ca_params.self_signed(&ca_key).unwrap().der().to_vec();
        let issuer = rcgen::Issuer::from_params(&ca_params, &ca_key);
        let leaf = |serial: u64, dp: &str| {
            let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
            let mut p = rcgen::CertificateParams::default();
            p.distinguished_name = rcgen::DistinguishedName::new();
            p.distinguished_name.push(rcgen::DnType::CommonName, dp);
            p.serial_number = Some(rcgen::SerialNumber::from(serial));
            p.crl_distribution_points = vec![rcgen::CrlDistributionPoint {
                uris: vec![format!("http://crl.example/{dp}.crl")],
            }];
            p.signed_by(&key, &issuer).unwrap().der().to_vec()
        };
        let (leaf_a, leaf_b) = (leaf(0xa, "a"), leaf(0xb, "b"));
        Pki {
            ca_key,
            ca_params,
            ca_der,
            leaf_a,
            leaf_b,
        }
    }

    impl Pki {
        /// A CRL revoking `serials`, scoped to distribution point `dp` and/or `scope`, valid
        /// until `hours` from now (negative: stale).
        fn crl(
            &self,
            number: u64,
            serials: &[u64],
            dp: Option<&str>,
            scope: Option<rcgen::CrlScope>,
            hours: i64,
        ) -> Arc<PreparedCrl> {
            let issuer = rcgen::Issuer::from_params(&self.ca_params, &self.ca_key);
            let now = time::OffsetDateTime::now_utc();
            let idp =
                (dp.is_some() || scope.is_some()).then(|| rcgen::CrlIssuingDistributionPoint {
                    distribution_point: rcgen::CrlDistributionPoint {
                        uris: dp
                            .map(|d| vec![format!("http://crl.example/{d}.crl")])
                            .unwrap_or_default(),
                    },
                    scope,
                });
            let der = rcgen::CertificateRevocationListParams {
                this_update: now - time::Duration::hours(hours.abs() + 1),
                next_update: now + time::Duration::hours(hours),
                crl_number: rcgen::SerialNumber::from(number),
                issuing_distribution_point: idp,
                revoked_certs: serials
                    .iter()
                    .map(|s| rcgen::RevokedCertParams {
                        serial_number: rcgen::SerialNumber::from(*s),
                        revocation_time: now - time::Duration::hours(hours.abs() + 1),
                        reason_code: None,
                        invalidity_date: None,
                    })
                    .collect(),
                key_identifier_method: rcgen::KeyIdMethod::Sha256,
            }
            .signed_by(&issuer)
            .unwrap()
            .der()
            .to_vec();
            prepare_crl(&crate::rootset::CrlRecord::from_der(&der, "test").unwrap()).unwrap()
        }

        fn check(
            &self,
            leaf: &[u8],
            crls: &[Arc<PreparedCrl>],
            policy: RevocationPolicy,
        ) -> Result<(), Refusal> {
            let now = time::OffsetDateTime::now_utc().unix_timestamp();
            let leaf = X509Certificate::from_der(leaf).unwrap().1;
            let ca = X509Certificate::from_der(&self.ca_der).unwrap().1;
            check_path(crls, &policy, &[&leaf, &ca], now)
        }
    }

    const REQUIRE: RevocationPolicy = RevocationPolicy {
        mode: RevocationMode::Require,
        crl_grace: 0,
    };

    #[test]
    fn scoped_crls_cover_only_their_distribution_point_and_order_never_matters() {
        let p = pki();
        let scoped_a = p.crl(1, &[], Some("a"), None, 24);
        // A CRL for point `a` gives A a status and B none.
        assert_eq!(p.check(&p.leaf_a, &[scoped_a.clone()], REQUIRE), Ok(()));
        assert!(matches!(
            p.check(&p.leaf_b, &[scoped_a.clone()], REQUIRE),
            Err(Refusal::RevocationUnknown(_))
        ));
        // A complete CRL that lists A revokes it, whichever CRL comes first.
        let complete = p.crl(2, &[0xa], None, None, 24);
        for crls in [
            vec![scoped_a.clone(), complete.clone()],
            vec![complete.clone(), scoped_a.clone()],
        ] {
            assert_eq!(p.check(&p.leaf_a, &crls, REQUIRE), Err(Refusal::Revoked));
            assert_eq!(p.check(&p.leaf_b, &crls, REQUIRE), Ok(()));
        }
        // A CRL for point `b` that lists A does not apply to A.
        let scoped_b = p.crl(3, &[0xa], Some("b"), None, 24);
        assert_eq!(p.check(&p.leaf_a, &[scoped_a, scoped_b], REQUIRE), Ok(()));
    }

    #[test]
    fn a_ca_only_crl_gives_leaves_no_status() {
        let p = pki();
        // (rcgen writes a scope only with a distribution point.)
        let ca_only = p.crl(1, &[0xa], Some("a"), Some(rcgen::CrlScope::CaCertsOnly), 24);
        assert!(matches!(
            p.check(&p.leaf_a, &[ca_only.clone()], REQUIRE),
            Err(Refusal::RevocationUnknown(_))
        ));
        let users = p.crl(
            2,
            &[0xa],
            Some("a"),
            Some(rcgen::CrlScope::UserCertsOnly),
            24,
        );
        assert_eq!(
            p.check(&p.leaf_a, &[ca_only, users], REQUIRE),
            Err(Refusal::Revoked)
        );
    }

    #[test]
    fn stale_crls_need_a_grace_and_still_revoke() {
        let p = pki();
        let stale = p.crl(1, &[0xb], None, None, -2);
        assert!(matches!(
            p.check(&p.leaf_a, &[stale.clone()], REQUIRE),
            Err(Refusal::CrlExpired(_))
        ));
        assert_eq!(
            p.check(&p.leaf_b, &[stale.clone()], REQUIRE),
            Err(Refusal::Revoked)
        );
        let graced = RevocationPolicy {
            crl_grace: 3 * 3600,
            ..REQUIRE
        };
        assert_eq!(p.check(&p.leaf_a, &[stale.clone()], graced), Ok(()));
        let best_effort = RevocationPolicy {
            mode: RevocationMode::BestEffort,
            crl_grace: 0,
        };
        assert_eq!(p.check(&p.leaf_a, &[stale.clone()], best_effort), Ok(()));
        assert_eq!(p.check(&p.leaf_a, &[], best_effort), Ok(()));
        assert_eq!(
            p.check(&p.leaf_b, &[stale], best_effort),
            Err(Refusal::Revoked)
        );
    }

    #[test]
    fn a_crl_of_the_same_name_but_another_key_does_not_apply() {
        let p = pki();
        let other = pki(); // same CA name, other key
        let foreign = other.crl(9, &[0xa], None, None, 24);
        assert!(matches!(
            p.check(&p.leaf_a, &[foreign.clone()], REQUIRE),
            Err(Refusal::RevocationUnknown(_))
        ));
        let own = p.crl(1, &[], None, None, 24);
        assert_eq!(p.check(&p.leaf_a, &[foreign, own], REQUIRE), Ok(()));
    }
}
