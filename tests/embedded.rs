//! Embedded mode against a real PostgreSQL source, with RabbitMQ out of reach:
//! a backup interrupted by SIGINT pauses and prints its continuation token;
//! resumed with that token it completes, and `verify` accepts the archive,
//! every source row in it exactly once.

mod support;

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use koan_protocol::progress::ProgressReport;
use support::archive::{self, key_text};
use support::{Sandbox, data};

const BIN: &str = env!("CARGO_BIN_EXE_koan-backup");
const ROWS: u64 = 200_000;
/// Nothing listens there: the embedded mode must never need RabbitMQ.
const CLOSED_AMQP: &str = "amqp://guest:guest@127.0.0.1:1/%2f";

/// `koan-backup <args> --embedded ...` for this sandbox, RabbitMQ out of reach.
fn embedded(sandbox: &Sandbox, args: &[&str]) -> Command {
    let mut command = Command::new(BIN);
    let state = sandbox.work_dir.join("state.db");
    command
        .args(args)
        .args(["--embedded", "--workers", "3", "--state"])
        .arg(&state)
        .args(["--source-url", &sandbox.database_url, "--storage-url"])
        .arg(&sandbox.storage)
        .env("KOAN_AMQP_URL", CLOSED_AMQP)
        .env_remove("KOAN_DATABASE_URL")
        .env_remove("KOAN_SOURCE_URL")
        .env_remove("KOAN_STORAGE_URL")
        .stdin(Stdio::null());
    command
}

fn run(mut command: Command) -> Output {
    command.output().expect("running koan-backup")
}

#[tokio::test(flavor = "multi_thread")]
async fn an_interrupted_embedded_backup_resumes_from_its_token() {
    let sandbox = Sandbox::new();
    let pg = sandbox.pg().await;
    data::orders(&pg, ROWS, 2).await;
    let plan = sandbox.write_file(
        "plan.toml",
        "plan_id = \"orders\"\n[[entities]]\nname = \"orders\"\ntable = \"Order\"\nchunk_rows = 2000\n",
    );

    // Back up, following as JSON lines; SIGINT once it is past 10 %. A
    // hundred chunks leave most of the work for after the pause, however
    // fast the machine.
    let mut command = embedded(
        &sandbox,
        &["backup", "--json", "--plan", plan.to_str().expect("path")],
    );
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning the embedded backup");
    let stdout = child.stdout.take().expect("stdout");
    let mut interrupted_at = None;
    let deadline = Instant::now() + Duration::from_secs(300);
    let mut last = None;
    for line in BufReader::new(stdout).lines() {
        let line = line.expect("reading the backup's output");
        let Ok(report) = serde_json::from_str::<ProgressReport>(&line) else {
            continue;
        };
        assert!(Instant::now() < deadline, "the backup took too long");
        if interrupted_at.is_none() && report.percent >= 10.0 {
            assert!(
                report.percent < 100.0,
                "the backup finished before it could be interrupted"
            );
            let status = Command::new("kill")
                .args(["-INT", &child.id().to_string()])
                .status()
                .expect("kill");
            assert!(status.success());
            interrupted_at = Some(report.percent);
        }
        last = Some(report);
    }
    let output = child.wait_with_output().expect("waiting for the backup");
    let stderr = String::from_utf8_lossy(&output.stderr).to_string();
    let paused = last.expect("progress lines");
    assert!(interrupted_at.is_some(), "never reached 10 %: {stderr}");
    assert_eq!(
        output.status.code(),
        Some(3),
        "a paused backup exits 3: {stderr}"
    );
    assert_eq!(paused.state.as_str(), "paused", "{stderr}");
    assert!(paused.percent < 100.0, "{paused:?}");
    let token = stderr
        .split_whitespace()
        .skip_while(|word| *word != "token")
        .nth(1)
        .unwrap_or_else(|| panic!("no token printed: {stderr}"))
        .to_string();
    assert_eq!(paused.continuation_token.as_deref(), Some(token.as_str()));

    // A tampered token is refused; the real one resumes to completion.
    let mut tampered = token.clone();
    tampered.replace_range(..1, if token.starts_with('A') { "B" } else { "A" });
    let refused = run(embedded(&sandbox, &["resume", "--token", &tampered]));
    assert_eq!(refused.status.code(), Some(2), "{refused:?}");
    let resumed = run(embedded(&sandbox, &["resume", "--token", &token]));
    assert!(
        resumed.status.success(),
        "resume: {}",
        String::from_utf8_lossy(&resumed.stderr)
    );

    let backup_id = paused.operation_id.to_string();
    let verified = run(embedded(&sandbox, &["verify", &backup_id]));
    assert!(
        verified.status.success(),
        "verify: {}",
        String::from_utf8_lossy(&verified.stderr)
    );
    let status = run(embedded(&sandbox, &["status", "--json", &backup_id]));
    let report: ProgressReport =
        serde_json::from_slice(&status.stdout).expect("status --json is a report");
    assert_eq!(report.state.as_str(), "completed");
    let manifest = archive::manifest(
        &sandbox.storage,
        report.manifest.as_deref().expect("manifest"),
    );
    let lines = archive::read_all(&sandbox.storage, &manifest);
    let mut seen = BTreeSet::new();
    for line in &lines["orders"] {
        assert!(seen.insert(key_text(line)), "row {} twice", key_text(line));
    }
    assert_eq!(seen.len() as u64, ROWS);
    let mut parts = BTreeSet::new();
    for (_, chunk, part) in manifest.parts() {
        assert!(
            parts.insert((chunk.chunk, part.part)),
            "a part listed twice"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn one_embedded_deployment_at_a_time_per_state_file() {
    let sandbox = Sandbox::new();
    let pg = sandbox.pg().await;
    data::orders(&pg, 1_000, 1).await;
    let lock = sandbox.work_dir.join("state.db.lock");
    let holder = std::fs::File::create(&lock).expect("lock file");
    holder.lock().expect("taking the lock");
    let refused = run(embedded(&sandbox, &["list"]));
    assert_eq!(refused.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("another embedded koan-backup") && stderr.contains("state.db.lock"),
        "{stderr}"
    );
    holder.unlock().expect("unlock");
    let listed = run(embedded(&sandbox, &["list"]));
    assert!(
        listed.status.success(),
        "{}",
        String::from_utf8_lossy(&listed.stderr)
    );
}
