//! `m2mpki hsm`: PKCS#11 tokens and keys.

use anyhow::Result;
use m2mpki_hsm::Keystore;
use rcgen::PublicKeyData;

use crate::args::HsmCommand;
use crate::output::{emit, emit_json, table};

pub(crate) fn run(keystore: &Keystore, json: bool, cmd: HsmCommand) -> Result<()> {
    use m2mpki_hsm::pkcs11;
    match cmd {
        HsmCommand::Keygen { uri, key_type } => {
            let uri: pkcs11::Pkcs11Uri = uri.parse()?;
            let (key, full) = pkcs11::generate(&uri, key_type.into(), keystore.pkcs11())?;
            let spki = m2mpki_ca::input::sha256(&key.subject_public_key_info());
            if json {
                emit_json(&serde_json::json!({
                    "uri": full.to_string(),
                    "token": key.token().label,
                    "key_type": key_type_name(&key),
                    "spki_sha256": hex::encode(spki),
                }))
            } else {
                emit(&format!(
                    "generated {} key on token `{}`\n  uri  {full}",
                    key_type_name(&key),
                    key.token().label
                ))
            }
        }
        HsmCommand::KeygenSecret { uri } => {
            let uri: pkcs11::Pkcs11Uri = uri.parse()?;
            let (_, full) = pkcs11::Pkcs11SecretKey::generate(&uri, keystore.pkcs11())?;
            if json {
                emit_json(&serde_json::json!({ "uri": full.to_string(), "key_type": "aes256" }))
            } else {
                emit(&format!("generated AES-256 key\n  uri  {full}"))
            }
        }
        HsmCommand::List { module, login } => {
            let module = module
                .or_else(|| keystore.pkcs11().module.clone())
                .ok_or(m2mpki_hsm::Error::NoModule)?;
            let login: Option<pkcs11::Pkcs11Uri> = login.as_deref().map(str::parse).transpose()?;
            let tokens = pkcs11::list_tokens(&module, login.as_ref(), keystore.pkcs11())?;
            if json {
                return emit_json(&tokens);
            }
            let mut out = String::new();
            for t in &tokens {
                out.push_str(&format!(
                    "token `{}` (slot {}, serial {}, {} {})\n",
                    t.label, t.slot_id, t.serial, t.manufacturer, t.model
                ));
                let rows: Vec<Vec<String>> = t
                    .keys
                    .iter()
                    .map(|k| {
                        let flag = |b: Option<bool>, yes: &str| match b {
                            Some(true) => yes.to_owned(),
                            Some(false) => format!("NOT {yes}"),
                            None => "-".to_owned(),
                        };
                        vec![
                            k.class.to_owned(),
                            k.label.clone().unwrap_or_default(),
                            k.id.clone(),
                            k.key_type.clone(),
                            flag(k.sensitive, "sensitive"),
                            match k.extractable {
                                Some(true) => "EXTRACTABLE".to_owned(),
                                Some(false) => "not extractable".to_owned(),
                                None => "-".to_owned(),
                            },
                        ]
                    })
                    .collect();
                if rows.is_empty() {
                    out.push_str("  (no key objects visible; --login URI shows private keys)\n");
                } else {
                    for line in table(
                        &["CLASS", "LABEL", "ID", "TYPE", "SENSITIVE", "EXTRACTABLE"],
                        &rows,
                    )
                    .lines()
                    {
                        out.push_str("  ");
                        out.push_str(line);
                        out.push('\n');
                    }
                }
            }
            if tokens.is_empty() {
                out.push_str("no initialised tokens\n");
            }
            emit(&out)
        }
    }
}

fn key_type_name(key: &m2mpki_hsm::pkcs11::Pkcs11Key) -> String {
    use m2mpki_hsm::Signer;
    key.key_type().to_string()
}
