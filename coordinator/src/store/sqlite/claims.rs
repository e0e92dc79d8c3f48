//! Chunk claims (which run owns a chunk) and lease expiry (re-publishing a
//! chunk whose run went quiet, with the next attempt).

use chrono::{DateTime, Utc};
use tracing::info;
use uuid::Uuid;

use koan_protocol::archive::{KeyRange, SnapshotFacts};
use koan_protocol::events::{ChunkClaim, ClaimChunk, ResumePoint};
use koan_protocol::plan::EntitySpec;
use koan_protocol::progress::OperationState;

use crate::error::CoordinatorError;
use crate::store::rules::{ExportContext, check_claim, chunk_failure, export_job, fail};

use super::chunks::{lease_until, read_chunk};
use super::db::{Db, get, get_json, get_opt_json, get_u32, get_uuid, int, micros, text};
use super::operations::{Delta, apply_delta, read_operation, save_operation};
use super::outbox::enqueue;

/// Operations looked at by one lease sweep.
const REAP_BATCH: i64 = 100;

/// Decides a claim; a granted claim makes the run the chunk's owner.
pub(super) fn claim(db: &Db<'_>, claim: &ClaimChunk) -> Result<ChunkClaim, CoordinatorError> {
    let refuse = |reason: String| {
        db.discard();
        ChunkClaim {
            granted: false,
            reason: Some(reason),
            resume_after: None,
            lease_seconds: 0,
        }
    };
    let Some(mut operation) = read_operation(db, claim.operation_id)? else {
        return Ok(refuse(format!("unknown operation {}", claim.operation_id)));
    };
    let chunk = read_chunk(db, claim.operation_id, &claim.entity, claim.chunk)?;
    let decision = check_claim(
        operation.record.state,
        chunk.as_ref().map(|row| (row.state, row.attempt)),
        claim,
    );
    let (Ok(()), Some(chunk)) = (decision.clone(), chunk) else {
        return Ok(refuse(
            decision.err().unwrap_or_else(|| "no such chunk".into()),
        ));
    };
    let operation_id = text(claim.operation_id);
    let resume_after = if chunk.parts == 0 {
        None
    } else {
        db.query_opt(
            "read resume point",
            "SELECT last_key FROM parts
             WHERE operation_id = ?1 AND entity = ?2 AND chunk = ?3 AND last_key IS NOT NULL
             ORDER BY part DESC LIMIT 1",
            (&operation_id, &claim.entity, i64::from(claim.chunk)),
            |row| get::<String>(row, "last_key"),
        )?
        .map(|last_key| ResumePoint {
            last_key,
            next_part: chunk.parts,
            rows: chunk.rows_durable,
        })
    };
    let superseding = !chunk.owned_by(&claim.run);
    db.execute(
        "grant claim",
        "UPDATE chunks SET state = 'running', owner_run = ?4, worker = ?5, attempt = ?6,
             lease_until = ?7, updated_at = ?8,
             rows_pending = CASE WHEN ?9 THEN 0 ELSE rows_pending END,
             raw_pending = CASE WHEN ?9 THEN 0 ELSE raw_pending END,
             parts_expected = CASE WHEN ?9 THEN NULL ELSE parts_expected END
         WHERE operation_id = ?1 AND entity = ?2 AND chunk = ?3",
        (
            &operation_id,
            &claim.entity,
            i64::from(claim.chunk),
            &claim.run,
            &claim.worker,
            i64::from(claim.attempt),
            lease_until(db),
            micros(db.now),
            superseding,
        ),
    )?;
    if superseding && (chunk.rows_pending > 0 || chunk.raw_pending > 0) {
        // Rows streamed by the superseded run are lost; percent holds (monotonic).
        let lost = Delta {
            rows_pending: -int(chunk.rows_pending),
            bytes_raw_pending: -int(chunk.raw_pending),
            ..Delta::default()
        };
        apply_delta(db, &mut operation, &claim.entity, lost)?;
        save_operation(db, &mut operation)?;
    }
    Ok(ChunkClaim {
        granted: true,
        reason: None,
        resume_after,
        lease_seconds: db.policy.lease.as_secs(),
    })
}

/// Operations (at most [`REAP_BATCH`]) with a running chunk whose lease
/// expired before `now`.
pub(super) fn expired_operations(
    db: &Db<'_>,
    now: DateTime<Utc>,
) -> Result<Vec<Uuid>, CoordinatorError> {
    db.query(
        "find expired leases",
        "SELECT DISTINCT c.operation_id FROM chunks c
         JOIN operations o ON o.id = c.operation_id
         WHERE c.state = 'running' AND c.lease_until < ?1
           AND o.state IN ('planning', 'running')
         LIMIT ?2",
        (micros(now), REAP_BATCH),
        |row| get_uuid(row, "operation_id"),
    )
}

/// Re-publishes every chunk of one operation whose lease expired before
/// `now` with the next attempt (so the stale run's claims are refused); the
/// operation fails when a chunk used up its attempts.
pub(super) fn reap_operation(
    db: &Db<'_>,
    operation_id: Uuid,
    now: DateTime<Utc>,
) -> Result<u64, CoordinatorError> {
    let Some(mut operation) = read_operation(db, operation_id)? else {
        return Ok(0);
    };
    if !matches!(
        operation.record.state,
        OperationState::Planning | OperationState::Running
    ) {
        return Ok(0);
    }
    let expired = db.query(
        "read expired chunks",
        "SELECT c.entity, c.chunk, c.lo, c.hi, c.attempt, e.spec, e.snapshot
         FROM chunks c
         JOIN entities e ON e.operation_id = c.operation_id AND e.name = c.entity
         WHERE c.operation_id = ?1 AND c.state = 'running' AND c.lease_until < ?2
         ORDER BY e.ordinal, c.chunk",
        (text(operation_id), micros(now)),
        |row| {
            Ok(ExpiredChunk {
                entity: get(row, "entity")?,
                chunk: get_u32(row, "chunk")?,
                range: KeyRange {
                    lo: get(row, "lo")?,
                    hi: get(row, "hi")?,
                },
                attempt: get_u32(row, "attempt")?,
                spec: get_json(row, "spec")?,
                snapshot: get_opt_json(row, "snapshot")?,
            })
        },
    )?;
    let max_attempts = db.policy.max_chunk_attempts;
    let mut jobs = Vec::with_capacity(expired.len());
    for chunk in expired {
        let attempt = chunk.attempt.saturating_add(1);
        if attempt > max_attempts {
            fail(
                &mut operation.record,
                chunk_failure(
                    &chunk.entity,
                    chunk.chunk,
                    "lease_expired",
                    &format!("no news from its run within the lease, {max_attempts} times"),
                ),
            );
            break;
        }
        let context = ExportContext {
            operation_id,
            plan_id: &operation.record.plan_id,
            backup_id: operation.record.backup_id.unwrap_or(operation_id),
            entity: &chunk.spec,
            consistency: operation.record.consistency,
            snapshot: chunk.snapshot.as_ref(),
            part_bytes: db.policy.part_bytes,
        };
        jobs.push(export_job(&context, chunk.chunk, chunk.range, attempt)?);
        db.execute(
            "expire lease",
            "UPDATE chunks SET state = 'pending', attempt = ?4, lease_until = NULL, updated_at = ?5
             WHERE operation_id = ?1 AND entity = ?2 AND chunk = ?3",
            (
                text(operation_id),
                &chunk.entity,
                i64::from(chunk.chunk),
                i64::from(attempt),
                micros(db.now),
            ),
        )?;
        info!(%operation_id, entity = %chunk.entity, chunk = chunk.chunk, attempt, "chunk lease expired, job re-published");
    }
    if operation.record.state == OperationState::Failed {
        save_operation(db, &mut operation)?;
        return Ok(0);
    }
    enqueue(db, &jobs)?;
    Ok(u64::try_from(jobs.len()).unwrap_or(u64::MAX))
}

/// A running chunk whose lease expired, with what its export job needs.
struct ExpiredChunk {
    entity: String,
    chunk: u32,
    range: KeyRange,
    attempt: u32,
    spec: EntitySpec,
    snapshot: Option<SnapshotFacts>,
}
