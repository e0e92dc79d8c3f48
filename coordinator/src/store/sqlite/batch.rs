//! Group commit: worker reports and chunk claims applied in one `IMMEDIATE`
//! transaction, each inside a savepoint so that one that changes nothing or
//! is invalid is rolled back alone, with one commit (one WAL sync) for all.

use koan_protocol::events::WorkerEvent;

use crate::error::CoordinatorError;
use crate::store::BatchOutcome;

use super::db::Db;
use super::{apply, claims};

/// Where each report starts; released (kept) or rolled back once it is applied.
const SAVEPOINT: &str = "SAVEPOINT koan_report";
const KEEP: &str = "RELEASE SAVEPOINT koan_report";
const UNDO: &str = "ROLLBACK TO SAVEPOINT koan_report; RELEASE SAVEPOINT koan_report";

pub(super) fn apply_batch(
    db: &Db<'_>,
    events: &[WorkerEvent],
) -> Result<Vec<Result<BatchOutcome, CoordinatorError>>, CoordinatorError> {
    let mut outcomes = Vec::with_capacity(events.len());
    let mut kept = false;
    for event in events {
        db.execute_batch("savepoint", SAVEPOINT)?;
        let outcome = match event {
            WorkerEvent::ClaimChunk(claim) => claims::claim(db, claim).map(BatchOutcome::Claim),
            event => apply::apply(db, event).map(BatchOutcome::Applied),
        };
        match outcome {
            Ok(outcome) if db.kept() => {
                db.execute_batch("release savepoint", KEEP)?;
                kept = true;
                outcomes.push(Ok(outcome));
            }
            Ok(outcome) => {
                // It asked for a rollback (it changed nothing): undo it alone.
                db.execute_batch("roll back to savepoint", UNDO)?;
                db.keep();
                outcomes.push(Ok(outcome));
            }
            // Nothing is committed: the caller applies the reports again.
            Err(error) if error.is_retryable() || error.is_transport() => {
                db.discard();
                return Err(error);
            }
            Err(error) => {
                db.execute_batch("roll back to savepoint", UNDO)?;
                db.keep();
                outcomes.push(Err(error));
            }
        }
    }
    if !kept {
        db.discard();
    }
    Ok(outcomes)
}
