//! `koan-backup`: one binary for every role. Parses the command line, loads
//! configuration, and calls into the crates; nothing else lives here.
//!
//! # Layout
//! - `main.rs`: the command line and dispatch.
//! - [`client`]: submitting commands and reading replies over AMQP.
//! - [`follow`]: live progress of one operation.
//! - [`services`]: running the coordinator and workers until a signal.
//! - [`logging`]: log output (human or JSON).

mod client;
mod follow;
mod logging;
mod services;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use koan_protocol::commands::StartBackup;
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
    /// Show one operation.
    Status(StatusArgs),
    /// List recent operations.
    List(ListArgs),
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
    logging::init();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return ExitCode::from(2);
        }
    };
    match runtime.block_on(dispatch(cli)) {
        Ok(code) => ExitCode::from(code),
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::from(2)
        }
    }
}

async fn dispatch(cli: Cli) -> Result<u8> {
    match cli.command {
        Command::Coordinator(args) => services::coordinator(&cli.amqp_url, args).await,
        Command::Worker(args) => services::worker(&cli.amqp_url, args).await,
        Command::Backup(args) => backup(&cli.amqp_url, args).await,
        Command::Status(args) => status(&cli.amqp_url, args).await,
        Command::List(args) => list(&cli.amqp_url, args).await,
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
    let client = Client::connect(amqp_url).await?;
    let events = if args.follow {
        Some(client.follow(operation_id).await?)
    } else {
        None
    };
    let command = StartBackup {
        plan_id: args.plan_id.clone(),
        plan,
        operation_id: Some(operation_id),
        labels: args.labels.iter().cloned().collect::<BTreeMap<_, _>>(),
        description: args.description.clone(),
    };
    let submitted = client.start_backup(command).await?;
    if args.json {
        println!(
            "{}",
            serde_json::json!({"operation_id": submitted.operation_id, "existing": submitted.existing})
        );
    } else {
        println!("{}", submitted.operation_id);
    }
    let Some(events) = events else {
        client.close().await;
        return Ok(0);
    };
    let outcome = follow::follow(&client, events, submitted.operation_id, args.json).await?;
    client.close().await;
    let report = &outcome.report;
    if args.json {
        println!("{}", serde_json::to_string(report)?);
    }
    match report.state {
        koan_protocol::progress::OperationState::Completed => {
            eprintln!(
                "backup {} completed: {} rows, {} → {} in {}",
                report.operation_id,
                report.rows_done,
                follow::human_bytes(report.bytes_done),
                follow::human_bytes(report.bytes_compressed),
                report.manifest.as_deref().unwrap_or("?"),
            );
        }
        koan_protocol::progress::OperationState::Paused => {
            eprintln!(
                "backup {} paused; resume with token {}",
                report.operation_id,
                report.continuation_token.as_deref().unwrap_or("?")
            );
        }
        state => {
            eprintln!(
                "backup {} {}: {}",
                report.operation_id,
                state.as_str(),
                report.error.as_deref().unwrap_or("no reason given")
            );
        }
    }
    Ok(outcome.exit_code() as u8)
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
