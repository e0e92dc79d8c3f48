//! The in-process broker against the RabbitMQ behaviour koan-backup relies on.

use std::time::Duration;

use koan_protocol::topology::{
    COMMANDS_EXCHANGE, COMMANDS_QUEUE, COORDINATOR_DEAD_QUEUE, DEAD_QUEUE, DEAD_REASON_HEADER,
    DEAD_SOURCE_HEADER, EVENTS_EXCHANGE, JOB_DELIVERY_LIMIT, JOBS_EXCHANGE, pool_queue,
};
use tokio::time::timeout;

use crate::memory::exchange::topic_matches;
use crate::memory::{MemoryBroker, MemoryError, QueueStats};
use crate::topology::{self, ExchangeKind, ExchangeSpec, QueueSpec};
use crate::{Broker, Incoming, Outgoing, Subscription, TransportError, rpc};

const WAIT: Duration = Duration::from_secs(5);
const QUIET: Duration = Duration::from_millis(150);

fn message(exchange: &str, routing_key: &str, body: &str) -> Outgoing {
    Outgoing {
        exchange: exchange.to_string(),
        routing_key: routing_key.to_string(),
        payload: body.as_bytes().to_vec(),
        kind: "test".to_string(),
        message_id: uuid::Uuid::now_v7().to_string(),
        correlation_id: None,
        reply_to: None,
        headers: vec![("traceparent".to_string(), "00-trace".to_string())],
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

fn ready(hub: &MemoryBroker, queue: &str) -> usize {
    hub.queue_stats(queue).expect("the queue exists").ready
}

/// A hub with the coordinator's topology and the `default` pool declared.
async fn embedded(capacity: usize) -> (MemoryBroker, Broker) {
    let hub = MemoryBroker::with_queue_capacity("test", capacity);
    let coordinator = Broker::memory(&hub, "coordinator");
    topology::declare_coordinator(&coordinator).await.unwrap();
    topology::declare_pool(&coordinator, "default")
        .await
        .unwrap();
    (hub, coordinator)
}

#[test]
fn topic_patterns_match_words() {
    let cases = [
        ("worker.#", "worker.1234.completed", true),
        ("worker.#", "worker", true),
        ("worker.#", "operation.1.progress", false),
        ("operation.*.paused", "operation.42.paused", true),
        ("operation.*.paused", "operation.42.resumed", false),
        ("operation.*.paused", "operation.paused", false),
        ("operation.42.#", "operation.42.progress", true),
        ("operation.42.#", "operation.43.progress", false),
        ("#", "anything.at.all", true),
        ("#", "", true),
        ("*", "one", true),
        ("*", "one.two", false),
        ("a.#.z", "a.z", true),
        ("a.#.z", "a.b.c.z", true),
        ("a.#.z", "a.b.c", false),
        ("a.b", "a.b", true),
        ("a.b", "a.b.c", false),
    ];
    for (pattern, key, expected) in cases {
        assert_eq!(topic_matches(pattern, key), expected, "{pattern} ~ {key}");
    }
}

#[tokio::test]
async fn exchanges_route_direct_topic_and_fanout() {
    let hub = MemoryBroker::new("routing");
    let broker = Broker::memory(&hub, "test");
    for (name, kind) in [
        ("direct", ExchangeKind::Direct),
        ("topic", ExchangeKind::Topic),
        ("fanout", ExchangeKind::Fanout),
    ] {
        broker
            .declare_exchange(&ExchangeSpec::new(name, kind))
            .await
            .unwrap();
    }
    for queue in ["red", "blue", "stars", "all_a", "all_b"] {
        broker
            .declare_queue(&QueueSpec::work(queue, 5))
            .await
            .unwrap();
    }
    broker.bind_queue("red", "direct", "red").await.unwrap();
    broker.bind_queue("blue", "direct", "blue").await.unwrap();
    broker.bind_queue("stars", "topic", "a.*.c").await.unwrap();
    broker.bind_queue("stars", "topic", "a.#").await.unwrap();
    broker.bind_queue("all_a", "fanout", "").await.unwrap();
    broker
        .bind_queue("all_b", "fanout", "ignored")
        .await
        .unwrap();

    broker
        .publish(&message("direct", "red", "r"))
        .await
        .unwrap();
    broker
        .publish(&message("direct", "green", "g"))
        .await
        .unwrap();
    broker
        .publish(&message("topic", "a.b.c", "abc"))
        .await
        .unwrap();
    broker
        .publish(&message("topic", "b.c", "bc"))
        .await
        .unwrap();
    broker.publish(&message("fanout", "x", "f")).await.unwrap();
    // The default exchange routes to the queue named by the key.
    broker.publish(&message("", "blue", "b")).await.unwrap();

    assert_eq!(ready(&hub, "red"), 1);
    assert_eq!(ready(&hub, "blue"), 1);
    // Two matching bindings, one copy.
    assert_eq!(ready(&hub, "stars"), 1);
    assert_eq!(ready(&hub, "all_a"), 1);
    assert_eq!(ready(&hub, "all_b"), 1);

    let mut stars = broker.subscribe("stars", 10).await.unwrap();
    let incoming = next(&mut stars).await;
    assert_eq!(body(&incoming), "abc");
    assert_eq!(incoming.exchange, "topic");
    assert_eq!(incoming.routing_key, "a.b.c");
    assert_eq!(incoming.kind.as_deref(), Some("test"));
    assert_eq!(incoming.header("traceparent").as_deref(), Some("00-trace"));
    assert!(!incoming.redelivered);
    assert_eq!(incoming.delivery_count, 0);
    incoming.ack().await.unwrap();
}

#[tokio::test]
async fn unroutable_commands_go_to_the_alternate_exchange() {
    let (hub, client) = embedded(100).await;
    client
        .publish(&message(COMMANDS_EXCHANGE, "no_such_command", "?"))
        .await
        .unwrap();
    assert_eq!(ready(&hub, COMMANDS_QUEUE), 0);
    assert_eq!(ready(&hub, DEAD_QUEUE), 1);
    assert_eq!(ready(&hub, COORDINATOR_DEAD_QUEUE), 1);

    client
        .publish(&message(COMMANDS_EXCHANGE, "status", "s"))
        .await
        .unwrap();
    assert_eq!(ready(&hub, COMMANDS_QUEUE), 1);
    assert_eq!(ready(&hub, DEAD_QUEUE), 1);
}

#[tokio::test]
async fn publishing_to_a_missing_exchange_fails() {
    let hub = MemoryBroker::new("missing");
    let broker = Broker::memory(&hub, "test");
    let error = broker
        .publish(&message("nowhere", "key", "x"))
        .await
        .unwrap_err();
    assert!(
        matches!(
            &error,
            TransportError::InProcess {
                source: MemoryError::NoExchange { exchange },
                ..
            } if exchange == "nowhere"
        ),
        "{error}"
    );
    assert!(broker.subscribe("no_queue", 1).await.is_err());
}

#[tokio::test]
async fn redeclaring_with_other_arguments_fails() {
    let (_hub, broker) = embedded(100).await;
    topology::declare_coordinator(&broker).await.unwrap();
    let error = broker
        .declare_queue(&QueueSpec::work(COMMANDS_QUEUE, 3))
        .await
        .unwrap_err();
    assert!(error.to_string().contains("koan.commands"), "{error}");
    let error = broker
        .declare_exchange(&ExchangeSpec::new(COMMANDS_EXCHANGE, ExchangeKind::Direct))
        .await
        .unwrap_err();
    assert!(error.to_string().contains("koan.commands"), "{error}");
}

#[tokio::test]
async fn ack_settles_a_delivery_once() {
    let (hub, broker) = embedded(100).await;
    broker
        .publish(&message(COMMANDS_EXCHANGE, "status", "s"))
        .await
        .unwrap();
    let mut commands = broker.subscribe(COMMANDS_QUEUE, 10).await.unwrap();
    let incoming = next(&mut commands).await;
    assert_eq!(
        hub.queue_stats(COMMANDS_QUEUE),
        Some(QueueStats {
            ready: 0,
            unacked: 1,
            consumers: 1
        })
    );
    incoming.ack().await.unwrap();
    assert_eq!(hub.queue_stats(COMMANDS_QUEUE).map(|s| s.unacked), Some(0));
    let error = incoming.ack().await.unwrap_err();
    assert!(error.to_string().contains("not pending"), "{error}");
    drop(commands);
    assert_eq!(ready(&hub, COMMANDS_QUEUE), 0);
}

#[tokio::test]
async fn requeue_redelivers_with_the_delivery_counted() {
    let (_hub, broker) = embedded(100).await;
    broker
        .publish(&message(JOBS_EXCHANGE, "default", "job"))
        .await
        .unwrap();
    let mut jobs = broker.subscribe(&pool_queue("default"), 1).await.unwrap();
    let first = next(&mut jobs).await;
    first.requeue().await.unwrap();
    let second = next(&mut jobs).await;
    assert_eq!(body(&second), "job");
    assert!(second.redelivered);
    assert_eq!(second.delivery_count, 1);
    assert_eq!(second.message_id, first.message_id);
    second.ack().await.unwrap();
    nothing(&mut jobs).await;
}

#[tokio::test]
async fn an_unacked_job_is_redelivered_when_its_subscription_is_dropped() {
    let (hub, coordinator) = embedded(100).await;
    let worker_a = Broker::memory(&hub, "worker a");
    let worker_b = Broker::memory(&hub, "worker b");
    let queue = pool_queue("default");
    coordinator
        .publish(&message(JOBS_EXCHANGE, "default", "job 1"))
        .await
        .unwrap();
    coordinator
        .publish(&message(JOBS_EXCHANGE, "default", "job 2"))
        .await
        .unwrap();

    let mut jobs_a = worker_a.subscribe(&queue, 2).await.unwrap();
    let job_1 = next(&mut jobs_a).await;
    let job_2 = next(&mut jobs_a).await;
    assert!(!job_1.redelivered);
    assert_eq!(job_1.delivery_count, 0);
    drop(jobs_a);
    // The subscription is gone: its deliveries cannot be settled any more.
    assert!(job_1.ack().await.is_err());
    assert_eq!(ready(&hub, &queue), 2);

    let mut jobs_b = worker_b.subscribe(&queue, 2).await.unwrap();
    let again_1 = next(&mut jobs_b).await;
    let again_2 = next(&mut jobs_b).await;
    // In their order, each counted once.
    assert_eq!(
        (body(&again_1), body(&again_2)),
        ("job 1".into(), "job 2".into())
    );
    assert_eq!(again_1.message_id, job_1.message_id);
    assert_eq!(again_2.message_id, job_2.message_id);
    for again in [&again_1, &again_2] {
        assert!(again.redelivered);
        assert_eq!(again.delivery_count, 1);
    }

    // Closing the subscription (as the worker does) returns them too, counted again.
    jobs_b.close().await;
    let mut jobs_a = worker_a.subscribe(&queue, 2).await.unwrap();
    let third = next(&mut jobs_a).await;
    assert_eq!(third.delivery_count, 2);
    // And so does closing the connection.
    worker_a.close().await;
    assert!(!worker_a.is_connected());
    assert!(jobs_a.next().await.is_err());
    let mut jobs_b = worker_b.subscribe(&queue, 2).await.unwrap();
    let fourth = next(&mut jobs_b).await;
    assert_eq!(body(&fourth), "job 1");
    assert_eq!(fourth.delivery_count, 3);
}

#[tokio::test]
async fn a_job_over_the_delivery_limit_is_dead_lettered_with_its_reason() {
    let (hub, coordinator) = embedded(100).await;
    let worker = Broker::memory(&hub, "worker");
    let queue = pool_queue("default");
    coordinator
        .publish(&message(JOBS_EXCHANGE, "default", "poison"))
        .await
        .unwrap();

    let mut deliveries = 0;
    loop {
        // Half the returns are requeues, half are lost consumers.
        let mut jobs = worker.subscribe(&queue, 1).await.unwrap();
        let Ok(Ok(job)) = timeout(QUIET, jobs.next()).await else {
            break;
        };
        assert_eq!(job.delivery_count, deliveries);
        deliveries += 1;
        if deliveries % 2 == 0 {
            job.requeue().await.unwrap();
        } else {
            drop(jobs);
        }
    }
    // Returned JOB_DELIVERY_LIMIT times and delivered once more; that return
    // went over the limit.
    assert_eq!(deliveries, JOB_DELIVERY_LIMIT + 1);
    assert_eq!(ready(&hub, &queue), 0);
    assert_eq!(ready(&hub, COORDINATOR_DEAD_QUEUE), 1);

    let mut dead = coordinator.subscribe(DEAD_QUEUE, 1).await.unwrap();
    let letter = next(&mut dead).await;
    assert_eq!(body(&letter), "poison");
    assert_eq!(letter.routing_key, "default");
    assert_eq!(
        letter.header(DEAD_REASON_HEADER).as_deref(),
        Some("delivery_limit")
    );
    assert_eq!(
        letter.header(DEAD_SOURCE_HEADER).as_deref(),
        Some(queue.as_str())
    );
    assert_eq!(
        letter.header("x-first-death-reason").as_deref(),
        Some("delivery_limit")
    );
    assert_eq!(letter.header("traceparent").as_deref(), Some("00-trace"));
    assert!(!letter.redelivered);
    letter.ack().await.unwrap();
}

#[tokio::test]
async fn dead_letter_moves_a_delivery_to_koan_dead() {
    let (hub, broker) = embedded(100).await;
    broker
        .publish(&message(COMMANDS_EXCHANGE, "start_backup", "bad"))
        .await
        .unwrap();
    let mut commands = broker.subscribe(COMMANDS_QUEUE, 1).await.unwrap();
    let incoming = next(&mut commands).await;
    incoming.dead_letter(&broker, "invalid plan").await.unwrap();
    assert_eq!(hub.queue_stats(COMMANDS_QUEUE).map(|s| s.unacked), Some(0));
    let mut dead = broker.subscribe(COORDINATOR_DEAD_QUEUE, 1).await.unwrap();
    let letter = next(&mut dead).await;
    assert_eq!(
        letter.header(DEAD_REASON_HEADER).as_deref(),
        Some("invalid plan")
    );
    assert_eq!(
        letter.header(DEAD_SOURCE_HEADER).as_deref(),
        Some(COMMANDS_QUEUE)
    );
    assert_eq!(ready(&hub, DEAD_QUEUE), 1);
}

#[tokio::test]
async fn prefetch_bounds_unacked_deliveries() {
    let (hub, broker) = embedded(100).await;
    for index in 0..5 {
        broker
            .publish(&message(JOBS_EXCHANGE, "default", &index.to_string()))
            .await
            .unwrap();
    }
    let mut jobs = broker.subscribe(&pool_queue("default"), 2).await.unwrap();
    let first = next(&mut jobs).await;
    let second = next(&mut jobs).await;
    nothing(&mut jobs).await;
    assert_eq!(
        hub.queue_stats(&pool_queue("default")),
        Some(QueueStats {
            ready: 3,
            unacked: 2,
            consumers: 1
        })
    );
    // A second consumer still gets its share.
    let mut other = broker.subscribe(&pool_queue("default"), 1).await.unwrap();
    let third = next(&mut other).await;
    assert_eq!(body(&third), "2");

    // Acking frees a slot, and wakes a waiting consumer.
    let fourth = {
        let waiting = jobs.next();
        tokio::pin!(waiting);
        assert!(timeout(QUIET, &mut waiting).await.is_err());
        first.ack().await.unwrap();
        timeout(WAIT, waiting).await.unwrap().unwrap()
    };
    assert_eq!(body(&fourth), "3");
    second.requeue().await.unwrap();
    let again = next(&mut jobs).await;
    assert_eq!(body(&again), "1");
    assert!(again.redelivered);
}

#[tokio::test]
async fn publishing_to_a_full_work_queue_waits_for_room() {
    let (hub, coordinator) = embedded(2).await;
    let worker = Broker::memory(&hub, "worker");
    coordinator
        .publish(&message(JOBS_EXCHANGE, "default", "1"))
        .await
        .unwrap();
    coordinator
        .publish(&message(JOBS_EXCHANGE, "default", "2"))
        .await
        .unwrap();
    let third = message(JOBS_EXCHANGE, "default", "3");
    let publishing = coordinator.publish(&third);
    tokio::pin!(publishing);
    assert!(
        timeout(QUIET, &mut publishing).await.is_err(),
        "a full queue holds the publisher up"
    );
    assert_eq!(ready(&hub, &pool_queue("default")), 2);

    let mut jobs = worker.subscribe(&pool_queue("default"), 10).await.unwrap();
    let first = next(&mut jobs).await;
    timeout(WAIT, publishing).await.unwrap().unwrap();
    assert_eq!(ready(&hub, &pool_queue("default")), 2);
    // Capacity counts ready messages: a requeue always finds its place back.
    first.requeue().await.unwrap();
    assert_eq!(ready(&hub, &pool_queue("default")), 3);

    // A publisher waiting when its connection closes gets an error.
    let fourth = message(JOBS_EXCHANGE, "default", "4");
    let publishing = coordinator.publish(&fourth);
    tokio::pin!(publishing);
    assert!(timeout(QUIET, &mut publishing).await.is_err());
    coordinator.close().await;
    let outcome = timeout(WAIT, publishing).await.unwrap();
    assert!(outcome.is_err(), "{outcome:?}");
}

#[tokio::test]
async fn full_dead_letter_queues_drop_their_oldest_message() {
    let (hub, broker) = embedded(2).await;
    for key in ["a", "b", "c"] {
        broker
            .publish(&message(COMMANDS_EXCHANGE, key, key))
            .await
            .unwrap();
    }
    assert_eq!(ready(&hub, DEAD_QUEUE), 2);
    let mut dead = broker.subscribe(DEAD_QUEUE, 10).await.unwrap();
    assert_eq!(body(&next(&mut dead).await), "b");
    assert_eq!(body(&next(&mut dead).await), "c");
}

#[tokio::test]
async fn request_and_reply_round_trip() {
    let (hub, coordinator) = embedded(100).await;
    let client = Broker::memory(&hub, "client");
    let mut commands = coordinator.subscribe(COMMANDS_QUEUE, 1).await.unwrap();
    let answer = async {
        let command = next(&mut commands).await;
        assert!(
            command
                .reply_to
                .as_deref()
                .is_some_and(|to| to.starts_with("amq.rabbitmq.reply-to.")),
            "{:?}",
            command.reply_to
        );
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
    // The reply queue went with the request.
    assert!(
        hub.queue_names()
            .iter()
            .all(|name| !name.starts_with("amq.")),
        "{:?}",
        hub.queue_names()
    );
}

#[tokio::test]
async fn a_request_nobody_answers_times_out() {
    let (hub, client) = embedded(100).await;
    let error = rpc::request(
        &client,
        message(COMMANDS_EXCHANGE, "status", "?"),
        Duration::from_millis(100),
    )
    .await
    .unwrap_err();
    assert!(matches!(error, TransportError::Timeout { .. }), "{error}");
    assert_eq!(ready(&hub, COMMANDS_QUEUE), 1);
    // A late reply finds no queue and is dropped.
    let mut commands = client.subscribe(COMMANDS_QUEUE, 1).await.unwrap();
    let command = next(&mut commands).await;
    rpc::reply(&client, &command, message("", "", "late"))
        .await
        .unwrap();
}

#[tokio::test]
async fn follow_queues_go_with_their_subscription() {
    let (hub, coordinator) = embedded(100).await;
    let client = Broker::memory(&hub, "client");
    let operation = uuid::Uuid::now_v7();
    let mut events = client
        .follow(
            EVENTS_EXCHANGE,
            &[koan_protocol::topology::operation_follow_key(operation)],
        )
        .await
        .unwrap();
    let private = events.queue().to_string();
    assert!(private.starts_with("amq.gen-"), "{private}");
    assert!(hub.queue_names().contains(&private));

    let key = koan_protocol::topology::operation_event_key(operation, "progress");
    coordinator
        .publish(&message(EVENTS_EXCHANGE, &key, "50%"))
        .await
        .unwrap();
    let other = koan_protocol::topology::operation_event_key(uuid::Uuid::now_v7(), "progress");
    coordinator
        .publish(&message(EVENTS_EXCHANGE, &other, "other"))
        .await
        .unwrap();
    let event = next(&mut events).await;
    assert_eq!(body(&event), "50%");
    nothing(&mut events).await;

    drop(events);
    assert!(!hub.queue_names().contains(&private));
    // Publishing afterwards routes nowhere, and that is fine.
    coordinator
        .publish(&message(EVENTS_EXCHANGE, &key, "later"))
        .await
        .unwrap();
    // A private queue also goes when its connection closes.
    let events = client
        .follow(EVENTS_EXCHANGE, &["operation.#".to_string()])
        .await
        .unwrap();
    let private = events.queue().to_string();
    client.close().await;
    assert!(!hub.queue_names().contains(&private));
    assert!(
        client
            .follow(EVENTS_EXCHANGE, &["#".to_string()])
            .await
            .is_err()
    );
}

#[tokio::test]
async fn cancel_stops_deliveries_but_keeps_pending_ones_settleable() {
    let (hub, broker) = embedded(100).await;
    for body in ["1", "2"] {
        broker
            .publish(&message(JOBS_EXCHANGE, "default", body))
            .await
            .unwrap();
    }
    let mut jobs = broker.subscribe(&pool_queue("default"), 10).await.unwrap();
    let first = next(&mut jobs).await;
    jobs.cancel().await;
    assert!(matches!(
        jobs.next().await,
        Err(TransportError::ConsumerClosed { .. })
    ));
    first.ack().await.unwrap();
    assert_eq!(ready(&hub, &pool_queue("default")), 1);
}

#[tokio::test]
async fn closing_a_broker_wakes_its_waiting_subscriptions() {
    let (hub, _coordinator) = embedded(100).await;
    let worker = Broker::memory(&hub, "worker");
    assert_eq!(worker.url(), "memory://test");
    assert!(worker.is_connected());
    assert!(worker.channel().await.is_err());
    let mut jobs = worker.subscribe(&pool_queue("default"), 1).await.unwrap();
    let waiting = jobs.next();
    tokio::pin!(waiting);
    assert!(timeout(QUIET, &mut waiting).await.is_err());
    worker.close().await;
    let outcome = timeout(WAIT, waiting).await.unwrap();
    assert!(
        matches!(outcome, Err(TransportError::ConsumerClosed { .. })),
        "{outcome:?}"
    );
    let error = worker
        .publish(&message(JOBS_EXCHANGE, "default", "x"))
        .await
        .unwrap_err();
    assert!(error.to_string().contains("closed"), "{error}");
}

#[tokio::test]
async fn memory_urls_find_registered_brokers_only_while_they_live() {
    let hub = MemoryBroker::new("registry-test");
    assert!(matches!(
        Broker::connect("memory://registry-test", "early").await,
        Err(TransportError::NoInProcessBroker { .. })
    ));
    hub.register();
    let attached = Broker::connect("memory://registry-test", "late")
        .await
        .expect("attached by url");
    assert_eq!(attached.url(), "memory://registry-test");
    topology::declare_coordinator(&attached)
        .await
        .expect("declared through the url's broker");
    assert!(hub.queue_stats(COMMANDS_QUEUE).is_some());
    drop(attached);
    drop(hub);
    assert!(MemoryBroker::registered("registry-test").is_none());
}
