//! The same scenarios on RabbitMQ and on the in-process broker: what the
//! in-process broker does must be what RabbitMQ does.
//!
//! The RabbitMQ half needs RabbitMQ at 127.0.0.1:5672 (guest/guest) and
//! `rabbitmqctl`, which gives each test a vhost of its own.

#![allow(clippy::unwrap_used)]

use std::process::Command;
use std::time::Duration;

use koan_protocol::topology::{
    COMMANDS_EXCHANGE, COMMANDS_QUEUE, COORDINATOR_DEAD_QUEUE, COORDINATOR_QUEUE, DEAD_QUEUE,
    EVENTS_EXCHANGE, JOB_DELIVERY_LIMIT, JOBS_EXCHANGE, operation_event_key, operation_follow_key,
    pool_queue, worker_event_key,
};
use koan_transport::{Broker, Incoming, MemoryBroker, Outgoing, Subscription, rpc, topology};
use tokio::time::timeout;
use uuid::Uuid;

const WAIT: Duration = Duration::from_secs(10);
const QUIET: Duration = Duration::from_millis(500);

/// Where a scenario runs.
enum Backend {
    Memory(MemoryBroker),
    RabbitMq(Vhost),
}

impl Backend {
    fn memory() -> Self {
        Self::Memory(MemoryBroker::new("backends"))
    }

    fn rabbitmq() -> Self {
        Self::RabbitMq(Vhost::new())
    }

    async fn broker(&self, name: &str) -> Broker {
        match self {
            Self::Memory(hub) => Broker::memory(hub, name),
            Self::RabbitMq(vhost) => Broker::connect(&vhost.url(), name)
                .await
                .expect("rabbitmq at 127.0.0.1:5672"),
        }
    }
}

/// A RabbitMQ vhost of one test, deleted after it.
struct Vhost {
    name: String,
}

fn rabbitmqctl(arguments: &[&str]) {
    let output = Command::new("rabbitmqctl")
        .args(arguments)
        .output()
        .expect("rabbitmqctl gives each test its own vhost");
    assert!(
        output.status.success(),
        "rabbitmqctl {arguments:?} failed (is RabbitMQ running?): {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

impl Vhost {
    fn new() -> Self {
        let name = format!("koan_transport_{}", Uuid::new_v4().simple());
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
        let _ = Command::new("rabbitmqctl")
            .args(["delete_vhost", &self.name])
            .output();
    }
}

fn message(exchange: &str, routing_key: &str, body: &str) -> Outgoing {
    Outgoing {
        exchange: exchange.to_string(),
        routing_key: routing_key.to_string(),
        payload: body.as_bytes().to_vec(),
        kind: "test".to_string(),
        message_id: Uuid::now_v7().to_string(),
        correlation_id: None,
        reply_to: None,
        headers: Vec::new(),
    }
}

async fn next(subscription: &mut Subscription) -> Incoming {
    timeout(WAIT, subscription.next())
        .await
        .expect("a delivery in time")
        .expect("a delivery")
}

async fn nothing(subscription: &mut Subscription) {
    let next = timeout(QUIET, subscription.next()).await;
    assert!(next.is_err(), "no delivery expected, got {next:?}");
}

fn body(incoming: &Incoming) -> String {
    String::from_utf8_lossy(&incoming.payload).into_owned()
}

async fn routing(backend: Backend) {
    let broker = backend.broker("routing").await;
    topology::declare_coordinator(&broker).await.unwrap();
    topology::declare_pool(&broker, "default").await.unwrap();
    let mut dead = broker.subscribe(DEAD_QUEUE, 10).await.unwrap();
    let mut coordinator_dead = broker.subscribe(COORDINATOR_DEAD_QUEUE, 10).await.unwrap();
    let mut commands = broker.subscribe(COMMANDS_QUEUE, 10).await.unwrap();
    let mut reports = broker.subscribe(COORDINATOR_QUEUE, 10).await.unwrap();
    let operation = Uuid::now_v7();
    let mut events = broker
        .follow(EVENTS_EXCHANGE, &[operation_follow_key(operation)])
        .await
        .unwrap();

    broker
        .publish(&message(COMMANDS_EXCHANGE, "no_such_command", "unroutable"))
        .await
        .unwrap();
    for queue in [&mut dead, &mut coordinator_dead] {
        let letter = next(queue).await;
        assert_eq!(body(&letter), "unroutable");
        assert_eq!(letter.exchange, COMMANDS_EXCHANGE);
        assert_eq!(letter.routing_key, "no_such_command");
        letter.ack().await.unwrap();
    }
    broker
        .publish(&message(COMMANDS_EXCHANGE, "status", "status?"))
        .await
        .unwrap();
    assert_eq!(body(&next(&mut commands).await), "status?");
    broker
        .publish(&message(
            EVENTS_EXCHANGE,
            &worker_event_key(operation, "chunk_done"),
            "report",
        ))
        .await
        .unwrap();
    broker
        .publish(&message(
            EVENTS_EXCHANGE,
            &operation_event_key(operation, "progress"),
            "progress",
        ))
        .await
        .unwrap();
    broker
        .publish(&message(
            EVENTS_EXCHANGE,
            &operation_event_key(Uuid::now_v7(), "progress"),
            "someone else's",
        ))
        .await
        .unwrap();
    assert_eq!(body(&next(&mut reports).await), "report");
    assert_eq!(body(&next(&mut events).await), "progress");
    nothing(&mut events).await;
    nothing(&mut dead).await;
    broker.close().await;
}

async fn redelivery(backend: Backend) {
    let coordinator = backend.broker("coordinator").await;
    let worker = backend.broker("worker").await;
    topology::declare_coordinator(&coordinator).await.unwrap();
    topology::declare_pool(&coordinator, "default")
        .await
        .unwrap();
    coordinator
        .publish(&message(JOBS_EXCHANGE, "default", "job"))
        .await
        .unwrap();
    let queue = pool_queue("default");

    let mut jobs = worker.subscribe(&queue, 1).await.unwrap();
    let first = next(&mut jobs).await;
    assert!(!first.redelivered);
    assert_eq!(first.delivery_count, 0);
    jobs.close().await;

    let mut jobs = worker.subscribe(&queue, 1).await.unwrap();
    let second = next(&mut jobs).await;
    assert_eq!(second.message_id, first.message_id);
    assert!(second.redelivered);
    assert_eq!(second.delivery_count, 1);
    second.requeue().await.unwrap();
    let third = next(&mut jobs).await;
    assert!(third.redelivered);
    assert_eq!(third.delivery_count, 2);
    third.ack().await.unwrap();
    nothing(&mut jobs).await;
    worker.close().await;
    coordinator.close().await;
}

async fn delivery_limit(backend: Backend) {
    let coordinator = backend.broker("coordinator").await;
    let worker = backend.broker("worker").await;
    topology::declare_coordinator(&coordinator).await.unwrap();
    topology::declare_pool(&coordinator, "default")
        .await
        .unwrap();
    let mut dead = coordinator
        .subscribe(COORDINATOR_DEAD_QUEUE, 1)
        .await
        .unwrap();
    coordinator
        .publish(&message(JOBS_EXCHANGE, "default", "poison"))
        .await
        .unwrap();

    let mut jobs = worker.subscribe(&pool_queue("default"), 1).await.unwrap();
    let mut deliveries = 0;
    while let Ok(Ok(job)) = timeout(QUIET, jobs.next()).await {
        assert_eq!(job.delivery_count, deliveries);
        deliveries += 1;
        job.requeue().await.unwrap();
    }
    assert_eq!(deliveries, JOB_DELIVERY_LIMIT + 1);
    let letter = next(&mut dead).await;
    assert_eq!(body(&letter), "poison");
    assert_eq!(letter.routing_key, "default");
    assert_eq!(
        letter.header("x-first-death-reason").as_deref(),
        Some("delivery_limit")
    );
    assert_eq!(
        letter.header("x-first-death-queue").as_deref(),
        Some(pool_queue("default").as_str())
    );
    letter.ack().await.unwrap();
    worker.close().await;
    coordinator.close().await;
}

async fn prefetch(backend: Backend) {
    let broker = backend.broker("prefetch").await;
    topology::declare_coordinator(&broker).await.unwrap();
    topology::declare_pool(&broker, "default").await.unwrap();
    for index in 0..3 {
        broker
            .publish(&message(JOBS_EXCHANGE, "default", &index.to_string()))
            .await
            .unwrap();
    }
    let mut jobs = broker.subscribe(&pool_queue("default"), 2).await.unwrap();
    let first = next(&mut jobs).await;
    let second = next(&mut jobs).await;
    assert_eq!((body(&first), body(&second)), ("0".into(), "1".into()));
    nothing(&mut jobs).await;
    first.ack().await.unwrap();
    assert_eq!(body(&next(&mut jobs).await), "2");
    broker.close().await;
}

async fn request_reply(backend: Backend) {
    let coordinator = backend.broker("coordinator").await;
    let client = backend.broker("client").await;
    topology::declare_coordinator(&coordinator).await.unwrap();
    let mut commands = coordinator.subscribe(COMMANDS_QUEUE, 1).await.unwrap();
    let answer = async {
        let command = next(&mut commands).await;
        let mut reply = message("", "", "accepted!");
        reply.kind = "accepted".to_string();
        rpc::reply(&coordinator, &command, reply).await.unwrap();
        command.ack().await.unwrap();
    };
    let request = rpc::request(&client, message(COMMANDS_EXCHANGE, "status", "?"), WAIT);
    let ((), reply) = tokio::join!(answer, request);
    let reply = reply.unwrap();
    assert_eq!(reply.kind.as_deref(), Some("accepted"));
    assert_eq!(reply.payload, b"accepted!");
    client.close().await;
    coordinator.close().await;
}

macro_rules! on_both {
    ($scenario:ident, $in_process:ident, $on_rabbitmq:ident) => {
        #[tokio::test]
        async fn $in_process() {
            $scenario(Backend::memory()).await;
        }

        #[tokio::test]
        async fn $on_rabbitmq() {
            $scenario(Backend::rabbitmq()).await;
        }
    };
}

on_both!(routing, routing_in_process, routing_on_rabbitmq);
on_both!(redelivery, redelivery_in_process, redelivery_on_rabbitmq);
on_both!(
    delivery_limit,
    delivery_limit_in_process,
    delivery_limit_on_rabbitmq
);
on_both!(prefetch, prefetch_in_process, prefetch_on_rabbitmq);
on_both!(
    request_reply,
    request_reply_in_process,
    request_reply_on_rabbitmq
);
