//! `m2mpki-bench`: issuance and bootstrap throughput against this machine's own ceilings and
//! against OpenSSL and Python `cryptography`, all measured in the same run. Run it through
//! `scripts/bench` (`--smoke` for the seconds-long CI size).
#![forbid(unsafe_code)]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a benchmark may abort loudly

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use m2mpki_bootstrap::client::{self, Enrolment};
use m2mpki_bootstrap::config::{FieldNodeProfile, TlsVersion};
use m2mpki_bootstrap::server::Server;
use m2mpki_ca::batch::{self, BatchInput, BatchOptions, BatchOutput};
use m2mpki_ca::profile::ProfileKind;
use m2mpki_ca::revocation::{issue_crl, RevocationReason, RevokedEntry};
use m2mpki_ca::validity::Validity;
use m2mpki_ca::{Authority, LeafSubject, Serial, Store};
use m2mpki_hsm::pkcs11::{Pkcs11Config, Pkcs11Key, Pkcs11Uri};
use m2mpki_hsm::{KeyRef, KeyType, Keystore, Signer};
use m2mpki_test_pki::softhsm::SoftHsm;
use m2mpki_test_pki::{names, server_config_toml, sets, KeyBackend, LabPki, LabSpec, IN_FQDN};
use serde::Serialize;

#[derive(Clone, Copy)]
struct Size {
    smoke: bool,
    runs: usize,
    secs: f64,
    csrs: usize,
    peer_csrs: usize,
    concurrency: &'static [usize],
    idle_conns: usize,
    revoked: &'static [usize],
}

const FULL: Size = Size {
    smoke: false,
    runs: 3,
    secs: 2.0,
    csrs: 20_000,
    peer_csrs: 4_000,
    concurrency: &[1, 16, 256],
    idle_conns: 500,
    revoked: &[100_000, 1_000_000],
};

const SMOKE: Size = Size {
    smoke: true,
    runs: 1,
    secs: 0.2,
    csrs: 300,
    peer_csrs: 100,
    concurrency: &[1, 8],
    idle_conns: 20,
    revoked: &[1_000, 10_000],
};

#[derive(Clone, Debug, Serialize)]
struct Stat {
    median: f64,
    min: f64,
    max: f64,
}

fn stat(mut xs: Vec<f64>) -> Stat {
    xs.sort_by(|a, b| a.total_cmp(b));
    Stat {
        median: xs[xs.len() / 2],
        min: xs[0],
        max: xs[xs.len() - 1],
    }
}

fn repeat(runs: usize, mut f: impl FnMut() -> Result<f64>) -> Result<Stat> {
    let mut xs = Vec::new();
    for _ in 0..runs {
        xs.push(f()?);
    }
    Ok(stat(xs))
}

#[derive(Clone, Debug, Serialize)]
struct Row {
    section: String,
    name: String,
    unit: String,
    value: Stat,
    /// Against what, and the ratio (median / baseline median).
    #[serde(skip_serializing_if = "Option::is_none")]
    baseline: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ratio: Option<f64>,
    /// For paired ratios: the lowest and highest per-run ratio.
    #[serde(skip_serializing_if = "Option::is_none")]
    ratio_range: Option<(f64, f64)>,
    #[serde(skip_serializing_if = "Option::is_none")]
    target: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    met: Option<bool>,
}

struct Report {
    rows: Vec<Row>,
    notes: BTreeMap<String, String>,
}

impl Report {
    fn add(&mut self, section: &str, name: &str, unit: &str, value: Stat) -> &mut Row {
        eprintln!(
            "  {section}: {name} = {:.1} {unit} (min {:.1}, max {:.1})",
            value.median, value.min, value.max
        );
        self.rows.push(Row {
            section: section.into(),
            name: name.into(),
            unit: unit.into(),
            value,
            baseline: None,
            ratio: None,
            ratio_range: None,
            target: None,
            met: None,
        });
        self.rows.last_mut().unwrap()
    }
}

impl Row {
    /// Ratio against a baseline; `target` is the minimum ratio (or, when `at_most`, maximum).
    fn against(&mut self, baseline: &str, base: f64, target: Option<(f64, bool)>) {
        self.set_ratio(baseline, self.value.median / base, target);
    }

    /// Ratio as the median of per-run ratios, each run against its baseline measured right
    /// before it (see `paired_runs`).
    fn paired(&mut self, baseline: &str, ratios: &Stat, target: Option<(f64, bool)>) {
        eprintln!(
            "    ratio per run against {baseline}: {:.2} (min {:.2}, max {:.2})",
            ratios.median, ratios.min, ratios.max
        );
        self.ratio_range = Some((ratios.min, ratios.max));
        self.set_ratio(baseline, ratios.median, target);
    }

    fn set_ratio(&mut self, baseline: &str, r: f64, target: Option<(f64, bool)>) {
        self.baseline = Some(baseline.into());
        self.ratio = Some(r);
        if let Some((t, at_most)) = target {
            self.target = Some(format!("{} {t}", if at_most { "<=" } else { ">=" }));
            self.met = Some(if at_most { r <= t } else { r >= t });
        }
    }

    fn absolute(&mut self, target: &str, met: bool) {
        self.target = Some(target.into());
        self.met = Some(met);
    }
}

fn cores() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get())
}

/// Runs `f` on `threads` threads until `secs` pass; returns operations per second.
fn parallel_rate(threads: usize, secs: f64, f: impl Fn() + Sync) -> f64 {
    let stop = AtomicBool::new(false);
    let count = AtomicU64::new(0);
    let start = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    f();
                    n += 1;
                }
                count.fetch_add(n, Ordering::Relaxed);
            });
        }
        std::thread::sleep(Duration::from_secs_f64(secs));
        stop.store(true, Ordering::Relaxed);
    });
    count.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64()
}

/// What issuing from a CSR must at least do: verify one ECDSA P-256 signature and make one.
struct Ceiling {
    key: aws_lc_rs::signature::EcdsaKeyPair,
    public: aws_lc_rs::signature::UnparsedPublicKey<Vec<u8>>,
    msg: [u8; 300],
    sig: Vec<u8>,
    rng: aws_lc_rs::rand::SystemRandom,
}

impl Ceiling {
    fn new() -> Result<Self> {
        use aws_lc_rs::signature::{
            EcdsaKeyPair, KeyPair, UnparsedPublicKey, ECDSA_P256_SHA256_ASN1,
            ECDSA_P256_SHA256_ASN1_SIGNING,
        };
        let rng = aws_lc_rs::rand::SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &rng)
            .map_err(|_| anyhow::anyhow!("keygen"))?;
        let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, pkcs8.as_ref())
            .map_err(|_| anyhow::anyhow!("key"))?;
        let msg = [7u8; 300];
        let sig = key
            .sign(&rng, &msg)
            .map_err(|_| anyhow::anyhow!("sign"))?
            .as_ref()
            .to_vec();
        let public =
            UnparsedPublicKey::new(&ECDSA_P256_SHA256_ASN1, key.public_key().as_ref().to_vec());
        Ok(Ceiling {
            key,
            public,
            msg,
            sig,
            rng,
        })
    }

    /// verify+sign pairs per second on `threads` threads over `secs`.
    fn rate(&self, threads: usize, secs: f64) -> f64 {
        parallel_rate(threads, secs, || {
            let ok = self.public.verify(&self.msg, &self.sig).is_ok();
            let s = self.key.sign(&self.rng, &self.msg);
            assert!(ok && s.is_ok());
        })
    }
}

fn crypto_ceiling(size: Size, report: &mut Report) -> Result<Ceiling> {
    let ceiling = Ceiling::new()?;
    let all = repeat(size.runs, || Ok(ceiling.rate(cores(), size.secs)))?;
    let single = repeat(size.runs, || Ok(ceiling.rate(1, size.secs)))?;
    report.add(
        "1 crypto ceiling",
        "aws-lc-rs P-256 verify+sign, 1 core",
        "pairs/s",
        single,
    );
    report.add(
        "1 crypto ceiling",
        &format!("aws-lc-rs P-256 verify+sign, {} cores", cores()),
        "pairs/s",
        all,
    );
    Ok(ceiling)
}

fn token(hsm: &SoftHsm, label: &str, dir: &Path) -> Result<Pkcs11Uri> {
    hsm.init_token(label, "bench-pin", "bench-so")?;
    let pin = dir.join(format!("{label}.pin"));
    std::fs::write(&pin, "bench-pin\n")?;
    Ok(format!(
        "pkcs11:token={label}?module-path={}&pin-source={}",
        hsm.module.display(),
        pin.display()
    )
    .parse()?)
}

fn hsm_raw(
    size: Size,
    report: &mut Report,
    pool: &Pkcs11Uri,
    one: &Pkcs11Uri,
    cfg_pool: &Pkcs11Config,
    cfg_one: &Pkcs11Config,
) -> Result<Pkcs11Key> {
    let (kp, _) =
        m2mpki_hsm::pkcs11::generate(&pool.for_object("raw-bench"), KeyType::P256, cfg_pool)?;
    let (k1, _) =
        m2mpki_hsm::pkcs11::generate(&one.for_object("raw-bench"), KeyType::P256, cfg_one)?;
    let pooled = repeat(size.runs, || Ok(raw_sign_rate(&kp, size.secs)))?;
    let single = repeat(size.runs, || Ok(raw_sign_rate(&k1, size.secs)))?;
    report.add(
        "1 crypto ceiling",
        &format!(
            "SoftHSM2 C_Sign P-256, {} threads, pool of {}",
            cores(),
            cfg_pool.sessions
        ),
        "sig/s",
        pooled,
    );
    report.add(
        "1 crypto ceiling",
        &format!("SoftHSM2 C_Sign P-256, {} threads, 1 session", cores()),
        "sig/s",
        single,
    );
    Ok(kp)
}

/// Raw parallel C_Sign per second with `key` over `secs`.
fn raw_sign_rate(key: &Pkcs11Key, secs: f64) -> f64 {
    parallel_rate(cores(), secs, || {
        assert!(key.raw_sign(b"tbs certificate bytes").is_ok());
    })
}

/// Writes `n` device CSRs (P-256, subject serialNumber = ID) to `dir`.
fn make_csrs(dir: &Path, n: usize) -> Result<()> {
    use rayon::prelude::*;
    std::fs::create_dir_all(dir)?;
    (0..n).into_par_iter().try_for_each(|i| -> Result<()> {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut p = rcgen::CertificateParams::default();
        p.distinguished_name = rcgen::DistinguishedName::new();
        p.distinguished_name
            .push(rcgen::DnType::CommonName, format!("BENCH-{i:07}"));
        p.distinguished_name.push(
            rcgen::DnType::CustomDnType(vec![2, 5, 4, 5]),
            rcgen::DnValue::PrintableString(format!("BENCH-{i:07}").try_into()?),
        );
        let csr = p.serialize_request(&key)?;
        std::fs::write(dir.join(format!("BENCH-{i:07}.csr")), csr.pem()?)?;
        Ok(())
    })
}

fn batch_rate(
    lab: &LabPki,
    keystore: &Keystore,
    csr_dir: &Path,
    out: &Path,
    n: usize,
    output: BatchOutput,
) -> Result<f64> {
    let authority = Authority::load(&lab.home, &lab.store, keystore, names::MFR_CA)?;
    // A fresh folder per run (deleting the last one first would make ext4 scan for recently
    // deleted inodes on every create, which measures the benchmark, not the batch).
    static RUN: AtomicU64 = AtomicU64::new(0);
    let out = out.join(RUN.fetch_add(1, Ordering::Relaxed).to_string());
    let out = out.as_path();
    // Start each run with no writeback left over from the last one (20 000 files and a
    // growing store), so runs measure themselves, not their predecessors.
    settle()?;
    let start = Instant::now();
    let input = BatchInput::Csrs(batch::load_csr_dir(csr_dir)?);
    let r = batch::run_batch(
        &lab.store,
        &authority,
        input,
        &BatchOptions {
            profile: ProfileKind::Device,
            enterprise: None,
            key_type: KeyType::P256,
            key_passphrase: None,
            validity: None,
            not_before: None,
            out_dir: out.to_owned(),
            reissue: true,
            output,
            chunk_size: 512,
            requester: m2mpki_ca::Requester::batch(csr_dir.display().to_string()),
        },
        &|_| {},
    )?;
    if r.issued != n {
        bail!("batch issued {} of {n}", r.issued);
    }
    Ok(n as f64 / start.elapsed().as_secs_f64())
}

/// Flushes every dirty page to disk (`sync`), so the next measurement starts with none.
fn settle() -> Result<()> {
    let status = Command::new("sync").status().context("running sync")?;
    if !status.success() {
        bail!("sync failed: {status}");
    }
    Ok(())
}

/// The CA that section 3's peers sign with: its certificate and its key file.
struct PeerCa {
    cert_der: Vec<u8>,
    key: PathBuf,
}

/// `openssl ca` as one process over the `n` CSRs of `csr_dir`, into `work`, a folder that
/// never held files (like every m2mpki run), after a `sync`.
fn openssl_ca_rate(ca: &PeerCa, csr_dir: &Path, work: &Path, n: usize) -> Result<f64> {
    if work.exists() {
        bail!(
            "{} exists: every run gets a folder that never held files",
            work.display()
        );
    }
    std::fs::create_dir_all(work.join("newcerts"))?;
    std::fs::write(work.join("index.txt"), "")?;
    std::fs::write(work.join("serial"), "1000\n")?;
    std::fs::write(
        work.join("ca.pem"),
        m2mpki_hsm::files::pem_encode("CERTIFICATE", &ca.cert_der),
    )?;
    let key = &ca.key;
    std::fs::write(
        work.join("ca.cnf"),
        format!(
            "[ca]\ndefault_ca=d\n[d]\ndir={w}\ndatabase=$dir/index.txt\nnew_certs_dir=$dir/newcerts\nserial=$dir/serial\ncertificate=$dir/ca.pem\nprivate_key={k}\ndefault_md=sha256\npolicy=p\nx509_extensions=e\ndefault_days=3650\nunique_subject=no\ncopy_extensions=none\n[p]\nserialNumber=supplied\ncommonName=optional\n[e]\nbasicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=clientAuth\nsubjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n",
            w = work.display(),
            k = key.display()
        ),
    )?;
    let mut files: Vec<PathBuf> = std::fs::read_dir(csr_dir)?
        .flatten()
        .map(|e| e.path())
        .collect();
    files.sort();
    files.truncate(n);
    settle()?;
    let start = Instant::now();
    let out = Command::new("openssl")
        .args(["ca", "-batch", "-notext", "-config"])
        .arg(work.join("ca.cnf"))
        .arg("-out")
        .arg(work.join("all.pem"))
        .arg("-infiles")
        .args(&files)
        .output()
        .context("running openssl ca")?;
    let secs = start.elapsed().as_secs_f64();
    if !out.status.success() {
        bail!(
            "openssl ca failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(n as f64 / secs)
}

/// `m2mpki issue batch --csr-dir` as one process (what an operator runs) over the CSRs of
/// `csr_dir`, into `out`, a folder that never held files, after a `sync`.
fn m2mpki_batch_process_rate(
    bin: &Path,
    home: &Path,
    csr_dir: &Path,
    out: &Path,
    n: usize,
    bundle: bool,
) -> Result<f64> {
    m2mpki_batch_into(bin, home, None, csr_dir, out, n, bundle)
}

/// [`m2mpki_batch_process_rate`] with `--store STORE` (redb:PATH or a postgres:// URL).
fn m2mpki_batch_into(
    bin: &Path,
    home: &Path,
    store: Option<&str>,
    csr_dir: &Path,
    out: &Path,
    n: usize,
    bundle: bool,
) -> Result<f64> {
    if out.exists() {
        bail!(
            "{} exists: every run gets a folder that never held files",
            out.display()
        );
    }
    settle()?;
    let start = Instant::now();
    let mut cmd = Command::new(bin);
    if let Some(store) = store {
        cmd.args(["--store", store]);
    }
    cmd.arg("--home")
        .arg(home)
        .args([
            "--json",
            "issue",
            "batch",
            "--ca",
            names::MFR_CA,
            "--profile",
            "device",
        ])
        .arg("--csr-dir")
        .arg(csr_dir)
        .arg("--out-dir")
        .arg(out)
        .arg("--reissue");
    if bundle {
        cmd.arg("--bundle");
    }
    let result = cmd.output().context("running m2mpki issue batch")?;
    let secs = start.elapsed().as_secs_f64();
    if !result.status.success() {
        bail!(
            "m2mpki issue batch failed: {}",
            String::from_utf8_lossy(&result.stderr)
        );
    }
    let report: serde_json::Value = serde_json::from_slice(&result.stdout)?;
    if report["issued"].as_u64() != Some(n as u64) {
        bail!("m2mpki issue batch issued {} of {n}", report["issued"]);
    }
    Ok(n as f64 / secs)
}

const PY_BENCH: &str = r#"
import sys, os, time, datetime
from cryptography import x509
from cryptography.x509.oid import NameOID, ExtendedKeyUsageOID
from cryptography.hazmat.primitives import hashes, serialization
ca_cert = x509.load_der_x509_certificate(open(sys.argv[1], 'rb').read())
ca_key = serialization.load_pem_private_key(open(sys.argv[2], 'rb').read(), password=None)
files = sorted(os.listdir(sys.argv[3]))[: int(sys.argv[4])]
datas = [open(os.path.join(sys.argv[3], f), 'rb').read() for f in files]
start = time.perf_counter()
aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key())
now = datetime.datetime.now(datetime.timezone.utc)
for d in datas:
    csr = x509.load_pem_x509_csr(d)
    assert csr.is_signature_valid
    sn = csr.subject.get_attributes_for_oid(NameOID.SERIAL_NUMBER)[0].value
    subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Example Manufacturer"),
                         x509.NameAttribute(NameOID.COMMON_NAME, sn),
                         x509.NameAttribute(NameOID.SERIAL_NUMBER, sn)])
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(ca_cert.subject)
            .public_key(csr.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(True, False, False, False, False, False, False, False, False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(csr.public_key()), critical=False)
            .add_extension(aki, critical=False)
            .sign(ca_key, hashes.SHA256()))
    cert.public_bytes(serialization.Encoding.DER)
print(len(datas) / (time.perf_counter() - start))
"#;

fn python_rate(lab: &LabPki, python: &Path, csr_dir: &Path, work: &Path, n: usize) -> Result<f64> {
    std::fs::create_dir_all(work)?;
    let ca = lab.ca(names::MFR_CA).context("mfr-ca")?;
    std::fs::write(work.join("ca.der"), &ca.cert_der)?;
    std::fs::write(work.join("bench.py"), PY_BENCH)?;
    let key = lab
        .home
        .root()
        .join("keys")
        .join(format!("{}.key.pem", names::MFR_CA));
    let out = Command::new(python)
        .arg(work.join("bench.py"))
        .arg(work.join("ca.der"))
        .arg(&key)
        .arg(csr_dir)
        .arg(n.to_string())
        .output()
        .with_context(|| format!("running {}", python.display()))?;
    if !out.status.success() {
        bail!(
            "python cryptography bench failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().parse()?)
}

#[derive(Clone)]
struct Fleet {
    profile: FieldNodeProfile,
    nodes: Vec<(
        Vec<rustls::pki_types::CertificateDer<'static>>,
        Arc<dyn Signer>,
    )>,
}

struct LoadResult {
    rate: f64,
    p99_ms: f64,
    failures: u64,
    /// CPU time of this whole process (clients and servers) per completed operation, µs.
    cpu_us: f64,
    /// Completed operations.
    ops: usize,
}

/// Names the server runtime's threads carry, and the credential store's writer thread (the
/// kernel keeps 15 characters of a thread name).
const SERVER_THREADS: &[&str] = &["in-server", "credential-writ"];

/// CPU time (on-CPU nanoseconds from schedstat, as seconds) of this process's threads whose
/// name starts with one of `prefixes`: the servers' share of a run in which clients and
/// servers share the process.
fn threads_cpu_secs(prefixes: &[&str]) -> f64 {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return f64::NAN;
    };
    let mut ns = 0u64;
    for task in tasks.flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if !prefixes.iter().any(|p| comm.trim_end().starts_with(p)) {
            continue;
        }
        let sched = std::fs::read_to_string(task.path().join("schedstat")).unwrap_or_default();
        ns += sched
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
    }
    ns as f64 / 1e9
}

/// CPU time (user + system) this process has used so far, in seconds.
fn process_cpu_secs() -> f64 {
    // /proc/self/stat fields 14 and 15 (utime, stime) in clock ticks; the command name (field 2)
    // may hold spaces, so count from after its closing parenthesis.
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<f64> = after
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0.0))
        .collect();
    let ticks = f.get(11).copied().unwrap_or(0.0) + f.get(12).copied().unwrap_or(0.0);
    ticks / 100.0
}

/// `op` under [`load`], with the server threads' CPU per completed operation (µs).
fn measured<F, Fut>(
    rt: &tokio::runtime::Runtime,
    concurrency: usize,
    secs: f64,
    op: F,
) -> (LoadResult, f64)
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = bool> + Send,
{
    let server_cpu = threads_cpu_secs(SERVER_THREADS);
    let r = rt.block_on(load(concurrency, secs, op));
    let per = (threads_cpu_secs(SERVER_THREADS) - server_cpu) * 1e6 / r.ops.max(1) as f64;
    (r, per)
}

/// `concurrency` tasks loop until `secs` pass, each doing `op`; returns completions/s and p99.
async fn load<F, Fut>(concurrency: usize, secs: f64, op: F) -> LoadResult
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = bool> + Send,
{
    let op = Arc::new(op);
    let cpu_start = process_cpu_secs();
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for t in 0..concurrency {
        let op = op.clone();
        tasks.spawn(async move {
            let mut lat = Vec::new();
            let mut fails = 0u64;
            let mut i = t;
            while Instant::now() < deadline {
                let s = Instant::now();
                if op(i).await {
                    lat.push(s.elapsed().as_secs_f64() * 1000.0);
                } else {
                    fails += 1;
                }
                i += concurrency;
            }
            (lat, fails)
        });
    }
    let mut all = Vec::new();
    let mut failures = 0;
    while let Some(r) = tasks.join_next().await {
        let (l, f) = r.unwrap_or_default();
        all.extend(l);
        failures += f;
    }
    let secs = start.elapsed().as_secs_f64();
    all.sort_by(|a, b| a.total_cmp(b));
    let p99 = if all.is_empty() {
        f64::NAN
    } else {
        all[((all.len() as f64 * 0.99) as usize).min(all.len() - 1)]
    };
    LoadResult {
        rate: all.len() as f64 / secs,
        p99_ms: p99,
        failures,
        cpu_us: (process_cpu_secs() - cpu_start) * 1e6 / all.len().max(1) as f64,
        ops: all.len(),
    }
}

/// The fleet's runtime and the servers': separate, the servers' threads named so that their
/// CPU per operation can be told from the clients'.
fn runtimes() -> Result<(tokio::runtime::Runtime, tokio::runtime::Runtime)> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("fleet")
        .build()?;
    let server_rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("in-server")
        .thread_keep_alive(Duration::from_secs(3600))
        .build()?;
    Ok((rt, server_rt))
}

/// An IN serving on `server_rt` until [`Serving::stop`].
struct Serving {
    /// Its TLS address, when it serves TLS.
    tls: Option<SocketAddr>,
    /// Its DTLS address, when it serves DTLS.
    dtls: Option<SocketAddr>,
    stop: tokio::sync::oneshot::Sender<()>,
    running: tokio::task::JoinHandle<m2mpki_bootstrap::Result<()>>,
}

/// The bootstrap client's own set-up for every node of `fleet`, enrolling at `addr`.
fn prepared_fleet(
    fleet: &Fleet,
    addr: SocketAddr,
    version: TlsVersion,
) -> Result<Arc<Vec<client::Prepared>>> {
    Ok(Arc::new(
        fleet
            .nodes
            .iter()
            .map(|(chain, key)| {
                client::Prepared::new(&Enrolment {
                    profile: fleet.profile.clone(),
                    chain: chain.clone(),
                    key: key.clone(),
                    connect: Some(addr.to_string()),
                    versions: vec![version],
                    timeout: Duration::from_secs(60),
                })
            })
            .collect::<m2mpki_bootstrap::Result<_>>()?,
    ))
}

/// Binds `server`'s listeners and runs it on `server_rt`.
fn serve(server_rt: &tokio::runtime::Runtime, server: &Arc<Server>) -> Result<Serving> {
    let listeners = server_rt.block_on(server.bind())?;
    serve_on(server_rt, server, listeners)
}

/// Runs `server` on `server_rt` with `listeners` bound elsewhere.
fn serve_on(
    server_rt: &tokio::runtime::Runtime,
    server: &Arc<Server>,
    listeners: m2mpki_bootstrap::server::Listeners,
) -> Result<Serving> {
    let (tls, dtls) = (listeners.local_addr().ok(), listeners.dtls_addr().ok());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let s2 = server.clone();
    let running = server_rt.spawn(async move {
        s2.run(listeners, async {
            let _ = stopped.await;
        })
        .await
    });
    Ok(Serving {
        tls,
        dtls,
        stop,
        running,
    })
}

impl Serving {
    /// Stops the IN and waits for it to end.
    fn stop(self, server_rt: &tokio::runtime::Runtime) -> Result<()> {
        let _ = self.stop.send(());
        server_rt.block_on(self.running)??;
        Ok(())
    }
}

fn bare_server_config(
    lab_home: &Path,
    chain: &Path,
    key: &Path,
) -> Result<Arc<rustls::ServerConfig>> {
    let home = m2mpki_ca::Home::open(lab_home)?;
    let store = home.store()?;
    let mut roots = rustls::RootCertStore::empty();
    for set in [sets::DEVICE, sets::NODE] {
        for a in store.root_set(set)?.context("set")?.anchors {
            roots.add(rustls::pki_types::CertificateDer::from(a.der))?;
        }
    }
    let provider = m2mpki_bootstrap::tls::provider();
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()?;
    let chain = m2mpki_bootstrap::tls::load_chain(chain)?;
    let key = Keystore::default().open(&KeyRef::File(key.to_owned()))?;
    let certified = Arc::new(rustls::sign::CertifiedKey::new(
        chain,
        Arc::new(m2mpki_hsm::tls::TlsKey::new(key)),
    ));
    // The bootstrap server's own builder: only the client verifier differs (plain webpki
    // against the same anchors instead of the root-set verifier).
    let cfg = m2mpki_bootstrap::tls::server_config(
        &[TlsVersion::Tls13, TlsVersion::Tls12],
        verifier,
        IN_FQDN.parse()?,
        certified,
        true, // as the IN's default
    )?;
    Ok(Arc::new(cfg))
}

async fn bare_server(
    cfg: Arc<rustls::ServerConfig>,
) -> Result<(std::net::SocketAddr, tokio::task::JoinHandle<()>)> {
    // The same accept queue as the bootstrap server's.
    let listener = m2mpki_bootstrap::server::listen("127.0.0.1:0".parse()?)?;
    let addr = listener.local_addr()?;
    let acceptor = tokio_rustls::TlsAcceptor::from(cfg);
    let task = tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let _ = tcp.set_nodelay(true);
                if let Ok(mut tls) = acceptor.accept(tcp).await {
                    use tokio::io::AsyncWriteExt;
                    let _ = tls.shutdown().await;
                }
            });
        }
    });
    Ok((addr, task))
}

fn client_config(
    fleet: &Fleet,
    i: usize,
    version: TlsVersion,
) -> Result<Arc<rustls::ClientConfig>> {
    let (chain, key) = &fleet.nodes[i % fleet.nodes.len()];
    let certified = Arc::new(rustls::sign::CertifiedKey::new(
        chain.clone(),
        Arc::new(m2mpki_hsm::tls::TlsKey::new(key.clone())),
    ));
    let cfg = m2mpki_bootstrap::tls::client_config(
        &[version],
        fleet.profile.roots.clone(),
        fleet.profile.in_fqdn.clone(),
        certified,
    )?;
    Ok(Arc::new(cfg))
}

fn rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmRSS")
}

/// 256 field nodes of their own (rotation on every enrolment, like a real fleet), device
/// certificates issued in the lab with software keys, named `PREFIX-0000`...
fn make_fleet(layout: &m2mpki_test_pki::lab::LabLayout, prefix: &str) -> Result<Fleet> {
    let keystore = Keystore::default();
    let mut fleet_nodes = Vec::new();
    {
        // The lab's store is opened here and closed before the server opens it.
        let home = m2mpki_ca::Home::open(&layout.home)?;
        let lab = LabPki {
            store: home.store()?,
            home,
            cas: vec![],
        };
        for i in 0..256 {
            let key = m2mpki_hsm::SoftwareKey::generate(KeyType::P256)?;
            let chain = issue_direct(&lab, &keystore, &key, &format!("{prefix}-{i:04}"))?;
            fleet_nodes.push((
                chain
                    .into_iter()
                    .map(rustls::pki_types::CertificateDer::from)
                    .collect(),
                Arc::new(key) as Arc<dyn Signer>,
            ));
        }
    }
    Ok(Fleet {
        profile: FieldNodeProfile::load(&layout.profile)?,
        nodes: fleet_nodes,
    })
}

/// What the bootstrap sections start from: a lab of their own in `dir` with software keys,
/// its 256 field nodes (`PREFIX-0000`...), and the fleet's and the servers' runtimes.
struct BenchLab {
    layout: m2mpki_test_pki::lab::LabLayout,
    fleet: Fleet,
    keystore: Keystore,
    rt: tokio::runtime::Runtime,
    server_rt: tokio::runtime::Runtime,
}

fn bench_lab(dir: &Path, prefix: &str) -> Result<BenchLab> {
    let layout = m2mpki_test_pki::lab::init(dir, m2mpki_test_pki::lab::LabHsm::None, 8443)?;
    let fleet = make_fleet(&layout, prefix)?;
    let (rt, server_rt) = runtimes()?;
    Ok(BenchLab {
        layout,
        fleet,
        keystore: Keystore::default(),
        rt,
        server_rt,
    })
}

#[allow(clippy::too_many_lines)]
fn bootstrap_bench(
    size: Size,
    report: &mut Report,
    work: &Path,
    m2mpki_bin: Option<&Path>,
) -> Result<()> {
    let dir = work.join("bootstrap");
    // Clients and servers share the two cores but not a runtime: the servers' threads are
    // named, so their CPU per operation can be told from the clients'.
    let BenchLab {
        layout,
        fleet,
        keystore,
        rt,
        server_rt,
    } = bench_lab(&dir, "FLEET")?;
    let mut config = m2mpki_test_pki::lab::config_on_free_ports(&layout)?;
    config.limits.max_connections = 4096;
    // Every bench client comes from 127.0.0.1: the per-address cap is not what is measured.
    config.limits.max_connections_per_address = 4096;
    let home = m2mpki_ca::Home::open(&layout.home)?;
    let server = Arc::new(Server::new(config, &home, &keystore)?);
    let serving = serve(&server_rt, &server)?;
    let addr = serving.tls.context("the IN serves no TLS")?;
    let in_key = PathBuf::from(&layout.in_key);
    let bare_cfg = bare_server_config(&layout.home, &layout.in_chain, &in_key)?;
    let (bare_addr, bare_task) = server_rt.block_on(bare_server(bare_cfg))?;

    for version in [TlsVersion::Tls13, TlsVersion::Tls12] {
        let vname = if version == TlsVersion::Tls13 {
            "TLS 1.3"
        } else {
            "TLS 1.2"
        };
        // Both clients are set up once per node, before the runs: the bare ones with a TLS
        // configuration, ours with the bootstrap client's own set-up (which builds the same
        // configuration through the same builder).
        let configs: Arc<Vec<Arc<rustls::ClientConfig>>> = Arc::new(
            (0..fleet.nodes.len())
                .map(|i| client_config(&fleet, i, version))
                .collect::<Result<_>>()?,
        );
        let prepared = prepared_fleet(&fleet, addr, version)?;
        for &c in size.concurrency {
            let mut bare_rates = Vec::new();
            let mut ours_rates = Vec::new();
            let mut bare_p99 = Vec::new();
            let mut ours_p99 = Vec::new();
            let mut bare_cpu = Vec::new();
            let mut ours_cpu = Vec::new();
            let mut bare_server_cpu = Vec::new();
            let mut ours_server_cpu = Vec::new();
            let mut failures = 0;
            for _ in 0..size.runs {
                let cfgs = configs.clone();
                let (bare, bare_us) = measured(&rt, c, size.secs, move |i| {
                    let cfg = cfgs[i % cfgs.len()].clone();
                    async move {
                        let Ok(tcp) = tokio::net::TcpStream::connect(bare_addr).await else {
                            return false;
                        };
                        let _ = tcp.set_nodelay(true);
                        let name = rustls::pki_types::ServerName::try_from(IN_FQDN)
                            .unwrap_or_else(|_| unreachable!());
                        match tokio_rustls::TlsConnector::from(cfg)
                            .connect(name, tcp)
                            .await
                        {
                            Ok(mut tls) => {
                                use tokio::io::AsyncReadExt;
                                // Wait for the server's close: it has judged our certificate.
                                let mut b = [0u8; 1];
                                let _ = tls.read(&mut b).await;
                                true
                            }
                            Err(_) => false,
                        }
                    }
                });
                bare_server_cpu.push(bare_us);
                let preps = prepared.clone();
                let (ours, ours_us) = measured(&rt, c, size.secs, move |i| {
                    let p = preps[i % preps.len()].clone();
                    async move { client::enroll_prepared(&p).await.is_ok() }
                });
                ours_server_cpu.push(ours_us);
                failures += ours.failures + bare.failures;
                bare_rates.push(bare.rate);
                ours_rates.push(ours.rate);
                bare_p99.push(bare.p99_ms);
                ours_p99.push(ours.p99_ms);
                bare_cpu.push(bare.cpu_us);
                ours_cpu.push(ours.cpu_us);
            }
            let b = stat(bare_rates);
            let bm = b.median;
            report.add(
                "4 bootstrap",
                &format!("bare rustls mutual-TLS handshakes, {vname}, {c} concurrent"),
                "conn/s",
                b,
            );
            report
                .add(
                    "4 bootstrap",
                    &format!("enrolments (handshake + POST + stored), {vname}, {c} concurrent"),
                    "enrol/s",
                    stat(ours_rates),
                )
                .against("bare handshakes", bm, Some((0.80, false)));
            let bc = stat(bare_cpu);
            let bcm = bc.median;
            report.add(
                "4 bootstrap",
                &format!("CPU per bare handshake (client + server), {vname}, {c} concurrent"),
                "us",
                bc,
            );
            report
                .add(
                    "4 bootstrap",
                    &format!("CPU per enrolment (client + server), {vname}, {c} concurrent"),
                    "us",
                    stat(ours_cpu),
                )
                .against("bare handshake CPU", bcm, None);
            let bsc = stat(bare_server_cpu);
            let bscm = bsc.median;
            report.add(
                "4 bootstrap",
                &format!(
                    "bare server CPU per handshake (server threads only), {vname}, {c} concurrent"
                ),
                "us",
                bsc,
            );
            report
                .add(
                    "4 bootstrap",
                    &format!("IN CPU per enrolment (server threads only), {vname}, {c} concurrent"),
                    "us",
                    stat(ours_server_cpu),
                )
                .against("bare server CPU per handshake", bscm, None);
            let bp = stat(bare_p99).median;
            let row = report.add(
                "4 bootstrap",
                &format!("enrolment p99 latency, {vname}, {c} concurrent"),
                "ms",
                stat(ours_p99),
            );
            if c == *size.concurrency.last().unwrap_or(&1) {
                row.against("bare p99", bp, Some((1.5, true)));
            } else {
                row.against("bare p99", bp, None);
            }
            report
                .add(
                    "4 bootstrap",
                    &format!("failed enrolments/handshakes, {vname}, {c} concurrent"),
                    "count",
                    stat(vec![failures as f64]),
                )
                .absolute("0", failures == 0);
        }
    }
    serving.stop(&server_rt)?;
    bare_task.abort();

    if let Some(bin) = m2mpki_bin {
        idle_memory_bench(size, report, bin, &layout, &dir, &fleet, &rt)?;
    }
    Ok(())
}

/// Memory per idle open connection: a separate `m2mpki bootstrap serve` (`bin`), measured by
/// RSS after `size.idle_conns` connections finished their handshake and sent nothing.
fn idle_memory_bench(
    size: Size,
    report: &mut Report,
    bin: &Path,
    layout: &m2mpki_test_pki::lab::LabLayout,
    dir: &Path,
    fleet: &Fleet,
    rt: &tokio::runtime::Runtime,
) -> Result<()> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let cfg_path = dir.join("idle.toml");
    let text = server_config_toml(
        &format!("127.0.0.1:{port}"),
        &layout.in_chain,
        &layout.in_key,
        "allow",
    )
    .replace("idle_timeout = \"30s\"", "idle_timeout = \"120s\"");
    std::fs::write(&cfg_path, text)?;
    let mut child = Command::new(bin)
        .arg("--home")
        .arg(&layout.home)
        .args(["bootstrap", "serve", "--config"])
        .arg(&cfg_path)
        .stderr(std::process::Stdio::null())
        .spawn()?;
    std::thread::sleep(Duration::from_millis(500));
    let cfg0 = client_config(fleet, 0, TlsVersion::Tls13)?;
    // Warm up: one full connection so lazily allocated state exists before measuring.
    let held = rt.block_on(async {
        let mut held = Vec::new();
        let connect = |cfg: Arc<rustls::ClientConfig>| async move {
            let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .ok()?;
            let name = rustls::pki_types::ServerName::try_from(IN_FQDN).ok()?;
            tokio_rustls::TlsConnector::from(cfg)
                .connect(name, tcp)
                .await
                .ok()
        };
        for _ in 0..5 {
            if let Some(c) = connect(cfg0.clone()).await {
                held.push(c);
            }
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        held
    });
    let before = rss_kib(child.id())?;
    let n = size.idle_conns;
    let more = rt.block_on(async {
        let mut held = Vec::new();
        for _ in 0..n {
            let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await;
            let Ok(tcp) = tcp else { continue };
            let name =
                rustls::pki_types::ServerName::try_from(IN_FQDN).unwrap_or_else(|_| unreachable!());
            if let Ok(c) = tokio_rustls::TlsConnector::from(cfg0.clone())
                .connect(name, tcp)
                .await
            {
                held.push(c);
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        held
    });
    let after = rss_kib(child.id())?;
    let per = (after.saturating_sub(before)) as f64 / more.len().max(1) as f64;
    report.notes.insert(
        "idle connections held".into(),
        format!("{} (+{} warm-up)", more.len(), held.len()),
    );
    report
        .add(
            "4 bootstrap",
            "server memory per idle open connection (after handshake)",
            "KiB",
            stat(vec![per]),
        )
        .absolute("<= 64", per <= 64.0);
    drop(more);
    drop(held);
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = child.wait();
    Ok(())
}

/// Section 6: the bootstrap over DTLS 1.2 + CoAP (CCM_8). The baseline is the same IN's DTLS
/// endpoint doing bare handshakes: the same library, certificates, stateless cookie exchange,
/// chain check and load generator; the bare client closes right after its handshake, ours
/// sends the CoAP request and waits for the stored credential.
#[allow(clippy::too_many_lines)]
fn dtls_bench(
    size: Size,
    report: &mut Report,
    work: &Path,
    m2mpki_bin: Option<&Path>,
) -> Result<()> {
    use m2mpki_bootstrap::config::{DtlsSuite, Transport, DEFAULT_MTU};
    let dir = work.join("dtls");
    let BenchLab {
        layout,
        fleet,
        keystore,
        rt,
        server_rt,
    } = bench_lab(&dir, "DTLS")?;
    let mut config = m2mpki_test_pki::lab::config_on_free_ports(&layout)?;
    config.listen = None;
    let d = config.dtls.as_mut().context("the lab IN serves DTLS")?;
    d.max_peers = 4096;
    config.limits.handshake_timeout = Duration::from_secs(30);
    let home = m2mpki_ca::Home::open(&layout.home)?;
    let server = Arc::new(Server::new(config, &home, &keystore)?);
    let serving = serve(&server_rt, &server)?;
    let addr = serving.dtls.context("the IN serves no DTLS")?;
    let suites = [DtlsSuite::Aes128Ccm8];
    let fqdn = fleet.profile.in_fqdn.clone();
    let contexts: Arc<Vec<openssl::ssl::SslContext>> = Arc::new(
        fleet
            .nodes
            .iter()
            .map(|(chain, key)| {
                let ders: Vec<Vec<u8>> = chain.iter().map(|c| c.as_ref().to_vec()).collect();
                let pkcs8 = key.software_pkcs8().context("software key")?;
                Ok(m2mpki_bootstrap::dtls::client::context(
                    &suites,
                    &ders,
                    &pkcs8,
                    fleet.profile.roots.clone(),
                    fqdn.clone(),
                )?)
            })
            .collect::<Result<_>>()?,
    );
    let mut profile = fleet.profile.clone();
    profile.transport = Transport::Dtls;
    profile.dtls_suites = suites.to_vec();
    let prepared: Arc<Vec<client::Prepared>> = Arc::new(
        fleet
            .nodes
            .iter()
            .map(|(chain, key)| {
                client::Prepared::new(&Enrolment {
                    profile: profile.clone(),
                    chain: chain.clone(),
                    key: key.clone(),
                    connect: Some(addr.to_string()),
                    versions: vec![],
                    timeout: Duration::from_secs(60),
                })
            })
            .collect::<m2mpki_bootstrap::Result<_>>()?,
    );
    let target = addr.to_string();
    for &c in size.concurrency {
        let (mut bare_rates, mut ours_rates) = (Vec::new(), Vec::new());
        let (mut bare_p99, mut ours_p99) = (Vec::new(), Vec::new());
        let (mut bare_server_cpu, mut ours_server_cpu) = (Vec::new(), Vec::new());
        let mut failures = 0;
        for _ in 0..size.runs {
            let (ctxs, t, f) = (contexts.clone(), target.clone(), fqdn.clone());
            let (bare, bare_us) = measured(&rt, c, size.secs, move |i| {
                let ctx = ctxs[i % ctxs.len()].clone();
                let (t, f) = (t.clone(), f.clone());
                async move {
                    let deadline = Instant::now() + Duration::from_secs(30);
                    match m2mpki_bootstrap::dtls::client::connect(
                        &ctx,
                        &t,
                        &f,
                        DEFAULT_MTU,
                        deadline,
                    )
                    .await
                    {
                        Ok(session) => {
                            session.close().await;
                            true
                        }
                        Err(_) => false,
                    }
                }
            });
            bare_server_cpu.push(bare_us);
            let preps = prepared.clone();
            let (ours, ours_us) = measured(&rt, c, size.secs, move |i| {
                let p = preps[i % preps.len()].clone();
                async move { client::enroll_prepared(&p).await.is_ok() }
            });
            ours_server_cpu.push(ours_us);
            failures += ours.failures + bare.failures;
            bare_rates.push(bare.rate);
            ours_rates.push(ours.rate);
            bare_p99.push(bare.p99_ms);
            ours_p99.push(ours.p99_ms);
        }
        let b = stat(bare_rates);
        let bm = b.median;
        report.add(
            "6 dtls",
            &format!("bare DTLS 1.2 mutual handshakes (OpenSSL, CCM_8), {c} concurrent"),
            "conn/s",
            b,
        );
        report
            .add(
                "6 dtls",
                &format!("enrolments over DTLS + CoAP (stored), {c} concurrent"),
                "enrol/s",
                stat(ours_rates),
            )
            .against("bare DTLS handshakes", bm, Some((0.80, false)));
        let bsc = stat(bare_server_cpu);
        let bscm = bsc.median;
        report.add(
            "6 dtls",
            &format!("IN CPU per bare DTLS handshake (server threads), {c} concurrent"),
            "us",
            bsc,
        );
        report
            .add(
                "6 dtls",
                &format!("IN CPU per DTLS enrolment (server threads), {c} concurrent"),
                "us",
                stat(ours_server_cpu),
            )
            .against("IN CPU per bare handshake", bscm, None);
        let bp = stat(bare_p99).median;
        report
            .add(
                "6 dtls",
                &format!("DTLS enrolment p99 latency, {c} concurrent"),
                "ms",
                stat(ours_p99),
            )
            .against("bare p99", bp, None);
        report
            .add(
                "6 dtls",
                &format!("failed DTLS enrolments/handshakes, {c} concurrent"),
                "count",
                stat(vec![failures as f64]),
            )
            .absolute("0", failures == 0);
    }
    serving.stop(&server_rt)?;
    if let Some(bin) = m2mpki_bin {
        dtls_idle_memory(size, report, bin, &layout, &dir, &contexts, &fqdn, &rt)?;
    }
    Ok(())
}

/// Memory per idle DTLS peer: a separate `m2mpki bootstrap serve` serving DTLS alone, its RSS
/// before and after `size.idle_conns` peers completed their handshake and sent nothing.
#[allow(clippy::too_many_arguments)]
fn dtls_idle_memory(
    size: Size,
    report: &mut Report,
    bin: &Path,
    layout: &m2mpki_test_pki::lab::LabLayout,
    dir: &Path,
    contexts: &[openssl::ssl::SslContext],
    fqdn: &m2mpki_ca::DnsName,
    rt: &tokio::runtime::Runtime,
) -> Result<()> {
    let port = std::net::UdpSocket::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let cfg_path = dir.join("dtls-idle.toml");
    let text = server_config_toml("127.0.0.1:0", &layout.in_chain, &layout.in_key, "allow")
        .replace("listen = \"127.0.0.1:0\"\n", "")
        .replace("idle_timeout = \"30s\"", "idle_timeout = \"120s\"")
        + &format!("\n[dtls]\nlisten = \"127.0.0.1:{port}\"\nmax_peers = 4096\n");
    std::fs::write(&cfg_path, text)?;
    let mut child = Command::new(bin)
        .arg("--home")
        .arg(&layout.home)
        .args(["bootstrap", "serve", "--config"])
        .arg(&cfg_path)
        .stderr(std::process::Stdio::null())
        .spawn()?;
    std::thread::sleep(Duration::from_millis(500));
    let target = format!("127.0.0.1:{port}");
    let open = |n: usize| {
        rt.block_on(async {
            let mut held = Vec::new();
            for i in 0..n {
                let deadline = Instant::now() + Duration::from_secs(10);
                let ctx = &contexts[i % contexts.len()];
                if let Ok(s) = m2mpki_bootstrap::dtls::client::connect(
                    ctx,
                    &target,
                    fqdn,
                    m2mpki_bootstrap::config::DEFAULT_MTU,
                    deadline,
                )
                .await
                {
                    held.push(s);
                }
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
            held
        })
    };
    // Warm up: a few sessions so lazily allocated state exists before measuring.
    let warm = open(5);
    let before = rss_kib(child.id())?;
    let more = open(size.idle_conns);
    let after = rss_kib(child.id())?;
    let per = (after.saturating_sub(before)) as f64 / more.len().max(1) as f64;
    report.notes.insert(
        "idle DTLS peers held".into(),
        format!("{} (+{} warm-up)", more.len(), warm.len()),
    );
    report
        .add(
            "6 dtls",
            "server memory per idle DTLS peer (after handshake)",
            "KiB",
            stat(vec![per]),
        )
        .absolute("<= 64", per <= 64.0);
    drop(more);
    drop(warm);
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = child.wait();
    Ok(())
}

fn issue_direct(
    lab: &LabPki,
    keystore: &Keystore,
    key: &dyn Signer,
    id: &str,
) -> Result<Vec<Vec<u8>>> {
    lab.issue_for(
        keystore,
        names::MFR_CA,
        LeafSubject::Device(id.parse()?),
        key,
        None,
    )
}

fn revocation_bench(size: Size, report: &mut Report, work: &Path) -> Result<()> {
    for &n in size.revoked {
        let home = work.join(format!("revoked-{n}"));
        let lab = LabPki::build(&home, &Keystore::default(), &LabSpec::default())?;
        let authority =
            Authority::load(&lab.home, &lab.store, &Keystore::default(), names::MFR_CA)?;
        let far = time::OffsetDateTime::now_utc().unix_timestamp() + 10 * 365 * 86400;
        let entries: Vec<RevokedEntry> = (0..n as u64)
            .map(|i| {
                let mut b = [0u8; 16];
                b[0] = 0x40;
                b[8..].copy_from_slice(&i.to_be_bytes());
                RevokedEntry {
                    serial: Serial::from_bytes(&b),
                    revoked_at: far - 5 * 365 * 86400,
                    reason: RevocationReason::KeyCompromise,
                    not_after: far,
                }
            })
            .collect();
        lab.store.bulk_insert_revoked(names::MFR_CA, &entries)?;
        drop(entries);
        // Revoking one more certificate: issue it, then time the revocation alone.
        let mut revoke_ms = Vec::new();
        for r in 0..size.runs.max(3) {
            let key = m2mpki_hsm::SoftwareKey::generate(KeyType::P256)?;
            let chain = issue_direct(&lab, &Keystore::default(), &key, &format!("REV-{r}"))?;
            let (_, cert) = x509_parser::parse_x509_certificate(&chain[0])?;
            let serial = Serial::from_bytes(cert.raw_serial());
            let start = Instant::now();
            lab.store.revoke(
                names::MFR_CA,
                &serial,
                RevocationReason::Superseded,
                time::OffsetDateTime::now_utc().unix_timestamp(),
            )?;
            revoke_ms.push(start.elapsed().as_secs_f64() * 1000.0);
        }
        report.add(
            "5 revocation",
            &format!("revoke one certificate, CA with {n} revoked"),
            "ms",
            stat(revoke_ms),
        );
        let crl_runs = if n >= 1_000_000 { 2 } else { size.runs };
        let mut entries_seen = 0;
        let mut crl_der = Vec::new();
        let secs = repeat(crl_runs, || {
            let start = Instant::now();
            let crl = issue_crl(&lab.store, &authority, Validity::Days(7))?;
            entries_seen = crl.entries;
            crl_der = crl.der;
            Ok(start.elapsed().as_secs_f64())
        })?;
        let met = secs.median < 5.0;
        report
            .add(
                "5 revocation",
                &format!("CRL with {entries_seen} entries"),
                "s",
                secs,
            )
            .absolute("< 5 s (1M)", met || n < 1_000_000);

        // What a verifier (the IN's, at every handshake) pays for a set carrying this CRL:
        // one good device chain against the device set, without and with the CRL attached.
        let key = m2mpki_hsm::SoftwareKey::generate(KeyType::P256)?;
        let chain = issue_direct(&lab, &Keystore::default(), &key, "VERIFY-1")?;
        lab.create_root_sets(&Keystore::default())?;
        let lab_set = lab.store.root_set(sets::DEVICE)?.context("device set")?;
        // Without: no CRL and no status required. With: the lab's root CRL and this one.
        let mut plain = lab_set.clone();
        plain.crls.clear();
        plain.revocation.mode = m2mpki_ca::rootset::RevocationMode::BestEffort;
        let mut with_crl = lab_set;
        let issuers: Vec<Vec<u8>> = lab.cas.iter().map(|c| c.cert_der.clone()).collect();
        let big = m2mpki_ca::rootset::CrlRecord::from_der(&crl_der, "bench")?;
        // The lab's own CRL of this CA is newer (it was issued after this one): this one
        // takes its place.
        with_crl.crls.retain(|c| c.issuer != big.issuer);
        with_crl.attach_crl(big, &issuers)?;
        let time_verify = |set: &m2mpki_ca::rootset::RootSet| {
            let now = time::OffsetDateTime::now_utc();
            repeat(size.runs.max(5), || {
                let start = Instant::now();
                m2mpki_ca::verify::verify(
                    set,
                    &chain,
                    m2mpki_ca::verify::Purpose::Client,
                    None,
                    now,
                )
                .map_err(|r| anyhow::anyhow!("refused: {r}"))?;
                Ok(start.elapsed().as_secs_f64() * 1000.0)
            })
        };
        let base = time_verify(&plain)?;
        let base_median = base.median;
        // The same chain and set through m2mpki's own path validation (what chains under URI,
        // directoryName or rfc822Name constraints get, e.g. every enterprise node chain).
        let own = {
            let now = time::OffsetDateTime::now_utc();
            repeat(size.runs.max(5), || {
                let start = Instant::now();
                m2mpki_ca::verify::verify_using(
                    &plain,
                    &chain,
                    m2mpki_ca::verify::Purpose::Client,
                    None,
                    now,
                    m2mpki_ca::verify::EkuPolicy::Required,
                    m2mpki_ca::verify::Validator::Own,
                )
                .map_err(|r| anyhow::anyhow!("refused: {r}"))?;
                Ok(start.elapsed().as_secs_f64() * 1000.0)
            })?
        };
        // The IN prepares a set's CRLs when it loads the set (at start and on every trust
        // refresh), not during a handshake: time that step, then verification after it.
        let start = Instant::now();
        // (The set holds the root's CRL too, which is small.)
        if m2mpki_ca::verify::prepare_crls(&with_crl) != with_crl.crls.len() {
            bail!("the CRL could not be prepared");
        }
        report.add(
            "5 revocation",
            &format!(
                "prepare the {entries_seen}-entry CRL (IN trust load, off the handshake path)"
            ),
            "ms",
            stat(vec![start.elapsed().as_secs_f64() * 1000.0]),
        );
        report.add(
            "5 revocation",
            "verify one device chain, set without CRL",
            "ms",
            base,
        );
        report
            .add(
                "5 revocation",
                "verify one device chain, set without CRL, m2mpki's own path validation",
                "ms",
                own,
            )
            .against("set without CRL (rustls-webpki)", base_median, None);
        report
            .add(
                "5 revocation",
                &format!("verify one device chain, set with the {entries_seen}-entry CRL"),
                "ms",
                time_verify(&with_crl)?,
            )
            .against("set without CRL", base_median, None);

        // What one handshake's chain check costs, in a loop of verifications: bare
        // rustls-webpki with its anchors built once (what a plain mutual-TLS server does),
        // m2mpki's verify() (which prepares the set at each call), and the IN's TrustedSet
        // (prepared once per set load), with and without the CRL. Same chain, same set.
        // Each run times the four one after another, and ratios are per run (this VM's speed
        // moves by tens of percent within seconds).
        let batch = if size.smoke { 50 } else { 2_000 };
        let per_call = |f: &dyn Fn() -> Result<()>| -> Result<f64> {
            let start = Instant::now();
            for _ in 0..batch {
                f()?;
            }
            Ok(start.elapsed().as_secs_f64() * 1e6 / batch as f64)
        };
        let anchors: Vec<_> = plain
            .anchors
            .iter()
            .map(|a| {
                webpki::anchor_from_trusted_cert(&rustls::pki_types::CertificateDer::from(
                    a.der.as_slice(),
                ))
                .map(|t| t.to_owned())
            })
            .collect::<std::result::Result<_, _>>()?;
        let leaf = rustls::pki_types::CertificateDer::from(chain[0].as_slice());
        let intermediates: Vec<_> = chain[1..]
            .iter()
            .map(|d| rustls::pki_types::CertificateDer::from(d.as_slice()))
            .collect();
        let bare = || -> Result<()> {
            let ee = webpki::EndEntityCert::try_from(&leaf)?;
            ee.verify_for_usage(
                webpki::ALL_VERIFICATION_ALGS,
                &anchors,
                &intermediates,
                rustls::pki_types::UnixTime::now(),
                webpki::KeyUsage::client_auth(),
                None,
                None,
            )?;
            Ok(())
        };
        let now = time::OffsetDateTime::now_utc();
        let client = m2mpki_ca::verify::Purpose::Client;
        let refused = |r: m2mpki_ca::verify::Refusal| anyhow::anyhow!("refused: {r}");
        let per_call_verify = || {
            m2mpki_ca::verify::verify(&plain, &chain, client, None, now)
                .map(|_| ())
                .map_err(refused)
        };
        let trusted = [
            m2mpki_ca::verify::TrustedSet::new(plain.clone()),
            m2mpki_ca::verify::TrustedSet::new(with_crl.clone()),
        ];
        let through = |t: &m2mpki_ca::verify::TrustedSet| {
            let checked = m2mpki_ca::verify::Chain::check(&chain).map_err(refused)?;
            t.verify(&checked, &m2mpki_ca::verify::Check::client(now))
                .map(|_| ())
                .map_err(refused)
        };
        let names = [
            "chain check per handshake: m2mpki verify(), set prepared at each call",
            "chain check per handshake: the IN's TrustedSet, set without CRL",
            "chain check per handshake: the IN's TrustedSet, set with the CRL",
        ];
        let mut times: [Vec<f64>; 4] = Default::default();
        let mut ratios: [Vec<f64>; 3] = Default::default();
        for _ in 0..size.runs.max(3) {
            let base = per_call(&bare)?;
            let ours = [
                per_call(&per_call_verify)?,
                per_call(&|| through(&trusted[0]))?,
                per_call(&|| through(&trusted[1]))?,
            ];
            times[0].push(base);
            for (i, t) in ours.into_iter().enumerate() {
                times[i + 1].push(t);
                ratios[i].push(t / base);
            }
        }
        let [bare_t, rest @ ..] = times;
        report.add(
            "5 revocation",
            "chain check per handshake: bare rustls-webpki, anchors built once",
            "us",
            stat(bare_t),
        );
        for ((name, t), r) in names.into_iter().zip(rest).zip(ratios) {
            report.add("5 revocation", name, "us", stat(t)).paired(
                "bare rustls-webpki, same run",
                &stat(r),
                None,
            );
        }
    }
    Ok(())
}

/// Sections 1 to 3: the crypto ceilings, batch issuance and the peers. They share the
/// ceilings, the CSRs and the batch rates, so they run together.
fn issuance_benches(
    size: Size,
    report: &mut Report,
    work: &Path,
    python: Option<&Path>,
    m2mpki_bin: Option<&Path>,
) -> Result<()> {
    // SoftHSM2 for this process (before any module is loaded).
    let hsm = SoftHsm::create(&work.join("softhsm"))?;
    hsm.use_in_this_process();
    let pool_uri = token(&hsm, "bench-pool", work)?;
    let one_uri = token(&hsm, "bench-one", work)?;
    let cfg_pool = Pkcs11Config {
        sessions: cores(),
        ..Pkcs11Config::default()
    };
    let cfg_one = Pkcs11Config {
        sessions: 1,
        ..Pkcs11Config::default()
    };

    eprintln!("1. crypto ceiling");
    let ceiling = crypto_ceiling(size, report)?;
    let raw_key = hsm_raw(size, report, &pool_uri, &one_uri, &cfg_pool, &cfg_one)?;

    eprintln!("2. batch issuance from {} CSRs", size.csrs);
    let csr_dir = work.join("csrs");
    make_csrs(&csr_dir, size.csrs)?;
    // Every batch run is paired with its baseline, measured right before it: this VM's CPU
    // speed moves by tens of percent over minutes, and a ratio of two figures taken
    // minutes apart would measure that as much as the batch. Ratios are the median of the
    // per-run ratios.
    let base_secs = size.secs / 2.0;
    let cpu_ceiling = || ceiling.rate(cores(), base_secs);
    const CEILING: &str = "verify+sign ceiling, all cores, before each run";
    let batch = |lab: &LabPki, ks: &Keystore, out: &str, output: BatchOutput| {
        batch_rate(lab, ks, &csr_dir, &work.join(out), size.csrs, output)
    };
    let ks_sw = Keystore::default();
    let sw_lab = LabPki::build(&work.join("sw-home"), &ks_sw, &LabSpec::default())?;
    let mut sw_median = 0.0;
    let mut sw_files_median = 0.0;
    for (output, out, name) in [
        (
            BatchOutput::Pem,
            "out-sw",
            "issue batch --csr-dir, software CA key, a PEM file per certificate",
        ),
        (
            BatchOutput::Bundle,
            "out-sw-bundle",
            "issue batch --csr-dir --bundle, software CA key",
        ),
    ] {
        let (mut rates, mut ratios) = (Vec::new(), Vec::new());
        for _ in 0..size.runs {
            let base = cpu_ceiling();
            let r = batch(&sw_lab, &ks_sw, out, output)?;
            rates.push(r);
            ratios.push(r / base);
        }
        let rates = stat(rates);
        match output {
            BatchOutput::Bundle => sw_median = rates.median,
            _ => sw_files_median = rates.median,
        }
        report.add("2 batch", name, "certs/s", rates).paired(
            CEILING,
            &stat(ratios),
            Some((0.50, false)),
        );
    }
    let hsm_lab = |home: &str, ks: &Keystore, uri: &Pkcs11Uri| {
        LabPki::build(
            &work.join(home),
            ks,
            &LabSpec {
                backend: KeyBackend::Pkcs11(uri.clone()),
                ..LabSpec::default()
            },
        )
    };
    let ks_pool = Keystore::default().with_pkcs11(cfg_pool.clone());
    let pool_lab = hsm_lab("hsm-home", &ks_pool, &pool_uri)?;
    let ks_one = Keystore::default().with_pkcs11(cfg_one.clone());
    let one_lab = hsm_lab("hsm1-home", &ks_one, &one_uri)?;
    // Pool and single-session runs alternate, each pool run after its raw C_Sign baseline.
    let (mut pooled, mut vs_raw, mut single, mut vs_single) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..size.runs {
        let raw = raw_sign_rate(&raw_key, base_secs);
        let p = batch(&pool_lab, &ks_pool, "out-hsm", BatchOutput::Bundle)?;
        let s = batch(&one_lab, &ks_one, "out-hsm1", BatchOutput::Bundle)?;
        pooled.push(p);
        vs_raw.push(p / raw);
        single.push(s);
        vs_single.push(p / s);
    }
    report
        .add(
            "2 batch",
            &format!(
                "issue batch --csr-dir --bundle, SoftHSM2 CA key, pool of {}",
                cfg_pool.sessions
            ),
            "certs/s",
            stat(pooled),
        )
        .paired(
            "raw parallel C_Sign, before each run",
            &stat(vs_raw),
            Some((0.50, false)),
        );
    report.add(
        "2 batch",
        "issue batch --csr-dir --bundle, SoftHSM2 CA key, 1 session",
        "certs/s",
        stat(single),
    );
    let vs_single = stat(vs_single);
    let met = vs_single.median >= 1.6;
    report
        .add(
            "2 batch",
            "SoftHSM2 batch: pool vs 1 session, run after run",
            "x",
            vs_single,
        )
        .absolute(">= 1.6", met);

    eprintln!("3. peers on the same CSRs, whole processes, fresh folders");
    // Like with like: the same CSRs (a folder holding exactly them), a process each, each
    // run into a folder that never held files, after a sync; the three alternate run by run
    // and each ratio is the median of per-run ratios. m2mpki runs on a home of its own
    // that no other process holds open.
    let peer_dir = work.join("csrs-peer");
    std::fs::create_dir_all(&peer_dir)?;
    let mut names_sorted: Vec<PathBuf> = std::fs::read_dir(&csr_dir)?
        .flatten()
        .map(|e| e.path())
        .collect();
    names_sorted.sort();
    for f in names_sorted.iter().take(size.peer_csrs) {
        std::fs::copy(f, peer_dir.join(f.file_name().context("CSR name")?))?;
    }
    let peer_home = work.join("peer-home");
    let peer_ca = {
        let lab = LabPki::build(&peer_home, &ks_sw, &LabSpec::default())?;
        let ca = lab.ca(names::MFR_CA).context("mfr-ca")?;
        PeerCa {
            cert_der: ca.cert_der.clone(),
            key: lab
                .home
                .root()
                .join("keys")
                .join(format!("{}.key.pem", names::MFR_CA)),
        }
    };
    let bin = m2mpki_bin
        .context("section 3 runs the m2mpki binary: give --m2mpki PATH (scripts/bench does)")?;
    let (mut ossl, mut m_bundle, mut m_files, mut r_bundle, mut r_files) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for run in 0..size.runs {
        let o = openssl_ca_rate(
            &peer_ca,
            &peer_dir,
            &work.join(format!("openssl-ca-{run}")),
            size.peer_csrs,
        )?;
        let b = m2mpki_batch_process_rate(
            bin,
            &peer_home,
            &peer_dir,
            &work.join(format!("m2mpki-bundle-{run}")),
            size.peer_csrs,
            true,
        )?;
        let f = m2mpki_batch_process_rate(
            bin,
            &peer_home,
            &peer_dir,
            &work.join(format!("m2mpki-files-{run}")),
            size.peer_csrs,
            false,
        )?;
        ossl.push(o);
        m_bundle.push(b);
        m_files.push(f);
        r_bundle.push(b / o);
        r_files.push(f / o);
    }
    let ossl = stat(ossl);
    report.add(
        "3 peers",
        &format!(
            "openssl ca -batch -infiles ({} CSRs, one process)",
            size.peer_csrs
        ),
        "certs/s",
        ossl,
    );
    report.add(
        "3 peers",
        &format!(
            "m2mpki issue batch --csr-dir --bundle ({} CSRs, one process)",
            size.peer_csrs
        ),
        "certs/s",
        stat(m_bundle),
    );
    report.add(
        "3 peers",
        &format!(
            "m2mpki issue batch --csr-dir, a PEM file per certificate ({} CSRs, one process)",
            size.peer_csrs
        ),
        "certs/s",
        stat(m_files),
    );
    let r_bundle = stat(r_bundle);
    let met = r_bundle.median >= 5.0;
    report
        .add(
            "3 peers",
            "m2mpki --bundle vs openssl ca, run by run",
            "x",
            r_bundle,
        )
        .absolute(">= 5", met);
    let r_files = stat(r_files);
    let met = r_files.median >= 3.0;
    report
        .add(
            "3 peers",
            "m2mpki, a file per certificate, vs openssl ca, run by run",
            "x",
            r_files,
        )
        .absolute(">= 3", met);
    // Python signs in its own process without writing files; m2mpki's in-process batch
    // (section 2) writes and records every certificate: the ratio favours Python.
    match &python {
        Some(py) => {
            let p = repeat(size.runs, || {
                python_rate(&sw_lab, py, &csr_dir, &work.join("python"), size.peer_csrs)
            })?;
            let pm = p.median;
            report.add(
                "3 peers",
                &format!("Python cryptography in-process ({} CSRs)", size.peer_csrs),
                "certs/s",
                p,
            );
            report
                .add(
                    "3 peers",
                    "m2mpki batch --bundle (in-process, section 2) vs Python cryptography",
                    "x",
                    stat(vec![sw_median / pm]),
                )
                .absolute(">= 4", sw_median / pm >= 4.0);
            report
                .add(
                    "3 peers",
                    "m2mpki batch, a file per certificate (in-process), vs Python cryptography",
                    "x",
                    stat(vec![sw_files_median / pm]),
                )
                .absolute(">= 4", sw_files_median / pm >= 4.0);
        }
        None => {
            report.notes.insert(
                "python".into(),
                "not measured: no --python with the cryptography package".into(),
            );
        }
    }
    drop(sw_lab);
    drop(pool_lab);
    drop(one_lab);
    Ok(())
}

/// m2mpki's benchmarks: issuance, the bootstrap and revocation against this machine's own
/// ceilings and against `openssl ca` and Python `cryptography`, measured in one run.
#[derive(clap::Parser, Debug)]
#[command(name = "m2mpki-bench")]
struct Args {
    /// Tiny sizes, seconds (CI keeps the command working with it).
    #[arg(long)]
    smoke: bool,
    /// The Python with `cryptography` for section 3.
    #[arg(long, value_name = "PATH")]
    python: Option<PathBuf>,
    /// The `m2mpki` binary (sections 3 and 4 run it as a process).
    #[arg(long = "m2mpki", value_name = "PATH")]
    m2mpki_bin: Option<PathBuf>,
    /// Where the results go as JSON.
    #[arg(
        long = "out",
        value_name = "FILE",
        default_value = "target/bench/results.json"
    )]
    out_json: PathBuf,
    /// A PostgreSQL server's administrative URL for section 7 (scripts/bench starts a
    /// throwaway cluster with fsync on); section 7 is skipped without it.
    #[arg(long, value_name = "URL")]
    pg: Option<String>,
    /// Run only these sections (e.g. `2,4`, for profiling); all by default.
    #[arg(long, value_delimiter = ',', value_name = "N,...")]
    only: Option<Vec<String>>,
}

/// Transactions PostgreSQL counted as committed in database `db` so far (the stats of a
/// finished backend are flushed when it exits).
fn pg_commits(admin: &str, db: &str) -> Result<i64> {
    let mut c = postgres::Client::connect(admin, postgres::NoTls)?;
    c.batch_execute("SELECT pg_stat_clear_snapshot()")?;
    let row = c.query_one(
        "SELECT xact_commit FROM pg_stat_database WHERE datname = $1",
        &[&db],
    )?;
    Ok(row.try_get(0)?)
}

/// Creates database `db` on the cluster `admin` names and migrates the redb store of `home`
/// into it with `m2mpki store migrate`; returns both store locations (redb:..., postgres://...).
fn migrated_database(bin: &Path, admin: &str, home: &Path, db: &str) -> Result<(String, String)> {
    postgres::Client::connect(admin, postgres::NoTls)?
        .batch_execute(&format!("CREATE DATABASE {db}"))?;
    let url = match admin.rsplit_once('/') {
        Some((base, _)) => format!("{base}/{db}"),
        None => bail!("--pg must be a postgres:// URL ending in /DATABASE"),
    };
    let redb = format!("redb:{}", home.join("store.redb").display());
    let migrated = Command::new(bin)
        .args(["store", "migrate", "--from", &redb, "--to", &url])
        .output()?;
    if !migrated.status.success() {
        bail!(
            "store migrate: {}",
            String::from_utf8_lossy(&migrated.stderr)
        );
    }
    Ok((redb, url))
}

/// Section 8, DTLS: hostile review D1 timed. An IN serving DTLS alone with its defaults
/// (`max_peers = 1024`, 64 per address, a 10 s handshake deadline); from 127.0.0.6 an attacker
/// that makes one cookie-proven silent peer after another, as fast as one thread can (each
/// holds its place until the deadline or eviction); a legitimate node on 127.0.0.1 enrolling
/// over DTLS 20 times in a row. The baseline is the same node's enrolments on the same IN
/// right before the attack.
fn dtls_hostile_bench(size: Size, report: &mut Report, work: &Path) -> Result<()> {
    use m2mpki_test_pki::hostile::DtlsFlood;
    use std::net::IpAddr;
    const ATTACKER: [u8; 4] = [127, 0, 0, 6];
    let (legit_n, fill) = if size.smoke {
        (5, Duration::from_millis(500))
    } else {
        (20, Duration::from_secs(2))
    };
    let dir = work.join("hostile-dtls");
    let BenchLab {
        layout,
        fleet,
        keystore,
        rt,
        server_rt,
    } = bench_lab(&dir, "HOSTILE-DTLS")?;
    let mut config = m2mpki_test_pki::lab::config_on_free_ports(&layout)?;
    config.listen = None;
    config.psk = None;
    config.metrics_listen = None;
    let mut profile = fleet.profile.clone();
    profile.transport = m2mpki_bootstrap::config::Transport::Dtls;
    let (chain, key) = fleet.nodes.first().context("an empty fleet")?.clone();
    let (mut baseline, mut under) = (Vec::new(), Vec::new());
    let (mut base_failed, mut failed, mut proven, mut secs) = (0usize, 0usize, 0usize, 0f64);
    for _ in 0..size.runs {
        let home = m2mpki_ca::Home::open(&layout.home)?;
        let server = Arc::new(Server::new(config.clone(), &home, &keystore)?);
        let serving = serve(&server_rt, &server)?;
        let addr = serving.dtls.context("the IN serves no DTLS")?;
        let enrolment = || Enrolment {
            profile: profile.clone(),
            chain: chain.clone(),
            key: key.clone(),
            connect: Some(addr.to_string()),
            versions: vec![],
            timeout: Duration::from_secs(30),
        };
        let timed = |out: &mut Vec<f64>| -> usize {
            let mut fails = 0;
            for _ in 0..legit_n {
                let start = Instant::now();
                if rt.block_on(client::enroll(enrolment())).is_err() {
                    fails += 1;
                }
                out.push(start.elapsed().as_secs_f64() * 1000.0);
            }
            fails
        };
        base_failed += timed(&mut baseline);
        let started = Instant::now();
        let flood = DtlsFlood::start(IpAddr::from(ATTACKER), addr, &profile.in_fqdn.to_string());
        std::thread::sleep(fill);
        failed += timed(&mut under);
        proven += flood.stop();
        secs += started.elapsed().as_secs_f64();
        serving.stop(&server_rt)?;
    }
    let base = stat(baseline);
    let bm = base.median;
    report.add(
        "8 hostile dtls",
        &format!("legitimate DTLS enrolment, no attack, {legit_n} in a row"),
        "ms",
        base,
    );
    report.add(
        "8 hostile dtls",
        "legitimate DTLS enrolments that failed, no attack",
        "count",
        stat(vec![base_failed as f64]),
    );
    let lat = stat(under);
    let worst = lat.max;
    let row = report.add(
        "8 hostile dtls",
        &format!(
            "legitimate DTLS enrolment under a cookie-proven silent-peer flood from one address, {legit_n} in a row"
        ),
        "ms",
        lat,
    );
    row.against("no attack (median)", bm, None);
    row.absolute("max <= 1000 ms", worst <= 1000.0 && failed == 0);
    report.add(
        "8 hostile dtls",
        "attacker peers cookie-proven per second",
        "peers/s",
        stat(vec![proven as f64 / secs.max(1e-9)]),
    );
    report.add(
        "8 hostile dtls",
        "legitimate DTLS enrolments that failed, under attack",
        "count",
        stat(vec![failed as f64]),
    );
    Ok(())
}

/// Section 8: availability under hostile load, the attack of `bootstrap/tests/hostile.rs`
/// timed. An IN with `max_connections = 128` and every timeout at 30 s; 128 authenticated
/// clients (64 from each of 127.0.0.3 and .4) that then ask nothing; 2 000 connections from
/// 127.0.0.2 that send nothing or half a ClientHello, each reopened as soon as the IN closes
/// it; and a legitimate node on 127.0.0.1 enrolling 20 times in a row. The baseline is the
/// same node's 20 enrolments on the same IN right before the attack starts (on the IN with the
/// kernel's queue). The attack is also
/// run against an IN whose accept queue is 128 (`TcpListener::bind`'s, what the IN asked for
/// until 2026-12-01), with the kernel's count of SYNs dropped on a full queue for both.
#[allow(clippy::too_many_lines)]
fn hostile_bench(size: Size, report: &mut Report, work: &Path) -> Result<()> {
    use m2mpki_test_pki::hostile::{listen_overflows, Flood};
    use std::net::IpAddr;
    const ATTACKER: [u8; 4] = [127, 0, 0, 2];
    const IDLE: [[u8; 4]; 2] = [[127, 0, 0, 3], [127, 0, 0, 4]];
    let (flood_n, idle_n, legit_n, fill) = if size.smoke {
        (200, 16, 5, Duration::from_millis(500))
    } else {
        (2000, 128, 20, Duration::from_secs(2))
    };
    let dir = work.join("hostile");
    let BenchLab {
        layout,
        fleet,
        keystore,
        rt,
        server_rt,
    } = bench_lab(&dir, "HOSTILE")?;
    let mut config = m2mpki_test_pki::lab::config_on_free_ports(&layout)?;
    config.dtls = None;
    config.psk = None;
    config.metrics_listen = None;
    config.limits.max_connections = 128;
    config.limits.hello_timeout = Duration::from_secs(30);
    config.limits.handshake_timeout = Duration::from_secs(30);
    config.limits.idle_timeout = Duration::from_secs(30);

    // (name, accept queue of 128?)
    let variants = [
        ("accept queue net.core.somaxconn", false),
        ("accept queue 128", true),
    ];
    let mut baseline = Vec::new();
    let mut under: Vec<Vec<f64>> = vec![Vec::new(); variants.len()];
    let mut failed = vec![0usize; variants.len()];
    // NaN when the kernel's count cannot be read: not a measured zero.
    let mut overflows = vec![0f64; variants.len()];
    let mut opened = vec![0usize; variants.len()];
    let mut attack_secs = vec![0f64; variants.len()];
    let mut held_min = usize::MAX;
    let mut base_failed = 0usize;
    for run in 0..size.runs {
        // The two INs take turns going first, run by run: the lab's stores grow with every
        // enrolment, and neither side always meets the fuller ones.
        let order = if run % 2 == 0 { [0, 1] } else { [1, 0] };
        for v in order {
            let short_queue = variants[v].1;
            let home = m2mpki_ca::Home::open(&layout.home)?;
            let server = Arc::new(Server::new(config.clone(), &home, &keystore)?);
            let serving = if short_queue {
                let listeners = {
                    let _in_runtime = server_rt.enter();
                    let socket = tokio::net::TcpSocket::new_v4()?;
                    socket.set_reuseaddr(true)?;
                    socket.bind("127.0.0.1:0".parse()?)?;
                    m2mpki_bootstrap::server::Listeners {
                        tls: Some(socket.listen(128)?),
                        dtls: None,
                        psk: None,
                        psk_dtls: None,
                        metrics: None,
                    }
                };
                serve_on(&server_rt, &server, listeners)?
            } else {
                serve(&server_rt, &server)?
            };
            let addr = serving.tls.context("the IN serves no TLS")?;
            let prepared = prepared_fleet(&fleet, addr, TlsVersion::Tls13)?;
            let legit = &prepared[0];
            let timed = |out: &mut Vec<f64>| -> usize {
                let mut fails = 0;
                for _ in 0..legit_n {
                    let start = Instant::now();
                    if rt.block_on(client::enroll_prepared(legit)).is_err() {
                        fails += 1;
                    }
                    out.push(start.elapsed().as_secs_f64() * 1000.0);
                }
                fails
            };
            if !short_queue {
                base_failed += timed(&mut baseline);
            }
            let held = rt.block_on(async {
                let mut held = Vec::new();
                for (i, p) in prepared[1..=idle_n].iter().enumerate() {
                    let from = IpAddr::from(IDLE[i % 2]);
                    if let Ok(c) = client::connect_prepared_from(p, Some(from)).await {
                        held.push(c);
                    }
                }
                held
            });
            held_min = held_min.min(held.len());
            let before = listen_overflows();
            let started = Instant::now();
            let flood = Flood::start(rt.handle(), IpAddr::from(ATTACKER), addr, flood_n);
            std::thread::sleep(fill);
            failed[v] += timed(&mut under[v]);
            opened[v] += flood.stop();
            attack_secs[v] += started.elapsed().as_secs_f64();
            overflows[v] += match (before, listen_overflows()) {
                (Some(b), Some(a)) => a.saturating_sub(b) as f64,
                _ => f64::NAN,
            };
            drop(held);
            serving.stop(&server_rt)?;
        }
    }
    let attack = format!(
        "{flood_n} churned silent/half-hello + {held_min} idle authenticated, {legit_n} in a row"
    );
    let base = stat(baseline);
    let bm = base.median;
    report.add(
        "8 hostile",
        &format!("legitimate enrolment, no attack, {legit_n} in a row"),
        "ms",
        base,
    );
    report.add(
        "8 hostile",
        "legitimate enrolments that failed, no attack",
        "count",
        stat(vec![base_failed as f64]),
    );
    for (v, (name, _)) in variants.iter().enumerate() {
        let lat = stat(std::mem::take(&mut under[v]));
        let worst = lat.max;
        let row = report.add(
            "8 hostile",
            &format!("legitimate enrolment under attack ({attack}), {name}"),
            "ms",
            lat,
        );
        row.against("no attack (median)", bm, None);
        if v == 0 {
            row.absolute("max <= 1000 ms", worst <= 1000.0 && failed[v] == 0);
        }
        report.add(
            "8 hostile",
            &format!("SYNs dropped on a full accept queue during the attacks, {name}"),
            "drops",
            stat(vec![overflows[v]]),
        );
        report.add(
            "8 hostile",
            &format!("attacker connections opened per second, {name}"),
            "conn/s",
            stat(vec![opened[v] as f64 / attack_secs[v].max(1e-9)]),
        );
        report.add(
            "8 hostile",
            &format!("legitimate enrolments that failed, {name}"),
            "count",
            stat(vec![failed[v] as f64]),
        );
    }
    report.notes.insert(
        "8".into(),
        "ListenOverflows is the kernel's count for the whole machine: other listeners on it add to it".into(),
    );
    Ok(())
}

/// Section 7: the same `issue batch` (process, CSR folder, --bundle, --reissue) into the lab's
/// redb store and into the same ledger migrated to PostgreSQL (a database of its own on a
/// cluster with fsync on), alternating run by run; the ratio is PostgreSQL over redb per pair.
fn store_bench(
    size: Size,
    report: &mut Report,
    work: &Path,
    bin: &Path,
    admin: &str,
) -> Result<()> {
    let n = size.peer_csrs;
    let home = work.join("store-home");
    let lab = LabPki::build(&home, &Keystore::default(), &LabSpec::default())?;
    drop(lab);
    let csr_dir = work.join("store-csrs");
    make_csrs(&csr_dir, n)?;
    let db = format!("m2mpki_bench_{}", std::process::id());
    let (redb, url) = migrated_database(bin, admin, &home, &db)?;
    let (mut on_redb, mut on_pg, mut ratios, mut per_cert) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for run in 0..size.runs {
        let r = m2mpki_batch_into(
            bin,
            &home,
            Some(&redb),
            &csr_dir,
            &work.join(format!("store-redb-{run}")),
            n,
            true,
        )?;
        let before = pg_commits(admin, &db)?;
        let p = m2mpki_batch_into(
            bin,
            &home,
            Some(&url),
            &csr_dir,
            &work.join(format!("store-pg-{run}")),
            n,
            true,
        )?;
        // Our own snapshot query is one more committed transaction.
        let commits = pg_commits(admin, &db)? - before - 1;
        on_redb.push(r);
        on_pg.push(p);
        ratios.push(p / r);
        per_cert.push(commits as f64 * 1000.0 / n as f64);
    }
    report.add(
        "7 store",
        &format!("m2mpki issue batch --bundle into redb ({n} CSRs, one process)"),
        "certs/s",
        stat(on_redb),
    );
    report
        .add(
            "7 store",
            &format!("the same batch into PostgreSQL, fsync on ({n} CSRs, one process)"),
            "certs/s",
            stat(on_pg),
        )
        .paired("redb, the run before", &stat(ratios), None);
    report.add(
        "7 store",
        "PostgreSQL transactions committed per 1 000 certificates (reads and writes)",
        "xact/1000",
        stat(per_cert),
    );
    Ok(())
}

/// CPU time (user + system) of every `postgres` process on the machine so far, in seconds.
fn postgres_cpu_secs() -> f64 {
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return f64::NAN;
    };
    let mut ticks = 0.0;
    for p in procs.flatten() {
        let stat = std::fs::read_to_string(p.path().join("stat")).unwrap_or_default();
        let Some((head, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        if !head.ends_with("(postgres") {
            continue;
        }
        let f: Vec<f64> = rest
            .split_whitespace()
            .map(|x| x.parse().unwrap_or(0.0))
            .collect();
        ticks += f.get(11).copied().unwrap_or(0.0) + f.get(12).copied().unwrap_or(0.0);
    }
    ticks / 100.0
}

/// Section 7, the IN: enrolments/s and p99 over TLS 1.3 with the IN's stores (root sets,
/// credentials, grants) on PostgreSQL (fsync on) against the same IN on redb, in one process
/// each run, alternating which goes first; the ratio is PostgreSQL over redb per pair. Both
/// INs serve the same lab and the same fleet, and their stores start empty and grow the same
/// way through the runs.
fn in_store_bench(
    size: Size,
    report: &mut Report,
    work: &Path,
    bin: &Path,
    admin: &str,
) -> Result<()> {
    let dir = work.join("in-store");
    let BenchLab {
        layout,
        fleet,
        keystore,
        rt,
        server_rt,
    } = bench_lab(&dir, "PGFLEET")?;
    // The PostgreSQL IN reads the lab's root sets from the same ledger, migrated.
    let db = format!("m2mpki_bench_in_{}", std::process::id());
    let (_, url) = migrated_database(bin, admin, &layout.home, &db)?;
    let home = m2mpki_ca::Home::open(&layout.home)?;
    let mut ins = Vec::new();
    for store in [None, Some(m2mpki_ca::StoreLocation::Postgres(url.clone()))] {
        let mut config = m2mpki_test_pki::lab::config_on_free_ports(&layout)?;
        config.limits.max_connections = 4096;
        config.limits.max_connections_per_address = 4096;
        config.store = store;
        let server = Arc::new(Server::new(config, &home, &keystore)?);
        let serving = serve(&server_rt, &server)?;
        let addr = serving.tls.context("the IN serves no TLS")?;
        let prepared = prepared_fleet(&fleet, addr, TlsVersion::Tls13)?;
        ins.push((server, prepared, serving));
    }
    for &c in size.concurrency.iter().filter(|&&c| c > 1) {
        let (mut rates, mut p99s, mut commits) =
            ([vec![], vec![]], [vec![], vec![]], [vec![], vec![]]);
        let (mut in_cpu, mut db_cpu) = ([vec![], vec![]], [vec![], vec![]]);
        let mut ratios = Vec::new();
        let mut failures = 0;
        for run in 0..size.runs {
            let mut rate = [0.0; 2];
            // Alternate which store goes first.
            for k in [run % 2, 1 - run % 2] {
                let (server, prepared, _) = &ins[k];
                let before = server.credential_commits();
                let db_before = postgres_cpu_secs();
                let preps = prepared.clone();
                let (r, server_us) = measured(&rt, c, size.secs, move |i| {
                    let p = preps[i % preps.len()].clone();
                    async move { client::enroll_prepared(&p).await.is_ok() }
                });
                let n = server.credential_commits() - before;
                in_cpu[k].push(server_us);
                db_cpu[k].push((postgres_cpu_secs() - db_before) * 1e6 / r.ops.max(1) as f64);
                failures += r.failures;
                rate[k] = r.rate;
                rates[k].push(r.rate);
                p99s[k].push(r.p99_ms);
                commits[k].push(n as f64 / r.ops.max(1) as f64);
            }
            ratios.push(rate[1] / rate[0]);
        }
        let [redb_rate, pg_rate] = rates;
        let [redb_p99, pg_p99] = p99s;
        let [redb_commits, pg_commits] = commits;
        let [redb_in_cpu, pg_in_cpu] = in_cpu;
        let [_, pg_db_cpu] = db_cpu;
        report.add(
            "7 store",
            &format!("IN enrolments, redb store, TLS 1.3, {c} concurrent"),
            "enrol/s",
            stat(redb_rate),
        );
        report
            .add(
                "7 store",
                &format!("IN enrolments, PostgreSQL store, TLS 1.3, {c} concurrent"),
                "enrol/s",
                stat(pg_rate),
            )
            .paired("redb, the same run", &stat(ratios), None);
        let rp = stat(redb_p99);
        let rpm = rp.median;
        report.add(
            "7 store",
            &format!("IN enrolment p99, redb store, {c} concurrent"),
            "ms",
            rp,
        );
        report
            .add(
                "7 store",
                &format!("IN enrolment p99, PostgreSQL store, {c} concurrent"),
                "ms",
                stat(pg_p99),
            )
            .against("redb p99", rpm, None);
        report.add(
            "7 store",
            &format!("credential commits per enrolment, redb store, {c} concurrent"),
            "commits",
            stat(redb_commits),
        );
        report.add(
            "7 store",
            &format!("credential commits per enrolment, PostgreSQL store, {c} concurrent"),
            "commits",
            stat(pg_commits),
        );
        let rc = stat(redb_in_cpu);
        let rcm = rc.median;
        report.add(
            "7 store",
            &format!("IN CPU per enrolment (server threads), redb store, {c} concurrent"),
            "us",
            rc,
        );
        report
            .add(
                "7 store",
                &format!("IN CPU per enrolment (server threads), PostgreSQL store, {c} concurrent"),
                "us",
                stat(pg_in_cpu),
            )
            .against("redb", rcm, None);
        report.add(
            "7 store",
            &format!("PostgreSQL server CPU per enrolment (its processes), {c} concurrent"),
            "us",
            stat(pg_db_cpu),
        );
        report
            .add(
                "7 store",
                &format!("failed IN enrolments (both stores), {c} concurrent"),
                "count",
                stat(vec![failures as f64]),
            )
            .absolute("0", failures == 0);
    }
    for (_, _, serving) in ins {
        serving.stop(&server_rt)?;
    }
    Ok(())
}

fn main() -> Result<()> {
    let Args {
        smoke,
        python,
        m2mpki_bin,
        out_json,
        pg,
        only,
    } = clap::Parser::parse();
    let size = if smoke { SMOKE } else { FULL };
    let run = |n: &str| only.as_ref().is_none_or(|o| o.iter().any(|x| x == n));
    let work_dir = tempfile::Builder::new().prefix("m2mpki-bench-").tempdir()?;
    let work = work_dir.path();
    let mut report = Report {
        rows: Vec::new(),
        notes: BTreeMap::new(),
    };
    report.notes.insert(
        "mode".into(),
        if size.smoke {
            "smoke".into()
        } else {
            "full".into()
        },
    );
    report.notes.insert("cores".into(), cores().to_string());

    if run("1") || run("2") || run("3") {
        issuance_benches(
            size,
            &mut report,
            work,
            python.as_deref(),
            m2mpki_bin.as_deref(),
        )?;
    }

    if run("4") {
        eprintln!("4. bootstrap");
        bootstrap_bench(size, &mut report, work, m2mpki_bin.as_deref())?;
    }
    if run("5") {
        eprintln!("5. revocation scale");
        revocation_bench(size, &mut report, work)?;
    }
    if run("6") {
        eprintln!("6. bootstrap over DTLS + CoAP");
        dtls_bench(size, &mut report, work, m2mpki_bin.as_deref())?;
    }

    if run("7") {
        eprintln!("7. the CA and IN stores: PostgreSQL against redb");
        match (&pg, m2mpki_bin.as_deref()) {
            (Some(url), Some(bin)) => {
                store_bench(size, &mut report, work, bin, url)?;
                in_store_bench(size, &mut report, work, bin, url)?;
            }
            _ => {
                report.notes.insert(
                    "7".into(),
                    "skipped: needs --pg URL and --m2mpki PATH (scripts/bench gives both)".into(),
                );
            }
        }
    }

    if run("8") {
        eprintln!("8. availability under hostile load");
        hostile_bench(size, &mut report, work)?;
        dtls_hostile_bench(size, &mut report, work)?;
    }

    // The table.
    println!(
        "{:<16} {:<72} {:>12} {:>10} {:>10} {:<10} {:>8} {:<10} MET",
        "SECTION", "MEASURE", "MEDIAN", "MIN", "MAX", "UNIT", "RATIO", "TARGET"
    );
    for r in &report.rows {
        println!(
            "{:<16} {:<72} {:>12.1} {:>10.1} {:>10.1} {:<10} {:>8} {:<10} {}",
            r.section,
            r.name,
            r.value.median,
            r.value.min,
            r.value.max,
            r.unit,
            r.ratio.map_or("-".into(), |x| format!("{x:.2}")),
            r.target.clone().unwrap_or_else(|| "-".into()),
            match r.met {
                Some(true) => "yes",
                Some(false) => "NO",
                None => "-",
            }
        );
    }
    for (k, v) in &report.notes {
        println!("note: {k}: {v}");
    }
    if let Some(parent) = out_json.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(
        &out_json,
        serde_json::to_string_pretty(&serde_json::json!({
            "date": m2mpki_ca::validity::format_time(time::OffsetDateTime::now_utc()),
            "notes": report.notes,
            "rows": report.rows,
        }))?,
    )?;
    eprintln!("wrote {}", out_json.display());
    Ok(())
}
