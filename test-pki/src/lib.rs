//! Test fixtures for m2mpki's tests and benches: everything of `m2mpki-lab` (the lab PKI
//! builder, re-exported here so tests name one crate), plus what only tests need: throwaway
//! PostgreSQL databases ([`pg`]), SoftHSM2 tokens in a process of their own per test
//! ([`softhsm::isolated`]), the connection floods of the hostile tests ([`hostile`]) and
//! certificates forged past every check ([`forge_node`]).
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod hostile;
pub mod pg;
pub mod softhsm;

pub use m2mpki_lab::*;

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use m2mpki_ca::Home;
use m2mpki_hsm::files::{self, Overwrite};
use m2mpki_hsm::{KeyType, SoftwareKey};

/// A node certificate that the CA `ca` of `home` (a software key of the lab) never issued: made
/// with rcgen and signed with the CA's key file directly, bypassing every check m2mpki makes
/// before it signs. It carries clientAuth, a fresh P-256 key and the subjectAltName URIs given,
/// so a verifier has only the CA's constraints to refuse it by. Writes `<name>.pem` (the leaf,
/// then the CA certificate) and `<name>.key.pem` into `dir`.
pub fn forge_node(
    home: &Path,
    ca: &str,
    uris: &[&str],
    dir: &Path,
    name: &str,
) -> Result<(PathBuf, PathBuf)> {
    let home = Home::open(home)?;
    let record =
        m2mpki_ca::Store::ca(&home.store()?, ca)?.with_context(|| format!("no CA `{ca}`"))?;
    let ca_key = SoftwareKey::load(&home.root().join(Home::ca_key_path(ca)), None)?;
    let issuer = rcgen::Issuer::from_ca_cert_der(&record.cert_der.clone().into(), &ca_key)?;
    let mut params = rcgen::CertificateParams::default();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    params.subject_alt_names = uris
        .iter()
        .map(|u| Ok(rcgen::SanType::URI((*u).try_into()?)))
        .collect::<Result<_>>()?;
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
    params.use_authority_key_identifier_extension = true;
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + time::Duration::days(30);
    let mut serial = [0u8; 16];
    aws_lc_rs::rand::fill(&mut serial).map_err(|_| anyhow::anyhow!("no randomness"))?;
    serial[0] &= 0x7f;
    params.serial_number = Some(rcgen::SerialNumber::from_slice(&serial));
    let mut key = SoftwareKey::generate(KeyType::P256)?;
    let cert = params.signed_by(&key, &issuer)?;
    let chain = dir.join(format!("{name}.pem"));
    let pem: String = [cert.der().to_vec(), record.cert_der.clone()]
        .iter()
        .map(|d| files::pem_encode("CERTIFICATE", d))
        .collect();
    std::fs::write(&chain, pem)?;
    let key_path = dir.join(format!("{name}.key.pem"));
    key.save(&key_path, None, Overwrite::Replace)?;
    Ok((chain, key_path))
}
