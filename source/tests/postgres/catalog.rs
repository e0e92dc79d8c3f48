//! Catalog inspection and connection errors.

use koan_protocol::plan::{EntitySpec, KeyType, Layout, ScopeMatch, VersionSource};
use koan_source::{PgSource, SourceError};

use crate::support::{TestDb, base_url, koan_entity};

#[tokio::test]
async fn inspect_resolves_key_types_and_accepts_unusual_names() {
    let db = TestDb::new().await;
    db.exec(
        r#"CREATE TABLE "Order" ("Id" text PRIMARY KEY, "Json" jsonb NOT NULL);
           CREATE SCHEMA "tenant-a";
           CREATE TABLE "tenant-a"."we-ird:Tab#1$x" ("Id$k" uuid NOT NULL UNIQUE, "Json" json);
           CREATE TABLE small ("Id" integer PRIMARY KEY, "Json" text);
           CREATE TABLE vc ("Id" varchar(40) PRIMARY KEY, "Json" jsonb);
           CREATE TABLE people (person_id bigint PRIMARY KEY, name text, tenant text);"#,
    )
    .await;
    let source = db.source(2);
    assert_eq!(
        source.capabilities(),
        koan_source::AdapterCapabilities::POSTGRES
    );

    let resolved = source.inspect(&koan_entity("Order")).await.expect("Order");
    assert_eq!(resolved.key_type, Some(KeyType::Text));

    let mut weird = koan_entity("we-ird:Tab#1$x");
    weird.schema = "tenant-a".into();
    weird.key = "Id$k".into();
    assert_eq!(
        source.inspect(&weird).await.expect("weird").key_type,
        Some(KeyType::Uuid)
    );
    assert_eq!(
        source
            .inspect(&koan_entity("small"))
            .await
            .expect("small")
            .key_type,
        Some(KeyType::Integer)
    );
    assert_eq!(
        source
            .inspect(&koan_entity("vc"))
            .await
            .expect("vc")
            .key_type,
        Some(KeyType::Text)
    );

    let mut people = koan_entity("people");
    people.layout = Layout::Relational;
    people.document = None;
    people.key = "person_id".into();
    people.scope = Some("t1".into());
    people.scope_match = ScopeMatch::Column("tenant".into());
    assert_eq!(
        source.inspect(&people).await.expect("people").key_type,
        Some(KeyType::Bigint)
    );
}

#[tokio::test]
async fn inspect_errors_name_the_missing_or_unsuitable_thing() {
    let db = TestDb::new().await;
    db.exec(
        r#"CREATE TABLE t ("Id" text PRIMARY KEY, "Json" jsonb NOT NULL, tenant text);
           CREATE TABLE no_index ("Id" text NOT NULL, "Json" jsonb);
           CREATE TABLE nullable ("Id" text UNIQUE, "Json" jsonb);
           CREATE TABLE composite (a text, b text, "Json" jsonb, PRIMARY KEY (a, b));
           CREATE TABLE numeric_key ("Id" numeric PRIMARY KEY, "Json" jsonb);
           CREATE TABLE int_doc ("Id" text PRIMARY KEY, "Json" integer);
           CREATE SEQUENCE seq;"#,
    )
    .await;
    let source = db.source(2);
    let expect_error = |entity: EntitySpec| {
        let source = source.clone();
        async move {
            source
                .inspect(&entity)
                .await
                .expect_err("inspect should fail")
        }
    };

    let error = expect_error(koan_entity("nope")).await;
    assert_eq!(error.code(), "missing_table");
    assert!(error.to_string().contains("public.nope"), "{error}");

    let mut entity = koan_entity("t");
    entity.key = "NoKey".into();
    let error = expect_error(entity).await;
    assert!(
        matches!(&error, SourceError::MissingColumn { table, column } if table == "public.t" && column == "NoKey"),
        "{error}"
    );
    assert!(
        error.to_string().contains("NoKey") && error.to_string().contains("public.t"),
        "{error}"
    );

    for (field, name) in [("document", "Doc"), ("version", "rev"), ("scope", "org")] {
        let mut entity = koan_entity("t");
        match field {
            "document" => entity.document = Some(name.into()),
            "version" => entity.version = Some(VersionSource::Column(name.into())),
            _ => {
                entity.scope = Some("a".into());
                entity.scope_match = ScopeMatch::Column(name.into());
            }
        }
        let error = expect_error(entity).await;
        assert_eq!(error.code(), "missing_column", "{field}");
        assert!(error.to_string().contains(name), "{field}: {error}");
    }

    for (table, key) in [("no_index", "Id"), ("nullable", "Id"), ("composite", "a")] {
        let mut entity = koan_entity(table);
        entity.key = key.into();
        let error = expect_error(entity).await;
        assert_eq!(error.code(), "key_not_unique", "{table}");
        assert!(
            error.to_string().contains(table) && error.to_string().contains(key),
            "{error}"
        );
    }

    let error = expect_error(koan_entity("numeric_key")).await;
    assert_eq!(error.code(), "unsupported_key_type");
    assert!(
        error.to_string().contains("numeric") && error.to_string().contains("numeric_key"),
        "{error}"
    );

    let error = expect_error(koan_entity("int_doc")).await;
    assert_eq!(error.code(), "unsupported_document_type");
    assert!(
        error.to_string().contains("integer") && error.to_string().contains("Json"),
        "{error}"
    );

    let error = expect_error(koan_entity("seq")).await;
    assert_eq!(error.code(), "not_a_table", "{error}");

    let mut hostile = koan_entity("t");
    hostile.table = "t\"; DROP TABLE t; --".into();
    let error = expect_error(hostile).await;
    assert_eq!(error.code(), "invalid_name");
    assert!(error.to_string().contains("DROP TABLE"), "{error}");
    assert!(!error.is_retryable());
}

#[tokio::test]
async fn unreachable_server_is_named_without_the_password() {
    let source =
        PgSource::new("postgresql://koan:hunter2secret@127.0.0.1:1/nowhere", 2).expect("pool");
    let error = source
        .inspect(&koan_entity("t"))
        .await
        .expect_err("unreachable");
    let message = error.to_string();
    assert_eq!(error.code(), "unreachable", "{message}");
    assert!(error.is_retryable());
    assert!(
        message.contains("postgresql at 127.0.0.1:1/nowhere") && message.contains("unreachable"),
        "{message}"
    );
    assert!(message.contains("pg_ctlcluster"), "{message}");
    assert!(
        !message.contains("hunter2secret") && !format!("{error:?}").contains("hunter2secret"),
        "{message}"
    );
    assert!(!format!("{source:?}").contains("hunter2secret"));
    let error = source.open_snapshot().await.expect_err("unreachable");
    assert_eq!(error.code(), "unreachable");

    let source =
        PgSource::new(&format!("{}/koan_src_does_not_exist", base_url()), 1).expect("pool");
    let error = source
        .inspect(&koan_entity("t"))
        .await
        .expect_err("no database");
    assert_eq!(error.code(), "connect_rejected", "{error}");
    assert!(
        error.to_string().contains("koan_src_does_not_exist"),
        "{error}"
    );
    assert!(!error.is_retryable());
    assert_eq!(
        PgSource::new("not a url", 1).expect_err("config").code(),
        "config"
    );
}
