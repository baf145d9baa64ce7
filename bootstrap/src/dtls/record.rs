//! Just enough of the DTLS 1.2 record layer (RFC 6347 §4.1, §4.2.1) to keep no state for a
//! peer before it has proved its address: reading a first-flight ClientHello, answering it with
//! a stateless HelloVerifyRequest, checking the returned cookie, and checking that both hellos
//! negotiate the extended master secret (RFC 7627).
//!
//! OpenSSL does the handshake itself; this module only looks at epoch-0 handshake records,
//! which are in the clear.

use std::net::SocketAddr;

use aws_lc_rs::hmac;

/// Record header: type(1) version(2) epoch(2) sequence(6) length(2).
pub const RECORD_HEADER: usize = 13;
/// Handshake header: type(1) length(3) message_seq(2) fragment_offset(3) fragment_length(3).
pub const HANDSHAKE_HEADER: usize = 12;
const CONTENT_ALERT: u8 = 21;
const CONTENT_HANDSHAKE: u8 = 22;
const CLIENT_HELLO: u8 = 1;
const SERVER_HELLO: u8 = 2;
const HELLO_VERIFY_REQUEST: u8 = 3;
/// The extended_master_secret extension (RFC 7627).
const EXT_EMS: u16 = 23;
/// How long a cookie stays good, in seconds.
const COOKIE_LIFETIME: u64 = 120;
/// Length of our cookies: a 4-byte time stamp and a 16-byte truncated HMAC.
pub const COOKIE_LEN: usize = 20;

/// A ClientHello that arrived alone in one record of epoch 0, unfragmented: the only shape a
/// first flight takes (it is a few hundred bytes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientHello<'a> {
    /// The whole datagram.
    pub datagram: &'a [u8],
    /// The record sequence number.
    pub record_seq: u64,
    /// The handshake message_seq (0 on the first hello, 1 on the one with the cookie).
    pub message_seq: u16,
    /// client_random.
    pub random: &'a [u8],
    /// Where the cookie's length byte sits in the datagram.
    cookie_at: usize,
    /// The cookie (empty on a first hello).
    pub cookie: &'a [u8],
    /// Whether the hello offers the extended master secret.
    pub offers_ems: bool,
}

/// Reads `n` big-endian bytes at `at`.
fn be(d: &[u8], at: usize, n: usize) -> Option<u64> {
    let b = d.get(at..at.checked_add(n)?)?;
    Some(b.iter().fold(0u64, |acc, x| (acc << 8) | u64::from(*x)))
}

/// A length-prefixed vector (`len_bytes` of length) at `at`: its body and the offset after it.
fn vector(d: &[u8], at: usize, len_bytes: usize) -> Option<(&[u8], usize)> {
    let len = usize::try_from(be(d, at, len_bytes)?).ok()?;
    let start = at + len_bytes;
    let end = start.checked_add(len)?;
    Some((d.get(start..end)?, end))
}

/// Whether an extensions block (without its 2-byte length) carries `want`, or `None` if it is
/// malformed.
fn has_extension(mut ext: &[u8], want: u16) -> Option<bool> {
    let mut found = false;
    while !ext.is_empty() {
        let kind = u16::try_from(be(ext, 0, 2)?).ok()?;
        let (_, next) = vector(ext, 2, 2)?;
        found |= kind == want;
        ext = ext.get(next..)?;
    }
    Some(found)
}

/// The first record of a datagram, if it is a DTLS handshake record of epoch 0:
/// (sequence number, record body).
fn epoch0_handshake(d: &[u8]) -> Option<(u64, &[u8])> {
    if *d.first()? != CONTENT_HANDSHAKE || d.get(1) != Some(&254) || be(d, 3, 2)? != 0 {
        return None;
    }
    let seq = be(d, 5, 6)?;
    let (body, _) = vector(d, 11, 2)?;
    Some((seq, body))
}

/// Reads a datagram that starts with a ClientHello; `None` for anything else (including a
/// fragmented hello, which no first flight needs).
pub fn client_hello(d: &[u8]) -> Option<ClientHello<'_>> {
    let (record_seq, body) = epoch0_handshake(d)?;
    if *body.first()? != CLIENT_HELLO {
        return None;
    }
    let msg_len = be(body, 1, 3)?;
    let message_seq = u16::try_from(be(body, 4, 2)?).ok()?;
    let frag_off = be(body, 6, 3)?;
    let frag_len = be(body, 9, 3)?;
    let hello = body.get(HANDSHAKE_HEADER..)?;
    if frag_off != 0 || frag_len != msg_len || u64::try_from(hello.len()).ok()? != msg_len {
        return None;
    }
    // client_version(2) random(32) session_id<0..32> cookie<0..255> cipher_suites<2..>
    // compression_methods<1..> extensions<0..>
    let base = RECORD_HEADER + HANDSHAKE_HEADER;
    let random = d.get(base + 2..base + 34)?;
    let (_, after_sid) = vector(d, base + 34, 1)?;
    let cookie_at = after_sid;
    let (cookie, after_cookie) = vector(d, cookie_at, 1)?;
    let (_, after_suites) = vector(d, after_cookie, 2)?;
    let (_, after_comp) = vector(d, after_suites, 1)?;
    let offers_ems = match d.get(after_comp..) {
        Some([]) | None => false,
        Some(_) => {
            let (ext, _) = vector(d, after_comp, 2)?;
            has_extension(ext, EXT_EMS)?
        }
    };
    Some(ClientHello {
        datagram: d,
        record_seq,
        message_seq,
        random,
        cookie_at,
        cookie,
        offers_ems,
    })
}

/// Whether the datagram from the server carries a ServerHello, and if so whether it accepts
/// the extended master secret. The client checks this: OpenSSL offers EMS but does not insist.
pub fn server_hello_ems(d: &[u8]) -> Option<bool> {
    let (_, body) = epoch0_handshake(d)?;
    if *body.first()? != SERVER_HELLO || be(body, 6, 3)? != 0 {
        return None;
    }
    let hello = body.get(HANDSHAKE_HEADER..)?;
    // server_version(2) random(32) session_id<0..32> cipher_suite(2) compression_method(1)
    // extensions<0..>
    let (_, after_sid) = vector(hello, 34, 1)?;
    let after = after_sid + 3;
    match hello.get(after..) {
        Some([]) | None => Some(false),
        Some(_) => {
            let (ext, _) = vector(hello, after, 2)?;
            has_extension(ext, EXT_EMS)
        }
    }
}

impl ClientHello<'_> {
    /// The same hello as it was before the cookie: cookie removed, message_seq 0, record
    /// sequence number one lower. OpenSSL's server object only takes a cookie-bearing hello
    /// after it has itself asked for the cookie; feeding it this first lets a fresh object
    /// accept the real one, so no object exists before the peer has proved its address.
    pub fn without_cookie(&self) -> Vec<u8> {
        let d = self.datagram;
        let mut v = Vec::with_capacity(d.len());
        v.extend_from_slice(&d[..self.cookie_at]);
        v.push(0);
        v.extend_from_slice(&d[self.cookie_at + 1 + self.cookie.len()..]);
        let record_len = (v.len() - RECORD_HEADER) as u64;
        let msg_len = (v.len() - RECORD_HEADER - HANDSHAKE_HEADER) as u64;
        v[11..13].copy_from_slice(&record_len.to_be_bytes()[6..]);
        v[14..17].copy_from_slice(&msg_len.to_be_bytes()[5..]);
        v[17..19].copy_from_slice(&[0, 0]);
        v[22..25].copy_from_slice(&msg_len.to_be_bytes()[5..]);
        let seq = self.record_seq.saturating_sub(1);
        v[5..11].copy_from_slice(&seq.to_be_bytes()[2..]);
        v
    }
}

/// The records of a datagram, in order: (content type, epoch, whole record). Parsing stops at
/// the first record whose header or length runs past the end (what follows cannot be framed).
pub fn records(mut d: &[u8]) -> impl Iterator<Item = (u8, u16, &[u8])> {
    std::iter::from_fn(move || {
        let kind = *d.first()?;
        let epoch = u16::try_from(be(d, 3, 2)?).ok()?;
        let len = usize::try_from(be(d, 11, 2)?).ok()?;
        let end = RECORD_HEADER.checked_add(len)?;
        let record = d.get(..end)?;
        d = &d[end..];
        Some((kind, epoch, record))
    })
}

/// The datagram without its protected records (epoch 1 and later) that are shorter than
/// `min_sealed`, the least a record of the session's suite can be (explicit nonce plus tag,
/// or IV plus MAC and padding), and without anything that cannot be framed as a record; `None`
/// when nothing is left. RFC 6347 §4.1.2.7 has invalid records discarded, but OpenSSL 3.0 fails
/// the whole session (`internal_error`) on an AEAD record shorter than nonce + tag, so a
/// spoofed 15-byte datagram could end a session; such records never reach it.
pub fn without_short_sealed(d: &[u8], min_sealed: usize) -> Option<std::borrow::Cow<'_, [u8]>> {
    let mut kept = 0;
    let mut all = true;
    let mut total = 0;
    for (_, epoch, r) in records(d) {
        total += r.len();
        if epoch != 0 && r.len() - RECORD_HEADER < min_sealed {
            all = false;
        } else {
            kept += 1;
        }
    }
    if all && total == d.len() {
        return (kept > 0).then_some(std::borrow::Cow::Borrowed(d));
    }
    let v: Vec<u8> = records(d)
        .filter(|(_, epoch, r)| *epoch == 0 || r.len() - RECORD_HEADER >= min_sealed)
        .flat_map(|(_, _, r)| r.iter().copied())
        .collect();
    (!v.is_empty()).then_some(std::borrow::Cow::Owned(v))
}

/// Sets the description of every fatal epoch-0 alert in the datagram to `desc`. Alerts before
/// ChangeCipherSpec are plaintext and not covered by the handshake transcript, so this is how
/// a refusal of ours gets the alert rustls sends for it (OpenSSL picks its own from its verify
/// error, which we cannot set from safe code).
pub fn set_fatal_alerts(d: &mut [u8], desc: u8) {
    let alerts: Vec<usize> = records(d)
        .scan(0, |at, (kind, epoch, r)| {
            let start = *at;
            *at += r.len();
            Some((
                start,
                kind == CONTENT_ALERT && epoch == 0 && r.get(RECORD_HEADER) == Some(&2),
            ))
        })
        .filter_map(|(start, fatal)| fatal.then_some(start + RECORD_HEADER + 1))
        .collect();
    for at in alerts {
        if let Some(b) = d.get_mut(at) {
            *b = desc;
        }
    }
}

/// The least length of a protected record's body for an OpenSSL suite name: explicit nonce
/// and tag for AEAD suites (none and 16 for ChaCha20-Poly1305, RFC 7905), IV, MAC and at least
/// one byte of padding, in whole blocks, for CBC.
pub fn min_sealed(suite: &str) -> usize {
    if suite.contains("CHACHA20") || suite.contains("CCM8") {
        // no explicit nonce and a 16-byte tag, or an 8-byte nonce and an 8-byte tag
        16
    } else if suite.contains("GCM") || suite.contains("CCM") {
        8 + 16
    } else {
        let mac: usize = if suite.ends_with("SHA384") {
            48
        } else if suite.ends_with("SHA256") {
            32
        } else {
            20
        };
        16 + (mac + 1).div_ceil(16) * 16
    }
}

/// How many protected (epoch 1 and later) handshake records a datagram holds. During a
/// handshake the only such record a peer sends is its Finished.
pub fn sealed_handshake_records(d: &[u8]) -> usize {
    records(d)
        .filter(|(kind, epoch, _)| *kind == CONTENT_HANDSHAKE && *epoch != 0)
        .count()
}

/// The largest Certificate message reassembled (a chain of a few certificates is 1–4 KiB).
const MAX_CERTIFICATE_MESSAGE: usize = 1 << 16;
const CERTIFICATE: u8 = 11;

/// The peer's Certificate message, reassembled from the epoch-0 handshake fragments that pass
/// by, so that the chain check sees the certificates the peer sent and not only the ones
/// OpenSSL could chain by their key identifiers (OpenSSL gives its verify callback the chain it
/// built, and it drops an issuer whose SKI does not match the AKI, which rustls and our
/// verifier do not require: RFC 5280 §4.2.1.1 makes AKI a hint).
#[derive(Debug, Default)]
pub struct SentCertificates {
    /// message_seq, message length, bytes, which bytes arrived.
    message: Option<(u64, usize, Vec<u8>, Vec<bool>)>,
    chain: Option<Vec<Vec<u8>>>,
}

impl SentCertificates {
    /// Takes in the Certificate fragments of a datagram.
    pub fn observe(&mut self, d: &[u8]) {
        if self.chain.is_some() {
            return;
        }
        for (kind, epoch, r) in records(d) {
            if kind != CONTENT_HANDSHAKE || epoch != 0 {
                continue;
            }
            let mut body = &r[RECORD_HEADER..];
            while body.len() >= HANDSHAKE_HEADER {
                let (Some(len), Some(seq), Some(off), Some(flen)) = (
                    be(body, 1, 3),
                    be(body, 4, 2),
                    be(body, 6, 3),
                    be(body, 9, 3),
                ) else {
                    return;
                };
                let (len, off, flen) = (len as usize, off as usize, flen as usize);
                let Some(frag) = body.get(HANDSHAKE_HEADER..HANDSHAKE_HEADER + flen) else {
                    return;
                };
                if body[0] == CERTIFICATE {
                    self.fragment(seq, len, off, frag);
                }
                body = &body[HANDSHAKE_HEADER + flen..];
            }
        }
    }

    fn fragment(&mut self, seq: u64, len: usize, off: usize, frag: &[u8]) {
        if len > MAX_CERTIFICATE_MESSAGE || off.saturating_add(frag.len()) > len {
            return;
        }
        let (s, l, bytes, have) = self
            .message
            .get_or_insert_with(|| (seq, len, vec![0; len], vec![false; len]));
        if *s != seq || *l != len {
            return;
        }
        bytes[off..off + frag.len()].copy_from_slice(frag);
        have[off..off + frag.len()].fill(true);
        if have.iter().all(|b| *b) {
            self.chain = certificate_list(bytes);
            self.message = None;
        }
    }

    /// The certificates of the peer's Certificate message, leaf first, once it has all arrived
    /// and parses.
    pub fn chain(&self) -> Option<&[Vec<u8>]> {
        self.chain.as_deref()
    }
}

/// The DER certificates of a Certificate message body (RFC 5246 §7.4.2).
fn certificate_list(body: &[u8]) -> Option<Vec<Vec<u8>>> {
    let (mut list, end) = vector(body, 0, 3)?;
    if end != body.len() {
        return None;
    }
    let mut out = Vec::new();
    while !list.is_empty() {
        let (cert, next) = vector(list, 0, 3)?;
        out.push(cert.to_vec());
        list = &list[next..];
    }
    Some(out)
}

/// Makes and checks stateless cookies: `time(4) || HMAC-SHA256(secret, time || address ||
/// client_random)[..16]`, good for two minutes (RFC 6347 §4.2.1).
pub struct Cookies {
    key: hmac::Key,
}

impl std::fmt::Debug for Cookies {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Cookies(<secret>)")
    }
}

fn addr_bytes(a: &SocketAddr) -> Vec<u8> {
    let mut v = match a.ip() {
        std::net::IpAddr::V4(ip) => ip.to_ipv6_mapped().octets().to_vec(),
        std::net::IpAddr::V6(ip) => ip.octets().to_vec(),
    };
    v.extend_from_slice(&a.port().to_be_bytes());
    v
}

impl Cookies {
    /// Cookies under a fresh random secret.
    pub fn new() -> crate::Result<Self> {
        let rng = aws_lc_rs::rand::SystemRandom::new();
        let key = hmac::Key::generate(hmac::HMAC_SHA256, &rng)
            .map_err(|_| crate::Error::internal("random source failed"))?;
        Ok(Cookies { key })
    }

    fn mac(&self, stamp: u32, peer: &SocketAddr, random: &[u8]) -> [u8; 16] {
        let mut ctx = hmac::Context::with_key(&self.key);
        ctx.update(&stamp.to_be_bytes());
        ctx.update(&addr_bytes(peer));
        ctx.update(random);
        let tag = ctx.sign();
        let mut out = [0u8; 16];
        out.copy_from_slice(&tag.as_ref()[..16]);
        out
    }

    /// A cookie for `peer` and its hello's random, stamped `now` (seconds since the epoch).
    pub fn make(&self, peer: &SocketAddr, random: &[u8], now: u64) -> [u8; COOKIE_LEN] {
        let stamp = u32::try_from(now & u64::from(u32::MAX)).unwrap_or(0);
        let mut out = [0u8; COOKIE_LEN];
        out[..4].copy_from_slice(&stamp.to_be_bytes());
        out[4..].copy_from_slice(&self.mac(stamp, peer, random));
        out
    }

    /// Whether `cookie` was made by us for this peer and random, within the lifetime.
    pub fn check(&self, cookie: &[u8], peer: &SocketAddr, random: &[u8], now: u64) -> bool {
        let Some((stamp, tag)) = cookie.split_first_chunk::<4>() else {
            return false;
        };
        if cookie.len() != COOKIE_LEN {
            return false;
        }
        let stamp = u32::from_be_bytes(*stamp);
        let now32 = u32::try_from(now & u64::from(u32::MAX)).unwrap_or(0);
        let age = now32.wrapping_sub(stamp);
        if u64::from(age) > COOKIE_LIFETIME {
            return false;
        }
        aws_lc_rs::constant_time::verify_slices_are_equal(&self.mac(stamp, peer, random), tag)
            .is_ok()
    }
}

/// A HelloVerifyRequest answering `hello` with `cookie`: version DTLS 1.0 in the record and
/// the body as RFC 6347 §4.2.1 recommends, the hello's record sequence number echoed.
pub fn hello_verify_request(hello: &ClientHello<'_>, cookie: &[u8]) -> Vec<u8> {
    let body_len = 3 + cookie.len();
    let mut v = Vec::with_capacity(RECORD_HEADER + HANDSHAKE_HEADER + body_len);
    v.extend_from_slice(&[CONTENT_HANDSHAKE, 254, 255, 0, 0]);
    v.extend_from_slice(&hello.record_seq.to_be_bytes()[2..]);
    v.extend_from_slice(&((HANDSHAKE_HEADER + body_len) as u16).to_be_bytes());
    v.push(HELLO_VERIFY_REQUEST);
    v.extend_from_slice(&(body_len as u32).to_be_bytes()[1..]);
    v.extend_from_slice(&[0, 0, 0, 0, 0]);
    v.extend_from_slice(&(body_len as u32).to_be_bytes()[1..]);
    v.extend_from_slice(&[254, 255, cookie.len() as u8]);
    v.extend_from_slice(cookie);
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A ClientHello as OpenSSL 3.0's `s_client -dtls1_2` sends it, first flight, trimmed to
    /// the fields read here (built by hand: version, random, session id, cookie, suites,
    /// compression, extensions with EMS).
    fn hello(cookie: &[u8], ems: bool, message_seq: u16, record_seq: u64) -> Vec<u8> {
        let mut body = vec![254, 253];
        body.extend_from_slice(&[7u8; 32]);
        body.push(0);
        body.push(cookie.len() as u8);
        body.extend_from_slice(cookie);
        body.extend_from_slice(&[0, 2, 0xc0, 0xae, 1, 0]);
        let mut ext = vec![0, 11, 0, 2, 1, 0];
        if ems {
            ext.extend_from_slice(&[0, 23, 0, 0]);
        }
        body.extend_from_slice(&(ext.len() as u16).to_be_bytes());
        body.extend_from_slice(&ext);
        let mut hs = vec![CLIENT_HELLO];
        hs.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
        hs.extend_from_slice(&message_seq.to_be_bytes());
        hs.extend_from_slice(&[0, 0, 0]);
        hs.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
        hs.extend_from_slice(&body);
        let mut d = vec![CONTENT_HANDSHAKE, 254, 253, 0, 0];
        d.extend_from_slice(&record_seq.to_be_bytes()[2..]);
        d.extend_from_slice(&(hs.len() as u16).to_be_bytes());
        d.extend_from_slice(&hs);
        d
    }

    #[test]
    fn reads_hellos_and_strips_the_cookie() {
        let first = hello(&[], true, 0, 0);
        let h = client_hello(&first).unwrap();
        assert!(h.cookie.is_empty() && h.offers_ems && h.message_seq == 0);
        let second = hello(&[9; COOKIE_LEN], true, 1, 1);
        let h2 = client_hello(&second).unwrap();
        assert_eq!(h2.cookie, &[9; COOKIE_LEN]);
        assert_eq!(h2.without_cookie(), first);
        assert!(!client_hello(&hello(&[], false, 0, 0)).unwrap().offers_ems);
    }

    #[test]
    fn refuses_malformed_and_other_records() {
        let good = hello(&[], true, 0, 0);
        for cut in 0..good.len() {
            assert_eq!(client_hello(&good[..cut]), None, "cut at {cut}");
        }
        let mut app = good.clone();
        app[0] = 23;
        assert_eq!(client_hello(&app), None);
        let mut epoch1 = good.clone();
        epoch1[4] = 1;
        assert_eq!(client_hello(&epoch1), None);
        let mut fragment = good;
        fragment[RECORD_HEADER + 8] = 1; // fragment_offset
        assert_eq!(client_hello(&fragment), None);
    }

    #[test]
    fn cookies_bind_address_random_and_time() {
        let c = Cookies::new().unwrap();
        let a: SocketAddr = "192.0.2.1:5684".parse().unwrap();
        let b: SocketAddr = "192.0.2.1:5685".parse().unwrap();
        let k = c.make(&a, &[1; 32], 1000);
        assert!(c.check(&k, &a, &[1; 32], 1000));
        assert!(c.check(&k, &a, &[1; 32], 1000 + COOKIE_LIFETIME));
        assert!(!c.check(&k, &a, &[1; 32], 1001 + COOKIE_LIFETIME));
        assert!(!c.check(&k, &b, &[1; 32], 1000));
        assert!(!c.check(&k, &a, &[2; 32], 1000));
        assert!(!c.check(&k[..19], &a, &[1; 32], 1000));
        assert!(!Cookies::new().unwrap().check(&k, &a, &[1; 32], 1000));
    }

    #[test]
    fn hello_verify_request_layout() {
        let first = hello(&[], true, 0, 5);
        let h = client_hello(&first).unwrap();
        let hvr = hello_verify_request(&h, &[0xAA; 4]);
        assert_eq!(
            hvr,
            [
                // record: handshake, DTLS 1.0, epoch 0, the hello's sequence 5, length 19
                22, 254, 255, 0, 0, 0, 0, 0, 0, 0, 5, 0, 19,
                // handshake: hello_verify_request, length 7, message_seq 0, offset 0, length 7
                3, 0, 0, 7, 0, 0, 0, 0, 0, 0, 0, 7,
                // server_version DTLS 1.0, cookie length 4, cookie
                254, 255, 4, 0xAA, 0xAA, 0xAA, 0xAA,
            ]
        );
    }

    /// A record of `kind` in `epoch` carrying `body`.
    fn record(kind: u8, epoch: u16, seq: u64, body: &[u8]) -> Vec<u8> {
        let mut d = vec![kind, 254, 253];
        d.extend_from_slice(&epoch.to_be_bytes());
        d.extend_from_slice(&seq.to_be_bytes()[2..]);
        d.extend_from_slice(&(body.len() as u16).to_be_bytes());
        d.extend_from_slice(body);
        d
    }

    #[test]
    fn short_protected_records_are_dropped_and_the_rest_kept() {
        // Hostile review D2's datagram: an epoch-1 alert with a 2-byte body.
        let spoofed = hex::decode("15fefd00010000000001f400020228").unwrap();
        for suite in ["ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-ECDSA-AES128-CCM8"] {
            assert!(without_short_sealed(&spoofed, min_sealed(suite)).is_none());
        }
        // Before a suite is known (0) nothing is dropped.
        assert_eq!(
            without_short_sealed(&spoofed, 0).as_deref(),
            Some(&spoofed[..])
        );
        assert_eq!(min_sealed("ECDHE-ECDSA-AES128-CCM8"), 16);
        assert_eq!(min_sealed("ECDHE-ECDSA-AES128-GCM-SHA256"), 24);
        assert_eq!(min_sealed("ECDHE-PSK-CHACHA20-POLY1305"), 16);
        assert_eq!(min_sealed("ECDHE-PSK-AES128-CBC-SHA256"), 16 + 48);
        // 15 bytes under CCM_8 are too short, 16 are kept; epoch-0 records always are.
        let short = record(23, 1, 3, &[0; 15]);
        let long = record(23, 1, 4, &[0; 16]);
        let plain = record(21, 0, 5, &[2, 40]);
        let d = [short.clone(), long.clone(), plain.clone()].concat();
        assert_eq!(
            without_short_sealed(&d, 16).unwrap().as_ref(),
            &[long.clone(), plain.clone()].concat()[..]
        );
        // A tail that cannot be framed is dropped; a clean datagram is passed as it is.
        let cut = [long.clone(), vec![23, 254, 253, 0, 1]].concat();
        assert_eq!(without_short_sealed(&cut, 16).unwrap().as_ref(), &long[..]);
        assert!(matches!(
            without_short_sealed(&long, 16),
            Some(std::borrow::Cow::Borrowed(_))
        ));
        assert!(without_short_sealed(&[1, 2, 3], 16).is_none());
        assert_eq!(
            sealed_handshake_records(&[record(22, 1, 0, &[0; 40]), plain].concat()),
            1
        );
    }

    #[test]
    fn fatal_epoch0_alerts_get_the_description_and_nothing_else_changes() {
        let fatal = record(21, 0, 1, &[2, 40]);
        let warning = record(21, 0, 2, &[1, 0]);
        let sealed = record(21, 1, 3, &[2, 40, 0, 0]);
        let mut d = [fatal, warning.clone(), sealed.clone()].concat();
        set_fatal_alerts(&mut d, 44);
        assert_eq!(d, [record(21, 0, 1, &[2, 44]), warning, sealed].concat());
    }

    /// A Certificate handshake fragment (message_seq 2) of `message` at `off`.
    fn certificate_fragment(message: &[u8], off: usize, len: usize, seq: u64) -> Vec<u8> {
        let mut hs = vec![CERTIFICATE];
        hs.extend_from_slice(&(message.len() as u32).to_be_bytes()[1..]);
        hs.extend_from_slice(&2u16.to_be_bytes());
        hs.extend_from_slice(&(off as u32).to_be_bytes()[1..]);
        hs.extend_from_slice(&(len as u32).to_be_bytes()[1..]);
        hs.extend_from_slice(&message[off..off + len]);
        record(CONTENT_HANDSHAKE, 0, seq, &hs)
    }

    #[test]
    fn the_certificate_message_is_reassembled_from_fragments_in_any_order() {
        let certs = [vec![0x30; 300], vec![0x31; 200]];
        let mut list = Vec::new();
        for c in &certs {
            list.extend_from_slice(&(c.len() as u32).to_be_bytes()[1..]);
            list.extend_from_slice(c);
        }
        let mut message = (list.len() as u32).to_be_bytes()[1..].to_vec();
        message.extend_from_slice(&list);
        let mut sent = SentCertificates::default();
        // The second half first, with a ClientKeyExchange-like record after it in the
        // datagram; then a duplicate; then the first half.
        let half = message.len() / 2;
        let tail = certificate_fragment(&message, half, message.len() - half, 4);
        sent.observe(&[tail.clone(), record(22, 0, 5, &[16, 0, 0, 0])].concat());
        assert!(sent.chain().is_none());
        sent.observe(&tail);
        assert!(sent.chain().is_none());
        sent.observe(&certificate_fragment(&message, 0, half, 3));
        assert_eq!(sent.chain().unwrap(), &certs[..]);
        // A message claiming more than 64 KiB is not collected.
        let mut big = SentCertificates::default();
        let mut hs = vec![
            CERTIFICATE,
            0x01,
            0x00,
            0x01,
            0,
            2,
            0,
            0,
            0,
            0,
            0,
            4,
            0,
            0,
            0,
            0,
        ];
        hs.truncate(HANDSHAKE_HEADER + 4);
        big.observe(&record(CONTENT_HANDSHAKE, 0, 1, &hs));
        assert!(big.chain().is_none() && big.message.is_none());
    }
}
