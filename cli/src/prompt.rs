//! Asking for a token PIN on the terminal, without echo.

use std::io::{BufRead, Write};

use rustix::termios::{self, LocalModes, OptionalActions};
use zeroize::Zeroizing;

/// Reads a PIN from the controlling terminal; `None` when there is no terminal (scripts must
/// use pin-source= or M2MPKI_PKCS11_PIN).
pub fn pin_from_terminal(token: &str) -> Option<Zeroizing<String>> {
    let tty = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/tty")
        .ok()?;
    let saved = termios::tcgetattr(&tty).ok()?;
    let mut quiet = saved.clone();
    quiet.local_modes.remove(LocalModes::ECHO);
    let mut out = &tty;
    write!(out, "PIN for token `{token}`: ").ok()?;
    out.flush().ok()?;
    termios::tcsetattr(&tty, OptionalActions::Now, &quiet).ok()?;
    let mut line = Zeroizing::new(String::new());
    let read = std::io::BufReader::new(&tty).read_line(&mut line);
    let _ = termios::tcsetattr(&tty, OptionalActions::Now, &saved);
    let _ = writeln!(out);
    read.ok()?;
    let pin = line.trim_end_matches(['\r', '\n']);
    (!pin.is_empty()).then(|| Zeroizing::new(pin.to_owned()))
}
