//! Conformance checks: `chunk_done` carrying its last part, and group commit
//! (`apply_batch`) with the effects of applying each report on its own.

use koan_coordinator::store::{BatchOutcome, StateStore};
use koan_protocol::events::ClaimChunk;
use koan_protocol::jobs::Job;
use koan_protocol::progress::OperationState;

use super::*;

fn claim_event(operation_id: Uuid, entity: &str, chunk: u32, run: &str) -> WorkerEvent {
    WorkerEvent::ClaimChunk(ClaimChunk {
        operation_id,
        entity: entity.into(),
        chunk,
        attempt: 1,
        run: run.into(),
        worker: format!("worker-{run}"),
    })
}

pub async fn chunk_done_with_its_part_applies_once<S: StateStore>(store: &S) {
    let operation_id = submit(store).await;
    changes(store, planned(operation_id, "orders", 1)).await;
    changes(store, planned(operation_id, "invoices", 1)).await;
    assert!(
        claim(store, operation_id, "orders", 0, 1, "r1")
            .await
            .granted
    );
    // Part 0 on its own, part 1 (the last) carried by chunk_done.
    changes(store, part(operation_id, "orders", 0, 0, "r1", 60, "k60")).await;
    let last = part(operation_id, "orders", 0, 1, "r1", 40, "k99");
    let folded = done_with_part(&last, 2);
    changes(store, folded.clone()).await;
    let after = report(store, operation_id).await;
    assert_eq!((after.rows_done, after.chunks_done), (100, 1));
    assert_eq!(after.entities[0].state, "done");
    // Redelivered (alone or after its part arrived on its own): nothing changes.
    ignored(store, folded.clone()).await;
    ignored(store, last).await;
    let again = report(store, operation_id).await;
    assert_eq!((again.rows_done, again.chunks_done), (100, 1));
    assert_eq!(again.sequence, after.sequence);

    // The folded part counts in the manifest like any other.
    assert!(
        claim(store, operation_id, "invoices", 0, 1, "r1")
            .await
            .granted
    );
    let only = part(operation_id, "invoices", 0, 0, "r1", 100, "i99");
    changes(store, done_with_part(&only, 1)).await;
    ignored(store, done_with_part(&only, 1)).await;
    let finalizing = report(store, operation_id).await;
    assert_eq!(finalizing.state, OperationState::Finalizing);
    assert_eq!(finalizing.rows_done, 200);
    let (_, Job::Finalize(finalize)) = jobs(&drain(store, 500).await)
        .into_iter()
        .find(|(_, job)| matches!(job, Job::Finalize(_)))
        .expect("finalize job")
    else {
        unreachable!()
    };
    let totals = finalize.manifest.totals;
    assert_eq!((totals.chunks, totals.parts, totals.rows), (2, 3, 200));
    let parts: Vec<_> = finalize.manifest.entities[0].chunks[0]
        .parts
        .iter()
        .map(|part| (part.part, part.rows))
        .collect();
    assert_eq!(parts, [(0, 60), (1, 40)]);

    // A folded part from a run that does not own the chunk changes nothing.
    let operation_id = submit(store).await;
    changes(store, planned(operation_id, "orders", 1)).await;
    assert!(
        claim(store, operation_id, "orders", 0, 1, "r1")
            .await
            .granted
    );
    let stale = part(operation_id, "orders", 0, 0, "stale", 10, "k");
    ignored(store, done_with_part(&stale, 1)).await;
    assert_eq!(report(store, operation_id).await.rows_done, 0);
    // A folded part outside the layout is invalid, like the part_written it replaces.
    let mut hostile = part(operation_id, "orders", 0, 0, "r1", 1, "x");
    if let WorkerEvent::PartWritten(written) = &mut hostile {
        written.part.path = "../../elsewhere/part.jsonl.zst".into();
    }
    let error = store.apply(&done_with_part(&hostile, 1)).await.unwrap_err();
    assert_eq!(error.code(), "invalid_report");
    assert_eq!(report(store, operation_id).await.chunks_done, 0);
}

pub async fn a_batch_applies_each_report_as_alone<S: StateStore>(store: &S) {
    let operation_id = submit(store).await;
    changes(store, planned(operation_id, "orders", 2)).await;
    changes(store, planned(operation_id, "invoices", 1)).await;
    drain(store, 500).await;
    let mut hostile = part(operation_id, "orders", 1, 0, "r1", 1, "x");
    if let WorkerEvent::PartWritten(written) = &mut hostile {
        written.part.path = "../../elsewhere/part.jsonl.zst".into();
    }
    let chunk0 = part(operation_id, "orders", 0, 0, "r1", 100, "k50");
    let batch = vec![
        claim_event(operation_id, "orders", 0, "r1"),
        claim_event(operation_id, "orders", 1, "r1"),
        claim_event(operation_id, "orders", 9, "r1"),
        progress(operation_id, "orders", 1, "r1", 30),
        hostile,
        done_with_part(&chunk0, 1),
        // A duplicate in the same batch changes nothing.
        done_with_part(&chunk0, 1),
        // A report for an unknown operation, and a stale run's.
        done(Uuid::now_v7(), "orders", 0, "r1", 1),
        progress(operation_id, "orders", 0, "stale", 5),
    ];
    let outcomes = store.apply_batch(&batch).await.expect("batch");
    assert_eq!(outcomes.len(), batch.len());
    let claimed: Vec<Option<bool>> = outcomes
        .iter()
        .map(|outcome| match outcome {
            Ok(BatchOutcome::Claim(claim)) => Some(claim.granted),
            _ => None,
        })
        .collect();
    assert_eq!(&claimed[..3], [Some(true), Some(true), Some(false)]);
    assert_eq!(
        outcomes[3].as_ref().expect("progress"),
        &BatchOutcome::Applied(Applied::Changed)
    );
    let error = outcomes[4]
        .as_ref()
        .expect_err("the hostile part is invalid");
    assert_eq!(error.code(), "invalid_report");
    assert_eq!(
        outcomes[5].as_ref().expect("done"),
        &BatchOutcome::Applied(Applied::Changed)
    );
    for (position, outcome) in outcomes.iter().enumerate().skip(6) {
        assert!(
            matches!(outcome, Ok(BatchOutcome::Applied(Applied::Unchanged(_)))),
            "{position}: {outcome:?}"
        );
    }
    // Everything but the invalid report was committed.
    let after = report(store, operation_id).await;
    assert_eq!(after.chunks_done, 1);
    assert_eq!(
        after.rows_done, 130,
        "100 durable in chunk 0, 30 streamed in chunk 1"
    );
    // The claims took effect: chunk 1 belongs to r1.
    changes(store, progress(operation_id, "orders", 1, "r1", 40)).await;
    assert_eq!(report(store, operation_id).await.rows_done, 140);

    // The rest of the backup in one batch, finalizing at its end.
    let chunk1 = part(operation_id, "orders", 1, 0, "r1", 100, "k99");
    let invoices = part(operation_id, "invoices", 0, 0, "r1", 100, "i99");
    let rest = vec![
        done_with_part(&chunk1, 1),
        claim_event(operation_id, "invoices", 0, "r1"),
        done_with_part(&invoices, 1),
    ];
    let outcomes = store.apply_batch(&rest).await.expect("batch");
    assert!(outcomes.iter().all(Result::is_ok), "{outcomes:?}");
    let finalizing = report(store, operation_id).await;
    assert_eq!(finalizing.state, OperationState::Finalizing);
    assert_eq!((finalizing.rows_done, finalizing.chunks_done), (300, 3));
    let messages = drain(store, 500).await;
    let finalize_jobs = jobs(&messages)
        .into_iter()
        .filter(|(_, job)| matches!(job, Job::Finalize(_)))
        .count();
    assert_eq!(finalize_jobs, 1);
    let percents: Vec<_> = events(&messages)
        .iter()
        .map(|event| event.report().percent)
        .collect();
    assert!(
        percents.windows(2).all(|pair| pair[0] <= pair[1]),
        "{percents:?}"
    );

    // A batch of nothing but changes-nothing reports commits nothing.
    let outcomes = store.apply_batch(&rest).await.expect("batch of duplicates");
    assert!(
        outcomes.iter().all(|outcome| matches!(
            outcome,
            Ok(BatchOutcome::Applied(Applied::Unchanged(_)))
                | Ok(BatchOutcome::Claim(ChunkClaim { granted: false, .. }))
        )),
        "{outcomes:?}"
    );
    assert_eq!(
        report(store, operation_id).await.sequence,
        finalizing.sequence
    );
}
