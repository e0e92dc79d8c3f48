//! The chunk writer: streams the rows of one part into archive storage.
//!
//! A [`PartWriter`] turns each row into one JSON line
//! (`{"id":<key>,"v":<version>,"doc":<document>}\n`), compresses the lines
//! into one zstd frame, hashes the compressed bytes with blake3 and uploads
//! them with an `object_store` multipart upload in
//! [`UPLOAD_PIECE_BYTES`](crate::storage::UPLOAD_PIECE_BYTES) pieces, waiting
//! for upload capacity before handing over more (backpressure reaches the row
//! stream). Memory stays bounded whatever the part size: one line buffer
//! (reused, as large as the largest row), [`LINE_BATCH_BYTES`] of lines handed
//! to zstd at once (one call per batch, not per row), the zstd context,
//! [`COMPRESSED_FLUSH_BYTES`] of compressed output, the upload piece being
//! filled and at most two pieces in flight. The object appears in storage only
//! when [`PartWriter::finish`] completes the upload.
//!
//! zstd contexts are kept between parts ([`ContextPool`]): a context is about
//! a megabyte, and allocating a fresh one for every part left the worker's
//! resident size growing with the number of parts written, not with the
//! number written at once.

use std::io::Write;
use std::sync::Mutex;

use koan_protocol::archive::PartInfo;
use koan_protocol::plan::EntitySpec;
use object_store::WriteMultipart;

use crate::error::WorkerError;
use crate::storage::Storage;

/// zstd level of every part: 1, the fastest standard level. Compressing is
/// most of a worker's CPU, and level 3 buys only a few percent of size on
/// JSON lines (see bench/RESULTS.md).
pub const ZSTD_LEVEL: i32 = 1;
/// JSON lines gathered before they are handed to zstd in one call.
pub const LINE_BATCH_BYTES: usize = 64 * 1024;
/// Compressed bytes gathered before they are hashed and handed to the upload.
pub const COMPRESSED_FLUSH_BYTES: usize = 256 * 1024;
/// Upload pieces in flight at once before writing waits.
const UPLOADS_IN_FLIGHT: usize = 2;

/// How a key is written in an archive line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyFormat {
    /// A JSON number, written as PostgreSQL printed it (`bigint`, `integer`).
    Number,
    /// A JSON string (`text`, `uuid`).
    String,
}

impl KeyFormat {
    /// The key format of an entity whose key type is resolved (strings when unknown).
    pub fn of(entity: &EntitySpec) -> Self {
        match entity.key_type {
            Some(key_type) if key_type.is_numeric() => Self::Number,
            _ => Self::String,
        }
    }
}

/// Appends one archive line for a row to `line` (which is not cleared).
///
/// `key` is the key's text form; `version` and `doc` are JSON text from the
/// source and are copied verbatim, except that line breaks (only ever
/// insignificant whitespace in valid JSON) become spaces so a line stays a line.
/// `versioned` says whether the entity has a version: then `"v"` is always
/// written (`null` when the row has none); otherwise it is omitted.
/// Returns the key as text.
pub fn encode_line<'key>(
    line: &mut Vec<u8>,
    key_format: KeyFormat,
    versioned: bool,
    key: &'key [u8],
    version: Option<&[u8]>,
    doc: &[u8],
) -> Result<&'key str, WorkerError> {
    let key_text = std::str::from_utf8(key)
        .map_err(|_| WorkerError::invalid_row(key, "key is not valid UTF-8"))?;
    line.extend_from_slice(b"{\"id\":");
    match key_format {
        KeyFormat::Number => {
            if !is_integer(key) {
                return Err(WorkerError::invalid_row(
                    key,
                    "numeric key is not an integer",
                ));
            }
            line.extend_from_slice(key);
        }
        KeyFormat::String => serde_json::to_writer(&mut *line, key_text)
            .map_err(|_| WorkerError::invalid_row(key, "key cannot be written as JSON"))?,
    }
    if versioned {
        line.extend_from_slice(b",\"v\":");
        match version {
            Some(version) if !version.is_empty() => push_json_text(line, version),
            _ => line.extend_from_slice(b"null"),
        }
    }
    if doc.is_empty() {
        return Err(WorkerError::invalid_row(key, "document is empty"));
    }
    line.extend_from_slice(b",\"doc\":");
    push_json_text(line, doc);
    line.extend_from_slice(b"}\n");
    Ok(key_text)
}

fn is_integer(key: &[u8]) -> bool {
    let digits = key.strip_prefix(b"-").unwrap_or(key);
    !digits.is_empty() && digits.iter().all(u8::is_ascii_digit)
}

fn push_json_text(line: &mut Vec<u8>, json: &[u8]) {
    if json.iter().any(|&byte| byte == b'\n' || byte == b'\r') {
        line.extend(json.iter().map(|&byte| match byte {
            b'\n' | b'\r' => b' ',
            other => other,
        }));
    } else {
        line.extend_from_slice(json);
    }
}

/// A zstd compression context at [`ZSTD_LEVEL`].
type Context = zstd::stream::raw::Encoder<'static>;
/// A context writing its frame into a buffer of compressed bytes.
type Compressor = zstd::stream::zio::Writer<Vec<u8>, Context>;

/// Idle zstd contexts, reused by the next part. Never holds more than
/// [`ContextPool::IDLE_MAX`]; a worker writes at most its concurrency's worth of
/// parts at once, so in steady state every part finds one here.
struct ContextPool {
    idle: Mutex<Vec<Context>>,
}

static CONTEXTS: ContextPool = ContextPool {
    idle: Mutex::new(Vec::new()),
};

impl ContextPool {
    const IDLE_MAX: usize = 16;

    fn idle(&self) -> std::sync::MutexGuard<'_, Vec<Context>> {
        self.idle
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A context ready for a new frame.
    fn take(&self) -> std::io::Result<Context> {
        let idle = self.idle().pop();
        match idle {
            Some(mut context) => {
                // A context given back by an aborted part may be mid-frame.
                zstd::stream::raw::Operation::reinit(&mut context)?;
                Ok(context)
            }
            None => Context::new(ZSTD_LEVEL),
        }
    }

    fn give_back(&self, context: Context) {
        let mut idle = self.idle();
        if idle.len() < Self::IDLE_MAX {
            idle.push(context);
        }
    }
}

/// Writes one part: JSON lines → zstd → blake3 + multipart upload.
pub struct PartWriter {
    part: u32,
    path: String,
    key_format: KeyFormat,
    versioned: bool,
    encoder: Compressor,
    upload: WriteMultipart,
    hasher: blake3::Hasher,
    line: Vec<u8>,
    /// Lines not yet handed to zstd.
    batch: Vec<u8>,
    rows: u64,
    raw_bytes: u64,
    compressed_bytes: u64,
    first_key: Option<String>,
    last_key: String,
}

impl std::fmt::Debug for PartWriter {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("PartWriter")
            .field("path", &self.path)
            .field("rows", &self.rows)
            .field("raw_bytes", &self.raw_bytes)
            .field("compressed_bytes", &self.compressed_bytes)
            .finish_non_exhaustive()
    }
}

impl PartWriter {
    /// Starts part number `part` at archive path `path` for rows of `entity`.
    pub async fn create(
        storage: &Storage,
        entity: &EntitySpec,
        part: u32,
        path: String,
    ) -> Result<Self, WorkerError> {
        // The context first: nothing to abort if it fails (if the upload
        // cannot start, the context is simply freed).
        let context = CONTEXTS.take().map_err(WorkerError::Compress)?;
        let upload = storage.multipart(&path).await?;
        let encoder = Compressor::new(
            Vec::with_capacity(COMPRESSED_FLUSH_BYTES + 64 * 1024),
            context,
        );
        Ok(Self {
            part,
            path,
            key_format: KeyFormat::of(entity),
            versioned: entity.version.is_some(),
            encoder,
            upload,
            hasher: blake3::Hasher::new(),
            line: Vec::with_capacity(4096),
            batch: Vec::with_capacity(LINE_BATCH_BYTES + 4096),
            rows: 0,
            raw_bytes: 0,
            compressed_bytes: 0,
            first_key: None,
            last_key: String::new(),
        })
    }

    /// Appends one row; returns the bytes of its JSON line.
    pub async fn write_row(
        &mut self,
        key: &[u8],
        version: Option<&[u8]>,
        doc: &[u8],
    ) -> Result<u64, WorkerError> {
        self.line.clear();
        let key_text = encode_line(
            &mut self.line,
            self.key_format,
            self.versioned,
            key,
            version,
            doc,
        )?;
        self.batch.extend_from_slice(&self.line);
        if self.batch.len() >= LINE_BATCH_BYTES {
            self.compress_batch()?;
        }
        let line_bytes = self.line.len() as u64;
        self.rows += 1;
        self.raw_bytes += line_bytes;
        if self.first_key.is_none() {
            self.first_key = Some(key_text.to_string());
        }
        self.last_key.clear();
        self.last_key.push_str(key_text);
        if self.encoder.writer().len() >= COMPRESSED_FLUSH_BYTES {
            self.flush_compressed().await?;
        }
        Ok(line_bytes)
    }

    /// Part number.
    pub fn part(&self) -> u32 {
        self.part
    }

    /// Rows written so far.
    pub fn rows(&self) -> u64 {
        self.rows
    }

    /// Bytes of JSON lines written so far.
    pub fn raw_bytes(&self) -> u64 {
        self.raw_bytes
    }

    /// Hands the gathered lines to zstd.
    fn compress_batch(&mut self) -> Result<(), WorkerError> {
        self.encoder
            .write_all(&self.batch)
            .map_err(WorkerError::Compress)?;
        self.batch.clear();
        Ok(())
    }

    async fn flush_compressed(&mut self) -> Result<(), WorkerError> {
        self.upload
            .wait_for_capacity(UPLOADS_IN_FLIGHT)
            .await
            .map_err(WorkerError::storage("multipart upload", &self.path))?;
        let compressed = self.encoder.writer_mut();
        self.hasher.update(compressed);
        self.upload.write(compressed);
        self.compressed_bytes += compressed.len() as u64;
        compressed.clear();
        Ok(())
    }

    /// Ends the zstd frame, completes the upload (the object appears now) and
    /// describes the part. On error the upload is aborted.
    pub async fn finish(mut self) -> Result<PartInfo, WorkerError> {
        if let Err(error) = self.compress_batch() {
            self.abort().await;
            return Err(error);
        }
        if let Err(error) = self.encoder.finish() {
            self.abort().await;
            return Err(WorkerError::Compress(error));
        }
        if let Err(error) = self.flush_compressed().await {
            self.abort().await;
            return Err(error);
        }
        let Self {
            part,
            path,
            encoder,
            upload,
            hasher,
            rows,
            raw_bytes,
            compressed_bytes,
            first_key,
            last_key,
            ..
        } = self;
        CONTEXTS.give_back(encoder.into_inner().1);
        // WriteMultipart::finish aborts the upload itself when it fails.
        upload
            .finish()
            .await
            .map_err(WorkerError::storage("complete upload", &path))?;
        Ok(PartInfo {
            part,
            path,
            last_key: first_key.as_ref().map(|_| last_key),
            first_key,
            rows,
            raw_bytes,
            compressed_bytes,
            blake3: hasher.finalize().to_hex().to_string(),
        })
    }

    /// Abandons the part: nothing becomes visible in storage.
    pub async fn abort(self) {
        CONTEXTS.give_back(self.encoder.into_inner().1);
        if let Err(error) = self.upload.abort().await {
            tracing::warn!(path = %self.path, %error, "aborting part upload");
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::sync::Arc;

    use koan_protocol::archive::ArchiveLine;
    use koan_protocol::plan::{BackupEntity, BackupPlan, KeyType};
    use object_store::local::LocalFileSystem;

    use super::*;

    fn line(
        format: KeyFormat,
        versioned: bool,
        key: &[u8],
        version: Option<&[u8]>,
        doc: &[u8],
    ) -> String {
        let mut out = Vec::new();
        encode_line(&mut out, format, versioned, key, version, doc).unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn encodes_lines() {
        assert_eq!(
            line(KeyFormat::Number, false, b"-42", None, br#"{"a":1}"#),
            "{\"id\":-42,\"doc\":{\"a\":1}}\n"
        );
        assert_eq!(
            line(KeyFormat::String, true, b"k", Some(b"7"), b"{}"),
            "{\"id\":\"k\",\"v\":7,\"doc\":{}}\n"
        );
        assert_eq!(
            line(KeyFormat::String, true, b"k", None, b"{}"),
            "{\"id\":\"k\",\"v\":null,\"doc\":{}}\n"
        );
        let hostile = "a\"b\\c\nd\u{1}é🦀\u{2028}";
        let encoded = line(
            KeyFormat::String,
            false,
            hostile.as_bytes(),
            None,
            b"{\n\"x\":\r\n1}",
        );
        assert!(
            encoded.ends_with("}\n") && encoded.matches('\n').count() == 1,
            "{encoded}"
        );
        let parsed: ArchiveLine = serde_json::from_str(&encoded).unwrap();
        assert_eq!(parsed.id, serde_json::Value::String(hostile.to_string()));
        assert_eq!(parsed.doc.get(), "{ \"x\":  1}");
        let mut out = Vec::new();
        for (format, key, doc) in [
            (KeyFormat::Number, &b"12a"[..], &b"{}"[..]),
            (KeyFormat::Number, b"", b"{}"),
            (KeyFormat::String, b"\xff", b"{}"),
            (KeyFormat::String, b"k", b""),
        ] {
            let error = encode_line(&mut out, format, false, key, None, doc).unwrap_err();
            assert_eq!(error.code(), "invalid_row");
        }
    }

    fn temp_storage() -> (Storage, std::path::PathBuf) {
        let directory = std::env::temp_dir().join(format!("koan-writer-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&directory).unwrap();
        let store = LocalFileSystem::new_with_prefix(&directory).unwrap();
        (Storage::from_store(Arc::new(store)), directory)
    }

    fn entity(key_type: KeyType, versioned: bool) -> EntitySpec {
        let mut entity = BackupEntity::new("orders", "Order");
        if versioned {
            entity = entity.version("$.v");
        }
        let mut spec = BackupPlan::new("p").entity(entity).entity_specs().remove(0);
        spec.key_type = Some(key_type);
        spec
    }

    async fn read_part(storage: &Storage, info: &PartInfo) -> Vec<ArchiveLine> {
        let stored = storage.get(&info.path).await.unwrap();
        assert_eq!(stored.len() as u64, info.compressed_bytes);
        assert_eq!(blake3::hash(&stored).to_hex().to_string(), info.blake3);
        let raw = zstd::decode_all(stored.as_ref()).unwrap();
        assert_eq!(raw.len() as u64, info.raw_bytes);
        let text = String::from_utf8(raw).unwrap();
        let lines: Vec<ArchiveLine> = text
            .lines()
            .map(|line| serde_json::from_str(line).unwrap())
            .collect();
        assert_eq!(lines.len() as u64, info.rows);
        lines
    }

    #[tokio::test]
    async fn writes_a_verifiable_part() {
        let (storage, directory) = temp_storage();
        let spec = entity(KeyType::Text, true);
        let mut writer = PartWriter::create(
            &storage,
            &spec,
            3,
            "b/s/p/e/000001-0003-r1.jsonl.zst".into(),
        )
        .await
        .unwrap();
        let keys: Vec<String> = (0..2_000).map(|n| format!("key \"{n:05}\" ü\t")).collect();
        for (n, key) in keys.iter().enumerate() {
            let doc = format!(r#"{{"n":{n},"text":"line\\nbreak"}}"#);
            let version = n.to_string();
            writer
                .write_row(key.as_bytes(), Some(version.as_bytes()), doc.as_bytes())
                .await
                .unwrap();
        }
        let info = writer.finish().await.unwrap();
        assert_eq!((info.part, info.rows), (3, 2_000));
        assert_eq!(info.first_key.as_deref(), Some(keys[0].as_str()));
        assert_eq!(info.last_key.as_deref(), Some(keys[1_999].as_str()));
        let lines = read_part(&storage, &info).await;
        assert_eq!(lines[7].id, serde_json::Value::String(keys[7].clone()));
        assert_eq!(lines[7].v, Some(serde_json::json!(7)));
        assert_eq!(lines[7].doc.get(), r#"{"n":7,"text":"line\\nbreak"}"#);
        std::fs::remove_dir_all(directory).unwrap();
    }

    #[tokio::test]
    async fn streams_large_documents_in_pieces() {
        let (storage, directory) = temp_storage();
        let spec = entity(KeyType::Bigint, false);
        let mut writer = PartWriter::create(&storage, &spec, 0, "b/big.jsonl.zst".into())
            .await
            .unwrap();
        // 5 MiB of poorly compressible text per document: three rows span several upload pieces.
        let mut state = 0x9e37_79b9_7f4a_7c15_u64;
        let mut doc = String::from("{\"blob\":\"");
        while doc.len() < 5 * 1024 * 1024 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            doc.push(char::from(b'a' + (state % 26) as u8));
        }
        doc.push_str("\"}");
        for key in ["1", "2", "30000000000"] {
            writer
                .write_row(key.as_bytes(), None, doc.as_bytes())
                .await
                .unwrap();
        }
        let info = writer.finish().await.unwrap();
        assert!(
            info.compressed_bytes > 4 * crate::storage::UPLOAD_PIECE_BYTES as u64,
            "{info:?}"
        );
        let lines = read_part(&storage, &info).await;
        assert_eq!(lines[2].id, serde_json::json!(30_000_000_000_u64));
        assert!(lines[2].v.is_none());
        assert_eq!(lines[1].doc.get().len(), doc.len());
        std::fs::remove_dir_all(directory).unwrap();
    }

    #[tokio::test]
    async fn aborted_parts_leave_nothing() {
        let (storage, directory) = temp_storage();
        let spec = entity(KeyType::Uuid, false);
        let mut writer = PartWriter::create(&storage, &spec, 0, "b/gone.jsonl.zst".into())
            .await
            .unwrap();
        writer
            .write_row(b"0190c7a4-0000-7000-8000-000000000000", None, b"{}")
            .await
            .unwrap();
        writer.abort().await;
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(storage.list("b").await.unwrap().is_empty());
        let leftovers = walk(&directory);
        assert!(leftovers.is_empty(), "{leftovers:?}");
        std::fs::remove_dir_all(directory).unwrap();
    }

    fn walk(directory: &std::path::Path) -> Vec<std::path::PathBuf> {
        let mut files = Vec::new();
        for entry in std::fs::read_dir(directory).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                files.extend(walk(&path));
            } else {
                files.push(path);
            }
        }
        files
    }
}
