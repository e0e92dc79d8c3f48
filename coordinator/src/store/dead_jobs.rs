//! Jobs RabbitMQ dead-lettered: what each one means for its operation.
//!
//! A job reaches `koan.dead` when it was delivered `JOB_DELIVERY_LIMIT` times
//! without being acked: every worker that took it crashed, hung past the
//! consumer timeout or lost its connection before settling it. Nobody will
//! report on it any more, so the coordinator reports in its place: the unit
//! the job stood for fails, and with it the operation, with an error that
//! says so. A stale job (its unit already done, or superseded by a later
//! attempt) changes nothing, so a dead-lettered duplicate is harmless.
//!
//! Export chunks are fenced by attempt (the store decides); every other job
//! becomes the final failure report its worker would have sent.

use koan_protocol::events::{
    EntityFailed, FinalizeFailed, ImportFailed, OperationFailed, WorkerEvent,
};
use koan_protocol::jobs::Job;
use koan_protocol::topology::JOB_DELIVERY_LIMIT;

/// The code every failure caused by a dead-lettered job carries.
pub const DEAD_LETTERED: &str = "dead_lettered";

/// The error text of a dead-lettered job: what it was and why it died.
pub fn dead_job_error(job: &Job, reason: &str) -> String {
    format!(
        "its {} job was dead-lettered ({reason}): no worker finished it in {JOB_DELIVERY_LIMIT} deliveries",
        koan_protocol::codec::Message::kind(job)
    )
}

/// The final failure report a worker would have sent for `job`; `None` for an
/// export chunk (fenced by attempt in the store) and a discard (nothing to fail).
pub fn dead_job_report(job: &Job, reason: &str) -> Option<WorkerEvent> {
    let error = dead_job_error(job, reason);
    let code = DEAD_LETTERED.to_string();
    match job {
        Job::PlanEntity(job) => Some(WorkerEvent::EntityFailed(EntityFailed {
            operation_id: job.operation_id,
            entity: job.entity.name.clone(),
            code,
            error,
        })),
        Job::Finalize(job) => Some(WorkerEvent::FinalizeFailed(FinalizeFailed {
            operation_id: job.operation_id,
            code,
            error,
            retryable: false,
        })),
        Job::ImportPart(job) => Some(WorkerEvent::ImportFailed(ImportFailed {
            operation_id: job.operation_id,
            entity: job.entity.name.clone(),
            unit: job.unit,
            code,
            error,
            retryable: false,
        })),
        Job::PlanRestore(_) | Job::ApplyRestore(_) | Job::Replay(_) | Job::Verify(_) => {
            Some(WorkerEvent::OperationFailed(OperationFailed {
                operation_id: job.operation_id(),
                code,
                error,
            }))
        }
        Job::ExportChunk(_) | Job::Discard(_) => None,
    }
}
