//! The field node's DTLS + CoAP side: handshake, exporter, one confirmable `POST /bootstrap`
//! with CoAP's retransmission (RFC 7252 §4.2) and Block2 continuation (RFC 7959).

use std::time::{Duration, Instant};

use m2mpki_ca::rootset::RootSet;
use m2mpki_ca::verify::{self, Purpose};
use m2mpki_ca::DnsName;
use openssl::ssl::{HandshakeError, SslContext, SslStream};
use tokio::net::UdpSocket;

use super::{install_verifier, new_ssl, openssl_error, record, Pipe};
use crate::coap::{self, option, Block, Message, Type};
use crate::config::DtlsSuite;
use crate::protocol::{Ts0003Keys, WrapKey, PATH};
use crate::{Error, Result};

/// CoAP's ACK_TIMEOUT and MAX_RETRANSMIT (RFC 7252 §4.8).
const ACK_TIMEOUT: Duration = Duration::from_secs(2);
const MAX_RETRANSMIT: u32 = 4;
/// How often the handshake is polled (OpenSSL retransmits then).
const TICK: Duration = Duration::from_millis(100);

/// The client's DTLS context: our chain and software key, the suites, and the IN's chain
/// checked against `roots` for `fqdn` inside the handshake.
pub fn context(
    suites: &[DtlsSuite],
    chain: &[Vec<u8>],
    pkcs8: &[u8],
    roots: RootSet,
    fqdn: DnsName,
) -> Result<SslContext> {
    let mut b = super::context(false, suites, chain, pkcs8)?;
    install_verifier(&mut b, move |chain| {
        verify::verify(
            &roots,
            chain,
            Purpose::Server,
            Some(&fqdn),
            time::OffsetDateTime::now_utc(),
        )
    });
    Ok(b.build())
}

/// An established DTLS session with the IN.
pub struct Session {
    socket: UdpSocket,
    stream: SslStream<Pipe>,
    peer: String,
    /// The key both ends exported.
    pub wrap_key: WrapKey,
    /// The TS-0003 export (protocol version 2).
    pub ts0003: Ts0003Keys,
    /// `DTLSv1_2 <suite>`.
    pub protocol: String,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("peer", &self.peer)
            .field("protocol", &self.protocol)
            .finish_non_exhaustive()
    }
}

fn handshake_refused(peer: &str, reason: String) -> Error {
    Error::Handshake {
        peer: peer.to_owned(),
        reason,
    }
}

/// Connects to `addr` and completes the DTLS handshake (SNI `fqdn`) within `deadline`.
pub async fn connect(
    ctx: &SslContext,
    addr: &str,
    fqdn: &DnsName,
    mtu: u16,
    deadline: Instant,
) -> Result<Session> {
    let target = tokio::net::lookup_host(addr)
        .await
        .map_err(|e| Error::Connect {
            addr: addr.to_owned(),
            reason: e.to_string(),
        })?
        .next()
        .ok_or_else(|| Error::Connect {
            addr: addr.to_owned(),
            reason: "no address".into(),
        })?;
    let local = if target.is_ipv6() {
        "[::]:0"
    } else {
        "0.0.0.0:0"
    };
    let socket = UdpSocket::bind(local).await.map_err(|e| Error::Connect {
        addr: addr.to_owned(),
        reason: e.to_string(),
    })?;
    socket.connect(target).await.map_err(|e| Error::Connect {
        addr: addr.to_owned(),
        reason: e.to_string(),
    })?;
    let peer = format!("{fqdn} ({addr}, DTLS)");
    let (mut ssl, verdict, pipe) = new_ssl(ctx, mtu, target.is_ipv6())?;
    ssl.set_hostname(fqdn.as_str()).map_err(openssl_error)?;
    let mut ems: Option<bool> = None;
    let mut mid = match ssl.connect(pipe) {
        Ok(_) => {
            return Err(Error::internal(
                "DTLS handshake finished without the server",
            ))
        }
        Err(HandshakeError::WouldBlock(m)) => m,
        Err(e) => return Err(handshake_refused(&peer, e.to_string())),
    };
    let mut buf = vec![0u8; 65_536];
    let stream = loop {
        for d in mid.get_mut().outbox.drain(..) {
            // A refused send (ICMP unreachable from an earlier datagram) is retried by the
            // next retransmission.
            let _ = socket.send(&d).await;
        }
        let wait = deadline.saturating_duration_since(Instant::now());
        if wait.is_zero() {
            return Err(Error::Timeout(format!("in the DTLS handshake with {peer}")));
        }
        tokio::select! {
            r = socket.recv(&mut buf) => {
                if let Ok(n) = r {
                    if let Some(e) = record::server_hello_ems(&buf[..n]) {
                        ems = Some(e);
                    }
                    mid.get_mut().inbox.push_back(buf[..n].to_vec());
                }
                let min = super::min_sealed(mid.ssl());
                mid.get_mut().min_sealed = min;
            }
            _ = tokio::time::sleep(TICK.min(wait)) => {}
        }
        match mid.handshake() {
            Ok(s) => break s,
            Err(HandshakeError::WouldBlock(m)) => mid = m,
            Err(HandshakeError::Failure(mut m)) => {
                for d in m.get_mut().outbox.drain(..) {
                    let _ = socket.send(&d).await;
                }
                let ours = verdict.lock().ok().and_then(|v| v.clone());
                let reason = match ours {
                    Some(Err(r)) => format!("the IN's certificate was refused: {r}"),
                    _ => openssl_reason(m.error()),
                };
                return Err(handshake_refused(&peer, reason));
            }
            Err(HandshakeError::SetupFailure(e)) => return Err(openssl_error(e)),
        }
    };
    match verdict.lock().ok().and_then(|v| v.clone()) {
        Some(Ok(_)) => {}
        Some(Err(r)) => {
            return Err(handshake_refused(
                &peer,
                format!("the IN's certificate was refused: {r}"),
            ))
        }
        None => {
            return Err(handshake_refused(
                &peer,
                "the IN sent no certificate".into(),
            ))
        }
    }
    if ems != Some(true) {
        return Err(handshake_refused(
            &peer,
            "the IN did not negotiate the extended master secret (RFC 7627), without which the exporter is unsafe".into(),
        ));
    }
    let mut stream = stream;
    let min = super::min_sealed(stream.ssl());
    stream.get_mut().min_sealed = min;
    let wrap_key = super::export_wrap_key(stream.ssl())?;
    let ts0003 = super::export_ts0003(stream.ssl())?;
    let protocol = format!("DTLSv1_2 {}", super::suite_name(stream.ssl()));
    Ok(Session {
        socket,
        stream,
        peer,
        wrap_key,
        ts0003,
        protocol,
    })
}

/// OpenSSL's reason text (`tlsv1 alert unknown ca`), without its file and line.
fn openssl_reason(e: &openssl::ssl::Error) -> String {
    e.ssl_error()
        .and_then(|s| s.errors().first())
        .and_then(|x| x.reason())
        .map_or_else(
            || e.to_string(),
            |r| r.replace("tlsv1 alert", "received fatal alert:"),
        )
}

fn random_u16() -> u16 {
    let mut b = [0u8; 2];
    let _ = aws_lc_rs::rand::fill(&mut b);
    u16::from_be_bytes(b)
}

impl Session {
    /// The IN's address, for messages.
    pub fn peer(&self) -> &str {
        &self.peer
    }

    /// Sends one datagram's worth of application data.
    pub async fn send_record(&mut self, bytes: &[u8]) -> Result<()> {
        self.stream
            .ssl_write(bytes)
            .map_err(|e| Error::Protocol(format!("DTLS write: {e}")))?;
        self.flush().await;
        Ok(())
    }

    async fn flush(&mut self) {
        for d in self.stream.get_mut().outbox.drain(..) {
            let _ = self.socket.send(&d).await;
        }
    }

    /// Waits up to `wait` for one application record.
    pub async fn recv_record(&mut self, wait: Duration) -> Result<Option<Vec<u8>>> {
        let until = Instant::now() + wait;
        let mut buf = vec![0u8; 65_536];
        loop {
            let mut record = vec![0u8; 16_384];
            match self.stream.ssl_read(&mut record) {
                Ok(n) => {
                    record.truncate(n);
                    return Ok(Some(record));
                }
                Err(e) if e.code() == openssl::ssl::ErrorCode::WANT_READ => {}
                Err(e) if e.code() == openssl::ssl::ErrorCode::ZERO_RETURN => {
                    return Err(Error::Network {
                        peer: self.peer.clone(),
                        reason: "the IN closed the DTLS session".into(),
                    })
                }
                Err(e) => {
                    return Err(Error::Handshake {
                        peer: self.peer.clone(),
                        reason: e.to_string(),
                    })
                }
            }
            self.flush().await;
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            match tokio::time::timeout(left, self.socket.recv(&mut buf)).await {
                Ok(Ok(n)) => self.stream.get_mut().inbox.push_back(buf[..n].to_vec()),
                Ok(Err(_)) => {} // ICMP error of an earlier send
                Err(_) => return Ok(None),
            }
        }
    }

    /// One confirmable exchange: sends `request` (its message ID is set here) and returns the
    /// matching response, retransmitting as RFC 7252 §4.2 says.
    async fn exchange(&mut self, mut request: Message) -> Result<Message> {
        request.message_id = random_u16();
        let bytes = request.encode();
        let mut timeout = ACK_TIMEOUT;
        for _ in 0..=MAX_RETRANSMIT {
            self.send_record(&bytes).await?;
            let until = Instant::now() + timeout;
            let mut acked = false;
            loop {
                let left = until.saturating_duration_since(Instant::now());
                let wait = if acked { Duration::from_secs(30) } else { left };
                if wait.is_zero() {
                    break;
                }
                let Some(rec) = self.recv_record(wait).await? else {
                    if acked {
                        return Err(Error::Timeout(format!(
                            "waiting for the separate CoAP response from {}",
                            self.peer
                        )));
                    }
                    break;
                };
                let Ok(m) = Message::decode(&rec) else {
                    continue;
                };
                match m.kind {
                    Type::Ack if m.message_id == request.message_id && m.code == 0 => {
                        acked = true; // the response will follow separately
                    }
                    Type::Ack if m.message_id == request.message_id => return Ok(m),
                    Type::Rst if m.message_id == request.message_id => {
                        return Err(Error::Protocol("the IN reset the CoAP request".into()))
                    }
                    Type::Con | Type::Non if m.token == request.token && m.code >> 5 != 0 => {
                        if m.kind == Type::Con {
                            let ack = Message {
                                kind: Type::Ack,
                                code: 0,
                                message_id: m.message_id,
                                token: vec![],
                                options: vec![],
                                payload: vec![],
                            };
                            self.send_record(&ack.encode()).await?;
                        }
                        return Ok(m);
                    }
                    _ => {}
                }
            }
            timeout *= 2;
        }
        Err(Error::Timeout(format!(
            "no CoAP acknowledgement from {} after {} transmissions",
            self.peer,
            MAX_RETRANSMIT + 1
        )))
    }

    /// `POST /bootstrap` with a JSON body; returns the response code (`c*100+dd`, as HTTP
    /// statuses read) and the whole body, following Block2.
    pub async fn post_bootstrap(&mut self, body: &[u8]) -> Result<(u16, Vec<u8>)> {
        let mut token = [0u8; 8];
        aws_lc_rs::rand::fill(&mut token).map_err(|_| Error::internal("random source failed"))?;
        let request = |block: Option<Block>| {
            let mut options = vec![
                (
                    option::URI_PATH,
                    PATH.trim_start_matches('/').as_bytes().to_vec(),
                ),
                (option::CONTENT_FORMAT, coap::uint(u32::from(coap::JSON))),
                (option::ACCEPT, coap::uint(u32::from(coap::JSON))),
            ];
            if let Some(b) = block {
                options.push((option::BLOCK2, b.encode()));
            }
            Message {
                kind: Type::Con,
                code: coap::POST,
                message_id: 0,
                token: token.to_vec(),
                options,
                payload: body.to_vec(),
            }
        };
        let mut response = self.exchange(request(None)).await?;
        let code = response.code;
        let mut out = std::mem::take(&mut response.payload);
        let mut block = response
            .option_values(option::BLOCK2)
            .next()
            .map(Block::decode);
        while let Some(b) = block {
            let b = b.ok_or_else(|| Error::Protocol("malformed Block2 option".into()))?;
            if !b.more {
                break;
            }
            if out.len() > 64 * 1024 {
                return Err(Error::Protocol("the response is larger than 64 KiB".into()));
            }
            let next = Block {
                num: b.num + 1,
                more: false,
                szx: b.szx,
            };
            let mut r = self.exchange(request(Some(next))).await?;
            if r.code != code {
                return Err(Error::Protocol(format!(
                    "Block2 continuation changed the code from {} to {}",
                    coap::code_text(code),
                    coap::code_text(r.code)
                )));
            }
            out.append(&mut r.payload);
            block = r.option_values(option::BLOCK2).next().map(Block::decode);
        }
        let status = u16::from(code >> 5) * 100 + u16::from(code & 0x1f);
        Ok((status, out))
    }

    /// Ends the session with close_notify.
    pub async fn close(mut self) {
        let _ = self.stream.shutdown();
        self.flush().await;
    }
}
