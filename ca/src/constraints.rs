//! Name constraints on CA certificates (RFC 5280 §4.2.1.10), as data and as DER.
//!
//! rcgen cannot express URI subtrees, so the whole extension is encoded here.

use serde::{Deserialize, Serialize};
use yasna::Tag;

use crate::identity::DnsName;
use crate::{Error, Result};

/// OID of the nameConstraints extension.
const NAME_CONSTRAINTS: &[u64] = &[2, 5, 29, 30];

/// Permitted and excluded subtrees of a CA.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NameConstraints {
    /// dNSName subtrees names must lie in (`example.com` covers it and its subdomains).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub permitted_dns: Vec<String>,
    /// dNSName subtrees names must not lie in.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub excluded_dns: Vec<String>,
    /// URI host subtrees (`host.example` exactly, `.example` any host below it).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub permitted_uri_domains: Vec<String>,
    /// URI host subtrees that are excluded.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub excluded_uri_domains: Vec<String>,
}

/// Checks a constraint base as typed by the user: a DNS name, optionally with a leading dot.
fn base(what: &'static str, s: &str) -> Result<String> {
    let (dot, rest) = match s.strip_prefix('.') {
        Some(r) => (".", r),
        None => ("", s),
    };
    let name: DnsName = rest.parse().map_err(|_| {
        Error::invalid(
            what,
            s,
            "expected a domain such as example.com or .example.com",
        )
    })?;
    Ok(format!("{dot}{name}"))
}

fn uri_matches(host: &DnsName, base: &str) -> bool {
    match base.strip_prefix('.') {
        Some(parent) => host.as_str().ends_with(&format!(".{parent}")),
        None => host.as_str() == base,
    }
}

impl NameConstraints {
    /// Builds constraints from user input, checking every base.
    pub fn new(
        permitted_dns: &[String],
        excluded_dns: &[String],
        permitted_uri_domains: &[String],
        excluded_uri_domains: &[String],
    ) -> Result<Self> {
        let all = |what, v: &[String]| v.iter().map(|s| base(what, s)).collect::<Result<Vec<_>>>();
        Ok(NameConstraints {
            permitted_dns: all("permitted DNS subtree", permitted_dns)?,
            excluded_dns: all("excluded DNS subtree", excluded_dns)?,
            permitted_uri_domains: all("permitted URI domain", permitted_uri_domains)?,
            excluded_uri_domains: all("excluded URI domain", excluded_uri_domains)?,
        })
    }

    /// Whether there are no constraints at all.
    pub fn is_empty(&self) -> bool {
        self.permitted_dns.is_empty()
            && self.excluded_dns.is_empty()
            && self.permitted_uri_domains.is_empty()
            && self.excluded_uri_domains.is_empty()
    }

    /// Whether a dNSName is allowed.
    pub fn allows_dns(&self, name: &DnsName) -> bool {
        (self.permitted_dns.is_empty() || self.permitted_dns.iter().any(|b| name.is_within(b)))
            && !self.excluded_dns.iter().any(|b| name.is_within(b))
    }

    /// Whether a URI with this host is allowed.
    pub fn allows_uri_host(&self, host: &DnsName) -> bool {
        (self.permitted_uri_domains.is_empty()
            || self
                .permitted_uri_domains
                .iter()
                .any(|b| uri_matches(host, b)))
            && !self
                .excluded_uri_domains
                .iter()
                .any(|b| uri_matches(host, b))
    }

    /// The critical nameConstraints extension, or `None` when there are no constraints.
    pub fn to_extension(&self) -> Option<rcgen::CustomExtension> {
        if self.is_empty() {
            return None;
        }
        let subtrees = |w: yasna::DERWriter<'_>, dns: &[String], uri: &[String]| {
            w.write_sequence(|w| {
                for d in dns {
                    w.next().write_sequence(|w| {
                        // dNSName [2] IA5String; a leading dot means the same as without in
                        // dNSName constraints, so it is dropped.
                        w.next().write_tagged_implicit(Tag::context(2), |w| {
                            w.write_ia5_string(d.trim_start_matches('.'))
                        })
                    });
                }
                for u in uri {
                    w.next().write_sequence(|w| {
                        w.next()
                            .write_tagged_implicit(Tag::context(6), |w| w.write_ia5_string(u))
                    });
                }
            })
        };
        let der = yasna::construct_der(|w| {
            w.write_sequence(|w| {
                if !(self.permitted_dns.is_empty() && self.permitted_uri_domains.is_empty()) {
                    w.next().write_tagged_implicit(Tag::context(0), |w| {
                        subtrees(w, &self.permitted_dns, &self.permitted_uri_domains)
                    });
                }
                if !(self.excluded_dns.is_empty() && self.excluded_uri_domains.is_empty()) {
                    w.next().write_tagged_implicit(Tag::context(1), |w| {
                        subtrees(w, &self.excluded_dns, &self.excluded_uri_domains)
                    });
                }
            })
        });
        let mut ext = rcgen::CustomExtension::from_oid_content(NAME_CONSTRAINTS, der);
        ext.set_criticality(true);
        Some(ext)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dns_and_uri_matching() {
        let nc = NameConstraints::new(
            &["example.com".into()],
            &["bad.example.com".into()],
            &[".acme.example".into(), "exact.example".into()],
            &[],
        )
        .unwrap();
        let dns = |s: &str| s.parse::<DnsName>().unwrap();
        assert!(nc.allows_dns(&dns("in.example.com")));
        assert!(nc.allows_dns(&dns("example.com")));
        assert!(!nc.allows_dns(&dns("x.bad.example.com")));
        assert!(!nc.allows_dns(&dns("example.org")));
        assert!(nc.allows_uri_host(&dns("plant1.acme.example")));
        assert!(!nc.allows_uri_host(&dns("acme.example")));
        assert!(nc.allows_uri_host(&dns("exact.example")));
        assert!(!nc.allows_uri_host(&dns("sub.exact.example")));
        assert!(nc.to_extension().is_some());
        assert!(NameConstraints::default().to_extension().is_none());
        assert!(NameConstraints::new(&["not a domain".into()], &[], &[], &[]).is_err());
    }
}
