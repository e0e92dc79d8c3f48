//! Pause, resume by continuation token across a restart of every process,
//! and cancel — against real RabbitMQ and PostgreSQL, with the real binary.
//!
//! `cargo test --test lifecycle`

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::{BTreeSet, HashSet};
use std::time::{Duration, Instant};

use koan_protocol::progress::{OperationState, ProgressReport};
use uuid::Uuid;

use support::{Sandbox, archive, data};

const PLAN: &str = r#"
    plan_id = "orders:lifecycle"
    [[entities]]
    name = "orders"
    table = "Order"
    bucket = "orders"
    scope = "tenant-0"
    chunk_rows = 20000
"#;

/// Small parts, so each chunk has many and a resumed chunk continues mid-way.
const COORDINATOR_ARGS: &[&str] = &["--part-bytes", "262144"];
/// One job at a time per worker, so the backup runs long enough to pause.
const WORKER_ARGS: &[&str] = &["--concurrency", "1"];

fn status(sandbox: &Sandbox, operation_id: Uuid) -> Option<ProgressReport> {
    let output = sandbox.cli(&["status", "--json", &operation_id.to_string()]);
    if !output.status.success() {
        return None;
    }
    serde_json::from_slice(&output.stdout).ok()
}

/// Polls `status` until `done` holds, or panics after `timeout` with the logs.
fn wait_for(
    sandbox: &Sandbox,
    operation_id: Uuid,
    timeout: Duration,
    what: &str,
    done: impl Fn(&ProgressReport) -> bool,
) -> ProgressReport {
    let deadline = Instant::now() + timeout;
    let mut last = None;
    while Instant::now() < deadline {
        if let Some(report) = status(sandbox, operation_id) {
            if done(&report) {
                return report;
            }
            last = Some(report);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!(
        "timed out waiting for {what}; last status: {last:?}\n{}",
        sandbox.logs()
    );
}

fn submit(sandbox: &Sandbox) -> Uuid {
    let operation_id = Uuid::now_v7();
    let plan = sandbox.write_file(&format!("plan-{operation_id}.toml"), PLAN);
    let output = sandbox.cli(&[
        "backup",
        "--plan",
        plan.to_str().unwrap(),
        "--operation-id",
        &operation_id.to_string(),
    ]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    operation_id
}

fn files_under(sandbox: &Sandbox, operation_id: Uuid) -> Vec<String> {
    let id = operation_id.to_string();
    sandbox
        .archive_files()
        .into_iter()
        .filter(|path| path.contains(&id))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_restart_everything_and_resume_by_token() {
    let mut sandbox = Sandbox::new();
    let pg = sandbox.pg().await;
    data::orders(&pg, 300_000, 1).await;
    sandbox.start_coordinator("coordinator", COORDINATOR_ARGS);
    sandbox.start_workers(3, WORKER_ARGS);
    let operation_id = submit(&sandbox);
    let id = operation_id.to_string();

    wait_for(
        &sandbox,
        operation_id,
        Duration::from_secs(180),
        "40 %",
        |report| report.percent >= 40.0 || report.state.is_terminal(),
    );
    let output = sandbox.cli(&["pause", &id]);
    assert!(
        output.status.success(),
        "pause: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let paused = status(&sandbox, operation_id).expect("status after pause");
    assert_eq!(paused.state, OperationState::Paused, "{paused:?}");
    assert!(paused.percent < 100.0);
    let token = paused
        .continuation_token
        .clone()
        .expect("a continuation token");
    // Pausing again is idempotent.
    assert!(sandbox.cli(&["pause", &id]).status.success());

    // Every process dies; new ones pick the state up from PostgreSQL.
    sandbox.kill_all();
    sandbox.start_coordinator("coordinator-2", COORDINATOR_ARGS);
    sandbox.start_named_workers("worker-b", 3, WORKER_ARGS);

    // A modified token is refused, with the reason, exit code 2.
    let mut tampered = token.clone().into_bytes();
    let position = tampered.len() / 3;
    tampered[position] = if tampered[position] == b'A' {
        b'B'
    } else {
        b'A'
    };
    let tampered = String::from_utf8(tampered).unwrap();
    let refused = sandbox.cli(&["resume", "--token", &tampered]);
    assert_eq!(refused.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("invalid_token"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    assert_eq!(
        status(&sandbox, operation_id).unwrap().state,
        OperationState::Paused
    );

    let resumed = sandbox.cli(&["resume", "--token", &token, "--follow"]);
    assert_eq!(
        resumed.status.code(),
        Some(0),
        "resume: {}\n{}",
        String::from_utf8_lossy(&resumed.stderr),
        sandbox.logs()
    );
    let report = wait_for(
        &sandbox,
        operation_id,
        Duration::from_secs(240),
        "completion",
        |report| report.state.is_terminal(),
    );
    assert_eq!(
        report.state,
        OperationState::Completed,
        "{report:?}\n{}",
        sandbox.logs()
    );

    let manifest = archive::manifest(&sandbox.storage, report.manifest.as_deref().unwrap());
    assert!(
        !manifest.consistency.notes.is_empty(),
        "the manifest records the new snapshot: {:?}",
        manifest.consistency
    );
    // No part exported twice: each (chunk, part) once, and the part files on
    // disk are exactly the manifest's.
    let mut numbers = HashSet::new();
    for (_, chunk, part) in manifest.parts() {
        assert!(
            numbers.insert((chunk.chunk, part.part)),
            "chunk {} part {} twice",
            chunk.chunk,
            part.part
        );
    }
    let listed: BTreeSet<String> = manifest
        .parts()
        .map(|(_, _, part)| part.path.clone())
        .collect();
    let on_disk: BTreeSet<String> = files_under(&sandbox, operation_id)
        .into_iter()
        .filter(|path| !path.ends_with("manifest.json"))
        .collect();
    assert_eq!(on_disk, listed);

    // Every source row exactly once.
    let lines = archive::read_all(&sandbox.storage, &manifest);
    let keys: Vec<String> = lines["orders"].iter().map(archive::key_text).collect();
    let unique: BTreeSet<String> = keys.iter().cloned().collect();
    assert_eq!(unique.len(), keys.len(), "a row is in the archive twice");
    let expected: BTreeSet<String> = pg
        .query(r#"SELECT "Id" FROM "Order""#, &[])
        .await
        .unwrap()
        .iter()
        .map(|row| row.get::<_, String>(0))
        .collect();
    assert_eq!(expected.len(), 300_000);
    assert_eq!(unique, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_stops_and_removes_everything() {
    let mut sandbox = Sandbox::new();
    let pg = sandbox.pg().await;
    data::orders(&pg, 300_000, 1).await;
    sandbox.start_coordinator("coordinator", COORDINATOR_ARGS);
    sandbox.start_workers(3, WORKER_ARGS);
    let operation_id = submit(&sandbox);
    let id = operation_id.to_string();

    wait_for(
        &sandbox,
        operation_id,
        Duration::from_secs(180),
        "40 %",
        |report| report.percent >= 40.0 || report.state.is_terminal(),
    );
    assert!(!files_under(&sandbox, operation_id).is_empty());
    let cancelled_at = Instant::now();
    let output = sandbox.cli(&["cancel", &id]);
    assert!(
        output.status.success(),
        "cancel: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report = wait_for(
        &sandbox,
        operation_id,
        Duration::from_secs(30),
        "cancelled",
        |report| report.state.is_terminal(),
    );
    assert_eq!(report.state, OperationState::Cancelled, "{report:?}");
    assert!(
        cancelled_at.elapsed() < Duration::from_secs(5),
        "cancelled after {:?}",
        cancelled_at.elapsed()
    );
    assert!(report.manifest.is_none());

    // The discard job empties the backup's prefix (swept twice, 2 s apart).
    let deadline = Instant::now() + Duration::from_secs(60);
    while !files_under(&sandbox, operation_id).is_empty() {
        assert!(
            Instant::now() < deadline,
            "files left: {:?}\n{}",
            files_under(&sandbox, operation_id),
            sandbox.logs()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // Nothing comes back: exports stopped, and no manifest is written.
    std::thread::sleep(Duration::from_secs(3));
    assert!(files_under(&sandbox, operation_id).is_empty());
    assert_eq!(
        status(&sandbox, operation_id).unwrap().state,
        OperationState::Cancelled
    );

    // Cancelling again is idempotent; pausing or resuming a cancelled backup is refused.
    assert!(sandbox.cli(&["cancel", &id]).status.success());
    let pause = sandbox.cli(&["pause", &id]);
    assert_eq!(pause.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&pause.stderr).contains("not_running"));
    assert_eq!(sandbox.cli(&["resume", &id]).status.code(), Some(2));
    sandbox.assert_alive();
}
