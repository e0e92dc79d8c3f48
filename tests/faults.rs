//! Fault injection against the real services: processes killed mid-backup,
//! poison messages. Every scenario ends with `verify` passing and every
//! source row exactly once in the archive.

mod support;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use koan_protocol::topology::{COMMANDS_EXCHANGE, DEAD_QUEUE, DEAD_REASON_HEADER, JOBS_EXCHANGE};
use koan_transport::Outgoing;
use support::archive::{self, key_text};
use support::{Follower, Sandbox, data};
use uuid::Uuid;

const ROWS: u64 = 300_000;

/// Small parts, so a chunk has several and a fault can land between two.
const SMALL_PARTS: &[&str] = &["--part-bytes", "1000000"];

/// A sandbox holding the 300,000-row `Order` table, a coordinator started
/// with `coordinator_args` and three workers.
async fn setup(coordinator_args: &[&str]) -> (Sandbox, tokio_postgres::Client) {
    let mut sandbox = Sandbox::new();
    let pg = sandbox.pg().await;
    data::orders(&pg, ROWS, 1).await;
    sandbox.start_coordinator("coordinator", coordinator_args);
    sandbox.start_workers(3, &[]);
    (sandbox, pg)
}

/// Submits the orders backup and returns its id and follower.
async fn start_backup(sandbox: &Sandbox, chunk_rows: u64) -> (Uuid, Follower) {
    let broker = sandbox.broker().await;
    let operation_id = Uuid::now_v7();
    let follower = Follower::bind(&broker, operation_id).await;
    let plan = format!(
        "plan_id = \"orders\"\n[[entities]]\nname = \"orders\"\ntable = \"Order\"\nchunk_rows = {chunk_rows}\n"
    );
    let file = sandbox.write_file("plan.toml", &plan);
    let output = sandbox.cli(&[
        "backup",
        "--plan",
        file.to_str().expect("path"),
        "--operation-id",
        &operation_id.to_string(),
    ]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    (operation_id, follower)
}

/// Waits for completion, then checks the archive: `verify` passes and every
/// source row is there exactly once.
async fn assert_complete_and_exact(
    sandbox: &Sandbox,
    pg: &tokio_postgres::Client,
    follower: &mut Follower,
) -> koan_protocol::archive::Manifest {
    let (kind, report) = follower.until_terminal(Duration::from_secs(300)).await;
    assert_eq!(kind, "completed", "{report:?}\n{}", sandbox.logs());
    let verify = sandbox.cli(&["verify", &report.operation_id.to_string()]);
    assert!(
        verify.status.success(),
        "verify: {}",
        String::from_utf8_lossy(&verify.stderr)
    );
    let manifest = archive::manifest(
        &sandbox.storage,
        report.manifest.as_deref().expect("manifest"),
    );
    let lines = archive::read_all(&sandbox.storage, &manifest);
    let mut seen = BTreeSet::new();
    for line in &lines["orders"] {
        assert!(seen.insert(key_text(line)), "row {} twice", key_text(line));
    }
    assert_eq!(
        seen.len() as i64,
        data::count(pg, r#"SELECT count(*) FROM "Order""#).await
    );
    manifest
}

async fn percent(pg: &tokio_postgres::Client, operation_id: Uuid) -> f64 {
    pg.query_opt(
        "SELECT percent FROM koan.operations WHERE id = $1",
        &[&operation_id],
    )
    .await
    .ok()
    .flatten()
    .map(|row| row.get::<_, f64>(0))
    .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_worker_killed_mid_chunk_resumes_after_its_durable_parts() {
    let (mut sandbox, pg) = setup(SMALL_PARTS).await;
    let (operation_id, mut follower) = start_backup(&sandbox, 50_000).await;

    let (victim, chunk, durable, _) = durable_chunk_off_holder(&sandbox, &pg, operation_id).await;
    sandbox.signal(&victim, "KILL");
    sandbox.forget(&victim);

    let manifest = assert_complete_and_exact(&sandbox, &pg, &mut follower).await;
    let parts = manifest_parts(&manifest, chunk);
    for path in &durable {
        assert!(
            parts.contains(path),
            "durable part {path} was rewritten: {parts:?}"
        );
    }
    sandbox.assert_alive();
}

/// Waits for a chunk running with at least one durable part on a worker other
/// than the snapshot holder (losing the holder is its own scenario); returns
/// that worker, the chunk, the paths of its durable parts and the run.
async fn durable_chunk_off_holder(
    sandbox: &Sandbox,
    pg: &tokio_postgres::Client,
    operation_id: Uuid,
) -> (String, i32, Vec<String>, String) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        assert!(
            Instant::now() < deadline,
            "never saw a running chunk with a durable part\n{}",
            sandbox.logs()
        );
        let row = pg
            .query_opt(
                "SELECT c.worker, c.chunk, array_agg(p.path ORDER BY p.part), c.owner_run
                   FROM koan.chunks c JOIN koan.parts p USING (operation_id, entity, chunk)
                   JOIN koan.entities e ON e.operation_id = c.operation_id AND e.name = c.entity
                  WHERE c.operation_id = $1 AND c.state = 'running' AND p.run = c.owner_run
                    AND c.worker IS DISTINCT FROM e.snapshot->>'holder'
                  GROUP BY c.worker, c.chunk, c.owner_run LIMIT 1",
                &[&operation_id],
            )
            .await
            .ok()
            .flatten();
        if let Some(row) = row {
            return (row.get(0), row.get(1), row.get(2), row.get(3));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The paths of every part of `chunk` in the manifest.
fn manifest_parts(manifest: &koan_protocol::archive::Manifest, chunk: i32) -> Vec<String> {
    manifest.entities[0]
        .chunks
        .iter()
        .find(|c| c.chunk == chunk as u32)
        .expect("the chunk")
        .parts
        .iter()
        .map(|part| part.path.clone())
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_terminated_worker_hands_its_chunk_back_at_a_part_boundary() {
    let (mut sandbox, pg) = setup(SMALL_PARTS).await;
    let (operation_id, mut follower) = start_backup(&sandbox, 50_000).await;
    let (victim, chunk, _, run) = durable_chunk_off_holder(&sandbox, &pg, operation_id).await;
    sandbox.signal(&victim, "TERM");
    let status = sandbox.wait_exit(&victim, Duration::from_secs(35));
    assert!(status.success(), "{victim} exited with {status}");
    let log = std::fs::read_to_string(sandbox.work_dir.join(format!("{victim}.log")))
        .expect("the worker's log");
    assert!(
        log.contains("chunk handed back at a part boundary"),
        "{victim} did not hand its chunk back:\n{log}"
    );
    // Every part the stopped run made durable, the sealed one included.
    let handed_back: Vec<String> = pg
        .query_one(
            "SELECT coalesce(array_agg(path ORDER BY part), '{}')
               FROM koan.parts WHERE operation_id = $1 AND chunk = $2 AND run = $3",
            &[&operation_id, &chunk, &run],
        )
        .await
        .expect("parts")
        .get(0);
    assert!(!handed_back.is_empty());

    let manifest = assert_complete_and_exact(&sandbox, &pg, &mut follower).await;
    let parts = manifest_parts(&manifest, chunk);
    for path in &handed_back {
        assert!(
            parts.contains(path),
            "part {path} of the stopped run was rewritten: {parts:?}"
        );
    }
    let failures: i32 = pg
        .query_one(
            "SELECT failures FROM koan.chunks WHERE operation_id = $1 AND chunk = $2",
            &[&operation_id, &chunk],
        )
        .await
        .expect("chunk")
        .get(0);
    assert_eq!(failures, 0, "a hand-back is not a failed run");
    sandbox.assert_alive();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_terminated_coordinator_stops_cleanly_and_another_completes_the_backup() {
    let (mut sandbox, pg) = setup(SMALL_PARTS).await;
    let (operation_id, mut follower) = start_backup(&sandbox, 50_000).await;
    let deadline = Instant::now() + Duration::from_secs(120);
    while percent(&pg, operation_id).await < 20.0 {
        assert!(
            Instant::now() < deadline,
            "the backup never reached 20 %\n{}",
            sandbox.logs()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    sandbox.signal("coordinator", "TERM");
    let status = sandbox.wait_exit("coordinator", Duration::from_secs(15));
    assert!(status.success(), "the coordinator exited with {status}");
    sandbox.start_coordinator("coordinator-2", SMALL_PARTS);
    assert_complete_and_exact(&sandbox, &pg, &mut follower).await;
    sandbox.assert_alive();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_coordinator_killed_mid_backup_is_replaced() {
    let (mut sandbox, pg) = setup(SMALL_PARTS).await;
    let (operation_id, mut follower) = start_backup(&sandbox, 20_000).await;
    let deadline = Instant::now() + Duration::from_secs(120);
    while percent(&pg, operation_id).await < 20.0 {
        assert!(
            Instant::now() < deadline,
            "the backup never reached 20 %\n{}",
            sandbox.logs()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    sandbox.signal("coordinator", "KILL");
    sandbox.forget("coordinator");
    sandbox.start_coordinator("coordinator-2", &["--part-bytes", "1000000"]);
    assert_complete_and_exact(&sandbox, &pg, &mut follower).await;
    sandbox.assert_alive();
}

#[tokio::test(flavor = "multi_thread")]
async fn poison_messages_are_dead_lettered_and_the_backup_completes() {
    let (mut sandbox, pg) = setup(&[]).await;
    let (_, mut follower) = start_backup(&sandbox, 20_000).await;

    let broker = sandbox.broker().await;
    let bodies: Vec<(&str, Vec<u8>)> = vec![
        ("garbage", b"\xc1\xc1 not msgpack".to_vec()),
        ("wrong version", rmp_serde::to_vec_named(&serde_json::json!({"protocol": 99, "kind": "start_backup", "body": {}})).expect("encode")),
        ("unknown kind", rmp_serde::to_vec_named(&serde_json::json!({"protocol": 1, "kind": "drop_everything", "body": {}})).expect("encode")),
        ("unknown field", rmp_serde::to_vec_named(&serde_json::json!({"protocol": 1, "kind": "start_backup", "body": {"plan_id": "x", "evil": true}})).expect("encode")),
        ("hostile plan", rmp_serde::to_vec_named(&serde_json::json!({"protocol": 1, "kind": "export_chunk", "body": {"operation_id": "../../etc"}})).expect("encode")),
        ("oversize", vec![0x90; 2 * 1024 * 1024]),
    ];
    let mut published = 0;
    for round in 0..84 {
        for (label, body) in &bodies {
            for (exchange, routing_key) in [
                (COMMANDS_EXCHANGE, "start_backup"),
                (JOBS_EXCHANGE, "default"),
            ] {
                if published == 1000 {
                    break;
                }
                let message = Outgoing {
                    exchange: exchange.to_string(),
                    routing_key: routing_key.to_string(),
                    payload: if *label == "oversize" && round > 0 {
                        vec![0x90; 1024]
                    } else {
                        body.clone()
                    },
                    kind: label.to_string(),
                    message_id: Uuid::now_v7().to_string(),
                    correlation_id: None,
                    reply_to: None,
                    headers: Vec::new(),
                };
                broker
                    .publish(&message)
                    .await
                    .expect("publishing a poison message");
                published += 1;
            }
        }
    }
    assert_eq!(published, 1000);
    assert_complete_and_exact(&sandbox, &pg, &mut follower).await;

    let mut dead = broker
        .subscribe(DEAD_QUEUE, 500)
        .await
        .expect("consuming koan.dead");
    let mut reasons = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while reasons < 1000 {
        let delivery = tokio::time::timeout_at(deadline, dead.next())
            .await
            .unwrap_or_else(|_| panic!("only {reasons} of 1000 poison messages reached koan.dead"))
            .expect("delivery");
        let reason = delivery.header(DEAD_REASON_HEADER).unwrap_or_default();
        assert!(
            !reason.is_empty(),
            "a dead-lettered message without a reason"
        );
        delivery.ack().await.expect("ack");
        reasons += 1;
    }
    sandbox.assert_alive();
}

#[tokio::test(flavor = "multi_thread")]
async fn losing_the_snapshot_holder_fails_fast_with_a_clear_error() {
    let (mut sandbox, pg) = setup(SMALL_PARTS).await;
    let (operation_id, mut follower) = start_backup(&sandbox, 20_000).await;
    let deadline = Instant::now() + Duration::from_secs(120);
    let holder = loop {
        assert!(
            Instant::now() < deadline,
            "the entity was never planned\n{}",
            sandbox.logs()
        );
        let row = pg
            .query_opt("SELECT snapshot->>'holder' FROM koan.entities WHERE operation_id = $1 AND snapshot IS NOT NULL", &[&operation_id])
            .await
            .ok()
            .flatten();
        if let Some(holder) = row.and_then(|row| row.get::<_, Option<String>>(0)) {
            break holder;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    sandbox.signal(&holder, "KILL");
    sandbox.forget(&holder);
    let (kind, report) = follower.until_terminal(Duration::from_secs(300)).await;
    if kind == "completed" {
        // Every chunk had already imported the snapshot: the backup is still exact.
        let verify = sandbox.cli(&["verify", &operation_id.to_string()]);
        assert!(verify.status.success());
        return;
    }
    assert_eq!(kind, "failed", "{report:?}");
    let error = report.error.unwrap_or_default();
    assert!(
        error.contains("snapshot") && error.contains("lost"),
        "{error}"
    );
    let manifest_written = sandbox
        .archive_files()
        .iter()
        .any(|file| file.ends_with("manifest.json"));
    assert!(!manifest_written, "a failed backup has no manifest");
}

/// Waits for a chunk that is running with at least one durable part and
/// returns its worker and number.
async fn running_chunk_with_parts(
    sandbox: &Sandbox,
    pg: &tokio_postgres::Client,
    operation_id: Uuid,
) -> (String, i32) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        assert!(
            Instant::now() < deadline,
            "never saw a running chunk with a durable part\n{}",
            sandbox.logs()
        );
        let row = pg
            .query_opt(
                "SELECT c.worker, c.chunk FROM koan.chunks c
                  WHERE c.operation_id = $1 AND c.state = 'running' AND c.parts >= 1 LIMIT 1",
                &[&operation_id],
            )
            .await
            .ok()
            .flatten();
        if let Some(row) = row {
            return (row.get(0), row.get(1));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_terminated_source_connection_mid_chunk_is_retried() {
    let (mut sandbox, pg) = setup(SMALL_PARTS).await;
    let (operation_id, mut follower) = start_backup(&sandbox, 50_000).await;
    running_chunk_with_parts(&sandbox, &pg, operation_id).await;
    let database = sandbox.name.clone();
    let terminated: i64 = pg
        .query_one(
            "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity
              WHERE datname = $1 AND query ILIKE 'COPY%' AND pid <> pg_backend_pid()) t",
            &[&database],
        )
        .await
        .expect("terminating the COPY backends")
        .get(0);
    assert!(terminated >= 1, "no COPY was running to terminate");
    assert_complete_and_exact(&sandbox, &pg, &mut follower).await;
    sandbox.assert_alive();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_worker_stopped_past_its_lease_is_replaced_and_cannot_corrupt_the_archive() {
    let (mut sandbox, pg) = setup(&["--part-bytes", "1000000", "--lease-seconds", "5"]).await;
    let (operation_id, mut follower) = start_backup(&sandbox, 50_000).await;
    let (victim, chunk) = running_chunk_with_parts(&sandbox, &pg, operation_id).await;
    sandbox.signal(&victim, "STOP");
    // Past the lease (5 s) and the coordinator's reaping interval (5 s): another worker takes the chunk.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let attempt: i32 = pg
            .query_one(
                "SELECT attempt FROM koan.chunks WHERE operation_id = $1 AND chunk = $2",
                &[&operation_id, &chunk],
            )
            .await
            .expect("chunk")
            .get(0);
        if attempt >= 2 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the stopped worker's chunk was never re-published\n{}",
            sandbox.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    sandbox.signal(&victim, "CONT");
    assert_complete_and_exact(&sandbox, &pg, &mut follower).await;
    sandbox.assert_alive();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_worker_killed_mid_restore_is_replaced() {
    let mut sandbox = Sandbox::new();
    let pg = sandbox.pg().await;
    data::orders(&pg, ROWS, 1).await;
    let target_url = sandbox.create_database("target");
    sandbox.start_coordinator("coordinator", &["--part-bytes", "1000000"]);
    sandbox.start_workers(2, &[]);
    sandbox.start_pool_workers("target", &target_url, 3);
    let (backup_id, mut follower) = start_backup(&sandbox, 50_000).await;
    assert_complete_and_exact(&sandbox, &pg, &mut follower).await;

    let restore_id = Uuid::now_v7();
    let broker = sandbox.broker().await;
    let mut follower = Follower::bind(&broker, restore_id).await;
    let output = sandbox.cli(&[
        "restore",
        &backup_id.to_string(),
        "--mode",
        "overwrite",
        "--pool",
        "target",
        "--operation-id",
        &restore_id.to_string(),
    ]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let deadline = Instant::now() + Duration::from_secs(120);
    while percent(&pg, restore_id).await < 10.0 {
        assert!(
            Instant::now() < deadline,
            "the restore never reached 10 %\n{}",
            sandbox.logs()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    sandbox.signal("target-worker-0", "KILL");
    sandbox.forget("target-worker-0");
    let (kind, report) = follower.until_terminal(Duration::from_secs(300)).await;
    assert_eq!(kind, "completed", "{report:?}\n{}", sandbox.logs());
    let target = sandbox.pg_at(&target_url).await;
    data::assert_same_orders(&pg, &target, ROWS as i64).await;
    sandbox.assert_alive();
}

#[tokio::test(flavor = "multi_thread")]
async fn two_coordinators_at_once_publish_once_and_agree() {
    let mut sandbox = Sandbox::new();
    let pg = sandbox.pg().await;
    data::orders(&pg, ROWS, 1).await;
    sandbox.start_coordinator("coordinator-a", &["--part-bytes", "1000000"]);
    sandbox.start_coordinator("coordinator-b", &["--part-bytes", "1000000"]);
    sandbox.start_workers(3, &[]);
    let (_, mut follower) = start_backup(&sandbox, 20_000).await;
    let manifest = assert_complete_and_exact(&sandbox, &pg, &mut follower).await;
    follower.collect_for(Duration::from_secs(3)).await;
    follower.assert_monotonic_to_100();
    let completed = follower
        .reports
        .iter()
        .filter(|(kind, _)| kind == "completed")
        .count();
    assert_eq!(
        completed, 1,
        "the completed event was published {completed} times"
    );
    let mut parts = BTreeSet::new();
    for (_, chunk, part) in manifest.parts() {
        assert!(
            parts.insert((chunk.chunk, part.part)),
            "chunk {} part {} listed twice",
            chunk.chunk,
            part.part
        );
    }
    sandbox.assert_alive();
}
