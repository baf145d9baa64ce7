//! Revocation and CRLs.
//!
//! Revoking is one small transaction (the certificate's record, an index entry under its CA,
//! the audit entry): O(log n), whatever the CA's size. A CRL is built by one ordered scan of
//! that CA's index, skipping certificates that have expired.

use rcgen::{CertificateRevocationListParams, KeyIdMethod, RevokedCertParams, SerialNumber};
use serde::Serialize;
use time::OffsetDateTime;
use x509_parser::prelude::FromDer;

use crate::authority::{sign_failed, Authority};
use crate::serial::Serial;
use crate::store::{settle_outcome, CertRecord, CertStatus, Store};
use crate::validity::Validity;
use crate::{Error, Result};

pub use crate::store::{RevocationReason, RevokedEntry};

/// A signed CRL.
#[derive(Clone, Debug, Serialize)]
pub struct IssuedCrl {
    /// The CA.
    pub ca: String,
    /// CRL number.
    pub number: u64,
    /// Entries listed.
    pub entries: usize,
    /// thisUpdate (Unix time).
    pub this_update: i64,
    /// nextUpdate (Unix time).
    pub next_update: i64,
    /// The CRL.
    #[serde(skip)]
    pub der: Vec<u8>,
}

/// Revokes certificate `serial` of CA `ca` at `at` (with its audit entry). A commit whose
/// answer never came is settled by reading the certificate again: revoked at `at` with
/// `reason` is success; still unrevoked says nothing was recorded.
pub fn revoke(
    store: &dyn Store,
    ca: &str,
    serial: &Serial,
    reason: RevocationReason,
    at: i64,
) -> Result<CertRecord> {
    store.revoke(ca, serial, reason, at).or_else(|e| {
        settle_outcome(
            store,
            e,
            || format!("m2mpki certs show {serial}"),
            |s| {
                Ok(s.cert(serial)?.map(|(r, _)| r).filter(|r| {
                    r.status == CertStatus::Revoked
                        && r.revoked_at == Some(at)
                        && r.revocation_reason == Some(reason)
                }))
            },
        )
    })
}

/// Builds and signs the CRL of `authority`: every revoked, unexpired certificate, with the
/// next CRL number (monotonic per CA).
pub fn issue_crl(
    store: &dyn Store,
    authority: &Authority,
    next_update: Validity,
) -> Result<IssuedCrl> {
    let ca = &authority.record;
    let this_update = OffsetDateTime::now_utc()
        .replace_nanosecond(0)
        .map_err(Error::internal)?;
    let next = next_update.not_after(this_update);
    if matches!(next_update, Validity::Forever) {
        return Err(Error::invalid(
            "--next-update",
            "forever",
            "a CRL must say when the next one is due",
        ));
    }
    let now = this_update.unix_timestamp();
    let mut revoked = Vec::new();
    store.revoked(&ca.name, &mut |e| {
        if e.not_after >= now {
            revoked.push(RevokedCertParams {
                serial_number: SerialNumber::from_slice(e.serial.as_bytes()),
                revocation_time: OffsetDateTime::from_unix_timestamp(e.revoked_at)
                    .map_err(Error::internal)?,
                reason_code: match e.reason {
                    // RFC 5280 §5.3.1: the unspecified code SHOULD be absent.
                    RevocationReason::Unspecified => None,
                    r => Some(r.to_rcgen()),
                },
                invalidity_date: None,
            });
        }
        Ok(())
    })?;
    let entries = revoked.len();
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(&ca.cert_der)
        .map_err(Error::internal)?;
    let ski = cert
        .extensions()
        .iter()
        .find_map(|e| match e.parsed_extension() {
            x509_parser::extensions::ParsedExtension::SubjectKeyIdentifier(k) => Some(k.0.to_vec()),
            _ => None,
        })
        .ok_or_else(|| Error::internal("CA certificate has no subject key identifier"))?;
    let number = store
        .next_crl_number(
            &ca.name,
            serde_json::json!({ "entries": entries, "next_update": next.unix_timestamp() }),
        )
        .map_err(|e| match e {
            // A number may have been taken; which one cannot be told. Numbers only need to
            // grow (RFC 5280 §5.2.3), so the next run simply takes a higher one.
            Error::CommitUnknown { why, check } => Error::CommitUnknown {
                why: format!(
                    "{why} (a CRL number of CA `{}`: no CRL was signed or written; the next \
                     `m2mpki crl` takes a higher number)",
                    ca.name
                ),
                check,
            },
            e => e,
        })?;
    let params = CertificateRevocationListParams {
        this_update,
        next_update: next,
        crl_number: SerialNumber::from(number),
        issuing_distribution_point: None,
        revoked_certs: revoked,
        key_identifier_method: KeyIdMethod::PreSpecified(ski),
    };
    let crl = params.signed_by(authority.issuer()).map_err(sign_failed)?;
    Ok(IssuedCrl {
        ca: ca.name.clone(),
        number,
        entries,
        this_update: now,
        next_update: next.unix_timestamp(),
        der: crl.der().to_vec(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_parse_in_any_spelling() {
        assert_eq!(
            "keyCompromise".parse::<RevocationReason>().unwrap(),
            RevocationReason::KeyCompromise
        );
        assert_eq!(
            "key-compromise".parse::<RevocationReason>().unwrap(),
            RevocationReason::KeyCompromise
        );
        assert_eq!(
            "CA_COMPROMISE".parse::<RevocationReason>().unwrap(),
            RevocationReason::CaCompromise
        );
        assert!("certificateHold".parse::<RevocationReason>().is_err());
        assert_eq!(
            serde_json::to_string(&RevocationReason::CaCompromise).unwrap(),
            "\"cACompromise\""
        );
    }
}
