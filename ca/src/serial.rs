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
    /// A fresh serial: 16 octets, the first 6 the issuing time in milliseconds since the Unix
    /// epoch (big-endian), the other 10 (80 bits) from the CSPRNG.
    ///
    /// 80 random bits are more than the 64 the CA/Browser Forum asks for, so serials stay
    /// unpredictable; the time prefix makes them ascend, so the ledger's B-trees take a batch
    /// of new certificates on a few pages at their right edge instead of dirtying a random
    /// page per certificate (measured in docs/benchmarks.md). The time prefix is at least
    /// 2^40 ms (2004) and below 2^47 ms, so the first octet is non-zero and below 0x80: the
    /// serial is positive and its DER encoding always 16 octets (RFC 5280 §4.1.2.2 allows 20).
    pub fn random() -> Result<Self> {
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_err(|_| Error::internal("the system clock is before 1970"))?
            .as_millis();
        // Clamped into [2^40, 2^47) whatever the clock says; a wrong clock costs order, not
        // uniqueness or positivity.
        let prefix = (now_ms as u64).clamp(1 << 40, (1 << 47) - 1);
        let mut b = [0u8; 16];
        b[..6].copy_from_slice(&prefix.to_be_bytes()[2..]);
        aws_lc_rs::rand::fill(&mut b[6..]).map_err(|_| Error::internal("random source failed"))?;
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

    #[test]
    fn serials_ascend_with_time_and_keep_80_random_bits() {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        let a = Serial::random().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(3));
        let b = Serial::random().unwrap();
        assert!(a < b, "{a} then {b}");
        let prefix = |s: &Serial| {
            let mut p = [0u8; 8];
            p[2..].copy_from_slice(&s.as_bytes()[..6]);
            u64::from_be_bytes(p)
        };
        assert!(prefix(&a) >= now && prefix(&a) < now + 5_000);
        // The random parts differ even within one millisecond.
        let many: std::collections::HashSet<Vec<u8>> = (0..10_000)
            .map(|_| Serial::random().unwrap().as_bytes()[6..].to_vec())
            .collect();
        assert_eq!(many.len(), 10_000);
    }
}
