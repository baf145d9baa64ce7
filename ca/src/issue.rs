//! Issuing one certificate: check, sign, record — in that order; a key the issuer made for
//! the subject is kept before its certificate is recorded.

use std::path::PathBuf;

use m2mpki_hsm::files::Overwrite;
use m2mpki_hsm::{Passphrase, SoftwareKey};

use crate::authority::{Approved, Authority, LeafRequest};
use crate::profile::LeafProfile;
use crate::store::{settle_outcome, NewCert, RecordOutcome, Store};
use crate::{Error, Result, SubjectKey};

/// A request that passed the profile and the ledger, not yet signed. Issuing in two steps
/// lets a caller do its own work in between (the CLI writes the new key file) knowing the
/// request will not be refused for what it asks; [`Prepared::commit`] signs and records.
#[derive(Debug)]
pub struct Prepared<'a> {
    authority: &'a Authority,
    approved: Approved,
    reissue: bool,
}

/// Checks `req` against `profile` and the ledger: refuses with [`Error::AlreadyIssued`] when
/// the subject already has a live certificate from this CA, unless `reissue`. Nothing is
/// signed or recorded.
pub fn prepare<'a>(
    store: &dyn Store,
    authority: &'a Authority,
    profile: &LeafProfile,
    req: LeafRequest,
    reissue: bool,
) -> Result<Prepared<'a>> {
    let approved = authority.approve(profile, req)?;
    if !reissue {
        let key = approved.subject_key();
        if let Some(serial) = store.live_cert(&authority.record.name, &key.to_string())? {
            return Err(Error::AlreadyIssued {
                ca: authority.record.name.clone(),
                identity: key.to_string(),
                serial: serial.to_string(),
            });
        }
    }
    Ok(Prepared {
        authority,
        approved,
        reissue,
    })
}

impl Prepared<'_> {
    /// The subject key the certificate will be recorded under.
    pub fn subject_key(&self) -> &SubjectKey {
        self.approved.subject_key()
    }

    /// Signs and records the certificate (with its audit entry). Another process may have
    /// recorded a live certificate for the subject since [`prepare`]: that is still refused
    /// with [`Error::AlreadyIssued`], and nothing is recorded.
    ///
    /// A commit whose answer never came ([`Error::CommitUnknown`]) is settled by reading the
    /// ledger again: the certificate recorded after all is success; one that is not there is
    /// an error that says nothing was recorded; an unreadable ledger leaves it
    /// `CommitUnknown`, naming the serial to look up. Only then may a caller treat the
    /// certificate as never issued (and, say, delete its new key).
    pub fn commit(self, store: &dyn Store) -> Result<NewCert> {
        let ca = self.authority.record.name.clone();
        let subject_key = self.approved.subject_key().clone();
        let cert = self.authority.sign(self.approved)?;
        let recorded = match store.record_certs(std::slice::from_ref(&cert), self.reissue) {
            Ok(outcomes) => outcomes,
            Err(e) => {
                let serial = cert.record.serial.clone();
                return settle_outcome(
                    store,
                    e,
                    || format!("m2mpki certs show {serial}"),
                    |s| {
                        Ok(s.cert(&cert.record.serial)?
                            .filter(|(_, der)| *der == cert.der)
                            .map(drop))
                    },
                )
                .map(|()| cert);
            }
        };
        match recorded.into_iter().next() {
            Some(RecordOutcome::Recorded) => Ok(cert),
            Some(RecordOutcome::AlreadyLive(serial)) => Err(Error::AlreadyIssued {
                ca,
                identity: subject_key.to_string(),
                serial: serial.to_string(),
            }),
            None => Err(Error::internal("the store returned no outcome")),
        }
    }
}

impl Prepared<'_> {
    /// [`commit`](Self::commit) for a certificate whose key the issuer made for the subject:
    /// the key is kept first (a recorded certificate always has its key), and discarded when
    /// the commit recorded nothing. When the outcome is unknown the key stays, and the error
    /// says where.
    pub fn commit_with_key(self, store: &dyn Store, key: &mut dyn NewKey) -> Result<NewCert> {
        key.keep()?;
        match self.commit(store) {
            Ok(cert) => Ok(cert),
            Err(Error::CommitUnknown { why, check }) => Err(Error::CommitUnknown {
                why: format!("{why} (the new key is kept at {})", key.kept_at()),
                check,
            }),
            Err(e) => {
                key.discard();
                Err(e)
            }
        }
    }
}

/// A key the issuer made for the subject of a certificate (the command line's `--key-out`,
/// later EST's `serverkeygen`), kept by [`Prepared::commit_with_key`] before the certificate
/// is recorded.
pub trait NewKey {
    /// Keeps the key durably (for a file: written, 0600, synced).
    fn keep(&mut self) -> Result<()>;
    /// Nothing was recorded: the key certifies nothing and must not stay behind.
    fn discard(&mut self);
    /// Where the key is kept, for the message of a commit whose outcome is unknown.
    fn kept_at(&self) -> String;
}

/// A new software key kept as a PKCS#8 file (encrypted when a passphrase is given).
pub struct KeyFile {
    key: SoftwareKey,
    path: PathBuf,
    passphrase: Option<Passphrase>,
    overwrite: Overwrite,
    written: bool,
}

impl std::fmt::Debug for KeyFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyFile")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl KeyFile {
    /// `key`, to be kept at `path`.
    pub fn new(
        key: SoftwareKey,
        path: PathBuf,
        passphrase: Option<Passphrase>,
        overwrite: Overwrite,
    ) -> Self {
        KeyFile {
            key,
            path,
            passphrase,
            overwrite,
            written: false,
        }
    }
}

impl NewKey for KeyFile {
    fn keep(&mut self) -> Result<()> {
        self.key
            .save(&self.path, self.passphrase.as_ref(), self.overwrite)?;
        self.written = true;
        Ok(())
    }

    fn discard(&mut self) {
        if self.written {
            let _ = std::fs::remove_file(&self.path);
            self.written = false;
        }
    }

    fn kept_at(&self) -> String {
        self.path.display().to_string()
    }
}

/// Checks `req` against `profile`, signs it and records it in `store` (with its audit entry):
/// [`prepare`] then [`Prepared::commit`]. The caller writes files only after this returns.
pub fn issue(
    store: &dyn Store,
    authority: &Authority,
    profile: &LeafProfile,
    req: LeafRequest,
    reissue: bool,
) -> Result<NewCert> {
    prepare(store, authority, profile, req, reissue)?.commit(store)
}

/// A leaf and its chain as PEM (leaf first, then intermediates; the root is not included).
pub fn chain_pem(leaf_der: &[u8], chain: &[&[u8]]) -> String {
    std::iter::once(leaf_der)
        .chain(chain.iter().copied())
        .map(|der| m2mpki_hsm::files::pem_encode("CERTIFICATE", der))
        .collect()
}
