//! `koan-backup demo`: the whole round trip in one process, with every
//! service URL pointing at a closed port to prove it contacts none.
//!
//! `cargo test --test demo`

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use uuid::Uuid;

/// The binary under test.
const BIN: &str = env!("CARGO_BIN_EXE_koan-backup");
/// Nothing listens on port 1: any attempt to use these fails at once.
const CLOSED_AMQP: &str = "amqp://guest:guest@127.0.0.1:1/%2f";
const CLOSED_POSTGRES: &str = "postgresql://postgres@127.0.0.1:1/none";

/// A temporary folder, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(what: &str) -> Self {
        let path = std::env::temp_dir().join(format!(
            "koan-demo-{what}-{}",
            &Uuid::new_v4().simple().to_string()[..12]
        ));
        Self(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn demo(dir: &Path, rows: u32) -> Output {
    Command::new(BIN)
        .args([
            "demo",
            "--rows",
            &rows.to_string(),
            "--workers",
            "2",
            "--dir",
        ])
        .arg(dir)
        .env("KOAN_AMQP_URL", CLOSED_AMQP)
        .env("KOAN_DATABASE_URL", CLOSED_POSTGRES)
        .env("KOAN_SOURCE_URL", CLOSED_POSTGRES)
        .env("RUST_LOG", "warn")
        .output()
        .expect("running koan-backup demo")
}

fn describe(output: &Output) -> String {
    format!(
        "status {}\n--- stdout\n{}\n--- stderr\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// The row count of the summary line starting with `name`.
fn summary_rows(stdout: &str, name: &str) -> Option<u64> {
    stdout.lines().find_map(|line| {
        let mut columns = line.split_whitespace();
        if columns.next() != Some(name) {
            return None;
        }
        columns.next()?.replace(',', "").parse().ok()
    })
}

fn assert_round_trip(output: &Output, rows: u64) {
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{}", describe(output));
    let orders = summary_rows(&stdout, "Order");
    let invoices = summary_rows(&stdout, "Invoice");
    let total = summary_rows(&stdout, "total");
    assert!(
        orders.is_some_and(|orders| orders > 0) && invoices.is_some_and(|invoices| invoices > 0),
        "the summary names both entities: {}",
        describe(output)
    );
    assert_eq!(
        orders.unwrap_or_default() + invoices.unwrap_or_default(),
        rows,
        "{}",
        describe(output)
    );
    assert_eq!(total, Some(rows), "{}", describe(output));
    assert!(stdout.contains("every row matches"), "{}", describe(output));
}

#[test]
fn demo_round_trips_without_services_and_runs_twice() {
    let dir = TempDir::new("run");
    let first = demo(&dir.0, 20_000);
    assert_round_trip(&first, 20_000);
    for file in [
        "source.db",
        "target.db",
        "state.db",
        "archives",
        ".koan-demo",
    ] {
        assert!(dir.0.join(file).exists(), "{file} after the first run");
    }

    let second = demo(&dir.0, 20_000);
    assert_round_trip(&second, 20_000);
}

#[test]
fn demo_refuses_a_folder_it_did_not_make() {
    let dir = TempDir::new("foreign");
    std::fs::create_dir_all(&dir.0).unwrap();
    let notes = dir.0.join("notes.txt");
    std::fs::write(&notes, "keep me").unwrap();

    let output = demo(&dir.0, 1_000);
    assert!(!output.status.success(), "{}", describe(&output));
    let stderr = String::from_utf8_lossy(&output.stderr);
    let shown = std::fs::canonicalize(&dir.0).unwrap();
    assert!(
        stderr.contains(&shown.display().to_string())
            || stderr.contains(&dir.0.display().to_string()),
        "the message names the folder: {}",
        describe(&output)
    );
    assert!(stderr.contains("refusing"), "{}", describe(&output));
    assert_eq!(std::fs::read_to_string(&notes).unwrap(), "keep me");
    let entries: Vec<_> = std::fs::read_dir(&dir.0)
        .unwrap()
        .map(|entry| entry.unwrap().file_name())
        .collect();
    assert_eq!(entries, ["notes.txt"], "nothing else was written");

    // A folder an earlier demo made, with a file of the user's added, is refused too.
    std::fs::remove_file(&notes).unwrap();
    let made = demo(&dir.0, 1_000);
    assert!(made.status.success(), "{}", describe(&made));
    std::fs::write(&notes, "keep me too").unwrap();
    let output = demo(&dir.0, 1_000);
    assert!(!output.status.success(), "{}", describe(&output));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("notes.txt"), "{}", describe(&output));
    assert_eq!(std::fs::read_to_string(&notes).unwrap(), "keep me too");
    assert!(
        dir.0.join("source.db").exists(),
        "the earlier run's files are kept"
    );
}
