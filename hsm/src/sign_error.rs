//! The detailed cause of the last signing failure on this thread.
//!
//! rcgen's `SigningKey::sign` can only return `rcgen::Error::RemoteKeyError`, which says
//! nothing. A key that fails records its real error here, on the signing thread, and the caller
//! that receives `RemoteKeyError` from rcgen takes it back with [`take`].

use std::cell::RefCell;

use crate::Error;

thread_local! {
    static LAST: RefCell<Option<Error>> = const { RefCell::new(None) };
}

/// Records why signing failed on this thread.
pub fn set(e: Error) {
    LAST.with(|l| *l.borrow_mut() = Some(e));
}

/// Takes the recorded cause, if any.
pub fn take() -> Option<Error> {
    LAST.with(|l| l.borrow_mut().take())
}
