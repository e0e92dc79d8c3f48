//! Archive lines: building them on backup (`chunk_writer::encode_line`),
//! parsing them on restore (`archive_line::parse_line`), and for scale the
//! two stages every line then goes through on backup, zstd (level
//! `ZSTD_LEVEL`) and blake3 of the compressed bytes.
//!
//! `cargo bench -p koan-worker --bench archive_line`

#![allow(missing_docs, clippy::unwrap_used)]

use std::hint::black_box;
use std::io::Write;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use koan_protocol::plan::KeyType;
use koan_worker::archive_line::parse_line;
use koan_worker::chunk_writer::{KeyFormat, ZSTD_LEVEL, encode_line};

const ROWS: usize = 10_000;

struct Row {
    key: Vec<u8>,
    version: Vec<u8>,
    doc: Vec<u8>,
}

/// Koan orders of ~330 bytes, as `jsonb::text` prints them.
fn rows() -> Vec<Row> {
    (0..ROWS)
        .map(|i| Row {
            key: format!("order-{:010}", i + 1).into_bytes(),
            version: (1 + i % 3).to_string().into_bytes(),
            doc: format!(
                r#"{{"city": "Lyon", "lines": [{{"qty": {}, "sku": "SKU-{}", "price": {}.36}}, {{"qty": 2, "sku": "SKU-17", "price": 1.02}}], "total": {}.97, "status": "paid", "payment": {{"ref": "c4ca4238a0", "method": "invoice"}}, "version": {}, "customer": {{"id": "cust-{}", "email": "c{}@example.com"}}, "createdAt": "2024-01-01T00:00:01Z", "__koan_tenant": "tenant-{}"}}"#,
                1 + i % 4,
                i * 131 % 5000,
                i % 200,
                i % 900,
                1 + i % 3,
                i * 7919 % 100_003,
                i * 7919 % 100_003,
                i % 7
            )
            .into_bytes(),
        })
        .collect()
}

fn build(rows: &[Row], out: &mut Vec<u8>) {
    out.clear();
    for row in rows {
        encode_line(
            out,
            KeyFormat::String,
            true,
            &row.key,
            Some(&row.version),
            &row.doc,
        )
        .unwrap();
    }
}

fn archive_line(c: &mut Criterion) {
    let rows = rows();
    let mut lines = Vec::new();
    build(&rows, &mut lines);

    let mut group = c.benchmark_group("archive lines (10,000 rows)");
    group.throughput(Throughput::Bytes(lines.len() as u64));
    let mut out = Vec::with_capacity(lines.len());
    group.bench_function("encode_line", |b| {
        b.iter(|| build(black_box(&rows), &mut out))
    });
    group.bench_function("parse_line", |b| {
        b.iter(|| {
            for line in lines
                .split(|&byte| byte == b'\n')
                .filter(|line| !line.is_empty())
            {
                black_box(parse_line(black_box(line), Some(KeyType::Text)).unwrap());
            }
        })
    });
    let mut compressed = Vec::new();
    group.bench_function("zstd level 3 (streaming, 64 KiB writes)", |b| {
        b.iter(|| {
            compressed.clear();
            let mut encoder = zstd::Encoder::new(&mut compressed, ZSTD_LEVEL).unwrap();
            for piece in lines.chunks(64 * 1024) {
                encoder.write_all(piece).unwrap();
            }
            encoder.finish().unwrap();
        })
    });
    group.bench_function("blake3 of the lines", |b| {
        b.iter(|| blake3::hash(black_box(&lines)))
    });
    group.finish();
}

criterion_group!(benches, archive_line);
criterion_main!(benches);
