//! A root credential's record as both credential stores keep it, and what its sealed value is
//! bound to.

use m2mpki_ca::FieldNodeIdentity;
use serde::{Deserialize, Serialize};

use crate::protocol::Admission;

/// The state of a root credential.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CredentialStatus {
    /// The identity's current credential.
    Live,
    /// Replaced by a later bootstrap of the same identity.
    Superseded,
}

/// A credential record (the credential itself only sealed).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CredentialRecord {
    /// Credential ID (32 hex digits).
    pub id: String,
    /// The field node's identity (stored in its canonical form).
    pub identity: FieldNodeIdentity,
    /// The set that admitted it.
    pub admitted_by: Admission,
    /// SHA-256 of the client certificate (hex).
    pub client_cert_sha256: String,
    /// When it was created (Unix time).
    pub created: i64,
    /// When it expires (Unix time).
    pub expires: i64,
    /// Live or superseded.
    pub status: CredentialStatus,
    /// The credential sealed under the store key (hex): AES-256-GCM bound to the record
    /// ([`Seal::Bound`]), or, for records of earlier versions, AES-256-KW (file key) or GCM
    /// without associated data (token key).
    pub sealed: String,
    /// How `sealed` was made; records of earlier versions have none ([`Seal::Unbound`]).
    #[serde(default, skip_serializing_if = "Seal::is_unbound")]
    pub seal: Seal,
    /// Credential ID it replaced, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub supersedes: Option<String>,
}

/// How a record's credential is sealed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Seal {
    /// Sealed alone (before this version): it would open under any record, so it is never
    /// served; `m2mpki bootstrap reseal` binds it.
    #[default]
    #[serde(rename = "unbound")]
    Unbound,
    /// AES-256-GCM with the record's [`binding`] as associated data: it opens only in the
    /// record it was sealed for.
    #[serde(rename = "bound-v1")]
    Bound,
}

impl Seal {
    pub(crate) fn is_unbound(&self) -> bool {
        *self == Seal::Unbound
    }
}

/// The associated data a credential is sealed with: what identifies the record (credential ID,
/// which is the KeID for TS-0003 credentials, identity, the admitting set, the client
/// certificate's hash, creation and expiry). A sealed value copied into another record, or a
/// record whose identity or expiry was changed, does not open.
pub fn binding(r: &CredentialRecord) -> Vec<u8> {
    let mut out = b"m2mpki credential binding v1".to_vec();
    let identity = r.identity.to_string();
    let created = r.created.to_string();
    let expires = r.expires.to_string();
    for part in [
        r.id.as_str(),
        identity.as_str(),
        r.admitted_by.set.as_str(),
        r.client_cert_sha256.as_str(),
        created.as_str(),
        expires.as_str(),
    ] {
        out.extend_from_slice(&(part.len() as u32).to_be_bytes());
        out.extend_from_slice(part.as_bytes());
    }
    out
}
