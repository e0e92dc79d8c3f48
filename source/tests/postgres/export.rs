//! COPY export: exact ranges, resumption, byte-exact documents, failures, pool hygiene.

use std::time::Duration;

use koan_protocol::archive::KeyRange;
use koan_protocol::plan::VersionSource;

use crate::support::{Row, TestDb, export_all, koan_entity, range};

#[tokio::test]
async fn export_returns_exactly_the_range_and_resumes_after_a_key() {
    let db = TestDb::new().await;
    db.exec(
        r#"CREATE TABLE r ("Id" bigint PRIMARY KEY, "Json" jsonb NOT NULL, rev bigint);
           INSERT INTO r SELECT g, jsonb_build_object('n', g, 'meta', jsonb_build_object('v', g * 10)),
               CASE WHEN g % 2 = 0 THEN g END FROM generate_series(1, 100) g;
           UPDATE r SET "Json" = jsonb_set("Json", '{meta,v}', 'null') WHERE "Id" = 12;"#,
    )
    .await;
    let source = db.source(2);
    let entity = source.inspect(&koan_entity("r")).await.expect("inspect");
    let keys = |rows: &[Row]| {
        rows.iter()
            .map(|row| row.0.parse::<i64>().expect("int"))
            .collect::<Vec<_>>()
    };

    let rows = export_all(&source, &entity, &range(Some("10"), Some("20")), None, None)
        .await
        .expect("export");
    assert_eq!(keys(&rows), (10..20).collect::<Vec<_>>());
    assert_eq!(rows[0].2, r#"{"n": 10, "meta": {"v": 100}}"#);
    assert_eq!(rows[0].1, None, "no version configured");

    let rows = export_all(
        &source,
        &entity,
        &range(Some("10"), Some("20")),
        Some("14"),
        None,
    )
    .await
    .expect("resume");
    assert_eq!(keys(&rows), (15..20).collect::<Vec<_>>());
    let rows = export_all(&source, &entity, &range(None, Some("5")), None, None)
        .await
        .expect("head");
    assert_eq!(keys(&rows), (1..5).collect::<Vec<_>>());
    let rows = export_all(&source, &entity, &range(Some("95"), None), None, None)
        .await
        .expect("tail");
    assert_eq!(keys(&rows), (95..=100).collect::<Vec<_>>());
    let rows = export_all(
        &source,
        &entity,
        &range(Some("10"), Some("20")),
        Some("19"),
        None,
    )
    .await
    .expect("done");
    assert!(rows.is_empty());

    let error = source
        .export(&entity, &range(Some("1; DROP TABLE r"), None), None, None)
        .await
        .expect_err("bad key");
    assert_eq!(error.code(), "invalid_key");

    let mut versioned = entity.clone();
    versioned.version = Some(VersionSource::Column("rev".into()));
    let rows = export_all(
        &source,
        &versioned,
        &range(Some("1"), Some("3")),
        None,
        None,
    )
    .await
    .expect("column");
    assert_eq!(
        (rows[0].1.as_deref(), rows[1].1.as_deref()),
        (None, Some("2"))
    );
    versioned.version = Some(VersionSource::JsonPath(vec!["meta".into(), "v".into()]));
    let rows = export_all(
        &source,
        &versioned,
        &range(Some("11"), Some("14")),
        None,
        None,
    )
    .await
    .expect("path");
    let versions: Vec<Option<&str>> = rows.iter().map(|row| row.1.as_deref()).collect();
    assert_eq!(
        versions,
        vec![Some("110"), None, Some("130")],
        "JSON null is no version"
    );

    let mut unresolved = entity.clone();
    unresolved.key_type = None;
    let rows = export_all(
        &source,
        &unresolved,
        &range(Some("50"), Some("52")),
        None,
        None,
    )
    .await
    .expect("inspects");
    assert_eq!(keys(&rows), vec![50, 51]);
}

fn json_string(text: &str) -> String {
    let mut out = String::from("\"");
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[tokio::test]
async fn large_documents_and_escapes_round_trip_byte_exactly() {
    let db = TestDb::new().await;
    db.exec(
        r#"CREATE TABLE d ("Id" text PRIMARY KEY, "Json" jsonb NOT NULL);
           CREATE TABLE dt ("Id" text PRIMARY KEY, "Json" text NOT NULL);
           CREATE TABLE dj ("Id" text PRIMARY KEY, "Json" json NOT NULL);"#,
    )
    .await;
    let tricky = "quote \" apostrophe ' backslash \\ newline \n tab \t bell \u{7} emoji 😀 cjk 中文 accent é rtl ש";
    let big: String = tricky.repeat(5 * 1024 * 1024 / tricky.len() + 1);
    assert!(big.len() >= 5 * 1024 * 1024);
    let docs = [
        (
            "big",
            format!("{{\"big\": {}, \"n\": 1}}", json_string(&big)),
        ),
        (
            "it's \"key\" \\ 😀\n\t",
            format!("{{\"s\": {}}}", json_string(tricky)),
        ),
        (
            "plain",
            r#"{"a": [1, 2.5, true, null, {"b": "c"}], "e": "\u00e9"}"#.to_string(),
        ),
    ];
    for table in ["d", "dt", "dj"] {
        for (key, doc) in &docs {
            let cast = match table {
                "d" => "::jsonb",
                "dj" => "::json",
                _ => "",
            };
            db.client
                .execute(
                    &format!("INSERT INTO {table} VALUES ($1, $2::text{cast})"),
                    &[key, doc],
                )
                .await
                .expect("insert");
        }
    }
    let source = db.source(2);
    for table in ["d", "dt", "dj"] {
        let entity = source.inspect(&koan_entity(table)).await.expect("inspect");
        let rows = export_all(&source, &entity, &KeyRange::default(), None, None)
            .await
            .expect("export");
        assert_eq!(rows.len(), 3);
        for (key, _, doc) in &rows {
            let expected: String = db
                .client
                .query_one(
                    &format!("SELECT \"Json\"::jsonb::text FROM {table} WHERE \"Id\" = $1"),
                    &[key],
                )
                .await
                .expect("reference")
                .get(0);
            assert!(
                doc.as_bytes() == expected.as_bytes(),
                "{table} {key:?}: document differs"
            );
        }
        let keys: Vec<&str> = rows.iter().map(|row| row.0.as_str()).collect();
        assert!(keys.contains(&"it's \"key\" \\ 😀\n\t"), "{keys:?}");
        // A tricky key works as a bound and as a continuation key.
        let tricky_key = "it's \"key\" \\ 😀\n\t";
        let from_tricky = export_all(&source, &entity, &range(Some(tricky_key), None), None, None)
            .await
            .expect("lo");
        assert_eq!(
            from_tricky.first().map(|row| row.0.as_str()),
            Some(tricky_key)
        );
        let after = export_all(
            &source,
            &entity,
            &KeyRange::default(),
            Some(tricky_key),
            None,
        )
        .await
        .expect("after");
        assert!(after.iter().all(|row| row.0 != tricky_key));
        assert_eq!(after.len() + 1, from_tricky.len(), "{table}");
    }
    let reference: String = db
        .client
        .query_one("SELECT \"Json\"::text FROM d WHERE \"Id\" = 'big'", &[])
        .await
        .expect("big")
        .get(0);
    assert!(reference.len() > 5 * 1024 * 1024);
}

#[tokio::test]
async fn invalid_json_in_a_text_document_fails_loudly() {
    let db = TestDb::new().await;
    db.exec(
        r#"CREATE TABLE bad ("Id" text PRIMARY KEY, "Json" text NOT NULL);
           INSERT INTO bad VALUES ('a', '{"ok": 1}'), ('b', '{not json');"#,
    )
    .await;
    let source = db.source(1);
    let entity = source.inspect(&koan_entity("bad")).await.expect("inspect");
    let error = export_all(&source, &entity, &KeyRange::default(), None, None)
        .await
        .expect_err("invalid json");
    assert_eq!(error.code(), "data_exception", "{error}");
    assert!(!error.is_retryable());
    // The single pooled connection was rolled back and is reusable.
    let rows = export_all(&source, &entity, &range(None, Some("b")), None, None)
        .await
        .expect("valid part");
    assert_eq!(rows.len(), 1);
}

#[tokio::test]
async fn dropped_stream_does_not_poison_the_pool() {
    let db = TestDb::new().await;
    db.exec(
        r#"CREATE TABLE p ("Id" bigint PRIMARY KEY, "Json" jsonb NOT NULL);
           INSERT INTO p SELECT g, jsonb_build_object('pad', repeat('x', 2000)) FROM generate_series(1, 5000) g;"#,
    )
    .await;
    let source = db.source(1);
    let entity = source.inspect(&koan_entity("p")).await.expect("inspect");
    for _ in 0..3 {
        let mut stream = source
            .export(&entity, &KeyRange::default(), None, None)
            .await
            .expect("export");
        assert!(stream.next().await.expect("row").is_some());
        drop(stream);
        db.exec("INSERT INTO p SELECT coalesce(max(\"Id\"), 0) + 1, '{}' FROM p")
            .await;
        let expected: i64 = db
            .client
            .query_one("SELECT count(*) FROM p", &[])
            .await
            .expect("count")
            .get(0);
        let rows = tokio::time::timeout(
            Duration::from_secs(60),
            export_all(&source, &entity, &KeyRange::default(), None, None),
        )
        .await
        .expect("the pool hands out a usable connection")
        .expect("export");
        assert_eq!(
            rows.len() as i64,
            expected,
            "a fresh transaction sees the new row"
        );
    }
    // No backend of ours is left inside a transaction.
    let mut stuck = 1;
    for _ in 0..50 {
        stuck = db
            .client
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
                 AND application_name = 'koan-source' AND state <> 'idle'",
                &[],
            )
            .await
            .expect("activity")
            .get::<_, i64>(0);
        if stuck == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        stuck, 0,
        "a discarded connection is still busy on the server"
    );
    assert!(source.pool_status().size <= 1);
}
