//! Printing results and errors, and mapping errors to the documented exit codes.

use std::io::Write;

use m2mpki_ca::ErrorKind;

/// An error in how the command line was used (exit 2).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

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
        if cause
            .downcast_ref::<crate::bootstrap_cmd::Denied>()
            .is_some()
        {
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

/// Prints the whole error chain on one line (or as JSON on stderr with `--json`).
pub fn print_error(err: &anyhow::Error, code: u8, json: bool) {
    let message = err
        .chain()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(": ");
    if json {
        let doc = serde_json::json!({ "error": message, "exit_code": code });
        eprintln!("{doc}");
    } else {
        eprintln!("m2mpki: error: {message}");
    }
}

/// Writes text to stdout.
pub fn emit(text: &str) -> anyhow::Result<()> {
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
    emit(&serde_json::to_string_pretty(value)?)
}

/// Formats rows as an aligned table.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
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
