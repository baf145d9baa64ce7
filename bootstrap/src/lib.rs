//! The oneM2M PKI-based bootstrap (the seed contribution's x.1.2.1.2), between a Field Node and
//! an Infrastructure Node (IN).
//!
//! Both ends authenticate with certificates over TLS 1.3 or 1.2, both export
//! `RootCredentialWrapKey` with the TLS exporter, and the IN answers `POST /bootstrap` with a
//! fresh root credential wrapped under it with AES-256 key wrap (RFC 3394). `docs/protocol.md`
//! describes the bytes.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod cbc;
pub mod client;
pub mod coap;
pub mod config;
mod credential;
pub mod credstore;
pub mod dtls;
pub mod enrol;
mod error;
mod http;
pub mod metrics;
mod outcome;
pub mod protocol;
pub mod psk;
pub mod ratelimit;
pub mod server;
pub mod tls;

pub use error::{Error, Result};
