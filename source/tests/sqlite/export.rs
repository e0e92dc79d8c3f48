//! Exports: every row exactly once, continuation, versions, scopes, refusals,
//! bad data, and connection slots.

use std::time::Duration;

use koan_protocol::plan::{ScopeMatch, VersionSource};

use crate::support::{TestFile, export_all, koan_entity, range};

fn seed_orders(file: &TestFile, rows: usize) {
    file.exec(&format!(
        r#"CREATE TABLE orders ("Id" TEXT PRIMARY KEY, "Json" TEXT NOT NULL, rev INTEGER);
           WITH RECURSIVE g(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM g WHERE n < {rows})
           INSERT INTO orders SELECT printf('o%05d', n),
             json_object('n', n, 'meta', json_object('v', n * 10), 'pad', printf('%.*c', 200, 'x')), n
           FROM g;"#
    ));
}

#[tokio::test]
async fn ranges_and_continuation_export_every_row_exactly_once() {
    let file = TestFile::new();
    seed_orders(&file, 2000);
    let source = file.source(4);
    let mut entity = koan_entity("orders");
    entity.chunk_rows = 300;
    let entity = source.inspect(&entity).await.expect("inspect");
    let plan = source.plan_ranges(&entity).await.expect("plan");
    assert_eq!(plan.ranges.len(), 7);

    // Ranges exported concurrently, each by its own connection.
    let tasks: Vec<_> = plan
        .ranges
        .iter()
        .cloned()
        .map(|key_range| {
            let source = source.clone();
            let entity = entity.clone();
            tokio::spawn(async move { export_all(&source, &entity, &key_range, None).await })
        })
        .collect();
    let mut keys = Vec::new();
    for task in tasks {
        keys.extend(
            task.await
                .expect("join")
                .expect("export")
                .into_iter()
                .map(|row| row.0),
        );
    }
    let expected: Vec<String> = (1..=2000).map(|n| format!("o{n:05}")).collect();
    assert_eq!(keys, expected);

    // Stop in the middle of a range, then continue after the last key seen.
    let middle = &plan.ranges[3];
    let mut stream = source
        .export(&entity, middle, None, None)
        .await
        .expect("export");
    let mut seen = Vec::new();
    for _ in 0..123 {
        let row = stream.next().await.expect("row").expect("not finished");
        seen.push(row.key_str().expect("utf-8").to_string());
    }
    drop(stream);
    let rest = export_all(&source, &entity, middle, seen.last().map(String::as_str))
        .await
        .expect("continue");
    seen.extend(rest.into_iter().map(|row| row.0));
    let whole: Vec<String> = export_all(&source, &entity, middle, None)
        .await
        .expect("whole")
        .into_iter()
        .map(|row| row.0)
        .collect();
    assert_eq!(seen, whole);
    assert_eq!(seen.len(), 300);

    // A continuation key past the range's end leaves nothing; a bound outside any key too.
    let after_all = export_all(
        &source,
        &entity,
        &range(Some("o00001"), Some("o00010")),
        Some("o00009"),
    )
    .await
    .expect("after");
    assert!(after_all.is_empty());
}

#[tokio::test]
async fn versions_documents_and_scopes_read_like_postgres() {
    let file = TestFile::new();
    file.exec(
        r#"CREATE TABLE v ("Id" INTEGER PRIMARY KEY, "Json" TEXT, rev, tenant TEXT);
           INSERT INTO v VALUES
             (1, '{"meta": {"v": 3}, "__koan_tenant": "a"}', 7, 'x'),
             (2, '{ "meta" : { "v" : "2024-01-01T00:00:00Z" } , "__koan_tenant" : "a" }', '2024-01-01', 'x'),
             (3, '{"meta": {"v": null}, "__koan_tenant": "b"}', 1.5, 'y'),
             (4, NULL, NULL, 'x'),
             (5, '[1, 2]', x'ff', 'x');"#,
    );
    let source = file.source(2);
    let mut entity = koan_entity("v");
    entity.version = Some(VersionSource::JsonPath(vec!["meta".into(), "v".into()]));
    let rows = export_all(&source, &entity, &Default::default(), None)
        .await
        .expect("export");
    let expected: Vec<(String, Option<String>, String)> = vec![
        (
            "1".into(),
            Some("3".into()),
            r#"{"meta":{"v":3},"__koan_tenant":"a"}"#.into(),
        ),
        (
            "2".into(),
            Some(r#""2024-01-01T00:00:00Z""#.into()),
            r#"{"meta":{"v":"2024-01-01T00:00:00Z"},"__koan_tenant":"a"}"#.into(),
        ),
        (
            "3".into(),
            None,
            r#"{"meta":{"v":null},"__koan_tenant":"b"}"#.into(),
        ),
        ("4".into(), None, "null".into()),
        ("5".into(), None, "[1,2]".into()),
    ];
    assert_eq!(
        rows, expected,
        "JSON null is no version; a NULL document is JSON null"
    );

    entity.version = Some(VersionSource::Column("rev".into()));
    let versions: Vec<Option<String>> = export_all(&source, &entity, &Default::default(), None)
        .await
        .expect("column versions")
        .into_iter()
        .map(|row| row.1)
        .collect();
    assert_eq!(
        versions,
        vec![
            Some("7".into()),
            Some(r#""2024-01-01""#.into()),
            Some("1.5".into()),
            None,
            Some(r#""\\xff""#.into())
        ]
    );

    let mut scoped = koan_entity("v");
    scoped.scope = Some("a".into());
    let keys: Vec<String> = export_all(&source, &scoped, &Default::default(), None)
        .await
        .expect("field scope")
        .into_iter()
        .map(|row| row.0)
        .collect();
    assert_eq!(keys, vec!["1", "2"]);
    scoped.scope = Some("x".into());
    scoped.scope_match = ScopeMatch::Column("tenant".into());
    let keys: Vec<String> = export_all(&source, &scoped, &range(Some("2"), None), Some("2"))
        .await
        .expect("column scope")
        .into_iter()
        .map(|row| row.0)
        .collect();
    assert_eq!(keys, vec!["4", "5"]);
}

#[tokio::test]
async fn snapshots_are_refused_clearly() {
    let file = TestFile::new();
    seed_orders(&file, 3);
    let source = file.source(1);
    let entity = source
        .inspect(&koan_entity("orders"))
        .await
        .expect("inspect");
    let error = source
        .export(
            &entity,
            &Default::default(),
            None,
            Some("00000003-0000001B-1"),
        )
        .await
        .expect_err("no snapshot");
    assert_eq!(error.code(), "unsupported");
    assert!(error.to_string().contains("shared_snapshot"), "{error}");
    let error = source.open_snapshot().await.expect_err("no holder");
    assert_eq!(error.code(), "unsupported");
    let check = source
        .capabilities()
        .check(koan_protocol::plan::Consistency::Snapshot)
        .expect_err("the planner refuses snapshot consistency");
    assert!(check.to_string().contains("'snapshot'"), "{check}");
}

#[tokio::test]
async fn bad_data_and_bad_bounds_fail_loudly() {
    let file = TestFile::new();
    file.exec(
        r#"CREATE TABLE bad ("Id" TEXT PRIMARY KEY, "Json" TEXT NOT NULL);
           INSERT INTO bad VALUES ('a', '{}'), ('b', '{}'), ('c', '{"broken": '), ('d', '{}');
           CREATE TABLE nums ("Id" INTEGER PRIMARY KEY, "Json" TEXT NOT NULL);"#,
    );
    let source = file.source(1);
    let entity = source.inspect(&koan_entity("bad")).await.expect("inspect");
    let mut stream = source
        .export(&entity, &Default::default(), None, None)
        .await
        .expect("export");
    assert!(stream.next().await.expect("a").is_some());
    assert!(stream.next().await.expect("b").is_some());
    let error = stream.next().await.expect_err("c is not JSON");
    assert_eq!(error.code(), "data_exception", "{error}");
    assert!(error.to_string().contains("malformed JSON"), "{error}");
    let again = stream
        .next()
        .await
        .expect_err("a failed stream keeps failing");
    assert!(again.to_string().contains("already failed"), "{again}");
    drop(stream);

    let nums = source.inspect(&koan_entity("nums")).await.expect("nums");
    let error = source
        .export(&nums, &range(Some("1; DROP TABLE nums"), None), None, None)
        .await
        .expect_err("bad bound");
    assert_eq!(error.code(), "invalid_key");
    let mut missing = nums.clone();
    missing.document = Some("Doc".into());
    let error = source
        .export(&missing, &Default::default(), None, None)
        .await
        .expect_err("missing column at start");
    assert_eq!(error.code(), "missing_column", "{error}");
    assert_eq!(file.count("SELECT count(*) FROM nums"), 0);
}

#[tokio::test]
async fn a_dropped_stream_gives_its_connection_back_and_writers_go_on() {
    let file = TestFile::new();
    seed_orders(&file, 3000);
    file.exec("PRAGMA journal_mode = WAL");
    let source = file.source(1);
    let entity = source
        .inspect(&koan_entity("orders"))
        .await
        .expect("inspect");
    let mut stream = source
        .export(&entity, &Default::default(), None, None)
        .await
        .expect("export");
    assert!(stream.next().await.expect("first").is_some());
    assert_eq!(source.pool_status().size, 1);

    // A WAL reader does not block a writer, and keeps reading its own snapshot.
    file.exec(
        "INSERT INTO orders VALUES ('o99999', '{}', 0); DELETE FROM orders WHERE \"Id\" = 'o00002'",
    );
    let mut rows = 1;
    let mut last = String::new();
    while let Some(row) = stream.next().await.expect("row") {
        rows += 1;
        last = row.key_str().expect("key").to_string();
        if rows == 1500 {
            break;
        }
    }
    assert_eq!(rows, 1500);
    assert_eq!(
        last, "o01500",
        "o00002 is still there in the stream's snapshot"
    );
    drop(stream);

    // The only slot is free again soon after the drop.
    let exported = tokio::time::timeout(
        Duration::from_secs(10),
        export_all(&source, &entity, &range(Some("o99990"), None), None),
    )
    .await
    .expect("the slot came back")
    .expect("export");
    assert_eq!(exported.len(), 1);
    // The reader thread gives its slot back as it ends, just after its last message.
    for _ in 0..100 {
        if source.pool_status().size == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("the reader thread kept its connection slot");
}
