//! One ClientHello reader for TLS (RFC 5246 §7.4.1.2, RFC 8446 §4.1.2) and DTLS 1.2 (RFC 6347
//! §4.2.1, which adds a cookie after the session id), for the decisions a listener makes before
//! any TLS stack sees the connection: SNI, the stack that serves the suites offered, the extended
//! master secret (RFC 7627), and the DTLS cookie exchange.
//!
//! Every read is bounds-checked: a hello that does not parse is `None`, never a panic.

/// The server_name extension (RFC 6066 §3).
const EXT_SERVER_NAME: u16 = 0;
/// The extended_master_secret extension (RFC 7627).
const EXT_EMS: u16 = 23;
/// The TLS record type of handshake messages.
const CONTENT_HANDSHAKE: u8 = 22;
/// The handshake message type of a ClientHello.
pub const CLIENT_HELLO: u8 = 1;

/// What a ClientHello offers, borrowed from the message it was read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientHello<'a> {
    /// client_random (32 bytes).
    pub random: &'a [u8],
    /// The DTLS cookie (empty on a first DTLS hello; always empty over TLS).
    pub cookie: &'a [u8],
    /// Where the cookie's length byte sits in the message body (DTLS only; 0 over TLS).
    pub cookie_at: usize,
    /// The offered cipher suites, two bytes each.
    suites: &'a [u8],
    /// Offers the extended master secret.
    pub ems: bool,
    /// Carries the server_name extension.
    pub sni: bool,
    /// The host name of its SNI, when it carries one that reads as text.
    pub server_name: Option<&'a str>,
}

impl ClientHello<'_> {
    /// The offered cipher suites.
    pub fn suites(&self) -> impl Iterator<Item = u16> + '_ {
        self.suites
            .chunks_exact(2)
            .map(|c| u16::from_be_bytes([c[0], c[1]]))
    }

    /// Whether `suite` is offered.
    pub fn offers(&self, suite: u16) -> bool {
        self.suites().any(|s| s == suite)
    }
}

/// Reads `n` big-endian bytes at `at`.
pub fn be(d: &[u8], at: usize, n: usize) -> Option<u64> {
    let b = d.get(at..at.checked_add(n)?)?;
    Some(b.iter().fold(0u64, |acc, x| (acc << 8) | u64::from(*x)))
}

/// A length-prefixed vector (`len_bytes` of length) at `at`: its body and the offset after it.
pub fn vector(d: &[u8], at: usize, len_bytes: usize) -> Option<(&[u8], usize)> {
    let len = usize::try_from(be(d, at, len_bytes)?).ok()?;
    let start = at.checked_add(len_bytes)?;
    let end = start.checked_add(len)?;
    Some((d.get(start..end)?, end))
}

/// Reads the body of a ClientHello message (after its handshake header); `dtls` when it carries
/// the DTLS cookie.
///
/// `client_version(2) random(32) session_id<0..32> [cookie<0..255>] cipher_suites<2..>
/// compression_methods<1..> extensions<0..>`
pub fn parse_body(body: &[u8], dtls: bool) -> Option<ClientHello<'_>> {
    let random = body.get(2..34)?;
    let (_, after_sid) = vector(body, 34, 1)?;
    let (cookie, cookie_at, after_cookie) = if dtls {
        let (cookie, after) = vector(body, after_sid, 1)?;
        (cookie, after_sid, after)
    } else {
        (&[][..], 0, after_sid)
    };
    let (suites, after_suites) = vector(body, after_cookie, 2)?;
    let (_, after_comp) = vector(body, after_suites, 1)?;
    let mut ext = match body.get(after_comp..) {
        Some([]) | None => &[][..],
        Some(_) => vector(body, after_comp, 2)?.0,
    };
    let (mut ems, mut sni) = (false, false);
    let mut server_name = None;
    while !ext.is_empty() {
        let kind = u16::try_from(be(ext, 0, 2)?).ok()?;
        let (data, next) = vector(ext, 2, 2)?;
        ems |= kind == EXT_EMS;
        if kind == EXT_SERVER_NAME {
            sni = true;
            // server_name_list<2> { name_type(1) = host_name(0), HostName<2> } (RFC 6066 §3)
            if let Some((list, _)) = vector(data, 0, 2) {
                if list.first() == Some(&0) {
                    if let Some((host, _)) = vector(list, 1, 2) {
                        server_name = std::str::from_utf8(host).ok();
                    }
                }
            }
        }
        ext = ext.get(next..)?;
    }
    Some(ClientHello {
        random,
        cookie,
        cookie_at,
        suites,
        ems,
        sni,
        server_name,
    })
}

/// Reads a TLS ClientHello that fits its first record (every hello a node sends does; a longer
/// one is `None`, and the caller leaves it to a stack that reassembles records).
pub fn parse_tls_record(d: &[u8]) -> Option<ClientHello<'_>> {
    if *d.first()? != CONTENT_HANDSHAKE || *d.get(1)? != 3 {
        return None;
    }
    let (record, _) = vector(d, 3, 2)?;
    if *record.first()? != CLIENT_HELLO {
        return None;
    }
    let (body, _) = vector(record, 1, 3)?;
    parse_body(body, false)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests may fail loudly
    use super::*;

    /// A hello body: version, random, session id, optional cookie, suites, compression, and
    /// the extensions given (type, data).
    fn body(cookie: Option<&[u8]>, suites: &[u16], ext: &[(u16, Vec<u8>)]) -> Vec<u8> {
        let mut b = vec![0xfe, 0xfd];
        b.extend_from_slice(&[7u8; 32]);
        b.push(0); // session id
        if let Some(c) = cookie {
            b.push(u8::try_from(c.len()).unwrap());
            b.extend_from_slice(c);
        }
        b.extend_from_slice(&u16::try_from(suites.len() * 2).unwrap().to_be_bytes());
        for s in suites {
            b.extend_from_slice(&s.to_be_bytes());
        }
        b.extend_from_slice(&[1, 0]); // null compression
        let mut e = Vec::new();
        for (kind, data) in ext {
            e.extend_from_slice(&kind.to_be_bytes());
            e.extend_from_slice(&u16::try_from(data.len()).unwrap().to_be_bytes());
            e.extend_from_slice(data);
        }
        b.extend_from_slice(&u16::try_from(e.len()).unwrap().to_be_bytes());
        b.extend_from_slice(&e);
        b
    }

    fn sni(host: &str) -> (u16, Vec<u8>) {
        let mut list = vec![0];
        list.extend_from_slice(&u16::try_from(host.len()).unwrap().to_be_bytes());
        list.extend_from_slice(host.as_bytes());
        let mut d = u16::try_from(list.len()).unwrap().to_be_bytes().to_vec();
        d.extend_from_slice(&list);
        (EXT_SERVER_NAME, d)
    }

    fn record(body: &[u8]) -> Vec<u8> {
        let mut hs = vec![CLIENT_HELLO];
        hs.extend_from_slice(&u32::try_from(body.len()).unwrap().to_be_bytes()[1..]);
        hs.extend_from_slice(body);
        let mut r = vec![CONTENT_HANDSHAKE, 3, 1];
        r.extend_from_slice(&u16::try_from(hs.len()).unwrap().to_be_bytes());
        r.extend_from_slice(&hs);
        r
    }

    #[test]
    fn a_tls_hello_gives_its_suites_sni_and_ems() {
        let b = body(
            None,
            &[0xC023, 0x1301],
            &[sni("in.example"), (EXT_EMS, vec![])],
        );
        let r = record(&b);
        let h = parse_tls_record(&r).unwrap();
        assert_eq!(h.suites().collect::<Vec<_>>(), vec![0xC023, 0x1301]);
        assert!(h.offers(0xC023) && !h.offers(0xC02B));
        assert!(h.ems && h.sni);
        assert_eq!(h.server_name, Some("in.example"));
        assert!(h.cookie.is_empty());
    }

    #[test]
    fn a_dtls_hello_gives_its_cookie_and_where_it_sits() {
        let b = body(Some(b"cookie"), &[0xC02B], &[]);
        let h = parse_body(&b, true).unwrap();
        assert_eq!(h.cookie, b"cookie");
        assert_eq!(h.cookie_at, 35);
        assert_eq!(b[h.cookie_at], 6);
        assert!(!h.ems && !h.sni && h.server_name.is_none());
        // The same bytes read as TLS take the cookie for the suites: not this hello.
        assert_ne!(parse_body(&b, false).map(|h| h.offers(0xC02B)), Some(true));
    }

    #[test]
    fn every_truncation_of_a_hello_is_refused_without_a_panic() {
        let b = body(None, &[0xC023], &[sni("in.example"), (EXT_EMS, vec![])]);
        let r = record(&b);
        for n in 0..r.len() {
            assert!(
                parse_tls_record(&r[..n]).is_none(),
                "{n} bytes read as a hello"
            );
        }
        // A hello with no extensions block at all is still a hello.
        // version(2) random(32) session_id(1) suites(2 + 2) compression(2)
        let mut bare = b.clone();
        bare.truncate(41);
        let h = parse_body(&bare, false).unwrap();
        assert!(!h.ems && !h.sni);
    }

    #[test]
    fn a_record_that_is_not_a_client_hello_is_refused() {
        let b = body(None, &[0xC023], &[]);
        let mut r = record(&b);
        r[0] = 23; // application data
        assert!(parse_tls_record(&r).is_none());
        let mut r = record(&b);
        r[5] = 2; // ServerHello
        assert!(parse_tls_record(&r).is_none());
        let mut r = record(&b);
        r[1] = 0xfe; // a DTLS version on a TLS record
        assert!(parse_tls_record(&r).is_none());
    }

    #[test]
    fn an_sni_that_is_not_text_is_carried_without_a_name() {
        let mut e = sni("in.example");
        let last = e.1.len() - 1;
        e.1[last] = 0xff;
        let b = body(None, &[0xC023], &[e]);
        let h = parse_body(&b, false).unwrap();
        assert!(h.sni);
        assert_eq!(h.server_name, None);
    }
}
