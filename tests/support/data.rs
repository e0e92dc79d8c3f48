//! Test data: Koan-layout tables filled with realistic documents.

/// SQL creating a Koan-layout table `name` with a key of `key_type`.
pub fn koan_table(name: &str, key_type: &str) -> String {
    format!(r#"CREATE TABLE "{name}" ("Id" {key_type} PRIMARY KEY, "Json" jsonb NOT NULL)"#)
}

/// SQL inserting `rows` order documents into `table` (text keys `ord-00000001`…),
/// spread round-robin over `tenants` tenants named `tenant-0`…, with a numeric version.
pub fn insert_orders(table: &str, rows: u64, tenants: u32) -> String {
    format!(
        r#"INSERT INTO "{table}" ("Id", "Json")
           SELECT 'ord-' || lpad(i::text, 8, '0'),
                  jsonb_build_object(
                    '__koan_tenant', 'tenant-' || (i % {tenants}),
                    'version', 1,
                    'customer', jsonb_build_object('id', 'cust-' || (i % 977), 'name', 'Customer ' || (i % 977), 'email', 'c' || (i % 977) || '@example.com'),
                    'lines', jsonb_build_array(
                        jsonb_build_object('sku', 'SKU-' || (i % 311), 'qty', 1 + i % 5, 'price', round((i % 1000) * 1.17, 2)),
                        jsonb_build_object('sku', 'SKU-' || (i % 173), 'qty', 1 + i % 3, 'price', round((i % 700) * 0.93, 2))),
                    'status', (ARRAY['new','paid','shipped','delivered'])[1 + i % 4],
                    'placedAt', '2026-01-01T00:00:00Z'::timestamptz + make_interval(secs => i * 7))
           FROM generate_series(1, {rows}) AS i"#
    )
}

/// Creates the Koan-layout table `Order` (text keys) holding `rows` order
/// documents spread over `tenants` tenants, and analyzes it.
pub async fn orders(pg: &tokio_postgres::Client, rows: u64, tenants: u32) {
    pg.batch_execute(&format!(
        "{}; {}; ANALYZE \"Order\"",
        koan_table("Order", "text"),
        insert_orders("Order", rows, tenants)
    ))
    .await
    .expect("creating the Order table");
}

/// The single integer a counting query returns.
pub async fn count(pg: &tokio_postgres::Client, sql: &str) -> i64 {
    pg.query_one(sql, &[])
        .await
        .unwrap_or_else(|error| panic!("{sql}: {error}"))
        .get(0)
}

/// Asserts the `Order` table of `target` holds `rows` rows, each with the
/// same key and jsonb-equal document as in `source` (compared by digest).
pub async fn assert_same_orders(
    source: &tokio_postgres::Client,
    target: &tokio_postgres::Client,
    rows: i64,
) {
    let digest = r#"SELECT count(*), md5(string_agg("Id" || ' ' || "Json"::text, E'\n' ORDER BY "Id")) FROM "Order""#;
    let source_digest = source.query_one(digest, &[]).await.expect("source digest");
    let target_digest = target
        .query_one(digest, &[])
        .await
        .expect("target digest (the table exists)");
    assert_eq!(target_digest.get::<_, i64>(0), rows, "rows in the target");
    assert_eq!(
        source_digest.get::<_, String>(1),
        target_digest.get::<_, String>(1),
        "the restored table differs from the source"
    );
}
