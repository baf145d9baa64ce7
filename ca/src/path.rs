//! m2mpki's own certification path validation (RFC 5280 §6.1 without policy processing), for
//! the chains rustls-webpki refuses by design: those under a CA whose nameConstraints carry
//! URI, directoryName or rfc822Name subtrees (webpki implements none of the three and refuses
//! every leaf with such a name below them; rustls/webpki#19 and #514). TS-0003 asks for name
//! constraints on CA certificates, and an enterprise CA constrains its node identities
//! (`onem2m-node://<enterprise>/<ID>`) by URI domain, so [`crate::verify`] sends those chains
//! here. Everything else still goes through rustls-webpki; both are run over NIST PKITS by
//! `ca/tests/pkits.rs`.
//!
//! What is checked, for a path leaf → intermediates of the chain → an anchor of the set: every
//! signature (the algorithms webpki accepts, with matching inner and outer algorithm
//! identifiers), validity of the leaf and each intermediate at the time, basicConstraints
//! (an issuer must be a CA, the leaf must not be), pathLenConstraint (self-issued
//! intermediates not counted, as §4.2.1.9 says), unknown critical extensions refused, an EKU on
//! any certificate must allow the purpose, and the name constraints of the anchor and of every
//! intermediate on the names of the certificates below it (dNSName, uniformResourceIdentifier,
//! rfc822Name, iPAddress, directoryName; a constraint of any other name form refuses a
//! certificate that carries a name of that form). The caller then checks what it checks for
//! webpki's paths too: anchor validity, keyCertSign, the leaf's EKU, identity and revocation.

use x509_parser::extensions::{GeneralName, GeneralSubtree, ParsedExtension};
use x509_parser::prelude::{FromDer, X509Certificate, X509Name};

use crate::refusal::{unsupported_algorithm, Purpose, Refusal};

/// Most intermediates on one path (webpki allows six sub-CAs).
const MAX_INTERMEDIATES: usize = 6;
/// Most candidate issuers tried while building paths, all branches together.
const MAX_STEPS: usize = 200;

/// A validated path: the leaf first, then the intermediates, then the anchor; and the index of
/// the anchor in the slice of anchors given.
pub(crate) struct Validated {
    pub(crate) ders: Vec<Vec<u8>>,
    pub(crate) anchor: usize,
}

fn parse<'a>(der: &'a [u8], what: &str) -> Result<X509Certificate<'a>, Refusal> {
    X509Certificate::from_der(der)
        .map(|(_, c)| c)
        .map_err(|e| Refusal::Unusable(format!("malformed {what} ({e})")))
}

struct Parsed<'a> {
    der: &'a [u8],
    cert: X509Certificate<'a>,
}

/// Validates `leaf` up to one of `anchors` (DER certificates) through `intermediates`, at
/// `at` (Unix seconds), for `purpose`.
pub(crate) fn validate(
    leaf: &[u8],
    intermediates: &[Vec<u8>],
    anchors: &[&[u8]],
    at: i64,
    purpose: Purpose,
) -> Result<Validated, Refusal> {
    let leaf = Parsed {
        der: leaf,
        cert: parse(leaf, "leaf certificate")?,
    };
    let pool = intermediates
        .iter()
        .map(|d| {
            Ok(Parsed {
                der: d,
                cert: parse(d, "intermediate certificate")?,
            })
        })
        .collect::<Result<Vec<_>, Refusal>>()?;
    // An anchor that does not parse cannot be a path's end; the set refuses such files anyway.
    let roots: Vec<(usize, Parsed<'_>)> = anchors
        .iter()
        .enumerate()
        .filter_map(|(i, d)| {
            X509Certificate::from_der(d)
                .ok()
                .map(|(_, cert)| (i, Parsed { der: d, cert }))
        })
        .collect();
    let mut search = Search {
        pool: &pool,
        roots: &roots,
        at,
        purpose,
        steps: 0,
        error: None,
    };
    let mut path = vec![&leaf];
    match search.extend(&mut path) {
        Some(anchor) => {
            let mut ders: Vec<Vec<u8>> = path.iter().map(|p| p.der.to_vec()).collect();
            ders.push(roots[anchor].1.der.to_vec());
            Ok(Validated {
                ders,
                anchor: roots[anchor].0,
            })
        }
        None => Err(search.error.unwrap_or(Refusal::UnknownRoot)),
    }
}

struct Search<'s, 'a> {
    pool: &'s [Parsed<'a>],
    roots: &'s [(usize, Parsed<'a>)],
    at: i64,
    purpose: Purpose,
    steps: usize,
    /// The most telling refusal met so far: any reason beats "no root".
    error: Option<Refusal>,
}

impl<'s, 'a> Search<'s, 'a> {
    fn note(&mut self, r: Refusal) {
        if matches!(self.error, None | Some(Refusal::UnknownRoot)) {
            self.error = Some(r);
        }
    }

    /// Depth-first: completes `path` (leaf first) to an anchor; returns the index into `roots`.
    fn extend(&mut self, path: &mut Vec<&'s Parsed<'a>>) -> Option<usize> {
        let depth = path.len() - 1;
        let head = path[depth];
        if let Err(r) = issuer_independent(head, depth, self.at, self.purpose) {
            self.note(r);
            return None;
        }
        let issuer = head.cert.issuer().as_raw();
        for (i, (_, root)) in self.roots.iter().enumerate() {
            if root.cert.subject().as_raw() != issuer {
                continue;
            }
            self.steps += 1;
            match complete(path, root) {
                Ok(()) => return Some(i),
                Err(r) => self.note(r),
            }
        }
        if depth >= MAX_INTERMEDIATES {
            self.note(Refusal::PathTooLong);
            return None;
        }
        for cand in self.pool {
            if cand.cert.subject().as_raw() != issuer
                || path.iter().any(|p| {
                    p.cert.public_key().raw == cand.cert.public_key().raw
                        && p.cert.subject().as_raw() == cand.cert.subject().as_raw()
                })
            {
                continue;
            }
            self.steps += 1;
            if self.steps > MAX_STEPS {
                self.note(Refusal::Unusable("too many candidate paths to try".into()));
                return None;
            }
            path.push(cand);
            if let Some(found) = self.extend(path) {
                return Some(found);
            }
            path.pop();
        }
        None
    }
}

/// What can be judged of one certificate at its position (`depth` 0 is the leaf) without its
/// issuer: validity, basicConstraints, critical extensions, EKU.
fn issuer_independent(
    p: &Parsed<'_>,
    depth: usize,
    at: i64,
    purpose: Purpose,
) -> Result<(), Refusal> {
    let c = &p.cert;
    let v = c.validity();
    let fmt = |t: &x509_parser::time::ASN1Time| crate::validity::format_time(t.to_datetime());
    if at > v.not_after.timestamp() {
        return Err(if depth == 0 {
            Refusal::Expired(fmt(&v.not_after))
        } else {
            Refusal::IntermediateExpired(fmt(&v.not_after))
        });
    }
    if at < v.not_before.timestamp() {
        return Err(if depth == 0 {
            Refusal::NotYetValid(fmt(&v.not_before))
        } else {
            Refusal::IntermediateNotYetValid(fmt(&v.not_before))
        });
    }
    // Critical extensions m2mpki understands; anything else critical refuses the certificate
    // (policy extensions included: no policy processing here).
    use x509_parser::oid_registry as o;
    let known = [
        o::OID_X509_EXT_KEY_USAGE,
        o::OID_X509_EXT_SUBJECT_ALT_NAME,
        o::OID_X509_EXT_BASIC_CONSTRAINTS,
        o::OID_X509_EXT_NAME_CONSTRAINTS,
        o::OID_X509_EXT_CRL_DISTRIBUTION_POINTS,
        o::OID_X509_EXT_EXTENDED_KEY_USAGE,
    ];
    if let Some(e) = c
        .extensions()
        .iter()
        .find(|e| e.critical && !known.contains(&e.oid))
    {
        return Err(Refusal::Unusable(format!(
            "certificate `{}` carries the critical extension {} that m2mpki does not process",
            c.subject(),
            e.oid.to_id_string()
        )));
    }
    let bc = c.basic_constraints().map_err(|e| {
        Refusal::Unusable(format!(
            "the basicConstraints of `{}` cannot be read ({e})",
            c.subject()
        ))
    })?;
    let is_ca = bc.as_ref().is_some_and(|b| b.value.ca);
    if depth == 0 && is_ca {
        return Err(Refusal::CaAsLeaf);
    }
    if depth > 0 && !is_ca {
        return Err(Refusal::Unusable(format!(
            "`{}` issued a certificate of the chain but is not a CA (basicConstraints cA is not set)",
            c.subject()
        )));
    }
    match c.extended_key_usage() {
        Ok(None) => {}
        Ok(Some(eku)) => {
            let ok = match purpose {
                Purpose::Client => eku.value.client_auth,
                Purpose::Server => eku.value.server_auth,
            };
            if !ok {
                return Err(Refusal::WrongPurpose(purpose));
            }
        }
        Err(e) => {
            return Err(Refusal::Unusable(format!(
                "the extendedKeyUsage of `{}` cannot be read ({e})",
                c.subject()
            )))
        }
    }
    Ok(())
}

fn self_issued(c: &X509Certificate<'_>) -> bool {
    c.subject().as_raw() == c.issuer().as_raw()
}

/// The checks that need the whole path: signatures, pathLenConstraint, name constraints.
fn complete(path: &[&Parsed<'_>], root: &Parsed<'_>) -> Result<(), Refusal> {
    // Signatures, each by the next certificate's key; the last by the anchor's.
    for (i, p) in path.iter().enumerate() {
        let issuer = path.get(i + 1).map_or(&root.cert, |n| &n.cert);
        check_signature(&p.cert, issuer)?;
    }
    // pathLenConstraint of each intermediate: the non-self-issued intermediates below it.
    for (i, p) in path.iter().enumerate().skip(1) {
        let limit = p
            .cert
            .basic_constraints()
            .ok()
            .flatten()
            .and_then(|b| b.value.path_len_constraint);
        if let Some(limit) = limit {
            let below = path[1..i].iter().filter(|q| !self_issued(&q.cert)).count();
            if below > usize::try_from(limit).unwrap_or(usize::MAX) {
                return Err(Refusal::PathTooLong);
            }
        }
    }
    // Name constraints of the anchor and of every intermediate, on the certificates below.
    let sources = path
        .iter()
        .enumerate()
        .skip(1)
        .map(|(i, p)| (i, &p.cert))
        .chain(std::iter::once((path.len(), &root.cert)));
    for (level, ca) in sources {
        let nc = match ca.name_constraints() {
            Ok(Some(nc)) => nc.value,
            Ok(None) => continue,
            Err(e) => {
                return Err(Refusal::NameConstraints(format!(
                    " (the nameConstraints of `{}` cannot be read: {e})",
                    ca.subject()
                )))
            }
        };
        for (i, below) in path[..level].iter().enumerate() {
            // Self-issued intermediates are exempt (§6.1.3 (b), (c)); the leaf never is.
            if i > 0 && self_issued(&below.cert) {
                continue;
            }
            check_names(&below.cert, nc, ca)?;
        }
    }
    Ok(())
}

/// The signature algorithms m2mpki verifies (those rustls-webpki verifies).
fn allowed_algorithm(oid: &str) -> bool {
    matches!(
        oid,
        "1.2.840.10045.4.3.2" // ecdsa-with-SHA256
            | "1.2.840.10045.4.3.3" // ecdsa-with-SHA384
            | "1.3.101.112" // Ed25519
            | "1.2.840.113549.1.1.11" // sha256WithRSAEncryption
            | "1.2.840.113549.1.1.12" // sha384WithRSAEncryption
            | "1.2.840.113549.1.1.13" // sha512WithRSAEncryption
            | "1.2.840.113549.1.1.10" // RSASSA-PSS
    )
}

fn check_signature(c: &X509Certificate<'_>, issuer: &X509Certificate<'_>) -> Result<(), Refusal> {
    let outer = &c.signature_algorithm;
    if outer != &c.tbs_certificate.signature {
        return Err(Refusal::Unusable(format!(
            "`{}` names different signature algorithms inside and outside its signed part",
            c.subject()
        )));
    }
    if !allowed_algorithm(&outer.algorithm.to_id_string()) {
        let oid = outer.algorithm.as_bytes();
        let mut id = vec![0x06, u8::try_from(oid.len()).unwrap_or(0)];
        id.extend_from_slice(oid);
        return Err(Refusal::Unusable(unsupported_algorithm(&id)));
    }
    c.verify_signature(Some(issuer.public_key()))
        .map_err(|_| Refusal::BadSignature)
}

/// One name of a certificate, in the forms name constraints speak of.
enum Name<'a> {
    Dns(&'a str),
    Uri(&'a str),
    Email(&'a str),
    Ip(&'a [u8]),
    Dir(&'a X509Name<'a>),
    /// Any other form, by its GeneralName tag number.
    Other(u32),
}

fn tag_of(g: &GeneralName<'_>) -> u32 {
    match g {
        GeneralName::OtherName(..) => 0,
        GeneralName::RFC822Name(_) => 1,
        GeneralName::DNSName(_) => 2,
        GeneralName::X400Address(_) => 3,
        GeneralName::DirectoryName(_) => 4,
        GeneralName::EDIPartyName(_) => 5,
        GeneralName::URI(_) => 6,
        GeneralName::IPAddress(_) => 7,
        GeneralName::RegisteredID(_) => 8,
        GeneralName::Invalid(t, _) => t.0,
    }
}

const EMAIL_ADDRESS: &str = "1.2.840.113549.1.9.1";

/// The certificate's names: its subject (when not empty), the emailAddress attributes of the
/// subject, and every subjectAltName entry.
fn names_of<'a>(c: &'a X509Certificate<'a>) -> Result<Vec<Name<'a>>, Refusal> {
    let mut out = Vec::new();
    let subject = c.subject();
    if subject.iter().next().is_some() {
        out.push(Name::Dir(subject));
    }
    for atv in subject.iter_attributes() {
        if atv.attr_type().to_id_string() == EMAIL_ADDRESS {
            let v = atv.as_str().map_err(|_| {
                Refusal::NameConstraints(" (an emailAddress in the subject is not a string)".into())
            })?;
            out.push(Name::Email(v));
        }
    }
    let san = c.subject_alternative_name().map_err(|e| {
        Refusal::NameConstraints(format!(" (the subjectAltName cannot be read: {e})"))
    })?;
    for g in san.iter().flat_map(|s| s.value.general_names.iter()) {
        out.push(match g {
            GeneralName::DNSName(d) => Name::Dns(d),
            GeneralName::URI(u) => Name::Uri(u),
            GeneralName::RFC822Name(e) => Name::Email(e),
            GeneralName::IPAddress(ip) => Name::Ip(ip),
            GeneralName::DirectoryName(n) => Name::Dir(n),
            other => Name::Other(tag_of(other)),
        });
    }
    Ok(out)
}

/// Whether `name` lies within the subtree `base`; `None` when they are of different forms.
/// `Err` when the pair cannot be judged (a form m2mpki does not match, or a URI without a host).
fn within(name: &Name<'_>, base: &GeneralName<'_>) -> Option<Result<bool, String>> {
    Some(Ok(match (name, base) {
        (Name::Dns(n), GeneralName::DNSName(b)) => dns_within(n, b),
        (Name::Uri(u), GeneralName::URI(b)) => match uri_host(u) {
            Some(host) => host_within(&host, b),
            None => {
                return Some(Err(format!(
                    "the URI `{u}` has no host name to match the CA's URI constraints against"
                )))
            }
        },
        (Name::Email(e), GeneralName::RFC822Name(b)) => email_within(e, b),
        (Name::Ip(ip), GeneralName::IPAddress(b)) => ip_within(ip, b),
        (Name::Dir(n), GeneralName::DirectoryName(b)) => dir_within(n, b),
        (Name::Other(t), b) if *t == tag_of(b) => {
            return Some(Err(format!(
                "name constraints of name form [{t}] are not supported"
            )))
        }
        _ => return None,
    }))
}

fn check_names(
    c: &X509Certificate<'_>,
    nc: &x509_parser::extensions::NameConstraints<'_>,
    ca: &X509Certificate<'_>,
) -> Result<(), Refusal> {
    let violation = |what: String| {
        Refusal::NameConstraints(format!(
            " (`{}` under the constraints of `{}`: {what})",
            c.subject(),
            ca.subject()
        ))
    };
    let none: Vec<GeneralSubtree<'_>> = Vec::new();
    let permitted = nc.permitted_subtrees.as_ref().unwrap_or(&none);
    let excluded = nc.excluded_subtrees.as_ref().unwrap_or(&none);
    for name in names_of(c)? {
        for s in excluded {
            if let Some(m) = within(&name, &s.base) {
                if m.map_err(&violation)? {
                    return Err(violation(format!(
                        "{} is in an excluded subtree",
                        show(&name)
                    )));
                }
            }
        }
        // Permitted: if any subtree of this name's form is present, one must contain it.
        let mut of_form = false;
        let mut inside = false;
        for s in permitted {
            if let Some(m) = within(&name, &s.base) {
                of_form = true;
                inside |= m.map_err(&violation)?;
            }
        }
        if of_form && !inside {
            return Err(violation(format!(
                "{} is outside every permitted subtree of its form",
                show(&name)
            )));
        }
    }
    Ok(())
}

fn show(n: &Name<'_>) -> String {
    match n {
        Name::Dns(d) => format!("the DNS name `{d}`"),
        Name::Uri(u) => format!("the URI `{u}`"),
        Name::Email(e) => format!("the e-mail address `{e}`"),
        Name::Ip(ip) => format!("the IP address {}", hex::encode(ip)),
        Name::Dir(d) => format!("the directory name `{d}`"),
        Name::Other(t) => format!("a name of form [{t}]"),
    }
}

fn lower(s: &str) -> String {
    s.trim_end_matches('.').to_ascii_lowercase()
}

/// RFC 5280 §4.2.1.10 for dNSName: the base with zero or more labels added on the left; a base
/// with a leading dot (as some CAs write it) admits subdomains only; an empty base everything.
fn dns_within(name: &str, base: &str) -> bool {
    let (name, base) = (lower(name), lower(base));
    if base.is_empty() {
        return true;
    }
    match base.strip_prefix('.') {
        Some(_) => name.ends_with(&base),
        None => name == base || name.ends_with(&format!(".{base}")),
    }
}

/// A URI constraint base is a host (that host only) or, with a leading dot, a domain (its
/// subdomains only).
fn host_within(host: &str, base: &str) -> bool {
    let (host, base) = (lower(host), lower(base));
    match base.strip_prefix('.') {
        Some(_) => host.ends_with(&base),
        None => host == base,
    }
}

/// The host of a URI's authority (`scheme://[userinfo@]host[:port]/...`); `None` without one
/// or when the host is an IP literal (URI constraints name domains).
fn uri_host(uri: &str) -> Option<String> {
    let (scheme, rest) = uri.split_once("://")?;
    if scheme.is_empty() {
        return None;
    }
    let authority = rest.split(['/', '?', '#']).next()?;
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    if host_port.starts_with('[') {
        return None;
    }
    let host = host_port.split(':').next()?;
    if host.is_empty() || host.parse::<std::net::Ipv4Addr>().is_ok() {
        return None;
    }
    Some(host.to_owned())
}

/// rfc822Name: a base with `@` is one mailbox; a host is every mailbox at that host; a leading
/// dot is every mailbox at a subdomain.
fn email_within(addr: &str, base: &str) -> bool {
    let Some((local, host)) = addr.rsplit_once('@') else {
        return false;
    };
    match base.rsplit_once('@') {
        Some((bl, bh)) => local == bl && lower(host) == lower(bh),
        None => host_within(host, base),
    }
}

fn ip_within(ip: &[u8], base: &[u8]) -> bool {
    if base.len() != ip.len() * 2 {
        return false;
    }
    let (addr, mask) = base.split_at(ip.len());
    ip.iter()
        .zip(addr)
        .zip(mask)
        .all(|((i, a), m)| i & m == a & m)
}

/// A string attribute value compared as RFC 5280 §7.1 asks (case and runs of spaces do not
/// count); other values byte for byte.
fn atv_eq(
    a: &x509_parser::x509::AttributeTypeAndValue<'_>,
    b: &x509_parser::x509::AttributeTypeAndValue<'_>,
) -> bool {
    if a.attr_type() != b.attr_type() {
        return false;
    }
    let norm = |s: &str| {
        s.split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
            .to_lowercase()
    };
    match (a.as_str(), b.as_str()) {
        (Ok(x), Ok(y)) => norm(x) == norm(y),
        _ => a.attr_value() == b.attr_value(),
    }
}

/// directoryName: the base's RDNs are the first RDNs of the name.
fn dir_within(name: &X509Name<'_>, base: &X509Name<'_>) -> bool {
    let n: Vec<_> = name.iter().collect();
    let b: Vec<_> = base.iter().collect();
    b.len() <= n.len()
        && b.iter().zip(&n).all(|(x, y)| {
            let (xs, ys): (Vec<_>, Vec<_>) = (x.iter().collect(), y.iter().collect());
            xs.len() == ys.len() && xs.iter().all(|xa| ys.iter().any(|ya| atv_eq(xa, ya)))
        })
}

/// Whether a CA certificate carries name constraints of a form rustls-webpki does not process
/// (URI, directoryName, rfc822Name, or anything but dNSName and iPAddress).
pub(crate) fn constraints_webpki_refuses(c: &X509Certificate<'_>) -> bool {
    c.extensions().iter().any(|e| match e.parsed_extension() {
        ParsedExtension::NameConstraints(nc) => nc
            .permitted_subtrees
            .iter()
            .flatten()
            .chain(nc.excluded_subtrees.iter().flatten())
            .any(|s| !matches!(s.base, GeneralName::DNSName(_) | GeneralName::IPAddress(_))),
        _ => false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uri_hosts() {
        assert_eq!(
            uri_host("onem2m-node://acme.example/NODE-1").as_deref(),
            Some("acme.example")
        );
        assert_eq!(
            uri_host("https://user@Host.Example:8443/x?y").as_deref(),
            Some("Host.Example")
        );
        assert_eq!(uri_host("urn:uuid:1234"), None);
        assert_eq!(uri_host("http://[::1]/"), None);
        assert_eq!(uri_host("http://10.0.0.1/"), None);
        assert_eq!(uri_host("://x/"), None);
    }

    #[test]
    fn matching_rules() {
        assert!(host_within("acme.example", "acme.example"));
        assert!(host_within("ACME.example.", "acme.example"));
        assert!(!host_within("a.acme.example", "acme.example"));
        assert!(host_within("a.acme.example", ".acme.example"));
        assert!(!host_within("acme.example", ".acme.example"));
        assert!(!host_within("evilacme.example", ".acme.example"));
        assert!(dns_within("a.b.example", "b.example"));
        assert!(!dns_within("ab.example", "b.example"));
        assert!(email_within("x@Mail.Example", "mail.example"));
        assert!(!email_within("x@a.mail.example", "mail.example"));
        assert!(email_within("x@a.mail.example", ".mail.example"));
        assert!(email_within("x@mail.example", "x@mail.example"));
        assert!(!email_within("y@mail.example", "x@mail.example"));
        assert!(ip_within(&[10, 1, 2, 3], &[10, 0, 0, 0, 255, 0, 0, 0]));
        assert!(!ip_within(&[11, 1, 2, 3], &[10, 0, 0, 0, 255, 0, 0, 0]));
        assert!(!ip_within(&[10, 1, 2, 3], &[0; 32]));
    }
}
