//! Keys that seal secrets at rest (the IN's credential store): a 0600 key file or an AES key
//! that never leaves a PKCS#11 token, behind one trait, opened by [`KeyRef`] like signing keys.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use aws_lc_rs::aead;
use aws_lc_rs::key_wrap::{AesBlockCipher, KeyEncryptionKey, KeyWrap, AES_256};
use zeroize::Zeroizing;

use crate::files::{self, Mode, Overwrite, WriteOptions};
use crate::pkcs11::Pkcs11SecretKey;
use crate::{Error, KeyRef, Keystore, Result};

/// Seals and unseals small secrets. `Debug` never shows key material.
pub trait Sealer: Send + Sync + fmt::Debug {
    /// Seals `plain` (for a file key, `plain` must be a multiple of 8 bytes, at least 16).
    fn seal(&self, plain: &[u8]) -> Result<Vec<u8>>;
    /// Opens what [`seal`](Self::seal) made; any alteration (or another key) is an error.
    fn unseal(&self, blob: &[u8]) -> Result<Zeroizing<Vec<u8>>>;
    /// Seals `plain` bound to the associated data `aad` with AES-256-GCM (`nonce || ciphertext
    /// || tag`): it opens only with the same `aad`, so a sealed value moved to a record whose
    /// `aad` differs does not open.
    fn seal_bound(&self, plain: &[u8], aad: &[u8]) -> Result<Vec<u8>>;
    /// Opens what [`seal_bound`](Self::seal_bound) made with the same `aad`.
    fn unseal_bound(&self, blob: &[u8], aad: &[u8]) -> Result<Zeroizing<Vec<u8>>>;
    /// Whether the key stays on a token.
    fn is_token(&self) -> bool;
}

/// A 32-byte AES-256 key read from a key file (64 hex digits, mode 0600); seals with RFC 3394
/// key wrap, so a sealed 32-byte secret is 40 bytes.
pub struct FileSealingKey {
    key: Zeroizing<[u8; 32]>,
    path: PathBuf,
}

impl fmt::Debug for FileSealingKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FileSealingKey")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl FileSealingKey {
    /// Loads the key from `path`, creating it (32 random bytes, hex, mode 0600) when missing.
    pub fn load_or_create(path: &Path) -> Result<Self> {
        let bad = || Error::BadKeyFile {
            path: path.to_owned(),
            reason: "a store key file must hold 64 hex digits".into(),
        };
        let mut key = Zeroizing::new([0u8; 32]);
        match std::fs::read(path) {
            Ok(text) => {
                // The file's text is the key: it is wiped like the decoded bytes.
                let text = Zeroizing::new(text);
                hex::decode_to_slice(text.trim_ascii(), &mut *key).map_err(|_| bad())?;
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                aws_lc_rs::rand::fill(&mut *key)
                    .map_err(|_| Error::Crypto("random source failed".into()))?;
                let text = Zeroizing::new(hex::encode(key.as_slice()) + "\n");
                files::write_atomic(
                    path,
                    text.as_bytes(),
                    WriteOptions {
                        mode: Mode::Secret,
                        overwrite: Overwrite::Refuse,
                        sync: true,
                    },
                )?;
            }
            Err(e) => {
                return Err(Error::Io {
                    path: path.to_owned(),
                    source: e,
                })
            }
        }
        Ok(FileSealingKey {
            key,
            path: path.to_owned(),
        })
    }

    fn kek(&self) -> Result<KeyEncryptionKey<AesBlockCipher>> {
        KeyEncryptionKey::new(&AES_256, &*self.key)
            .map_err(|_| Error::Crypto("unusable store key".into()))
    }
}

impl Sealer for FileSealingKey {
    fn seal(&self, plain: &[u8]) -> Result<Vec<u8>> {
        let mut out = vec![0u8; plain.len() + 8];
        let n = self
            .kek()?
            .wrap(plain, &mut out)
            .map_err(|_| {
                Error::Crypto(
                    "key wrap failed (the secret must be 16+ bytes, a multiple of 8)".into(),
                )
            })?
            .len();
        out.truncate(n);
        Ok(out)
    }

    fn unseal(&self, blob: &[u8]) -> Result<Zeroizing<Vec<u8>>> {
        let mut out = Zeroizing::new(vec![0u8; blob.len()]);
        let n = self
            .kek()?
            .unwrap(blob, &mut out)
            .map_err(|_| {
                Error::Crypto(
                    "sealed blob does not open with this key (altered, or another key)".into(),
                )
            })?
            .len();
        out.truncate(n);
        Ok(out)
    }

    fn seal_bound(&self, plain: &[u8], aad: &[u8]) -> Result<Vec<u8>> {
        let mut nonce = [0u8; aead::NONCE_LEN];
        aws_lc_rs::rand::fill(&mut nonce)
            .map_err(|_| Error::Crypto("random source failed".into()))?;
        let mut out = plain.to_vec();
        self.gcm()?
            .seal_in_place_append_tag(
                aead::Nonce::assume_unique_for_key(nonce),
                aead::Aad::from(aad),
                &mut out,
            )
            .map_err(|_| Error::Crypto("sealing failed".into()))?;
        Ok([&nonce[..], &out].concat())
    }

    fn unseal_bound(&self, blob: &[u8], aad: &[u8]) -> Result<Zeroizing<Vec<u8>>> {
        let bad = || {
            Error::Crypto(
                "sealed blob does not open with this key and record (altered, moved, or another key)"
                    .into(),
            )
        };
        if blob.len() < aead::NONCE_LEN + aead::AES_256_GCM.tag_len() {
            return Err(bad());
        }
        let (nonce, sealed) = blob.split_at(aead::NONCE_LEN);
        let nonce = aead::Nonce::try_assume_unique_for_key(nonce).map_err(|_| bad())?;
        let mut buf = Zeroizing::new(sealed.to_vec());
        let n = self
            .gcm()?
            .open_in_place(nonce, aead::Aad::from(aad), &mut buf)
            .map_err(|_| bad())?
            .len();
        buf.truncate(n);
        Ok(buf)
    }

    fn is_token(&self) -> bool {
        false
    }
}

impl FileSealingKey {
    fn gcm(&self) -> Result<aead::LessSafeKey> {
        aead::UnboundKey::new(&aead::AES_256_GCM, &*self.key)
            .map(aead::LessSafeKey::new)
            .map_err(|_| Error::Crypto("unusable store key".into()))
    }
}

impl Sealer for Pkcs11SecretKey {
    fn seal(&self, plain: &[u8]) -> Result<Vec<u8>> {
        Pkcs11SecretKey::seal(self, plain)
    }

    fn unseal(&self, blob: &[u8]) -> Result<Zeroizing<Vec<u8>>> {
        Pkcs11SecretKey::unseal(self, blob)
    }

    fn seal_bound(&self, plain: &[u8], aad: &[u8]) -> Result<Vec<u8>> {
        Pkcs11SecretKey::seal_bound(self, plain, aad)
    }

    fn unseal_bound(&self, blob: &[u8], aad: &[u8]) -> Result<Zeroizing<Vec<u8>>> {
        Pkcs11SecretKey::unseal_bound(self, blob, aad)
    }

    fn is_token(&self) -> bool {
        true
    }
}

impl Keystore {
    /// Opens a sealing key: an AES key on a token, or a key file (created when missing).
    pub fn open_sealer(&self, key_ref: &KeyRef) -> Result<Arc<dyn Sealer>> {
        match key_ref {
            KeyRef::Pkcs11(uri) => Ok(Arc::new(Pkcs11SecretKey::open(uri, self.pkcs11())?)),
            KeyRef::File(path) => Ok(Arc::new(FileSealingKey::load_or_create(path)?)),
            KeyRef::InMemory => Err(Error::Crypto(
                "a sealing key must be a file or a token object".into(),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_key_is_made_0600_and_seals_like_rfc3394() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.key");
        let key = FileSealingKey::load_or_create(&path).unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let secret = [0x5au8; 32];
        let sealed = key.seal(&secret).unwrap();
        assert_eq!(sealed.len(), 40);
        // The same key read back opens it; the text is not in Debug.
        let again = FileSealingKey::load_or_create(&path).unwrap();
        assert_eq!(&*again.unseal(&sealed).unwrap(), &secret);
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(!format!("{again:?}").contains(text.trim()));
        // RFC 3394 §4.6 vector: 256-bit KEK, 256-bit data.
        std::fs::write(
            &path,
            "000102030405060708090A0B0C0D0E0F101112131415161718191A1B1C1D1E1F\n",
        )
        .unwrap();
        let vector = FileSealingKey::load_or_create(&path).unwrap();
        let plain: Vec<u8> = [
            0x00, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88, 0x99, 0xaa, 0xbb, 0xcc, 0xdd,
            0xee, 0xff, 0x00, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08, 0x09, 0x0a, 0x0b,
            0x0c, 0x0d, 0x0e, 0x0f,
        ]
        .to_vec();
        let wrapped = vector.seal(&plain).unwrap();
        assert_eq!(
            wrapped,
            [
                0x28, 0xc9, 0xf4, 0x04, 0xc4, 0xb8, 0x10, 0xf4, 0xcb, 0xcc, 0xb3, 0x5c, 0xfb, 0x87,
                0xf8, 0x26, 0x3f, 0x57, 0x86, 0xe2, 0xd8, 0x0e, 0xd3, 0x26, 0xcb, 0xc7, 0xf0, 0xe7,
                0x1a, 0x99, 0xf4, 0x3b, 0xfb, 0x98, 0x8b, 0x9b, 0x7a, 0x02, 0xdd, 0x21
            ]
        );
    }

    #[test]
    fn a_bound_seal_opens_only_with_its_associated_data() {
        let dir = tempfile::tempdir().unwrap();
        let key = FileSealingKey::load_or_create(&dir.path().join("k")).unwrap();
        let secret = [0x42u8; 32];
        let sealed = key.seal_bound(&secret, b"record A").unwrap();
        assert_eq!(sealed.len(), 12 + 32 + 16);
        assert_ne!(
            sealed,
            key.seal_bound(&secret, b"record A").unwrap(),
            "fresh nonce"
        );
        assert_eq!(&*key.unseal_bound(&sealed, b"record A").unwrap(), &secret);
        assert!(key.unseal_bound(&sealed, b"record B").is_err());
        assert!(key.unseal_bound(&sealed, b"").is_err());
        let mut altered = sealed.clone();
        altered[20] ^= 1;
        assert!(key.unseal_bound(&altered, b"record A").is_err());
        assert!(key.unseal_bound(&sealed[..27], b"record A").is_err());
        // The unbound form does not open it either.
        assert!(key.unseal(&sealed).is_err());
    }

    #[test]
    fn bad_key_files_and_altered_blobs_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        for bad in ["", "zz", &"0".repeat(63), &"g".repeat(64), &"0".repeat(66)] {
            std::fs::write(&path, bad).unwrap();
            let err = FileSealingKey::load_or_create(&path).unwrap_err();
            assert!(matches!(err, Error::BadKeyFile { .. }), "{bad:?}: {err}");
            assert!(err.to_string().contains("64 hex digits"), "{err}");
        }
        std::fs::write(&path, "11".repeat(32)).unwrap();
        let key = FileSealingKey::load_or_create(&path).unwrap();
        let mut sealed = key.seal(&[7u8; 32]).unwrap();
        sealed[5] ^= 1;
        assert!(key.unseal(&sealed).is_err());
        assert!(key.unseal(&sealed[..39]).is_err());
    }
}
