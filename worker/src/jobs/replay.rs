//! `replay_rows`: write again the lines a restore could not write, once
//! their cause is fixed, and say which diagnostics are now resolved.
//!
//! Every line is parsed as an import parses a part's lines; those that
//! parse are written in one import transaction with the job's target
//! (`replace` replays as `overwrite`: the swap is done, there is no staging
//! table any more). Line `n` of the transaction is the job's line at index
//! `n - 1`, which is how the store's failures are traced back to their
//! diagnostics (by key when a failure carries no line number). Lines that do
//! not parse, or fail again, are reported in `ReplayDone.failed` with the new
//! reason; their `part` and `line_no` are left empty, the diagnostic keeps
//! its original position. The store's statements are idempotent, so a
//! replay repeated after a redelivery writes no duplicates.

use std::collections::BTreeSet;

use koan_protocol::commands::RestoreMode;
use koan_protocol::events::{ReplayDone, ReplayFailure, RowFailure, WorkerEvent};
use koan_protocol::jobs::{ReplayJob, RestoreTarget};
use koan_source::StagingForm;
use tracing::{info, warn};

use super::target::{ImportWriter, RestoreStore};
use super::{Failure, Outcome, fail_operation};
use crate::archive_line::{ParsedLine, parse_line, unparsable};
use crate::error::WorkerError;
use crate::events::Events;

/// The `part` the store is given for replayed lines.
pub const REPLAY_PART: &str = "replay";

/// Runs a `replay_rows` job; see the module documentation.
pub async fn replay_rows<S: RestoreStore, E: Events>(
    store: &S,
    events: &E,
    job: &ReplayJob,
    delivery_count: u32,
) -> Result<Outcome, WorkerError> {
    let mut failed = Vec::new();
    let mut parsed: Vec<(usize, &str, ParsedLine)> = Vec::new();
    for (index, replayed) in job.lines.iter().enumerate() {
        let bytes = replayed.line.trim_end_matches(['\n', '\r']).as_bytes();
        match parse_line(bytes, job.entity.key_type) {
            Ok((raw, line)) => parsed.push((index, raw, line)),
            Err(reason) => failed.push(ReplayFailure {
                diagnostic_id: replayed.diagnostic_id,
                failure: unparsable(None, None, reason, bytes),
            }),
        }
    }
    let store_failures = if parsed.is_empty() {
        Vec::new()
    } else {
        match write(store, job, &parsed).await {
            Ok(failures) => failures,
            Err(failure) => {
                return fail_operation(
                    events,
                    job.operation_id,
                    "replay_rows",
                    failure,
                    delivery_count,
                )
                .await;
            }
        }
    };
    let mut failed_again = BTreeSet::new();
    for failure in store_failures {
        let indexes = trace_failure(&failure, &parsed);
        if indexes.is_empty() {
            warn!(operation_id = %job.operation_id, code = %failure.code, key = ?failure.key, "a replay failure matches no replayed line");
        }
        for index in indexes {
            if failed_again.insert(index) {
                failed.push(ReplayFailure {
                    diagnostic_id: job.lines[index].diagnostic_id,
                    failure: RowFailure {
                        part: None,
                        line_no: None,
                        ..failure.clone()
                    },
                });
            }
        }
    }
    let resolved: Vec<i64> = parsed
        .iter()
        .filter(|(index, _, _)| !failed_again.contains(index))
        .map(|(index, _, _)| job.lines[*index].diagnostic_id)
        .collect();
    info!(
        operation_id = %job.operation_id,
        restore_id = %job.restore_id,
        entity = %job.entity.name,
        resolved = resolved.len(),
        failed = failed.len(),
        "rows replayed"
    );
    events
        .publish(&WorkerEvent::ReplayDone(ReplayDone {
            operation_id: job.operation_id,
            resolved,
            failed,
        }))
        .await?;
    Ok(Outcome::Ack)
}

/// Writes the parsed lines in one transaction; returns the rows that failed.
async fn write<S: RestoreStore>(
    store: &S,
    job: &ReplayJob,
    parsed: &[(usize, &str, ParsedLine)],
) -> Result<Vec<RowFailure>, Failure> {
    let context = || {
        format!(
            "replaying {} rows of entity {} (table {}.{})",
            parsed.len(),
            job.entity.name,
            job.entity.schema,
            job.entity.table
        )
    };
    let target = replay_target(&job.target);
    let mut session = store
        .begin_import(&job.entity, &target, StagingForm::Text)
        .await
        .map_err(|error| Failure::source(&context(), &error))?;
    for (index, raw, line) in parsed {
        let line_no = *index as u64 + 1;
        if let Err(error) = session
            .push(&line.import_line(line_no, REPLAY_PART, raw))
            .await
        {
            session.abort().await;
            return Err(Failure::source(&context(), &error));
        }
    }
    let outcome = session
        .commit()
        .await
        .map_err(|error| Failure::source(&context(), &error))?;
    Ok(outcome.failures)
}

/// The target replayed rows are written to: `replace` becomes `overwrite`.
fn replay_target(target: &RestoreTarget) -> RestoreTarget {
    match target.mode {
        RestoreMode::Replace => RestoreTarget {
            mode: RestoreMode::Overwrite,
            target_scope: target.target_scope.clone(),
            staging_table: None,
        },
        _ => target.clone(),
    }
}

/// Indexes (into the job's lines) of the replayed lines a store failure is about.
fn trace_failure(failure: &RowFailure, parsed: &[(usize, &str, ParsedLine)]) -> Vec<usize> {
    if let Some(line_no) = failure.line_no
        && let Some((index, _, _)) = parsed
            .iter()
            .find(|(index, _, _)| *index as u64 + 1 == line_no)
    {
        return vec![*index];
    }
    match &failure.key {
        Some(key) => parsed
            .iter()
            .filter(|(_, _, line)| &line.key == key)
            .map(|(index, _, _)| *index)
            .collect(),
        None => Vec::new(),
    }
}
