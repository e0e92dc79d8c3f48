//! Shared helpers: a database file per test, entity specs, exporting a whole
//! range, importing archived rows.

use std::collections::BTreeMap;
use std::path::PathBuf;

use koan_protocol::archive::KeyRange;
use koan_protocol::commands::RestoreMode;
use koan_protocol::jobs::RestoreTarget;
use koan_protocol::plan::{BackupEntity, BackupPlan, EntitySpec};
use koan_source::{
    ImportLine, ImportOutcome, RangePlan, SourceError, SqliteImportSession, SqliteSource,
};
use rusqlite::Connection;

/// A directory of its own holding one database file, removed when the test ends.
pub struct TestFile {
    pub dir: PathBuf,
    pub path: PathBuf,
    pub url: String,
}

impl TestFile {
    /// A fresh directory; the database file is created on first use.
    pub fn new() -> Self {
        let dir =
            std::env::temp_dir().join(format!("koan-sqlite-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).expect("test dir");
        let path = dir.join("app.db");
        let url = format!("sqlite://{}", path.display());
        Self { dir, path, url }
    }

    pub fn source(&self, max_connections: usize) -> SqliteSource {
        SqliteSource::new(&self.url, max_connections).expect("source")
    }

    pub fn connect(&self) -> Connection {
        Connection::open(&self.path).expect("open test database")
    }

    pub fn exec(&self, sql: &str) {
        self.connect()
            .execute_batch(sql)
            .unwrap_or_else(|error| panic!("{sql}: {error:?}"));
    }

    pub fn count(&self, sql: &str) -> i64 {
        self.connect()
            .query_row(sql, [], |row| row.get(0))
            .unwrap_or_else(|error| panic!("{sql}: {error:?}"))
    }

    /// Every row of a Koan table: key text → document as a parsed JSON value's text.
    pub fn documents(&self, table: &str) -> BTreeMap<String, String> {
        let connection = self.connect();
        let mut statement = connection
            .prepare(&format!(
                "SELECT CAST(\"Id\" AS TEXT), \"Json\" FROM \"{table}\""
            ))
            .expect("prepare");
        statement
            .query_map([], |row| {
                Ok((row.get::<_, String>(0)?, row.get::<_, String>(1)?))
            })
            .expect("query")
            .map(|row| {
                let (key, doc) = row.expect("row");
                (key, normalized(&doc))
            })
            .collect()
    }
}

impl Drop for TestFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A JSON text re-serialised, so documents compare by value, not by spacing.
pub fn normalized(doc: &str) -> String {
    serde_json::from_str::<serde_json::Value>(doc)
        .unwrap_or_else(|error| panic!("{doc}: {error}"))
        .to_string()
}

pub fn koan_entity(table: &str) -> EntitySpec {
    BackupPlan::new("p")
        .entity(BackupEntity::new("e", table))
        .entity_specs()
        .remove(0)
}

pub fn range(lo: Option<&str>, hi: Option<&str>) -> KeyRange {
    KeyRange {
        lo: lo.map(str::to_string),
        hi: hi.map(str::to_string),
    }
}

pub type Row = (String, Option<String>, String);

pub async fn export_all(
    source: &SqliteSource,
    entity: &EntitySpec,
    key_range: &KeyRange,
    after_key: Option<&str>,
) -> Result<Vec<Row>, SourceError> {
    let mut stream = source.export(entity, key_range, after_key, None).await?;
    let mut rows = Vec::new();
    while let Some(row) = stream.next().await? {
        let text = |bytes: &[u8]| String::from_utf8(bytes.to_vec()).expect("utf-8");
        rows.push((
            text(&row.key),
            row.version.as_deref().map(text),
            text(&row.doc),
        ));
    }
    assert!(
        stream.next().await?.is_none(),
        "a finished stream stays finished"
    );
    assert_eq!(stream.rows(), rows.len() as u64);
    Ok(rows)
}

/// Keys of a table in the source's key order.
pub fn keys_in_order(file: &TestFile, table: &str) -> Vec<String> {
    let connection = file.connect();
    let mut statement = connection
        .prepare(&format!(
            "SELECT CAST(t.\"Id\" AS TEXT) FROM \"{table}\" AS t ORDER BY t.\"Id\""
        ))
        .expect("prepare");
    statement
        .query_map([], |row| row.get(0))
        .expect("query")
        .map(|key| key.expect("key"))
        .collect()
}

/// Plans, exports every range, and checks the ranges partition the table into equal chunks.
pub async fn check_even_chunks(
    file: &TestFile,
    source: &SqliteSource,
    table: &str,
    chunk_rows: u64,
) -> RangePlan {
    let mut entity = koan_entity(table);
    entity.chunk_rows = chunk_rows;
    let entity = source.inspect(&entity).await.expect("inspect");
    let plan = source.plan_ranges(&entity).await.expect("plan");
    let expected = keys_in_order(file, table);
    assert_eq!(plan.rows_total, expected.len() as u64);
    assert_eq!(plan.rows_per_chunk, chunk_rows);
    assert_eq!(plan.ranges.first().and_then(|r| r.lo.clone()), None);
    assert_eq!(plan.ranges.last().and_then(|r| r.hi.clone()), None);
    for pair in plan.ranges.windows(2) {
        assert_eq!(pair[0].hi, pair[1].lo, "ranges are contiguous");
    }
    let mut exported = Vec::new();
    for (index, key_range) in plan.ranges.iter().enumerate() {
        let rows = export_all(source, &entity, key_range, None)
            .await
            .expect("export");
        let size = rows.len() as u64;
        if index + 1 < plan.ranges.len() {
            assert_eq!(size, chunk_rows, "chunk {index}");
        } else {
            assert!(size > 0 && size <= chunk_rows, "last chunk has {size} rows");
        }
        exported.extend(rows.into_iter().map(|(key, _, _)| key));
    }
    assert_eq!(exported, expected, "every row exactly once, in key order");
    plan
}

/// One archived row: key text, version JSON, document JSON.
#[derive(Debug, Clone)]
pub struct Archived {
    pub key: String,
    pub version: Option<String>,
    pub doc: String,
}

pub fn archived(key: impl ToString, version: Option<&str>, doc: &str) -> Archived {
    Archived {
        key: key.to_string(),
        version: version.map(str::to_string),
        doc: doc.to_string(),
    }
}

impl Archived {
    /// The archive line the worker would have read.
    pub fn raw(&self) -> String {
        let key = if self.key.parse::<i64>().is_ok() {
            self.key.clone()
        } else {
            format!("{:?}", self.key)
        };
        match &self.version {
            Some(version) => format!(r#"{{"id":{key},"v":{version},"doc":{}}}"#, self.doc),
            None => format!(r#"{{"id":{key},"doc":{}}}"#, self.doc),
        }
    }

    pub fn line<'a>(&'a self, line_no: u64, part: &'a str, raw: &'a str) -> ImportLine<'a> {
        ImportLine {
            line_no,
            part,
            key: &self.key,
            version: self.version.as_deref(),
            doc: &self.doc,
            raw,
        }
    }
}

pub fn restore_target(mode: RestoreMode) -> RestoreTarget {
    RestoreTarget {
        mode,
        target_scope: None,
        staging_table: None,
    }
}

/// Pushes `rows` as lines 1.. of `part` into an open import.
pub async fn push_all(
    session: &mut SqliteImportSession,
    part: &str,
    rows: &[Archived],
) -> Result<(), SourceError> {
    for (index, row) in rows.iter().enumerate() {
        let raw = row.raw();
        session
            .push(&row.line(index as u64 + 1, part, &raw))
            .await?;
    }
    Ok(())
}

/// Imports `rows` as one part, in one transaction.
pub async fn import(
    source: &SqliteSource,
    entity: &EntitySpec,
    target: &RestoreTarget,
    part: &str,
    rows: &[Archived],
) -> Result<ImportOutcome, SourceError> {
    let mut session = source.begin_import(entity, target).await?;
    if let Err(error) = push_all(&mut session, part, rows).await {
        session.abort().await;
        return Err(error);
    }
    session.commit().await
}

/// `(line, key, code)` of each failure.
pub fn failure_summary(outcome: &ImportOutcome) -> Vec<(Option<u64>, Option<String>, String)> {
    outcome
        .failures
        .iter()
        .map(|failure| (failure.line_no, failure.key.clone(), failure.code.clone()))
        .collect()
}
