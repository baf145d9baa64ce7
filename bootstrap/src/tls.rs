//! TLS for both ends: one aws-lc-rs provider, mutual authentication against root sets, and the
//! exporter.

use std::sync::{Arc, Mutex, RwLock};

use m2mpki_ca::rootset::RootSet;
use m2mpki_ca::verify::{self, Chain, Check, Purpose, Refusal, TrustedSet, Verified};
use m2mpki_ca::DnsName;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme};
use time::OffsetDateTime;

use crate::config::{Algorithm, TlsVersion};
use crate::protocol::{
    Ts0003Keys, WrapKey, EXPORTER_LABEL, TS0003_LABEL, TS0003_LEN, WRAP_KEY_LEN,
};
use crate::{Error, Result};

/// The one crypto provider: aws-lc-rs, with its TLS 1.3 suites and its TLS 1.2 suites (all
/// ECDHE with AEAD). Always passed explicitly, never installed as a process default.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// rustls protocol versions for ours.
pub fn versions(v: &[TlsVersion]) -> Vec<&'static rustls::SupportedProtocolVersion> {
    v.iter()
        .map(|v| match v {
            TlsVersion::Tls12 => &rustls::version::TLS12,
            TlsVersion::Tls13 => &rustls::version::TLS13,
        })
        .collect()
}

/// The IN's TLS configuration, for the bootstrap server and every baseline measured against
/// it: mutual authentication through `verifier`, the IN certificate `cert` for `fqdn` (to
/// clients that send SNI only, when `require_sni`), the
/// extended master secret required (the exporter is only safe over TLS 1.2 with it), and no
/// session resumption or tickets (each bootstrap is a full handshake with a fresh exporter).
pub fn server_config(
    versions: &[TlsVersion],
    verifier: Arc<dyn ClientCertVerifier>,
    fqdn: DnsName,
    cert: Arc<rustls::sign::CertifiedKey>,
    require_sni: bool,
) -> Result<rustls::ServerConfig> {
    server_config_for(versions, verifier, SniRule::new(&[fqdn], require_sni), cert)
}

/// [`server_config`] answering the server names of `sni`.
pub fn server_config_for(
    versions: &[TlsVersion],
    verifier: Arc<dyn ClientCertVerifier>,
    sni: SniRule,
    cert: Arc<rustls::sign::CertifiedKey>,
) -> Result<rustls::ServerConfig> {
    ServerParts::new(versions, sni, cert).config(verifier)
}

/// What the IN's TLS configuration is made of, kept to make one configuration per connection:
/// rustls hands a client verifier no per-connection value, so the IN gives each connection a
/// [`ConnectionVerifier`] of its own, and with it a configuration (only the verifier differs).
#[derive(Debug, Clone)]
pub struct ServerParts {
    provider: Arc<CryptoProvider>,
    versions: Vec<&'static rustls::SupportedProtocolVersion>,
    resolver: Arc<InCert>,
}

impl ServerParts {
    /// The parts for `versions`, answering the names of `sni` with `cert`.
    pub fn new(
        versions: &[TlsVersion],
        sni: SniRule,
        cert: Arc<rustls::sign::CertifiedKey>,
    ) -> Self {
        ServerParts {
            provider: provider(),
            versions: self::versions(versions),
            resolver: Arc::new(InCert { sni, key: cert }),
        }
    }

    /// A configuration verifying clients with `verifier`: the extended master secret required
    /// (the exporter is only safe over TLS 1.2 with it), no session resumption or tickets (each
    /// bootstrap is a full handshake with a fresh exporter).
    pub fn config(&self, verifier: Arc<dyn ClientCertVerifier>) -> Result<rustls::ServerConfig> {
        let mut config = rustls::ServerConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&self.versions)
            .map_err(|e| Error::internal(format!("TLS versions: {e}")))?
            .with_client_cert_verifier(verifier)
            .with_cert_resolver(self.resolver.clone());
        config.require_ems = true;
        config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        config.send_tls13_tickets = 0;
        Ok(config)
    }
}

/// The field node's TLS configuration, for the bootstrap client and the benchmark's clients:
/// the IN's certificate checked against `roots` for `fqdn`, `cert` as the client certificate,
/// the extended master secret required, no resumption.
pub fn client_config(
    versions: &[TlsVersion],
    roots: RootSet,
    fqdn: DnsName,
    cert: Arc<rustls::sign::CertifiedKey>,
) -> Result<rustls::ClientConfig> {
    let provider = provider();
    let mut config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&self::versions(versions))
        .map_err(|e| Error::internal(format!("TLS versions: {e}")))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(InVerifier::new(roots, fqdn, provider)))
        .with_client_cert_resolver(Arc::new(OneClientCert(cert)));
    config.require_ems = true;
    config.resumption = rustls::client::Resumption::disabled();
    Ok(config)
}

/// Derives RootCredentialWrapKey from an established connection: the TLS exporter with label
/// `EXPORTER-oneM2M-RootCredentialWrapKey`, no context, 32 bytes.
pub fn export_wrap_key<D>(conn: &rustls::ConnectionCommon<D>) -> Result<WrapKey> {
    let mut out = [0u8; WRAP_KEY_LEN];
    conn.export_keying_material(&mut out, EXPORTER_LABEL, None)
        .map_err(|e| Error::Protocol(format!("TLS exporter failed: {e}")))?;
    let key = WrapKey::new(out);
    zeroize::Zeroize::zeroize(&mut out);
    Ok(key)
}

/// The TS-0003 export of an established connection (protocol version 2): label
/// `EXPORTER-oneM2M-Bootstrap`, no context, 48 bytes.
pub fn export_ts0003<D>(conn: &rustls::ConnectionCommon<D>) -> Result<Ts0003Keys> {
    let mut out = [0u8; TS0003_LEN];
    conn.export_keying_material(&mut out, TS0003_LABEL, None)
        .map_err(|e| Error::Protocol(format!("TLS exporter failed: {e}")))?;
    let keys = Ts0003Keys::from_export(&out);
    zeroize::Zeroize::zeroize(&mut out);
    Ok(keys)
}

fn unix_to_time(now: UnixTime) -> OffsetDateTime {
    i64::try_from(now.as_secs())
        .ok()
        .and_then(|s| OffsetDateTime::from_unix_timestamp(s).ok())
        .unwrap_or_else(OffsetDateTime::now_utc)
}

/// The rustls error (and so the TLS alert) for a refusal.
fn tls_error(r: &Refusal) -> rustls::Error {
    let e = match r {
        Refusal::UnknownRoot => CertificateError::UnknownIssuer,
        Refusal::Expired(_) | Refusal::IntermediateExpired(_) | Refusal::AnchorExpired(_) => {
            CertificateError::Expired
        }
        // rustls (like OpenSSL) sends unknown_ca for these.
        Refusal::RevocationUnknown(_) => CertificateError::UnknownRevocationStatus,
        Refusal::CrlExpired(_) => CertificateError::ExpiredRevocationList,
        Refusal::NotYetValid(_) | Refusal::IntermediateNotYetValid(_) => {
            CertificateError::NotValidYet
        }
        Refusal::Revoked => CertificateError::Revoked,
        Refusal::WrongPurpose(_) => CertificateError::InvalidPurpose,
        Refusal::NameMismatch(_) => CertificateError::NotValidForName,
        Refusal::BadSignature => CertificateError::BadSignature,
        other => CertificateError::Other(rustls::OtherError(Arc::new(other.clone()))),
    };
    rustls::Error::InvalidCertificate(e)
}

/// The alert rustls sends for a refusal of the peer's chain.
pub(crate) fn alert_for(r: &Refusal) -> rustls::AlertDescription {
    match tls_error(r) {
        rustls::Error::InvalidCertificate(e) => e.into(),
        _ => rustls::AlertDescription::CertificateUnknown,
    }
}

fn chain(end_entity: &CertificateDer<'_>, intermediates: &[CertificateDer<'_>]) -> Vec<Vec<u8>> {
    std::iter::once(end_entity)
        .chain(intermediates)
        .map(|c| c.as_ref().to_vec())
        .collect()
}

/// Verifies field-node client certificates against the IN's trusted device and node root
/// sets (their CRLs included): for rustls through a [`ConnectionVerifier`] per connection, for
/// OpenSSL inside its verify callback.
#[derive(Debug)]
pub struct FieldNodeVerifier {
    sets: RwLock<Arc<Vec<TrustedSet>>>,
    provider: Arc<CryptoProvider>,
    algorithms: Vec<Algorithm>,
    refusals: crate::metrics::Refusals,
}

const OID_EC_PUBLIC_KEY: &str = "1.2.840.10045.2.1";
const OID_P256: &str = "1.2.840.10045.3.1.7";
const OID_P384: &str = "1.3.132.0.34";
const OID_ED25519: &str = "1.3.101.112";
const OID_ECDSA_SHA256: &str = "1.2.840.10045.4.3.2";
const OID_ECDSA_SHA384: &str = "1.2.840.10045.4.3.3";

/// The algorithms a certificate uses: the one its key belongs to and the one its issuer
/// signed it with.
fn algorithms_of(
    cert: &x509_parser::certificate::X509Certificate<'_>,
) -> (Option<Algorithm>, Option<Algorithm>) {
    let spki = &cert.tbs_certificate.subject_pki.algorithm;
    let key = match spki.algorithm.to_id_string().as_str() {
        OID_EC_PUBLIC_KEY => {
            let curve = spki
                .parameters
                .as_ref()
                .and_then(|p| p.as_oid().ok())
                .map(|o| o.to_id_string());
            match curve.as_deref() {
                Some(OID_P256) => Some(Algorithm::P256Sha256),
                Some(OID_P384) => Some(Algorithm::P384Sha384),
                _ => None,
            }
        }
        OID_ED25519 => Some(Algorithm::Ed25519),
        _ => None,
    };
    let sig = match cert.signature_algorithm.algorithm.to_id_string().as_str() {
        OID_ECDSA_SHA256 => Some(Algorithm::P256Sha256),
        OID_ECDSA_SHA384 => Some(Algorithm::P384Sha384),
        OID_ED25519 => Some(Algorithm::Ed25519),
        _ => None,
    };
    (key, sig)
}

impl FieldNodeVerifier {
    /// A verifier over `sets` (prepared with [`TrustedSet::new`] off the handshake path).
    pub fn new(sets: Vec<TrustedSet>, provider: Arc<CryptoProvider>) -> Self {
        FieldNodeVerifier {
            sets: RwLock::new(Arc::new(sets)),
            provider,
            algorithms: Algorithm::ALL.to_vec(),
            refusals: crate::metrics::Refusals::default(),
        }
    }

    /// Counts the refusals of this verifier in `refusals` (by the refusal's code).
    pub fn counting(mut self, refusals: crate::metrics::Refusals) -> Self {
        self.refusals = refusals;
        self
    }

    /// Admits only chains whose certificates use these algorithms (keys, and the signatures
    /// over them); every algorithm m2mpki issues with, unless set.
    pub fn with_algorithms(mut self, algorithms: Vec<Algorithm>) -> Self {
        self.algorithms = algorithms;
        self
    }

    /// Refuses a chain with a certificate whose key or signature algorithm is not allowed.
    fn check_algorithms(&self, chain: &Chain<'_>) -> std::result::Result<(), Refusal> {
        if self.algorithms.len() == Algorithm::ALL.len() {
            return Ok(());
        }
        let allowed: Vec<&str> = self.algorithms.iter().map(|a| a.name()).collect();
        for (i, cert) in chain.certificates().iter().enumerate() {
            let what = if i == 0 {
                "the certificate"
            } else {
                "a CA certificate of the chain"
            };
            let (key, sig) = algorithms_of(cert);
            for (part, alg) in [("key", key), ("signature", sig)] {
                if !alg.is_some_and(|a| self.algorithms.contains(&a)) {
                    return Err(Refusal::Algorithm(format!(
                        "{what}'s {part} algorithm ({}) is not among those the IN admits ({})",
                        alg.map_or("other", |a| a.name()),
                        allowed.join(", ")
                    )));
                }
            }
        }
        Ok(())
    }

    /// Replaces the sets (new anchors or CRLs take effect for the next handshake).
    pub fn replace_sets(&self, sets: Vec<TrustedSet>) {
        if let Ok(mut s) = self.sets.write() {
            *s = Arc::new(sets);
        }
    }

    pub(crate) fn sets(&self) -> Arc<Vec<TrustedSet>> {
        self.sets
            .read()
            .map(|s| s.clone())
            .unwrap_or_else(|p| p.into_inner().clone())
    }

    /// Verifies a chain against every set; the first set that admits it wins. When none does,
    /// the most specific refusal is returned (a known root's reason beats "unknown root").
    pub fn verify(
        &self,
        chain: &[Vec<u8>],
        at: OffsetDateTime,
    ) -> std::result::Result<Verified, Refusal> {
        let verdict = self.verify_uncounted(chain, at);
        if let Err(r) = &verdict {
            self.refusals.count(r.code());
        }
        verdict
    }

    /// [`Self::verify`] for a handshake: a refusal is logged and becomes the TLS error (and
    /// alert) that tells the node why.
    fn verify_logged(
        &self,
        chain: &[Vec<u8>],
        at: OffsetDateTime,
    ) -> std::result::Result<Verified, rustls::Error> {
        self.verify(chain, at).map_err(|r| {
            tracing::warn!(code = r.code(), reason = %r, "refused a field-node certificate");
            tls_error(&r)
        })
    }

    fn verify_uncounted(
        &self,
        chain: &[Vec<u8>],
        at: OffsetDateTime,
    ) -> std::result::Result<Verified, Refusal> {
        // Parsed and checked once for every set.
        let chain = Chain::check(chain)?;
        let mut refusal = Refusal::UnknownRoot;
        for set in self.sets().iter() {
            match set.verify(&chain, &Check::client(at)) {
                Ok(v) => {
                    self.check_algorithms(&chain)?;
                    return Ok(v);
                }
                Err(Refusal::UnknownRoot) => {}
                Err(r) => {
                    if refusal == Refusal::UnknownRoot {
                        refusal = r;
                    }
                }
            }
        }
        Err(refusal)
    }
}

/// The client verifier of one connection: the IN's [`FieldNodeVerifier`], and the verdict it
/// reached for this connection's chain, taken after the handshake ([`Self::take`]). Each
/// connection's verdict stays with that connection: two connections presenting the same
/// certificate get their own.
#[derive(Debug)]
pub struct ConnectionVerifier {
    inner: Arc<FieldNodeVerifier>,
    verdict: Mutex<Option<Verified>>,
}

impl ConnectionVerifier {
    /// A verifier for one connection.
    pub fn new(inner: Arc<FieldNodeVerifier>) -> Self {
        ConnectionVerifier {
            inner,
            verdict: Mutex::new(None),
        }
    }

    /// What the handshake's chain check admitted (`None` before a handshake admitted a chain).
    pub fn take(&self) -> Option<Verified> {
        self.verdict.lock().ok()?.take()
    }
}

impl ClientCertVerifier for ConnectionVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // No hints: field nodes carry one certificate; hints would go stale as sets change.
        &[]
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> std::result::Result<ClientCertVerified, rustls::Error> {
        let chain = chain(end_entity, intermediates);
        let verified = self.inner.verify_logged(&chain, unix_to_time(now))?;
        if let Ok(mut v) = self.verdict.lock() {
            *v = Some(verified);
        }
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        let algorithms = &self.inner.provider.signature_verification_algorithms;
        rustls::crypto::verify_tls12_signature(message, cert, dss, algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        let algorithms = &self.inner.provider.signature_verification_algorithms;
        rustls::crypto::verify_tls13_signature(message, cert, dss, algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        let algorithms = &self.inner.provider.signature_verification_algorithms;
        algorithms.supported_schemes()
    }
}

/// Verifies the IN's server certificate against the profile's IN root set and FQDN.
#[derive(Debug)]
pub struct InVerifier {
    set: RootSet,
    fqdn: DnsName,
    provider: Arc<CryptoProvider>,
}

impl InVerifier {
    /// A verifier for `fqdn` against `set`.
    pub fn new(set: RootSet, fqdn: DnsName, provider: Arc<CryptoProvider>) -> Self {
        InVerifier {
            set,
            fqdn,
            provider,
        }
    }
}

impl ServerCertVerifier for InVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        let dialled = match server_name {
            ServerName::DnsName(d) => d.as_ref().to_ascii_lowercase(),
            _ => String::new(),
        };
        if dialled != self.fqdn.as_str() {
            return Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName,
            ));
        }
        let chain = chain(end_entity, intermediates);
        verify::verify(
            &self.set,
            &chain,
            Purpose::Server,
            Some(&self.fqdn),
            unix_to_time(now),
        )
        .map(|_| ServerCertVerified::assertion())
        .map_err(|r| tls_error(&r))
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Hands the same certificate and key to every handshake (client side).
#[derive(Debug)]
pub struct OneClientCert(pub Arc<rustls::sign::CertifiedKey>);

impl rustls::client::ResolvesClientCert for OneClientCert {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        sigschemes: &[SignatureScheme],
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        self.0.key.choose_scheme(sigschemes).map(|_| self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// Serves the IN certificate. A client asking (by SNI) for another name still gets it, and a
/// warning is logged: the client's own name check then refuses, with a clear error on its side.
/// A hello without SNI gets nothing when `require_sni` (TS-0003 requires SNI): the handshake
/// fails.
#[derive(Debug)]
pub struct InCert {
    /// The names it answers, and whether a hello must carry one.
    pub sni: SniRule,
    /// Its certificate and key.
    pub key: Arc<rustls::sign::CertifiedKey>,
}

impl rustls::server::ResolvesServerCert for InCert {
    fn resolve(
        &self,
        hello: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        match self.sni.check(hello.server_name()) {
            Ok(()) => Some(self.key.clone()),
            Err(code) => {
                tracing::info!(sni = ?hello.server_name(), code, "TLS hello refused: SNI");
                None
            }
        }
    }
}

/// Which server names (SNI) the IN answers: its FQDN and any configured others
/// (`tls.server_names`), compared as DNS names (case, a trailing dot); a hello naming another is
/// refused with `unrecognized_name` on every path (TLS before rustls, the CBC path, DTLS), as
/// is a hello without SNI when it is required.
#[derive(Debug, Clone)]
pub struct SniRule {
    names: Vec<String>,
    require: bool,
}

impl SniRule {
    /// The rule for `names` (the FQDN first).
    pub fn new(names: &[DnsName], require: bool) -> Self {
        SniRule {
            names: names
                .iter()
                .map(|n| n.as_str().to_ascii_lowercase())
                .collect(),
            require,
        }
    }

    /// `Ok` when a hello with `sni` is answered; else the refusal code (`no_sni`,
    /// `unknown_server_name`) for logs and `refusals_total`.
    pub fn check(&self, sni: Option<&str>) -> std::result::Result<(), &'static str> {
        match sni {
            None if self.require => Err("no_sni"),
            None => Ok(()),
            Some(name) => {
                let name = name.strip_suffix('.').unwrap_or(name);
                if self.names.iter().any(|n| n.eq_ignore_ascii_case(name)) {
                    Ok(())
                } else {
                    Err("unknown_server_name")
                }
            }
        }
    }
}

/// A fatal `unrecognized_name` alert as a TLS record, for a hello refused before any stack.
pub const UNRECOGNIZED_NAME_ALERT: [u8; 7] = [21, 3, 3, 0, 2, 2, 112];

/// Loads a PEM chain (leaf first) for a TLS endpoint.
pub fn load_chain(path: &std::path::Path) -> Result<Vec<CertificateDer<'static>>> {
    let ders = m2mpki_ca::input::read_der_objects(path, &["CERTIFICATE"])?;
    Ok(ders.into_iter().map(CertificateDer::from).collect())
}
