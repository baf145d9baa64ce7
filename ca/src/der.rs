//! Strict DER for signed objects from outside: certificates, CRLs and CSRs.
//!
//! x509-parser reads BER leniently in places (non-minimal lengths, some tag and length edits
//! inside a Name, any X.509 version number), so objects that OpenSSL and Python `cryptography`
//! refuse to parse could become trust anchors or CRLs. Every such object is first held to the
//! DER rules that matter for telling one encoding from another: definite lengths in their
//! shortest form, constructed values filled exactly by their contents, and the envelope of a
//! signed object (`SEQUENCE { SEQUENCE, SEQUENCE, BIT STRING }`, nothing after it).

/// Deepest nesting of constructed values accepted (certificates nest about ten deep).
const MAX_DEPTH: usize = 32;

/// One TLV: its tag byte(s), whether constructed, and its contents.
struct Tlv<'a> {
    tag: u8,
    constructed: bool,
    contents: &'a [u8],
    /// The whole TLV.
    raw: &'a [u8],
}

/// Reads one TLV from the front of `input`; returns it and the rest.
fn tlv(input: &[u8]) -> Result<(Tlv<'_>, &[u8]), String> {
    let (&tag, mut rest) = input.split_first().ok_or("truncated: a value is missing")?;
    if tag & 0x1f == 0x1f {
        // High tag number form: base-128 digits, the first not 0x80, the last without 0x80.
        let mut first = true;
        loop {
            let (&b, r) = rest.split_first().ok_or("truncated tag")?;
            if first && b == 0x80 {
                return Err("tag number not in its shortest form".into());
            }
            first = false;
            rest = r;
            if b & 0x80 == 0 {
                break;
            }
        }
    }
    let (&len0, r) = rest.split_first().ok_or("truncated length")?;
    rest = r;
    let len = if len0 < 0x80 {
        usize::from(len0)
    } else if len0 == 0x80 {
        return Err("indefinite length (BER, not DER)".into());
    } else {
        let n = usize::from(len0 & 0x7f);
        if n > 4 || n > rest.len() {
            return Err("length too long".into());
        }
        let (bytes, r) = rest.split_at(n);
        rest = r;
        if bytes[0] == 0 {
            return Err("length with a leading zero octet (not DER)".into());
        }
        let len = bytes
            .iter()
            .fold(0usize, |acc, &b| (acc << 8) | usize::from(b));
        if len < 0x80 {
            return Err("long-form length for a short value (not DER)".into());
        }
        len
    };
    if len > rest.len() {
        return Err(format!(
            "a length of {len} runs past the end ({} octets left)",
            rest.len()
        ));
    }
    let (contents, rest) = rest.split_at(len);
    let raw = &input[..input.len() - rest.len()];
    Ok((
        Tlv {
            tag,
            constructed: tag & 0x20 != 0,
            contents,
            raw,
        },
        rest,
    ))
}

/// DER rules for the universal primitives whose encodings can be told apart: an OBJECT
/// IDENTIFIER's subidentifiers are minimal and terminated, a BOOLEAN is one octet 00 or FF, an
/// INTEGER is minimal and not empty, a BIT STRING's unused-bit count is below 8 (0 when empty).
fn check_primitive(v: &Tlv<'_>) -> Result<(), String> {
    let c = v.contents;
    match v.tag {
        0x01 if c != [0x00] && c != [0xff] => Err("a BOOLEAN that is not DER".into()),
        0x02 if c.is_empty()
            || (c.len() > 1 && ((c[0] == 0 && c[1] < 0x80) || (c[0] == 0xff && c[1] >= 0x80))) =>
        {
            Err("an INTEGER that is not in its shortest form".into())
        }
        0x03 if c.is_empty() || c[0] > 7 || (c.len() == 1 && c[0] != 0) => {
            Err("a malformed BIT STRING".into())
        }
        0x06 => {
            let terminated = c.last().is_some_and(|b| b & 0x80 == 0);
            let minimal = c
                .iter()
                .enumerate()
                .all(|(i, &b)| b != 0x80 || (i > 0 && c[i - 1] & 0x80 != 0));
            if terminated && minimal {
                Ok(())
            } else {
                Err("a malformed OBJECT IDENTIFIER".into())
            }
        }
        _ => Ok(()),
    }
}

/// Checks every TLV in `input` (recursing into constructed values) for DER lengths.
fn walk(mut input: &[u8], depth: usize) -> Result<(), String> {
    if depth > MAX_DEPTH {
        return Err("nested too deeply".into());
    }
    while !input.is_empty() {
        let (v, rest) = tlv(input)?;
        if v.constructed {
            walk(v.contents, depth + 1)?;
        } else {
            check_primitive(&v)?;
        }
        input = rest;
    }
    Ok(())
}

/// Checks that `der` is one signed object (certificate, CRL or CSR) in strict DER: the
/// envelope `SEQUENCE { SEQUENCE, SEQUENCE (algorithm), BIT STRING (signature) }` with nothing
/// after it, every length definite and minimal, every constructed value filled exactly.
pub fn check_signed(der: &[u8]) -> Result<(), String> {
    let (outer, rest) = tlv(der)?;
    if !rest.is_empty() {
        return Err(format!("{} octets after the object", rest.len()));
    }
    if outer.tag != 0x30 {
        return Err("not a SEQUENCE".into());
    }
    let mut parts = Vec::with_capacity(3);
    let mut input = outer.contents;
    while !input.is_empty() {
        let (v, r) = tlv(input)?;
        parts.push(v.tag);
        input = r;
    }
    if parts != [0x30, 0x30, 0x03] {
        return Err(
            "not a signed object: expected SEQUENCE { body, algorithm, signature BIT STRING }"
                .into(),
        );
    }
    walk(outer.contents, 1)?;
    let all = items(outer.contents)?;
    check_algorithm(all.get(1), "the signature algorithm")?;
    // A signature is whole octets: x509-parser would hand back the same octets whatever the
    // unused-bits count says, so another encoding of a genuine signature would verify.
    whole_octets(&all[2], "the signature")
}

/// A BIT STRING that holds whole octets (unused-bits count 0): signatures and public keys.
fn whole_octets(v: &Tlv<'_>, what: &str) -> Result<(), String> {
    match v.contents.first() {
        Some(0) => Ok(()),
        _ => Err(format!("{what} is not a whole number of octets")),
    }
}

/// The TLVs directly inside `contents`.
fn items(contents: &[u8]) -> Result<Vec<Tlv<'_>>, String> {
    let mut out = Vec::new();
    let mut input = contents;
    while !input.is_empty() {
        let (v, r) = tlv(input)?;
        out.push(v);
        input = r;
    }
    Ok(out)
}

/// The body (first element) of a signed object that passed [`check_signed`].
fn body(der: &[u8]) -> Result<Vec<Tlv<'_>>, String> {
    let (outer, _) = tlv(der)?;
    let (tbs, _) = tlv(outer.contents)?;
    items(tbs.contents)
}

/// Universal tags, as DER writes them (constructed ones with their constructed bit).
pub(crate) mod tag {
    pub(crate) const BOOLEAN: u8 = 0x01;
    pub(crate) const INTEGER: u8 = 0x02;
    pub(crate) const BIT_STRING: u8 = 0x03;
    pub(crate) const OCTET_STRING: u8 = 0x04;
    pub(crate) const OID: u8 = 0x06;
    pub(crate) const UTF8_STRING: u8 = 0x0c;
    pub(crate) const PRINTABLE_STRING: u8 = 0x13;
    pub(crate) const UTC_TIME: u8 = 0x17;
    pub(crate) const GENERALIZED_TIME: u8 = 0x18;
    pub(crate) const SEQUENCE: u8 = 0x30;
    pub(crate) const SET: u8 = 0x31;
}
use tag::{BIT_STRING, GENERALIZED_TIME, INTEGER, OID, SEQUENCE, SET, UTC_TIME};

fn expect(v: Option<&Tlv<'_>>, tags: &[u8], what: &str) -> Result<(), String> {
    match v {
        Some(v) if tags.contains(&v.tag) => Ok(()),
        Some(v) => Err(format!("{what} has tag 0x{:02x}", v.tag)),
        None => Err(format!("{what} is missing")),
    }
}

/// The character rules of the string types a Name uses: UTF8String is UTF-8, PrintableString
/// the PrintableString set, IA5String ASCII, BMPString UCS-2 (even length), UniversalString
/// UCS-4 (a multiple of four).
fn check_string(v: &Tlv<'_>) -> Result<(), String> {
    let c = v.contents;
    let ok = match v.tag {
        0x0c => std::str::from_utf8(c).is_ok(),
        0x13 => c
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || b" '()+,-./:=?".contains(&b)),
        0x16 => c.is_ascii(),
        0x1e => c.len().is_multiple_of(2),
        0x1c => c.len().is_multiple_of(4),
        _ => true,
    };
    if ok {
        Ok(())
    } else {
        Err(format!(
            "a string of type 0x{:02x} holds characters its type does not allow",
            v.tag
        ))
    }
}

/// A Name: SEQUENCE OF SET OF SEQUENCE { OID, value }.
fn check_name(name: &Tlv<'_>, what: &str) -> Result<(), String> {
    if name.tag != SEQUENCE {
        return Err(format!("{what} is not a SEQUENCE"));
    }
    for rdn in items(name.contents)? {
        if rdn.tag != SET {
            return Err(format!("{what}: a relative name is not a SET"));
        }
        for atv in items(rdn.contents)? {
            let parts = items(atv.contents)?;
            if atv.tag != SEQUENCE || parts.len() != 2 || parts[0].tag != OID {
                return Err(format!(
                    "{what}: an attribute is not SEQUENCE {{ OID, value }}"
                ));
            }
            // Attribute values are universal types (strings, mostly), never context tags,
            // and strings hold what their type allows.
            if parts[1].tag & 0xc0 != 0 {
                return Err(format!(
                    "{what}: an attribute value has a non-universal tag"
                ));
            }
            check_string(&parts[1]).map_err(|e| format!("{what}: {e}"))?;
        }
    }
    Ok(())
}

/// An AlgorithmIdentifier: SEQUENCE { OID, parameters? }.
fn check_algorithm(v: Option<&Tlv<'_>>, what: &str) -> Result<(), String> {
    expect(v, &[SEQUENCE], what)?;
    let parts = items(v.map_or(&[][..], |v| v.contents))?;
    if parts.is_empty() || parts.len() > 2 || parts[0].tag != OID {
        return Err(format!("{what} is not SEQUENCE {{ OID, parameters }}"));
    }
    Ok(())
}

/// Extensions: SEQUENCE OF SEQUENCE { OID, BOOLEAN (critical, optional), OCTET STRING }.
fn check_extensions(exts: &Tlv<'_>) -> Result<(), String> {
    if exts.tag != SEQUENCE {
        return Err("the extensions are not a SEQUENCE".into());
    }
    for ext in items(exts.contents)? {
        let parts = items(ext.contents)?;
        let tags: Vec<u8> = parts.iter().map(|p| p.tag).collect();
        if ext.tag != SEQUENCE || !(tags == [OID, 0x04] || tags == [OID, 0x01, 0x04]) {
            return Err("an extension is not SEQUENCE { OID, critical, OCTET STRING }".into());
        }
    }
    Ok(())
}

/// `[n] EXPLICIT Extensions`.
fn check_explicit_extensions(v: &Tlv<'_>) -> Result<(), String> {
    match items(v.contents)?.as_slice() {
        [exts] => check_extensions(exts),
        _ => Err("the extensions field does not hold one SEQUENCE".into()),
    }
}

/// The shape of a TBSCertificate (RFC 5280 §4.1).
fn check_tbs_certificate(der: &[u8]) -> Result<(), String> {
    let tbs = body(der)?;
    let mut i = 0;
    if tbs.first().is_some_and(|v| v.tag == 0xa0) {
        let version = items(tbs[0].contents)?;
        if version.len() != 1 || version[0].tag != INTEGER {
            return Err("the version is not [0] EXPLICIT INTEGER".into());
        }
        i = 1;
    }
    expect(tbs.get(i), &[INTEGER], "the serial number")?;
    check_algorithm(tbs.get(i + 1), "the signature algorithm")?;
    check_name(tbs.get(i + 2).ok_or("the issuer is missing")?, "the issuer")?;
    expect(tbs.get(i + 3), &[SEQUENCE], "the validity")?;
    let validity = items(tbs[i + 3].contents)?;
    if validity.len() != 2
        || validity
            .iter()
            .any(|t| t.tag != UTC_TIME && t.tag != GENERALIZED_TIME)
    {
        return Err("the validity is not two times".into());
    }
    check_name(
        tbs.get(i + 4).ok_or("the subject is missing")?,
        "the subject",
    )?;
    expect(tbs.get(i + 5), &[SEQUENCE], "the public key")?;
    let spki = items(tbs[i + 5].contents)?;
    if spki.len() != 2 || spki[1].tag != BIT_STRING {
        return Err("the public key is not SEQUENCE { algorithm, BIT STRING }".into());
    }
    whole_octets(&spki[1], "the public key")?;
    check_algorithm(spki.first(), "the public key algorithm")?;
    // id-ecPublicKey names its curve with an OID.
    let alg = items(spki[0].contents)?;
    if alg[0].contents == [0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01]
        && alg.get(1).is_none_or(|p| p.tag != OID)
    {
        return Err("an EC public key whose curve is not an OID".into());
    }
    // issuerUniqueID [1], subjectUniqueID [2], extensions [3], in this order, each at most once.
    let mut last = 0;
    for v in &tbs[i + 6..] {
        let n = match v.tag {
            0x81 => 1,
            0x82 => 2,
            0xa3 => {
                check_explicit_extensions(v)?;
                3
            }
            t => return Err(format!("unexpected field with tag 0x{t:02x}")),
        };
        if n <= last {
            return Err("optional fields out of order".into());
        }
        last = n;
    }
    Ok(())
}

/// The shape of a TBSCertList (RFC 5280 §5.1).
fn check_tbs_crl(der: &[u8]) -> Result<(), String> {
    let tbs = body(der)?;
    let mut i = 0;
    if tbs.first().is_some_and(|v| v.tag == INTEGER) {
        i = 1;
    }
    check_algorithm(tbs.get(i), "the signature algorithm")?;
    check_name(tbs.get(i + 1).ok_or("the issuer is missing")?, "the issuer")?;
    expect(tbs.get(i + 2), &[UTC_TIME, GENERALIZED_TIME], "thisUpdate")?;
    let mut rest = &tbs[i + 3..];
    if rest
        .first()
        .is_some_and(|v| v.tag == UTC_TIME || v.tag == GENERALIZED_TIME)
    {
        rest = &rest[1..];
    }
    if rest.first().is_some_and(|v| v.tag == SEQUENCE) {
        for entry in items(rest[0].contents)? {
            let parts = items(entry.contents)?;
            if entry.tag != SEQUENCE
                || parts.len() < 2
                || parts[0].tag != INTEGER
                || !matches!(parts[1].tag, UTC_TIME | GENERALIZED_TIME)
            {
                return Err("a revoked entry is not SEQUENCE { serial, date, ... }".into());
            }
            match &parts[2..] {
                [] => {}
                [exts] => check_extensions(exts)?,
                _ => return Err("a revoked entry has fields after its extensions".into()),
            }
        }
        rest = &rest[1..];
    }
    match rest {
        [] => Ok(()),
        [ext] if ext.tag == 0xa0 => check_explicit_extensions(ext),
        _ => Err("unexpected fields after the revoked certificates".into()),
    }
}

/// The shape of a CertificationRequestInfo (RFC 2986 §4.1).
fn check_csr_info(der: &[u8]) -> Result<(), String> {
    let info = body(der)?;
    expect(info.first(), &[INTEGER], "the version")?;
    check_name(info.get(1).ok_or("the subject is missing")?, "the subject")?;
    expect(info.get(2), &[SEQUENCE], "the public key")?;
    match &info[3..] {
        [attrs] if attrs.tag == 0xa0 => Ok(()),
        _ => Err("the attributes are not [0] (and nothing else)".into()),
    }
}

/// A distribution point name in comparable form (RFC 5280 §4.2.1.13): a URI, a DNS name
/// (lowercase) or the DER of a directoryName. A name relative to the CRL issuer is resolved to
/// the issuer's Name with the RDN appended, so it compares with full directory names.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum PointName {
    /// uniformResourceIdentifier.
    Uri(String),
    /// dNSName, lowercase.
    Dns(String),
    /// directoryName: the Name's DER.
    Directory(Vec<u8>),
}

/// The distribution point names in a DistributionPointName (`[0]` fullName or `[1]`
/// nameRelativeToCRLIssuer, resolved against `issuer`, the raw Name of the CRL's issuer).
/// Other kinds of names are kept out (they never match).
fn point_names(dpn: &Tlv<'_>, issuer: &[u8]) -> Result<Vec<PointName>, String> {
    match dpn.tag {
        0xa0 => {
            let mut out = Vec::new();
            for gn in items(dpn.contents)? {
                match gn.tag {
                    0x86 => out.push(PointName::Uri(
                        String::from_utf8(gn.contents.to_vec())
                            .map_err(|_| "a URI that is not text")?,
                    )),
                    0x82 => out.push(PointName::Dns(
                        String::from_utf8(gn.contents.to_vec())
                            .map_err(|_| "a DNS name that is not text")?
                            .to_ascii_lowercase(),
                    )),
                    0xa4 => match items(gn.contents)?.as_slice() {
                        [name] if name.tag == SEQUENCE => {
                            out.push(PointName::Directory(name.raw.to_vec()))
                        }
                        _ => return Err("a directoryName that is not one Name".into()),
                    },
                    _ => {}
                }
            }
            Ok(out)
        }
        0xa1 => {
            // The issuer's Name with this RDN (a SET) appended.
            let (name, _) = tlv(issuer)?;
            if name.tag != SEQUENCE {
                return Err("the issuer is not a Name".into());
            }
            let mut contents = name.contents.to_vec();
            contents.push(SET);
            contents.extend_from_slice(&dpn.raw[1..]);
            Ok(vec![PointName::Directory(encode(SEQUENCE, &contents))])
        }
        t => Err(format!("a distribution point name with tag 0x{t:02x}")),
    }
}

/// A TLV with a definite DER length.
fn encode(tag: u8, contents: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    let n = contents.len();
    if n < 0x80 {
        out.push(n as u8);
    } else {
        let bytes: Vec<u8> = n
            .to_be_bytes()
            .into_iter()
            .skip_while(|b| *b == 0)
            .collect();
        out.push(0x80 | bytes.len() as u8);
        out.extend_from_slice(&bytes);
    }
    out.extend_from_slice(contents);
    out
}

/// An issuingDistributionPoint extension (RFC 5280 §5.2.5), read strictly: every field
/// understood, nothing left over.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IssuingDistributionPoint {
    /// The distribution point's names; `None` when absent (the CRL covers every point).
    pub points: Option<Vec<PointName>>,
    /// onlyContainsUserCerts.
    pub only_user: bool,
    /// onlyContainsCACerts.
    pub only_ca: bool,
    /// onlySomeReasons is present.
    pub some_reasons: bool,
    /// indirectCRL.
    pub indirect: bool,
    /// onlyContainsAttributeCerts.
    pub only_attribute: bool,
}

/// Reads an issuingDistributionPoint extension value; `issuer` is the CRL issuer's raw Name.
pub fn issuing_distribution_point(
    value: &[u8],
    issuer: &[u8],
) -> Result<IssuingDistributionPoint, String> {
    let (seq, rest) = tlv(value)?;
    if seq.tag != SEQUENCE || !rest.is_empty() {
        return Err("not one SEQUENCE".into());
    }
    walk(seq.contents, 1)?;
    let mut idp = IssuingDistributionPoint::default();
    let mut last = None;
    for field in items(seq.contents)? {
        let n = field.tag & 0x1f;
        if last.is_some_and(|l| n <= l) || field.tag & 0xc0 != 0x80 {
            return Err("fields out of order or not context-tagged".into());
        }
        last = Some(n);
        let flag = || match field.contents {
            [0xff] => Ok(true),
            _ => Err("a flag that is not TRUE (DER leaves FALSE out)".to_owned()),
        };
        match field.tag {
            0xa0 => {
                let (dpn, rest) = tlv(field.contents)?;
                if !rest.is_empty() {
                    return Err("trailing data in distributionPoint".into());
                }
                idp.points = Some(point_names(&dpn, issuer)?);
            }
            0x81 => idp.only_user = flag()?,
            0x82 => idp.only_ca = flag()?,
            0x83 => idp.some_reasons = true,
            0x84 => idp.indirect = flag()?,
            0x85 => idp.only_attribute = flag()?,
            t => return Err(format!("unknown field with tag 0x{t:02x}")),
        }
    }
    Ok(idp)
}

/// The distribution point names of a cRLDistributionPoints extension value whose points have
/// no cRLIssuer (indirect CRLs are not applied); `issuer` is the certificate issuer's raw Name.
pub fn crl_distribution_points(value: &[u8], issuer: &[u8]) -> Result<Vec<PointName>, String> {
    let (seq, rest) = tlv(value)?;
    if seq.tag != SEQUENCE || !rest.is_empty() {
        return Err("not one SEQUENCE".into());
    }
    walk(seq.contents, 1)?;
    let mut out = Vec::new();
    for dp in items(seq.contents)? {
        if dp.tag != SEQUENCE {
            return Err("a distribution point is not a SEQUENCE".into());
        }
        let fields = items(dp.contents)?;
        if fields.iter().any(|f| f.tag == 0xa2) {
            continue; // cRLIssuer: an indirect CRL's point
        }
        for f in fields.iter().filter(|f| f.tag == 0xa0) {
            let (dpn, _) = tlv(f.contents)?;
            out.extend(point_names(&dpn, issuer)?);
        }
    }
    Ok(out)
}

/// [`check_signed`] for a CRL, with the shape of its TBSCertList.
pub fn check_crl(der: &[u8]) -> Result<(), String> {
    check_signed(der)?;
    check_tbs_crl(der)
}

/// [`check_signed`] for a CSR, with the shape of its CertificationRequestInfo.
pub fn check_csr(der: &[u8]) -> Result<(), String> {
    check_signed(der)?;
    check_csr_info(der)
}

/// [`check_signed`] for a certificate, with the shape of its TBSCertificate; it must also be
/// X.509 version 1, 2 or 3.
pub fn check_certificate(
    der: &[u8],
    cert: &x509_parser::certificate::X509Certificate<'_>,
) -> Result<(), String> {
    check_signed(der)?;
    check_tbs_certificate(der)?;
    if cert.version().0 > 2 {
        return Err(format!(
            "X.509 version {} does not exist (1, 2 or 3)",
            u64::from(cert.version().0) + 1
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert() -> Vec<u8> {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut p = rcgen::CertificateParams::new(vec!["a.example".into()]).unwrap();
        p.distinguished_name = rcgen::DistinguishedName::new();
        p.distinguished_name
            .push(rcgen::DnType::CommonName, "DER test");
        p.self_signed(&key).unwrap().der().to_vec()
    }

    #[test]
    fn signatures_with_unused_bits_are_refused() {
        let der = cert();
        // The unused-bits octet of the signature BIT STRING: the last TLV of the outer SEQUENCE.
        let (outer, _) = tlv(&der).unwrap();
        let parts = items(outer.contents).unwrap();
        let sig = &parts[2];
        let at = der.len() - sig.contents.len();
        assert_eq!(der[at], 0);
        for unused in [1u8, 4, 7] {
            let mut m = der.clone();
            m[at] = unused;
            assert!(check_signed(&m)
                .unwrap_err()
                .contains("whole number of octets"));
        }
    }

    #[test]
    fn well_formed_objects_pass() {
        let der = cert();
        assert_eq!(check_signed(&der), Ok(()));
    }

    #[test]
    fn ber_and_broken_encodings_are_refused() {
        let der = cert();
        // The outer length in long form with a leading zero: BER, not DER.
        let (len0, body) = (der[1], &der[2..]);
        assert_eq!(len0 & 0x80, 0x80, "rcgen writes a long-form outer length");
        let n = usize::from(len0 & 0x7f);
        let mut padded = vec![0x30, 0x80 | (n as u8 + 1), 0];
        padded.extend_from_slice(body);
        assert!(check_signed(&padded).unwrap_err().contains("leading zero"));
        // Indefinite length.
        let mut indefinite = vec![0x30, 0x80];
        indefinite.extend_from_slice(&body[n..]);
        indefinite.extend_from_slice(&[0, 0]);
        assert!(check_signed(&indefinite)
            .unwrap_err()
            .contains("indefinite length"));
        // Trailing bytes, truncation, a changed envelope tag.
        let mut trailing = der.clone();
        trailing.push(0);
        assert_eq!(
            check_signed(&trailing).unwrap_err(),
            "1 octets after the object"
        );
        assert!(check_signed(&der[..der.len() - 1])
            .unwrap_err()
            .contains("runs past the end"));
        let mut retagged = der.clone();
        // The algorithm SEQUENCE follows the TBS inside the outer SEQUENCE.
        let (outer, _) = tlv(&der).unwrap();
        let (_tbs, after_tbs) = tlv(outer.contents).unwrap();
        let at = der.len() - after_tbs.len();
        assert_eq!(der[at], 0x30);
        retagged[at] = 0x31;
        assert!(check_signed(&retagged)
            .unwrap_err()
            .contains("not a signed object"));
        // Every single-octet length edit inside is caught, or leaves a structure that still
        // parses as DER (then x509-parser and the signature decide).
        for i in 0..der.len() {
            let mut m = der.clone();
            m[i] = m[i].wrapping_add(1);
            let _ = check_signed(&m); // never panics
        }
    }
}
