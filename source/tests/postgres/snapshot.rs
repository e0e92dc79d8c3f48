//! Exported snapshots: isolation, release, holder death.

use std::time::Duration;

use koan_protocol::archive::KeyRange;
use koan_source::SourceError;

use crate::support::{TestDb, export_all, koan_entity, range};

#[tokio::test]
async fn snapshot_hides_rows_inserted_after_it() {
    let db = TestDb::new().await;
    db.exec(
        r#"CREATE TABLE s ("Id" integer PRIMARY KEY, "Json" jsonb NOT NULL);
           INSERT INTO s SELECT g, '{}' FROM generate_series(1, 10) g;"#,
    )
    .await;
    let source = db.source(3);
    let entity = source.inspect(&koan_entity("s")).await.expect("inspect");
    let before = chrono::Utc::now();
    let holder = source.open_snapshot().await.expect("snapshot");
    assert!((holder.taken_at() - before).num_seconds().abs() < 60);
    db.exec("INSERT INTO s SELECT g, '{}' FROM generate_series(11, 15) g; DELETE FROM s WHERE \"Id\" = 1").await;

    let all = range(None, None);
    let snapshot_rows = export_all(&source, &entity, &all, None, Some(holder.snapshot_id()))
        .await
        .expect("in snapshot");
    assert_eq!(snapshot_rows.len(), 10);
    assert_eq!(
        snapshot_rows[0].0, "1",
        "deleted row still visible in the snapshot"
    );
    let fresh_rows = export_all(&source, &entity, &all, None, None)
        .await
        .expect("fresh");
    assert_eq!(fresh_rows.len(), 14);

    assert_eq!(
        holder
            .plan_ranges(&entity)
            .await
            .expect("held plan")
            .rows_total,
        10
    );
    assert_eq!(
        source
            .plan_ranges(&entity)
            .await
            .expect("fresh plan")
            .rows_total,
        14
    );
    assert!(holder.is_alive().await);

    // A failing plan must not abort the holding transaction.
    let error = holder
        .plan_ranges(&koan_entity("gone"))
        .await
        .expect_err("missing table");
    assert_eq!(error.code(), "missing_table", "{error}");
    assert!(holder.is_alive().await);
    assert_eq!(
        holder
            .plan_ranges(&entity)
            .await
            .expect("plan again")
            .rows_total,
        10
    );
    holder.release().await;
}

#[tokio::test]
async fn snapshot_is_lost_once_released() {
    let db = TestDb::new().await;
    db.exec(r#"CREATE TABLE s ("Id" text PRIMARY KEY, "Json" jsonb NOT NULL);"#)
        .await;
    let source = db.source(2);
    let entity = source.inspect(&koan_entity("s")).await.expect("inspect");
    let holder = source.open_snapshot().await.expect("snapshot");
    let snapshot_id = holder.snapshot_id().to_string();
    holder.release().await;

    let error = source
        .export(&entity, &KeyRange::default(), None, Some(&snapshot_id))
        .await
        .expect_err("lost");
    assert!(
        matches!(&error, SourceError::SnapshotLost { snapshot_id: id, .. } if *id == snapshot_id),
        "{error:?}"
    );
    assert!(error.to_string().contains(&snapshot_id), "{error}");
    assert_eq!(error.code(), "snapshot_lost");
    assert!(!error.is_retryable());
    let error = source
        .export(&entity, &KeyRange::default(), None, Some("x'; --"))
        .await
        .expect_err("garbage");
    assert_eq!(error.code(), "snapshot_lost");

    // The failed imports left the pool usable.
    assert!(
        export_all(&source, &entity, &KeyRange::default(), None, None)
            .await
            .expect("export")
            .is_empty()
    );
}

#[tokio::test]
async fn a_killed_holder_is_noticed_and_its_snapshot_lost() {
    let db = TestDb::new().await;
    db.exec(r#"CREATE TABLE s ("Id" bigint PRIMARY KEY, "Json" jsonb NOT NULL);"#)
        .await;
    let source = db.source(2);
    let entity = source.inspect(&koan_entity("s")).await.expect("inspect");
    let holder = source.open_snapshot().await.expect("snapshot");
    assert!(holder.is_alive().await);
    let killed: i64 = db
        .client
        .query_one(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
             WHERE datname = current_database() AND state = 'idle in transaction'",
            &[],
        )
        .await
        .expect("terminate")
        .get(0);
    assert_eq!(killed, 1, "exactly the holder is idle in a transaction");
    let mut alive = true;
    for _ in 0..50 {
        alive = holder.is_alive().await;
        if !alive {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(!alive, "a terminated holder is not alive");
    // The client notices the closed socket a moment before the server has
    // finished cleaning up the backend; until then the import still works
    // (and is still consistent), so poll for the loss.
    let mut outcome = Ok(());
    for _ in 0..50 {
        outcome = source
            .export(
                &entity,
                &KeyRange::default(),
                None,
                Some(holder.snapshot_id()),
            )
            .await
            .map(drop);
        if outcome.is_err() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let error = outcome.expect_err("the snapshot of a dead holder is lost");
    assert_eq!(error.code(), "snapshot_lost", "{error}");
    let error = holder.plan_ranges(&entity).await.expect_err("dead holder");
    assert_eq!(error.code(), "connection_lost", "{error}");
    holder.release().await;
}
