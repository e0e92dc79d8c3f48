//! `koan-backup`: one binary for every role. Parses the command line, loads
//! configuration, and calls into the crates; nothing else lives here.
//!
//! # Layout
//! - `main.rs`: the command line and dispatch.
//! - [`client`]: submitting commands and reading replies over AMQP.
//! - [`follow`]: live progress of one operation.
//! - [`lifecycle`]: `pause`, `resume` and `cancel`.
//! - [`services`]: running the coordinator and workers until a signal.
//! - [`embedded`]: `--embedded`, a whole deployment inside this process.
//! - [`logging`]: log output (human or JSON) and trace export (`koan_telemetry`).

mod client;
mod demo;
mod embedded;
mod follow;
mod lifecycle;
mod logging;
mod services;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use koan_protocol::commands::{
    Diagnostics, DiagnosticsQuery, ReplayRows, RestoreMode, StartBackup, StartRestore, VerifyBackup,
};
use koan_protocol::plan::BackupPlan;
use uuid::Uuid;

use crate::client::Client;

const DEFAULT_AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// Distributed, resumable backup and restore of application entities.
#[derive(Debug, Parser)]
#[command(name = "koan-backup", version, about)]
struct Cli {
    /// RabbitMQ URL.
    #[arg(long, global = true, env = "KOAN_AMQP_URL", default_value = DEFAULT_AMQP_URL, hide_env_values = true)]
    amqp_url: String,
    #[command(flatten)]
    embedded: embedded::EmbeddedArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a coordinator (control plane): commands, state, jobs, progress.
    Coordinator(services::CoordinatorArgs),
    /// Run a worker (data plane): plans entities, exports chunks, writes manifests.
    Worker(services::WorkerArgs),
    /// Submit a backup and print its operation id.
    Backup(BackupArgs),
    /// Restore a backup into the entity store.
    Restore(RestoreArgs),
    /// Check that a backup is whole (every part, hash, rows, key ranges), without restoring it.
    Verify(VerifyArgs),
    /// List the rows a restore could not write; `--replay` writes them again.
    Diagnostics(DiagnosticsArgs),
    /// Pause a backup: no new chunks start, running ones stop at a part boundary.
    Pause(PauseArgs),
    /// Resume a paused backup by its id or its continuation token.
    Resume(ResumeArgs),
    /// Cancel an operation; a backup's partial output is removed.
    Cancel(CancelArgs),
    /// Show one operation.
    Status(StatusArgs),
    /// List recent operations.
    List(ListArgs),
    /// Generate sample data, back it up, verify, restore and compare, all in-process.
    Demo(demo::DemoArgs),
}

#[derive(Debug, Args)]
struct BackupArgs {
    /// A TOML plan file, sent inline.
    #[arg(long, conflicts_with = "plan_id", required_unless_present = "plan_id")]
    plan: Option<PathBuf>,
    /// The id of a plan registered with the coordinator (`--plans DIR`).
    #[arg(long)]
    plan_id: Option<String>,
    /// Operation id to use (UUID); submitting the same id twice starts one operation.
    #[arg(long)]
    operation_id: Option<Uuid>,
    /// A label `key=value`, kept with the operation and written to the manifest.
    #[arg(long = "label", value_parser = parse_label)]
    labels: Vec<(String, String)>,
    /// Free text kept with the operation.
    #[arg(long)]
    description: Option<String>,
    /// Follow progress until the backup ends; exit 0 only if it completes.
    #[arg(long)]
    follow: bool,
    /// Machine-readable output (JSON lines).
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct RestoreArgs {
    /// The backup to restore.
    backup_id: Uuid,
    /// How archived rows meet existing ones.
    #[arg(long, value_enum, default_value_t = Mode::Merge)]
    mode: Mode,
    /// Restore only this entity; repeat for several (default: all).
    #[arg(long = "entity")]
    entities: Vec<String>,
    /// The scope this restore acts for; a backup of another scope is refused.
    #[arg(long)]
    scope: Option<String>,
    /// Restore into this scope, re-stamping every row (explicit cross-scope restore).
    #[arg(long)]
    target_scope: Option<String>,
    /// Worker pool that writes the rows (its workers' source is the target).
    #[arg(long)]
    pool: Option<String>,
    /// Operation id to use (UUID).
    #[arg(long)]
    operation_id: Option<Uuid>,
    /// Follow progress until the restore ends.
    #[arg(long)]
    follow: bool,
    /// Machine-readable output (JSON lines).
    #[arg(long)]
    json: bool,
}

/// Restore modes, as the CLI spells them.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum Mode {
    /// Insert missing rows; replace a row only when the archived version is newer.
    Merge,
    /// Upsert every archived row.
    Overwrite,
    /// Insert only rows whose key is absent.
    SkipExisting,
    /// Empty the scope, then load, in one transaction.
    Replace,
}

impl From<Mode> for RestoreMode {
    fn from(mode: Mode) -> Self {
        match mode {
            Mode::Merge => Self::Merge,
            Mode::Overwrite => Self::Overwrite,
            Mode::SkipExisting => Self::SkipExisting,
            Mode::Replace => Self::Replace,
        }
    }
}

#[derive(Debug, Args)]
struct VerifyArgs {
    /// The backup to verify.
    backup_id: Uuid,
    /// Machine-readable output.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct DiagnosticsArgs {
    /// The restore operation.
    restore_id: Uuid,
    /// Write the failed rows again (after their cause is fixed) and follow.
    #[arg(long)]
    replay: bool,
    /// Include rows already replayed successfully.
    #[arg(long)]
    all: bool,
    /// Machine-readable output.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct PauseArgs {
    /// The backup operation.
    operation_id: Uuid,
}

#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("which").required(true).args(["operation_id", "token"])))]
struct ResumeArgs {
    /// The paused operation.
    operation_id: Option<Uuid>,
    /// The continuation token printed by `pause` or `status`.
    #[arg(long)]
    token: Option<String>,
    /// Follow progress until the operation ends; exit 0 only if it completes.
    #[arg(long)]
    follow: bool,
}

#[derive(Debug, Args)]
struct CancelArgs {
    /// The operation.
    operation_id: Uuid,
    /// Wait until the operation is cancelled.
    #[arg(long)]
    follow: bool,
}

#[derive(Debug, Args)]
struct StatusArgs {
    /// The operation.
    operation_id: Uuid,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct ListArgs {
    /// At most this many operations.
    #[arg(long, default_value_t = 50)]
    limit: u32,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

fn parse_label(text: &str) -> Result<(String, String), String> {
    text.split_once('=')
        .map(|(key, value)| (key.to_string(), value.to_string()))
        .ok_or_else(|| format!("label '{text}' is not key=value"))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return ExitCode::from(2);
        }
    };
    // In embedded mode (and the demo) the services share this terminal with
    // the progress display: only their warnings are shown unless RUST_LOG
    // says otherwise.
    let default_filter = if cli.embedded.embedded || matches!(cli.command, Command::Demo(_)) {
        "warn"
    } else {
        "info,lapin=warn"
    };
    let telemetry = {
        // An OTLP/gRPC exporter is built on the runtime.
        let _runtime = runtime.enter();
        logging::init(default_filter, logging::service_name(&cli.command))
    };
    let code = match runtime.block_on(dispatch(cli)) {
        Ok(code) => ExitCode::from(code),
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::from(2)
        }
    };
    // Flush the last spans while the runtime still runs.
    telemetry.shutdown();
    code
}

async fn dispatch(cli: Cli) -> Result<u8> {
    if !cli.embedded.embedded {
        return run_command(&cli.amqp_url, cli.command, false).await;
    }
    if matches!(
        cli.command,
        Command::Coordinator(_) | Command::Worker(_) | Command::Demo(_)
    ) {
        bail!(
            "--embedded runs its own coordinator and workers; it does not apply to `coordinator`, `worker` or `demo`"
        );
    }
    let settings = embedded::Settings::from_args(&cli.embedded)?;
    let deployment = embedded::Embedded::start(&settings).await?;
    follow::pause_on_interrupt();
    let outcome = run_command(&deployment.amqp_url(), cli.command, true).await;
    let stopped = deployment.stop().await;
    let code = outcome?;
    stopped?;
    Ok(code)
}

/// Runs one command against the broker at `amqp_url`. `embedded`: the
/// services live only as long as this command, so operations are followed
/// to their end.
async fn run_command(amqp_url: &str, command: Command, embedded: bool) -> Result<u8> {
    match command {
        Command::Coordinator(args) => services::coordinator(amqp_url, args).await,
        Command::Worker(args) => services::worker(amqp_url, args).await,
        Command::Backup(mut args) => {
            args.follow |= embedded;
            backup(amqp_url, args).await
        }
        Command::Restore(mut args) => {
            args.follow |= embedded;
            restore(amqp_url, args).await
        }
        Command::Verify(args) => verify(amqp_url, args).await,
        Command::Diagnostics(args) => diagnostics(amqp_url, args).await,
        Command::Pause(args) => lifecycle::pause(amqp_url, args.operation_id).await,
        Command::Resume(args) => {
            lifecycle::resume(
                amqp_url,
                args.operation_id,
                args.token,
                args.follow || embedded,
            )
            .await
        }
        Command::Cancel(args) => {
            lifecycle::cancel(amqp_url, args.operation_id, args.follow || embedded).await
        }
        Command::Status(args) => status(amqp_url, args).await,
        Command::List(args) => list(amqp_url, args).await,
        Command::Demo(args) => demo::run(args).await,
    }
}

async fn backup(amqp_url: &str, args: BackupArgs) -> Result<u8> {
    let plan = match &args.plan {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading plan file {}", path.display()))?;
            Some(
                BackupPlan::from_toml(&text)
                    .with_context(|| format!("plan file {}", path.display()))?,
            )
        }
        None => None,
    };
    let operation_id = args.operation_id.unwrap_or_else(Uuid::now_v7);
    let command = StartBackup {
        plan_id: args.plan_id.clone(),
        plan,
        operation_id: Some(operation_id),
        labels: args.labels.iter().cloned().collect::<BTreeMap<_, _>>(),
        description: args.description.clone(),
    };
    let client = Client::connect(amqp_url).await?;
    let code = run_operation(
        &client,
        operation_id,
        args.follow,
        args.json,
        client.start_backup(command),
    )
    .await;
    client.close().await;
    code
}

async fn restore(amqp_url: &str, args: RestoreArgs) -> Result<u8> {
    let operation_id = args.operation_id.unwrap_or_else(Uuid::now_v7);
    let command = StartRestore {
        backup_id: args.backup_id,
        operation_id: Some(operation_id),
        mode: args.mode.into(),
        entities: args.entities.clone(),
        scope: args.scope.clone(),
        target_scope: args.target_scope.clone(),
        pool: args.pool.clone(),
        ..StartRestore::default()
    };
    let client = Client::connect(amqp_url).await?;
    let code = run_operation(
        &client,
        operation_id,
        args.follow,
        args.json,
        client.start_restore(command),
    )
    .await;
    client.close().await;
    code
}

async fn verify(amqp_url: &str, args: VerifyArgs) -> Result<u8> {
    let operation_id = Uuid::now_v7();
    let command = VerifyBackup {
        backup_id: args.backup_id,
        operation_id: Some(operation_id),
    };
    let client = Client::connect(amqp_url).await?;
    let code = run_operation(
        &client,
        operation_id,
        true,
        args.json,
        client.verify(command),
    )
    .await;
    client.close().await;
    code
}

async fn diagnostics(amqp_url: &str, args: DiagnosticsArgs) -> Result<u8> {
    let client = Client::connect(amqp_url).await?;
    let code = if args.replay {
        let replay_id = Uuid::now_v7();
        let command = ReplayRows {
            operation_id: args.restore_id,
            replay_id: Some(replay_id),
        };
        run_operation(&client, replay_id, true, args.json, client.replay(command)).await
    } else {
        let listing = client
            .diagnostics(DiagnosticsQuery {
                operation_id: args.restore_id,
                include_resolved: args.all,
            })
            .await;
        listing.and_then(|listing| print_diagnostics(&listing, args.json))
    };
    client.close().await;
    code
}

fn print_diagnostics(listing: &Diagnostics, json: bool) -> Result<u8> {
    if json {
        println!("{}", serde_json::to_string_pretty(&listing.rows)?);
        return Ok(0);
    }
    if listing.rows.is_empty() {
        println!("no failed rows");
        return Ok(0);
    }
    println!(
        "{:>6}  {:<12}  {:<24}  {:<22}  reason",
        "id", "entity", "key", "code"
    );
    for row in &listing.rows {
        let failure = &row.failure;
        let key = failure.key.as_deref().unwrap_or("-");
        let resolved = if row.resolved { " (replayed)" } else { "" };
        println!(
            "{:>6}  {:<12}  {:<24.24}  {:<22}  {}{resolved}",
            row.id, row.entity, key, failure.code, failure.reason
        );
    }
    Ok(0)
}

/// Submits an operation (binding its events first when following), prints
/// its id (and, on stderr, the trace id when traces are exported), and
/// follows it to the end when asked.
async fn run_operation(
    client: &Client,
    operation_id: Uuid,
    follow: bool,
    json: bool,
    submit: impl std::future::Future<Output = Result<client::Submitted>>,
) -> Result<u8> {
    let events = if follow {
        Some(client.follow(operation_id).await?)
    } else {
        None
    };
    let submitted = submit.await?;
    for warning in &submitted.warnings {
        eprintln!("note: {warning}");
    }
    if let Some(trace_id) = &submitted.trace_id {
        eprintln!("trace {trace_id}");
    }
    if json {
        let mut accepted = serde_json::json!({
            "operation_id": submitted.operation_id,
            "existing": submitted.existing,
            "warnings": submitted.warnings,
        });
        if let Some(trace_id) = &submitted.trace_id {
            accepted["trace_id"] = serde_json::json!(trace_id);
        }
        println!("{accepted}");
    } else {
        println!("{}", submitted.operation_id);
    }
    let Some(events) = events else {
        return Ok(0);
    };
    let outcome = follow::follow(client, events, submitted.operation_id, json).await?;
    if json {
        println!("{}", serde_json::to_string(&outcome.report)?);
    }
    eprintln!("{}", follow::conclusion(&outcome.report));
    Ok(outcome.exit_code())
}

async fn status(amqp_url: &str, args: StatusArgs) -> Result<u8> {
    let client = Client::connect(amqp_url).await?;
    let report = client.status(args.operation_id).await?;
    client.close().await;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(0);
    }
    println!("operation  {}", report.operation_id);
    println!("kind       {}", report.kind.as_str());
    println!("plan       {}", report.plan_id);
    println!("state      {}", report.state.as_str());
    println!("percent    {:.1}", report.percent);
    println!("rows       {}/{}", report.rows_done, report.rows_total);
    println!("chunks     {}/{}", report.chunks_done, report.chunks_total);
    println!(
        "bytes      {} ({} stored)",
        follow::human_bytes(report.bytes_done),
        follow::human_bytes(report.bytes_compressed)
    );
    for entity in &report.entities {
        println!(
            "  {:<20} {:<9} rows {}/{} chunks {}/{}",
            entity.name,
            entity.state,
            entity.rows_done,
            entity.rows_total,
            entity.chunks_done,
            entity.chunks_total
        );
    }
    if let Some(manifest) = &report.manifest {
        println!("manifest   {manifest}");
    }
    if let Some(token) = &report.continuation_token {
        println!("token      {token}");
    }
    if let Some(error) = &report.error {
        println!("error      {error}");
    }
    Ok(0)
}

async fn list(amqp_url: &str, args: ListArgs) -> Result<u8> {
    if args.limit == 0 || args.limit > 1000 {
        bail!("--limit must be between 1 and 1000");
    }
    let client = Client::connect(amqp_url).await?;
    let reports = client.list(args.limit).await?;
    client.close().await;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&reports)?);
        return Ok(0);
    }
    println!(
        "{:<36}  {:<7}  {:<10}  {:>6}  {:>10}  plan",
        "operation", "kind", "state", "%", "rows"
    );
    for report in reports {
        println!(
            "{:<36}  {:<7}  {:<10}  {:>6.1}  {:>10}  {}",
            report.operation_id,
            report.kind.as_str(),
            report.state.as_str(),
            report.percent,
            report.rows_done,
            report.plan_id
        );
    }
    Ok(0)
}
