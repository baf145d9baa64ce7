//! AES-256 secret keys on a token, for sealing data at rest (the IN's credential store).

use std::sync::Arc;

use cryptoki::mechanism::aead::GcmParams;
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, KeyType as CkKeyType, ObjectClass, ObjectHandle};
use zeroize::Zeroizing;

use super::token::{p11, Token};
use super::{Pkcs11Config, Pkcs11Uri};
use crate::{Error, Result};

const IV_LEN: usize = 12;
const TAG_BITS: u64 = 128;

/// An AES-256 key that never leaves its token; seals with AES-256-GCM (random 96-bit IV).
pub struct Pkcs11SecretKey {
    token: Arc<Token>,
    handle: ObjectHandle,
    uri: Pkcs11Uri,
}

impl std::fmt::Debug for Pkcs11SecretKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pkcs11SecretKey")
            .field("uri", &self.uri)
            .finish_non_exhaustive()
    }
}

impl Pkcs11SecretKey {
    /// Generates an AES-256 key on the token (CKA_TOKEN, CKA_PRIVATE, CKA_SENSITIVE, not
    /// CKA_EXTRACTABLE, CKA_ENCRYPT/DECRYPT); refuses a label or id that exists.
    pub fn generate(uri: &Pkcs11Uri, cfg: &Pkcs11Config) -> Result<(Self, Pkcs11Uri)> {
        let new = super::key::NewObject::prepare(uri, cfg)?;
        let (token, label, id) = (&new.token, &new.label, &new.id);
        token.with_session(|s| {
            new.refuse_existing(s)?;
            s.generate_key(
                &Mechanism::AesKeyGen,
                &[
                    Attribute::Token(true),
                    Attribute::Private(true),
                    Attribute::Sensitive(true),
                    Attribute::Extractable(false),
                    Attribute::Encrypt(true),
                    Attribute::Decrypt(true),
                    Attribute::ValueLen(32.into()),
                    Attribute::Label(label.as_bytes().to_vec()),
                    Attribute::Id(id.clone()),
                ],
            )
            .map_err(|e| p11(&token.label, "generating an AES key", e))?;
            Ok(())
        })?;
        Ok((Self::open(&new.full, cfg)?, new.full))
    }

    /// Opens the AES key the URI names.
    pub fn open(uri: &Pkcs11Uri, cfg: &Pkcs11Config) -> Result<Self> {
        let token = Token::open(uri, cfg, true)?;
        let handle = find_secret(&token, uri, CkKeyType::AES, "AES keys")?;
        Ok(Pkcs11SecretKey {
            token,
            handle,
            uri: uri.without_pin_value(),
        })
    }

    /// `IV || AES-256-GCM(plain) || tag`, without associated data.
    pub fn seal(&self, plain: &[u8]) -> Result<Vec<u8>> {
        self.seal_bound(plain, &[])
    }

    /// Opens what [`seal`](Self::seal) made; fails on any alteration.
    pub fn unseal(&self, blob: &[u8]) -> Result<Zeroizing<Vec<u8>>> {
        self.unseal_bound(blob, &[])
    }

    /// `IV || AES-256-GCM(plain, associated data aad) || tag`: opens only with the same `aad`.
    pub fn seal_bound(&self, plain: &[u8], aad: &[u8]) -> Result<Vec<u8>> {
        let mut iv = [0u8; IV_LEN];
        aws_lc_rs::rand::fill(&mut iv).map_err(|_| Error::Crypto("random source failed".into()))?;
        let mut iv_param = iv;
        let params = GcmParams::new(&mut iv_param, aad, TAG_BITS.into())
            .map_err(|e| Error::Crypto(e.to_string()))?;
        let ct = self.token.with_session(|s| {
            s.encrypt(&Mechanism::AesGcm(params), self.handle, plain)
                .map_err(|e| p11(&self.token.label, "sealing", e))
        })?;
        Ok([&iv[..], &ct].concat())
    }

    /// Opens what [`seal_bound`](Self::seal_bound) made with the same `aad`; fails on any
    /// alteration of either.
    pub fn unseal_bound(&self, blob: &[u8], aad: &[u8]) -> Result<Zeroizing<Vec<u8>>> {
        if blob.len() < IV_LEN + 16 {
            return Err(Error::Crypto("sealed blob too short".into()));
        }
        let mut iv = [0u8; IV_LEN];
        iv.copy_from_slice(&blob[..IV_LEN]);
        let params = GcmParams::new(&mut iv, aad, TAG_BITS.into())
            .map_err(|e| Error::Crypto(e.to_string()))?;
        let plain = self.token.with_session(|s| {
            s.decrypt(&Mechanism::AesGcm(params), self.handle, &blob[IV_LEN..])
                .map_err(|e| p11(&self.token.label, "unsealing", e))
        })?;
        Ok(Zeroizing::new(plain))
    }
}

/// The attributes of a root credential kept on a token: a 256-bit generic secret that stays
/// there (CKA_TOKEN, CKA_PRIVATE, CKA_SENSITIVE, not CKA_EXTRACTABLE), usable for HMAC and key
/// derivation on the token.
fn credential_template(label: &str, id: &[u8]) -> Vec<Attribute> {
    vec![
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(CkKeyType::GENERIC_SECRET),
        Attribute::Token(true),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
        Attribute::Sign(true),
        Attribute::Verify(true),
        Attribute::Derive(true),
        Attribute::Label(label.as_bytes().to_vec()),
        Attribute::Id(id.to_vec()),
    ]
}

/// Unwraps a root credential straight into the token: `wrap_key` becomes a session object
/// (never stored, CKA_UNWRAP only, gone when the session ends) and `C_UnwrapKey` with
/// `CKM_AES_KEY_WRAP` (RFC 3394) turns `wrapped` into a token object with
/// [`credential_template`]'s attributes, so the credential is never in host memory in the
/// clear. A wrong wrap key fails the unwrap's integrity check and creates nothing. Refuses a
/// label or id that exists. Returns the object's full URI.
pub fn unwrap_credential(
    uri: &Pkcs11Uri,
    cfg: &Pkcs11Config,
    wrap_key: &[u8; 32],
    wrapped: &[u8],
) -> Result<Pkcs11Uri> {
    let new = super::key::NewObject::prepare(uri, cfg)?;
    let token = &new.token;
    token.with_session(|s| {
        new.refuse_existing(s)?;
        let kek = s
            .create_object(&[
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::KeyType(CkKeyType::AES),
                Attribute::Token(false),
                Attribute::Private(true),
                Attribute::Sensitive(true),
                Attribute::Extractable(false),
                Attribute::Unwrap(true),
                Attribute::Value(wrap_key.to_vec()),
            ])
            .map_err(|e| {
                p11(
                    &token.label,
                    "importing the wrap key as a session object",
                    e,
                )
            })?;
        let unwrapped = s.unwrap_key(
            &Mechanism::AesKeyWrap,
            kek,
            wrapped,
            &credential_template(&new.label, &new.id),
        );
        let _ = s.destroy_object(kek);
        unwrapped.map_err(|e| p11(&token.label, "unwrapping the credential (C_UnwrapKey)", e))?;
        Ok(())
    })?;
    Ok(new.full)
}

/// Stores a 32-byte secret the host already holds (protocol version 2's Ke, which both ends
/// derive from the TLS session) as a token object with [`credential_template`]'s attributes.
pub fn import_credential(
    uri: &Pkcs11Uri,
    cfg: &Pkcs11Config,
    value: &[u8; 32],
) -> Result<Pkcs11Uri> {
    let new = super::key::NewObject::prepare(uri, cfg)?;
    let token = &new.token;
    token.with_session(|s| {
        new.refuse_existing(s)?;
        let mut t = credential_template(&new.label, &new.id);
        t.push(Attribute::Value(value.to_vec()));
        s.create_object(&t)
            .map_err(|e| p11(&token.label, "storing the credential", e))?;
        Ok(())
    })?;
    Ok(new.full)
}

/// The one secret key of type `kind` the URI names on `token` (by label and/or id).
fn find_secret(
    token: &Token,
    uri: &Pkcs11Uri,
    kind: CkKeyType,
    what: &str,
) -> Result<ObjectHandle> {
    let mut template = vec![
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(kind),
    ];
    if let Some(l) = &uri.object {
        template.push(Attribute::Label(l.as_bytes().to_vec()));
    }
    if let Some(id) = &uri.id {
        template.push(Attribute::Id(id.clone()));
    }
    let found = token.with_session(|s| {
        s.find_objects(&template)
            .map_err(|e| p11(&token.label, "finding objects", e))
    })?;
    match found.as_slice() {
        [h] => Ok(*h),
        [] => Err(Error::KeyObjectNotFound {
            uri: uri.to_string(),
            token: token.label.clone(),
        }),
        _ => Err(Error::BadPkcs11Uri {
            uri: uri.to_string(),
            reason: format!("matches several {what}: add id= or object="),
        }),
    }
}

/// HMAC-SHA-256 of `data` with the credential object `uri` names, computed on the token.
pub fn credential_hmac(uri: &Pkcs11Uri, cfg: &Pkcs11Config, data: &[u8]) -> Result<Vec<u8>> {
    let token = Token::open(uri, cfg, true)?;
    let handle = find_secret(&token, uri, CkKeyType::GENERIC_SECRET, "secret keys")?;
    token.with_session(|s| {
        s.sign(&Mechanism::Sha256Hmac, handle, data)
            .map_err(|e| p11(&token.label, "HMAC on the token", e))
    })
}
