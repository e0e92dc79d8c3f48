//! Reading archives back in tests: manifest, parts, lines, hashes.

use std::collections::BTreeMap;
use std::path::Path;

use koan_protocol::archive::Manifest;

/// One decoded archive line.
#[derive(Debug, Clone)]
pub struct Line {
    /// The key as JSON.
    pub id: serde_json::Value,
    /// The version, if any.
    pub v: Option<serde_json::Value>,
    /// The document.
    pub doc: serde_json::Value,
}

/// Reads and parses the manifest at `path` under `storage`.
pub fn manifest(storage: &Path, path: &str) -> Manifest {
    let bytes = std::fs::read(storage.join(path))
        .unwrap_or_else(|error| panic!("reading manifest {path}: {error}"));
    serde_json::from_slice(&bytes)
        .unwrap_or_else(|error| panic!("parsing manifest {path}: {error}"))
}

/// Reads every part of the manifest, checking hash, sizes and row counts
/// against it; returns the lines per entity, in archive order.
pub fn read_all(storage: &Path, manifest: &Manifest) -> BTreeMap<String, Vec<Line>> {
    let mut out: BTreeMap<String, Vec<Line>> = BTreeMap::new();
    for (entity, _chunk, part) in manifest.parts() {
        let bytes = std::fs::read(storage.join(&part.path))
            .unwrap_or_else(|error| panic!("reading {}: {error}", part.path));
        assert_eq!(
            bytes.len() as u64,
            part.compressed_bytes,
            "compressed size of {}",
            part.path
        );
        assert_eq!(
            blake3::hash(&bytes).to_hex().to_string(),
            part.blake3,
            "hash of {}",
            part.path
        );
        let raw = zstd::decode_all(bytes.as_slice()).expect("decompressing a part");
        assert_eq!(
            raw.len() as u64,
            part.raw_bytes,
            "raw size of {}",
            part.path
        );
        let text = std::str::from_utf8(&raw).expect("utf-8 part");
        let mut rows = 0;
        let lines = out.entry(entity.spec.name.clone()).or_default();
        for line in text.lines() {
            let value: serde_json::Value = serde_json::from_str(line)
                .unwrap_or_else(|error| panic!("line in {}: {error}: {line:.200}", part.path));
            lines.push(Line {
                id: value["id"].clone(),
                v: value.get("v").cloned(),
                doc: value["doc"].clone(),
            });
            rows += 1;
        }
        assert!(
            text.is_empty() || text.ends_with('\n'),
            "part {} does not end with a newline",
            part.path
        );
        assert_eq!(rows, part.rows, "rows of {}", part.path);
    }
    for entity in &manifest.entities {
        let rows: u64 = entity.chunks.iter().map(|chunk| chunk.rows).sum();
        assert_eq!(rows, entity.rows, "rows of entity {}", entity.spec.name);
        let part_rows: u64 = entity
            .chunks
            .iter()
            .flat_map(|chunk| &chunk.parts)
            .map(|part| part.rows)
            .sum();
        assert_eq!(
            part_rows, entity.rows,
            "part rows of entity {}",
            entity.spec.name
        );
    }
    let total: u64 = manifest.entities.iter().map(|entity| entity.rows).sum();
    assert_eq!(total, manifest.totals.rows, "manifest totals");
    out
}

/// The key of a line as text (strings unquoted, numbers as digits).
pub fn key_text(line: &Line) -> String {
    match &line.id {
        serde_json::Value::String(text) => text.clone(),
        other => other.to_string(),
    }
}
