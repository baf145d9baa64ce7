//! The one OpenSSL context builder. Every OpenSSL endpoint of m2mpki (the TS-0003 CBC suite
//! over TCP, the PSK association over TLS and DTLS and its client, the bootstrap over DTLS and
//! its client)
//! starts from [`context`]: one protocol version (TLS 1.2 or DTLS 1.2), the endpoint's cipher
//! list, no session tickets or session cache (each handshake is full, with a fresh exporter),
//! no renegotiation, buffers released between records; a DTLS server also gets the setup the
//! stateless cookie exchange of [`crate::dtls`] needs. What an endpoint adds (its identity, its
//! chain check, its PSK lookup, SNI) it adds to the builder this returns.

use openssl::error::ErrorStack;
use openssl::ssl::{
    SslContextBuilder, SslMethod, SslMode, SslOptions, SslSessionCacheMode, SslVersion,
};

/// The stack and side of an endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stack {
    /// A TLS 1.2 server.
    TlsServer,
    /// A TLS 1.2 client.
    TlsClient,
    /// A DTLS 1.2 server.
    DtlsServer,
    /// A DTLS 1.2 client.
    DtlsClient,
}

/// What differs between endpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Profile<'a> {
    /// The stack and side.
    pub stack: Stack,
    /// The OpenSSL cipher list.
    pub ciphers: &'a str,
    /// The key exchange groups, in preference order (`None`: OpenSSL's).
    pub groups: Option<&'a str>,
    /// The server's preference among the suites offered wins over the client's.
    pub server_preference: bool,
}

/// The groups m2mpki's certificate endpoints offer: TS-0003's P-256 first.
pub const GROUPS: &str = "P-256:X25519:P-384";

/// A context builder for `profile` (see the module documentation for what every one gets).
pub fn context(profile: Profile<'_>) -> Result<SslContextBuilder, ErrorStack> {
    let (method, version) = match profile.stack {
        Stack::TlsServer => (SslMethod::tls_server(), SslVersion::TLS1_2),
        Stack::TlsClient => (SslMethod::tls_client(), SslVersion::TLS1_2),
        Stack::DtlsServer => (SslMethod::dtls_server(), SslVersion::DTLS1_2),
        Stack::DtlsClient => (SslMethod::dtls_client(), SslVersion::DTLS1_2),
    };
    let mut b = SslContextBuilder::new(method)?;
    b.set_min_proto_version(Some(version))?;
    b.set_max_proto_version(Some(version))?;
    b.set_cipher_list(profile.ciphers)?;
    if let Some(groups) = profile.groups {
        b.set_groups_list(groups)?;
    }
    let mut options = SslOptions::NO_TICKET | SslOptions::NO_RENEGOTIATION;
    if profile.server_preference {
        options |= SslOptions::CIPHER_SERVER_PREFERENCE;
    }
    if matches!(profile.stack, Stack::DtlsServer | Stack::DtlsClient) {
        // The MTU is the endpoint's setting, not what the kernel guesses.
        options |= SslOptions::NO_QUERY_MTU;
    }
    b.set_options(options);
    if profile.stack == Stack::DtlsServer {
        // The cookie exchange is ours and stateless (crate::dtls): an SSL object exists only
        // for a hello whose cookie we checked. OpenSSL's own exchange stays on so that such an
        // object accepts the cookie-bearing hello (message_seq 1); it is handed the hello as
        // it was before the cookie first, and what it answers to that is dropped.
        b.set_options(SslOptions::COOKIE_EXCHANGE);
        b.set_cookie_generate_cb(|_, out| {
            let n = out.len().min(1);
            if let Some(c) = out.get_mut(..n) {
                c.fill(0);
            }
            Ok(n)
        });
        b.set_cookie_verify_cb(|_, _| true);
    }
    b.set_mode(SslMode::RELEASE_BUFFERS);
    b.set_session_cache_mode(SslSessionCacheMode::OFF);
    Ok(b)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests may fail loudly
    use super::*;

    #[test]
    fn every_stack_gets_one_version_and_no_tickets_or_renegotiation() {
        for stack in [
            Stack::TlsServer,
            Stack::TlsClient,
            Stack::DtlsServer,
            Stack::DtlsClient,
        ] {
            let mut b = context(Profile {
                stack,
                ciphers: "ECDHE-ECDSA-AES128-SHA256",
                groups: Some(GROUPS),
                server_preference: true,
            })
            .unwrap();
            let want = if matches!(stack, Stack::TlsServer | Stack::TlsClient) {
                SslVersion::TLS1_2
            } else {
                SslVersion::DTLS1_2
            };
            assert_eq!(b.min_proto_version(), Some(want), "{stack:?}");
            assert_eq!(b.max_proto_version(), Some(want), "{stack:?}");
            let o = b.options();
            assert!(o.contains(SslOptions::NO_TICKET | SslOptions::NO_RENEGOTIATION));
            assert!(o.contains(SslOptions::CIPHER_SERVER_PREFERENCE));
            assert_eq!(
                o.contains(SslOptions::COOKIE_EXCHANGE),
                stack == Stack::DtlsServer
            );
        }
    }

    #[test]
    fn a_cipher_list_openssl_does_not_know_is_an_error() {
        let e = context(Profile {
            stack: Stack::TlsServer,
            ciphers: "NOT-A-SUITE",
            groups: None,
            server_preference: false,
        });
        assert!(e.is_err());
    }
}
