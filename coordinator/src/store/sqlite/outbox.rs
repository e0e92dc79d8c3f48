//! The outbox table: messages queued with the change that caused them,
//! drained in id order by one drainer at a time, and held-back progress events.
//!
//! One process owns the file, so no advisory lock is needed: a process-wide
//! turn per database (see [`DrainTurn`]) makes sure two drains never publish
//! the same rows at once. The batch is read, published without holding the
//! connection (reports keep applying meanwhile), then removed; a crash in
//! between republishes it with the same message ids (at-least-once, as with
//! PostgreSQL).

use std::collections::BTreeSet;
use std::sync::{Mutex, PoisonError};

use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::error::CoordinatorError;
use crate::store::rules::{QueuedMessage, stored_trace};
use crate::store::{Drained, OutboxMessage, OutboxSink};

use super::SqliteStateStore;
use super::db::{Db, get, get_uuid, int, micros, text};
use super::operations::{OPERATION_COLUMNS, announce, operation_from_row};

/// Operations announced by one flush.
const FLUSH_BATCH: i64 = 200;

/// Databases whose outbox is being drained in this process.
static DRAINING: Mutex<BTreeSet<String>> = Mutex::new(BTreeSet::new());

/// The right to drain one database's outbox, held for one pass and given
/// back when dropped.
#[derive(Debug)]
pub(super) struct DrainTurn {
    key: String,
}

impl DrainTurn {
    /// Takes the turn of the database named `key`; `None` while another drain holds it.
    pub fn take(key: &str) -> Option<Self> {
        let mut draining = DRAINING.lock().unwrap_or_else(PoisonError::into_inner);
        draining.insert(key.to_string()).then(|| Self {
            key: key.to_string(),
        })
    }
}

impl Drop for DrainTurn {
    fn drop(&mut self) {
        DRAINING
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.key);
    }
}

/// Queues `messages`, in order, in the transaction of `db`, each with the
/// trace context of its operation.
pub(super) fn enqueue(db: &Db<'_>, messages: &[QueuedMessage]) -> Result<(), CoordinatorError> {
    for message in messages {
        db.execute(
            "queue message",
            "INSERT INTO outbox (message_id, exchange, routing_key, kind, payload, created_at,
                 traceparent, tracestate)
             SELECT ?1, ?2, ?3, ?4, ?5, ?6, operation.traceparent, operation.tracestate
             FROM (SELECT ?7 AS id) AS queued
             LEFT JOIN operations operation ON operation.id = queued.id",
            (
                text(Uuid::now_v7()),
                &message.exchange,
                &message.routing_key,
                &message.kind,
                &message.payload,
                micros(db.now),
                text(message.operation_id),
            ),
        )?;
    }
    Ok(())
}

/// Publishes up to `batch` messages in id order through `sink`, then removes them.
pub(super) async fn drain<K: OutboxSink>(
    store: &SqliteStateStore,
    sink: &K,
    batch: usize,
) -> Result<Drained, CoordinatorError> {
    let Some(_turn) = DrainTurn::take(store.drain_key()) else {
        return Ok(Drained {
            published: 0,
            busy: true,
        });
    };
    let limit = i64::try_from(batch.max(1)).unwrap_or(i64::MAX);
    let messages = store
        .read(move |db| {
            db.query(
                "read outbox",
                "SELECT id, message_id, exchange, routing_key, kind, payload,
                        traceparent, tracestate
                 FROM outbox ORDER BY id LIMIT ?1",
                [limit],
                |row| {
                    Ok(OutboxMessage {
                        id: get(row, "id")?,
                        message_id: get_uuid(row, "message_id")?,
                        exchange: get(row, "exchange")?,
                        routing_key: get(row, "routing_key")?,
                        kind: get(row, "kind")?,
                        payload: get(row, "payload")?,
                        trace: stored_trace(
                            get(row, "traceparent")?,
                            get::<Option<String>>(row, "tracestate")?.as_deref(),
                        ),
                    })
                },
            )
        })
        .await?;
    // Published together, confirms awaited together; only the confirmed
    // prefix is removed.
    let (confirmed, outcome) = sink.publish_batch(&messages).await;
    let failure = outcome.err();
    let published: Vec<i64> = messages
        .iter()
        .take(confirmed)
        .map(|message| message.id)
        .collect();
    let count = published.len();
    if !published.is_empty() {
        store
            .write(move |db| {
                for id in &published {
                    db.execute(
                        "remove published message",
                        "DELETE FROM outbox WHERE id = ?1",
                        [id],
                    )?;
                }
                Ok(())
            })
            .await?;
    }
    match failure {
        Some(error) => Err(error),
        None => Ok(Drained {
            published: count,
            busy: false,
        }),
    }
}

/// Announces operations whose last change was held back by the progress
/// interval, once the interval has passed.
pub(super) fn flush_progress(db: &Db<'_>, now: DateTime<Utc>) -> Result<u64, CoordinatorError> {
    let interval = chrono::Duration::from_std(db.policy.progress_interval)
        .unwrap_or_else(|_| chrono::Duration::milliseconds(250));
    let sql = format!(
        "SELECT {OPERATION_COLUMNS} FROM operations
         WHERE published_sequence < sequence
           AND (published_at IS NULL OR published_at <= ?1)
         ORDER BY published_at NULLS FIRST
         LIMIT ?2"
    );
    let operations = db.query(
        "read unannounced operations",
        &sql,
        (micros(now - interval), FLUSH_BATCH),
        operation_from_row,
    )?;
    let mut announced = 0;
    for mut operation in operations {
        announce(db, &mut operation)?;
        db.execute(
            "mark operation announced",
            "UPDATE operations SET published_sequence = ?2, published_at = ?3 WHERE id = ?1",
            (
                text(operation.record.id),
                int(operation.published_sequence),
                operation.published_at.map(micros),
            ),
        )?;
        announced += 1;
    }
    Ok(announced)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_drain_turn_per_database() {
        let key = format!("test:{}", Uuid::now_v7());
        let turn = DrainTurn::take(&key).unwrap();
        assert!(DrainTurn::take(&key).is_none(), "turn is held");
        let other = format!("test:{}", Uuid::now_v7());
        assert!(DrainTurn::take(&other).is_some(), "another database drains");
        drop(turn);
        assert!(DrainTurn::take(&key).is_some(), "turn given back");
    }
}
