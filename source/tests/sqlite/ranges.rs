//! Range planning: equal chunks whatever the key distribution, scopes, edge cases.

use koan_protocol::plan::{KeyType, ScopeMatch};

use crate::support::{TestFile, check_even_chunks, export_all, koan_entity};

#[tokio::test]
async fn skewed_text_keys_give_equal_chunks() {
    let file = TestFile::new();
    // 990 keys crowded under one prefix, 10 spread far apart: sampling or
    // splitting the key space would give wildly uneven chunks.
    let mut sql =
        String::from(r#"CREATE TABLE skew ("Id" TEXT PRIMARY KEY, "Json" TEXT NOT NULL);"#);
    sql.push_str(
        "WITH RECURSIVE g(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM g WHERE n < 990) \
                  INSERT INTO skew SELECT printf('aaaa-%05d', n), json_object('n', n) FROM g;",
    );
    for (i, key) in [
        "b",
        "k",
        "q",
        "x",
        "xx",
        "y",
        "z",
        "zz",
        "zzz",
        "\u{e9}t\u{e9}",
    ]
    .iter()
    .enumerate()
    {
        sql.push_str(&format!(
            "INSERT INTO skew VALUES ('{key}', '{{\"i\": {i}}}');"
        ));
    }
    file.exec(&sql);
    let source = file.source(3);
    let plan = check_even_chunks(&file, &source, "skew", 100).await;
    assert_eq!(plan.ranges.len(), 10);
    let plan = check_even_chunks(&file, &source, "skew", 7).await;
    assert_eq!(plan.ranges.len(), 143);
    let plan = check_even_chunks(&file, &source, "skew", 1).await;
    assert_eq!(plan.ranges.len(), 1000, "one row per chunk works too");
}

#[tokio::test]
async fn bigint_keys_with_huge_gaps_give_equal_chunks() {
    let file = TestFile::new();
    file.exec(
        r#"CREATE TABLE gaps ("Id" INTEGER PRIMARY KEY, "Json" TEXT NOT NULL);
           WITH RECURSIVE g(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM g WHERE n < 500)
           INSERT INTO gaps SELECT n, '{}' FROM g;
           INSERT INTO gaps VALUES (-9223372036854775808, '{}'), (9223372036854775807, '{}'),
             (1000000000000, '{}'), (2, '{}') ON CONFLICT DO NOTHING;"#,
    );
    let source = file.source(2);
    let entity = source.inspect(&koan_entity("gaps")).await.expect("inspect");
    assert_eq!(entity.key_type, Some(KeyType::Bigint));
    let plan = check_even_chunks(&file, &source, "gaps", 50).await;
    assert_eq!(plan.rows_total, 503);
    assert_eq!(plan.ranges.len(), 11);
    // Numeric order, not text order: "10" comes after "9".
    assert_eq!(plan.ranges[0].hi.as_deref(), Some("50"));
}

#[tokio::test]
async fn scopes_count_only_their_rows() {
    let file = TestFile::new();
    file.exec(
        r#"CREATE TABLE sc ("Id" TEXT PRIMARY KEY, "Json" TEXT NOT NULL, tenant TEXT);
           WITH RECURSIVE g(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM g WHERE n < 300)
           INSERT INTO sc SELECT printf('k%03d', n),
             json_object('__koan_tenant', CASE n % 3 WHEN 0 THEN 'a' ELSE 'b' END),
             CASE n % 2 WHEN 0 THEN 'even' ELSE 'odd' END FROM g;"#,
    );
    let source = file.source(2);
    let mut entity = koan_entity("sc");
    entity.scope = Some("a".into());
    entity.chunk_rows = 30;
    let plan = source.plan_ranges(&entity).await.expect("field scope");
    assert_eq!((plan.rows_total, plan.ranges.len()), (100, 4));
    let mut total = 0;
    for key_range in &plan.ranges {
        let rows = export_all(&source, &entity, key_range, None)
            .await
            .expect("export");
        assert!(
            rows.iter()
                .all(|(_, _, doc)| doc.contains(r#""__koan_tenant":"a""#))
        );
        total += rows.len();
    }
    assert_eq!(total, 100);

    entity.scope = Some("even".into());
    entity.scope_match = ScopeMatch::Column("tenant".into());
    entity.chunk_rows = 1000;
    let plan = source.plan_ranges(&entity).await.expect("column scope");
    assert_eq!((plan.rows_total, plan.ranges.len()), (150, 1));

    entity.scope = Some("nobody".into());
    let plan = source.plan_ranges(&entity).await.expect("empty scope");
    assert_eq!((plan.rows_total, plan.ranges.len()), (0, 1));
}

#[tokio::test]
async fn a_key_column_holding_other_types_fails_loudly() {
    let file = TestFile::new();
    // SQLite stores text in an INTEGER column that is not the rowid.
    file.exec(
        r#"CREATE TABLE mixed ("Id" INTEGER NOT NULL UNIQUE, "Json" TEXT NOT NULL);
           INSERT INTO mixed VALUES (1, '{}'), (2, '{}'), ('three', '{}'), (4, '{}');"#,
    );
    let source = file.source(1);
    let mut entity = koan_entity("mixed");
    entity.chunk_rows = 1;
    let error = source
        .plan_ranges(&entity)
        .await
        .expect_err("text in a bigint key");
    assert_eq!(error.code(), "decode", "{error}");
    assert!(error.to_string().contains("three"), "{error}");
    let error = export_all(&source, &entity, &Default::default(), None)
        .await
        .expect_err("export too");
    assert_eq!(error.code(), "decode", "{error}");
}
