//! The command line, as clap structs. They are turned into library requests in `commands`.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

const EXIT_CODES: &str = "\
Exit codes:
  0  success
  1  refused by policy or verification (e.g. the ID already has a live certificate,
     the audit log is broken)
  2  bad usage or bad input (malformed file, CSR, ID, unknown CA, existing output file)
  3  internal, storage or HSM failure";

/// m2mpki: a certificate authority for oneM2M field nodes and Infrastructure Nodes.
#[derive(Debug, Parser)]
#[command(name = "m2mpki", version, after_help = EXIT_CODES, propagate_version = true)]
pub struct Cli {
    /// Home folder holding the store and software CA keys
    /// [default: $M2MPKI_HOME, else the platform data folder]
    #[arg(long, global = true, env = "M2MPKI_HOME", value_name = "DIR")]
    pub home: Option<PathBuf>,

    /// Where the ledger, audit log and root sets live: redb:PATH (processes of one host) or a
    /// postgres:// URL shared by several processes and hosts (docs/store.md)
    /// [default: $M2MPKI_STORE, else redb:<home>/store.redb]
    #[arg(
        long,
        global = true,
        env = "M2MPKI_STORE",
        hide_env_values = true,
        value_name = "STORE"
    )]
    pub store: Option<String>,

    /// Print results as JSON (one document on stdout); errors too, on stderr
    #[arg(long, global = true)]
    pub json: bool,

    /// File whose first line is the passphrase of CA key files (encrypts new ones)
    #[arg(long, global = true, env = "M2MPKI_KEY_PASS_FILE", value_name = "FILE")]
    pub key_pass_file: Option<PathBuf>,

    /// PKCS#11 module for pkcs11: URIs without module-path
    #[arg(long, global = true, env = "M2MPKI_PKCS11_MODULE", value_name = "PATH")]
    pub pkcs11_module: Option<PathBuf>,

    /// PKCS#11 sessions per token, for parallel signing [default: number of cores]
    #[arg(long, global = true, value_name = "N")]
    pub pkcs11_sessions: Option<usize>,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create and inspect certificate authorities
    #[command(subcommand, after_help = EXIT_CODES)]
    Ca(CaCommand),
    /// Issue device, node and server certificates
    #[command(subcommand, after_help = EXIT_CODES)]
    Issue(IssueCommand),
    /// Query the issuance ledger
    #[command(subcommand, after_help = EXIT_CODES)]
    Certs(CertsCommand),
    /// Check the audit log
    #[command(subcommand, after_help = EXIT_CODES)]
    Audit(AuditCommand),
    /// Agreed root sets (device roots per vertical, node roots per enterprise, IN roots)
    #[command(subcommand, after_help = EXIT_CODES)]
    Roots(RootsCommand),
    /// Move the CA store between backends (redb, PostgreSQL)
    #[command(subcommand, after_help = EXIT_CODES)]
    Store(StoreCommand),
    /// Revoke a certificate
    #[command(after_help = EXIT_CODES)]
    Revoke {
        /// Serial number (hex)
        serial: String,
        /// The CA that issued it
        #[arg(long)]
        ca: String,
        /// RFC 5280 reason: unspecified, key-compromise, ca-compromise, affiliation-changed,
        /// superseded, cessation-of-operation, privilege-withdrawn, aa-compromise
        #[arg(long, default_value = "unspecified")]
        reason: String,
    },
    /// Issue a CRL listing every revoked, unexpired certificate of a CA
    #[command(after_help = EXIT_CODES)]
    Crl {
        /// The CA
        #[arg(long)]
        ca: String,
        /// Output file (PEM; --der for DER)
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
        /// When the next CRL is due: 7d, 12h, ...
        #[arg(long, default_value = "7d")]
        next_update: String,
        /// Write DER instead of PEM
        #[arg(long)]
        der: bool,
        /// Overwrite an existing output file
        #[arg(long)]
        force: bool,
    },
    /// A complete lab PKI and the end-to-end bootstrap demo
    #[command(subcommand, after_help = EXIT_CODES)]
    Lab(LabCommand),
    /// The oneM2M PKI-based bootstrap: IN server, Field Node client, authorization
    #[command(subcommand, after_help = EXIT_CODES)]
    Bootstrap(BootstrapCommand),
    /// Keys on PKCS#11 tokens (HSMs)
    #[command(subcommand, after_help = PKCS11_HELP)]
    Hsm(HsmCommand),
}

const PKCS11_HELP: &str = "\
Keys are named by RFC 7512 URIs, e.g.
  pkcs11:token=CA;object=mfr-ca-key?module-path=/usr/lib/softhsm/libsofthsm2.so&pin-source=/etc/m2mpki/pin
The module comes from module-path, else --pkcs11-module, else M2MPKI_PKCS11_MODULE.
The PIN comes from pin-source=FILE, else M2MPKI_PKCS11_PIN, else a prompt on the terminal
(pin-value=... works but warns: it ends up in shell history).

Exit codes:
  0  success
  1  refused by policy or verification
  2  bad usage or input (bad URI, module not found, no such token or key, wrong PIN,
     an object with that label or id exists)
  3  internal or HSM failure (mechanism not supported, token removed)";

#[derive(Debug, Subcommand)]
pub enum StoreCommand {
    /// Copy everything (CAs, ledger, revocations, CRL numbers, root sets, the audit log as
    /// sealed) into an empty store in one transaction, checking the audit chain on the way
    /// and again at the destination
    Migrate {
        /// The store to copy: redb:PATH or a postgres:// URL
        #[arg(long, value_name = "STORE")]
        from: String,
        /// The empty store to fill: redb:PATH or a postgres:// URL
        #[arg(long, value_name = "STORE")]
        to: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum HsmCommand {
    /// Generate a key pair on a token (private key sensitive, never extractable)
    Keygen {
        /// pkcs11: URI naming the token and the new key's label (object=) and optional id=
        uri: String,
        /// Key type
        #[arg(long, value_enum, default_value_t = KeyTypeArg::P256)]
        key_type: KeyTypeArg,
    },
    /// Generate an AES-256 key on a token (e.g. the IN's credential store key)
    KeygenSecret {
        /// pkcs11: URI naming the token and the new key's label (object=)
        uri: String,
    },
    /// List tokens and their key objects
    List {
        /// PKCS#11 module [default: --pkcs11-module / M2MPKI_PKCS11_MODULE]
        #[arg(long, value_name = "PATH")]
        module: Option<PathBuf>,
        /// Log in to this token (a pkcs11: URI) to list its private keys too
        #[arg(long, value_name = "URI")]
        login: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum CaCommand {
    /// Create a root CA, or an issuing CA with --parent
    Init(Box<CaInitArgs>),
    /// List CAs
    List,
    /// Show one CA
    Show {
        /// CA name
        name: String,
        /// Print the CA certificate chain as PEM (CA first, root last)
        #[arg(long)]
        pem: bool,
    },
}

#[derive(Debug, Args)]
pub struct CaInitArgs {
    /// Name of the new CA (A-Z a-z 0-9 . _ -)
    pub name: String,
    /// Subject, e.g. "CN=Acme Device CA,O=Acme,C=DE" or "/C=DE/O=Acme/CN=Acme Device CA"
    #[arg(long, value_name = "DN")]
    pub subject: String,
    /// Parent CA: makes an issuing CA signed by it (default: a self-signed root)
    #[arg(long, value_name = "CA")]
    pub parent: Option<String>,
    /// Key type of a generated key
    #[arg(long, value_enum, default_value_t = KeyTypeArg::P256)]
    pub key_type: KeyTypeArg,
    /// Use an existing key instead of generating one: a PKCS#8 PEM file or a pkcs11: URI
    #[arg(long, value_name = "KEY")]
    pub key: Option<String>,
    /// Lifetime: 20y, 3650d, 12h or forever [default: 20y, cut to the parent's notAfter]
    #[arg(long)]
    pub validity: Option<String>,
    /// notBefore (RFC 3339) [default: now]
    #[arg(long, value_name = "TIME")]
    pub not_before: Option<String>,
    /// basicConstraints pathLenConstraint [default: none for a root, 0 for an issuing CA]
    #[arg(long, value_name = "N")]
    pub path_len: Option<u8>,
    /// Manufacturer hwType OID: lets this CA issue device certificates (RFC 4108)
    #[arg(long, value_name = "OID")]
    pub hw_type: Option<String>,
    /// Permitted dNSName subtree (repeatable)
    #[arg(long, value_name = "DOMAIN")]
    pub permit_dns: Vec<String>,
    /// Excluded dNSName subtree (repeatable)
    #[arg(long, value_name = "DOMAIN")]
    pub exclude_dns: Vec<String>,
    /// Permitted URI host subtree: host.example (exact) or .example (below) (repeatable)
    #[arg(long, value_name = "DOMAIN")]
    pub permit_uri_domain: Vec<String>,
    /// Excluded URI host subtree (repeatable)
    #[arg(long, value_name = "DOMAIN")]
    pub exclude_uri_domain: Vec<String>,
    /// Replace a key file left at keys/NAME.key.pem (by a `ca init` that crashed, say) that
    /// no CA of this store uses. Without it such a file is refused: a CA of another store of
    /// this home may use it. Never replaces the key of a CA of this store.
    #[arg(long)]
    pub force: bool,
}

#[derive(Debug, Clone, Copy, ValueEnum, Default)]
pub enum KeyTypeArg {
    /// ECDSA P-256 with SHA-256 (oneM2M default)
    #[default]
    P256,
    /// ECDSA P-384 with SHA-384
    P384,
    /// Ed25519
    Ed25519,
}

impl From<KeyTypeArg> for m2mpki_hsm::KeyType {
    fn from(k: KeyTypeArg) -> Self {
        match k {
            KeyTypeArg::P256 => m2mpki_hsm::KeyType::P256,
            KeyTypeArg::P384 => m2mpki_hsm::KeyType::P384,
            KeyTypeArg::Ed25519 => m2mpki_hsm::KeyType::Ed25519,
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum IssueCommand {
    /// Manufacturer-Issued Device Certificate (ID in subject serialNumber and in
    /// subjectAltName hardwareModuleName)
    Device {
        /// Pre-provisioned ID (1-64 of A-Z a-z 0-9 . : -)
        #[arg(long)]
        id: String,
        #[command(flatten)]
        common: IssueArgs,
    },
    /// Enterprise-Issued Node Certificate (subjectAltName onem2m-node://ENTERPRISE/ID)
    Node {
        /// The enterprise's domain, e.g. acme.example
        #[arg(long)]
        enterprise: String,
        /// Pre-provisioned ID (1-64 of A-Z a-z 0-9 . : -)
        #[arg(long)]
        id: String,
        #[command(flatten)]
        common: IssueArgs,
    },
    /// Infrastructure Node server certificate (subjectAltName dNSName)
    Server {
        /// The IN's FQDN
        #[arg(long)]
        fqdn: String,
        #[command(flatten)]
        common: IssueArgs,
    },
    /// Issue many device or node certificates (production line): parallel, rerunnable
    Batch(BatchArgs),
}

#[derive(Debug, Args)]
#[command(group = clap::ArgGroup::new("keysource").required(true).args(["csr", "key_out"]))]
pub struct IssueArgs {
    /// Issuing CA
    #[arg(long)]
    pub ca: String,
    /// Certify the key of this CSR (PEM or DER); its self-signature is verified
    #[arg(long, value_name = "FILE")]
    pub csr: Option<PathBuf>,
    /// Generate the key and write it here (PKCS#8 PEM, mode 0600)
    #[arg(long, value_name = "FILE")]
    pub key_out: Option<PathBuf>,
    /// Key type of a generated key
    #[arg(long, value_enum, default_value_t = KeyTypeArg::P256)]
    pub key_type: KeyTypeArg,
    /// Encrypt the generated key with the passphrase in this file
    #[arg(long, value_name = "FILE")]
    pub key_out_pass_file: Option<PathBuf>,
    /// Certificate output: PEM, leaf then intermediates (root not included)
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
    /// Write the leaf as DER instead
    #[arg(long)]
    pub der: bool,
    /// Overwrite existing output files
    #[arg(long)]
    pub force: bool,
    /// Lifetime: 5y, 397d, 12h or forever (device only) [default: the profile's]
    #[arg(long)]
    pub validity: Option<String>,
    /// notBefore (RFC 3339) [default: now]
    #[arg(long, value_name = "TIME")]
    pub not_before: Option<String>,
    /// Issue even though the subject already has a live certificate from this CA
    #[arg(long)]
    pub reissue: bool,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum BatchProfile {
    /// Manufacturer device certificates
    Device,
    /// Enterprise node certificates
    Node,
}

#[derive(Debug, Args)]
#[command(group = clap::ArgGroup::new("input").required(true).args(["ids", "csr_dir"]))]
pub struct BatchArgs {
    /// Issuing CA
    #[arg(long)]
    pub ca: String,
    /// device or node
    #[arg(long, value_enum)]
    pub profile: BatchProfile,
    /// Enterprise domain (node batches)
    #[arg(long)]
    pub enterprise: Option<String>,
    /// File with one ID per line (blank lines and # comments skipped); a key is generated
    /// per ID and written as OUT_DIR/ID.key.pem
    #[arg(long, value_name = "FILE")]
    pub ids: Option<PathBuf>,
    /// Folder of CSRs, one per file; the ID is the CSR subject's serialNumber, or else the
    /// file name without extension
    #[arg(long, value_name = "DIR")]
    pub csr_dir: Option<PathBuf>,
    /// Output folder: OUT_DIR/ID.pem (leaf + chain), ID.der, or bundles (--bundle)
    #[arg(long, value_name = "DIR")]
    pub out_dir: PathBuf,
    /// Key type of generated keys
    #[arg(long, value_enum, default_value_t = KeyTypeArg::P256)]
    pub key_type: KeyTypeArg,
    /// Encrypt generated keys with the passphrase in this file
    #[arg(long, value_name = "FILE")]
    pub key_out_pass_file: Option<PathBuf>,
    /// Lifetime [default: the profile's]
    #[arg(long)]
    pub validity: Option<String>,
    /// notBefore (RFC 3339) [default: now]
    #[arg(long, value_name = "TIME")]
    pub not_before: Option<String>,
    /// Issue a new certificate for every ID, even those with a live one
    #[arg(long)]
    pub reissue: bool,
    /// Write DER files instead of PEM
    #[arg(long, conflicts_with = "bundle")]
    pub der: bool,
    /// Write one JSON Lines file per chunk (OUT_DIR/bundle-N.jsonl: a line per certificate
    /// with id, identity, serial and PEM; chain in OUT_DIR/chain.pem; generated keys in
    /// keys-N.jsonl, 0600) instead of a file per certificate: much faster for large batches
    #[arg(long)]
    pub bundle: bool,
    /// Subjects per durable commit
    #[arg(long, default_value_t = 512)]
    pub chunk: usize,
    /// Worker threads [default: all cores]
    #[arg(long)]
    pub threads: Option<usize>,
    /// At the end of the run, successful or not, write its outcome as Prometheus text to this
    /// file (replaced atomically, 0644): for node_exporter's textfile collector
    #[arg(long, value_name = "FILE")]
    pub metrics_file: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum CertsCommand {
    /// List issued certificates
    List {
        /// Only this CA's
        #[arg(long)]
        ca: Option<String>,
        /// Only this pre-provisioned ID, canonical identity or server:FQDN
        #[arg(long)]
        id: Option<String>,
        /// CSV instead of a table
        #[arg(long, conflicts_with = "json")]
        csv: bool,
    },
    /// Show one certificate by serial, or the certificates of an ID
    Show {
        /// Serial number (hex)
        #[arg(required_unless_present = "id", conflicts_with = "id")]
        serial: Option<String>,
        /// Pre-provisioned ID, canonical identity or server:FQDN
        #[arg(long)]
        id: Option<String>,
        /// Print the certificate(s) as PEM
        #[arg(long)]
        pem: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Check the audit log's hash chain (exit 1 naming the first bad entry)
    Verify,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum SetKind {
    /// Roots of manufacturer device certificates (per vertical)
    Device,
    /// Roots of enterprise node certificates (per enterprise)
    Node,
    /// Roots of Infrastructure Node server certificates
    Infrastructure,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum PurposeArg {
    /// TLS client authentication (field nodes)
    Client,
    /// TLS server authentication (Infrastructure Nodes)
    Server,
}

#[derive(Debug, Subcommand)]
pub enum RootsCommand {
    /// Create an empty root set
    Create {
        /// Set name
        set: String,
        /// What the set is for
        #[arg(long, value_enum)]
        kind: SetKind,
        /// The vertical (device sets)
        #[arg(long, required_if_eq("kind", "device"))]
        vertical: Option<String>,
        /// The enterprise domain (node sets)
        #[arg(long, required_if_eq("kind", "node"))]
        enterprise: Option<String>,
        /// Revocation policy: `require` (every certificate below the anchor needs a status
        /// from a current CRL of the set) or `best-effort` (unknown status accepted)
        #[arg(long, value_enum, default_value = "require")]
        revocation: RevocationArg,
        /// How long past its nextUpdate a CRL still counts as current: 0, 12h, 2d
        #[arg(long, value_name = "DURATION", default_value = "0", value_parser = grace_seconds)]
        crl_grace: u64,
    },
    /// Change a set's revocation policy
    Set {
        /// Set name
        set: String,
        /// `require` or `best-effort`
        #[arg(long, value_enum)]
        revocation: Option<RevocationArg>,
        /// How long past its nextUpdate a CRL still counts as current: 0, 12h, 2d
        #[arg(long, value_name = "DURATION", value_parser = grace_seconds)]
        crl_grace: Option<u64>,
    },
    /// Add CA certificates (PEM bundles or DER) as anchors
    Add {
        /// Set name
        set: String,
        /// Certificate files
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Add the root certificate of one of this home's CAs
    AddCa {
        /// Set name
        set: String,
        /// CA name (its chain's root is added)
        ca: String,
    },
    /// Remove an anchor by its SHA-256 fingerprint
    Remove {
        /// Set name
        set: String,
        /// SHA-256 fingerprint (hex, colons allowed)
        fingerprint: String,
    },
    /// List sets, or the anchors of one set
    List {
        /// Set name
        set: Option<String>,
    },
    /// Write a set's anchors as a PEM bundle
    Export {
        /// Set name
        set: String,
        /// Output file
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
        /// Overwrite an existing output file
        #[arg(long)]
        force: bool,
    },
    /// Attach a CRL (PEM or DER) used when verifying against the set, after checking that a
    /// CA the set trusts signed it
    AddCrl {
        /// Set name
        set: String,
        /// CRL file
        file: PathBuf,
        /// Certificates of the issuing CA that signed the CRL and of CAs between it and an
        /// anchor of the set (PEM bundles or DER); this home's CAs are known already
        #[arg(long, value_name = "FILE")]
        issuer_cert: Vec<PathBuf>,
    },
    /// Detach a CRL by its SHA-256 fingerprint (see `roots list SET --json`)
    RemoveCrl {
        /// Set name
        set: String,
        /// SHA-256 fingerprint of the CRL (hex, colons allowed)
        fingerprint: String,
    },
    /// Verify a certificate chain against the set (exit 0 valid, 1 refused with the reason)
    Verify {
        /// Set name
        set: String,
        /// Chain file: PEM, leaf first, then intermediates
        chain: PathBuf,
        /// What the certificate must be good for [default: server for infrastructure sets,
        /// else client]
        #[arg(long, value_enum)]
        purpose: Option<PurposeArg>,
        /// The server name (a DNS name or an IP address) the certificate must match (server
        /// purpose)
        #[arg(long, value_name = "FQDN")]
        name: Option<String>,
        /// Verify as of this time (RFC 3339) [default: now]
        #[arg(long, value_name = "TIME")]
        at: Option<String>,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum RevocationArg {
    /// Every certificate below the anchor needs a status from a current CRL of the set
    Require,
    /// A certificate without a status from a current CRL is accepted
    BestEffort,
}

impl From<RevocationArg> for m2mpki_ca::rootset::RevocationMode {
    fn from(arg: RevocationArg) -> Self {
        match arg {
            RevocationArg::Require => m2mpki_ca::rootset::RevocationMode::Require,
            RevocationArg::BestEffort => m2mpki_ca::rootset::RevocationMode::BestEffort,
        }
    }
}

/// A CRL grace period in seconds: `0`, or hours or days (`12h`, `2d`), at most 366 days.
fn grace_seconds(text: &str) -> Result<u64, String> {
    if text == "0" {
        return Ok(0);
    }
    let bad = || format!("`{text}`: expected 0, hours (12h) or days (2d), at most 366d");
    let (n, unit) = text.split_at(text.len().saturating_sub(1));
    let n: u64 = n.parse().map_err(|_| bad())?;
    let secs = match unit {
        "h" => n.checked_mul(3600),
        "d" => n.checked_mul(86_400),
        _ => None,
    };
    secs.filter(|s| *s <= 366 * 86_400).ok_or_else(bad)
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum TlsArg {
    /// TLS 1.2 only
    #[value(name = "1.2")]
    V12,
    /// TLS 1.3 only
    #[value(name = "1.3")]
    V13,
}

#[derive(Debug, Subcommand)]
pub enum BootstrapCommand {
    /// Write a Field Node's pre-conditions (IN FQDN, port, IN root set) into one file
    Profile {
        /// The infrastructure root set the field node verifies the IN against
        #[arg(long)]
        set: String,
        /// The IN's FQDN
        #[arg(long)]
        fqdn: String,
        /// The IN's port
        #[arg(long, default_value_t = 8443)]
        port: u16,
        /// Output file
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
        /// Overwrite an existing file
        #[arg(long)]
        force: bool,
        /// Revocation policy for the IN's chain [default: the set's]. Under `require` the
        /// profile's CRLs must still be current when the node bootstraps
        #[arg(long, value_enum)]
        revocation: Option<RevocationArg>,
        /// How long past their nextUpdate the profile's CRLs still count [default: the set's]
        #[arg(long, value_name = "DURATION", value_parser = grace_seconds)]
        crl_grace: Option<u64>,
        /// The transport the node bootstraps over: TLS (HTTP) or DTLS 1.2 (CoAP)
        #[arg(long, value_enum, default_value_t = TransportArg::Tls)]
        transport: TransportArg,
        /// The IN's CoAP-over-DTLS port
        #[arg(long, default_value_t = 5684)]
        coap_port: u16,
        /// Bootstrap protocol version the node asks for: 1 (a wrapped credential, the
        /// contribution) or 2 (oneM2M TS-0003: Ke from the 48-byte export, named by KeID)
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=2))]
        protocol_version: u32,
        /// DTLS suite the node offers (repeat for several) [default: CCM_8 and GCM]
        #[arg(long = "dtls-suite", value_name = "SUITE", value_parser = dtls_suite)]
        dtls_suites: Vec<m2mpki_bootstrap::config::DtlsSuite>,
    },
    /// Run the IN endpoint (SIGTERM or Ctrl-C drain and stop it)
    Serve {
        /// Server configuration (TOML); see docs/protocol.md
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Bootstrap this Field Node: obtain a root credential from the IN of the profile
    Enroll {
        /// The bootstrap profile
        #[arg(long, value_name = "FILE")]
        profile: PathBuf,
        /// This node's certificate chain (PEM, leaf first)
        #[arg(long, value_name = "FILE")]
        cert: PathBuf,
        /// This node's key: a PKCS#8 file or a pkcs11: URI
        #[arg(long, value_name = "KEY")]
        key: String,
        /// Credential file to write (mode 0600)
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
        /// Keep the credential on a PKCS#11 token instead of in the file: a new object
        /// (pkcs11:token=...;object=LABEL) made by C_UnwrapKey, sensitive and never extractable;
        /// the file then records its URI
        #[arg(long, value_name = "PKCS11_URI")]
        credential_out: Option<String>,
        /// Overwrite an existing credential file
        #[arg(long)]
        force: bool,
        /// Connect to this HOST:PORT instead of the profile's FQDN (SNI and checks still use it)
        #[arg(long, value_name = "HOST:PORT")]
        connect: Option<String>,
        /// Restrict the TLS version
        #[arg(long, value_enum)]
        tls: Option<TlsArg>,
        /// Give up after this long
        #[arg(long, default_value = "30s")]
        timeout: String,
    },
    /// Put a bootstrapped credential to use: establish TS-0003's pre-shared-key security
    /// association with the IN (TLS 1.2 PSK, the credential ID as PSK identity) and print who
    /// the IN authenticated
    Associate {
        /// The credential file `bootstrap enroll` wrote
        #[arg(long, value_name = "FILE")]
        credential: PathBuf,
        /// The IN's PSK association listener
        #[arg(long, value_name = "HOST:PORT")]
        connect: String,
        /// Give up after this long
        #[arg(long, default_value = "30s")]
        timeout: String,
    },
    /// Add technician grants: IDENTITY may access RESOURCE...
    Grant {
        /// Canonical identity (device:<hwType>:<ID> or node:<enterprise>:<ID>)
        identity: String,
        /// Resources
        #[arg(required = true)]
        resources: Vec<String>,
    },
    /// Remove technician grants
    RevokeGrant {
        /// Canonical identity
        identity: String,
        /// Resources
        #[arg(required = true)]
        resources: Vec<String>,
    },
    /// List technician grants and the policy the server runs with
    Grants,
    /// Exit 0 when IDENTITY may access RESOURCE, 1 when not
    Check {
        /// Canonical identity
        identity: String,
        /// Resource
        resource: String,
    },
    /// Bind every credential sealed by an earlier version to its record (AES-256-GCM with the
    /// record as associated data); the IN refuses to serve unbound ones. Run once after an
    /// upgrade, with the INs stopped (docs/store.md)
    Reseal {
        /// The store key: a key file or a pkcs11: URI [default: <home>/keys/credential-store.key]
        #[arg(long, value_name = "KEY")]
        store_key: Option<String>,
    },
    /// Show the IN's credential records of an identity (never the credential itself)
    Credentials {
        /// Canonical identity
        identity: String,
    },
    /// Copy an IN credential store (sealed credentials, grants, policy) into an empty one:
    /// <home>/bootstrap.redb into PostgreSQL for INs that share it, PostgreSQL back into
    /// <home>/bootstrap.redb, or one database into another (docs/store.md)
    Migrate {
        /// The store to copy (postgres:// URL; default: <home>/bootstrap.redb)
        #[arg(long, value_name = "URL")]
        from: Option<String>,
        /// The empty store to fill (postgres:// URL; default: <home>/bootstrap.redb)
        #[arg(long, value_name = "URL")]
        to: Option<String>,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum HsmArg {
    /// A fresh SoftHSM2 token inside the lab folder
    Softhsm,
}

#[derive(Debug, Subcommand)]
pub enum LabCommand {
    /// Create a lab PKI in DIR: manufacturer, enterprise and infrastructure CAs, root sets,
    /// an IN certificate, a bootstrap profile and server config, devices and nodes
    Init {
        /// The lab folder (must be new or empty)
        dir: PathBuf,
        /// Keep the CA and IN keys on a token
        #[arg(long, value_enum)]
        hsm: Option<HsmArg>,
        /// The IN's port in the profile and server config
        #[arg(long, default_value_t = 8443)]
        port: u16,
    },
    /// Build a lab and run the whole bootstrap once: exit 0 only when every step did what it should
    Demo {
        /// Build the lab here instead of a temporary folder (kept)
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
        /// Keep the CA and IN keys on a SoftHSM2 token
        #[arg(long, value_enum)]
        hsm: Option<HsmArg>,
        /// Keep the temporary lab folder
        #[arg(long)]
        keep: bool,
    },
}

/// Transports of `bootstrap profile --transport`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum TransportArg {
    /// TLS over TCP, HTTP
    Tls,
    /// DTLS 1.2 over UDP, CoAP
    Dtls,
}

fn dtls_suite(s: &str) -> Result<m2mpki_bootstrap::config::DtlsSuite, String> {
    s.parse()
}
