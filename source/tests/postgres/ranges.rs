//! Range planning: even chunks whatever the key distribution, empty tables, scopes.

use koan_protocol::archive::KeyRange;
use koan_protocol::plan::{Layout, ScopeMatch, VersionSource};
use koan_source::RangePlan;

use crate::support::{TestDb, check_even_chunks, export_all, koan_entity};

#[tokio::test]
async fn ranges_are_even_for_skewed_text_keys() {
    let db = TestDb::new().await;
    let icu = db
        .client
        .query_opt(
            "SELECT 1 FROM pg_collation WHERE collname = 'und-x-icu'",
            &[],
        )
        .await
        .expect("collations")
        .is_some();
    let collate = if icu { r#"COLLATE "und-x-icu""# } else { "" };
    db.exec(&format!(
        r#"CREATE TABLE skewed ("Id" text {collate} PRIMARY KEY, "Json" jsonb NOT NULL);
           INSERT INTO skewed SELECT 'tenant-000000000000000000000000000000000000000000000000-' || lpad(g::text, 6, '0'),
               jsonb_build_object('n', g) FROM generate_series(1, 9450) g;
           INSERT INTO skewed SELECT md5(g::text) || CASE WHEN g % 3 = 0 THEN ' Zz' ELSE '-a' END,
               jsonb_build_object('n', g) FROM generate_series(1, 1050) g;"#
    ))
    .await;
    let source = db.source(2);
    let plan = check_even_chunks(&db, &source, "skewed", 1000).await;
    assert_eq!(plan.ranges.len(), 11);
}

#[tokio::test]
async fn ranges_are_even_for_uuid_keys() {
    let db = TestDb::new().await;
    db.exec(
        r#"CREATE TABLE u ("Id" uuid PRIMARY KEY, "Json" jsonb NOT NULL);
           INSERT INTO u SELECT gen_random_uuid(), jsonb_build_object('n', g) FROM generate_series(1, 5000) g;"#,
    )
    .await;
    let source = db.source(2);
    let plan = check_even_chunks(&db, &source, "u", 700).await;
    assert_eq!(plan.ranges.len(), 8);
}

#[tokio::test]
async fn ranges_are_even_for_bigint_keys_with_huge_gaps() {
    let db = TestDb::new().await;
    db.exec(
        r#"CREATE TABLE b ("Id" bigint PRIMARY KEY, "Json" jsonb NOT NULL);
           INSERT INTO b SELECT CASE WHEN g % 10 = 0 THEN g * 1000000000000 WHEN g % 7 = 0 THEN -g ELSE g END,
               jsonb_build_object('n', g) FROM generate_series(1, 7300) g;
           INSERT INTO b VALUES (9223372036854775807, '{}'), (-9223372036854775808, '{}');"#,
    )
    .await;
    let source = db.source(2);
    let plan = check_even_chunks(&db, &source, "b", 1000).await;
    assert_eq!(plan.rows_total, 7302);
    assert_eq!(plan.ranges.len(), 8);
}

#[tokio::test]
async fn empty_and_single_row_tables() {
    let db = TestDb::new().await;
    db.exec(
        r#"CREATE TABLE empty ("Id" uuid PRIMARY KEY, "Json" jsonb NOT NULL);
           CREATE TABLE one ("Id" uuid PRIMARY KEY, "Json" jsonb NOT NULL);
           INSERT INTO one VALUES ('6f1d2c1e-0000-4000-8000-000000000001', '{"only": true}');"#,
    )
    .await;
    let source = db.source(2);
    for (table, rows) in [("empty", 0u64), ("one", 1)] {
        let mut entity = source.inspect(&koan_entity(table)).await.expect("inspect");
        entity.chunk_rows = 1;
        let plan = source.plan_ranges(&entity).await.expect("plan");
        assert_eq!(
            plan,
            RangePlan {
                rows_total: rows,
                rows_per_chunk: 1,
                ranges: vec![KeyRange::default()]
            }
        );
        let exported = export_all(&source, &entity, &plan.ranges[0], None, None)
            .await
            .expect("export");
        assert_eq!(exported.len() as u64, rows);
    }
}

#[tokio::test]
async fn scope_filters_by_field_and_by_column() {
    let db = TestDb::new().await;
    db.exec(
        r#"CREATE TABLE k ("Id" text PRIMARY KEY, "Json" jsonb NOT NULL);
           INSERT INTO k SELECT 'k' || lpad(g::text, 4, '0'), jsonb_build_object('__koan_tenant', CASE WHEN g % 3 = 0 THEN 'a' ELSE 'b' END, 'n', g)
               FROM generate_series(1, 300) g;
           CREATE TABLE people (person_id integer PRIMARY KEY, name text, tenant text, updated_at timestamptz);
           INSERT INTO people SELECT g, 'p' || g, CASE WHEN g <= 40 THEN 'a' ELSE 'b' END, '2024-01-02 03:04:05+00'
               FROM generate_series(1, 100) g;"#,
    )
    .await;
    let source = db.source(2);
    let mut entity = koan_entity("k");
    entity.scope = Some("a".into());
    entity.chunk_rows = 30;
    let entity = source.inspect(&entity).await.expect("inspect");
    let plan = source.plan_ranges(&entity).await.expect("plan");
    assert_eq!((plan.rows_total, plan.ranges.len()), (100, 4));
    let mut total = 0;
    for key_range in &plan.ranges {
        let rows = export_all(&source, &entity, key_range, None, None)
            .await
            .expect("export");
        assert!(
            rows.iter()
                .all(|row| row.2.contains(r#""__koan_tenant": "a""#))
        );
        total += rows.len();
    }
    assert_eq!(total, 100);

    let mut people = koan_entity("people");
    people.layout = Layout::Relational;
    people.document = None;
    people.key = "person_id".into();
    people.version = Some(VersionSource::Column("updated_at".into()));
    people.scope = Some("a".into());
    people.scope_match = ScopeMatch::Column("tenant".into());
    let mut people = source.inspect(&people).await.expect("inspect people");
    assert_eq!(
        source.plan_ranges(&people).await.expect("plan").rows_total,
        40
    );
    let rows = export_all(&source, &people, &KeyRange::default(), None, None)
        .await
        .expect("export");
    assert_eq!(rows.len(), 40);
    assert_eq!(rows[0].0, "1");
    assert_eq!(rows[0].1.as_deref(), Some(r#""2024-01-02T03:04:05+00:00""#));
    assert_eq!(
        rows[0].2,
        r#"{"name": "p1", "tenant": "a", "person_id": 1, "updated_at": "2024-01-02T03:04:05+00:00"}"#
    );

    // Scope by a document field of the relational row.
    people.scope_match = ScopeMatch::Field("tenant".into());
    assert_eq!(
        export_all(&source, &people, &KeyRange::default(), None, None)
            .await
            .expect("field")
            .len(),
        40
    );
}
