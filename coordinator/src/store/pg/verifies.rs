//! Verify reports: progress over the backup's parts, then the verdict.

use chrono::{DateTime, Utc};

use koan_protocol::events::{VerifyDone, VerifyProgress};
use koan_protocol::progress::OperationState;

use crate::store::Applied;
use crate::store::restore_rules::verify_failure;

use super::operations::{OperationRow, fail};

/// Parts and rows checked so far; figures only grow (a late copy changes nothing).
pub(super) fn verify_progress(
    operation: &mut OperationRow,
    report: &VerifyProgress,
    now: DateTime<Utc>,
) -> Applied {
    let record = &mut operation.record;
    let before = (
        record.state,
        record.chunks_done,
        record.chunks_total,
        record.rows_durable,
        record.rows_total,
    );
    record.chunks_total = record.chunks_total.max(report.parts_total);
    record.chunks_done = record.chunks_done.max(report.parts_done);
    record.parts_done = record.chunks_done;
    record.rows_total = record.rows_total.max(report.rows_total);
    record.rows_durable = record.rows_durable.max(report.rows_done);
    record.state = OperationState::Running;
    record.running_since.get_or_insert(now);
    let after = (
        record.state,
        record.chunks_done,
        record.chunks_total,
        record.rows_durable,
        record.rows_total,
    );
    if before == after {
        return Applied::Unchanged("no new verify progress");
    }
    Applied::Changed
}

/// The verdict: whole (completed), or failed naming each bad or missing part.
pub(super) fn verify_done(operation: &mut OperationRow, report: &VerifyDone) -> Applied {
    let record = &mut operation.record;
    record.chunks_total = record.chunks_total.max(report.parts_checked);
    record.chunks_done = record.chunks_done.max(report.parts_checked);
    record.parts_done = record.chunks_done;
    record.rows_total = record.rows_total.max(report.rows);
    record.rows_durable = record.rows_durable.max(report.rows);
    if report.problems.is_empty() {
        record.state = OperationState::Completed;
        return Applied::Changed;
    }
    let error = verify_failure(&report.problems, record.chunks_total);
    record.problems = report.problems.clone();
    fail(operation, error);
    Applied::Changed
}
