//! The m2mpki certificate authority: CAs, certificate profiles, field-node identities,
//! issuance (one at a time or in batches), the issuance ledger and the audit log.
//!
//! Everything that signs goes through [`m2mpki_hsm::Signer`], so software and PKCS#11 keys
//! issue alike. Everything that is remembered goes through the [`Store`] trait; the embedded
//! implementation is [`RedbStore`]; [`PgStore`] shares one ledger between processes and hosts.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod audit;
mod authority;
pub mod batch;
mod batch_report;
pub mod consistency;
mod constraints;
mod crl_status;
pub mod der;
pub mod dn;
mod error;
mod hex_serde;
mod home;
pub mod identity;
pub mod input;
mod issue;
mod leaf_der;
mod location;
mod path;
pub use m2mpki_store::pg;
mod pg_store;
pub mod profile;
mod redb_store;
mod refusal;
mod requester;
pub mod revocation;
pub mod roots;
pub mod rootset;
mod serial;
pub mod store;
pub mod validity;
pub mod verify;

pub use authority::{
    init_ca, Approved, Authority, CaInit, CaKey, LeafRequest, LeafSubject, DEFAULT_CA_VALIDITY,
};
pub use constraints::NameConstraints;
pub use error::{Error, ErrorKind, Result};
pub use home::Home;
pub use identity::{DnsName, FieldNodeIdentity, Oid, PreProvisionedId, SubjectKey};
pub use issue::{chain_pem, issue, prepare, KeyFile, NewKey, Prepared};
pub use location::StoreLocation;
pub use pg_store::PgStore;
pub use redb_store::{guarded, open_database, quiet_guarded_panics, RedbStore};
pub use requester::Requester;
pub use serial::Serial;
pub use store::{
    CaRecord, CertFilter, CertRecord, CertStatus, Item, NewCert, RecordOutcome, Store,
};
