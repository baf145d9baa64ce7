//! Loaded PKCS#11 modules and logged-in tokens, shared by every key of the process.
//!
//! A module is loaded and initialised once per process. A token, once opened, keeps a pool of
//! read-write sessions for the life of the process: the first is logged in (which logs in the
//! whole application), and keeping it open keeps the login (SoftHSM logs out when the last
//! session closes). `Session` is `Send` but not `Sync`, so parallel signing takes a free
//! session from the pool.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use zeroize::Zeroizing;

use super::{Pkcs11Config, Pkcs11Uri};
use crate::{Error, Passphrase, Result};

/// Environment variable naming the default PKCS#11 module.
pub const MODULE_ENV: &str = "M2MPKI_PKCS11_MODULE";
/// Environment variable holding the token PIN.
pub const PIN_ENV: &str = "M2MPKI_PKCS11_PIN";

/// A token opened by this process, with its session pool.
pub struct Token {
    pub(crate) ctx: Pkcs11,
    pub(crate) slot: Slot,
    /// The token label.
    pub label: String,
    sessions: Vec<Mutex<Session>>,
    next: AtomicUsize,
    logged_in: AtomicBool,
    login_lock: Mutex<()>,
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Token")
            .field("label", &self.label)
            .field("slot", &self.slot.id())
            .field("sessions", &self.sessions.len())
            .finish()
    }
}

#[derive(Default)]
struct Registry {
    modules: HashMap<PathBuf, Pkcs11>,
    tokens: HashMap<(PathBuf, u64), Arc<Token>>,
}

fn registry() -> &'static Mutex<Registry> {
    static R: OnceLock<Mutex<Registry>> = OnceLock::new();
    R.get_or_init(Default::default)
}

/// Maps a PKCS#11 failure to our error, naming the token and what we were doing.
pub(crate) fn p11(token: &str, op: &str, e: CkError) -> Error {
    match e {
        CkError::Pkcs11(rv, _) => match rv {
            RvError::PinIncorrect => Error::WrongPin(token.to_owned()),
            RvError::PinLocked => Error::PinLocked(token.to_owned()),
            RvError::MechanismInvalid | RvError::MechanismParamInvalid => {
                Error::MechanismUnsupported {
                    token: token.to_owned(),
                    op: op.to_owned(),
                }
            }
            RvError::DeviceRemoved
            | RvError::TokenNotPresent
            | RvError::SessionHandleInvalid
            | RvError::SessionClosed
            | RvError::DeviceError => Error::TokenGone {
                token: token.to_owned(),
                reason: format!("{op}: {rv}"),
            },
            other => Error::Pkcs11 {
                token: token.to_owned(),
                reason: format!("{op}: {other:?}"),
            },
        },
        other => Error::Pkcs11 {
            token: token.to_owned(),
            reason: format!("{op}: {other}"),
        },
    }
}

fn module_path(uri: &Pkcs11Uri, cfg: &Pkcs11Config) -> Result<PathBuf> {
    uri.module_path
        .clone()
        .or_else(|| cfg.module.clone())
        .or_else(|| std::env::var_os(MODULE_ENV).map(PathBuf::from))
        .ok_or(Error::NoModule)
}

/// Loads (once per process) and initialises a PKCS#11 module.
pub(crate) fn load_module(path: &Path) -> Result<Pkcs11> {
    let mut reg = registry()
        .lock()
        .map_err(|_| Error::Crypto("PKCS#11 registry poisoned".into()))?;
    if let Some(m) = reg.modules.get(path) {
        return Ok(m.clone());
    }
    if !path.exists() {
        return Err(Error::ModuleLoad {
            path: path.to_owned(),
            reason: "no such file (install the module or fix --pkcs11-module / module-path)".into(),
        });
    }
    let ctx = Pkcs11::new(path).map_err(|e| Error::ModuleLoad {
        path: path.to_owned(),
        reason: e.to_string(),
    })?;
    match ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
        Err(e) => {
            return Err(Error::ModuleLoad {
                path: path.to_owned(),
                reason: format!("C_Initialize failed: {e}"),
            })
        }
    }
    reg.modules.insert(path.to_owned(), ctx.clone());
    Ok(ctx)
}

/// Finds the slot whose token the URI names.
fn find_slot(ctx: &Pkcs11, uri: &Pkcs11Uri, module: &Path) -> Result<(Slot, String)> {
    let slots = ctx
        .get_slots_with_initialized_token()
        .map_err(|e| p11("(any)", "listing slots", e))?;
    let mut matches = Vec::new();
    for slot in slots {
        let info = ctx
            .get_token_info(slot)
            .map_err(|e| p11("(any)", "reading token info", e))?;
        let label = info.label().trim_end().to_owned();
        let ok = match (&uri.token, &uri.serial, uri.slot_id) {
            (Some(t), _, _) => &label == t,
            (_, Some(s), _) => info.serial_number().trim_end() == s,
            (_, _, Some(id)) => slot.id() == id,
            _ => true,
        };
        if ok {
            matches.push((slot, label));
        }
    }
    let what = || {
        uri.token
            .as_ref()
            .map(|t| format!("token={t}"))
            .or_else(|| uri.serial.as_ref().map(|s| format!("serial={s}")))
            .or_else(|| uri.slot_id.map(|s| format!("slot-id={s}")))
            .unwrap_or_else(|| "(any token)".into())
    };
    match matches.len() {
        0 => Err(Error::TokenNotFound {
            token: what(),
            module: module.to_owned(),
        }),
        1 => Ok(matches.remove(0)),
        _ => Err(Error::AmbiguousToken(module.to_owned())),
    }
}

/// Resolves the PIN: `pin-source=FILE`, else `pin-value` (with a warning), else
/// `M2MPKI_PKCS11_PIN`, else the configured prompt.
fn resolve_pin(uri: &Pkcs11Uri, cfg: &Pkcs11Config, token: &str) -> Result<Zeroizing<String>> {
    if let Some(src) = &uri.pin_source {
        let p = Passphrase::from_file(src)?;
        return Ok(Zeroizing::new(
            String::from_utf8_lossy(p.expose()).into_owned(),
        ));
    }
    if let Some(v) = uri.pin_value() {
        if let Some(warn) = &cfg.warn {
            warn("the PKCS#11 URI carries pin-value: the PIN may end up in shell history and process listings; prefer pin-source=FILE or M2MPKI_PKCS11_PIN");
        }
        return Ok(Zeroizing::new(v.to_owned()));
    }
    if let Ok(v) = std::env::var(PIN_ENV) {
        if !v.is_empty() {
            return Ok(Zeroizing::new(v));
        }
    }
    if let Some(prompt) = &cfg.pin_prompt {
        if let Some(pin) = prompt(token) {
            return Ok(pin);
        }
    }
    Err(Error::NoPin(token.to_owned()))
}

impl Token {
    /// Opens (once per process) the token the URI names; logs in when `login` is set.
    pub(crate) fn open(uri: &Pkcs11Uri, cfg: &Pkcs11Config, login: bool) -> Result<Arc<Token>> {
        let module = module_path(uri, cfg)?;
        let ctx = load_module(&module)?;
        let (slot, label) = find_slot(&ctx, uri, &module)?;
        let token = {
            let mut reg = registry()
                .lock()
                .map_err(|_| Error::Crypto("PKCS#11 registry poisoned".into()))?;
            match reg.tokens.get(&(module.clone(), slot.id())) {
                Some(t) => t.clone(),
                None => {
                    let n = cfg.sessions.max(1);
                    let mut sessions = Vec::with_capacity(n);
                    for _ in 0..n {
                        let s = ctx
                            .open_rw_session(slot)
                            .map_err(|e| p11(&label, "opening a session", e))?;
                        sessions.push(Mutex::new(s));
                    }
                    let t = Arc::new(Token {
                        ctx: ctx.clone(),
                        slot,
                        label: label.clone(),
                        sessions,
                        next: AtomicUsize::new(0),
                        logged_in: AtomicBool::new(false),
                        login_lock: Mutex::new(()),
                    });
                    reg.tokens.insert((module.clone(), slot.id()), t.clone());
                    t
                }
            }
        };
        if login {
            token.login(uri, cfg)?;
        }
        Ok(token)
    }

    fn login(&self, uri: &Pkcs11Uri, cfg: &Pkcs11Config) -> Result<()> {
        if self.logged_in.load(Ordering::Acquire) {
            return Ok(());
        }
        let _guard = self
            .login_lock
            .lock()
            .map_err(|_| Error::Crypto("login lock poisoned".into()))?;
        if self.logged_in.load(Ordering::Acquire) {
            return Ok(());
        }
        let info = self
            .ctx
            .get_token_info(self.slot)
            .map_err(|e| p11(&self.label, "reading token info", e))?;
        if info.user_pin_locked() {
            return Err(Error::PinLocked(self.label.clone()));
        }
        if info.login_required() {
            let pin = resolve_pin(uri, cfg, &self.label)?;
            let auth = cryptoki::types::AuthPin::from(pin.as_str().to_owned());
            self.with_session(|s| match s.login(UserType::User, Some(&auth)) {
                Ok(()) | Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => Ok(()),
                Err(e) => Err(p11(&self.label, "logging in", e)),
            })?;
        }
        self.logged_in.store(true, Ordering::Release);
        Ok(())
    }

    /// Runs `f` on a free session (waiting for one when all are busy).
    pub(crate) fn with_session<T>(&self, f: impl FnOnce(&Session) -> Result<T>) -> Result<T> {
        let n = self.sessions.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        for i in 0..n {
            if let Ok(s) = self.sessions[(start + i) % n].try_lock() {
                return f(&s);
            }
        }
        let s = self.sessions[start % n]
            .lock()
            .map_err(|_| Error::Crypto("PKCS#11 session lock poisoned".into()))?;
        f(&s)
    }

    /// How many sessions the pool holds.
    pub fn pool_size(&self) -> usize {
        self.sessions.len()
    }
}
