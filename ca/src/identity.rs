//! Field-node identities: what a device or node certificate says about who the node is.
//!
//! A [`FieldNodeIdentity`] is written into certificates by the profiles and read back from any
//! certificate by [`FieldNodeIdentity::from_certificate`]. Its canonical string form
//! (`device:<hwType OID>:<ID>` or `node:<enterprise>:<ID>`) is the key used in logs, the store
//! and authorization records.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::prelude::X509Certificate;

use crate::{Error, Result};

/// OID of the RFC 4108 hardwareModuleName otherName (id-on-hardwareModuleName).
pub const HARDWARE_MODULE_NAME: &[u64] = &[1, 3, 6, 1, 5, 5, 7, 8, 4];
/// OID of the X.520 serialNumber attribute.
pub const SERIAL_NUMBER_ATTR: &[u64] = &[2, 5, 4, 5];
/// URI scheme of enterprise node identities: `onem2m-node://<enterprise>/<ID>`.
pub const NODE_URI_SCHEME: &str = "onem2m-node";

/// Longest pre-provisioned ID (X.520 ub-serial-number).
pub const MAX_ID_LEN: usize = 64;

/// A pre-provisioned ID: 1 to 64 characters from `A-Z a-z 0-9 . : -`, starting with a letter
/// or digit. The alphabet fits an X.520 PrintableString, a URI path segment and a file name.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct PreProvisionedId(String);

impl PreProvisionedId {
    /// The ID as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for PreProvisionedId {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let bad = |reason: &str| Err(Error::invalid("pre-provisioned ID", s, reason));
        if s.is_empty() {
            return bad("it is empty");
        }
        if s.len() > MAX_ID_LEN {
            return bad("it is longer than 64 characters");
        }
        if let Some(c) = s
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | ':' | '-')))
        {
            return bad(&format!(
                "character {c:?} is outside the ID alphabet A-Z a-z 0-9 . : -"
            ));
        }
        if !s.starts_with(|c: char| c.is_ascii_alphanumeric()) {
            return bad("it must start with a letter or digit");
        }
        Ok(PreProvisionedId(s.to_owned()))
    }
}

impl TryFrom<String> for PreProvisionedId {
    type Error = Error;
    fn try_from(s: String) -> Result<Self> {
        s.parse()
    }
}

impl From<PreProvisionedId> for String {
    fn from(id: PreProvisionedId) -> String {
        id.0
    }
}

impl fmt::Display for PreProvisionedId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Checks the name of something the store keeps by name (a CA, a root set): 1 to 64
/// characters from `A-Z a-z 0-9 . _ -`, starting with a letter or digit, so it is also a safe
/// file name.
pub fn check_object_name(what: &'static str, name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(
            what,
            name,
            "use 1 to 64 characters from A-Z a-z 0-9 . _ -, starting with a letter or digit",
        ))
    }
}

/// A DNS name in canonical (lowercase, no trailing dot) form: used for enterprise identities
/// and Infrastructure Node FQDNs.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct DnsName(String);

impl DnsName {
    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether `self` equals `base` or lies below it (`a.b.example` is within `example`).
    pub fn is_within(&self, base: &str) -> bool {
        let base = base.trim_start_matches('.').to_ascii_lowercase();
        self.0 == base || self.0.ends_with(&format!(".{base}"))
    }
}

impl FromStr for DnsName {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let bad = |reason: String| Err(Error::invalid("DNS name", s, reason));
        let name = s.strip_suffix('.').unwrap_or(s).to_ascii_lowercase();
        if name.is_empty() || name.len() > 253 {
            return bad("it must have 1 to 253 characters".into());
        }
        for label in name.split('.') {
            if label.is_empty() || label.len() > 63 {
                return bad(format!("label `{label}` must have 1 to 63 characters"));
            }
            if let Some(c) = label
                .chars()
                .find(|c| !(c.is_ascii_alphanumeric() || *c == '-'))
            {
                return bad(format!("character {c:?} is not allowed in a DNS label"));
            }
            if label.starts_with('-') || label.ends_with('-') {
                return bad(format!("label `{label}` starts or ends with a hyphen"));
            }
        }
        Ok(DnsName(name))
    }
}

impl TryFrom<String> for DnsName {
    type Error = Error;
    fn try_from(s: String) -> Result<Self> {
        s.parse()
    }
}

impl From<DnsName> for String {
    fn from(n: DnsName) -> String {
        n.0
    }
}

impl fmt::Display for DnsName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// An object identifier in dotted form, e.g. a manufacturer's hwType (`1.3.6.1.4.1.99999.1`).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Oid(Vec<u64>);

impl Oid {
    /// The arcs of the OID.
    pub fn arcs(&self) -> &[u64] {
        &self.0
    }

    /// Builds an OID from arcs read out of a DER structure.
    pub fn from_arcs(arcs: Vec<u64>) -> Result<Self> {
        let text = arcs
            .iter()
            .map(u64::to_string)
            .collect::<Vec<_>>()
            .join(".");
        text.parse()
    }
}

impl FromStr for Oid {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let bad = |reason: &str| Err(Error::invalid("OID", s, reason));
        let arcs: Vec<u64> = match s.split('.').map(str::parse::<u64>).collect() {
            Ok(a) => a,
            Err(_) => return bad("expected dotted decimal arcs such as 1.3.6.1.4.1.99999.1"),
        };
        if arcs.len() < 2 || arcs.len() > 32 {
            return bad("an OID has 2 to 32 arcs");
        }
        if arcs[0] > 2 || (arcs[0] < 2 && arcs[1] > 39) {
            return bad("the first arcs are out of range");
        }
        // The first two arcs share one subidentifier (40 * first + second), which parsers,
        // ours included, read as 64 bits, and yasna (rcgen's writer) refuses from 2^64 - 81 on.
        if arcs[1] >= u64::MAX - 80 {
            return bad("the second arc is too large");
        }
        Ok(Oid(arcs))
    }
}

impl TryFrom<String> for Oid {
    type Error = Error;
    fn try_from(s: String) -> Result<Self> {
        s.parse()
    }
}

impl From<Oid> for String {
    fn from(o: Oid) -> String {
        o.to_string()
    }
}

impl fmt::Display for Oid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        for arc in &self.0 {
            if !first {
                f.write_str(".")?;
            }
            first = false;
            write!(f, "{arc}")?;
        }
        Ok(())
    }
}

/// Whose certificate a CA keeps one live of at a time: a field node, by its identity, or an
/// IN, by its FQDN. Its text form is the ledger's key: the identity's canonical form, or
/// `server:FQDN`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SubjectKey {
    /// A device or node certificate's subject.
    FieldNode(FieldNodeIdentity),
    /// An IN's server certificate.
    Server(DnsName),
}

impl fmt::Display for SubjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SubjectKey::FieldNode(identity) => identity.fmt(f),
            SubjectKey::Server(fqdn) => write!(f, "server:{fqdn}"),
        }
    }
}

impl FromStr for SubjectKey {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s.strip_prefix("server:") {
            Some(fqdn) => Ok(SubjectKey::Server(fqdn.parse()?)),
            None => Ok(SubjectKey::FieldNode(s.parse()?)),
        }
    }
}

/// Who a field node is, as its certificate says.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FieldNodeIdentity {
    /// A Manufacturer-Issued Device Certificate: the manufacturer is named by its hwType OID
    /// (RFC 4108 hardwareModuleName), the ID is globally unique within it.
    Device {
        /// The manufacturer's hwType OID.
        hw_type: Oid,
        /// The pre-provisioned ID (hwSerialNum).
        id: PreProvisionedId,
    },
    /// An Enterprise-Issued Node Certificate: enterprise domain plus ID is globally unique.
    Node {
        /// The enterprise's DNS domain.
        enterprise: DnsName,
        /// The pre-provisioned ID assigned by the enterprise.
        id: PreProvisionedId,
    },
}

impl FieldNodeIdentity {
    /// The pre-provisioned ID.
    pub fn id(&self) -> &PreProvisionedId {
        match self {
            FieldNodeIdentity::Device { id, .. } | FieldNodeIdentity::Node { id, .. } => id,
        }
    }

    /// The issuer identity: the manufacturer's hwType OID or the enterprise domain.
    pub fn issuer_identity(&self) -> String {
        match self {
            FieldNodeIdentity::Device { hw_type, .. } => hw_type.to_string(),
            FieldNodeIdentity::Node { enterprise, .. } => enterprise.to_string(),
        }
    }

    /// The subjectAltName URI of a node identity: `onem2m-node://<enterprise>/<ID>`.
    pub fn node_uri(enterprise: &DnsName, id: &PreProvisionedId) -> String {
        format!("{NODE_URI_SCHEME}://{enterprise}/{id}")
    }

    /// Reads the identity from a parsed certificate.
    ///
    /// Device certificates are recognised by a hardwareModuleName otherName in subjectAltName,
    /// node certificates by an `onem2m-node:` URI. The subject serialNumber attribute must agree
    /// with the ID when present. A certificate carrying both kinds, or two of one kind, is
    /// refused as ambiguous.
    pub fn from_certificate(cert: &X509Certificate<'_>) -> Result<Self> {
        let mut found = Vec::new();
        for ext in cert.extensions() {
            let ParsedExtension::SubjectAlternativeName(san) = ext.parsed_extension() else {
                continue;
            };
            for name in &san.general_names {
                match name {
                    GeneralName::OtherName(oid, value)
                        if oid
                            .iter()
                            .is_some_and(|a| a.eq(HARDWARE_MODULE_NAME.iter().copied())) =>
                    {
                        found.push(parse_hardware_module_name(value)?);
                    }
                    GeneralName::URI(uri) => {
                        if let Some(rest) = uri.strip_prefix(&format!("{NODE_URI_SCHEME}://")) {
                            found.push(parse_node_uri(uri, rest)?);
                        }
                    }
                    _ => {}
                }
            }
        }
        let identity = match found.len() {
            0 => {
                return Err(Error::NoIdentity(
                    "no hardwareModuleName or onem2m-node URI in subjectAltName".into(),
                ))
            }
            1 => found.remove(0),
            _ => {
                return Err(Error::NoIdentity(
                    "more than one field-node identity in subjectAltName".into(),
                ))
            }
        };
        for attr in cert.subject().iter_attributes() {
            if attr
                .attr_type()
                .iter()
                .is_some_and(|a| a.eq(SERIAL_NUMBER_ATTR.iter().copied()))
            {
                let sn = attr.as_str().map_err(|_| {
                    Error::NoIdentity("subject serialNumber is not a string".into())
                })?;
                if sn != identity.id().as_str() {
                    return Err(Error::NoIdentity(format!(
                        "subject serialNumber `{sn}` differs from the ID `{}` in subjectAltName",
                        identity.id()
                    )));
                }
            }
        }
        Ok(identity)
    }
}

fn parse_hardware_module_name(value: &[u8]) -> Result<FieldNodeIdentity> {
    // value is `[0] EXPLICIT HardwareModuleName`, HardwareModuleName ::= SEQUENCE {
    //   hwType OBJECT IDENTIFIER, hwSerialNum OCTET STRING }
    let parsed = yasna::parse_der(value, |r| {
        r.read_tagged(yasna::Tag::context(0), |r| {
            r.read_sequence(|r| {
                let oid = r.next().read_oid()?;
                let serial = r.next().read_bytes()?;
                Ok((oid, serial))
            })
        })
    });
    let (oid, serial) =
        parsed.map_err(|e| Error::NoIdentity(format!("malformed hardwareModuleName: {e}")))?;
    let hw_type = Oid::from_arcs(oid.components().to_vec())
        .map_err(|e| Error::NoIdentity(format!("hardwareModuleName hwType: {e}")))?;
    let id = std::str::from_utf8(&serial)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| {
            Error::NoIdentity("hardwareModuleName hwSerialNum is not a valid ID".into())
        })?;
    Ok(FieldNodeIdentity::Device { hw_type, id })
}

fn parse_node_uri(uri: &str, rest: &str) -> Result<FieldNodeIdentity> {
    let bad = || Error::NoIdentity(format!("malformed node URI `{uri}`"));
    let (host, id) = rest.split_once('/').ok_or_else(bad)?;
    let enterprise: DnsName = host.parse().map_err(|_| bad())?;
    if enterprise.as_str() != host {
        return Err(bad());
    }
    let id = id.parse().map_err(|_| bad())?;
    Ok(FieldNodeIdentity::Node { enterprise, id })
}

impl fmt::Display for FieldNodeIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FieldNodeIdentity::Device { hw_type, id } => write!(f, "device:{hw_type}:{id}"),
            FieldNodeIdentity::Node { enterprise, id } => write!(f, "node:{enterprise}:{id}"),
        }
    }
}

impl FromStr for FieldNodeIdentity {
    type Err = Error;

    /// Parses the canonical form. The ID may itself contain `:`, so only the first two
    /// separators split (neither an OID nor a DNS name contains `:`).
    fn from_str(s: &str) -> Result<Self> {
        let bad = || {
            Error::invalid(
                "field-node identity",
                s,
                "expected device:<hwType OID>:<ID> or node:<enterprise>:<ID>",
            )
        };
        let (kind, rest) = s.split_once(':').ok_or_else(bad)?;
        let (issuer, id) = rest.split_once(':').ok_or_else(bad)?;
        let id = id.parse()?;
        match kind {
            "device" => Ok(FieldNodeIdentity::Device {
                hw_type: issuer.parse()?,
                id,
            }),
            "node" => Ok(FieldNodeIdentity::Node {
                enterprise: issuer.parse()?,
                id,
            }),
            _ => Err(bad()),
        }
    }
}

impl Serialize for FieldNodeIdentity {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for FieldNodeIdentity {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_follow_the_documented_alphabet() {
        for ok in [
            "A",
            "SN-0001",
            "00:1B:44:11:3A:B7",
            "dev.42",
            &"x".repeat(64),
        ] {
            assert!(ok.parse::<PreProvisionedId>().is_ok(), "{ok}");
        }
        for bad in [
            "",
            "-x",
            ".hidden",
            "a b",
            "a/b",
            "a_b",
            "é",
            &"x".repeat(65),
        ] {
            let err = bad.parse::<PreProvisionedId>().unwrap_err();
            assert_eq!(err.kind(), crate::ErrorKind::BadInput, "{bad}");
        }
    }

    #[test]
    fn dns_names_are_canonical() {
        let n: DnsName = "Acme.Example.".parse().unwrap();
        assert_eq!(n.as_str(), "acme.example");
        assert!(n.is_within("example"));
        assert!(n.is_within(".example"));
        assert!(!n.is_within("cme.example"));
        for bad in ["", "a..b", "-a.b", "a_b.c", &"a".repeat(64)] {
            assert!(bad.parse::<DnsName>().is_err(), "{bad}");
        }
    }

    #[test]
    fn canonical_strings_round_trip() {
        for s in [
            "device:1.3.6.1.4.1.99999.1:SN-0001",
            "device:2.25.1:00:1B:44:11:3A:B7",
            "node:acme.example:pump-7",
        ] {
            let id: FieldNodeIdentity = s.parse().unwrap();
            assert_eq!(id.to_string(), s);
            let json = serde_json::to_string(&id).unwrap();
            assert_eq!(
                serde_json::from_str::<FieldNodeIdentity>(&json).unwrap(),
                id
            );
        }
        for bad in ["device:1.2:", "node:Acme Corp:x", "server:x:y", "device"] {
            assert!(bad.parse::<FieldNodeIdentity>().is_err(), "{bad}");
        }
    }

    #[test]
    fn a_subject_key_reads_back_from_its_ledger_text() {
        for (text, server) in [
            ("device:1.3.6.1.4.1.99999.1:SN-1", false),
            ("node:acme.example:pump:1", false),
            ("server:in.m2m.example", true),
        ] {
            let key: SubjectKey = text.parse().unwrap();
            assert_eq!(key.to_string(), text);
            assert_eq!(matches!(key, SubjectKey::Server(_)), server, "{text}");
        }
        // Each is refused by the part that is wrong.
        for (bad, what) in [
            ("server:", "DNS name"),
            ("server:in m2m", "DNS name"),
            ("device:1.2", "field-node identity"),
            ("in.m2m.example", "field-node identity"),
        ] {
            match bad.parse::<SubjectKey>() {
                Err(Error::InvalidValue { what: got, .. }) => assert_eq!(got, what, "{bad}"),
                other => panic!("{bad}: {other:?}"),
            }
        }
    }

    #[test]
    fn oids_parse_strictly() {
        assert_eq!(
            "1.3.6.1.4.1.99999.1".parse::<Oid>().unwrap().to_string(),
            "1.3.6.1.4.1.99999.1"
        );
        for bad in ["1", "3.1", "1.40", "1..2", "a.b", "2.18446744073709551535"] {
            assert!(bad.parse::<Oid>().is_err(), "{bad}");
        }
    }

    #[test]
    fn the_largest_accepted_oid_reads_back_from_der() {
        // 2.(2^64 - 82): its first subidentifier, 2^64 - 2, is the largest yasna writes and
        // reads (`from_certificate` reads hwType with it).
        let oid: Oid = "2.18446744073709551534.7".parse().unwrap();
        let der = yasna::construct_der(|w| {
            w.write_oid(&yasna::models::ObjectIdentifier::from_slice(oid.arcs()))
        });
        let read = yasna::parse_der(&der, |r| r.read_oid()).unwrap();
        assert_eq!(read.components().as_slice(), oid.arcs());
    }
}
