//! Conformance checks: the figures behind the coordinator's metrics — data
//! jobs waiting and running per pool, operations by state, and ended
//! operations taken exactly once.

use super::*;

fn pool<'w>(
    workload: &'w koan_coordinator::store::Workload,
    name: &str,
) -> Option<&'w koan_coordinator::store::PoolWorkload> {
    workload.pools.iter().find(|pool| pool.pool == name)
}

fn count(
    workload: &koan_coordinator::store::Workload,
    role: koan_coordinator::store::OperationRole,
    state: OperationState,
) -> u64 {
    workload
        .operations
        .iter()
        .find(|count| count.role == role && count.state == state)
        .map_or(0, |count| count.count)
}

/// Chunks and restore units are counted per pool while their operation runs;
/// ended operations are taken once each, with their figures.
pub async fn workload_per_pool_and_ended_operations_once<S: StateStore>(store: &S) {
    use koan_coordinator::store::OperationRole;

    let started = Utc::now() - chrono::TimeDelta::seconds(1);
    let empty = store.workload().await.expect("workload");
    assert!(
        empty.pools.is_empty() && empty.operations.is_empty(),
        "{empty:?}"
    );
    assert!(store.take_finished(10).await.expect("take").is_empty());

    // A backup: orders (pool default) in 2 chunks, invoices (pool billing) in 1.
    let backup = submit(store).await;
    let planning = store.workload().await.expect("workload");
    assert!(planning.pools.is_empty(), "{planning:?}");
    assert_eq!(
        count(&planning, OperationRole::Backup, OperationState::Planning),
        1
    );
    changes(store, planned(backup, "orders", 2)).await;
    changes(store, planned(backup, "invoices", 1)).await;
    let planned_work = store.workload().await.expect("workload");
    let default = pool(&planned_work, "default").expect("pool default");
    assert_eq!((default.waiting, default.running), (2, 0));
    let since = default.oldest_waiting_since.expect("a chunk waits");
    assert!(since >= started && since <= Utc::now(), "{since}");
    let billing = pool(&planned_work, "billing").expect("pool billing");
    assert_eq!((billing.waiting, billing.running), (1, 0));
    assert_eq!(planned_work.pools.len(), 2);
    assert_eq!(
        count(
            &planned_work,
            OperationRole::Backup,
            OperationState::Running
        ),
        1
    );

    // A claimed chunk runs; a finished one is gone.
    assert!(claim(store, backup, "orders", 0, 1, "r1").await.granted);
    let claimed = store.workload().await.expect("workload");
    let default = pool(&claimed, "default").expect("pool default");
    assert_eq!((default.waiting, default.running), (1, 1));
    changes(store, part(backup, "orders", 0, 0, "r1", 100, "orders-0-a")).await;
    changes(store, done(backup, "orders", 0, "r1", 1)).await;
    let one_done = store.workload().await.expect("workload");
    let default = pool(&one_done, "default").expect("pool default");
    assert_eq!((default.waiting, default.running), (1, 0));

    // A paused operation's chunks wait for nobody.
    assert!(matches!(
        store.pause(backup).await.expect("pause"),
        koan_coordinator::store::Lifecycle::Done { existing: false }
    ));
    let paused = store.workload().await.expect("workload");
    assert!(paused.pools.is_empty(), "{paused:?}");
    assert!(store.take_finished(10).await.expect("take").is_empty());

    // Another backup completes: taken once, with its figures.
    let completed = completed_backup(store).await;
    let taken = store.take_finished(10).await.expect("take");
    assert_eq!(taken.len(), 1, "{taken:?}");
    let ended = &taken[0];
    assert_eq!(ended.id, completed);
    assert_eq!(ended.role, OperationRole::Backup);
    assert_eq!(ended.state, OperationState::Completed);
    assert_eq!(
        (ended.rows, ended.bytes_raw, ended.bytes_compressed),
        (300, 3000, 900)
    );
    assert!(ended.created_at <= ended.finished_at);
    assert!(store.take_finished(10).await.expect("take").is_empty());

    // A restore into pool `staging`: one unit per part, waiting until imported.
    let restored = restore(store, completed, RestoreMode::Merge, &[], Some("staging")).await;
    changes(
        store,
        restore_planned(restored, &[("orders", 2), ("invoices", 1)], false),
    )
    .await;
    let restoring = store.workload().await.expect("workload");
    let staging = pool(&restoring, "staging").expect("pool staging");
    assert_eq!((staging.waiting, staging.running), (3, 0));
    assert!(staging.oldest_waiting_since.is_some());
    changes(store, imported(restored, "orders", 0, 50, Vec::new())).await;
    let importing = store.workload().await.expect("workload");
    let staging = pool(&importing, "staging").expect("pool staging");
    assert_eq!(staging.waiting, 2);
    assert_eq!(importing.pools.len(), 1, "{importing:?}");

    // Cancelling the paused backup ends it: taken next, once.
    assert!(matches!(
        store.cancel(backup).await.expect("cancel"),
        koan_coordinator::store::Lifecycle::Done { existing: false }
    ));
    let taken = store.take_finished(10).await.expect("take");
    assert_eq!(taken.len(), 1, "{taken:?}");
    assert_eq!(
        (taken[0].id, taken[0].state, taken[0].rows),
        (backup, OperationState::Cancelled, 100)
    );
    assert!(store.take_finished(10).await.expect("take").is_empty());

    let last = store.workload().await.expect("workload");
    assert_eq!(
        count(&last, OperationRole::Backup, OperationState::Completed),
        1
    );
    assert_eq!(
        count(&last, OperationRole::Backup, OperationState::Cancelled),
        1
    );
    assert_eq!(
        count(&last, OperationRole::Restore, OperationState::Running),
        1
    );
    assert_eq!(
        last.operations.iter().map(|count| count.count).sum::<u64>(),
        3
    );
}
