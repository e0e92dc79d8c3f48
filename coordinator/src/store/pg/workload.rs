//! The figures behind the coordinator's metrics: work per pool, operations
//! by state, and ended operations taken once (see [`crate::store::workload`]).

use chrono::{DateTime, Utc};
use uuid::Uuid;

use koan_protocol::progress::OperationState;

use crate::error::CoordinatorError;
use crate::store::{FinishedOperation, OperationCount, OperationRole, PoolWorkload, Workload};

use super::PgStateStore;
use super::db::{Db, get, uint};

/// Pool of a job: the restore's pool override, else its entity's pool.
const WORK_PER_POOL: &str = "
    WITH active AS (
        SELECT id, pool FROM {s}.operations WHERE state IN ('planning', 'running')
    ), work AS (
        SELECT COALESCE(a.pool, e.spec->>'pool', 'default') AS pool,
               c.state = 'pending' AS waiting,
               c.updated_at
        FROM active a
        JOIN {s}.chunks c ON c.operation_id = a.id
        JOIN {s}.entities e ON e.operation_id = c.operation_id AND e.name = c.entity
        WHERE c.state IN ('pending', 'running')
        UNION ALL
        SELECT COALESCE(a.pool, e.spec->>'pool', 'default'), true, u.updated_at
        FROM active a
        JOIN {s}.restore_units u ON u.operation_id = a.id
        JOIN {s}.entities e ON e.operation_id = u.operation_id AND e.name = u.entity
        WHERE u.state = 'pending'
    )
    SELECT pool,
           count(*) FILTER (WHERE waiting) AS waiting,
           count(*) FILTER (WHERE NOT waiting) AS running,
           min(updated_at) FILTER (WHERE waiting) AS oldest_waiting_since
    FROM work GROUP BY pool ORDER BY pool";

/// See [`crate::store::StateStore::workload`].
pub(super) async fn workload(store: &PgStateStore) -> Result<Workload, CoordinatorError> {
    let mut client = store.client().await?;
    let db = Db::begin_read(&mut client, store).await?;
    let mut pools = Vec::new();
    for row in db.query("read work per pool", WORK_PER_POOL, &[]).await? {
        pools.push(PoolWorkload {
            pool: get(&row, "pool")?,
            waiting: uint(get(&row, "waiting")?),
            running: uint(get(&row, "running")?),
            oldest_waiting_since: get(&row, "oldest_waiting_since")?,
        });
    }
    let mut operations = Vec::new();
    for row in db
        .query(
            "count operations",
            "SELECT kind, state, count(*) AS count FROM {s}.operations
             GROUP BY kind, state ORDER BY kind, state",
            &[],
        )
        .await?
    {
        let kind: String = get(&row, "kind")?;
        let state: String = get(&row, "state")?;
        operations.push(OperationCount {
            role: role(&kind)?,
            state: state_of(&state)?,
            count: uint(get(&row, "count")?),
        });
    }
    db.commit().await?;
    Ok(Workload { pools, operations })
}

/// See [`crate::store::StateStore::take_finished`]. `SKIP LOCKED`: two
/// coordinators taking at once get different operations.
pub(super) async fn take_finished(
    store: &PgStateStore,
    limit: u32,
) -> Result<Vec<FinishedOperation>, CoordinatorError> {
    let mut client = store.client().await?;
    let db = Db::begin(&mut client, store).await?;
    let rows = db
        .query(
            "take finished operations",
            "WITH taken AS (
                 SELECT id FROM {s}.operations
                 WHERE finished_at IS NOT NULL AND NOT metered
                 ORDER BY finished_at, id
                 LIMIT $1
                 FOR UPDATE SKIP LOCKED
             )
             UPDATE {s}.operations o SET metered = true
             FROM taken WHERE o.id = taken.id
             RETURNING o.id, o.kind, o.state, o.created_at, o.finished_at, o.rows_durable,
                       o.bytes_raw, o.bytes_compressed",
            &[&i64::from(limit)],
        )
        .await?;
    let mut finished = Vec::with_capacity(rows.len());
    for row in &rows {
        let kind: String = get(row, "kind")?;
        let state: String = get(row, "state")?;
        let finished_at: DateTime<Utc> = get(row, "finished_at")?;
        finished.push(FinishedOperation {
            id: get::<Uuid>(row, "id")?,
            role: role(&kind)?,
            state: state_of(&state)?,
            created_at: get(row, "created_at")?,
            finished_at,
            rows: uint(get(row, "rows_durable")?),
            bytes_raw: uint(get(row, "bytes_raw")?),
            bytes_compressed: uint(get(row, "bytes_compressed")?),
        });
    }
    db.commit().await?;
    finished.sort_by_key(|operation| (operation.finished_at, operation.id));
    Ok(finished)
}

fn role(kind: &str) -> Result<OperationRole, CoordinatorError> {
    OperationRole::parse(kind).ok_or_else(|| CoordinatorError::corrupt("operation kind", kind))
}

fn state_of(state: &str) -> Result<OperationState, CoordinatorError> {
    OperationState::parse(state).ok_or_else(|| CoordinatorError::corrupt("operation state", state))
}
