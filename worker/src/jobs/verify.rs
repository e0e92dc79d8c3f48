//! `verify_backup`: prove an archive whole without restoring it.
//!
//! The manifest must be readable (else `OperationFailed`); a manifest of
//! another format version, or whose totals, chunk row counts or part paths
//! disagree with its own parts, is a problem. Then every part is streamed
//! through [`PartReader`] (bounded memory, whatever the part size) and
//! checked: it exists, its stored size and blake3 match, it decompresses to
//! its end, every line parses, the line count and raw bytes match, its first
//! and last keys are the manifest's `first_key` / `last_key`. For numeric and
//! uuid keys, keys must also be strictly ascending within the part and lie in
//! the chunk's range (`lo ≤ key < hi`): PostgreSQL orders those types by
//! value (uuids bytewise), which the worker can compute. Text keys follow the
//! database's collation, which the worker does not know, so for them only
//! the first and last keys are compared.
//!
//! Verification goes on after a bad part; each problem is one string naming
//! the part's path and what is wrong. `VerifyProgress` is reported at most
//! every `progress_interval`, and `VerifyDone` at the end. A retryable
//! storage error requeues the job (until its last delivery, when it becomes
//! a problem of that part); shutdown requeues.

use std::collections::HashSet;
use std::time::Instant;

use koan_protocol::archive::{KeyRange, Manifest, PartInfo, entity_prefix};
use koan_protocol::events::{VerifyDone, VerifyProgress, WorkerEvent};
use koan_protocol::jobs::VerifyJob;
use koan_protocol::plan::KeyType;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::manifest::{UNSUPPORTED_FORMAT, read_manifest};
use super::{JobSettings, Outcome, fail_operation, is_last_delivery};
use crate::archive_line::parse_line;
use crate::error::WorkerError;
use crate::events::Events;
use crate::part_reader::PartReader;
use crate::storage::Storage;

/// Unparsable lines named one by one per part before the rest are only counted.
const LINE_PROBLEMS_LISTED: u64 = 3;
/// Lines read between two looks at the progress clock.
const LINES_PER_PROGRESS_CHECK: u64 = 4096;

/// Why a verification stopped before its end.
enum Interrupted {
    /// Shutdown: requeue.
    Stopped,
    /// A retryable storage error before the last delivery: requeue.
    Retry(WorkerError),
    /// Reporting progress failed.
    Report(WorkerError),
}

/// Runs a `verify_backup` job; see the module documentation.
pub async fn verify_backup<E: Events>(
    storage: &Storage,
    events: &E,
    settings: &JobSettings,
    job: &VerifyJob,
    delivery_count: u32,
    cancel: &CancellationToken,
) -> Result<Outcome, WorkerError> {
    let manifest = match read_manifest(storage, &job.manifest_path).await {
        Ok(manifest) => manifest,
        Err(failure) if failure.code == UNSUPPORTED_FORMAT => {
            return done(events, job, 0, 0, vec![failure.error]).await;
        }
        Err(failure) => {
            return fail_operation(
                events,
                job.operation_id,
                "verify_backup",
                failure,
                delivery_count,
            )
            .await;
        }
    };
    let mut problems = manifest_problems(&manifest, job);
    let mut run = Run {
        events,
        job,
        settings,
        parts_total: manifest.parts().count() as u64,
        rows_total: manifest.parts().map(|(_, _, part)| part.rows).sum(),
        parts_done: 0,
        rows_done: 0,
        last_report: Instant::now(),
        retry_allowed: !is_last_delivery(delivery_count),
    };
    for (entity, chunk, part) in manifest.parts() {
        let key_type = entity.spec.key_type;
        match run
            .check_part(storage, part, &chunk.range, key_type, cancel)
            .await
        {
            Ok(found) => problems.extend(found),
            Err(Interrupted::Stopped) => {
                info!(operation_id = %job.operation_id, "verify stopped by shutdown, requeueing");
                return Ok(Outcome::Requeue);
            }
            Err(Interrupted::Retry(error)) => {
                warn!(operation_id = %job.operation_id, path = %part.path, %error, "verify interrupted by storage, requeueing");
                return Ok(Outcome::Requeue);
            }
            Err(Interrupted::Report(error)) => return Err(error),
        }
        run.parts_done += 1;
        run.report(false).await?;
    }
    run.report(true).await?;
    done(events, job, run.parts_done, run.rows_done, problems).await
}

async fn done<E: Events>(
    events: &E,
    job: &VerifyJob,
    parts_checked: u64,
    rows: u64,
    problems: Vec<String>,
) -> Result<Outcome, WorkerError> {
    info!(operation_id = %job.operation_id, backup_id = %job.backup_id, parts_checked, rows, problems = problems.len(), "backup verified");
    events
        .publish(&WorkerEvent::VerifyDone(VerifyDone {
            operation_id: job.operation_id,
            parts_checked,
            rows,
            problems,
        }))
        .await?;
    Ok(Outcome::Ack)
}

/// What the manifest says against itself.
fn manifest_problems(manifest: &Manifest, job: &VerifyJob) -> Vec<String> {
    let path = &job.manifest_path;
    let mut problems = Vec::new();
    if manifest.backup_id != job.backup_id {
        problems.push(format!(
            "{path}: manifest of backup {}, not {}",
            manifest.backup_id, job.backup_id
        ));
    }
    let parts = || manifest.parts().map(|(_, _, part)| part);
    let sums = [
        (
            "entities",
            manifest.entities.len() as u64,
            manifest.totals.entities,
        ),
        (
            "chunks",
            manifest
                .entities
                .iter()
                .map(|entity| entity.chunks.len() as u64)
                .sum(),
            manifest.totals.chunks,
        ),
        ("parts", parts().count() as u64, manifest.totals.parts),
        (
            "rows",
            parts().map(|part| part.rows).sum(),
            manifest.totals.rows,
        ),
        (
            "raw bytes",
            parts().map(|part| part.raw_bytes).sum(),
            manifest.totals.raw_bytes,
        ),
        (
            "compressed bytes",
            parts().map(|part| part.compressed_bytes).sum(),
            manifest.totals.compressed_bytes,
        ),
    ];
    for (what, counted, recorded) in sums {
        if counted != recorded {
            problems.push(format!(
                "{path}: totals record {recorded} {what}, its parts add up to {counted}"
            ));
        }
    }
    let mut seen = HashSet::new();
    for entity in &manifest.entities {
        let prefix = entity_prefix(&entity.spec, &manifest.plan.plan_id, manifest.backup_id)
            .map(|prefix| format!("{prefix}/"));
        for chunk in &entity.chunks {
            let rows: u64 = chunk.parts.iter().map(|part| part.rows).sum();
            if rows != chunk.rows {
                problems.push(format!(
                    "{path}: chunk {} of entity {} records {} rows, its parts hold {rows}",
                    chunk.chunk, entity.spec.name, chunk.rows
                ));
            }
            for part in &chunk.parts {
                if !prefix
                    .as_ref()
                    .is_ok_and(|prefix| part.path.starts_with(prefix))
                {
                    problems.push(format!(
                        "{}: not under the folder of entity {}",
                        part.path, entity.spec.name
                    ));
                }
                if !seen.insert(part.path.as_str()) {
                    problems.push(format!("{}: listed twice in the manifest", part.path));
                }
            }
        }
    }
    problems
}

/// How keys of an entity compare, for the order and range checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KeyOrder {
    /// `bigint`, `integer`: by numeric value.
    Numeric,
    /// `uuid`: bytewise, as PostgreSQL compares them.
    Uuid,
    /// `text` (or unknown): the database's collation; not checked.
    Unchecked,
}

impl KeyOrder {
    fn of(key_type: Option<KeyType>) -> Self {
        match key_type {
            Some(KeyType::Bigint | KeyType::Integer) => Self::Numeric,
            Some(KeyType::Uuid) => Self::Uuid,
            Some(KeyType::Text) | None => Self::Unchecked,
        }
    }

    /// The key as a comparable value; `None` when it is not of the type.
    fn value(self, key: &str) -> Option<i128> {
        match self {
            Self::Numeric => key.parse::<i64>().ok().map(i128::from),
            // Offset so that the whole u128 range keeps its order in i128.
            Self::Uuid => uuid::Uuid::parse_str(key)
                .ok()
                .map(|uuid| (uuid.as_u128() ^ (1 << 127)) as i128),
            Self::Unchecked => None,
        }
    }
}

struct Run<'a, E> {
    events: &'a E,
    job: &'a VerifyJob,
    settings: &'a JobSettings,
    parts_total: u64,
    rows_total: u64,
    parts_done: u64,
    rows_done: u64,
    last_report: Instant,
    retry_allowed: bool,
}

impl<E: Events> Run<'_, E> {
    /// Reads one part through and returns its problems.
    async fn check_part(
        &mut self,
        storage: &Storage,
        part: &PartInfo,
        range: &KeyRange,
        key_type: Option<KeyType>,
        cancel: &CancellationToken,
    ) -> Result<Vec<String>, Interrupted> {
        let keys = KeyOrder::of(key_type);
        let path = part.path.as_str();
        let mut problems = Vec::new();
        let mut reader = match PartReader::open(storage, path).await {
            Ok(reader) => reader,
            Err(error) if error.is_not_found() => return Ok(vec![format!("{path}: missing")]),
            Err(error) => return self.unreadable(path, error),
        };
        let bounds = match (keys, range_bounds(keys, range)) {
            (KeyOrder::Unchecked, _) => None,
            (_, Ok(bounds)) => Some(bounds),
            (_, Err(bound)) => {
                problems.push(format!(
                    "{path}: chunk range bound '{bound}' is not a valid key"
                ));
                None
            }
        };
        let mut unparsable = 0_u64;
        let mut order_reported = false;
        let mut range_reported = false;
        // Keys of the first line and of the last line that parsed, with its number.
        let mut first_key: Option<String> = None;
        let mut last_key = String::new();
        let mut last_parsed = 0_u64;
        let mut previous: Option<i128> = None;
        let read_error = loop {
            let next = tokio::select! {
                biased;
                () = cancel.cancelled() => return Err(Interrupted::Stopped),
                next = reader.next_line() => next,
            };
            let line = match next {
                Ok(Some(line)) => line,
                Ok(None) => break None,
                Err(error) => break Some(error),
            };
            let number = line.number;
            match parse_line(line.bytes, key_type) {
                Err(reason) => {
                    unparsable += 1;
                    if unparsable <= LINE_PROBLEMS_LISTED {
                        problems.push(format!("{path}: line {number} does not parse: {reason}"));
                    }
                }
                Ok((_, parsed)) => {
                    let value = keys.value(&parsed.key);
                    if keys != KeyOrder::Unchecked && value.is_none() && !order_reported {
                        order_reported = true;
                        problems.push(format!(
                            "{path}: line {number}: key '{}' is not a valid key of its type",
                            parsed.key.escape_default()
                        ));
                    }
                    if let (Some(value), Some(before)) = (value, previous)
                        && value <= before
                        && !order_reported
                    {
                        order_reported = true;
                        problems.push(format!(
                            "{path}: keys not strictly ascending at line {number} ('{}' after '{last_key}')",
                            parsed.key
                        ));
                    }
                    if let (Some(value), Some((lo, hi))) = (value, bounds)
                        && (lo.is_some_and(|lo| value < lo) || hi.is_some_and(|hi| value >= hi))
                        && !range_reported
                    {
                        range_reported = true;
                        problems.push(format!(
                            "{path}: line {number}: key '{}' outside the chunk's range [{}, {})",
                            parsed.key,
                            range.lo.as_deref().unwrap_or("-inf"),
                            range.hi.as_deref().unwrap_or("+inf")
                        ));
                    }
                    previous = value.or(previous);
                    if number == 1 {
                        first_key = Some(parsed.key.clone());
                    }
                    last_key = parsed.key;
                    last_parsed = number;
                }
            }
            self.rows_done += 1;
            if number % LINES_PER_PROGRESS_CHECK == 0 {
                self.report(false).await.map_err(Interrupted::Report)?;
            }
        };
        if unparsable > LINE_PROBLEMS_LISTED {
            problems.push(format!("{path}: {unparsable} lines in all do not parse"));
        }
        let digest = match read_error {
            Some(WorkerError::CorruptPart { reason, .. }) => {
                problems.push(format!("{path}: corrupt: {reason}"));
                reader.finish().await
            }
            Some(error) => Err(error),
            None => reader.finish().await,
        };
        let digest = match digest {
            Ok(digest) => digest,
            Err(error) => return self.unreadable(path, error),
        };
        for mismatch in digest.mismatches(part) {
            problems.push(format!("{path}: {}", mismatch.detail));
        }
        // An unparsable first or last line is reported already; its key is unknown.
        if digest.complete {
            let checks = [
                (
                    "first",
                    &part.first_key,
                    first_key.as_ref(),
                    digest.lines == 0 || first_key.is_some(),
                ),
                (
                    "last",
                    &part.last_key,
                    (last_parsed > 0).then_some(&last_key),
                    last_parsed == digest.lines,
                ),
            ];
            for (which, expected, found, known) in checks {
                if let Some(expected) = expected
                    && known
                    && found != Some(expected)
                {
                    problems.push(format!(
                        "{path}: {which} key mismatch: expected '{expected}', found '{}'",
                        found.map_or("none", String::as_str)
                    ));
                }
            }
        }
        Ok(problems)
    }

    /// A part that storage cannot deliver: requeue when that may pass, else a problem.
    fn unreadable(&self, path: &str, error: WorkerError) -> Result<Vec<String>, Interrupted> {
        if error.is_retryable() && self.retry_allowed {
            return Err(Interrupted::Retry(error));
        }
        Ok(vec![format!("{path}: unreadable: {error}")])
    }

    /// Reports progress if the interval has passed (or always when `last`).
    async fn report(&mut self, last: bool) -> Result<(), WorkerError> {
        if !last && self.last_report.elapsed() < self.settings.progress_interval {
            return Ok(());
        }
        self.last_report = Instant::now();
        self.events
            .publish(&WorkerEvent::VerifyProgress(VerifyProgress {
                operation_id: self.job.operation_id,
                parts_done: self.parts_done,
                parts_total: self.parts_total,
                rows_done: self.rows_done,
                rows_total: self.rows_total,
            }))
            .await
    }
}

/// The chunk's bounds as comparable values, or the bound that is not a key.
fn range_bounds(keys: KeyOrder, range: &KeyRange) -> Result<(Option<i128>, Option<i128>), String> {
    let bound = |bound: &Option<String>| match bound {
        None => Ok(None),
        Some(text) => keys.value(text).map(Some).ok_or_else(|| text.clone()),
    };
    Ok((bound(&range.lo)?, bound(&range.hi)?))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
#[path = "verify_tests.rs"]
mod tests;
