//! Dead-lettered jobs: an export chunk fails if it is still at the job's
//! attempt; any other job is applied as the failure report its worker would
//! have sent (see `store::dead_jobs`).

use tracing::{debug, warn};

use koan_protocol::jobs::{ExportChunk, Job};
use koan_protocol::progress::OperationState;

use crate::error::CoordinatorError;
use crate::store::Applied;
use crate::store::dead_jobs::{DEAD_LETTERED, dead_job_error, dead_job_report};

use super::PgStateStore;
use super::db::Db;
use super::operations::{lock_operation, save_operation};
use super::{apply, chunks};

pub(super) async fn fail_dead_job(
    store: &PgStateStore,
    job: &Job,
    reason: &str,
) -> Result<Applied, CoordinatorError> {
    match job {
        Job::ExportChunk(export) => fail_dead_export(store, job, export, reason).await,
        other => match dead_job_report(other, reason) {
            Some(report) => apply::apply(store, &report).await,
            None => {
                debug!(operation_id = %other.operation_id(), reason, "dead-lettered discard job: nothing to fail");
                Ok(Applied::Unchanged("nothing to fail"))
            }
        },
    }
}

async fn fail_dead_export(
    store: &PgStateStore,
    job: &Job,
    export: &ExportChunk,
    reason: &str,
) -> Result<Applied, CoordinatorError> {
    let mut client = store.client().await?;
    let db = Db::begin(&mut client, store).await?;
    let Some(mut operation) = lock_operation(&db, export.operation_id).await? else {
        return Ok(Applied::Unchanged("unknown operation"));
    };
    if operation.record.state != OperationState::Running {
        return Ok(Applied::Unchanged("operation is not running"));
    }
    let error = dead_job_error(job, reason);
    let applied = chunks::fail_at_attempt(
        &db,
        &mut operation,
        &export.entity.name,
        export.chunk,
        export.attempt,
        DEAD_LETTERED,
        &error,
    )
    .await?;
    if applied == Applied::Changed {
        warn!(operation_id = %export.operation_id, entity = %export.entity.name, chunk = export.chunk,
            attempt = export.attempt, reason, "export job dead-lettered: chunk failed");
        save_operation(&db, &mut operation).await?;
        db.commit().await?;
    }
    Ok(applied)
}
