//! Who asked for a certificate. Every front-end (the command line, a batch, and the network
//! front-ends EST and CMP) authorizes a request its own way and then issues through the one
//! authority (`prepare` → `commit`); the requester it names travels with the request into the
//! certificate's record and its `cert.issue` audit entry.

use serde::{Deserialize, Serialize};

/// Who asked for a certificate. A [`LeafRequest`](crate::LeafRequest) cannot be made without
/// one, so no front-end can issue without saying who asked.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "via", rename_all = "kebab-case")]
pub enum Requester {
    /// An operator at the CA host's command line: the OS account that ran `m2mpki`.
    Operator {
        /// The account's name (or `uid <n>` when it has none).
        account: String,
    },
    /// A batch an operator ran from an input file.
    Batch {
        /// The account's name.
        account: String,
        /// The input file, as given.
        input: String,
    },
    /// A peer that a network front-end authenticated.
    Peer {
        /// The front-end (`est`, `cmp`, ...).
        protocol: String,
        /// What the peer proved: its certificate (subject and SHA-256), or a shared
        /// secret's ID.
        identity: String,
        /// Where it connected from.
        address: String,
    },
    /// `m2mpki lab`, setting up a lab PKI.
    Lab,
}

impl Requester {
    /// The operator running this process, named by its OS account.
    pub fn operator() -> Self {
        Requester::Operator { account: account() }
    }

    /// A batch this process's operator runs from `input`.
    pub fn batch(input: impl Into<String>) -> Self {
        Requester::Batch {
            account: account(),
            input: input.into(),
        }
    }
}

impl std::fmt::Display for Requester {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Requester::Operator { account } => write!(f, "operator {account}"),
            Requester::Batch { account, input } => write!(f, "batch {input} by {account}"),
            Requester::Peer {
                protocol,
                identity,
                address,
            } => write!(f, "{protocol} peer {identity} at {address}"),
            Requester::Lab => f.write_str("lab"),
        }
    }
}

/// The name of the account this process runs as, as its environment gives it (`$USER`, else
/// `$LOGNAME`), else its uid. It records who said they ran the command on the CA host, which
/// anyone on that host can claim; network front-ends name the peer they authenticated.
fn account() -> String {
    let uid = rustix::process::getuid().as_raw();
    ["USER", "LOGNAME"]
        .iter()
        .filter_map(|v| std::env::var(v).ok())
        .find(|name| !name.is_empty() && name.len() <= 64 && !name.contains(char::is_control))
        .unwrap_or_else(|| format!("uid {uid}"))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests may fail loudly

    use super::*;

    #[test]
    fn each_requester_is_stored_under_its_own_tag() {
        let cases = [
            (
                Requester::Operator {
                    account: "alice".into(),
                },
                r#"{"via":"operator","account":"alice"}"#,
                "operator alice",
            ),
            (
                Requester::Batch {
                    account: "line3".into(),
                    input: "lot-7.csv".into(),
                },
                r#"{"via":"batch","account":"line3","input":"lot-7.csv"}"#,
                "batch lot-7.csv by line3",
            ),
            (
                Requester::Peer {
                    protocol: "est".into(),
                    identity: "CN=station-4".into(),
                    address: "192.0.2.7:50123".into(),
                },
                r#"{"via":"peer","protocol":"est","identity":"CN=station-4","address":"192.0.2.7:50123"}"#,
                "est peer CN=station-4 at 192.0.2.7:50123",
            ),
            (Requester::Lab, r#"{"via":"lab"}"#, "lab"),
        ];
        for (requester, json, shown) in cases {
            assert_eq!(serde_json::to_string(&requester).unwrap(), json);
            assert_eq!(serde_json::from_str::<Requester>(json).unwrap(), requester);
            assert_eq!(requester.to_string(), shown);
        }
    }

    #[test]
    fn the_operator_is_named() {
        let Requester::Operator { account } = Requester::operator() else {
            panic!("not an operator");
        };
        assert!(!account.is_empty());
    }
}
