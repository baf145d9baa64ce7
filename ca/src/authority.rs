//! Certificate authorities: creating them, loading them, and issuing under a profile.

use std::sync::Arc;

use m2mpki_hsm::files::Overwrite;
use m2mpki_hsm::{KeyRef, KeyType, Keystore, Signer, SoftwareKey};
use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyIdMethod, PublicKeyData};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use x509_parser::prelude::FromDer;

use crate::audit::AuditEvent;
use crate::constraints::NameConstraints;
use crate::dn::{dn_to_string, organization, parse_dn};
use crate::home::Home;
use crate::identity::{DnsName, FieldNodeIdentity, Oid, PreProvisionedId};
use crate::leaf_der::{subject_text, LeafFields, LeafSan, LeafTemplate, SubjectAttr};
use crate::profile::{KeyUsage, LeafProfile, ProfileKind};
use crate::serial::Serial;
use crate::store::{CertRecord, CertStatus, NewCert, Store};
use crate::validity::{format_time, Validity};
use crate::{Error, Result};

/// A CA as the store remembers it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CaRecord {
    /// Unique name (`[A-Za-z0-9._-]`, 1 to 64 characters).
    pub name: String,
    /// Subject DN as text.
    pub subject: String,
    /// Organization (O) of the subject: the manufacturer or enterprise.
    pub organization: Option<String>,
    /// Key location: a path (relative to the home folder when inside it) or a PKCS#11 URI.
    pub key: String,
    /// Key algorithm.
    pub key_type: KeyType,
    /// Parent CA, `None` for a root.
    pub parent: Option<String>,
    /// The manufacturer's hwType OID for device certificates.
    pub hw_type: Option<Oid>,
    /// basicConstraints pathLenConstraint.
    pub path_len: Option<u8>,
    /// Name constraints in the certificate.
    #[serde(default)]
    pub name_constraints: NameConstraints,
    /// Serial of the CA certificate.
    pub serial: Serial,
    /// notBefore (Unix time).
    pub not_before: i64,
    /// notAfter (Unix time).
    pub not_after: i64,
    /// When the CA was created (Unix time).
    pub created: i64,
    /// The CA certificate.
    #[serde(with = "hex_bytes")]
    pub cert_der: Vec<u8>,
    /// Its ancestors, parent first and root last (empty for a root).
    #[serde(with = "hex_list")]
    pub chain_der: Vec<Vec<u8>>,
}

impl CaRecord {
    /// The CA certificate followed by its ancestors, root last, as PEM.
    pub fn chain_pem(&self) -> String {
        std::iter::once(&self.cert_der)
            .chain(&self.chain_der)
            .map(|der| m2mpki_hsm::files::pem_encode("CERTIFICATE", der))
            .collect()
    }

    /// The root certificate of this CA's chain.
    pub fn root_der(&self) -> &[u8] {
        self.chain_der.last().unwrap_or(&self.cert_der)
    }
}

pub(crate) mod hex_bytes {
    use serde::{Deserialize, Deserializer, Serializer};
    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(v))
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        hex::decode(String::deserialize(d)?).map_err(serde::de::Error::custom)
    }
}

mod hex_list {
    use serde::{Deserialize, Deserializer, Serializer};
    pub fn serialize<S: Serializer>(v: &[Vec<u8>], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(v.iter().map(hex::encode))
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Vec<u8>>, D::Error> {
        Vec::<String>::deserialize(d)?
            .into_iter()
            .map(|h| hex::decode(h).map_err(serde::de::Error::custom))
            .collect()
    }
}

/// Where a new CA's key comes from.
#[derive(Clone, Debug)]
pub enum CaKey {
    /// Generate a software key of this type in the home folder.
    Generate(KeyType),
    /// Use an existing key (a file or a token object).
    Existing(KeyRef),
}

/// A CA's lifetime when none is asked for.
pub const DEFAULT_CA_VALIDITY: Validity = Validity::Years(20);

/// A request to create a CA.
#[derive(Clone, Debug)]
pub struct CaInit {
    /// Name of the new CA.
    pub name: String,
    /// Subject DN as typed by the user.
    pub subject: String,
    /// Parent CA name; `None` makes a root.
    pub parent: Option<String>,
    /// The key.
    pub key: CaKey,
    /// Lifetime. `None`: [`DEFAULT_CA_VALIDITY`], cut to the parent's notAfter when the parent
    /// expires sooner (a lifetime asked for explicitly is never cut: it is refused).
    pub validity: Option<Validity>,
    /// notBefore; now when `None`.
    pub not_before: Option<OffsetDateTime>,
    /// pathLenConstraint; `None` means unconstrained for a root and 0 for an issuing CA.
    pub path_len: Option<u8>,
    /// Manufacturer hwType OID (makes this a manufacturer CA that can issue device certs).
    pub hw_type: Option<Oid>,
    /// Name constraints.
    pub name_constraints: NameConstraints,
}

fn now() -> OffsetDateTime {
    // Whole seconds: certificates carry no fractions.
    let t = OffsetDateTime::now_utc();
    t.replace_nanosecond(0).unwrap_or(t)
}

fn time_of(unix: i64) -> Result<OffsetDateTime> {
    OffsetDateTime::from_unix_timestamp(unix).map_err(Error::internal)
}

/// Makes a `Arc<dyn Signer>` usable where rcgen wants a `SigningKey`.
#[derive(Clone, Debug)]
pub(crate) struct SharedSigner(Arc<dyn Signer>);

impl PublicKeyData for SharedSigner {
    fn der_bytes(&self) -> &[u8] {
        self.0.der_bytes()
    }
    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        self.0.algorithm()
    }
}

impl rcgen::SigningKey for SharedSigner {
    fn sign(&self, msg: &[u8]) -> std::result::Result<Vec<u8>, rcgen::Error> {
        self.0.sign(msg)
    }
}

/// The error for a failed signature: the key's own cause when it recorded one (a token gone,
/// say), else rcgen's.
pub(crate) fn sign_failed(e: rcgen::Error) -> Error {
    Error::Key(
        m2mpki_hsm::sign_error::take().unwrap_or_else(|| m2mpki_hsm::Error::Crypto(e.to_string())),
    )
}

/// The SubjectPublicKeyInfo DER of a certificate.
fn cert_spki(der: &[u8]) -> Result<Vec<u8>> {
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(der)
        .map_err(|e| Error::Store(format!("stored CA certificate does not parse: {e}")))?;
    Ok(cert.tbs_certificate.subject_pki.raw.to_vec())
}

/// Creates a CA: a self-signed root, or an issuing CA signed by `req.parent`.
pub fn init_ca(
    home: &Home,
    store: &dyn Store,
    keystore: &Keystore,
    req: CaInit,
) -> Result<CaRecord> {
    crate::identity::check_object_name("CA name", &req.name)?;
    if store.ca(&req.name)?.is_some() {
        return Err(Error::CaExists(req.name));
    }
    let dn = parse_dn(&req.subject)?;
    let org = organization(&dn);
    if req.hw_type.is_some() && org.is_none() {
        return Err(Error::Policy(
            "a manufacturer CA (--hw-type) needs O=<manufacturer> in its subject; device certificates carry it".into(),
        ));
    }
    let parent = match &req.parent {
        Some(p) => Some(Authority::load(home, store, keystore, p)?),
        None => None,
    };
    let not_before = req.not_before.unwrap_or_else(now);
    let mut not_after = req
        .validity
        .unwrap_or(DEFAULT_CA_VALIDITY)
        .not_after(not_before);
    let path_len = match (&parent, req.path_len) {
        (None, p) => p,
        (Some(_), None) => Some(0),
        (Some(_), p) => p,
    };
    if let Some(parent) = &parent {
        let pr = &parent.record;
        match pr.path_len {
            Some(0) => {
                return Err(Error::Policy(format!(
                    "CA `{}` has path length 0 and cannot sign another CA",
                    pr.name
                )))
            }
            Some(n) if path_len.is_none_or(|p| p >= n) => {
                return Err(Error::Policy(format!(
                    "CA `{}` allows {} more CA level(s) below it: give --path-len {} or less",
                    pr.name,
                    n,
                    n - 1
                )))
            }
            _ => {}
        }
        if not_after.unix_timestamp() > pr.not_after && req.validity.is_none() {
            not_after = time_of(pr.not_after)?;
        } else if not_after.unix_timestamp() > pr.not_after {
            return Err(Error::Policy(format!(
                "the new CA would outlive its parent `{}` (which expires {}); choose a shorter --validity",
                pr.name,
                format_time(time_of(pr.not_after)?)
            )));
        }
    }

    // The key: generated into the home folder, or an existing one.
    let (signer, key_ref, generated_path): (Arc<dyn Signer>, KeyRef, _) = match &req.key {
        CaKey::Generate(kt) => {
            let rel = Home::ca_key_path(&req.name);
            let path = home.root().join(&rel);
            let mut key = SoftwareKey::generate(*kt)?;
            // No CA record has this name (checked above): a key file left by a crashed
            // `ca init` is an orphan and may be replaced.
            key.save(&path, keystore.passphrase(), Overwrite::Replace)?;
            (Arc::new(key), KeyRef::File(path.clone()), Some(path))
        }
        CaKey::Existing(r) => (keystore.open(r)?, r.clone(), None),
    };
    let result = (|| {
        let serial = Serial::random()?;
        let mut params = CertificateParams::default();
        params.distinguished_name = dn.clone();
        params.serial_number = Some(rcgen::SerialNumber::from_slice(serial.as_bytes()));
        params.not_before = not_before;
        params.not_after = not_after;
        params.is_ca = IsCa::Ca(match path_len {
            Some(n) => BasicConstraints::Constrained(n),
            None => BasicConstraints::Unconstrained,
        });
        params.key_usages = vec![
            KeyUsage::KeyCertSign.to_rcgen(),
            KeyUsage::CrlSign.to_rcgen(),
        ];
        params.extended_key_usages = vec![];
        params.key_identifier_method =
            KeyIdMethod::PreSpecified(key_identifier(signer.der_bytes()));
        params.use_authority_key_identifier_extension = parent.is_some();
        params.custom_extensions = req.name_constraints.to_extension().into_iter().collect();
        let subject_key = SharedSigner(signer.clone());
        let (cert_der, chain_der) = match &parent {
            None => (
                params.self_signed(&subject_key).map_err(Error::internal)?,
                vec![],
            ),
            Some(p) => {
                let cert = params
                    .signed_by(&subject_key, &p.issuer)
                    .map_err(|e| Error::Key(m2mpki_hsm::Error::Crypto(e.to_string())))?;
                let mut chain = vec![p.record.cert_der.clone()];
                chain.extend(p.record.chain_der.iter().cloned());
                (cert, chain)
            }
        };
        let record = CaRecord {
            name: req.name.clone(),
            subject: dn_to_string(&dn),
            organization: org.clone(),
            key: home.storable_key(&key_ref)?,
            key_type: signer.key_type(),
            parent: req.parent.clone(),
            hw_type: req.hw_type.clone(),
            path_len,
            name_constraints: req.name_constraints.clone(),
            serial,
            not_before: not_before.unix_timestamp(),
            not_after: not_after.unix_timestamp(),
            created: now().unix_timestamp(),
            cert_der: cert_der.der().to_vec(),
            chain_der,
        };
        let event = AuditEvent {
            action: crate::audit::AuditAction::CaInit,
            subject: record.name.clone(),
            detail: serde_json::json!({
                "subject": record.subject,
                "parent": record.parent,
                "serial": record.serial,
                "key_type": record.key_type,
                "key": record.key,
                "hw_type": record.hw_type,
                "path_len": record.path_len,
                "not_after": record.not_after,
            }),
        };
        store.create_ca(&record, event)?;
        Ok(record)
    })();
    if result.is_err() {
        if let Some(path) = generated_path {
            let _ = std::fs::remove_file(path);
        }
    }
    result
}

/// What a leaf certificate is for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LeafSubject {
    /// A manufacturer device with this pre-provisioned ID.
    Device(PreProvisionedId),
    /// An enterprise node.
    Node {
        /// The enterprise's domain.
        enterprise: DnsName,
        /// The pre-provisioned ID.
        id: PreProvisionedId,
    },
    /// An Infrastructure Node server.
    Server(DnsName),
}

impl LeafSubject {
    /// The profile kind this subject needs.
    pub fn kind(&self) -> ProfileKind {
        match self {
            LeafSubject::Device(_) => ProfileKind::Device,
            LeafSubject::Node { .. } => ProfileKind::Node,
            LeafSubject::Server(_) => ProfileKind::Server,
        }
    }
}

/// A request for an end-entity certificate.
#[derive(Clone, Debug)]
pub struct LeafRequest {
    /// Who it is for.
    pub subject: LeafSubject,
    /// The subject's public key (from a CSR or a key we generated).
    pub public_key: rcgen::SubjectPublicKeyInfo,
    /// Lifetime; the profile's default when `None`.
    pub validity: Option<Validity>,
    /// notBefore; now when `None`.
    pub not_before: Option<OffsetDateTime>,
}

/// A request that passed the profile and CA policy, ready to sign.
#[derive(Debug)]
pub struct Approved {
    fields: LeafFields,
    kind: ProfileKind,
    identity: Option<FieldNodeIdentity>,
    subject_key: String,
    subject: String,
}

impl Approved {
    /// The key under which one live certificate per subject is enforced.
    pub fn subject_key(&self) -> &str {
        &self.subject_key
    }
}

/// A loaded CA, ready to issue: its record, its key and its issuer, built once.
pub struct Authority {
    /// The record.
    pub record: CaRecord,
    issuer: rcgen::Issuer<'static, SharedSigner>,
    /// The parts of every leaf's DER that come from this CA.
    template: LeafTemplate,
    /// Name constraints of this CA and every ancestor.
    constraints: Vec<NameConstraints>,
}

impl std::fmt::Debug for Authority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authority")
            .field("name", &self.record.name)
            .finish_non_exhaustive()
    }
}

impl Authority {
    /// Loads CA `name`, opens its key and checks that the key matches its certificate.
    pub fn load(home: &Home, store: &dyn Store, keystore: &Keystore, name: &str) -> Result<Self> {
        let record = store
            .ca(name)?
            .ok_or_else(|| Error::UnknownCa(name.to_owned()))?;
        let key_ref = home.resolve_key(&record.key)?;
        let signer = keystore.open(&key_ref).map_err(|e| match e {
            m2mpki_hsm::Error::KeyNotFound(p) => Error::BadFile {
                path: p,
                reason: format!("the key of CA `{name}` is missing"),
            },
            e => Error::Key(e),
        })?;
        if !signer.matches(&cert_spki(&record.cert_der)?) {
            return Err(Error::BadFile {
                path: key_ref.to_string().into(),
                reason: format!("this key does not belong to CA `{name}`'s certificate"),
            });
        }
        let template = LeafTemplate::new(&record.cert_der, signer.key_type())?;
        let issuer =
            rcgen::Issuer::from_ca_cert_der(&record.cert_der.clone().into(), SharedSigner(signer))
                .map_err(|e| Error::Store(format!("CA `{name}` certificate: {e}")))?;
        let mut constraints = vec![record.name_constraints.clone()];
        let mut parent = record.parent.clone();
        while let Some(p) = parent {
            let pr = store.ca(&p)?.ok_or_else(|| {
                Error::Store(format!(
                    "CA `{name}` names a parent `{p}` that is not in the store"
                ))
            })?;
            constraints.push(pr.name_constraints.clone());
            parent = pr.parent;
        }
        Ok(Authority {
            record,
            issuer,
            template,
            constraints,
        })
    }

    /// The device hwType OID this CA certifies under.
    fn hw_type(&self) -> Result<crate::Oid> {
        self.record.hw_type.clone().ok_or_else(|| {
            Error::Policy(format!(
                "CA `{}` has no hwType OID and cannot issue device certificates (create it with --hw-type)",
                self.record.name
            ))
        })
    }

    /// The key under which this CA keeps one live certificate per subject: a field node's
    /// canonical identity, `server:FQDN` for an IN.
    pub fn subject_key(&self, subject: &LeafSubject) -> Result<String> {
        Ok(match subject {
            LeafSubject::Device(id) => FieldNodeIdentity::Device {
                hw_type: self.hw_type()?,
                id: id.clone(),
            }
            .to_string(),
            LeafSubject::Node { enterprise, id } => FieldNodeIdentity::Node {
                enterprise: enterprise.clone(),
                id: id.clone(),
            }
            .to_string(),
            LeafSubject::Server(fqdn) => format!("server:{fqdn}"),
        })
    }

    /// Checks `req` against `profile` and this CA's policy, and fixes every field of the
    /// certificate. Nothing is signed or recorded.
    pub fn approve(&self, profile: &LeafProfile, req: LeafRequest) -> Result<Approved> {
        let ca = &self.record;
        if req.subject.kind() != profile.kind {
            return Err(Error::internal("request and profile kinds differ"));
        }
        let key_type = KeyType::from_algorithm(req.public_key.algorithm());
        if !key_type.is_some_and(|k| profile.key_types.contains(&k)) {
            return Err(Error::Policy(format!(
                "the {} profile accepts {} keys only",
                profile.kind,
                profile
                    .key_types
                    .iter()
                    .map(|k| k.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        let not_before = req.not_before.unwrap_or_else(now);
        let ca_not_after = time_of(ca.not_after)?;
        let not_after = match req.validity.or(profile.default_validity) {
            Some(Validity::Forever) if !profile.allow_forever => {
                return Err(Error::Policy(format!(
                    "the {} profile does not allow `forever`",
                    profile.kind
                )))
            }
            Some(v) => v.not_after(not_before),
            None => ca_not_after,
        };
        if not_after > ca_not_after {
            return Err(Error::Policy(format!(
                "the certificate would outlive CA `{}` (which expires {}); choose a shorter --validity",
                ca.name,
                format_time(ca_not_after)
            )));
        }
        if not_after <= not_before {
            return Err(Error::Policy(
                "notAfter would not be after notBefore".into(),
            ));
        }

        let key_type = key_type.ok_or_else(|| Error::internal("key type checked above"))?;
        let subject_key = self.subject_key(&req.subject)?;
        let (subject, san, identity) = match &req.subject {
            LeafSubject::Device(id) => {
                let hw_type = self.hw_type()?;
                let org = ca.organization.clone().ok_or_else(|| {
                    Error::Policy(format!("CA `{}` has no O in its subject", ca.name))
                })?;
                let subject = vec![
                    SubjectAttr::Organization(org),
                    SubjectAttr::CommonName(id.to_string()),
                    SubjectAttr::SerialNumber(id.to_string()),
                ];
                let san = LeafSan::HardwareModule {
                    hw_type: hw_type.clone(),
                    serial: id.to_string(),
                };
                let identity = FieldNodeIdentity::Device {
                    hw_type,
                    id: id.clone(),
                };
                (subject, san, Some(identity))
            }
            LeafSubject::Node { enterprise, id } => {
                if let Some(nc) = self
                    .constraints
                    .iter()
                    .find(|nc| !nc.allows_uri_host(enterprise))
                {
                    return Err(Error::Policy(format!(
                        "enterprise `{enterprise}` is outside the URI name constraints of the CA chain ({:?})",
                        nc.permitted_uri_domains
                    )));
                }
                let subject = vec![
                    SubjectAttr::Organization(enterprise.to_string()),
                    SubjectAttr::CommonName(id.to_string()),
                    SubjectAttr::SerialNumber(id.to_string()),
                ];
                let san = LeafSan::Uri(FieldNodeIdentity::node_uri(enterprise, id));
                let identity = FieldNodeIdentity::Node {
                    enterprise: enterprise.clone(),
                    id: id.clone(),
                };
                (subject, san, Some(identity))
            }
            LeafSubject::Server(fqdn) => {
                if let Some(nc) = self.constraints.iter().find(|nc| !nc.allows_dns(fqdn)) {
                    return Err(Error::Policy(format!(
                        "`{fqdn}` is outside the DNS name constraints of the CA chain ({:?})",
                        nc.permitted_dns
                    )));
                }
                let subject = vec![SubjectAttr::CommonName(fqdn.to_string())];
                (subject, LeafSan::Dns(fqdn.to_string()), None)
            }
        };
        let subject_text = subject_text(&subject);
        let public_key = req.public_key.der_bytes().to_vec();
        Ok(Approved {
            fields: LeafFields {
                serial: Serial::random()?,
                not_before,
                not_after,
                subject,
                san,
                key_type,
                subject_key_id: key_identifier(&public_key),
                public_key,
                key_usage: profile.key_usage.clone(),
                extended_key_usage: profile.extended_key_usage.clone(),
            },
            kind: profile.kind,
            identity,
            subject_key,
            subject: subject_text,
        })
    }

    /// Signs an approved request. The result is not yet recorded.
    pub fn sign(&self, approved: Approved) -> Result<NewCert> {
        let tbs = self.template.tbs(&approved.fields);
        let signature = rcgen::SigningKey::sign(self.issuer.key(), &tbs).map_err(sign_failed)?;
        let der = self.template.certificate(&tbs, &signature);
        // Read the identity back from what we signed: the certificate must say what we meant.
        if let Some(expected) = &approved.identity {
            let (_, parsed) = x509_parser::certificate::X509Certificate::from_der(&der)
                .map_err(Error::internal)?;
            let got = FieldNodeIdentity::from_certificate(&parsed)?;
            if &got != expected {
                return Err(Error::internal(format!(
                    "issued certificate reads back as {got}, expected {expected}"
                )));
            }
        }
        let sha256 = hex::encode(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &der));
        Ok(NewCert {
            record: CertRecord {
                serial: approved.fields.serial,
                ca: self.record.name.clone(),
                profile: approved.kind,
                subject_key: approved.subject_key,
                identity: approved.identity,
                subject: approved.subject,
                not_before: approved.fields.not_before.unix_timestamp(),
                not_after: approved.fields.not_after.unix_timestamp(),
                issued_at: now().unix_timestamp(),
                sha256,
                status: CertStatus::Valid,
                revoked_at: None,
                revocation_reason: None,
            },
            der,
        })
    }

    /// The issuer (CA name, key identifier, signing key) for signing CRLs.
    pub(crate) fn issuer(&self) -> &rcgen::Issuer<'static, SharedSigner> {
        &self.issuer
    }

    /// The certificate chain to ship with a leaf: this CA and its intermediates, root excluded.
    pub fn chain_without_root(&self) -> Vec<&[u8]> {
        let mut chain: Vec<&[u8]> = vec![&self.record.cert_der];
        chain.extend(self.record.chain_der.iter().map(Vec::as_slice));
        if chain.len() > 1 {
            chain.pop();
        } else {
            // A root issuing directly: ship nothing but the leaf.
            chain.clear();
        }
        chain
    }
}

/// The subject key identifier of RFC 7093 §2 method 1: the leftmost 160 bits of the SHA-256 of
/// the subjectPublicKey bits (recognised by linters, unlike a hash over the whole SPKI).
fn key_identifier(subject_public_key: &[u8]) -> Vec<u8> {
    let mut id = crate::input::sha256(subject_public_key);
    id.truncate(20);
    id
}
