//! The coordinator service end to end, over a real RabbitMQ (a vhost of its
//! own per test) and a real PostgreSQL: a test plays client and worker, in
//! protocol messages only.

#![allow(clippy::unwrap_used)]

mod common;

use std::process::Command as Process;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use common::TestSchema;
use koan_coordinator::Config;
use koan_protocol::archive::{KeyRange, PartInfo, SnapshotFacts, Totals, part_path};
use koan_protocol::commands::{Command, OperationRef, Reply, StartBackup};
use koan_protocol::events::{
    ChunkDone, ClaimChunk, ClaimReply, EntityPlanned, ManifestWritten, OperationEvent, PartWritten,
    WorkerEvent,
};
use koan_protocol::jobs::Job;
use koan_protocol::plan::KeyType;
use koan_protocol::progress::OperationState;
use koan_protocol::topology::{
    COMMANDS_EXCHANGE, DEAD_QUEUE, DEAD_REASON_HEADER, EVENTS_EXCHANGE, operation_follow_key,
    pool_queue, worker_event_key,
};
use koan_protocol::{codec::Message, decode};
use koan_transport::{Broker, Outgoing, Subscription, rpc, topology};

const WAIT: Duration = Duration::from_secs(20);

/// A RabbitMQ vhost of the test's own, deleted at the end.
struct Vhost {
    name: String,
}

fn rabbitmqctl(arguments: &[&str]) {
    let output = Process::new("rabbitmqctl")
        .args(arguments)
        .output()
        .unwrap_or_else(|error| {
            panic!(
                "rabbitmqctl is needed to give each test its own RabbitMQ vhost ({error}); \
             install RabbitMQ and start it with `rabbitmq-server -detached`"
            )
        });
    assert!(
        output.status.success(),
        "rabbitmqctl {arguments:?} failed (is RabbitMQ running? start it with \
         `rabbitmq-server -detached`): {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

impl Vhost {
    fn new() -> Self {
        let name = format!("koan_t_{}", Uuid::new_v4().simple());
        rabbitmqctl(&["add_vhost", &name]);
        rabbitmqctl(&["set_permissions", "-p", &name, "guest", ".*", ".*", ".*"]);
        Self { name }
    }

    fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:5672/{}", self.name)
    }
}

impl Drop for Vhost {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(std::env::temp_dir().join(&self.name));
        let _ = Process::new("rabbitmqctl")
            .args(["delete_vhost", &self.name])
            .output();
    }
}

fn plans_dir(vhost: &Vhost) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(&vhost.name);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("orders.toml"),
        "plan_id = \"orders:daily\"\n[[entities]]\nname = \"orders\"\ntable = \"Order\"\nscope = \"tenant-a\"\n",
    )
    .unwrap();
    dir
}

fn config(vhost: &Vhost, schema: &TestSchema) -> Config {
    let mut config = Config::new(schema.url());
    config.amqp_url = vhost.url();
    config.schema = schema.name.clone();
    config.plans_dir = Some(plans_dir(vhost));
    config.progress_interval_ms = 0;
    config.lease_seconds = 30;
    config
}

async fn next<M: Message>(subscription: &mut Subscription) -> M {
    let incoming = tokio::time::timeout(WAIT, subscription.next())
        .await
        .expect("a message in time")
        .unwrap();
    incoming.ack().await.unwrap();
    decode::<M>(&incoming.payload).unwrap()
}

/// Subscribes, retrying briefly: a quorum queue another connection declared a
/// moment ago may still be electing its leader.
async fn subscribe(broker: &Broker, queue: &str) -> Subscription {
    let mut tries = 0;
    loop {
        match broker.subscribe(queue, 10).await {
            Ok(subscription) => return subscription,
            Err(error) if tries < 20 => {
                tries += 1;
                eprintln!("subscribing to {queue} failed ({error}), retrying");
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Err(error) => panic!("subscribing to {queue}: {error}"),
        }
    }
}

async fn report(broker: &Broker, event: &str, body: WorkerEvent) {
    let operation_id = body.operation_id();
    let message = Outgoing::encode(
        EVENTS_EXCHANGE,
        worker_event_key(operation_id, event),
        &body,
    )
    .unwrap();
    broker.publish(&message).await.unwrap();
}

async fn command(broker: &Broker, command: &Command) -> Reply {
    let request = Outgoing::encode(COMMANDS_EXCHANGE, command.kind(), command).unwrap();
    let reply = rpc::request(broker, request, WAIT).await.unwrap();
    decode::<Reply>(&reply.payload).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_backup_runs_from_command_to_completed_event() {
    let vhost = Vhost::new();
    let schema = TestSchema::new().await;
    let shutdown = CancellationToken::new();
    let service = tokio::spawn(koan_coordinator::run(
        config(&vhost, &schema),
        shutdown.clone(),
    ));

    let client = Broker::connect_with_retry(&vhost.url(), "test client", WAIT)
        .await
        .unwrap();
    topology::declare_coordinator(client.publisher())
        .await
        .unwrap();
    topology::declare_pool(client.publisher(), "default")
        .await
        .unwrap();
    let mut jobs = subscribe(&client, &pool_queue("default")).await;
    let mut dead = subscribe(&client, DEAD_QUEUE).await;
    let operation_id = Uuid::now_v7();
    let mut events = client
        .follow(EVENTS_EXCHANGE, &[operation_follow_key(operation_id)])
        .await
        .unwrap();

    // A poison command is answered and dead-lettered with its reason.
    let mut poison = Outgoing::encode(
        COMMANDS_EXCHANGE,
        "status",
        &Command::Status(OperationRef { operation_id }),
    )
    .unwrap();
    poison.payload = b"\xc1garbage".to_vec();
    let reply =
        decode::<Reply>(&rpc::request(&client, poison, WAIT).await.unwrap().payload).unwrap();
    assert!(
        matches!(&reply, Reply::Rejected(rejected) if rejected.code == "malformed"),
        "{reply:?}"
    );
    let dead_letter = tokio::time::timeout(WAIT, dead.next())
        .await
        .unwrap()
        .unwrap();
    assert!(
        dead_letter
            .header(DEAD_REASON_HEADER)
            .unwrap()
            .starts_with("malformed")
    );
    dead_letter.ack().await.unwrap();

    let start = Command::StartBackup(StartBackup {
        plan_id: Some("orders:daily".into()),
        operation_id: Some(operation_id),
        ..StartBackup::default()
    });
    let Reply::Accepted(accepted) = command(&client, &start).await else {
        panic!("backup not accepted")
    };
    assert_eq!(accepted.operation_id, operation_id);

    // The worker's side.
    let Job::PlanEntity(plan_job) = next::<Job>(&mut jobs).await else {
        panic!("expected plan_entity")
    };
    let mut entity = plan_job.entity.clone();
    entity.key_type = Some(KeyType::Text);
    let planned = EntityPlanned {
        operation_id,
        entity: entity.clone(),
        rows_total: 10,
        ranges: vec![KeyRange::default()],
        snapshot: Some(SnapshotFacts {
            entity: "orders".into(),
            snapshot_id: Some("00000003-0000001B-1".into()),
            taken_at: chrono::Utc::now(),
            holder: "worker-t".into(),
        }),
    };
    report(
        &client,
        "entity_planned",
        WorkerEvent::EntityPlanned(planned),
    )
    .await;
    let Job::ExportChunk(export) = next::<Job>(&mut jobs).await else {
        panic!("expected export_chunk")
    };
    assert_eq!(export.snapshot_id.as_deref(), Some("00000003-0000001B-1"));

    let claim = WorkerEvent::ClaimChunk(ClaimChunk {
        operation_id,
        entity: "orders".into(),
        chunk: 0,
        attempt: export.attempt,
        run: "run1".into(),
        worker: "worker-t".into(),
    });
    let request = Outgoing::encode(
        EVENTS_EXCHANGE,
        worker_event_key(operation_id, "claim_chunk"),
        &claim,
    )
    .unwrap();
    let reply = rpc::request(&client, request, WAIT).await.unwrap();
    let ClaimReply::ChunkClaim(granted) = decode::<ClaimReply>(&reply.payload).unwrap();
    assert!(granted.granted, "{granted:?}");
    assert_eq!(granted.lease_seconds, 30);

    let path = part_path(
        &export.entity,
        &export.plan_id,
        export.backup_id,
        0,
        0,
        "run1",
    )
    .unwrap();
    let part = PartInfo {
        part: 0,
        path,
        first_key: Some("a".into()),
        last_key: Some("j".into()),
        rows: 10,
        raw_bytes: 400,
        compressed_bytes: 100,
        blake3: "00".repeat(32),
    };
    report(
        &client,
        "part_written",
        WorkerEvent::PartWritten(PartWritten {
            operation_id,
            entity: "orders".into(),
            chunk: 0,
            run: "run1".into(),
            part,
        }),
    )
    .await;
    report(
        &client,
        "chunk_done",
        WorkerEvent::ChunkDone(ChunkDone {
            operation_id,
            entity: "orders".into(),
            chunk: 0,
            run: "run1".into(),
            parts: 1,
        }),
    )
    .await;
    let Job::Finalize(finalize) = next::<Job>(&mut jobs).await else {
        panic!("expected finalize")
    };
    assert_eq!(finalize.manifest.totals.rows, 10);
    report(
        &client,
        "manifest_written",
        WorkerEvent::ManifestWritten(ManifestWritten {
            operation_id,
            path: finalize.path.clone(),
            totals: Totals::default(),
        }),
    )
    .await;

    // The client's side: events in order, ending with `completed` at 100 %.
    let mut percents = Vec::new();
    loop {
        let event = next::<OperationEvent>(&mut events).await;
        percents.push(event.report().percent);
        if let OperationEvent::Completed(report) = event {
            assert_eq!(report.percent, 100.0);
            assert_eq!(report.manifest.as_deref(), Some(finalize.path.as_str()));
            break;
        }
    }
    assert!(
        percents.windows(2).all(|pair| pair[0] <= pair[1]),
        "{percents:?}"
    );
    let Reply::Status(status) =
        command(&client, &Command::Status(OperationRef { operation_id })).await
    else {
        panic!("expected status")
    };
    assert_eq!(status.state, OperationState::Completed);

    shutdown.cancel();
    tokio::time::timeout(WAIT, service)
        .await
        .expect("stops in time")
        .unwrap()
        .unwrap();
    client.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_service_reconnects_after_the_broker_drops_it() {
    let vhost = Vhost::new();
    let schema = TestSchema::new().await;
    let shutdown = CancellationToken::new();
    let service = tokio::spawn(koan_coordinator::run(
        config(&vhost, &schema),
        shutdown.clone(),
    ));
    let operation_id = Uuid::now_v7();
    let start = Command::StartBackup(StartBackup {
        plan_id: Some("orders:daily".into()),
        operation_id: Some(operation_id),
        ..StartBackup::default()
    });
    let client = Broker::connect_with_retry(&vhost.url(), "test client", WAIT)
        .await
        .unwrap();
    topology::declare_coordinator(client.publisher())
        .await
        .unwrap();
    assert!(matches!(command(&client, &start).await, Reply::Accepted(_)));
    client.close().await;

    rabbitmqctl(&[
        "close_all_connections",
        "-p",
        &vhost.name,
        "test: broker restart",
    ]);

    let client = Broker::connect_with_retry(&vhost.url(), "test client", WAIT)
        .await
        .unwrap();
    let Reply::Accepted(again) = command(&client, &start).await else {
        panic!("not accepted after reconnecting")
    };
    assert!(again.existing);
    shutdown.cancel();
    tokio::time::timeout(WAIT, service)
        .await
        .expect("stops in time")
        .unwrap()
        .unwrap();
    client.close().await;
}
