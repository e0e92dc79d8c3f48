//! Incremental parser of PostgreSQL's binary `COPY` format.
//!
//! ```text
//! header:  "PGCOPY\n\xff\r\n\0" | flags: u32 | extension length: u32 | extension
//! tuple:   field count: i16 | per field: length: i32 (-1 = NULL) | bytes
//! trailer: -1: i16
//! ```
//!
//! Chunks from the server split tuples anywhere. They are appended to one
//! `BytesMut`; once a whole tuple is buffered it is split off and frozen, and
//! its fields are handed out as slices of that allocation (no copy). The
//! buffer holds at most the unconsumed rest of one chunk plus one partial
//! tuple, so memory stays bounded by the largest row, not the table.

use bytes::{Buf, Bytes, BytesMut};

use crate::error::SourceError;

/// The 11-byte signature that opens a binary COPY stream.
const SIGNATURE: &[u8; 11] = b"PGCOPY\n\xff\r\n\0";
/// Signature, flags and extension length.
const HEADER_LEN: usize = 19;
/// Flag bit 16: every tuple carries an OID (never requested here).
const FLAG_OIDS: u32 = 1 << 16;
/// Flag bits 0-15 must be understood by the reader; none are defined.
const CRITICAL_FLAGS: u32 = 0xFFFF;
/// Largest header extension accepted (none is defined today).
const MAX_EXTENSION: usize = 1024 * 1024;
/// Largest single field PostgreSQL can produce (1 GiB).
const MAX_FIELD: usize = 1 << 30;
/// Reserve ahead for a known tuple size only up to this much.
const MAX_RESERVE: usize = 64 * 1024 * 1024;

/// Fields of one tuple: `None` is SQL NULL.
pub(crate) type Tuple<const N: usize> = [Option<Bytes>; N];

/// Parses a binary COPY stream of tuples with exactly `N` fields.
#[derive(Debug, Default)]
pub(crate) struct CopyParser<const N: usize> {
    buffer: BytesMut,
    header_done: bool,
    trailer_seen: bool,
    /// No tuple can complete before the buffer holds this many bytes.
    needed: usize,
}

impl<const N: usize> CopyParser<N> {
    /// An empty parser expecting the header.
    pub(crate) fn new() -> Self {
        Self {
            buffer: BytesMut::new(),
            header_done: false,
            trailer_seen: false,
            needed: 0,
        }
    }

    /// Appends a chunk as received from the server.
    pub(crate) fn push(&mut self, chunk: &[u8]) -> Result<(), SourceError> {
        if self.trailer_seen && !chunk.is_empty() {
            return Err(SourceError::decode("data after the trailer"));
        }
        self.buffer.extend_from_slice(chunk);
        Ok(())
    }

    /// Bytes buffered and not yet handed out.
    pub(crate) fn buffered(&self) -> usize {
        self.buffer.len()
    }

    /// The next whole tuple, or `None` when more data is needed (or the trailer was read).
    pub(crate) fn next_tuple(&mut self) -> Result<Option<Tuple<N>>, SourceError> {
        if self.buffer.len() < self.needed || self.trailer_seen {
            return Ok(None);
        }
        if !self.header_done && !self.read_header()? {
            return Ok(None);
        }
        if self.buffer.len() < 2 {
            self.needed = 2;
            return Ok(None);
        }
        let count = i16::from_be_bytes([self.buffer[0], self.buffer[1]]);
        if count == -1 {
            self.buffer.advance(2);
            self.trailer_seen = true;
            if !self.buffer.is_empty() {
                return Err(SourceError::decode("data after the trailer"));
            }
            return Ok(None);
        }
        if usize::try_from(count).ok() != Some(N) {
            return Err(SourceError::decode(format!(
                "tuple with {count} fields, expected {N}"
            )));
        }
        let mut spans: [Option<(usize, usize)>; N] = [None; N];
        let mut position = 2;
        for span in spans.iter_mut() {
            let Some(length_bytes) = self.buffer.get(position..position + 4) else {
                self.needed = position + 4;
                return Ok(None);
            };
            let length = i32::from_be_bytes([
                length_bytes[0],
                length_bytes[1],
                length_bytes[2],
                length_bytes[3],
            ]);
            position += 4;
            if length == -1 {
                continue;
            }
            let length = usize::try_from(length)
                .ok()
                .filter(|length| *length <= MAX_FIELD)
                .ok_or_else(|| SourceError::decode(format!("invalid field length {length}")))?;
            *span = Some((position, position + length));
            position += length;
        }
        if self.buffer.len() < position {
            self.needed = position;
            let missing = position - self.buffer.len();
            if missing <= MAX_RESERVE {
                self.buffer.reserve(missing);
            }
            return Ok(None);
        }
        self.needed = 0;
        let tuple = self.buffer.split_to(position).freeze();
        Ok(Some(spans.map(|span| {
            span.map(|(start, end)| tuple.slice(start..end))
        })))
    }

    /// Checks the stream ended cleanly: trailer read, nothing left over.
    pub(crate) fn finish(&self) -> Result<(), SourceError> {
        if !self.trailer_seen {
            return Err(SourceError::decode(format!(
                "stream ended before the trailer ({} bytes of an incomplete {} left)",
                self.buffer.len(),
                if self.header_done { "tuple" } else { "header" }
            )));
        }
        if !self.buffer.is_empty() {
            return Err(SourceError::decode("data after the trailer"));
        }
        Ok(())
    }

    /// Consumes the header once it is complete; `false` when more data is needed.
    fn read_header(&mut self) -> Result<bool, SourceError> {
        if self.buffer.len() < HEADER_LEN {
            self.needed = HEADER_LEN;
            return Ok(false);
        }
        if &self.buffer[..SIGNATURE.len()] != SIGNATURE {
            return Err(SourceError::decode("missing PGCOPY signature"));
        }
        let word = |at: usize| {
            u32::from_be_bytes([
                self.buffer[at],
                self.buffer[at + 1],
                self.buffer[at + 2],
                self.buffer[at + 3],
            ])
        };
        let flags = word(11);
        if flags & FLAG_OIDS != 0 {
            return Err(SourceError::decode(
                "tuples carry OIDs, which were not requested",
            ));
        }
        if flags & CRITICAL_FLAGS != 0 {
            return Err(SourceError::decode(format!(
                "unknown critical header flags {flags:#x}"
            )));
        }
        let extension = usize::try_from(word(15))
            .ok()
            .filter(|extension| *extension <= MAX_EXTENSION)
            .ok_or_else(|| SourceError::decode("header extension too large"))?;
        if self.buffer.len() < HEADER_LEN + extension {
            self.needed = HEADER_LEN + extension;
            return Ok(false);
        }
        self.buffer.advance(HEADER_LEN + extension);
        self.header_done = true;
        self.needed = 0;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(extension: &[u8]) -> Vec<u8> {
        let mut out = SIGNATURE.to_vec();
        out.extend_from_slice(&0u32.to_be_bytes());
        out.extend_from_slice(&u32::try_from(extension.len()).unwrap_or(0).to_be_bytes());
        out.extend_from_slice(extension);
        out
    }

    fn tuple(fields: &[Option<&[u8]>]) -> Vec<u8> {
        let mut out = i16::try_from(fields.len())
            .unwrap_or(0)
            .to_be_bytes()
            .to_vec();
        for field in fields {
            match field {
                None => out.extend_from_slice(&(-1i32).to_be_bytes()),
                Some(bytes) => {
                    out.extend_from_slice(&i32::try_from(bytes.len()).unwrap_or(0).to_be_bytes());
                    out.extend_from_slice(bytes);
                }
            }
        }
        out
    }

    type OwnedRow = [Option<Vec<u8>>; 3];

    fn sample() -> (Vec<u8>, Vec<OwnedRow>) {
        let rows: Vec<OwnedRow> = vec![
            [Some(b"a".to_vec()), None, Some(b"{}".to_vec())],
            [
                Some(b"b\"\\\n".to_vec()),
                Some(b"7".to_vec()),
                Some("{\"x\":\"\u{1F600}\"}".as_bytes().to_vec()),
            ],
            [
                Some(Vec::new()),
                Some(b"null".to_vec()),
                Some(vec![b'z'; 300]),
            ],
        ];
        let mut stream = header(b"ext");
        for row in &rows {
            let fields: Vec<Option<&[u8]>> = row.iter().map(|f| f.as_deref()).collect();
            stream.extend_from_slice(&tuple(&fields));
        }
        stream.extend_from_slice(&(-1i16).to_be_bytes());
        (stream, rows)
    }

    fn parse(chunks: &[&[u8]]) -> Result<Vec<OwnedRow>, SourceError> {
        let mut parser = CopyParser::<3>::new();
        let mut rows = Vec::new();
        for chunk in chunks {
            parser.push(chunk)?;
            while let Some(fields) = parser.next_tuple()? {
                rows.push(fields.map(|field| field.map(|bytes| bytes.to_vec())));
            }
        }
        parser.finish()?;
        Ok(rows)
    }

    #[test]
    fn splits_at_every_offset() {
        let (stream, expected) = sample();
        assert_eq!(parse(&[&stream]).expect("whole"), expected);
        for cut in 0..=stream.len() {
            let (first, second) = stream.split_at(cut);
            assert_eq!(
                parse(&[first, second]).expect("two chunks"),
                expected,
                "cut at {cut}"
            );
        }
        for cut in 0..stream.len() {
            for cut2 in cut..stream.len() {
                let chunks = [&stream[..cut], &stream[cut..cut2], &stream[cut2..]];
                assert_eq!(parse(&chunks).expect("three chunks"), expected);
            }
        }
        let bytes: Vec<&[u8]> = stream.chunks(1).collect();
        assert_eq!(parse(&bytes).expect("byte by byte"), expected);
    }

    #[test]
    fn fields_share_one_allocation() {
        let (stream, _) = sample();
        let mut parser = CopyParser::<3>::new();
        parser.push(&stream).expect("push");
        let fields = parser.next_tuple().expect("parse").expect("tuple");
        let key = fields[0].as_ref().expect("key");
        let doc = fields[2].as_ref().expect("doc");
        // Both are views into one frozen tuple: the document starts after the key, a NULL and a length.
        assert_eq!(doc.as_ptr() as usize - key.as_ptr() as usize, 1 + 4 + 4);
    }

    #[test]
    fn rejects_malformed_streams() {
        let (stream, _) = sample();
        for cut in 0..stream.len() {
            let error = parse(&[&stream[..cut]]).expect_err("truncated");
            assert_eq!(error.code(), "decode");
        }
        let mut bad_signature = stream.clone();
        bad_signature[0] = b'X';
        assert!(parse(&[&bad_signature]).is_err());
        let mut oids = stream.clone();
        oids[12] = 1;
        assert!(parse(&[&oids]).unwrap_err_message().contains("OIDs"));
        let mut two_fields = header(b"");
        two_fields.extend_from_slice(&tuple(&[Some(b"a"), Some(b"b")]));
        assert!(
            parse(&[&two_fields])
                .unwrap_err_message()
                .contains("2 fields")
        );
        let mut negative = header(b"");
        negative.extend_from_slice(&3i16.to_be_bytes());
        negative.extend_from_slice(&(-2i32).to_be_bytes());
        assert!(parse(&[&negative]).unwrap_err_message().contains("-2"));
        let mut trailing = stream.clone();
        trailing.push(0);
        assert!(
            parse(&[&trailing])
                .unwrap_err_message()
                .contains("after the trailer")
        );
    }

    trait ErrMessage {
        fn unwrap_err_message(self) -> String;
    }

    impl<T: std::fmt::Debug> ErrMessage for Result<T, SourceError> {
        fn unwrap_err_message(self) -> String {
            self.expect_err("expected an error").to_string()
        }
    }
}
