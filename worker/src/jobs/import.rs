//! `import_part`: stream one archived part into the target, in one
//! transaction, and commit it only if the part is exactly what the manifest
//! describes.
//!
//! 1. Open the part ([`PartReader`]); a missing object fails the part
//!    (`missing_part`), a stored size other than the manifest's fails it at
//!    once (`size_mismatch`), before a transaction is opened.
//! 2. Open the import transaction and push every line that parses; a line
//!    that does not is kept aside as an `unparsable_line` diagnostic with its
//!    raw text (at most [`MAX_UNPARSABLE_LINES`] / [`MAX_UNPARSABLE_BYTES`]
//!    per part, beyond which the part fails as `too_many_failures`).
//! 3. At the end, compare what was read with the manifest: stored size,
//!    blake3 of the stored bytes, complete decompression, rows, raw bytes.
//!    Any difference aborts the transaction, so nothing from the part is
//!    written, and fails the part (`size_mismatch`, `hash_mismatch`,
//!    `corrupt_part`, `row_count_mismatch`), never retryable.
//! 4. Otherwise commit and report `PartImported` with the rows written and
//!    skipped and every isolated failure (parse failures first).
//!
//! A `replace` part is first loaded typed (into the restore's load table,
//! when it has one); if the source refuses a row of it that way
//! (`SourceError::RowsRefused`: a key not in canonical form, a document
//! `jsonb` refuses), nothing of it was written and the part is read again and
//! staged as text, where the apply judges each row on its own.
//!
//! Importing a part twice is harmless: the store's statements are
//! idempotent (upserts keyed by the entity key). Source errors that may pass
//! (connection lost, serialization failure) are reported retryable and the
//! job is requeued, except at its last delivery. Shutdown aborts the
//! transaction at a line boundary and requeues.

use koan_protocol::events::{ImportFailed, PartImported, RowFailure, WorkerEvent};
use koan_protocol::jobs::ImportPart;
use koan_source::{SourceError, StagingForm};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::target::{ImportWriter, RestoreStore};
use super::{Failure, Outcome, is_last_delivery};
use crate::archive_line::{parse_line, unparsable};
use crate::error::WorkerError;
use crate::events::Events;
use crate::part_reader::PartReader;
use crate::storage::Storage;

/// Unparsable lines kept per part before the part is failed as a whole.
pub const MAX_UNPARSABLE_LINES: usize = 10_000;
/// Raw bytes of unparsable lines kept per part before the part is failed as a whole.
pub const MAX_UNPARSABLE_BYTES: usize = 32 * 1024 * 1024;

/// What a committed import reports.
struct Imported {
    rows_written: u64,
    rows_skipped: u64,
    failures: Vec<RowFailure>,
    raw_bytes: u64,
}

/// Why an import did not commit.
enum NotImported {
    /// The worker is shutting down: requeue.
    Stopped,
    /// Report and requeue or ack.
    Failed(Failure),
}

impl From<Failure> for NotImported {
    fn from(failure: Failure) -> Self {
        Self::Failed(failure)
    }
}

/// Why one attempt at a part did not commit.
enum Unstaged {
    /// As the import as a whole.
    Not(NotImported),
    /// The part cannot be loaded typed (nothing of it was written): stage it as text.
    Refused(String),
}

impl From<Failure> for Unstaged {
    fn from(failure: Failure) -> Self {
        Self::Not(NotImported::Failed(failure))
    }
}

/// Runs an `import_part` job; see the module documentation.
pub async fn import_part<S: RestoreStore, E: Events>(
    store: &S,
    storage: &Storage,
    events: &E,
    job: &ImportPart,
    delivery_count: u32,
    cancel: &CancellationToken,
) -> Result<Outcome, WorkerError> {
    match import(store, storage, job, cancel).await {
        Ok(imported) => {
            info!(
                operation_id = %job.operation_id,
                entity = %job.entity.name,
                unit = job.unit,
                path = %job.part.path,
                rows_written = imported.rows_written,
                rows_skipped = imported.rows_skipped,
                failures = imported.failures.len(),
                "part imported"
            );
            events
                .publish(&WorkerEvent::PartImported(PartImported {
                    operation_id: job.operation_id,
                    entity: job.entity.name.clone(),
                    unit: job.unit,
                    rows_written: imported.rows_written,
                    rows_skipped: imported.rows_skipped,
                    failures: imported.failures,
                    raw_bytes: imported.raw_bytes,
                }))
                .await?;
            Ok(Outcome::Ack)
        }
        Err(NotImported::Stopped) => {
            info!(operation_id = %job.operation_id, path = %job.part.path, "import stopped by shutdown, requeueing");
            Ok(Outcome::Requeue)
        }
        Err(NotImported::Failed(failure)) => {
            let retryable = failure.retryable && !is_last_delivery(delivery_count);
            warn!(
                operation_id = %job.operation_id,
                entity = %job.entity.name,
                unit = job.unit,
                path = %job.part.path,
                code = %failure.code,
                delivery_count,
                retryable,
                error = %failure.error,
                "part import failed"
            );
            events
                .publish(&WorkerEvent::ImportFailed(ImportFailed {
                    operation_id: job.operation_id,
                    entity: job.entity.name.clone(),
                    unit: job.unit,
                    code: failure.code,
                    error: failure.error,
                    retryable,
                }))
                .await?;
            Ok(if retryable {
                Outcome::Requeue
            } else {
                Outcome::Ack
            })
        }
    }
}

async fn import<S: RestoreStore>(
    store: &S,
    storage: &Storage,
    job: &ImportPart,
    cancel: &CancellationToken,
) -> Result<Imported, NotImported> {
    let reason = match import_as(store, storage, job, cancel, StagingForm::Typed).await {
        Ok(imported) => return Ok(imported),
        Err(Unstaged::Not(not_imported)) => return Err(not_imported),
        Err(Unstaged::Refused(reason)) => reason,
    };
    info!(
        operation_id = %job.operation_id,
        entity = %job.entity.name,
        path = %job.part.path,
        %reason,
        "part cannot be loaded typed, staging it as text"
    );
    match import_as(store, storage, job, cancel, StagingForm::Text).await {
        Ok(imported) => Ok(imported),
        Err(Unstaged::Not(not_imported)) => Err(not_imported),
        Err(Unstaged::Refused(reason)) => Err(Failure::permanent("rows_refused", reason).into()),
    }
}

/// One attempt at the part, staged as `form` asks.
async fn import_as<S: RestoreStore>(
    store: &S,
    storage: &Storage,
    job: &ImportPart,
    cancel: &CancellationToken,
    form: StagingForm,
) -> Result<Imported, Unstaged> {
    let expected = &job.part;
    let path = expected.path.as_str();
    let mut reader = match PartReader::open(storage, path).await {
        Ok(reader) => reader,
        Err(error) if error.is_not_found() => {
            return Err(Failure::permanent(
                "missing_part",
                format!("part '{path}' is not in storage; nothing from it was written"),
            )
            .into());
        }
        Err(error) => return Err(Failure::worker(&error).into()),
    };
    if reader.stored_bytes() != expected.compressed_bytes {
        return Err(Failure::permanent(
            "size_mismatch",
            format!(
                "part '{path}': size mismatch: expected {} bytes, found {}; nothing from it was written",
                expected.compressed_bytes,
                reader.stored_bytes()
            ),
        )
        .into());
    }
    let context = || format!("part '{path}' of entity {}", job.entity.name);
    let mut session = store
        .begin_import(&job.entity, &job.target, form)
        .await
        .map_err(|error| Failure::source(&context(), &error))?;
    let mut failures = Vec::new();
    let mut failure_bytes = 0_usize;
    let read_error = loop {
        let next = tokio::select! {
            biased;
            () = cancel.cancelled() => {
                session.abort().await;
                return Err(Unstaged::Not(NotImported::Stopped));
            }
            next = reader.next_line() => next,
        };
        let line = match next {
            Ok(Some(line)) => line,
            Ok(None) => break None,
            Err(error) => break Some(error),
        };
        match parse_line(line.bytes, job.entity.key_type) {
            Ok((raw, parsed)) => {
                let pushed = session
                    .push(&parsed.import_line(line.number, path, raw))
                    .await;
                if let Err(error) = pushed {
                    session.abort().await;
                    return Err(not_imported(&context(), &error));
                }
            }
            Err(reason) => {
                failure_bytes += line.bytes.len();
                failures.push(unparsable(
                    Some(path),
                    Some(line.number),
                    reason,
                    line.bytes,
                ));
                if failures.len() > MAX_UNPARSABLE_LINES || failure_bytes > MAX_UNPARSABLE_BYTES {
                    session.abort().await;
                    return Err(Failure::permanent(
                        "too_many_failures",
                        format!(
                            "part '{path}': more than {MAX_UNPARSABLE_LINES} lines or {MAX_UNPARSABLE_BYTES} bytes do not parse (first, line {}: {}); nothing from it was written",
                            failures[0].line_no.unwrap_or_default(),
                            failures[0].reason
                        ),
                    )
                    .into());
                }
            }
        }
        tokio::task::consume_budget().await;
    };
    // A corrupt part is judged after hashing the rest of it: a damaged file is a
    // hash mismatch, a part written broken is corrupt. A storage error says
    // nothing about the part and keeps its retry verdict.
    let mut corrupt = None;
    let digest = match read_error {
        Some(error @ WorkerError::CorruptPart { .. }) => {
            corrupt = Some(error);
            reader.finish().await
        }
        Some(error) => Err(error),
        None => reader.finish().await,
    };
    let digest = match digest {
        Ok(digest) => digest,
        Err(error) => {
            session.abort().await;
            return Err(Failure::worker(&error).into());
        }
    };
    if let Some(mismatch) = digest.mismatches(expected).into_iter().next() {
        session.abort().await;
        return Err(Failure::permanent(
            mismatch.code,
            format!(
                "part '{path}': {}; nothing from it was written",
                mismatch.detail
            ),
        )
        .into());
    }
    if let Some(error) = corrupt {
        session.abort().await;
        return Err(Failure::permanent(
            error.code(),
            format!("{error}; nothing from it was written"),
        )
        .into());
    }
    let outcome = session
        .commit()
        .await
        .map_err(|error| not_imported(&context(), &error))?;
    failures.extend(outcome.failures);
    Ok(Imported {
        rows_written: outcome.rows_written,
        rows_skipped: outcome.rows_skipped,
        failures,
        raw_bytes: digest.raw_bytes,
    })
}

/// A failed push or commit: a refused typed load is staged again as text.
fn not_imported(context: &str, error: &SourceError) -> Unstaged {
    match error {
        SourceError::RowsRefused { .. } => Unstaged::Refused(error.to_string()),
        _ => Failure::source(context, error).into(),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
#[path = "restore_tests.rs"]
mod tests;
