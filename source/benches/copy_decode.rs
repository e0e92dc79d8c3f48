//! Binary COPY decoding: the parser of `src/postgres/copy.rs`, compiled into
//! this bench as it is (it is crate-private), over a stream of Koan rows
//! (key, version, document as text, as the export query selects them).
//!
//! Two feeds: one message per row, as PostgreSQL sends `COPY TO STDOUT`
//! (one CopyData per tuple, which is what the worker receives), and 64 KiB
//! slices. "parse + utf8" adds the UTF-8 checks `ExportRow::from_fields` does
//! on every row.
//!
//! `cargo bench -p koan-source --bench copy_decode`

#![allow(missing_docs, clippy::unwrap_used)]

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};

/// Stands in for `crate::error` of koan-source: what copy.rs (and its unit
/// tests, which cargo compiles into benches too) use of `SourceError`.
#[allow(dead_code)]
mod error {
    #[derive(Debug)]
    pub struct SourceError(pub String);

    impl SourceError {
        pub fn decode(reason: impl Into<String>) -> Self {
            Self(reason.into())
        }

        pub fn code(&self) -> &'static str {
            "decode"
        }
    }

    impl std::fmt::Display for SourceError {
        fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            formatter.write_str(&self.0)
        }
    }
}

#[allow(dead_code, unreachable_pub)]
#[path = "../src/postgres/copy.rs"]
mod copy;

use copy::CopyParser;

const ROWS: usize = 10_000;

/// A Koan order document of ~330 bytes, as `jsonb::text` prints it.
fn document(i: usize) -> String {
    format!(
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
}

/// The stream as messages: the header, one tuple each, the trailer.
fn messages() -> Vec<Vec<u8>> {
    let mut header = b"PGCOPY\n\xff\r\n\0".to_vec();
    header.extend_from_slice(&0u32.to_be_bytes());
    header.extend_from_slice(&0u32.to_be_bytes());
    let mut out = vec![header];
    for i in 0..ROWS {
        let key = format!("order-{:010}", i + 1);
        let version = (1 + i % 3).to_string();
        let doc = document(i);
        let mut tuple = 3i16.to_be_bytes().to_vec();
        for field in [key.as_bytes(), version.as_bytes(), doc.as_bytes()] {
            tuple.extend_from_slice(&i32::try_from(field.len()).unwrap().to_be_bytes());
            tuple.extend_from_slice(field);
        }
        out.push(tuple);
    }
    out.push((-1i16).to_be_bytes().to_vec());
    out
}

fn decode(chunks: &[&[u8]], check_utf8: bool) -> usize {
    let mut parser = CopyParser::<3>::new();
    let mut bytes = 0;
    for chunk in chunks {
        parser.push(chunk).unwrap();
        while let Some(fields) = parser.next_tuple().unwrap() {
            if check_utf8 {
                for field in fields.iter().flatten() {
                    std::str::from_utf8(field).unwrap();
                }
            }
            bytes += fields[2].as_ref().map_or(0, |doc| doc.len());
        }
    }
    parser.finish().unwrap();
    bytes
}

fn copy_decode(c: &mut Criterion) {
    let messages = messages();
    let stream: Vec<u8> = messages.concat();
    let per_row: Vec<&[u8]> = messages.iter().map(Vec::as_slice).collect();
    let slices: Vec<&[u8]> = stream.chunks(64 * 1024).collect();

    let mut group = c.benchmark_group("copy binary decode (10,000 rows)");
    group.throughput(Throughput::Bytes(stream.len() as u64));
    group.bench_function("parse, one message per row", |b| {
        b.iter(|| decode(black_box(&per_row), false))
    });
    group.bench_function("parse + utf8, one message per row", |b| {
        b.iter(|| decode(black_box(&per_row), true))
    });
    group.bench_function("parse, 64 KiB slices", |b| {
        b.iter(|| decode(black_box(&slices), false))
    });
    group.finish();
}

criterion_group!(benches, copy_decode);
criterion_main!(benches);
