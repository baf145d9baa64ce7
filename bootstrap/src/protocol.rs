//! The wire protocol: what `docs/protocol.md` describes, as code.

use aws_lc_rs::key_wrap::{KeyEncryptionKey, KeyWrap, AES_256};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::{Error, Result};

/// The TLS exporter label (RFC 5705 / RFC 8446 §7.5); no context.
pub const EXPORTER_LABEL: &[u8] = b"EXPORTER-oneM2M-RootCredentialWrapKey";
/// Length of RootCredentialWrapKey.
pub const WRAP_KEY_LEN: usize = 32;
/// Length of a root credential.
pub const CREDENTIAL_LEN: usize = 32;
/// Length of a wrapped root credential (RFC 3394 adds 8 bytes).
pub const WRAPPED_LEN: usize = CREDENTIAL_LEN + 8;
/// Protocol version 2 (oneM2M TS-0003): the label of the 48-byte export, no context.
pub const TS0003_LABEL: &[u8] = b"EXPORTER-oneM2M-Bootstrap";
/// Length of the TS-0003 export: RelativeKeID (16) then Ke (32).
pub const TS0003_LEN: usize = 48;
/// The protocol version that follows TS-0003.
pub const VERSION_TS0003: u32 = 2;
/// The request path.
pub const PATH: &str = "/bootstrap";
/// Protocol version carried in requests and responses.
pub const VERSION: u32 = 1;
/// The key-wrap algorithm name in responses.
pub const WRAP_ALGORITHM: &str = "aes256-kw";

/// Declares a 32-byte secret type: `Debug` shows nothing, memory is zeroed on drop. Each
/// secret has its own type, so [`wrap`] cannot be handed its arguments swapped.
macro_rules! secret32 {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq)]
        pub struct $name(Zeroizing<[u8; 32]>);

        impl $name {
            /// Takes the bytes.
            pub fn new(bytes: [u8; 32]) -> Self {
                $name(Zeroizing::new(bytes))
            }

            /// 32 fresh random bytes.
            pub fn random() -> Result<Self> {
                let mut b = Zeroizing::new([0u8; 32]);
                aws_lc_rs::rand::fill(&mut *b)
                    .map_err(|_| Error::internal("random source failed"))?;
                Ok($name(b))
            }

            /// From a slice of exactly 32 bytes.
            pub fn from_slice(s: &[u8]) -> Option<Self> {
                let arr: [u8; 32] = s.try_into().ok()?;
                Some($name::new(arr))
            }

            /// The bytes.
            pub fn expose(&self) -> &[u8; 32] {
                &self.0
            }
        }

        impl std::fmt::Debug for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(concat!(stringify!($name), "(<redacted>)"))
            }
        }
    };
}

secret32!(
    /// RootCredentialWrapKey: what both ends export from their TLS session; the key that wraps
    /// the root credential on the wire.
    WrapKey
);

secret32!(
    /// A root credential: the secret the IN provisions to a field node.
    RootCredential
);

/// What both ends derive under protocol version 2 (oneM2M TS-0003): the 48-byte TLS export
/// with label `EXPORTER-oneM2M-Bootstrap` and no context; RelativeKeID is its first 16 bytes, Ke
/// (the provisioned key) its last 32.
#[derive(Clone, PartialEq, Eq)]
pub struct Ts0003Keys {
    relative_ke_id: [u8; 16],
    ke: RootCredential,
}

impl std::fmt::Debug for Ts0003Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ts0003Keys")
            .field("relative_ke_id", &hex::encode(self.relative_ke_id))
            .finish_non_exhaustive()
    }
}

impl Ts0003Keys {
    /// Splits the 48 exported bytes.
    pub fn from_export(out: &[u8; TS0003_LEN]) -> Self {
        let mut relative_ke_id = [0u8; 16];
        relative_ke_id.copy_from_slice(&out[..16]);
        let mut ke = [0u8; 32];
        ke.copy_from_slice(&out[16..]);
        let keys = Ts0003Keys {
            relative_ke_id,
            ke: RootCredential::new(ke),
        };
        zeroize::Zeroize::zeroize(&mut ke);
        keys
    }

    /// KeID: lowercase hex of RelativeKeID, `@`, the IN's FQDN.
    pub fn ke_id(&self, in_fqdn: &str) -> String {
        format!("{}@{in_fqdn}", hex::encode(self.relative_ke_id))
    }

    /// Ke, the key provisioned by the bootstrap.
    pub fn ke(&self) -> &RootCredential {
        &self.ke
    }
}

/// RFC 3394 AES-256 key wrap (default IV A6A6A6A6A6A6A6A6) of `plain` under `kek`.
pub fn wrap(kek: &WrapKey, plain: &RootCredential) -> Result<[u8; WRAPPED_LEN]> {
    let k =
        KeyEncryptionKey::new(&AES_256, kek.expose()).map_err(|_| Error::internal("bad KEK"))?;
    let mut out = [0u8; WRAPPED_LEN];
    let n = k
        .wrap(plain.expose(), &mut out)
        .map_err(|_| Error::internal("key wrap failed"))?
        .len();
    if n != WRAPPED_LEN {
        return Err(Error::internal("key wrap produced an unexpected length"));
    }
    Ok(out)
}

/// RFC 3394 unwrap; an integrity failure (wrong key, tampered blob) is an error.
pub fn unwrap(kek: &WrapKey, wrapped: &[u8]) -> Result<RootCredential> {
    if wrapped.len() != WRAPPED_LEN {
        return Err(Error::Protocol(format!(
            "the wrapped credential is {} bytes, expected {WRAPPED_LEN}",
            wrapped.len()
        )));
    }
    let k =
        KeyEncryptionKey::new(&AES_256, kek.expose()).map_err(|_| Error::internal("bad KEK"))?;
    let mut out = Zeroizing::new([0u8; CREDENTIAL_LEN]);
    k.unwrap(wrapped, &mut *out).map_err(|_| {
        Error::Protocol(
            "the wrapped credential failed its integrity check (RFC 3394 unwrap): \
             the two ends do not share RootCredentialWrapKey, or the response was altered"
                .into(),
        )
    })?;
    Ok(RootCredential(out))
}

/// `POST /bootstrap` body.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootstrapRequest {
    /// Protocol version: 1 (the contribution: a wrapped credential) or 2 (TS-0003: Ke from the
    /// export, named by KeID).
    pub version: u32,
}

/// Which root set admitted the field node. On the wire: `set`, `kind` (`device` or `node`) and
/// the kind's `vertical` or `enterprise`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Admission {
    /// The set's name.
    pub set: String,
    /// The set's kind, with its vertical or enterprise.
    #[serde(flatten)]
    pub kind: m2mpki_ca::rootset::RootSetKind,
}

/// A successful `POST /bootstrap` answer.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BootstrapResponse {
    /// Protocol version: the request's.
    pub version: u32,
    /// Identifier of the new root credential (version 1: 32 hex digits; version 2: the KeID).
    pub credential_id: String,
    /// Version 1: the credential wrapped under RootCredentialWrapKey, base64 (standard,
    /// padded). Absent in version 2, where both ends derived Ke themselves.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wrapped_credential: Option<String>,
    /// Version 1: always [`WRAP_ALGORITHM`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wrap_algorithm: Option<String>,
    /// Version 2: KeID, as the IN computed it (the node checks it against its own).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ke_id: Option<String>,
    /// The IN's FQDN.
    pub in_fqdn: String,
    /// The field node's identity as the IN sees it (canonical form on the wire).
    pub identity: m2mpki_ca::FieldNodeIdentity,
    /// The root set that admitted it.
    pub admitted_by: Admission,
    /// When the credential expires (RFC 3339).
    pub expires: String,
    /// Resources the node is authorized for now.
    pub grants: Vec<String>,
    /// Configuration parameters from the IN.
    pub parameters: serde_json::Map<String, serde_json::Value>,
}

/// A refusal.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorDetail,
}

/// A refusal's code and message.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ErrorDetail {
    /// Stable reason code.
    pub code: String,
    /// Human-readable message.
    pub message: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3394_section_4_6_vector() {
        // RFC 3394 §4.6: 256 bits of key data with a 256-bit KEK.
        let kek = WrapKey::from_slice(
            &hex::decode("000102030405060708090A0B0C0D0E0F101112131415161718191A1B1C1D1E1F")
                .unwrap(),
        )
        .unwrap();
        let data = RootCredential::from_slice(
            &hex::decode("00112233445566778899AABBCCDDEEFF000102030405060708090A0B0C0D0E0F")
                .unwrap(),
        )
        .unwrap();
        let wrapped = wrap(&kek, &data).unwrap();
        assert_eq!(
            hex::encode_upper(wrapped),
            "28C9F404C4B810F4CBCCB35CFB87F8263F5786E2D80ED326CBC7F0E71A99F43BFB988B9B7A02DD21"
        );
        assert_eq!(unwrap(&kek, &wrapped).unwrap(), data);
        let mut bad = wrapped;
        bad[5] ^= 1;
        assert!(matches!(unwrap(&kek, &bad), Err(Error::Protocol(_))));
    }

    #[test]
    fn admissions_keep_their_wire_form() {
        let a = Admission {
            set: "meters".into(),
            kind: m2mpki_ca::rootset::RootSetKind::Device {
                vertical: "smart-metering".into(),
            },
        };
        let v = serde_json::to_value(&a).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"set": "meters", "kind": "device", "vertical": "smart-metering"})
        );
        assert_eq!(serde_json::from_value::<Admission>(v).unwrap(), a);
        let n: Admission =
            serde_json::from_str(r#"{"set":"acme","kind":"node","enterprise":"acme.example"}"#)
                .unwrap();
        assert!(matches!(
            n.kind,
            m2mpki_ca::rootset::RootSetKind::Node { ref enterprise } if enterprise.as_str() == "acme.example"
        ));
        // A node admission without its enterprise is malformed.
        assert!(serde_json::from_str::<Admission>(r#"{"set":"acme","kind":"node"}"#).is_err());
    }

    #[test]
    fn ts0003_split_and_ke_id() {
        let mut out = [0u8; TS0003_LEN];
        for (i, b) in out.iter_mut().enumerate() {
            *b = i as u8;
        }
        let k = Ts0003Keys::from_export(&out);
        assert_eq!(
            k.ke_id("in.example.net"),
            "000102030405060708090a0b0c0d0e0f@in.example.net"
        );
        assert_eq!(k.ke().expose()[..], out[16..]);
        assert!(!format!("{k:?}").contains("101112"), "{k:?}");
    }

    #[test]
    fn secrets_do_not_debug() {
        let s = WrapKey::new([0x41; 32]);
        assert_eq!(format!("{s:?}"), "WrapKey(<redacted>)");
        let s = RootCredential::new([0x41; 32]);
        assert_eq!(format!("{s:?}"), "RootCredential(<redacted>)");
    }
}
