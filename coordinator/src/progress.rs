//! Progress math: percent, ETA, continuation token and the progress report.
//!
//! Pure functions over stored figures, shared by every state store backend.
//!
//! - While any entity is still planning, percent is 0 (totals are not known).
//! - Then it is 99 × rows done / rows total (chunks done / chunks total when
//!   the plan has no rows), rounded down to a tenth.
//! - 99 while the manifest is written; exactly 100 only once it is.
//! - It never decreases: the stored value is the greatest ever computed.
//!
//! Restores, replays and verifies use the same figures: their units (parts,
//! replay batches, verified parts) are the chunks, and rows imported, replayed
//! or verified are the durable rows.

use chrono::{DateTime, Utc};

use koan_protocol::progress::{EntityProgress, OperationState, ProgressReport};
use koan_protocol::token::{self, TokenPayload};

use crate::store::{EntityRecord, OperationRecord};

/// The figures percent is computed from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Counters {
    /// Entities in the plan.
    pub entities_total: u64,
    /// Entities planned.
    pub entities_planned: u64,
    /// Rows counted by the planned entities.
    pub rows_total: u64,
    /// Rows durable or streamed.
    pub rows_done: u64,
    /// Chunks planned.
    pub chunks_total: u64,
    /// Chunks done.
    pub chunks_done: u64,
}

impl Counters {
    /// The counters of a stored operation.
    pub fn of(operation: &OperationRecord) -> Self {
        Self {
            entities_total: operation.entities_total,
            entities_planned: operation.entities_planned,
            rows_total: operation.rows_total,
            rows_done: operation
                .rows_durable
                .saturating_add(operation.rows_pending),
            chunks_total: operation.chunks_total,
            chunks_done: operation.chunks_done,
        }
    }
}

/// Percent of work done in `state`, before monotonicity is applied.
pub fn percent(state: OperationState, counters: &Counters) -> f64 {
    match state {
        OperationState::Completed => 100.0,
        OperationState::Finalizing => 99.0,
        _ if counters.entities_planned < counters.entities_total => 0.0,
        _ if counters.rows_total > 0 => tenths_of_99(counters.rows_done, counters.rows_total),
        _ if counters.chunks_total > 0 => tenths_of_99(counters.chunks_done, counters.chunks_total),
        _ => 0.0,
    }
}

/// The percent to store: never below what was stored, 100 only when completed.
pub fn next_percent(stored: f64, state: OperationState, counters: &Counters) -> f64 {
    let computed = percent(state, counters);
    let kept = if stored.is_finite() { stored } else { 0.0 };
    let next = kept.max(computed);
    if state == OperationState::Completed {
        next
    } else {
        next.min(99.0)
    }
}

/// 99 × done / total, rounded down to a tenth, computed in integers (no float drift).
fn tenths_of_99(done: u64, total: u64) -> f64 {
    let done = u128::from(done.min(total));
    let tenths = done * 990 / u128::from(total.max(1));
    // At most 990, exact in an f64.
    f64::from(u32::try_from(tenths).unwrap_or(990)) / 10.0
}

/// Seconds left at the row rate observed since `running_since`, while running.
pub fn eta_seconds(
    state: OperationState,
    counters: &Counters,
    running_since: Option<DateTime<Utc>>,
    now: DateTime<Utc>,
) -> Option<u64> {
    if !matches!(state, OperationState::Running | OperationState::Planning)
        || counters.entities_planned < counters.entities_total
        || counters.rows_done == 0
        || counters.rows_total == 0
    {
        return None;
    }
    let elapsed_ms = u64::try_from((now - running_since?).num_milliseconds()).ok()?;
    if elapsed_ms < 1_000 {
        return None;
    }
    let remaining = counters.rows_total.saturating_sub(counters.rows_done);
    // remaining / (done / elapsed), rounded up, in milliseconds then seconds.
    let remaining_ms =
        u128::from(remaining) * u128::from(elapsed_ms) / u128::from(counters.rows_done);
    u64::try_from(remaining_ms.div_ceil(1_000)).ok()
}

/// The continuation token naming the operation's durable position.
pub fn continuation_token(operation: &OperationRecord, secret: &[u8; 32]) -> String {
    token::sign(
        &TokenPayload {
            operation_id: operation.id,
            parts_done: operation.parts_done,
            rows_done: operation.rows_durable,
        },
        secret,
    )
}

/// The progress report of `operation` and its `entities` (in plan order).
pub fn report(
    operation: &OperationRecord,
    entities: &[EntityRecord],
    secret: &[u8; 32],
    now: DateTime<Utc>,
) -> ProgressReport {
    let counters = Counters::of(operation);
    ProgressReport {
        operation_id: operation.id,
        kind: operation.kind(),
        state: operation.state,
        plan_id: operation.plan_id.clone(),
        backup_id: operation.backup_id,
        percent: operation.percent,
        rows_done: counters.rows_done,
        rows_total: operation.rows_total,
        bytes_done: operation
            .bytes_raw
            .saturating_add(operation.bytes_raw_pending),
        bytes_compressed: operation.bytes_compressed,
        chunks_done: operation.chunks_done,
        chunks_total: operation.chunks_total,
        entities: entities.iter().map(entity_progress).collect(),
        eta_seconds: eta_seconds(operation.state, &counters, operation.running_since, now),
        continuation_token: Some(continuation_token(operation, secret)),
        manifest: operation.manifest.clone(),
        error: operation.error.clone(),
        labels: operation.labels.clone(),
        description: operation.description.clone(),
        created_at: operation.created_at,
        updated_at: operation.updated_at,
        sequence: operation.sequence,
        mode: operation.mode.map(|mode| mode.as_str().to_string()),
        rows_written: operation.rows_written,
        rows_skipped: operation.rows_skipped,
        rows_failed: operation.rows_failed,
        problems: operation.problems.clone(),
        source_operation: operation.source_operation,
    }
}

fn entity_progress(entity: &EntityRecord) -> EntityProgress {
    EntityProgress {
        name: entity.name.clone(),
        state: entity.state.as_str().to_string(),
        rows_done: entity.rows_durable.saturating_add(entity.rows_pending),
        rows_total: entity.rows_total,
        bytes_done: entity.bytes_raw.saturating_add(entity.bytes_raw_pending),
        chunks_done: entity.chunks_done,
        chunks_total: entity.chunks_total,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use OperationState::*;

    fn counters(planned: u64, rows_done: u64, rows_total: u64) -> Counters {
        Counters {
            entities_total: 2,
            entities_planned: planned,
            rows_total,
            rows_done,
            chunks_total: 4,
            chunks_done: 1,
        }
    }

    #[test]
    fn zero_while_planning_then_rows() {
        assert_eq!(percent(Planning, &counters(1, 500, 1000)), 0.0);
        assert_eq!(percent(Running, &counters(2, 500, 1000)), 49.5);
        assert_eq!(percent(Running, &counters(2, 1000, 1000)), 99.0);
        // More rows than counted (rows added under per-chunk consistency): still 99.
        assert_eq!(percent(Running, &counters(2, 1500, 1000)), 99.0);
        assert_eq!(percent(Running, &counters(2, 1, 3)), 33.0);
        assert_eq!(percent(Running, &counters(2, 2, 3)), 66.0);
        assert_eq!(percent(Running, &counters(2, 1, 7)), 14.1);
    }

    #[test]
    fn rounds_down_to_a_tenth() {
        // 99 × 999 / 1000 = 98.901 → 98.9
        assert_eq!(percent(Running, &counters(2, 999, 1000)), 98.9);
        // 99 × 1 / 1_000_000 = 0.000099 → 0
        assert_eq!(percent(Running, &counters(2, 1, 1_000_000)), 0.0);
        assert_eq!(percent(Running, &counters(2, u64::MAX - 1, u64::MAX)), 98.9);
    }

    #[test]
    fn chunks_when_no_rows() {
        assert_eq!(percent(Running, &counters(2, 0, 0)), 24.7);
        let empty = Counters {
            entities_total: 1,
            entities_planned: 1,
            ..Counters::default()
        };
        assert_eq!(percent(Running, &empty), 0.0);
    }

    #[test]
    fn finalizing_and_completed() {
        assert_eq!(percent(Finalizing, &counters(2, 10, 1000)), 99.0);
        assert_eq!(percent(Completed, &counters(2, 10, 1000)), 100.0);
    }

    #[test]
    fn never_decreases_and_100_only_when_completed() {
        let stored = next_percent(0.0, Running, &counters(2, 600, 1000));
        assert_eq!(stored, 59.4);
        // A superseded run lost its streamed rows: percent holds.
        assert_eq!(next_percent(stored, Running, &counters(2, 300, 1000)), 59.4);
        assert_eq!(next_percent(stored, Failed, &counters(2, 0, 1000)), 59.4);
        assert_eq!(next_percent(99.0, Finalizing, &counters(2, 0, 0)), 99.0);
        assert_eq!(next_percent(100.0, Running, &counters(2, 0, 0)), 99.0);
        assert_eq!(next_percent(99.0, Completed, &counters(2, 0, 0)), 100.0);
        assert_eq!(
            next_percent(f64::NAN, Running, &counters(2, 500, 1000)),
            49.5
        );
    }

    #[test]
    fn eta_from_the_row_rate() {
        let start = DateTime::parse_from_rfc3339("2025-01-01T00:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        let now = start + chrono::Duration::seconds(10);
        // 250 rows in 10 s: 750 rows left take 30 s.
        assert_eq!(
            eta_seconds(Running, &counters(2, 250, 1000), Some(start), now),
            Some(30)
        );
        assert_eq!(
            eta_seconds(Running, &counters(2, 0, 1000), Some(start), now),
            None
        );
        assert_eq!(
            eta_seconds(Running, &counters(1, 250, 1000), Some(start), now),
            None
        );
        assert_eq!(
            eta_seconds(Running, &counters(2, 250, 1000), None, now),
            None
        );
        assert_eq!(
            eta_seconds(Completed, &counters(2, 1000, 1000), Some(start), now),
            None
        );
        assert_eq!(
            eta_seconds(Running, &counters(2, 333, 1000), Some(start), now),
            Some(21)
        );
    }
}
