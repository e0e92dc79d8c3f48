//! Decisions every state store backend shares: which jobs and events a change
//! queues, whether a claim is granted, what a part path must be, how the
//! manifest is assembled and how failures are worded.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use koan_protocol::archive::{
    FORMAT_VERSION, KeyRange, Manifest, ManifestChunk, ManifestEntity, PartInfo, SnapshotFacts,
    Totals, part_path,
};
use koan_protocol::codec::Message;
use koan_protocol::events::{ClaimChunk, OperationEvent, WorkerEvent};
use koan_protocol::jobs::{ExportChunk, Job, PlanEntity};
use koan_protocol::plan::{BackupPlan, Consistency, EntitySpec};
use koan_protocol::progress::{OperationState, ProgressReport};
use koan_protocol::topology::{EVENTS_EXCHANGE, JOBS_EXCHANGE, operation_event_key};

use crate::error::CoordinatorError;
use crate::store::OperationRole;

/// Most chunks one entity may be planned into.
pub const MAX_CHUNKS_PER_ENTITY: usize = 1_000_000;

/// A message to put in the outbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueuedMessage {
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
            exchange: JOBS_EXCHANGE.to_string(),
            routing_key: pool.to_string(),
            kind: job.kind().to_string(),
            payload: koan_protocol::encode(job)?,
        })
    }

    /// A public event of the operation the event's report names.
    pub fn event(event: &OperationEvent) -> Result<Self, CoordinatorError> {
        Ok(Self {
            exchange: EVENTS_EXCHANGE.to_string(),
            routing_key: operation_event_key(event.report().operation_id, event.kind()),
            kind: event.kind().to_string(),
            payload: koan_protocol::encode(event)?,
        })
    }
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
}
