//! What a batch did: its report, kept apart from the batch engine so that the error of a
//! batch that left key files unpaired can carry it.

use std::path::PathBuf;

use serde::Serialize;

/// What a batch did.
#[derive(Debug, Default, Clone, Serialize)]
pub struct BatchReport {
    /// Subjects in the input.
    pub total: usize,
    /// Certificates issued now.
    pub issued: usize,
    /// Subjects that already had a live certificate (not issued again).
    pub already_issued: usize,
    /// Certificate files rewritten from the ledger because they were missing.
    pub files_restored: usize,
    /// IDs whose certificate exists but whose generated key file is missing.
    pub missing_keys: Vec<String>,
    /// IDs whose key file in the output folder is not the key of their certificate. Their
    /// certificate file was not written: a certificate is never left beside a key that is not
    /// its own. [`run_batch`](crate::batch::run_batch) returns a non-empty list as
    /// [`Error::KeyMismatches`](crate::Error::KeyMismatches), carrying this report: no caller
    /// can take such a batch for a complete one.
    pub key_mismatches: Vec<KeyMismatch>,
}

/// A key file that does not belong to the certificate it would sit beside.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KeyMismatch {
    /// The pre-provisioned ID.
    pub id: String,
    /// The key file (`<ID>.key.pem` in the output folder).
    pub key_file: PathBuf,
    /// Why it does not pair with the certificate.
    pub reason: String,
}
