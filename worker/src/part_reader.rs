//! The part reader: one stored part streamed back as lines.
//!
//! storage → blake3 and byte count of the compressed bytes → streaming zstd
//! decoder → lines split at `\n`. Import and verify read parts through here
//! only. Memory stays bounded whatever the part size: one storage piece
//! (8 KiB from the local backend), the zstd context and its window (2 MiB at
//! our level, capped by zstd's default 128 MiB limit for foreign frames) and a
//! buffer as large as the longest line plus [`DECODE_BYTES`]. A line longer
//! than [`MAX_LINE_BYTES`] makes the part corrupt rather than the worker
//! run out of memory.
//!
//! The reader does not judge a part: [`PartReader::finish`] returns what it
//! found, a [`PartDigest`], and [`PartDigest::mismatches`] compares that with
//! the manifest's [`PartInfo`]. A part that fails to decompress can still be
//! finished: the rest of its bytes are hashed without decoding, so a caller
//! can tell a damaged file (hash mismatch) from an archive written broken.

use futures::StreamExt;
use koan_protocol::archive::PartInfo;
use zstd::stream::raw::{Decoder, InBuffer, Operation, OutBuffer};

use crate::error::WorkerError;
use crate::storage::{ByteStream, Storage};

/// Decompressed bytes produced per decoder step, at least.
pub const DECODE_BYTES: usize = 256 * 1024;
/// Longest line accepted (PostgreSQL's own limit on a jsonb value is 255 MiB).
pub const MAX_LINE_BYTES: usize = 512 * 1024 * 1024;

/// One line of a part, without its `\n`.
#[derive(Debug, Clone, Copy)]
pub struct PartLine<'a> {
    /// Line number in the part, from 1.
    pub number: u64,
    /// The line's bytes (not checked to be UTF-8).
    pub bytes: &'a [u8],
}

/// What reading a part found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartDigest {
    /// blake3 of the stored bytes, hex.
    pub blake3: String,
    /// Stored (compressed) bytes read.
    pub compressed_bytes: u64,
    /// Decompressed bytes, `\n` included.
    pub raw_bytes: u64,
    /// Lines.
    pub lines: u64,
    /// Whether the part decompressed to its end; when false, `raw_bytes`
    /// and `lines` count only what was read before the problem.
    pub complete: bool,
}

/// A difference between a part as read and as the manifest describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mismatch {
    /// Stable code: `size_mismatch`, `hash_mismatch` or `row_count_mismatch`.
    pub code: &'static str,
    /// What differs, with expected and found values.
    pub detail: String,
}

impl PartDigest {
    /// Every difference from `expected`, most telling first: stored size,
    /// hash, then (only when the part decompressed to its end) rows and raw size.
    pub fn mismatches(&self, expected: &PartInfo) -> Vec<Mismatch> {
        let mut found = Vec::new();
        if self.compressed_bytes != expected.compressed_bytes {
            found.push(Mismatch {
                code: "size_mismatch",
                detail: format!(
                    "size mismatch: expected {} bytes, found {}",
                    expected.compressed_bytes, self.compressed_bytes
                ),
            });
        }
        if !self.blake3.eq_ignore_ascii_case(&expected.blake3) {
            found.push(Mismatch {
                code: "hash_mismatch",
                detail: format!(
                    "hash mismatch: expected blake3 {}, found {}",
                    expected.blake3, self.blake3
                ),
            });
        }
        if !self.complete {
            return found;
        }
        if self.lines != expected.rows {
            found.push(Mismatch {
                code: "row_count_mismatch",
                detail: format!(
                    "row count mismatch: expected {} rows, found {}",
                    expected.rows, self.lines
                ),
            });
        }
        if self.raw_bytes != expected.raw_bytes {
            found.push(Mismatch {
                code: "size_mismatch",
                detail: format!(
                    "raw size mismatch: expected {} bytes of lines, found {}",
                    expected.raw_bytes, self.raw_bytes
                ),
            });
        }
        found
    }
}

/// Streams one part: hashes and counts the stored bytes, decompresses them
/// and hands out lines one at a time.
pub struct PartReader {
    path: String,
    stored_bytes: u64,
    stream: ByteStream,
    stream_done: bool,
    /// The storage piece being decoded, and how far.
    piece: bytes::Bytes,
    piece_pos: usize,
    decoder: Decoder<'static>,
    /// The last decoder step filled the buffer: zstd may hold more output.
    output_full: bool,
    /// The last decoder step ended a frame.
    frame_done: bool,
    hasher: blake3::Hasher,
    compressed_bytes: u64,
    /// Decompressed bytes: the line being assembled from `line_start`,
    /// searched for `\n` up to `scanned`.
    buffer: Vec<u8>,
    line_start: usize,
    scanned: usize,
    raw_bytes: u64,
    lines: u64,
    exhausted: bool,
    failed: bool,
}

impl std::fmt::Debug for PartReader {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("PartReader")
            .field("path", &self.path)
            .field("compressed_bytes", &self.compressed_bytes)
            .field("raw_bytes", &self.raw_bytes)
            .field("lines", &self.lines)
            .finish_non_exhaustive()
    }
}

impl PartReader {
    /// Opens the part at `path`; a missing object is an error for which
    /// [`WorkerError::is_not_found`] holds.
    pub async fn open(storage: &Storage, path: &str) -> Result<Self, WorkerError> {
        let (stored_bytes, stream) = storage.get_stream(path).await?;
        Self::from_stream(path, stored_bytes, stream)
    }

    /// Reads a part from any byte stream; `stored_bytes` is the size storage announced.
    pub fn from_stream(
        path: impl Into<String>,
        stored_bytes: u64,
        stream: ByteStream,
    ) -> Result<Self, WorkerError> {
        let path = path.into();
        let decoder = Decoder::new().map_err(|error| WorkerError::CorruptPart {
            path: path.clone(),
            reason: format!("no zstd decoder could be created: {error}"),
        })?;
        Ok(Self {
            path,
            stored_bytes,
            stream,
            stream_done: false,
            piece: bytes::Bytes::new(),
            piece_pos: 0,
            decoder,
            output_full: false,
            frame_done: false,
            hasher: blake3::Hasher::new(),
            compressed_bytes: 0,
            buffer: Vec::with_capacity(DECODE_BYTES),
            line_start: 0,
            scanned: 0,
            raw_bytes: 0,
            lines: 0,
            exhausted: false,
            failed: false,
        })
    }

    /// The part's storage path.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// The size storage announced for the object, known before reading.
    pub fn stored_bytes(&self) -> u64 {
        self.stored_bytes
    }

    /// Lines handed out so far.
    pub fn lines(&self) -> u64 {
        self.lines
    }

    /// Decompressed bytes handed out so far, `\n` included.
    pub fn raw_bytes(&self) -> u64 {
        self.raw_bytes
    }

    /// The next line; `None` at the end of the part. A last line without
    /// `\n` is still a line. After an error, call only [`Self::finish`].
    pub async fn next_line(&mut self) -> Result<Option<PartLine<'_>>, WorkerError> {
        loop {
            if let Some(offset) = self.buffer[self.scanned..]
                .iter()
                .position(|&byte| byte == b'\n')
            {
                let end = self.scanned + offset;
                let start = self.line_start;
                self.line_start = end + 1;
                self.scanned = end + 1;
                return Ok(Some(self.emit(start, end, end + 1 - start)));
            }
            self.scanned = self.buffer.len();
            if self.scanned - self.line_start > MAX_LINE_BYTES {
                return Err(self.corrupt(format!(
                    "line {} is longer than {MAX_LINE_BYTES} bytes",
                    self.lines + 1
                )));
            }
            if !self.fill().await? {
                self.exhausted = true;
                if self.line_start < self.buffer.len() {
                    let (start, end) = (self.line_start, self.buffer.len());
                    self.line_start = end;
                    self.scanned = end;
                    return Ok(Some(self.emit(start, end, end - start)));
                }
                return Ok(None);
            }
        }
    }

    /// Reads what is left of the stored bytes (hashing, not decoding) and
    /// describes the part.
    pub async fn finish(mut self) -> Result<PartDigest, WorkerError> {
        while !self.stream_done {
            self.next_piece().await?;
        }
        Ok(PartDigest {
            blake3: self.hasher.finalize().to_hex().to_string(),
            compressed_bytes: self.compressed_bytes,
            raw_bytes: self.raw_bytes,
            lines: self.lines,
            complete: self.exhausted && !self.failed,
        })
    }

    fn emit(&mut self, start: usize, end: usize, raw: usize) -> PartLine<'_> {
        self.lines += 1;
        self.raw_bytes += raw as u64;
        PartLine {
            number: self.lines,
            bytes: &self.buffer[start..end],
        }
    }

    /// Decodes more bytes into the buffer; false once the part has no more.
    async fn fill(&mut self) -> Result<bool, WorkerError> {
        if self.line_start > 0 {
            self.buffer.drain(..self.line_start);
            self.scanned -= self.line_start;
            self.line_start = 0;
        }
        loop {
            if self.piece_pos < self.piece.len() || self.output_full {
                if self.decode()? > 0 {
                    return Ok(true);
                }
                continue;
            }
            if self.stream_done {
                return if self.frame_done {
                    Ok(false)
                } else if self.compressed_bytes == 0 {
                    Err(self.corrupt("it is empty".into()))
                } else {
                    Err(self.corrupt("it ends in the middle of a zstd frame (truncated)".into()))
                };
            }
            self.next_piece().await?;
            tokio::task::consume_budget().await;
        }
    }

    /// Takes the next storage piece into the hash and the count.
    async fn next_piece(&mut self) -> Result<(), WorkerError> {
        match self.stream.next().await {
            Some(Ok(piece)) => {
                self.hasher.update(&piece);
                self.compressed_bytes += piece.len() as u64;
                self.piece = piece;
                self.piece_pos = 0;
                Ok(())
            }
            Some(Err(source)) => Err(WorkerError::storage("get", &self.path)(source)),
            None => {
                self.stream_done = true;
                self.piece = bytes::Bytes::new();
                self.piece_pos = 0;
                Ok(())
            }
        }
    }

    /// One decoder step; returns the bytes it produced.
    fn decode(&mut self) -> Result<usize, WorkerError> {
        self.buffer.reserve(DECODE_BYTES);
        let before = self.buffer.len();
        let mut input = InBuffer::around(&self.piece);
        input.set_pos(self.piece_pos);
        let stepped = {
            let mut output = OutBuffer::around_pos(&mut self.buffer, before);
            self.decoder.run(&mut input, &mut output)
        };
        self.piece_pos = input.pos();
        let hint =
            stepped.map_err(|error| self.corrupt(format!("it does not decompress: {error}")))?;
        self.frame_done = hint == 0;
        self.output_full = self.buffer.len() == self.buffer.capacity();
        Ok(self.buffer.len() - before)
    }

    fn corrupt(&mut self, reason: String) -> WorkerError {
        self.failed = true;
        WorkerError::CorruptPart {
            path: self.path.clone(),
            reason,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn compress(text: &[u8]) -> Vec<u8> {
        zstd::encode_all(text, 3).unwrap()
    }

    fn info(stored: &[u8], text: &[u8]) -> PartInfo {
        PartInfo {
            part: 0,
            path: "b/p.jsonl.zst".into(),
            first_key: None,
            last_key: None,
            rows: text.iter().filter(|&&byte| byte == b'\n').count() as u64,
            raw_bytes: text.len() as u64,
            compressed_bytes: stored.len() as u64,
            blake3: blake3::hash(stored).to_hex().to_string(),
        }
    }

    /// A reader over `stored` delivered in pieces of `piece` bytes.
    fn reader(stored: &[u8], piece: usize) -> PartReader {
        let pieces: Vec<object_store::Result<bytes::Bytes>> = stored
            .chunks(piece)
            .map(|chunk| Ok(bytes::Bytes::copy_from_slice(chunk)))
            .collect();
        PartReader::from_stream(
            "b/p.jsonl.zst",
            stored.len() as u64,
            futures::stream::iter(pieces).boxed(),
        )
        .unwrap()
    }

    async fn read_all(reader: &mut PartReader) -> Result<Vec<(u64, Vec<u8>)>, WorkerError> {
        let mut lines = Vec::new();
        while let Some(line) = reader.next_line().await? {
            lines.push((line.number, line.bytes.to_vec()));
        }
        Ok(lines)
    }

    #[tokio::test]
    async fn lines_span_piece_boundaries() {
        let text: Vec<u8> = (0..3_000)
            .map(|n| {
                format!(
                    "{{\"id\":{n},\"doc\":{{\"pad\":\"{}\"}}}}\n",
                    "x".repeat(n % 97)
                )
            })
            .collect::<String>()
            .into_bytes();
        let stored = compress(&text);
        for piece in [1, 7, 4096, stored.len()] {
            let mut part = reader(&stored, piece);
            let lines = read_all(&mut part).await.unwrap();
            assert_eq!(lines.len(), 3_000, "piece {piece}");
            assert_eq!(lines[0], (1, b"{\"id\":0,\"doc\":{\"pad\":\"\"}}".to_vec()));
            assert_eq!(lines[2_999].0, 3_000);
            let mut joined: Vec<u8> = Vec::new();
            for (_, line) in &lines {
                joined.extend_from_slice(line);
                joined.push(b'\n');
            }
            assert_eq!(joined, text);
            let digest = part.finish().await.unwrap();
            assert!(digest.complete);
            assert_eq!(digest.mismatches(&info(&stored, &text)), Vec::new());
        }
    }

    #[tokio::test]
    async fn a_five_mib_line_is_one_line() {
        let mut state = 0x2545_f491_4f6c_dd1d_u64;
        let mut big = String::from("{\"id\":2,\"doc\":{\"blob\":\"");
        while big.len() < 5 * 1024 * 1024 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            big.push(char::from(b'a' + (state % 26) as u8));
        }
        big.push_str("\"}}");
        let text = format!("{{\"id\":1,\"doc\":{{}}}}\n{big}\n{{\"id\":3,\"doc\":{{}}}}\n");
        let stored = compress(text.as_bytes());
        let mut part = reader(&stored, 64 * 1024);
        let lines = read_all(&mut part).await.unwrap();
        assert_eq!(lines.len(), 3);
        assert_eq!(lines[1].1, big.as_bytes());
        assert_eq!(lines[2].1, b"{\"id\":3,\"doc\":{}}");
        assert!(
            part.buffer.capacity() < 2 * big.len(),
            "{}",
            part.buffer.capacity()
        );
        let digest = part.finish().await.unwrap();
        assert_eq!(digest.raw_bytes, text.len() as u64);
        assert!(
            digest
                .mismatches(&info(&stored, text.as_bytes()))
                .is_empty()
        );
    }

    #[tokio::test]
    async fn a_flipped_byte_is_a_hash_mismatch() {
        let text: String = (0..2_000)
            .map(|n| format!("{{\"id\":{n},\"doc\":{{\"n\":{n}}}}}\n"))
            .collect();
        let stored = compress(text.as_bytes());
        let expected = info(&stored, text.as_bytes());
        let mut damaged = stored.clone();
        let middle = damaged.len() / 2;
        damaged[middle] ^= 0x01;
        let mut part = reader(&damaged, 1024);
        // Depending on the byte, zstd fails or yields different lines: either way
        // the digest names the hash.
        let read = read_all(&mut part).await;
        let digest = part.finish().await.unwrap();
        assert_eq!(digest.compressed_bytes, stored.len() as u64);
        let mismatches = digest.mismatches(&expected);
        assert_eq!(mismatches[0].code, "hash_mismatch", "{mismatches:?}");
        assert!(
            mismatches[0].detail.contains(&expected.blake3),
            "{mismatches:?}"
        );
        if let Err(error) = read {
            assert_eq!(error.code(), "corrupt_part");
        }
    }

    #[tokio::test]
    async fn truncated_and_empty_parts_are_corrupt() {
        let text: String = (0..500)
            .map(|n| format!("{{\"id\":{n},\"doc\":{{}}}}\n"))
            .collect();
        let stored = compress(text.as_bytes());
        let expected = info(&stored, text.as_bytes());
        let truncated = &stored[..stored.len() - 9];
        let mut part = reader(truncated, 100);
        let error = read_all(&mut part).await.unwrap_err();
        assert_eq!(error.code(), "corrupt_part");
        assert!(error.to_string().contains("truncated"), "{error}");
        assert!(error.to_string().contains("b/p.jsonl.zst"), "{error}");
        let digest = part.finish().await.unwrap();
        assert!(!digest.complete);
        let codes: Vec<&str> = digest
            .mismatches(&expected)
            .iter()
            .map(|mismatch| mismatch.code)
            .collect();
        assert_eq!(codes, ["size_mismatch", "hash_mismatch"]);

        let mut empty = reader(&[], 10);
        let error = read_all(&mut empty).await.unwrap_err();
        assert!(error.to_string().contains("empty"), "{error}");

        let mut garbage = reader(b"this is not zstd at all", 4);
        let error = read_all(&mut garbage).await.unwrap_err();
        assert!(error.to_string().contains("does not decompress"), "{error}");
    }

    #[tokio::test]
    async fn counts_rows_and_keeps_an_unterminated_last_line() {
        let text = b"{\"id\":1,\"doc\":{}}\n\n{\"id\":2,\"doc\":{}}";
        let stored = compress(text);
        let mut part = reader(&stored, 5);
        let lines = read_all(&mut part).await.unwrap();
        assert_eq!(
            lines,
            vec![
                (1, b"{\"id\":1,\"doc\":{}}".to_vec()),
                (2, Vec::new()),
                (3, b"{\"id\":2,\"doc\":{}}".to_vec()),
            ]
        );
        let digest = part.finish().await.unwrap();
        let mut expected = info(&stored, text);
        assert_eq!(digest.raw_bytes, expected.raw_bytes);
        expected.rows = 2;
        let mismatches = digest.mismatches(&expected);
        assert_eq!(mismatches.len(), 1);
        assert_eq!(mismatches[0].code, "row_count_mismatch");
        assert_eq!(
            mismatches[0].detail,
            "row count mismatch: expected 2 rows, found 3"
        );
    }
}
