//! The coordinator service end to end, over a real RabbitMQ (a vhost of its
//! own per test) and a real PostgreSQL: a test plays client and worker, in
//! protocol messages only.

#![allow(clippy::unwrap_used)]

mod common;

use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use common::TestSchema;
use common::service::{Vhost, WAIT, back_up, command, config, next, rabbitmqctl, subscribe};
use koan_protocol::commands::{Command, OperationRef, Reply, StartBackup};
use koan_protocol::decode;
use koan_protocol::events::OperationEvent;
use koan_protocol::progress::OperationState;
use koan_protocol::topology::{
    COMMANDS_EXCHANGE, DEAD_QUEUE, DEAD_REASON_HEADER, EVENTS_EXCHANGE, operation_follow_key,
    pool_queue,
};
use koan_transport::{Broker, Outgoing, rpc, topology};

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

    let finalize_path = back_up(&client, &mut jobs, operation_id).await;

    // The client's side: events in order, ending with `completed` at 100 %.
    let mut percents = Vec::new();
    loop {
        let event = next::<OperationEvent>(&mut events).await;
        percents.push(event.report().percent);
        if let OperationEvent::Completed(report) = event {
            assert_eq!(report.percent, 100.0);
            assert_eq!(report.manifest.as_deref(), Some(finalize_path.as_str()));
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
