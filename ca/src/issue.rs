//! Issuing one certificate: check, sign, record — in that order.

use crate::authority::{Authority, LeafRequest};
use crate::profile::LeafProfile;
use crate::store::{NewCert, RecordOutcome, Store};
use crate::{Error, Result};

/// Checks `req` against `profile`, signs it and records it in `store` (with its audit entry).
///
/// Refuses with [`Error::AlreadyIssued`] when the subject already has a live certificate from
/// this CA, unless `reissue`. The caller writes files only after this returns.
pub fn issue(
    store: &dyn Store,
    authority: &Authority,
    profile: &LeafProfile,
    req: LeafRequest,
    reissue: bool,
) -> Result<NewCert> {
    let approved = authority.approve(profile, req)?;
    let already = |serial: crate::Serial| Error::AlreadyIssued {
        ca: authority.record.name.clone(),
        identity: approved.subject_key().to_owned(),
        serial: serial.to_string(),
    };
    if !reissue {
        if let Some(serial) = store.live_cert(&authority.record.name, approved.subject_key())? {
            return Err(already(serial));
        }
    }
    let cert = authority.sign(approved)?;
    match store
        .record_certs(std::slice::from_ref(&cert), reissue)?
        .pop()
    {
        Some(RecordOutcome::Recorded) => Ok(cert),
        Some(RecordOutcome::AlreadyLive(serial)) => Err(Error::AlreadyIssued {
            ca: authority.record.name.clone(),
            identity: cert.record.subject_key.clone(),
            serial: serial.to_string(),
        }),
        None => Err(Error::internal("the store returned no outcome")),
    }
}

/// A leaf and its chain as PEM (leaf first, then intermediates; the root is not included).
pub fn chain_pem(leaf_der: &[u8], chain: &[&[u8]]) -> String {
    std::iter::once(leaf_der)
        .chain(chain.iter().copied())
        .map(|der| m2mpki_hsm::files::pem_encode("CERTIFICATE", der))
        .collect()
}
