//! Verifying a certificate chain against a root set: rustls-webpki path building (the same
//! verifier the bootstrap server uses) plus the field-node identity checks of m2mpki.

use std::sync::Arc;
use std::time::Duration;

use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use serde::Serialize;
use time::OffsetDateTime;
use webpki::KeyUsage;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::crl_status::{self, prepare_crl, PreparedCrl};
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

/// How the leaf's extendedKeyUsage is judged.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EkuPolicy {
    /// The leaf must carry an EKU that allows the purpose (m2mpki's rule, everywhere it
    /// verifies).
    Required,
    /// RFC 5280's rule: an EKU that is present must allow the purpose; none at all is fine.
    /// For conformance suites such as NIST PKITS, whose end-entity certificates carry none.
    IfPresent,
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
    /// The trust anchor the path ends at is expired (or not valid yet) at the verification
    /// time.
    #[error("the root the chain leads to is not valid at this time: {0}")]
    AnchorExpired(String),
    /// A CA of the path lacks keyCertSign in its keyUsage, so it may not issue certificates.
    #[error("{0}")]
    CaKeyUsage(String),
    /// The set requires a revocation status and no CRL of the set covers a certificate of the
    /// chain.
    #[error("revocation status unknown: {0}")]
    RevocationUnknown(String),
    /// The set requires a revocation status and the only CRL that covers a certificate of the
    /// chain is past its nextUpdate.
    #[error("revocation status unknown: {0}")]
    CrlExpired(String),
    /// A certificate of the chain uses a key or signature algorithm the verifier's policy does
    /// not allow (an IN admits P-256 with SHA-256 by default, as TS-0003 asks).
    #[error("{0}")]
    Algorithm(String),
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
            Refusal::AnchorExpired(_) => "anchor_expired",
            Refusal::CaKeyUsage(_) => "ca_key_usage",
            Refusal::RevocationUnknown(_) => "revocation_unknown",
            Refusal::CrlExpired(_) => "crl_expired",
            Refusal::Algorithm(_) => "algorithm_not_allowed",
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

/// A readable refusal for a signature algorithm rustls-webpki does not verify; `id` is the DER
/// inside its AlgorithmIdentifier (the OID's TLV, then any parameters).
pub(crate) fn unsupported_algorithm(id: &[u8]) -> String {
    let oid = match id {
        [0x06, len, rest @ ..] if usize::from(*len) <= rest.len() => {
            x509_parser::der_parser::oid::Oid::new(std::borrow::Cow::Borrowed(
                &rest[..usize::from(*len)],
            ))
            .to_id_string()
        }
        _ => String::new(),
    };
    let name = match oid.as_str() {
        "1.2.840.10040.4.3" | "2.16.840.1.101.3.4.3.1" | "2.16.840.1.101.3.4.3.2" => "DSA",
        "1.2.840.113549.1.1.4" => "RSA with MD5",
        "1.2.840.113549.1.1.5" => "RSA with SHA-1",
        "1.2.840.10045.4.1" => "ECDSA with SHA-1",
        "" => "a signature algorithm",
        _ => "",
    };
    let what = if name.is_empty() {
        format!("the signature algorithm {oid}")
    } else if oid.is_empty() {
        name.to_owned()
    } else {
        format!("{name} ({oid})")
    };
    format!(
        "{what} in the chain is not supported: m2mpki verifies ECDSA (P-256, P-384) with SHA-256/384, Ed25519, and RSA with SHA-256/384/512"
    )
}

/// Which path validation a verification uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Validator {
    /// rustls-webpki (the default), and m2mpki's own for chains under CAs whose name
    /// constraints webpki refuses by design (URI, directoryName, rfc822Name).
    Auto,
    /// m2mpki's own for every chain (conformance suites run both).
    Own,
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
    let name = name
        .map(|n| ServerName::try_from(n.as_str()).map_err(|_| Refusal::NameMismatch(n.to_string())))
        .transpose()?;
    verify_with(set, chain, purpose, name.as_ref(), at, EkuPolicy::Required)
}

/// [`verify_using`] with [`Validator::Auto`].
pub fn verify_with(
    set: &RootSet,
    chain: &[Vec<u8>],
    purpose: Purpose,
    name: Option<&ServerName<'_>>,
    at: OffsetDateTime,
    eku: EkuPolicy,
) -> std::result::Result<Verified, Refusal> {
    verify_using(set, chain, purpose, name, at, eku, Validator::Auto)
}

/// [`verify`] with a choice of how the leaf's EKU is judged and of the path validation, for a
/// server name that is a DNS name or an IP address (matched against iPAddress
/// subjectAltNames).
pub fn verify_using(
    set: &RootSet,
    chain: &[Vec<u8>],
    purpose: Purpose,
    name: Option<&ServerName<'_>>,
    at: OffsetDateTime,
    eku: EkuPolicy,
    validator: Validator,
) -> std::result::Result<Verified, Refusal> {
    let leaf_der = chain
        .first()
        .ok_or_else(|| Refusal::Unusable("the chain is empty".into()))?;
    let (_, leaf) = X509Certificate::from_der(leaf_der)
        .map_err(|e| Refusal::Unusable(format!("malformed leaf certificate ({e})")))?;
    // Strict DER for every certificate presented (the bootstrap hands chains straight here).
    for (i, der) in chain.iter().enumerate() {
        let strict = match X509Certificate::from_der(der) {
            Ok(([], cert)) => crate::der::check_certificate(der, &cert),
            Ok(_) => Err("trailing bytes".into()),
            Err(e) => Err(e.to_string()),
        };
        strict.map_err(|e| {
            Refusal::Unusable(format!(
                "certificate {} of the chain is malformed ({e})",
                i + 1
            ))
        })?;
    }
    // Revocation is checked after path building, by crl_status (fail-closed, scoped CRLs,
    // freshness), against parsed copies cached by digest: webpki would check the signature over
    // the whole CRL and scan its entries at every verification (270 ms per handshake for a CRL
    // of a million entries, measured in docs/benchmarks.md), and it cannot require a status.
    let prepared: Vec<Arc<PreparedCrl>> = set.crls.iter().filter_map(prepare_crl).collect();
    let leaf_cert = CertificateDer::from(leaf_der.as_slice());
    let ee = webpki::EndEntityCert::try_from(&leaf_cert)
        .map_err(|e| Refusal::Unusable(format!("{e:?}")))?;
    let own = validator == Validator::Own
        || chain[1..]
            .iter()
            .chain(set.anchors.iter().map(|a| &a.der))
            .any(|d| crate::path::has_constraints_webpki_refuses(d));
    let (path_ders, anchor_index) = if own {
        let anchor_ders: Vec<&[u8]> = set.anchors.iter().map(|a| a.der.as_slice()).collect();
        let v = crate::path::validate(
            leaf_der,
            &chain[1..],
            &anchor_ders,
            at.unix_timestamp(),
            purpose,
        )?;
        (v.ders, v.anchor)
    } else {
        webpki_path(set, chain, &leaf, &ee, purpose, at)?
    };
    let anchor_record = &set.anchors[anchor_index];
    // rustls-webpki accepts a leaf without extendedKeyUsage; m2mpki requires the purpose.
    let eku_ok = match leaf.extended_key_usage() {
        Ok(Some(eku)) => match purpose {
            Purpose::Client => eku.value.client_auth,
            Purpose::Server => eku.value.server_auth,
        },
        _ => false,
    };
    // (With IfPresent, rustls-webpki has already refused an EKU without the purpose.)
    if !eku_ok && eku == EkuPolicy::Required {
        return Err(Refusal::WrongPurpose(purpose));
    }
    let t = at.unix_timestamp();
    if t > anchor_record.not_after || t < anchor_record.not_before {
        let (what, when_) = if t > anchor_record.not_after {
            ("expired at", anchor_record.not_after)
        } else {
            ("not valid before", anchor_record.not_before)
        };
        return Err(Refusal::AnchorExpired(format!(
            "`{}` {what} {}",
            anchor_record.subject,
            OffsetDateTime::from_unix_timestamp(when_)
                .map_or_else(|_| when_.to_string(), crate::validity::format_time)
        )));
    }
    // rustls-webpki does not look at the keyUsage of issuing CAs.
    for der in &path_ders[1..] {
        let (_, ca) = X509Certificate::from_der(der)
            .map_err(|e| Refusal::Unusable(format!("malformed CA certificate ({e})")))?;
        match ca.key_usage() {
            Ok(Some(ku)) if !ku.value.key_cert_sign() => {
                return Err(Refusal::CaKeyUsage(format!(
                    "the CA `{}` lacks keyCertSign in its keyUsage and may not issue certificates",
                    ca.subject()
                )))
            }
            Ok(_) => {}
            // Unreadable (or repeated) keyUsage: what it allows cannot be known.
            Err(e) => {
                return Err(Refusal::CaKeyUsage(format!(
                    "the keyUsage of the CA `{}` cannot be read ({e})",
                    ca.subject()
                )))
            }
        }
    }
    if let (Purpose::Server, Some(name)) = (purpose, name) {
        let shown = match name {
            ServerName::DnsName(d) => d.as_ref().to_owned(),
            ServerName::IpAddress(ip) => std::net::IpAddr::from(*ip).to_string(),
            other => format!("{other:?}"),
        };
        ee.verify_is_valid_for_subject_name(name)
            .map_err(|_| Refusal::NameMismatch(shown))?;
    }
    let anchor = anchor_record.sha256.clone();

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
    // Last: the most specific reasons above are reported first.
    crl_status::check_path(&prepared, &set.revocation, &path_ders, t)?;
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

/// rustls-webpki's path from the leaf to an anchor of `set`: the DER certificates from the leaf
/// up, ending with the anchor's, and the anchor's index in the set.
fn webpki_path(
    set: &RootSet,
    chain: &[Vec<u8>],
    leaf: &X509Certificate<'_>,
    ee: &webpki::EndEntityCert<'_>,
    purpose: Purpose,
    at: OffsetDateTime,
) -> std::result::Result<(Vec<Vec<u8>>, usize), Refusal> {
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
            None,
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
                W::RequiredEkuNotFoundContext(_) => Refusal::WrongPurpose(purpose),
                W::CertRevoked => Refusal::Revoked,
                W::NameConstraintViolation => Refusal::NameConstraints(String::new()),
                W::CaUsedAsEndEntity => Refusal::CaAsLeaf,
                W::PathLenConstraintViolated => Refusal::PathTooLong,
                W::InvalidSignatureForPublicKey | W::InvalidCrlSignatureForPublicKey => {
                    Refusal::BadSignature
                }
                W::UnsupportedSignatureAlgorithmContext(c) => {
                    Refusal::Unusable(unsupported_algorithm(&c.signature_algorithm_id))
                }
                W::UnsupportedSignatureAlgorithmForPublicKeyContext(c) => {
                    Refusal::Unusable(unsupported_algorithm(&c.signature_algorithm_id))
                }
                other => Refusal::Unusable(format!("{other:?}")),
            }
        })?;
    // The path from the leaf up, ending at the anchor's certificate.
    let anchor_spki = path.anchor().subject_public_key_info.as_ref().to_vec();
    let anchor_index = set
        .anchors
        .iter()
        .position(|a| {
            webpki::anchor_from_trusted_cert(&CertificateDer::from(a.der.as_slice()))
                .is_ok_and(|t| t.subject_public_key_info.as_ref() == anchor_spki.as_slice())
        })
        .ok_or_else(|| Refusal::Unusable("the path's trust anchor is not in the set".into()))?;
    let mut path_ders: Vec<Vec<u8>> = vec![chain[0].clone()];
    path_ders.extend(
        path.intermediate_certificates()
            .map(|c| c.der().as_ref().to_vec()),
    );
    path_ders.push(set.anchors[anchor_index].der.clone());
    Ok((path_ders, anchor_index))
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
            Ok(([], cert)) => crate::der::check_certificate(der, &cert)
                .map_err(|e| bad(format!("malformed certificate ({e})")))?,
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
