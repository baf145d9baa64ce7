//! What the IN and the node read of DTLS 1.2 records (RFC 6347 §4.1) besides the stateless
//! hello exchange (which is the connection layer's, `m2mpki_connection::dtls`): the server's
//! extended master secret (RFC 7627), protected records too short for the suite, fatal alerts,
//! and the peer's Certificate message as it was sent.
//!
//! OpenSSL does the handshake itself; this module only frames records and reads epoch-0
//! handshake records, which are in the clear.

use m2mpki_connection::dtls::epoch0_handshake;
pub use m2mpki_connection::dtls::{
    CONTENT_ALERT, CONTENT_HANDSHAKE, HANDSHAKE_HEADER, RECORD_HEADER,
};
use m2mpki_connection::hello::{be, vector};

const SERVER_HELLO: u8 = 2;
/// The extended_master_secret extension (RFC 7627).
const EXT_EMS: u16 = 23;

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

#[cfg(test)]
mod tests {
    use super::*;

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
