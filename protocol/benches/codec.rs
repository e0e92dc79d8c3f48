//! The msgpack envelope codec (`src/codec.rs`) on the messages a backup sends
//! most: one `export_chunk` job per chunk, and per part a `chunk_progress` and
//! a `part_written` event.
//!
//! `cargo bench -p koan-protocol --bench codec`

#![allow(missing_docs, clippy::unwrap_used)]

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use koan_protocol::archive::{KeyRange, PartInfo};
use koan_protocol::codec::{decode, encode};
use koan_protocol::events::{ChunkProgress, PartWritten, WorkerEvent};
use koan_protocol::jobs::{ExportChunk, Job};
use koan_protocol::plan::{BackupEntity, BackupPlan, KeyType};
use uuid::Uuid;

fn export_chunk() -> Job {
    let plan = BackupPlan::new("orders:daily").entity(
        BackupEntity::new("orders", "Order")
            .in_scope("orders", "tenant-a")
            .version("$.version")
            .chunk_rows(100_000),
    );
    let mut entity = plan.entity_specs().remove(0);
    entity.key_type = Some(KeyType::Text);
    Job::ExportChunk(ExportChunk {
        operation_id: Uuid::now_v7(),
        plan_id: plan.plan_id.clone(),
        backup_id: Uuid::now_v7(),
        entity,
        chunk: 17,
        range: KeyRange {
            lo: Some("order-0001700001".into()),
            hi: Some("order-0001800001".into()),
        },
        snapshot_id: Some("00000004-0000002A-1".into()),
        attempt: 1,
        part_bytes: 16 * 1024 * 1024,
    })
}

fn part_written() -> WorkerEvent {
    WorkerEvent::PartWritten(PartWritten {
        operation_id: Uuid::now_v7(),
        entity: "orders".into(),
        chunk: 17,
        run: "a1b2c3d4e5f6".into(),
        part: PartInfo {
            part: 3,
            path: "orders/tenant-a/orders:daily/0193a3c0-0000-7000-8000-000000000000/orders/000017-0003-a1b2c3d4e5f6.jsonl.zst".into(),
            first_key: Some("order-0001730001".into()),
            last_key: Some("order-0001779999".into()),
            rows: 49_999,
            raw_bytes: 16_777_000,
            compressed_bytes: 2_100_000,
            blake3: "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262".into(),
        },
    })
}

fn chunk_progress() -> WorkerEvent {
    WorkerEvent::ChunkProgress(ChunkProgress {
        operation_id: Uuid::now_v7(),
        entity: "orders".into(),
        chunk: 17,
        run: "a1b2c3d4e5f6".into(),
        rows_pending: 31_337,
        raw_bytes_pending: 10_500_000,
    })
}

fn codec(c: &mut Criterion) {
    let mut group = c.benchmark_group("msgpack");
    let job = export_chunk();
    let job_bytes = encode(&job).unwrap();
    group.bench_function("encode export_chunk", |b| {
        b.iter(|| encode(black_box(&job)).unwrap())
    });
    group.bench_function("decode export_chunk", |b| {
        b.iter(|| decode::<Job>(black_box(&job_bytes)).unwrap())
    });
    for (name, event) in [
        ("part_written", part_written()),
        ("chunk_progress", chunk_progress()),
    ] {
        let bytes = encode(&event).unwrap();
        group.bench_function(format!("encode {name}"), |b| {
            b.iter(|| encode(black_box(&event)).unwrap())
        });
        group.bench_function(format!("decode {name}"), |b| {
            b.iter(|| decode::<WorkerEvent>(black_box(&bytes)).unwrap())
        });
    }
    group.finish();
}

criterion_group!(benches, codec);
criterion_main!(benches);
