//! Shared helpers: a database per test, entity specs, exporting a whole range,
//! importing archived rows.

use std::collections::BTreeMap;

use koan_protocol::archive::KeyRange;
use koan_protocol::commands::RestoreMode;
use koan_protocol::jobs::RestoreTarget;
use koan_protocol::plan::{BackupEntity, BackupPlan, EntitySpec};
use koan_source::{
    ImportLine, ImportOutcome, ImportSession, PgSource, RangePlan, SourceError, StagingForm,
};
use tokio_postgres::{Client, NoTls};

pub const START_HINT: &str =
    "pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start";

pub fn base_url() -> String {
    std::env::var("KOAN_TEST_PG_BASE")
        .unwrap_or_else(|_| "postgresql://postgres@127.0.0.1:5432".into())
}

pub async fn connect(url: &str) -> Client {
    let (client, connection) = tokio_postgres::connect(url, NoTls)
        .await
        .unwrap_or_else(|error| {
            let cause = std::error::Error::source(&error)
                .map(|cause| format!(": {cause}"))
                .unwrap_or_default();
            panic!(
                "PostgreSQL is not reachable at {url}: {error}{cause}; start it with `{START_HINT}`"
            )
        });
    tokio::spawn(connection);
    client
}

/// A database of its own for one test, dropped when the test ends.
pub struct TestDb {
    pub name: String,
    pub url: String,
    pub client: Client,
}

impl TestDb {
    pub async fn new() -> Self {
        let admin = connect(&format!("{}/postgres", base_url())).await;
        let name = format!("koan_src_{}", uuid::Uuid::new_v4().simple());
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .unwrap_or_else(|error| panic!("cannot create database {name}: {error}"));
        let url = format!("{}/{name}", base_url());
        let client = connect(&url).await;
        Self { name, url, client }
    }

    pub fn source(&self, max_connections: usize) -> PgSource {
        PgSource::new(&self.url, max_connections).expect("source")
    }

    pub async fn exec(&self, sql: &str) {
        self.client
            .batch_execute(sql)
            .await
            .unwrap_or_else(|error| panic!("{sql}: {error:?}"));
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let name = self.name.clone();
        let admin_url = format!("{}/postgres", base_url());
        // Drop runs inside the test's runtime (and maybe during a panic): use a thread of our own.
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            runtime.block_on(async move {
                let admin = connect(&admin_url).await;
                admin
                    .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                    .await
                    .expect("drop database");
            });
        })
        .join();
        if dropped.is_err() && !std::thread::panicking() {
            panic!("could not drop database {}", self.name);
        }
    }
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
    source: &PgSource,
    entity: &EntitySpec,
    key_range: &KeyRange,
    after_key: Option<&str>,
    snapshot_id: Option<&str>,
) -> Result<Vec<Row>, SourceError> {
    let mut stream = source
        .export(entity, key_range, after_key, snapshot_id)
        .await?;
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
    Ok(rows)
}

pub async fn keys_in_order(db: &TestDb, table: &str) -> Vec<String> {
    let rows = db
        .client
        // Qualified: a bare "Id" in ORDER BY would sort by the text output column.
        .query(
            &format!("SELECT t.\"Id\"::text FROM \"{table}\" AS t ORDER BY t.\"Id\""),
            &[],
        )
        .await
        .expect("keys");
    rows.iter().map(|row| row.get(0)).collect()
}

/// Plans, exports every range, and checks the ranges partition the table into equal chunks.
pub async fn check_even_chunks(
    db: &TestDb,
    source: &PgSource,
    table: &str,
    chunk_rows: u64,
) -> RangePlan {
    let mut entity = koan_entity(table);
    entity.chunk_rows = chunk_rows;
    let entity = source.inspect(&entity).await.expect("inspect");
    let plan = source.plan_ranges(&entity).await.expect("plan");
    let expected = keys_in_order(db, table).await;
    assert_eq!(plan.rows_total, expected.len() as u64);
    assert_eq!(plan.rows_per_chunk, chunk_rows);
    assert_eq!(plan.ranges.first().and_then(|r| r.lo.clone()), None);
    assert_eq!(plan.ranges.last().and_then(|r| r.hi.clone()), None);
    for pair in plan.ranges.windows(2) {
        assert_eq!(pair[0].hi, pair[1].lo, "ranges are contiguous");
    }
    let mut exported = Vec::new();
    for (index, key_range) in plan.ranges.iter().enumerate() {
        let rows = export_all(source, &entity, key_range, None, None)
            .await
            .expect("export");
        let size = rows.len() as u64;
        if index + 1 < plan.ranges.len() {
            assert!(
                size * 2 >= chunk_rows && size <= chunk_rows * 2,
                "chunk {index} has {size} rows"
            );
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
    session: &mut ImportSession,
    part: &str,
    rows: &[Archived],
) -> Result<(), SourceError> {
    for (index, row) in rows.iter().enumerate() {
        let raw = row.raw();
        session
            .push(&ImportLine {
                line_no: index as u64 + 1,
                part,
                key: &row.key,
                version: row.version.as_deref(),
                doc: &row.doc,
                raw: &raw,
            })
            .await?;
    }
    Ok(())
}

/// Imports `rows` as one part, in one transaction.
pub async fn import(
    source: &PgSource,
    entity: &EntitySpec,
    target: &RestoreTarget,
    part: &str,
    rows: &[Archived],
) -> Result<ImportOutcome, SourceError> {
    let mut session = source
        .begin_import(entity, target, StagingForm::Typed)
        .await?;
    if let Err(error) = push_all(&mut session, part, rows).await {
        session.abort().await;
        return Err(error);
    }
    session.commit().await
}

/// Every row of a Koan table: key text → document as jsonb text.
pub async fn documents(db: &TestDb, table: &str) -> BTreeMap<String, String> {
    db.client
        .query(
            &format!("SELECT t.\"Id\"::text, t.\"Json\"::jsonb::text FROM {table} AS t"),
            &[],
        )
        .await
        .unwrap_or_else(|error| panic!("read {table}: {error:?}"))
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect()
}

pub async fn count(db: &TestDb, sql: &str) -> i64 {
    db.client
        .query_one(sql, &[])
        .await
        .unwrap_or_else(|error| panic!("{sql}: {error:?}"))
        .get(0)
}
