//! `koan-backup demo`: the whole product in one command, with no services.
//!
//! Generates sample `Order` and `Invoice` entities in a SQLite file, starts an
//! embedded deployment (coordinator, a `default` pool reading the sample and
//! a `restore` pool writing a second file), backs the sample up, verifies the
//! archive, restores it with `replace` into the second file, compares every
//! row, and prints what it measured.
//!
//! Everything lives in one folder (`--dir`, default `./koan-demo`). A run
//! empties that folder first, so it refuses any folder it did not make: one
//! that is neither empty nor marked with [`MARKER`], or that holds anything
//! besides the demo's own files.
//!
//! # Layout
//! - `mod.rs`: arguments, the folder, and the steps in order.
//! - `data`: generating the sample and comparing the two databases.
//! - `report`: live progress of each operation, and the summary.

mod data;
mod report;

use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use clap::Args;
use koan_protocol::archive::Manifest;
use koan_protocol::commands::{RestoreMode, StartBackup, StartRestore, VerifyBackup};
use koan_protocol::plan::{BackupEntity, BackupPlan, Consistency, DEFAULT_POOL};
use koan_protocol::progress::{OperationState, ProgressReport};
use uuid::Uuid;

use crate::client::Client;
use crate::embedded::{Embedded, Pool, Settings};

/// The file that marks a folder as the demo's own.
const MARKER: &str = ".koan-demo";
/// The databases of a run, each with SQLite's side files.
const DATABASES: [&str; 3] = ["source.db", "target.db", "state.db"];
/// SQLite's side files of a database.
const SIDE_FILES: [&str; 3] = ["-journal", "-wal", "-shm"];
/// The archive storage folder.
const ARCHIVES: &str = "archives";
/// The pool the restore writes through.
const RESTORE_POOL: &str = "restore";
/// The backup plan's id.
const PLAN_ID: &str = "demo";

/// Arguments of `koan-backup demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Rows to generate in total (about 2/3 orders, 1/3 invoices).
    #[arg(long, default_value_t = 200_000)]
    pub rows: u64,
    /// Workers in each pool (backup and restore).
    #[arg(long, default_value_t = 2)]
    pub workers: usize,
    /// The demo's folder; emptied at each run, so it must be empty, missing,
    /// or a folder an earlier demo made.
    #[arg(long, default_value = "koan-demo")]
    pub dir: PathBuf,
}

/// Where one run keeps its files (absolute paths).
#[derive(Debug)]
struct Paths {
    dir: PathBuf,
    source: PathBuf,
    target: PathBuf,
    state: PathBuf,
    archives: PathBuf,
}

/// How long each step took.
#[derive(Debug, Default)]
pub struct Durations {
    pub generate: Duration,
    pub backup: Duration,
    pub verify: Duration,
    pub restore: Duration,
    pub compare: Duration,
}

/// Runs the demo: 0 when every step completed and the restored rows are
/// exactly the generated ones, 1 when an operation did not complete or a row
/// differs (the reason printed); an error names what could not be done.
pub async fn run(args: DemoArgs) -> Result<u8> {
    if !(10..=50_000_000).contains(&args.rows) {
        bail!("--rows must be between 10 and 50000000, got {}", args.rows);
    }
    if !(1..=64).contains(&args.workers) {
        bail!("--workers must be between 1 and 64, got {}", args.workers);
    }
    let paths = prepare_dir(&args.dir)?;
    let mut durations = Durations::default();

    let started = Instant::now();
    let generated = data::generate_with_progress(paths.source.clone(), args.rows).await?;
    durations.generate = started.elapsed();

    let source_url = sqlite_url(&paths.source);
    let (state_url, lock_path) = Settings::sqlite_state(&paths.state);
    let settings = Settings {
        state_url,
        lock_path,
        storage_url: path_text(&paths.archives)?.to_string(),
        catalog_url: Some(source_url.clone()),
        pools: vec![
            Pool {
                name: DEFAULT_POOL.to_string(),
                source_url,
                workers: args.workers,
            },
            Pool {
                name: RESTORE_POOL.to_string(),
                source_url: sqlite_url(&paths.target),
                workers: args.workers,
            },
        ],
        part_bytes: None,
    };
    eprintln!(
        "starting an embedded deployment: {} workers reading {}, {} restoring into {}",
        args.workers,
        paths.source.display(),
        args.workers,
        paths.target.display()
    );
    let deployment = Embedded::start(&settings)
        .await
        .context("starting the embedded deployment")?;
    let amqp_url = deployment.amqp_url();
    let outcome = tokio::select! {
        outcome = steps(&amqp_url, &paths, &generated, &mut durations) => outcome,
        interrupted = tokio::signal::ctrl_c() => match interrupted {
            Ok(()) => Err(anyhow!("interrupted")),
            Err(error) => Err(anyhow!("waiting for Ctrl-C: {error}")),
        },
    };
    let stopped = deployment
        .stop()
        .await
        .context("stopping the embedded deployment");
    let code = match outcome {
        Ok(Finished::Done(backup)) => {
            report::summary(&paths.dir, args.workers, &generated, &backup, &durations);
            0
        }
        Ok(Finished::Failed) => 1,
        Err(error) => {
            if let Err(stop_error) = stopped {
                eprintln!("error: {stop_error:#}");
            }
            return Err(error);
        }
    };
    stopped?;
    Ok(code)
}

/// What the steps came to: `Done` only when every step completed and the
/// comparison was exact (its reason already printed otherwise).
enum Finished {
    Done(Box<report::Backup>),
    Failed,
}

/// Backup, verify, restore and compare, against the running deployment.
async fn steps(
    amqp_url: &str,
    paths: &Paths,
    generated: &data::Generated,
    durations: &mut Durations,
) -> Result<Finished> {
    let client = Client::connect(amqp_url)
        .await
        .context("connecting to the embedded deployment")?;
    let outcome = steps_with(&client, paths, generated, durations).await;
    client.close().await;
    outcome
}

async fn steps_with(
    client: &Client,
    paths: &Paths,
    generated: &data::Generated,
    durations: &mut Durations,
) -> Result<Finished> {
    let mut plan = BackupPlan::new(PLAN_ID)
        .description("koan-backup demo: sample orders and invoices")
        .consistency(Consistency::PerChunk);
    for entity in &generated.entities {
        plan = plan.entity(
            BackupEntity::new(entity.name, entity.table).chunk_rows(entity.rows.div_ceil(8).max(1)),
        );
    }
    plan.validate().context("the demo's backup plan")?;

    let started = Instant::now();
    let backup_id = Uuid::now_v7();
    let command = StartBackup {
        plan: Some(plan.clone()),
        operation_id: Some(backup_id),
        description: Some("koan-backup demo".to_string()),
        ..StartBackup::default()
    };
    let backup = operation(client, "backup", backup_id, client.start_backup(command)).await?;
    durations.backup = started.elapsed();
    if !completed(&backup) {
        return Ok(Finished::Failed);
    }
    let backup_id = backup.backup_id.unwrap_or(backup_id);
    let manifest = read_manifest(paths, &plan, &backup, backup_id)?;

    let started = Instant::now();
    let verify_id = Uuid::now_v7();
    let command = VerifyBackup {
        backup_id,
        operation_id: Some(verify_id),
    };
    let verify = operation(client, "verify", verify_id, client.verify(command)).await?;
    durations.verify = started.elapsed();
    if !completed(&verify) || !verify.problems.is_empty() {
        return Ok(Finished::Failed);
    }

    let started = Instant::now();
    let restore_id = Uuid::now_v7();
    let command = StartRestore {
        backup_id,
        operation_id: Some(restore_id),
        mode: RestoreMode::Replace,
        pool: Some(RESTORE_POOL.to_string()),
        description: Some("koan-backup demo".to_string()),
        ..StartRestore::default()
    };
    let restore = operation(client, "restore", restore_id, client.start_restore(command)).await?;
    durations.restore = started.elapsed();
    if !completed(&restore) {
        return Ok(Finished::Failed);
    }

    let started = Instant::now();
    let comparisons = data::compare_with_progress(
        paths.source.clone(),
        paths.target.clone(),
        generated.entities.clone(),
    )
    .await?;
    durations.compare = started.elapsed();
    if !report::comparison(&comparisons) {
        return Ok(Finished::Failed);
    }
    Ok(Finished::Done(Box::new(report::Backup {
        report: backup,
        manifest,
        rows_restored: restore.rows_written,
    })))
}

/// Whether an operation completed without failed rows; prints why not.
fn completed(report: &ProgressReport) -> bool {
    let ok = report.state == OperationState::Completed && report.rows_failed == 0;
    if !ok {
        eprintln!("{}", crate::follow::conclusion(report));
    }
    ok
}

/// Submits an operation with its events bound first, and follows it to its end.
async fn operation(
    client: &Client,
    step: &'static str,
    operation_id: Uuid,
    submit: impl std::future::Future<Output = Result<crate::client::Submitted>>,
) -> Result<ProgressReport> {
    let events = client
        .follow(operation_id)
        .await
        .with_context(|| format!("following the {step}"))?;
    let submitted = submit
        .await
        .with_context(|| format!("submitting the {step}"))?;
    for warning in &submitted.warnings {
        eprintln!("note: {warning}");
    }
    let report = report::follow(client, events, submitted.operation_id, step)
        .await
        .with_context(|| format!("following the {step} {}", submitted.operation_id))?;
    eprintln!("{}", crate::follow::conclusion(&report));
    Ok(report)
}

/// Reads the backup's manifest from the archive folder.
fn read_manifest(
    paths: &Paths,
    plan: &BackupPlan,
    report: &ProgressReport,
    backup_id: Uuid,
) -> Result<Manifest> {
    let relative = match &report.manifest {
        Some(path) => path.clone(),
        None => koan_protocol::archive::manifest_path(plan, backup_id)
            .context("the backup's manifest path")?,
    };
    let path = paths.archives.join(&relative);
    let text = std::fs::read(&path)
        .with_context(|| format!("reading the backup's manifest {}", path.display()))?;
    serde_json::from_slice(&text)
        .with_context(|| format!("parsing the backup's manifest {}", path.display()))
}

/// `sqlite://` + an absolute path (checked free of `%`, `?` and `#`).
fn sqlite_url(path: &Path) -> String {
    format!("sqlite://{}", path.display())
}

fn path_text(path: &Path) -> Result<&str> {
    path.to_str()
        .with_context(|| format!("the path {} is not UTF-8", path.display()))
}

/// Whether `name` is one of the files a demo run leaves in its folder.
fn is_demo_file(name: &str) -> bool {
    name == MARKER
        || name == ARCHIVES
        || name == "state.db.lock"
        || DATABASES.iter().any(|database| {
            name == *database
                || SIDE_FILES
                    .iter()
                    .any(|side| name.strip_prefix(database) == Some(side))
        })
}

/// Checks that `dir` is the demo's to empty, empties it (or creates it), and
/// marks it. Refuses, naming the folder and what is in the way, rather than
/// removing anything the demo did not make.
fn prepare_dir(dir: &Path) -> Result<Paths> {
    let refuse = |why: String| {
        anyhow!(
            "refusing to use {} as the demo folder: {why}; \
             the demo empties its folder at every run, so pass an empty or new --dir",
            dir.display()
        )
    };
    match std::fs::symlink_metadata(dir) {
        Ok(metadata) if metadata.is_dir() => {}
        Ok(_) => return Err(refuse("it exists and is not a folder".to_string())),
        Err(error) if error.kind() == ErrorKind::NotFound => {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("creating the demo folder {}", dir.display()))?;
        }
        Err(error) => {
            return Err(error)
                .with_context(|| format!("reading the demo folder {}", dir.display()));
        }
    }
    let dir = std::fs::canonicalize(dir)
        .with_context(|| format!("resolving the demo folder {}", dir.display()))?;
    let text = path_text(&dir)?;
    if text.contains(['%', '?', '#']) {
        return Err(refuse(
            "its path holds '%', '?' or '#', which SQLite URLs cannot carry as they are".into(),
        ));
    }

    let mut entries = Vec::new();
    for entry in std::fs::read_dir(&dir).with_context(|| format!("listing {}", dir.display()))? {
        let entry = entry.with_context(|| format!("listing {}", dir.display()))?;
        let kind = entry
            .file_type()
            .with_context(|| format!("reading {}", entry.path().display()))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        entries.push((name, kind));
    }
    if !entries.is_empty() {
        if !entries.iter().any(|(name, _)| name == MARKER) {
            return Err(refuse(format!(
                "it is not empty and no earlier demo made it (no {MARKER} file)"
            )));
        }
        if let Some((name, _)) = entries.iter().find(|(name, _)| !is_demo_file(name)) {
            return Err(refuse(format!(
                "it holds {name}, which the demo did not make"
            )));
        }
        for (name, kind) in &entries {
            let expected_folder = name == ARCHIVES;
            if kind.is_symlink() || kind.is_dir() != expected_folder {
                return Err(refuse(format!(
                    "{name} is not the {} the demo makes",
                    if expected_folder { "folder" } else { "file" }
                )));
            }
        }
        ensure_not_running(&dir)?;
        for (name, kind) in &entries {
            let path = dir.join(name);
            let removed = if kind.is_dir() {
                std::fs::remove_dir_all(&path)
            } else if name == MARKER {
                continue;
            } else {
                std::fs::remove_file(&path)
            };
            removed.with_context(|| format!("removing {} from an earlier run", path.display()))?;
        }
    }
    let marker = dir.join(MARKER);
    std::fs::write(
        &marker,
        "Made by `koan-backup demo`: every run empties this folder and fills it again.\n",
    )
    .with_context(|| format!("writing {}", marker.display()))?;
    Ok(Paths {
        source: dir.join("source.db"),
        target: dir.join("target.db"),
        state: dir.join("state.db"),
        archives: dir.join(ARCHIVES),
        dir,
    })
}

/// Fails when another demo is running in `dir` (its state lock is held).
fn ensure_not_running(dir: &Path) -> Result<()> {
    let lock = dir.join("state.db.lock");
    let file = match std::fs::File::options().read(true).write(true).open(&lock) {
        Ok(file) => file,
        Err(error) if error.kind() == ErrorKind::NotFound => return Ok(()),
        Err(error) => return Err(error).with_context(|| format!("opening {}", lock.display())),
    };
    match file.try_lock() {
        Ok(()) => Ok(()),
        Err(std::fs::TryLockError::WouldBlock) => bail!(
            "another koan-backup demo is running in {} ({} is locked); wait for it or pass another --dir",
            dir.display(),
            lock.display()
        ),
        Err(std::fs::TryLockError::Error(error)) => {
            Err(error).with_context(|| format!("locking {}", lock.display()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn demo_files_are_recognised() {
        for name in [
            ".koan-demo",
            "archives",
            "source.db",
            "target.db-journal",
            "state.db-wal",
            "state.db.lock",
        ] {
            assert!(is_demo_file(name), "{name}");
        }
        for name in [
            "notes.txt",
            "source.db.bak",
            "state.dbx",
            "archive",
            "target.db-",
        ] {
            assert!(!is_demo_file(name), "{name}");
        }
    }
}
