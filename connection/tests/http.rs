#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests may fail loudly
//! The HTTP binding's route table over a real loopback connection: each refusal the binding
//! makes, with its status and error document, and the handler's answer.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use hyper::http::request::Parts;
use hyper::{Method, StatusCode};
use m2mpki_connection::admission::Waiting;
use m2mpki_connection::http::{self, Answering, Handler, Reply, Routes};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Echoes the body; refuses before the body when the peer is "limited".
struct Echo;

impl Handler<&'static str> for Echo {
    fn before_body(&self, peer: &&'static str, _head: &Parts) -> Option<Reply> {
        (*peer == "limited")
            .then(|| http::refuse(StatusCode::TOO_MANY_REQUESTS, "rate_limited", "slow down"))
    }

    fn handle(&self, peer: Arc<&'static str>, _head: Parts, body: Bytes) -> Answering {
        Box::pin(async move {
            let mut v = peer.as_bytes().to_vec();
            v.extend_from_slice(&body);
            http::json(StatusCode::OK, v)
        })
    }
}

/// Sends `request` to a binding serving `routes` for `peer`; the raw response.
async fn exchange(peer: &'static str, request: &str) -> String {
    let routes = Arc::new(
        Routes::new(16, Duration::from_secs(5))
            .route(
                Method::POST,
                "/echo",
                Some("application/json"),
                Arc::new(Echo),
            )
            .route(Method::PUT, "/echo", None, Arc::new(Echo)),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        let (tcp, from) = listener.accept().await.unwrap();
        let ticket = Arc::new(Waiting::default()).enter(from.ip());
        http::serve(routes, Arc::new(peer), from, tcp, ticket).await;
    });
    let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
    c.write_all(request.as_bytes()).await.unwrap();
    let mut out = String::new();
    c.read_to_string(&mut out).await.unwrap();
    server.await.unwrap();
    out
}

fn post(path: &str, content_type: &str, body: &str) -> String {
    format!(
        "POST {path} HTTP/1.1\r\nHost: in\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
}

fn status_and_code(response: &str) -> (u16, String) {
    let status = response[9..12].parse().unwrap();
    let body = response.split("\r\n\r\n").nth(1).unwrap_or_default();
    let code = serde_json::from_str::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v["error"]["code"].as_str().map(str::to_owned))
        .unwrap_or_default();
    (status, code)
}

#[tokio::test]
async fn a_request_that_fits_a_route_reaches_its_handler() {
    let r = exchange(
        "node",
        &post("/echo", "application/json; charset=utf-8", "{}"),
    )
    .await;
    assert_eq!(status_and_code(&r), (200, String::new()), "{r}");
    assert!(r.ends_with("node{}"), "{r}");
    assert!(
        r.to_ascii_lowercase().contains("cache-control: no-store"),
        "{r}"
    );
}

#[tokio::test]
async fn each_refusal_of_the_binding_has_its_status_and_code() {
    let cases = [
        (post("/other", "application/json", "{}"), 404, "not_found"),
        (
            "GET /echo HTTP/1.1\r\nHost: in\r\n\r\n".to_owned(),
            405,
            "method_not_allowed",
        ),
        (
            post("/echo", "text/plain", "{}"),
            415,
            "unsupported_media_type",
        ),
        (
            post("/echo", "application/json", &"x".repeat(17)),
            413,
            "body_too_large",
        ),
        (
            "POST /echo HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n".to_owned(),
            400,
            "bad_request",
        ),
    ];
    for (request, status, code) in cases {
        let r = exchange("node", &request).await;
        assert_eq!(
            status_and_code(&r),
            (status, code.to_owned()),
            "{request:?}: {r}"
        );
    }
    let r = exchange("node", "GET /echo HTTP/1.1\r\nHost: in\r\n\r\n").await;
    assert!(r.to_ascii_lowercase().contains("allow: post, put"), "{r}");
    assert!(r.contains("use POST or PUT /echo"), "{r}");
    let r = exchange("node", &post("/other", "application/json", "{}")).await;
    assert!(r.contains("the resources are POST /echo, PUT /echo"), "{r}");
}

#[tokio::test]
async fn a_route_without_a_media_type_takes_any_and_before_body_runs_first() {
    let put = "PUT /echo HTTP/1.1\r\nHost: in\r\nContent-Length: 2\r\n\r\nhi";
    let r = exchange("node", put).await;
    assert_eq!(status_and_code(&r).0, 200, "{r}");
    assert!(r.ends_with("nodehi"), "{r}");
    // Refused before the body is read (a declared length over the limit is refused sooner
    // still, with the head).
    let r = exchange("limited", &post("/echo", "application/json", "{}")).await;
    assert_eq!(status_and_code(&r), (429, "rate_limited".to_owned()), "{r}");
}
