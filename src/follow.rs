//! Following an operation: a live progress bar on a terminal, plain lines otherwise.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Result, bail};
use indicatif::{ProgressBar, ProgressStyle};
use koan_protocol::events::OperationEvent;
use koan_protocol::progress::{OperationKind, OperationState, ProgressReport};
use koan_transport::Subscription;
use uuid::Uuid;

use crate::client::Client;

/// How long without any event before the follower asks for the status itself.
const QUIET_POLL: Duration = Duration::from_secs(15);

/// Whether Ctrl-C pauses the followed operation (embedded mode) instead of
/// ending the process.
static PAUSE_ON_INTERRUPT: AtomicBool = AtomicBool::new(false);

/// From now on, Ctrl-C while following pauses the operation: the follow ends
/// at `paused` and the conclusion prints the continuation token. A second
/// Ctrl-C gives up waiting.
pub fn pause_on_interrupt() {
    PAUSE_ON_INTERRUPT.store(true, Ordering::Relaxed);
}

/// Resolves on the next Ctrl-C when interrupts pause; never otherwise.
async fn interrupted() {
    if PAUSE_ON_INTERRUPT.load(Ordering::Relaxed) {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    } else {
        std::future::pending::<()>().await;
    }
}

/// How a followed operation ended.
#[derive(Debug)]
pub struct Outcome {
    /// The last report seen.
    pub report: ProgressReport,
}

impl Outcome {
    /// Exit code: 0 completed, 1 failed, cancelled or completed with failed
    /// rows, 3 paused.
    pub fn exit_code(&self) -> u8 {
        match self.report.state {
            OperationState::Completed if self.report.rows_failed == 0 => 0,
            OperationState::Paused => 3,
            _ => 1,
        }
    }
}

/// The sentence that ends a followed operation.
pub fn conclusion(report: &ProgressReport) -> String {
    let kind = report.kind.as_str();
    let id = report.operation_id;
    match (report.state, report.kind) {
        (OperationState::Completed, OperationKind::Backup) => format!(
            "backup {id} completed: {} rows, {} → {} in {}",
            report.rows_done,
            human_bytes(report.bytes_done),
            human_bytes(report.bytes_compressed),
            report.manifest.as_deref().unwrap_or("?"),
        ),
        (OperationState::Completed, OperationKind::Restore) if report.rows_failed > 0 => format!(
            "restore {id} completed with {} failed rows ({} written, {} skipped): see `koan-backup diagnostics {id}`",
            report.rows_failed, report.rows_written, report.rows_skipped,
        ),
        (OperationState::Completed, OperationKind::Restore) => format!(
            "restore {id} completed: {} rows written, {} skipped",
            report.rows_written, report.rows_skipped,
        ),
        (OperationState::Completed, OperationKind::Verify) => format!(
            "backup {} is whole: {} parts, {} rows",
            report
                .backup_id
                .map(|backup| backup.to_string())
                .unwrap_or_default(),
            report.chunks_done,
            report.rows_done,
        ),
        (OperationState::Paused, _) => format!(
            "{kind} {id} paused; resume with token {}",
            report.continuation_token.as_deref().unwrap_or("?"),
        ),
        (state, _) => {
            let mut text = format!(
                "{kind} {id} {}: {}",
                state.as_str(),
                report.error.as_deref().unwrap_or("no reason given"),
            );
            for problem in &report.problems {
                text.push_str("\n  ");
                text.push_str(problem);
            }
            text
        }
    }
}

enum Display {
    Bar(ProgressBar),
    Lines { json: bool, last_line: String },
}

impl Display {
    fn new(json: bool) -> Self {
        if !json && std::io::stderr().is_terminal() {
            let bar = ProgressBar::new(1000);
            bar.set_style(
                ProgressStyle::with_template(
                    "{spinner} [{elapsed_precise}] {bar:40.cyan/blue} {percent:>3}% {msg}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            bar.enable_steady_tick(Duration::from_millis(200));
            Self::Bar(bar)
        } else {
            Self::Lines {
                json,
                last_line: String::new(),
            }
        }
    }

    fn show(&mut self, report: &ProgressReport) {
        match self {
            Self::Bar(bar) => {
                bar.set_position((report.percent * 10.0) as u64);
                bar.set_message(summary(report));
            }
            Self::Lines { json, last_line } => {
                let line = if *json {
                    serde_json::to_string(report).unwrap_or_default()
                } else {
                    format!("{:>5.1}% {}", report.percent, summary(report))
                };
                if line != *last_line {
                    if *json {
                        println!("{line}");
                    } else {
                        eprintln!("{line}");
                    }
                    *last_line = line;
                }
            }
        }
    }

    fn finish(&self) {
        if let Self::Bar(bar) = self {
            bar.finish();
        }
    }
}

/// One-line summary of a report.
pub fn summary(report: &ProgressReport) -> String {
    let eta = report
        .eta_seconds
        .map(|seconds| format!(" eta {seconds}s"))
        .unwrap_or_default();
    format!(
        "{} rows {}/{} chunks {}/{} {}{eta}",
        report.state.as_str(),
        report.rows_done,
        report.rows_total,
        report.chunks_done,
        report.chunks_total,
        human_bytes(report.bytes_done),
    )
}

/// Bytes in a human unit.
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

/// Shows events of `operation_id` until it completes, fails, is cancelled or paused.
pub async fn follow(
    client: &Client,
    mut events: Subscription,
    operation_id: Uuid,
    json: bool,
) -> Result<Outcome> {
    let mut display = Display::new(json);
    let mut last_sequence = None;
    let mut pausing = false;
    loop {
        let next = tokio::select! {
            next = tokio::time::timeout(QUIET_POLL, events.next()) => next,
            () = interrupted() => {
                if pausing {
                    display.finish();
                    bail!("interrupted again: stopped without waiting for {operation_id} to pause");
                }
                pausing = true;
                eprintln!("interrupted: pausing {operation_id} at the next part boundary (Ctrl-C again to stop waiting)");
                client.pause(operation_id).await?;
                continue;
            }
        };
        let report = match next {
            Ok(delivery) => {
                let delivery = delivery?;
                delivery.ack().await?;
                match koan_protocol::decode::<OperationEvent>(&delivery.payload) {
                    Ok(event) => event.report().clone(),
                    Err(error) => {
                        tracing::warn!(%error, "ignoring an undecodable event");
                        continue;
                    }
                }
            }
            Err(_) => client.status(operation_id).await?,
        };
        if last_sequence.is_some_and(|seen| seen > report.sequence) {
            continue;
        }
        last_sequence = Some(report.sequence);
        display.show(&report);
        if report.state.is_terminal() || report.state == OperationState::Paused {
            display.finish();
            events.close().await;
            return Ok(Outcome { report });
        }
    }
}
