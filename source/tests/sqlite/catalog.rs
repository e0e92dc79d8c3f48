//! `inspect`: what it resolves, and errors naming the table and column.

use koan_protocol::plan::{KeyType, Layout, ScopeMatch, VersionSource};

use crate::support::{TestFile, koan_entity};

#[tokio::test]
async fn resolves_key_types_by_affinity_and_names_case_insensitively() {
    let file = TestFile::new();
    file.exec(
        r#"CREATE TABLE "Order" ("Id" TEXT PRIMARY KEY, "Json" TEXT);
           CREATE TABLE nums (id INTEGER PRIMARY KEY, doc JSON, rev INTEGER, tenant TEXT);
           CREATE TABLE uniq (pk INTEGER PRIMARY KEY, "Id" VARCHAR(40) NOT NULL, "Json" TEXT);
           CREATE UNIQUE INDEX uniq_id ON uniq ("Id");
           CREATE VIEW order_view AS SELECT * FROM "Order";"#,
    );
    let source = file.source(2);
    let entity = source.inspect(&koan_entity("Order")).await.expect("order");
    assert_eq!(entity.key_type, Some(KeyType::Text));
    let lower = source
        .inspect(&koan_entity("order"))
        .await
        .expect("any case");
    assert_eq!(lower.key_type, Some(KeyType::Text));

    let mut nums = koan_entity("nums");
    nums.key = "ID".into();
    nums.document = Some("doc".into());
    nums.version = Some(VersionSource::Column("rev".into()));
    nums.scope = Some("t1".into());
    nums.scope_match = ScopeMatch::Column("tenant".into());
    let nums = source.inspect(&nums).await.expect("nums");
    assert_eq!(nums.key_type, Some(KeyType::Bigint));

    let uniq = source
        .inspect(&koan_entity("uniq"))
        .await
        .expect("unique not-null index");
    assert_eq!(uniq.key_type, Some(KeyType::Text));

    // A view is readable, but has no key constraint to rely on (as in PostgreSQL).
    let error = source
        .inspect(&koan_entity("order_view"))
        .await
        .expect_err("view");
    assert_eq!(error.code(), "key_not_unique");
}

#[tokio::test]
async fn errors_name_the_table_and_column() {
    let file = TestFile::new();
    file.exec(
        r#"CREATE TABLE t ("Id" TEXT PRIMARY KEY, "Json" TEXT, tenant TEXT);
           CREATE TABLE composite (a TEXT, "Id" TEXT, "Json" TEXT, PRIMARY KEY (a, "Id"));
           CREATE TABLE loose ("Id" TEXT, "Json" TEXT);
           CREATE TABLE nullable ("Id" TEXT UNIQUE, "Json" TEXT);
           CREATE TABLE reals ("Id" REAL PRIMARY KEY, "Json" TEXT);
           CREATE TABLE uuids ("Id" UUID PRIMARY KEY, "Json" TEXT);
           CREATE TABLE untyped ("Id" PRIMARY KEY, "Json" TEXT);
           CREATE TABLE intdocs ("Id" TEXT PRIMARY KEY, "Json" INTEGER);
           CREATE INDEX t_tenant ON t (tenant);"#,
    );
    let source = file.source(2);
    let check = |code: &'static str, needles: &'static [&'static str]| {
        move |error: koan_source::SourceError| {
            assert_eq!(error.code(), code, "{error}");
            let message = error.to_string();
            for needle in needles {
                assert!(message.contains(needle), "{message} lacks {needle}");
            }
        }
    };

    check("missing_table", &["public.nope"])(
        source
            .inspect(&koan_entity("nope"))
            .await
            .expect_err("missing"),
    );
    check("not_a_table", &["t_tenant", "index"])(
        source
            .inspect(&koan_entity("t_tenant"))
            .await
            .expect_err("index"),
    );
    let mut entity = koan_entity("t");
    entity.key = "Key".into();
    check("missing_column", &["public.t", "Key"])(source.inspect(&entity).await.expect_err("key"));
    let mut entity = koan_entity("t");
    entity.document = Some("Doc".into());
    check("missing_column", &["Doc"])(source.inspect(&entity).await.expect_err("doc"));
    let mut entity = koan_entity("t");
    entity.version = Some(VersionSource::Column("rev".into()));
    check("missing_column", &["rev"])(source.inspect(&entity).await.expect_err("version"));
    let mut entity = koan_entity("t");
    entity.scope = Some("a".into());
    entity.scope_match = ScopeMatch::Column("owner".into());
    check("missing_column", &["owner"])(source.inspect(&entity).await.expect_err("scope"));
    for table in ["composite", "loose", "nullable"] {
        check("key_not_unique", &["Id"])(
            source.inspect(&koan_entity(table)).await.expect_err(table),
        );
    }
    check("unsupported_key_type", &["reals", "REAL"])(
        source
            .inspect(&koan_entity("reals"))
            .await
            .expect_err("real"),
    );
    check("unsupported_key_type", &["UUID", "TEXT or INTEGER"])(
        source
            .inspect(&koan_entity("uuids"))
            .await
            .expect_err("uuid"),
    );
    check("unsupported_key_type", &["untyped"])(
        source
            .inspect(&koan_entity("untyped"))
            .await
            .expect_err("untyped"),
    );
    check("unsupported_document_type", &["INTEGER"])(
        source
            .inspect(&koan_entity("intdocs"))
            .await
            .expect_err("doc type"),
    );

    // What SQLite has no equivalent for, and hostile names, are refused up front.
    let mut entity = koan_entity("t");
    entity.layout = Layout::Relational;
    entity.document = None;
    check("not_supported", &["relational"])(source.inspect(&entity).await.expect_err("layout"));
    let mut entity = koan_entity("t");
    entity.schema = "audit".into();
    check("not_supported", &["schema 'audit'", "one schema"])(
        source.inspect(&entity).await.expect_err("schema"),
    );
    let mut entity = koan_entity("t");
    entity.schema = "main".into();
    source
        .inspect(&entity)
        .await
        .expect("'main' is the one schema");
    let mut entity = koan_entity("t");
    entity.table = "t\"; DROP TABLE t; --".into();
    check("invalid_name", &["DROP TABLE"])(source.inspect(&entity).await.expect_err("hostile"));
    let mut entity = koan_entity("t");
    entity.scope = Some("a".into());
    entity.scope_match = ScopeMatch::Field("x'y".into());
    check("invalid_name", &["scope_field"])(source.inspect(&entity).await.expect_err("field"));
    assert_eq!(file.count("SELECT count(*) FROM t"), 0, "nothing ran");
}

#[tokio::test]
async fn a_missing_or_foreign_file_is_named() {
    let file = TestFile::new();
    let source = file.source(1);
    let error = source
        .inspect(&koan_entity("t"))
        .await
        .expect_err("no file");
    assert_eq!(error.code(), "open_failed", "{error}");
    assert!(
        error.to_string().contains(&file.path.display().to_string()),
        "{error}"
    );
    assert!(!file.path.exists(), "a backup never creates the file");

    std::fs::write(&file.path, b"this is not a database, just some bytes ......................................................................").expect("write");
    let error = source
        .inspect(&koan_entity("t"))
        .await
        .expect_err("not a database");
    assert_eq!(error.code(), "open_failed", "{error}");
    assert!(error.to_string().contains("not a database"), "{error}");
}
