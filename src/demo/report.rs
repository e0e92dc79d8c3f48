//! What the demo shows: live progress of each operation (a bar per entity on
//! a terminal, plain lines otherwise), the comparison's verdict, and the
//! closing summary table.

use std::io::IsTerminal;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use koan_protocol::archive::Manifest;
use koan_protocol::events::OperationEvent;
use koan_protocol::progress::{OperationState, ProgressReport};
use koan_transport::Subscription;
use uuid::Uuid;

use super::Durations;
use super::data::{Comparison, Generated};
use crate::client::Client;
use crate::follow::{human_bytes, summary as report_summary};

/// How long without any event before asking for the status.
const QUIET_POLL: Duration = Duration::from_secs(15);
/// Least time between two plain progress lines.
const LINE_EVERY: Duration = Duration::from_secs(1);

/// The completed backup, as the summary needs it.
#[derive(Debug)]
pub struct Backup {
    /// Its final report.
    pub report: ProgressReport,
    /// Its manifest.
    pub manifest: Manifest,
    /// Rows the restore wrote.
    pub rows_restored: u64,
}

fn style(template: &str) -> ProgressStyle {
    ProgressStyle::with_template(template).unwrap_or_else(|_| ProgressStyle::default_bar())
}

enum Display {
    Bars {
        multi: MultiProgress,
        overall: ProgressBar,
        entities: Vec<(String, ProgressBar)>,
    },
    Lines {
        step: &'static str,
        last_line: String,
        last_at: Option<Instant>,
    },
}

impl Display {
    fn new(step: &'static str) -> Self {
        if !std::io::stderr().is_terminal() {
            return Self::Lines {
                step,
                last_line: String::new(),
                last_at: None,
            };
        }
        let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stderr());
        let overall = multi.add(ProgressBar::new(1000).with_prefix(step));
        overall.set_style(style(
            "{spinner:.green} {prefix:<8} [{elapsed_precise}] {bar:40.cyan/blue} {percent:>3}% {msg}",
        ));
        overall.enable_steady_tick(Duration::from_millis(120));
        Self::Bars {
            multi,
            overall,
            entities: Vec::new(),
        }
    }

    fn show(&mut self, report: &ProgressReport) {
        match self {
            Self::Bars {
                multi,
                overall,
                entities,
            } => {
                overall.set_position((report.percent * 10.0) as u64);
                let bytes = if report.bytes_done > 0 {
                    format!(" {}", human_bytes(report.bytes_done))
                } else {
                    String::new()
                };
                overall.set_message(format!(
                    "{} rows {}/{}{bytes}",
                    report.state.as_str(),
                    report.rows_done,
                    report.rows_total
                ));
                for entity in &report.entities {
                    let bar = match entities.iter().find(|(name, _)| *name == entity.name) {
                        Some((_, bar)) => bar.clone(),
                        None => {
                            let bar = multi.add(
                                ProgressBar::new(entity.rows_total)
                                    .with_prefix(entity.name.clone()),
                            );
                            bar.set_style(style(
                                "  {prefix:<8}             {bar:40.cyan/blue} {human_pos:>9}/{human_len:9} rows {msg}",
                            ));
                            entities.push((entity.name.clone(), bar.clone()));
                            bar
                        }
                    };
                    bar.set_length(entity.rows_total.max(entity.rows_done));
                    bar.set_position(entity.rows_done);
                    bar.set_message(format!(
                        "chunks {}/{} {} {}",
                        entity.chunks_done,
                        entity.chunks_total,
                        human_bytes(entity.bytes_done),
                        entity.state
                    ));
                }
            }
            Self::Lines {
                step,
                last_line,
                last_at,
            } => {
                let line = format!(
                    "{step}: {:>5.1}% {}",
                    report.percent,
                    report_summary(report)
                );
                let due = last_at.is_none_or(|at| at.elapsed() >= LINE_EVERY);
                if line != *last_line && (due || report.state.is_terminal()) {
                    eprintln!("{line}");
                    *last_line = line;
                    *last_at = Some(Instant::now());
                }
            }
        }
    }

    fn finish(&self, completed: bool) {
        if let Self::Bars {
            overall, entities, ..
        } = self
        {
            for bar in std::iter::once(overall).chain(entities.iter().map(|(_, bar)| bar)) {
                if completed {
                    bar.finish();
                } else {
                    bar.abandon();
                }
            }
        }
    }
}

/// Shows the events of `operation_id` until it completes, fails, is
/// cancelled or paused, and returns its last report.
pub async fn follow(
    client: &Client,
    mut events: Subscription,
    operation_id: Uuid,
    step: &'static str,
) -> Result<ProgressReport> {
    let mut display = Display::new(step);
    let mut last_sequence = None;
    loop {
        let report = match tokio::time::timeout(QUIET_POLL, events.next()).await {
            Ok(delivery) => {
                let delivery = delivery.context("reading the operation's events")?;
                delivery
                    .ack()
                    .await
                    .context("acknowledging the operation's event")?;
                match koan_protocol::decode::<OperationEvent>(&delivery.payload) {
                    Ok(event) => event.report().clone(),
                    Err(error) => {
                        tracing::warn!(%error, "ignoring an undecodable event");
                        continue;
                    }
                }
            }
            Err(_) => client
                .status(operation_id)
                .await
                .context("asking for the operation's status")?,
        };
        if last_sequence.is_some_and(|seen| seen > report.sequence) {
            continue;
        }
        last_sequence = Some(report.sequence);
        display.show(&report);
        if report.state.is_terminal() || report.state == OperationState::Paused {
            display.finish(report.state == OperationState::Completed);
            events.close().await;
            return Ok(report);
        }
    }
}

/// Prints the differences, if any; true when every row matched.
pub fn comparison(comparisons: &[Comparison]) -> bool {
    let mut exact = true;
    for comparison in comparisons {
        if comparison.differences == 0 && comparison.source_rows == comparison.target_rows {
            continue;
        }
        exact = false;
        eprintln!(
            "{}: {} keys differ between source.db ({} rows) and target.db ({} rows); the first:",
            comparison.entity,
            comparison.differences,
            comparison.source_rows,
            comparison.target_rows
        );
        for example in &comparison.examples {
            eprintln!("  {example}");
        }
    }
    exact
}

/// `1234567` as `1,234,567`.
fn grouped(value: u64) -> String {
    let digits = value.to_string();
    let mut text = String::with_capacity(digits.len() + digits.len() / 3);
    for (index, digit) in digits.chars().enumerate() {
        if index > 0 && (digits.len() - index).is_multiple_of(3) {
            text.push(',');
        }
        text.push(digit);
    }
    text
}

fn seconds(duration: Duration) -> String {
    format!("{:.2} s", duration.as_secs_f64())
}

fn ratio(raw: u64, stored: u64) -> String {
    if stored == 0 {
        "-".to_string()
    } else {
        format!("{:.1}x", raw as f64 / stored as f64)
    }
}

/// Prints the closing table on stdout.
pub fn summary(
    dir: &Path,
    workers: usize,
    generated: &Generated,
    backup: &Backup,
    durations: &Durations,
) {
    let seconds_taken = durations.backup.as_secs_f64().max(1e-6);
    let row = |name: &str, rows: u64, raw: u64, stored: u64| {
        println!(
            "{name:<10} {:>11} {:>12} {:>12} {:>7} {:>11} {:>9.1}",
            grouped(rows),
            human_bytes(raw),
            human_bytes(stored),
            ratio(raw, stored),
            grouped((rows as f64 / seconds_taken).round() as u64),
            raw as f64 / seconds_taken / (1024.0 * 1024.0),
        );
    };
    let manifest = &backup.manifest;
    println!();
    println!(
        "koan-backup demo: {} rows generated, backed up, verified, restored and compared in {} ({workers} workers per pool)",
        grouped(generated.rows()),
        dir.display()
    );
    println!();
    println!(
        "{:<10} {:>11} {:>12} {:>12} {:>7} {:>11} {:>9}",
        "entity", "rows", "JSON lines", "stored", "ratio", "rows/s", "MiB/s"
    );
    for entity in &manifest.entities {
        row(
            &entity.spec.name,
            entity.rows,
            entity.raw_bytes,
            entity.compressed_bytes,
        );
    }
    let totals = &manifest.totals;
    row(
        "total",
        totals.rows,
        totals.raw_bytes,
        totals.compressed_bytes,
    );
    println!(
        "(rows/s and MiB/s over the backup's {} of wall time; both entities are exported side by side)",
        seconds(durations.backup)
    );
    println!();
    println!("{:<10} {:>11}", "step", "duration");
    let steps = [
        ("generate", durations.generate),
        ("backup", durations.backup),
        ("verify", durations.verify),
        ("restore", durations.restore),
        ("compare", durations.compare),
    ];
    for (name, duration) in steps {
        println!("{name:<10} {:>11}", seconds(duration));
    }
    let total: Duration = steps.iter().map(|(_, duration)| *duration).sum();
    println!("{:<10} {:>11}", "total", seconds(total));
    println!();
    println!(
        "backup {}: {} chunks, {} parts, manifest {}",
        manifest.backup_id,
        totals.chunks,
        totals.parts,
        backup.report.manifest.as_deref().unwrap_or("?"),
    );
    println!(
        "restore: {} rows written into target.db; every row matches source.db (Id and JSON document)",
        grouped(backup.rows_restored)
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_thousands() {
        assert_eq!(grouped(0), "0");
        assert_eq!(grouped(999), "999");
        assert_eq!(grouped(1_000), "1,000");
        assert_eq!(grouped(200_000), "200,000");
        assert_eq!(grouped(1_234_567), "1,234,567");
    }
}
