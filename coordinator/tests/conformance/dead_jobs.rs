//! Jobs dead-lettered after their delivery limit fail the unit they stood
//! for, unless they are stale.

use super::*;

const REASON: &str = "delivery_limit on koan.jobs.default";

async fn dead<S: StateStore>(store: &S, job: &Job) -> Applied {
    store
        .fail_dead_job(job, REASON)
        .await
        .expect("fail_dead_job")
}

fn first_job(messages: &[OutboxMessage], kind: &str) -> Job {
    jobs(messages)
        .into_iter()
        .map(|(_, job)| job)
        .find(|job| koan_protocol::codec::Message::kind(job) == kind)
        .unwrap_or_else(|| panic!("no {kind} job queued"))
}

pub async fn dead_lettered_jobs_fail_their_unit<S: StateStore>(store: &S) {
    // An export job at the chunk's attempt fails the chunk and the backup;
    // one of an earlier attempt changes nothing.
    let operation_id = submit(store).await;
    drain(store, 1000).await;
    changes(store, planned(operation_id, "orders", 2)).await;
    changes(store, planned(operation_id, "invoices", 1)).await;
    let export = first_job(&drain(store, 1000).await, "export_chunk");
    let Job::ExportChunk(chunk_job) = &export else {
        unreachable!()
    };
    let mut stale = chunk_job.clone();
    stale.attempt = chunk_job.attempt + 1;
    assert!(matches!(
        dead(store, &Job::ExportChunk(stale)).await,
        Applied::Unchanged(_)
    ));
    assert_eq!(dead(store, &export).await, Applied::Changed);
    let failed = report(store, operation_id).await;
    assert_eq!(failed.state, OperationState::Failed);
    let error = failed.error.expect("error");
    assert!(
        error.contains(&format!(
            "entity '{}' chunk {}",
            chunk_job.entity.name, chunk_job.chunk
        )) && error.contains("export_chunk job was dead-lettered")
            && error.contains(REASON),
        "{error}"
    );
    assert!(matches!(dead(store, &export).await, Applied::Unchanged(_)));
    let events = events(&drain(store, 1000).await);
    assert!(matches!(events.last(), Some(OperationEvent::Failed(_))));

    // A plan job fails its entity while it is planning, not after.
    let operation_id = submit(store).await;
    let plans = drain(store, 1000).await;
    let plan_orders = first_job_where(
        &plans,
        |job| matches!(job, Job::PlanEntity(plan) if plan.entity.name == "orders"),
    );
    changes(store, planned(operation_id, "orders", 1)).await;
    assert!(matches!(
        dead(store, &plan_orders).await,
        Applied::Unchanged(_)
    ));
    let plan_invoices = first_job_where(
        &plans,
        |job| matches!(job, Job::PlanEntity(plan) if plan.entity.name == "invoices"),
    );
    assert_eq!(dead(store, &plan_invoices).await, Applied::Changed);
    let failed = report(store, operation_id).await;
    assert_eq!(failed.state, OperationState::Failed);
    assert!(
        failed
            .error
            .expect("error")
            .contains("plan_entity job was dead-lettered"),
    );

    // A finalize job fails a finalizing backup.
    let operation_id = submit(store).await;
    let (_, finalize) = run_to_finalizing(store, operation_id).await;
    assert_eq!(dead(store, &finalize).await, Applied::Changed);
    assert_eq!(
        report(store, operation_id).await.state,
        OperationState::Failed
    );

    // An import job fails the restore, naming the part; a unit already
    // imported is not failed by a late duplicate.
    let backup_id = completed_backup(store).await;
    let restore_id = restore(store, backup_id, RestoreMode::Overwrite, &[], None).await;
    drain(store, 1000).await;
    changes(
        store,
        restore_planned(restore_id, &[("orders", 2), ("invoices", 1)], false),
    )
    .await;
    let queued = drain(store, 1000).await;
    let import_of = |unit: u32| {
        first_job_where(
            &queued,
            |job| matches!(job, Job::ImportPart(part) if part.entity.name == "orders" && part.unit == unit),
        )
    };
    changes(store, imported(restore_id, "orders", 0, 50, Vec::new())).await;
    assert!(matches!(
        dead(store, &import_of(0)).await,
        Applied::Unchanged(_)
    ));
    assert_eq!(dead(store, &import_of(1)).await, Applied::Changed);
    let failed = report(store, restore_id).await;
    assert_eq!(failed.state, OperationState::Failed);
    let error = failed.error.expect("error");
    assert!(
        error.contains("entity 'orders' chunk 0 part 1")
            && error.contains("import_part job was dead-lettered"),
        "{error}"
    );
}

fn first_job_where(messages: &[OutboxMessage], wanted: impl Fn(&Job) -> bool) -> Job {
    jobs(messages)
        .into_iter()
        .map(|(_, job)| job)
        .find(|job| wanted(job))
        .expect("a queued job")
}
