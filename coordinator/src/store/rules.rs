//! Decisions every state store backend shares: which jobs and events a change
//! queues, whether a claim is granted, what a part path must be, how the
//! manifest is assembled, how failures are worded, and how the reports that
//! only move an operation's stored figures (manifest written, verify
//! progress, operation failed...) change them.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use tracing::warn;

use koan_protocol::archive::{
    FORMAT_VERSION, KeyRange, Manifest, ManifestChunk, ManifestEntity, PartInfo, SnapshotFacts,
    Totals, manifest_path, part_path,
};
use koan_protocol::codec::Message;
use koan_protocol::commands::RestoreMode;
use koan_protocol::events::{
    ClaimChunk, FinalizeFailed, ManifestWritten, OperationEvent, OperationFailed, VerifyDone,
    VerifyProgress, WorkerEvent,
};
use koan_protocol::jobs::{ExportChunk, Finalize, Job, PlanEntity};
use koan_protocol::plan::{BackupPlan, Consistency, EntitySpec};
use koan_protocol::progress::{OperationState, ProgressReport};
use koan_protocol::topology::{EVENTS_EXCHANGE, JOBS_EXCHANGE, operation_event_key};
use koan_protocol::trace::TraceContext;

use crate::error::CoordinatorError;
use crate::progress::{self, Counters};
use crate::store::restore_rules::{operation_failure, verify_failure};
use crate::store::{Applied, OperationRecord, OperationRole};

/// An operation to record, as every backend inserts it; `P` is how the
/// backend holds the plan (a JSON value, or JSON text).
#[derive(Debug)]
pub struct OperationInsert<'a, P: ?Sized> {
    /// Operation id.
    pub id: Uuid,
    /// Backup, restore, replay or verify.
    pub role: OperationRole,
    /// State it starts in.
    pub state: OperationState,
    /// The plan (of the backup, for every other kind).
    pub plan: &'a P,
    /// The plan's id.
    pub plan_id: &'a str,
    /// The backup written or read.
    pub backup_id: Uuid,
    /// The plan's consistency.
    pub consistency: Consistency,
    /// Labels.
    pub labels: &'a BTreeMap<String, String>,
    /// Free text.
    pub description: Option<&'a str>,
    /// The submitting command's message id.
    pub command_id: Option<&'a str>,
    /// Entities the operation covers.
    pub entities_total: u64,
    /// Restore mode (restores and replays).
    pub mode: Option<RestoreMode>,
    /// The operation this one reads (a restore's backup, a replay's restore).
    pub source_operation: Option<Uuid>,
    /// Scope rows are re-stamped with.
    pub target_scope: Option<&'a str>,
    /// Pool overriding each entity's.
    pub pool: Option<&'a str>,
    /// Trace context of the submitting command.
    pub trace: Option<&'a TraceContext>,
}

/// Most chunks one entity may be planned into.
pub const MAX_CHUNKS_PER_ENTITY: usize = 1_000_000;

/// A message to put in the outbox. It is queued with the trace context of
/// its operation (copied from the operation's row at enqueue).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueuedMessage {
    /// The operation it belongs to.
    pub operation_id: Uuid,
    /// Exchange.
    pub exchange: String,
    /// Routing key.
    pub routing_key: String,
    /// Message kind.
    pub kind: String,
    /// Envelope bytes.
    pub payload: Vec<u8>,
}

impl QueuedMessage {
    /// A job for `pool`.
    pub fn job(pool: &str, job: &Job) -> Result<Self, CoordinatorError> {
        Ok(Self {
            operation_id: job.operation_id(),
            exchange: JOBS_EXCHANGE.to_string(),
            routing_key: pool.to_string(),
            kind: job.kind().to_string(),
            payload: koan_protocol::encode(job)?,
        })
    }

    /// A public event of the operation the event's report names.
    pub fn event(event: &OperationEvent) -> Result<Self, CoordinatorError> {
        Ok(Self {
            operation_id: event.report().operation_id,
            exchange: EVENTS_EXCHANGE.to_string(),
            routing_key: operation_event_key(event.report().operation_id, event.kind()),
            kind: event.kind().to_string(),
            payload: koan_protocol::encode(event)?,
        })
    }
}

/// The trace context stored with an operation or outbox message, if any
/// (a stored value that is not a valid `traceparent` counts as none).
pub fn stored_trace(
    traceparent: Option<String>,
    tracestate: Option<&str>,
) -> Option<koan_protocol::trace::TraceContext> {
    koan_protocol::trace::TraceContext::new(&traceparent?, tracestate)
}

/// One `plan_entity` job per entity of `plan`, each to its entity's pool.
pub fn plan_jobs(
    operation_id: Uuid,
    plan: &BackupPlan,
) -> Result<Vec<QueuedMessage>, CoordinatorError> {
    plan.entity_specs()
        .into_iter()
        .map(|entity| {
            let pool = entity.pool.clone();
            let job = Job::PlanEntity(PlanEntity {
                operation_id,
                plan_id: plan.plan_id.clone(),
                backup_id: operation_id,
                entity,
                consistency: plan.consistency,
            });
            QueuedMessage::job(&pool, &job)
        })
        .collect()
}

/// What an export job needs besides the chunk itself.
#[derive(Debug, Clone, Copy)]
pub struct ExportContext<'a> {
    /// Operation.
    pub operation_id: Uuid,
    /// Plan id.
    pub plan_id: &'a str,
    /// Backup id.
    pub backup_id: Uuid,
    /// The entity, key type resolved.
    pub entity: &'a EntitySpec,
    /// Consistency mode.
    pub consistency: Consistency,
    /// The entity's snapshot, if planned under one.
    pub snapshot: Option<&'a SnapshotFacts>,
    /// Target bytes per part.
    pub part_bytes: u64,
}

/// The `export_chunk` job of one chunk.
pub fn export_job(
    context: &ExportContext<'_>,
    chunk: u32,
    range: KeyRange,
    attempt: u32,
) -> Result<QueuedMessage, CoordinatorError> {
    let snapshot_id = match context.consistency {
        Consistency::Snapshot => context
            .snapshot
            .and_then(|snapshot| snapshot.snapshot_id.clone()),
        Consistency::PerChunk => None,
    };
    let job = Job::ExportChunk(ExportChunk {
        operation_id: context.operation_id,
        plan_id: context.plan_id.to_string(),
        backup_id: context.backup_id,
        entity: context.entity.clone(),
        chunk,
        range,
        snapshot_id,
        attempt,
        part_bytes: context.part_bytes,
    });
    QueuedMessage::job(&context.entity.pool, &job)
}

/// The `discard_backup` job of a cancelled backup: every entity's backup
/// prefix (deduplicated, in plan order), to the first entity's pool.
pub fn discard_job(
    operation_id: Uuid,
    plan_id: &str,
    backup_id: Uuid,
    entities: &[EntitySpec],
) -> Result<Option<QueuedMessage>, CoordinatorError> {
    let Some(first) = entities.first() else {
        return Ok(None);
    };
    let mut prefixes: Vec<String> = Vec::with_capacity(entities.len());
    for entity in entities {
        let prefix = koan_protocol::archive::backup_prefix(
            &entity.bucket,
            entity.scope_segment(),
            plan_id,
            backup_id,
        )?;
        if !prefixes.contains(&prefix) {
            prefixes.push(prefix);
        }
    }
    let job = Job::Discard(koan_protocol::jobs::DiscardBackup {
        operation_id,
        prefixes,
    });
    QueuedMessage::job(&first.pool, &job).map(Some)
}

/// The manifest note of a resume under `snapshot` consistency.
pub fn resumed_note(paused_at: Option<DateTime<Utc>>, resumed_at: DateTime<Utc>) -> String {
    let paused = paused_at.map_or_else(|| "an unknown time".to_string(), |at| at.to_rfc3339());
    format!(
        "paused at {paused}, resumed at {}: chunks not finished before the pause were read at a new snapshot",
        resumed_at.to_rfc3339()
    )
}

/// The public event announcing `report`: `completed` or `failed` on those
/// states, `progress` otherwise.
pub fn event_for(report: ProgressReport) -> OperationEvent {
    match report.state {
        OperationState::Completed => OperationEvent::Completed(report),
        OperationState::Failed => OperationEvent::Failed(report),
        OperationState::Paused => OperationEvent::Paused(report),
        OperationState::Cancelled => OperationEvent::Cancelled(report),
        _ => OperationEvent::Progress(report),
    }
}

/// The role of the operations a worker report may concern (`None`: any but a backup's).
pub fn report_role(event: &WorkerEvent) -> Option<OperationRole> {
    match event {
        WorkerEvent::EntityPlanned(_)
        | WorkerEvent::EntityFailed(_)
        | WorkerEvent::ClaimChunk(_)
        | WorkerEvent::ChunkProgress(_)
        | WorkerEvent::PartWritten(_)
        | WorkerEvent::ChunkDone(_)
        | WorkerEvent::ChunkFailed(_)
        | WorkerEvent::ManifestWritten(_)
        | WorkerEvent::FinalizeFailed(_)
        | WorkerEvent::Discarded(_) => Some(OperationRole::Backup),
        WorkerEvent::RestorePlanned(_)
        | WorkerEvent::PartImported(_)
        | WorkerEvent::ImportFailed(_)
        | WorkerEvent::RestoreApplied(_) => Some(OperationRole::Restore),
        WorkerEvent::ReplayDone(_) => Some(OperationRole::Replay),
        WorkerEvent::VerifyProgress(_) | WorkerEvent::VerifyDone(_) => Some(OperationRole::Verify),
        WorkerEvent::OperationFailed(_) => None,
    }
}

/// Where a chunk stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkState {
    /// Waiting for a run to claim it.
    Pending,
    /// Claimed by its owner run.
    Running,
    /// Every row is in durable parts.
    Done,
    /// Failed for good.
    Failed,
}

impl ChunkState {
    /// Stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Running => "running",
            Self::Done => "done",
            Self::Failed => "failed",
        }
    }

    /// Parses a stored name.
    pub fn parse(name: &str) -> Option<Self> {
        [Self::Pending, Self::Running, Self::Done, Self::Failed]
            .into_iter()
            .find(|state| state.as_str() == name)
    }
}

/// Whether `claim` may own a chunk; `Err` carries the reason sent to the worker.
pub fn check_claim(
    operation_state: OperationState,
    chunk: Option<(ChunkState, u32)>,
    claim: &ClaimChunk,
) -> Result<(), String> {
    match operation_state {
        OperationState::Planning | OperationState::Running => {}
        // Workers read these two reasons as "stop, the job is handed back on resume".
        OperationState::Paused | OperationState::Cancelled => {
            return Err(operation_state.as_str().to_string());
        }
        other => return Err(format!("operation is {}", other.as_str())),
    }
    let Some((state, attempt)) = chunk else {
        return Err(format!(
            "entity '{}' has no chunk {}",
            claim.entity, claim.chunk
        ));
    };
    match state {
        ChunkState::Done => Err("chunk is already done".to_string()),
        ChunkState::Failed => Err("chunk failed".to_string()),
        ChunkState::Pending | ChunkState::Running if claim.attempt < attempt => Err(format!(
            "attempt {} is superseded by attempt {attempt}",
            claim.attempt
        )),
        ChunkState::Pending | ChunkState::Running => Ok(()),
    }
}

/// Checks that a reported part lives where the archive layout puts it for this run.
pub fn check_part_path(
    entity: &EntitySpec,
    plan_id: &str,
    backup_id: Uuid,
    chunk: u32,
    run: &str,
    part: &PartInfo,
) -> Result<(), CoordinatorError> {
    let expected = part_path(entity, plan_id, backup_id, chunk, part.part, run)?;
    if part.path != expected {
        return Err(CoordinatorError::InvalidReport(format!(
            "part {} of entity '{}' chunk {chunk} is at '{}', expected '{expected}'",
            part.part,
            entity.name,
            part.path.escape_default()
        )));
    }
    Ok(())
}

/// One entity as stored, for the manifest.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredEntity {
    /// The entity as backed up (key type resolved).
    pub spec: EntitySpec,
    /// Its snapshot, when planned under one.
    pub snapshot: Option<SnapshotFacts>,
    /// Its chunks in order, each with its parts in order.
    pub chunks: Vec<ManifestChunk>,
}

/// What the manifest says about the backup as a whole.
#[derive(Debug, Clone, PartialEq)]
pub struct BackupFacts {
    /// Backup id.
    pub backup_id: Uuid,
    /// The plan as run.
    pub plan: BackupPlan,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// When the backup was accepted.
    pub started_at: DateTime<Utc>,
    /// When its last chunk finished.
    pub completed_at: DateTime<Utc>,
    /// Consistency notes (for example: resumed at a new snapshot).
    pub notes: Vec<String>,
}

/// Assembles the manifest from the parts the coordinator accepted; entities in plan order.
pub fn assemble_manifest(facts: BackupFacts, entities: Vec<StoredEntity>) -> Manifest {
    let mut totals = Totals {
        entities: u64::try_from(entities.len()).unwrap_or(u64::MAX),
        ..Totals::default()
    };
    let mut snapshots = Vec::new();
    let mut manifest_entities = Vec::with_capacity(entities.len());
    for entity in entities {
        let mut rows = 0u64;
        let mut raw_bytes = 0u64;
        let mut compressed_bytes = 0u64;
        for part in entity.chunks.iter().flat_map(|chunk| chunk.parts.iter()) {
            rows = rows.saturating_add(part.rows);
            raw_bytes = raw_bytes.saturating_add(part.raw_bytes);
            compressed_bytes = compressed_bytes.saturating_add(part.compressed_bytes);
            totals.parts += 1;
        }
        totals.chunks += u64::try_from(entity.chunks.len()).unwrap_or(u64::MAX);
        totals.rows = totals.rows.saturating_add(rows);
        totals.raw_bytes = totals.raw_bytes.saturating_add(raw_bytes);
        totals.compressed_bytes = totals.compressed_bytes.saturating_add(compressed_bytes);
        if let Some(snapshot) = entity.snapshot {
            snapshots.push(snapshot);
        }
        manifest_entities.push(ManifestEntity {
            spec: entity.spec,
            rows,
            raw_bytes,
            compressed_bytes,
            chunks: entity.chunks,
        });
    }
    Manifest {
        format_version: FORMAT_VERSION,
        backup_id: facts.backup_id,
        consistency: koan_protocol::archive::ConsistencyFacts {
            mode: facts.plan.consistency,
            snapshots,
            notes: facts.notes,
        },
        plan: facts.plan,
        base_backup: None,
        labels: facts.labels,
        started_at: facts.started_at,
        completed_at: facts.completed_at,
        totals,
        entities: manifest_entities,
    }
}

/// Checks that planned ranges cover the whole key space, in order, without
/// gap or overlap: a gap would silently leave rows out of the backup.
pub fn check_ranges(entity: &str, ranges: &[KeyRange]) -> Result<(), CoordinatorError> {
    let invalid = |reason: String| {
        CoordinatorError::InvalidReport(format!("ranges of entity '{entity}' {reason}"))
    };
    if ranges.len() > MAX_CHUNKS_PER_ENTITY {
        return Err(invalid(format!(
            "are {} chunks (at most {MAX_CHUNKS_PER_ENTITY})",
            ranges.len()
        )));
    }
    let (Some(first), Some(last)) = (ranges.first(), ranges.last()) else {
        return Ok(());
    };
    if first.lo.is_some() || last.hi.is_some() {
        return Err(invalid("do not reach both ends of the key space".into()));
    }
    for (chunk, pair) in ranges.windows(2).enumerate() {
        if pair[0].hi.is_none() || pair[0].hi != pair[1].lo {
            return Err(invalid(format!(
                "leave a gap or overlap between chunks {chunk} and {}",
                chunk + 1
            )));
        }
    }
    Ok(())
}

/// Error text of an operation failed by one entity's planning.
pub fn entity_failure(entity: &str, code: &str, error: &str) -> String {
    format!("entity '{entity}' could not be planned ({code}): {error}")
}

/// Error text of an operation failed by one chunk.
pub fn chunk_failure(entity: &str, chunk: u32, code: &str, error: &str) -> String {
    format!("entity '{entity}' chunk {chunk}: {error} ({code})")
}

/// Parses a stored restore mode.
pub fn parse_mode(name: &str) -> Option<RestoreMode> {
    [
        RestoreMode::Merge,
        RestoreMode::Overwrite,
        RestoreMode::SkipExisting,
        RestoreMode::Replace,
    ]
    .into_iter()
    .find(|mode| mode.as_str() == name)
}

/// Parses a stored consistency mode.
pub fn parse_consistency(name: &str) -> Option<Consistency> {
    [Consistency::Snapshot, Consistency::PerChunk]
        .into_iter()
        .find(|mode| mode.as_str() == name)
}

/// `value` moved by a signed `delta`, saturating at 0 and `u64::MAX`.
pub fn shifted(value: u64, delta: i64) -> u64 {
    match u64::try_from(delta) {
        Ok(up) => value.saturating_add(up),
        Err(_) => value.saturating_sub(delta.unsigned_abs()),
    }
}

/// `new - old` as a signed delta, saturating.
pub fn delta(new: u64, old: u64) -> i64 {
    let signed = |value: u64| i64::try_from(value).unwrap_or(i64::MAX);
    signed(new).saturating_sub(signed(old))
}

/// When a lease granted at `now` ends.
pub fn lease_until(now: DateTime<Utc>, lease: std::time::Duration) -> DateTime<Utc> {
    now + chrono::Duration::from_std(lease).unwrap_or_else(|_| chrono::Duration::seconds(60))
}

/// Moves a changed operation on before it is saved: next percent (never
/// lower), next sequence, `updated_at`. Returns whether its public event is
/// due: the state changed since it was read (`read_state`), or the progress
/// `interval` passed since the last announcement.
pub fn advance_operation(
    record: &mut OperationRecord,
    read_state: OperationState,
    published_at: Option<DateTime<Utc>>,
    now: DateTime<Utc>,
    interval: std::time::Duration,
) -> bool {
    record.percent = progress::next_percent(record.percent, record.state, &Counters::of(record));
    record.sequence = record.sequence.saturating_add(1);
    record.updated_at = now;
    let interval = chrono::Duration::from_std(interval)
        .unwrap_or_else(|_| chrono::Duration::milliseconds(250));
    read_state != record.state || published_at.is_none_or(|at| now - at >= interval)
}

/// Fails the operation with `error` (its `failed` event goes out on save).
pub fn fail(record: &mut OperationRecord, error: String) {
    record.state = OperationState::Failed;
    record.error = Some(error);
}

/// Counts a newly planned entity of `chunks` chunks and `rows_total` rows; the
/// backup runs once every entity is planned.
pub fn count_planned_entity(
    record: &mut OperationRecord,
    rows_total: u64,
    chunks: u64,
    now: DateTime<Utc>,
) {
    record.entities_planned += 1;
    record.rows_total = record.rows_total.saturating_add(rows_total);
    record.chunks_total = record.chunks_total.saturating_add(chunks);
    record.running_since.get_or_insert(now);
    if record.entities_planned >= record.entities_total && record.state == OperationState::Planning
    {
        record.state = OperationState::Running;
    }
}

/// Whether a backup is ready to finalize: every entity planned, every chunk
/// done, and still planning or running.
pub fn ready_to_finalize(record: &OperationRecord) -> bool {
    record.entities_planned >= record.entities_total
        && record.chunks_done >= record.chunks_total
        && matches!(
            record.state,
            OperationState::Planning | OperationState::Running
        )
}

/// The `finalize` job of a backup whose chunks are all done: the manifest
/// assembled from the accepted parts, to the first entity's pool.
pub fn finalize_job(
    operation_id: Uuid,
    facts: BackupFacts,
    entities: Vec<StoredEntity>,
) -> Result<QueuedMessage, CoordinatorError> {
    let path = manifest_path(&facts.plan, facts.backup_id)?;
    let pool = facts
        .plan
        .entity_specs()
        .into_iter()
        .next()
        .map(|spec| spec.pool)
        .ok_or_else(|| CoordinatorError::corrupt("plan", "no entities"))?;
    let manifest = assemble_manifest(facts, entities);
    let job = Job::Finalize(Finalize {
        operation_id,
        path,
        manifest,
    });
    QueuedMessage::job(&pool, &job)
}

/// The manifest is written: the backup is complete (only from `finalizing`).
pub fn manifest_written(record: &mut OperationRecord, written: &ManifestWritten) -> Applied {
    if record.state != OperationState::Finalizing {
        warn!(
            operation_id = %record.id,
            state = record.state.as_str(),
            "manifest_written for an operation that is not finalizing ignored"
        );
        return Applied::Unchanged("operation is not finalizing");
    }
    record.state = OperationState::Completed;
    record.manifest = Some(written.path.clone());
    Applied::Changed
}

/// Writing the manifest failed: a retryable failure is retried by the
/// worker; any other fails the operation.
pub fn finalize_failed(record: &mut OperationRecord, failed: &FinalizeFailed) -> Applied {
    if record.state != OperationState::Finalizing {
        return Applied::Unchanged("operation is not finalizing");
    }
    if failed.retryable {
        warn!(operation_id = %record.id, code = %failed.code, error = %failed.error, "manifest write failed, worker retries");
        return Applied::Unchanged("worker retries the manifest");
    }
    fail(
        record,
        format!(
            "writing the manifest failed ({}): {}",
            failed.code, failed.error
        ),
    );
    Applied::Changed
}

/// A restore, replay or verify failed as a whole (ignored for backups).
pub fn operation_failed(record: &mut OperationRecord, failed: &OperationFailed) -> Applied {
    if record.role == OperationRole::Backup {
        warn!(operation_id = %record.id, code = %failed.code, error = %failed.error,
            "operation_failed for a backup ignored");
        return Applied::Unchanged("operation_failed is not a backup report");
    }
    fail(record, operation_failure(&failed.code, &failed.error));
    Applied::Changed
}

/// A verify's parts and rows checked so far; figures only grow (a late copy changes nothing).
pub fn verify_progress(
    record: &mut OperationRecord,
    report: &VerifyProgress,
    now: DateTime<Utc>,
) -> Applied {
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

/// A verify's verdict: whole (completed), or failed naming each bad or missing part.
pub fn verify_done(record: &mut OperationRecord, report: &VerifyDone) -> Applied {
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
    fail(record, error);
    Applied::Changed
}

#[cfg(test)]
mod tests {
    use super::*;
    use koan_protocol::plan::BackupEntity;

    fn claim(attempt: u32) -> ClaimChunk {
        ClaimChunk {
            operation_id: Uuid::nil(),
            entity: "orders".into(),
            chunk: 3,
            attempt,
            run: "r1".into(),
            worker: "w1".into(),
        }
    }

    #[test]
    fn claim_rules() {
        use OperationState::*;
        assert!(check_claim(Running, Some((ChunkState::Pending, 1)), &claim(1)).is_ok());
        assert!(check_claim(Planning, Some((ChunkState::Running, 1)), &claim(2)).is_ok());
        let stale = check_claim(Running, Some((ChunkState::Running, 2)), &claim(1)).unwrap_err();
        assert!(stale.contains("superseded"), "{stale}");
        assert!(check_claim(Running, Some((ChunkState::Done, 1)), &claim(1)).is_err());
        assert!(check_claim(Running, Some((ChunkState::Failed, 1)), &claim(1)).is_err());
        assert!(
            check_claim(Running, None, &claim(1))
                .unwrap_err()
                .contains("chunk 3")
        );
        assert!(check_claim(Finalizing, Some((ChunkState::Pending, 1)), &claim(1)).is_err());
        assert!(check_claim(Failed, Some((ChunkState::Pending, 1)), &claim(1)).is_err());
        assert_eq!(
            check_claim(Paused, Some((ChunkState::Pending, 1)), &claim(1)).unwrap_err(),
            "paused"
        );
        assert_eq!(
            check_claim(Cancelled, Some((ChunkState::Running, 1)), &claim(1)).unwrap_err(),
            "cancelled"
        );
    }

    #[test]
    fn ranges_must_cover_the_key_space() {
        let range = |lo: Option<&str>, hi: Option<&str>| KeyRange {
            lo: lo.map(str::to_string),
            hi: hi.map(str::to_string),
        };
        check_ranges("e", &[]).unwrap();
        check_ranges("e", &[range(None, None)]).unwrap();
        check_ranges("e", &[range(None, Some("m")), range(Some("m"), None)]).unwrap();
        let gap = [range(None, Some("m")), range(Some("n"), None)];
        assert!(
            check_ranges("e", &gap)
                .unwrap_err()
                .to_string()
                .contains("chunks 0 and 1")
        );
        assert!(check_ranges("e", &[range(Some("a"), None)]).is_err());
        assert!(check_ranges("e", &[range(None, Some("z"))]).is_err());
        let open_middle = [range(None, None), range(None, None)];
        assert!(check_ranges("e", &open_middle).is_err());
    }

    #[test]
    fn part_paths_must_follow_the_layout() {
        let plan = BackupPlan::new("p").entity(BackupEntity::new("orders", "Order"));
        let spec = &plan.entity_specs()[0];
        let id = Uuid::nil();
        let mut part = PartInfo {
            part: 2,
            path: part_path(spec, "p", id, 1, 2, "run1").unwrap(),
            first_key: None,
            last_key: None,
            rows: 1,
            raw_bytes: 1,
            compressed_bytes: 1,
            blake3: String::new(),
        };
        check_part_path(spec, "p", id, 1, "run1", &part).unwrap();
        assert!(check_part_path(spec, "p", id, 1, "run2", &part).is_err());
        part.path = "../../etc/passwd".into();
        let error = check_part_path(spec, "p", id, 1, "run1", &part).unwrap_err();
        assert!(error.to_string().contains("etc/passwd"), "{error}");
    }

    #[test]
    fn plan_jobs_go_to_each_entity_pool() {
        let plan = BackupPlan::new("p")
            .entity(BackupEntity::new("a", "A").pool("big"))
            .entity(BackupEntity::new("b", "B"));
        let jobs = plan_jobs(Uuid::nil(), &plan).unwrap();
        let keys: Vec<_> = jobs.iter().map(|job| job.routing_key.as_str()).collect();
        assert_eq!(keys, ["big", "default"]);
        assert!(jobs.iter().all(|job| job.kind == "plan_entity"));
        let decoded: Job = koan_protocol::decode(&jobs[0].payload).unwrap();
        assert!(matches!(decoded, Job::PlanEntity(job) if job.entity.name == "a"));
    }

    fn record(state: OperationState) -> OperationRecord {
        OperationRecord {
            id: Uuid::nil(),
            role: OperationRole::Verify,
            state,
            plan_id: "p".into(),
            backup_id: None,
            consistency: Consistency::Snapshot,
            labels: BTreeMap::new(),
            description: None,
            percent: 0.0,
            entities_total: 0,
            entities_planned: 0,
            rows_total: 0,
            rows_durable: 0,
            rows_pending: 0,
            bytes_raw: 0,
            bytes_raw_pending: 0,
            bytes_compressed: 0,
            parts_done: 0,
            chunks_total: 0,
            chunks_done: 0,
            manifest: None,
            error: None,
            sequence: 0,
            created_at: DateTime::<Utc>::UNIX_EPOCH,
            updated_at: DateTime::<Utc>::UNIX_EPOCH,
            running_since: None,
            mode: None,
            source_operation: None,
            target_scope: None,
            pool: None,
            rows_written: 0,
            rows_skipped: 0,
            rows_failed: 0,
            problems: Vec::new(),
        }
    }

    #[test]
    fn stored_names_and_deltas() {
        for mode in [RestoreMode::Merge, RestoreMode::Replace] {
            assert_eq!(parse_mode(mode.as_str()), Some(mode));
        }
        assert_eq!(parse_consistency("per-chunk"), Some(Consistency::PerChunk));
        assert_eq!(parse_consistency("serializable"), None);
        assert_eq!(shifted(10, -15), 0);
        assert_eq!(shifted(10, 5), 15);
        assert_eq!(shifted(u64::MAX, 1), u64::MAX);
        assert_eq!(delta(3, 10), -7);
        assert_eq!(delta(u64::MAX, 0), i64::MAX);
    }

    #[test]
    fn events_are_due_on_state_changes_or_after_the_interval() {
        let now = DateTime::<Utc>::UNIX_EPOCH + chrono::Duration::hours(1);
        let interval = std::time::Duration::from_secs(60);
        let mut running = record(OperationState::Running);
        running.rows_total = 100;
        running.rows_durable = 50;
        let recent = Some(now - chrono::Duration::seconds(10));
        assert!(!advance_operation(
            &mut running,
            OperationState::Running,
            recent,
            now,
            interval
        ));
        assert_eq!((running.sequence, running.percent), (1, 49.5));
        assert_eq!(running.updated_at, now);
        let long_ago = Some(now - chrono::Duration::seconds(60));
        assert!(advance_operation(
            &mut running,
            OperationState::Running,
            long_ago,
            now,
            interval
        ));
        assert!(advance_operation(
            &mut running,
            OperationState::Planning,
            recent,
            now,
            interval
        ));
        // Percent never goes back when rows streamed are lost.
        running.rows_durable = 10;
        advance_operation(&mut running, OperationState::Running, None, now, interval);
        assert_eq!((running.sequence, running.percent), (4, 49.5));
    }

    #[test]
    fn verify_figures_only_grow() {
        let now = DateTime::<Utc>::UNIX_EPOCH;
        let mut verify = record(OperationState::Planning);
        let progress = VerifyProgress {
            operation_id: Uuid::nil(),
            parts_done: 2,
            parts_total: 6,
            rows_done: 100,
            rows_total: 300,
        };
        assert_eq!(
            verify_progress(&mut verify, &progress, now),
            Applied::Changed
        );
        assert_eq!(verify.state, OperationState::Running);
        assert!(matches!(
            verify_progress(&mut verify, &progress, now),
            Applied::Unchanged(_)
        ));
        let late = VerifyProgress {
            parts_done: 1,
            rows_done: 50,
            ..progress
        };
        assert!(matches!(
            verify_progress(&mut verify, &late, now),
            Applied::Unchanged(_)
        ));
        assert_eq!((verify.chunks_done, verify.rows_durable), (2, 100));
        let done = VerifyDone {
            operation_id: Uuid::nil(),
            parts_checked: 6,
            rows: 300,
            problems: vec!["part a: hash".into()],
        };
        assert_eq!(verify_done(&mut verify, &done), Applied::Changed);
        assert_eq!(verify.state, OperationState::Failed);
        assert_eq!(
            verify.error.as_deref(),
            Some("1 of 6 parts are bad: part a: hash")
        );
    }

    #[test]
    fn the_manifest_completes_only_a_finalizing_backup() {
        let written = ManifestWritten {
            operation_id: Uuid::nil(),
            path: "m.json".into(),
            totals: Totals::default(),
        };
        let mut running = record(OperationState::Running);
        assert!(matches!(
            manifest_written(&mut running, &written),
            Applied::Unchanged(_)
        ));
        let mut finalizing = record(OperationState::Finalizing);
        assert_eq!(
            manifest_written(&mut finalizing, &written),
            Applied::Changed
        );
        assert_eq!(finalizing.state, OperationState::Completed);
        assert_eq!(finalizing.manifest.as_deref(), Some("m.json"));
        let retry = FinalizeFailed {
            operation_id: Uuid::nil(),
            code: "storage".into(),
            error: "slow down".into(),
            retryable: true,
        };
        let mut finalizing = record(OperationState::Finalizing);
        assert!(matches!(
            finalize_failed(&mut finalizing, &retry),
            Applied::Unchanged(_)
        ));
        let fatal = FinalizeFailed {
            retryable: false,
            ..retry
        };
        assert_eq!(finalize_failed(&mut finalizing, &fatal), Applied::Changed);
        assert_eq!(finalizing.state, OperationState::Failed);
    }

    #[test]
    fn the_finalize_job_goes_to_the_first_entity_pool() {
        let plan = BackupPlan::new("p")
            .entity(BackupEntity::new("a", "A").pool("big"))
            .entity(BackupEntity::new("b", "B"));
        let backup_id = Uuid::now_v7();
        let facts = BackupFacts {
            backup_id,
            plan: plan.clone(),
            labels: BTreeMap::new(),
            started_at: DateTime::<Utc>::UNIX_EPOCH,
            completed_at: DateTime::<Utc>::UNIX_EPOCH,
            notes: vec!["resumed".into()],
        };
        let message = finalize_job(backup_id, facts, Vec::new()).unwrap();
        assert_eq!(
            (message.routing_key.as_str(), message.kind.as_str()),
            ("big", "finalize")
        );
        let Job::Finalize(job) = koan_protocol::decode(&message.payload).unwrap() else {
            panic!("not a finalize job");
        };
        assert_eq!(job.path, manifest_path(&plan, backup_id).unwrap());
        assert_eq!(job.manifest.consistency.notes, ["resumed"]);
    }
}
