//! Unit tests of `merge.rs`: the statements' text, per mode, layout and scope.

use super::*;
use koan_protocol::plan::{BackupEntity, BackupPlan};

fn spec(entity: BackupEntity) -> EntitySpec {
    let plan = BackupPlan::new("p").entity(entity);
    plan.validate().expect("valid plan");
    let mut spec = plan.entity_specs().remove(0);
    spec.key_type = Some(KeyType::Text);
    spec
}

fn koan(entity: BackupEntity, target_scope: Option<&str>) -> MergeSql {
    MergeSql::new(&spec(entity), KeyType::Text, target_scope, &[]).expect("sql")
}

fn relational(scope: Option<&str>, version: Option<&str>) -> MergeSql {
    let mut entity = BackupEntity::new("people", "people");
    entity.layout = Layout::Relational;
    entity.key = Some("id".into());
    entity.scope = scope.map(str::to_string);
    entity.scope_column = Some("tenant".into());
    entity.version = version.map(str::to_string);
    let columns = ["id".to_string(), "name".into(), "tenant".into()];
    MergeSql::new(&spec(entity), KeyType::Bigint, None, &columns).expect("sql")
}

#[test]
fn merge_by_json_path_in_a_scope_is_one_statement() {
    let sql = koan(
        BackupEntity::new("orders", "Order")
            .in_scope("b", "tenant-a")
            .version("$.meta.v"),
        None,
    );
    let statement = sql.write_statement(RowsFrom::Import, RestoreMode::Merge);
    let found = r#"(t."Json"::jsonb ->> '__koan_tenant')"#;
    let expected = format!(
        "WITH src AS (SELECT s.seq, s.k AS k_text, \
         s.line_no, s.part, s.raw, s.k::text AS key, s.d::jsonb AS doc, \
         nullif(s.v::jsonb, 'null'::jsonb) AS ver FROM pg_temp.koan_import AS s \
         WHERE s.seq >= $1 AND s.seq < $2 AND NOT EXISTS (SELECT 1 FROM pg_temp.koan_import AS later \
         WHERE later.seq >= $1 AND later.seq < $2 AND later.seq > s.seq AND later.k::text = s.k::text)), \
         conflicts AS (SELECT src.seq, src.k_text, src.line_no, src.part, src.raw, {found} AS found \
         FROM src JOIN \"public\".\"Order\" AS t ON t.\"Id\" = src.key \
         WHERE {found} IS DISTINCT FROM 'tenant-a'), \
         written AS (INSERT INTO \"public\".\"Order\" AS t (\"Id\", \"Json\") SELECT src.key, src.doc FROM src \
         ON CONFLICT (\"Id\") DO UPDATE SET \"Json\" = EXCLUDED.\"Json\" \
         WHERE {found} = 'tenant-a' AND coalesce(nullif((t.\"Json\"::jsonb #> '{{\"meta\",\"v\"}}'::text[]), 'null'::jsonb) \
         < nullif((EXCLUDED.\"Json\"::jsonb #> '{{\"meta\",\"v\"}}'::text[]), 'null'::jsonb), \
         nullif((EXCLUDED.\"Json\"::jsonb #> '{{\"meta\",\"v\"}}'::text[]), 'null'::jsonb) IS NOT NULL) \
         RETURNING 1) \
         SELECT c.seq, c.k_text, c.line_no, c.part, c.raw, c.found, NULL::bigint FROM conflicts AS c \
         UNION ALL SELECT NULL::bigint, NULL::text, NULL::bigint, NULL::text, NULL::text, NULL::text, \
         count(*) FROM written"
    );
    assert_eq!(statement, expected);
}

#[test]
fn modes_choose_the_conflict_action() {
    let unscoped = koan(BackupEntity::new("e", "t"), None);
    let overwrite = unscoped.write_statement(RowsFrom::Import, RestoreMode::Overwrite);
    assert!(
        overwrite.contains(
            "ON CONFLICT (\"Id\") DO UPDATE SET \"Json\" = EXCLUDED.\"Json\" RETURNING 1)"
        ),
        "{overwrite}"
    );
    assert!(
        !overwrite.contains("conflicts AS"),
        "unscoped: no conflicts"
    );
    assert_eq!(
        unscoped.write_statement(RowsFrom::Import, RestoreMode::Merge),
        overwrite,
        "merge without a version is overwrite"
    );
    let skip = unscoped.write_statement(RowsFrom::Import, RestoreMode::SkipExisting);
    assert!(
        skip.contains("ON CONFLICT (\"Id\") DO NOTHING RETURNING 1"),
        "{skip}"
    );

    let scoped = koan(BackupEntity::new("e", "t").in_scope("b", "a"), None);
    let overwrite = scoped.write_statement(RowsFrom::Import, RestoreMode::Overwrite);
    assert!(
        overwrite.contains(
            "DO UPDATE SET \"Json\" = EXCLUDED.\"Json\" WHERE (t.\"Json\"::jsonb ->> '__koan_tenant') = 'a' RETURNING 1"
        ),
        "overwrite never touches another scope's row: {overwrite}"
    );
}

#[test]
fn version_column_and_scope_column_convert_through_the_row_type() {
    let mut entity = BackupEntity::new("e", "t")
        .in_scope("b", "tenant:a")
        .version("rev");
    entity.scope_column = Some("tenant".into());
    let sql = koan(entity, None);
    let statement = sql.write_statement(RowsFrom::Import, RestoreMode::Merge);
    assert!(
        statement.contains(
            "INSERT INTO \"public\".\"t\" AS t (\"Id\", \"Json\", \"rev\", \"tenant\") \
             SELECT src.key, src.doc, e.\"rev\", e.\"tenant\" FROM src CROSS JOIN LATERAL \
             jsonb_populate_record(NULL::\"public\".\"t\", jsonb_build_object('rev', src.ver, 'tenant', 'tenant:a'::text)) AS e"
        ),
        "{statement}"
    );
    assert!(
        statement.contains(
            "DO UPDATE SET \"Json\" = EXCLUDED.\"Json\", \"rev\" = EXCLUDED.\"rev\" \
             WHERE t.\"tenant\"::text = 'tenant:a' AND coalesce(nullif(to_jsonb(t.\"rev\"), 'null'::jsonb) \
             < nullif(to_jsonb(EXCLUDED.\"rev\"), 'null'::jsonb), nullif(to_jsonb(EXCLUDED.\"rev\"), 'null'::jsonb) IS NOT NULL)"
        ),
        "{statement}"
    );
    assert!(!sql.needs_object_documents());
}

#[test]
fn target_scope_restamps_the_document_and_guards_the_new_scope() {
    let sql = koan(
        BackupEntity::new("e", "t").in_scope("b", "tenant-a"),
        Some("tenant-b"),
    );
    let statement = sql.write_statement(RowsFrom::Import, RestoreMode::Overwrite);
    assert!(
        statement.contains(
            "jsonb_set(s.d::jsonb, '{\"__koan_tenant\"}'::text[], to_jsonb('tenant-b'::text)) AS doc"
        ),
        "{statement}"
    );
    assert!(
        statement.contains("IS DISTINCT FROM 'tenant-b'") && !statement.contains("tenant-a"),
        "{statement}"
    );
    assert!(sql.needs_object_documents());
    assert_eq!(
        sql.delete_scope_statement(),
        "DELETE FROM \"public\".\"t\" AS t WHERE (t.\"Json\"::jsonb ->> '__koan_tenant') = 'tenant-b'"
    );
    assert_eq!(
        koan(BackupEntity::new("e", "t"), None).delete_scope_statement(),
        "DELETE FROM \"public\".\"t\" AS t"
    );
}

#[test]
fn relational_rows_are_written_through_the_row_type() {
    let sql = relational(Some("t1"), Some("$.rev"));
    let statement = sql.write_statement(RowsFrom::Import, RestoreMode::Merge);
    assert!(
        statement.contains(
            "(r).\"id\" AS key, r AS rec FROM pg_temp.koan_import AS s CROSS JOIN LATERAL \
             jsonb_populate_record(NULL::\"public\".\"people\", s.d::jsonb) AS r"
        ),
        "{statement}"
    );
    assert!(
        statement.contains(
            "INSERT INTO \"public\".\"people\" AS t (\"id\", \"name\", \"tenant\") OVERRIDING SYSTEM VALUE \
             SELECT (src.rec).\"id\", (src.rec).\"name\", (src.rec).\"tenant\" FROM src \
             ON CONFLICT (\"id\") DO UPDATE SET \"name\" = EXCLUDED.\"name\", \"tenant\" = EXCLUDED.\"tenant\" \
             WHERE t.\"tenant\"::text = 't1' AND coalesce(nullif((to_jsonb(t.*) #> '{\"rev\"}'::text[])"
        ),
        "{statement}"
    );
    assert!(statement.contains("(to_jsonb(EXCLUDED.*) #> '{\"rev\"}'::text[])"));
    assert!(sql.needs_object_documents());

    let mut entity = spec(BackupEntity::new("people", "people"));
    entity.layout = Layout::Relational;
    entity.document = None;
    entity.scope = Some("t1".into());
    entity.scope_match = ScopeMatch::Column("tenant".into());
    let restamped = MergeSql::new(&entity, KeyType::Bigint, Some("t2"), &["id".into()])
        .expect("sql")
        .write_statement(RowsFrom::Import, RestoreMode::Overwrite);
    assert!(
        restamped.contains("(s.d::jsonb || jsonb_build_object('tenant', 't2'::text))"),
        "{restamped}"
    );
    assert!(
        restamped.contains("DO UPDATE SET \"id\" = EXCLUDED.\"id\" WHERE"),
        "a key-only table still upserts: {restamped}"
    );
    assert!(MergeSql::new(&entity, KeyType::Bigint, None, &[]).is_err());
}

#[test]
fn replace_stages_then_swaps() {
    let sql = relational(Some("t1"), None);
    let staging = "koan_stage_0123456789ab_people";
    assert_eq!(
        sql.staging_copy_statement(staging),
        "COPY \"public\".\"koan_stage_0123456789ab_people\" (k, v, d, line_no, part) \
         FROM STDIN (FORMAT binary)"
    );
    assert_eq!(
        sql.staging_marker_statement(staging),
        "INSERT INTO \"public\".\"koan_stage_0123456789ab_people\" (part, loaded) VALUES ($1, $2) \
         ON CONFLICT DO NOTHING"
    );

    let apply = sql.write_statement(RowsFrom::Staging(staging), RestoreMode::Replace);
    assert!(
        apply.contains(
            "FROM \"public\".\"koan_stage_0123456789ab_people\" AS s CROSS JOIN LATERAL \
             jsonb_populate_record(NULL::\"public\".\"people\", s.d::jsonb) AS r \
             WHERE s.seq >= $1 AND s.seq < $2 AND s.k IS NOT NULL"
        ),
        "casts happen at apply, markers are left out: {apply}"
    );
    assert!(
        apply.contains(
            "NOT EXISTS (SELECT 1 FROM \"public\".\"koan_stage_0123456789ab_people\" AS earlier \
             WHERE earlier.seq < s.seq AND earlier.k = s.k)"
        ),
        "a key staged twice: the first staged wins: {apply}"
    );
    assert!(apply.contains("ON CONFLICT (\"id\") DO NOTHING RETURNING 1"));
    assert!(
        apply.contains("conflicts AS"),
        "other scopes' rows are reported"
    );
    assert_eq!(
        lock_staging_statement(&spec(BackupEntity::new("people", "people")), staging)
            .expect("lock"),
        "LOCK TABLE \"public\".\"koan_stage_0123456789ab_people\" IN ACCESS EXCLUSIVE MODE"
    );
    assert!(
        lock_staging_statement(&spec(BackupEntity::new("people", "people")), "people").is_err()
    );
    assert_eq!(
        sql.row_statement(RowsFrom::Import),
        "SELECT s.k, s.line_no, s.part, s.raw FROM pg_temp.koan_import AS s WHERE s.seq = $1"
    );
    assert_eq!(
        sql.row_statement(RowsFrom::Staging(staging)),
        "SELECT s.k, s.line_no, s.part, '{\"id\":' || s.k || coalesce(',\"v\":' || s.v, '') \
         || ',\"doc\":' || s.d || '}' AS raw \
         FROM \"public\".\"koan_stage_0123456789ab_people\" AS s WHERE s.seq = $1"
    );
    let load = sql.load_statement(RowsFrom::Staging(staging));
    assert!(
        load.contains(
            "SELECT (src.rec).\"id\", (src.rec).\"name\", (src.rec).\"tenant\" FROM src RETURNING 1"
        ),
        "an empty target: no arbiter, no scope conflicts: {load}"
    );
    assert!(
        !load.contains("ON CONFLICT") && !load.contains("conflicts AS"),
        "{load}"
    );
    assert_eq!(
        sql.add_constraint_statement("people_pkey", "PRIMARY KEY (id)"),
        "ALTER TABLE \"public\".\"people\" ADD CONSTRAINT \"people_pkey\" PRIMARY KEY (id)"
    );
    assert_eq!(
        sql.bounds_statement(RowsFrom::Staging(staging)),
        "SELECT min(s.seq), max(s.seq), count(s.k) \
         FROM \"public\".\"koan_stage_0123456789ab_people\" AS s"
    );
}

#[test]
fn staging_names_fit_and_never_collide() {
    let operation = uuid::Uuid::parse_str("0123456789abcdef0123456789abcdef").expect("uuid");
    assert_eq!(
        staging_table_name("orders", operation),
        "koan_stage_0123456789ab_orders"
    );
    let dotted = staging_table_name("orders.v2", operation);
    let underscored = staging_table_name("orders_v2", operation);
    assert_ne!(dotted, underscored);
    assert!(
        dotted.starts_with("koan_stage_0123456789ab_orders_v2_"),
        "{dotted}"
    );
    let long = "x".repeat(128);
    let long_name = staging_table_name(&long, operation);
    assert!(long_name.len() <= 63, "{long_name}");
    assert_ne!(
        long_name,
        staging_table_name(&format!("{long}y"), operation)
    );
    for name in [&dotted, &underscored, &long_name] {
        check_staging_name(name).expect("valid staging name");
    }
    assert_eq!(staging_table_name("orders.v2", operation), dotted);

    for refused in ["orders", "koan_stage_x\"; drop table t; --", ""] {
        assert!(check_staging_name(refused).is_err(), "{refused:?}");
    }
    let entity = spec(BackupEntity::new("e", "t"));
    assert!(drop_staging_statement(&entity, "t").is_err());
    assert_eq!(
        drop_staging_statement(&entity, "koan_stage_0123456789ab_e").expect("drop"),
        "DROP TABLE IF EXISTS \"public\".\"koan_stage_0123456789ab_e\""
    );
    assert_eq!(
        create_staging_statement(&entity, "koan_stage_0123456789ab_e").expect("create"),
        "CREATE UNLOGGED TABLE IF NOT EXISTS \"public\".\"koan_stage_0123456789ab_e\" \
         (seq bigserial NOT NULL, k text, v text, d text, line_no bigint, \
         part text NOT NULL, loaded bigint, EXCLUDE USING btree (part WITH =) WHERE (k IS NULL))"
    );
}

#[test]
fn creates_only_koan_tables() {
    let mut entity = BackupEntity::new("e", "Order#archive").version("rev");
    entity.schema = Some("tenant-a".into());
    entity.scope_column = Some("tenant".into());
    let mut entity = spec(entity);
    entity.key_type = Some(KeyType::Bigint);
    let [schema, table] = create_target_statements(&entity).expect("ddl");
    assert_eq!(schema, "CREATE SCHEMA IF NOT EXISTS \"tenant-a\"");
    assert_eq!(
        table,
        "CREATE TABLE IF NOT EXISTS \"tenant-a\".\"Order#archive\" (\"Id\" bigint PRIMARY KEY, \
         \"Json\" jsonb NOT NULL, \"rev\" jsonb, \"tenant\" text)"
    );
    let [_, load] = koan_table_statements(&entity, "koan_load_0123456789ab_e", false).expect("ddl");
    assert_eq!(
        load,
        "CREATE TABLE IF NOT EXISTS \"tenant-a\".\"koan_load_0123456789ab_e\" (\"Id\" bigint NOT NULL, \
         \"Json\" jsonb NOT NULL, \"rev\" jsonb, \"tenant\" text)",
        "a load table has the target's columns, keyed when it becomes the target"
    );
    assert!(koan_table_statements(&entity, "x\"; drop table y", false).is_err());
    entity.key_type = None;
    assert_eq!(
        create_target_statements(&entity)
            .expect_err("no key type")
            .code(),
        "invalid_plan"
    );
    entity.key_type = Some(KeyType::Text);
    entity.layout = Layout::Relational;
    assert!(create_target_statements(&entity).is_err());
}

#[test]
fn refuses_hostile_names() {
    let mut entity = spec(BackupEntity::new("e", "t"));
    entity.table = "t\"; drop table x; --".into();
    assert!(MergeSql::new(&entity, KeyType::Text, None, &[]).is_err());
    let entity = spec(BackupEntity::new("e", "t"));
    let error = MergeSql::new(&entity, KeyType::Text, Some("'; drop"), &[]).expect_err("scope");
    assert_eq!(error.code(), "invalid_name");
    let mut entity = spec(BackupEntity::new("e", "t"));
    entity.scope_match = ScopeMatch::Field("a'b".into());
    assert!(MergeSql::new(&entity, KeyType::Text, None, &[]).is_err());
}
