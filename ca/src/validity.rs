//! Certificate lifetimes as users write them: `20y`, `365d`, `12h` or `forever`.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::{Error, Result};

/// How long a certificate is valid from its notBefore.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum Validity {
    /// A number of calendar years.
    Years(u16),
    /// A number of days.
    Days(u32),
    /// A number of hours.
    Hours(u32),
    /// No well-defined expiry: notAfter 99991231235959Z (RFC 5280 §4.1.2.5, IEEE 802.1AR).
    Forever,
}

/// The notAfter that means "no expiry" (RFC 5280 §4.1.2.5).
pub fn forever() -> OffsetDateTime {
    // 9999-12-31T23:59:59Z as a Unix timestamp; always in range for `time`.
    OffsetDateTime::from_unix_timestamp(253_402_300_799).unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

impl Validity {
    /// The notAfter for a certificate whose notBefore is `from`.
    pub fn not_after(self, from: OffsetDateTime) -> OffsetDateTime {
        let capped = |t: Option<OffsetDateTime>| t.map_or_else(forever, |t| t.min(forever()));
        match self {
            Validity::Forever => forever(),
            Validity::Days(d) => capped(from.checked_add(time::Duration::days(d.into()))),
            Validity::Hours(h) => capped(from.checked_add(time::Duration::hours(h.into()))),
            Validity::Years(y) => {
                let year = from.year() + i32::from(y);
                if year > 9999 {
                    return forever();
                }
                // 29 February plus N years lands on 28 February in common years.
                from.replace_year(year)
                    .or_else(|_| from.replace_day(28).and_then(|t| t.replace_year(year)))
                    .map_or_else(|_| forever(), |t| t.min(forever()))
            }
        }
    }
}

impl FromStr for Validity {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let bad = || {
            Error::invalid(
                "validity",
                s,
                "expected a number with a unit (20y, 365d, 12h) or `forever`",
            )
        };
        if s.eq_ignore_ascii_case("forever") {
            return Ok(Validity::Forever);
        }
        let split = s.len().checked_sub(1).ok_or_else(bad)?;
        let (num, unit) = s.split_at(split);
        let n: u32 = num.parse().map_err(|_| bad())?;
        if n == 0 {
            return Err(bad());
        }
        match unit {
            "y" => Ok(Validity::Years(u16::try_from(n).map_err(|_| bad())?)),
            "d" => Ok(Validity::Days(n)),
            "h" => Ok(Validity::Hours(n)),
            _ => Err(bad()),
        }
    }
}

impl TryFrom<String> for Validity {
    type Error = Error;
    fn try_from(s: String) -> Result<Self> {
        s.parse()
    }
}

impl From<Validity> for String {
    fn from(v: Validity) -> String {
        v.to_string()
    }
}

impl fmt::Display for Validity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Validity::Years(n) => write!(f, "{n}y"),
            Validity::Days(n) => write!(f, "{n}d"),
            Validity::Hours(n) => write!(f, "{n}h"),
            Validity::Forever => f.write_str("forever"),
        }
    }
}

/// Parses an RFC 3339 timestamp given on the command line.
pub fn parse_time(what: &'static str, s: &str) -> Result<OffsetDateTime> {
    OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).map_err(|e| {
        Error::invalid(
            what,
            s,
            format!("expected RFC 3339 such as 2030-01-01T00:00:00Z ({e})"),
        )
    })
}

/// Formats a time as RFC 3339 (UTC) for output.
pub fn format_time(t: OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| t.unix_timestamp().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    #[test]
    fn parses_and_computes() {
        let from = datetime!(2024-02-29 12:00 UTC);
        assert_eq!(
            "1y".parse::<Validity>().unwrap().not_after(from),
            datetime!(2025-02-28 12:00 UTC)
        );
        assert_eq!(
            "10d".parse::<Validity>().unwrap().not_after(from),
            datetime!(2024-03-10 12:00 UTC)
        );
        assert_eq!(
            "forever".parse::<Validity>().unwrap().not_after(from),
            datetime!(9999-12-31 23:59:59 UTC)
        );
        assert_eq!(
            "9000y".parse::<Validity>().unwrap().not_after(from),
            forever()
        );
        for bad in ["", "y", "0d", "12", "3w", "-1d", "99999999999d"] {
            assert!(bad.parse::<Validity>().is_err(), "{bad}");
        }
        for v in ["20y", "365d", "12h", "forever"] {
            assert_eq!(v.parse::<Validity>().unwrap().to_string(), v);
        }
    }
}
