//! Why a chain is refused, and what it was to be good for: the verdict types that path
//! validation, revocation checking and the error type share (no file of the verifier imports
//! another's types back).

use serde::Serialize;

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
