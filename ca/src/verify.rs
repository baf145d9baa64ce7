//! Verifying a certificate chain against a root set: rustls-webpki path building (the same
//! verifier the bootstrap server uses) plus the field-node identity checks of m2mpki.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use serde::Serialize;
use time::OffsetDateTime;
use webpki::{
    BorrowedCertRevocationList, CertRevocationList, ExpirationPolicy, KeyUsage,
    RevocationCheckDepth, RevocationOptionsBuilder, UnknownStatusPolicy,
};
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::identity::{DnsName, FieldNodeIdentity};
use crate::input::sha256;
use crate::rootset::{RootSet, RootSetKind};
use crate::{Error, Result};

/// What the certificate must be good for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Purpose {
    /// TLS client authentication (field nodes).
    Client,
    /// TLS server authentication (Infrastructure Nodes).
    Server,
}

/// Why a chain was refused. Each reason has a stable code for scripts and protocol errors.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Refusal {
    /// The chain does not lead to an anchor of the set.
    #[error("the chain does not lead to a root of this set")]
    UnknownRoot,
    /// The leaf has expired.
    #[error("the certificate expired at {0}")]
    Expired(String),
    /// The leaf is not valid yet.
    #[error("the certificate is not valid before {0}")]
    NotYetValid(String),
    /// An intermediate CA has expired.
    #[error("an intermediate CA certificate of the chain expired at {0}")]
    IntermediateExpired(String),
    /// An intermediate CA is not valid yet.
    #[error("an intermediate CA certificate of the chain is not valid before {0}")]
    IntermediateNotYetValid(String),
    /// The leaf's extended key usage does not allow the purpose.
    #[error("the certificate's extended key usage does not allow {0:?} authentication")]
    WrongPurpose(Purpose),
    /// A certificate of the chain is revoked by a CRL of the set.
    #[error("a certificate of the chain is revoked (CRL of the set)")]
    Revoked,
    /// A name in the chain breaks a CA's name constraints.
    #[error("a name in the certificate violates the name constraints of a CA in the chain{0}")]
    NameConstraints(String),
    /// A CA certificate was presented as the end entity.
    #[error("a CA certificate was presented as the end-entity certificate")]
    CaAsLeaf,
    /// The chain is longer than a CA's pathLenConstraint allows.
    #[error("the chain is longer than a CA's path length constraint allows")]
    PathTooLong,
    /// A server certificate does not name the expected host.
    #[error("the certificate is not valid for `{0}`")]
    NameMismatch(String),
    /// A signature in the chain does not verify.
    #[error("a signature in the chain does not verify")]
    BadSignature,
    /// The certificate carries no readable field-node identity.
    #[error("{0}")]
    NoIdentity(String),
    /// The identity does not belong to what the set admits.
    #[error("{0}")]
    IdentityOutsideSet(String),
    /// The chain is malformed or uses something unsupported.
    #[error("the chain cannot be verified: {0}")]
    Unusable(String),
}

impl Refusal {
    /// A stable machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            Refusal::UnknownRoot => "unknown_root",
            Refusal::Expired(_) => "expired",
            Refusal::NotYetValid(_) => "not_yet_valid",
            Refusal::IntermediateExpired(_) => "intermediate_expired",
            Refusal::IntermediateNotYetValid(_) => "intermediate_not_yet_valid",
            Refusal::WrongPurpose(_) => "wrong_purpose",
            Refusal::Revoked => "revoked",
            Refusal::NameConstraints(_) => "name_constraints",
            Refusal::CaAsLeaf => "ca_as_leaf",
            Refusal::PathTooLong => "path_too_long",
            Refusal::NameMismatch(_) => "name_mismatch",
            Refusal::BadSignature => "bad_signature",
            Refusal::NoIdentity(_) => "no_identity",
            Refusal::IdentityOutsideSet(_) => "identity_outside_set",
            Refusal::Unusable(_) => "unusable_chain",
        }
    }
}

/// A chain that verified.
#[derive(Clone, Debug, Serialize)]
pub struct Verified {
    /// The set that admitted it.
    pub set: String,
    /// The set's kind.
    pub kind: RootSetKind,
    /// The field-node identity, for device and node certificates.
    pub identity: Option<FieldNodeIdentity>,
    /// Leaf subject.
    pub subject: String,
    /// Leaf serial (hex).
    pub serial: String,
    /// SHA-256 of the leaf (hex).
    pub sha256: String,
    /// SHA-256 of the anchor the path ended at (hex).
    pub anchor: String,
}

fn unix(t: OffsetDateTime) -> UnixTime {
    UnixTime::since_unix_epoch(Duration::from_secs(
        u64::try_from(t.unix_timestamp()).unwrap_or(0),
    ))
}

fn when(t: UnixTime) -> String {
    i64::try_from(t.as_secs())
        .ok()
        .and_then(|s| OffsetDateTime::from_unix_timestamp(s).ok())
        .map_or_else(|| t.as_secs().to_string(), crate::validity::format_time)
}

fn chain_has_uri_constraints(chain: &[Vec<u8>], set: &RootSet) -> bool {
    use x509_parser::extensions::{GeneralName, ParsedExtension};
    chain
        .iter()
        .skip(1)
        .chain(set.anchors.iter().map(|a| &a.der))
        .any(|der| {
            X509Certificate::from_der(der).is_ok_and(|(_, c)| {
                c.extensions().iter().any(|e| match e.parsed_extension() {
                    ParsedExtension::NameConstraints(nc) => nc
                        .permitted_subtrees
                        .iter()
                        .flatten()
                        .chain(nc.excluded_subtrees.iter().flatten())
                        .any(|s| matches!(s.base, GeneralName::URI(_))),
                    _ => false,
                })
            })
        })
}

/// Verifies `chain` (leaf first, then intermediates) against `set` at time `at`.
///
/// For `Purpose::Server` with `name`, the leaf must be valid for that DNS name. Device and
/// node sets additionally require a readable field-node identity of their kind; a node set
/// admits only identities of its enterprise (or its subdomains).
pub fn verify(
    set: &RootSet,
    chain: &[Vec<u8>],
    purpose: Purpose,
    name: Option<&DnsName>,
    at: OffsetDateTime,
) -> std::result::Result<Verified, Refusal> {
    let leaf_der = chain
        .first()
        .ok_or_else(|| Refusal::Unusable("the chain is empty".into()))?;
    let (_, leaf) = X509Certificate::from_der(leaf_der)
        .map_err(|e| Refusal::Unusable(format!("malformed leaf certificate ({e})")))?;
    let anchors: Vec<_> = set
        .anchors
        .iter()
        .filter_map(|a| {
            webpki::anchor_from_trusted_cert(&CertificateDer::from(a.der.as_slice()))
                .ok()
                .map(|t| t.to_owned())
        })
        .collect();
    let intermediates: Vec<CertificateDer<'_>> = chain[1..]
        .iter()
        .map(|d| CertificateDer::from(d.as_slice()))
        .collect();
    // CRLs without an issuingDistributionPoint (all that m2mpki issues) are checked here after
    // path building, against a parsed copy cached by digest: webpki would check the signature
    // over the whole CRL and scan its entries linearly at every verification (270 ms per
    // handshake for a CRL of a million entries, measured in docs/benchmarks.md). Any CRL with
    // a distribution-point scope, or one x509-parser cannot read, leaves the whole check to
    // webpki as before.
    let prepared: Option<Vec<Arc<PreparedCrl>>> = set.crls.iter().map(prepare_crl).collect();
    let prepared = prepared.filter(|p| p.iter().all(|c| !c.scoped));
    let crls: Vec<CertRevocationList<'_>> = if prepared.is_some() {
        Vec::new()
    } else {
        set.crls
            .iter()
            .filter_map(|c| {
                BorrowedCertRevocationList::from_der(&c.der)
                    .ok()
                    .map(Into::into)
            })
            .collect()
    };
    let crl_refs: Vec<&CertRevocationList<'_>> = crls.iter().collect();
    let revocation = RevocationOptionsBuilder::new(&crl_refs).ok().map(|b| {
        b.with_depth(RevocationCheckDepth::Chain)
            .with_status_policy(UnknownStatusPolicy::Allow)
            .with_expiration_policy(ExpirationPolicy::Ignore)
            .build()
    });
    let leaf_cert = CertificateDer::from(leaf_der.as_slice());
    let ee = webpki::EndEntityCert::try_from(&leaf_cert)
        .map_err(|e| Refusal::Unusable(format!("{e:?}")))?;
    let now = unix(at);
    let usage = match purpose {
        Purpose::Client => KeyUsage::client_auth(),
        Purpose::Server => KeyUsage::server_auth(),
    };
    let leaf_not_after = leaf.validity().not_after.timestamp();
    let leaf_not_before = leaf.validity().not_before.timestamp();
    let path = ee
        .verify_for_usage(
            webpki::ALL_VERIFICATION_ALGS,
            &anchors,
            &intermediates,
            now,
            usage,
            revocation,
            None,
        )
        .map_err(|e| {
            use webpki::Error as W;
            match e {
                W::UnknownIssuer => Refusal::UnknownRoot,
                W::CertExpired { not_after, .. } => {
                    if leaf_not_after < at.unix_timestamp() {
                        Refusal::Expired(when(not_after))
                    } else {
                        Refusal::IntermediateExpired(when(not_after))
                    }
                }
                W::CertNotValidYet { not_before, .. } => {
                    if leaf_not_before > at.unix_timestamp() {
                        Refusal::NotYetValid(when(not_before))
                    } else {
                        Refusal::IntermediateNotYetValid(when(not_before))
                    }
                }
                W::RequiredEkuNotFoundContext(_) => {
                    Refusal::WrongPurpose(purpose)
                }
                W::CertRevoked => Refusal::Revoked,
                W::NameConstraintViolation => Refusal::NameConstraints(
                    if chain_has_uri_constraints(chain, set) {
                        " (a CA carries URI name constraints, which rustls-webpki does not support and always refuses)".into()
                    } else {
                        String::new()
                    },
                ),
                W::CaUsedAsEndEntity => Refusal::CaAsLeaf,
                W::PathLenConstraintViolated => Refusal::PathTooLong,
                W::InvalidSignatureForPublicKey | W::InvalidCrlSignatureForPublicKey => {
                    Refusal::BadSignature
                }
                other => Refusal::Unusable(format!("{other:?}")),
            }
        })?;
    if let Some(prepared) = &prepared {
        check_prepared_crls(prepared, set, &leaf, &path)?;
    }
    if let (Purpose::Server, Some(name)) = (purpose, name) {
        let server_name = ServerName::try_from(name.as_str())
            .map_err(|_| Refusal::NameMismatch(name.to_string()))?;
        ee.verify_is_valid_for_subject_name(&server_name)
            .map_err(|_| Refusal::NameMismatch(name.to_string()))?;
    }
    let anchor_spki = path.anchor().subject_public_key_info.as_ref().to_vec();
    let anchor = set
        .anchors
        .iter()
        .find(|a| {
            webpki::anchor_from_trusted_cert(&CertificateDer::from(a.der.as_slice()))
                .is_ok_and(|t| t.subject_public_key_info.as_ref() == anchor_spki.as_slice())
        })
        .map(|a| a.sha256.clone())
        .unwrap_or_default();

    let identity = match &set.kind {
        RootSetKind::Infrastructure => FieldNodeIdentity::from_certificate(&leaf).ok(),
        kind => {
            let id = FieldNodeIdentity::from_certificate(&leaf)
                .map_err(|e| Refusal::NoIdentity(e.to_string()))?;
            match (kind, &id) {
                (RootSetKind::Device { .. }, FieldNodeIdentity::Device { .. }) => {}
                (
                    RootSetKind::Node { enterprise },
                    FieldNodeIdentity::Node { enterprise: e, .. },
                ) => {
                    if !e.is_within(enterprise.as_str()) {
                        return Err(Refusal::IdentityOutsideSet(format!(
                            "{id} belongs to enterprise `{e}`, but set `{}` admits enterprise `{enterprise}` only",
                            set.name
                        )));
                    }
                }
                _ => {
                    return Err(Refusal::IdentityOutsideSet(format!(
                        "{id} is not a {} identity, as set `{}` requires",
                        kind.as_str(),
                        set.name
                    )))
                }
            }
            Some(id)
        }
    };
    Ok(Verified {
        set: set.name.clone(),
        kind: set.kind.clone(),
        identity,
        subject: leaf.subject().to_string(),
        serial: hex::encode(leaf.raw_serial()),
        sha256: hex::encode(sha256(leaf_der)),
        anchor,
    })
}

/// A CRL ready for lookups: parsed once, its revoked serials in a set, its signature checked
/// once per issuer key.
struct PreparedCrl {
    /// What checking its signature against an issuer key takes.
    signature: CrlSignature,
    /// Its issuer, as the raw DER Name.
    issuer: Vec<u8>,
    /// Whether it carries an issuingDistributionPoint (its scope is then left to webpki).
    scoped: bool,
    /// Raw serials (INTEGER contents) of the revoked certificates.
    revoked: HashSet<Vec<u8>>,
    /// Issuer SPKI (DER) → whether the signature verified with it.
    signature_ok: Mutex<HashMap<Vec<u8>, bool>>,
}

/// Prepares the CRLs of `set` for [`verify`]: parsed, revoked serials in a set, cached by
/// digest. [`verify`] does this itself on first use, on the caller's thread; a long-running
/// verifier (the IN) calls this when it loads a set, so that no handshake pays it (seconds
/// for a CRL of a million entries). Returns how many CRLs are prepared.
pub fn prepare_crls(set: &RootSet) -> usize {
    set.crls
        .iter()
        .filter(|crl| prepare_crl(crl).is_some())
        .count()
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

/// The prepared form of `crl`, from a process-wide cache keyed by its digest and length.
fn prepare_crl(crl: &crate::rootset::CrlRecord) -> Option<Arc<PreparedCrl>> {
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
    let scoped = parsed
        .extensions()
        .iter()
        .any(|e| e.oid == x509_parser::oid_registry::OID_X509_EXT_ISSUER_DISTRIBUTION_POINT);
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
        scoped,
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
    /// Whether the CRL's signature verifies with `issuer_spki` (DER), checked once per key.
    fn signed_by(&self, issuer_spki: &[u8]) -> bool {
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

/// Revocation over the verified path, as webpki does it with `RevocationCheckDepth::Chain`,
/// `UnknownStatusPolicy::Allow` and `ExpirationPolicy::Ignore`: for each certificate below the
/// anchor, a CRL from its issuer (by name) must be signed by the issuer's key, the issuer must
/// not deny cRLSign, and the certificate's serial must not be listed.
fn check_prepared_crls(
    crls: &[Arc<PreparedCrl>],
    set: &RootSet,
    leaf: &X509Certificate<'_>,
    path: &webpki::VerifiedPath<'_>,
) -> std::result::Result<(), Refusal> {
    if crls.is_empty() {
        return Ok(());
    }
    // The path from the leaf up: each certificate (DER) and, after it, its issuer's.
    let mut certs: Vec<Vec<u8>> = vec![leaf.as_raw().to_vec()];
    for c in path.intermediate_certificates() {
        certs.push(c.der().as_ref().to_vec());
    }
    let anchor_spki = path.anchor().subject_public_key_info.as_ref();
    let anchor_cert = set.anchors.iter().find_map(|a| {
        let der = CertificateDer::from(a.der.as_slice());
        let t = webpki::anchor_from_trusted_cert(&der).ok()?;
        (t.subject_public_key_info.as_ref() == anchor_spki).then(|| a.der.clone())
    });
    for (i, der) in certs.iter().enumerate() {
        let (_, cert) = X509Certificate::from_der(der)
            .map_err(|e| Refusal::Unusable(format!("malformed certificate in the path ({e})")))?;
        let issuer_name = cert.issuer().as_raw();
        let Some(crl) = crls.iter().find(|c| c.issuer == issuer_name) else {
            continue; // no CRL from this issuer: status unknown, allowed
        };
        let issuer_der = match certs.get(i + 1) {
            Some(d) => d.clone(),
            None => anchor_cert.clone().ok_or_else(|| {
                Refusal::Unusable("the path's trust anchor is not in the set".into())
            })?,
        };
        let (_, issuer) = X509Certificate::from_der(&issuer_der)
            .map_err(|e| Refusal::Unusable(format!("malformed issuer certificate ({e})")))?;
        if !crl.signed_by(issuer.public_key().raw) {
            return Err(Refusal::BadSignature);
        }
        if let Ok(Some(ku)) = issuer.key_usage() {
            if !ku.value.crl_sign() {
                return Err(Refusal::Unusable(
                    "a CRL's issuer does not have the cRLSign key usage".into(),
                ));
            }
        }
        if crl.revoked.contains(cert.raw_serial()) {
            return Err(Refusal::Revoked);
        }
    }
    Ok(())
}

/// Reads a chain file (PEM bundle, leaf first; or one DER certificate).
///
/// Every certificate must parse, with nothing after it: a malformed file is bad input (naming
/// the file and which certificate), not a chain to refuse.
pub fn read_chain(path: &std::path::Path) -> Result<Vec<Vec<u8>>> {
    let ders = crate::input::read_der_objects(path, &["CERTIFICATE"])?;
    for (i, der) in ders.iter().enumerate() {
        let bad = |reason: String| Error::BadFile {
            path: path.to_owned(),
            reason: format!("certificate {} of {}: {reason}", i + 1, ders.len()),
        };
        match X509Certificate::from_der(der) {
            Ok(([], _)) => {}
            Ok(_) => return Err(bad("trailing bytes after the certificate".into())),
            Err(e) => return Err(bad(format!("malformed certificate ({e})"))),
        }
    }
    Ok(ders)
}

impl From<Refusal> for Error {
    fn from(r: Refusal) -> Self {
        Error::NotTrusted(r)
    }
}

#[cfg(test)]
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
}
