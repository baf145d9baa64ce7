//! The HTTP/1.1 binding: one request on an admitted session (either TLS stack), its head
//! checked before hyper sees it (crate::http_head), routed by a route table to a handler, and
//! every refusal answered with the one error document of docs/protocol.md §5. A server is its
//! [`Routes`] and [`Handler`]s; the binding does the rest (the eviction of a connection that
//! waits for its request, the idle limit, 404/405/415/413 and malformed heads).

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::http::request::Parts;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::AsyncWriteExt;

use crate::admission::Ticket;
use crate::http_head::{self, Head, Rewind};

/// A response.
pub type Reply = Response<Full<Bytes>>;

/// What a handler's answer is while it is being made.
pub type Answering = Pin<Box<dyn Future<Output = Reply> + Send>>;

#[derive(serde::Serialize)]
struct ErrorDocument<'a> {
    error: ErrorDetail<'a>,
}

#[derive(serde::Serialize)]
struct ErrorDetail<'a> {
    code: &'a str,
    message: &'a str,
}

/// The error document of docs/protocol.md §5: `{"error": {"code", "message"}}`, the same over
/// HTTP and CoAP, on every listener.
pub fn error_document(code: &str, message: &str) -> Vec<u8> {
    serde_json::to_vec(&ErrorDocument {
        error: ErrorDetail { code, message },
    })
    .unwrap_or_else(|_| b"{}".to_vec())
}

/// A JSON response that no cache keeps.
pub fn json(status: StatusCode, body: Vec<u8>) -> Reply {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    h.insert(
        hyper::header::CACHE_CONTROL,
        hyper::header::HeaderValue::from_static("no-store"),
    );
    r
}

/// A refusal with its error document.
pub fn refuse(status: StatusCode, code: &str, message: &str) -> Reply {
    json(status, error_document(code, message))
}

/// What answers the requests of one route; `P` is what the session knows of its peer.
pub trait Handler<P>: Send + Sync {
    /// Asked before the body is read (rate limits, say): a reply ends the request there, and
    /// the peer is not given the time to send a body.
    fn before_body(&self, _peer: &P, _head: &Parts) -> Option<Reply> {
        None
    }

    /// Answers a request whose body (at most the routes' `max_body`) has been read.
    fn handle(&self, peer: Arc<P>, head: Parts, body: Bytes) -> Answering;
}

struct Route<P> {
    method: Method,
    path: String,
    /// The media type the body must have (parameters aside), if any.
    content_type: Option<&'static str>,
    handler: Arc<dyn Handler<P>>,
}

/// The routes of a server: method, path and body media type to a handler.
pub struct Routes<P> {
    routes: Vec<Route<P>>,
    max_body: usize,
    idle_timeout: Duration,
}

impl<P> std::fmt::Debug for Routes<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(
                self.routes
                    .iter()
                    .map(|r| format!("{} {}", r.method, r.path)),
            )
            .finish()
    }
}

fn media_type_is(head: &Parts, want: &str) -> bool {
    head.headers
        .get(hyper::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|m| m.trim().eq_ignore_ascii_case(want))
}

impl<P: Send + Sync + 'static> Routes<P> {
    /// No routes yet; request bodies of at most `max_body` bytes, and a session may take
    /// `idle_timeout` from its handshake to its answer.
    pub fn new(max_body: usize, idle_timeout: Duration) -> Self {
        Routes {
            routes: Vec::new(),
            max_body,
            idle_timeout,
        }
    }

    /// Adds a route: `method` on `path`, the body of media type `content_type` when given.
    pub fn route(
        mut self,
        method: Method,
        path: &str,
        content_type: Option<&'static str>,
        handler: Arc<dyn Handler<P>>,
    ) -> Self {
        self.routes.push(Route {
            method,
            path: path.to_owned(),
            content_type,
            handler,
        });
        self
    }

    /// The largest request body.
    pub fn max_body(&self) -> usize {
        self.max_body
    }

    fn not_found(&self) -> String {
        let all: Vec<String> = self
            .routes
            .iter()
            .map(|r| format!("{} {}", r.method, r.path))
            .collect();
        match all.as_slice() {
            [one] => format!("the only resource is {one}"),
            _ => format!("the resources are {}", all.join(", ")),
        }
    }

    /// Answers one request.
    pub async fn dispatch(&self, peer: Arc<P>, req: Request<Incoming>) -> Reply {
        let path = req.uri().path();
        let on_path: Vec<&Route<P>> = self.routes.iter().filter(|r| r.path == path).collect();
        if on_path.is_empty() {
            return refuse(StatusCode::NOT_FOUND, "not_found", &self.not_found());
        }
        let Some(route) = on_path.iter().find(|r| r.method == req.method()) else {
            let allowed: Vec<&str> = on_path.iter().map(|r| r.method.as_str()).collect();
            let mut reply = refuse(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                &format!("use {} {path}", allowed.join(" or ")),
            );
            if let Ok(v) = hyper::header::HeaderValue::from_str(&allowed.join(", ")) {
                reply.headers_mut().insert(hyper::header::ALLOW, v);
            }
            return reply;
        };
        let (head, body) = req.into_parts();
        if let Some(want) = route.content_type {
            if !media_type_is(&head, want) {
                return refuse(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    "unsupported_media_type",
                    &format!("the body must be {want}"),
                );
            }
        }
        if let Some(reply) = route.handler.before_body(&peer, &head) {
            return reply;
        }
        let max = self.max_body;
        let body = match Limited::new(body, max).collect().await {
            Ok(b) => b.to_bytes(),
            Err(e) if e.is::<http_body_util::LengthLimitError>() => {
                return refuse(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "body_too_large",
                    &format!("the body may have at most {max} bytes"),
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
        route.handler.handle(peer, head, body).await
    }
}

/// Serves one request on an established, admitted session `io` (either TLS stack) from
/// `addr`, within the routes' idle timeout: the head is read and checked first (a refusal carries the
/// error document), the connection can be evicted until its head is in and not after, and
/// the request then goes through `routes`.
pub async fn serve<S, P>(
    routes: Arc<Routes<P>>,
    peer: Arc<P>,
    addr: SocketAddr,
    mut io: S,
    ticket: Ticket,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    P: Send + Sync + 'static,
{
    let (max_body, idle_timeout) = (routes.max_body, routes.idle_timeout);
    let service = hyper::service::service_fn(move |req| {
        let (routes, peer) = (routes.clone(), peer.clone());
        async move { Ok::<_, Infallible>(routes.dispatch(peer, req).await) }
    });
    let exchange = async move {
        let mut ticket = ticket;
        let Some(head) = ticket.or_evicted(http_head::read(&mut io, max_body)).await else {
            tracing::info!(peer = %addr, "evicted while waiting for its request");
            return;
        };
        ticket.leave();
        let buffered = match head {
            Ok(Head::Ok { buffered }) => buffered,
            Ok(Head::Closed) => return,
            Ok(Head::Refuse(r)) => {
                tracing::info!(peer = %addr, code = r.code, "malformed request refused");
                let body = error_document(r.code, &r.message);
                let _ = io
                    .write_all(&http_head::json_response(r.status, &body))
                    .await;
                let _ = io.shutdown().await;
                // Read on for a moment before closing: closing with unread input makes the
                // kernel send a reset, which can destroy the answer before the client reads it.
                http_head::drain(&mut io).await;
                return;
            }
            Err(e) => {
                tracing::debug!(peer = %addr, error = %e, "connection ended before a request");
                return;
            }
        };
        // Half-close on: a client that shuts its write side after a whole request still gets
        // its answer.
        let http = hyper::server::conn::http1::Builder::new()
            .keep_alive(false)
            .half_close(true)
            .timer(TokioTimer::new())
            .header_read_timeout(idle_timeout)
            .serve_connection(TokioIo::new(Rewind::new(buffered, io)), service);
        if let Err(e) = http.await {
            tracing::debug!(peer = %addr, error = %e, "connection ended with an error");
        }
    };
    if tokio::time::timeout(idle_timeout, exchange).await.is_err() {
        tracing::info!(peer = %addr, "connection idle too long; closed");
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests may fail loudly
    use super::*;

    #[test]
    fn the_error_document_has_one_shape() {
        let doc: serde_json::Value =
            serde_json::from_slice(&error_document("not_found", "say \"hi\"")).unwrap();
        assert_eq!(
            doc,
            serde_json::json!({"error": {"code": "not_found", "message": "say \"hi\""}})
        );
    }
}
