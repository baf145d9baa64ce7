//! The PKI-based bootstrap end to end, on loopback, with real TLS: our server and client,
//! OpenSSL's s_client, software and SoftHSM2 keys.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests may fail loudly

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use common::*;
use m2mpki_bootstrap::client::{self, Enrolled, Enrolment};
use m2mpki_bootstrap::config::{DtlsSuite, FieldNodeProfile, ServerConfig, TlsVersion, Transport};
use m2mpki_bootstrap::protocol::{self, RootCredential, WrapKey};
use m2mpki_bootstrap::server::Server;
use m2mpki_bootstrap::Error as BError;
use m2mpki_ca::{LeafSubject, Store};
use m2mpki_hsm::pkcs11::{Pkcs11Config, Pkcs11Uri};
use m2mpki_hsm::{KeyRef, KeyType, Keystore, Signer, SoftwareKey};
use m2mpki_test_pki::softhsm::process_softhsm;
use m2mpki_test_pki::{
    names, server_config_toml, sets, write_chain, KeyBackend, LabPki, LabSpec, ENTERPRISE, HW_TYPE,
    IN_FQDN,
};

/// A field node: its chain file and key.
#[derive(Clone)]
struct Node {
    chain: PathBuf,
    key: Arc<dyn Signer>,
    key_ref: String,
    identity: String,
}

/// A lab IN with a set of prepared field nodes.
struct Fixture {
    dir: tempfile::TempDir,
    home: PathBuf,
    keystore: Keystore,
    in_chain: PathBuf,
    in_key: String,
    /// With a token: the credential store key on it.
    store_key: Option<String>,
    nodes: std::collections::HashMap<&'static str, Node>,
}

fn software_node(
    lab: &LabPki,
    ks: &Keystore,
    dir: &Path,
    ca: &str,
    subject: LeafSubject,
    name: &str,
    identity: String,
) -> Node {
    let (chain, key) = lab.issue_files(ks, ca, subject, dir, name).unwrap();
    Node {
        chain,
        key: ks.open(&KeyRef::File(key.clone())).unwrap(),
        key_ref: key.display().to_string(),
        identity,
    }
}

impl Fixture {
    fn new(backend: Backend) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let home = dir.path().join("in-home");
        let (spec, keystore, token) = match backend {
            Backend::Software => (LabSpec::default(), Keystore::default(), None),
            Backend::SoftHsm => {
                let hsm = process_softhsm().unwrap();
                static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
                let label = format!(
                    "bs-{}-{}",
                    std::process::id(),
                    N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                );
                hsm.init_token(&label, "1111", "2222").unwrap();
                let pin = dir.path().join("pin");
                std::fs::write(&pin, "1111\n").unwrap();
                let uri: Pkcs11Uri = format!(
                    "pkcs11:token={label}?module-path={}&pin-source={}",
                    hsm.module.display(),
                    pin.display()
                )
                .parse()
                .unwrap();
                let ks = Keystore::default().with_pkcs11(Pkcs11Config {
                    sessions: 2,
                    ..Default::default()
                });
                (
                    LabSpec {
                        backend: KeyBackend::Pkcs11(uri.clone()),
                        ..LabSpec::default()
                    },
                    ks,
                    Some(uri),
                )
            }
        };
        let mut lab = LabPki::build(&home, &keystore, &spec).unwrap();
        lab.create_root_sets(&keystore).unwrap();
        lab.create_rogue_manufacturer(&keystore).unwrap();
        let d = dir.path();
        let dev = |id: &str| LeafSubject::Device(id.parse().unwrap());
        let node = |id: &str| LeafSubject::Node {
            enterprise: ENTERPRISE.parse().unwrap(),
            id: id.parse().unwrap(),
        };
        let mut nodes = std::collections::HashMap::new();

        // The IN's TLS key: a file, or an object on the token.
        let (in_chain, in_key) = match &token {
            None => {
                let (c, k) = lab
                    .issue_files(
                        &keystore,
                        names::INFRA_CA,
                        LeafSubject::Server(IN_FQDN.parse().unwrap()),
                        d,
                        "in",
                    )
                    .unwrap();
                (c, k.display().to_string())
            }
            Some(uri) => {
                let (key, full) = m2mpki_hsm::pkcs11::generate(
                    &uri.for_object("in-tls"),
                    KeyType::P256,
                    keystore.pkcs11(),
                )
                .unwrap();
                let chain = lab
                    .issue_for(
                        &keystore,
                        names::INFRA_CA,
                        LeafSubject::Server(IN_FQDN.parse().unwrap()),
                        &key,
                        None,
                    )
                    .unwrap();
                let path = d.join("in.pem");
                write_chain(&path, &chain).unwrap();
                (path, full.to_string())
            }
        };

        // Field nodes. With a token, the device's own key lives on it too.
        let d1 = match &token {
            None => software_node(
                &lab,
                &keystore,
                d,
                names::MFR_CA,
                dev("D-1"),
                "d1",
                format!("device:{HW_TYPE}:D-1"),
            ),
            Some(uri) => {
                let (key, full) = m2mpki_hsm::pkcs11::generate(
                    &uri.for_object("device-d1"),
                    KeyType::P256,
                    keystore.pkcs11(),
                )
                .unwrap();
                let chain = lab
                    .issue_for(&keystore, names::MFR_CA, dev("D-1"), &key, None)
                    .unwrap();
                let path = d.join("d1.pem");
                write_chain(&path, &chain).unwrap();
                Node {
                    chain: path,
                    key: Arc::new(key),
                    key_ref: full.to_string(),
                    identity: format!("device:{HW_TYPE}:D-1"),
                }
            }
        };
        nodes.insert("d1", d1);
        nodes.insert(
            "n1",
            software_node(
                &lab,
                &keystore,
                d,
                names::ENT_CA,
                node("N-1"),
                "n1",
                format!("node:{ENTERPRISE}:N-1"),
            ),
        );
        nodes.insert(
            "rogue",
            software_node(
                &lab,
                &keystore,
                d,
                m2mpki_test_pki::ROGUE_CA,
                dev("R-1"),
                "rogue",
                "device:1.3.6.1.4.1.99999.666:R-1".into(),
            ),
        );
        // Expired: valid for one hour, two days ago.
        {
            let mut key = SoftwareKey::generate(KeyType::P256).unwrap();
            let authority =
                m2mpki_ca::Authority::load(&lab.home, &lab.store, &keystore, names::MFR_CA)
                    .unwrap();
            let spki = rcgen::SubjectPublicKeyInfo::from_der(
                &rcgen::PublicKeyData::subject_public_key_info(&key),
            )
            .unwrap();
            let cert = m2mpki_ca::issue(
                &lab.store,
                &authority,
                &m2mpki_ca::profile::LeafProfile::builtin(m2mpki_ca::profile::ProfileKind::Device),
                m2mpki_ca::LeafRequest {
                    subject: dev("D-OLD"),
                    public_key: spki,
                    validity: Some(m2mpki_ca::validity::Validity::Hours(1)),
                    not_before: Some(time::OffsetDateTime::now_utc() - time::Duration::days(2)),
                    requester: m2mpki_ca::Requester::Lab,
                },
                false,
            );
            // The CA is younger than two days: issue from "now - 1h" instead if refused.
            let cert = match cert {
                Ok(c) => c,
                Err(_) => panic!("could not issue the expired certificate"),
            };
            let mut chain = vec![cert.der];
            chain.extend(
                authority
                    .chain_without_root()
                    .into_iter()
                    .map(<[u8]>::to_vec),
            );
            let path = d.join("old.pem");
            write_chain(&path, &chain).unwrap();
            let kp = d.join("old.key.pem");
            key.save(&kp, None, m2mpki_hsm::files::Overwrite::Replace)
                .unwrap();
            nodes.insert(
                "expired",
                Node {
                    chain: path,
                    key: keystore.open(&KeyRef::File(kp.clone())).unwrap(),
                    key_ref: kp.display().to_string(),
                    identity: format!("device:{HW_TYPE}:D-OLD"),
                },
            );
        }
        // Revoked, with the CRL attached to the device set before the server starts.
        let revoked = software_node(
            &lab,
            &keystore,
            d,
            names::MFR_CA,
            dev("D-REV"),
            "rev",
            format!("device:{HW_TYPE}:D-REV"),
        );
        {
            let serial = lab
                .store
                .certs(&m2mpki_ca::CertFilter {
                    ca: None,
                    id: Some("D-REV".into()),
                })
                .unwrap()[0]
                .serial
                .clone();
            lab.store
                .revoke(
                    names::MFR_CA,
                    &serial,
                    m2mpki_ca::revocation::RevocationReason::KeyCompromise,
                    time::OffsetDateTime::now_utc().unix_timestamp(),
                )
                .unwrap();
            let authority =
                m2mpki_ca::Authority::load(&lab.home, &lab.store, &keystore, names::MFR_CA)
                    .unwrap();
            let crl = m2mpki_ca::revocation::issue_crl(
                &lab.store,
                &authority,
                m2mpki_ca::validity::Validity::Days(7),
            )
            .unwrap();
            let rec = m2mpki_ca::rootset::CrlRecord::from_der(&crl.der, "crl").unwrap();
            let issuers: Vec<Vec<u8>> = lab.cas.iter().map(|c| c.cert_der.clone()).collect();
            m2mpki_ca::roots::attach_crl(&lab.store, sets::DEVICE, rec, &issuers).unwrap();
        }
        nodes.insert("revoked", revoked);
        // The IN's own server certificate used as a client certificate.
        let in_as_client = Node {
            chain: in_chain.clone(),
            key: keystore.open(&in_key.parse().unwrap()).unwrap(),
            key_ref: in_key.clone(),
            identity: String::new(),
        };
        nodes.insert("server-as-client", in_as_client);
        // With a token, the IN's credential store key lives there too.
        let store_key = token.as_ref().map(|uri| {
            let (_, full) = m2mpki_hsm::pkcs11::Pkcs11SecretKey::generate(
                &uri.for_object("credential-store"),
                keystore.pkcs11(),
            )
            .unwrap();
            full.to_string()
        });
        drop(lab);
        Fixture {
            dir,
            home,
            keystore,
            in_chain,
            in_key,
            store_key,
            nodes,
        }
    }

    fn profile(&self, fqdn: &str, set: &str) -> FieldNodeProfile {
        let home = m2mpki_ca::Home::open(&self.home).unwrap();
        let store = home.store().unwrap();
        let s = store.root_set(set).unwrap().unwrap();
        let file = FieldNodeProfile::file_for(&s, &fqdn.parse().unwrap(), 0).unwrap();
        let path = self.dir.path().join(format!("profile-{set}-{fqdn}.toml"));
        std::fs::write(&path, toml::to_string(&file).unwrap()).unwrap();
        FieldNodeProfile::load(&path).unwrap()
    }

    fn config(&self, policy: &str, extra: &str) -> ServerConfig {
        let mut text =
            server_config_toml("127.0.0.1:0", &self.in_chain, &self.in_key, policy) + extra;
        if let Some(k) = &self.store_key {
            text = text.replace(
                "lifetime = \"365d\"",
                &format!("lifetime = \"365d\"\nstore_key = \"{k}\""),
            );
        }
        let path = self.dir.path().join("serve.toml");
        std::fs::write(&path, text).unwrap();
        ServerConfig::load(&path).unwrap()
    }
}

/// A server running in this process.
struct Running {
    rt: tokio::runtime::Runtime,
    addr: SocketAddr,
    /// The DTLS address, when the config has a [dtls] section.
    dtls: Option<SocketAddr>,
    /// The PSK association address, when the config has a [psk] section.
    psk: Option<SocketAddr>,
    /// The DTLS PSK association address, when [psk] has `dtls_listen`.
    psk_dtls: Option<SocketAddr>,
    server: Arc<Server>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<m2mpki_bootstrap::Result<()>>>,
}

impl Running {
    fn start(fx: &Fixture, config: ServerConfig) -> Running {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let home = m2mpki_ca::Home::open(&fx.home).unwrap();
        let server = Arc::new(Server::new(config, &home, &fx.keystore).unwrap());
        let listener = rt.block_on(server.bind()).unwrap();
        let addr = listener.local_addr().unwrap();
        let dtls = listener.dtls_addr().ok();
        let psk = listener.psk_addr().ok();
        let psk_dtls = listener.psk_dtls_addr().ok();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let s = server.clone();
        let task = rt.spawn(async move {
            s.run(listener, async {
                let _ = rx.await;
            })
            .await
        });
        Running {
            rt,
            addr,
            dtls,
            psk,
            psk_dtls,
            server,
            stop: Some(tx),
            task: Some(task),
        }
    }

    fn enroll(
        &self,
        profile: &FieldNodeProfile,
        node: &Node,
        versions: &[TlsVersion],
    ) -> m2mpki_bootstrap::Result<Enrolled> {
        self.rt.block_on(client::enroll(Enrolment {
            profile: profile.clone(),
            chain: m2mpki_bootstrap::tls::load_chain(&node.chain).unwrap(),
            key: node.key.clone(),
            connect: Some(self.addr.to_string()),
            versions: versions.to_vec(),
            timeout: Duration::from_secs(20),
        }))
    }

    /// Enrols `node` over DTLS + CoAP offering only `suite`.
    fn enroll_dtls(
        &self,
        profile: &FieldNodeProfile,
        node: &Node,
        suite: DtlsSuite,
    ) -> m2mpki_bootstrap::Result<Enrolled> {
        let mut profile = profile.clone();
        profile.transport = Transport::Dtls;
        profile.dtls_suites = vec![suite];
        self.rt.block_on(client::enroll(Enrolment {
            profile,
            chain: m2mpki_bootstrap::tls::load_chain(&node.chain).unwrap(),
            key: node.key.clone(),
            connect: Some(self.dtls.expect("DTLS configured").to_string()),
            versions: vec![],
            timeout: Duration::from_secs(20),
        }))
    }

    /// Sends `request` as it is over a fresh mutual-TLS session of `node`, shutting our write
    /// side after it when `half_close`; returns the response's status, its JSON body and the
    /// session's wrap key.
    fn raw(
        &self,
        profile: &FieldNodeProfile,
        node: &Node,
        versions: &[TlsVersion],
        request: &[u8],
        half_close: bool,
    ) -> (u16, serde_json::Value, WrapKey) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        self.rt.block_on(async {
            let e = Enrolment {
                profile: profile.clone(),
                chain: m2mpki_bootstrap::tls::load_chain(&node.chain).unwrap(),
                key: node.key.clone(),
                connect: Some(self.addr.to_string()),
                versions: versions.to_vec(),
                timeout: Duration::from_secs(20),
            };
            let mut c = client::connect(&e).await.unwrap();
            c.tls.write_all(request).await.unwrap();
            if half_close {
                c.tls.shutdown().await.unwrap();
            } else {
                c.tls.flush().await.unwrap();
            }
            let mut out = Vec::new();
            // Far below the IN's idle timeout (30 s): an answer must come at once. A close
            // without close_notify ends the read with an error; what was read counts.
            let _ = tokio::time::timeout(Duration::from_secs(10), c.tls.read_to_end(&mut out))
                .await
                .expect("the IN answers within 10 s");
            let text = String::from_utf8_lossy(&out).into_owned();
            let (head, body) = text
                .split_once("\r\n\r\n")
                .unwrap_or_else(|| panic!("no HTTP response: {text:?}"));
            let status: u16 = head.split(' ').nth(1).unwrap().parse().unwrap();
            let lower = head.to_ascii_lowercase();
            assert!(lower.contains("content-type: application/json"), "{head}");
            let json = serde_json::from_str(body)
                .unwrap_or_else(|e| panic!("body is not JSON ({e}): {text:?}"));
            (status, json, c.wrap_key)
        })
    }

    /// The credential the IN stored for an identity, unsealed.
    fn stored(&self, identity: &str) -> Option<(String, RootCredential)> {
        let rec = self
            .server
            .credentials()
            .live(&identity.parse().unwrap())
            .unwrap()?;
        let secret = self
            .server
            .credentials()
            .unseal(self.server.store_key(), &rec)
            .unwrap();
        Some((rec.id, secret))
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = self.rt.block_on(task);
        }
    }
}

const BOTH: [&[TlsVersion]; 2] = [&[TlsVersion::Tls13], &[TlsVersion::Tls12]];

both_backends!(device_and_node_enrol_over_tls13_and_tls12);

fn device_and_node_enrol_over_tls13_and_tls12(backend: Backend) {
    let fx = Fixture::new(backend);
    let run = Running::start(&fx, fx.config("allow", ""));
    let profile = fx.profile(IN_FQDN, sets::INFRA);
    for versions in BOTH {
        for name in ["d1", "n1"] {
            let node = &fx.nodes[name];
            let got = run.enroll(&profile, node, versions).unwrap();
            assert_eq!(got.identity.to_string(), node.identity);
            assert_eq!(got.in_fqdn, IN_FQDN);
            assert!(
                got.tls_version
                    .contains(if versions[0] == TlsVersion::Tls13 {
                        "1_3"
                    } else {
                        "1_2"
                    }),
                "{}",
                got.tls_version
            );
            assert_eq!(got.grants, vec!["weather".to_owned()]);
            assert_eq!(got.parameters["cse_id"], "/in-cse");
            let (id, secret) = run.stored(&node.identity).unwrap();
            assert_eq!(id, got.credential_id);
            assert_eq!(
                secret, got.credential,
                "client and IN hold different credentials"
            );
        }
    }
    assert_eq!(run.server.credentials().count().unwrap(), 4);
    let sealed_on_token = run.server.store_key().is_token();
    assert_eq!(sealed_on_token, backend == Backend::SoftHsm);
    // The record holds no plaintext credential.
    let rec = run
        .server
        .credentials()
        .live(&fx.nodes["d1"].identity.parse().unwrap())
        .unwrap()
        .unwrap();
    let (_, secret) = run.stored(&fx.nodes["d1"].identity).unwrap();
    assert!(!rec.sealed.contains(&hex::encode(secret.expose())));
    let adm = run
        .enroll(&profile, &fx.nodes["n1"], BOTH[0])
        .unwrap()
        .admitted_by;
    assert_eq!(
        serde_json::to_value(&adm).unwrap(),
        serde_json::json!({ "set": sets::NODE, "kind": "node", "enterprise": ENTERPRISE })
    );
}

/// The node's leaf and its CA certificates in two PEM files, as `openssl s_client -cert` and
/// `-cert_chain` take them.
fn leaf_and_chain_files(fx: &Fixture, node: &Node, prefix: &str) -> (PathBuf, PathBuf) {
    let d = fx.dir.path();
    let chain = std::fs::read(&node.chain).unwrap();
    let blocks = pem::parse_many(&chain).unwrap();
    let leaf = d.join(format!("{prefix}-leaf.pem"));
    std::fs::write(
        &leaf,
        m2mpki_hsm::files::pem_encode("CERTIFICATE", blocks[0].contents()),
    )
    .unwrap();
    let rest: String = blocks[1..]
        .iter()
        .map(|b| m2mpki_hsm::files::pem_encode("CERTIFICATE", b.contents()))
        .collect();
    let chain = d.join(format!("{prefix}-chain.pem"));
    std::fs::write(&chain, rest).unwrap();
    (leaf, chain)
}

fn s_client(
    run: &Running,
    fx: &Fixture,
    node: &Node,
    tls12: bool,
    send_cert: bool,
) -> (String, String) {
    s_client_version(run, fx, node, tls12, send_cert, 1)
}

/// The export `openssl s_client` is asked for under a protocol version: (label, length).
fn export_of(version: u32) -> (&'static str, &'static str) {
    if version == 2 {
        ("EXPORTER-oneM2M-Bootstrap", "48")
    } else {
        ("EXPORTER-oneM2M-RootCredentialWrapKey", "32")
    }
}

/// `openssl s_client` over TLS sending `POST /bootstrap` of protocol `version`, exporting
/// what that version exports.
fn s_client_version(
    run: &Running,
    fx: &Fixture,
    node: &Node,
    tls12: bool,
    send_cert: bool,
    version: u32,
) -> (String, String) {
    let (label, len) = export_of(version);
    let (leaf, rest) = leaf_and_chain_files(fx, node, "sc");
    let mut cmd = tool("openssl");
    cmd.args([
        "s_client",
        "-connect",
        &run.addr.to_string(),
        "-servername",
        IN_FQDN,
        "-ign_eof",
        "-keymatexport",
        label,
        "-keymatexportlen",
        len,
    ]);
    if send_cert {
        cmd.arg("-cert")
            .arg(&leaf)
            .arg("-key")
            .arg(&node.key_ref)
            .arg("-cert_chain")
            .arg(&rest);
    }
    if tls12 {
        cmd.arg("-tls1_2");
    }
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let body = format!(r#"{{"version":{version}}}"#);
    let req = format!("POST /bootstrap HTTP/1.1\r\nHost: {IN_FQDN}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len());
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(req.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn openssl_s_client_exports_the_same_key_and_unwraps_the_credential() {
    let fx = Fixture::new(Backend::Software);
    let run = Running::start(&fx, fx.config("allow", ""));
    for tls12 in [false, true] {
        let node = &fx.nodes["d1"];
        let (out, err) = s_client(&run, &fx, node, tls12, true);
        let keymat = out
            .lines()
            .find_map(|l| l.trim().strip_prefix("Keying material: "))
            .unwrap_or_else(|| panic!("no keying material in s_client output: {out}{err}"));
        let kek = WrapKey::from_slice(&hex::decode(keymat).unwrap()).unwrap();
        let json_start = out
            .find("{\"version\"")
            .unwrap_or_else(|| panic!("no response body: {out}{err}"));
        let resp: serde_json::Value = serde_json::Deserializer::from_str(&out[json_start..])
            .into_iter()
            .next()
            .unwrap()
            .unwrap();
        let wrapped = base64::engine::general_purpose::STANDARD
            .decode(resp["wrapped_credential"].as_str().unwrap())
            .unwrap();
        // Our unwrap with OpenSSL's exported key ...
        let credential = protocol::unwrap(&kek, &wrapped).unwrap();
        let (id, stored) = run.stored(&node.identity).unwrap();
        assert_eq!(resp["credential_id"], id);
        assert_eq!(credential, stored);
        // ... and OpenSSL's own AES key wrap agree.
        let wrapped_file = fx.dir.path().join("wrapped.bin");
        std::fs::write(&wrapped_file, &wrapped).unwrap();
        let out = tool("openssl")
            .args([
                "enc",
                "-d",
                "-id-aes256-wrap",
                "-iv",
                "A6A6A6A6A6A6A6A6",
                "-K",
                keymat,
                "-in",
            ])
            .arg(&wrapped_file)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(&out.stdout[..], stored.expose());
    }
    // Without a client certificate there is no session and no credential.
    let before = run.server.credentials().count().unwrap();
    let (out, err) = s_client(&run, &fx, &fx.nodes["d1"], false, false);
    assert!(!out.contains("wrapped_credential"), "{out}");
    assert!(err.contains("alert") || out.contains("alert"), "{out}{err}");
    assert_eq!(run.server.credentials().count().unwrap(), before);
}

fn assert_handshake_refused(r: m2mpki_bootstrap::Result<Enrolled>, needle: &str) {
    match r {
        Err(BError::Handshake { reason, .. }) => {
            assert!(reason.contains(needle), "handshake refused, but: {reason}")
        }
        Err(other) => panic!("expected a handshake refusal ({needle}), got: {other}"),
        Ok(e) => panic!(
            "expected a refusal ({needle}), got a credential for {}",
            e.identity
        ),
    }
}

#[test]
fn the_in_refuses_untrusted_expired_revoked_and_server_certificates() {
    let fx = Fixture::new(Backend::Software);
    let run = Running::start(&fx, fx.config("allow", ""));
    let profile = fx.profile(IN_FQDN, sets::INFRA);
    for versions in BOTH {
        assert_handshake_refused(
            run.enroll(&profile, &fx.nodes["rogue"], versions),
            "UnknownCA",
        );
        assert_handshake_refused(
            run.enroll(&profile, &fx.nodes["expired"], versions),
            "CertificateExpired",
        );
        assert_handshake_refused(
            run.enroll(&profile, &fx.nodes["revoked"], versions),
            "CertificateRevoked",
        );
        // Our client will not even try with a certificate that names no field node ...
        assert!(matches!(
            run.enroll(&profile, &fx.nodes["server-as-client"], versions),
            Err(BError::Ca(_))
        ));
    }
    // ... so OpenSSL presents the IN's serverAuth-only certificate as a client certificate.
    for tls12 in [false, true] {
        let (out, err) = s_client(&run, &fx, &fx.nodes["server-as-client"], tls12, true);
        assert!(!out.contains("wrapped_credential"), "{out}");
        assert!((out.clone() + &err).contains("alert"), "{out}{err}");
    }
    assert_eq!(
        run.server.credentials().count().unwrap(),
        0,
        "a refused node got a credential"
    );
}

#[test]
fn the_field_node_refuses_a_foreign_or_misnamed_in() {
    let fx = Fixture::new(Backend::Software);
    // The IN answers the other name too, so that the node's own name check is what refuses.
    let mut config = fx.config("allow", "");
    config
        .server_names
        .push("other.m2m.localhost".parse().unwrap());
    let run = Running::start(&fx, config);
    // IN roots from the wrong set: the enterprise root is no IN root.
    let home = m2mpki_ca::Home::open(&fx.home).unwrap();
    {
        let store = home.store().unwrap();
        let ent = store.ca(names::ENT_ROOT).unwrap().unwrap();
        let kind = m2mpki_ca::rootset::RootSetKind::Infrastructure;
        m2mpki_ca::roots::create(&store, "wrong-in", kind, Default::default(), 0).unwrap();
        let anchor = m2mpki_ca::rootset::Anchor::from_der(&ent.cert_der, "x").unwrap();
        m2mpki_ca::roots::add_anchors(&store, "wrong-in", vec![anchor]).unwrap();
    }
    let wrong_roots = fx.profile(IN_FQDN, "wrong-in");
    assert_handshake_refused(
        run.enroll(&wrong_roots, &fx.nodes["d1"], BOTH[0]),
        "UnknownIssuer",
    );
    // The right roots, but the profile names another IN.
    let other_name = fx.profile("other.m2m.localhost", sets::INFRA);
    assert_handshake_refused(
        run.enroll(&other_name, &fx.nodes["d1"], BOTH[0]),
        "NotValidForName",
    );
    assert_eq!(run.server.credentials().count().unwrap(), 0);
}

#[test]
fn rebootstrap_rotates_and_racing_rebootstraps_leave_one_live_credential() {
    let fx = Fixture::new(Backend::Software);
    let run = Running::start(&fx, fx.config("allow", ""));
    let profile = fx.profile(IN_FQDN, sets::INFRA);
    let node = fx.nodes["d1"].clone();
    let first = run.enroll(&profile, &node, BOTH[0]).unwrap();
    let second = run.enroll(&profile, &node, BOTH[1]).unwrap();
    assert_ne!(first.credential, second.credential);
    let old = run
        .server
        .credentials()
        .credential(&first.credential_id)
        .unwrap()
        .unwrap();
    assert_eq!(
        old.status,
        m2mpki_bootstrap::credstore::CredentialStatus::Superseded
    );
    assert_eq!(run.stored(&node.identity).unwrap().0, second.credential_id);

    // Sixteen bootstraps of one identity at once.
    let chain = m2mpki_bootstrap::tls::load_chain(&node.chain).unwrap();
    let results: Vec<Enrolled> = run.rt.block_on(async {
        let mut set = tokio::task::JoinSet::new();
        for i in 0..16 {
            set.spawn(client::enroll(Enrolment {
                profile: profile.clone(),
                chain: chain.clone(),
                key: node.key.clone(),
                connect: Some(run.addr.to_string()),
                versions: BOTH[i % 2].to_vec(),
                timeout: Duration::from_secs(30),
            }));
        }
        let mut out = Vec::new();
        while let Some(r) = set.join_next().await {
            out.push(r.unwrap().unwrap());
        }
        out
    });
    let history = run
        .server
        .credentials()
        .history(&node.identity.parse().unwrap())
        .unwrap();
    assert_eq!(history.len(), 18);
    let live: Vec<_> = history
        .iter()
        .filter(|r| r.status == m2mpki_bootstrap::credstore::CredentialStatus::Live)
        .collect();
    assert_eq!(live.len(), 1, "exactly one live credential");
    let (live_id, live_secret) = run.stored(&node.identity).unwrap();
    assert_eq!(live[0].id, live_id);
    let winner = results
        .iter()
        .find(|r| r.credential_id == live_id)
        .expect("the live credential went to one of the racers");
    assert_eq!(winner.credential, live_secret);
}

/// A tmpfs mounted for one test, unmounted when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: PathBuf, size: &str) -> Tmpfs {
        std::fs::create_dir_all(&at).unwrap();
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&at)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "this test fills a disk, and needs to mount a tmpfs for it (root, or CAP_SYS_ADMIN): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs(at)
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// An IN whose home is on a disk that fills up: enrolments are refused with 503 while it is
/// full (nothing recorded) and succeed again once space is freed, without a restart (redb
/// refuses every transaction after an I/O error until the file is opened again).
#[test]
fn an_in_on_a_full_disk_serves_again_once_space_is_freed() {
    let mut fx = Fixture::new(Backend::Software);
    let disk = Tmpfs::mount(fx.dir.path().join("disk"), "16m");
    let home = disk.0.join("home");
    let ok = std::process::Command::new("cp")
        .arg("-a")
        .arg(&fx.home)
        .arg(&home)
        .status()
        .unwrap();
    assert!(ok.success());
    fx.home = home;
    let run = Running::start(&fx, fx.config("allow", ""));
    let profile = fx.profile(IN_FQDN, sets::INFRA);
    let node = fx.nodes["d1"].clone();
    run.enroll(&profile, &node, BOTH[0]).unwrap();

    // Fill the disk.
    let filler = disk.0.join("filler");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&filler).unwrap();
        let block = vec![0x5Au8; 64 * 1024];
        while f.write_all(&block).is_ok() {}
        let _ = f.sync_all();
    }
    let mut refused = 0;
    for _ in 0..20 {
        match run.enroll(&profile, &node, BOTH[0]) {
            Err(m2mpki_bootstrap::Error::Refused { status, code, .. }) => {
                assert_eq!((status, code.as_str()), (503, "store_unavailable"));
                refused += 1;
            }
            Err(e) => panic!("a full disk: {e}"),
            Ok(_) => {} // redb had room left in its file
        }
    }
    assert!(refused > 0, "the full disk never refused an enrolment");
    let before = run
        .server
        .credentials()
        .history(&node.identity.parse().unwrap())
        .unwrap()
        .len();

    // Space comes back: the same process serves again.
    std::fs::remove_file(&filler).unwrap();
    let again = run.enroll(&profile, &node, BOTH[0]).unwrap();
    assert_eq!(run.stored(&node.identity).unwrap().0, again.credential_id);
    let after = run
        .server
        .credentials()
        .history(&node.identity.parse().unwrap())
        .unwrap()
        .len();
    assert_eq!(after, before + 1);
    drop(run);
}

#[test]
fn policy_deny_grants_while_running_and_check() {
    let fx = Fixture::new(Backend::Software);
    let run = Running::start(&fx, fx.config("deny", ""));
    let profile = fx.profile(IN_FQDN, sets::INFRA);
    let node = &fx.nodes["n1"];
    match run.enroll(&profile, node, BOTH[0]) {
        Err(BError::Refused {
            status: 403, code, ..
        }) => assert_eq!(code, "denied_by_policy"),
        other => panic!("expected denied_by_policy, got {other:?}"),
    }
    assert_eq!(run.server.credentials().count().unwrap(), 0);
    let m2mpki = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_m2mpki"))
            .arg("--home")
            .arg(&fx.home)
            .args(args)
            .output()
            .unwrap()
    };
    // A technician records the node while the server runs; no restart.
    let out = m2mpki(&["bootstrap", "check", &node.identity, "valve-7"]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = m2mpki(&[
        "bootstrap",
        "grant",
        &node.identity,
        "valve-7",
        "meter-read",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = m2mpki(&["bootstrap", "check", &node.identity, "valve-7"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = m2mpki(&["bootstrap", "check", &node.identity, "weather"]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "deny policy: default grants do not apply"
    );
    let got = run.enroll(&profile, node, BOTH[0]).unwrap();
    assert_eq!(
        got.grants,
        vec!["meter-read".to_owned(), "valve-7".to_owned()]
    );
    // Other identities are still refused.
    assert!(matches!(
        run.enroll(&profile, &fx.nodes["d1"], BOTH[0]),
        Err(BError::Refused { status: 403, .. })
    ));
    let listed: serde_json::Value =
        serde_json::from_slice(&m2mpki(&["--json", "bootstrap", "grants"]).stdout).unwrap();
    assert_eq!(listed["policy"]["default"], "deny");
    assert_eq!(listed["grants"][0]["identity"], node.identity.as_str());
    let out = m2mpki(&["bootstrap", "grant", "not-an-identity", "x"]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn a_burst_of_connections_waits_in_the_accept_queue() {
    // 250 field nodes connecting at once, before the server takes any: the listen backlog
    // (65 535 asked, which the kernel lowers to net.core.somaxconn) holds them all. With the
    // default backlog of 128 the kernel drops the SYNs of the rest, which retry only after a
    // second: their connect does not complete within the 500 ms given here.
    let fx = Fixture::new(Backend::Software);
    let config = fx.config("allow", "");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let home = m2mpki_ca::Home::open(&fx.home).unwrap();
    let server = Server::new(config, &home, &fx.keystore).unwrap();
    let listener = rt.block_on(server.bind()).unwrap();
    let addr = listener.local_addr().unwrap();
    let mut held = Vec::new();
    let mut not_queued = Vec::new();
    for i in 0..250 {
        match std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(500)) {
            Ok(tcp) => held.push(tcp),
            Err(e) => not_queued.push(format!("connection {i}: {e}")),
        }
    }
    assert!(not_queued.is_empty(), "not queued: {not_queued:?}");
    drop(held);
}

#[test]
fn slow_clients_do_not_hold_the_server() {
    let fx = Fixture::new(Backend::Software);
    let mut config = fx.config("allow", "");
    config.limits.max_connections = 2;
    // Long enough that no timeout frees a slot while the test runs: only eviction can.
    config.limits.hello_timeout = Duration::from_secs(60);
    config.limits.handshake_timeout = Duration::from_secs(60);
    let run = Running::start(&fx, config);
    // Two silent connections take every slot ...
    let idle: Vec<_> = (0..2)
        .map(|_| std::net::TcpStream::connect(run.addr).unwrap())
        .collect();
    let profile = fx.profile(IN_FQDN, sets::INFRA);
    // ... and a real client's connection evicts the one that has waited longest on its peer
    // (the handshake timeout itself: bootstrap/tests/metrics.rs).
    let got = run.enroll(&profile, &fx.nodes["d1"], BOTH[0]).unwrap();
    assert_eq!(got.identity.to_string(), fx.nodes["d1"].identity);
    drop(idle);
}

#[test]
fn the_cli_enrols_writes_a_private_credential_and_serve_stops_on_sigterm() {
    let fx = Fixture::new(Backend::Software);
    // The server as a process of its own.
    let port = {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    };
    let psk_port = {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    };
    let config = fx.dir.path().join("cli-serve.toml");
    std::fs::write(
        &config,
        server_config_toml(
            &format!("127.0.0.1:{port}"),
            &fx.in_chain,
            &fx.in_key,
            "allow",
        ) + &format!("\n[psk]\nlisten = \"127.0.0.1:{psk_port}\"\n"),
    )
    .unwrap();
    let serve = Command::new(env!("CARGO_BIN_EXE_m2mpki"))
        .arg("--home")
        .arg(&fx.home)
        .args(["bootstrap", "serve", "--config"])
        .arg(&config)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let profile = fx.dir.path().join("profile.toml");
    let m2mpki = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_m2mpki"))
            .arg("--home")
            .arg(&fx.home)
            .args(args)
            .output()
            .unwrap()
    };
    let out = m2mpki(&[
        "bootstrap",
        "profile",
        "--set",
        sets::INFRA,
        "--fqdn",
        IN_FQDN,
        "--port",
        &port.to_string(),
        "--out",
        profile.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cred = fx.dir.path().join("d1.cred");
    let node = &fx.nodes["d1"];
    let mut result = None;
    for _ in 0..100 {
        let out = Command::new(env!("CARGO_BIN_EXE_m2mpki"))
            .args([
                "--json",
                "bootstrap",
                "enroll",
                "--profile",
                profile.to_str().unwrap(),
                "--cert",
                node.chain.to_str().unwrap(),
                "--key",
                &node.key_ref,
                "--out",
                cred.to_str().unwrap(),
                "--connect",
                &format!("127.0.0.1:{port}"),
            ])
            .output()
            .unwrap();
        if out.status.success() {
            result = Some(out);
            break;
        }
        std::thread::sleep(Duration::from_millis(100)); // the server is still starting
    }
    let out = result.expect("enrolment through the CLI never succeeded");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["result"]["identity"], node.identity.as_str());
    let stdout = String::from_utf8_lossy(&out.stdout);
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&cred).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let file: serde_json::Value = serde_json::from_slice(&std::fs::read(&cred).unwrap()).unwrap();
    let secret = file["credential"].as_str().unwrap();
    assert_eq!(secret.len(), 64);
    assert!(!stdout.contains(secret), "--json printed the credential");
    // An existing credential file is kept without --force.
    let again = Command::new(env!("CARGO_BIN_EXE_m2mpki"))
        .args([
            "bootstrap",
            "enroll",
            "--profile",
            profile.to_str().unwrap(),
            "--cert",
            node.chain.to_str().unwrap(),
            "--key",
            &node.key_ref,
            "--out",
            cred.to_str().unwrap(),
            "--connect",
            &format!("127.0.0.1:{port}"),
        ])
        .output()
        .unwrap();
    assert_eq!(again.status.code(), Some(2));
    // The credential put to use: `bootstrap associate` (TLS 1.2 PSK) is told who it is.
    let assoc = m2mpki(&[
        "--json",
        "bootstrap",
        "associate",
        "--credential",
        cred.to_str().unwrap(),
        "--connect",
        &format!("127.0.0.1:{psk_port}"),
    ]);
    assert!(
        assoc.status.success(),
        "{}",
        String::from_utf8_lossy(&assoc.stderr)
    );
    let a: serde_json::Value = serde_json::from_slice(&assoc.stdout).unwrap();
    assert_eq!(a["identity"], node.identity.as_str());
    assert_eq!(a["credential_id"], file["credential_id"]);
    assert!(!String::from_utf8_lossy(&assoc.stdout).contains(secret));
    // A credential file with a key that is one bit off: the IN does not associate (exit 3,
    // refused), and a file that is not a credential file is bad input (exit 2).
    let mut tampered = file.clone();
    let mut key = hex::decode(secret).unwrap();
    key[31] ^= 1;
    tampered["credential"] = hex::encode(key).into();
    let bad_cred = fx.dir.path().join("tampered.cred");
    std::fs::write(&bad_cred, tampered.to_string()).unwrap();
    let out = m2mpki(&[
        "bootstrap",
        "associate",
        "--credential",
        bad_cred.to_str().unwrap(),
        "--connect",
        &format!("127.0.0.1:{psk_port}"),
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("handshake"), "{err}");
    assert!(!err.contains(secret), "{err}");
    std::fs::write(
        &bad_cred,
        "{\"m2mpki_credential\": 1, \"credential\": \"zz\"}",
    )
    .unwrap();
    let out = m2mpki(&[
        "bootstrap",
        "associate",
        "--credential",
        bad_cred.to_str().unwrap(),
        "--connect",
        &format!("127.0.0.1:{psk_port}"),
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("tampered.cred"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // SIGTERM drains and stops cleanly.
    let status = Command::new("kill")
        .args(["-TERM", &serve.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let out = serve.wait_with_output().unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{log}");
    assert!(log.contains("bootstrap server stopped"), "{log}");
    assert!(!log.contains(secret), "the log shows the credential");
    // The log names the identity it issued for, and nothing secret.
    assert!(log.contains(&node.identity), "{log}");
}

fn free_tcp_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The IN fits its caps into the descriptor limit: under `prlimit --nofile=1024:1024` the
/// default caps (1 024 connections on TLS and on PSK) cannot fit and `serve` refuses to start
/// with the arithmetic (exit 2); under 1024:4096 it raises its soft limit to the hard one;
/// with caps that fit, 600 silent connections (ten source addresses, past max_connections)
/// leave enrolments working and `accept` never fails with EMFILE.
#[test]
fn the_in_fits_its_caps_into_the_descriptor_limit() {
    let fx = Fixture::new(Backend::Software);
    let port = free_tcp_port();
    let psk_port = free_tcp_port();
    let write_config = |extra: &str| {
        let config = fx.dir.path().join("fd-serve.toml");
        let text = server_config_toml(
            &format!("127.0.0.1:{port}"),
            &fx.in_chain,
            &fx.in_key,
            "allow",
        )
        .replace("max_connections = 1024\n", &format!("{extra}\n"))
            + &format!("\n[psk]\nlisten = \"127.0.0.1:{psk_port}\"\n");
        assert!(text.contains(extra), "no [limits] section to extend");
        std::fs::write(&config, text).unwrap();
        config
    };
    let serve = |nofile: &str, config: &Path| {
        tool("prlimit")
            .arg(format!("--nofile={nofile}"))
            .arg(env!("CARGO_BIN_EXE_m2mpki"))
            .arg("--home")
            .arg(&fx.home)
            .args(["bootstrap", "serve", "--config"])
            .arg(config)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    // The default caps: 2 x 1024 x 2 + 64 = 4160 descriptors.
    let config = write_config("max_connections = 1024");
    let out = serve("1024:1024", &config).wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("4160 file descriptors") && err.contains("RLIMIT_NOFILE is 1024"),
        "{err}"
    );
    assert!(err.contains("max_connections to at most 240"), "{err}");

    // Caps that fit 4096; the soft limit is raised to it.
    let config = write_config("max_connections = 300\nmax_connections_per_address = 64");
    let mut child = serve("1024:4096", &config);
    let node = &fx.nodes["d1"];
    let run_enrol = || {
        let profile = fx.profile(IN_FQDN, sets::INFRA);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(client::enroll(Enrolment {
            profile,
            chain: m2mpki_bootstrap::tls::load_chain(&node.chain).unwrap(),
            key: node.key.clone(),
            connect: Some(format!("127.0.0.1:{port}")),
            versions: BOTH[0].to_vec(),
            timeout: Duration::from_secs(10),
        }))
    };
    let mut last = None;
    for _ in 0..100 {
        match run_enrol() {
            Ok(_) => {
                last = None;
                break;
            }
            Err(e) => last = Some(e),
        }
        if let Some(status) = child.try_wait().unwrap() {
            let mut err = String::new();
            std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
            panic!("the IN exited ({status}): {err}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(last.is_none(), "the IN did not serve: {last:?}");
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", child.id())).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    assert_eq!(
        line.split_whitespace().skip(3).take(2).collect::<Vec<_>>(),
        ["4096", "4096"],
        "{line}"
    );
    // 600 silent connections from ten loopback addresses (60 each, under the per-address cap;
    // 600 is past max_connections, so the IN evicts), then enrolments still work.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let silent: Vec<tokio::net::TcpStream> = rt.block_on(async {
        let mut held = Vec::new();
        for i in 0..600u32 {
            let from = std::net::Ipv4Addr::new(127, 0, 0, 10 + (i % 10) as u8);
            let socket = tokio::net::TcpSocket::new_v4().unwrap();
            socket.bind(SocketAddr::from((from, 0))).unwrap();
            held.push(
                socket
                    .connect(SocketAddr::from(([127, 0, 0, 1], port)))
                    .await
                    .unwrap(),
            );
        }
        held
    });
    for n in 0..5 {
        run_enrol().unwrap_or_else(|e| panic!("enrolment {n} under 600 silent connections: {e}"));
    }
    drop(silent);
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(child.id() as i32).unwrap(),
        rustix::process::Signal::TERM,
    )
    .unwrap();
    let out = child.wait_with_output().unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{log}");
    assert!(!log.contains("Too many open files"), "{log}");
    assert!(log.contains("raised the soft descriptor limit"), "{log}");
}

fn request(headers: &str, body: &str) -> Vec<u8> {
    format!(
        "POST /bootstrap HTTP/1.1\r\nHost: {IN_FQDN}\r\nContent-Type: application/json\r\n{headers}\r\n{body}"
    )
    .into_bytes()
}

/// docs/protocol.md §5: every refusal carries the JSON error document, and a declared body over
/// the limit is refused at once, not held until the idle timeout.
#[test]
fn malformed_requests_get_their_status_and_the_json_error_document() {
    let fx = Fixture::new(Backend::Software);
    let run = Running::start(&fx, fx.config("allow", ""));
    let profile = fx.profile(IN_FQDN, sets::INFRA);
    let node = &fx.nodes["d1"];
    let ok = r#"{"version":1}"#;
    let many: String = (0..5000).map(|i| format!("X-{i}: y\r\n")).collect();
    let cases: Vec<(&str, Vec<u8>, u16, &str)> = vec![
        (
            "a JSON array",
            request("Content-Length: 3\r\n", "[1]"),
            400,
            "bad_request",
        ),
        (
            "a JSON string",
            request("Content-Length: 3\r\n", "\"a\""),
            400,
            "bad_request",
        ),
        (
            "a declared body over the limit",
            request("Content-Length: 1048576\r\n", ok),
            413,
            "body_too_large",
        ),
        (
            "two Content-Length headers",
            request("Content-Length: 13\r\nContent-Length: 13\r\n", ok),
            400,
            "bad_request",
        ),
        (
            "a negative Content-Length",
            request("Content-Length: -13\r\n", ok),
            400,
            "bad_request",
        ),
        (
            "an overflowing Content-Length",
            request("Content-Length: 184467440737095516160\r\n", ok),
            400,
            "bad_request",
        ),
        (
            "a NUL in a header",
            request("X-Evil: a\0b\r\nContent-Length: 13\r\n", ok),
            400,
            "bad_request",
        ),
        (
            "5 000 headers",
            request(&format!("{many}Content-Length: 13\r\n"), ok),
            431,
            "header_too_large",
        ),
    ];
    for (what, req, status, code) in cases {
        let (got, body, _) = run.raw(&profile, node, BOTH[0], &req, false);
        assert_eq!(got, status, "{what}: {body}");
        assert_eq!(body["error"]["code"], code, "{what}: {body}");
        assert!(
            body["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{what}"
        );
    }
    assert!(
        run.stored(&node.identity).is_none(),
        "no refused request got a credential"
    );
    // A well-formed request still gets its credential.
    let (got, body, _) = run.raw(
        &profile,
        node,
        BOTH[0],
        &request("Content-Length: 13\r\n", ok),
        false,
    );
    assert_eq!(got, 200, "{body}");
}

/// A client that shuts its write side right after a whole request (as gnutls-cli does when its
/// input ends) still gets its credential, over TLS 1.3 and 1.2.
#[test]
fn a_client_that_half_closes_after_its_request_gets_its_answer() {
    let fx = Fixture::new(Backend::Software);
    let run = Running::start(&fx, fx.config("allow", ""));
    let profile = fx.profile(IN_FQDN, sets::INFRA);
    let node = &fx.nodes["d1"];
    for versions in BOTH {
        let req = request("Content-Length: 13\r\n", r#"{"version":1}"#);
        let (status, body, wrap_key) = run.raw(&profile, node, versions, &req, true);
        assert_eq!(status, 200, "{versions:?}: {body}");
        let wrapped = base64::engine::general_purpose::STANDARD
            .decode(body["wrapped_credential"].as_str().unwrap())
            .unwrap();
        let credential = protocol::unwrap(&wrap_key, &wrapped).unwrap();
        let (id, stored) = run.stored(&node.identity).unwrap();
        assert_eq!(body["credential_id"], id);
        assert_eq!(credential.expose(), stored.expose(), "{versions:?}");
    }
}

/// A server that accepts and closes at once: the network failed, no IN refused anything (exit 3,
/// not 1).
#[test]
fn an_enrolment_cut_off_by_the_network_exits_3() {
    let fx = Fixture::new(Backend::Software);
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = dead.local_addr().unwrap();
    let closer = std::thread::spawn(move || {
        for conn in dead.incoming().take(1) {
            drop(conn);
        }
    });
    fx.profile(IN_FQDN, sets::INFRA); // writes the profile file
    let profile_path = fx
        .dir
        .path()
        .join(format!("profile-{}-{IN_FQDN}.toml", sets::INFRA));
    let node = &fx.nodes["d1"];
    let out = Command::new(env!("CARGO_BIN_EXE_m2mpki"))
        .arg("--home")
        .arg(&fx.home)
        .args(["bootstrap", "enroll", "--profile"])
        .arg(&profile_path)
        .arg("--cert")
        .arg(&node.chain)
        .arg("--key")
        .arg(&node.key_ref)
        .arg("--out")
        .arg(fx.dir.path().join("dead.cred"))
        .args(["--connect", &addr.to_string()])
        .output()
        .unwrap();
    closer.join().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(err.contains("broke"), "{err}");
    assert!(!fx.dir.path().join("dead.cred").exists());
}

/// Changes the device set in the fixture's store (before a server starts on it).
fn edit_device_set(fx: &Fixture, edit: impl Fn(&mut m2mpki_ca::rootset::RootSet)) {
    let home = m2mpki_ca::Home::open(&fx.home).unwrap();
    home.store()
        .unwrap()
        .modify_root_set(sets::DEVICE, &mut |s| {
            edit(s);
            Ok(m2mpki_ca::audit::AuditEvent {
                action: m2mpki_ca::audit::AuditAction::RootsSet,
                subject: sets::DEVICE.into(),
                detail: serde_json::json!({}),
            })
        })
        .unwrap();
}

/// A CRL of `ca` (a software key) that was due to be replaced half an hour ago (well inside the
/// one-hour grace the test then grants, however slowly the test runs), listing every revoked
/// certificate of the CA; attached to the device set.
fn attach_stale_crl(fx: &Fixture, ca: &str) {
    let home = m2mpki_ca::Home::open(&fx.home).unwrap();
    let store = home.store().unwrap();
    let record = store.ca(ca).unwrap().unwrap();
    let key = SoftwareKey::load(&fx.home.join(m2mpki_ca::Home::ca_key_path(ca)), None).unwrap();
    let mut revoked = Vec::new();
    store
        .revoked(ca, &mut |e| {
            revoked.push(rcgen::RevokedCertParams {
                serial_number: rcgen::SerialNumber::from_slice(e.serial.as_bytes()),
                revocation_time: time::OffsetDateTime::from_unix_timestamp(e.revoked_at).unwrap(),
                reason_code: None,
                invalidity_date: None,
            });
            Ok(())
        })
        .unwrap();
    let issuers: Vec<Vec<u8>> = store
        .cas()
        .unwrap()
        .into_iter()
        .map(|c| c.cert_der)
        .collect();
    drop(store);
    let issuer = rcgen::Issuer::from_ca_cert_der(&record.cert_der.clone().into(), key).unwrap();
    let now = time::OffsetDateTime::now_utc();
    let crl = rcgen::CertificateRevocationListParams {
        this_update: now - time::Duration::hours(2),
        next_update: now - time::Duration::minutes(30),
        crl_number: rcgen::SerialNumber::from(1_000_000u64),
        issuing_distribution_point: None,
        revoked_certs: revoked,
        key_identifier_method: rcgen::KeyIdMethod::Sha256,
    }
    .signed_by(&issuer)
    .unwrap();
    let rec = m2mpki_ca::rootset::CrlRecord::from_der(crl.der(), ca).unwrap();
    edit_device_set(fx, |s| {
        assert!(s.attach_crl(rec.clone(), &issuers).unwrap())
    });
}

/// The IN fails closed: under `require` (the default) a device whose issuer has no CRL in the
/// set, or only a stale one, gets no credential; a revoked device stays refused when its CRL is
/// stale; `best-effort` or a grace period admit the unknown status again.
#[test]
fn the_in_requires_a_current_revocation_status() {
    let profile_of = |fx: &Fixture| fx.profile(IN_FQDN, sets::INFRA);
    // No CRL of the device CA in the set.
    let fx = Fixture::new(Backend::Software);
    edit_device_set(&fx, |s| s.crls.retain(|c| !c.issuer.contains("Device CA")));
    {
        let run = Running::start(&fx, fx.config("allow", ""));
        for versions in BOTH {
            assert_handshake_refused(
                run.enroll(&profile_of(&fx), &fx.nodes["d1"], versions),
                "UnknownCA",
            );
        }
        // The node set is untouched: its nodes still bootstrap.
        run.enroll(&profile_of(&fx), &fx.nodes["n1"], BOTH[0])
            .unwrap();
    }
    edit_device_set(&fx, |s| {
        s.revocation.mode = m2mpki_ca::rootset::RevocationMode::BestEffort
    });
    {
        let run = Running::start(&fx, fx.config("allow", ""));
        run.enroll(&profile_of(&fx), &fx.nodes["d1"], BOTH[0])
            .unwrap();
    }

    // Only a stale CRL: refused; the revoked device it lists stays refused.
    let fx = Fixture::new(Backend::Software);
    attach_stale_crl(&fx, names::MFR_CA);
    {
        let run = Running::start(&fx, fx.config("allow", ""));
        for versions in BOTH {
            assert_handshake_refused(
                run.enroll(&profile_of(&fx), &fx.nodes["d1"], versions),
                "UnknownCA",
            );
            assert_handshake_refused(
                run.enroll(&profile_of(&fx), &fx.nodes["revoked"], versions),
                "CertificateRevoked",
            );
        }
        assert!(run.stored(&fx.nodes["d1"].identity).is_none());
    }
    // A grace period covers the stale CRL for the good device, never for the revoked one.
    edit_device_set(&fx, |s| s.revocation.crl_grace = 3600);
    let run = Running::start(&fx, fx.config("allow", ""));
    run.enroll(&profile_of(&fx), &fx.nodes["d1"], BOTH[0])
        .unwrap();
    assert_handshake_refused(
        run.enroll(&profile_of(&fx), &fx.nodes["revoked"], BOTH[0]),
        "CertificateRevoked",
    );
}

/// What rustls-webpki leaves out, checked by the IN: an anchor that has expired, and a device
/// certificate without the clientAuth EKU.
#[test]
fn the_in_refuses_an_expired_anchor_and_a_certificate_without_eku() {
    let fx = Fixture::new(Backend::Software);
    let home = m2mpki_ca::Home::open(&fx.home).unwrap();
    let store = home.store().unwrap();
    // A device issued under a profile that has no EKU.
    let no_eku = {
        let mut key = SoftwareKey::generate(KeyType::P256).unwrap();
        let authority =
            m2mpki_ca::Authority::load(&home, &store, &fx.keystore, names::MFR_CA).unwrap();
        let mut profile =
            m2mpki_ca::profile::LeafProfile::builtin(m2mpki_ca::profile::ProfileKind::Device);
        profile.extended_key_usage.clear();
        let spki = rcgen::SubjectPublicKeyInfo::from_der(
            &rcgen::PublicKeyData::subject_public_key_info(&key),
        )
        .unwrap();
        let cert = m2mpki_ca::issue(
            &store,
            &authority,
            &profile,
            m2mpki_ca::LeafRequest {
                subject: LeafSubject::Device("D-NOEKU".parse().unwrap()),
                public_key: spki,
                validity: None,
                not_before: None,
                requester: m2mpki_ca::Requester::Lab,
            },
            false,
        )
        .unwrap();
        let (_, parsed) = x509_parser::parse_x509_certificate(&cert.der).unwrap();
        assert!(parsed.extended_key_usage().unwrap().is_none(), "no EKU");
        let mut chain = vec![cert.der];
        chain.extend(
            authority
                .chain_without_root()
                .into_iter()
                .map(<[u8]>::to_vec),
        );
        let path = fx.dir.path().join("noeku.pem");
        write_chain(&path, &chain).unwrap();
        let kp = fx.dir.path().join("noeku.key.pem");
        key.save(&kp, None, m2mpki_hsm::files::Overwrite::Replace)
            .unwrap();
        Node {
            chain: path,
            key: fx.keystore.open(&KeyRef::File(kp.clone())).unwrap(),
            key_ref: kp.display().to_string(),
            identity: format!("device:{HW_TYPE}:D-NOEKU"),
        }
    };
    // The manufacturer root re-certified (same name, same key) with a lifetime that is over.
    let expired_root = {
        let root = store.ca(names::MFR_ROOT).unwrap().unwrap();
        // Our own CA machinery, given the root's key and subject and a lifetime in the past.
        let old = m2mpki_ca::init_ca(
            &home,
            &store,
            &fx.keystore,
            m2mpki_ca::CaInit {
                name: "mfr-root-old".into(),
                subject: root.subject.clone(),
                parent: None,
                key: m2mpki_ca::CaKey::Existing(KeyRef::File(
                    fx.home.join(m2mpki_ca::Home::ca_key_path(names::MFR_ROOT)),
                )),
                validity: Some(m2mpki_ca::validity::Validity::Hours(1)),
                not_before: Some(time::OffsetDateTime::now_utc() - time::Duration::days(3)),
                path_len: root.path_len,
                hw_type: None,
                name_constraints: m2mpki_ca::NameConstraints::default(),
                replace_key_file: false,
            },
        )
        .unwrap();
        let (_, a) = x509_parser::parse_x509_certificate(&old.cert_der).unwrap();
        let (_, b) = x509_parser::parse_x509_certificate(&root.cert_der).unwrap();
        assert_eq!(a.subject().as_raw(), b.subject().as_raw());
        assert_eq!(a.public_key().raw, b.public_key().raw);
        old.cert_der
    };
    drop(store);
    {
        let run = Running::start(&fx, fx.config("allow", DTLS));
        let profile = fx.profile(IN_FQDN, sets::INFRA);
        for versions in BOTH {
            assert_handshake_refused(
                run.enroll(&profile, &no_eku, versions),
                "UnsupportedCertificate",
            );
        }
        // Over DTLS the same alert (it was handshake_failure; hostile review D10).
        match run.enroll_dtls(&profile, &no_eku, DtlsSuite::Aes128Ccm8) {
            Err(BError::Handshake { reason, .. }) => {
                assert!(reason.contains("unsupported certificate"), "{reason}")
            }
            other => panic!("expected a handshake refusal, got {other:?}"),
        }
        assert!(run.stored(&no_eku.identity).is_none());
        // The same chain under the current anchor bootstraps ...
        run.enroll(&profile, &fx.nodes["d1"], BOTH[0]).unwrap();
    }
    // ... and under the expired one it does not.
    let anchor = m2mpki_ca::rootset::Anchor::from_der(&expired_root, "expired root").unwrap();
    edit_device_set(&fx, |s| s.anchors = vec![anchor.clone()]);
    let run = Running::start(&fx, fx.config("allow", ""));
    let profile = fx.profile(IN_FQDN, sets::INFRA);
    for versions in BOTH {
        assert_handshake_refused(
            run.enroll(&profile, &fx.nodes["n1"], versions)
                .and(run.enroll(&profile, &fx.nodes["d1"], versions)),
            "CertificateExpired",
        );
    }
}

/// The server config's DTLS section on a free loopback port.
const DTLS: &str = "\n[dtls]\nlisten = \"127.0.0.1:0\"\n";

/// A DER length.
fn der_len(n: usize) -> Vec<u8> {
    match n {
        0..=0x7f => vec![n as u8],
        0x80..=0xff => vec![0x81, n as u8],
        _ => vec![0x82, (n >> 8) as u8, n as u8],
    }
}

/// `cert` (a leaf of `issuer_key`'s CA) with every byte of its authority key identifier's
/// keyIdentifier inverted, signed again by `issuer_key`: a valid certificate whose AKI no
/// longer names its issuer's SKI (as one from a CA that derives key IDs by another method).
fn with_foreign_aki(cert: &[u8], issuer_key: &dyn Signer) -> Vec<u8> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert).unwrap();
    let mut tbs = parsed.tbs_certificate.as_ref().to_vec();
    let at = tbs
        .windows(5)
        .position(|w| w == [0x06, 0x03, 0x55, 0x1d, 0x23])
        .expect("an AKI extension")
        + 5;
    // OCTET STRING { SEQUENCE { [0] keyIdentifier } }
    assert_eq!((tbs[at], tbs[at + 2], tbs[at + 4]), (0x04, 0x30, 0x80));
    let len = usize::from(tbs[at + 5]);
    for b in &mut tbs[at + 6..at + 6 + len] {
        *b ^= 0xff;
    }
    let signature = rcgen::SigningKey::sign(issuer_key, &tbs).unwrap();
    // ecdsa-with-SHA256
    let algorithm = [
        0x30, 0x0a, 0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x02,
    ];
    let mut bits = vec![0x03];
    bits.extend(der_len(signature.len() + 1));
    bits.push(0);
    bits.extend(signature);
    let body: Vec<u8> = [tbs, algorithm.to_vec(), bits].concat();
    let mut out = vec![0x30];
    out.extend(der_len(body.len()));
    out.extend(body);
    out
}

/// Hostile review D11: a device certificate whose AKI is not its issuer's SKI (RFC 5280 makes
/// the AKI a hint for path building, not a requirement) is admitted over DTLS as over TLS 1.3
/// and 1.2: the IN judges the chain the node sent, not the one OpenSSL built going by the AKI.
#[test]
fn a_leaf_whose_aki_is_not_its_issuers_ski_is_judged_alike_over_tls_and_dtls() {
    let fx = Fixture::new(Backend::Software);
    let d1 = &fx.nodes["d1"];
    let mut chain: Vec<Vec<u8>> = m2mpki_bootstrap::tls::load_chain(&d1.chain)
        .unwrap()
        .iter()
        .map(|c| c.as_ref().to_vec())
        .collect();
    let ca_key = fx
        .keystore
        .open(&KeyRef::File(
            fx.home.join(m2mpki_ca::Home::ca_key_path(names::MFR_CA)),
        ))
        .unwrap();
    chain[0] = with_foreign_aki(&chain[0], ca_key.as_ref());
    let path = fx.dir.path().join("foreign-aki.pem");
    write_chain(&path, &chain).unwrap();
    let node = Node {
        chain: path,
        key: d1.key.clone(),
        key_ref: d1.key_ref.clone(),
        identity: d1.identity.clone(),
    };
    let run = Running::start(&fx, fx.config("allow", DTLS));
    let profile = fx.profile(IN_FQDN, sets::INFRA);
    for versions in BOTH {
        run.enroll(&profile, &node, versions)
            .unwrap_or_else(|e| panic!("TLS {versions:?}: {e}"));
    }
    let got = run
        .enroll_dtls(&profile, &node, DtlsSuite::Aes128Ccm8)
        .unwrap_or_else(|e| panic!("DTLS: {e}"));
    assert_eq!(got.identity.to_string(), d1.identity);
}

#[test]
fn over_dtls_device_and_node_enrol_with_ccm8_only_and_every_refusal_gets_nothing() {
    let fx = Fixture::new(Backend::Software);
    let run = Running::start(&fx, fx.config("allow", DTLS));
    let profile = fx.profile(IN_FQDN, sets::INFRA);
    for name in ["d1", "n1"] {
        let node = &fx.nodes[name];
        let got = run
            .enroll_dtls(&profile, node, DtlsSuite::Aes128Ccm8)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(got.identity.to_string(), node.identity);
        assert_eq!(
            got.tls_version,
            "DTLSv1_2 TLS_ECDHE_ECDSA_WITH_AES_128_CCM_8"
        );
        let (id, stored) = run.stored(&node.identity).unwrap();
        assert_eq!((id, stored), (got.credential_id, got.credential));
    }
    let before = run.server.credentials().count().unwrap();
    // The alerts TLS sends for the same refusals (docs/protocol.md §8.1).
    for (name, alert) in [
        ("rogue", "unknown ca"),
        ("expired", "certificate expired"),
        ("revoked", "certificate revoked"),
    ] {
        match run.enroll_dtls(&profile, &fx.nodes[name], DtlsSuite::Aes128Ccm8) {
            Err(BError::Handshake { reason, .. }) => {
                assert!(reason.contains(alert), "{name}: {reason}")
            }
            other => panic!("{name}: expected a handshake refusal, got {other:?}"),
        }
    }
    // The IN's serverAuth-only certificate as a client certificate (wrong EKU), through
    // OpenSSL since our client will not present it.
    let (out, err) = s_client_dtls(&run, &fx, &fx.nodes["server-as-client"], None);
    let out = String::from_utf8_lossy(&out).into_owned();
    assert!(!out.contains("wrapped_credential"), "{out}");
    assert!(
        (out.clone() + &err).contains("unsupported certificate"),
        "{out}{err}"
    );
    assert_eq!(run.server.credentials().count().unwrap(), before);
}

/// A confirmable CoAP POST /bootstrap with `body` (docs/protocol.md §8.2), built byte by byte.
fn coap_post(message_id: u16, body: &[u8]) -> Vec<u8> {
    let mut m = vec![0x42, 0x02];
    m.extend_from_slice(&message_id.to_be_bytes());
    m.extend_from_slice(&[0xbe, 0xef]); // token
    m.push(0xb9); // Uri-Path, 9 bytes
    m.extend_from_slice(b"bootstrap");
    m.extend_from_slice(&[0x11, 50]); // Content-Format application/json
    m.push(0xff);
    m.extend_from_slice(body);
    m
}

/// `openssl s_client -dtls1_2` with CCM_8 as `node`, exporting the wrap key and sending the
/// CoAP `request` (when given) once the handshake is done; returns stdout (raw: the CoAP
/// response is binary) and stderr.
fn s_client_dtls(
    run: &Running,
    fx: &Fixture,
    node: &Node,
    request: Option<&[u8]>,
) -> (Vec<u8>, String) {
    s_client_dtls_version(run, fx, node, request, 1)
}

/// [`s_client_dtls`] exporting what protocol `version` exports.
fn s_client_dtls_version(
    run: &Running,
    fx: &Fixture,
    node: &Node,
    request: Option<&[u8]>,
    version: u32,
) -> (Vec<u8>, String) {
    let (label, len) = export_of(version);
    let (leaf, rest) = leaf_and_chain_files(fx, node, "dc");
    let child = tool("openssl")
        .args([
            "s_client",
            "-dtls1_2",
            "-connect",
            &run.dtls.unwrap().to_string(),
            "-servername",
            IN_FQDN,
            "-cipher",
            "ECDHE-ECDSA-AES128-CCM8",
            "-keymatexport",
            label,
            "-keymatexportlen",
            len,
            "-cert",
        ])
        .arg(&leaf)
        .arg("-key")
        .arg(&node.key_ref)
        .arg("-cert_chain")
        .arg(&rest)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drive_s_client(
        child,
        request,
        "Keying material",
        |text| request.is_none() || text.contains("}}") || text.contains("\"error\""),
        Duration::from_secs(15),
    )
}

/// Drives a running `openssl s_client`: once its output shows `ready`, writes `request` (if
/// any) to its stdin; stops when `done` says the answer is there, when s_client exits, or
/// after `limit` (then kills it: a refused DTLS handshake can leave it waiting). Returns
/// stdout (raw: a CoAP answer is binary) and stderr. stdout is read on a thread, so the answer
/// can be awaited before stdin closes (which makes s_client send close_notify and exit).
fn drive_s_client(
    mut child: std::process::Child,
    request: Option<&[u8]>,
    ready: &str,
    done: impl Fn(&str) -> bool,
    limit: Duration,
) -> (Vec<u8>, String) {
    let mut stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<Vec<u8>>();
    std::thread::spawn(move || {
        use std::io::Read;
        let mut buf = [0u8; 4096];
        while let Ok(n) = stdout.read(&mut buf) {
            if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                break;
            }
        }
    });
    let mut out = Vec::new();
    let mut stdin = child.stdin.take().unwrap();
    let until = std::time::Instant::now() + limit;
    let mut sent = false;
    while std::time::Instant::now() < until {
        if let Ok(chunk) = rx.recv_timeout(Duration::from_millis(100)) {
            out.extend_from_slice(&chunk);
        }
        let text = String::from_utf8_lossy(&out);
        if !sent && text.contains(ready) {
            if let Some(req) = request {
                use std::io::Write;
                stdin.write_all(req).unwrap();
                stdin.flush().unwrap();
            }
            sent = true;
        }
        if sent && done(&text) {
            break;
        }
        if child.try_wait().unwrap().is_some() {
            break;
        }
    }
    drop(stdin);
    let grace = std::time::Instant::now() + Duration::from_secs(2);
    while child.try_wait().unwrap().is_none() && std::time::Instant::now() < grace {
        std::thread::sleep(Duration::from_millis(50));
    }
    if child.try_wait().unwrap().is_none() {
        let _ = child.kill();
    }
    let output = child.wait_with_output().unwrap();
    while let Ok(chunk) = rx.recv_timeout(Duration::from_millis(200)) {
        out.extend_from_slice(&chunk);
    }
    (out, String::from_utf8_lossy(&output.stderr).into_owned())
}

#[test]
fn openssl_s_client_over_dtls_exports_the_same_key_and_unwraps_the_credential() {
    let fx = Fixture::new(Backend::Software);
    let run = Running::start(&fx, fx.config("allow", DTLS));
    let node = &fx.nodes["d1"];
    let request = coap_post(0x7001, br#"{"version":1}"#);
    let (raw, err) = s_client_dtls(&run, &fx, node, Some(&request));
    let out = String::from_utf8_lossy(&raw).into_owned();
    assert!(
        out.contains("Cipher is ECDHE-ECDSA-AES128-CCM8"),
        "{out}{err}"
    );
    let keymat = out
        .lines()
        .find_map(|l| l.trim().strip_prefix("Keying material: "))
        .unwrap_or_else(|| panic!("no keying material in s_client output: {out}{err}"));
    let kek = WrapKey::from_slice(&hex::decode(keymat).unwrap()).unwrap();
    // The ACK: version 1, ACK, TKL 2, 2.04, our message ID and token, Content-Format 50.
    let ack = [0x62, 0x44, 0x70, 0x01, 0xbe, 0xef, 0xc1, 50, 0xff];
    let at = raw
        .windows(ack.len())
        .position(|w| w == ack)
        .unwrap_or_else(|| panic!("no 2.04 piggybacked ACK in: {out}{err}"));
    let resp: serde_json::Value = serde_json::Deserializer::from_slice(&raw[at + ack.len()..])
        .into_iter()
        .next()
        .unwrap()
        .unwrap();
    let wrapped = base64::engine::general_purpose::STANDARD
        .decode(resp["wrapped_credential"].as_str().unwrap())
        .unwrap();
    let credential = protocol::unwrap(&kek, &wrapped).unwrap();
    let (id, stored) = run.stored(&node.identity).unwrap();
    assert_eq!(resp["credential_id"], id);
    assert_eq!(credential, stored);
}

#[test]
fn the_cli_serves_dtls_alone_and_enrols_from_a_dtls_profile() {
    let fx = Fixture::new(Backend::Software);
    let port = std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    // No top-level `listen`: TLS switched off, DTLS alone.
    let text = server_config_toml("127.0.0.1:0", &fx.in_chain, &fx.in_key, "allow")
        .replace("listen = \"127.0.0.1:0\"\n", "")
        + &format!("\n[dtls]\nlisten = \"127.0.0.1:{port}\"\n");
    let config = fx.dir.path().join("cli-dtls.toml");
    std::fs::write(&config, text).unwrap();
    let serve = Command::new(env!("CARGO_BIN_EXE_m2mpki"))
        .arg("--home")
        .arg(&fx.home)
        .args(["bootstrap", "serve", "--config"])
        .arg(&config)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let m2mpki = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_m2mpki"))
            .arg("--home")
            .arg(&fx.home)
            .args(args)
            .output()
            .unwrap()
    };
    let profile = fx.dir.path().join("dtls-profile.toml");
    let out = m2mpki(&[
        "--json",
        "bootstrap",
        "profile",
        "--set",
        sets::INFRA,
        "--fqdn",
        IN_FQDN,
        "--transport",
        "dtls",
        "--coap-port",
        &port.to_string(),
        "--dtls-suite",
        "TLS_ECDHE_ECDSA_WITH_AES_128_CCM_8",
        "--out",
        profile.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (v["transport"].as_str(), v["coap_port"].as_u64()),
        (Some("dtls"), Some(u64::from(port)))
    );
    let loaded = FieldNodeProfile::load(&profile).unwrap();
    assert_eq!(loaded.transport, Transport::Dtls);
    assert_eq!(loaded.dtls_suites, vec![DtlsSuite::Aes128Ccm8]);
    // A suite name that does not exist is bad usage.
    let bad = m2mpki(&[
        "bootstrap",
        "profile",
        "--set",
        sets::INFRA,
        "--fqdn",
        IN_FQDN,
        "--transport",
        "dtls",
        "--dtls-suite",
        "TLS_RSA_WITH_NULL_SHA",
        "--out",
        "/dev/null",
    ]);
    assert_eq!(bad.status.code(), Some(2));
    let node = &fx.nodes["n1"];
    let cred = fx.dir.path().join("n1-dtls.cred");
    let mut result = None;
    for _ in 0..100 {
        let out = m2mpki(&[
            "--json",
            "bootstrap",
            "enroll",
            "--profile",
            profile.to_str().unwrap(),
            "--cert",
            node.chain.to_str().unwrap(),
            "--key",
            &node.key_ref,
            "--out",
            cred.to_str().unwrap(),
            "--connect",
            &format!("127.0.0.1:{port}"),
            "--timeout",
            "5s",
        ]);
        if out.status.success() {
            result = Some(out);
            break;
        }
        std::thread::sleep(Duration::from_millis(100)); // the server is still starting
    }
    let out = result.expect("enrolment over DTLS through the CLI never succeeded");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["result"]["identity"], node.identity.as_str());
    let file: serde_json::Value = serde_json::from_slice(&std::fs::read(&cred).unwrap()).unwrap();
    assert_eq!(
        file["tls_version"],
        "DTLSv1_2 TLS_ECDHE_ECDSA_WITH_AES_128_CCM_8"
    );
    let secret = file["credential"].as_str().unwrap().to_owned();
    let status = Command::new("kill")
        .args(["-TERM", &serve.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let out = serve.wait_with_output().unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{log}");
    assert!(
        log.contains("DTLS, CoAP") && log.contains("bootstrap server stopped"),
        "{log}"
    );
    assert!(
        log.contains(&node.identity) && !log.contains(&secret),
        "{log}"
    );
}

/// Protocol version 2 against OpenSSL's own export: over TLS 1.3, TLS 1.2 and DTLS 1.2,
/// `s_client -keymatexport EXPORTER-oneM2M-Bootstrap -keymatexportlen 48` gives the KeID the IN
/// answers (hex of the first 16 bytes, `@`, its FQDN) and the Ke it stored (the last 32).
#[test]
fn openssl_s_client_computes_the_ts0003_ke_id_and_ke_of_the_in() {
    let fx = Fixture::new(Backend::Software);
    let run = Running::start(&fx, fx.config("allow", DTLS));
    let check = |out: &str, node: &Node, what: &str| {
        let keymat = out
            .lines()
            .find_map(|l| l.trim().strip_prefix("Keying material: "))
            .unwrap_or_else(|| panic!("{what}: no keying material: {out}"));
        let bytes = hex::decode(keymat).unwrap();
        assert_eq!(bytes.len(), 48, "{what}");
        let ke_id = format!("{}@{IN_FQDN}", hex::encode(&bytes[..16]));
        let at = out
            .find("{\"version\"")
            .unwrap_or_else(|| panic!("{what}: no response body: {out}"));
        let resp: serde_json::Value = serde_json::Deserializer::from_str(&out[at..])
            .into_iter()
            .next()
            .unwrap()
            .unwrap();
        assert_eq!(resp["version"], 2, "{what}: {resp}");
        assert_eq!(resp["ke_id"], ke_id.as_str(), "{what}: {resp}");
        assert!(resp.get("wrapped_credential").is_none(), "{what}: {resp}");
        let (id, stored) = run.stored(&node.identity).unwrap();
        assert_eq!(id, ke_id, "{what}");
        assert_eq!(&stored.expose()[..], &bytes[16..], "{what}: the IN's Ke");
    };
    for tls12 in [false, true] {
        let node = &fx.nodes["d1"];
        let (out, err) = s_client_version(&run, &fx, node, tls12, true, 2);
        check(
            &(out + &err),
            node,
            if tls12 { "TLS 1.2" } else { "TLS 1.3" },
        );
    }
    let node = &fx.nodes["n1"];
    let mut request = vec![0x42, 0x02, 0x70, 0x02, 0xbe, 0xef, 0xb9];
    request.extend_from_slice(b"bootstrap");
    request.extend_from_slice(&[0x11, 50, 0xff]);
    request.extend_from_slice(br#"{"version":2}"#);
    let (raw, err) = s_client_dtls_version(&run, &fx, node, Some(&request), 2);
    check(
        &(String::from_utf8_lossy(&raw).into_owned() + &err),
        node,
        "DTLS 1.2",
    );
}

/// `openssl s_client -noservername` (TLS, or DTLS) as `node`, sending a version 1 request:
/// stdout and stderr together.
fn s_client_without_sni(run: &Running, fx: &Fixture, node: &Node, dtls: bool) -> String {
    s_client_named(run, fx, node, if dtls { "dtls" } else { "tls" }, None)
}

/// `openssl s_client` as `node` over `path` (`tls`, `cbc`: TLS 1.2 offering only TS-0003's CBC
/// suite, `dtls`), sending `sni` (none: `-noservername`) and a version 1 request: stdout and
/// stderr together.
fn s_client_named(
    run: &Running,
    fx: &Fixture,
    node: &Node,
    path: &str,
    sni: Option<&str>,
) -> String {
    let dtls = path == "dtls";
    let (leaf, rest) = leaf_and_chain_files(fx, node, "nosni");
    let mut cmd = tool("openssl");
    cmd.arg("s_client");
    match path {
        "dtls" => cmd.args(["-dtls1_2", "-connect", &run.dtls.unwrap().to_string()]),
        "cbc" => cmd.args([
            "-tls1_2",
            "-cipher",
            "ECDHE-ECDSA-AES128-SHA256",
            "-connect",
            &run.addr.to_string(),
        ]),
        _ => cmd.args(["-connect", &run.addr.to_string()]),
    };
    match sni {
        Some(name) => cmd.args(["-servername", name]),
        None => cmd.arg("-noservername"),
    };
    cmd.arg("-cert")
        .arg(&leaf)
        .arg("-key")
        .arg(&node.key_ref)
        .arg("-cert_chain")
        .arg(&rest)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let body = r#"{"version":1}"#;
    let req = if dtls {
        let mut m = vec![0x42, 0x02, 0x70, 0x03, 0xbe, 0xef, 0xb9];
        m.extend_from_slice(b"bootstrap");
        m.extend_from_slice(&[0x11, 50, 0xff]);
        m.extend_from_slice(body.as_bytes());
        m
    } else {
        format!("POST /bootstrap HTTP/1.1\r\nHost: {IN_FQDN}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len()).into_bytes()
    };
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        std::thread::sleep(Duration::from_millis(500)); // after the handshake
        let _ = stdin.write_all(&req);
        std::thread::sleep(Duration::from_millis(1000)); // for the answer
    }
    let out = child.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

/// TS-0003 requires SNI: a hello without it is refused over TLS and DTLS, unless the IN's
/// `tls.require_sni = false`.
#[test]
fn a_hello_without_sni_is_refused_unless_allowed() {
    let fx = Fixture::new(Backend::Software);
    let node = &fx.nodes["d1"];
    {
        let run = Running::start(&fx, fx.config("allow", DTLS));
        for dtls in [false, true] {
            let out = s_client_without_sni(&run, &fx, node, dtls);
            assert!(!out.contains("wrapped_credential"), "dtls {dtls}: {out}");
            assert!(out.contains("alert"), "dtls {dtls}: {out}");
        }
        assert_eq!(run.server.credentials().count().unwrap(), 0);
    }
    let mut config = fx.config("allow", DTLS);
    config.require_sni = false;
    let run = Running::start(&fx, config);
    for dtls in [false, true] {
        let out = s_client_without_sni(&run, &fx, node, dtls);
        assert!(out.contains("wrapped_credential"), "dtls {dtls}: {out}");
    }
}

/// SNI must name the IN: `other.example` is refused with `unrecognized_name` over TLS
/// (rustls), the CBC path and DTLS, and nothing is issued; a name listed in
/// `tls.server_names` (here `localhost`, which Debian's libcoap 4.3.1 `coap-client` always
/// sends) is answered, as is the FQDN in any letter case.
#[test]
fn sni_must_name_the_in_on_every_path() {
    let fx = Fixture::new(Backend::Software);
    let node = &fx.nodes["d1"];
    let mut config = fx.config("allow", DTLS);
    config.ts0003_cbc = true;
    config.server_names.push("localhost".parse().unwrap());
    let run = Running::start(&fx, config);
    for path in ["tls", "cbc", "dtls"] {
        let out = s_client_named(&run, &fx, node, path, Some("other.example"));
        assert!(!out.contains("wrapped_credential"), "{path}: {out}");
        assert!(out.contains("unrecognized name"), "{path}: {out}");
    }
    assert_eq!(run.server.credentials().count().unwrap(), 0);
    for (path, name) in [
        ("tls", "localhost"),
        ("cbc", "localhost"),
        ("dtls", "localhost"),
        ("tls", &IN_FQDN.to_uppercase()[..]),
    ] {
        let out = s_client_named(&run, &fx, node, path, Some(name));
        assert!(out.contains("wrapped_credential"), "{path} {name}: {out}");
    }
}

/// `openssl s_client -tls1_2` offering only `ECDHE-ECDSA-AES128-SHA256` (TS-0003's mandatory
/// TLS suite) as `node`, sending a version 1 request; without the extended master secret when
/// `no_ems` (through an OpenSSL config: s_client 3.0 has no flag for it). stdout + stderr.
fn s_client_cbc(run: &Running, fx: &Fixture, node: &Node, no_ems: bool) -> String {
    let (leaf, rest) = leaf_and_chain_files(fx, node, "cbc");
    let mut cmd = tool("openssl");
    cmd.args([
        "s_client",
        "-tls1_2",
        "-cipher",
        "ECDHE-ECDSA-AES128-SHA256",
        "-connect",
        &run.addr.to_string(),
        "-servername",
        IN_FQDN,
        "-ign_eof",
        "-keymatexport",
        "EXPORTER-oneM2M-RootCredentialWrapKey",
        "-keymatexportlen",
        "32",
        "-cert",
    ])
    .arg(&leaf)
    .arg("-key")
    .arg(&node.key_ref)
    .arg("-cert_chain")
    .arg(&rest)
    .stdin(Stdio::piped())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    if no_ems {
        let conf = fx.dir.path().join("no-ems.cnf");
        std::fs::write(
            &conf,
            "openssl_conf = c\n[c]\nssl_conf = s\n[s]\nsystem_default = d\n[d]\nOptions = -ExtendedMasterSecret\n",
        )
        .unwrap();
        cmd.env("OPENSSL_CONF", conf);
    }
    let mut child = cmd.spawn().unwrap();
    let body = r#"{"version":1}"#;
    let req = format!("POST /bootstrap HTTP/1.1\r\nHost: {IN_FQDN}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len());
    {
        use std::io::Write;
        let _ = child.stdin.take().unwrap().write_all(req.as_bytes());
    }
    let out = child.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

/// `tls.ts0003_cbc`: a node offering only the CBC suite bootstraps through OpenSSL on the same
/// port (its exported key unwraps the credential the IN stored); with the option off it is
/// refused; without the extended master secret it is refused either way. Nodes that offer
/// AEAD suites still get rustls.
#[test]
fn a_cbc_only_node_bootstraps_when_ts0003_cbc_is_on() {
    let fx = Fixture::new(Backend::Software);
    let node = &fx.nodes["d1"];
    {
        let run = Running::start(&fx, fx.config("allow", ""));
        let out = s_client_cbc(&run, &fx, node, false);
        assert!(!out.contains("wrapped_credential"), "{out}");
        assert!(out.contains("alert"), "{out}");
    }
    let mut config = fx.config("allow", "");
    config.ts0003_cbc = true;
    let run = Running::start(&fx, config);
    let out = s_client_cbc(&run, &fx, node, false);
    assert!(out.contains("Cipher is ECDHE-ECDSA-AES128-SHA256"), "{out}");
    let keymat = out
        .lines()
        .find_map(|l| l.trim().strip_prefix("Keying material: "))
        .unwrap_or_else(|| panic!("no keying material: {out}"));
    let kek = WrapKey::from_slice(&hex::decode(keymat).unwrap()).unwrap();
    let at = out
        .find("{\"version\"")
        .unwrap_or_else(|| panic!("no response body: {out}"));
    let resp: serde_json::Value = serde_json::Deserializer::from_str(&out[at..])
        .into_iter()
        .next()
        .unwrap()
        .unwrap();
    let wrapped = base64::engine::general_purpose::STANDARD
        .decode(resp["wrapped_credential"].as_str().unwrap())
        .unwrap();
    let (id, stored) = run.stored(&node.identity).unwrap();
    assert_eq!(resp["credential_id"], id);
    assert_eq!(protocol::unwrap(&kek, &wrapped).unwrap(), stored);
    // Without EMS: refused, nothing issued.
    let before = run.server.credentials().count().unwrap();
    let out = s_client_cbc(&run, &fx, node, true);
    assert!(!out.contains("wrapped_credential"), "{out}");
    assert!(out.contains("handshake failure"), "{out}");
    assert_eq!(run.server.credentials().count().unwrap(), before);
    // Our client (AEAD suites) still goes to rustls.
    let got = run
        .enroll(&fx.profile(IN_FQDN, sets::INFRA), &fx.nodes["n1"], BOTH[1])
        .unwrap();
    assert_eq!(got.tls_version, "TLSv1_2");
}

/// TS-0003 asks for P-256 with SHA-256: by default the IN refuses a field node whose chain uses
/// another algorithm (here a P-384 device key), over TLS and DTLS; `trust.algorithms` admits it.
#[test]
fn the_in_admits_p256_sha256_by_default_and_other_algorithms_by_config() {
    let fx = Fixture::new(Backend::Software);
    let p384 = {
        let home = m2mpki_ca::Home::open(&fx.home).unwrap();
        let lab = LabPki {
            store: home.store().unwrap(),
            home,
            cas: vec![],
        };
        let mut key = SoftwareKey::generate(KeyType::P384).unwrap();
        let chain = lab
            .issue_for(
                &fx.keystore,
                names::MFR_CA,
                LeafSubject::Device("D-P384".parse().unwrap()),
                &key,
                None,
            )
            .unwrap();
        let path = fx.dir.path().join("p384.pem");
        write_chain(&path, &chain).unwrap();
        let kp = fx.dir.path().join("p384.key.pem");
        key.save(&kp, None, m2mpki_hsm::files::Overwrite::Replace)
            .unwrap();
        Node {
            chain: path,
            key: fx.keystore.open(&KeyRef::File(kp.clone())).unwrap(),
            key_ref: kp.display().to_string(),
            identity: format!("device:{HW_TYPE}:D-P384"),
        }
    };
    let profile = fx.profile(IN_FQDN, sets::INFRA);
    {
        let run = Running::start(&fx, fx.config("allow", DTLS));
        for versions in BOTH {
            assert!(matches!(
                run.enroll(&profile, &p384, versions),
                Err(BError::Handshake { .. })
            ));
        }
        assert!(matches!(
            run.enroll_dtls(&profile, &p384, DtlsSuite::Aes128Ccm8),
            Err(BError::Handshake { .. })
        ));
        assert!(run.stored(&p384.identity).is_none());
        // The P-256 devices of the same CA are admitted.
        run.enroll(&profile, &fx.nodes["d1"], BOTH[0]).unwrap();
    }
    let text = server_config_toml("127.0.0.1:0", &fx.in_chain, &fx.in_key, "allow").replace(
        "[trust]",
        "[trust]\nalgorithms = [\"ecdsa-p256-sha256\", \"ecdsa-p384-sha384\"]",
    ) + DTLS;
    let path = fx.dir.path().join("p384-serve.toml");
    std::fs::write(&path, text).unwrap();
    let run = Running::start(&fx, ServerConfig::load(&path).unwrap());
    let got = run.enroll(&profile, &p384, BOTH[0]).unwrap();
    assert_eq!(got.identity.to_string(), p384.identity);
    run.enroll_dtls(&profile, &p384, DtlsSuite::Aes128Ccm8)
        .unwrap();
}

/// The lab enterprise's CAs carry URI name constraints (its domain and subdomains). A node
/// certificate signed with the enterprise CA's key whose URIs leave that domain gets no
/// credential, over TLS 1.3 and 1.2; the same forgery inside the domain bootstraps (so it is
/// the constraint that refuses, not the forging).
#[test]
fn the_in_holds_node_certificates_to_their_enterprise_uri_constraints() {
    let fx = Fixture::new(Backend::Software);
    let forged = |uris: &[&str], name: &str, id: &str| {
        let (chain, kp) =
            m2mpki_test_pki::forge_node(&fx.home, names::ENT_CA, uris, fx.dir.path(), name)
                .unwrap();
        Node {
            chain,
            key: fx.keystore.open(&KeyRef::File(kp.clone())).unwrap(),
            key_ref: kp.display().to_string(),
            identity: format!("node:{ENTERPRISE}:{id}"),
        }
    };
    let inside = forged(&["onem2m-node://acme.example/URI-IN"], "uri-in", "URI-IN");
    let outside = forged(
        &[
            "onem2m-node://acme.example/URI-OUT",
            "https://evil.example/",
        ],
        "uri-out",
        "URI-OUT",
    );
    let run = Running::start(&fx, fx.config("allow", ""));
    let profile = fx.profile(IN_FQDN, sets::INFRA);
    for versions in BOTH {
        assert_handshake_refused(
            run.enroll(&profile, &outside, versions),
            "CertificateUnknown",
        );
    }
    assert!(run.stored(&outside.identity).is_none());
    let got = run.enroll(&profile, &inside, BOTH[0]).unwrap();
    assert_eq!(got.identity.to_string(), inside.identity);
    assert!(run.stored(&inside.identity).is_some());
}

/// `openssl s_client` over TLS 1.2 with a pre-shared key: sends `request`, returns what came
/// back (stdout) and s_client's diagnostics (stderr).
fn psk_client(
    addr: SocketAddr,
    identity: &str,
    key: &[u8],
    cipher: &str,
    request: &str,
) -> (String, String) {
    psk_client_named(addr, IN_FQDN, identity, key, cipher, request)
}

/// [`psk_client`] sending `sni` as the server name.
fn psk_client_named(
    addr: SocketAddr,
    sni: &str,
    identity: &str,
    key: &[u8],
    cipher: &str,
    request: &str,
) -> (String, String) {
    let mut child = tool("openssl")
        .args([
            "s_client",
            "-connect",
            &addr.to_string(),
            "-servername",
            sni,
            "-tls1_2",
            "-quiet",
            "-psk_identity",
            identity,
            "-psk",
            &hex::encode(key),
            "-cipher",
            cipher,
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(request.as_bytes()).unwrap();
    }
    let out = child.wait_with_output().unwrap();
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A one-request HTTP service standing in for the IN-CSE behind the IN: it answers each
/// request with the request head it received, so a test sees what the IN forwarded.
fn echo_upstream() -> (SocketAddr, std::thread::JoinHandle<()>) {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let h = std::thread::spawn(move || {
        use std::io::{Read, Write};
        for conn in l.incoming().take(1) {
            let mut c = conn.unwrap();
            let mut buf = Vec::new();
            let mut chunk = [0u8; 4096];
            while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = c.read(&mut chunk).unwrap();
                if n == 0 {
                    break;
                }
                buf.extend_from_slice(&chunk[..n]);
            }
            let body = String::from_utf8_lossy(&buf).into_owned();
            write!(
                c,
                "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            )
            .unwrap();
        }
    });
    (addr, h)
}

/// A WSGI application (Python's wsgiref, as many IN-CSE prototypes are served) that answers
/// one request with its environ's HTTP_* variables: CGI and WSGI fold `-` and `_` in header
/// names, so it sees what such an upstream would take for the IN's headers.
fn wsgi_upstream() -> (SocketAddr, std::process::Child) {
    let script = r#"
import json, sys
from wsgiref.simple_server import make_server, WSGIRequestHandler
class Quiet(WSGIRequestHandler):
    def log_message(self, *a): pass
def app(environ, start):
    seen = {k: v for k, v in environ.items() if k.startswith("HTTP_")}
    seen["REQUEST_METHOD"] = environ["REQUEST_METHOD"]
    body = json.dumps(seen).encode()
    start("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    return [body]
srv = make_server("127.0.0.1", 0, app, handler_class=Quiet)
print(srv.server_port, flush=True)
srv.handle_request()
"#;
    let mut child = tool("python3")
        .args(["-c", script])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.as_mut().unwrap()),
        &mut line,
    )
    .unwrap();
    let port: u16 = line.trim().parse().unwrap();
    (SocketAddr::from(([127, 0, 0, 1], port)), child)
}

/// An upstream that accepts connections and then closes them at once, or (`hold`) keeps them
/// without a word.
fn bad_upstream(hold: bool) -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for conn in l.incoming() {
            let Ok(c) = conn else { return };
            if hold {
                held.push(c);
            }
        }
    });
    addr
}

/// The PSK forwarder as a reverse proxy should be: no header the node sends reaches a WSGI
/// upstream as one of the IN's (underscore and case variants included), `Forwarded` and
/// `X-Real-IP` are the IN's, headers named in `Connection` stay on this hop; a non-origin
/// target is 400; an upstream that closes is 502 and a silent one 504; and a KeID or credential
/// ID in upper case (as `openssl s_client -keymatexport` prints it) associates.
#[test]
fn the_psk_forwarder_passes_nothing_an_upstream_could_take_for_the_ins_headers() {
    let fx = Fixture::new(Backend::Software);
    let profile = fx.profile(IN_FQDN, sets::INFRA);
    let d1 = &fx.nodes["d1"];
    let (upstream, mut wsgi) = wsgi_upstream();
    let extra = format!("\n[psk]\nlisten = \"127.0.0.1:0\"\nupstream = \"{upstream}\"\n");
    let run = Running::start(&fx, fx.config("allow", &extra));
    let psk = run.psk.unwrap();
    let node = run.enroll(&profile, d1, BOTH[0]).unwrap();
    let id = node.credential_id.clone();
    let key = *node.credential.expose();
    let cipher = "ECDHE-PSK-AES128-CBC-SHA256";
    let forged = "device:1.3.6.1.4.1.99999.1:VICTIM";
    let request = format!(
        "GET /~/in-cse HTTP/1.1\r\nhost: {IN_FQDN}\r\n\
         X_M2mpki_Identity: {forged}\r\nX-M2mpki_Identity: {forged}\r\nx-m2mpki-identity: {forged}\r\n\
         X_M2mpki_Credential_Id: 00000000000000000000000000000000\r\n\
         Forwarded: for=6.6.6.6\r\nX-Real-IP: 6.6.6.6\r\nX_Forwarded_For: 6.6.6.6\r\n\
         Connection: close, X-Hop\r\nX-Hop: only-this-hop\r\nX-Kept: yes\r\n\r\n"
    );
    let (out, err) = psk_client(psk, &id, &key, cipher, &request);
    wsgi.wait().unwrap();
    assert!(out.contains(" 200 OK"), "{out}\n{err}");
    let seen: serde_json::Value =
        serde_json::from_str(out.split("\r\n\r\n").nth(1).unwrap()).unwrap();
    assert_eq!(
        seen["HTTP_X_M2MPKI_IDENTITY"],
        d1.identity.as_str(),
        "{seen}"
    );
    assert_eq!(seen["HTTP_X_M2MPKI_CREDENTIAL_ID"], id.as_str(), "{seen}");
    assert_eq!(seen["HTTP_X_FORWARDED_FOR"], "127.0.0.1", "{seen}");
    assert_eq!(seen["HTTP_X_REAL_IP"], "127.0.0.1", "{seen}");
    assert_eq!(seen["HTTP_FORWARDED"], "for=127.0.0.1", "{seen}");
    assert_eq!(seen["HTTP_X_KEPT"], "yes", "{seen}");
    assert!(seen.get("HTTP_X_HOP").is_none(), "{seen}");
    assert!(!seen.to_string().contains("VICTIM"), "{seen}");
    assert!(!seen.to_string().contains("6.6.6.6"), "{seen}");

    // Targets other than origin-form are refused.
    for line in [
        format!("CONNECT {IN_FQDN}:443 HTTP/1.1"),
        format!("GET http://{IN_FQDN}/~/in-cse HTTP/1.1"),
        "OPTIONS * HTTP/1.1".to_owned(),
    ] {
        let req = format!("{line}\r\nhost: {IN_FQDN}\r\n\r\n");
        let (out, err) = psk_client(psk, &id, &key, cipher, &req);
        assert!(out.contains("HTTP/1.1 400"), "{line}: {out}\n{err}");
    }
    // Upper case: the hex of the ID (and for a KeID, the FQDN too) as s_client prints it.
    let ask = format!(
        "GET {} HTTP/1.1\r\nhost: {IN_FQDN}\r\n\r\n",
        m2mpki_bootstrap::psk::ASSOCIATION_PATH
    );
    let (out, err) = psk_client(psk, &id.to_uppercase(), &key, cipher, &ask);
    assert!(out.contains("HTTP/1.1 200"), "{out}\n{err}");
    assert!(
        out.contains(&id),
        "the IN names the ID in lower case: {out}"
    );
    drop(run);

    // An upstream that closes at once (502), and one that never answers (504 after 1 s).
    for (hold, status, code) in [
        (false, "502", "upstream_closed"),
        (true, "504", "upstream_timeout"),
    ] {
        let upstream = bad_upstream(hold);
        let extra = format!(
            "\n[psk]\nlisten = \"127.0.0.1:0\"\nupstream = \"{upstream}\"\nupstream_timeout = \"1s\"\n"
        );
        let run = Running::start(&fx, fx.config("allow", &extra));
        let req = format!("GET /~/in-cse HTTP/1.1\r\nhost: {IN_FQDN}\r\n\r\n");
        let (out, err) = psk_client(run.psk.unwrap(), &id, &key, cipher, &req);
        assert!(
            out.contains(&format!("HTTP/1.1 {status}")) && out.contains(code),
            "{out}\n{err}"
        );
        // The error document of docs/protocol.md §5, as over TLS and DTLS.
        let doc: serde_json::Value =
            serde_json::from_str(out.split("\r\n\r\n").nth(1).unwrap_or_default()).unwrap();
        assert_eq!(doc["error"]["code"], code, "{doc}");
        assert!(doc["error"]["message"].is_string(), "{doc}");
    }
}

/// TS-0003's pre-shared-key association with the credential the bootstrap provisioned, as a
/// node built to the standard would make it (`openssl s_client -psk`): the IN looks the key up
/// by credential ID (version 1) or KeID (version 2), names the node it authenticated, and
/// forwards other requests to the service behind it with that identity in a header a node
/// cannot forge. A wrong key, an unknown identity and a superseded credential get nothing.
#[test]
fn the_provisioned_credential_establishes_a_psk_association() {
    let fx = Fixture::new(Backend::Software);
    let (upstream, echo) = echo_upstream();
    let extra = format!("\n[psk]\nlisten = \"127.0.0.1:0\"\nupstream = \"{upstream}\"\n");
    let run = Running::start(&fx, fx.config("allow", &extra));
    let psk = run.psk.unwrap();
    let profile = fx.profile(IN_FQDN, sets::INFRA);
    let d1 = &fx.nodes["d1"];
    let first = run.enroll(&profile, d1, BOTH[0]).unwrap();
    let ask = format!(
        "GET {} HTTP/1.1\r\nhost: {IN_FQDN}\r\nconnection: close\r\n\r\n",
        m2mpki_bootstrap::psk::ASSOCIATION_PATH
    );
    // ECDHE-PSK (what s_client prefers) and the constrained nodes' PSK-AES128-CCM8.
    for cipher in ["ECDHE-PSK-AES128-CBC-SHA256", "PSK-AES128-CCM8"] {
        let (out, err) = psk_client(
            psk,
            &first.credential_id,
            first.credential.expose(),
            cipher,
            &ask,
        );
        assert!(out.contains("HTTP/1.1 200"), "{cipher}: {out}\n{err}");
        let body: serde_json::Value =
            serde_json::from_str(out.split("\r\n\r\n").nth(1).unwrap()).unwrap();
        assert_eq!(body["identity"], d1.identity, "{cipher}");
        assert_eq!(body["credential_id"], first.credential_id.as_str());
    }
    // Our own client agrees.
    let ours = m2mpki_bootstrap::psk::associate(&m2mpki_bootstrap::psk::AssociateRequest {
        credential_id: first.credential_id.clone(),
        credential: first.credential.clone(),
        in_fqdn: IN_FQDN.into(),
        connect: psk,
        timeout: Duration::from_secs(10),
    })
    .unwrap();
    assert_eq!(ours.association.identity, d1.identity);
    // Forwarded to the service behind, with the identity the IN authenticated; a header the
    // node sends under the same name does not get through.
    let (out, err) = psk_client(
        psk,
        &first.credential_id,
        first.credential.expose(),
        "ECDHE-PSK-AES128-CBC-SHA256",
        &format!("GET /~/in-cse HTTP/1.1\r\nhost: {IN_FQDN}\r\nX-M2mpki-Identity: device:forged:X\r\nconnection: close\r\n\r\n"),
    );
    assert!(out.contains("HTTP/1.1 200"), "{out}\n{err}");
    assert!(out.contains("GET /~/in-cse HTTP/1.1"), "{out}");
    assert!(
        out.contains(&format!("X-M2mpki-Identity: {}", d1.identity)),
        "{out}"
    );
    assert!(!out.contains("forged"), "{out}");
    assert!(
        out.contains(&format!("X-M2mpki-Credential-Id: {}", first.credential_id)),
        "{out}"
    );
    // A wrong key, and an identity the IN never issued: no answer.
    let mut wrong = *first.credential.expose();
    wrong[0] ^= 1;
    let (out, _) = psk_client(
        psk,
        &first.credential_id,
        &wrong,
        "ECDHE-PSK-AES128-CBC-SHA256",
        &ask,
    );
    assert!(!out.contains("HTTP/1.1"), "{out}");
    let (out, _) = psk_client(
        psk,
        "00112233445566778899aabbccddeeff",
        first.credential.expose(),
        "ECDHE-PSK-AES128-CBC-SHA256",
        &ask,
    );
    assert!(!out.contains("HTTP/1.1"), "{out}");
    // A second bootstrap supersedes the first credential: it no longer associates.
    let second = run.enroll(&profile, d1, BOTH[1]).unwrap();
    let (out, _) = psk_client(
        psk,
        &first.credential_id,
        first.credential.expose(),
        "ECDHE-PSK-AES128-CBC-SHA256",
        &ask,
    );
    assert!(
        !out.contains("HTTP/1.1"),
        "superseded credential accepted: {out}"
    );
    let (out, err) = psk_client(
        psk,
        &second.credential_id,
        second.credential.expose(),
        "ECDHE-PSK-AES128-CBC-SHA256",
        &ask,
    );
    assert!(out.contains(&second.credential_id), "{out}\n{err}");
    // Version 2 (TS-0003): the KeID is the PSK identity and Ke the key.
    let mut v2 = profile.clone();
    v2.protocol_version = 2;
    let n1 = &fx.nodes["n1"];
    let ts = run.enroll(&v2, n1, BOTH[0]).unwrap();
    let ke_id = ts.ke_id.clone().unwrap();
    assert_eq!(ts.credential_id, ke_id);
    let (out, err) = psk_client(psk, &ke_id, ts.credential.expose(), "PSK-AES128-CCM8", &ask);
    assert!(
        out.contains(&format!("\"identity\":\"{}\"", n1.identity)),
        "{out}\n{err}"
    );
    drop(run);
    echo.join().unwrap();
}

/// `pkcs11-tool --list-objects` of the token `label` (logged in), run as its own process on this
/// test process's SoftHSM2 config.
fn token_objects(hsm: &m2mpki_test_pki::softhsm::SoftHsm, label: &str, pin: &str) -> String {
    let out = tool("pkcs11-tool")
        .env("SOFTHSM2_CONF", &hsm.conf)
        .arg("--module")
        .arg(&hsm.module)
        .args([
            "--token-label",
            label,
            "--login",
            "--pin",
            pin,
            "--list-objects",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The `Access:` flags pkcs11-tool prints for the object labelled `object`.
fn access_of(listing: &str, object: &str) -> Vec<String> {
    let block = listing
        .split("Secret Key Object")
        .find(|b| b.contains(&format!("label:      {object}\n")))
        .unwrap_or_else(|| panic!("no secret key `{object}` in:\n{listing}"));
    block
        .lines()
        .find_map(|l| l.trim().strip_prefix("Access:"))
        .unwrap_or("")
        .split(',')
        .map(|s| s.trim().to_owned())
        .collect()
}

/// TS-0003 keeps long-term keys in a secure environment: the node's credential goes from the
/// IN's answer into its PKCS#11 token by C_UnwrapKey (CKM_AES_KEY_WRAP), never in host memory
/// in the clear. The object is sensitive and not extractable, and an HMAC computed with it on
/// the token equals one computed with the IN's record; a wrong wrap key fails the unwrap and
/// leaves nothing on the token. Version 2's Ke is stored the same way; the CLI writes the
/// object's URI instead of the key.
#[test]
fn the_credential_is_unwrapped_into_the_nodes_token() {
    m2mpki_test_pki::softhsm::isolated(
        concat!(
            module_path!(),
            "::the_credential_is_unwrapped_into_the_nodes_token"
        ),
        credential_on_token,
    );
}

fn credential_on_token() {
    use m2mpki_bootstrap::client::Provisioned;
    let fx = Fixture::new(Backend::Software);
    let run = Running::start(&fx, fx.config("allow", ""));
    let hsm = process_softhsm().unwrap();
    let label = format!("node-{}", std::process::id());
    hsm.init_token(&label, "3333", "4444").unwrap();
    let pin = fx.dir.path().join("node-pin");
    std::fs::write(&pin, "3333\n").unwrap();
    let uri = |object: &str| -> Pkcs11Uri {
        format!(
            "pkcs11:token={label};object={object}?module-path={}&pin-source={}",
            hsm.module.display(),
            pin.display()
        )
        .parse()
        .unwrap()
    };
    let cfg = Pkcs11Config::default();
    let profile = fx.profile(IN_FQDN, sets::INFRA);
    let d1 = &fx.nodes["d1"];
    let enrolment = |profile: &FieldNodeProfile, node: &Node| Enrolment {
        profile: profile.clone(),
        chain: m2mpki_bootstrap::tls::load_chain(&node.chain).unwrap(),
        key: node.key.clone(),
        connect: Some(run.addr.to_string()),
        versions: vec![],
        timeout: Duration::from_secs(20),
    };
    let got = run
        .rt
        .block_on(client::enroll_provisioned(enrolment(&profile, d1)))
        .unwrap();
    let Provisioned::Wrapped { wrap_key, wrapped } = &got.credential else {
        panic!("version 1 provisions a wrapped credential");
    };
    // A wrong wrap key: the unwrap's integrity check fails and nothing is created.
    let mut wrong = *wrap_key.expose();
    wrong[0] ^= 1;
    let err = m2mpki_hsm::pkcs11::unwrap_credential(&uri("wrong"), &cfg, &wrong, wrapped)
        .unwrap_err()
        .to_string();
    assert!(err.contains("C_UnwrapKey"), "{err}");
    assert!(!token_objects(hsm, &label, "3333").contains("wrong"));
    // The right one.
    let object =
        m2mpki_hsm::pkcs11::unwrap_credential(&uri("cred-v1"), &cfg, wrap_key.expose(), wrapped)
            .unwrap();
    let access = access_of(&token_objects(hsm, &label, "3333"), "cred-v1");
    assert!(access.contains(&"sensitive".to_owned()), "{access:?}");
    assert!(!access.contains(&"extractable".to_owned()), "{access:?}");
    let (_, record) = run.stored(&d1.identity).unwrap();
    let hmac = |key: &[u8], msg: &[u8]| {
        aws_lc_rs::hmac::sign(
            &aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, key),
            msg,
        )
        .as_ref()
        .to_vec()
    };
    let msg = b"m2mpki: the same key on both sides";
    assert_eq!(
        m2mpki_hsm::pkcs11::credential_hmac(&object, &cfg, msg).unwrap(),
        hmac(record.expose(), msg),
        "the token's credential differs from the IN's record"
    );
    // Version 2: Ke, stored as a token object too.
    let mut v2 = profile.clone();
    v2.protocol_version = 2;
    let n1 = &fx.nodes["n1"];
    let got = run
        .rt
        .block_on(client::enroll_provisioned(enrolment(&v2, n1)))
        .unwrap();
    let Provisioned::Ke(ke) = &got.credential else {
        panic!("version 2 provisions Ke");
    };
    let object = m2mpki_hsm::pkcs11::import_credential(&uri("cred-v2"), &cfg, ke.expose()).unwrap();
    let (_, record) = run.stored(&n1.identity).unwrap();
    assert_eq!(
        m2mpki_hsm::pkcs11::credential_hmac(&object, &cfg, msg).unwrap(),
        hmac(record.expose(), msg)
    );
    // The CLI: the file names the object and holds no key; `associate` says why it cannot.
    let out_file = fx.dir.path().join("d1-token.cred");
    let profile_file = fx.dir.path().join("token-profile.toml");
    let m2mpki = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_m2mpki"))
            .arg("--home")
            .arg(&fx.home)
            .env("SOFTHSM2_CONF", &hsm.conf)
            .args(args)
            .output()
            .unwrap()
    };
    let out = m2mpki(&[
        "bootstrap",
        "profile",
        "--set",
        sets::INFRA,
        "--fqdn",
        IN_FQDN,
        "--port",
        &run.addr.port().to_string(),
        "--out",
        profile_file.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cli_uri = uri("cred-cli").to_string();
    let out = m2mpki(&[
        "--json",
        "bootstrap",
        "enroll",
        "--profile",
        profile_file.to_str().unwrap(),
        "--cert",
        d1.chain.to_str().unwrap(),
        "--key",
        &d1.key_ref,
        "--out",
        out_file.to_str().unwrap(),
        "--credential-out",
        &cli_uri,
        "--connect",
        &run.addr.to_string(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let file: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&out_file).unwrap()).unwrap();
    assert!(file.get("credential").is_none(), "{file}");
    let object: Pkcs11Uri = file["credential_object"].as_str().unwrap().parse().unwrap();
    assert_eq!(object.object.as_deref(), Some("cred-cli"));
    let (_, record) = run.stored(&d1.identity).unwrap();
    assert_eq!(
        m2mpki_hsm::pkcs11::credential_hmac(&object, &cfg, msg).unwrap(),
        hmac(record.expose(), msg)
    );
    let out = m2mpki(&[
        "bootstrap",
        "associate",
        "--credential",
        out_file.to_str().unwrap(),
        "--connect",
        "127.0.0.1:9",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("lives on a token"));
}

/// `openssl s_client -dtls1_2 -psk` with `cipher`: sends `request` (a CoAP message) once the
/// handshake is done and returns what came back (raw) and s_client's diagnostics.
fn psk_client_dtls(
    addr: SocketAddr,
    identity: &str,
    key: &[u8],
    cipher: &str,
    request: &[u8],
) -> (Vec<u8>, String) {
    psk_client_dtls_named(addr, IN_FQDN, identity, key, cipher, request)
}

/// [`psk_client_dtls`] sending `sni` as the server name.
fn psk_client_dtls_named(
    addr: SocketAddr,
    sni: &str,
    identity: &str,
    key: &[u8],
    cipher: &str,
    request: &[u8],
) -> (Vec<u8>, String) {
    let child = tool("openssl")
        .args([
            "s_client",
            "-dtls1_2",
            "-connect",
            &addr.to_string(),
            "-servername",
            sni,
            "-psk_identity",
            identity,
            "-psk",
            &hex::encode(key),
            "-cipher",
            cipher,
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drive_s_client(
        child,
        Some(request),
        "Cipher is",
        |text| text.contains("\"expires\"") || text.contains("\"error\""),
        Duration::from_secs(10),
    )
}

/// The association over DTLS 1.2 with TS-0003's `TLS_PSK_WITH_AES_128_CCM_8`, for constrained
/// nodes: a confirmable CoAP `GET /.well-known/m2mpki/association` is answered with an ACK
/// 2.05 carrying the identity the IN authenticated by the credential; a wrong key gets no
/// session but a `bad_record_mac` alert once its Finished has failed twice (not silence until
/// the handshake deadline), and a server name other than the IN's gets `unrecognized_name`.
#[test]
fn the_association_runs_over_dtls_with_psk_ccm8() {
    use m2mpki_bootstrap::coap::{self, option, Message, Type};
    let fx = Fixture::new(Backend::Software);
    let extra = "\n[psk]\nlisten = \"127.0.0.1:0\"\ndtls_listen = \"127.0.0.1:0\"\n";
    let run = Running::start(&fx, fx.config("allow", extra));
    let addr = run.psk_dtls.unwrap();
    let profile = fx.profile(IN_FQDN, sets::INFRA);
    let d1 = &fx.nodes["d1"];
    let got = run.enroll(&profile, d1, BOTH[0]).unwrap();
    let get = Message {
        kind: Type::Con,
        code: 1,
        message_id: 0x2a,
        token: vec![7],
        options: [".well-known", "m2mpki", "association"]
            .iter()
            .map(|s| (option::URI_PATH, s.as_bytes().to_vec()))
            .collect(),
        payload: vec![],
    }
    .encode();
    let (out, err) = psk_client_dtls(
        addr,
        &got.credential_id,
        got.credential.expose(),
        "PSK-AES128-CCM8",
        &get,
    );
    let text = String::from_utf8_lossy(&out);
    assert!(text.contains("Cipher is PSK-AES128-CCM8"), "{text}\n{err}");
    let start = text
        .find("{\"identity\"")
        .unwrap_or_else(|| panic!("{text}\n{err}"));
    let end = start + text[start..].find('}').unwrap() + 1;
    let body: serde_json::Value = serde_json::from_str(&text[start..end]).unwrap();
    assert_eq!(body["identity"], d1.identity.as_str());
    assert_eq!(body["credential_id"], got.credential_id.as_str());
    // The answer is a piggybacked ACK 2.05 for our message ID.
    let reply = out
        .windows(4)
        .position(|w| w[0] >> 4 == 0x6 && w[1] == coap::code(2, 5) && w[2..4] == [0x00, 0x2a]);
    assert!(reply.is_some(), "no ACK 2.05 for message 0x2a: {text}");
    // A wrong key: no session, no answer.
    let mut wrong = *got.credential.expose();
    wrong[5] ^= 0x80;
    let (out, err) = psk_client_dtls(addr, &got.credential_id, &wrong, "PSK-AES128-CCM8", &get);
    let text = String::from_utf8_lossy(&out);
    assert!(!text.contains("{\"identity\""), "{text}");
    // (s_client prints the negotiated suite when a handshake ends in an alert, too.)
    assert!(err.contains("bad record mac"), "{text}\n{err}");
    // SNI, when sent, must name the IN (as on the certificate paths).
    let (out, err) = psk_client_dtls_named(
        addr,
        "other.example",
        &got.credential_id,
        got.credential.expose(),
        "PSK-AES128-CCM8",
        &get,
    );
    let text = String::from_utf8_lossy(&out);
    assert!(!text.contains("{\"identity\""), "{text}");
    assert!(err.contains("unrecognized name"), "{text}\n{err}");
    let (out, err) = psk_client_named(
        run.psk.unwrap(),
        "other.example",
        &got.credential_id,
        got.credential.expose(),
        "ECDHE-PSK-AES128-CBC-SHA256",
        "GET / HTTP/1.1\r\n\r\n",
    );
    assert!(err.contains("unrecognized name"), "{out}\n{err}");
}

/// `[limits] enrolments_per_identity`: the second enrolment of one identity within the hour is
/// refused with HTTP 429 and `Retry-After` over TLS, and with CoAP 4.29 and `Max-Age` over DTLS
/// (RFC 8516); the refused attempts record nothing, and another identity from the same address
/// still enrols.
#[test]
fn a_node_that_re_enrols_too_often_gets_429_and_4_29_with_when_to_retry() {
    let fx = Fixture::new(Backend::Software);
    let extra = format!("enrolments_per_identity = \"1/1h\"\n{DTLS}");
    let run = Running::start(&fx, fx.config("allow", &extra));
    let node = &fx.nodes["d1"];
    let (first, err) = s_client(&run, &fx, node, false, true);
    assert!(first.contains("HTTP/1.1 200"), "{first}{err}");
    let (credential_id, _) = run.stored(&node.identity).unwrap();

    let (second, err) = s_client(&run, &fx, node, false, true);
    assert!(second.contains("HTTP/1.1 429"), "{second}{err}");
    assert!(second.contains("\"rate_limited\""), "{second}");
    let retry: u32 = second
        .lines()
        .find_map(|l| {
            let l = l.trim().to_ascii_lowercase();
            l.strip_prefix("retry-after:")
                .map(|v| v.trim().parse().unwrap())
        })
        .unwrap_or_else(|| panic!("no Retry-After in: {second}"));
    assert!((3500..=3600).contains(&retry), "{retry}");

    let request = coap_post(0x7002, br#"{"version":1}"#);
    let (raw, err) = s_client_dtls(&run, &fx, node, Some(&request));
    // ACK, TKL 2, 4.29 (0x9d), our message ID and token, Content-Format 50, then Max-Age
    // (delta 2, two bytes).
    let head = [0x62, 0x9d, 0x70, 0x02, 0xbe, 0xef, 0xc1, 50, 0x22];
    let at = raw
        .windows(head.len())
        .position(|w| w == head)
        .unwrap_or_else(|| {
            panic!(
                "no 4.29 ACK with Max-Age in: {}{err}",
                String::from_utf8_lossy(&raw)
            )
        });
    let max_age = u16::from_be_bytes([raw[at + head.len()], raw[at + head.len() + 1]]);
    assert!((3500..=3600).contains(&max_age), "{max_age}");

    // Nothing new was recorded for the refused attempts.
    assert_eq!(run.stored(&node.identity).unwrap().0, credential_id);
    // Another identity, same address: enrols.
    let (other, err) = s_client(&run, &fx, &fx.nodes["n1"], false, true);
    assert!(other.contains("HTTP/1.1 200"), "{other}{err}");
}
