//! Builds whole lab PKIs for m2mpki's tests, benches and the `lab` command.
//!
//! A lab PKI is a home folder holding three hierarchies, each a root and an issuing CA:
//! a manufacturer (with a hwType OID, for device certificates), an enterprise (with URI name
//! constraints on its domain, for node certificates) and an infrastructure operator (with DNS
//! name constraints, for Infrastructure Node server certificates).
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod softhsm;

use std::path::Path;

use anyhow::{Context, Result};
use m2mpki_ca::validity::Validity;
use m2mpki_ca::{init_ca, CaInit, CaKey, CaRecord, Home, NameConstraints, RedbStore};
use m2mpki_hsm::pkcs11::Pkcs11Uri;
use m2mpki_hsm::{KeyRef, KeyType, Keystore};

/// The manufacturer's hwType OID (under the documentation-only private enterprise arc).
pub const HW_TYPE: &str = "1.3.6.1.4.1.99999.1";
/// The lab enterprise's domain.
pub const ENTERPRISE: &str = "acme.example";
/// The lab Infrastructure Node's FQDN.
pub const IN_FQDN: &str = "in.m2m.localhost";

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
        validity: if parent.is_some() {
            Validity::Years(10)
        } else {
            Validity::Years(20)
        },
        not_before: None,
        path_len,
        hw_type: hw_type.map(str::parse).transpose()?,
        name_constraints: constraints,
    })
}

impl LabPki {
    /// Builds the three hierarchies in `home` (which must not hold them yet).
    pub fn build(home: &Path, keystore: &Keystore, spec: &LabSpec) -> Result<Self> {
        use names::*;
        let home = Home::open(home)?;
        let store = home.store()?;
        let none = NameConstraints::default;
        // DNS constraints only: rustls-webpki (the bootstrap server's verifier) refuses every
        // certificate with a URI SAN below a CA with URI constraints. Node identities are kept
        // to the enterprise by its node root set instead.
        let ent_nc = NameConstraints::new(&[ENTERPRISE.into()], &[], &[], &[])?;
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
}
