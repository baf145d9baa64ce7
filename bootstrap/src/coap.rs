//! CoAP messages (RFC 7252 §3) and block-wise transfer values (RFC 7959 §2.2): the small part
//! of CoAP the bootstrap binding speaks, encoded and decoded here so every malformed message
//! gets a precise refusal (docs/protocol.md §7 gives the bytes).

/// Message types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Type {
    /// Confirmable (0).
    Con,
    /// Non-confirmable (1).
    Non,
    /// Acknowledgement (2).
    Ack,
    /// Reset (3).
    Rst,
}

/// Option numbers used by the binding.
pub mod option {
    /// Uri-Host.
    pub const URI_HOST: u16 = 3;
    /// Uri-Path (one per segment).
    pub const URI_PATH: u16 = 11;
    /// Content-Format.
    pub const CONTENT_FORMAT: u16 = 12;
    /// Max-Age: with 4.29 (RFC 8516) and 5.03, when to retry.
    pub const MAX_AGE: u16 = 14;
    /// Accept.
    pub const ACCEPT: u16 = 17;
    /// Block2 (RFC 7959).
    pub const BLOCK2: u16 = 23;
    /// Size2 (RFC 7959).
    pub const SIZE2: u16 = 28;
}

/// Content-Format `application/json`.
pub const JSON: u16 = 50;
/// Method code GET (0.01).
pub const GET: u8 = 1;
/// Method code POST (0.02).
pub const POST: u8 = 2;

/// A CoAP code from class and detail (`c.dd`).
pub const fn code(class: u8, detail: u8) -> u8 {
    (class << 5) | detail
}

/// A code as `c.dd`, for messages.
pub fn code_text(c: u8) -> String {
    format!("{}.{:02}", c >> 5, c & 0x1f)
}

/// One CoAP message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// Its type.
    pub kind: Type,
    /// Request method or response code.
    pub code: u8,
    /// Message ID (deduplication, matching ACKs).
    pub message_id: u16,
    /// Token (matching responses to requests), 0 to 8 bytes.
    pub token: Vec<u8>,
    /// Options, as (number, value), in ascending number order.
    pub options: Vec<(u16, Vec<u8>)>,
    /// Payload.
    pub payload: Vec<u8>,
}

/// Why a datagram is not a CoAP message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed CoAP message: {0}")]
pub struct Malformed(pub String);

fn bad(s: impl Into<String>) -> Malformed {
    Malformed(s.into())
}

/// Reads an option delta or length nibble with its extension bytes.
fn extended(nibble: u8, d: &[u8], at: &mut usize, what: &str) -> Result<u32, Malformed> {
    let byte = |at: &mut usize| -> Result<u32, Malformed> {
        let b = *d
            .get(*at)
            .ok_or_else(|| bad(format!("option {what} runs past the end")))?;
        *at += 1;
        Ok(u32::from(b))
    };
    match nibble {
        0..=12 => Ok(u32::from(nibble)),
        13 => Ok(byte(at)? + 13),
        14 => Ok(((byte(at)? << 8) | byte(at)?) + 269),
        _ => Err(bad(format!("option {what} nibble 15 is reserved"))),
    }
}

impl Message {
    /// Decodes a datagram (one whole message).
    pub fn decode(d: &[u8]) -> Result<Self, Malformed> {
        let [first, code, id_hi, id_lo, rest @ ..] = d else {
            return Err(bad(format!(
                "{} bytes, shorter than the 4-byte header",
                d.len()
            )));
        };
        if first >> 6 != 1 {
            return Err(bad(format!("version {} (only 1 exists)", first >> 6)));
        }
        let kind = match (first >> 4) & 3 {
            0 => Type::Con,
            1 => Type::Non,
            2 => Type::Ack,
            _ => Type::Rst,
        };
        let tkl = usize::from(first & 0x0f);
        if tkl > 8 {
            return Err(bad(format!("token length {tkl} (at most 8)")));
        }
        let token = rest
            .get(..tkl)
            .ok_or_else(|| bad("the token runs past the end"))?
            .to_vec();
        let mut at = tkl;
        let mut number: u32 = 0;
        let mut options = Vec::new();
        let mut payload = Vec::new();
        while let Some(&b) = rest.get(at) {
            at += 1;
            if b == 0xff {
                payload = rest[at..].to_vec();
                if payload.is_empty() {
                    return Err(bad("payload marker with no payload"));
                }
                break;
            }
            let delta = extended(b >> 4, rest, &mut at, "delta")?;
            let len = extended(b & 0x0f, rest, &mut at, "length")? as usize;
            number += delta;
            let n = u16::try_from(number).map_err(|_| bad("option number above 65535"))?;
            let value = rest
                .get(at..at + len)
                .ok_or_else(|| bad(format!("option {n} runs past the end")))?;
            at += len;
            options.push((n, value.to_vec()));
        }
        Ok(Message {
            kind,
            code: *code,
            message_id: u16::from_be_bytes([*id_hi, *id_lo]),
            token,
            options,
            payload,
        })
    }

    /// Encodes the message (options sorted by number).
    pub fn encode(&self) -> Vec<u8> {
        let kind = match self.kind {
            Type::Con => 0,
            Type::Non => 1,
            Type::Ack => 2,
            Type::Rst => 3,
        };
        let tkl = self.token.len().min(8);
        let mut v = vec![0x40 | (kind << 4) | tkl as u8, self.code];
        v.extend_from_slice(&self.message_id.to_be_bytes());
        v.extend_from_slice(&self.token[..tkl]);
        let mut options = self.options.clone();
        options.sort_by_key(|(n, _)| *n);
        let mut last = 0u16;
        for (n, value) in &options {
            let delta = u32::from(n - last);
            last = *n;
            let nib = |x: u32| -> (u8, Vec<u8>) {
                match x {
                    0..=12 => (x as u8, vec![]),
                    13..=268 => (13, vec![(x - 13) as u8]),
                    _ => (14, ((x - 269) as u16).to_be_bytes().to_vec()),
                }
            };
            let (dn, dx) = nib(delta);
            let (ln, lx) = nib(value.len() as u32);
            v.push((dn << 4) | ln);
            v.extend_from_slice(&dx);
            v.extend_from_slice(&lx);
            v.extend_from_slice(value);
        }
        if !self.payload.is_empty() {
            v.push(0xff);
            v.extend_from_slice(&self.payload);
        }
        v
    }

    /// The values of option `n`.
    pub fn option_values(&self, n: u16) -> impl Iterator<Item = &[u8]> {
        self.options
            .iter()
            .filter(move |(k, _)| *k == n)
            .map(|(_, v)| v.as_slice())
    }

    /// The first value of option `n` as an unsigned integer (RFC 7252 §3.2 `uint`), `None` if
    /// absent or longer than 4 bytes.
    pub fn uint_option(&self, n: u16) -> Option<Option<u32>> {
        let v = self.option_values(n).next()?;
        if v.len() > 4 {
            return Some(None);
        }
        Some(Some(v.iter().fold(0u32, |a, b| (a << 8) | u32::from(*b))))
    }

    /// The Uri-Path as `/a/b`.
    pub fn path(&self) -> String {
        let segments: Vec<String> = self
            .option_values(option::URI_PATH)
            .map(|s| String::from_utf8_lossy(s).into_owned())
            .collect();
        format!("/{}", segments.join("/"))
    }
}

/// A `uint` option value: the shortest big-endian form (zero is empty).
pub fn uint(x: u32) -> Vec<u8> {
    let b = x.to_be_bytes();
    let skip = b.iter().take_while(|x| **x == 0).count();
    b[skip..].to_vec()
}

/// A Block2 value (RFC 7959 §2.2): block number, whether more follow, size exponent
/// (block size = 2^(szx+4), szx 0..=6).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Block {
    /// Block number.
    pub num: u32,
    /// More blocks follow.
    pub more: bool,
    /// Size exponent.
    pub szx: u8,
}

impl Block {
    /// Bytes per block.
    pub fn size(self) -> usize {
        1 << (usize::from(self.szx) + 4)
    }

    /// Decodes an option value.
    pub fn decode(v: &[u8]) -> Option<Block> {
        if v.len() > 3 {
            return None;
        }
        let x = v.iter().fold(0u32, |a, b| (a << 8) | u32::from(*b));
        let szx = (x & 7) as u8;
        if szx == 7 {
            return None;
        }
        Some(Block {
            num: x >> 4,
            more: x & 8 != 0,
            szx,
        })
    }

    /// Encodes as an option value.
    pub fn encode(self) -> Vec<u8> {
        uint((self.num << 4) | (u32::from(self.more) << 3) | u32::from(self.szx))
    }

    /// The largest size exponent whose block fits in `room` bytes (at least 16-byte blocks).
    pub fn szx_for(room: usize) -> u8 {
        (0..=6u8)
            .rev()
            .find(|s| (1usize << (s + 4)) <= room)
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_rfc_layout() {
        let m = Message {
            kind: Type::Con,
            code: POST,
            message_id: 0x1234,
            token: vec![0xaa, 0xbb],
            options: vec![
                (option::URI_PATH, b"bootstrap".to_vec()),
                (option::CONTENT_FORMAT, uint(u32::from(JSON))),
            ],
            payload: br#"{"version":1}"#.to_vec(),
        };
        let bytes = m.encode();
        // Ver 1, CON, TKL 2 | 0.02 | ID | token | Uri-Path (delta 11, len 9) | Content-Format
        // (delta 1, len 1, 50) | 0xFF | payload
        assert_eq!(&bytes[..6], &[0x42, 0x02, 0x12, 0x34, 0xaa, 0xbb]);
        assert_eq!(bytes[6], 0xb9);
        assert_eq!(&bytes[7..16], b"bootstrap");
        assert_eq!(&bytes[16..19], &[0x11, 50, 0xff]);
        assert_eq!(Message::decode(&bytes).unwrap(), m);
        assert_eq!(m.path(), "/bootstrap");
    }

    #[test]
    fn extended_deltas_and_lengths() {
        let m = Message {
            kind: Type::Ack,
            code: code(2, 4),
            message_id: 1,
            token: vec![],
            options: vec![
                (
                    option::BLOCK2,
                    Block {
                        num: 300,
                        more: true,
                        szx: 6,
                    }
                    .encode(),
                ),
                (2000, vec![7; 300]),
            ],
            payload: vec![],
        };
        assert_eq!(Message::decode(&m.encode()).unwrap(), m);
    }

    #[test]
    fn malformed_messages_are_named() {
        let good = Message {
            kind: Type::Con,
            code: POST,
            message_id: 9,
            token: vec![1, 2, 3],
            options: vec![(option::URI_PATH, b"bootstrap".to_vec())],
            payload: b"{}".to_vec(),
        }
        .encode();
        // Header (4) and token (3) end at 7, the Uri-Path option at 17: a message may end
        // there; anywhere else (and after a bare payload marker) it is cut short.
        for cut in (0..7).chain(8..17).chain([18]) {
            assert!(Message::decode(&good[..cut]).is_err(), "cut at {cut}");
        }
        for cut in [7, 17, good.len()] {
            assert!(Message::decode(&good[..cut]).is_ok(), "cut at {cut}");
        }
        let mut v2 = good.clone();
        v2[0] = (v2[0] & 0x3f) | 0x80;
        assert!(Message::decode(&v2).unwrap_err().0.contains("version 2"));
        let mut tkl = good.clone();
        tkl[0] = (tkl[0] & 0xf0) | 9;
        assert!(Message::decode(&tkl)
            .unwrap_err()
            .0
            .contains("token length 9"));
        let mut marker = good.clone();
        marker.truncate(good.len() - 3);
        marker.push(0xff);
        assert!(Message::decode(&marker)
            .unwrap_err()
            .0
            .contains("payload marker with no payload"));
        assert!(Message::decode(&[0x40, 1, 0, 0, 0xf0])
            .unwrap_err()
            .0
            .contains("nibble 15 is reserved"));
    }

    #[test]
    fn blocks() {
        let b = Block {
            num: 2,
            more: false,
            szx: 2,
        };
        assert_eq!(b.encode(), vec![0x22]);
        assert_eq!(Block::decode(&[0x22]), Some(b));
        assert_eq!(b.size(), 64);
        assert_eq!(Block::decode(&[0x0f]), None);
        assert_eq!(Block::szx_for(1100), 6);
        assert_eq!(Block::szx_for(600), 5);
        assert_eq!(Block::szx_for(10), 0);
    }
}
