//! The connection layer of every m2mpki listener.
//!
//! A listener is this crate's accept loop ([`tcp::serve`]) and a handler: the loop owns
//! admission (the per-process connection cap, the per-address cap, eviction of connections
//! that only wait, the hello deadline, refusal counting and the drain), [`tcp::Admission::handshake`]
//! runs a handshake on any TLS stack within its deadline, and [`hello`] reads a ClientHello
//! (TLS or DTLS) for the decisions made before a stack sees it. [`udp::serve`] is the same for
//! DTLS endpoints, with the stateless cookie exchange of [`dtls`] in front. docs/architecture.md shows
//! where it sits.

#![forbid(unsafe_code)]

pub mod admission;
pub mod dtls;
pub mod hello;
pub mod http;
pub mod http_head;
pub mod openssl;
pub mod tcp;
pub mod udp;

pub use tcp::{serve, Admission, Conn, First, Limits, Observer, Unfinished, Unobserved};
