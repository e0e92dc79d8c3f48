//! One backup, one trace: a coordinator and two worker processes export
//! their spans over OTLP to a real Arize Phoenix, and the test reads the
//! trace back from Phoenix's REST API. These tests fail (never pass
//! silently) when Phoenix is not running: `.ci/run` starts it.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;
use std::time::Duration;

use support::phoenix::{Phoenix, Span};
use support::{Sandbox, archive, data};
use uuid::Uuid;

/// How long exported spans may take to show up in Phoenix.
const EXPORT_WAIT: Duration = Duration::from_secs(60);

const PLAN: &str = r#"
    plan_id = "orders:traced"
    [[entities]]
    name = "orders"
    table = "Order"
    bucket = "orders"
    scope = "tenant-1"
    chunk_rows = 2500
    version = "$.version"
"#;

/// A sandbox whose processes (and CLI) export to `phoenix`.
fn traced_sandbox(phoenix: &Phoenix, sandbox: &mut Sandbox) {
    for (name, value) in phoenix.env() {
        sandbox.set_env(&name, &value);
    }
}

/// What submitting a backup gave.
struct Submitted {
    operation_id: Uuid,
    trace_id: String,
    follower: support::Follower,
    /// The CLI's stdout and stderr.
    output: String,
}

/// Submits the backup of [`PLAN`] with `--json` and returns the operation
/// id and the trace id the CLI printed (checking stderr says the same).
async fn submit_backup(sandbox: &Sandbox) -> Submitted {
    let broker = sandbox.broker().await;
    let operation_id = Uuid::now_v7();
    let follower = support::Follower::bind(&broker, operation_id).await;
    let plan = sandbox.write_file("plan.toml", PLAN);
    let output = sandbox.cli(&[
        "backup",
        "--plan",
        plan.to_str().expect("path"),
        "--operation-id",
        &operation_id.to_string(),
        "--json",
    ]);
    let stderr = String::from_utf8_lossy(&output.stderr).to_string();
    assert!(output.status.success(), "backup submit failed: {stderr}");
    let accepted: serde_json::Value = serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|error| panic!("--json accepted line ({error}): {stderr}"));
    assert_eq!(accepted["operation_id"], operation_id.to_string());
    let trace_id = accepted["trace_id"]
        .as_str()
        .unwrap_or_else(|| panic!("no trace_id in {accepted}"))
        .to_string();
    assert_eq!(trace_id.len(), 32, "{trace_id}");
    assert!(
        stderr
            .lines()
            .any(|line| line == format!("trace {trace_id}")),
        "the CLI prints the trace id on stderr: {stderr}"
    );
    Submitted {
        operation_id,
        trace_id,
        follower,
        output: format!("{}{stderr}", String::from_utf8_lossy(&output.stdout)),
    }
}

fn named<'a>(spans: &'a [Span], name: &str) -> Vec<&'a Span> {
    spans.iter().filter(|span| span.name == name).collect()
}

fn only<'a>(spans: &'a [Span], name: &str) -> &'a Span {
    let found = named(spans, name);
    assert_eq!(found.len(), 1, "one {name} span: {found:#?}");
    found[0]
}

fn names(spans: &[Span]) -> BTreeMap<&str, usize> {
    let mut counts = BTreeMap::new();
    for span in spans {
        *counts.entry(span.name.as_str()).or_insert(0) += 1;
    }
    counts
}

#[tokio::test(flavor = "multi_thread")]
async fn a_backup_is_one_trace_from_the_client_to_every_chunk() {
    let mut sandbox = Sandbox::new();
    let phoenix = Phoenix::require(&sandbox.name);
    traced_sandbox(&phoenix, &mut sandbox);
    let pg = sandbox.pg().await;
    data::orders(&pg, 20_000, 2).await;
    sandbox.start_coordinator("coordinator", &[]);
    sandbox.start_workers(2, &[]);

    let Submitted {
        operation_id,
        trace_id,
        mut follower,
        ..
    } = submit_backup(&sandbox).await;
    let (kind, report) = follower.until_terminal(Duration::from_secs(240)).await;
    assert_eq!(kind, "completed", "{report:?}\n{}", sandbox.logs());
    let manifest = archive::manifest(
        &sandbox.storage,
        report.manifest.as_deref().expect("manifest path"),
    );
    let chunks = manifest.entities[0].chunks.len();
    assert!(chunks >= 4, "several chunks: {chunks}");

    let spans = phoenix.wait_for_trace(&trace_id, EXPORT_WAIT, |spans| {
        named(spans, "export_chunk").len() >= chunks
            && !named(spans, "manifest_written").is_empty()
            && !named(spans, "hold_snapshot").is_empty()
    });
    let counts = names(&spans);

    // One trace: every span carries its id; one root, the client's submit span.
    for span in &spans {
        assert_eq!(span.trace_id, trace_id, "{span:#?}");
    }
    let roots: Vec<&Span> = spans
        .iter()
        .filter(|span| span.parent_id.is_none())
        .collect();
    assert_eq!(roots.len(), 1, "one root: {roots:#?}");
    let submit = only(&spans, "submit");
    assert!(submit.parent_id.is_none());
    assert_eq!(submit.text("command").as_deref(), Some("start_backup"));
    assert_eq!(submit.text("operation_id"), Some(operation_id.to_string()));

    // Every parent is a span of the trace.
    let ids: BTreeSet<&str> = spans.iter().map(|span| span.span_id.as_str()).collect();
    for span in &spans {
        if let Some(parent) = &span.parent_id {
            assert!(
                ids.contains(parent.as_str()),
                "{} has an unknown parent",
                span.name
            );
        }
    }
    let parent_name = |span: &Span| -> String {
        let parent = span.parent_id.as_deref().expect("a parent");
        spans
            .iter()
            .find(|candidate| candidate.span_id == parent)
            .map(|parent| parent.name.clone())
            .unwrap_or_default()
    };

    // The coordinator: the command handled under the client's span, the
    // operation recorded and the plan checked under the command's.
    let command = only(&spans, "start_backup");
    assert_eq!(command.parent_id.as_deref(), Some(submit.span_id.as_str()));
    assert_eq!(command.text("operation_id"), Some(operation_id.to_string()));
    assert_eq!(command.text("outcome").as_deref(), Some("accepted"));
    for name in ["record_operation", "check_catalog"] {
        assert_eq!(parent_name(only(&spans, name)), "start_backup", "{name}");
    }

    // The workers: every job a child of the command that started the operation.
    let plan = only(&spans, "plan_entity");
    assert_eq!(plan.parent_id.as_deref(), Some(command.span_id.as_str()));
    assert_eq!(plan.text("operation_id"), Some(operation_id.to_string()));
    assert_eq!(plan.text("plan").as_deref(), Some("orders:traced"));
    assert_eq!(plan.text("entity").as_deref(), Some("orders"));
    assert_eq!(plan.text("scope").as_deref(), Some("tenant-1"));
    assert_eq!(plan.int("rows"), Some(manifest.totals.rows as i64));
    assert_eq!(plan.int("chunks"), Some(chunks as i64));

    let exports = named(&spans, "export_chunk");
    assert_eq!(
        exports.len(),
        chunks,
        "one export_chunk span per chunk: {counts:?}"
    );
    let mut chunk_numbers = BTreeSet::new();
    let (mut rows, mut raw, mut compressed) = (0, 0, 0);
    for export in &exports {
        assert_eq!(export.parent_id.as_deref(), Some(command.span_id.as_str()));
        assert_eq!(export.status_code, "UNSET", "{export:#?}");
        assert_eq!(export.text("operation_id"), Some(operation_id.to_string()));
        assert_eq!(export.text("plan").as_deref(), Some("orders:traced"));
        assert_eq!(export.text("entity").as_deref(), Some("orders"));
        assert_eq!(export.text("scope").as_deref(), Some("tenant-1"));
        assert_eq!(export.int("attempt"), Some(1));
        let chunk = export.int("chunk").expect("chunk attribute");
        assert!(chunk_numbers.insert(chunk), "chunk {chunk} exported twice");
        let range = &manifest.entities[0].chunks[chunk as usize].range;
        let expected_range = format!(
            "[{}, {})",
            range.lo.as_deref().unwrap_or("…"),
            range.hi.as_deref().unwrap_or("…")
        );
        assert_eq!(export.text("key_range"), Some(expected_range));
        rows += export.int("rows").expect("rows attribute");
        raw += export.int("bytes_raw").expect("bytes_raw attribute");
        compressed += export
            .int("bytes_compressed")
            .expect("bytes_compressed attribute");
        assert!(export.int("parts").unwrap_or(0) >= 1);
    }
    assert_eq!(rows, manifest.totals.rows as i64);
    assert_eq!(raw, manifest.totals.raw_bytes as i64);
    assert_eq!(compressed, manifest.totals.compressed_bytes as i64);

    let finalize = only(&spans, "finalize");
    assert_eq!(
        finalize.parent_id.as_deref(),
        Some(command.span_id.as_str())
    );
    assert_eq!(finalize.int("rows"), Some(manifest.totals.rows as i64));
    assert_eq!(finalize.int("chunks"), Some(chunks as i64));

    // The coordinator handles each report under the job span that sent it.
    let export_ids: BTreeSet<&str> = exports.iter().map(|span| span.span_id.as_str()).collect();
    // A chunk's last part travels in its `chunk_done`: `part_written` is sent
    // only for parts sealed before it (none here), and is checked the same way.
    for name in ["claim_chunk", "part_written", "chunk_done"] {
        let reports = named(&spans, name);
        assert!(
            name == "part_written" || reports.len() >= chunks,
            "{name}: {counts:?}"
        );
        for report in reports {
            let parent = report.parent_id.as_deref().expect("parent");
            assert!(
                export_ids.contains(parent),
                "{name} under an export_chunk span"
            );
            assert_eq!(report.text("operation_id"), Some(operation_id.to_string()));
        }
    }
    assert_eq!(parent_name(only(&spans, "entity_planned")), "plan_entity");
    assert_eq!(parent_name(only(&spans, "manifest_written")), "finalize");
    assert_eq!(parent_name(only(&spans, "hold_snapshot")), "plan_entity");
    assert!(
        spans.iter().all(|span| span.status_code != "ERROR"),
        "no error span in a clean backup: {counts:?}"
    );
    sandbox.assert_alive();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failed_chunk_is_an_error_span_with_its_reason() {
    let mut sandbox = Sandbox::new();
    let phoenix = Phoenix::require(&sandbox.name);
    traced_sandbox(&phoenix, &mut sandbox);
    let pg = sandbox.pg().await;
    data::orders(&pg, 20_000, 2).await;
    // A file where the plan's bucket directory should be: no part can be written.
    std::fs::write(sandbox.storage.join("orders"), "not a directory").expect("blocking file");
    sandbox.start_coordinator("coordinator", &[]);
    sandbox.start_workers(2, &[]);

    let Submitted {
        trace_id,
        mut follower,
        ..
    } = submit_backup(&sandbox).await;
    let (kind, report) = follower.until_terminal(Duration::from_secs(240)).await;
    assert_eq!(kind, "failed", "{report:?}\n{}", sandbox.logs());
    let error = report.error.clone().unwrap_or_default();

    // Each process exports its spans in its own batches: wait for the span of
    // the run whose failure the operation reports, not only the first one.
    let spans = phoenix.wait_for_trace(&trace_id, EXPORT_WAIT, |spans| {
        named(spans, "export_chunk")
            .iter()
            .any(|span| span.status_code == "ERROR" && error.contains(&span.status_message))
            && !named(spans, "chunk_failed").is_empty()
    });
    let failed: Vec<&Span> = named(&spans, "export_chunk")
        .into_iter()
        .filter(|span| span.status_code == "ERROR")
        .collect();
    // Each failed run is an error span stating its code and reason (runs
    // after the operation failed find its snapshot released: another reason).
    assert!(!failed.is_empty());
    for span in &failed {
        assert!(span.text("error.type").is_some(), "{span:#?}");
        assert!(!span.status_message.is_empty(), "{span:#?}");
        let exception = span.raw["events"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|event| event["name"] == "exception")
            .unwrap_or_else(|| panic!("an exception event: {span:#?}"));
        assert_eq!(
            exception["attributes"]["exception.message"].as_str(),
            Some(span.status_message.as_str())
        );
    }
    assert!(
        failed
            .iter()
            .any(|span| span.text("error.type").as_deref() == Some("storage")
                && span.status_message.contains("Not a directory")),
        "a span states the storage failure: {failed:#?}"
    );
    // The reason the operation failed with is one of those spans'.
    assert!(
        failed
            .iter()
            .any(|span| error.contains(&span.status_message)),
        "operation error {error:?} matches a failed span"
    );
    // The coordinator's spans of the failure reports are in the same trace.
    assert!(
        !named(&spans, "chunk_failed").is_empty(),
        "{:?}",
        names(&spans)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_restore_is_one_trace_with_an_import_chunk_span_per_part() {
    let mut sandbox = Sandbox::new();
    let phoenix = Phoenix::require(&sandbox.name);
    traced_sandbox(&phoenix, &mut sandbox);
    let pg = sandbox.pg().await;
    data::orders(&pg, 20_000, 2).await;
    sandbox.start_coordinator("coordinator", &[]);
    sandbox.start_workers(2, &[]);
    let (kind, backup, _) = sandbox.backup(PLAN).await;
    assert_eq!(kind, "completed", "{backup:?}\n{}", sandbox.logs());
    let manifest = archive::manifest(
        &sandbox.storage,
        backup.manifest.as_deref().expect("manifest path"),
    );
    let parts: usize = manifest.entities[0]
        .chunks
        .iter()
        .map(|chunk| chunk.parts.len())
        .sum();
    pg.batch_execute(
        r#"DELETE FROM "Order" WHERE "Id" IN (SELECT "Id" FROM "Order"
             WHERE "Json"->>'__koan_tenant' = 'tenant-1' ORDER BY "Id" LIMIT 1000)"#,
    )
    .await
    .expect("deleting archived rows");

    let backup_id = backup.operation_id.to_string();
    let (output, terminal, _) = sandbox
        .submit(&["restore", &backup_id, "--mode", "merge", "--json"])
        .await;
    let (kind, report) = terminal.unwrap_or_else(|| {
        panic!(
            "restore refused: {}",
            String::from_utf8_lossy(&output.stderr)
        )
    });
    assert_eq!(kind, "completed", "{report:?}\n{}", sandbox.logs());
    let accepted: serde_json::Value = serde_json::from_str(
        String::from_utf8_lossy(&output.stdout)
            .lines()
            .next()
            .expect("accepted line"),
    )
    .expect("accepted json");
    let trace_id = accepted["trace_id"].as_str().expect("trace_id").to_string();

    let spans = phoenix.wait_for_trace(&trace_id, EXPORT_WAIT, |spans| {
        named(spans, "part_imported").len() >= parts
    });
    let submit = only(&spans, "submit");
    assert_eq!(submit.text("command").as_deref(), Some("start_restore"));
    let command = only(&spans, "start_restore");
    assert_eq!(command.parent_id.as_deref(), Some(submit.span_id.as_str()));
    let plan = only(&spans, "plan_restore");
    assert_eq!(plan.parent_id.as_deref(), Some(command.span_id.as_str()));
    assert_eq!(plan.text("mode").as_deref(), Some("merge"));
    assert_eq!(plan.int("parts"), Some(parts as i64));

    let imports = named(&spans, "import_chunk");
    assert_eq!(imports.len(), parts, "one import_chunk span per part");
    let (mut merged, mut skipped) = (0, 0);
    for import in &imports {
        assert_eq!(import.parent_id.as_deref(), Some(command.span_id.as_str()));
        assert_eq!(
            import.text("operation_id"),
            Some(report.operation_id.to_string())
        );
        assert_eq!(import.text("entity").as_deref(), Some("orders"));
        assert_eq!(import.text("mode").as_deref(), Some("merge"));
        assert!(import.int("chunk").is_some() && import.int("unit").is_some());
        assert_eq!(import.int("rows_failed"), Some(0));
        merged += import.int("rows_merged").expect("rows_merged");
        skipped += import.int("rows_skipped").expect("rows_skipped");
    }
    assert_eq!(merged, 1000, "the deleted rows are written back");
    assert_eq!(merged + skipped, manifest.totals.rows as i64);
    let import_ids: BTreeSet<&str> = imports.iter().map(|span| span.span_id.as_str()).collect();
    for report in named(&spans, "part_imported") {
        let parent = report.parent_id.as_deref().expect("parent");
        assert!(
            import_ids.contains(parent),
            "part_imported under its import_chunk"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_embedded_backup_is_one_trace_across_the_in_process_broker() {
    let sandbox = Sandbox::new();
    let phoenix = Phoenix::require(&sandbox.name);
    let pg = sandbox.pg().await;
    data::orders(&pg, 20_000, 2).await;
    let plan = sandbox.write_file("plan.toml", PLAN);
    let output = Command::new(support::BIN)
        .args(["backup", "--json", "--plan", plan.to_str().expect("path")])
        .args(["--embedded", "--workers", "2", "--state"])
        .arg(sandbox.work_dir.join("state.db"))
        .args(["--source-url", &sandbox.database_url, "--storage-url"])
        .arg(&sandbox.storage)
        // Nothing listens there: embedded mode never needs RabbitMQ.
        .env("KOAN_AMQP_URL", "amqp://guest:guest@127.0.0.1:1/%2f")
        .env_remove("KOAN_DATABASE_URL")
        .envs(phoenix.env())
        .output()
        .expect("running the embedded backup");
    let stdout = String::from_utf8_lossy(&output.stdout).to_string();
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let accepted: serde_json::Value =
        serde_json::from_str(stdout.lines().next().expect("accepted line")).expect("json");
    let trace_id = accepted["trace_id"].as_str().expect("trace_id").to_string();
    let last: serde_json::Value =
        serde_json::from_str(stdout.lines().last().expect("final report")).expect("json");
    assert_eq!(last["state"], "completed", "{stdout}");
    let chunks = last["chunks_total"].as_i64().expect("chunks_total");
    assert!(chunks >= 4);

    // The process flushed its spans before exiting: they are all there.
    let spans = phoenix.wait_for_trace(&trace_id, EXPORT_WAIT, |spans| {
        !named(spans, "manifest_written").is_empty()
    });
    let submit = only(&spans, "submit");
    let command = only(&spans, "start_backup");
    assert_eq!(command.parent_id.as_deref(), Some(submit.span_id.as_str()));
    let exports = named(&spans, "export_chunk");
    assert_eq!(exports.len() as i64, chunks, "{:?}", names(&spans));
    for job in exports
        .iter()
        .chain([&only(&spans, "plan_entity"), &only(&spans, "finalize")])
    {
        assert_eq!(
            job.parent_id.as_deref(),
            Some(command.span_id.as_str()),
            "{}",
            job.name
        );
    }
    let export_ids: BTreeSet<&str> = exports.iter().map(|span| span.span_id.as_str()).collect();
    for report in named(&spans, "chunk_done") {
        assert!(export_ids.contains(report.parent_id.as_deref().expect("parent")));
    }
}

/// A RabbitMQ user with a password, on one vhost; deleted when dropped.
struct RabbitUser(String);

impl RabbitUser {
    fn create(name: &str, password: &str, vhost: &str) -> Self {
        for args in [
            vec!["add_user", name, password],
            vec!["set_permissions", "-p", vhost, name, ".*", ".*", ".*"],
        ] {
            let output = Command::new("rabbitmqctl")
                .args(&args)
                .output()
                .expect("running rabbitmqctl");
            assert!(
                output.status.success(),
                "rabbitmqctl {}: {}",
                args[0],
                String::from_utf8_lossy(&output.stderr)
            );
        }
        Self(name.to_string())
    }
}

impl Drop for RabbitUser {
    fn drop(&mut self) {
        let _ = Command::new("rabbitmqctl")
            .args(["delete_user", &self.0])
            .output();
    }
}

/// A PostgreSQL login role with a password; dropped when dropped (after the
/// sandbox database it owns objects in: declare it before the sandbox).
struct PgRole(String);

impl PgRole {
    fn create(name: &str, password: &str) -> Self {
        let output = Command::new("psql")
            .args([
                "-h",
                "127.0.0.1",
                "-U",
                "postgres",
                "-d",
                "postgres",
                "-v",
                "ON_ERROR_STOP=1",
                "-qc",
            ])
            .arg(format!(
                "CREATE ROLE {name} LOGIN SUPERUSER PASSWORD '{password}'"
            ))
            .output()
            .expect("running psql");
        assert!(
            output.status.success(),
            "creating role {name}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        Self(name.to_string())
    }
}

impl Drop for PgRole {
    fn drop(&mut self) {
        let _ = Command::new("psql")
            .args(["-h", "127.0.0.1", "-U", "postgres", "-d", "postgres", "-qc"])
            .arg(format!("DROP ROLE IF EXISTS {}", self.0))
            .output();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn passwords_in_urls_reach_no_log_and_no_span() {
    let suffix = &Uuid::new_v4().simple().to_string()[..10];
    let password = format!("Pw{suffix}S3cret");
    let user = format!("koan_secret_{suffix}");
    let role = PgRole::create(&user, &password);
    let mut sandbox = Sandbox::new();
    let rabbit = RabbitUser::create(&user, &password, &sandbox.name);
    let phoenix = Phoenix::require(&sandbox.name);
    traced_sandbox(&phoenix, &mut sandbox);
    let amqp_url = format!("amqp://{user}:{password}@127.0.0.1:5672/{}", sandbox.name);
    let pg_url = format!(
        "postgresql://{user}:{password}@127.0.0.1:5432/{}",
        sandbox.name
    );
    sandbox.set_env("KOAN_AMQP_URL", &amqp_url);
    sandbox.set_env("KOAN_SOURCE_URL", &pg_url);
    sandbox.set_env("KOAN_DATABASE_URL", &pg_url);
    // Every line koan-backup's own crates write, in both formats.
    sandbox.set_env(
        "RUST_LOG",
        "info,koan_backup=debug,koan_coordinator=debug,koan_worker=debug,\
         koan_transport=debug,koan_source=debug,koan_telemetry=debug",
    );
    let pg = sandbox.pg().await;
    data::orders(&pg, 20_000, 2).await;
    sandbox.start_coordinator("coordinator", &[]);
    sandbox.set_env("KOAN_LOG_FORMAT", "json");
    sandbox.start_workers(2, &[]);

    let Submitted {
        operation_id,
        trace_id,
        mut follower,
        output: submit_output,
    } = submit_backup(&sandbox).await;
    let (kind, report) = follower.until_terminal(Duration::from_secs(240)).await;
    assert_eq!(kind, "completed", "{report:?}\n{}", sandbox.logs());
    let status = sandbox.cli(&["status", &operation_id.to_string()]);
    assert!(status.status.success());
    let spans = phoenix.wait_for_trace(&trace_id, EXPORT_WAIT, |spans| {
        !named(spans, "manifest_written").is_empty() && !named(spans, "hold_snapshot").is_empty()
    });
    assert!(spans.len() > 10);

    let logs = sandbox.logs();
    assert!(logs.contains("\"trace_id\""), "JSON lines name their trace");
    assert!(
        logs.contains(&format!("amqp://{user}:***@")),
        "the broker URL is logged redacted"
    );
    let every_span: Vec<String> = phoenix
        .spans(None)
        .iter()
        .map(|span| span.raw.to_string())
        .collect();
    let cli_output = format!(
        "{submit_output}{}{}",
        String::from_utf8_lossy(&status.stdout),
        String::from_utf8_lossy(&status.stderr)
    );
    for (what, text) in [
        ("process logs", logs.as_str()),
        ("exported spans", every_span.join("\n").as_str()),
        ("cli output", cli_output.as_str()),
    ] {
        assert!(
            !text.contains(&password),
            "the password appears in the {what}"
        );
    }
    drop(sandbox);
    drop(rabbit);
    drop(role);
}
