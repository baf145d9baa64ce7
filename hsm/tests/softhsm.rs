//! PKCS#11 keys on a real SoftHSM2 token.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests may fail loudly

use std::path::PathBuf;
use std::process::Command;

use m2mpki_hsm::pkcs11::{self, Pkcs11Config, Pkcs11Key, Pkcs11Uri};
use m2mpki_hsm::{Error, KeyType, Signer};
use m2mpki_test_pki::softhsm::{isolated, process_softhsm};
use rcgen::{PublicKeyData, SigningKey};

const PIN: &str = "1234-user";

/// A fresh token with a unique label; returns its URI (module and pin-source included).
fn token(name: &str) -> (Pkcs11Uri, tempfile::TempDir) {
    let hsm = process_softhsm().unwrap();
    let label = format!("{name}-{}", std::process::id());
    hsm.init_token(&label, PIN, "5678-so").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let pin = dir.path().join("pin");
    std::fs::write(&pin, format!("{PIN}\n")).unwrap();
    let uri = format!(
        "pkcs11:token={label}?module-path={}&pin-source={}",
        hsm.module.display(),
        pin.display()
    )
    .parse()
    .unwrap();
    (uri, dir)
}

fn cfg() -> Pkcs11Config {
    Pkcs11Config {
        sessions: 2,
        ..Pkcs11Config::default()
    }
}

fn verify(key: &dyn Signer, msg: &[u8], sig: &[u8]) -> bool {
    use aws_lc_rs::signature::{self, UnparsedPublicKey};
    let alg: &dyn signature::VerificationAlgorithm = match key.key_type() {
        KeyType::P256 => &signature::ECDSA_P256_SHA256_ASN1,
        KeyType::P384 => &signature::ECDSA_P384_SHA384_ASN1,
        KeyType::Ed25519 => &signature::ED25519,
    };
    UnparsedPublicKey::new(alg, key.der_bytes())
        .verify(msg, sig)
        .is_ok()
}

#[test]
fn generated_keys_sign_and_verify_for_every_type() {
    isolated(
        concat!(
            module_path!(),
            "::generated_keys_sign_and_verify_for_every_type"
        ),
        generated_keys_sign_and_verify_for_every_type_body,
    );
}

fn generated_keys_sign_and_verify_for_every_type_body() {
    let (uri, _d) = token("types");
    for kt in [KeyType::P256, KeyType::P384, KeyType::Ed25519] {
        let (key, full) =
            pkcs11::generate(&uri.for_object(&format!("k-{kt}")), kt, &cfg()).unwrap();
        assert_eq!(key.key_type(), kt);
        assert!(full.id.is_some());
        let sig = key.sign(b"hello token").unwrap();
        assert!(verify(&key, b"hello token", &sig), "{kt}");
        assert!(!verify(&key, b"other message", &sig), "{kt}");
        // Reopened by its URI, it is the same key.
        let again = Pkcs11Key::open(&full, &cfg()).unwrap();
        assert_eq!(again.der_bytes(), key.der_bytes());
    }
}

#[test]
fn parallel_signing_uses_the_session_pool() {
    isolated(
        concat!(module_path!(), "::parallel_signing_uses_the_session_pool"),
        parallel_signing_uses_the_session_pool_body,
    );
}

fn parallel_signing_uses_the_session_pool_body() {
    let (uri, _d) = token("pool");
    let (key, _) = pkcs11::generate(&uri.for_object("ca"), KeyType::P256, &cfg()).unwrap();
    assert_eq!(key.token().pool_size(), 2);
    std::thread::scope(|s| {
        for t in 0..4 {
            let key = &key;
            s.spawn(move || {
                for i in 0..50 {
                    let msg = format!("{t}-{i}");
                    let sig = key.sign(msg.as_bytes()).unwrap();
                    assert!(verify(key, msg.as_bytes(), &sig));
                }
            });
        }
    });
}

#[test]
fn keygen_refuses_an_existing_label_or_id() {
    isolated(
        concat!(module_path!(), "::keygen_refuses_an_existing_label_or_id"),
        keygen_refuses_an_existing_label_or_id_body,
    );
}

fn keygen_refuses_an_existing_label_or_id_body() {
    let (uri, _d) = token("dup");
    let (_, full) = pkcs11::generate(&uri.for_object("a"), KeyType::P256, &cfg()).unwrap();
    let err = pkcs11::generate(&uri.for_object("a"), KeyType::P256, &cfg()).unwrap_err();
    assert!(matches!(err, Error::ObjectExists { .. }), "{err}");
    let mut same_id = uri.for_object("b");
    same_id.id = full.id.clone();
    let err = pkcs11::generate(&same_id, KeyType::P256, &cfg()).unwrap_err();
    assert!(matches!(err, Error::ObjectExists { .. }), "{err}");
}

#[test]
fn private_keys_are_sensitive_and_never_extractable() {
    isolated(
        concat!(
            module_path!(),
            "::private_keys_are_sensitive_and_never_extractable"
        ),
        private_keys_are_sensitive_and_never_extractable_body,
    );
}

fn private_keys_are_sensitive_and_never_extractable_body() {
    let (uri, _d) = token("flags");
    pkcs11::generate(&uri.for_object("ca-key"), KeyType::P256, &cfg()).unwrap();
    // Our own listing...
    let listing =
        pkcs11::list_tokens(uri.module_path.as_ref().unwrap(), Some(&uri), &cfg()).unwrap();
    let t = listing
        .iter()
        .find(|t| Some(&t.label) == uri.token.as_ref())
        .unwrap();
    let private = t.keys.iter().find(|k| k.class == "private").unwrap();
    assert_eq!(private.label.as_deref(), Some("ca-key"));
    assert_eq!(private.key_type, "p256");
    assert_eq!(private.sensitive, Some(true));
    assert_eq!(private.extractable, Some(false));
    assert_eq!(private.never_extractable, Some(true));
    assert_eq!(private.always_sensitive, Some(true));
    // ... and OpenSC's, independently.
    let out = Command::new("pkcs11-tool")
        .env("SOFTHSM2_CONF", &process_softhsm().unwrap().conf)
        .arg("--module")
        .arg(uri.module_path.as_ref().unwrap())
        .args([
            "--token-label",
            uri.token.as_deref().unwrap(),
            "--login",
            "--pin",
            PIN,
            "--list-objects",
            "--type",
            "privkey",
        ])
        .output()
        .expect("pkcs11-tool is not installed: run scripts/test, which installs opensc");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("ca-key"), "{text}");
    assert!(text.contains("sensitive"), "{text}");
    assert!(text.contains("never extractable"), "{text}");
}

#[test]
fn clear_errors_for_bad_pin_token_module_and_key() {
    isolated(
        concat!(
            module_path!(),
            "::clear_errors_for_bad_pin_token_module_and_key"
        ),
        clear_errors_for_bad_pin_token_module_and_key_body,
    );
}

fn clear_errors_for_bad_pin_token_module_and_key_body() {
    let (uri, dir) = token("errors");
    pkcs11::generate(&uri.for_object("k"), KeyType::P256, &cfg()).unwrap();

    // A token this process has not logged in to yet, opened with the wrong PIN.
    let wrong = dir.path().join("wrong");
    std::fs::write(&wrong, "0000\n").unwrap();
    let (fresh_uri, _fd) = token("wrongpin");
    let mut w = fresh_uri.for_object("k");
    w.pin_source = Some(wrong);
    let err = Pkcs11Key::open(&w, &cfg()).unwrap_err();
    assert!(matches!(err, Error::WrongPin(_)), "{err}");
    assert!(err.to_string().contains("lock"), "{err}");
    assert!(!err.to_string().contains("0000"));

    let mut missing = uri.for_object("k");
    missing.token = Some("no-such-token".into());
    let err = Pkcs11Key::open(&missing, &cfg()).unwrap_err();
    assert!(matches!(err, Error::TokenNotFound { .. }), "{err}");

    let mut no_module = uri.for_object("k");
    no_module.module_path = Some(PathBuf::from("/nonexistent/libpkcs11.so"));
    let err = Pkcs11Key::open(&no_module, &cfg()).unwrap_err();
    assert!(matches!(err, Error::ModuleLoad { .. }), "{err}");
    assert!(err.to_string().contains("/nonexistent/libpkcs11.so"));

    let mut not_a_module = uri.for_object("k");
    let junk = dir.path().join("junk.so");
    std::fs::write(&junk, b"not a shared object").unwrap();
    not_a_module.module_path = Some(junk);
    let err = Pkcs11Key::open(&not_a_module, &cfg()).unwrap_err();
    assert!(matches!(err, Error::ModuleLoad { .. }), "{err}");

    let err = Pkcs11Key::open(&uri.for_object("nope"), &cfg()).unwrap_err();
    assert!(matches!(err, Error::KeyObjectNotFound { .. }), "{err}");
    assert!(err.is_bad_input());

    // An RSA key made by OpenSC is found but refused for what it is.
    let out = Command::new("pkcs11-tool")
        .env("SOFTHSM2_CONF", &process_softhsm().unwrap().conf)
        .arg("--module")
        .arg(uri.module_path.as_ref().unwrap())
        .args([
            "--token-label",
            uri.token.as_deref().unwrap(),
            "--login",
            "--pin",
            PIN,
            "--keypairgen",
            "--key-type",
            "rsa:2048",
            "--label",
            "rsa",
            "--id",
            "0a0b",
        ])
        .output()
        .expect("pkcs11-tool is not installed");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let err = Pkcs11Key::open(&uri.for_object("rsa"), &cfg()).unwrap_err();
    assert!(matches!(err, Error::UnsupportedTokenKey { .. }), "{err}");
    // Listing a token that holds a key we cannot use still works, and shows it for what it is.
    let listing =
        pkcs11::list_tokens(uri.module_path.as_ref().unwrap(), Some(&uri), &cfg()).unwrap();
    let t = listing
        .iter()
        .find(|t| Some(&t.label) == uri.token.as_ref())
        .unwrap();
    let rsa = t
        .keys
        .iter()
        .find(|k| k.label.as_deref() == Some("rsa") && k.class == "private")
        .unwrap();
    assert_eq!(rsa.key_type, "other");
}

#[test]
fn pins_never_show() {
    isolated(
        concat!(module_path!(), "::pins_never_show"),
        pins_never_show_body,
    );
}

fn pins_never_show_body() {
    let u: Pkcs11Uri = "pkcs11:token=t;object=k?module-path=/x.so&pin-value=987654"
        .parse()
        .unwrap();
    assert!(!format!("{u:?}").contains("987654"));
    assert!(!u.to_string().contains("987654"));
    let r: m2mpki_hsm::KeyRef = "pkcs11:token=t;object=k?pin-value=987654".parse().unwrap();
    assert!(!r.to_string().contains("987654"));
    assert!(!format!("{r:?}").contains("987654"));
}

#[test]
fn aes_store_keys_seal_on_the_token() {
    isolated(
        concat!(module_path!(), "::aes_store_keys_seal_on_the_token"),
        aes_store_keys_seal_on_the_token_body,
    );
}

fn aes_store_keys_seal_on_the_token_body() {
    use m2mpki_hsm::pkcs11::Pkcs11SecretKey;
    let (uri, _d) = token("aes");
    let (key, full) = Pkcs11SecretKey::generate(&uri.for_object("store"), &cfg()).unwrap();
    let sealed = key.seal(b"0123456789abcdef0123456789abcdef").unwrap();
    assert_eq!(sealed.len(), 12 + 32 + 16);
    assert!(!sealed.windows(16).any(|w| w == b"0123456789abcdef"));
    let again = Pkcs11SecretKey::open(&full, &cfg()).unwrap();
    assert_eq!(
        &again.unseal(&sealed).unwrap()[..],
        b"0123456789abcdef0123456789abcdef"
    );
    let mut bad = sealed.clone();
    bad[20] ^= 1;
    assert!(again.unseal(&bad).is_err(), "an altered blob must not open");
    assert!(matches!(
        Pkcs11SecretKey::generate(&uri.for_object("store"), &cfg()),
        Err(Error::ObjectExists { .. })
    ));
    let listing =
        pkcs11::list_tokens(uri.module_path.as_ref().unwrap(), Some(&uri), &cfg()).unwrap();
    assert!(listing.iter().any(|t| Some(&t.label) == uri.token.as_ref()));
}
