use std::fmt;
use std::str::FromStr;

use crate::Error;

/// The key algorithms m2mpki issues with. P-256 with SHA-256 is the oneM2M default.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, Default, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum KeyType {
    /// ECDSA on NIST P-256 with SHA-256 (the oneM2M mandatory algorithm).
    #[default]
    P256,
    /// ECDSA on NIST P-384 with SHA-384.
    P384,
    /// Ed25519 (RFC 8410).
    Ed25519,
}

impl KeyType {
    /// The rcgen signature algorithm this key type signs with.
    pub fn algorithm(self) -> &'static rcgen::SignatureAlgorithm {
        match self {
            KeyType::P256 => &rcgen::PKCS_ECDSA_P256_SHA256,
            KeyType::P384 => &rcgen::PKCS_ECDSA_P384_SHA384,
            KeyType::Ed25519 => &rcgen::PKCS_ED25519,
        }
    }

    /// The key type that signs with `alg`, if it is one we support.
    pub fn from_algorithm(alg: &rcgen::SignatureAlgorithm) -> Option<Self> {
        [KeyType::P256, KeyType::P384, KeyType::Ed25519]
            .into_iter()
            .find(|kt| kt.algorithm() == alg)
    }

    /// The short name used on the command line and in records.
    pub fn as_str(self) -> &'static str {
        match self {
            KeyType::P256 => "p256",
            KeyType::P384 => "p384",
            KeyType::Ed25519 => "ed25519",
        }
    }
}

impl fmt::Display for KeyType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for KeyType {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        match s.to_ascii_lowercase().as_str() {
            "p256" | "p-256" | "prime256v1" | "secp256r1" => Ok(KeyType::P256),
            "p384" | "p-384" | "secp384r1" => Ok(KeyType::P384),
            "ed25519" => Ok(KeyType::Ed25519),
            _ => Err(Error::UnknownKeyType(s.to_owned())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for kt in [KeyType::P256, KeyType::P384, KeyType::Ed25519] {
            assert_eq!(kt.as_str().parse::<KeyType>().ok(), Some(kt));
            assert_eq!(KeyType::from_algorithm(kt.algorithm()), Some(kt));
        }
        assert!("rsa2048".parse::<KeyType>().is_err());
    }
}
