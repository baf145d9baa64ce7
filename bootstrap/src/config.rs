//! The IN's `bootstrap serve` configuration (TOML, unknown keys refused) and the Field Node's
//! bootstrap profile.

use crate::ratelimit::Rate;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use m2mpki_ca::rootset::{Anchor, CrlRecord, RevocationPolicy, RootSet, RootSetKind};
use m2mpki_ca::validity::Validity;
use m2mpki_ca::DnsName;
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// The most connections a limit may allow (also far inside tokio's semaphore limit).
pub const MAX_CONNECTIONS: usize = 1 << 20;

/// `value` (or `default`) when it lies in `range`; else a message naming `key` and the range.
fn ranged(
    key: &str,
    value: Option<usize>,
    default: usize,
    range: std::ops::RangeInclusive<usize>,
) -> std::result::Result<usize, String> {
    let v = value.unwrap_or(default);
    if range.contains(&v) {
        Ok(v)
    } else {
        Err(format!(
            "{key}: {v} is outside {}..={}",
            range.start(),
            range.end()
        ))
    }
}

/// A duration setting `key` (or `default`) when it lies in `range`; else a message naming the
/// key and the range.
fn ranged_duration(
    key: &str,
    value: Option<String>,
    default: Duration,
    range: std::ops::RangeInclusive<Duration>,
) -> std::result::Result<Duration, String> {
    let Some(text) = value else {
        return Ok(default);
    };
    let d = parse_duration(&text).map_err(|e| format!("{key}: {e}"))?;
    if range.contains(&d) {
        Ok(d)
    } else {
        Err(format!(
            "{key}: `{text}` is outside {:?}..={:?}",
            range.start(),
            range.end()
        ))
    }
}

pub use crate::ratelimit::parse_duration;

/// TLS protocol versions.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum TlsVersion {
    /// TLS 1.2 (ECDHE, AEAD suites and extended master secret only).
    #[serde(rename = "1.2")]
    Tls12,
    /// TLS 1.3.
    #[serde(rename = "1.3")]
    Tls13,
}

impl FromStr for TlsVersion {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "1.2" => Ok(TlsVersion::Tls12),
            "1.3" => Ok(TlsVersion::Tls13),
            _ => Err(format!("unknown TLS version `{s}` (1.2 or 1.3)")),
        }
    }
}

/// DTLS 1.2 cipher suites (ECDHE with ECDSA only: field-node and IN keys are P-256).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DtlsSuite {
    /// TS-0003's mandatory DTLS suite (RFC 7251), what tinydtls and many constrained stacks
    /// offer alone.
    #[serde(rename = "TLS_ECDHE_ECDSA_WITH_AES_128_CCM_8")]
    Aes128Ccm8,
    /// AES-128-GCM (RFC 5289).
    #[serde(rename = "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256")]
    Aes128Gcm,
}

impl DtlsSuite {
    /// Both, CCM_8 first.
    pub const ALL: [DtlsSuite; 2] = [DtlsSuite::Aes128Ccm8, DtlsSuite::Aes128Gcm];

    /// OpenSSL's name for the suite.
    pub fn openssl_name(self) -> &'static str {
        match self {
            DtlsSuite::Aes128Ccm8 => "ECDHE-ECDSA-AES128-CCM8",
            DtlsSuite::Aes128Gcm => "ECDHE-ECDSA-AES128-GCM-SHA256",
        }
    }

    /// The IANA name.
    pub fn iana_name(self) -> &'static str {
        match self {
            DtlsSuite::Aes128Ccm8 => "TLS_ECDHE_ECDSA_WITH_AES_128_CCM_8",
            DtlsSuite::Aes128Gcm => "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256",
        }
    }
}

impl FromStr for DtlsSuite {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        DtlsSuite::ALL
            .into_iter()
            .find(|x| x.iana_name().eq_ignore_ascii_case(s) || x.openssl_name().eq_ignore_ascii_case(s))
            .ok_or_else(|| {
                format!("unknown DTLS suite `{s}` (TLS_ECDHE_ECDSA_WITH_AES_128_CCM_8 or TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256)")
            })
    }
}

/// Key and signature algorithms an IN admits in field-node chains.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Algorithm {
    /// ECDSA P-256 keys, ecdsa-with-SHA256 signatures: TS-0003's, the default.
    #[serde(rename = "ecdsa-p256-sha256")]
    P256Sha256,
    /// ECDSA P-384 keys, ecdsa-with-SHA384 signatures.
    #[serde(rename = "ecdsa-p384-sha384")]
    P384Sha384,
    /// Ed25519 keys and signatures.
    #[serde(rename = "ed25519")]
    Ed25519,
}

impl Algorithm {
    /// Every algorithm m2mpki issues with.
    pub const ALL: [Algorithm; 3] = [
        Algorithm::P256Sha256,
        Algorithm::P384Sha384,
        Algorithm::Ed25519,
    ];

    /// The name in configs.
    pub fn name(self) -> &'static str {
        match self {
            Algorithm::P256Sha256 => "ecdsa-p256-sha256",
            Algorithm::P384Sha384 => "ecdsa-p384-sha384",
            Algorithm::Ed25519 => "ed25519",
        }
    }
}

impl FromStr for Algorithm {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        Algorithm::ALL
            .into_iter()
            .find(|a| a.name() == s)
            .ok_or_else(|| {
                format!("unknown algorithm `{s}` (ecdsa-p256-sha256, ecdsa-p384-sha384, ed25519)")
            })
    }
}

/// The transport a field node bootstraps over.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// TLS over TCP, HTTP `POST /bootstrap`.
    #[default]
    Tls,
    /// DTLS 1.2 over UDP, CoAP `POST /bootstrap`.
    Dtls,
}

/// The DTLS + CoAP endpoint of the IN.
#[derive(Clone, Debug)]
pub struct DtlsConfig {
    /// Where to listen (UDP).
    pub listen: SocketAddr,
    /// Path MTU: no datagram the IN sends is larger (IP and UDP headers included).
    pub mtu: u16,
    /// Suites offered.
    pub suites: Vec<DtlsSuite>,
    /// Peers with a handshake or session under way at once; further cookie-proven hellos
    /// are dropped (the peer retransmits).
    pub max_peers: usize,
}

/// The default path MTU: IPv6's minimum, which every path carries.
pub const DEFAULT_MTU: u16 = 1280;
/// The CoAP-over-DTLS port (RFC 7252 §12.7, `coaps`).
pub const COAPS_PORT: u16 = 5684;

/// What the IN does for a field node that has no technician grants.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum DefaultPolicy {
    /// Every authenticated field node bootstraps and gets the default grants.
    #[default]
    Allow,
    /// Only field nodes with technician grants bootstrap.
    Deny,
}

/// The authorization policy (the seed's editor's note): default grants for every
/// authenticated node, or refusal, plus per-identity technician grants kept in the store.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// allow or deny.
    #[serde(default)]
    pub default: DefaultPolicy,
    /// Resources every authenticated node is granted (when `default = "allow"`).
    #[serde(default)]
    pub grants: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    fqdn: String,
    listen: Option<String>,
    store: Option<String>,
    tls: TlsFile,
    dtls: Option<DtlsFile>,
    trust: TrustFile,
    #[serde(default)]
    credentials: CredentialsFile,
    #[serde(default)]
    policy: Policy,
    #[serde(default)]
    parameters: toml::Table,
    #[serde(default)]
    limits: LimitsFile,
    #[serde(default)]
    protocol: ProtocolFile,
    psk: Option<PskFile>,
    metrics: Option<MetricsFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct MetricsFile {
    listen: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PskFile {
    listen: String,
    dtls_listen: Option<String>,
    upstream: Option<String>,
    upstream_timeout: Option<String>,
}

/// The PSK association listener (TS-0003's Provisioned Symmetric Key security association,
/// with the provisioned credentials as keys).
#[derive(Clone, Debug)]
pub struct PskConfig {
    /// Where to listen (TCP, TLS 1.2 PSK suites).
    pub listen: SocketAddr,
    /// Where to listen for the association over DTLS 1.2 and CoAP (`TLS_PSK_WITH_AES_128_CCM_8`
    /// first), if anywhere.
    pub dtls_listen: Option<SocketAddr>,
    /// The service behind the IN (the IN-CSE, plain HTTP): every request other than the
    /// association check is forwarded there with the authenticated identity in a header.
    pub upstream: Option<SocketAddr>,
    /// How long the upstream may take to start its answer (504 after) and to send it.
    pub upstream_timeout: Duration,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ProtocolFile {
    #[serde(default)]
    versions: Vec<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TlsFile {
    chain: PathBuf,
    key: String,
    #[serde(default)]
    versions: Vec<String>,
    require_sni: Option<bool>,
    #[serde(default)]
    server_names: Vec<String>,
    #[serde(default)]
    ts0003_cbc: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DtlsFile {
    listen: String,
    mtu: Option<u16>,
    #[serde(default)]
    suites: Vec<String>,
    max_peers: Option<usize>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TrustFile {
    #[serde(default)]
    device_sets: Vec<String>,
    #[serde(default)]
    node_sets: Vec<String>,
    #[serde(default)]
    algorithms: Vec<String>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct CredentialsFile {
    lifetime: Option<String>,
    store_key: Option<String>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct LimitsFile {
    handshake_timeout: Option<String>,
    idle_timeout: Option<String>,
    max_connections: Option<usize>,
    max_connections_per_address: Option<usize>,
    hello_timeout: Option<String>,
    max_body: Option<usize>,
    enrolments_per_identity: Option<String>,
    enrolments_per_address: Option<String>,
}

/// Limits that keep slow or silent clients from holding the server up.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Time allowed for the TLS handshake.
    pub handshake_timeout: Duration,
    /// Time allowed from accepting a TCP connection until its first TLS record (the
    /// ClientHello) is complete: short, so silent or trickling connections free their slot
    /// long before `handshake_timeout`.
    pub hello_timeout: Duration,
    /// Time allowed for the request and response after the handshake.
    pub idle_timeout: Duration,
    /// Connections served at once. When all are taken, a new connection evicts the one that
    /// has waited longest on its peer (for its hello, handshake or request).
    pub max_connections: usize,
    /// Connections open at once from one source address; more are closed when accepted.
    pub max_connections_per_address: usize,
    /// Largest request body.
    pub max_body: usize,
    /// Enrolments one authenticated identity may make (token bucket; `None`: unlimited).
    pub enrolments_per_identity: Option<Rate>,
    /// Enrolments one source address may make (token bucket; `None`: unlimited).
    pub enrolments_per_address: Option<Rate>,
}

impl Limits {
    /// The connection layer's part of these limits.
    pub fn connections(&self) -> m2mpki_connection::Limits {
        m2mpki_connection::Limits {
            max_connections: self.max_connections,
            max_connections_per_address: self.max_connections_per_address,
            hello_timeout: self.hello_timeout,
            handshake_timeout: self.handshake_timeout,
            idle_timeout: self.idle_timeout,
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            handshake_timeout: Duration::from_secs(10),
            hello_timeout: Duration::from_secs(2),
            idle_timeout: Duration::from_secs(30),
            max_connections: 1024,
            max_connections_per_address: 64,
            max_body: 8 * 1024,
            enrolments_per_identity: None,
            enrolments_per_address: None,
        }
    }
}

/// A checked `bootstrap serve` configuration.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// The IN's FQDN (its certificate must name it; clients send it as SNI).
    pub fqdn: DnsName,
    /// Where the trusted root sets and their CRLs are read from (`store = "postgres://..."`
    /// shares them between IN instances); `None`: the home's redb store. The IN's credential
    /// store (credentials, grants, policy) is opened at the same place: in the home, or in the
    /// PostgreSQL database that several INs share (docs/store.md).
    pub store: Option<m2mpki_ca::StoreLocation>,
    /// Where to listen for TLS (TCP); `None` switches TLS off.
    pub listen: Option<SocketAddr>,
    /// The DTLS + CoAP endpoint; `None` switches DTLS off.
    pub dtls: Option<DtlsConfig>,
    /// The server certificate chain (leaf first).
    pub chain: PathBuf,
    /// The server key: a PKCS#8 file or a `pkcs11:` URI.
    pub key: m2mpki_hsm::KeyRef,
    /// TLS versions offered.
    pub versions: Vec<TlsVersion>,
    /// Refuse hellos without SNI, over TLS and DTLS (default: yes, as TS-0003 requires).
    pub require_sni: bool,
    /// The server names (SNI) answered: the FQDN first, then `tls.server_names`; a hello
    /// naming another is refused (`unrecognized_name`) on every path.
    pub server_names: Vec<DnsName>,
    /// Serve TS-0003's `TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA256` through OpenSSL to hellos that
    /// offer nothing rustls serves (default: no).
    pub ts0003_cbc: bool,
    /// Names of the device root sets trusted.
    pub device_sets: Vec<String>,
    /// Names of the node root sets trusted.
    pub node_sets: Vec<String>,
    /// Algorithms admitted in field-node chains (default: P-256 with SHA-256 only).
    pub algorithms: Vec<Algorithm>,
    /// Lifetime of issued root credentials.
    pub lifetime: Validity,
    /// The store key: a key file (default: `<home>/keys/credential-store.key`, created when
    /// missing) or a `pkcs11:` URI naming an AES-256 key on a token.
    pub store_key: Option<m2mpki_hsm::KeyRef>,
    /// Authorization policy.
    pub policy: Policy,
    /// Parameters handed to every field node.
    pub parameters: serde_json::Map<String, serde_json::Value>,
    /// Limits.
    pub limits: Limits,
    /// Where Prometheus metrics are served (plain HTTP, `GET /metrics`), if anywhere.
    pub metrics_listen: Option<SocketAddr>,
    /// Protocol versions answered: 1 (the contribution) and 2 (TS-0003), both by default.
    pub protocol_versions: Vec<u32>,
    /// The PSK association listener; `None` (the default) switches it off.
    pub psk: Option<PskConfig>,
}

fn rel(base: &Path, p: PathBuf) -> PathBuf {
    if p.is_relative() {
        base.join(p)
    } else {
        p
    }
}

impl ServerConfig {
    /// Reads and checks a config file. Relative paths are relative to the file's folder.
    pub fn load(path: &Path) -> Result<Self> {
        let bad = |reason: String| Error::BadConfig {
            path: path.to_owned(),
            reason,
        };
        let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
        Self::parse(&text, path.parent().unwrap_or(Path::new("."))).map_err(|e| match e {
            Error::BadConfig { reason, .. } => bad(reason),
            other => other,
        })
    }

    /// Parses config text; `base` resolves relative paths.
    pub fn parse(text: &str, base: &Path) -> Result<Self> {
        let bad = |reason: String| Error::BadConfig {
            path: PathBuf::from("(config)"),
            reason,
        };
        let f: File = toml::from_str(text).map_err(|e| bad(e.to_string()))?;
        let fqdn: DnsName = f
            .fqdn
            .parse()
            .map_err(|e: m2mpki_ca::Error| bad(e.to_string()))?;
        let server_names = std::iter::once(Ok(fqdn.clone()))
            .chain(f.tls.server_names.iter().map(|n| {
                n.parse::<DnsName>()
                    .map_err(|e: m2mpki_ca::Error| bad(format!("tls.server_names: {e}")))
            }))
            .collect::<Result<Vec<_>>>()?;
        let addr = |what: &str, s: &str| -> Result<SocketAddr> {
            s.parse()
                .map_err(|_| bad(format!("{what}: `{s}` is not IP:port")))
        };
        let listen = f.listen.as_deref().map(|l| addr("listen", l)).transpose()?;
        let dtls = match f.dtls {
            None => None,
            Some(d) => {
                let dtls_listen = addr("dtls.listen", &d.listen)?;
                let mtu = d.mtu.unwrap_or(DEFAULT_MTU);
                // The datagram room OpenSSL needs for our handshake (the hostile review of
                // 2026-12: it completes with 272 bytes of UDP payload, never with 252), plus
                // the IP and UDP headers of the listening address's family.
                let ipv6 = dtls_listen.is_ipv6();
                let least = if ipv6 { 272 + 48 } else { 272 + 28 };
                if !(least..=9000).contains(&mtu) {
                    return Err(bad(format!(
                        "dtls.mtu: {mtu} is outside {least}..=9000 (the smallest link MTU a DTLS handshake completes over on {})",
                        if ipv6 { "IPv6" } else { "IPv4" }
                    )));
                }
                let suites = if d.suites.is_empty() {
                    DtlsSuite::ALL.to_vec()
                } else {
                    d.suites
                        .iter()
                        .map(|s| {
                            s.parse()
                                .map_err(|e: String| bad(format!("dtls.suites: {e}")))
                        })
                        .collect::<Result<_>>()?
                };
                let max_peers = ranged("dtls.max_peers", d.max_peers, 1024, 1..=MAX_CONNECTIONS)
                    .map_err(bad)?;
                Some(DtlsConfig {
                    listen: dtls_listen,
                    mtu,
                    suites,
                    max_peers,
                })
            }
        };
        if listen.is_none() && dtls.is_none() {
            return Err(bad(
                "no transport: give `listen` (TLS), a [dtls] section with `listen`, or both".into(),
            ));
        }
        let versions = if f.tls.versions.is_empty() {
            vec![TlsVersion::Tls13, TlsVersion::Tls12]
        } else {
            f.tls
                .versions
                .iter()
                .map(|v| {
                    v.parse()
                        .map_err(|e: String| bad(format!("tls.versions: {e}")))
                })
                .collect::<Result<_>>()?
        };
        if f.trust.device_sets.is_empty() && f.trust.node_sets.is_empty() {
            return Err(bad(
                "trust: name at least one device_sets or node_sets entry".into(),
            ));
        }
        let lifetime = match f.credentials.lifetime {
            Some(l) => l
                .parse()
                .map_err(|e: m2mpki_ca::Error| bad(format!("credentials.lifetime: {e}")))?,
            None => Validity::Days(365),
        };
        let mut limits = Limits::default();
        let ms = Duration::from_millis;
        let secs = Duration::from_secs;
        limits.handshake_timeout = ranged_duration(
            "limits.handshake_timeout",
            f.limits.handshake_timeout,
            limits.handshake_timeout,
            ms(100)..=secs(600),
        )
        .map_err(bad)?;
        limits.idle_timeout = ranged_duration(
            "limits.idle_timeout",
            f.limits.idle_timeout,
            limits.idle_timeout,
            ms(100)..=secs(3600),
        )
        .map_err(bad)?;
        limits.hello_timeout = ranged_duration(
            "limits.hello_timeout",
            f.limits.hello_timeout,
            limits.hello_timeout,
            ms(100)..=secs(60),
        )
        .map_err(bad)?;
        limits.max_connections = ranged(
            "limits.max_connections",
            f.limits.max_connections,
            limits.max_connections,
            1..=MAX_CONNECTIONS,
        )
        .map_err(bad)?;
        limits.max_connections_per_address = ranged(
            "limits.max_connections_per_address",
            f.limits.max_connections_per_address,
            limits.max_connections_per_address,
            1..=MAX_CONNECTIONS,
        )
        .map_err(bad)?;
        let rate = |name: &str, v: Option<String>| -> Result<Option<Rate>> {
            v.map(|s| s.parse::<Rate>())
                .transpose()
                .map_err(|e| bad(format!("limits.{name}: {e}")))
        };
        limits.enrolments_per_identity =
            rate("enrolments_per_identity", f.limits.enrolments_per_identity)?;
        limits.enrolments_per_address =
            rate("enrolments_per_address", f.limits.enrolments_per_address)?;
        limits.max_body = ranged(
            "limits.max_body",
            f.limits.max_body,
            limits.max_body,
            64..=1 << 20,
        )
        .map_err(bad)?;
        let parameters = match serde_json::to_value(&f.parameters) {
            Ok(serde_json::Value::Object(m)) => m,
            _ => return Err(bad("parameters must be a table".into())),
        };
        let protocol_versions = if f.protocol.versions.is_empty() {
            vec![crate::protocol::VERSION, crate::protocol::VERSION_TS0003]
        } else {
            if let Some(v) = f.protocol.versions.iter().find(|v| !(1..=2).contains(*v)) {
                return Err(bad(format!(
                    "protocol.versions: unknown version {v} (1 or 2)"
                )));
            }
            f.protocol.versions
        };
        let key = m2mpki_hsm::KeyRef::parse_relative(&f.tls.key, base)?;
        let psk = match f.psk {
            None => None,
            Some(p) => Some(PskConfig {
                listen: addr("psk.listen", &p.listen)?,
                dtls_listen: p
                    .dtls_listen
                    .as_deref()
                    .map(|u| addr("psk.dtls_listen", u))
                    .transpose()?,
                upstream: p
                    .upstream
                    .as_deref()
                    .map(|u| addr("psk.upstream", u))
                    .transpose()?,
                upstream_timeout: ranged_duration(
                    "psk.upstream_timeout",
                    p.upstream_timeout,
                    Duration::from_secs(30),
                    Duration::from_millis(100)..=Duration::from_secs(600),
                )
                .map_err(bad)?,
            }),
        };
        let metrics_listen = f
            .metrics
            .map(|m| addr("metrics.listen", &m.listen))
            .transpose()?;
        let store = f
            .store
            .as_deref()
            .map(|s| s.parse::<m2mpki_ca::StoreLocation>())
            .transpose()
            .map_err(|e| bad(format!("store: {e}")))?;
        Ok(ServerConfig {
            fqdn,
            store,
            listen,
            dtls,
            metrics_listen,
            chain: rel(base, f.tls.chain),
            key,
            versions,
            require_sni: f.tls.require_sni.unwrap_or(true),
            server_names,
            ts0003_cbc: f.tls.ts0003_cbc,
            algorithms: if f.trust.algorithms.is_empty() {
                vec![Algorithm::P256Sha256]
            } else {
                f.trust
                    .algorithms
                    .iter()
                    .map(|a| {
                        a.parse()
                            .map_err(|e: String| bad(format!("trust.algorithms: {e}")))
                    })
                    .collect::<Result<_>>()?
            },
            device_sets: f.trust.device_sets,
            node_sets: f.trust.node_sets,
            lifetime,
            store_key: f
                .credentials
                .store_key
                .map(|k| m2mpki_hsm::KeyRef::parse_relative(&k, base))
                .transpose()?,
            policy: f.policy,
            parameters,
            limits,
            protocol_versions,
            psk,
        })
    }
}

/// A Field Node's bootstrap pre-conditions: the IN's FQDN and the IN root set, in one file
/// written onto the device at production.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProfileFile {
    /// Format marker.
    pub m2mpki_bootstrap_profile: u32,
    /// The IN's FQDN.
    pub in_fqdn: String,
    /// The IN's port.
    pub port: u16,
    /// The transport to bootstrap over (default `tls`).
    #[serde(default, skip_serializing_if = "is_tls")]
    pub transport: Transport,
    /// The IN's CoAP-over-DTLS port (default 5684).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub coap_port: Option<u16>,
    /// DTLS suites the node offers (default: both).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dtls_suites: Vec<DtlsSuite>,
    /// The bootstrap protocol version the node asks for: 1 (default) or 2 (TS-0003).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol_version: Option<u32>,
    /// Name of the IN root set it came from (informational).
    pub root_set: String,
    /// The IN root certificates, PEM.
    pub anchors: String,
    /// CRLs for the IN chain, PEM (optional).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub crls: String,
    /// What unknown revocation status of the IN's chain does (default: `require`, so the
    /// CRLs above must cover the IN's chain and be current).
    #[serde(default)]
    pub revocation: RevocationPolicy,
}

fn is_tls(t: &Transport) -> bool {
    *t == Transport::Tls
}

/// A loaded, checked profile.
#[derive(Clone, Debug)]
pub struct FieldNodeProfile {
    /// The IN's FQDN.
    pub in_fqdn: DnsName,
    /// The IN's TLS port.
    pub port: u16,
    /// The transport to bootstrap over.
    pub transport: Transport,
    /// The IN's CoAP-over-DTLS port.
    pub coap_port: u16,
    /// DTLS suites offered.
    pub dtls_suites: Vec<DtlsSuite>,
    /// The protocol version asked for (1 or 2).
    pub protocol_version: u32,
    /// The IN root set.
    pub roots: RootSet,
}

impl FieldNodeProfile {
    /// Builds the profile file for an infrastructure root set.
    pub fn file_for(set: &RootSet, fqdn: &DnsName, port: u16) -> Result<ProfileFile> {
        if set.kind != RootSetKind::Infrastructure {
            return Err(Error::BadConfig {
                path: PathBuf::from(&set.name),
                reason: format!(
                    "root set `{}` is a {} set; a profile needs an infrastructure set",
                    set.name, set.kind
                ),
            });
        }
        if set.anchors.is_empty() {
            return Err(Error::BadConfig {
                path: PathBuf::from(&set.name),
                reason: format!("root set `{}` has no anchors", set.name),
            });
        }
        let pems = |ders: Vec<(&str, &Vec<u8>)>| -> String {
            ders.into_iter()
                .map(|(tag, d)| m2mpki_hsm::files::pem_encode(tag, d))
                .collect()
        };
        Ok(ProfileFile {
            m2mpki_bootstrap_profile: 1,
            in_fqdn: fqdn.to_string(),
            port,
            transport: Transport::Tls,
            coap_port: None,
            dtls_suites: vec![],
            protocol_version: None,
            root_set: set.name.clone(),
            anchors: pems(
                set.anchors
                    .iter()
                    .map(|a| ("CERTIFICATE", &a.der))
                    .collect(),
            ),
            crls: pems(set.crls.iter().map(|c| ("X509 CRL", &c.der)).collect()),
            revocation: set.revocation,
        })
    }

    /// Reads and checks a profile file.
    pub fn load(path: &Path) -> Result<Self> {
        let bad = |reason: String| Error::BadConfig {
            path: path.to_owned(),
            reason,
        };
        let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
        let f: ProfileFile = toml::from_str(&text).map_err(|e| bad(e.to_string()))?;
        if f.m2mpki_bootstrap_profile != 1 {
            return Err(bad(format!(
                "unsupported profile format {}",
                f.m2mpki_bootstrap_profile
            )));
        }
        let in_fqdn: DnsName = f
            .in_fqdn
            .parse()
            .map_err(|e: m2mpki_ca::Error| bad(e.to_string()))?;
        let src = path.display().to_string();
        let anchors = m2mpki_ca::input::der_objects(f.anchors.as_bytes(), &["CERTIFICATE"])
            .map_err(|e| bad(format!("anchors: {e}")))?
            .iter()
            .map(|d| Anchor::from_der(d, &src))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let crls = if f.crls.trim().is_empty() {
            vec![]
        } else {
            m2mpki_ca::input::der_objects(f.crls.as_bytes(), &["X509 CRL"])
                .map_err(|e| bad(format!("crls: {e}")))?
                .iter()
                .map(|d| CrlRecord::from_der(d, &src))
                .collect::<std::result::Result<Vec<_>, _>>()?
        };
        Ok(FieldNodeProfile {
            in_fqdn,
            port: f.port,
            transport: f.transport,
            coap_port: f.coap_port.unwrap_or(COAPS_PORT),
            dtls_suites: if f.dtls_suites.is_empty() {
                DtlsSuite::ALL.to_vec()
            } else {
                f.dtls_suites
            },
            protocol_version: match f.protocol_version {
                None | Some(1) => 1,
                Some(2) => 2,
                Some(v) => return Err(bad(format!("protocol_version {v} (1 or 2)"))),
            },
            roots: RootSet {
                name: f.root_set,
                kind: RootSetKind::Infrastructure,
                anchors,
                // Applied only where they verify with the IN chain's own issuer keys.
                crls,
                revocation: f.revocation,
                created: 0,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
fqdn = "in.example.net"
listen = "127.0.0.1:8443"
[tls]
chain = "in.pem"
key = "in.key"
[trust]
device_sets = ["metering"]
[policy]
default = "deny"
grants = ["weather"]
[parameters]
poa = "coap://in.example.net"
[limits]
handshake_timeout = "2s"
"#;

    #[test]
    fn parses_and_resolves_paths() {
        let c = ServerConfig::parse(GOOD, Path::new("/etc/m2mpki")).unwrap();
        assert_eq!(c.chain, PathBuf::from("/etc/m2mpki/in.pem"));
        assert_eq!(c.policy.default, DefaultPolicy::Deny);
        assert_eq!(c.limits.handshake_timeout, Duration::from_secs(2));
        assert_eq!(c.versions, vec![TlsVersion::Tls13, TlsVersion::Tls12]);
        assert_eq!(c.parameters["poa"], "coap://in.example.net");
        assert!(c.dtls.is_none());
        assert_eq!(c.algorithms, vec![Algorithm::P256Sha256]);
        let dtls_only = GOOD.replace("listen = \"127.0.0.1:8443\"", "").replace(
            "[trust]",
            "[dtls]\nlisten = \"[::]:5684\"\nsuites = [\"TLS_ECDHE_ECDSA_WITH_AES_128_CCM_8\"]\n[trust]",
        );
        let c = ServerConfig::parse(&dtls_only, Path::new(".")).unwrap();
        let d = c.dtls.unwrap();
        assert_eq!(
            (c.listen, d.mtu, d.suites),
            (None, DEFAULT_MTU, vec![DtlsSuite::Aes128Ccm8])
        );
    }

    #[test]
    fn refuses_unknown_keys_and_bad_values() {
        for bad in [
            GOOD.replace("[tls]", "surprise = 1\n[tls]"),
            GOOD.replace("[limits]", "[limits]\nsurprise = 1"),
            GOOD.replace("handshake_timeout = \"2s\"", "handshake_timeout = \"2\""),
            GOOD.replace("127.0.0.1:8443", "localhost"),
            GOOD.replace("listen = \"127.0.0.1:8443\"", ""),
            GOOD.replace("[trust]", "[dtls]\nlisten = \"127.0.0.1:5684\"\nmtu = 100\n[trust]"),
            GOOD.replace("[trust]", "[dtls]\nlisten = \"127.0.0.1:5684\"\nsuites = [\"TLS_RSA_WITH_NULL_SHA\"]\n[trust]"),
            GOOD.replace("device_sets = [\"metering\"]", ""),
            GOOD.replace("[tls]", "[tls]\nversions = [\"1.1\"]"),
            GOOD.replace("[trust]", "[trust]\nalgorithms = [\"rsa-sha1\"]"),
        ] {
            assert!(ServerConfig::parse(&bad, Path::new(".")).is_err(), "{bad}");
        }
        // Rates: the key and the value are named.
        let bad = GOOD.replace(
            "[limits]",
            "[limits]\nenrolments_per_identity = \"3 per hour\"",
        );
        let err = ServerConfig::parse(&bad, Path::new("."))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("limits.enrolments_per_identity") && err.contains("3 per hour"),
            "{err}"
        );
        let good = GOOD.replace("[limits]", "[limits]\nenrolments_per_address = \"600/1m\"");
        let c = ServerConfig::parse(&good, Path::new(".")).unwrap();
        assert_eq!(
            c.limits.enrolments_per_address,
            Some("600/1m".parse().unwrap())
        );
        assert_eq!(c.limits.enrolments_per_identity, None);
    }

    /// Values that passed the check and then panicked the IN (huge connection counts, timeouts
    /// near u64::MAX seconds) or left DTLS unusable (an MTU below what a handshake needs) are
    /// refused at load, each naming its key and the allowed range.
    #[test]
    fn every_number_and_duration_is_range_checked_at_load() {
        let limits = |line: &str| GOOD.replace("[limits]", &format!("[limits]\n{line}"));
        let dtls = |listen: &str, mtu: u32| {
            GOOD.replace(
                "[trust]",
                &format!("[dtls]\nlisten = \"{listen}\"\nmtu = {mtu}\n[trust]"),
            )
        };
        let psk = |line: &str| {
            GOOD.replace(
                "[trust]",
                &format!("[psk]\nlisten = \"127.0.0.1:8444\"\n{line}\n[trust]"),
            )
        };
        let cases = [
            (
                limits("max_connections = 9223372036854775807"),
                "limits.max_connections",
                "1..=1048576",
            ),
            (
                limits("max_connections = 0"),
                "limits.max_connections",
                "1..=1048576",
            ),
            (
                limits("max_connections_per_address = 0"),
                "limits.max_connections_per_address",
                "1..=",
            ),
            (
                GOOD.replace(
                    "handshake_timeout = \"2s\"",
                    "handshake_timeout = \"18446744073709551615s\"",
                ),
                "limits.handshake_timeout",
                "600s",
            ),
            (
                limits("idle_timeout = \"18446744073709551615h\""),
                "limits.idle_timeout",
                "3600s",
            ),
            (
                limits("hello_timeout = \"50ms\""),
                "limits.hello_timeout",
                "100ms",
            ),
            (limits("max_body = 10"), "limits.max_body", "64..=1048576"),
            (
                limits("max_body = 100000000"),
                "limits.max_body",
                "64..=1048576",
            ),
            (dtls("127.0.0.1:5684", 256), "dtls.mtu", "300..=9000"),
            (dtls("127.0.0.1:5684", 280), "dtls.mtu", "IPv4"),
            (dtls("[::1]:5684", 310), "dtls.mtu", "320..=9000"),
            (
                GOOD.replace(
                    "[trust]",
                    "[dtls]\nlisten = \"127.0.0.1:5684\"\nmax_peers = 0\n[trust]",
                ),
                "dtls.max_peers",
                "1..=",
            ),
            (
                psk("upstream_timeout = \"18446744073709551615s\""),
                "psk.upstream_timeout",
                "600s",
            ),
        ];
        for (text, key, range) in cases {
            let err = ServerConfig::parse(&text, Path::new("."))
                .unwrap_err()
                .to_string();
            assert!(err.contains(key) && err.contains(range), "{key}: {err}");
        }
        // The edges are accepted.
        for text in [
            dtls("127.0.0.1:5684", 300),
            dtls("[::1]:5684", 320),
            limits("max_connections = 1048576"),
            limits("idle_timeout = \"1h\""),
            psk("upstream_timeout = \"10m\""),
        ] {
            ServerConfig::parse(&text, Path::new(".")).unwrap();
        }
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("5").is_err());
        assert!(parse_duration("5d").is_err());
    }
}
