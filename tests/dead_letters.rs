//! Jobs that no worker survives: every worker that takes the job is killed,
//! until RabbitMQ dead-letters it after its delivery limit. The operation must
//! then fail with a reason naming the job, instead of waiting for a report
//! that will never come, and the job must be in `koan.dead`.

mod support;

use std::time::{Duration, Instant};

use koan_protocol::codec::Message;
use koan_protocol::jobs::Job;
use koan_protocol::topology::{DEAD_QUEUE, JOB_DELIVERY_LIMIT};
use support::{Follower, Sandbox, data};
use uuid::Uuid;

/// Starts worker after worker (`--concurrency 1`, `pool`), each SIGKILLed as
/// soon as its log shows a `kind` job started, until the operation ends.
/// Jobs of other kinds run normally. Returns how many workers were killed.
async fn kill_every_worker_that_takes(
    sandbox: &mut Sandbox,
    pg: &tokio_postgres::Client,
    operation_id: Uuid,
    pool: &str,
    source_url: &str,
    kind: &str,
) -> u32 {
    let deadline = Instant::now() + Duration::from_secs(180);
    let mut killed = 0;
    loop {
        if state(pg, operation_id).await.as_deref() == Some("failed") {
            return killed;
        }
        assert!(
            Instant::now() < deadline,
            "the operation never failed after {killed} kills\n{}",
            sandbox.logs()
        );
        let name = format!("crasher-{killed}");
        sandbox.spawn_worker(
            &name,
            &[
                "--pool",
                pool,
                "--source-url",
                source_url,
                "--concurrency",
                "1",
            ],
        );
        let log = sandbox.work_dir.join(format!("{name}.log"));
        let took_job = loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if text
                .lines()
                .any(|line| line.contains("job started") && line.contains(kind))
            {
                break true;
            }
            if state(pg, operation_id).await.as_deref() == Some("failed") {
                break false;
            }
            assert!(
                Instant::now() < deadline,
                "{name} never started a {kind} job\n{}",
                sandbox.logs()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        sandbox.signal(&name, "KILL");
        sandbox.forget(&name);
        if took_job {
            killed += 1;
        }
    }
}

async fn state(pg: &tokio_postgres::Client, operation_id: Uuid) -> Option<String> {
    pg.query_opt(
        "SELECT state FROM koan.operations WHERE id = $1",
        &[&operation_id],
    )
    .await
    .ok()
    .flatten()
    .map(|row| row.get(0))
}

/// The dead-lettered jobs of `kind` for `operation_id` in `koan.dead`, with
/// RabbitMQ's first-death reason.
async fn dead_jobs(sandbox: &Sandbox, operation_id: Uuid, kind: &str) -> Vec<String> {
    let broker = sandbox.broker().await;
    let mut dead = broker
        .subscribe(DEAD_QUEUE, 100)
        .await
        .expect("consuming koan.dead");
    let mut reasons = Vec::new();
    while let Ok(Ok(delivery)) = tokio::time::timeout(Duration::from_secs(2), dead.next()).await {
        if let Ok(job) = koan_protocol::decode::<Job>(&delivery.payload)
            && job.operation_id() == operation_id
            && job.kind() == kind
        {
            reasons.push(delivery.header("x-first-death-reason").unwrap_or_default());
        }
        delivery.ack().await.expect("ack");
    }
    reasons
}

#[tokio::test(flavor = "multi_thread")]
async fn an_export_job_no_worker_survives_fails_its_chunk_after_the_delivery_limit() {
    let mut sandbox = Sandbox::new();
    let pg = sandbox.pg().await;
    data::orders(&pg, 20_000, 1).await;
    // A long lease: only RabbitMQ's delivery limit can end the chunk.
    sandbox.start_coordinator("coordinator", &["--lease-seconds", "600"]);
    let broker = sandbox.broker().await;
    let operation_id = Uuid::now_v7();
    let mut follower = Follower::bind(&broker, operation_id).await;
    let plan = "plan_id = \"orders\"\nconsistency = \"per-chunk\"\n[[entities]]\nname = \"orders\"\ntable = \"Order\"\nchunk_rows = 5000\n";
    let file = sandbox.write_file("plan.toml", plan);
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

    let source_url = sandbox.database_url.clone();
    let killed = kill_every_worker_that_takes(
        &mut sandbox,
        &pg,
        operation_id,
        "default",
        &source_url,
        "export_chunk",
    )
    .await;
    assert!(
        killed >= JOB_DELIVERY_LIMIT,
        "failed after {killed} kills, before the delivery limit"
    );

    let (kind, report) = follower.until_terminal(Duration::from_secs(60)).await;
    assert_eq!(kind, "failed", "{report:?}");
    let error = report.error.unwrap_or_default();
    assert!(
        error.contains("export_chunk job was dead-lettered")
            && error.contains("delivery_limit")
            && error.contains("entity 'orders' chunk"),
        "{error}"
    );
    let failed: i64 = pg
        .query_one(
            "SELECT count(*) FROM koan.chunks
              WHERE operation_id = $1 AND state = 'failed' AND error LIKE '%dead-lettered%'",
            &[&operation_id],
        )
        .await
        .expect("chunks")
        .get(0);
    assert_eq!(failed, 1, "exactly the dead-lettered chunk failed");
    let reasons = dead_jobs(&sandbox, operation_id, "export_chunk").await;
    assert!(
        reasons.iter().any(|reason| reason == "delivery_limit"),
        "the export job is in koan.dead: {reasons:?}"
    );
    let manifest_written = sandbox
        .archive_files()
        .iter()
        .any(|file| file.ends_with("manifest.json"));
    assert!(!manifest_written, "a failed backup has no manifest");
    sandbox.assert_alive();
}

#[tokio::test(flavor = "multi_thread")]
async fn an_import_job_no_worker_survives_fails_the_restore_after_the_delivery_limit() {
    let mut sandbox = Sandbox::new();
    let pg = sandbox.pg().await;
    data::orders(&pg, 5_000, 1).await;
    let target_url = sandbox.create_database("target");
    sandbox.start_coordinator("coordinator", &["--part-bytes", "100000"]);
    sandbox.start_workers(1, &[]);
    let (kind, backup, _) = sandbox
        .backup("plan_id = \"orders\"\n[[entities]]\nname = \"orders\"\ntable = \"Order\"\n")
        .await;
    assert_eq!(kind, "completed", "{backup:?}");

    let restore_id = Uuid::now_v7();
    let broker = sandbox.broker().await;
    let mut follower = Follower::bind(&broker, restore_id).await;
    let output = sandbox.cli(&[
        "restore",
        &backup.operation_id.to_string(),
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
    let killed = kill_every_worker_that_takes(
        &mut sandbox,
        &pg,
        restore_id,
        "target",
        &target_url,
        "import_part",
    )
    .await;
    assert!(
        killed >= JOB_DELIVERY_LIMIT,
        "failed after {killed} kills, before the delivery limit"
    );
    let (kind, report) = follower.until_terminal(Duration::from_secs(60)).await;
    assert_eq!(kind, "failed", "{report:?}");
    let error = report.error.unwrap_or_default();
    assert!(
        error.contains("import_part job was dead-lettered")
            && error.contains("delivery_limit")
            && error.contains("entity 'orders' chunk "),
        "{error}"
    );
    let reasons = dead_jobs(&sandbox, restore_id, "import_part").await;
    assert!(
        reasons.iter().any(|reason| reason == "delivery_limit"),
        "the import job is in koan.dead: {reasons:?}"
    );
    sandbox.assert_alive();
}
