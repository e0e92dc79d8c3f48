//! The worker service over a real RabbitMQ (a vhost of its own) and
//! PostgreSQL (a database of its own), with the test playing coordinator:
//! poison jobs are dead-lettered, a snapshot plan is reported and its
//! snapshot held until the operation completes, chunk claims are answered
//! and exports reported, and shutdown returns within the grace period.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use koan_protocol::codec::Message;
use koan_protocol::events::{ChunkClaim, ClaimReply, WorkerEvent};
use koan_protocol::jobs::{ExportChunk, Job, PlanEntity};
use koan_protocol::plan::{BackupEntity, BackupPlan, Consistency};
use koan_protocol::topology::{
    COORDINATOR_QUEUE, DEAD_QUEUE, DEAD_REASON_HEADER, EVENTS_EXCHANGE, JOBS_EXCHANGE,
    operation_event_key,
};
use koan_transport::{Broker, Outgoing, Subscription, rpc, topology};
use koan_worker::Config;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use common::{TestDatabase, TestVhost};

const WAIT: Duration = Duration::from_secs(20);

async fn next(subscription: &mut Subscription) -> koan_transport::Incoming {
    tokio::time::timeout(WAIT, subscription.next())
        .await
        .unwrap_or_else(|_| {
            panic!(
                "nothing arrived on {} within {WAIT:?}",
                subscription.queue()
            )
        })
        .unwrap()
}

async fn publish_job(broker: &Broker, job: &Job) {
    let outgoing = Outgoing::encode(JOBS_EXCHANGE, "default", job).unwrap();
    broker.publish(&outgoing).await.unwrap();
}

async fn snapshot_sessions(client: &tokio_postgres::Client, database: &str) -> i64 {
    client
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 AND state = 'idle in transaction'",
            &[&database],
        )
        .await
        .unwrap()
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_jobs_over_rabbitmq() {
    let vhost = TestVhost::create();
    let database = TestDatabase::create().await;
    let client = database.client().await;
    client
        .batch_execute(
            r#"CREATE TABLE "Order" ("Id" uuid PRIMARY KEY, "Json" jsonb NOT NULL);
               INSERT INTO "Order" SELECT gen_random_uuid(), jsonb_build_object('n', n) FROM generate_series(1, 900) n;"#,
        )
        .await
        .unwrap();

    let broker = Broker::connect(&vhost.url, "test coordinator").await.unwrap_or_else(|error| {
        panic!("{error} (RabbitMQ must listen on 127.0.0.1:5672; start it with `rabbitmq-server -detached`)")
    });
    topology::declare_coordinator(broker.publisher())
        .await
        .unwrap();
    topology::declare_pool(broker.publisher(), "default")
        .await
        .unwrap();
    let mut reports = broker.subscribe(COORDINATOR_QUEUE, 100).await.unwrap();
    let mut dead = broker.subscribe(DEAD_QUEUE, 10).await.unwrap();

    let mut config = Config::new(database.url.clone());
    config.amqp_url = vhost.url.clone();
    config.storage_url = database.directory.display().to_string();
    config.grace_seconds = 5;
    let shutdown = CancellationToken::new();
    let worker = tokio::spawn(koan_worker::run(config, shutdown.clone()));

    // A poison job is dead-lettered with a reason, and the worker keeps serving.
    let poison = Outgoing {
        exchange: JOBS_EXCHANGE.into(),
        routing_key: "default".into(),
        payload: b"\xc1 not a job".to_vec(),
        kind: "export_chunk".into(),
        message_id: "poison-1".into(),
        correlation_id: None,
        reply_to: None,
        headers: Vec::new(),
    };
    broker.publish(&poison).await.unwrap();
    let dead_letter = next(&mut dead).await;
    let reason = dead_letter.header(DEAD_REASON_HEADER).unwrap_or_default();
    assert!(reason.starts_with("malformed"), "{reason}");
    dead_letter.ack().await.unwrap();

    // Plan under a snapshot: reported, and the snapshot stays open.
    let plan =
        BackupPlan::new("orders").entity(BackupEntity::new("orders", "Order").chunk_rows(300));
    let operation_id = Uuid::now_v7();
    let plan_job = PlanEntity {
        operation_id,
        plan_id: plan.plan_id.clone(),
        backup_id: operation_id,
        entity: plan.entity_specs().remove(0),
        consistency: Consistency::Snapshot,
    };
    publish_job(&broker, &Job::PlanEntity(plan_job)).await;
    let report = next(&mut reports).await;
    let WorkerEvent::EntityPlanned(planned) =
        koan_protocol::decode::<WorkerEvent>(&report.payload).unwrap()
    else {
        panic!("expected entity_planned, got {:?}", report.kind);
    };
    report.ack().await.unwrap();
    assert_eq!(planned.rows_total, 900);
    let snapshot_id = planned
        .snapshot
        .as_ref()
        .and_then(|facts| facts.snapshot_id.clone());
    assert!(snapshot_id.is_some());
    assert_eq!(snapshot_sessions(&client, &database.name).await, 1);

    // Export every chunk, answering the claims as the coordinator would.
    for (chunk, range) in planned.ranges.iter().enumerate() {
        let job = ExportChunk {
            operation_id,
            plan_id: plan.plan_id.clone(),
            backup_id: operation_id,
            entity: planned.entity.clone(),
            chunk: u32::try_from(chunk).unwrap(),
            range: range.clone(),
            snapshot_id: snapshot_id.clone(),
            attempt: 1,
            part_bytes: 8 * 1024,
        };
        publish_job(&broker, &Job::ExportChunk(job)).await;
    }
    let mut done = 0;
    let mut rows = 0;
    while done < planned.ranges.len() {
        let report = next(&mut reports).await;
        match koan_protocol::decode::<WorkerEvent>(&report.payload).unwrap() {
            WorkerEvent::ClaimChunk(claim) => {
                koan_protocol::names::check_name("run", &claim.run).unwrap();
                let reply = ClaimReply::ChunkClaim(ChunkClaim {
                    granted: true,
                    reason: None,
                    resume_after: None,
                    lease_seconds: 60,
                });
                let outgoing = Outgoing::encode("", "", &reply).unwrap();
                rpc::reply(&broker, &report, outgoing).await.unwrap();
            }
            WorkerEvent::PartWritten(written) => rows += written.part.rows,
            WorkerEvent::ChunkDone(chunk) => {
                // The last part travels with chunk_done.
                rows += chunk.part.as_ref().map_or(0, |part| part.rows);
                done += 1;
            }
            WorkerEvent::ChunkProgress(_) => {}
            other => panic!("unexpected report {}: {other:?}", other.kind()),
        }
        report.ack().await.unwrap();
    }
    assert_eq!(rows, 900);

    // The operation completes: the holder releases the snapshot.
    let completed = Outgoing {
        exchange: EVENTS_EXCHANGE.into(),
        routing_key: operation_event_key(operation_id, "completed"),
        payload: Vec::new(),
        kind: "completed".into(),
        message_id: "completed-1".into(),
        correlation_id: None,
        reply_to: None,
        headers: Vec::new(),
    };
    broker.publish(&completed).await.unwrap();
    let released = async {
        while snapshot_sessions(&client, &database.name).await != 0 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    tokio::time::timeout(WAIT, released)
        .await
        .expect("the snapshot is released once the operation completes");

    shutdown.cancel();
    let stopped = tokio::time::timeout(Duration::from_secs(10), worker)
        .await
        .expect("the worker stops within its grace period");
    stopped.unwrap().unwrap();
    broker.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnects_after_losing_rabbitmq() {
    let vhost = TestVhost::create();
    let database = TestDatabase::create().await;
    let client = database.client().await;
    client
        .batch_execute(r#"CREATE TABLE "Item" ("Id" integer PRIMARY KEY, "Json" jsonb NOT NULL);"#)
        .await
        .unwrap();
    let mut config = Config::new(database.url.clone());
    config.amqp_url = vhost.url.clone();
    config.storage_url = database.directory.display().to_string();
    let shutdown = CancellationToken::new();
    let worker = tokio::spawn(koan_worker::run(config, shutdown.clone()));

    let plan = BackupPlan::new("items")
        .consistency(Consistency::PerChunk)
        .entity(BackupEntity::new("items", "Item"));
    let plan_job = |operation_id| {
        Job::PlanEntity(PlanEntity {
            operation_id,
            plan_id: plan.plan_id.clone(),
            backup_id: operation_id,
            entity: plan.entity_specs().remove(0),
            consistency: Consistency::PerChunk,
        })
    };
    for round in 0..2 {
        let broker = Broker::connect_with_retry(&vhost.url, "test coordinator", WAIT)
            .await
            .unwrap();
        topology::declare_coordinator(broker.publisher())
            .await
            .unwrap();
        topology::declare_pool(broker.publisher(), "default")
            .await
            .unwrap();
        let mut reports = broker.subscribe(COORDINATOR_QUEUE, 10).await.unwrap();
        publish_job(&broker, &plan_job(Uuid::now_v7())).await;
        let report = next(&mut reports).await;
        let event = koan_protocol::decode::<WorkerEvent>(&report.payload).unwrap();
        assert!(
            matches!(event, WorkerEvent::EntityPlanned(ref planned) if planned.rows_total == 0),
            "round {round}: {event:?}"
        );
        report.ack().await.unwrap();
        if round == 0 {
            // Every connection of the vhost goes: the worker's and this test's.
            let output = std::process::Command::new("rabbitmqctl")
                .args(["-q", "close_all_connections", "-p", &vhost.name, "test"])
                .output()
                .unwrap();
            assert!(
                output.status.success(),
                "{}",
                String::from_utf8_lossy(&output.stderr)
            );
        } else {
            broker.close().await;
        }
    }
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(40), worker)
        .await
        .expect("the worker stops")
        .unwrap()
        .unwrap();
}
