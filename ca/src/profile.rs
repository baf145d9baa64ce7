//! Certificate profiles: policy as data.
//!
//! A profile says what a certificate of its kind must look like. Checking a request against it
//! ([`crate::Authority::approve`]) is separate from signing ([`crate::Authority::sign`]); every
//! field of the certificate (subject, serial, validity, key usage, basic constraints) is set
//! from the profile, never left to rcgen's defaults.

use std::fmt;
use std::str::FromStr;

use m2mpki_hsm::KeyType;
use serde::{Deserialize, Serialize};

use crate::validity::Validity;
use crate::{Error, Result};

/// The kinds of end-entity certificate m2mpki issues.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProfileKind {
    /// Manufacturer-Issued Device Certificate.
    Device,
    /// Enterprise-Issued Node Certificate.
    Node,
    /// Infrastructure Node server certificate.
    Server,
}

impl ProfileKind {
    /// The name used on the command line and in records.
    pub fn as_str(self) -> &'static str {
        match self {
            ProfileKind::Device => "device",
            ProfileKind::Node => "node",
            ProfileKind::Server => "server",
        }
    }
}

impl fmt::Display for ProfileKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ProfileKind {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "device" => Ok(ProfileKind::Device),
            "node" => Ok(ProfileKind::Node),
            "server" => Ok(ProfileKind::Server),
            _ => Err(Error::invalid(
                "profile",
                s,
                "expected device, node or server",
            )),
        }
    }
}

/// Key usages we set (RFC 5280 §4.2.1.3).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum KeyUsage {
    /// digitalSignature.
    DigitalSignature,
    /// keyCertSign.
    KeyCertSign,
    /// cRLSign.
    CrlSign,
}

impl KeyUsage {
    pub(crate) fn to_rcgen(self) -> rcgen::KeyUsagePurpose {
        match self {
            KeyUsage::DigitalSignature => rcgen::KeyUsagePurpose::DigitalSignature,
            KeyUsage::KeyCertSign => rcgen::KeyUsagePurpose::KeyCertSign,
            KeyUsage::CrlSign => rcgen::KeyUsagePurpose::CrlSign,
        }
    }
}

/// Extended key usages we set (RFC 5280 §4.2.1.12).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum ExtKeyUsage {
    /// id-kp-clientAuth.
    ClientAuth,
    /// id-kp-serverAuth.
    ServerAuth,
}

impl ExtKeyUsage {
    /// rcgen's name for it (the reference encoding in tests).
    #[cfg(test)]
    pub(crate) fn to_rcgen(self) -> rcgen::ExtendedKeyUsagePurpose {
        match self {
            ExtKeyUsage::ClientAuth => rcgen::ExtendedKeyUsagePurpose::ClientAuth,
            ExtKeyUsage::ServerAuth => rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        }
    }
}

/// What an end-entity certificate of one kind must look like.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LeafProfile {
    /// Which kind of certificate.
    pub kind: ProfileKind,
    /// keyUsage (always critical).
    pub key_usage: Vec<KeyUsage>,
    /// extendedKeyUsage.
    pub extended_key_usage: Vec<ExtKeyUsage>,
    /// Lifetime when the request names none; `None` means "until the CA expires".
    pub default_validity: Option<Validity>,
    /// Whether `forever` (notAfter 99991231235959Z) may be requested.
    pub allow_forever: bool,
    /// Subject key types accepted.
    pub key_types: Vec<KeyType>,
}

impl LeafProfile {
    /// The built-in profile of a kind.
    ///
    /// - device: keyUsage digitalSignature, EKU clientAuth, valid until the CA expires by
    ///   default, `forever` allowed (IEEE 802.1AR IDevID);
    /// - node: keyUsage digitalSignature, EKU clientAuth, 5 years by default;
    /// - server: keyUsage digitalSignature, EKU serverAuth, 397 days by default.
    pub fn builtin(kind: ProfileKind) -> Self {
        let all_keys = vec![KeyType::P256, KeyType::P384, KeyType::Ed25519];
        match kind {
            ProfileKind::Device => LeafProfile {
                kind,
                key_usage: vec![KeyUsage::DigitalSignature],
                extended_key_usage: vec![ExtKeyUsage::ClientAuth],
                default_validity: None,
                allow_forever: true,
                key_types: all_keys,
            },
            ProfileKind::Node => LeafProfile {
                kind,
                key_usage: vec![KeyUsage::DigitalSignature],
                extended_key_usage: vec![ExtKeyUsage::ClientAuth],
                default_validity: Some(Validity::Years(5)),
                allow_forever: false,
                key_types: all_keys,
            },
            ProfileKind::Server => LeafProfile {
                kind,
                key_usage: vec![KeyUsage::DigitalSignature],
                extended_key_usage: vec![ExtKeyUsage::ServerAuth],
                default_validity: Some(Validity::Days(397)),
                allow_forever: false,
                key_types: all_keys,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn profiles_are_data() {
        for kind in [ProfileKind::Device, ProfileKind::Node, ProfileKind::Server] {
            let p = LeafProfile::builtin(kind);
            let json = serde_json::to_string(&p).unwrap();
            let back: LeafProfile = serde_json::from_str(&json).unwrap();
            assert_eq!(back, p);
            assert_eq!(kind.as_str().parse::<ProfileKind>().unwrap(), kind);
        }
        let with_unknown = r#"{"kind":"device","key_usage":[],"extended_key_usage":[],
            "default_validity":null,"allow_forever":true,"key_types":["p256"],"surprise":1}"#;
        assert!(serde_json::from_str::<LeafProfile>(with_unknown).is_err());
    }
}
