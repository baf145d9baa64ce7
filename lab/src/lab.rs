//! `m2mpki lab`: a complete lab PKI in a folder, and the end-to-end bootstrap demo.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use m2mpki_bootstrap::client::{self, Enrolment};
use m2mpki_bootstrap::config::{DtlsSuite, FieldNodeProfile, ServerConfig, TlsVersion, Transport};
use m2mpki_bootstrap::server::Server;
use m2mpki_ca::{FieldNodeIdentity, Home, LeafSubject, Store};
use m2mpki_hsm::pkcs11::{Pkcs11Config, Pkcs11Uri};
use m2mpki_hsm::{KeyRef, KeyType, Keystore};
use serde::Serialize;

use crate::softhsm::SoftHsm;
use crate::{
    names, server_config_toml, sets, write_chain, KeyBackend, LabPki, LabSpec, ENTERPRISE, IN_FQDN,
    ROGUE_CA,
};

/// Where a lab keeps its CA keys.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LabHsm {
    /// Software keys in the home folder.
    None,
    /// A fresh SoftHSM2 token inside the lab folder.
    SoftHsm,
}

/// What `lab init` made.
#[derive(Debug, Clone, Serialize)]
pub struct LabLayout {
    /// The lab folder.
    pub dir: PathBuf,
    /// The home folder (CAs, root sets, IN credential store).
    pub home: PathBuf,
    /// The IN server certificate chain.
    pub in_chain: PathBuf,
    /// The IN key (a file, or a pkcs11: URI).
    pub in_key: String,
    /// The `bootstrap serve` config.
    pub serve_config: PathBuf,
    /// The field-node bootstrap profile.
    pub profile: PathBuf,
    /// The IN's FQDN.
    pub in_fqdn: String,
    /// The port in the profile and config.
    pub port: u16,
    /// Field nodes: name, chain, key, identity, trusted.
    pub nodes: Vec<LabNode>,
    /// The SoftHSM2 config to export as SOFTHSM2_CONF, when the lab uses a token.
    pub softhsm_conf: Option<PathBuf>,
    /// CA names.
    pub cas: Vec<String>,
}

/// A field node of the lab.
#[derive(Debug, Clone, Serialize)]
pub struct LabNode {
    /// Short name.
    pub name: String,
    /// Certificate chain.
    pub chain: PathBuf,
    /// Key file.
    pub key: PathBuf,
    /// Its identity.
    pub identity: FieldNodeIdentity,
    /// Whether the IN trusts its issuer.
    pub trusted: bool,
}

const LAB_PIN: &str = "lab-user-pin";

/// Builds a lab in `dir` (which must be empty or absent). With `LabHsm::SoftHsm` the CA keys and
/// the IN's TLS key are generated on a new SoftHSM2 token under `dir/softhsm`; call before any
/// PKCS#11 module is loaded in this process.
pub fn init(dir: &Path, hsm: LabHsm, port: u16) -> Result<LabLayout> {
    if dir.exists()
        && std::fs::read_dir(dir)
            .map(|mut d| d.next().is_some())
            .unwrap_or(true)
    {
        bail!(
            "{} exists and is not empty; choose a new folder",
            dir.display()
        );
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let dir = dir.canonicalize()?;
    let home = dir.join("home");
    let (spec, keystore, token, softhsm_conf) = match hsm {
        LabHsm::None => (LabSpec::default(), Keystore::default(), None, None),
        LabHsm::SoftHsm => {
            let h = SoftHsm::create(&dir.join("softhsm"))?;
            h.use_in_this_process();
            h.init_token("m2mpki-lab", LAB_PIN, "lab-so-pin")?;
            let pin = dir.join("softhsm").join("pin");
            m2mpki_hsm::files::write_atomic(
                &pin,
                format!("{LAB_PIN}\n").as_bytes(),
                m2mpki_hsm::files::WriteOptions {
                    mode: m2mpki_hsm::files::Mode::Secret,
                    overwrite: m2mpki_hsm::files::Overwrite::Refuse,
                    sync: true,
                },
            )?;
            let uri: Pkcs11Uri = format!(
                "pkcs11:token=m2mpki-lab?module-path={}&pin-source={}",
                h.module.display(),
                pin.display()
            )
            .parse()?;
            (
                LabSpec {
                    backend: KeyBackend::Pkcs11(uri.clone()),
                    ..LabSpec::default()
                },
                Keystore::default().with_pkcs11(Pkcs11Config::default()),
                Some(uri),
                Some(h.conf),
            )
        }
    };
    let mut lab = LabPki::build(&home, &keystore, &spec)?;
    lab.create_root_sets(&keystore)?;
    lab.create_rogue_manufacturer(&keystore)?;

    let in_dir = dir.join("in");
    std::fs::create_dir_all(&in_dir)?;
    let server = LeafSubject::Server(IN_FQDN.parse()?);
    let (in_chain, in_key) = match &token {
        None => {
            let (c, k) = lab.issue_files(&keystore, names::INFRA_CA, server, &in_dir, "in")?;
            (c, k.display().to_string())
        }
        Some(uri) => {
            let (key, full) = m2mpki_hsm::pkcs11::generate(
                &uri.for_object("in-tls"),
                KeyType::P256,
                keystore.pkcs11(),
            )?;
            let chain = lab.issue_for(&keystore, names::INFRA_CA, server, &key, None)?;
            let path = in_dir.join("in.pem");
            write_chain(&path, &chain)?;
            (path, full.to_string())
        }
    };

    let mut nodes = Vec::new();
    let devices = dir.join("devices");
    let enterprise = dir.join("nodes");
    std::fs::create_dir_all(&devices)?;
    std::fs::create_dir_all(&enterprise)?;
    let hw = lab
        .ca(names::MFR_CA)
        .and_then(|c| c.hw_type.clone())
        .context("manufacturer CA")?;
    for id in ["SN-0001", "SN-0002", "SN-0003"] {
        let (chain, key) = lab.issue_files(
            &keystore,
            names::MFR_CA,
            LeafSubject::Device(id.parse()?),
            &devices,
            id,
        )?;
        nodes.push(LabNode {
            name: id.into(),
            chain,
            key,
            identity: FieldNodeIdentity::Device {
                hw_type: hw.clone(),
                id: id.parse()?,
            },
            trusted: true,
        });
    }
    for id in ["pump-1", "pump-2"] {
        let subject = LeafSubject::Node {
            enterprise: ENTERPRISE.parse()?,
            id: id.parse()?,
        };
        let (chain, key) = lab.issue_files(&keystore, names::ENT_CA, subject, &enterprise, id)?;
        nodes.push(LabNode {
            name: id.into(),
            chain,
            key,
            identity: FieldNodeIdentity::Node {
                enterprise: ENTERPRISE.parse()?,
                id: id.parse()?,
            },
            trusted: true,
        });
    }
    let rogue_hw = lab
        .ca(ROGUE_CA)
        .and_then(|c| c.hw_type.clone())
        .context("rogue CA")?;
    let (chain, key) = lab.issue_files(
        &keystore,
        ROGUE_CA,
        LeafSubject::Device("ROGUE-1".parse()?),
        &devices,
        "ROGUE-1",
    )?;
    nodes.push(LabNode {
        name: "ROGUE-1".into(),
        chain,
        key,
        identity: FieldNodeIdentity::Device {
            hw_type: rogue_hw,
            id: "ROGUE-1".parse()?,
        },
        trusted: false,
    });

    let infra = lab.store.root_set(sets::INFRA)?.context("IN root set")?;
    let profile_file = FieldNodeProfile::file_for(&infra, &IN_FQDN.parse()?, port)?;
    let profile = dir.join("profile.toml");
    std::fs::write(
        &profile,
        format!(
            "# m2mpki lab bootstrap profile\n{}",
            toml::to_string(&profile_file)?
        ),
    )?;
    let serve_config = dir.join("serve.toml");
    let mut serve_text =
        server_config_toml(&format!("127.0.0.1:{port}"), &in_chain, &in_key, "allow");
    if softhsm_conf.is_none() {
        // DTLS signs with a key file only (OpenSSL; docs/dtls.md): a lab whose IN key is on
        // the token serves TLS alone.
        serve_text.push_str("\n[dtls]\nlisten = \"127.0.0.1:5684\"\n");
    }
    // The association listener: each bootstrapped node puts its credential to use there.
    serve_text.push_str(&format!(
        "\n[psk]\nlisten = \"127.0.0.1:{}\"\n",
        port.saturating_add(1)
    ));
    // Prometheus metrics of the IN, on loopback.
    serve_text.push_str(&format!(
        "\n[metrics]\nlisten = \"127.0.0.1:{}\"\n",
        port.saturating_add(2)
    ));
    std::fs::write(&serve_config, serve_text)?;
    let cas = lab.cas.iter().map(|c| c.name.clone()).collect();
    drop(lab);
    Ok(LabLayout {
        dir,
        home,
        in_chain,
        in_key,
        serve_config,
        profile,
        in_fqdn: IN_FQDN.into(),
        port,
        nodes,
        softhsm_conf,
        cas,
    })
}

/// The lab IN's configuration with every listener it has (TLS, DTLS, PSK) moved to a free
/// loopback port, so that demos, tests and benchmarks run side by side.
pub fn config_on_free_ports(layout: &LabLayout) -> Result<ServerConfig> {
    let mut config = ServerConfig::load(&layout.serve_config)?;
    let free = SocketAddr::from(([127, 0, 0, 1], 0));
    config.listen = Some(free);
    if let Some(d) = config.dtls.as_mut() {
        d.listen = free;
    }
    if let Some(p) = config.psk.as_mut() {
        p.listen = free;
        if p.dtls_listen.is_some() {
            p.dtls_listen = Some(free);
        }
    }
    if config.metrics_listen.is_some() {
        config.metrics_listen = Some(free);
    }
    Ok(config)
}

/// `GET /metrics` from `addr`: the body.
fn scrape(addr: SocketAddr) -> Result<String> {
    use std::io::{Read, Write};
    let mut tcp = std::net::TcpStream::connect(addr)?;
    tcp.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        tcp,
        "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut text = String::new();
    tcp.read_to_string(&mut text)?;
    let (head, body) = text.split_once("\r\n\r\n").context("no HTTP response")?;
    anyhow::ensure!(
        head.starts_with("HTTP/1.1 200"),
        "{}",
        head.lines().next().unwrap_or("")
    );
    Ok(body.to_owned())
}

/// The sum of the samples whose series starts with `prefix`.
fn sum_of(text: &str, prefix: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

/// One step of the demo.
#[derive(Debug, Clone, Serialize)]
pub struct DemoStep {
    /// What was tried.
    pub step: String,
    /// What should happen.
    pub expected: String,
    /// What happened.
    pub outcome: String,
    /// Whether it did what it should.
    pub ok: bool,
    /// Milliseconds taken.
    pub millis: u128,
}

/// The demo's result.
#[derive(Debug, Clone, Serialize)]
pub struct DemoReport {
    /// The lab.
    pub lab: LabLayout,
    /// Where the IN listened.
    pub listen: String,
    /// The steps.
    pub steps: Vec<DemoStep>,
    /// Whether every step did what it should.
    pub ok: bool,
}

fn keystore_for(layout: &LabLayout) -> Keystore {
    match layout.softhsm_conf {
        Some(_) => Keystore::default().with_pkcs11(Pkcs11Config::default()),
        None => Keystore::default(),
    }
}

/// Runs the end-to-end demo on a lab made by [`init`]: starts the IN in this process on a free
/// loopback port, enrols a manufacturer device (TLS 1.3) and an enterprise node (TLS 1.2), shows a
/// device of an untrusted manufacturer refused, and checks that each credential the nodes
/// received equals the IN's record.
pub fn demo(layout: LabLayout) -> Result<DemoReport> {
    let keystore = keystore_for(&layout);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let config = config_on_free_ports(&layout)?;
    let home = Home::open(&layout.home)?;
    let server = Arc::new(Server::new(config, &home, &keystore)?);
    let listener = rt.block_on(server.bind())?;
    let addr = listener.local_addr()?;
    let dtls_addr = listener.dtls_addr().ok();
    let psk_addr = listener.psk_addr().ok();
    let metrics_addr = listener.metrics_addr().ok();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = {
        let s = server.clone();
        rt.spawn(async move {
            s.run(listener, async {
                let _ = stopped.await;
            })
            .await
        })
    };
    let profile = FieldNodeProfile::load(&layout.profile)?;
    let mut steps = Vec::new();
    let mut provisioned = Vec::new();
    let tls13 = Some(TlsVersion::Tls13);
    let mut attempts = vec![
        ("SN-0001", "manufacturer device over TLS 1.3", tls13),
        (
            "pump-1",
            "enterprise node over TLS 1.2",
            Some(TlsVersion::Tls12),
        ),
        ("ROGUE-1", "device of an untrusted manufacturer", tls13),
    ];
    if dtls_addr.is_some() {
        attempts.push((
            "SN-0002",
            "manufacturer device over DTLS 1.2 + CoAP (CCM_8)",
            None,
        ));
        attempts.push(("ROGUE-1", "untrusted device over DTLS 1.2 + CoAP", None));
    }
    for (name, what, version) in attempts {
        let node = layout
            .nodes
            .iter()
            .find(|n| n.name == name)
            .context("lab node missing")?;
        let started = Instant::now();
        let (profile, connect, versions) = match (version, dtls_addr) {
            (Some(v), _) => (profile.clone(), addr, vec![v]),
            (None, Some(d)) => {
                let mut p = profile.clone();
                p.transport = Transport::Dtls;
                p.dtls_suites = vec![DtlsSuite::Aes128Ccm8];
                (p, d, vec![])
            }
            (None, None) => continue,
        };
        let result = rt.block_on(client::enroll(Enrolment {
            profile,
            chain: m2mpki_bootstrap::tls::load_chain(&node.chain)?,
            key: keystore.open(&KeyRef::File(node.key.clone()))?,
            connect: Some(connect.to_string()),
            versions,
            timeout: Duration::from_secs(20),
        }));
        let millis = started.elapsed().as_millis();
        let (ok, outcome, expected) = match (node.trusted, result) {
            (true, Ok(got)) => {
                let record = server.credentials().live(&node.identity)?;
                let matches = match &record {
                    Some(r) => {
                        r.id == got.credential_id
                            && server.credentials().unseal(server.store_key(), r)? == got.credential
                    }
                    None => false,
                };
                let outcome = if matches {
                    format!(
                        "credential {} ({}, set `{}`) equals the IN's record",
                        got.credential_id, got.tls_version, got.admitted_by.set
                    )
                } else {
                    "credential does NOT match the IN's record".into()
                };
                let ok = matches && got.identity == node.identity;
                if ok {
                    provisioned.push((name, got));
                }
                (
                    ok,
                    outcome,
                    format!("{what}: {} gets a root credential", node.identity),
                )
            }
            (true, Err(e)) => (
                false,
                format!("refused: {e}"),
                format!("{what}: gets a root credential"),
            ),
            (false, Err(e)) => {
                let none = server.credentials().live(&node.identity)?.is_none();
                (
                    none,
                    format!("refused: {e}"),
                    format!("{what}: refused, no credential"),
                )
            }
            (false, Ok(_)) => (
                false,
                "was given a credential".into(),
                format!("{what}: refused"),
            ),
        };
        steps.push(DemoStep {
            step: format!(
                "enrol {name}{}",
                if version.is_none() { " (DTLS)" } else { "" }
            ),
            expected,
            outcome,
            ok,
            millis,
        });
    }
    // Each credential put to use: TS-0003's pre-shared-key association with the IN.
    for (name, got) in provisioned.iter().filter(|_| psk_addr.is_some()) {
        let started = Instant::now();
        let result = m2mpki_bootstrap::psk::associate(&m2mpki_bootstrap::psk::AssociateRequest {
            credential_id: got.credential_id.clone(),
            credential: got.credential.clone(),
            in_fqdn: got.in_fqdn.clone(),
            connect: psk_addr.context("PSK listener")?,
            timeout: Duration::from_secs(20),
        });
        let (ok, outcome) = match result {
            Ok(a) if a.association.identity == got.identity.to_string() => (
                true,
                format!(
                    "the IN authenticated {} by credential {} ({})",
                    a.association.identity, a.association.credential_id, a.suite
                ),
            ),
            Ok(a) => (
                false,
                format!("the IN authenticated {} instead", a.association.identity),
            ),
            Err(e) => (false, format!("refused: {e}")),
        };
        steps.push(DemoStep {
            step: format!("associate {name}"),
            expected: format!(
                "{} establishes a TLS 1.2 PSK association with its credential",
                got.identity
            ),
            outcome,
            ok,
            millis: started.elapsed().as_millis(),
        });
    }
    // What an operator's Prometheus sees of all this.
    if let Some(addr) = metrics_addr {
        let started = Instant::now();
        let issued = steps
            .iter()
            .filter(|s| {
                s.step.starts_with("enrol ") && s.outcome.contains("equals the IN's record")
            })
            .count();
        let refused = steps
            .iter()
            .filter(|s| s.step.starts_with("enrol ") && s.outcome.starts_with("refused"))
            .count();
        let (ok, outcome) = match scrape(addr) {
            Ok(text) => {
                let counted = sum_of(&text, "m2mpki_enrolments_total{outcome=\"issued\"");
                let refusals = sum_of(&text, "m2mpki_refusals_total{reason=\"unknown_root\"");
                (
                    counted == issued as f64 && refusals == refused as f64,
                    format!(
                        "http://{addr}/metrics counts {counted} issued enrolments and {refusals} handshakes refused as unknown_root"
                    ),
                )
            }
            Err(e) => (false, format!("no metrics: {e:#}")),
        };
        steps.push(DemoStep {
            step: "metrics".into(),
            expected: format!(
                "the IN's Prometheus endpoint counts the {issued} enrolments and {refused} refusals above"
            ),
            outcome,
            ok,
            millis: started.elapsed().as_millis(),
        });
    }
    let _ = stop.send(());
    rt.block_on(running)??;
    let ok = steps.iter().all(|s| s.ok);
    Ok(DemoReport {
        lab: layout,
        listen: addr.to_string(),
        steps,
        ok,
    })
}
