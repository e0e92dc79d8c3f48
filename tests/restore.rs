//! Restore, verify and restore diagnostics, end to end, against the real
//! RabbitMQ and PostgreSQL, with the coordinator and workers as processes.

mod support;

use std::collections::BTreeMap;

use koan_protocol::progress::OperationState;
use support::{Sandbox, archive, data};

type Rows = BTreeMap<String, String>;

async fn rows(pg: &tokio_postgres::Client, table: &str) -> Rows {
    pg.query(&format!(r#"SELECT "Id", "Json"::text FROM "{table}""#), &[])
        .await
        .expect("reading a table")
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect()
}

fn assert_rows_equal(actual: &Rows, expected: &Rows, what: &str) {
    if actual == expected {
        return;
    }
    let missing: Vec<_> = expected
        .keys()
        .filter(|key| !actual.contains_key(*key))
        .take(5)
        .collect();
    let extra: Vec<_> = actual
        .keys()
        .filter(|key| !expected.contains_key(*key))
        .take(5)
        .collect();
    let different: Vec<_> = expected
        .iter()
        .filter(|(key, doc)| actual.get(*key).is_some_and(|found| found != *doc))
        .take(3)
        .map(|(key, doc)| format!("{key}: expected {doc:.120} found {:.120}", actual[key]))
        .collect();
    panic!(
        "{what}: {} rows, expected {}; missing {missing:?}; extra {extra:?}; different {different:#?}",
        actual.len(),
        expected.len()
    );
}

/// Archived documents, then the table changed: 1,000 deleted, 1,000 updated
/// to a newer version, 1,000 updated to an older one, 1,000 inserted; plus
/// 500 rows of another scope that no restore may touch.
const MUTATE: &str = r#"
    DELETE FROM "Order" WHERE "Id" BETWEEN 'ord-00000001' AND 'ord-00001000';
    UPDATE "Order" SET "Json" = "Json" || '{"version": 20, "status": "newer"}' WHERE "Id" BETWEEN 'ord-00001001' AND 'ord-00002000';
    UPDATE "Order" SET "Json" = "Json" || '{"version": 5, "status": "older"}' WHERE "Id" BETWEEN 'ord-00002001' AND 'ord-00003000';
    INSERT INTO "Order" SELECT 'new-' || lpad(i::text, 5, '0'), jsonb_build_object('__koan_tenant', 'tenant-0', 'version', 1, 'n', i) FROM generate_series(1, 1000) i;
"#;

#[tokio::test(flavor = "multi_thread")]
async fn every_restore_mode_reconciles_as_defined() {
    let mut sandbox = Sandbox::new();
    let pg = sandbox.pg().await;
    pg.batch_execute(&format!(
        r#"{}; {};
           UPDATE "Order" SET "Json" = "Json" || '{{"version": 10}}';
           INSERT INTO "Order" SELECT 'other-' || i, jsonb_build_object('__koan_tenant', 'tenant-9', 'version', 1) FROM generate_series(1, 500) i;
           ANALYZE "Order""#,
        data::koan_table("Order", "text"),
        data::insert_orders("Order", 100_000, 1)
    ))
    .await
    .expect("creating the source table");
    sandbox.start_coordinator("coordinator", &[]);
    sandbox.start_workers(2, &[]);
    let plan = "plan_id = \"orders\"\n[[entities]]\nname = \"orders\"\ntable = \"Order\"\nscope = \"tenant-0\"\nversion = \"$.version\"\nchunk_rows = 20000\n";
    let (kind, backup, _) = sandbox.backup(plan).await;
    assert_eq!(kind, "completed", "{backup:?}\n{}", sandbox.logs());
    let backup_id = backup.operation_id.to_string();

    let archived = rows(&pg, "Order").await;
    pg.batch_execute(MUTATE)
        .await
        .expect("changing the live table");
    pg.batch_execute(r#"CREATE TABLE "Mutated" AS SELECT * FROM "Order""#)
        .await
        .expect("saving the changed table");
    let mutated = rows(&pg, "Order").await;

    let expected = |mode: &str| -> Rows {
        let mut expected = Rows::new();
        for (id, doc) in &mutated {
            let n: Option<u32> = id.strip_prefix("ord-").and_then(|n| n.parse().ok());
            let keep_live = match (mode, n) {
                (_, None) if id.starts_with("other-") => true,
                ("replace", None) => false,
                (_, None) => true,
                ("merge", Some(n)) => (1001..=2000).contains(&n),
                ("overwrite", Some(_)) => false,
                ("skip-existing", Some(_)) => true,
                ("replace", Some(_)) => false,
                _ => unreachable!(),
            };
            if keep_live {
                expected.insert(id.clone(), doc.clone());
            }
        }
        for (id, doc) in &archived {
            if id.starts_with("other-") {
                continue;
            }
            expected.entry(id.clone()).or_insert_with(|| doc.clone());
        }
        expected
    };

    for mode in ["merge", "overwrite", "skip-existing", "replace"] {
        pg.batch_execute(r#"TRUNCATE "Order"; INSERT INTO "Order" SELECT * FROM "Mutated""#)
            .await
            .expect("resetting");
        let (output, terminal, follower) = sandbox
            .submit(&["restore", &backup_id, "--mode", mode])
            .await;
        assert!(
            output.status.success(),
            "{mode}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let (kind, report) = terminal.expect("a terminal event");
        assert_eq!(kind, "completed", "{mode}: {report:?}\n{}", sandbox.logs());
        follower.assert_monotonic_to_100();
        assert_eq!(report.rows_failed, 0, "{mode}");
        assert_eq!(report.rows_done, 100_000, "{mode}");
        assert_rows_equal(&rows(&pg, "Order").await, &expected(mode), mode);
    }

    // Every part imported again (a redelivered restore): nothing changes, no duplicates.
    let before = rows(&pg, "Order").await;
    let (_, terminal, _) = sandbox
        .submit(&["restore", &backup_id, "--mode", "overwrite"])
        .await;
    let (kind, report) = terminal.expect("terminal");
    assert_eq!(kind, "completed", "{report:?}");
    let (_, terminal, _) = sandbox
        .submit(&["restore", &backup_id, "--mode", "merge"])
        .await;
    let (kind, report) = terminal.expect("terminal");
    assert_eq!(kind, "completed", "{report:?}");
    assert_eq!(
        report.rows_written, 0,
        "an equal version is never rewritten"
    );
    assert_rows_equal(
        &rows(&pg, "Order").await,
        &before,
        "after importing every part twice",
    );
    let count = data::count(&pg, r#"SELECT count(*) FROM "Order""#).await;
    assert_eq!(count as usize, before.len());
    sandbox.assert_alive();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_corrupted_part_is_named_by_verify_and_never_restored() {
    let mut sandbox = Sandbox::new();
    let pg = sandbox.pg().await;
    data::orders(&pg, 20_000, 1).await;
    sandbox.start_coordinator("coordinator", &[]);
    sandbox.start_workers(2, &[]);
    let plan = "plan_id = \"orders\"\n[[entities]]\nname = \"orders\"\ntable = \"Order\"\nchunk_rows = 5000\n";
    let (kind, backup, _) = sandbox.backup(plan).await;
    assert_eq!(kind, "completed", "{}", sandbox.logs());
    let backup_id = backup.operation_id.to_string();

    let whole = sandbox.cli(&["verify", &backup_id]);
    assert!(
        whole.status.success(),
        "verify of a whole backup: {}",
        String::from_utf8_lossy(&whole.stderr)
    );

    let manifest = archive::manifest(
        &sandbox.storage,
        backup.manifest.as_deref().expect("manifest"),
    );
    let (_, _, part) = manifest.parts().nth(1).expect("a second part");
    let path = sandbox.archive_path(&part.path);
    let mut bytes = std::fs::read(&path).expect("reading the part");
    let original_keys: Vec<String> = zstd::decode_all(bytes.as_slice())
        .map(|raw| {
            String::from_utf8_lossy(&raw)
                .lines()
                .map(|line| {
                    serde_json::from_str::<serde_json::Value>(line).expect("line")["id"]
                        .as_str()
                        .expect("key")
                        .to_string()
                })
                .collect()
        })
        .expect("decoding the part");
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x01;
    std::fs::write(&path, &bytes).expect("flipping a byte");

    let verify = sandbox.cli(&["verify", &backup_id]);
    let stderr = String::from_utf8_lossy(&verify.stderr);
    assert!(!verify.status.success(), "verify accepted a corrupted part");
    assert!(
        stderr.contains(&part.path),
        "verify does not name {}: {stderr}",
        part.path
    );

    pg.batch_execute(r#"TRUNCATE "Order""#)
        .await
        .expect("emptying the target");
    let (output, terminal, _) = sandbox
        .submit(&["restore", &backup_id, "--mode", "overwrite"])
        .await;
    assert!(output.status.success());
    let (kind, report) = terminal.expect("terminal");
    assert_eq!(kind, "failed", "{report:?}");
    let error = report.error.clone().unwrap_or_default();
    assert!(
        error.contains(&part.path),
        "the error names the part: {error}"
    );
    let written: i64 = pg
        .query_one(
            r#"SELECT count(*) FROM "Order" WHERE "Id" = ANY($1)"#,
            &[&original_keys],
        )
        .await
        .expect("counting")
        .get(0);
    assert_eq!(written, 0, "rows of the corrupted part were written");
    sandbox.assert_alive();
}

#[tokio::test(flavor = "multi_thread")]
async fn failed_rows_are_isolated_listed_and_replayed_without_duplicates() {
    let mut sandbox = Sandbox::new();
    let pg = sandbox.pg().await;
    data::orders(&pg, 10_000, 1).await;
    sandbox.start_coordinator("coordinator", &[]);
    sandbox.start_workers(2, &[]);
    let plan = "plan_id = \"orders\"\n[[entities]]\nname = \"orders\"\ntable = \"Order\"\nchunk_rows = 5000\n";
    let (kind, backup, _) = sandbox.backup(plan).await;
    assert_eq!(kind, "completed", "{}", sandbox.logs());
    let manifest_path = backup.manifest.clone().expect("manifest");

    // Damage one part the way a buggy producer would: 3 unparsable lines and
    // 2 documents the target's constraint refuses; the manifest agrees with it.
    let mut manifest: serde_json::Value = serde_json::from_slice(
        &std::fs::read(sandbox.archive_path(&manifest_path)).expect("manifest"),
    )
    .expect("json");
    let part = &mut manifest["entities"][0]["chunks"][0]["parts"][0];
    let part_path = part["path"].as_str().expect("path").to_string();
    let raw = zstd::decode_all(
        std::fs::read(sandbox.archive_path(&part_path))
            .expect("part")
            .as_slice(),
    )
    .expect("zstd");
    let mut lines: Vec<String> = String::from_utf8(raw)
        .expect("utf-8")
        .lines()
        .map(str::to_string)
        .collect();
    let mut forbidden = Vec::new();
    for (index, line) in lines.iter_mut().enumerate() {
        match index {
            10 | 20 | 30 => *line = format!("{{\"id\": \"broken-{index}\", \"doc\": {{not json"),
            40 | 50 => {
                let mut value: serde_json::Value = serde_json::from_str(line).expect("line");
                value["doc"]["status"] = serde_json::json!("forbidden");
                forbidden.push(value["id"].as_str().expect("key").to_string());
                *line = value.to_string();
            }
            _ => {}
        }
    }
    let text = lines.join("\n") + "\n";
    let compressed = zstd::encode_all(text.as_bytes(), 3).expect("zstd");
    std::fs::write(sandbox.archive_path(&part_path), &compressed).expect("writing the part");
    part["blake3"] = serde_json::json!(blake3::hash(&compressed).to_hex().to_string());
    part["compressed_bytes"] = serde_json::json!(compressed.len());
    part["raw_bytes"] = serde_json::json!(text.len());
    std::fs::write(
        sandbox.archive_path(&manifest_path),
        serde_json::to_vec_pretty(&manifest).expect("json"),
    )
    .expect("manifest");

    pg.batch_execute(
        r#"TRUNCATE "Order";
           ALTER TABLE "Order" ADD CONSTRAINT order_status_allowed CHECK ("Json"->>'status' <> 'forbidden')"#,
    )
    .await
    .expect("preparing the target");
    let restore_id = uuid::Uuid::now_v7().to_string();
    let output = sandbox.cli(&[
        "restore",
        &backup.operation_id.to_string(),
        "--mode",
        "overwrite",
        "--operation-id",
        &restore_id,
        "--follow",
    ]);
    assert_eq!(
        output.status.code(),
        Some(1),
        "a restore with failed rows exits 1: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("5 failed rows"),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let count = data::count(&pg, r#"SELECT count(*) FROM "Order""#).await;
    assert_eq!(count, 10_000 - 5, "everything else is restored");

    let listing = sandbox.cli(&["diagnostics", &restore_id, "--json"]);
    assert!(
        listing.status.success(),
        "{}",
        String::from_utf8_lossy(&listing.stderr)
    );
    let listing: Vec<serde_json::Value> =
        serde_json::from_slice(&listing.stdout).expect("diagnostics json");
    assert_eq!(listing.len(), 5, "{listing:#?}");
    let codes: Vec<&str> = listing
        .iter()
        .map(|row| row["failure"]["code"].as_str().expect("code"))
        .collect();
    assert_eq!(
        codes
            .iter()
            .filter(|code| **code == "unparsable_line")
            .count(),
        3,
        "{codes:?}"
    );
    assert_eq!(
        codes
            .iter()
            .filter(|code| **code == "constraint_violation")
            .count(),
        2,
        "{codes:?}"
    );
    for row in &listing {
        assert!(
            !row["failure"]["reason"]
                .as_str()
                .unwrap_or_default()
                .is_empty()
        );
        if row["failure"]["code"] == "constraint_violation" {
            assert!(
                row["failure"]["reason"]
                    .as_str()
                    .expect("reason")
                    .contains("order_status_allowed"),
                "{row}"
            );
        }
    }

    pg.batch_execute(r#"ALTER TABLE "Order" DROP CONSTRAINT order_status_allowed"#)
        .await
        .expect("fixing the cause");
    let replay = sandbox.cli(&["diagnostics", &restore_id, "--replay"]);
    let stderr = String::from_utf8_lossy(&replay.stderr);
    assert!(
        stderr.contains("3 failed rows") || replay.status.code() == Some(1),
        "{stderr}"
    );
    for key in &forbidden {
        let found: i64 = pg
            .query_one(r#"SELECT count(*) FROM "Order" WHERE "Id" = $1"#, &[key])
            .await
            .expect("count")
            .get(0);
        assert_eq!(found, 1, "{key} replayed once");
    }
    let count = data::count(&pg, r#"SELECT count(*) FROM "Order""#).await;
    assert_eq!(count, 10_000 - 3, "the two rows came back, nothing twice");
    let listing = sandbox.cli(&["diagnostics", &restore_id, "--json"]);
    let listing: Vec<serde_json::Value> =
        serde_json::from_slice(&listing.stdout).expect("diagnostics json");
    assert_eq!(
        listing.len(),
        3,
        "only the unparsable lines remain: {listing:#?}"
    );
    sandbox.assert_alive();
}

#[tokio::test(flavor = "multi_thread")]
async fn cross_scope_restores_need_an_explicit_target_scope() {
    let mut sandbox = Sandbox::new();
    let pg = sandbox.pg().await;
    data::orders(&pg, 6_000, 2).await;
    let staging_url = sandbox.create_database("staging");
    let staging = sandbox.pg_at(&staging_url).await;
    staging
        .batch_execute(&format!(
            r#"{}; INSERT INTO "Order" SELECT 'keep-' || i, jsonb_build_object('__koan_tenant', 'tenant-0', 'n', i) FROM generate_series(1, 100) i"#,
            data::koan_table("Order", "text")
        ))
        .await
        .expect("seeding the staging database");
    sandbox.start_coordinator("coordinator", &[]);
    sandbox.start_workers(1, &[]);
    sandbox.start_pool_workers("staging", &staging_url, 1);
    let plan = "plan_id = \"orders\"\n[[entities]]\nname = \"orders\"\ntable = \"Order\"\nscope = \"tenant-0\"\n";
    let (kind, backup, _) = sandbox.backup(plan).await;
    assert_eq!(kind, "completed", "{}", sandbox.logs());
    let backup_id = backup.operation_id.to_string();

    let refused = sandbox.cli(&[
        "restore", &backup_id, "--scope", "tenant-7", "--pool", "staging",
    ]);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success(),
        "a cross-scope restore was accepted"
    );
    assert!(
        stderr.contains("tenant-0") && stderr.contains("target-scope"),
        "{stderr}"
    );

    let before = rows(&staging, "Order").await;
    let (output, terminal, _) = sandbox
        .submit(&[
            "restore",
            &backup_id,
            "--scope",
            "tenant-7",
            "--target-scope",
            "tenant-7",
            "--pool",
            "staging",
        ])
        .await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(
        stderr.contains("merge behaves as overwrite"),
        "the CLI says merge without a version is overwrite: {stderr}"
    );
    let (kind, report) = terminal.expect("terminal");
    assert_eq!(kind, "completed", "{report:?}\n{}", sandbox.logs());
    let restamped: i64 = staging
        .query_one(
            r#"SELECT count(*) FROM "Order" WHERE "Json"->>'__koan_tenant' = 'tenant-7'"#,
            &[],
        )
        .await
        .expect("count")
        .get(0);
    assert_eq!(restamped, 3_000, "every restored row carries the new scope");
    let after = rows(&staging, "Order").await;
    for (key, doc) in &before {
        assert_eq!(
            after.get(key),
            Some(doc),
            "a row of the source scope changed: {key}"
        );
    }
    let source_untouched: i64 = pg
        .query_one(
            r#"SELECT count(*) FROM "Order" WHERE "Json"->>'__koan_tenant' = 'tenant-7'"#,
            &[],
        )
        .await
        .expect("count")
        .get(0);
    assert_eq!(
        source_untouched, 0,
        "the default pool's database was written"
    );
    sandbox.assert_alive();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_200k_three_tenant_backup_restores_into_an_empty_database() {
    let mut sandbox = Sandbox::new();
    let pg = sandbox.pg().await;
    data::orders(&pg, 200_000, 3).await;
    let empty_url = sandbox.create_database("empty");
    sandbox.start_coordinator("coordinator", &[]);
    sandbox.start_workers(1, &[]);
    sandbox.start_pool_workers("target", &empty_url, 3);
    let plan = "plan_id = \"all\"\n[[entities]]\nname = \"orders\"\ntable = \"Order\"\nchunk_rows = 25000\n";
    let (kind, backup, _) = sandbox.backup(plan).await;
    assert_eq!(kind, "completed", "{}", sandbox.logs());

    let (output, terminal, follower) = sandbox
        .submit(&[
            "restore",
            &backup.operation_id.to_string(),
            "--mode",
            "replace",
            "--pool",
            "target",
        ])
        .await;
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let (kind, report) = terminal.expect("terminal");
    assert_eq!(kind, "completed", "{report:?}\n{}", sandbox.logs());
    assert_eq!(report.state, OperationState::Completed);
    follower.assert_monotonic_to_100();
    let target = sandbox.pg_at(&empty_url).await;
    data::assert_same_orders(&pg, &target, 200_000).await;
    sandbox.assert_alive();
}
