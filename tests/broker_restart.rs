//! RabbitMQ stopped and started again in the middle of a backup and of a
//! restore. It runs alone in its own test binary: stopping the broker would
//! disturb any other test running beside it.

mod support;

use std::collections::BTreeSet;
use std::process::Command;
use std::time::{Duration, Instant};

use support::archive::{self, key_text};
use support::{Sandbox, data};
use uuid::Uuid;

async fn state_and_percent(pg: &tokio_postgres::Client, operation_id: Uuid) -> (String, f64) {
    pg.query_opt(
        "SELECT state, percent FROM koan.operations WHERE id = $1",
        &[&operation_id],
    )
    .await
    .ok()
    .flatten()
    .map(|row| (row.get(0), row.get(1)))
    .unwrap_or_default()
}

async fn wait_for(
    pg: &tokio_postgres::Client,
    sandbox: &Sandbox,
    operation_id: Uuid,
    done: impl Fn(&str, f64) -> bool,
) -> String {
    let deadline = Instant::now() + Duration::from_secs(150);
    loop {
        let (state, percent) = state_and_percent(pg, operation_id).await;
        if done(&state, percent) {
            return state;
        }
        assert!(
            Instant::now() < deadline,
            "operation {operation_id} stuck in {state} ({percent} %)\n{}",
            sandbox.logs()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn rabbitmqctl(action: &str) {
    let status = Command::new("rabbitmqctl")
        .arg(action)
        .status()
        .expect("running rabbitmqctl");
    assert!(status.success(), "rabbitmqctl {action} failed");
}

/// Stops the broker's application for ~5 s, then starts it again.
fn bounce_the_broker() {
    rabbitmqctl("stop_app");
    std::thread::sleep(Duration::from_secs(5));
    rabbitmqctl("start_app");
    rabbitmqctl("await_startup");
}

#[tokio::test(flavor = "multi_thread")]
async fn backups_and_restores_survive_a_broker_restart() {
    let mut sandbox = Sandbox::new();
    let pg = sandbox.pg().await;
    data::orders(&pg, 300_000, 1).await;
    let target_url = sandbox.create_database("target");
    sandbox.start_coordinator("coordinator", &["--part-bytes", "1000000"]);
    sandbox.start_workers(3, &[]);
    sandbox.start_pool_workers("target", &target_url, 3);

    // Backup: bounce the broker once rows are flowing.
    let backup_id = Uuid::now_v7();
    let plan = sandbox.write_file("plan.toml", "plan_id = \"orders\"\n[[entities]]\nname = \"orders\"\ntable = \"Order\"\nchunk_rows = 50000\n");
    let output = sandbox.cli(&[
        "backup",
        "--plan",
        plan.to_str().expect("path"),
        "--operation-id",
        &backup_id.to_string(),
    ]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    wait_for(&pg, &sandbox, backup_id, |state, percent| {
        percent > 5.0 || state == "completed"
    })
    .await;
    bounce_the_broker();
    let state = wait_for(&pg, &sandbox, backup_id, |state, _| {
        matches!(state, "completed" | "failed")
    })
    .await;
    assert_eq!(state, "completed", "{}", sandbox.logs());
    let status = sandbox.cli(&["status", &backup_id.to_string(), "--json"]);
    let status: serde_json::Value = serde_json::from_slice(&status.stdout).expect("status json");
    let manifest = archive::manifest(
        &sandbox.storage,
        status["manifest"].as_str().expect("manifest"),
    );
    let verify = sandbox.cli(&["verify", &backup_id.to_string()]);
    assert!(
        verify.status.success(),
        "{}",
        String::from_utf8_lossy(&verify.stderr)
    );
    let lines = archive::read_all(&sandbox.storage, &manifest);
    let keys: BTreeSet<String> = lines["orders"].iter().map(key_text).collect();
    assert_eq!(
        keys.len(),
        lines["orders"].len(),
        "a row is in the archive twice"
    );
    assert_eq!(keys.len(), 300_000);

    // Restore into an empty database: bounce the broker mid-restore.
    let restore_id = Uuid::now_v7();
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
    wait_for(&pg, &sandbox, restore_id, |state, percent| {
        percent > 5.0 || state == "completed"
    })
    .await;
    bounce_the_broker();
    let state = wait_for(&pg, &sandbox, restore_id, |state, _| {
        matches!(state, "completed" | "failed")
    })
    .await;
    assert_eq!(state, "completed", "{}", sandbox.logs());
    let target = sandbox.pg_at(&target_url).await;
    data::assert_same_orders(&pg, &target, 300_000).await;
    sandbox.assert_alive();
}
