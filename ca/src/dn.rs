//! Distinguished names as users type them: `CN=Acme Root CA,O=Acme,C=DE`.

use rcgen::{DistinguishedName, DnType, DnValue};

use crate::identity::SERIAL_NUMBER_ATTR;
use crate::{Error, Result};

/// Parses an RFC 4514-style DN (`CN=Root,O=Acme,C=DE`, most specific first; `\,` escapes a
/// comma) or an OpenSSL-style one (`/C=DE/O=Acme/CN=Root`, most general first).
///
/// Supported attributes: C, ST, L, O, OU, CN, serialNumber. Country is two letters and
/// encoded as PrintableString, as X.520 requires; the others are UTF8String.
pub fn parse_dn(s: &str) -> Result<DistinguishedName> {
    let bad = |reason: String| Error::invalid("subject", s, reason);
    let mut parts: Vec<String> = Vec::new();
    if let Some(rest) = s.strip_prefix('/') {
        parts.extend(rest.split('/').map(str::to_owned));
    } else {
        let mut cur = String::new();
        let mut chars = s.chars();
        while let Some(c) = chars.next() {
            match c {
                '\\' => cur.extend(chars.next()),
                ',' => parts.push(std::mem::take(&mut cur)),
                _ => cur.push(c),
            }
        }
        parts.push(cur);
        parts.reverse();
    }
    let mut dn = DistinguishedName::new();
    let mut count = 0;
    for part in &parts {
        let (key, value) = part
            .split_once('=')
            .ok_or_else(|| bad(format!("`{part}` is not ATTRIBUTE=value")))?;
        let (key, value) = (key.trim(), value.trim());
        if value.is_empty() {
            return Err(bad(format!("{key} has an empty value")));
        }
        if value.chars().count() > 64 {
            return Err(bad(format!("{key} is longer than 64 characters")));
        }
        let ty = match key.to_ascii_lowercase().as_str() {
            "c" => {
                if value.len() != 2 || !value.chars().all(|c| c.is_ascii_uppercase()) {
                    return Err(bad("C must be a two-letter country code such as DE".into()));
                }
                let v = value
                    .to_owned()
                    .try_into()
                    .map_err(|_| bad("bad C".into()))?;
                dn.push(DnType::CountryName, DnValue::PrintableString(v));
                count += 1;
                continue;
            }
            "st" => DnType::StateOrProvinceName,
            "l" => DnType::LocalityName,
            "o" => DnType::OrganizationName,
            "ou" => DnType::OrganizationalUnitName,
            "cn" => DnType::CommonName,
            "serialnumber" => {
                let v = value
                    .to_owned()
                    .try_into()
                    .map_err(|_| bad("serialNumber must be PrintableString".into()))?;
                dn.push(
                    DnType::CustomDnType(SERIAL_NUMBER_ATTR.to_vec()),
                    DnValue::PrintableString(v),
                );
                count += 1;
                continue;
            }
            _ => {
                return Err(bad(format!(
                    "unsupported attribute `{key}` (use C, ST, L, O, OU, CN, serialNumber)"
                )))
            }
        };
        if dn.get(&ty).is_some() {
            return Err(bad(format!("{key} appears twice")));
        }
        dn.push(ty, DnValue::Utf8String(value.to_owned()));
        count += 1;
    }
    if count == 0 || dn.get(&DnType::CommonName).is_none() {
        return Err(bad("a CN is required".into()));
    }
    Ok(dn)
}

/// The DN as text, most specific attribute first (`CN=Root, O=Acme, C=DE`).
pub fn dn_to_string(dn: &DistinguishedName) -> String {
    let mut parts: Vec<String> = dn
        .iter()
        .map(|(ty, value)| {
            let key = match ty {
                DnType::CountryName => "C".to_owned(),
                DnType::StateOrProvinceName => "ST".to_owned(),
                DnType::LocalityName => "L".to_owned(),
                DnType::OrganizationName => "O".to_owned(),
                DnType::OrganizationalUnitName => "OU".to_owned(),
                DnType::CommonName => "CN".to_owned(),
                DnType::CustomDnType(oid) if oid == SERIAL_NUMBER_ATTR => "serialNumber".to_owned(),
                DnType::CustomDnType(oid) => {
                    oid.iter().map(u64::to_string).collect::<Vec<_>>().join(".")
                }
                _ => "?".to_owned(),
            };
            let value = match value {
                DnValue::PrintableString(s) => s.as_str().to_owned(),
                DnValue::Utf8String(s) => s.clone(),
                DnValue::Ia5String(s) => s.as_str().to_owned(),
                _ => "?".to_owned(),
            };
            format!("{key}={value}")
        })
        .collect();
    parts.reverse();
    parts.join(", ")
}

/// The organization (O) of a DN, if any.
pub fn organization(dn: &DistinguishedName) -> Option<String> {
    match dn.get(&DnType::OrganizationName)? {
        DnValue::Utf8String(s) => Some(s.clone()),
        DnValue::PrintableString(s) => Some(s.as_str().to_owned()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_syntaxes_give_the_same_name() {
        let a = parse_dn("CN=Acme Root\\, Inc,O=Acme,C=DE").unwrap();
        let b = parse_dn("/C=DE/O=Acme/CN=Acme Root, Inc").unwrap();
        assert_eq!(dn_to_string(&a), dn_to_string(&b));
        assert_eq!(dn_to_string(&a), "CN=Acme Root, Inc, O=Acme, C=DE");
        assert_eq!(organization(&a).as_deref(), Some("Acme"));
    }

    #[test]
    fn bad_names_are_refused() {
        for bad in [
            "",
            "O=Acme",
            "CN=",
            "CN=x,XX=y",
            "CN=a,C=Germany",
            "CN=a,CN=b",
            "CN",
        ] {
            assert!(parse_dn(bad).is_err(), "{bad}");
        }
    }
}
