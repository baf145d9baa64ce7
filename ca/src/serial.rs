//! Certificate serial numbers.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// A certificate serial number (big-endian magnitude, as it appears in the certificate).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Serial(Vec<u8>);

impl Serial {
    /// A fresh serial: 16 random octets, positive, with a non-zero first octet so its DER
    /// encoding is always exactly 16 octets (RFC 5280 §4.1.2.2 allows up to 20).
    pub fn random() -> Result<Self> {
        let mut b = [0u8; 16];
        aws_lc_rs::rand::fill(&mut b).map_err(|_| Error::internal("random source failed"))?;
        b[0] &= 0x7f;
        if b[0] == 0 {
            b[0] = 1;
        }
        Ok(Serial(b.to_vec()))
    }

    /// The serial's bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// A serial from the bytes of a certificate's serial field (leading zeros dropped).
    pub fn from_bytes(bytes: &[u8]) -> Self {
        let start = bytes.iter().position(|b| *b != 0).unwrap_or(bytes.len());
        Serial(bytes[start..].to_vec())
    }
}

impl FromStr for Serial {
    type Err = Error;

    /// Hex, with or without `:` separators or a `0x` prefix.
    fn from_str(s: &str) -> Result<Self> {
        let cleaned: String = s
            .trim_start_matches("0x")
            .chars()
            .filter(|c| *c != ':')
            .collect();
        if cleaned.is_empty() || cleaned.len() > 40 {
            return Err(Error::invalid(
                "serial",
                s,
                "expected 1 to 20 octets of hex",
            ));
        }
        let padded = if cleaned.len() % 2 == 1 {
            format!("0{cleaned}")
        } else {
            cleaned
        };
        let bytes = hex::decode(&padded).map_err(|_| Error::invalid("serial", s, "not hex"))?;
        Ok(Serial::from_bytes(&bytes))
    }
}

impl TryFrom<String> for Serial {
    type Error = Error;
    fn try_from(s: String) -> Result<Self> {
        s.parse()
    }
}

impl From<Serial> for String {
    fn from(s: Serial) -> String {
        s.to_string()
    }
}

impl fmt::Display for Serial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(&self.0))
    }
}

impl fmt::Debug for Serial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Serial({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_serials_are_positive_16_octets() {
        for _ in 0..1000 {
            let s = Serial::random().unwrap();
            assert_eq!(s.as_bytes().len(), 16);
            assert!(s.as_bytes()[0] != 0 && s.as_bytes()[0] < 0x80);
            assert_eq!(s.to_string().parse::<Serial>().unwrap(), s);
        }
        assert_eq!("0a:0B".parse::<Serial>().unwrap().to_string(), "0a0b");
        assert!("xyz".parse::<Serial>().is_err());
    }
}
