use std::fmt;
use std::path::Path;

use zeroize::Zeroizing;

use crate::{Error, Result};

/// A passphrase that protects private key files. Its `Debug` output never shows it.
#[derive(Clone)]
pub struct Passphrase(Zeroizing<String>);

impl Passphrase {
    /// Wraps a passphrase given in memory. Empty passphrases are refused.
    pub fn new(value: String) -> Option<Self> {
        let value = Zeroizing::new(value);
        (!value.is_empty()).then_some(Passphrase(value))
    }

    /// Reads a passphrase from the first line of `path` (the line end is not part of it).
    pub fn from_file(path: &Path) -> Result<Self> {
        let bad = |reason: &str| Error::BadPassphraseFile {
            path: path.to_owned(),
            reason: reason.to_owned(),
        };
        let raw = Zeroizing::new(std::fs::read(path).map_err(|e| bad(&e.to_string()))?);
        let text = std::str::from_utf8(&raw).map_err(|_| bad("not UTF-8 text"))?;
        let line = text.lines().next().unwrap_or("");
        Passphrase::new(line.to_owned()).ok_or_else(|| bad("the first line is empty"))
    }

    pub(crate) fn expose(&self) -> &[u8] {
        self.0.as_bytes()
    }
}

impl fmt::Debug for Passphrase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Passphrase(<redacted>)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_hides_the_secret() {
        let p = Passphrase::new("hunter2-correct-horse".into()).unwrap();
        assert!(!format!("{p:?}").contains("hunter2"));
    }

    #[test]
    fn reads_first_line_and_refuses_empty() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("pass");
        std::fs::write(&f, "s3cret\nignored\n").unwrap();
        let p = Passphrase::from_file(&f).unwrap();
        assert_eq!(p.expose(), b"s3cret");
        std::fs::write(&f, "\n").unwrap();
        assert!(matches!(
            Passphrase::from_file(&f),
            Err(Error::BadPassphraseFile { .. })
        ));
    }
}
