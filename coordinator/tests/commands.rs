//! Command handling against a real PostgreSQL state store (and, for the
//! catalog check, a real PostgreSQL source): decoding, refusals, idempotent
//! submission, status and listing.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;

use serde_json::json;
use uuid::Uuid;

use common::TestSchema;
use koan_coordinator::commands::Answer;
use koan_coordinator::{Commands, PgStateStore, PlanRegistry, Policy, SourceCatalog};
use koan_protocol::commands::{Command, ListOperations, OperationRef, Reply, StartBackup};
use koan_protocol::encode;
use koan_protocol::plan::{BackupEntity, BackupPlan};
use koan_protocol::progress::OperationState;

fn registry() -> PlanRegistry {
    let mut plans = PlanRegistry::new();
    plans
        .register(BackupPlan::new("orders:daily").entity(BackupEntity::new("orders", "Order")))
        .unwrap();
    plans
}

async fn commands(schema: &TestSchema, catalog: Option<SourceCatalog>) -> Commands<PgStateStore> {
    let store = Arc::new(schema.store(Policy::default()).await);
    Commands::new(store, Arc::new(registry()), catalog)
}

fn start(plan_id: Option<&str>, plan: Option<BackupPlan>, operation_id: Option<Uuid>) -> Vec<u8> {
    encode(&Command::StartBackup(StartBackup {
        plan_id: plan_id.map(str::to_string),
        plan,
        operation_id,
        labels: BTreeMap::new(),
        description: None,
    }))
    .unwrap()
}

fn rejection(answer: &Answer) -> (String, String) {
    match &answer.reply {
        Reply::Rejected(rejected) => (rejected.code.clone(), rejected.error.clone()),
        other => panic!("expected rejected, got {other:?}"),
    }
}

fn msgpack(value: serde_json::Value) -> Vec<u8> {
    rmp_serde::to_vec_named(&value).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undecodable_commands_are_rejected_and_dead_lettered() {
    let schema = TestSchema::new().await;
    let commands = commands(&schema, None).await;
    let cases = [
        (b"\xc1 not msgpack".to_vec(), "malformed", "envelope"),
        (
            msgpack(json!({"protocol": 7, "kind": "status", "body": {}})),
            "unsupported_version",
            "7",
        ),
        (
            msgpack(json!({"protocol": 1, "kind": "drop_everything", "body": {}})),
            "unknown_kind",
            "drop_everything",
        ),
        (
            msgpack(json!({"protocol": 1, "kind": "start_backup", "body": {"plan_idd": "x"}})),
            "malformed",
            "plan_idd",
        ),
        (
            vec![0u8; koan_protocol::topology::MAX_COMMAND_BYTES + 1],
            "too_large",
            "exceeds",
        ),
    ];
    for (body, code, names) in cases {
        let answer = commands.answer(&body, None).await.unwrap();
        let (found_code, error) = rejection(&answer);
        assert_eq!(found_code, code, "{error}");
        assert!(error.contains(names), "{error} should name {names}");
        let reason = answer.dead_letter.expect("dead-lettered");
        assert!(reason.starts_with(code), "{reason}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_commands_name_the_problem() {
    let schema = TestSchema::new().await;
    let commands = commands(&schema, None).await;
    let inline = BackupPlan::new("inline").entity(BackupEntity::new("e", "t"));

    for body in [
        start(None, None, None),
        start(Some("orders:daily"), Some(inline), None),
    ] {
        let answer = commands.answer(&body, None).await.unwrap();
        let (code, error) = rejection(&answer);
        assert_eq!(code, "invalid_command");
        assert!(
            error.contains("plan_id") && error.contains("plan"),
            "{error}"
        );
        assert!(
            answer.dead_letter.is_none(),
            "a valid command is not poison"
        );
    }

    let answer = commands
        .answer(&start(Some("nightly"), None, None), None)
        .await
        .unwrap();
    let (code, error) = rejection(&answer);
    assert_eq!(code, "unknown_plan");
    assert!(error.contains("nightly"), "{error}");

    let hostile = BackupPlan::new("p").entity(BackupEntity::new("e", "x\"; drop table t; --"));
    let answer = commands
        .answer(&start(None, Some(hostile), None), None)
        .await
        .unwrap();
    let (code, error) = rejection(&answer);
    assert_eq!(code, "invalid_name");
    assert!(error.contains("drop table"), "{error}");

    let unknown = Uuid::now_v7();
    let status = encode(&Command::Status(OperationRef {
        operation_id: unknown,
    }))
    .unwrap();
    let (code, error) = rejection(&commands.answer(&status, None).await.unwrap());
    assert_eq!(code, "unknown_operation");
    assert!(error.contains(&unknown.to_string()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submissions_are_idempotent_and_listed_newest_first() {
    let schema = TestSchema::new().await;
    let commands = commands(&schema, None).await;
    let operation_id = Uuid::now_v7();
    let body = start(Some("orders:daily"), None, Some(operation_id));
    for existing in [false, true] {
        let answer = commands.answer(&body, Some("m-1")).await.unwrap();
        let Reply::Accepted(accepted) = answer.reply else {
            panic!("expected accepted, got {:?}", answer.reply)
        };
        assert_eq!(
            (accepted.operation_id, accepted.existing),
            (operation_id, existing)
        );
        assert_eq!(answer.changed, !existing);
    }
    // A redelivered command without a client id finds its operation by message id.
    let anonymous = start(Some("orders:daily"), None, None);
    let first = commands.answer(&anonymous, Some("m-2")).await.unwrap();
    let again = commands.answer(&anonymous, Some("m-2")).await.unwrap();
    let (Reply::Accepted(first), Reply::Accepted(again)) = (first.reply, again.reply) else {
        panic!("expected accepted twice")
    };
    assert_eq!(first.operation_id, again.operation_id);
    assert!(again.existing);

    let status = encode(&Command::Status(OperationRef { operation_id })).unwrap();
    let Reply::Status(report) = commands.answer(&status, None).await.unwrap().reply else {
        panic!("expected status")
    };
    assert_eq!(report.state, OperationState::Planning);
    assert_eq!(report.plan_id, "orders:daily");

    let list = encode(&Command::List(ListOperations { limit: Some(1) })).unwrap();
    let Reply::Operations(listed) = commands.answer(&list, None).await.unwrap().reply else {
        panic!("expected operations")
    };
    assert_eq!(listed.operations.len(), 1);
    assert_eq!(
        listed.operations[0].operation_id, first.operation_id,
        "newest first"
    );
    let list = encode(&Command::List(ListOperations { limit: None })).unwrap();
    let Reply::Operations(listed) = commands.answer(&list, None).await.unwrap().reply else {
        panic!("expected operations")
    };
    assert_eq!(listed.operations.len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plans_are_checked_against_the_source_catalog() {
    let state = TestSchema::new().await;
    let source = TestSchema::new().await;
    let (client, connection) = tokio_postgres::connect(source.url(), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    client
        .batch_execute(&format!(
            "CREATE SCHEMA \"{0}\";
             CREATE TABLE \"{0}\".\"Order\" (\"Id\" text PRIMARY KEY, \"Json\" jsonb NOT NULL);",
            source.name
        ))
        .await
        .unwrap();
    let catalog = SourceCatalog::connect(source.url()).unwrap();
    let commands = commands(&state, Some(catalog)).await;
    let entity = |table: &str| {
        let mut entity = BackupEntity::new("orders", table);
        entity.schema = Some(source.name.clone());
        entity
    };

    let missing_table = BackupPlan::new("p").entity(entity("Invoice"));
    let answer = commands
        .answer(&start(None, Some(missing_table), None), None)
        .await
        .unwrap();
    let (code, error) = rejection(&answer);
    assert_eq!(code, "missing_table", "{error}");
    assert!(error.contains("Invoice"), "{error}");

    let mut missing_column = entity("Order");
    missing_column.version = Some("Version".into());
    let plan = BackupPlan::new("p").entity(missing_column);
    let (code, error) = rejection(
        &commands
            .answer(&start(None, Some(plan), None), None)
            .await
            .unwrap(),
    );
    assert_eq!(code, "missing_column", "{error}");
    assert!(error.contains("Version"), "{error}");

    let plan = BackupPlan::new("p").entity(entity("Order"));
    let answer = commands
        .answer(&start(None, Some(plan), None), None)
        .await
        .unwrap();
    assert!(
        matches!(answer.reply, Reply::Accepted(_)),
        "{:?}",
        answer.reply
    );
    drop(client);
}
