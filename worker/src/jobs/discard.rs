//! `discard_backup`: remove every object a cancelled backup wrote, the
//! manifest included, then report `Discarded`.
//!
//! The `cancelled` event that stops the backup's exports is published before
//! this job, but an export may be completing a part at that moment; so the
//! prefixes are swept twice, `settle` apart. Deleting what is already gone is
//! not an error: the job is idempotent and a redelivery removes the rest.
//! Only backup prefixes (`{bucket}/{scope}/{plan_id}/{backup_id}`) are
//! accepted, so a hostile job cannot empty the whole store.

use std::time::Duration;

use koan_protocol::events::{Discarded, WorkerEvent};
use koan_protocol::jobs::DiscardBackup;
use tracing::{info, warn};
use uuid::Uuid;

use super::{Outcome, is_last_delivery};
use crate::error::WorkerError;
use crate::events::Events;
use crate::storage::Storage;

/// Runs a `discard_backup` job; see the module documentation.
pub async fn discard_backup<E: Events>(
    storage: &Storage,
    events: &E,
    job: &DiscardBackup,
    delivery_count: u32,
    settle: Duration,
) -> Result<Outcome, WorkerError> {
    if let Some(bad) = job.prefixes.iter().find(|prefix| !is_backup_prefix(prefix)) {
        warn!(operation_id = %job.operation_id, prefix = %bad.escape_default(), "discard names a path that is not a backup prefix, dropping the job");
        return Ok(Outcome::Ack);
    }
    let swept = async {
        let mut removed = sweep(storage, &job.prefixes).await?;
        tokio::time::sleep(settle).await;
        removed += sweep(storage, &job.prefixes).await?;
        Ok::<u64, WorkerError>(removed)
    };
    match swept.await {
        Ok(objects_removed) => {
            events
                .publish(&WorkerEvent::Discarded(Discarded {
                    operation_id: job.operation_id,
                    objects_removed,
                }))
                .await?;
            info!(operation_id = %job.operation_id, objects_removed, "cancelled backup discarded");
            Ok(Outcome::Ack)
        }
        Err(error) => {
            let retry = error.is_retryable() && !is_last_delivery(delivery_count);
            warn!(operation_id = %job.operation_id, code = error.code(), retry, %error, "discarding a cancelled backup failed");
            Ok(if retry {
                Outcome::Requeue
            } else {
                Outcome::Ack
            })
        }
    }
}

async fn sweep(storage: &Storage, prefixes: &[String]) -> Result<u64, WorkerError> {
    let mut removed = 0u64;
    for prefix in prefixes {
        for object in storage.list(prefix).await? {
            storage.delete(object.location.as_ref()).await?;
            removed += 1;
        }
    }
    Ok(removed)
}

/// `{bucket}/{scope}/{plan_id}/{backup_id}` with a UUID backup id and no empty,
/// `.` or `..` segment.
fn is_backup_prefix(prefix: &str) -> bool {
    let segments: Vec<&str> = prefix.split('/').collect();
    segments.len() == 4
        && segments
            .iter()
            .all(|segment| !segment.is_empty() && *segment != "." && *segment != "..")
        && segments
            .last()
            .is_some_and(|id| Uuid::parse_str(id).is_ok())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::events::MemoryEvents;

    fn storage() -> (std::path::PathBuf, Storage) {
        let directory = std::env::temp_dir().join(format!("koan-discard-{}", Uuid::new_v4()));
        let url = format!("file://{}", directory.display());
        (directory, Storage::open(&url).unwrap())
    }

    #[tokio::test]
    async fn removes_everything_under_the_prefixes_and_is_idempotent() {
        let (directory, storage) = storage();
        let id = Uuid::now_v7();
        let prefix = format!("orders/tenant-a/daily/{id}");
        storage
            .put(
                &format!("{prefix}/entities/orders/000000-0000-r1.jsonl.zst"),
                b"x".to_vec(),
            )
            .await
            .unwrap();
        storage
            .put(&format!("{prefix}/manifest.json"), b"{}".to_vec())
            .await
            .unwrap();
        let other = format!("orders/tenant-a/daily/{}/manifest.json", Uuid::now_v7());
        storage.put(&other, b"{}".to_vec()).await.unwrap();
        let job = DiscardBackup {
            operation_id: id,
            prefixes: vec![prefix.clone()],
        };
        let events = MemoryEvents::granting();
        let outcome = discard_backup(&storage, &events, &job, 0, Duration::ZERO).await;
        assert_eq!(outcome.unwrap(), Outcome::Ack);
        assert!(storage.list(&prefix).await.unwrap().is_empty());
        assert_eq!(storage.list("orders").await.unwrap().len(), 1);
        let again = discard_backup(&storage, &events, &job, 1, Duration::ZERO).await;
        assert_eq!(again.unwrap(), Outcome::Ack);
        let removed: Vec<u64> = events
            .events()
            .iter()
            .filter_map(|event| match event {
                WorkerEvent::Discarded(discarded) => Some(discarded.objects_removed),
                _ => None,
            })
            .collect();
        assert_eq!(removed, [2, 0]);
        std::fs::remove_dir_all(&directory).unwrap();
    }

    #[test]
    fn accepts_only_backup_prefixes() {
        let id = Uuid::nil();
        assert!(is_backup_prefix(&format!("b/s/p/{id}")));
        assert!(!is_backup_prefix("b/s/p"));
        assert!(!is_backup_prefix(&format!("b/../p/{id}")));
        assert!(!is_backup_prefix("b/s/p/not-a-uuid"));
        assert!(!is_backup_prefix(""));
    }
}
