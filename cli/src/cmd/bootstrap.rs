//! `m2mpki bootstrap`: the bootstrap server, client, profiles and credential records.

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result};
use m2mpki_bootstrap::client::{self, Enrolment};
use m2mpki_bootstrap::config::{FieldNodeProfile, ServerConfig, TlsVersion};
use m2mpki_bootstrap::credstore::CredentialStore;
use m2mpki_bootstrap::server::Server;
use m2mpki_ca::{FieldNodeIdentity, Home, Store, StoreLocation};
use m2mpki_hsm::files::{self, Mode};
use m2mpki_hsm::{KeyRef, Keystore};
use serde::Serialize;

use crate::args::{BootstrapCommand, TlsArg, TransportArg};
use crate::output::{emit, emit_json, table, ts, Denied, UsageError};

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("M2MPKI_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

/// The credential file a Field Node keeps (mode 0600).
#[derive(Serialize)]
struct CredentialFile<'a> {
    m2mpki_credential: u32,
    #[serde(flatten)]
    enrolled: &'a client::Enrolled<()>,
    /// The root credential, hex (borrowed from a buffer that is wiped).
    #[serde(skip_serializing_if = "Option::is_none")]
    credential: Option<&'a str>,
    /// Where the credential is instead: a token object's PKCS#11 URI.
    #[serde(skip_serializing_if = "Option::is_none")]
    credential_object: Option<&'a str>,
}

/// What `bootstrap associate` needs of a credential file.
struct StoredCredential {
    credential_id: String,
    in_fqdn: String,
    identity: String,
    credential: m2mpki_bootstrap::protocol::RootCredential,
}

/// Reads a credential file `bootstrap enroll` wrote; a malformed one names what is wrong.
fn read_credential_file(path: &Path) -> Result<StoredCredential> {
    let bad = |reason: String| m2mpki_ca::Error::BadFile {
        path: path.to_owned(),
        reason,
    };
    let text = zeroize::Zeroizing::new(
        std::fs::read_to_string(path).map_err(|e| bad(format!("cannot read it: {e}")))?,
    );
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| bad(format!("not a credential file ({e})")))?;
    let field = |name: &str| -> Result<String> {
        Ok(v.get(name)
            .and_then(serde_json::Value::as_str)
            .ok_or_else(|| bad(format!("no `{name}` string")))?
            .to_owned())
    };
    if v.get("m2mpki_credential")
        .and_then(serde_json::Value::as_u64)
        != Some(1)
    {
        return Err(bad("not an m2mpki credential file (m2mpki_credential = 1)".into()).into());
    }
    if let Some(uri) = v
        .get("credential_object")
        .and_then(serde_json::Value::as_str)
    {
        return Err(bad(format!(
            "the credential lives on a token ({uri}) and never leaves it; a TLS-PSK handshake \
             needs the key in memory (OpenSSL has no PKCS#11 PSK path), so this node cannot \
             associate through m2mpki"
        ))
        .into());
    }
    let hex_key = zeroize::Zeroizing::new(field("credential")?);
    let bytes = zeroize::Zeroizing::new(
        hex::decode(hex_key.as_str()).map_err(|_| bad("`credential` is not hex".into()))?,
    );
    let credential = m2mpki_bootstrap::protocol::RootCredential::from_slice(&bytes)
        .ok_or_else(|| bad(format!("`credential` has {} bytes, not 32", bytes.len())))?;
    Ok(StoredCredential {
        credential_id: field("credential_id")?,
        in_fqdn: field("in_fqdn")?,
        identity: field("identity")?,
        credential,
    })
}

/// HOST:PORT to one socket address.
fn resolve(s: &str) -> Result<std::net::SocketAddr> {
    use std::net::ToSocketAddrs;
    s.to_socket_addrs()
        .map_err(|e| UsageError(format!("--connect `{s}`: {e}")))?
        .next()
        .ok_or_else(|| UsageError(format!("--connect `{s}`: no address")).into())
}

async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        _ = term => {},
    }
}

pub fn run(
    home: &Path,
    store: Option<&StoreLocation>,
    keystore: &Keystore,
    json: bool,
    cmd: BootstrapCommand,
) -> Result<()> {
    match cmd {
        BootstrapCommand::Profile {
            set,
            fqdn,
            port,
            out,
            force,
            revocation,
            crl_grace,
            transport,
            coap_port,
            dtls_suites,
            protocol_version,
        } => {
            let fqdn: m2mpki_ca::DnsName = fqdn.parse()?;
            let home = Home::open(home)?;
            let store: Box<dyn Store> = match store {
                Some(location) => location.open()?,
                None => Box::new(home.store()?),
            };
            let mut s = store
                .root_set(&set)?
                .ok_or_else(|| m2mpki_ca::Error::UnknownRootSet(set.clone()))?;
            if let Some(r) = revocation {
                s.revocation.mode = r.into();
            }
            if let Some(g) = crl_grace {
                s.revocation.crl_grace = g;
            }
            let mut file = FieldNodeProfile::file_for(&s, &fqdn, port)?;
            if protocol_version != 1 {
                file.protocol_version = Some(protocol_version);
            }
            if transport == TransportArg::Dtls {
                file.transport = m2mpki_bootstrap::config::Transport::Dtls;
                file.coap_port = Some(coap_port);
                file.dtls_suites = dtls_suites;
            }
            // Under `require` the node must bootstrap before its profile's first CRL goes stale.
            let usable_until = (s.revocation.mode == m2mpki_ca::rootset::RevocationMode::Require)
                .then(|| {
                    s.crls.iter().filter_map(|c| c.next_update).min().map(|n| {
                        n.saturating_add(i64::try_from(s.revocation.crl_grace).unwrap_or(i64::MAX))
                    })
                })
                .flatten();
            let text = format!(
                "# m2mpki bootstrap profile: write this onto the field node at production.\n{}",
                toml::to_string(&file).context("encoding the profile")?
            );
            files::write_atomic(
                &out,
                text.as_bytes(),
                super::write_options(Mode::Public, force),
            )?;
            if json {
                emit_json(
                    &serde_json::json!({ "out": out, "in_fqdn": fqdn, "port": port, "transport": file.transport, "coap_port": file.coap_port, "protocol_version": protocol_version, "set": set, "anchors": s.anchors.len(),
                        "revocation": s.revocation, "crls": s.crls.len(),
                        "crls_current_until": usable_until.map(ts) }),
                )
            } else {
                emit(&format!(
                    "wrote profile for {fqdn}:{port} ({} IN roots of `{set}`, {} CRLs, revocation {}) to {}{}",
                    s.anchors.len(),
                    s.crls.len(),
                    s.revocation,
                    out.display(),
                    usable_until.map_or_else(String::new, |t| format!(
                        "\n  the node must bootstrap before {} (its CRLs go stale then); write a fresh profile later, or use --crl-grace or --revocation best-effort",
                        ts(t)
                    ))
                ))
            }
        }
        BootstrapCommand::Serve { config } => {
            init_logging();
            let mut config = ServerConfig::load(&config)?;
            // --store / $M2MPKI_STORE: where the root sets and CRLs come from, as `store = ...`
            // in the config does; the two must not disagree.
            if let Some(location) = store {
                match &config.store {
                    Some(configured) if configured != location => {
                        return Err(UsageError(
                            "--store (or $M2MPKI_STORE) and `store` in the server config name \
                             different stores"
                                .into(),
                        )
                        .into())
                    }
                    _ => config.store = Some(location.clone()),
                }
            }
            let home = Home::open(home)?;
            let server = Arc::new(Server::new(config, &home, keystore)?);
            runtime()?.block_on(async move {
                let listener = server.bind().await?;
                server.run(listener, shutdown_signal()).await
            })?;
            Ok(())
        }
        BootstrapCommand::Enroll {
            profile,
            cert,
            key,
            out,
            credential_out,
            force,
            connect,
            tls,
            timeout,
        } => {
            if !force && out.exists() {
                return Err(m2mpki_hsm::Error::FileExists(out).into());
            }
            let credential_out = credential_out
                .map(|u| u.parse::<m2mpki_hsm::pkcs11::Pkcs11Uri>())
                .transpose()?;
            let profile = FieldNodeProfile::load(&profile)?;
            let chain = m2mpki_bootstrap::tls::load_chain(&cert)?;
            let key = keystore.open(&key.parse::<KeyRef>()?)?;
            let versions = match tls {
                None => vec![TlsVersion::Tls13, TlsVersion::Tls12],
                Some(TlsArg::V12) => vec![TlsVersion::Tls12],
                Some(TlsArg::V13) => vec![TlsVersion::Tls13],
            };
            let timeout = m2mpki_bootstrap::config::parse_duration(&timeout)
                .map_err(|e| UsageError(format!("--timeout: {e}")))?;
            let enrolment = Enrolment {
                profile,
                chain,
                key,
                connect,
                versions,
                timeout,
            };
            let (enrolled, text) = match &credential_out {
                None => {
                    let enrolled = runtime()?.block_on(client::enroll(enrolment))?;
                    let credential_hex =
                        zeroize::Zeroizing::new(hex::encode(enrolled.credential.expose()));
                    let enrolled = enrolled.map_credential(|_| Ok(()))?;
                    let file = CredentialFile {
                        m2mpki_credential: 1,
                        enrolled: &enrolled,
                        credential: Some(&credential_hex),
                        credential_object: None,
                    };
                    let text = zeroize::Zeroizing::new(serde_json::to_string_pretty(&file)?);
                    (enrolled, text)
                }
                Some(uri) => {
                    let provisioned = runtime()?.block_on(client::enroll_provisioned(enrolment))?;
                    let cfg = keystore.pkcs11();
                    let on_token = provisioned.map_credential(|p| {
                        Ok(match p {
                            client::Provisioned::Wrapped { wrap_key, wrapped } => {
                                m2mpki_hsm::pkcs11::unwrap_credential(
                                    uri,
                                    cfg,
                                    wrap_key.expose(),
                                    &wrapped,
                                )?
                            }
                            client::Provisioned::Ke(ke) => {
                                m2mpki_hsm::pkcs11::import_credential(uri, cfg, ke.expose())?
                            }
                        })
                    })?;
                    let object = on_token.credential.to_string();
                    let enrolled = on_token.map_credential(|_| Ok(()))?;
                    let file = CredentialFile {
                        m2mpki_credential: 1,
                        enrolled: &enrolled,
                        credential: None,
                        credential_object: Some(&object),
                    };
                    let text = zeroize::Zeroizing::new(serde_json::to_string_pretty(&file)?);
                    (enrolled, text)
                }
            };
            files::write_atomic(
                &out,
                text.as_bytes(),
                super::write_options(Mode::Secret, force),
            )?;
            if json {
                emit_json(&serde_json::json!({ "out": out, "result": enrolled }))
            } else {
                emit(&format!(
                    "bootstrapped as {} with {} ({})\n  credential {} expires {}\n  grants     {}\n  written    {}",
                    enrolled.identity,
                    enrolled.in_fqdn,
                    enrolled.tls_version,
                    enrolled.credential_id,
                    enrolled.expires,
                    if enrolled.grants.is_empty() { "-".to_owned() } else { enrolled.grants.join(", ") },
                    out.display()
                ))
            }
        }
        BootstrapCommand::Associate {
            credential,
            connect,
            timeout,
        } => {
            let timeout = m2mpki_bootstrap::config::parse_duration(&timeout)
                .map_err(|e| UsageError(format!("--timeout: {e}")))?;
            let file = read_credential_file(&credential)?;
            let connect = resolve(&connect)?;
            let done =
                m2mpki_bootstrap::psk::associate(&m2mpki_bootstrap::psk::AssociateRequest {
                    credential_id: file.credential_id,
                    credential: file.credential,
                    in_fqdn: file.in_fqdn,
                    connect,
                    timeout,
                })?;
            if done.association.identity != file.identity {
                return Err(m2mpki_bootstrap::Error::Protocol(format!(
                    "the IN authenticated {} with our credential, not {}",
                    done.association.identity, file.identity
                ))
                .into());
            }
            if json {
                emit_json(&done)
            } else {
                emit(&format!(
                    "associated as {} with credential {} ({}, TLS 1.2 PSK)\n  credential expires {}",
                    done.association.identity,
                    done.association.credential_id,
                    done.suite,
                    ts(done.association.expires)
                ))
            }
        }
        BootstrapCommand::Grant {
            identity,
            resources,
        } => {
            let id: FieldNodeIdentity = identity.parse()?;
            check_resources(&resources)?;
            let now = CredentialStore::open_at(store, Home::open(home)?.root())?
                .grant(&id, &resources)?;
            grant_out(json, &id, &now)
        }
        BootstrapCommand::RevokeGrant {
            identity,
            resources,
        } => {
            let id: FieldNodeIdentity = identity.parse()?;
            let now = CredentialStore::open_at(store, Home::open(home)?.root())?
                .revoke_grant(&id, &resources)?;
            grant_out(json, &id, &now)
        }
        BootstrapCommand::Grants => {
            let store = CredentialStore::open_at(store, Home::open(home)?.root())?;
            let policy = store.policy()?;
            let all = store.all_grants()?;
            if json {
                return emit_json(&serde_json::json!({
                    "policy": policy,
                    "grants": all.iter().map(|(i, g)| serde_json::json!({ "identity": i, "resources": g })).collect::<Vec<_>>(),
                }));
            }
            let rows: Vec<Vec<String>> = all
                .iter()
                .map(|(i, g)| vec![i.clone(), g.join(", ")])
                .collect();
            emit(&format!(
                "policy: {} (default grants: {})\n{}",
                serde_json::to_value(policy.default)?
                    .as_str()
                    .unwrap_or("?"),
                if policy.grants.is_empty() {
                    "-".to_owned()
                } else {
                    policy.grants.join(", ")
                },
                table(&["IDENTITY", "GRANTS"], &rows)
            ))
        }
        BootstrapCommand::Check { identity, resource } => {
            let id: FieldNodeIdentity = identity.parse()?;
            let allowed =
                CredentialStore::open_at(store, Home::open(home)?.root())?.check(&id, &resource)?;
            if json {
                emit_json(
                    &serde_json::json!({ "identity": id.to_string(), "resource": resource, "allowed": allowed }),
                )?;
            } else if allowed {
                emit(&format!("allowed: {id} may access {resource}"))?;
            }
            if allowed {
                Ok(())
            } else {
                Err(Denied(format!("denied: {id} may not access {resource}")).into())
            }
        }
        BootstrapCommand::Migrate { from, to } => {
            let root = Home::open(home)?.root().to_owned();
            let (from, dest) = migration_ends(&root, from.as_deref(), to.as_deref())?;
            let (credentials, grants) = from.copy_into(&dest)?;
            if json {
                emit_json(&serde_json::json!({
                    "from": from.backend(), "to": dest.backend(),
                    "credentials": credentials, "identities_with_grants": grants,
                }))
            } else {
                emit(&format!(
                    "copied {credentials} credentials and the grants of {grants} identities from {} to {}",
                    from.backend(),
                    dest.backend()
                ))
            }
        }
        BootstrapCommand::Reseal { store_key } => {
            let home = Home::open(home)?;
            let key_ref = match store_key {
                Some(k) => k.parse()?,
                None => {
                    m2mpki_hsm::KeyRef::File(home.root().join("keys").join("credential-store.key"))
                }
            };
            if let m2mpki_hsm::KeyRef::File(path) = &key_ref {
                // Loading a missing key file would make a new key.
                if !path.exists() {
                    return Err(UsageError(format!(
                        "no store key at {}: give the IN's with --store-key",
                        path.display()
                    ))
                    .into());
                }
            }
            let key = m2mpki_bootstrap::credstore::StoreKey::load(&key_ref, keystore)?;
            let creds = CredentialStore::open_at(store, home.root())?;
            creds.check_key(&key)?;
            let (resealed, bound) = creds.reseal(&key)?;
            if json {
                emit_json(&serde_json::json!({
                    "store": creds.backend(),
                    "resealed": resealed,
                    "already_bound": bound,
                }))
            } else {
                emit(&format!(
                    "{}: bound {resealed} credentials to their records ({bound} were already)",
                    creds.backend()
                ))
            }
        }
        BootstrapCommand::Credentials { identity } => {
            let id: FieldNodeIdentity = identity.parse()?;
            let history =
                CredentialStore::open_at(store, Home::open(home)?.root())?.history(&id)?;
            let views: Vec<serde_json::Value> = history
                .iter()
                .map(|r| {
                    serde_json::json!({
                        "credential_id": r.id, "status": r.status, "admitted_by": r.admitted_by,
                        "client_cert_sha256": r.client_cert_sha256,
                        "created": ts(r.created), "expires": ts(r.expires),
                        "supersedes": r.supersedes,
                    })
                })
                .collect();
            if json {
                return emit_json(&views);
            }
            let rows: Vec<Vec<String>> = history
                .iter()
                .map(|r| {
                    vec![
                        r.id.clone(),
                        serde_json::to_value(r.status)
                            .ok()
                            .and_then(|v| v.as_str().map(str::to_owned))
                            .unwrap_or_default(),
                        r.admitted_by.set.clone(),
                        ts(r.created),
                        ts(r.expires),
                    ]
                })
                .collect();
            emit(&table(
                &["CREDENTIAL", "STATUS", "SET", "CREATED", "EXPIRES"],
                &rows,
            ))
        }
    }
}

fn check_resources(resources: &[String]) -> Result<()> {
    for r in resources {
        if r.is_empty() || r.len() > 256 || r.chars().any(|c| c.is_control() || c.is_whitespace()) {
            return Err(UsageError(format!(
                "invalid resource `{r}`: 1 to 256 characters, no spaces"
            ))
            .into());
        }
    }
    Ok(())
}

fn grant_out(json: bool, id: &FieldNodeIdentity, now: &[String]) -> Result<()> {
    if json {
        emit_json(&serde_json::json!({ "identity": id.to_string(), "grants": now }))
    } else {
        emit(&format!(
            "{id}: {}",
            if now.is_empty() {
                "no grants".to_owned()
            } else {
                now.join(", ")
            }
        ))
    }
}

/// The two ends of `bootstrap migrate`: each a postgres:// URL or, when not given, the home's
/// `bootstrap.redb` (the IN's redb store is always there). The source must hold a store (a
/// missing redb file is not created); the destination must hold no credential, grant or meta
/// value (the copy checks that again in its transaction).
fn migration_ends(
    root: &Path,
    from: Option<&str>,
    to: Option<&str>,
) -> Result<(CredentialStore, CredentialStore)> {
    let location = |flag: &str, url: Option<&str>| -> Result<Option<StoreLocation>> {
        let Some(url) = url else { return Ok(None) };
        match url.parse::<StoreLocation>()? {
            l @ StoreLocation::Postgres(_) => Ok(Some(l)),
            StoreLocation::Redb(_) => Err(UsageError(format!(
                "{flag} must be a postgres:// URL: the IN's redb store is always \
                 <home>/bootstrap.redb, which is used when {flag} is not given"
            ))
            .into()),
        }
    };
    let (from, to) = (location("--from", from)?, location("--to", to)?);
    if from == to {
        return Err(UsageError(
            "--from and --to name the same store: give --to (or --from) a postgres:// URL".into(),
        )
        .into());
    }
    let redb = root.join("bootstrap.redb");
    if from.is_none() && !redb.exists() {
        return Err(UsageError(format!(
            "{}: no IN credential store to copy",
            redb.display()
        ))
        .into());
    }
    let source = CredentialStore::open_at(from.as_ref(), root)?;
    let dest = CredentialStore::open_at(to.as_ref(), root)?;
    if dest.count()? > 0 || !dest.all_grants()?.is_empty() {
        return Err(Denied(format!(
            "{} already holds IN credentials or grants: refusing to copy into it",
            dest.backend()
        ))
        .into());
    }
    Ok((source, dest))
}
