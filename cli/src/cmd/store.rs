//! `m2mpki store`: moving the CA store between backends.

use anyhow::Result;
use m2mpki_ca::audit::ChainVerifier;
use m2mpki_ca::{Error, Item, StoreLocation};

use crate::output::{emit, emit_json, UsageError};

/// How many items may wait between the reading and the writing side.
const QUEUE: usize = 1024;

/// Copies `from` into the empty store `to`: the source is read in a thread and streamed into
/// one import transaction; its audit chain is checked on the way (a broken chain aborts the
/// import, so nothing lands) and the destination's again afterwards.
pub(crate) fn migrate(json: bool, from: &StoreLocation, to: &StoreLocation) -> Result<()> {
    if from == to {
        return Err(UsageError("--from and --to name the same store".into()).into());
    }
    let source = from.open()?;
    let destination = to.open()?;
    let (tx, rx) = std::sync::mpsc::sync_channel::<m2mpki_ca::Result<Item>>(QUEUE);
    let mut source_chain = ChainVerifier::default();
    let (exported, imported) = std::thread::scope(|scope| {
        let reader = scope.spawn(|| {
            let mut n = 0u64;
            let done = source.export(&mut |item| {
                n += 1;
                tx.send(Ok(item))
                    .map_err(|_| Error::Internal("the import ended early".into()))
            });
            if let Err(e) = done {
                // The writer rolls back when it meets the error.
                let _ = tx.send(Err(e));
            }
            drop(tx);
            n
        });
        let mut items = rx.into_iter().map(|item| {
            let item = item?;
            if let Item::Audit(entry) = &item {
                source_chain.check(entry)?;
            }
            Ok(item)
        });
        let imported = destination.import(&mut items);
        drop(items);
        let exported = reader
            .join()
            .map_err(|_| Error::Internal("the export thread panicked".into()));
        (exported, imported)
    });
    let imported = imported?;
    let exported = exported?;
    if exported != imported {
        return Err(Error::Store(format!(
            "read {exported} items from {} but wrote {imported} to {}",
            source.backend(),
            destination.backend()
        ))
        .into());
    }
    let mut copied_chain = ChainVerifier::default();
    destination.audit_log(&mut |entry| copied_chain.check(&entry))?;
    if copied_chain.count() != source_chain.count() {
        return Err(Error::Store(format!(
            "the audit log at {} has {} entries, the source {}",
            destination.backend(),
            copied_chain.count(),
            source_chain.count()
        ))
        .into());
    }
    let (from_name, to_name) = (source.backend(), destination.backend());
    if json {
        emit_json(&serde_json::json!({
            "from": from_name,
            "to": to_name,
            "items": imported,
            "audit_entries": copied_chain.count(),
            "audit_verified": true,
        }))
    } else {
        emit(&format!(
            "copied {imported} items from {from_name} to {to_name}; the audit log's {} entries verify at the destination",
            copied_chain.count()
        ))
    }
}
