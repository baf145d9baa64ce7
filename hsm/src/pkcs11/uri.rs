//! RFC 7512 PKCS#11 URIs: `pkcs11:token=CA;object=ca-key;id=%01?pin-source=/run/pin`.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use zeroize::Zeroizing;

use crate::{Error, Result};

/// A parsed PKCS#11 URI naming a token and (usually) a key object on it.
///
/// `Display` and `Debug` never show a `pin-value`.
#[derive(Clone, Default, PartialEq, Eq, Hash)]
pub struct Pkcs11Uri {
    /// `token=`: the token label.
    pub token: Option<String>,
    /// `serial=`: the token serial number.
    pub serial: Option<String>,
    /// `slot-id=`: the slot number.
    pub slot_id: Option<u64>,
    /// `object=`: the object label (CKA_LABEL).
    pub object: Option<String>,
    /// `id=`: the object id (CKA_ID), raw bytes.
    pub id: Option<Vec<u8>>,
    /// `module-path=`: the PKCS#11 module to load.
    pub module_path: Option<PathBuf>,
    /// `pin-source=`: a file whose first line is the PIN.
    pub pin_source: Option<PathBuf>,
    pub(crate) pin_value: Option<PinValue>,
}

#[derive(Clone, PartialEq, Eq)]
pub(crate) struct PinValue(Zeroizing<String>);

impl std::hash::Hash for PinValue {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.0.as_str().hash(state)
    }
}

impl Pkcs11Uri {
    /// The `pin-value` attribute, if the URI carries one (discouraged: it puts the PIN in
    /// shell history and process listings).
    pub fn pin_value(&self) -> Option<&str> {
        self.pin_value.as_ref().map(|p| p.0.as_str())
    }

    /// The same URI without any PIN attribute (`pin-value`), safe to store and print.
    pub fn without_pin_value(&self) -> Self {
        Pkcs11Uri {
            pin_value: None,
            ..self.clone()
        }
    }

    /// The same token (module, PIN source) with the object labelled `label` (and no id).
    pub fn for_object(&self, label: &str) -> Self {
        Pkcs11Uri {
            object: Some(label.to_owned()),
            id: None,
            ..self.clone()
        }
    }

    /// Whether the URI names an object (by label or id).
    pub fn names_object(&self) -> bool {
        self.object.is_some() || self.id.is_some()
    }
}

fn bad(uri: &str, reason: impl Into<String>) -> Error {
    Error::BadPkcs11Uri {
        // Never echo a URI that may hold a PIN.
        uri: if uri.contains("pin-value") {
            "(a URI with pin-value)".to_owned()
        } else {
            uri.to_owned()
        },
        reason: reason.into(),
    }
}

fn percent_decode(uri: &str, s: &str) -> Result<Vec<u8>> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| bad(uri, format!("bad percent-encoding in `{s}`")))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    Ok(out)
}

fn text(uri: &str, key: &str, s: &str) -> Result<String> {
    String::from_utf8(percent_decode(uri, s)?)
        .map_err(|_| bad(uri, format!("`{key}` is not UTF-8")))
}

/// Percent-encodes everything but RFC 3986 unreserved characters (and `/` in paths).
fn encode(s: &[u8], keep_slash: bool) -> String {
    let mut out = String::new();
    for &b in s {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) || (keep_slash && b == b'/') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

impl FromStr for Pkcs11Uri {
    type Err = Error;

    fn from_str(uri: &str) -> Result<Self> {
        let rest = uri
            .strip_prefix("pkcs11:")
            .ok_or_else(|| bad(uri, "does not start with `pkcs11:`"))?;
        let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
        let mut u = Pkcs11Uri::default();
        let mut seen = std::collections::HashSet::new();
        let pairs = path
            .split(';')
            .filter(|p| !p.is_empty())
            .map(|p| (p, true))
            .chain(
                query
                    .split('&')
                    .filter(|p| !p.is_empty())
                    .map(|p| (p, false)),
            );
        for (pair, in_path) in pairs {
            let (key, value) = pair
                .split_once('=')
                .ok_or_else(|| bad(uri, format!("`{pair}` is not attribute=value")))?;
            if !seen.insert(key.to_owned()) {
                return Err(bad(uri, format!("`{key}` appears twice")));
            }
            match (key, in_path) {
                ("token", true) => u.token = Some(text(uri, key, value)?),
                ("serial", true) => u.serial = Some(text(uri, key, value)?),
                ("slot-id", true) => {
                    u.slot_id = Some(
                        text(uri, key, value)?
                            .parse()
                            .map_err(|_| bad(uri, "slot-id must be a number"))?,
                    )
                }
                ("object", true) => u.object = Some(text(uri, key, value)?),
                ("id", true) => u.id = Some(percent_decode(uri, value)?),
                ("type", true) => {
                    let t = text(uri, key, value)?;
                    if !matches!(t.as_str(), "private" | "public" | "cert") {
                        return Err(bad(uri, format!("unsupported type `{t}`")));
                    }
                }
                // Informational attributes we accept and do not need.
                (
                    "manufacturer"
                    | "model"
                    | "library-manufacturer"
                    | "library-description"
                    | "library-version"
                    | "slot-description"
                    | "slot-manufacturer",
                    true,
                ) => {}
                ("module-path", false) => {
                    u.module_path = Some(PathBuf::from(text(uri, key, value)?))
                }
                ("module-name", false) => {
                    return Err(bad(uri, "module-name is not supported; use module-path"))
                }
                ("pin-source", false) => {
                    let src = text(uri, key, value)?;
                    let src = src.strip_prefix("file:").unwrap_or(&src).to_owned();
                    u.pin_source = Some(PathBuf::from(src));
                }
                ("pin-value", false) => {
                    u.pin_value = Some(PinValue(Zeroizing::new(text(uri, key, value)?)))
                }
                _ => return Err(bad(uri, format!("unknown attribute `{key}`"))),
            }
        }
        let selectors = [u.token.is_some(), u.serial.is_some(), u.slot_id.is_some()];
        if selectors.iter().filter(|s| **s).count() > 1 {
            return Err(bad(uri, "token, serial and slot-id are mutually exclusive"));
        }
        if u.pin_source.is_some() && u.pin_value.is_some() {
            return Err(bad(uri, "pin-source and pin-value are mutually exclusive"));
        }
        Ok(u)
    }
}

impl fmt::Display for Pkcs11Uri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut path = Vec::new();
        if let Some(t) = &self.token {
            path.push(format!("token={}", encode(t.as_bytes(), false)));
        }
        if let Some(s) = &self.serial {
            path.push(format!("serial={}", encode(s.as_bytes(), false)));
        }
        if let Some(s) = self.slot_id {
            path.push(format!("slot-id={s}"));
        }
        if let Some(o) = &self.object {
            path.push(format!("object={}", encode(o.as_bytes(), false)));
        }
        if let Some(id) = &self.id {
            let hex: String = id.iter().map(|b| format!("%{b:02X}")).collect();
            path.push(format!("id={hex}"));
        }
        let mut query = Vec::new();
        if let Some(m) = &self.module_path {
            query.push(format!(
                "module-path={}",
                encode(m.as_os_str().as_encoded_bytes(), true)
            ));
        }
        if let Some(p) = &self.pin_source {
            query.push(format!(
                "pin-source={}",
                encode(p.as_os_str().as_encoded_bytes(), true)
            ));
        }
        write!(f, "pkcs11:{}", path.join(";"))?;
        if !query.is_empty() {
            write!(f, "?{}", query.join("&"))?;
        }
        Ok(())
    }
}

impl fmt::Debug for Pkcs11Uri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Pkcs11Uri({self}")?;
        if self.pin_value.is_some() {
            f.write_str(" pin-value=<redacted>")?;
        }
        f.write_str(")")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_rfc7512_examples() {
        let u: Pkcs11Uri =
            "pkcs11:token=My%20Token;object=ca%20key;id=%01%02?module-path=/usr/lib/softhsm/libsofthsm2.so&pin-source=file:/run/pin"
                .parse()
                .unwrap();
        assert_eq!(u.token.as_deref(), Some("My Token"));
        assert_eq!(u.object.as_deref(), Some("ca key"));
        assert_eq!(u.id.as_deref(), Some(&[1u8, 2][..]));
        assert_eq!(
            u.module_path,
            Some(PathBuf::from("/usr/lib/softhsm/libsofthsm2.so"))
        );
        assert_eq!(u.pin_source, Some(PathBuf::from("/run/pin")));
        let again: Pkcs11Uri = u.to_string().parse().unwrap();
        assert_eq!(again, u);
        let s: Pkcs11Uri = "pkcs11:slot-id=3;object=k".parse().unwrap();
        assert_eq!(s.slot_id, Some(3));
    }

    #[test]
    fn refuses_what_it_cannot_honour() {
        for bad in [
            "pkcs12:token=a",
            "pkcs11:token=a;serial=b",
            "pkcs11:token=a;slot-id=1",
            "pkcs11:token=a;token=b",
            "pkcs11:token=%zz",
            "pkcs11:slot-id=x",
            "pkcs11:frobnicate=1",
            "pkcs11:token=a?pin-source=x&pin-value=y",
            "pkcs11:token=a;module-path=/x",
        ] {
            assert!(bad.parse::<Pkcs11Uri>().is_err(), "{bad}");
        }
    }

    #[test]
    fn pin_value_is_never_shown() {
        let u: Pkcs11Uri = "pkcs11:token=t;object=k?pin-value=123456".parse().unwrap();
        assert_eq!(u.pin_value(), Some("123456"));
        assert!(!u.to_string().contains("123456"));
        assert!(!format!("{u:?}").contains("123456"));
        let e = "pkcs11:token=t;bogus=1?pin-value=123456"
            .parse::<Pkcs11Uri>()
            .unwrap_err();
        assert!(!e.to_string().contains("123456"));
    }
}
