//! Verify against archives in memory: what is checked, and how problems read.

use std::sync::Arc;

use koan_protocol::archive::{
    ConsistencyFacts, FORMAT_VERSION, ManifestChunk, ManifestEntity, Totals, manifest_path,
    part_path,
};
use koan_protocol::plan::{BackupEntity, BackupPlan, Consistency};

use super::*;
use crate::events::MemoryEvents;

/// A backup of one bigint entity, one chunk `[0, 100)`, a part per text
/// (`None`: listed in the manifest, absent from storage).
async fn archive(parts: &[Option<&str>]) -> (Storage, VerifyJob) {
    let storage = Storage::from_store(Arc::new(object_store::memory::InMemory::new()));
    let plan = BackupPlan::new("p").entity(BackupEntity::new("ledger", "Ledger"));
    let mut spec = plan.entity_specs().remove(0);
    spec.key_type = Some(KeyType::Bigint);
    let backup_id = uuid::Uuid::now_v7();
    let mut infos = Vec::new();
    for (number, text) in parts.iter().enumerate() {
        let part = u32::try_from(number).unwrap();
        let path = part_path(&spec, "p", backup_id, 0, part, "r1").unwrap();
        let text = text.unwrap_or("{\"id\":1,\"doc\":{}}\n");
        let stored = zstd::encode_all(text.as_bytes(), 3).unwrap();
        let keys: Vec<&str> = text
            .lines()
            .map(|line| line.split([':', ',']).nth(1).unwrap_or(""))
            .collect();
        infos.push(PartInfo {
            part,
            path: path.clone(),
            first_key: keys.first().map(|key| key.to_string()),
            last_key: keys.last().map(|key| key.to_string()),
            rows: keys.len() as u64,
            raw_bytes: text.len() as u64,
            compressed_bytes: stored.len() as u64,
            blake3: blake3::hash(&stored).to_hex().to_string(),
        });
        if parts[number].is_some() {
            storage.put(&path, stored).await.unwrap();
        }
    }
    let sum = |field: fn(&PartInfo) -> u64| infos.iter().map(field).sum::<u64>();
    let totals = Totals {
        entities: 1,
        chunks: 1,
        parts: infos.len() as u64,
        rows: sum(|part| part.rows),
        raw_bytes: sum(|part| part.raw_bytes),
        compressed_bytes: sum(|part| part.compressed_bytes),
    };
    let now = chrono::Utc::now();
    let manifest = Manifest {
        format_version: FORMAT_VERSION,
        backup_id,
        plan: plan.clone(),
        consistency: ConsistencyFacts {
            mode: Consistency::PerChunk,
            snapshots: Vec::new(),
            notes: Vec::new(),
        },
        base_backup: None,
        labels: Default::default(),
        started_at: now,
        completed_at: now,
        totals,
        entities: vec![ManifestEntity {
            spec,
            rows: totals.rows,
            raw_bytes: totals.raw_bytes,
            compressed_bytes: totals.compressed_bytes,
            chunks: vec![ManifestChunk {
                chunk: 0,
                range: KeyRange {
                    lo: Some("0".into()),
                    hi: Some("100".into()),
                },
                rows: totals.rows,
                parts: infos,
            }],
        }],
    };
    let path = manifest_path(&plan, backup_id).unwrap();
    storage
        .put(&path, serde_json::to_vec(&manifest).unwrap())
        .await
        .unwrap();
    let job = VerifyJob {
        operation_id: uuid::Uuid::now_v7(),
        backup_id,
        manifest_path: path,
    };
    (storage, job)
}

#[tokio::test]
async fn checks_keys_lines_and_presence_of_every_part() {
    let (storage, job) = archive(&[
        Some("{\"id\":1,\"doc\":{}}\n{\"id\":2,\"doc\":{}}\n"),
        Some("{\"id\":5,\"doc\":{}}\n{\"id\":4,\"doc\":{}}\n"),
        Some("{\"id\":7,\"doc\":{}}\n{\"id\":8,\"doc\"\n{\"id\":200,\"doc\":{}}\n"),
        None,
    ])
    .await;
    let events = MemoryEvents::granting();
    let settings = JobSettings {
        worker_id: "w".into(),
        part_bytes_max: 1 << 20,
        claim_timeout: std::time::Duration::from_secs(1),
        progress_interval: std::time::Duration::ZERO,
        snapshot_hold_max: std::time::Duration::from_secs(1),
        snapshot_check_interval: std::time::Duration::from_secs(1),
        hand_back_after: std::time::Duration::from_secs(900),
    };
    let outcome = verify_backup(
        &storage,
        &events,
        &settings,
        &job,
        0,
        &CancellationToken::new(),
    )
    .await
    .unwrap();
    assert_eq!(outcome, Outcome::Ack);
    let recorded = events.events();
    let progress = recorded
        .iter()
        .filter(|event| matches!(event, WorkerEvent::VerifyProgress(_)))
        .count();
    assert_eq!(progress, 5, "every part, then the end: {recorded:?}");
    let Some(WorkerEvent::VerifyDone(done)) = recorded.last() else {
        panic!("{recorded:?}");
    };
    assert_eq!((done.parts_checked, done.rows), (4, 7));
    let path = |part: u32| {
        let prefix = job.manifest_path.trim_end_matches("manifest.json");
        format!("{prefix}entities/ledger/000000-{part:04}-r1.jsonl.zst")
    };
    let expected = [
        format!(
            "{}: keys not strictly ascending at line 2 ('4' after '5')",
            path(1)
        ),
        format!(
            "{}: line 2 does not parse: EOF while parsing an object at line 1 column 13",
            path(2)
        ),
        format!(
            "{}: line 3: key '200' outside the chunk's range [0, 100)",
            path(2)
        ),
        format!("{}: missing", path(3)),
    ];
    assert_eq!(done.problems, expected);
}

#[test]
fn orders_numeric_and_uuid_keys_by_value() {
    let numeric = KeyOrder::Numeric;
    assert!(numeric.value("-10").unwrap() < numeric.value("9").unwrap());
    assert!(numeric.value("x").is_none());
    let uuid = KeyOrder::Uuid;
    let low = uuid.value("00000000-0000-0000-0000-000000000001").unwrap();
    let high = uuid.value("ffffffff-0000-0000-0000-000000000000").unwrap();
    let middle = uuid.value("7fffffff-ffff-ffff-ffff-ffffffffffff").unwrap();
    assert!(low < middle && middle < high);
    assert!(KeyOrder::Unchecked.value("a").is_none());
    let range = KeyRange {
        lo: Some("5".into()),
        hi: None,
    };
    assert_eq!(range_bounds(numeric, &range).unwrap(), (Some(5), None));
    assert_eq!(range_bounds(uuid, &range).unwrap_err(), "5");
}
