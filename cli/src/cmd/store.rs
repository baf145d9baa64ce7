//! `m2mpki store`: moving the CA store between backends.

use anyhow::Result;
use m2mpki_ca::audit::ChainVerifier;
use m2mpki_ca::consistency::StoreCheck;
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
    let copied = copy(from, to)?;
    let (from_name, to_name) = (&copied.from, &copied.to);
    if json {
        emit_json(&serde_json::json!({
            "from": from_name,
            "to": to_name,
            "items": copied.items,
            "audit_entries": copied.audit_entries,
            "audit_verified": true,
        }))
    } else {
        emit(&format!(
            "copied {} items from {from_name} to {to_name}; the audit log's {} entries verify at the destination",
            copied.items, copied.audit_entries
        ))
    }
}

/// What [`copy`] did.
pub(crate) struct Copied {
    pub(crate) from: String,
    pub(crate) to: String,
    pub(crate) items: u64,
    pub(crate) audit_entries: u64,
}

/// Copies `from` into the empty store `to` (see [`migrate`]).
pub(crate) fn copy(from: &StoreLocation, to: &StoreLocation) -> Result<Copied> {
    let source = from.open()?;
    let destination = to.open()?;
    let (tx, rx) = std::sync::mpsc::sync_channel::<m2mpki_ca::Result<Item>>(QUEUE);
    let mut source_check = StoreCheck::default();
    let mut finished = None;
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
        // Every item is checked on the way; a source whose ledger and log disagree (a broken
        // chain, a record changed after it was logged) ends the stream with an error, so the
        // import rolls back and nothing lands.
        let mut received = rx.into_iter();
        let mut items = std::iter::from_fn(|| match received.next() {
            Some(item) => Some(item.and_then(|item| {
                source_check.item(&item)?;
                Ok(item)
            })),
            None if finished.is_none() => {
                let report = std::mem::take(&mut source_check).finish();
                let agrees = report.agrees();
                let err = (!agrees).then(|| Error::LedgerDiffers {
                    differences: report.differences,
                    findings: report.findings.clone(),
                });
                finished = Some(report);
                err.map(Err)
            }
            None => None,
        });
        let imported = destination.import(&mut items);
        // The reader stops sending once the receiver is gone (an import that ended early).
        drop(received);
        let exported = reader
            .join()
            .map_err(|_| Error::Internal("the export thread panicked".into()));
        (exported, imported)
    });
    let imported = imported?;
    let exported = exported?;
    let source_report =
        finished.ok_or_else(|| Error::Internal("the import ended before the source did".into()))?;
    if exported != imported {
        return Err(Error::corrupt(format!(
            "read {exported} items from {} but wrote {imported} to {}",
            source.backend(),
            destination.backend()
        ))
        .into());
    }
    let mut copied_chain = ChainVerifier::default();
    destination.audit_log(&mut |entry| copied_chain.check(&entry))?;
    if copied_chain.count() != source_report.entries {
        return Err(Error::corrupt(format!(
            "the audit log at {} has {} entries, the source {}",
            destination.backend(),
            copied_chain.count(),
            source_report.entries
        ))
        .into());
    }
    Ok(Copied {
        from: source.backend(),
        to: destination.backend(),
        items: imported,
        audit_entries: copied_chain.count(),
    })
}
