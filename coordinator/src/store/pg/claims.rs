//! Chunk claims (which run owns a chunk) and lease expiry (re-publishing a
//! chunk whose run went quiet, with the next attempt).

use chrono::{DateTime, Utc};
use tokio_postgres::types::Json;
use tracing::info;
use uuid::Uuid;

use koan_protocol::archive::{KeyRange, SnapshotFacts};
use koan_protocol::events::{ChunkClaim, ClaimChunk, ResumePoint};
use koan_protocol::plan::EntitySpec;
use koan_protocol::progress::OperationState;

use crate::error::CoordinatorError;
use crate::store::rules::{ExportContext, check_claim, chunk_failure, export_job};

use super::PgStateStore;
use super::chunks::{lease_until, lock_chunk};
use super::db::{Db, get, int, int4, uint4};
use super::operations::{Delta, apply_delta, fail, lock_operation, save_operation};
use super::outbox::enqueue;

pub(super) async fn claim(
    store: &PgStateStore,
    claim: &ClaimChunk,
) -> Result<ChunkClaim, CoordinatorError> {
    let mut client = store.client().await?;
    let db = Db::begin(&mut client, store).await?;
    let decision = claim_in(&db, claim).await?;
    if decision.granted {
        db.commit().await?;
    }
    Ok(decision)
}

/// Decides a claim inside the transaction of `db`; only a granted claim
/// wrote anything (a refusal is to be rolled back).
pub(super) async fn claim_in(
    db: &Db<'_>,
    claim: &ClaimChunk,
) -> Result<ChunkClaim, CoordinatorError> {
    let refuse = |reason: String| ChunkClaim {
        granted: false,
        reason: Some(reason),
        resume_after: None,
        lease_seconds: 0,
    };
    let Some(mut operation) = lock_operation(db, claim.operation_id).await? else {
        return Ok(refuse(format!("unknown operation {}", claim.operation_id)));
    };
    let chunk = lock_chunk(db, claim.operation_id, &claim.entity, claim.chunk).await?;
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
    let resume_after = if chunk.parts == 0 {
        None
    } else {
        db.query_opt(
            "read resume point",
            "SELECT last_key FROM {s}.parts
             WHERE operation_id = $1 AND entity = $2 AND chunk = $3 AND last_key IS NOT NULL
             ORDER BY part DESC LIMIT 1",
            &[&claim.operation_id, &claim.entity, &int4(claim.chunk)],
        )
        .await?
        .map(|row| get::<String>(&row, "last_key"))
        .transpose()?
        .map(|last_key| ResumePoint {
            last_key,
            next_part: chunk.parts,
            rows: chunk.rows_durable,
        })
    };
    let superseding = !chunk.owned_by(&claim.run);
    db.execute(
        "grant claim",
        "UPDATE {s}.chunks SET state = 'running', owner_run = $4, worker = $5, attempt = $6,
             lease_until = $7, updated_at = $8,
             rows_pending = CASE WHEN $9 THEN 0 ELSE rows_pending END,
             raw_pending = CASE WHEN $9 THEN 0 ELSE raw_pending END,
             parts_expected = CASE WHEN $9 THEN NULL ELSE parts_expected END
         WHERE operation_id = $1 AND entity = $2 AND chunk = $3",
        &[
            &claim.operation_id,
            &claim.entity,
            &int4(claim.chunk),
            &claim.run,
            &claim.worker,
            &int4(claim.attempt),
            &lease_until(db),
            &db.now,
            &superseding,
        ],
    )
    .await?;
    if superseding && (chunk.rows_pending > 0 || chunk.raw_pending > 0) {
        // Rows streamed by the superseded run are lost; percent holds (monotonic).
        let lost = Delta {
            rows_pending: -int(chunk.rows_pending),
            bytes_raw_pending: -int(chunk.raw_pending),
            ..Delta::default()
        };
        apply_delta(db, &mut operation, &claim.entity, lost).await?;
        save_operation(db, &mut operation).await?;
    }
    Ok(ChunkClaim {
        granted: true,
        reason: None,
        resume_after,
        lease_seconds: db.store.policy().lease.as_secs(),
    })
}

/// Re-publishes every chunk whose lease expired before `now` with the next
/// attempt (so the stale run's claims are refused); an operation whose chunk
/// used up its attempts fails.
pub(super) async fn reap_expired_leases(
    store: &PgStateStore,
    now: DateTime<Utc>,
) -> Result<u64, CoordinatorError> {
    let operation_ids: Vec<Uuid> = {
        let mut client = store.client().await?;
        let db = Db::begin_read(&mut client, store).await?;
        let rows = db
            .query(
                "find expired leases",
                "SELECT DISTINCT c.operation_id FROM {s}.chunks c
                 JOIN {s}.operations o ON o.id = c.operation_id
                 WHERE c.state = 'running' AND c.lease_until < $1
                   AND o.state IN ('planning', 'running')
                 LIMIT 100",
                &[&now],
            )
            .await?;
        rows.iter()
            .map(|row| get(row, 0))
            .collect::<Result<_, _>>()?
    };
    let mut republished = 0;
    for operation_id in operation_ids {
        republished += reap_operation(store, operation_id, now).await?;
    }
    Ok(republished)
}

async fn reap_operation(
    store: &PgStateStore,
    operation_id: Uuid,
    now: DateTime<Utc>,
) -> Result<u64, CoordinatorError> {
    let mut client = store.client().await?;
    let db = Db::begin(&mut client, store).await?;
    let Some(mut operation) = lock_operation(&db, operation_id).await? else {
        return Ok(0);
    };
    if !matches!(
        operation.record.state,
        OperationState::Planning | OperationState::Running
    ) {
        return Ok(0);
    }
    let rows = db
        .query(
            "read expired chunks",
            "SELECT c.entity, c.chunk, c.lo, c.hi, c.attempt, e.spec, e.snapshot
             FROM {s}.chunks c
             JOIN {s}.entities e ON e.operation_id = c.operation_id AND e.name = c.entity
             WHERE c.operation_id = $1 AND c.state = 'running' AND c.lease_until < $2
             ORDER BY e.ordinal, c.chunk
             FOR UPDATE OF c",
            &[&operation_id, &now],
        )
        .await?;
    let max_attempts = store.policy().max_chunk_attempts;
    let mut jobs = Vec::with_capacity(rows.len());
    for row in &rows {
        let entity: String = get(row, "entity")?;
        let chunk = uint4(get(row, "chunk")?);
        let attempt = uint4(get(row, "attempt")?).saturating_add(1);
        if attempt > max_attempts {
            fail(
                &mut operation,
                chunk_failure(
                    &entity,
                    chunk,
                    "lease_expired",
                    &format!("no news from its run within the lease, {max_attempts} times"),
                ),
            );
            break;
        }
        let Json(spec): Json<EntitySpec> = get(row, "spec")?;
        let snapshot: Option<Json<SnapshotFacts>> = get(row, "snapshot")?;
        let context = ExportContext {
            operation_id,
            plan_id: &operation.record.plan_id,
            backup_id: operation.record.backup_id.unwrap_or(operation_id),
            entity: &spec,
            consistency: operation.record.consistency,
            snapshot: snapshot.as_ref().map(|Json(facts)| facts),
            part_bytes: store.policy().part_bytes,
        };
        let range = KeyRange {
            lo: get(row, "lo")?,
            hi: get(row, "hi")?,
        };
        jobs.push(export_job(&context, chunk, range, attempt)?);
        db.execute(
            "expire lease",
            "UPDATE {s}.chunks SET state = 'pending', attempt = $4, lease_until = NULL, updated_at = $5
             WHERE operation_id = $1 AND entity = $2 AND chunk = $3",
            &[&operation_id, &entity, &int4(chunk), &int4(attempt), &db.now],
        )
        .await?;
        info!(%operation_id, entity = %entity, chunk, attempt, "chunk lease expired, job re-published");
    }
    if operation.record.state == OperationState::Failed {
        save_operation(&db, &mut operation).await?;
        db.commit().await?;
        return Ok(0);
    }
    enqueue(&db, &jobs).await?;
    db.commit().await?;
    Ok(u64::try_from(jobs.len()).unwrap_or(u64::MAX))
}
