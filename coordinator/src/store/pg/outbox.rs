//! The outbox table: messages queued with the change that caused them,
//! drained in id order under an advisory lock, and held-back progress events.

use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::error::CoordinatorError;
use crate::store::rules::{QueuedMessage, stored_trace};
use crate::store::{Drained, OutboxMessage, OutboxSink};

use super::PgStateStore;
use super::db::{Db, get};
use super::operations::{OPERATION_COLUMNS, announce, operation_from_row};

/// Rows inserted by one statement.
const ENQUEUE_BATCH: usize = 1_000;
/// Operations announced by one flush.
const FLUSH_BATCH: i64 = 200;

/// Queues `messages`, in order, in the transaction of `db`, each with the
/// trace context of its operation.
pub(super) async fn enqueue(
    db: &Db<'_>,
    messages: &[QueuedMessage],
) -> Result<(), CoordinatorError> {
    for batch in messages.chunks(ENQUEUE_BATCH) {
        let message_ids: Vec<Uuid> = batch.iter().map(|_| Uuid::now_v7()).collect();
        let operation_ids: Vec<Uuid> = batch.iter().map(|message| message.operation_id).collect();
        let exchanges: Vec<&str> = batch
            .iter()
            .map(|message| message.exchange.as_str())
            .collect();
        let routing_keys: Vec<&str> = batch
            .iter()
            .map(|message| message.routing_key.as_str())
            .collect();
        let kinds: Vec<&str> = batch.iter().map(|message| message.kind.as_str()).collect();
        let payloads: Vec<&[u8]> = batch
            .iter()
            .map(|message| message.payload.as_slice())
            .collect();
        db.execute(
            "queue messages",
            "INSERT INTO {s}.outbox (message_id, exchange, routing_key, kind, payload,
                 traceparent, tracestate)
             SELECT queued.message_id, queued.exchange, queued.routing_key, queued.kind,
                    queued.payload, operation.traceparent, operation.tracestate
             FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::bytea[], $6::uuid[])
                  WITH ORDINALITY
                  AS queued(message_id, exchange, routing_key, kind, payload, operation_id, position)
             LEFT JOIN {s}.operations operation ON operation.id = queued.operation_id
             ORDER BY queued.position",
            &[
                &message_ids,
                &exchanges,
                &routing_keys,
                &kinds,
                &payloads,
                &operation_ids,
            ],
        )
        .await?;
    }
    Ok(())
}

/// Publishes up to `batch` messages in id order through `sink`, then removes them.
///
/// Runs under a transaction-scoped advisory lock: a second coordinator finds
/// it taken and returns at once, so no message is published twice by two
/// drainers. A crash after publishing and before the commit republishes the
/// batch (at-least-once; every consumer is idempotent).
pub(super) async fn drain<K: OutboxSink>(
    store: &PgStateStore,
    sink: &K,
    batch: usize,
) -> Result<Drained, CoordinatorError> {
    let mut client = store.client().await?;
    let db = Db::begin(&mut client, store).await?;
    if !db.try_lock("outbox").await? {
        return Ok(Drained {
            published: 0,
            busy: true,
        });
    }
    let limit = i64::try_from(batch.max(1)).unwrap_or(i64::MAX);
    let rows = db
        .query(
            "read outbox",
            "SELECT id, message_id, exchange, routing_key, kind, payload, traceparent, tracestate
             FROM {s}.outbox ORDER BY id LIMIT $1",
            &[&limit],
        )
        .await?;
    let messages = rows
        .iter()
        .map(|row| {
            Ok(OutboxMessage {
                id: get(row, "id")?,
                message_id: get(row, "message_id")?,
                exchange: get(row, "exchange")?,
                routing_key: get(row, "routing_key")?,
                kind: get(row, "kind")?,
                payload: get(row, "payload")?,
                trace: stored_trace(
                    get(row, "traceparent")?,
                    get::<Option<String>>(row, "tracestate")?.as_deref(),
                ),
            })
        })
        .collect::<Result<Vec<_>, CoordinatorError>>()?;
    // Published together, confirms awaited together; only the confirmed
    // prefix is removed.
    let (confirmed, outcome) = sink.publish_batch(&messages).await;
    let failure = outcome.err();
    let published: Vec<i64> = messages
        .iter()
        .take(confirmed)
        .map(|message| message.id)
        .collect();
    if !published.is_empty() {
        db.execute(
            "remove published messages",
            "DELETE FROM {s}.outbox WHERE id = ANY($1)",
            &[&published],
        )
        .await?;
    }
    db.commit().await?;
    match failure {
        Some(error) => Err(error),
        None => Ok(Drained {
            published: published.len(),
            busy: false,
        }),
    }
}

/// Announces operations whose last change was held back by the progress
/// interval, once the interval has passed.
pub(super) async fn flush_progress(
    store: &PgStateStore,
    now: DateTime<Utc>,
) -> Result<u64, CoordinatorError> {
    let interval = chrono::Duration::from_std(store.policy().progress_interval)
        .unwrap_or_else(|_| chrono::Duration::milliseconds(250));
    let mut client = store.client().await?;
    let db = Db::begin(&mut client, store).await?;
    let text = format!(
        "SELECT {OPERATION_COLUMNS} FROM {{s}}.operations
         WHERE published_sequence < sequence
           AND (published_at IS NULL OR published_at <= $1)
         ORDER BY published_at NULLS FIRST
         LIMIT $2
         FOR UPDATE SKIP LOCKED"
    );
    let rows = db
        .query(
            "read unannounced operations",
            &text,
            &[&(now - interval), &FLUSH_BATCH],
        )
        .await?;
    let mut announced = 0;
    for row in &rows {
        let mut operation = operation_from_row(row)?;
        announce(&db, &mut operation).await?;
        db.execute(
            "mark operation announced",
            "UPDATE {s}.operations SET published_sequence = $2, published_at = $3 WHERE id = $1",
            &[
                &operation.record.id,
                &super::db::int(operation.published_sequence),
                &operation.published_at,
            ],
        )
        .await?;
        announced += 1;
    }
    db.commit().await?;
    Ok(announced)
}
