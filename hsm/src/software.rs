use std::fmt;
use std::path::Path;

use pkcs8::der::Decode;
use zeroize::Zeroizing;

use crate::files::{self, Mode, Overwrite, WriteOptions};
use crate::{Error, KeyRef, KeyType, Passphrase, Result, Signer};

/// PBKDF2-HMAC-SHA256 iterations for encrypted key files (OWASP 2023 guidance).
const PBKDF2_ITERATIONS: u32 = 600_000;

/// A private key held in process memory, loaded from or saved to a PKCS#8 PEM file.
pub struct SoftwareKey {
    pair: rcgen::KeyPair,
    key_type: KeyType,
    key_ref: KeyRef,
}

impl SoftwareKey {
    /// Generates a fresh key of the given type.
    pub fn generate(key_type: KeyType) -> Result<Self> {
        let pair = rcgen::KeyPair::generate_for(key_type.algorithm())
            .map_err(|e| Error::Crypto(e.to_string()))?;
        Ok(SoftwareKey {
            pair,
            key_type,
            key_ref: KeyRef::InMemory,
        })
    }

    /// Loads a key from a PKCS#8 PEM file (plain `PRIVATE KEY`, or `ENCRYPTED PRIVATE KEY`
    /// when a passphrase is given).
    pub fn load(path: &Path, passphrase: Option<&Passphrase>) -> Result<Self> {
        let text = match std::fs::read(path) {
            Ok(bytes) => Zeroizing::new(bytes),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(Error::KeyNotFound(path.to_owned()))
            }
            Err(e) => return Err(Error::io(path, e)),
        };
        let bad = |reason: String| Error::BadKeyFile {
            path: path.to_owned(),
            reason,
        };
        let block = pem::parse(&*text).map_err(|e| bad(format!("not a PEM private key ({e})")))?;
        let der = Zeroizing::new(block.contents().to_vec());
        let plain: Zeroizing<Vec<u8>> = match block.tag() {
            "PRIVATE KEY" => der,
            "ENCRYPTED PRIVATE KEY" => {
                let pass = passphrase.ok_or_else(|| Error::PassphraseNeeded(path.to_owned()))?;
                let info = pkcs8::EncryptedPrivateKeyInfo::from_der(&der)
                    .map_err(|e| bad(format!("malformed encrypted PKCS#8 ({e})")))?;
                let doc = info
                    .decrypt(pass.expose())
                    .map_err(|_| Error::WrongPassphrase(path.to_owned()))?;
                Zeroizing::new(doc.as_bytes().to_vec())
            }
            other => {
                return Err(bad(format!(
                    "PEM block `{other}` is not a PKCS#8 private key (convert it with `openssl pkcs8 -topk8`)"
                )))
            }
        };
        let pair = rcgen::KeyPair::try_from(plain.as_slice())
            .map_err(|e| bad(format!("unsupported or malformed PKCS#8 key ({e})")))?;
        let key_type = KeyType::from_algorithm(pair.algorithm()).ok_or_else(|| {
            bad("unsupported key algorithm (expected P-256, P-384 or Ed25519)".into())
        })?;
        Ok(SoftwareKey {
            pair,
            key_type,
            key_ref: KeyRef::File(path.to_owned()),
        })
    }

    /// The key as PKCS#8 PEM, encrypted with PBES2 (PBKDF2-HMAC-SHA256, AES-256-CBC) when a
    /// passphrase is given. OpenSSL reads both forms.
    pub fn to_pkcs8_pem(&self, passphrase: Option<&Passphrase>) -> Result<Zeroizing<String>> {
        let der = Zeroizing::new(self.pair.serialize_der());
        let Some(pass) = passphrase else {
            return Ok(Zeroizing::new(files::pem_encode("PRIVATE KEY", &der)));
        };
        let mut salt = [0u8; 16];
        let mut iv = [0u8; 16];
        aws_lc_rs::rand::fill(&mut salt)
            .map_err(|_| Error::Crypto("random source failed".into()))?;
        aws_lc_rs::rand::fill(&mut iv).map_err(|_| Error::Crypto("random source failed".into()))?;
        let params =
            pkcs8::pkcs5::pbes2::Parameters::pbkdf2_sha256_aes256cbc(PBKDF2_ITERATIONS, &salt, &iv)
                .map_err(|e| Error::Crypto(e.to_string()))?;
        let info =
            pkcs8::PrivateKeyInfo::from_der(&der).map_err(|e| Error::Crypto(e.to_string()))?;
        let doc = info
            .encrypt_with_params(params, pass.expose())
            .map_err(|e| Error::Crypto(e.to_string()))?;
        Ok(Zeroizing::new(files::pem_encode(
            "ENCRYPTED PRIVATE KEY",
            doc.as_bytes(),
        )))
    }

    /// Writes the key to `path` (mode 0600, atomically) and remembers it as the key's location.
    pub fn save(
        &mut self,
        path: &Path,
        passphrase: Option<&Passphrase>,
        overwrite: Overwrite,
    ) -> Result<()> {
        let pem = self.to_pkcs8_pem(passphrase)?;
        files::write_atomic(
            path,
            pem.as_bytes(),
            WriteOptions {
                mode: Mode::Secret,
                overwrite,
                sync: true,
            },
        )?;
        self.key_ref = KeyRef::File(path.to_owned());
        Ok(())
    }
}

impl fmt::Debug for SoftwareKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SoftwareKey")
            .field("key_type", &self.key_type)
            .field("key_ref", &self.key_ref)
            .finish_non_exhaustive()
    }
}

impl rcgen::PublicKeyData for SoftwareKey {
    fn der_bytes(&self) -> &[u8] {
        self.pair.der_bytes()
    }

    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        self.pair.algorithm()
    }
}

impl rcgen::SigningKey for SoftwareKey {
    fn sign(&self, msg: &[u8]) -> std::result::Result<Vec<u8>, rcgen::Error> {
        self.pair.sign(msg)
    }
}

impl Signer for SoftwareKey {
    fn key_type(&self) -> KeyType {
        self.key_type
    }

    fn key_ref(&self) -> &KeyRef {
        &self.key_ref
    }

    fn software_pkcs8(&self) -> Option<Zeroizing<Vec<u8>>> {
        Some(Zeroizing::new(self.pair.serialize_der()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{PublicKeyData, SigningKey};

    #[test]
    fn plain_and_encrypted_files_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let pass = Passphrase::new("correct horse".into()).unwrap();
        for kt in [KeyType::P256, KeyType::P384, KeyType::Ed25519] {
            for encrypted in [false, true] {
                let path = dir.path().join(format!("{kt}-{encrypted}.pem"));
                let mut key = SoftwareKey::generate(kt).unwrap();
                let p = encrypted.then_some(&pass);
                key.save(&path, p, Overwrite::Refuse).unwrap();
                let text = std::fs::read_to_string(&path).unwrap();
                assert_eq!(text.contains("ENCRYPTED"), encrypted);
                let back = SoftwareKey::load(&path, p).unwrap();
                assert_eq!(back.key_type(), kt);
                assert_eq!(back.der_bytes(), key.der_bytes());
                assert!(!back.sign(b"msg").unwrap().is_empty());
                if encrypted {
                    assert!(matches!(
                        SoftwareKey::load(&path, None),
                        Err(Error::PassphraseNeeded(_))
                    ));
                    let wrong = Passphrase::new("wrong".into()).unwrap();
                    assert!(matches!(
                        SoftwareKey::load(&path, Some(&wrong)),
                        Err(Error::WrongPassphrase(_))
                    ));
                }
            }
        }
    }

    #[test]
    fn garbage_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("junk.pem");
        std::fs::write(
            &path,
            "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
        )
        .unwrap();
        let err = SoftwareKey::load(&path, None).unwrap_err();
        assert!(matches!(err, Error::BadKeyFile { .. }), "{err}");
        assert!(err.to_string().contains("junk.pem"));
        assert!(matches!(
            SoftwareKey::load(&dir.path().join("missing"), None),
            Err(Error::KeyNotFound(_))
        ));
    }

    #[test]
    fn debug_shows_no_key_material() {
        let key = SoftwareKey::generate(KeyType::P256).unwrap();
        let pem = key.to_pkcs8_pem(None).unwrap();
        let dbg = format!("{key:?}");
        let body: String = pem.lines().nth(1).unwrap().chars().take(20).collect();
        assert!(!dbg.contains(&body));
    }
}
