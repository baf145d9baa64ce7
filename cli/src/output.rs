//! Printing results and errors, and mapping errors to the documented exit codes.

use std::io::Write;

use m2mpki_ca::ErrorKind;

/// An error in how the command line was used (exit 2).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

/// A request the policy refused that is not a library error (`bootstrap check`): exit 1.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Denied(pub String);

/// A Unix time as RFC 3339 UTC (the number itself if out of range).
pub fn ts(unix: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(unix)
        .map(m2mpki_ca::validity::format_time)
        .unwrap_or_else(|_| unix.to_string())
}

/// Exit code for an error: 1 refused, 2 bad input, 3 internal (see `--help`).
pub fn exit_code(err: &anyhow::Error) -> u8 {
    for cause in err.chain() {
        if let Some(e) = cause.downcast_ref::<m2mpki_ca::Error>() {
            return match e.kind() {
                ErrorKind::Refused => 1,
                ErrorKind::BadInput => 2,
                ErrorKind::Internal => 3,
            };
        }
        if let Some(e) = cause.downcast_ref::<m2mpki_hsm::Error>() {
            return if e.is_bad_input() { 2 } else { 3 };
        }
        if cause.downcast_ref::<UsageError>().is_some() {
            return 2;
        }
        if cause.downcast_ref::<Denied>().is_some() {
            return 1;
        }
        if let Some(e) = cause.downcast_ref::<m2mpki_bootstrap::Error>() {
            return match e.kind() {
                ErrorKind::Refused => 1,
                ErrorKind::BadInput => 2,
                ErrorKind::Internal => 3,
            };
        }
    }
    3
}

/// Whether the error is stdout closing under us (`m2mpki certs list | head`): not an error.
pub fn is_broken_pipe(err: &anyhow::Error) -> bool {
    err.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

/// Prints the whole error chain on one line (or as JSON on stderr with `--json`). A cause
/// whose text the line already holds is left out: an error that shows its source in its own
/// message (`PATH: No such file or directory`) and also returns it as its source would
/// otherwise print the OS error twice.
pub fn print_error(err: &anyhow::Error, code: u8, json: bool) {
    let mut message = String::new();
    for cause in err.chain() {
        let text = cause.to_string();
        if message.contains(&text) {
            continue;
        }
        if !message.is_empty() {
            message.push_str(": ");
        }
        message.push_str(&text);
    }
    if json {
        let doc = serde_json::json!({ "error": message, "exit_code": code });
        eprintln!("{doc}");
    } else {
        eprintln!("m2mpki: error: {}", escape_controls(&message));
    }
}

/// Whether `c` must not reach a terminal as it is: C0 and C1 controls (ESC starts terminal
/// escape sequences, CR rewrites the line) and the bidirectional overrides and isolates that
/// reorder what is shown. A line break is kept.
fn unsafe_for_terminal(c: char) -> bool {
    (c.is_control() && c != '\n')
        || matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// Text with every character a terminal would act on written as an escape (`\x1b`,
/// `\u{202e}`), so certificate text (subjects, names) is shown, never executed.
pub fn escape_controls(text: &str) -> std::borrow::Cow<'_, str> {
    if !text.chars().any(unsafe_for_terminal) {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        match c {
            c if !unsafe_for_terminal(c) => out.push(c),
            c if (c as u32) < 0x80 => out.push_str(&format!("\\x{:02x}", c as u32)),
            c => out.push_str(&format!("\\u{{{:x}}}", c as u32)),
        }
    }
    std::borrow::Cow::Owned(out)
}

/// Writes text to stdout, control characters escaped (see [`escape_controls`]).
pub fn emit(text: &str) -> anyhow::Result<()> {
    write_stdout(&escape_controls(text))
}

/// Writes text to stdout as it is, with a final line break.
fn write_stdout(text: &str) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())?;
    if !text.ends_with('\n') {
        out.write_all(b"\n")?;
    }
    out.flush()?;
    Ok(())
}

/// Writes a JSON document to stdout.
pub fn emit_json(value: &impl serde::Serialize) -> anyhow::Result<()> {
    // JSON escapes control characters itself; other escapes would break the document.
    write_stdout(&serde_json::to_string_pretty(value)?)
}

/// Formats rows as an aligned table.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let rows: Vec<Vec<String>> = rows
        .iter()
        .map(|r| r.iter().map(|c| escape_controls(c).into_owned()).collect())
        .collect();
    let rows = rows.as_slice();
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_owned()
    };
    let mut out = line(header.to_vec());
    out.push('\n');
    for row in rows {
        out.push_str(&line(row.iter().map(String::as_str).collect()));
        out.push('\n');
    }
    out
}

/// Quotes a CSV field when needed (RFC 4180).
pub fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_escaped_and_plain_text_is_not() {
        assert_eq!(
            escape_controls("CN=plain, O=Acme\nnext"),
            "CN=plain, O=Acme\nnext"
        );
        assert_eq!(
            escape_controls("a\x1b[31mb\x07c\rd\0e\tf\u{9b}g\u{202e}h"),
            "a\\x1b[31mb\\x07c\\x0dd\\x00e\\x09f\\u{9b}g\\u{202e}h"
        );
        let t = table(&["A", "B"], &[vec!["x\x1by".into(), "z".into()]]);
        assert!(!t.contains('\x1b') && t.contains("x\\x1by"), "{t}");
    }
}
