//! Token administration needed by labs and tests: initialising a token in a free slot.

use std::path::Path;

use cryptoki::session::UserType;
use cryptoki::types::AuthPin;

use super::token::{load_module, p11};
use crate::{Error, Result};

/// Initialises a token labelled `label` in the first slot without an initialised token, and
/// sets its user PIN. The module stays loaded for the process.
pub fn init_token(module: &Path, label: &str, so_pin: &str, user_pin: &str) -> Result<()> {
    // Two threads must not pick the same free slot.
    static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _guard = ONE_AT_A_TIME
        .lock()
        .map_err(|_| Error::Crypto("token initialisation lock poisoned".into()))?;
    let ctx = load_module(module)?;
    let slots = ctx
        .get_slots_with_token()
        .map_err(|e| p11(label, "listing slots", e))?;
    let mut free = None;
    for slot in slots {
        let info = ctx
            .get_token_info(slot)
            .map_err(|e| p11(label, "reading token info", e))?;
        if info.token_initialized() {
            if info.label().trim_end() == label {
                return Err(Error::ObjectExists {
                    uri: format!("pkcs11:token={label}"),
                    token: label.to_owned(),
                });
            }
        } else if free.is_none() {
            free = Some(slot);
        }
    }
    let slot = free.ok_or_else(|| Error::Pkcs11 {
        token: label.to_owned(),
        reason: "no free slot to initialise a token in".into(),
    })?;
    let so = AuthPin::from(so_pin.to_owned());
    ctx.init_token(slot, &so, label)
        .map_err(|e| p11(label, "initialising the token", e))?;
    let session = ctx
        .open_rw_session(slot)
        .map_err(|e| p11(label, "opening a session", e))?;
    session
        .login(UserType::So, Some(&so))
        .map_err(|e| p11(label, "logging in as security officer", e))?;
    session
        .init_pin(&AuthPin::from(user_pin.to_owned()))
        .map_err(|e| p11(label, "setting the user PIN", e))?;
    session.logout().map_err(|e| p11(label, "logging out", e))?;
    Ok(())
}
