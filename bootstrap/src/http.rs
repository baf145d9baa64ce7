//! The bootstrap's HTTP routes: `POST /bootstrap` (application/json) to the enrolment core, on
//! the connection layer's HTTP binding (either TLS stack).

use std::sync::Arc;

use bytes::Bytes;
use hyper::http::request::Parts;
use hyper::{Method, StatusCode};
use m2mpki_connection::admission::Ticket;
use m2mpki_connection::http::{self, Answering, Handler, Reply, Routes};

use crate::enrol::{Admitted, Answer, Core};
use crate::protocol::PATH;

/// The routes of the bootstrap listener.
pub(crate) fn routes(core: Arc<Core>) -> Routes<Admitted> {
    let limits = &core.config.limits;
    Routes::new(limits.max_body, limits.idle_timeout).route(
        Method::POST,
        PATH,
        Some("application/json"),
        Arc::new(Enrol(core)),
    )
}

/// The HTTP exchange on an established, admitted session: one request, its answer, within
/// the idle limit.
pub(crate) async fn serve_http<S>(
    routes: &Arc<Routes<Admitted>>,
    node: Admitted,
    tls: S,
    ticket: Ticket,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let addr = node.peer;
    http::serve(routes.clone(), Arc::new(node), addr, tls, ticket).await;
}

/// `POST /bootstrap`.
struct Enrol(Arc<Core>);

impl Handler<Admitted> for Enrol {
    fn before_body(&self, node: &Admitted, _head: &Parts) -> Option<Reply> {
        self.0.rate_limited(node).map(http_answer)
    }

    fn handle(&self, node: Arc<Admitted>, _head: Parts, body: Bytes) -> Answering {
        let core = self.0.clone();
        Box::pin(async move { http_answer(core.answer_within_limits(&node, &body).await) })
    }
}

/// An answer of the enrolment core as an HTTP response.
fn http_answer(a: Answer) -> Reply {
    let status =
        StatusCode::from_u16(a.outcome.http()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut reply = http::json(status, a.body);
    if let Some(secs) = a.retry_after {
        reply
            .headers_mut()
            .insert(hyper::header::RETRY_AFTER, secs.into());
    }
    reply
}
