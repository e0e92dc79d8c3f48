//! Distributed backup, end to end, against the real RabbitMQ and PostgreSQL:
//! a coordinator and several workers as separate processes of the built binary.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use koan_protocol::commands::{Command, Reply, StartBackup};
use koan_protocol::plan::{BackupEntity, BackupPlan};
use koan_protocol::progress::OperationState;
use koan_protocol::topology::COMMANDS_EXCHANGE;
use koan_transport::{Outgoing, rpc};
use support::archive::{self, key_text};
use support::{Sandbox, data};

#[tokio::test(flavor = "multi_thread")]
async fn backs_up_one_tenant_of_200k_documents_with_three_workers() {
    let mut sandbox = Sandbox::new();
    let pg = sandbox.pg().await;
    data::orders(&pg, 200_000, 3).await;
    sandbox.start_coordinator("coordinator", &[]);
    sandbox.start_workers(3, &[]);

    let plan = r#"
        plan_id = "orders:daily"
        description = "tenant-1 orders"
        [[entities]]
        name = "orders"
        table = "Order"
        bucket = "orders"
        scope = "tenant-1"
        chunk_rows = 10000
        version = "$.version"
    "#;
    let (kind, report, follower) = sandbox.backup(plan).await;
    assert_eq!(kind, "completed", "{report:?}\n{}", sandbox.logs());
    assert_eq!(report.state, OperationState::Completed);
    follower.assert_monotonic_to_100();
    assert!(
        follower.reports.len() >= 3,
        "expected live progress, got {} events",
        follower.reports.len()
    );

    let expected: BTreeSet<String> = pg
        .query(
            r#"SELECT "Id" FROM "Order" WHERE "Json"->>'__koan_tenant' = 'tenant-1'"#,
            &[],
        )
        .await
        .expect("querying the source")
        .iter()
        .map(|row| row.get::<_, String>(0))
        .collect();
    assert!(expected.len() > 66_000);

    let manifest_path = report
        .manifest
        .clone()
        .expect("manifest path in the completed event");
    let manifest = archive::manifest(&sandbox.storage, &manifest_path);
    assert_eq!(manifest.backup_id, report.operation_id);
    assert_eq!(manifest.format_version, 1);
    assert!(
        manifest.entities[0].chunks.len() >= 6,
        "expected several chunks"
    );
    let lines = archive::read_all(&sandbox.storage, &manifest);
    let orders = &lines["orders"];
    let mut seen = BTreeSet::new();
    for line in orders {
        assert_eq!(
            line.doc["__koan_tenant"], "tenant-1",
            "row of another tenant: {:?}",
            line.id
        );
        assert_eq!(line.v, Some(serde_json::json!(1)));
        assert!(seen.insert(key_text(line)), "row {} twice", key_text(line));
    }
    assert_eq!(seen, expected, "archive rows differ from the tenant's rows");
    assert_eq!(manifest.totals.rows, expected.len() as u64);
    assert_eq!(report.rows_done, expected.len() as u64);

    let status = sandbox.cli(&["status", &report.operation_id.to_string(), "--json"]);
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    let status: serde_json::Value = serde_json::from_slice(&status.stdout).expect("status json");
    for field in [
        "operation_id",
        "kind",
        "state",
        "percent",
        "rows_done",
        "rows_total",
        "bytes_done",
        "backup_id",
        "manifest",
        "continuation_token",
        "error",
    ] {
        assert!(
            status.get(field).is_some(),
            "status --json lacks {field}: {status}"
        );
    }
    assert_eq!(status["state"], "completed");
    assert_eq!(status["percent"], 100.0);

    let list = sandbox.cli(&["list", "--json"]);
    assert!(list.status.success());
    let list: serde_json::Value = serde_json::from_slice(&list.stdout).expect("list json");
    assert!(
        list.as_array()
            .expect("array")
            .iter()
            .any(|op| op["operation_id"] == report.operation_id.to_string())
    );
    sandbox.assert_alive();
}

#[tokio::test(flavor = "multi_thread")]
async fn chunks_stay_even_on_skewed_uuid_and_gapped_keys() {
    let mut sandbox = Sandbox::new();
    let pg = sandbox.pg().await;
    pg.batch_execute(&format!(
        r#"{skewed};
           INSERT INTO "Skewed" SELECT CASE WHEN i % 10 < 9
                    THEN 'aaaaaaaaaaaaaaaaaaaaaaaaaaaa-' || lpad(i::text, 7, '0')
                    ELSE chr(98 + i % 20) || '-' || md5(i::text) END,
                  jsonb_build_object('n', i) FROM generate_series(1, 30000) i;
           {uuids};
           INSERT INTO "Uuids" SELECT md5(i::text)::uuid, jsonb_build_object('n', i) FROM generate_series(1, 20000) i;
           {gaps};
           INSERT INTO "Gaps" SELECT CASE WHEN i % 100 = 0 THEN i::bigint * 1000000000000 ELSE i END, jsonb_build_object('n', i)
             FROM generate_series(1, 25000) i;
           ANALYZE"#,
        skewed = data::koan_table("Skewed", "text"),
        uuids = data::koan_table("Uuids", "uuid"),
        gaps = data::koan_table("Gaps", "bigint"),
    ))
    .await
    .expect("creating the source tables");
    sandbox.start_coordinator("coordinator", &[]);
    sandbox.start_workers(2, &[]);
    let plan = r#"
        plan_id = "skew"
        chunk_rows = 1000
        [[entities]]
        name = "skewed"
        table = "Skewed"
        [[entities]]
        name = "uuids"
        table = "Uuids"
        [[entities]]
        name = "gaps"
        table = "Gaps"
    "#;
    let (kind, report, _) = sandbox.backup(plan).await;
    assert_eq!(kind, "completed", "{report:?}\n{}", sandbox.logs());
    let manifest = archive::manifest(
        &sandbox.storage,
        report.manifest.as_deref().expect("manifest"),
    );
    let lines = archive::read_all(&sandbox.storage, &manifest);
    for (entity, expected_rows) in [("skewed", 30_000usize), ("uuids", 20_000), ("gaps", 25_000)] {
        let described = manifest
            .entities
            .iter()
            .find(|e| e.spec.name == entity)
            .expect("entity in manifest");
        let chunks = &described.chunks;
        assert!(chunks.len() >= 10, "{entity}: only {} chunks", chunks.len());
        for (index, chunk) in chunks.iter().enumerate() {
            let last = index == chunks.len() - 1;
            assert!(
                chunk.rows <= 2000,
                "{entity} chunk {index} has {} rows",
                chunk.rows
            );
            assert!(
                last || chunk.rows >= 500,
                "{entity} chunk {index} has {} rows",
                chunk.rows
            );
        }
        let keys: BTreeSet<String> = lines[entity].iter().map(key_text).collect();
        assert_eq!(keys.len(), expected_rows, "{entity}: distinct keys");
        assert_eq!(lines[entity].len(), expected_rows, "{entity}: rows");
    }
    assert!(
        manifest
            .entities
            .iter()
            .any(|e| e.spec.key_type == Some(koan_protocol::plan::KeyType::Uuid))
    );
    let gaps = lines["gaps"]
        .iter()
        .find(|line| line.id == serde_json::json!(100_000_000_000_000u64));
    assert!(gaps.is_some(), "bigint keys are JSON numbers");
}

#[tokio::test(flavor = "multi_thread")]
async fn empty_tiny_huge_and_unicode_documents_round_trip() {
    let mut sandbox = Sandbox::new();
    let pg = sandbox.pg().await;
    pg.batch_execute(&format!(
        r#"{empty}; {one}; {huge}; {unicode};
           INSERT INTO "One" VALUES ('only', '{{"__koan_tenant": "t", "a": [1, 2.50, null, true]}}');
           INSERT INTO "Huge" SELECT 'big-' || i, jsonb_build_object('blob', repeat(md5(i::text), 5 * 1024 * 1024 / 32), 'i', i) FROM generate_series(1, 3) i;
           INSERT INTO "Huge" VALUES ('small', '{{"x": 1}}');
           INSERT INTO "Unicode" VALUES
             ('ключ-1', '{{"text": "Ünïcödé ✓ 日本語 🚀", "quote": "she said \"hi\"", "slash": "C:\\path\\to", "ctl": "tab\tnew\nline\r", "u": "\u00e9\u2028"}}'),
             ('key with spaces', '{{"emoji": "👩‍👩‍👧", "empty": "", "nested": {{"deep": [[], {{}}]}}}}'),
             (E'tab\tkey', '{{"n": -0.000001, "big": 123456789012345678901234567890}}'),
             ('quote''s "key"', '{{"x": "\\\\"}}')"#,
        empty = data::koan_table("Empty", "text"),
        one = data::koan_table("One", "text"),
        huge = data::koan_table("Huge", "text"),
        unicode = data::koan_table("Unicode", "text"),
    ))
    .await
    .expect("creating the source tables");
    sandbox.start_coordinator("coordinator", &[]);
    sandbox.start_workers(2, &[]);
    let plan = r#"
        plan_id = "edges"
        consistency = "per-chunk"
        [[entities]]
        name = "empty"
        table = "Empty"
        [[entities]]
        name = "one"
        table = "One"
        [[entities]]
        name = "huge"
        table = "Huge"
        chunk_rows = 2
        [[entities]]
        name = "unicode"
        table = "Unicode"
    "#;
    let (kind, report, follower) = sandbox.backup(plan).await;
    assert_eq!(kind, "completed", "{report:?}\n{}", sandbox.logs());
    follower.assert_monotonic_to_100();
    let manifest = archive::manifest(
        &sandbox.storage,
        report.manifest.as_deref().expect("manifest"),
    );
    let lines = archive::read_all(&sandbox.storage, &manifest);
    for (entity, table) in [
        ("empty", "Empty"),
        ("one", "One"),
        ("huge", "Huge"),
        ("unicode", "Unicode"),
    ] {
        let source: BTreeMap<String, serde_json::Value> = pg
            .query(&format!(r#"SELECT "Id", "Json"::text FROM "{table}""#), &[])
            .await
            .expect("reading the source")
            .iter()
            .map(|row| {
                (
                    row.get::<_, String>(0),
                    serde_json::from_str(row.get::<_, &str>(1)).expect("source json"),
                )
            })
            .collect();
        let archived: BTreeMap<String, serde_json::Value> = lines
            .get(entity)
            .map(|lines| {
                lines
                    .iter()
                    .map(|line| (key_text(line), line.doc.clone()))
                    .collect()
            })
            .unwrap_or_default();
        assert_eq!(archived.len(), source.len(), "{entity}: row count");
        assert_eq!(archived, source, "{entity}: documents differ");
    }
    let empty = manifest
        .entities
        .iter()
        .find(|e| e.spec.name == "empty")
        .expect("empty entity");
    assert_eq!(empty.rows, 0);
    assert!(
        empty.chunks.iter().all(|chunk| chunk.parts.is_empty()),
        "an empty table writes no part"
    );
}

async fn submit_raw(sandbox: &Sandbox, command: StartBackup) -> Reply {
    let broker = sandbox.broker().await;
    koan_transport::topology::declare_coordinator(broker.publisher())
        .await
        .expect("topology");
    let command = Command::StartBackup(command);
    let outgoing = Outgoing::encode(COMMANDS_EXCHANGE, "start_backup", &command).expect("encode");
    let reply = rpc::request(&broker, outgoing, Duration::from_secs(60))
        .await
        .expect("reply");
    koan_protocol::decode::<Reply>(&reply.payload).expect("decode reply")
}

#[tokio::test(flavor = "multi_thread")]
async fn invalid_plans_are_rejected_before_any_job() {
    let mut sandbox = Sandbox::new();
    let pg = sandbox.pg().await;
    pg.batch_execute(&data::koan_table("Real", "text"))
        .await
        .expect("table");
    sandbox.start_coordinator("coordinator", &[]);

    let mut missing_column = BackupEntity::new("real", "Real");
    missing_column.key = Some("NoSuchKey".into());
    let mut missing_document = BackupEntity::new("real", "Real");
    missing_document.document = Some("Body".into());
    let cases: Vec<(BackupPlan, &str)> = vec![
        (
            BackupPlan::new("p").entity(BackupEntity::new("ghost", "NoSuchTable")),
            "NoSuchTable",
        ),
        (BackupPlan::new("p").entity(missing_column), "NoSuchKey"),
        (BackupPlan::new("p").entity(missing_document), "Body"),
        (
            BackupPlan::new("p").entity(BackupEntity::new("../x", "Real")),
            "../x",
        ),
        (
            BackupPlan::new("p").entity(BackupEntity::new("e", "a\"; drop table t; --")),
            "drop table t",
        ),
        (
            BackupPlan::new("../../etc").entity(BackupEntity::new("e", "Real")),
            "../../etc",
        ),
        (
            BackupPlan::new("p").entity(BackupEntity::new("e", "Real").in_scope("b", "x/../../y")),
            "x/../../y",
        ),
    ];
    for (plan, name) in cases {
        let reply = submit_raw(
            &sandbox,
            StartBackup {
                plan: Some(plan),
                ..StartBackup::default()
            },
        )
        .await;
        match reply {
            Reply::Rejected(rejected) => assert!(
                rejected.error.contains(name),
                "error {:?} does not name {name}",
                rejected.error
            ),
            other => panic!("plan naming {name} was not rejected: {other:?}"),
        }
    }
    let reply = submit_raw(
        &sandbox,
        StartBackup {
            plan_id: Some("never-registered".into()),
            ..StartBackup::default()
        },
    )
    .await;
    assert!(
        matches!(&reply, Reply::Rejected(r) if r.code == "unknown_plan" && r.error.contains("never-registered")),
        "{reply:?}"
    );

    // The CLI refuses a hostile plan file before sending anything.
    let file = sandbox.write_file(
        "hostile.toml",
        "plan_id = \"p\"\n[[entities]]\nname = \"e\"\ntable = 'a\"; drop table t; --'\n",
    );
    let output = sandbox.cli(&["backup", "--plan", file.to_str().expect("path")]);
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("drop table t"));

    // No job was published, nothing was written, the table is intact.
    let broker = sandbox.broker().await;
    let channel = broker.channel().await.expect("channel");
    let queue = channel
        .queue_declare(
            "koan.jobs.default".into(),
            lapin::options::QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            Default::default(),
        )
        .await
        .expect("the default pool queue exists");
    assert_eq!(queue.message_count(), 0, "a job was published");
    assert!(
        sandbox.archive_files().is_empty(),
        "files written: {:?}",
        sandbox.archive_files()
    );
    let count = data::count(&pg, r#"SELECT count(*) FROM "Real""#).await;
    assert_eq!(count, 0);
    sandbox.assert_alive();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_python_client_submits_and_follows_a_backup() {
    let mut sandbox = Sandbox::new();
    let pg = sandbox.pg().await;
    data::orders(&pg, 20_000, 2).await;
    sandbox.start_coordinator("coordinator", &[]);
    sandbox.start_workers(2, &[]);
    // The client talks to a running deployment: wait until the coordinator answers.
    let ready = sandbox.cli(&["list"]);
    assert!(
        ready.status.success(),
        "the coordinator does not answer: {}",
        String::from_utf8_lossy(&ready.stderr)
    );
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python/submit_backup.py");
    let output = std::process::Command::new("python3")
        .arg(script)
        .env("KOAN_AMQP_URL", &sandbox.amqp_url)
        .env("KOAN_TABLE", "Order")
        .env("KOAN_SCOPE", "tenant-0")
        .output()
        .expect("running python3 (install with `pip install pika msgpack`)");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "python client failed:\n{stdout}\n{stderr}\n{}",
        sandbox.logs()
    );
    assert!(stdout.contains("accepted"), "{stdout}");
    assert!(
        stdout.lines().any(|line| line.starts_with("progress")),
        "{stdout}"
    );
    assert!(
        stdout.trim_end().ends_with("completed 100.0 10000"),
        "{stdout}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn follow_exits_zero_on_completion_and_non_zero_with_the_reason_on_failure() {
    let mut sandbox = Sandbox::new();
    let pg = sandbox.pg().await;
    pg.batch_execute(&format!(
        r#"{}; {};
           CREATE TABLE "Broken" ("Id" text PRIMARY KEY, "Json" text NOT NULL);
           INSERT INTO "Broken" VALUES ('a', '{{"ok": true}}'), ('b', 'this is not json')"#,
        data::koan_table("Order", "text"),
        data::insert_orders("Order", 5_000, 1)
    ))
    .await
    .expect("creating the source tables");
    sandbox.start_coordinator("coordinator", &[]);
    sandbox.start_workers(1, &[]);

    let good = sandbox.write_file("good.toml", "plan_id = \"good\"\n[[entities]]\nname = \"orders\"\ntable = \"Order\"\nchunk_rows = 1000\n");
    let output = sandbox.cli(&[
        "backup",
        "--plan",
        good.to_str().expect("path"),
        "--follow",
        "--json",
    ]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let last: serde_json::Value =
        serde_json::from_str(stdout.lines().last().expect("a final report")).expect("json report");
    assert_eq!(last["state"], "completed");
    assert_eq!(last["percent"], 100.0);
    assert_eq!(last["rows_done"], 5000);
    let progress_lines = stdout
        .lines()
        .filter(|line| line.contains("\"state\":\"running\""))
        .count();
    assert!(progress_lines >= 1, "no live progress in {stdout}");

    let broken = sandbox.write_file(
        "broken.toml",
        "plan_id = \"broken\"\n[[entities]]\nname = \"broken\"\ntable = \"Broken\"\n",
    );
    let output = sandbox.cli(&[
        "backup",
        "--plan",
        broken.to_str().expect("path"),
        "--follow",
    ]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("failed"), "{stderr}");
    assert!(
        stderr.contains("broken"),
        "the reason names the entity: {stderr}"
    );
    assert!(
        stderr.to_lowercase().contains("json"),
        "the reason says what was wrong: {stderr}"
    );
    sandbox.assert_alive();
}
