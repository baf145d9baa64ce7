//! The HTTP/1.1 request head, read and checked before the request reaches hyper.
//!
//! hyper answers a malformed request itself, with an empty body; docs/protocol.md §5 promises a
//! JSON error document for every refusal, and a declared body over the limit deserves `413` at
//! once rather than a connection held open while the rest never comes. So the IN reads the head
//! (bounded in size and header count), refuses what is wrong with its own JSON answer, and hands
//! hyper the bytes it read followed by the rest of the stream ([`Rewind`]).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use hyper::StatusCode;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

/// Most bytes a request head may take (request line and headers).
pub const MAX_HEAD: usize = 16 * 1024;
/// Most header fields in a request.
pub const MAX_HEADERS: usize = 64;

/// Why a request head was refused: the status, the reason code and a message for the error
/// document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeadRefusal {
    /// HTTP status.
    pub status: StatusCode,
    /// Reason code (docs/protocol.md §5).
    pub code: &'static str,
    /// What was wrong.
    pub message: String,
}

fn bad(message: impl Into<String>) -> HeadRefusal {
    HeadRefusal {
        status: StatusCode::BAD_REQUEST,
        code: "bad_request",
        message: message.into(),
    }
}

fn too_large_head() -> HeadRefusal {
    HeadRefusal {
        status: StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
        code: "header_too_large",
        message: format!(
            "the request head may have at most {MAX_HEADERS} header fields and {MAX_HEAD} bytes"
        ),
    }
}

/// What reading the head found.
#[derive(Debug)]
pub enum Head {
    /// A well-formed head; `buffered` is every byte read so far (head and any body bytes).
    Ok {
        /// The bytes to replay to hyper.
        buffered: Vec<u8>,
    },
    /// A head to refuse with a JSON error document.
    Refuse(HeadRefusal),
    /// The peer closed before sending a whole head: nothing to answer.
    Closed,
}

/// Checks a complete or partial head. `Ok(None)`: more bytes are needed.
pub fn check(buf: &[u8], max_body: usize) -> Result<Option<()>, HeadRefusal> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(buf) {
        Ok(httparse::Status::Partial) => {
            return if buf.len() >= MAX_HEAD {
                Err(too_large_head())
            } else {
                Ok(None)
            }
        }
        Ok(httparse::Status::Complete(len)) if len > MAX_HEAD => return Err(too_large_head()),
        Ok(httparse::Status::Complete(_)) => {}
        Err(httparse::Error::TooManyHeaders) => return Err(too_large_head()),
        Err(e) => return Err(bad(format!("malformed HTTP/1.1 request head: {e}"))),
    }
    let mut length: Option<u64> = None;
    let mut chunked = false;
    for h in req.headers.iter() {
        if h.name.eq_ignore_ascii_case("content-length") {
            let text = std::str::from_utf8(h.value).unwrap_or("");
            if text.is_empty() || text.len() > 19 || !text.bytes().all(|b| b.is_ascii_digit()) {
                return Err(bad(format!(
                    "Content-Length must be a decimal number of at most 19 digits, not `{}`",
                    text.escape_debug()
                )));
            }
            if length.is_some() {
                return Err(bad("more than one Content-Length header"));
            }
            // At most 19 digits: fits in a u64.
            length = text.parse().ok();
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = true;
        }
    }
    if chunked && length.is_some() {
        return Err(bad("both Content-Length and Transfer-Encoding"));
    }
    if let Some(n) = length {
        if n > max_body as u64 {
            return Err(HeadRefusal {
                status: StatusCode::PAYLOAD_TOO_LARGE,
                code: "body_too_large",
                message: format!("the body may have at most {max_body} bytes; {n} were declared"),
            });
        }
    }
    Ok(Some(()))
}

/// Reads from `io` until the request head is complete, then checks it.
pub async fn read<S: AsyncRead + Unpin>(io: &mut S, max_body: usize) -> io::Result<Head> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    loop {
        let n = io.read(&mut chunk).await?;
        if n == 0 {
            return Ok(Head::Closed);
        }
        buf.extend_from_slice(&chunk[..n]);
        match check(&buf, max_body) {
            Ok(Some(())) => return Ok(Head::Ok { buffered: buf }),
            Ok(None) => {}
            Err(r) => return Ok(Head::Refuse(r)),
        }
    }
}

/// Bytes and time [`drain`] spends at most on a refused request's remaining input.
const DRAIN_BYTES: usize = 256 * 1024;
const DRAIN_TIME: std::time::Duration = std::time::Duration::from_secs(2);

/// Reads and discards what the peer still sends (bounded in bytes and time), so that closing
/// after a refusal does not reset the connection under an unread answer.
pub async fn drain<S: AsyncRead + Unpin>(io: &mut S) {
    let mut sink = [0u8; 4096];
    let mut left = DRAIN_BYTES;
    let _ = tokio::time::timeout(DRAIN_TIME, async {
        while left > 0 {
            match io.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
    })
    .await;
}

/// A stream that first yields bytes already read from it.
#[derive(Debug)]
pub struct Rewind<S> {
    pre: Vec<u8>,
    at: usize,
    inner: S,
}

impl<S> Rewind<S> {
    /// `pre` comes out first, then whatever `inner` yields.
    pub fn new(pre: Vec<u8>, inner: S) -> Self {
        Rewind { pre, at: 0, inner }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Rewind<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.at < this.pre.len() {
            let n = (this.pre.len() - this.at).min(out.remaining());
            out.put_slice(&this.pre[this.at..this.at + n]);
            this.at += n;
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, out)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Rewind<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// A whole HTTP/1.1 response carrying a JSON body, for refusals written without hyper.
pub fn json_response(status: StatusCode, body: &[u8]) -> Vec<u8> {
    let mut out = format!(
        "HTTP/1.1 {} {}\r\ncontent-type: application/json\r\ncache-control: no-store\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        status.as_u16(),
        status.canonical_reason().unwrap_or(""),
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(body);
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests may fail loudly
    use super::*;

    fn head(headers: &str) -> Vec<u8> {
        format!("POST /bootstrap HTTP/1.1\r\nHost: in\r\n{headers}\r\n").into_bytes()
    }

    #[test]
    fn well_formed_heads_pass_and_partial_ones_wait() {
        assert_eq!(check(&head("Content-Length: 13\r\n"), 8192), Ok(Some(())));
        assert_eq!(check(&head(""), 8192), Ok(Some(())));
        assert_eq!(check(b"POST /bootstrap HTTP/1.1\r\nHost:", 8192), Ok(None));
    }

    #[test]
    fn malformed_heads_are_refused_with_their_status() {
        let cases: &[(&str, u16)] = &[
            ("Content-Length: 5\r\nContent-Length: 5\r\n", 400),
            ("Content-Length: -1\r\n", 400),
            ("Content-Length: 99999999999999999999999\r\n", 400),
            ("Content-Length: 1 2\r\n", 400),
            ("Content-Length: 4\r\nTransfer-Encoding: chunked\r\n", 400),
            ("Content-Length: 1048576\r\n", 413),
            ("X: a\0b\r\n", 400),
        ];
        for (headers, status) in cases {
            let r = check(&head(headers), 8192).expect_err(headers);
            assert_eq!(r.status.as_u16(), *status, "{headers:?}: {r:?}");
        }
        let many: String = (0..5000).map(|i| format!("X-{i}: y\r\n")).collect();
        assert_eq!(check(&head(&many), 8192).unwrap_err().status.as_u16(), 431);
        // A head that never ends is cut at MAX_HEAD.
        let endless = format!("POST / HTTP/1.1\r\nX: {}", "a".repeat(MAX_HEAD));
        assert_eq!(
            check(endless.as_bytes(), 8192).unwrap_err().status.as_u16(),
            431
        );
    }

    #[tokio::test]
    async fn rewind_replays_then_reads_on() {
        let mut r = Rewind::new(b"abc".to_vec(), &b"def"[..]);
        let mut s = String::new();
        r.read_to_string(&mut s).await.unwrap();
        assert_eq!(s, "abcdef");
    }
}
