//! Key objects on a token: signing, generation and listing.

use std::path::Path;
use std::sync::Arc;

use cryptoki::mechanism::eddsa::{EddsaParams, EddsaSignatureScheme};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType, KeyType as CkKeyType, ObjectClass, ObjectHandle};
use cryptoki::session::Session;
use serde::Serialize;

use super::token::{load_module, p11, Token};
use super::{Pkcs11Config, Pkcs11Uri};
use crate::{Error, KeyRef, KeyType, Result, Signer};

/// DER of the namedCurve OIDs in CKA_EC_PARAMS.
const P256_PARAMS: &[u8] = &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
const P384_PARAMS: &[u8] = &[0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x22];
const ED25519_PARAMS: &[u8] = &[0x06, 0x03, 0x2b, 0x65, 0x70];
/// PrintableString "edwards25519", used by older tokens for Ed25519.
const ED25519_NAME_PARAMS: &[u8] = b"\x13\x0cedwards25519";

fn key_type_of(ck_type: CkKeyType, params: &[u8]) -> Option<KeyType> {
    if ck_type == CkKeyType::EC && params == P256_PARAMS {
        Some(KeyType::P256)
    } else if ck_type == CkKeyType::EC && params == P384_PARAMS {
        Some(KeyType::P384)
    } else if ck_type == CkKeyType::EC_EDWARDS
        && (params == ED25519_PARAMS || params == ED25519_NAME_PARAMS)
    {
        Some(KeyType::Ed25519)
    } else {
        None
    }
}

/// CKA_EC_POINT is a DER OCTET STRING around the point on most tokens (SoftHSM); some return
/// the bare point. Returns the bare point.
fn unwrap_point(raw: &[u8]) -> Vec<u8> {
    if raw.len() > 2 && raw[0] == 0x04 {
        let (len, hdr) = match raw[1] {
            n if n < 0x80 => (usize::from(n), 2),
            0x81 if raw.len() > 3 => (usize::from(raw[2]), 3),
            _ => return raw.to_vec(),
        };
        if hdr + len == raw.len() {
            return raw[hdr..].to_vec();
        }
    }
    raw.to_vec()
}

/// DER `Ecdsa-Sig-Value ::= SEQUENCE { r INTEGER, s INTEGER }` from the raw `r || s` a token
/// returns for CKM_ECDSA.
fn ecdsa_der(raw: &[u8]) -> Result<Vec<u8>> {
    if raw.is_empty() || !raw.len().is_multiple_of(2) || raw.len() > 132 {
        return Err(Error::Crypto(format!(
            "token returned a {}-byte ECDSA signature",
            raw.len()
        )));
    }
    let (r, s) = raw.split_at(raw.len() / 2);
    let int = |v: &[u8]| {
        let v = &v[v.iter().position(|b| *b != 0).unwrap_or(v.len() - 1)..];
        let mut out = vec![0x02];
        let pad = v[0] & 0x80 != 0;
        out.push((v.len() + usize::from(pad)) as u8);
        if pad {
            out.push(0);
        }
        out.extend_from_slice(v);
        out
    };
    let body: Vec<u8> = [int(r), int(s)].concat();
    let mut out = vec![0x30];
    if body.len() < 0x80 {
        out.push(body.len() as u8);
    } else {
        out.push(0x81);
        out.push(body.len() as u8);
    }
    out.extend(body);
    Ok(out)
}

fn label_str(attrs: &[Attribute]) -> Option<String> {
    attrs.iter().find_map(|a| match a {
        Attribute::Label(l) => Some(String::from_utf8_lossy(l).into_owned()),
        _ => None,
    })
}

/// A private key on a PKCS#11 token.
pub struct Pkcs11Key {
    token: Arc<Token>,
    handle: ObjectHandle,
    key_type: KeyType,
    public: Vec<u8>,
    key_ref: KeyRef,
}

impl std::fmt::Debug for Pkcs11Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pkcs11Key")
            .field("token", &self.token.label)
            .field("key_type", &self.key_type)
            .field("key_ref", &self.key_ref)
            .finish()
    }
}

fn object_template(uri: &Pkcs11Uri, class: ObjectClass) -> Vec<Attribute> {
    let mut t = vec![Attribute::Class(class)];
    if let Some(l) = &uri.object {
        t.push(Attribute::Label(l.as_bytes().to_vec()));
    }
    if let Some(id) = &uri.id {
        t.push(Attribute::Id(id.clone()));
    }
    t
}

fn find_one(
    token: &Token,
    s: &Session,
    uri: &Pkcs11Uri,
    class: ObjectClass,
) -> Result<Option<ObjectHandle>> {
    let found = s
        .find_objects(&object_template(uri, class))
        .map_err(|e| p11(&token.label, "finding objects", e))?;
    match found.len() {
        0 => Ok(None),
        1 => Ok(Some(found[0])),
        n => Err(Error::BadPkcs11Uri {
            uri: uri.to_string(),
            reason: format!(
                "matches {n} objects on token `{}`: add id= or object=",
                token.label
            ),
        }),
    }
}

impl Pkcs11Key {
    /// Opens the private key the URI names (logging in to its token).
    pub fn open(uri: &Pkcs11Uri, cfg: &Pkcs11Config) -> Result<Self> {
        if !uri.names_object() {
            return Err(Error::BadPkcs11Uri {
                uri: uri.to_string(),
                reason: "name the key with object= or id=".into(),
            });
        }
        let token = Token::open(uri, cfg, true)?;
        let (handle, key_type, public) = token.with_session(|s| {
            let handle = find_one(&token, s, uri, ObjectClass::PRIVATE_KEY)?.ok_or_else(|| {
                Error::KeyObjectNotFound {
                    uri: uri.to_string(),
                    token: token.label.clone(),
                }
            })?;
            let attrs = s
                .get_attributes(
                    handle,
                    &[
                        AttributeType::KeyType,
                        AttributeType::EcParams,
                        AttributeType::Id,
                        AttributeType::Label,
                    ],
                )
                .map_err(|e| p11(&token.label, "reading key attributes", e))?;
            let mut ck_type = None;
            let mut params = Vec::new();
            let mut id = None;
            for a in &attrs {
                match a {
                    Attribute::KeyType(t) => ck_type = Some(*t),
                    Attribute::EcParams(p) => params.clone_from(p),
                    Attribute::Id(i) => id = Some(i.clone()),
                    _ => {}
                }
            }
            let key_type = ck_type
                .and_then(|t| key_type_of(t, &params))
                .ok_or_else(|| Error::UnsupportedTokenKey {
                    uri: uri.to_string(),
                    reason: "not a P-256, P-384 or Ed25519 key".into(),
                })?;
            // The public point lives on the public key object with the same id (or label).
            let pub_uri = Pkcs11Uri {
                id: id.clone().or_else(|| uri.id.clone()),
                object: if id.is_some() {
                    None
                } else {
                    uri.object.clone()
                },
                ..uri.without_pin_value()
            };
            let pub_handle = find_one(&token, s, &pub_uri, ObjectClass::PUBLIC_KEY)?;
            let point_from = pub_handle.unwrap_or(handle);
            let point = s
                .get_attributes(point_from, &[AttributeType::EcPoint])
                .map_err(|e| p11(&token.label, "reading the public key", e))?
                .into_iter()
                .find_map(|a| match a {
                    Attribute::EcPoint(p) => Some(unwrap_point(&p)),
                    _ => None,
                })
                .ok_or_else(|| Error::UnsupportedTokenKey {
                    uri: uri.to_string(),
                    reason: "no public key object with CKA_EC_POINT beside the private key".into(),
                })?;
            Ok((handle, key_type, point))
        })?;
        Ok(Pkcs11Key {
            token,
            handle,
            key_type,
            public,
            key_ref: KeyRef::Pkcs11(uri.without_pin_value()),
        })
    }

    /// The token this key is on.
    pub fn token(&self) -> &Arc<Token> {
        &self.token
    }

    /// Signs exactly what the mechanism receives, for measuring raw `C_Sign` rates: the SHA-256
    /// digest of `msg` for ECDSA keys.
    pub fn raw_sign(&self, msg: &[u8]) -> Result<Vec<u8>> {
        let (mech, data) = match self.key_type {
            KeyType::P256 => (
                Mechanism::Ecdsa,
                aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, msg)
                    .as_ref()
                    .to_vec(),
            ),
            KeyType::P384 => (
                Mechanism::Ecdsa,
                aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA384, msg)
                    .as_ref()
                    .to_vec(),
            ),
            KeyType::Ed25519 => (
                Mechanism::Eddsa(EddsaParams::new(EddsaSignatureScheme::Pure)),
                msg.to_vec(),
            ),
        };
        self.token.with_session(|s| {
            s.sign(&mech, self.handle, &data)
                .map_err(|e| p11(&self.token.label, "signing", e))
        })
    }
}

impl rcgen::PublicKeyData for Pkcs11Key {
    fn der_bytes(&self) -> &[u8] {
        &self.public
    }

    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        self.key_type.algorithm()
    }
}

impl rcgen::SigningKey for Pkcs11Key {
    fn sign(&self, msg: &[u8]) -> std::result::Result<Vec<u8>, rcgen::Error> {
        let raw = self.raw_sign(msg).map_err(|e| {
            crate::sign_error::set(e);
            rcgen::Error::RemoteKeyError
        })?;
        match self.key_type {
            KeyType::Ed25519 => Ok(raw),
            _ => ecdsa_der(&raw).map_err(|_| rcgen::Error::RemoteKeyError),
        }
    }
}

impl Signer for Pkcs11Key {
    fn key_type(&self) -> KeyType {
        self.key_type
    }

    fn key_ref(&self) -> &KeyRef {
        &self.key_ref
    }
}

/// A new token object about to be made: its token (logged in), label, id (random when the URI
/// has none) and full URI.
pub(crate) struct NewObject {
    pub(crate) token: Arc<Token>,
    pub(crate) label: String,
    pub(crate) id: Vec<u8>,
    pub(crate) full: Pkcs11Uri,
}

impl NewObject {
    pub(crate) fn prepare(uri: &Pkcs11Uri, cfg: &Pkcs11Config) -> Result<Self> {
        let label = uri.object.clone().ok_or_else(|| Error::BadPkcs11Uri {
            uri: uri.to_string(),
            reason: "give the new key a label with object=".into(),
        })?;
        let id = match &uri.id {
            Some(id) => id.clone(),
            None => {
                let mut id = vec![0u8; 8];
                aws_lc_rs::rand::fill(&mut id)
                    .map_err(|_| Error::Crypto("random source failed".into()))?;
                id
            }
        };
        let token = Token::open(uri, cfg, true)?;
        let full = Pkcs11Uri {
            object: Some(label.clone()),
            id: Some(id.clone()),
            ..uri.without_pin_value()
        };
        Ok(NewObject {
            token,
            label,
            id,
            full,
        })
    }

    /// Refuses when any object on the token has this label or id.
    pub(crate) fn refuse_existing(&self, s: &Session) -> Result<()> {
        for t in [
            vec![Attribute::Label(self.label.as_bytes().to_vec())],
            vec![Attribute::Id(self.id.clone())],
        ] {
            let found = s
                .find_objects(&t)
                .map_err(|e| p11(&self.token.label, "finding objects", e))?;
            if !found.is_empty() {
                return Err(Error::ObjectExists {
                    uri: self.full.to_string(),
                    token: self.token.label.clone(),
                });
            }
        }
        Ok(())
    }
}

/// Generates a key pair on the token: private key CKA_TOKEN, CKA_PRIVATE, CKA_SENSITIVE, not
/// CKA_EXTRACTABLE, CKA_SIGN. Refuses when an object with that label or id exists. Returns the
/// key and its full URI (with the id, chosen at random when the URI has none).
pub fn generate(
    uri: &Pkcs11Uri,
    key_type: KeyType,
    cfg: &Pkcs11Config,
) -> Result<(Pkcs11Key, Pkcs11Uri)> {
    let new = NewObject::prepare(uri, cfg)?;
    let (token, label, id, full) = (&new.token, &new.label, &new.id, &new.full);
    token.with_session(|s| {
        new.refuse_existing(s)?;
        let (mech, ck_type, params) = match key_type {
            KeyType::P256 => (Mechanism::EccKeyPairGen, CkKeyType::EC, P256_PARAMS),
            KeyType::P384 => (Mechanism::EccKeyPairGen, CkKeyType::EC, P384_PARAMS),
            KeyType::Ed25519 => (
                Mechanism::EccEdwardsKeyPairGen,
                CkKeyType::EC_EDWARDS,
                ED25519_PARAMS,
            ),
        };
        let public = [
            Attribute::Token(true),
            Attribute::Private(false),
            Attribute::Verify(true),
            Attribute::KeyType(ck_type),
            Attribute::EcParams(params.to_vec()),
            Attribute::Label(label.as_bytes().to_vec()),
            Attribute::Id(id.clone()),
        ];
        let private = [
            Attribute::Token(true),
            Attribute::Private(true),
            Attribute::Sensitive(true),
            Attribute::Extractable(false),
            Attribute::Sign(true),
            Attribute::KeyType(ck_type),
            Attribute::Label(label.as_bytes().to_vec()),
            Attribute::Id(id.clone()),
        ];
        s.generate_key_pair(&mech, &public, &private)
            .map_err(|e| p11(&token.label, "generating a key pair", e))?;
        Ok(())
    })?;
    let key = Pkcs11Key::open(full, cfg)?;
    Ok((key, new.full))
}

/// A key object as `hsm list` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct KeyListing {
    /// CKA_LABEL.
    pub label: Option<String>,
    /// CKA_ID, hex.
    pub id: String,
    /// `private` or `public`.
    pub class: &'static str,
    /// p256, p384, ed25519 or other.
    pub key_type: String,
    /// CKA_SENSITIVE (private keys).
    pub sensitive: Option<bool>,
    /// CKA_EXTRACTABLE (private keys).
    pub extractable: Option<bool>,
    /// CKA_ALWAYS_SENSITIVE (private keys).
    pub always_sensitive: Option<bool>,
    /// CKA_NEVER_EXTRACTABLE (private keys).
    pub never_extractable: Option<bool>,
    /// A URI naming the object.
    pub uri: String,
}

/// A token as `hsm list` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct TokenListing {
    /// Slot number.
    pub slot_id: u64,
    /// Token label.
    pub label: String,
    /// Serial number.
    pub serial: String,
    /// Manufacturer.
    pub manufacturer: String,
    /// Model.
    pub model: String,
    /// Whether a PIN is needed.
    pub login_required: bool,
    /// Key objects (private ones only when logged in).
    pub keys: Vec<KeyListing>,
}

/// Lists the initialised tokens of `module` and their key objects. The token named by
/// `login_to` (if any) is logged in to, so its private keys are listed too; others show their
/// public objects only (no PIN is ever tried on a token that was not named).
pub fn list_tokens(
    module: &Path,
    login_to: Option<&Pkcs11Uri>,
    cfg: &Pkcs11Config,
) -> Result<Vec<TokenListing>> {
    let ctx = load_module(module)?;
    let slots = ctx
        .get_slots_with_initialized_token()
        .map_err(|e| p11("(any)", "listing slots", e))?;
    let mut out = Vec::new();
    for slot in slots {
        let info = ctx
            .get_token_info(slot)
            .map_err(|e| p11("(any)", "reading token info", e))?;
        let label = info.label().trim_end().to_owned();
        let base = Pkcs11Uri {
            token: Some(label.clone()),
            module_path: Some(module.to_owned()),
            ..Pkcs11Uri::default()
        };
        let login = login_to.is_some_and(|u| {
            u.token.as_deref() == Some(label.as_str())
                || u.slot_id == Some(slot.id())
                || u.serial.as_deref() == Some(info.serial_number().trim_end())
        });
        let token_uri = match login_to {
            Some(u) if login => Pkcs11Uri {
                token: Some(label.clone()),
                serial: None,
                slot_id: None,
                module_path: Some(module.to_owned()),
                ..u.clone()
            },
            _ => base.clone(),
        };
        let token = Token::open(&token_uri, cfg, login)?;
        let keys = token.with_session(|s| {
            let mut keys = Vec::new();
            for (class, name) in [
                (ObjectClass::PRIVATE_KEY, "private"),
                (ObjectClass::PUBLIC_KEY, "public"),
            ] {
                let handles = s
                    .find_objects(&[Attribute::Class(class)])
                    .map_err(|e| p11(&label, "finding objects", e))?;
                for h in handles {
                    let mut types = vec![
                        AttributeType::Label,
                        AttributeType::Id,
                        AttributeType::KeyType,
                        AttributeType::EcParams,
                    ];
                    if class == ObjectClass::PRIVATE_KEY {
                        types.extend([
                            AttributeType::Sensitive,
                            AttributeType::Extractable,
                            AttributeType::AlwaysSensitive,
                            AttributeType::NeverExtractable,
                        ]);
                    }
                    // A token may hold objects we do not understand (another key type, a
                    // vendor attribute value): read what can be read, one by one if need be.
                    let attrs = s.get_attributes(h, &types).unwrap_or_else(|_| {
                        types
                            .iter()
                            .filter_map(|t| s.get_attributes(h, &[*t]).ok())
                            .flatten()
                            .collect()
                    });
                    let mut k = KeyListing {
                        label: label_str(&attrs),
                        id: String::new(),
                        class: name,
                        key_type: "other".into(),
                        sensitive: None,
                        extractable: None,
                        always_sensitive: None,
                        never_extractable: None,
                        uri: String::new(),
                    };
                    let mut ck_type = None;
                    let mut params = Vec::new();
                    let mut id = Vec::new();
                    for a in attrs {
                        match a {
                            Attribute::Id(i) => id = i,
                            Attribute::KeyType(t) => ck_type = Some(t),
                            Attribute::EcParams(p) => params = p,
                            Attribute::Sensitive(b) => k.sensitive = Some(b),
                            Attribute::Extractable(b) => k.extractable = Some(b),
                            Attribute::AlwaysSensitive(b) => k.always_sensitive = Some(b),
                            Attribute::NeverExtractable(b) => k.never_extractable = Some(b),
                            _ => {}
                        }
                    }
                    if let Some(kt) = ck_type.and_then(|t| key_type_of(t, &params)) {
                        k.key_type = kt.to_string();
                    }
                    k.id = id.iter().map(|b| format!("{b:02x}")).collect();
                    k.uri = Pkcs11Uri {
                        object: k.label.clone(),
                        id: Some(id),
                        module_path: None,
                        ..base.clone()
                    }
                    .to_string();
                    keys.push(k);
                }
            }
            Ok(keys)
        })?;
        out.push(TokenListing {
            slot_id: slot.id(),
            label,
            serial: info.serial_number().trim_end().to_owned(),
            manufacturer: info.manufacturer_id().trim_end().to_owned(),
            model: info.model().trim_end().to_owned(),
            login_required: info.login_required(),
            keys,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_ecdsa_signatures_become_der() {
        let mut raw = vec![0u8; 64];
        raw[0] = 0x80; // r needs a leading zero
        raw[32] = 0x00;
        raw[33] = 0x01; // s has a leading zero to strip
        let der = ecdsa_der(&raw).unwrap();
        assert_eq!(der[0], 0x30);
        assert_eq!(&der[2..5], &[0x02, 33, 0x00]);
        assert!(ecdsa_der(&[1, 2, 3]).is_err());
    }

    #[test]
    fn ec_points_are_unwrapped() {
        let mut wrapped = vec![0x04, 65, 0x04];
        wrapped.extend([7u8; 64]);
        assert_eq!(unwrap_point(&wrapped).len(), 65);
        let mut bare = vec![0x04];
        bare.extend([7u8; 64]);
        assert_eq!(unwrap_point(&bare), bare);
    }
}
