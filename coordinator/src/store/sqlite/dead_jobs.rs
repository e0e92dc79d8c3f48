//! Dead-lettered jobs: an export chunk fails if it is still at the job's
//! attempt; any other job is applied as the failure report its worker would
//! have sent (see `store::dead_jobs`).

use tracing::{debug, warn};

use koan_protocol::jobs::{ExportChunk, Job};
use koan_protocol::progress::OperationState;

use crate::error::CoordinatorError;
use crate::store::Applied;
use crate::store::dead_jobs::{DEAD_LETTERED, dead_job_error, dead_job_report};

use super::apply::{apply, save_if_changed};
use super::chunks;
use super::db::Db;
use super::operations::read_operation;

pub(super) fn fail_dead_job(
    db: &Db<'_>,
    job: &Job,
    reason: &str,
) -> Result<Applied, CoordinatorError> {
    match job {
        Job::ExportChunk(export) => fail_dead_export(db, job, export, reason),
        other => match dead_job_report(other, reason) {
            Some(report) => apply(db, &report),
            None => {
                debug!(operation_id = %other.operation_id(), reason, "dead-lettered discard job: nothing to fail");
                db.discard();
                Ok(Applied::Unchanged("nothing to fail"))
            }
        },
    }
}

fn fail_dead_export(
    db: &Db<'_>,
    job: &Job,
    export: &ExportChunk,
    reason: &str,
) -> Result<Applied, CoordinatorError> {
    let Some(mut operation) = read_operation(db, export.operation_id)? else {
        db.discard();
        return Ok(Applied::Unchanged("unknown operation"));
    };
    if operation.record.state != OperationState::Running {
        db.discard();
        return Ok(Applied::Unchanged("operation is not running"));
    }
    let error = dead_job_error(job, reason);
    let applied = chunks::fail_at_attempt(
        db,
        &mut operation,
        &export.entity.name,
        export.chunk,
        export.attempt,
        DEAD_LETTERED,
        &error,
    )?;
    if applied == Applied::Changed {
        warn!(operation_id = %export.operation_id, entity = %export.entity.name, chunk = export.chunk,
            attempt = export.attempt, reason, "export job dead-lettered: chunk failed");
    }
    save_if_changed(db, &mut operation, applied)
}
