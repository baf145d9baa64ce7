//! Certificate authorities: creating them, loading them, and issuing under a profile.

use std::sync::Arc;

use m2mpki_hsm::files::Overwrite;
use m2mpki_hsm::{KeyRef, KeyType, Keystore, Signer, SoftwareKey};
use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyIdMethod, PublicKeyData};

use time::OffsetDateTime;
use x509_parser::prelude::FromDer;

use crate::audit::AuditEvent;
use crate::constraints::NameConstraints;
use crate::dn::{dn_to_string, organization, parse_dn};
use crate::home::Home;
use crate::identity::{DnsName, FieldNodeIdentity, Oid, PreProvisionedId, SubjectKey};
use crate::leaf_der::{subject_text, LeafFields, LeafSan, LeafTemplate, SubjectAttr};
use crate::profile::{KeyUsage, LeafProfile, ProfileKind};
use crate::requester::Requester;
use crate::serial::Serial;
use crate::store::{settle_outcome, CaRecord, CertRecord, CertStatus, NewCert, Store};
use crate::validity::{format_time, Validity};
use crate::{Error, Result};

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
    /// With a generated key: replace a key file left at the CA's key path (by a crashed
    /// `ca init`, say) when no CA of this store uses it. Without it, an existing file is
    /// refused: a CA of another store of the home may use it.
    pub replace_key_file: bool,
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
        .map_err(|e| Error::corrupt(format!("stored CA certificate does not parse: {e}")))?;
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

    // The key: generated into the home folder, or an existing one. A generated key file is
    // removed again unless the CA is recorded (or may have been).
    let (signer, key_ref, mut orphan) = ca_key(home, store, keystore, &req)?;
    let (cert_der, chain_der, serial) = sign_ca_certificate(
        &req,
        &dn,
        &signer,
        parent.as_ref(),
        path_len,
        not_before,
        not_after,
    )?;
    let record = CaRecord {
        name: req.name.clone(),
        subject: dn_to_string(&dn),
        organization: org,
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
        cert_der,
        chain_der,
    };
    match store.create_ca(&record, ca_init_event(&record)) {
        Ok(()) => {
            orphan.keep();
            Ok(record)
        }
        // The commit's answer never came: what the store holds decides.
        Err(e @ Error::CommitUnknown { .. }) => {
            let name = req.name.clone();
            let settled = settle_outcome(
                store,
                e,
                || format!("m2mpki ca show {name}"),
                |s| {
                    Ok(s.ca(&req.name)?
                        .filter(|found| found.cert_der == record.cert_der))
                },
            );
            match settled {
                Ok(_) => {
                    orphan.keep();
                    Ok(record)
                }
                Err(Error::CommitUnknown { why, check }) => {
                    // The CA may be recorded: its key must stay.
                    let kept = orphan.keep();
                    Err(Error::CommitUnknown {
                        why: match kept {
                            Some(path) => {
                                format!("{why} (its new key is kept at {})", path.display())
                            }
                            None => why,
                        },
                        check,
                    })
                }
                Err(e) => Err(e),
            }
        }
        // A known refusal or failure: nothing was recorded, and the key file (ours alone:
        // created exclusively) goes.
        Err(e) => Err(e),
    }
}

/// A key file `ca init` generated, deleted on drop unless [`keep`](Self::keep) was called: an
/// error before the CA is recorded leaves no key behind. The file is this process's alone
/// (created exclusively), so deleting it never touches another CA's key.
struct OrphanKey(Option<std::path::PathBuf>);

impl OrphanKey {
    /// Keeps the file; returns its path, if there is one.
    fn keep(&mut self) -> Option<std::path::PathBuf> {
        self.0.take()
    }
}

impl Drop for OrphanKey {
    fn drop(&mut self) {
        if let Some(path) = self.0.take() {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// The new CA's key: generated into the home folder, or an existing one opened.
///
/// A generated key is written to `keys/NAME.key.pem` only if no file is there: the key folder
/// is shared by every store of the home, so a file there may be the key of a CA of another
/// store (after `store migrate`, a forgotten `--store` names the other one), and of two
/// racing `ca init`s of one name only the first to create the file goes on. A file that no
/// CA of *this* store uses is replaced only with `replace_key_file`.
fn ca_key(
    home: &Home,
    store: &dyn Store,
    keystore: &Keystore,
    req: &CaInit,
) -> Result<(Arc<dyn Signer>, KeyRef, OrphanKey)> {
    match &req.key {
        CaKey::Generate(kt) => {
            let relative = Home::ca_key_path(&req.name);
            let path = home.root().join(&relative);
            let overwrite = if req.replace_key_file && path.exists() {
                let stored = relative.display().to_string();
                if let Some(user) = store.cas()?.into_iter().find(|ca| ca.key == stored) {
                    return Err(Error::Policy(format!(
                        "{} is the key of CA `{}` of this store; it is never replaced",
                        path.display(),
                        user.name
                    )));
                }
                Overwrite::Replace
            } else {
                Overwrite::Refuse
            };
            let mut key = SoftwareKey::generate(*kt)?;
            match key.save(&path, keystore.passphrase(), overwrite) {
                Ok(()) => {}
                Err(m2mpki_hsm::Error::FileExists(_)) => {
                    return Err(Error::Policy(format!(
                        "{} exists already: it may be the key of a CA `{}` in another store of \
                         this home (check the store you meant with --store), or be left by a \
                         `ca init` that failed; it is not replaced. If no store uses it, remove \
                         it or give --force",
                        path.display(),
                        req.name
                    )))
                }
                Err(e) => return Err(e.into()),
            }
            Ok((
                Arc::new(key),
                KeyRef::File(path.clone()),
                OrphanKey(Some(path)),
            ))
        }
        CaKey::Existing(r) => Ok((keystore.open(r)?, r.clone(), OrphanKey(None))),
    }
}

/// Signs the CA certificate (self-signed, or by `parent`); returns it, the parent's chain and
/// its serial.
fn sign_ca_certificate(
    req: &CaInit,
    dn: &rcgen::DistinguishedName,
    signer: &Arc<dyn Signer>,
    parent: Option<&Authority>,
    path_len: Option<u8>,
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
) -> Result<(Vec<u8>, Vec<Vec<u8>>, Serial)> {
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
    params.key_identifier_method = KeyIdMethod::PreSpecified(key_identifier(signer.der_bytes()));
    params.use_authority_key_identifier_extension = parent.is_some();
    params.custom_extensions = req.name_constraints.to_extension().into_iter().collect();
    let subject_key = SharedSigner(signer.clone());
    match parent {
        None => Ok((
            params
                .self_signed(&subject_key)
                .map_err(Error::internal)?
                .der()
                .to_vec(),
            vec![],
            serial,
        )),
        Some(p) => {
            let cert = params
                .signed_by(&subject_key, &p.issuer)
                .map_err(|e| Error::Key(m2mpki_hsm::Error::Crypto(e.to_string())))?;
            let mut chain = vec![p.record.cert_der.clone()];
            chain.extend(p.record.chain_der.iter().cloned());
            Ok((cert.der().to_vec(), chain, serial))
        }
    }
}

/// The audit entry of a new CA.
fn ca_init_event(record: &CaRecord) -> AuditEvent {
    AuditEvent {
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
    }
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
    /// Who asked: recorded with the certificate and in its audit entry.
    pub requester: Requester,
}

/// A request that passed the profile and CA policy, ready to sign.
#[derive(Debug)]
pub struct Approved {
    fields: LeafFields,
    kind: ProfileKind,
    identity: Option<FieldNodeIdentity>,
    subject_key: SubjectKey,
    subject: String,
    requester: Requester,
}

impl Approved {
    /// The key under which one live certificate per subject is enforced.
    pub fn subject_key(&self) -> &SubjectKey {
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
                .map_err(|e| Error::corrupt(format!("CA `{name}` certificate: {e}")))?;
        let mut constraints = vec![record.name_constraints.clone()];
        let mut parent = record.parent.clone();
        while let Some(p) = parent {
            let pr = store.ca(&p)?.ok_or_else(|| {
                Error::corrupt(format!(
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
    pub fn subject_key(&self, subject: &LeafSubject) -> Result<SubjectKey> {
        Ok(match subject {
            LeafSubject::Device(id) => SubjectKey::FieldNode(FieldNodeIdentity::Device {
                hw_type: self.hw_type()?,
                id: id.clone(),
            }),
            LeafSubject::Node { enterprise, id } => {
                SubjectKey::FieldNode(FieldNodeIdentity::Node {
                    enterprise: enterprise.clone(),
                    id: id.clone(),
                })
            }
            LeafSubject::Server(fqdn) => SubjectKey::Server(fqdn.clone()),
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
            requester: req.requester,
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
                subject_key: approved.subject_key.to_string(),
                identity: approved.identity,
                subject: approved.subject,
                not_before: approved.fields.not_before.unix_timestamp(),
                not_after: approved.fields.not_after.unix_timestamp(),
                issued_at: now().unix_timestamp(),
                sha256,
                status: CertStatus::Valid,
                revoked_at: None,
                revocation_reason: None,
                requested_by: Some(approved.requester),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{CertFilter, RecordOutcome};

    const HW: &str = "1.3.6.1.4.1.99999.1";

    fn ca_req(name: &str, subject: &str, parent: Option<&str>) -> CaInit {
        CaInit {
            name: name.into(),
            subject: subject.into(),
            parent: parent.map(Into::into),
            key: CaKey::Generate(KeyType::P256),
            validity: None,
            not_before: None,
            path_len: None,
            hw_type: None,
            name_constraints: NameConstraints::default(),
            replace_key_file: false,
        }
    }

    struct Fx {
        _dir: tempfile::TempDir,
        home: Home,
        store: crate::RedbStore,
        keystore: Keystore,
    }

    fn fx() -> Fx {
        let dir = tempfile::tempdir().unwrap();
        let home = Home::open(&dir.path().join("home")).unwrap();
        let store = home.store().unwrap();
        Fx {
            _dir: dir,
            home,
            store,
            keystore: Keystore::default(),
        }
    }

    /// A root and an issuing CA that certifies devices (hwType), nodes below `acme.example`
    /// and servers below `m2m.example`.
    fn issuing(fx: &Fx) -> Authority {
        let mut root = ca_req("root", "CN=Root,O=Acme", None);
        root.hw_type = Some(HW.parse().unwrap());
        init_ca(&fx.home, &fx.store, &fx.keystore, root).unwrap();
        let mut ca = ca_req("ca", "CN=Issuing,O=Acme", Some("root"));
        ca.hw_type = Some(HW.parse().unwrap());
        ca.validity = Some(Validity::Years(10));
        ca.name_constraints =
            NameConstraints::new(&["m2m.example".into()], &[], &["acme.example".into()], &[])
                .unwrap();
        init_ca(&fx.home, &fx.store, &fx.keystore, ca).unwrap();
        Authority::load(&fx.home, &fx.store, &fx.keystore, "ca").unwrap()
    }

    fn spki() -> rcgen::SubjectPublicKeyInfo {
        let key = SoftwareKey::generate(KeyType::P256).unwrap();
        rcgen::SubjectPublicKeyInfo::from_der(&key.subject_public_key_info()).unwrap()
    }

    fn device(id: &str) -> LeafSubject {
        LeafSubject::Device(id.parse().unwrap())
    }

    fn node(enterprise: &str, id: &str) -> LeafSubject {
        LeafSubject::Node {
            enterprise: enterprise.parse().unwrap(),
            id: id.parse().unwrap(),
        }
    }

    fn server(fqdn: &str) -> LeafSubject {
        LeafSubject::Server(fqdn.parse().unwrap())
    }

    #[test]
    fn approval_follows_profile_and_ca_policy() {
        let fx = fx();
        let ca = issuing(&fx);
        let ca_end = ca.record.not_after;
        // (what, subject, profile, validity, expected: Ok(subject key, notAfter or None) or
        // Err(part of the message))
        type Expect = std::result::Result<(String, Option<i64>), &'static str>;
        let cases: Vec<(&str, LeafSubject, ProfileKind, Option<Validity>, Expect)> = vec![
            (
                "device, default lifetime: until the CA ends",
                device("SN-1"),
                ProfileKind::Device,
                None,
                Ok((format!("device:{HW}:SN-1"), Some(ca_end))),
            ),
            (
                "device, forever (802.1AR) is refused below a CA that ends",
                device("SN-2"),
                ProfileKind::Device,
                Some(Validity::Forever),
                Err("outlive CA"),
            ),
            (
                "node inside the URI constraint",
                node("acme.example", "pump-1"),
                ProfileKind::Node,
                Some(Validity::Days(30)),
                Ok(("node:acme.example:pump-1".into(), None)),
            ),
            (
                "node, forever is not a node lifetime",
                node("acme.example", "pump-2"),
                ProfileKind::Node,
                Some(Validity::Forever),
                Err("forever"),
            ),
            (
                "node outside the URI constraint",
                node("other.example", "pump-1"),
                ProfileKind::Node,
                None,
                Err("outside the URI name constraints"),
            ),
            (
                "server inside the DNS constraint",
                server("in.m2m.example"),
                ProfileKind::Server,
                None,
                Ok(("server:in.m2m.example".into(), None)),
            ),
            (
                "server outside the DNS constraint",
                server("in.other.example"),
                ProfileKind::Server,
                None,
                Err("outside the DNS name constraints"),
            ),
            (
                "a lifetime past the CA's end",
                server("in.m2m.example"),
                ProfileKind::Server,
                Some(Validity::Years(30)),
                Err("outlive CA"),
            ),
            (
                "request and profile of different kinds",
                device("SN-3"),
                ProfileKind::Server,
                None,
                Err("kinds differ"),
            ),
        ];
        for (what, subject, profile, validity, expect) in cases {
            let req = LeafRequest {
                subject: subject.clone(),
                public_key: spki(),
                validity,
                not_before: None,
                requester: Requester::Lab,
            };
            let got = ca.approve(&LeafProfile::builtin(profile), req);
            match (got, expect) {
                (Ok(a), Ok((key, not_after))) => {
                    assert_eq!(a.subject_key().to_string(), key, "{what}");
                    assert_eq!(
                        ca.subject_key(&subject).unwrap(),
                        key.parse().unwrap(),
                        "{what}"
                    );
                    if let Some(end) = not_after {
                        assert_eq!(a.fields.not_after.unix_timestamp(), end, "{what}");
                    }
                }
                (Err(e), Err(part)) => {
                    assert!(e.to_string().contains(part), "{what}: {e}");
                    if profile == subject.kind() {
                        assert_eq!(e.kind(), crate::ErrorKind::Refused, "{what}: {e}");
                    }
                }
                (got, expect) => panic!("{what}: got {got:?}, expected {expect:?}"),
            }
        }
    }

    #[test]
    fn ca_creation_rules() {
        let fx = fx();
        let root = init_ca(&fx.home, &fx.store, &fx.keystore, {
            let mut r = ca_req("root", "CN=Root,O=Acme", None);
            r.validity = Some(Validity::Years(5));
            r
        })
        .unwrap();
        assert_eq!(root.path_len, None, "a root is unconstrained by default");
        // An issuing CA: path length 0 by default, lifetime cut to the root's.
        let sub = init_ca(
            &fx.home,
            &fx.store,
            &fx.keystore,
            ca_req("sub", "CN=Sub,O=Acme", Some("root")),
        )
        .unwrap();
        assert_eq!(sub.path_len, Some(0));
        assert_eq!(sub.not_after, root.not_after);
        assert_eq!(sub.chain_der, vec![root.cert_der.clone()]);

        type Case = (&'static str, CaInit, &'static str);
        let cases: Vec<Case> = vec![
            (
                "duplicate name",
                ca_req("root", "CN=X,O=Acme", None),
                "exists",
            ),
            (
                "below a path length 0 CA",
                ca_req("deeper", "CN=Deeper,O=Acme", Some("sub")),
                "path length 0",
            ),
            (
                "an explicit lifetime past the parent's",
                {
                    let mut r = ca_req("long", "CN=Long,O=Acme", Some("root"));
                    r.validity = Some(Validity::Years(10));
                    r
                },
                "outlive its parent",
            ),
            (
                "a manufacturer CA without O",
                {
                    let mut r = ca_req("mfr", "CN=Mfr", None);
                    r.hw_type = Some(HW.parse().unwrap());
                    r
                },
                "O=<manufacturer>",
            ),
            (
                "an unknown parent",
                ca_req("orphan", "CN=O,O=Acme", Some("nope")),
                "nope",
            ),
            (
                "a bad name",
                ca_req("bad name/..", "CN=B,O=Acme", None),
                "CA name",
            ),
            ("a bad subject", ca_req("badsubj", "CN", None), "CN"),
        ];
        for (what, req, part) in cases {
            let name = req.name.clone();
            let err = init_ca(&fx.home, &fx.store, &fx.keystore, req).unwrap_err();
            assert!(err.to_string().contains(part), "{what}: {err}");
            if name != "root" {
                assert!(fx.store.ca(&name).unwrap().is_none(), "{what}");
            }
            assert!(
                !fx.home.root().join(Home::ca_key_path(&name)).exists() || name == "root",
                "{what}: a key file was left behind"
            );
        }
        assert_eq!(fx.store.cas().unwrap().len(), 2);
    }

    /// A store that refuses to record CAs, to show that a failure after the key was generated
    /// leaves no key file behind.
    struct RefusingStore(crate::RedbStore);

    impl Store for RefusingStore {
        fn backend(&self) -> String {
            self.0.backend()
        }
        fn export(&self, v: &mut dyn FnMut(crate::Item) -> Result<()>) -> Result<()> {
            self.0.export(v)
        }
        fn import(&self, i: &mut dyn Iterator<Item = Result<crate::Item>>) -> Result<u64> {
            self.0.import(i)
        }
        fn create_ca(&self, _: &CaRecord, _: AuditEvent) -> Result<()> {
            Err(Error::unavailable("disk full"))
        }
        fn ca(&self, name: &str) -> Result<Option<CaRecord>> {
            self.0.ca(name)
        }
        fn cas(&self) -> Result<Vec<CaRecord>> {
            self.0.cas()
        }
        fn record_certs(&self, c: &[NewCert], r: bool) -> Result<Vec<RecordOutcome>> {
            self.0.record_certs(c, r)
        }
        fn live_cert(&self, ca: &str, key: &str) -> Result<Option<Serial>> {
            self.0.live_cert(ca, key)
        }
        fn cert(&self, s: &Serial) -> Result<Option<(CertRecord, Vec<u8>)>> {
            self.0.cert(s)
        }
        fn certs(&self, f: &CertFilter) -> Result<Vec<CertRecord>> {
            self.0.certs(f)
        }
        fn audit_log(
            &self,
            v: &mut dyn FnMut(crate::audit::AuditEntry) -> Result<()>,
        ) -> Result<()> {
            self.0.audit_log(v)
        }
        fn create_root_set(&self, s: &crate::rootset::RootSet, e: AuditEvent) -> Result<()> {
            self.0.create_root_set(s, e)
        }
        fn root_set(&self, n: &str) -> Result<Option<crate::rootset::RootSet>> {
            self.0.root_set(n)
        }
        fn root_sets(&self) -> Result<Vec<crate::rootset::RootSet>> {
            self.0.root_sets()
        }
        fn modify_root_set(
            &self,
            n: &str,
            c: &mut dyn FnMut(&mut crate::rootset::RootSet) -> Result<AuditEvent>,
        ) -> Result<crate::rootset::RootSet> {
            self.0.modify_root_set(n, c)
        }
        fn revoke(
            &self,
            ca: &str,
            s: &Serial,
            r: crate::store::RevocationReason,
            at: i64,
        ) -> Result<CertRecord> {
            self.0.revoke(ca, s, r, at)
        }
        fn revoked(
            &self,
            ca: &str,
            v: &mut dyn FnMut(crate::store::RevokedEntry) -> Result<()>,
        ) -> Result<()> {
            self.0.revoked(ca, v)
        }
        fn next_crl_number(&self, ca: &str, d: serde_json::Value) -> Result<u64> {
            self.0.next_crl_number(ca, d)
        }
    }

    #[test]
    fn a_ca_that_is_not_recorded_leaves_no_key() {
        let fx = fx();
        let store = RefusingStore(fx.home.store().unwrap());
        drop(fx.store);
        let err = init_ca(
            &fx.home,
            &store,
            &fx.keystore,
            ca_req("root", "CN=Root,O=Acme", None),
        )
        .unwrap_err();
        assert!(err.to_string().contains("disk full"), "{err}");
        assert!(!fx.home.root().join(Home::ca_key_path("root")).exists());
    }

    /// Records what an issue did with the subject's new key.
    #[derive(Default)]
    struct Watched {
        kept: u32,
        discarded: u32,
        refuse: bool,
    }

    impl crate::NewKey for Watched {
        fn keep(&mut self) -> Result<()> {
            if self.refuse {
                return Err(Error::unavailable("the key's disk is full"));
            }
            self.kept += 1;
            Ok(())
        }
        fn discard(&mut self) {
            self.discarded += 1;
        }
        fn kept_at(&self) -> String {
            "memory".into()
        }
    }

    /// The key is kept before its certificate is recorded; when the commit records nothing
    /// (another issue of the subject came first) it is discarded; a key that cannot be kept
    /// stops the issue before anything is signed or recorded.
    #[test]
    fn a_new_key_is_kept_before_its_certificate_and_discarded_when_nothing_is_recorded() {
        let fx = fx();
        let ca = issuing(&fx);
        let profile = LeafProfile::builtin(ProfileKind::Device);
        let req = |id: &str| LeafRequest {
            subject: device(id),
            public_key: spki(),
            validity: None,
            not_before: None,
            requester: Requester::Lab,
        };
        let first = crate::prepare(&fx.store, &ca, &profile, req("K-1"), false).unwrap();
        let racing = crate::prepare(&fx.store, &ca, &profile, req("K-1"), false).unwrap();
        let mut key = Watched::default();
        first.commit_with_key(&fx.store, &mut key).unwrap();
        assert_eq!((key.kept, key.discarded), (1, 0));
        let mut late = Watched::default();
        let err = racing.commit_with_key(&fx.store, &mut late).unwrap_err();
        assert!(matches!(err, Error::AlreadyIssued { .. }), "{err}");
        assert_eq!((late.kept, late.discarded), (1, 1));
        let before = fx.store.certs(&CertFilter::default()).unwrap().len();
        let mut full = Watched {
            refuse: true,
            ..Watched::default()
        };
        let prepared = crate::prepare(&fx.store, &ca, &profile, req("K-2"), false).unwrap();
        let err = prepared.commit_with_key(&fx.store, &mut full).unwrap_err();
        assert_eq!(
            err.store_kind(),
            Some(m2mpki_store::Kind::Unavailable),
            "{err}"
        );
        assert_eq!(
            fx.store.certs(&CertFilter::default()).unwrap().len(),
            before
        );
    }
}
