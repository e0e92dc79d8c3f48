//! The figures behind the coordinator's metrics: work per pool, operations
//! by state, and ended operations taken once (see [`crate::store::workload`]).

use koan_protocol::progress::OperationState;

use crate::error::CoordinatorError;
use crate::store::{FinishedOperation, OperationCount, OperationRole, PoolWorkload, Workload};

use super::db::{Db, get, get_opt_time, get_time, get_u64, get_uuid};

/// Pool of a job: the restore's pool override, else its entity's pool.
const WORK_PER_POOL: &str = "
    WITH active AS (
        SELECT id, pool FROM operations WHERE state IN ('planning', 'running')
    ), work AS (
        SELECT coalesce(a.pool, json_extract(e.spec, '$.pool'), 'default') AS pool,
               c.state = 'pending' AS waiting,
               c.updated_at
        FROM active a
        JOIN chunks c ON c.operation_id = a.id
        JOIN entities e ON e.operation_id = c.operation_id AND e.name = c.entity
        WHERE c.state IN ('pending', 'running')
        UNION ALL
        SELECT coalesce(a.pool, json_extract(e.spec, '$.pool'), 'default'), 1, u.updated_at
        FROM active a
        JOIN restore_units u ON u.operation_id = a.id
        JOIN entities e ON e.operation_id = u.operation_id AND e.name = u.entity
        WHERE u.state = 'pending'
    )
    SELECT pool,
           sum(CASE WHEN waiting THEN 1 ELSE 0 END) AS waiting,
           sum(CASE WHEN waiting THEN 0 ELSE 1 END) AS running,
           min(CASE WHEN waiting THEN updated_at END) AS oldest_waiting_since
    FROM work GROUP BY pool ORDER BY pool";

/// See [`crate::store::StateStore::workload`].
pub(super) fn workload(db: &Db<'_>) -> Result<Workload, CoordinatorError> {
    let pools = db.query("read work per pool", WORK_PER_POOL, [], |row| {
        Ok(PoolWorkload {
            pool: get(row, "pool")?,
            waiting: get_u64(row, "waiting")?,
            running: get_u64(row, "running")?,
            oldest_waiting_since: get_opt_time(row, "oldest_waiting_since")?,
        })
    })?;
    let operations = db.query(
        "count operations",
        "SELECT kind, state, count(*) AS count FROM operations
         GROUP BY kind, state ORDER BY kind, state",
        [],
        |row| {
            let kind: String = get(row, "kind")?;
            let state: String = get(row, "state")?;
            Ok(OperationCount {
                role: role(&kind)?,
                state: state_of(&state)?,
                count: get_u64(row, "count")?,
            })
        },
    )?;
    Ok(Workload { pools, operations })
}

/// See [`crate::store::StateStore::take_finished`].
pub(super) fn take_finished(
    db: &Db<'_>,
    limit: u32,
) -> Result<Vec<FinishedOperation>, CoordinatorError> {
    let mut finished = db.query(
        "take finished operations",
        "UPDATE operations SET metered = 1
         WHERE id IN (
             SELECT id FROM operations
             WHERE finished_at IS NOT NULL AND metered = 0
             ORDER BY finished_at, id
             LIMIT ?1
         )
         RETURNING id, kind, state, created_at, finished_at, rows_durable, bytes_raw,
                   bytes_compressed",
        [i64::from(limit)],
        |row| {
            let kind: String = get(row, "kind")?;
            let state: String = get(row, "state")?;
            Ok(FinishedOperation {
                id: get_uuid(row, "id")?,
                role: role(&kind)?,
                state: state_of(&state)?,
                created_at: get_time(row, "created_at")?,
                finished_at: get_time(row, "finished_at")?,
                rows: get_u64(row, "rows_durable")?,
                bytes_raw: get_u64(row, "bytes_raw")?,
                bytes_compressed: get_u64(row, "bytes_compressed")?,
            })
        },
    )?;
    finished.sort_by_key(|operation| (operation.finished_at, operation.id));
    Ok(finished)
}

fn role(kind: &str) -> Result<OperationRole, CoordinatorError> {
    OperationRole::parse(kind).ok_or_else(|| CoordinatorError::corrupt("operation kind", kind))
}

fn state_of(state: &str) -> Result<OperationState, CoordinatorError> {
    OperationState::parse(state).ok_or_else(|| CoordinatorError::corrupt("operation state", state))
}
