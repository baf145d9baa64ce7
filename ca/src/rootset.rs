//! Agreed root sets: the trust anchors (and CRLs) each side of the bootstrap verifies against.
//!
//! A set has a kind: `device` roots are agreed per vertical, `node` roots per enterprise, and
//! `infrastructure` roots are the IN roots field nodes trust.

use std::fmt;

use serde::{Deserialize, Serialize};
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::identity::DnsName;
use crate::input::sha256;
use crate::{Error, Result};

/// What a root set is for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum RootSetKind {
    /// Roots of Manufacturer-Issued Device Certificates, agreed for a vertical.
    Device {
        /// The vertical (e.g. `smart-metering`).
        vertical: String,
    },
    /// Roots of Enterprise-Issued Node Certificates of one enterprise.
    Node {
        /// The enterprise's domain.
        enterprise: DnsName,
    },
    /// Roots of Infrastructure Node server certificates.
    Infrastructure,
}

impl RootSetKind {
    /// Short name: device, node or infrastructure.
    pub fn as_str(&self) -> &'static str {
        match self {
            RootSetKind::Device { .. } => "device",
            RootSetKind::Node { .. } => "node",
            RootSetKind::Infrastructure => "infrastructure",
        }
    }
}

impl fmt::Display for RootSetKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RootSetKind::Device { vertical } => write!(f, "device (vertical {vertical})"),
            RootSetKind::Node { enterprise } => write!(f, "node (enterprise {enterprise})"),
            RootSetKind::Infrastructure => f.write_str("infrastructure"),
        }
    }
}

/// What a set does with a certificate whose revocation status no current CRL of the set
/// establishes (see [`RevocationPolicy`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RevocationMode {
    /// Every certificate of a chain below the anchor needs its status from a current CRL of the
    /// set; otherwise the chain is refused (`revocation_unknown`, `crl_expired`).
    #[default]
    Require,
    /// Unknown status is accepted; a certificate a CRL of the set lists is still refused.
    BestEffort,
}

impl RevocationMode {
    /// `require` or `best-effort`.
    pub fn as_str(self) -> &'static str {
        match self {
            RevocationMode::Require => "require",
            RevocationMode::BestEffort => "best-effort",
        }
    }
}

impl std::str::FromStr for RevocationMode {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "require" => Ok(RevocationMode::Require),
            "best-effort" => Ok(RevocationMode::BestEffort),
            _ => Err(Error::invalid(
                "revocation mode",
                s,
                "expected `require` or `best-effort`",
            )),
        }
    }
}

/// How a set judges revocation. Sets made before policies existed read as the default:
/// `require`, no grace.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevocationPolicy {
    /// Require a status, or accept unknown ones.
    pub mode: RevocationMode,
    /// Seconds past a CRL's nextUpdate during which it still counts as current.
    #[serde(default)]
    pub crl_grace: u64,
}

impl fmt::Display for RevocationPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.mode.as_str())?;
        if self.crl_grace > 0 {
            write!(f, " (CRL grace {}s)", self.crl_grace)?;
        }
        Ok(())
    }
}

/// A trust anchor of a set.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Anchor {
    /// Subject DN as text.
    pub subject: String,
    /// SHA-256 of the certificate (hex): its name in commands.
    pub sha256: String,
    /// notBefore (Unix time).
    pub not_before: i64,
    /// notAfter (Unix time).
    pub not_after: i64,
    /// Key algorithm (p256, p384, ed25519, rsa, ...).
    pub key_type: String,
    /// Whether it is self-signed (a true root).
    pub self_signed: bool,
    /// The certificate.
    #[serde(with = "crate::hex_serde::bytes")]
    pub der: Vec<u8>,
}

/// A CRL attached to a set.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CrlRecord {
    /// Issuer DN as text.
    pub issuer: String,
    /// Issuer's key identifier (hex), if the CRL carries an AKI.
    pub authority_key_id: Option<String>,
    /// CRL number, if present.
    pub number: Option<String>,
    /// thisUpdate (Unix time).
    pub this_update: i64,
    /// nextUpdate (Unix time), if present.
    pub next_update: Option<i64>,
    /// Number of entries.
    pub entries: usize,
    /// SHA-256 of the DER (hex).
    pub sha256: String,
    /// SHA-256 (hex) of the SubjectPublicKeyInfo whose key signed it, as checked when it was
    /// attached (`None` for CRLs attached before signatures were checked).
    #[serde(default)]
    pub signer: Option<String>,
    /// SHA-256 (hex) of its issuingDistributionPoint extension, `None` for a complete CRL:
    /// CRLs of one key replace each other only within one scope.
    #[serde(default)]
    pub scope: Option<String>,
    /// The CRL.
    #[serde(with = "crate::hex_serde::bytes")]
    pub der: Vec<u8>,
}

/// A named root set.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RootSet {
    /// Its name (`[A-Za-z0-9._-]`, 1 to 64).
    pub name: String,
    /// What it is for.
    #[serde(flatten)]
    pub kind: RootSetKind,
    /// Trust anchors.
    pub anchors: Vec<Anchor>,
    /// CRLs used when verifying against the set.
    #[serde(default)]
    pub crls: Vec<CrlRecord>,
    /// What unknown revocation status does to a chain.
    #[serde(default)]
    pub revocation: RevocationPolicy,
    /// When it was created (Unix time).
    pub created: i64,
}

/// Checks a set name.
pub fn check_set_name(name: &str) -> Result<()> {
    crate::identity::check_object_name("root set name", name)
}

fn key_type_name(cert: &X509Certificate<'_>) -> String {
    use x509_parser::public_key::PublicKey;
    match cert.public_key().parsed() {
        Ok(PublicKey::EC(p)) => match p.key_size() {
            256 => "p256".into(),
            384 => "p384".into(),
            n => format!("ec{n}"),
        },
        Ok(PublicKey::RSA(r)) => format!("rsa{}", r.key_size()),
        _ if cert.public_key().algorithm.algorithm.to_id_string() == "1.3.101.112" => {
            "ed25519".into()
        }
        _ => cert.public_key().algorithm.algorithm.to_id_string(),
    }
}

impl Anchor {
    /// Parses a certificate offered as an anchor; only CA certificates are accepted.
    /// `source` names where it came from, for errors.
    pub fn from_der(der: &[u8], source: &str) -> Result<Self> {
        let bad = |reason: String| Error::BadFile {
            path: source.into(),
            reason,
        };
        let (rest, cert) = X509Certificate::from_der(der)
            .map_err(|e| bad(format!("malformed certificate ({e})")))?;
        if !rest.is_empty() {
            return Err(bad("trailing bytes after the certificate".into()));
        }
        crate::der::check_certificate(der, &cert)
            .map_err(|e| bad(format!("malformed certificate ({e})")))?;
        let subject = cert.subject().to_string();
        let is_ca = cert
            .basic_constraints()
            .ok()
            .flatten()
            .is_some_and(|bc| bc.value.ca);
        if !is_ca {
            return Err(bad(format!(
                "`{subject}` is not a CA certificate (basicConstraints CA:TRUE missing); only CA certificates can be roots"
            )));
        }
        let self_signed = cert.subject() == cert.issuer() && cert.verify_signature(None).is_ok();
        Ok(Anchor {
            subject,
            sha256: hex::encode(sha256(der)),
            not_before: cert.validity().not_before.timestamp(),
            not_after: cert.validity().not_after.timestamp(),
            key_type: key_type_name(&cert),
            self_signed,
            der: der.to_vec(),
        })
    }
}

impl CrlRecord {
    /// Parses a CRL (DER). `source` names where it came from, for errors.
    pub fn from_der(der: &[u8], source: &str) -> Result<Self> {
        use x509_parser::extensions::ParsedExtension;
        let bad = |reason: String| Error::BadFile {
            path: source.into(),
            reason,
        };
        let (rest, crl) = x509_parser::revocation_list::CertificateRevocationList::from_der(der)
            .map_err(|e| bad(format!("malformed CRL ({e})")))?;
        if !rest.is_empty() {
            return Err(bad("trailing bytes after the CRL".into()));
        }
        crate::der::check_crl(der).map_err(|e| bad(format!("malformed CRL ({e})")))?;
        let mut authority_key_id = None;
        for ext in crl.extensions() {
            if let ParsedExtension::AuthorityKeyIdentifier(aki) = ext.parsed_extension() {
                authority_key_id = aki.key_identifier.as_ref().map(|k| hex::encode(k.0));
            }
        }
        let scope = crl
            .extensions()
            .iter()
            .find(|e| e.oid == x509_parser::oid_registry::OID_X509_EXT_ISSUER_DISTRIBUTION_POINT)
            .map(|e| hex::encode(sha256(e.value)));
        Ok(CrlRecord {
            scope,
            signer: None,
            issuer: crl.issuer().to_string(),
            authority_key_id,
            number: crl.crl_number().map(|n| n.to_str_radix(16)),
            this_update: crl.last_update().timestamp(),
            next_update: crl.next_update().map(|t| t.timestamp()),
            entries: crl.iter_revoked_certificates().count(),
            sha256: hex::encode(sha256(der)),
            der: der.to_vec(),
        })
    }
}

/// What adding certificates to a set did.
#[derive(Clone, Debug, Default, Serialize)]
pub struct AddReport {
    /// Fingerprints added.
    pub added: Vec<String>,
    /// Fingerprints already in the set (not added again).
    pub duplicates: Vec<String>,
    /// Subjects of anchors that are not self-signed (accepted, with a warning).
    pub not_self_signed: Vec<String>,
}

impl RootSet {
    /// Adds anchors, skipping ones already present.
    pub fn add_anchors(&mut self, anchors: Vec<Anchor>) -> AddReport {
        let mut report = AddReport::default();
        for a in anchors {
            if self.anchors.iter().any(|x| x.sha256 == a.sha256) {
                report.duplicates.push(a.sha256);
                continue;
            }
            if !a.self_signed {
                report.not_self_signed.push(a.subject.clone());
            }
            report.added.push(a.sha256.clone());
            self.anchors.push(a);
        }
        report
    }

    /// Removes the anchor whose certificate has this SHA-256 (hex).
    pub fn remove_anchor(&mut self, sha256: &str) -> Result<Anchor> {
        let i = self
            .anchors
            .iter()
            .position(|a| a.sha256 == sha256)
            .ok_or_else(|| {
                Error::invalid(
                    "fingerprint",
                    sha256,
                    format!("no anchor with it in set `{}`", self.name),
                )
            })?;
        Ok(self.anchors.remove(i))
    }

    /// Detaches the CRL with this SHA-256 (hex).
    pub fn detach_crl(&mut self, sha256: &str) -> Result<CrlRecord> {
        let i = self
            .crls
            .iter()
            .position(|c| c.sha256 == sha256)
            .ok_or_else(|| {
                Error::invalid(
                    "CRL fingerprint",
                    sha256,
                    format!("no CRL with it in set `{}`", self.name),
                )
            })?;
        Ok(self.crls.remove(i))
    }
}
