//! `apply_restore`: `replace` mode's last step for one entity: the staged
//! rows replace the scope's rows in the target, in one transaction (the
//! store drops the staging table in it), so a failed restore never leaves
//! the scope empty.
//!
//! On success `RestoreApplied` is reported. Running the job again after
//! success (a redelivery) finds the staging table gone and reports zero
//! counts; the coordinator keeps the first report. A permanent failure is
//! reported as `OperationFailed` naming the entity, and the staging table is
//! dropped: the archive still holds the rows, and a new restore stages them
//! again. Retryable failures requeue the job (the transaction rolled back)
//! until its last delivery; shutdown requeues.

use koan_protocol::events::{RestoreApplied, WorkerEvent};
use koan_protocol::jobs::ApplyRestore;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::target::RestoreStore;
use super::{Failure, Outcome, fail_operation, is_last_delivery};
use crate::error::WorkerError;
use crate::events::Events;

/// Runs an `apply_restore` job; see the module documentation.
pub async fn apply_restore<S: RestoreStore, E: Events>(
    store: &S,
    events: &E,
    job: &ApplyRestore,
    delivery_count: u32,
    cancel: &CancellationToken,
) -> Result<Outcome, WorkerError> {
    let entity = &job.entity;
    let Some(staging_table) = job.target.staging_table.as_deref() else {
        let failure = Failure::permanent(
            "no_staging_table",
            format!(
                "entity {}: apply_restore needs the staging table of a replace restore, the job names none",
                entity.name
            ),
        );
        return fail_operation(
            events,
            job.operation_id,
            "apply_restore",
            failure,
            delivery_count,
        )
        .await;
    };
    let applied = tokio::select! {
        biased;
        // Dropping the statement rolls its transaction back.
        () = cancel.cancelled() => {
            info!(operation_id = %job.operation_id, entity = %entity.name, "apply stopped by shutdown, requeueing");
            return Ok(Outcome::Requeue);
        }
        applied = store.apply_staged(entity, &job.target) => applied,
    };
    match applied {
        Ok(outcome) => {
            info!(
                operation_id = %job.operation_id,
                entity = %entity.name,
                staging_table,
                rows_written = outcome.rows_written,
                rows_removed = outcome.rows_removed,
                failures = outcome.failures.len(),
                "staged rows applied"
            );
            events
                .publish(&WorkerEvent::RestoreApplied(RestoreApplied {
                    operation_id: job.operation_id,
                    entity: entity.name.clone(),
                    rows_written: outcome.rows_written,
                    rows_skipped: outcome.rows_skipped,
                    rows_removed: outcome.rows_removed,
                    failures: outcome.failures,
                }))
                .await?;
            Ok(Outcome::Ack)
        }
        Err(error) => {
            let failure = Failure::source(
                &format!(
                    "applying the staged rows of entity {} (table {}.{}, staging {staging_table})",
                    entity.name, entity.schema, entity.table
                ),
                &error,
            );
            let final_failure = !failure.retryable || is_last_delivery(delivery_count);
            let outcome = fail_operation(
                events,
                job.operation_id,
                "apply_restore",
                failure,
                delivery_count,
            )
            .await?;
            if final_failure {
                drop_staging(store, job, staging_table).await;
            }
            Ok(outcome)
        }
    }
}

async fn drop_staging<S: RestoreStore>(store: &S, job: &ApplyRestore, staging_table: &str) {
    if let Err(error) = store.drop_staging(&job.entity, staging_table).await {
        warn!(
            operation_id = %job.operation_id,
            entity = %job.entity.name,
            staging_table,
            %error,
            "dropping the staging table failed; drop it by hand"
        );
    }
}
