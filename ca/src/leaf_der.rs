//! End-entity certificates encoded in one pass, without a general-purpose ASN.1 writer.
//!
//! Issuing from a CSR must check the CSR's signature and sign the certificate; everything else
//! is overhead, and on a production line that overhead is the difference between keeping up
//! with the crypto and falling behind it. rcgen builds each certificate through yasna (a closure
//! and a buffer per element) and re-encodes the issuer's name every time: measured here, about a
//! third of the CPU of signing itself. This module encodes what every leaf of one CA shares
//! (signature algorithm, issuer name, authority key identifier) once per CA, and each
//! certificate as one pass over one buffer.
//!
//! rcgen stays the reference: the tests encode every profile both ways and compare the bytes.
//! CA certificates and CRLs are still made by rcgen (a handful per CA, not a production line).

use m2mpki_hsm::KeyType;
use time::OffsetDateTime;

use crate::identity::{Oid, HARDWARE_MODULE_NAME, SERIAL_NUMBER_ATTR};
use crate::profile::{ExtKeyUsage, KeyUsage};
use crate::serial::Serial;
use crate::{Error, Result};

use crate::der::tag::{
    BIT_STRING, BOOLEAN, GENERALIZED_TIME, INTEGER, OCTET_STRING, OID, PRINTABLE_STRING, SEQUENCE,
    SET, UTC_TIME, UTF8_STRING,
};
/// `[n]` constructed (explicit tags, and implicit tags over a SEQUENCE).
const fn context_constructed(n: u8) -> u8 {
    0xa0 | n
}
/// `[n]` primitive (implicit tags over a string).
const fn context_primitive(n: u8) -> u8 {
    0x80 | n
}

const COMMON_NAME: &[u64] = &[2, 5, 4, 3];
const ORGANIZATION: &[u64] = &[2, 5, 4, 10];
const EXT_SUBJECT_KEY_ID: &[u64] = &[2, 5, 29, 14];
const EXT_KEY_USAGE: &[u64] = &[2, 5, 29, 15];
const EXT_SUBJECT_ALT_NAME: &[u64] = &[2, 5, 29, 17];
const EXT_BASIC_CONSTRAINTS: &[u64] = &[2, 5, 29, 19];
const EXT_AUTHORITY_KEY_ID: &[u64] = &[2, 5, 29, 35];
const EXT_EXTENDED_KEY_USAGE: &[u64] = &[2, 5, 29, 37];
const KP_SERVER_AUTH: &[u64] = &[1, 3, 6, 1, 5, 5, 7, 3, 1];
const KP_CLIENT_AUTH: &[u64] = &[1, 3, 6, 1, 5, 5, 7, 3, 2];
const EC_PUBLIC_KEY: &[u64] = &[1, 2, 840, 10045, 2, 1];
const PRIME256V1: &[u64] = &[1, 2, 840, 10045, 3, 1, 7];
const SECP384R1: &[u64] = &[1, 3, 132, 0, 34];
const ED25519: &[u64] = &[1, 3, 101, 112];
const ECDSA_WITH_SHA256: &[u64] = &[1, 2, 840, 10045, 4, 3, 2];
const ECDSA_WITH_SHA384: &[u64] = &[1, 2, 840, 10045, 4, 3, 3];

/// A DER writer: tag-length-value into one growing buffer, lengths fixed up in place.
#[derive(Default)]
struct Der(Vec<u8>);

impl Der {
    fn with_capacity(n: usize) -> Self {
        Der(Vec::with_capacity(n))
    }

    /// `tag`, then whatever `body` writes, with the length in between.
    fn tlv(&mut self, tag: u8, body: impl FnOnce(&mut Der)) {
        self.0.push(tag);
        self.0.push(0);
        let start = self.0.len();
        body(self);
        let len = self.0.len() - start;
        if len < 0x80 {
            self.0[start - 1] = len as u8;
        } else {
            let octets = len.to_be_bytes();
            let skip = octets.iter().take_while(|b| **b == 0).count();
            let octets = &octets[skip..];
            self.0[start - 1] = 0x80 | octets.len() as u8;
            self.0.splice(start..start, octets.iter().copied());
        }
    }

    fn primitive(&mut self, tag: u8, value: &[u8]) {
        self.tlv(tag, |d| d.0.extend_from_slice(value));
    }

    fn raw(&mut self, der: &[u8]) {
        self.0.extend_from_slice(der);
    }

    /// An OBJECT IDENTIFIER. [`Oid`] guarantees two arcs at least; the first two share one
    /// subidentifier, which can exceed 64 bits (arc 2 takes any second arc).
    fn oid(&mut self, arcs: &[u64]) {
        self.tlv(OID, |d| {
            let (first, rest) = match arcs {
                [a, b, rest @ ..] => (u128::from(*a) * 40 + u128::from(*b), rest),
                [a] => (u128::from(*a) * 40, &[][..]),
                [] => (0, &[][..]),
            };
            for arc in std::iter::once(first).chain(rest.iter().map(|a| u128::from(*a))) {
                let groups = (128 - arc.leading_zeros()).max(1).div_ceil(7);
                for i in (0..groups).rev() {
                    let septet = ((arc >> (7 * i)) & 0x7f) as u8;
                    d.0.push(if i == 0 { septet } else { septet | 0x80 });
                }
            }
        });
    }

    /// A non-negative INTEGER from big-endian magnitude octets.
    fn unsigned(&mut self, magnitude: &[u8]) {
        let skip = magnitude
            .iter()
            .take_while(|b| **b == 0)
            .count()
            .min(magnitude.len().saturating_sub(1));
        let m = &magnitude[skip..];
        self.tlv(INTEGER, |d| {
            if m.first().is_none_or(|b| b & 0x80 != 0) {
                d.0.push(0);
            }
            d.0.extend_from_slice(m);
        });
    }

    /// UTCTime from 1950 to 2049, GeneralizedTime otherwise (RFC 5280 §4.1.2.5).
    fn time(&mut self, t: OffsetDateTime) {
        let (y, mo, d, h, mi, s) = (
            t.year(),
            u8::from(t.month()),
            t.day(),
            t.hour(),
            t.minute(),
            t.second(),
        );
        if (1950..2050).contains(&y) {
            let text = format!("{:02}{mo:02}{d:02}{h:02}{mi:02}{s:02}Z", y % 100);
            self.primitive(UTC_TIME, text.as_bytes());
        } else {
            let text = format!("{y:04}{mo:02}{d:02}{h:02}{mi:02}{s:02}Z");
            self.primitive(GENERALIZED_TIME, text.as_bytes());
        }
    }

    /// `Extension ::= SEQUENCE { extnID, critical BOOLEAN DEFAULT FALSE, extnValue }`.
    fn extension(&mut self, oid: &[u64], critical: bool, value: impl FnOnce(&mut Der)) {
        self.tlv(SEQUENCE, |d| {
            d.oid(oid);
            if critical {
                d.primitive(BOOLEAN, &[0xff]);
            }
            d.tlv(OCTET_STRING, value);
        });
    }
}

/// AlgorithmIdentifier of the signature a CA key of `key_type` makes.
fn signature_algorithm(key_type: KeyType) -> Vec<u8> {
    let mut d = Der::default();
    d.tlv(SEQUENCE, |d| {
        d.oid(match key_type {
            KeyType::P256 => ECDSA_WITH_SHA256,
            KeyType::P384 => ECDSA_WITH_SHA384,
            KeyType::Ed25519 => ED25519,
        })
    });
    d.0
}

/// An attribute of a leaf's subject name, most general first as encoded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum SubjectAttr {
    /// O, as UTF8String.
    Organization(String),
    /// CN, as UTF8String.
    CommonName(String),
    /// serialNumber (2.5.4.5), as PrintableString (the ID alphabet is a subset of it).
    SerialNumber(String),
}

impl SubjectAttr {
    /// `O=...` and the like, as [`crate::dn::dn_to_string`] writes them.
    fn text(&self) -> String {
        match self {
            SubjectAttr::Organization(v) => format!("O={v}"),
            SubjectAttr::CommonName(v) => format!("CN={v}"),
            SubjectAttr::SerialNumber(v) => format!("serialNumber={v}"),
        }
    }
}

/// A subject as text, most specific attribute first, as [`crate::dn::dn_to_string`] writes
/// names (the tests hold the two to the same output).
pub(crate) fn subject_text(subject: &[SubjectAttr]) -> String {
    subject
        .iter()
        .rev()
        .map(SubjectAttr::text)
        .collect::<Vec<_>>()
        .join(", ")
}

/// The one subjectAltName entry of a leaf.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum LeafSan {
    /// RFC 4108 hardwareModuleName (device certificates).
    HardwareModule { hw_type: Oid, serial: String },
    /// uniformResourceIdentifier (node certificates).
    Uri(String),
    /// dNSName (IN server certificates).
    Dns(String),
}

/// Every field of one end-entity certificate.
#[derive(Clone, Debug)]
pub(crate) struct LeafFields {
    pub serial: Serial,
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
    pub subject: Vec<SubjectAttr>,
    pub san: LeafSan,
    pub key_type: KeyType,
    /// The subjectPublicKey bits (an uncompressed point, or the Ed25519 key).
    pub public_key: Vec<u8>,
    pub subject_key_id: Vec<u8>,
    pub key_usage: Vec<KeyUsage>,
    pub extended_key_usage: Vec<ExtKeyUsage>,
}

/// What every leaf of one CA shares, encoded once.
#[derive(Clone, Debug)]
pub(crate) struct LeafTemplate {
    /// AlgorithmIdentifier of the CA key's signatures.
    signature_algorithm: Vec<u8>,
    /// The CA certificate's subject Name, as it is encoded there (RFC 5280 §4.1.2.4: the
    /// issuer field must match it).
    issuer: Vec<u8>,
    /// The authorityKeyIdentifier extension (keyIdentifier = the CA's subjectKeyIdentifier).
    authority_key_id: Vec<u8>,
}

impl LeafTemplate {
    /// From the CA's certificate and its key's type.
    pub(crate) fn new(ca_cert_der: &[u8], key_type: KeyType) -> Result<Self> {
        use x509_parser::prelude::{FromDer, ParsedExtension, X509Certificate};
        let bad = |reason: String| Error::corrupt(format!("stored CA certificate: {reason}"));
        let (_, cert) = X509Certificate::from_der(ca_cert_der).map_err(|e| bad(e.to_string()))?;
        let tbs = &cert.tbs_certificate;
        let key_id = tbs
            .extensions()
            .iter()
            .find_map(|e| match e.parsed_extension() {
                ParsedExtension::SubjectKeyIdentifier(k) => Some(k.0.to_vec()),
                _ => None,
            })
            .ok_or_else(|| bad("it has no subjectKeyIdentifier".into()))?;
        let mut aki = Der::default();
        aki.extension(EXT_AUTHORITY_KEY_ID, false, |d| {
            d.tlv(SEQUENCE, |d| d.primitive(context_primitive(0), &key_id))
        });
        Ok(LeafTemplate {
            signature_algorithm: signature_algorithm(key_type),
            issuer: tbs.subject.as_raw().to_vec(),
            authority_key_id: aki.0,
        })
    }

    /// The TBSCertificate of `leaf`, in rcgen's field and extension order.
    pub(crate) fn tbs(&self, leaf: &LeafFields) -> Vec<u8> {
        let mut d = Der::with_capacity(512);
        d.tlv(SEQUENCE, |d| {
            d.tlv(context_constructed(0), |d| d.primitive(INTEGER, &[2]));
            d.unsigned(leaf.serial.as_bytes());
            d.raw(&self.signature_algorithm);
            d.raw(&self.issuer);
            d.tlv(SEQUENCE, |d| {
                d.time(leaf.not_before);
                d.time(leaf.not_after);
            });
            d.tlv(SEQUENCE, |d| {
                for attr in &leaf.subject {
                    let (oid, tag, value) = match attr {
                        SubjectAttr::Organization(v) => (ORGANIZATION, UTF8_STRING, v),
                        SubjectAttr::CommonName(v) => (COMMON_NAME, UTF8_STRING, v),
                        SubjectAttr::SerialNumber(v) => (SERIAL_NUMBER_ATTR, PRINTABLE_STRING, v),
                    };
                    d.tlv(SET, |d| {
                        d.tlv(SEQUENCE, |d| {
                            d.oid(oid);
                            d.primitive(tag, value.as_bytes());
                        })
                    });
                }
            });
            d.tlv(SEQUENCE, |d| {
                d.tlv(SEQUENCE, |d| match leaf.key_type {
                    KeyType::P256 => {
                        d.oid(EC_PUBLIC_KEY);
                        d.oid(PRIME256V1);
                    }
                    KeyType::P384 => {
                        d.oid(EC_PUBLIC_KEY);
                        d.oid(SECP384R1);
                    }
                    KeyType::Ed25519 => d.oid(ED25519),
                });
                d.tlv(BIT_STRING, |d| {
                    d.0.push(0);
                    d.0.extend_from_slice(&leaf.public_key);
                });
            });
            d.tlv(context_constructed(3), |d| {
                d.tlv(SEQUENCE, |d| self.extensions(d, leaf));
            });
        });
        d.0
    }

    fn extensions(&self, d: &mut Der, leaf: &LeafFields) {
        d.raw(&self.authority_key_id);
        // The subject is never empty, so subjectAltName is not critical (RFC 5280 §4.2.1.6).
        // rcgen writes its own SAN types here and custom extensions last; the device's
        // hardwareModuleName is one of those.
        match &leaf.san {
            LeafSan::Uri(uri) => d.extension(EXT_SUBJECT_ALT_NAME, false, |d| {
                d.tlv(SEQUENCE, |d| {
                    d.primitive(context_primitive(6), uri.as_bytes())
                })
            }),
            LeafSan::Dns(name) => d.extension(EXT_SUBJECT_ALT_NAME, false, |d| {
                d.tlv(SEQUENCE, |d| {
                    d.primitive(context_primitive(2), name.as_bytes())
                })
            }),
            LeafSan::HardwareModule { .. } => {}
        }
        if !leaf.key_usage.is_empty() {
            let bits = leaf
                .key_usage
                .iter()
                .fold(0u16, |b, k| b | key_usage_bit(*k));
            let used = 16 - bits.trailing_zeros() as usize;
            let octets = &bits.to_be_bytes()[..used.div_ceil(8)];
            d.extension(EXT_KEY_USAGE, true, |d| {
                d.tlv(BIT_STRING, |d| {
                    d.0.push((octets.len() * 8 - used) as u8);
                    d.0.extend_from_slice(octets);
                })
            });
        }
        if !leaf.extended_key_usage.is_empty() {
            d.extension(EXT_EXTENDED_KEY_USAGE, false, |d| {
                d.tlv(SEQUENCE, |d| {
                    for k in &leaf.extended_key_usage {
                        d.oid(match k {
                            ExtKeyUsage::ServerAuth => KP_SERVER_AUTH,
                            ExtKeyUsage::ClientAuth => KP_CLIENT_AUTH,
                        });
                    }
                })
            });
        }
        d.extension(EXT_SUBJECT_KEY_ID, false, |d| {
            d.primitive(OCTET_STRING, &leaf.subject_key_id)
        });
        // basicConstraints cA FALSE, stated (critical, an empty SEQUENCE).
        d.extension(EXT_BASIC_CONSTRAINTS, true, |d| d.tlv(SEQUENCE, |_| {}));
        if let LeafSan::HardwareModule { hw_type, serial } = &leaf.san {
            d.extension(EXT_SUBJECT_ALT_NAME, false, |d| {
                d.raw(&hardware_module_name(hw_type, serial))
            });
        }
    }

    /// The certificate: `SEQUENCE { tbs, signatureAlgorithm, BIT STRING signature }`.
    pub(crate) fn certificate(&self, tbs: &[u8], signature: &[u8]) -> Vec<u8> {
        let mut d = Der::with_capacity(tbs.len() + signature.len() + 32);
        d.tlv(SEQUENCE, |d| {
            d.raw(tbs);
            d.raw(&self.signature_algorithm);
            d.tlv(BIT_STRING, |d| {
                d.0.push(0);
                d.0.extend_from_slice(signature);
            });
        });
        d.0
    }
}

/// The keyUsage bit (RFC 5280 §4.2.1.3), bit 0 being the most significant of 16.
fn key_usage_bit(k: KeyUsage) -> u16 {
    0x8000
        >> match k {
            KeyUsage::DigitalSignature => 0,
            KeyUsage::KeyCertSign => 5,
            KeyUsage::CrlSign => 6,
        }
}

/// GeneralNames with one RFC 4108 hardwareModuleName otherName:
/// `SEQUENCE { [0] { type-id id-on-hardwareModuleName, value [0] EXPLICIT SEQUENCE {
/// hwType OID, hwSerialNum OCTET STRING } } }`.
pub(crate) fn hardware_module_name(hw_type: &Oid, serial: &str) -> Vec<u8> {
    let mut d = Der::default();
    d.tlv(SEQUENCE, |d| {
        d.tlv(context_constructed(0), |d| {
            d.oid(HARDWARE_MODULE_NAME);
            d.tlv(context_constructed(0), |d| {
                d.tlv(SEQUENCE, |d| {
                    d.oid(hw_type.arcs());
                    d.primitive(OCTET_STRING, serial.as_bytes());
                })
            });
        })
    });
    d.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use m2mpki_hsm::SoftwareKey;
    use rcgen::{
        CertificateParams, CustomExtension, DistinguishedName, DnType, DnValue, IsCa, KeyIdMethod,
        PublicKeyData, SanType,
    };
    use time::macros::datetime;
    use x509_parser::prelude::{FromDer, X509Certificate};

    /// rcgen's parameters for the same fields: the reference encoding.
    fn rcgen_params(leaf: &LeafFields) -> CertificateParams {
        let mut p = CertificateParams::default();
        p.distinguished_name = DistinguishedName::new();
        for attr in &leaf.subject {
            match attr {
                SubjectAttr::Organization(v) => p
                    .distinguished_name
                    .push(DnType::OrganizationName, DnValue::Utf8String(v.clone())),
                SubjectAttr::CommonName(v) => p
                    .distinguished_name
                    .push(DnType::CommonName, DnValue::Utf8String(v.clone())),
                SubjectAttr::SerialNumber(v) => p.distinguished_name.push(
                    DnType::CustomDnType(SERIAL_NUMBER_ATTR.to_vec()),
                    DnValue::PrintableString(v.as_str().try_into().unwrap()),
                ),
            }
        }
        match &leaf.san {
            LeafSan::HardwareModule { hw_type, serial } => {
                p.custom_extensions = vec![CustomExtension::from_oid_content(
                    EXT_SUBJECT_ALT_NAME,
                    hardware_module_name(hw_type, serial),
                )]
            }
            LeafSan::Uri(u) => {
                p.subject_alt_names = vec![SanType::URI(u.as_str().try_into().unwrap())]
            }
            LeafSan::Dns(n) => {
                p.subject_alt_names = vec![SanType::DnsName(n.as_str().try_into().unwrap())]
            }
        }
        p.serial_number = Some(rcgen::SerialNumber::from_slice(leaf.serial.as_bytes()));
        p.not_before = leaf.not_before;
        p.not_after = leaf.not_after;
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = leaf.key_usage.iter().map(|k| k.to_rcgen()).collect();
        p.extended_key_usages = leaf
            .extended_key_usage
            .iter()
            .map(|k| k.to_rcgen())
            .collect();
        p.key_identifier_method = KeyIdMethod::PreSpecified(leaf.subject_key_id.clone());
        p.use_authority_key_identifier_extension = true;
        p
    }

    /// A CA made by rcgen (as `init_ca` makes them), its key, and a subject key pair.
    fn ca(key_type: KeyType) -> (Vec<u8>, rcgen::Issuer<'static, SoftwareKey>) {
        let key = SoftwareKey::generate(key_type).unwrap();
        let mut p = CertificateParams::default();
        p.distinguished_name = DistinguishedName::new();
        p.distinguished_name.push(
            DnType::CountryName,
            DnValue::PrintableString("DE".try_into().unwrap()),
        );
        p.distinguished_name
            .push(DnType::OrganizationName, "Example Manufacturer");
        p.distinguished_name
            .push(DnType::CommonName, "Example Device CA");
        p.is_ca = IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
        p.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        let cert = p.self_signed(&key).unwrap();
        let der = cert.der().to_vec();
        let issuer = rcgen::Issuer::from_ca_cert_der(&der.clone().into(), key).unwrap();
        (der, issuer)
    }

    fn leaf(san: LeafSan, subject: Vec<SubjectAttr>, key_type: KeyType) -> LeafFields {
        let key = SoftwareKey::generate(key_type).unwrap();
        let public_key = key.der_bytes().to_vec();
        LeafFields {
            serial: Serial::from_bytes(&[
                0x01, 0x9a, 0xc0, 0xff, 0xee, 0x00, 0x80, 0x7f, 0, 1, 2, 3, 4, 5, 6, 7,
            ]),
            not_before: datetime!(2026-11-28 06:00:00 UTC),
            not_after: datetime!(2051-01-01 00:00:00 UTC),
            subject,
            san,
            key_type,
            subject_key_id: crate::input::sha256(&public_key)[..20].to_vec(),
            public_key,
            key_usage: vec![KeyUsage::DigitalSignature],
            extended_key_usage: vec![ExtKeyUsage::ClientAuth],
        }
    }

    fn assert_same_as_rcgen(ca_key: KeyType, leaf: &LeafFields) {
        let (ca_der, issuer) = ca(ca_key);
        let template = LeafTemplate::new(&ca_der, ca_key).unwrap();
        let ours = template.tbs(leaf);
        let spki = rcgen::SubjectPublicKeyInfo::from_der(&{
            // The SPKI as a CSR would carry it.
            let mut d = Der::default();
            d.tlv(SEQUENCE, |d| {
                d.tlv(SEQUENCE, |d| match leaf.key_type {
                    KeyType::P256 => {
                        d.oid(EC_PUBLIC_KEY);
                        d.oid(PRIME256V1)
                    }
                    KeyType::P384 => {
                        d.oid(EC_PUBLIC_KEY);
                        d.oid(SECP384R1)
                    }
                    KeyType::Ed25519 => d.oid(ED25519),
                });
                d.tlv(BIT_STRING, |d| {
                    d.0.push(0);
                    d.0.extend_from_slice(&leaf.public_key)
                });
            });
            d.0
        })
        .unwrap();
        let params = rcgen_params(leaf);
        assert_eq!(
            subject_text(&leaf.subject),
            crate::dn::dn_to_string(&params.distinguished_name)
        );
        let reference = params.signed_by(&spki, &issuer).unwrap();
        let (_, parsed) = X509Certificate::from_der(reference.der()).unwrap();
        assert_eq!(
            hex::encode(&ours),
            hex::encode(parsed.tbs_certificate.as_ref()),
            "TBSCertificate differs from rcgen's"
        );
        // And the assembled certificate verifies under the CA key.
        let sig = rcgen::SigningKey::sign(issuer.key(), &ours).unwrap();
        let cert = template.certificate(&ours, &sig);
        let (rest, parsed) = X509Certificate::from_der(&cert).unwrap();
        assert!(rest.is_empty());
        let (_, ca_parsed) = X509Certificate::from_der(&ca_der).unwrap();
        parsed
            .verify_signature(Some(ca_parsed.public_key()))
            .expect("signature verifies");
        assert_eq!(parsed.signature_algorithm, parsed.tbs_certificate.signature);
    }

    #[test]
    fn device_certificates_match_rcgen_byte_for_byte() {
        for ca_key in [KeyType::P256, KeyType::P384, KeyType::Ed25519] {
            let l = leaf(
                LeafSan::HardwareModule {
                    hw_type: "1.3.6.1.4.1.99999.1".parse().unwrap(),
                    serial: "SN-0001".into(),
                },
                vec![
                    SubjectAttr::Organization("Example Manufacturer".into()),
                    SubjectAttr::CommonName("SN-0001".into()),
                    SubjectAttr::SerialNumber("SN-0001".into()),
                ],
                KeyType::P256,
            );
            assert_same_as_rcgen(ca_key, &l);
        }
    }

    #[test]
    fn node_and_server_certificates_match_rcgen_byte_for_byte() {
        let node = leaf(
            LeafSan::Uri("onem2m-node://acme.example/pump-1".into()),
            vec![
                SubjectAttr::Organization("acme.example".into()),
                SubjectAttr::CommonName("pump-1".into()),
                SubjectAttr::SerialNumber("pump-1".into()),
            ],
            KeyType::P384,
        );
        assert_same_as_rcgen(KeyType::P256, &node);
        let mut server = leaf(
            LeafSan::Dns("in.example.com".into()),
            vec![SubjectAttr::CommonName("in.example.com".into())],
            KeyType::Ed25519,
        );
        server.extended_key_usage = vec![ExtKeyUsage::ServerAuth, ExtKeyUsage::ClientAuth];
        assert_same_as_rcgen(KeyType::P256, &server);
    }

    #[test]
    fn long_values_take_long_form_lengths_and_times_switch_at_2050() {
        // A 64-character ID makes the subject longer than 127 octets; 1949 and 2050 take
        // GeneralizedTime, 1950 and 2049 UTCTime.
        let id = "A".repeat(64);
        let mut l = leaf(
            LeafSan::HardwareModule {
                hw_type: "1.3.6.1.4.1.4294967295.200000.1".parse().unwrap(),
                serial: id.clone(),
            },
            vec![
                SubjectAttr::Organization("O".repeat(200)),
                SubjectAttr::CommonName(id.clone()),
                SubjectAttr::SerialNumber(id),
            ],
            KeyType::P256,
        );
        l.serial = Serial::from_bytes(&[0, 0, 0x80, 1]);
        for (nb, na) in [
            (
                datetime!(1949-12-31 23:59:59 UTC),
                datetime!(1950-01-01 00:00:00 UTC),
            ),
            (
                datetime!(2049-12-31 23:59:59 UTC),
                datetime!(2050-01-01 00:00:00 UTC),
            ),
            (
                datetime!(2026-01-01 00:00:00 UTC),
                datetime!(9999-12-31 23:59:59 UTC),
            ),
        ] {
            l.not_before = nb;
            l.not_after = na;
            assert_same_as_rcgen(KeyType::P256, &l);
        }
    }

    #[test]
    fn oids_with_huge_arcs_encode_like_yasna() {
        for arcs in [
            &[2u64, 999, 3][..],
            &[1, 3, 6, 1, 4, 1, u64::MAX],
            &[2, 1 << 40],
        ] {
            let mut d = Der::default();
            d.oid(arcs);
            let reference = yasna::construct_der(|w| {
                w.write_oid(&yasna::models::ObjectIdentifier::from_slice(arcs))
            });
            assert_eq!(d.0, reference, "{arcs:?}");
        }
        // Beyond 64 bits for the first subidentifier: 2.(2^64 - 1) is 2^64 + 79 = 2 * 128^9 + 79,
        // ten base-128 digits (yasna refuses such OIDs with a panic and `Oid` no longer parses
        // them; the encoder stays correct regardless).
        let mut d = Der::default();
        d.oid(&[2, u64::MAX]);
        assert_eq!(
            d.0,
            [6, 10, 0x82, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x4f]
        );
    }

    #[test]
    fn integers_are_minimal_and_positive() {
        let enc = |m: &[u8]| {
            let mut d = Der::default();
            d.unsigned(m);
            d.0
        };
        assert_eq!(enc(&[0, 0, 1]), [2, 1, 1]);
        assert_eq!(enc(&[0x80]), [2, 2, 0, 0x80]);
        assert_eq!(enc(&[0, 0x7f, 0xff]), [2, 2, 0x7f, 0xff]);
        assert_eq!(enc(&[0]), [2, 1, 0]);
    }
}
