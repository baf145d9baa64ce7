//! What every m2mpki store shares, below the CA ledger and the IN's credential store: the
//! store error with its [`Kind`] (mapped once to exit codes by `ca`, and to HTTP and CoAP
//! codes by the IN), and the PostgreSQL plumbing ([`pg`]) both use.
#![forbid(unsafe_code)]

mod error;
pub mod pg;

pub use error::{Error, Kind, Result};
