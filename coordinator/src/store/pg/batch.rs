//! Group commit: worker reports and chunk claims applied in one transaction,
//! each inside a savepoint so that one that changes nothing or is invalid is
//! rolled back alone, with one commit (one WAL flush) for all of them.

use koan_protocol::events::WorkerEvent;

use crate::error::CoordinatorError;
use crate::store::BatchOutcome;

use super::PgStateStore;
use super::db::Db;
use super::{apply, claims};

/// Where each report starts; released (kept) or rolled back once it is applied.
const SAVEPOINT: &str = "SAVEPOINT koan_report";
const KEEP: &str = "RELEASE SAVEPOINT koan_report";
const UNDO: &str = "ROLLBACK TO SAVEPOINT koan_report; RELEASE SAVEPOINT koan_report";

pub(super) async fn apply_batch(
    store: &PgStateStore,
    events: &[WorkerEvent],
) -> Result<Vec<Result<BatchOutcome, CoordinatorError>>, CoordinatorError> {
    let mut client = store.client().await?;
    let db = Db::begin(&mut client, store).await?;
    let mut outcomes = Vec::with_capacity(events.len());
    let mut kept = false;
    for event in events {
        db.batch_execute("savepoint", SAVEPOINT).await?;
        let outcome = match event {
            WorkerEvent::ClaimChunk(claim) => claims::claim_in(&db, claim)
                .await
                .map(|claim| (claim.granted, BatchOutcome::Claim(claim))),
            event => apply::apply_in(&db, event)
                .await
                .map(|(applied, keep)| (keep, BatchOutcome::Applied(applied))),
        };
        match outcome {
            Ok((true, outcome)) => {
                db.batch_execute("release savepoint", KEEP).await?;
                kept = true;
                outcomes.push(Ok(outcome));
            }
            Ok((false, outcome)) => {
                db.batch_execute("roll back to savepoint", UNDO).await?;
                outcomes.push(Ok(outcome));
            }
            // Nothing is committed: the caller applies the reports again.
            Err(error) if error.is_retryable() || error.is_transport() => return Err(error),
            Err(error) => {
                db.batch_execute("roll back to savepoint", UNDO).await?;
                outcomes.push(Err(error));
            }
        }
    }
    if kept {
        db.commit().await?;
    }
    Ok(outcomes)
}
