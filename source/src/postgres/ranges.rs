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
use crate::ranges::{RangePlan, ranges_from_boundaries, rows_per_chunk};

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
