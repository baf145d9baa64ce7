//! The stateless front of a DTLS 1.2 listener (RFC 6347 §4.2.1): reading a first-flight
//! ClientHello from a datagram, answering it with a HelloVerifyRequest under a stateless
//! cookie, checking the returned cookie, and rebuilding the hello as it was before the cookie,
//! so that no per-peer state exists before a peer has proved its address.
//!
//! Only epoch-0 handshake records, which are in the clear, are read here.

use std::net::SocketAddr;

use aws_lc_rs::hmac;

use crate::hello::{self, be, vector};

/// Record header: type(1) version(2) epoch(2) sequence(6) length(2).
pub const RECORD_HEADER: usize = 13;
/// Handshake header: type(1) length(3) message_seq(2) fragment_offset(3) fragment_length(3).
pub const HANDSHAKE_HEADER: usize = 12;
/// The record type of alerts.
pub const CONTENT_ALERT: u8 = 21;
/// The record type of handshake messages.
pub const CONTENT_HANDSHAKE: u8 = 22;
const HELLO_VERIFY_REQUEST: u8 = 3;
/// How long a cookie stays good, in seconds.
pub const COOKIE_LIFETIME: u64 = 120;
/// Length of our cookies: a 4-byte time stamp and a 16-byte truncated HMAC.
pub const COOKIE_LEN: usize = 20;

/// A ClientHello that arrived alone in one record of epoch 0, unfragmented: the only shape a
/// first flight takes (it is a few hundred bytes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DatagramHello<'a> {
    /// The whole datagram.
    pub datagram: &'a [u8],
    /// The record sequence number.
    pub record_seq: u64,
    /// The handshake message_seq (0 on the first hello, 1 on the one with the cookie).
    pub message_seq: u16,
    /// What the hello offers (its cookie among it).
    pub hello: hello::ClientHello<'a>,
}

/// The first record of a datagram, if it is a DTLS handshake record of epoch 0:
/// (sequence number, record body).
pub fn epoch0_handshake(d: &[u8]) -> Option<(u64, &[u8])> {
    if *d.first()? != CONTENT_HANDSHAKE || d.get(1) != Some(&254) || be(d, 3, 2)? != 0 {
        return None;
    }
    let seq = be(d, 5, 6)?;
    let (body, _) = vector(d, 11, 2)?;
    Some((seq, body))
}

/// Reads a datagram that starts with a ClientHello; `None` for anything else (including a
/// fragmented hello, which no first flight needs).
pub fn client_hello(d: &[u8]) -> Option<DatagramHello<'_>> {
    let (record_seq, body) = epoch0_handshake(d)?;
    if *body.first()? != hello::CLIENT_HELLO {
        return None;
    }
    let msg_len = be(body, 1, 3)?;
    let message_seq = u16::try_from(be(body, 4, 2)?).ok()?;
    let frag_off = be(body, 6, 3)?;
    let frag_len = be(body, 9, 3)?;
    let message = body.get(HANDSHAKE_HEADER..)?;
    if frag_off != 0 || frag_len != msg_len || u64::try_from(message.len()).ok()? != msg_len {
        return None;
    }
    Some(DatagramHello {
        datagram: d,
        record_seq,
        message_seq,
        hello: hello::parse_body(message, true)?,
    })
}

impl DatagramHello<'_> {
    /// The same hello as it was before the cookie: cookie removed, message_seq 0, record
    /// sequence number one lower. OpenSSL's server object only takes a cookie-bearing hello
    /// after it has itself asked for the cookie; feeding it this first lets a fresh object
    /// accept the real one, so no object exists before the peer has proved its address.
    pub fn without_cookie(&self) -> Vec<u8> {
        let d = self.datagram;
        let cookie_at = RECORD_HEADER + HANDSHAKE_HEADER + self.hello.cookie_at;
        let after = cookie_at + 1 + self.hello.cookie.len();
        let mut v = Vec::with_capacity(d.len());
        v.extend_from_slice(d.get(..cookie_at).unwrap_or_default());
        v.push(0);
        v.extend_from_slice(d.get(after..).unwrap_or_default());
        // Lengths fit: the datagram they come from had longer ones in the same fields.
        let record_len = (v.len().saturating_sub(RECORD_HEADER) as u64).to_be_bytes();
        let msg_len =
            (v.len().saturating_sub(RECORD_HEADER + HANDSHAKE_HEADER) as u64).to_be_bytes();
        let seq = self.record_seq.saturating_sub(1).to_be_bytes();
        for (at, bytes) in [
            (5, &seq[2..]),
            (11, &record_len[6..]),
            (14, &msg_len[5..]),
            (17, &[0u8, 0][..]),
            (22, &msg_len[5..]),
        ] {
            if let Some(field) = v.get_mut(at..at + bytes.len()) {
                field.copy_from_slice(bytes);
            }
        }
        v
    }
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

fn addr_bytes(a: &SocketAddr) -> [u8; 18] {
    let ip = match a.ip() {
        std::net::IpAddr::V4(ip) => ip.to_ipv6_mapped().octets(),
        std::net::IpAddr::V6(ip) => ip.octets(),
    };
    let mut v = [0u8; 18];
    v[..16].copy_from_slice(&ip);
    v[16..].copy_from_slice(&a.port().to_be_bytes());
    v
}

/// The system's random source failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NoRandom;

impl std::fmt::Display for NoRandom {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the system's random source failed")
    }
}

impl std::error::Error for NoRandom {}

impl Cookies {
    /// Cookies under a fresh random secret.
    pub fn new() -> Result<Self, NoRandom> {
        let rng = aws_lc_rs::rand::SystemRandom::new();
        let key = hmac::Key::generate(hmac::HMAC_SHA256, &rng).map_err(|_| NoRandom)?;
        Ok(Cookies { key })
    }

    fn mac(&self, stamp: u32, peer: &SocketAddr, random: &[u8]) -> [u8; 16] {
        let mut ctx = hmac::Context::with_key(&self.key);
        ctx.update(&stamp.to_be_bytes());
        ctx.update(&addr_bytes(peer));
        ctx.update(random);
        let tag = ctx.sign();
        let mut out = [0u8; 16];
        if let Some(t) = tag.as_ref().get(..16) {
            out.copy_from_slice(t);
        }
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

/// A HelloVerifyRequest answering `hello` with `cookie` (at most 255 bytes, as ours are):
/// version DTLS 1.0 in the record and the body as RFC 6347 §4.2.1 recommends, the hello's
/// record sequence number echoed.
pub fn hello_verify_request(hello: &DatagramHello<'_>, cookie: &[u8; COOKIE_LEN]) -> Vec<u8> {
    const BODY: usize = 3 + COOKIE_LEN;
    let mut v = Vec::with_capacity(RECORD_HEADER + HANDSHAKE_HEADER + BODY);
    v.extend_from_slice(&[CONTENT_HANDSHAKE, 254, 255, 0, 0]);
    v.extend_from_slice(&hello.record_seq.to_be_bytes()[2..]);
    v.extend_from_slice(&[0, (HANDSHAKE_HEADER + BODY) as u8]);
    v.push(HELLO_VERIFY_REQUEST);
    v.extend_from_slice(&[0, 0, BODY as u8]);
    v.extend_from_slice(&[0, 0, 0, 0, 0]);
    v.extend_from_slice(&[0, 0, BODY as u8]);
    v.extend_from_slice(&[254, 255, COOKIE_LEN as u8]);
    v.extend_from_slice(cookie);
    v
}

/// A fatal alert in epoch 0, for a peer refused outside the TLS stack's state machine: 40
/// (`handshake_failure`) for a cookie-proven hello without the extended master secret, 20
/// (`bad_record_mac`) for a Finished that does not decrypt.
pub fn epoch0_alert(description: u8, record_seq: u64) -> Vec<u8> {
    let mut v = vec![CONTENT_ALERT, 254, 253, 0, 0];
    v.extend_from_slice(&record_seq.to_be_bytes()[2..]);
    v.extend_from_slice(&[0, 2, 2, description]);
    v
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests may fail loudly
    use super::*;

    /// A ClientHello as OpenSSL 3.0's `s_client -dtls1_2` sends it, first flight, trimmed to
    /// the fields read here (built by hand: version, random, session id, cookie, suites,
    /// compression, extensions with EMS).
    fn hello(cookie: &[u8], ems: bool, message_seq: u16, record_seq: u64) -> Vec<u8> {
        let mut body = vec![254, 253];
        body.extend_from_slice(&[7u8; 32]);
        body.push(0);
        body.push(u8::try_from(cookie.len()).unwrap());
        body.extend_from_slice(cookie);
        body.extend_from_slice(&[0, 2, 0xc0, 0xae, 1, 0]);
        let mut ext = vec![0, 11, 0, 2, 1, 0];
        if ems {
            ext.extend_from_slice(&[0, 23, 0, 0]);
        }
        body.extend_from_slice(&u16::try_from(ext.len()).unwrap().to_be_bytes());
        body.extend_from_slice(&ext);
        let len = u32::try_from(body.len()).unwrap().to_be_bytes();
        let mut hs = vec![hello::CLIENT_HELLO];
        hs.extend_from_slice(&len[1..]);
        hs.extend_from_slice(&message_seq.to_be_bytes());
        hs.extend_from_slice(&[0, 0, 0]);
        hs.extend_from_slice(&len[1..]);
        hs.extend_from_slice(&body);
        let mut d = vec![CONTENT_HANDSHAKE, 254, 253, 0, 0];
        d.extend_from_slice(&record_seq.to_be_bytes()[2..]);
        d.extend_from_slice(&u16::try_from(hs.len()).unwrap().to_be_bytes());
        d.extend_from_slice(&hs);
        d
    }

    #[test]
    fn reads_hellos_and_strips_the_cookie() {
        let first = hello(&[], true, 0, 0);
        let h = client_hello(&first).unwrap();
        assert!(h.hello.cookie.is_empty() && h.hello.ems && h.message_seq == 0);
        assert_eq!(h.hello.random, &[7u8; 32]);
        let second = hello(&[9; COOKIE_LEN], true, 1, 1);
        let h2 = client_hello(&second).unwrap();
        assert_eq!(h2.hello.cookie, &[9; COOKIE_LEN]);
        assert_eq!(h2.without_cookie(), first);
        assert!(!client_hello(&hello(&[], false, 0, 0)).unwrap().hello.ems);
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
        let hvr = hello_verify_request(&h, &[0xAA; COOKIE_LEN]);
        let mut want = vec![
            // record: handshake, DTLS 1.0, epoch 0, the hello's sequence 5, length 35
            22, 254, 255, 0, 0, 0, 0, 0, 0, 0, 5, 0, 35,
            // handshake: hello_verify_request, length 23, message_seq 0, offset 0, length 23
            3, 0, 0, 23, 0, 0, 0, 0, 0, 0, 0, 23,
            // server_version DTLS 1.0, cookie length 20, cookie
            254, 255, 20,
        ];
        want.extend_from_slice(&[0xAA; COOKIE_LEN]);
        assert_eq!(hvr, want);
    }

    #[test]
    fn an_alert_names_its_description_and_echoes_the_sequence() {
        assert_eq!(
            epoch0_alert(40, 0x0102),
            [21, 254, 253, 0, 0, 0, 0, 0, 0, 1, 2, 0, 2, 2, 40]
        );
    }
}
