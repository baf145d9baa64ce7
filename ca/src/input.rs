//! Reading certificates and CSRs from files the user hands us (PEM or DER).

use std::path::Path;

use rcgen::PublicKeyData;
use x509_parser::prelude::FromDer;

use crate::identity::SERIAL_NUMBER_ATTR;
use crate::{Error, Result};
use m2mpki_hsm::KeyType;

/// Largest input file we read (certificates, CSRs, bundles): 16 MiB.
const MAX_INPUT: u64 = 16 << 20;

/// Reads a file that holds DER objects, as PEM blocks with one of `tags` or as one raw DER
/// object. Returns the DER of each object. Errors name the file.
pub fn read_der_objects(path: &Path, tags: &[&str]) -> Result<Vec<Vec<u8>>> {
    let bad = |reason: String| Error::BadFile {
        path: path.to_owned(),
        reason,
    };
    let meta = std::fs::metadata(path).map_err(|e| bad(e.to_string()))?;
    if meta.len() > MAX_INPUT {
        return Err(bad("larger than 16 MiB".into()));
    }
    let bytes = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
    der_objects(&bytes, tags).map_err(bad)
}

/// Splits `bytes` into DER objects: PEM blocks with one of `tags`, or one raw DER object.
pub fn der_objects(bytes: &[u8], tags: &[&str]) -> std::result::Result<Vec<Vec<u8>>, String> {
    let looks_pem = bytes
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .is_some_and(|i| bytes[i..].starts_with(b"-----BEGIN"));
    if !looks_pem {
        if bytes.first() != Some(&0x30) {
            return Err(format!(
                "neither PEM nor DER (expected {})",
                tags.join(" or ")
            ));
        }
        return Ok(vec![bytes.to_vec()]);
    }
    let blocks = pem::parse_many(bytes).map_err(|e| format!("malformed PEM: {e}"))?;
    let mut out = Vec::new();
    for block in blocks {
        if !tags.contains(&block.tag()) {
            return Err(format!(
                "unexpected PEM block `{}` (expected {})",
                block.tag(),
                tags.join(" or ")
            ));
        }
        out.push(block.into_contents());
    }
    if out.is_empty() {
        return Err(format!("no PEM block (expected {})", tags.join(" or ")));
    }
    Ok(out)
}

/// A certificate signing request whose self-signature verified.
#[derive(Debug, Clone)]
pub struct VerifiedCsr {
    /// The requested public key.
    pub public_key: rcgen::SubjectPublicKeyInfo,
    /// Its key type, when it is one we issue for.
    pub key_type: Option<KeyType>,
    /// The subject serialNumber attribute, if the CSR carries one.
    pub serial_number: Option<String>,
}

impl VerifiedCsr {
    /// Parses a CSR (PEM `CERTIFICATE REQUEST` / `NEW CERTIFICATE REQUEST` or DER) and
    /// verifies its self-signature. Only the public key and the subject serialNumber are kept:
    /// the profile decides everything else.
    pub fn from_bytes(bytes: &[u8], source: &str) -> Result<Self> {
        let bad = |reason: String| Error::BadCsr {
            source_name: source.to_owned(),
            reason,
        };
        let mut objects =
            der_objects(bytes, &["CERTIFICATE REQUEST", "NEW CERTIFICATE REQUEST"]).map_err(bad)?;
        if objects.len() != 1 {
            return Err(bad("holds more than one CSR".into()));
        }
        let der = objects.remove(0);
        let (rest, csr) =
            x509_parser::certification_request::X509CertificationRequest::from_der(&der)
                .map_err(|e| bad(format!("malformed CSR ({e})")))?;
        if !rest.is_empty() {
            return Err(bad("trailing bytes after the CSR".into()));
        }
        crate::der::check_csr(&der).map_err(|e| bad(format!("malformed CSR ({e})")))?;
        csr.verify_signature()
            .map_err(|e| bad(format!("self-signature does not verify ({e})")))?;
        let spki_der = csr.certification_request_info.subject_pki.raw;
        let public_key = rcgen::SubjectPublicKeyInfo::from_der(spki_der)
            .map_err(|e| bad(format!("unsupported public key ({e})")))?;
        let key_type = KeyType::from_algorithm(public_key.algorithm());
        let mut serial_number = None;
        for attr in csr.certification_request_info.subject.iter_attributes() {
            if attr
                .attr_type()
                .iter()
                .is_some_and(|a| a.eq(SERIAL_NUMBER_ATTR.iter().copied()))
            {
                let sn = attr
                    .as_str()
                    .map_err(|_| bad("subject serialNumber is not a string".into()))?;
                serial_number = Some(sn.to_owned());
            }
        }
        Ok(VerifiedCsr {
            public_key,
            key_type,
            serial_number,
        })
    }

    /// Reads and verifies a CSR file.
    pub fn from_file(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| Error::BadFile {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
        Self::from_bytes(&bytes, &path.display().to_string())
    }
}

/// SHA-256 of `data`.
pub fn sha256(data: &[u8]) -> Vec<u8> {
    aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, data)
        .as_ref()
        .to_vec()
}
