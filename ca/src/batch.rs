//! Batch issuance for production lines: parallel, group-committed, rerunnable.
//!
//! Work goes in chunks. For each chunk the subjects that already hold a live certificate are
//! skipped (their files are rewritten from the ledger if missing); the rest are signed on all
//! cores, their key files written and synced, then the whole chunk is recorded in one durable
//! transaction, and only then are the certificate files written (not synced: a rerun rewrites
//! any that a power cut lost, from the ledger). A process killed at any
//! instant therefore leaves: no certificate file without its record, no serial reused, and a
//! rerun that issues exactly what is missing.
//!
//! Output is a file per certificate (`<ID>.pem` or `<ID>.der`), or with [`BatchOutput::Bundle`]
//! one JSON Lines file per chunk (`bundle-<N>.jsonl`, see [`BundleLine`]) beside `chain.pem`.
//! Creating a file costs the file system far more than signing a certificate costs the CPU
//! (see docs/benchmarks.md), so lines that issue tens of thousands at a time want bundles.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use m2mpki_hsm::files::{self, Mode, Overwrite, WriteOptions};
use m2mpki_hsm::{KeyType, Passphrase, SoftwareKey};
use rayon::prelude::*;
use rcgen::PublicKeyData;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::authority::{Authority, LeafRequest, LeafSubject};
use crate::identity::{DnsName, PreProvisionedId};
use crate::input::VerifiedCsr;
use crate::issue::chain_pem;
use crate::profile::{LeafProfile, ProfileKind};
use crate::store::{CertRecord, NewCert, RecordOutcome, Store};
use crate::validity::Validity;
use crate::{Error, Result};

/// Where the public keys of a batch come from.
#[derive(Debug)]
pub enum BatchInput {
    /// Generate a key per ID (written beside the certificate as `<ID>.key.pem`).
    Ids(Vec<PreProvisionedId>),
    /// One verified CSR per ID.
    Csrs(Vec<(PreProvisionedId, VerifiedCsr)>),
}

impl BatchInput {
    /// How many subjects.
    pub fn len(&self) -> usize {
        match self {
            BatchInput::Ids(v) => v.len(),
            BatchInput::Csrs(v) => v.len(),
        }
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// How to run a batch.
#[derive(Debug, Clone)]
pub struct BatchOptions {
    /// device or node.
    pub profile: ProfileKind,
    /// The enterprise, for node batches.
    pub enterprise: Option<DnsName>,
    /// Key type for generated keys.
    pub key_type: KeyType,
    /// Passphrase for generated key files, if they are to be encrypted.
    pub key_passphrase: Option<Passphrase>,
    /// Lifetime; the profile's default when `None`.
    pub validity: Option<Validity>,
    /// notBefore; now when `None`.
    pub not_before: Option<OffsetDateTime>,
    /// Output folder.
    pub out_dir: PathBuf,
    /// Issue a new certificate even when the ID has a live one.
    pub reissue: bool,
    /// How certificates are written.
    pub output: BatchOutput,
    /// Subjects per durable transaction.
    pub chunk_size: usize,
    /// Who runs the batch: recorded with every certificate and in its audit entry.
    pub requester: crate::Requester,
}

/// How a batch writes what it issues.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BatchOutput {
    /// `<ID>.pem`: the certificate and its chain (without the root), one file per certificate.
    Pem,
    /// `<ID>.der`: the certificate alone, one file per certificate.
    Der,
    /// `bundle-<N>.jsonl`, one per chunk, a [`BundleLine`] per certificate, and `chain.pem`
    /// once. Generated keys go to `keys-<N>.jsonl` (0600, synced before the chunk is
    /// recorded), a line `{"id": ID, "key": PKCS#8 PEM}` per key.
    Bundle,
}

/// One certificate in a `bundle-<N>.jsonl` file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BundleLine {
    /// The pre-provisioned ID.
    pub id: String,
    /// The canonical identity (`device:<hwType>:<ID>` or `node:<enterprise>:<ID>`).
    pub identity: String,
    /// Certificate serial number (hex).
    pub serial: String,
    /// The certificate, PEM (leaf only; the chain is in `chain.pem`).
    pub certificate: String,
}

/// One generated key in a `keys-<N>.jsonl` file: `{"id": ID, "serial": hex, "key": PKCS#8
/// PEM}` (the PEM is encrypted when the batch was given a passphrase). `serial` names the
/// certificate the key was made for: keys are synced before their chunk is recorded, so a run
/// killed in between leaves key lines whose serial is in no bundle (and no ledger); the rerun
/// makes new keys for those IDs, and the pair to use is the one whose serials match.
#[derive(Serialize)]
struct KeyLine<'a> {
    id: String,
    serial: String,
    key: &'a str,
}

pub use crate::batch_report::{BatchReport, KeyMismatch};

/// Whether the key file at `path`, if there is one, is the key of the public key `spki` (DER
/// SubjectPublicKeyInfo). `None`: no file, or the file holds exactly that key. `Some(reason)`:
/// a file is there and it is not (or cannot be shown to be) that key.
fn key_file_mismatch(
    path: &Path,
    spki: &[u8],
    passphrase: Option<&Passphrase>,
) -> Result<Option<String>> {
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io(path, e)),
        Ok(_) => {}
    }
    match SoftwareKey::load(path, passphrase) {
        Ok(key) if m2mpki_hsm::Signer::matches(&key, spki) => Ok(None),
        Ok(_) => Ok(Some(
            "the key file holds a different key than the certificate's".into(),
        )),
        Err(e) => Ok(Some(format!("the key file cannot be read to compare: {e}"))),
    }
}

/// Removes a file; one that is already gone is fine.
fn remove_if_present(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(Error::io(path, e)),
        _ => Ok(()),
    }
}

/// The DER SubjectPublicKeyInfo of a certificate from the ledger.
fn cert_spki(der: &[u8]) -> Result<Vec<u8>> {
    use x509_parser::prelude::FromDer;
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(der)
        .map_err(|e| Error::corrupt(format!("a certificate in the ledger does not parse: {e}")))?;
    Ok(cert.tbs_certificate.subject_pki.raw.to_vec())
}

/// Reads an ID list: one ID per line; blank lines and lines starting with `#` are skipped.
/// Errors name the file and line; a repeated ID is an error.
pub fn load_ids(path: &Path) -> Result<Vec<PreProvisionedId>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::BadFile {
        path: path.to_owned(),
        reason: e.to_string(),
    })?;
    let mut seen: HashMap<PreProvisionedId, usize> = HashMap::new();
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let at = |reason: String| Error::BadFile {
            path: path.to_owned(),
            reason: format!("line {}: {reason}", n + 1),
        };
        let id: PreProvisionedId = line.parse().map_err(|e: Error| at(e.to_string()))?;
        if let Some(first) = seen.insert(id.clone(), n + 1) {
            return Err(at(format!("ID `{id}` repeats line {first}")));
        }
        out.push(id);
    }
    Ok(out)
}

/// Threads reading CSR files for [`load_csr_dir`].
const CSR_READERS: usize = 8;
/// CSRs read ahead of the checking threads, at most.
const READ_AHEAD: usize = 4096;

/// Reads every file in `dir` as a CSR (in parallel), verifying each self-signature.
///
/// The ID of each CSR is its subject serialNumber attribute; a CSR without one takes the file
/// name without its extension (`SN-0001.csr` → `SN-0001`). Any bad CSR fails the whole load,
/// naming the file (the first bad one in name order), before anything is issued.
pub fn load_csr_dir(dir: &Path) -> Result<Vec<(PreProvisionedId, VerifiedCsr)>> {
    let bad_dir = |e: std::io::Error| Error::BadFile {
        path: dir.to_owned(),
        reason: e.to_string(),
    };
    let mut paths = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(bad_dir)? {
        let path = entry.map_err(bad_dir)?.path();
        let hidden = path
            .file_name()
            .and_then(|n| n.to_str())
            .is_none_or(|n| n.starts_with('.'));
        if path.is_file() && !hidden {
            paths.push(path);
        }
    }
    paths.sort();
    let check = |path: &Path, bytes: std::io::Result<Vec<u8>>| {
        let bytes = bytes.map_err(|e| Error::BadFile {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
        let csr = VerifiedCsr::from_bytes(&bytes, &path.display().to_string())?;
        let id_text = match &csr.serial_number {
            Some(sn) => sn.clone(),
            None => path
                .file_stem()
                .and_then(|s| s.to_str())
                .unwrap_or_default()
                .to_owned(),
        };
        let id = id_text.parse().map_err(|e: Error| Error::BadCsr {
            source_name: path.display().to_string(),
            reason: format!("no usable ID: {e}"),
        })?;
        Ok((id, csr))
    };
    // Reading and checking overlap: a few threads read the files in name order (a folder that
    // is not in the page cache costs a disk round trip per file, which the checking threads
    // would otherwise sit out), and every core checks signatures as the bytes arrive.
    let mut checked: Vec<(usize, Result<(PreProvisionedId, VerifiedCsr)>)> =
        std::thread::scope(|scope| {
            let (tx, rx) = std::sync::mpsc::sync_channel(READ_AHEAD);
            for first in 0..CSR_READERS.min(paths.len()) {
                let (tx, paths) = (tx.clone(), &paths);
                scope.spawn(move || {
                    for i in (first..paths.len()).step_by(CSR_READERS) {
                        if tx.send((i, std::fs::read(&paths[i]))).is_err() {
                            break;
                        }
                    }
                });
            }
            drop(tx);
            rx.into_iter()
                .par_bridge()
                .map(|(i, bytes)| (i, check(&paths[i], bytes)))
                .collect()
        });
    // Name order, so that the error reported is the first bad file's, whatever the timing.
    checked.sort_unstable_by_key(|(i, _)| *i);
    let csrs: Vec<(PreProvisionedId, VerifiedCsr)> =
        checked.into_iter().map(|(_, r)| r).collect::<Result<_>>()?;
    let mut seen: HashMap<&PreProvisionedId, usize> = HashMap::new();
    for (i, (id, _)) in csrs.iter().enumerate() {
        if let Some(first) = seen.insert(id, i) {
            return Err(Error::BadFile {
                path: dir.to_owned(),
                reason: format!(
                    "ID `{id}` appears in both {} and {}",
                    paths[first].display(),
                    paths[i].display()
                ),
            });
        }
    }
    Ok(csrs)
}

struct OutDir {
    path: PathBuf,
    handle: File,
}

impl OutDir {
    /// Opens the output folder and takes its batch lock, so two batches never share it.
    fn lock(path: &Path) -> Result<Self> {
        std::fs::create_dir_all(path).map_err(|e| Error::io(path, e))?;
        let lock_path = path.join(".m2mpki-batch.lock");
        let lock = File::create(&lock_path).map_err(|e| Error::io(&lock_path, e))?;
        rustix::fs::flock(&lock, rustix::fs::FlockOperation::NonBlockingLockExclusive).map_err(
            |_| Error::BadFile {
                path: path.to_owned(),
                reason: "another batch is writing to this folder".into(),
            },
        )?;
        // Temporary files of a killed run are garbage: their content was never renamed in.
        if let Ok(entries) = std::fs::read_dir(path) {
            for e in entries.flatten() {
                let name = e.file_name();
                let name = name.to_string_lossy();
                if name.starts_with(".m2mpki-") && name.ends_with(".tmp") {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        // The lock lives as long as this handle.
        Ok(OutDir {
            path: path.to_owned(),
            handle: lock,
        })
    }

    fn sync(&self) -> Result<()> {
        rustix::fs::syncfs(&self.handle).map_err(|e| Error::io(&self.path, e.into()))
    }
}

/// What the bundles already in an output folder hold.
#[derive(Default)]
struct Bundles {
    /// IDs in `bundle-<N>.jsonl` files.
    certs: HashSet<String>,
    /// (ID, serial) pairs in `keys-<N>.jsonl` files.
    keys: HashSet<(String, String)>,
    /// The next free bundle number.
    next: u64,
}

impl Bundles {
    /// Reads every bundle in `dir`. A line that is not a bundle entry is an error naming the
    /// file and line: a damaged bundle is for a person to look at, not for a batch to overwrite.
    fn scan(dir: &Path) -> Result<Self> {
        #[derive(Deserialize)]
        struct IdOnly {
            id: String,
            #[serde(default)]
            serial: String,
        }
        let bad = |path: &Path, reason: String| Error::BadFile {
            path: path.to_owned(),
            reason,
        };
        let mut out = Bundles::default();
        for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
            let path = entry.map_err(|e| Error::io(dir, e))?.path();
            let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
                continue;
            };
            let Some((kind, rest)) = name.split_once('-') else {
                continue;
            };
            let Some(n) = rest
                .strip_suffix(".jsonl")
                .and_then(|n| n.parse::<u64>().ok())
            else {
                continue;
            };
            let keys = match kind {
                "bundle" => false,
                "keys" => true,
                _ => continue,
            };
            out.next = out.next.max(n + 1);
            let file = File::open(&path).map_err(|e| Error::io(&path, e))?;
            for (i, line) in BufReader::new(file).lines().enumerate() {
                let line = line.map_err(|e| bad(&path, format!("line {}: {e}", i + 1)))?;
                if line.trim().is_empty() {
                    continue;
                }
                let entry: IdOnly = serde_json::from_str(&line).map_err(|e| {
                    bad(
                        &path,
                        format!(
                            "line {}: not a bundle entry ({})",
                            i + 1,
                            json_error_kind(&e)
                        ),
                    )
                })?;
                if keys {
                    out.keys.insert((entry.id, entry.serial));
                } else {
                    out.certs.insert(entry.id);
                }
            }
        }
        Ok(out)
    }
}

/// A short name for a serde_json error's class, without echoing the input (a key bundle's line
/// must not end up in an error message).
fn json_error_kind(e: &serde_json::Error) -> &'static str {
    match e.classify() {
        serde_json::error::Category::Io => "read error",
        serde_json::error::Category::Syntax => "invalid JSON",
        serde_json::error::Category::Data => "missing or mistyped `id`",
        serde_json::error::Category::Eof => "truncated JSON",
    }
}

/// JSON Lines: one serialized value per line.
fn jsonl<T: Serialize>(items: impl IntoIterator<Item = T>) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    for item in items {
        serde_json::to_writer(&mut out, &item).map_err(Error::internal)?;
        out.push(b'\n');
    }
    Ok(out)
}

const NO_SYNC: WriteOptions = WriteOptions {
    mode: Mode::Public,
    overwrite: Overwrite::Replace,
    sync: false,
};

/// A signed certificate on its way to the writer, beside its ledger record.
struct Signed<'a> {
    id: &'a PreProvisionedId,
    /// The generated key (ID batches).
    key_pem: Option<zeroize::Zeroizing<String>>,
    /// What goes out once the certificate is recorded: its bundle line, or its file.
    output: Vec<u8>,
}

/// One chunk for the writer: new certificates (`certs[i]` belongs to `signed[i]`), lines
/// restored from the ledger, and how many subjects the chunk held.
struct Chunk<'a> {
    certs: Vec<NewCert>,
    signed: Vec<Signed<'a>>,
    restored: Vec<BundleLine>,
    total: usize,
}

/// A subject still to be issued: its ID, its subject and its CSR (CSR batches).
type Todo<'i> = (&'i PreProvisionedId, LeafSubject, &'i Option<VerifiedCsr>);

/// What one batch run works with, set up once; its stages are the methods below.
struct Run<'a> {
    store: &'a dyn Store,
    authority: &'a Authority,
    opts: &'a BatchOptions,
    profile: LeafProfile,
    out: OutDir,
    chain: Vec<&'a [u8]>,
    bundled: bool,
    generate_keys: bool,
    /// What earlier runs left in the bundles of the output folder.
    existing: Bundles,
    next_bundle: std::sync::atomic::AtomicU64,
}

/// Runs a batch. `progress` is told how many subjects each finished chunk held.
///
/// Signing (all cores) and recording + writing files (one thread) overlap: while chunk k is
/// being made durable and written out, chunk k+1 is being signed. The writer is the one
/// serial stage, so everything that can be prepared in parallel (the output bytes of each
/// certificate) is prepared by the signers.
pub fn run_batch(
    store: &dyn Store,
    authority: &Authority,
    input: BatchInput,
    opts: &BatchOptions,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<BatchReport> {
    let run = Run::start(store, authority, &input, opts)?;
    let mut report = BatchReport {
        total: input.len(),
        ..BatchReport::default()
    };
    // One list of (ID, optional CSR) so both inputs share the loop below.
    let items: Vec<(PreProvisionedId, Option<VerifiedCsr>)> = match input {
        BatchInput::Ids(ids) => ids.into_iter().map(|id| (id, None)).collect(),
        BatchInput::Csrs(c) => c.into_iter().map(|(id, csr)| (id, Some(csr))).collect(),
    };
    let (issued, already) = std::thread::scope(|scope| -> Result<(usize, usize)> {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Chunk<'_>>(1);
        let run = &run;
        let writer = scope.spawn(move || -> Result<(usize, usize)> {
            let (mut issued, mut already) = (0, 0);
            for chunk in rx {
                let (i, a) = run.write_chunk(chunk, progress)?;
                issued += i;
                already += a;
            }
            Ok((issued, already))
        });
        let produced = (|| -> Result<()> {
            for chunk in items.chunks(opts.chunk_size.max(1)) {
                let (todo, restored) = run.triage(chunk, &mut report)?;
                let (certs, signed) = run.sign(todo)?;
                let chunk = Chunk {
                    certs,
                    signed,
                    restored,
                    total: chunk.len(),
                };
                if tx.send(chunk).is_err() {
                    // The writer failed; its error is reported below.
                    break;
                }
            }
            Ok(())
        })();
        drop(tx);
        let written = writer
            .join()
            .map_err(|_| Error::internal("the batch writer thread panicked"))?;
        produced?;
        written
    })?;
    report.issued += issued;
    report.already_issued += already;
    if !report.key_mismatches.is_empty() {
        return Err(Error::KeyMismatches(Box::new(report)));
    }
    Ok(report)
}

impl<'a> Run<'a> {
    /// Locks the output folder and reads what earlier runs left there (bundles); a bundled
    /// run writes the CA chain beside its bundles.
    fn start(
        store: &'a dyn Store,
        authority: &'a Authority,
        input: &BatchInput,
        opts: &'a BatchOptions,
    ) -> Result<Self> {
        let out = OutDir::lock(&opts.out_dir)?;
        let chain = authority.chain_without_root();
        let bundled = opts.output == BatchOutput::Bundle;
        let existing = if bundled {
            let chain_text: String = chain
                .iter()
                .map(|der| files::pem_encode("CERTIFICATE", der))
                .collect();
            files::write_atomic(&out.path.join("chain.pem"), chain_text.as_bytes(), NO_SYNC)?;
            Bundles::scan(&out.path)?
        } else {
            Bundles::default()
        };
        Ok(Run {
            store,
            authority,
            opts,
            profile: LeafProfile::builtin(opts.profile),
            next_bundle: std::sync::atomic::AtomicU64::new(existing.next),
            out,
            chain,
            bundled,
            generate_keys: matches!(input, BatchInput::Ids(_)),
            existing,
        })
    }

    fn subject(&self, id: &PreProvisionedId) -> Result<LeafSubject> {
        match self.opts.profile {
            ProfileKind::Device => Ok(LeafSubject::Device(id.clone())),
            ProfileKind::Node => {
                Ok(LeafSubject::Node {
                    enterprise: self.opts.enterprise.clone().ok_or_else(|| {
                        Error::invalid("batch", "node", "--enterprise is required")
                    })?,
                    id: id.clone(),
                })
            }
            ProfileKind::Server => Err(Error::invalid(
                "batch profile",
                "server",
                "batches issue device or node certificates",
            )),
        }
    }

    fn cert_path(&self, id: &PreProvisionedId) -> PathBuf {
        let ext = if self.opts.output == BatchOutput::Der {
            "der"
        } else {
            "pem"
        };
        self.out.path.join(format!("{id}.{ext}"))
    }

    fn key_path(&self, id: &PreProvisionedId) -> PathBuf {
        self.out.path.join(format!("{id}.key.pem"))
    }

    /// A certificate file's bytes: DER, or PEM with the chain.
    fn cert_bytes(&self, der: &[u8]) -> Vec<u8> {
        if self.opts.output == BatchOutput::Der {
            der.to_vec()
        } else {
            chain_pem(der, &self.chain).into_bytes()
        }
    }

    fn bundle_line(id: &PreProvisionedId, record: &CertRecord, der: &[u8]) -> BundleLine {
        BundleLine {
            id: id.to_string(),
            identity: record.subject_key.clone(),
            serial: record.serial.to_string(),
            certificate: files::pem_encode("CERTIFICATE", der),
        }
    }

    /// Writes the next bundle of `kind`; key bundles (Mode::Secret) are synced.
    fn write_bundle(&self, kind: &str, body: &[u8], mode: Mode) -> Result<()> {
        let n = self
            .next_bundle
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = self.out.path.join(format!("{kind}-{n:06}.jsonl"));
        files::write_atomic(
            &path,
            body,
            WriteOptions {
                mode,
                overwrite: Overwrite::Refuse,
                sync: mode == Mode::Secret,
            },
        )
        .map_err(Error::from)
    }

    /// Stage 1: skips subjects that are done (restoring their files when missing) and refuses
    /// to put a certificate beside a key file that is not its own; returns what is left to
    /// issue and the bundle lines restored from the ledger.
    fn triage<'i>(
        &self,
        chunk: &'i [(PreProvisionedId, Option<VerifiedCsr>)],
        report: &mut BatchReport,
    ) -> Result<(Vec<Todo<'i>>, Vec<BundleLine>)> {
        let mut todo = Vec::with_capacity(chunk.len());
        let mut restored = Vec::new();
        for (id, csr) in chunk {
            let subj = self.subject(id)?;
            let live = if self.opts.reissue {
                None
            } else {
                let key = self.authority.subject_key(&subj)?;
                self.store
                    .live_cert(&self.authority.record.name, &key.to_string())?
            };
            if let Some(serial) = live {
                self.restore_live(id, &serial, report, &mut restored)?;
                continue;
            }
            // A CSR's certificate goes beside no key of ours: a key file already there under
            // its name belongs to some other certificate.
            if let (Some(csr), false) = (csr, self.bundled) {
                let key_file = self.key_path(id);
                if let Some(reason) = key_file_mismatch(
                    &key_file,
                    &csr.public_key.subject_public_key_info(),
                    self.opts.key_passphrase.as_ref(),
                )? {
                    report.key_mismatches.push(KeyMismatch {
                        id: id.to_string(),
                        key_file,
                        reason,
                    });
                    continue;
                }
            }
            todo.push((id, subj, csr));
        }
        Ok((todo, restored))
    }

    /// A subject that already has its live certificate: its certificate file (or bundle line)
    /// is restored when missing, never beside a key that is not its own; a missing key is
    /// reported.
    fn restore_live(
        &self,
        id: &PreProvisionedId,
        serial: &crate::Serial,
        report: &mut BatchReport,
        restored: &mut Vec<BundleLine>,
    ) -> Result<()> {
        report.already_issued += 1;
        let recorded = || {
            self.store
                .cert(serial)?
                .ok_or_else(|| Error::corrupt(format!("live certificate {serial} has no record")))
        };
        let id_text = id.to_string();
        if self.bundled {
            if !self.existing.certs.contains(&id_text) {
                let (record, der) = recorded()?;
                restored.push(Self::bundle_line(id, &record, &der));
                report.files_restored += 1;
            }
        } else {
            let path = self.cert_path(id);
            if !path.exists() {
                let (_, der) = recorded()?;
                let key_file = self.key_path(id);
                if let Some(reason) = key_file_mismatch(
                    &key_file,
                    &cert_spki(&der)?,
                    self.opts.key_passphrase.as_ref(),
                )? {
                    report.key_mismatches.push(KeyMismatch {
                        id: id_text,
                        key_file,
                        reason,
                    });
                    return Ok(());
                }
                files::write_atomic(&path, &self.cert_bytes(&der), NO_SYNC)?;
                report.files_restored += 1;
            }
        }
        let has_key = if self.bundled {
            self.existing
                .keys
                .contains(&(id_text.clone(), serial.to_string()))
        } else {
            self.key_path(id).exists()
        };
        if self.generate_keys && !has_key {
            report.missing_keys.push(id_text);
        }
        Ok(())
    }

    /// Stage 2: signs on all cores, generating keys for ID batches, and encodes each
    /// certificate's output.
    fn sign<'i>(&self, todo: Vec<Todo<'i>>) -> Result<(Vec<NewCert>, Vec<Signed<'i>>)> {
        let opts = self.opts;
        Ok(todo
            .into_par_iter()
            .map(|(id, subj, csr)| {
                let (public_key, key_pem) = match csr {
                    Some(csr) => (csr.public_key.clone(), None),
                    None => {
                        let key = SoftwareKey::generate(opts.key_type)?;
                        let spki =
                            rcgen::SubjectPublicKeyInfo::from_der(&key.subject_public_key_info())
                                .map_err(Error::internal)?;
                        (spki, Some(key.to_pkcs8_pem(opts.key_passphrase.as_ref())?))
                    }
                };
                let req = LeafRequest {
                    subject: subj,
                    public_key,
                    validity: opts.validity,
                    not_before: opts.not_before,
                    requester: opts.requester.clone(),
                };
                let cert = self
                    .authority
                    .sign(self.authority.approve(&self.profile, req)?)?;
                let output = if self.bundled {
                    jsonl([Self::bundle_line(id, &cert.record, &cert.der)])?
                } else {
                    self.cert_bytes(&cert.der)
                };
                Ok((
                    cert,
                    Signed {
                        id,
                        key_pem,
                        output,
                    },
                ))
            })
            .collect::<Result<Vec<_>>>()?
            .into_iter()
            .unzip())
    }

    /// Stage 3 (the one writer): keys first, durably; then the chunk's ledger records in one
    /// transaction; then the certificate files or bundle of what was recorded.
    fn write_chunk(
        &self,
        chunk: Chunk<'_>,
        progress: &(dyn Fn(u64) + Sync),
    ) -> Result<(usize, usize)> {
        let Chunk {
            certs,
            signed,
            restored,
            total,
        } = chunk;
        if signed.is_empty() && restored.is_empty() {
            progress(total as u64);
            return Ok((0, 0));
        }
        // Keys first, durably: a recorded certificate must never lack its key.
        if self.generate_keys {
            self.write_keys(&certs, &signed)?;
        }
        // Record the chunk in one durable transaction.
        let outcomes = self.store.record_certs(&certs, self.opts.reissue)?;
        // Certificate files, only for what is recorded. No sync: the ledger is the truth, and
        // a rerun rewrites any certificate file a power cut may have lost.
        let (mut issued, mut already) = (0, 0);
        let mut body = jsonl(&restored)?;
        for (s, outcome) in signed.iter().zip(&outcomes) {
            match outcome {
                RecordOutcome::Recorded if self.bundled => {
                    body.extend_from_slice(&s.output);
                    issued += 1;
                }
                RecordOutcome::Recorded => {
                    files::write_atomic(&self.cert_path(s.id), &s.output, NO_SYNC)?;
                    issued += 1;
                }
                // Another process issued this ID meanwhile. The key written for it above was
                // never certified: remove it, so no later run restores the other process's
                // certificate beside it.
                RecordOutcome::AlreadyLive(_) => {
                    if self.generate_keys && !self.bundled {
                        remove_if_present(&self.key_path(s.id))?;
                    }
                    already += 1
                }
            }
        }
        if !body.is_empty() {
            self.write_bundle("bundle", &body, Mode::Public)?;
        }
        progress(total as u64);
        Ok((issued, already))
    }

    /// The generated keys of a chunk, durably: one key bundle, or a 0600 file per key and
    /// one sync of the folder.
    fn write_keys(&self, certs: &[NewCert], signed: &[Signed<'_>]) -> Result<()> {
        if self.bundled {
            let keys: Vec<KeyLine> = certs
                .iter()
                .zip(signed)
                .filter_map(|(cert, s)| {
                    s.key_pem.as_ref().map(|k| KeyLine {
                        id: s.id.to_string(),
                        serial: cert.record.serial.to_string(),
                        key: k.as_str(),
                    })
                })
                .collect();
            if !keys.is_empty() {
                let body = zeroize::Zeroizing::new(jsonl(&keys)?);
                self.write_bundle("keys", &body, Mode::Secret)?;
            }
            return Ok(());
        }
        for s in signed {
            if let Some(pem) = &s.key_pem {
                files::write_atomic(
                    &self.key_path(s.id),
                    pem.as_bytes(),
                    WriteOptions {
                        mode: Mode::Secret,
                        ..NO_SYNC
                    },
                )?;
            }
        }
        self.out.sync()
    }
}
