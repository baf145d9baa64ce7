//! Builds whole lab PKIs: the product code behind `m2mpki lab` (a one-command end-to-end
//! PKI and bootstrap), also used by the tests and benches through `m2mpki-test-pki`, which adds
//! the test fixtures (PostgreSQL databases, process-isolated SoftHSM2 tokens, floods, forged
//! certificates) that the shipped binary does not carry.
//!
//! A lab PKI is a home folder holding three hierarchies, each a root and an issuing CA:
//! a manufacturer (with a hwType OID, for device certificates), an enterprise (with URI name
//! constraints on its domain, for node certificates) and an infrastructure operator (with DNS
//! name constraints, for Infrastructure Node server certificates).
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod lab;
pub mod softhsm;

use std::path::Path;

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use m2mpki_ca::profile::LeafProfile;
use m2mpki_ca::roots;
use m2mpki_ca::rootset::{Anchor, CrlRecord, RootSetKind};
use m2mpki_ca::validity::Validity;
use m2mpki_ca::{
    init_ca, Authority, CaInit, CaKey, CaRecord, Home, LeafRequest, LeafSubject, NameConstraints,
    RedbStore,
};
use m2mpki_hsm::files::{self, Mode, Overwrite, WriteOptions};
use m2mpki_hsm::pkcs11::Pkcs11Uri;
use m2mpki_hsm::{KeyRef, KeyType, Keystore, Signer, SoftwareKey};

/// The manufacturer's hwType OID (under the documentation-only private enterprise arc).
pub const HW_TYPE: &str = "1.3.6.1.4.1.99999.1";
/// The lab enterprise's domain.
pub const ENTERPRISE: &str = "acme.example";
/// The lab Infrastructure Node's FQDN.
pub const IN_FQDN: &str = "in.m2m.localhost";

/// Names of the lab's root sets.
pub mod sets {
    /// Device roots of the lab vertical (the manufacturer root).
    pub const DEVICE: &str = "metering";
    /// The vertical of [`DEVICE`].
    pub const VERTICAL: &str = "smart-metering";
    /// Node roots of the lab enterprise.
    pub const NODE: &str = "acme";
    /// IN roots field nodes trust.
    pub const INFRA: &str = "in-roots";
}

/// A manufacturer that no root set trusts (for refused attempts).
pub const ROGUE_CA: &str = "rogue-mfr-root";

/// Names of the CAs a lab PKI holds.
pub mod names {
    /// Manufacturer root.
    pub const MFR_ROOT: &str = "mfr-root";
    /// Manufacturer issuing CA (device certificates).
    pub const MFR_CA: &str = "mfr-ca";
    /// Enterprise root.
    pub const ENT_ROOT: &str = "ent-root";
    /// Enterprise issuing CA (node certificates).
    pub const ENT_CA: &str = "ent-ca";
    /// Infrastructure root.
    pub const INFRA_ROOT: &str = "infra-root";
    /// Infrastructure issuing CA (IN server certificates).
    pub const INFRA_CA: &str = "infra-ca";
}

/// A lab PKI in a home folder.
#[derive(Debug)]
pub struct LabPki {
    /// The home folder.
    pub home: Home,
    /// Its store.
    pub store: RedbStore,
    /// The CAs, in creation order.
    pub cas: Vec<CaRecord>,
}

/// Where the CA keys of a lab live.
#[derive(Debug, Clone, Default)]
pub enum KeyBackend {
    /// Software keys in the home folder.
    #[default]
    Software,
    /// Keys generated on a PKCS#11 token; the URI names the token (and module and PIN
    /// source); each CA's key gets `object=<CA name>`.
    Pkcs11(Pkcs11Uri),
}

/// How to build a lab PKI.
#[derive(Debug, Clone)]
pub struct LabSpec {
    /// Key type of every CA.
    pub key_type: KeyType,
    /// Where the CA keys live.
    pub backend: KeyBackend,
}

impl Default for LabSpec {
    fn default() -> Self {
        LabSpec {
            key_type: KeyType::P256,
            backend: KeyBackend::Software,
        }
    }
}

fn ca(
    name: &str,
    subject: &str,
    parent: Option<&str>,
    spec: &LabSpec,
    path_len: Option<u8>,
    hw_type: Option<&str>,
    constraints: NameConstraints,
) -> Result<CaInit> {
    Ok(CaInit {
        name: name.into(),
        subject: subject.into(),
        parent: parent.map(Into::into),
        key: CaKey::Generate(spec.key_type), // replaced for token backends in `build`
        validity: Some(if parent.is_some() {
            Validity::Years(10)
        } else {
            Validity::Years(20)
        }),
        not_before: None,
        path_len,
        hw_type: hw_type.map(str::parse).transpose()?,
        name_constraints: constraints,
        replace_key_file: false,
    })
}

impl LabPki {
    /// Builds the three hierarchies in `home` (which must not hold them yet).
    pub fn build(home: &Path, keystore: &Keystore, spec: &LabSpec) -> Result<Self> {
        use names::*;
        let home = Home::open(home)?;
        let store = home.store()?;
        let none = NameConstraints::default;
        // The enterprise's CAs constrain node identities (`onem2m-node://<enterprise>/<ID>`) to
        // its domain and subdomains by URI name constraints, as TS-0003 asks of CA
        // certificates; verification takes m2mpki's own path validation for them.
        let ent_nc = NameConstraints::new(
            &[ENTERPRISE.into()],
            &[],
            &[ENTERPRISE.into(), format!(".{ENTERPRISE}")],
            &[],
        )?;
        let mfr_nc = NameConstraints::new(&["mfr.example".into()], &[], &[], &[])?;
        let infra_nc = NameConstraints::new(&["m2m.localhost".into()], &[], &[], &[])?;
        let plan = [
            ca(
                MFR_ROOT,
                "CN=Example Manufacturer Root CA,O=Example Manufacturer,C=DE",
                None,
                spec,
                Some(1),
                None,
                none(),
            )?,
            ca(
                MFR_CA,
                "CN=Example Manufacturer Device CA,O=Example Manufacturer,C=DE",
                Some(MFR_ROOT),
                spec,
                Some(0),
                Some(HW_TYPE),
                mfr_nc,
            )?,
            ca(
                ENT_ROOT,
                "CN=Acme Enterprise Root CA,O=Acme",
                None,
                spec,
                Some(1),
                None,
                ent_nc.clone(),
            )?,
            ca(
                ENT_CA,
                "CN=Acme Node CA,O=Acme",
                Some(ENT_ROOT),
                spec,
                Some(0),
                None,
                ent_nc,
            )?,
            ca(
                INFRA_ROOT,
                "CN=Example M2M Infrastructure Root CA,O=Example M2M SP",
                None,
                spec,
                Some(1),
                None,
                infra_nc.clone(),
            )?,
            ca(
                INFRA_CA,
                "CN=Example M2M Infrastructure CA,O=Example M2M SP",
                Some(INFRA_ROOT),
                spec,
                Some(0),
                None,
                infra_nc,
            )?,
        ];
        let mut cas = Vec::new();
        for mut req in plan {
            let name = req.name.clone();
            if let KeyBackend::Pkcs11(token) = &spec.backend {
                let uri = token.for_object(&name);
                let (_, full) =
                    m2mpki_hsm::pkcs11::generate(&uri, spec.key_type, keystore.pkcs11())
                        .with_context(|| format!("generating the key of {name} on the token"))?;
                req.key = CaKey::Existing(KeyRef::Pkcs11(full));
            }
            cas.push(
                init_ca(&home, &store, keystore, req)
                    .with_context(|| format!("creating CA {name}"))?,
            );
        }
        Ok(LabPki { home, store, cas })
    }

    /// A CA of the lab by name.
    pub fn ca(&self, name: &str) -> Option<&CaRecord> {
        self.cas.iter().find(|c| c.name == name)
    }

    /// Creates the three root sets ([`sets`]), each holding its hierarchy's root and a
    /// current CRL (next update in 30 days) of each CA of the hierarchy, so that sets that
    /// require a revocation status (the default) admit the lab's chains.
    pub fn create_root_sets(&self, keystore: &Keystore) -> Result<()> {
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let issuers: Vec<Vec<u8>> = self.cas.iter().map(|c| c.cert_der.clone()).collect();
        for (name, kind, root, issuing) in [
            (
                sets::DEVICE,
                RootSetKind::Device {
                    vertical: sets::VERTICAL.into(),
                },
                names::MFR_ROOT,
                names::MFR_CA,
            ),
            (
                sets::NODE,
                RootSetKind::Node {
                    enterprise: ENTERPRISE.parse()?,
                },
                names::ENT_ROOT,
                names::ENT_CA,
            ),
            (
                sets::INFRA,
                RootSetKind::Infrastructure,
                names::INFRA_ROOT,
                names::INFRA_CA,
            ),
        ] {
            let ca = self.ca(root).context("lab root missing")?;
            roots::create(&self.store, name, kind, Default::default(), now)?;
            roots::add_anchors(
                &self.store,
                name,
                vec![Anchor::from_der(&ca.cert_der, root)?],
            )?;
            for ca in [root, issuing] {
                let authority = Authority::load(&self.home, &self.store, keystore, ca)?;
                let crl =
                    m2mpki_ca::revocation::issue_crl(&self.store, &authority, Validity::Days(30))?;
                roots::attach_crl(
                    &self.store,
                    name,
                    CrlRecord::from_der(&crl.der, ca)?,
                    &issuers,
                )?;
            }
        }
        Ok(())
    }

    /// Creates a manufacturer root that no set trusts ([`ROGUE_CA`]).
    pub fn create_rogue_manufacturer(&mut self, keystore: &Keystore) -> Result<()> {
        let req = ca(
            ROGUE_CA,
            "CN=Unknown Manufacturer Root CA,O=Unknown Manufacturer",
            None,
            &LabSpec::default(),
            Some(0),
            Some("1.3.6.1.4.1.99999.666"),
            NameConstraints::default(),
        )?;
        self.cas
            .push(init_ca(&self.home, &self.store, keystore, req)?);
        Ok(())
    }

    /// Issues a leaf certificate for `key` from CA `ca`; returns the chain (leaf, then the
    /// intermediates; no root) as DER.
    pub fn issue_for(
        &self,
        keystore: &Keystore,
        ca: &str,
        subject: LeafSubject,
        key: &dyn Signer,
        validity: Option<Validity>,
    ) -> Result<Vec<Vec<u8>>> {
        let authority = Authority::load(&self.home, &self.store, keystore, ca)?;
        let profile = LeafProfile::builtin(subject.kind());
        let spki = rcgen::SubjectPublicKeyInfo::from_der(&key.subject_public_key_info())?;
        let cert = m2mpki_ca::issue(
            &self.store,
            &authority,
            &profile,
            LeafRequest {
                subject,
                public_key: spki,
                validity,
                not_before: None,
                requester: m2mpki_ca::Requester::Lab,
            },
            true,
        )?;
        let mut chain = vec![cert.der];
        chain.extend(
            authority
                .chain_without_root()
                .into_iter()
                .map(<[u8]>::to_vec),
        );
        Ok(chain)
    }

    /// Issues a leaf with a fresh software key; writes `<dir>/<name>.pem` (chain) and
    /// `<dir>/<name>.key.pem` (0600) and returns their paths.
    pub fn issue_files(
        &self,
        keystore: &Keystore,
        ca: &str,
        subject: LeafSubject,
        dir: &Path,
        name: &str,
    ) -> Result<(PathBuf, PathBuf)> {
        let mut key = SoftwareKey::generate(KeyType::P256)?;
        let chain = self.issue_for(keystore, ca, subject, &key, None)?;
        let cert_path = dir.join(format!("{name}.pem"));
        let key_path = dir.join(format!("{name}.key.pem"));
        key.save(&key_path, None, Overwrite::Replace)?;
        write_chain(&cert_path, &chain)?;
        Ok((cert_path, key_path))
    }

    /// The lab's keystore-independent view of a CA's key (for token labs).
    pub fn signer(&self, keystore: &Keystore, ca: &str) -> Result<Arc<dyn Signer>> {
        let record = self.ca(ca).context("no such lab CA")?;
        Ok(keystore.open(&self.home.resolve_key(&record.key)?)?)
    }
}

/// Writes a chain (DER list) as a PEM file.
pub fn write_chain(path: &Path, chain: &[Vec<u8>]) -> Result<()> {
    let text: String = chain
        .iter()
        .map(|d| files::pem_encode("CERTIFICATE", d))
        .collect();
    files::write_atomic(
        path,
        text.as_bytes(),
        WriteOptions {
            mode: Mode::Public,
            overwrite: Overwrite::Replace,
            sync: false,
        },
    )?;
    Ok(())
}

/// A `bootstrap serve` configuration for the lab IN.
pub fn server_config_toml(listen: &str, chain: &Path, key: &str, policy_default: &str) -> String {
    format!(
        r#"# m2mpki bootstrap server (lab)
fqdn = "{IN_FQDN}"
listen = "{listen}"

[tls]
chain = "{chain}"
key = "{key}"
versions = ["1.3", "1.2"]

[trust]
device_sets = ["{dev}"]
node_sets = ["{node}"]

[credentials]
lifetime = "365d"

[policy]
default = "{policy_default}"
grants = ["weather"]

[parameters]
poa = "coap://{IN_FQDN}:5683"
cse_id = "/in-cse"

[limits]
handshake_timeout = "10s"
idle_timeout = "30s"
max_connections = 1024
max_body = 8192
"#,
        chain = chain.display(),
        dev = sets::DEVICE,
        node = sets::NODE,
    )
}
