//! Range planning: count the entity's rows and pick key boundaries so every
//! chunk holds the same number of rows, whatever the key distribution.
//!
//! Boundaries are the keys at row numbers `N+1, 2N+1, ...` in key order
//! (`row_number() OVER (ORDER BY key)`), so chunk `i` is `[b_i, b_{i+1})` and
//! holds exactly `N` rows (the last one fewer). Sampling or splitting the key
//! space arithmetically would not survive skewed text keys, uuids or bigint
//! keys with huge gaps; ranking does.

use koan_protocol::archive::KeyRange;
use koan_protocol::plan::EntitySpec;
use tokio_postgres::Client;
use tokio_postgres::types::ToSql;

use crate::error::SourceError;
use crate::postgres::sql::EntitySql;

/// Bytes of document one chunk should hold at most, whatever `chunk_rows` says.
pub const MAX_CHUNK_BYTES: u64 = 256 * 1024 * 1024;

/// The key ranges of one entity, and the counts they were chosen from.
#[derive(Debug, Clone, PartialEq)]
pub struct RangePlan {
    /// Rows of the entity (within its scope) at planning time.
    pub rows_total: u64,
    /// Rows per chunk the ranges were cut for.
    pub rows_per_chunk: u64,
    /// Contiguous ranges in key order, covering the whole key space:
    /// `[None, b1), [b1, b2), ..., [bk, None)`.
    pub ranges: Vec<KeyRange>,
}

/// Rows per chunk: the entity's target, lowered so a chunk stays near [`MAX_CHUNK_BYTES`].
pub fn rows_per_chunk(chunk_rows: u64, average_row_bytes: f64) -> u64 {
    let by_size = if average_row_bytes.is_finite() && average_row_bytes >= 1.0 {
        // Truncation is intended: a whole number of rows.
        ((MAX_CHUNK_BYTES as f64) / average_row_bytes) as u64
    } else {
        u64::MAX
    };
    chunk_rows.min(by_size.max(1)).max(1)
}

/// Turns sorted boundary keys into contiguous ranges covering everything.
pub fn ranges_from_boundaries(boundaries: Vec<String>) -> Vec<KeyRange> {
    let mut ranges = Vec::with_capacity(boundaries.len() + 1);
    let mut lo = None;
    for boundary in boundaries {
        ranges.push(KeyRange {
            lo: lo.take(),
            hi: Some(boundary.clone()),
        });
        lo = Some(boundary);
    }
    ranges.push(KeyRange { lo, hi: None });
    ranges
}

/// Plans `entity` on `client`, which must already be inside the transaction
/// (fresh repeatable read, or the held snapshot) the counts should come from.
pub(crate) async fn plan_on(
    client: &Client,
    entity: &EntitySpec,
) -> Result<RangePlan, SourceError> {
    let sql = EntitySql::new(entity)?;
    let context = || format!("plan ranges of entity {}", entity.name);
    let scope = sql.scope_value();

    let count_row = match scope {
        Some(scope) => client.query_one(&sql.count_query(), &[&scope]).await,
        None => client.query_one(&sql.count_query(), &[]).await,
    }
    .map_err(|error| SourceError::query(context(), error))?;
    let count: i64 = count_row
        .try_get(0)
        .map_err(|error| SourceError::query(context(), error))?;
    let average: f64 = count_row
        .try_get(1)
        .map_err(|error| SourceError::query(context(), error))?;
    let rows_total = u64::try_from(count).unwrap_or(0);
    let rows_per_chunk = rows_per_chunk(entity.chunk_rows, average);

    if rows_total <= rows_per_chunk {
        return Ok(RangePlan {
            rows_total,
            rows_per_chunk,
            ranges: vec![KeyRange::default()],
        });
    }

    let step = i64::try_from(rows_per_chunk).unwrap_or(i64::MAX);
    let boundary_query = sql.boundary_query();
    let params: Vec<&(dyn ToSql + Sync)> = match &scope {
        Some(scope) => vec![scope, &step],
        None => vec![&step],
    };
    let rows = client
        .query(&boundary_query, &params)
        .await
        .map_err(|error| SourceError::query(context(), error))?;
    let mut boundaries = Vec::with_capacity(rows.len());
    for row in rows {
        boundaries.push(
            row.try_get::<_, String>(0)
                .map_err(|error| SourceError::query(context(), error))?,
        );
    }
    let ranges = ranges_from_boundaries(boundaries);
    tracing::debug!(
        entity = %entity.name,
        rows_total,
        rows_per_chunk,
        chunks = ranges.len(),
        "planned key ranges"
    );
    Ok(RangePlan {
        rows_total,
        rows_per_chunk,
        ranges,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_size_respects_target_and_byte_budget() {
        assert_eq!(rows_per_chunk(100_000, 0.0), 100_000);
        assert_eq!(rows_per_chunk(100_000, 100.0), 100_000);
        assert_eq!(rows_per_chunk(100_000, 1024.0 * 1024.0), 256);
        assert_eq!(rows_per_chunk(100_000, 1024.0 * 1024.0 * 1024.0), 1);
        assert_eq!(rows_per_chunk(0, 10.0), 1);
        assert_eq!(rows_per_chunk(10, f64::NAN), 10);
    }

    #[test]
    fn boundaries_become_contiguous_ranges() {
        assert_eq!(ranges_from_boundaries(vec![]), vec![KeyRange::default()]);
        let ranges = ranges_from_boundaries(vec!["b".into(), "m".into()]);
        let range = |lo: Option<&str>, hi: Option<&str>| KeyRange {
            lo: lo.map(str::to_string),
            hi: hi.map(str::to_string),
        };
        assert_eq!(
            ranges,
            vec![
                range(None, Some("b")),
                range(Some("b"), Some("m")),
                range(Some("m"), None)
            ]
        );
    }
}
