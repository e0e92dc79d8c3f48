//! Test support for the service tests: a RabbitMQ vhost per test, the
//! coordinator's config, and a client that plays client and worker in
//! protocol messages only.

use std::process::Command as Process;
use std::time::Duration;

use uuid::Uuid;

use koan_coordinator::Config;
use koan_protocol::archive::{KeyRange, PartInfo, SnapshotFacts, Totals, part_path};
use koan_protocol::commands::{Command, Reply, StartBackup};
use koan_protocol::events::{
    ChunkDone, ClaimChunk, ClaimReply, EntityPlanned, ManifestWritten, OperationEvent, PartWritten,
    WorkerEvent,
};
use koan_protocol::jobs::Job;
use koan_protocol::plan::KeyType;
use koan_protocol::topology::{COMMANDS_EXCHANGE, EVENTS_EXCHANGE, worker_event_key};
use koan_protocol::{codec::Message, decode};
use koan_transport::{Broker, Outgoing, Subscription, rpc};

use super::TestSchema;

pub const WAIT: Duration = Duration::from_secs(20);

/// A RabbitMQ vhost of the test's own, deleted at the end.
pub struct Vhost {
    /// The vhost name.
    pub name: String,
}

pub fn rabbitmqctl(arguments: &[&str]) {
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
    pub fn new() -> Self {
        let name = format!("koan_t_{}", Uuid::new_v4().simple());
        rabbitmqctl(&["add_vhost", &name]);
        rabbitmqctl(&["set_permissions", "-p", &name, "guest", ".*", ".*", ".*"]);
        Self { name }
    }

    pub fn url(&self) -> String {
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

pub fn plans_dir(vhost: &Vhost) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(&vhost.name);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("orders.toml"),
        "plan_id = \"orders:daily\"\n[[entities]]\nname = \"orders\"\ntable = \"Order\"\nscope = \"tenant-a\"\n",
    )
    .unwrap();
    dir
}

pub fn config(vhost: &Vhost, schema: &TestSchema) -> Config {
    let mut config = Config::new(schema.url());
    config.amqp_url = vhost.url();
    config.schema = schema.name.clone();
    config.plans_dir = Some(plans_dir(vhost));
    config.progress_interval_ms = 0;
    config.lease_seconds = 30;
    config
}

pub async fn next<M: Message>(subscription: &mut Subscription) -> M {
    let incoming = tokio::time::timeout(WAIT, subscription.next())
        .await
        .expect("a message in time")
        .unwrap();
    incoming.ack().await.unwrap();
    decode::<M>(&incoming.payload).unwrap()
}

/// Subscribes, retrying briefly: a quorum queue another connection declared a
/// moment ago may still be electing its leader.
pub async fn subscribe(broker: &Broker, queue: &str) -> Subscription {
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

pub async fn report(broker: &Broker, event: &str, body: WorkerEvent) {
    let operation_id = body.operation_id();
    let message = Outgoing::encode(
        EVENTS_EXCHANGE,
        worker_event_key(operation_id, event),
        &body,
    )
    .unwrap();
    broker.publish(&message).await.unwrap();
}

pub async fn command(broker: &Broker, command: &Command) -> Reply {
    let request = Outgoing::encode(COMMANDS_EXCHANGE, command.kind(), command).unwrap();
    let reply = rpc::request(broker, request, WAIT).await.unwrap();
    decode::<Reply>(&reply.payload).unwrap()
}

/// Plays client and worker through one backup of `orders:daily` (one chunk,
/// one part of 10 rows) up to `manifest_written`; returns the manifest path.
pub async fn back_up(client: &Broker, jobs: &mut Subscription, operation_id: Uuid) -> String {
    let start = Command::StartBackup(StartBackup {
        plan_id: Some("orders:daily".into()),
        operation_id: Some(operation_id),
        ..StartBackup::default()
    });
    let Reply::Accepted(accepted) = command(client, &start).await else {
        panic!("backup not accepted")
    };
    assert_eq!(accepted.operation_id, operation_id);

    // The worker's side.
    let Job::PlanEntity(plan_job) = next::<Job>(jobs).await else {
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
        client,
        "entity_planned",
        WorkerEvent::EntityPlanned(planned),
    )
    .await;
    let Job::ExportChunk(export) = next::<Job>(jobs).await else {
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
    let reply = rpc::request(client, request, WAIT).await.unwrap();
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
        client,
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
        client,
        "chunk_done",
        WorkerEvent::ChunkDone(ChunkDone {
            operation_id,
            entity: "orders".into(),
            chunk: 0,
            run: "run1".into(),
            parts: 1,
            part: None,
        }),
    )
    .await;
    let Job::Finalize(finalize) = next::<Job>(jobs).await else {
        panic!("expected finalize")
    };
    assert_eq!(finalize.manifest.totals.rows, 10);
    report(
        client,
        "manifest_written",
        WorkerEvent::ManifestWritten(ManifestWritten {
            operation_id,
            path: finalize.path.clone(),
            totals: Totals::default(),
        }),
    )
    .await;

    // Reports and commands travel on different queues: wait until the
    // coordinator has applied the report before the caller sends commands.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let status = Command::Status(koan_protocol::commands::OperationRef { operation_id });
        if let Reply::Status(report) = command(client, &status).await
            && report.state == koan_protocol::progress::OperationState::Completed
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the backup never completed"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    finalize.path
}

/// Follows every public event of `operation_id` until a terminal one.
pub async fn until_terminal(events: &mut Subscription) -> (Vec<f64>, OperationEvent) {
    let mut percents = Vec::new();
    loop {
        let event = next::<OperationEvent>(events).await;
        percents.push(event.report().percent);
        if matches!(
            event,
            OperationEvent::Completed(_) | OperationEvent::Failed(_)
        ) {
            return (percents, event);
        }
    }
}
