//! The HTTP/1.1 binding of an admitted TLS session (rustls or OpenSSL): one request, routed
//! to the enrolment core, answered with its status and the error document of
//! docs/protocol.md §5.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::AsyncWriteExt;

use crate::enrol::{Admitted, Answer, Core, Outcome};
use crate::http_head::{self, Head, Rewind};
use crate::protocol::PATH;
use m2mpki_connection::admission::Ticket;

/// The HTTP exchange on an established, admitted session (either TLS stack): one request, its
/// answer, within the idle limit. The connection can be evicted until its request head is
/// in, not after.
pub(crate) async fn serve_http<S>(shared: Arc<Core>, node: Admitted, mut tls: S, ticket: Ticket)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let limits = shared.config.limits.clone();
    let peer = node.peer;
    let session = Arc::new(Session { core: shared, node });
    let service = hyper::service::service_fn(move |req| {
        let session = session.clone();
        async move { Ok::<_, Infallible>(session.handle(req).await) }
    });
    let max_body = limits.max_body;
    let exchange = async move {
        let mut ticket = ticket;
        // The head is checked here, so that every refusal carries the JSON error document.
        let Some(head) = ticket.or_evicted(http_head::read(&mut tls, max_body)).await else {
            tracing::info!(%peer, "evicted while waiting for its request");
            return;
        };
        ticket.leave();
        let buffered = match head {
            Ok(Head::Ok { buffered }) => buffered,
            Ok(Head::Closed) => return,
            Ok(Head::Refuse(r)) => {
                tracing::info!(%peer, code = r.code, "malformed request refused");
                let body = error_body(r.code, r.message);
                let _ = tls
                    .write_all(&http_head::json_response(r.status, &body))
                    .await;
                let _ = tls.shutdown().await;
                // Read on for a moment before closing: closing with unread input makes the
                // kernel send a reset, which can destroy the answer before the client reads it.
                http_head::drain(&mut tls).await;
                return;
            }
            Err(e) => {
                tracing::debug!(%peer, error = %e, "connection ended before a request");
                return;
            }
        };
        // Half-close on: a client that shuts its write side after a whole request still gets
        // its answer.
        let http = hyper::server::conn::http1::Builder::new()
            .keep_alive(false)
            .half_close(true)
            .timer(TokioTimer::new())
            .header_read_timeout(limits.idle_timeout)
            .serve_connection(TokioIo::new(Rewind::new(buffered, tls)), service);
        if let Err(e) = http.await {
            tracing::debug!(%peer, error = %e, "connection ended with an error");
        }
    };
    if tokio::time::timeout(limits.idle_timeout, exchange)
        .await
        .is_err()
    {
        tracing::info!(%peer, "connection idle too long; closed");
    }
}

struct Session {
    core: Arc<Core>,
    node: Admitted,
}

fn json_reply(status: StatusCode, bytes: Vec<u8>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(bytes)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    r.headers_mut().insert(
        hyper::header::CACHE_CONTROL,
        hyper::header::HeaderValue::from_static("no-store"),
    );
    r
}

/// The error document of docs/protocol.md §5.
fn error_body(code: &str, message: impl Into<String>) -> Vec<u8> {
    Answer::refusal(Outcome::BadRequest, code, message).body
}

fn refuse(status: StatusCode, code: &str, message: impl Into<String>) -> Response<Full<Bytes>> {
    json_reply(status, error_body(code, message))
}

/// An answer of the enrolment core as an HTTP response.
fn http_answer(a: Answer) -> Response<Full<Bytes>> {
    let status =
        StatusCode::from_u16(a.outcome.http()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut reply = json_reply(status, a.body);
    if let Some(secs) = a.retry_after {
        reply
            .headers_mut()
            .insert(hyper::header::RETRY_AFTER, secs.into());
    }
    reply
}

impl Session {
    async fn handle(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        if req.uri().path() != PATH {
            return refuse(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("the only resource is POST {PATH}"),
            );
        }
        if req.method() != Method::POST {
            return refuse(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                format!("use POST {PATH}"),
            );
        }
        let json = req
            .headers()
            .get(hyper::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| {
                v.split(';')
                    .next()
                    .is_some_and(|m| m.trim().eq_ignore_ascii_case("application/json"))
            });
        if !json {
            return refuse(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "the body must be application/json",
            );
        }
        // Before the body is read: a rate-limited node is not given the time to send one.
        if let Some(refusal) = self.core.rate_limited(&self.node) {
            return http_answer(refusal);
        }
        let max = self.core.config.limits.max_body;
        let body = match Limited::new(req.into_body(), max).collect().await {
            Ok(b) => b.to_bytes(),
            Err(e) if e.is::<http_body_util::LengthLimitError>() => {
                return refuse(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "body_too_large",
                    format!("the body may have at most {max} bytes"),
                );
            }
            Err(_) => {
                return refuse(
                    StatusCode::BAD_REQUEST,
                    "bad_request",
                    "the body could not be read",
                )
            }
        };
        http_answer(self.core.answer_within_limits(&self.node, &body).await)
    }
}
