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
use crate::refusal::unsupported_algorithm;
pub use crate::refusal::{Purpose, Refusal};
use crate::rootset::{RootSet, RootSetKind};
use crate::{Error, Result};

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
///
/// This prepares `set` for the one call; a verifier that checks many chains against the same
/// sets prepares them once, as a [`TrustedSet`].
pub fn verify_using(
    set: &RootSet,
    chain: &[Vec<u8>],
    purpose: Purpose,
    name: Option<&ServerName<'_>>,
    at: OffsetDateTime,
    eku: EkuPolicy,
    validator: Validator,
) -> std::result::Result<Verified, Refusal> {
    let chain = Chain::check(chain)?;
    let ready = Ready::of(set);
    let check = Check {
        purpose,
        name,
        at,
        eku,
        validator,
    };
    verify_ready(set, &ready, &chain, &check)
}

/// What a chain is verified for, and how: the arguments of [`verify_using`] after the set and
/// the chain, for [`TrustedSet::verify`].
#[derive(Clone, Copy, Debug)]
pub struct Check<'n> {
    /// What the leaf must be good for.
    pub purpose: Purpose,
    /// For a server certificate, the name (DNS or IP) it must be valid for.
    pub name: Option<&'n ServerName<'n>>,
    /// The verification time.
    pub at: OffsetDateTime,
    /// How the leaf's EKU is judged.
    pub eku: EkuPolicy,
    /// Which path validation runs.
    pub validator: Validator,
}

impl Check<'_> {
    /// A field node's client certificate at `at`, as the IN checks it: EKU required, the
    /// default path validation.
    pub fn client(at: OffsetDateTime) -> Self {
        Check {
            purpose: Purpose::Client,
            name: None,
            at,
            eku: EkuPolicy::Required,
            validator: Validator::Auto,
        }
    }
}

/// A chain whose certificates all parsed as strict DER, leaf first: checked once, then
/// verified against any number of sets.
pub struct Chain<'a> {
    ders: &'a [Vec<u8>],
    certs: Vec<X509Certificate<'a>>,
}

impl<'a> Chain<'a> {
    /// Parses every certificate of `ders` (leaf first, then intermediates), refusing an empty
    /// chain, a malformed certificate or bytes after one (the bootstrap hands chains from the
    /// wire straight here).
    pub fn check(ders: &'a [Vec<u8>]) -> std::result::Result<Self, Refusal> {
        let leaf_der = ders
            .first()
            .ok_or_else(|| Refusal::Unusable("the chain is empty".into()))?;
        X509Certificate::from_der(leaf_der)
            .map_err(|e| Refusal::Unusable(format!("malformed leaf certificate ({e})")))?;
        let certs = ders
            .iter()
            .enumerate()
            .map(|(i, der)| {
                let strict = match X509Certificate::from_der(der) {
                    Ok(([], cert)) => crate::der::check_certificate(der, &cert).map(|()| cert),
                    Ok(_) => Err("trailing bytes".into()),
                    Err(e) => Err(e.to_string()),
                };
                strict.map_err(|e| {
                    Refusal::Unusable(format!(
                        "certificate {} of the chain is malformed ({e})",
                        i + 1
                    ))
                })
            })
            .collect::<std::result::Result<Vec<_>, _>>()?;
        Ok(Chain { ders, certs })
    }

    /// The certificates, parsed, leaf first.
    pub fn certificates(&self) -> &[X509Certificate<'a>] {
        &self.certs
    }

    /// The certificates' DER, leaf first.
    pub fn ders(&self) -> &'a [Vec<u8>] {
        self.ders
    }

    fn leaf(&self) -> &X509Certificate<'a> {
        &self.certs[0]
    }
}

/// A root set made ready for verification once, when it is loaded: webpki's trust anchors,
/// whether an anchor needs m2mpki's own path validation, the anchors' keyUsage verdicts and
/// the set's CRLs parsed. A long-running verifier (the IN) holds these instead of the sets, so
/// that no handshake re-parses an anchor or a CRL.
pub struct TrustedSet {
    set: RootSet,
    ready: Ready,
}

impl std::fmt::Debug for TrustedSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrustedSet")
            .field("set", &self.set.name)
            .field("anchors", &self.set.anchors.len())
            .field("crls", &self.ready.crls.len())
            .finish_non_exhaustive()
    }
}

impl TrustedSet {
    /// Prepares `set` (parsing its CRLs takes seconds for a CRL of a million entries: call this
    /// off any latency-sensitive thread).
    pub fn new(set: RootSet) -> Self {
        let ready = Ready::of(&set);
        TrustedSet { set, ready }
    }

    /// The set.
    pub fn set(&self) -> &RootSet {
        &self.set
    }

    /// [`verify_using`] against this set, for a chain checked once.
    pub fn verify(
        &self,
        chain: &Chain<'_>,
        check: &Check<'_>,
    ) -> std::result::Result<Verified, Refusal> {
        verify_ready(&self.set, &self.ready, chain, check)
    }
}

/// What verification derives from a set's anchors and CRLs.
struct Ready {
    /// webpki's anchors (those it can read)...
    anchors: Vec<rustls_pki_types::TrustAnchor<'static>>,
    /// ...and the index in the set of each.
    anchor_of: Vec<usize>,
    /// An anchor carries name constraints webpki refuses: m2mpki's own path validation runs.
    own: bool,
    /// Each anchor's keyUsage verdict, by its index in the set.
    key_usage: Vec<std::result::Result<(), Refusal>>,
    /// The set's CRLs that parse (from the process-wide cache).
    crls: Vec<Arc<PreparedCrl>>,
}

impl Ready {
    fn of(set: &RootSet) -> Self {
        let (anchors, anchor_of) = set
            .anchors
            .iter()
            .enumerate()
            .filter_map(|(i, a)| {
                webpki::anchor_from_trusted_cert(&CertificateDer::from(a.der.as_slice()))
                    .ok()
                    .map(|t| (t.to_owned(), i))
            })
            .unzip();
        let mut own = false;
        let key_usage = set
            .anchors
            .iter()
            .map(|a| {
                let (_, ca) = X509Certificate::from_der(&a.der)
                    .map_err(|e| Refusal::Unusable(format!("malformed CA certificate ({e})")))?;
                own |= crate::path::constraints_webpki_refuses(&ca);
                ca_key_usage(&ca)
            })
            .collect();
        Ready {
            anchors,
            anchor_of,
            own,
            key_usage,
            crls: set.crls.iter().filter_map(prepare_crl).collect(),
        }
    }
}

/// A CA of the path must be allowed to sign certificates (rustls-webpki does not look at the
/// keyUsage of issuing CAs).
fn ca_key_usage(ca: &X509Certificate<'_>) -> std::result::Result<(), Refusal> {
    match ca.key_usage() {
        Ok(Some(ku)) if !ku.value.key_cert_sign() => Err(Refusal::CaKeyUsage(format!(
            "the CA `{}` lacks keyCertSign in its keyUsage and may not issue certificates",
            ca.subject()
        ))),
        Ok(_) => Ok(()),
        // Unreadable (or repeated) keyUsage: what it allows cannot be known.
        Err(e) => Err(Refusal::CaKeyUsage(format!(
            "the keyUsage of the CA `{}` cannot be read ({e})",
            ca.subject()
        ))),
    }
}

fn verify_ready(
    set: &RootSet,
    ready: &Ready,
    chain: &Chain<'_>,
    check: &Check<'_>,
) -> std::result::Result<Verified, Refusal> {
    let Check {
        purpose,
        name,
        at,
        eku,
        validator,
    } = *check;
    let ders = chain.ders;
    let leaf_der = &ders[0];
    let leaf = chain.leaf();
    // Revocation is checked after path building, by crl_status (fail-closed, scoped CRLs,
    // freshness), against parsed copies cached by digest: webpki would check the signature over
    // the whole CRL and scan its entries at every verification (270 ms per handshake for a CRL
    // of a million entries, measured in docs/benchmarks.md), and it cannot require a status.
    let leaf_cert = CertificateDer::from(leaf_der.as_slice());
    let ee = webpki::EndEntityCert::try_from(&leaf_cert)
        .map_err(|e| Refusal::Unusable(format!("{e:?}")))?;
    let own = validator == Validator::Own
        || ready.own
        || chain.certs[1..]
            .iter()
            .any(crate::path::constraints_webpki_refuses);
    let (path_ders, anchor_index) = if own {
        let anchor_ders: Vec<&[u8]> = set.anchors.iter().map(|a| a.der.as_slice()).collect();
        let v = crate::path::validate(
            leaf_der,
            &ders[1..],
            &anchor_ders,
            at.unix_timestamp(),
            purpose,
        )?;
        (v.ders, v.anchor)
    } else {
        webpki_path(set, ready, ders, leaf, &ee, purpose, at)?
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
    anchor_valid_at(anchor_record, t)?;
    // The path parsed: the leaf and the chain's CAs once (by Chain::check), the anchor here.
    // Then the issuing CAs' keyUsage: the chain's, and the anchor's verdict from the load.
    let (_, anchor_cert) = X509Certificate::from_der(&anchor_record.der)
        .map_err(|e| Refusal::Unusable(format!("malformed CA certificate ({e})")))?;
    let mut parsed_here = Vec::new();
    // Between the leaf and the anchor (both validations return at least those two).
    let cas = path_ders
        .get(1..path_ders.len().saturating_sub(1))
        .unwrap_or_default();
    for der in cas {
        if !chain.certs[1..]
            .iter()
            .any(|c| c.as_raw() == der.as_slice())
        {
            let (_, ca) = X509Certificate::from_der(der)
                .map_err(|e| Refusal::Unusable(format!("malformed CA certificate ({e})")))?;
            parsed_here.push(ca);
        }
    }
    let mut path: Vec<&X509Certificate<'_>> = Vec::with_capacity(path_ders.len());
    path.push(leaf);
    for der in cas {
        let ca = chain.certs[1..]
            .iter()
            .chain(&parsed_here)
            .find(|c| c.as_raw() == der.as_slice())
            .ok_or_else(|| Refusal::Unusable("a CA of the path was lost".into()))?;
        ca_key_usage(ca)?;
        path.push(ca);
    }
    ready
        .key_usage
        .get(anchor_index)
        .ok_or_else(|| Refusal::Unusable("the path's trust anchor is not in the set".into()))?
        .clone()?;
    path.push(&anchor_cert);
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

    let identity = identity_admitted(set, leaf)?;
    // Last: the most specific reasons above are reported first.
    crl_status::check_path(&ready.crls, &set.revocation, &path, t)?;
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

/// The field-node identity of `leaf`, as `set` admits it: device and node sets require one of
/// their kind (a node set only of its enterprise or its subdomains); infrastructure sets take
/// whatever is there.
fn identity_admitted(
    set: &RootSet,
    leaf: &X509Certificate<'_>,
) -> std::result::Result<Option<FieldNodeIdentity>, Refusal> {
    Ok(match &set.kind {
        RootSetKind::Infrastructure => FieldNodeIdentity::from_certificate(leaf).ok(),
        kind => {
            let id = FieldNodeIdentity::from_certificate(leaf)
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
    })
}

/// The anchor a path ends at must be valid at the verification time `t` (Unix).
fn anchor_valid_at(
    anchor_record: &crate::rootset::Anchor,
    t: i64,
) -> std::result::Result<(), Refusal> {
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
    Ok(())
}

/// rustls-webpki's path from the leaf to an anchor of `set`: the DER certificates from the leaf
/// up, ending with the anchor's, and the anchor's index in the set.
fn webpki_path(
    set: &RootSet,
    ready: &Ready,
    chain: &[Vec<u8>],
    leaf: &X509Certificate<'_>,
    ee: &webpki::EndEntityCert<'_>,
    purpose: Purpose,
    at: OffsetDateTime,
) -> std::result::Result<(Vec<Vec<u8>>, usize), Refusal> {
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
            &ready.anchors,
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
    // The path from the leaf up, ending at the anchor's certificate: the first anchor of the
    // set with the path's anchor key.
    let anchor_spki = path.anchor().subject_public_key_info.as_ref();
    let anchor_index = ready
        .anchors
        .iter()
        .position(|t| t.subject_public_key_info.as_ref() == anchor_spki)
        .map(|i| ready.anchor_of[i])
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
